//! Reading an ONNX graph's declared inputs: which are real inputs (not initializers) and their
//! declared shapes. Used by `proto` (metadata, checks) and `specialise` (rank-0 inputs).

use std::collections::HashSet;
use tract_onnx::pb;
use tract_onnx::pb::tensor_shape_proto::dimension::Value as Dim;

/// The tensor type of a value, when it is a tensor.
pub(crate) fn tensor_type(v: &pb::ValueInfoProto) -> Option<&pb::type_proto::Tensor> {
    match v.r#type.as_ref()?.value.as_ref()? {
        pb::type_proto::Value::TensorType(t) => Some(t),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Declared shape: `-1` for symbolic or missing dimensions; `None` when the rank is unknown.
pub fn declared_shape(v: &pb::ValueInfoProto) -> Option<Vec<i64>> {
    let shape = tensor_type(v)?.shape.as_ref()?;
    Some(
        shape
            .dim
            .iter()
            .map(|d| match d.value {
                Some(Dim::DimValue(n)) if n >= 0 => n,
                _ => -1,
            })
            .collect(),
    )
}

/// Graph inputs that are not initializers, in graph order.
pub fn real_inputs(graph: &pb::GraphProto) -> Vec<&pb::ValueInfoProto> {
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    graph
        .input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .collect()
}
