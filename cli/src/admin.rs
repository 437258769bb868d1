//! `skein deploy`, `skein models`, `skein nodes`.

use crate::output::{json, table};
use crate::OutputFormat;
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use skein_policy::vivaldi::CoordinateExt;
use std::path::PathBuf;

/// Serving settings, shared by `deploy` and `scale`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SettingsArgs {
    /// Replicas kept warm at all times; 0 lets the model scale to zero.
    #[arg(long)]
    min_replicas: Option<u32>,
    /// Most nodes serving at once; 0 means any.
    #[arg(long)]
    max_replicas: Option<u32>,
    /// Unload a replica idle this long (keep-alive), e.g. 2s, 10m.
    #[arg(long, value_parser = crate::parse_duration)]
    idle_timeout: Option<std::time::Duration>,
    /// Requests one replica runs at once; 0 means the node's core count.
    #[arg(long)]
    max_concurrency: Option<u32>,
    /// Largest micro-batch; 1 disables batching.
    #[arg(long)]
    max_batch_size: Option<u32>,
    /// Longest a request waits for others to batch with, e.g. 2ms.
    #[arg(long, value_parser = crate::parse_duration)]
    max_queue_delay: Option<std::time::Duration>,
    /// Memory a replica needs, bytes (suffixes Ki, Mi, Gi); measured at load when omitted.
    #[arg(long, value_parser = parse_bytes)]
    memory_estimate: Option<u64>,
    /// Default request deadline, e.g. 30s.
    #[arg(long, value_parser = crate::parse_duration)]
    timeout: Option<std::time::Duration>,
    /// Allowed region (the nodes' `region` label), repeatable: the model is only held and
    /// served there, also under failover (data residency). `--region ''` allows any again.
    #[arg(long = "region")]
    regions: Vec<String>,
    /// Required device class (the nodes' `device_class` label, e.g. gpu); '' allows any.
    #[arg(long)]
    device_class: Option<String>,
    /// Let every tenant's `invoke` keys call (and list) the model, not only its owner's:
    /// `--shared true` or `--shared false`.
    #[arg(long)]
    shared: Option<bool>,
    /// Accelerator: `gpu` (only nodes running the GPU backend; CPU-only nodes never get it),
    /// `prefer-gpu` (GPU nodes while one is healthy) or `any`.
    #[arg(long)]
    accelerator: Option<skein_proto::Accelerator>,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.trim() {
        t if t.ends_with("Gi") => (&t[..t.len() - 2], 1u64 << 30),
        t if t.ends_with("Mi") => (&t[..t.len() - 2], 1 << 20),
        t if t.ends_with("Ki") => (&t[..t.len() - 2], 1 << 10),
        t => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("`{s}` is not a size like 512Mi or 1048576"))
}

