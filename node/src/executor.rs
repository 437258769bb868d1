//! Per model version: a replica's lifecycle (load on demand, warm-up, idle unload), a bounded
//! queue, a concurrency limit, and service-time EWMA.
//!
//! A request first takes a queue place (refused with `Overloaded` and a retry-after hint at
//! once when the queue is full). If no replica is loaded it is held, within its deadline, while
//! exactly one load runs (concurrent cold requests share it). It then waits for a concurrency
//! permit until its deadline (`DeadlineExceeded` if it cannot start in time), and runs on the
//! blocking pool so the async threads stay free.
//!
//! A replica is ready only after its warm-up inference (the shapes it served before, or the
//! declared shapes when they are fixed). An idle replica is unloaded by [`Slot::unload_if_idle`];
//! a load in progress is never cancelled by it. The replica's state, keep-alive window and load
//! backoff are a plain [`ReplicaLifecycle`] (module `lifecycle`) that decides on `now` passed in.

use crate::batcher::{batch_key, batchable, buckets, concat, split, BatchPolicy, BatchStats};
use skein_onnx::{Engine, LoadedModel, OnnxError, PlanCacheConfig};
use skein_policy::ewma::Ewma;
use skein_proto::{Assignment, DeploymentSettings, ErrorCode, ModelStatus, Tensor, WireError};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

mod lifecycle;

pub use lifecycle::{load_retry_backoff, LifecycleCounts, ReplicaLifecycle, UnloadReason};

/// EWMA decay of service times.
const SERVICE_DECAY: Duration = Duration::from_secs(10);
/// Input shape sets remembered per model for warm-up after a reload.
const WARM_SHAPES: usize = 4;

/// Shape of one input, enough to build a zero tensor for warm-up.
type InputShape = (String, skein_proto::DataType, Vec<u64>);

/// Build the plan for each remembered shape set (or the declared shapes, a dynamic batch
/// dimension taken as 1), so that the first request after a load does not pay for
/// optimisation (tract) or shader compilation (GPU).
fn warm_up(model: &LoadedModel, remembered: &[Vec<InputShape>]) {
    let declared: Option<Vec<InputShape>> = model
        .metadata()
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<u64> = spec
                .shape
                .iter()
                .enumerate()
                .map(|(i, &d)| match u64::try_from(d) {
                    Ok(d) => Some(d),
                    Err(_) if i == 0 && spec.shape.len() > 1 => Some(1),
                    Err(_) => None,
                })
                .collect::<Option<_>>()?;
            Some((spec.name.clone(), spec.datatype, shape))
        })
        .collect();
    // Already among the remembered ones: no second run.
    let declared = declared.filter(|d| !remembered.contains(d));
    let sets = remembered.iter().cloned().chain(declared);
    for set in sets {
        let inputs: Option<Vec<Tensor>> = set
            .into_iter()
            .map(|(name, dt, shape)| {
                let size = dt.element_size()?;
                let n = skein_proto::tensor::element_count(&shape)?;
                if n.saturating_mul(size as u64) > 64 << 20 {
                    return None;
                }
                Tensor::new(name, dt, shape, vec![0; n as usize * size]).ok()
            })
            .collect();
        if let Some(inputs) = inputs {
            if let Err(e) = model.run(inputs) {
                tracing::debug!(error = %e, "warm-up failed; the first request builds the plan");
            }
        }
    }
}

/// Load on `engine`. A model the GPU engine or ONNX Runtime cannot run (an operator it lacks)
/// loads on tract instead, with a warning, unless the deployment requires a GPU: then the error
/// stands. A deployment that requires a GPU never loads on tract, nor on ONNX Runtime's CPU
/// provider.
fn load_on(
    bytes: &[u8],
    cfg: PlanCacheConfig,
    engine: &Engine,
    require_gpu: bool,
    name: &str,
    version: &str,
) -> Result<LoadedModel, OnnxError> {
    if matches!(engine, Engine::Tract) {
        if require_gpu {
            return Err(OnnxError::Execution(format!(
                "`{name}` requires a GPU and this node runs tract on its CPU"
            )));
        }
        return LoadedModel::load(bytes, cfg);
    }
    #[cfg(feature = "ort")]
    if let Engine::Ort(ort) = engine {
        if require_gpu && !ort.is_gpu() {
            return Err(OnnxError::Execution(format!(
                "`{name}` requires a GPU and this node runs ONNX Runtime on its CPU"
            )));
        }
        return match LoadedModel::load_on(bytes, cfg, engine) {
            Err(e @ OnnxError::UnsupportedOperator { .. }) if !require_gpu => {
                tracing::warn!(model = %name, version = %version, error = %e, "ONNX Runtime cannot run this model; loading it on tract");
                LoadedModel::load(bytes, cfg).map_err(|_| e)
            }
            r => r,
        };
    }
    match LoadedModel::load_on(bytes, cfg, engine) {
        Err(
            e @ (OnnxError::GpuUnsupported { .. }
            | OnnxError::UnsupportedOperator { .. }
            | OnnxError::InvalidModel(_)),
        ) if !require_gpu => {
            tracing::warn!(model = %name, version = %version, error = %e, "the GPU backend cannot run this model; loading it on tract");
            LoadedModel::load(bytes, cfg)
        }
        r => r,
    }
}

