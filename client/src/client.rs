//! The [`Client`]: resolve, route cache, direct QUIC calls to nodes, failover.

mod lan_calls;

use crate::routing::{self, LocalRouter};
use crate::{Error, Profile};
use skein_net::artifact::{self, CoordinatorSource, FetchRequest};
use skein_net::endpoint::{client_config, connect_early, Early, TransportLimits};
use skein_net::stream::{read_frame, write_frame};
use skein_net::{Credentials, CtlClient, CtlConfig, TransportProfile};
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
    /// Initial window, congestion controller and pacing of this client's connections (see
    /// skein-net's `TransportProfile`).
    pub transport: TransportProfile,
    /// Send the request in the first flight of a new connection to a node this client has
    /// talked to before (0-RTT, TLS session tickets kept in memory; default true). Only
    /// inference requests go this way; the node runs each request id at most once.
    pub zero_rtt: bool,
    /// A node connection unused this long is closed (default 60 s). Until then QUIC
    /// keep-alives hold it open, with its congestion window and RTT estimate.
    pub idle_close: Duration,
    /// At resolve, connections to this many of the top candidates are opened in parallel
    /// (default 2; 0 turns it off), so that a call rarely waits for a handshake.
    pub preconnect: usize,
    /// How long a resolve (connection included) waits for the coordinator before it counts as
    /// unreachable (default 5 s): then the call fails with
    /// [`Error::CoordinatorUnreachable`], or, with [`lan`](Self::lan) on, goes to LAN nodes
    /// (issue 20).
    pub coordinator_timeout: Duration,
    /// LAN discovery (issue 20; `None`, the default: off). See [`crate::lan::LanConfig`].
    pub lan: Option<crate::lan::LanConfig>,
    /// Return a client even when the coordinator cannot be reached at connect (default
    /// false: [`Error::CoordinatorUnreachable`]); its calls fail so until the coordinator
    /// answers (a node's HTTP ingress starting offline uses it).
    pub start_unreachable: bool,
}

/// Most connections a resolve opens ahead of time.
const MAX_PRECONNECT: usize = 8;

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
            transport: TransportProfile::default(),
            zero_rtt: true,
            idle_close: Duration::from_secs(60),
            preconnect: 2,
            coordinator_timeout: Duration::from_secs(5),
            lan: None,
            start_unreachable: false,
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
    /// The connection the answer came on.
    pub connection: CallConnection,
    /// The path the call took: direct, relayed or hole-punched.
    pub path: crate::path::CallPath,
}

/// How a call reached its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallConnection {
    /// Reused, a fresh handshake, or 0-RTT.
    pub kind: ConnectionKind,
    /// The connection's smoothed round-trip time when the answer came.
    pub rtt: Duration,
}

/// Whether a call waited for a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionKind {
    /// A connection that was ready before the call started (including one opened ahead of
    /// time at resolve).
    Reused,
    /// A new connection with a full handshake: one round trip before the request leaves.
    Fresh,
    /// A new connection that resumed an earlier session: the request left in the first flight.
    ZeroRtt,
    /// No connection: a node's HTTP ingress ran the model itself (`rtt` is zero).
    Local,
    /// The libp2p peer layer (a node behind NAT): a relayed or hole-punched stream (see
    /// [`InferResult::path`]); `rtt` is the call's time on the wire.
    Peer,
}

impl ConnectionKind {
    /// `reused`, `fresh`, `0rtt`, `local` or `peer`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionKind::Reused => "reused",
            ConnectionKind::Fresh => "fresh",
            ConnectionKind::ZeroRtt => "0rtt",
            ConnectionKind::Local => "local",
            ConnectionKind::Peer => "peer",
        }
    }
}

impl std::fmt::Display for ConnectionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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

/// A pooled connection to a node.
#[derive(Clone)]
struct NodeConn {
    conn: quinn::Connection,
    /// How it was opened ([`ConnectionKind::Fresh`] or [`ConnectionKind::ZeroRtt`]).
    opened: ConnectionKind,
    /// When it became usable.
    ready: Instant,
    use_: Arc<ConnUse>,
}

