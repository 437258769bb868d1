//! Routing benchmark: latency-aware vs round-robin vs least-loaded, same load, same mesh, one run.
//!
//! Topology (as in `tests/tests/routing.rs`): the coordinator and the calling client at the hub,
//! three nodes at 2 ms, 15 ms and 40 ms one-way delay through the user-space delay hub. Each
//! strategy gets its own SDK client and the same open-loop load: requests arrive at a fixed rate
//! (not back to back, so a slow strategy cannot lower its own load), each on its own task.
//!
//! Usage: `bench-routing [RATE_PER_S] [SECONDS] [ROUNDS]` (defaults 100, 10, 1). Build with
//! `cargo build --workspace --all-targets` and run `target/debug/bench-routing`, or use
//! `scripts/bench-routing`.

use skein_client::{Client, ClientConfig, Strategy};
use skein_proto::DeploymentSettings;
use skein_tests::{case, WanMesh};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Requests in flight at most per strategy run (beyond: counted as shed).
const MAX_IN_FLIGHT: usize = 512;

struct Run {
    strategy: Strategy,
    latencies_us: Vec<u64>,
    errors: u64,
    shed: u64,
    by_node: BTreeMap<usize, u64>,
    elapsed: Duration,
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn run(
    wan: &WanMesh,
    strategy: Strategy,
    rate: f64,
    secs: f64,
    inputs: &[skein_proto::Tensor],
) -> anyhow::Result<Run> {
    let client = Client::connect_with(
        &wan.mesh.profile.coordinator,
        wan.mesh.profile.credentials(),
        ClientConfig {
            routing: strategy,
            timeout: Duration::from_secs(20),
            ..ClientConfig::default()
        },
    )
    .await?;
    // Warm the client's connections and samples (not measured).
    for _ in 0..20 {
        client.infer("ppocr_cls", inputs.to_vec()).await?;
    }
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let n = (rate * secs).round() as u64;
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut shed = 0;
    for i in 0..n {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shed += 1;
            continue;
        };
        let (client, inputs) = (client.clone(), inputs.to_vec());
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = client.infer("ppocr_cls", inputs).await;
            drop(permit);
            (t0.elapsed(), r.map(|r| r.meta.node))
        }));
    }
    let mut out = Run {
        strategy,
        latencies_us: Vec::new(),
        errors: 0,
        shed,
        by_node: BTreeMap::new(),
        elapsed: Duration::ZERO,
    };
    for t in tasks {
        let (lat, r) = t.await?;
        match r {
            Ok(node) => {
                out.latencies_us.push(lat.as_micros() as u64);
                *out.by_node
                    .entry(wan.index(&node).unwrap_or(99))
                    .or_default() += 1;
            }
            Err(e) => {
                out.errors += 1;
                eprintln!("{strategy}: {e}");
            }
        }
    }
    out.elapsed = start.elapsed();
    out.latencies_us.sort_unstable();
    client.close();
    Ok(out)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: f64| -> anyhow::Result<f64> {
        args.get(i).map_or(Ok(d), |s| {
            s.parse()
                .map_err(|_| anyhow::anyhow!("argument {i} `{s}` is not a number"))
        })
    };
    let (rate, secs, rounds) = (arg(1, 100.0)?, arg(2, 10.0)?, arg(3, 1.0)? as usize);
    anyhow::ensure!(
        rate > 0.0 && rate <= 5_000.0,
        "rate must be in (0, 5000] per second"
    );
    anyhow::ensure!(
        secs > 0.0 && secs <= 3_600.0,
        "seconds must be in (0, 3600]"
    );
    let delays_ms = [2u64, 15, 40];
    let delays: Vec<Duration> = delays_ms
        .iter()
        .map(|&d| Duration::from_millis(d))
        .collect();
    eprintln!("starting a mesh: nodes at {delays_ms:?} ms one-way through the delay hub");
    let wan = WanMesh::start(&delays, |_| {}).await?;
    wan.mesh
        .deploy_with(
            "ppocr_cls",
            DeploymentSettings {
                min_replicas: 3,
                ..Default::default()
            },
        )
        .await?;
    wan.mesh.wait_loaded("ppocr_cls", 3).await?;
    wan.wait_coordinates_settled().await?;
    let inputs = case("ppocr_cls", "single").inputs;
    let strategies = [
        Strategy::LatencyAware,
        Strategy::RoundRobin,
        Strategy::LeastLoaded,
    ];
    let mut runs: Vec<Run> = Vec::new();
    for round in 0..rounds.max(1) {
        for s in strategies {
            eprintln!("round {}: {s}, {rate}/s for {secs} s", round + 1);
            runs.push(run(&wan, s, rate, secs, &inputs).await?);
        }
    }
    println!(
        "ppocr_cls, open loop {rate} req/s for {secs} s per run, nodes at {delays_ms:?} ms one-way"
    );
    println!(
        "| strategy | requests | errors | shed | p50 ms | p99 ms | mean ms | calls to 2 / 15 / 40 ms nodes |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut p99: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for r in &runs {
        let n = r.latencies_us.len() as u64;
        let mean = r
            .latencies_us
            .iter()
            .sum::<u64>()
            .checked_div(n)
            .unwrap_or(0);
        let share = |i| r.by_node.get(&i).copied().unwrap_or(0);
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {} / {} / {} |",
            r.strategy,
            n,
            r.errors,
            r.shed,
            pct(&r.latencies_us, 0.5) as f64 / 1000.0,
            pct(&r.latencies_us, 0.99) as f64 / 1000.0,
            mean as f64 / 1000.0,
            share(0),
            share(1),
            share(2)
        );
        p99.entry(r.strategy.as_str())
            .or_default()
            .push(pct(&r.latencies_us, 0.99));
        let _ = r.elapsed;
    }
    let median = |v: &Vec<u64>| {
        let mut v = v.clone();
        v.sort_unstable();
        v[v.len() / 2] as f64
    };
    let la = median(&p99["latency"]);
    for other in ["least-loaded", "round-robin"] {
        let o = median(&p99[other]);
        println!(
            "p99 latency-aware / {other}: {:.2} ({:.0} % lower)",
            la / o,
            (1.0 - la / o) * 100.0
        );
    }
    Ok(())
}
