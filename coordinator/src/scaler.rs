//! The autoscaler: demand per model version, replica count, placement near the callers,
//! predictive keep-alive and pre-warming. Every decision is skein-policy's, the same code the
//! simulator runs: `autoscale::step` per model version (rate, replicas, keep-alive plan,
//! keep-only, unload-idle, reason) and `placement::place` among the nodes `placement::allows`
//! (regions, device class, accelerator). This module only gathers the inputs, from the members
//! as [`NodeView`] shows them, and keeps the decisions, bounded. `tests/tests/same_decisions.rs`
//! checks that it decides what the simulator decides on the same trace.
//!
//! Inputs: nodes count arriving requests per model version and report the counters in
//! heartbeats (demand, inter-arrival times); resolves tell where callers are (origins).
//! Output, per model version: the nodes that keep a replica warm (`keep_warm` in heartbeat
//! answers: load now, never idle out), whether idle replicas elsewhere should unload now (the
//! policy expects no call before it could pre-warm again), and the reasons, shown by
//! `skein models`.

use crate::nodeview::NodeView;
use serde::{Deserialize, Serialize};
use skein_policy::autoscale::{step, ScaleConfig, ScaleState, StepInput};
use skein_policy::demand::{Demand, DemandConfig};
use skein_policy::placement::{place, weighted_rtt, Origins, PlacementNode};
use skein_policy::routing::{Position, RoutingDefaults};
use skein_proto::{ModelInfo, ModelState, NodeId, ScalingInfo};
use std::collections::HashMap;
use tokio::time::Instant;

/// Model versions tracked at most (the registry bounds them too).
const MAX_MODELS: usize = 4096;

/// Tuning of the autoscaler (`[scaling]` in the coordinator config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ScalingConfig {
    /// Width of one inter-arrival-time histogram bin, ms (default 60 000: the paper's minute).
    pub bin_width_ms: u64,
    /// Histogram bins (default 240: four hours).
    pub bins: usize,
    /// Inter-arrival times needed before the histogram decides (default 5).
    pub min_samples: u64,
    /// Target busy fraction of the replicas' slots (default 0.7).
    pub target_utilisation: f64,
    /// How fast the weight of a caller position fades, ms (default 600 000).
    pub origins_decay_ms: u64,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        ScalingConfig {
            bin_width_ms: 60_000,
            bins: 240,
            min_samples: 5,
            target_utilisation: 0.7,
            origins_decay_ms: 600_000,
        }
    }
}

impl ScalingConfig {
    /// The demand tracking of a model version whose deployment idles out after
    /// `idle_timeout_ms` (the keep-alive until the histogram has enough samples).
    pub fn demand_config(&self, idle_timeout_ms: u64) -> DemandConfig {
        DemandConfig {
            bin_width_us: self.bin_width_ms.max(1).saturating_mul(1000),
            bins: self.bins,
            min_samples: self.min_samples,
            fallback_keep_alive_us: idle_timeout_ms.saturating_mul(1000),
            ..DemandConfig::default()
        }
    }
}

/// What the autoscaler decided for one model version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Nodes that keep a replica warm.
    pub warm: Vec<NodeId>,
    /// Idle replicas elsewhere should unload now.
    pub unload_idle: bool,
    /// For `skein models`.
    pub info: ScalingInfo,
}

struct ModelScaling {
    demand: Demand,
    origins: Origins,
    state: ScaleState,
    /// Last `requests` counter per node, and when it was seen (µs).
    seen: HashMap<NodeId, (u64, u64)>,
    plan: Plan,
    /// A heartbeat reported calls after the plan was made: its `unload_idle` is stale until
    /// the next tick has seen them.
    called_since_plan: bool,
}

/// The autoscaler's state for every model version.
pub struct Scaler {
    cfg: ScalingConfig,
    epoch: Instant,
    models: HashMap<(String, String), ModelScaling>,
}

impl Scaler {
    /// An autoscaler with no history.
    pub fn new(cfg: ScalingConfig) -> Self {
        Self::starting_at(cfg, Instant::now())
    }

