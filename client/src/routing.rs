//! Per-call node choice in the SDK: the coordinator's ranking, re-scored with what this client
//! saw since (latency, requests outstanding, queue depth piggybacked on responses), picked by
//! the configured [`Strategy`], nodes that failed recently avoided for a while; and the
//! client's own network coordinate and RTT samples, sent with every resolve.
//!
//! All decisions are skein-policy's; this module only keeps the state they need, bounded.

use skein_policy::load::{BanConfig, BanList, LocalView, PeakEwma, RerankConfig};
use skein_policy::routing::{order, Ranked, Strategy};
use skein_policy::vivaldi::{Vivaldi, VivaldiConfig};
use skein_proto::{CallerPosition, Candidate, Coordinate, ResponseMeta, RttSample};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// Nodes with local state kept (least recently used out first).
const MAX_NODES: usize = 1024;
/// RTT samples sent with a resolve.
const MAX_SAMPLES: usize = 32;
/// RTT samples older than this are not sent.
const SAMPLE_TTL: Duration = Duration::from_secs(30);
/// Decay of the peak-EWMA latency.
const LATENCY_DECAY_US: u64 = 2_000_000;
/// At most one coordinate update per node per this long (keeps busy links from dominating).
const COORDINATE_EVERY: Duration = Duration::from_millis(500);

struct NodeState {
    latency: PeakEwma,
    outstanding: u32,
    queue_depth: Option<u32>,
    queue_at_us: u64,
    rtt_us: u64,
    rtt_at: Option<Instant>,
    coordinate_at: Option<Instant>,
    used_at_us: u64,
}

impl NodeState {
    fn new(now_us: u64) -> Self {
        NodeState {
            latency: PeakEwma::new(LATENCY_DECAY_US),
            outstanding: 0,
            queue_depth: None,
            queue_at_us: 0,
            rtt_us: 0,
            rtt_at: None,
            coordinate_at: None,
            used_at_us: now_us,
        }
    }
}

/// The latency sample a call contributes to its node's peak-EWMA: the node's path and warm
/// service time, without its queue. The node reports how long the request waited for a worker
/// (`queue_us`); that wait is taken out, because the load is priced separately, from this
/// client's outstanding requests and the node's piggybacked queue depth
/// ([`skein_policy::load::LocalView::score`]). Left in, it would count the queue twice, and a
/// burst that queued once (behind a cold start, say) would keep the node looking slow for
/// seconds after its queue emptied, sending calls to nodes much further away.
///
/// On a cold start the node's compute time (model load and plan optimisation included) is
/// replaced by the coordinator's estimate of a warm run (`service_us`): a load is a one-off of
/// the replica's state, which the coordinator prices separately (`ScoreParts::cold_us`).
pub(crate) fn warm_latency(elapsed: Duration, meta: &ResponseMeta, service_us: f64) -> Duration {
    let unqueued = elapsed.saturating_sub(Duration::from_micros(meta.queue_us));
    if !meta.cold_start {
        return unqueued;
    }
    let service = if service_us.is_finite() && service_us > 0.0 {
        Duration::from_secs_f64((service_us / 1e6).min(unqueued.as_secs_f64()))
    } else {
        Duration::ZERO
    };
    unqueued.saturating_sub(Duration::from_micros(meta.compute_us)) + service
}

/// The SDK's routing state.
pub(crate) struct LocalRouter {
    strategy: Strategy,
    epoch: Instant,
    tick: AtomicU64,
    nodes: Mutex<HashMap<String, NodeState>>,
    bans: Mutex<BanList>,
    vivaldi: Mutex<Vivaldi>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts a request as outstanding on a node while alive.
pub(crate) struct Outstanding<'a> {
    router: &'a LocalRouter,
    node: String,
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.router.nodes).get_mut(&self.node) {
            n.outstanding = n.outstanding.saturating_sub(1);
        }
    }
}

