//! Same trace, same decisions: the coordinator's autoscaler and the simulator run one rule.
//!
//! One seeded trace of three models (sporadic: a call every two minutes or so; bursty: quiet
//! minutes then seconds of a crowd; diurnal: a rate that rises and falls over the run) is
//! replayed through skein-sim's engine, which logs every autoscaling decision
//! ([`Sim::run_recorded`]), and through the coordinator's [`Scaler`] on a fake clock (tokio
//! instants built as `t0 + offset`: no sleeping, no network).
//!
//! The simulated world is the reference. The coordinator sees it as it sees a real mesh, only
//! through heartbeats: every arrival comes in a heartbeat at its own instant (so both sides
//! see the same arrival times), and at each of the simulator's decisions the members report
//! the replicas, loads, queued and running requests, service and load times the simulator
//! had. The coordinator's `tick` at that instant must then decide what the simulator decided:
//! the same desired replicas, the same replicas held (warm nodes), the same unload-idle and
//! the same reason, at every decision.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skein_coordinator::membership::{Membership, Thresholds};
use skein_coordinator::nodeview::NodeView;
use skein_coordinator::scaler::{Scaler, ScalingConfig};
use skein_policy::routing::Position;
use skein_policy::routing::Strategy;
use skein_proto::{Capacity, DeploymentSettings, Heartbeat, ModelInfo, ModelState, ModelStatus};
use skein_sim::engine::{KeepAlivePolicy, Policy, Routing, ScaleRecord, Sim, SimConfig};
use skein_sim::scenario::{Arrival, Model, Node, NodeClass, Region, Scenario, S};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::time::Instant;

const SEED: u64 = 18;
/// Nodes in the cluster (both sides): more than any decision holds.
const NODES: usize = 16;
const HORIZON_S: u64 = 3_600;
const GIB: u64 = 1 << 30;

fn models() -> Vec<Model> {
    let m = |name: &str, service_ms: f64, load_ms: u64, concurrency| Model {
        name: name.to_string(),
        service_us: service_ms * 1e3,
        memory_bytes: 256 << 20,
        artifact_bytes: 40 << 20,
        load_us: load_ms * 1_000,
        concurrency,
        accelerator: false,
    };
    vec![
        m("sporadic", 80.0, 900, 1),
        m("bursty", 60.0, 600, 2),
        m("diurnal", 50.0, 400, 1),
    ]
}

/// The trace: seeded, in whole µs, sorted by time.
fn trace(rng: &mut StdRng) -> Vec<Arrival> {
    let horizon = HORIZON_S * S;
    let mut out = Vec::new();
    let mut push = |t: u64, model: u32| {
        if t < horizon {
            out.push(Arrival {
                t_us: t,
                model,
                region: 0,
            });
        }
    };
    // Sporadic: about every two minutes, ±20 s, sometimes a pair.
    let mut t = 30 * S;
    while t < horizon {
        push(t, 0);
        if rng.gen_bool(0.15) {
            push(t + rng.gen_range(1..5 * S), 0);
        }
        t += rng.gen_range(100 * S..140 * S);
    }
    // Bursty: every 8 to 12 minutes a crowd of 20 to 40 calls/s for 10 to 30 s.
    let mut start = 60 * S;
    while start < horizon {
        let rate = rng.gen_range(20.0..40.0);
        let end = start + rng.gen_range(10 * S..30 * S);
        let mut t = start;
        while t < end {
            push(t, 1);
            t += (-(1.0 - rng.gen::<f64>()).ln() / rate * 1e6) as u64 + 1;
        }
        start = end + rng.gen_range(480 * S..720 * S);
    }
    // Diurnal: one "day" over the run, from 0.05 to 30 calls/s (thinned Poisson).
    let peak = 30.0;
    let mut t = 0u64;
    loop {
        t += (-(1.0 - rng.gen::<f64>()).ln() / peak * 1e6) as u64 + 1;
        if t >= horizon {
            break;
        }
        let phase = t as f64 / horizon as f64 * std::f64::consts::TAU;
        let rate = 0.05 + (peak - 0.05) * 0.5 * (1.0 - phase.cos());
        if rng.gen_bool(rate / peak) {
            push(t, 2);
        }
    }
    out.sort_by_key(|a| (a.t_us, a.model, a.region));
    out
}

