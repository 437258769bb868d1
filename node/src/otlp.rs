//! Trace export: `tracing` spans to an OpenTelemetry collector over OTLP/HTTP with JSON bodies
//! (`POST {endpoint}/v1/traces`), with no OpenTelemetry SDK in the build.
//!
//! ```text
//!  span closes ──▶ OtlpLayer ──try_send──▶ bounded queue ──▶ exporter thread ──POST──▶ collector
//!                  (ids, times,            (full: dropped    (batches of ≤ 512,
//!                   attributes)             and counted)      every second)
//! ```
//!
//! A span takes part in a trace when it, or a span it was opened under, carries the fields
//! `trace_id` (32 hex digits), `span_id` (16 hex) and optionally `parent_span_id`: that is how
//! the SDK, the coordinator, the HTTP gateway and the node mark the spans of a request whose
//! [`TraceContext`](skein_proto::TraceContext) came over the wire. Spans under them inherit the
//! trace and get an id of their own; spans of no trace are not exported. `otel.kind`
//! (`server`, `client`, `internal`) and `otel.status_code` (`ok`, `error`) map to the span's
//! kind and status; every other field becomes an attribute.
//!
//! Everything is bounded: the queue (spans waiting), the batch, the attributes of a span and
//! the length of each value. The exporter never blocks the request path: a full queue drops the
//! span and counts it, a collector that is down costs one failed POST per batch (the first
//! failure and then every hundredth is logged).

// The exporter is a plain thread with blocking IO, outside tokio: std's clock is the right one.
#![allow(clippy::disallowed_types)]

use serde_json::{json, Value};
use std::fmt;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Spans waiting for export; beyond this they are dropped (and counted).
pub const MAX_QUEUED_SPANS: usize = 4096;
/// Spans per POST.
pub const MAX_BATCH: usize = 512;
/// Attributes kept per span.
const MAX_ATTRIBUTES: usize = 32;
/// Bytes kept per attribute value.
const MAX_VALUE_LEN: usize = 512;

/// Where and as what to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// Host and port of the collector's OTLP/HTTP receiver (usually port 4318).
    host: String,
    /// Path of the traces endpoint, `/v1/traces` unless the URL named one.
    path: String,
    /// `service.name` of the resource (e.g. `skein-node`).
    pub service_name: String,
    /// How often a partial batch is sent.
    pub interval: Duration,
}

impl OtlpConfig {
    /// From an endpoint URL as `OTEL_EXPORTER_OTLP_ENDPOINT` gives it (`http://host:4318`,
    /// traces at `/v1/traces` below it) or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` does (the full
    /// URL, `traces_url = true`). Only plain `http://`: run a local collector for TLS.
    pub fn from_url(url: &str, traces_url: bool, service_name: &str) -> Result<OtlpConfig, String> {
        let rest = url.trim().strip_prefix("http://").ok_or_else(|| {
            format!("OTLP endpoint `{url}`: only http:// is supported (run a local collector for https)")
        })?;
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if host.is_empty() || !host.contains(':') {
            return Err(format!(
                "OTLP endpoint `{url}`: expected http://HOST:PORT (the OTLP/HTTP port is usually 4318)"
            ));
        }
        let path = path.trim_end_matches('/');
        let path = if traces_url && !path.is_empty() {
            path.to_string()
        } else {
            format!("{path}/v1/traces")
        };
        Ok(OtlpConfig {
            host: host.to_string(),
            path,
            service_name: service_name.to_string(),
            interval: Duration::from_secs(1),
        })
    }

    /// From the standard environment: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; `OTEL_SERVICE_NAME` overrides `default_service`. `None`
    /// when neither endpoint is set.
    pub fn from_env(default_service: &str) -> Option<Result<OtlpConfig, String>> {
        let service = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| default_service.to_string());
        let var = |k: &str| std::env::var(k).ok().filter(|s| !s.trim().is_empty());
        if let Some(url) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            return Some(OtlpConfig::from_url(&url, true, &service));
        }
        var("OTEL_EXPORTER_OTLP_ENDPOINT").map(|url| OtlpConfig::from_url(&url, false, &service))
    }

    /// The traces URL.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.host, self.path)
    }
}

