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
use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::access;
use crate::audit::{self, AuditInput, Decided, LogFacts, Outcome, Traffic};
use crate::audit_chain::Chain;
use crate::cluster::StateBackend;
use crate::crypto::EcdsaVerifier;
use crate::engine::{self, Endpoint, Host, RequestContext};
use crate::error::{Deny, DenyReason};
use crate::fields;
use crate::local;
use crate::message::{self, Request};
use crate::metrics::{self, Sample};
use crate::policy::{Policy, SecurityLevel};
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
    pub chain: Option<&'a RefCell<Chain>>,
}

/// The policy in force and the store record it was opened with.
#[derive(Clone)]
pub struct Config {
    pub policy: Rc<Policy>,
    pub meta: Rc<StoreMeta>,
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
    /// What the request adds to the labelled metrics: set once, when the stream ends.
    pub sample: Option<Sample>,
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

    /// This step followed by `next` (what a host that runs state synchronously carries out).
    pub fn then(mut self, next: Step) -> Step {
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
        self
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
    /// Bans and the nonce, read before the body is held (or before an S0 request goes on).
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
    /// (`x-apisec-app`, `-api`, `-level`, `-function`, `-user`), once a step says to set it.
    pub fn identity_headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let c = &self.ctx;
        [
            ("x-apisec-app", c.app.as_deref()),
            ("x-apisec-api", c.api.as_deref()),
            ("x-apisec-level", c.level.map(SecurityLevel::as_str)),
            ("x-apisec-function", c.function.as_deref()),
            ("x-apisec-user", c.user.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
    }

    /// Whether the machine waits for the answer to a state batch.
    pub fn waiting(&self) -> bool {
        self.waiting != Waiting::Nothing
    }

    /// What the request established so far (for tests and tools).
    pub fn context(&self) -> &RequestContext {
        &self.ctx
    }

    fn policy(&self) -> Rc<Policy> {
        self.config.policy.clone()
    }

    /// Keeps the decision for the audit record written when the stream ends.
    fn decide(&mut self, outcome: Outcome<'_>) {
        self.decided = Some(Decided::of(outcome));
    }

    /// The audit record as decided so far, without what only the ended stream tells (for
    /// tests and tools; the host gets the record from [`Stream::on_log`]).
    pub fn record_so_far(&self) -> Option<String> {
        let d = self.decided.as_ref()?;
        Some(self.record_with(d.outcome(), &LogFacts::default()))
    }

    fn record_with(&self, outcome: Outcome<'_>, facts: &LogFacts) -> String {
        let policy = &self.config.policy;
        let mask = &policy.audit.mask;
        // The template names the account fields of the path; looked up only when masked by name.
        let template = match (&self.ctx.api, mask.account_fields.is_empty()) {
            (Some(id), false) => policy
                .apis()
                .iter()
                .find(|a| &a.id == id)
                .map(|a| a.path.as_str()),
            _ => None,
        };
        let input = AuditInput {
            ts: self.now,
            request_id: &self.request_id,
            method: &self.req.method,
            path: self.req.path(),
            query: self.req.query(),
            template,
            client_ip: &self.client_ip,
            mask,
        };
        audit::record(&input, &self.ctx, outcome, facts)
    }

    /// What the request adds to the labelled metrics (metrics.rs).
    fn sample(&self, outcome: Outcome<'_>, facts: &LogFacts) -> Sample {
        let policy = &self.config.policy;
        let (decision, code, shadow) = match outcome {
            Outcome::Allowed => ("allow", "none", false),
            Outcome::Refused(d) => ("deny", d.reason.code(), d.reason == DenyReason::UnknownApi),
            Outcome::Reported(d) => ("report", d.reason.code(), false),
        };
        let app = match &self.ctx.app {
            Some(a) => metrics::label(a).into_owned(),
            None => metrics::app_label(
                policy,
                self.req.unique_header(engine::APP_ID_HEADER).ok().flatten(),
            ),
        };
        Sample {
            app,
            api: self
                .ctx
                .api
                .as_deref()
                .map_or_else(|| "none".into(), |a| metrics::label(a).into_owned()),
            level: self.ctx.level.map_or("none", |l| l.as_str()),
            decision,
            code,
            bytes_in: facts.bytes_in.unwrap_or(0),
            bytes_out: facts.bytes_out.unwrap_or(0),
            duration_ms: facts.duration_ms,
            shadow,
            anomalies: self
                .ctx
                .anomalies
                .iter()
                .map(|a| (metrics::label(&a.rule).into_owned(), a.action))
                .collect(),
            sdk: self
                .ctx
                .sdk
                .as_ref()
                .map(|f| (f.status.as_str(), f.action.as_str())),
            session_evicted: self.evicted,
        }
    }

    fn release(&mut self, env: &Env<'_>) {
        let n = std::mem::take(&mut self.held);
        if n > 0 {
            env.held.set(env.held.get().saturating_sub(n));
        }
    }

    /// A refusal (ours, or a limiter's 429 after us): first what it asks of the state (bans,
    /// the refusal counter), then the audit record and the counts.
    fn refusal(&mut self, deny: Deny, respond: bool, env: &Env<'_>) -> Step {
        if self.now == 0 {
            self.now = env.host.now().unwrap_or(0); // refused before the clock was read
        }
        self.phase = Phase::Refused;
        self.release(env);
        let policy = self.policy();
        let ops = engine::refusal_ops(
            &policy,
            &self.ctx,
            self.req.conn.client_ip,
            self.ip_ban(),
            deny.reason,
            self.now,
        );
        if ops.is_empty() {
            return self.refused(deny, respond, Answer::default());
        }
        self.ask(ops, Waiting::Refusal { deny, respond })
    }

    fn refuse(&mut self, deny: Deny, env: &Env<'_>) -> Step {
        if report::reported_request(&self.config.policy, &self.req, deny.reason) {
            return self.report(deny, env);
        }
        self.refusal(deny, true, env)
    }

    /// Report mode: the refusal is audited and counted as "would refuse" and the request goes
    /// on, without the verified identity headers (nothing was verified) and without touching
    /// the state (no ban counting, no nonce recorded, no grant use).
    fn report(&mut self, deny: Deny, env: &Env<'_>) -> Step {
        if self.now == 0 {
            self.now = env.host.now().unwrap_or(0);
        }
        self.phase = Phase::Forwarded;
        self.reported = true;
        self.release(env);
        let mut step = Step::proceed();
        step.passed = true;
        // nothing was verified: the user a client names does not reach the backend as if it
        // had been (issue 21 item 3)
        step.remove_headers.push(engine::USER_HEADER.to_string());
        self.decide(Outcome::Reported(&deny));
        step.counts.push(Count::Reported(deny.reason));
        step
    }

    /// Reads the Envoy route's name when the policy in force narrows per route or has an
    /// operator route.
    fn read_route(&mut self, env: &Env<'_>) {
        let p = &self.config.policy;
        let wanted = !p.routes.is_empty()
            || p.sessions
                .as_ref()
                .is_some_and(|s| s.operator_route.is_some());
        if self.req.route.is_none() && wanted {
            self.req.route = env.host.route_name();
        }
    }

    /// The operator path (SES-4, OPS-6): only through the operator route, only with a client
    /// certificate whose URI SAN the policy names as an operator's.
    fn operator(&mut self, end_of_stream: bool, env: &Env<'_>) -> Option<Step> {
        let policy = self.policy();
        let sessions = policy.sessions.as_ref()?;
        let route = sessions.operator_route.as_deref()?;
        if self.req.route.as_deref() != Some(route) {
            return None;
        }
        self.ctx.api = Some("apisec.operator.sessions".into());
        let t = env.host.transport();
        let operator = t
            .peer_uri_san
            .filter(|s| t.tls && sessions.operators.contains(s));
        let Some(operator) = operator else {
            let d = Deny::new(
                DenyReason::OperatorNotAllowed,
                "no operator client certificate on the operator route",
            );
            return Some(self.refusal(d, true, env));
        };
        if self.req.method != "POST" || end_of_stream {
            let d = Deny::new(
                DenyReason::SessionRequestInvalid,
                "the operator path takes a POST with a JSON body",
            );
            return Some(self.refusal(d, true, env));
        }
        self.served = Some(Served::Operator {
            operator,
            scope: String::new(),
        });
        match engine::admit_body(&policy, env.held.get(), None) {
            Ok(n) => {
                self.held = n;
                env.held.set(env.held.get().saturating_add(n));
            }
            Err(d) => return Some(self.refusal(d, true, env)),
        }
        self.phase = Phase::HoldingBody;
        Some(Step::pause())
    }

    /// The operator's request, complete: which sessions to end.
    fn operator_ops(&mut self, body: &[u8]) -> Result<Vec<Op>, Deny> {
        let scope = sessions::parse_operator(body)?;
        let text = match &scope {
            Scope::Session(_) => "one session".to_string(),
            Scope::App(a) => format!("every session of app {a}"),
            Scope::User(u) => format!("every session of user {u}"),
        };
        if let Scope::Session(id) = &scope {
            self.ctx.session_fp = Some(sessions::fingerprint(id));
        }
        if let Some(Served::Operator { scope: s, .. }) = &mut self.served {
            *s = text;
        }
        self.ctx.session_event = Some("ended_by_operator");
        Ok(vec![Op::SessionRevoke(scope)])
    }

    /// The refusal once its state operations answered: a banned caller is told it is banned.
    fn refused(&mut self, deny: Deny, respond: bool, mut answer: Answer) -> Step {
        let deny = match answer.refused {
            Some(d) if d.reason == DenyReason::Banned => d,
            Some(d) => {
                // the store could not count it: the refusal stands, and the record says so
                answer.note = Some(format!("refusal not counted: {}", d.detail));
                deny
            }
            None => deny,
        };
        let mut step = if respond {
            Step::go(Action::Refuse {
                status: deny.reason.status(),
                body: audit::refusal_body(&deny, &self.request_id, &self.ctx),
                retry_after: deny.reason.retry_after_seconds(),
            })
        } else {
            Step::proceed()
        };
        if let Some(ban) = answer.ban_started {
            step.log = Some(format!("apisec: {ban} (request {})", self.request_id));
            step.counts.push(Count::BanStarted);
            self.ctx.ban = Some(ban);
        } else if let Some(note) = answer.note {
            self.ctx.ban = Some(note);
        }
        self.decide(Outcome::Refused(&deny));
        step.counts.push(Count::Denied(deny.reason));
        step
    }

    /// The answer to the state batch the last step asked for.
    fn ev_state(&mut self, mut answer: Answer, env: &Env<'_>) -> Step {
        // counted anomaly rules that matched: in the record and the metric, whatever follows
        self.ctx.anomalies.append(&mut answer.anomalies);
        match std::mem::replace(&mut self.waiting, Waiting::Nothing) {
            Waiting::Nothing => Step::proceed(),
            Waiting::Refusal { deny, respond } => self.refused(deny, respond, answer),
            Waiting::Opening { end_of_stream } => match answer.refused {
                Some(d) => self.refuse(d, env),
                None => {
                    self.ip_checked = true;
                    self.headers(end_of_stream, env)
                }
            },
            Waiting::Final => match answer.refused {
                Some(d) => self.refuse(d, env),
                None => self.accepted(answer, env),
            },
            Waiting::SessionUser {
                end_of_stream,
                declared_len,
            } => {
                if let Some(d) = answer.refused {
                    return self.refuse(d, env);
                }
                let policy = self.policy();
                let (user, factors) = answer
                    .session
                    .as_deref()
                    .map_or((None, 0), |s| (s.user.clone(), s.factors));
                if let Err(d) = engine::apply_session_user(
                    &policy,
                    &self.req,
                    user.as_deref(),
                    factors,
                    self.now,
                    &mut self.ctx,
                ) {
                    return self.refuse(d, env);
                }
                let step = self.after_checks(end_of_stream, declared_len, env);
                if step.action == Action::Pause && step.state.is_none() {
                    if std::mem::take(&mut self.trailers) {
                        return self.ev_request_trailers(env);
                    }
                    if let Some(size) = self.body_done.take() {
                        return self.ev_request_body(size, true, env);
                    }
                }
                step
            }
            Waiting::Login => match answer.refused {
                Some(d) => self.withhold(d, env),
                None => {
                    self.decide(Outcome::Allowed); // the login, recorded on the session
                    Step::proceed()
                }
            },
            Waiting::Early { s0 } => {
                if let Some(d) = answer.refused {
                    return self.refuse(d, env);
                }
                if s0 {
                    return self.accepted(answer, env);
                }
                if std::mem::take(&mut self.trailers) {
                    return self.ev_request_trailers(env);
                }
                match self.body_done.take() {
                    Some(size) => self.ev_request_body(size, true, env),
                    None => Step::pause(),
                }
            }
        }
    }

    fn allow(&mut self, mut step: Step, env: &Env<'_>) -> Step {
        self.phase = Phase::Forwarded;
        self.release(env);
        step.set_identity = true;
        step.passed = true;
        self.decide(Outcome::Allowed);
        step.action = Action::Continue;
        step
    }

    /// The request headers: every pair as the host holds them (repeats included), the peer
    /// address, and whether a body follows.
    fn ev_request_headers(
        &mut self,
        pairs: Result<Vec<(String, Vec<u8>)>, HostError>,
        source_address: Option<&str>,
        end_of_stream: bool,
        env: &Env<'_>,
    ) -> Step {
        let policy = self.policy();
        let mut removed = Vec::new();
        let pairs = match pairs {
            Ok(p) => p,
            Err(e) => {
                let d = Deny::new(DenyReason::HostUnavailable, format!("request headers: {e}"));
                return self.refuse(d, env);
            }
        };
        for (name, value) in pairs {
            let value = String::from_utf8(value)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
            match name.as_str() {
                ":method" => self.req.method = value,
                ":scheme" => self.req.scheme = value,
                ":authority" => self.req.authority = value,
                ":path" => self.req.path_and_query = value,
                "x-request-id" => self.request_id = value,
                n if n.starts_with(':') => {}
                n => {
                    if engine::strips_header(&policy, n) {
                        removed.push(name.clone());
                    }
                    if !engine::is_internal_header(n) {
                        self.req.headers.push((name, value));
                    }
                }
            }
        }
        if let Some(addr) = source_address {
            self.client_ip = message::ip_of_address(addr).to_string();
            self.req.conn.client_ip = self.client_ip.parse().ok();
        }
        // On the local backend a banned source is refused before anything else (MON-6).
        let local = policy.state == StateBackend::Local;
        let opening = engine::opening_ops(&policy, self.req.conn.client_ip, local);
        let mut step = match env.host.now() {
            Some(now) if !opening.is_empty() => {
                self.now = now;
                self.ask(opening, Waiting::Opening { end_of_stream })
            }
            _ => self.headers(end_of_stream, env),
        };
        step.remove_headers.extend(removed);
        step
    }

    fn headers(&mut self, end_of_stream: bool, env: &Env<'_>) -> Step {
        if self.req.method.is_empty() || self.req.path_and_query.is_empty() {
            let d = Deny::new(DenyReason::MalformedHeader, "missing :method or :path");
            return self.refuse(d, env);
        }
        let Some(now) = env.host.now() else {
            return self.refuse(Deny::new(DenyReason::HostUnavailable, "no clock"), env);
        };
        self.now = now;
        if self.req.method == "GET" && self.req.path_and_query == READY_PATH {
            // Answered only by a worker that runs apisec: on one without a VM the request
            // reaches the guard after the filter, which refuses it (503), so a readiness probe
            // on this path fails there (LVL-1). Not an API call: no audit record.
            return Step::go(Action::Answer {
                status: 200,
                body: "{\"ready\":true}".into(),
            });
        }
        self.read_route(env);
        if let Some(step) = self.operator(end_of_stream, env) {
            return step;
        }
        let policy = self.policy();
        let declared_len = self
            .req
            .header_values("content-length")
            .next()
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared_len.is_some_and(|n| n > policy.max_body_bytes) {
            let d = Deny::new(
                DenyReason::BodyTooLarge,
                "content-length over max_body_bytes",
            );
            return self.refuse(d, env);
        }
        let api = match engine::begin(&policy, &self.req) {
            Ok(api) => api,
            Err(d) => {
                // A shadow-API call (MON-1) is recorded with the registered app it claims.
                if d.reason == DenyReason::UnknownApi {
                    self.ctx.app = engine::claimed_app(&policy, &self.req);
                }
                return self.refuse(d, env);
            }
        };
        if engine::needs_transport(api) {
            let t = env.host.transport();
            self.req.conn.tls = t.tls;
            self.req.conn.peer_cert_sha256 = t.peer_cert_sha256;
            self.req.conn.peer_uri_san = t.peer_uri_san;
        }
        let host = Host {
            verifier: env.verifier,
        };
        if let Err(d) = engine::check_headers(
            &policy,
            api,
            &self.req,
            !end_of_stream,
            now,
            &host,
            &mut self.ctx,
        ) {
            return self.refuse(d, env);
        }
        let endpoint = engine::endpoint(&policy, api);
        self.served = match endpoint {
            Some(Endpoint::Create) => Some(Served::Create(String::new())),
            Some(Endpoint::Logout) => Some(Served::Logout),
            None => None,
        };
        if engine::needs_session_user(&policy, api) {
            if let Some(call) = engine::session_call(&self.ctx) {
                let waiting = Waiting::SessionUser {
                    end_of_stream,
                    declared_len,
                };
                return self.ask(vec![Op::SessionRead(call)], waiting);
            }
        }
        self.after_checks(end_of_stream, declared_len, env)
    }

    /// The request headers passed every check: decide at once, or hold the body.
    fn after_checks(
        &mut self,
        end_of_stream: bool,
        declared_len: Option<u64>,
        env: &Env<'_>,
    ) -> Step {
        let policy = self.policy();
        let now = self.now;
        if end_of_stream {
            return self.finish(&[], env);
        }
        let ops = engine::early_ops(&policy, self.ip_ban(), &self.ctx, now);
        self.ip_checked = false; // a ban may start while the body comes: asked again then
        if self.ctx.level == Some(SecurityLevel::S0)
            && self.served.is_none()
            && !engine::has_form_body(&self.req)
        {
            // nothing in the body to verify at S0 (a form body may carry _method: held)
            if ops.is_empty() {
                return self.allow(Step::proceed(), env);
            }
            return self.ask(ops, Waiting::Early { s0: true });
        }
        // Hold the headers until the whole body is in and verified, within this worker's bound.
        match engine::admit_body(&policy, env.held.get(), declared_len) {
            Ok(n) => {
                self.held = n;
                env.held.set(env.held.get().saturating_add(n));
            }
            Err(d) => return self.refuse(d, env),
        }
        self.phase = Phase::HoldingBody;
        if ops.is_empty() {
            return Step::pause();
        }
        self.ask(ops, Waiting::Early { s0: false })
    }

    /// A part of the request body arrived (`size`: all of it so far).
    fn ev_request_body(&mut self, size: usize, end_of_stream: bool, env: &Env<'_>) -> Step {
        if self.waiting() {
            // nothing goes on while the state answers; a completed body is decided then
            let reading_user = matches!(self.waiting, Waiting::SessionUser { .. });
            if end_of_stream && (self.phase == Phase::HoldingBody || reading_user) {
                self.body_done = Some(size);
            }
            return Step::pause();
        }
        if self.phase != Phase::HoldingBody {
            return Step::proceed();
        }
        let max = self.config.policy.max_body_bytes;
        if size as u64 > max {
            let d = Deny::new(DenyReason::BodyTooLarge, format!("body over {max} bytes"));
            return self.refuse(d, env);
        }
        if !end_of_stream {
            return Step::pause();
        }
        match env.host.now() {
            Some(now) => self.now = now,
            None => return self.refuse(Deny::new(DenyReason::HostUnavailable, "no clock"), env),
        }
        let body = match env.host.request_body(size) {
            Ok(b) => b,
            Err(e) => {
                let d = Deny::new(DenyReason::HostUnavailable, format!("request body: {e}"));
                return self.refuse(d, env);
            }
        };
        if let Some(c) = env.host.current_config() {
            self.config = c;
            self.read_route(env);
        }
        self.finish(&body, env)
    }

    /// The body is complete (empty without one): decided under the policy in force now.
    fn finish(&mut self, body: &[u8], env: &Env<'_>) -> Step {
        let policy = self.policy();
        if matches!(self.served, Some(Served::Operator { .. })) {
            return match self.operator_ops(body) {
                Ok(ops) => self.ask(ops, Waiting::Final),
                Err(d) => self.refusal(d, true, env),
            };
        }
        let host = Host {
            verifier: env.verifier,
        };
        if let Err(d) = engine::check_body(&policy, &self.req, &mut self.ctx, body, &host, self.now)
        {
            return self.refuse(d, env);
        }
        let mut ops = engine::final_ops(
            &policy,
            self.req.conn.client_ip,
            self.ip_ban(),
            &self.ctx,
            self.now,
        );
        if let Some(Served::Create(_)) = self.served {
            match self.create_op(body, env) {
                Ok(op) => ops.push(op),
                Err(d) => return self.refuse(d, env),
            }
        }
        if let Some(id) = &self.ctx.session {
            self.ctx.session_fp = Some(sessions::fingerprint(id));
        }
        if ops.is_empty() {
            return self.accepted(Answer::default(), env);
        }
        self.ask(ops, Waiting::Final)
    }

    /// Establishing a session (SES-1): the body names the caller and its device; the ID comes
    /// from the host's random source.
    fn create_op(&mut self, body: &[u8], env: &Env<'_>) -> Result<Op, Deny> {
        let app = self.ctx.app.clone().unwrap_or_default();
        let (mac, _declared_ip) = sessions::parse_establish(body, &app)?;
        let ip = engine::client_address(&self.req)?;
        let mut random = [0u8; 24];
        if !env.host.random(&mut random) {
            return Err(Deny::new(DenyReason::HostUnavailable, "no random source"));
        }
        let id = sessions::new_id(&random);
        self.ctx.session_fp = Some(sessions::fingerprint(&id));
        self.ctx.session_event = Some("created");
        self.served = Some(Served::Create(id.clone()));
        Ok(Op::SessionCreate {
            id,
            session: sessions::Session {
                tag: String::new(),
                app,
                ip,
                mac,
                user: None,
                factors: 0,
                created: self.now,
                last_seen: self.now,
            },
        })
    }

    /// The request passed and its state answered: forwarded, or answered by the gateway.
    fn accepted(&mut self, answer: Answer, env: &Env<'_>) -> Step {
        let mut step = Step::proceed();
        if answer.evicted {
            step.counts.push(Count::SessionEvicted);
            self.evicted = true;
        }
        let served = self.served.take();
        let Some(served) = served else {
            return self.allow(step, env);
        };
        let policy = self.policy();
        let idle = policy
            .sessions
            .as_ref()
            .map_or(0, |s| s.idle_timeout_seconds);
        let lifetime = policy
            .sessions
            .as_ref()
            .map_or(0, |s| s.max_lifetime_seconds);
        let (status, body) = match &served {
            Served::Create(id) => (
                201,
                serde_json::json!({
                    "session_id": id,
                    "idle_timeout_seconds": idle,
                    "expires_at": self.now.saturating_add(lifetime),
                }),
            ),
            Served::Logout => {
                self.ctx.session_event = Some("logged_out");
                (200, serde_json::json!({"ended": true}))
            }
            Served::Operator { operator, scope } => {
                if answer.nothing_to_end {
                    let d = Deny::new(DenyReason::SessionInvalid, "no such session to end");
                    return self.refusal(d, true, env);
                }
                self.ctx.operator = Some(format!("{operator}: {scope}"));
                (200, serde_json::json!({"ended": scope}))
            }
        };
        self.phase = Phase::Refused; // answered here: nothing goes upstream
        self.release(env);
        step.action = Action::Answer {
            status,
            body: body.to_string(),
        };
        self.decide(Outcome::Allowed);
        step.counts.push(Count::Allowed);
        step
    }

    /// Request trailers: RFC 9530 digests cover content, not trailers, so a request still held
    /// for verification must not smuggle any.
    fn ev_request_trailers(&mut self, env: &Env<'_>) -> Step {
        if self.waiting() {
            let reading_user = matches!(self.waiting, Waiting::SessionUser { .. });
            // refused when the state answers
            self.trailers = self.phase == Phase::HoldingBody || reading_user;
            return Step::pause();
        }
        if self.phase != Phase::HoldingBody {
            return Step::proceed();
        }
        let d = Deny::new(
            DenyReason::MalformedHeader,
            "request trailers are not accepted on signed APIs",
        );
        self.refuse(d, env)
    }

    /// The response fields the selected grant hides, if any (in `policy`, the stream's own).
    fn hidden_fields<'p>(&self, policy: &'p Policy) -> Option<Cow<'p, [Vec<String>]>> {
        if self.reported {
            // Report mode selected no grant (nothing was verified): hide what any grant of
            // this API hides, so an unverified caller never sees more than a granted one
            // (issue 21 item 3, PERM-1).
            let api = self.ctx.api.as_deref()?;
            let hidden = access::hidden_by_any_grant(policy.apis(), &policy.grants, api);
            return (!hidden.is_empty()).then_some(Cow::Owned(hidden));
        }
        let grant = self.ctx.grant_index.and_then(|i| policy.grants.get(i))?;
        let hidden = grant.hide_response_fields.as_slice();
        (!hidden.is_empty()).then_some(Cow::Borrowed(hidden))
    }

