//! `skein bench`: latency and throughput through the mesh and, in the same run, in-process.
// Both halves measure wall-clock time, the in-process one on OS threads outside tokio.
#![allow(clippy::disallowed_types)]

use crate::output::json;
use crate::OutputFormat;
use anyhow::Context;
use serde::Serialize;
use skein_proto::Tensor;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// Model name.
    model: String,
    /// Model version (latest when omitted).
    #[arg(long)]
    version: Option<String>,
    /// Inputs, as for `skein infer`.
    #[arg(long = "input", short = 'i', required = true)]
    inputs: Vec<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// How long each half (mesh, in-process) runs, e.g. 10s.
    #[arg(long, value_parser = crate::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Load at `--concurrency` before measuring; then up to 30 s more while the autoscaler
    /// places the replicas that load asks for.
    #[arg(long, value_parser = crate::parse_duration, default_value = "3s")]
    warmup: Duration,
    /// Also measure through the KServe V2 HTTP gateway at this address (e.g. 127.0.0.1:8080),
    /// with JSON tensors and with the binary tensor extension, in the same run.
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// Skip the in-process half.
    #[arg(long)]
    no_inprocess: bool,
    /// A new SDK client per call (its coordinator connection set up untimed): measures fresh
    /// callers, each waiting for a handshake with the node.
    #[arg(long)]
    fresh: bool,
    /// Instead of steady load: measure N cold starts (scale to zero, artifact in the node's disk
    /// cache, then one call) against N in-process loads + optimisations + first inferences.
    /// The steady-load flags do not apply to it, and are refused with it.
    #[arg(
        long,
        default_value_t = 0,
        conflicts_with_all = ["concurrency", "duration", "warmup", "http", "no_inprocess", "fresh"]
    )]
    cold_starts: u32,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    version: String,
    concurrency: usize,
    duration_s: f64,
    requests: usize,
    errors: usize,
    p50_us: u64,
    p99_us: u64,
    throughput_rps: f64,
    /// Median model time on the node (plan + run), as the node reports it per answer.
    node_compute_p50_us: u64,
    /// Median wait on the node for an execution slot.
    node_queue_p50_us: u64,
    /// A new client per call (`--fresh`).
    fresh: bool,
    /// Calls on a connection ready before they started.
    reused: usize,
    /// Calls that waited for a full handshake.
    fresh_handshakes: usize,
    /// Calls sent with 0-RTT.
    zero_rtt: usize,
    /// Median smoothed RTT of the node connections, µs.
    rtt_p50_us: u64,
    inprocess_p50_us: Option<u64>,
    inprocess_p99_us: Option<u64>,
    inprocess_throughput_rps: Option<f64>,
    /// Mesh p50 minus in-process p50.
    overhead_p50_us: Option<i64>,
    /// Mesh p50 / in-process p50.
    p50_ratio: Option<f64>,
    /// Mesh throughput / in-process throughput.
    throughput_ratio: Option<f64>,
    /// Through the HTTP gateway, JSON tensors (with `--http`).
    http_json: Option<HttpFigures>,
    /// Through the HTTP gateway, binary tensor extension (with `--http`).
    http_binary: Option<HttpFigures>,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct HttpFigures {
    requests: usize,
    errors: usize,
    p50_us: u64,
    p99_us: u64,
    throughput_rps: f64,
    /// Throughput / in-process throughput.
    throughput_ratio: Option<f64>,
}

