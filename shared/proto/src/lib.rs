//! skein-proto: the Skein wire protocol, with no IO and no async runtime. It depends on no other
//! Skein crate: every other one builds on it (`scripts/check-crate-graph` checks it).
//!
//! # Layout
//! - [`artifact`]: [`ArtifactId`], a model artifact's sha256 (validated; a plain string on the
//!   wire).
//! - [`tensor`]: [`Tensor`] (V2 datatype, shape, raw little-endian bytes), its frame
//!   descriptor [`TensorDesc`], and [`DataType`].
//! - [`error`]: [`ErrorCode`] and [`WireError`], the closed set of errors that cross the wire.
//! - [`frame`]: length-prefixed frames with a hard maximum size: `u32 len | u16 version |
//!   u32 header_len | bincode header | raw payload`.
//! - [`msg`]: the versioned messages of the two ALPNs, [`ALPN_CTL`] and [`ALPN_INFER`].
//! - [`security`]: the control-request envelope (API key), route tickets, usage records, and
//!   the admin requests on tenants, keys, usage and audit.
//! - [`time`]: UTC calendar arithmetic (monthly budgets, printed timestamps).
//! - [`trace`]: [`TraceContext`], W3C-style trace ids carried from hop to hop.
//! - [`prom`]: request counters and latency histograms in the Prometheus text format.
//! - [`npy`]: NumPy `.npy` encoding and decoding of tensors (used by the CLI).
//!
//! Every decoder here is bounded: frame length, header length, tensor byte sizes and element
//! counts are checked before anything is allocated.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod artifact;
pub mod error;
pub mod frame;
pub mod msg;
pub mod npy;
pub mod prom;
pub mod security;
pub mod tensor;
pub mod time;
pub mod trace;

pub use artifact::{ArtifactId, InvalidArtifactId};
/// Shared, cheaply cloned bytes: tensor data and frame payloads.
pub use bytes::Bytes;
pub use error::{ErrorCode, WireError};
pub use frame::{Frame, FrameError, DEFAULT_MAX_FRAME_LEN, HARD_MAX_FRAME_LEN};
pub use msg::*;
pub use tensor::{DataType, Tensor, TensorDesc, TensorError};
pub use trace::TraceContext;

/// Version of the wire messages; carried in every frame.
pub const PROTOCOL_VERSION: u16 = 1;

/// ALPN of the control plane (node ↔ coordinator, client ↔ coordinator).
pub const ALPN_CTL: &[u8] = b"skein/ctl";
/// ALPN of the data plane (client → node inference).
pub const ALPN_INFER: &[u8] = b"skein/infer";
