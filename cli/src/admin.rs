//! `skein deploy`, `skein models`, `skein nodes`.

use crate::output::{json, table};
use crate::OutputFormat;
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub(crate) struct DeployArgs {
    /// The ONNX file.
    file: PathBuf,
    /// Model name (1-64 of A-Z a-z 0-9 _ . -).
    #[arg(long)]
    name: String,
    /// Version; the next integer when omitted.
    #[arg(long)]
    version: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ListArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
}

pub(crate) async fn deploy(args: DeployArgs, profile: &Option<PathBuf>) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let client = crate::client(profile).await?;
    let bar = if args.output == OutputFormat::Table {
        let b = ProgressBar::new(bytes.len() as u64);
        b.set_style(
            ProgressStyle::with_template(
                "uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let info = client
        .deploy(&args.name, args.version.as_deref(), &bytes, |n| {
            bar.set_position(n)
        })
        .await;
    bar.finish_and_clear();
    let info = info.with_context(|| format!("deploying {}", args.file.display()))?;
    match args.output {
        OutputFormat::Json => json(&info)?,
        OutputFormat::Table => {
            println!(
                "deployed {} version {} (sha256 {}, {} bytes)",
                info.name, info.version, info.sha256, info.size
            );
            for t in &info.inputs {
                println!("  input  {:<12} {} {:?}", t.name, t.datatype, t.shape);
            }
            for t in &info.outputs {
                println!("  output {:<12} {} {:?}", t.name, t.datatype, t.shape);
            }
        }
    }
    Ok(())
}

pub(crate) async fn models(args: ListArgs, profile: &Option<PathBuf>) -> anyhow::Result<()> {
    let models = crate::client(profile).await?.models().await?;
    match args.output {
        OutputFormat::Json => json(&models),
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = models
                .iter()
                .map(|m| {
                    vec![
                        m.name.clone(),
                        m.version.clone(),
                        m.sha256[..12].to_string(),
                        m.size.to_string(),
                        m.inputs
                            .iter()
                            .map(|t| format!("{}:{}{:?}", t.name, t.datatype, t.shape))
                            .collect::<Vec<_>>()
                            .join(" "),
                        m.loaded_on.len().to_string(),
                    ]
                })
                .collect();
            table(
                &["NAME", "VERSION", "SHA256", "BYTES", "INPUTS", "LOADED_ON"],
                &rows,
            );
            Ok(())
        }
    }
}

pub(crate) async fn nodes(args: ListArgs, profile: &Option<PathBuf>) -> anyhow::Result<()> {
    let nodes = crate::client(profile).await?.nodes().await?;
    match args.output {
        OutputFormat::Json => json(&nodes),
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    vec![
                        n.node_id.clone(),
                        n.addr.clone(),
                        n.health.as_str().to_string(),
                        format!("{}ms", n.last_seen_ms),
                        n.capacity.cores.to_string(),
                        n.models
                            .iter()
                            .map(|m| format!("{}@{}:{}", m.name, m.version, m.state.as_str()))
                            .collect::<Vec<_>>()
                            .join(" "),
                    ]
                })
                .collect();
            table(
                &["NODE", "ADDR", "HEALTH", "LAST_SEEN", "CORES", "MODELS"],
                &rows,
            );
            Ok(())
        }
    }
}
