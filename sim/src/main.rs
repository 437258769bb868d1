//! `skein-sim`: simulate a scenario under several policies and print the comparison.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use skein_sim::artifact::{compare, table as artifact_table, DistributionConfig, MB};
use skein_sim::engine::{run_all, SimConfig};
use skein_sim::report::{policies, svg, table, Compare, Report};
use skein_sim::scenario::Scenario;

/// Compare Skein's routing, keep-alive and autoscaling policies on a simulated cluster.
#[derive(Debug, Parser)]
#[command(name = "skein-sim", version)]
struct Args {
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 1_000)]
    nodes: usize,
    /// Requests to generate (about).
    #[arg(long, default_value_t = 100_000)]
    requests: usize,
    /// steady, geo, geo-spike, diurnal, diurnal-spike, flash, azure, or artifact (one model to
    /// many edge sites, coordinator-only against peer-assisted; takes --nodes, --sites,
    /// --artifact-mb, --uplink-mbps, --lan-mbps, --join-spread-s, --bad-nodes-per-site, --seed,
    /// --output).
    #[arg(long, default_value = "geo-spike")]
    scenario: String,
    /// Seed of the workload and of every run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// table or json.
    #[arg(long, default_value = "table")]
    output: String,
    /// Write an SVG timeline (p99 latency and warm replicas) to this file.
    #[arg(long)]
    plot: Option<String>,
    /// routing, keepalive or all.
    #[arg(long, default_value = "all")]
    compare: String,
    /// Latency objective, ms.
    #[arg(long, default_value_t = 500.0)]
    slo_ms: f64,
    /// Runs in parallel (each run is single-threaded; results do not depend on this).
    #[arg(long)]
    jobs: Option<usize>,
    /// artifact: edge sites (nodes spread evenly over them).
    #[arg(long, default_value_t = 50)]
    sites: usize,
    /// artifact: model size, MB (10^6 bytes).
    #[arg(long, default_value_t = 500)]
    artifact_mb: u64,
    /// artifact: each site's uplink from the coordinator, Mbit/s: `LO-HI` (drawn per site) or
    /// one value.
    #[arg(long, default_value = "20-50")]
    uplink_mbps: String,
    /// artifact: each node's LAN port, Mbit/s.
    #[arg(long, default_value_t = 1000.0)]
    lan_mbps: f64,
    /// artifact: nodes start pulling at seeded times within this many seconds.
    #[arg(long, default_value_t = 30.0)]
    join_spread_s: f64,
    /// artifact: nodes per site that serve corrupt chunks.
    #[arg(long, default_value_t = 0)]
    bad_nodes_per_site: usize,
}

fn parse_range(s: &str) -> Result<(f64, f64), String> {
    let bad = || format!("--uplink-mbps `{s}`: expected LO-HI or one value, in Mbit/s");
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        ),
        None => {
            let v = s.trim().parse().map_err(|_| bad())?;
            (v, v)
        }
    };
    Ok((lo, hi))
}

/// The `artifact` scenario: both modes, the table or JSON.
fn artifact(a: &Args) -> ExitCode {
    let uplink_mbps = match parse_range(&a.uplink_mbps) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("skein-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = DistributionConfig {
        sites: a.sites,
        nodes: a.nodes,
        artifact_bytes: a.artifact_mb.saturating_mul(MB),
        uplink_mbps,
        lan_mbps: a.lan_mbps,
        join_spread_s: a.join_spread_s,
        bad_nodes_per_site: a.bad_nodes_per_site,
        seed: a.seed,
        ..DistributionConfig::default()
    };
    let c = match compare(&cfg) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skein-sim: {e}");
            return ExitCode::from(2);
        }
    };
    if a.output == "json" {
        match serde_json::to_string_pretty(&c) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("skein-sim: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print!("{}", artifact_table(&c));
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let a = Args::parse();
    let compare: Compare = match a.compare.parse() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skein-sim: {e}");
            return ExitCode::from(2);
        }
    };
    if a.output != "table" && a.output != "json" {
        eprintln!("skein-sim: --output must be table or json");
        return ExitCode::from(2);
    }
    if a.scenario == "artifact" {
        return artifact(&a);
    }
    let sc = match Scenario::build(&a.scenario, a.nodes, a.requests, a.seed) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skein-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = SimConfig {
        slo_us: (a.slo_ms.max(0.0) * 1e3) as u64,
        seed: a.seed,
        ..SimConfig::default()
    };
    let jobs = a
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let runs = run_all(&sc, &policies(compare), &cfg, jobs);
    let report = Report {
        scenario: sc.name.clone(),
        notes: sc.notes.clone(),
        nodes: sc.nodes.len(),
        models: sc.models.len(),
        requests: sc.arrivals.len(),
        seed: a.seed,
        slo_ms: a.slo_ms,
        runs,
    };
    if let Some(path) = &a.plot {
        if let Err(e) = std::fs::write(path, svg(&report)) {
            eprintln!("skein-sim: writing {path}: {e}");
            return ExitCode::from(1);
        }
    }
    if a.output == "json" {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("skein-sim: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print!("{}", table(&report));
    }
    ExitCode::SUCCESS
}
