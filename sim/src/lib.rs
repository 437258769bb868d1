//! skein-sim: a seeded, single-threaded discrete-event simulator that drives the very same
//! `skein-policy` code as the coordinator (routing, demand/keep-alive, autoscaling, placement,
//! pre-warming), at a scale no test machine reaches (no tokio, no quinn).
//!
//! - [`scenario`]: regions with coordinates, node classes (edge CPU, cloud GPU), models, and the
//!   named workloads (`steady`, `geo`, `geo-spike`, `diurnal`, `diurnal-spike`, `flash`,
//!   `azure`).
//! - [`engine`]: the event loop, one run per [`engine::Policy`], and its [`engine::Metrics`].
//! - [`report`]: the policy sets to compare, the table, JSON and SVG outputs.
//! - [`artifact`]: the `artifact` scenario: one artifact to many edge sites (thin uplinks, fast
//!   LANs), coordinator-only against peer-assisted with `skein_policy::artifact`'s scheduler.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod artifact;
pub mod engine;
pub mod report;
pub mod scenario;

use skein_policy::routing::{rank, NodeLoad, Ranked, RoutingDefaults};

/// Rank a snapshot of simulated nodes exactly as the coordinator would.
pub fn rank_snapshot(nodes: &[NodeLoad]) -> Vec<Ranked> {
    rank(nodes, &RoutingDefaults::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn seeded_snapshots_rank_deterministically() {
        let make = |seed: u64| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            (0..1000)
                .map(|key| NodeLoad {
                    key,
                    healthy: rng.gen_bool(0.95),
                    can_serve: true,
                    loaded: rng.gen_bool(0.5),
                    queued: rng.gen_range(0..10),
                    in_flight: rng.gen_range(0..4),
                    concurrency: 2,
                    service_us: Some(rng.gen_range(500.0..5000.0)),
                    load_us: None,
                    ..NodeLoad::default()
                })
                .collect::<Vec<_>>()
        };
        let a = rank_snapshot(&make(7));
        assert_eq!(a, rank_snapshot(&make(7)));
        assert!(a.windows(2).all(|w| w[0].expected_us <= w[1].expected_us));
    }
}
