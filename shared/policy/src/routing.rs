//! Routing: rank the nodes that can serve a model by expected completion time, then order them
//! with a selection [`Strategy`].
//!
//! ```text
//! expected = rtt + queue_wait + service + cold + transfer
//! queue_wait = max(0, queued + in_flight + 1 - concurrency) × service / concurrency
//! cold       = 0 when loaded, else load + (artifact_bytes × 8 / bandwidth unless cached)
//! transfer   = payload_bytes × 8 / bandwidth
//! ```
//!
//! `rtt` is the caller's estimate to the node ([`caller_rtt`]: its own sample; for a fresh
//! caller the coordinator's measured RTT to the node; Vivaldi coordinates once both ends are
//! settled; region/zone labels before that), or [`RoutingDefaults::rtt_us`]. Bandwidth
//! is in bits per second. Unhealthy nodes, nodes that cannot serve the model and nodes a
//! placement rule disallows are filtered out. Every part is finite and `>= 0` whatever the
//! inputs (NaN, infinities, negative values and `u32::MAX` included); a sum that would overflow
//! is `f64::MAX`.

use std::fmt;
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::vivaldi::{Coordinate, CoordinateExt};

/// What the router knows about one node for one model.
///
/// New fields since the first version: `rtt_us`, `bandwidth_bps`, `artifact_cached`,
/// `artifact_bytes`, `allowed`. [`Default`] gives a healthy, allowed, idle node that is not
/// loaded and holds the artifact, with nothing measured, so callers may write
/// `NodeLoad { key, loaded: true, ..NodeLoad::default() }`.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeLoad {
    /// Index or id chosen by the caller; returned untouched.
    pub key: usize,
    /// Heartbeats arrive on time.
    pub healthy: bool,
    /// The node holds (or may load) this model.
    pub can_serve: bool,
    /// The model is loaded and ready there.
    pub loaded: bool,
    /// Requests waiting on that node for this model.
    pub queued: u32,
    /// Requests running on that node for this model.
    pub in_flight: u32,
    /// Requests that may run at once for this model there (at least 1 is assumed).
    pub concurrency: u32,
    /// EWMA compute time per request, µs; `None` when not measured yet.
    pub service_us: Option<f64>,
    /// Measured load time, µs; `None` when not measured yet.
    pub load_us: Option<f64>,
    /// Estimated round trip from the caller to the node, µs (see [`estimate_rtt`]); `None`
    /// uses [`RoutingDefaults::rtt_us`].
    pub rtt_us: Option<f64>,
    /// Link bandwidth between the caller and the node (and for artifact fetches), bits/s;
    /// `None` uses [`RoutingDefaults::bandwidth_bps`].
    pub bandwidth_bps: Option<f64>,
    /// The model's artifact is already on the node's disk (no fetch before a load).
    pub artifact_cached: bool,
    /// Size of the model's artifact, bytes (fetched when not cached and not loaded).
    pub artifact_bytes: u64,
    /// A placement rule (labels, tenancy, max replicas…) allows this node; `false` filters it.
    pub allowed: bool,
    /// The caller reaches the node through a relay (it is behind NAT; calls cross the relay
    /// until a hole punch makes a direct path): what that adds. `None`: called directly.
    pub relay: Option<RelayCost>,
}

/// What calling a node through a circuit relay adds to a call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelayCost {
    /// What the relay forwards, bits/s: the request's transfer is estimated at the lesser of
    /// this and the node's bandwidth (the artifact fetch of a cold node does not cross it).
    pub bandwidth_bps: f64,
    /// Fixed cost per relayed call, µs: the relay's own hops and processing
    /// ([`ScoreParts::relay_us`]).
    pub penalty_us: f64,
}

impl Default for NodeLoad {
    fn default() -> Self {
        NodeLoad {
            key: 0,
            healthy: true,
            can_serve: true,
            loaded: false,
            queued: 0,
            in_flight: 0,
            concurrency: 1,
            service_us: None,
            load_us: None,
            rtt_us: None,
            bandwidth_bps: None,
            artifact_cached: true,
            artifact_bytes: 0,
            allowed: true,
            relay: None,
        }
    }
}

/// Defaults used when a node has no measurement yet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingDefaults {
    /// Assumed compute time, µs.
    pub service_us: f64,
    /// Assumed load time for a model not loaded yet, µs.
    pub load_us: f64,
    /// Assumed round trip to a node, µs (1 ms).
    pub rtt_us: f64,
    /// Assumed bandwidth to a node, bits/s (100 Mbit/s).
    pub bandwidth_bps: f64,
}

impl Default for RoutingDefaults {
    fn default() -> Self {
        RoutingDefaults {
            service_us: 5_000.0,
            load_us: 500_000.0,
            rtt_us: 1_000.0,
            bandwidth_bps: 100e6,
        }
    }
}

/// What the request brings to the ranking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RouteRequest {
    /// Request bytes plus expected response bytes.
    pub payload_bytes: u64,
}

/// The parts of an expected completion time, µs (a wire type of skein-proto); they add up to
/// [`Ranked::expected_us`] ([`ScorePartsExt::total`]).
pub use skein_proto::ScoreParts;

/// What this module computes over [`ScoreParts`] (a wire type of skein-proto, so its methods
/// live in this trait).
pub trait ScorePartsExt {
    /// The sum of the parts, `f64::MAX` when it overflows.
    fn total(&self) -> f64;
}