/// Give freed heap memory back to the operating system. glibc keeps freed chunks in its
/// per-thread arenas, so without this an unloaded model's memory stays resident.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers from us; it only walks glibc's own arenas and
    // returns free pages to the kernel. It is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Seed the batching measurements at warm-up: for each remembered single-row shape, time one
/// run at bucket 1 and one at bucket 2 (after a first run that builds the plan). Online
/// measurements refine these; larger buckets are explored online when requests queue up.
fn calibrate(
    model: &LoadedModel,
    remembered: &[Vec<InputShape>],
) -> Vec<(Vec<InputShape>, u32, u64)> {
    let mut out = Vec::new();
    for set in remembered {
        if !set.iter().all(|(_, _, shape)| shape.first() == Some(&1)) {
            continue;
        }
        for bucket in [1u64, 2] {
            let inputs: Option<Vec<Tensor>> = set
                .iter()
                .map(|(name, dt, shape)| {
                    let mut shape = shape.clone();
                    shape[0] = bucket;
                    let size = dt.element_size()?;
                    let n = skein_proto::tensor::element_count(&shape)?;
                    if n.saturating_mul(size as u64) > 64 << 20 {
                        return None;
                    }
                    Tensor::new(name.clone(), *dt, shape, vec![0; n as usize * size]).ok()
                })
                .collect();
            let Some(inputs) = inputs else { continue };
            let timed = model.run(inputs.clone()).and_then(|first| {
                if first.plan_built {
                    model.run(inputs)
                } else {
                    Ok(first)
                }
            });
            if let Ok(r) = timed {
                // Keyed like `batch_key`: names, datatypes and the dimensions after the batch.
                let key = set
                    .iter()
                    .map(|(n, d, s)| (n.clone(), *d, s[1..].to_vec()))
                    .collect();
                out.push((key, bucket as u32, r.run_us));
            }
        }
    }
    out
}

/// Resident memory of this process, bytes (0 where unknown).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// Node-wide limits every slot starts with.
#[derive(Debug, Clone)]
pub struct SlotLimits {
    /// Concurrency when the deployment leaves it at 0.
    pub default_concurrency: u32,
    /// Requests that may wait per model.
    pub max_queue: u32,
    /// Plans cached per model.
    pub plan_cache: usize,
    /// How batch sizes are chosen.
    pub batch_policy: BatchPolicy,
    /// The engine models load on (a GPU engine falls back to tract for a model it cannot
    /// run, unless the deployment requires a GPU).
    pub engine: Engine,
}

/// Asks the node to make room for a load of `need` bytes (unloading idle replicas).
pub trait MemoryBudget: Send + Sync {
    /// Ok when `need` more bytes fit, possibly after unloading others.
    fn make_room(&self, need: u64, for_slot: &Slot) -> Result<(), WireError>;
}

