//! Log output for the `skein` and `skein-node` binaries: human-readable text, or one JSON
//! object per line for log collectors (`--log-format json`).

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

/// Install the global subscriber: `filter` in `EnvFilter` syntax (`default` when it does not
/// parse), lines to stderr in `format`.
pub fn init(filter: &str, default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}
