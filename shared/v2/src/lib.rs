//! skein-v2: the Open Inference Protocol (KServe V2) wire format, without a server.
//!
//! What crosses an HTTP request's body, both ways, and nothing else: no async runtime, no HTTP
//! stack, no mesh client. The gateway (`skein-gateway`, in the coordinator and in every node) and
//! the CLI's HTTP bench use it through the gateway's re-exports; the fuzz targets
//! (`tests/fuzz`) build it alone, with ASan, in a minute instead of the whole mesh stack.
//!
//! # Layout
//! - [`codec`]: V2 JSON tensors and the binary tensor data extension, both ways; its JSON goes
//!   through `fastjson` (a strict reader for the everyday request shape, about 45 % fewer
//!   instructions than serde_json on a 230 KB tensor) and falls back to serde_json for everything
//!   else. Both readers build the request types of `request_json`.
//! - [`encoding`]: gzip/deflate request bodies (bounded) and `Accept-Encoding`.
//! - [`V2Error`]: why a body was refused, with the HTTP status it stands for.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod codec;
pub mod encoding;
mod fastjson;
mod request_json;

/// Why a body could not be decoded or encoded. The gateway turns each variant into the
/// `GatewayError` of the same name (and so the same status and message).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum V2Error {
    /// The request is malformed: bad JSON, an unknown datatype, data that does not fit the shape
    /// or datatype, binary sizes that disagree with the body, a corrupt compressed body.
    #[error("{0}")]
    BadRequest(String),
    /// What the body decompresses to is larger than the limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The `Content-Encoding` of the body is not one this crate decodes.
    #[error("unsupported Content-Encoding `{0}` (use gzip, deflate or identity)")]
    UnsupportedEncoding(String),
    /// Encoding a response or request failed (not the peer's doing).
    #[error("{0}")]
    Internal(String),
}

impl V2Error {
    /// The HTTP status this error stands for: 400, 413, 415 or 500.
    pub fn status(&self) -> u16 {
        match self {
            V2Error::BadRequest(_) => 400,
            V2Error::PayloadTooLarge { .. } => 413,
            V2Error::UnsupportedEncoding(_) => 415,
            V2Error::Internal(_) => 500,
        }
    }
}
