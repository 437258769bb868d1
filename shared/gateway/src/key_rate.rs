//! Per-API-key request rate at the gateway: one token bucket per key, so that one client
//! cannot take every in-flight slot of a gateway (the coordinator's, or a node's ingress). The
//! tenant's own quota still applies in the mesh; this bound is the gateway's, before any work.

use skein_client::ApiKey;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Keys tracked at once; beyond it, idle keys' buckets (full again) are dropped first.
pub(crate) const MAX_KEYS: usize = 4096;

/// The rate each API key may send inference requests at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyRateLimit {
    /// Requests per second, sustained (must be > 0).
    pub per_second: f64,
    /// Requests that may arrive at once after a quiet spell (at least 1).
    pub burst: u32,
}

impl Default for KeyRateLimit {
    /// 1 000 requests a second per key, bursts of 1 000.
    fn default() -> Self {
        KeyRateLimit {
            per_second: 1000.0,
            burst: 1000,
        }
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The buckets of the keys seen lately (at most [`MAX_KEYS`]). Keys are held as hashes.
pub(crate) struct KeyRates {
    limit: KeyRateLimit,
    hasher: std::collections::hash_map::RandomState,
    buckets: Mutex<HashMap<u64, Bucket>>,
}

impl KeyRates {
    pub(crate) fn new(limit: KeyRateLimit) -> KeyRates {
        KeyRates {
            limit: KeyRateLimit {
                per_second: if limit.per_second > 0.0 {
                    limit.per_second
                } else {
                    f64::MIN_POSITIVE
                },
                burst: limit.burst.max(1),
            },
            hasher: Default::default(),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one request of `key`'s rate (no key: one shared bucket), or say how long until
    /// the next is allowed.
    pub(crate) fn admit(&self, key: Option<&ApiKey>, now: Instant) -> Result<(), Duration> {
        let id = self.hasher.hash_one(key.map_or("", |k| k.as_str()));
        let burst = f64::from(self.limit.burst);
        let rate = self.limit.per_second;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(&id) && buckets.len() >= MAX_KEYS {
            // A bucket that has refilled is the same as no bucket: drop those first.
            let refill = Duration::from_secs_f64((burst / rate).min(86_400.0));
            buckets.retain(|_, b| now.saturating_duration_since(b.last) < refill);
            if buckets.len() >= MAX_KEYS {
                let oldest = buckets.iter().min_by_key(|(_, b)| b.last).map(|(k, _)| *k);
                if let Some(k) = oldest {
                    buckets.remove(&k);
                }
            }
        }
        let b = buckets.entry(id).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                ((1.0 - b.tokens) / rate).min(86_400.0),
            ))
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_burst_then_its_rate_and_other_keys_are_not_affected() {
        let rates = KeyRates::new(KeyRateLimit {
            per_second: 10.0,
            burst: 3,
        });
        let (a, b) = (ApiKey::new("key-a"), ApiKey::new("key-b"));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(rates.admit(Some(&a), t0).is_ok());
        }
        let wait = rates.admit(Some(&a), t0).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Another key has its own bucket.
        assert!(rates.admit(Some(&b), t0).is_ok());
        // 100 ms later one more request of `a` is allowed, and only one.
        let t1 = t0 + Duration::from_millis(100);
        assert!(rates.admit(Some(&a), t1).is_ok());
        assert!(rates.admit(Some(&a), t1).is_err());
        // Requests without a key share one bucket.
        for _ in 0..3 {
            assert!(rates.admit(None, t1).is_ok());
        }
        assert!(rates.admit(None, t1).is_err());
    }

    #[test]
    fn the_keys_tracked_are_bounded() {
        let rates = KeyRates::new(KeyRateLimit {
            per_second: 1.0,
            burst: 1,
        });
        let t0 = Instant::now();
        for i in 0..MAX_KEYS + 10 {
            let k = ApiKey::new(format!("key-{i}"));
            assert!(rates.admit(Some(&k), t0).is_ok());
        }
        assert_eq!(rates.tracked(), MAX_KEYS);
        // Once they have refilled, old buckets make room without evicting busy ones.
        let later = t0 + Duration::from_secs(2);
        assert!(rates.admit(Some(&ApiKey::new("new")), later).is_ok());
        assert_eq!(rates.tracked(), 1);
    }
}
