//! skein-store: the coordinator's durable security and metering state, in one SQLite file.
//!
//! Everything here is pure state: no networking, no clock reads (every function that needs the
//! time takes a `now_ms: u64` / `ts_ms: u64`, milliseconds since the Unix epoch) and no async
//! runtime. The coordinator owns one [`Store`] and calls it from wherever it serialises access.
//!
//! # Layout
//! - [`auth`]: tenants and their [`Quota`]s, API keys (`skn_<id>_<secret>`, only the SHA-256 of
//!   the secret is stored), [`Scope`]s and [`Store::authenticate`] with a small in-memory cache.
//! - [`audit`]: an append-only audit log of who did what to which tenant.
//! - [`ledger`]: the usage ledger (one [`UsageRecord`] per served request, deduplicated by id
//!   for at-least-once delivery), aggregation with [`Pricing`], and monthly budget helpers.
//!
//! # Durability
//! The file is opened with `journal_mode=WAL` and `synchronous=FULL`: once a write function has
//! returned `Ok`, its transaction survives a process kill and a power loss. The schema version
//! is kept in `PRAGMA user_version`; [`Store::open`] refuses a file written by a newer build.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod audit;
pub mod auth;
pub mod ledger;

use std::cell::RefCell;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

pub use audit::{AuditEntry, AuditQuery};
pub use auth::{scope_names, AuthError, KeyInfo, NewKey, Principal, Quota, Scope, Tenant};
pub use ledger::{month_bounds_utc, Pricing, UsageQuery, UsageRecord, UsageRow};

/// The schema version this build writes and understands (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;

/// An error from the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed (I/O, a locked database past the busy timeout, a corrupt file, ...).
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The named thing (a tenant, a key) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The named thing already exists.
    #[error("conflict: {0}")]
    Conflict(String),
    /// An argument (or a value read back from the file) is not valid; the message says which.
    #[error("invalid: {0}")]
    Invalid(String),
}

/// The coordinator's durable state: one SQLite connection plus an authentication cache.
///
/// Not `Sync`: share it behind a mutex (or give it to one task).
pub struct Store {
    db: Connection,
    auth_cache: RefCell<auth::AuthCache>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only the path and the cache size: never key hashes or principals.
        f.debug_struct("Store")
            .field("path", &self.db.path().unwrap_or(":memory:"))
            .field(
                "cached_keys",
                &self.auth_cache.try_borrow().map(|c| c.len()).ok(),
            )
            .finish()
    }
}

impl Store {
    /// Opens (creating if missing) the store at `path` and creates the tables if missing.
    ///
    /// Sets `journal_mode=WAL`, `synchronous=FULL`, `foreign_keys=ON` and a 5 s busy timeout.
    /// Fails with [`StoreError::Invalid`] if the file's schema version is newer than
    /// [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::init(Connection::open(path)?)
    }

    /// Opens a private in-memory store (for tests and tools; nothing is persisted).
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Store::init(Connection::open_in_memory()?)
    }

    fn init(mut db: Connection) -> Result<Store, StoreError> {
        db.busy_timeout(Duration::from_secs(5))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut db)?;
        Ok(Store {
            db,
            auth_cache: RefCell::new(auth::AuthCache::default()),
        })
    }
}

/// Creates the schema (idempotent) and records the version, refusing newer files.
fn migrate(db: &mut Connection) -> Result<(), StoreError> {
    let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Invalid(format!(
            "database schema version {version} is newer than this build supports ({SCHEMA_VERSION})"
        )));
    }
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS tenants (
             name               TEXT PRIMARY KEY NOT NULL,
             created_ms         INTEGER NOT NULL,
             max_rps            INTEGER,
             max_concurrent     INTEGER,
             monthly_compute_us INTEGER
         );
         CREATE TABLE IF NOT EXISTS api_keys (
             id          TEXT PRIMARY KEY NOT NULL,
             tenant      TEXT NOT NULL REFERENCES tenants(name),
             scopes      TEXT NOT NULL,
             label       TEXT,
             created_ms  INTEGER NOT NULL,
             revoked_ms  INTEGER,
             secret_hash TEXT NOT NULL
         );
         CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys(tenant, created_ms);
         CREATE TABLE IF NOT EXISTS audit (
             seq    INTEGER PRIMARY KEY AUTOINCREMENT,
             ts_ms  INTEGER NOT NULL,
             actor  TEXT NOT NULL,
             tenant TEXT NOT NULL,
             action TEXT NOT NULL,
             target TEXT NOT NULL,
             result TEXT NOT NULL
         );
         CREATE INDEX IF NOT EXISTS audit_ts ON audit(ts_ms);
         CREATE INDEX IF NOT EXISTS audit_tenant_ts ON audit(tenant, ts_ms);
         -- request_id is a u64 stored bit-cast into SQLite's signed 64-bit integer.
         CREATE TABLE IF NOT EXISTS usage (
             id         TEXT PRIMARY KEY NOT NULL,
             request_id INTEGER NOT NULL,
             tenant     TEXT NOT NULL,
             model      TEXT NOT NULL,
             version    TEXT NOT NULL,
             node       TEXT NOT NULL,
             node_class TEXT NOT NULL,
             compute_us INTEGER NOT NULL,
             queue_us   INTEGER NOT NULL,
             bytes_in   INTEGER NOT NULL,
             bytes_out  INTEGER NOT NULL,
             cold_start INTEGER NOT NULL,
             ts_ms      INTEGER NOT NULL
         );
         CREATE INDEX IF NOT EXISTS usage_tenant_ts ON usage(tenant, ts_ms);
         CREATE INDEX IF NOT EXISTS usage_model_ts ON usage(model, ts_ms);",
    )?;
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()?;
    Ok(())
}

/// Converts a `u64` to SQLite's `i64`, or [`StoreError::Invalid`] naming `what`.
fn to_i64(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::Invalid(format!("{what} {value} is larger than {}", i64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_sets_pragmas_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        let mode: String = store
            .db
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = store
            .db
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
        let fk: i64 = store
            .db
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
        let v: i64 = store
            .db
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        assert!(format!("{store:?}").contains("cached_keys"));
    }

    #[test]
    fn refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(Store::open(&path).unwrap());
        {
            let db = Connection::open(&path).unwrap();
            db.pragma_update(None, "user_version", 99).unwrap();
        }
        assert!(matches!(Store::open(&path), Err(StoreError::Invalid(_))));
    }

    #[test]
    fn reopen_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(Store::open(&path).unwrap());
        drop(Store::open(&path).unwrap());
        Store::open(&path).unwrap();
    }
}
