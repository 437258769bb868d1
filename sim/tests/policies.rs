//! Policy comparisons at small scale (each runs in a few seconds in a debug build).

use skein_policy::routing::Strategy;
use skein_sim::engine::{
    run_all, KeepAlivePolicy, Metrics, Policy, Routing, SimConfig, SLO_TARGET,
};
use skein_sim::report::{policies, Compare, Report};
use skein_sim::scenario::{Scenario, S};

fn run(name: &str, nodes: usize, requests: usize, ps: &[Policy]) -> Vec<Metrics> {
    run_seed(name, nodes, requests, 7, ps)
}

/// Every run of every test: no request is ever lost.
fn run_seed(name: &str, nodes: usize, requests: usize, seed: u64, ps: &[Policy]) -> Vec<Metrics> {
    let sc = Scenario::build(name, nodes, requests, seed).unwrap();
    let cfg = SimConfig {
        seed,
        ..SimConfig::default()
    };
    let r = run_all(&sc, ps, &cfg, 2);
    for m in &r {
        assert_eq!(m.dropped, 0, "{name} seed {seed}: {m:?}");
    }
    r
}

fn p(name: &str, routing: Routing, keep_alive: KeepAlivePolicy) -> Policy {
    Policy {
        name: name.into(),
        routing,
        keep_alive,
    }
}

const LAT: Routing = Routing::Strategy(Strategy::LatencyAware);

#[test]
fn predictive_keep_alive_beats_fixed_10_min_on_azure() {
    // Several seeds and sizes: fewer cold starts at no more warm node-seconds.
    for (nodes, requests, seed) in [(200, 60_000, 7), (200, 60_000, 1), (100, 30_000, 2)] {
        let r = run_seed(
            "azure",
            nodes,
            requests,
            seed,
            &[
                p("fixed", LAT, KeepAlivePolicy::Fixed(600 * S)),
                p("pred", LAT, KeepAlivePolicy::Predictive),
            ],
        );
        let (fixed, pred) = (&r[0], &r[1]);
        assert!(pred.cold_starts < fixed.cold_starts, "{pred:?}\n{fixed:?}");
        assert!(pred.warm_node_s <= fixed.warm_node_s, "{pred:?}\n{fixed:?}");
    }
}

#[test]
fn latency_aware_beats_least_loaded_p99_on_geo() {
    let r = run(
        "geo",
        300,
        100_000,
        &[
            p(
                "ll",
                Routing::Strategy(Strategy::LeastLoaded),
                KeepAlivePolicy::Predictive,
            ),
            p("lat", LAT, KeepAlivePolicy::Predictive),
        ],
    );
    assert!(r[1].p99_ms < r[0].p99_ms, "lat {:?}\nll {:?}", r[1], r[0]);
    assert!(r[1].p50_ms < r[0].p50_ms);
}

#[test]
fn scale_to_zero_costs_a_quarter_of_always_on_on_diurnal_spike_and_meets_the_slo() {
    let r = run(
        "diurnal-spike",
        300,
        100_000,
        &[
            p("on", LAT, KeepAlivePolicy::AlwaysOn),
            p("pred", LAT, KeepAlivePolicy::Predictive),
        ],
    );
    let (on, pred) = (&r[0], &r[1]);
    assert!(
        pred.warm_node_s <= 0.25 * on.warm_node_s,
        "{} vs {}",
        pred.warm_node_s,
        on.warm_node_s
    );
    assert!(on.slo_attainment >= 0.99);
    // Scale-to-zero meets the SLO too: ≥ 95 % within 500 ms, the flash crowd included.
    assert!(
        pred.slo_attainment >= SLO_TARGET,
        "SLO attainment {} < {SLO_TARGET}",
        pred.slo_attainment
    );
}

#[test]
fn no_flapping_under_steady_load() {
    let r = run(
        "steady",
        200,
        100_000,
        &[p("pred", LAT, KeepAlivePolicy::Predictive)],
    );
    // Six models; after the warm-up a few corrections at most.
    assert!(
        r[0].scale_changes_after_warmup <= 12,
        "{} changes after warm-up",
        r[0].scale_changes_after_warmup
    );
}

#[test]
fn same_seed_same_json() {
    let json = |seed: u64| {
        let sc = Scenario::build("geo-spike", 100, 20_000, seed).unwrap();
        let cfg = SimConfig {
            seed,
            ..SimConfig::default()
        };
        let runs = run_all(&sc, &policies(Compare::All), &cfg, 2);
        serde_json::to_string(&Report {
            scenario: sc.name.clone(),
            notes: sc.notes.clone(),
            nodes: sc.nodes.len(),
            models: sc.models.len(),
            requests: sc.arrivals.len(),
            seed,
            slo_ms: 500.0,
            runs,
        })
        .unwrap()
    };
    let a = json(3);
    assert_eq!(a, json(3));
    assert_ne!(a, json(4));
}

#[test]
fn every_scenario_builds_and_runs() {
    for name in skein_sim::scenario::SCENARIOS {
        let r = run(name, 50, 5_000, &policies(Compare::KeepAlive));
        assert_eq!(r.len(), 5, "{name}");
        for m in &r {
            assert!(m.p99_ms.is_finite() && m.p99_ms >= m.p50_ms, "{name} {m:?}");
        }
    }
    assert!(Scenario::build("nope", 10, 10, 1).is_err());
}