/// A finished span, as exported.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    /// Span name.
    pub name: String,
    /// Trace id.
    pub trace_id: u128,
    /// This span's id.
    pub span_id: u64,
    /// The parent span's id, when it has one.
    pub parent_span_id: Option<u64>,
    /// OTLP kind: 1 internal, 2 server, 3 client.
    pub kind: u8,
    /// OTLP status: 0 unset, 1 ok, 2 error.
    pub status: u8,
    /// Start and end, since the Unix epoch.
    pub start: Duration,
    /// End, since the Unix epoch.
    pub end: Duration,
    /// Other fields, in recording order.
    pub attributes: Vec<(String, AttrValue)>,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// Text (truncated to 512 bytes).
    Str(String),
    /// Integer.
    Int(i64),
    /// Float.
    Float(f64),
    /// Boolean.
    Bool(bool),
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The ids and fields a span's own fields say.
#[derive(Default)]
struct Fields {
    trace_id: Option<u128>,
    span_id: Option<u64>,
    parent_span_id: Option<u64>,
    kind: Option<u8>,
    status: Option<u8>,
    attributes: Vec<(String, AttrValue)>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: AttrValue) {
        let text = match &value {
            AttrValue::Str(s) => Some(s.as_str()),
            _ => None,
        };
        match (field.name(), text) {
            ("trace_id", Some(t)) => self.trace_id = u128::from_str_radix(t, 16).ok(),
            ("span_id", Some(t)) => self.span_id = u64::from_str_radix(t, 16).ok(),
            ("parent_span_id", Some(t)) => self.parent_span_id = u64::from_str_radix(t, 16).ok(),
            ("otel.kind", Some(t)) => {
                self.kind = match t {
                    "server" => Some(2),
                    "client" => Some(3),
                    "producer" => Some(4),
                    "consumer" => Some(5),
                    _ => Some(1),
                }
            }
            ("otel.status_code", Some(t)) => {
                self.status = match t.to_ascii_lowercase().as_str() {
                    "ok" => Some(1),
                    "error" => Some(2),
                    _ => Some(0),
                }
            }
            (name, _) => {
                if let Some(slot) = self.attributes.iter_mut().find(|(k, _)| k == name) {
                    slot.1 = value;
                } else if self.attributes.len() < MAX_ATTRIBUTES {
                    self.attributes.push((name.to_string(), value));
                }
            }
        }
    }
}

fn truncated(mut s: String) -> String {
    if s.len() > MAX_VALUE_LEN {
        let mut cut = MAX_VALUE_LEN;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, AttrValue::Str(truncated(format!("{value:?}"))));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, AttrValue::Str(truncated(value.to_string())));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, AttrValue::Int(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(
            field,
            AttrValue::Int(i64::try_from(value).unwrap_or(i64::MAX)),
        );
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, AttrValue::Float(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, AttrValue::Bool(value));
    }
}

/// Kept in a span's extensions while it is open.
struct Open {
    record: SpanRecord,
}

/// The `tracing` layer: records the spans of traces and hands them to the exporter.
pub struct OtlpLayer {
    tx: SyncSender<SpanRecord>,
    dropped: Arc<AtomicU64>,
}

impl OtlpLayer {
    /// A layer whose finished spans go to `tx` (bounded; full means dropped).
    pub fn with_sender(tx: SyncSender<SpanRecord>) -> OtlpLayer {
        OtlpLayer {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Spans dropped so far because the queue was full.
    pub fn dropped(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

impl<S> Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let (trace_id, parent) = match fields.trace_id {
            Some(t) if t != 0 => (t, fields.parent_span_id),
            _ => {
                // Inherit from the nearest traced ancestor.
                let Some(p) = span.parent() else { return };
                let ext = p.extensions();
                let Some(open) = ext.get::<Open>() else {
                    return;
                };
                (open.record.trace_id, Some(open.record.span_id))
            }
        };
        let record = SpanRecord {
            name: attrs.metadata().name().to_string(),
            trace_id,
            span_id: fields
                .span_id
                .filter(|s| *s != 0)
                .unwrap_or_else(|| rand::random::<u64>().max(1)),
            parent_span_id: parent.filter(|p| *p != 0),
            kind: fields.kind.unwrap_or(1),
            status: fields.status.unwrap_or(0),
            start: since_epoch(),
            end: Duration::ZERO,
            attributes: fields.attributes,
        };
        span.extensions_mut().insert(Open { record });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        let Some(open) = ext.get_mut::<Open>() else {
            return;
        };
        let mut fields = Fields {
            attributes: std::mem::take(&mut open.record.attributes),
            ..Fields::default()
        };
        values.record(&mut fields);
        open.record.attributes = fields.attributes;
        if let Some(s) = fields.status {
            open.record.status = s;
        }
        if let Some(k) = fields.kind {
            open.record.kind = k;
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(Open { mut record }) = span.extensions_mut().remove::<Open>() else {
            return;
        };
        record.end = since_epoch();
        if self.tx.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn attr_json(v: &AttrValue) -> Value {
    match v {
        AttrValue::Str(s) => json!({ "stringValue": s }),
        // OTLP/JSON carries 64-bit integers as strings.
        AttrValue::Int(i) => json!({ "intValue": i.to_string() }),
        AttrValue::Float(f) if f.is_finite() => json!({ "doubleValue": f }),
        AttrValue::Float(f) => json!({ "stringValue": f.to_string() }),
        AttrValue::Bool(b) => json!({ "boolValue": b }),
    }
}

/// The OTLP/JSON `ExportTraceServiceRequest` for `spans` of `service_name`.
pub fn encode(service_name: &str, spans: &[SpanRecord]) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut span = json!({
                "traceId": format!("{:032x}", s.trace_id),
                "spanId": format!("{:016x}", s.span_id),
                "name": s.name,
                "kind": s.kind,
                "startTimeUnixNano": s.start.as_nanos().to_string(),
                "endTimeUnixNano": s.end.as_nanos().to_string(),
                "attributes": s.attributes.iter()
                    .map(|(k, v)| json!({ "key": k, "value": attr_json(v) }))
                    .collect::<Vec<_>>(),
                "status": { "code": s.status },
            });
            if let Some(p) = s.parent_span_id {
                span["parentSpanId"] = json!(format!("{p:016x}"));
            }
            span
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": { "attributes": [
                { "key": "service.name", "value": { "stringValue": service_name } },
                { "key": "service.version", "value": { "stringValue": env!("CARGO_PKG_VERSION") } },
            ]},
            "scopeSpans": [{
                "scope": { "name": "skein", "version": env!("CARGO_PKG_VERSION") },
                "spans": spans,
            }],
        }]
    })
}

