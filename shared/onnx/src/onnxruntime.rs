//! The ONNX Runtime engine ([`Engine::Ort`](crate::Engine::Ort)), on the `ort` crate with its
//! `load-dynamic` feature: nothing native is built or downloaded; `libonnxruntime.so` is loaded
//! at run time from a path the node is given (`--ort-lib`, `SKEIN_ORT_LIB`, `ORT_DYLIB_PATH`),
//! or by name from the dynamic loader's search path.
//!
//! ONNX Runtime can be loaded once per process, and it has one environment per process: the
//! first successful [`OrtEngine::load`] wins; later ones naming the same library share it (with
//! their own thread and execution-provider settings, which are per session), and ones naming
//! another library fail.
//!
//! A session plans for dynamic shapes itself, so [`LoadedModel`](crate::LoadedModel) keeps only
//! the mark that a shape has been seen (for warm-up and cold-start accounting). `Session::run`
//! takes the session mutably in `ort`, so runs of one model are serialised on a mutex; ORT's
//! intra-op threads parallelise each run.

use crate::OnnxError;
use ort::ep::{ExecutionProvider, ExecutionProviderDispatch};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{Tensor as OrtTensor, TensorElementType, TensorRef, ValueType};
use skein_proto::{DataType, Tensor};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The ONNX Runtime API version (minor version of 1.x) this build needs at least.
pub const MIN_ORT_MINOR: u32 = ort::MINOR_VERSION;

/// The environment variables naming the library, in the order they are read.
pub const LIB_ENV: [&str; 2] = ["SKEIN_ORT_LIB", "ORT_DYLIB_PATH"];

/// The execution provider sessions are created with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OrtEp {
    /// ONNX Runtime's own CPU kernels.
    #[default]
    Cpu,
    /// CUDA (the `onnxruntime-gpu` library), then the CPU for what it lacks.
    Cuda,
    /// TensorRT, then CUDA, then the CPU.
    TensorRt,
}

impl std::str::FromStr for OrtEp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(OrtEp::Cpu),
            "cuda" => Ok(OrtEp::Cuda),
            "tensorrt" => Ok(OrtEp::TensorRt),
            other => Err(format!(
                "ONNX Runtime execution provider `{other}`: expected cpu, cuda or tensorrt"
            )),
        }
    }
}

/// How to load ONNX Runtime and create sessions.
#[derive(Debug, Clone, Default)]
pub struct OrtOptions {
    /// The library; `None`: [`LIB_ENV`], then `libonnxruntime.so` by name.
    pub lib: Option<PathBuf>,
    /// Intra-op threads per session (0: ONNX Runtime's default, one per core).
    pub intra_threads: usize,
    /// The execution provider.
    pub ep: OrtEp,
}

/// ONNX Runtime, loaded; cheap to clone.
#[derive(Clone)]
pub struct OrtEngine(Arc<Inner>);

struct Inner {
    env: ort::environment::Environment,
    runtime: Arc<Runtime>,
    intra_threads: usize,
    ep: OrtEp,
}

/// What is loaded once per process.
struct Runtime {
    path: PathBuf,
    version: String,
    providers: Vec<String>,
}

static LOADED: Mutex<Option<(ort::environment::Environment, Arc<Runtime>)>> = Mutex::new(None);

impl std::fmt::Debug for OrtEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtEngine")
            .field("path", &self.0.runtime.path)
            .field("version", &self.0.runtime.version)
            .field("intra_threads", &self.0.intra_threads)
            .field("ep", &self.0.ep)
            .finish()
    }
}

