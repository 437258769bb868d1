//! Node configuration.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything a node needs to start. Defaults are documented per field.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeConfig {
    /// Coordinator `host:port` (default `127.0.0.1:7070`).
    pub coordinator: String,
    /// Join token; needed on the first start only (the certificate is kept in `data_dir`).
    pub join_token: Option<String>,
    /// UDP address of the `skein/infer` endpoint (default `127.0.0.1:0`).
    pub listen: SocketAddr,
    /// Address advertised to clients; default: `listen`, or, when `listen` is unspecified
    /// (`0.0.0.0`), this host's address on its route towards the coordinator (with the bound
    /// port).
    pub advertise: Option<SocketAddr>,
    /// Key, certificate and artifact cache (default `./skein-node-data`).
    pub data_dir: PathBuf,
    /// Labels such as `region=eu-west`.
    pub labels: BTreeMap<String, String>,
    /// Requests of one model that run at once (default: the number of CPU cores).
    pub max_concurrency: u32,
    /// Requests of one model that may wait; more are answered `Overloaded` (default 64).
    pub max_queue: u32,
    /// Optimised plans kept per model, one per input shape (default 16).
    pub plan_cache: usize,
    /// Memory loaded models may hold, bytes (default: half of the machine's memory). Loading a
    /// model that does not fit first unloads the least recently used idle replicas.
    pub memory_budget: u64,
    /// Disk the artifact cache may hold, bytes (default 10 GiB); least recently used first out.
    pub cache_budget: u64,
    /// How often idle replicas are looked for, ms (default 100).
    pub idle_check_ms: u64,
    /// How micro-batch sizes are chosen: `measured` (default) or `always`.
    pub batch_policy: crate::batcher::BatchPolicy,
    /// Largest frame accepted, bytes (default 64 MiB).
    pub max_frame_len: u32,
    /// On shutdown, how long running requests may take to finish, ms (default 30 000).
    pub drain_timeout_ms: u64,
    /// How often a few peers are probed for RTT (network coordinates), ms (default 1 000;
    /// jittered ±20 %; four times as often until the node's coordinate has settled).
    pub probe_interval_ms: u64,
    /// Usage records kept while the coordinator cannot take them (default 65 536), in memory
    /// and in `<data_dir>/usage.spool` (at most this many KiB of it); when full, new requests
    /// are refused (`overloaded`) rather than served unmetered.
    pub max_pending_usage: usize,
    /// Clock difference with the coordinator tolerated when checking route-ticket expiry, ms
    /// (default 60 000).
    pub ticket_clock_skew_ms: u64,
    /// Where to serve `GET /metrics` (Prometheus) and `GET /ready` over HTTP; off when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// What runs the models: `auto` (default: a hardware GPU when the build has the GPU
    /// backend and wgpu finds one, else ONNX Runtime when its library loads, else tract),
    /// `tract`, `ort`, `wgpu` or `cuda`.
    pub backend: crate::backend::BackendChoice,
    /// Where ONNX Runtime is and how it runs (`[ort]`: `lib`, `ep`, `threads`).
    pub ort: crate::backend::OrtConfig,
    /// Initial congestion window, congestion controller and pacing of this node's connections
    /// (`[transport]`: `initial_window`, `congestion`, `pacing`; see skein-net's
    /// `TransportProfile` for the defaults).
    pub transport: skein_net::TransportProfile,
    /// Accept `skein/infer` requests in a returning caller's 0-RTT flight (default true).
    /// Each request id then runs at most once per route ticket (see [`replay_memory`]).
    ///
    /// [`replay_memory`]: NodeConfig::replay_memory
    pub zero_rtt: bool,
    /// Request ids remembered against replays of 0-RTT requests (default 262 144, about
    /// 20 MiB); when full, 0-RTT requests are refused (`overloaded`) until ids expire.
    pub replay_memory: usize,
    /// The node's HTTP ingress (`[http]`; off unless `listen` is set): the V2 API served by
    /// this node for apps next to it.
    pub http: HttpIngressConfig,
    /// The libp2p peer layer (`[peer]`): reachable behind NAT through relays and hole punching.
    pub peer: crate::peer::PeerSettings,
    /// LAN discovery (`[lan]`, issue 20): advertise this node over mDNS and keep a list of the
    /// nodes on its LAN.
    pub lan: LanSettings,
}

