//! The members as skein-policy sees them, built once per resolve or scaling tick.
//!
//! [`NodeView`] takes the membership table at one instant (health of every node, sorted by
//! id) and turns each member's heartbeat into the policy inputs: its [`Position`], the routing
//! view of one model version ([`NodeLoad`]), the placement view ([`PlacementNode`]) and the
//! placement [`Constraints`] of a deployment (with `prefer-gpu`'s "is an allowed GPU node
//! alive"). `resolve` and the scaler's `tick` both read the members only through it, so the
//! two see a node the same way, and whether a node may hold a model is
//! `skein_policy::placement::allows`/`eligible` for both.
//!
//! [`CallerPlace`] is where a resolving caller is ([`NodeView::caller`]) and
//! [`CallerPlace::rtt_to`] its RTT estimate to one node with where the estimate came from.

use crate::membership::{Member, Membership, Thresholds};
use skein_policy::placement::{self, Constraints, PlacementNode};
use skein_policy::routing::{self, NodeLoad, Position, RelayCost, RttEvidence, RttSource};
use skein_policy::vivaldi::CoordinateExt;
use skein_proto::{
    Accelerator, CallerPosition, Coordinate, ModelInfo, ModelState, ModelStatus, NodeHealth,
};
use skein_proto::{ErrorCode, NodeId, WireError};
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// RTT samples from one caller that are looked at.
const MAX_SAMPLES: usize = 32;

/// One member at the instant of the view.
#[derive(Debug)]
pub struct ViewNode<'a> {
    /// Its id.
    pub id: &'a NodeId,
    /// What its last heartbeat said.
    pub member: &'a Member,
    /// Its health at the instant of the view.
    pub health: NodeHealth,
    /// Where it is: coordinate, region and zone labels; device class, GPU.
    placement: PlacementNode,
}

impl<'a> ViewNode<'a> {
    /// Alive: heartbeats on time and not draining.
    pub fn alive(&self) -> bool {
        self.health == NodeHealth::Alive
    }

    /// Where the node is.
    pub fn position(&self) -> &Position {
        &self.placement.position
    }

    /// Callers reach the node through a circuit relay: it reports itself behind NAT and holds
    /// a relay circuit (until a caller's hole punch makes a direct path).
    pub fn behind_relay(&self) -> bool {
        self.member
            .peer
            .as_ref()
            .is_some_and(|p| p.reachability == "nat" && !p.relayed.is_empty())
    }

    /// What the node reports of `model`'s version, if anything.
    pub fn status(&self, model: &ModelInfo) -> Option<&'a ModelStatus> {
        self.member
            .models
            .iter()
            .find(|s| s.name == model.name && s.version == model.version)
    }

    /// The node holds a replica of `model`: loaded, loading or fetching.
    pub fn hosts(&self, model: &ModelInfo) -> bool {
        self.status(model).is_some_and(|s| {
            matches!(
                s.state,
                ModelState::Loaded | ModelState::Loading | ModelState::Fetching
            )
        })
    }

    /// The deployment's constraints allow the node to hold and serve `c`'s model
    /// ([`placement::allows`]).
    pub fn allowed(&self, c: &Constraints) -> bool {
        placement::allows(&self.placement, c)
    }

    /// The routing view of `model` on this node, at `rtt_us` from the caller; `relay`: what
    /// crossing a relay adds, for a node [behind a relay](Self::behind_relay).
    pub fn node_load(
        &self,
        key: usize,
        model: &ModelInfo,
        c: &Constraints,
        rtt_us: f64,
        relay: RelayCost,
    ) -> NodeLoad {
        let status = self.status(model);
        let state = status.map(|s| &s.state);
        NodeLoad {
            key,
            healthy: self.alive(),
            can_serve: !matches!(state, Some(ModelState::Failed(_))),
            loaded: matches!(state, Some(ModelState::Loaded)),
            queued: status.map_or(0, |s| s.queue_depth),
            in_flight: status.map_or(0, |s| s.in_flight),
            concurrency: status.map_or(1, |s| s.concurrency),
            service_us: status.and_then(|s| (s.service_time_us > 0.0).then_some(s.service_time_us)),
            load_us: status.and_then(|s| (s.load_time_us > 0).then_some(s.load_time_us as f64)),
            rtt_us: Some(rtt_us),
            // A node reports a model once it holds its artifact (on disk or loaded).
            artifact_cached: status.is_some_and(|s| !matches!(s.state, ModelState::Fetching)),
            artifact_bytes: model.size,
            allowed: self.allowed(c),
            relay: self.behind_relay().then_some(relay),
            ..NodeLoad::default()
        }
    }

    /// The placement view of `model` on this node (free memory after every model it holds,
    /// whether it hosts a replica, measured load and service times).
    pub fn placement_node(&self, key: usize, model: &ModelInfo) -> PlacementNode {
        let status = self.status(model);
        let used: u64 = self.member.models.iter().map(|s| s.memory_bytes).sum();
        PlacementNode {
            key,
            healthy: self.alive(),
            free_memory_bytes: self.member.capacity.memory_bytes.saturating_sub(used),
            hosts_replica: self.hosts(model),
            artifact_cached: status.is_some_and(|s| !matches!(s.state, ModelState::Fetching)),
            load_us: status.and_then(|s| (s.load_time_us > 0).then_some(s.load_time_us as f64)),
            service_us: status.and_then(|s| (s.service_time_us > 0.0).then_some(s.service_time_us)),
            queued: status.map_or(0, |s| s.queue_depth + s.in_flight),
            ..self.placement.clone()
        }
    }
}

