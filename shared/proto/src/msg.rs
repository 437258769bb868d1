//! Versioned wire messages.
//!
//! One request per bidirectional QUIC stream: the opener writes one frame (a header below plus,
//! for some messages, raw bytes after it), the other side answers with one frame and finishes.
//!
//! - [`ALPN_CTL`](crate::ALPN_CTL): [`CtlRequest`] → [`CtlResponse`]. `Deploy` is followed on
//!   the stream by exactly `size` raw artifact bytes; `Artifact` likewise.
//! - [`ALPN_INFER`](crate::ALPN_INFER): [`InferRequest`] → [`InferResponse`], tensor bytes in
//!   the frame payload.
//!
//! New enum variants and fields are only appended; incompatible changes bump
//! [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).

use crate::error::WireError;
pub use crate::security::*;
use crate::tensor::DataType;
pub use crate::tensor::TensorDesc;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A node's position in the latency space: a Vivaldi network coordinate (height-vector
/// variant, as in Serf and Consul).
///
/// A wire type: like every message here, fields are only appended. skein-policy computes over
/// it (`skein_policy::vivaldi`: the origin, validity, distances, updates).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coordinate {
    /// The Euclidean part, µs (`skein_policy::vivaldi::DIMENSIONS` components).
    pub vec: Vec<f64>,
    /// The access-link height, µs.
    pub height: f64,
    /// Confidence in this position: an EWMA of the relative error, 0 (exact) up to the
    /// largest error (unknown, 1.5 by default).
    pub error: f64,
    /// Mean residual of recent samples, µs, added to distances (may be negative).
    pub adjustment: f64,
}

/// The parts of an expected completion time, µs, as the coordinator explains its ranking of a
/// [`Candidate`]; they add up to its `expected_us` (saturating at `f64::MAX`).
///
/// A wire type: fields are only appended. skein-policy computes them
/// (`skein_policy::routing::score_parts`) and their total.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ScoreParts {
    /// Round trip from the caller.
    pub rtt_us: f64,
    /// Waiting for a free slot behind queued and running requests.
    pub queue_us: f64,
    /// Compute time.
    pub service_us: f64,
    /// Load (and artifact fetch) when the model is not loaded.
    pub cold_us: f64,
    /// Moving the payload over the link.
    pub transfer_us: f64,
    /// Crossing a relay: the caller reaches the node (behind NAT) through the coordinator's
    /// circuit relay until a hole punch makes a direct path (issue 19: appended). 0 for a node
    /// called directly.
    pub relay_us: f64,
}

/// A node's stable identity: lower-case hex of the first 16 bytes of the sha256 of its public key.
pub type NodeId = String;

/// A model input or output as declared by the model graph; `-1` marks a dynamic dimension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// V2 datatype.
    pub datatype: DataType,
    /// Declared shape, `-1` for dynamic dimensions.
    pub shape: Vec<i64>,
}

/// Control-plane requests (ALPN `skein/ctl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CtlRequest {
    /// A node asks to join with a join token and a certificate signing request.
    Join(JoinRequest),
    /// A joined node reports its capacity and load.
    Heartbeat(Heartbeat),
    /// Upload a model; exactly `size` raw bytes follow the frame on the stream.
    Deploy(DeployRequest),
    /// Fetch an artifact's bytes from `offset` on (resumable).
    FetchArtifact {
        /// Hex sha256 of the artifact.
        sha256: String,
        /// First byte wanted.
        offset: u64,
    },
    /// Ask for ranked candidate nodes for a model.
    Resolve(ResolveRequest),
    /// List deployed models.
    ListModels,
    /// List known nodes.
    ListNodes,
    /// Change the settings of a deployed model version (latest when `version` is `None`).
    Scale {
        /// Model name.
        name: String,
        /// Version; latest when absent.
        version: Option<String>,
        /// The changes.
        patch: SettingsPatch,
    },
    /// Set how calls that name no version are split over the versions of a model (canary,
    /// A/B); an empty list clears the split (calls go to the latest version again).
    SetTraffic {
        /// Model name.
        name: String,
        /// Versions and their weights.
        weights: Vec<VersionWeight>,
    },
    /// The current traffic split of a model.
    GetTraffic {
        /// Model name.
        name: String,
    },
    /// Tenants, keys, usage, audit, join tokens, node and ticket-key revocation.
    Admin(AdminRequest),
    /// A node ships usage records (at least once; the ledger deduplicates by record id).
    ReportUsage(Vec<UsageRecord>),
    /// A node asks whether an API key its HTTP ingress received is valid (nodes only: the
    /// caller's certificate must be a joined node's). Answered [`CtlResponse::KeyChecked`], or
    /// an `Unauthenticated` error for an unknown, malformed or revoked key.
    CheckKey {
        /// The key as the HTTP caller sent it; `None` for a request without one (valid only on
        /// an `insecure_dev` coordinator).
        api_key: Option<String>,
    },
    /// A node (by its certificate) asks for an artifact's chunk manifest and the mesh nodes
    /// that hold it, nearest first, with a grant to fetch chunks from them (issue 20:
    /// appended). Answered [`CtlResponse::ArtifactSources`]. A person with a `deploy` key who
    /// may see a model using the artifact gets the manifest only (no holders, no grant).
    ArtifactSources {
        /// Hex sha256 of the artifact.
        sha256: String,
    },
    /// Fetch `len` bytes of an artifact from `offset` (one chunk of a peer-assisted fetch;
    /// issue 20: appended). Answered like [`CtlRequest::FetchArtifact`]: `Artifact { total,
    /// size }` and `size` raw bytes (`len`, or less at the end of the artifact).
    FetchArtifactRange {
        /// Hex sha256 of the artifact.
        sha256: String,
        /// First byte wanted.
        offset: u64,
        /// Bytes wanted.
        len: u64,
    },
}