impl SettingsArgs {
    pub(crate) fn patch(&self) -> skein_proto::SettingsPatch {
        skein_proto::SettingsPatch {
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            idle_timeout_ms: self.idle_timeout.map(|d| d.as_millis() as u64),
            max_concurrency: self.max_concurrency,
            max_batch_size: self.max_batch_size,
            max_queue_delay_us: self.max_queue_delay.map(|d| d.as_micros() as u64),
            memory_estimate: self.memory_estimate,
            timeout_ms: self.timeout.map(|d| d.as_millis() as u64),
            regions: (!self.regions.is_empty()).then(|| {
                self.regions
                    .iter()
                    .filter(|r| !r.is_empty())
                    .cloned()
                    .collect()
            }),
            device_class: self.device_class.clone(),
            shared: self.shared,
            accelerator: self.accelerator,
        }
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct ScaleArgs {
    /// Model name.
    name: String,
    /// Version (latest when omitted).
    #[arg(long)]
    version: Option<String>,
    #[command(flatten)]
    settings: SettingsArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
}

#[derive(Debug, clap::Args)]
pub(crate) struct DeployArgs {
    /// The ONNX file.
    file: PathBuf,
    /// Model name (1-64 of A-Z a-z 0-9 _ . -).
    #[arg(long)]
    name: String,
    /// Version; the next integer when omitted.
    #[arg(long)]
    version: Option<String>,
    #[command(flatten)]
    settings: SettingsArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ListArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
}

pub(crate) async fn deploy(args: DeployArgs, profile: &Option<PathBuf>) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let client = crate::client(profile).await?;
    let bar = if args.output == OutputFormat::Table {
        let b = ProgressBar::new(bytes.len() as u64);
        b.set_style(
            ProgressStyle::with_template(
                "uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    // The settings travel in the same request as the upload: the model is never visible with
    // other settings, not even for a moment (a region-restricted model is never placed elsewhere).
    let settings = args
        .settings
        .patch()
        .apply(&skein_proto::DeploymentSettings::default());
    let info = client
        .deploy_with(&args.name, args.version.as_deref(), &bytes, settings, |n| {
            bar.set_position(n)
        })
        .await;
    bar.finish_and_clear();
    let info = info.with_context(|| format!("deploying {}", args.file.display()))?;
    match args.output {
        OutputFormat::Json => json(&info)?,
        OutputFormat::Table => {
            println!(
                "deployed {} version {} (sha256 {}, {} bytes)",
                info.name, info.version, info.sha256, info.size
            );
            for t in &info.inputs {
                println!("  input  {:<12} {} {:?}", t.name, t.datatype, t.shape);
            }
            for t in &info.outputs {
                println!("  output {:<12} {} {:?}", t.name, t.datatype, t.shape);
            }
        }
    }
    Ok(())
}

pub(crate) async fn models(args: ListArgs, profile: &Option<PathBuf>) -> anyhow::Result<()> {
    let models = crate::client(profile).await?.models().await?;
    match args.output {
        OutputFormat::Json => json(&models),
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = models
                .iter()
                .map(|m| {
                    let queued: u32 = m.replicas.iter().map(|r| r.queue_depth).sum();
                    let last_use = m
                        .replicas
                        .iter()
                        .filter_map(|r| r.idle_ms)
                        .min()
                        .map_or("-".to_string(), |ms| format!("{:.1}s ago", ms as f64 / 1e3));
                    let max = match m.settings.max_replicas {
                        0 => "any".to_string(),
                        n => n.to_string(),
                    };
                    vec![
                        m.name.clone(),
                        m.version.clone(),
                        m.sha256[..12].to_string(),
                        m.size.to_string(),
                        m.inputs
                            .iter()
                            .map(|t| format!("{}:{}{:?}", t.name, t.datatype, t.shape))
                            .collect::<Vec<_>>()
                            .join(" "),
                        format!("{}/{max}", m.settings.min_replicas),
                        m.warm_replicas.to_string(),
                        m.loading_replicas.to_string(),
                        m.scaling
                            .as_ref()
                            .map_or("-".to_string(), |s| s.desired_replicas.to_string()),
                        m.cold_starts.to_string(),
                        queued.to_string(),
                        last_use,
                    ]
                })
                .collect();
            table(
                &[
                    "NAME",
                    "VERSION",
                    "SHA256",
                    "BYTES",
                    "INPUTS",
                    "MIN/MAX",
                    "WARM",
                    "LOADING",
                    "DESIRED",
                    "COLD_STARTS",
                    "QUEUED",
                    "LAST_USE",
                ],
                &rows,
            );
            for m in &models {
                if let Some(s) = &m.scaling {
                    println!(
                        "{}@{}: {}\n  keep-alive: {}\n  pre-warm: {}",
                        m.name, m.version, s.reason, s.keep_alive, s.prewarm
                    );
                }
            }
            Ok(())
        }
    }
}

/// Accelerators for the nodes table: the one in use starred, e.g.
/// `*NVIDIA H200 (Vulkan DiscreteGpu)`; `-` for none.
fn accelerators(list: &[skein_proto::AcceleratorInfo]) -> String {
    if list.is_empty() {
        return "-".into();
    }
    list.iter()
        .map(|a| {
            format!(
                "{}{} ({} {})",
                if a.in_use { "*" } else { "" },
                a.name,
                a.backend,
                a.device_type
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The relay a node holds a reservation on (its PeerId, shortened), `-` when none.
fn relay_of(circuits: &[String]) -> String {
    circuits
        .first()
        .and_then(|c| c.split("/p2p-circuit").next())
        .and_then(|r| r.rsplit("/p2p/").next())
        .map_or("-".to_string(), |id| {
            let tail: String = id
                .chars()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            format!("…{tail}")
        })
}

pub(crate) async fn nodes(args: ListArgs, profile: &Option<PathBuf>) -> anyhow::Result<()> {
    let nodes = crate::client(profile).await?.nodes().await?;
    match args.output {
        OutputFormat::Json => json(&nodes),
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    vec![
                        n.node_id.clone(),
                        n.addr.clone(),
                        n.ingress.clone().unwrap_or_else(|| "-".into()),
                        n.health.as_str().to_string(),
                        format!("{}ms", n.last_seen_ms),
                        n.usage_unsent.to_string(),
                        n.capacity.cores.to_string(),
                        if n.capacity.ort_version.is_empty() {
                            n.capacity.backends.join(",")
                        } else {
                            format!(
                                "{} (onnxruntime {}: {})",
                                n.capacity.backends.join(","),
                                n.capacity.ort_version,
                                n.capacity.ort_providers.join(",")
                            )
                        },
                        accelerators(&n.capacity.accelerators),
                        n.coordinate.as_ref().map_or("-".to_string(), |c| {
                            format!(
                                "{:.2}{}",
                                c.error,
                                if c.settled() { "" } else { " (settling)" }
                            )
                        }),
                        n.peer
                            .as_ref()
                            .map_or("-".to_string(), |p| p.reachability.clone()),
                        n.peer
                            .as_ref()
                            .map_or("-".to_string(), |p| relay_of(&p.relayed)),
                        n.models
                            .iter()
                            .map(|m| format!("{}@{}:{}", m.name, m.version, m.state.as_str()))
                            .collect::<Vec<_>>()
                            .join(" "),
                    ]
                })
                .collect();
            table(
                &[
                    "NODE",
                    "ADDR",
                    "INGRESS",
                    "HEALTH",
                    "LAST_SEEN",
                    "USAGE_UNSENT",
                    "CORES",
                    "BACKEND",
                    "ACCELERATORS",
                    "COORD_ERR",
                    "REACH",
                    "RELAY",
                    "MODELS",
                ],
                &rows,
            );
            Ok(())
        }
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct RouteArgs {
    /// Model name.
    model: String,
    /// Model version (latest when absent).
    #[arg(long)]
    version: Option<String>,
    /// Rank as if the caller sat where this node is (its network coordinate and labels).
    #[arg(long)]
    near: Option<String>,
    /// The caller's region label (a prior until network coordinates settle).
    #[arg(long)]
    region: Option<String>,
    /// The caller's zone label.
    #[arg(long)]
    zone: Option<String>,
    /// Bytes a request moves (inputs plus outputs), for the transfer estimate.
    #[arg(long, default_value_t = 0)]
    payload_bytes: u64,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
}

#[derive(Debug, clap::Args)]
pub(crate) struct TrafficArgs {
    /// Model name.
    model: String,
    /// New split as VERSION=WEIGHT pairs, e.g. `1=90 2=10`; none: show the current one.
    #[arg(value_parser = parse_weight)]
    weights: Vec<skein_proto::VersionWeight>,
    /// Remove the split: calls that name no version go to the latest version again.
    #[arg(long, conflicts_with = "weights")]
    clear: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
}

fn parse_weight(s: &str) -> Result<skein_proto::VersionWeight, String> {
    let (v, w) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not VERSION=WEIGHT (e.g. 2=10)"))?;
    let weight = w
        .trim()
        .parse::<u32>()
        .map_err(|_| format!("`{w}` in `{s}` is not a whole number"))?;
    Ok(skein_proto::VersionWeight {
        version: v.trim().to_string(),
        weight,
    })
}

pub(crate) async fn traffic(args: TrafficArgs, profile: &Option<PathBuf>) -> anyhow::Result<()> {
    let client = crate::client(profile).await?;
    let split = if args.clear || !args.weights.is_empty() {
        client
            .set_traffic(&args.model, args.weights.clone())
            .await
            .with_context(|| format!("setting the traffic split of `{}`", args.model))?
    } else {
        client.traffic(&args.model).await?
    };
    if args.output == OutputFormat::Json {
        return json(&split);
    }
    if split.is_empty() {
        println!(
            "{}: no split; calls that name no version go to the latest version",
            args.model
        );
        return Ok(());
    }
    let total: u64 = split
        .iter()
        .map(|w| u64::from(w.weight))
        .sum::<u64>()
        .max(1);
    let rows: Vec<Vec<String>> = split
        .iter()
        .map(|w| {
            vec![
                w.version.clone(),
                w.weight.to_string(),
                format!("{:.1} %", 100.0 * f64::from(w.weight) / total as f64),
            ]
        })
        .collect();
    table(&["VERSION", "WEIGHT", "SHARE"], &rows);
    Ok(())
}

fn ms(us: f64) -> String {
    if us >= f64::MAX / 2.0 {
        "inf".into()
    } else {
        format!("{:.2}", us / 1000.0)
    }
}

/// The position `skein route` ranks from: the CLI's own, with `--near`, `--region` and
/// `--zone` put in.
fn route_position(
    args: &RouteArgs,
    mut position: skein_proto::CallerPosition,
) -> skein_proto::CallerPosition {
    position.near = args.near.clone();
    position.region = args.region.clone().or(position.region);
    position.zone = args.zone.clone().or(position.zone);
    position
}

pub(crate) async fn route(args: RouteArgs, profile: &Option<PathBuf>) -> anyhow::Result<()> {
    use skein_policy::routing::{band_limit, P2C_BAND_RATIO, P2C_BAND_US};
    let client = crate::client(profile).await?;
    let position = route_position(&args, client.position());
    let r = client
        .explain_route(
            &args.model,
            args.version.as_deref(),
            position,
            args.payload_bytes,
        )
        .await
        .with_context(|| format!("ranking nodes for `{}`", args.model))?;
    if args.output == OutputFormat::Json {
        return json(&r);
    }
    let mut cands = r.candidates.clone();
    cands.sort_by(|a, b| a.expected_us.total_cmp(&b.expected_us));
    let rows: Vec<Vec<String>> = cands
        .iter()
        .enumerate()
        .map(|(i, c)| {
            vec![
                (i + 1).to_string(),
                c.node_id.clone(),
                c.addr.clone(),
                if c.loaded { "warm" } else { "cold" }.to_string(),
                ms(c.expected_us),
                format!("{} ({})", ms(c.parts.rtt_us), c.rtt_source),
                ms(c.parts.queue_us),
                ms(c.parts.service_us),
                ms(c.parts.cold_us),
                ms(c.parts.transfer_us),
                ms(c.parts.relay_us),
            ]
        })
        .collect();
    println!(
        "{} version {}: expected completion (ms) = rtt + queue + service + cold + transfer + relay",
        r.model, r.version
    );
    table(
        &[
            "RANK", "NODE", "ADDR", "STATE", "EXPECTED", "RTT", "QUEUE", "SERVICE", "COLD",
            "TRANSFER", "RELAY",
        ],
        &rows,
    );
    if let Some(best) = cands.first() {
        let band = band_limit(best.expected_us, best.parts.cold_us);
        let near_best: Vec<&str> = cands
            .iter()
            .filter(|c| c.expected_us <= band)
            .map(|c| c.node_id.as_str())
            .collect();
        println!(
            "Each call takes the better of two random picks among the nodes within {:.0} % (of the warm part) or {:.1} ms of the best ({}): {}.",
            (P2C_BAND_RATIO - 1.0) * 100.0,
            P2C_BAND_US / 1000.0,
            ms(band),
            near_best.join(", ")
        );
        println!("Callers re-score these between resolves with their own latency and load observations; nodes that fail are avoided for a while.");
    }
    if !r.dead.is_empty() {
        println!("Dead (not routed to): {}", r.dead.join(", "));
    }
    Ok(())
}

pub(crate) async fn scale(args: ScaleArgs, profile: &Option<PathBuf>) -> anyhow::Result<()> {
    let client = crate::client(profile).await?;
    let info = client
        .scale(&args.name, args.version.as_deref(), args.settings.patch())
        .await
        .with_context(|| format!("scaling `{}`", args.name))?;
    match args.output {
        OutputFormat::Json => json(&info),
        OutputFormat::Table => {
            println!(
                "{} version {}: {:?}",
                info.name, info.version, info.settings
            );
            println!(
                "  warm {}  loading {}  cold starts {}",
                info.warm_replicas, info.loading_replicas, info.cold_starts
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Route {
        #[command(flatten)]
        args: RouteArgs,
    }

    #[test]
    fn route_flags_reach_the_position() {
        let r = Route::parse_from([
            "route",
            "m",
            "--near",
            "n1",
            "--region",
            "eu-west",
            "--zone",
            "eu-west-1b",
        ]);
        let p = route_position(&r.args, skein_proto::CallerPosition::default());
        assert_eq!(p.near.as_deref(), Some("n1"));
        assert_eq!(p.region.as_deref(), Some("eu-west"));
        assert_eq!(p.zone.as_deref(), Some("eu-west-1b"));
        // Without the flags, the client's own labels stay.
        let r = Route::parse_from(["route", "m"]);
        let own = skein_proto::CallerPosition {
            region: Some("us".into()),
            zone: Some("us-1".into()),
            ..Default::default()
        };
        let p = route_position(&r.args, own.clone());
        assert_eq!(p, own);
    }

    #[test]
    fn every_settings_flag_reaches_the_patch() {
        #[derive(Debug, Parser)]
        struct Settings {
            #[command(flatten)]
            s: SettingsArgs,
        }
        let a = Settings::parse_from([
            "x",
            "--min-replicas",
            "1",
            "--max-replicas",
            "3",
            "--idle-timeout",
            "2s",
            "--max-concurrency",
            "4",
            "--max-batch-size",
            "8",
            "--max-queue-delay",
            "2ms",
            "--memory-estimate",
            "64Mi",
            "--timeout",
            "5s",
            "--region",
            "eu",
            "--region",
            "us",
            "--device-class",
            "gpu",
            "--shared",
            "true",
            "--accelerator",
            "prefer-gpu",
        ]);
        let p = a.s.patch();
        let expected = skein_proto::SettingsPatch {
            min_replicas: Some(1),
            max_replicas: Some(3),
            idle_timeout_ms: Some(2000),
            max_concurrency: Some(4),
            max_batch_size: Some(8),
            max_queue_delay_us: Some(2000),
            memory_estimate: Some(64 << 20),
            timeout_ms: Some(5000),
            regions: Some(vec!["eu".into(), "us".into()]),
            device_class: Some("gpu".into()),
            shared: Some(true),
            accelerator: Some(skein_proto::Accelerator::PreferGpu),
        };
        assert_eq!(p, expected);
        // Every field of the patch is set above: a new setting without a flag fails here.
        let v = serde_json::to_value(&p).unwrap();
        assert!(
            v.as_object().unwrap().values().all(|f| !f.is_null()),
            "a setting has no flag: {v}"
        );
        // `--region ''` allows any region again; no flag changes nothing.
        let a = Settings::parse_from(["x", "--region", ""]);
        assert_eq!(a.s.patch().regions, Some(vec![]));
        let a = Settings::parse_from(["x"]);
        assert_eq!(a.s.patch(), skein_proto::SettingsPatch::default());
    }
}
