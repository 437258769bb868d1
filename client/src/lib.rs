//! skein-client: the Skein Rust SDK.
//!
//! ```no_run
//! # async fn demo() -> Result<(), skein_client::Error> {
//! use skein_client::{Client, Profile};
//! use skein_proto::Tensor;
//! let profile = Profile::load_default()?; // written by `skein up`
//! let client = Client::from_profile(&profile).await?;
//! let x = Tensor::from_f32("x", vec![1, 3, 48, 192], &vec![0.0; 3 * 48 * 192])?;
//! let result = client.infer("ppocr_cls", vec![x]).await?;
//! println!("{:?} served by {}", result.outputs, result.meta.node);
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`profile`]: where the coordinator is and the credentials to use ([`Profile`]).
//! - [`client`]: [`Client`]: resolve through the coordinator (cached for the answer's TTL),
//!   call nodes directly over QUIC (`skein/infer`), fail over to the next candidate.
//!   Control requests go through skein-net's `CtlClient` (one coordinator connection,
//!   reconnected on demand); [`Client::fetch_artifact`] uses skein-net's `artifact::fetch`.
//! - [`path`]: direct QUIC, or the peer layer (feature `peer`, default on) for nodes behind
//!   NAT: relayed at once, hole-punched once DCUtR makes a direct connection.
//! - [`lan`]: LAN discovery (`_skein-peer._udp` over mDNS): with [`ClientConfig::lan`] on, a
//!   client that cannot reach its coordinator calls the nodes on its LAN that serve the model
//!   with the route tickets of its last resolves.
//! - `routing`: the per-call choice of node (the coordinator's ranking re-scored with this
//!   client's own latency and load observations), failed-node avoidance, the client's network
//!   coordinate and RTT samples.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod client;
pub mod lan;
pub mod path;
pub mod profile;
mod routing;

pub use client::{
    ApiKey, CallConnection, Client, ClientConfig, ConnectionKind, InferOptions, InferResult,
};
pub use lan::LanConfig;
pub use path::CallPath;
pub use profile::Profile;
pub use skein_policy::routing::Strategy;
pub use skein_proto::{ErrorCode, ResponseMeta, Tensor, WireError};

/// Errors of the SDK.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The coordinator or a node answered with an error.
    #[error(transparent)]
    Remote(#[from] WireError),
    /// The network failed (connection refused or lost, stream reset).
    #[error("transport: {0}")]
    Transport(String),
    /// The request did not complete before its deadline.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The profile or configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// A tensor is malformed.
    #[error(transparent)]
    Tensor(#[from] skein_proto::TensorError),
    /// The coordinator did not answer within [`ClientConfig::coordinator_timeout`] (or its
    /// connection could not be made), and no LAN route could stand in for it.
    #[error("coordinator unreachable at {addr}: {reason}")]
    CoordinatorUnreachable {
        /// The coordinator's address.
        addr: std::net::SocketAddr,
        /// What failed, and what was tried instead.
        reason: String,
    },
}

impl Error {
    /// The stable wire error code, when there is one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Remote(e) => Some(e.code),
            Error::Timeout(_) => Some(ErrorCode::DeadlineExceeded),
            Error::Tensor(_) => Some(ErrorCode::InvalidTensor),
            _ => None,
        }
    }
}

impl From<skein_net::CtlError> for Error {
    fn from(e: skein_net::CtlError) -> Self {
        match e {
            skein_net::CtlError::Remote(w) => Error::Remote(w),
            skein_net::CtlError::Net(n) => n.into(),
            other => Error::Transport(other.to_string()),
        }
    }
}

impl From<skein_net::artifact::FetchError> for Error {
    fn from(e: skein_net::artifact::FetchError) -> Self {
        use skein_net::artifact::FetchError;
        match e {
            FetchError::Remote(w) => Error::Remote(w),
            FetchError::Transfer {
                source: skein_net::NetError::Timeout(d),
                ..
            } => Error::Timeout(d),
            e @ (FetchError::HashMismatch { .. } | FetchError::SizeMismatch { .. }) => {
                Error::Remote(e.into())
            }
            other => Error::Transport(other.to_string()),
        }
    }
}

impl From<skein_net::NetError> for Error {
    fn from(e: skein_net::NetError) -> Self {
        match e {
            skein_net::NetError::Frame(f) => Error::Remote(f.into()),
            skein_net::NetError::Timeout(d) => Error::Timeout(d),
            other => Error::Transport(other.to_string()),
        }
    }
}
