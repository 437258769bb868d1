//! skein-sim: a seeded, single-threaded discrete-event simulator that drives the very same
//! `skein-policy` code as the coordinator, at a scale no test machine reaches (no tokio, no
//! quinn).
//!
//! Today it holds one building block, [`rank_snapshot`], which ranks a simulated cluster with
//! the coordinator's routing function. The event loop, workloads (Poisson, diurnal, flash
//! crowd, Azure-Functions-like) and policy comparisons are built on it in a later issue.
#![forbid(unsafe_code)]

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
