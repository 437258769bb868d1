//! `GET /metrics`: the mesh as the coordinator sees it, in the Prometheus text exposition format
//! (version 0.0.4): nodes, and per model version its replicas, queue, requests, runs, cold
//! starts, memory and what the autoscaler wants; per tenant and model version the metered
//! requests, compute seconds and cost. Built from one fresh `ListModels`, `ListNodes` and usage
//! query with the scraper's API key, so a scrape costs three control calls.

use skein_proto::prom;
use skein_proto::{ModelInfo, ModelState, NodeHealth, NodeInfo, UsageRow};
use std::fmt::Write;

pub use skein_proto::prom::CONTENT_TYPE;

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        prom::header(self.out, name, kind, help);
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", prom::esc(v)))
            .collect();
        let _ = writeln!(self.out, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// The exposition text for these models, nodes and metered usage (per tenant and version,
/// from the ledger: requests, compute seconds, cost).
pub fn render(models: &[ModelInfo], nodes: &[NodeInfo], usage: &[UsageRow]) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    f.header(
        "skein_node_up",
        "gauge",
        "1 when the node's heartbeats arrive on time (alive), else 0.",
    );
    for n in nodes {
        let up = f64::from(u8::from(n.health == NodeHealth::Alive));
        f.sample(
            "skein_node_up",
            &[("node", &n.node_id), ("health", n.health.as_str())],
            up,
        );
    }
    f.header(
        "skein_node_coordinate_error",
        "gauge",
        "Error estimate of the node's Vivaldi network coordinate (settled below 0.5).",
    );
    for n in nodes {
        if let Some(c) = &n.coordinate {
            f.sample(
                "skein_node_coordinate_error",
                &[("node", &n.node_id)],
                c.error,
            );
        }
    }
    // Per model version, summed over the nodes that report it.
    type Metric = (
        &'static str,
        &'static str,
        &'static str,
        fn(&ModelInfo) -> f64,
    );
    let metrics: [Metric; 8] = [
        (
            "skein_model_replicas_warm",
            "gauge",
            "Replicas loaded and ready.",
            |m| f64::from(m.warm_replicas),
        ),
        (
            "skein_model_replicas_loading",
            "gauge",
            "Replicas being fetched or loaded.",
            |m| f64::from(m.loading_replicas),
        ),
        (
            "skein_model_replicas_desired",
            "gauge",
            "Replicas the autoscaler wants warm now.",
            |m| {
                m.scaling
                    .as_ref()
                    .map_or(0.0, |s| f64::from(s.desired_replicas))
            },
        ),
        (
            "skein_model_queue_depth",
            "gauge",
            "Requests waiting, over all nodes.",
            |m| m.replicas.iter().map(|r| f64::from(r.queue_depth)).sum(),
        ),
        (
            "skein_model_in_flight",
            "gauge",
            "Requests running, over all nodes.",
            |m| m.replicas.iter().map(|r| f64::from(r.in_flight)).sum(),
        ),
        (
            "skein_model_runs_total",
            "counter",
            "Model runs (a micro-batch counts once), over live nodes.",
            |m| m.replicas.iter().map(|r| r.runs as f64).sum(),
        ),
        (
            "skein_model_cold_starts_total",
            "counter",
            "Request-triggered loads and new input shapes, over all nodes.",
            |m| m.cold_starts as f64,
        ),
        (
            "skein_model_memory_bytes",
            "gauge",
            "Memory held by loaded replicas.",
            |m| {
                m.replicas
                    .iter()
                    .filter(|r| r.state == ModelState::Loaded)
                    .map(|r| r.memory_bytes as f64)
                    .sum()
            },
        ),
    ];
    for (name, kind, help, value) in metrics {
        f.header(name, kind, help);
        for m in models {
            f.sample(
                name,
                &[("model", &m.name), ("version", &m.version)],
                value(m),
            );
        }
    }
    type UsageMetric = (&'static str, &'static str, fn(&UsageRow) -> f64);
    let metered: [UsageMetric; 4] = [
        (
            "skein_usage_requests_total",
            "Metered requests, from the usage ledger.",
            |u| u.requests as f64,
        ),
        (
            "skein_usage_compute_seconds_total",
            "Metered compute time, seconds.",
            |u| u.compute_us as f64 / 1e6,
        ),
        (
            "skein_usage_cold_starts_total",
            "Metered requests that waited for a model load.",
            |u| u.cold_starts as f64,
        ),
        (
            "skein_usage_cost_total",
            "Cost at the configured prices.",
            |u| u.cost,
        ),
    ];
    for (name, help, value) in metered {
        f.header(name, "counter", help);
        for u in usage {
            f.sample(
                name,
                &[
                    ("tenant", &u.tenant),
                    ("model", &u.model),
                    ("version", &u.version),
                ],
                value(u),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_has_a_family() {
        let text = render(&[], &[], &[]);
        for line in text.lines() {
            assert!(
                line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "{line}"
            );
        }
        assert!(text.contains("# TYPE skein_model_runs_total counter"));
    }
}
