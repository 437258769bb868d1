//! [`KeyCache`]: API keys the coordinator vouched for (or refused), kept at the node so that an
//! HTTP call costs no round trip to the coordinator. Decisions only: time comes in as `now`,
//! the caller does the asking.
//!
//! # Policy
//! - A key is checked with the coordinator on first use; its answer (a [`KeyGrant`] or a
//!   refusal) is kept for [`KeyCacheConfig::ttl`] and then checked again.
//! - A revocation named in a heartbeat answer drops the key's grant at once: its next use is
//!   checked again (and refused).
//! - When the coordinator cannot be reached, a grant is honoured for at most
//!   [`KeyCacheConfig::offline_grace`] past its TTL, never beyond; an unknown key is refused.
//! - The offline rule of route tickets holds here too (issue 20): while the node is offline,
//!   and whenever the coordinator cannot be reached, a grant is honoured only within its
//!   tenant's offline validity ([`KeyGrant::offline_validity_ms`]) from the coordinator's
//!   answer, whatever the TTL and grace allow.
//! - At most [`KeyCacheConfig::max_keys`] keys are kept; the oldest answer goes first.

use sha2::{Digest, Sha256};
use skein_net::ticket::Reach;
use skein_proto::KeyGrant;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// How long answers are kept, and how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyCacheConfig {
    /// How long an answer is used before the key is checked again.
    pub ttl: Duration,
    /// How long past `ttl` a grant is still honoured while the coordinator cannot be reached.
    pub offline_grace: Duration,
    /// Keys kept at once.
    pub max_keys: usize,
}

/// What the coordinator said of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAnswer {
    /// Valid, for this tenant and these scopes.
    Granted(KeyGrant),
    /// Not valid (unknown, malformed, revoked, or none given where one is needed).
    Refused(String),
}

/// What to do with a request carrying a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyDecision {
    /// Serve it under this grant.
    Grant(KeyGrant),
    /// Refuse it (401) with this message.
    Refuse(String),
    /// Ask the coordinator; `stale` is the expired grant honoured if it cannot be reached.
    Check {
        /// A grant past its TTL but within the offline grace.
        stale: Option<KeyGrant>,
    },
}

#[derive(Debug)]
struct Entry {
    answer: KeyAnswer,
    at: Instant,
}

/// The cache. Keys are held as sha256 digests, never in clear.
#[derive(Debug)]
pub struct KeyCache {
    config: KeyCacheConfig,
    entries: HashMap<[u8; 32], Entry>,
}

/// The digest a key is kept under (`None`: a request without a key).
fn digest(key: Option<&str>) -> [u8; 32] {
    match key {
        Some(k) => Sha256::digest(k.as_bytes()).into(),
        None => [0; 32],
    }
}

impl KeyCache {
    /// An empty cache.
    pub fn new(config: KeyCacheConfig) -> Self {
        KeyCache {
            config,
            entries: HashMap::new(),
        }
    }

    /// What to do with `key` at `now`, by a node that reaches its coordinator.
    pub fn decide(&self, key: Option<&str>, now: Instant) -> KeyDecision {
        self.decide_at(key, now, Reach::Online)
    }

    /// What to do with `key` at `now`; offline ([`Reach::Offline`]), a grant older than its
    /// tenant's offline validity is not used (the coordinator is asked, which fails).
    pub fn decide_at(&self, key: Option<&str>, now: Instant, reach: Reach) -> KeyDecision {
        let Some(e) = self.entries.get(&digest(key)) else {
            return KeyDecision::Check { stale: None };
        };
        let age = now.saturating_duration_since(e.at);
        let within_validity = |g: &KeyGrant| age < Duration::from_millis(g.offline_validity_ms);
        match &e.answer {
            _ if age >= self.config.ttl + self.config.offline_grace => {
                KeyDecision::Check { stale: None }
            }
            KeyAnswer::Granted(g) if age >= self.config.ttl => KeyDecision::Check {
                stale: within_validity(g).then(|| g.clone()),
            },
            KeyAnswer::Granted(g) if reach == Reach::Offline && !within_validity(g) => {
                KeyDecision::Check { stale: None }
            }
            KeyAnswer::Refused(_) if age >= self.config.ttl => KeyDecision::Check { stale: None },
            KeyAnswer::Granted(g) => KeyDecision::Grant(g.clone()),
            KeyAnswer::Refused(m) => KeyDecision::Refuse(m.clone()),
        }
    }

