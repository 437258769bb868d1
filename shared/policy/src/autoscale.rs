//! Replica autoscaling with hysteresis.
//!
//! ```text
//! need    = rate × service / (target_utilisation × concurrency_per_replica)   (fractional)
//! desired = clamp(ceil(need), min_replicas, max_replicas)        (max 0 = unbounded)
//! ```
//!
//! - **Up at once** when `desired > current`, or when queues build: total queued requests above
//!   `queue_threshold × max(current, 1)`, or measured utilisation above the target. Under queue
//!   pressure the backlog must drain within `drain_us` on top of the rate-based need:
//!   ```text
//!   backlog = ceil((rate × service + queued × service / drain) / concurrency)
//!   ```
//!   (all slots busy: the headroom of the target utilisation serves the backlog first)
//!   and the target is the larger of that and `current + 1` (the latter only while nothing is
//!   loading). Replicas still loading count in `current`, so a backlog they will serve adds
//!   nothing more once it is covered, and a flash crowd gets all the replicas it needs in one
//!   decision instead of one per load time.
//! - **Down only after the keep-alive window**: a lower need must hold for
//!   `keep_alive_us` (clamped to `[min_down_delay_us, max_down_delay_us]`) before the count
//!   drops, and then only to the *largest* need seen during that window, scaled by
//!   `1 - down_band` so that a need hovering on an integer boundary does not flap.
//! - **To zero** only when the last arrival is older than the keep-alive window and nothing is
//!   queued or running (then `min_replicas`, which is 0 unless provisioned concurrency is set).
//!
//! Every decision carries a human-readable `reason`.
//!
//! [`step`] is the whole per-model scaling step that the coordinator's scaler and the
//! simulator both run: the predicted rate over the lead time, [`decide`], the keep-alive plan
//! ([`crate::prewarm::plan`]) and [`target`], down to the replicas to hold and when to look
//! again. Only gathering the inputs differs between the two (heartbeats there, the event
//! queue here).

/// Tuning of [`decide`].
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleConfig {
    /// Fewest replicas (provisioned concurrency; 0 allows scale to zero).
    pub min_replicas: u32,
    /// Most replicas; 0 = unbounded.
    pub max_replicas: u32,
    /// Target busy fraction of the replicas' slots (0.05..=1).
    pub target_utilisation: f64,
    /// Requests one replica runs at once (at least 1).
    pub concurrency_per_replica: u32,
    /// Queued requests per replica that count as "queues build".
    pub queue_threshold: u32,
    /// Shortest wait before scaling down, µs.
    pub min_down_delay_us: u64,
    /// Longest wait before scaling down, µs (caps a long keep-alive for *partial* scale-down;
    /// scale to zero always waits the full keep-alive).
    pub max_down_delay_us: u64,
    /// Fraction of slack required before removing a replica (0..=0.5).
    pub down_band: f64,
    /// Time within which a backlog should drain under queue pressure, µs (default 0.5 s, the
    /// scale of a latency objective; 0 = only one more replica per decision, none while
    /// replicas load).
    pub drain_us: u64,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            min_replicas: 0,
            max_replicas: 0,
            target_utilisation: 0.7,
            concurrency_per_replica: 1,
            queue_threshold: 2,
            min_down_delay_us: 0,
            max_down_delay_us: 600_000_000,
            down_band: 0.1,
            drain_us: 500_000,
        }
    }
}

/// What the autoscaler sees of one model (summed over its replicas).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScaleInput {
    /// Expected arrival rate, requests/s (e.g. [`crate::demand::Demand::predicted_rate_per_s`]
    /// over the load time).
    pub rate_per_s: f64,
    /// Service time per request, µs (EWMA); non-finite or negative counts as 0.
    pub service_us: f64,
    /// Replicas now: loaded plus loading.
    pub current: u32,
    /// Of those, still loading.
    pub loading: u32,
    /// Requests waiting, over all replicas.
    pub queued: u32,
    /// Requests running, over all replicas.
    pub in_flight: u32,
    /// Measured utilisation of the replicas' slots (0..=1), when known.
    pub utilisation: Option<f64>,
    /// Keep-alive window from the demand policy, µs.
    pub keep_alive_us: u64,
    /// Time of the last arrival, µs; `None`: never called.
    pub last_arrival_us: Option<u64>,
}

