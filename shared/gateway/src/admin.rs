//! The admin REST API under `/admin/v1`: the `skein/ctl` admin requests over HTTP + JSON, each
//! sent with the caller's API key (`Authorization: Bearer ...`), so any language and `curl` can
//! deploy models, manage tenants and keys, and read usage and the audit log.
//!
//! | method and path | control request |
//! |---|---|
//! | `GET /admin/v1/whoami` | `Admin(WhoAmI)` |
//! | `GET /admin/v1/models` | `ListModels` |
//! | `POST /admin/v1/models/{name}[?version=V&<settings>]`, body: ONNX bytes | `Deploy` |
//! | `PATCH /admin/v1/models/{name}[/versions/{v}]`, body: settings patch | `Scale` |
//! | `GET`/`PUT /admin/v1/models/{name}/traffic`, body: `[{version, weight}]` | `GetTraffic`/`SetTraffic` |
//! | `GET /admin/v1/nodes`, `DELETE /admin/v1/nodes/{id}` | `ListNodes`, `Admin(RevokeNode)` |
//! | `GET`/`POST /admin/v1/tenants`, `PUT /admin/v1/tenants/{name}/quota` | `Admin(ListTenants/CreateTenant/SetQuota)` |
//! | `GET`/`POST /admin/v1/keys`, `DELETE /admin/v1/keys/{id}` | `Admin(ListKeys/CreateKey/RevokeKey)` |
//! | `GET /admin/v1/usage?tenant&model&since_ms&until_ms` | `Admin(Usage)` |
//! | `GET /admin/v1/audit?tenant&action&since_ms&until_ms&limit` | `Admin(Audit)` |
//! | `POST /admin/v1/join-tokens`, body `{ttl_s, uses, labels}` | `Admin(MintJoinToken)` |
//! | `POST /admin/v1/ticket-keys/rotate` | `Admin(RotateTicketKey)` |

use crate::state::{api_key, read_body, Shared};
use crate::GatewayError;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use skein_proto::{
    Accelerator, AdminRequest, AdminResponse, AuditQuery, CtlRequest, CtlResponse,
    DeploymentSettings, Quota, SettingsPatch, UsageQuery, VersionWeight,
};

