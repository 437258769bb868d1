//! The node's own Prometheus endpoint (`metrics_listen`): requests by model, version, tenant
//! and outcome code, a latency histogram per model version, and per model version its queue,
//! in-flight requests, cold starts, runs, memory and state; `GET /ready` says whether the node
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

use skein_proto::{ModelState, ModelStatus};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Request series kept at most.
pub const MAX_SERIES: usize = 4096;
/// Latency histogram bucket bounds, seconds.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// The content type of the exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Inner {
    /// (model, version, tenant, code) → requests.
    requests: BTreeMap<(String, String, String, String), u64>,
    /// (model, version) → latency of answered requests.
    latency: BTreeMap<(String, String), Histogram>,
}

/// Counters of the requests this node answered.
#[derive(Default)]
pub struct NodeMetrics {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMetrics").finish_non_exhaustive()
    }
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl NodeMetrics {
    /// Count one answered request (`code` is `ok` or the error code) that took `latency`.
    pub fn record(&self, model: &str, version: &str, tenant: &str, code: &str, latency: Duration) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = (
            model.to_string(),
            version.to_string(),
            tenant.to_string(),
            code.to_string(),
        );
        if m.requests.len() >= MAX_SERIES && !m.requests.contains_key(&key) {
            key = ("-".into(), "-".into(), "-".into(), code.to_string());
        }
        *m.requests.entry(key).or_default() += 1;
        let lkey = (model.to_string(), version.to_string());
        if m.latency.len() >= MAX_SERIES && !m.latency.contains_key(&lkey) {
            return;
        }
        let h = m.latency.entry(lkey).or_default();
        let s = latency.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    /// The exposition text: these counters, `slots` (per model version), and whether the node
    /// is `ready`.
    pub fn render(&self, node: &str, ready: bool, slots: &[ModelStatus]) -> String {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let node = esc(node);
        let _ = writeln!(out, "# HELP skein_node_ready 1 when the node serves (joined, heartbeats answered, not draining).");
        let _ = writeln!(out, "# TYPE skein_node_ready gauge");
        let _ = writeln!(
            out,
            "skein_node_ready{{node=\"{node}\"}} {}",
            u8::from(ready)
        );
        let _ = writeln!(out, "# HELP skein_requests_total Inference requests answered by this node, by outcome code.");
        let _ = writeln!(out, "# TYPE skein_requests_total counter");
        for ((model, version, tenant, code), n) in &m.requests {
            let _ = writeln!(
                out,
                "skein_requests_total{{model=\"{}\",version=\"{}\",tenant=\"{}\",code=\"{}\"}} {n}",
                esc(model),
                esc(version),
                esc(tenant),
                esc(code)
            );
        }
        let _ = writeln!(out, "# HELP skein_request_duration_seconds Time from reading a request to having its answer, on this node.");
        let _ = writeln!(out, "# TYPE skein_request_duration_seconds histogram");
        for ((model, version), h) in &m.latency {
            let labels = format!("model=\"{}\",version=\"{}\"", esc(model), esc(version));
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "skein_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "skein_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "skein_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "skein_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
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
                "Measured load time of the replica.",
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
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_bucket_and_cap_series() {
        let m = NodeMetrics::default();
        m.record("m", "1", "acme", "ok", Duration::from_millis(3));
        m.record("m", "1", "acme", "ok", Duration::from_millis(30));
        m.record("m", "1", "-", "invalid_ticket", Duration::from_micros(10));
        let text = m.render("n1", true, &[]);
        assert!(text
            .contains(r#"skein_requests_total{model="m",version="1",tenant="acme",code="ok"} 2"#));
        assert!(text.contains(
            r#"skein_requests_total{model="m",version="1",tenant="-",code="invalid_ticket"} 1"#
        ));
        assert!(text.contains(
            r#"skein_request_duration_seconds_bucket{model="m",version="1",le="0.005"} 2"#
        ));
        assert!(text.contains(
            r#"skein_request_duration_seconds_bucket{model="m",version="1",le="0.05"} 3"#
        ));
        assert!(text.contains(r#"skein_request_duration_seconds_count{model="m",version="1"} 3"#));
        assert!(text.contains(r#"skein_node_ready{node="n1"} 1"#));
        for i in 0..MAX_SERIES + 10 {
            m.record("m", &i.to_string(), "t", "ok", Duration::ZERO);
        }
        let inner = m.inner.lock().unwrap();
        assert!(inner.requests.len() <= MAX_SERIES + 1);
        assert!(inner.latency.len() <= MAX_SERIES);
    }
}
