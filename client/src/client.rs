//! The [`Client`]: resolve, route cache, direct QUIC calls to nodes, failover.

use crate::routing::{self, LocalRouter};
use crate::{Error, Profile};
use skein_net::artifact::{self, CoordinatorSource, FetchRequest};
use skein_net::endpoint::{client_config, connect, TransportLimits};
use skein_net::stream::{read_frame, write_frame};
use skein_net::{Credentials, CtlClient, CtlConfig};
use skein_policy::failover::{Failover, FailoverConfig, Failure, Next, Outcome, Penalty};
use skein_policy::routing::Strategy;
use skein_proto::{
    AdminRequest, AdminResponse, ArtifactId, CallerPosition, Candidate, CtlEnvelope, CtlRequest,
    CtlResponse, DeployRequest, DeploymentSettings, ErrorCode, InferRequest, InferResponse,
    ModelInfo, NodeInfo, Resolution, ResolveRequest, ResponseMeta, SettingsPatch, Tensor,
    TraceContext, UsageQuery, UsageRow, WireError, ALPN_CTL, ALPN_INFER,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

/// The largest artifact [`Client::fetch_artifact`] downloads into memory.
const MAX_ARTIFACT: u64 = 4 << 30;
/// Routes and node connections kept at most (bounded caches).
const MAX_CACHED: usize = 1024;
/// While a call waits on a node, how often the coordinator is asked whether that node died.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How long past its TTL a cached route is still used while a fresh one is fetched (or while
/// the coordinator cannot be reached).
const STALE_GRACE: Duration = Duration::from_secs(60);

/// SDK settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Default deadline of a request, resolve and retries included (default 30 s).
    pub timeout: Duration,
    /// Nodes tried per request before giving up (default 3).
    pub max_attempts: u32,
    /// Largest frame sent or accepted (default 64 MiB).
    pub max_frame_len: u32,
    /// Connection set-up timeout (default 5 s).
    pub connect_timeout: Duration,
    /// How a node is chosen per call among the coordinator's candidates (default
    /// latency-aware: the least expected completion time, power of two choices among the
    /// near-best; `round-robin` and `least-loaded` exist for comparison).
    pub routing: Strategy,
    /// This client's region label: the RTT prior until network coordinates settle.
    pub region: Option<String>,
    /// This client's zone label.
    pub zone: Option<String>,
    /// The API key sent with every request (`skn_...`); a coordinator started with
    /// `insecure_dev` also takes requests without one.
    pub api_key: Option<ApiKey>,
    /// Seed of the generator that draws a call's version from a traffic split (calls without a
    /// sticky key); `None` (the default) seeds it from the OS. Tests set it so that the same
    /// calls land on the same versions on every run.
    pub split_seed: Option<u64>,
}

/// An API key (`skn_<id>_<secret>`). Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wrap a key text (checked by the coordinator, not here).
    pub fn new(key: impl Into<String>) -> ApiKey {
        ApiKey(key.into().trim().to_string())
    }

    /// The key text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The id (`skn_<id>_`) is not secret and helps tell keys apart.
        let id = self.0.split('_').nth(1).unwrap_or("?");
        write!(f, "ApiKey(skn_{id}_…)")
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            timeout: Duration::from_secs(30),
            max_attempts: 3,
            max_frame_len: skein_proto::DEFAULT_MAX_FRAME_LEN,
            connect_timeout: Duration::from_secs(5),
            routing: Strategy::default(),
            region: None,
            zone: None,
            api_key: None,
            split_seed: None,
        }
    }
}

/// Per-call options.
#[derive(Debug, Clone, Default)]
pub struct InferOptions {
    /// Model version; latest when `None`.
    pub version: Option<String>,
    /// Outputs wanted; all when empty.
    pub outputs: Vec<String>,
    /// Deadline for this call; the client default when `None`.
    pub timeout: Option<Duration>,
    /// With a traffic split and no version: calls with the same key always get the same
    /// version (A/B tests by user or session); a random pick by weight when `None`.
    pub sticky_key: Option<String>,
    /// Call with this API key instead of the client's own (a gateway serving many callers).
    pub api_key: Option<ApiKey>,
    /// The caller's trace context (e.g. from an HTTP `traceparent` header): the call's span
    /// becomes its child. A new trace when `None`.
    pub trace: Option<TraceContext>,
}

/// Outputs and how they were served.
#[derive(Debug, Clone)]
pub struct InferResult {
    /// Model name.
    pub model: String,
    /// Version that served.
    pub version: String,
    /// Outputs, graph order.
    pub outputs: Vec<Tensor>,
    /// Node, queue and compute time, cold start.
    pub meta: ResponseMeta,
    /// Nodes tried before this one succeeded.
    pub failovers: u32,
    /// The trace this call ran in (look it up in your tracing backend).
    pub trace_id: u128,
    /// The path the call took: direct, relayed or hole-punched.
    pub path: crate::path::CallPath,
}