/// The library `lib` names, else the first of [`LIB_ENV`] that is set, else the bare file name
/// for the dynamic loader to find.
pub fn library_path(lib: Option<&Path>) -> PathBuf {
    if let Some(p) = lib {
        return p.to_path_buf();
    }
    for var in LIB_ENV {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            return PathBuf::from(v);
        }
    }
    PathBuf::from(format!(
        "{}onnxruntime{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

/// Whether `a` and `b` name the same library file (or the same bare name).
fn same_library(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (a.canonicalize(), b.canonicalize()),
            (Ok(x), Ok(y)) if x == y
        )
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// The version in ORT's build-info string (`git-branch=rel-1.31.1`), else the library's file
/// name (`libonnxruntime.so.1.31.1`), else `1.x` with the API version.
fn version_of(path: &Path) -> String {
    let info = ort::info();
    if let Some(v) = info
        .split([',', ' '])
        .find_map(|w| w.strip_prefix("git-branch=rel-"))
    {
        return v.to_string();
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(v) = name.split(".so.").nth(1) {
        return v.to_string();
    }
    format!("1.{}+", ort::MINOR_VERSION)
}

fn load_runtime(path: &Path) -> Result<(ort::environment::Environment, Arc<Runtime>), String> {
    let builder = ort::init_from(path).map_err(|e| {
        format!(
            "ONNX Runtime: {e} (this build needs ONNX Runtime 1.{MIN_ORT_MINOR} or newer; pass --ort-lib PATH or set SKEIN_ORT_LIB to libonnxruntime.so, e.g. from the `onnxruntime` wheel's onnxruntime/capi/)"
        )
    })?;
    let env = builder
        .with_name("skein")
        .build()
        .map_err(|e| format!("ONNX Runtime: creating the environment: {e}"))?;
    let mut providers = Vec::new();
    for (name, available) in [
        (
            ort::ep::TensorRT::NAME,
            ort::ep::TensorRT::is_available as fn() -> ort::Result<bool>,
        ),
        (ort::ep::CUDA::NAME, ort::ep::CUDA::is_available),
        (ort::ep::CPU::NAME, ort::ep::CPU::is_available),
    ] {
        if available().unwrap_or(false) {
            providers.push(name.to_string());
        }
    }
    let version = version_of(path);
    Ok((
        env,
        Arc::new(Runtime {
            path: path.to_path_buf(),
            version,
            providers,
        }),
    ))
}

impl OrtEngine {
    /// Load ONNX Runtime (once per process: a second call shares the first library) and check
    /// that it can serve `options.ep`. The error says what is missing, for the operator.
    pub fn load(options: &OrtOptions) -> Result<OrtEngine, String> {
        let path = library_path(options.lib.as_deref());
        let (env, runtime) = {
            let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
            match &*loaded {
                Some(l) if same_library(&l.1.path, &path) => l.clone(),
                Some(l) => {
                    return Err(format!(
                        "ONNX Runtime is already loaded from `{}` in this process; `{}` cannot be loaded beside it",
                        l.1.path.display(),
                        path.display()
                    ))
                }
                None => {
                    if path.components().count() > 1 && !path.exists() {
                        return Err(format!(
                            "ONNX Runtime: no library at `{}`: pass --ort-lib PATH or set SKEIN_ORT_LIB to libonnxruntime.so (the `onnxruntime` wheel ships one under onnxruntime/capi/)",
                            path.display()
                        ));
                    }
                    let l = catch_unwind(|| load_runtime(&path)).unwrap_or_else(|p| {
                        Err(format!(
                            "ONNX Runtime: loading `{}` panicked: {}",
                            path.display(),
                            panic_text(&*p)
                        ))
                    })?;
                    *loaded = Some(l.clone());
                    l
                }
            }
        };
        let needed = match options.ep {
            OrtEp::Cpu => None,
            OrtEp::Cuda => Some(ort::ep::CUDA::NAME),
            OrtEp::TensorRt => Some(ort::ep::TensorRT::NAME),
        };
        if let Some(ep) = needed {
            if !runtime.providers.iter().any(|p| p == ep) {
                return Err(format!(
                    "ONNX Runtime {} at `{}` has no {ep} (it offers {}): use the `onnxruntime-gpu` library",
                    runtime.version,
                    runtime.path.display(),
                    runtime.providers.join(", ")
                ));
            }
        }
        Ok(OrtEngine(Arc::new(Inner {
            env,
            runtime,
            intra_threads: options.intra_threads,
            ep: options.ep,
        })))
    }

    /// ONNX Runtime's version, e.g. `1.31.1`.
    pub fn version(&self) -> &str {
        &self.0.runtime.version
    }

    /// The library loaded.
    pub fn path(&self) -> &Path {
        &self.0.runtime.path
    }

    /// The execution providers the library offers (TensorRT, CUDA, CPU as present).
    pub fn available_providers(&self) -> &[String] {
        &self.0.runtime.providers
    }

    /// The execution providers sessions use, in order of preference.
    pub fn providers(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.0.ep == OrtEp::TensorRt {
            out.push(ort::ep::TensorRT::NAME.to_string());
        }
        if matches!(self.0.ep, OrtEp::TensorRt | OrtEp::Cuda) {
            out.push(ort::ep::CUDA::NAME.to_string());
        }
        out.push(ort::ep::CPU::NAME.to_string());
        out
    }

    /// Whether sessions run on a GPU.
    pub fn is_gpu(&self) -> bool {
        self.0.ep != OrtEp::Cpu
    }

    /// Intra-op threads per session (0: ONNX Runtime's default).
    pub fn intra_threads(&self) -> usize {
        self.0.intra_threads
    }

    fn session(&self, bytes: &[u8]) -> ort::Result<Session> {
        let mut eps: Vec<ExecutionProviderDispatch> = Vec::new();
        if self.0.ep == OrtEp::TensorRt {
            eps.push(ort::ep::TensorRT::default().build().error_on_failure());
        }
        if matches!(self.0.ep, OrtEp::TensorRt | OrtEp::Cuda) {
            eps.push(ort::ep::CUDA::default().build().error_on_failure());
        }
        let mut b = Session::builder(&self.0.env)?
            .with_optimization_level(GraphOptimizationLevel::Level3)?
            .with_inter_threads(1)?
            // Idle intra-op threads must not spin: a node runs many models on shared cores.
            .with_intra_op_spinning(false)?;
        if self.0.intra_threads > 0 {
            b = b.with_intra_threads(self.0.intra_threads)?;
        }
        if !eps.is_empty() {
            b = b.with_execution_providers(eps)?;
        }
        b.commit_from_memory(bytes)
    }
}

/// One model's ONNX Runtime session.
pub struct OrtModel {
    session: Mutex<Session>,
}

impl OrtModel {
    /// Create the session (ORT optimises the graph here). Bytes ORT refuses are
    /// [`OnnxError::InvalidModel`], with ORT's words.
    pub fn load(bytes: &[u8], engine: &OrtEngine) -> Result<OrtModel, OnnxError> {
        let session = catch_unwind(AssertUnwindSafe(|| engine.session(bytes)))
            .map_err(|p| {
                OnnxError::InvalidModel(format!(
                    "ONNX Runtime panicked loading the model: {}",
                    panic_text(&*p)
                ))
            })?
            .map_err(|e| OnnxError::InvalidModel(format!("ONNX Runtime: {e}")))?;
        Ok(OrtModel {
            session: Mutex::new(session),
        })
    }

    /// Run with `inputs` (already validated against the model's declared inputs).
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, OnnxError> {
        let values = inputs
            .iter()
            .map(|t| Ok((t.name(), to_ort(t)?)))
            .collect::<Result<Vec<(&str, SessionInputValue<'_>)>, OnnxError>>()?;
        // A panic leaves the session as ORT left it; the mutex is not poisoned for later runs.
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        catch_unwind(AssertUnwindSafe(|| -> Result<Vec<Tensor>, OnnxError> {
            let outputs = session
                .run(values)
                .map_err(|e| OnnxError::Execution(format!("ONNX Runtime: {e}")))?;
            outputs.iter().map(|(name, v)| from_ort(name, &v)).collect()
        }))
        .unwrap_or_else(|p| {
            Err(OnnxError::Execution(format!(
                "ONNX Runtime panicked: {}",
                panic_text(&*p)
            )))
        })
    }
}

fn le<const N: usize>(c: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(c);
    a
}

/// An ORT input holding `t`'s values: a view of the tensor's own bytes when they are
/// aligned for the element type on a little-endian host (the usual case: a received payload
/// has a buffer of its own), else a converted copy.
fn to_ort(t: &Tensor) -> Result<SessionInputValue<'_>, OnnxError> {
    let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
    let d = t.data();
    let bad = |e: ort::Error| OnnxError::InvalidInput(format!("input `{}`: {e}", t.name()));
    macro_rules! num {
        ($ty:ty) => {{
            const N: usize = std::mem::size_of::<$ty>();
            match bytemuck::try_cast_slice::<u8, $ty>(d) {
                Ok(view) if cfg!(target_endian = "little") => {
                    TensorRef::from_array_view((shape, view))
                        .map(SessionInputValue::from)
                        .map_err(bad)
                }
                _ => {
                    let v: Vec<$ty> = d
                        .chunks_exact(N)
                        .map(|c| <$ty>::from_le_bytes(le::<N>(c)))
                        .collect();
                    OrtTensor::from_array((shape, v))
                        .map(SessionInputValue::from)
                        .map_err(bad)
                }
            }
        }};
    }
    match t.datatype() {
        DataType::Bool => {
            OrtTensor::from_array((shape, d.iter().map(|&b| b != 0).collect::<Vec<bool>>()))
                .map(SessionInputValue::from)
                .map_err(bad)
        }
        DataType::Uint8 => num!(u8),
        DataType::Uint16 => num!(u16),
        DataType::Uint32 => num!(u32),
        DataType::Uint64 => num!(u64),
        DataType::Int8 => num!(i8),
        DataType::Int16 => num!(i16),
        DataType::Int32 => num!(i32),
        DataType::Int64 => num!(i64),
        DataType::Fp32 => num!(f32),
        DataType::Fp64 => num!(f64),
        DataType::Fp16 => {
            let v: Vec<half::f16> = d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes(le::<2>(c)))
                .collect();
            OrtTensor::from_array((shape, v))
                .map(SessionInputValue::from)
                .map_err(bad)
        }
        DataType::Bf16 => {
            let v: Vec<half::bf16> = d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes(le::<2>(c)))
                .collect();
            OrtTensor::from_array((shape, v))
                .map(SessionInputValue::from)
                .map_err(bad)
        }
        other => Err(OnnxError::InvalidInput(format!(
            "input `{}`: datatype {other} is not supported by the ONNX Runtime backend",
            t.name()
        ))),
    }
}

/// A skein tensor named `name` holding the ORT value's elements.
fn from_ort(name: &str, v: &ort::value::DynValueRef<'_>) -> Result<Tensor, OnnxError> {
    let fail = |e: ort::Error| OnnxError::Execution(format!("output `{name}`: {e}"));
    let ValueType::Tensor { ty, .. } = v.dtype() else {
        return Err(OnnxError::Execution(format!(
            "output `{name}` is not a tensor ({}), which has no V2 datatype",
            v.dtype()
        )));
    };
    macro_rules! num {
        ($ty:ty, $dt:expr) => {{
            let (shape, data) = v.try_extract_tensor::<$ty>().map_err(fail)?;
            let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (shape.to_vec(), $dt, bytes)
        }};
    }
    let (shape, dt, bytes) = match ty {
        TensorElementType::Bool => {
            let (shape, data) = v.try_extract_tensor::<bool>().map_err(fail)?;
            (
                shape.to_vec(),
                DataType::Bool,
                data.iter().map(|&b| b as u8).collect(),
            )
        }
        TensorElementType::Uint8 => num!(u8, DataType::Uint8),
        TensorElementType::Uint16 => num!(u16, DataType::Uint16),
        TensorElementType::Uint32 => num!(u32, DataType::Uint32),
        TensorElementType::Uint64 => num!(u64, DataType::Uint64),
        TensorElementType::Int8 => num!(i8, DataType::Int8),
        TensorElementType::Int16 => num!(i16, DataType::Int16),
        TensorElementType::Int32 => num!(i32, DataType::Int32),
        TensorElementType::Int64 => num!(i64, DataType::Int64),
        TensorElementType::Float32 => num!(f32, DataType::Fp32),
        TensorElementType::Float64 => num!(f64, DataType::Fp64),
        TensorElementType::Float16 => num!(half::f16, DataType::Fp16),
        TensorElementType::Bfloat16 => num!(half::bf16, DataType::Bf16),
        other => {
            return Err(OnnxError::Execution(format!(
                "output `{name}` has element type {other:?}, which the ONNX Runtime backend does not return"
            )))
        }
    };
    let shape: Vec<u64> = shape.iter().map(|&d| d.max(0) as u64).collect();
    Tensor::new(name, dt, shape, bytes).map_err(|e| OnnxError::Execution(e.to_string()))
}
