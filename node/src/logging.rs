//! Log output for the `skein` and `skein-node` binaries: human-readable text, or one JSON
//! object per line for log collectors (`--log-format json`); and, when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, the spans of
//! traced requests exported to that OpenTelemetry collector ([`crate::otlp`]).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (with `message`),
    /// and the active `spans`.
    Json,
}

/// Install the global subscriber: log lines to stderr in `format`, filtered by `filter` in
/// `EnvFilter` syntax (`default` when it does not parse); and the OTLP trace exporter when the
/// environment names a collector, as service `service` unless `OTEL_SERVICE_NAME` says
/// otherwise. The exporter sees the info-level spans of Skein's own crates whatever the log
/// filter says. A malformed endpoint is reported on stderr and tracing goes on without it.
pub fn init(filter: &str, default: &str, format: LogFormat, service: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let otlp = match crate::otlp::OtlpConfig::from_env(service) {
        None => None,
        Some(Err(e)) => {
            eprintln!("warning: {e}; traces are not exported");
            None
        }
        Some(Ok(config)) => {
            let url = config.url();
            match crate::otlp::layer(config) {
                Ok(layer) => {
                    eprintln!("exporting traces to {url} (OTLP/HTTP JSON)");
                    Some(
                        layer.with_filter(
                            tracing_subscriber::filter::Targets::new()
                                .with_target("skein", tracing::Level::INFO),
                        ),
                    )
                }
                Err(e) => {
                    eprintln!("warning: cannot start the OTLP exporter: {e}");
                    None
                }
            }
        }
    };
    let registry = tracing_subscriber::registry().with(otlp);
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => registry.with(lines.with_filter(filter)).init(),
        LogFormat::Json => registry
            .with(lines.json().with_current_span(false).with_filter(filter))
            .init(),
    }
}