impl ScorePartsExt for ScoreParts {
    fn total(&self) -> f64 {
        cap(self.rtt_us
            + self.queue_us
            + self.service_us
            + self.cold_us
            + self.transfer_us
            + self.relay_us)
    }
}

/// A node with its expected completion time and what it is made of.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ranked {
    /// The caller's key.
    pub key: usize,
    /// Expected completion time, µs.
    pub expected_us: f64,
    /// The parts of `expected_us`, to explain a decision.
    pub parts: ScoreParts,
    /// Requests per slot: `(queued + in_flight) / concurrency` (used by
    /// [`Strategy::LeastLoaded`]).
    pub load: f64,
}

/// A finite, non-negative value (NaN → `f64::MAX`, +∞ → `f64::MAX`, negative → 0).
fn cap(x: f64) -> f64 {
    if x.is_nan() {
        f64::MAX
    } else {
        x.clamp(0.0, f64::MAX)
    }
}

fn finite_or(v: Option<f64>, default: f64) -> f64 {
    match v {
        Some(x) if x.is_finite() && x >= 0.0 => x,
        _ => cap(default),
    }
}

fn bandwidth(v: Option<f64>, default: f64) -> f64 {
    match v {
        Some(x) if x.is_finite() && x > 0.0 => x,
        _ if default.is_finite() && default > 0.0 => default,
        _ => 100e6,
    }
}

/// Time to move `bytes` over a `bps` link, µs.
fn transfer_time_us(bytes: u64, bps: f64) -> f64 {
    cap(bytes as f64 * 8.0 / bps * 1e6)
}

/// The parts of the expected completion time of `req` on `n`, µs.
pub fn score_parts(n: &NodeLoad, d: &RoutingDefaults, req: &RouteRequest) -> ScoreParts {
    let service = finite_or(n.service_us, d.service_us);
    let concurrency = n.concurrency.max(1) as f64;
    let waiting = n.queued as f64 + n.in_flight as f64;
    // A request starts at once while a slot is free.
    let queue_us = cap(((waiting + 1.0 - concurrency).max(0.0)) * service / concurrency);
    let bps = bandwidth(n.bandwidth_bps, d.bandwidth_bps);
    let cold_us = if n.loaded {
        0.0
    } else {
        let fetch = if n.artifact_cached {
            0.0
        } else {
            transfer_time_us(n.artifact_bytes, bps)
        };
        cap(finite_or(n.load_us, d.load_us) + fetch)
    };
    // A relayed request crosses the relay's bandwidth too; the artifact does not.
    let (request_bps, relay_us) = match n.relay {
        Some(r) => (
            bps.min(bandwidth(Some(r.bandwidth_bps), bps)),
            finite_or(Some(r.penalty_us), 0.0),
        ),
        None => (bps, 0.0),
    };
    ScoreParts {
        rtt_us: finite_or(n.rtt_us, d.rtt_us),
        queue_us,
        service_us: service,
        cold_us,
        transfer_us: transfer_time_us(req.payload_bytes, request_bps),
        relay_us,
    }
}

/// Expected completion time of a request with no payload on `n`, µs.
pub fn expected_completion(n: &NodeLoad, d: &RoutingDefaults) -> f64 {
    score_parts(n, d, &RouteRequest::default()).total()
}

/// Healthy, allowed nodes that can serve the model, best (least expected completion) first,
/// for a request with no payload. Ties keep the input order.
pub fn rank(nodes: &[NodeLoad], d: &RoutingDefaults) -> Vec<Ranked> {
    rank_request(nodes, d, &RouteRequest::default())
}

/// Like [`rank`], for `req` (its payload counts as transfer time).
pub fn rank_request(nodes: &[NodeLoad], d: &RoutingDefaults, req: &RouteRequest) -> Vec<Ranked> {
    let mut out: Vec<Ranked> = nodes
        .iter()
        .filter(|n| n.healthy && n.can_serve && n.allowed)
        .map(|n| {
            let parts = score_parts(n, d, req);
            Ranked {
                key: n.key,
                expected_us: parts.total(),
                parts,
                load: cap((n.queued as f64 + n.in_flight as f64) / n.concurrency.max(1) as f64),
            }
        })
        .collect();
    out.sort_by(|a, b| a.expected_us.total_cmp(&b.expected_us));
    out
}

/// Prior RTT between two nodes in the same zone, µs.
pub const SAME_ZONE_RTT_US: f64 = 500.0;
/// Prior RTT between two zones of one region, µs.
pub const SAME_REGION_RTT_US: f64 = 2_000.0;
/// Prior RTT between two regions, µs.
pub const OTHER_REGION_RTT_US: f64 = 50_000.0;
/// Prior RTT when the labels say nothing, µs (the [`RoutingDefaults::rtt_us`] default).
pub const UNKNOWN_RTT_US: f64 = 1_000.0;

