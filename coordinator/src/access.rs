//! Who may do what: API keys and scopes, tenants and their quotas, route tickets, the audit
//! log and the usage ledger, around one [`skein_store::Store`].
//!
//! ```text
//!  ctl request ─ CtlEnvelope{api_key} ─▶ Access::caller ─▶ Caller{tenant, scopes}
//!                                              │ checks in server/ (scope, owner, shared)
//!  resolve ───────────────────────────▶ Access::ticket ─▶ budget check ─▶ signed RouteTicket
//!  node ReportUsage ──────────────────▶ Access::record_usage ─▶ ledger (deduplicated)
//!  node CheckKey (HTTP ingress) ──────▶ Access::check_key ─▶ KeyGrant (cached at the node)
//!  RevokeKey ─▶ recent revocations ───▶ every heartbeat answer (nodes drop the key at once)
//!  every admin action ────────────────▶ Access::audit ─▶ audit log
//! ```
//!
//! The tenant `root` is the platform's: its `admin` keys manage every tenant, node and key.

use crate::config::SecurityConfig;
use skein_net::ticket::TicketSigner;
use skein_proto::{
    AdminRequest, AdminResponse, ErrorCode, KeyGrant, ModelInfo, Quota, RouteTicket, SignedTicket,
    TicketKey, UsageRecord, WireError, KEY_REVOCATION_WINDOW_MS, MAX_REVOKED_KEYS,
};
use skein_store::{month_bounds_utc, AuthError, Scope, Store, StoreError};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// The platform tenant.
pub const ROOT_TENANT: &str = "root";
/// How long a tenant's quota and month-to-date compute are reused before being read again.
const BUDGET_CACHE: Duration = Duration::from_secs(1);
/// Usage records accepted in one report.
pub const MAX_USAGE_BATCH: usize = 4096;

pub(crate) use skein_proto::time::unix_ms as now_ms;

fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

/// A store error as the caller sees it.
fn store_err(e: StoreError) -> WireError {
    match e {
        StoreError::NotFound(m) => err(ErrorCode::NotFound, m),
        StoreError::Conflict(m) => err(ErrorCode::Conflict, m),
        StoreError::Invalid(m) => err(ErrorCode::Malformed, m),
        other => err(ErrorCode::Internal, other.to_string()),
    }
}

/// Who sent a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The tenant it acts for.
    pub tenant: String,
    /// For the audit log: the key id, or `local`.
    pub actor: String,
    scopes: Vec<Scope>,
}

impl Caller {
    /// The caller of a coordinator started with `insecure_dev`, when it sends no key.
    fn local_root() -> Caller {
        Caller {
            tenant: ROOT_TENANT.into(),
            actor: "local".into(),
            scopes: vec![Scope::Admin],
        }
    }

    /// Whether the caller has `scope` (`admin` has every scope).
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }

    /// A `root` tenant admin: manages every tenant.
    pub fn is_platform_admin(&self) -> bool {
        self.tenant == ROOT_TENANT && self.allows(Scope::Admin)
    }

    /// `Forbidden` unless the caller has `scope`.
    pub fn require(&self, scope: Scope, to: &str) -> Result<(), WireError> {
        if self.allows(scope) {
            Ok(())
        } else {
            Err(err(
                ErrorCode::Forbidden,
                format!("this API key lacks the `{scope}` scope needed to {to}"),
            ))
        }
    }

    /// `Forbidden` unless the caller is a platform admin.
    pub fn require_platform(&self, to: &str) -> Result<(), WireError> {
        if self.is_platform_admin() {
            Ok(())
        } else {
            Err(err(
                ErrorCode::Forbidden,
                format!("only an `admin` key of the `{ROOT_TENANT}` tenant may {to}"),
            ))
        }
    }

    /// Whether the caller may see (list, call) `m`: its owner's, a shared model, or the
    /// platform admin.
    pub fn may_see(&self, m: &ModelInfo) -> bool {
        self.is_platform_admin() || m.owner == self.tenant || m.settings.shared
    }

    /// Whether the caller may change `m` (scale, traffic, new versions).
    pub fn may_change(&self, m: &ModelInfo) -> bool {
        self.is_platform_admin() || m.owner == self.tenant
    }

    /// The tenant a request about `asked` concerns: the caller's own, or any for the platform
    /// admin.
    fn tenant_for(&self, asked: Option<&str>) -> Result<String, WireError> {
        match asked {
            None => Ok(self.tenant.clone()),
            Some(t) if t == self.tenant => Ok(t.to_string()),
            Some(t) if self.is_platform_admin() => Ok(t.to_string()),
            Some(t) => Err(err(
                ErrorCode::Forbidden,
                format!("this key belongs to tenant `{}`, not `{t}`", self.tenant),
            )),
        }
    }
}

