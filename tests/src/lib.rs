//! Test support: an in-process mesh (coordinator + nodes + SDK client) over loopback QUIC.
//!
//! Every mesh binds `127.0.0.1:0`, lives in its own temporary directory and uses short
//! heartbeat intervals so that failure detection takes well under a second. Waiting is always
//! for a condition, bounded in time ([`wait_for`]), never a fixed sleep.

pub mod relay;

use anyhow::Context;
use skein_client::{Client, ClientConfig, Profile};
use skein_coordinator::{Coordinator, CoordinatorConfig};
use skein_node::{Node, NodeConfig};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// The repository's `models/` directory.
pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("models")
}

/// Bytes of a bundled model.
pub fn model_bytes(name: &str) -> Vec<u8> {
    let p = models_dir().join(name).join("model.onnx");
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// Coordinator settings for tests: fast heartbeats and failure detection.
pub fn fast_coordinator(dir: PathBuf) -> CoordinatorConfig {
    CoordinatorConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir,
        heartbeat_interval: Duration::from_millis(100),
        suspect_after: Duration::from_millis(400),
        dead_after: Duration::from_millis(800),
        route_ttl: Duration::from_millis(500),
        ..CoordinatorConfig::default()
    }
}

/// Poll `check` until it returns `Some`, for at most `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > until {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A coordinator, some nodes and a client, all in this process.
pub struct TestMesh {
    /// Holds every data directory.
    pub dir: tempfile::TempDir,
    /// The coordinator (None while stopped).
    pub coordinator: Option<Coordinator>,
    /// Nodes by index (None once stopped or killed).
    pub nodes: Vec<Option<Node>>,
    /// Client with admin credentials.
    pub client: Client,
    /// Client profile.
    pub profile: Profile,
    config: CoordinatorConfig,
}

impl TestMesh {
    /// Start a coordinator with `config_fn` applied to the fast test config, and `n` nodes.
    pub async fn start_with(
        n: usize,
        config_fn: impl FnOnce(&mut CoordinatorConfig),
        node_fn: impl Fn(&mut NodeConfig),
    ) -> anyhow::Result<TestMesh> {
        let dir = tempfile::tempdir()?;
        let mut config = fast_coordinator(dir.path().join("coordinator"));
        config_fn(&mut config);
        let coordinator = Coordinator::start(config.clone()).await?;
        // The admin key made at the first start: the test client is the platform admin,
        // known by its key alone (no client certificate).
        let admin_key = coordinator
            .admin_key()
            .context("a fresh coordinator makes an admin key")?
            .to_string();
        let profile = Profile::with_key(
            coordinator.addr().to_string(),
            &coordinator.ca_pem(),
            &admin_key,
        );
        let client = Client::from_profile_with(
            &profile,
            ClientConfig {
                timeout: Duration::from_secs(20),
                ..ClientConfig::default()
            },
        )
        .await?;
        let mut mesh = TestMesh {
            dir,
            coordinator: Some(coordinator),
            nodes: Vec::new(),
            client,
            profile,
            config,
        };
        for _ in 0..n {
            let cfg = mesh.node_config(mesh.nodes.len());
            let mut cfg = cfg;
            node_fn(&mut cfg);
            let node = Node::start(cfg).await?;
            mesh.nodes.push(Some(node));
        }
        Ok(mesh)
    }

    /// Start a coordinator and `n` nodes with the test defaults.
    pub async fn start(n: usize) -> anyhow::Result<TestMesh> {
        Self::start_with(n, |_| {}, |_| {}).await
    }

    /// The running coordinator.
    pub fn coordinator(&self) -> &Coordinator {
        self.coordinator.as_ref().expect("coordinator running")
    }

