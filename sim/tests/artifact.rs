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

/// `skein-sim --scenario artifact` as a user runs it, every flag of the scenario given: each
/// lands in the printed configuration and shows in the outcome; a malformed one is refused.
#[test]
fn the_binary_takes_every_artifact_flag() {
    let run_bin = |lan: &str| -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_skein-sim"))
            .args(["--scenario", "artifact", "--nodes", "60", "--sites", "3"])
            .args([
                "--artifact-mb",
                "20",
                "--uplink-mbps",
                "30",
                "--lan-mbps",
                lan,
            ])
            .args([
                "--join-spread-s",
                "5",
                "--bad-nodes-per-site",
                "1",
                "--seed",
                "4",
            ])
            .args(["--output", "json"])
            .output()
            .expect("running skein-sim");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    };
    let c = run_bin("500");
    let cfg = &c["config"];
    assert_eq!(cfg["sites"], 3);
    assert_eq!(cfg["nodes"], 60);
    assert_eq!(cfg["artifact_bytes"], 20_000_000);
    assert_eq!(cfg["uplink_mbps"], serde_json::json!([30.0, 30.0]));
    assert_eq!(cfg["lan_mbps"], 500.0);
    assert_eq!(cfg["join_spread_s"], 5.0);
    assert_eq!(cfg["bad_nodes_per_site"], 1);
    // Coordinator-only: every node pulls the whole model through its site's 30 Mbit/s uplink,
    // 20 nodes a site: at least 20 × 20 MB × 8 / 30 Mbit/s = 106.7 s, at most that plus the
    // 5 s join spread and a second of slack.
    let co = &c["coordinator_only"];
    assert_eq!(co["coordinator_egress_bytes"], 60 * 20_000_000u64);
    let t = co["all_warm_s"].as_f64().unwrap();
    assert!(
        (106.6..=112.7).contains(&t),
        "coordinator-only all warm at {t} s"
    );
    // The bad node per site is caught and nothing corrupt is loaded.
    let pa = &c["peer_assisted"];
    assert_eq!(pa["nodes_warm"], 60);
    assert!(pa["chunks_corrupt"].as_u64().unwrap() > 0, "{pa}");
    assert_eq!(pa["corrupt_accepted"], 0);
    // A slower LAN makes peer-assisted distribution slower.
    let slow = run_bin("50");
    assert!(
        slow["peer_assisted"]["all_warm_s"].as_f64().unwrap() > pa["all_warm_s"].as_f64().unwrap(),
        "LAN 50 vs 500 Mbit/s"
    );
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_skein-sim"))
        .args(["--scenario", "artifact", "--uplink-mbps", "abc"])
        .output()
        .expect("running skein-sim");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--uplink-mbps `abc`"));
}