/// One model version on this node.
pub struct Slot {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Artifact hash.
    pub sha256: String,
    /// Artifact size.
    pub size: u64,
    settings: Mutex<DeploymentSettings>,
    model: Mutex<Option<Arc<LoadedModel>>>,
    load_lock: tokio::sync::Mutex<()>,
    /// State, load and use times, keep-alive, failure backoff, load and unload counts: one
    /// plain value under one lock. A request takes it once, when its run finishes, where it
    /// stored two relaxed atomics before: measured with `rustc -O` on this 2-core host, clock
    /// read + uncontended lock 58 ns against clock read + two stores 49–57 ns, so at most
    /// ~10 ns on a request that takes 100 µs or more. It is contended only by runs finishing
    /// at the same moment on this slot and by the once-a-second heartbeat and idle check.
    lifecycle: Mutex<ReplicaLifecycle>,
    permits: Semaphore,
    concurrency: AtomicU32,
    max_queue: u32,
    queued: AtomicU32,
    in_flight: AtomicU32,
    service: Mutex<Ewma>,
    load_us: AtomicU64,
    memory: AtomicU64,
    cold_starts: AtomicU64,
    runs: AtomicU64,
    /// Requests that arrived (served or not): the demand the coordinator scales on.
    requests: AtomicU64,
    /// When the last request arrived (µs since `epoch`; 0: none yet).
    arrived_us: AtomicU64,
    shapes: Mutex<Vec<Vec<InputShape>>>,
    epoch: Instant,
    plan_cache: usize,
    /// The engine this slot loads on.
    engine: Engine,
    batchable: AtomicBool,
    batch_policy: BatchPolicy,
    batch_tx: std::sync::OnceLock<mpsc::Sender<Pending>>,
    stats: BatchStats,
}

/// A deployment's keep-alive window.
fn idle_timeout(settings: &DeploymentSettings) -> Duration {
    Duration::from_millis(settings.idle_timeout_ms)
}

/// Per-caller outputs of one batch run, whether a plan was built, plan µs, run µs.
type BatchRun = (Vec<Vec<Tensor>>, bool, u64, u64);

/// A request waiting in the batch queue.
struct Pending {
    inputs: Vec<Tensor>,
    key: Vec<InputShape>,
    target: u32,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Served, WireError>>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Decrements a counter when dropped.
struct Count<'a>(&'a AtomicU32);
impl Drop for Count<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How [`Slot::ensure_loaded`] got its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// It was loaded already.
    Warm,
    /// Another caller's load was in progress; this one waited for it.
    Waited,
    /// This call loaded it.
    Performed,
}

