//! One artifact to many edge sites: coordinator-only against peer-assisted distribution.
//!
//! The `artifact` scenario. Sites each have a LAN (every node on a switch port of
//! [`DistributionConfig::lan_mbps`], up and down) and one thin uplink to the coordinator (drawn
//! per site from [`DistributionConfig::uplink_mbps`]); the coordinator's own link is not a
//! bottleneck (50 uplinks of 50 Mbit/s are 2.5 Gbit/s). Every node starts pulling the artifact at
//! a seeded time within [`DistributionConfig::join_spread_s`] and runs the node's own
//! [`ChunkScheduler`] (`skein_policy::artifact`):
//! - [`Mode::CoordinatorOnly`]: the scheduler knows no peers, so every chunk comes from the
//!   coordinator through the site's uplink;
//! - [`Mode::PeerAssisted`]: it knows the nodes of its site that have joined, with the chunks
//!   they hold (partial holders included, told as each chunk verifies) and their RTT from
//!   Vivaldi coordinates, and asks the coordinator only for what no usable peer in reach has (or
//!   when every holder is saturated). Peers on other sites are out of reach (their chunks would
//!   cross two thin uplinks).
//!
//! Transfers are fluid flows: each flow crosses the links it uses (the site uplink and the
//! node's download port for a coordinator chunk, the holder's upload port and the node's
//! download port for a LAN chunk) and gets the smallest equal share among them, recomputed
//! whenever a flow starts or ends on one of its links. Nodes on
//! [`DistributionConfig::bad_nodes_per_site`] serve corrupt chunks: the scheduler's digest check
//! catches them. A node is warm when every chunk is verified (load time is not modelled).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Write as _;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use skein_policy::artifact::{
    ChunkIndex, ChunkManifest, ChunkScheduler, ChunkVerdict, Digest, FetchConfig, PeerSource,
    Source, DEFAULT_CHUNK_BYTES,
};
use skein_policy::vivaldi::{Coordinate, CoordinateExt};

/// One megabyte (10^6 bytes), as in "a 500 MB model" and Mbit/s.
pub const MB: u64 = 1_000_000;

/// The distribution to simulate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DistributionConfig {
    /// Sites; 50.
    pub sites: usize,
    /// Nodes, spread evenly over the sites (node `i` on site `i % sites`); 1 000.
    pub nodes: usize,
    /// Artifact size, bytes; 500 MB.
    pub artifact_bytes: u64,
    /// Chunk size, bytes; 4 MiB (the policy's default).
    pub chunk_bytes: u64,
    /// Each site's uplink from the coordinator, Mbit/s, drawn uniformly from this range;
    /// 20–50.
    pub uplink_mbps: (f64, f64),
    /// Each node's LAN port, Mbit/s, each way; 1 000.
    pub lan_mbps: f64,
    /// Nodes start pulling at seeded times uniform in `[0, join_spread_s]`; 30 s.
    pub join_spread_s: f64,
    /// Nodes per site that serve corrupt chunks (the first ones of each site); 0.
    pub bad_nodes_per_site: usize,
    /// The scheduler's tuning, the same in both modes.
    pub fetch: FetchConfig,
    /// Seed of the topology, the join times and the schedulers' chunk orders.
    pub seed: u64,
}

impl Default for DistributionConfig {
    fn default() -> Self {
        DistributionConfig {
            sites: 50,
            nodes: 1_000,
            artifact_bytes: 500 * MB,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            uplink_mbps: (20.0, 50.0),
            lan_mbps: 1_000.0,
            join_spread_s: 30.0,
            bad_nodes_per_site: 0,
            fetch: FetchConfig::default(),
            seed: 1,
        }
    }
}

/// Where nodes fetch from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// Every chunk from the coordinator.
    CoordinatorOnly,
    /// Chunks from LAN peers, the coordinator as the source of last resort.
    PeerAssisted,
}

impl Mode {
    /// Name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Mode::CoordinatorOnly => "coordinator-only",
            Mode::PeerAssisted => "peer-assisted",
        }
    }
}

