//! The node's life: join, heartbeats, assignments, and the `skein/infer` endpoint; the HTTP
//! ingress in [`ingress`].

mod ingress;
pub mod offline;

use crate::assign::{plan_assignments, SlotAction, SlotView};
use crate::cache::ArtifactCache;
use crate::config::{total_memory, NodeConfig};
use crate::executor::{MemoryBudget, Slot, SlotLimits, UnloadReason};
use crate::identity;
use crate::metering::{TenantLimiter, UsageBuffer, USAGE_BATCH};
use crate::replay::Admission;
use anyhow::{bail, Context};
use rand::seq::IteratorRandom;
use rand::Rng;
use skein_net::artifact::CoordinatorSource;
use skein_net::endpoint::{client_config, connect, TransportLimits};
use skein_net::stream::{read_frame, write_frame};
use skein_net::ticket::TicketVerifier;
use skein_net::tls::ClientAuth;
use skein_net::{Credentials, CtlClient, CtlConfig};
use skein_policy::vivaldi::{Vivaldi, VivaldiConfig};
use skein_proto::{
    Assignment, Capacity, CtlEnvelope, CtlRequest, CtlResponse, ErrorCode, Heartbeat, InferReply,
    InferRequest, InferResponse, Peer, ResponseMeta, UsageRecord, WireError, ALPN_CTL, ALPN_INFER,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Concurrent infer connections accepted.
const MAX_CONNECTIONS: usize = 4096;
/// Peers probed per round.
const PROBE_FANOUT: usize = 3;
/// Probe connections kept open.
const MAX_PROBE_CONNECTIONS: usize = 16;
/// How often the usage spool is fsync'd.
const SPOOL_SYNC: Duration = Duration::from_millis(200);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a request turned out to be, as far as the node verified it (metric labels).
struct Seen {
    model: String,
    version: String,
    tenant: String,
}

impl Default for Seen {
    fn default() -> Self {
        Seen {
            model: "-".into(),
            version: "-".into(),
            tenant: "-".into(),
        }
    }
}

struct Shared {
    /// The libp2p peer layer, when enabled.
    peer: Option<skein_peer::Peer>,
    /// Its PeerId, proven for this node (sent in every heartbeat).
    peer_binding: Option<skein_proto::PeerBinding>,
    config: NodeConfig,
    /// The engine models run on, and what the heartbeat says of it.
    backend: crate::backend::Backend,
    node_id: String,
    advertise: SocketAddr,
    /// The control link to the coordinator, reconnected on demand.
    ctl: CtlClient,
    cache: ArtifactCache,
    slots: RwLock<HashMap<(String, String), Arc<Slot>>>,
    latest: RwLock<HashMap<String, String>>,
    heartbeat_now: Notify,
    seq: AtomicU64,
    interval_ms: AtomicU64,
    fetches: tokio::sync::Semaphore,
    /// Shutting down: new requests are refused with `ShuttingDown`, running ones finish.
    draining: AtomicBool,
    /// Inference streams being handled.
    active: AtomicUsize,
    /// Signalled when `active` drops to zero.
    drained: Notify,
    /// This node's network coordinate.
    vivaldi: Mutex<Vivaldi>,
    /// Peers to probe, from the last heartbeat answer.
    peers: Mutex<Vec<Peer>>,
    /// Open probe connections by node id (bounded by `MAX_PROBE_CONNECTIONS`).
    probes: Mutex<HashMap<String, quinn::Connection>>,
    /// Client config for probe connections (ALPN `skein/infer`, this node's certificate).
    probe_cfg: quinn::ClientConfig,
    /// The coordinator's ticket keys, from the last heartbeat answer.
    tickets: RwLock<TicketVerifier>,
    /// The ticket keys `tickets` was built from.
    ticket_keys: Mutex<Vec<skein_proto::TicketKey>>,
    /// Per-tenant rate and concurrency limits (from the tickets).
    limiter: TenantLimiter,
    /// Usage records not yet stored by the coordinator.
    usage: UsageBuffer,
    /// Wakes the usage shipper early (a full batch).
    usage_now: Notify,
    /// When the coordinator last answered (a heartbeat, or a usage report stored).
    coordinator_seen: Mutex<Instant>,
    /// Requests answered, by outcome; latency histograms.
    metrics: crate::metrics::NodeMetrics,
    /// The last heartbeat was answered.
    heartbeat_ok: AtomicBool,
    /// The owner (tenant) of each assigned model version, from the last heartbeat answer.
    owners: RwLock<HashMap<(String, String), String>>,
    /// API keys the coordinator vouched for (or refused), for the HTTP ingress.
    keys: Mutex<crate::key_cache::KeyCache>,
    /// Where the HTTP ingress listens, as reported in heartbeats (`None`: no ingress).
    ingress: Option<SocketAddr>,
    /// `CheckKey` requests sent to the coordinator.
    key_checks: AtomicU64,
    /// One key check at a time: concurrent first uses of a key ask the coordinator once.
    key_check_lock: tokio::sync::Mutex<()>,
    /// Request ids served, against replays of 0-RTT requests.
    replays: Mutex<crate::replay::ReplayGuard>,
    /// Offline operation: whether the coordinator answers, the saved heartbeat answer.
    offline: offline::OfflineState,
    /// Peer-to-peer artifacts (issue 20): fetch counters, chunk serving and its limits.
    artifacts: Arc<crate::peer_artifacts::PeerArtifacts>,
    /// LAN discovery, once it runs: LAN holders of artifacts while offline (issue 20).
    lan: std::sync::OnceLock<skein_client::lan::LanBrowser>,
    /// The membership grant and manifest digests of the last heartbeat answer (fresh or
    /// saved): for fetches from LAN holders while offline.
    lan_bindings: Arc<RwLock<crate::lan_fetch::Bindings>>,
}

/// Counts one inference stream in `Shared::active` while alive.
struct ActiveGuard<'a>(&'a Shared);

impl<'a> ActiveGuard<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(shared)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}