    /// Config for node `i` (its own data dir, a fresh single-use join token).
    pub fn node_config(&self, i: usize) -> NodeConfig {
        NodeConfig {
            coordinator: self.coordinator().addr().to_string(),
            join_token: Some(
                self.coordinator()
                    .mint_join_token(None)
                    .expect("minting a join token"),
            ),
            data_dir: self.dir.path().join(format!("node-{i}")),
            max_concurrency: 2,
            // The same engine on every host (`auto` would pick a hardware GPU where found).
            backend: skein_node::backend::BackendChoice::Tract,
            ..NodeConfig::default()
        }
    }

    /// Deploy a bundled model under its directory name, provisioned warm on every node.
    pub async fn deploy(&self, name: &str) -> anyhow::Result<skein_proto::ModelInfo> {
        let settings = skein_proto::DeploymentSettings {
            min_replicas: self.nodes.len() as u32,
            ..Default::default()
        };
        self.deploy_with(name, settings).await
    }

    /// Deploy a bundled model with explicit settings.
    pub async fn deploy_with(
        &self,
        name: &str,
        settings: skein_proto::DeploymentSettings,
    ) -> anyhow::Result<skein_proto::ModelInfo> {
        self.client
            .deploy_with(name, None, &model_bytes(name), settings, |_| {})
            .await
            .with_context(|| format!("deploying {name}"))
    }

    /// Wait until `model` is loaded on at least `n` nodes.
    pub async fn wait_loaded(&self, model: &str, n: usize) -> anyhow::Result<()> {
        wait_for(
            &format!("{model} loaded on {n} nodes"),
            Duration::from_secs(60),
            || async {
                let models = self.client.models().await.ok()?;
                models
                    .iter()
                    .any(|m| m.name == model && m.loaded_on.len() >= n)
                    .then_some(())
            },
        )
        .await
    }

    /// Stop the coordinator (graceful), keeping its data directory.
    pub async fn stop_coordinator(&mut self) -> std::net::SocketAddr {
        let c = self.coordinator.take().expect("coordinator running");
        let addr = c.addr();
        c.shutdown().await;
        addr
    }

    /// Start the coordinator again on `addr` with the same data directory.
    pub async fn restart_coordinator(&mut self, addr: std::net::SocketAddr) -> anyhow::Result<()> {
        let mut cfg = self.config.clone();
        cfg.listen = addr;
        self.coordinator = Some(Coordinator::start(cfg).await?);
        Ok(())
    }
}

/// A KServe V2 JSON inference request body carrying `inputs` (FP32 tensors) as JSON numbers.
pub fn v2_json_body(inputs: &[skein_proto::Tensor]) -> String {
    let tensors: Vec<serde_json::Value> = inputs
        .iter()
        .map(|t| {
            let data: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            serde_json::json!({
                "name": t.name(), "datatype": "FP32", "shape": t.shape(), "data": data
            })
        })
        .collect();
    serde_json::json!({ "inputs": tensors }).to_string()
}

/// The first [`skein_proto::WireError`] in an error chain, if any.
pub fn wire_error(e: &anyhow::Error) -> Option<&skein_proto::WireError> {
    e.chain().find_map(|c| {
        c.downcast_ref::<skein_proto::WireError>().or_else(|| {
            match c.downcast_ref::<skein_client::Error>() {
                Some(skein_client::Error::Remote(w)) => Some(w),
                _ => None,
            }
        })
    })
}