/// LAN discovery of a node (issue 20).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LanSettings {
    /// Advertise this node's `skein/infer` endpoint and peer layer over DNS-SD/mDNS as
    /// `_skein-peer._udp` (TXT: node id, PeerId, addresses), and browse for the other nodes of
    /// the LAN (default false; flag `--lan`). LAN clients (`skein infer --lan`) find nodes so.
    pub mdns: bool,
    /// LAN nodes kept at most (default 256).
    pub max_peers: usize,
    /// A LAN node not announced for this long is dropped, ms (default 120 000).
    pub peer_ttl_ms: u64,
}

impl Default for LanSettings {
    fn default() -> Self {
        LanSettings {
            mdns: false,
            max_peers: 256,
            peer_ttl_ms: 120_000,
        }
    }
}

/// The node's HTTP ingress: the same Open Inference Protocol (KServe V2) API as the
/// coordinator's gateway, served by the node. Models loaded here run here; the rest are routed
/// over the mesh from this node. API keys are checked with the coordinator on first use and
/// cached (see `docs/operations.md#node-http-ingress`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpIngressConfig {
    /// Where to listen, e.g. `0.0.0.0:8080` (flag `--http`); off when unset (the default).
    pub listen: Option<SocketAddr>,
    /// Advertise the endpoint on the LAN over DNS-SD/mDNS as `_skein-v2._tcp` (default true;
    /// flag `--no-mdns`).
    pub mdns: bool,
    /// How long the coordinator's answer about an API key is used before asking again, ms
    /// (default 60 000). A revocation takes effect at the next heartbeat answer regardless.
    pub key_ttl_ms: u64,
    /// How long past `key_ttl_ms` a key the coordinator accepted is still honoured while the
    /// coordinator cannot be reached, ms (default 300 000; 0: never). Unknown keys are always
    /// refused. TTL plus grace is capped at the coordinator's revocation window (15 min).
    pub key_offline_grace_ms: u64,
    /// API keys cached at once (default 4096; the oldest answer goes first).
    pub max_keys: usize,
    /// Largest request body, before and after decompression, bytes (default 64 MiB).
    pub max_body_bytes: usize,
    /// Inference requests handled at once (default 256); beyond it, 503 with `Retry-After`.
    pub max_in_flight: usize,
    /// Inference requests per API key per second (default 1 000; 0: no per-key bound, the
    /// tenant's quota still applies); beyond it, 429 with `Retry-After`.
    pub key_rps: u32,
    /// Requests one key may send at once after a quiet spell (default 1 000).
    pub key_burst: u32,
    /// Open HTTP connections at once (default 1024).
    pub max_connections: usize,
    /// Deadline of one inference, failover included, ms (default 30 000).
    pub request_timeout_ms: u64,
    /// Time allowed for a request body to arrive, ms (default 30 000).
    pub body_timeout_ms: u64,
}

impl Default for HttpIngressConfig {
    fn default() -> Self {
        HttpIngressConfig {
            listen: None,
            mdns: true,
            key_ttl_ms: 60_000,
            key_offline_grace_ms: 300_000,
            max_keys: 4096,
            max_body_bytes: 64 << 20,
            max_in_flight: 256,
            key_rps: 1000,
            key_burst: 1000,
            max_connections: 1024,
            request_timeout_ms: 30_000,
            body_timeout_ms: 30_000,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            coordinator: "127.0.0.1:7070".into(),
            join_token: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            data_dir: PathBuf::from("skein-node-data"),
            labels: BTreeMap::new(),
            max_concurrency: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            max_queue: 64,
            plan_cache: 16,
            memory_budget: total_memory() / 2,
            cache_budget: 10 << 30,
            idle_check_ms: 100,
            batch_policy: crate::batcher::BatchPolicy::Measured,
            max_frame_len: skein_proto::DEFAULT_MAX_FRAME_LEN,
            drain_timeout_ms: 30_000,
            probe_interval_ms: 1_000,
            max_pending_usage: 65_536,
            ticket_clock_skew_ms: 60_000,
            metrics_listen: None,
            backend: crate::backend::BackendChoice::Auto,
            ort: crate::backend::OrtConfig::default(),
            http: HttpIngressConfig::default(),
            transport: skein_net::TransportProfile::default(),
            zero_rtt: true,
            replay_memory: 262_144,
            peer: crate::peer::PeerSettings::default(),
            lan: LanSettings::default(),
        }
    }
}

/// Total memory of this machine, bytes (0 where unknown).
pub fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}
