//! Nodes as the coordinator sees them: heartbeats, capacity, load and health.
//!
//! Soft state: rebuilt from heartbeats after a coordinator restart. Health is a pure function
//! of the time since the last heartbeat, computed when asked.
//!
//! What every heartbeat asks of it is independent of the mesh's size: the members are kept in
//! insertion order so probe peers are drawn by index, and the holders of each artifact are
//! indexed, so neither pre-warm staggering nor `ArtifactSources` scans every member.

use indexmap::IndexMap;
use skein_policy::vivaldi::CoordinateExt;
use skein_proto::{
    Capacity, Coordinate, Heartbeat, ModelState, ModelStatus, NodeHealth, NodeId, NodeInfo, Peer,
    PeerReport, PeerRoute,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use tokio::time::Instant;

/// One member of the mesh.
#[derive(Debug, Clone)]
pub struct Member {
    /// Host name given at join.
    pub hostname: String,
    /// Infer address.
    pub addr: String,
    /// Last heartbeat received.
    pub last_seen: Instant,
    /// Hardware offered.
    pub capacity: Capacity,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Models and load.
    pub models: Vec<ModelStatus>,
    /// Shutting down: finishing its requests, taking no new ones.
    pub draining: bool,
    /// Its network coordinate, as last reported.
    pub coordinate: Option<Coordinate>,
    /// The coordinator's own round trip to it, µs: the smoothed RTT of its control
    /// connection, read at every heartbeat (`None` until measured). What a caller next to the
    /// coordinator can expect, before any coordinate has settled.
    pub rtt_us: Option<f64>,
    /// Its HTTP ingress address, as last reported.
    pub ingress: Option<String>,
    /// Usage records it holds unsent, as last reported.
    pub usage_unsent: u64,
    /// Its peer layer as last reported (its binding checked by the heartbeat handler).
    pub peer: Option<PeerReport>,
    /// Artifacts complete in its cache (hex sha256), as last reported (bounded).
    pub cached: Vec<String>,
}

impl Member {
    /// Its `site` label (an edge site: nodes on one LAN), when it has one. Peer-to-peer
    /// artifact fetches stay within a site, and pre-warms are staggered per site.
    pub fn site(&self) -> Option<&str> {
        self.labels.get("site").map(String::as_str)
    }

    /// How callers reach it through the peer layer, from its last report: its bound PeerId,
    /// the addresses it listens on and was seen at, its relay circuit.
    pub fn peer_route(&self) -> Option<PeerRoute> {
        let p = self.peer.as_ref()?;
        let mut addrs: Vec<String> = Vec::new();
        for a in p.listen.iter().chain(&p.observed) {
            if !addrs.contains(a) && !a.contains("/p2p-circuit") {
                addrs.push(a.clone());
            }
        }
        Some(PeerRoute {
            peer_id: p.binding.peer_id.clone(),
            addrs,
            relayed: p.relayed.clone(),
            reachability: p.reachability.clone(),
        })
    }
}

/// Thresholds of the failure detector.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// Silent this long: suspect.
    pub suspect_after: Duration,
    /// Silent this long: dead.
    pub dead_after: Duration,
}

/// The membership table.
#[derive(Debug, Default)]
pub struct Membership {
    nodes: IndexMap<NodeId, Member>,
    /// Who holds each artifact complete (hex sha256 → node ids): the members' `cached`
    /// lists, inverted, kept in step with them.
    holders: HashMap<String, BTreeSet<NodeId>>,
}

impl Membership {
    /// Apply a heartbeat from `node_id` received at `now` over a connection whose measured
    /// round trip is `rtt` (kept from the last heartbeat when `None` or zero).
    pub fn heartbeat(
        &mut self,
        node_id: &str,
        hostname: &str,
        hb: Heartbeat,
        rtt: Option<Duration>,
        now: Instant,
    ) {
        let rtt_us = rtt
            .filter(|r| !r.is_zero())
            .map(|r| r.as_secs_f64() * 1e6)
            .or_else(|| self.nodes.get(node_id).and_then(|m| m.rtt_us));
        let cached: Vec<String> = hb
            .cached
            .into_iter()
            .take(skein_proto::MAX_CACHED_REPORTED)
            .collect();
        // Usually the same list as last time: the index changes only when the cache did.
        if self.nodes.get(node_id).map(|m| &m.cached) != Some(&cached) {
            self.unindex(node_id);
            for sha256 in &cached {
                self.holders
                    .entry(sha256.clone())
                    .or_default()
                    .insert(node_id.to_string());
            }
        }
        self.nodes.insert(
            node_id.to_string(),
            Member {
                hostname: hostname.to_string(),
                addr: hb.addr,
                last_seen: now,
                capacity: hb.capacity,
                labels: hb.labels,
                models: hb.models,
                draining: hb.draining,
                coordinate: hb.coordinate.filter(|c| c.is_valid()),
                rtt_us,
                ingress: hb.ingress,
                usage_unsent: hb.usage_unsent,
                peer: hb.peer.map(|p| *p),
                cached,
            },
        );
    }