impl Shared {
    fn slot(&self, model: &str, version: Option<&str>) -> Option<Arc<Slot>> {
        let version = match version {
            Some(v) => v.to_string(),
            None => self
                .latest
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(model)?
                .clone(),
        };
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(model.to_string(), version))
            .cloned()
    }

    /// A snapshot of every slot (the lock is not held while the caller works on them).
    fn slot_list(&self) -> Vec<Arc<Slot>> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn heartbeat_msg(&self) -> Heartbeat {
        let mut models: Vec<_> = self.slot_list().iter().map(|s| s.status()).collect();
        models.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        Heartbeat {
            addr: self.advertise.to_string(),
            capacity: Capacity {
                cores: std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1),
                memory_bytes: total_memory(),
                backends: vec![self.backend.name.into()],
                accelerators: self.backend.accelerators.clone(),
                ort_version: self.backend.ort_version.clone(),
                ort_providers: self.backend.ort_providers.clone(),
            },
            labels: self.config.labels.clone(),
            models,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            draining: self.draining.load(Ordering::SeqCst),
            coordinate: Some(lock(&self.vivaldi).coordinate().clone()),
            ingress: self.ingress.map(|a| a.to_string()),
            usage_unsent: self.usage.len() as u64,
            peer: self
                .peer
                .as_ref()
                .zip(self.peer_binding.as_ref())
                .map(|(p, b)| Box::new(crate::peer::report(p, b))),
            cached: self.cache.held(skein_proto::MAX_CACHED_REPORTED),
        }
    }

    /// The coordinator's relay addresses to reserve on, from a heartbeat answer: none when
    /// relays are configured; else those on the IP this node reaches the coordinator at (QUIC,
    /// and TCP for networks that block UDP), or the first.
    fn relays_to_use(&self, relays: &[String]) -> Vec<skein_peer::Multiaddr> {
        if self.peer.is_none() || !self.config.peer.relays.is_empty() {
            return Vec::new();
        }
        let prefix = format!("/ip4/{}/", self.ctl.addr().ip());
        let parsed: Vec<skein_peer::Multiaddr> =
            relays.iter().filter_map(|r| r.parse().ok()).collect();
        let same: Vec<_> = parsed
            .iter()
            .filter(|a| a.to_string().starts_with(&prefix))
            .cloned()
            .collect();
        let mut chosen: Vec<_> = if same.is_empty() {
            parsed.into_iter().take(1).collect()
        } else {
            same
        };
        // QUIC first: the peer layer dials the relay over QUIC and falls back to TCP, and a
        // QUIC relay connection is what gives DCUtR a hole-punchable address.
        chosen.sort_by_key(|a| !a.to_string().contains("/quic"));
        chosen
    }

    /// Send one heartbeat and apply the assignments in the answer (saved for a start
    /// without the coordinator).
    async fn heartbeat(self: &Arc<Self>) -> Result<(), WireError> {
        let req = CtlEnvelope::anonymous(CtlRequest::Heartbeat(self.heartbeat_msg()));
        let (answer, rtt) = self.ctl.call(&req).await?;
        match answer {
            CtlResponse::HeartbeatAck(ack) => {
                self.offline.save(&self.config.data_dir, &ack);
                self.apply_answer(ack, Some(rtt)).await;
                Ok(())
            }
            other => Err(WireError::new(
                ErrorCode::Malformed,
                format!("unexpected heartbeat answer: {other:?}"),
            )),
        }
    }

    /// Apply a heartbeat answer (fresh, with the call's RTT, or the saved one): assignments,
    /// settings, keys, peers, relays.
    async fn apply_answer(self: &Arc<Self>, ack: skein_proto::HeartbeatAck, rtt: Option<Duration>) {
        if let (Some(c), Some(rtt)) = (&ack.coordinate, rtt) {
            self.observe_rtt("coordinator", c, rtt);
        }
        *self.lan_bindings.write().unwrap_or_else(|p| p.into_inner()) =
            crate::lan_fetch::Bindings::of(&ack);
        *lock(&self.peers) = ack.peers;
        // Revoked keys stop working at the ingress now, not when their TTL ends.
        let dropped = lock(&self.keys).revoke(&ack.revoked_keys);
        if dropped > 0 {
            tracing::info!(
                keys = dropped,
                "revoked API keys dropped from the key cache"
            );
        }
        *self.owners.write().unwrap_or_else(|p| p.into_inner()) = ack
            .assignments
            .iter()
            .zip(&ack.owners)
            .map(|(a, o)| ((a.name.clone(), a.version.clone()), o.clone()))
            .collect();
        if let Some(p) = &self.peer {
            for relay in self.relays_to_use(&ack.relays) {
                p.add_relay(relay).await;
            }
        }
        {
            let mut keys = lock(&self.ticket_keys);
            if *keys != ack.ticket_keys {
                *self.tickets.write().unwrap_or_else(|p| p.into_inner()) =
                    TicketVerifier::new(&ack.ticket_keys)
                        .with_skew(self.config.ticket_clock_skew_ms);
                *keys = ack.ticket_keys;
            }
        }
        self.interval_ms
            .store(ack.interval_ms.clamp(50, 60_000), Ordering::Relaxed);
        let latest: HashMap<String, String> = ack
            .assignments
            .iter()
            .map(|a| (a.name.clone(), a.version.clone()))
            .collect();
        let mut to_warm = Vec::new();
        {
            let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
            let plan = plan_assignments(&ack.assignments, &self.config.labels, |n, v| {
                slots
                    .get(&(n.to_string(), v.to_string()))
                    .map(|s| SlotView {
                        loaded: s.is_loaded(),
                        loading: s.is_loading(),
                    })
            });
            let key = |a: &Assignment| (a.name.clone(), a.version.clone());
            for action in plan {
                match action {
                    SlotAction::Create(a) => {
                        let limits = SlotLimits {
                            default_concurrency: self.config.max_concurrency,
                            max_queue: self.config.max_queue,
                            plan_cache: self.config.plan_cache,
                            batch_policy: self.config.batch_policy,
                            engine: self.backend.engine.clone(),
                        };
                        slots.insert(key(a), Arc::new(Slot::new(a, limits)));
                    }
                    SlotAction::Update(a) => {
                        if let Some(slot) = slots.get(&key(a)) {
                            let concurrency = self.config.max_concurrency;
                            slot.update(a.settings.clone(), a.keep_warm, concurrency);
                        }
                    }
                    // Started once the lock is released.
                    SlotAction::Warm(a) => to_warm.extend(slots.get(&key(a)).cloned()),
                    SlotAction::Unload(a) => {
                        if let Some(slot) = slots.get(&key(a)) {
                            slot.force_unload(UnloadReason::Scaler);
                        }
                    }
                }
            }
        }
        *self.latest.write().unwrap_or_else(|p| p.into_inner()) = latest;
        for slot in to_warm {
            let me = self.clone();
            tokio::spawn(async move { me.prewarm(slot).await });
        }
    }

    /// The coordinator answered just now.
    fn saw_coordinator(&self) {
        *lock(&self.coordinator_seen) = Instant::now();
        self.offline.answered();
    }

    /// Ship waiting usage records until none are left or the coordinator fails; records
    /// leave the buffer only once stored.
    async fn ship_usage(&self) -> Result<(), WireError> {
        loop {
            let batch = self.usage.peek(USAGE_BATCH);
            if batch.is_empty() {
                return Ok(());
            }
            let n = batch.len();
            match self.ctl.request(CtlRequest::ReportUsage(batch)).await? {
                CtlResponse::UsageStored { .. } => {
                    self.saw_coordinator();
                    self.usage.ack(n)
                }
                other => {
                    return Err(WireError::new(
                        ErrorCode::Malformed,
                        format!("unexpected answer to a usage report: {other:?}"),
                    ))
                }
            }
        }
    }

    /// Feed one RTT sample to this node's coordinate (invalid samples change nothing).
    fn observe_rtt(&self, peer: &str, coordinate: &skein_proto::Coordinate, rtt: Duration) {
        let rtt_us = rtt.as_secs_f64() * 1e6;
        let mut v = lock(&self.vivaldi);
        if let Err(e) = v.update(coordinate, rtt_us, &mut rand::thread_rng()) {
            tracing::debug!(%peer, rtt_us, error = %e, "RTT sample not used");
        }
    }

    /// Probe up to `PROBE_FANOUT` random peers: (re)use a `skein/infer` connection to each and
    /// feed its RTT, which quinn keeps measuring from keep-alives and acks, to the coordinate.
    async fn probe_peers(&self) {
        let peers: Vec<Peer> = {
            let all = lock(&self.peers);
            all.iter()
                .filter(|p| p.node_id != self.node_id && p.coordinate.is_some())
                .cloned()
                .choose_multiple(&mut rand::thread_rng(), PROBE_FANOUT)
        };
        for p in peers {
            let Some(coordinate) = &p.coordinate else {
                continue;
            };
            let existing = lock(&self.probes)
                .get(&p.node_id)
                .filter(|c| c.close_reason().is_none())
                .cloned();
            let conn = match existing {
                Some(c) => c,
                None => {
                    let Ok(addr) = p.addr.parse::<SocketAddr>() else {
                        continue;
                    };
                    match connect(
                        self.ctl.endpoint(),
                        self.probe_cfg.clone(),
                        addr,
                        &skein_net::node_server_name(&p.node_id),
                        Duration::from_secs(2),
                    )
                    .await
                    {
                        Ok(c) => {
                            let mut probes = lock(&self.probes);
                            if probes.len() >= MAX_PROBE_CONNECTIONS {
                                let keep: Vec<String> = lock(&self.peers)
                                    .iter()
                                    .map(|p| p.node_id.clone())
                                    .collect();
                                probes.retain(|id, c| {
                                    let k = keep.contains(id) && c.close_reason().is_none();
                                    if !k {
                                        c.close(0u32.into(), b"probe no longer needed");
                                    }
                                    k
                                });
                            }
                            if probes.len() < MAX_PROBE_CONNECTIONS {
                                probes.insert(p.node_id.clone(), c.clone());
                            }
                            c
                        }
                        Err(e) => {
                            tracing::debug!(peer = %p.node_id, error = %e, "probe failed");
                            continue;
                        }
                    }
                }
            };
            self.observe_rtt(&p.node_id, coordinate, conn.rtt());
        }
    }

    async fn fetch(&self, slot: &Slot) -> Result<Vec<u8>, WireError> {
        let _permit = self
            .fetches
            .acquire()
            .await
            .map_err(|_| WireError::new(ErrorCode::ShuttingDown, "node shutting down"))?;
        // Chunks from the coordinator and, with a peer layer, from the nodes holding the
        // artifact (issue 20).
        let peers = self
            .peer
            .as_ref()
            .map(crate::peer_artifacts::PeerChunkSource::new);
        // While the coordinator is unreachable, from LAN holders (with a peer layer).
        let lan =
            peers
                .as_ref()
                .zip(self.peer.as_ref())
                .map(|(chunks, p)| crate::lan_fetch::LanSource {
                    peers: chunks,
                    lan: &self.lan,
                    own_peer_id: p.status().peer_id.to_string(),
                    bindings: self.lan_bindings.clone(),
                });
        let source = crate::lan_fetch::Fallback::new(
            CoordinatorSource::new(&self.ctl, None),
            lan,
            &self.artifacts.lan_fetches,
        );
        self.cache
            .get(
                &source,
                peers.as_ref(),
                &self.artifacts.stats,
                &slot.sha256,
                slot.size,
            )
            .await
    }

    /// Fetch and load a newly assigned model ahead of its first request.
    async fn prewarm(self: Arc<Self>, slot: Arc<Slot>) {
        // A provisioned replica (min_replicas) may unload idle others; a pre-warm takes only
        // free room.
        let free_only = FreeRoomOnly(self.as_ref());
        let budget: &dyn MemoryBudget = if slot.keep_warm() {
            self.as_ref()
        } else {
            &free_only
        };
        match slot.ensure_loaded(|| self.fetch(&slot), budget).await {
            Ok(_) => tracing::info!(model = %slot.name, version = %slot.version, "model loaded"),
            // No room now: the slot stays cached and the next heartbeat offers it again. No
            // early heartbeat here, or a full node would spin on offers it cannot take.
            Err(e) if e.code == ErrorCode::NoCapacity => {
                tracing::debug!(model = %slot.name, version = %slot.version, error = %e, "no free memory to pre-warm");
                return;
            }
            Err(e) => {
                tracing::warn!(model = %slot.name, version = %slot.version, error = %e, "model failed to load")
            }
        }
        self.heartbeat_now.notify_one();
    }

    async fn infer(
        self: &Arc<Self>,
        req: InferRequest,
        inputs: Vec<skein_proto::Tensor>,
        seen: &mut Seen,
        early: bool,
    ) -> Result<(InferReply, Vec<skein_proto::Tensor>), WireError> {
        let start = Instant::now();
        // The ticket first: nothing below (not even a refresh) happens for a caller without one.
        // Offline, its tenant's offline validity applies instead of its expiry.
        let reach = self.reach();
        let ticket = self.verify_ticket(&req, req.version.as_deref(), reach)?;
        seen.tenant = ticket.tenant.clone();
        self.usage.admit()?;
        let _permit =
            self.limiter
                .admit(&ticket.tenant, ticket.max_rps, ticket.max_concurrent, start)?;
        let slot = match self.slot(&req.model, req.version.as_deref()) {
            Some(s) => s,
            None => {
                // Perhaps deployed since the last heartbeat: refresh once (not offline: the
                // coordinator would not answer).
                if reach == skein_net::ticket::Reach::Online {
                    self.heartbeat().await?;
                }
                self.slot(&req.model, req.version.as_deref())
                    .ok_or_else(|| {
                        let code = if req.version.is_some() && self.slot(&req.model, None).is_some()
                        {
                            ErrorCode::UnknownVersion
                        } else {
                            ErrorCode::UnknownModel
                        };
                        WireError::new(
                            code,
                            format!(
                                "model `{}`{} is not deployed in this mesh",
                                req.model,
                                req.version
                                    .as_deref()
                                    .map(|v| format!(" version `{v}`"))
                                    .unwrap_or_default()
                            ),
                        )
                    })?
            }
        };
        seen.model = slot.name.clone();
        seen.version = slot.version.clone();
        if !ticket.versions.contains(&slot.version) {
            return Err(WireError::new(
                ErrorCode::InvalidTicket,
                format!("route ticket does not cover version `{}`", slot.version),
            ));
        }
        // The id is remembered until the ticket expires (after which the ticket check refuses
        // a replay anyway).
        let replay = Some(Replay {
            until_ms: ticket
                .expires_unix_ms
                .max(skein_net::ticket::offline_limit_ms(&ticket))
                .saturating_add(self.config.ticket_clock_skew_ms),
            early,
        });
        let call = Call {
            id: req.id,
            tenant: ticket.tenant,
            outputs: req.outputs,
            timeout_ms: req.timeout_ms,
            start,
            replay,
        };
        self.serve_on(&slot, call, inputs).await
    }

    /// Run `inputs` on `slot` for a caller already checked (by its route ticket, or by its API
    /// key at the HTTP ingress): placement, deadline, outputs picked, usage metered.
    async fn serve_on(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        call: Call,
        inputs: Vec<skein_proto::Tensor>,
    ) -> Result<(InferReply, Vec<skein_proto::Tensor>), WireError> {
        let Call {
            id,
            tenant,
            outputs: wanted,
            timeout_ms,
            start,
            replay,
        } = call;
        let req_model = &slot.name;
        let settings = slot.settings();
        if !skein_policy::placement::labels_allow(&settings, &self.config.labels) {
            // Data residency and device class hold even if a caller addresses this node
            // directly: another node must serve it.
            return Err(WireError::new(
                ErrorCode::NoCapacity,
                format!(
                    "`{}` may only run on nodes in {}; this node ({}) is not one of them",
                    req_model,
                    settings.constraints(),
                    self.config
                        .labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let bytes_in: u64 = inputs.iter().map(|t| t.data().len() as u64).sum();
        let was_loaded = slot.is_loaded();
        let timeout = timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_millis(slot.settings().timeout_ms))
            .min(Duration::from_secs(3600));
        let deadline = start + timeout;
        // Last before running: every refusal above leaves no trace here.
        let admission = match replay {
            Some(Replay { until_ms, early }) => self
                .replays
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .admit(&tenant, id, until_ms, crate::unix_ms(), early),
            // The HTTP ingress: no 0-RTT, and an id of its own making per request.
            None => Admission::Unremembered,
        };
        match admission {
            Admission::Remembered | Admission::Unremembered => {}
            Admission::Duplicate => {
                let early = replay.is_some_and(|r| r.early);
                tracing::info!(request_id = id, tenant = %tenant, early, "refused a repeated request id (a replay?)");
                return Err(WireError::new(
                    ErrorCode::Conflict,
                    format!(
                        "request {id} has already been served by this node; a new request needs a new id"
                    ),
                ));
            }
            Admission::Full => {
                return Err(WireError::new(
                    ErrorCode::Overloaded,
                    "this node remembers too many recent request ids to accept 0-RTT requests; retry after the handshake",
                )
                .retry_after(1000))
            }
        }
        let served = slot
            .serve(inputs, deadline, || self.fetch(slot), self.as_ref())
            .await;
        if served.is_err() && admission == Admission::Remembered {
            // It did not run to completion and is not billed: a retry may run it.
            self.replays
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .forget(&tenant, id);
        }
        if !was_loaded {
            // A load happened (or failed): tell the coordinator now, not at the next beat.
            self.heartbeat_now.notify_one();
        }
        let served = served?;
        let outputs = if wanted.is_empty() {
            served.outputs
        } else {
            let mut picked = Vec::with_capacity(wanted.len());
            for name in &wanted {
                let t = served
                    .outputs
                    .iter()
                    .find(|t| t.name() == name)
                    .ok_or_else(|| {
                        WireError::new(
                            ErrorCode::InvalidInput,
                            format!(
                                "unknown output `{name}` (model outputs: {})",
                                served
                                    .outputs
                                    .iter()
                                    .map(|t| t.name())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        )
                    })?;
                picked.push(t.clone());
            }
            picked
        };
        self.usage.push(UsageRecord {
            id: format!("{:032x}", rand::random::<u128>()),
            request_id: id,
            tenant,
            model: slot.name.clone(),
            version: slot.version.clone(),
            node: self.node_id.clone(),
            node_class: self
                .config
                .labels
                .get("device_class")
                .cloned()
                .unwrap_or_else(|| "cpu".into()),
            compute_us: served.compute_us,
            queue_us: served.queue_us,
            bytes_in,
            bytes_out: outputs.iter().map(|t| t.data().len() as u64).sum(),
            cold_start: served.cold_start,
            ts_ms: crate::unix_ms(),
        });
        if self.usage.len() >= USAGE_BATCH {
            self.usage_now.notify_one();
        }
        Ok((
            InferReply {
                id,
                model: slot.name.clone(),
                version: slot.version.clone(),
                outputs: outputs.iter().map(|t| t.descriptor()).collect(),
                meta: ResponseMeta {
                    node: self.node_id.clone(),
                    cold_start: served.cold_start,
                    queue_us: served.queue_us,
                    compute_us: served.compute_us,
                    queue_depth: served.queue_depth,
                },
            },
            outputs,
        ))
    }
}

/// A request to run, its caller checked.
struct Call {
    /// The caller's request id.
    id: u64,
    /// The tenant billed.
    tenant: String,
    /// Outputs wanted; all when empty.
    outputs: Vec<String>,
    /// The caller's deadline, ms; the model's own when `None`.
    timeout_ms: Option<u64>,
    /// When the request arrived.
    start: Instant,
    /// Replay protection for a `skein/infer` request (its id remembered until the route
    /// ticket expires); `None` at the HTTP ingress.
    replay: Option<Replay>,
}

/// How long a request id is remembered against replays, and whether it came in 0-RTT.
#[derive(Debug, Clone, Copy)]
struct Replay {
    /// Until when (unix ms): the route ticket's expiry plus the allowed clock skew.
    until_ms: u64,
    /// Sent in the caller's 0-RTT flight.
    early: bool,
}

/// The span of one inference request whose caller traces it (`skein.node.infer`, a child of
/// the caller's span); none otherwise. Its outcome is recorded when the request ends.
fn infer_span(req: &InferRequest) -> tracing::Span {
    use tracing::field::Empty;
    match req.trace.filter(|t| t.sampled) {
        Some(t) => tracing::info_span!(
            "skein.node.infer",
            otel.kind = "server",
            trace_id = %t.trace_hex(),
            span_id = %t.child(rand::random()).span_hex(),
            parent_span_id = %t.span_hex(),
            model = %req.model,
            version = Empty,
            request_id = req.id,
            cold_start = Empty,
            queue_us = Empty,
            compute_us = Empty,
            code = Empty,
            otel.status_code = Empty,
        ),
        None => tracing::Span::none(),
    }
}

async fn handle_infer_stream(
    shared: Arc<Shared>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    early: bool,
) {
    let max = shared.config.max_frame_len;
    let _active = ActiveGuard::new(&shared);
    let started = Instant::now();
    shared.metrics.record_path(skein_peer::Path::Direct);
    let frame = read_frame(&mut recv, max).await.map_err(WireError::from);
    let result = answer_infer(&shared, started, frame, early).await;
    let written = match result {
        Ok(Answer::Infer(reply, outputs)) => {
            let parts: Vec<skein_proto::Bytes> =
                outputs.iter().map(|t| t.bytes().clone()).collect();
            write_frame(&mut send, &InferResponse::Ok(reply), &parts, max).await
        }
        Ok(Answer::Served(s)) => write_frame(&mut send, &InferResponse::Served(s), &[], max).await,
        Err(e) => write_frame(&mut send, &InferResponse::Err(e), &[], max).await,
    };
    if let Err(e) = written {
        tracing::debug!(error = %e, "could not answer an inference request");
        if let skein_net::NetError::Frame(f) = e {
            let e = WireError::from(f);
            let _ = write_frame(&mut send, &InferResponse::Err(e), &[], max).await;
        }
    }
    let _ = send.finish();
}

/// One `/skein/infer/1` stream of the peer layer (relayed or hole-punched): the same frames,
/// the same checks (route ticket included) and the same answer as [`handle_infer_stream`].
async fn handle_peer_stream(
    shared: Arc<Shared>,
    mut stream: skein_peer::Stream,
    path: skein_peer::Path,
) {
    use futures::AsyncWriteExt;
    use skein_peer::codec::{read_frame, write_frame, FrameIoError};
    let max = shared.config.max_frame_len;
    let _active = ActiveGuard::new(&shared);
    let started = Instant::now();
    shared.metrics.record_path(path);
    let frame = read_frame(&mut stream, max).await.map_err(|e| match e {
        FrameIoError::Frame(f) => WireError::from(f),
        other => WireError::new(ErrorCode::Malformed, other.to_string()),
    });
    let result = answer_infer(&shared, started, frame, false).await;
    let written = match result {
        Ok(Answer::Infer(reply, outputs)) => {
            let parts: Vec<&[u8]> = outputs.iter().map(|t| t.data()).collect();
            write_frame(&mut stream, &InferResponse::Ok(reply), &parts, max).await
        }
        Ok(Answer::Served(s)) => {
            write_frame(&mut stream, &InferResponse::Served(s), &[], max).await
        }
        Err(e) => write_frame(&mut stream, &InferResponse::Err(e), &[], max).await,
    };
    if let Err(e) = written {
        tracing::debug!(error = %e, "could not answer an inference request (peer layer)");
        if let FrameIoError::Frame(f) = e {
            let e = WireError::from(f);
            let _ = write_frame(&mut stream, &InferResponse::Err(e), &[], max).await;
        }
    }
    let _ = stream.close().await;
}

/// Serve the peer layer's inbound `/skein/infer/1` streams until `cancel`.
async fn peer_accept_loop(
    shared: Arc<Shared>,
    mut inbound: tokio::sync::mpsc::Receiver<skein_peer::infer::Inbound>,
    cancel: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            next = inbound.recv() => next,
        };
        let Some(inb) = next else { break };
        tokio::spawn(handle_peer_stream(shared.clone(), inb.stream, inb.path));
    }
    if let Some(p) = &shared.peer {
        p.stop();
    }
}

/// What a request frame is answered with.
enum Answer {
    /// An inference's reply and outputs.
    Infer(InferReply, Vec<skein_proto::Tensor>),
    /// What this node serves (`RequestKind::Served`).
    Served(skein_proto::ServedModels),
}

/// Serve chunks of the cached artifacts on `/skein/artifact/1` (issue 20) until `cancel`: to
/// bearers of a coordinator grant naming their PeerId, checked with the ticket keys.
async fn serve_artifacts(
    shared: Arc<Shared>,
    inbound: tokio::sync::mpsc::Receiver<skein_peer::infer::Inbound>,
    cancel: CancellationToken,
) {
    let cache = shared.cache.clone();
    let tickets = shared.clone();
    shared
        .artifacts
        .clone()
        .serve(
            inbound,
            move |sha256| cache.complete_path(sha256),
            move |grant, asker, sha256| {
                let now = skein_proto::time::unix_ms();
                let verifier = tickets.tickets.read().unwrap_or_else(|p| p.into_inner());
                skein_net::grant::verify(&verifier, grant, now, asker, sha256)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            },
            cancel,
        )
        .await;
}

/// The answer to one request frame, whichever transport it came on: checks, runs, traces and
/// counts it (a `Served` request: its ticket checked, what this node serves).
/// `early`: the request came in the caller's 0-RTT flight (never on the peer layer).
async fn answer_infer(
    shared: &Arc<Shared>,
    started: Instant,
    frame: Result<skein_proto::frame::Frame, WireError>,
    early: bool,
) -> Result<Answer, WireError> {
    let mut seen = Seen::default();
    let mut span = tracing::Span::none();
    let result = async {
        let frame = frame?;
        if shared.draining.load(Ordering::SeqCst) {
            return Err(WireError::new(
                ErrorCode::ShuttingDown,
                format!("node {} is shutting down; try another node", shared.node_id),
            ));
        }
        let req: InferRequest = frame.header().map_err(|e| {
            WireError::new(
                ErrorCode::Malformed,
                format!("not an inference request: {e}"),
            )
        })?;
        if req.kind == skein_proto::RequestKind::Served {
            return Ok(Answer::Served(shared.served(&req)?));
        }
        let inputs = frame.tensors(&req.inputs).map_err(WireError::from)?;
        drop(frame);
        span = infer_span(&req);
        shared
            .infer(req, inputs, &mut seen, early)
            .instrument(span.clone())
            .await
            .map(|(reply, outputs)| Answer::Infer(reply, outputs))
    }
    .await;
    if let Ok(Answer::Served(_)) = &result {
        return result;
    }
    let code = match &result {
        Ok(_) => "ok",
        Err(e) => e.code.as_str(),
    };
    span.record("code", code);
    span.record(
        "otel.status_code",
        if code == "ok" { "ok" } else { "error" },
    );
    if let Ok(Answer::Infer(reply, _)) = &result {
        span.record("version", reply.version.as_str());
        span.record("cold_start", reply.meta.cold_start);
        span.record("queue_us", reply.meta.queue_us);
        span.record("compute_us", reply.meta.compute_us);
    }
    shared.metrics.record(
        &seen.model,
        &seen.version,
        &seen.tenant,
        code,
        started.elapsed(),
    );
    result
}

impl MemoryBudget for Shared {
    fn make_room(&self, need: u64, for_slot: &Slot) -> Result<(), WireError> {
        self.room(need, for_slot, true)
    }
}

/// The memory budget for a speculative load (the autoscaler's pre-warm): it takes only free
/// room and never unloads another replica, so a pre-warm cannot evict the model that callers
/// are using now (and be evicted in turn by its next call).
struct FreeRoomOnly<'a>(&'a Shared);

