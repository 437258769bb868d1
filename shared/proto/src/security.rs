//! Messages of tenancy, security and metering: the control-request envelope with its API key,
//! route tickets, usage records, and the admin requests on tenants, keys, usage and audit.
//!
//! The signing and checking of tickets lives in `skein-net` (it needs a crypto library); here
//! are only the values that cross the wire.

use crate::msg::{CtlRequest, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Every control request travels in an envelope that names who sends it. Nodes send their own
/// requests (join, heartbeat, fetch, usage) with `api_key: None` and are known by their
/// certificate; clients send an API key (`skn_<id>_<secret>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CtlEnvelope {
    /// The caller's API key, if any.
    pub api_key: Option<String>,
    /// The request.
    pub request: CtlRequest,
}

impl CtlEnvelope {
    /// `request` sent with `api_key`.
    pub fn new(request: CtlRequest, api_key: Option<String>) -> CtlEnvelope {
        CtlEnvelope { api_key, request }
    }

    /// `request` sent without a key (nodes: their certificate says who they are).
    pub fn anonymous(request: CtlRequest) -> CtlEnvelope {
        CtlEnvelope {
            api_key: None,
            request,
        }
    }
}

/// What a coordinator grants in a route ticket: who may call which model versions until when,
/// and the tenant's limits the node enforces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTicket {
    /// The signing key's id (nodes hold several during a rotation).
    pub key_id: u32,
    /// The tenant the calls are billed to.
    pub tenant: String,
    /// The model.
    pub model: String,
    /// The versions allowed; never empty.
    pub versions: Vec<String>,
    /// Not valid after this instant, ms since the Unix epoch.
    pub expires_unix_ms: u64,
    /// The tenant's request rate limit per node, requests per second (`None`: unlimited).
    pub max_rps: Option<u32>,
    /// The tenant's concurrent request limit per node (`None`: unlimited).
    pub max_concurrent: Option<u32>,
    /// When the coordinator issued it, ms since the Unix epoch (issue 20: appended).
    pub issued_unix_ms: u64,
    /// How long after `issued_unix_ms` a node that cannot reach its coordinator (offline)
    /// still accepts it, ms: the tenant's offline validity ([`Quota::offline_validity_ms`]).
    /// Online, `expires_unix_ms` applies (issue 20: appended).
    pub offline_validity_ms: u64,
}

/// A route ticket as sent: the bincode bytes of a [`RouteTicket`] and their Ed25519
/// signature. Nodes check the signature over exactly these bytes before decoding them.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTicket {
    /// bincode of a [`RouteTicket`].
    pub body: Vec<u8>,
    /// Ed25519 signature of `body`.
    pub signature: Vec<u8>,
}

impl std::fmt::Debug for SignedTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedTicket")
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// A public key that signs route tickets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketKey {
    /// Key id, as in [`RouteTicket::key_id`].
    pub id: u32,
    /// Ed25519 public key (32 bytes).
    pub public: Vec<u8>,
}

/// One served request, as the node meters it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// The record's unique id (nodes make it random): the ledger keeps a record once however
    /// often it is sent.
    pub id: String,
    /// The caller's request id.
    pub request_id: u64,
    /// Tenant billed.
    pub tenant: String,
    /// Model.
    pub model: String,
    /// Version that served.
    pub version: String,
    /// Node that served.
    pub node: NodeId,
    /// Its `device_class` label (`cpu` when it has none): prices are per class.
    pub node_class: String,
    /// Compute time, µs.
    pub compute_us: u64,
    /// Time queued, µs.
    pub queue_us: u64,
    /// Request payload bytes.
    pub bytes_in: u64,
    /// Response payload bytes.
    pub bytes_out: u64,
    /// Whether the request waited for a model load.
    pub cold_start: bool,
    /// When it finished, ms since the Unix epoch.
    pub ts_ms: u64,
}

/// A tenant's limits. `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Quota {
    /// Requests per second, per node.
    pub max_rps: Option<u32>,
    /// Requests running at once, per node.
    pub max_concurrent: Option<u32>,
    /// Compute per calendar month (UTC), µs, over the whole mesh.
    pub monthly_compute_us: Option<u64>,
    /// How long the tenant's route tickets (and API keys cached at a node's HTTP ingress) stay
    /// good at a node that cannot reach the coordinator, ms from issue; `None`:
    /// [`DEFAULT_OFFLINE_VALIDITY_MS`] (issue 20: appended).
    pub offline_validity_ms: Option<u64>,
}

/// The offline validity of a tenant that sets none: 15 minutes.
pub const DEFAULT_OFFLINE_VALIDITY_MS: u64 = 15 * 60 * 1000;

impl Quota {
    /// The offline validity in force, ms (the default when unset).
    pub fn offline_validity(&self) -> u64 {
        self.offline_validity_ms
            .unwrap_or(DEFAULT_OFFLINE_VALIDITY_MS)
    }
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantInfo {
    /// Name.
    pub name: String,
    /// Created, ms since the Unix epoch.
    pub created_ms: u64,
    /// Limits.
    pub quota: Quota,
}

/// An API key as listed (the secret is shown once, at creation, and never again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// Key id (the part after `skn_`).
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Scopes: `admin`, `deploy`, `invoke`, `read-usage`.
    pub scopes: Vec<String>,
    /// A label for people.
    pub label: Option<String>,
    /// Created, ms since the Unix epoch.
    pub created_ms: u64,
    /// Revoked, ms since the Unix epoch.
    pub revoked_ms: Option<u64>,
}