impl InferResult {
    /// The output named `name`.
    pub fn output(&self, name: &str) -> Option<&Tensor> {
        self.outputs.iter().find(|t| t.name() == name)
    }
}

/// Routes are cached per caller key (tickets name the tenant), model and version.
type RouteKey = (Option<ApiKey>, String, Option<String>);

struct CachedRoute {
    resolution: Resolution,
    expires: Instant,
}

struct Inner {
    config: ClientConfig,
    infer_cfg: quinn::ClientConfig,
    /// The control link to the coordinator (its endpoint is also the one node calls leave from).
    ctl: CtlClient,
    nodes: Mutex<HashMap<String, quinn::Connection>>,
    routes: Mutex<HashMap<RouteKey, CachedRoute>>,
    /// Routes being refreshed in the background.
    refreshing: Mutex<std::collections::HashSet<RouteKey>>,
    next_id: AtomicU64,
    router: LocalRouter,
    /// Draws versions from traffic splits ([`ClientConfig::split_seed`]).
    split_rng: Mutex<rand::rngs::StdRng>,
    /// Calls by path.
    paths: crate::path::PathCounts,
    /// The peer layer, for nodes behind NAT (started on first use).
    peer_caller: crate::path::PeerCaller,
}

/// A handle to a Skein mesh. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("coordinator", &self.inner.ctl.addr())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Client {
    /// Connect to the coordinator at `addr` (`host:port`) with `creds`.
    pub async fn connect(addr: &str, creds: Credentials) -> Result<Client, Error> {
        Self::connect_with(addr, creds, ClientConfig::default()).await
    }

    /// Connect using a [`Profile`] (its API key included).
    pub async fn from_profile(profile: &Profile) -> Result<Client, Error> {
        Self::from_profile_with(profile, ClientConfig::default()).await
    }

    /// Connect using a [`Profile`] and `config`; the profile's API key unless `config` has one.
    pub async fn from_profile_with(
        profile: &Profile,
        mut config: ClientConfig,
    ) -> Result<Client, Error> {
        if config.api_key.is_none() {
            config.api_key = profile.api_key.clone().map(ApiKey::new);
        }
        Self::connect_with(&profile.coordinator, profile.credentials(), config).await
    }

    /// Connect with explicit settings.
    pub async fn connect_with(
        addr: &str,
        creds: Credentials,
        config: ClientConfig,
    ) -> Result<Client, Error> {
        let coordinator = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| Error::Config(format!("coordinator address `{addr}`: {e}")))?
            .next()
            .ok_or_else(|| Error::Config(format!("`{addr}` resolves to no address")))?;
        let limits = TransportLimits {
            max_frame_len: config.max_frame_len,
            ..TransportLimits::default()
        };
        let bind: SocketAddr = if coordinator.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let endpoint = skein_net::client_endpoint(bind)?;
        let client = Client {
            inner: Arc::new(Inner {
                infer_cfg: client_config(&creds, ALPN_INFER, &limits)?,
                ctl: CtlClient::new(
                    endpoint,
                    coordinator,
                    client_config(&creds, ALPN_CTL, &limits)?,
                    CtlConfig {
                        connect_timeout: config.connect_timeout,
                        call_timeout: Some(config.timeout),
                        max_frame_len: config.max_frame_len,
                        ..CtlConfig::default()
                    },
                ),
                nodes: Mutex::new(HashMap::new()),
                routes: Mutex::new(HashMap::new()),
                refreshing: Mutex::new(std::collections::HashSet::new()),
                next_id: AtomicU64::new(rand::random::<u64>() >> 1),
                router: LocalRouter::new(config.routing),
                split_rng: Mutex::new(match config.split_seed {
                    Some(seed) => rand::SeedableRng::seed_from_u64(seed),
                    None => rand::SeedableRng::from_entropy(),
                }),
                paths: crate::path::PathCounts::default(),
                peer_caller: crate::path::PeerCaller::default(),
                config,
            }),
        };
        client.inner.ctl.connection().await?;
        Ok(client)
    }

    /// Send a control request with this client's API key and return the answer (errors as
    /// [`Error::Remote`]).
    pub async fn control(&self, req: &CtlRequest) -> Result<CtlResponse, Error> {
        Ok(self.control_rtt(req, self.key(None)).await?.0)
    }

    /// Send a control request with `key` (none: anonymous).
    pub async fn control_as(
        &self,
        req: &CtlRequest,
        key: Option<&ApiKey>,
    ) -> Result<CtlResponse, Error> {
        Ok(self.control_rtt(req, key).await?.0)
    }

    /// The key to send: `over` if given, else the client's own.
    fn key<'a>(&'a self, over: Option<&'a ApiKey>) -> Option<&'a ApiKey> {
        over.or(self.inner.config.api_key.as_ref())
    }

    fn envelope(req: &CtlRequest, key: Option<&ApiKey>) -> CtlEnvelope {
        CtlEnvelope::new(req.clone(), key.map(|k| k.as_str().to_string()))
    }

    /// Like [`control`](Self::control), with the coordinator connection's RTT.
    async fn control_rtt(
        &self,
        req: &CtlRequest,
        key: Option<&ApiKey>,
    ) -> Result<(CtlResponse, Duration), Error> {
        Ok(self.inner.ctl.call(&Self::envelope(req, key)).await?)
    }

    /// Ranked candidate nodes for `model` (fresh from the coordinator; also refreshes the cache).
    pub async fn resolve(&self, model: &str, version: Option<&str>) -> Result<Resolution, Error> {
        self.resolve_sized(self.key(None), model, version, 0, None)
            .await
    }

    /// The API key this client sends by default.
    pub fn api_key(&self) -> Option<&ApiKey> {
        self.inner.config.api_key.as_ref()
    }

    /// Like [`resolve`](Self::resolve), with `key` instead of the client's own.
    pub async fn resolve_as(
        &self,
        model: &str,
        version: Option<&str>,
        key: Option<&ApiKey>,
    ) -> Result<Resolution, Error> {
        self.resolve_sized(self.key(key), model, version, 0, None)
            .await
    }

    /// This client's position as sent with resolves: its network coordinate, recent RTT
    /// samples to nodes, and its region/zone labels.
    pub fn position(&self) -> CallerPosition {
        let c = &self.inner.config;
        self.inner.router.position(c.region.clone(), c.zone.clone())
    }

    /// Rank the nodes for `model` as the coordinator would for a caller at `position` moving
    /// `payload_bytes` per request (not cached; `skein route` shows this).
    pub async fn explain_route(
        &self,
        model: &str,
        version: Option<&str>,
        position: CallerPosition,
        payload_bytes: u64,
    ) -> Result<Resolution, Error> {
        Ok(self
            .resolve_request(
                self.key(None),
                model,
                version,
                position,
                payload_bytes,
                None,
            )
            .await?
            .0)
    }

    /// One resolve as asked, with the coordinator connection's RTT.
    async fn resolve_request(
        &self,
        key: Option<&ApiKey>,
        model: &str,
        version: Option<&str>,
        position: CallerPosition,
        payload_bytes: u64,
        trace: Option<TraceContext>,
    ) -> Result<(Resolution, Duration), Error> {
        let req = CtlRequest::Resolve(ResolveRequest {
            model: model.to_string(),
            version: version.map(str::to_string),
            position,
            payload_bytes,
            trace,
        });
        match self.control_rtt(&req, key).await? {
            (CtlResponse::Resolved(r), rtt) => Ok((r, rtt)),
            (other, _) => Err(unexpected(other)),
        }
    }

    async fn resolve_sized(
        &self,
        key: Option<&ApiKey>,
        model: &str,
        version: Option<&str>,
        payload_bytes: u64,
        trace: Option<TraceContext>,
    ) -> Result<Resolution, Error> {
        let (r, rtt) = self
            .resolve_request(key, model, version, self.position(), payload_bytes, trace)
            .await?;
        if let Some(c) = &r.coordinator {
            self.inner.router.observe_coordinate(c, rtt);
        }
        self.drop_dead(&r.dead);
        let mut routes = lock(&self.inner.routes);
        if routes.len() >= MAX_CACHED {
            let now = Instant::now();
            routes.retain(|_, c| c.expires + STALE_GRACE > now);
            if routes.len() >= MAX_CACHED {
                routes.clear();
            }
        }
        routes.insert(
            (key.cloned(), model.to_string(), version.map(str::to_string)),
            CachedRoute {
                resolution: r.clone(),
                expires: Instant::now() + Duration::from_millis(r.ttl_ms),
            },
        );
        Ok(r)
    }

    async fn route(
        &self,
        key: Option<&ApiKey>,
        model: &str,
        version: Option<&str>,
        payload_bytes: u64,
        trace: Option<TraceContext>,
    ) -> Result<Resolution, Error> {
        let cache_key = (key.cloned(), model.to_string(), version.map(str::to_string));
        let now = Instant::now();
        let stale = match lock(&self.inner.routes).get(&cache_key) {
            Some(c) if c.expires > now => return Ok(c.resolution.clone()),
            Some(c) if c.expires + STALE_GRACE > now => Some(c.resolution.clone()),
            _ => None,
        };
        match stale {
            // Past its TTL but recent: use it for this call and fetch a fresh one meanwhile, so
            // a slow or restarting coordinator costs callers nothing (the ticket inside still
            // bounds how long it can be used).
            Some(r) => {
                self.refresh_in_background(cache_key, payload_bytes);
                Ok(r)
            }
            None => {
                self.resolve_sized(key, model, version, payload_bytes, trace)
                    .await
            }
        }
    }

    /// Resolve `key` again on a task of its own (one at a time per route). A definite refusal
    /// (the model is gone, the key revoked, the budget spent) drops the cached route, so the
    /// next call sees it; an unreachable coordinator, or one that knows no node yet, keeps it.
    fn refresh_in_background(&self, key: RouteKey, payload_bytes: u64) {
        {
            let mut refreshing = lock(&self.inner.refreshing);
            if refreshing.len() >= MAX_CACHED || !refreshing.insert(key.clone()) {
                return;
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            let (k, model, version) = &key;
            match me
                .resolve_sized(k.as_ref(), model, version.as_deref(), payload_bytes, None)
                .await
            {
                Ok(_) => {}
                // A coordinator that has just restarted knows no nodes yet (`no_capacity`):
                // only a definite refusal drops the route.
                Err(Error::Remote(e)) if !e.code.is_retryable() => {
                    tracing::debug!(error = %e, %model, "route refused on refresh; dropping it");
                    lock(&me.inner.routes).remove(&key);
                }
                Err(e) => {
                    tracing::debug!(error = %e, %model, "route refresh failed; the cached route stays in use")
                }
            }
            lock(&me.inner.refreshing).remove(&key);
        });
    }

    fn forget_route(&self, key: Option<&ApiKey>, model: &str, version: Option<&str>) {
        lock(&self.inner.routes).remove(&(
            key.cloned(),
            model.to_string(),
            version.map(str::to_string),
        ));
    }

    async fn node_conn(&self, node_id: &str, addr: &str) -> Result<quinn::Connection, Error> {
        if let Some(c) = lock(&self.inner.nodes).get(node_id) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let sock: SocketAddr = addr.parse().map_err(|_| {
            Error::Transport(format!("node {node_id} advertises a bad address `{addr}`"))
        })?;
        let c = connect(
            self.inner.ctl.endpoint(),
            self.inner.infer_cfg.clone(),
            sock,
            &skein_net::node_server_name(node_id),
            self.inner.config.connect_timeout,
        )
        .await
        .map_err(|e| Error::Transport(format!("node {node_id} at {addr}: {e}")))?;
        let mut nodes = lock(&self.inner.nodes);
        if nodes.len() >= MAX_CACHED {
            nodes.retain(|_, c| c.close_reason().is_none());
        }
        nodes.insert(node_id.to_string(), c.clone());
        Ok(c)
    }

    /// Close connections to nodes the coordinator declared dead: requests in flight there fail
    /// (and fail over) now instead of waiting for the transport's idle timeout.
    fn drop_dead(&self, dead: &[String]) {
        if dead.is_empty() {
            return;
        }
        let mut nodes = lock(&self.inner.nodes);
        for id in dead {
            if let Some(c) = nodes.remove(id) {
                tracing::debug!(node = %id, "the coordinator declared this node dead; dropping its connection");
                c.close(0u32.into(), b"node declared dead");
            }
        }
    }

    fn forget_node(&self, node_id: &str) {
        lock(&self.inner.nodes).remove(node_id);
    }

    /// Run `model` (latest version) on `inputs`.
    pub async fn infer(&self, model: &str, inputs: Vec<Tensor>) -> Result<InferResult, Error> {
        self.infer_with(model, inputs, InferOptions::default())
            .await
    }

    /// Run `model` with options (version, outputs, deadline, trace).
    ///
    /// Every call is traced: it runs in a `skein.client.infer` span whose trace context (a new
    /// trace, or a child of [`InferOptions::trace`]) travels with the resolve to the
    /// coordinator and with the request to the node, whose spans become its children.
    pub async fn infer_with(
        &self,
        model: &str,
        inputs: Vec<Tensor>,
        opts: InferOptions,
    ) -> Result<InferResult, Error> {
        use tracing::field::Empty;
        let trace = TraceContext::child_or_root(opts.trace, rand::random(), rand::random());
        let span = tracing::info_span!(
            "skein.client.infer",
            otel.kind = "client",
            trace_id = %trace.trace_hex(),
            span_id = %trace.span_hex(),
            parent_span_id = Empty,
            model,
            node = Empty,
            failovers = Empty,
            code = Empty,
            otel.status_code = Empty,
        );
        if let Some(p) = opts.trace {
            span.record("parent_span_id", p.span_hex());
        }
        let result = self
            .infer_traced(model, inputs, opts, trace)
            .instrument(span.clone())
            .await;
        match &result {
            Ok(r) => {
                span.record("node", r.meta.node.as_str());
                span.record("failovers", r.failovers);
                span.record("code", "ok");
                span.record("otel.status_code", "ok");
            }
            Err(e) => {
                span.record("code", e.code().map_or("transport", |c| c.as_str()));
                span.record("otel.status_code", "error");
            }
        }
        result
    }

    async fn infer_traced(
        &self,
        model: &str,
        inputs: Vec<Tensor>,
        opts: InferOptions,
        trace: TraceContext,
    ) -> Result<InferResult, Error> {
        let timeout = opts.timeout.unwrap_or(self.inner.config.timeout);
        let key = self.key(opts.api_key.as_ref());
        let started = Instant::now();
        let deadline = started + timeout;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let payload: u64 = inputs.iter().map(|t| t.data().len() as u64).sum();
        // No version named and a traffic split set: this call's version, by weight.
        // Without a split that first route is the one to use: keep it for the first round.
        let mut prefetched = None;
        let picked = match &opts.version {
            Some(_) => None,
            None => {
                let route = match tokio::time::timeout_at(
                    deadline,
                    self.route(key, model, None, payload, Some(trace)),
                )
                .await
                {
                    Ok(r) => r?,
                    Err(_) => return Err(Error::Timeout(timeout)),
                };
                let picked = pick_version(
                    &route.split,
                    opts.sticky_key.as_deref(),
                    &mut *self
                        .inner
                        .split_rng
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()),
                );
                if picked.is_none() {
                    prefetched = Some(route);
                }
                picked
            }
        };
        let version = opts.version.as_deref().or(picked.as_deref());
        // Every decision (which errors move on, the ticket refresh, the backoff, attempts,
        // deadline) is the policy's `Failover`; this loop only does what it asks for.
        let now_us = || micros(started.elapsed());
        let mut failover = Failover::new(
            FailoverConfig {
                max_attempts: self.inner.config.max_attempts,
                ..FailoverConfig::default()
            },
            micros(timeout),
        );
        let router = &self.inner.router;
        let mut route: Option<Resolution> = None;
        let mut order: Vec<Candidate> = Vec::new();
        let mut next = failover.start();
        loop {
            next = match next {
                Next::Resolve { fresh } => {
                    if fresh {
                        self.forget_route(key, model, version);
                    }
                    let resolved = match prefetched.take() {
                        Some(r) => r,
                        None => match tokio::time::timeout_at(
                            deadline,
                            self.route(key, model, version, payload, Some(trace)),
                        )
                        .await
                        {
                            Ok(r) => r?,
                            Err(_) => return Err(Error::Timeout(timeout)),
                        },
                    };
                    order = router.pick(&resolved.candidates, failover.tried());
                    let ids = order.iter().map(|c| c.node_id.as_str());
                    let next = failover.on_route(now_us(), ids, &mut rand::thread_rng());
                    route = Some(resolved);
                    next
                }
                Next::Backoff(us) => {
                    tokio::time::sleep(Duration::from_micros(us)).await;
                    Next::Resolve { fresh: true }
                }
                Next::Fail(failure) => {
                    return Err(match failure {
                        Failure::Error(e) => e,
                        Failure::Deadline => Error::Timeout(timeout),
                        Failure::NoCandidate => Error::Remote(WireError::new(
                            ErrorCode::NoCapacity,
                            format!("no node could serve `{model}`"),
                        )),
                    })
                }
                Next::TryNode(i) => {
                    let (Some(route), Some(cand)) = (route.as_ref(), order.get(i)) else {
                        return Err(Error::Transport(format!(
                            "failover asked for candidate {i} of {}",
                            order.len()
                        )));
                    };
                    let left = deadline.saturating_duration_since(Instant::now());
                    // The same id on every attempt: a node can tell a retry from a new request.
                    let req = InferRequest {
                        id,
                        model: route.model.clone(),
                        version: Some(route.version.clone()),
                        inputs: inputs.iter().map(|t| t.descriptor()).collect(),
                        outputs: opts.outputs.clone(),
                        timeout_ms: Some(left.as_millis() as u64),
                        ticket: route.ticket.clone(),
                        trace: Some(trace),
                    };
                    let sent = Instant::now();
                    let outstanding = router.start(&cand.node_id);
                    // While the node has not answered, ask the coordinator about once a second
                    // (one refresh per route at a time): if it has declared the node dead, the
                    // refresh closes the connection, this call fails and fails over at once,
                    // instead of waiting out QUIC's idle timeout. A node that is only slow is
                    // left alone.
                    let route_key = (key.cloned(), model.to_string(), version.map(str::to_string));
                    let watchdog = async {
                        loop {
                            tokio::time::sleep(WATCH_EVERY).await;
                            self.refresh_in_background(route_key.clone(), payload);
                        }
                    };
                    let answer = tokio::time::timeout_at(deadline, async {
                        tokio::select! {
                            r = self.call_candidate(cand, &req, &inputs, left) => r,
                            never = watchdog => never,
                        }
                    })
                    .await
                    .unwrap_or(Err(Error::Timeout(timeout)));
                    drop(outstanding);
                    let outcome = match answer {
                        Ok(((reply, outputs), rtt, path)) => {
                            self.inner.paths.count(path);
                            router.succeeded(
                                &cand.node_id,
                                routing::warm_latency(
                                    sent.elapsed(),
                                    &reply.meta,
                                    cand.parts.service_us,
                                ),
                                reply.meta.queue_depth,
                                rtt,
                                cand.coordinate.as_ref(),
                            );
                            return Ok(InferResult {
                                model: reply.model,
                                version: reply.version,
                                outputs,
                                meta: reply.meta,
                                failovers: failover.failovers(),
                                trace_id: trace.trace_id,
                                path,
                            });
                        }
                        Err(e) => classify(e),
                    };
                    match &outcome {
                        Outcome::StaleTicket(e) => {
                            tracing::debug!(node = %cand.node_id, error = %e, "the node refused the route ticket")
                        }
                        Outcome::Refused(e) => {
                            tracing::debug!(node = %cand.node_id, error = %e, "retrying on the next node")
                        }
                        Outcome::Unreachable(e) => {
                            tracing::debug!(node = %cand.node_id, error = %e, "node unreachable; failing over")
                        }
                        Outcome::Final(_) => {}
                    }
                    match outcome.penalty() {
                        Penalty::None => {}
                        Penalty::Ban => router.failed(&cand.node_id),
                        Penalty::BanAndForget => {
                            router.failed(&cand.node_id);
                            self.forget_node(&cand.node_id);
                            self.forget_route(key, model, version);
                        }
                    }
                    failover.on_outcome(now_us(), outcome, &mut rand::thread_rng())
                }
            };
        }
    }

    /// One call to `cand` on the path it needs: direct QUIC to its address, or the peer
    /// layer for a node behind NAT ([`crate::path`]); the answer, the RTT seen, the path.
    async fn call_candidate(
        &self,
        cand: &skein_proto::Candidate,
        req: &InferRequest,
        inputs: &[Tensor],
        left: Duration,
    ) -> Result<
        (
            (skein_proto::InferReply, Vec<Tensor>),
            Duration,
            crate::path::CallPath,
        ),
        Error,
    > {
        if crate::path::through_peer_layer(cand) {
            let sent = Instant::now();
            let max = self.inner.config.max_frame_len;
            let (answer, path) = self
                .inner
                .peer_caller
                .call(cand, req, inputs, max, left)
                .await?;
            // No transport RTT sample here: the time on the wire, less the node's own.
            let node_us = answer.0.meta.queue_us + answer.0.meta.compute_us;
            let rtt = sent
                .elapsed()
                .saturating_sub(Duration::from_micros(node_us));
            return Ok((answer, rtt, path));
        }
        let conn = self.node_conn(&cand.node_id, &cand.addr).await?;
        let answer = self.call_node(&conn, req, inputs).await?;
        Ok((answer, conn.rtt(), crate::path::CallPath::Direct))
    }

    /// Calls served by path since this client started: direct, relayed, hole-punched.
    pub fn calls_by_path(&self) -> [(crate::path::CallPath, u64); 3] {
        use crate::path::CallPath;
        use std::sync::atomic::Ordering::Relaxed;
        let p = &self.inner.paths;
        [
            (CallPath::Direct, p.direct.load(Relaxed)),
            (CallPath::Relayed, p.relayed.load(Relaxed)),
            (CallPath::HolePunched, p.hole_punched.load(Relaxed)),
        ]
    }

    /// Hole punches this client's peer layer tried, and those that made a direct connection.
    pub fn hole_punches(&self) -> (u64, u64) {
        self.inner.peer_caller.hole_punches()
    }

    async fn call_node(
        &self,
        conn: &quinn::Connection,
        req: &InferRequest,
        inputs: &[Tensor],
    ) -> Result<(skein_proto::InferReply, Vec<Tensor>), Error> {
        let max = self.inner.config.max_frame_len;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| Error::Transport(e.to_string()))?;
        let parts: Vec<&[u8]> = inputs.iter().map(|t| t.data()).collect();
        match write_frame(&mut send, req, &parts, max).await {
            Ok(()) => {}
            Err(skein_net::NetError::Frame(f)) => return Err(Error::Remote(f.into())),
            // The node may have refused the request early (e.g. frame too large): read its answer.
            Err(e) => tracing::debug!(error = %e, "write to node failed; reading its answer"),
        }
        let _ = send.finish();
        let frame = read_frame(&mut recv, max).await?;
        match frame
            .header::<InferResponse>()
            .map_err(skein_net::NetError::from)?
        {
            InferResponse::Ok(reply) => {
                let outputs = frame
                    .tensors(&reply.outputs)
                    .map_err(skein_net::NetError::from)?;
                Ok((reply, outputs))
            }
            InferResponse::Err(e) => Err(Error::Remote(e)),
            _ => Err(Error::Transport("unknown inference response".into())),
        }
    }

    /// Upload a model with default settings. `progress` is called with the bytes sent so far.
    pub async fn deploy(
        &self,
        name: &str,
        version: Option<&str>,
        bytes: &[u8],
        progress: impl FnMut(u64) + Send,
    ) -> Result<ModelInfo, Error> {
        self.deploy_with(
            name,
            version,
            bytes,
            DeploymentSettings::default(),
            progress,
        )
        .await
    }

    /// Upload a model with its serving settings.
    pub async fn deploy_with(
        &self,
        name: &str,
        version: Option<&str>,
        bytes: &[u8],
        settings: DeploymentSettings,
        mut progress: impl FnMut(u64) + Send,
    ) -> Result<ModelInfo, Error> {
        let req = deploy_request(name, version, bytes, settings);
        self.deploy_raw(&req, bytes, &mut progress).await
    }

    /// Send a deploy request followed by `bytes` as they are (tests use this to send lies).
    pub async fn deploy_raw(
        &self,
        req: &CtlRequest,
        bytes: &[u8],
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<ModelInfo, Error> {
        self.deploy_raw_as(req, bytes, progress, None).await
    }

    /// Upload a model with `key` instead of the client's own (the HTTP admin API).
    pub async fn deploy_as(
        &self,
        name: &str,
        version: Option<&str>,
        bytes: &[u8],
        settings: DeploymentSettings,
        key: Option<&ApiKey>,
    ) -> Result<ModelInfo, Error> {
        let req = deploy_request(name, version, bytes, settings);
        self.deploy_raw_as(&req, bytes, &mut |_| {}, key).await
    }

    async fn deploy_raw_as(
        &self,
        req: &CtlRequest,
        bytes: &[u8],
        progress: &mut (dyn FnMut(u64) + Send),
        key: Option<&ApiKey>,
    ) -> Result<ModelInfo, Error> {
        let conn = self.inner.ctl.connection().await?;
        let max = self.inner.config.max_frame_len;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| Error::Transport(e.to_string()))?;
        write_frame(&mut send, &Self::envelope(req, self.key(key)), &[], max).await?;
        let mut sent = 0u64;
        for chunk in bytes.chunks(64 * 1024) {
            if send.write_all(chunk).await.is_err() {
                // The coordinator stopped reading (e.g. upload too large): read why.
                break;
            }
            sent += chunk.len() as u64;
            progress(sent);
        }
        let _ = send.finish();
        let frame = read_frame(&mut recv, max).await?;
        match frame
            .header::<CtlResponse>()
            .map_err(skein_net::NetError::from)?
        {
            CtlResponse::Deployed(info) => Ok(info),
            CtlResponse::Error(e) => Err(Error::Remote(e)),
            other => Err(unexpected(other)),
        }
    }

    /// Deployed model versions.
    pub async fn models(&self) -> Result<Vec<ModelInfo>, Error> {
        match self.control(&CtlRequest::ListModels).await? {
            CtlResponse::Models(m) => Ok(m),
            other => Err(unexpected(other)),
        }
    }

    /// Change the settings of a live deployment (latest version when `version` is `None`).
    pub async fn scale(
        &self,
        name: &str,
        version: Option<&str>,
        patch: SettingsPatch,
    ) -> Result<ModelInfo, Error> {
        let req = CtlRequest::Scale {
            name: name.to_string(),
            version: version.map(str::to_string),
            patch,
        };
        match self.control(&req).await? {
            CtlResponse::Deployed(info) => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    /// Split calls that name no version over versions of `name` by weight (canary, A/B); an
    /// empty list clears the split. Clients pick it up within one route TTL.
    pub async fn set_traffic(
        &self,
        name: &str,
        weights: Vec<skein_proto::VersionWeight>,
    ) -> Result<Vec<skein_proto::VersionWeight>, Error> {
        let req = CtlRequest::SetTraffic {
            name: name.to_string(),
            weights,
        };
        match self.control(&req).await? {
            CtlResponse::Traffic(w) => Ok(w),
            other => Err(unexpected(other)),
        }
    }

    /// The traffic split of `name` (empty: the latest version takes all calls).
    pub async fn traffic(&self, name: &str) -> Result<Vec<skein_proto::VersionWeight>, Error> {
        let req = CtlRequest::GetTraffic {
            name: name.to_string(),
        };
        match self.control(&req).await? {
            CtlResponse::Traffic(w) => Ok(w),
            other => Err(unexpected(other)),
        }
    }

    /// Nodes known to the coordinator.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, Error> {
        match self.control(&CtlRequest::ListNodes).await? {
            CtlResponse::Nodes(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// An admin request (tenants, keys, usage, audit, join tokens, revocation) with this
    /// client's key.
    pub async fn admin(&self, req: AdminRequest) -> Result<AdminResponse, Error> {
        self.admin_as(req, None).await
    }

    /// An admin request with `key` instead of the client's own.
    pub async fn admin_as(
        &self,
        req: AdminRequest,
        key: Option<&ApiKey>,
    ) -> Result<AdminResponse, Error> {
        match self
            .control_rtt(&CtlRequest::Admin(req), self.key(key))
            .await?
            .0
        {
            CtlResponse::Admin(a) => Ok(a),
            other => Err(unexpected(other)),
        }
    }

    /// Usage and cost rows (`read-usage` scope).
    pub async fn usage(&self, q: UsageQuery) -> Result<Vec<UsageRow>, Error> {
        match self.admin(AdminRequest::Usage(q)).await? {
            AdminResponse::Usage(rows) => Ok(rows),
            other => Err(Error::Transport(format!("unexpected answer: {other:?}"))),
        }
    }

    /// Close all connections.
    pub fn close(&self) {
        self.inner
            .ctl
            .endpoint()
            .close(0u32.into(), b"client closed");
    }
}

/// What a failed attempt means for the failover: a node's refusal that another node may not
/// share, a stale ticket, a transport failure (the node may be gone), or an error that ends
/// the call (any other refusal, the deadline, a bad tensor).
fn classify(e: Error) -> Outcome<Error> {
    match e {
        Error::Remote(w) if w.code == ErrorCode::InvalidTicket => {
            Outcome::StaleTicket(Error::Remote(w))
        }
        Error::Remote(w) if w.code.is_retryable() => Outcome::Refused(Error::Remote(w)),
        e @ (Error::Remote(_) | Error::Timeout(_) | Error::Tensor(_)) => Outcome::Final(e),
        e @ (Error::Transport(_) | Error::Config(_)) => Outcome::Unreachable(e),
    }
}

/// A duration in µs, saturating.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The version for one call from a traffic split: by the hash of `sticky` when given (the same
/// key always lands on the same version while the split holds), else at random by weight.
fn pick_version(
    split: &[skein_proto::VersionWeight],
    sticky: Option<&str>,
    rng: &mut impl rand::Rng,
) -> Option<String> {
    let total: u64 = split.iter().map(|w| u64::from(w.weight)).sum();
    if total == 0 {
        return None;
    }
    let point = match sticky {
        Some(key) => {
            use sha2::Digest;
            let h = sha2::Sha256::digest(key.as_bytes());
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[..8]);
            u64::from_le_bytes(b) % total
        }
        None => rng.gen_range(0..total),
    };
    let mut acc = 0u64;
    for w in split {
        acc += u64::from(w.weight);
        if point < acc {
            return Some(w.version.clone());
        }
    }
    None
}

/// The request that announces an upload of `bytes`.
fn deploy_request(
    name: &str,
    version: Option<&str>,
    bytes: &[u8],
    settings: DeploymentSettings,
) -> CtlRequest {
    use sha2::Digest;
    CtlRequest::Deploy(DeployRequest {
        name: name.to_string(),
        version: version.map(str::to_string),
        size: bytes.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(bytes)),
        settings,
    })
}

fn unexpected(r: CtlResponse) -> Error {
    Error::Transport(format!("unexpected answer from the coordinator: {r:?}"))
}

impl Client {
    /// Download an artifact by its sha256 (verified), e.g. to compare a model in-process.
    pub async fn fetch_artifact(&self, sha256: &str) -> Result<Vec<u8>, Error> {
        let id: ArtifactId = sha256
            .parse()
            .map_err(|e: skein_proto::InvalidArtifactId| Error::Config(e.to_string()))?;
        let source = CoordinatorSource::new(
            &self.inner.ctl,
            self.key(None).map(|k| k.as_str().to_string()),
        );
        let req = FetchRequest {
            id: &id,
            size: None,
            max_size: MAX_ARTIFACT,
            dest: None,
        };
        Ok(artifact::fetch(&source, &req).await?.bytes)
    }
}
