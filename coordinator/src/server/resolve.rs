//! `Resolve`: where a caller should send its requests for a model version, best node first,
//! with a route ticket.

use super::{err, Reply, Shared};
use crate::access::Caller;
use crate::membership::Membership;
use skein_policy::routing::{
    self, NodeLoad, Position, RouteRequest, RoutingDefaults, RttEvidence, RttSource, Strategy,
};
use skein_policy::vivaldi::CoordinateExt;
use skein_proto::{
    Candidate, CtlResponse, ErrorCode, ModelState, NodeHealth, Resolution, ResolveRequest,
};
use skein_store::Scope;
use std::collections::HashMap;
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
        /// RTT samples from one caller that are looked at.
        const MAX_SAMPLES: usize = 32;
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
        let t = self.thresholds();
        let membership = &st.membership;
        let pos = &req.position;
        // Where the caller is: its own coordinate, or a node's for `skein route --near`.
        let near = pos
            .near
            .as_ref()
            .map(|id| {
                membership.member(id).ok_or_else(|| {
                    err(
                        ErrorCode::UnknownNode,
                        format!("no node `{id}` in this mesh"),
                    )
                })
            })
            .transpose()?;
        let own = st.vivaldi.coordinate().clone();
        // A caller with no settled coordinate of its own (a new process, a CLI call) that does
        // not say where it is (no region or zone) is taken to sit at the coordinator: the
        // coordinator's own measured RTT to each node applies. One that names its region or
        // zone is ranked by those labels instead (it may be far from the coordinator).
        let at_coordinator = near.is_none()
            && !pos.coordinate.as_ref().is_some_and(|c| c.settled())
            && pos.region.is_none()
            && pos.zone.is_none();
        let coordinate = match (near, &pos.coordinate) {
            (Some(m), _) => m.coordinate.clone(),
            (None, Some(c)) if c.settled() => Some(c.clone()),
            // A caller taken to sit at the coordinator is placed at its coordinate, on an access
            // link as long as the RTT the coordinator measures to it (used where the
            // coordinator has no measurement of a node yet).
            _ if at_coordinator && own.settled() => {
                let mut c = own.clone();
                c.height += caller_rtt.as_secs_f64() * 1e6;
                Some(c)
            }
            _ => pos.coordinate.clone(),
        };
        let caller = Position {
            coordinate,
            region: near
                .and_then(|m| m.labels.get("region").cloned())
                .or_else(|| pos.region.clone()),
            zone: near
                .and_then(|m| m.labels.get("zone").cloned())
                .or_else(|| pos.zone.clone()),
        };
        if near.is_none() {
            st.scaler.observe_caller(
                &model.name,
                &model.version,
                model.settings.idle_timeout_ms,
                &caller,
                now,
            );
        }
        let samples: HashMap<&str, u64> = pos
            .rtt_samples
            .iter()
            .take(MAX_SAMPLES)
            .filter(|s| s.rtt_us > 0)
            .map(|s| (s.node_id.as_str(), s.rtt_us))
            .collect();
        let mut loads = Vec::new();
        let mut nodes = Vec::new();
        let mut failures = Vec::new();
        let mut holding: Vec<bool> = Vec::new();
        let mut alive = 0usize;
        let mut dead = Vec::new();
        for (id, m) in membership.members() {
            let health = Membership::health(m, now, t);
            if health == NodeHealth::Dead && dead.len() < MAX_DEAD_LISTED {
                dead.push(id.clone());
            }
            let status = m
                .models
                .iter()
                .find(|s| s.name == model.name && s.version == model.version);
            if health == NodeHealth::Alive {
                alive += 1;
            }
            let state = status.map(|s| &s.state);
            if let Some(ModelState::Failed(e)) = state {
                failures.push(format!("{id}: {}", e.message));
            }
            holding.push(matches!(
                state,
                Some(ModelState::Loaded | ModelState::Loading | ModelState::Fetching)
            ));
            let node_pos = Position {
                coordinate: m.coordinate.clone(),
                region: m.labels.get("region").cloned(),
                zone: m.labels.get("zone").cloned(),
            };
            // Ranked as if at the `near` node: that node is at distance 0, the rest by
            // coordinates or labels. Otherwise the caller's own sample, else (for a caller
            // placed at the coordinator) the coordinator's measured RTT to the node.
            let (rtt_us, rtt_source) = if near.is_some_and(|n| std::ptr::eq(n, m)) {
                (0.0, RttSource::Coordinates)
            } else {
                routing::caller_rtt(&RttEvidence {
                    sample_us: samples
                        .get(id.as_str())
                        .filter(|_| near.is_none())
                        .map(|&s| s as f64),
                    via_coordinator_us: m.rtt_us.filter(|_| at_coordinator),
                    caller_access_us: caller_rtt.as_secs_f64() * 1e6,
                    caller: Some(&caller),
                    node: Some(&node_pos),
                })
            };
            loads.push(NodeLoad {
                key: nodes.len(),
                healthy: health == NodeHealth::Alive,
                can_serve: !matches!(state, Some(ModelState::Failed(_))),
                loaded: matches!(state, Some(ModelState::Loaded)),
                queued: status.map_or(0, |s| s.queue_depth),
                in_flight: status.map_or(0, |s| s.in_flight),
                concurrency: status.map_or(1, |s| s.concurrency),
                service_us: status
                    .and_then(|s| (s.service_time_us > 0.0).then_some(s.service_time_us)),
                load_us: status.and_then(|s| (s.load_time_us > 0).then_some(s.load_time_us as f64)),
                rtt_us: Some(rtt_us),
                // A node reports a model once it holds its artifact (on disk or loaded).
                artifact_cached: status.is_some_and(|s| !matches!(s.state, ModelState::Fetching)),
                artifact_bytes: model.size,
                allowed: membership.eligible(&model.settings, &m.labels, now, t),
                ..NodeLoad::default()
            });
            nodes.push((id.clone(), m.addr.clone(), rtt_source, m.coordinate.clone()));
        }
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
                let (id, addr, rtt_source, coordinate) = &nodes[r.key];
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