/// `concurrency` keep-alive connections posting `body` back to back for `duration`.
async fn http_half(
    addr: std::net::SocketAddr,
    key: Option<String>,
    path: String,
    body: Vec<u8>,
    header_len: Option<usize>,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<(Vec<u64>, usize, f64)> {
    let body = std::sync::Arc::new(body);
    let hl = header_len.map(|n| n.to_string());
    // Warm-up, and a clear error if the gateway is not there.
    let new_client = move |key: &Option<String>| {
        let c = skein_gateway::http_client::HttpClient::new(addr);
        match key {
            Some(k) => c.with_bearer(k),
            None => c,
        }
    };
    let mut probe = new_client(&key);
    let headers: Vec<(&str, &str)> = hl
        .as_deref()
        .map(|h| vec![("Inference-Header-Content-Length", h)])
        .unwrap_or_default();
    let r = probe
        .post(&path, &headers, &body)
        .await
        .with_context(|| format!("HTTP gateway at {addr}"))?;
    anyhow::ensure!(
        r.status == 200,
        "HTTP gateway answered {}: {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let deadline = Instant::now() + duration;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (body, path, hl, key) = (body.clone(), path.clone(), hl.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut http = new_client(&key);
            let headers: Vec<(&str, &str)> = hl
                .as_deref()
                .map(|h| vec![("Inference-Header-Content-Length", h)])
                .unwrap_or_default();
            let mut lat = Vec::new();
            let mut errors = 0usize;
            while Instant::now() < deadline {
                let s = Instant::now();
                match http.post(&path, &headers, &body).await {
                    Ok(r) if r.status == 200 => lat.push(s.elapsed().as_micros() as u64),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    Ok((lat, errors, elapsed))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Longest the warm-up waits, past `--warmup`, for the autoscaler's replicas.
const MAX_SETTLE: Duration = Duration::from_secs(30);

/// One answered call as `drive` records it: node compute and queue µs, how the connection
/// was reached, its RTT.
type Served = (u64, u64, skein_client::ConnectionKind, Duration);

/// `concurrency` tasks calling `model` back to back until `until`: latencies (µs), what each
/// answer reported, and the number of failed calls. With `fresh`, every call gets a new
/// client made from that profile (set up before the call's clock starts).
async fn drive(
    client: &skein_client::Client,
    model: &str,
    inputs: &[Tensor],
    opts: &skein_client::InferOptions,
    concurrency: usize,
    until: Instant,
    fresh: Option<&Option<PathBuf>>,
) -> (Vec<u64>, Vec<Served>, usize) {
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (c, i, o) = (client.clone(), inputs.to_vec(), opts.clone());
        let model = model.to_string();
        let fresh = fresh.cloned();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut node = Vec::new();
            let mut errors = 0usize;
            while Instant::now() < until {
                let c = match &fresh {
                    Some(profile) => match crate::client(profile).await {
                        Ok(c) => c,
                        Err(_) => {
                            errors += 1;
                            continue;
                        }
                    },
                    None => c.clone(),
                };
                let s = Instant::now();
                match c.infer_with(&model, i.clone(), o.clone()).await {
                    Ok(r) => {
                        lat.push(s.elapsed().as_micros() as u64);
                        node.push((
                            r.meta.compute_us,
                            r.meta.queue_us,
                            r.connection.kind,
                            r.connection.rtt,
                        ));
                    }
                    Err(_) => errors += 1,
                }
                if fresh.is_some() {
                    c.close();
                }
            }
            (lat, node, errors)
        }));
    }
    let (mut lat, mut node, mut errors) = (Vec::new(), Vec::new(), 0);
    for t in tasks {
        match t.await {
            Ok((l, n, e)) => {
                lat.extend(l);
                node.extend(n);
                errors += e;
            }
            Err(_) => errors += 1,
        }
    }
    (lat, node, errors)
}

pub(crate) async fn run(args: BenchArgs, profile: &Option<PathBuf>) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=1024).contains(&args.concurrency),
        "--concurrency must be 1..=1024"
    );
    let inputs: Vec<Tensor> = args
        .inputs
        .iter()
        .map(|a| crate::infer::parse_input(a))
        .collect::<anyhow::Result<_>>()?;
    let client = crate::client(profile).await?;
    if args.cold_starts > 0 {
        return cold_starts(&args, &client, inputs).await;
    }
    let opts = skein_client::InferOptions {
        version: args.version.clone(),
        ..Default::default()
    };
    // Warm up: load the model and build the plan for this shape on every candidate.
    let first = client
        .infer_with(&args.model, inputs.clone(), opts.clone())
        .await
        .context("warm-up request")?;
    for _ in 0..8 {
        client
            .infer_with(&args.model, inputs.clone(), opts.clone())
            .await?;
    }

    // Warm-up at the measured concurrency, until the autoscaler has placed the replicas this
    // load asks for (bounded), so that the measurement sees the steady state and not the
    // first seconds on a single replica.
    let settle_until = Instant::now() + args.warmup + MAX_SETTLE;
    let mut warm_until = Instant::now() + args.warmup;
    loop {
        drive(
            &client,
            &args.model,
            &inputs,
            &opts,
            args.concurrency,
            warm_until,
            None,
        )
        .await;
        let settled = model_info(&client, &first.model, &first.version)
            .await?
            .is_none_or(|m| {
                let desired = m.scaling.as_ref().map_or(1, |s| s.desired_replicas);
                m.warm_replicas >= desired.max(1)
            });
        if settled || Instant::now() >= settle_until {
            break;
        }
        warm_until = Instant::now() + Duration::from_secs(1);
    }
    // Fresh candidates (the cached route may predate the replicas just placed).
    client.resolve(&args.model, args.version.as_deref()).await?;

    let t0 = Instant::now();
    let (mut lat, node, errors) = drive(
        &client,
        &args.model,
        &inputs,
        &opts,
        args.concurrency,
        t0 + args.duration,
        args.fresh.then_some(profile),
    )
    .await;
    let mut compute: Vec<u64> = node.iter().map(|x| x.0).collect();
    let mut queue: Vec<u64> = node.iter().map(|x| x.1).collect();
    let mut rtts: Vec<u64> = node.iter().map(|x| x.3.as_micros() as u64).collect();
    rtts.sort_unstable();
    let count = |k: skein_client::ConnectionKind| node.iter().filter(|x| x.2 == k).count();
    let elapsed = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    compute.sort_unstable();
    queue.sort_unstable();

    let mut inproc: Option<(u64, u64, f64)> = None;
    if !args.no_inprocess {
        let info = model_info(&client, &first.model, &first.version)
            .await?
            .context("the model vanished from the registry")?;
        let bytes = client.fetch_artifact(&info.sha256).await?;
        let (conc, dur, inputs) = (args.concurrency, args.duration, inputs.clone());
        inproc = Some(
            tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, u64, f64)> {
                let model =
                    skein_onnx::LoadedModel::load(&bytes, skein_onnx::PlanCacheConfig::default())?;
                for _ in 0..8 {
                    model.run(inputs.clone())?;
                }
                let deadline = Instant::now() + dur;
                let t0 = Instant::now();
                let mut all: Vec<u64> = std::thread::scope(|s| {
                    let hs: Vec<_> = (0..conc)
                        .map(|_| {
                            s.spawn(|| {
                                let mut lat = Vec::new();
                                while Instant::now() < deadline {
                                    let st = Instant::now();
                                    if model.run(inputs.clone()).is_ok() {
                                        lat.push(st.elapsed().as_micros() as u64);
                                    }
                                }
                                lat
                            })
                        })
                        .collect();
                    hs.into_iter()
                        .flat_map(|h| h.join().unwrap_or_default())
                        .collect()
                });
                let el = t0.elapsed().as_secs_f64();
                all.sort_unstable();
                Ok((
                    percentile(&all, 0.5),
                    percentile(&all, 0.99),
                    all.len() as f64 / el,
                ))
            })
            .await??,
        );
    }

    let mut http_figures = [None, None];
    if let Some(addr) = args.http {
        let path = match &args.version {
            Some(v) => format!("/v2/models/{}/versions/{v}/infer", args.model),
            None => format!("/v2/models/{}/infer", args.model),
        };
        for (slot, binary) in http_figures.iter_mut().zip([false, true]) {
            let (body, hl) = skein_gateway::codec::encode_request(&inputs, binary)?;
            let (lat, errors, el) = http_half(
                addr,
                client.api_key().map(|k| k.as_str().to_string()),
                path.clone(),
                body,
                hl,
                args.concurrency,
                args.duration,
            )
            .await?;
            let rps = lat.len() as f64 / el;
            *slot = Some(HttpFigures {
                requests: lat.len(),
                errors,
                p50_us: percentile(&lat, 0.5),
                p99_us: percentile(&lat, 0.99),
                throughput_rps: rps,
                throughput_ratio: inproc.map(|x| rps / x.2.max(1e-9)),
            });
        }
    }

    let p50 = percentile(&lat, 0.5);
    let rps = lat.len() as f64 / elapsed;
    let report = Report {
        model: first.model,
        version: first.version,
        concurrency: args.concurrency,
        duration_s: elapsed,
        requests: lat.len(),
        errors,
        p50_us: p50,
        p99_us: percentile(&lat, 0.99),
        throughput_rps: rps,
        node_compute_p50_us: percentile(&compute, 0.5),
        node_queue_p50_us: percentile(&queue, 0.5),
        fresh: args.fresh,
        reused: count(skein_client::ConnectionKind::Reused),
        fresh_handshakes: count(skein_client::ConnectionKind::Fresh),
        zero_rtt: count(skein_client::ConnectionKind::ZeroRtt),
        rtt_p50_us: percentile(&rtts, 0.5),
        inprocess_p50_us: inproc.map(|x| x.0),
        inprocess_p99_us: inproc.map(|x| x.1),
        inprocess_throughput_rps: inproc.map(|x| x.2),
        overhead_p50_us: inproc.map(|x| p50 as i64 - x.0 as i64),
        p50_ratio: inproc.map(|x| p50 as f64 / x.0.max(1) as f64),
        throughput_ratio: inproc.map(|x| rps / x.2.max(1e-9)),
        http_json: http_figures[0],
        http_binary: http_figures[1],
    };
    match args.output {
        OutputFormat::Json => json(&report)?,
        OutputFormat::Table => {
            println!(
                "{} v{} concurrency {} for {:.1}s",
                report.model, report.version, report.concurrency, report.duration_s
            );
            println!(
                "  mesh:       p50 {:>7} µs  p99 {:>7} µs  {:>8.1} req/s  ({} requests, {} errors)",
                report.p50_us, report.p99_us, report.throughput_rps, report.requests, report.errors
            );
            println!(
                "              node compute p50 {} µs, node queue p50 {} µs",
                report.node_compute_p50_us, report.node_queue_p50_us
            );
            println!(
                "              connections: {} reused, {} fresh handshakes, {} 0-RTT{}; rtt p50 {:.1} ms",
                report.reused,
                report.fresh_handshakes,
                report.zero_rtt,
                if report.fresh { " (a new client per call)" } else { "" },
                report.rtt_p50_us as f64 / 1e3
            );
            if let Some((p50i, p99i, rpsi)) = inproc {
                println!("  in-process: p50 {p50i:>7} µs  p99 {p99i:>7} µs  {rpsi:>8.1} req/s");
                println!(
                    "  mesh overhead at p50: {} µs (ratio {:.2}); throughput ratio {:.2}",
                    report.overhead_p50_us.unwrap_or_default(),
                    report.p50_ratio.unwrap_or_default(),
                    report.throughput_ratio.unwrap_or_default()
                );
            }
            for (label, f) in [
                ("HTTP JSON:  ", report.http_json),
                ("HTTP binary:", report.http_binary),
            ] {
                if let Some(f) = f {
                    println!(
                        "  {label} p50 {:>7} µs  p99 {:>7} µs  {:>8.1} req/s  ({} requests, {} errors; throughput ratio {:.2})",
                        f.p50_us, f.p99_us, f.throughput_rps, f.requests, f.errors,
                        f.throughput_ratio.unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct ColdReport {
    model: String,
    version: String,
    cold_starts: u32,
    /// Median latency of a call that found no warm replica (artifact cached on disk), µs.
    cold_p50_us: u64,
    /// Median in-process load + optimise + first inference, µs.
    inprocess_cold_p50_us: u64,
    /// cold_p50_us / inprocess_cold_p50_us (goal ≤ 1.25).
    cold_ratio: f64,
    /// Every cold call reported `cold_start: true`.
    all_marked_cold: bool,
}

/// The registry's view of `model` at `version`, if it is there.
async fn model_info(
    client: &skein_client::Client,
    model: &str,
    version: &str,
) -> anyhow::Result<Option<skein_proto::ModelInfo>> {
    Ok(client
        .models()
        .await?
        .into_iter()
        .find(|m| m.name == model && m.version == version))
}

async fn warm_replicas(
    client: &skein_client::Client,
    model: &str,
    version: &str,
) -> anyhow::Result<u32> {
    Ok(model_info(client, model, version)
        .await?
        .map_or(0, |m| m.warm_replicas + m.loading_replicas))
}

async fn cold_starts(
    args: &BenchArgs,
    client: &skein_client::Client,
    inputs: Vec<Tensor>,
) -> anyhow::Result<()> {
    let opts = skein_client::InferOptions {
        version: args.version.clone(),
        ..Default::default()
    };
    // Once warm, so that every node has the artifact on disk and the shape remembered.
    let first = client
        .infer_with(&args.model, inputs.clone(), opts.clone())
        .await?;
    let (model, version) = (first.model.clone(), first.version.clone());
    let info = model_info(client, &model, &version)
        .await?
        .context("the model vanished from the registry")?;
    let before = info.settings.clone();
    let zero = skein_proto::SettingsPatch {
        min_replicas: Some(0),
        idle_timeout_ms: Some(50),
        ..Default::default()
    };
    client.scale(&model, Some(&version), zero).await?;
    let mut cold = Vec::new();
    let mut all_cold = true;
    let result: anyhow::Result<()> = async {
        for _ in 0..args.cold_starts {
            let until = tokio::time::Instant::now() + Duration::from_secs(60);
            while warm_replicas(client, &model, &version).await? > 0 {
                anyhow::ensure!(
                    tokio::time::Instant::now() < until,
                    "replicas did not scale to zero in 60 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let t0 = tokio::time::Instant::now();
            let r = client
                .infer_with(&model, inputs.clone(), opts.clone())
                .await?;
            cold.push(t0.elapsed().as_micros() as u64);
            all_cold &= r.meta.cold_start;
            // Let the coordinator see this replica warm before waiting for it to idle out
            // (heartbeats lag a little), so the next call really finds none.
            while warm_replicas(client, &model, &version).await? == 0 {
                anyhow::ensure!(
                    tokio::time::Instant::now() < until,
                    "the replica never showed as warm"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }
    .await;
    // Put the settings back whatever happened.
    let restore = skein_proto::SettingsPatch {
        min_replicas: Some(before.min_replicas),
        idle_timeout_ms: Some(before.idle_timeout_ms),
        ..Default::default()
    };
    client.scale(&model, Some(&version), restore).await?;
    result?;
    let bytes = client.fetch_artifact(&info.sha256).await?;
    let n = args.cold_starts;
    let mut inproc = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u64>> {
        let mut out = Vec::new();
        for _ in 0..n {
            let t0 = Instant::now();
            let m = skein_onnx::LoadedModel::load(&bytes, skein_onnx::PlanCacheConfig::default())?;
            m.run(inputs.clone())?;
            out.push(t0.elapsed().as_micros() as u64);
        }
        Ok(out)
    })
    .await??;
    cold.sort_unstable();
    inproc.sort_unstable();
    let (c, i) = (percentile(&cold, 0.5), percentile(&inproc, 0.5));
    let report = ColdReport {
        model,
        version,
        cold_starts: n,
        cold_p50_us: c,
        inprocess_cold_p50_us: i,
        cold_ratio: c as f64 / i.max(1) as f64,
        all_marked_cold: all_cold,
    };
    match args.output {
        OutputFormat::Json => json(&report)?,
        OutputFormat::Table => println!(
            "{} v{}: cold start p50 {} µs through the mesh vs {} µs in-process load+optimise+run (ratio {:.2}, {} runs)",
            report.model, report.version, report.cold_p50_us, report.inprocess_cold_p50_us, report.cold_ratio, n
        ),
    }
    Ok(())
}
