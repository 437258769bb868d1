//! Placement of a new replica: the node that minimises the expected completion time for where
//! the demand comes from.
//!
//! ```text
//! score = Σ weight_i × estimate_rtt(origin_i, node) / Σ weight_i
//!       + service + queue                 (routing::score_parts, as the router will see it)
//!       + cold / amortise_over            (load, plus artifact fetch = bytes × 8 / bandwidth
//!                                          unless cached: paid once, spread over the requests
//!                                          the replica is expected to serve)
//! ```
//!
//! Whether a node may hold a model at all is decided once, here, for the coordinator's
//! routing and scaler, the node agent and the simulator: [`allows`] (the deployment's
//! regions, device class and accelerator rule, `prefer-gpu` included) and [`eligible`] (allowed,
//! and able to take a new replica now: healthy, not hosting it already, enough free memory).
//! Nodes that are not eligible are skipped. Ties go to the earlier node in the input.
//! [`Origins`] keeps the weighted set of recent caller positions (bounded, decayed) that
//! [`place`] takes.

use crate::routing::{
    estimate_rtt, score_parts, NodeLoad, Position, RouteRequest, RoutingDefaults, ScoreParts,
};
pub use skein_proto::Accelerator;
use skein_proto::DeploymentSettings;
use std::collections::BTreeMap;

/// The node label naming a node's device class (`device_class = "edge-arm"`).
pub const DEVICE_CLASS_LABEL: &str = "device_class";
/// The node label naming a node's region.
pub const REGION_LABEL: &str = "region";
/// The node label naming a node's zone.
pub const ZONE_LABEL: &str = "zone";

/// A node that could receive a replica.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementNode {
    /// The caller's key, returned in [`Placement::key`].
    pub key: usize,
    /// Heartbeats arrive on time (and the node is not draining).
    pub healthy: bool,
    /// Where the node is.
    pub position: Position,
    /// Memory not yet used by loaded models, bytes.
    pub free_memory_bytes: u64,
    /// The node has an accelerator (GPU).
    pub accelerator: bool,
    /// The node's device class label, if any.
    pub device_class: Option<String>,
    /// The engine the node runs models on ([`skein_proto::ENGINE_LABEL`]: `tract`, `ort`,
    /// `burn`), if it says.
    pub engine: Option<String>,
    /// The node already hosts (or is loading) a replica of this model.
    pub hosts_replica: bool,
    /// The model's artifact is on the node's disk already.
    pub artifact_cached: bool,
    /// Bandwidth for the artifact fetch, bits/s; `None`: the routing default.
    pub bandwidth_bps: Option<f64>,
    /// Expected load time of the model there, µs; `None`: the routing default.
    pub load_us: Option<f64>,
    /// Expected service time there (the node class's speed), µs; `None`: the default.
    pub service_us: Option<f64>,
    /// Requests per slot already running there (other models share the machine), 0 = idle.
    pub queued: u32,
}

impl Default for PlacementNode {
    /// A healthy node without accelerator, free memory or measurements.
    fn default() -> Self {
        PlacementNode {
            key: 0,
            healthy: true,
            position: Position::default(),
            free_memory_bytes: 0,
            accelerator: false,
            device_class: None,
            engine: None,
            hosts_replica: false,
            artifact_cached: false,
            bandwidth_bps: None,
            load_us: None,
            service_us: None,
            queued: 0,
        }
    }
}

impl PlacementNode {
    /// What a node's labels say about where it may serve: its position (`region`, `zone`),
    /// device class and whether it runs models on a GPU ([`skein_proto::has_gpu`]). Everything
    /// else is the default (healthy, no free memory, nothing measured).
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Self {
        PlacementNode {
            position: Position {
                coordinate: None,
                region: labels.get(REGION_LABEL).cloned(),
                zone: labels.get(ZONE_LABEL).cloned(),
            },
            accelerator: skein_proto::has_gpu(labels),
            device_class: labels.get(DEVICE_CLASS_LABEL).cloned(),
            engine: labels.get(skein_proto::ENGINE_LABEL).cloned(),
            ..PlacementNode::default()
        }
    }
}

