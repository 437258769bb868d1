//! A replica's lifecycle as plain data: its state (cached, fetching, loading, loaded, failed),
//! when it was loaded and last used, its keep-alive window and keep-warm role, the backoff
//! after failed loads, and its load and unload counts.
//!
//! No clock and no locks: every decision takes `now` as a value, so tests drive it with a
//! fake clock. The [`Slot`](super::Slot) holds one in a `Mutex` and reports events to it.
//!
//! ```text
//!   Cached ─load_started─▶ Fetching ─fetched─▶ Loading ─loaded─▶ Loaded ─unloaded─▶ Cached
//!                              └──────load_failed──────┘
//!                                  ├─ no_capacity: Cached (routable; others may idle out)
//!                                  ├─ model_load_failed: Failed, reads Cached after a backoff
//!                                  └─ anything else: Failed
//! ```

use skein_proto::{ErrorCode, ModelState, WireError};
use std::time::Duration;
use tokio::time::Instant;

/// Why a replica was unloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnloadReason {
    /// Idle past its keep-alive window.
    Idle,
    /// Evicted to make room for another model.
    Memory,
    /// The autoscaler expects no call before it could pre-warm again.
    Scaler,
}

impl UnloadReason {
    /// Every reason, in `/metrics` order.
    pub const ALL: [UnloadReason; 3] = [
        UnloadReason::Idle,
        UnloadReason::Memory,
        UnloadReason::Scaler,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            UnloadReason::Idle => "idle",
            UnloadReason::Memory => "memory",
            UnloadReason::Scaler => "scaler",
        }
    }
}

/// A replica's load and unload counts (`skein_model_loads_total`, `skein_model_unloads_total`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleCounts {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Loads that succeeded.
    pub loads: u64,
    /// Loads that failed.
    pub load_failures: u64,
    /// Unloads, per [`UnloadReason::ALL`].
    pub unloads: [u64; 3],
}

/// How long a replica whose load failed for a passing reason stays out of routing: 1 s,
/// doubling with every failure in a row, at most 60 s.
pub fn load_retry_backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// One replica's lifecycle (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct ReplicaLifecycle {
    state: ModelState,
    /// One of the provisioned warm replicas (`min_replicas`): never idles out.
    keep_warm: bool,
    /// The keep-alive window: idle this long, the replica unloads.
    idle_timeout: Duration,
    /// When the replica last finished loading (the idle clock starts no earlier).
    loaded_at: Option<Instant>,
    /// When the last request finished.
    last_used: Option<Instant>,
    /// When the last load failed, and how many failed in a row.
    failed_at: Option<Instant>,
    failures: u32,
    loads: u64,
    load_failures: u64,
    unloads: [u64; 3],
}

impl ReplicaLifecycle {
    /// A replica not loaded yet (`cached`).
    pub fn new(keep_warm: bool, idle_timeout: Duration) -> Self {
        ReplicaLifecycle {
            state: ModelState::Cached,
            keep_warm,
            idle_timeout,
            loaded_at: None,
            last_used: None,
            failed_at: None,
            failures: 0,
            loads: 0,
            load_failures: 0,
            unloads: [0; 3],
        }
    }

    /// The coordinator's keep-warm role and the deployment's keep-alive window.
    pub fn set_role(&mut self, keep_warm: bool, idle_timeout: Duration) {
        self.keep_warm = keep_warm;
        self.idle_timeout = idle_timeout;
    }

    /// Whether this node keeps one of the provisioned warm replicas.
    pub fn keep_warm(&self) -> bool {
        self.keep_warm
    }

    /// A load began: the artifact is being fetched.
    pub fn load_started(&mut self) {
        self.state = ModelState::Fetching;
    }

    /// The artifact is here: the model is being loaded and warmed up.
    pub fn fetched(&mut self) {
        self.state = ModelState::Loading;
    }

    /// The load finished at `now`: ready, and the failure streak is over.
    pub fn loaded(&mut self, now: Instant) {
        self.state = ModelState::Loaded;
        self.loaded_at = Some(now);
        self.failures = 0;
        self.loads += 1;
    }

