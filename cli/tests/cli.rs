//! The `skein` CLI as users run it: the built binary against a real mesh (`skein up` in a
//! child process: an embedded coordinator, local tract nodes and the HTTP gateway, on `:0`
//! ports, in a private HOME), every verb and flag checked through `--output json`, and bad
//! input checked for a clear error and a non-zero exit.
//!
//! One mesh per area (the tests run in parallel): deploy and scale settings with placement,
//! scale to zero, traffic/route/infer/bench, and tenants/keys/usage/audit/join tokens.

// Synchronous tests that wait on other processes: wall-clock time (no tokio here).
#![allow(clippy::disallowed_types)]

mod common;

use common::{node_bin, repo, Proc};

use assert_cmd::Command;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest one CLI call may take (a bench or a deploy included).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A `skein up` in a child process with a private HOME, killed on drop.
struct Mesh {
    child: Child,
    dir: tempfile::TempDir,
    /// The HTTP gateway's address.
    http: String,
}

impl Mesh {
    /// `skein up --nodes N` on `:0` ports with tract nodes and no bundled models, once it
    /// says it is up.
    fn start(nodes: usize) -> Mesh {
        Self::start_with(nodes, &["--backend", "tract"])
    }

    /// `skein up --nodes N` on `:0` ports with no bundled models and the backend flags
    /// `backend`, once it says it is up.
    fn start_with(nodes: usize, backend: &[&str]) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["home", "config", "data"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("mkdir");
        }
        let log = std::fs::File::create(dir.path().join("up.log")).expect("log file");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_skein"))
            .args(["up", "--nodes", &nodes.to_string()])
            .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .args(backend)
            .arg("--no-models")
            .arg("--data-dir")
            .arg(dir.path().join("up"))
            .env_clear()
            .envs(Self::env_of(dir.path()))
            .current_dir(repo())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawning skein up");
        let stdout = child.stdout.take().expect("stdout");
        // Bounded; once the mesh is up the receiver is gone, sends fail, and the thread
        // only drains the pipe.
        let (tx, rx) = mpsc::sync_channel(64);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Nobody listens once the mesh is up: keep draining so the child never blocks.
                let _ = tx.send(line);
            }
        });
        let mut mesh = Mesh {
            child,
            dir,
            http: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("KServe V2 HTTP gateway on http://") {
                        mesh.http = rest.split_whitespace().next().unwrap_or("").to_string();
                    }
                    let done = line.starts_with("Press Ctrl-C to stop.");
                    seen.push(line);
                    if done {
                        break;
                    }
                }
                Err(_) => panic!(
                    "skein up did not come up in 120 s; stdout so far:\n{}\nstderr:\n{}",
                    seen.join("\n"),
                    mesh.log()
                ),
            }
        }
        assert!(
            !mesh.http.is_empty(),
            "no gateway address in: {}",
            seen.join("\n")
        );
        assert!(mesh.profile().is_file(), "skein up wrote no profile");
        mesh
    }

    /// The private environment of every process of this mesh: HOME, XDG dirs and the profile.
    fn env_of(dir: &Path) -> Vec<(String, String)> {
        let p = |s: &str| dir.join(s).to_string_lossy().into_owned();
        vec![
            ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
            ("HOME".into(), p("home")),
            ("XDG_CONFIG_HOME".into(), p("config")),
            ("XDG_DATA_HOME".into(), p("data")),
            ("SKEIN_PROFILE".into(), p("profile.toml")),
        ]
    }

    fn profile(&self) -> PathBuf {
        self.dir.path().join("profile.toml")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }

    /// `skein` with this mesh's environment, run from the repository root.
    fn skein(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_skein"));
        c.env_clear()
            .envs(Self::env_of(self.dir.path()))
            .current_dir(repo())
            .timeout(CALL_TIMEOUT);
        c
    }

    /// Run `skein ARGS` (with `extra` environment), which must succeed; its stdout.
    fn ok_env(&self, args: &[&str], extra: &[(&str, &str)]) -> String {
        let mut c = self.skein();
        c.args(args);
        for (k, v) in extra {
            c.env(k, v);
        }
        let out = c.output().expect("running skein");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(
            out.status.success(),
            "`skein {}` failed ({}):\n{stderr}{stdout}",
            args.join(" "),
            out.status
        );
        stdout
    }

    fn ok(&self, args: &[&str]) -> String {
        self.ok_env(args, &[])
    }

    /// Run `skein ARGS --output json`; the JSON it prints.
    fn json_env(&self, args: &[&str], extra: &[(&str, &str)]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let out = self.ok_env(&a, extra);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("`skein {}` printed no JSON ({e}):\n{out}", a.join(" ")))
    }

    fn json(&self, args: &[&str]) -> Value {
        self.json_env(args, &[])
    }

    /// Run `skein ARGS`, which must fail with a non-zero exit and an `error:` line on stderr
    /// that contains every one of `says`; its stderr.
    fn fails_env(&self, args: &[&str], extra: &[(&str, &str)], says: &[&str]) -> String {
        let mut c = self.skein();
        c.args(args);
        for (k, v) in extra {
            c.env(k, v);
        }
        let out = c.output().expect("running skein");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "`skein {}` succeeded but must fail; stdout:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            matches!(out.status.code(), Some(1 | 2)),
            "`skein {}` exited with {} (expected 1, or 2 for a usage error)",
            args.join(" "),
            out.status
        );
        assert!(
            stderr.contains("error:"),
            "`skein {}`: no error line:\n{stderr}",
            args.join(" ")
        );
        for s in says {
            assert!(
                stderr.contains(s),
                "`skein {}`: the error does not say `{s}`:\n{stderr}",
                args.join(" ")
            );
        }
        stderr
    }

    fn fails(&self, args: &[&str], says: &[&str]) -> String {
        self.fails_env(args, &[], says)
    }

    /// The registry's entry for `name` (the latest version when several: the highest number).
    fn model(&self, name: &str) -> Option<Value> {
        self.json(&["models"])
            .as_array()
            .expect("models is an array")
            .iter()
            .filter(|m| m["name"] == name)
            .max_by_key(|m| {
                let v = m["version"].as_str().unwrap_or("");
                (v.len(), v.to_string())
            })
            .cloned()
    }

    /// The registry's entry for `name` at `version`.
    fn model_v(&self, name: &str, version: &str) -> Option<Value> {
        self.json(&["models"])
            .as_array()
            .expect("models is an array")
            .iter()
            .find(|m| m["name"] == name && m["version"] == version)
            .cloned()
    }

    /// `skein nodes` data.
    fn nodes(&self) -> Vec<Value> {
        self.json(&["nodes"])
            .as_array()
            .expect("nodes is an array")
            .clone()
    }

    /// Whether any node reports a replica of `name`@`version` beyond `cached` (which every
    /// node shows for every model it was told about, loaded or not): fetching, loading,
    /// loaded or failed.
    fn held_anywhere(&self, name: &str, version: &str) -> bool {
        self.nodes().iter().any(|n| {
            n["models"].as_array().is_some_and(|ms| {
                ms.iter()
                    .any(|m| m["name"] == name && m["version"] == version && m["state"] != "cached")
            })
        })
    }

    /// Whether any local node's artifact cache holds (part of) the artifact `sha256`.
    fn artifact_on_a_node(&self, sha256: &str) -> bool {
        let nodes = self.dir.path().join("up").join("nodes");
        let Ok(dirs) = std::fs::read_dir(&nodes) else {
            panic!("no node directories in {}", nodes.display())
        };
        dirs.flatten().any(|node| {
            std::fs::read_dir(node.path().join("cache")).is_ok_and(|files| {
                files
                    .flatten()
                    .any(|f| f.file_name().to_string_lossy().starts_with(sha256))
            })
        })
    }

    /// Poll `f` every 100 ms until it gives a value, for at most `within`.
    fn until<T>(&self, what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting for {what}; mesh log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until `name` has a warm replica.
    fn wait_warm(&self, name: &str) {
        self.until(
            &format!("{name} to be warm"),
            Duration::from_secs(60),
            || {
                self.model(name)
                    .filter(|m| m["warm_replicas"].as_u64() >= Some(1))
            },
        );
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- skein up stderr ---\n{}", self.log());
        }
    }
}

