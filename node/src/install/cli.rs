//! The flags of `skein-node install | uninstall | status`, and what each does.

use super::plan::{self, InstallPlan, InstallSpec};
use crate::backend::BackendChoice;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Service subcommands of `skein-node` (without one, the node runs in the foreground).
#[derive(Debug, clap::Subcommand)]
pub enum ServiceCommand {
    /// Install the node as a systemd service: the user `skein`, /etc/skein/node.toml,
    /// /var/lib/skein and a hardened unit, enabled and started (root; idempotent).
    Install(Box<InstallArgs>),
    /// Stop and remove the service, its unit and config (root); --purge also the node's state
    /// (key, certificate, artifact cache) and the user.
    Uninstall(UninstallArgs),
    /// Is the installed node joined, its coordinator reachable, which models are loaded?
    /// Exits 3 when it is not joined, not reachable or not ready.
    Status(StatusArgs),
}

/// `skein-node install`.
#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Coordinator host:port.
    #[arg(long)]
    coordinator: String,
    /// Join token (`skein join-token`; one token may admit a fleet: `--uses N`).
    #[arg(long)]
    join_token: Option<String>,
    /// Labels, KEY=VALUE, repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// What runs the models: auto, tract, ort, wgpu or cuda (default: the node's, auto).
    #[arg(long)]
    backend: Option<BackendChoice>,
    /// UDP address of the infer endpoint (default: the node's, 127.0.0.1:0; devices that
    /// serve other hosts: e.g. 0.0.0.0:7071).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address advertised to clients.
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// Where the node serves /metrics and /ready (`skein-node status` reads them).
    #[arg(long, default_value = plan::DEFAULT_METRICS_LISTEN)]
    metrics_listen: SocketAddr,
    /// Requests of one model that run at once (default: the device's cores).
    #[arg(long)]
    max_concurrency: Option<u32>,
    /// Requests of one model that may wait before `Overloaded` (default 64).
    #[arg(long)]
    max_queue: Option<u32>,
    /// Memory loaded models may hold, e.g. 512MiB, 2GiB (default: half the device's memory);
    /// also caps the service (`MemoryMax`: the budget plus a quarter, at least 256 MiB more).
    #[arg(long, value_parser = parse_bytes)]
    memory_budget: Option<u64>,
    /// Disk the artifact cache may hold, e.g. 4GiB (default 10 GiB).
    #[arg(long, value_parser = parse_bytes)]
    cache_budget: Option<u64>,
    /// The binary the unit runs (default: this one where a package put it, else a copy of it
    /// in /usr/local/bin).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Install under this directory (an image being built, a test) instead of /; the user is
    /// created in DIR/etc/passwd, and nothing is started.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Enable the unit but do not start it (image builders).
    #[arg(long)]
    no_start: bool,
    /// Show every file it would write, and write nothing.
    #[arg(long)]
    print: bool,
}

/// `skein-node uninstall`.
#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// Also remove /var/lib/skein (the node's key, certificate and artifact cache) and the
    /// user `skein`.
    #[arg(long)]
    purge: bool,
    /// The directory installed under.
    #[arg(long, default_value = "/")]
    root: PathBuf,
}

/// `skein-node status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The node's config file.
    #[arg(long, default_value = plan::CONFIG_PATH)]
    config: PathBuf,
    /// The directory installed under (the config and data directory are read under it).
    #[arg(long, default_value = "/")]
    root: PathBuf,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label `{s}` is not KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

/// `1048576`, `512MiB`, `2GiB`, `500MB`, `1G` (K/M/G alone are powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let at = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(at);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 1073741824, 512MiB, 2GiB)"))?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// The command line as typed, for error messages that say what to run.
fn typed() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

/// Run one service subcommand.
pub async fn run(cmd: ServiceCommand) -> anyhow::Result<()> {
    match cmd {
        ServiceCommand::Install(a) => install(*a),
        ServiceCommand::Uninstall(a) => {
            super::require_root("skein-node uninstall", &typed())?;
            for c in super::uninstall(&a.root, a.purge)? {
                println!("{c}");
            }
            Ok(())
        }
        ServiceCommand::Status(a) => {
            let path = super::under(&a.root, &a.config);
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "reading {} (is the node installed? `skein-node install`)",
                    path.display()
                )
            })?;
            let config: crate::NodeConfig =
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            let s = super::status::status(&a.root, &config).await;
            print!("{s}");
            if !s.healthy() {
                std::process::exit(3);
            }
            Ok(())
        }
    }
}

fn install(a: InstallArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .context("finding this binary")?;
    // The unit runs the binary a package installed in place; any other copy (a download, a
    // build) is copied to /usr/local/bin first.
    let (bin, copy_from) = match a.bin {
        Some(b) => (b, None),
        None => {
            let in_place = [plan::PACKAGED_BIN, plan::INSTALLED_BIN]
                .into_iter()
                .find(|p| super::under(&a.root, Path::new(p)) == exe);
            match in_place {
                Some(p) => (PathBuf::from(p), None),
                None => (PathBuf::from(plan::INSTALLED_BIN), Some(exe.as_path())),
            }
        }
    };
    anyhow::ensure!(bin.is_absolute(), "--bin must be an absolute path");
    let spec = InstallSpec {
        coordinator: a.coordinator,
        join_token: a.join_token,
        labels: a.labels.into_iter().collect(),
        backend: a.backend,
        listen: a.listen,
        advertise: a.advertise,
        metrics_listen: a.metrics_listen,
        max_concurrency: a.max_concurrency,
        max_queue: a.max_queue,
        memory_budget: a.memory_budget,
        cache_budget: a.cache_budget,
        bin,
    };
    let plan = InstallPlan::new(&spec, copy_from);
    if a.print {
        print!("{}", super::describe(&plan));
        return Ok(());
    }
    super::require_root("skein-node install", &typed())?;
    let changes = super::apply(&a.root, &plan)?;
    let changed = changes.iter().any(|c| matches!(c, super::Change::Wrote(_)));
    for c in &changes {
        println!("{c}");
    }
    if a.root != Path::new("/") {
        println!("installed under {}: nothing started", a.root.display());
    } else if a.no_start {
        println!("enabled; not started (--no-start): it starts at the next boot");
    } else {
        super::start(changed)?;
        println!(
            "started {} (`skein-node status` to check it)",
            plan::UNIT_NAME
        );
    }
    if !changed {
        println!("nothing to change");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_bad_ones_are_refused() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("500MB"), Ok(500_000_000));
        for bad in ["", "MiB", "12 parsecs", "99999999999999TiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }
}