    /// The load failed at `now` with `e`. Not fitting in memory is transient (others may idle
    /// out): the replica stays routable (`cached`). A `model_load_failed` (disk, network) is
    /// retried after [`load_retry_backoff`]; any other error (a model the backend can never
    /// run) stays `failed`.
    pub fn load_failed(&mut self, now: Instant, e: WireError) {
        self.load_failures += 1;
        if e.code == ErrorCode::ModelLoadFailed {
            self.failed_at = Some(now);
            self.failures += 1;
        }
        self.state = if e.code == ErrorCode::NoCapacity {
            ModelState::Cached
        } else {
            ModelState::Failed(e)
        };
    }

    /// A request (or a batch) finished at `now`.
    pub fn used(&mut self, now: Instant) {
        self.last_used = Some(now);
    }

    /// The replica was unloaded.
    pub fn unloaded(&mut self, reason: UnloadReason) {
        self.unloads[reason as usize] += 1;
        self.state = ModelState::Cached;
    }

    /// Time since the last request finished (`None`: never used).
    pub fn idle_for(&self, now: Instant) -> Option<Duration> {
        self.last_used.map(|t| now.saturating_duration_since(t))
    }

    /// Whether a loaded replica has been idle past its keep-alive window at `now`: idle since
    /// the last request or since the load, whichever is later (a replica loaded ahead of a
    /// predicted call gets its whole window). A kept-warm replica never expires.
    pub fn idle_expired(&self, now: Instant) -> bool {
        if self.keep_warm || self.state != ModelState::Loaded {
            return false;
        }
        let since =
            |t: Option<Instant>| t.map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        since(self.last_used).min(since(self.loaded_at)) >= self.idle_timeout
    }

    /// The state as reported at `now`: a load that failed for a passing reason
    /// (`model_load_failed`: disk, network; not a model the backend can never run) reads
    /// `cached` again once its backoff is over, so the coordinator routes a call here and the
    /// load is retried.
    pub fn reported_state(&self, now: Instant) -> ModelState {
        match &self.state {
            ModelState::Failed(e) if e.code == ErrorCode::ModelLoadFailed => {
                let over = self.failed_at.is_none_or(|t| {
                    now.saturating_duration_since(t) >= load_retry_backoff(self.failures)
                });
                if over {
                    ModelState::Cached
                } else {
                    self.state.clone()
                }
            }
            _ => self.state.clone(),
        }
    }