/// When a connection was last used and by how many calls now (for the idle close).
struct ConnUse {
    last: Mutex<Instant>,
    calls: std::sync::atomic::AtomicUsize,
}

/// Marks a connection in use while alive.
struct InUse(Arc<ConnUse>);

impl InUse {
    fn new(u: &Arc<ConnUse>) -> InUse {
        u.calls.fetch_add(1, Ordering::SeqCst);
        InUse(u.clone())
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        *lock(&self.0.last) = Instant::now();
        self.0.calls.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A node connection, ready or being opened (callers wait for the one opening).
enum Pooled {
    Ready(NodeConn),
    Opening(tokio::sync::watch::Receiver<Option<Result<NodeConn, String>>>),
}

struct Inner {
    config: ClientConfig,
    infer_cfg: quinn::ClientConfig,
    /// The control link to the coordinator (its endpoint is also the one node calls leave from).
    ctl: CtlClient,
    nodes: Mutex<HashMap<String, Pooled>>,
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
    /// LAN discovery, when [`ClientConfig::lan`] is on.
    lan: Option<LanState>,
}

/// The LAN side of a client with [`ClientConfig::lan`] on.
struct LanState {
    config: crate::lan::LanConfig,
    /// The mDNS daemon browsing `_skein-peer._udp` (none when it could not start).
    daemon: Option<mdns_sd::ServiceDaemon>,
    browser: Option<crate::lan::LanBrowser>,
    /// The last resolve of each route, kept past its TTL for its ticket (oldest first,
    /// at most [`crate::lan::MAX_HELD`]).
    held: Mutex<Vec<crate::lan::HeldRoute>>,
    /// Since when the coordinator has not answered (`None`: it answers).
    down_since: Mutex<Option<Instant>>,
    /// Nodes' answers to `Served`, with when they came (bounded by the LAN list).
    served: Mutex<HashMap<String, (Instant, skein_proto::ServedModels)>>,
    /// A background round of `Served` requests is under way.
    refreshing: std::sync::atomic::AtomicBool,
}

impl Drop for LanState {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            let _ = d.shutdown();
        }
    }
}