/// A version's share of a model's traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionWeight {
    /// Model version.
    pub version: String,
    /// Relative weight (the shares are weight / sum of weights).
    pub weight: u32,
}

/// Control-plane responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CtlResponse {
    /// The node was admitted.
    Joined(Joined),
    /// Heartbeat accepted; the models the node should hold.
    HeartbeatAck(HeartbeatAck),
    /// The model version was stored.
    Deployed(ModelInfo),
    /// `size` raw bytes of the artifact follow, from the requested offset.
    Artifact {
        /// Total artifact size.
        total: u64,
        /// Bytes that follow on the stream.
        size: u64,
    },
    /// Ranked candidates for a model.
    Resolved(Resolution),
    /// Deployed models.
    Models(Vec<ModelInfo>),
    /// Known nodes.
    Nodes(Vec<NodeInfo>),
    /// The request failed.
    Error(WireError),
    /// A model's traffic split (empty: the latest version takes all).
    Traffic(Vec<VersionWeight>),
    /// The answer to an [`AdminRequest`].
    Admin(AdminResponse),
    /// Usage records are in the ledger (durably): the node may forget them.
    UsageStored {
        /// Records new to the ledger (the rest were duplicates).
        new: u32,
    },
    /// The answer to [`CtlRequest::CheckKey`]: the key is valid.
    KeyChecked(KeyGrant),
    /// The answer to [`CtlRequest::ArtifactSources`] (issue 20: appended).
    ArtifactSources(ArtifactSources),
}

/// What a valid API key may do, as a node's HTTP ingress caches it (see
/// [`CtlRequest::CheckKey`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGrant {
    /// The key's id (`skn_<id>_…`; `local` for an `insecure_dev` caller without a key):
    /// revocations name it.
    pub key_id: String,
    /// The tenant billed.
    pub tenant: String,
    /// Its scopes (`admin`, `deploy`, `invoke`, `read-usage`).
    pub scopes: Vec<String>,
    /// An `admin` key of the platform tenant: sees every tenant's models.
    pub platform_admin: bool,
    /// The tenant's request rate limit per node (`None`: unlimited), as in a route ticket.
    pub max_rps: Option<u32>,
    /// The tenant's concurrent request limit per node (`None`: unlimited).
    pub max_concurrent: Option<u32>,
    /// The tenant's offline validity, ms: a node that cannot reach the coordinator honours
    /// this grant at most this long after the coordinator gave it (issue 20: appended).
    pub offline_validity_ms: u64,
}

impl KeyGrant {
    /// Whether the key may run inference (`invoke`, or `admin`, which implies every scope).
    pub fn may_invoke(&self) -> bool {
        self.scopes.iter().any(|s| s == "invoke" || s == "admin")
    }
}

/// How long after its revocation a key id is still named in heartbeat answers, ms. A node
/// keeps a checked key at most this long (TTL plus offline grace, clamped), so every node
/// holding the key hears of its revocation.
pub const KEY_REVOCATION_WINDOW_MS: u64 = 15 * 60 * 1000;

/// A node's request to join the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The join token given to the operator.
    pub token: String,
    /// PEM certificate signing request for the node's persistent key.
    pub csr_pem: String,
    /// Host name, for people.
    pub hostname: String,
    /// The node's libp2p peer identity with a proof that the node holds its key (issue 19:
    /// appended); the coordinator binds it to the node at join. `None` from a node without the
    /// peer layer.
    pub peer: Option<PeerBinding>,
}

/// Answer to a join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    /// The node's identity in the mesh.
    pub node_id: NodeId,
    /// The node's certificate, signed by the mesh CA (PEM).
    pub cert_pem: String,
    /// The mesh CA certificate (PEM).
    pub ca_pem: String,
}

/// Hardware a node offers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// CPU cores available to the agent.
    pub cores: u32,
    /// Memory in bytes available to the agent.
    pub memory_bytes: u64,
    /// Execution backends, e.g. `tract-cpu`, `burn-wgpu`.
    pub backends: Vec<String>,
    /// The accelerators the node found (wgpu adapters), best first; empty on a CPU-only node
    /// or a build without the GPU backend.
    pub accelerators: Vec<AcceleratorInfo>,
    /// The ONNX Runtime version the node runs models on (`1.31.1`); empty when it does not.
    pub ort_version: String,
    /// ONNX Runtime's execution providers in use, in order of preference
    /// (`CUDAExecutionProvider`, `CPUExecutionProvider`); empty without ONNX Runtime.
    pub ort_providers: Vec<String>,
}

/// One accelerator of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceleratorInfo {
    /// Adapter name (`NVIDIA H200`, `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub name: String,
    /// API it is reached through (`Vulkan`, `Metal`, `Dx12`, `Cuda`).
    pub backend: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `VirtualGpu` or `Cpu` (a software rasteriser).
    pub device_type: String,
    /// Largest buffer it allows, bytes.
    pub max_buffer_bytes: u64,
    /// The node runs models on it.
    pub in_use: bool,
}

