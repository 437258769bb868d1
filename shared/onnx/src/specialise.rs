//! `If` specialisation.
//!
//! tract analyses both branches of every `If`, and a branch that is never taken may fail shape
//! inference (silero_vad: the 8 kHz branch with 16 kHz-shaped state). When an `If` condition
//! depends only on rank-0 graph inputs and constants, through a few scalar operators, the
//! condition is evaluated for the values a caller sent and the taken branch is spliced into the
//! graph in place of the `If`, before tract sees it. Branch-local names get a unique prefix,
//! branch initializers move to the main graph, outer-scope references stay, and `Identity` nodes
//! bind the branch outputs to the `If` outputs. Nested `If`s are handled by repeating.

use crate::OnnxError;
use std::collections::{BTreeMap, HashMap, HashSet};
use tract_onnx::onnx;
use tract_onnx::pb;
use tract_onnx::prelude::{InferenceFact, InferenceModelExt};
use tract_onnx::tract_hir::infer::Factoid;

/// Scalar operators the condition may go through.
const SCALAR_OPS: &[&str] = &[
    "Constant",
    "Identity",
    "Cast",
    "Equal",
    "Greater",
    "Less",
    "GreaterOrEqual",
    "LessOrEqual",
    "Not",
    "And",
    "Or",
    "Xor",
];

/// A scalar value during condition evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar {
    /// Integer.
    Int(i64),
    /// Floating point.
    Float(f64),
    /// Boolean.
    Bool(bool),
}

