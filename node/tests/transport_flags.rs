//! `skein-node`'s transport flags, through the binary: `--initial-window`, `--congestion`,
//! `--pacing` and `--no-zero-rtt` reach the settings the node runs with (its `transport
//! profile` log line, written before it connects), and bad values are refused naming them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The fields of the `transport profile` line `skein-node` logs with `args` (no coordinator
/// is reachable: the node is killed once the line is read).
fn profile(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_skein-node"))
        .args(["--coordinator", "127.0.0.1:9", "--listen", "127.0.0.1:0"])
        .args([
            "--join-token",
            "not-a-token",
            "--log",
            "info",
            "--log-format",
            "json",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .args(args)
        .env_clear()
        .env("HOME", dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running skein-node");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["fields"]["message"] == "transport profile" {
                    let _ = tx.send(v["fields"].clone());
                    return;
                }
            }
        }
    });
    let got = rx.recv_timeout(Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
    got.expect("skein-node logged no `transport profile` line within 60 s")
}

#[test]
fn the_transport_flags_reach_the_node_and_bad_values_are_refused() {
    let defaults = profile(&[]);
    assert_eq!(defaults["initial_window"], 196_608, "{defaults}");
    assert_eq!(defaults["congestion"], "Cubic", "{defaults}");
    assert_eq!(defaults["pacing"], "Window", "{defaults}");
    assert_eq!(defaults["zero_rtt"], true, "{defaults}");

    let set = profile(&[
        "--initial-window",
        "262144",
        "--congestion",
        "bbr",
        "--pacing",
        "rtt",
        "--no-zero-rtt",
    ]);
    assert_eq!(set["initial_window"], 262_144, "{set}");
    assert_eq!(set["congestion"], "Bbr", "{set}");
    assert_eq!(set["pacing"], "Rtt", "{set}");
    assert_eq!(set["zero_rtt"], false, "{set}");

    for (flag, bad) in [
        ("--congestion", "vegas"),
        ("--pacing", "never"),
        ("--initial-window", "big"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(env!("CARGO_BIN_EXE_skein-node"))
            .args(["--coordinator", "127.0.0.1:9", "--data-dir"])
            .arg(dir.path())
            .args([flag, bad])
            .env_clear()
            .output()
            .expect("running skein-node");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {bad} accepted");
        assert!(
            err.contains(bad) && err.contains(flag),
            "{flag} {bad}: {err}"
        );
    }
}