/// Memory of [`decide`] between calls (per model).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScaleState {
    /// Since when the need has been below the current count, µs.
    pub below_since_us: Option<u64>,
    /// Largest fractional need seen since `below_since_us`.
    pub below_peak: f64,
    /// Time of the last change decided, µs.
    pub last_change_us: Option<u64>,
    /// Changes decided so far.
    pub changes: u64,
}

/// Direction of a [`ScaleDecision`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleDirection {
    /// More replicas.
    Up,
    /// Fewer replicas.
    Down,
    /// No change.
    Hold,
}

/// The replica count to converge to, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleDecision {
    /// Replicas wanted (loaded plus loading).
    pub replicas: u32,
    /// Compared with `input.current`.
    pub direction: ScaleDirection,
    /// When to call [`decide`] again at the latest to carry out a pending scale-down, µs.
    pub recheck_at_us: Option<u64>,
    /// Human-readable explanation (for logs and `skein models`).
    pub reason: String,
}

fn nonneg(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 {
        x
    } else {
        0.0
    }
}

fn ceil_u32(x: f64) -> u32 {
    if x.is_nan() || x <= 0.0 {
        0
    } else if x >= u32::MAX as f64 {
        u32::MAX
    } else {
        x.ceil() as u32
    }
}

impl ScaleConfig {
    fn clamp(&self, n: u32) -> u32 {
        let hi = if self.max_replicas == 0 {
            u32::MAX
        } else {
            self.max_replicas.max(self.min_replicas)
        };
        n.clamp(self.min_replicas, hi)
    }

    fn target(&self) -> f64 {
        if self.target_utilisation.is_finite() {
            self.target_utilisation.clamp(0.05, 1.0)
        } else {
            0.7
        }
    }

    /// Fractional replicas needed for `rate_per_s` at `service_us` (finite, `>= 0`).
    pub fn need(&self, rate_per_s: f64, service_us: f64) -> f64 {
        let work = nonneg(rate_per_s) * nonneg(service_us) / 1e6;
        let n = work / (self.target() * self.concurrency_per_replica.max(1) as f64);
        if n.is_finite() {
            n
        } else {
            u32::MAX as f64
        }
    }
}