/// The outcome of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DistributionResult {
    /// The mode.
    pub mode: Mode,
    /// Nodes.
    pub nodes: usize,
    /// Nodes with every chunk verified at the end.
    pub nodes_warm: usize,
    /// Until the last node is warm, from the first join, s.
    pub all_warm_s: f64,
    /// Median of each node's fetch time (join to warm), s.
    pub fetch_p50_s: f64,
    /// Slowest fetch (join to warm), s.
    pub fetch_max_s: f64,
    /// Bytes the coordinator sent (including chunks abandoned half-way).
    pub coordinator_egress_bytes: u64,
    /// Bytes LAN peers sent.
    pub peer_bytes: u64,
    /// Chunks verified, over all nodes.
    pub chunks_verified: u64,
    /// Chunks that failed their digest check (served by bad nodes).
    pub chunks_corrupt: u64,
    /// Chunks accepted from a bad node: always 0 (a digest mismatch is never accepted).
    pub corrupt_accepted: u64,
    /// The slowest site uplink, Mbit/s: a lower bound on the time until all are warm is the
    /// model's size over it (once in peer-assisted mode, once per node of that site in
    /// coordinator-only mode).
    pub slowest_uplink_mbps: f64,
    /// Events processed.
    pub events: u64,
}

/// Both modes and their ratios.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// The configuration.
    pub config: DistributionConfig,
    /// Coordinator-only.
    pub coordinator_only: DistributionResult,
    /// Peer-assisted.
    pub peer_assisted: DistributionResult,
    /// Peer-assisted coordinator egress / coordinator-only's.
    pub egress_ratio: f64,
    /// Peer-assisted time until all warm / coordinator-only's.
    pub time_ratio: f64,
}

/// Run both modes.
pub fn compare(cfg: &DistributionConfig) -> Result<Comparison, String> {
    // The two runs are independent and single-threaded: one thread each.
    let (coordinator_only, peer_assisted) = std::thread::scope(|scope| {
        let other = scope.spawn(|| run(cfg, Mode::CoordinatorOnly));
        let peer_assisted = run(cfg, Mode::PeerAssisted);
        let coordinator_only = other
            .join()
            .unwrap_or_else(|_| Err("the coordinator-only run panicked".into()));
        (coordinator_only, peer_assisted)
    });
    let (coordinator_only, peer_assisted) = (coordinator_only?, peer_assisted?);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    Ok(Comparison {
        config: cfg.clone(),
        egress_ratio: ratio(
            peer_assisted.coordinator_egress_bytes as f64,
            coordinator_only.coordinator_egress_bytes as f64,
        ),
        time_ratio: ratio(peer_assisted.all_warm_s, coordinator_only.all_warm_s),
        coordinator_only,
        peer_assisted,
    })
}

/// The comparison as a text table.
pub fn table(c: &Comparison) -> String {
    let cfg = &c.config;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "scenario artifact: {} MB in {} chunks of {} B to {} nodes on {} sites (uplinks {}-{} Mbit/s, LAN {} Mbit/s, joins over {} s, {} bad node(s) per site), seed {}",
        cfg.artifact_bytes as f64 / MB as f64,
        ChunkManifest::chunk_count_for(cfg.artifact_bytes, cfg.chunk_bytes),
        cfg.chunk_bytes,
        cfg.nodes,
        cfg.sites,
        cfg.uplink_mbps.0,
        cfg.uplink_mbps.1,
        cfg.lan_mbps,
        cfg.join_spread_s,
        cfg.bad_nodes_per_site,
        cfg.seed
    );
    let _ = writeln!(
        s,
        "{:<18} {:>7} {:>11} {:>11} {:>11} {:>15} {:>13} {:>8}",
        "mode",
        "warm",
        "all warm s",
        "fetch p50 s",
        "fetch max s",
        "coordinator GB",
        "LAN peers GB",
        "corrupt"
    );
    for r in [&c.coordinator_only, &c.peer_assisted] {
        let _ = writeln!(
            s,
            "{:<18} {:>7} {:>11.1} {:>11.1} {:>11.1} {:>15.2} {:>13.2} {:>8}",
            r.mode.name(),
            format!("{}/{}", r.nodes_warm, r.nodes),
            r.all_warm_s,
            r.fetch_p50_s,
            r.fetch_max_s,
            r.coordinator_egress_bytes as f64 / 1e9,
            r.peer_bytes as f64 / 1e9,
            r.chunks_corrupt
        );
    }
    let _ = writeln!(
        s,
        "peer-assisted / coordinator-only: coordinator egress {:.4} (goal <= 0.1), time until all warm {:.4} (goal <= 0.2)",
        c.egress_ratio, c.time_ratio
    );
    let _ = writeln!(
        s,
        "slowest uplink {:.1} Mbit/s: the model crosses it in {:.1} s",
        c.peer_assisted.slowest_uplink_mbps,
        cfg.artifact_bytes as f64 * 8.0 / (c.peer_assisted.slowest_uplink_mbps * 1e6)
    );
    s
}

