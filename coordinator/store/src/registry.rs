//! The model registry in `registry.sqlite`: model versions with their declared I/O and
//! deployment settings, traffic splits, join tokens (only the SHA-256 of each secret) and node
//! identities, revocations included.
//!
//! Opened like [`Store`](crate::Store) (`journal_mode=WAL`, `synchronous=FULL`), with its own
//! schema version in `PRAGMA user_version` and its own `MIGRATIONS`. Files written before the
//! registry had a schema version (version 0, `synchronous=NORMAL`, columns added on open) are
//! brought to version 1 by the first migration, rows intact.

use crate::{configure, migrate, MigrateError, Migration};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use skein_proto::{DeploymentSettings, ErrorCode, ModelInfo, TensorSpec, VersionWeight, WireError};
use std::collections::BTreeMap;
use std::path::Path;

/// The schema version of `registry.sqlite` this build writes and understands
/// (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The registry's migrations: entry `i` brings version `i` to `i + 1`.
const MIGRATIONS: &[Migration] = &[create_v1, fleet_join_tokens_v2];

/// Version 1: the tables of the releases before schema versions, with every column they gained
/// over time. Such a file (version 0) may lack any of the later columns; they are added with
/// the defaults those releases used, so its rows keep their meaning.
fn create_v1(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS models (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            version TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            created_unix_ms INTEGER NOT NULL,
            io TEXT NOT NULL,
            settings TEXT NOT NULL DEFAULT '{}',
            owner TEXT NOT NULL DEFAULT 'root',
            UNIQUE (name, version)
        );
        CREATE TABLE IF NOT EXISTS join_tokens (
            secret_hash TEXT PRIMARY KEY,
            expires_unix_ms INTEGER,
            created_unix_ms INTEGER NOT NULL,
            single_use INTEGER NOT NULL DEFAULT 0,
            used_unix_ms INTEGER
        );
        CREATE TABLE IF NOT EXISTS traffic (
            name TEXT PRIMARY KEY,
            weights TEXT NOT NULL
        );
        CREATE TABLE IF NOT EXISTS nodes (
            node_id TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL UNIQUE,
            hostname TEXT NOT NULL,
            joined_unix_ms INTEGER NOT NULL,
            revoked_unix_ms INTEGER
        );",
    )?;
    for (table, column, decl) in [
        ("models", "settings", "TEXT NOT NULL DEFAULT '{}'"),
        ("models", "owner", "TEXT NOT NULL DEFAULT 'root'"),
        ("join_tokens", "single_use", "INTEGER NOT NULL DEFAULT 0"),
        ("join_tokens", "used_unix_ms", "INTEGER"),
        ("nodes", "revoked_unix_ms", "INTEGER"),
    ] {
        let exists = tx
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = '{column}'"
            ))?
            .exists([])?;
        if !exists {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}

/// Version 2: join tokens for fleets. A token admits up to `max_uses` nodes (`NULL`: any
/// number; a single-use token of version 1 becomes `max_uses = 1`), counts them in `uses`, and
/// gives its `labels` (JSON object) to every node it admits, kept in `nodes.labels`.
fn fleet_join_tokens_v2(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "ALTER TABLE join_tokens ADD COLUMN max_uses INTEGER;
         ALTER TABLE join_tokens ADD COLUMN uses INTEGER NOT NULL DEFAULT 0;
         ALTER TABLE join_tokens ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
         UPDATE join_tokens SET max_uses = 1 WHERE single_use = 1;
         UPDATE join_tokens SET uses = 1 WHERE used_unix_ms IS NOT NULL;
         ALTER TABLE nodes ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';",
    )
}

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// SQLite failed.
    #[error("registry database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Stored metadata did not decode.
    #[error("registry metadata: {0}")]
    Json(#[from] serde_json::Error),
    /// The file's schema version is newer than this build's [`SCHEMA_VERSION`].
    #[error("registry: {0}")]
    NewerSchema(String),
}

impl From<MigrateError> for RegistryError {
    fn from(e: MigrateError) -> Self {
        match e {
            MigrateError::Sqlite(e) => RegistryError::Sqlite(e),
            newer @ MigrateError::Newer { .. } => RegistryError::NewerSchema(newer.to_string()),
        }
    }
}

impl From<RegistryError> for WireError {
    fn from(e: RegistryError) -> Self {
        WireError::new(ErrorCode::Internal, e.to_string())
    }
}