/// Decide the replica count for one model at `now_us` (see the module docs). Updates `state`.
pub fn decide(
    cfg: &ScaleConfig,
    state: &mut ScaleState,
    input: &ScaleInput,
    now_us: u64,
) -> ScaleDecision {
    let current = input.current;
    let conc = cfg.concurrency_per_replica.max(1) as f64;
    let target = cfg.target();
    let need = cfg.need(input.rate_per_s, input.service_us);
    let busy = input.queued as u64 + input.in_flight as u64;
    let idle_for = input
        .last_arrival_us
        .map(|l| now_us.saturating_sub(l))
        .unwrap_or(u64::MAX);
    let expired = idle_for >= input.keep_alive_us && busy == 0;

    let mut desired = cfg.clamp(ceil_u32(need));
    let mut why = format!(
        "rate {:.3}/s × service {:.1} ms / ({:.0}% × {}) = {:.2} replicas",
        nonneg(input.rate_per_s),
        nonneg(input.service_us) / 1e3,
        target * 100.0,
        conc,
        need
    );
    if expired {
        desired = cfg.clamp(0);
        why = if input.last_arrival_us.is_some() {
            format!(
                "idle {:.1} s ≥ keep-alive {:.1} s",
                idle_for as f64 / 1e6,
                input.keep_alive_us as f64 / 1e6
            )
        } else {
            "never called".to_string()
        };
    } else if desired == 0 && (busy > 0 || input.last_arrival_us.is_some()) {
        // Within the keep-alive window (or with work pending) at least one replica stays.
        desired = cfg.clamp(1);
        why = format!("{why}; within keep-alive, keep 1");
    }

    // Queue pressure: up at once.
    let queue_limit = cfg.queue_threshold as u64 * current.max(1) as u64;
    let util = input.utilisation.filter(|u| u.is_finite());
    let backlog = input.queued as u64 > queue_limit;
    let pressure = (current == 0 && busy > 0)
        || (input.loading == 0
            && (backlog || util.is_some_and(|u| u > target && input.queued > 0)));
    if pressure || backlog {
        let drain = if cfg.drain_us > 0 {
            let svc = nonneg(input.service_us);
            let slots = nonneg(input.rate_per_s) * svc / 1e6
                + input.queued as f64 * svc / cfg.drain_us as f64;
            ceil_u32(slots / conc)
        } else {
            0
        };
        let one_more = if pressure {
            current.saturating_add(1)
        } else {
            0
        };
        let up = cfg.clamp(drain.max(one_more));
        if up > desired {
            desired = up;
            why = format!(
                "queues build: {} queued, {} running on {current} replicas (limit {queue_limit}{})",
                input.queued,
                input.in_flight,
                util.map(|u| format!(", utilisation {:.0}%", u * 100.0))
                    .unwrap_or_default()
            );
        }
    }

    let hold = |recheck: Option<u64>, reason: String| ScaleDecision {
        replicas: current,
        direction: ScaleDirection::Hold,
        recheck_at_us: recheck,
        reason,
    };

    let change = |state: &mut ScaleState, direction: ScaleDirection, word: &str| {
        commit(
            state,
            now_us,
            desired,
            direction,
            format!("scale {word} {current} → {desired}: {why}"),
        )
    };
    if desired > current {
        return change(state, ScaleDirection::Up, "up");
    }
    if desired == current {
        state.below_since_us = None;
        state.below_peak = 0.0;
        return hold(None, format!("hold {current}: {why}"));
    }

    // desired < current: scale down only after the window.
    if expired {
        return change(state, ScaleDirection::Down, "down");
    }
    let since = *state.below_since_us.get_or_insert(now_us);
    state.below_peak = state.below_peak.max(need);
    let delay = input.keep_alive_us.clamp(
        cfg.min_down_delay_us,
        cfg.max_down_delay_us.max(cfg.min_down_delay_us),
    );
    let due = since.saturating_add(delay);
    let band = if cfg.down_band.is_finite() {
        cfg.down_band.clamp(0.0, 0.5)
    } else {
        0.1
    };
    let mut to = cfg.clamp(ceil_u32(state.below_peak / (1.0 - band)));
    if to == 0 && input.last_arrival_us.is_some() {
        // Partial scale-down keeps one; only the keep-alive expiry goes to zero.
        to = cfg.clamp(1);
    }
    if now_us < due || to >= current {
        if now_us >= due {
            // The window's peak still needs every replica: start a new window from now, so an
            // old peak (e.g. a spike that ended) does not hold the count forever.
            state.below_since_us = Some(now_us);
            state.below_peak = need;
        }
        let recheck = Some(if now_us < due {
            due
        } else {
            now_us.saturating_add(delay.max(1))
        });
        return hold(
            recheck,
            format!(
                "hold {current}: need {:.2} below for {:.1} s of {:.1} s ({why})",
                state.below_peak,
                now_us.saturating_sub(since) as f64 / 1e6,
                delay as f64 / 1e6
            ),
        );
    }
    let peak = state.below_peak;
    commit(
        state,
        now_us,
        to,
        ScaleDirection::Down,
        format!(
            "scale down {current} → {to}: need at most {peak:.2} for {:.1} s",
            delay as f64 / 1e6
        ),
    )
}

/// Carry out a change now: the scale-down window restarts and the change is counted.
fn commit(
    state: &mut ScaleState,
    now_us: u64,
    replicas: u32,
    direction: ScaleDirection,
    reason: String,
) -> ScaleDecision {
    state.below_since_us = None;
    state.below_peak = 0.0;
    state.last_change_us = Some(now_us);
    state.changes = state.changes.saturating_add(1);
    ScaleDecision {
        replicas,
        direction,
        recheck_at_us: None,
        reason,
    }
}

/// The replicas to hold for one model after [`decide`] and the keep-alive plan
/// ([`crate::prewarm::plan`]), as the coordinator's scaler and the simulator both apply it.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Replicas to hold (loaded plus loading).
    pub replicas: u32,
    /// Keep replicas that exist but place no new one beyond `min_replicas` (a node that
    /// evicted an idle replica for memory must not be told to load it straight back).
    pub keep_only: bool,
    /// Nodes may unload idle replicas at once (nothing is expected).
    pub unload_idle: bool,
    /// Why (for logs and `skein models`).
    pub reason: String,
}

