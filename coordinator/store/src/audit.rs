//! The audit log: an append-only record of who did what to which tenant.

use rusqlite::params_from_iter;
use rusqlite::types::Value;
pub use skein_proto::{AuditEntry, AuditQuery};

use crate::{to_i64, Store, StoreError};

/// Longest stored string field, in chars; longer ones are cut.
const MAX_FIELD_CHARS: usize = 512;
/// The most entries one [`AuditQuery`] returns.
pub const MAX_AUDIT_LIMIT: u32 = 10_000;
/// What a limit of 0 means.
pub const DEFAULT_AUDIT_LIMIT: u32 = 100;

/// `s` cut to at most [`MAX_FIELD_CHARS`] chars (on a char boundary).
fn cut(s: &str) -> &str {
    match s.char_indices().nth(MAX_FIELD_CHARS) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

impl Store {
    /// Appends an entry and returns its sequence number. Strings longer than 512 chars are cut.
    pub fn append_audit(
        &mut self,
        ts_ms: u64,
        actor: &str,
        tenant: &str,
        action: &str,
        target: &str,
        result: &str,
    ) -> Result<u64, StoreError> {
        let ts = to_i64(ts_ms, "ts_ms")?;
        let mut stmt = self.db.prepare_cached(
            "INSERT INTO audit (ts_ms, actor, tenant, action, target, result)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        stmt.execute(rusqlite::params![
            ts,
            cut(actor),
            cut(tenant),
            cut(action),
            cut(target),
            cut(result)
        ])?;
        let seq = self.db.last_insert_rowid();
        u64::try_from(seq).map_err(|_| StoreError::Invalid(format!("audit seq {seq} < 0")))
    }

    /// The entries matching `query`, newest first (by time, then sequence).
    pub fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let mut sql =
            String::from("SELECT seq, ts_ms, actor, tenant, action, target, result FROM audit");
        let mut conds: Vec<&str> = Vec::new();
        let mut args: Vec<Value> = Vec::new();
        if let Some(tenant) = &query.tenant {
            conds.push("tenant = ?");
            args.push(Value::Text(tenant.clone()));
        }
        if let Some(since) = query.since_ms {
            conds.push("ts_ms >= ?");
            args.push(Value::Integer(to_i64(since, "since_ms")?));
        }
        if let Some(until) = query.until_ms {
            conds.push("ts_ms < ?");
            args.push(Value::Integer(to_i64(until, "until_ms")?));
        }
        if let Some(action) = &query.action {
            conds.push("action = ?");
            args.push(Value::Text(action.clone()));
        }
        if !conds.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conds.join(" AND "));
        }
        sql.push_str(" ORDER BY ts_ms DESC, seq DESC LIMIT ?");
        args.push(Value::Integer(i64::from(if query.limit == 0 {
            DEFAULT_AUDIT_LIMIT
        } else {
            query.limit.min(MAX_AUDIT_LIMIT)
        })));
        let mut stmt = self.db.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(args), |r| {
            Ok(AuditEntry {
                seq: r.get(0)?,
                ts_ms: r.get(1)?,
                actor: r.get(2)?,
                tenant: r.get(3)?,
                action: r.get(4)?,
                target: r.get(5)?,
                result: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled() -> Store {
        let mut s = Store::open_in_memory().unwrap();
        let entries = [
            (1_000, "local", "acme", "tenant.create", "acme", "ok"),
            (2_000, "k1", "acme", "key.create", "k2", "ok"),
            (3_000, "k1", "beta", "key.create", "k3", "forbidden"),
            (4_000, "k2", "acme", "model.deploy", "resnet", "ok"),
            (5_000, "k2", "acme", "key.revoke", "k2", "ok"),
        ];
        for (i, (ts, actor, tenant, action, target, result)) in entries.into_iter().enumerate() {
            let seq = s
                .append_audit(ts, actor, tenant, action, target, result)
                .unwrap();
            assert_eq!(seq, i as u64 + 1);
        }
        s
    }

    fn seqs(entries: &[AuditEntry]) -> Vec<u64> {
        entries.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn newest_first_and_fields() {
        let s = filled();
        let all = s.audit(&AuditQuery::default()).unwrap();
        assert_eq!(seqs(&all), [5, 4, 3, 2, 1]);
        assert_eq!(
            all[2],
            AuditEntry {
                seq: 3,
                ts_ms: 3_000,
                actor: "k1".into(),
                tenant: "beta".into(),
                action: "key.create".into(),
                target: "k3".into(),
                result: "forbidden".into(),
            }
        );
    }

    #[test]
    fn filters_and_limit() {
        let s = filled();
        let q = |f: fn(&mut AuditQuery)| {
            let mut q = AuditQuery::default();
            f(&mut q);
            seqs(&s.audit(&q).unwrap())
        };
        assert_eq!(q(|q| q.tenant = Some("acme".into())), [5, 4, 2, 1]);
        assert_eq!(q(|q| q.tenant = Some("nobody".into())), Vec::<u64>::new());
        assert_eq!(q(|q| q.action = Some("key.create".into())), [3, 2]);
        assert_eq!(q(|q| q.since_ms = Some(2_000)), [5, 4, 3, 2]);
        assert_eq!(q(|q| q.until_ms = Some(4_000)), [3, 2, 1]);
        assert_eq!(
            q(|q| {
                q.tenant = Some("acme".into());
                q.since_ms = Some(2_000);
                q.until_ms = Some(5_000);
            }),
            [4, 2]
        );
        assert_eq!(q(|q| q.limit = 2), [5, 4]);
        assert_eq!(q(|q| q.limit = 0), [5, 4, 3, 2, 1]);
        assert_eq!(q(|q| q.limit = u32::MAX), [5, 4, 3, 2, 1]);
    }

    #[test]
    fn out_of_order_timestamps_sort_by_time() {
        let mut s = Store::open_in_memory().unwrap();
        s.append_audit(2_000, "a", "t", "x", "y", "ok").unwrap();
        s.append_audit(1_000, "a", "t", "x", "y", "ok").unwrap();
        s.append_audit(2_000, "a", "t", "x", "y", "ok").unwrap();
        assert_eq!(seqs(&s.audit(&AuditQuery::default()).unwrap()), [3, 1, 2]);
    }

    #[test]
    fn long_fields_are_cut_on_char_boundaries() {
        let mut s = Store::open_in_memory().unwrap();
        let long = "é".repeat(600);
        let exact = "a".repeat(512);
        s.append_audit(1, &long, "t", "x", &exact, "ok").unwrap();
        let e = &s.audit(&AuditQuery::default()).unwrap()[0];
        assert_eq!(e.actor.chars().count(), 512);
        assert!(e.actor.chars().all(|c| c == 'é'));
        assert_eq!(e.target, exact);
        assert_eq!(cut("short"), "short");
    }
}
