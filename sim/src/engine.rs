//! The discrete-event engine: one run of one policy over one [`Scenario`].
//!
//! A binary heap of `(time µs, sequence, event)` drives arrivals, completions, model loads and
//! scaling checks; the sequence number makes ties deterministic, and one seeded RNG is the only
//! source of randomness, so a seed gives the same result bit for bit.
//!
//! # Same semantics as the coordinator, at 10 000 nodes
//! - **Routing** builds [`NodeLoad`]s and calls [`rank_request`] + [`order`] with the
//!   coordinator's [`Strategy`], but over a *candidate set* of at most [`CANDIDATES`] replicas
//!   of the model instead of all of them: for latency-aware routing, replicas in the caller's
//!   region and then the next nearest regions (a per-(model, region) index), plus two random
//!   replicas from anywhere; for least-loaded, a random sample (power-of-d choices). This is
//!   the list a coordinator hands a client in a resolve (the nearest few plus some spread).
//!   Round robin rotates over the model's replica list with a tick, and random picks
//!   uniformly; both are O(1).
//! - **Placement** calls [`placement::place`] with the model's [`Origins`] (decayed calls per
//!   caller area, as the coordinator keeps them; each weight divided by one plus the replicas
//!   already in its region so replicas spread with demand) over a sample of nodes: up to 12 in
//!   each of the three regions with most weight, the nodes that cached the model's artifact
//!   recently, and 4 random nodes. Node descriptions are built once and updated in place.
//! - **Autoscaling** is the coordinator's scaler step, [`autoscale::step`] (the same function:
//!   rate over the time to a ready replica, [`autoscale::decide`], the keep-alive plan,
//!   [`autoscale::target`]), run on arrivals (at most every 100 ms per model, with the arriving
//!   request counted as pending), when a model goes idle, when a replica becomes ready and at
//!   the re-check times asked for. For sporadic traffic (need below one replica) the keep-alive
//!   plan decides between zero and one replica (unload after a call when a pre-warm window
//!   exists, load ahead of the predicted next call, keep within the keep-alive), while replicas
//!   added for a burst leave on the autoscaler's scale-down window. The only difference is
//!   that a decision acts at once here (no heartbeat lead). [`Sim::run_recorded`] logs every
//!   decision; `tests/tests/same_decisions.rs` checks that the coordinator's scaler makes the
//!   same ones on the same trace.
//! - **Eligibility** is [`placement::eligible`], the rule the coordinator uses.
//! - **No request is lost**: one that finds no replica starts one whatever the policy said,
//!   and if no node has room it waits (counted in `waited_for_capacity`) until a replica of
//!   its model is placed; `dropped` counts requests never served and is 0 in every test.
//!
//! Per request the work is O(candidates + log events).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use skein_policy::autoscale::{self, ScaleConfig, ScaleState, StepInput};
use skein_policy::demand::{Demand, DemandConfig, KeepAlive, KeepAliveSource};
use skein_policy::placement::{self, Accelerator, Constraints, Origins, PlacementNode};

use skein_policy::routing::{
    order, rank_request, NodeLoad, RouteRequest, RoutingDefaults, Strategy,
};

use crate::scenario::{Scenario, S};

/// The SLO attainment target: a policy meets the SLO on a scenario when at least this share of
/// its requests complete within [`SimConfig::slo_us`] (`--slo-ms`, 500 ms by default),
/// counting every request (cold starts and waits for capacity included).
pub const SLO_TARGET: f64 = 0.95;

/// Most replicas ranked per request.
pub const CANDIDATES: usize = 8;
/// Shortest time between two autoscaling decisions triggered by arrivals, µs.
pub const DECIDE_EVERY_US: u64 = 100_000;
const LAT_BINS: usize = 96;

/// How requests pick a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Uniformly at random among the model's replicas.
    Random,
    /// A coordinator strategy.
    Strategy(Strategy),
}

/// When idle replicas go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlivePolicy {
    /// Unload as soon as idle.
    None,
    /// Unload after a fixed idle time, µs.
    Fixed(u64),
    /// The hybrid histogram policy (keep-alive and pre-warm from [`Demand::keep_alive`]).
    Predictive,
    /// Provision every model for its peak at the start and never scale.
    AlwaysOn,
}

/// One policy to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Name in the report.
    pub name: String,
    /// Routing.
    pub routing: Routing,
    /// Keep-alive / provisioning.
    pub keep_alive: KeepAlivePolicy,
}

/// Settings shared by all runs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Latency objective, µs (see [`SLO_TARGET`]).
    pub slo_us: u64,
    /// Seed of the run's RNG.
    pub seed: u64,
    /// Demand tracking (histogram scale).
    pub demand: DemandConfig,
    /// Target utilisation of the autoscaler.
    pub target_utilisation: f64,
    /// Buckets of the timeline.
    pub timeline_buckets: usize,
    /// Share of the horizon treated as warm-up for the flapping count.
    pub warmup_fraction: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            slo_us: 500_000,
            seed: 1,
            // The coordinator's histogram; a 2 s rate decay (its default is 10 s) so that a
            // flash crowd shows in the rate within a second or two.
            demand: DemandConfig {
                rate_decay_us: 2_000_000,
                ..DemandConfig::default()
            },
            target_utilisation: 0.7,
            timeline_buckets: 120,
            warmup_fraction: 0.1,
        }
    }
}

