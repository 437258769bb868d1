//! `/skein/artifact/1`: chunks of model artifacts between mesh nodes, one request per stream
//! ([`crate::streams`]). The caller writes one frame ([`crate::codec`]) whose header is a
//! [`skein_proto::ChunkRequest`] (artifact, byte range, the coordinator's grant); the holder
//! answers one frame: a [`skein_proto::ChunkResponse`] header and, when `Ok`, the bytes as its
//! payload. Frames are bounded on both sides ([`MAX_REQUEST_FRAME`], the range's size plus
//! [`MAX_RESPONSE_OVERHEAD`]).
//!
//! Who may ask, what is served and how fast is the holder's policy (the node's
//! `peer_artifacts`); this module names the protocol and its bounds.

use libp2p::StreamProtocol;

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/skein/artifact/1");

/// Largest request frame, bytes (a request is a name, a range and a grant).
pub const MAX_REQUEST_FRAME: u32 = 16 << 10;

/// Header room of a response frame beyond the bytes asked for, bytes.
pub const MAX_RESPONSE_OVERHEAD: u32 = 16 << 10;

/// The largest range one request may ask for, bytes.
pub const MAX_RANGE: u64 = 16 << 20;
