//! [`LoadedModel`]: a parsed model, input validation and the bounded plan cache.
//!
//! tract needs concrete input shapes to optimise these models, and optimising costs tens to
//! hundreds of milliseconds per shape, so optimised plans are cached per input shape (plus the
//! values of specialised rank-0 inputs) in a small LRU. A miss builds the plan once, even under
//! concurrent requests for the same shape; other shapes keep running meanwhile.

use crate::convert::{datum_type, from_tract, to_tract};
use crate::proto::{self, ModelMetadata};
use crate::specialise::{has_if, specialise_for_inputs, Scalar};
use crate::OnnxError;
use skein_proto::{DataType, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use tract_onnx::pb;
use tract_onnx::prelude::*;

/// Which engine runs a model's plans.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum Engine {
    /// tract, on this host's CPU.
    #[default]
    Tract,
    /// burn, on an accelerator (see skein-gpu).
    #[cfg(feature = "gpu")]
    Gpu(skein_gpu::Device),
    /// ONNX Runtime, loaded at run time (see [`crate::onnxruntime`]).
    #[cfg(feature = "ort")]
    Ort(crate::onnxruntime::OrtEngine),
}

/// Plan cache settings.
#[derive(Debug, Clone, Copy)]
pub struct PlanCacheConfig {
    /// Optimised plans kept per model (default 16); the least recently used goes first.
    pub capacity: usize,
}

impl Default for PlanCacheConfig {
    fn default() -> Self {
        PlanCacheConfig { capacity: 16 }
    }
}

/// Outputs of one run and what it cost.
#[derive(Debug)]
pub struct RunOutput {
    /// Outputs, named and ordered as the graph declares them.
    pub outputs: Vec<Tensor>,
    /// A new plan was optimised for this call (a cold start for this shape).
    pub plan_built: bool,
    /// Time spent building the plan, µs (0 on a hit).
    pub plan_us: u64,
    /// Time spent running, µs.
    pub run_us: u64,
}

/// A plan for one input shape: tract's optimised model, or (on the GPU engine, where burn
/// compiles shaders per shape on first use) the mark that the shape has been seen.
#[derive(Clone)]
enum Plan {
    Tract(Arc<TypedRunnableModel>),
    #[cfg(feature = "gpu")]
    Gpu,
    /// ONNX Runtime plans per shape itself: only the mark that the shape has been seen.
    #[cfg(feature = "ort")]
    Ort,
}
type Slot = Arc<OnceLock<Result<Plan, OnnxError>>>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PlanKey {
    shapes: Vec<Vec<u64>>,
    values: Vec<(String, u64)>,
}

struct Cache {
    entries: HashMap<PlanKey, (Slot, u64)>,
    tick: u64,
    capacity: usize,
}

/// A model ready to run: parsed once, plans built per input shape.
pub struct LoadedModel {
    proto: pb::ModelProto,
    /// Parsed graph, when no input needs specialising (parsing once saves time per plan).
    base: Option<InferenceModel>,
    meta: ModelMetadata,
    declared: Vec<Option<Vec<i64>>>,
    cache: Mutex<Cache>,
    #[cfg(feature = "gpu")]
    gpu: Option<skein_gpu::GpuModel>,
    #[cfg(feature = "ort")]
    ort: Option<crate::onnxruntime::OrtModel>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

fn scalar_of(t: &Tensor) -> Option<Scalar> {
    if t.len() != 1 {
        return None;
    }
    let v = t.to_f64_vec()?.first().copied()?;
    Some(match t.datatype() {
        DataType::Bool => Scalar::Bool(v != 0.0),
        DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64 => Scalar::Float(v),
        _ => {
            let d = t.data();
            match t.datatype() {
                DataType::Int64 | DataType::Uint64 => Scalar::Int(i64::from_le_bytes([
                    d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7],
                ])),
                _ => Scalar::Int(v as i64),
            }
        }
    })
}

