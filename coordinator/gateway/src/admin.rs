//! The admin REST API under `/admin/v1`: the `skein/ctl` admin requests over HTTP + JSON, each
//! sent with the caller's API key (`Authorization: Bearer ...`), so any language and `curl` can
//! deploy models, manage tenants and keys, and read usage and the audit log.
//!
//! | method and path | control request |
//! |---|---|
//! | `GET /admin/v1/whoami` | `Admin(WhoAmI)` |
//! | `GET /admin/v1/models` | `ListModels` |
//! | `POST /admin/v1/models/{name}[?version=V]`, body: ONNX bytes | `Deploy` |
//! | `PATCH /admin/v1/models/{name}[/versions/{v}]`, body: settings patch | `Scale` |
//! | `GET`/`PUT /admin/v1/models/{name}/traffic`, body: `[{version, weight}]` | `GetTraffic`/`SetTraffic` |
//! | `GET /admin/v1/nodes`, `DELETE /admin/v1/nodes/{id}` | `ListNodes`, `Admin(RevokeNode)` |
//! | `GET`/`POST /admin/v1/tenants`, `PUT /admin/v1/tenants/{name}/quota` | `Admin(ListTenants/CreateTenant/SetQuota)` |
//! | `GET`/`POST /admin/v1/keys`, `DELETE /admin/v1/keys/{id}` | `Admin(ListKeys/CreateKey/RevokeKey)` |
//! | `GET /admin/v1/usage?tenant&model&since_ms&until_ms` | `Admin(Usage)` |
//! | `GET /admin/v1/audit?tenant&action&since_ms&until_ms&limit` | `Admin(Audit)` |
//! | `POST /admin/v1/join-tokens`, body `{ttl_s}` | `Admin(MintJoinToken)` |
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
    AdminRequest, AdminResponse, AuditQuery, CtlRequest, CtlResponse, DeploymentSettings, Quota,
    SettingsPatch, UsageQuery, VersionWeight,
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
    serde_json::from_slice(&bytes)
        .map_err(|e| GatewayError::BadRequest(format!("request body: {e}")))
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
        AdminResponse::JoinToken { token, expires_ms } => json(
            status,
            &serde_json::json!({"token": token, "expires_ms": expires_ms}),
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

#[derive(Debug, Deserialize)]
struct DeployParams {
    version: Option<String>,
    #[serde(default)]
    shared: bool,
    #[serde(default)]
    min_replicas: u32,
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
            let bytes = read_body(&gw.config, &headers, body).await?;
            let settings = DeploymentSettings {
                shared: p.shared,
                min_replicas: p.min_replicas,
                ..DeploymentSettings::default()
            };
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
}

async fn join_token(State(gw): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    done(
        async {
            authorized(&gw, &headers).await?;
            let bytes = read_body(&gw.config, &headers, body).await?;
            let p: JoinTokenParams = if bytes.is_empty() {
                JoinTokenParams::default()
            } else {
                serde_json::from_slice(&bytes)
                    .map_err(|e| GatewayError::BadRequest(format!("request body: {e}")))?
            };
            let req = AdminRequest::MintJoinToken { ttl_s: p.ttl_s };
            admin_json(&gw, &headers, req, StatusCode::CREATED).await
        }
        .await,
    )
}

async fn rotate(State(gw): State<Shared>, headers: HeaderMap) -> Response {
    done(admin_json(&gw, &headers, AdminRequest::RotateTicketKey, StatusCode::OK).await)
}