impl MemoryBudget for FreeRoomOnly<'_> {
    fn make_room(&self, need: u64, for_slot: &Slot) -> Result<(), WireError> {
        self.0.room(need, for_slot, false)
    }
}

impl Shared {
    /// Ok when `need` more bytes fit in the memory budget, after unloading least recently used
    /// idle replicas when `evict` allows.
    fn room(&self, need: u64, for_slot: &Slot, evict: bool) -> Result<(), WireError> {
        let budget = self.config.memory_budget;
        if need > budget {
            return Err(WireError::new(
                ErrorCode::NoCapacity,
                format!(
                    "`{}` needs about {} MiB, more than this node's whole memory budget of {} MiB",
                    for_slot.name,
                    need >> 20,
                    budget >> 20
                ),
            ));
        }
        let slots = self.slot_list();
        let used = |slots: &[Arc<Slot>]| slots.iter().map(|s| s.memory_bytes()).sum::<u64>();
        if used(&slots) + need <= budget {
            return Ok(());
        }
        // Least recently used idle replicas go first; provisioned ones stay. A speculative
        // load unloads none.
        let mut idle: Vec<&Arc<Slot>> = if evict {
            slots
                .iter()
                .filter(|s| s.is_loaded() && !s.keep_warm() && !std::ptr::eq(s.as_ref(), for_slot))
                .collect()
        } else {
            Vec::new()
        };
        idle.sort_by_key(|s| std::cmp::Reverse(s.idle_us().unwrap_or(u64::MAX)));
        for s in idle {
            if s.force_unload(UnloadReason::Memory) {
                tracing::info!(model = %s.name, version = %s.version, "unloaded to make room");
                self.heartbeat_now.notify_one();
            }
            if used(&slots) + need <= budget {
                return Ok(());
            }
        }
        Err(WireError::new(
            ErrorCode::NoCapacity,
            format!(
                "`{}` needs about {} MiB; {} of this node's {} MiB budget are held by {}",
                for_slot.name,
                need >> 20,
                used(&slots) >> 20,
                budget >> 20,
                if evict {
                    "busy or provisioned replicas"
                } else {
                    "loaded replicas (a pre-warm unloads none)"
                }
            ),
        )
        .retry_after(1_000))
    }
}

