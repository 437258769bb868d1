//! `skein up`: an embedded coordinator and local nodes in one process, the bundled models
//! deployed, and how to call them printed.

use anyhow::Context;
use skein_client::{Client, Profile};
use skein_coordinator::{Coordinator, CoordinatorConfig};
use skein_node::{Node, NodeConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// Local nodes to start.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Data directory; default $XDG_DATA_HOME/skein/up or ~/.local/share/skein/up.
    #[arg(long, env = "SKEIN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Coordinator UDP address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Address of the KServe V2 (Open Inference Protocol) HTTP gateway.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Directory of bundled models (each `<name>/model.onnx`); default ./models.
    #[arg(long, env = "SKEIN_MODELS")]
    models: Option<PathBuf>,
    /// Deploy nothing.
    #[arg(long)]
    no_models: bool,
    /// Accept requests without an API key as the platform admin (no key to pass around).
    /// For a laptop only: anyone who reaches the ports controls the mesh.
    #[arg(long)]
    insecure_dev: bool,
    /// What the local nodes run models on: auto (a hardware GPU when this build has the GPU
    /// backend, `--features gpu`, and one is found; else ONNX Runtime when its library loads;
    /// else tract), tract, ort, wgpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: skein_node::backend::BackendChoice,
    /// ONNX Runtime's library (libonnxruntime.so, e.g. the `onnxruntime` wheel's
    /// onnxruntime/capi/libonnxruntime.so.*); default: ORT_DYLIB_PATH, then the loader's path.
    #[arg(long, env = "SKEIN_ORT_LIB")]
    ort_lib: Option<PathBuf>,
    /// ONNX Runtime's execution provider: cpu, cuda or tensorrt (the onnxruntime-gpu library).
    #[arg(long, env = "SKEIN_ORT_EP", default_value = "cpu")]
    ort_ep: String,
    /// ONNX Runtime intra-op threads per model (default: the cores shared among the nodes).
    #[arg(long, env = "SKEIN_ORT_THREADS")]
    ort_threads: Option<usize>,
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("share")))
        .map(|b| b.join("skein").join("up"))
        .unwrap_or_else(|| PathBuf::from("skein-up-data"))
}

fn models_dir(arg: Option<PathBuf>) -> Option<PathBuf> {
    if let Some(p) = arg {
        return Some(p);
    }
    let candidates = [
        PathBuf::from("models"),
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models")),
    ];
    candidates
        .into_iter()
        .find(|p| p.join("ppocr_cls").join("model.onnx").is_file())
}

