//! The usage ledger: one record per served request, aggregation with pricing, and the
//! calendar-month bounds used for monthly compute budgets.

use std::collections::BTreeMap;

use rusqlite::params_from_iter;
use rusqlite::types::Value;
use serde::{Deserialize, Serialize};
use skein_proto::time::{civil_from_days, days_from_civil};
pub use skein_proto::{UsageQuery, UsageRecord, UsageRow};

use crate::{to_i64, Store, StoreError};

/// The longest record id, in chars.
const MAX_ID_CHARS: usize = 64;
const DAY_MS: u64 = 86_400_000;

/// Prices, in any currency unit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Pricing {
    /// Charged once per request.
    pub per_request: f64,
    /// Price of one compute second, by node class.
    pub per_compute_second: BTreeMap<String, f64>,
    /// Price of one compute second on a class not in `per_compute_second`.
    pub default_per_compute_second: f64,
}

impl Pricing {
    /// The price of one compute second on `node_class`.
    pub fn price_of(&self, node_class: &str) -> f64 {
        self.per_compute_second
            .get(node_class)
            .copied()
            .unwrap_or(self.default_per_compute_second)
    }
}

fn validate(r: &UsageRecord) -> Result<(), StoreError> {
    let n = r.id.chars().count();
    if n == 0 || n > MAX_ID_CHARS {
        return Err(StoreError::Invalid(format!(
            "usage record id must be 1 to {MAX_ID_CHARS} chars (got {n})"
        )));
    }
    for (value, what) in [
        (r.compute_us, "compute_us"),
        (r.queue_us, "queue_us"),
        (r.bytes_in, "bytes_in"),
        (r.bytes_out, "bytes_out"),
        (r.ts_ms, "ts_ms"),
    ] {
        to_i64(value, what).map_err(|e| StoreError::Invalid(format!("record {:?}: {e}", r.id)))?;
    }
    Ok(())
}

/// Appends `WHERE` conditions for `q` to `sql`, collecting the arguments.
fn usage_filter(q: &UsageQuery, sql: &mut String) -> Result<Vec<Value>, StoreError> {
    let mut conds: Vec<&str> = Vec::new();
    let mut args = Vec::new();
    if let Some(tenant) = &q.tenant {
        conds.push("tenant = ?");
        args.push(Value::Text(tenant.clone()));
    }
    if let Some(model) = &q.model {
        conds.push("model = ?");
        args.push(Value::Text(model.clone()));
    }
    if let Some(since) = q.since_ms {
        conds.push("ts_ms >= ?");
        args.push(Value::Integer(to_i64(since, "since_ms")?));
    }
    if let Some(until) = q.until_ms {
        conds.push("ts_ms < ?");
        args.push(Value::Integer(to_i64(until, "until_ms")?));
    }
    if !conds.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conds.join(" AND "));
    }
    Ok(args)
}