    /// Keep the coordinator's `answer` for `key`, given at `now`.
    pub fn store(&mut self, key: Option<&str>, answer: KeyAnswer, now: Instant) {
        let d = digest(key);
        if !self.entries.contains_key(&d) && self.entries.len() >= self.config.max_keys.max(1) {
            let limit = self.config.ttl + self.config.offline_grace;
            self.entries
                .retain(|_, e| now.saturating_duration_since(e.at) < limit);
            if self.entries.len() >= self.config.max_keys.max(1) {
                if let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.at)
                    .map(|(k, _)| *k)
                {
                    self.entries.remove(&oldest);
                }
            }
        }
        self.entries.insert(d, Entry { answer, at: now });
    }

    /// Drop the grants of the keys with these ids (revoked): their next use is checked again.
    /// Returns how many were dropped.
    pub fn revoke(&mut self, key_ids: &[String]) -> usize {
        if key_ids.is_empty() {
            return 0;
        }
        let before = self.entries.len();
        self.entries.retain(|_, e| match &e.answer {
            KeyAnswer::Granted(g) => !key_ids.contains(&g.key_id),
            KeyAnswer::Refused(_) => true,
        });
        before - self.entries.len()
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> KeyCacheConfig {
        KeyCacheConfig {
            ttl: Duration::from_secs(60),
            offline_grace: Duration::from_secs(300),
            max_keys: 2,
        }
    }

    fn grant(id: &str) -> KeyGrant {
        KeyGrant {
            key_id: id.into(),
            tenant: "acme".into(),
            scopes: vec!["invoke".into()],
            platform_admin: false,
            max_rps: None,
            max_concurrent: None,
            offline_validity_ms: 15 * 60 * 1000,
        }
    }

    /// The tenant's offline validity bounds a cached grant offline: within the TTL when the
    /// node is offline, and past the TTL (the grace) whenever the coordinator cannot be asked.
    #[test]
    fn offline_a_grant_holds_only_within_its_offline_validity() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut c = KeyCache::new(config());
        let short = KeyGrant {
            offline_validity_ms: 30_000,
            ..grant("a")
        };
        c.store(Some("k1"), KeyAnswer::Granted(short.clone()), t0);
        // Within the TTL: online it is used; offline only for its 30 s.
        assert_eq!(
            c.decide_at(Some("k1"), t0 + s(29), Reach::Offline),
            KeyDecision::Grant(short.clone())
        );
        assert_eq!(
            c.decide_at(Some("k1"), t0 + s(30), Reach::Offline),
            KeyDecision::Check { stale: None }
        );
        assert_eq!(
            c.decide_at(Some("k1"), t0 + s(30), Reach::Online),
            KeyDecision::Grant(short.clone())
        );
        // Past the TTL, the grace no longer extends it beyond the validity.
        assert_eq!(
            c.decide_at(Some("k1"), t0 + s(61), Reach::Online),
            KeyDecision::Check { stale: None }
        );
        // A long validity (the default 15 min): the grace (5 min past a 1 min TTL) bounds it.
        c.store(Some("k2"), KeyAnswer::Granted(grant("b")), t0);
        assert_eq!(
            c.decide_at(Some("k2"), t0 + s(359), Reach::Offline),
            KeyDecision::Check {
                stale: Some(grant("b"))
            }
        );
        assert_eq!(
            c.decide_at(Some("k2"), t0 + s(360), Reach::Offline),
            KeyDecision::Check { stale: None }
        );
    }

    #[test]
    fn a_new_key_is_checked_then_its_answer_is_used_until_the_ttl() {
        let t0 = Instant::now();
        let mut c = KeyCache::new(config());
        assert_eq!(c.decide(Some("k1"), t0), KeyDecision::Check { stale: None });
        c.store(Some("k1"), KeyAnswer::Granted(grant("a")), t0);
        c.store(Some("bad"), KeyAnswer::Refused("not valid".into()), t0);
        let t = t0 + Duration::from_secs(59);
        assert_eq!(c.decide(Some("k1"), t), KeyDecision::Grant(grant("a")));
        assert_eq!(
            c.decide(Some("bad"), t),
            KeyDecision::Refuse("not valid".into())
        );
        assert_eq!(c.decide(None, t), KeyDecision::Check { stale: None });
        let t = t0 + Duration::from_secs(60);
        assert_eq!(c.decide(Some("bad"), t), KeyDecision::Check { stale: None });
    }

    #[test]
    fn an_expired_grant_is_honoured_offline_only_within_the_grace() {
        let t0 = Instant::now();
        let mut c = KeyCache::new(config());
        c.store(Some("k1"), KeyAnswer::Granted(grant("a")), t0);
        assert_eq!(
            c.decide(Some("k1"), t0 + Duration::from_secs(61)),
            KeyDecision::Check {
                stale: Some(grant("a"))
            }
        );
        assert_eq!(
            c.decide(Some("k1"), t0 + Duration::from_secs(359)),
            KeyDecision::Check {
                stale: Some(grant("a"))
            }
        );
        assert_eq!(
            c.decide(Some("k1"), t0 + Duration::from_secs(360)),
            KeyDecision::Check { stale: None }
        );
    }

    #[test]
    fn a_revocation_drops_the_grant_at_once() {
        let t0 = Instant::now();
        let mut c = KeyCache::new(config());
        c.store(Some("k1"), KeyAnswer::Granted(grant("a")), t0);
        c.store(Some("k2"), KeyAnswer::Granted(grant("b")), t0);
        assert_eq!(c.revoke(&["a".into()]), 1);
        assert_eq!(c.decide(Some("k1"), t0), KeyDecision::Check { stale: None });
        assert_eq!(c.decide(Some("k2"), t0), KeyDecision::Grant(grant("b")));
    }

    #[test]
    fn the_cache_holds_at_most_max_keys_oldest_out() {
        let t0 = Instant::now();
        let mut c = KeyCache::new(config());
        c.store(Some("k1"), KeyAnswer::Granted(grant("a")), t0);
        c.store(
            Some("k2"),
            KeyAnswer::Granted(grant("b")),
            t0 + Duration::from_secs(1),
        );
        c.store(
            Some("k3"),
            KeyAnswer::Granted(grant("c")),
            t0 + Duration::from_secs(2),
        );
        assert_eq!(c.len(), 2);
        let t = t0 + Duration::from_secs(3);
        assert_eq!(c.decide(Some("k1"), t), KeyDecision::Check { stale: None });
        assert_eq!(c.decide(Some("k3"), t), KeyDecision::Grant(grant("c")));
    }
}
