//! The life of one request through the gateway, as one state machine (docs/design.md "One request,
//! one state machine in core"). The host calls one method per event (request headers, request
//! body, request trailers, response headers, response body, log) and carries out the [`Step`]
//! it gets back: continue, pause, refuse, headers to set or remove, a response body to put in
//! place, the audit record to publish and the counts to add. The order of checks and every
//! rule about the stream (size and time bounds, when a body is held, a 429 from a limiter after
//! the filter, withholding a response that cannot be filtered, trailers) live here; the host
//! only answers what the machine asks ([`HostFacts`]) and never decides.
//!
//! State that outlives the request (bans, nonces, grant uses, refusal counters) is asked for as
//! a typed [`Batch`] in the step: the request pauses, the host runs the batch on its backend
//! (the local store at once, or a callout to the cluster store) and resumes the machine with
//! the [`Answer`] through [`Stream::on_state`]. Events that arrive meanwhile wait for it.

use std::borrow::Cow;
use std::cell::Cell;
use std::sync::Arc;

use crate::access;
use crate::audit::{self, AuditInput, Decided, LogFacts, Outcome, Traffic};
use crate::audit_chain::Seal;
use crate::cluster::StateBackend;
use crate::crypto::EcdsaVerifier;
use crate::engine::{self, Endpoint, Host, RequestContext};
use crate::error::{Deny, DenyReason};
use crate::fields;
use crate::local;
use crate::message::{self, Request};
use crate::metrics::{self, Sample};
use crate::policy::{IdentityHeader, Policy, SecurityLevel};
use crate::report;
use crate::sdk;
use crate::sessions::{self, Scope};
use crate::state::{Answer, Batch, Op};
use crate::store::{SharedStore, StoreMeta};

/// A host call that failed: which call, and the status code the host gave (proxy-wasm ABI
/// `WasmResult`). The request is refused `host_unavailable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError {
    pub call: &'static str,
    pub status: u32,
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed with host status {}", self.call, self.status)
    }
}

/// What the machine asks the host, only when a decision needs it.
pub trait HostFacts {
    /// Gateway time, unix seconds; None when the clock cannot be read.
    fn now(&self) -> Option<u64>;
    /// TLS and the verified client certificate of the connection.
    fn transport(&self) -> Transport;
    /// The whole request body (`size` bytes, once it is complete).
    fn request_body(&self, size: usize) -> Result<Vec<u8>, HostError>;
    /// A response header's value.
    fn response_header(&self, name: &str) -> Option<String>;
    /// The whole response body.
    fn response_body(&self, size: usize) -> Result<Vec<u8>, HostError>;
    /// The policy in force now, if the host loaded another since the stream began (asked only
    /// when a held body completes). Hosts that never reload have none.
    fn current_config(&self) -> Option<Config> {
        None
    }
    /// The name of the Envoy route the request came through (asked only when the policy has
    /// per-route rules or an operator route).
    fn route_name(&self) -> Option<String> {
        None
    }
    /// Fills `buf` from the host's random source (a session ID); false when there is none.
    fn random(&self, _buf: &mut [u8]) -> bool {
        false
    }
    /// The host's clock in milliseconds (for the request's duration in its audit record).
    fn now_ms(&self) -> Option<u64> {
        self.now().map(|s| s.saturating_mul(1000))
    }
    /// The upstream host a forwarded request went to (asked once, when its stream ended).
    fn upstream_address(&self) -> Option<String> {
        None
    }
    /// Why Envoy itself answered a forwarded request with an error (asked only then).
    fn response_details(&self) -> Option<String> {
        None
    }
}

/// The connection's TLS facts as the host established them.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    pub tls: bool,
    /// Hex SHA-256 of the client certificate Envoy verified (mTLS), lowercase.
    pub peer_cert_sha256: Option<String>,
    /// First URI SAN of that certificate.
    pub peer_uri_san: Option<String>,
}

/// What the host lends every event: the local store, the ECDSA verifier, its facts, and the
/// count of request-body bytes this worker holds.
pub struct Env<'a> {
    pub store: &'a dyn SharedStore,
    pub verifier: &'a dyn EcdsaVerifier,
    pub host: &'a dyn HostFacts,
    pub held: &'a Cell<u64>,
    /// This worker's audit chain (LOG-1); None where records are not sealed (tools, tests).
    pub chain: Option<&'a dyn Seal>,
}

