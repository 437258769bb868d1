//! `skein`: the Skein CLI.
//!
//! # Layout
//! - `main.rs`: flags (clap) and dispatch.
//! - [`up`]: `skein up`, an embedded coordinator + local nodes + bundled models.
//! - [`admin`]: `deploy`, `scale`, `models`, `nodes`, `route`, `traffic`.
//! - [`infer`]: `skein infer`, inputs from `.npy` files or literals, outputs as JSON/table/.npy.
//! - [`bench`]: `skein bench`, mesh vs in-process latency and throughput.
//! - [`security`]: `keys`, `tenants`, `usage`, `audit`, `join-token`, `revoke-node`,
//!   `rotate-ticket-key`, `whoami`.
//! - [`output`]: tables and JSON.

mod admin;
mod bench;
mod infer;
mod output;
mod security;
mod up;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Serverless inference on a mesh you own.
#[derive(Debug, Parser)]
#[command(name = "skein", version, about)]
struct Cli {
    /// Client profile (coordinator address and credentials). Default: SKEIN_PROFILE, else
    /// $XDG_CONFIG_HOME/skein/profile.toml, else ~/.config/skein/profile.toml.
    #[arg(long, global = true, env = "SKEIN_PROFILE")]
    profile: Option<PathBuf>,
    /// Log filter, e.g. `info` or `skein_node=debug`.
    #[arg(long, global = true, env = "SKEIN_LOG", default_value = "warn")]
    log: String,
    /// Log lines as text or JSON (one object per line, for log collectors).
    #[arg(
        long,
        global = true,
        env = "SKEIN_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: skein_node::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How to print data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    /// Human-readable table.
    Table,
    /// JSON.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start an embedded coordinator and local nodes, deploy the bundled models, and print how to
    /// call them. Ctrl-C stops everything.
    Up(up::UpArgs),
    /// Run a coordinator (the control plane) for multi-process or multi-host meshes.
    Coordinator(CoordinatorArgs),
    /// Upload an ONNX model to the mesh, with its serving settings.
    Deploy(admin::DeployArgs),
    /// Change the serving settings of a live deployment (replicas, keep-alive, batching...).
    Scale(admin::ScaleArgs),
    /// List deployed models.
    Models(admin::ListArgs),
    /// List nodes and their health.
    Nodes(admin::ListArgs),
    /// Explain how the coordinator ranks the nodes for a model, from a given position.
    Route(admin::RouteArgs),
    /// Show or set how calls that name no version are split over a model's versions.
    Traffic(admin::TrafficArgs),
    /// Run a model once.
    Infer(infer::InferArgs),
    /// Measure latency and throughput through the mesh and, in the same run, in-process.
    Bench(bench::BenchArgs),
    /// Create, list and revoke API keys.
    Keys(security::KeysArgs),
    /// Create and list tenants, set their quotas (platform admin).
    Tenants(security::TenantsArgs),
    /// Usage and cost by tenant, model and version.
    Usage(security::UsageArgs),
    /// The audit log of admin actions.
    Audit(security::AuditArgs),
    /// Mint a single-use join token for a new node (platform admin).
    JoinToken(security::JoinTokenArgs),
    /// Revoke a node: disconnect it and refuse its certificate (platform admin).
    RevokeNode(security::RevokeNodeArgs),
    /// Start signing route tickets with a new key, without downtime (platform admin).
    RotateTicketKey,
    /// Show the tenant, key and scopes of the profile's API key.
    Whoami,
}

#[derive(Debug, clap::Args)]
struct CoordinatorArgs {
    /// TOML config file (see docs/coordinator.example.toml); flags override it.
    #[arg(long, env = "SKEIN_COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
    /// UDP address to listen on.
    #[arg(long, env = "SKEIN_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory (CA, registry, artifacts, keys, usage ledger).
    #[arg(long, env = "SKEIN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// An extra join token to accept.
    #[arg(long, env = "SKEIN_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Address of the KServe V2 (Open Inference Protocol) HTTP gateway.
    #[arg(long, env = "SKEIN_HTTP", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Accept requests without an API key as the platform admin. For a laptop only: anyone
    /// who reaches the coordinator or the gateway controls the mesh.
    #[arg(long)]
    insecure_dev: bool,
}

