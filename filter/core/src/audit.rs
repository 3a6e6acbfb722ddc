//! The audit record of one request (LOG-1, LOG-4): who called which API, from where, the
//! decision and its code, what Envoy did with it (status, duration, bytes, upstream), and for S3
//! the signature evidence (DATA-4). It is written once, when the stream ends, as one JSON object
//! (sealed into the worker's chain, `audit_chain.rs`) that Envoy's access log prints as it is;
//! the detail of a refusal goes here and never to the caller.

use std::borrow::Cow;

use serde::Serialize;

use crate::anomaly::Anomaly;
use crate::engine::{Evidence, RequestContext};
use crate::error::Deny;
use crate::masking::Masking;
use crate::state::rate_limits::RateHit;

/// Fields that do not apply to a request (no user, no grant at S0, ...) are left out.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord<'a> {
    /// Gateway time, unix seconds.
    pub ts: u64,
    pub request_id: &'a str,
    pub decision: &'static str,
    pub status: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub detail: Cow<'a, str>,
    pub method: &'a str,
    /// Path and query, masked (LOG-4).
    pub path: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<Cow<'a, str>>,
    pub client_ip: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant: Option<&'a str>,
    /// Set when this refusal started an automatic ban.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ban: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<&'a Evidence>,
    /// A fingerprint of the session the request presented or created (never its ID).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<&'a str>,
    /// created, logged_out, ended_by_operator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_event: Option<&'static str>,
    /// On the operator path: who (client certificate URI SAN) and what was ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<&'a str>,
    /// From the host, when the stream ended: how long it took, the bytes that came in and went
    /// out, the upstream host it went to (none: nothing went upstream), and why Envoy itself
    /// answered an allowed request with an error (no upstream, a timeout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    pub upstream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<&'a str>,
    /// The caller's SDK when it is not acceptable: the version it sent, why, and the action.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sdk: Option<SdkRecord<'a>>,
    /// Anomaly rules the call matched (MON-3, MON-4, MON-9).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub anomalies: &'a [Anomaly],
    /// Rate-limit rules the call went over: rule, window, action (RL-1, RL-2, OPS-4).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub rate_limits: &'a [RateHit],
}

#[derive(Debug, Clone, Serialize)]
pub struct SdkRecord<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<Cow<'a, str>>,
    pub status: &'static str,
    pub action: &'static str,
}

/// What the stream carried, as the filter saw it pass: the status the client got, body bytes
/// in and out, when it began. Counted from the host's callbacks, without asking the host.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    pub started_ms: Option<u64>,
    pub status: Option<u32>,
    pub request: BodyCount,
    pub response: BodyCount,
    /// The gateway answered itself (a refusal, a session endpoint): its own body went out.
    pub own_reply: bool,
    /// An answer came back for a forwarded request (even if the gateway withheld it later).
    pub answered: bool,
}

/// Body bytes of one direction. A callback reports the bytes in the host's buffer: new ones
/// only after the last callback let the body go on, everything since then after a pause.
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyCount {
    pub total: u64,
    passed: u64,
}

impl BodyCount {
    /// A body callback with `size` bytes in the buffer.
    pub fn seen(&mut self, size: usize) {
        self.total = self.passed.saturating_add(size as u64);
    }
    /// The buffer went on (the step let the stream continue).
    pub fn flushed(&mut self) {
        self.passed = self.total;
    }
    /// The buffered body was replaced by `len` bytes.
    pub fn replaced(&mut self, len: usize) {
        self.total = self.passed.saturating_add(len as u64);
    }
}

/// What the host knows of the stream once it ended (read once, for the record).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogFacts {
    /// The status the client got.
    pub status: Option<u32>,
    pub duration_ms: Option<u64>,
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
    pub upstream: Option<String>,
    pub details: Option<String>,
}

pub struct AuditInput<'a> {
    pub ts: u64,
    pub request_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// The matched API's path template (`{account_id}` names an account field to mask).
    pub template: Option<&'a str>,
    pub client_ip: &'a str,
    pub mask: &'a Masking,
}

/// How much of a path the record keeps: a banned source gets a short record, so probing with
/// long paths costs the log little (MON-6); any record stays bounded.
const MAX_PATH: usize = 2048;
const MAX_PATH_BANNED: usize = 256;

