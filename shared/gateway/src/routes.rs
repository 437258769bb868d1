//! The axum router: V2 health, metadata, readiness and inference, plus `/openapi.json`.

use crate::catalog;
use crate::codec::{self, EncodedResponse, ServedBy};
use crate::encoding::{self, Coding};
use crate::local::LocalOutcome;
use crate::state::{header_str, read_body, Gateway, Shared, BLOCKING_CODING_BYTES};
use crate::{GatewayConfig, GatewayError, OPENAPI_JSON, OPENAPI_PATH};
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use skein_client::ApiKey;
use skein_proto::{AdminRequest, ErrorCode, TraceContext};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::state::api_key;

/// The binary tensor data extension's header: length of the JSON part of a body.
pub const HEADER_LEN: HeaderName = HeaderName::from_static("inference-header-content-length");

/// The router of the whole HTTP surface.
pub fn router(client: skein_client::Client, config: GatewayConfig) -> Router {
    router_local(client, config, None)
}

/// The router of a gateway inside a node: `local` is asked first (see [`crate::local`]).
pub fn router_local(
    client: skein_client::Client,
    config: GatewayConfig,
    local: Option<Arc<dyn crate::local::LocalNode>>,
) -> Router {
    let gw = Gateway::new(client, config, local);
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_v),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_v),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_v))
        .route(OPENAPI_PATH, get(openapi))
        .route("/metrics", get(metrics))
        .merge(crate::admin::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(gw)
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        value.to_string(),
    )
        .into_response()
}

/// Path parameters, or a 400 in the gateway's error format (e.g. bad percent-encoding).
fn path_of<T>(p: Result<Path<T>, PathRejection>) -> Result<T, GatewayError> {
    p.map(|Path(t)| t)
        .map_err(|e| GatewayError::BadRequest(e.body_text()))
}

fn result(r: Result<Response, GatewayError>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn not_found(method: Method, uri: Uri) -> Response {
    GatewayError::NotFound(format!("no route for {method} {}", uri.path())).into_response()
}

async fn method_not_allowed() -> Response {
    GatewayError::MethodNotAllowed.into_response()
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI_JSON,
    )
        .into_response()
}

/// Whether `e` only says this key may not see it (a scrape then leaves that part out).
fn forbidden(e: &skein_client::Error) -> bool {
    e.code() == Some(ErrorCode::Forbidden)
}

/// Prometheus exposition of the mesh as the coordinator shows it to the caller's key (fresh on
/// every scrape): nodes for a platform admin, usage for a `read-usage` key.
async fn metrics(State(gw): State<Shared>, headers: HeaderMap) -> Response {
    result(
        async {
            let key = api_key(&headers)?;
            let models = gw.catalog.models(key.as_ref()).await?;
            // Nodes and the gateway's own request counters (every tenant's models) are for
            // platform admins, who may list nodes.
            let nodes = match gw
                .client
                .control_as(&skein_proto::CtlRequest::ListNodes, key.as_ref())
                .await
            {
                Ok(skein_proto::CtlResponse::Nodes(n)) => Some(n),
                Ok(_) => Some(Vec::new()),
                Err(e) if forbidden(&e) => None,
                Err(e) => return Err(e.into()),
            };
            let usage = match gw
                .client
                .admin_as(AdminRequest::Usage(Default::default()), key.as_ref())
                .await
            {
                Ok(skein_proto::AdminResponse::Usage(rows)) => rows,
                Ok(_) => Vec::new(),
                Err(e) if forbidden(&e) => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            Ok((
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
                )],
                {
                    let mut text =
                        crate::metrics::render(&models, nodes.as_deref().unwrap_or(&[]), &usage);
                    if nodes.is_some() {
                        gw.requests.render(&mut text);
                    }
                    text
                },
            )
                .into_response())
        }
        .await,
    )
}

async fn live() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({ "live": true }))
}

/// Ready when the coordinator answers and the latest version of every deployed model is loaded
/// on at least one node.
/// Whether some healthy node can serve `name` now, warm or after a cold start.
async fn servable(gw: &Gateway, name: &str, version: Option<&str>, key: Option<&ApiKey>) -> bool {
    gw.client
        .resolve_as(name, version, key)
        .await
        .is_ok_and(|r| !r.candidates.is_empty())
}

async fn ready(State(gw): State<Shared>) -> Response {
    if let Some(local) = &gw.local {
        // A node's ingress is ready when the node serves: a model it does not hold goes over
        // the mesh, which the node's heartbeats show reachable.
        return result(
            local
                .ready()
                .map_err(GatewayError::NotReady)
                .map(|()| json_response(StatusCode::OK, &serde_json::json!({ "ready": true }))),
        );
    }
    result(
        async {
            let own = gw.config.service_key.as_ref();
            let models = gw.catalog.models(own).await.map_err(|e| {
                GatewayError::NotReady(format!("the coordinator does not answer: {e}"))
            })?;
            let mut names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            // Models scaled to zero count as ready when a healthy node can load them.
            let mut waiting = Vec::new();
            for n in names {
                let loaded = catalog::find(&models, n, None).is_ok_and(|m| !m.loaded_on.is_empty());
                if !loaded && !servable(&gw, n, None, own).await {
                    waiting.push(n);
                }
            }
            if !waiting.is_empty() {
                return Err(GatewayError::NotReady(format!(
                    "no healthy node can serve: {}",
                    waiting.join(", ")
                )));
            }
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({ "ready": true }),
            ))
        }
        .await,
    )
}

