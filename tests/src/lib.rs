//! Test support: an in-process mesh (coordinator + nodes + SDK client) over loopback QUIC.
//!
//! Every mesh binds `127.0.0.1:0`, lives in its own temporary directory and uses short
//! heartbeat intervals so that failure detection takes well under a second. Waiting is always
//! for a condition, bounded in time ([`wait_for`]), never a fixed sleep.

pub mod delay;
pub mod lan_site;
pub mod nat;
pub mod relay;
pub mod site;
pub mod synth;

use anyhow::Context;
use skein_client::{Client, ClientConfig, Profile};
use skein_coordinator::{Coordinator, CoordinatorConfig};
use skein_node::{Node, NodeConfig};
use skein_policy::vivaldi::CoordinateExt;
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

/// `addr`, with an unspecified IP (a wildcard listen address) replaced by loopback.
fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    if addr.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
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
            reachable(coordinator.addr()).to_string(),
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
            coordinator: reachable(self.coordinator().addr()).to_string(),
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

/// The output tensors of a KServe V2 JSON inference response (FP32 and INT64 data as JSON
/// numbers, as the gateway answers a JSON request); an error names what is missing.
pub fn v2_json_outputs(body: &[u8]) -> anyhow::Result<Vec<skein_proto::Tensor>> {
    use skein_proto::{DataType, Tensor};
    let v: serde_json::Value = serde_json::from_slice(body).context("a JSON response body")?;
    let outputs = v["outputs"].as_array().context("no `outputs` array")?;
    outputs
        .iter()
        .map(|o| {
            let name = o["name"].as_str().context("an output without a name")?;
            let dt: DataType = o["datatype"]
                .as_str()
                .context("an output without a datatype")?
                .parse()
                .with_context(|| format!("output {name}: datatype"))?;
            let shape: Vec<u64> = serde_json::from_value(o["shape"].clone())
                .with_context(|| format!("output {name}: shape"))?;
            let data = o["data"]
                .as_array()
                .with_context(|| format!("output {name}: no data array"))?;
            let number = |x: &serde_json::Value| {
                x.as_f64()
                    .with_context(|| format!("output {name}: {x} is not a number"))
            };
            let bytes: Vec<u8> = match dt {
                DataType::Fp32 => data
                    .iter()
                    .map(|x| Ok((number(x)? as f32).to_le_bytes()))
                    .collect::<anyhow::Result<Vec<_>>>()?
                    .concat(),
                DataType::Int64 => data
                    .iter()
                    .map(|x| {
                        x.as_i64()
                            .map(i64::to_le_bytes)
                            .with_context(|| format!("output {name}: {x} is not an integer"))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?
                    .concat(),
                other => anyhow::bail!("output {name}: datatype {other} not handled here"),
            };
            Ok(Tensor::new(name, dt, shape, bytes)?)
        })
        .collect()
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
            reachable(mesh.coordinator().addr()).to_string(),
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

/// Tolerance for an engine other than onnxruntime (`models/README.md`): absolute, relative.
pub const ATOL: f64 = 1e-3;
/// See [`ATOL`].
pub const RTOL: f64 = 1e-2;

/// Assert `outputs` match the case within the tolerance for engines other than onnxruntime.
pub fn check(outputs: &[skein_proto::Tensor], c: &skein_onnx::reference::Case) {
    if let Err(e) = matches_reference(outputs, c) {
        panic!("{e}");
    }
}

/// Whether `outputs` match the case (names, count, values within [`ATOL`]/[`RTOL`]); the
/// first difference otherwise.
pub fn matches_reference(
    outputs: &[skein_proto::Tensor],
    c: &skein_onnx::reference::Case,
) -> Result<(), String> {
    if outputs.len() != c.outputs.len() {
        return Err(format!(
            "{}: {} outputs, {} expected",
            c.name,
            outputs.len(),
            c.outputs.len()
        ));
    }
    for (a, e) in outputs.iter().zip(&c.outputs) {
        if a.name() != e.name() {
            return Err(format!(
                "{}: output `{}` where `{}` was expected",
                c.name,
                a.name(),
                e.name()
            ));
        }
        skein_onnx::reference::compare(a, e, ATOL, RTOL).map_err(|e| format!("{}: {e}", c.name))?;
    }
    Ok(())
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
    /// The address its endpoint is bound to (differs from `addr` behind a relay).
    pub local_addr: String,
    /// Where it serves `/metrics` (`metrics_listen` set).
    pub metrics: Option<std::net::SocketAddr>,
}

impl NodeProcess {
    /// The node process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Start `exe` (pass `env!("CARGO_BIN_EXE_node-process")`) with `config`; returns once the
    /// node serves.
    pub async fn spawn(exe: &str, config: &NodeConfig) -> anyhow::Result<NodeProcess> {
        NodeProcess::spawn_env(exe, config, &[]).await
    }

    /// Like [`spawn`](Self::spawn), with `env` added to the process's environment.
    pub async fn spawn_env(
        exe: &str,
        config: &NodeConfig,
        env: &[(&str, &str)],
    ) -> anyhow::Result<NodeProcess> {
        NodeProcess::spawn_in(None, exe, config, env).await
    }

    /// Like [`spawn_env`](Self::spawn_env), inside network namespace `ns` when given.
    pub async fn spawn_in(
        ns: Option<&NetNs>,
        exe: &str,
        config: &NodeConfig,
        env: &[(&str, &str)],
    ) -> anyhow::Result<NodeProcess> {
        NodeProcess::spawn_in_named(ns.map(|n| n.name.as_str()), exe, config, env).await
    }

    /// Like [`spawn_in`](Self::spawn_in), inside the network namespace named `ns` (e.g. a
    /// host behind a [`nat::NatHost`] router).
    pub async fn spawn_in_named(
        ns: Option<&str>,
        exe: &str,
        config: &NodeConfig,
        env: &[(&str, &str)],
    ) -> anyhow::Result<NodeProcess> {
        let path = write_config(&config.data_dir, "node.toml", config)?;
        let mut cmd = match ns {
            // `ip netns exec` enters the namespace and then execs the node: same pid.
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns, exe]);
                c
            }
            None => std::process::Command::new(exe),
        };
        cmd.arg(&path).envs(env.iter().copied());
        let (child, words) = spawn_ready(cmd, exe).await?;
        match &words[..] {
            [id, addr, local, rest @ ..] => Ok(NodeProcess {
                node_id: id.clone(),
                addr: addr.clone(),
                local_addr: local.clone(),
                metrics: rest.first().and_then(|m| m.parse().ok()),
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

    /// The process's resident memory in bytes (`/proc/PID/statm`): this node's alone,
    /// whatever else runs in the test process.
    pub fn resident_bytes(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/statm", self.child.id());
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let pages: u64 = text
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("{path}: {text:?}"))?;
        Ok(pages * 4096)
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

/// Write `config` as TOML to `dir/file` (creating `dir`); returns the path.
fn write_config<T: serde::Serialize>(
    dir: &std::path::Path,
    file: &str,
    config: &T,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(file);
    std::fs::write(&path, toml::to_string(config)?)?;
    Ok(path)
}

/// The process among `procs` that runs node `node_id`.
pub fn process_of<'a>(procs: &'a mut [NodeProcess], node_id: &str) -> &'a mut NodeProcess {
    procs
        .iter_mut()
        .find(|p| p.node_id == node_id)
        .expect("a node process with that id")
}

/// Start `exe CONFIG` and wait (at most 60 s) for its first stdout line, `ready WORDS...`;
/// returns the child and the words after `ready`.
async fn spawn_ready(
    mut cmd: std::process::Command,
    exe: &str,
) -> anyhow::Result<(std::process::Child, Vec<String>)> {
    use std::io::BufRead;
    let mut child = cmd
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
        CoordinatorProcess::spawn_env(exe, config, &[]).await
    }

    /// Like [`spawn`](Self::spawn), with `env` added to the process's environment.
    pub async fn spawn_env(
        exe: &str,
        config: &CoordinatorConfig,
        env: &[(&str, &str)],
    ) -> anyhow::Result<CoordinatorProcess> {
        let path = write_config(&config.data_dir, "coordinator.toml", config)?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg(&path).envs(env.iter().copied());
        let (child, words) = spawn_ready(cmd, exe).await?;
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
    /// The node that answered and the failovers it took, or the error. An answer whose outputs
    /// differ from the reference case is an error too (`wrong answer from NODE: ...`).
    pub result: Result<(String, u32), String>,
}

/// Steady load from the SDK until stopped: closed-loop ([`Load::start`], `concurrency` tasks
/// calling back to back) or open-loop ([`Load::at_rate`], calls started on a fixed schedule).
/// Every call sends a reference case's inputs and checks the answer against its outputs, so a
/// wrong answer counts as a failed call, never as a served one.
pub struct Load {
    t0: tokio::time::Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    served: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
    stalls: std::sync::Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    /// Start calling `model` with the inputs of reference case `case`.
    pub fn start(
        client: &Client,
        model: &str,
        case: &skein_onnx::reference::Case,
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
                let (client, model, case) = (client.clone(), model.to_string(), case.clone());
                let (stop, done, served) = (stop.clone(), done.clone(), served.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let started = t0.elapsed();
                        out.push(
                            call_once(&client, &model, &case, t0, started, &served, &done).await,
                        );
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
            stalls: Arc::default(),
            tasks,
        }
    }

    /// Start calling `model` with reference case `case` `per_second` times a second on a fixed schedule,
    /// whatever the answers take (at most `max_in_flight` at once: a call that must wait for
    /// room still counts its latency from its scheduled start, so a stall shows in the
    /// figures instead of thinning the load; [`stalls`](Self::stalls) counts such waits).
    pub fn at_rate(
        client: &Client,
        model: &str,
        case: &skein_onnx::reference::Case,
        per_second: u32,
        max_in_flight: usize,
    ) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let served = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let t0 = tokio::time::Instant::now();
        let period = Duration::from_secs(1) / per_second.max(1);
        let (client, model, case) = (client.clone(), model.to_string(), Arc::new(case.clone()));
        let stalls = Arc::new(AtomicU64::new(0));
        let (stop2, done2, served2, stalls2) =
            (stop.clone(), done.clone(), served.clone(), stalls.clone());
        let driver = tokio::spawn(async move {
            let mut calls = tokio::task::JoinSet::new();
            let mut out = Vec::new();
            let mut tick = tokio::time::interval_at(t0, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while !stop2.load(Ordering::SeqCst) {
                let scheduled = tick.tick().await;
                while let Some(r) = calls.try_join_next() {
                    out.extend(r.ok());
                }
                if calls.len() >= max_in_flight.max(1) {
                    stalls2.fetch_add(1, Ordering::SeqCst);
                    if let Some(r) = calls.join_next().await {
                        out.extend(r.ok());
                    }
                }
                let started = scheduled.duration_since(t0);
                let (client, model, case) = (client.clone(), model.clone(), case.clone());
                let (served, done) = (served2.clone(), done2.clone());
                calls.spawn(async move {
                    call_once(&client, &model, &case, t0, started, &served, &done).await
                });
            }
            while let Some(r) = calls.join_next().await {
                out.extend(r.ok());
            }
            out
        });
        Load {
            t0,
            stop,
            done,
            served,
            stalls,
            tasks: vec![driver],
        }
    }

    /// How often an open-loop load had `max_in_flight` calls out and waited before starting the
    /// next one (the schedule slipped); 0 for a closed-loop load. The counter stays readable
    /// after [`stop`](Self::stop).
    pub fn stalls(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.stalls.clone()
    }

    /// Calls answered (with the reference outputs) so far, by the node that answered.
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

/// A host of its own for tests: a network namespace joined to this one by a veth pair, with
/// `host_ip` on this side and `ns_ip` inside (a /30 of 10.0.0.0/8 picked from the process id
/// and `index`). Needs root and iproute2; removed on drop. [`partition`](Self::partition)
/// takes the link down, [`heal`](Self::heal) brings it back.
pub struct NetNs {
    /// The namespace's name (`ip netns exec NAME ...`).
    pub name: String,
    host_if: String,
    ns_if: String,
    /// This side's address.
    pub host_ip: std::net::Ipv4Addr,
    /// The namespace's address.
    pub ns_ip: std::net::Ipv4Addr,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl NetNs {
    /// Whether this machine can make namespaces (see [`root_tests`]).
    pub fn required() -> bool {
        root_tests("network namespaces", &["ip", "netns", "list"])
    }

    /// Make namespace number `index` (0..64) of this process.
    pub fn create(index: u8) -> anyhow::Result<NetNs> {
        anyhow::ensure!(index < 64, "namespace index {index} out of range");
        let pid = std::process::id();
        let tag = format!("{}x{index}", pid % 100_000);
        let name = format!("skein-{tag}");
        let (host_if, ns_if) = (format!("sk{tag}h"), format!("sk{tag}n"));
        let b = (pid % 250) as u8;
        let c = index * 4;
        let host_ip = std::net::Ipv4Addr::new(10, 213, b, c + 1);
        let ns_ip = std::net::Ipv4Addr::new(10, 213, b, c + 2);
        // Leftovers of an earlier process with the same pid.
        let _ = ip(&["link", "del", &host_if]);
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = NetNs {
            name,
            host_if,
            ns_if: ns_if.clone(),
            host_ip,
            ns_ip,
        };
        let n = ns.name.as_str();
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", n])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_if,
        ])?;
        ip(&["-n", n, "link", "set", &ns_if, "up"])?;
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// This side's end of the link (an interface of the test's own namespace).
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// The namespace's end of the link (an interface inside it).
    pub fn ns_if(&self) -> &str {
        &self.ns_if
    }

    /// Cut the link: nothing crosses until [`heal`](Self::heal).
    pub fn partition(&self) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_if, "down"])
    }

    /// Restore the link.
    pub fn heal(&self) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_if, "up"])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The value of metric `name`'s first series whose labels contain `label` (`""`: its first
