//! The ONNX protobuf: decoding, operator checks, metadata.

use crate::graph::tensor_type;
pub use crate::graph::{declared_shape, real_inputs};
use crate::OnnxError;
use skein_proto::{DataType, TensorSpec};
use std::collections::{BTreeSet, HashMap};
use tract_onnx::pb;
use tract_onnx::prelude::Framework;

/// Largest model accepted (2 GiB is protobuf's own limit).
pub const MAX_MODEL_BYTES: usize = 2 << 30;

/// What a model declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelMetadata {
    /// Graph inputs (initializers excluded), V2 datatypes, `-1` for dynamic dimensions.
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs as declared (possibly wrong; never checked against results).
    pub outputs: Vec<TensorSpec>,
    /// `(domain, version)`; `""` is the default ONNX domain.
    pub opsets: Vec<(String, i64)>,
    /// Producer name.
    pub producer: String,
    /// Rank-0 inputs whose values select `If` branches.
    pub specialised_inputs: Vec<String>,
}

/// The ONNX protobuf model type (tract's prost bindings).
pub type Pb = pb::ModelProto;

/// Decode the protobuf.
pub fn decode(bytes: &[u8]) -> Result<pb::ModelProto, OnnxError> {
    if bytes.is_empty() {
        return Err(OnnxError::InvalidModel("the file is empty".into()));
    }
    if bytes.len() > MAX_MODEL_BYTES {
        return Err(OnnxError::InvalidModel(format!(
            "{} bytes exceeds the 2 GiB protobuf limit",
            bytes.len()
        )));
    }
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| {
            OnnxError::InvalidModel(format!("protobuf decoding failed ({})", crate::chain(&e)))
        })?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| OnnxError::InvalidModel("the model has no graph".into()))?;
    if graph.node.is_empty() || graph.output.is_empty() {
        return Err(OnnxError::InvalidModel(
            "the graph has no nodes or no outputs".into(),
        ));
    }
    if proto.ir_version <= 0 || proto.opset_import.is_empty() {
        return Err(OnnxError::InvalidModel(
            "no IR version or operator set import (truncated, or not an ONNX file?)".into(),
        ));
    }
    check_self_contained(graph, 0)?;
    Ok(proto)
}

fn check_tensor(t: &pb::TensorProto) -> Result<(), OnnxError> {
    // External data would make the engine open files named by the model: refuse it.
    if t.data_location == Some(pb::tensor_proto::DataLocation::External as i32)
        || !t.external_data.is_empty()
    {
        return Err(OnnxError::InvalidModel(format!(
            "tensor `{}` keeps its data in an external file; only self-contained models are accepted",
            t.name
        )));
    }
    if t.dims.iter().any(|&d| d < 0) {
        return Err(OnnxError::InvalidModel(format!(
            "tensor `{}` has a negative dimension {:?}",
            t.name, t.dims
        )));
    }
    // The data must be there: a tensor that declares more elements than it carries would have
    // the engine allocate what the dims say (a few bytes can claim terabytes).
    let count = t
        .dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
        .ok_or_else(|| {
            OnnxError::InvalidModel(format!(
                "tensor `{}` declares dims {:?}: more elements than can exist",
                t.name, t.dims
            ))
        })?;
    let carried = if !t.raw_data.is_empty() {
        match element_size(t.data_type) {
            Some(size) => (t.raw_data.len() / size) as u64,
            None => return Ok(()),
        }
    } else {
        (t.float_data.len()
            + t.int32_data.len()
            + t.string_data.len()
            + t.int64_data.len()
            + t.double_data.len()
            + t.uint64_data.len()) as u64
    };
    if carried < count {
        return Err(OnnxError::InvalidModel(format!(
            "tensor `{}` declares dims {:?} ({count} elements) but carries {carried}",
            t.name, t.dims
        )));
    }
    Ok(())
}

/// Bytes per element of an ONNX tensor data type in `raw_data` (`None`: variable or unknown).
fn element_size(data_type: i32) -> Option<usize> {
    use pb::tensor_proto::DataType as T;
    Some(match T::try_from(data_type).ok()? {
        T::Uint8 | T::Int8 | T::Bool => 1,
        T::Uint16 | T::Int16 | T::Float16 | T::Bfloat16 => 2,
        T::Float | T::Int32 | T::Uint32 => 4,
        T::Int64 | T::Uint64 | T::Double | T::Complex64 => 8,
        T::Complex128 => 16,
        _ => return None,
    })
}