/// A KServe V2 HTTP gateway serving a [`TestMesh`] on `127.0.0.1:0`; stopped when dropped.
pub struct TestGateway {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// Cancels it.
    pub cancel: tokio_util::sync::CancellationToken,
    /// The serving task.
    pub task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The API key [`http`](Self::http) sends (the mesh's admin key).
    pub key: String,
}

impl TestGateway {
    /// Start a gateway for `mesh` with its own client credentials.
    pub async fn start(
        mesh: &TestMesh,
        config: skein_gateway::GatewayConfig,
    ) -> anyhow::Result<TestGateway> {
        let key = mesh.coordinator().service_key("gateway")?;
        let mut profile = Profile::with_key(
            mesh.coordinator().addr().to_string(),
            &mesh.coordinator().ca_pem(),
            "",
        );
        profile.api_key = None;
        let client = Client::from_profile(&profile).await?;
        let config = skein_gateway::GatewayConfig {
            service_key: Some(skein_client::ApiKey::new(key)),
            ..config
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(skein_gateway::serve(
            listener,
            client,
            config,
            cancel.clone(),
        ));
        Ok(TestGateway {
            addr,
            cancel,
            task: Some(task),
            key: mesh.profile.api_key.clone().unwrap_or_default(),
        })
    }

    /// A new HTTP client for this gateway, sending the mesh's admin key.
    pub fn http(&self) -> skein_gateway::http_client::HttpClient {
        skein_gateway::http_client::HttpClient::new(self.addr).with_bearer(&self.key)
    }

    /// A new HTTP client for this gateway that sends no credentials.
    pub fn http_anonymous(&self) -> skein_gateway::http_client::HttpClient {
        skein_gateway::http_client::HttpClient::new(self.addr)
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The reference case `name` of a bundled model.
pub fn case(model: &str, name: &str) -> skein_onnx::reference::Case {
    skein_onnx::reference::load_cases(&models_dir().join(model))
        .expect("reference cases")
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("{model} has no case {name}"))
}

/// Assert `outputs` match the case within the tolerance for engines other than onnxruntime.
pub fn check(outputs: &[skein_proto::Tensor], c: &skein_onnx::reference::Case) {
    assert_eq!(outputs.len(), c.outputs.len(), "{}: output count", c.name);
    for (a, e) in outputs.iter().zip(&c.outputs) {
        skein_onnx::reference::compare(a, e, 1e-3, 1e-2)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
    }
}

/// The latest version of `model` as the coordinator reports it (None if unknown or unreachable).
pub async fn model_info(mesh: &TestMesh, model: &str) -> Option<skein_proto::ModelInfo> {
    mesh.client
        .models()
        .await
        .ok()?
        .into_iter()
        .rev()
        .find(|m| m.name == model)
}

/// Warm replicas of `model` as the coordinator reports them.
pub async fn warm_replicas(mesh: &TestMesh, model: &str) -> u32 {
    model_info(mesh, model).await.map_or(0, |m| m.warm_replicas)
}

/// A node running in a process of its own (the `node-process` binary of this package), so a
/// test can `kill -9` it or stop it with SIGTERM.
pub struct NodeProcess {
    child: std::process::Child,
    /// The node's id.
    pub node_id: String,
    /// Its advertised address.
    pub addr: String,
}

impl NodeProcess {
    /// Start `exe` (pass `env!("CARGO_BIN_EXE_node-process")`) with `config`; returns once the
    /// node serves.
    pub async fn spawn(exe: &str, config: &NodeConfig) -> anyhow::Result<NodeProcess> {
        std::fs::create_dir_all(&config.data_dir)?;
        let path = config.data_dir.join("node.toml");
        std::fs::write(&path, toml::to_string(config)?)?;
        let (child, words) = spawn_ready(exe, &path).await?;
        match &words[..] {
            [id, addr, ..] => Ok(NodeProcess {
                node_id: id.clone(),
                addr: addr.clone(),
                child,
            }),
            _ => anyhow::bail!("node process said {words:?}"),
        }
    }

    /// `kill -9`: the process dies at once, nothing drained.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM: the node drains and exits; returns its exit status.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        // The shell's builtin `kill`: no dependency on a procps binary.
        let ok = std::process::Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status()?
            .success();
        anyhow::ensure!(ok, "kill -TERM {pid} failed");
        wait_for("the node process to exit", Duration::from_secs(60), || {
            let status = self.child.try_wait();
            async move { status.ok().flatten() }
        })
        .await
    }
}

/// Start `exe CONFIG` and wait (at most 60 s) for its first stdout line, `ready WORDS...`;
/// returns the child and the words after `ready`.
async fn spawn_ready(
    exe: &str,
    config: &std::path::Path,
) -> anyhow::Result<(std::process::Child, Vec<String>)> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(exe)
        .arg(config)
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {exe}"))?;
    let stdout = child.stdout.take().context("process stdout")?;
    let line = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .map(|_| line)
        }),
    )
    .await
    .with_context(|| format!("{exe} did not start within 60 s"))???;
    let mut words = line.split_whitespace().map(str::to_string);
    if words.next().as_deref() != Some("ready") {
        let _ = child.kill();
        let _ = child.wait();
        anyhow::bail!("{exe} did not start: {line:?}");
    }
    Ok((child, words.collect()))
}

