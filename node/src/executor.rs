//! Per model version: on-demand load, a bounded queue, a concurrency limit, service-time EWMA.
//!
//! A request first takes a queue place (refused with `Overloaded` at once when the queue is
//! full), then waits for a concurrency permit until its deadline (`DeadlineExceeded` if it
//! cannot start in time), then runs on the blocking pool so the async threads stay free.

use skein_onnx::{LoadedModel, PlanCacheConfig};
use skein_policy::ewma::Ewma;
use skein_proto::{ErrorCode, ModelState, ModelStatus, Tensor, WireError};
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OnceCell, Semaphore};
use tokio::time::Instant;

/// Build the plan of a model whose inputs are all fully declared (no dynamic dimension), so
/// that its first request does not pay for optimisation. Models with dynamic dimensions warm
/// the shapes they are called with, which stay in the plan cache.
fn warm_declared_shapes(model: &LoadedModel) {
    let inputs: Option<Vec<Tensor>> = model
        .metadata()
        .inputs
        .iter()
        .map(|spec| {
            let size = spec.datatype.element_size()?;
            let shape: Vec<u64> = spec
                .shape
                .iter()
                .map(|&d| u64::try_from(d).ok())
                .collect::<Option<_>>()?;
            let n = skein_proto::tensor::element_count(&shape)?;
            if n.saturating_mul(size as u64) > 64 << 20 {
                return None;
            }
            Tensor::new(
                spec.name.clone(),
                spec.datatype,
                shape,
                vec![0; n as usize * size],
            )
            .ok()
        })
        .collect();
    if let Some(inputs) = inputs {
        if let Err(e) = model.run(inputs) {
            tracing::debug!(error = %e, "warm-up with zeros failed; the first request builds the plan");
        }
    }
}

/// EWMA decay of service times.
const SERVICE_DECAY: Duration = Duration::from_secs(10);

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
    model: OnceCell<Arc<LoadedModel>>,
    state: Mutex<ModelState>,
    permits: Semaphore,
    concurrency: u32,
    max_queue: u32,
    queued: AtomicU32,
    in_flight: AtomicU32,
    service: Mutex<Ewma>,
    load_us: AtomicU64,
    epoch: Instant,
    plan_cache: usize,
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

/// The outcome of one request on a slot.
#[derive(Debug)]
pub struct Served {
    /// Outputs in graph order.
    pub outputs: Vec<Tensor>,
    /// Whether the model was loaded or a new plan optimised for this request.
    pub cold_start: bool,
    /// Waiting for a permit, µs.
    pub queue_us: u64,
    /// Loading (on a cold start) plus computing, µs.
    pub compute_us: u64,
    /// Queue depth when done.
    pub queue_depth: u32,
}

impl Slot {
    /// A slot not loaded yet.
    pub fn new(
        name: &str,
        version: &str,
        sha256: &str,
        size: u64,
        concurrency: u32,
        max_queue: u32,
        plan_cache: usize,
    ) -> Slot {
        let concurrency = concurrency.max(1);
        Slot {
            name: name.into(),
            version: version.into(),
            sha256: sha256.into(),
            size,
            model: OnceCell::new(),
            state: Mutex::new(ModelState::Cached),
            permits: Semaphore::new(concurrency as usize),
            concurrency,
            max_queue,
            queued: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            service: Mutex::new(Ewma::new(SERVICE_DECAY.as_micros() as u64)),
            load_us: AtomicU64::new(0),
            epoch: Instant::now(),
            plan_cache: plan_cache.max(1),
        }
    }