/// A row of the `nodes` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Node id.
    pub node_id: String,
    /// Fingerprint of the node's current certificate.
    pub fingerprint: String,
    /// Host name given at join.
    pub hostname: String,
    /// When the node was revoked (its certificate is refused from then on).
    pub revoked_unix_ms: Option<u64>,
    /// Labels given by the join token that admitted it; they override the node's own.
    pub labels: BTreeMap<String, String>,
}

/// What a join token admits: until when, how many nodes, with which labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JoinTokenGrant {
    /// Not valid from then on, ms since the epoch; `None`: never expires.
    pub expires_unix_ms: Option<u64>,
    /// Nodes it admits; `None`: any number.
    pub max_uses: Option<u32>,
    /// Labels every node it admits gets (overriding the node's own for these keys).
    pub labels: BTreeMap<String, String>,
}

/// A stored join token: its grant and how many nodes it has admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    /// What it admits.
    pub grant: JoinTokenGrant,
    /// Nodes admitted so far.
    pub uses: u32,
}

/// Outcome of checking a join token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenCheck {
    /// Valid.
    Valid,
    /// Known, but past its expiry.
    Expired,
    /// A token that admitted as many nodes as it may (a single-use token: one).
    Used,
    /// Not known.
    Unknown,
}

/// The SQLite-backed registry.
pub struct Registry {
    db: Connection,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Io {
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
}

impl Registry {
    /// Opens (creating if missing) the registry file at `path` (the coordinator's is
    /// `<data_dir>/registry.sqlite`) and migrates it to [`SCHEMA_VERSION`].
    ///
    /// Fails with [`RegistryError::NewerSchema`] on a file written by a newer build.
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        let mut db = Connection::open(path)?;
        configure(&db)?;
        migrate(&mut db, MIGRATIONS)?;
        Ok(Registry { db })
    }

    /// Replace the settings of a model version; false when it does not exist.
    pub fn update_settings(
        &self,
        name: &str,
        version: &str,
        settings: &DeploymentSettings,
    ) -> Result<bool, RegistryError> {
        let n = self.db.execute(
            "UPDATE models SET settings = ?3 WHERE name = ?1 AND version = ?2",
            params![name, version, serde_json::to_string(settings)?],
        )?;
        Ok(n == 1)
    }

    /// Add a model version. Returns the stored row; an existing identical row is returned as is.
    pub fn insert_model(
        &self,
        info: &ModelInfo,
    ) -> Result<Result<ModelInfo, WireError>, RegistryError> {
        if let Some(existing) = self.model(&info.name, Some(&info.version))? {
            if existing.sha256 == info.sha256 {
                return Ok(Ok(existing));
            }
            return Ok(Err(WireError::new(
                ErrorCode::VersionConflict,
                format!(
                    "model `{}` version `{}` already exists with different content (sha256 {}); deploy under a new version",
                    info.name, info.version, existing.sha256
                ),
            )));
        }
        let io = serde_json::to_string(&Io {
            inputs: info.inputs.clone(),
            outputs: info.outputs.clone(),
        })?;
        self.db.execute(
            "INSERT INTO models (name, version, sha256, size, created_unix_ms, io, settings, owner) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                info.name,
                info.version,
                info.sha256,
                info.size as i64,
                info.created_unix_ms as i64,
                io,
                serde_json::to_string(&info.settings)?,
                info.owner
            ],
        )?;
        Ok(Ok(info.clone()))
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(ModelInfo, String, String)> {
        Ok((
            ModelInfo {
                name: r.get(0)?,
                version: r.get(1)?,
                sha256: r.get(2)?,
                size: r.get::<_, i64>(3)? as u64,
                created_unix_ms: r.get::<_, i64>(4)? as u64,
                inputs: vec![],
                outputs: vec![],
                loaded_on: vec![],
                settings: DeploymentSettings::default(),
                warm_replicas: 0,
                loading_replicas: 0,
                cold_starts: 0,
                replicas: vec![],
                scaling: None,
                owner: r.get(7)?,
            },
            r.get(5)?,
            r.get(6)?,
        ))
    }

    fn finish(row: (ModelInfo, String, String)) -> Result<ModelInfo, RegistryError> {
        let (mut info, io, settings) = row;
        let io: Io = serde_json::from_str(&io)?;
        info.inputs = io.inputs;
        info.outputs = io.outputs;
        info.settings = serde_json::from_str(&settings)?;
        Ok(info)
    }

