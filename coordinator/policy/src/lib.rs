//! skein-policy: Skein's decisions, without IO.
//!
//! Every function here takes the state it decides on (and, where needed, `now` and a seeded RNG)
//! as parameters and returns a decision; nothing spawns, sleeps or reads the clock. The
//! coordinator and the simulator call the very same code.
//!
//! # Layout
//! - [`routing`]: rank candidate nodes for a request by expected completion time.
//! - [`ewma`]: an exponentially weighted moving average with explicit timestamps.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod ewma;
pub mod routing;
