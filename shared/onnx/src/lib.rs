//! skein-onnx: interface placeholder, replaced by the real implementation on merge.
#![allow(missing_docs, unreachable_pub)]
use skein_proto::{ErrorCode, Tensor, TensorSpec};

pub struct ModelMetadata {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub opsets: Vec<(String, i64)>,
    pub producer: String,
    pub specialised_inputs: Vec<String>,
}
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OnnxError {
    #[error("invalid model: {0}")]
    InvalidModel(String),
    #[error("unsupported operator(s): {}", ops.join(", "))]
    UnsupportedOperator { ops: Vec<String> },
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    Execution(String),
}
impl OnnxError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::Internal
    }
}
pub fn inspect(_bytes: &[u8]) -> Result<ModelMetadata, OnnxError> {
    Err(OnnxError::InvalidModel("placeholder".into()))
}
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanCacheConfig {
    pub capacity: usize,
}
pub struct LoadedModel;
pub struct RunOutput {
    pub outputs: Vec<Tensor>,
    pub plan_built: bool,
    pub plan_us: u64,
    pub run_us: u64,
}
impl LoadedModel {
    pub fn load(_bytes: &[u8], _config: PlanCacheConfig) -> Result<LoadedModel, OnnxError> {
        Err(OnnxError::InvalidModel("placeholder".into()))
    }
    pub fn metadata(&self) -> &ModelMetadata {
        unreachable!()
    }
    pub fn run(&self, _inputs: Vec<Tensor>) -> Result<RunOutput, OnnxError> {
        Err(OnnxError::InvalidModel("placeholder".into()))
    }
}
