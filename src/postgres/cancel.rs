//! Query cancel: clients get the upstream's pid and a proxy-generated secret; a CancelRequest
//! with that pair is mapped to the upstream's own key and sent to the upstream, rate-limited
//! per source address.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Open sessions' cancel keys.
#[derive(Debug, Default)]
pub struct CancelMap {
    keys: DashMap<(i32, i32), i32>,
    rate: DashMap<IpAddr, (Instant, u32)>,
}

impl CancelMap {
    /// Registers an upstream key; returns the secret to give the client.
    pub fn register(&self, pid: i32, upstream_secret: i32) -> i32 {
        loop {
            let secret: i32 = i32::from_ne_bytes(rand_bytes());
            if let dashmap::Entry::Vacant(v) = self.keys.entry((pid, secret)) {
                v.insert(upstream_secret);
                return secret;
            }
        }
    }

    /// Forgets a key (the session ended).
    pub fn remove(&self, pid: i32, secret: i32) {
        self.keys.remove(&(pid, secret));
    }

    /// The upstream secret for a client's (pid, secret), if a session holds it.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<i32> {
        self.keys.get(&(pid, secret)).map(|v| *v)
    }

    /// True when `ip` may send another cancel now (at most `per_second` per second).
    pub fn allow(&self, ip: IpAddr, per_second: u32) -> bool {
        let now = Instant::now();
        let mut e = self.rate.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= Duration::from_secs(1) {
            *e = (now, 0);
        }
        e.1 += 1;
        let ok = e.1 <= per_second;
        drop(e);
        if self.rate.len() > 10_000 {
            self.rate.retain(|_, (t, _)| now.duration_since(*t) < Duration::from_secs(1));
        }
        ok
    }
}

fn rand_bytes() -> [u8; 4] {
    let mut b = [0u8; 4];
    rand::fill(&mut b);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_and_expire_with_the_session() {
        let m = CancelMap::default();
        let secret = m.register(42, 7);
        assert_eq!(m.lookup(42, secret), Some(7));
        assert_eq!(m.lookup(42, secret.wrapping_add(1)), None);
        m.remove(42, secret);
        assert_eq!(m.lookup(42, secret), None);
    }

    #[test]
    fn rate_limit_per_source() {
        let m = CancelMap::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(m.allow(a, 2) && m.allow(a, 2));
        assert!(!m.allow(a, 2));
        assert!(m.allow(b, 2));
    }
}
