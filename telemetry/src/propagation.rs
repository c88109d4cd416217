//! Trace context on the wire: W3C `traceparent`/`tracestate` (read and written) and Zipkin's
//! B3 single-header and multi-header forms (read only: a B3 caller's trace continues as W3C).
//!
//! Pure: strings in, a [`TraceContext`] out. Whoever carries a context (HTTP headers, Kafka
//! headers, the envelope's `traceparent` field) calls [`extract`] with a header lookup and
//! [`TraceContext::traceparent`] to pass it on.

use std::fmt;

/// Longest `tracestate` kept, in bytes. W3C allows 32 list members; vendors may drop the
/// whole header past 512 bytes, which is what we do rather than cut a member in half.
pub const MAX_TRACESTATE: usize = 512;

/// Where one span sits in its trace, and whether the trace is recorded.
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// The caller's span: the parent of the span the receiver starts. 8 bytes, never all zero.
    pub span_id: [u8; 8],
    /// The head-based sampling decision taken at the root, honoured downstream.
    pub sampled: bool,
    /// W3C `tracestate`, passed through unchanged (empty when absent or too long).
    pub tracestate: String,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

/// Why a header did not give a trace context. A receiver that gets one of these starts a new
/// trace; it never fails the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The header does not have the fields of its format.
    #[error("malformed {0} header")]
    Malformed(&'static str),
    /// An ID is all zeros, which both formats forbid.
    #[error("all-zero trace or span id in {0} header")]
    ZeroId(&'static str),
    /// W3C version `ff` is forbidden.
    #[error("forbidden traceparent version ff")]
    ForbiddenVersion,
}

impl TraceContext {
    /// A new root context with the given IDs.
    pub fn new_root(trace_id: [u8; 16], span_id: [u8; 8], sampled: bool) -> Self {
        Self {
            trace_id,
            span_id,
            sampled,
            tracestate: String::new(),
        }
    }

    /// The same trace, seen from a child span `span_id` (what a service passes on after it
    /// started its own span).
    pub fn child(&self, span_id: [u8; 8]) -> Self {
        Self {
            span_id,
            ..self.clone()
        }
    }

    /// Lower-case hex trace ID (32 characters), as stores and query APIs show it.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Lower-case hex span ID (16 characters).
    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }

    /// The W3C `traceparent` header value (version 00).
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id_hex(),
            self.span_id_hex(),
            u8::from(self.sampled)
        )
    }
}

/// Parses a W3C `traceparent`. Versions above 00 are read by their first four fields, as the
/// spec asks of a version-00 reader.
pub fn parse_traceparent(value: &str) -> Result<TraceContext, ParseError> {
    const W: &str = "traceparent";
    let value = value.trim();
    let mut parts = value.split('-');
    let (Some(version), Some(trace), Some(span), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::Malformed(W));
    };
    if version.len() != 2 || !is_lower_hex(version) {
        return Err(ParseError::Malformed(W));
    }
    if version == "ff" {
        return Err(ParseError::ForbiddenVersion);
    }
    // Version 00 has exactly four fields; a later version may append more.
    if version == "00" && parts.next().is_some() {
        return Err(ParseError::Malformed(W));
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return Err(ParseError::Malformed(W));
    }
    if !(is_lower_hex(trace) && is_lower_hex(span) && is_lower_hex(flags)) {
        return Err(ParseError::Malformed(W));
    }
    let trace_id: [u8; 16] = unhex(trace).ok_or(ParseError::Malformed(W))?;
    let span_id: [u8; 8] = unhex(span).ok_or(ParseError::Malformed(W))?;
    let flags: [u8; 1] = unhex(flags).ok_or(ParseError::Malformed(W))?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return Err(ParseError::ZeroId(W));
    }
    Ok(TraceContext {
        trace_id,
        span_id,
        sampled: flags[0] & 1 == 1,
        tracestate: String::new(),
    })
}

/// Parses B3's single header `b3: {TraceId}-{SpanId}[-{Sampled}[-{ParentSpanId}]]`. A 64-bit
/// trace ID is left-padded to 128 bits, as Zipkin does. `b3: 0` (deny, no IDs) is not a context.
pub fn parse_b3_single(value: &str) -> Result<TraceContext, ParseError> {
    const B: &str = "b3";
    let mut parts = value.trim().split('-');
    let (Some(trace), Some(span)) = (parts.next(), parts.next()) else {
        return Err(ParseError::Malformed(B));
    };
    let sampled = match parts.next() {
        None => true,
        Some(flag) => b3_sampled(flag).ok_or(ParseError::Malformed(B))?,
    };
    build_b3(trace, span, sampled, B)
}

/// Parses B3's multi-header form (`X-B3-TraceId`, `X-B3-SpanId`, `X-B3-Sampled`, `X-B3-Flags`).
pub fn parse_b3_multi(
    trace: &str,
    span: &str,
    sampled: Option<&str>,
    flags: Option<&str>,
) -> Result<TraceContext, ParseError> {
    const B: &str = "X-B3";
    // Debug flag 1 implies sampled.
    let sampled = if flags.map(str::trim) == Some("1") {
        true
    } else {
        match sampled {
            None => true,
            Some(s) => b3_sampled(s).ok_or(ParseError::Malformed(B))?,
        }
    };
    build_b3(trace.trim(), span.trim(), sampled, B)
}