/// series), in a Prometheus `/metrics` text.
pub fn metric_sample(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix('{')?;
        let (labels, value) = rest.split_once("} ")?;
        labels.contains(label).then(|| value.trim().parse().ok())?
    })
}

/// [`metric_sample`] of the `/metrics` served at `addr` (`None` when it cannot be read).
pub async fn node_metric(addr: std::net::SocketAddr, name: &str, label: &str) -> Option<f64> {
    let mut http = skein_gateway::http_client::HttpClient::new(addr);
    let r = http.get("/metrics").await.ok()?;
    metric_sample(&String::from_utf8(r.body).ok()?, name, label)
}

/// Whether tests that need root and a system tool can run here: this process is root and
/// `probe` (a command line) succeeds. Such tests fail when `SKEIN_EXPECT_ROOT` is set (CI
/// runs as root) and skip with a message otherwise.
pub fn root_tests(what: &str, probe: &[&str]) -> bool {
    let ok = nix_root()
        && std::process::Command::new(probe[0])
            .args(&probe[1..])
            .output()
            .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("SKEIN_EXPECT_ROOT").is_none(),
            "SKEIN_EXPECT_ROOT is set but {what} are not available here (root and `{}` needed)",
            probe.join(" ")
        );
        eprintln!("skipping: {what} need root and `{}`", probe.join(" "));
    }
    ok
}