    /// One model version; the latest deployed when `version` is `None`.
    pub fn model(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<ModelInfo>, RegistryError> {
        const COLS: &str = "name, version, sha256, size, created_unix_ms, io, settings, owner";
        let row = match version {
            Some(v) => self
                .db
                .query_row(
                    &format!("SELECT {COLS} FROM models WHERE name = ?1 AND version = ?2"),
                    params![name, v],
                    Self::row,
                )
                .optional()?,
            None => self
                .db
                .query_row(
                    &format!("SELECT {COLS} FROM models WHERE name = ?1 ORDER BY seq DESC LIMIT 1"),
                    params![name],
                    Self::row,
                )
                .optional()?,
        };
        row.map(Self::finish).transpose()
    }

    /// All model versions, oldest first.
    pub fn models(&self) -> Result<Vec<ModelInfo>, RegistryError> {
        let mut stmt = self.db.prepare(
            "SELECT name, version, sha256, size, created_unix_ms, io, settings, owner FROM models ORDER BY name, seq",
        )?;
        let rows = stmt
            .query_map([], Self::row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(Self::finish).collect()
    }

    /// The next free integer version of `name`.
    pub fn next_version(&self, name: &str) -> Result<String, RegistryError> {
        let mut stmt = self
            .db
            .prepare("SELECT version FROM models WHERE name = ?1")?;
        let max = stmt
            .query_map(params![name], |r| r.get::<_, String>(0))?
            .filter_map(|v| v.ok()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        Ok((max + 1).to_string())
    }

    /// The traffic split of `name` (empty when none is set).
    pub fn traffic(&self, name: &str) -> Result<Vec<VersionWeight>, RegistryError> {
        let json: Option<String> = self
            .db
            .query_row(
                "SELECT weights FROM traffic WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?;
        Ok(match json {
            Some(j) => serde_json::from_str(&j)?,
            None => Vec::new(),
        })
    }

    /// Set (or, with an empty list, clear) the traffic split of `name`.
    pub fn set_traffic(&self, name: &str, weights: &[VersionWeight]) -> Result<(), RegistryError> {
        if weights.is_empty() {
            self.db
                .execute("DELETE FROM traffic WHERE name = ?1", params![name])?;
        } else {
            self.db.execute(
                "INSERT INTO traffic (name, weights) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET weights = excluded.weights",
                params![name, serde_json::to_string(weights)?],
            )?;
        }
        Ok(())
    }

    /// Whether any version of `name` exists.
    pub fn has_model(&self, name: &str) -> Result<bool, RegistryError> {
        Ok(self
            .db
            .query_row(
                "SELECT 1 FROM models WHERE name = ?1 LIMIT 1",
                params![name],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Store a join token's hash with an optional expiry (ms since the epoch); a single-use
    /// token admits one node, any other any number.
    pub fn add_join_token(
        &self,
        secret_hash: &str,
        expires_unix_ms: Option<u64>,
        single_use: bool,
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        let grant = JoinTokenGrant {
            expires_unix_ms,
            max_uses: single_use.then_some(1),
            labels: BTreeMap::new(),
        };
        self.add_join_token_grant(secret_hash, &grant, now_ms)
    }

    /// Store a join token's hash with what it admits; an existing hash is left as it is.
    pub fn add_join_token_grant(
        &self,
        secret_hash: &str,
        grant: &JoinTokenGrant,
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        self.db.execute(
            "INSERT OR IGNORE INTO join_tokens (secret_hash, expires_unix_ms, created_unix_ms, single_use, max_uses, labels) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                secret_hash,
                grant.expires_unix_ms.map(|e| e as i64),
                now_ms as i64,
                grant.max_uses.is_some(),
                grant.max_uses,
                serde_json::to_string(&grant.labels)?
            ],
        )?;
        Ok(())
    }

    /// The stored join token with `secret_hash`.
    pub fn join_token(&self, secret_hash: &str) -> Result<Option<JoinTokenRecord>, RegistryError> {
        let row: Option<(Option<i64>, Option<u32>, u32, String)> = self
            .db
            .query_row(
                "SELECT expires_unix_ms, max_uses, uses, labels FROM join_tokens WHERE secret_hash = ?1",
                params![secret_hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        row.map(|(expires, max_uses, uses, labels)| {
            Ok(JoinTokenRecord {
                grant: JoinTokenGrant {
                    expires_unix_ms: expires.map(|e| e as u64),
                    max_uses,
                    labels: serde_json::from_str(&labels)?,
                },
                uses,
            })
        })
        .transpose()
    }

    /// Check a join token's hash at `now_ms`; with `consume`, a valid token counts one use
    /// (a token with uses left; single-use tokens have one).
    pub fn use_join_token(
        &self,
        secret_hash: &str,
        now_ms: u64,
        consume: bool,
    ) -> Result<TokenCheck, RegistryError> {
        let Some(t) = self.join_token(secret_hash)? else {
            return Ok(TokenCheck::Unknown);
        };
        if t.grant.expires_unix_ms.is_some_and(|exp| exp <= now_ms) {
            return Ok(TokenCheck::Expired);
        }
        if t.grant.max_uses.is_some_and(|max| t.uses >= max) {
            return Ok(TokenCheck::Used);
        }
        if !consume {
            return Ok(TokenCheck::Valid);
        }
        // The WHERE makes this a compare-and-set: of joins racing for the last use, one wins.
        let n = self.db.execute(
            "UPDATE join_tokens SET uses = uses + 1, used_unix_ms = ?2
             WHERE secret_hash = ?1 AND (max_uses IS NULL OR uses < max_uses)",
            params![secret_hash, now_ms as i64],
        )?;
        Ok(if n == 1 {
            TokenCheck::Valid
        } else {
            TokenCheck::Used
        })
    }

    /// Whether the node identity `node_id` has been revoked (for good: a revoked node joins
    /// again only with a new key).
    pub fn node_revoked(&self, node_id: &str) -> Result<bool, RegistryError> {
        Ok(self
            .db
            .query_row(
                "SELECT revoked_unix_ms IS NOT NULL FROM nodes WHERE node_id = ?1",
                params![node_id],
                |r| r.get::<_, bool>(0),
            )
            .optional()?
            .unwrap_or(false))
    }

    /// Mark a node revoked; false when no such node joined.
    pub fn revoke_node(&self, node_id: &str, now_ms: u64) -> Result<bool, RegistryError> {
        let n = self.db.execute(
            "UPDATE nodes SET revoked_unix_ms = COALESCE(revoked_unix_ms, ?2) WHERE node_id = ?1",
            params![node_id, now_ms as i64],
        )?;
        Ok(n == 1)
    }

    /// Record (or update) a node's identity.
    pub fn upsert_node(&self, rec: &NodeRecord, now_ms: u64) -> Result<(), RegistryError> {
        self.db.execute(
            "INSERT INTO nodes (node_id, fingerprint, hostname, joined_unix_ms, labels) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(node_id) DO UPDATE SET fingerprint = excluded.fingerprint, hostname = excluded.hostname, labels = excluded.labels",
            params![
                rec.node_id,
                rec.fingerprint,
                rec.hostname,
                now_ms as i64,
                serde_json::to_string(&rec.labels)?
            ],
        )?;
        Ok(())
    }

    /// The node whose certificate has `fingerprint`.
    pub fn node_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<NodeRecord>, RegistryError> {
        self.db
            .query_row(
                "SELECT node_id, fingerprint, hostname, revoked_unix_ms, labels FROM nodes WHERE fingerprint = ?1",
                params![fingerprint],
                |r| {
                    Ok((
                        NodeRecord {
                            node_id: r.get(0)?,
                            fingerprint: r.get(1)?,
                            hostname: r.get(2)?,
                            revoked_unix_ms: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                            labels: BTreeMap::new(),
                        },
                        r.get::<_, String>(4)?,
                    ))
                },
            )
            .optional()?
            .map(|(rec, labels)| {
                Ok(NodeRecord {
                    labels: serde_json::from_str(&labels)?,
                    ..rec
                })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_proto::DataType;

    /// The body of `Registry::open` of the releases before schema versions, verbatim: what an
    /// existing `registry.sqlite` was last opened with.
    fn open_as_previous_release(path: &Path) -> Connection {
        let db = Connection::open(path).unwrap();
        db.pragma_update(None, "journal_mode", "WAL").unwrap();
        db.pragma_update(None, "synchronous", "NORMAL").unwrap();
        db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS models (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                name TEXT NOT NULL,
                version TEXT NOT NULL,
                sha256 TEXT NOT NULL,
                size INTEGER NOT NULL,
                created_unix_ms INTEGER NOT NULL,
                io TEXT NOT NULL,
                settings TEXT NOT NULL DEFAULT '{}',
                UNIQUE (name, version)
            );
            CREATE TABLE IF NOT EXISTS join_tokens (
                secret_hash TEXT PRIMARY KEY,
                expires_unix_ms INTEGER,
                created_unix_ms INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS traffic (
                name TEXT PRIMARY KEY,
                weights TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS nodes (
                node_id TEXT PRIMARY KEY,
                fingerprint TEXT NOT NULL UNIQUE,
                hostname TEXT NOT NULL,
                joined_unix_ms INTEGER NOT NULL
            );",
        )
        .unwrap();
        for (table, column, decl) in [
            ("models", "settings", "TEXT NOT NULL DEFAULT '{}'"),
            ("models", "owner", "TEXT NOT NULL DEFAULT 'root'"),
            ("join_tokens", "single_use", "INTEGER NOT NULL DEFAULT 0"),
            ("join_tokens", "used_unix_ms", "INTEGER"),
            ("nodes", "revoked_unix_ms", "INTEGER"),
        ] {
            let exists: bool = db
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = '{column}'"
                ))
                .unwrap()
                .exists([])
                .unwrap();
            if !exists {
                db.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))
                    .unwrap();
            }
        }
        db
    }

    fn pragma(r: &Registry, name: &str) -> i64 {
        r.db.query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn a_registry_of_the_previous_release_opens_with_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.sqlite");
        {
            // Written as the previous release's code path wrote it (its SQL, verbatim).
            let db = open_as_previous_release(&path);
            db.execute(
                "INSERT INTO models (name, version, sha256, size, created_unix_ms, io, settings, owner) VALUES ('m', '3', 'aa', 3, 1, ?1, '{\"min_replicas\":2}', 'acme')",
                params![r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[-1,3]}],"outputs":[]}"#],
            )
            .unwrap();
            db.execute(
                "INSERT INTO join_tokens (secret_hash, expires_unix_ms, created_unix_ms, single_use) VALUES ('fresh', 5000, 0, 1), ('spent', 5000, 0, 1), ('forever', NULL, 0, 0)",
                [],
            )
            .unwrap();
            db.execute(
                "UPDATE join_tokens SET used_unix_ms = 10 WHERE secret_hash = 'spent'",
                [],
            )
            .unwrap();
            db.execute(
                "INSERT INTO nodes (node_id, fingerprint, hostname, joined_unix_ms, revoked_unix_ms) VALUES ('n-ok', 'f1', 'h1', 1, NULL), ('n-bad', 'f2', 'h2', 1, 20)",
                [],
            )
            .unwrap();
            db.execute(
                "INSERT INTO traffic (name, weights) VALUES ('m', '[{\"version\":\"3\",\"weight\":100}]')",
                [],
            )
            .unwrap();
            let v: i64 = db
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(v, 0, "the previous release kept no schema version");
        }
        let r = Registry::open(&path).unwrap();
        assert_eq!(pragma(&r, "user_version"), SCHEMA_VERSION);
        assert_eq!(pragma(&r, "synchronous"), 2, "FULL");
        let m = r.model("m", None).unwrap().unwrap();
        assert_eq!((m.version.as_str(), m.owner.as_str()), ("3", "acme"));
        assert_eq!(m.settings.min_replicas, 2);
        assert_eq!(m.inputs[0].shape, vec![-1, 3]);
        assert_eq!(r.traffic("m").unwrap()[0].weight, 100);
        assert_eq!(r.next_version("m").unwrap(), "4");
        assert_eq!(
            r.use_join_token("fresh", 100, true).unwrap(),
            TokenCheck::Valid
        );
        assert_eq!(
            r.use_join_token("fresh", 101, true).unwrap(),
            TokenCheck::Used
        );
        assert_eq!(
            r.use_join_token("spent", 100, false).unwrap(),
            TokenCheck::Used
        );
        assert_eq!(
            r.use_join_token("forever", u64::MAX / 2, true).unwrap(),
            TokenCheck::Valid
        );
        assert!(r.node_revoked("n-bad").unwrap());
        assert!(!r.node_revoked("n-ok").unwrap());
        assert_eq!(
            r.node_by_fingerprint("f2")
                .unwrap()
                .unwrap()
                .revoked_unix_ms,
            Some(20)
        );
        drop(r);
        // Opening again changes nothing.
        let r = Registry::open(&path).unwrap();
        assert_eq!(pragma(&r, "user_version"), SCHEMA_VERSION);
        assert_eq!(r.models().unwrap().len(), 1);
    }

    #[test]
    fn a_registry_from_before_the_added_columns_gets_them_with_their_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.sqlite");
        {
            // The first releases' tables: no owner, settings, single use or revocation yet.
            let db = Connection::open(&path).unwrap();
            db.execute_batch(
                "CREATE TABLE models (seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL, created_unix_ms INTEGER NOT NULL, io TEXT NOT NULL, UNIQUE (name, version));
                 CREATE TABLE join_tokens (secret_hash TEXT PRIMARY KEY, expires_unix_ms INTEGER, created_unix_ms INTEGER NOT NULL);
                 CREATE TABLE nodes (node_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE, hostname TEXT NOT NULL, joined_unix_ms INTEGER NOT NULL);
                 INSERT INTO models (name, version, sha256, size, created_unix_ms, io) VALUES ('m', '1', 'aa', 3, 1, '{\"inputs\":[],\"outputs\":[]}');
                 INSERT INTO join_tokens VALUES ('t', NULL, 0);
                 INSERT INTO nodes VALUES ('n', 'f', 'h', 1);",
            )
            .unwrap();
        }
        let r = Registry::open(&path).unwrap();
        assert_eq!(pragma(&r, "user_version"), SCHEMA_VERSION);
        let m = r.model("m", Some("1")).unwrap().unwrap();
        assert_eq!(m.owner, "root");
        assert_eq!(m.settings, DeploymentSettings::default());
        // A token of those releases is reusable.
        for now in [1, 2] {
            assert_eq!(r.use_join_token("t", now, true).unwrap(), TokenCheck::Valid);
        }
        assert!(!r.node_revoked("n").unwrap());
        assert!(r.revoke_node("n", 5).unwrap());
        assert!(r.node_revoked("n").unwrap());
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.sqlite");
        drop(Registry::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let e = Registry::open(&path).unwrap_err();
        assert!(matches!(e, RegistryError::NewerSchema(_)), "{e}");
        assert!(e.to_string().contains("newer"), "{e}");
    }

    #[test]
    fn join_tokens_and_revocations_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.sqlite");
        {
            let r = Registry::open(&path).unwrap();
            r.add_join_token("once", Some(1_000), true, 0).unwrap();
            r.add_join_token("spent", Some(1_000), true, 0).unwrap();
            assert_eq!(
                r.use_join_token("spent", 1, true).unwrap(),
                TokenCheck::Valid
            );
            for (id, fp) in [("a", "fa"), ("b", "fb")] {
                let rec = NodeRecord {
                    node_id: id.into(),
                    fingerprint: fp.into(),
                    hostname: "h".into(),
                    revoked_unix_ms: None,
                    labels: BTreeMap::from([("site".into(), id.into())]),
                };
                r.upsert_node(&rec, 1).unwrap();
            }
            assert!(r.revoke_node("b", 7).unwrap());
            assert!(!r.revoke_node("never-joined", 7).unwrap());
        }
        let r = Registry::open(&path).unwrap();
        assert_eq!(
            r.use_join_token("spent", 2, false).unwrap(),
            TokenCheck::Used
        );
        assert_eq!(
            r.use_join_token("once", 2, true).unwrap(),
            TokenCheck::Valid
        );
        assert_eq!(r.use_join_token("once", 3, true).unwrap(), TokenCheck::Used);
        assert!(r.node_revoked("b").unwrap());
        assert!(!r.node_revoked("a").unwrap());
        // Revoking again keeps the first time.
        assert!(r.revoke_node("b", 9).unwrap());
        assert_eq!(
            r.node_by_fingerprint("fb")
                .unwrap()
                .unwrap()
                .revoked_unix_ms,
            Some(7)
        );
        // The labels its join token gave it survive the reopen too.
        assert_eq!(
            r.node_by_fingerprint("fa").unwrap().unwrap().labels,
            BTreeMap::from([("site".to_string(), "a".to_string())])
        );
    }

    fn info(name: &str, version: &str, sha: &str) -> ModelInfo {
        ModelInfo {
            name: name.into(),
            version: version.into(),
            sha256: sha.into(),
            size: 3,
            created_unix_ms: 1,
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![-1, 3],
            }],
            owner: "root".into(),
            ..ModelInfo::default()
        }
    }

    #[test]
    fn models_persist_and_versions_conflict() {
        let dir = tempfile::tempdir().unwrap();
        {
            let r = Registry::open(&dir.path().join("registry.sqlite")).unwrap();
            assert_eq!(r.next_version("m").unwrap(), "1");
            r.insert_model(&info("m", "1", "aa")).unwrap().unwrap();
            assert!(r.insert_model(&info("m", "1", "aa")).unwrap().is_ok());
            let e = r.insert_model(&info("m", "1", "bb")).unwrap().unwrap_err();
            assert_eq!(e.code, ErrorCode::VersionConflict);
            r.insert_model(&info("m", "7", "cc")).unwrap().unwrap();
        }
        let r = Registry::open(&dir.path().join("registry.sqlite")).unwrap();
        assert_eq!(r.next_version("m").unwrap(), "8");
        assert_eq!(r.model("m", None).unwrap().unwrap().version, "7");
        assert_eq!(
            r.model("m", Some("1")).unwrap().unwrap().inputs[0].shape,
            vec![-1, 3]
        );
        assert!(r.model("nope", None).unwrap().is_none());
        assert_eq!(r.models().unwrap().len(), 2);
    }

    #[test]
    fn a_fleet_token_admits_its_number_of_nodes_and_keeps_its_labels() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("registry.sqlite")).unwrap();
        let grant = JoinTokenGrant {
            expires_unix_ms: Some(1_000),
            max_uses: Some(3),
            labels: BTreeMap::from([("site".into(), "berlin-3".into())]),
        };
        r.add_join_token_grant("fleet", &grant, 0).unwrap();
        assert_eq!(
            r.use_join_token("fleet", 1, false).unwrap(),
            TokenCheck::Valid
        );
        for now in 1..=3 {
            assert_eq!(
                r.use_join_token("fleet", now, true).unwrap(),
                TokenCheck::Valid
            );
        }
        assert_eq!(
            r.use_join_token("fleet", 4, false).unwrap(),
            TokenCheck::Used
        );
        assert_eq!(
            r.use_join_token("fleet", 4, true).unwrap(),
            TokenCheck::Used
        );
        let t = r.join_token("fleet").unwrap().unwrap();
        assert_eq!((t.uses, &t.grant), (3, &grant));
        assert!(r.join_token("nope").unwrap().is_none());
        // Expiry comes first: an expired token with uses left is expired.
        r.add_join_token_grant("late", &grant, 0).unwrap();
        assert_eq!(
            r.use_join_token("late", 1_000, true).unwrap(),
            TokenCheck::Expired
        );
        // Unlimited: `max_uses: None`.
        let any = JoinTokenGrant::default();
        r.add_join_token_grant("any", &any, 0).unwrap();
        for now in 0..10 {
            assert_eq!(
                r.use_join_token("any", now, true).unwrap(),
                TokenCheck::Valid
            );
        }
        assert_eq!(r.join_token("any").unwrap().unwrap().uses, 10);
    }

    #[test]
    fn join_tokens_expire() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("registry.sqlite")).unwrap();
        r.add_join_token("h1", None, false, 0).unwrap();
        r.add_join_token("h2", Some(100), false, 0).unwrap();
        r.add_join_token("once", Some(100), true, 0).unwrap();
        assert_eq!(
            r.use_join_token("h1", 1_000, true).unwrap(),
            TokenCheck::Valid
        );
        assert_eq!(
            r.use_join_token("h1", 1_000, true).unwrap(),
            TokenCheck::Valid
        );
        assert_eq!(r.use_join_token("h2", 99, true).unwrap(), TokenCheck::Valid);
        assert_eq!(
            r.use_join_token("h2", 100, true).unwrap(),
            TokenCheck::Expired
        );
        assert_eq!(
            r.use_join_token("h3", 0, true).unwrap(),
            TokenCheck::Unknown
        );
        assert_eq!(
            r.use_join_token("once", 49, false).unwrap(),
            TokenCheck::Valid
        );
        assert_eq!(
            r.use_join_token("once", 50, true).unwrap(),
            TokenCheck::Valid
        );
        assert_eq!(
            r.use_join_token("once", 51, true).unwrap(),
            TokenCheck::Used
        );
    }
}