/// The digest the sim gives chunk `i` (the sim moves no data; a bad node flips a byte).
fn chunk_digest(i: ChunkIndex) -> Digest {
    let mut d = [0u8; 32];
    d[..4].copy_from_slice(&i.to_le_bytes());
    d[31] = 0xa5;
    d
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sender {
    Coordinator,
    Node(u32),
}

#[derive(Debug, Clone)]
struct Flow {
    dst: u32,
    from: Sender,
    chunk: ChunkIndex,
    links: [u32; 2],
    len: f64,
    remaining: f64,
    /// Bytes per ns.
    rate: f64,
    last_ns: u64,
    version: u32,
    live: bool,
}

/// What a node tells the nodes of its site about a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tell {
    /// It verified the chunk.
    Has,
    /// It started (`true`) or stopped without it (`false`) fetching the chunk from the
    /// coordinator.
    Fetching(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Join(u32),
    Done(u32, u32),
    Wake(u32),
}

struct Sim<'a> {
    cfg: &'a DistributionConfig,
    mode: Mode,
    manifest: ChunkManifest,
    now_ns: u64,
    seq: u64,
    heap: BinaryHeap<Reverse<(u64, u64, Event)>>,
    /// Bytes per ns per link: site uplinks, then node download ports, then node upload ports.
    link_cap: Vec<f64>,
    link_flows: Vec<Vec<u32>>,
    flows: Vec<Flow>,
    node_flows: Vec<Vec<u32>>,
    scheds: Vec<Option<ChunkScheduler>>,
    coords: Vec<Coordinate>,
    site_nodes: Vec<Vec<u32>>,
    join_ns: Vec<u64>,
    warm_ns: Vec<Option<u64>>,
    bad: Vec<bool>,
    wake_at: Vec<u64>,
    res: DistributionResult,
}

fn mbps_to_bytes_per_ns(mbps: f64) -> f64 {
    mbps * 1e6 / 8.0 / 1e9
}