/// The policy in force and the store record it was opened with.
#[derive(Clone)]
pub struct Config {
    pub policy: Arc<Policy>,
    pub meta: Arc<StoreMeta>,
}

/// What the host does with the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Let the stream go on.
    Continue,
    /// Hold it (headers until the body is verified; a response until it is filtered).
    Pause,
    /// Answer locally with this status and JSON body; nothing more goes upstream.
    Refuse {
        status: u32,
        body: String,
        retry_after: Option<u32>,
    },
    /// The gateway answers a request it serves itself (the session endpoints, the operator
    /// path) with this status and JSON body; nothing goes upstream.
    Answer { status: u32, body: String },
}

/// Headers as core builds them (a reply's, a callout's), borrowed as the hosts' calls take them.
pub fn header_pairs<'a>(headers: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    headers.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A local reply as the host sends it: its status, headers and JSON body.
pub struct Reply<'a> {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: &'a str,
}

impl Action {
    /// The reply a refusal or the gateway's own answer makes: JSON, never cached, and a
    /// `retry-after` when the refusal names one. None when the stream goes on or is held.
    pub fn reply(&self) -> Option<Reply<'_>> {
        let (status, body, retry_after) = match self {
            Action::Refuse {
                status,
                body,
                retry_after,
            } => (*status, body, *retry_after),
            Action::Answer { status, body } => (*status, body, None),
            Action::Continue | Action::Pause => return None,
        };
        let mut headers = vec![
            ("content-type", "application/json".to_string()),
            ("cache-control", "no-store".to_string()),
        ];
        if let Some(r) = retry_after {
            headers.push(("retry-after", r.to_string()));
        }
        Some(Reply {
            status,
            headers,
            body,
        })
    }
}

/// The readiness path every listener answers from inside the filter (`GET`, no credentials):
/// 200 from a worker whose apisec VM runs; the guard's 503 from one without.
pub const READY_PATH: &str = "/apisec/v1/ready";

/// A counter to add to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Allowed,
    Denied(DenyReason),
    BanStarted,
    Abandoned,
    /// A refusal reported, not enforced (report mode): the request went on.
    Reported(DenyReason),
    /// A new session evicted the one idle longest (its slot was full).
    SessionEvicted,
}

/// What the host carries out after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    /// Request headers to remove before anything goes upstream (client-sent `x-apisec-*`,
    /// stripped routing overrides).
    pub remove_headers: Vec<String>,
    /// Response headers to remove before the response leaves (the login service's report).
    pub remove_response_headers: Vec<String>,
    /// Response headers to set before the response leaves (an outdated SDK's flag).
    pub response_headers: Vec<(String, String)>,
    /// Set the verified identity headers for the upstream now: what
    /// [`Stream::identity_headers`] lends (borrowed, not copied into the step).
    pub set_identity: bool,
    /// The request goes upstream now (allowed, or let through in report mode): the host marks
    /// it for the guard after this filter (filter state `apisec_passed`, read by the RBAC
    /// filter every shipped Envoy configuration puts after apisec), which refuses a request no
    /// apisec code marked: one a worker without a Wasm VM let pass (LVL-1, ATK-1).
    pub passed: bool,
    /// A response body to put in place of the one received (its length goes with it).
    pub response_body: Option<Vec<u8>>,
    /// The request's audit record, to publish now: set once, when the stream ends.
    pub audit: Option<String>,
    /// What the request adds to the labelled metrics: set once, when the stream ends (boxed:
    /// inline it would half again the size of every step, and steps are moved).
    pub sample: Option<Box<Sample>>,
    pub counts: Vec<Count>,
    /// A line for the host's log (a ban started).
    pub log: Option<String>,
    /// State operations to run before the machine can go on (the action is then `Pause`):
    /// the host runs them and calls [`Stream::on_state`] with the answer.
    pub state: Option<Batch>,
    /// State operations that need no answer, from a stream that ended (a response's bytes,
    /// counted toward bulk-pull rules): on the cluster backend the host sends them from its
    /// root context, since no request is left to wait for them. The local backend has run
    /// them already.
    pub tally: Option<Batch>,
}