async fn idle_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(
        shared.config.idle_check_ms.clamp(10, 60_000),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let slots = shared.slot_list();
        let mut any = false;
        for s in slots {
            any |= s.unload_if_idle();
        }
        if any {
            shared.heartbeat_now.notify_one();
        }
    }
}

async fn probe_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let base = shared.config.probe_interval_ms.max(10);
    loop {
        // Four times as often until this node's coordinate settles: a probe mostly re-reads
        // the RTT quinn keeps measuring on an open connection (no extra packets), and a new
        // node's coordinate is worth little until it has had a few dozen samples.
        let interval = if lock(&shared.vivaldi).settled() {
            base
        } else {
            (base / 4).max(10)
        };
        // ±20 % jitter so probes of many nodes do not line up.
        let wait = (interval as f64 * rand::thread_rng().gen_range(0.8..1.2)) as u64;
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        }
        shared.probe_peers().await;
    }
    for c in lock(&shared.probes).drain() {
        c.1.close(0u32.into(), b"node stopping");
    }
}

/// `GET /metrics` (Prometheus text) and `GET /ready` (200 while serving, else 503) over
/// HTTP/1.1 until `cancel`.
async fn metrics_server(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    cancel: CancellationToken,
) {
    use axum::extract::State;
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    fn ready(s: &Shared) -> bool {
        s.heartbeat_ok.load(Ordering::SeqCst) && !s.draining.load(Ordering::SeqCst)
    }
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|State(s): State<Arc<Shared>>| async move {
                let mut slots: Vec<_> = s.slot_list().iter().map(|x| x.status()).collect();
                slots.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
                let mut lifecycle: Vec<_> = s.slot_list().iter().map(|x| x.lifecycle()).collect();
                lifecycle.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
                let mut text = s.metrics.render(&s.node_id, ready(&s), &slots, &lifecycle);
                if s.ingress.is_some() {
                    ingress::render_metrics(&s, &mut text);
                }
                render_usage_metrics(&s, &mut text);
                s.render_offline(&mut text);
                text.push_str(
                    &s.metrics
                        .render_peer(&s.node_id, s.peer.as_ref().map(|p| p.metrics())),
                );
                text.push_str(&s.artifacts.render(&s.node_id));
                ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text)
            }),
        )
        .route(
            "/ready",
            axum::routing::get(|State(s): State<Arc<Shared>>| async move {
                if ready(&s) {
                    (StatusCode::OK, "ready\n").into_response()
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
                }
            }),
        )
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "metrics endpoint failed");
    }
}

