//! Which path a call takes to its node: direct QUIC to the node's address, or the peer layer
//! (libp2p, feature `peer`, on by default) for a node behind NAT: over a relay at once, and on
//! the hole-punched direct connection once DCUtR has made one.
//!
//! The peer layer of this client starts on first use (an ephemeral key: a caller needs no
//! identity there; the route ticket in each request is what the node checks). A node is
//! dialled by the PeerId the coordinator bound to it: a peer proving another key is refused.

use crate::Error;
use std::sync::atomic::{AtomicU64, Ordering};

/// The way a call reached its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CallPath {
    /// `skein/infer` over QUIC to the node's advertised address, or the peer layer's direct
    /// connection to an address the node listens on.
    Direct,
    /// The peer layer, through a relay.
    Relayed,
    /// The peer layer, on a hole-punched direct connection.
    HolePunched,
}

impl CallPath {
    /// `direct`, `relayed`, `hole-punched`.
    pub fn as_str(self) -> &'static str {
        match self {
            CallPath::Direct => "direct",
            CallPath::Relayed => "relayed",
            CallPath::HolePunched => "hole-punched",
        }
    }
}

impl std::fmt::Display for CallPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Calls served, by path (for `/metrics`).
#[derive(Debug, Default)]
pub struct PathCounts {
    /// Calls on a direct path.
    pub direct: AtomicU64,
    /// Calls through a relay.
    pub relayed: AtomicU64,
    /// Calls on a hole-punched connection.
    pub hole_punched: AtomicU64,
}

impl PathCounts {
    pub(crate) fn count(&self, p: CallPath) {
        let c = match p {
            CallPath::Direct => &self.direct,
            CallPath::Relayed => &self.relayed,
            CallPath::HolePunched => &self.hole_punched,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether a candidate is to be called through the peer layer: it is behind NAT and can be
/// (this build has the peer layer, the coordinator named its PeerId).
pub(crate) fn through_peer_layer(cand: &skein_proto::Candidate) -> bool {
    cfg!(feature = "peer") && cand.peer.as_ref().is_some_and(|p| p.reachability == "nat")
}

#[cfg(feature = "peer")]
pub(crate) use enabled::PeerCaller;

#[cfg(not(feature = "peer"))]
pub(crate) use disabled::PeerCaller;

/// Without the peer layer: nodes behind NAT cannot be called ([`through_peer_layer`] is
/// always false, so `call` is never reached).
#[cfg(not(feature = "peer"))]
mod disabled {
    use super::*;
    use skein_proto::{InferReply, InferRequest, Tensor};
    use std::time::Duration;

    pub(crate) struct PeerCaller;

    impl PeerCaller {
        pub(crate) fn new(_: &skein_net::TransportProfile) -> PeerCaller {
            PeerCaller
        }

        pub(crate) async fn call(
            &self,
            cand: &skein_proto::Candidate,
            _: &InferRequest,
            _: &[Tensor],
            _: u32,
            _: Duration,
        ) -> Result<((InferReply, Vec<Tensor>), CallPath), Error> {
            Err(Error::Config(format!(
                "node {} is behind NAT and this client was built without the `peer` feature",
                cand.node_id
            )))
        }

        pub(crate) fn hole_punches(&self) -> (u64, u64) {
            (0, 0)
        }
    }
}

#[cfg(feature = "peer")]
mod enabled {
    use super::*;
    use skein_peer::codec::{read_frame, write_frame, FrameIoError};
    use skein_peer::{Keypair, Multiaddr, Path, Peer, PeerConfig, PeerId};
    use skein_proto::{InferReply, InferRequest, InferResponse, Tensor, WireError};
    use std::time::Duration;

    /// This client's peer layer, started on first use.
    pub(crate) struct PeerCaller {
        peer: tokio::sync::OnceCell<Peer>,
        transport: skein_net::TransportProfile,
    }

    impl PeerCaller {
        /// A caller whose peer layer (started on first use) sends with `transport`'s
        /// congestion controller, as the client's direct connections do.
        pub(crate) fn new(transport: &skein_net::TransportProfile) -> PeerCaller {
            PeerCaller {
                peer: tokio::sync::OnceCell::new(),
                transport: transport.clone(),
            }
        }

        async fn peer(&self) -> Result<&Peer, Error> {
            self.peer
                .get_or_try_init(|| async {
                    let config = PeerConfig {
                        congestion: Some(skein_peer::Congestion(
                            self.transport.handshake_tolerant_controller(),
                        )),
                        ..PeerConfig::default()
                    };
                    let (peer, _inbound) = Peer::start(Keypair::generate_ed25519(), config)
                        .await
                        .map_err(|e| Error::Transport(e.to_string()))?;
                    Ok(peer)
                })
                .await
        }

        /// One call to `cand` through the peer layer.
        pub(crate) async fn call(
            &self,
            cand: &skein_proto::Candidate,
            req: &InferRequest,
            inputs: &[Tensor],
            max: u32,
            timeout: Duration,
        ) -> Result<((InferReply, Vec<Tensor>), CallPath), Error> {
            let route = cand.peer.as_ref().ok_or_else(|| {
                Error::Transport(format!("node {} has no peer route", cand.node_id))
            })?;
            let peer_id: PeerId = route.peer_id.parse().map_err(|_| {
                Error::Transport(format!(
                    "node {} has a bad PeerId `{}`",
                    cand.node_id, route.peer_id
                ))
            })?;
            let addrs: Vec<Multiaddr> = route
                .addrs
                .iter()
                .chain(&route.relayed)
                .filter_map(|a| a.parse().ok())
                .collect();
            let peer = self.peer().await?;
            let (mut stream, path) = peer
                .open(peer_id, addrs, timeout)
                .await
                .map_err(|e| Error::Transport(format!("node {}: {e}", cand.node_id)))?;
            let parts: Vec<&[u8]> = inputs.iter().map(|t| t.data()).collect();
            let io = |e: FrameIoError| match e {
                FrameIoError::Frame(f) => Error::Remote(WireError::from(f)),
                other => Error::Transport(other.to_string()),
            };
            write_frame(&mut stream, req, &parts, max)
                .await
                .map_err(io)?;
            let frame = read_frame(&mut stream, max).await.map_err(io)?;
            let header = frame
                .header::<InferResponse>()
                .map_err(|e| Error::Remote(e.into()))?;
            let path = match path {
                Path::Direct => CallPath::Direct,
                Path::HolePunched => CallPath::HolePunched,
                Path::Relayed => CallPath::Relayed,
            };
            match header {
                InferResponse::Ok(reply) => {
                    let outputs = frame
                        .tensors(&reply.outputs)
                        .map_err(|e| Error::Remote(e.into()))?;
                    Ok(((reply, outputs), path))
                }
                InferResponse::Err(e) => Err(Error::Remote(e)),
                _ => Err(Error::Transport("unknown inference response".into())),
            }
        }

        /// Hole punches tried and made by this client's peer layer.
        pub(crate) fn hole_punches(&self) -> (u64, u64) {
            match self.peer.get() {
                Some(p) => (
                    p.metrics().hole_punch_attempts(),
                    p.metrics().hole_punch_successes.load(Ordering::Relaxed),
                ),
                None => (0, 0),
            }
        }
    }
}
