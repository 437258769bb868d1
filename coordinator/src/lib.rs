//! skein-coordinator: the control plane of a Skein mesh.
//!
//! Entry point: [`run`] (takes a config, a bound UDP socket and a shutdown token) or
//! [`Coordinator::start`] for an embedded coordinator (as `skein up` and the tests use it).
//!
//! # Layout
//! - [`config`]: [`CoordinatorConfig`] with documented defaults.
//! - [`registry`]: durable state in SQLite (WAL): model versions, join tokens, node identities.
//! - [`artifacts`]: content-addressed (sha256) model files on disk.
//! - [`membership`]: nodes, their heartbeats, capacity, load and health (alive/suspect/dead).
//! - [`server`]: the `skein/ctl` QUIC endpoint: join, heartbeat, deploy (upload), fetch,
//!   resolve, list.
//!
//! ```text
//!  skein CLI / SDK ──ctl──▶ server ──▶ registry (SQLite) + artifacts (disk)
//!  skein-node     ──ctl──▶ server ──▶ membership ──▶ skein_policy::routing (resolve)
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod access;
pub mod artifacts;
pub mod config;
pub mod join_token;
pub mod membership;
pub mod registry;
pub mod scaler;
pub mod server;

pub use config::CoordinatorConfig;
pub use join_token::JoinToken;
pub use server::{run, Coordinator};