/// A coordinator in a process of its own (the `coordinator-process` binary), to `kill -9`.
pub struct CoordinatorProcess {
    child: std::process::Child,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
}

impl CoordinatorProcess {
    /// Start `exe` (pass `env!("CARGO_BIN_EXE_coordinator-process")`) with `config`; returns
    /// once it serves.
    pub async fn spawn(
        exe: &str,
        config: &CoordinatorConfig,
    ) -> anyhow::Result<CoordinatorProcess> {
        std::fs::create_dir_all(&config.data_dir)?;
        let path = config.data_dir.join("coordinator.toml");
        std::fs::write(&path, toml::to_string(config)?)?;
        let (child, words) = spawn_ready(exe, &path).await?;
        let addr = words
            .first()
            .context("coordinator process printed no address")?
            .parse()?;
        Ok(CoordinatorProcess { child, addr })
    }

    /// `kill -9`: the process dies at once.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One call made by a [`Load`].
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When the call started, relative to the start of the load.
    pub started: Duration,
    /// How long it took.
    pub latency: Duration,
    /// The node that answered and the failovers it took, or the error.
    pub result: Result<(String, u32), String>,
}

/// Steady load from the SDK: `concurrency` tasks calling back to back until stopped.
pub struct Load {
    t0: tokio::time::Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    served: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    /// Start calling `model` with `inputs`.
    pub fn start(
        client: &Client,
        model: &str,
        inputs: Vec<skein_proto::Tensor>,
        concurrency: usize,
    ) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let served = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let t0 = tokio::time::Instant::now();
        let tasks = (0..concurrency)
            .map(|_| {
                let (client, model, inputs) = (client.clone(), model.to_string(), inputs.clone());
                let (stop, done, served) = (stop.clone(), done.clone(), served.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let started = t0.elapsed();
                        let r = client.infer(&model, inputs.clone()).await;
                        if let Ok(r) = &r {
                            *served
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .entry(r.meta.node.clone())
                                .or_default() += 1;
                        }
                        out.push(Outcome {
                            started,
                            latency: t0.elapsed() - started,
                            result: r
                                .map(|r| (r.meta.node, r.failovers))
                                .map_err(|e| e.to_string()),
                        });
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    out
                })
            })
            .collect();
        Load {
            t0,
            stop,
            done,
            served,
            tasks,
        }
    }

    /// Successful calls so far, by the node that answered.
    pub fn served_by(&self) -> std::collections::HashMap<String, u64> {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The node that answered most calls so far.
    pub fn busiest(&self) -> Option<String> {
        self.served_by()
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(id, _)| id)
    }

    /// Time since the load started (the clock of [`Outcome::started`]).
    pub fn elapsed(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Calls finished so far (successful or not).
    pub fn finished(&self) -> u64 {
        self.done.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wait (bounded) until `n` more calls have finished than `finished()` says now.
    pub async fn run_for(&self, n: u64) -> anyhow::Result<()> {
        let target = self.finished() + n;
        wait_for(
            &format!("{n} more calls"),
            Duration::from_secs(120),
            || async { (self.finished() >= target).then_some(()) },
        )
        .await
    }

    /// Keep the load running until `at` (on the [`Load::elapsed`] clock), then for `n` more
    /// calls.
    pub async fn run_past(&self, at: Duration, n: u64) -> anyhow::Result<()> {
        wait_for("the load clock", at + Duration::from_secs(60), || async {
            (self.elapsed() > at).then_some(())
        })
        .await?;
        self.run_for(n).await
    }

    /// Stop and collect every outcome, ordered by start time.
    pub async fn stop(self) -> anyhow::Result<Vec<Outcome>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await?);
        }
        all.sort_by_key(|o| o.started);
        Ok(all)
    }
}

