//! What every request handler shares, in `routes` (V2) and `admin` (`/admin/v1`) alike: the
//! router's state ([`Shared`]), the caller's API key ([`api_key`]) and the request body, read
//! within the limits and decoded ([`read_body`]).

use crate::catalog::Catalog;
use crate::encoding;
use crate::{GatewayConfig, GatewayError};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use skein_client::ApiKey;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Bodies larger than this are (de)compressed off the async threads.
pub(crate) const BLOCKING_CODING_BYTES: usize = 1 << 20;

/// What every handler shares: the SDK client, the settings, the model catalog, the
/// in-flight limit and the request counters.
pub(crate) struct Gateway {
    pub(crate) client: skein_client::Client,
    pub(crate) config: GatewayConfig,
    pub(crate) catalog: Catalog,
    pub(crate) in_flight: Semaphore,
    /// Inference requests per API key (`GatewayConfig::key_rate`).
    pub(crate) key_rates: Option<crate::key_rate::KeyRates>,
    /// Inference requests answered, by model, version and HTTP status.
    pub(crate) requests: skein_proto::prom::RequestStats,
    /// The node this gateway runs in (`skein-node --http`), asked first; `None` in the
    /// coordinator's process.
    pub(crate) local: Option<Arc<dyn crate::local::LocalNode>>,
}

/// The router's state.
pub(crate) type Shared = Arc<Gateway>;

impl Gateway {
    /// The shared state of a router serving `client` with `config`.
    pub(crate) fn new(
        client: skein_client::Client,
        config: GatewayConfig,
        local: Option<Arc<dyn crate::local::LocalNode>>,
    ) -> Shared {
        Arc::new(Gateway {
            local,
            catalog: Catalog::new(client.clone(), config.metadata_ttl),
            in_flight: Semaphore::new(config.max_in_flight),
            key_rates: config.key_rate.map(crate::key_rate::KeyRates::new),
            requests: skein_proto::prom::RequestStats::new(
                (
                    "skein_http_requests_total",
                    "Inference requests answered by the HTTP gateway, by model, version (`-`: the latest) and HTTP status.",
                ),
                (
                    "skein_http_request_duration_seconds",
                    "Time from the request's arrival to its answer, at the HTTP gateway.",
                ),
                &["model", "version", "code"],
                2,
            ),
            client,
            config,
        })
    }
}

/// The caller's API key: `Authorization: Bearer <key>`, or HTTP Basic with the key as
/// password (tritonclient's `BasicAuth` plugin), or none (the coordinator then refuses unless
/// it runs `insecure_dev`).
pub fn api_key(headers: &HeaderMap) -> Result<Option<ApiKey>, GatewayError> {
    use base64::Engine;
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || {
        GatewayError::Unauthorized(
            "the Authorization header must be `Bearer <API key>` (or Basic with the key as password)"
                .to_string(),
        )
    };
    let v = v.to_str().map_err(|_| bad())?.trim();
    let (scheme, value) = v.split_once(' ').ok_or_else(bad)?;
    let value = value.trim();
    let key = if scheme.eq_ignore_ascii_case("bearer") {
        value.to_string()
    } else if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(value)
            .map_err(|_| bad())?;
        let text = String::from_utf8(raw).map_err(|_| bad())?;
        let (user, pass) = text.split_once(':').unwrap_or((&text, ""));
        if pass.is_empty() { user } else { pass }.to_string()
    } else {
        return Err(bad());
    };
    if key.is_empty() {
        return Err(bad());
    }
    Ok(Some(ApiKey::new(key)))
}

/// A header's value, when it is present and visible ASCII.
pub(crate) fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Read the whole body within the size and time limits, then undo its `Content-Encoding`.
pub(crate) async fn read_body(
    cfg: &GatewayConfig,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, GatewayError> {
    let limit = cfg.max_body_bytes;
    let coding = encoding::content_coding(header_str(headers, header::CONTENT_ENCODING))?;
    if let Some(len) =
        header_str(headers, header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(GatewayError::PayloadTooLarge { limit });
        }
    }
    let collected = tokio::time::timeout(cfg.body_timeout, Limited::new(body, limit).collect())
        .await
        .map_err(|_| GatewayError::BodyTimeout(cfg.body_timeout))?;
    let raw = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(GatewayError::PayloadTooLarge { limit })
        }
        Err(e) => return Err(GatewayError::BadRequest(format!("reading the body: {e}"))),
    };
    match coding {
        None => Ok(raw),
        Some(c) if raw.len() < BLOCKING_CODING_BYTES => {
            Ok(encoding::decode(c, &raw, limit)?.into())
        }
        Some(c) => tokio::task::spawn_blocking(move || encoding::decode(c, &raw, limit))
            .await
            .map_err(|e| GatewayError::Internal(format!("decompressing the body: {e}")))?
            .map(Bytes::from)
            .map_err(GatewayError::from),
    }
}