/// `(name, path)` of every `<dir>/<name>/model.onnx`, sorted.
fn bundled(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        let f = p.join("model.onnx");
        if f.is_file() {
            if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
                out.push((name.to_string(), f));
            }
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) async fn run(args: UpArgs, profile: Option<PathBuf>) -> anyhow::Result<()> {
    anyhow::ensure!((1..=64).contains(&args.nodes), "--nodes must be 1..=64");
    let dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut config = CoordinatorConfig {
        listen: args.listen,
        data_dir: dir.join("coordinator"),
        ..CoordinatorConfig::default()
    };
    config.security.insecure_dev = args.insecure_dev;
    let coordinator = Coordinator::start(config)
    .await
    .with_context(|| format!("starting the coordinator on {} (is another `skein up` running? try --listen 127.0.0.1:0)", args.listen))?;
    // Bind the HTTP port early, so that a busy port fails before anything else starts.
    let http = crate::bind_http(args.http).await?;
    let mut nodes = Vec::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ort = skein_node::backend::OrtConfig {
        lib: args.ort_lib.clone(),
        ep: args.ort_ep.clone(),
        threads: args
            .ort_threads
            .unwrap_or((cores / args.nodes.max(1)).max(1)),
    };
    for i in 0..args.nodes {
        let node = Node::start(NodeConfig {
            coordinator: coordinator.addr().to_string(),
            join_token: Some(coordinator.mint_join_token(None)?),
            data_dir: dir.join("nodes").join(format!("node-{i}")),
            backend: args.backend,
            ort: ort.clone(),
            ..NodeConfig::default()
        })
        .await
        .with_context(|| format!("starting local node {i}"))?;
        nodes.push(node);
    }
    let profile_path = match profile.or_else(Profile::default_path) {
        Some(p) => p,
        None => dir.join("profile.toml"),
    };
    // The root admin key: made (and shown) at the first start on this data dir, kept in
    // `<data dir>/coordinator/admin-key` (mode 0600) for the next ones.
    let key_path = dir.join("coordinator").join("admin-key");
    let fresh_key = coordinator.admin_key().map(str::to_string);
    let admin_key = match &fresh_key {
        Some(k) => k.clone(),
        None => std::fs::read_to_string(&key_path)
            .with_context(|| {
                format!(
                    "reading the admin key {} (remove the data dir {} to start afresh)",
                    key_path.display(),
                    dir.display()
                )
            })?
            .trim()
            .to_string(),
    };
    let prof = Profile::with_key(
        coordinator.addr().to_string(),
        &coordinator.ca_pem(),
        &admin_key,
    );
    prof.save(&profile_path)?;
    let client = Client::from_profile(&prof).await?;

    let mdir = if args.no_models {
        None
    } else {
        models_dir(args.models.clone())
    };
    let mut examples = Vec::new();
    if let Some(mdir) = &mdir {
        let existing = client.models().await?;
        for (name, path) in bundled(mdir)? {
            let bytes = std::fs::read(&path)?;
            let sha = {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(&bytes))
            };
            if let Some(m) = existing.iter().find(|m| m.name == name && m.sha256 == sha) {
                // Deployed by an older `skein up` (before tenants): share it as today's are.
                if !m.settings.shared {
                    let patch = skein_proto::SettingsPatch {
                        shared: Some(true),
                        ..Default::default()
                    };
                    client.scale(&name, Some(&m.version), patch).await?;
                }
                continue;
            }
            // Bundled models stay warm on one node; the others load them on demand. Every
            // tenant's `invoke` keys may call them.
            let settings = skein_proto::DeploymentSettings {
                min_replicas: 1,
                shared: true,
                ..Default::default()
            };
            match client
                .deploy_with(&name, None, &bytes, settings, |_| {})
                .await
            {
                Ok(info) => println!("deployed {} version {}", info.name, info.version),
                Err(e) => println!("not deployed: {name}: {e}"),
            }
        }
        let cls = mdir.join("ppocr_cls/cases/single/input_0.npy");
        if cls.is_file() {
            examples.push(format!("skein infer ppocr_cls --input x={}", cls.display()));
            examples.push(format!(
                "skein infer ppocr_cls --input x={} --output json",
                cls.display()
            ));
        }
        let vad = mdir.join("silero_vad/cases/stream_step0");
        if vad.is_dir() {
            examples.push(format!(
                "skein infer silero_vad --input input={0}/input_0.npy --input state={0}/input_1.npy --input sr=int64:16000",
                vad.display()
            ));
        }
        if cls.is_file() {
            examples.push(format!(
                "skein bench ppocr_cls --input x={} --concurrency 1 --duration 10s",
                cls.display()
            ));
        }
    } else if !args.no_models {
        println!("no bundled models found (looked for ./models); pass --models DIR");
    }

    // Wait (bounded) until every deployed model is loaded somewhere.
    let wait_until = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let models = client.models().await?;
        if models.iter().all(|m| !m.loaded_on.is_empty())
            || tokio::time::Instant::now() > wait_until
        {
            println!();
            println!(
                "Skein is up: coordinator {} with {} local nodes",
                coordinator.addr(),
                nodes.len()
            );
            for n in &nodes {
                println!("  node {} at {}", n.node_id(), n.addr());
            }
            for m in &models {
                println!(
                    "  model {:<14} version {:<3} loaded on {} node(s)",
                    m.name,
                    m.version,
                    m.loaded_on.len()
                );
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!();
    println!(
        "Profile written to {}; in another terminal:",
        profile_path.display()
    );
    println!("  skein models");
    println!("  skein nodes");
    println!("  skein route ppocr_cls");
    for e in &examples {
        println!("  {e}");
    }
    println!("Add a node from another shell or host (single-use token, valid 1 h):");
    println!(
        "  skein-node --coordinator {} --join-token {} --data-dir ./node-data",
        coordinator.addr(),
        coordinator.mint_join_token(None)?
    );
    let http_addr = http.local_addr()?;
    let (gateway_client, gateway_config) = crate::gateway_client(&coordinator).await?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let gateway = tokio::spawn(skein_gateway::serve(
        http,
        gateway_client.clone(),
        gateway_config,
        cancel.clone(),
    ));
    println!("KServe V2 HTTP gateway on http://{http_addr} (OpenAPI at /openapi.json):");
    if args.insecure_dev {
        println!("  curl -s {http_addr}/v2/models/ppocr_cls");
    } else {
        println!(
            "  curl -s -H \"Authorization: Bearer $(cat {})\" {http_addr}/v2/models/ppocr_cls",
            key_path.display()
        );
    }
    println!("  curl -s {http_addr}/v2/health/ready");
    match &fresh_key {
        Some(k) => {
            println!();
            println!(
                "Admin API key (shown once; saved in the profile and {}):",
                key_path.display()
            );
            println!("  {k}");
        }
        None => println!("Admin API key: in the profile and {}", key_path.display()),
    }
    if args.insecure_dev {
        println!("WARNING: --insecure-dev: requests without an API key act as the platform admin.");
    }
    println!("Make keys for others: skein keys create --tenant NAME --scope invoke (after skein tenants create NAME)");
    println!("Press Ctrl-C to stop.");
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        r = gateway => {
            r??;
            anyhow::bail!("the HTTP gateway stopped");
        }
    }
    println!("stopping...");
    cancel.cancel();
    gateway_client.close();
    client.close();
    for n in nodes {
        n.shutdown().await;
    }
    coordinator.shutdown().await;
    Ok(())
}
