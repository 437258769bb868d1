//! Helpers shared by the CLI's integration tests (each test file is its own crate and uses
//! some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Child;

/// The repository root: the CLI runs there, so `models/...` paths read as in the docs.
pub(crate) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

/// `skein-node`, built next to `skein` by `cargo test --workspace` (canonical path).
pub(crate) fn node_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_skein")).with_file_name("skein-node");
    assert!(
        p.is_file(),
        "{} is missing: run the tests with --workspace so the node binary is built",
        p.display()
    );
    p.canonicalize().expect("canonical path")
}

/// A child process, killed on drop.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