/// Where a model stands on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ModelState {
    /// The artifact is being fetched.
    Fetching,
    /// On disk, not in memory.
    Cached,
    /// Being loaded and optimised.
    Loading,
    /// In memory and ready.
    Loaded,
    /// Fetch or load failed; the message says why.
    Failed(WireError),
}

impl ModelState {
    /// A short lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            ModelState::Fetching => "fetching",
            ModelState::Cached => "cached",
            ModelState::Loading => "loading",
            ModelState::Loaded => "loaded",
            ModelState::Failed(_) => "failed",
        }
    }
}

/// Per-model state and load on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStatus {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// Where the model stands.
    pub state: ModelState,
    /// Requests waiting to start.
    pub queue_depth: u32,
    /// Requests running.
    pub in_flight: u32,
    /// Requests that may run at once.
    pub concurrency: u32,
    /// EWMA of compute time per request, µs (0 when unknown).
    pub service_time_us: f64,
    /// Load time, µs: the slowest recent load, easing down a third of the way per faster load
    /// (the pre-warm lead); 0 when unknown.
    pub load_time_us: u64,
    /// Cold starts on this node (request-triggered loads and new input shapes).
    pub cold_starts: u64,
    /// Milliseconds since the last request, if any.
    pub idle_ms: Option<u64>,
    /// Resident memory held by the loaded model, bytes (0 when not loaded).
    pub memory_bytes: u64,
    /// Model runs on this node (a micro-batch counts once).
    pub runs: u64,
    /// Requests that arrived for this model version on this node (served or refused).
    pub requests: u64,
    /// Milliseconds since the last request arrived; `None` before the first.
    pub since_arrival_ms: Option<u64>,
}

/// A node's periodic report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Address clients use to reach the node's `skein/infer` endpoint.
    pub addr: String,
    /// Hardware offered.
    pub capacity: Capacity,
    /// Labels such as `region=eu-west`.
    pub labels: BTreeMap<String, String>,
    /// Models on the node.
    pub models: Vec<ModelStatus>,
    /// Monotonic sequence number, per node process.
    pub seq: u64,
    /// The node is shutting down: route nothing new to it.
    pub draining: bool,
    /// The node's Vivaldi network coordinate (from its RTTs to the coordinator and to peers).
    pub coordinate: Option<Coordinate>,
    /// Where the node's HTTP ingress (the V2 API, `skein-node --http`) listens, `host:port`;
    /// `None` when it has none.
    pub ingress: Option<String>,
    /// Usage records the node has served but the coordinator has not stored yet (its usage
    /// spool, `<data_dir>/usage.spool`): high after an outage, until they are shipped.
    pub usage_unsent: u64,
    /// The node's peer layer (libp2p): its bound identity, reachability and addresses (issue
    /// 19: appended). `None` when the node runs no peer layer. Boxed to keep `CtlRequest`
    /// small; the encoding is that of a `PeerReport`.
    pub peer: Option<Box<PeerReport>>,
    /// Hex sha256 of the artifacts complete (verified) in the node's cache, at most
    /// [`MAX_CACHED_REPORTED`] (issue 20: appended): the coordinator names the node as a
    /// holder to others fetching them.
    pub cached: Vec<String>,
}

/// Cached artifacts a heartbeat names at most.
pub const MAX_CACHED_REPORTED: usize = 64;

/// A model version a node should hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// Hex sha256 of the artifact.
    pub sha256: String,
    /// Artifact size in bytes.
    pub size: u64,
    /// How to serve it.
    pub settings: DeploymentSettings,
    /// This node holds one of the `min_replicas` provisioned replicas: load now, never idle
    /// out, never evicted for memory.
    pub keep_warm: bool,
    /// The autoscaler expects no call before it could pre-warm again: unload an idle replica
    /// now instead of waiting for `idle_timeout_ms`.
    pub unload_idle: bool,
    /// The autoscaler wants a replica here (demand, or ahead of a predicted call): load now if
    /// not loaded. Unlike `keep_warm` it idles out and may be evicted like any replica.
    pub prewarm: bool,
}

/// The autoscaler's view of one model version (`skein models`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScalingInfo {
    /// Replicas it wants warm now.
    pub desired_replicas: u32,
    /// Nodes told to keep a replica warm.
    pub warm_nodes: Vec<NodeId>,
    /// Why that many replicas.
    pub reason: String,
    /// The keep-alive policy in force (fixed, or from the inter-arrival-time histogram).
    pub keep_alive: String,
    /// Pre-warm decision and where new replicas go.
    pub prewarm: String,
}

/// Answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// The node's identity as the coordinator knows it.
    pub node_id: NodeId,
    /// Models the node should hold.
    pub assignments: Vec<Assignment>,
    /// When to send the next heartbeat, ms.
    pub interval_ms: u64,
    /// The coordinator's own network coordinate.
    pub coordinate: Option<Coordinate>,
    /// A few other nodes to probe for RTT (random, changes every heartbeat).
    pub peers: Vec<Peer>,
    /// The public keys whose route tickets the node must accept (the others: refuse).
    pub ticket_keys: Vec<TicketKey>,
    /// Ids of the API keys revoked in the last [`KEY_REVOCATION_WINDOW_MS`] (at most
    /// [`MAX_REVOKED_KEYS`], the newest): a node's HTTP ingress drops them at once.
    pub revoked_keys: Vec<String>,
    /// The owner (tenant) of each assigned model version, in the order of `assignments`: a
    /// node's HTTP ingress serves a tenant only its own and shared models.
    pub owners: Vec<String>,
    /// Circuit relays (multiaddrs ending in `/p2p/ID`) where a node behind NAT should hold a
    /// reservation (issue 19: appended).
    pub relays: Vec<String>,
    /// A *membership grant* (issue 20: appended): an artifact grant naming the node's PeerId
    /// and any artifact (`skein_net::grant::ANY_ARTIFACT`), valid about an hour and renewed
    /// by the answers. Saved with the answer, it admits the node to LAN holders' chunks while
    /// the coordinator is unreachable (no per-artifact grant can be had then). Empty for a
    /// node without a peer layer.
    #[serde(default)]
    pub membership_grant: SignedTicket,
    /// The digest of each assigned artifact's chunk manifest (`skein_net::artifact::
    /// manifest_digest`), in the order of `assignments`; empty when unknown (issue 20:
    /// appended). Offline, a manifest from a LAN holder is used only when it matches.
    #[serde(default)]
    pub manifest_digests: Vec<String>,
}

/// Revoked key ids a heartbeat answer names at most.
pub const MAX_REVOKED_KEYS: usize = 4096;

/// Another node, for RTT probes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    /// Node identity.
    pub node_id: NodeId,
    /// Its `skein/infer` address.
    pub addr: String,
    /// Its network coordinate, when known.
    pub coordinate: Option<Coordinate>,
}

/// An RTT a client measured to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RttSample {
    /// The node.
    pub node_id: NodeId,
    /// Smoothed RTT of the client's connection to it, µs.
    pub rtt_us: u64,
}

/// Where a caller is, as far as latency goes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CallerPosition {
    /// The caller's own network coordinate.
    pub coordinate: Option<Coordinate>,
    /// RTTs it measured to nodes recently (at most 32 are used); they beat any estimate.
    pub rtt_samples: Vec<RttSample>,
    /// Region label (prior until coordinates settle), e.g. `eu-west`.
    pub region: Option<String>,
    /// Zone label, e.g. `eu-west-1b`.
    pub zone: Option<String>,
    /// Rank as if the caller sat where this node is (`skein route --near`).
    pub near: Option<NodeId>,
}

/// How a model version is served: replicas, keep-alive, concurrency, batching, deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeploymentSettings {
    /// Replicas kept warm at all times; 0 lets the model scale to zero (default 0).
    pub min_replicas: u32,
    /// Most replicas serving at once; 0 means every node may (default 0).
    pub max_replicas: u32,
    /// A replica idle this long is unloaded, ms (default 300 000 = 5 min).
    pub idle_timeout_ms: u64,
    /// Requests one replica runs at once; 0 means the node's default (its core count).
    pub max_concurrency: u32,
    /// Largest micro-batch; 1 disables batching (default 1).
    pub max_batch_size: u32,
    /// Longest a request waits for others to batch with, µs (default 0).
    pub max_queue_delay_us: u64,
    /// Memory a replica needs, bytes; 0 means measured at the first load (default 0).
    pub memory_estimate: u64,
    /// Default request deadline, ms (default 30 000).
    pub timeout_ms: u64,
    /// Regions (the nodes' `region` label) allowed to hold and serve the model; empty: any
    /// (data residency). A node without a `region` label is outside every non-empty list.
    pub regions: Vec<String>,
    /// Device class (the nodes' `device_class` label, e.g. `gpu`, `edge-cpu`) required; empty:
    /// any.
    pub device_class: String,
    /// Every tenant's `invoke` keys may call it (and list it), not only its owner's.
    pub shared: bool,
    /// Whether it needs an accelerator: `any` (default), `prefer-gpu` (GPU nodes while one is
    /// healthy, else any) or `gpu` (GPU nodes only; CPU-only nodes never get it).
    pub accelerator: Accelerator,
    /// The engines able to run the model, set by the coordinator from its operator check at
    /// deploy (what a caller sends is replaced); empty: every engine. Boxed: most models need
    /// no particular engine, and control messages stay small.
    pub engines: Box<EngineNeed>,
}

/// Which engines (a node's [`ENGINE_LABEL`]) can run a model, and why the others cannot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineNeed {
    /// Engine names (`ort`); empty: any engine.
    pub engines: Vec<String>,
    /// The operators the other engines lack (`com.microsoft::DynamicQuantizeLSTM`).
    pub ops: Vec<String>,
}

/// The node label that names the engine a node runs models on: `tract`, `ort` (ONNX Runtime)
/// or `burn` (the GPU backend); set by the node itself from its backend, never by
/// configuration.
pub const ENGINE_LABEL: &str = "engine";

/// A deployment's need for an accelerator. A node running the GPU backend carries the label
/// [`ACCELERATOR_LABEL`]`=gpu`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Accelerator {
    /// Any node.
    #[default]
    Any,
    /// GPU nodes while one is healthy, otherwise any node.
    PreferGpu,
    /// GPU nodes only.
    Gpu,
}

/// The node label that says which accelerator a node runs models on (`gpu`); set by the node
/// itself from its backend, never by configuration.
pub const ACCELERATOR_LABEL: &str = "accelerator";