/// A new API key: its listing and the key itself, shown this once.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewKey {
    /// What is listed.
    pub info: KeyInfo,
    /// `skn_<id>_<secret>`.
    pub key: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log.
    pub seq: u64,
    /// When, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Who: an API key id, `node:<id>`, or `local` (the coordinator's own process).
    pub actor: String,
    /// The actor's tenant.
    pub tenant: String,
    /// What, e.g. `deploy`, `keys.create`.
    pub action: String,
    /// On what, e.g. `ppocr_cls:2`.
    pub target: String,
    /// `ok`, or the error code.
    pub result: String,
}

/// Which audit lines to read.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
// Unknown fields are refused: the admin API reads this from a query string, where a
// misspelt filter must not silently widen the answer (bincode is unaffected).
#[serde(default, deny_unknown_fields)]
pub struct AuditQuery {
    /// Only this tenant's (forced to the caller's own unless they are a platform admin).
    pub tenant: Option<String>,
    /// From this instant on, ms since the Unix epoch.
    pub since_ms: Option<u64>,
    /// Before this instant.
    pub until_ms: Option<u64>,
    /// Only this action.
    pub action: Option<String>,
    /// At most this many, newest first (0: 100; at most 10 000).
    pub limit: u32,
}

/// Which usage to sum.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
// Unknown fields are refused: the admin API reads this from a query string, where a
// misspelt filter must not silently widen the answer (bincode is unaffected).
#[serde(default, deny_unknown_fields)]
pub struct UsageQuery {
    /// Only this tenant (forced to the caller's own unless they are a platform admin).
    pub tenant: Option<String>,
    /// Only this model.
    pub model: Option<String>,
    /// From this instant on (inclusive), ms since the Unix epoch.
    pub since_ms: Option<u64>,
    /// Before this instant (exclusive).
    pub until_ms: Option<u64>,
}

/// Usage and cost of one tenant's model version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    /// Tenant.
    pub tenant: String,
    /// Model.
    pub model: String,
    /// Version.
    pub version: String,
    /// Requests served.
    pub requests: u64,
    /// Compute, µs.
    pub compute_us: u64,
    /// Time queued, µs.
    pub queue_us: u64,
    /// Request bytes.
    pub bytes_in: u64,
    /// Response bytes.
    pub bytes_out: u64,
    /// Requests that waited for a load.
    pub cold_starts: u64,
    /// Price per node class × compute seconds + price per request × requests.
    pub cost: f64,
}

/// Admin requests of the security and metering surface (inside [`CtlRequest::Admin`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AdminRequest {
    /// Create a tenant (platform admin).
    CreateTenant {
        /// Name: 1 to 64 of `a-z 0-9 - _ .`.
        name: String,
        /// Limits.
        quota: Quota,
    },
    /// List tenants (platform admin).
    ListTenants,
    /// Change a tenant's limits (platform admin).
    SetQuota {
        /// Tenant.
        name: String,
        /// The new limits.
        quota: Quota,
    },
    /// Create an API key (`admin` scope; another tenant's only for a platform admin).
    CreateKey {
        /// Tenant; the caller's own when `None`.
        tenant: Option<String>,
        /// Scopes.
        scopes: Vec<String>,
        /// A label for people.
        label: Option<String>,
    },
    /// List API keys (`admin` scope).
    ListKeys {
        /// Tenant; the caller's own when `None` (every tenant for a platform admin).
        tenant: Option<String>,
    },
    /// Revoke an API key (`admin` scope): refused at once from then on.
    RevokeKey {
        /// Key id.
        id: String,
    },
    /// Usage and cost (`read-usage` scope).
    Usage(UsageQuery),
    /// The audit log (`admin` scope).
    Audit(AuditQuery),
    /// Mint a join token (platform admin).
    MintJoinToken {
        /// Valid this long, s (0: one hour).
        ttl_s: u64,
        /// Nodes it admits (0: one); appended for fleets.
        uses: u32,
        /// Labels every node it admits gets, overriding the node's own for these keys
        /// (e.g. `site`); appended for fleets.
        labels: BTreeMap<String, String>,
    },
    /// Revoke a node: its certificate is refused and its connection closed (platform admin).
    RevokeNode {
        /// Node id.
        node_id: NodeId,
    },
    /// Start signing route tickets with a new key; the old one stays valid for the tickets
    /// already issued (platform admin).
    RotateTicketKey,
    /// Who the caller is.
    WhoAmI,
}

/// Answers to [`AdminRequest`]s (inside [`crate::CtlResponse::Admin`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AdminResponse {
    /// A tenant.
    Tenant(TenantInfo),
    /// Tenants.
    Tenants(Vec<TenantInfo>),
    /// A new key, shown once.
    NewKey(NewKey),
    /// Keys.
    Keys(Vec<KeyInfo>),
    /// A key after a change.
    Key(KeyInfo),
    /// Usage rows.
    Usage(Vec<UsageRow>),
    /// Audit lines, newest first.
    Audit(Vec<AuditEntry>),
    /// A join token.
    JoinToken {
        /// The token text.
        token: String,
        /// Not valid after, ms since the Unix epoch.
        expires_ms: u64,
        /// Nodes it admits; appended for fleets.
        uses: u32,
        /// Labels it gives the nodes it admits; appended for fleets.
        labels: BTreeMap<String, String>,
    },
    /// Done, nothing to show.
    Done,
    /// The ticket keys now published (newest last).
    TicketKeys(Vec<TicketKey>),
    /// The caller.
    Identity {
        /// Tenant.
        tenant: String,
        /// Key id (`local` without a key in insecure mode).
        key_id: String,
        /// Scopes.
        scopes: Vec<String>,
    },
}