fn label(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

/// An RTT prior from `(region, zone)` labels, µs, until coordinates settle.
///
/// Regions known and different: [`OTHER_REGION_RTT_US`] (50 ms). Otherwise same zone label:
/// [`SAME_ZONE_RTT_US`] (500 µs). Otherwise same region: [`SAME_REGION_RTT_US`] (2 ms).
/// Otherwise (a label missing): [`UNKNOWN_RTT_US`]. Empty labels count as missing.
pub fn region_rtt_prior(a: (Option<&str>, Option<&str>), b: (Option<&str>, Option<&str>)) -> f64 {
    let (ar, az) = (label(a.0), label(a.1));
    let (br, bz) = (label(b.0), label(b.1));
    match (ar, br) {
        (Some(x), Some(y)) if x != y => OTHER_REGION_RTT_US,
        _ if az.is_some() && az == bz => SAME_ZONE_RTT_US,
        (Some(_), Some(_)) => SAME_REGION_RTT_US,
        _ => UNKNOWN_RTT_US,
    }
}

/// Where a node (or a client) is, as far as latency goes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Position {
    /// Its Vivaldi coordinate, when it has one.
    pub coordinate: Option<Coordinate>,
    /// Region label, e.g. `eu-west`.
    pub region: Option<String>,
    /// Zone label, e.g. `eu-west-1b`.
    pub zone: Option<String>,
}

/// Where an RTT estimate came from, most trusted first (shown to users as `rtt_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RttSource {
    /// The caller's own recent measurement to the node.
    Sample,
    /// Measured by the coordinator: its own round trip to the node (every heartbeat) plus the
    /// caller's round trip to the coordinator, for a caller whose coordinate has not settled
    /// (a new process, a CLI call) and is therefore placed at the coordinator.
    Coordinator,
    /// The distance between two settled Vivaldi coordinates.
    Coordinates,
    /// A prior from region and zone labels.
    Labels,
    /// Nothing known: [`UNKNOWN_RTT_US`].
    Default,
    /// The node is behind NAT and reached through the coordinator's circuit relay: the
    /// caller's round trip to the coordinator plus the coordinator's measured round trip to
    /// the node (the relay's two legs).
    Relay,
}

impl RttSource {
    /// The name in resolutions and `skein route` (`sample`, `coordinator`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RttSource::Sample => "sample",
            RttSource::Coordinator => "coordinator",
            RttSource::Coordinates => "coordinates",
            RttSource::Labels => "labels",
            RttSource::Default => "default",
            RttSource::Relay => "relay",
        }
    }
}

impl fmt::Display for RttSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Estimated RTT between `a` and `b`, µs, and where it came from: the coordinates' distance
/// when both are present and settled ([`CoordinateExt::settled`]), else [`region_rtt_prior`] from
/// the labels ([`RttSource::Labels`] when they say something, else [`RttSource::Default`]).
/// Finite, `>= 0`.
pub fn estimate_rtt_sourced(a: &Position, b: &Position) -> (f64, RttSource) {
    if let (Some(ca), Some(cb)) = (&a.coordinate, &b.coordinate) {
        if ca.settled() && cb.settled() {
            let d = ca.distance_us(cb);
            if d.is_finite() {
                return (d, RttSource::Coordinates);
            }
        }
    }
    let prior = region_rtt_prior(
        (a.region.as_deref(), a.zone.as_deref()),
        (b.region.as_deref(), b.zone.as_deref()),
    );
    let labelled =
        |p: &Position| label(p.region.as_deref()).is_some() || label(p.zone.as_deref()).is_some();
    let source = if labelled(a) && labelled(b) {
        RttSource::Labels
    } else {
        RttSource::Default
    };
    (prior, source)
}

/// Estimated RTT between `a` and `b`, µs (see [`estimate_rtt_sourced`]).
pub fn estimate_rtt(a: &Position, b: &Position) -> f64 {
    estimate_rtt_sourced(a, b).0
}

/// What is known about the path from one caller to one node, for [`caller_rtt`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RttEvidence<'a> {
    /// The caller's own recent RTT sample to the node, µs.
    pub sample_us: Option<f64>,
    /// The coordinator's measured RTT to the node, µs. Give it only for a caller that sits at
    /// the coordinator as far as anyone knows: no settled coordinate of its own, and not
    /// ranked as if at some node.
    pub via_coordinator_us: Option<f64>,
    /// The caller's round trip to the coordinator (its access link), µs.
    pub caller_access_us: f64,
    /// The node is reached through the coordinator's circuit relay: the coordinator's measured
    /// RTT to it, µs (the relay's second leg; the first is the caller's access link).
    pub relay_leg_us: Option<f64>,
    /// Where the caller is.
    pub caller: Option<&'a Position>,
    /// Where the node is.
    pub node: Option<&'a Position>,
}

/// The best RTT estimate from a caller to a node and its source, most trusted first: the
/// caller's own sample (on whatever path it used); then, for a node behind NAT reached
/// through the coordinator's relay, the caller's access link plus the relay's measured leg to
/// the node; then, for a caller placed at the coordinator, the coordinator's
/// measured RTT to the node plus the caller's access link; then settled coordinates; then
/// region/zone labels; then [`UNKNOWN_RTT_US`]. Measurements beat estimates: coordinates that
/// have not settled (or never will, on paths that are not a metric space) never leave a fresh
/// caller routing blind while the coordinator measures every node at every heartbeat.
/// Non-finite or non-positive measurements are ignored. Finite, `>= 0`.
pub fn caller_rtt(e: &RttEvidence<'_>) -> (f64, RttSource) {
    let measured = |v: Option<f64>| v.filter(|v| v.is_finite() && *v > 0.0);
    if let Some(s) = measured(e.sample_us) {
        return (s, RttSource::Sample);
    }
    let access = if e.caller_access_us.is_finite() {
        e.caller_access_us.max(0.0)
    } else {
        0.0
    };
    // Through the relay, every caller's path is its access link plus the relay's leg to the
    // node, wherever the caller sits.
    if let Some(leg) = measured(e.relay_leg_us) {
        return (cap(leg + access), RttSource::Relay);
    }
    if let Some(m) = measured(e.via_coordinator_us) {
        return (cap(m + access), RttSource::Coordinator);
    }
    let unknown = Position::default();
    estimate_rtt_sourced(e.caller.unwrap_or(&unknown), e.node.unwrap_or(&unknown))
}

