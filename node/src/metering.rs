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
//! record. The buffer is backed by a file in the node's data dir ([`UsageSpool`]): a record is
//! written there before its response is sent, so a node restarted (or crashed) while the
//! coordinator is away sends its records when it comes back.

mod spool;

pub use spool::{Recovered, UsageSpool, MAX_RECORD_BYTES, SPOOL_FILE};

use skein_proto::{ErrorCode, UsageRecord, WireError};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
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

/// Bytes of spool allowed per record of `max_pending_usage` (a record is about 300).
pub const SPOOL_BYTES_PER_RECORD: u64 = 1024;

struct Pending {
    /// Records not yet acknowledged and their frame sizes, oldest first.
    records: VecDeque<(UsageRecord, u64)>,
    /// Bytes of `records` as frames.
    bytes: u64,
    /// The file behind them (`None`: in memory only).
    spool: Option<UsageSpool>,
    /// Why the spool stopped working (requests are refused from then on).
    failed: Option<String>,
}

/// Usage records not yet stored by the coordinator: bounded in records and bytes, and kept in
/// a [`UsageSpool`] file when opened with [`UsageBuffer::open`].
pub struct UsageBuffer {
    pending: Mutex<Pending>,
    capacity: usize,
    max_bytes: u64,
}

impl std::fmt::Debug for UsageBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageBuffer")
            .field("capacity", &self.capacity)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl UsageBuffer {
    /// A buffer of at most `capacity` records, in memory only.
    pub fn new(capacity: usize) -> UsageBuffer {
        let capacity = capacity.max(1);
        UsageBuffer {
            pending: Mutex::new(Pending {
                records: VecDeque::new(),
                bytes: 0,
                spool: None,
                failed: None,
            }),
            capacity,
            max_bytes: capacity as u64 * SPOOL_BYTES_PER_RECORD,
        }
    }

    /// A buffer of at most `capacity` records (and `capacity` × [`SPOOL_BYTES_PER_RECORD`]
    /// bytes) spooled to `<dir>/usage.spool`, holding the records a previous run left unsent.
    pub fn open(dir: &Path, capacity: usize) -> std::io::Result<UsageBuffer> {
        let path = dir.join(SPOOL_FILE);
        let (file, found) = UsageSpool::open(&path)?;
        if found.dropped_bytes > 0 {
            tracing::warn!(
                path = %path.display(),
                dropped_records = found.dropped_frames,
                dropped_bytes = found.dropped_bytes,
                kept = found.records.len(),
                "usage spool: dropped a torn or corrupt tail (a crash during a write, or damage)"
            );
        }
        if !found.records.is_empty() {
            tracing::info!(path = %path.display(), records = found.records.len(), "usage spool: records left unsent by the last run, sending them");
        }
        let buffer = UsageBuffer::new(capacity);
        {
            let mut p = lock(&buffer.pending);
            for r in found.records {
                let size = spool::encode(&r).len() as u64;
                p.bytes += size;
                p.records.push_back((r, size));
            }
            p.spool = Some(file);
        }
        Ok(buffer)
    }

    /// Whether another request may be served: the buffer has room for its record and the
    /// spool works. The error says why not.
    pub fn admit(&self) -> Result<(), WireError> {
        let p = lock(&self.pending);
        if let Some(e) = &p.failed {
            return Err(WireError::new(
                ErrorCode::Overloaded,
                format!("this node cannot write its usage records ({e}); try another node"),
            )
            .retry_after(1000));
        }
        if p.records.len() >= self.capacity || p.bytes >= self.max_bytes {
            return Err(WireError::new(
                ErrorCode::Overloaded,
                format!(
                    "this node holds {} unsent usage records ({} bytes, its limit is {} records or {} bytes) and cannot reach the coordinator to record more; try another node",
                    p.records.len(),
                    p.bytes,
                    self.capacity,
                    self.max_bytes
                ),
            )
            .retry_after(1000));
        }
        Ok(())
    }

    /// Whether another record fits (checked before a request is served).
    pub fn has_room(&self) -> bool {
        self.admit().is_ok()
    }

    /// Add a record, appended to the spool before this returns. Requests were admitted only
    /// with room, so this only overflows by the requests running when it filled up, which it
    /// keeps anyway (nothing is lost). A failed write keeps the record in memory and makes
    /// [`UsageBuffer::admit`] refuse further requests.
    pub fn push(&self, r: UsageRecord) {
        let frame = spool::encode(&r);
        let mut p = lock(&self.pending);
        if let Some(s) = p.spool.as_mut() {
            if let Err(e) = s.append(&frame) {
                let why = format!("{}: {e}", s.path().display());
                tracing::error!(error = %why, "usage spool write failed: refusing requests");
                p.failed = Some(why);
            }
        }
        p.bytes += frame.len() as u64;
        p.records.push_back((r, frame.len() as u64));
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        lock(&self.pending).records.len()
    }

    /// Bytes of the records waiting (as spool frames).
    pub fn bytes(&self) -> u64 {
        lock(&self.pending).bytes
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the oldest records, at most `n` (they stay until acknowledged).
    pub fn peek(&self, n: usize) -> Vec<UsageRecord> {
        lock(&self.pending)
            .records
            .iter()
            .take(n)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// The oldest `n` records are stored: forget them (and drop them from the spool).
    pub fn ack(&self, n: usize) {
        let mut p = lock(&self.pending);
        let n = n.min(p.records.len());
        let bytes: u64 = p.records.drain(..n).map(|(_, b)| b).sum();
        p.bytes -= bytes;
        let Pending { records, spool, .. } = &mut *p;
        if let Some(s) = spool.as_mut() {
            if let Err(e) = s.ack(bytes, records.iter().map(|(r, _)| r)) {
                // The records stay in the file and come back after a restart, to be
                // deduplicated by the ledger.
                tracing::warn!(error = %e, path = %s.path().display(), "usage spool: could not drop acknowledged records");
            }
        }
    }

    /// Make the spool durable (fsync) if something was written since the last call; the
    /// fsync runs outside the buffer's lock.
    pub fn sync(&self) -> std::io::Result<()> {
        let file = {
            let mut p = lock(&self.pending);
            match p.spool.as_mut() {
                Some(s) => s.to_sync()?,
                None => None,
            }
        };
        match file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
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
        let rec = record;
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

    fn record(id: &str) -> UsageRecord {
        UsageRecord {
            id: id.into(),
            request_id: 9,
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
        }
    }

    #[test]
    fn spooled_records_survive_a_restart_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let b = UsageBuffer::open(dir.path(), 10).unwrap();
        for i in 0..4 {
            b.push(record(&format!("r{i}")));
        }
        b.sync().unwrap();
        b.ack(1);
        drop(b);
        // The restarted node holds every unacknowledged record, oldest first, and the
        // acknowledged one not compacted away yet (sent again, the ledger ignores it).
        let b = UsageBuffer::open(dir.path(), 10).unwrap();
        let ids: Vec<_> = b.peek(10).into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["r0", "r1", "r2", "r3"]);
        b.push(record("r4"));
        b.ack(5);
        assert!(b.is_empty());
        assert_eq!(b.bytes(), 0);
        drop(b);
        let b = UsageBuffer::open(dir.path(), 10).unwrap();
        assert!(b.is_empty());
        assert_eq!(
            std::fs::metadata(dir.path().join(SPOOL_FILE))
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn a_full_spool_refuses_with_a_clear_error_and_reloads_over_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let b = UsageBuffer::open(dir.path(), 2).unwrap();
        b.push(record("a"));
        b.admit().unwrap();
        b.push(record("b"));
        let e = b.admit().unwrap_err();
        assert_eq!(e.code, ErrorCode::Overloaded);
        assert!(
            e.message.contains("2 unsent usage records"),
            "{}",
            e.message
        );
        // A request already running still adds its record: nothing is lost.
        b.push(record("c"));
        drop(b);
        let b = UsageBuffer::open(dir.path(), 2).unwrap();
        assert_eq!(b.len(), 3);
        assert!(!b.has_room());
        b.ack(2);
        b.admit().unwrap();

        // The byte bound: a record over 2 KiB fills the 2 KiB of a 2-record buffer.
        let b = UsageBuffer::new(2);
        let mut big = record("big");
        big.model = "m".repeat(2100);
        b.push(big);
        assert_eq!(b.len(), 1);
        let e = b.admit().unwrap_err();
        assert!(e.message.contains("2048 bytes"), "{}", e.message);
    }
}
