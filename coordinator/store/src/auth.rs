//! Tenants, scopes, API keys and quotas.
//!
//! An API key's text is `skn_<id>_<secret>`: `id` is 12 lowercase hex chars (public, the
//! lookup key), `secret` 64 lowercase hex chars (32 random bytes from the OS). The store keeps
//! `sha256(secret)` (of the 64-char hex text) and never the secret itself; the full text is
//! returned once, by [`Store::create_key`].

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use rand::rngs::OsRng;
use rand::RngCore;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{to_i64, Store, StoreError};
pub use skein_proto::{KeyInfo, NewKey, Quota, TenantInfo as Tenant};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Scope {
    /// Everything, including managing tenants and keys; implies every other scope.
    Admin,
    /// Deploy, update and remove models.
    Deploy,
    /// Run inference.
    Invoke,
    /// Read usage and cost.
    ReadUsage,
}

impl Scope {
    /// Every scope, in canonical order.
    pub const ALL: [Scope; 4] = [Scope::Admin, Scope::Deploy, Scope::Invoke, Scope::ReadUsage];

    /// The scope's name: `admin`, `deploy`, `invoke` or `read-usage`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Deploy => "deploy",
            Scope::Invoke => "invoke",
            Scope::ReadUsage => "read-usage",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Scope, StoreError> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| {
                let valid: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
                StoreError::Invalid(format!("unknown scope {s:?} (valid: {})", valid.join(", ")))
            })
    }
}

/// Who an authenticated request acts as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// The key's tenant.
    pub tenant: String,
    /// The key id (for the audit log's actor).
    pub key_id: String,
    /// The key's scopes.
    pub scopes: Vec<Scope>,
}

impl Principal {
    /// Whether the principal holds `scope` (`Admin` implies every scope).
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }
}

/// Why [`Store::authenticate`] refused a key. Messages never include the key text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The text is not of the form `skn_<12 hex>_<64 hex>` (lowercase).
    #[error("malformed API key")]
    Malformed,
    /// No key with that id, or the secret does not match (the two are not told apart).
    #[error("unknown API key")]
    UnknownKey,
    /// The key exists and matches but was revoked.
    #[error("API key revoked")]
    Revoked,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

const KEY_PREFIX: &str = "skn_";
const ID_HEX: usize = 12;
const SECRET_HEX: usize = 64;
const MAX_LABEL_CHARS: usize = 128;
const MAX_TENANT_CHARS: usize = 64;
/// At most this many authenticated keys are cached; the cache is cleared when full.
const AUTH_CACHE_MAX: usize = 4096;

/// Successful authentications: key id → (sha256 hex of the secret, principal).
///
/// Also remembers SQLite's `data_version`, which changes when another connection (another
/// process, e.g. the CLI revoking a key) commits: the cache is then dropped.
#[derive(Default)]
pub(crate) struct AuthCache {
    entries: HashMap<String, (String, Principal)>,
    data_version: Option<i64>,
}

impl AuthCache {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Checks a tenant name: 1..=64 chars of `[a-z0-9-_.]`, starting with a letter or digit.
pub fn validate_tenant_name(name: &str) -> Result<(), StoreError> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.len() <= MAX_TENANT_CHARS && first_ok && name.chars().all(ok_char) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "tenant name {name:?}: must be 1 to {MAX_TENANT_CHARS} chars of a-z 0-9 - _ . \
             starting with a letter or digit"
        )))
    }
}

/// Splits key text into (id, secret) if it is exactly `skn_<12 hex>_<64 hex>`, lowercase.
fn parse_key(text: &str) -> Option<(&str, &str)> {
    let rest = text.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (id.len() == ID_HEX && secret.len() == SECRET_HEX && lower_hex(id) && lower_hex(secret))
        .then_some((id, secret))
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Equality of two byte strings in time independent of where they differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}

