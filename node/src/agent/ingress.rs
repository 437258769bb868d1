//! The node's HTTP ingress (`skein-node --http ADDR`): skein-gateway's V2 API served from this
//! node, for apps next to it that do not embed the SDK.
//!
//! ```text
//!  app ──HTTP V2──▶ skein-gateway ──authorize──▶ key cache ──(first use)──▶ coordinator CheckKey
//!                        │ model loaded here ──▶ serve_on ──▶ executor   (no QUIC, no copy)
//!                        └ otherwise ──▶ skein-client from this node ──QUIC──▶ nearest warm node
//! ```
//!
//! The local path runs a request exactly as a `skein/infer` call with a route ticket would
//! (placement, tenant limits, deadline, metering), with the key's grant in place of the ticket.
//! A model this node holds but the caller's tenant may not see is not refused here: it goes
//! over the mesh, where the coordinator's resolve decides.

use super::{ActiveGuard, Call, Shared};
use crate::config::HttpIngressConfig;
use crate::key_cache::{KeyAnswer, KeyCacheConfig, KeyDecision};
use skein_client::{ApiKey, InferOptions, InferResult};
use skein_gateway::local::{BoxFuture, LocalNode, LocalOutcome};
use skein_net::Credentials;
use skein_proto::{CtlRequest, CtlResponse, ErrorCode, KeyGrant, Tensor, WireError};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a key check may take before the coordinator counts as unreachable.
const KEY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The key cache's settings from the ingress's, TTL plus offline grace capped at the
/// coordinator's revocation window (a key kept longer could miss its revocation).
pub(super) fn key_cache_config(c: &HttpIngressConfig) -> KeyCacheConfig {
    let window = Duration::from_millis(skein_proto::KEY_REVOCATION_WINDOW_MS);
    let ttl = Duration::from_millis(c.key_ttl_ms).min(window);
    KeyCacheConfig {
        ttl,
        offline_grace: Duration::from_millis(c.key_offline_grace_ms).min(window - ttl),
        max_keys: c.max_keys.max(1),
    }
}

/// Serve the V2 API on `listener` until `cancel`: the gateway, its SDK client (connected from
/// this node, with the node's certificate) and, when enabled, the mDNS advertisement.
pub(super) async fn start(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    creds: &Credentials,
    cancel: CancellationToken,
    responder: Option<&crate::mdns::Responder>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    use anyhow::Context;
    let c = &shared.config.http;
    let labels = &shared.config.labels;
    let client = skein_client::Client::connect_with(
        &shared.ctl.addr().to_string(),
        creds.clone(),
        skein_client::ClientConfig {
            timeout: Duration::from_millis(c.request_timeout_ms),
            max_frame_len: shared.config.max_frame_len,
            region: labels.get("region").cloned(),
            zone: labels.get("zone").cloned(),
            // A node starting offline serves its local models; the mesh path waits for the
            // coordinator.
            start_unreachable: true,
            ..skein_client::ClientConfig::default()
        },
    )
    .await
    .context("connecting the HTTP ingress's SDK client to the coordinator")?;
    let config = skein_gateway::GatewayConfig {
        max_body_bytes: c.max_body_bytes,
        request_timeout: Duration::from_millis(c.request_timeout_ms),
        body_timeout: Duration::from_millis(c.body_timeout_ms),
        max_in_flight: c.max_in_flight.max(1),
        max_connections: c.max_connections.max(1),
        key_rate: (c.key_rps > 0).then_some(skein_gateway::KeyRateLimit {
            per_second: f64::from(c.key_rps),
            burst: c.key_burst.max(1),
        }),
        ..skein_gateway::GatewayConfig::default()
    };
    let local: Arc<dyn LocalNode> = Arc::new(NodeIngress {
        shared: shared.clone(),
    });
    let mut tasks = Vec::new();
    if let (true, Some(r)) = (c.mdns, responder) {
        let bound = listener.local_addr()?;
        let listen = c
            .listen
            .map_or(bound, |l| SocketAddr::new(l.ip(), bound.port()));
        crate::mdns::advertise_ingress(r, &shared.node_id, listen);
    }
    let gw_cancel = cancel.clone();
    tasks.push(tokio::spawn(async move {
        let r =
            skein_gateway::serve_local(listener, client.clone(), config, Some(local), gw_cancel)
                .await;
        client.close();
        if let Err(e) = r {
            tracing::error!(error = %e, "the HTTP ingress stopped");
        }
    }));
    Ok(tasks)
}