/// Every member at one instant, sorted by node id.
#[derive(Debug)]
pub struct NodeView<'a> {
    nodes: Vec<ViewNode<'a>>,
}

impl<'a> NodeView<'a> {
    /// The members of `membership` at `now`.
    pub fn new(membership: &'a Membership, now: Instant, t: Thresholds) -> Self {
        let mut nodes: Vec<ViewNode<'a>> = membership
            .members()
            .map(|(id, m)| {
                let mut placement = PlacementNode::from_labels(&m.labels);
                placement.position.coordinate = m.coordinate.clone();
                ViewNode {
                    id,
                    member: m,
                    health: Membership::health(m, now, t),
                    placement,
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(b.id));
        NodeView { nodes }
    }

    /// The members, by node id.
    pub fn nodes(&self) -> &[ViewNode<'a>] {
        &self.nodes
    }

    /// One member.
    pub fn get(&self, id: &str) -> Option<&ViewNode<'a>> {
        self.nodes
            .binary_search_by(|n| n.id.as_str().cmp(id))
            .ok()
            .map(|i| &self.nodes[i])
    }

    /// The placement constraints of `model`'s deployment, with `gpu_alive` from this view
    /// (some alive GPU node that the regions and device class allow; only looked for under
    /// `prefer-gpu`).
    pub fn constraints(&self, model: &ModelInfo) -> Constraints {
        let mut c = Constraints::for_deployment(&model.settings, model.size);
        if c.accelerator == Accelerator::PreferGpu {
            c.gpu_alive = placement::gpu_alive(
                self.nodes
                    .iter()
                    .filter(|n| n.alive())
                    .map(|n| &n.placement),
                &c,
            );
        }
        c
    }

    /// Where a resolving caller at `pos` is. `own` is the coordinator's coordinate and
    /// `access` the caller's round trip to the coordinator.
    ///
    /// `pos.near` ranks as if the caller sat at that node (an unknown node is an error).
    /// A caller with no settled coordinate of its own (a new process, a CLI call) that does not
    /// say where it is (no region or zone) is taken to sit at the coordinator: the
    /// coordinator's own measured RTT to each node applies, and it is placed at the
    /// coordinator's coordinate on an access link as long as `access`. One that names its
    /// region or zone is ranked by those labels instead (it may be far from the coordinator).
    pub fn caller<'p>(
        &self,
        pos: &'p CallerPosition,
        own: &Coordinate,
        access: Duration,
    ) -> Result<CallerPlace<'p>, WireError>
    where
        'a: 'p,
    {
        let near = pos
            .near
            .as_ref()
            .map(|id| {
                self.get(id).ok_or_else(|| {
                    WireError::new(
                        ErrorCode::UnknownNode,
                        format!("no node `{id}` in this mesh"),
                    )
                })
            })
            .transpose()?;
        let at_coordinator = near.is_none()
            && !pos.coordinate.as_ref().is_some_and(|c| c.settled())
            && pos.region.is_none()
            && pos.zone.is_none();
        let access_us = access.as_secs_f64() * 1e6;
        let coordinate = match (near, &pos.coordinate) {
            (Some(n), _) => n.member.coordinate.clone(),
            (None, Some(c)) if c.settled() => Some(c.clone()),
            // A caller taken to sit at the coordinator is placed at its coordinate, on an access
            // link as long as the RTT the coordinator measures to it (used where the
            // coordinator has no measurement of a node yet).
            _ if at_coordinator && own.settled() => {
                let mut c = own.clone();
                c.height += access_us;
                Some(c)
            }
            _ => pos.coordinate.clone(),
        };
        let position = Position {
            coordinate,
            region: near
                .and_then(|n| n.position().region.clone())
                .or_else(|| pos.region.clone()),
            zone: near
                .and_then(|n| n.position().zone.clone())
                .or_else(|| pos.zone.clone()),
        };
        let samples = if near.is_some() {
            HashMap::new()
        } else {
            pos.rtt_samples
                .iter()
                .take(MAX_SAMPLES)
                .filter(|s| s.rtt_us > 0)
                .map(|s| (s.node_id.as_str(), s.rtt_us))
                .collect()
        };
        Ok(CallerPlace {
            position,
            near: near.map(|n| n.id.clone()),
            at_coordinator,
            samples,
            access_us,
        })
    }
}