fn scenario() -> Scenario {
    let mut rng = StdRng::seed_from_u64(SEED);
    let region = Position {
        coordinate: None,
        region: Some("r0".into()),
        zone: None,
    };
    let arrivals = trace(&mut rng);
    Scenario {
        name: "same-decisions".into(),
        regions: vec![Region {
            name: "r0".into(),
            caller: region.clone(),
        }],
        classes: vec![NodeClass {
            name: "cpu",
            service_mult: 1.0,
            price_per_s: 1.0,
            memory_bytes: 64 * GIB,
            accelerator: false,
            bandwidth_bps: 1e9,
        }],
        nodes: (0..NODES)
            .map(|_| Node {
                class: 0,
                region: 0,
                position: region.clone(),
            })
            .collect(),
        rtt_us: vec![1_000.0; NODES],
        models: models(),
        arrivals,
        horizon_us: HORIZON_S * S,
        payload_bytes: 1024,
        notes: "sporadic, bursty and diurnal models for the same-trace test".into(),
    }
}

fn model_info(m: &Model) -> ModelInfo {
    ModelInfo {
        name: m.name.clone(),
        version: "1".into(),
        sha256: "00".into(),
        size: m.artifact_bytes,
        created_unix_ms: 1,
        settings: DeploymentSettings {
            max_concurrency: m.concurrency,
            ..DeploymentSettings::default()
        },
        owner: "root".into(),
        ..ModelInfo::default()
    }
}

fn status(m: &Model, state: ModelState, requests: u64) -> ModelStatus {
    ModelStatus {
        name: m.name.clone(),
        version: "1".into(),
        state,
        queue_depth: 0,
        in_flight: 0,
        concurrency: m.concurrency,
        service_time_us: m.service_us,
        load_time_us: m.load_us,
        cold_starts: 0,
        idle_ms: None,
        memory_bytes: 0,
        runs: requests,
        requests,
        since_arrival_ms: Some(0),
    }
}

/// The members as the simulator's world was at decision `r`: `current` nodes hold a replica
/// (the first `loading` still loading), the rest have the artifact cached; every node reports
/// the model's service and load times, the first one the queued and running requests.
fn members(m: &Model, r: &ScaleRecord, at: Instant) -> Membership {
    let mut membership = Membership::default();
    for i in 0..NODES as u32 {
        let state = if i < r.input.loading {
            ModelState::Loading
        } else if i < r.input.current {
            ModelState::Loaded
        } else {
            ModelState::Cached
        };
        let mut s = status(m, state, 0);
        if i == 0 {
            s.queue_depth = r.input.queued;
            s.in_flight = r.input.in_flight;
        }
        let hb = Heartbeat {
            addr: format!("127.0.0.1:{}", 1000 + i),
            capacity: Capacity {
                memory_bytes: 64 * GIB,
                ..Capacity::default()
            },
            labels: BTreeMap::from([("region".to_string(), "r0".to_string())]),
            models: vec![s],
            seq: 0,
            draining: false,
            coordinate: None,
            ingress: None,
            usage_unsent: 0,
            peer: None,
            cached: Vec::new(),
        };
        membership.heartbeat(&format!("n{i:03}"), "h", hb, None, at);
    }
    membership
}