/// How [`order`] picks among ranked candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Strategy {
    /// Power of two choices among the nodes close to the best expected completion (`latency`).
    #[default]
    #[serde(rename = "latency", alias = "latency-aware")]
    LatencyAware,
    /// Rotate the candidates by a tick (`round-robin`).
    #[serde(rename = "round-robin")]
    RoundRobin,
    /// Fewest requests per slot first, ignoring RTT (`least-loaded`).
    #[serde(rename = "least-loaded")]
    LeastLoaded,
}

impl Strategy {
    /// The name used in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::LatencyAware => "latency",
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastLoaded => "least-loaded",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A strategy name that is none of `latency`, `round-robin`, `least-loaded`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseStrategyError(pub String);

impl fmt::Display for ParseStrategyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown routing strategy `{}` (expected latency, round-robin or least-loaded)",
            self.0
        )
    }
}

impl std::error::Error for ParseStrategyError {}

impl FromStr for Strategy {
    type Err = ParseStrategyError;

    /// Accepts `latency` (or `latency-aware`), `round-robin`, `least-loaded`, any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "latency" | "latency-aware" => Ok(Strategy::LatencyAware),
            "round-robin" => Ok(Strategy::RoundRobin),
            "least-loaded" => Ok(Strategy::LeastLoaded),
            _ => Err(ParseStrategyError(s.to_owned())),
        }
    }
}

/// Relative slack of the [`Strategy::LatencyAware`] band: within 25 % of the best.
pub const P2C_BAND_RATIO: f64 = 1.25;
/// Absolute slack of the [`Strategy::LatencyAware`] band, µs.
pub const P2C_BAND_US: f64 = 500.0;

/// The upper edge of the near-best band for a best candidate with `expected_us`, of which
/// `cold_us` is cold-start cost: `best + max(0.25 × (best − cold), 500 µs)`. The relative slack
/// applies to the warm part only: a cold start that every candidate would pay alike must not
/// widen the band until a far node competes with a near one.
pub fn band_limit(expected_us: f64, cold_us: f64) -> f64 {
    let warm = (expected_us - cap(cold_us)).max(0.0);
    cap(expected_us + (warm * (P2C_BAND_RATIO - 1.0)).max(P2C_BAND_US))
}

