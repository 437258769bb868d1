//! skein-node: the Skein node agent.
//!
//! Entry point: [`Node::start`] (embedded, as `skein up` and the tests use it) or [`run`] (the
//! `skein-node` binary).
//!
//! # Layout
//! - [`config`]: [`NodeConfig`] with documented defaults.
//! - [`identity`]: the node's persistent key, its certificate, joining with a token.
//! - [`cache`]: content-addressed artifact cache, fetched from the coordinator in resumable,
//!   verified chunks.
//! - [`executor`]: per model version a slot: on-demand load (off the async threads), a bounded
//!   queue, a concurrency limit, EWMA service time.
//! - [`batcher`]: micro-batching with measured per-bucket throughput.
//! - [`agent`]: the node's life: join, heartbeats, assignments, the `skein/infer` endpoint.
//! - [`assign`]: what a heartbeat's assignments mean for the slots (create, update, warm,
//!   unload), decided without IO.
//!
//! ```text
//!  coordinator ◀──ctl── agent (heartbeat, fetch) ──▶ cache ──▶ executor ◀──infer── SDK
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod agent;
pub mod assign;
pub mod backend;
pub mod batcher;
pub mod cache;
pub mod config;
pub mod executor;
pub mod identity;
pub mod logging;
pub mod metering;
pub mod metrics;
pub mod otlp;

pub use skein_proto::time::unix_ms;

pub use agent::{run, Node};
pub use config::NodeConfig;