/// What the model needs from a node.
#[derive(Debug, Clone, PartialEq)]
pub struct Constraints {
    /// Memory the loaded model takes, bytes.
    pub memory_bytes: u64,
    /// Artifact size, bytes (fetched when not cached).
    pub artifact_bytes: u64,
    /// Which nodes' accelerators qualify: any, only GPU nodes, or GPU nodes while one is
    /// alive (see `gpu_alive`).
    pub accelerator: Accelerator,
    /// Under [`Accelerator::PreferGpu`]: some node that the other constraints allow runs a
    /// GPU and is alive ([`gpu_alive`]), so CPU nodes do not qualify.
    pub gpu_alive: bool,
    /// Allowed regions; empty = any. A node without a region label fails a non-empty list.
    pub regions: Vec<String>,
    /// Required device class; empty = any. A node without the label fails a non-empty one.
    pub device_class: String,
    /// Engines able to run the model (the deploy-time operator check); empty = any.
    pub engines: Vec<String>,
    /// Requests over which the cold cost is spread (at least 1).
    pub amortise_over: f64,
}

impl Default for Constraints {
    fn default() -> Self {
        Constraints {
            memory_bytes: 0,
            artifact_bytes: 0,
            accelerator: Accelerator::Any,
            gpu_alive: false,
            regions: Vec::new(),
            device_class: String::new(),
            engines: Vec::new(),
            amortise_over: 20.0,
        }
    }
}

impl Constraints {
    /// The constraints of a deployment (`skein deploy --region/--device-class/--accelerator`,
    /// `--memory`) for an artifact of `artifact_bytes`; `gpu_alive` starts false (fill it with
    /// [`gpu_alive`] where the cluster is known).
    pub fn for_deployment(settings: &DeploymentSettings, artifact_bytes: u64) -> Self {
        Constraints {
            memory_bytes: settings.memory_estimate,
            artifact_bytes,
            accelerator: settings.accelerator,
            gpu_alive: false,
            regions: settings.regions.clone(),
            device_class: settings.device_class.clone(),
            engines: settings.engines.engines.clone(),
            ..Constraints::default()
        }
    }
}

/// A caller position and how much of the demand comes from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    /// Where the calls come from.
    pub position: Position,
    /// Weight (e.g. recent calls); non-finite or negative counts as 0.
    pub weight: f64,
}

/// The chosen node.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// The node's key.
    pub key: usize,
    /// Its score, µs.
    pub score_us: f64,
    /// Parts: `rtt_us` is the demand-weighted mean RTT, `cold_us` the full (unamortised) cold
    /// cost.
    pub parts: ScoreParts,
    /// Human-readable explanation.
    pub reason: String,
}

fn weight(w: f64) -> f64 {
    if w.is_finite() && w > 0.0 {
        w
    } else {
        0.0
    }
}

/// Demand-weighted mean RTT from `origins` to `pos`, µs (0 without weighted origins).
pub fn weighted_rtt(origins: &[Origin], pos: &Position) -> f64 {
    let mut sum = 0.0;
    let mut total = 0.0;
    for o in origins {
        let w = weight(o.weight);
        if w > 0.0 {
            sum += w * estimate_rtt(&o.position, pos);
            total += w;
        }
    }
    let r = if total > 0.0 { sum / total } else { 0.0 };
    if r.is_finite() {
        r.max(0.0)
    } else {
        f64::MAX
    }
}

/// Whether `n` may hold and serve the model at all under `c`: its region is one of
/// `c.regions` (when any are given), its device class is `c.device_class` (when one is given),
/// and its accelerator qualifies: [`Accelerator::Gpu`] needs a GPU node;
/// [`Accelerator::PreferGpu`] takes a CPU node only while no allowed GPU node is alive
/// (`c.gpu_alive` false); and its engine is one of `c.engines` (when any are given: a model
/// only ONNX Runtime runs). Memory, health and existing replicas are not looked at (see
/// [`eligible`]).
pub fn allows(n: &PlacementNode, c: &Constraints) -> bool {
    let accelerator_ok = match c.accelerator {
        Accelerator::Any => true,
        Accelerator::Gpu => n.accelerator,
        Accelerator::PreferGpu => n.accelerator || !c.gpu_alive,
    };
    let region_ok = c.regions.is_empty()
        || n.position
            .region
            .as_deref()
            .is_some_and(|r| c.regions.iter().any(|a| a == r));
    let class_ok = c.device_class.is_empty() || n.device_class.as_deref() == Some(&c.device_class);
    let engine_ok = c.engines.is_empty()
        || n.engine
            .as_deref()
            .is_some_and(|e| c.engines.iter().any(|a| a == e));
    accelerator_ok && region_ok && class_ok && engine_ok
}