/// Latency and warm capacity over time.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Timeline {
    /// Bucket width, s.
    pub bucket_s: f64,
    /// Median latency per bucket, ms (0 without requests).
    pub p50_ms: Vec<f64>,
    /// 99th percentile latency per bucket, ms.
    pub p99_ms: Vec<f64>,
    /// Mean replicas loaded or loading per bucket.
    pub warm_replicas: Vec<f64>,
}

/// Results of one run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    /// Policy name.
    pub policy: String,
    /// Requests offered.
    pub requests: u64,
    /// Requests never served (should always be 0: a request that finds no replica waits for
    /// one).
    pub dropped: u64,
    /// Requests that found no replica of their model and no node with room for one, and
    /// waited for capacity (they count in the latencies with their wait).
    pub waited_for_capacity: u64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Mean latency, ms.
    pub mean_ms: f64,
    /// Share of requests within the SLO (dropped ones miss it).
    pub slo_attainment: f64,
    /// Requests that waited for a model load.
    pub cold_starts: u64,
    /// `cold_starts / requests`.
    pub cold_start_rate: f64,
    /// Replica-seconds loaded or loading (memory held).
    pub warm_node_s: f64,
    /// Warm replica-seconds × the node class price.
    pub cost: f64,
    /// Busy slot-seconds / ready slot-seconds.
    pub utilisation: f64,
    /// Replica count changes decided by the autoscaler.
    pub scale_changes: u64,
    /// Of those, after the warm-up share of the horizon.
    pub scale_changes_after_warmup: u64,
    /// Most replicas at once.
    pub peak_replicas: u64,
    /// Simulated span, s.
    pub horizon_s: f64,
    /// Over time.
    pub timeline: Timeline,
}

/// One autoscaling decision, as [`Sim::run_recorded`] logs it: when, for which model, what
/// the step saw and what it decided.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleRecord {
    /// When, µs.
    pub t_us: u64,
    /// Model index.
    pub model: u32,
    /// Arrivals of the model observed so far (the decision saw these).
    pub arrivals: u64,
    /// What [`autoscale::step`] was given (replicas, loading, queued with the arriving request
    /// counted, running, times).
    pub input: StepInput,
    /// Replicas wanted ([`autoscale::Target::replicas`]).
    pub replicas: u32,
    /// Replicas held ([`autoscale::Step::hold`]).
    pub hold: u32,
    /// Idle replicas may unload at once.
    pub unload_idle: bool,
    /// Why.
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrival(u32),
    Done {
        rep: u32,
        arrival: u64,
        rtt: u32,
        cold: bool,
    },
    Ready {
        rep: u32,
        epoch: u32,
    },
    Check(u32),
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    arrival: u64,
    rtt: u32,
    cold: bool,
    region: u16,
}

#[derive(Debug)]
struct Replica {
    model: u32,
    node: u32,
    region: u16,
    ready_at: u64,
    started: u64,
    in_flight: u32,
    queue: VecDeque<Pending>,
    last_used: u64,
    alive: bool,
    epoch: u32,
    pos: u32,
    rpos: u32,
    svc_us: f64,
    price: f64,
    bandwidth: f64,
}

#[derive(Debug)]
struct ModelState {
    demand: Demand,
    scale: ScaleState,
    cfg: ScaleConfig,
    replicas: Vec<u32>,
    by_region: Vec<Vec<u32>>,
    queued: u32,
    in_flight: u32,
    last_decide: Option<u64>,
    check_at: u64,
    rr: u64,
    origins: Origins,
    /// Requests that arrived when the model had no replica and none could be placed.
    waiting: VecDeque<Pending>,
    cached_nodes: Vec<u32>,
    svc_ref: f64,
}

#[derive(Debug)]
struct NodeState {
    free_mem: u64,
    hosts: Vec<u32>,
    cached: Vec<u32>,
}

/// Decay of the callers' origins (as the coordinator's default), µs.
const ORIGIN_DECAY_US: u64 = 600 * S;
/// Retry time for requests waiting for capacity, µs.
const RETRY_US: u64 = S;

/// One simulation run.
pub struct Sim<'a> {
    sc: &'a Scenario,
    policy: Policy,
    cfg: SimConfig,
    rng: StdRng,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    reps: Vec<Replica>,
    free_reps: Vec<u32>,
    models: Vec<ModelState>,
    nodes: Vec<NodeState>,
    pnodes: Vec<PlacementNode>,
    pbuf: Vec<PlacementNode>,
    region_of: std::collections::HashMap<String, u16>,
    /// Nodes per [accelerator][region].
    region_nodes: [Vec<Vec<u32>>; 2],
    all_nodes: [Vec<u32>; 2],
    near: Vec<Vec<u16>>,
    defaults: RoutingDefaults,
    buf: Vec<NodeLoad>,
    tick: u64,
    /// Every autoscaling decision, when recorded ([`Sim::run_recorded`]).
    log: Option<Vec<ScaleRecord>>,
    // metrics
    lat: Vec<u32>,
    waited: u64,
    cold: u64,
    warm_us: f64,
    cost: f64,
    busy_us: f64,
    cap_us: f64,
    changes: u64,
    changes_late: u64,
    alive: u64,
    peak: u64,
    bucket_us: u64,
    tl_lat: Vec<[u32; LAT_BINS]>,
    tl_warm: Vec<f64>,
    tl_at: u64,
}

