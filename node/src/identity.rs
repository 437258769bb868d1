//! The node's identity: a key kept on disk, a certificate from the mesh CA, joining with a token.

use anyhow::{bail, Context};
use skein_net::endpoint::{join_client_config, TransportLimits};
use skein_net::tls::NodeKey;
use skein_net::{Credentials, CtlClient, CtlConfig, CtlError};
use skein_proto::{CtlRequest, CtlResponse, JoinRequest};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Credentials from `dir` if the node joined before.
pub fn load(dir: &Path) -> anyhow::Result<Option<Credentials>> {
    let key = NodeKey::load_or_create(dir)?;
    let (Ok(cert_pem), Ok(ca_pem)) = (
        std::fs::read_to_string(dir.join("node.crt")),
        std::fs::read_to_string(dir.join("ca.crt")),
    ) else {
        return Ok(None);
    };
    Ok(Some(Credentials {
        ca_pem,
        cert_pem,
        key_pem: key.key_pem(),
    }))
}

/// The node id of the key in `dir` (created if missing).
pub fn node_id(dir: &Path) -> anyhow::Result<String> {
    Ok(NodeKey::load_or_create(dir)?.node_id())
}

/// Join the mesh at `coordinator` with `token`, store the certificate in `dir`.
pub async fn join(
    endpoint: &quinn::Endpoint,
    coordinator: SocketAddr,
    token: &str,
    dir: &Path,
    peer: Option<skein_proto::PeerBinding>,
) -> anyhow::Result<Credentials> {
    let key = NodeKey::load_or_create(dir)?;
    let fingerprint = token
        .trim()
        .rsplit('-')
        .next()
        .filter(|f| f.len() == 64)
        .context("the join token is malformed (expected skein1-<secret>-<ca fingerprint>)")?;
    let ctl = CtlClient::new(
        endpoint.clone(),
        coordinator,
        join_client_config(fingerprint, &TransportLimits::default())?,
        CtlConfig {
            connect_timeout: Duration::from_secs(10),
            ..CtlConfig::default()
        },
    );
    let answer = ctl
        .request(CtlRequest::Join(JoinRequest {
            token: token.trim().to_string(),
            csr_pem: key.csr_pem()?,
            hostname: hostname(),
            peer,
        }))
        .await;
    ctl.close(b"joined").await;
    match answer {
        Ok(CtlResponse::Joined(j)) => {
            if j.node_id != key.node_id() {
                bail!(
                    "the coordinator named this node {} but its key says {}",
                    j.node_id,
                    key.node_id()
                );
            }
            std::fs::write(dir.join("node.crt"), &j.cert_pem)?;
            std::fs::write(dir.join("ca.crt"), &j.ca_pem)?;
            tracing::info!(node_id = %j.node_id, "joined the mesh");
            Ok(Credentials {
                ca_pem: j.ca_pem,
                cert_pem: j.cert_pem,
                key_pem: key.key_pem(),
            })
        }
        Err(CtlError::Remote(e)) => {
            Err(anyhow::Error::new(e).context("the coordinator refused the join"))
        }
        Err(e) => Err(anyhow::Error::new(e)
            .context(format!("joining through the coordinator at {coordinator}"))),
        Ok(other) => bail!("unexpected answer to join: {other:?}"),
    }
}

/// This host's name, for people.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}