    fn set_state(&self, s: ModelState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Whether the model is in memory.
    pub fn is_loaded(&self) -> bool {
        self.model.initialized()
    }

    /// The loaded model, loading it with the bytes from `fetch` the first time (concurrent
    /// callers wait for the one load). Returns the model and whether this call loaded it.
    pub async fn ensure_loaded<F, Fut>(
        &self,
        fetch: F,
    ) -> Result<(Arc<LoadedModel>, bool), WireError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, WireError>>,
    {
        if let Some(m) = self.model.get() {
            return Ok((m.clone(), false));
        }
        let mut loaded_here = false;
        let result = self
            .model
            .get_or_try_init(|| async {
                loaded_here = true;
                self.set_state(ModelState::Fetching);
                let bytes = fetch().await?;
                self.set_state(ModelState::Loading);
                let t0 = Instant::now();
                let cfg = PlanCacheConfig {
                    capacity: self.plan_cache,
                };
                let model = tokio::task::spawn_blocking(move || {
                    let model = LoadedModel::load(&bytes, cfg)?;
                    warm_declared_shapes(&model);
                    Ok::<_, skein_onnx::OnnxError>(model)
                })
                .await
                .map_err(|e| WireError::new(ErrorCode::Internal, format!("loader panicked: {e}")))?
                .map_err(|e| WireError::new(e.code(), e.to_string()))?;
                self.load_us
                    .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                Ok::<_, WireError>(Arc::new(model))
            })
            .await;
        match result {
            Ok(m) => {
                self.set_state(ModelState::Loaded);
                Ok((m.clone(), loaded_here))
            }
            Err(e) => {
                let code = if matches!(
                    e.code,
                    ErrorCode::UnsupportedOperator | ErrorCode::InvalidModel
                ) {
                    e.code
                } else {
                    ErrorCode::ModelLoadFailed
                };
                let e = WireError::new(
                    code,
                    format!(
                        "loading `{}` version `{}`: {}",
                        self.name, self.version, e.message
                    ),
                );
                self.set_state(ModelState::Failed(e.clone()));
                Err(e)
            }
        }
    }

    /// Run one request: queue, wait for a permit until `deadline`, compute off the async threads.
    pub async fn serve(
        &self,
        model: Arc<LoadedModel>,
        inputs: Vec<Tensor>,
        deadline: Instant,
    ) -> Result<Served, WireError> {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(WireError::new(
                ErrorCode::Overloaded,
                format!(
                    "`{}` has {} requests queued on this node; retry after ~{} ms or on another node",
                    self.name,
                    self.max_queue,
                    self.retry_after_ms()
                ),
            ));
        }
        let queued = Count(&self.queued);
        let t0 = Instant::now();
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
                ))
            }
        };
        drop(queued);
        let queue_us = t0.elapsed().as_micros() as u64;
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _running = Count(&self.in_flight);
        let out = tokio::task::spawn_blocking(move || model.run(inputs))
            .await
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("model run panicked: {e}")))?
            .map_err(|e| WireError::new(e.code(), e.to_string()))?;
        drop(permit);
        let compute_us = out.plan_us + out.run_us;
        let now_us = self.epoch.elapsed().as_micros() as u64;
        self.service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(now_us, out.run_us as f64);
        Ok(Served {
            outputs: out.outputs,
            cold_start: out.plan_built,
            queue_us,
            compute_us,
            queue_depth: self.queued.load(Ordering::Relaxed),
        })
    }

    fn service_us(&self) -> f64 {
        self.service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get()
            .unwrap_or(0.0)
    }

    /// A hint for `Overloaded` answers: time to drain the queue.
    pub fn retry_after_ms(&self) -> u64 {
        let per = self.service_us().max(1_000.0);
        ((self.queued.load(Ordering::Relaxed) as f64 * per) / self.concurrency as f64 / 1_000.0)
            .ceil() as u64
    }

    /// Status for heartbeats.
    pub fn status(&self) -> ModelStatus {
        ModelStatus {
            name: self.name.clone(),
            version: self.version.clone(),
            state: self.state.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            queue_depth: self.queued.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            concurrency: self.concurrency,
            service_time_us: self.service_us(),
            load_time_us: self.load_us.load(Ordering::Relaxed),
        }
    }

    /// Mark the artifact as on disk (before any load).
    pub fn mark_cached(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*s, ModelState::Fetching) {
            *s = ModelState::Cached;
        }
    }
}