impl Step {
    fn go(action: Action) -> Step {
        Step {
            action,
            remove_headers: Vec::new(),
            remove_response_headers: Vec::new(),
            response_headers: Vec::new(),
            set_identity: false,
            passed: false,
            response_body: None,
            audit: None,
            sample: None,
            counts: Vec::new(),
            log: None,
            state: None,
            tally: None,
        }
    }
    fn ask(batch: Batch) -> Step {
        let mut step = Step::go(Action::Pause);
        step.state = Some(batch);
        step
    }

    /// This step followed by `next` (what a host that runs state synchronously carries out),
    /// merged into this one in place: a step is a few hundred bytes, and in Wasm each move of
    /// one is a copy.
    pub fn absorb(&mut self, next: Step) {
        self.action = next.action;
        self.remove_headers.extend(next.remove_headers);
        self.remove_response_headers
            .extend(next.remove_response_headers);
        self.response_headers.extend(next.response_headers);
        self.set_identity |= next.set_identity;
        self.passed |= next.passed;
        if next.response_body.is_some() {
            self.response_body = next.response_body;
        }
        if next.audit.is_some() {
            self.audit = next.audit;
        }
        if next.sample.is_some() {
            self.sample = next.sample;
        }
        self.counts.extend(next.counts);
        if next.log.is_some() {
            self.log = next.log;
        }
        self.state = next.state;
        if next.tally.is_some() {
            self.tally = next.tally;
        }
    }
    fn proceed() -> Step {
        Step::go(Action::Continue)
    }
    fn pause() -> Step {
        Step::go(Action::Pause)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the request headers.
    Start,
    /// Headers checked; the body is held until it is complete.
    HoldingBody,
    /// Let through: the response may still be checked.
    Forwarded,
    /// Holding the response to remove hidden fields.
    FilteringResponse,
    /// Refused (by us, or a limiter after us); nothing more to decide.
    Refused,
}

/// What the machine waits for while a state batch runs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Waiting {
    Nothing,
    /// The source's ban, asked before anything else on the local backend.
    Opening {
        end_of_stream: bool,
    },
    /// Bans and the nonce, read before the body is held (or before an S0 request goes on); for
    /// a request that spends with its headers, its whole final batch.
    Early {
        s0: bool,
    },
    /// Bans, the nonce recorded, a grant use: the last word before the request goes upstream.
    Final,
    /// The session's user, read before a user-bound call is authorized (ID-4).
    SessionUser {
        end_of_stream: bool,
        declared_len: Option<u64>,
    },
    /// The login service's report, being recorded on the session (ID-4).
    Login,
    /// Bans and the refusal counter for a refusal; `respond` is false for a limiter's 429,
    /// whose own answer goes to the caller.
    Refusal {
        deny: Deny,
        respond: bool,
    },
}

/// One request's state machine.
pub struct Stream {
    config: Config,
    req: Request,
    ctx: RequestContext,
    request_id: String,
    client_ip: String,
    /// Gateway time of the current decision step.
    now: u64,
    phase: Phase,
    /// Bytes this request counts against the worker's held-body bound.
    held: u64,
    waiting: Waiting,
    /// The body completed (its size) while a batch was running.
    body_done: Option<usize>,
    /// Trailers arrived while a batch was running.
    trailers: bool,
    /// The opening batch found the source not banned, and no body has been held since: later
    /// batches need not ask again.
    ip_checked: bool,
    /// A refusal was reported instead of enforced (report mode): the request went on unverified.
    reported: bool,
    /// Establishing the session evicted one of the app's own (counted per app when it ends).
    evicted: bool,
    /// A request with a body spent its nonce and counted in the one batch sent with its headers
    /// (`engine::spends_with_headers`): the policy generation that batch was built under, and
    /// the store's answer once it came (`None` while it runs).
    spent: Option<(u64, Option<Answer>)>,
    /// What the gateway answers itself instead of forwarding: a session endpoint or the
    /// operator path.
    served: Option<Served>,
    /// The last decision, for the record written when the stream ends.
    decided: Option<Decided>,
    /// What the stream carried (status, bytes, start), for that record.
    traffic: Traffic,
}

