//! `skein-node`'s ONNX Runtime flags, through the binary: a node that cannot run the backend it
//! was told to refuses to start and names what is wrong (before it joins anything).

use std::process::Command;

/// Run `skein-node` with `args` (no coordinator is reachable: 127.0.0.1:9), which must fail
/// before joining; its stderr, which must contain every one of `says`.
fn refused(args: &[&str], says: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_skein-node"))
        .args(["--coordinator", "127.0.0.1:9", "--listen", "127.0.0.1:0"])
        .args(["--join-token", "not-a-token", "--data-dir"])
        .arg(dir.path())
        .args(args)
        .env_clear()
        .env("HOME", dir.path())
        .output()
        .expect("running skein-node");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "skein-node {} started:\n{all}",
        args.join(" ")
    );
    for s in says {
        assert!(
            all.contains(s),
            "skein-node {}: does not say `{s}`:\n{all}",
            args.join(" ")
        );
    }
}

#[test]
fn skein_node_refuses_an_ort_backend_it_cannot_run_naming_the_flag() {
    refused(
        &[
            "--backend",
            "ort",
            "--ort-lib",
            "/nonexistent/skein-node/libonnxruntime.so",
        ],
        &["/nonexistent/skein-node/libonnxruntime.so", "--ort-lib"],
    );
    refused(&["--backend", "fpga"], &["fpga"]);
    refused(&["--ort-threads", "many"], &["many"]);
    // With the real library (scripts/test sets SKEIN_TEST_ORT_LIB), a wrong execution provider
    // is named; the library itself loads (the error is not about it).
    match std::env::var("SKEIN_TEST_ORT_LIB") {
        Ok(lib) if !lib.is_empty() => {
            refused(
                &["--backend", "ort", "--ort-lib", &lib, "--ort-ep", "warp"],
                &["warp"],
            );
        }
        _ => assert!(
            std::env::var("SKEIN_EXPECT_ORT").as_deref() != Ok("1"),
            "SKEIN_EXPECT_ORT=1 but SKEIN_TEST_ORT_LIB is not set"
        ),
    }
}