fn capped(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

/// What was decided for a request.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'d> {
    Allowed,
    Refused(&'d Deny),
    /// Would have been refused, but the rule is in report mode (report.rs): the request went on.
    Reported(&'d Deny),
}

/// An [`Outcome`] kept until the stream ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decided {
    Allowed,
    Refused(Deny),
    Reported(Deny),
}

impl Decided {
    pub fn of(o: Outcome<'_>) -> Decided {
        match o {
            Outcome::Allowed => Decided::Allowed,
            Outcome::Refused(d) => Decided::Refused(d.clone()),
            Outcome::Reported(d) => Decided::Reported(d.clone()),
        }
    }

    pub fn outcome(&self) -> Outcome<'_> {
        match self {
            Decided::Allowed => Outcome::Allowed,
            Decided::Refused(d) => Outcome::Refused(d),
            Decided::Reported(d) => Outcome::Reported(d),
        }
    }
}

/// One JSON object. Serialising plain structs cannot fail; the fallback keeps the log valid
/// anyway. `facts`: what the host told of the ended stream (none yet while deciding).
pub fn record(
    input: &AuditInput<'_>,
    ctx: &RequestContext,
    outcome: Outcome<'_>,
    facts: &LogFacts,
) -> String {
    let (decision, status, code, detail) = match outcome {
        Outcome::Allowed => ("allow", 0, None, ""),
        Outcome::Refused(d) => (
            "deny",
            d.reason.status(),
            Some(d.reason.code()),
            d.detail.as_str(),
        ),
        Outcome::Reported(d) => (
            "report",
            d.reason.status(),
            Some(d.reason.code()),
            d.detail.as_str(),
        ),
    };
    let max_path = if code == Some(crate::DenyReason::Banned.code()) {
        MAX_PATH_BANNED
    } else {
        MAX_PATH
    };
    let rec = AuditRecord {
        ts: input.ts,
        request_id: input.request_id,
        decision,
        status: facts.status.unwrap_or(status),
        code,
        detail: input.mask.text(detail),
        method: input.method,
        path: input
            .mask
            .path(input.template, capped(input.path, max_path)),
        query: input
            .query
            .filter(|q| !q.is_empty())
            .map(|q| input.mask.query(capped(q, max_path))),
        client_ip: input.client_ip,
        app: ctx.app.as_deref(),
        api: ctx.api.as_deref(),
        level: ctx.level.map(|l| l.as_str()),
        function: ctx.function.as_deref(),
        keyid: ctx.keyid.as_deref(),
        user: ctx.user.as_deref().map(|u| input.mask.text(u)),
        auth: ctx.auth.map(|a| a.as_str()),
        grant: ctx.grant.as_deref(),
        ban: ctx.ban.as_deref(),
        evidence: ctx.evidence.as_ref(),
        session: ctx.session_fp.as_deref(),
        session_event: ctx.session_event,
        operator: ctx.operator.as_deref(),
        duration_ms: facts.duration_ms,
        bytes_in: facts.bytes_in,
        bytes_out: facts.bytes_out,
        upstream: facts.upstream.as_deref(),
        details: facts.details.as_deref(),
        sdk: ctx.sdk.as_ref().map(|f| SdkRecord {
            version: f.version.as_deref().map(|v| input.mask.text(v)),
            status: f.status.as_str(),
            action: f.action.as_str(),
        }),
        anomalies: &ctx.anomalies,
        rate_limits: &ctx.rate_limits,
    };
    rec.to_json()
}

