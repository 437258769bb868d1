//! `skein keys`, `skein tenants`, `skein usage`, `skein audit`, `skein join-token`,
//! `skein revoke-node`, `skein rotate-ticket-key`, `skein whoami`.

use crate::output::{json, table};
use crate::OutputFormat;
use skein_proto::{AdminRequest, AdminResponse, AuditQuery, Quota, UsageQuery};
use std::path::PathBuf;
use std::time::Duration;

async fn admin(profile: &Option<PathBuf>, req: AdminRequest) -> anyhow::Result<AdminResponse> {
    Ok(crate::client(profile).await?.admin(req).await?)
}

fn unexpected(r: AdminResponse) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from the coordinator: {r:?}")
}

pub(crate) use skein_proto::time::rfc3339;

use skein_proto::time::unix_ms as now_ms;

/// `--since 1h` (ago) as ms since the epoch.
fn ago(d: Option<Duration>) -> Option<u64> {
    d.map(|d| now_ms().saturating_sub(d.as_millis() as u64))
}

#[derive(Debug, clap::Args)]
pub(crate) struct KeysArgs {
    #[command(subcommand)]
    verb: KeysVerb,
}

#[derive(Debug, clap::Subcommand)]
enum KeysVerb {
    /// Create an API key; the key is printed this once.
    Create {
        /// Tenant (created by a platform admin first); your own when omitted.
        #[arg(long)]
        tenant: Option<String>,
        /// Scope, repeatable: admin, deploy, invoke, read-usage.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// A label for people.
        #[arg(long)]
        label: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// List API keys (never their secrets).
    List {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Revoke an API key: refused from now on.
    Revoke {
        /// Key id (`skein keys list`).
        id: String,
    },
}

pub(crate) async fn keys(args: KeysArgs, profile: &Option<PathBuf>) -> anyhow::Result<()> {
    match args.verb {
        KeysVerb::Create {
            tenant,
            scopes,
            label,
            output,
        } => match admin(
            profile,
            AdminRequest::CreateKey {
                tenant,
                scopes,
                label,
            },
        )
        .await?
        {
            AdminResponse::NewKey(k) => {
                if output == OutputFormat::Json {
                    json(&serde_json::json!({
                        "id": k.info.id,
                        "key": k.key,
                        "tenant": k.info.tenant,
                        "scopes": k.info.scopes,
                    }))
                } else {
                    println!("{}", k.key);
                    eprintln!(
                        "key {} for tenant {} ({}); it is not shown again",
                        k.info.id,
                        k.info.tenant,
                        k.info.scopes.join(", ")
                    );
                    Ok(())
                }
            }
            other => Err(unexpected(other)),
        },
        KeysVerb::List { tenant, output } => {
            match admin(profile, AdminRequest::ListKeys { tenant }).await? {
                AdminResponse::Keys(keys) if output == OutputFormat::Json => json(&keys),
                AdminResponse::Keys(keys) => {
                    let rows: Vec<Vec<String>> = keys
                        .iter()
                        .map(|k| {
                            vec![
                                k.id.clone(),
                                k.tenant.clone(),
                                k.scopes.join(","),
                                k.label.clone().unwrap_or_default(),
                                rfc3339(k.created_ms),
                                k.revoked_ms.map(rfc3339).unwrap_or_else(|| "-".into()),
                            ]
                        })
                        .collect();
                    table(
                        &["ID", "TENANT", "SCOPES", "LABEL", "CREATED", "REVOKED"],
                        &rows,
                    );
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        KeysVerb::Revoke { id } => match admin(profile, AdminRequest::RevokeKey { id }).await? {
            AdminResponse::Key(k) => {
                println!("revoked key {} of tenant {}", k.id, k.tenant);
                Ok(())
            }
            other => Err(unexpected(other)),
        },
    }
}

/// Quota flags, shared by `tenants create` and `tenants quota`.
#[derive(Debug, Clone, clap::Args)]
struct QuotaArgs {
    /// Requests per second, per node.
    #[arg(long)]
    max_rps: Option<u32>,
    /// Requests running at once, per node.
    #[arg(long)]
    max_concurrent: Option<u32>,
    /// Compute per calendar month (UTC), e.g. 10h, 90m.
    #[arg(long, value_parser = crate::parse_duration)]
    monthly_compute: Option<Duration>,
    /// How long the tenant's route tickets stay good at a node that cannot reach the
    /// coordinator, from issue, e.g. 15m, 30s (default 15m).
    #[arg(long, value_parser = crate::parse_duration)]
    offline_validity: Option<Duration>,
}

impl QuotaArgs {
    fn quota(&self) -> Quota {
        Quota {
            max_rps: self.max_rps,
            max_concurrent: self.max_concurrent,
            monthly_compute_us: self.monthly_compute.map(|d| d.as_micros() as u64),
            offline_validity_ms: self.offline_validity.map(|d| d.as_millis() as u64),
        }
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct TenantsArgs {
    #[command(subcommand)]
    verb: TenantsVerb,
}

#[derive(Debug, clap::Subcommand)]
enum TenantsVerb {
    /// Create a tenant (platform admin).
    Create {
        /// Name: 1 to 64 of a-z 0-9 - _ .
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// List tenants and their quotas (platform admin).
    List {
        #[arg(long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Replace a tenant's quota (omitted limits become unlimited, an omitted offline
    /// validity the default, 15m).
    Quota {
        /// Tenant.
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
}

fn limit<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

pub(crate) async fn tenants(args: TenantsArgs, profile: &Option<PathBuf>) -> anyhow::Result<()> {
    let (req, output) = match args.verb {
        TenantsVerb::Create { name, quota } => (
            AdminRequest::CreateTenant {
                name,
                quota: quota.quota(),
            },
            OutputFormat::Table,
        ),
        TenantsVerb::List { output } => (AdminRequest::ListTenants, output),
        TenantsVerb::Quota { name, quota } => (
            AdminRequest::SetQuota {
                name,
                quota: quota.quota(),
            },
            OutputFormat::Table,
        ),
    };
    let list = match admin(profile, req).await? {
        AdminResponse::Tenant(t) => vec![t],
        AdminResponse::Tenants(t) => t,
        other => return Err(unexpected(other)),
    };
    if output == OutputFormat::Json {
        return json(&list);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                limit(t.quota.max_rps),
                limit(t.quota.max_concurrent),
                limit(
                    t.quota
                        .monthly_compute_us
                        .map(|us| format!("{:.0}s", us as f64 / 1e6)),
                ),
                format!("{}s", t.quota.offline_validity() / 1000),
                rfc3339(t.created_ms),
            ]
        })
        .collect();
    table(
        &[
            "TENANT",
            "MAX_RPS",
            "MAX_CONCURRENT",
            "MONTHLY_COMPUTE",
            "OFFLINE_VALIDITY",
            "CREATED",
        ],
        &rows,
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub(crate) struct UsageArgs {
    /// Only this tenant (platform admins see every tenant by default).
    #[arg(long)]
    tenant: Option<String>,
    /// Only this model.
    #[arg(long)]
    model: Option<String>,
    /// From this long ago, e.g. 1h, 30m (default: all time).
    #[arg(long, value_parser = crate::parse_duration)]
    since: Option<Duration>,
    /// Until this long ago (default: now).
    #[arg(long, value_parser = crate::parse_duration)]
    until: Option<Duration>,
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
}

pub(crate) async fn usage(args: UsageArgs, profile: &Option<PathBuf>) -> anyhow::Result<()> {
    let q = UsageQuery {
        tenant: args.tenant,
        model: args.model,
        since_ms: ago(args.since),
        until_ms: ago(args.until),
    };
    let rows = crate::client(profile).await?.usage(q).await?;
    if args.output == OutputFormat::Json {
        return json(&rows);
    }
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|u| {
            vec![
                u.tenant.clone(),
                u.model.clone(),
                u.version.clone(),
                u.requests.to_string(),
                format!("{:.3}", u.compute_us as f64 / 1e6),
                u.cold_starts.to_string(),
                format!("{:.6}", u.cost),
            ]
        })
        .collect();
    table(
        &[
            "TENANT",
            "MODEL",
            "VERSION",
            "REQUESTS",
            "COMPUTE_S",
            "COLD",
            "COST",
        ],
        &table_rows,
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub(crate) struct AuditArgs {
    /// Only this tenant's actions.
    #[arg(long)]
    tenant: Option<String>,
    /// Only this action, e.g. keys.create, models.deploy.
    #[arg(long)]
    action: Option<String>,
    /// From this long ago, e.g. 1h.
    #[arg(long, value_parser = crate::parse_duration)]
    since: Option<Duration>,
    /// At most this many lines, newest first.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
}

pub(crate) async fn audit(args: AuditArgs, profile: &Option<PathBuf>) -> anyhow::Result<()> {
    let q = AuditQuery {
        tenant: args.tenant,
        since_ms: ago(args.since),
        until_ms: None,
        action: args.action,
        limit: args.limit,
    };
    match admin(profile, AdminRequest::Audit(q)).await? {
        AdminResponse::Audit(lines) if args.output == OutputFormat::Json => json(&lines),
        AdminResponse::Audit(lines) => {
            let rows: Vec<Vec<String>> = lines
                .iter()
                .map(|a| {
                    vec![
                        rfc3339(a.ts_ms),
                        a.actor.clone(),
                        a.tenant.clone(),
                        a.action.clone(),
                        a.target.clone(),
                        a.result.clone(),
                    ]
                })
                .collect();
            table(
                &["TIME", "ACTOR", "TENANT", "ACTION", "TARGET", "RESULT"],
                &rows,
            );
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct JoinTokenArgs {
    /// Valid this long (1 s to 30 days), e.g. 10m, 1h, 24h.
    #[arg(long, value_parser = parse_ttl, default_value = "1h")]
    ttl: Duration,
    /// Nodes it admits (1 to 100 000): one token for a fleet of devices.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    uses: u32,
    /// Labels every node it admits gets, KEY=VALUE, repeatable (e.g. --label site=berlin-3);
    /// they override the node's own labels of the same keys.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Output format: the token alone (table), or `{"token", "expires_ms", "uses", "labels"}`
    /// (json).
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label `{s}` is not KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

/// The longest a join token may be valid (the coordinator's limit).
const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);

/// A join token's lifetime: refused outside 1 s..=30 days rather than cut to fit (the token
/// would expire long before its holder expects).
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = crate::parse_duration(s)?;
    if d < Duration::from_secs(1) || d > MAX_JOIN_TOKEN_TTL {
        return Err(format!(
            "`{s}`: a join token is valid from 1s to 30 days (720h)"
        ));
    }
    Ok(d)
}

pub(crate) async fn join_token(
    args: JoinTokenArgs,
    profile: &Option<PathBuf>,
) -> anyhow::Result<()> {
    // Whole seconds, rounded up: `1500ms` is 2 s, never less than asked.
    let ttl_s = args.ttl.as_millis().div_ceil(1000) as u64;
    let req = AdminRequest::MintJoinToken {
        ttl_s,
        uses: args.uses,
        labels: args.labels.into_iter().collect(),
    };
    match admin(profile, req).await? {
        AdminResponse::JoinToken {
            token,
            expires_ms,
            uses,
            labels,
        } => {
            if args.output == OutputFormat::Json {
                return json(&serde_json::json!({
                    "token": token,
                    "expires_ms": expires_ms,
                    "uses": uses,
                    "labels": labels,
                }));
            }
            println!("{token}");
            let admits = if uses == 1 {
                "single use".to_string()
            } else {
                format!("admits {uses} nodes")
            };
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let labelled = if labels.is_empty() {
                String::new()
            } else {
                format!(", labels {}", labels.join(" "))
            };
            eprintln!("{admits}{labelled}, valid until {}", rfc3339(expires_ms));
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct RevokeNodeArgs {
    /// Node id (`skein nodes`).
    node_id: String,
}

pub(crate) async fn revoke_node(
    args: RevokeNodeArgs,
    profile: &Option<PathBuf>,
) -> anyhow::Result<()> {
    match admin(
        profile,
        AdminRequest::RevokeNode {
            node_id: args.node_id.clone(),
        },
    )
    .await?
    {
        AdminResponse::Done => {
            println!(
                "revoked node {}: disconnected, and refused for good (only a fresh data dir, a new identity, can join again)",
                args.node_id
            );
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

pub(crate) async fn rotate_ticket_key(profile: &Option<PathBuf>) -> anyhow::Result<()> {
    match admin(profile, AdminRequest::RotateTicketKey).await? {
        AdminResponse::TicketKeys(keys) => {
            let ids: Vec<String> = keys.iter().map(|k| k.id.to_string()).collect();
            println!(
                "new route-ticket key {} published; it signs once every node has it; keys now: {}",
                ids.last().map(String::as_str).unwrap_or("-"),
                ids.join(", ")
            );
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

pub(crate) async fn whoami(profile: &Option<PathBuf>) -> anyhow::Result<()> {
    match admin(profile, AdminRequest::WhoAmI).await? {
        AdminResponse::Identity {
            tenant,
            key_id,
            scopes,
        } => {
            println!(
                "tenant {tenant}, key {key_id}, scopes {}",
                scopes.join(", ")
            );
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}
