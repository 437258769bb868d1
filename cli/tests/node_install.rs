//! `skein-node install | uninstall | status` through the binary, under `--root DIR`: the files
//! with their modes and owners (the user made in `DIR/etc/passwd`), `systemd-analyze verify` on
//! the unit, a second install that changes nothing, the installed `node.toml` run by the real
//! `skein-node` against a real coordinator (`skein up`) until `status` says it is joined and
//! ready, and an uninstall that removes what install wrote (`--purge`: the state and user too).
//!
//! Needs root (owners); skipped without it unless `SKEIN_EXPECT_ROOT` is set (`.ci/run`).

// Synchronous tests that wait on other processes: wall-clock time (no tokio here).
#![allow(clippy::disallowed_types)]

mod common;

use common::{node_bin, repo, Proc};

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn am_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
            .unwrap_or(false)
    })
}

/// Whether to run: as root; without root, skip (fail under `SKEIN_EXPECT_ROOT`).
fn root_or_skip() -> bool {
    if am_root() {
        return true;
    }
    assert!(
        std::env::var_os("SKEIN_EXPECT_ROOT").is_none(),
        "SKEIN_EXPECT_ROOT is set but this test does not run as root"
    );
    eprintln!("skipped: skein-node install sets owners, which needs root");
    false
}

fn node(args: &[&str]) -> Output {
    Command::new(node_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .expect("running skein-node")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(args: &[&str]) -> String {
    let o = node(args);
    assert!(
        o.status.success(),
        "skein-node {} failed:\n{}",
        args.join(" "),
        text(&o)
    );
    text(&o)
}

/// `(mode, uid, gid)` of `p` (not following links).
fn stat(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.permissions().mode() & 0o7777, m.uid(), m.gid())
}

/// `(uid, gid)` of `skein` in `root/etc/passwd`.
fn skein_ids(root: &Path) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f[0] == "skein")
            .then(|| (f[2].parse().ok(), f[3].parse().ok()))
            .and_then(|(u, g)| Some((u?, g?)))
    })
}

/// A `skein up` (one node, no models) in a child process with a private HOME, killed on drop.
struct Mesh {
    child: Child,
    dir: tempfile::TempDir,
}

impl Mesh {
    fn start() -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_skein"))
            .args(["up", "--nodes", "1", "--backend", "tract", "--no-models"])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir.path().join("up"))
            .env_clear()
            .envs(Self::env_of(dir.path()))
            .current_dir(repo())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning skein up");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::sync_channel(64);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.starts_with("Press Ctrl-C to stop.") => break,
                Ok(_) => {}
                Err(_) => panic!("skein up did not come up in 120 s"),
            }
        }
        Mesh { child, dir }
    }

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

    fn coordinator(&self) -> String {
        let profile =
            std::fs::read_to_string(self.dir.path().join("profile.toml")).expect("profile");
        profile
            .lines()
            .find_map(|l| l.strip_prefix("coordinator = "))
            .map(|v| v.trim_matches('"').to_string())
            .expect("the profile names the coordinator")
    }

    fn join_token(&self) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_skein"))
            .args(["join-token", "--ttl", "10m"])
            .env_clear()
            .envs(Self::env_of(self.dir.path()))
            .output()
            .expect("running skein join-token");
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `node.toml` installed under `root`.
fn node_toml(root: &Path) -> toml::Table {
    std::fs::read_to_string(root.join("etc/skein/node.toml"))
        .expect("node.toml")
        .parse()
        .expect("node.toml is TOML")
}