/// The context a request carries, looked up by lower-case header name: W3C first, then B3
/// single, then B3 multi. `tracestate` is kept only with a valid W3C `traceparent`.
pub fn extract<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Option<TraceContext> {
    if let Some(tp) = header("traceparent") {
        if let Ok(mut ctx) = parse_traceparent(tp) {
            if let Some(ts) = header("tracestate") {
                let ts = ts.trim();
                if ts.len() <= MAX_TRACESTATE {
                    ctx.tracestate = ts.to_owned();
                }
            }
            return Some(ctx);
        }
    }
    if let Some(b3) = header("b3") {
        if let Ok(ctx) = parse_b3_single(b3) {
            return Some(ctx);
        }
    }
    match (header("x-b3-traceid"), header("x-b3-spanid")) {
        (Some(t), Some(s)) => {
            parse_b3_multi(t, s, header("x-b3-sampled"), header("x-b3-flags")).ok()
        }
        _ => None,
    }
}

fn b3_sampled(flag: &str) -> Option<bool> {
    match flag {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn build_b3(
    trace: &str,
    span: &str,
    sampled: bool,
    what: &'static str,
) -> Result<TraceContext, ParseError> {
    let trace = trace.to_ascii_lowercase();
    let span = span.to_ascii_lowercase();
    let padded;
    let trace = match trace.len() {
        32 => trace.as_str(),
        16 => {
            padded = format!("{:0>32}", trace);
            padded.as_str()
        }
        _ => return Err(ParseError::Malformed(what)),
    };
    if span.len() != 16 || !is_lower_hex(trace) || !is_lower_hex(&span) {
        return Err(ParseError::Malformed(what));
    }
    let trace_id: [u8; 16] = unhex(trace).ok_or(ParseError::Malformed(what))?;
    let span_id: [u8; 8] = unhex(&span).ok_or(ParseError::Malformed(what))?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return Err(ParseError::ZeroId(what));
    }
    Ok(TraceContext {
        trace_id,
        span_id,
        sampled,
        tracestate: String::new(),
    })
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// Bytes of a hex string of exactly `2 * N` digits (either case).
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips() {
        let ctx = parse_traceparent(TP).unwrap();
        assert!(ctx.sampled);
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(ctx.traceparent(), TP);
        let unsampled = parse_traceparent(&TP.replace("-01", "-00")).unwrap();
        assert!(!unsampled.sampled);
    }

    #[test]
    fn bad_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
        ] {
            assert_eq!(
                parse_traceparent(bad),
                Err(ParseError::Malformed("traceparent")),
                "{bad}"
            );
        }
        assert_eq!(
            parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Err(ParseError::ZeroId("traceparent"))
        );
        assert_eq!(
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Err(ParseError::ZeroId("traceparent"))
        );
        assert_eq!(
            parse_traceparent("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Err(ParseError::ForbiddenVersion)
        );
    }

    #[test]
    fn a_later_version_is_read_by_its_first_four_fields() {
        let ctx = parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what")
            .unwrap();
        assert_eq!(ctx.traceparent(), TP);
    }

    #[test]
    fn b3_single_header_continues_as_w3c() {
        let ctx =
            parse_b3_single("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90")
                .unwrap();
        assert_eq!(
            ctx.traceparent(),
            "00-80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-01"
        );
        // 64-bit trace IDs are left-padded; "d" (debug) means sampled; "0" means not.
        let short = parse_b3_single("64fe8b2a57d3eff7-e457b5a2e4d86bd1-d").unwrap();
        assert_eq!(short.trace_id_hex(), "000000000000000064fe8b2a57d3eff7");
        assert!(short.sampled);
        assert!(
            !parse_b3_single("64fe8b2a57d3eff7-e457b5a2e4d86bd1-0")
                .unwrap()
                .sampled
        );
        assert!(parse_b3_single("0").is_err());
        assert!(parse_b3_single("64fe8b2a57d3eff7-e457b5a2e4d86bd1-x").is_err());
    }

    #[test]
    fn b3_multi_headers() {
        let ctx =
            parse_b3_multi("64fe8b2a57d3eff7", "e457b5a2e4d86bd1", Some("0"), Some("1")).unwrap();
        assert!(ctx.sampled, "debug flag wins");
        let ctx = parse_b3_multi("64FE8B2A57D3EFF7", "E457B5A2E4D86BD1", Some("0"), None).unwrap();
        assert!(!ctx.sampled);
        assert!(parse_b3_multi("64fe8b2a57d3eff7", "e457", None, None).is_err());
    }

    #[test]
    fn extract_prefers_w3c_and_keeps_tracestate() {
        let headers: HashMap<&str, &str> = [
            ("traceparent", TP),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("b3", "64fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ]
        .into();
        let ctx = extract(|k| headers.get(k).copied()).unwrap();
        assert_eq!(ctx.traceparent(), TP);
        assert_eq!(ctx.tracestate, "congo=t61rcWkgMzE");

        let b3_only: HashMap<&str, &str> = [
            ("traceparent", "garbage"),
            ("x-b3-traceid", "64fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ]
        .into();
        let ctx = extract(|k| b3_only.get(k).copied()).unwrap();
        assert_eq!(ctx.span_id_hex(), "e457b5a2e4d86bd1");
        assert!(ctx.tracestate.is_empty());

        let none: HashMap<&str, &str> = HashMap::new();
        assert!(extract(|k| none.get(k).copied()).is_none());
    }

    #[test]
    fn oversized_tracestate_is_dropped_whole() {
        let long = "a=".to_owned() + &"x".repeat(MAX_TRACESTATE);
        let headers: HashMap<&str, &str> =
            [("traceparent", TP), ("tracestate", long.as_str())].into();
        assert!(extract(|k| headers.get(k).copied())
            .unwrap()
            .tracestate
            .is_empty());
    }
}
