//! The `artifact` scenario at small scale (a few seconds in a debug build): peer-assisted
//! distribution against coordinator-only, with the goals asserted.

use skein_policy::artifact::ChunkManifest;
use skein_sim::artifact::{compare, run, DistributionConfig, DistributionResult, Mode, MB};

/// 5 sites × 20 nodes, a 50 MB model: the ratio goals need at least 10 nodes per site, since a
/// site's uplink carries the model at least once in either mode.
fn small(seed: u64) -> DistributionConfig {
    DistributionConfig {
        sites: 5,
        nodes: 100,
        artifact_bytes: 50 * MB,
        seed,
        ..DistributionConfig::default()
    }
}

/// Every node ends warm, each chunk verified exactly once per node, nothing corrupt accepted,
/// and every byte came from somewhere.
fn all_verified(cfg: &DistributionConfig, r: &DistributionResult) {
    let chunks = ChunkManifest::chunk_count_for(cfg.artifact_bytes, cfg.chunk_bytes);
    assert_eq!(r.nodes_warm, cfg.nodes, "seed {}: {r:?}", cfg.seed);
    assert_eq!(
        r.chunks_verified,
        chunks * cfg.nodes as u64,
        "seed {}: {r:?}",
        cfg.seed
    );
    assert_eq!(r.corrupt_accepted, 0, "seed {}: {r:?}", cfg.seed);
    assert!(
        r.coordinator_egress_bytes + r.peer_bytes >= cfg.artifact_bytes * cfg.nodes as u64,
        "seed {}: {r:?}",
        cfg.seed
    );
}

#[test]
fn peer_assisted_needs_a_tenth_of_the_egress_and_a_fifth_of_the_time() {
    for seed in [1, 2, 3] {
        let cfg = small(seed);
        let c = compare(&cfg).unwrap();
        all_verified(&cfg, &c.coordinator_only);
        all_verified(&cfg, &c.peer_assisted);
        // Coordinator-only: every byte through the uplinks.
        assert_eq!(
            c.coordinator_only.coordinator_egress_bytes,
            cfg.artifact_bytes * cfg.nodes as u64
        );
        assert_eq!(c.coordinator_only.peer_bytes, 0);
        assert!(c.egress_ratio <= 0.1, "seed {seed}: {c:#?}");
        assert!(c.time_ratio <= 0.2, "seed {seed}: {c:#?}");
        // Each site pulls the model over its uplink about once.
        let once = cfg.artifact_bytes * cfg.sites as u64;
        assert!(
            c.peer_assisted.coordinator_egress_bytes <= once + once / 10,
            "seed {seed}: {c:#?}"
        );
    }
}

#[test]
fn bad_peers_are_caught_and_every_node_still_loads_a_verified_model() {
    let cfg = DistributionConfig {
        bad_nodes_per_site: 2,
        ..small(4)
    };
    let r = run(&cfg, Mode::PeerAssisted).unwrap();
    all_verified(&cfg, &r);
    assert!(r.chunks_corrupt > 0, "the bad nodes served someone: {r:?}");
    // Banned at their first bad chunk (for 10 s, then doubled): few bad chunks per node.
    assert!(r.chunks_corrupt <= 2 * cfg.nodes as u64, "{r:?}");
    let clean = run(&small(4), Mode::PeerAssisted).unwrap();
    assert!(r.all_warm_s <= clean.all_warm_s * 1.5, "{r:?}\n{clean:?}");
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let a = compare(&small(9)).unwrap();
    let b = compare(&small(9)).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, compare(&small(10)).unwrap());
}

#[test]
fn bad_configurations_are_refused() {
    let zero_sites = DistributionConfig {
        sites: 0,
        ..small(1)
    };
    assert!(run(&zero_sites, Mode::PeerAssisted).is_err());
    let no_uplink = DistributionConfig {
        uplink_mbps: (0.0, 0.0),
        ..small(1)
    };
    let e = run(&no_uplink, Mode::CoordinatorOnly).unwrap_err();
    assert!(e.contains("bandwidths"), "{e}");
    let no_chunk = DistributionConfig {
        chunk_bytes: 0,
        ..small(1)
    };
    let e = run(&no_chunk, Mode::CoordinatorOnly).unwrap_err();
    assert!(e.contains("chunk size is 0"), "{e}");
}