impl Accelerator {
    /// The name used in configuration and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Any => "any",
            Accelerator::PreferGpu => "prefer-gpu",
            Accelerator::Gpu => "gpu",
        }
    }
}

impl std::str::FromStr for Accelerator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "any" => Ok(Accelerator::Any),
            "prefer-gpu" => Ok(Accelerator::PreferGpu),
            "gpu" => Ok(Accelerator::Gpu),
            other => Err(format!(
                "accelerator `{other}`: expected any, prefer-gpu or gpu"
            )),
        }
    }
}

impl std::fmt::Display for Accelerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a node with these labels runs models on a GPU.
pub fn has_gpu(labels: &BTreeMap<String, String>) -> bool {
    labels.get(ACCELERATOR_LABEL).is_some_and(|v| v == "gpu")
}

impl Default for DeploymentSettings {
    fn default() -> Self {
        DeploymentSettings {
            min_replicas: 0,
            max_replicas: 0,
            idle_timeout_ms: 300_000,
            max_concurrency: 0,
            max_batch_size: 1,
            max_queue_delay_us: 0,
            memory_estimate: 0,
            timeout_ms: 30_000,
            regions: Vec::new(),
            device_class: String::new(),
            shared: false,
            accelerator: Accelerator::Any,
            engines: Box::default(),
        }
    }
}

/// A change to some deployment settings; `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsPatch {
    /// See [`DeploymentSettings::min_replicas`].
    pub min_replicas: Option<u32>,
    /// See [`DeploymentSettings::max_replicas`].
    pub max_replicas: Option<u32>,
    /// See [`DeploymentSettings::idle_timeout_ms`].
    pub idle_timeout_ms: Option<u64>,
    /// See [`DeploymentSettings::max_concurrency`].
    pub max_concurrency: Option<u32>,
    /// See [`DeploymentSettings::max_batch_size`].
    pub max_batch_size: Option<u32>,
    /// See [`DeploymentSettings::max_queue_delay_us`].
    pub max_queue_delay_us: Option<u64>,
    /// See [`DeploymentSettings::memory_estimate`].
    pub memory_estimate: Option<u64>,
    /// See [`DeploymentSettings::timeout_ms`].
    pub timeout_ms: Option<u64>,
    /// See [`DeploymentSettings::regions`] (an empty list allows any region again).
    pub regions: Option<Vec<String>>,
    /// See [`DeploymentSettings::device_class`] (empty allows any again).
    pub device_class: Option<String>,
    /// See [`DeploymentSettings::shared`].
    pub shared: Option<bool>,
    /// See [`DeploymentSettings::accelerator`].
    pub accelerator: Option<Accelerator>,
}

impl SettingsPatch {
    /// `base` with this patch applied.
    pub fn apply(&self, base: &DeploymentSettings) -> DeploymentSettings {
        DeploymentSettings {
            min_replicas: self.min_replicas.unwrap_or(base.min_replicas),
            max_replicas: self.max_replicas.unwrap_or(base.max_replicas),
            idle_timeout_ms: self.idle_timeout_ms.unwrap_or(base.idle_timeout_ms),
            max_concurrency: self.max_concurrency.unwrap_or(base.max_concurrency),
            max_batch_size: self.max_batch_size.unwrap_or(base.max_batch_size),
            max_queue_delay_us: self.max_queue_delay_us.unwrap_or(base.max_queue_delay_us),
            memory_estimate: self.memory_estimate.unwrap_or(base.memory_estimate),
            timeout_ms: self.timeout_ms.unwrap_or(base.timeout_ms),
            regions: self.regions.clone().unwrap_or_else(|| base.regions.clone()),
            device_class: self
                .device_class
                .clone()
                .unwrap_or_else(|| base.device_class.clone()),
            shared: self.shared.unwrap_or(base.shared),
            accelerator: self.accelerator.unwrap_or(base.accelerator),
            // The coordinator's operator check decides it, not a patch.
            engines: base.engines.clone(),
        }
    }
}

impl DeploymentSettings {
    /// Why these settings cannot work, if they cannot.
    pub fn problem(&self) -> Option<String> {
        if self.max_replicas != 0 && self.min_replicas > self.max_replicas {
            return Some(format!(
                "min_replicas ({}) exceeds max_replicas ({})",
                self.min_replicas, self.max_replicas
            ));
        }
        if self.max_batch_size == 0 || self.max_batch_size > 1024 {
            return Some("max_batch_size must be 1..=1024".into());
        }
        if self.max_concurrency > 1024 {
            return Some("max_concurrency must be at most 1024".into());
        }
        if self.timeout_ms == 0 || self.timeout_ms > 3_600_000 {
            return Some("timeout must be between 1 ms and 1 h".into());
        }
        if self.max_queue_delay_us > 10_000_000 {
            return Some("max_queue_delay must be at most 10 s".into());
        }
        if self.regions.len() > 32 {
            return Some("at most 32 regions".into());
        }
        let label_ok = |l: &str| {
            (1..=64).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        if let Some(r) = self.regions.iter().find(|r| !label_ok(r)) {
            return Some(format!(
                "region `{r}` is not a label (1 to 64 of A-Z a-z 0-9 - _ .)"
            ));
        }
        if !self.device_class.is_empty() && !label_ok(&self.device_class) {
            return Some(format!(
                "device class `{}` is not a label (1 to 64 of A-Z a-z 0-9 - _ .)",
                self.device_class
            ));
        }
        None
    }

    /// The constraints in words, for error messages (empty when there are none). Whether a
    /// node meets them is decided by `skein_policy::placement::allows`.
    pub fn constraints(&self) -> String {
        let mut parts = Vec::new();
        if !self.regions.is_empty() {
            parts.push(format!("a region in [{}]", self.regions.join(", ")));
        }
        if !self.device_class.is_empty() {
            parts.push(format!("device class `{}`", self.device_class));
        }
        if self.accelerator == Accelerator::Gpu {
            parts.push("a GPU backend".into());
        }
        if !self.engines.engines.is_empty() {
            parts.push(format!(
                "an engine that runs {} ({})",
                self.engines.ops.join(", "),
                self.engines.engines.join(", ")
            ));
        }
        parts.join(" and ")
    }
}

/// Upload of a model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRequest {
    /// Model name: `[A-Za-z0-9_.-]{1,64}`.
    pub name: String,
    /// Version; the coordinator assigns the next integer when absent.
    pub version: Option<String>,
    /// Bytes that follow.
    pub size: u64,
    /// Hex sha256 of those bytes.
    pub sha256: String,
    /// How to serve it.
    pub settings: DeploymentSettings,
}

