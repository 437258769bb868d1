//! `skein-node`: the node agent binary. Flags, `SKEIN_*` env vars, and a TOML config file.

use anyhow::Context;
use clap::Parser;
use skein_node::NodeConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// Join a Skein mesh and serve models.
#[derive(Debug, Parser)]
#[command(name = "skein-node", version, about)]
struct Args {
    /// TOML config file (see docs/skein-node.example.toml); flags override it.
    #[arg(long, env = "SKEIN_NODE_CONFIG")]
    config: Option<PathBuf>,
    /// Coordinator host:port.
    #[arg(long, env = "SKEIN_COORDINATOR")]
    coordinator: Option<String>,
    /// Join token (first start only; printed by `skein coordinator`).
    #[arg(long, env = "SKEIN_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// UDP address of the infer endpoint.
    #[arg(long, env = "SKEIN_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address advertised to clients.
    #[arg(long, env = "SKEIN_ADVERTISE")]
    advertise: Option<SocketAddr>,
    /// Key, certificate and artifact cache directory.
    #[arg(long, env = "SKEIN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Labels, KEY=VALUE, repeatable (e.g. --label region=eu-west).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Requests of one model that run at once.
    #[arg(long, env = "SKEIN_MAX_CONCURRENCY")]
    max_concurrency: Option<u32>,
    /// Requests of one model that may wait before `Overloaded`.
    #[arg(long, env = "SKEIN_MAX_QUEUE")]
    max_queue: Option<u32>,
    /// Serve `GET /metrics` (Prometheus) and `GET /ready` over HTTP here, e.g. 0.0.0.0:9102.
    #[arg(long, env = "SKEIN_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Serve the V2 HTTP API (the coordinator gateway's, for apps on this device or its LAN)
    /// here, e.g. 0.0.0.0:8080; off by default. Models loaded on this node run here.
    #[arg(long, env = "SKEIN_HTTP")]
    http: Option<SocketAddr>,
    /// Do not advertise the HTTP ingress on the LAN over mDNS (`_skein-v2._tcp`).
    #[arg(long, env = "SKEIN_NO_MDNS")]
    no_mdns: bool,
    /// LAN discovery: advertise this node over mDNS (`_skein-peer._udp`) so that LAN clients
    /// (`skein infer --lan`) find it while the coordinator is unreachable, and list the LAN's
    /// other nodes.
    #[arg(long, env = "SKEIN_LAN")]
    lan: bool,
    /// What runs the models: auto (a hardware GPU when this build has the GPU backend and one
    /// is found, else ONNX Runtime when its library loads, else tract), tract, ort, wgpu
    /// (lavapipe counts) or cuda.
    #[arg(long, env = "SKEIN_BACKEND")]
    backend: Option<skein_node::backend::BackendChoice>,
    /// ONNX Runtime's library (libonnxruntime.so, e.g. the `onnxruntime` wheel's
    /// onnxruntime/capi/libonnxruntime.so.*); default: ORT_DYLIB_PATH, then the loader's path.
    #[arg(long, env = "SKEIN_ORT_LIB")]
    ort_lib: Option<PathBuf>,
    /// ONNX Runtime's execution provider: cpu, cuda or tensorrt (the onnxruntime-gpu library).
    #[arg(long, env = "SKEIN_ORT_EP")]
    ort_ep: Option<String>,
    /// ONNX Runtime intra-op threads per model (default: the node's cores).
    #[arg(long, env = "SKEIN_ORT_THREADS")]
    ort_threads: Option<usize>,
    /// Congestion window of a new connection, bytes (default 196608; 14720..=16777216).
    #[arg(long, env = "SKEIN_INITIAL_WINDOW")]
    initial_window: Option<u64>,
    /// Congestion controller: new_reno, cubic or bbr (default cubic).
    #[arg(long, env = "SKEIN_CONGESTION")]
    congestion: Option<skein_net::Congestion>,
    /// Pacing: window (what fits the congestion window leaves at once; default) or rtt
    /// (quinn's pacer, every window spread over a round trip).
    #[arg(long, env = "SKEIN_PACING")]
    pacing: Option<skein_net::Pacing>,
    /// Refuse 0-RTT: returning callers then always wait one round trip for the handshake.
    #[arg(long, env = "SKEIN_NO_ZERO_RTT")]
    no_zero_rtt: bool,
    /// Serve as a circuit relay (libp2p relay v2) for nodes behind NAT: for a node on a public
    /// address (limits: docs/operations.md, "Nodes behind NAT").
    #[arg(long, env = "SKEIN_RELAY")]
    relay: bool,
    /// A relay to hold a reservation on, a multiaddr ending in /p2p/PEER_ID; repeatable.
    #[arg(long = "peer-relay", env = "SKEIN_PEER_RELAYS", value_delimiter = ',')]
    peer_relays: Vec<String>,
    /// Run no libp2p peer layer (the node is then reachable at its advertised address only).
    #[arg(long, env = "SKEIN_NO_PEER")]
    no_peer: bool,
    /// Cap on the artifact bytes this node serves to other nodes (peer-to-peer model
    /// fetches), in MB/s (10^6 bytes per second; 1 MB/s = 8 Mbit/s); 0: no cap (the default).
    #[arg(
        long = "peer-upload-limit",
        env = "SKEIN_PEER_UPLOAD_LIMIT",
        value_name = "MB/s"
    )]
    peer_upload_limit: Option<f64>,
    /// Log filter (e.g. info, skein_node=debug).
    #[arg(long, env = "SKEIN_LOG", default_value = "info")]
    log: String,
    /// Log lines as text or JSON (one object per line, for log collectors).
    #[arg(long, env = "SKEIN_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: skein_node::logging::LogFormat,
    /// Install, uninstall or check the node as a system service; without one, run the node.
    #[command(subcommand)]
    service: Option<skein_node::install::cli::ServiceCommand>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label `{s}` is not KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