/// The ingress's lines of the node's `/metrics`: key checks sent, keys cached.
pub(super) fn render_metrics(s: &Shared, out: &mut String) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# HELP skein_node_ingress_key_checks_total API keys the HTTP ingress asked the coordinator about (first use, expiry, revocation).\n\
         # TYPE skein_node_ingress_key_checks_total counter\n\
         skein_node_ingress_key_checks_total {}\n\
         # HELP skein_node_ingress_cached_keys API keys (valid or refused) the HTTP ingress holds.\n\
         # TYPE skein_node_ingress_cached_keys gauge\n\
         skein_node_ingress_cached_keys {}",
        s.key_checks.load(Ordering::Relaxed),
        super::lock(&s.keys).len()
    );
}

/// The node as its gateway sees it.
struct NodeIngress {
    shared: Arc<Shared>,
}

fn refused(message: String) -> skein_client::Error {
    skein_client::Error::Remote(WireError::new(ErrorCode::Unauthenticated, message))
}

impl Shared {
    /// What `key` may do: from the cache, else asked of the coordinator (once, however many
    /// requests bring the key at once) and cached.
    async fn grant(&self, key: Option<&str>) -> Result<KeyGrant, skein_client::Error> {
        let reach = self.reach();
        match super::lock(&self.keys).decide_at(key, Instant::now(), reach) {
            KeyDecision::Grant(g) => return Ok(g),
            KeyDecision::Refuse(m) => return Err(refused(m)),
            KeyDecision::Check { .. } => {}
        }
        let _one = self.key_check_lock.lock().await;
        // Another request may have asked while this one waited.
        let stale = match super::lock(&self.keys).decide_at(key, Instant::now(), reach) {
            KeyDecision::Grant(g) => return Ok(g),
            KeyDecision::Refuse(m) => return Err(refused(m)),
            KeyDecision::Check { stale } => stale,
        };
        // The coordinator is unreachable (its last heartbeat failed): do not wait on it.
        let offline = |e: skein_client::Error| match &stale {
            Some(g) => {
                tracing::debug!(error = %e, key_id = %g.key_id, "coordinator unreachable: honouring a cached key within its offline grace");
                Ok(g.clone())
            }
            None => Err(e),
        };
        if !self.heartbeat_ok.load(Ordering::SeqCst) {
            return offline(skein_client::Error::Transport(
                "the coordinator cannot be reached to check this API key, and a key it accepted is honoured offline only within its tenant's offline validity from the coordinator's last check (and the ingress's offline grace); try again later".into(),
            ));
        }
        self.key_checks.fetch_add(1, Ordering::Relaxed);
        let asked = tokio::time::timeout(
            KEY_CHECK_TIMEOUT,
            self.ctl.request(CtlRequest::CheckKey {
                api_key: key.map(str::to_string),
            }),
        )
        .await;
        let now = Instant::now();
        let Ok(asked) = asked else {
            return offline(skein_client::Error::Timeout(KEY_CHECK_TIMEOUT));
        };
        match asked {
            Ok(CtlResponse::KeyChecked(g)) => {
                super::lock(&self.keys).store(key, KeyAnswer::Granted(g.clone()), now);
                Ok(g)
            }
            Ok(other) => Err(skein_client::Error::Remote(WireError::new(
                ErrorCode::Malformed,
                format!("unexpected answer to a key check: {other:?}"),
            ))),
            Err(skein_net::CtlError::Remote(e)) if e.code == ErrorCode::Unauthenticated => {
                super::lock(&self.keys).store(key, KeyAnswer::Refused(e.message.clone()), now);
                Err(skein_client::Error::Remote(e))
            }
            // Over budget and the like: refused now, asked again next time.
            Err(skein_net::CtlError::Remote(e)) => Err(skein_client::Error::Remote(e)),
            // The coordinator cannot be reached: a key it accepted before is honoured within
            // the offline grace; any other is refused.
            Err(e) => offline(e.into()),
        }
    }