impl Scalar {
    fn as_f64(self) -> f64 {
        match self {
            Scalar::Int(i) => i as f64,
            Scalar::Float(f) => f,
            Scalar::Bool(b) => b as i64 as f64,
        }
    }
    fn truthy(self) -> bool {
        match self {
            Scalar::Bool(b) => b,
            other => other.as_f64() != 0.0,
        }
    }
    fn cmp(self, other: Scalar) -> Option<std::cmp::Ordering> {
        match (self, other) {
            (Scalar::Int(a), Scalar::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }
}

fn producers(graph: &pb::GraphProto) -> HashMap<&str, &pb::NodeProto> {
    let mut m = HashMap::new();
    for n in &graph.node {
        for o in &n.output {
            m.insert(o.as_str(), n);
        }
    }
    m
}

fn rank0_inputs(graph: &pb::GraphProto) -> HashSet<&str> {
    crate::graph::real_inputs(graph)
        .into_iter()
        .filter(|i| crate::graph::declared_shape(i).is_some_and(|s| s.is_empty()))
        .map(|i| i.name.as_str())
        .collect()
}

/// The rank-0 inputs `name` depends on, if it depends only on those, constants and scalar ops.
fn cond_leaves<'a>(
    name: &'a str,
    graph: &'a pb::GraphProto,
    prod: &HashMap<&'a str, &'a pb::NodeProto>,
    rank0: &HashSet<&'a str>,
    depth: usize,
    out: &mut Vec<String>,
) -> bool {
    if depth > 32 {
        return false;
    }
    if rank0.contains(name) {
        if !out.iter().any(|o| o == name) {
            out.push(name.to_string());
        }
        return true;
    }
    if graph
        .initializer
        .iter()
        .any(|t| t.name == name && t.dims.iter().product::<i64>() == 1)
    {
        return true;
    }
    match prod.get(name) {
        Some(n) if SCALAR_OPS.contains(&n.op_type.as_str()) => n
            .input
            .iter()
            .filter(|i| !i.is_empty())
            .all(|i| cond_leaves(i, graph, prod, rank0, depth + 1, out)),
        _ => false,
    }
}

/// Rank-0 inputs that select `If` branches in `graph` (top level), in graph input order.
pub fn specialisable_inputs(graph: &pb::GraphProto) -> Vec<String> {
    let prod = producers(graph);
    let rank0 = rank0_inputs(graph);
    let mut leaves = Vec::new();
    for n in graph.node.iter().filter(|n| n.op_type == "If") {
        if let Some(cond) = n.input.first() {
            let mut l = Vec::new();
            if cond_leaves(cond, graph, &prod, &rank0, 0, &mut l) {
                leaves.extend(l);
            }
        }
    }
    crate::graph::real_inputs(graph)
        .into_iter()
        .map(|i| i.name.clone())
        .filter(|n| leaves.contains(n))
        .collect()
}

fn tensor_scalar(t: &pb::TensorProto) -> Option<Scalar> {
    let tensor =
        tract_onnx::tensor::load_tensor(&tract_onnx::data_resolver::MmapDataResolver, t, None)
            .ok()?;
    if tensor.len() != 1 {
        return None;
    }
    use tract_onnx::prelude::DatumType as D;
    Some(match tensor.datum_type() {
        D::Bool => Scalar::Bool(tensor.cast_to_scalar::<bool>().ok()?),
        D::F16 | D::F32 | D::F64 => Scalar::Float(tensor.cast_to_scalar::<f64>().ok()?),
        _ => Scalar::Int(tensor.cast_to_scalar::<i64>().ok()?),
    })
}

fn eval(
    name: &str,
    graph: &pb::GraphProto,
    prod: &HashMap<&str, &pb::NodeProto>,
    values: &BTreeMap<String, Scalar>,
    depth: usize,
) -> Option<Scalar> {
    if depth > 32 {
        return None;
    }
    if let Some(v) = values.get(name) {
        return Some(*v);
    }
    if let Some(t) = graph.initializer.iter().find(|t| t.name == name) {
        return tensor_scalar(t);
    }
    let n = prod.get(name)?;
    let arg =
        |i: usize| -> Option<Scalar> { eval(n.input.get(i)?, graph, prod, values, depth + 1) };
    let attr = |a: &str| n.attribute.iter().find(|x| x.name == a);
    use std::cmp::Ordering::*;
    Some(match n.op_type.as_str() {
        "Constant" => {
            if let Some(t) = attr("value").and_then(|a| a.t.as_ref()) {
                tensor_scalar(t)?
            } else if let Some(a) = attr("value_int") {
                Scalar::Int(a.i)
            } else if let Some(a) = attr("value_float") {
                Scalar::Float(a.f as f64)
            } else {
                return None;
            }
        }
        "Identity" => arg(0)?,
        "Cast" => {
            let v = arg(0)?;
            use pb::tensor_proto::DataType as T;
            match T::try_from(attr("to")?.i as i32).ok()? {
                T::Bool => Scalar::Bool(v.truthy()),
                T::Float | T::Double | T::Float16 | T::Bfloat16 => Scalar::Float(v.as_f64()),
                _ => Scalar::Int(v.as_f64() as i64),
            }
        }
        "Equal" => Scalar::Bool(arg(0)?.cmp(arg(1)?)? == Equal),
        "Greater" => Scalar::Bool(arg(0)?.cmp(arg(1)?)? == Greater),
        "Less" => Scalar::Bool(arg(0)?.cmp(arg(1)?)? == Less),
        "GreaterOrEqual" => Scalar::Bool(arg(0)?.cmp(arg(1)?)? != Less),
        "LessOrEqual" => Scalar::Bool(arg(0)?.cmp(arg(1)?)? != Greater),
        "Not" => Scalar::Bool(!arg(0)?.truthy()),
        "And" => Scalar::Bool(arg(0)?.truthy() && arg(1)?.truthy()),
        "Or" => Scalar::Bool(arg(0)?.truthy() || arg(1)?.truthy()),
        "Xor" => Scalar::Bool(arg(0)?.truthy() ^ arg(1)?.truthy()),
        _ => return None,
    })
}

/// Rename every occurrence of a mapped name in a (nested) subgraph.
fn rename_deep(g: &mut pb::GraphProto, map: &HashMap<String, String>) {
    for n in &mut g.node {
        for i in n.input.iter_mut().chain(n.output.iter_mut()) {
            if let Some(r) = map.get(i.as_str()) {
                *i = r.clone();
            }
        }
        for a in &mut n.attribute {
            if let Some(sub) = a.g.as_mut() {
                rename_deep(sub, map);
            }
            for sub in &mut a.graphs {
                rename_deep(sub, map);
            }
        }
    }
    for v in g.output.iter_mut().chain(g.value_info.iter_mut()) {
        if let Some(r) = map.get(v.name.as_str()) {
            v.name = r.clone();
        }
    }
}

/// Splice the taken branch of every top-level `If` whose condition `values` decide. Returns
/// the number of `If`s removed.
fn splice_once(
    graph: &mut pb::GraphProto,
    decide: &dyn Fn(&pb::GraphProto, &str) -> Option<bool>,
    counter: &mut usize,
) -> Result<usize, OnnxError> {
    let mut removed = 0;
    let mut i = 0;
    while i < graph.node.len() {
        if graph.node[i].op_type != "If" {
            i += 1;
            continue;
        }
        let decided = graph.node[i].input.first().and_then(|c| decide(graph, c));
        let Some(cond) = decided else {
            i += 1;
            continue;
        };
        let node = graph.node.remove(i);
        let attr = if cond { "then_branch" } else { "else_branch" };
        let mut branch = node
            .attribute
            .iter()
            .find(|a| a.name == attr)
            .and_then(|a| a.g.clone())
            .ok_or_else(|| {
                OnnxError::InvalidModel(format!("If node `{}` has no {attr}", node.name))
            })?;
        if branch.output.len() != node.output.len() {
            return Err(OnnxError::InvalidModel(format!(
                "If node `{}`: {attr} has {} outputs, the node {}",
                node.name,
                branch.output.len(),
                node.output.len()
            )));
        }
        *counter += 1;
        let prefix = format!("__skein_if{}__", *counter);
        let mut map = HashMap::new();
        for n in &branch.node {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                map.insert(o.clone(), format!("{prefix}{o}"));
            }
        }
        for t in &branch.initializer {
            map.insert(t.name.clone(), format!("{prefix}{}", t.name));
        }
        rename_deep(&mut branch, &map);
        for t in &mut branch.initializer {
            t.name = format!("{prefix}{}", t.name);
        }
        let mut spliced = std::mem::take(&mut branch.node);
        for n in &mut spliced {
            if !n.name.is_empty() {
                n.name = format!("{prefix}{}", n.name);
            }
        }
        for (bo, o) in branch.output.iter().zip(&node.output) {
            spliced.push(pb::NodeProto {
                input: vec![bo.name.clone()],
                output: vec![o.clone()],
                name: format!("{prefix}out_{o}"),
                op_type: "Identity".into(),
                ..Default::default()
            });
        }
        let n_spliced = spliced.len();
        graph.node.splice(i..i, spliced);
        graph.initializer.append(&mut branch.initializer);
        graph.value_info.append(&mut branch.value_info);
        i += n_spliced;
        removed += 1;
    }
    Ok(removed)
}