/// Whether `n` can take a new replica under `c` now: [`allows`] it, healthy, not hosting one
/// already, at least `c.memory_bytes` free.
pub fn eligible(n: &PlacementNode, c: &Constraints) -> bool {
    n.healthy && !n.hosts_replica && n.free_memory_bytes >= c.memory_bytes && allows(n, c)
}

/// Whether any of `nodes` that is alive (`healthy`) runs a GPU and is allowed by the other
/// constraints of `c` (regions, device class): the input `c.gpu_alive` of
/// [`Accelerator::PreferGpu`].
pub fn gpu_alive<'a>(nodes: impl IntoIterator<Item = &'a PlacementNode>, c: &Constraints) -> bool {
    let gpu_only = Constraints {
        accelerator: Accelerator::Gpu,
        regions: c.regions.clone(),
        device_class: c.device_class.clone(),
        ..Constraints::default()
    };
    nodes
        .into_iter()
        .any(|n| n.healthy && n.accelerator && allows(n, &gpu_only))
}

/// Whether a node with `labels` may hold and serve a model deployed with `settings`, as far
/// as the node itself can tell ([`allows`] without knowing whether a GPU node is alive
/// elsewhere: `prefer-gpu` never refuses here).
pub fn labels_allow(settings: &DeploymentSettings, labels: &BTreeMap<String, String>) -> bool {
    allows(
        &PlacementNode::from_labels(labels),
        &Constraints::for_deployment(settings, 0),
    )
}

/// Score of `n` for a replica (see the module docs), with its parts.
pub fn score(
    n: &PlacementNode,
    origins: &[Origin],
    c: &Constraints,
    d: &RoutingDefaults,
) -> (f64, ScoreParts) {
    let load = NodeLoad {
        key: n.key,
        loaded: false,
        queued: n.queued,
        service_us: n.service_us,
        load_us: n.load_us,
        rtt_us: Some(weighted_rtt(origins, &n.position)),
        bandwidth_bps: n.bandwidth_bps,
        artifact_cached: n.artifact_cached,
        artifact_bytes: c.artifact_bytes,
        ..NodeLoad::default()
    };
    let parts = score_parts(&load, d, &RouteRequest::default());
    let amortise = if c.amortise_over.is_finite() {
        c.amortise_over.max(1.0)
    } else {
        1.0
    };
    let s = parts.rtt_us + parts.queue_us + parts.service_us + parts.cold_us / amortise;
    let s = if s.is_nan() {
        f64::MAX
    } else {
        s.clamp(0.0, f64::MAX)
    };
    (s, parts)
}

/// The best node for a new replica, or `None` when no node is eligible.
pub fn place(
    nodes: &[PlacementNode],
    origins: &[Origin],
    c: &Constraints,
    d: &RoutingDefaults,
) -> Option<Placement> {
    let mut best: Option<(usize, f64, ScoreParts)> = None;
    for (i, n) in nodes.iter().enumerate() {
        if !eligible(n, c) {
            continue;
        }
        let (s, parts) = score(n, origins, c, d);
        if best.as_ref().is_none_or(|b| s < b.1) {
            best = Some((i, s, parts));
        }
    }
    let (i, s, p) = best?;
    let n = &nodes[i];
    Some(Placement {
        key: n.key,
        score_us: s,
        parts: p,
        reason: format!(
            "node {} in {}: mean RTT to callers {:.1} ms, service {:.1} ms, cold {:.0} ms{}",
            n.key,
            n.position.region.as_deref().unwrap_or("?"),
            p.rtt_us / 1e3,
            p.service_us / 1e3,
            p.cold_us / 1e3,
            if n.artifact_cached {
                " (artifact cached)"
            } else {
                ""
            }
        ),
    })
}

