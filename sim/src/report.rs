//! Policy sets, and the outputs: a text table, JSON, and a hand-written SVG timeline.

use std::fmt::Write as _;

use serde::Serialize;
use skein_policy::routing::Strategy;

use crate::engine::{KeepAlivePolicy, Metrics, Policy, Routing};
use crate::scenario::S;

/// What `--compare` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// Routing strategies (with predictive keep-alive and autoscaling).
    Routing,
    /// Keep-alive policies and always-on (with latency-aware routing).
    KeepAlive,
    /// Both.
    All,
}

impl std::str::FromStr for Compare {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "routing" => Ok(Compare::Routing),
            "keepalive" | "keep-alive" => Ok(Compare::KeepAlive),
            "all" => Ok(Compare::All),
            _ => Err(format!(
                "unknown comparison `{s}` (routing, keepalive, all)"
            )),
        }
    }
}

fn policy(name: &str, routing: Routing, keep_alive: KeepAlivePolicy) -> Policy {
    Policy {
        name: name.to_string(),
        routing,
        keep_alive,
    }
}

/// The policies for a comparison.
pub fn policies(c: Compare) -> Vec<Policy> {
    let pred = KeepAlivePolicy::Predictive;
    let routing = vec![
        policy("random", Routing::Random, pred),
        policy("round-robin", Routing::Strategy(Strategy::RoundRobin), pred),
        policy(
            "least-loaded",
            Routing::Strategy(Strategy::LeastLoaded),
            pred,
        ),
        policy(
            "latency+predictive",
            Routing::Strategy(Strategy::LatencyAware),
            pred,
        ),
    ];
    let lat = Routing::Strategy(Strategy::LatencyAware);
    let keep = vec![
        policy("keepalive-none", lat, KeepAlivePolicy::None),
        policy("fixed-10min", lat, KeepAlivePolicy::Fixed(600 * S)),
        policy("fixed-60min", lat, KeepAlivePolicy::Fixed(3_600 * S)),
        policy("latency+predictive", lat, pred),
        policy("always-on", lat, KeepAlivePolicy::AlwaysOn),
    ];
    match c {
        Compare::Routing => routing,
        Compare::KeepAlive => keep,
        Compare::All => {
            let mut v = routing;
            v.extend(keep.into_iter().filter(|p| p.keep_alive != pred));
            v
        }
    }
}

/// The whole output of a run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// What the workload is.
    pub notes: String,
    /// Nodes simulated.
    pub nodes: usize,
    /// Models (apps) simulated.
    pub models: usize,
    /// Requests generated.
    pub requests: usize,
    /// Seed.
    pub seed: u64,
    /// SLO, ms.
    pub slo_ms: f64,
    /// One entry per policy.
    pub runs: Vec<Metrics>,
}

/// The report as a text table.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "scenario {} ({}): {} nodes, {} models, {} requests, seed {}, SLO {} ms",
        r.scenario, r.notes, r.nodes, r.models, r.requests, r.seed, r.slo_ms
    );
    let _ = writeln!(
        s,
        "{:<20} {:>9} {:>9} {:>8} {:>8} {:>13} {:>13} {:>7} {:>8} {:>7} {:>7}",
        "policy",
        "p50 ms",
        "p99 ms",
        "SLO %",
        "cold %",
        "warm node-s",
        "cost",
        "util %",
        "scale",
        "peak",
        "dropped"
    );
    for m in &r.runs {
        let _ = writeln!(
            s,
            "{:<20} {:>9.1} {:>9.1} {:>8.2} {:>8.3} {:>13.0} {:>13.0} {:>7.1} {:>8} {:>7} {:>7}",
            m.policy,
            m.p50_ms,
            m.p99_ms,
            m.slo_attainment * 100.0,
            m.cold_start_rate * 100.0,
            m.warm_node_s,
            m.cost,
            m.utilisation * 100.0,
            m.scale_changes,
            m.peak_replicas,
            m.dropped
        );
    }
    s
}

