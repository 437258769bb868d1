//! Micro-batching, measured rather than assumed.
//!
//! For models whose every input has a dynamic first dimension, single-row requests that arrive
//! within `max_queue_delay` are concatenated along that dimension, run once, and split back,
//! each caller getting exactly its own row. Batch sizes come from the buckets 1, 2, 4, 8, ...
//! up to `max_batch_size`, so the shape-keyed plan cache stays bounded.
//!
//! Whether batching helps depends on the backend: with tract on a CPU a batch of 4 can cost more
//! per item than 4 single runs, while GPUs usually win. So the per-item time of each bucket is
//! measured (EWMA, per input shape) and a batch is formed only at the bucket with the best
//! measured per-item time; an unmeasured bucket one step above the best is tried now and then.
//! [`BatchPolicy::Always`] skips the measurement and fills the largest bucket available.

use skein_policy::ewma::Ewma;
use skein_proto::{Tensor, TensorSpec, WireError};
use std::collections::HashMap;
use std::sync::Mutex;

/// How batch sizes are chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchPolicy {
    /// Use the bucket with the best measured per-item time (default).
    #[default]
    Measured,
    /// Always fill the largest bucket that the queued requests allow.
    Always,
}

/// Explore an unmeasured bucket once every this many batches.
const EXPLORE_EVERY: u64 = 16;
/// Shapes × buckets remembered.
const MAX_STATS: usize = 256;

/// The bucket sizes up to `max`.
pub fn buckets(max: u32) -> Vec<u32> {
    let mut out = vec![1];
    while out.last().is_some_and(|&b| b * 2 <= max) {
        let next = out.last().copied().unwrap_or(1) * 2;
        out.push(next);
    }
    out
}

/// Whether requests of this model can be concatenated: every input has rank ≥ 1 and a dynamic
/// first dimension.
pub fn batchable(inputs: &[TensorSpec]) -> bool {
    !inputs.is_empty() && inputs.iter().all(|s| s.shape.first() == Some(&-1))
}

/// The key requests must share to be batched: names, datatypes and trailing dimensions. `None`
/// when the request is not a single row.
pub fn batch_key(inputs: &[Tensor]) -> Option<Vec<(String, skein_proto::DataType, Vec<u64>)>> {
    inputs
        .iter()
        .map(|t| match t.shape().split_first() {
            Some((1, rest)) => Some((t.name().to_string(), t.datatype(), rest.to_vec())),
            _ => None,
        })
        .collect()
}

/// Concatenate single-row requests (same key) along the first dimension.
pub fn concat(requests: &[Vec<Tensor>]) -> Result<Vec<Tensor>, WireError> {
    let first = requests
        .first()
        .ok_or_else(|| WireError::new(skein_proto::ErrorCode::Internal, "empty batch"))?;
    let n = requests.len() as u64;
    first
        .iter()
        .enumerate()
        .map(|(i, t0)| {
            let mut data = Vec::with_capacity(t0.data().len() * requests.len());
            for r in requests {
                data.extend_from_slice(r[i].data());
            }
            let mut shape = t0.shape().to_vec();
            shape[0] = n;
            Tensor::new(t0.name(), t0.datatype(), shape, data).map_err(WireError::from)
        })
        .collect()
}

/// Split batched outputs back into `n` single-row results; `None` when an output's first
/// dimension is not the batch.
pub fn split(outputs: &[Tensor], n: usize) -> Option<Vec<Vec<Tensor>>> {
    let mut per: Vec<Vec<Tensor>> = (0..n).map(|_| Vec::with_capacity(outputs.len())).collect();
    for t in outputs {
        let (&d0, rest) = t.shape().split_first()?;
        if d0 as usize != n || t.datatype().element_size().is_none() {
            return None;
        }
        let row = t.data().len() / n;
        let mut shape = vec![1];
        shape.extend_from_slice(rest);
        for (i, out) in per.iter_mut().enumerate() {
            out.push(
                Tensor::new(
                    t.name(),
                    t.datatype(),
                    shape.clone(),
                    t.data()[i * row..(i + 1) * row].to_vec(),
                )
                .ok()?,
            );
        }
    }
    Some(per)
}

/// Measured per-item time by (input shape, bucket).
#[derive(Debug, Default)]
pub struct BatchStats {
    table: Mutex<HashMap<(u64, u32), Ewma>>,
    batches: std::sync::atomic::AtomicU64,
}