/// Clamps a `u64` bound to SQLite's `i64` range (a bound past `i64::MAX` covers every row).
fn bound(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Store {
    /// Records usage in one transaction; records whose id is already stored are ignored
    /// (at-least-once delivery). Returns how many were new. Every record is validated first:
    /// on `Invalid` nothing is written.
    pub fn insert_usage(&mut self, records: &[UsageRecord]) -> Result<usize, StoreError> {
        for r in records {
            validate(r)?;
        }
        let tx = self.db.transaction()?;
        let mut inserted = 0;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO usage (id, request_id, tenant, model, version, node,
                     node_class, compute_us, queue_us, bytes_in, bytes_out, cold_start, ts_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?;
            for r in records {
                inserted += stmt.execute(rusqlite::params![
                    r.id,
                    // A u64 id stored bit for bit in SQLite's signed integer.
                    i64::from_ne_bytes(r.request_id.to_ne_bytes()),
                    r.tenant,
                    r.model,
                    r.version,
                    r.node,
                    r.node_class,
                    to_i64(r.compute_us, "compute_us")?,
                    to_i64(r.queue_us, "queue_us")?,
                    to_i64(r.bytes_in, "bytes_in")?,
                    to_i64(r.bytes_out, "bytes_out")?,
                    r.cold_start,
                    to_i64(r.ts_ms, "ts_ms")?,
                ])?;
            }
        }
        tx.commit()?;
        Ok(inserted)
    }

    /// Usage grouped by (tenant, model, version), sorted that way, priced with `pricing`.
    pub fn usage(
        &self,
        query: &UsageQuery,
        pricing: &Pricing,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let mut sql = String::from(
            "SELECT tenant, model, version, node_class, COUNT(*), SUM(compute_us), SUM(queue_us),
                    SUM(bytes_in), SUM(bytes_out), SUM(cold_start)
             FROM usage",
        );
        let args = usage_filter(query, &mut sql)?;
        sql.push_str(
            " GROUP BY tenant, model, version, node_class
              ORDER BY tenant, model, version, node_class",
        );
        let mut stmt = self.db.prepare_cached(&sql)?;
        let mut rows = stmt.query(params_from_iter(args))?;
        let mut out: Vec<UsageRow> = Vec::new();
        while let Some(r) = rows.next()? {
            let (tenant, model, version): (String, String, String) =
                (r.get(0)?, r.get(1)?, r.get(2)?);
            let class: String = r.get(3)?;
            let requests: u64 = r.get(4)?;
            let compute_us: u64 = r.get(5)?;
            let same = out
                .last()
                .is_some_and(|l| l.tenant == tenant && l.model == model && l.version == version);
            if !same {
                out.push(UsageRow {
                    tenant,
                    model,
                    version,
                    ..UsageRow::default()
                });
            }
            let Some(row) = out.last_mut() else {
                continue; // unreachable: pushed above
            };
            row.requests += requests;
            row.compute_us += compute_us;
            row.queue_us += r.get::<_, u64>(6)?;
            row.bytes_in += r.get::<_, u64>(7)?;
            row.bytes_out += r.get::<_, u64>(8)?;
            row.cold_starts += r.get::<_, u64>(9)?;
            row.cost += compute_us as f64 / 1e6 * pricing.price_of(&class);
        }
        for row in &mut out {
            row.cost += row.requests as f64 * pricing.per_request;
        }
        Ok(out)
    }

    /// Total compute µs of `tenant` with `since_ms <= ts_ms < until_ms` (for monthly budgets;
    /// see [`month_bounds_utc`]).
    pub fn compute_us_between(
        &self,
        tenant: &str,
        since_ms: u64,
        until_ms: u64,
    ) -> Result<u64, StoreError> {
        let mut stmt = self.db.prepare_cached(
            "SELECT COALESCE(SUM(compute_us), 0) FROM usage
             WHERE tenant = ?1 AND ts_ms >= ?2 AND ts_ms < ?3",
        )?;
        Ok(stmt.query_row(
            rusqlite::params![tenant, bound(since_ms), bound(until_ms)],
            |r| r.get(0),
        )?)
    }

    /// (tenant, model, requests, compute µs) over all time, sorted by tenant then model: the
    /// values of monotonic Prometheus counters.
    pub fn usage_totals(&self) -> Result<Vec<(String, String, u64, u64)>, StoreError> {
        let mut stmt = self.db.prepare_cached(
            "SELECT tenant, model, COUNT(*), SUM(compute_us) FROM usage
             GROUP BY tenant, model ORDER BY tenant, model",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// The start of the UTC calendar month containing `now_ms` and the start of the next one, both
/// ms since the Unix epoch (the next saturates at `u64::MAX` far in the future).
pub fn month_bounds_utc(now_ms: u64) -> (u64, u64) {
    // now_ms / DAY_MS < 2.2e11: always fits an i64, and so do the year counts below.
    let days = i64::try_from(now_ms / DAY_MS).unwrap_or(i64::MAX);
    let (y, m, _) = civil_from_days(days);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let to_ms = |d: i64| {
        u64::try_from(d)
            .ok()
            .and_then(|d| d.checked_mul(DAY_MS))
            .unwrap_or(u64::MAX)
    };
    (
        to_ms(days_from_civil(y, m, 1)),
        to_ms(days_from_civil(ny, nm, 1)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(
        id: &str,
        tenant: &str,
        model: &str,
        class: &str,
        compute_us: u64,
        ts_ms: u64,
    ) -> UsageRecord {
        UsageRecord {
            id: id.into(),
            request_id: u64::MAX - 1,
            tenant: tenant.into(),
            model: model.into(),
            version: "1".into(),
            node: format!("node-{class}"),
            node_class: class.into(),
            compute_us,
            queue_us: 10,
            bytes_in: 100,
            bytes_out: 1_000,
            cold_start: id.ends_with('c'),
            ts_ms,
        }
    }

    fn batch() -> Vec<UsageRecord> {
        vec![
            rec("r1c", "acme", "resnet", "cpu", 2_000_000, 1_000),
            rec("r2", "acme", "resnet", "gpu", 500_000, 2_000),
            rec("r3", "acme", "resnet", "gpu", 1_500_000, 3_000),
            rec("r4", "acme", "bert", "cpu", 1_000_000, 4_000),
            rec("r5", "beta", "resnet", "cpu", 3_000_000, 5_000),
        ]
    }

    fn pricing() -> Pricing {
        Pricing {
            per_request: 0.01,
            per_compute_second: [("gpu".to_owned(), 2.0), ("cpu".to_owned(), 0.5)]
                .into_iter()
                .collect(),
            default_per_compute_second: 0.1,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn dedupe_at_least_once() {
        let mut s = Store::open_in_memory().unwrap();
        assert_eq!(s.insert_usage(&batch()).unwrap(), 5);
        let before = s.usage(&UsageQuery::default(), &pricing()).unwrap();
        assert_eq!(s.insert_usage(&batch()).unwrap(), 0);
        assert_eq!(s.usage(&UsageQuery::default(), &pricing()).unwrap(), before);
        // a partly new batch, with a duplicate inside the batch itself
        let mut more = batch();
        more.push(rec("r6", "beta", "resnet", "cpu", 1, 6_000));
        more.push(rec("r6", "beta", "resnet", "cpu", 1, 6_000));
        assert_eq!(s.insert_usage(&more).unwrap(), 1);
        assert_eq!(s.insert_usage(&[]).unwrap(), 0);
    }

    #[test]
    fn invalid_batch_writes_nothing() {
        let mut s = Store::open_in_memory().unwrap();
        let mut b = batch();
        b.push(rec("", "acme", "m", "cpu", 1, 1));
        assert!(matches!(s.insert_usage(&b), Err(StoreError::Invalid(_))));
        let mut b = batch();
        b.push(rec(&"x".repeat(65), "acme", "m", "cpu", 1, 1));
        assert!(matches!(s.insert_usage(&b), Err(StoreError::Invalid(_))));
        let mut b = batch();
        b.push(rec("big", "acme", "m", "cpu", u64::MAX, 1));
        assert!(matches!(s.insert_usage(&b), Err(StoreError::Invalid(_))));
        assert!(s.usage_totals().unwrap().is_empty());
        // 64 chars (multi-byte) is fine
        s.insert_usage(&[rec(&"é".repeat(64), "acme", "m", "cpu", 1, 1)])
            .unwrap();
    }

    #[test]
    fn sums_and_cost() {
        let mut s = Store::open_in_memory().unwrap();
        s.insert_usage(&batch()).unwrap();
        let rows = s.usage(&UsageQuery::default(), &pricing()).unwrap();
        let keys: Vec<_> = rows
            .iter()
            .map(|r| (r.tenant.as_str(), r.model.as_str(), r.version.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("acme", "bert", "1"),
                ("acme", "resnet", "1"),
                ("beta", "resnet", "1")
            ]
        );
        let resnet = &rows[1];
        assert_eq!(resnet.requests, 3);
        assert_eq!(resnet.compute_us, 4_000_000);
        assert_eq!(resnet.queue_us, 30);
        assert_eq!(resnet.bytes_in, 300);
        assert_eq!(resnet.bytes_out, 3_000);
        assert_eq!(resnet.cold_starts, 1);
        // cpu 2 s × 0.5 + gpu 2 s × 2.0 + 3 requests × 0.01
        assert!(close(resnet.cost, 1.0 + 4.0 + 0.03), "{}", resnet.cost);
        assert!(close(rows[0].cost, 0.5 + 0.01));
        assert!(close(rows[2].cost, 1.5 + 0.01));

        // an unknown class uses the default price
        s.insert_usage(&[rec("r9", "beta", "resnet", "tpu", 10_000_000, 9_000)])
            .unwrap();
        let rows = s.usage(&UsageQuery::default(), &pricing()).unwrap();
        assert!(close(rows[2].cost, 1.5 + 1.0 + 0.02), "{}", rows[2].cost);
        // free pricing
        let free = s
            .usage(&UsageQuery::default(), &Pricing::default())
            .unwrap();
        assert!(free.iter().all(|r| r.cost == 0.0));

        assert_eq!(
            s.usage_totals().unwrap(),
            vec![
                ("acme".into(), "bert".into(), 1, 1_000_000),
                ("acme".into(), "resnet".into(), 3, 4_000_000),
                ("beta".into(), "resnet".into(), 2, 13_000_000),
            ]
        );
    }

    #[test]
    fn filters_and_time_range() {
        let mut s = Store::open_in_memory().unwrap();
        s.insert_usage(&batch()).unwrap();
        let q = |q: UsageQuery| s.usage(&q, &pricing()).unwrap();
        let acme = q(UsageQuery {
            tenant: Some("acme".into()),
            ..UsageQuery::default()
        });
        assert_eq!(acme.len(), 2);
        let resnet = q(UsageQuery {
            model: Some("resnet".into()),
            ..UsageQuery::default()
        });
        assert_eq!(resnet.iter().map(|r| r.requests).sum::<u64>(), 4);
        // since inclusive, until exclusive: r2 and r3
        let window = q(UsageQuery {
            since_ms: Some(2_000),
            until_ms: Some(4_000),
            ..UsageQuery::default()
        });
        assert_eq!(window.len(), 1);
        assert_eq!(window[0].requests, 2);
        assert_eq!(window[0].compute_us, 2_000_000);
        assert!(q(UsageQuery {
            since_ms: Some(6_000),
            ..UsageQuery::default()
        })
        .is_empty());

        assert_eq!(
            s.compute_us_between("acme", 0, u64::MAX).unwrap(),
            5_000_000
        );
        assert_eq!(
            s.compute_us_between("acme", 2_000, 4_000).unwrap(),
            2_000_000
        );
        assert_eq!(s.compute_us_between("acme", 4_001, 9_000).unwrap(), 0);
        assert_eq!(s.compute_us_between("nobody", 0, u64::MAX).unwrap(), 0);
    }

    #[test]
    fn persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        {
            let mut s = Store::open(&path).unwrap();
            assert_eq!(s.insert_usage(&batch()).unwrap(), 5);
        }
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.insert_usage(&batch()).unwrap(), 0, "ids remembered");
        let rows = s.usage(&UsageQuery::default(), &pricing()).unwrap();
        assert_eq!(rows.iter().map(|r| r.requests).sum::<u64>(), 5);
        assert_eq!(s.compute_us_between("beta", 0, 10_000).unwrap(), 3_000_000);
        let request_id: i64 =
            s.db.query_row("SELECT request_id FROM usage WHERE id = 'r1c'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(request_id as u64, u64::MAX - 1);
    }

    #[test]
    fn price_of() {
        let p = pricing();
        assert_eq!(p.price_of("gpu"), 2.0);
        assert_eq!(p.price_of("other"), 0.1);
        assert_eq!(Pricing::default().price_of("gpu"), 0.0);
    }

    const FEB_2024: u64 = 1_706_745_600_000;
    const MAR_2024: u64 = 1_709_251_200_000;
    const APR_2024: u64 = 1_711_929_600_000;

    #[test]
    fn month_bounds_cases() {
        // leap year February (29 days)
        assert_eq!(
            month_bounds_utc(FEB_2024 + 14 * DAY_MS),
            (FEB_2024, MAR_2024)
        );
        assert_eq!(MAR_2024 - FEB_2024, 29 * DAY_MS);
        assert_eq!(month_bounds_utc(MAR_2024 - 1), (FEB_2024, MAR_2024)); // Feb 29 23:59:59.999
                                                                          // exact boundary belongs to the new month
        assert_eq!(month_bounds_utc(MAR_2024), (MAR_2024, APR_2024));
        // non-leap February
        assert_eq!(
            month_bounds_utc(1_675_209_600_000 + DAY_MS),
            (1_675_209_600_000, 1_677_628_800_000)
        );
        // 2000 is a leap year (÷400), 2100 is not (÷100)
        assert_eq!(
            month_bounds_utc(949_363_200_000),
            (949_363_200_000, 951_868_800_000)
        );
        assert_eq!(
            month_bounds_utc(4_105_123_200_000 + 27 * DAY_MS),
            (4_105_123_200_000, 4_107_542_400_000)
        );
        // December → January
        assert_eq!(
            month_bounds_utc(1_704_067_200_000 - 1),
            (1_701_388_800_000, 1_704_067_200_000)
        );
        assert_eq!(
            month_bounds_utc(2_145_916_800_000),
            (2_145_916_800_000, 2_148_595_200_000)
        );
        // the epoch
        assert_eq!(month_bounds_utc(0), (0, 2_678_400_000));
        // no panic at the far end
        let (start, next) = month_bounds_utc(u64::MAX);
        assert!(start < next);
        assert_eq!(next, u64::MAX, "saturates");
    }

    #[test]
    fn month_bounds_walk_400_years() {
        // Walk month by month across a whole Gregorian cycle: contiguous, 28..=31 days, and
        // exactly 97 leap Februaries.
        let mut start = 0u64;
        let mut leap_febs = 0;
        for i in 0..(400 * 12) {
            let (s, next) = month_bounds_utc(start);
            assert_eq!(s, start);
            assert_eq!(month_bounds_utc(next - 1), (start, next));
            let days = (next - start) / DAY_MS;
            assert!((28..=31).contains(&days), "month {i}: {days} days");
            assert_eq!((next - start) % DAY_MS, 0);
            if days == 29 {
                leap_febs += 1;
            }
            start = next;
        }
        assert_eq!(leap_febs, 97);
        // 400 Gregorian years = 146 097 days
        assert_eq!(start, 146_097 * DAY_MS);
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }
}