const CLS: &str = "models/ppocr_cls/model.onnx";
const CLS_INPUT: &str = "x=models/ppocr_cls/cases/single/input_0.npy";

fn settings(m: &Value) -> &Value {
    &m["settings"]
}

/// Every settings flag of `deploy` and `scale` shows in the JSON; impossible placement
/// constraints (`--region`, `--device-class`, `--accelerator gpu` with no such node) keep the
/// model off every node, and lifting them lets it be placed; bad input is refused clearly.
#[test]
fn deploy_and_scale_settings_reach_the_deployment() {
    let mesh = Mesh::start(1);

    // Every flag at once, against the defaults of a plain deploy.
    let plain = mesh.json(&["deploy", CLS, "--name", "cls_plain"]);
    assert_eq!(plain["version"], "1");
    let d = settings(&plain);
    assert_eq!(d["idle_timeout_ms"], 300_000, "{d}");
    assert_eq!(d["max_batch_size"], 1, "{d}");
    assert_eq!(d["timeout_ms"], 30_000, "{d}");
    assert_eq!(d["shared"], false, "{d}");
    assert_eq!(d["accelerator"], "any", "{d}");

    let all = [
        "deploy",
        CLS,
        "--name",
        "cls_all",
        "--version",
        "7",
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
        "mars",
        "--region",
        "venus",
        "--device-class",
        "gpu",
        "--shared",
        "true",
        "--accelerator",
        "gpu",
    ];
    let deployed = mesh.json(&all);
    let listed = mesh.model("cls_all").expect("cls_all is listed");
    for m in [&deployed, &listed] {
        assert_eq!(m["version"], "7", "{m}");
        let s = settings(m);
        assert_eq!(s["min_replicas"], 1, "{s}");
        assert_eq!(s["max_replicas"], 3, "{s}");
        assert_eq!(s["idle_timeout_ms"], 2000, "{s}");
        assert_eq!(s["max_concurrency"], 4, "{s}");
        assert_eq!(s["max_batch_size"], 8, "{s}");
        assert_eq!(s["max_queue_delay_us"], 2000, "{s}");
        assert_eq!(s["memory_estimate"], 64 << 20, "{s}");
        assert_eq!(s["timeout_ms"], 5000, "{s}");
        assert_eq!(s["regions"], serde_json::json!(["mars", "venus"]), "{s}");
        assert_eq!(s["device_class"], "gpu", "{s}");
        assert_eq!(s["shared"], true, "{s}");
        assert_eq!(s["accelerator"], "gpu", "{s}");
    }
    // The table output says the same thing in words.
    let table = mesh.ok(&["deploy", CLS, "--name", "cls_all", "--version", "8"]);
    assert!(table.contains("deployed cls_all version 8"), "{table}");

    // One constraint at a time, each with a replica wanted: none may ever be placed, nor its
    // artifact even stored on the node (which has no region or device class label and runs
    // tract). A control model deployed after them (another file, so that no node has the
    // bytes of ppocr_cls for its sake) is placed: once it is warm, the scaler has had its
    // chance at them too.
    for (name, flags) in [
        ("cls_region", ["--region", "mars"]),
        ("cls_class", ["--device-class", "gpu"]),
        ("cls_gpu", ["--accelerator", "gpu"]),
    ] {
        let mut a = vec!["deploy", CLS, "--name", name, "--min-replicas", "1"];
        a.extend(flags);
        mesh.json(&a);
    }
    mesh.json(&[
        "deploy",
        "models/silero_vad/model.onnx",
        "--name",
        "vad_ctl",
        "--min-replicas",
        "1",
    ]);
    mesh.wait_warm("vad_ctl");
    for (name, version, says) in [
        ("cls_region", "1", "a region in [mars]"),
        ("cls_class", "1", "device class `gpu`"),
        ("cls_gpu", "1", "a GPU backend"),
        ("cls_all", "7", "a region in [mars, venus]"),
    ] {
        let m = mesh.model_v(name, version).expect("listed");
        assert_eq!(m["warm_replicas"], 0, "{name} was placed: {m}");
        assert_eq!(m["loading_replicas"], 0, "{name} was placed: {m}");
        assert_eq!(m["loaded_on"], serde_json::json!([]), "{name}: {m}");
        assert!(
            !mesh.held_anywhere(name, version),
            "a node holds {name}: {:#}",
            Value::Array(mesh.nodes())
        );
        // A call is refused, never served elsewhere.
        mesh.fails(
            &["infer", name, "--version", version, "-i", CLS_INPUT],
            &["no_capacity", "no capable node", says],
        );
    }
    for (name, version) in [
        ("cls_region", "1"),
        ("cls_class", "1"),
        ("cls_gpu", "1"),
        ("cls_all", "7"),
    ] {
        assert!(!mesh.held_anywhere(name, version), "a call placed {name}");
    }
    // Not a byte of it reached the node (data residency).
    let sha = plain["sha256"].as_str().expect("sha256");
    assert!(
        !mesh.artifact_on_a_node(sha),
        "the artifact of models restricted away from the node is in its cache"
    );

    // `scale`: every flag shows; the region lifted, the model is placed.
    let scaled = mesh.json(&[
        "scale",
        "cls_region",
        "--min-replicas",
        "1",
        "--max-replicas",
        "2",
        "--idle-timeout",
        "10m",
        "--max-concurrency",
        "2",
        "--max-batch-size",
        "4",
        "--max-queue-delay",
        "1.5ms",
        "--memory-estimate",
        "256Mi",
        "--timeout",
        "1m",
        "--region",
        "",
        "--device-class",
        "",
        "--shared",
        "true",
        "--accelerator",
        "prefer-gpu",
    ]);
    let s = settings(&scaled);
    assert_eq!(s["min_replicas"], 1, "{s}");
    assert_eq!(s["max_replicas"], 2, "{s}");
    assert_eq!(s["idle_timeout_ms"], 600_000, "{s}");
    assert_eq!(s["max_concurrency"], 2, "{s}");
    assert_eq!(s["max_batch_size"], 4, "{s}");
    assert_eq!(s["max_queue_delay_us"], 1500, "{s}");
    assert_eq!(s["memory_estimate"], 256u64 << 20, "{s}");
    assert_eq!(s["timeout_ms"], 60_000, "{s}");
    assert_eq!(s["regions"], serde_json::json!([]), "{s}");
    assert_eq!(s["device_class"], "", "{s}");
    assert_eq!(s["shared"], true, "{s}");
    assert_eq!(s["accelerator"], "prefer-gpu", "{s}");
    assert_eq!(
        settings(&mesh.model("cls_region").expect("listed")),
        s,
        "`skein models` shows what `scale` answered"
    );
    mesh.wait_warm("cls_region");
    assert!(
        mesh.artifact_on_a_node(sha),
        "the cache check sees a placed model's artifact"
    );
    // Only the flags given change.
    let s2 = mesh.json(&["scale", "cls_region", "--max-batch-size", "2"]);
    assert_eq!(settings(&s2)["max_batch_size"], 2);
    assert_eq!(settings(&s2)["idle_timeout_ms"], 600_000);
    assert_eq!(settings(&s2)["accelerator"], "prefer-gpu");
    // `--version` scales that version, not the latest (8).
    let v7 = mesh.json(&[
        "scale",
        "cls_all",
        "--version",
        "7",
        "--max-batch-size",
        "16",
    ]);
    assert_eq!(
        (&v7["version"], &settings(&v7)["max_batch_size"]),
        (&"7".into(), &16.into())
    );
    let v8 = mesh.json(&["scale", "cls_all", "--max-batch-size", "32"]);
    assert_eq!(
        (&v8["version"], &settings(&v8)["max_batch_size"]),
        (&"8".into(), &32.into())
    );
    let table = mesh.ok(&["scale", "cls_all", "--version", "7"]);
    assert!(
        table.contains("cls_all version 7") && table.contains("max_batch_size: 16"),
        "{table}"
    );

    // Bad input: a clear error, a non-zero exit, and nothing deployed.
    mesh.fails(
        &[
            "deploy",
            CLS,
            "--name",
            "bad1",
            "--min-replicas",
            "3",
            "--max-replicas",
            "2",
        ],
        &["min_replicas (3) exceeds max_replicas (2)"],
    );
    mesh.fails(
        &["deploy", CLS, "--name", "bad2", "--max-batch-size", "0"],
        &["max_batch_size must be 1..=1024"],
    );
    mesh.fails(
        &["deploy", CLS, "--name", "bad3", "--region", "no spaces"],
        &["region `no spaces` is not a label"],
    );
    mesh.fails(
        &["deploy", CLS, "--name", "bad4", "--idle-timeout", "soon"],
        &["--idle-timeout", "not a duration"],
    );
    mesh.fails(
        &["deploy", CLS, "--name", "bad5", "--idle-timeout", "2d"],
        &["unknown unit `d`"],
    );
    mesh.fails(
        &["deploy", CLS, "--name", "bad6", "--memory-estimate", "12Q"],
        &["--memory-estimate", "not a size"],
    );
    mesh.fails(
        &["deploy", CLS, "--name", "bad7", "--accelerator", "tpu"],
        &["--accelerator", "expected any, prefer-gpu or gpu"],
    );
    mesh.fails(
        &["deploy", CLS, "--name", "bad8", "--shared", "maybe"],
        &["--shared"],
    );
    mesh.fails(
        &["deploy", "models/nothing/here.onnx", "--name", "bad9"],
        &["reading models/nothing/here.onnx"],
    );
    mesh.fails(&["deploy", CLS, "--name", "bad name"], &["malformed"]);
    mesh.fails(
        &["deploy", "Cargo.toml", "--name", "bad10"],
        &["invalid_model"],
    );
    mesh.fails(&["deploy", CLS], &["--name"]);
    let names: Vec<String> = mesh
        .json(&["models"])
        .as_array()
        .expect("array")
        .iter()
        .map(|m| m["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("bad")),
        "a refused deploy is listed: {names:?}"
    );
    mesh.fails(
        &["scale", "no_such_model", "--min-replicas", "1"],
        &["scaling `no_such_model`", "unknown_model"],
    );
    mesh.fails(
        &["scale", "cls_all", "--version", "99", "--min-replicas", "1"],
        &["unknown_version"],
    );
    mesh.fails(
        &["scale", "cls_all", "--max-batch-size", "0"],
        &["max_batch_size must be 1..=1024"],
    );
}

/// The issue's own case: `--min-replicas 0 --idle-timeout 2s` shows `idle_timeout_ms: 2000`
/// and the model scales to zero within a few seconds of its last call.
#[test]
fn an_idle_model_scales_to_zero_after_its_idle_timeout() {
    let mesh = Mesh::start(1);
    mesh.json(&[
        "deploy",
        CLS,
        "--name",
        "cls_idle",
        "--min-replicas",
        "0",
        "--idle-timeout",
        "2s",
    ]);
    let m = mesh.model("cls_idle").expect("listed");
    assert_eq!(settings(&m)["idle_timeout_ms"], 2000, "{m}");
    assert_eq!(settings(&m)["min_replicas"], 0, "{m}");

    let r = mesh.json(&["infer", "cls_idle", "-i", CLS_INPUT]);
    assert_eq!(r["metadata"]["cold_start"], true, "{r}");
    let last_call = Instant::now();
    let mut seen_warm = false;
    mesh.until("cls_idle to scale to zero", Duration::from_secs(12), || {
        let m = mesh.model("cls_idle")?;
        if m["warm_replicas"].as_u64() >= Some(1) {
            seen_warm = true;
        }
        let gone = m["warm_replicas"] == 0
            && m["loading_replicas"] == 0
            && m["loaded_on"] == serde_json::json!([]);
        gone.then_some(())
    });
    let idle = last_call.elapsed();
    assert!(seen_warm, "the replica never showed as warm");
    assert!(
        idle >= Duration::from_millis(1500),
        "unloaded {idle:?} after the last call, before the 2 s idle timeout"
    );
    assert!(
        idle <= Duration::from_secs(8),
        "unloaded only {idle:?} after the last call (idle timeout 2 s)"
    );
    // Scaled to zero, it still answers: the next call is a cold start again.
    let r = mesh.json(&["infer", "cls_idle", "-i", CLS_INPUT]);
    assert_eq!(r["metadata"]["cold_start"], true, "{r}");
}

/// `traffic`, `route`, `infer` and `bench`, every flag, on two nodes.
#[test]
fn traffic_route_infer_and_bench() {
    let mesh = Mesh::start(2);
    let v1 = mesh.json(&["deploy", CLS, "--name", "cls", "--min-replicas", "1"]);
    let v2 = mesh.json(&["deploy", CLS, "--name", "cls", "--min-replicas", "1"]);
    assert_eq!((&v1["version"], &v2["version"]), (&"1".into(), &"2".into()));
    mesh.json(&["deploy", "models/silero_vad/model.onnx", "--name", "vad"]);

    // traffic: none, set, show, clear; bad input.
    assert_eq!(mesh.json(&["traffic", "cls"]), serde_json::json!([]));
    let want = serde_json::json!([{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]);
    assert_eq!(mesh.json(&["traffic", "cls", "1=90", "2=10"]), want);
    assert_eq!(mesh.json(&["traffic", "cls"]), want);
    let table = mesh.ok(&["traffic", "cls"]);
    assert!(
        table.contains("90.0 %") && table.contains("10.0 %"),
        "{table}"
    );
    // The split is in force: `route` without a version ranks the heaviest, version 1.
    assert_eq!(mesh.json(&["route", "cls"])["version"], "1");
    assert_eq!(
        mesh.json(&["traffic", "cls", "--clear"]),
        serde_json::json!([])
    );
    assert_eq!(mesh.json(&["traffic", "cls"]), serde_json::json!([]));
    assert_eq!(mesh.json(&["route", "cls"])["version"], "2");
    mesh.fails(&["traffic", "cls", "3=10"], &["unknown_version"]);
    mesh.fails(&["traffic", "cls", "1=0", "2=0"], &["malformed"]);
    mesh.fails(
        &["traffic", "cls", "1=x"],
        &["`x` in `1=x` is not a whole number"],
    );
    mesh.fails(&["traffic", "cls", "1"], &["is not VERSION=WEIGHT"]);
    mesh.fails(&["traffic", "cls", "1=5", "--clear"], &["--clear"]);
    mesh.fails(&["traffic", "nope", "1=5"], &["unknown_model"]);

    // route: --version, --near, --payload-bytes, --region/--zone; every node ranked.
    mesh.wait_warm("cls");
    let nodes: Vec<String> = mesh
        .nodes()
        .iter()
        .map(|n| n["node_id"].as_str().expect("node_id").to_string())
        .collect();
    assert_eq!(nodes.len(), 2);
    let r = mesh.json(&["route", "cls", "--version", "1"]);
    assert_eq!((&r["model"], &r["version"]), (&"cls".into(), &"1".into()));
    let cands = r["candidates"].as_array().expect("candidates");
    assert_eq!(cands.len(), 2, "{r}");
    assert!(
        cands.iter().all(|c| c["parts"]["transfer_us"] == 0.0),
        "{r}"
    );
    let r = mesh.json(&["route", "cls", "--payload-bytes", "100000000"]);
    assert!(
        r["candidates"]
            .as_array()
            .expect("candidates")
            .iter()
            .all(|c| c["parts"]["transfer_us"].as_f64() > Some(0.0)),
        "100 MB to move costs transfer time: {r}"
    );
    for near in &nodes {
        let r = mesh.json(&["route", "cls", "--near", near]);
        let c = r["candidates"]
            .as_array()
            .expect("candidates")
            .iter()
            .find(|c| c["node_id"] == near.as_str())
            .cloned()
            .expect("the near node is a candidate");
        assert_eq!(c["parts"]["rtt_us"], 0.0, "ranked from {near}: {r}");
    }
    let r = mesh.json(&[
        "route",
        "cls",
        "--region",
        "eu-west",
        "--zone",
        "eu-west-1b",
    ]);
    assert_eq!(r["candidates"].as_array().map(Vec::len), Some(2), "{r}");
    let table = mesh.ok(&["route", "cls"]);
    assert!(
        table.contains("RANK") && table.contains("EXPECTED"),
        "{table}"
    );
    mesh.fails(
        &["route", "nope"],
        &["ranking nodes for `nope`", "unknown_model"],
    );
    mesh.fails(&["route", "cls", "--version", "9"], &["unknown_version"]);
    mesh.fails(
        &["route", "cls", "--payload-bytes", "lots"],
        &["--payload-bytes"],
    );

    // infer: .npy and literal inputs, --version, --want, --save-dir, --timeout.
    let expected = std::fs::read(repo().join("models/ppocr_cls/cases/single/output_0.npy"))
        .expect("reference output");
    let expected = skein_proto::npy::decode("y", &expected).expect("npy");
    let expected = expected.as_f32_vec().expect("fp32");
    let save = tempfile::tempdir().expect("tempdir");
    let save_dir = save.path().join("out");
    let r = mesh.json(&[
        "infer",
        "cls",
        "--version",
        "1",
        "-i",
        CLS_INPUT,
        "--save-dir",
        save_dir.to_str().expect("utf-8"),
        "--timeout",
        "30s",
    ]);
    assert_eq!((&r["model"], &r["version"]), (&"cls".into(), &"1".into()));
    let outs = r["outputs"].as_object().expect("outputs");
    assert_eq!(outs.len(), 1, "{r}");
    let (out_name, out) = outs.iter().next().expect("one output");
    let got: Vec<f64> = out["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect();
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert!((g - f64::from(*e)).abs() < 1e-4, "{got:?} vs {expected:?}");
    }
    assert!(nodes.contains(&r["metadata"]["node"].as_str().unwrap_or("").to_string()));
    let saved =
        std::fs::read(save_dir.join("output_0.npy")).expect("--save-dir wrote output_0.npy");
    let saved = skein_proto::npy::decode("y", &saved).expect("a .npy file");
    assert_eq!(saved.as_f32_vec().expect("fp32").len(), expected.len());
    assert_eq!(
        mesh.json(&["infer", "cls", "--version", "2", "-i", CLS_INPUT])["version"],
        "2"
    );
    let r = mesh.json(&["infer", "cls", "-i", CLS_INPUT, "--want", out_name]);
    assert_eq!(r["outputs"].as_object().map(|o| o.len()), Some(1));
    mesh.fails(
        &["infer", "cls", "-i", CLS_INPUT, "--want", "no_such_output"],
        &["invalid_input"],
    );
    // Literal inputs (a rank-0 scalar among them) with two .npy files.
    let vad = "models/silero_vad/cases/stream_step0";
    let r = mesh.json(&[
        "infer",
        "vad",
        "-i",
        &format!("input={vad}/input_0.npy"),
        "-i",
        &format!("state={vad}/input_1.npy"),
        "-i",
        "sr=int64:16000",
    ]);
    assert_eq!(r["outputs"].as_object().map(|o| o.len()), Some(2), "{r}");
    // --timeout: a cold load cannot finish in 1 ms.
    mesh.json(&["deploy", CLS, "--name", "cls_cold"]);
    mesh.fails(
        &["infer", "cls_cold", "-i", CLS_INPUT, "--timeout", "1ms"],
        &["no answer within 1ms"],
    );
    let table = mesh.ok(&["infer", "cls", "-i", CLS_INPUT]);
    assert!(
        table.contains("OUTPUT") && table.contains("cold_start"),
        "{table}"
    );
    mesh.fails(&["infer", "cls"], &["--input"]);
    mesh.fails(
        &["infer", "cls", "-i", "x=missing.npy"],
        &["reading missing.npy"],
    );
    mesh.fails(&["infer", "cls", "-i", "x=fp32:1,2,3@2x2"], &["error:"]);
    mesh.fails(
        &["infer", "cls", "-i", "noequals"],
        &["is not NAME=FILE.npy"],
    );
    mesh.fails(
        &["infer", "nope", "-i", CLS_INPUT],
        &["running `nope`", "unknown_model"],
    );
    mesh.fails(
        &["infer", "cls", "-i", CLS_INPUT, "--timeout", "soon"],
        &["--timeout"],
    );

    // bench: the mesh, in-process and HTTP halves, --version, --no-inprocess, --cold-starts.
    let b = mesh.json(&[
        "bench",
        "cls",
        "-i",
        CLS_INPUT,
        "--version",
        "1",
        "--concurrency",
        "2",
        "--duration",
        "400ms",
        "--warmup",
        "0s",
        "--http",
        &mesh.http,
    ]);
    assert_eq!(
        (&b["version"], &b["concurrency"]),
        (&"1".into(), &2.into()),
        "{b}"
    );
    assert!(b["requests"].as_u64() > Some(0) && b["errors"] == 0, "{b}");
    assert!(
        b["duration_s"]
            .as_f64()
            .is_some_and(|d| (0.35..5.0).contains(&d)),
        "{b}"
    );
    assert!(b["inprocess_p50_us"].as_u64() > Some(0), "{b}");
    for h in ["http_json", "http_binary"] {
        assert!(
            b[h]["requests"].as_u64() > Some(0) && b[h]["errors"] == 0,
            "{h}: {b}"
        );
    }
    let b = mesh.json(&[
        "bench",
        "cls",
        "-i",
        CLS_INPUT,
        "--duration",
        "200ms",
        "--warmup",
        "100ms",
        "--no-inprocess",
    ]);
    assert_eq!(b["version"], "2", "{b}");
    assert!(
        b["inprocess_p50_us"].is_null() && b["http_json"].is_null(),
        "{b}"
    );
    let b = mesh.json(&[
        "bench",
        "cls",
        "-i",
        CLS_INPUT,
        "--version",
        "1",
        "--cold-starts",
        "1",
    ]);
    assert_eq!(
        (&b["cold_starts"], &b["all_marked_cold"]),
        (&1.into(), &true.into()),
        "{b}"
    );
    assert_eq!(b["version"], "1", "{b}");
    // The model's settings are put back after the cold starts.
    let v1 = mesh.model_v("cls", "1").expect("listed");
    assert_eq!(
        (
            &settings(&v1)["min_replicas"],
            &settings(&v1)["idle_timeout_ms"]
        ),
        (&1.into(), &300_000.into())
    );
    mesh.fails(
        &["bench", "cls", "-i", CLS_INPUT, "--concurrency", "0"],
        &["--concurrency must be 1..=1024"],
    );
    mesh.fails(
        &[
            "bench",
            "cls",
            "-i",
            CLS_INPUT,
            "--cold-starts",
            "1",
            "--http",
            &mesh.http,
        ],
        &["--cold-starts", "--http"],
    );
    mesh.fails(
        &[
            "bench",
            "cls",
            "-i",
            CLS_INPUT,
            "--cold-starts",
            "1",
            "--duration",
            "1s",
        ],
        &["--duration"],
    );
    mesh.fails(
        &["bench", "cls", "-i", CLS_INPUT, "--http", "nowhere"],
        &["--http"],
    );
}

/// `tenants`, `keys`, `whoami`, `usage`, `audit`, `join-token`, `rotate-ticket-key` and
/// `revoke-node`, every flag.
#[test]
fn tenants_keys_usage_audit_and_join_tokens() {
    let mesh = Mesh::start(1);
    let tenant = |name: &str| -> Value {
        mesh.json(&["tenants", "list"])
            .as_array()
            .expect("array")
            .iter()
            .find(|t| t["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };

    // tenants: create with a quota, replace it; errors.
    let out = mesh.ok(&[
        "tenants",
        "create",
        "acme",
        "--max-rps",
        "50",
        "--max-concurrent",
        "8",
        "--monthly-compute",
        "10h",
    ]);
    assert!(out.contains("acme"), "{out}");
    assert_eq!(
        tenant("acme")["quota"],
        serde_json::json!({"max_rps": 50, "max_concurrent": 8, "monthly_compute_us": 36_000_000_000u64, "offline_validity_ms": null})
    );
    mesh.ok(&[
        "tenants",
        "quota",
        "acme",
        "--max-rps",
        "7",
        "--offline-validity",
        "90s",
    ]);
    assert_eq!(
        tenant("acme")["quota"],
        serde_json::json!({"max_rps": 7, "max_concurrent": null, "monthly_compute_us": null, "offline_validity_ms": 90_000}),
        "`quota` replaces the whole quota"
    );
    mesh.ok(&["tenants", "quota", "acme", "--max-rps", "7"]);
    assert_eq!(
        tenant("acme")["quota"]["offline_validity_ms"],
        Value::Null,
        "an omitted offline validity goes back to the default"
    );
    mesh.ok(&[
        "tenants",
        "quota",
        "acme",
        "--max-concurrent",
        "3",
        "--monthly-compute",
        "90m",
    ]);
    assert_eq!(
        tenant("acme")["quota"],
        serde_json::json!({"max_rps": null, "max_concurrent": 3, "monthly_compute_us": 5_400_000_000u64, "offline_validity_ms": null})
    );
    mesh.ok(&["tenants", "quota", "acme"]);
    mesh.fails(&["tenants", "create", "acme"], &["conflict"]);
    mesh.fails(&["tenants", "create", "Bad Name"], &["malformed"]);
    mesh.fails(
        &["tenants", "quota", "nobody", "--max-rps", "1"],
        &["not_found"],
    );
    mesh.fails(
        &["tenants", "create", "x", "--max-rps", "many"],
        &["--max-rps"],
    );
    mesh.fails(
        &["tenants", "create", "x", "--monthly-compute", "lots"],
        &["--monthly-compute"],
    );

    // keys: create (--tenant, --scope, --label), list (--tenant), revoke.
    let k = mesh.json(&[
        "keys", "create", "--tenant", "acme", "--scope", "deploy", "--scope", "invoke", "--label",
        "ci",
    ]);
    assert_eq!(k["tenant"], "acme");
    assert_eq!(k["scopes"], serde_json::json!(["deploy", "invoke"]));
    let key = k["key"].as_str().expect("key").to_string();
    let id = k["id"].as_str().expect("id").to_string();
    assert!(key.starts_with(&format!("skn_{id}_")), "{key}");
    let table_key = mesh.ok(&[
        "keys",
        "create",
        "--tenant",
        "acme",
        "--scope",
        "read-usage",
    ]);
    let reader = table_key.trim().to_string();
    assert!(
        reader.starts_with("skn_"),
        "the table output is the key alone: {table_key}"
    );
    let listed = mesh.json(&["keys", "list", "--tenant", "acme"]);
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().all(|k| k["tenant"] == "acme"));
    let mine = listed
        .iter()
        .find(|k| k["id"] == id.as_str())
        .expect("listed");
    assert_eq!(mine["label"], "ci");
    assert!(mine["revoked_ms"].is_null());
    assert!(
        !mesh
            .ok(&["keys", "list", "--output", "json"])
            .contains(&key),
        "never a secret"
    );
    let all = mesh.json(&["keys", "list"]);
    assert!(all
        .as_array()
        .expect("array")
        .iter()
        .any(|k| k["tenant"] == "root"));
    mesh.fails(&["keys", "create", "--tenant", "acme"], &["--scope"]);
    mesh.fails(
        &["keys", "create", "--tenant", "acme", "--scope", "god"],
        &["malformed"],
    );
    mesh.fails(
        &["keys", "create", "--tenant", "nobody", "--scope", "invoke"],
        &["nobody"],
    );

    // The new key at work (SKEIN_API_KEY overrides the profile's): its tenant, its scopes.
    let as_acme = [("SKEIN_API_KEY", key.as_str())];
    let who = mesh.ok_env(&["whoami"], &as_acme);
    assert!(who.contains("tenant acme") && who.contains(&id), "{who}");
    let m = mesh.json_env(&["deploy", CLS, "--name", "acme_cls"], &as_acme);
    assert_eq!(m["owner"], "acme");
    mesh.json(&["deploy", CLS, "--name", "root_cls", "--shared", "true"]);
    for _ in 0..3 {
        mesh.json_env(&["infer", "acme_cls", "-i", CLS_INPUT], &as_acme);
    }
    mesh.json_env(&["infer", "root_cls", "-i", CLS_INPUT], &as_acme);
    mesh.json(&["infer", "root_cls", "-i", CLS_INPUT]);
    mesh.fails_env(&["tenants", "list"], &as_acme, &["forbidden"]);
    mesh.fails_env(&["usage"], &as_acme, &["forbidden"]);

    // usage: every filter. Nodes ship usage records a moment after the calls.
    let requests = |rows: &Value, tenant: &str, model: &str| -> u64 {
        rows.as_array()
            .expect("array")
            .iter()
            .filter(|r| r["tenant"] == tenant && r["model"] == model)
            .map(|r| r["requests"].as_u64().unwrap_or(0))
            .sum()
    };
    mesh.until("the usage of five calls", Duration::from_secs(30), || {
        let rows = mesh.json(&["usage"]);
        (requests(&rows, "acme", "acme_cls") == 3
            && requests(&rows, "acme", "root_cls") == 1
            && requests(&rows, "root", "root_cls") == 1)
            .then_some(())
    });
    let rows = mesh.json(&["usage", "--tenant", "acme"]);
    assert!(
        rows.as_array()
            .expect("array")
            .iter()
            .all(|r| r["tenant"] == "acme"),
        "{rows}"
    );
    assert_eq!(requests(&rows, "acme", "acme_cls"), 3);
    let rows = mesh.json(&["usage", "--model", "root_cls"]);
    assert!(
        rows.as_array()
            .expect("array")
            .iter()
            .all(|r| r["model"] == "root_cls"),
        "{rows}"
    );
    assert_eq!(
        requests(&rows, "acme", "root_cls") + requests(&rows, "root", "root_cls"),
        2
    );
    let rows = mesh.json(&[
        "usage", "--tenant", "acme", "--model", "acme_cls", "--since", "1h",
    ]);
    assert_eq!(requests(&rows, "acme", "acme_cls"), 3, "{rows}");
    let rows = mesh.json(&["usage", "--until", "1h"]);
    assert_eq!(rows, serde_json::json!([]), "nothing is older than an hour");
    let rows = mesh.json(&["usage", "--since", "0s"]);
    assert_eq!(rows, serde_json::json!([]), "nothing is newer than now");
    // A tenant's reader sees its own tenant only, and may not ask for another.
    let as_reader = [("SKEIN_API_KEY", reader.as_str())];
    let rows = mesh.json_env(&["usage"], &as_reader);
    assert!(
        rows.as_array()
            .expect("array")
            .iter()
            .all(|r| r["tenant"] == "acme"),
        "{rows}"
    );
    assert_eq!(requests(&rows, "acme", "acme_cls"), 3);
    mesh.fails_env(&["usage", "--tenant", "root"], &as_reader, &["forbidden"]);
    mesh.fails(&["usage", "--since", "yesterday"], &["--since"]);
    let table = mesh.ok(&["usage"]);
    assert!(
        table.contains("REQUESTS") && table.contains("acme_cls"),
        "{table}"
    );

    // keys revoke: refused from then on, shown as revoked.
    let out = mesh.ok(&["keys", "revoke", &id]);
    assert!(
        out.contains(&format!("revoked key {id} of tenant acme")),
        "{out}"
    );
    let listed = mesh.json(&["keys", "list", "--tenant", "acme"]);
    let mine = listed
        .as_array()
        .expect("array")
        .iter()
        .find(|k| k["id"] == id.as_str())
        .cloned()
        .expect("listed");
    assert!(mine["revoked_ms"].as_u64() > Some(0), "{mine}");
    mesh.fails_env(&["whoami"], &as_acme, &["unauthenticated"]);
    mesh.fails(&["keys", "revoke", "000000000000"], &["not_found"]);

    // audit: --action, --tenant, --since, --limit.
    let a = mesh.json(&["audit", "--action", "keys.revoke", "--limit", "1"]);
    let a = a.as_array().expect("array");
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0]["action"], "keys.revoke");
    let a = mesh.json(&["audit", "--limit", "2"]);
    assert_eq!(a.as_array().map(Vec::len), Some(2), "{a}");
    let a = mesh.json(&["audit", "--tenant", "acme"]);
    let a = a.as_array().expect("array");
    assert!(
        !a.is_empty() && a.iter().all(|l| l["tenant"] == "acme"),
        "{a:?}"
    );
    assert!(a.iter().any(|l| l["target"]
        .as_str()
        .is_some_and(|t| t.starts_with("acme_cls"))));
    assert_eq!(
        mesh.json(&["audit", "--since", "0s"]),
        serde_json::json!([])
    );
    assert!(mesh
        .json(&["audit", "--since", "1h"])
        .as_array()
        .is_some_and(|a| a.len() > 5));

    // join-token: --ttl, in the expiry; bad TTLs refused rather than cut.
    let before = now_ms();
    let t = mesh.json(&["join-token", "--ttl", "10m"]);
    let after = now_ms();
    assert!(
        t["token"]
            .as_str()
            .is_some_and(|t| t.starts_with("skein1-")),
        "{t}"
    );
    let exp = t["expires_ms"].as_u64().expect("expires_ms");
    assert!((before + 600_000..=after + 600_000).contains(&exp), "{t}");
    let t = mesh.json(&["join-token"]);
    let exp = t["expires_ms"].as_u64().expect("expires_ms");
    assert!(
        exp >= before + 3_600_000 && exp <= now_ms() + 3_600_000,
        "default 1 h: {t}"
    );
    let t = mesh.json(&["join-token", "--ttl", "1500ms"]);
    let exp = t["expires_ms"].as_u64().expect("expires_ms");
    assert!(exp >= before + 2000, "1.5 s is rounded up, never down: {t}");
    let out = mesh.ok(&["join-token", "--ttl", "720h"]);
    assert!(
        out.trim().starts_with("skein1-"),
        "the table output is the token alone: {out}"
    );
    mesh.fails(
        &["join-token", "--ttl", "721h"],
        &["--ttl", "1s to 30 days"],
    );
    mesh.fails(&["join-token", "--ttl", "0s"], &["--ttl", "1s to 30 days"]);
    mesh.fails_env(&["join-token"], &as_reader, &["forbidden"]);

    // rotate-ticket-key, then calls still work; revoke-node drops the node.
    let out = mesh.ok(&["rotate-ticket-key"]);
    let ids = out.trim().rsplit("keys now: ").next().unwrap_or("");
    assert_eq!(
        ids.split(", ").count(),
        2,
        "a second key is published: {out}"
    );
    mesh.json(&["infer", "root_cls", "-i", CLS_INPUT]);
    let node = mesh.nodes()[0]["node_id"]
        .as_str()
        .expect("node_id")
        .to_string();
    let out = mesh.ok(&["revoke-node", &node]);
    assert!(out.contains(&format!("revoked node {node}")), "{out}");
    assert!(
        mesh.nodes().iter().all(|n| n["node_id"] != node.as_str()),
        "a revoked node is dropped from membership"
    );
    mesh.fails(&["revoke-node", &"0".repeat(32)], &["not_found"]);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The pinned ONNX Runtime library (`scripts/test` sets `SKEIN_TEST_ORT_LIB`); `None` skips,
/// unless `SKEIN_EXPECT_ORT=1` (CI), where a missing library fails.
fn ort_lib() -> Option<String> {
    match std::env::var("SKEIN_TEST_ORT_LIB") {
        Ok(lib) if !lib.is_empty() => Some(lib),
        _ => {
            assert!(
                std::env::var("SKEIN_EXPECT_ORT").as_deref() != Ok("1"),
                "SKEIN_EXPECT_ORT=1 but SKEIN_TEST_ORT_LIB is not set"
            );
            eprintln!("skipped: SKEIN_TEST_ORT_LIB is not set (run ./scripts/test)");
            None
        }
    }
}

#[test]
fn up_with_the_ort_flags_runs_onnx_runtime_nodes_and_serves_an_ort_only_model() {
    let Some(lib) = ort_lib() else { return };
    // Bad flags: `skein up` refuses to start and names them.
    let refused = |args: &[&str], says: &[&str]| {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(env!("CARGO_BIN_EXE_skein"))
            .args([
                "up",
                "--nodes",
                "1",
                "--listen",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
            ])
            .args(["--no-models", "--data-dir"])
            .arg(dir.path().join("up"))
            .args(args)
            .env_clear()
            .envs(Mesh::env_of(dir.path()))
            .current_dir(repo())
            .timeout(CALL_TIMEOUT)
            .output()
            .expect("running skein up");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success(),
            "`skein up {}` started:\n{all}",
            args.join(" ")
        );
        for s in says {
            assert!(
                all.contains(s),
                "`skein up {}` does not say `{s}`:\n{all}",
                args.join(" ")
            );
        }
    };
    refused(
        &[
            "--backend",
            "ort",
            "--ort-lib",
            "/nonexistent/skein/libonnxruntime.so",
        ],
        &["/nonexistent/skein/libonnxruntime.so", "--ort-lib"],
    );
    refused(
        &["--backend", "ort", "--ort-lib", &lib, "--ort-ep", "warp"],
        &["warp"],
    );

    let mesh = Mesh::start_with(
        1,
        &[
            "--backend",
            "ort",
            "--ort-lib",
            &lib,
            "--ort-ep",
            "cpu",
            "--ort-threads",
            "1",
        ],
    );
    let nodes = mesh.json(&["nodes"]);
    let node = &nodes[0];
    assert_eq!(node["capacity"]["backends"][0], "ort-cpu", "{node}");
    let version = node["capacity"]["ort_version"].as_str().unwrap_or_default();
    assert!(
        lib.contains(&format!("libonnxruntime.so.{version}")) && !version.is_empty(),
        "the node runs ONNX Runtime {version:?}, not the library given: {lib}"
    );
    assert_eq!(
        node["capacity"]["ort_providers"],
        serde_json::json!(["CPUExecutionProvider"])
    );
    assert_eq!(node["labels"]["engine"], "ort", "{node}");
    // The ONNX Runtime-only model deploys on this mesh and answers its reference case.
    let d = mesh.json(&["deploy", "models/ddddocr_int8/model.onnx", "--name", "ocr"]);
    assert_eq!(
        d["settings"]["engines"]["engines"],
        serde_json::json!(["ort"])
    );
    let out = mesh.json(&[
        "infer",
        "ocr",
        "--input",
        "input1=models/ddddocr_int8/cases/captcha_a7kd3/input_0.npy",
    ]);
    let want = std::fs::read(repo().join("models/ddddocr_int8/cases/captcha_a7kd3/output_0.npy"))
        .expect("reference output");
    let want = skein_proto::npy::decode("y", &want).expect("npy");
    let want = want.as_f32_vec().expect("fp32");
    let outs = out["outputs"].as_object().expect("outputs");
    let (_, got) = outs.iter().next().expect("one output");
    assert_eq!(got["shape"], serde_json::json!([20, 1, 8210]), "{got}");
    let got: Vec<f64> = got["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect();
    assert_eq!(got.len(), want.len());
    // ONNX Runtime's tolerances (models/README.md): atol 1e-4, rtol 1e-3.
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let w = f64::from(*w);
        assert!(
            (g - w).abs() <= 1e-4 + 1e-3 * w.abs(),
            "output {i}: {g} vs {w}"
        );
    }
}

/// A fleet token through the real binaries: `skein join-token --uses 2 --label site=...`
/// admits two `skein-node` processes, which carry the token's label whatever they say; the
/// third is refused with a clear error and exits; each use and the refusal are in the audit
/// log.
#[test]
fn a_fleet_join_token_admits_its_number_of_nodes_labels_them_and_audits_each_use() {
    let mesh = Mesh::start(1);
    let profile = std::fs::read_to_string(mesh.profile()).expect("profile");
    let coordinator = profile
        .lines()
        .find_map(|l| l.strip_prefix("coordinator = "))
        .map(|v| v.trim_matches('"').to_string())
        .expect("the profile names the coordinator");
    let t = mesh.json(&[
        "join-token",
        "--uses",
        "2",
        "--ttl",
        "24h",
        "--label",
        "site=berlin-3",
    ]);
    assert_eq!(t["uses"], 2, "{t}");
    assert_eq!(t["labels"], serde_json::json!({"site": "berlin-3"}), "{t}");
    let token = t["token"].as_str().expect("token").to_string();
    let table = mesh.skein().args(["join-token", "--uses", "5"]).output();
    let table = table.expect("running skein");
    assert!(
        String::from_utf8_lossy(&table.stderr).contains("admits 5 nodes"),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    mesh.fails(&["join-token", "--uses", "0"], &["--uses"]);
    mesh.fails(&["join-token", "--label", "site"], &["KEY=VALUE"]);
    mesh.fails(
        &["join-token", "--label", "site=two words"],
        &["without spaces"],
    );

    let dirs = tempfile::tempdir().expect("tempdir");
    let node = |i: usize, label: &str| {
        std::process::Command::new(node_bin())
            .args(["--coordinator", &coordinator, "--join-token", &token])
            .args(["--listen", "127.0.0.1:0", "--backend", "tract"])
            .args(["--label", label, "--data-dir"])
            .arg(dirs.path().join(format!("node-{i}")))
            .env_clear()
            .env("HOME", dirs.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning skein-node")
    };
    // The second one claims another site: the token's label wins.
    let _fleet = [Proc(node(0, "role=edge")), Proc(node(1, "site=paris"))];
    let labelled = mesh.until(
        "two nodes with the token's label",
        Duration::from_secs(60),
        || {
            let n = mesh
                .nodes()
                .into_iter()
                .filter(|n| n["labels"]["site"] == "berlin-3")
                .count();
            (n == 2).then_some(n)
        },
    );
    assert_eq!(labelled, 2);
    assert!(mesh.nodes().iter().all(|n| n["labels"]["site"] != "paris"));

    // The third device: refused, and says why.
    let third = node(2, "role=edge");
    let out = third
        .wait_with_output()
        .expect("the third skein-node exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the third node joined:\n{stderr}");
    assert!(
        stderr.contains("used up") && stderr.contains("2 nodes"),
        "the refusal does not say the token is used up:\n{stderr}"
    );

    // The fleet token's lines (`skein up` joined its own node with a token of its own).
    let mint = mesh.json(&["audit", "--action", "join_tokens.mint"]);
    let id = mint
        .as_array()
        .and_then(|a| {
            a.iter().find_map(|l| {
                let t = l["target"].as_str()?;
                t.strip_suffix(",uses=2,site=berlin-3").map(str::to_string)
            })
        })
        .unwrap_or_else(|| panic!("no mint line for the fleet token: {mint:#}"));
    let audit = mesh.json(&["audit", "--action", "join_tokens.use"]);
    let lines: Vec<&Value> = audit
        .as_array()
        .expect("audit is an array")
        .iter()
        .filter(|l| {
            l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with(&format!("{id},")))
        })
        .collect();
    let ok = lines.iter().filter(|l| l["result"] == "ok").count();
    let refused = lines
        .iter()
        .filter(|l| l["result"] == "invalid_join_token")
        .count();
    assert_eq!((ok, refused), (2, 1), "{audit:#}");
    for use_ in ["use=1/2,", "use=2/2,", "used=2/2,"] {
        assert!(
            lines
                .iter()
                .any(|l| l["target"].as_str().is_some_and(|t| t.contains(use_))),
            "no audit line says `{use_}`: {audit:#}"
        );
    }
}

/// `skein coordinator --config FILE`: the relay's routing settings (`[relay]
/// routing_bandwidth_mbps`, `routing_penalty_ms`) and rate limits are checked at start: a
/// negative penalty, a bandwidth of 0, a rate with no interval or a half-written one is
/// refused with the setting's name, nothing starts.
#[test]
fn the_coordinator_refuses_relay_routing_settings_it_cannot_use() {
    for (toml, says) in [
        (
            "[relay]\nrouting_penalty_ms = -1.0\n",
            "[relay] routing_penalty_ms must be 0 or more ms, not -1",
        ),
        (
            "[relay]\nrouting_bandwidth_mbps = 0.0\n",
            "[relay] routing_bandwidth_mbps must be a positive number of Mbit/s, not 0",
        ),
        (
            "[relay]\ncircuit_rate_per_ip = { burst = 5, every_ms = 0 }\n",
            "[relay] circuit_rate_per_ip: every_ms must be at least 1 when burst is 5",
        ),
        (
            "[relay]\ncircuit_rate_per_peer = { burst = 5 }\n",
            "missing field `every_ms`",
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("coordinator.toml");
        std::fs::write(&config, toml).expect("config");
        let out = Command::new(env!("CARGO_BIN_EXE_skein"))
            .arg("coordinator")
            .arg("--config")
            .arg(&config)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("coord"))
            .env_clear()
            .envs(Mesh::env_of(dir.path()))
            .timeout(CALL_TIMEOUT)
            .output()
            .expect("running skein coordinator");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml}: started anyway");
        assert!(stderr.contains(says), "{toml}: {stderr}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening"),
            "{toml}: it said it was listening"
        );
    }
}