fn config(args: &Args) -> anyhow::Result<NodeConfig> {
    let mut c = match &args.config {
        Some(p) => toml::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => NodeConfig::default(),
    };
    if let Some(v) = &args.coordinator {
        c.coordinator = v.clone();
    }
    if let Some(v) = &args.join_token {
        c.join_token = Some(v.clone());
    }
    if let Some(v) = args.listen {
        c.listen = v;
    }
    if let Some(v) = args.advertise {
        c.advertise = Some(v);
    }
    if let Some(v) = &args.data_dir {
        c.data_dir = v.clone();
    }
    for (k, v) in &args.labels {
        c.labels.insert(k.clone(), v.clone());
    }
    if let Some(v) = args.max_concurrency {
        c.max_concurrency = v;
    }
    if let Some(v) = args.max_queue {
        c.max_queue = v;
    }
    if let Some(v) = args.metrics_listen {
        c.metrics_listen = Some(v);
    }
    if let Some(v) = args.http {
        c.http.listen = Some(v);
    }
    if args.no_mdns {
        c.http.mdns = false;
    }
    if args.lan {
        c.lan.mdns = true;
    }
    if let Some(v) = args.backend {
        c.backend = v;
    }
    if let Some(v) = &args.ort_lib {
        c.ort.lib = Some(v.clone());
    }
    if let Some(v) = &args.ort_ep {
        c.ort.ep = v.clone();
    }
    if let Some(v) = args.ort_threads {
        c.ort.threads = v;
    }
    if let Some(v) = args.initial_window {
        c.transport.initial_window = v;
    }
    if let Some(v) = args.congestion {
        c.transport.congestion = v;
    }
    if let Some(v) = args.pacing {
        c.transport.pacing = v;
    }
    if args.no_zero_rtt {
        c.zero_rtt = false;
    }
    if args.relay {
        c.peer.relay = true;
    }
    if !args.peer_relays.is_empty() {
        c.peer.relays = args.peer_relays.clone();
    }
    if args.no_peer {
        c.peer.enabled = false;
    }
    if let Some(v) = args.peer_upload_limit {
        if !(v.is_finite() && v >= 0.0) {
            anyhow::bail!("--peer-upload-limit {v}: a number of MB/s, 0 or more");
        }
        c.peer.upload_limit = v;
    }
    Ok(c)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(cmd) = args.service {
        return skein_node::install::cli::run(cmd).await;
    }
    skein_node::logging::init(&args.log, "info", args.log_format, "skein-node");
    let config = config(&args)?;
    // The transport settings in effect (config file and flags), before anything connects.
    tracing::info!(
        initial_window = config.transport.initial_window,
        congestion = ?config.transport.congestion,
        pacing = ?config.transport.pacing,
        zero_rtt = config.zero_rtt,
        "transport profile"
    );
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: draining");
        s.cancel();
    });
    skein_node::run(config, shutdown).await
}

/// SIGINT (Ctrl-C) or, on Unix, SIGTERM (what service managers and `kill` send).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