impl AuditRecord<'_> {
    /// The record as one JSON object, byte for byte what `serde_json::to_string` makes of it
    /// (the derived `Serialize` stays the reference; the tests compare the two), written
    /// directly: the record is written for every request, and its long strings (an S3
    /// request's signature base, its headers) are scanned for escapes eight bytes at a time.
    pub fn to_json(&self) -> String {
        let evidence_len = self.evidence.map_or(0, |e| {
            e.signature_base.len() + e.signature_input.len() + e.signature.len() + 256
        });
        // room for the chain's fields too: the seal finds it, and the record is not copied to a
        // larger buffer
        let mut out = String::with_capacity(
            384 + crate::audit_chain::SEAL_ROOM
                + self.path.len()
                + self.detail.len()
                + self.query.as_ref().map_or(0, |q| q.len())
                + evidence_len,
        );
        let mut o = Object::open(&mut out);
        o.num("ts", self.ts);
        o.str("request_id", self.request_id);
        o.str("decision", self.decision);
        o.num("status", u64::from(self.status));
        o.opt_str("code", self.code);
        if !self.detail.is_empty() {
            o.str("detail", &self.detail);
        }
        o.str("method", self.method);
        o.str("path", &self.path);
        o.opt_str("query", self.query.as_deref());
        o.str("client_ip", self.client_ip);
        o.opt_str("app", self.app);
        o.opt_str("api", self.api);
        o.opt_str("level", self.level);
        o.opt_str("function", self.function);
        o.opt_str("keyid", self.keyid);
        o.opt_str("user", self.user.as_deref());
        o.opt_str("auth", self.auth);
        o.opt_str("grant", self.grant);
        o.opt_str("ban", self.ban);
        if let Some(e) = self.evidence {
            let mut inner = Object::open(o.key("evidence"));
            inner.str("keyid", &e.keyid);
            inner.str("alg", e.alg);
            inner.str("signature_input", &e.signature_input);
            inner.str("signature", &e.signature);
            inner.opt_str("signature_base_sha256", e.signature_base_sha256.as_deref());
            inner.str("signature_base", &e.signature_base);
            inner.opt_str("content_digest", e.content_digest.as_deref());
            inner.opt_str("key_sha256", e.key_sha256.as_deref());
            inner.opt_str("session_sealed", e.session_sealed.as_deref());
            inner.close();
        }
        o.opt_str("session", self.session);
        o.opt_str("session_event", self.session_event);
        o.opt_str("operator", self.operator);
        o.opt_num("duration_ms", self.duration_ms);
        o.opt_num("bytes_in", self.bytes_in);
        o.opt_num("bytes_out", self.bytes_out);
        match self.upstream {
            Some(u) => o.str("upstream", u),
            None => o.key("upstream").push_str("null"),
        }
        o.opt_str("details", self.details);
        if let Some(sdk) = &self.sdk {
            let mut inner = Object::open(o.key("sdk"));
            inner.opt_str("version", sdk.version.as_deref());
            inner.str("status", sdk.status);
            inner.str("action", sdk.action);
            inner.close();
        }
        o.string_objects("anomalies", self.anomalies, |a| {
            [("rule", &a.rule), ("kind", a.kind), ("action", a.action)]
        });
        o.string_objects("rate_limits", self.rate_limits, |h| {
            [
                ("rule", &h.rule),
                ("window", h.window),
                ("action", h.action),
            ]
        });
        o.close();
        out
    }
}

/// A JSON object being written: members in the order they are added, as serde_json writes
/// them (no spaces).
struct Object<'o> {
    out: &'o mut String,
    empty: bool,
}

impl<'o> Object<'o> {
    fn open(out: &'o mut String) -> Self {
        out.push('{');
        Object { out, empty: true }
    }

    /// Starts a member; its value is written into what this returns. Inlined, as the four
    /// below: at each call the name's length is a constant, and its copy a few stores instead
    /// of a call to `memcpy` (in Wasm, dearer than the bytes it copies).
    #[inline(always)]
    fn key(&mut self, name: &str) -> &mut String {
        if !self.empty {
            self.out.push(',');
        }
        self.empty = false;
        // member names are this file's literals, none with a character to escape
        self.out.push('"');
        self.out.push_str(name);
        self.out.push_str("\":");
        self.out
    }

    #[inline(always)]
    fn str(&mut self, name: &str, value: &str) {
        push_json_str(self.key(name), value);
    }

    #[inline(always)]
    fn opt_str(&mut self, name: &str, value: Option<&str>) {
        if let Some(v) = value {
            self.str(name, v);
        }
    }

    #[inline(always)]
    fn num(&mut self, name: &str, value: u64) {
        crate::sf::push_u64(self.key(name), value);
    }

    #[inline(always)]
    fn opt_num(&mut self, name: &str, value: Option<u64>) {
        if let Some(v) = value {
            self.num(name, v);
        }
    }