    /// An autoscaler with no history whose policy clock (µs, as skein-policy takes it) starts
    /// at `epoch`: tests drive it with instants `epoch + offset`.
    pub fn starting_at(cfg: ScalingConfig, epoch: Instant) -> Self {
        Scaler {
            cfg,
            epoch,
            models: HashMap::new(),
        }
    }

    fn now_us(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn entry(&mut self, name: &str, version: &str, idle_timeout_ms: u64) -> &mut ModelScaling {
        let key = (name.to_string(), version.to_string());
        if !self.models.contains_key(&key) && self.models.len() >= MAX_MODELS {
            // Forget the model called least recently.
            if let Some(old) = self
                .models
                .iter()
                .min_by_key(|(_, m)| m.demand.last_arrival_us().unwrap_or(0))
                .map(|(k, _)| k.clone())
            {
                self.models.remove(&old);
            }
        }
        let cfg = &self.cfg;
        self.models.entry(key).or_insert_with(|| ModelScaling {
            demand: Demand::new(cfg.demand_config(idle_timeout_ms)),
            origins: Origins::new(16, cfg.origins_decay_ms.max(1).saturating_mul(1000)),
            state: ScaleState::default(),
            seen: HashMap::new(),
            plan: Plan::default(),
            called_since_plan: false,
        })
    }

    /// Count the requests a heartbeat reports as new arrivals. Several arrivals between two
    /// heartbeats are spread evenly over the interval (the heartbeat is the resolution).
    pub fn observe_heartbeat(
        &mut self,
        node_id: &str,
        models: &[skein_proto::ModelStatus],
        idle_timeouts: &HashMap<(String, String), u64>,
        now: Instant,
    ) {
        let now_us = self.now_us(now);
        for s in models {
            let key = (s.name.clone(), s.version.clone());
            let Some(&idle_ms) = idle_timeouts.get(&key) else {
                continue;
            };
            let m = self.entry(&s.name, &s.version, idle_ms);
            let (before, since) = m.seen.get(node_id).copied().unwrap_or((0, now_us));
            // A node that restarted counts from zero again.
            let new = if s.requests >= before {
                s.requests - before
            } else {
                s.requests
            };
            m.seen.insert(node_id.to_string(), (s.requests, now_us));
            if new == 0 {
                continue;
            }
            m.called_since_plan = true;
            let last = now_us.saturating_sub(s.since_arrival_ms.unwrap_or(0).saturating_mul(1000));
            let first = since.min(last);
            let n = new.min(10_000);
            for i in 1..=n {
                let t = first + (last - first) * i / n;
                m.demand.observe(t);
            }
        }
    }

    /// Remember where a caller of `name`/`version` is.
    pub fn observe_caller(
        &mut self,
        name: &str,
        version: &str,
        idle_timeout_ms: u64,
        from: &Position,
        now: Instant,
    ) {
        let now_us = self.now_us(now);
        self.entry(name, version, idle_timeout_ms)
            .origins
            .observe(now_us, from);
    }

    /// Decide every model version's replicas and warm nodes from the members in `view`
    /// (`skein_policy::autoscale::step` per model version, then placement). `notice_us`: how
    /// long until a node hears of a decision (the heartbeat lead), added to the pre-warm lead.
    pub fn tick(
        &mut self,
        models: &[ModelInfo],
        view: &NodeView<'_>,
        notice_us: u64,
        now: Instant,
    ) {
        let now_us = self.now_us(now);
        let defaults = RoutingDefaults::default();
        let target_utilisation = self.cfg.target_utilisation;
        for model in models {
            let settings = &model.settings;
            let constraints = view.constraints(model);
            let m = self.entry(&model.name, &model.version, settings.idle_timeout_ms);
            // What the live nodes report for this version.
            // (id, placement view, hosts a replica, not yet loaded)
            let mut nodes: Vec<(&NodeId, PlacementNode, bool, bool)> = Vec::new();
            let (mut current, mut loading, mut queued, mut in_flight) = (0u32, 0u32, 0u32, 0u32);
            let (mut service_sum, mut service_n, mut load_us, mut concurrency) =
                (0.0, 0u32, 0u64, 1u32);
            for n in view.nodes() {
                // Only alive nodes the deployment's placement constraints allow (regions,
                // device class, accelerator) may hold a replica.
                if !n.alive() || !n.allowed(&constraints) {
                    continue;
                }
                let status = n.status(model);
                let hosts = n.hosts(model);
                if let Some(s) = status {
                    queued = queued.saturating_add(s.queue_depth);
                    in_flight = in_flight.saturating_add(s.in_flight);
                    if s.service_time_us > 0.0 {
                        service_sum += s.service_time_us;
                        service_n += 1;
                    }
                    load_us = load_us.max(s.load_time_us);
                    concurrency = concurrency.max(s.concurrency);
                }
                if hosts {
                    current += 1;
                    if status.is_some_and(|s| s.state != ModelState::Loaded) {
                        loading += 1;
                    }
                }
                nodes.push((
                    n.id,
                    n.placement_node(nodes.len(), model),
                    hosts,
                    status.is_none_or(|s| s.state != ModelState::Loaded),
                ));
            }
            // Placement breaks ties by input order: the view's node id order.
            let service_us = if service_n > 0 {
                service_sum / service_n as f64
            } else {
                defaults.service_us
            };
            let load_us = if load_us > 0 {
                load_us
            } else {
                defaults.load_us as u64
            };
            let scale_cfg = ScaleConfig {
                min_replicas: settings.min_replicas,
                max_replicas: settings.max_replicas,
                target_utilisation,
                concurrency_per_replica: if settings.max_concurrency > 0 {
                    settings.max_concurrency
                } else {
                    concurrency
                },
                ..ScaleConfig::default()
            };
            let keep = m.demand.keep_alive();
            let input = StepInput {
                current,
                loading,
                queued,
                in_flight,
                service_us,
                load_us,
                artifact_bytes: model.size,
                // Load ahead of the predicted next call: the replica must be ready then, and
                // a node hears of it at its next heartbeat.
                notice_us,
            };
            let step = step(&scale_cfg, &mut m.state, &m.demand, &keep, &input, now_us);
            let reason = step.target.reason;
            let unload_idle = step.target.unload_idle;
            let target = step.target.replicas as usize;
            let hold = step.hold as usize;
            let warm_plan = step.warm;
            // Warm nodes: replicas that exist, nearest to the callers first, then new ones
            // where placement puts them.
            let origins = m.origins.snapshot(now_us);
            // Stable first: nodes already in the plan, then loaded before loading, then the
            // nearest to the callers, then by id (as the provisioning fallback orders them).
            let mut holders: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].2).collect();
            let planned = |i: usize| !m.plan.warm.contains(nodes[i].0);
            holders.sort_by(|&a, &b| {
                planned(a)
                    .cmp(&planned(b))
                    .then_with(|| nodes[a].3.cmp(&nodes[b].3))
                    .then_with(|| {
                        weighted_rtt(&origins, &nodes[a].1.position)
                            .total_cmp(&weighted_rtt(&origins, &nodes[b].1.position))
                    })
                    .then_with(|| nodes[a].0.cmp(nodes[b].0))
            });
            let mut chosen: Vec<usize> = holders.into_iter().take(hold).collect();
            let mut placement_reason = String::new();
            // Under "keep" the step holds only replicas that exist (and min_replicas): a node
            // that evicted an idle replica for memory is not told to load it straight back.
            while chosen.len() < hold {
                let candidates: Vec<PlacementNode> = nodes
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !chosen.contains(i))
                    .map(|(_, n)| n.1.clone())
                    .collect();
                match place(&candidates, &origins, &constraints, &defaults) {
                    Some(p) => {
                        placement_reason = p.reason;
                        chosen.push(p.key);
                    }
                    None => break,
                }
            }
            let warm: Vec<NodeId> = chosen.iter().map(|&i| nodes[i].0.clone()).collect();
            let info = ScalingInfo {
                desired_replicas: target as u32,
                warm_nodes: warm.clone(),
                reason,
                keep_alive: keep.reason.clone(),
                prewarm: format!(
                    "{}{}",
                    warm_plan.reason,
                    if placement_reason.is_empty() {
                        String::new()
                    } else {
                        format!("; placed on {placement_reason}")
                    }
                ),
            };
            if info.desired_replicas != m.plan.info.desired_replicas
                || warm != m.plan.warm
                || unload_idle != m.plan.unload_idle
            {
                tracing::info!(
                    model = %model.name,
                    version = %model.version,
                    desired = target,
                    ?warm,
                    unload_idle,
                    reason = %info.reason,
                    keep_alive = %info.keep_alive,
                    prewarm = %info.prewarm,
                    "scaling decision"
                );
            }
            m.plan = Plan {
                warm,
                unload_idle,
                info,
            };
            m.called_since_plan = false;
        }
        // Forget versions no longer deployed.
        self.models
            .retain(|(n, v), _| models.iter().any(|m| &m.name == n && &m.version == v));
    }

    /// The current plan for a model version, if the autoscaler has made one.
    pub fn plan(&self, name: &str, version: &str) -> Option<&Plan> {
        self.models
            .get(&(name.to_string(), version.to_string()))
            .map(|m| &m.plan)
    }

    /// Whether idle replicas of a model version should unload now: the plan says so and no
    /// heartbeat has reported a call since it was made (a replica loaded for a call the plan
    /// has not seen yet must not be unloaded by it).
    pub fn unload_idle(&self, name: &str, version: &str) -> bool {
        self.models
            .get(&(name.to_string(), version.to_string()))
            .is_some_and(|m| m.plan.unload_idle && !m.called_since_plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{Membership, Thresholds};
    use skein_proto::{Capacity, Heartbeat, ModelStatus};
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn model() -> ModelInfo {
        ModelInfo {
            name: "m".into(),
            version: "1".into(),
            sha256: "00".into(),
            size: 3,
            created_unix_ms: 1,
            owner: "root".into(),
            ..ModelInfo::default()
        }
    }

    fn status(requests: u64) -> ModelStatus {
        ModelStatus {
            name: "m".into(),
            version: "1".into(),
            state: ModelState::Loaded,
            queue_depth: 0,
            in_flight: 0,
            concurrency: 1,
            service_time_us: 1_000.0,
            load_time_us: 10_000,
            cold_starts: 1,
            idle_ms: Some(1),
            memory_bytes: 1 << 20,
            runs: requests,
            requests,
            since_arrival_ms: Some(1),
        }
    }

    #[test]
    fn a_call_the_plan_has_not_seen_holds_back_its_unload() {
        let t = Thresholds {
            suspect_after: Duration::from_secs(3),
            dead_after: Duration::from_secs(6),
        };
        let models = vec![model()];
        let timeouts = HashMap::from([(("m".to_string(), "1".to_string()), 300_000)]);
        let mut membership = Membership::default();
        let mut scaler = Scaler::new(ScalingConfig::default());
        let t0 = Instant::now();
        let hb = |requests| Heartbeat {
            addr: "127.0.0.1:1".into(),
            capacity: Capacity::default(),
            labels: BTreeMap::new(),
            models: vec![status(requests)],
            seq: 0,
            draining: false,
            coordinate: None,
            ingress: None,
            usage_unsent: 0,
            peer: None,
            cached: Vec::new(),
        };
        membership.heartbeat("n1", "h", hb(0), None, t0);
        scaler.observe_heartbeat("n1", &[status(0)], &timeouts, t0);
        scaler.tick(&models, &NodeView::new(&membership, t0, t), 0, t0);
        assert!(
            scaler.unload_idle("m", "1"),
            "never called: idle replicas go"
        );

        // The node served a call and says so before the next tick: the old plan must not
        // unload the replica that was loaded for it.
        let t1 = t0 + Duration::from_millis(100);
        scaler.observe_heartbeat("n1", &[status(1)], &timeouts, t1);
        membership.heartbeat("n1", "h", hb(1), None, t1);
        assert!(scaler.plan("m", "1").is_some_and(|p| p.unload_idle));
        assert!(!scaler.unload_idle("m", "1"));

        // The next tick has seen the call: the replica is kept within its keep-alive.
        scaler.tick(&models, &NodeView::new(&membership, t1, t), 0, t1);
        assert!(!scaler.unload_idle("m", "1"));
        assert!(scaler.plan("m", "1").is_some_and(|p| !p.unload_idle));
        assert!(!scaler.unload_idle("other", "1"));
    }
}