/// A request the gateway serves itself.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Served {
    /// Establish: the new session's ID once recorded.
    Create(String),
    Logout,
    /// An operator ends sessions: who, and for which scope (for the answer and the record).
    Operator {
        operator: String,
        scope: String,
    },
}

mod record;
mod refusal;
mod request;
mod response;

impl Stream {
    pub fn new(config: Config) -> Stream {
        Stream {
            config,
            req: Request::default(),
            ctx: RequestContext::default(),
            request_id: String::new(),
            client_ip: String::new(),
            now: 0,
            phase: Phase::Start,
            held: 0,
            waiting: Waiting::Nothing,
            body_done: None,
            trailers: false,
            ip_checked: false,
            reported: false,
            evicted: false,
            spent: None,
            served: None,
            decided: None,
            traffic: Traffic::default(),
        }
    }

    /// The source address to check for a ban in the next batch (None: just checked).
    fn ip_ban(&self) -> Option<std::net::IpAddr> {
        if self.ip_checked {
            None
        } else {
            self.req.conn.client_ip
        }
    }

    fn ask(&mut self, ops: Vec<Op>, waiting: Waiting) -> Step {
        self.waiting = waiting;
        Step::ask(Batch { ops, now: self.now })
    }

    /// The policy in force for this stream and the store record it was opened with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The verified identity for the upstream and for Envoy's rate-limit descriptors
    /// (`x-apisec-app`, `-api`, `-level`, `-function`, `-user`, as far as
    /// `gateway.identity_headers` names them), once a step says to set it.
    pub fn identity_headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let c = &self.ctx;
        self.config
            .policy
            .identity_headers
            .iter()
            .filter_map(move |h| {
                let v = match h {
                    IdentityHeader::App => c.app.as_deref(),
                    IdentityHeader::Api => c.api.as_deref(),
                    IdentityHeader::Level => c.level.map(SecurityLevel::as_str),
                    IdentityHeader::Function => c.function.as_deref(),
                    IdentityHeader::User => c.user.as_deref(),
                };
                v.map(|v| (h.header(), v))
            })
    }

    /// Whether the machine waits for the answer to a state batch.
    pub fn waiting(&self) -> bool {
        self.waiting != Waiting::Nothing
    }

    /// What the request established so far (for tests and tools).
    pub fn context(&self) -> &RequestContext {
        &self.ctx
    }

    fn policy(&self) -> Arc<Policy> {
        self.config.policy.clone()
    }

    /// Keeps the decision for the audit record written when the stream ends.
    fn decide(&mut self, outcome: Outcome<'_>) {
        self.decided = Some(Decided::of(outcome));
    }

    /// Runs every batch a step asks for on the local store (Envoy shared data) at once, when
    /// the policy keeps state locally; a cluster batch goes to the host.
    fn out(&mut self, mut step: Step, env: &Env<'_>) -> Step {
        if self.config.policy.state == StateBackend::Local {
            let mut mark = local::MarkRead::default();
            while let Some(batch) = step.state.take() {
                let answer = {
                    let c = &self.config;
                    local::run_local_in(&c.policy, env.store, &c.meta, &batch, &mut mark)
                };
                let next = self.ev_state(answer, env);
                step.absorb(next);
            }
        }
        self.count(&step);
        step
    }

    /// What a step does to the stream's traffic, for the audit record: an answer of our own
    /// (its status and body), a replaced response body, a body let go on.
    fn count(&mut self, step: &Step) {
        match &step.action {
            Action::Refuse { status, body, .. } | Action::Answer { status, body } => {
                self.traffic.status = Some(*status);
                self.traffic.response = Default::default();
                self.traffic.response.replaced(body.len());
                self.traffic.own_reply = true;
                return;
            }
            Action::Continue if step.state.is_none() => {
                self.traffic.request.flushed();
                self.traffic.response.flushed();
            }
            _ => {}
        }
        if let Some(body) = &step.response_body {
            self.traffic.response.replaced(body.len());
        }
    }

    /// The request headers: every pair as the host holds them (repeats included), the peer
    /// address, and whether a body follows.
    pub fn on_request_headers(
        &mut self,
        pairs: Result<Vec<(String, Vec<u8>)>, HostError>,
        source_address: Option<&str>,
        end_of_stream: bool,
        env: &Env<'_>,
    ) -> Step {
        self.traffic.started_ms = env.host.now_ms();
        let step = self.ev_request_headers(pairs, source_address, end_of_stream, env);
        self.out(step, env)
    }

    /// A part of the request body arrived (`size`: all of it so far).
    pub fn on_request_body(&mut self, size: usize, end_of_stream: bool, env: &Env<'_>) -> Step {
        self.traffic.request.seen(size);
        let step = self.ev_request_body(size, end_of_stream, env);
        self.out(step, env)
    }

    /// Request trailers.
    pub fn on_request_trailers(&mut self, env: &Env<'_>) -> Step {
        let step = self.ev_request_trailers(env);
        self.out(step, env)
    }

    /// The response headers.
    pub fn on_response_headers(&mut self, end_of_stream: bool, env: &Env<'_>) -> Step {
        if matches!(self.phase, Phase::Forwarded) && !self.traffic.own_reply {
            // What the upstream (or Envoy, for it) answered: read once, for the checks below
            // and the audit record.
            self.traffic.answered = true;
            self.traffic.status = env
                .host
                .response_header(":status")
                .and_then(|s| s.trim().parse().ok());
        }
        let mut step = self.ev_response_headers(end_of_stream, env);
        // A call let through on an outdated SDK says so on its answer (sdk.rs).
        if let (Some(flag), false) = (&self.ctx.sdk, matches!(step.action, Action::Refuse { .. })) {
            if flag.action == sdk::SdkAction::Flag && !self.traffic.own_reply {
                step.response_headers
                    .push((sdk::FLAG_HEADER.to_string(), flag.header()));
            }
        }
        self.out(step, env)
    }

    /// A part of the response body arrived (`size`: all of it so far).
    pub fn on_response_body(&mut self, size: usize, end_of_stream: bool, env: &Env<'_>) -> Step {
        if !self.traffic.own_reply {
            self.traffic.response.seen(size);
        }
        let step = self.ev_response_body(size, end_of_stream, env);
        self.out(step, env)
    }

    /// The host could not put the filtered response in place: withhold it.
    pub fn on_response_rewrite_failed(&mut self, env: &Env<'_>) -> Step {
        let step = self.ev_response_rewrite_failed(env);
        self.out(step, env)
    }

    /// The answer to the state batch the last step asked for (from the cluster store).
    pub fn on_state(&mut self, answer: Answer, env: &Env<'_>) -> Step {
        let step = self.ev_state(answer, env);
        self.out(step, env)
    }

    /// The stream ended. Each request is counted once, by its final outcome: one let through
    /// counts as allowed unless its response was withheld or a limiter answered 429 (counted
    /// as denied when that happened); one whose client left (or that the host ended) before it
    /// was complete leaves an audit record and counts as abandoned: nothing of it went upstream.
    ///
    /// The request's audit record is written here, once, with what the host knows of the ended
    /// stream, and sealed into the worker's chain when the policy has a chain key (LOG-1).
    pub fn on_log(&mut self, env: &Env<'_>) -> Step {
        let forwarded = matches!(self.phase, Phase::Forwarded | Phase::FilteringResponse)
            || self.traffic.answered;
        let mut step = self.ended(env);
        if let Some(decided) = self.decided.take() {
            let t = &self.traffic;
            let status = t.status;
            let facts = LogFacts {
                status,
                duration_ms: match (t.started_ms, env.host.now_ms()) {
                    (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                    _ => None,
                },
                bytes_in: Some(t.request.total),
                bytes_out: Some(t.response.total),
                upstream: forwarded.then(|| env.host.upstream_address()).flatten(),
                // Why Envoy answered a forwarded request with an error of its own.
                details: (forwarded && status.is_none_or(|c| c >= 500))
                    .then(|| env.host.response_details())
                    .flatten(),
            };
            if let (Decided::Allowed, true, false) = (&decided, forwarded, self.reported) {
                self.tally(t.response.total, env, &mut step);
            }
            let body = self.record_with(decided.outcome(), &facts);
            step.sample = Some(Box::new(self.sample(decided.outcome(), &facts)));
            step.audit = Some(match (&self.config.policy.audit.key, env.chain) {
                (Some(key), Some(chain)) => chain.seal(key, body),
                _ => body,
            });
        }
        step
    }
}
