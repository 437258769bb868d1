//! Errors that cross the wire: a closed, versioned set of codes plus a human message.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Stable error codes. The numeric values never change; new codes are only appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request could not be decoded (bad frame, bad bincode, wrong message for the ALPN).
    Malformed,
    /// The peer speaks a protocol version this side does not.
    UnsupportedVersion,
    /// A frame is larger than the maximum frame size.
    FrameTooLarge,
    /// A tensor is larger than allowed, or malformed (shape and byte size disagree).
    InvalidTensor,
    /// No model of that name is deployed.
    UnknownModel,
    /// The model exists but not in the version asked for.
    UnknownVersion,
    /// An input is missing, unexpected, or has the wrong datatype or shape for the model.
    InvalidInput,
    /// The uploaded bytes are not a valid ONNX model.
    InvalidModel,
    /// The model uses an operator that no backend of this mesh implements.
    UnsupportedOperator,
    /// The uploaded or fetched bytes do not hash to the announced sha256.
    HashMismatch,
    /// The upload is larger than the coordinator accepts.
    UploadTooLarge,
    /// The node is not a member of this mesh (never joined, or forgotten).
    UnknownNode,
    /// The join token is not one this coordinator issued.
    InvalidJoinToken,
    /// The join token has expired.
    ExpiredJoinToken,
    /// The caller did not present valid credentials for this operation.
    Unauthenticated,
    /// No healthy node can serve the model right now.
    NoCapacity,
    /// The node is too busy; retry later or elsewhere.
    Overloaded,
    /// The request could not complete before its deadline.
    DeadlineExceeded,
    /// The node failed to load the model.
    ModelLoadFailed,
    /// The artifact is not in the store.
    UnknownArtifact,
    /// The model version already exists with different content.
    VersionConflict,
    /// Something failed inside the server; the message says what.
    Internal,
    /// The server is shutting down.
    ShuttingDown,
    /// The credentials are valid but do not allow this (scope, tenant, revoked node).
    Forbidden,
    /// A tenant limit was reached (rate, concurrency, monthly compute); `retry_after_ms` says
    /// when to try again.
    QuotaExceeded,
    /// The route ticket is missing, forged, expired, or for another model: resolve again.
    InvalidTicket,
    /// The thing to create exists already.
    Conflict,
    /// No such tenant, key or node.
    NotFound,
    /// The node cannot reach its coordinator and the route ticket is older than its tenant's
    /// offline validity: only the coordinator can issue a new one (issue 20: appended).
    TicketOfflineExpired,
}

impl ErrorCode {
    /// A stable, lower-case name for logs, JSON and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::InvalidTensor => "invalid_tensor",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::UnknownVersion => "unknown_version",
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::InvalidModel => "invalid_model",
            ErrorCode::UnsupportedOperator => "unsupported_operator",
            ErrorCode::HashMismatch => "hash_mismatch",
            ErrorCode::UploadTooLarge => "upload_too_large",
            ErrorCode::UnknownNode => "unknown_node",
            ErrorCode::InvalidJoinToken => "invalid_join_token",
            ErrorCode::ExpiredJoinToken => "expired_join_token",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::NoCapacity => "no_capacity",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::ModelLoadFailed => "model_load_failed",
            ErrorCode::UnknownArtifact => "unknown_artifact",
            ErrorCode::VersionConflict => "version_conflict",
            ErrorCode::Internal => "internal",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::InvalidTicket => "invalid_ticket",
            ErrorCode::Conflict => "conflict",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TicketOfflineExpired => "ticket_offline_expired",
        }
    }

    /// Whether the same request may succeed on another node or later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Overloaded
                | ErrorCode::NoCapacity
                | ErrorCode::ShuttingDown
                | ErrorCode::ModelLoadFailed
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as sent to a peer: a stable code and a message a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    /// The stable code.
    pub code: ErrorCode,
    /// What went wrong and, where possible, what to do.
    pub message: String,
    /// For `Overloaded` and `NoCapacity`: when a retry is likely to succeed, ms.
    // No `skip_serializing_if`: bincode is not self-describing, every field is always written.
    pub retry_after_ms: Option<u64>,
}

impl WireError {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// The same error with a retry-after hint.
    pub fn retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }
}

impl From<crate::tensor::TensorError> for WireError {
    fn from(e: crate::tensor::TensorError) -> Self {
        WireError::new(ErrorCode::InvalidTensor, e.to_string())
    }
}

impl From<crate::frame::FrameError> for WireError {
    fn from(e: crate::frame::FrameError) -> Self {
        let code = match &e {
            crate::frame::FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            crate::frame::FrameError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            crate::frame::FrameError::Tensor(_) => ErrorCode::InvalidTensor,
            _ => ErrorCode::Malformed,
        };
        WireError::new(code, e.to_string())
    }
}