/// A small tmpfs mounted over a directory, to fill a disk for real; unmounted on drop.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mount `size_kib` KiB of tmpfs over `dir` (created if missing).
    pub fn mount(dir: &std::path::Path, size_kib: u64) -> anyhow::Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_kib}k"), "tmpfs"])
            .arg(dir)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    /// Give it `size_kib` KiB, keeping what it holds (a remount).
    pub fn resize(&self, size_kib: u64) -> anyhow::Result<()> {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size_kib}k")])
            .arg(&self.dir)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "remount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Unmount now (the directory's own contents show again).
    pub fn unmount(self) -> anyhow::Result<()> {
        let dir = self.dir.clone();
        std::mem::forget(self);
        let out = std::process::Command::new("umount").arg(&dir).output()?;
        anyhow::ensure!(
            out.status.success(),
            "umount: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .output();
    }
}

/// Whether this process runs as root (uid 0), from /proc (no libc call).
fn nix_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

/// The `q` quantile (0..=1, nearest rank) of `latencies`; zero when there are none.
pub fn quantile(latencies: &[Duration], q: f64) -> Duration {
    let mut v = latencies.to_vec();
    v.sort();
    let i = ((v.len().saturating_sub(1)) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

/// A mesh whose `n` nodes run in processes of their own (`exe`: pass
/// `env!("CARGO_BIN_EXE_node-process")`, each configured by `node_fn`), with `model` deployed
/// warm on all of them.
pub async fn node_processes(
    exe: &str,
    n: usize,
    model: &str,
    node_fn: impl Fn(&mut NodeConfig),
) -> anyhow::Result<(TestMesh, Vec<NodeProcess>)> {
    let mesh = TestMesh::start(0).await?;
    let mut procs = Vec::new();
    for i in 0..n {
        let mut config = mesh.node_config(i);
        node_fn(&mut config);
        procs.push(NodeProcess::spawn(exe, &config).await?);
    }
    let settings = skein_proto::DeploymentSettings {
        min_replicas: n as u32,
        ..Default::default()
    };
    mesh.deploy_with(model, settings).await?;
    mesh.wait_loaded(model, n).await?;
    Ok((mesh, procs))
}

/// Successful calls by the node that answered.
pub fn by_node(outcomes: &[Outcome]) -> std::collections::HashMap<String, usize> {
    let mut m = std::collections::HashMap::new();
    for o in outcomes {
        if let Ok((node, _)) = &o.result {
            *m.entry(node.clone()).or_default() += 1;
        }
    }
    m
}

/// Run the load one route TTL past now plus 40 calls, stop it, and check that no call failed
/// and that every call started after that point went straight to a live node (no failover).
pub async fn finish_without_failures(load: Load, event: &str) -> anyhow::Result<Vec<Outcome>> {
    let settled = load.elapsed() + Duration::from_millis(600);
    load.run_past(settled, 40).await?;
    let outcomes = load.stop().await?;
    let errs = failed_calls(&outcomes);
    assert!(errs.is_empty(), "failed calls: {errs:?}");
    let tail: Vec<&Outcome> = outcomes.iter().filter(|o| o.started > settled).collect();
    assert!(
        tail.len() > 10,
        "too few calls after the {event}: {}",
        tail.len()
    );
    let detoured: Vec<_> = tail
        .iter()
        .filter(|o| !matches!(o.result, Ok((_, 0))))
        .collect();
    assert!(
        detoured.is_empty(),
        "after the {event}, calls go straight to a live node: {detoured:?}"
    );
    Ok(outcomes)
}

/// Wait until the coordinator has declared `victim` dead.
pub async fn declared_dead(mesh: &TestMesh, victim: &str) -> anyhow::Result<()> {
    wait_for(
        "the killed node declared dead",
        Duration::from_secs(20),
        || async {
            let nodes = mesh.client.nodes().await.ok()?;
            nodes
                .iter()
                .any(|n| n.node_id == victim && n.health == skein_proto::NodeHealth::Dead)
                .then_some(())
        },
    )
    .await
}

/// The errors of the calls that failed.
pub fn failed_calls(outcomes: &[Outcome]) -> Vec<String> {
    outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err().cloned())
        .collect()
}

/// One call of a [`Load`], started at `started` on the `t0` clock: the case's inputs, the
/// answer checked against its outputs.
async fn call_once(
    client: &Client,
    model: &str,
    case: &skein_onnx::reference::Case,
    t0: tokio::time::Instant,
    started: Duration,
    served: &std::sync::Mutex<std::collections::HashMap<String, u64>>,
    done: &std::sync::atomic::AtomicU64,
) -> Outcome {
    let result = match client.infer(model, case.inputs.clone()).await {
        Ok(r) => match matches_reference(&r.outputs, case) {
            Ok(()) => {
                *served
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(r.meta.node.clone())
                    .or_default() += 1;
                Ok((r.meta.node, r.failovers))
            }
            Err(e) => Err(format!("wrong answer from {}: {e}", r.meta.node)),
        },
        Err(e) => Err(e.to_string()),
    };
    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Outcome {
        started,
        latency: t0.elapsed().saturating_sub(started),
        result,
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

/// A span as an OTLP collector received it.
#[derive(Debug, Clone)]
pub struct CollectedSpan {
    /// `service.name` of the exporting process.
    pub service: String,
    /// Span name.
    pub name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits; empty for a root span.
    pub parent_span_id: String,
    /// OTLP kind (1 internal, 2 server, 3 client).
    pub kind: u64,
    /// OTLP status code (0 unset, 1 ok, 2 error).
    pub status: u64,
    /// Attributes, values as JSON.
    pub attributes: std::collections::HashMap<String, serde_json::Value>,
}

/// A stand-in OpenTelemetry collector: accepts OTLP/HTTP JSON exports (`POST /v1/traces`) on
/// `127.0.0.1:0` and keeps the spans (at most 100 000).
pub struct OtlpCollector {
    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<CollectedSpan>>>,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpCollector {
    /// Start it.
    pub async fn start() -> anyhow::Result<OtlpCollector> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = spans.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(body)) =
                        tokio::time::timeout(Duration::from_secs(10), read_post(conn)).await
                    {
                        let got = parse_otlp(&body);
                        let mut all = store.lock().unwrap_or_else(|p| p.into_inner());
                        if all.len() + got.len() <= 100_000 {
                            all.extend(got);
                        }
                    }
                });
            }
        });
        Ok(OtlpCollector {
            endpoint,
            spans,
            task,
        })
    }

    /// The spans received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Wait (at most 30 s) for a span named `name` of trace `trace_id` (32 hex digits).
    pub async fn wait_span(&self, name: &str, trace_id: &str) -> anyhow::Result<CollectedSpan> {
        wait_for(
            &format!("span {name} of trace {trace_id} at the collector"),
            Duration::from_secs(30),
            || {
                let found = self
                    .spans()
                    .into_iter()
                    .find(|s| s.name == name && s.trace_id == trace_id);
                async move { found }
            },
        )
        .await
    }
}