    /// Loads that succeeded, loads that failed, unloads per [`UnloadReason::ALL`].
    pub fn counts(&self) -> (u64, u64, [u64; 3]) {
        (self.loads, self.load_failures, self.unloads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    fn failed(code: ErrorCode) -> WireError {
        WireError::new(code, "test")
    }

    #[test]
    fn failed_loads_back_off_doubling_to_a_minute() {
        let secs: Vec<u64> = [1, 2, 3, 6, 7, 8, 100]
            .iter()
            .map(|&n| load_retry_backoff(n).as_secs())
            .collect();
        assert_eq!(secs, vec![1, 2, 4, 32, 60, 60, 60]);
    }

    #[test]
    fn a_load_goes_cached_fetching_loading_loaded_and_back_when_unloaded() {
        let t0 = Instant::now();
        let mut l = ReplicaLifecycle::new(false, 10 * SEC);
        assert_eq!(l.reported_state(t0), ModelState::Cached);
        l.load_started();
        assert_eq!(l.reported_state(t0), ModelState::Fetching);
        l.fetched();
        assert_eq!(l.reported_state(t0), ModelState::Loading);
        l.loaded(t0 + SEC);
        assert_eq!(l.reported_state(t0 + SEC), ModelState::Loaded);
        l.unloaded(UnloadReason::Memory);
        assert_eq!(l.reported_state(t0 + SEC), ModelState::Cached);
        l.load_started();
        l.fetched();
        l.loaded(t0 + 2 * SEC);
        l.unloaded(UnloadReason::Idle);
        l.load_started();
        l.load_failed(t0 + 3 * SEC, failed(ErrorCode::InvalidModel));
        assert_eq!(l.counts(), (2, 1, [1, 1, 0]));
    }

    #[test]
    fn a_replica_expires_after_its_window_from_the_later_of_load_and_last_use() {
        let t0 = Instant::now();
        let mut l = ReplicaLifecycle::new(false, 10 * SEC);
        // Not loaded: nothing to expire, however long.
        assert!(!l.idle_expired(t0 + 3600 * SEC));
        l.load_started();
        l.fetched();
        assert!(!l.idle_expired(t0 + 3600 * SEC), "loading");
        l.loaded(t0);
        // Never used: the window counts from the load.
        assert!(!l.idle_expired(t0 + 10 * SEC - MS));
        assert!(l.idle_expired(t0 + 10 * SEC));
        assert_eq!(l.idle_for(t0 + 10 * SEC), None);
        // A request finishing restarts the window.
        l.used(t0 + 5 * SEC);
        assert_eq!(l.idle_for(t0 + 10 * SEC), Some(5 * SEC));
        assert!(!l.idle_expired(t0 + 15 * SEC - MS));
        assert!(l.idle_expired(t0 + 15 * SEC));
        // Used before a reload: the window counts from the (later) load.
        l.unloaded(UnloadReason::Idle);
        l.load_started();
        l.fetched();
        l.loaded(t0 + 20 * SEC);
        assert!(!l.idle_expired(t0 + 30 * SEC - MS));
        assert!(l.idle_expired(t0 + 30 * SEC));
        // A clock reading before the last event counts as no time idle.
        assert!(!l.idle_expired(t0));
    }

    #[test]
    fn a_kept_warm_replica_never_expires_and_a_new_window_applies_at_once() {
        let t0 = Instant::now();
        let mut l = ReplicaLifecycle::new(true, 10 * SEC);
        l.loaded(t0);
        assert!(l.keep_warm());
        assert!(!l.idle_expired(t0 + 3600 * SEC));
        l.set_role(false, 10 * SEC);
        assert!(l.idle_expired(t0 + 3600 * SEC));
        l.set_role(false, 7200 * SEC);
        assert!(!l.idle_expired(t0 + 3600 * SEC));
        l.set_role(false, Duration::ZERO);
        assert!(l.idle_expired(t0), "a zero window expires at once");
    }

    #[test]
    fn a_passing_load_failure_reads_cached_again_after_its_backoff() {
        let t0 = Instant::now();
        let mut l = ReplicaLifecycle::new(false, 10 * SEC);
        let e = failed(ErrorCode::ModelLoadFailed);
        l.load_started();
        l.load_failed(t0, e.clone());
        let failed_state = ModelState::Failed(e.clone());
        assert_eq!(l.reported_state(t0), failed_state);
        assert_eq!(l.reported_state(t0 + SEC - MS), failed_state);
        assert_eq!(l.reported_state(t0 + SEC), ModelState::Cached);
        // The second failure in a row waits 2 s, the third 4 s.
        l.load_failed(t0 + SEC, e.clone());
        assert_eq!(l.reported_state(t0 + 3 * SEC - MS), failed_state);
        assert_eq!(l.reported_state(t0 + 3 * SEC), ModelState::Cached);
        l.load_failed(t0 + 3 * SEC, e.clone());
        assert_eq!(l.reported_state(t0 + 7 * SEC - MS), failed_state);
        assert_eq!(l.reported_state(t0 + 7 * SEC), ModelState::Cached);
        // A load that succeeds ends the streak: the next failure waits 1 s again.
        l.loaded(t0 + 8 * SEC);
        l.load_failed(t0 + 9 * SEC, e);
        assert_eq!(l.reported_state(t0 + 10 * SEC - MS), failed_state);
        assert_eq!(l.reported_state(t0 + 10 * SEC), ModelState::Cached);
        assert_eq!(l.counts(), (1, 4, [0; 3]));
    }

    #[test]
    fn a_permanent_failure_stays_failed_and_no_room_stays_routable() {
        let t0 = Instant::now();
        for code in [ErrorCode::InvalidModel, ErrorCode::UnsupportedOperator] {
            let mut l = ReplicaLifecycle::new(false, 10 * SEC);
            l.load_failed(t0, failed(code));
            assert_eq!(
                l.reported_state(t0 + 3600 * SEC),
                ModelState::Failed(failed(code)),
                "{code}"
            );
        }
        let mut l = ReplicaLifecycle::new(false, 10 * SEC);
        l.load_started();
        l.load_failed(t0, failed(ErrorCode::NoCapacity));
        assert_eq!(l.reported_state(t0), ModelState::Cached);
        assert_eq!(l.counts(), (0, 1, [0; 3]));
    }
}
