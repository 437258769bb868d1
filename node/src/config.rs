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
    /// Usage records kept while the coordinator cannot take them (default 65 536); when
    /// full, new requests are refused (`overloaded`) rather than served unmetered.
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
    /// The libp2p peer layer (`[peer]`): reachable behind NAT through relays and hole punching.
    pub peer: crate::peer::PeerSettings,
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
            peer: crate::peer::PeerSettings::default(),
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
