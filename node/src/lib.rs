//! skein-node: the Skein node agent.
//!
//! Entry point: [`Node::start`] (embedded, as `skein up` and the tests use it) or [`run`] (the
//! `skein-node` binary).
//!
//! # Layout
//! - [`config`]: [`NodeConfig`] with documented defaults, and the machine's total memory (half
//!   of it is the default memory budget).
//! - [`address`]: the host's own address towards the coordinator (for a wildcard listen).
//! - [`identity`]: the node's persistent key, its certificate, joining with a token.
//! - [`install`]: `skein-node install | uninstall | status`: the node as a hardened systemd
//!   service on an edge device (the plan of files decided without IO, then applied).
//! - [`backend`]: which engine runs models (tract on the CPU, or burn on an accelerator with the
//!   `gpu` feature), chosen once at start.
//! - [`cache`]: content-addressed artifact cache, downloaded with skein-net's
//!   `artifact::fetch_with` (chunks from the coordinator and from peers holding the artifact,
//!   each verified; resumable from a `.partial` file; the whole verified by sha256).
//! - [`peer_artifacts`]: `/skein/artifact/1`: chunks fetched from and served to other nodes
//!   (grant-checked, bounded, upload-capped), and their metrics.
//! - [`executor`]: per model version a slot: on-demand load (off the async threads), a bounded
//!   queue, a concurrency limit, EWMA service time.
//! - [`batcher`]: micro-batching with measured per-bucket throughput.
//! - [`metering`]: per-tenant rate and concurrency limits (from the route ticket) and the
//!   bounded buffer of usage records sent to the coordinator.
//! - [`replay`]: each request id runs once per route ticket (0-RTT replays), bounded.
//! - [`metrics`]: the node's Prometheus endpoint and `GET /ready`.
//! - [`logging`]: text or JSON log output, and trace export when an OTLP endpoint is set.
//! - [`otlp`]: `tracing` spans to an OpenTelemetry collector over OTLP/HTTP (JSON), bounded.
//! - [`peer`]: the libp2p peer layer (skein-peer): reachable behind NAT through relays and
//!   hole punching; its PeerId bound to the node.
//! - [`agent`]: the node's life: join, heartbeats, assignments, the `skein/infer` endpoint;
//!   it talks to the coordinator through skein-net's `CtlClient` (reconnected on demand).
//!   `agent/ingress.rs`: the HTTP ingress (`--http`), skein-gateway served from this node,
//!   with the models loaded here handed straight to the executor.
//! - [`key_cache`]: API keys checked with the coordinator, cached for the ingress (decisions
//!   only, time passed in).
//! - [`mdns`]: the ingress advertised on the LAN as DNS-SD `_skein-v2._tcp`.
//! - [`assign`]: what a heartbeat's assignments mean for the slots (create, update, warm,
//!   unload), decided without IO.
//!
//! ```text
//!  coordinator ◀──ctl── agent (heartbeat, fetch) ──▶ cache ──▶ executor ◀──infer── SDK
//!       ▲  CheckKey                                                ▲
//!       └──────────── ingress (HTTP V2, skein-gateway) ────────────┘ (local models)
//!                         └──▶ skein-client ──▶ other nodes (the rest)
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod address;
pub mod agent;
pub mod assign;
pub mod backend;
pub mod batcher;
pub mod cache;
pub mod config;
pub mod executor;
pub mod identity;
pub mod install;
pub mod key_cache;
pub mod lan_fetch;
pub mod logging;
pub mod mdns;
pub mod metering;
pub mod metrics;
pub mod otlp;
pub mod peer;
pub mod peer_artifacts;
pub mod replay;

pub use skein_proto::time::unix_ms;

pub use agent::{run, Node};
pub use config::NodeConfig;