/// Each value produced once, and no cycle: Kahn's algorithm over the nodes, where a node
/// depends on the nodes producing its inputs (names from outside the graph are free).
fn check_acyclic(graph: &pb::GraphProto) -> Result<(), OnnxError> {
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            if producer.insert(o.as_str(), i).is_some() {
                return Err(OnnxError::InvalidModel(format!(
                    "value `{o}` is produced by more than one node"
                )));
            }
        }
    }
    let mut waiting = vec![0usize; graph.node.len()];
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); graph.node.len()];
    for (i, n) in graph.node.iter().enumerate() {
        for p in n.input.iter().filter_map(|x| producer.get(x.as_str())) {
            waiting[i] += 1;
            consumers[*p].push(i);
        }
    }
    let mut ready: Vec<usize> = (0..graph.node.len()).filter(|&i| waiting[i] == 0).collect();
    let mut done = 0;
    while let Some(i) = ready.pop() {
        done += 1;
        for &c in &consumers[i] {
            waiting[c] -= 1;
            if waiting[c] == 0 {
                ready.push(c);
            }
        }
    }
    if done < graph.node.len() {
        let stuck = waiting
            .iter()
            .position(|&w| w > 0)
            .map(|i| graph.node[i].name.clone())
            .unwrap_or_default();
        return Err(OnnxError::InvalidModel(format!(
            "the graph has a cycle (through node `{stuck}`)"
        )));
    }
    Ok(())
}

/// Every tensor inline, no sparse initializers, subgraphs nested at most 64 deep.
fn check_self_contained(graph: &pb::GraphProto, depth: usize) -> Result<(), OnnxError> {
    if depth > 64 {
        return Err(OnnxError::InvalidModel(
            "subgraphs nested more than 64 deep".into(),
        ));
    }
    if !graph.sparse_initializer.is_empty() {
        return Err(OnnxError::InvalidModel(
            "sparse initializers are not supported".into(),
        ));
    }
    graph.initializer.iter().try_for_each(check_tensor)?;
    check_acyclic(graph)?;
    for n in &graph.node {
        for a in &n.attribute {
            a.t.iter().chain(&a.tensors).try_for_each(check_tensor)?;
            for g in a.g.iter().chain(&a.graphs) {
                check_self_contained(g, depth + 1)?;
            }
        }
    }
    Ok(())
}

/// Run `f`, turning a panic inside the engine (on hostile input) into an error.
pub(crate) fn guarded<T>(
    what: &str,
    err: impl Fn(String) -> OnnxError,
    f: impl FnOnce() -> Result<T, OnnxError>,
) -> Result<T, OnnxError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(err(format!("{what}: the engine panicked: {msg}")))
    })
}

/// The V2 datatype of an ONNX element type.
pub fn datatype(elem_type: i32) -> Option<DataType> {
    use pb::tensor_proto::DataType as T;
    Some(match T::try_from(elem_type).ok()? {
        T::Float => DataType::Fp32,
        T::Uint8 => DataType::Uint8,
        T::Int8 => DataType::Int8,
        T::Uint16 => DataType::Uint16,
        T::Int16 => DataType::Int16,
        T::Int32 => DataType::Int32,
        T::Int64 => DataType::Int64,
        T::String => DataType::Bytes,
        T::Bool => DataType::Bool,
        T::Float16 => DataType::Fp16,
        T::Double => DataType::Fp64,
        T::Uint32 => DataType::Uint32,
        T::Uint64 => DataType::Uint64,
        T::Bfloat16 => DataType::Bf16,
        _ => return None,
    })
}

fn spec(v: &pb::ValueInfoProto) -> Result<TensorSpec, OnnxError> {
    let elem = tensor_type(v).map(|t| t.elem_type).unwrap_or(0);
    let datatype = datatype(elem).ok_or_else(|| {
        OnnxError::InvalidModel(format!(
            "`{}` has an element type ({elem}) with no V2 datatype",
            v.name
        ))
    })?;
    Ok(TensorSpec {
        name: v.name.clone(),
        datatype,
        shape: declared_shape(v).unwrap_or_default(),
    })
}

fn collect_ops<'a>(graph: &'a pb::GraphProto, out: &mut Vec<&'a pb::NodeProto>) {
    for n in &graph.node {
        out.push(n);
        for a in &n.attribute {
            if let Some(g) = &a.g {
                collect_ops(g, out);
            }
            for g in &a.graphs {
                collect_ops(g, out);
            }
        }
    }
}

/// Every operator tract cannot build, as `domain::op` (or `op` in the default domain).
pub fn unsupported_ops(graph: &pb::GraphProto) -> Vec<String> {
    let onnx = tract_onnx::onnx();
    missing_ops(graph, |n| onnx.op_register.0.contains_key(&n.op_type))
}

/// Operators of `graph` (subgraphs included) that `supported` refuses, as
/// `domain::op_type` (just `op_type` for the default domain), sorted, unique.
pub fn missing_ops(
    graph: &pb::GraphProto,
    supported: impl Fn(&pb::NodeProto) -> bool,
) -> Vec<String> {
    let mut nodes = Vec::new();
    collect_ops(graph, &mut nodes);
    let missing: BTreeSet<String> = nodes
        .iter()
        .filter(|n| !supported(n))
        .map(|n| {
            if n.domain.is_empty() || n.domain == "ai.onnx" {
                n.op_type.clone()
            } else {
                format!("{}::{}", n.domain, n.op_type)
            }
        })
        .collect();
    missing.into_iter().collect()
}