    /// How many versions of `model` are deployed (this node holds a slot for each).
    fn versions_of(&self, model: &str) -> usize {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .filter(|(name, _)| name == model)
            .count()
    }

    /// Run `model` here if it is loaded here and the caller's tenant may use it.
    async fn infer_local(
        self: &Arc<Self>,
        model: &str,
        inputs: Vec<Tensor>,
        opts: &InferOptions,
    ) -> LocalOutcome {
        let start = Instant::now();
        // A call that names no version of a model deployed in several versions may fall under
        // a traffic split, which the SDK draws: it goes over the mesh.
        if opts.version.is_none() && self.versions_of(model) > 1 {
            return LocalOutcome::NotHere(inputs);
        }
        let Some(slot) = self
            .slot(model, opts.version.as_deref())
            .filter(|s| s.is_loaded())
        else {
            return LocalOutcome::NotHere(inputs);
        };
        if self.draining.load(Ordering::SeqCst) {
            return LocalOutcome::NotHere(inputs);
        }
        let grant = match self.grant(opts.api_key.as_ref().map(ApiKey::as_str)).await {
            Ok(g) => g,
            Err(e) => return LocalOutcome::Served(Err(e)),
        };
        let visible = grant.platform_admin
            || slot.settings().shared
            || self
                .owners
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(slot.name.clone(), slot.version.clone()))
                .is_some_and(|o| *o == grant.tenant);
        if !visible {
            return LocalOutcome::NotHere(inputs);
        }
        let _active = ActiveGuard::new(self);
        let result = async {
            if !self.usage.has_room() {
                return Err(WireError::new(
                    ErrorCode::Overloaded,
                    "this node cannot reach the coordinator to record usage; try another node",
                )
                .retry_after(1000));
            }
            let _permit =
                self.limiter
                    .admit(&grant.tenant, grant.max_rps, grant.max_concurrent, start)?;
            let call = Call {
                id: rand::random::<u64>() >> 1,
                tenant: grant.tenant.clone(),
                outputs: opts.outputs.clone(),
                timeout_ms: opts.timeout.map(|t| t.as_millis() as u64),
                start,
                replay: None,
            };
            self.serve_on(&slot, call, inputs).await
        }
        .await;
        let code = match &result {
            Ok(_) => "ok",
            Err(e) => e.code.as_str(),
        };
        self.metrics.record(
            &slot.name,
            &slot.version,
            &grant.tenant,
            code,
            start.elapsed(),
        );
        LocalOutcome::Served(
            result
                .map(|(reply, outputs)| InferResult {
                    model: reply.model,
                    version: reply.version,
                    outputs,
                    meta: reply.meta,
                    failovers: 0,
                    trace_id: opts.trace.map(|t| t.trace_id).unwrap_or_default(),
                    connection: skein_client::CallConnection {
                        kind: skein_client::ConnectionKind::Local,
                        rtt: Duration::ZERO,
                    },
                    // Run where the request arrived: no relay on the way.
                    path: skein_client::CallPath::Direct,
                })
                .map_err(skein_client::Error::Remote),
        )
    }
}

impl LocalNode for NodeIngress {
    fn authorize<'a>(
        &'a self,
        key: Option<&'a ApiKey>,
    ) -> BoxFuture<'a, Result<(), skein_client::Error>> {
        Box::pin(async move {
            let g = self.shared.grant(key.map(ApiKey::as_str)).await?;
            if g.may_invoke() {
                Ok(())
            } else {
                Err(skein_client::Error::Remote(WireError::new(
                    ErrorCode::Forbidden,
                    "this API key lacks the `invoke` scope needed to call models",
                )))
            }
        })
    }

    fn infer<'a>(
        &'a self,
        model: &'a str,
        inputs: Vec<Tensor>,
        opts: &'a InferOptions,
    ) -> BoxFuture<'a, LocalOutcome> {
        Box::pin(self.shared.infer_local(model, inputs, opts))
    }

    fn ready(&self) -> Result<(), String> {
        if self.shared.draining.load(Ordering::SeqCst) {
            Err(format!("node {} is draining", self.shared.node_id))
        } else if !self.shared.heartbeat_ok.load(Ordering::SeqCst) {
            Err("the coordinator does not answer this node's heartbeats".into())
        } else {
            Ok(())
        }
    }
}