const COLOURS: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG with two panels over time: p99 latency (log scale) and warm replicas, one line per
/// policy.
pub fn svg(r: &Report) -> String {
    let (w, h) = (960.0f64, 640.0f64);
    let (left, right) = (70.0, 200.0);
    let pw = w - left - right;
    let panel_h = 240.0;
    let tops = [50.0, 350.0];
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="24" font-size="15">skein-sim {}: {} requests, SLO {} ms</text>"#,
        escape(&r.scenario),
        r.requests,
        r.slo_ms
    );
    let n = r.runs.first().map_or(0, |m| m.timeline.p99_ms.len());
    let bucket_s = r.runs.first().map_or(1.0, |m| m.timeline.bucket_s);
    if n == 0 {
        s.push_str("</svg>\n");
        return s;
    }
    let x = |i: usize| left + pw * (i as f64 + 0.5) / n as f64;
    // Panel 1: p99 latency, log10 ms.
    let lat_max = r
        .runs
        .iter()
        .flat_map(|m| m.timeline.p99_ms.iter().copied())
        .fold(1.0f64, f64::max);
    let (lo, hi) = (0.0f64, lat_max.log10().ceil().max(1.0));
    let y1 = |v: f64| {
        let l = v.max(1.0).log10();
        tops[0] + panel_h - (l - lo) / (hi - lo) * panel_h
    };
    let warm_max = r
        .runs
        .iter()
        .flat_map(|m| m.timeline.warm_replicas.iter().copied())
        .fold(1.0f64, f64::max);
    let y2 = |v: f64| tops[1] + panel_h - v / warm_max * panel_h;
    for (p, title) in [(0, "p99 latency (ms, log)"), (1, "warm replicas")] {
        let top = tops[p];
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{top}" width="{pw}" height="{panel_h}" fill="none" stroke="#999"/>"##
        );
        let _ = writeln!(s, r#"<text x="{left}" y="{}">{title}</text>"#, top - 6.0);
    }
    // Y ticks.
    let mut d = lo as i32;
    while d as f64 <= hi {
        let v = 10f64.powi(d);
        let yy = y1(v);
        grid_line(&mut s, left, pw, yy, &v.to_string());
        d += 1;
    }
    if r.slo_ms >= 1.0 {
        let yy = y1(r.slo_ms);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#d00" stroke-dasharray="4 3"/><text x="{}" y="{:.1}" fill="#d00">SLO</text>"##,
            left + pw,
            left + pw + 4.0,
            yy + 4.0
        );
    }
    for k in 0..=4 {
        let v = warm_max * k as f64 / 4.0;
        let yy = y2(v);
        grid_line(&mut s, left, pw, yy, &format!("{v:.0}"));
    }
    // X ticks (hours or minutes).
    let span_s = bucket_s * n as f64;
    let (unit, name) = if span_s > 4.0 * 3_600.0 {
        (3_600.0, "h")
    } else {
        (60.0, "min")
    };
    let step = ((span_s / unit) / 8.0).ceil().max(1.0);
    let mut t = 0.0;
    while t <= span_s / unit + 1e-9 {
        let xx = left + pw * (t * unit / span_s);
        let _ = writeln!(
            s,
            r#"<text x="{xx:.1}" y="{}" text-anchor="middle">{t}{name}</text>"#,
            tops[1] + panel_h + 16.0
        );
        t += step;
    }
    for (i, m) in r.runs.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let mut pts = String::new();
        for (j, v) in m.timeline.p99_ms.iter().enumerate() {
            if *v > 0.0 {
                let _ = write!(pts, "{:.1},{:.1} ", x(j), y1(*v));
            }
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{pts}"/>"#
        );
        let mut pts = String::new();
        for (j, v) in m.timeline.warm_replicas.iter().enumerate() {
            let _ = write!(pts, "{:.1},{:.1} ", x(j), y2(*v));
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{pts}"/>"#
        );
        let ly = 60.0 + 18.0 * i as f64;
        let lx = left + pw + 14.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            escape(&m.policy)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A light horizontal grid line at `yy` across the panel, labelled on the left.
fn grid_line(s: &mut String, left: f64, pw: f64, yy: f64, label: &str) {
    let _ = writeln!(
        s,
        r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
        left + pw,
        left - 4.0,
        yy + 4.0
    );
}
