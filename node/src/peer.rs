//! The node's peer layer (skein-peer, libp2p): how callers reach a node that they cannot reach
//! at its advertised address (behind NAT): through a relay at once, then hole-punched.
//!
//! Its key is kept beside the node key (`peer.key`); its PeerId is proven for the node id
//! ([`skein_peer::binding`]) at join and in every heartbeat, with its reachability and
//! addresses ([`report`]). Inbound `/skein/infer/1` streams are served by the agent exactly as
//! `skein/infer` ones; `/skein/artifact/1` ones by [`crate::peer_artifacts`].

use serde::{Deserialize, Serialize};
use skein_peer::{Multiaddr, Peer, PeerConfig, RelayLimits};
use skein_proto::{PeerBinding, PeerReport};
use std::path::Path;

/// The peer layer's settings (`[peer]` in the config file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerSettings {
    /// Run the peer layer (default true).
    pub enabled: bool,
    /// Multiaddrs to listen on (default QUIC `/ip4/0.0.0.0/udp/0/quic-v1` and the TCP fallback
    /// `/ip4/0.0.0.0/tcp/0`).
    pub listen: Vec<String>,
    /// Relays to hold a reservation on, each ending in `/p2p/RELAY_PEER_ID` (default none).
    pub relays: Vec<String>,
    /// Serve as a circuit relay for other nodes (`--relay`), with the default limits (default
    /// false): for a node on a public address.
    pub relay: bool,
    /// How often a lost relay reservation is made again, in ms (default 2000).
    pub relay_retry_ms: u64,
    /// Cap on the artifact bytes served to other nodes, MB/s (10^6 bytes per second; 1 MB/s
    /// = 8 Mbit/s); 0: no cap (default 0). `--peer-upload-limit`.
    pub upload_limit: f64,
}

impl PeerSettings {
    /// The upload cap in bytes per second (`None`: uncapped).
    pub fn upload_limit_bytes(&self) -> Option<f64> {
        (self.upload_limit.is_finite() && self.upload_limit > 0.0)
            .then_some(self.upload_limit * 1e6)
    }
}

impl Default for PeerSettings {
    fn default() -> Self {
        PeerSettings {
            enabled: true,
            listen: vec![
                "/ip4/0.0.0.0/udp/0/quic-v1".into(),
                "/ip4/0.0.0.0/tcp/0".into(),
            ],
            relays: Vec::new(),
            relay: false,
            relay_retry_ms: 2000,
            upload_limit: 0.0,
        }
    }
}

/// A started peer layer: the handle, the binding it proves, the inbound streams.
pub struct NodePeer {
    /// The libp2p peer.
    pub peer: Peer,
    /// Its PeerId, proven for this node.
    pub binding: PeerBinding,
    /// Inbound `/skein/infer/1` streams.
    pub inbound: tokio::sync::mpsc::Receiver<skein_peer::infer::Inbound>,
}

fn multiaddrs(list: &[String], what: &str) -> anyhow::Result<Vec<Multiaddr>> {
    list.iter()
        .map(|a| {
            a.parse()
                .map_err(|e| anyhow::anyhow!("peer {what} `{a}` is not a multiaddr: {e}"))
        })
        .collect()
}

/// The binding of the key in `dir` to `node_id` (the key is created when missing).
pub fn binding(dir: &Path, node_id: &str) -> anyhow::Result<PeerBinding> {
    let key = skein_peer::key::load_or_create(dir)?;
    Ok(skein_peer::binding::bind(&key, node_id)?)
}

/// Start the peer layer with the key in `dir`.
pub async fn start(
    settings: &PeerSettings,
    transport: &skein_net::TransportProfile,
    dir: &Path,
    node_id: &str,
) -> anyhow::Result<NodePeer> {
    let key = skein_peer::key::load_or_create(dir)?;
    let binding = skein_peer::binding::bind(&key, node_id)?;
    let config = PeerConfig {
        listen: multiaddrs(&settings.listen, "listen address")?,
        relays: multiaddrs(&settings.relays, "relay")?,
        relay_server: settings.relay.then(RelayLimits::default),
        relay_retry: std::time::Duration::from_millis(settings.relay_retry_ms.max(10)),
        congestion: Some(skein_peer::Congestion(
            transport.handshake_tolerant_controller(),
        )),
        ..PeerConfig::default()
    };
    let (peer, inbound) = Peer::start(key, config).await?;
    tracing::info!(peer_id = %peer.peer_id(), listen = ?peer.status().listen, "peer layer listening");
    Ok(NodePeer {
        peer,
        binding,
        inbound,
    })
}

/// What the heartbeat says of the peer layer now.
pub fn report(peer: &Peer, binding: &PeerBinding) -> PeerReport {
    let s = peer.status();
    let strings = |v: &[Multiaddr]| v.iter().take(16).map(|a| a.to_string()).collect();
    PeerReport {
        binding: binding.clone(),
        reachability: s.reachability.as_str().into(),
        listen: strings(&s.listen),
        observed: strings(&s.observed),
        relayed: strings(&s.relayed),
    }
}