/// A free TCP port on loopback for the node's metrics listener (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Every regular file and link under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let t = e.file_type().expect("file type");
            if t.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).expect("under").to_path_buf());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn install_writes_a_hardened_service_that_runs_and_uninstall_removes_it() {
    if !root_or_skip() {
        return;
    }
    let mesh = Mesh::start();
    let coordinator = mesh.coordinator();
    let token = mesh.join_token();
    let metrics = format!("127.0.0.1:{}", free_port());
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let r = root.to_str().expect("utf-8 path");
    let install: Vec<&str> = vec![
        "install",
        "--root",
        r,
        "--coordinator",
        &coordinator,
        "--join-token",
        &token,
        "--label",
        "site=berlin-3",
        "--backend",
        "tract",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        &metrics,
        "--memory-budget",
        "512MiB",
        "--cache-budget",
        "256MiB",
        "--max-concurrency",
        "3",
        "--max-queue",
        "17",
        "--no-start",
    ];

    // --print shows every file and writes nothing.
    let mut print = install.clone();
    print.push("--print");
    let shown = ok(&print);
    for p in [
        "/usr/local/bin/skein-node",
        "/etc/skein/node.toml (0640, root:skein)",
        "/var/lib/skein (directory, 0750, skein:skein)",
        "/etc/systemd/system/skein-node.service (0644, root:root)",
        "/etc/systemd/system/multi-user.target.wants/skein-node.service",
        "MemoryMax=805306368",
        "site = \"berlin-3\"",
    ] {
        assert!(shown.contains(p), "--print does not show `{p}`:\n{shown}");
    }
    assert!(!root.exists(), "--print wrote something");

    // Without root: a clear error that says what to run.
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(node_bin())
        .args(&install)
        .output()
        .expect("running setpriv");
    assert!(!o.status.success(), "installed without root:\n{}", text(&o));
    assert!(
        text(&o).contains("needs root") && text(&o).contains("sudo "),
        "{}",
        text(&o)
    );
    assert!(!root.exists(), "the refused install wrote something");

    // The install: files, modes, owners.
    let first = ok(&install);
    assert!(first.contains("wrote"), "{first}");
    // Every setting flag is in the node's config file.
    let cfg = node_toml(&root);
    for (key, want) in [
        ("memory_budget", 512 << 20),
        ("cache_budget", 256 << 20),
        ("max_concurrency", 3),
        ("max_queue", 17),
    ] {
        assert_eq!(
            cfg.get(key).and_then(|v| v.as_integer()),
            Some(want),
            "{key}: {cfg}"
        );
    }
    assert_eq!(
        cfg.get("backend").and_then(|v| v.as_str()),
        Some("tract"),
        "{cfg}"
    );
    let str_of =
        |cfg: &toml::Table, key: &str| cfg.get(key).and_then(|v| v.as_str()).map(String::from);
    assert_eq!(
        str_of(&cfg, "coordinator"),
        Some(coordinator.clone()),
        "{cfg}"
    );
    assert_eq!(
        str_of(&cfg, "listen").as_deref(),
        Some("127.0.0.1:0"),
        "{cfg}"
    );
    assert_eq!(
        cfg.get("labels")
            .and_then(|l| l.get("site"))
            .and_then(|v| v.as_str()),
        Some("berlin-3"),
        "{cfg}"
    );
    assert_eq!(str_of(&cfg, "advertise"), None, "{cfg}");
    // `--advertise` too (in a second root: this node is not started).
    let root2 = tmp.path().join("root2");
    let r2 = root2.to_str().expect("utf-8 path");
    let mut advertised: Vec<&str> = install
        .iter()
        .map(|a| if *a == r { r2 } else { *a })
        .collect();
    advertised.extend(["--advertise", "192.0.2.7:7071"]);
    ok(&advertised);
    let cfg2 = node_toml(&root2);
    assert_eq!(
        str_of(&cfg2, "advertise").as_deref(),
        Some("192.0.2.7:7071"),
        "{cfg2}"
    );
    let (uid, gid) = skein_ids(&root).expect("the user skein in root/etc/passwd");
    assert_ne!(uid, 0);
    let expect = [
        ("usr/local/bin/skein-node", (0o755, 0, 0)),
        ("etc/skein", (0o750, 0, gid)),
        ("etc/skein/node.toml", (0o640, 0, gid)),
        ("var/lib/skein", (0o750, uid, gid)),
        ("etc/systemd/system/skein-node.service", (0o644, 0, 0)),
    ];
    for (p, want) in expect {
        assert_eq!(stat(&root.join(p)), want, "{p}");
    }
    assert_eq!(
        std::fs::read(root.join("usr/local/bin/skein-node")).expect("copy"),
        std::fs::read(node_bin()).expect("binary"),
        "the installed binary is this one"
    );
    assert_eq!(
        std::fs::read_link(
            root.join("etc/systemd/system/multi-user.target.wants/skein-node.service")
        )
        .expect("the unit is enabled"),
        Path::new("/etc/systemd/system/skein-node.service")
    );
    let unit =
        std::fs::read_to_string(root.join("etc/systemd/system/skein-node.service")).expect("unit");
    assert!(unit.contains("ExecStart=/usr/local/bin/skein-node --config /etc/skein/node.toml"));

    // A second install changes nothing, not even a timestamp.
    let mtimes: Vec<_> = expect
        .iter()
        .map(|(p, _)| {
            std::fs::metadata(root.join(p))
                .and_then(|m| m.modified())
                .ok()
        })
        .collect();
    let again = ok(&install);
    assert!(
        !again.contains("wrote") && again.contains("nothing to change"),
        "{again}"
    );
    let after: Vec<_> = expect
        .iter()
        .map(|(p, _)| {
            std::fs::metadata(root.join(p))
                .and_then(|m| m.modified())
                .ok()
        })
        .collect();
    assert_eq!(mtimes, after);

    // systemd accepts the unit (installed with --bin naming a binary that exists here, as
    // `verify` checks ExecStart on this machine).
    let vroot = tmp.path().join("verify");
    let bin = node_bin();
    let mut with_bin = install.clone();
    with_bin[2] = vroot.to_str().expect("utf-8");
    with_bin.extend(["--bin", bin.to_str().expect("utf-8")]);
    ok(&with_bin);
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(vroot.join("etc/systemd/system/skein-node.service"))
        .output()
        .expect("systemd-analyze is installed");
    assert!(o.status.success(), "systemd-analyze verify:\n{}", text(&o));

    // The installed node.toml, run by the real skein-node (its state directory taken under
    // the root), joins; `status` then says joined, reachable and ready.
    let _node = Proc(
        Command::new(node_bin())
            .arg("--config")
            .arg(root.join("etc/skein/node.toml"))
            .arg("--data-dir")
            .arg(root.join("var/lib/skein"))
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning skein-node"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let o = node(&["status", "--root", r]);
        if o.status.success() {
            break text(&o);
        }
        assert!(
            Instant::now() < deadline,
            "status never said joined and ready:\n{}",
            text(&o)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // `--config` names the file read (under the root): the same one given explicitly says
    // the same; one that is not there is an error naming it.
    let explicit = node(&["status", "--root", r, "--config", "/etc/skein/node.toml"]);
    assert!(explicit.status.success(), "{}", text(&explicit));
    assert!(
        text(&explicit).contains("ready:       yes"),
        "{}",
        text(&explicit)
    );
    let missing = node(&["status", "--root", r, "--config", "/etc/skein/other.toml"]);
    assert!(!missing.status.success(), "{}", text(&missing));
    assert!(text(&missing).contains("other.toml"), "{}", text(&missing));
    for s in [
        "joined:      yes",
        "reachable",
        "ready:       yes",
        "models:      none loaded",
    ] {
        assert!(status.contains(s), "status does not say `{s}`:\n{status}");
    }
    drop(_node);
    assert!(root.join("var/lib/skein/node.crt").is_file());

    // Uninstall removes what install wrote and keeps the state; --purge removes that and the
    // user.
    let out = ok(&["uninstall", "--root", r]);
    assert!(out.contains("removed"), "{out}");
    for p in [
        "usr/local/bin/skein-node",
        "etc/skein",
        "etc/systemd/system/skein-node.service",
        "etc/systemd/system/multi-user.target.wants/skein-node.service",
    ] {
        assert!(
            root.join(p).symlink_metadata().is_err(),
            "{p} is still there"
        );
    }
    assert!(
        root.join("var/lib/skein/node.crt").is_file(),
        "the state went"
    );
    ok(&["uninstall", "--purge", "--root", r]);
    assert!(skein_ids(&root).is_none(), "the user is still there");
    let left: Vec<PathBuf> = files_under(&root)
        .into_iter()
        .filter(|p| {
            let name = p.to_string_lossy();
            let userdb = ["passwd", "group", "shadow", "gshadow"]
                .iter()
                .any(|db| name == format!("etc/{db}") || name == format!("etc/{db}-"));
            !userdb
        })
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
