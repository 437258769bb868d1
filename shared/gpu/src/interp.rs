//! The interpreter: onnx-ir nodes onto burn tensor operations.

use crate::{guarded, GpuError};
use burn_tensor::ops::{
    ConvOptions, ConvTransposeOptions, InterpolateMode, InterpolateOptions, MaxPoolOptions,
};
use burn_tensor::{activation, module, Device, Int, Tensor, TensorData};
use onnx_ir::{ArgType, Argument, DType, Node, OnnxGraphBuilder};
use skein_proto::{DataType, Tensor as WireTensor};
use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

/// Device tensors are kept at this rank, logical shapes padded with leading 1s.
const R: usize = 6;
type T6 = Tensor<R>;

/// A value flowing through the graph.
// Most values are device tensors (burn's handle is large); boxing them would allocate once per
// operation to shrink the rare host variant.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Val {
    /// Floats on the device, and their logical rank.
    Dev(T6, usize),
    /// Integers on the host (shapes, indices), and their shape.
    Host(Vec<i64>, Vec<usize>),
}

fn err(op: &str, msg: impl std::fmt::Display) -> GpuError {
    GpuError::Execution(format!("{op}: {msg}"))
}

fn padded(shape: &[usize]) -> Result<[usize; R], GpuError> {
    if shape.len() > R {
        return Err(GpuError::Execution(format!(
            "rank {} is above the GPU backend's maximum of {R}",
            shape.len()
        )));
    }
    let mut out = [1usize; R];
    out[R - shape.len()..].copy_from_slice(shape);
    Ok(out)
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Val {
    fn shape(&self) -> Vec<usize> {
        match self {
            Val::Dev(t, rank) => t.dims()[R - rank..].to_vec(),
            Val::Host(_, s) => s.clone(),
        }
    }

    fn rank(&self) -> usize {
        match self {
            Val::Dev(_, r) => *r,
            Val::Host(_, s) => s.len(),
        }
    }

    /// The value on the device (host integers are uploaded as floats).
    fn dev(self, device: &Device) -> Result<(T6, usize), GpuError> {
        match self {
            Val::Dev(t, r) => Ok((t, r)),
            Val::Host(v, s) => {
                let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                let t = T6::from_data(TensorData::new(f, padded(&s)?), device);
                Ok((t, s.len()))
            }
        }
    }

    /// The integer values on the host (device floats are read back and truncated).
    fn host(&self, op: &str) -> Result<Vec<i64>, GpuError> {
        match self {
            Val::Host(v, _) => Ok(v.clone()),
            Val::Dev(t, _) => {
                let data = t.clone().into_data();
                let f: Vec<f32> = data
                    .try_to_vec_as::<f32>()
                    .map_err(|e| err(op, format!("{e:?}")))?;
                Ok(f.into_iter().map(|x| x as i64).collect())
            }
        }
    }

    fn reshape(self, shape: &[usize], device: &Device) -> Result<Val, GpuError> {
        match self {
            Val::Host(v, _) => Ok(Val::Host(v, shape.to_vec())),
            v => {
                let (t, _) = v.dev(device)?;
                Ok(Val::Dev(t.reshape(padded(shape)?), shape.len()))
            }
        }
    }
}

/// Convert a constant (initializer or folded value) to a value.
fn from_data(data: &TensorData, device: &Device) -> Result<Val, GpuError> {
    let shape = data.shape().to_vec();
    match data.dtype() {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => {
            let f: Vec<f32> = data
                .try_to_vec_as::<f32>()
                .map_err(|e| GpuError::InvalidModel(format!("constant: {e:?}")))?;
            let t = T6::from_data(TensorData::new(f, padded(&shape)?), device);
            Ok(Val::Dev(t, shape.len()))
        }
        DType::Bool(_) => {
            let b: Vec<bool> = data
                .try_to_vec_as::<bool>()
                .map_err(|e| GpuError::InvalidModel(format!("constant: {e:?}")))?;
            Ok(Val::Host(b.into_iter().map(i64::from).collect(), shape))
        }
        _ => {
            let v: Vec<i64> = data
                .try_to_vec_as::<i64>()
                .map_err(|e| GpuError::InvalidModel(format!("constant: {e:?}")))?;
            Ok(Val::Host(v, shape))
        }
    }
}

/// A model parsed for the GPU backend, its constants on the device.
pub struct GpuModel {
    nodes: Vec<Node>,
    /// Constant inputs of every node, aligned with its inputs.
    consts: Vec<Vec<Option<Val>>>,
    /// Graph inputs: name and whether it is a float tensor.
    inputs: Vec<(String, bool)>,
    outputs: Vec<Argument>,
    device: Device,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("nodes", &self.nodes.len())
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// Why the interpreter cannot run `node`, if it cannot.
fn unsupported(node: &Node) -> Option<String> {
    use onnx_ir::conv_transpose2d::ConvTranspose2dConfig;
    use onnx_ir::padding::AutoPad;
    let op = node.node_type().to_string();
    let with = |what: &str| Some(format!("{op} ({what})"));
    match node {
        Node::Add(_)
        | Node::Sub(_)
        | Node::Mul(_)
        | Node::Div(_)
        | Node::Neg(_)
        | Node::Abs(_)
        | Node::Pow(_)
        | Node::Reciprocal(_)
        | Node::Sqrt(_)
        | Node::Exp(_)
        | Node::Log(_)
        | Node::Relu(_)
        | Node::Sigmoid(_)
        | Node::Softmax(_)
        | Node::LeakyRelu(_)
        | Node::HardSigmoid(_)
        | Node::HardSwish(_)
        | Node::Cast(_)
        | Node::Clip(_)
        | Node::Concat(_)
        | Node::Flatten(_)
        | Node::Gather(_)
        | Node::Reshape(_)
        | Node::Shape(_)
        | Node::Slice(_)
        | Node::Squeeze(_)
        | Node::Transpose(_)
        | Node::Unsqueeze(_)
        | Node::MatMul(_)
        | Node::Gemm(_)
        | Node::Linear(_)
        | Node::BatchNormalization(_)
        | Node::Constant(_)
        | Node::Identity(_)
        | Node::GlobalAveragePool(_)
        | Node::Dropout(_) => None,
        Node::Conv2d(n) => match n.config.auto_pad {
            AutoPad::NotSet | AutoPad::Valid => None,
            _ => with("auto_pad"),
        },
        Node::MaxPool2d(n) => match n.config.auto_pad {
            AutoPad::NotSet | AutoPad::Valid => None,
            _ => with("auto_pad"),
        },
        Node::ConvTranspose2d(n) => {
            let ConvTranspose2dConfig {
                auto_pad,
                output_shape,
                ..
            } = &n.config;
            match (auto_pad, output_shape) {
                (AutoPad::NotSet | AutoPad::Valid, None) => None,
                _ => with("auto_pad or output_shape"),
            }
        }
        Node::Resize(n) | Node::Upsample(n) => {
            use onnx_ir::resize::{CoordinateTransformMode as C, ResizeMode as M};
            match (&n.config.mode, &n.config.coordinate_transformation_mode) {
                (M::Nearest, C::Asymmetric) => None,
                (M::Linear, C::AlignCorners | C::HalfPixel | C::PytorchHalfPixel) => None,
                (m, c) => with(&format!("mode {m:?} with {c:?}")),
            }
        }
        _ => Some(op),
    }
}

impl GpuModel {
    /// Parse `bytes` and put its constants on `device`. Refuses graphs with operators the
    /// interpreter lacks, naming every one.
    pub fn load(bytes: &[u8], device: &Device) -> Result<GpuModel, GpuError> {
        let graph = guarded("parsing", || {
            OnnxGraphBuilder::new()
                .parse_bytes(bytes)
                .map_err(|e| GpuError::InvalidModel(e.to_string()))
        })?;
        let ops: BTreeSet<String> = graph.nodes.iter().filter_map(unsupported).collect();
        if !ops.is_empty() {
            return Err(GpuError::UnsupportedOperator {
                ops: ops.into_iter().collect(),
            });
        }
        let mut inputs = Vec::new();
        for a in &graph.inputs {
            let float = match &a.ty {
                ArgType::Tensor(t) => t.dtype.is_float(),
                ArgType::ScalarTensor(d) | ArgType::ScalarNative(d) => d.is_float(),
                ArgType::Shape(_) => false,
            };
            inputs.push((a.name.clone(), float));
        }
        let consts = guarded("uploading constants", || {
            graph
                .nodes
                .iter()
                .map(|n| {
                    n.inputs()
                        .iter()
                        .map(|a| {
                            if a.is_dynamic() || a.is_optional() {
                                return Ok(None);
                            }
                            a.value().map(|d| from_data(&d, device)).transpose()
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .collect::<Result<Vec<_>, _>>()
        })?;
        Ok(GpuModel {
            nodes: graph.nodes,
            consts,
            inputs,
            outputs: graph.outputs,
            device: device.clone(),
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Run on `inputs` (in the order of the graph's inputs); outputs in the graph's order,
    /// named as the graph names them. Waits for the device.
    pub fn run(&self, inputs: &[WireTensor]) -> Result<Vec<WireTensor>, GpuError> {
        guarded("running", || self.run_inner(inputs))
    }

    fn run_inner(&self, inputs: &[WireTensor]) -> Result<Vec<WireTensor>, GpuError> {
        if inputs.len() != self.inputs.len() {
            return Err(GpuError::InvalidInput(format!(
                "the graph takes {} inputs, got {}",
                self.inputs.len(),
                inputs.len()
            )));
        }
        let mut env: HashMap<String, Val> = HashMap::new();
        for ((name, float), t) in self.inputs.iter().zip(inputs) {
            let shape: Vec<usize> = t.shape().iter().map(|&d| d as usize).collect();
            let v = if *float {
                let f = t.as_f32_vec().ok_or_else(|| {
                    GpuError::InvalidInput(format!("input `{name}` must be FP32"))
                })?;
                Val::Dev(
                    T6::from_data(TensorData::new(f, padded(&shape)?), &self.device),
                    shape.len(),
                )
            } else {
                let f = t.to_f64_vec().ok_or_else(|| {
                    GpuError::InvalidInput(format!("input `{name}` must be numeric"))
                })?;
                Val::Host(f.into_iter().map(|x| x as i64).collect(), shape)
            };
            env.insert(name.clone(), v);
        }
        for (node, consts) in self.nodes.iter().zip(&self.consts) {
            let args: Vec<Option<Val>> = node
                .inputs()
                .iter()
                .zip(consts)
                .map(|(a, c)| match c {
                    Some(v) => Ok(Some(v.clone())),
                    None if a.is_optional() || a.name.is_empty() => Ok(None),
                    None => env.get(&a.name).cloned().map(Some).ok_or_else(|| {
                        err(node.name(), format!("input `{}` not computed", a.name))
                    }),
                })
                .collect::<Result<_, _>>()?;
            let outs = self.eval(node, args)?;
            for (a, v) in node.outputs().iter().zip(outs) {
                env.insert(a.name.clone(), v);
            }
        }
        self.outputs
            .iter()
            .map(|a| {
                let v = env
                    .remove(&a.name)
                    .or_else(|| a.value().and_then(|d| from_data(&d, &self.device).ok()))
                    .ok_or_else(|| {
                        GpuError::Execution(format!("output `{}` was not computed", a.name))
                    })?;
                to_wire(&a.name, v)
            })
            .collect()
    }

    fn eval(&self, node: &Node, args: Vec<Option<Val>>) -> Result<Vec<Val>, GpuError> {
        let name = node.name();
        let dev = &self.device;
        let arg = |i: usize| -> Result<Val, GpuError> {
            args.get(i)
                .cloned()
                .flatten()
                .ok_or_else(|| err(name, format!("missing input {i}")))
        };
        let f = |i: usize| arg(i).and_then(|v| v.dev(dev));
        let one = |v: Val| Ok(vec![v]);
        match node {
            Node::Identity(_) | Node::Dropout(_) => one(arg(0)?),
            Node::Constant(n) => {
                let d = n.outputs[0]
                    .value()
                    .ok_or_else(|| err(name, "constant without a value"))?;
                one(from_data(&d, dev)?)
            }
            Node::Cast(n) => {
                let v = arg(0)?;
                let to_float = n.config.to.is_float();
                one(match (v, to_float) {
                    (Val::Host(v, s), true) => {
                        Val::Host(v, s).dev(dev).map(|(t, r)| Val::Dev(t, r))?
                    }
                    (Val::Dev(t, r), false) => {
                        let shape = Val::Dev(t.clone(), r).shape();
                        Val::Host(Val::Dev(t, r).host(name)?, shape)
                    }
                    (v, _) => v,
                })
            }
            Node::Add(_) | Node::Sub(_) | Node::Mul(_) | Node::Div(_) | Node::Pow(_) => {
                let (a, b) = (arg(0)?, arg(1)?);
                if let (Val::Host(x, xs), Val::Host(y, ys)) = (&a, &b) {
                    return one(host_binary(node, x, xs, y, ys)?);
                }
                let ((x, xr), (y, yr)) = (a.dev(dev)?, b.dev(dev)?);
                let t = match node {
                    Node::Add(_) => x.add(y),
                    Node::Sub(_) => x.sub(y),
                    Node::Mul(_) => x.mul(y),
                    Node::Div(_) => x.div(y),
                    _ => x.powf(y),
                };
                one(Val::Dev(t, xr.max(yr)))
            }
            Node::Neg(_) => unary(f(0)?, |t| t.neg()),
            Node::Abs(_) => unary(f(0)?, |t| t.abs()),
            Node::Reciprocal(_) => unary(f(0)?, |t| t.recip()),
            Node::Sqrt(_) => unary(f(0)?, |t| t.sqrt()),
            Node::Exp(_) => unary(f(0)?, |t| t.exp()),
            Node::Log(_) => unary(f(0)?, |t| t.log()),
            Node::Relu(_) => unary(f(0)?, activation::relu),
            Node::Sigmoid(_) => unary(f(0)?, activation::sigmoid),
            Node::LeakyRelu(n) => {
                let a = n.config.alpha;
                unary(f(0)?, |t| activation::leaky_relu(t, a))
            }
            Node::HardSigmoid(n) => {
                let (a, b) = (n.config.alpha, n.config.beta);
                unary(f(0)?, |t| t.mul_scalar(a).add_scalar(b).clamp(0.0, 1.0))
            }
            Node::HardSwish(_) => unary(f(0)?, |t| {
                let g = t
                    .clone()
                    .mul_scalar(1.0 / 6.0)
                    .add_scalar(0.5)
                    .clamp(0.0, 1.0);
                t.mul(g)
            }),
            Node::Clip(n) => {
                use onnx_ir::clip::ClipInput;
                let bound = |b: &Option<ClipInput>| -> Result<Option<f64>, GpuError> {
                    match b {
                        None => Ok(None),
                        Some(ClipInput::Static(v)) => Ok(Some(*v)),
                        Some(ClipInput::Runtime(r)) => match arg(r.input_index) {
                            Ok(v) => scalar_f(&v, name).map(Some),
                            Err(_) => Ok(None),
                        },
                    }
                };
                let (lo, hi) = (bound(&n.config.min)?, bound(&n.config.max)?);
                let (mut t, r) = f(0)?;
                if let Some(lo) = lo {
                    t = t.clamp_min(lo);
                }
                if let Some(hi) = hi {
                    t = t.clamp_max(hi);
                }
                one(Val::Dev(t, r))
            }
            Node::Softmax(n) => {
                let (t, r) = f(0)?;
                let axis = n.config.axis;
                one(Val::Dev(activation::softmax(t, R - r + axis), r))
            }
            Node::BatchNormalization(n) => {
                let eps = match &n.config {
                    onnx_ir::batch_norm::BatchNormConfig::Static(c) => c.epsilon,
                    onnx_ir::batch_norm::BatchNormConfig::Runtime(c) => c.epsilon,
                };
                let (x, r) = f(0)?;
                let shape = Val::Dev(x.clone(), r).shape();
                if r < 2 {
                    return Err(err(name, "BatchNormalization needs a channel axis"));
                }
                let c = shape[1];
                let mut cshape = vec![1usize; r];
                cshape[1] = c;
                let p = |i: usize| -> Result<T6, GpuError> {
                    let (t, _) = f(i)?;
                    Ok(t.reshape(padded(&cshape)?))
                };
                let (scale, bias, mean, var) = (p(1)?, p(2)?, p(3)?, p(4)?);
                let inv = var.add_scalar(eps).sqrt().recip().mul(scale);
                let y = x.sub(mean).mul(inv).add(bias);
                one(Val::Dev(y, r))
            }
            Node::Conv2d(n) => {
                let c = &n.config;
                let (x, w, b) = conv_args(&args, dev, name)?;
                let padding = match c.padding {
                    onnx_ir::padding::PaddingConfig2d::Valid => [(0, 0), (0, 0)],
                    onnx_ir::padding::PaddingConfig2d::Explicit(t, l, b, r) => [(t, b), (l, r)],
                };
                let opts = ConvOptions::new_with_padding(c.stride, padding, c.dilation, c.groups);
                one(from4(module::conv2d(x, w, b, opts))?)
            }
            Node::ConvTranspose2d(n) => {
                let c = &n.config;
                let (x, w, b) = conv_args(&args, dev, name)?;
                let opts = ConvTransposeOptions::new(
                    c.stride,
                    c.padding,
                    c.padding_out,
                    c.dilation,
                    c.groups,
                );
                one(from4(module::conv_transpose2d(x, w, b, opts))?)
            }
            Node::MaxPool2d(n) => {
                let c = &n.config;
                let x = to4(f(0)?, name)?;
                let padding = match c.padding {
                    onnx_ir::padding::PaddingConfig2d::Valid => [(0, 0), (0, 0)],
                    onnx_ir::padding::PaddingConfig2d::Explicit(t, l, b, r) => [(t, b), (l, r)],
                };
                let opts = MaxPoolOptions {
                    kernel_size: c.kernel_size,
                    stride: c.strides,
                    padding,
                    dilation: c.dilation,
                    ceil_mode: c.ceil_mode,
                };
                one(from4(module::max_pool2d(x, opts))?)
            }
            Node::GlobalAveragePool(_) => {
                let x = to4(f(0)?, name)?;
                one(from4(x.mean_dim(3).mean_dim(2))?)
            }
            Node::Resize(n) | Node::Upsample(n) => {
                use onnx_ir::resize::{
                    CoordinateTransformMode as C, ResizeMode as M, ResizeScales, ResizeSizes,
                };
                let c = &n.config;
                let x = to4(f(0)?, name)?;
                let [_, _, h, w] = x.dims();
                let sizes: Option<Vec<i64>> = match &c.sizes {
                    Some(ResizeSizes::Static(s)) if !s.is_empty() => {
                        Some(s.iter().map(|&d| d as i64).collect())
                    }
                    Some(ResizeSizes::Runtime(r)) => {
                        arg(r.input_index).ok().map(|v| v.host(name)).transpose()?
                    }
                    _ => None,
                };
                let scales: Option<Vec<f64>> = match &c.scales {
                    Some(ResizeScales::Static(s)) if !s.is_empty() => {
                        Some(s.iter().map(|&d| d as f64).collect())
                    }
                    Some(ResizeScales::Runtime(r)) => arg(r.input_index)
                        .ok()
                        .map(|v| scalars_f(&v, name))
                        .transpose()?,
                    _ => None,
                };
                let out = match (sizes, scales) {
                    (Some(s), _) if s.len() >= 2 => {
                        [s[s.len() - 2] as usize, s[s.len() - 1] as usize]
                    }
                    (_, Some(s)) if s.len() >= 2 => [
                        (h as f64 * s[s.len() - 2]).floor() as usize,
                        (w as f64 * s[s.len() - 1]).floor() as usize,
                    ],
                    _ => return Err(err(name, "Resize without sizes or scales")),
                };
                let (mode, align) = match (&c.mode, &c.coordinate_transformation_mode) {
                    (M::Nearest, _) => (InterpolateMode::Nearest, false),
                    (M::Linear, C::AlignCorners) => (InterpolateMode::Bilinear, true),
                    _ => (InterpolateMode::Bilinear, false),
                };
                let mut opts = InterpolateOptions::new(mode);
                opts.align_corners = align;
                opts.output_size = Some(out);
                one(from4(module::interpolate(x, opts))?)
            }
            Node::MatMul(_) => {
                let ((a, ar), (b, br)) = (f(0)?, f(1)?);
                if ar < 2 || br < 2 {
                    return Err(err(name, "MatMul of a vector is not supported"));
                }
                one(Val::Dev(a.matmul(b), ar.max(br)))
            }
            Node::Linear(n) => {
                let (x, r) = f(0)?;
                let (w, _) = f(1)?;
                let w = if n.config.transpose_weight {
                    w.swap_dims(R - 1, R - 2)
                } else {
                    w
                };
                let mut y = x.matmul(w);
                if let Some(b) = args.get(2).cloned().flatten() {
                    y = y.add(b.dev(dev)?.0);
                }
                one(Val::Dev(y, r.max(2)))
            }
            Node::Gemm(n) => {
                let c = &n.config;
                let (mut a, _) = f(0)?;
                let (mut b, _) = f(1)?;
                if c.trans_a != 0 {
                    a = a.swap_dims(R - 1, R - 2);
                }
                if c.trans_b != 0 {
                    b = b.swap_dims(R - 1, R - 2);
                }
                let mut y = a.matmul(b).mul_scalar(c.alpha);
                if let Some(cv) = args.get(2).cloned().flatten() {
                    y = y.add(cv.dev(dev)?.0.mul_scalar(c.beta));
                }
                one(Val::Dev(y, 2))
            }
            Node::Shape(n) => {
                let s = arg(0)?.shape();
                let (start, end) = (n.config.start.min(s.len()), n.config.end.min(s.len()));
                let v: Vec<i64> = s[start..end.max(start)].iter().map(|&d| d as i64).collect();
                let len = v.len();
                one(Val::Host(v, vec![len]))
            }
            Node::Reshape(n) => {
                use onnx_ir::reshape::ReshapeInput;
                let x = arg(0)?;
                let target = match &n.config.shape {
                    ReshapeInput::Static(s) => s.clone(),
                    ReshapeInput::Runtime(r) => arg(r.input_index)?.host(name)?,
                };
                let shape = reshape_target(&x.shape(), &target, name)?;
                one(x.reshape(&shape, dev)?)
            }
            Node::Flatten(n) => {
                let x = arg(0)?;
                let s = x.shape();
                let axis = n.config.axis.min(s.len());
                let shape = [numel(&s[..axis]), numel(&s[axis..])];
                one(x.reshape(&shape, dev)?)
            }
            Node::Squeeze(n) => {
                use onnx_ir::squeeze::SqueezeInput;
                let x = arg(0)?;
                let s = x.shape();
                let axes: Vec<usize> = match &n.config.axes {
                    None => (0..s.len()).filter(|&i| s[i] == 1).collect(),
                    Some(SqueezeInput::Static(a)) => norm_axes(a, s.len(), name)?,
                    Some(SqueezeInput::Runtime(r)) => {
                        norm_axes(&arg(r.input_index)?.host(name)?, s.len(), name)?
                    }
                };
                let shape: Vec<usize> = (0..s.len())
                    .filter(|i| !axes.contains(i))
                    .map(|i| s[i])
                    .collect();
                one(x.reshape(&shape, dev)?)
            }
            Node::Unsqueeze(n) => {
                use onnx_ir::unsqueeze::UnsqueezeConfig;
                let x = arg(0)?;
                let s = x.shape();
                let raw = match &n.config {
                    UnsqueezeConfig::Static(a) => a.clone(),
                    UnsqueezeConfig::Runtime(r) => arg(r.input_index)?.host(name)?,
                };
                let out_rank = s.len() + raw.len();
                let axes = norm_axes(&raw, out_rank, name)?;
                let mut it = s.iter();
                let shape: Vec<usize> = (0..out_rank)
                    .map(|i| {
                        if axes.contains(&i) {
                            1
                        } else {
                            *it.next().unwrap_or(&1)
                        }
                    })
                    .collect();
                one(x.reshape(&shape, dev)?)
            }
            Node::Transpose(n) => {
                let (t, r) = f(0)?;
                let perm = &n.config.perm;
                if perm.len() != r {
                    return Err(err(name, "perm does not match the rank"));
                }
                let mut p = [0usize; R];
                for (i, slot) in p.iter_mut().enumerate() {
                    *slot = if i < R - r {
                        i
                    } else {
                        R - r + perm[i - (R - r)] as usize
                    };
                }
                one(Val::Dev(t.permute(p), r))
            }
            Node::Concat(n) => {
                let vals: Vec<Val> = args.into_iter().flatten().collect();
                if vals.iter().all(|v| matches!(v, Val::Host(..))) {
                    let mut out = Vec::new();
                    let mut shape = vals.first().map(Val::shape).unwrap_or_default();
                    if shape.len() > 1 {
                        return Err(err(name, "Concat of integer tensors above rank 1"));
                    }
                    for v in &vals {
                        out.extend(v.host(name)?);
                    }
                    shape = vec![out.len()];
                    return one(Val::Host(out, shape));
                }
                let r = vals.iter().map(Val::rank).max().unwrap_or(1);
                let ts = vals
                    .into_iter()
                    .map(|v| v.dev(dev).map(|(t, _)| t))
                    .collect::<Result<Vec<_>, _>>()?;
                one(Val::Dev(Tensor::cat(ts, R - r + n.config.axis), r))
            }
            Node::Slice(n) => {
                use onnx_ir::slice::SliceInput;
                let x = arg(0)?;
                let s = x.shape();
                let get = |si: &SliceInput| -> Result<Vec<i64>, GpuError> {
                    match si {
                        SliceInput::Static(v) => Ok(v.clone()),
                        SliceInput::Runtime(r) => arg(r.input_index)?.host(name),
                    }
                };
                let starts = get(&n.config.starts)?;
                let ends = get(&n.config.ends)?;
                let axes = match &n.config.axes {
                    Some(a) => norm_axes(&get(a)?, s.len(), name)?,
                    None => (0..starts.len()).collect(),
                };
                let steps = match &n.config.steps {
                    Some(st) => get(st)?,
                    None => vec![1; starts.len()],
                };
                let mut ranges: Vec<Range<usize>> = s.iter().map(|&d| 0..d).collect();
                for (k, &axis) in axes.iter().enumerate() {
                    if steps.get(k).copied().unwrap_or(1) != 1 {
                        return Err(err(name, "Slice with a step other than 1"));
                    }
                    let d = s[axis] as i64;
                    let clampi = |v: i64| if v < 0 { (v + d).max(0) } else { v.min(d) };
                    let (a, b) = (clampi(starts[k]), clampi(ends[k]));
                    ranges[axis] = a as usize..(b.max(a)) as usize;
                }
                match x {
                    Val::Host(v, _) => {
                        let out = host_slice(&v, &s, &ranges);
                        let shape: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
                        one(Val::Host(out, shape))
                    }
                    Val::Dev(t, r) => {
                        let mut full: [Range<usize>; R] = std::array::from_fn(|_| 0..1);
                        for (i, rg) in ranges.into_iter().enumerate() {
                            full[R - r + i] = rg;
                        }
                        one(Val::Dev(t.slice(full), r))
                    }
                }
            }
            Node::Gather(n) => {
                let x = arg(0)?;
                let idx = arg(1)?;
                let s = x.shape();
                let axis = n.config.axis;
                if axis >= s.len() {
                    return Err(err(name, "axis out of range"));
                }
                let ishape = idx.shape();
                let indices: Vec<i64> = idx
                    .host(name)?
                    .into_iter()
                    .map(|i| if i < 0 { i + s[axis] as i64 } else { i })
                    .collect();
                if indices.iter().any(|&i| i < 0 || i as usize >= s[axis]) {
                    return Err(err(name, "index out of range"));
                }
                let mut out_shape = s[..axis].to_vec();
                out_shape.extend(&ishape);
                out_shape.extend(&s[axis + 1..]);
                match x {
                    Val::Host(v, _) => {
                        let outer = numel(&s[..axis]);
                        let inner = numel(&s[axis + 1..]);
                        let mut out = Vec::with_capacity(outer * indices.len() * inner);
                        for o in 0..outer {
                            for &i in &indices {
                                let base = (o * s[axis] + i as usize) * inner;
                                out.extend_from_slice(&v[base..base + inner]);
                            }
                        }
                        one(Val::Host(out, out_shape))
                    }
                    Val::Dev(t, r) => {
                        let it = Tensor::<1, Int>::from_data(
                            TensorData::new(indices.clone(), [indices.len()]),
                            dev,
                        );
                        let picked = t.select(R - r + axis, it);
                        one(Val::Dev(picked, r).reshape(&out_shape, dev)?)
                    }
                }
            }
            _ => Err(GpuError::UnsupportedOperator {
                ops: vec![node.node_type().to_string()],
            }),
        }
    }
}

/// Input, weight and optional bias of a convolution.
fn conv_args(
    args: &[Option<Val>],
    dev: &Device,
    op: &str,
) -> Result<(Tensor<4>, Tensor<4>, Option<Tensor<1>>), GpuError> {
    let get = |i: usize| {
        args.get(i)
            .cloned()
            .flatten()
            .ok_or_else(|| err(op, format!("missing input {i}")))
            .and_then(|v| v.dev(dev))
    };
    let x = to4(get(0)?, op)?;
    let w = to4(get(1)?, op)?;
    let b = match args.get(2).cloned().flatten() {
        Some(v) => Some(v.dev(dev)?.0.reshape([-1])),
        None => None,
    };
    Ok((x, w, b))
}

fn unary(v: (T6, usize), op: impl FnOnce(T6) -> T6) -> Result<Vec<Val>, GpuError> {
    Ok(vec![Val::Dev(op(v.0), v.1)])
}

fn to4(v: (T6, usize), op: &str) -> Result<Tensor<4>, GpuError> {
    let (t, r) = v;
    if r != 4 {
        return Err(err(
            op,
            format!("expects a rank-4 input (NCHW), got rank {r}"),
        ));
    }
    let d = t.dims();
    Ok(t.reshape([d[2], d[3], d[4], d[5]]))
}

fn from4(t: Tensor<4>) -> Result<Val, GpuError> {
    let d = t.dims();
    Ok(Val::Dev(t.reshape(padded(&d)?), 4))
}

fn scalars_f(v: &Val, op: &str) -> Result<Vec<f64>, GpuError> {
    match v {
        Val::Host(x, _) => Ok(x.iter().map(|&i| i as f64).collect()),
        Val::Dev(t, _) => t
            .clone()
            .into_data()
            .try_to_vec_as::<f32>()
            .map(|x| x.into_iter().map(f64::from).collect())
            .map_err(|e| err(op, format!("{e:?}"))),
    }
}

fn scalar_f(v: &Val, op: &str) -> Result<f64, GpuError> {
    scalars_f(v, op)?
        .first()
        .copied()
        .ok_or_else(|| err(op, "empty scalar"))
}

fn norm_axes(axes: &[i64], rank: usize, op: &str) -> Result<Vec<usize>, GpuError> {
    axes.iter()
        .map(|&a| {
            let a = if a < 0 { a + rank as i64 } else { a };
            if a < 0 || a as usize >= rank.max(1) {
                Err(err(op, format!("axis {a} out of range for rank {rank}")))
            } else {
                Ok(a as usize)
            }
        })
        .collect()
}

/// ONNX Reshape semantics: 0 copies the input's dimension, -1 is inferred.
fn reshape_target(input: &[usize], target: &[i64], op: &str) -> Result<Vec<usize>, GpuError> {
    let total = numel(input);
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            0 => out.push(
                *input
                    .get(i)
                    .ok_or_else(|| err(op, "0 past the input's rank"))?,
            ),
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            d if d > 0 => out.push(d as usize),
            _ => return Err(err(op, format!("bad target shape {target:?}"))),
        }
    }
    if let Some(i) = infer {
        let known = numel(&out);
        if known == 0 || !total.is_multiple_of(known) {
            return Err(err(op, format!("cannot reshape {input:?} to {target:?}")));
        }
        out[i] = total / known;
    }
    if numel(&out) != total {
        return Err(err(op, format!("cannot reshape {input:?} to {target:?}")));
    }
    Ok(out)
}

fn host_binary(
    node: &Node,
    x: &[i64],
    xs: &[usize],
    y: &[i64],
    ys: &[usize],
) -> Result<Val, GpuError> {
    let name = node.name();
    let (n, shape) = if x.len() >= y.len() {
        (x.len(), xs.to_vec())
    } else {
        (y.len(), ys.to_vec())
    };
    if !(x.len() == n || x.len() == 1) || !(y.len() == n || y.len() == 1) {
        return Err(err(name, "integer broadcasting beyond scalars"));
    }
    let at = |v: &[i64], i: usize| if v.len() == 1 { v[0] } else { v[i] };
    let out = (0..n)
        .map(|i| {
            let (a, b) = (at(x, i), at(y, i));
            match node {
                Node::Add(_) => Ok(a.wrapping_add(b)),
                Node::Sub(_) => Ok(a.wrapping_sub(b)),
                Node::Mul(_) => Ok(a.wrapping_mul(b)),
                Node::Div(_) if b == 0 => Err(err(name, "integer division by zero")),
                Node::Div(_) => Ok(a.div_euclid(b)),
                _ => Ok((a as f64).powf(b as f64) as i64),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Val::Host(out, shape))
}

fn host_slice(v: &[i64], shape: &[usize], ranges: &[Range<usize>]) -> Vec<i64> {
    let mut out = Vec::new();
    let strides: Vec<usize> = (0..shape.len()).map(|i| numel(&shape[i + 1..])).collect();
    let mut idx: Vec<usize> = ranges.iter().map(|r| r.start).collect();
    if ranges.iter().any(|r| r.is_empty()) {
        return out;
    }
    loop {
        let off: usize = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
        out.push(v[off]);
        let mut d = shape.len();
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < ranges[d].end {
                break;
            }
            idx[d] = ranges[d].start;
        }
    }
}

fn to_wire(name: &str, v: Val) -> Result<WireTensor, GpuError> {
    let shape: Vec<u64> = v.shape().iter().map(|&d| d as u64).collect();
    let made = match v {
        Val::Dev(t, _) => {
            let data = t.into_data();
            let f: Vec<f32> = data
                .try_to_vec_as::<f32>()
                .map_err(|e| GpuError::Execution(format!("reading `{name}` back: {e:?}")))?;
            WireTensor::from_f32(name, shape, &f)
        }
        Val::Host(x, _) => WireTensor::new(
            name,
            DataType::Int64,
            shape,
            x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    };
    made.map_err(|e| GpuError::Execution(format!("output `{name}`: {e}")))
}
