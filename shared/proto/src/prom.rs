//! Request counters and latency histograms in the Prometheus text exposition format (0.0.4),
//! shared by the node's `/metrics` and the HTTP gateway's. Bounded: at most [`MAX_SERIES`]
//! label sets each; further ones are counted under `-` labels (counters) or not at all
//! (histograms), so callers choosing names cannot grow memory.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Series kept at most, per family.
pub const MAX_SERIES: usize = 4096;
/// Latency histogram bucket bounds, seconds.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// The content type of the exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A label value with `\`, `"` and newlines escaped.
pub fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Write `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// `name1="v1",name2="v2"`, escaped.
pub fn labels(names: &[&str], values: &[String]) -> String {
    names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", esc(v)))
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<Vec<String>, u64>,
    latency: BTreeMap<Vec<String>, Histogram>,
}

/// A counter family `NAME_total{labels...}` and a histogram family
/// `DURATION_seconds{first labels...}` over the same requests.
pub struct RequestStats {
    counter: (&'static str, &'static str),
    histogram: (&'static str, &'static str),
    labels: &'static [&'static str],
    /// The histogram is labelled by this many of the first labels.
    latency_labels: usize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for RequestStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestStats")
            .field("counter", &self.counter.0)
            .finish_non_exhaustive()
    }
}

impl RequestStats {
    /// Counter `counter` = (name, help) labelled by `labels`; histogram `histogram` labelled by
    /// the first `latency_labels` of them.
    pub fn new(
        counter: (&'static str, &'static str),
        histogram: (&'static str, &'static str),
        labels: &'static [&'static str],
        latency_labels: usize,
    ) -> RequestStats {
        RequestStats {
            counter,
            histogram,
            labels,
            latency_labels: latency_labels.min(labels.len()),
            inner: Mutex::default(),
        }
    }

    /// Count one request with these label `values` (in `labels` order) that took `latency`.
    pub fn record(&self, values: &[&str], latency: Duration) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        key.resize(self.labels.len(), "-".into());
        let lkey = key[..self.latency_labels].to_vec();
        if m.requests.len() >= MAX_SERIES && !m.requests.contains_key(&key) {
            // Keep the last label (the outcome code) and fold the rest.
            let last = key.last().cloned().unwrap_or_default();
            key = vec!["-".to_string(); self.labels.len()];
            if let Some(l) = key.last_mut() {
                *l = last;
            }
        }
        *m.requests.entry(key).or_default() += 1;
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

    /// Series held (counter, histogram).
    pub fn series(&self) -> (usize, usize) {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (m.requests.len(), m.latency.len())
    }

    /// Append both families to `out`.
    pub fn render(&self, out: &mut String) {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (name, help) = self.counter;
        header(out, name, "counter", help);
        for (values, n) in &m.requests {
            let _ = writeln!(out, "{name}{{{}}} {n}", labels(self.labels, values));
        }
        let (name, help) = self.histogram;
        header(out, name, "histogram", help);
        for (values, h) in &m.latency {
            let l = labels(&self.labels[..self.latency_labels], values);
            let sep = if l.is_empty() { "" } else { "," };
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(out, "{name}_bucket{{{l}{sep}le=\"{b}\"}} {}", h.counts[i]);
            }
            let _ = writeln!(out, "{name}_bucket{{{l}{sep}le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum{{{l}}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{{l}}} {}", h.count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> RequestStats {
        RequestStats::new(
            ("skein_requests_total", "Requests."),
            ("skein_request_duration_seconds", "Latency."),
            &["model", "version", "tenant", "code"],
            2,
        )
    }

    #[test]
    fn counts_bucket_and_cap_series() {
        let m = stats();
        m.record(&["m", "1", "acme", "ok"], Duration::from_millis(3));
        m.record(&["m", "1", "acme", "ok"], Duration::from_millis(30));
        m.record(
            &["m", "1", "-", "invalid_ticket"],
            Duration::from_micros(10),
        );
        let mut text = String::new();
        m.render(&mut text);
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
        assert!(text.contains("# TYPE skein_request_duration_seconds histogram"));
        for i in 0..MAX_SERIES + 10 {
            m.record(&["m", &i.to_string(), "t", "ok"], Duration::ZERO);
        }
        let (requests, latency) = m.series();
        assert!(requests <= MAX_SERIES + 1, "{requests}");
        assert!(latency <= MAX_SERIES, "{latency}");
        let mut text = String::new();
        m.render(&mut text);
        assert!(
            text.contains(r#"skein_requests_total{model="-",version="-",tenant="-",code="ok"}"#)
        );
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let m = stats();
        m.record(&["a\"b"], Duration::ZERO);
        let mut text = String::new();
        m.render(&mut text);
        assert!(
            text.contains(r#"model="a\"b",version="-",tenant="-",code="-""#),
            "{text}"
        );
    }
}
