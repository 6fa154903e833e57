//! Argon2id password verification for Redis `AUTH`: off the async workers on a bounded pool,
//! with a short-lived cache of verified credentials keyed by a keyed hash (never the password),
//! so a reconnect storm costs one Argon2 run per credential, not one per connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::{PasswordHash, PasswordVerifier};
use dashmap::DashMap;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::sync::{Semaphore, watch};

/// How long a verified credential is remembered.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Entries before the cache is cleared (bounded memory under a storm of distinct passwords).
const CACHE_MAX: usize = 10_000;

/// The verification pool and cache.
#[derive(Debug)]
pub struct Argon2Pool {
    permits: Arc<Semaphore>,
    cache: Arc<DashMap<[u8; 32], Instant>>,
    /// Verifications running, by cache key: logins presenting the same credentials at once
    /// (a fleet reconnecting, the cache entry expiring under load) share one computation. Each
    /// runs in a task of its own, so a login that stops waiting (its queue deadline) neither
    /// cancels it nor leaves its entry behind.
    inflight: Arc<DashMap<[u8; 32], watch::Receiver<Option<bool>>>>,
    /// Argon2 computations run so far.
    computed: Arc<AtomicU64>,
    key: [u8; 32],
}

impl Argon2Pool {
    /// A pool running at most `parallel` verifications at once.
    pub fn new(parallel: usize) -> Argon2Pool {
        let mut key = [0u8; 32];
        rand::fill(&mut key);
        Argon2Pool {
            permits: Arc::new(Semaphore::new(parallel.max(1))),
            cache: Arc::default(),
            inflight: Arc::default(),
            computed: Arc::default(),
            key,
        }
    }

    fn cache_key(&self, user: &str, phc: &str, password: &[u8]) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).expect("hmac takes any key length");
        m.update(user.as_bytes());
        m.update(&[0]);
        m.update(phc.as_bytes());
        m.update(&[0]);
        m.update(password);
        m.finalize().into_bytes().into()
    }

    /// True when `password` matches the PHC string. Wrong passwords are never cached.
    pub async fn verify(&self, user: &str, phc: &str, password: &[u8]) -> bool {
        let key = self.cache_key(user, phc, password);
        if self.cache.get(&key).is_some_and(|t| t.elapsed() < CACHE_TTL) {
            return true;
        }
        let mut result = match self.inflight.entry(key) {
            dashmap::Entry::Occupied(e) => e.get().clone(),
            dashmap::Entry::Vacant(v) => {
                let (tx, rx) = watch::channel(None);
                v.insert(rx.clone());
                let (permits, cache, inflight, computed) =
                    (self.permits.clone(), self.cache.clone(), self.inflight.clone(), self.computed.clone());
                let (phc, password) = (phc.to_string(), password.to_vec());
                tokio::spawn(async move {
                    let ok = match permits.acquire_owned().await {
                        Ok(_permit) => {
                            computed.fetch_add(1, Relaxed);
                            tokio::task::spawn_blocking(move || {
                                PasswordHash::new(&phc)
                                    .is_ok_and(|h| argon2::Argon2::default().verify_password(&password, &h).is_ok())
                            })
                            .await
                            .unwrap_or(false)
                        }
                        Err(_) => false,
                    };
                    if ok {
                        if cache.len() >= CACHE_MAX {
                            cache.clear();
                        }
                        cache.insert(key, Instant::now());
                    }
                    // cached first: a login arriving now finds the cache or this flight
                    inflight.remove(&key);
                    let _ = tx.send(Some(ok));
                });
                rx
            }
        };
        result.wait_for(Option::is_some).await.is_ok_and(|v| *v == Some(true))
    }

    /// Argon2 computations run so far (cache hits and shared verifications not counted).
    pub fn computed(&self) -> u64 {
        self.computed.load(Relaxed)
    }

    /// Verifies against a dummy hash (unknown users), so timing does not reveal who exists.
    pub async fn burn(&self, password: &[u8]) {
        static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let phc = DUMMY.get_or_init(|| {
            use argon2::PasswordHasher;
            argon2::Argon2::default().hash_password(b"portcullis-dummy").map(|h| h.to_string()).unwrap_or_default()
        });
        let _ = self.verify("\0dummy", phc, password).await;
    }
}

/// An Argon2id PHC string for `password` (the `user hash --protocol redis` output).
pub fn hash(password: &[u8]) -> Result<String, String> {
    use argon2::PasswordHasher;
    argon2::Argon2::default().hash_password(password).map(|h| h.to_string()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_logins_with_the_same_credentials_share_one_verification() {
        let pool = Arc::new(Argon2Pool::new(1));
        let phc = hash(b"right").unwrap();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (pool, phc) = (pool.clone(), phc.clone());
            set.spawn(async move { pool.verify("u", &phc, b"right").await });
        }
        while let Some(ok) = set.join_next().await {
            assert!(ok.unwrap());
        }
        assert_eq!(pool.computed(), 1, "sixteen logins, one Argon2 computation");
        // a login that stops waiting does not cancel the computation others share
        let other = hash(b"other").unwrap();
        let gave_up = tokio::time::timeout(Duration::from_millis(1), pool.verify("v", &other, b"other")).await;
        assert!(gave_up.is_err(), "Argon2 takes longer than 1 ms");
        assert!(pool.verify("v", &other, b"other").await);
        assert_eq!(pool.computed(), 2, "the second login joined the first one's computation");
        assert!(pool.inflight.is_empty(), "nothing left in flight");
        assert_eq!(pool.cache.len(), 2);
        // a wrong password is not served by a flight or the cache
        assert!(!pool.verify("u", &phc, b"wrong").await);
        assert!(!pool.verify("u", &phc, b"wrong").await);
        assert_eq!(pool.computed(), 4, "each wrong attempt computed");
    }

    #[tokio::test]
    async fn verifies_and_caches_only_successes() {
        let pool = Argon2Pool::new(2);
        let phc = hash(b"right").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$"));
        assert!(pool.verify("u", &phc, b"right").await);
        assert_eq!(pool.cache.len(), 1);
        assert!(!pool.verify("u", &phc, b"wrong").await);
        assert_eq!(pool.cache.len(), 1);
        assert!(pool.verify("u", &phc, b"right").await, "served from the cache");
        assert!(!pool.verify("u", "not a phc", b"right").await);
    }
}