/// The admin routes (merged into the main router).
pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/admin/v1/whoami", get(whoami))
        .route("/admin/v1/models", get(models))
        .route("/admin/v1/models/{name}", post(deploy).patch(scale))
        .route("/admin/v1/models/{name}/versions/{version}", patch(scale_v))
        .route(
            "/admin/v1/models/{name}/traffic",
            get(traffic).put(set_traffic),
        )
        .route("/admin/v1/nodes", get(nodes))
        .route("/admin/v1/nodes/{id}", delete(revoke_node))
        .route("/admin/v1/tenants", get(tenants).post(create_tenant))
        .route("/admin/v1/tenants/{name}/quota", put(set_quota))
        .route("/admin/v1/keys", get(keys).post(create_key))
        .route("/admin/v1/keys/{id}", delete(revoke_key))
        .route("/admin/v1/usage", get(usage))
        .route("/admin/v1/audit", get(audit))
        .route("/admin/v1/join-tokens", post(join_token))
        .route("/admin/v1/ticket-keys/rotate", post(rotate))
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Result<Response, GatewayError> {
    let body = serde_json::to_vec(v).map_err(|e| GatewayError::Internal(e.to_string()))?;
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

fn done(r: Result<Response, GatewayError>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, GatewayError> {
    p.map(|Path(t)| t)
        .map_err(|e| GatewayError::BadRequest(e.body_text()))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, GatewayError> {
    q.map(|Query(t)| t)
        .map_err(|e| GatewayError::BadRequest(e.body_text()))
}

/// The caller's key, checked with the coordinator before a body is read: a caller without
/// valid credentials learns nothing (401) and uploads nothing.
async fn authorized(
    gw: &Shared,
    headers: &HeaderMap,
) -> Result<Option<skein_client::ApiKey>, GatewayError> {
    Ok(authorized_scopes(gw, headers).await?.0)
}

/// [`authorized`], with the key's scopes.
async fn authorized_scopes(
    gw: &Shared,
    headers: &HeaderMap,
) -> Result<(Option<skein_client::ApiKey>, Vec<String>), GatewayError> {
    let key = api_key(headers)?;
    match gw
        .client
        .admin_as(AdminRequest::WhoAmI, key.as_ref())
        .await?
    {
        AdminResponse::Identity { scopes, .. } => Ok((key, scopes)),
        other => Err(unexpected(other)),
    }
}

/// A JSON request body (bounded like every body) from an authorized caller, or a 400 naming
/// what is wrong.
async fn body_json<T: DeserializeOwned>(
    gw: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, GatewayError> {
    authorized(gw, headers).await?;
    let bytes = read_body(&gw.config, headers, body).await?;
    strict_json(&bytes)
}

/// `T` from JSON, refusing (400) any field that `T` does not have, at any depth: serde skips
/// unknown fields by default, so a misspelt setting or limit (`max_rsp`) would be dropped
/// without a word and the default used instead.
fn strict_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, GatewayError> {
    let bad = |e: serde_json::Error| GatewayError::BadRequest(format!("request body: {e}"));
    let mut unknown = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v: T = serde_ignored::deserialize(&mut de, |path| unknown.push(format!("`{path}`")))
        .map_err(bad)?;
    de.end().map_err(bad)?;
    if !unknown.is_empty() {
        return Err(GatewayError::BadRequest(format!(
            "request body: unknown field {} (see docs/admin-api.md for the fields)",
            unknown.join(", ")
        )));
    }
    Ok(v)
}

async fn ctl(
    gw: &Shared,
    headers: &HeaderMap,
    req: CtlRequest,
) -> Result<CtlResponse, GatewayError> {
    let key = api_key(headers)?;
    Ok(gw.client.control_as(&req, key.as_ref()).await?)
}

async fn admin(
    gw: &Shared,
    headers: &HeaderMap,
    req: AdminRequest,
) -> Result<AdminResponse, GatewayError> {
    let key = api_key(headers)?;
    Ok(gw.client.admin_as(req, key.as_ref()).await?)
}

fn unexpected<T: std::fmt::Debug>(r: T) -> GatewayError {
    GatewayError::Internal(format!("unexpected answer from the coordinator: {r:?}"))
}

/// Send `req` and answer its admin response as JSON with `status`.
async fn admin_json(
    gw: &Shared,
    headers: &HeaderMap,
    req: AdminRequest,
    status: StatusCode,
) -> Result<Response, GatewayError> {
    match admin(gw, headers, req).await? {
        AdminResponse::Identity {
            tenant,
            key_id,
            scopes,
        } => json(
            status,
            &serde_json::json!({"tenant": tenant, "key_id": key_id, "scopes": scopes}),
        ),
        AdminResponse::Tenant(t) => json(status, &t),
        AdminResponse::Tenants(t) => json(status, &t),
        AdminResponse::NewKey(k) => json(
            status,
            &serde_json::json!({"id": k.info.id, "key": k.key, "tenant": k.info.tenant, "scopes": k.info.scopes}),
        ),
        AdminResponse::Keys(k) => json(status, &k),
        AdminResponse::Key(k) => json(status, &k),
        AdminResponse::Usage(u) => json(status, &u),
        AdminResponse::Audit(a) => json(status, &a),
        AdminResponse::JoinToken {
            token,
            expires_ms,
            uses,
            labels,
        } => json(
            status,
            &serde_json::json!({"token": token, "expires_ms": expires_ms, "uses": uses, "labels": labels}),
        ),
        AdminResponse::TicketKeys(k) => json(status, &k.iter().map(|k| k.id).collect::<Vec<_>>()),
        AdminResponse::Done => Ok(StatusCode::NO_CONTENT.into_response()),
        other => Err(unexpected(other)),
    }
}

async fn whoami(State(gw): State<Shared>, headers: HeaderMap) -> Response {
    done(admin_json(&gw, &headers, AdminRequest::WhoAmI, StatusCode::OK).await)
}

async fn models(State(gw): State<Shared>, headers: HeaderMap) -> Response {
    done(
        async {
            match ctl(&gw, &headers, CtlRequest::ListModels).await? {
                CtlResponse::Models(m) => json(StatusCode::OK, &m),
                other => Err(unexpected(other)),
            }
        }
        .await,
    )
}

/// The query of a deploy: the version, and every deployment setting under the name of its
/// `DeploymentSettings` field (`regions` comma-separated). Unknown parameters are refused (400):
/// a setting that was silently dropped would deploy with the default instead, e.g. a model
/// meant for one region placed anywhere.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DeployParams {
    version: Option<String>,
    min_replicas: Option<u32>,
    max_replicas: Option<u32>,
    idle_timeout_ms: Option<u64>,
    max_concurrency: Option<u32>,
    max_batch_size: Option<u32>,
    max_queue_delay_us: Option<u64>,
    memory_estimate: Option<u64>,
    timeout_ms: Option<u64>,
    /// Comma-separated; empty: any region.
    regions: Option<String>,
    device_class: Option<String>,
    shared: Option<bool>,
    accelerator: Option<Accelerator>,
}

impl DeployParams {
    /// The settings the model is deployed with: the defaults, with what the query names.
    fn settings(&self) -> DeploymentSettings {
        SettingsPatch {
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            idle_timeout_ms: self.idle_timeout_ms,
            max_concurrency: self.max_concurrency,
            max_batch_size: self.max_batch_size,
            max_queue_delay_us: self.max_queue_delay_us,
            memory_estimate: self.memory_estimate,
            timeout_ms: self.timeout_ms,
            regions: self.regions.as_ref().map(|r| {
                r.split(',')
                    .map(str::trim)
                    .filter(|r| !r.is_empty())
                    .map(str::to_string)
                    .collect()
            }),
            device_class: self.device_class.clone(),
            shared: self.shared,
            accelerator: self.accelerator,
        }
        .apply(&DeploymentSettings::default())
    }
}

async fn deploy(
    State(gw): State<Shared>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    params: Result<Query<DeployParams>, QueryRejection>,
    body: Body,
) -> Response {
    done(
        async {
            let name = path(name)?;
            let p = query(params)?;
            // Only a key that may deploy gets to upload (up to the body limit) at all.
            let (key, scopes) = authorized_scopes(&gw, &headers).await?;
            if !scopes.iter().any(|s| s == "deploy" || s == "admin") {
                return Err(GatewayError::Mesh(skein_client::Error::Remote(
                    skein_proto::WireError::new(
                        skein_proto::ErrorCode::Forbidden,
                        "this API key lacks the `deploy` scope needed to deploy models",
                    ),
                )));
            }
            let settings = p.settings();
            // Impossible settings are refused before the body is read, with the coordinator's
            // own answer to them.
            if let Some(problem) = settings.problem() {
                return Err(GatewayError::Mesh(skein_client::Error::Remote(
                    skein_proto::WireError::new(
                        skein_proto::ErrorCode::Malformed,
                        format!("invalid settings: {problem}"),
                    ),
                )));
            }
            let bytes = read_body(&gw.config, &headers, body).await?;
            let info = gw
                .client
                .deploy_as(&name, p.version.as_deref(), &bytes, settings, key.as_ref())
                .await?;
            json(StatusCode::CREATED, &info)
        }
        .await,
    )
}

async fn scale_model(
    gw: &Shared,
    headers: &HeaderMap,
    name: String,
    version: Option<String>,
    body: Body,
) -> Result<Response, GatewayError> {
    let patch: SettingsPatch = body_json(gw, headers, body).await?;
    match ctl(
        gw,
        headers,
        CtlRequest::Scale {
            name,
            version,
            patch,
        },
    )
    .await?
    {
        CtlResponse::Deployed(m) => json(StatusCode::OK, &m),
        other => Err(unexpected(other)),
    }
}

async fn scale(
    State(gw): State<Shared>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    body: Body,
) -> Response {
    done(async { scale_model(&gw, &headers, path(name)?, None, body).await }.await)
}

async fn scale_v(
    State(gw): State<Shared>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Response {
    done(
        async {
            let (name, version) = path(p)?;
            scale_model(&gw, &headers, name, Some(version), body).await
        }
        .await,
    )
}

async fn traffic(
    State(gw): State<Shared>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    done(
        async {
            let name = path(name)?;
            match ctl(&gw, &headers, CtlRequest::GetTraffic { name }).await? {
                CtlResponse::Traffic(w) => json(StatusCode::OK, &w),
                other => Err(unexpected(other)),
            }
        }
        .await,
    )
}

async fn set_traffic(
    State(gw): State<Shared>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    body: Body,
) -> Response {
    done(
        async {
            let name = path(name)?;
            let weights: Vec<VersionWeight> = body_json(&gw, &headers, body).await?;
            match ctl(&gw, &headers, CtlRequest::SetTraffic { name, weights }).await? {
                CtlResponse::Traffic(w) => json(StatusCode::OK, &w),
                other => Err(unexpected(other)),
            }
        }
        .await,
    )
}

async fn nodes(State(gw): State<Shared>, headers: HeaderMap) -> Response {
    done(
        async {
            match ctl(&gw, &headers, CtlRequest::ListNodes).await? {
                CtlResponse::Nodes(n) => json(StatusCode::OK, &n),
                other => Err(unexpected(other)),
            }
        }
        .await,
    )
}

async fn revoke_node(
    State(gw): State<Shared>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    done(
        async {
            let node_id = path(id)?;
            admin_json(
                &gw,
                &headers,
                AdminRequest::RevokeNode { node_id },
                StatusCode::OK,
            )
            .await
        }
        .await,
    )
}

async fn tenants(State(gw): State<Shared>, headers: HeaderMap) -> Response {
    done(admin_json(&gw, &headers, AdminRequest::ListTenants, StatusCode::OK).await)
}

#[derive(Debug, Deserialize)]
struct NewTenant {
    name: String,
    #[serde(default)]
    quota: Quota,
}

async fn create_tenant(State(gw): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    done(
        async {
            let t: NewTenant = body_json(&gw, &headers, body).await?;
            let req = AdminRequest::CreateTenant {
                name: t.name,
                quota: t.quota,
            };
            admin_json(&gw, &headers, req, StatusCode::CREATED).await
        }
        .await,
    )
}

async fn set_quota(
    State(gw): State<Shared>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    body: Body,
) -> Response {
    done(
        async {
            let name = path(name)?;
            let quota: Quota = body_json(&gw, &headers, body).await?;
            admin_json(
                &gw,
                &headers,
                AdminRequest::SetQuota { name, quota },
                StatusCode::OK,
            )
            .await
        }
        .await,
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFilter {
    tenant: Option<String>,
}

async fn keys(
    State(gw): State<Shared>,
    headers: HeaderMap,
    q: Result<Query<TenantFilter>, QueryRejection>,
) -> Response {
    done(
        async {
            let tenant = query(q)?.tenant;
            admin_json(
                &gw,
                &headers,
                AdminRequest::ListKeys { tenant },
                StatusCode::OK,
            )
            .await
        }
        .await,
    )
}

#[derive(Debug, Deserialize)]
struct NewKey {
    tenant: Option<String>,
    scopes: Vec<String>,
    label: Option<String>,
}

async fn create_key(State(gw): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    done(
        async {
            let k: NewKey = body_json(&gw, &headers, body).await?;
            let req = AdminRequest::CreateKey {
                tenant: k.tenant,
                scopes: k.scopes,
                label: k.label,
            };
            admin_json(&gw, &headers, req, StatusCode::CREATED).await
        }
        .await,
    )
}

async fn revoke_key(
    State(gw): State<Shared>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    done(
        async {
            let id = path(id)?;
            admin_json(
                &gw,
                &headers,
                AdminRequest::RevokeKey { id },
                StatusCode::OK,
            )
            .await
        }
        .await,
    )
}

async fn usage(
    State(gw): State<Shared>,
    headers: HeaderMap,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Response {
    done(
        async {
            let q = query(q)?;
            admin_json(&gw, &headers, AdminRequest::Usage(q), StatusCode::OK).await
        }
        .await,
    )
}

async fn audit(
    State(gw): State<Shared>,
    headers: HeaderMap,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Response {
    done(
        async {
            let q = query(q)?;
            admin_json(&gw, &headers, AdminRequest::Audit(q), StatusCode::OK).await
        }
        .await,
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct JoinTokenParams {
    ttl_s: u64,
    /// Nodes it admits (absent or 0: one); the coordinator refuses more than its limit.
    uses: u32,
    /// Labels every node it admits gets (e.g. `{"site": "berlin-3"}`).
    labels: std::collections::BTreeMap<String, String>,
}

/// The longest a join token may be valid, s (30 days).
const MAX_JOIN_TOKEN_TTL_S: u64 = 30 * 86_400;

async fn join_token(State(gw): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    done(
        async {
            authorized(&gw, &headers).await?;
            let bytes = read_body(&gw.config, &headers, body).await?;
            let p: JoinTokenParams = if bytes.is_empty() {
                JoinTokenParams::default()
            } else {
                strict_json(&bytes)?
            };
            // Refused rather than cut to 30 days: the caller would hold a token that expires
            // long before it expects.
            if p.ttl_s > MAX_JOIN_TOKEN_TTL_S {
                return Err(GatewayError::BadRequest(format!(
                    "ttl_s {} is over the limit of {MAX_JOIN_TOKEN_TTL_S} (30 days)",
                    p.ttl_s
                )));
            }
            let req = AdminRequest::MintJoinToken {
                ttl_s: p.ttl_s,
                uses: p.uses,
                labels: p.labels,
            };
            admin_json(&gw, &headers, req, StatusCode::CREATED).await
        }
        .await,
    )
}

async fn rotate(State(gw): State<Shared>, headers: HeaderMap) -> Response {
    done(admin_json(&gw, &headers, AdminRequest::RotateTicketKey, StatusCode::OK).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Uri;

    fn deploy_query(q: &str) -> Result<DeployParams, String> {
        let uri: Uri = format!("/admin/v1/models/m?{q}")
            .parse()
            .map_err(|e| format!("{e}"))?;
        Query::<DeployParams>::try_from_uri(&uri)
            .map(|Query(p)| p)
            .map_err(|e| e.body_text())
    }

    #[test]
    fn every_deployment_setting_is_taken_from_the_deploy_query() {
        let p = deploy_query(
            "version=3&min_replicas=1&max_replicas=2&idle_timeout_ms=2000&max_concurrency=3\
             &max_batch_size=8&max_queue_delay_us=2000&memory_estimate=1048576&timeout_ms=5000\
             &regions=eu-west,%20us-east&device_class=gpu&shared=true&accelerator=prefer-gpu",
        )
        .unwrap();
        assert_eq!(p.version.as_deref(), Some("3"));
        let expected = DeploymentSettings {
            min_replicas: 1,
            max_replicas: 2,
            idle_timeout_ms: 2000,
            max_concurrency: 3,
            max_batch_size: 8,
            max_queue_delay_us: 2000,
            memory_estimate: 1 << 20,
            timeout_ms: 5000,
            regions: vec!["eu-west".into(), "us-east".into()],
            device_class: "gpu".into(),
            shared: true,
            accelerator: Accelerator::PreferGpu,
            engines: Default::default(),
        };
        assert_eq!(p.settings(), expected);
        // Every field of the settings has its parameter: a new field without one fails here.
        let all = serde_json::to_value(&expected).unwrap();
        let names: Vec<&String> = all.as_object().unwrap().keys().collect();
        // (`engines` is the coordinator's operator check, not a parameter.)
        assert_eq!(names.len(), 13, "{names:?}");
        // Nothing given: the defaults; an empty `regions` allows any region.
        assert_eq!(
            deploy_query("").unwrap().settings(),
            DeploymentSettings::default()
        );
        assert!(deploy_query("regions=")
            .unwrap()
            .settings()
            .regions
            .is_empty());
    }

    #[test]
    fn unknown_or_bad_deploy_parameters_are_refused() {
        let e = deploy_query("min_replica=1").unwrap_err();
        assert!(e.contains("unknown field `min_replica`"), "{e}");
        assert!(
            e.contains("min_replicas"),
            "the valid names are listed: {e}"
        );
        let e = deploy_query("accelerator=tpu").unwrap_err();
        assert!(e.contains("tpu"), "{e}");
        assert!(deploy_query("idle_timeout_ms=2s").is_err());
        assert!(deploy_query("shared=yes").is_err());
    }

    #[test]
    fn json_bodies_refuse_unknown_fields_at_any_depth() {
        let p: SettingsPatch = strict_json(br#"{"max_batch_size": 8, "regions": ["eu"]}"#).unwrap();
        assert_eq!(p.max_batch_size, Some(8));
        let e = strict_json::<SettingsPatch>(br#"{"max_batch": 8}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `max_batch`"), "{e}");
        let e = strict_json::<Quota>(br#"{"max_rsp": 5}"#).unwrap_err();
        assert!(e.to_string().contains("`max_rsp`"), "{e}");
        let e = strict_json::<NewTenant>(br#"{"name": "a", "quota": {"max_rsp": 5}}"#).unwrap_err();
        assert!(e.to_string().contains("`quota.max_rsp`"), "{e}");
        let e =
            strict_json::<Vec<VersionWeight>>(br#"[{"version": "1", "weight": 5, "wieght": 5}]"#)
                .unwrap_err();
        assert!(e.to_string().contains("`0.wieght`"), "{e}");
        let e = strict_json::<NewKey>(br#"{"scopes": ["invoke"], "tenat": "acme"}"#).unwrap_err();
        assert!(e.to_string().contains("`tenat`"), "{e}");
        assert!(strict_json::<Quota>(br#"{"max_rps": 5} trailing"#).is_err());
    }

    #[test]
    fn usage_and_audit_queries_refuse_unknown_parameters() {
        let uri: Uri = "/admin/v1/usage?model=m&sinse_ms=5".parse().unwrap();
        let e = Query::<UsageQuery>::try_from_uri(&uri)
            .unwrap_err()
            .body_text();
        assert!(e.contains("sinse_ms"), "{e}");
        let uri: Uri = "/admin/v1/audit?action=x&limt=1".parse().unwrap();
        assert!(Query::<AuditQuery>::try_from_uri(&uri).is_err());
        let uri: Uri = "/admin/v1/audit?action=x&limit=1&tenant=t&since_ms=1&until_ms=2"
            .parse()
            .unwrap();
        let Query(p) = Query::<AuditQuery>::try_from_uri(&uri).unwrap();
        assert_eq!((p.limit, p.until_ms), (1, Some(2)));
    }
}
