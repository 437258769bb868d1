//! skein-gpu: ONNX models on accelerators, through burn.
//!
//! burn compiles ONNX to Rust at build time (`burn-onnx`); a serving mesh gets models at run
//! time. So this crate is a run-time interpreter: [`onnx-ir`](onnx_ir) parses the model into a
//! typed graph (shapes inferred, constants folded), and [`GpuModel::run`] walks its nodes in
//! order, calling burn tensor operations on the chosen [`Device`] (wgpu by default: Vulkan,
//! Metal, DX12, or lavapipe without a GPU; CUDA behind the `cuda` feature).
//!
//! # Values
//! Every float tensor lives on the device as a burn `Tensor<6>`, its logical shape padded with
//! leading 1s (NumPy broadcasting pads the same way, so elementwise operations broadcast for
//! free), with its logical rank beside it; operations that need a fixed rank (convolutions,
//! pooling) reshape, which costs nothing for contiguous tensors. Integer tensors (shapes,
//! indices, the arithmetic on them) stay on the host: they are small, and they decide the
//! shapes of the device work.
//!
//! # Failures
//! A graph with operators this interpreter lacks is refused at load with every such operator
//! named ([`GpuError::UnsupportedOperator`]), so the caller can fall back to the CPU backend.
//! Shape errors burn reports by panicking are caught and returned as [`GpuError::Execution`].
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
// Synchronous, run on blocking threads.
#![allow(clippy::disallowed_types)]

mod interp;
mod probe;

pub use burn_tensor::Device;
pub use interp::GpuModel;
pub use probe::{adapters, default_device, Adapter};

/// Errors of loading and running a model on the GPU backend.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// onnx-ir could not parse the model.
    #[error("not a valid ONNX model for the GPU backend: {0}")]
    InvalidModel(String),
    /// The graph uses operators (or attributes) the GPU backend does not implement.
    #[error("the GPU backend does not implement {}: serve this model on the CPU backend (tract)", .ops.join(", "))]
    UnsupportedOperator {
        /// The operators, with the unsupported attribute where that is the reason; sorted,
        /// unique.
        ops: Vec<String>,
    },
    /// The inputs do not fit the graph.
    #[error("{0}")]
    InvalidInput(String),
    /// The device failed, or an operation failed on these shapes.
    #[error("GPU execution failed: {0}")]
    Execution(String),
    /// No usable adapter.
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),
}

/// Run `f`, turning a panic (burn reports shape errors by panicking) into `err`.
pub(crate) fn guarded<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, GpuError>,
) -> Result<T, GpuError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            Err(GpuError::Execution(format!("{what}: {msg}")))
        }
    }
}