async fn server_metadata(State(gw): State<Shared>, headers: HeaderMap) -> Response {
    result(
        async {
            // Only callers with a valid key learn what this server is.
            let key = api_key(&headers)?;
            match &gw.local {
                Some(local) => local.authorize(key.as_ref()).await?,
                None => {
                    gw.client
                        .admin_as(AdminRequest::WhoAmI, key.as_ref())
                        .await?;
                }
            }
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({
                    "name": "skein",
                    "version": env!("CARGO_PKG_VERSION"),
                    "extensions": ["binary_tensor_data"],
                }),
            ))
        }
        .await,
    )
}

async fn model_metadata(
    State(gw): State<Shared>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    result(async { metadata(&gw, &headers, &path_of(path)?, None).await }.await)
}

async fn model_metadata_v(
    State(gw): State<Shared>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    result(
        async {
            let (name, version) = path_of(path)?;
            metadata(&gw, &headers, &name, Some(&version)).await
        }
        .await,
    )
}

async fn metadata(
    gw: &Gateway,
    headers: &HeaderMap,
    name: &str,
    version: Option<&str>,
) -> Result<Response, GatewayError> {
    let key = api_key(headers)?;
    let models = gw.catalog.models(key.as_ref()).await?;
    let m = catalog::find(&models, name, version)?;
    let versions: Vec<&str> = catalog::versions(&models, name)
        .iter()
        .map(|m| m.version.as_str())
        .collect();
    let specs = |s: &[skein_proto::TensorSpec]| -> Vec<serde_json::Value> {
        s.iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "datatype": t.datatype.as_str(),
                    "shape": t.shape,
                })
            })
            .collect()
    };
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "name": m.name,
            "versions": versions,
            "platform": "onnx",
            "inputs": specs(&m.inputs),
            "outputs": specs(&m.outputs),
        }),
    ))
}

async fn model_ready(
    State(gw): State<Shared>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    result(async { readiness(&gw, &headers, &path_of(path)?, None).await }.await)
}

async fn model_ready_v(
    State(gw): State<Shared>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    result(
        async {
            let (name, version) = path_of(path)?;
            readiness(&gw, &headers, &name, Some(&version)).await
        }
        .await,
    )
}

async fn readiness(
    gw: &Gateway,
    headers: &HeaderMap,
    name: &str,
    version: Option<&str>,
) -> Result<Response, GatewayError> {
    let key = api_key(headers)?;
    let models = gw.catalog.models(key.as_ref()).await?;
    let m = catalog::find(&models, name, version)?;
    // A model scaled to zero is still ready: a request is held while a replica loads. Ready
    // means some healthy node can serve it now, warm or after a cold start.
    if m.loaded_on.is_empty() && !servable(gw, &m.name, Some(&m.version), key.as_ref()).await {
        return Err(GatewayError::NotReady(format!(
            "model `{}` version {} has no healthy node that can serve it",
            m.name, m.version
        )));
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "name": m.name, "version": m.version, "ready": true }),
    ))
}

async fn infer(
    State(gw): State<Shared>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match path_of(path) {
        Ok(name) => run_inference(&gw, name, None, &headers, body).await,
        Err(e) => e.into_response(),
    }
}

async fn infer_v(
    State(gw): State<Shared>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match path_of(path) {
        Ok((name, version)) => run_inference(&gw, name, Some(version), &headers, body).await,
        Err(e) => e.into_response(),
    }
}

