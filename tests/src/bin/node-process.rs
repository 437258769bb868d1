//! A node in a process of its own, for tests that kill it (`kill -9`) or stop it (SIGTERM).
//!
//! Usage: `node-process CONFIG.toml` (a `NodeConfig` in TOML). Prints `ready NODE_ID ADDR LOCAL
//! METRICS` (advertised and bound address, the `/metrics` address or `-`) on stdout once
//! serving; on SIGTERM or SIGINT it drains and exits.

use anyhow::Context;
use skein_node::{Node, NodeConfig};
use std::io::Write;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Warnings to stderr (RUST_LOG's filter when set); traces to a collector when
    // OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    skein_node::logging::init(
        &filter,
        "warn",
        skein_node::logging::LogFormat::Text,
        "skein-node",
    );
    let path = std::env::args()
        .nth(1)
        .context("usage: node-process CONFIG.toml")?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let config: NodeConfig = toml::from_str(&text).with_context(|| format!("parsing {path}"))?;
    let node = Node::start(config).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "ready {} {} {} {}",
            node.node_id(),
            node.addr(),
            node.local_addr()?,
            node.metrics_addr()
                .map_or_else(|| "-".to_string(), |a| a.to_string())
        )?;
        out.flush()?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    node.shutdown().await;
    Ok(())
}