impl LocalRouter {
    pub(crate) fn new(strategy: Strategy) -> Self {
        LocalRouter {
            strategy,
            epoch: Instant::now(),
            tick: AtomicU64::new(0),
            nodes: Mutex::new(HashMap::new()),
            bans: Mutex::new(BanList::new(BanConfig::default())),
            vivaldi: Mutex::new(Vivaldi::new(VivaldiConfig::default())),
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn with_node<R>(&self, id: &str, f: impl FnOnce(&mut NodeState) -> R) -> R {
        let now = self.now_us();
        let mut nodes = lock(&self.nodes);
        if !nodes.contains_key(id) && nodes.len() >= MAX_NODES {
            // Evict the least recently used node that has nothing outstanding.
            if let Some(old) = nodes
                .iter()
                .filter(|(_, n)| n.outstanding == 0)
                .min_by_key(|(_, n)| n.used_at_us)
                .map(|(k, _)| k.clone())
            {
                nodes.remove(&old);
            }
        }
        let n = nodes
            .entry(id.to_string())
            .or_insert_with(|| NodeState::new(now));
        n.used_at_us = now;
        f(n)
    }

    /// This client's position for a resolve: its coordinate and fresh RTT samples.
    pub(crate) fn position(&self, region: Option<String>, zone: Option<String>) -> CallerPosition {
        let coordinate = Some(lock(&self.vivaldi).coordinate().clone());
        let mut rtt_samples: Vec<(Instant, RttSample)> = lock(&self.nodes)
            .iter()
            .filter_map(|(id, n)| {
                let at = n.rtt_at?;
                (at.elapsed() < SAMPLE_TTL && n.rtt_us > 0).then(|| {
                    (
                        at,
                        RttSample {
                            node_id: id.clone(),
                            rtt_us: n.rtt_us,
                        },
                    )
                })
            })
            .collect();
        rtt_samples.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
        rtt_samples.truncate(MAX_SAMPLES);
        CallerPosition {
            coordinate,
            rtt_samples: rtt_samples.into_iter().map(|(_, s)| s).collect(),
            region,
            zone,
            near: None,
        }
    }

    /// Feed an RTT to a peer at `coordinate` into this client's coordinate.
    pub(crate) fn observe_coordinate(&self, coordinate: &Coordinate, rtt: Duration) {
        let rtt_us = rtt.as_secs_f64() * 1e6;
        // An invalid sample (zero RTT, bad coordinate) changes nothing.
        let _ = lock(&self.vivaldi).update(coordinate, rtt_us, &mut rand::thread_rng());
    }

    /// The order in which to try `candidates` for one call, skipping `tried`.
    pub(crate) fn pick(&self, candidates: &[Candidate], tried: &[String]) -> Vec<Candidate> {
        let now = self.now_us();
        let mut cands: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| !tried.contains(&c.node_id))
            .collect();
        // Stable keys whatever order the coordinator sent (round-robin rotates over them).
        cands.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let cfg = RerankConfig::default();
        let ranked: Vec<Ranked> = {
            let nodes = lock(&self.nodes);
            cands
                .iter()
                .enumerate()
                .map(|(key, c)| {
                    let mut v = LocalView::new(key, c.expected_us, c.parts.service_us);
                    v.concurrency = c.concurrency.max(1);
                    if let Some(n) = nodes.get(&c.node_id) {
                        v.latency_us = n.latency.get(now);
                        v.outstanding = n.outstanding;
                        v.queue_depth = n.queue_depth;
                        v.queue_at_us = n.queue_at_us;
                    }
                    let fresh_queue = match v.queue_depth {
                        Some(q) if now.saturating_sub(v.queue_at_us) <= cfg.queue_ttl_us => q,
                        _ => 0,
                    };
                    Ranked {
                        key,
                        expected_us: v.score(now, &cfg),
                        parts: c.parts,
                        load: (v.outstanding as f64 + fresh_queue as f64) / v.concurrency as f64,
                    }
                })
                .collect()
        };
        let mut ranked = ranked;
        ranked.sort_by(|a, b| a.expected_us.total_cmp(&b.expected_us));
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let ordered = order(self.strategy, ranked, tick, &mut rand::thread_rng());
        // Nodes that failed recently go last (still tried when nothing else is left).
        let bans = lock(&self.bans);
        let (ok, banned): (Vec<Ranked>, Vec<Ranked>) = ordered
            .into_iter()
            .partition(|r| !bans.banned(&cands[r.key].node_id, now));
        ok.into_iter()
            .chain(banned)
            .map(|r| cands[r.key].clone())
            .collect()
    }

    /// Count a request as outstanding on `node` until the guard drops.
    pub(crate) fn start(&self, node: &str) -> Outstanding<'_> {
        self.with_node(node, |n| n.outstanding = n.outstanding.saturating_add(1));
        Outstanding {
            router: self,
            node: node.to_string(),
        }
    }