/// Whether `model`'s deployment allows node `node_id` of `membership` at `now` to hold and
/// serve it ([`ViewNode::allowed`] under [`NodeView::constraints`]), without building a whole
/// view: one node's labels, and the other members only under `prefer-gpu`.
pub fn allowed_on(
    membership: &Membership,
    node_id: &str,
    model: &ModelInfo,
    now: Instant,
    t: Thresholds,
) -> bool {
    let Some(me) = membership.member(node_id) else {
        return false;
    };
    let mut c = Constraints::for_deployment(&model.settings, model.size);
    if c.accelerator == Accelerator::PreferGpu {
        c.gpu_alive = membership.members().any(|(_, m)| {
            Membership::health(m, now, t) == NodeHealth::Alive
                && placement::gpu_alive([&PlacementNode::from_labels(&m.labels)], &c)
        });
    }
    placement::allows(&PlacementNode::from_labels(&me.labels), &c)
}

/// Where a resolving caller is, and what it measured ([`NodeView::caller`]).
#[derive(Debug, Clone)]
pub struct CallerPlace<'p> {
    /// Its position (for the ranking and the scaler's origins).
    pub position: Position,
    /// Ranked as if at this node (`skein route --near`).
    pub near: Option<NodeId>,
    /// Taken to sit at the coordinator (no settled coordinate, no region or zone).
    pub at_coordinator: bool,
    /// Its own recent RTT samples, µs, by node (none when ranked as if at a node).
    samples: HashMap<&'p str, u64>,
    /// Its round trip to the coordinator, µs.
    access_us: f64,
}

