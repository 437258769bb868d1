//! Round-trip benchmark: fresh, returning (0-RTT) and warm callers of a far node, for a small
//! and a large request, with the tuned transport profile and quinn's defaults.
//!
//! Topology (as in `tests/tests/rtt.rs`): the coordinator and the calling client at the hub,
//! one node behind the user-space delay hub at RTT/2 one-way delay (its control link and its
//! serving address both delayed). Per RTT and profile: `ppocr_cls` (`single`, 110 KB request)
//! and `ppocr_det` (`single_256`, 786 KB request), each measured as
//! - fresh: a new SDK client per call (coordinator handshake not timed, node handshake timed);
//! - returning: one client, its node connections closed before each call (session ticket kept);
//! - warm: one client, calls back to back (p50);
//! - compute: the node's own compute time for the call (p50), to subtract.
//!
//! Usage: `bench-rtt [RTTS_MS] [CALLS]` (defaults `2,15,40,100` and 15). Build with
//! `cargo build --workspace --all-targets` and run `target/debug/bench-rtt`; prints a
//! markdown table (milliseconds, p50 over CALLS calls).

use skein_client::{Client, ClientConfig, ConnectionKind};
use skein_net::TransportProfile;
use skein_proto::DeploymentSettings;
use skein_tests::{case, WanMesh};
use std::time::Duration;
use tokio::time::Instant;

fn p50(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Row {
    fresh: f64,
    returning: f64,
    warm: f64,
    compute: f64,
    zero_rtt: usize,
}

async fn client(
    wan: &WanMesh,
    profile: &TransportProfile,
    zero_rtt: bool,
) -> anyhow::Result<Client> {
    Ok(Client::from_profile_with(
        &wan.mesh.profile,
        ClientConfig {
            timeout: Duration::from_secs(30),
            transport: profile.clone(),
            zero_rtt,
            ..ClientConfig::default()
        },
    )
    .await?)
}

async fn measure(
    wan: &WanMesh,
    profile: &TransportProfile,
    zero_rtt: bool,
    model: &str,
    case_name: &str,
    calls: usize,
) -> anyhow::Result<Row> {
    let c = case(model, case_name);
    let mut compute = Vec::new();
    // Fresh callers: a new client per call.
    let mut fresh = Vec::new();
    for _ in 0..calls {
        let cl = client(wan, profile, zero_rtt).await?;
        let t0 = Instant::now();
        let r = cl.infer(model, c.inputs.clone()).await?;
        fresh.push(t0.elapsed().as_secs_f64() * 1e3);
        compute.push(r.meta.compute_us as f64 / 1e3);
        cl.close();
    }
    // Returning callers: one client, node connections closed before each call.
    let cl = client(wan, profile, zero_rtt).await?;
    cl.infer(model, c.inputs.clone()).await?;
    let mut returning = Vec::new();
    let mut zero = 0;
    for _ in 0..calls {
        cl.disconnect_nodes();
        let t0 = Instant::now();
        let r = cl.infer(model, c.inputs.clone()).await?;
        returning.push(t0.elapsed().as_secs_f64() * 1e3);
        compute.push(r.meta.compute_us as f64 / 1e3);
        zero += usize::from(r.connection.kind == ConnectionKind::ZeroRtt);
        // Keep the connection long enough for the node's new session tickets to arrive.
        for _ in 0..2 {
            cl.infer(model, c.inputs.clone()).await?;
        }
    }
    // Warm: back to back on one connection.
    let mut warm = Vec::new();
    for _ in 0..3 {
        cl.infer(model, c.inputs.clone()).await?;
    }
    for _ in 0..calls {
        let t0 = Instant::now();
        let r = cl.infer(model, c.inputs.clone()).await?;
        warm.push(t0.elapsed().as_secs_f64() * 1e3);
        compute.push(r.meta.compute_us as f64 / 1e3);
    }
    cl.close();
    Ok(Row {
        fresh: p50(fresh),
        returning: p50(returning),
        warm: p50(warm),
        compute: p50(compute),
        zero_rtt: zero,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rtts: Vec<u64> = args
        .get(1)
        .map(String::as_str)
        .unwrap_or("2,15,40,100")
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let calls: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(15);
    // `BENCH_RTT_PROFILES=tuned` skips the baseline; `BENCH_RTT_WINDOW=N` (bytes) and
    // `BENCH_RTT_CONGESTION` override the tuned profile's window and controller.
    let mut tuned = TransportProfile::default();
    if let Ok(w) = std::env::var("BENCH_RTT_WINDOW") {
        tuned.initial_window = w.parse()?;
    }
    if let Ok(c) = std::env::var("BENCH_RTT_CONGESTION") {
        tuned.congestion = c.parse().map_err(anyhow::Error::msg)?;
    }
    let mut profiles = vec![
        (
            "quinn defaults, no 0-RTT",
            TransportProfile::quinn_default(),
            false,
        ),
        ("tuned", tuned, true),
    ];
    if std::env::var("BENCH_RTT_PROFILES").as_deref() == Ok("tuned") {
        profiles.remove(0);
    }
    println!("| RTT | profile | request | fresh | returning | warm p50 | compute | 0-RTT calls |");
    println!("|---|---|---|---|---|---|---|---|");
    for rtt in rtts {
        for (label, profile, zero_rtt) in &profiles {
            let (p, z) = (profile.clone(), *zero_rtt);
            let wan = WanMesh::start(&[Duration::from_millis(rtt) / 2], move |n| {
                n.transport = p.clone();
                n.zero_rtt = z;
            })
            .await?;
            for model in ["ppocr_cls", "ppocr_det"] {
                let settings = DeploymentSettings {
                    min_replicas: 1,
                    ..Default::default()
                };
                wan.mesh.deploy_with(model, settings).await?;
            }
            wan.mesh.wait_loaded("ppocr_cls", 1).await?;
            wan.mesh.wait_loaded("ppocr_det", 1).await?;
            for (model, case_name, size) in [
                ("ppocr_cls", "single", "110 KB"),
                ("ppocr_det", "single_256", "786 KB"),
            ] {
                let r = measure(&wan, profile, *zero_rtt, model, case_name, calls).await?;
                println!(
                    "| {rtt} ms | {label} | {size} | {:.1} | {:.1} | {:.1} | {:.1} | {}/{calls} |",
                    r.fresh, r.returning, r.warm, r.compute, r.zero_rtt
                );
            }
        }
    }
    Ok(())
}