    /// A list of objects whose members are all strings (the anomalies, the rate limits a
    /// request met), written only when it has items, as serde skips an empty one.
    fn string_objects<T>(
        &mut self,
        name: &str,
        items: &[T],
        members: fn(&T) -> [(&'static str, &str); 3],
    ) {
        if items.is_empty() {
            return;
        }
        let list = self.key(name);
        list.push('[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                list.push(',');
            }
            let mut inner = Object::open(list);
            for (key, value) in members(item) {
                inner.str(key, value);
            }
            inner.close();
        }
        list.push(']');
    }

    fn close(self) {
        self.out.push('}');
    }
}

/// The bytes of `w` (little-endian) that JSON escapes, each as its high bit: control
/// characters (below 0x20), quotes and backslashes. A byte above a flagged one may be flagged
/// without needing it (the borrow of the subtraction); the lowest flagged byte always needs it,
/// and no byte that needs it goes unflagged.
fn escapes_in(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    let q = w ^ (ONES * u64::from(b'"'));
    let quote = q.wrapping_sub(ONES) & !q & HIGH;
    let b = w ^ (ONES * u64::from(b'\\'));
    let backslash = b.wrapping_sub(ONES) & !b & HIGH;
    control | quote | backslash
}

/// `s` as a JSON string, escaped as serde_json escapes: `"` and `\` with a backslash, the
/// control characters as `\b \t \n \f \r` or `\u00xx`; everything else as it is.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        // eight bytes at a time to the next byte to escape
        if let Some(word) = bytes
            .get(i..i + 8)
            .and_then(|c| <[u8; 8]>::try_from(c).ok())
        {
            let found = escapes_in(u64::from_le_bytes(word));
            if found == 0 {
                i += 8;
                continue;
            }
            i += (found.trailing_zeros() / 8) as usize;
        }
        let b = bytes.get(i).copied().unwrap_or(b' ');
        let short = match b {
            b'"' => '"',
            b'\\' => '\\',
            b'\n' => 'n',
            b'\r' => 'r',
            b'\t' => 't',
            0x08 => 'b',
            0x0c => 'f',
            0x00..=0x1f => 'u',
            _ => {
                i += 1;
                continue;
            }
        };
        // an escaped byte is ASCII: the run before it ends on a character boundary
        out.push_str(s.get(start..i).unwrap_or_default());
        out.push('\\');
        out.push(short);
        if short == 'u' {
            out.push_str("00");
            crate::crypto::push_hex(out, &[b]);
        }
        i += 1;
        start = i;
    }
    out.push_str(s.get(start..).unwrap_or_default());
    out.push('"');
}

