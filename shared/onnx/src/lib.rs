//! skein-onnx: ONNX models for Skein, run on CPU with tract.
//!
//! Entry points: [`inspect`] (deploy-time checks and metadata) and [`LoadedModel`] (a parsed
//! model with a bounded plan cache; [`LoadedModel::run`] validates inputs and runs).
//!
//! # Layout
//! - [`proto`]: decoding, operator checks and metadata from the ONNX protobuf.
//! - `graph`: a graph's real inputs and their declared shapes, read by `proto` and
//!   [`specialise`] alike (re-exported as [`proto::real_inputs`] and [`proto::declared_shape`]).
//! - [`specialise`]: splicing the taken branch of `If` nodes whose condition depends only on
//!   rank-0 inputs and constants (silero_vad's `sr`), before tract analyses the graph.
//! - [`convert`]: safe conversion between skein [`Tensor`](skein_proto::Tensor)s and tract's.
//! - [`model`]: [`LoadedModel`], input validation and the LRU plan cache keyed by input shapes
//!   (and the values of specialised inputs).
//! - [`reference`]: the reference cases in `models/` and the tolerance check, shared by tests.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
// A synchronous crate, run on blocking threads: there is no async clock to follow.
#![allow(clippy::disallowed_types)]

#[cfg(target_endian = "big")]
compile_error!("skein-onnx copies tensor bytes as little-endian and needs a little-endian host");

pub mod convert;
mod graph;
pub mod model;
#[cfg(feature = "ort")]
pub mod onnxruntime;
pub mod proto;
pub mod reference;
pub mod specialise;

pub use model::{Engine, LoadedModel, PlanCacheConfig, RunOutput};
#[cfg(feature = "ort")]
pub use onnxruntime::{OrtEngine, OrtEp, OrtOptions};
pub use proto::{inspect, inspect_engines, inspect_for, ModelMetadata};
#[cfg(feature = "gpu")]
pub use skein_gpu;

use skein_proto::ErrorCode;

/// Errors of loading and running ONNX models.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum OnnxError {
    /// The bytes are not a usable ONNX model (not protobuf, truncated, no graph...).
    #[error("not a valid ONNX model: {0}")]
    InvalidModel(String),
    /// The graph uses operators the tract backend does not implement.
    #[error("unsupported operator{} {}: the tract CPU backend does not implement {}; run this model with a backend that does (e.g. ONNX Runtime) or re-export it without these operators", if ops.len() > 1 { "s" } else { "" }, ops.join(", "), if ops.len() > 1 { "them" } else { "it" })]
    UnsupportedOperator {
        /// `domain::op_type` (or just `op_type` for the default domain), sorted, unique.
        ops: Vec<String>,
    },
    /// The graph uses operators (or attributes) the GPU backend does not implement.
    #[error("the GPU backend does not implement {}: serve this model on the CPU backend (tract), e.g. deploy it without `--accelerator gpu`", .ops.join(", "))]
    GpuUnsupported {
        /// The operators (with the attribute at fault where that is the reason), sorted,
        /// unique.
        ops: Vec<String>,
    },
    /// No engine Skein has (tract, ONNX Runtime, the GPU backend) implements these operators.
    #[error("unsupported operator{} {}: neither tract nor ONNX Runtime implements {}; re-export the model without {}", if ops.len() > 1 { "s" } else { "" }, ops.join(", "), if ops.len() > 1 { "them" } else { "it" }, if ops.len() > 1 { "them" } else { "it" })]
    NoEngine {
        /// `domain::op_type` (or just `op_type` for the default domain), sorted, unique.
        ops: Vec<String>,
    },
    /// The inputs do not match what the model declares.
    #[error("{0}")]
    InvalidInput(String),
    /// tract failed to optimise or run the model for these inputs.
    #[error("model execution failed: {0}")]
    Execution(String),
}

impl OnnxError {
    /// The wire error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            OnnxError::InvalidModel(_) => ErrorCode::InvalidModel,
            OnnxError::UnsupportedOperator { .. }
            | OnnxError::GpuUnsupported { .. }
            | OnnxError::NoEngine { .. } => ErrorCode::UnsupportedOperator,
            OnnxError::InvalidInput(_) => ErrorCode::InvalidInput,
            OnnxError::Execution(_) => ErrorCode::Internal,
        }
    }
}

/// Render a tract error with its causes on one line.
pub(crate) fn chain(e: &tract_onnx::prelude::TractError) -> String {
    format!("{e:#}")
}