/// Order `ranked` for a client to try, first choice first; always a permutation of the input.
///
/// - [`Strategy::LatencyAware`]: sort by `expected_us`; the *band* is the candidates with
///   `expected_us <= band_limit(best)` (25 % of the best's warm part, at least 500 µs). Two distinct band members are drawn at
///   random and the one with the lower score goes first (the first drawn on a tie); the rest
///   follow by score. So a burst spreads over nodes that are about as good, while a node
///   outside the band (a 30 ms node next to a 4 ms one) is never the first choice. With fewer
///   than two in the band the order is by score.
/// - [`Strategy::RoundRobin`]: sort by key and rotate left by `tick` (mod the length): with a
///   stable key set and an increasing tick, every node is first in turn.
/// - [`Strategy::LeastLoaded`]: shuffle, then stable sort by [`Ranked::load`] (random
///   tie-break), ignoring RTT.
pub fn order(
    strategy: Strategy,
    ranked: Vec<Ranked>,
    tick: u64,
    rng: &mut impl Rng,
) -> Vec<Ranked> {
    let mut v = ranked;
    match strategy {
        Strategy::LatencyAware => {
            v.sort_by(|a, b| a.expected_us.total_cmp(&b.expected_us));
            let Some(limit) = v
                .first()
                .map(|r| band_limit(r.expected_us, r.parts.cold_us))
            else {
                return v;
            };
            let band = v.iter().take_while(|r| r.expected_us <= limit).count();
            if band >= 2 {
                let i = rng.gen_range(0..band);
                let mut j = rng.gen_range(0..band - 1);
                if j >= i {
                    j += 1;
                }
                // The better of the two; the first drawn wins a tie.
                let pick = if v[j].expected_us < v[i].expected_us {
                    j
                } else {
                    i
                };
                // Move it to the front; the others keep their sorted order.
                v[..=pick].rotate_right(1);
            }
            v
        }
        Strategy::RoundRobin => {
            v.sort_by_key(|r| r.key);
            if !v.is_empty() {
                let r = (tick % v.len() as u64) as usize;
                v.rotate_left(r);
            }
            v
        }
        Strategy::LeastLoaded => {
            v.shuffle(rng);
            v.sort_by(|a, b| a.load.total_cmp(&b.load));
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn node(key: usize) -> NodeLoad {
        NodeLoad {
            key,
            loaded: true,
            service_us: Some(1_000.0),
            load_us: Some(100_000.0),
            rtt_us: Some(0.0),
            ..NodeLoad::default()
        }
    }

    fn keys(r: &[Ranked]) -> Vec<usize> {
        r.iter().map(|r| r.key).collect()
    }

    #[test]
    fn filters_unhealthy_incapable_and_disallowed_nodes() {
        let mut a = node(0);
        a.healthy = false;
        let mut b = node(1);
        b.can_serve = false;
        let c = node(2);
        let mut e = node(3);
        e.allowed = false;
        let r = rank(&[a, b, c, e], &RoutingDefaults::default());
        assert_eq!(keys(&r), vec![2]);
    }

    #[test]
    fn prefers_idle_over_queued_and_warm_over_cold() {
        let mut busy = node(0);
        busy.queued = 5;
        let idle = node(1);
        let mut cold = node(2);
        cold.loaded = false;
        let r = rank(&[busy, idle, cold], &RoutingDefaults::default());
        assert_eq!(r[0].key, 1);
        assert_eq!(r[1].key, 0, "five queued 1 ms requests beat a 100 ms load");
        assert_eq!(r[2].key, 2);
        assert_eq!(r[2].parts.cold_us, 100_000.0);
        assert_eq!(r[1].parts.queue_us, 5_000.0);
    }

    #[test]
    fn concurrency_absorbs_in_flight_work() {
        let mut wide = node(0);
        wide.in_flight = 3;
        wide.concurrency = 4;
        let d = RoutingDefaults::default();
        assert_eq!(expected_completion(&wide, &d), 1_000.0);
        wide.in_flight = 4;
        assert_eq!(expected_completion(&wide, &d), 1_250.0);
    }

    #[test]
    fn rtt_counts_and_defaults_when_unknown() {
        let mut near = node(0);
        near.rtt_us = Some(2_000.0);
        let mut far = node(1);
        far.rtt_us = Some(20_000.0);
        let mut unknown = node(2);
        unknown.rtt_us = None;
        let d = RoutingDefaults::default();
        let r = rank(&[far, unknown, near], &d);
        assert_eq!(keys(&r), vec![2, 0, 1]);
        assert_eq!(r[0].parts.rtt_us, d.rtt_us);
        assert_eq!(r[2].expected_us, 21_000.0);
        // A short queue on the near node still beats the far one; a long one does not.
        let mut near = node(0);
        near.rtt_us = Some(2_000.0);
        near.queued = 5;
        let mut far = node(1);
        far.rtt_us = Some(20_000.0);
        assert_eq!(rank(&[far.clone(), near.clone()], &d)[0].key, 0);
        near.queued = 30;
        assert_eq!(rank(&[near, far], &d)[0].key, 1);
    }

    #[test]
    fn artifact_cache_and_bandwidth_shape_the_cold_penalty() {
        let d = RoutingDefaults::default();
        let mut cached = node(0);
        cached.loaded = false;
        cached.artifact_bytes = 100_000_000;
        let mut fetch = cached.clone();
        fetch.key = 1;
        fetch.artifact_cached = false;
        let r = rank(&[fetch.clone(), cached.clone()], &d);
        assert_eq!(keys(&r), vec![0, 1]);
        // 100 MB at 100 Mbit/s: 8 s.
        assert_eq!(r[1].parts.cold_us, 100_000.0 + 8_000_000.0);
        fetch.bandwidth_bps = Some(10e9);
        let p = score_parts(&fetch, &d, &RouteRequest::default());
        assert_eq!(p.cold_us, 100_000.0 + 80_000.0);
        // Loaded: no cold penalty whatever the artifact.
        fetch.loaded = true;
        assert_eq!(
            score_parts(&fetch, &d, &RouteRequest::default()).cold_us,
            0.0
        );
    }

    #[test]
    fn payload_favours_fat_links() {
        let d = RoutingDefaults::default();
        let mut thin_near = node(0);
        thin_near.rtt_us = Some(1_000.0);
        thin_near.bandwidth_bps = Some(10e6);
        let mut fat_far = node(1);
        fat_far.rtt_us = Some(5_000.0);
        fat_far.bandwidth_bps = Some(1e9);
        let nodes = [thin_near, fat_far];
        let small = rank_request(&nodes, &d, &RouteRequest { payload_bytes: 100 });
        assert_eq!(small[0].key, 0);
        let big = rank_request(
            &nodes,
            &d,
            &RouteRequest {
                payload_bytes: 10_000_000,
            },
        );
        assert_eq!(big[0].key, 1);
        assert_eq!(big[0].parts.transfer_us, 80_000.0);
        assert_eq!(big[1].parts.transfer_us, 8_000_000.0);
    }

    #[test]
    fn parts_add_up() {
        let mut n = node(0);
        n.loaded = false;
        n.queued = 3;
        n.rtt_us = Some(700.0);
        n.artifact_cached = false;
        n.artifact_bytes = 1_000;
        let r = rank_request(
            &[n],
            &RoutingDefaults::default(),
            &RouteRequest { payload_bytes: 500 },
        );
        let p = r[0].parts;
        let sum = p.rtt_us + p.queue_us + p.service_us + p.cold_us + p.transfer_us;
        assert_eq!(r[0].expected_us, sum);
        assert_eq!(r[0].load, 3.0);
    }

    #[test]
    fn extreme_inputs_stay_finite_and_ordered() {
        let mut a = node(0);
        a.service_us = Some(f64::NAN);
        a.queued = u32::MAX;
        a.in_flight = u32::MAX;
        let mut b = node(1);
        b.service_us = Some(f64::INFINITY);
        b.concurrency = 0;
        let r = rank(&[a, b, node(2)], &RoutingDefaults::default());
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|x| !x.expected_us.is_nan()));
        assert_eq!(r[0].key, 2);
    }

    fn wild_f64(rng: &mut StdRng) -> f64 {
        const POOL: [f64; 10] = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -1.0,
            0.0,
            f64::MAX,
            f64::MIN_POSITIVE,
            1e300,
            -0.0,
            1e-300,
        ];
        if rng.gen_bool(0.5) {
            POOL[rng.gen_range(0..POOL.len())]
        } else {
            rng.gen_range(0.0..1e7)
        }
    }

    fn wild_u32(rng: &mut StdRng) -> u32 {
        match rng.gen_range(0..4) {
            0 => 0,
            1 => u32::MAX,
            _ => rng.gen_range(0..100),
        }
    }

    fn wild_node(key: usize, rng: &mut StdRng) -> NodeLoad {
        let opt = |rng: &mut StdRng| rng.gen_bool(0.8).then(|| wild_f64(rng));
        NodeLoad {
            key,
            healthy: rng.gen_bool(0.9),
            can_serve: rng.gen_bool(0.9),
            loaded: rng.gen_bool(0.5),
            queued: wild_u32(rng),
            in_flight: wild_u32(rng),
            concurrency: wild_u32(rng),
            service_us: opt(rng),
            load_us: opt(rng),
            rtt_us: opt(rng),
            bandwidth_bps: opt(rng),
            artifact_cached: rng.gen_bool(0.5),
            artifact_bytes: if rng.gen_bool(0.2) {
                u64::MAX
            } else {
                rng.gen_range(0..1 << 40)
            },
            allowed: rng.gen_bool(0.9),
            relay: rng.gen_bool(0.3).then(|| RelayCost {
                bandwidth_bps: wild_f64(rng),
                penalty_us: wild_f64(rng),
            }),
        }
    }

    #[test]
    fn property_no_nan_sorted_and_order_is_a_permutation() {
        let mut rng = StdRng::seed_from_u64(42);
        for case in 0..2_000 {
            let n = rng.gen_range(0..12);
            let nodes: Vec<NodeLoad> = (0..n).map(|k| wild_node(k, &mut rng)).collect();
            let d = if case % 7 == 0 {
                RoutingDefaults {
                    service_us: wild_f64(&mut rng),
                    load_us: wild_f64(&mut rng),
                    rtt_us: wild_f64(&mut rng),
                    bandwidth_bps: wild_f64(&mut rng),
                }
            } else {
                RoutingDefaults::default()
            };
            let req = RouteRequest {
                payload_bytes: if rng.gen_bool(0.1) {
                    u64::MAX
                } else {
                    rng.gen_range(0..1 << 30)
                },
            };
            let r = rank_request(&nodes, &d, &req);
            let kept = nodes
                .iter()
                .filter(|n| n.healthy && n.can_serve && n.allowed)
                .count();
            assert_eq!(r.len(), kept);
            for x in &r {
                let p = x.parts;
                for v in [
                    x.expected_us,
                    x.load,
                    p.rtt_us,
                    p.queue_us,
                    p.service_us,
                    p.cold_us,
                    p.transfer_us,
                ] {
                    assert!(v.is_finite() && v >= 0.0, "case {case}: {x:?}");
                }
            }
            assert!(r.windows(2).all(|w| w[0].expected_us <= w[1].expected_us));
            for s in [
                Strategy::LatencyAware,
                Strategy::RoundRobin,
                Strategy::LeastLoaded,
            ] {
                let tick = rng.gen();
                let o = order(s, r.clone(), tick, &mut rng);
                let mut a = keys(&o);
                let mut b = keys(&r);
                a.sort_unstable();
                b.sort_unstable();
                assert_eq!(a, b, "{s} must return a permutation");
            }
        }
    }

    fn ranked(key: usize, expected_us: f64) -> Ranked {
        Ranked {
            key,
            expected_us,
            parts: ScoreParts::default(),
            load: 0.0,
        }
    }

    #[test]
    fn p2c_spreads_a_burst_over_equal_nodes() {
        let mut rng = StdRng::seed_from_u64(9);
        let r: Vec<Ranked> = (0..4).map(|k| ranked(k, 6_000.0)).collect();
        let mut counts = [0usize; 4];
        for tick in 0..1_000 {
            let o = order(Strategy::LatencyAware, r.clone(), tick, &mut rng);
            counts[o[0].key] += 1;
        }
        for c in counts {
            assert!((150..=350).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn p2c_sticks_to_the_near_node_when_all_are_idle() {
        let mut rng = StdRng::seed_from_u64(10);
        let d = RoutingDefaults::default();
        let nodes: Vec<NodeLoad> = [2_000.0, 15_000.0, 40_000.0]
            .iter()
            .enumerate()
            .map(|(k, rtt)| NodeLoad {
                rtt_us: Some(*rtt),
                ..node(k)
            })
            .collect();
        let r = rank(&nodes, &d);
        let near = (0..1_000)
            .filter(|t| order(Strategy::LatencyAware, r.clone(), *t, &mut rng)[0].key == 0)
            .count();
        assert!(near >= 990, "{near}");
    }

    #[test]
    fn p2c_band_excludes_a_far_node_and_keeps_the_rest_sorted() {
        let mut rng = StdRng::seed_from_u64(11);
        let r = vec![ranked(0, 30_000.0), ranked(1, 4_000.0), ranked(2, 4_100.0)];
        for t in 0..200 {
            let o = order(Strategy::LatencyAware, r.clone(), t, &mut rng);
            assert_ne!(o[0].key, 0);
            assert_eq!(o[2].key, 0, "the far node stays last");
        }
        // The absolute slack: 0.2 ms and 0.6 ms are close enough to share (the 0.6 ms node
        // goes first when the draw pairs it with the 0.65 ms one).
        let r = vec![ranked(0, 200.0), ranked(1, 600.0), ranked(2, 650.0)];
        let firsts: Vec<usize> = (0..200)
            .map(|t| order(Strategy::LatencyAware, r.clone(), t, &mut rng)[0].key)
            .collect();
        assert!(firsts.contains(&0));
        assert!(firsts.contains(&1));
        // The better of the two drawn goes first: with two in the band, always the best.
        let r = vec![ranked(0, 1_000.0), ranked(1, 1_100.0), ranked(2, 9_000.0)];
        let o = order(Strategy::LatencyAware, r, 0, &mut rng);
        assert_eq!(keys(&o), vec![0, 1, 2]);
        assert!(order(Strategy::LatencyAware, Vec::new(), 0, &mut rng).is_empty());
    }

    #[test]
    fn round_robin_rotates_by_tick() {
        let mut rng = StdRng::seed_from_u64(12);
        let r = vec![ranked(2, 1.0), ranked(0, 5.0), ranked(1, 3.0)];
        let firsts: Vec<usize> = (0..6)
            .map(|t| order(Strategy::RoundRobin, r.clone(), t, &mut rng)[0].key)
            .collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
        let o = order(Strategy::RoundRobin, r, u64::MAX, &mut rng);
        assert_eq!(o.len(), 3);
    }

    #[test]
    fn least_loaded_ignores_rtt_and_breaks_ties_at_random() {
        let mut rng = StdRng::seed_from_u64(13);
        let mut busy_near = ranked(0, 1_000.0);
        busy_near.load = 3.0;
        let idle_far = Ranked {
            load: 0.0,
            ..ranked(1, 50_000.0)
        };
        let idle_far2 = Ranked {
            load: 0.0,
            ..ranked(2, 60_000.0)
        };
        let mut firsts = [0usize; 3];
        for t in 0..200 {
            let o = order(
                Strategy::LeastLoaded,
                vec![busy_near, idle_far, idle_far2],
                t,
                &mut rng,
            );
            assert_eq!(o[2].key, 0);
            firsts[o[0].key] += 1;
        }
        assert!(firsts[1] > 50 && firsts[2] > 50, "{firsts:?}");
    }

    #[test]
    fn strategy_names_round_trip() {
        for s in [
            Strategy::LatencyAware,
            Strategy::RoundRobin,
            Strategy::LeastLoaded,
        ] {
            assert_eq!(s.to_string().parse::<Strategy>(), Ok(s));
        }
        assert_eq!("latency".parse(), Ok(Strategy::LatencyAware));
        assert_eq!("Round-Robin".parse(), Ok(Strategy::RoundRobin));
        assert_eq!(Strategy::default(), Strategy::LatencyAware);
        let e = "fastest".parse::<Strategy>().unwrap_err();
        assert!(e.to_string().contains("fastest"));
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(Strategy::LeastLoaded, cfg).unwrap();
        let (back, _): (Strategy, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(back, Strategy::LeastLoaded);
    }

    #[test]
    fn region_prior_and_estimate() {
        let p = |r: Option<&'static str>, z: Option<&'static str>| (r, z);
        assert_eq!(
            region_rtt_prior(p(Some("eu"), Some("eu-1a")), p(Some("eu"), Some("eu-1a"))),
            SAME_ZONE_RTT_US
        );
        assert_eq!(
            region_rtt_prior(p(Some("eu"), Some("eu-1a")), p(Some("eu"), Some("eu-1b"))),
            SAME_REGION_RTT_US
        );
        assert_eq!(
            region_rtt_prior(p(Some("eu"), None), p(Some("eu"), None)),
            SAME_REGION_RTT_US
        );
        assert_eq!(
            region_rtt_prior(p(Some("eu"), Some("a")), p(Some("us"), Some("a"))),
            OTHER_REGION_RTT_US
        );
        assert_eq!(
            region_rtt_prior(p(None, Some("a")), p(None, Some("a"))),
            SAME_ZONE_RTT_US
        );
        assert_eq!(
            region_rtt_prior(p(None, None), p(Some("eu"), None)),
            UNKNOWN_RTT_US
        );
        assert_eq!(
            region_rtt_prior(p(Some(""), None), p(Some("eu"), None)),
            UNKNOWN_RTT_US
        );

        let mut a = Position {
            coordinate: Some(Coordinate::origin()),
            region: Some("eu".into()),
            zone: None,
        };
        let mut far = Coordinate::origin();
        far.vec[0] = 7_000.0;
        let mut b = Position {
            coordinate: Some(far),
            region: Some("us".into()),
            zone: None,
        };
        // Not settled yet: the labels decide.
        assert_eq!(estimate_rtt(&a, &b), OTHER_REGION_RTT_US);
        for p in [&mut a, &mut b] {
            if let Some(c) = p.coordinate.as_mut() {
                c.error = 0.1;
            }
        }
        assert_eq!(estimate_rtt(&a, &b), 7_020.0);
        b.coordinate = None;
        assert_eq!(estimate_rtt(&a, &b), OTHER_REGION_RTT_US);
        assert_eq!(
            estimate_rtt(&Position::default(), &Position::default()),
            UNKNOWN_RTT_US
        );
    }

    #[test]
    fn a_fresh_caller_is_ranked_on_the_coordinators_measurements() {
        let settled = |x: f64| {
            let mut c = Coordinate::origin();
            c.vec[0] = x;
            c.error = 0.1;
            Some(c)
        };
        let unsettled = Position {
            coordinate: Some(Coordinate::origin()),
            ..Position::default()
        };
        let node = Position {
            coordinate: settled(9_000.0),
            region: Some("eu".into()),
            zone: None,
        };
        let e = RttEvidence {
            sample_us: None,
            via_coordinator_us: Some(30_000.0),
            caller_access_us: 150.0,
            relay_leg_us: None,
            caller: Some(&unsettled),
            node: Some(&node),
        };
        // No sample, no settled coordinate of its own: the coordinator's measurement plus the
        // caller's access link, before the node's coordinates or labels.
        assert_eq!(caller_rtt(&e), (30_150.0, RttSource::Coordinator));
        // A caller's own sample beats everything.
        let s = RttEvidence {
            sample_us: Some(4_000.0),
            ..e
        };
        assert_eq!(caller_rtt(&s), (4_000.0, RttSource::Sample));
        // A caller with a settled coordinate of its own is not at the coordinator: it gets
        // no coordinator measurement, and the coordinates decide.
        let placed = Position {
            coordinate: settled(0.0),
            ..Position::default()
        };
        let c = RttEvidence {
            via_coordinator_us: None,
            caller: Some(&placed),
            ..e
        };
        let (rtt, source) = caller_rtt(&c);
        assert_eq!(source, RttSource::Coordinates);
        assert!((rtt - 9_020.0).abs() < 1e-6, "{rtt}");
        // Nothing measured yet (the node has not heartbeated): labels, then the default.
        let labelled = Position {
            region: Some("us".into()),
            ..unsettled.clone()
        };
        let l = RttEvidence {
            via_coordinator_us: None,
            caller: Some(&labelled),
            ..e
        };
        assert_eq!(caller_rtt(&l), (OTHER_REGION_RTT_US, RttSource::Labels));
        let d = RttEvidence {
            via_coordinator_us: Some(f64::NAN),
            ..e
        };
        assert_eq!(caller_rtt(&d), (UNKNOWN_RTT_US, RttSource::Default));
        // Hostile inputs stay finite.
        let h = RttEvidence {
            via_coordinator_us: Some(f64::MAX),
            caller_access_us: f64::INFINITY,
            ..e
        };
        let (rtt, _) = caller_rtt(&h);
        assert!(rtt.is_finite() && rtt >= 0.0);
        assert_eq!(RttSource::Coordinator.to_string(), "coordinator");
        // A node behind NAT, reached through the coordinator's relay: the caller's access
        // link plus the relay's leg, for a caller anywhere (a settled caller too); the
        // caller's own sample on the path it used still wins.
        let r = RttEvidence {
            relay_leg_us: Some(20_000.0),
            caller: Some(&placed),
            via_coordinator_us: None,
            ..e
        };
        assert_eq!(caller_rtt(&r), (20_150.0, RttSource::Relay));
        assert_eq!(
            caller_rtt(&RttEvidence {
                sample_us: Some(12_000.0),
                ..r
            }),
            (12_000.0, RttSource::Sample)
        );
        assert_eq!(RttSource::Relay.to_string(), "relay");
    }

    /// A relayed node: the relay's penalty is a part of its own, the request crosses the
    /// relay's bandwidth (the artifact of a cold node does not), and between two nodes that
    /// are otherwise the same the direct one ranks first.
    #[test]
    fn a_relayed_node_pays_its_relay() {
        let d = RoutingDefaults::default();
        let req = RouteRequest {
            payload_bytes: 1_000_000,
        };
        let direct = NodeLoad {
            key: 0,
            loaded: true,
            service_us: Some(2_000.0),
            rtt_us: Some(10_000.0),
            bandwidth_bps: Some(100e6),
            ..NodeLoad::default()
        };
        let relayed = NodeLoad {
            key: 1,
            relay: Some(RelayCost {
                bandwidth_bps: 10e6,
                penalty_us: 5_000.0,
            }),
            ..direct.clone()
        };
        let p = score_parts(&relayed, &d, &req);
        assert_eq!(p.relay_us, 5_000.0);
        // 1 MB at 10 Mbit/s, not 100.
        assert!((p.transfer_us - 800_000.0).abs() < 1e-6, "{p:?}");
        assert!((p.total() - (10_000.0 + 2_000.0 + 800_000.0 + 5_000.0)).abs() < 1e-6);
        assert_eq!(score_parts(&direct, &d, &req).relay_us, 0.0);
        let ranked = rank_request(&[relayed.clone(), direct.clone()], &d, &req);
        assert_eq!(ranked.iter().map(|r| r.key).collect::<Vec<_>>(), [0, 1]);
        // A cold relayed node fetches its artifact over its own link, not the relay.
        let cold = NodeLoad {
            loaded: false,
            artifact_cached: false,
            artifact_bytes: 1_000_000,
            load_us: Some(0.0),
            ..relayed
        };
        let c = score_parts(&cold, &d, &RouteRequest::default());
        assert!((c.cold_us - 80_000.0).abs() < 1e-6, "{c:?}");
        // A hostile relay cost stays finite.
        let h = NodeLoad {
            relay: Some(RelayCost {
                bandwidth_bps: f64::NAN,
                penalty_us: f64::INFINITY,
            }),
            ..direct
        };
        let hp = score_parts(&h, &d, &req);
        assert!(hp.total().is_finite() && hp.relay_us.is_finite(), "{hp:?}");
    }
}