/// The usage spool and the coordinator's last answer, as Prometheus text.
fn render_usage_metrics(s: &Shared, out: &mut String) {
    use std::fmt::Write as _;
    let node = s.node_id.replace('\\', "\\\\").replace('"', "\\\"");
    let seen = lock(&s.coordinator_seen).elapsed().as_secs_f64();
    let rows: [(&str, &str, &str, f64); 3] = [
        (
            "skein_node_usage_unsent",
            "Usage records served but not yet stored by the coordinator (in the usage spool).",
            "gauge",
            s.usage.len() as f64,
        ),
        (
            "skein_node_usage_unsent_bytes",
            "Bytes of the unsent usage records in the spool.",
            "gauge",
            s.usage.bytes() as f64,
        ),
        (
            "skein_node_coordinator_last_seen_seconds",
            "Seconds since the coordinator last answered this node (a heartbeat or a usage report).",
            "gauge",
            seen,
        ),
    ];
    for (name, help, kind, value) in rows {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name}{{node=\"{node}\"}} {value}");
    }
}

/// Make the usage spool durable every 200 ms (fsync, on a blocking thread).
async fn spool_sync_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(SPOOL_SYNC) => {}
        }
        let s = shared.clone();
        match tokio::task::spawn_blocking(move || s.usage.sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "usage spool: fsync failed"),
            Err(e) => tracing::warn!(error = %e, "usage spool: fsync task failed"),
        }
    }
}

