//! skein-net: the Skein transport.
//!
//! # Layout
//! - [`ctl`]: [`CtlClient`], the one client of the control protocol (node agent and SDK):
//!   reconnects on demand, bounded frames, `CtlResponse::Error` as [`ctl::CtlError::Remote`].
//! - [`artifact`]: [`artifact::fetch`], the one artifact download (node cache and SDK):
//!   chunks in parallel from the coordinator ([`artifact::ArtifactSource`],
//!   [`artifact::CoordinatorSource`]) and from peers that hold the artifact
//!   ([`artifact::PeerChunks`]), each verified against the chunk manifest, resumable from a
//!   `.partial` file, size-bounded, the whole file sha256-checked at the end.
//! - [`grant`]: artifact grants, signed with the route-ticket keys: who may fetch chunks from
//!   a holder.
//! - [`serve`]: the accept loop every Skein server shares.
//! - [`tls`]: the mesh CA ([`MeshCa`]), identities ([`Credentials`]), rustls configs for mutual
//!   TLS, and the pinned-CA verifier a node uses on its first join.
//! - [`endpoint`]: quinn endpoints and transport settings for the two ALPNs.
//! - [`transport`]: the [`TransportProfile`] of mesh connections (initial window, congestion
//!   controller, pacing).
//! - [`stream`]: one request per bidirectional stream: [`stream::write_frame`],
//!   [`stream::read_frame`], and raw-byte transfer with limits.
//! - [`ticket`]: Ed25519 route tickets: [`ticket::TicketSigner`] (coordinator, with key
//!   rotation) and [`ticket::TicketVerifier`] (nodes, offline).
//!
//! Crypto: `ring` is the one provider, installed explicitly by [`install_crypto_provider`].
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod artifact;
pub mod ctl;
pub mod endpoint;
pub mod grant;
pub mod serve;
pub mod stream;
pub mod ticket;
pub mod tls;
pub mod transport;

pub use ctl::{CtlClient, CtlConfig, CtlError};
pub use endpoint::{client_endpoint, server_endpoint, TransportLimits};
pub use tls::{
    coordinator_server_name, node_id_from_public_key, node_server_name, Credentials, MeshCa,
    TlsError,
};
pub use transport::{Congestion, Pacing, TransportProfile};

/// Install `ring` as rustls's process-wide crypto provider (idempotent).
pub fn install_crypto_provider() {
    // An Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Errors of the transport layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The connection could not be made or broke.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Connecting failed before the handshake.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// Writing to a stream failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading a stream failed.
    #[error("read: {0}")]
    Read(String),
    /// The stream ended before a whole frame arrived.
    #[error("stream closed before a whole frame arrived")]
    Closed,
    /// The frame is invalid.
    #[error(transparent)]
    Frame(#[from] skein_proto::FrameError),
    /// The operation did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Local IO failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The server did not accept this 0-RTT flight: nothing sent in it reached the server's
    /// application, so it may be sent again on the completed connection.
    #[error("0-RTT rejected")]
    ZeroRttRejected,
}

impl NetError {
    /// Whether this is a rejected 0-RTT flight (reading or writing).
    pub fn is_zero_rtt_rejected(&self) -> bool {
        matches!(
            self,
            NetError::ZeroRttRejected | NetError::Write(quinn::WriteError::ZeroRttRejected)
        )
    }
}

impl From<NetError> for skein_proto::WireError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Frame(f) => f.into(),
            NetError::Timeout(_) => {
                skein_proto::WireError::new(skein_proto::ErrorCode::DeadlineExceeded, e.to_string())
            }
            other => {
                skein_proto::WireError::new(skein_proto::ErrorCode::Internal, other.to_string())
            }
        }
    }
}