impl Drop for OtlpCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Read one HTTP/1.1 POST (headers, then a `Content-Length` body of at most 16 MiB), answer
/// 200, and return the body.
async fn read_post(mut conn: tokio::net::TcpStream) -> anyhow::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = conn.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "the exporter closed the connection early");
        buf.extend_from_slice(&chunk[..n]);
        anyhow::ensure!(buf.len() <= 16 << 20, "export too large");
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .context("no content-length")?
            .trim()
            .parse()?;
        if buf.len() >= end + 4 + len {
            conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
            )
            .await?;
            return Ok(buf[end + 4..end + 4 + len].to_vec());
        }
    }
}

/// The spans of an OTLP/JSON `ExportTraceServiceRequest`.
fn parse_otlp(body: &[u8]) -> Vec<CollectedSpan> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let empty = Vec::new();
    let list = |v: &serde_json::Value, k: &str| v[k].as_array().unwrap_or(&empty).clone();
    for rs in list(&v, "resourceSpans") {
        let service = list(&rs["resource"], "attributes")
            .iter()
            .find(|a| a["key"] == "service.name")
            .and_then(|a| a["value"]["stringValue"].as_str().map(str::to_string))
            .unwrap_or_default();
        for ss in list(&rs, "scopeSpans") {
            for s in list(&ss, "spans") {
                let text = |k: &str| s[k].as_str().unwrap_or_default().to_string();
                out.push(CollectedSpan {
                    service: service.clone(),
                    name: text("name"),
                    trace_id: text("traceId"),
                    span_id: text("spanId"),
                    parent_span_id: text("parentSpanId"),
                    kind: s["kind"].as_u64().unwrap_or(0),
                    status: s["status"]["code"].as_u64().unwrap_or(0),
                    attributes: list(&s, "attributes")
                        .iter()
                        .filter_map(|a| {
                            let value = a["value"].as_object()?.values().next()?.clone();
                            Some((a["key"].as_str()?.to_string(), value))
                        })
                        .collect(),
                });
            }
        }
    }
    out
}