/// The outcome of one request on a slot.
#[derive(Debug)]
pub struct Served {
    /// Outputs in graph order.
    pub outputs: Vec<Tensor>,
    /// Whether the model was loaded or a new plan optimised for this request.
    pub cold_start: bool,
    /// Waiting for a permit (and for a load), µs.
    pub queue_us: u64,
    /// Loading (on a cold start) plus computing, µs.
    pub compute_us: u64,
    /// Queue depth when done.
    pub queue_depth: u32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Slot {
    /// A slot for an assigned model version, not loaded yet.
    pub fn new(a: &Assignment, limits: SlotLimits) -> Slot {
        let concurrency = match a.settings.max_concurrency {
            0 => limits.default_concurrency.max(1),
            n => n,
        };
        Slot {
            name: a.name.clone(),
            version: a.version.clone(),
            sha256: a.sha256.clone(),
            size: a.size,
            settings: Mutex::new(a.settings.clone()),
            model: Mutex::new(None),
            load_lock: tokio::sync::Mutex::new(()),
            lifecycle: Mutex::new(ReplicaLifecycle::new(
                a.keep_warm,
                idle_timeout(&a.settings),
            )),
            permits: Semaphore::new(concurrency as usize),
            concurrency: AtomicU32::new(concurrency),
            max_queue: limits.max_queue,
            queued: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            service: Mutex::new(Ewma::new(SERVICE_DECAY.as_micros() as u64)),
            load_us: AtomicU64::new(0),
            memory: AtomicU64::new(0),
            cold_starts: AtomicU64::new(0),
            runs: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            arrived_us: AtomicU64::new(0),
            shapes: Mutex::new(Vec::new()),
            epoch: Instant::now(),
            plan_cache: limits.plan_cache.max(1),
            engine: limits.engine,
            batchable: AtomicBool::new(false),
            batch_policy: limits.batch_policy,
            batch_tx: std::sync::OnceLock::new(),
            stats: BatchStats::default(),
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn lifecycle_mut(&self) -> std::sync::MutexGuard<'_, ReplicaLifecycle> {
        lock(&self.lifecycle)
    }

    /// Current settings.
    pub fn settings(&self) -> DeploymentSettings {
        lock(&self.settings).clone()
    }

    /// Apply new settings and the keep-warm role from the coordinator.
    pub fn update(&self, settings: DeploymentSettings, keep_warm: bool, default_concurrency: u32) {
        let want = match settings.max_concurrency {
            0 => default_concurrency.max(1),
            n => n,
        };
        let have = self.concurrency.swap(want, Ordering::AcqRel);
        if want > have {
            self.permits.add_permits((want - have) as usize);
        } else if want < have {
            self.permits.forget_permits((have - want) as usize);
        }
        self.lifecycle_mut()
            .set_role(keep_warm, idle_timeout(&settings));
        *lock(&self.settings) = settings;
    }

    /// Whether this node keeps one of the provisioned warm replicas.
    pub fn keep_warm(&self) -> bool {
        self.lifecycle_mut().keep_warm()
    }

    /// Whether the model is in memory.
    pub fn is_loaded(&self) -> bool {
        lock(&self.model).is_some()
    }

    /// Whether a load is in progress.
    pub fn is_loading(&self) -> bool {
        self.load_lock.try_lock().is_err()
    }

    /// Memory the loaded replica holds (measured at load), bytes.
    pub fn memory_bytes(&self) -> u64 {
        if self.is_loaded() {
            self.memory.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    /// Memory a load is expected to need: the setting, else the last measurement, else a guess
    /// from the artifact size.
    pub fn memory_need(&self) -> u64 {
        match self.settings().memory_estimate {
            0 => match self.memory.load(Ordering::Relaxed) {
                0 => self.size.saturating_mul(3),
                m => m,
            },
            m => m,
        }
    }

    /// Model runs so far (a batch counts once).
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Microseconds since the last request finished (None if never used).
    pub fn idle_us(&self) -> Option<u64> {
        let idle = self.lifecycle_mut().idle_for(Instant::now())?;
        Some(u64::try_from(idle.as_micros()).unwrap_or(u64::MAX))
    }

    /// Take a queue place, or `Overloaded` with a retry-after hint.
    fn admit(&self) -> Result<Count<'_>, WireError> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            let retry = self.retry_after_ms();
            return Err(WireError::new(
                ErrorCode::Overloaded,
                format!(
                    "`{}` has {} requests queued on this node; retry after ~{retry} ms or on another node",
                    self.name, self.max_queue
                ),
            )
            .retry_after(retry));
        }
        Ok(Count(&self.queued))
    }

    /// The loaded model, loading it with the bytes from `fetch` if needed. Concurrent callers
    /// wait for the one load. Returns the model and how it was obtained.
    pub async fn ensure_loaded<F, Fut>(
        &self,
        fetch: F,
        budget: &dyn MemoryBudget,
    ) -> Result<(Arc<LoadedModel>, Load), WireError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, WireError>>,
    {
        if let Some(m) = lock(&self.model).clone() {
            return Ok((m, Load::Warm));
        }
        let _loading = self.load_lock.lock().await;
        if let Some(m) = lock(&self.model).clone() {
            return Ok((m, Load::Waited));
        }
        let result = self.load(fetch, budget).await;
        match result {
            Ok(m) => {
                self.batchable
                    .store(batchable(&m.metadata().inputs), Ordering::Relaxed);
                *lock(&self.model) = Some(m.clone());
                self.lifecycle_mut().loaded(Instant::now());
                Ok((m, Load::Performed))
            }
            Err(e) => {
                let code = match e.code {
                    ErrorCode::UnsupportedOperator
                    | ErrorCode::InvalidModel
                    | ErrorCode::NoCapacity => e.code,
                    _ => ErrorCode::ModelLoadFailed,
                };
                let e = WireError::new(
                    code,
                    format!(
                        "loading `{}` version `{}`: {}",
                        self.name, self.version, e.message
                    ),
                );
                self.lifecycle_mut().load_failed(Instant::now(), e.clone());
                Err(e)
            }
        }
    }

    async fn load<F, Fut>(
        &self,
        fetch: F,
        budget: &dyn MemoryBudget,
    ) -> Result<Arc<LoadedModel>, WireError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, WireError>>,
    {
        budget.make_room(self.memory_need(), self)?;
        self.lifecycle_mut().load_started();
        let bytes = fetch().await?;
        self.lifecycle_mut().fetched();
        let t0 = Instant::now();
        let cfg = PlanCacheConfig {
            capacity: self.plan_cache,
        };
        let remembered = lock(&self.shapes).clone();
        let before = resident_bytes();
        let max_batch = self.settings().max_batch_size;
        let engine = self.engine.clone();
        let require_gpu = self.settings().accelerator == skein_proto::Accelerator::Gpu;
        let (name, version) = (self.name.clone(), self.version.clone());
        let (model, calibration) = tokio::task::spawn_blocking(move || {
            let model = load_on(&bytes, cfg, &engine, require_gpu, &name, &version)?;
            drop(bytes);
            warm_up(&model, &remembered);
            let calibration = if max_batch > 1 && batchable(&model.metadata().inputs) {
                calibrate(&model, &remembered)
            } else {
                Vec::new()
            };
            Ok::<_, OnnxError>((model, calibration))
        })
        .await
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("loader panicked: {e}")))?
        .map_err(|e| WireError::new(e.code(), e.to_string()))?;
        for (key, bucket, run_us) in calibration {
            self.stats.observe(&key, bucket, run_us, self.now_us());
        }
        let grown = resident_bytes().saturating_sub(before);
        let estimate = self.settings().memory_estimate;
        let held = if estimate > 0 {
            estimate
        } else {
            grown.max(self.size)
        };
        self.memory.store(held, Ordering::Relaxed);
        let took = t0.elapsed().as_micros() as u64;
        let _ = self
            .load_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |prev| {
                Some(load_estimate(prev, took))
            });
        Ok(Arc::new(model))
    }

    /// Unload the replica when it is idle past its keep-alive window, not provisioned warm, and
    /// nothing is queued, running or loading. Returns whether it unloaded.
    pub fn unload_if_idle(&self) -> bool {
        if !self.lifecycle_mut().idle_expired(Instant::now()) {
            return false;
        }
        self.force_unload(UnloadReason::Idle)
    }

    /// Unload now if nothing is queued, running or loading. Returns whether it unloaded.
    pub fn force_unload(&self, reason: UnloadReason) -> bool {
        let Ok(_loading) = self.load_lock.try_lock() else {
            return false;
        };
        if self.queued.load(Ordering::Acquire) > 0 || self.in_flight.load(Ordering::Acquire) > 0 {
            return false;
        }
        let dropped = lock(&self.model).take();
        let unloaded = dropped.is_some();
        drop(dropped);
        if unloaded {
            self.lifecycle_mut().unloaded(reason);
            release_free_memory();
            tracing::info!(model = %self.name, version = %self.version, reason = reason.as_str(), "replica unloaded");
        }
        unloaded
    }

    /// Serve one request: queue place, load if needed (held within the deadline), permit,
    /// compute off the async threads.
    pub async fn serve<F, Fut>(
        self: &Arc<Self>,
        inputs: Vec<Tensor>,
        deadline: Instant,
        fetch: F,
        budget: &dyn MemoryBudget,
    ) -> Result<Served, WireError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, WireError>>,
    {
        self.arrived_us
            .store(self.now_us().max(1), Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let queued = self.admit()?;
        let t0 = Instant::now();
        let (model, how) = tokio::time::timeout_at(deadline, self.ensure_loaded(fetch, budget))
            .await
            .map_err(|_| {
                WireError::new(
                    ErrorCode::DeadlineExceeded,
                    "the model did not load within the request's deadline",
                )
            })??;
        let load_us = if how == Load::Warm {
            0
        } else {
            t0.elapsed().as_micros() as u64
        };
        self.remember_shapes(&inputs);
        let max_batch = self.settings().max_batch_size;
        let batch_key = (max_batch > 1 && self.batchable.load(Ordering::Relaxed))
            .then(|| batch_key(&inputs))
            .flatten();
        if let Some(key) = batch_key.clone() {
            let waiting = self.queued.load(Ordering::Relaxed);
            let target = self
                .stats
                .target(&key, max_batch, self.batch_policy, waiting);
            // Batching measured not to pay (the usual case on a CPU): the direct path, no hop.
            if target > 1 {
                let mut served = self.serve_batched(inputs, key, target, deadline).await;
                drop(queued);
                if let Ok(s) = served.as_mut() {
                    s.cold_start |= how != Load::Warm;
                    s.compute_us += load_us;
                    if how == Load::Performed {
                        self.cold_starts.fetch_add(1, Ordering::Relaxed);
                    }
                }
                return served;
            }
        }
        let t1 = Instant::now();
        let permit = match tokio::time::timeout_at(deadline, self.permits.acquire()).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => {
                return Err(WireError::new(
                    ErrorCode::ShuttingDown,
                    "the node is shutting down",
                ))
            }
            Err(_) => {
                return Err(WireError::new(
                    ErrorCode::DeadlineExceeded,
                    format!(
                        "the request could not start within its deadline ({} µs queued)",
                        t0.elapsed().as_micros()
                    ),
                )
                .retry_after(self.retry_after_ms()))
            }
        };
        drop(queued);
        let queue_us = t1.elapsed().as_micros() as u64;
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let running = Count(&self.in_flight);
        let out = tokio::task::spawn_blocking(move || model.run(inputs))
            .await
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("model run panicked: {e}")))?
            .map_err(|e| WireError::new(e.code(), e.to_string()));
        drop(permit);
        self.runs.fetch_add(1, Ordering::Relaxed);
        // The request's one lifecycle lock (see the field's doc for its cost).
        self.lifecycle_mut().used(Instant::now());
        drop(running);
        let out = out?;
        if let Some(key) = batch_key {
            if !out.plan_built {
                self.stats.observe(&key, 1, out.run_us, self.now_us());
            }
        }
        // One cold start per load, however many callers it served; a plan built for a new
        // shape on a replica that was already warm is another. (A caller that waited for the
        // load and then built the first plan belongs to the load's cold start.)
        if how == Load::Performed || (how == Load::Warm && out.plan_built) {
            self.cold_starts.fetch_add(1, Ordering::Relaxed);
        }
        let cold_start = how != Load::Warm || out.plan_built;
        self.service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(self.now_us(), out.run_us as f64);
        Ok(Served {
            outputs: out.outputs,
            cold_start,
            queue_us,
            compute_us: out.plan_us + out.run_us + load_us,
            queue_depth: self.queued.load(Ordering::Relaxed),
        })
    }

    /// Queue a single-row request for the batcher and wait for its own row.
    async fn serve_batched(
        self: &Arc<Self>,
        inputs: Vec<Tensor>,
        key: Vec<InputShape>,
        target: u32,
        deadline: Instant,
    ) -> Result<Served, WireError> {
        let tx = self
            .batch_tx
            .get_or_init(|| {
                let (tx, rx) = mpsc::channel(self.max_queue.max(1) as usize);
                tokio::spawn(batch_loop(Arc::downgrade(self), rx));
                tx
            })
            .clone();
        let (reply, rx) = oneshot::channel();
        let pending = Pending {
            inputs,
            key,
            target,
            enqueued: Instant::now(),
            reply,
        };
        tx.try_send(pending).map_err(|_| {
            WireError::new(
                ErrorCode::Overloaded,
                format!("the batch queue of `{}` is full", self.name),
            )
            .retry_after(self.retry_after_ms())
        })?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(WireError::new(
                ErrorCode::ShuttingDown,
                "the batcher stopped",
            )),
            Err(_) => Err(WireError::new(
                ErrorCode::DeadlineExceeded,
                "the request did not complete within its deadline",
            )),
        }
    }

    /// Run one formed batch (any size, one shape) and answer each caller with its own row.
    async fn run_batch(self: Arc<Self>, batch: Vec<Pending>) {
        let Ok(permit) = self.permits.acquire().await else {
            for p in batch {
                let _ = p.reply.send(Err(WireError::new(
                    ErrorCode::ShuttingDown,
                    "the node is shutting down",
                )));
            }
            return;
        };
        let Some(model) = lock(&self.model).clone() else {
            for p in batch {
                let _ = p.reply.send(Err(WireError::new(
                    ErrorCode::ModelLoadFailed,
                    "the replica was unloaded",
                )));
            }
            return;
        };
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let _running = Count(&self.in_flight);
        let n = batch.len();
        let started = Instant::now();
        let requests: Vec<Vec<Tensor>> = batch.iter().map(|p| p.inputs.clone()).collect();
        let key = batch[0].key.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<BatchRun, WireError> {
            let run = |inputs: Vec<Tensor>| {
                model
                    .run(inputs)
                    .map_err(|e| WireError::new(e.code(), e.to_string()))
            };
            if n == 1 {
                let out = run(requests.into_iter().next().unwrap_or_default())?;
                return Ok((vec![out.outputs], out.plan_built, out.plan_us, out.run_us));
            }
            let out = run(concat(&requests)?)?;
            match split(&out.outputs, n) {
                Some(rows) => Ok((rows, out.plan_built, out.plan_us, out.run_us)),
                // Outputs not batched along the first dimension: run each request alone.
                None => {
                    let mut rows = Vec::with_capacity(n);
                    let (mut plan_us, mut run_us) = (out.plan_us, out.run_us);
                    for r in requests {
                        let o = run(r)?;
                        plan_us += o.plan_us;
                        run_us += o.run_us;
                        rows.push(o.outputs);
                    }
                    Ok((rows, true, plan_us, run_us))
                }
            }
        })
        .await
        .unwrap_or_else(|e| {
            Err(WireError::new(
                ErrorCode::Internal,
                format!("model run panicked: {e}"),
            ))
        });
        drop(permit);
        self.runs.fetch_add(1, Ordering::Relaxed);
        // The request's one lifecycle lock (see the field's doc for its cost).
        self.lifecycle_mut().used(Instant::now());
        match result {
            Ok((rows, plan_built, plan_us, run_us)) => {
                if rows.len() != n {
                    self.batchable.store(false, Ordering::Relaxed);
                }
                if !plan_built {
                    self.stats.observe(&key, n as u32, run_us, self.now_us());
                } else {
                    self.cold_starts.fetch_add(1, Ordering::Relaxed);
                }
                self.service
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .observe(self.now_us(), run_us as f64 / n as f64);
                for (p, outputs) in batch.into_iter().zip(rows) {
                    let _ = p.reply.send(Ok(Served {
                        outputs,
                        cold_start: plan_built,
                        queue_us: started.saturating_duration_since(p.enqueued).as_micros() as u64,
                        compute_us: plan_us + run_us,
                        queue_depth: self.queued.load(Ordering::Relaxed),
                    }));
                }
            }
            Err(e) => {
                for p in batch {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn remember_shapes(&self, inputs: &[Tensor]) {
        let set: Vec<InputShape> = inputs
            .iter()
            .map(|t| (t.name().to_string(), t.datatype(), t.shape().to_vec()))
            .collect();
        let mut shapes = lock(&self.shapes);
        if let Some(i) = shapes.iter().position(|s| *s == set) {
            let s = shapes.remove(i);
            shapes.push(s);
        } else {
            if shapes.len() >= WARM_SHAPES {
                shapes.remove(0);
            }
            shapes.push(set);
        }
    }

    fn service_us(&self) -> f64 {
        lock(&self.service).get().unwrap_or(0.0)
    }

    /// A hint for `Overloaded` answers: time to drain the queue, ms (at least 1).
    pub fn retry_after_ms(&self) -> u64 {
        let per = self.service_us().max(1_000.0);
        let conc = self.concurrency.load(Ordering::Relaxed).max(1) as f64;
        ((self.queued.load(Ordering::Relaxed) as f64 * per) / conc / 1_000.0)
            .ceil()
            .max(1.0) as u64
    }

    /// Loads and unloads since the node started.
    pub fn lifecycle(&self) -> LifecycleCounts {
        let (loads, load_failures, unloads) = self.lifecycle_mut().counts();
        LifecycleCounts {
            name: self.name.clone(),
            version: self.version.clone(),
            loads,
            load_failures,
            unloads,
        }
    }

    /// Status for heartbeats.
    pub fn status(&self) -> ModelStatus {
        let (state, idle) = {
            let now = Instant::now();
            let l = self.lifecycle_mut();
            (l.reported_state(now), l.idle_for(now))
        };
        ModelStatus {
            name: self.name.clone(),
            version: self.version.clone(),
            state,
            queue_depth: self.queued.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            concurrency: self.concurrency.load(Ordering::Relaxed),
            service_time_us: self.service_us(),
            load_time_us: self.load_us.load(Ordering::Relaxed),
            cold_starts: self.cold_starts.load(Ordering::Relaxed),
            idle_ms: idle.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            memory_bytes: self.memory_bytes(),
            runs: self.runs(),
            requests: self.requests.load(Ordering::Relaxed),
            since_arrival_ms: match self.arrived_us.load(Ordering::Relaxed) {
                0 => None,
                at => Some(self.now_us().saturating_sub(at) / 1000),
            },
        }
    }
}

/// Forms batches from the queue of one slot, for as long as the slot lives.
async fn batch_loop(slot: std::sync::Weak<Slot>, mut rx: mpsc::Receiver<Pending>) {
    let mut held: std::collections::VecDeque<Pending> = std::collections::VecDeque::new();
    loop {
        let first = match held.pop_front() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        let Some(slot) = slot.upgrade() else { break };
        let settings = slot.settings();
        let max = settings.max_batch_size.max(1);
        let target = first.target.clamp(1, max);
        let mut batch = vec![first];
        // Compatible requests already waiting join first, in arrival order.
        let mut i = 0;
        while i < held.len() && batch.len() < target as usize {
            if held[i].key == batch[0].key {
                if let Some(p) = held.remove(i) {
                    batch.push(p);
                }
            } else {
                i += 1;
            }
        }
        if batch.len() < target as usize {
            let until = Instant::now() + Duration::from_micros(settings.max_queue_delay_us);
            while batch.len() < target as usize {
                // Take what is already queued without waiting; wait only up to the delay.
                let next = match rx.try_recv() {
                    Ok(p) => Some(p),
                    Err(_) => tokio::time::timeout_at(until, rx.recv())
                        .await
                        .ok()
                        .flatten(),
                };
                let Some(p) = next else { break };
                if p.key == batch[0].key {
                    batch.push(p);
                } else {
                    held.push_back(p);
                }
            }
        }
        // Round down to a bucket so the plan cache holds few batch shapes.
        let size = buckets(target)
            .into_iter()
            .filter(|&b| b as usize <= batch.len())
            .max()
            .unwrap_or(1) as usize;
        for p in batch.drain(size..).rev() {
            held.push_front(p);
        }
        tokio::spawn(slot.run_batch(batch));
    }
}

/// The load time reported to the coordinator, µs, which starts pre-warm loads that far ahead
/// of a predicted call: peak-sensitive, so a slow load counts at once and faster ones bring the
/// estimate down only gradually (a third of the way each). Loading a little early costs some
/// idle replica time; loading late costs the call a cold start, and load times on a shared
/// host vary severalfold from one load to the next.
fn load_estimate(prev_us: u64, took_us: u64) -> u64 {
    if took_us >= prev_us {
        took_us
    } else {
        prev_us - (prev_us - took_us) / 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_estimate_takes_slow_loads_at_once_and_fast_ones_gradually() {
        assert_eq!(load_estimate(0, 300_000), 300_000);
        assert_eq!(load_estimate(300_000, 560_000), 560_000);
        assert_eq!(load_estimate(560_000, 200_000), 440_000);
        assert_eq!(load_estimate(440_000, 200_000), 360_000);
        assert_eq!(load_estimate(u64::MAX, 0), u64::MAX - u64::MAX / 3);
    }

    struct Unlimited;
    impl MemoryBudget for Unlimited {
        fn make_room(&self, _need: u64, _for_slot: &Slot) -> Result<(), WireError> {
            Ok(())
        }
    }

    fn model_bytes() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/ppocr_cls/model.onnx"
        ))
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reload_warms_remembered_shapes_and_seeds_batch_measurements() {
        let bytes = model_bytes();
        let assignment = Assignment {
            name: "ppocr_cls".into(),
            version: "1".into(),
            sha256: "0".repeat(64),
            size: bytes.len() as u64,
            settings: DeploymentSettings {
                max_batch_size: 4,
                ..Default::default()
            },
            keep_warm: false,
            unload_idle: false,
            prewarm: false,
        };
        let slot = Arc::new(Slot::new(
            &assignment,
            SlotLimits {
                default_concurrency: 1,
                max_queue: 8,
                plan_cache: 8,
                batch_policy: BatchPolicy::Measured,
                engine: Engine::Tract,
            },
        ));
        let x = Tensor::from_f32("x", vec![1, 3, 48, 96], &vec![0.25; 3 * 48 * 96]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let fetch = || async { Ok(model_bytes()) };
        let first = slot
            .serve(vec![x.clone()], deadline, fetch, &Unlimited)
            .await
            .unwrap();
        assert!(first.cold_start);
        assert!(slot.force_unload(UnloadReason::Memory), "idle and unloaded");
        assert!(!slot.is_loaded());

        // Reload: the remembered shape is warmed and buckets 1 and 2 are measured before ready.
        let (_, how) = slot.ensure_loaded(fetch, &Unlimited).await.unwrap();
        assert_eq!(how, Load::Performed);
        let key = batch_key(std::slice::from_ref(&x)).unwrap();
        assert!(slot.stats.per_item_us(&key, 1).is_some());
        assert!(slot.stats.per_item_us(&key, 2).is_some());
        let again = slot
            .serve(vec![x], deadline, fetch, &Unlimited)
            .await
            .unwrap();
        assert!(!again.cold_start, "the plan was built during warm-up");
        let counts = slot.lifecycle();
        assert_eq!((counts.loads, counts.load_failures), (2, 0));
        assert_eq!(counts.unloads, [0, 1, 0], "one unload, for memory");
        // A load that fails is counted as such.
        assert!(slot.force_unload(UnloadReason::Scaler));
        let broken = || async { Ok(b"not onnx".to_vec()) };
        assert!(slot.ensure_loaded(broken, &Unlimited).await.is_err());
        let counts = slot.lifecycle();
        assert_eq!((counts.loads, counts.load_failures), (2, 1));
        assert_eq!(counts.unloads, [0, 1, 1]);
    }
}