/// Run one mode.
pub fn run(cfg: &DistributionConfig, mode: Mode) -> Result<DistributionResult, String> {
    if cfg.sites == 0 || cfg.nodes == 0 {
        return Err("artifact scenario needs at least one site and one node".into());
    }
    let (lo, hi) = cfg.uplink_mbps;
    let bandwidths_ok =
        lo > 0.0 && hi >= lo && hi.is_finite() && cfg.lan_mbps > 0.0 && cfg.lan_mbps.is_finite();
    if !bandwidths_ok {
        return Err(format!(
            "bandwidths must be positive and finite (uplink {lo}-{hi} Mbit/s, LAN {} Mbit/s)",
            cfg.lan_mbps
        ));
    }
    if !(cfg.join_spread_s >= 0.0 && cfg.join_spread_s.is_finite()) {
        return Err(format!(
            "join spread {} s is not a duration",
            cfg.join_spread_s
        ));
    }
    let count = ChunkManifest::chunk_count_for(cfg.artifact_bytes, cfg.chunk_bytes);
    let digests = (0..count).map(|i| chunk_digest(i as ChunkIndex)).collect();
    let manifest = ChunkManifest::new(cfg.artifact_bytes, cfg.chunk_bytes, [0x11; 32], digests)
        .map_err(|e| format!("artifact of {} B: {e}", cfg.artifact_bytes))?;

    // Topology and joins: the same draws in both modes.
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut link_cap = Vec::with_capacity(cfg.sites + 2 * cfg.nodes);
    let mut site_center = Vec::with_capacity(cfg.sites);
    let mut slowest_uplink_mbps = f64::INFINITY;
    for _ in 0..cfg.sites {
        let mbps = rng.gen_range(lo..=hi);
        slowest_uplink_mbps = slowest_uplink_mbps.min(mbps);
        link_cap.push(mbps_to_bytes_per_ns(mbps));
        site_center.push((
            rng.gen_range(-40_000.0..40_000.0),
            rng.gen_range(-40_000.0..40_000.0),
        ));
    }
    let lan = mbps_to_bytes_per_ns(cfg.lan_mbps);
    link_cap.extend(std::iter::repeat_n(lan, 2 * cfg.nodes));
    let mut coords = Vec::with_capacity(cfg.nodes);
    let mut join_ns = Vec::with_capacity(cfg.nodes);
    let mut site_nodes = vec![Vec::new(); cfg.sites];
    let mut bad = Vec::with_capacity(cfg.nodes);
    for n in 0..cfg.nodes {
        let site = n % cfg.sites;
        let (x, y): (f64, f64) = site_center[site];
        let mut c = Coordinate::origin();
        c.vec[0] = x + rng.gen_range(-150.0..150.0);
        c.vec[1] = y + rng.gen_range(-150.0..150.0);
        c.height = rng.gen_range(50.0..300.0);
        c.error = 0.1;
        coords.push(c);
        join_ns.push((rng.gen_range(0.0..=cfg.join_spread_s) * 1e9) as u64);
        bad.push(site_nodes[site].len() < cfg.bad_nodes_per_site);
        site_nodes[site].push(n as u32);
    }

    let mut sim = Sim {
        cfg,
        mode,
        manifest,
        now_ns: 0,
        seq: 0,
        heap: BinaryHeap::new(),
        link_flows: vec![Vec::new(); link_cap.len()],
        link_cap,
        flows: Vec::new(),
        node_flows: vec![Vec::new(); cfg.nodes],
        scheds: vec![None; cfg.nodes],
        coords,
        site_nodes,
        join_ns,
        warm_ns: vec![None; cfg.nodes],
        bad,
        wake_at: vec![u64::MAX; cfg.nodes],
        res: DistributionResult {
            mode,
            nodes: cfg.nodes,
            nodes_warm: 0,
            all_warm_s: 0.0,
            fetch_p50_s: 0.0,
            fetch_max_s: 0.0,
            coordinator_egress_bytes: 0,
            peer_bytes: 0,
            chunks_verified: 0,
            chunks_corrupt: 0,
            corrupt_accepted: 0,
            slowest_uplink_mbps,
            events: 0,
        },
    };
    for n in 0..cfg.nodes {
        let t = sim.join_ns[n];
        sim.push(t, Event::Join(n as u32));
    }
    sim.run();
    Ok(sim.finish())
}

