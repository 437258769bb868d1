//! `/skein/infer/1`: one inference request per stream, carrying exactly the `skein/infer`
//! frames of the QUIC path ([`crate::codec`]); streams are [`crate::streams`]'.

use libp2p::StreamProtocol;

pub use crate::streams::{Inbound, OpenError};

/// The protocol name: the `skein/infer` frames, unchanged.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/skein/infer/1");