/// Ship usage records every second, or at once when a batch is full.
async fn usage_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut failures = 0u32;
    loop {
        // Every second; while the coordinator is away, 2 s then 4 s between tries.
        let wait = Duration::from_millis(1000u64 << failures.min(2));
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = shared.usage_now.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        match shared.ship_usage().await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, waiting = shared.usage.len(), "could not ship usage records");
            }
        }
    }
}

async fn heartbeat_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let base = shared.interval_ms.load(Ordering::Relaxed);
        // ±10 % jitter, longer backoff (bounded) while the coordinator is unreachable.
        let backoff = base.saturating_mul(1 << failures.min(4)).min(30_000);
        let jitter = rand::thread_rng().gen_range(0.9..1.1);
        let wait = Duration::from_millis((backoff as f64 * jitter) as u64);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = shared.heartbeat_now.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        let beat = shared.heartbeat().await;
        shared.heartbeat_ok.store(beat.is_ok(), Ordering::SeqCst);
        if beat.is_ok() {
            shared.saw_coordinator();
        }
        shared.log_reach();
        match beat {
            Ok(()) => failures = 0,
            Err(e) if e.code == ErrorCode::Forbidden => {
                // Revoked: serve nothing more; the operator must join it again.
                tracing::error!("the coordinator refuses this node: {}", e.message);
                shared.draining.store(true, Ordering::SeqCst);
                failures = failures.saturating_add(1);
            }
            Err(e) if e.code == ErrorCode::UnknownNode => {
                tracing::error!("the coordinator no longer knows this node: {}", e.message);
                if let Some(token) = shared.config.join_token.clone() {
                    match identity::join(
                        shared.ctl.endpoint(),
                        shared.ctl.addr(),
                        &token,
                        &shared.config.data_dir,
                        shared.peer_binding.clone(),
                    )
                    .await
                    {
                        Ok(_) => {
                            tracing::info!("re-joined; restart the node to use the new certificate")
                        }
                        Err(e) => tracing::error!("re-join failed: {e:#}"),
                    }
                }
                failures = failures.saturating_add(1);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    }
}