fn scalar_decider(
    values: &BTreeMap<String, Scalar>,
) -> impl Fn(&pb::GraphProto, &str) -> Option<bool> + '_ {
    move |graph, cond| {
        let prod = producers(graph);
        eval(cond, graph, &prod, values, 0).map(Scalar::truthy)
    }
}

/// A copy of `proto` with every `If` decided by `values` replaced by its taken branch.
pub fn specialise(
    proto: &pb::ModelProto,
    values: &BTreeMap<String, Scalar>,
) -> Result<pb::ModelProto, OnnxError> {
    let mut out = proto.clone();
    let graph = out
        .graph
        .as_mut()
        .ok_or_else(|| OnnxError::InvalidModel("the model has no graph".into()))?;
    let decide = scalar_decider(values);
    let mut counter = 0;
    for _ in 0..16 {
        if splice_once(graph, &decide, &mut counter)? == 0 {
            break;
        }
    }
    Ok(out)
}

/// Conditions of top-level `If`s that tract's type and shape inference settles for these
/// concrete inputs (e.g. "squeeze if this dimension is 1" patterns), by condition name.
fn conditions_known_for(proto: &pb::ModelProto, inputs: &[InferenceFact]) -> HashMap<String, bool> {
    let mut known = HashMap::new();
    let Some(graph) = proto.graph.as_ref() else {
        return known;
    };
    let Ok(parsed) = onnx().parse(proto, None) else {
        return known;
    };
    let mut model = parsed.model;
    for (ix, f) in inputs.iter().enumerate() {
        if model.set_input_fact(ix, f.clone()).is_err() {
            return known;
        }
    }
    // Partial analysis is enough: we only read the facts it settled.
    let _ = model.analyse(false);
    for n in graph.node.iter().filter(|n| n.op_type == "If") {
        let Some(cond) = n.input.first() else {
            continue;
        };
        let Some(outlet) = parsed.outlets_by_name.get(cond) else {
            continue;
        };
        let value = model
            .outlet_fact(*outlet)
            .ok()
            .and_then(|f| f.value.concretize());
        if let Some(b) = value.and_then(|v| v.cast_to_scalar::<bool>().ok()) {
            known.insert(cond.clone(), b);
        }
    }
    known
}

/// [`specialise`], then, for the given concrete input facts, every `If` whose condition shape
/// inference settles, repeatedly (branches spliced in may hold more `If`s). tract's typed `If`
/// needs both branches to agree on output shapes, which "squeeze if the dimension is 1"
/// patterns break; with the branch chosen, the graph types and optimises.
pub fn specialise_for_inputs(
    proto: &pb::ModelProto,
    values: &BTreeMap<String, Scalar>,
    inputs: &[InferenceFact],
) -> Result<pb::ModelProto, OnnxError> {
    let mut out = specialise(proto, values)?;
    let mut counter = 1000;
    for _ in 0..16 {
        let has_if = out
            .graph
            .as_ref()
            .is_some_and(|g| g.node.iter().any(|n| n.op_type == "If"));
        if !has_if {
            break;
        }
        let known = conditions_known_for(&out, inputs);
        let scalar = scalar_decider(values);
        let decide = |g: &pb::GraphProto, c: &str| known.get(c).copied().or_else(|| scalar(g, c));
        let graph = out
            .graph
            .as_mut()
            .ok_or_else(|| OnnxError::InvalidModel("the model has no graph".into()))?;
        if splice_once(graph, &decide, &mut counter)? == 0 {
            break;
        }
    }
    Ok(out)
}

/// Whether the graph holds any `If` (top level).
pub fn has_if(proto: &pb::ModelProto) -> bool {
    proto
        .graph
        .as_ref()
        .is_some_and(|g| g.node.iter().any(|n| n.op_type == "If"))
}