    /// The response cannot be released as it is: replace it with a refusal (its headers are
    /// still held).
    fn withhold(&mut self, deny: Deny, env: &Env<'_>) -> Step {
        self.refuse(deny, env)
    }

    /// The response headers. Only a limiter's 429 and field hiding look at the response;
    /// otherwise the host is asked nothing.
    fn ev_response_headers(&mut self, end_of_stream: bool, env: &Env<'_>) -> Step {
        if let Some(step) = self.login_report(env) {
            return step;
        }
        if self.phase != Phase::Forwarded {
            return Step::proceed();
        }
        if self.traffic.status == Some(429) && !self.reported {
            // Envoy's rate limiter refused what we allowed: audit it and count it (RL-3), with
            // or without bans; the caller gets the limiter's own answer.
            let d = Deny::new(DenyReason::RateLimited, "rate limit answered 429");
            return self.refusal(d, false, env);
        }
        let policy = self.policy();
        let hides = self.hidden_fields(&policy).is_some();
        if !hides {
            return Step::proceed();
        }
        let encoding = env.host.response_header("content-encoding");
        if encoding.is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity")) {
            let d = Deny::new(
                DenyReason::ResponseUnfilterable,
                "the response is compressed; hidden fields cannot be removed",
            );
            return self.withhold(d, env);
        }
        if end_of_stream {
            return Step::proceed();
        }
        self.phase = Phase::FilteringResponse;
        Step::pause() // hold the headers: content-length changes with the body
    }

    /// The answer of one of the firm's login APIs (ID-4): its report of who logged in, with
    /// how many factors, is recorded on the caller's session and removed before the answer
    /// leaves. A malformed report withholds the answer; a call that was not verified (report
    /// mode) records nothing.
    fn login_report(&mut self, env: &Env<'_>) -> Option<Step> {
        let policy = self.policy();
        let sessions = policy.sessions.as_ref()?;
        let api = self.ctx.api.as_deref()?;
        let is_login = sessions
            .login_apis
            .iter()
            .any(|i| policy.apis().get(*i).is_some_and(|a| a.id == api));
        if !is_login {
            return None;
        }
        let name = sessions.login_header.clone();
        let value = env.host.response_header(&name)?;
        let mut step = Step::proceed();
        step.remove_response_headers.push(name);
        let ok = self.traffic.status.is_some_and(|s| (200..300).contains(&s));
        let call = engine::session_call(&self.ctx);
        let (Phase::Forwarded, false, true, Some(call)) = (self.phase, self.reported, ok, call)
        else {
            return Some(step);
        };
        let Some((user, factors)) = sessions::parse_login(&value) else {
            let d = Deny::new(
                DenyReason::LoginReportInvalid,
                "the login service's report is not user=<id>; factors=<n>",
            );
            return Some(step.then(self.withhold(d, env)));
        };
        self.ctx.user = Some(user.clone());
        self.ctx.session_event = Some("user_logged_in");
        let ask = self.ask(
            vec![Op::SessionLogin {
                call,
                user,
                factors,
            }],
            Waiting::Login,
        );
        Some(step.then(ask))
    }

    /// A part of the response body arrived (`size`: all of it so far).
    fn ev_response_body(&mut self, size: usize, end_of_stream: bool, env: &Env<'_>) -> Step {
        if self.waiting() {
            return Step::pause(); // a limiter's 429 is being counted
        }
        if self.phase != Phase::FilteringResponse {
            return Step::proceed();
        }
        if size as u64 > self.config.policy.max_body_bytes {
            let d = Deny::new(
                DenyReason::ResponseUnfilterable,
                "response over max_body_bytes",
            );
            return self.withhold(d, env);
        }
        if !end_of_stream {
            return Step::pause();
        }
        let body = match env.host.response_body(size) {
            Ok(b) => b,
            Err(e) => {
                let d = Deny::new(DenyReason::HostUnavailable, format!("response body: {e}"));
                return self.withhold(d, env);
            }
        };
        let policy = self.policy();
        let hidden = self.hidden_fields(&policy).unwrap_or_default();
        match fields::filter_response(&hidden, &body) {
            Ok(filtered) => {
                self.phase = Phase::Forwarded;
                let mut step = Step::proceed();
                step.response_body = filtered;
                step
            }
            Err(d) => self.withhold(d, env),
        }
    }

    /// The host could not put the filtered response in place: withhold it.
    fn ev_response_rewrite_failed(&mut self, env: &Env<'_>) -> Step {
        let d = Deny::new(DenyReason::HostUnavailable, "cannot rewrite the response");
        self.withhold(d, env)
    }

    /// Runs every batch a step asks for on the local store (Envoy shared data) at once, when
    /// the policy keeps state locally; a cluster batch goes to the host.
    fn out(&mut self, mut step: Step, env: &Env<'_>) -> Step {
        if self.config.policy.state == StateBackend::Local {
            while let Some(batch) = step.state.take() {
                let answer = {
                    let c = &self.config;
                    local::run_local(&c.policy, env.store, &c.meta, &batch)
                };
                let next = self.ev_state(answer, env);
                step = step.then(next);
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
            step.sample = Some(self.sample(decided.outcome(), &facts));
            step.audit = Some(match (&self.config.policy.audit.key, env.chain) {
                (Some(key), Some(chain)) => chain.borrow_mut().seal(key, &body),
                _ => body,
            });
        }
        step
    }

    /// A let-through call's response bytes, for the bulk-pull rules that count them: run now
    /// on the local store (a count the store could not take goes to the host's log); handed
    /// to the host for the cluster store.
    fn tally(&self, bytes: u64, env: &Env<'_>, step: &mut Step) {
        let policy = &self.config.policy;
        let (Some(app), Some(api), Some(_)) = (&self.ctx.app, &self.ctx.api, self.ctx.auth) else {
            return;
        };
        let now = env.host.now().unwrap_or(self.now);
        let ops = policy.anomalies.bytes_ops(app, api, bytes, now);
        if ops.is_empty() {
            return;
        }
        let batch = Batch { ops, now };
        if policy.state != StateBackend::Local {
            step.tally = Some(batch);
            return;
        }
        let answer = local::run_local(policy, env.store, &self.config.meta, &batch);
        if let Some(note) = answer.note {
            step.log = Some(format!("apisec: {note} (request {})", self.request_id));
        }
    }

    fn ended(&mut self, env: &Env<'_>) -> Step {
        self.release(env);
        let mut step = Step::proceed();
        let waited = std::mem::replace(&mut self.waiting, Waiting::Nothing);
        if let Waiting::Refusal { deny, .. } = waited {
            // the stream ended before the refusal's state answered: it is recorded uncounted
            self.phase = Phase::Refused;
            let answer = Answer {
                note: Some("the stream ended before the refusal was counted".into()),
                ..Answer::default()
            };
            return self.refused(deny, false, answer);
        }
        let phase = match waited {
            Waiting::Early { .. } | Waiting::Final => Phase::HoldingBody,
            _ => self.phase,
        };
        match phase {
            Phase::Forwarded | Phase::FilteringResponse if self.reported => {}
            Phase::Forwarded | Phase::FilteringResponse => step.counts.push(Count::Allowed),
            Phase::HoldingBody => {
                self.now = env.host.now().unwrap_or(self.now);
                let d = Deny::new(
                    DenyReason::RequestAbandoned,
                    "the request ended before it was decided",
                );
                self.decide(Outcome::Refused(&d));
                step.counts.push(Count::Abandoned);
                step.counts.push(Count::Denied(d.reason));
            }
            Phase::Start | Phase::Refused => {}
        }
        self.phase = Phase::Refused;
        step
    }
}
