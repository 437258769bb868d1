//! The coordinator's `skein/ctl` endpoint and the [`Coordinator`] handle.

use crate::access::{Access, Caller};
use crate::artifacts::{artifact_id, ArtifactStore};
use crate::config::CoordinatorConfig;
use crate::join_token::JoinToken;
use crate::membership::{Membership, Thresholds};
use crate::registry::{NodeRecord, Registry, TokenCheck};
use crate::scaler::Scaler;
use anyhow::Context;
use sha2::{Digest, Sha256};
use skein_net::endpoint::TransportLimits;
use skein_net::stream::{read_frame, write_frame};
use skein_net::tls::{pem_fingerprint, ClientAuth};
use skein_net::{Credentials, MeshCa};
use skein_policy::routing::{
    self, NodeLoad, Position, RouteRequest, RoutingDefaults, RttEvidence, RttSource, Strategy,
};
use skein_policy::vivaldi::{CoordinateExt, Vivaldi, VivaldiConfig};
use skein_proto::{
    AdminRequest, AdminResponse, Assignment, Candidate, CtlEnvelope, CtlRequest, CtlResponse,
    DeployRequest, ErrorCode, Heartbeat, HeartbeatAck, JoinRequest, Joined, ModelInfo, ModelState,
    NodeHealth, Resolution, ResolveRequest, SettingsPatch, WireError, ALPN_CTL,
};
use skein_store::Scope;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Concurrent uploads held in memory at once.
const MAX_CONCURRENT_UPLOADS: usize = 2;
/// Members dead this long are forgotten.
/// Peers each heartbeat answer offers a node to probe for RTT.
const PROBE_PEERS: usize = 4;
const FORGET_DEAD_AFTER: Duration = Duration::from_secs(600);
/// Chunk size when streaming artifacts.
const CHUNK: usize = 256 * 1024;

use crate::access::now_ms;

struct Shared {
    config: CoordinatorConfig,
    ca: MeshCa,
    registry: Mutex<Registry>,
    membership: Mutex<Membership>,
    store: ArtifactStore,
    uploads: Semaphore,
    /// The coordinator's own network coordinate, updated from every heartbeat's RTT.
    vivaldi: Mutex<Vivaldi>,
    /// Resolves answered (the tick of the routing order).
    resolves: AtomicU64,
    /// Replicas, warm nodes, keep-alive and pre-warming per model version.
    scaler: Mutex<Scaler>,
    /// API keys, tenants, tickets, audit log, usage ledger.
    access: Access,
    /// Each joined node's control connection (closed when the node is revoked).
    node_conns: Mutex<HashMap<String, quinn::Connection>>,
}

type Reply = Result<CtlResponse, WireError>;

fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

fn internal(e: impl std::fmt::Display) -> WireError {
    err(ErrorCode::Internal, e.to_string())
}

