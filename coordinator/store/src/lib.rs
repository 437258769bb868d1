//! skein-store: the coordinator's durable state, in two SQLite files.
//!
//! Everything here is pure state: no networking, no clock reads (every function that needs the
//! time takes a `now_ms: u64` / `ts_ms: u64`, milliseconds since the Unix epoch) and no async
//! runtime. The coordinator owns one [`Store`] (`security.sqlite`) and one [`Registry`]
//! (`registry.sqlite`) and calls them from wherever it serialises access.
//!
//! # Layout
//! - [`registry`]: the [`Registry`]: model versions and their deployment settings, traffic
//!   splits, join tokens (only the SHA-256 of each secret) and node identities with their
//!   revocations.
//! - [`auth`]: tenants and their [`Quota`]s, API keys (`skn_<id>_<secret>`, only the SHA-256 of
//!   the secret is stored), [`Scope`]s and [`Store::authenticate`] with a small in-memory cache.
//! - [`audit`]: an append-only audit log of who did what to which tenant.
//! - [`ledger`]: the usage ledger (one [`UsageRecord`] per served request, deduplicated by id
//!   for at-least-once delivery), aggregation with [`Pricing`], and monthly budget helpers.
//!
//! # Durability and schema versions
//! Both files are opened the same way: `journal_mode=WAL` and `synchronous=FULL`, so once a
//! write function has returned `Ok`, its transaction survives a process kill and a power loss.
//! Each file keeps its schema version in `PRAGMA user_version` and is brought up to date on
//! open by a list of migrations (one function per version step, all in one transaction);
//! [`Store::open`] and [`Registry::open`] refuse a file written by a newer build.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod audit;
pub mod auth;
pub mod ledger;
pub mod registry;

use std::cell::RefCell;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

pub use audit::{AuditEntry, AuditQuery};
pub use auth::{scope_names, AuthError, KeyInfo, NewKey, Principal, Quota, Scope, Tenant};
pub use ledger::{month_bounds_utc, Pricing, UsageQuery, UsageRecord, UsageRow};
pub use registry::{
    JoinTokenGrant, JoinTokenRecord, NodeRecord, Registry, RegistryError, TokenCheck,
};

/// The schema version of `security.sqlite` this build writes and understands
/// (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The migrations of [`Store`]'s file: entry `i` brings version `i` to `i + 1`.
const MIGRATIONS: &[Migration] = &[create_v1, offline_validity_v2];

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
        configure(&db)?;
        migrate(&mut db, MIGRATIONS).map_err(|e| match e {
            MigrateError::Sqlite(e) => StoreError::Sqlite(e),
            newer @ MigrateError::Newer { .. } => StoreError::Invalid(newer.to_string()),
        })?;
        Ok(Store {
            db,
            auth_cache: RefCell::new(auth::AuthCache::default()),
        })
    }
}

/// One schema step: brings a file from the version of its index in a migration list to the
/// next, inside the transaction that then records the new version.
pub(crate) type Migration = fn(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>;

/// Why a file could not be brought to this build's schema.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MigrateError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file was written by a newer build.
    #[error("database schema version {found} is newer than this build supports ({supported})")]
    Newer {
        /// The file's `user_version`.
        found: i64,
        /// The highest version this build knows.
        supported: i64,
    },
}

/// The connection settings of every file of this crate: a 5 s busy timeout, `journal_mode=WAL`,
/// `synchronous=FULL` and `foreign_keys=ON`.
pub(crate) fn configure(db: &Connection) -> rusqlite::Result<()> {
    db.busy_timeout(Duration::from_secs(5))?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// Runs the `steps` a file's `user_version` has not had yet, then records the new version, all
/// in one immediate transaction (a crash leaves the file as it was); refuses newer files.
pub(crate) fn migrate(db: &mut Connection, steps: &[Migration]) -> Result<(), MigrateError> {
    let supported = steps.len() as i64;
    let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > supported {
        return Err(MigrateError::Newer { found, supported });
    }
    for step in &steps[found.max(0) as usize..] {
        step(&tx)?;
    }
    if found < supported {
        tx.pragma_update(None, "user_version", supported)?;
    }
    tx.commit()?;
    Ok(())
}

/// Version 2 (issue 20): a tenant's offline validity (`NULL`: the default).
fn offline_validity_v2(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch("ALTER TABLE tenants ADD COLUMN offline_validity_ms INTEGER;")
}

/// Version 1: tenants, API keys, the audit log and the usage ledger.
fn create_v1(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
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
    )
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