struct Budget {
    read_at: Instant,
    quota: Quota,
    month_used_us: u64,
}

/// The coordinator's security and metering state.
pub struct Access {
    store: Mutex<Store>,
    signer: Mutex<TicketSigner>,
    config: SecurityConfig,
    pricing: skein_store::Pricing,
    /// A new ticket key signs only after this long (every node has heard of it by then).
    activate_after: Duration,
    budgets: Mutex<HashMap<String, Budget>>,
    /// Key ids revoked in the last [`KEY_REVOCATION_WINDOW_MS`], oldest first, with when (ms
    /// since the epoch): named in every heartbeat answer so that nodes caching a key for their
    /// HTTP ingress drop it at once. At most [`MAX_REVOKED_KEYS`].
    revocations: Mutex<VecDeque<(u64, String)>>,
    /// Each bound peer's membership grant, as signed last: every heartbeat answer carries
    /// one, and it changes only once a [`skein_net::grant::MEMBERSHIP_STEP_MS`] step or with
    /// the signing key, so it is signed once per step, not once per heartbeat. At most
    /// [`MAX_CACHED_GRANTS`].
    membership_grants: Mutex<HashMap<String, CachedGrant>>,
}

/// A membership grant as signed: its expiry and key, to tell when it must be signed again.
struct CachedGrant {
    expires_unix_ms: u64,
    key_id: u32,
    grant: SignedTicket,
}