fn lat_bin(us: u64) -> usize {
    let l = (us.max(1) as f64).log10();
    (((l - 2.0) * 12.0).max(0.0) as usize).min(LAT_BINS - 1)
}

fn bin_upper_ms(b: usize) -> f64 {
    10f64.powf(2.0 + (b as f64 + 1.0) / 12.0) / 1e3
}

impl<'a> Sim<'a> {
    /// Prepare a run of `policy` on `sc`.
    pub fn new(sc: &'a Scenario, policy: Policy, cfg: SimConfig) -> Self {
        let nr = sc.regions.len();
        let mut region_nodes = [vec![Vec::new(); nr], vec![Vec::new(); nr]];
        let mut all_nodes = [Vec::new(), Vec::new()];
        let mut pnodes = Vec::with_capacity(sc.nodes.len());
        let mut nodes = Vec::with_capacity(sc.nodes.len());
        for (i, n) in sc.nodes.iter().enumerate() {
            let class = &sc.classes[n.class as usize];
            let acc = class.accelerator as usize;
            region_nodes[acc][n.region as usize].push(i as u32);
            all_nodes[acc].push(i as u32);
            nodes.push(NodeState {
                free_mem: class.memory_bytes,
                hosts: Vec::new(),
                cached: Vec::new(),
            });
            pnodes.push(PlacementNode {
                key: i,
                position: n.position.clone(),
                accelerator: class.accelerator,
                bandwidth_bps: Some(class.bandwidth_bps),
                ..PlacementNode::default()
            });
        }
        let near = (0..nr)
            .map(|r| {
                let mut v: Vec<u16> = (0..nr as u16).collect();
                v.sort_by(|a, b| {
                    let d = |x: u16| {
                        skein_policy::routing::estimate_rtt(
                            &sc.regions[r].caller,
                            &sc.regions[x as usize].caller,
                        )
                    };
                    d(*a).total_cmp(&d(*b))
                });
                v
            })
            .collect();
        let models = sc
            .models
            .iter()
            .map(|m| ModelState {
                demand: Demand::new(cfg.demand.clone()),
                scale: ScaleState::default(),
                cfg: ScaleConfig {
                    concurrency_per_replica: m.concurrency,
                    target_utilisation: cfg.target_utilisation,
                    ..ScaleConfig::default()
                },
                replicas: Vec::new(),
                by_region: vec![Vec::new(); nr],
                queued: 0,
                in_flight: 0,
                last_decide: None,
                check_at: 0,
                rr: 0,
                origins: Origins::new(16, ORIGIN_DECAY_US),
                waiting: VecDeque::new(),
                cached_nodes: Vec::new(),
                svc_ref: m.service_us * if m.accelerator { 0.25 } else { 1.0 },
            })
            .collect();
        let region_of = sc
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.clone(), i as u16))
            .collect();
        let buckets = cfg.timeline_buckets.clamp(1, 10_000);
        let bucket_us = (sc.horizon_us / buckets as u64).max(1);
        Sim {
            sc,
            rng: StdRng::seed_from_u64(cfg.seed),
            policy,
            now: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            reps: Vec::new(),
            free_reps: Vec::new(),
            models,
            nodes,
            pnodes,
            pbuf: Vec::new(),
            region_of,
            region_nodes,
            all_nodes,
            near,
            defaults: RoutingDefaults::default(),
            buf: Vec::with_capacity(CANDIDATES + 2),
            tick: 0,
            log: None,
            lat: Vec::with_capacity(sc.arrivals.len()),
            waited: 0,
            cold: 0,
            warm_us: 0.0,
            cost: 0.0,
            busy_us: 0.0,
            cap_us: 0.0,
            changes: 0,
            changes_late: 0,
            alive: 0,
            peak: 0,
            bucket_us,
            tl_lat: vec![[0; LAT_BINS]; buckets + 1],
            tl_warm: vec![0.0; buckets + 1],
            tl_at: 0,
            cfg,
        }
    }

    fn push(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((t, self.seq, ev)));
    }

    /// Integrate the warm replica count up to `t` into the timeline.
    fn advance(&mut self, t: u64) {
        while self.tl_at < t {
            let b = ((self.tl_at / self.bucket_us) as usize).min(self.tl_warm.len() - 1);
            let end = ((b as u64 + 1) * self.bucket_us).min(t).max(self.tl_at + 1);
            let end = if b == self.tl_warm.len() - 1 { t } else { end };
            self.tl_warm[b] += self.alive as f64 * (end - self.tl_at) as f64;
            self.tl_at = end;
        }
    }

    /// Run to the end and return the metrics and every autoscaling decision, in order (to
    /// compare them with the coordinator's scaler on the same trace).
    pub fn run_recorded(mut self) -> (Metrics, Vec<ScaleRecord>) {
        self.log = Some(Vec::new());
        self.run_inner()
    }

    /// Run to the end and return the metrics.
    pub fn run(self) -> Metrics {
        self.run_inner().0
    }

    fn run_inner(mut self) -> (Metrics, Vec<ScaleRecord>) {
        if self.policy.keep_alive == KeepAlivePolicy::AlwaysOn {
            self.provision();
        }
        if let Some(a) = self.sc.arrivals.first() {
            self.push(a.t_us, Ev::Arrival(0));
        }
        let horizon = self.sc.horizon_us;
        while let Some(Reverse((t, _, ev))) = self.heap.pop() {
            if let Ev::Check(m) = ev {
                // Past the horizon only requests still waiting for a replica matter.
                if t > horizon && self.models[m as usize].waiting.is_empty() {
                    continue;
                }
            }
            self.now = t;
            match ev {
                Ev::Arrival(i) => self.on_arrival(i as usize),
                Ev::Done {
                    rep,
                    arrival,
                    rtt,
                    cold,
                } => self.on_done(rep, arrival, rtt, cold),
                Ev::Ready { rep, epoch } => self.on_ready(rep, epoch),
                Ev::Check(m) => {
                    if self.models[m as usize].check_at == t {
                        self.models[m as usize].check_at = 0;
                        self.scale(m as usize, 0);
                    }
                }
            }
        }
        let log = self.log.take().unwrap_or_default();
        (self.finish(), log)
    }

    fn on_arrival(&mut self, i: usize) {
        let a = self.sc.arrivals[i];
        if let Some(n) = self.sc.arrivals.get(i + 1) {
            self.push(n.t_us, Ev::Arrival(i as u32 + 1));
        }
        let now = self.now;
        let m = a.model as usize;
        let region = a.region as usize;
        {
            let caller = &self.sc.regions[region].caller;
            let ms = &mut self.models[m];
            ms.demand.observe(now);
            ms.origins.observe(now, caller);
        }
        // The decision sees this request as pending (it is about to need a replica): a
        // pre-warm plan must not unload the replica it is routed to.
        let ms = &self.models[m];
        if ms.replicas.is_empty()
            || ms
                .last_decide
                .is_none_or(|l| now.saturating_sub(l) >= DECIDE_EVERY_US)
        {
            self.scale(m, 1);
        }
        let p = Pending {
            arrival: now,
            rtt: 0,
            cold: false,
            region: a.region,
        };
        let rep = match self.route(m, region) {
            Some(r) => r,
            None => {
                // Never lose a request: start a replica whatever the policy said, or wait
                // for room.
                if self.add_replica(m) {
                    self.count_change();
                }
                match self.route(m, region) {
                    Some(r) => r,
                    None => {
                        self.waited += 1;
                        self.models[m]
                            .waiting
                            .push_back(Pending { cold: true, ..p });
                        self.models[m].queued += 1;
                        self.schedule_check(m, now + RETRY_US);
                        return;
                    }
                }
            }
        };
        self.assign(rep, p);
    }

    /// Send `p` to replica `rep`: run it now or queue it there.
    fn assign(&mut self, rep: u32, mut p: Pending) {
        let now = self.now;
        let r = &self.reps[rep as usize];
        let m = r.model as usize;
        p.rtt = self.sc.rtt(r.node as usize, p.region as usize) as u32;
        p.cold |= r.ready_at > now;
        if r.ready_at <= now && r.in_flight < self.sc.models[m].concurrency {
            self.start(rep, p);
        } else {
            self.reps[rep as usize].queue.push_back(p);
            self.models[m].queued += 1;
        }
    }

    fn start(&mut self, rep: u32, p: Pending) {
        let jitter = self.rng.gen_range(0.8..1.2);
        let r = &mut self.reps[rep as usize];
        let svc = (r.svc_us * jitter).max(1.0);
        r.in_flight += 1;
        r.last_used = self.now;
        self.models[r.model as usize].in_flight += 1;
        self.busy_us += svc;
        let t = self.now + svc as u64;
        self.push(
            t,
            Ev::Done {
                rep,
                arrival: p.arrival,
                rtt: p.rtt,
                cold: p.cold,
            },
        );
    }

    fn on_done(&mut self, rep: u32, arrival: u64, rtt: u32, cold: bool) {
        let now = self.now;
        let r = &mut self.reps[rep as usize];
        let transfer = self.sc.payload_bytes as f64 * 8.0 / r.bandwidth * 1e6;
        let lat = now.saturating_sub(arrival) + rtt as u64 + transfer as u64;
        self.lat.push(lat.min(u32::MAX as u64) as u32);
        let b = ((arrival / self.bucket_us) as usize).min(self.tl_lat.len() - 1);
        self.tl_lat[b][lat_bin(lat)] += 1;
        if cold {
            self.cold += 1;
        }
        r.in_flight -= 1;
        r.last_used = now;
        let m = r.model as usize;
        self.models[m].in_flight -= 1;
        if let Some(p) = self.reps[rep as usize].queue.pop_front() {
            self.models[m].queued -= 1;
            self.start(rep, p);
        }
        let ms = &self.models[m];
        if ms.in_flight == 0 && ms.queued == 0 {
            self.scale(m, 0);
        }
    }

    fn on_ready(&mut self, rep: u32, epoch: u32) {
        let r = &self.reps[rep as usize];
        if !r.alive || r.epoch != epoch {
            return;
        }
        let conc = self.sc.models[r.model as usize].concurrency;
        while self.reps[rep as usize].in_flight < conc {
            let Some(p) = self.reps[rep as usize].queue.pop_front() else {
                break;
            };
            let m = self.reps[rep as usize].model as usize;
            self.models[m].queued -= 1;
            self.start(rep, p);
        }
        let m = self.reps[rep as usize].model as usize;
        if self.models[m].in_flight == 0 && self.models[m].queued == 0 {
            self.scale(m, 0);
        }
    }

    fn node_load(&self, rep: u32, region: usize) -> NodeLoad {
        let r = &self.reps[rep as usize];
        let loaded = r.ready_at <= self.now;
        NodeLoad {
            key: rep as usize,
            loaded,
            queued: r.queue.len() as u32,
            in_flight: r.in_flight,
            concurrency: self.sc.models[r.model as usize].concurrency,
            service_us: Some(r.svc_us),
            load_us: Some(r.ready_at.saturating_sub(self.now) as f64),
            rtt_us: Some(self.sc.rtt(r.node as usize, region)),
            bandwidth_bps: Some(r.bandwidth),
            ..NodeLoad::default()
        }
    }

    fn add_candidate(&mut self, rep: u32, region: usize) {
        if self.buf.iter().all(|n| n.key != rep as usize) {
            let nl = self.node_load(rep, region);
            self.buf.push(nl);
        }
    }

    fn route(&mut self, m: usize, region: usize) -> Option<u32> {
        let len = self.models[m].replicas.len();
        if len == 0 {
            return None;
        }
        let strategy = match self.policy.routing {
            // Random and round robin skip replicas still loading (a few tries) like a
            // coordinator that lists ready nodes first.
            Routing::Random => {
                let mut pick = self.models[m].replicas[self.rng.gen_range(0..len)];
                for _ in 0..4 {
                    if self.reps[pick as usize].ready_at <= self.now {
                        break;
                    }
                    pick = self.models[m].replicas[self.rng.gen_range(0..len)];
                }
                return Some(pick);
            }
            Routing::Strategy(Strategy::RoundRobin) => {
                let now = self.now;
                let ms = &mut self.models[m];
                let mut pick = 0;
                for _ in 0..len.min(8) {
                    ms.rr = ms.rr.wrapping_add(1);
                    pick = ms.replicas[(ms.rr % len as u64) as usize];
                    if self.reps[pick as usize].ready_at <= now {
                        break;
                    }
                }
                return Some(pick);
            }
            Routing::Strategy(s) => s,
        };
        self.buf.clear();
        if strategy == Strategy::LatencyAware {
            for qi in 0..self.near[region].len() {
                let q = self.near[region][qi] as usize;
                let have = self.buf.len();
                let list_len = self.models[m].by_region[q].len();
                if have >= CANDIDATES || list_len == 0 {
                    if have >= CANDIDATES {
                        break;
                    }
                    continue;
                }
                let take = (CANDIDATES - have).min(list_len);
                let start = self.rng.gen_range(0..list_len);
                for j in 0..take {
                    let rep = self.models[m].by_region[q][(start + j) % list_len];
                    self.add_candidate(rep, region);
                }
            }
            for _ in 0..2 {
                let rep = self.models[m].replicas[self.rng.gen_range(0..len)];
                self.add_candidate(rep, region);
            }
        } else {
            for _ in 0..CANDIDATES.min(len) {
                let rep = self.models[m].replicas[self.rng.gen_range(0..len)];
                self.add_candidate(rep, region);
            }
        }
        let req = RouteRequest {
            payload_bytes: self.sc.payload_bytes,
        };
        let ranked = rank_request(&self.buf, &self.defaults, &req);
        self.tick = self.tick.wrapping_add(1);
        let ordered = order(strategy, ranked, self.tick, &mut self.rng);
        ordered.first().map(|r| r.key as u32)
    }

    fn keep_alive(&self, m: usize) -> KeepAlive {
        let fixed = |us: u64| KeepAlive {
            prewarm_after_us: None,
            keep_alive_us: us,
            source: KeepAliveSource::FewSamples,
            reason: String::new(),
        };
        match self.policy.keep_alive {
            KeepAlivePolicy::None => fixed(0),
            KeepAlivePolicy::Fixed(us) => fixed(us),
            KeepAlivePolicy::AlwaysOn => fixed(u64::MAX),
            KeepAlivePolicy::Predictive => self.models[m].demand.keep_alive(),
        }
    }

    fn schedule_check(&mut self, m: usize, t: u64) {
        // Checks at most every DECIDE_EVERY_US, like a coordinator's control loop tick.
        let t = t.max(self.now + DECIDE_EVERY_US);
        let at = self.models[m].check_at;
        if at > self.now && at <= t {
            return;
        }
        self.models[m].check_at = t;
        self.push(t, Ev::Check(m as u32));
    }

    /// Autoscale model `m` (`pending` requests are about to arrive and need a replica) with
    /// [`autoscale::step`], the coordinator's scaler step, and carry out the replicas it holds.
    fn scale(&mut self, m: usize, pending: u32) {
        if self.policy.keep_alive == KeepAlivePolicy::AlwaysOn {
            return;
        }
        let now = self.now;
        let keep = self.keep_alive(m);
        let model = &self.sc.models[m];
        let ms = &mut self.models[m];
        ms.last_decide = Some(now);
        let current = ms.replicas.len() as u32;
        let loading = ms
            .replicas
            .iter()
            .filter(|&&r| self.reps[r as usize].ready_at > now)
            .count() as u32;
        let input = StepInput {
            current,
            loading,
            queued: ms.queued + pending,
            in_flight: ms.in_flight,
            service_us: ms.svc_ref,
            load_us: model.load_us,
            artifact_bytes: model.artifact_bytes,
            // The simulator acts on a decision at once.
            notice_us: 0,
        };
        let step = autoscale::step(&ms.cfg, &mut ms.scale, &ms.demand, &keep, &input, now);
        let target = step.hold;
        if let Some(log) = &mut self.log {
            log.push(ScaleRecord {
                t_us: now,
                model: m as u32,
                arrivals: ms.demand.arrivals(),
                input: input.clone(),
                replicas: step.target.replicas,
                hold: step.hold,
                unload_idle: step.target.unload_idle,
                reason: step.target.reason.clone(),
            });
        }
        if target > current {
            let mut added = 0;
            for _ in current..target {
                if !self.add_replica(m) {
                    break;
                }
                added += 1;
            }
            if added > 0 {
                self.count_change();
            }
        } else if target < current && self.remove_idle(m, current - target) > 0 {
            self.count_change();
        }
        if !self.models[m].waiting.is_empty() {
            self.schedule_check(m, now + RETRY_US);
        }
        for t in [step.decision.recheck_at_us, step.warm.next_check_us]
            .into_iter()
            .flatten()
        {
            if t <= self.sc.horizon_us {
                self.schedule_check(m, t);
            }
        }
        if !self.models[m].replicas.is_empty() {
            if let Some(t) = step.keep_alive_expiry_us {
                // Not yet expired: check at expiry. Expired but a replica is still loading:
                // its Ready event re-runs the decision.
                if t > now && t <= self.sc.horizon_us {
                    self.schedule_check(m, t);
                }
            }
        }
    }

    fn count_change(&mut self) {
        self.changes += 1;
        let warm = (self.sc.horizon_us as f64 * self.cfg.warmup_fraction) as u64;
        if self.now >= warm {
            self.changes_late += 1;
        }
    }

    /// Remove up to `n` idle, loaded replicas of `m`, least recently used first.
    fn remove_idle(&mut self, m: usize, n: u32) -> u32 {
        let mut removed = 0;
        while removed < n {
            let now = self.now;
            let victim = self.models[m]
                .replicas
                .iter()
                .copied()
                .filter(|&r| {
                    let r = &self.reps[r as usize];
                    r.in_flight == 0 && r.queue.is_empty() && r.ready_at <= now
                })
                .min_by_key(|&r| (self.reps[r as usize].last_used, r));
            let Some(v) = victim else { break };
            self.remove(v);
            removed += 1;
        }
        removed
    }

    fn remove(&mut self, rep: u32) {
        self.advance(self.now);
        let now = self.now;
        let r = &mut self.reps[rep as usize];
        r.alive = false;
        r.epoch = r.epoch.wrapping_add(1);
        let (m, node, region, pos, rpos) = (
            r.model as usize,
            r.node as usize,
            r.region as usize,
            r.pos as usize,
            r.rpos as usize,
        );
        let warm = now.saturating_sub(r.started) as f64;
        self.warm_us += warm;
        self.cost += warm / 1e6 * r.price;
        let ready = now.saturating_sub(r.ready_at.max(r.started)) as f64;
        self.cap_us += ready * self.sc.models[m].concurrency as f64;
        let ms = &mut self.models[m];
        ms.replicas.swap_remove(pos);
        if let Some(&moved) = ms.replicas.get(pos) {
            self.reps[moved as usize].pos = pos as u32;
        }
        let ms = &mut self.models[m];
        ms.by_region[region].swap_remove(rpos);
        if let Some(&moved) = ms.by_region[region].get(rpos) {
            self.reps[moved as usize].rpos = rpos as u32;
        }
        let ns = &mut self.nodes[node];
        ns.free_mem += self.sc.models[m].memory_bytes;
        ns.hosts.retain(|&x| x != m as u32);
        self.free_reps.push(rep);
        self.alive -= 1;
    }

    /// Place and start loading one replica of `m` with [`placement::place`]; false when no
    /// sampled node can take it. Requests waiting for a replica of `m` go to its queue.
    ///
    /// The origins are the model's [`Origins`] (decayed calls per caller area), each divided
    /// by one plus the replicas already in its region, so that replicas spread over the
    /// regions in proportion to their demand. The candidates are a sample (so a placement
    /// costs O(1) at any cluster size): up to 12 random nodes in each of the three regions
    /// with most weight, the nodes that cached the model's artifact recently, and 4 random
    /// nodes.
    fn add_replica(&mut self, m: usize) -> bool {
        let model = &self.sc.models[m];
        let acc = model.accelerator as usize;
        let ms = &self.models[m];
        let mut origins = ms.origins.snapshot(self.now);
        let mut order: Vec<(f64, usize)> = Vec::with_capacity(origins.len());
        for o in &mut origins {
            let r = o
                .position
                .region
                .as_deref()
                .and_then(|n| self.region_of.get(n))
                .map_or(usize::MAX, |&r| r as usize);
            if let Some(here) = ms.by_region.get(r) {
                o.weight /= 1.0 + here.len() as f64;
                order.push((o.weight, r));
            }
        }
        order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut cands: Vec<u32> = Vec::with_capacity(48);
        for &(_, r) in order.iter().take(3) {
            let list = &self.region_nodes[acc][r];
            if list.is_empty() {
                continue;
            }
            for _ in 0..12 {
                cands.push(list[self.rng.gen_range(0..list.len())]);
            }
        }
        cands.extend(self.models[m].cached_nodes.iter().copied());
        let all = &self.all_nodes[acc];
        if all.is_empty() {
            return false;
        }
        for _ in 0..4 {
            cands.push(all[self.rng.gen_range(0..all.len())]);
        }
        cands.sort_unstable();
        cands.dedup();
        let c = Constraints {
            memory_bytes: model.memory_bytes,
            artifact_bytes: model.artifact_bytes,
            accelerator: if model.accelerator {
                Accelerator::Gpu
            } else {
                Accelerator::Any
            },
            ..Constraints::default()
        };
        let mut nodes = std::mem::take(&mut self.pbuf);
        nodes.clear();
        for &n in &cands {
            let ni = n as usize;
            let class = &self.sc.classes[self.sc.nodes[ni].class as usize];
            let ns = &self.nodes[ni];
            let pn = &mut self.pnodes[ni];
            pn.free_memory_bytes = ns.free_mem;
            pn.hosts_replica = ns.hosts.contains(&(m as u32));
            pn.artifact_cached = ns.cached.contains(&(m as u32));
            pn.load_us = Some(model.load_us as f64);
            pn.service_us = Some(model.service_us * class.service_mult);
            if placement::eligible(pn, &c) {
                nodes.push(pn.clone());
            }
        }
        let best = placement::place(&nodes, &origins, &c, &self.defaults);
        self.pbuf = nodes;
        let Some(best) = best else {
            return false;
        };
        let node = best.key as u32;
        let ni = node as usize;
        let class = &self.sc.classes[self.sc.nodes[ni].class as usize];
        let cached = self.nodes[ni].cached.contains(&(m as u32));
        let fetch = if cached {
            0
        } else {
            (model.artifact_bytes as f64 * 8.0 / class.bandwidth_bps * 1e6) as u64
        };
        let load = model.load_us + fetch;
        let ns = &mut self.nodes[ni];
        ns.free_mem -= model.memory_bytes;
        ns.hosts.push(m as u32);
        if !cached {
            if ns.cached.len() >= 16 {
                ns.cached.remove(0);
            }
            ns.cached.push(m as u32);
        }
        let ms = &mut self.models[m];
        if !ms.cached_nodes.contains(&node) {
            if ms.cached_nodes.len() >= 16 {
                ms.cached_nodes.remove(0);
            }
            ms.cached_nodes.push(node);
        }
        self.advance(self.now);
        let region = self.sc.nodes[ni].region;
        let rep = Replica {
            model: m as u32,
            node,
            region,
            ready_at: self.now + load,
            started: self.now,
            in_flight: 0,
            queue: VecDeque::new(),
            last_used: self.now,
            alive: true,
            epoch: 0,
            pos: self.models[m].replicas.len() as u32,
            rpos: self.models[m].by_region[region as usize].len() as u32,
            svc_us: model.service_us * class.service_mult,
            price: class.price_per_s,
            bandwidth: class.bandwidth_bps,
        };
        let id = if let Some(id) = self.free_reps.pop() {
            let epoch = self.reps[id as usize].epoch;
            self.reps[id as usize] = Replica { epoch, ..rep };
            id
        } else {
            self.reps.push(rep);
            (self.reps.len() - 1) as u32
        };
        self.models[m].replicas.push(id);
        self.models[m].by_region[region as usize].push(id);
        self.alive += 1;
        self.peak = self.peak.max(self.alive);
        let (t, epoch) = (
            self.reps[id as usize].ready_at,
            self.reps[id as usize].epoch,
        );
        self.push(t, Ev::Ready { rep: id, epoch });
        // Requests that waited for capacity go to the new replica.
        let waiting = std::mem::take(&mut self.models[m].waiting);
        self.models[m].queued -= waiting.len() as u32;
        for p in waiting {
            self.assign(id, p);
        }
        true
    }

    /// Always-on: every model gets, from the start, the replicas its peak 10 s rate needs,
    /// placed near its callers, already loaded.
    fn provision(&mut self) {
        let nm = self.sc.models.len();
        let mut peak = vec![0u32; nm];
        let mut cur = vec![(u64::MAX, 0u32); nm];
        for a in &self.sc.arrivals {
            let m = a.model as usize;
            let b = a.t_us / (10 * S);
            if cur[m].0 != b {
                cur[m] = (b, 0);
            }
            cur[m].1 += 1;
            peak[m] = peak[m].max(cur[m].1);
            // Every call of the day counts (as if all were recent).
            self.models[m]
                .origins
                .observe(0, &self.sc.regions[a.region as usize].caller);
        }
        for (m, &peak) in peak.iter().enumerate() {
            let ms = &self.models[m];
            let need = ms.cfg.need(peak as f64 / 10.0, ms.svc_ref).ceil().max(1.0) as u32;
            for _ in 0..need {
                if !self.add_replica(m) {
                    break;
                }
                let id = *self.models[m].replicas.last().unwrap_or(&0);
                self.reps[id as usize].ready_at = 0;
            }
        }
    }

    fn finish(mut self) -> Metrics {
        let end = self.sc.horizon_us.max(self.now);
        self.now = end;
        self.advance(end);
        for i in 0..self.reps.len() {
            let r = &self.reps[i];
            if r.alive {
                let warm = end.saturating_sub(r.started) as f64;
                self.warm_us += warm;
                self.cost += warm / 1e6 * r.price;
                let ready = end.saturating_sub(r.ready_at.max(r.started)) as f64;
                self.cap_us += ready * self.sc.models[r.model as usize].concurrency as f64;
            }
        }
        let requests = self.sc.arrivals.len() as u64;
        let slo = self.cfg.slo_us;
        let within = self.lat.iter().filter(|&&l| l as u64 <= slo).count() as u64;
        let mean = if self.lat.is_empty() {
            0.0
        } else {
            self.lat.iter().map(|&l| l as f64).sum::<f64>() / self.lat.len() as f64 / 1e3
        };
        let mut lat = std::mem::take(&mut self.lat);
        let pct = |v: &mut Vec<u32>, p: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            let k = (((v.len() as f64) * p).ceil() as usize).clamp(1, v.len()) - 1;
            let (_, x, _) = v.select_nth_unstable(k);
            *x as f64 / 1e3
        };
        let p50 = pct(&mut lat, 0.5);
        let p99 = pct(&mut lat, 0.99);
        let buckets = self.cfg.timeline_buckets.clamp(1, 10_000);
        let hist_pct = |h: &[u32; LAT_BINS], p: f64| -> f64 {
            let total: u64 = h.iter().map(|&c| c as u64).sum();
            if total == 0 {
                return 0.0;
            }
            let need = ((total as f64 * p).ceil() as u64).max(1);
            let mut acc = 0u64;
            for (b, &c) in h.iter().enumerate() {
                acc += c as u64;
                if acc >= need {
                    return bin_upper_ms(b);
                }
            }
            bin_upper_ms(LAT_BINS - 1)
        };
        let timeline = Timeline {
            bucket_s: self.bucket_us as f64 / 1e6,
            p50_ms: self.tl_lat[..buckets]
                .iter()
                .map(|h| hist_pct(h, 0.5))
                .collect(),
            p99_ms: self.tl_lat[..buckets]
                .iter()
                .map(|h| hist_pct(h, 0.99))
                .collect(),
            warm_replicas: self.tl_warm[..buckets]
                .iter()
                .map(|w| w / self.bucket_us as f64)
                .collect(),
        };
        let round = |x: f64, k: f64| (x * k).round() / k;
        Metrics {
            policy: self.policy.name.clone(),
            requests,
            dropped: self.models.iter().map(|m| m.waiting.len() as u64).sum(),
            waited_for_capacity: self.waited,
            p50_ms: round(p50, 1e3),
            p99_ms: round(p99, 1e3),
            mean_ms: round(mean, 1e3),
            slo_attainment: round(within as f64 / requests.max(1) as f64, 1e6),
            cold_starts: self.cold,
            cold_start_rate: round(self.cold as f64 / requests.max(1) as f64, 1e6),
            warm_node_s: round(self.warm_us / 1e6, 1e3),
            cost: round(self.cost, 1e3),
            utilisation: round(
                if self.cap_us > 0.0 {
                    (self.busy_us / self.cap_us).min(1.0)
                } else {
                    0.0
                },
                1e4,
            ),
            scale_changes: self.changes,
            scale_changes_after_warmup: self.changes_late,
            peak_replicas: self.peak,
            horizon_s: end as f64 / 1e6,
            timeline,
        }
    }
}

/// Run every policy on `sc` with `cfg`, on up to `jobs` threads (each run is single-threaded
/// and seeded, so the result does not depend on `jobs`).
pub fn run_all(sc: &Scenario, policies: &[Policy], cfg: &SimConfig, jobs: usize) -> Vec<Metrics> {
    let jobs = jobs.clamp(1, policies.len().max(1));
    let mut out: Vec<Option<Metrics>> = vec![None; policies.len()];
    if jobs == 1 {
        for (i, p) in policies.iter().enumerate() {
            out[i] = Some(Sim::new(sc, p.clone(), cfg.clone()).run());
        }
    } else {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results = std::sync::Mutex::new(&mut out);
        std::thread::scope(|s| {
            for _ in 0..jobs {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(p) = policies.get(i) else { break };
                    let m = Sim::new(sc, p.clone(), cfg.clone()).run();
                    if let Ok(mut g) = results.lock() {
                        g[i] = Some(m);
                    }
                });
            }
        });
    }
    out.into_iter().flatten().collect()
}