/// Recent caller positions with decayed call counts, bounded to `capacity` entries (the
/// lightest is replaced). Entries are keyed by region and zone labels; the latest coordinate
/// seen for a key is kept.
#[derive(Debug, Clone)]
pub struct Origins {
    capacity: usize,
    decay_us: f64,
    entries: Vec<(Position, f64, u64)>,
}

impl Origins {
    /// At most `capacity` (at least 1) areas; a call's weight decays by 1/e every
    /// `decay_us`.
    pub fn new(capacity: usize, decay_us: u64) -> Self {
        Origins {
            capacity: capacity.max(1),
            decay_us: decay_us.max(1) as f64,
            entries: Vec::new(),
        }
    }

    fn decayed(&self, w: f64, at: u64, now_us: u64) -> f64 {
        let dt = now_us.saturating_sub(at) as f64;
        let v = w * (-dt / self.decay_us).exp();
        if v.is_finite() {
            v
        } else {
            0.0
        }
    }

    /// Count one call from `from` at `now_us`.
    pub fn observe(&mut self, now_us: u64, from: &Position) {
        let same = |p: &Position| p.region == from.region && p.zone == from.zone;
        if let Some(i) = self.entries.iter().position(|e| same(&e.0)) {
            let w = self.decayed(self.entries[i].1, self.entries[i].2, now_us);
            let e = &mut self.entries[i];
            e.1 = (w + 1.0).min(1e12);
            e.2 = e.2.max(now_us);
            if from.coordinate.is_some() && e.0.coordinate != from.coordinate {
                e.0.coordinate.clone_from(&from.coordinate);
            }
            return;
        }
        if self.entries.len() < self.capacity {
            self.entries.push((from.clone(), 1.0, now_us));
            return;
        }
        let lightest = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, self.decayed(e.1, e.2, now_us)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i);
        if let Some(i) = lightest {
            self.entries[i] = (from.clone(), 1.0, now_us);
        }
    }

    /// The areas with their weights at `now_us`.
    pub fn snapshot(&self, now_us: u64) -> Vec<Origin> {
        self.entries
            .iter()
            .map(|(p, w, at)| Origin {
                position: p.clone(),
                weight: self.decayed(*w, *at, now_us),
            })
            .collect()
    }

    /// Number of areas tracked.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No call seen.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vivaldi::{Coordinate, CoordinateExt};

    const GB: u64 = 1 << 30;

    fn at(x: f64, region: &str) -> Position {
        let mut c = Coordinate::origin();
        c.vec[0] = x;
        c.error = 0.1;
        c.height = 0.0;
        Position {
            coordinate: Some(c),
            region: Some(region.into()),
            zone: None,
        }
    }

    fn node(key: usize, x: f64, region: &str) -> PlacementNode {
        PlacementNode {
            key,
            position: at(x, region),
            free_memory_bytes: 8 * GB,
            artifact_cached: true,
            load_us: Some(500_000.0),
            service_us: Some(10_000.0),
            ..PlacementNode::default()
        }
    }

    fn origins() -> Vec<Origin> {
        vec![
            Origin {
                position: at(0.0, "eu"),
                weight: 90.0,
            },
            Origin {
                position: at(80_000.0, "us"),
                weight: 10.0,
            },
        ]
    }

    #[test]
    fn follows_the_weight_of_demand() {
        let nodes = [node(0, 80_000.0, "us"), node(1, 1_000.0, "eu")];
        let c = Constraints::default();
        let d = RoutingDefaults::default();
        let p = place(&nodes, &origins(), &c, &d).unwrap();
        assert_eq!(p.key, 1, "{}", p.reason);
        // 0.9 × 1 ms + 0.1 × 79 ms.
        assert!((p.parts.rtt_us - 8_800.0).abs() < 1.0, "{:?}", p.parts);
        let flipped: Vec<Origin> = origins()
            .into_iter()
            .map(|mut o| {
                o.weight = 100.0 - o.weight;
                o
            })
            .collect();
        assert_eq!(place(&nodes, &flipped, &c, &d).unwrap().key, 0);
    }

    #[test]
    fn respects_memory_accelerator_region_and_existing_replicas() {
        let d = RoutingDefaults::default();
        let mut small = node(0, 0.0, "eu");
        small.free_memory_bytes = GB;
        let mut gpu = node(1, 60_000.0, "us");
        gpu.accelerator = true;
        let mut host = node(2, 0.0, "eu");
        host.hosts_replica = true;
        let mut sick = node(3, 0.0, "eu");
        sick.healthy = false;
        let cpu = node(4, 5_000.0, "eu");
        let nodes = [small, gpu, host, sick, cpu];
        let mut c = Constraints {
            memory_bytes: 2 * GB,
            ..Constraints::default()
        };
        assert_eq!(place(&nodes, &origins(), &c, &d).unwrap().key, 4);
        c.accelerator = Accelerator::Gpu;
        assert_eq!(place(&nodes, &origins(), &c, &d).unwrap().key, 1);
        c.regions = vec!["eu".into()];
        assert_eq!(place(&nodes, &origins(), &c, &d), None);
        c.accelerator = Accelerator::Any;
        assert_eq!(place(&nodes, &origins(), &c, &d).unwrap().key, 4);
        assert_eq!(place(&[], &origins(), &c, &d), None);
    }

    #[test]
    fn one_rule_for_regions_device_class_and_accelerators() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let cpu_eu =
            PlacementNode::from_labels(&labels(&[("region", "eu"), ("device_class", "edge")]));
        let gpu_us = PlacementNode::from_labels(&labels(&[
            ("region", "us"),
            (skein_proto::ACCELERATOR_LABEL, "gpu"),
        ]));
        let bare = PlacementNode::from_labels(&BTreeMap::new());
        let any = Constraints::default();
        assert!([&cpu_eu, &gpu_us, &bare].iter().all(|n| allows(n, &any)));

        let regions = Constraints {
            regions: vec!["eu".into()],
            ..Constraints::default()
        };
        assert!(allows(&cpu_eu, &regions));
        assert!(!allows(&gpu_us, &regions) && !allows(&bare, &regions));

        let class = Constraints {
            device_class: "edge".into(),
            ..Constraints::default()
        };
        assert!(allows(&cpu_eu, &class));
        assert!(!allows(&gpu_us, &class) && !allows(&bare, &class));

        let gpu = Constraints {
            accelerator: Accelerator::Gpu,
            ..Constraints::default()
        };
        assert!(allows(&gpu_us, &gpu) && !allows(&cpu_eu, &gpu));

        // prefer-gpu: CPU nodes only while no allowed GPU node is alive.
        let mut prefer = Constraints {
            accelerator: Accelerator::PreferGpu,
            ..Constraints::default()
        };
        assert!(gpu_alive([&cpu_eu, &gpu_us], &prefer));
        prefer.gpu_alive = true;
        assert!(allows(&gpu_us, &prefer) && !allows(&cpu_eu, &prefer));
        prefer.gpu_alive = false;
        assert!(allows(&cpu_eu, &prefer));
        // A GPU node outside the allowed regions, or not alive, does not count.
        prefer.regions = vec!["eu".into()];
        assert!(!gpu_alive([&cpu_eu, &gpu_us], &prefer));
        let mut down = gpu_us.clone();
        down.healthy = false;
        assert!(!gpu_alive([&down], &Constraints::default()));

        // The node's own view: prefer-gpu never refuses it, gpu does.
        let settings = DeploymentSettings {
            accelerator: Accelerator::PreferGpu,
            ..DeploymentSettings::default()
        };
        assert!(labels_allow(&settings, &BTreeMap::new()));
        let settings = DeploymentSettings {
            accelerator: Accelerator::Gpu,
            regions: vec!["us".into()],
            ..DeploymentSettings::default()
        };
        assert!(labels_allow(
            &settings,
            &labels(&[("region", "us"), (skein_proto::ACCELERATOR_LABEL, "gpu")])
        ));
        assert!(!labels_allow(&settings, &labels(&[("region", "us")])));

        // Eligible for a new replica: allowed, healthy, not hosting, memory.
        let mut n = cpu_eu.clone();
        n.free_memory_bytes = 10;
        let need = Constraints {
            memory_bytes: 10,
            ..regions.clone()
        };
        assert!(eligible(&n, &need));
        n.hosts_replica = true;
        assert!(!eligible(&n, &need));
        n.hosts_replica = false;
        n.free_memory_bytes = 9;
        assert!(!eligible(&n, &need));
    }

    #[test]
    fn prefers_a_cached_artifact_unless_far() {
        let d = RoutingDefaults::default();
        let mut fetch = node(0, 0.0, "eu");
        fetch.artifact_cached = false;
        let cached = node(1, 2_000.0, "eu");
        let c = Constraints {
            artifact_bytes: 1 << 30, // ~86 s at 100 Mbit/s
            ..Constraints::default()
        };
        let o = &origins()[..1];
        assert_eq!(place(&[fetch.clone(), cached], o, &c, &d).unwrap().key, 1);
        // Cached but 400 ms away loses against a 4 s fetch (amortised over 20 calls).
        let far = node(1, 400_000.0, "eu");
        fetch.bandwidth_bps = Some(2e9);
        assert_eq!(place(&[fetch, far], o, &c, &d).unwrap().key, 0);
    }

    #[test]
    fn no_origins_and_extreme_inputs() {
        let d = RoutingDefaults::default();
        let mut a = node(0, f64::NAN, "eu");
        a.service_us = Some(f64::INFINITY);
        a.bandwidth_bps = Some(0.0);
        a.artifact_cached = false;
        let b = node(1, 1e300, "eu");
        let c = Constraints {
            artifact_bytes: u64::MAX,
            amortise_over: f64::NAN,
            ..Constraints::default()
        };
        let weird = [Origin {
            position: at(f64::INFINITY, "x"),
            weight: f64::NAN,
        }];
        for o in [&[][..], &weird[..], &origins()[..]] {
            let p = place(&[a.clone(), b.clone()], o, &c, &d).unwrap();
            assert!(p.score_us.is_finite() && p.score_us >= 0.0);
        }
    }

    #[test]
    fn origins_are_bounded_and_decay() {
        let mut o = Origins::new(2, 10_000_000);
        for _ in 0..10 {
            o.observe(0, &at(0.0, "eu"));
        }
        o.observe(0, &at(50_000.0, "us"));
        o.observe(0, &at(90_000.0, "ap")); // replaces "us", the lightest
        assert_eq!(o.len(), 2);
        let s = o.snapshot(0);
        assert!(s.iter().any(|x| x.position.region.as_deref() == Some("ap")));
        assert!(s.iter().all(|x| x.position.region.as_deref() != Some("us")));
        let later = o.snapshot(100_000_000);
        assert!(later.iter().all(|x| x.weight < 0.01));
        assert!(!o.is_empty());
    }

    #[test]
    fn a_model_only_some_engines_run_goes_only_to_their_nodes() {
        let labels = |engine: Option<&str>| {
            let mut l = BTreeMap::new();
            if let Some(e) = engine {
                l.insert(skein_proto::ENGINE_LABEL.to_string(), e.to_string());
            }
            l
        };
        let mut settings = DeploymentSettings::default();
        // No engine named: every node.
        for e in [None, Some("tract"), Some("ort")] {
            assert!(labels_allow(&settings, &labels(e)), "{e:?}");
        }
        settings.engines.engines = vec!["ort".into()];
        assert!(labels_allow(&settings, &labels(Some("ort"))));
        for e in [None, Some("tract"), Some("burn")] {
            assert!(!labels_allow(&settings, &labels(e)), "{e:?}");
        }
        let c = Constraints::for_deployment(&settings, 0);
        let mut n = PlacementNode::from_labels(&labels(Some("ort")));
        n.free_memory_bytes = GB;
        assert!(eligible(&n, &c));
        n.engine = Some("tract".into());
        assert!(!eligible(&n, &c));
    }
}