    /// Take `node_id`'s artifacts out of the holders index.
    fn unindex(&mut self, node_id: &str) {
        let Some(m) = self.nodes.get(node_id) else {
            return;
        };
        for sha256 in &m.cached {
            if let Some(set) = self.holders.get_mut(sha256) {
                set.remove(node_id);
                if set.is_empty() {
                    self.holders.remove(sha256);
                }
            }
        }
    }

    /// The members that hold artifact `sha256` complete, as last reported (any health), by
    /// node id.
    pub fn holders_of<'a>(
        &'a self,
        sha256: &str,
    ) -> impl Iterator<Item = (&'a NodeId, &'a Member)> {
        self.holders
            .get(sha256)
            .into_iter()
            .flatten()
            .filter_map(|id| self.nodes.get_key_value(id))
    }

    /// Whether `node_id` reported artifact `sha256` complete in its cache.
    pub fn holds(&self, node_id: &str, sha256: &str) -> bool {
        self.holders
            .get(sha256)
            .is_some_and(|set| set.contains(node_id))
    }

    /// Health of a member at `now`.
    pub fn health(m: &Member, now: Instant, t: Thresholds) -> NodeHealth {
        let silent = now.saturating_duration_since(m.last_seen);
        if silent >= t.dead_after {
            NodeHealth::Dead
        } else if m.draining {
            NodeHealth::Draining
        } else if silent >= t.suspect_after {
            NodeHealth::Suspect
        } else {
            NodeHealth::Alive
        }
    }

    /// One member.
    pub fn member(&self, node_id: &str) -> Option<&Member> {
        self.nodes.get(node_id)
    }

    /// Up to `n` alive members other than `node_id`, chosen at random, for RTT probes.
    ///
    /// Every heartbeat asks, so this draws at most `4 n` distinct members by index instead of
    /// scanning all of them; in a mesh where most members are alive that finds `n`, and where
    /// it finds fewer the next heartbeat draws again.
    pub fn probe_peers(
        &self,
        node_id: &str,
        n: usize,
        now: Instant,
        t: Thresholds,
        rng: &mut impl rand::Rng,
    ) -> Vec<Peer> {
        let len = self.nodes.len();
        let draws = n.saturating_mul(4).min(len);
        rand::seq::index::sample(rng, len, draws)
            .into_iter()
            .filter_map(|i| self.nodes.get_index(i))
            .filter(|(id, m)| {
                id.as_str() != node_id && Self::health(m, now, t) == NodeHealth::Alive
            })
            .take(n)
            .map(|(id, m)| Peer {
                node_id: id.clone(),
                addr: m.addr.clone(),
                coordinate: m.coordinate.clone(),
            })
            .collect()
    }

    /// Members, with their ids.
    pub fn members(&self) -> impl Iterator<Item = (&NodeId, &Member)> {
        self.nodes.iter()
    }

    /// Snapshot for `skein nodes`, sorted by id.
    pub fn infos(&self, now: Instant, t: Thresholds) -> Vec<NodeInfo> {
        let mut out: Vec<NodeInfo> = self
            .nodes
            .iter()
            .map(|(id, m)| NodeInfo {
                node_id: id.clone(),
                hostname: m.hostname.clone(),
                addr: m.addr.clone(),
                health: Self::health(m, now, t),
                last_seen_ms: now.saturating_duration_since(m.last_seen).as_millis() as u64,
                capacity: m.capacity.clone(),
                labels: m.labels.clone(),
                models: m.models.clone(),
                coordinate: m.coordinate.clone(),
                ingress: m.ingress.clone(),
                usage_unsent: m.usage_unsent,
                peer: m.peer.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    /// Nodes (alive or suspect) where `model`/`version` is loaded.
    pub fn loaded_on(
        &self,
        model: &str,
        version: &str,
        now: Instant,
        t: Thresholds,
    ) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, m)| Self::health(m, now, t) != NodeHealth::Dead)
            .filter(|(_, m)| {
                m.models.iter().any(|s| {
                    s.name == model && s.version == version && s.state == ModelState::Loaded
                })
            })
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// The `n` alive nodes that keep `model`/`version` warm: those already holding it first,
    /// then by node id, so the choice is stable.
    pub fn warm_set(
        &self,
        model: &str,
        version: &str,
        n: usize,
        now: Instant,
        t: Thresholds,
    ) -> Vec<NodeId> {
        if n == 0 {
            return Vec::new();
        }
        let mut alive: Vec<(bool, &NodeId)> = self
            .nodes
            .iter()
            .filter(|(_, m)| Self::health(m, now, t) == NodeHealth::Alive)
            .map(|(id, m)| {
                let holds = m.models.iter().any(|s| {
                    s.name == model
                        && s.version == version
                        && matches!(
                            s.state,
                            ModelState::Loaded | ModelState::Loading | ModelState::Fetching
                        )
                });
                (!holds, id)
            })
            .collect();
        alive.sort();
        alive
            .into_iter()
            .take(n)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Fill the replica view of `m` (warm, loading, cold starts, per node) from heartbeats.
    pub fn fill_replicas(&self, m: &mut skein_proto::ModelInfo, now: Instant, t: Thresholds) {
        m.loaded_on = self.loaded_on(&m.name, &m.version, now, t);
        m.replicas.clear();
        m.warm_replicas = 0;
        m.loading_replicas = 0;
        m.cold_starts = 0;
        let mut ids: Vec<&NodeId> = self.nodes.keys().collect();
        ids.sort();
        for id in ids {
            let node = &self.nodes[id];
            let dead = Self::health(node, now, t) == NodeHealth::Dead;
            for s in node
                .models
                .iter()
                .filter(|s| s.name == m.name && s.version == m.version)
            {
                m.cold_starts += s.cold_starts;
                if dead {
                    continue;
                }
                match s.state {
                    ModelState::Loaded => m.warm_replicas += 1,
                    ModelState::Loading | ModelState::Fetching => m.loading_replicas += 1,
                    _ => {}
                }
                m.replicas.push(skein_proto::ReplicaInfo {
                    node: id.clone(),
                    state: s.state.clone(),
                    queue_depth: s.queue_depth,
                    in_flight: s.in_flight,
                    idle_ms: s.idle_ms,
                    memory_bytes: s.memory_bytes,
                    cold_starts: s.cold_starts,
                    runs: s.runs,
                });
            }
        }
    }

    /// Forget a member at once (a revoked node).
    pub fn remove(&mut self, node_id: &str) -> bool {
        self.unindex(node_id);
        self.nodes.swap_remove(node_id).is_some()
    }

    /// Forget members dead for longer than `forget_after`, bounding the table.
    pub fn prune(&mut self, now: Instant, forget_after: Duration) {
        let gone: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.last_seen) >= forget_after)
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb() -> Heartbeat {
        Heartbeat {
            addr: "127.0.0.1:1".into(),
            capacity: Capacity::default(),
            labels: BTreeMap::new(),
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

    #[test]
    fn silent_nodes_become_suspect_then_dead() {
        let t = Thresholds {
            suspect_after: Duration::from_secs(3),
            dead_after: Duration::from_secs(6),
        };
        let mut m = Membership::default();
        let t0 = Instant::now();
        m.heartbeat("n1", "h", hb(), None, t0);
        let health = |m: &Membership, at| m.infos(at, t)[0].health;
        assert_eq!(health(&m, t0 + Duration::from_secs(2)), NodeHealth::Alive);
        assert_eq!(health(&m, t0 + Duration::from_secs(3)), NodeHealth::Suspect);
        assert_eq!(health(&m, t0 + Duration::from_secs(6)), NodeHealth::Dead);
        m.heartbeat("n1", "h", hb(), None, t0 + Duration::from_secs(7));
        assert_eq!(health(&m, t0 + Duration::from_secs(7)), NodeHealth::Alive);
        m.prune(t0 + Duration::from_secs(100), Duration::from_secs(60));
        assert!(m.infos(t0, t).is_empty());
    }

    #[test]
    fn nodes_list_the_usage_a_node_holds_unsent() {
        let t = Thresholds {
            suspect_after: Duration::from_secs(3),
            dead_after: Duration::from_secs(6),
        };
        let mut m = Membership::default();
        let t0 = Instant::now();
        m.heartbeat(
            "n1",
            "h",
            Heartbeat {
                usage_unsent: 17,
                ..hb()
            },
            None,
            t0,
        );
        assert_eq!(m.infos(t0, t)[0].usage_unsent, 17);
        m.heartbeat("n1", "h", hb(), None, t0);
        assert_eq!(m.infos(t0, t)[0].usage_unsent, 0);
    }

    fn holding(cached: &[&str]) -> Heartbeat {
        Heartbeat {
            cached: cached.iter().map(|c| c.to_string()).collect(),
            ..hb()
        }
    }

    fn holders(m: &Membership, sha256: &str) -> Vec<String> {
        m.holders_of(sha256).map(|(id, _)| id.clone()).collect()
    }

    #[test]
    fn the_holders_index_follows_heartbeats_removals_and_pruning() {
        let mut m = Membership::default();
        let t0 = Instant::now();
        m.heartbeat("n1", "h", holding(&["aa", "bb"]), None, t0);
        m.heartbeat("n2", "h", holding(&["bb"]), None, t0);
        assert_eq!(holders(&m, "aa"), ["n1"]);
        assert_eq!(holders(&m, "bb"), ["n1", "n2"]);
        assert!(m.holds("n2", "bb") && !m.holds("n2", "aa"));
        // A newer report replaces the older one: evicted artifacts leave the index.
        m.heartbeat("n1", "h", holding(&["cc"]), None, t0);
        assert!(holders(&m, "aa").is_empty());
        assert_eq!(holders(&m, "bb"), ["n2"]);
        assert_eq!(holders(&m, "cc"), ["n1"]);
        assert!(m.remove("n2"));
        assert!(holders(&m, "bb").is_empty());
        m.heartbeat(
            "n3",
            "h",
            holding(&["cc"]),
            None,
            t0 + Duration::from_secs(50),
        );
        m.prune(t0 + Duration::from_secs(70), Duration::from_secs(60));
        assert_eq!(holders(&m, "cc"), ["n3"]);
        assert!(m.member("n1").is_none());
        // Nothing is left behind for artifacts nobody holds.
        assert_eq!(m.holders.len(), 1);
    }

    #[test]
    fn probe_peers_are_distinct_alive_others_drawn_at_random() {
        let t = Thresholds {
            suspect_after: Duration::from_secs(3),
            dead_after: Duration::from_secs(6),
        };
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut m = Membership::default();
        let base = Instant::now();
        let t0 = base + Duration::from_secs(10);
        for i in 0..100u32 {
            // Every other member has been silent long enough to be dead.
            let at = if i.is_multiple_of(2) { t0 } else { base };
            m.heartbeat(&format!("n{i}"), "h", hb(), None, at);
        }
        let mut seen = BTreeSet::new();
        for _ in 0..50 {
            let peers = m.probe_peers("n0", 8, t0, t, &mut rng);
            assert!(peers.len() <= 8);
            let ids: BTreeSet<&str> = peers.iter().map(|p| p.node_id.as_str()).collect();
            assert_eq!(ids.len(), peers.len(), "distinct");
            for id in ids {
                let n: usize = id[1..].parse().unwrap();
                assert!(
                    n != 0 && n.is_multiple_of(2),
                    "{id}: alive and not the asker"
                );
                seen.insert(n);
            }
        }
        // Drawn from the whole table, not from a fixed few.
        assert!(seen.len() > 30, "{} distinct peers in 50 draws", seen.len());
        // A small mesh: everyone else.
        let mut small = Membership::default();
        for i in 0..3 {
            small.heartbeat(&format!("n{i}"), "h", hb(), None, t0);
        }
        assert_eq!(small.probe_peers("n0", 8, t0, t, &mut rng).len(), 2);
    }
}