/// A deployed model version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Hex sha256 of the artifact.
    pub sha256: String,
    /// Artifact size in bytes.
    pub size: u64,
    /// When it was deployed, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// Declared inputs.
    pub inputs: Vec<TensorSpec>,
    /// Declared outputs.
    pub outputs: Vec<TensorSpec>,
    /// Nodes where it is loaded.
    pub loaded_on: Vec<NodeId>,
    /// How it is served.
    pub settings: DeploymentSettings,
    /// Replicas loaded and ready.
    pub warm_replicas: u32,
    /// Replicas being fetched or loaded.
    pub loading_replicas: u32,
    /// Cold starts counted by the nodes (loads triggered by requests, and new shapes).
    pub cold_starts: u64,
    /// Replica by node.
    pub replicas: Vec<ReplicaInfo>,
    /// What the autoscaler decided last, and why.
    pub scaling: Option<ScalingInfo>,
    /// The tenant that deployed it.
    pub owner: String,
}

/// One replica of a model version, as its node last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// The node.
    pub node: NodeId,
    /// Where it stands (`loaded`, `loading`, `cached`...).
    pub state: ModelState,
    /// Requests waiting there.
    pub queue_depth: u32,
    /// Requests running there.
    pub in_flight: u32,
    /// Milliseconds since it last served a request, if ever.
    pub idle_ms: Option<u64>,
    /// Resident memory it holds, bytes (0 when unloaded or unknown).
    pub memory_bytes: u64,
    /// Cold starts counted there.
    pub cold_starts: u64,
    /// Model runs there (a micro-batch counts once).
    pub runs: u64,
}

/// Resolve a model to candidate nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolveRequest {
    /// Model name.
    pub model: String,
    /// Version; latest when absent.
    pub version: Option<String>,
    /// Where the caller is.
    pub position: CallerPosition,
    /// Bytes a typical request moves (inputs plus outputs); 0 when unknown.
    pub payload_bytes: u64,
    /// The caller's trace context, when it traces this request.
    pub trace: Option<crate::TraceContext>,
}

/// One candidate node for a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Node identity; the TLS server name is `<node_id>.node.skein`.
    pub node_id: NodeId,
    /// Address of the node's `skein/infer` endpoint.
    pub addr: String,
    /// Whether the model is loaded there.
    pub loaded: bool,
    /// Expected completion time, µs, as the coordinator estimates it.
    pub expected_us: f64,
    /// What `expected_us` is made of.
    pub parts: ScoreParts,
    /// Where the RTT estimate came from: `sample` (the caller measured it), `coordinates`,
    /// `labels` (region/zone prior) or `default`.
    pub rtt_source: String,
    /// The node's network coordinate, when known (the SDK updates its own from it).
    pub coordinate: Option<Coordinate>,
    /// Requests running at once for this model there.
    pub concurrency: u32,
    /// How to reach the node through the peer layer when its address is not reachable (behind
    /// NAT): its PeerId and relay circuit (issue 19: appended). `None` for a node without one.
    pub peer: Option<PeerRoute>,
}

/// Answer to a resolve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolution {
    /// Model name.
    pub model: String,
    /// The concrete version chosen.
    pub version: String,
    /// Declared inputs.
    pub inputs: Vec<TensorSpec>,
    /// Declared outputs.
    pub outputs: Vec<TensorSpec>,
    /// Best first.
    pub candidates: Vec<Candidate>,
    /// How long the answer may be cached, ms.
    pub ttl_ms: u64,
    /// The model's traffic split when the caller named no version (empty: none). `version`
    /// is then the default (heaviest) one; the SDK picks a version per call by weight and
    /// resolves it.
    pub split: Vec<VersionWeight>,
    /// The coordinator's network coordinate.
    pub coordinator: Option<Coordinate>,
    /// Nodes the coordinator has declared dead (missed heartbeats): a client drops its
    /// connections to them, so requests in flight there fail over now rather than at the
    /// transport's idle timeout.
    pub dead: Vec<NodeId>,
    /// The route ticket: nodes serve the caller only with it (valid for `version`, and for
    /// every version of `split`).
    pub ticket: SignedTicket,
}