/// A binary of this workspace (`skein`, `skein-node`), built next to the test binaries by
/// `cargo build --workspace --all-targets --locked` (`scripts/test` does that first).
pub fn workspace_exe(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| anyhow::anyhow!("no target directory above {}", exe.display()))?;
    let bin = dir.join(name);
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --all-targets --locked` first (scripts/test does)",
        bin.display()
    );
    Ok(bin)
}

/// `skein --profile PROFILE ARGS --output json` as a fresh process; its JSON answer.
pub async fn skein_json(
    exe: &std::path::Path,
    profile: &std::path::Path,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--profile")
        .arg(profile)
        .args(args)
        .args(["--output", "json"]);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    anyhow::ensure!(
        out.status.success(),
        "skein {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A `skein-node` process (the real binary, its own flags) and what its log said when it
/// started serving.
pub struct RealNode {
    _child: KillOnDrop,
    /// Its node id.
    pub node_id: String,
    /// Where it serves `/metrics` (its config must set `metrics_listen`).
    pub metrics: std::net::SocketAddr,
    /// Its HTTP ingress (`--http`), when it runs one.
    pub http: Option<String>,
    /// Its artifact cache directory.
    pub cache: PathBuf,
}

impl RealNode {
    /// Start `skein-node --config <config> ARGS` (JSON logs), inside network namespace `ns`
    /// when given; returns once it logs `node serving`. Its log lines about artifacts and
    /// chunks are copied to the test's output; the rest is drained.
    pub async fn spawn_in(
        ns: Option<&str>,
        cfg: &NodeConfig,
        args: &[&str],
    ) -> anyhow::Result<RealNode> {
        use std::io::BufRead;
        let config_path = write_config(&cfg.data_dir, "node.toml", cfg)?;
        let exe = workspace_exe("skein-node")?;
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => std::process::Command::new(&exe),
        };
        let mut child = cmd
            .arg("--config")
            .arg(&config_path)
            .args(["--no-mdns", "--log-format", "json", "--log", "info"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting skein-node")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let child = KillOnDrop(child);
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Read the log until the node serves; keep draining it so the node never blocks.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let message = v["fields"]["message"].as_str().unwrap_or_default();
                if message.contains("artifact") || message.contains("chunk") {
                    eprintln!("{line}");
                }
                if message == "node serving" {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(v["fields"].clone());
                    }
                }
            }
        });
        let serving = tokio::time::timeout(Duration::from_secs(120), rx)
            .await
            .map_err(|_| anyhow::anyhow!("skein-node did not log `node serving` in 120 s"))??;
        let node_id = serving["node_id"]
            .as_str()
            .context("node_id in the log")?
            .to_string();
        let metrics = logged_addr(&serving["metrics"])
            .context("metrics address in the log")?
            .parse()?;
        Ok(RealNode {
            _child: child,
            node_id,
            metrics,
            http: logged_addr(&serving["http"]),
            cache: cfg.data_dir.join("cache"),
        })
    }
}

/// An optional address as the node logs it: `Some(ADDR:PORT)`.
fn logged_addr(v: &serde_json::Value) -> Option<String> {
    let s = v.as_str()?;
    Some(s.strip_prefix("Some(")?.strip_suffix(')')?.to_string())
}

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