impl LanState {
    fn start(config: crate::lan::LanConfig) -> LanState {
        let held = config
            .ticket_file
            .as_deref()
            .map(crate::lan::load_held)
            .unwrap_or_default();
        let (daemon, browser) = match mdns_sd::ServiceDaemon::new() {
            Ok(d) => match crate::lan::LanBrowser::start(&d, config.peers) {
                Ok(b) => (Some(d), Some(b)),
                Err(e) => {
                    tracing::warn!(error = %e, "LAN discovery: cannot browse mDNS; only the nodes of held routes will be tried");
                    let _ = d.shutdown();
                    (None, None)
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "LAN discovery: cannot start mDNS; only the nodes of held routes will be tried");
                (None, None)
            }
        };
        LanState {
            config,
            daemon,
            browser,
            held: Mutex::new(held),
            down_since: Mutex::new(None),
            served: Mutex::new(HashMap::new()),
            refreshing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn is_down(&self) -> bool {
        lock(&self.down_since).is_some()
    }
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
            profile: config.transport.clone(),
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
                // 0-RTT only towards nodes (`skein/infer`), never the coordinator.
                infer_cfg: client_config(
                    &creds,
                    ALPN_INFER,
                    &TransportLimits {
                        zero_rtt: config.zero_rtt,
                        ..limits.clone()
                    },
                )?,
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
                peer_caller: crate::path::PeerCaller::new(&config.transport),
                lan: config.lan.clone().map(LanState::start),
                config,
            }),
        };
        let t = client.inner.config.coordinator_timeout;
        let reached = match tokio::time::timeout(t, client.inner.ctl.connection()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no connection within {t:?}")),
        };
        if let Err(reason) = reached {
            let e = client.coordinator_unreachable(reason);
            if client.inner.lan.is_some() {
                tracing::warn!(error = %e, "LAN discovery on: calls go to LAN nodes until the coordinator answers");
            } else if client.inner.config.start_unreachable {
                tracing::warn!(error = %e, "starting without the coordinator");
            } else {
                return Err(e);
            }
        }
        Ok(client)
    }

    /// `Error::CoordinatorUnreachable` for `reason`; with LAN discovery on, also remembers that
    /// the coordinator is down (calls go to LAN nodes until it answers again).
    fn coordinator_unreachable(&self, reason: String) -> Error {
        if let Some(lan) = &self.inner.lan {
            let mut down = lock(&lan.down_since);
            if down.is_none() {
                tracing::warn!(coordinator = %self.inner.ctl.addr(), %reason, "coordinator unreachable: calling LAN nodes with held route tickets");
                *down = Some(Instant::now());
            }
        }
        Error::CoordinatorUnreachable {
            addr: self.inner.ctl.addr(),
            reason,
        }
    }

    /// The coordinator answered: with LAN discovery on, calls go back to its routes.
    fn coordinator_answered(&self) {
        if let Some(lan) = &self.inner.lan {
            if let Some(since) = lock(&lan.down_since).take() {
                tracing::info!(
                    down_s = since.elapsed().as_secs_f64(),
                    "coordinator answers again: back to its routes"
                );
            }
        }
    }

    /// A node refused a held ticket as expired (it is online): the next route asks the
    /// coordinator first (within `coordinator_timeout`), and goes back to LAN nodes only if it
    /// still does not answer.
    fn coordinator_maybe_back(&self) {
        if let Some(lan) = &self.inner.lan {
            if lock(&lan.down_since).take().is_some() {
                tracing::debug!("a LAN node is online again: asking the coordinator");
            }
        }
    }

    /// Whether this client has LAN discovery on and its coordinator is down now.
    pub fn coordinator_down(&self) -> bool {
        self.inner.lan.as_ref().is_some_and(LanState::is_down)
    }

    /// The nodes this client's LAN discovery has seen (none when it is off).
    pub fn lan_peers(&self) -> Vec<crate::lan::LanPeer> {
        self.inner
            .lan
            .as_ref()
            .and_then(|l| l.browser.as_ref())
            .map(|b| b.peers())
            .unwrap_or_default()
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
        // Bounded: an unreachable coordinator is told apart from a slow answer quickly.
        let t = self.inner.config.coordinator_timeout;
        let asked = tokio::time::timeout(t, self.inner.ctl.call(&Self::envelope(&req, key))).await;
        let answer = match asked {
            Ok(Ok(a)) => a,
            Ok(Err(skein_net::CtlError::Remote(w))) => {
                self.coordinator_answered();
                return Err(Error::Remote(w));
            }
            Ok(Err(skein_net::CtlError::Net(skein_net::NetError::Frame(f)))) => {
                return Err(Error::Remote(f.into()))
            }
            Ok(Err(e)) => return Err(self.coordinator_unreachable(e.to_string())),
            Err(_) => return Err(self.coordinator_unreachable(format!("no answer within {t:?}"))),
        };
        self.coordinator_answered();
        match answer {
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
        self.preconnect(&r);
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
        drop(routes);
        self.hold(key, model, version, &r);
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
        if self.coordinator_down() {
            // Ask the coordinator in the background (one at a time per route): once it
            // answers, calls go back to its routes.
            self.refresh_in_background(cache_key, payload_bytes);
            return self.lan_route(key, model, version).await;
        }
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
            None => match self
                .resolve_sized(key, model, version, payload_bytes, trace)
                .await
            {
                Err(Error::CoordinatorUnreachable { .. }) if self.inner.lan.is_some() => {
                    self.lan_route(key, model, version).await
                }
                // A coordinator that has just restarted knows no node yet: LAN nodes, if any,
                // until it does.
                Err(Error::Remote(w))
                    if w.code == ErrorCode::NoCapacity && self.inner.lan.is_some() =>
                {
                    self.lan_route(key, model, version)
                        .await
                        .map_err(|_| Error::Remote(w))
                }
                r => r,
            },
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

    /// A connection to `node_id` and how this call got it: reused when it was ready before
    /// `call_started`, else how it was opened (waiting for one being opened, e.g. ahead of
    /// time at resolve, instead of opening a second).
    async fn node_conn(
        &self,
        node_id: &str,
        addr: &str,
        call_started: Instant,
    ) -> Result<(NodeConn, ConnectionKind), Error> {
        let kind = |c: &NodeConn| {
            if c.ready <= call_started {
                ConnectionKind::Reused
            } else {
                c.opened
            }
        };
        // Decide under the lock, act after it.
        let waiting = {
            let mut nodes = lock(&self.inner.nodes);
            match nodes.get(node_id) {
                Some(Pooled::Ready(c)) if c.conn.close_reason().is_none() => {
                    return Ok((c.clone(), kind(c)));
                }
                Some(Pooled::Opening(rx)) => Some(rx.clone()),
                _ => {
                    if nodes.len() >= MAX_CACHED {
                        nodes.retain(|_, p| match p {
                            Pooled::Ready(c) => c.conn.close_reason().is_none(),
                            Pooled::Opening(_) => true,
                        });
                    }
                    if nodes.len() >= MAX_CACHED {
                        return Err(Error::Transport(format!(
                            "{MAX_CACHED} node connections are open or opening; not opening another"
                        )));
                    }
                    None
                }
            }
        };
        let Some(mut rx) = waiting else {
            let (tx, rx) = tokio::sync::watch::channel(None);
            lock(&self.inner.nodes).insert(node_id.to_string(), Pooled::Opening(rx));
            let opened = self.open_node(node_id, addr).await;
            {
                let mut nodes = lock(&self.inner.nodes);
                match &opened {
                    Ok(c) => {
                        nodes.insert(node_id.to_string(), Pooled::Ready(c.clone()));
                    }
                    Err(_) => {
                        if matches!(nodes.get(node_id), Some(Pooled::Opening(_))) {
                            nodes.remove(node_id);
                        }
                    }
                }
            }
            let _ = tx.send(Some(
                opened.as_ref().map(Clone::clone).map_err(|e| e.to_string()),
            ));
            return opened.map(|c| {
                let k = kind(&c);
                (c, k)
            });
        };
        let got = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| {
                Error::Transport(format!(
                    "opening a connection to node {node_id} was abandoned"
                ))
            })?
            .clone();
        match got {
            Some(Ok(c)) => {
                let k = kind(&c);
                Ok((c, k))
            }
            Some(Err(e)) => Err(Error::Transport(e)),
            None => Err(Error::Transport(format!("no connection to node {node_id}"))),
        }
    }

    /// Open a connection to `node_id` at `addr`: 0-RTT when this client holds a session
    /// ticket for it, else a full handshake. Closed once unused for `idle_close`.
    async fn open_node(&self, node_id: &str, addr: &str) -> Result<NodeConn, Error> {
        let sock: SocketAddr = addr.parse().map_err(|_| {
            Error::Transport(format!("node {node_id} advertises a bad address `{addr}`"))
        })?;
        let timeout = self.inner.config.connect_timeout;
        let (conn, early) = connect_early(
            self.inner.ctl.endpoint(),
            self.inner.infer_cfg.clone(),
            sock,
            &skein_net::node_server_name(node_id),
            timeout,
        )
        .await
        .map_err(|e| Error::Transport(format!("node {node_id} at {addr}: {e}")))?;
        let opened = match early {
            Early::ZeroRtt(accepted) => {
                // Usable at once, but a node that is gone must still fail the call within the
                // connect timeout, not QUIC's idle timeout.
                let c = conn.clone();
                tokio::spawn(async move {
                    if tokio::time::timeout(timeout, accepted).await.is_err() {
                        c.close(0u32.into(), b"handshake timed out");
                    }
                });
                ConnectionKind::ZeroRtt
            }
            Early::Handshake => ConnectionKind::Fresh,
        };
        let use_ = Arc::new(ConnUse {
            last: Mutex::new(Instant::now()),
            calls: std::sync::atomic::AtomicUsize::new(0),
        });
        tokio::spawn(idle_close(
            conn.clone(),
            use_.clone(),
            self.inner.config.idle_close,
        ));
        Ok(NodeConn {
            conn,
            opened,
            ready: Instant::now(),
            use_,
        })
    }

    /// Open connections to the first `preconnect` candidates of `r` that have none, in
    /// parallel, on tasks of their own.
    fn preconnect(&self, r: &Resolution) {
        let n = self.inner.config.preconnect.min(MAX_PRECONNECT);
        let nodes = lock(&self.inner.nodes);
        let todo: Vec<(String, String)> = r
            .candidates
            .iter()
            .filter(|c| match nodes.get(&c.node_id) {
                Some(Pooled::Ready(p)) => p.conn.close_reason().is_some(),
                Some(Pooled::Opening(_)) => false,
                None => true,
            })
            .take(n)
            .map(|c| (c.node_id.clone(), c.addr.clone()))
            .collect();
        drop(nodes);
        for (id, addr) in todo {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.node_conn(&id, &addr, Instant::now()).await {
                    tracing::debug!(node = %id, error = %e, "could not connect ahead of time");
                }
            });
        }
    }

    /// Close every connection to nodes (session tickets stay: the next call to a node this
    /// client has talked to goes out with 0-RTT). Benchmarks use it to measure returning
    /// callers.
    pub fn disconnect_nodes(&self) {
        let mut nodes = lock(&self.inner.nodes);
        for (_, p) in nodes.drain() {
            if let Pooled::Ready(c) = p {
                c.conn.close(0u32.into(), b"client disconnected");
            }
        }
    }

    /// Close connections to nodes the coordinator declared dead: requests in flight there fail
    /// (and fail over) now instead of waiting for the transport's idle timeout.
    fn drop_dead(&self, dead: &[String]) {
        if dead.is_empty() {
            return;
        }
        let mut nodes = lock(&self.inner.nodes);
        for id in dead {
            if let Some(Pooled::Ready(c)) = nodes.remove(id) {
                tracing::debug!(node = %id, "the coordinator declared this node dead; dropping its connection");
                c.conn.close(0u32.into(), b"node declared dead");
            }
        }
    }

    fn forget_node(&self, node_id: &str) {
        let mut nodes = lock(&self.inner.nodes);
        if matches!(nodes.get(node_id), Some(Pooled::Ready(_))) {
            nodes.remove(node_id);
        }
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
                        kind: skein_proto::RequestKind::Infer,
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
                            // No coordinator to declare a LAN node dead: a node announcing a
                            // new address (restarted) closes the old connection.
                            if self.coordinator_down() {
                                self.drop_moved(&self.lan_peers());
                            }
                        }
                    };
                    let answer = tokio::time::timeout_at(deadline, async {
                        tokio::select! {
                            r = self.call_candidate(cand, &req, &inputs, left, sent) => r,
                            never = watchdog => never,
                        }
                    })
                    .await
                    .unwrap_or(Err(Error::Timeout(timeout)));
                    drop(outstanding);
                    let outcome = match answer {
                        Ok(((reply, outputs), connection, path)) => {
                            self.inner.paths.count(path);
                            router.succeeded(
                                &cand.node_id,
                                routing::warm_latency(
                                    sent.elapsed(),
                                    &reply.meta,
                                    cand.parts.service_us,
                                ),
                                reply.meta.queue_depth,
                                connection.rtt,
                                cand.coordinate.as_ref(),
                            );
                            return Ok(InferResult {
                                model: reply.model,
                                version: reply.version,
                                outputs,
                                meta: reply.meta,
                                failovers: failover.failovers(),
                                trace_id: trace.trace_id,
                                connection,
                                path,
                            });
                        }
                        Err(e) => classify(e),
                    };
                    match &outcome {
                        Outcome::StaleTicket(e) => {
                            tracing::debug!(node = %cand.node_id, error = %e, "the node refused the route ticket");
                            // A node that applies the online rule hears from the coordinator:
                            // ask it (bounded) for a new ticket instead of a LAN route.
                            self.coordinator_maybe_back();
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
        cand: &Candidate,
        req: &InferRequest,
        inputs: &[Tensor],
        left: Duration,
        started: Instant,
    ) -> Result<
        (
            (skein_proto::InferReply, Vec<Tensor>),
            CallConnection,
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
            let connection = CallConnection {
                kind: ConnectionKind::Peer,
                rtt,
            };
            return Ok((answer, connection, path));
        }
        let (conn, kind) = self.node_conn(&cand.node_id, &cand.addr, started).await?;
        let _in_use = InUse::new(&conn.use_);
        let (reply, kind) = self.call_node(&conn.conn, kind, req, inputs).await?;
        let connection = CallConnection {
            kind,
            rtt: conn.conn.rtt(),
        };
        Ok((reply, connection, crate::path::CallPath::Direct))
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

    /// One request on `conn`, reached as `kind`. A 0-RTT flight the node rejected never
    /// reached it: the request goes again on the completed connection (a fresh handshake).
    async fn call_node(
        &self,
        conn: &quinn::Connection,
        kind: ConnectionKind,
        req: &InferRequest,
        inputs: &[Tensor],
    ) -> Result<((skein_proto::InferReply, Vec<Tensor>), ConnectionKind), Error> {
        match self.call_node_once(conn, req, inputs).await {
            Err(Attempt::ZeroRttRejected) => {
                tracing::debug!("0-RTT rejected; sending the request again after the handshake");
                match self.call_node_once(conn, req, inputs).await {
                    Ok(r) => Ok((r, ConnectionKind::Fresh)),
                    Err(Attempt::ZeroRttRejected) => {
                        Err(Error::Transport("0-RTT rejected twice".into()))
                    }
                    Err(Attempt::Failed(e)) => Err(e),
                }
            }
            Err(Attempt::Failed(e)) => Err(e),
            Ok(r) => Ok((r, kind)),
        }
    }

    async fn call_node_once(
        &self,
        conn: &quinn::Connection,
        req: &InferRequest,
        inputs: &[Tensor],
    ) -> Result<(skein_proto::InferReply, Vec<Tensor>), Attempt> {
        let max = self.inner.config.max_frame_len;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| Attempt::Failed(Error::Transport(e.to_string())))?;
        let parts: Vec<skein_proto::Bytes> = inputs.iter().map(|t| t.bytes().clone()).collect();
        match write_frame(&mut send, req, &parts, max).await {
            Ok(()) => {}
            Err(e) if e.is_zero_rtt_rejected() => return Err(Attempt::ZeroRttRejected),
            Err(skein_net::NetError::Frame(f)) => {
                return Err(Attempt::Failed(Error::Remote(f.into())))
            }
            // The node may have refused the request early (e.g. frame too large): read its answer.
            Err(e) => tracing::debug!(error = %e, "write to node failed; reading its answer"),
        }
        let _ = send.finish();
        let frame = match read_frame(&mut recv, max).await {
            Ok(f) => f,
            Err(e) if e.is_zero_rtt_rejected() => return Err(Attempt::ZeroRttRejected),
            Err(e) => return Err(Attempt::Failed(e.into())),
        };
        Ok(Self::infer_answer(frame)?)
    }

    fn infer_answer(
        frame: skein_proto::frame::Frame,
    ) -> Result<(skein_proto::InferReply, Vec<Tensor>), Error> {
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

/// Why one request on a connection failed.
enum Attempt {
    /// The node rejected the 0-RTT flight: the request never reached it.
    ZeroRttRejected,
    /// Anything else.
    Failed(Error),
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Failed(e)
    }
}

/// Close `conn` once no call has used it for `idle`. Until then QUIC keep-alives hold it open.
async fn idle_close(conn: quinn::Connection, use_: Arc<ConnUse>, idle: Duration) {
    loop {
        let now = Instant::now();
        let due = if use_.calls.load(Ordering::SeqCst) > 0 {
            now + idle
        } else {
            *lock(&use_.last) + idle
        };
        if due <= now {
            conn.close(0u32.into(), b"idle");
            return;
        }
        tokio::select! {
            _ = conn.closed() => return,
            _ = tokio::time::sleep_until(due) => {}
        }
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
        e @ (Error::Remote(_)
        | Error::Timeout(_)
        | Error::Tensor(_)
        | Error::CoordinatorUnreachable { .. }) => Outcome::Final(e),
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