fn fmt_shape(s: &[i64]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

impl LoadedModel {
    /// Decode, check operators and parse a model for tract.
    pub fn load(bytes: &[u8], config: PlanCacheConfig) -> Result<LoadedModel, OnnxError> {
        Self::load_on(bytes, config, &Engine::Tract)
    }

    /// Decode, check and parse a model for `engine`. The GPU engine refuses a graph with an
    /// operator it lacks ([`OnnxError::UnsupportedOperator`]); the caller may load it on tract
    /// instead.
    pub fn load_on(
        bytes: &[u8],
        config: PlanCacheConfig,
        engine: &Engine,
    ) -> Result<LoadedModel, OnnxError> {
        let proto = proto::decode(bytes)?;
        #[cfg(feature = "ort")]
        if let Engine::Ort(ort) = engine {
            // ONNX Runtime's operator set, not tract's; the session checks the graph for real.
            let ops = proto
                .graph
                .as_ref()
                .map(|g| proto::missing_ops(g, |n| proto::ort_supports(&n.domain, &n.op_type)))
                .unwrap_or_default();
            if !ops.is_empty() {
                return Err(OnnxError::UnsupportedOperator { ops });
            }
            let meta = proto::metadata(&proto)?;
            let declared = proto
                .graph
                .as_ref()
                .map(|g| {
                    proto::real_inputs(g)
                        .into_iter()
                        .map(proto::declared_shape)
                        .collect()
                })
                .unwrap_or_default();
            let session = crate::onnxruntime::OrtModel::load(bytes, ort)?;
            let mut model = Self::new(proto, None, meta, declared, config);
            model.ort = Some(session);
            return Ok(model);
        }
        let ops = proto
            .graph
            .as_ref()
            .map(proto::unsupported_ops)
            .unwrap_or_default();
        if !ops.is_empty() {
            return Err(OnnxError::UnsupportedOperator { ops });
        }
        let meta = proto::metadata(&proto)?;
        let declared = proto
            .graph
            .as_ref()
            .map(|g| {
                proto::real_inputs(g)
                    .into_iter()
                    .map(proto::declared_shape)
                    .collect()
            })
            .unwrap_or_default();
        #[cfg(feature = "gpu")]
        if let Engine::Gpu(device) = engine {
            // Named before onnx-ir sees the graph: its type inference may fail on an
            // operator the interpreter would refuse anyway.
            let ops = proto
                .graph
                .as_ref()
                .map(|g| proto::missing_ops(g, |n| proto::gpu_supports(&n.domain, &n.op_type)))
                .unwrap_or_default();
            if !ops.is_empty() {
                return Err(OnnxError::GpuUnsupported { ops });
            }
            let gpu = skein_gpu::GpuModel::load(bytes, device).map_err(gpu_error)?;
            let mut model = Self::new(proto, None, meta, declared, config);
            model.gpu = Some(gpu);
            return Ok(model);
        }
        let _ = engine;
        // Parse once: malformed graphs fail at load time. Without `If`s the parsed graph is
        // kept and copied per plan; with them each plan re-parses its specialised graph.
        let parsed = proto::guarded("parsing", OnnxError::InvalidModel, || {
            onnx()
                .model_for_proto_model(&proto)
                .map_err(|e| OnnxError::InvalidModel(crate::chain(&e)))
        })?;
        let base = (!has_if(&proto)).then_some(parsed);
        Ok(Self::new(proto, base, meta, declared, config))
    }

    fn new(
        proto: pb::ModelProto,
        base: Option<InferenceModel>,
        meta: ModelMetadata,
        declared: Vec<Option<Vec<i64>>>,
        config: PlanCacheConfig,
    ) -> LoadedModel {
        LoadedModel {
            proto,
            base,
            meta,
            declared,
            cache: Mutex::new(Cache {
                entries: HashMap::new(),
                tick: 0,
                capacity: config.capacity.max(1),
            }),
            #[cfg(feature = "gpu")]
            gpu: None,
            #[cfg(feature = "ort")]
            ort: None,
        }
    }

    /// The engine's name: `tract`, `gpu` for burn, or `ort` for ONNX Runtime.
    pub fn engine(&self) -> &'static str {
        #[cfg(feature = "ort")]
        if self.ort.is_some() {
            return "ort";
        }
        #[cfg(feature = "gpu")]
        if self.gpu.is_some() {
            return "gpu";
        }
        "tract"
    }

    /// What the model declares.
    pub fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    /// Plans currently cached.
    pub fn cached_plans(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .len()
    }

    /// Order `inputs` as the model declares them, checking names, datatypes and shapes.
    fn validate(&self, mut inputs: Vec<Tensor>) -> Result<Vec<Tensor>, OnnxError> {
        let names = || {
            self.meta
                .inputs
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (i, t) in inputs.iter().enumerate() {
            if !self.meta.inputs.iter().any(|s| s.name == t.name()) {
                return Err(OnnxError::InvalidInput(format!(
                    "unknown input `{}` (model inputs: {})",
                    t.name(),
                    names()
                )));
            }
            if inputs[..i].iter().any(|o| o.name() == t.name()) {
                return Err(OnnxError::InvalidInput(format!(
                    "input `{}` given twice",
                    t.name()
                )));
            }
        }
        let mut ordered = Vec::with_capacity(self.meta.inputs.len());
        for (spec, declared) in self.meta.inputs.iter().zip(&self.declared) {
            let pos = inputs
                .iter()
                .position(|t| t.name() == spec.name)
                .ok_or_else(|| {
                    OnnxError::InvalidInput(format!(
                        "missing input `{}` (model inputs: {})",
                        spec.name,
                        names()
                    ))
                })?;
            let t = inputs.swap_remove(pos);
            let expected = || {
                format!(
                    "expected {} {}",
                    spec.datatype,
                    declared.as_deref().map_or("[?]".into(), fmt_shape)
                )
            };
            let got = || format!("got {} {:?}", t.datatype(), t.shape());
            if t.datatype() != spec.datatype {
                return Err(OnnxError::InvalidInput(format!(
                    "input `{}`: {}, {}",
                    spec.name,
                    expected(),
                    got()
                )));
            }
            if let Some(d) = declared {
                let ok = d.len() == t.shape().len()
                    && d.iter()
                        .zip(t.shape())
                        .all(|(&want, &have)| want < 0 || want as u64 == have);
                if !ok {
                    return Err(OnnxError::InvalidInput(format!(
                        "input `{}`: {}, {}",
                        spec.name,
                        expected(),
                        got()
                    )));
                }
            }
            ordered.push(t);
        }
        Ok(ordered)
    }

    fn build(
        &self,
        inputs: &[Tensor],
        values: &BTreeMap<String, Scalar>,
    ) -> Result<Plan, OnnxError> {
        let facts = inputs
            .iter()
            .map(|t| {
                let dt = datum_type(t.datatype()).ok_or_else(|| {
                    OnnxError::InvalidInput(format!(
                        "input `{}`: datatype {} is not supported",
                        t.name(),
                        t.datatype()
                    ))
                })?;
                let shape: TVec<usize> = t.shape().iter().map(|&d| d as usize).collect();
                Ok(InferenceFact::dt_shape(dt, shape))
            })
            .collect::<Result<Vec<_>, OnnxError>>()?;
        let mut model = match &self.base {
            Some(m) => m.clone(),
            None => onnx()
                .model_for_proto_model(&specialise_for_inputs(&self.proto, values, &facts)?)
                .map_err(|e| OnnxError::InvalidModel(crate::chain(&e)))?,
        };
        for (ix, f) in facts.into_iter().enumerate() {
            model
                .set_input_fact(ix, f)
                .map_err(|e| OnnxError::Execution(crate::chain(&e)))?;
        }
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| {
                OnnxError::Execution(format!(
                    "optimising for input shapes {:?}: {}",
                    inputs.iter().map(|t| t.shape()).collect::<Vec<_>>(),
                    crate::chain(&e)
                ))
            })?;
        Ok(Plan::Tract(plan))
    }

    /// Validate, find or build the plan for these shapes, run.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<RunOutput, OnnxError> {
        let inputs = self.validate(inputs)?;
        let mut values = BTreeMap::new();
        for name in &self.meta.specialised_inputs {
            if let Some(t) = inputs.iter().find(|t| t.name() == name) {
                let v = scalar_of(t).ok_or_else(|| {
                    OnnxError::InvalidInput(format!("input `{name}` must hold one value"))
                })?;
                values.insert(name.clone(), v);
            }
        }
        let key = PlanKey {
            shapes: inputs.iter().map(|t| t.shape().to_vec()).collect(),
            values: values
                .iter()
                .map(|(k, v)| {
                    let bits = match v {
                        Scalar::Int(i) => *i as u64,
                        Scalar::Float(f) => f.to_bits(),
                        Scalar::Bool(b) => *b as u64,
                    };
                    (k.clone(), bits)
                })
                .collect(),
        };
        let slot: Slot = {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            c.tick += 1;
            let tick = c.tick;
            if let Some((slot, used)) = c.entries.get_mut(&key) {
                *used = tick;
                slot.clone()
            } else {
                if c.entries.len() >= c.capacity {
                    if let Some(oldest) = c
                        .entries
                        .iter()
                        .min_by_key(|(_, (_, used))| *used)
                        .map(|(k, _)| k.clone())
                    {
                        c.entries.remove(&oldest);
                    }
                }
                let slot: Slot = Arc::new(OnceLock::new());
                c.entries.insert(key.clone(), (slot.clone(), tick));
                slot
            }
        };
        let mut plan_built = false;
        let t0 = Instant::now();
        let plan = slot
            .get_or_init(|| {
                plan_built = true;
                #[cfg(feature = "gpu")]
                if self.gpu.is_some() {
                    return Ok(Plan::Gpu);
                }
                #[cfg(feature = "ort")]
                if self.ort.is_some() {
                    return Ok(Plan::Ort);
                }
                proto::guarded("optimising", OnnxError::Execution, || {
                    self.build(&inputs, &values)
                })
            })
            .clone();
        let plan_us = if plan_built {
            t0.elapsed().as_micros() as u64
        } else {
            0
        };
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                // Do not keep failures: the next call for this shape tries again.
                let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if c.entries
                    .get(&key)
                    .is_some_and(|(s, _)| Arc::ptr_eq(s, &slot))
                {
                    c.entries.remove(&key);
                }
                return Err(e);
            }
        };
        let t1 = Instant::now();
        let plan = match plan {
            Plan::Tract(p) => p,
            #[cfg(feature = "gpu")]
            Plan::Gpu => {
                let gpu = self
                    .gpu
                    .as_ref()
                    .ok_or_else(|| OnnxError::Execution("GPU plan without a GPU model".into()))?;
                let outs = gpu.run(&inputs).map_err(gpu_error)?;
                let outputs = self.name_outputs(outs)?;
                return Ok(RunOutput {
                    outputs,
                    plan_built,
                    plan_us,
                    run_us: t1.elapsed().as_micros() as u64,
                });
            }
            #[cfg(feature = "ort")]
            Plan::Ort => {
                let ort = self.ort.as_ref().ok_or_else(|| {
                    OnnxError::Execution("ONNX Runtime plan without a session".into())
                })?;
                let outputs = ort.run(&inputs)?;
                return Ok(RunOutput {
                    outputs,
                    plan_built,
                    plan_us,
                    run_us: t1.elapsed().as_micros() as u64,
                });
            }
        };
        let tv: TVec<TValue> = inputs
            .iter()
            .map(|t| to_tract(t).map(|t| t.into_tvalue()))
            .collect::<Result<_, _>>()?;
        let out = proto::guarded("running", OnnxError::Execution, || {
            plan.run(tv)
                .map_err(|e| OnnxError::Execution(crate::chain(&e)))
        })?;
        let outputs = out
            .iter()
            .zip(&self.meta.outputs)
            .map(|(t, spec)| from_tract(&spec.name, t))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RunOutput {
            outputs,
            plan_built,
            plan_us,
            run_us: t1.elapsed().as_micros() as u64,
        })
    }
}

#[cfg(feature = "gpu")]
fn gpu_error(e: skein_gpu::GpuError) -> OnnxError {
    match e {
        skein_gpu::GpuError::InvalidModel(m) => OnnxError::InvalidModel(m),
        skein_gpu::GpuError::UnsupportedOperator { ops } => OnnxError::GpuUnsupported { ops },
        skein_gpu::GpuError::InvalidInput(m) => OnnxError::InvalidInput(m),
        other => OnnxError::Execution(other.to_string()),
    }
}

#[cfg(feature = "gpu")]
impl LoadedModel {
    /// The GPU engine's outputs, in the declared order with the declared names.
    fn name_outputs(&self, outs: Vec<Tensor>) -> Result<Vec<Tensor>, OnnxError> {
        if outs.len() != self.meta.outputs.len() {
            return Err(OnnxError::Execution(format!(
                "the GPU engine produced {} outputs, the model declares {}",
                outs.len(),
                self.meta.outputs.len()
            )));
        }
        Ok(outs
            .into_iter()
            .zip(&self.meta.outputs)
            .map(|(mut t, spec)| {
                t.set_name(spec.name.clone());
                t
            })
            .collect())
    }
}