impl CallerPlace<'_> {
    /// The caller's RTT to `node`, µs, and where the estimate came from: 0 to the `near` node
    /// itself (as if at its coordinate), else [`routing::caller_rtt`]: the caller's own sample,
    /// then (for a caller at the coordinator) the coordinator's measured RTT to the node plus
    /// the access link, then coordinates, then labels. A node [behind a
    /// relay](ViewNode::behind_relay) is reached through it: the caller's access link plus
    /// the coordinator's measured RTT to the node (the relay is the coordinator's).
    pub fn rtt_to(&self, node: &ViewNode<'_>) -> (f64, RttSource) {
        if self.near.as_ref() == Some(node.id) {
            return (0.0, RttSource::Coordinates);
        }
        routing::caller_rtt(&RttEvidence {
            sample_us: self.samples.get(node.id.as_str()).map(|&s| s as f64),
            via_coordinator_us: node.member.rtt_us.filter(|_| self.at_coordinator),
            caller_access_us: self.access_us,
            relay_leg_us: node.member.rtt_us.filter(|_| node.behind_relay()),
            caller: Some(&self.position),
            node: Some(node.position()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_proto::{Capacity, DeploymentSettings, Heartbeat, RttSample};
    use std::collections::BTreeMap;

    const T: Thresholds = Thresholds {
        suspect_after: Duration::from_secs(3),
        dead_after: Duration::from_secs(6),
    };

    fn hb(labels: &[(&str, &str)]) -> Heartbeat {
        Heartbeat {
            addr: "127.0.0.1:1".into(),
            capacity: Capacity::default(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            models: vec![],
            seq: 0,
            draining: false,
            coordinate: None,
            ingress: None,
            usage_unsent: 0,
            peer: None,
            cached: Vec::new(),
        }
    }

    fn model(accelerator: Accelerator, regions: &[&str]) -> ModelInfo {
        ModelInfo {
            name: "m".into(),
            version: "1".into(),
            sha256: "00".into(),
            size: 3,
            created_unix_ms: 1,
            settings: DeploymentSettings {
                accelerator,
                regions: regions.iter().map(|r| r.to_string()).collect(),
                ..DeploymentSettings::default()
            },
            owner: "root".into(),
            ..ModelInfo::default()
        }
    }

    #[test]
    fn prefer_gpu_takes_cpu_nodes_only_while_no_allowed_gpu_node_is_alive() {
        let t0 = Instant::now();
        let mut m = Membership::default();
        m.heartbeat("cpu", "h", hb(&[("region", "eu")]), None, t0);
        m.heartbeat(
            "gpu",
            "h",
            hb(&[("region", "eu"), (skein_proto::ACCELERATOR_LABEL, "gpu")]),
            None,
            t0,
        );
        let prefer = model(Accelerator::PreferGpu, &[]);
        let allowed = |m: &Membership, at: Instant, model: &ModelInfo| -> Vec<&str> {
            let view = NodeView::new(m, at, T);
            let c = view.constraints(model);
            let mut out = Vec::new();
            for n in view.nodes() {
                // The one-node shortcut of the heartbeat answers agrees with the view.
                assert_eq!(allowed_on(m, n.id, model, at, T), n.allowed(&c));
                // Health is routing's and placement's other input, not part of the rule.
                if n.alive() && n.allowed(&c) {
                    out.push(if n.id == "cpu" { "cpu" } else { "gpu" });
                }
            }
            out
        };
        assert_eq!(allowed(&m, t0, &prefer), ["gpu"]);
        // A GPU node outside the allowed regions does not count.
        assert_eq!(
            allowed(&m, t0, &model(Accelerator::PreferGpu, &["us"])),
            [""; 0]
        );
        // The GPU node goes silent: the CPU node takes over; it comes back: GPU again.
        let later = t0 + Duration::from_secs(7);
        m.heartbeat("cpu", "h", hb(&[("region", "eu")]), None, later);
        assert_eq!(allowed(&m, later, &prefer), ["cpu"]);
        assert_eq!(allowed(&m, later, &model(Accelerator::Gpu, &[])), [""; 0]);
        assert_eq!(
            allowed(&m, later, &model(Accelerator::Any, &["eu"])),
            ["cpu"]
        );
    }

    #[test]
    fn the_rtt_estimate_says_where_it_came_from() {
        let t0 = Instant::now();
        let mut m = Membership::default();
        m.heartbeat(
            "a",
            "h",
            hb(&[("region", "eu")]),
            Some(Duration::from_millis(4)),
            t0,
        );
        m.heartbeat("b", "h", hb(&[("region", "us")]), None, t0);
        let view = NodeView::new(&m, t0, T);
        let (a, b) = (&view.nodes()[0], &view.nodes()[1]);
        let own = Coordinate::origin(); // not settled
        let access = Duration::from_millis(1);

        // A fresh caller that says nothing sits at the coordinator: its measured RTT to `a`
        // plus the access link; nothing measured to `b`.
        let fresh = CallerPosition::default();
        let c = view.caller(&fresh, &own, access).unwrap();
        assert!(c.at_coordinator);
        assert_eq!(c.rtt_to(a), (5_000.0, RttSource::Coordinator));
        assert_eq!(c.rtt_to(b).1, RttSource::Default);

        // Its own sample beats everything.
        let sampled = CallerPosition {
            rtt_samples: vec![RttSample {
                node_id: "b".into(),
                rtt_us: 700,
            }],
            ..CallerPosition::default()
        };
        let c = view.caller(&sampled, &own, access).unwrap();
        assert_eq!(c.rtt_to(b), (700.0, RttSource::Sample));

        // A caller naming its region is ranked by labels.
        let labelled = CallerPosition {
            region: Some("eu".into()),
            ..CallerPosition::default()
        };
        let c = view.caller(&labelled, &own, access).unwrap();
        assert!(!c.at_coordinator);
        assert_eq!(c.rtt_to(a).1, RttSource::Labels);

        // `--near a`: at distance 0 from `a`, in its region, samples ignored.
        let near = CallerPosition {
            near: Some("a".into()),
            ..sampled
        };
        let c = view.caller(&near, &own, access).unwrap();
        assert_eq!(c.rtt_to(a), (0.0, RttSource::Coordinates));
        assert_eq!(c.position.region.as_deref(), Some("eu"));
        assert_eq!(c.rtt_to(b).1, RttSource::Labels);
        let unknown = CallerPosition {
            near: Some("zz".into()),
            ..CallerPosition::default()
        };
        let e = view.caller(&unknown, &own, access).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownNode);
    }
}