fn shape_hash(key: &[(String, skein_proto::DataType, Vec<u64>)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

impl BatchStats {
    /// Record that a batch of `bucket` rows of this shape ran in `run_us`.
    pub fn observe(
        &self,
        key: &[(String, skein_proto::DataType, Vec<u64>)],
        bucket: u32,
        run_us: u64,
        now_us: u64,
    ) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if t.len() >= MAX_STATS && !t.contains_key(&(shape_hash(key), bucket)) {
            t.clear();
        }
        t.entry((shape_hash(key), bucket))
            .or_insert_with(|| Ewma::new(30_000_000))
            .observe(now_us, run_us as f64 / bucket as f64);
    }

    /// Per-item time of `bucket` for this shape, if measured.
    pub fn per_item_us(
        &self,
        key: &[(String, skein_proto::DataType, Vec<u64>)],
        bucket: u32,
    ) -> Option<f64> {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(shape_hash(key), bucket))
            .and_then(Ewma::get)
    }

    /// The batch size to aim for with `waiting` compatible requests available now or soon.
    pub fn target(
        &self,
        key: &[(String, skein_proto::DataType, Vec<u64>)],
        max_batch: u32,
        policy: BatchPolicy,
        waiting: u32,
    ) -> u32 {
        let all = buckets(max_batch);
        if policy == BatchPolicy::Always {
            return all.last().copied().unwrap_or(1);
        }
        let n = self
            .batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let measured: Vec<(u32, f64)> = all
            .iter()
            .filter_map(|&b| self.per_item_us(key, b).map(|t| (b, t)))
            .collect();
        let Some(&(best, _)) = measured.iter().min_by(|a, b| a.1.total_cmp(&b.1)) else {
            return 1;
        };
        // Explore the next bucket up from the best, now and then, if never measured, and only
        // when enough requests are already waiting to fill it (a lone request never waits).
        if let Some(&up) = all.iter().find(|&&b| b > best) {
            if self.per_item_us(key, up).is_none()
                && waiting >= up
                && n.is_multiple_of(EXPLORE_EVERY)
            {
                return up;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_proto::DataType;

    fn row(v: f32) -> Vec<Tensor> {
        vec![Tensor::from_f32("x", vec![1, 2], &[v, v + 0.5]).unwrap()]
    }

    #[test]
    fn buckets_are_powers_of_two() {
        assert_eq!(buckets(1), vec![1]);
        assert_eq!(buckets(6), vec![1, 2, 4]);
        assert_eq!(buckets(16), vec![1, 2, 4, 8, 16]);
    }

    #[test]
    fn concat_then_split_gives_each_caller_its_row() {
        let reqs = vec![row(1.0), row(2.0), row(3.0)];
        let batch = concat(&reqs).unwrap();
        assert_eq!(batch[0].shape(), &[3, 2]);
        let back = split(&batch, 3).unwrap();
        assert_eq!(back, reqs);
        assert!(split(&batch, 2).is_none());
    }

    #[test]
    fn only_single_rows_with_dynamic_batch_dims_batch() {
        let spec = |shape: Vec<i64>| TensorSpec {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape,
        };
        assert!(batchable(&[spec(vec![-1, 3, -1, -1])]));
        assert!(!batchable(&[spec(vec![2, -1, 128])]));
        assert!(!batchable(&[spec(vec![])]));
        assert!(batch_key(&row(1.0)).is_some());
        let two = vec![Tensor::from_f32("x", vec![2, 2], &[0.0; 4]).unwrap()];
        assert!(batch_key(&two).is_none());
    }

    #[test]
    fn measured_policy_picks_the_cheapest_bucket_per_item() {
        let key = batch_key(&row(0.0)).unwrap();
        let cpu = BatchStats::default();
        assert_eq!(
            cpu.target(&key, 8, BatchPolicy::Measured, 8),
            1,
            "nothing measured: run alone"
        );
        cpu.observe(&key, 1, 1_000, 0);
        cpu.observe(&key, 2, 4_000, 0); // 2 ms per item: worse, as tract on a CPU
        for _ in 0..40 {
            assert_eq!(cpu.target(&key, 8, BatchPolicy::Measured, 8), 1);
        }
        let gpu = BatchStats::default();
        gpu.observe(&key, 1, 1_000, 0);
        gpu.observe(&key, 2, 1_200, 0); // 0.6 ms per item: better, as on a GPU
        assert_eq!(
            gpu.target(&key, 8, BatchPolicy::Measured, 1),
            2,
            "a lone request never explores"
        );
        let gpu = BatchStats::default();
        gpu.observe(&key, 1, 1_000, 0);
        gpu.observe(&key, 2, 1_200, 0);
        assert_eq!(
            gpu.target(&key, 8, BatchPolicy::Measured, 8),
            4,
            "explores the next bucket up"
        );
        assert_eq!(gpu.target(&key, 8, BatchPolicy::Measured, 8), 2);
        assert_eq!(cpu.target(&key, 8, BatchPolicy::Always, 1), 8);
    }
}
