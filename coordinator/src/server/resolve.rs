//! `Resolve`: where a caller should send its requests for a model version, best node first,
//! with a route ticket.

use super::{err, Reply, Shared};
use crate::access::Caller;
use crate::nodeview::NodeView;
use skein_policy::routing::{self, RouteRequest, RoutingDefaults, Strategy};
use skein_proto::{
    Candidate, CtlResponse, ErrorCode, ModelState, NodeHealth, Resolution, ResolveRequest,
};
use skein_store::Scope;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

impl Shared {
    /// `Resolve` from a caller with API key `key`, in the caller's trace when it traces.
    pub(super) fn resolve_request(
        &self,
        key: Option<&str>,
        req: ResolveRequest,
        rtt: Duration,
    ) -> Reply {
        let span = resolve_span(&req);
        let reply = span.in_scope(|| {
            let caller = self.access.caller(key, "call models")?;
            self.resolve(&caller, req, rtt)
        });
        let code = match &reply {
            Ok(_) => "ok",
            Err(e) => e.code.as_str(),
        };
        span.record("code", code);
        span.record(
            "otel.status_code",
            if code == "ok" { "ok" } else { "error" },
        );
        reply
    }

    /// The candidates for `who`'s request, best first, and its route ticket.
    fn resolve(&self, who: &Caller, req: ResolveRequest, caller_rtt: Duration) -> Reply {
        /// Dead nodes named in one resolution (they are forgotten after a while anyway).
        const MAX_DEAD_LISTED: usize = 256;
        who.require(Scope::Invoke, "call models")?;
        let mut guard = self.state();
        let st = &mut *guard;
        let model = st.visible_model(who, &req.model, req.version.as_deref())?;
        let split = match req.version {
            Some(_) => Vec::new(),
            None => st
                .registry
                .traffic(&req.model)?
                .into_iter()
                .filter(|w| w.weight > 0)
                .collect(),
        };
        let now = Instant::now();
        let view = NodeView::new(&st.membership, now, self.thresholds());
        let own = st.vivaldi.coordinate().clone();
        let caller = view.caller(&req.position, &own, caller_rtt)?;
        if caller.near.is_none() {
            st.scaler.observe_caller(
                &model.name,
                &model.version,
                model.settings.idle_timeout_ms,
                &caller.position,
                now,
            );
        }
        let constraints = view.constraints(&model);
        let relay = self.config.relay.routing_cost();
        let mut loads = Vec::new();
        let mut nodes = Vec::new();
        let mut failures = Vec::new();
        let mut holding: Vec<bool> = Vec::new();
        let mut alive = 0usize;
        let mut dead = Vec::new();
        for n in view.nodes() {
            if n.health == NodeHealth::Dead && dead.len() < MAX_DEAD_LISTED {
                dead.push(n.id.clone());
            }
            if n.alive() {
                alive += 1;
            }
            if let Some(ModelState::Failed(e)) = n.status(&model).map(|s| &s.state) {
                failures.push(format!("{}: {}", n.id, e.message));
            }
            holding.push(n.hosts(&model));
            let (rtt_us, rtt_source) = caller.rtt_to(n);
            loads.push(n.node_load(nodes.len(), &model, &constraints, rtt_us, relay));
            nodes.push((
                n.id.clone(),
                n.member.addr.clone(),
                rtt_source,
                n.member.coordinate.clone(),
                n.member.peer_route(),
            ));
        }
        drop(view);
        drop(guard);
        let mut ranked = routing::rank_request(
            &loads,
            &RoutingDefaults::default(),
            &RouteRequest {
                payload_bytes: req.payload_bytes,
            },
        );
        // At most `max_replicas` nodes serve: once that many hold the model, route only there.
        let max = model.settings.max_replicas as usize;
        if max > 0 && ranked.iter().filter(|r| holding[r.key]).count() >= max {
            ranked.retain(|r| holding[r.key]);
        }
        if ranked.is_empty() {
            return Err(if alive > 0 && !failures.is_empty() {
                err(
                    ErrorCode::ModelLoadFailed,
                    format!(
                        "every node failed to load `{}` version `{}`: {}",
                        model.name,
                        model.version,
                        failures.join("; ")
                    ),
                )
            } else if !model.settings.constraints().is_empty() {
                err(
                    ErrorCode::NoCapacity,
                    format!(
                        "no capable node: no healthy node with {} can serve `{}` right now ({} nodes known, {alive} alive); it is never sent elsewhere",
                        model.settings.constraints(),
                        model.name,
                        nodes.len()
                    ),
                )
            } else {
                err(
                    ErrorCode::NoCapacity,
                    format!(
                        "no healthy node can serve `{}` right now ({} nodes known, {alive} alive)",
                        model.name,
                        nodes.len()
                    ),
                )
            });
        }
        // Best first, the winner of two random choices among the near-best at the head; the
        // SDK picks again per call from the same ranking (with its own load view).
        let tick = self.resolves.fetch_add(1, Ordering::Relaxed);
        let ranked = routing::order(
            Strategy::LatencyAware,
            ranked,
            tick,
            &mut rand::thread_rng(),
        );
        let candidates = ranked
            .iter()
            .map(|r| {
                let (id, addr, rtt_source, coordinate, peer) = &nodes[r.key];
                let l = &loads[r.key];
                Candidate {
                    node_id: id.clone(),
                    addr: addr.clone(),
                    loaded: l.loaded,
                    expected_us: r.expected_us,
                    parts: r.parts,
                    rtt_source: rtt_source.as_str().to_string(),
                    coordinate: coordinate.clone(),
                    concurrency: l.concurrency.max(1),
                    peer: peer.clone(),
                }
            })
            .collect();
        let coordinator = Some(own);
        let mut versions = vec![model.version.clone()];
        versions.extend(
            split
                .iter()
                .map(|w| w.version.clone())
                .filter(|v| *v != model.version),
        );
        let ticket = self.access.ticket(who, &model.name, versions)?;
        Ok(CtlResponse::Resolved(Resolution {
            model: model.name,
            version: model.version,
            inputs: model.inputs,
            outputs: model.outputs,
            candidates,
            ttl_ms: self.config.route_ttl.as_millis() as u64,
            split,
            coordinator,
            dead,
            ticket,
        }))
    }
}

/// The span of a resolve whose caller traces it (`skein.coordinator.resolve`, a child of the
/// caller's span); none otherwise.
fn resolve_span(req: &ResolveRequest) -> tracing::Span {
    match req.trace.filter(|t| t.sampled) {
        Some(t) => tracing::info_span!(
            "skein.coordinator.resolve",
            otel.kind = "server",
            trace_id = %t.trace_hex(),
            span_id = %t.child(rand::random()).span_hex(),
            parent_span_id = %t.span_hex(),
            model = %req.model,
            version = req.version.as_deref().unwrap_or(""),
            code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        ),
        None => tracing::Span::none(),
    }
}
