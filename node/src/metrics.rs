//! The node's own Prometheus endpoint (`metrics_listen`): requests by model, version, tenant
//! and outcome code, a latency histogram per model version, and per model version its queue,
//! in-flight requests, cold starts, runs, loads and unloads (by reason), memory and state;
//! `GET /ready` says whether the node
//! serves (joined, heartbeats answered, not draining).
//!
//! ```text
//!  handle_infer_stream ── record(model, version, tenant, code, latency) ──▶ NodeMetrics
//!  GET /metrics ──▶ render(NodeMetrics, slot statuses)        GET /ready ──▶ 200 / 503
//! ```
//!
//! Label values come only from what the node verified: a model it does not hold is counted as
//! `model="-"`, a caller without a valid ticket as `tenant="-"`; the series are capped at
//! [`MAX_SERIES`] (more go to one `model="-"` series), so a hostile caller cannot grow them.

use crate::executor::{LifecycleCounts, UnloadReason};
use skein_proto::prom::{esc, RequestStats};
use skein_proto::{ModelState, ModelStatus};
use std::fmt::Write;
use std::time::Duration;

pub use skein_proto::prom::{BUCKETS, CONTENT_TYPE, MAX_SERIES};

/// Counters of the requests this node answered.
#[derive(Debug)]
pub struct NodeMetrics {
    requests: RequestStats,
    /// Inference streams served by path: direct (QUIC or the peer layer's direct
    /// connections), relayed, hole-punched.
    by_path: [std::sync::atomic::AtomicU64; 3],
}

impl Default for NodeMetrics {
    fn default() -> Self {
        NodeMetrics {
            requests: RequestStats::new(
                (
                    "skein_requests_total",
                    "Inference requests answered by this node, by outcome code.",
                ),
                (
                    "skein_request_duration_seconds",
                    "Time from reading a request to having its answer, on this node.",
                ),
                &["model", "version", "tenant", "code"],
                2,
            ),
            by_path: Default::default(),
        }
    }
}

impl NodeMetrics {
    /// Count one answered request (`code` is `ok` or the error code) that took `latency`.
    pub fn record(&self, model: &str, version: &str, tenant: &str, code: &str, latency: Duration) {
        self.requests
            .record(&[model, version, tenant, code], latency);
    }