/// A running node.
pub struct Node {
    /// The LAN's nodes, when LAN discovery is on.
    lan: Option<skein_client::lan::LanBrowser>,
    node_id: String,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.node_id)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Join (first start) or reuse the stored identity, bind the infer endpoint, send a first
    /// heartbeat, and start serving.
    pub async fn start(mut config: NodeConfig) -> anyhow::Result<Node> {
        let (choice, ort) = (config.backend, config.ort.clone());
        // ONNX Runtime's intra-op threads default to the cores this node may use.
        let threads = config.max_concurrency.max(1) as usize;
        let backend = tokio::task::spawn_blocking(move || {
            crate::backend::Backend::select(choice, &ort, threads)
        })
        .await
        .context("probing accelerators")?
        .map_err(anyhow::Error::msg)?;
        // The accelerator label is the node's to set, from the backend it runs.
        if config
            .labels
            .remove(skein_proto::ACCELERATOR_LABEL)
            .is_some()
        {
            tracing::warn!(
                "the `{}` label is set from the backend; the configured one is ignored",
                skein_proto::ACCELERATOR_LABEL
            );
        }
        if backend.is_gpu() {
            config
                .labels
                .insert(skein_proto::ACCELERATOR_LABEL.into(), "gpu".into());
        }
        // Likewise the engine label, which decides where a model only some engines run goes.
        config.labels.insert(
            skein_proto::ENGINE_LABEL.into(),
            backend.engine_label().into(),
        );
        tracing::info!(backend = backend.name, ort_version = %backend.ort_version, ort_providers = ?backend.ort_providers, accelerators = ?backend.accelerators.iter().map(|a| &a.name).collect::<Vec<_>>(), "execution backend");
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let coordinator = tokio::net::lookup_host(&config.coordinator)
            .await
            .with_context(|| format!("resolving the coordinator address `{}`", config.coordinator))?
            .next()
            .with_context(|| format!("`{}` resolves to no address", config.coordinator))?;
        let creds: Credentials = match identity::load(&dir)? {
            Some(c) => c,
            None => {
                let Some(token) = config.join_token.as_deref() else {
                    bail!("this node has not joined a mesh yet: give it a join token (--join-token or SKEIN_JOIN_TOKEN)");
                };
                let bind = if coordinator.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let ep = skein_net::client_endpoint(bind.parse()?)?;
                // The peer layer's identity, bound to this node's at join.
                let binding = if config.peer.enabled {
                    Some(crate::peer::binding(&dir, &identity::node_id(&dir)?)?)
                } else {
                    None
                };
                let creds = identity::join(&ep, coordinator, token, &dir, binding).await?;
                ep.close(0u32.into(), b"joined");
                creds
            }
        };
        let node_id = identity::node_id(&dir)?;
        let limits = TransportLimits {
            max_frame_len: config.max_frame_len,
            profile: config.transport.clone(),
            ..TransportLimits::default()
        };
        let endpoint = skein_net::server_endpoint(
            config.listen,
            &creds,
            &[ALPN_INFER],
            // Callers need no certificate: every request carries a route ticket the
            // coordinator signed, which the node checks.
            ClientAuth::Optional,
            // 0-RTT only here: `skein/infer` is replay-safe (see `replay`).
            &TransportLimits {
                zero_rtt: config.zero_rtt,
                ..limits.clone()
            },
        )
        .with_context(|| format!("binding {}", config.listen))?;
        let bound = endpoint.local_addr()?;
        let ctl = CtlClient::new(
            endpoint.clone(),
            coordinator,
            client_config(&creds, ALPN_CTL, &limits)?,
            CtlConfig {
                max_frame_len: config.max_frame_len,
                ..CtlConfig::default()
            },
        );
        let advertise = match config.advertise {
            Some(a) => a,
            None if !bound.ip().is_unspecified() => bound,
            None => {
                // The address this host sends from towards the coordinator: the kernel's route
                // choice, read from a connected UDP socket (nothing is sent). quinn's
                // `local_ip()` is only a fallback: on a wildcard socket it is often empty.
                let ip = match crate::address::route_source_ip(coordinator) {
                    Ok(ip) => ip,
                    Err(e) => {
                        let conn = ctl.connection().await?;
                        conn.local_ip().with_context(|| {
                            format!("cannot tell this host's address towards the coordinator ({e}); set --advertise")
                        })?
                    }
                };
                SocketAddr::new(ip, bound.port())
            }
        };
        let node_peer = if config.peer.enabled {
            Some(
                crate::peer::start(&config.peer, &config.transport, &dir, &node_id)
                    .await
                    .context("starting the peer layer")?,
            )
        } else {
            None
        };
        let (peer, peer_binding, peer_inbound) = match node_peer {
            Some(p) => (Some(p.peer), Some(p.binding), Some(p.inbound)),
            None => (None, None, None),
        };
        let http = match config.http.listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding the HTTP ingress {a} (--http)"))?,
            ),
            None => None,
        };
        let ingress = http.as_ref().map(|l| l.local_addr()).transpose()?.map(|a| {
            if a.ip().is_unspecified() {
                SocketAddr::new(advertise.ip(), a.port())
            } else {
                a
            }
        });
        let key_cache = ingress::key_cache_config(&config.http);
        let shared = Arc::new(Shared {
            owners: RwLock::new(HashMap::new()),
            keys: Mutex::new(crate::key_cache::KeyCache::new(key_cache)),
            ingress,
            key_checks: AtomicU64::new(0),
            key_check_lock: tokio::sync::Mutex::new(()),
            peer,
            peer_binding,
            backend,
            cache: ArtifactCache::open(&dir, config.cache_budget)?,
            node_id: node_id.clone(),
            advertise,
            ctl,
            slots: RwLock::new(HashMap::new()),
            latest: RwLock::new(HashMap::new()),
            heartbeat_now: Notify::new(),
            seq: AtomicU64::new(0),
            interval_ms: AtomicU64::new(1_000),
            fetches: tokio::sync::Semaphore::new(2),
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            drained: Notify::new(),
            vivaldi: Mutex::new(Vivaldi::new(VivaldiConfig::default())),
            peers: Mutex::new(Vec::new()),
            probes: Mutex::new(HashMap::new()),
            probe_cfg: client_config(&creds, ALPN_INFER, &limits)?,
            tickets: RwLock::new(TicketVerifier::default()),
            ticket_keys: Mutex::new(Vec::new()),
            limiter: TenantLimiter::default(),
            usage: UsageBuffer::open(&dir, config.max_pending_usage)
                .with_context(|| format!("opening the usage spool in {}", dir.display()))?,
            usage_now: Notify::new(),
            coordinator_seen: Mutex::new(Instant::now()),
            metrics: crate::metrics::NodeMetrics::default(),
            heartbeat_ok: AtomicBool::new(false),
            replays: Mutex::new(crate::replay::ReplayGuard::new(config.replay_memory)),
            offline: offline::OfflineState::default(),
            artifacts: Arc::new(crate::peer_artifacts::PeerArtifacts::new(
                config.peer.upload_limit_bytes(),
            )),
            lan: std::sync::OnceLock::new(),
            lan_bindings: Default::default(),
            config,
        });
        match shared.heartbeat().await {
            Ok(()) => {
                shared.heartbeat_ok.store(true, Ordering::SeqCst);
                shared.saw_coordinator();
            }
            // Unreachable (not a refusal): start offline from the saved answer, if any.
            Err(e) if !matches!(e.code, ErrorCode::Forbidden | ErrorCode::UnknownNode) => {
                let Some((ack, age)) = offline::load_answer(&shared.config.data_dir) else {
                    return Err(anyhow::Error::new(e).context(
                        "first heartbeat to the coordinator (and no saved heartbeat answer to start offline from)",
                    ));
                };
                tracing::warn!(error = %e, saved_s_ago = age.as_secs_f64(), models = ack.assignments.len(), "offline: the coordinator cannot be reached; starting from the saved heartbeat answer");
                *lock(&shared.coordinator_seen) = offline::ago(age);
                shared.offline.start_offline();
                shared.apply_answer(ack, None).await;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context("first heartbeat to the coordinator"))
            }
        }
        let cancel = CancellationToken::new();
        let metrics = match shared.config.metrics_listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding the metrics endpoint {a}"))?,
            ),
            None => None,
        };
        let metrics_addr = metrics.as_ref().map(|l| l.local_addr()).transpose()?;
        let mut tasks = vec![
            tokio::spawn({
                let shared = shared.clone();
                let early = if shared.config.zero_rtt {
                    skein_net::serve::EarlyData::Accept
                } else {
                    skein_net::serve::EarlyData::Refuse
                };
                skein_net::serve::accept_loop_with(
                    endpoint.clone(),
                    cancel.clone(),
                    MAX_CONNECTIONS,
                    early,
                    move |r, early| handle_infer_stream(shared.clone(), r.send, r.recv, early),
                )
            }),
            tokio::spawn(heartbeat_loop(shared.clone(), cancel.clone())),
            tokio::spawn(probe_loop(shared.clone(), cancel.clone())),
            tokio::spawn(idle_loop(shared.clone(), cancel.clone())),
            tokio::spawn(usage_loop(shared.clone(), cancel.clone())),
            tokio::spawn(spool_sync_loop(shared.clone(), cancel.clone())),
        ];
        if let Some(inbound) = peer_inbound {
            tasks.push(tokio::spawn(peer_accept_loop(
                shared.clone(),
                inbound,
                cancel.clone(),
            )));
        }
        if let Some(inbound) = shared.peer.as_ref().and_then(|p| p.take_artifact_inbound()) {
            tasks.push(tokio::spawn(serve_artifacts(
                shared.clone(),
                inbound,
                cancel.clone(),
            )));
        }
        if let Some(l) = metrics {
            tasks.push(tokio::spawn(metrics_server(
                shared.clone(),
                l,
                cancel.clone(),
            )));
        }
        // One mDNS responder for the ingress's record and LAN discovery (issue 20).
        let responder = if (http.is_some() && shared.config.http.mdns) || shared.config.lan.mdns {
            match crate::mdns::Responder::start() {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "mDNS: cannot start the responder; nothing is advertised on the LAN");
                    None
                }
            }
        } else {
            None
        };
        let lan = match (&responder, shared.config.lan.mdns) {
            (Some(r), true) => offline::start_lan(&shared, r),
            _ => None,
        };
        if let Some(l) = &lan {
            let _ = shared.lan.set(l.clone());
        }
        if let Some(l) = http {
            tasks.extend(
                ingress::start(
                    shared.clone(),
                    l,
                    &creds,
                    cancel.clone(),
                    responder.as_ref(),
                )
                .await?,
            );
        }
        if let Some(r) = responder {
            let cancel = cancel.clone();
            tasks.push(tokio::spawn(async move {
                cancel.cancelled().await;
                r.shutdown().await;
            }));
        }
        tracing::info!(%node_id, addr = %advertise, metrics = ?metrics_addr, http = ?ingress, "node serving");
        Ok(Node {
            lan,
            node_id,
            addr: advertise,
            metrics_addr,
            http_addr: ingress,
            shared,
            endpoint,
            cancel,
            tasks,
        })
    }

    /// The node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The other nodes on this node's LAN (mDNS, `_skein-peer._udp`), most recently announced
    /// first; empty unless LAN discovery is on (`[lan] mdns`). Bounded and expiring (see
    /// skein-client's `lan::LanPeers`): for the artifact fetch to find LAN holders.
    pub fn lan_peers(&self) -> Vec<skein_client::lan::LanPeer> {
        let mut peers = self.lan.as_ref().map(|b| b.peers()).unwrap_or_default();
        peers.retain(|p| p.node_id != self.node_id);
        peers
    }

    /// The advertised infer address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The peer layer's state (PeerId, addresses, reachability, relay), when it runs.
    pub fn peer_status(&self) -> Option<skein_peer::PeerStatus> {
        self.shared.peer.as_ref().map(|p| p.status())
    }

    /// Where `GET /metrics` and `GET /ready` are served, when `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where the HTTP ingress (V2 API) listens, when `http.listen` is set.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// API keys this node has asked the coordinator about (its HTTP ingress's key checks).
    pub fn key_checks(&self) -> u64 {
        self.shared.key_checks.load(Ordering::Relaxed)
    }

    /// The address the infer endpoint is bound to (differs from [`addr`](Self::addr) when
    /// the node advertises another, e.g. behind a relay or NAT).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// A token that stops the node when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stop gracefully: drain (tell the coordinator to route nothing new here, refuse new
    /// requests with `ShuttingDown` so callers fail over, finish the running ones, for at most
    /// `drain_timeout` from the config), then close connections and wait for the tasks.
    pub async fn shutdown(self) {
        let shared = &self.shared;
        shared.draining.store(true, Ordering::SeqCst);
        let limit = Duration::from_millis(shared.config.drain_timeout_ms);
        let until = Instant::now() + limit;
        if let Err(e) = tokio::time::timeout(limit, shared.heartbeat()).await {
            tracing::warn!("could not tell the coordinator that this node drains: {e}");
        }
        loop {
            let drained = shared.drained.notified();
            let active = shared.active.load(Ordering::SeqCst);
            if active == 0 {
                break;
            }
            tracing::info!(active, "draining: waiting for running requests");
            if tokio::time::timeout_at(until, drained).await.is_err() {
                tracing::warn!(active, "drain timeout: closing with requests still running");
                break;
            }
        }
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        // Every served request's record goes to the ledger before the node leaves.
        let left = until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(2));
        match tokio::time::timeout(left, shared.ship_usage()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, records = shared.usage.len(), "usage records not shipped")
            }
            Err(_) => tracing::warn!(
                records = shared.usage.len(),
                "usage records not shipped in time"
            ),
        }
        // What is left stays in the spool for the next start.
        if let Err(e) = shared.usage.sync() {
            tracing::warn!(error = %e, "usage spool: fsync failed");
        }
        self.endpoint.close(0u32.into(), b"node shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    /// Stop at once, as a crash would: tasks aborted, connections dropped, nothing drained.
    pub fn kill(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.cancel.cancel();
        self.endpoint.close(1u32.into(), b"killed");
    }
}

/// Run a node until `shutdown` is cancelled (the `skein-node` entry point).
pub async fn run(config: NodeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let node = Node::start(config).await?;
    shutdown.cancelled().await;
    node.shutdown().await;
    Ok(())
}