/// The caller's view of a refusal: status and code only; for an app in onboarding whose
/// signature did not verify, also the signature base the gateway computed.
pub fn refusal_body(deny: &Deny, request_id: &str, ctx: &RequestContext) -> String {
    match &ctx.onboarding_base {
        Some(base) if deny.reason == crate::DenyReason::SignatureInvalid => serde_json::json!({
            "error": deny.reason.code(), "request_id": request_id, "signature_base": base,
        })
        .to_string(),
        _ => serde_json::json!({"error": deny.reason.code(), "request_id": request_id}).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde_str(s: &str) -> String {
        serde_json::to_string(s).unwrap()
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut fixed: Vec<String> = (0u8..=0x7f)
            .map(|b| format!("ab{}cdefghij", char::from(b)))
            .collect();
        fixed.extend(
            [
                "",
                "plain",
                "\"@method\": POST\n\"@authority\": example.com\n",
                "\\\\\"\"\u{7f}\u{80}\u{2028}é中文🎉",
                "12345678\"12345678\\1234567\u{1}",
                "sig1=(\"@method\" \"@authority\" \"@path\");created=1;keyid=\"k\"",
            ]
            .map(str::to_string),
        );
        // and strings drawn from an alphabet of escaped, plain and multi-byte characters, each
        // escape at every offset of the eight-byte words
        let alphabet = [
            'a', 'Z', '"', '\\', '\n', '\u{0}', '\u{1f}', '\u{7f}', 'é', '中', '🎉', ' ', '/',
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..3000 {
            let mut s = String::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let c = alphabet[(x % alphabet.len() as u64) as usize];
                // mostly plain runs, so that whole words are skipped too
                s.push(if x % 5 < 3 { 'q' } else { c });
            }
            fixed.push(s);
        }
        for s in &fixed {
            let mut out = String::new();
            push_json_str(&mut out, s);
            assert_eq!(out, serde_str(s), "{s:?}");
        }
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            let needs = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
            let found = escapes_in(x);
            // every byte to escape flagged, and the lowest flag on the first of them
            for (k, &b) in bytes.iter().enumerate() {
                if needs(b) {
                    assert!(found & (0x80 << (8 * k)) != 0, "{x:#x}");
                }
            }
            let first = bytes.iter().position(|&b| needs(b));
            let lowest = (found != 0).then(|| (found.trailing_zeros() / 8) as usize);
            assert_eq!(first, lowest, "{x:#x}");
        }
        for w in [0u64, u64::MAX, 0x2020_2020_2020_2020, 0x7e7e_7e7e_7e7e_7e7e] {
            let bytes = w.to_le_bytes();
            let any = bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
            assert_eq!(escapes_in(w) != 0, any, "{w:#x}");
        }
    }

    #[test]
    fn the_record_is_what_serde_json_makes_of_it() {
        let evidence = Evidence {
            keyid: "k\"1".into(),
            alg: "ecdsa-p256-sha256",
            signature_input: r#"sig1=("@method" "@path");created=1;keyid="k""#.into(),
            signature: "sig1=:AAEC:".into(),
            signature_base_sha256: Some("abc=".into()),
            signature_base: "\"@method\": POST\n\"@signature-params\": (\"@method\")".into(),
            content_digest: Some("sha-256=:x:".into()),
            key_sha256: None,
            session_sealed: Some("sealed".into()),
        };
        let anomalies = vec![
            Anomaly {
                rule: "night".into(),
                kind: "time",
                action: "alert",
            },
            Anomaly {
                rule: "r\n2".into(),
                kind: "volume",
                action: "block",
            },
        ];
        let hits = vec![RateHit {
            rule: "per-app".into(),
            window: "minute",
            action: "refuse",
            ban: true,
        }];
        let full = AuditRecord {
            ts: 1_765_000_000,
            request_id: "req-1",
            decision: "deny",
            status: 429,
            code: Some("rate_limited"),
            detail: Cow::Borrowed("over \"per-app\"\t"),
            method: "POST",
            path: Cow::Borrowed("/orders/{account}"),
            query: Some(Cow::Borrowed("a=1&b=\u{1}")),
            client_ip: "10.0.0.1",
            app: Some("app"),
            api: Some("orders"),
            level: Some("S3"),
            function: Some("trade"),
            keyid: Some("k1"),
            user: Some(Cow::Borrowed("u***1")),
            auth: Some("signature"),
            grant: Some("g1"),
            ban: Some("source 10.0.0.1"),
            evidence: Some(&evidence),
            session: Some("fp"),
            session_event: Some("created"),
            operator: Some("spiffe://ops"),
            duration_ms: Some(3),
            bytes_in: Some(0),
            bytes_out: Some(u64::MAX),
            upstream: Some("127.0.0.1:8080"),
            details: Some("via_upstream"),
            sdk: Some(SdkRecord {
                version: Some(Cow::Borrowed("1.0\"")),
                status: "outdated",
                action: "warn",
            }),
            anomalies: &anomalies,
            rate_limits: &hits,
        };
        let bare = AuditRecord {
            code: None,
            detail: Cow::Borrowed(""),
            query: None,
            app: None,
            api: None,
            level: None,
            function: None,
            keyid: None,
            user: None,
            auth: None,
            grant: None,
            ban: None,
            evidence: None,
            session: None,
            session_event: None,
            operator: None,
            duration_ms: None,
            bytes_in: None,
            bytes_out: None,
            upstream: None,
            details: None,
            sdk: Some(SdkRecord {
                version: None,
                status: "unknown",
                action: "allow",
            }),
            anomalies: &[],
            rate_limits: &[],
            ..full.clone()
        };
        for rec in [&full, &bare] {
            assert_eq!(rec.to_json(), serde_json::to_string(rec).unwrap());
        }
    }
}