fn scopes_to_text(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// The scopes' names, as listed on the wire.
pub fn scope_names(scopes: &[Scope]) -> Vec<String> {
    scopes.iter().map(|s| s.as_str().to_string()).collect()
}

fn scopes_from_text(text: &str) -> Result<Vec<Scope>, StoreError> {
    text.split(',').map(Scope::from_str).collect()
}

fn tenant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Tenant> {
    Ok(Tenant {
        name: r.get(0)?,
        created_ms: r.get(1)?,
        quota: Quota {
            max_rps: r.get(2)?,
            max_concurrent: r.get(3)?,
            monthly_compute_us: r.get(4)?,
            offline_validity_ms: r.get(5)?,
        },
    })
}

const TENANT_COLS: &str =
    "name, created_ms, max_rps, max_concurrent, monthly_compute_us, offline_validity_ms";
const KEY_COLS: &str = "id, tenant, scopes, label, created_ms, revoked_ms";

/// A key row with its scopes still as text (parsed outside the rusqlite closure).
fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(KeyInfo, String)> {
    Ok((
        KeyInfo {
            id: r.get(0)?,
            tenant: r.get(1)?,
            scopes: Vec::new(),
            label: r.get(3)?,
            created_ms: r.get(4)?,
            revoked_ms: r.get(5)?,
        },
        r.get(2)?,
    ))
}

fn finish_key((mut info, scopes): (KeyInfo, String)) -> Result<KeyInfo, StoreError> {
    info.scopes = scope_names(&scopes_from_text(&scopes)?);
    Ok(info)
}

fn quota_monthly(quota: &Quota) -> Result<Option<i64>, StoreError> {
    quota
        .monthly_compute_us
        .map(|v| to_i64(v, "monthly_compute_us"))
        .transpose()
}

fn quota_offline(quota: &Quota) -> Result<Option<i64>, StoreError> {
    quota
        .offline_validity_ms
        .map(|v| to_i64(v, "offline_validity_ms"))
        .transpose()
}

impl Store {
    /// Creates a tenant; [`StoreError::Conflict`] if it exists, `Invalid` for a bad name.
    pub fn create_tenant(
        &mut self,
        name: &str,
        quota: &Quota,
        now_ms: u64,
    ) -> Result<Tenant, StoreError> {
        validate_tenant_name(name)?;
        let monthly = quota_monthly(quota)?;
        let offline = quota_offline(quota)?;
        let created = to_i64(now_ms, "now_ms")?;
        let tx = self.db.transaction()?;
        let exists = tx
            .query_row("SELECT 1 FROM tenants WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some();
        if exists {
            return Err(StoreError::Conflict(format!(
                "tenant {name:?} already exists"
            )));
        }
        tx.execute(
            "INSERT INTO tenants (name, created_ms, max_rps, max_concurrent, monthly_compute_us,
                                  offline_validity_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                name,
                created,
                quota.max_rps,
                quota.max_concurrent,
                monthly,
                offline
            ],
        )?;
        tx.commit()?;
        Ok(Tenant {
            name: name.to_owned(),
            created_ms: now_ms,
            quota: quota.clone(),
        })
    }

    /// Returns the tenant, creating it with the default (unlimited) quota if missing.
    pub fn ensure_tenant(&mut self, name: &str, now_ms: u64) -> Result<Tenant, StoreError> {
        validate_tenant_name(name)?;
        let created = to_i64(now_ms, "now_ms")?;
        self.db.execute(
            "INSERT OR IGNORE INTO tenants (name, created_ms) VALUES (?1, ?2)",
            params![name, created],
        )?;
        self.tenant(name)?
            .ok_or_else(|| StoreError::NotFound(format!("tenant {name:?}")))
    }

    /// The tenant named `name`, if any.
    pub fn tenant(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        let mut stmt = self.db.prepare_cached(&format!(
            "SELECT {TENANT_COLS} FROM tenants WHERE name = ?1"
        ))?;
        Ok(stmt.query_row([name], tenant_row).optional()?)
    }

    /// Every tenant, sorted by name.
    pub fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        let mut stmt = self
            .db
            .prepare_cached(&format!("SELECT {TENANT_COLS} FROM tenants ORDER BY name"))?;
        let rows = stmt.query_map([], tenant_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Replaces a tenant's quota; [`StoreError::NotFound`] if the tenant does not exist.
    pub fn set_quota(&mut self, name: &str, quota: &Quota) -> Result<Tenant, StoreError> {
        let monthly = quota_monthly(quota)?;
        let offline = quota_offline(quota)?;
        let changed = self.db.execute(
            "UPDATE tenants SET max_rps = ?2, max_concurrent = ?3, monthly_compute_us = ?4,
                                offline_validity_ms = ?5
             WHERE name = ?1",
            params![name, quota.max_rps, quota.max_concurrent, monthly, offline],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!("tenant {name:?}")));
        }
        self.tenant(name)?
            .ok_or_else(|| StoreError::NotFound(format!("tenant {name:?}")))
    }

    /// Creates an API key for an existing tenant and returns it with its full text (shown once).
    ///
    /// `scopes` must be non-empty (`Invalid`); duplicates are dropped and the order made
    /// canonical. `label` is at most 128 chars. `NotFound` if the tenant does not exist.
    pub fn create_key(
        &mut self,
        tenant: &str,
        scopes: &[Scope],
        label: Option<&str>,
        now_ms: u64,
    ) -> Result<NewKey, StoreError> {
        let mut scopes = scopes.to_vec();
        scopes.sort_unstable();
        scopes.dedup();
        if scopes.is_empty() {
            return Err(StoreError::Invalid("a key needs at least one scope".into()));
        }
        if let Some(label) = label {
            if label.chars().count() > MAX_LABEL_CHARS {
                return Err(StoreError::Invalid(format!(
                    "key label longer than {MAX_LABEL_CHARS} chars"
                )));
            }
        }
        let created = to_i64(now_ms, "now_ms")?;
        let tx = self.db.transaction()?;
        let tenant_exists = tx
            .query_row(
                "SELECT 1 FROM tenants WHERE name = ?1",
                [tenant],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if !tenant_exists {
            return Err(StoreError::NotFound(format!("tenant {tenant:?}")));
        }
        // 48-bit random ids: a collision is unlikely but cheap to rule out.
        let id = loop {
            let id = random_hex(ID_HEX / 2);
            let taken = tx
                .query_row("SELECT 1 FROM api_keys WHERE id = ?1", [&id], |_| Ok(()))
                .optional()?
                .is_some();
            if !taken {
                break id;
            }
        };
        let secret = random_hex(SECRET_HEX / 2);
        tx.execute(
            "INSERT INTO api_keys (id, tenant, scopes, label, created_ms, revoked_ms, secret_hash)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6)",
            params![
                id,
                tenant,
                scopes_to_text(&scopes),
                label,
                created,
                hash_secret(&secret)
            ],
        )?;
        tx.commit()?;
        self.auth_cache.get_mut().entries.remove(&id);
        Ok(NewKey {
            key: format!("{KEY_PREFIX}{id}_{secret}"),
            info: KeyInfo {
                id,
                tenant: tenant.to_owned(),
                scopes: scope_names(&scopes),
                label: label.map(str::to_owned),
                created_ms: now_ms,
                revoked_ms: None,
            },
        })
    }

    /// Keys of one tenant (or all), sorted by creation time then id; revoked ones included.
    pub fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyInfo>, StoreError> {
        let mut stmt = self.db.prepare_cached(&format!(
            "SELECT {KEY_COLS} FROM api_keys WHERE ?1 IS NULL OR tenant = ?1
             ORDER BY created_ms, id"
        ))?;
        let rows = stmt
            .query_map([tenant], key_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(finish_key).collect()
    }

    /// The key with id `id`, if any.
    pub fn key(&self, id: &str) -> Result<Option<KeyInfo>, StoreError> {
        let mut stmt = self
            .db
            .prepare_cached(&format!("SELECT {KEY_COLS} FROM api_keys WHERE id = ?1"))?;
        stmt.query_row([id], key_row)
            .optional()?
            .map(finish_key)
            .transpose()
    }

    /// Revokes a key, effective immediately; `NotFound` if no such key. Revoking a revoked key
    /// is not an error and keeps the first `revoked_ms`.
    pub fn revoke_key(&mut self, id: &str, now_ms: u64) -> Result<KeyInfo, StoreError> {
        let revoked = to_i64(now_ms, "now_ms")?;
        // Invalidate first: even if the write below fails, the next use re-reads the database.
        self.auth_cache.get_mut().entries.remove(id);
        self.db.execute(
            "UPDATE api_keys SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
            params![id, revoked],
        )?;
        self.key(id)?
            .ok_or_else(|| StoreError::NotFound(format!("API key {id:?}")))
    }

    /// Checks key text and returns who it acts as.
    ///
    /// Strict parsing ([`AuthError::Malformed`]), lookup by id, constant-time comparison of
    /// the secret's hash ([`AuthError::UnknownKey`] for an unknown id or a wrong secret alike),
    /// then [`AuthError::Revoked`]. Successes are cached in memory; revocation through this
    /// store invalidates at once, and a commit by another connection to the same file (seen
    /// through `PRAGMA data_version`) drops the whole cache.
    pub fn authenticate(&self, key_text: &str) -> Result<Principal, AuthError> {
        let (id, secret) = parse_key(key_text).ok_or(AuthError::Malformed)?;
        let hash = hash_secret(secret);

        let data_version: i64 = self
            .db
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(StoreError::from)?;
        {
            let mut cache = self.auth_cache.borrow_mut();
            if cache.data_version != Some(data_version) {
                cache.entries.clear();
                cache.data_version = Some(data_version);
            }
            if let Some((cached_hash, principal)) = cache.entries.get(id) {
                if ct_eq(cached_hash.as_bytes(), hash.as_bytes()) {
                    return Ok(principal.clone());
                }
            }
        }

        let row: Option<(String, String, Option<u64>, String)> = self
            .db
            .prepare_cached(
                "SELECT tenant, scopes, revoked_ms, secret_hash FROM api_keys WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                    .optional()
            })
            .map_err(StoreError::from)?;
        let Some((tenant, scopes, revoked_ms, stored_hash)) = row else {
            return Err(AuthError::UnknownKey);
        };
        if !ct_eq(stored_hash.as_bytes(), hash.as_bytes()) {
            return Err(AuthError::UnknownKey);
        }
        if revoked_ms.is_some() {
            return Err(AuthError::Revoked);
        }
        let principal = Principal {
            tenant,
            key_id: id.to_owned(),
            scopes: scopes_from_text(&scopes)?,
        };
        let mut cache = self.auth_cache.borrow_mut();
        if cache.entries.len() >= AUTH_CACHE_MAX {
            cache.entries.clear();
        }
        cache
            .entries
            .insert(id.to_owned(), (stored_hash, principal.clone()));
        Ok(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn store_with_tenant() -> Store {
        let mut s = Store::open_in_memory().unwrap();
        s.create_tenant("acme", &Quota::default(), T0).unwrap();
        s
    }

    #[test]
    fn scope_names_round_trip() {
        for scope in Scope::ALL {
            assert_eq!(scope.to_string().parse::<Scope>().unwrap(), scope);
        }
        assert_eq!(Scope::ReadUsage.to_string(), "read-usage");
        let err = "root".parse::<Scope>().unwrap_err().to_string();
        assert!(err.contains("root") && err.contains("read-usage") && err.contains("admin"));
        // serde uses the same names
        use serde::de::value::{Error, StrDeserializer};
        use serde::de::IntoDeserializer;
        let de: StrDeserializer<'_, Error> = "read-usage".into_deserializer();
        assert_eq!(Scope::deserialize(de).unwrap(), Scope::ReadUsage);
        let de: StrDeserializer<'_, Error> = "ReadUsage".into_deserializer();
        assert!(Scope::deserialize(de).is_err());
    }

    #[test]
    fn tenant_name_validation() {
        let mut s = Store::open_in_memory().unwrap();
        for good in ["a", "acme", "0team", "a-b_c.d", &"x".repeat(64)] {
            s.create_tenant(good, &Quota::default(), T0).unwrap();
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "Acme",
            "a b",
            "a/b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(
                    s.create_tenant(bad, &Quota::default(), T0),
                    Err(StoreError::Invalid(_))
                ),
                "{bad:?}"
            );
            assert!(matches!(
                s.ensure_tenant(bad, T0),
                Err(StoreError::Invalid(_))
            ));
        }
    }

    #[test]
    fn tenant_conflict_ensure_and_quota() {
        let mut s = store_with_tenant();
        assert!(matches!(
            s.create_tenant("acme", &Quota::default(), T0 + 1),
            Err(StoreError::Conflict(_))
        ));
        // ensure returns the existing one unchanged
        let t = s.ensure_tenant("acme", T0 + 5).unwrap();
        assert_eq!(t.created_ms, T0);
        let b = s.ensure_tenant("beta", T0 + 5).unwrap();
        assert_eq!(b.created_ms, T0 + 5);
        assert_eq!(b.quota, Quota::default());

        let q = Quota {
            max_rps: Some(50),
            max_concurrent: Some(4),
            monthly_compute_us: Some(3_600_000_000),
            offline_validity_ms: Some(120_000),
        };
        let t = s.set_quota("acme", &q).unwrap();
        assert_eq!(t.quota, q);
        assert_eq!(s.tenant("acme").unwrap().unwrap().quota, q);
        let c = s.create_tenant("gamma", &q, T0).unwrap();
        assert_eq!(s.tenant("gamma").unwrap().unwrap(), c);
        assert!(matches!(
            s.set_quota("nope", &q),
            Err(StoreError::NotFound(m)) if m.contains("nope")
        ));
        assert!(s.tenant("nope").unwrap().is_none());
        let names: Vec<_> = s.tenants().unwrap().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["acme", "beta", "gamma"]);
        // too large for SQLite
        let huge = Quota {
            monthly_compute_us: Some(u64::MAX),
            ..Quota::default()
        };
        assert!(matches!(
            s.set_quota("acme", &huge),
            Err(StoreError::Invalid(_))
        ));
    }

    #[test]
    fn key_create_and_authenticate() {
        let mut s = store_with_tenant();
        let k = s
            .create_key(
                "acme",
                &[Scope::Invoke, Scope::ReadUsage, Scope::Invoke],
                Some("ci"),
                T0,
            )
            .unwrap();
        assert!(!format!("{k:?}").contains(&k.key));
        assert_eq!(k.key.len(), 4 + 12 + 1 + 64);
        assert!(k.key.starts_with(&format!("skn_{}_", k.info.id)));
        assert_eq!(k.info.scopes, ["invoke", "read-usage"]);
        assert_eq!(k.info.label.as_deref(), Some("ci"));

        let p = s.authenticate(&k.key).unwrap();
        assert_eq!(p.tenant, "acme");
        assert_eq!(p.key_id, k.info.id);
        assert!(p.allows(Scope::Invoke) && p.allows(Scope::ReadUsage));
        assert!(!p.allows(Scope::Deploy) && !p.allows(Scope::Admin));
        // second time through the cache
        assert_eq!(s.authenticate(&k.key).unwrap(), p);

        let admin = s.create_key("acme", &[Scope::Admin], None, T0 + 1).unwrap();
        let pa = s.authenticate(&admin.key).unwrap();
        assert!(Scope::ALL.iter().all(|&sc| pa.allows(sc)));

        assert_eq!(s.key(&k.info.id).unwrap().unwrap(), k.info);
        assert_eq!(
            s.keys(Some("acme")).unwrap(),
            vec![k.info.clone(), admin.info.clone()]
        );
        assert_eq!(s.keys(None).unwrap().len(), 2);
        assert!(s.keys(Some("other")).unwrap().is_empty());
        assert!(s.key("000000000000").unwrap().is_none());
    }

    #[test]
    fn key_creation_errors() {
        let mut s = store_with_tenant();
        assert!(matches!(
            s.create_key("acme", &[], None, T0),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            s.create_key("ghost", &[Scope::Invoke], None, T0),
            Err(StoreError::NotFound(m)) if m.contains("ghost")
        ));
        let long = "l".repeat(129);
        assert!(matches!(
            s.create_key("acme", &[Scope::Invoke], Some(&long), T0),
            Err(StoreError::Invalid(_))
        ));
        s.create_key("acme", &[Scope::Invoke], Some(&"é".repeat(128)), T0)
            .unwrap();
    }

    #[test]
    fn authenticate_failures() {
        let mut s = store_with_tenant();
        let k = s.create_key("acme", &[Scope::Invoke], None, T0).unwrap();
        let (prefix, secret) = k.key.rsplit_once('_').unwrap();

        // wrong secret, same length and alphabet
        let flipped: String = secret
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i == 63 {
                    if c == '0' {
                        '1'
                    } else {
                        '0'
                    }
                } else {
                    c
                }
            })
            .collect();
        let wrong = format!("{prefix}_{flipped}");
        assert!(matches!(s.authenticate(&wrong), Err(AuthError::UnknownKey)));
        // the cache does not accept a wrong secret either
        s.authenticate(&k.key).unwrap();
        assert!(matches!(s.authenticate(&wrong), Err(AuthError::UnknownKey)));

        // unknown id
        let unknown = format!("skn_{}_{secret}", "0".repeat(12));
        assert!(matches!(
            s.authenticate(&unknown),
            Err(AuthError::UnknownKey)
        ));

        // malformed
        for bad in [
            String::new(),
            "skn_".to_owned(),
            k.key.to_uppercase(),
            k.key.replacen("skn_", "skx_", 1),
            format!("{}x", k.key),
            k.key[..k.key.len() - 1].to_owned(),
            format!(" {}", k.key),
            format!("{}\n", k.key),
            k.key.replacen('_', "-", 2),
            format!("skn_{}_{}", "g".repeat(12), secret),
            format!("skn_{}__{}", &k.info.id, &secret[1..]),
        ] {
            let err = s.authenticate(&bad).unwrap_err();
            assert!(matches!(err, AuthError::Malformed), "{bad:?}: {err:?}");
            assert!(!err.to_string().contains(secret));
        }
    }

    #[test]
    fn revocation_is_immediate_through_the_cache() {
        let mut s = store_with_tenant();
        let k = s.create_key("acme", &[Scope::Invoke], None, T0).unwrap();
        s.authenticate(&k.key).unwrap();
        assert_eq!(s.auth_cache.borrow().len(), 1);
        let info = s.revoke_key(&k.info.id, T0 + 10).unwrap();
        assert_eq!(info.revoked_ms, Some(T0 + 10));
        assert!(matches!(s.authenticate(&k.key), Err(AuthError::Revoked)));
        // twice: no error, first time kept
        let again = s.revoke_key(&k.info.id, T0 + 99).unwrap();
        assert_eq!(again.revoked_ms, Some(T0 + 10));
        assert!(matches!(
            s.revoke_key("ffffffffffff", T0),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn revocation_by_another_connection_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut a = Store::open(&path).unwrap();
        a.create_tenant("acme", &Quota::default(), T0).unwrap();
        let k = a.create_key("acme", &[Scope::Invoke], None, T0).unwrap();
        a.authenticate(&k.key).unwrap();
        let mut b = Store::open(&path).unwrap();
        b.revoke_key(&k.info.id, T0 + 1).unwrap();
        assert!(matches!(a.authenticate(&k.key), Err(AuthError::Revoked)));
    }

    #[test]
    fn cache_is_bounded() {
        let mut s = store_with_tenant();
        let k1 = s.create_key("acme", &[Scope::Invoke], None, T0).unwrap();
        let k2 = s.create_key("acme", &[Scope::Invoke], None, T0).unwrap();
        s.authenticate(&k1.key).unwrap();
        {
            let mut cache = s.auth_cache.borrow_mut();
            let filler = Principal {
                tenant: String::new(),
                key_id: String::new(),
                scopes: Vec::new(),
            };
            for i in 0..AUTH_CACHE_MAX - 1 {
                cache
                    .entries
                    .insert(format!("x{i:011x}"), (String::new(), filler.clone()));
            }
            assert_eq!(cache.len(), AUTH_CACHE_MAX);
        }
        // Full: cleared, then the new entry goes in.
        assert_eq!(s.authenticate(&k2.key).unwrap().key_id, k2.info.id);
        assert_eq!(s.auth_cache.borrow().len(), 1);
        assert_eq!(s.authenticate(&k1.key).unwrap().key_id, k1.info.id);
        assert_eq!(s.auth_cache.borrow().len(), 2);
    }

    #[test]
    fn database_file_holds_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let mut s = Store::open(&path).unwrap();
        s.create_tenant("acme", &Quota::default(), T0).unwrap();
        let k = s.create_key("acme", &[Scope::Admin], None, T0).unwrap();
        let secret = k.key.rsplit_once('_').unwrap().1.to_owned();
        let raw = hex::decode(&secret).unwrap();
        let hash = hash_secret(&secret);
        let mut seen_hash = false;
        let check = |bytes: &[u8], seen_hash: &mut bool| {
            let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
            assert!(!has(secret.as_bytes()), "secret text in the file");
            assert!(!has(&raw), "secret bytes in the file");
            assert!(!has(k.key.as_bytes()), "key text in the file");
            *seen_hash |= has(hash.as_bytes());
        };
        // While open (the data lives in the WAL) and after closing (checkpointed).
        for suffix in ["", "-wal"] {
            let p = dir.path().join(format!("keys.db{suffix}"));
            if let Ok(bytes) = std::fs::read(p) {
                check(&bytes, &mut seen_hash);
            }
        }
        drop(s);
        check(&std::fs::read(&path).unwrap(), &mut seen_hash);
        assert!(seen_hash, "the hash is stored (sanity check of the search)");
        // and it still authenticates after reopening
        let s = Store::open(&path).unwrap();
        assert_eq!(s.authenticate(&k.key).unwrap().tenant, "acme");
    }

    #[test]
    fn ct_eq_works() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(ct_eq(b"", b""));
    }
}
