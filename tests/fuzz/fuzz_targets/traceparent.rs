//! The W3C `traceparent` header as the gateway reads it from HTTP: what parses has non-zero
//! ids, prints as a version-00 header that parses to the same context, and a version-00 header
//! with flags 00 or 01 prints back exactly as received (trimmed, lower case).
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_proto::TraceContext;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let Some(ctx) = TraceContext::parse_traceparent(value) else {
        return;
    };
    assert!(
        ctx.trace_id != 0 && ctx.span_id != 0,
        "{value:?} gave zero ids"
    );
    let printed = ctx.traceparent();
    assert_eq!(
        TraceContext::parse_traceparent(&printed),
        Some(ctx),
        "{value:?} printed as {printed:?}"
    );
    let trimmed = value.trim();
    if trimmed.starts_with("00-") && (trimmed.ends_with("-00") || trimmed.ends_with("-01")) {
        assert_eq!(printed, trimmed, "{value:?}");
    }
});
