//! The aarch64 `skein-node` for real: the cross-built binary (`SKEIN_AARCH64_NODE`, which
//! `scripts/cross-node` builds once) runs under qemu-user (`qemu-aarch64-static`, invoked directly, with
//! the arm64 libc of Debian's cross toolchain) against an x86-64 `skein coordinator` on
//! loopback. It joins, loads `ppocr_cls`, and answers both reference cases (`single`,
//! `batch4`) within the model's tolerances through the SDK (the `skein` CLI). The time to
//! join and each call's latency under emulation are printed, as information only.
//!
//! The build is cheap to make and still quick to run: profile `cross-check`, nothing optimised
//! but tract and ndarray (opt-level 1), emulated. The first call of each input shape (load,
//! tract's optimisation of the plan, the run) took about 7 s on the 2-core VM, the whole test
//! 15 s; with tract unoptimised as well it was 2 to 4 minutes per shape (hence the long call
//! timeout, kept for slow hosts).
//!
//! Without `SKEIN_AARCH64_NODE` it skips, unless `SKEIN_EXPECT_AARCH64=1` (`.ci/run` sets both).

// Synchronous tests that wait on other processes: wall-clock time (no tokio here).
#![allow(clippy::disallowed_types)]

mod common;

use common::{repo, Proc};

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `skein ARGS --output json` with the coordinator's admin profile; its JSON.
fn skein_json(profile: &Path, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_skein"))
        .args(args)
        .args(["--output", "json"])
        .env("SKEIN_PROFILE", profile)
        .current_dir(repo())
        .output()
        .expect("running skein");
    assert!(
        out.status.success(),
        "`skein {}` failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "`skein {}` printed no JSON ({e}): {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn an_aarch64_node_under_qemu_joins_and_answers_the_reference_cases() {
    let Some(bin) = std::env::var_os("SKEIN_AARCH64_NODE").filter(|b| !b.is_empty()) else {
        assert!(
            std::env::var("SKEIN_EXPECT_AARCH64").as_deref() != Ok("1"),
            "SKEIN_EXPECT_AARCH64=1 but SKEIN_AARCH64_NODE is not set"
        );
        eprintln!("skipped: SKEIN_AARCH64_NODE (the cross-built aarch64 skein-node) is not set");
        return;
    };
    let bin = PathBuf::from(bin);
    assert!(
        bin.is_file(),
        "SKEIN_AARCH64_NODE={} is no file",
        bin.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");

    // The x86-64 coordinator, alone (no local node to answer in the aarch64 node's place).
    let mut child = Command::new(env!("CARGO_BIN_EXE_skein"))
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("coordinator"))
        .current_dir(repo())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning skein coordinator");
    let stdout = child.stdout.take().expect("stdout");
    let _coordinator = Proc(child);
    let (tx, rx) = std::sync::mpsc::sync_channel(64);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let (mut addr, mut token) = (String::new(), String::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("the coordinator came up");
        if let Some(a) = line.strip_prefix("skein coordinator listening on ") {
            addr = a.trim().to_string();
        }
        if let Some(rest) = line.trim().strip_prefix("skein-node --coordinator ") {
            token = rest
                .split_whitespace()
                .skip_while(|w| *w != "--join-token")
                .nth(1)
                .unwrap_or_default()
                .to_string();
        }
        if line.contains("KServe V2 HTTP gateway") {
            break;
        }
    }
    assert!(!addr.is_empty() && token.starts_with("skein1-"));
    let profile = dir.path().join("coordinator").join("admin-profile.toml");

    // The aarch64 node under qemu-user.
    let started = Instant::now();
    let node = Command::new("qemu-aarch64-static")
        .args(["-L", "/usr/aarch64-linux-gnu"])
        .arg(&bin)
        .args(["--coordinator", &addr, "--join-token", &token])
        .args(["--listen", "127.0.0.1:0", "--backend", "tract"])
        .args(["--label", "arch=aarch64", "--data-dir"])
        .arg(dir.path().join("node"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning qemu-aarch64-static (Debian's qemu-user-static)");
    let _node = Proc(node);
    let node_id = loop {
        let nodes = skein_json(&profile, &["nodes"]);
        if let Some(n) = nodes.as_array().and_then(|a| a.first()) {
            assert_eq!(n["labels"]["arch"], "aarch64", "{nodes}");
            break n["node_id"].as_str().expect("node_id").to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the aarch64 node did not join in 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "aarch64 node under qemu: joined {:.2} s after its start",
        started.elapsed().as_secs_f64()
    );

    skein_json(
        &profile,
        &[
            "deploy",
            "models/ppocr_cls/model.onnx",
            "--name",
            "ppocr_cls",
        ],
    );
    for case in ["single", "batch4"] {
        let input = format!("x=models/ppocr_cls/cases/{case}/input_0.npy");
        let t = Instant::now();
        let r = skein_json(
            &profile,
            &["infer", "ppocr_cls", "-i", &input, "--timeout", "600s"],
        );
        eprintln!(
            "aarch64 node under qemu: ppocr_cls {case}: {:.0} ms (the first call includes the load)",
            t.elapsed().as_secs_f64() * 1e3
        );
        assert_eq!(r["metadata"]["node"], node_id.as_str(), "{r}");
        let want =
            std::fs::read(repo().join(format!("models/ppocr_cls/cases/{case}/output_0.npy")))
                .expect("reference output");
        let want = skein_proto::npy::decode("y", &want).expect("npy");
        let want = want.as_f32_vec().expect("fp32");
        let (_, out) = r["outputs"]
            .as_object()
            .and_then(|o| o.iter().next())
            .expect("one output");
        let got: Vec<f64> = out["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|v| v.as_f64().expect("number"))
            .collect();
        assert_eq!(got.len(), want.len(), "{case}");
        // The model's tolerances for tract (models/README.md): atol 1e-4, rtol 1e-3.
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let w = f64::from(*w);
            assert!(
                (g - w).abs() <= 1e-4 + 1e-3 * w.abs(),
                "{case} output {i}: {g} vs {w}"
            );
        }
    }
}