/// Health of a node as the coordinator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeHealth {
    /// Heartbeats arrive on time.
    Alive,
    /// Heartbeats are late.
    Suspect,
    /// Heartbeats stopped; no traffic is routed to it.
    Dead,
    /// Shutting down: finishing the requests it holds; no new traffic is routed to it.
    Draining,
}

impl NodeHealth {
    /// A short lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeHealth::Alive => "alive",
            NodeHealth::Suspect => "suspect",
            NodeHealth::Dead => "dead",
            NodeHealth::Draining => "draining",
        }
    }
}

/// A node as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node identity.
    pub node_id: NodeId,
    /// Host name given at join.
    pub hostname: String,
    /// Infer address.
    pub addr: String,
    /// Health.
    pub health: NodeHealth,
    /// Milliseconds since the last heartbeat.
    pub last_seen_ms: u64,
    /// Hardware offered.
    pub capacity: Capacity,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Models and their load.
    pub models: Vec<ModelStatus>,
    /// Its network coordinate, as last reported.
    pub coordinate: Option<Coordinate>,
    /// Its HTTP ingress address (`skein-node --http`), as last reported.
    pub ingress: Option<String>,
    /// Usage records it holds unsent, as last reported (`Heartbeat::usage_unsent`).
    pub usage_unsent: u64,
    /// Its peer layer as last reported: PeerId, reachability, relay (issue 19: appended).
    pub peer: Option<PeerReport>,
}

/// An inference request (ALPN `skein/infer`); input bytes follow in the frame payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferRequest {
    /// Idempotent request id chosen by the caller.
    pub id: u64,
    /// Model name.
    pub model: String,
    /// Version; the newest the node holds when absent.
    pub version: Option<String>,
    /// Input descriptors, in payload order.
    pub inputs: Vec<TensorDesc>,
    /// Outputs wanted; all when empty.
    pub outputs: Vec<String>,
    /// Give up when the request cannot complete within this many ms.
    pub timeout_ms: Option<u64>,
    /// The route ticket from the coordinator's resolve.
    pub ticket: SignedTicket,
    /// The caller's trace context: the node's span becomes a child of `span_id`.
    pub trace: Option<crate::TraceContext>,
    /// What is asked: an inference (the default), or what the node serves (issue 20:
    /// appended).
    pub kind: RequestKind,
}

/// What an [`InferRequest`] asks of a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestKind {
    /// Run the model on the inputs.
    #[default]
    Infer,
    /// No inputs: which models and versions the node serves, loaded or not
    /// ([`InferResponse::Served`]). Answered only to a caller whose route ticket (for
    /// `model`) the node accepts, and only with the models the ticket's tenant may call (its
    /// own and shared ones), so a LAN client finds nodes without the coordinator.
    Served,
}

/// A node's answer to [`RequestKind::Served`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedModels {
    /// The node.
    pub node_id: NodeId,
    /// Its `skein/infer` address.
    pub addr: String,
    /// Whether it is offline (cannot reach its coordinator).
    pub offline: bool,
    /// Every model version it holds a slot for.
    pub models: Vec<ServedModel>,
}

/// One model version a node serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedModel {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Loaded now (else loaded on the first call, from the node's cache or the coordinator).
    pub loaded: bool,
    /// The newest version of `name` on this node.
    pub latest: bool,
}

/// What the node reports about how it served a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseMeta {
    /// Node that served it.
    pub node: NodeId,
    /// Whether the model had to be loaded (or a new shape optimised) for this request.
    pub cold_start: bool,
    /// Time waiting for a worker, µs.
    pub queue_us: u64,
    /// Time computing (including plan optimisation on a cold start), µs.
    pub compute_us: u64,
    /// Requests queued on that model when this one finished.
    pub queue_depth: u32,
}

/// A successful inference; output bytes follow in the frame payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferReply {
    /// The request's id.
    pub id: u64,
    /// Model name.
    pub model: String,
    /// Version that served it.
    pub version: String,
    /// Output descriptors, in payload order.
    pub outputs: Vec<TensorDesc>,
    /// How it was served.
    pub meta: ResponseMeta,
}

/// Answer on `skein/infer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum InferResponse {
    /// Outputs follow.
    Ok(InferReply),
    /// The request failed.
    Err(WireError),
    /// What the node serves ([`RequestKind::Served`]; issue 20: appended).
    Served(ServedModels),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode<T: Serialize>(v: &T) -> Vec<u8> {
        bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap()
    }

    fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> T {
        let (v, n) = bincode::serde::decode_from_slice(bytes, bincode::config::standard()).unwrap();
        assert_eq!(n, bytes.len());
        v
    }

    fn f64s(xs: &[f64]) -> Vec<u8> {
        xs.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// The bytes on the wire: the fields in declaration order, a `Vec` as its length (one byte
    /// below 251) then its elements, each `f64` as 8 little-endian bytes. Changing the layout
    /// breaks every peer of another version.
    #[test]
    fn coordinate_wire_layout_is_fixed() {
        let c = Coordinate {
            vec: vec![1.5, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0, 3.25],
            height: 10.0,
            error: 1.5,
            adjustment: -3.0,
        };
        let mut want = vec![8u8];
        want.extend(f64s(&c.vec));
        want.extend(f64s(&[10.0, 1.5, -3.0]));
        assert_eq!(encode(&c), want);
        assert_eq!(decode::<Coordinate>(&want), c);
    }

    #[test]
    fn score_parts_wire_layout_is_fixed() {
        let p = ScoreParts {
            rtt_us: 1.0,
            queue_us: 2.0,
            service_us: 3.0,
            cold_us: 4.0,
            transfer_us: 5.0,
            relay_us: 6.0,
        };
        let want = f64s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(encode(&p), want);
        assert_eq!(decode::<ScoreParts>(&want), p);
    }
}