    /// A call to `node` succeeded in `latency`; the node had `queue_depth` waiting; the
    /// connection's RTT is `rtt`.
    pub(crate) fn succeeded(
        &self,
        node: &str,
        latency: Duration,
        queue_depth: u32,
        rtt: Duration,
        coordinate: Option<&Coordinate>,
    ) {
        let now = self.now_us();
        let update_coordinate = self.with_node(node, |n| {
            n.latency.observe(now, latency.as_secs_f64() * 1e6);
            n.queue_depth = Some(queue_depth);
            n.queue_at_us = now;
            n.rtt_us = (rtt.as_micros() as u64).max(1);
            let t = Instant::now();
            n.rtt_at = Some(t);
            let due = n
                .coordinate_at
                .is_none_or(|at| at.elapsed() >= COORDINATE_EVERY);
            if due {
                n.coordinate_at = Some(t);
            }
            due
        });
        if update_coordinate {
            if let Some(c) = coordinate {
                self.observe_coordinate(c, rtt);
            }
        }
        lock(&self.bans).succeed(node);
    }

    /// A call to `node` failed (unreachable, overloaded, shutting down): avoid it for a while.
    pub(crate) fn failed(&self, node: &str) {
        let now = self.now_us();
        lock(&self.bans).fail(node, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_proto::ScoreParts;

    fn cand(id: &str, expected_ms: f64) -> Candidate {
        Candidate {
            node_id: id.into(),
            addr: "127.0.0.1:1".into(),
            loaded: true,
            expected_us: expected_ms * 1000.0,
            parts: ScoreParts {
                service_us: 1_000.0,
                rtt_us: expected_ms * 1000.0 - 1_000.0,
                ..ScoreParts::default()
            },
            rtt_source: "sample".into(),
            coordinate: None,
            concurrency: 1,
            peer: None,
        }
    }

    #[test]
    fn latency_aware_prefers_the_near_node_until_it_is_busy() {
        let r = LocalRouter::new(Strategy::LatencyAware);
        let cands = vec![cand("far", 31.0), cand("near", 5.0), cand("mid", 11.0)];
        for _ in 0..50 {
            assert_eq!(r.pick(&cands, &[])[0].node_id, "near");
        }
        // Many requests outstanding on the near node: the mid one wins.
        let guards: Vec<_> = (0..20).map(|_| r.start("near")).collect();
        assert_eq!(r.pick(&cands, &[])[0].node_id, "mid");
        drop(guards);
        assert_eq!(r.pick(&cands, &[])[0].node_id, "near");
        // Tried nodes are skipped; failed ones go last.
        assert_eq!(r.pick(&cands, &["near".into()])[0].node_id, "mid");
        r.failed("near");
        let order: Vec<_> = r.pick(&cands, &[]).into_iter().map(|c| c.node_id).collect();
        assert_eq!(order.last().map(String::as_str), Some("near"));
    }

    #[test]
    fn round_robin_rotates_and_least_loaded_ignores_distance() {
        let r = LocalRouter::new(Strategy::RoundRobin);
        let cands = vec![cand("a", 5.0), cand("b", 50.0), cand("c", 9.0)];
        let firsts: Vec<_> = (0..6)
            .map(|_| r.pick(&cands, &[])[0].node_id.clone())
            .collect();
        assert_eq!(firsts, ["a", "b", "c", "a", "b", "c"]);
        let r = LocalRouter::new(Strategy::LeastLoaded);
        let _busy: Vec<_> = (0..3).map(|_| r.start("a")).collect();
        let _c: Vec<_> = (0..2).map(|_| r.start("c")).collect();
        assert_eq!(r.pick(&cands, &[])[0].node_id, "b");
    }

    fn meta(cold_start: bool, compute_ms: u64) -> ResponseMeta {
        queued(cold_start, 0, compute_ms)
    }

    fn queued(cold_start: bool, queue_ms: u64, compute_ms: u64) -> ResponseMeta {
        ResponseMeta {
            node: "n".into(),
            cold_start,
            queue_us: queue_ms * 1000,
            compute_us: compute_ms * 1000,
            queue_depth: 0,
        }
    }

    #[test]
    fn the_wait_for_a_worker_is_not_in_the_latency_sample() {
        let ms = Duration::from_millis;
        // 420 ms of which 380 ms queued (behind a cold start): the path and service are 40 ms.
        assert_eq!(
            warm_latency(ms(420), &queued(false, 380, 10), 5_000.0),
            ms(40)
        );
        // Cold and queued: both come out, a warm run's estimate goes in.
        assert_eq!(
            warm_latency(ms(700), &queued(true, 300, 390), 5_000.0),
            ms(15)
        );
        // A queue time above the call's (clocks of two hosts) clamps to 0.
        assert_eq!(warm_latency(ms(5), &queued(false, 9, 1), 5_000.0), ms(0));

        // Near (30 ms) node whose calls queued behind a burst; a far (80 ms) one that did not:
        // once the queue is gone (nothing outstanding, no fresh queue depth), near is first.
        let r = LocalRouter::new(Strategy::LatencyAware);
        let cands = vec![cand("near", 35.0), cand("far", 85.0)];
        r.succeeded(
            "far",
            warm_latency(ms(85), &queued(false, 0, 5), 5_000.0),
            0,
            ms(80),
            None,
        );
        r.succeeded(
            "near",
            warm_latency(ms(420), &queued(false, 385, 5), 5_000.0),
            0,
            ms(30),
            None,
        );
        assert_eq!(r.pick(&cands, &[])[0].node_id, "near");
    }

    #[test]
    fn a_cold_start_counts_as_a_warm_run_in_the_latency_sample() {
        let ms = Duration::from_millis;
        // Warm: the call's own time.
        assert_eq!(warm_latency(ms(12), &meta(false, 9), 5_000.0), ms(12));
        // Cold: 265 ms of which 260 ms compute (the load); a warm run is estimated at 5 ms.
        assert_eq!(warm_latency(ms(265), &meta(true, 260), 5_000.0), ms(10));
        // Nonsense estimates and a compute time above the call's are clamped, never negative.
        assert_eq!(warm_latency(ms(5), &meta(true, 9), f64::NAN), ms(0));
        assert_eq!(warm_latency(ms(5), &meta(true, 9), 1e12), ms(5));

        // The near node was just loaded by a cold call; the far one served warm calls earlier.
        // The cold call does not make the near node look slow: it stays first.
        let r = LocalRouter::new(Strategy::LatencyAware);
        let cands = vec![cand("near", 5.0), cand("far", 30.0)];
        let sample = |node, elapsed, m: ResponseMeta| {
            let l = warm_latency(elapsed, &m, 1_000.0);
            r.succeeded(node, l, 0, ms(1), None);
        };
        sample("far", ms(31), meta(false, 1));
        sample("near", ms(265), meta(true, 260));
        assert_eq!(r.pick(&cands, &[])[0].node_id, "near");
    }

    #[test]
    fn position_carries_fresh_samples_and_a_coordinate() {
        let r = LocalRouter::new(Strategy::LatencyAware);
        r.succeeded(
            "n1",
            Duration::from_millis(3),
            0,
            Duration::from_millis(2),
            None,
        );
        let p = r.position(Some("eu".into()), None);
        assert_eq!(p.rtt_samples.len(), 1);
        assert_eq!(p.rtt_samples[0].rtt_us, 2_000);
        assert!(p.coordinate.is_some());
        assert_eq!(p.region.as_deref(), Some("eu"));
    }
}
