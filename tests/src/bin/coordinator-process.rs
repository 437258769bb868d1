//! A coordinator in a process of its own, for tests that kill it (`kill -9`).
//!
//! Usage: `coordinator-process CONFIG.toml` (a `CoordinatorConfig` in TOML). Prints
//! `ready ADDR` on stdout once serving; on SIGTERM or SIGINT it stops.

use anyhow::Context;
use skein_coordinator::{Coordinator, CoordinatorConfig};
use std::io::Write;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Warnings to stderr; traces to a collector when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    skein_node::logging::init(
        "warn",
        "warn",
        skein_node::logging::LogFormat::Text,
        "skein-coordinator",
    );
    let path = std::env::args()
        .nth(1)
        .context("usage: coordinator-process CONFIG.toml")?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let config: CoordinatorConfig =
        toml::from_str(&text).with_context(|| format!("parsing {path}"))?;
    let c = Coordinator::start(config).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready {}", c.addr())?;
        out.flush()?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    c.shutdown().await;
    Ok(())
}