/// A node's libp2p identity, and the proof that the node holds its key: an Ed25519 signature by
/// the libp2p key over `skein-peer-binding/1:` followed by the node id (checked by skein-peer's
/// `binding::verify`). Sent over the node's mutually authenticated control connection, so the
/// coordinator knows the node id and the peer key belong together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerBinding {
    /// The PeerId, base58 (`12D3KooW...`).
    pub peer_id: String,
    /// The libp2p public key, protobuf encoding.
    pub public_key: Vec<u8>,
    /// The signature.
    pub signature: Vec<u8>,
}

/// What a node's peer layer reports in each heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReport {
    /// The identity, with its proof (the coordinator refuses a PeerId other than the one bound
    /// at join).
    pub binding: PeerBinding,
    /// AutoNAT's verdict: `public`, `nat` or `unknown`.
    pub reachability: String,
    /// Multiaddrs the node listens on (at most 16 are kept).
    pub listen: Vec<String>,
    /// Multiaddrs others saw it at (at most 16 are kept).
    pub observed: Vec<String>,
    /// Its circuit addresses on the relays where it holds a reservation.
    pub relayed: Vec<String>,
}

/// How a caller reaches a node through the peer layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRoute {
    /// The PeerId bound to the node: a caller refuses a peer that proves another.
    pub peer_id: String,
    /// Direct multiaddrs (listen and observed) worth trying.
    pub addrs: Vec<String>,
    /// Circuit multiaddrs through relays where the node holds a reservation.
    pub relayed: Vec<String>,
    /// `public`, `nat` or `unknown`.
    pub reachability: String,
}

/// An artifact cut into fixed-size chunks, as the coordinator records it at upload (issue 20).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactManifest {
    /// Hex sha256 of the whole artifact (its id).
    pub sha256: String,
    /// Its size, bytes.
    pub total: u64,
    /// Chunk size, bytes (the last chunk may be shorter).
    pub chunk_bytes: u64,
    /// The sha256 of each chunk, in order.
    pub chunks: Vec<[u8; 32]>,
}

/// A mesh node that holds an artifact complete, and how to reach its peer layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactHolder {
    /// The node.
    pub node_id: NodeId,
    /// The PeerId bound to it: the fetcher refuses a peer that proves another.
    pub peer_id: String,
    /// Multiaddrs to dial: listen (LAN), observed, then relayed circuits.
    pub addrs: Vec<String>,
    /// Estimated round trip from the asker, µs (Vivaldi; `f64::MAX` when unknown).
    pub rtt_us: f64,
}

/// The answer to [`CtlRequest::ArtifactSources`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactSources {
    /// The chunk manifest.
    pub manifest: ArtifactManifest,
    /// Holders, nearest first (at most the coordinator's limit; empty for a person).
    pub holders: Vec<ArtifactHolder>,
    /// A short-lived grant, signed with the route-ticket keys, naming the asker's PeerId and
    /// the artifact: holders serve chunks only to its bearer (empty for a person).
    pub grant: SignedTicket,
}

/// What an artifact grant says (the signed body of [`ArtifactSources::grant`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactGrant {
    /// The signing key's id (the route-ticket key that signed it).
    pub key_id: u32,
    /// The fetcher's PeerId (base58): a holder serves only the connection that proves it.
    pub peer_id: String,
    /// Hex sha256 of the artifact.
    pub sha256: String,
    /// Not valid after this instant, ms since the Unix epoch.
    pub expires_unix_ms: u64,
}

/// A request on `/skein/artifact/1`: bytes `[offset, offset + len)` of an artifact (one chunk,
/// or a few), with the grant that admits the asker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkRequest {
    /// Hex sha256 of the artifact.
    pub sha256: String,
    /// First byte.
    pub offset: u64,
    /// Bytes wanted (bounded by the holder).
    pub len: u64,
    /// The coordinator's grant ([`ArtifactSources::grant`]), or the node's membership grant
    /// ([`HeartbeatAck::membership_grant`]).
    pub grant: SignedTicket,
    /// Ask for the artifact's chunk manifest instead of bytes (answered
    /// [`ChunkResponse::Manifest`]; `offset` and `len` are ignored). Issue 20: appended.
    #[serde(default)]
    pub manifest: bool,
}

/// The answer on `/skein/artifact/1`: the bytes in the frame's payload, or why not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ChunkResponse {
    /// The payload holds the bytes asked for; `total` is the artifact's size.
    Ok {
        /// The artifact's size, bytes.
        total: u64,
    },
    /// Refused (no grant, not held, too large, busy).
    Err(WireError),
    /// The chunk manifest of a held artifact ([`ChunkRequest::manifest`]; issue 20:
    /// appended). Not trusted by itself: the asker checks it against the digest its
    /// coordinator gave ([`HeartbeatAck::manifest_digests`]).
    Manifest(ArtifactManifest),
}