/// Bind the HTTP gateway's port, with an error that names `--http` when it is taken.
pub(crate) async fn bind_http(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen for HTTP on {addr} (is the port in use? choose another with --http ADDR, e.g. --http 127.0.0.1:0)")
    })
}

/// An SDK client for the HTTP gateway of an embedded coordinator (no key of its own: callers
/// bring theirs), and the gateway's settings with its service key (for `/v2/health/ready`).
pub(crate) async fn gateway_client(
    c: &skein_coordinator::Coordinator,
) -> anyhow::Result<(skein_client::Client, skein_gateway::GatewayConfig)> {
    let key = c.service_key("gateway")?;
    let mut profile = skein_client::Profile::with_key(c.addr().to_string(), &c.ca_pem(), "");
    profile.api_key = None;
    let client = skein_client::Client::from_profile(&profile)
        .await
        .context("connecting the HTTP gateway to the coordinator")?;
    let config = skein_gateway::GatewayConfig {
        service_key: Some(skein_client::ApiKey::new(key)),
        ..skein_gateway::GatewayConfig::default()
    };
    Ok((client, config))
}

/// Parse `500ms`, `2s`, `10m`, `1h` (a bare number is seconds).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 2s, 10m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub(crate) async fn client(profile: &Option<PathBuf>) -> anyhow::Result<skein_client::Client> {
    let p = match profile {
        Some(p) => skein_client::Profile::load(p)?,
        None => skein_client::Profile::load_default()?,
    };
    skein_client::Client::from_profile_with(&p, client_config_from_env()?)
        .await
        .with_context(|| format!("connecting to the coordinator at {}", p.coordinator))
}

/// A client with LAN discovery on (`skein infer --lan`): the coordinator counts as unreachable
/// after 2 s; route tickets are kept next to the profile (`PROFILE.lan-tickets.json`).
pub(crate) async fn lan_client(profile: &Option<PathBuf>) -> anyhow::Result<skein_client::Client> {
    let path = match profile {
        Some(p) => p.clone(),
        None => skein_client::Profile::default_path()
            .context("no profile: pass --profile or set SKEIN_PROFILE")?,
    };
    let p = skein_client::Profile::load(&path)?;
    let mut config = client_config_from_env()?;
    config.coordinator_timeout = Duration::from_secs(2);
    config.lan = Some(skein_client::LanConfig {
        ticket_file: Some(path.with_extension("lan-tickets.json")),
        ..skein_client::LanConfig::default()
    });
    skein_client::Client::from_profile_with(&p, config)
        .await
        .with_context(|| format!("connecting to the coordinator at {}", p.coordinator))
}

/// SDK settings from the environment: `SKEIN_INITIAL_WINDOW` (bytes), `SKEIN_CONGESTION`
/// (new_reno, cubic, bbr), `SKEIN_PACING` (window, rtt), `SKEIN_NO_ZERO_RTT=1`.
pub(crate) fn client_config_from_env() -> anyhow::Result<skein_client::ClientConfig> {
    let mut c = skein_client::ClientConfig::default();
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let Some(v) = var("SKEIN_INITIAL_WINDOW") {
        c.transport.initial_window = v
            .parse()
            .with_context(|| format!("SKEIN_INITIAL_WINDOW `{v}` is not a number of bytes"))?;
    }
    if let Some(v) = var("SKEIN_CONGESTION") {
        c.transport.congestion = v.parse().map_err(anyhow::Error::msg)?;
    }
    if let Some(v) = var("SKEIN_PACING") {
        c.transport.pacing = v.parse().map_err(anyhow::Error::msg)?;
    }
    if var("SKEIN_NO_ZERO_RTT").is_some_and(|v| v != "0") {
        c.zero_rtt = false;
    }
    Ok(c)
}

async fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(p) => toml::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => skein_coordinator::CoordinatorConfig::default(),
    };
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = args.data_dir {
        cfg.data_dir = v;
    }
    if args.join_token.is_some() {
        cfg.join_token = args.join_token;
    }
    if args.insecure_dev {
        cfg.security.insecure_dev = true;
    }
    let dir = cfg.data_dir.clone();
    let http = bind_http(args.http).await?;
    let c = skein_coordinator::Coordinator::start(cfg).await?;
    let profile_path = dir.join("admin-profile.toml");
    println!("skein coordinator listening on {}", c.addr());
    if let Some(key) = c.admin_key() {
        skein_client::Profile::with_key(c.addr().to_string(), &c.ca_pem(), key)
            .save(&profile_path)?;
        println!("  admin API key (shown once): {key}");
    }
    println!(
        "  admin profile: {}  (use with --profile or SKEIN_PROFILE; the key is also in {})",
        profile_path.display(),
        dir.join("admin-key").display()
    );
    println!("  CA cert:     {}", dir.join("ca.crt").display());
    let token = c.mint_join_token(None)?;
    println!(
        "  start a node (single-use token, valid 1 h; mint more with `skein join-token`):\n    skein-node --coordinator {} --join-token {token} --listen 0.0.0.0:0 --data-dir ./node-data",
        c.addr(),
    );
    if args.insecure_dev {
        println!(
            "  WARNING: --insecure-dev: requests without an API key act as the platform admin"
        );
    }
    let http_addr = http.local_addr()?;
    let (gateway_client, gateway_config) = gateway_client(&c).await?;
    let cancel = c.cancel_token();
    let gateway = tokio::spawn(skein_gateway::serve(
        http,
        gateway_client.clone(),
        gateway_config,
        cancel.child_token(),
    ));
    println!(
        "  KServe V2 HTTP gateway: http://{http_addr}  (e.g. curl -s {http_addr}/v2/health/ready)"
    );
    let mut result = Ok(());
    tokio::select! {
        _ = tokio::signal::ctrl_c() => cancel.cancel(),
        _ = cancel.cancelled() => {}
        r = gateway => {
            result = match r {
                Ok(Ok(())) => Err(anyhow::anyhow!("the HTTP gateway stopped")),
                Ok(Err(e)) => Err(e.context("the HTTP gateway failed")),
                Err(e) => Err(e.into()),
            };
            cancel.cancel();
        }
    }
    gateway_client.close();
    c.shutdown().await;
    result
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    skein_node::logging::init(&cli.log, "warn", cli.log_format, "skein");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Up(a) => up::run(a, cli.profile).await,
            Command::Coordinator(a) => coordinator(a).await,
            Command::Deploy(a) => admin::deploy(a, &cli.profile).await,
            Command::Scale(a) => admin::scale(a, &cli.profile).await,
            Command::Models(a) => admin::models(a, &cli.profile).await,
            Command::Nodes(a) => admin::nodes(a, &cli.profile).await,
            Command::Route(a) => admin::route(a, &cli.profile).await,
            Command::Traffic(a) => admin::traffic(a, &cli.profile).await,
            Command::Infer(a) => infer::run(a, &cli.profile).await,
            Command::Bench(a) => bench::run(a, &cli.profile).await,
            Command::Keys(a) => security::keys(a, &cli.profile).await,
            Command::Tenants(a) => security::tenants(a, &cli.profile).await,
            Command::Usage(a) => security::usage(a, &cli.profile).await,
            Command::Audit(a) => security::audit(a, &cli.profile).await,
            Command::JoinToken(a) => security::join_token(a, &cli.profile).await,
            Command::RevokeNode(a) => security::revoke_node(a, &cli.profile).await,
            Command::RotateTicketKey => security::rotate_ticket_key(&cli.profile).await,
            Command::Whoami => security::whoami(&cli.profile).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