/// Combine the autoscaler's `decision` with the keep-alive `warm` plan, for traffic at
/// `rate_per_s` with `service_us` per request, `busy` when requests run or wait.
///
/// - **Steady traffic** (at least one replica's worth, or busy): the autoscaler's count, and
///   at least one replica when the keep-alive plan loads or keeps one.
/// - **Sporadic traffic** (less than one replica's worth, idle): at most one replica beyond
///   `min_replicas`, warm only when the plan expects a call (`Load` or `Keep`); replicas a
///   burst added leave after the autoscaler's scale-down window (its hysteresis), not at the
///   first idle moment. Only a pre-warm, demand or `min_replicas` places new replicas.
pub fn target(
    cfg: &ScaleConfig,
    decision: &ScaleDecision,
    warm: &crate::prewarm::WarmPlan,
    rate_per_s: f64,
    service_us: f64,
    busy: bool,
) -> Target {
    use crate::prewarm::WarmAction;
    let sporadic = cfg.need(rate_per_s, service_us) < 1.0 && !busy;
    let wants_one = u32::from(matches!(warm.action, WarmAction::Load | WarmAction::Keep));
    let (replicas, reason) = if !sporadic {
        (decision.replicas.max(wants_one), decision.reason.clone())
    } else if decision.replicas <= 1 {
        (
            cfg.min_replicas.max(wants_one),
            format!("sporadic traffic ({}): {}", decision.reason, warm.reason),
        )
    } else {
        (
            decision.replicas,
            format!(
                "sporadic traffic, burst replicas held through the scale-down window: {}",
                decision.reason
            ),
        )
    };
    Target {
        replicas,
        keep_only: sporadic && warm.action == WarmAction::Keep,
        unload_idle: sporadic && replicas == 0,
        reason,
    }
}

/// Bandwidth assumed for the artifact fetch in the lead time, bits/s (an upper bound on the
/// fetch: placement prefers nodes that cached the artifact).
pub const LEAD_FETCH_BPS: f64 = 1e9;

/// What one scaling step of one model sees, besides its [`Demand`](crate::demand::Demand).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepInput {
    /// Replicas now: loaded plus loading.
    pub current: u32,
    /// Of those, still loading.
    pub loading: u32,
    /// Requests waiting, over all replicas (and any about to arrive that need a replica).
    pub queued: u32,
    /// Requests running, over all replicas.
    pub in_flight: u32,
    /// Service time per request, µs.
    pub service_us: f64,
    /// Load time of the model once its artifact is on disk, µs.
    pub load_us: u64,
    /// Artifact size, bytes (fetched at [`LEAD_FETCH_BPS`] in the lead time).
    pub artifact_bytes: u64,
    /// Time until a node hears of a decision, µs: the coordinator's heartbeat lead; 0 where
    /// decisions act at once (the simulator).
    pub notice_us: u64,
}

impl StepInput {
    /// Time from a decision to a replica ready to serve, µs: the model's load plus its artifact
    /// fetch at [`LEAD_FETCH_BPS`].
    pub fn ready_us(&self) -> u64 {
        let fetch = self.artifact_bytes as f64 * 8.0 / LEAD_FETCH_BPS * 1e6;
        self.load_us.saturating_add(fetch as u64)
    }

    /// How long before a predicted call a pre-warm must start, µs: [`StepInput::ready_us`]
    /// plus the time until a node hears of it.
    pub fn lead_us(&self) -> u64 {
        self.ready_us().saturating_add(self.notice_us)
    }

    /// Requests run or wait.
    pub fn busy(&self) -> bool {
        self.queued as u64 + self.in_flight as u64 > 0
    }
}

