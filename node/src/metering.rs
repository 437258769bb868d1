//! Per-tenant limits and usage records on a node.
//!
//! ```text
//!  infer ─▶ TenantLimiter::admit (rate, concurrency from the ticket) ─▶ serve ─▶ UsageBuffer::push
//!                                                                                  │ bounded
//!  usage_loop ◀── notify / every second ───────────────────────────────────────────┘
//!      └─ ReportUsage(batch) ─▶ coordinator ledger ─▶ UsageStored ─▶ UsageBuffer::ack
//! ```
//!
//! Records leave the buffer only once the coordinator has stored them (at-least-once; the
//! ledger deduplicates by record id). A full buffer refuses new requests rather than lose a
//! record.

use skein_proto::{ErrorCode, UsageRecord, WireError};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// Tenants tracked at once by the limiter.
const MAX_TENANTS: usize = 4096;
/// Records sent in one report.
pub const USAGE_BATCH: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
    in_flight: Arc<AtomicU32>,
}

/// Token buckets (requests per second) and concurrency counters per tenant.
#[derive(Default)]
pub struct TenantLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl std::fmt::Debug for TenantLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantLimiter").finish_non_exhaustive()
    }
}

/// A running request of a tenant; dropping it frees the concurrency slot.
#[derive(Debug)]
pub struct TenantPermit(Arc<AtomicU32>);

impl Drop for TenantPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl TenantLimiter {
    /// Admit one request of `tenant` at `now`, or refuse it with `QuotaExceeded` and when to
    /// retry. A bucket holds one second of requests (a burst of `max_rps`).
    pub fn admit(
        &self,
        tenant: &str,
        max_rps: Option<u32>,
        max_concurrent: Option<u32>,
        now: Instant,
    ) -> Result<TenantPermit, WireError> {
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= MAX_TENANTS && !buckets.contains_key(tenant) {
            buckets.retain(|_, b| b.in_flight.load(Ordering::Acquire) > 0);
        }
        let b = buckets.entry(tenant.to_string()).or_insert_with(|| Bucket {
            tokens: max_rps.map_or(0.0, f64::from),
            refilled: now,
            in_flight: Arc::new(AtomicU32::new(0)),
        });
        if let Some(limit) = max_concurrent {
            if b.in_flight.load(Ordering::Acquire) >= limit {
                return Err(WireError::new(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "tenant `{tenant}` has {limit} requests running on this node, its limit"
                    ),
                )
                .retry_after(100));
            }
        }
        if let Some(rps) = max_rps {
            let rate = f64::from(rps.max(1));
            let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
            b.tokens = (b.tokens + elapsed * rate).min(rate);
            b.refilled = now;
            if b.tokens < 1.0 {
                let wait_ms = ((1.0 - b.tokens) / rate * 1000.0).ceil() as u64;
                return Err(WireError::new(
                    ErrorCode::QuotaExceeded,
                    format!("tenant `{tenant}` is over its limit of {rps} requests per second"),
                )
                .retry_after(wait_ms.max(1)));
            }
            b.tokens -= 1.0;
        }
        b.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(TenantPermit(b.in_flight.clone()))
    }
}

/// Usage records not yet stored by the coordinator (bounded).
#[derive(Debug)]
pub struct UsageBuffer {
    records: Mutex<VecDeque<UsageRecord>>,
    capacity: usize,
}

impl UsageBuffer {
    /// A buffer of at most `capacity` records.
    pub fn new(capacity: usize) -> UsageBuffer {
        UsageBuffer {
            records: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
        }
    }

    /// Whether another record fits (checked before a request is served).
    pub fn has_room(&self) -> bool {
        lock(&self.records).len() < self.capacity
    }

    /// Add a record. Requests were admitted only with room, so this only overflows by the
    /// requests running when it filled up, which it keeps anyway (nothing is lost).
    pub fn push(&self, r: UsageRecord) {
        lock(&self.records).push_back(r);
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        lock(&self.records).len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the oldest records, at most `n` (they stay until acknowledged).
    pub fn peek(&self, n: usize) -> Vec<UsageRecord> {
        lock(&self.records).iter().take(n).cloned().collect()
    }

    /// The oldest `n` records are stored: forget them.
    pub fn ack(&self, n: usize) {
        let mut r = lock(&self.records);
        let n = n.min(r.len());
        r.drain(..n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn rate_and_concurrency_trip_and_recover() {
        let l = TenantLimiter::default();
        let t0 = Instant::now();
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(l.admit("a", Some(5), None, t0).unwrap());
        }
        let e = l.admit("a", Some(5), None, t0).unwrap_err();
        assert_eq!(e.code, ErrorCode::QuotaExceeded);
        assert_eq!(e.retry_after_ms, Some(200));
        // Another tenant is not affected.
        l.admit("b", Some(5), None, t0).unwrap();
        // 200 ms later one more token.
        let t1 = t0 + Duration::from_millis(200);
        held.push(l.admit("a", Some(5), None, t1).unwrap());
        assert!(l.admit("a", Some(5), None, t1).is_err());
        // Concurrency: 5 held + 1 = 6 running for `a`.
        let e = l.admit("a", None, Some(6), t1).unwrap_err();
        assert_eq!(e.code, ErrorCode::QuotaExceeded);
        held.clear();
        l.admit("a", None, Some(6), t1).unwrap();
    }

    #[test]
    fn buffer_keeps_records_until_acknowledged() {
        let b = UsageBuffer::new(2);
        let rec = |id: &str| UsageRecord {
            id: id.into(),
            request_id: 1,
            tenant: "t".into(),
            model: "m".into(),
            version: "1".into(),
            node: "n".into(),
            node_class: "cpu".into(),
            compute_us: 1,
            queue_us: 0,
            bytes_in: 0,
            bytes_out: 0,
            cold_start: false,
            ts_ms: 0,
        };
        b.push(rec("1"));
        assert!(b.has_room());
        b.push(rec("2"));
        assert!(!b.has_room());
        let batch = b.peek(10);
        assert_eq!(batch.len(), 2);
        b.push(rec("3"));
        b.ack(batch.len());
        assert_eq!(b.peek(10)[0].id, "3");
    }
}
