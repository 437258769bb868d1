//! skein-coordinator: the control plane of a Skein mesh.
//!
//! Entry point: [`run`] (takes a config and a shutdown token) or
//! [`Coordinator::start`] for an embedded coordinator (as `skein up` and the tests use it).
//!
//! # Layout
//! - [`config`]: [`CoordinatorConfig`] with documented defaults.
//! - [`join_token`]: [`JoinToken`], `skein1-<secret>-<ca sha256>`: the secret admits a node, the
//!   CA fingerprint lets it verify the coordinator on its first connection.
//! - [`artifacts`]: content-addressed (sha256) model files on disk.
//! - Durable state is skein-store's: `skein_store::Registry` (`registry.sqlite`: model versions,
//!   traffic splits, join tokens, node identities and revocations) and `skein_store::Store`
//!   (`security.sqlite`, behind [`access`]).
//! - [`access`]: who may do what: API keys and scopes, tenants and their quotas, route tickets,
//!   the audit log and the usage ledger, around one `skein_store::Store`.
//! - [`membership`]: nodes, their heartbeats, capacity, load and health (alive/suspect/dead).
//! - [`scaler`]: the autoscaler: demand per model version, replica count, placement near the
//!   callers, keep-alive and pre-warming, every decision skein-policy's.
//! - [`server`]: the `skein/ctl` QUIC endpoint and the [`Coordinator`] handle: a small
//!   dispatcher and one file per request kind (`join`, `heartbeat` with usage reports,
//!   `resolve`, `deploy` with scale, traffic and listing, `fetch`, `admin`), over one `State`
//!   (registry, membership, coordinates, autoscaler) behind one lock.
//!
//! ```text
//!  skein CLI / SDK ─ctl─┐           ┌─▶ access (keys, tickets, audit, usage: skein_store)
//!                       ├─▶ server ─┼─▶ registry (skein_store) + artifacts (disk)
//!  skein-node ──────ctl─┘           ├─▶ membership ─▶ skein_policy::routing (resolve)
//!                                   └─▶ scaler ─▶ membership, skein_policy (demand, autoscale,
//!                                                 placement, prewarm)
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod access;
pub mod artifacts;
pub mod config;
pub mod join_token;
pub mod membership;
pub mod nodeview;
pub mod scaler;
pub mod server;

pub use config::CoordinatorConfig;
pub use join_token::JoinToken;
pub use server::{run, Coordinator};