/// POST `body` to the collector: HTTP/1.1, one connection per batch, every step under a
/// timeout. Returns the status code.
fn post(config: &OtlpConfig, body: &[u8]) -> std::io::Result<u16> {
    let timeout = Duration::from_secs(5);
    let addr = config
        .host
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{} resolves to nothing", config.host)))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        config.path,
        config.host,
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    // The status line is enough; read at most 64 KiB of the answer.
    let mut answer = Vec::with_capacity(256);
    stream.take(64 * 1024).read_to_end(&mut answer)?;
    let line = answer.split(|b| *b == b'\n').next().unwrap_or_default();
    let code = std::str::from_utf8(line)
        .ok()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("the collector's answer is not HTTP"))?;
    Ok(code)
}

/// The exporter loop: batches from `rx` to the collector until every sender is gone.
fn export(config: OtlpConfig, rx: Receiver<SpanRecord>, dropped: Arc<AtomicU64>) {
    let mut failures = 0u64;
    let mut batch: Vec<SpanRecord> = Vec::with_capacity(MAX_BATCH);
    let mut reported_drops = 0u64;
    loop {
        let deadline = Instant::now() + config.interval;
        let mut closed = false;
        while batch.len() < MAX_BATCH {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(s) => batch.push(s),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if !batch.is_empty() {
            let body = encode(&config.service_name, &batch).to_string();
            match post(&config, body.as_bytes()) {
                Ok(code) if (200..300).contains(&code) => {}
                other => {
                    if failures.is_multiple_of(100) {
                        let why = match other {
                            Ok(code) => format!("HTTP {code}"),
                            Err(e) => e.to_string(),
                        };
                        tracing::warn!(url = %config.url(), spans = batch.len(), error = %why,
                            "OTLP export failed; spans dropped");
                    }
                    failures += 1;
                }
            }
            batch.clear();
        }
        let d = dropped.load(Ordering::Relaxed);
        if d > reported_drops {
            tracing::warn!(
                dropped = d - reported_drops,
                "OTLP export queue full; spans dropped"
            );
            reported_drops = d;
        }
        if closed {
            return;
        }
    }
}

/// The layer plus its exporter thread, sending to `config`'s collector.
pub fn layer(config: OtlpConfig) -> std::io::Result<OtlpLayer> {
    let (tx, rx) = sync_channel(MAX_QUEUED_SPANS);
    let layer = OtlpLayer::with_sender(tx);
    let dropped = layer.dropped();
    std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || export(config, rx, dropped))?;
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn endpoints_parse_as_the_otel_variables_define_them() {
        let c = OtlpConfig::from_url("http://127.0.0.1:4318", false, "n").unwrap();
        assert_eq!(c.url(), "http://127.0.0.1:4318/v1/traces");
        let c = OtlpConfig::from_url("http://collector:4318/", false, "n").unwrap();
        assert_eq!(c.url(), "http://collector:4318/v1/traces");
        let c = OtlpConfig::from_url("http://c:4318/custom/traces", true, "n").unwrap();
        assert_eq!(c.url(), "http://c:4318/custom/traces");
        let e = OtlpConfig::from_url("https://c:4318", false, "n").unwrap_err();
        assert!(e.contains("only http://"), "{e}");
        let e = OtlpConfig::from_url("http://collector", false, "n").unwrap_err();
        assert!(e.contains("HOST:PORT"), "{e}");
    }

    /// Spans of a trace come out with its ids, their parent links, kind, status and fields;
    /// spans of no trace do not.
    #[test]
    fn spans_inherit_the_trace_and_link_to_their_parents() {
        let (tx, rx) = sync_channel(16);
        let subscriber = tracing_subscriber::registry().with(OtlpLayer::with_sender(tx));
        tracing::subscriber::with_default(subscriber, || {
            let _untraced = tracing::info_span!("untraced", model = "m").entered();
            let root = tracing::info_span!(
                "skein.node.infer",
                trace_id = "4bf92f3577b34da6a3ce929d0e0e4736",
                span_id = "00000000000000aa",
                parent_span_id = "00000000000000bb",
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                model = "ppocr_cls",
                cold_start = false,
                queue_us = tracing::field::Empty,
            );
            {
                let _g = root.enter();
                let _run = tracing::info_span!("run", batch = 2u64).entered();
            }
            root.record("queue_us", 42u64);
            root.record("otel.status_code", "error");
        });
        let spans: Vec<SpanRecord> = rx.try_iter().collect();
        assert_eq!(spans.len(), 2, "{spans:?}");
        let run = &spans[0];
        let root = &spans[1];
        assert_eq!(root.name, "skein.node.infer");
        assert_eq!(root.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!((root.span_id, root.parent_span_id), (0xaa, Some(0xbb)));
        assert_eq!((root.kind, root.status), (2, 2));
        assert!(root
            .attributes
            .contains(&("queue_us".to_string(), AttrValue::Int(42))));
        assert!(root
            .attributes
            .contains(&("cold_start".to_string(), AttrValue::Bool(false))));
        assert_eq!(run.name, "run");
        assert_eq!(run.trace_id, root.trace_id);
        assert_eq!(run.parent_span_id, Some(0xaa));
        assert_ne!(run.span_id, 0);
        assert!(run.end >= run.start && root.end >= run.end);

        let body = encode("skein-node", &spans);
        let s = &body["resourceSpans"][0];
        assert_eq!(
            s["resource"]["attributes"][0]["value"]["stringValue"],
            "skein-node"
        );
        let j = &s["scopeSpans"][0]["spans"][1];
        assert_eq!(j["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(j["spanId"], "00000000000000aa");
        assert_eq!(j["parentSpanId"], "00000000000000bb");
        assert_eq!(j["status"]["code"], 2);
        assert!(j["attributes"]
            .as_array()
            .unwrap()
            .contains(&json!({"key": "queue_us", "value": {"intValue": "42"}})));
    }

    /// A full queue drops spans and counts them; it never blocks the caller.
    #[test]
    fn a_full_queue_drops_spans() {
        let (tx, rx) = sync_channel(1);
        let layer = OtlpLayer::with_sender(tx);
        let dropped = layer.dropped();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..3 {
                let _s = tracing::info_span!("s", trace_id = "01").entered();
            }
        });
        assert_eq!(rx.try_iter().count(), 1);
        assert_eq!(dropped.load(Ordering::Relaxed), 2);
    }

    /// The exporter POSTs OTLP/JSON to the collector's traces path.
    #[test]
    fn the_exporter_posts_batches_to_the_collector() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let collector = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // Until the whole body (Content-Length) is in.
            loop {
                let n = conn.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .unwrap()
                        .parse()
                        .unwrap();
                    if body.len() >= len {
                        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                            .unwrap();
                        return (head.to_string(), body.to_string());
                    }
                }
                assert!(n > 0, "connection closed early");
            }
        });
        let mut config = OtlpConfig::from_url(&url, false, "skein-test").unwrap();
        config.interval = Duration::from_millis(50);
        let (tx, rx) = sync_channel(4);
        let dropped = Arc::new(AtomicU64::new(0));
        let exporter = std::thread::spawn(move || export(config, rx, dropped));
        tx.send(SpanRecord {
            name: "x".into(),
            trace_id: 1,
            span_id: 2,
            parent_span_id: None,
            kind: 2,
            status: 1,
            start: Duration::from_secs(1),
            end: Duration::from_secs(2),
            attributes: vec![],
        })
        .unwrap();
        let (head, body) = collector.join().unwrap();
        drop(tx);
        exporter.join().unwrap();
        assert!(head.starts_with("POST /v1/traces HTTP/1.1"), "{head}");
        assert!(head.contains("Content-Type: application/json"));
        let v: Value = serde_json::from_str(&body).unwrap();
        let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], format!("{:032x}", 1));
        assert_eq!(span["startTimeUnixNano"], "1000000000");
        assert!(span.get("parentSpanId").is_none());
    }
}