/// `traceparent`: the W3C trace context header, read on requests and set on answers.
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// One inference, traced: a `skein.gateway.infer` span, child of the request's `traceparent`
/// when it has a valid one (else the root of a new trace), whose context travels on to the
/// node. The answer, error or not, carries that span's `traceparent`, so a caller can find
/// the trace.
async fn run_inference(
    gw: &Gateway,
    model: String,
    version: Option<String>,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    use tracing::Instrument;
    let started = tokio::time::Instant::now();
    let labels = (model.clone(), version.clone().unwrap_or_else(|| "-".into()));
    let parent = header_str(headers, &TRACEPARENT).and_then(TraceContext::parse_traceparent);
    let trace = TraceContext::child_or_root(parent, rand::random(), rand::random());
    let span = tracing::info_span!(
        "skein.gateway.infer",
        otel.kind = "server",
        trace_id = %trace.trace_hex(),
        span_id = %trace.span_hex(),
        parent_span_id = tracing::field::Empty,
        model = %model,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if let Some(p) = parent {
        span.record("parent_span_id", p.span_hex());
    }
    let mut resp = result(
        infer_untraced(gw, model, version, headers, body, trace)
            .instrument(span.clone())
            .await,
    );
    let status = resp.status();
    gw.requests
        .record(&[&labels.0, &labels.1, status.as_str()], started.elapsed());
    span.record("http.response.status_code", status.as_u16());
    span.record(
        "otel.status_code",
        if status.is_success() { "ok" } else { "error" },
    );
    if let Ok(v) = HeaderValue::from_str(&trace.traceparent()) {
        resp.headers_mut().insert(TRACEPARENT.clone(), v);
    }
    resp
}

async fn infer_untraced(
    gw: &Gateway,
    model: String,
    version: Option<String>,
    headers: &HeaderMap,
    body: Body,
    trace: TraceContext,
) -> Result<Response, GatewayError> {
    let key = api_key(headers)?;
    if let Some(local) = &gw.local {
        // From the node's key cache: no round trip to the coordinator once a key is known.
        local.authorize(key.as_ref()).await?;
    }
    if let Some(rates) = &gw.key_rates {
        rates
            .admit(key.as_ref(), tokio::time::Instant::now())
            .map_err(GatewayError::RateLimited)?;
    }
    let _permit = gw
        .in_flight
        .try_acquire()
        .map_err(|_| GatewayError::Busy(gw.config.max_in_flight))?;
    let body = read_body(&gw.config, headers, body).await?;
    let (json, binary) = codec::split_body(&body, header_str(headers, &HEADER_LEN))?;
    let req = codec::decode_request(json, binary)?;
    drop(body);
    let opts = skein_client::InferOptions {
        version,
        outputs: req.outputs,
        timeout: Some(gw.config.request_timeout),
        sticky_key: None,
        api_key: key,
        trace: Some(trace),
    };
    let (result, path) = match &gw.local {
        Some(local) => match local.infer(&model, req.inputs, &opts).await {
            LocalOutcome::Served(r) => (r?, "local"),
            LocalOutcome::NotHere(inputs) => {
                (gw.client.infer_with(&model, inputs, opts).await?, "mesh")
            }
        },
        None => (
            gw.client.infer_with(&model, req.inputs, opts).await?,
            "mesh",
        ),
    };
    let served = ServedBy {
        skein_node: result.meta.node.clone(),
        skein_path: path,
        skein_compute_us: result.meta.compute_us,
        skein_queue_us: result.meta.queue_us,
    };
    let EncodedResponse { body, header_len } = codec::encode_response_served(
        &result.model,
        &result.version,
        req.id.as_deref(),
        &result.outputs,
        &req.binary,
        Some(&served),
    )?;
    let coding = encoding::accepted_coding(header_str(headers, header::ACCEPT_ENCODING));
    let mut resp = respond(body, header_len, coding).await?;
    if let Ok(v) = HeaderValue::from_str(&served.skein_node) {
        resp.headers_mut().insert(SKEIN_NODE, v);
    }
    resp.headers_mut()
        .insert(SKEIN_PATH, HeaderValue::from_static(served.skein_path));
    Ok(resp)
}

/// The node that ran an inference (answers only).
pub const SKEIN_NODE: HeaderName = HeaderName::from_static("skein-node");
/// `local` (run by the node whose ingress took the request) or `mesh` (answers only).
pub const SKEIN_PATH: HeaderName = HeaderName::from_static("skein-path");

async fn respond(
    body: Vec<u8>,
    header_len: Option<usize>,
    coding: Option<Coding>,
) -> Result<Response, GatewayError> {
    let body = match coding {
        None => body,
        Some(c) if body.len() < BLOCKING_CODING_BYTES => encoding::encode(c, &body)
            .map_err(|e| GatewayError::Internal(format!("compressing the response: {e}")))?,
        Some(c) => tokio::task::spawn_blocking(move || encoding::encode(c, &body))
            .await
            .map_err(|e| GatewayError::Internal(format!("compressing the response: {e}")))?
            .map_err(|e| GatewayError::Internal(format!("compressing the response: {e}")))?,
    };
    let mut resp = Response::new(Body::from(body));
    let h = resp.headers_mut();
    match header_len {
        Some(n) => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(HEADER_LEN, HeaderValue::from(n));
        }
        None => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    if let Some(c) = coding {
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(c.as_str()),
        );
    }
    Ok(resp)
}

/// A TCP listener that holds at most `max` connections open at once (the rest wait in the
/// kernel's backlog) and turns off Nagle's algorithm on each.
pub struct BoundedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
}

impl BoundedListener {
    /// Wrap `inner`, allowing `max` open connections.
    pub fn new(inner: TcpListener, max: usize) -> Self {
        BoundedListener {
            inner,
            permits: Arc::new(Semaphore::new(max.max(1))),
        }
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = BoundedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                // The semaphore is never closed; wait rather than spin if it ever is.
                std::future::pending::<()>().await;
                continue;
            };
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    if let Err(e) = io.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY");
                    }
                    return (
                        BoundedStream {
                            io,
                            _permit: permit,
                        },
                        addr,
                    );
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting an HTTP connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection that gives back its [`BoundedListener`] slot when dropped.
pub struct BoundedStream {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for BoundedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for BoundedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
