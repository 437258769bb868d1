//! Replay protection for 0-RTT requests: each request id runs at most once per route ticket.
//!
//! A client's 0-RTT flight can be captured and sent again. rustls already accepts each session
//! ticket's early data once per node process (its tickets are stateful and single-use); this
//! guard is the second, application-level layer: a request whose `(tenant, request id)` this
//! node has served, or is serving, is refused (`conflict`) until the route ticket it came with
//! has expired — after that the ticket check refuses it anyway. Decisions take `now_ms` as a
//! value; nothing here reads the clock.
//!
//! Bounded: at most `capacity` ids are remembered. When that many unexpired ids are held, a
//! request that arrived as early data is refused (`overloaded`, retry after 1 s: the SDK then
//! retries on a completed handshake), while one that arrived after the handshake (which cannot
//! be replayed) is served without being remembered.

use std::collections::HashMap;

/// What [`ReplayGuard::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Run it; its id is remembered.
    Remembered,
    /// Run it; the table is full and it came after the handshake, so it is not remembered.
    Unremembered,
    /// This id has been seen within its ticket's lifetime: do not run it again.
    Duplicate,
    /// The table is full and the request came as early data: refuse it.
    Full,
}

/// Request ids seen, each until its route ticket expires.
#[derive(Debug)]
pub struct ReplayGuard {
    /// `(tenant, request id)` → when the entry may be forgotten (Unix ms).
    seen: HashMap<(String, u64), u64>,
    capacity: usize,
}

impl ReplayGuard {
    /// A guard remembering at most `capacity` ids.
    pub fn new(capacity: usize) -> ReplayGuard {
        ReplayGuard {
            seen: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Decide on request `id` of `tenant`, whose ticket may be used until `until_ms`, arriving
    /// at `now_ms`, `early` if it came before the handshake completed.
    pub fn admit(
        &mut self,
        tenant: &str,
        id: u64,
        until_ms: u64,
        now_ms: u64,
        early: bool,
    ) -> Admission {
        let key = (tenant.to_string(), id);
        if let Some(&expires) = self.seen.get(&key) {
            if expires >= now_ms {
                return Admission::Duplicate;
            }
        }
        if self.seen.len() >= self.capacity && !self.seen.contains_key(&key) {
            self.seen.retain(|_, &mut expires| expires >= now_ms);
        }
        if self.seen.len() >= self.capacity && !self.seen.contains_key(&key) {
            return if early {
                Admission::Full
            } else {
                Admission::Unremembered
            };
        }
        self.seen.insert(key, until_ms);
        Admission::Remembered
    }

    /// Forget `id` (it failed before running to completion, and was not billed: running a
    /// retry of it is not a double run).
    pub fn forget(&mut self, tenant: &str, id: u64) {
        self.seen.remove(&(tenant.to_string(), id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_runs_once_until_its_ticket_expires() {
        let mut g = ReplayGuard::new(8);
        assert_eq!(g.admit("t", 7, 1_000, 0, true), Admission::Remembered);
        assert_eq!(g.admit("t", 7, 1_000, 500, true), Admission::Duplicate);
        assert_eq!(g.admit("t", 7, 1_000, 1_000, false), Admission::Duplicate);
        // Another tenant's id 7 is another request.
        assert_eq!(g.admit("u", 7, 1_000, 500, true), Admission::Remembered);
        // Past the ticket's lifetime the ticket check refuses it; the guard may forget it.
        assert_eq!(g.admit("t", 7, 5_000, 1_001, true), Admission::Remembered);
        g.forget("t", 7);
        assert_eq!(g.admit("t", 7, 5_000, 1_002, true), Admission::Remembered);
    }

    #[test]
    fn memory_is_bounded_and_only_early_requests_are_refused_when_full() {
        let mut g = ReplayGuard::new(3);
        for id in 0..3 {
            assert_eq!(g.admit("t", id, 1_000, 0, true), Admission::Remembered);
        }
        assert_eq!(g.admit("t", 10, 1_000, 10, true), Admission::Full);
        assert_eq!(g.admit("t", 11, 1_000, 10, false), Admission::Unremembered);
        assert_eq!(g.len(), 3);
        // A remembered id is still a duplicate when the table is full.
        assert_eq!(g.admit("t", 1, 1_000, 10, true), Admission::Duplicate);
        // Expired entries make room.
        assert_eq!(g.admit("t", 12, 9_000, 2_000, true), Admission::Remembered);
        assert_eq!(g.len(), 1);
    }
}
