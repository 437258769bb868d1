//! Trace context carried with a request from hop to hop (SDK → coordinator → node, or HTTP
//! gateway → node), in the shape of W3C Trace Context: a 128-bit trace id shared by every span
//! of one request, the 64-bit id of the sender's span (the receiver's parent), and the sampled
//! flag. On HTTP it travels as the `traceparent` header
//! (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`); on the mesh, inside the messages.
//!
//! Ids are chosen by the caller (this crate has no randomness): [`TraceContext::child`] takes
//! the new span's id.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a request is in its trace: which trace, and the span that sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TraceContext {
    /// The trace; never 0.
    pub trace_id: u128,
    /// The sender's span; never 0.
    pub span_id: u64,
    /// Whether the trace is being recorded (W3C flag `01`).
    pub sampled: bool,
}

impl TraceContext {
    /// A new trace whose root span is `span_id`; `None` when either id is 0 (invalid in W3C).
    pub fn root(trace_id: u128, span_id: u64) -> Option<TraceContext> {
        (trace_id != 0 && span_id != 0).then_some(TraceContext {
            trace_id,
            span_id,
            sampled: true,
        })
    }

    /// A new sampled trace whose root span is `span_id`, ids of 0 replaced by 1 (for callers
    /// that draw them at random).
    pub fn fresh(trace_id: u128, span_id: u64) -> TraceContext {
        TraceContext {
            trace_id: trace_id.max(1),
            span_id: span_id.max(1),
            sampled: true,
        }
    }

    /// The context of a new span with id `span_id`: a child of `parent` when there is one,
    /// else the root of a new trace `trace_id` (ids of 0 replaced by 1).
    pub fn child_or_root(
        parent: Option<TraceContext>,
        trace_id: u128,
        span_id: u64,
    ) -> TraceContext {
        match parent {
            Some(p) => p.child(span_id),
            None => TraceContext::fresh(trace_id, span_id),
        }
    }

    /// A span of the same trace, child of this one, with id `span_id` (0 is replaced by 1).
    pub fn child(&self, span_id: u64) -> TraceContext {
        TraceContext {
            span_id: span_id.max(1),
            ..*self
        }
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> String {
        self.to_string()
    }

    /// Parse a `traceparent` header. Version `00` exactly as specified; a later version is read
    /// by its first four fields, as W3C asks. `None` for anything malformed, for the invalid
    /// version `ff`, and for all-zero ids: the receiver then starts a trace of its own.
    pub fn parse_traceparent(value: &str) -> Option<TraceContext> {
        let value = value.trim();
        let mut parts = value.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex(version, 2)
            || version == "ff"
            || !hex(trace, 32)
            || !hex(span, 16)
            || !hex(flags, 2)
        {
            return None;
        }
        // Version 00 has exactly four fields; later versions may append more.
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        let mut ctx = TraceContext::root(trace_id, span_id)?;
        ctx.sampled = flags & 1 == 1;
        Some(ctx)
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips() {
        let t = TraceContext::root(0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7).unwrap();
        assert_eq!(
            t.traceparent(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(TraceContext::parse_traceparent(&t.traceparent()), Some(t));
        let c = t.child(7);
        assert_eq!((c.trace_id, c.span_id, c.sampled), (t.trace_id, 7, true));
        assert_eq!(t.child(0).span_id, 1);
        assert_eq!(TraceContext::child_or_root(Some(t), 9, 3), t.child(3));
        let root = TraceContext::child_or_root(None, 9, 3);
        assert_eq!((root.trace_id, root.span_id, root.sampled), (9, 3, true));
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(TraceContext::parse_traceparent(ok).is_some());
        let unsampled = TraceContext::parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )
        .unwrap();
        assert!(!unsampled.sampled);
        // A later version with an extra field is read by its first four.
        assert!(TraceContext::parse_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
        )
        .is_some());
        for bad in [
            "",
            "garbage",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse_traceparent(bad), None, "{bad}");
        }
    }
}