impl Sim<'_> {
    fn push(&mut self, t_ns: u64, e: Event) {
        self.seq += 1;
        self.heap.push(Reverse((t_ns, self.seq, e)));
    }

    fn now_us(&self) -> u64 {
        self.now_ns / 1_000
    }

    fn site(&self, n: u32) -> usize {
        n as usize % self.cfg.sites
    }

    fn run(&mut self) {
        while let Some(Reverse((t, _, e))) = self.heap.pop() {
            self.now_ns = t;
            self.res.events += 1;
            match e {
                Event::Join(n) => self.join(n),
                Event::Done(f, version) => {
                    let fl = &self.flows[f as usize];
                    if fl.live && fl.version == version {
                        self.done(f);
                    }
                }
                Event::Wake(n) => {
                    if self.wake_at[n as usize] == t {
                        self.wake_at[n as usize] = u64::MAX;
                        self.dispatch(n);
                    }
                }
            }
        }
    }

    fn join(&mut self, n: u32) {
        let mut rng = StdRng::seed_from_u64(
            self.cfg
                .seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(u64::from(n) + 1),
        );
        let mut s = ChunkScheduler::new(self.manifest.chunk_count(), self.cfg.fetch, &mut rng);
        if self.mode == Mode::PeerAssisted {
            let site = self.site(n);
            let peers: Vec<u32> = self.site_nodes[site]
                .iter()
                .copied()
                .filter(|&m| m != n && self.scheds[m as usize].is_some())
                .collect();
            for m in peers {
                let rtt_us = self.coords[n as usize].distance_us(&self.coords[m as usize]);
                let info = PeerSource {
                    rtt_us,
                    max_in_flight: None,
                };
                s.set_peer(u64::from(m), info);
                if let Some(other) = self.scheds[m as usize].as_mut() {
                    other.set_peer(u64::from(n), info);
                    for i in 0..self.manifest.chunk_count() {
                        if other.has(i) {
                            s.peer_has(u64::from(m), i);
                        }
                    }
                    for &x in &self.node_flows[m as usize] {
                        let g = &self.flows[x as usize];
                        if g.from == Sender::Coordinator {
                            s.peer_fetching(u64::from(m), g.chunk, true);
                        }
                    }
                }
            }
        }
        if s.is_complete() {
            // An empty artifact.
            self.warm_ns[n as usize] = Some(self.now_ns);
        }
        self.scheds[n as usize] = Some(s);
        self.dispatch(n);
    }

    fn dispatch(&mut self, n: u32) {
        let now_us = self.now_us();
        let Some(s) = self.scheds[n as usize].as_mut() else {
            return;
        };
        let reqs = s.next_requests(now_us);
        let retry = s.retry_at_us(now_us);
        for (chunk, source) in reqs {
            let len = self.manifest.chunk_len(chunk).unwrap_or(0) as f64;
            let (from, links) = match source {
                Source::Coordinator => (
                    Sender::Coordinator,
                    [self.site(n) as u32, (self.cfg.sites + n as usize) as u32],
                ),
                Source::Peer(m) => (
                    Sender::Node(m as u32),
                    [
                        (self.cfg.sites + self.cfg.nodes + m as usize) as u32,
                        (self.cfg.sites + n as usize) as u32,
                    ],
                ),
            };
            let id = self.flows.len() as u32;
            self.flows.push(Flow {
                dst: n,
                from,
                chunk,
                links,
                len,
                remaining: len,
                rate: 0.0,
                last_ns: self.now_ns,
                version: 0,
                live: true,
            });
            for l in links {
                self.link_flows[l as usize].push(id);
            }
            self.node_flows[n as usize].push(id);
            self.touch(links);
            if self.mode == Mode::PeerAssisted && source == Source::Coordinator {
                self.tell_site(n, chunk, Tell::Fetching(true));
            }
        }
        if let Some(at_us) = retry {
            let at = at_us.saturating_mul(1_000);
            if at < self.wake_at[n as usize] {
                self.wake_at[n as usize] = at;
                self.push(at, Event::Wake(n));
            }
        }
    }

    /// Flows on `links` get their progress so far and a new rate (and finish event).
    fn touch(&mut self, links: [u32; 2]) {
        let mut ids: Vec<u32> = Vec::new();
        for l in links {
            ids.extend_from_slice(&self.link_flows[l as usize]);
        }
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let now = self.now_ns;
            let rate = {
                let f = &self.flows[id as usize];
                f.links
                    .iter()
                    .map(|&l| self.link_cap[l as usize] / self.link_flows[l as usize].len() as f64)
                    .fold(f64::INFINITY, f64::min)
            };
            let f = &mut self.flows[id as usize];
            f.remaining = (f.remaining - f.rate * (now - f.last_ns) as f64).max(0.0);
            f.last_ns = now;
            f.rate = rate;
            f.version += 1;
            let eta = (f.remaining / rate).ceil() as u64;
            let (v, at) = (f.version, now.saturating_add(eta));
            self.push(at, Event::Done(id, v));
        }
    }

    /// Take flow `id` off its links; returns the bytes it moved.
    fn end_flow(&mut self, id: u32) -> f64 {
        let now = self.now_ns;
        let f = &mut self.flows[id as usize];
        f.remaining = (f.remaining - f.rate * (now - f.last_ns) as f64).max(0.0);
        f.live = false;
        let moved = f.len - f.remaining;
        let (links, dst, from) = (f.links, f.dst, f.from);
        for l in links {
            let v = &mut self.link_flows[l as usize];
            if let Some(at) = v.iter().position(|&x| x == id) {
                v.swap_remove(at);
            }
        }
        let nf = &mut self.node_flows[dst as usize];
        if let Some(at) = nf.iter().position(|&x| x == id) {
            nf.swap_remove(at);
        }
        match from {
            Sender::Coordinator => self.res.coordinator_egress_bytes += moved.round() as u64,
            Sender::Node(_) => self.res.peer_bytes += moved.round() as u64,
        }
        self.touch(links);
        moved
    }

    fn done(&mut self, id: u32) {
        self.end_flow(id);
        let f = self.flows[id as usize].clone();
        let (n, i) = (f.dst, f.chunk);
        let (source, corrupt) = match f.from {
            Sender::Coordinator => (Source::Coordinator, false),
            Sender::Node(m) => (Source::Peer(u64::from(m)), self.bad[m as usize]),
        };
        let mut digest = chunk_digest(i);
        if corrupt {
            digest[0] ^= 0xff;
        }
        let now_us = self.now_us();
        let Some(s) = self.scheds[n as usize].as_mut() else {
            return;
        };
        match s.on_chunk(&self.manifest, i, source, &digest, now_us) {
            ChunkVerdict::Verified => {
                self.res.chunks_verified += 1;
                if corrupt {
                    self.res.corrupt_accepted += 1;
                }
                if s.is_complete() && self.warm_ns[n as usize].is_none() {
                    self.warm_ns[n as usize] = Some(self.now_ns);
                }
                if self.mode == Mode::PeerAssisted {
                    self.tell_site(n, i, Tell::Has);
                }
            }
            ChunkVerdict::Corrupt { abandoned, .. } => {
                self.res.chunks_corrupt += 1;
                let cancel: Vec<u32> = self.node_flows[n as usize]
                    .iter()
                    .copied()
                    .filter(|&x| {
                        let g = &self.flows[x as usize];
                        g.from == f.from && abandoned.contains(&g.chunk)
                    })
                    .collect();
                for x in cancel {
                    self.end_flow(x);
                }
                if self.mode == Mode::PeerAssisted && f.from == Sender::Coordinator {
                    for c in abandoned.into_iter().chain([i]) {
                        self.tell_site(n, c, Tell::Fetching(false));
                    }
                }
            }
            _ => {}
        }
        self.dispatch(n);
    }

    /// Node `n` tells its site's nodes about chunk `i`; those that want it and have a free
    /// slot ask again (it may now be available, or the coordinator may now be the way).
    fn tell_site(&mut self, n: u32, i: ChunkIndex, what: Tell) {
        let site = self.site(n);
        let mut wake = Vec::new();
        for &m in &self.site_nodes[site] {
            if m == n {
                continue;
            }
            if let Some(s) = self.scheds[m as usize].as_mut() {
                match what {
                    Tell::Has => s.peer_has(u64::from(n), i),
                    Tell::Fetching(on) => s.peer_fetching(u64::from(n), i, on),
                }
                if what != Tell::Fetching(true)
                    && s.wants(i)
                    && s.in_flight() < s.config().max_in_flight
                {
                    wake.push(m);
                }
            }
        }
        for m in wake {
            self.dispatch(m);
        }
    }

    fn finish(mut self) -> DistributionResult {
        let mut fetch: Vec<f64> = Vec::new();
        let mut last = 0u64;
        for n in 0..self.cfg.nodes {
            let complete = self.scheds[n].as_ref().is_some_and(|s| s.is_complete());
            if let (true, Some(w)) = (complete, self.warm_ns[n]) {
                self.res.nodes_warm += 1;
                last = last.max(w);
                fetch.push((w - self.join_ns[n]) as f64 / 1e9);
            }
        }
        fetch.sort_by(f64::total_cmp);
        self.res.all_warm_s = last as f64 / 1e9;
        self.res.fetch_p50_s = fetch.get(fetch.len() / 2).copied().unwrap_or(0.0);
        self.res.fetch_max_s = fetch.last().copied().unwrap_or(0.0);
        self.res
    }
}