/// The outcome of one [`step`].
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The autoscaler's decision ([`decide`]).
    pub decision: ScaleDecision,
    /// The keep-alive plan ([`crate::prewarm::plan`]).
    pub warm: crate::prewarm::WarmPlan,
    /// Both combined ([`target`]): the replicas wanted, keep-only, unload-idle and the reason.
    pub target: Target,
    /// The replicas to hold now: `target.replicas`, except that under keep-only no new replica
    /// is placed beyond `max(current, min_replicas)`.
    pub hold: u32,
    /// Predicted arrival rate over [`StepInput::ready_us`], requests/s.
    pub rate_per_s: f64,
    /// [`StepInput::lead_us`].
    pub lead_us: u64,
    /// When the keep-alive of the last call expires, µs, while nothing runs or waits: held
    /// replicas go then, so look again at that time. Besides `decision.recheck_at_us` (a
    /// pending scale-down) and `warm.next_check_us` (the next pre-warm load or unload).
    pub keep_alive_expiry_us: Option<u64>,
}

/// One model's scaling step at `now_us`: `demand` gives the predicted rate (over the time to a
/// ready replica) and the last arrival, `keep` the keep-alive (normally `demand.keep_alive()`;
/// the simulator's fixed keep-alive baselines pass their own). Updates `state`.
pub fn step(
    cfg: &ScaleConfig,
    state: &mut ScaleState,
    demand: &crate::demand::Demand,
    keep: &crate::demand::KeepAlive,
    input: &StepInput,
    now_us: u64,
) -> Step {
    let busy = input.busy();
    let last = demand.last_arrival_us();
    let lead = input.lead_us();
    let rate = demand.predicted_rate_per_s(now_us, input.ready_us());
    let decision = decide(
        cfg,
        state,
        &ScaleInput {
            rate_per_s: rate,
            service_us: input.service_us,
            current: input.current,
            loading: input.loading,
            queued: input.queued,
            in_flight: input.in_flight,
            utilisation: None,
            keep_alive_us: keep.keep_alive_us,
            last_arrival_us: last,
        },
        now_us,
    );
    let warm = crate::prewarm::plan(
        keep,
        last,
        now_us,
        input.current > 0,
        busy,
        lead,
        lead.saturating_mul(2),
    );
    let t = target(cfg, &decision, &warm, rate, input.service_us, busy);
    // "Keep" keeps replicas that exist and places none beyond `min_replicas` (a node that
    // evicted an idle replica for memory must not be told to load it straight back).
    let hold = if t.keep_only {
        t.replicas.min(input.current.max(cfg.min_replicas))
    } else {
        t.replicas
    };
    let keep_alive_expiry_us = last
        .filter(|_| !busy)
        .map(|l| l.saturating_add(keep.keep_alive_us));
    Step {
        decision,
        warm,
        target: t,
        hold,
        rate_per_s: rate,
        lead_us: lead,
        keep_alive_expiry_us,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    fn cfg() -> ScaleConfig {
        ScaleConfig {
            concurrency_per_replica: 2,
            target_utilisation: 0.5,
            ..ScaleConfig::default()
        }
    }

    fn input(rate: f64, current: u32) -> ScaleInput {
        ScaleInput {
            rate_per_s: rate,
            service_us: 100_000.0,
            current,
            keep_alive_us: 60 * S,
            last_arrival_us: Some(0),
            ..ScaleInput::default()
        }
    }

    /// `input` with the last arrival at `now`.
    fn live(rate: f64, current: u32, now: u64) -> ScaleInput {
        ScaleInput {
            last_arrival_us: Some(now),
            ..input(rate, current)
        }
    }

    #[test]
    fn formula_and_clamps() {
        let mut st = ScaleState::default();
        // 45/s × 0.1 s / (0.5 × 2) = 4.5 → 5.
        let d = decide(&cfg(), &mut st, &input(45.0, 1), 0);
        assert_eq!((d.replicas, d.direction), (5, ScaleDirection::Up));
        assert!(d.reason.contains("scale up 1 → 5"), "{}", d.reason);
        let capped = ScaleConfig {
            max_replicas: 3,
            ..cfg()
        };
        assert_eq!(decide(&capped, &mut st, &input(45.0, 1), 0).replicas, 3);
        let floor = ScaleConfig {
            min_replicas: 2,
            ..cfg()
        };
        let mut i = input(0.0, 2);
        i.last_arrival_us = None;
        let d = decide(&floor, &mut ScaleState::default(), &i, 10 * S);
        assert_eq!((d.replicas, d.direction), (2, ScaleDirection::Hold));
        // max 0 = unbounded.
        assert_eq!(decide(&cfg(), &mut st, &input(1e6, 1), 0).replicas, 100_000);
    }

    #[test]
    fn queue_pressure_scales_up_at_once() {
        let mut st = ScaleState::default();
        let mut i = input(1.0, 2);
        i.queued = 5; // > 2 × 2
        let d = decide(&cfg(), &mut st, &i, 0);
        assert_eq!(d.direction, ScaleDirection::Up);
        assert!(d.replicas >= 3);
        assert!(d.reason.contains("queues build"), "{}", d.reason);
        // A huge backlog: enough replicas to drain it in 1 s at once ((1/s × 0.1 s + 1000 ×
        // 0.1 s / 1 s) / 2 = 50.05 → 51).
        let c1 = ScaleConfig {
            drain_us: S,
            ..cfg()
        };
        i.queued = 1_000;
        assert_eq!(decide(&c1, &mut st, &i, 0).replicas, 51);
        // Replicas still loading count: a backlog they cover adds nothing.
        i.current = 51;
        i.loading = 49;
        assert_eq!(
            decide(&c1, &mut ScaleState::default(), &i, 0).direction,
            ScaleDirection::Hold
        );
        // A small backlog on loading replicas is theirs to serve.
        i.current = 2;
        i.loading = 1;
        i.queued = 5;
        assert_eq!(
            decide(&cfg(), &mut ScaleState::default(), &i, 0).direction,
            ScaleDirection::Hold
        );
        // Without a drain time: one more per decision, none while loading.
        let one = ScaleConfig {
            drain_us: 0,
            ..cfg()
        };
        i.queued = 1_000;
        assert_eq!(
            decide(&one, &mut ScaleState::default(), &i, 0).direction,
            ScaleDirection::Hold
        );
        i.loading = 0;
        assert_eq!(decide(&one, &mut ScaleState::default(), &i, 0).replicas, 3);
        // Cold: nothing loaded and a request waits.
        let mut i = input(0.0, 0);
        i.queued = 1;
        assert_eq!(
            decide(&cfg(), &mut ScaleState::default(), &i, 0).replicas,
            1
        );
    }

    #[test]
    fn scale_down_waits_for_the_keep_alive_window() {
        let mut st = ScaleState::default();
        let c = cfg();
        let d = decide(&c, &mut st, &live(9.0, 5, 10 * S), 10 * S); // need 0.9 → 1
        assert_eq!(d.direction, ScaleDirection::Hold);
        assert_eq!(d.recheck_at_us, Some(70 * S));
        assert_eq!(
            decide(&c, &mut st, &live(9.0, 5, 69 * S), 69 * S).direction,
            ScaleDirection::Hold
        );
        let d = decide(&c, &mut st, &live(9.0, 5, 70 * S), 70 * S);
        assert_eq!((d.replicas, d.direction), (1, ScaleDirection::Down));
        // A burst during the window resets it.
        let mut st = ScaleState::default();
        decide(&c, &mut st, &live(9.0, 5, 0), 0);
        decide(&c, &mut st, &live(60.0, 5, 30 * S), 30 * S); // up to 6
        assert_eq!(st.below_since_us, None);
    }

    #[test]
    fn down_goes_to_the_window_peak_not_below() {
        let mut st = ScaleState::default();
        let c = cfg();
        decide(&c, &mut st, &live(5.0, 6, 0), 0);
        decide(&c, &mut st, &live(28.0, 6, 20 * S), 20 * S); // need 2.8
        let d = decide(&c, &mut st, &live(5.0, 6, 60 * S), 60 * S);
        // Peak 2.8 / 0.9 = 3.1 → 4.
        assert_eq!(d.replicas, 4, "{}", d.reason);
    }

    #[test]
    fn an_old_peak_does_not_hold_the_count_forever() {
        let c = cfg();
        let mut st = ScaleState::default();
        // Need 9.5 < 10 during the first window (a spike winding down), then 0.9.
        decide(&c, &mut st, &live(95.0, 10, 0), 0);
        let d = decide(&c, &mut st, &live(9.0, 10, 60 * S), 60 * S);
        assert_eq!(d.direction, ScaleDirection::Hold, "{}", d.reason);
        let d = decide(&c, &mut st, &live(9.0, 10, 121 * S), 121 * S);
        assert_eq!(
            (d.replicas, d.direction),
            (1, ScaleDirection::Down),
            "{}",
            d.reason
        );
    }

    #[test]
    fn scale_to_zero_after_keep_alive_only() {
        let mut st = ScaleState::default();
        let c = cfg();
        let mut i = input(0.0, 1);
        i.last_arrival_us = Some(100 * S);
        let d = decide(&c, &mut st, &i, 150 * S);
        assert_eq!((d.replicas, d.direction), (1, ScaleDirection::Hold));
        let d = decide(&c, &mut st, &i, 160 * S);
        assert_eq!((d.replicas, d.direction), (0, ScaleDirection::Down));
        assert!(d.reason.contains("keep-alive"), "{}", d.reason);
        // Not while requests run.
        i.in_flight = 1;
        assert_eq!(decide(&c, &mut st, &i, 1_000 * S).replicas, 1);
    }

    #[test]
    fn no_flapping_around_a_boundary() {
        let c = cfg();
        let mut st = ScaleState::default();
        let mut current = 1;
        let mut changes = 0;
        // Need oscillates between 3.9 and 4.1 every second for an hour.
        for s in 0..3_600u64 {
            let rate = if s % 2 == 0 { 39.0 } else { 41.0 };
            let d = decide(&c, &mut st, &live(rate, current, s * S), s * S);
            if d.replicas != current {
                changes += 1;
                current = d.replicas;
            }
        }
        assert_eq!(current, 5);
        assert!(changes <= 2, "{changes}");
    }

    #[test]
    fn extreme_inputs() {
        let weird = ScaleConfig {
            min_replicas: 7,
            max_replicas: 3,
            target_utilisation: f64::NAN,
            concurrency_per_replica: 0,
            queue_threshold: u32::MAX,
            min_down_delay_us: u64::MAX,
            max_down_delay_us: 0,
            down_band: f64::INFINITY,
            drain_us: u64::MAX,
        };
        let mut st = ScaleState::default();
        for (rate, svc) in [
            (f64::NAN, f64::NAN),
            (f64::INFINITY, 1.0),
            (-5.0, f64::MAX),
            (f64::MAX, f64::MAX),
        ] {
            let i = ScaleInput {
                rate_per_s: rate,
                service_us: svc,
                current: u32::MAX,
                loading: 0,
                queued: u32::MAX,
                in_flight: u32::MAX,
                utilisation: Some(f64::NAN),
                keep_alive_us: u64::MAX,
                last_arrival_us: Some(u64::MAX),
            };
            let d = decide(&weird, &mut st, &i, u64::MAX);
            assert_eq!(d.replicas, 7);
            let d = decide(&ScaleConfig::default(), &mut st, &i, 0);
            assert!(d.replicas >= 1);
        }
    }

    #[test]
    fn target_combines_the_autoscaler_and_the_keep_alive_plan() {
        use crate::prewarm::{WarmAction, WarmPlan};
        let c = cfg(); // 2 slots at 50 %: one replica serves 1 request/s of 1 s work
        let decision = |replicas| ScaleDecision {
            replicas,
            direction: ScaleDirection::Hold,
            recheck_at_us: None,
            reason: "r".into(),
        };
        let warm = |action| WarmPlan {
            action,
            next_check_us: None,
            reason: "w".into(),
        };
        // Steady: the autoscaler's count, at least one when the plan keeps one.
        let t = target(
            &c,
            &decision(3),
            &warm(WarmAction::StayCold),
            5.0,
            S as f64,
            false,
        );
        assert_eq!((t.replicas, t.keep_only, t.unload_idle), (3, false, false));
        let t = target(&c, &decision(0), &warm(WarmAction::Keep), 0.0, 1.0, true);
        assert_eq!((t.replicas, t.keep_only, t.unload_idle), (1, false, false));
        // Sporadic, nothing expected: zero replicas, idle ones unloaded at once.
        let t = target(
            &c,
            &decision(0),
            &warm(WarmAction::Unload),
            0.01,
            1.0,
            false,
        );
        assert_eq!((t.replicas, t.keep_only, t.unload_idle), (0, false, true));
        // Sporadic, a call expected: one, kept (not placed anew) or pre-warmed.
        let t = target(&c, &decision(1), &warm(WarmAction::Keep), 0.01, 1.0, false);
        assert_eq!((t.replicas, t.keep_only, t.unload_idle), (1, true, false));
        let t = target(&c, &decision(0), &warm(WarmAction::Load), 0.01, 1.0, false);
        assert_eq!((t.replicas, t.keep_only, t.unload_idle), (1, false, false));
        // Provisioned replicas stay whatever the plan says.
        let p = ScaleConfig {
            min_replicas: 2,
            ..cfg()
        };
        let t = target(
            &p,
            &decision(2),
            &warm(WarmAction::Unload),
            0.01,
            1.0,
            false,
        );
        assert_eq!((t.replicas, t.unload_idle), (2, false));
        // A burst's replicas are held through the scale-down window when traffic turns
        // sporadic: the autoscaler's hysteresis decides when they leave.
        let t = target(
            &c,
            &decision(4),
            &warm(WarmAction::Unload),
            0.01,
            1.0,
            false,
        );
        assert_eq!((t.replicas, t.unload_idle), (4, false));
        assert!(t.reason.contains("burst"), "{}", t.reason);
    }

    #[test]
    fn one_step_leads_by_load_fetch_and_notice_and_keeps_without_placing() {
        use crate::demand::{Demand, DemandConfig, KeepAlive, KeepAliveSource};
        let mut demand = Demand::new(DemandConfig::default());
        demand.observe(0);
        // Next call expected 60 s after the last, kept until 120 s.
        let keep = KeepAlive {
            prewarm_after_us: Some(60 * S),
            keep_alive_us: 120 * S,
            source: KeepAliveSource::Histogram,
            reason: String::new(),
        };
        let input = StepInput {
            current: 1,
            service_us: 10_000.0,
            load_us: 500_000,
            artifact_bytes: 125_000_000, // 1 s at 1 Gbit/s
            notice_us: 2 * S,
            ..StepInput::default()
        };
        assert_eq!(input.ready_us(), 1_500_000);
        assert_eq!(input.lead_us(), 3_500_000);
        let cfg = cfg();
        let run = |input: &StepInput, now: u64| {
            step(&cfg, &mut ScaleState::default(), &demand, &keep, input, now)
        };

        // Right after the call: nothing expected for a while, the idle replica goes.
        let s = run(&input, 10 * S);
        assert_eq!((s.target.replicas, s.hold), (0, 0), "{}", s.target.reason);
        assert!(s.target.unload_idle);
        assert_eq!(s.warm.next_check_us, Some(60 * S - 3_500_000));
        assert_eq!(s.keep_alive_expiry_us, Some(120 * S));

        // Lead time before the expected call: load one, wherever it goes.
        let cold = StepInput {
            current: 0,
            ..input.clone()
        };
        let s = run(&cold, 57 * S);
        assert_eq!((s.target.replicas, s.hold), (1, 1), "{}", s.target.reason);
        assert!(!s.target.unload_idle && !s.target.keep_only);

        // Within the keep-alive with no pre-warm window: keep the replica that exists (and
        // only that: keep-only), and load none where there is none.
        let flat = KeepAlive {
            prewarm_after_us: None,
            ..keep.clone()
        };
        let s = step(
            &cfg,
            &mut ScaleState::default(),
            &demand,
            &flat,
            &input,
            30 * S,
        );
        assert!(s.target.keep_only, "{}", s.target.reason);
        assert_eq!((s.target.replicas, s.hold), (1, 1));
        let s = step(
            &cfg,
            &mut ScaleState::default(),
            &demand,
            &flat,
            &cold,
            30 * S,
        );
        assert!(!s.target.keep_only, "{}", s.target.reason);
        assert_eq!((s.target.replicas, s.hold), (0, 0));

        // A request waiting: never idle, the keep-alive expiry does not apply.
        let busy = StepInput {
            queued: 1,
            ..input.clone()
        };
        let s = run(&busy, 10 * S);
        assert!(s.hold >= 1 && !s.target.unload_idle);
        assert_eq!(s.keep_alive_expiry_us, None);
    }
}