/// Most membership grants kept signed (one per node with a peer layer).
const MAX_CACHED_GRANTS: usize = 65_536;

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("insecure_dev", &self.config.insecure_dev)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Access {
    /// Open `security.sqlite` and the ticket keys in `dir`; make sure the `root` tenant exists.
    pub fn open(
        dir: &Path,
        config: SecurityConfig,
        pricing: skein_store::Pricing,
        heartbeat_interval: Duration,
    ) -> anyhow::Result<Access> {
        let mut store = Store::open(&dir.join("security.sqlite"))?;
        store.ensure_tenant(ROOT_TENANT, now_ms())?;
        let signer = TicketSigner::load_or_create(&dir.join("ticket-keys.json"), now_ms())?;
        // Revocations from before a restart that nodes may still hold in their key caches.
        let since = now_ms().saturating_sub(KEY_REVOCATION_WINDOW_MS);
        let mut recent: Vec<(u64, String)> = store
            .keys(None)?
            .into_iter()
            .filter_map(|k| k.revoked_ms.filter(|&ms| ms >= since).map(|ms| (ms, k.id)))
            .collect();
        recent.sort();
        let skip = recent.len().saturating_sub(MAX_REVOKED_KEYS);
        Ok(Access {
            revocations: Mutex::new(recent.into_iter().skip(skip).collect()),
            store: Mutex::new(store),
            signer: Mutex::new(signer),
            config,
            pricing,
            activate_after: heartbeat_interval * 3,
            budgets: Mutex::new(HashMap::new()),
            membership_grants: Mutex::new(HashMap::new()),
        })
    }

    /// Whether requests without credentials act as the platform admin.
    pub fn insecure(&self) -> bool {
        self.config.insecure_dev
    }

    /// Create a `root` admin key when no active one exists; returns it (shown once).
    pub fn bootstrap_admin_key(&self) -> anyhow::Result<Option<String>> {
        let mut store = lock(&self.store);
        let has_admin = store
            .keys(Some(ROOT_TENANT))?
            .iter()
            .any(|k| k.revoked_ms.is_none() && k.scopes.iter().any(|s| s == "admin"));
        if has_admin {
            return Ok(None);
        }
        let key = store.create_key(ROOT_TENANT, &[Scope::Admin], Some("bootstrap"), now_ms())?;
        store.append_audit(
            now_ms(),
            "local",
            ROOT_TENANT,
            "keys.create",
            &key.info.id,
            "ok",
        )?;
        Ok(Some(key.key))
    }

    /// Create an API key as the coordinator's own process (for `skein up` and tests).
    pub fn create_key_local(
        &self,
        tenant: &str,
        scopes: &[Scope],
        label: Option<&str>,
    ) -> Result<skein_proto::NewKey, WireError> {
        let mut store = lock(&self.store);
        store.ensure_tenant(tenant, now_ms()).map_err(store_err)?;
        let key = store
            .create_key(tenant, scopes, label, now_ms())
            .map_err(store_err)?;
        store
            .append_audit(now_ms(), "local", tenant, "keys.create", &key.info.id, "ok")
            .map_err(store_err)?;
        Ok(key)
    }

    /// Who sends `api_key` (`None` without one, unless the coordinator runs `insecure_dev`).
    pub fn authenticate(&self, api_key: Option<&str>) -> Result<Option<Caller>, WireError> {
        let Some(key) = api_key else {
            return Ok(self.config.insecure_dev.then(Caller::local_root));
        };
        match lock(&self.store).authenticate(key) {
            Ok(p) => Ok(Some(Caller {
                tenant: p.tenant,
                actor: p.key_id,
                scopes: p.scopes,
            })),
            Err(AuthError::Malformed) => Err(err(
                ErrorCode::Unauthenticated,
                "the API key is malformed (expected skn_<id>_<secret>)",
            )),
            Err(AuthError::UnknownKey) => {
                Err(err(ErrorCode::Unauthenticated, "the API key is not valid"))
            }
            Err(AuthError::Revoked) => Err(err(
                ErrorCode::Unauthenticated,
                "the API key has been revoked",
            )),
            Err(AuthError::Store(e)) => Err(store_err(e)),
            Err(other) => Err(err(ErrorCode::Internal, other.to_string())),
        }
    }

    /// Like [`authenticate`](Self::authenticate), but a request needs a caller.
    pub fn caller(&self, api_key: Option<&str>, to: &str) -> Result<Caller, WireError> {
        self.authenticate(api_key)?.ok_or_else(|| {
            err(
                ErrorCode::Unauthenticated,
                format!("an API key is needed to {to} (`skein keys create`, or the admin key `skein up` printed)"),
            )
        })
    }

    /// Append an audit line for `caller` doing `action` on `target` with `result`.
    pub fn audit<T>(
        &self,
        caller: &Caller,
        action: &str,
        target: &str,
        result: &Result<T, WireError>,
    ) {
        self.audit_as(&caller.actor, &caller.tenant, action, target, result);
    }

    /// Append an audit line for an actor that holds no API key (a node joining with a join
    /// token: `actor` names the node, the platform tenant owns the line).
    pub fn audit_as<T>(
        &self,
        actor: &str,
        tenant: &str,
        action: &str,
        target: &str,
        result: &Result<T, WireError>,
    ) {
        let outcome = match result {
            Ok(_) => "ok".to_string(),
            Err(e) => e.code.to_string(),
        };
        if let Err(e) =
            lock(&self.store).append_audit(now_ms(), actor, tenant, action, target, &outcome)
        {
            tracing::error!(error = %e, action, target, "could not append to the audit log");
        }
    }

    /// `CheckKey` from a node's HTTP ingress: what `api_key` may do, with its tenant's quota
    /// (`Unauthenticated` for an unknown, malformed or revoked key, or none where one is needed;
    /// `QuotaExceeded` over the monthly budget).
    pub fn check_key(&self, api_key: Option<&str>) -> Result<KeyGrant, WireError> {
        let caller = self.caller(api_key, "call models")?;
        let quota = self.check_budget(&caller.tenant, now_ms())?;
        Ok(KeyGrant {
            key_id: caller.actor.clone(),
            platform_admin: caller.is_platform_admin(),
            scopes: skein_store::scope_names(&caller.scopes),
            tenant: caller.tenant,
            max_rps: quota.max_rps,
            max_concurrent: quota.max_concurrent,
            offline_validity_ms: quota.offline_validity(),
        })
    }

    /// Ids of the keys revoked in the last [`KEY_REVOCATION_WINDOW_MS`] (newest
    /// [`MAX_REVOKED_KEYS`]), for heartbeat answers.
    pub fn revoked_keys(&self) -> Vec<String> {
        let since = now_ms().saturating_sub(KEY_REVOCATION_WINDOW_MS);
        let mut r = lock(&self.revocations);
        while r.front().is_some_and(|(ms, _)| *ms < since) {
            r.pop_front();
        }
        r.iter().map(|(_, id)| id.clone()).collect()
    }

    /// Sign a route ticket for `caller` to call `versions` of `model`, after checking the
    /// tenant's monthly compute budget.
    pub fn ticket(
        &self,
        caller: &Caller,
        model: &str,
        versions: Vec<String>,
    ) -> Result<SignedTicket, WireError> {
        let now = now_ms();
        let quota = self.check_budget(&caller.tenant, now)?;
        let ticket = RouteTicket {
            key_id: 0,
            tenant: caller.tenant.clone(),
            model: model.to_string(),
            versions,
            expires_unix_ms: now + self.config.ticket_ttl.as_millis() as u64,
            max_rps: quota.max_rps,
            max_concurrent: quota.max_concurrent,
            issued_unix_ms: now,
            offline_validity_ms: quota.offline_validity(),
        };
        Ok(lock(&self.signer).sign(ticket, now))
    }

    /// The tenant's quota; `QuotaExceeded` when its month-to-date compute is over budget.
    fn check_budget(&self, tenant: &str, now: u64) -> Result<Quota, WireError> {
        let mut budgets = lock(&self.budgets);
        let fresh = budgets
            .get(tenant)
            .is_some_and(|b| b.read_at.elapsed() < BUDGET_CACHE);
        let (start, next) = month_bounds_utc(now);
        if !fresh {
            let store = lock(&self.store);
            let quota = store
                .tenant(tenant)
                .map_err(store_err)?
                .map(|t| t.quota)
                .unwrap_or_default();
            let month_used_us = match quota.monthly_compute_us {
                Some(_) => store
                    .compute_us_between(tenant, start, next)
                    .map_err(store_err)?,
                None => 0,
            };
            if budgets.len() >= 4096 {
                budgets.clear();
            }
            budgets.insert(
                tenant.to_string(),
                Budget {
                    read_at: Instant::now(),
                    quota,
                    month_used_us,
                },
            );
        }
        let Some(b) = budgets.get(tenant) else {
            return Ok(Quota::default());
        };
        if let Some(limit) = b.quota.monthly_compute_us {
            if b.month_used_us >= limit {
                return Err(err(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "tenant `{tenant}` used {:.3} of its {:.3} compute seconds this month",
                        b.month_used_us as f64 / 1e6,
                        limit as f64 / 1e6
                    ),
                )
                .retry_after(next.saturating_sub(now)));
            }
        }
        Ok(b.quota.clone())
    }

    /// The ticket keys nodes must accept.
    pub fn ticket_keys(&self) -> Vec<TicketKey> {
        let mut signer = lock(&self.signer);
        if let Err(e) = signer.retire(now_ms(), self.retire_after_ms()) {
            tracing::warn!(error = %e, "could not save the ticket keys after retiring one");
        }
        signer.public_keys()
    }

    /// An artifact grant (issue 20): `peer_id` may fetch chunks of `sha256` from holders for
    /// `ttl_ms`, signed with the ticket keys nodes already trust.
    pub fn artifact_grant(&self, peer_id: &str, sha256: &str, ttl_ms: u64) -> SignedTicket {
        skein_net::grant::sign(&lock(&self.signer), peer_id, sha256, now_ms(), ttl_ms)
    }

    /// The membership grant of the node bound to `peer_id` (issue 20): any artifact, for
    /// LAN holders while the coordinator is unreachable (see `skein_net::grant::
    /// sign_membership` for its validity).
    pub fn membership_grant(&self, peer_id: &str) -> SignedTicket {
        self.membership_grant_at(peer_id, now_ms())
    }

    fn membership_grant_at(&self, peer_id: &str, now: u64) -> SignedTicket {
        let expires = skein_net::grant::membership_expiry(now);
        let signer = lock(&self.signer);
        let key_id = signer.active_key_id(now);
        let mut cache = lock(&self.membership_grants);
        if let Some(c) = cache.get(peer_id) {
            if c.expires_unix_ms == expires && c.key_id == key_id {
                return c.grant.clone();
            }
        }
        let grant = skein_net::grant::sign_membership(&signer, peer_id, now);
        drop(signer);
        if cache.len() >= MAX_CACHED_GRANTS {
            // Grants of earlier steps are signed again when asked for; should the table still
            // be full, it starts over.
            cache.retain(|_, c| c.expires_unix_ms == expires);
            if cache.len() >= MAX_CACHED_GRANTS {
                cache.clear();
            }
        }
        cache.insert(
            peer_id.to_string(),
            CachedGrant {
                expires_unix_ms: expires,
                key_id,
                grant: grant.clone(),
            },
        );
        grant
    }

    /// How long a superseded ticket key stays published: its last ticket's lifetime plus the
    /// clock skew nodes tolerate.
    fn retire_after_ms(&self) -> u64 {
        self.config.ticket_ttl.as_millis() as u64 + skein_net::ticket::CLOCK_SKEW_MS
    }

    /// Store usage records from `node` (written into each: the certificate's word, not the
    /// node's) of price class `node_class` (when the coordinator knows it; else the node's
    /// own); returns how many were new. Once this returns, the records are durable.
    pub fn record_usage(
        &self,
        node: &str,
        node_class: Option<&str>,
        mut records: Vec<UsageRecord>,
    ) -> Result<u32, WireError> {
        if records.len() > MAX_USAGE_BATCH {
            return Err(err(
                ErrorCode::Malformed,
                format!("at most {MAX_USAGE_BATCH} usage records per report"),
            ));
        }
        for r in &mut records {
            r.node = node.to_string();
            if let Some(class) = node_class {
                r.node_class = class.to_string();
            }
        }
        let new = lock(&self.store)
            .insert_usage(&records)
            .map_err(store_err)?;
        Ok(new as u32)
    }

    /// Requests and compute µs per (tenant, model) over all time, for `/metrics`.
    pub fn usage_totals(&self) -> Result<Vec<(String, String, u64, u64)>, WireError> {
        lock(&self.store).usage_totals().map_err(store_err)
    }

    /// Admin requests that need only this state (not the registry or membership).
    pub fn admin(&self, caller: &Caller, req: AdminRequest) -> Result<AdminResponse, WireError> {
        let now = now_ms();
        match req {
            AdminRequest::WhoAmI => Ok(AdminResponse::Identity {
                tenant: caller.tenant.clone(),
                key_id: caller.actor.clone(),
                scopes: skein_store::scope_names(&caller.scopes),
            }),
            AdminRequest::CreateTenant { name, quota } => {
                let r = caller.require_platform("create tenants").and_then(|()| {
                    lock(&self.store)
                        .create_tenant(&name, &quota, now)
                        .map_err(store_err)
                });
                self.audit(caller, "tenants.create", &name, &r);
                Ok(AdminResponse::Tenant(r?))
            }
            AdminRequest::ListTenants => {
                caller.require_platform("list tenants")?;
                Ok(AdminResponse::Tenants(
                    lock(&self.store).tenants().map_err(store_err)?,
                ))
            }
            AdminRequest::SetQuota { name, quota } => {
                let r = caller.require_platform("change quotas").and_then(|()| {
                    lock(&self.store)
                        .set_quota(&name, &quota)
                        .map_err(store_err)
                });
                lock(&self.budgets).remove(&name);
                self.audit(caller, "tenants.quota", &name, &r);
                Ok(AdminResponse::Tenant(r?))
            }
            AdminRequest::CreateKey {
                tenant,
                scopes,
                label,
            } => {
                let target = tenant.clone().unwrap_or_else(|| caller.tenant.clone());
                let r = (|| {
                    caller.require(Scope::Admin, "create API keys")?;
                    let tenant = caller.tenant_for(tenant.as_deref())?;
                    let scopes = scopes
                        .iter()
                        .map(|s| s.parse::<Scope>())
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(store_err)?;
                    lock(&self.store)
                        .create_key(&tenant, &scopes, label.as_deref(), now)
                        .map_err(store_err)
                })();
                let audited = r.as_ref().map(|k| k.info.id.clone());
                self.audit(
                    caller,
                    "keys.create",
                    audited.as_deref().unwrap_or(&target),
                    &r,
                );
                Ok(AdminResponse::NewKey(r?))
            }
            AdminRequest::ListKeys { tenant } => {
                caller.require(Scope::Admin, "list API keys")?;
                let tenant = match tenant {
                    None if caller.is_platform_admin() => None,
                    t => Some(caller.tenant_for(t.as_deref())?),
                };
                Ok(AdminResponse::Keys(
                    lock(&self.store)
                        .keys(tenant.as_deref())
                        .map_err(store_err)?,
                ))
            }
            AdminRequest::RevokeKey { id } => {
                let r = (|| {
                    caller.require(Scope::Admin, "revoke API keys")?;
                    let mut store = lock(&self.store);
                    let key = store
                        .key(&id)
                        .map_err(store_err)?
                        .filter(|k| caller.is_platform_admin() || k.tenant == caller.tenant)
                        .ok_or_else(|| err(ErrorCode::NotFound, format!("no API key `{id}`")))?;
                    store.revoke_key(&key.id, now).map_err(store_err)
                })();
                if let Ok(k) = &r {
                    let mut recent = lock(&self.revocations);
                    if recent.len() >= MAX_REVOKED_KEYS {
                        recent.pop_front();
                    }
                    recent.push_back((now, k.id.clone()));
                }
                self.audit(caller, "keys.revoke", &id, &r);
                Ok(AdminResponse::Key(r?))
            }
            AdminRequest::Usage(mut q) => {
                caller.require(Scope::ReadUsage, "read usage")?;
                q.tenant = match q.tenant.take() {
                    None if caller.is_platform_admin() => None,
                    t => Some(caller.tenant_for(t.as_deref())?),
                };
                Ok(AdminResponse::Usage(
                    lock(&self.store)
                        .usage(&q, &self.pricing)
                        .map_err(store_err)?,
                ))
            }
            AdminRequest::Audit(mut q) => {
                caller.require(Scope::Admin, "read the audit log")?;
                q.tenant = match q.tenant.take() {
                    None if caller.is_platform_admin() => None,
                    t => Some(caller.tenant_for(t.as_deref())?),
                };
                Ok(AdminResponse::Audit(
                    lock(&self.store).audit(&q).map_err(store_err)?,
                ))
            }
            AdminRequest::RotateTicketKey => {
                let r = caller
                    .require_platform("rotate the ticket key")
                    .and_then(|()| {
                        lock(&self.signer)
                            .rotate(
                                now,
                                self.activate_after.as_millis() as u64,
                                self.retire_after_ms(),
                            )
                            .map_err(|e| err(ErrorCode::Internal, e.to_string()))
                    });
                self.audit(caller, "tickets.rotate", "", &r);
                r?;
                Ok(AdminResponse::TicketKeys(self.ticket_keys()))
            }
            other => Err(err(
                ErrorCode::Malformed,
                format!("admin request not handled here: {other:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_net::grant::{membership_expiry, MEMBERSHIP_STEP_MS};

    fn access(dir: &Path) -> Access {
        Access::open(
            dir,
            SecurityConfig::default(),
            skein_store::Pricing::default(),
            Duration::from_secs(2),
        )
        .unwrap()
    }

    #[test]
    fn a_membership_grant_is_signed_once_per_step_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = access(dir.path());
        let step = now_ms() - now_ms() % MEMBERSHIP_STEP_MS;
        let first = a.membership_grant_at("peer-a", step + 1);
        // Later in the same step: the cached grant, byte for byte, as signing again gives.
        let again = a.membership_grant_at("peer-a", step + MEMBERSHIP_STEP_MS - 1);
        assert_eq!(again, first);
        assert_eq!(
            skein_net::grant::sign_membership(&lock(&a.signer), "peer-a", step + 5),
            first
        );
        // Each peer has its own grant.
        assert_ne!(a.membership_grant_at("peer-b", step + 1), first);
        // The next step: a later expiry, so a new grant.
        let next = a.membership_grant_at("peer-a", step + MEMBERSHIP_STEP_MS);
        assert_ne!(next, first);
        let expires = lock(&a.membership_grants)["peer-a"].expires_unix_ms;
        assert_eq!(expires, membership_expiry(step + MEMBERSHIP_STEP_MS));
        // A new signing key (active at once here): signed again, with it.
        let at = step + MEMBERSHIP_STEP_MS + 1;
        let new_key = lock(&a.signer).rotate(at, 0, 60_000).unwrap();
        a.membership_grant_at("peer-a", at);
        assert_eq!(lock(&a.membership_grants)["peer-a"].key_id, new_key);
        assert_ne!(lock(&a.membership_grants)["peer-a"].grant, next);
    }
}