impl Shared {
    fn thresholds(&self) -> Thresholds {
        Thresholds {
            suspect_after: self.config.suspect_after,
            dead_after: self.config.dead_after,
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn membership(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.membership.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn scaler(&self) -> std::sync::MutexGuard<'_, Scaler> {
        self.scaler.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run the autoscaler over every deployed model version.
    fn scale_tick(&self) -> Result<(), WireError> {
        let models = self.registry().models()?;
        let now = Instant::now();
        let membership = self.membership();
        // A node hears of a decision at its next heartbeat: lead pre-warms by two intervals.
        let lead = self.config.heartbeat_interval.as_micros() as u64 * 2;
        self.scaler()
            .tick(&models, &membership, self.thresholds(), lead, now);
        Ok(())
    }

    fn join(&self, req: JoinRequest) -> Reply {
        let token: JoinToken = req
            .token
            .parse()
            .map_err(|e: crate::join_token::BadToken| {
                err(ErrorCode::InvalidJoinToken, e.to_string())
            })?;
        if token.ca_fingerprint != self.ca.fingerprint() {
            return Err(err(
                ErrorCode::InvalidJoinToken,
                "the join token belongs to another mesh (its CA fingerprint does not match this coordinator)",
            ));
        }
        // The token is checked, then the identity, and only then used up: a revoked node does
        // not burn a token.
        let check_token = |consume: bool| -> Result<(), WireError> {
            match self
                .registry()
                .use_join_token(&token.secret_hash(), now_ms(), consume)?
            {
                TokenCheck::Valid => Ok(()),
                TokenCheck::Used => Err(err(
                    ErrorCode::InvalidJoinToken,
                    "the join token has been used already (join tokens admit one node); mint another with `skein join-token`",
                )),
                TokenCheck::Expired => Err(err(
                    ErrorCode::ExpiredJoinToken,
                    "the join token has expired; ask the admin for a new one",
                )),
                TokenCheck::Unknown => Err(err(
                    ErrorCode::InvalidJoinToken,
                    "the join token is not known to this coordinator",
                )),
            }
        };
        check_token(false)?;
        let (node_id, cert_pem) = self.ca.sign_node_csr(&req.csr_pem).map_err(|e| {
            err(
                ErrorCode::Malformed,
                format!("bad certificate signing request: {e}"),
            )
        })?;
        if self.registry().node_revoked(&node_id)? {
            return Err(err(
                ErrorCode::Forbidden,
                format!("node identity {node_id} has been revoked; start the node with a fresh data dir (a new key)"),
            ));
        }
        check_token(true)?;
        let fingerprint = pem_fingerprint(&cert_pem).map_err(internal)?;
        let hostname: String = req.hostname.chars().take(253).collect();
        self.registry().upsert_node(
            &NodeRecord {
                node_id: node_id.clone(),
                fingerprint,
                hostname: hostname.clone(),
                revoked_unix_ms: None,
            },
            now_ms(),
        )?;
        tracing::info!(%node_id, %hostname, "node joined");
        Ok(CtlResponse::Joined(Joined {
            node_id,
            cert_pem,
            ca_pem: self.ca.cert_pem().to_string(),
        }))
    }

    /// The joined, unrevoked node that holds the certificate `peer`.
    fn node(&self, peer: Option<&str>, to: &str) -> Result<NodeRecord, WireError> {
        let rec = self.node_even_revoked(peer, to)?;
        if rec.revoked_unix_ms.is_some() {
            return Err(err(
                ErrorCode::Forbidden,
                format!(
                    "node {} has been revoked; start it with a fresh data dir and a new join token",
                    rec.node_id
                ),
            ));
        }
        Ok(rec)
    }

    /// The joined node that holds the certificate `peer`, revoked or not.
    fn node_even_revoked(&self, peer: Option<&str>, to: &str) -> Result<NodeRecord, WireError> {
        let fp = peer.ok_or_else(|| {
            err(
                ErrorCode::Unauthenticated,
                format!("{to} needs the node's certificate"),
            )
        })?;
        let rec = self.registry().node_by_fingerprint(fp)?.ok_or_else(|| {
            err(
                ErrorCode::UnknownNode,
                "this certificate belongs to no joined node; join again with a join token",
            )
        })?;
        Ok(rec)
    }

    fn heartbeat(
        &self,
        peer: Option<&str>,
        conn: &quinn::Connection,
        rtt: Duration,
        hb: Heartbeat,
    ) -> Reply {
        let rec = self.node(peer, "heartbeating")?;
        {
            let mut conns = self.node_conns.lock().unwrap_or_else(|p| p.into_inner());
            if conns
                .get(&rec.node_id)
                .is_none_or(|c| c.stable_id() != conn.stable_id())
            {
                conns.insert(rec.node_id.clone(), conn.clone());
            }
        }
        if hb.addr.parse::<SocketAddr>().is_err() {
            return Err(err(
                ErrorCode::Malformed,
                format!("heartbeat address `{}` is not host:port", hb.addr),
            ));
        }
        let now = Instant::now();
        let own = {
            let mut v = self.vivaldi.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = &hb.coordinate {
                // Invalid coordinates or RTTs are refused by the update and change nothing.
                let _ = v.update(c, rtt.as_secs_f64() * 1e6, &mut rand::thread_rng());
            }
            v.coordinate().clone()
        };
        let models = self.registry().models()?;
        let idle_timeouts: HashMap<(String, String), u64> = models
            .iter()
            .map(|m| {
                (
                    (m.name.clone(), m.version.clone()),
                    m.settings.idle_timeout_ms,
                )
            })
            .collect();
        self.scaler()
            .observe_heartbeat(&rec.node_id, &hb.models, &idle_timeouts, now);
        self.membership()
            .heartbeat(&rec.node_id, &rec.hostname, hb, Some(rtt), now);
        // Lock order everywhere: membership, then scaler.
        let membership = self.membership();
        let scaler = self.scaler();
        let assignments = models
            .into_iter()
            .map(|m| {
                let allowed = membership.member(&rec.node_id).is_some_and(|me| {
                    membership.eligible(&m.settings, &me.labels, now, self.thresholds())
                });
                let (keep_warm, unload_idle, prewarm) = match scaler.plan(&m.name, &m.version) {
                    Some(p) => {
                        let at = p.warm.iter().position(|n| n == &rec.node_id);
                        (
                            at.is_some_and(|i| i < m.settings.min_replicas as usize),
                            scaler.unload_idle(&m.name, &m.version),
                            at.is_some(),
                        )
                    }
                    // Before the autoscaler's first decision: the provisioned replicas.
                    None => (
                        membership
                            .warm_set(
                                &m.name,
                                &m.version,
                                m.settings.min_replicas as usize,
                                now,
                                self.thresholds(),
                            )
                            .contains(&rec.node_id),
                        false,
                        false,
                    ),
                };
                let (keep_warm, prewarm) = (keep_warm && allowed, prewarm && allowed);
                Assignment {
                    name: m.name,
                    version: m.version,
                    sha256: m.sha256,
                    size: m.size,
                    settings: m.settings,
                    keep_warm,
                    unload_idle: unload_idle && !keep_warm && !prewarm,
                    prewarm,
                }
            })
            .collect();
        let peers = membership.probe_peers(&rec.node_id, PROBE_PEERS, now, self.thresholds());
        drop(scaler);
        drop(membership);
        Ok(CtlResponse::HeartbeatAck(HeartbeatAck {
            node_id: rec.node_id,
            assignments,
            interval_ms: self.config.heartbeat_interval.as_millis() as u64,
            coordinate: Some(own),
            peers,
            ticket_keys: self.access.ticket_keys(),
        }))
    }

    fn find_model(&self, name: &str, version: Option<&str>) -> Result<ModelInfo, WireError> {
        let reg = self.registry();
        // With a traffic split, the default version is its heaviest one (the pointer).
        let pointer = match version {
            Some(_) => None,
            None => reg
                .traffic(name)?
                .into_iter()
                .max_by_key(|w| w.weight)
                .map(|w| w.version),
        };
        let version = version.or(pointer.as_deref());
        match reg.model(name, version)? {
            Some(m) => Ok(m),
            None if version.is_some() && reg.has_model(name)? => Err(err(
                ErrorCode::UnknownVersion,
                format!(
                    "model `{name}` has no version `{}`; `skein models` lists the versions",
                    version.unwrap_or_default()
                ),
            )),
            None => Err(err(
                ErrorCode::UnknownModel,
                format!("no model named `{name}` is deployed; `skein models` lists them"),
            )),
        }
    }

    /// Like [`find_model`](Self::find_model), for `caller`: another tenant's private model
    /// is as unknown as a model never deployed.
    fn visible_model(
        &self,
        caller: &Caller,
        name: &str,
        version: Option<&str>,
    ) -> Result<ModelInfo, WireError> {
        let hidden = || {
            err(
                ErrorCode::UnknownModel,
                format!("no model named `{name}` is deployed; `skein models` lists them"),
            )
        };
        // Visibility is decided on the latest version (owner and sharing are per model).
        let latest = self.find_model(name, None).map_err(|e| match e.code {
            ErrorCode::UnknownModel => hidden(),
            _ => e,
        })?;
        if !caller.may_see(&latest) {
            return Err(hidden());
        }
        match version {
            None => Ok(latest),
            Some(_) => self.find_model(name, version),
        }
    }

    /// A model `caller` may change (scale, split, deploy versions of).
    fn owned_model(
        &self,
        caller: &Caller,
        name: &str,
        version: Option<&str>,
    ) -> Result<ModelInfo, WireError> {
        caller.require(Scope::Deploy, "change deployments")?;
        let m = self.visible_model(caller, name, version)?;
        if !caller.may_change(&m) {
            return Err(err(
                ErrorCode::Forbidden,
                format!("model `{name}` is shared with you by tenant `{}`; only its owner may change it", m.owner),
            ));
        }
        Ok(m)
    }

    fn resolve(&self, who: &Caller, req: ResolveRequest, caller_rtt: Duration) -> Reply {
        /// Dead nodes named in one resolution (they are forgotten after a while anyway).
        const MAX_DEAD_LISTED: usize = 256;
        /// RTT samples from one caller that are looked at.
        const MAX_SAMPLES: usize = 32;
        who.require(Scope::Invoke, "call models")?;
        let model = self.visible_model(who, &req.model, req.version.as_deref())?;
        let split = match req.version {
            Some(_) => Vec::new(),
            None => self
                .registry()
                .traffic(&req.model)?
                .into_iter()
                .filter(|w| w.weight > 0)
                .collect(),
        };
        let now = Instant::now();
        let t = self.thresholds();
        let membership = self.membership();
        let pos = &req.position;
        // Where the caller is: its own coordinate, or a node's for `skein route --near`.
        let near = pos
            .near
            .as_ref()
            .map(|id| {
                membership.member(id).ok_or_else(|| {
                    err(
                        ErrorCode::UnknownNode,
                        format!("no node `{id}` in this mesh"),
                    )
                })
            })
            .transpose()?;
        let own = self
            .vivaldi
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .coordinate()
            .clone();
        // A caller with no settled coordinate of its own (a new process, a CLI call) that does
        // not say where it is (no region or zone) is taken to sit at the coordinator: the
        // coordinator's own measured RTT to each node applies. One that names its region or
        // zone is ranked by those labels instead (it may be far from the coordinator).
        let at_coordinator = near.is_none()
            && !pos.coordinate.as_ref().is_some_and(|c| c.settled())
            && pos.region.is_none()
            && pos.zone.is_none();
        let coordinate = match (near, &pos.coordinate) {
            (Some(m), _) => m.coordinate.clone(),
            (None, Some(c)) if c.settled() => Some(c.clone()),
            // A caller taken to sit at the coordinator is placed at its coordinate, on an access
            // link as long as the RTT the coordinator measures to it (used where the
            // coordinator has no measurement of a node yet).
            _ if at_coordinator && own.settled() => {
                let mut c = own.clone();
                c.height += caller_rtt.as_secs_f64() * 1e6;
                Some(c)
            }
            _ => pos.coordinate.clone(),
        };
        let caller = Position {
            coordinate,
            region: near
                .and_then(|m| m.labels.get("region").cloned())
                .or_else(|| pos.region.clone()),
            zone: near
                .and_then(|m| m.labels.get("zone").cloned())
                .or_else(|| pos.zone.clone()),
        };
        if near.is_none() {
            self.scaler().observe_caller(
                &model.name,
                &model.version,
                model.settings.idle_timeout_ms,
                &caller,
                now,
            );
        }
        let samples: HashMap<&str, u64> = pos
            .rtt_samples
            .iter()
            .take(MAX_SAMPLES)
            .filter(|s| s.rtt_us > 0)
            .map(|s| (s.node_id.as_str(), s.rtt_us))
            .collect();
        let mut loads = Vec::new();
        let mut nodes = Vec::new();
        let mut failures = Vec::new();
        let mut holding: Vec<bool> = Vec::new();
        let mut alive = 0usize;
        let mut dead = Vec::new();
        for (id, m) in membership.members() {
            let health = Membership::health(m, now, t);
            if health == NodeHealth::Dead && dead.len() < MAX_DEAD_LISTED {
                dead.push(id.clone());
            }
            let status = m
                .models
                .iter()
                .find(|s| s.name == model.name && s.version == model.version);
            if health == NodeHealth::Alive {
                alive += 1;
            }
            let state = status.map(|s| &s.state);
            if let Some(ModelState::Failed(e)) = state {
                failures.push(format!("{id}: {}", e.message));
            }
            holding.push(matches!(
                state,
                Some(ModelState::Loaded | ModelState::Loading | ModelState::Fetching)
            ));
            let node_pos = Position {
                coordinate: m.coordinate.clone(),
                region: m.labels.get("region").cloned(),
                zone: m.labels.get("zone").cloned(),
            };
            // Ranked as if at the `near` node: that node is at distance 0, the rest by
            // coordinates or labels. Otherwise the caller's own sample, else (for a caller
            // placed at the coordinator) the coordinator's measured RTT to the node.
            let (rtt_us, rtt_source) = if near.is_some_and(|n| std::ptr::eq(n, m)) {
                (0.0, RttSource::Coordinates)
            } else {
                routing::caller_rtt(&RttEvidence {
                    sample_us: samples
                        .get(id.as_str())
                        .filter(|_| near.is_none())
                        .map(|&s| s as f64),
                    via_coordinator_us: m.rtt_us.filter(|_| at_coordinator),
                    caller_access_us: caller_rtt.as_secs_f64() * 1e6,
                    caller: Some(&caller),
                    node: Some(&node_pos),
                })
            };
            loads.push(NodeLoad {
                key: nodes.len(),
                healthy: health == NodeHealth::Alive,
                can_serve: !matches!(state, Some(ModelState::Failed(_))),
                loaded: matches!(state, Some(ModelState::Loaded)),
                queued: status.map_or(0, |s| s.queue_depth),
                in_flight: status.map_or(0, |s| s.in_flight),
                concurrency: status.map_or(1, |s| s.concurrency),
                service_us: status
                    .and_then(|s| (s.service_time_us > 0.0).then_some(s.service_time_us)),
                load_us: status.and_then(|s| (s.load_time_us > 0).then_some(s.load_time_us as f64)),
                rtt_us: Some(rtt_us),
                // A node reports a model once it holds its artifact (on disk or loaded).
                artifact_cached: status.is_some_and(|s| !matches!(s.state, ModelState::Fetching)),
                artifact_bytes: model.size,
                allowed: membership.eligible(&model.settings, &m.labels, now, t),
                ..NodeLoad::default()
            });
            nodes.push((id.clone(), m.addr.clone(), rtt_source, m.coordinate.clone()));
        }
        drop(membership);
        let mut ranked = routing::rank_request(
            &loads,
            &RoutingDefaults::default(),
            &RouteRequest {
                payload_bytes: req.payload_bytes,
            },
        );
        // At most `max_replicas` nodes serve: once that many hold the model, route only there.
        let max = model.settings.max_replicas as usize;
        if max > 0 && ranked.iter().filter(|r| holding[r.key]).count() >= max {
            ranked.retain(|r| holding[r.key]);
        }
        if ranked.is_empty() {
            return Err(if alive > 0 && !failures.is_empty() {
                err(
                    ErrorCode::ModelLoadFailed,
                    format!(
                        "every node failed to load `{}` version `{}`: {}",
                        model.name,
                        model.version,
                        failures.join("; ")
                    ),
                )
            } else if !model.settings.constraints().is_empty() {
                err(
                    ErrorCode::NoCapacity,
                    format!(
                        "no capable node: no healthy node with {} can serve `{}` right now ({} nodes known, {alive} alive); it is never sent elsewhere",
                        model.settings.constraints(),
                        model.name,
                        nodes.len()
                    ),
                )
            } else {
                err(
                    ErrorCode::NoCapacity,
                    format!(
                        "no healthy node can serve `{}` right now ({} nodes known, {alive} alive)",
                        model.name,
                        nodes.len()
                    ),
                )
            });
        }
        // Best first, the winner of two random choices among the near-best at the head; the
        // SDK picks again per call from the same ranking (with its own load view).
        let tick = self.resolves.fetch_add(1, Ordering::Relaxed);
        let ranked = routing::order(
            Strategy::LatencyAware,
            ranked,
            tick,
            &mut rand::thread_rng(),
        );
        let candidates = ranked
            .iter()
            .map(|r| {
                let (id, addr, rtt_source, coordinate) = &nodes[r.key];
                let l = &loads[r.key];
                Candidate {
                    node_id: id.clone(),
                    addr: addr.clone(),
                    loaded: l.loaded,
                    expected_us: r.expected_us,
                    parts: r.parts,
                    rtt_source: rtt_source.as_str().to_string(),
                    coordinate: coordinate.clone(),
                    concurrency: l.concurrency.max(1),
                }
            })
            .collect();
        let coordinator = Some(own);
        let mut versions = vec![model.version.clone()];
        versions.extend(
            split
                .iter()
                .map(|w| w.version.clone())
                .filter(|v| *v != model.version),
        );
        let ticket = self.access.ticket(who, &model.name, versions)?;
        Ok(CtlResponse::Resolved(Resolution {
            model: model.name,
            version: model.version,
            inputs: model.inputs,
            outputs: model.outputs,
            candidates,
            ttl_ms: self.config.route_ttl.as_millis() as u64,
            split,
            coordinator,
            dead,
            ticket,
        }))
    }

    fn set_traffic(
        &self,
        caller: &Caller,
        name: &str,
        weights: Vec<skein_proto::VersionWeight>,
    ) -> Reply {
        self.owned_model(caller, name, None)?;
        /// Versions one split may name.
        const MAX_SPLIT: usize = 16;
        if weights.len() > MAX_SPLIT {
            return Err(err(
                ErrorCode::Malformed,
                format!("a traffic split names at most {MAX_SPLIT} versions"),
            ));
        }
        if !weights.is_empty() && weights.iter().all(|w| w.weight == 0) {
            return Err(err(
                ErrorCode::Malformed,
                "a traffic split needs a version with a weight above 0",
            ));
        }
        let mut seen = Vec::new();
        for w in &weights {
            if seen.contains(&&w.version) {
                return Err(err(
                    ErrorCode::Malformed,
                    format!("version `{}` appears twice in the split", w.version),
                ));
            }
            seen.push(&w.version);
            self.find_model(name, Some(&w.version))?;
        }
        if weights.is_empty() {
            // Clearing needs the model to exist too.
            self.find_model(name, None)?;
        }
        self.registry().set_traffic(name, &weights)?;
        tracing::info!(model = %name, ?weights, "traffic split set");
        Ok(CtlResponse::Traffic(weights))
    }

    fn get_traffic(&self, caller: &Caller, name: &str) -> Reply {
        self.visible_model(caller, name, None)?;
        Ok(CtlResponse::Traffic(self.registry().traffic(name)?))
    }

    fn list_models(&self, caller: &Caller) -> Reply {
        let mut models = self.registry().models()?;
        // Visibility is per model: its latest version's owner and sharing decide.
        let latest: HashMap<String, ModelInfo> =
            models.iter().map(|m| (m.name.clone(), m.clone())).collect();
        models.retain(|m| latest.get(&m.name).is_some_and(|l| caller.may_see(l)));
        let now = Instant::now();
        let membership = self.membership();
        let scaler = self.scaler();
        for m in &mut models {
            membership.fill_replicas(m, now, self.thresholds());
            m.scaling = scaler.plan(&m.name, &m.version).map(|p| p.info.clone());
        }
        Ok(CtlResponse::Models(models))
    }

    fn scale(
        &self,
        caller: &Caller,
        name: &str,
        version: Option<&str>,
        patch: &SettingsPatch,
    ) -> Reply {
        let mut model = self.owned_model(caller, name, version)?;
        let settings = patch.apply(&model.settings);
        if let Some(p) = settings.problem() {
            return Err(err(ErrorCode::Malformed, format!("invalid settings: {p}")));
        }
        self.registry()
            .update_settings(&model.name, &model.version, &settings)?;
        tracing::info!(model = %model.name, version = %model.version, ?settings, "deployment scaled");
        model.settings = settings;
        self.membership()
            .fill_replicas(&mut model, Instant::now(), self.thresholds());
        Ok(CtlResponse::Deployed(model))
    }

    fn list_nodes(&self) -> Reply {
        Ok(CtlResponse::Nodes(
            self.membership().infos(Instant::now(), self.thresholds()),
        ))
    }

    /// Admin requests: join tokens and node revocation here, the rest in [`Access::admin`].
    fn admin(&self, caller: &Caller, req: AdminRequest) -> Reply {
        let r = match req {
            AdminRequest::MintJoinToken { ttl_s } => {
                let r = caller.require_platform("mint join tokens").and_then(|()| {
                    let ttl = if ttl_s == 0 {
                        3600
                    } else {
                        ttl_s.min(30 * 86_400)
                    };
                    let t = JoinToken::generate(&self.ca.fingerprint());
                    let expires_ms = now_ms() + ttl * 1000;
                    self.registry().add_join_token(
                        &t.secret_hash(),
                        Some(expires_ms),
                        true,
                        now_ms(),
                    )?;
                    Ok(AdminResponse::JoinToken {
                        token: t.to_string(),
                        expires_ms,
                    })
                });
                self.access.audit(caller, "join_tokens.mint", "", &r);
                r
            }
            AdminRequest::RevokeNode { node_id } => {
                let r = caller.require_platform("revoke nodes").and_then(|()| {
                    if !self.registry().revoke_node(&node_id, now_ms())? {
                        return Err(err(
                            ErrorCode::NotFound,
                            format!("no node `{node_id}` ever joined"),
                        ));
                    }
                    self.membership().remove(&node_id);
                    let conn = self
                        .node_conns
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&node_id);
                    if let Some(c) = conn {
                        c.close(1u32.into(), b"node revoked");
                    }
                    tracing::warn!(%node_id, "node revoked");
                    Ok(AdminResponse::Done)
                });
                self.access.audit(caller, "nodes.revoke", &node_id, &r);
                r
            }
            other => self.access.admin(caller, other),
        };
        r.map(CtlResponse::Admin)
    }
}

/// Names of models and versions: 1 to 64 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

async fn receive_upload(
    shared: &Shared,
    req: &DeployRequest,
    recv: &mut quinn::RecvStream,
) -> Result<Vec<u8>, WireError> {
    if req.size > shared.config.max_upload_bytes {
        let _ = recv.stop(0u32.into());
        return Err(err(
            ErrorCode::UploadTooLarge,
            format!(
                "upload of {} bytes exceeds the coordinator's limit of {} bytes",
                req.size, shared.config.max_upload_bytes
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(req.size.min(64 << 20) as usize);
    let mut hasher = Sha256::new();
    while (bytes.len() as u64) < req.size {
        let want = ((req.size - bytes.len() as u64) as usize).min(CHUNK);
        match recv.read_chunk(want, true).await {
            Ok(Some(chunk)) => {
                hasher.update(&chunk.bytes);
                bytes.extend_from_slice(&chunk.bytes);
            }
            Ok(None) => {
                return Err(err(
                    ErrorCode::Malformed,
                    format!("upload ended after {} of {} bytes", bytes.len(), req.size),
                ))
            }
            Err(e) => return Err(err(ErrorCode::Malformed, format!("upload failed: {e}"))),
        }
    }
    let got = hex::encode(hasher.finalize());
    if got != req.sha256.to_ascii_lowercase() {
        return Err(err(
            ErrorCode::HashMismatch,
            format!(
                "uploaded bytes hash to sha256 {got}, the request announced {}; the upload was corrupted",
                req.sha256
            ),
        ));
    }
    Ok(bytes)
}

async fn deploy(
    shared: &Shared,
    caller: &Caller,
    req: DeployRequest,
    recv: &mut quinn::RecvStream,
) -> Reply {
    let target = format!("{}:{}", req.name, req.version.as_deref().unwrap_or("next"));
    let r = deploy_checked(shared, caller, req, recv).await;
    shared.access.audit(caller, "models.deploy", &target, &r);
    r
}

async fn deploy_checked(
    shared: &Shared,
    caller: &Caller,
    req: DeployRequest,
    recv: &mut quinn::RecvStream,
) -> Reply {
    if let Err(e) = caller.require(Scope::Deploy, "deploy models") {
        let _ = recv.stop(0u32.into());
        return Err(e);
    }
    if let Some(existing) = shared.registry().model(&req.name, None)? {
        if !caller.may_change(&existing) {
            let _ = recv.stop(0u32.into());
            return Err(err(
                ErrorCode::Forbidden,
                format!(
                    "the model name `{}` is taken by another tenant; model names are unique in the mesh",
                    req.name
                ),
            ));
        }
    }
    if !valid_name(&req.name) {
        return Err(err(
            ErrorCode::Malformed,
            format!(
                "model name `{}` is invalid: use 1-64 of A-Z a-z 0-9 _ . -",
                req.name
            ),
        ));
    }
    if let Some(v) = &req.version {
        if !valid_name(v) {
            return Err(err(
                ErrorCode::Malformed,
                format!("version `{v}` is invalid: use 1-64 of A-Z a-z 0-9 _ . -"),
            ));
        }
    }
    if let Some(p) = req.settings.problem() {
        let _ = recv.stop(0u32.into());
        return Err(err(ErrorCode::Malformed, format!("invalid settings: {p}")));
    }
    if let Some(v) = &req.version {
        if let Some(existing) = shared.registry().model(&req.name, Some(v))? {
            if existing.sha256 != req.sha256.to_ascii_lowercase() {
                let _ = recv.stop(0u32.into());
                return Err(err(
                    ErrorCode::VersionConflict,
                    format!(
                        "model `{}` version `{v}` already exists with different content (sha256 {}); deploy under a new version",
                        req.name, existing.sha256
                    ),
                ));
            }
        }
    }
    let _permit = shared.uploads.acquire().await.map_err(internal)?;
    let bytes = receive_upload(shared, &req, recv).await?;
    let sha = artifact_id(&bytes);
    let gpu_required = req.settings.accelerator == skein_proto::Accelerator::Gpu;
    let (meta, bytes) =
        tokio::task::spawn_blocking(move || (skein_onnx::inspect_for(&bytes, gpu_required), bytes))
            .await
            .map_err(internal)?;
    let meta = meta.map_err(|e| err(e.code(), e.to_string()))?;
    let store = shared.store.clone();
    let sha2 = sha.clone();
    tokio::task::spawn_blocking(move || store.put(&sha2, &bytes))
        .await
        .map_err(internal)?
        .map_err(|e| internal(format!("storing the artifact: {e}")))?;
    let reg = shared.registry();
    let version = match req.version {
        Some(v) => v,
        None => reg.next_version(&req.name)?,
    };
    let info = ModelInfo {
        name: req.name,
        version,
        sha256: sha.to_string(),
        size: req.size,
        created_unix_ms: now_ms(),
        inputs: meta.inputs,
        outputs: meta.outputs,
        loaded_on: vec![],
        settings: req.settings,
        warm_replicas: 0,
        loading_replicas: 0,
        cold_starts: 0,
        replicas: vec![],
        scaling: None,
        owner: caller.tenant.clone(),
    };
    let stored = reg.insert_model(&info)??;
    tracing::info!(model = %stored.name, version = %stored.version, sha256 = %stored.sha256, "model deployed");
    Ok(CtlResponse::Deployed(stored))
}

async fn send_artifact(
    shared: &Shared,
    sha256: &str,
    offset: u64,
    send: &mut quinn::SendStream,
) -> Result<(), WireError> {
    let path = sha256
        .parse::<skein_proto::ArtifactId>()
        .map(|id| shared.store.path(&id))
        .ok()
        .filter(|p| p.is_file())
        .ok_or_else(|| err(ErrorCode::UnknownArtifact, format!("no artifact {sha256}")))?;
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::open(&path).await.map_err(internal)?;
    let total = file.metadata().await.map_err(internal)?.len();
    if offset > total {
        return Err(err(
            ErrorCode::Malformed,
            format!("offset {offset} is past the end of the {total}-byte artifact"),
        ));
    }
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(internal)?;
    let max = shared.config.max_frame_len;
    write_frame(
        send,
        &CtlResponse::Artifact {
            total,
            size: total - offset,
        },
        &[],
        max,
    )
    .await
    .map_err(WireError::from)?;
    let mut buf = vec![0u8; CHUNK];
    let mut left = total - offset;
    while left > 0 {
        let n = file
            .read(&mut buf[..(left.min(CHUNK as u64) as usize)])
            .await
            .map_err(internal)?;
        if n == 0 {
            return Err(internal("artifact shrank while being sent"));
        }
        send.write_all(&buf[..n]).await.map_err(internal)?;
        shared.store.count_sent(n as u64);
        left -= n as u64;
    }
    Ok(())
}

async fn handle_stream(shared: Arc<Shared>, r: skein_net::serve::Request) {
    let skein_net::serve::Request {
        peer,
        rtt,
        mut send,
        mut recv,
        conn,
    } = r;
    let max = shared.config.max_frame_len;
    let reply: Result<Option<CtlResponse>, WireError> = async {
        let frame = read_frame(&mut recv, max).await.map_err(WireError::from)?;
        let CtlEnvelope { api_key, request } = frame
            .header()
            .map_err(|e| err(ErrorCode::Malformed, format!("not a control request: {e}")))?;
        let peer = peer.as_deref();
        let key = api_key.as_deref();
        let access = &shared.access;
        match request {
            CtlRequest::Join(j) => shared.join(j),
            CtlRequest::Heartbeat(hb) => shared.heartbeat(peer, &conn, rtt, hb),
            CtlRequest::ReportUsage(records) => {
                // A revoked node may still hand in what it served before the revocation.
                let node = shared.node_even_revoked(peer, "reporting usage")?;
                // The class the coordinator last saw in the node's heartbeats; before the
                // first heartbeat after a coordinator restart, the node's own word.
                let class = shared.membership().member(&node.node_id).map(|m| {
                    m.labels
                        .get("device_class")
                        .cloned()
                        .unwrap_or_else(|| "cpu".into())
                });
                access
                    .record_usage(&node.node_id, class.as_deref(), records)
                    .map(|new| CtlResponse::UsageStored { new })
            }
            CtlRequest::FetchArtifact { sha256, offset } => {
                // Nodes fetch with their certificate; people with a `deploy` key, and only
                // artifacts of models they may see.
                if key.is_some() || shared.node(peer, "fetching artifacts").is_err() {
                    let caller = access.caller(key, "fetch artifacts")?;
                    caller.require(Scope::Deploy, "fetch artifacts")?;
                    let visible = shared
                        .registry()
                        .models()?
                        .iter()
                        .any(|m| m.sha256 == sha256 && caller.may_see(m));
                    if !visible {
                        return Err(err(
                            ErrorCode::UnknownArtifact,
                            format!("no artifact {sha256}"),
                        ));
                    }
                }
                send_artifact(&shared, &sha256, offset, &mut send).await?;
                let _ = send.finish();
                return Ok(None);
            }
            CtlRequest::Deploy(d) => {
                let caller = match access.caller(key, "deploy models") {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = recv.stop(0u32.into());
                        return Err(e);
                    }
                };
                deploy(&shared, &caller, d, &mut recv).await
            }
            CtlRequest::Resolve(r) => {
                let span = resolve_span(&r);
                let reply = span.in_scope(|| {
                    let caller = access.caller(key, "call models")?;
                    shared.resolve(&caller, r, rtt)
                });
                let code = match &reply {
                    Ok(_) => "ok",
                    Err(e) => e.code.as_str(),
                };
                span.record("code", code);
                span.record(
                    "otel.status_code",
                    if code == "ok" { "ok" } else { "error" },
                );
                reply
            }
            CtlRequest::ListModels => shared.list_models(&access.caller(key, "list models")?),
            CtlRequest::ListNodes => {
                access
                    .caller(key, "list nodes")?
                    .require_platform("list nodes")?;
                shared.list_nodes()
            }
            CtlRequest::Scale {
                name,
                version,
                patch,
            } => {
                let caller = access.caller(key, "scale models")?;
                let r = shared.scale(&caller, &name, version.as_deref(), &patch);
                access.audit(&caller, "models.scale", &name, &r);
                r
            }
            CtlRequest::SetTraffic { name, weights } => {
                let caller = access.caller(key, "set traffic splits")?;
                let r = shared.set_traffic(&caller, &name, weights);
                access.audit(&caller, "models.traffic", &name, &r);
                r
            }
            CtlRequest::GetTraffic { name } => {
                shared.get_traffic(&access.caller(key, "read traffic splits")?, &name)
            }
            CtlRequest::Admin(a) => shared.admin(&access.caller(key, "administer")?, a),
            _ => Err(err(
                ErrorCode::Malformed,
                "request not supported by this coordinator",
            )),
        }
        .map(Some)
    }
    .await;
    let response = match reply {
        Ok(None) => return,
        Ok(Some(r)) => r,
        Err(e) => {
            tracing::debug!(error = %e, "control request failed");
            CtlResponse::Error(e)
        }
    };
    if let Err(e) = write_frame(&mut send, &response, &[], max).await {
        tracing::debug!(error = %e, "could not answer control request");
    }
    let _ = send.finish();
}

/// Write a secret file readable only by its owner.
fn write_secret(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A running coordinator.
pub struct Coordinator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    admin_key: Option<String>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// Open the data dir, bind the endpoint and start serving.
    pub async fn start(config: CoordinatorConfig) -> anyhow::Result<Coordinator> {
        let scaling = config.scaling.clone();
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Keys, the CA, the ledger: the data dir is for the coordinator's user only.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {}", dir.display()))?;
        }
        let ca = MeshCa::load_or_create(&dir.join("ca")).context("loading the mesh CA")?;
        let creds = ca.issue_coordinator()?;
        let registry = Registry::open(&dir).context("opening the registry")?;
        let store = ArtifactStore::open(&dir).context("opening the artifact store")?;

        let access = Access::open(
            &dir,
            config.security.clone(),
            config.pricing.clone(),
            config.heartbeat_interval,
        )
        .context("opening the security store")?;
        let admin_key = access.bootstrap_admin_key()?;
        if let Some(key) = &admin_key {
            write_secret(&dir.join("admin-key"), &format!("{key}\n"))?;
        }
        // A configured token is the operator's own choice: reusable, no expiry.
        if let Some(extra) = &config.join_token {
            let t: JoinToken = extra.parse().context("the configured join token")?;
            anyhow::ensure!(
                t.ca_fingerprint == ca.fingerprint(),
                "the configured join token names another CA (fingerprint {})",
                t.ca_fingerprint
            );
            registry.add_join_token(&t.secret_hash(), None, false, now_ms())?;
        }
        std::fs::write(dir.join("ca.crt"), ca.cert_pem())?;

        let limits = TransportLimits {
            max_frame_len: config.max_frame_len,
            ..TransportLimits::default()
        };
        let endpoint = skein_net::server_endpoint(
            config.listen,
            &creds,
            &[ALPN_CTL],
            ClientAuth::Optional,
            &limits,
        )
        .with_context(|| format!("binding {}", config.listen))?;
        let addr = endpoint.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            ca,
            registry: Mutex::new(registry),
            membership: Mutex::new(Membership::default()),
            store,
            uploads: Semaphore::new(MAX_CONCURRENT_UPLOADS),
            vivaldi: Mutex::new(Vivaldi::new(VivaldiConfig::default())),
            resolves: AtomicU64::new(0),
            scaler: Mutex::new(Scaler::new(scaling)),
            access,
            node_conns: Mutex::new(HashMap::new()),
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(shared.clone(), endpoint, cancel.clone()));
        tracing::info!(%addr, "coordinator listening");
        Ok(Coordinator {
            shared,
            addr,
            admin_key,
            cancel,
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Artifact bytes sent to nodes and clients since the start (a resumed fetch counts only
    /// the part the fetcher did not have yet).
    pub fn artifact_bytes_sent(&self) -> u64 {
        self.shared.store.bytes_sent()
    }

    /// The `root` admin API key, when this start created it (the first start on a data dir);
    /// it is also in `<data_dir>/admin-key`. Later starts return `None`.
    pub fn admin_key(&self) -> Option<&str> {
        self.admin_key.as_deref()
    }

    /// Create an API key for `tenant` (created if missing) with `scopes`, as the
    /// coordinator's own process (audited as `local`).
    pub fn create_api_key(
        &self,
        tenant: &str,
        scopes: &[&str],
        label: Option<&str>,
    ) -> anyhow::Result<String> {
        let scopes = scopes
            .iter()
            .map(|s| s.parse::<Scope>())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self
            .shared
            .access
            .create_key_local(tenant, &scopes, label)?
            .key)
    }

    /// A `root` admin key for an in-process service (the HTTP gateway), kept in
    /// `<data_dir>/<name>-key` and reused across restarts while it stays valid.
    pub fn service_key(&self, name: &str) -> anyhow::Result<String> {
        let path = self.shared.config.data_dir.join(format!("{name}-key"));
        if let Ok(k) = std::fs::read_to_string(&path) {
            let k = k.trim();
            if matches!(self.shared.access.authenticate(Some(k)), Ok(Some(_))) {
                return Ok(k.to_string());
            }
        }
        let key = self.create_api_key(crate::access::ROOT_TENANT, &["admin"], Some(name))?;
        write_secret(&path, &format!("{key}\n"))?;
        Ok(key)
    }

    /// Mint a single-use join token valid for `ttl` (one hour when `None`).
    pub fn mint_join_token(&self, ttl: Option<Duration>) -> anyhow::Result<String> {
        let t = JoinToken::generate(&self.shared.ca.fingerprint());
        let expires = now_ms() + ttl.unwrap_or(Duration::from_secs(3600)).as_millis() as u64;
        self.shared
            .registry()
            .add_join_token(&t.secret_hash(), Some(expires), true, now_ms())?;
        Ok(t.to_string())
    }

    /// The mesh CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.shared.ca.cert_pem().to_string()
    }

    /// Issue client credentials (for the CLI or an SDK user) named `name`.
    pub fn issue_client_credentials(&self, name: &str) -> anyhow::Result<Credentials> {
        Ok(self.shared.ca.issue_client(name)?)
    }

    /// A token that stops the coordinator when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stop serving and wait until the endpoint is closed.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }

    /// Wait until the coordinator stops (its cancel token fired).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

async fn serve(shared: Arc<Shared>, endpoint: quinn::Endpoint, cancel: CancellationToken) {
    let pruner = {
        let (shared, cancel) = (shared.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => shared.membership().prune(Instant::now(), FORGET_DEAD_AFTER),
                }
            }
        })
    };
    let autoscaler = {
        let (shared, cancel) = (shared.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(shared.config.heartbeat_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {
                        if let Err(e) = shared.scale_tick() {
                            tracing::warn!(error = %e, "autoscaler tick failed");
                        }
                    }
                }
            }
        })
    };
    let max = shared.config.max_connections;
    skein_net::serve::accept_loop(endpoint.clone(), cancel, max, move |r| {
        handle_stream(shared.clone(), r)
    })
    .await;
    let _ = pruner.await;
    let _ = autoscaler.await;
    endpoint.close(0u32.into(), b"coordinator shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    tracing::info!("coordinator stopped");
}

/// Run a coordinator until `shutdown` is cancelled (the `skein coordinator` entry point).
pub async fn run(config: CoordinatorConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let c = Coordinator::start(config).await?;
    let inner = c.cancel_token();
    tokio::select! {
        _ = shutdown.cancelled() => inner.cancel(),
        _ = inner.cancelled() => {}
    }
    c.wait().await;
    Ok(())
}

/// The span of a resolve whose caller traces it (`skein.coordinator.resolve`, a child of the
/// caller's span); none otherwise.
fn resolve_span(req: &ResolveRequest) -> tracing::Span {
    match req.trace.filter(|t| t.sampled) {
        Some(t) => tracing::info_span!(
            "skein.coordinator.resolve",
            otel.kind = "server",
            trace_id = %t.trace_hex(),
            span_id = %t.child(rand::random()).span_hex(),
            parent_span_id = %t.span_hex(),
            model = %req.model,
            version = req.version.as_deref().unwrap_or(""),
            code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        ),
        None => tracing::Span::none(),
    }
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn names_are_checked() {
        for ok in ["ppocr_cls", "a", "v1.2-rc", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(65), "ü"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
