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
    serde_json::to_string(&rec).unwrap_or_else(|_| {
        format!(
            r#"{{"ts":{},"decision":"{decision}","error":"audit serialisation failed"}}"#,
            input.ts
        )
    })
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
