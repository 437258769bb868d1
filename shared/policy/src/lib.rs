//! skein-policy: Skein's decisions, without IO.
//!
//! Every function here takes the state it decides on (and, where needed, `now` and a seeded RNG)
//! as parameters and returns a decision; nothing spawns, sleeps or reads the clock. The
//! coordinator and the simulator call the very same code. It computes over skein-proto's wire
//! types (a [`vivaldi::Coordinate`], [`routing::ScoreParts`]) through extension traits
//! ([`vivaldi::CoordinateExt`], [`routing::ScorePartsExt`]) and links no IO crate (no
//! skein-net, quinn or tokio: `scripts/check-crate-graph` checks it).
//!
//! # Layout
//! - [`routing`]: rank candidate nodes for a request by expected completion time (RTT, queue,
//!   service, cold start, payload transfer), RTT priors from region/zone labels or coordinates,
//!   and the selection strategies (latency-aware power of two choices, round robin, least
//!   loaded).
//! - [`vivaldi`]: Vivaldi network coordinates (height-vector variant, as in Serf), to estimate
//!   the RTT between any two nodes from a few samples.
//! - [`load`]: client-side feedback between resolves: peak-EWMA latency, a hysteretic re-rank,
//!   a ban list with exponential backoff and full-jitter retry delays.
//! - [`ewma`]: an exponentially weighted moving average with explicit timestamps.
//! - [`failover`]: one SDK call's failover as a state machine: which errors move on to the next
//!   node, bans, the ticket refresh, the backoff and fresh resolve, attempts and deadline.
//! - [`demand`]: per-model (or per caller area) arrival rate with trend, and the inter-arrival
//!   histogram of the hybrid histogram policy ("Serverless in the Wild", ATC'20): keep-alive
//!   window and pre-warm time, fixed keep-alive fallback, out-of-range forecast.
//! - [`autoscale`]: desired replicas from rate × service time, clamped, with hysteresis (up at
//!   once under queue pressure, down only after the keep-alive window); each decision has a
//!   reason. [`autoscale::step`] is the whole per-model step the coordinator's scaler and the
//!   simulator both run.
//! - [`placement`]: whether a node may hold a model ([`placement::allows`]: regions, device
//!   class, accelerator, `prefer-gpu`; [`placement::eligible`]: and can take a new replica now),
//!   and the node for a new replica, nearest to where the demand comes from, preferring cached
//!   artifacts.
//! - [`prewarm`]: load ahead of the predicted next arrival, unload at keep-alive expiry.
//! - [`artifact`]: peer-assisted artifact fetch: the chunk manifest, and which chunk to ask of
//!   which source next (nearest holder, rarest chunk first, the coordinator as last resort, bad
//!   sources banned with backoff).
//!
//! Time is always a `now_us: u64` parameter (µs) and latencies are `f64` µs; randomness comes
//! in as `&mut impl rand::Rng`. No function panics, and none returns NaN, on extreme inputs.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod artifact;
pub mod autoscale;
pub mod demand;
pub mod ewma;
pub mod failover;
pub mod load;
pub mod placement;
pub mod prewarm;
pub mod routing;
pub mod vivaldi;
