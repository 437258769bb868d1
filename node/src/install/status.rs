//! `skein-node status`: is the installed node joined, is its coordinator reachable (with the
//! node's own certificate), and which models has it loaded (its `/ready` and `/metrics`).

use crate::identity;
use crate::NodeConfig;
use anyhow::Context;
use skein_net::endpoint::{client_config, TransportLimits};
use skein_net::{CtlClient, CtlConfig};
use skein_proto::{CtlRequest, CtlResponse, ALPN_CTL};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long each check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The node's state as `status` finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// The service's state (`systemctl is-active`), when systemd runs here.
    pub service: Option<String>,
    /// The node id, when the node has joined (its certificate is in the state directory).
    pub node_id: Option<String>,
    /// The coordinator it talks to.
    pub coordinator: String,
    /// `Ok(())` when the coordinator answered a request made with the node's certificate.
    pub reachable: Result<(), String>,
    /// Whether `/ready` says the node serves; `None` when it does not answer.
    pub ready: Option<bool>,
    /// Models loaded (`name@version`), from `/metrics`; `None` when it does not answer.
    pub models_loaded: Option<Vec<String>>,
}

impl NodeStatus {
    /// Whether the node is joined, reaches its coordinator and serves.
    pub fn healthy(&self) -> bool {
        self.node_id.is_some() && self.reachable.is_ok() && self.ready == Some(true)
    }
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(s) = &self.service {
            writeln!(f, "service:     {s}")?;
        }
        match &self.node_id {
            Some(id) => writeln!(f, "joined:      yes, as {id}")?,
            None => writeln!(f, "joined:      no (no certificate yet)")?,
        }
        match &self.reachable {
            Ok(()) => writeln!(f, "coordinator: {} reachable", self.coordinator)?,
            Err(e) => writeln!(f, "coordinator: {} NOT reachable: {e}", self.coordinator)?,
        }
        match self.ready {
            Some(r) => writeln!(f, "ready:       {}", if r { "yes" } else { "no" })?,
            None => writeln!(
                f,
                "ready:       unknown (the node's metrics_listen does not answer)"
            )?,
        }
        match &self.models_loaded {
            Some(m) if m.is_empty() => writeln!(f, "models:      none loaded"),
            Some(m) => writeln!(f, "models:      {} loaded: {}", m.len(), m.join(", ")),
            None => writeln!(f, "models:      unknown"),
        }
    }
}

/// The status of the node configured by `config` (its data directory taken under `root`).
pub async fn status(root: &Path, config: &NodeConfig) -> NodeStatus {
    let service = (root == Path::new("/") && super::systemd_running()).then(|| {
        std::process::Command::new("systemctl")
            .args(["is-active", super::plan::UNIT_NAME])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|e| format!("unknown ({e})"))
    });
    let dir = super::under(root, &config.data_dir);
    let creds = if dir.join("node.crt").is_file() {
        identity::load(&dir).ok().flatten()
    } else {
        None
    };
    let node_id = match creds {
        Some(_) => identity::node_id(&dir).ok(),
        None => None,
    };
    let reachable = match &creds {
        Some(c) => tokio::time::timeout(CHECK_TIMEOUT, reach(&config.coordinator, c))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in {CHECK_TIMEOUT:?}")))
            .map_err(|e| format!("{e:#}")),
        None => Err("the node has not joined, so it has no certificate to try".into()),
    };
    let (ready, models_loaded) = match config.metrics_listen {
        Some(addr) => {
            let ready = http_get(addr, "/ready").await.map(|(code, _)| code == 200);
            let models = http_get(addr, "/metrics")
                .await
                .map(|(_, body)| loaded_models(&body));
            (ready, models)
        }
        None => (None, None),
    };
    NodeStatus {
        service,
        node_id,
        coordinator: config.coordinator.clone(),
        reachable,
        ready,
        models_loaded,
    }
}

/// A request the coordinator answers for any joined node and that changes nothing: an empty
/// usage report.
async fn reach(coordinator: &str, creds: &skein_net::Credentials) -> anyhow::Result<()> {
    let addr = tokio::net::lookup_host(coordinator)
        .await
        .with_context(|| format!("resolving `{coordinator}`"))?
        .next()
        .with_context(|| format!("`{coordinator}` resolves to no address"))?;
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let ep = skein_net::client_endpoint(bind)?;
    let ctl = CtlClient::new(
        ep.clone(),
        addr,
        client_config(creds, ALPN_CTL, &TransportLimits::default())?,
        CtlConfig {
            connect_timeout: CHECK_TIMEOUT,
            ..CtlConfig::default()
        },
    );
    let r = ctl.request(CtlRequest::ReportUsage(Vec::new())).await;
    ep.close(0u32.into(), b"status");
    match r? {
        CtlResponse::Error(e) => Err(anyhow::anyhow!("{}: {}", e.code, e.message)),
        _ => Ok(()),
    }
}

/// `GET path` on the node's metrics listener: status code and body.
async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        // Bounded: a node's /metrics is a few kB per model.
        s.take(4 << 20).read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((code, body))
    };
    tokio::time::timeout(CHECK_TIMEOUT, get)
        .await
        .ok()
        .flatten()
}

/// `name@version` of every `skein_model_loaded{...} 1` line.
fn loaded_models(metrics: &str) -> Vec<String> {
    let label = |l: &str, k: &str| {
        let start = l.find(&format!("{k}=\""))? + k.len() + 2;
        let end = l[start..].find('"')? + start;
        Some(l[start..end].to_string())
    };
    let mut models: Vec<String> = metrics
        .lines()
        .filter(|l| l.starts_with("skein_model_loaded{") && l.trim_end().ends_with(" 1"))
        .filter_map(|l| Some(format!("{}@{}", label(l, "model")?, label(l, "version")?)))
        .collect();
    models.sort();
    models.dedup();
    models
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaded_models_are_read_from_the_metrics() {
        let text = "# HELP skein_model_loaded x\n\
            skein_model_loaded{node=\"n\",model=\"ppocr_cls\",version=\"1\"} 1\n\
            skein_model_loaded{node=\"n\",model=\"silero_vad\",version=\"2\"} 0\n\
            skein_model_runs{node=\"n\",model=\"ppocr_cls\",version=\"1\"} 1\n";
        assert_eq!(loaded_models(text), vec!["ppocr_cls@1".to_string()]);
    }
}
