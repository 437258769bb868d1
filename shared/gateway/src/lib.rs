//! skein-gateway: the Open Inference Protocol (KServe V2) REST API of a Skein mesh.
//!
//! Entry point: [`serve`] takes a bound listener, an SDK [`skein_client::Client`], a
//! [`GatewayConfig`] and a shutdown token (the mini-redis shape), so tests bind `127.0.0.1:0`.
//! Every inference goes over the mesh exactly as the SDK sends it
//! ([`skein_client::Client::infer_with`]: routing, cold-start holding, failover); metadata and
//! readiness come from the coordinator's model list, cached for [`GatewayConfig::metadata_ttl`].
//!
//! The same gateway runs in the coordinator's process (`skein up --http`) and in every node
//! started with `skein-node --http` ([`serve_local`]): there a [`local::LocalNode`] checks keys
//! from the node's cache and runs the models loaded on that node itself; the rest go over the
//! mesh from the node's position.
//!
//! ```text
//!  HTTP client ──V2 REST──▶ routes ──▶ codec (JSON / binary tensors) ──▶ skein_client ──QUIC──▶ nodes
//!                              └──▶ catalog (model list, cached) ──▶ coordinator
//! ```
//!
//! # Layout
//! - [`routes`]: the axum router and its handlers, body limits, compression.
//! - `state`: what every handler shares (the router's state, the caller's API key, the body
//!   read within limits), used by `routes` and `admin` alike.
//! - `admin`: the admin REST API under `/admin/v1` (tenants, keys, usage, audit, deploy, scale,
//!   traffic, nodes, join tokens), each call sent with the caller's API key.
//! - [`codec`], [`encoding`]: the V2 body both ways and gzip/deflate bodies, re-exported from
//!   `skein-v2` (the wire format alone, which the fuzz targets build without the mesh stack).
//! - [`catalog`]: model metadata and readiness, cached.
//! - [`local`]: [`local::LocalNode`], the node a gateway inside a node asks first.
//! - [`error`]: [`GatewayError`], mapped to HTTP statuses in one place.
//! - [`http_client`]: a minimal HTTP/1.1 client for the tests and `skein bench --http`.
//!
//! The OpenAPI description of this surface is `docs/openapi.json`, served at `/openapi.json`.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod admin;
pub mod catalog;
pub mod error;
pub mod http_client;
mod key_rate;
pub mod local;
pub mod metrics;
pub mod routes;
mod state;

pub use error::GatewayError;
pub use key_rate::KeyRateLimit;
pub use skein_v2::{codec, encoding};

use std::time::Duration;

/// The OpenAPI description of the HTTP surface (served at [`OPENAPI_PATH`]).
pub const OPENAPI_JSON: &str = include_str!("../../../docs/openapi.json");
/// Where [`OPENAPI_JSON`] is served.
pub const OPENAPI_PATH: &str = "/openapi.json";

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Largest request body accepted, before and after decompression (default 64 MiB, the
    /// mesh's default frame size). Larger bodies are answered 413.
    pub max_body_bytes: usize,
    /// Deadline of one inference through the mesh, failover included (default 30 s).
    pub request_timeout: Duration,
    /// Time allowed for a request body to arrive (default 30 s); then 408.
    pub body_timeout: Duration,
    /// Inference requests handled at once (default 256); beyond it, 503 with `Retry-After`.
    pub max_in_flight: usize,
    /// Open HTTP connections at once (default 1024); further connections wait to be accepted.
    pub max_connections: usize,
    /// How long the model list from the coordinator is reused (default 1 s).
    pub metadata_ttl: Duration,
    /// The gateway's own API key, for `/v2/health/ready` only (which must see every model);
    /// every other request uses the key its caller sends, or none.
    pub service_key: Option<skein_client::ApiKey>,
    /// Inference requests per API key (default 1 000 a second, bursts of 1 000; requests
    /// without a key share one bucket); beyond it, 429 with `Retry-After`. `None`: no bound
    /// here (the tenant's quota in the mesh still applies).
    pub key_rate: Option<KeyRateLimit>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_body_bytes: 64 << 20,
            request_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            max_in_flight: 256,
            max_connections: 1024,
            metadata_ttl: Duration::from_secs(1),
            service_key: None,
            key_rate: Some(KeyRateLimit::default()),
        }
    }
}

/// Serve the V2 REST API on `listener` until `shutdown` is cancelled, then finish the requests
/// in flight and return.
pub async fn serve(
    listener: tokio::net::TcpListener,
    client: skein_client::Client,
    config: GatewayConfig,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    serve_local(listener, client, config, None, shutdown).await
}

/// [`serve`] from inside a node: `local` checks keys and runs the models loaded there; the
/// rest go over the mesh through `client`.
pub async fn serve_local(
    listener: tokio::net::TcpListener,
    client: skein_client::Client,
    config: GatewayConfig,
    local: Option<std::sync::Arc<dyn local::LocalNode>>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    // A default key on the client would be used for callers who send none.
    anyhow::ensure!(
        client.api_key().is_none(),
        "the gateway's SDK client must carry no API key of its own (set GatewayConfig::service_key)"
    );
    let addr = listener.local_addr()?;
    let listener = routes::BoundedListener::new(listener, config.max_connections);
    let node = local.is_some();
    let app = routes::router_local(client, config, local);
    tracing::info!(%addr, node, "KServe V2 HTTP gateway listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}