    /// Count one inference stream that came on `path`.
    pub fn record_path(&self, path: skein_peer::Path) {
        let i = match path {
            skein_peer::Path::Direct => 0,
            skein_peer::Path::Relayed => 1,
            skein_peer::Path::HolePunched => 2,
        };
        self.by_path[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The peer layer's part of the exposition text: calls by path, relayed calls, hole
    /// punches (`peer`: the peer layer's counters, when it runs).
    pub fn render_peer(&self, node: &str, peer: Option<&skein_peer::PeerMetrics>) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let mut out = String::new();
        let node = esc(node);
        let _ = writeln!(out, "# HELP skein_node_calls_by_path_total Inference streams this node served, by the path they came on.");
        let _ = writeln!(out, "# TYPE skein_node_calls_by_path_total counter");
        for (i, path) in ["direct", "relayed", "hole-punched"].iter().enumerate() {
            let _ = writeln!(
                out,
                "skein_node_calls_by_path_total{{node=\"{node}\",path=\"{path}\"}} {}",
                self.by_path[i].load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP skein_node_relayed_calls_total Inference streams that came through a relay."
        );
        let _ = writeln!(out, "# TYPE skein_node_relayed_calls_total counter");
        let _ = writeln!(
            out,
            "skein_node_relayed_calls_total{{node=\"{node}\"}} {}",
            self.by_path[1].load(Relaxed)
        );
        if let Some(p) = peer {
            for (name, help, value) in [
                (
                    "skein_node_hole_punch_attempts_total",
                    "Hole punches (DCUtR) tried.",
                    p.hole_punch_attempts(),
                ),
                (
                    "skein_node_hole_punch_successes_total",
                    "Hole punches that made a direct connection.",
                    p.hole_punch_successes.load(Relaxed),
                ),
                (
                    "skein_node_relay_reservations_total",
                    "Relay reservations made (renewals excluded): one per relay while they hold.",
                    p.relay_reservations.load(Relaxed),
                ),
                (
                    "skein_node_relay_reservations_lost_total",
                    "Relay reservations lost (each made again at the next retry).",
                    p.relay_reservations_lost.load(Relaxed),
                ),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} counter");
                let _ = writeln!(out, "{name}{{node=\"{node}\"}} {value}");
            }
        }
        out
    }

    /// The exposition text: these counters, `slots` (per model version), and whether the node
    /// is `ready`.
    pub fn render(
        &self,
        node: &str,
        ready: bool,
        slots: &[ModelStatus],
        lifecycle: &[LifecycleCounts],
    ) -> String {
        let mut out = String::new();
        let node = esc(node);
        let _ = writeln!(out, "# HELP skein_node_ready 1 when the node serves (joined, heartbeats answered, not draining).");
        let _ = writeln!(out, "# TYPE skein_node_ready gauge");
        let _ = writeln!(
            out,
            "skein_node_ready{{node=\"{node}\"}} {}",
            u8::from(ready)
        );
        self.requests.render(&mut out);
        type Gauge = (
            &'static str,
            &'static str,
            &'static str,
            fn(&ModelStatus) -> f64,
        );
        let gauges: [Gauge; 7] = [
            (
                "skein_model_queue_depth",
                "gauge",
                "Requests waiting.",
                |s| f64::from(s.queue_depth),
            ),
            ("skein_model_in_flight", "gauge", "Requests running.", |s| {
                f64::from(s.in_flight)
            }),
            (
                "skein_model_cold_starts_total",
                "counter",
                "Request-triggered loads and new input shapes.",
                |s| s.cold_starts as f64,
            ),
            (
                "skein_model_runs_total",
                "counter",
                "Model runs (a micro-batch counts once).",
                |s| s.runs as f64,
            ),
            (
                "skein_model_memory_bytes",
                "gauge",
                "Memory held by the loaded replica.",
                |s| s.memory_bytes as f64,
            ),
            (
                "skein_model_loaded",
                "gauge",
                "1 when the replica is loaded and ready.",
                |s| f64::from(u8::from(s.state == ModelState::Loaded)),
            ),
            (
                "skein_model_load_seconds",
                "gauge",
                "Load time of the replica: the slowest recent load, easing down a third of the way per faster load.",
                |s| s.load_time_us as f64 / 1e6,
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for s in slots {
                let _ = writeln!(
                    out,
                    "{name}{{model=\"{}\",version=\"{}\",state=\"{}\"}} {}",
                    esc(&s.name),
                    esc(&s.version),
                    s.state.as_str(),
                    value(s)
                );
            }
        }
        // Counters without the `state` label, so that a series never restarts when the
        // replica's state changes.
        let _ = writeln!(
            out,
            "# HELP skein_model_loads_total Replica loads, by result (ok, failed)."
        );
        let _ = writeln!(out, "# TYPE skein_model_loads_total counter");
        for l in lifecycle {
            for (result, n) in [("ok", l.loads), ("failed", l.load_failures)] {
                let _ = writeln!(
                    out,
                    "skein_model_loads_total{{model=\"{}\",version=\"{}\",result=\"{result}\"}} {n}",
                    esc(&l.name),
                    esc(&l.version),
                );
            }
        }
        let _ = writeln!(out, "# HELP skein_model_unloads_total Replica unloads, by reason (idle: keep-alive ran out; memory: evicted for another model; scaler: the autoscaler expects no call soon).");
        let _ = writeln!(out, "# TYPE skein_model_unloads_total counter");
        for l in lifecycle {
            for (reason, n) in UnloadReason::ALL.iter().zip(l.unloads) {
                let _ = writeln!(
                    out,
                    "skein_model_unloads_total{{model=\"{}\",version=\"{}\",reason=\"{}\"}} {n}",
                    esc(&l.name),
                    esc(&l.version),
                    reason.as_str(),
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_readiness_are_rendered() {
        let m = NodeMetrics::default();
        m.record("m", "1", "acme", "ok", Duration::from_millis(3));
        m.record("m", "1", "acme", "ok", Duration::from_millis(30));
        // Series, buckets and caps: skein_proto::prom's tests.
        m.record("m", "1", "-", "invalid_ticket", Duration::from_micros(10));
        let lifecycle = [LifecycleCounts {
            name: "m".into(),
            version: "1".into(),
            loads: 2,
            load_failures: 1,
            unloads: [1, 0, 1],
        }];
        let text = m.render("n1", true, &[], &lifecycle);
        assert!(text.contains(r#"skein_model_loads_total{model="m",version="1",result="ok"} 2"#));
        assert!(
            text.contains(r#"skein_model_loads_total{model="m",version="1",result="failed"} 1"#)
        );
        assert!(
            text.contains(r#"skein_model_unloads_total{model="m",version="1",reason="idle"} 1"#)
        );
        assert!(
            text.contains(r#"skein_model_unloads_total{model="m",version="1",reason="memory"} 0"#)
        );
        assert!(text
            .contains(r#"skein_requests_total{model="m",version="1",tenant="acme",code="ok"} 2"#));
        assert!(text.contains(
            r#"skein_requests_total{model="m",version="1",tenant="-",code="invalid_ticket"} 1"#
        ));
        assert!(text.contains(r#"skein_node_ready{node="n1"} 1"#));
    }
}