/// ONNX operators (default domain) the GPU backend (skein-gpu) runs. Some are further limited
/// by their attributes or rank (Conv and pooling are 2-D); loading on the GPU names those. Kept
/// here, not in skein-gpu, so the coordinator can check a GPU-only deployment without burn.
const GPU_OPS: &[&str] = &[
    "Abs",
    "Add",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "Conv",
    "ConvTranspose",
    "Div",
    "Dropout",
    "Exp",
    "Flatten",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "LeakyRelu",
    "Log",
    "MatMul",
    "MaxPool",
    "Mul",
    "Neg",
    "Pow",
    "Reciprocal",
    "Relu",
    "Reshape",
    "Resize",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Transpose",
    "Unsqueeze",
    "Upsample",
];

/// Whether the GPU backend runs the ONNX operator `op_type` of `domain` (before looking at
/// its attributes).
pub fn gpu_supports(domain: &str, op_type: &str) -> bool {
    (domain.is_empty() || domain == "ai.onnx") && GPU_OPS.contains(&op_type)
}

/// Whether ONNX Runtime implements operators of `domain`: the standard ONNX and ONNX-ML
/// operator sets and Microsoft's contrib operators (`com.microsoft`), which its CPU build
/// ships. The coordinator checks deployments with this, without the library; a node with the
/// library checks the graph for real when it creates the session.
pub fn ort_supports(domain: &str, _op_type: &str) -> bool {
    matches!(
        domain,
        "" | "ai.onnx" | "ai.onnx.ml" | "com.microsoft" | "com.microsoft.nchwc"
    )
}

/// Metadata of a decoded model (no operator check).
pub fn metadata(proto: &pb::ModelProto) -> Result<ModelMetadata, OnnxError> {
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| OnnxError::InvalidModel("the model has no graph".into()))?;
    Ok(ModelMetadata {
        inputs: real_inputs(graph)
            .into_iter()
            .map(spec)
            .collect::<Result<_, _>>()?,
        outputs: graph.output.iter().map(spec).collect::<Result<_, _>>()?,
        opsets: proto
            .opset_import
            .iter()
            .map(|o| (o.domain.clone(), o.version))
            .collect(),
        producer: proto.producer_name.clone(),
        specialised_inputs: crate::specialise::specialisable_inputs(graph),
    })
}

/// Decode, check every operator (subgraphs included) and parse the graph with tract: what a
/// deploy needs to know before accepting the model.
pub fn inspect(bytes: &[u8]) -> Result<ModelMetadata, OnnxError> {
    let proto = decode(bytes)?;
    check(&proto)
}

/// [`inspect`], and for a deployment that requires a GPU, the GPU backend's operator check
/// too ([`OnnxError::GpuUnsupported`]).
pub fn inspect_for(bytes: &[u8], gpu_required: bool) -> Result<ModelMetadata, OnnxError> {
    let proto = decode(bytes)?;
    let meta = check(&proto)?;
    if gpu_required {
        let ops = proto
            .graph
            .as_ref()
            .map(|g| missing_ops(g, |n| gpu_supports(&n.domain, &n.op_type)))
            .unwrap_or_default();
        if !ops.is_empty() {
            return Err(OnnxError::GpuUnsupported { ops });
        }
    }
    Ok(meta)
}

/// [`inspect_for`], knowing each engine's operator set: a model tract can run needs no
/// particular engine; one whose operators only ONNX Runtime implements (`com.microsoft::*`
/// contrib operators) is accepted with the need for the `ort` engine, naming the operators
/// tract lacks; one no engine can run is [`OnnxError::NoEngine`]. A deployment that requires a
/// GPU is checked as [`inspect_for`] does.
pub fn inspect_engines(
    bytes: &[u8],
    gpu_required: bool,
) -> Result<(ModelMetadata, skein_proto::EngineNeed), OnnxError> {
    let proto = decode(bytes)?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| OnnxError::InvalidModel("the model has no graph".into()))?;
    let tract_lacks = unsupported_ops(graph);
    if tract_lacks.is_empty() || gpu_required {
        return Ok((inspect_for(bytes, gpu_required)?, Default::default()));
    }
    let ort_lacks = missing_ops(graph, |n| ort_supports(&n.domain, &n.op_type));
    if !ort_lacks.is_empty() {
        return Err(OnnxError::NoEngine { ops: ort_lacks });
    }
    Ok((
        metadata(&proto)?,
        skein_proto::EngineNeed {
            engines: vec!["ort".into()],
            ops: tract_lacks,
        },
    ))
}

/// Checks of [`inspect`] on a decoded model.
pub(crate) fn check(proto: &pb::ModelProto) -> Result<ModelMetadata, OnnxError> {
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| OnnxError::InvalidModel("the model has no graph".into()))?;
    let ops = unsupported_ops(graph);
    if !ops.is_empty() {
        return Err(OnnxError::UnsupportedOperator { ops });
    }
    let meta = metadata(proto)?;
    guarded("parsing", OnnxError::InvalidModel, || {
        tract_onnx::onnx()
            .model_for_proto_model(proto)
            .map_err(|e| OnnxError::InvalidModel(crate::chain(&e)))
    })?;
    Ok(meta)
}