#[test]
fn the_coordinator_and_the_simulator_decide_the_same_at_every_step() {
    let sc = scenario();
    let scaling = ScalingConfig::default();
    let settings = DeploymentSettings::default();
    let cfg = SimConfig {
        seed: SEED,
        demand: scaling.demand_config(settings.idle_timeout_ms),
        target_utilisation: scaling.target_utilisation,
        ..SimConfig::default()
    };
    let policy = Policy {
        name: "predictive".into(),
        routing: Routing::Strategy(Strategy::LatencyAware),
        keep_alive: KeepAlivePolicy::Predictive,
    };
    let (metrics, log) = Sim::new(&sc, policy, cfg).run_recorded();
    assert_eq!(metrics.dropped, 0);

    // One scaler per model (each tick decides one model from that model's view of the
    // members), all on the simulator's clock: t0 is its time 0.
    let t0 = Instant::now();
    let at = |us: u64| t0 + Duration::from_micros(us);
    let thresholds = Thresholds {
        suspect_after: Duration::from_secs(3),
        dead_after: Duration::from_secs(6),
    };
    let infos: Vec<ModelInfo> = sc.models.iter().map(model_info).collect();
    let mut scalers: Vec<Scaler> = infos
        .iter()
        .map(|_| Scaler::starting_at(scaling.clone(), t0))
        .collect();
    let idle_timeouts: HashMap<(String, String), u64> = infos
        .iter()
        .map(|i| {
            (
                (i.name.clone(), i.version.clone()),
                i.settings.idle_timeout_ms,
            )
        })
        .collect();
    let by_model: Vec<Vec<u64>> = (0..sc.models.len() as u32)
        .map(|m| {
            sc.arrivals
                .iter()
                .filter(|a| a.model == m)
                .map(|a| a.t_us)
                .collect()
        })
        .collect();
    let mut fed = vec![0usize; sc.models.len()];

    let mut seen = [[false; 2]; 3];
    let mut changes = vec![0u32; sc.models.len()];
    let mut last_hold = vec![0u32; sc.models.len()];
    for (k, r) in log.iter().enumerate() {
        let m = r.model as usize;
        let model = &sc.models[m];
        // Every arrival the simulator had seen reaches the coordinator in a heartbeat of its
        // own, at its own instant, before this decision.
        while (fed[m] as u64) < r.arrivals {
            let t = by_model[m][fed[m]];
            fed[m] += 1;
            let s = status(model, ModelState::Loaded, fed[m] as u64);
            scalers[m].observe_heartbeat("counter", &[s], &idle_timeouts, at(t));
        }
        let now = at(r.t_us);
        let membership = members(model, r, now);
        let view = NodeView::new(&membership, now, thresholds);
        // The simulator acts on a decision at once: no heartbeat lead.
        scalers[m].tick(&infos[m..m + 1], &view, 0, now);
        let plan = scalers[m]
            .plan(&infos[m].name, &infos[m].version)
            .expect("a plan after a tick");
        let context = || {
            format!(
                "decision {k} of {}: model {} at {:.3} s (seed {SEED}), input {:?}",
                log.len(),
                model.name,
                r.t_us as f64 / 1e6,
                r.input
            )
        };
        assert_eq!(plan.info.reason, r.reason, "reason, {}", context());
        assert_eq!(
            plan.info.desired_replicas,
            r.replicas,
            "desired replicas, {}",
            context()
        );
        assert_eq!(
            plan.warm.len() as u32,
            r.hold,
            "replicas held, {}",
            context()
        );
        assert_eq!(
            plan.unload_idle,
            r.unload_idle,
            "unload idle, {}",
            context()
        );
        seen[m][usize::from(r.unload_idle)] = true;
        if r.hold != last_hold[m] {
            changes[m] += 1;
            last_hold[m] = r.hold;
        }
    }

    // The trace exercised what it is meant to: every model was decided many times, every
    // arrival was seen, the replica count moved for every model, and both unload-idle
    // answers occurred for the sporadic model.
    for (m, model) in sc.models.iter().enumerate() {
        let decisions = log.iter().filter(|r| r.model as usize == m).count();
        let peak = log
            .iter()
            .filter(|r| r.model as usize == m)
            .map(|r| r.hold)
            .max();
        println!(
            "{}: {} arrivals, {decisions} decisions, {} changes of the replicas held, peak {peak:?}",
            model.name,
            by_model[m].len(),
            changes[m]
        );
        assert!(decisions > 50, "{}: {decisions} decisions", model.name);
        assert_eq!(fed[m], by_model[m].len(), "{}: arrivals fed", model.name);
        assert!(changes[m] >= 4, "{}: {} changes", model.name, changes[m]);
    }
    assert!(
        seen[0][0] && seen[0][1],
        "the sporadic model both unloads idle replicas and keeps them"
    );
    assert!(
        log.iter().any(|r| r.model == 1 && r.hold >= 2),
        "the bursts scale out"
    );
}
