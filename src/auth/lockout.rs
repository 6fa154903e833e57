//! Per-source failed-authentication lockout: after `max_failures` failures within `window`,
//! a source address is refused for `ban` without any upstream contact.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::config::Lockout as LockoutConfig;

#[derive(Debug, Default)]
struct Entry {
    failures: VecDeque<Instant>,
    banned_until: Option<Instant>,
}

/// Failure counts and bans by source address.
#[derive(Debug)]
pub struct Lockout {
    max_failures: u32,
    window: Duration,
    ban: Duration,
    entries: DashMap<IpAddr, Entry>,
}

/// The lockout key of a source: IPv4 addresses as they are, IPv6 by /64 (a client usually
/// owns a whole /64, so per-address counting would be trivially evaded).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

impl Lockout {
    /// A lockout table with the configured thresholds.
    pub fn new(cfg: &LockoutConfig) -> Lockout {
        Lockout { max_failures: cfg.max_failures, window: cfg.window, ban: cfg.ban, entries: DashMap::new() }
    }

    /// True while `ip` is banned.
    pub fn is_locked(&self, ip: IpAddr) -> bool {
        self.is_locked_at(ip, Instant::now())
    }

    fn is_locked_at(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = source_key(ip);
        self.entries.get(&ip).and_then(|e| e.banned_until).is_some_and(|t| now < t)
    }

    /// Records a failed login; returns true when this failure starts a ban.
    pub fn record_failure(&self, ip: IpAddr) -> bool {
        self.record_failure_at(ip, Instant::now())
    }

    fn record_failure_at(&self, ip: IpAddr, now: Instant) -> bool {
        if self.max_failures == 0 {
            return false;
        }
        let ip = source_key(ip);
        let mut e = self.entries.entry(ip).or_default();
        while e.failures.front().is_some_and(|t| now.duration_since(*t) > self.window) {
            e.failures.pop_front();
        }
        e.failures.push_back(now);
        if e.failures.len() >= self.max_failures as usize && e.banned_until.is_none_or(|t| now >= t) {
            e.banned_until = Some(now + self.ban);
            e.failures.clear();
            return true;
        }
        false
    }

    /// Drops entries with no recent failures and no ban (called periodically).
    pub fn sweep(&self) {
        let now = Instant::now();
        self.entries.retain(|_, e| {
            e.banned_until.is_some_and(|t| now < t)
                || e.failures.back().is_some_and(|t| now.duration_since(*t) <= self.window)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(max: u32) -> Lockout {
        Lockout::new(&LockoutConfig {
            max_failures: max,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(300),
        })
    }

    #[test]
    fn bans_after_n_failures_within_window_then_expires() {
        let l = table(3);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        assert!(!l.record_failure_at(ip, t0));
        assert!(!l.record_failure_at(ip, t0 + Duration::from_secs(1)));
        assert!(!l.is_locked_at(ip, t0 + Duration::from_secs(2)));
        assert!(l.record_failure_at(ip, t0 + Duration::from_secs(2)));
        assert!(l.is_locked_at(ip, t0 + Duration::from_secs(3)));
        assert!(!l.is_locked_at(other, t0 + Duration::from_secs(3)));
        assert!(!l.is_locked_at(ip, t0 + Duration::from_secs(303)));
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let l = table(2);
        let t0 = Instant::now();
        assert!(!l.record_failure_at("2001:db8:1:2::1".parse().unwrap(), t0));
        assert!(l.record_failure_at("2001:db8:1:2:ffff::9".parse().unwrap(), t0));
        assert!(l.is_locked_at("2001:db8:1:2::77".parse().unwrap(), t0));
        assert!(!l.is_locked_at("2001:db8:1:3::1".parse().unwrap(), t0));
    }

    #[test]
    fn old_failures_fall_out_of_the_window() {
        let l = table(2);
        let ip: IpAddr = "::1".parse().unwrap();
        let t0 = Instant::now();
        assert!(!l.record_failure_at(ip, t0));
        assert!(!l.record_failure_at(ip, t0 + Duration::from_secs(61)));
        assert!(!l.is_locked_at(ip, t0 + Duration::from_secs(62)));
    }
}
