//! The process-wide budget for bytes a proxy holds while a request (or reply) is still arriving
//! (`[limits] max_buffered_bytes`). Every connection may hold its ordinary read buffer
//! (`FREE_PER_CONNECTION`) without asking; a request that arrives in pieces beyond that (a
//! large Redis value: the policy needs the whole request before anything goes upstream) is
//! charged here while it is held. A connection whose request would take the total over the
//! limit is refused, as Redis's `maxmemory-clients` evicts clients, so that memory stays
//! bounded by `max_connections × per-connection buffers + max_buffered_bytes`
//! whatever the clients send.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Bytes of a pending request a connection holds without charging the budget.
pub const FREE_PER_CONNECTION: usize = 64 * 1024;

/// Request bytes held across all connections, beyond their free share.
#[derive(Debug, Default)]
pub struct RequestMemory {
    used: AtomicU64,
}

impl RequestMemory {
    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }
}

/// One connection's charge; released when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<RequestMemory>,
    bytes: u64,
}

impl Held {
    /// A connection holding nothing.
    pub fn new(budget: Arc<RequestMemory>) -> Held {
        Held { budget, bytes: 0 }
    }

    /// The budget this charge is against.
    pub fn budget(&self) -> &Arc<RequestMemory> {
        &self.budget
    }

    /// Bytes this connection is charged for.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// This connection now holds `pending` bytes of an incomplete request. False when that
    /// would take the total over `limit`: the charge is then left as it was.
    pub fn hold(&mut self, pending: usize, limit: u64) -> bool {
        let want = pending.saturating_sub(FREE_PER_CONNECTION) as u64;
        if want <= self.bytes {
            self.budget.used.fetch_sub(self.bytes - want, Relaxed);
            self.bytes = want;
            return true;
        }
        let add = want - self.bytes;
        let before = self.budget.used.fetch_add(add, Relaxed);
        if before.saturating_add(add) > limit {
            self.budget.used.fetch_sub(add, Relaxed);
            return false;
        }
        self.bytes = want;
        true
    }
}

impl Held {
    /// A charge for all of `bytes` (no free share: bytes waiting between tasks); None when
    /// that would take the total over `limit`.
    pub fn whole(budget: Arc<RequestMemory>, bytes: usize, limit: u64) -> Option<Held> {
        let add = bytes as u64;
        let before = budget.used.fetch_add(add, Relaxed);
        if before.saturating_add(add) > limit {
            budget.used.fetch_sub(add, Relaxed);
            return None;
        }
        Some(Held { budget, bytes: add })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_beyond_the_free_share_and_refuses_past_the_limit() {
        let m = Arc::new(RequestMemory::default());
        let mut a = Held::new(m.clone());
        let mut b = Held::new(m.clone());
        assert!(a.hold(FREE_PER_CONNECTION, 100));
        assert_eq!(m.used(), 0, "the free share costs nothing");
        assert!(a.hold(FREE_PER_CONNECTION + 60, 100));
        assert!(!b.hold(FREE_PER_CONNECTION + 50, 100), "60 + 50 > 100");
        assert_eq!((m.used(), b.bytes()), (60, 0), "a refused charge is not kept");
        assert!(b.hold(FREE_PER_CONNECTION + 40, 100));
        assert!(a.hold(10, 100));
        assert_eq!(m.used(), 40, "a request handled releases its charge");
        drop(b);
        assert_eq!(m.used(), 0, "a closed connection releases its charge");
        let w = Held::whole(m.clone(), 30, 100).expect("within the limit");
        assert_eq!(m.used(), 30, "no free share");
        assert!(Held::whole(m.clone(), 71, 100).is_none());
        drop(w);
        assert_eq!(m.used(), 0);
    }
}