/// One node of a [`WanMesh`].
pub struct WanNode {
    /// Its own loopback address.
    pub ip: std::net::IpAddr,
    /// One-way delay to the hub.
    pub delay: Duration,
    /// Its front port on the hub (what it advertises).
    pub port: relay::Port,
    /// The node (None once crashed).
    pub node: Option<Node>,
    /// Its id.
    pub node_id: String,
}

/// A mesh whose nodes sit at different network distances: the coordinator and the test's
/// client at the hub (no delay), node `i` on `127.0.0.{i+2}` with its one-way delay, every
/// packet to or from a node going through the [`relay::Hub`] on `127.0.0.100`.
pub struct WanMesh {
    /// The hub imposing the delays.
    pub hub: relay::Hub,
    /// Coordinator and client.
    pub mesh: TestMesh,
    /// The nodes.
    pub nodes: Vec<WanNode>,
    _coordinator_port: relay::Port,
}

impl WanMesh {
    /// Start a coordinator and one node per entry of `delays`, with `node_fn` applied to each
    /// node's config.
    pub async fn start(
        delays: &[Duration],
        node_fn: impl Fn(&mut NodeConfig),
    ) -> anyhow::Result<WanMesh> {
        Self::start_with(delays, |_| {}, node_fn).await
    }

    /// Like [`WanMesh::start`], with `config_fn` applied to the coordinator's config.
    pub async fn start_with(
        delays: &[Duration],
        config_fn: impl FnOnce(&mut CoordinatorConfig),
        node_fn: impl Fn(&mut NodeConfig),
    ) -> anyhow::Result<WanMesh> {
        let hub = relay::Hub::new([127, 0, 0, 100].into());
        let mesh = TestMesh::start_with(0, config_fn, |_| {}).await?;
        let cport = hub.port(Some(mesh.coordinator().addr())).await?;
        let mut nodes = Vec::new();
        for (i, &delay) in delays.iter().enumerate() {
            let ip: std::net::IpAddr = [127, 0, 0, 2 + i as u8].into();
            hub.set_delay(ip, delay);
            let port = hub.port(None).await?;
            let mut cfg = mesh.node_config(i);
            cfg.coordinator = cport.addr().to_string();
            cfg.listen = std::net::SocketAddr::new(ip, 0);
            cfg.advertise = Some(port.addr());
            cfg.probe_interval_ms = 200;
            node_fn(&mut cfg);
            let node = Node::start(cfg).await?;
            port.set_target(node.local_addr()?);
            nodes.push(WanNode {
                ip,
                delay,
                port,
                node_id: node.node_id().to_string(),
                node: Some(node),
            });
        }
        Ok(WanMesh {
            hub,
            mesh,
            nodes,
            _coordinator_port: cport,
        })
    }

    /// The index of the node with this id.
    pub fn index(&self, node_id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.node_id == node_id)
    }

    /// Wait until every live node's network coordinate has settled.
    pub async fn wait_coordinates_settled(&self) -> anyhow::Result<()> {
        let live: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.node.is_some())
            .map(|n| n.node_id.clone())
            .collect();
        wait_for(
            "network coordinates to settle",
            Duration::from_secs(60),
            || async {
                let infos = self.mesh.client.nodes().await.ok()?;
                live.iter()
                    .all(|id| {
                        infos.iter().any(|n| {
                            &n.node_id == id && n.coordinate.as_ref().is_some_and(|c| c.settled())
                        })
                    })
                    .then_some(())
            },
        )
        .await
    }

    /// Crash node `i`: its packets stop (so no goodbye reaches anyone) and it dies.
    pub fn crash(&mut self, i: usize) {
        self.hub.set_down(self.nodes[i].ip, true);
        if let Some(n) = self.nodes[i].node.take() {
            n.kill();
        }
    }
}
