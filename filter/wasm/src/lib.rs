//! apisec-filter: the proxy-wasm glue between Envoy and apisec-core. It reads what Envoy
//! knows of a request, hands it to core, and turns core's decision into host actions:
//! forward with verified `x-apisec-*` headers, or a local refusal; and an audit record in
//! filter state (`wasm.apisec_audit`) for Envoy's access log. No rule lives here.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use apisec_core::audit::{self, AuditInput};
use apisec_core::crypto::{self, EcdsaVerifier, SoftwareVerifier};
use apisec_core::engine::{self, Host, RequestContext};
use apisec_core::fields;
use apisec_core::message::{self, Request};
use apisec_core::policy::SecretSource;
use apisec_core::replay;
use apisec_core::store::{self, SharedStore, StoreMeta};
use apisec_core::{Deny, DenyReason, Policy};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

#[allow(unsafe_code)] // the SDK's entry point is a #[no_mangle] export
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
        proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
            Box::new(super::ApisecRoot::default())
        });
    }}
}

/// How often the allowed-request counter reaches Envoy's stats.
const METRICS_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

thread_local! {
    /// The policy most recently loaded in this VM (one VM per worker): a stream whose body
    /// completes after a reload is decided under it, not under the one its headers saw.
    static CURRENT: RefCell<Option<(Rc<Policy>, Rc<StoreMeta>)>> = const { RefCell::new(None) };
    static GENERATION: Cell<u64> = const { Cell::new(0) };
    /// Bytes of request bodies this worker holds for verification right now.
    static HELD: Cell<u64> = const { Cell::new(0) };
}

/// Filter-state key Envoy's access log reads as `%FILTER_STATE(wasm.apisec_audit:PLAIN)%`.
const AUDIT_PROPERTY: &str = "apisec_audit";

fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

fn now_secs() -> Option<u64> {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
}

/// HMAC secrets come from `vm_config.environment_variables`, never from the policy text.
struct EnvSecrets;
impl SecretSource for EnvSecrets {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// Envoy shared data: one store per `vm_id`, shared by every worker, with CAS.
struct EnvoyStore;
impl SharedStore for EnvoyStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, String> {
        match hostcalls::get_shared_data(key) {
            Ok((value, Some(cas))) => Ok(Some((value.unwrap_or_default(), cas))),
            Ok((_, None)) => Ok(None),
            Err(s) => Err(format!("get_shared_data: {s:?}")),
        }
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, String> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(s) => Err(format!("set_shared_data: {s:?}")),
        }
    }
}

/// ECDSA through Envoy's BoringSSL (`verify_signature` foreign function); the pure-Rust path
/// only where the host does not offer the function at all.
struct EnvoyVerifier {
    warned: Cell<bool>,
}
impl EcdsaVerifier for EnvoyVerifier {
    fn verify_p256_sha256(
        &self,
        spki_der: &[u8],
        msg: &[u8],
        sig_raw: &[u8],
    ) -> Result<bool, String> {
        let Some(der) = crypto::p1363_to_der(sig_raw) else {
            return Ok(false);
        };
        let args = crypto::envoy_verify_args(spki_der, &der, msg);
        match hostcalls::call_foreign_function("verify_signature", Some(&args)) {
            Ok(Some(out)) => crypto::envoy_verify_result(&out)
                .ok_or_else(|| "unreadable verify_signature result".to_string()),
            Ok(None) => Err("verify_signature returned nothing".into()),
            Err(Status::NotFound) => {
                if !self.warned.replace(true) {
                    log(
                        LogLevel::Warn,
                        "apisec: host has no verify_signature; using the pure-Rust P-256 verifier",
                    );
                }
                SoftwareVerifier.verify_p256_sha256(spki_der, msg, sig_raw)
            }
            Err(s) => Err(format!("verify_signature: {s:?}")),
        }
    }
}

/// Counters, one fixed list: `apisec.allowed`, `apisec.denied`, `apisec.denied.<code>`.
/// Refusals are counted at once; allowed requests (the hot path) are summed in the VM and added
/// to Envoy's counter once a second by the root context's tick, saving a host call per request.
struct Metrics {
    allowed: Option<u32>,
    allowed_pending: Cell<u64>,
    denied: Option<u32>,
    bans: Option<u32>,
    abandoned: Option<u32>,
    by_reason: Vec<(DenyReason, u32)>,
}

impl Metrics {
    fn define() -> Self {
        let def = |name: &str| hostcalls::define_metric(MetricType::Counter, name).ok();
        Metrics {
            allowed: def("apisec.allowed"),
            allowed_pending: Cell::new(0),
            denied: def("apisec.denied"),
            bans: def("apisec.bans_started"),
            abandoned: def("apisec.abandoned"),
            by_reason: DenyReason::ALL
                .iter()
                .filter_map(|r| def(&format!("apisec.denied.{}", r.code())).map(|id| (*r, id)))
                .collect(),
        }
    }
    fn bump(id: Option<u32>) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }
    fn allowed(&self) {
        self.allowed_pending
            .set(self.allowed_pending.get().saturating_add(1));
    }
    /// Adds the allowed requests summed since the last flush to Envoy's counter.
    fn flush(&self) {
        let n = self.allowed_pending.replace(0);
        if let (Some(id), true) = (self.allowed, n > 0) {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    fn banned(&self) {
        Self::bump(self.bans);
    }
    fn abandoned(&self) {
        Self::bump(self.abandoned);
    }
    fn denied(&self, reason: DenyReason) {
        Self::bump(self.denied);
        Self::bump(
            self.by_reason
                .iter()
                .find(|(r, _)| *r == reason)
                .map(|(_, id)| *id),
        );
    }
}

#[derive(Default)]
pub struct ApisecRoot {
    policy: Option<Rc<Policy>>,
    meta: Option<Rc<StoreMeta>>,
    metrics: Option<Rc<Metrics>>,
    verifier: Option<Rc<EnvoyVerifier>>,
}

impl Context for ApisecRoot {
    fn on_done(&mut self) -> bool {
        if let Some(m) = &self.metrics {
            m.flush();
        }
        true
    }
}

impl RootContext for ApisecRoot {
    /// Refusing here (false) makes Envoy reject the new config and keep the last good one.
    fn on_configure(&mut self, size: usize) -> bool {
        let text = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            _ => {
                log(
                    LogLevel::Error,
                    "apisec: policy refused: no plugin configuration",
                );
                return false;
            }
        };
        let mut policy = match Policy::from_json(&text, &EnvSecrets) {
            Ok(p) => p,
            Err(e) => {
                log(LogLevel::Error, &format!("apisec: policy refused: {e}"));
                return false;
            }
        };
        let meta = match open_store(&policy) {
            Ok(m) => m,
            Err(e) => {
                log(LogLevel::Error, &format!("apisec: policy refused: {e}"));
                return false;
            }
        };
        policy.generation = GENERATION.with(|g| {
            g.set(g.get() + 1);
            g.get()
        });
        log(
            LogLevel::Info,
            &format!("apisec: policy loaded: {} APIs", policy.apis().len()),
        );
        let (policy, meta) = (Rc::new(policy), Rc::new(meta));
        CURRENT.with(|c| *c.borrow_mut() = Some((policy.clone(), meta.clone())));
        self.policy = Some(policy);
        self.meta = Some(meta);
        if self.metrics.is_none() {
            self.metrics = Some(Rc::new(Metrics::define()));
            let _ = hostcalls::set_tick_period(METRICS_FLUSH);
        }
        if self.verifier.is_none() {
            self.verifier = Some(Rc::new(EnvoyVerifier {
                warned: Cell::new(false),
            }));
        }
        true
    }

    fn on_tick(&mut self) {
        if let Some(m) = &self.metrics {
            m.flush();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let (Some(policy), Some(meta), Some(metrics), Some(verifier)) =
            (&self.policy, &self.meta, &self.metrics, &self.verifier)
        else {
            return None; // never configured: Envoy's failure policy (FAIL_CLOSED) applies
        };
        Some(Box::new(ApisecHttp {
            policy: policy.clone(),
            meta: meta.clone(),
            metrics: metrics.clone(),
            verifier: verifier.clone(),
            req: Request::default(),
            ctx: RequestContext::default(),
            request_id: String::new(),
            client_ip: String::new(),
            now: 0,
            decided: false,
            allowed: false,
            filtering_response: false,
            held: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Opens the state store for a policy: its record (salt, start time, replay layout) and every
/// replay slot, created only where absent. A layout the running store cannot take is refused.
fn open_store(policy: &Policy) -> Result<StoreMeta, String> {
    let now = now_secs().ok_or("no clock")?;
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| format!("no random source: {e}"))?;
    let meta = store::open(&EnvoyStore, salt, now, policy.replay.slots)
        .map_err(|e| format!("state store: {e}"))?;
    replay::check_layout(&meta, &policy.replay).map_err(|e| e.to_string())?;
    replay::init_slots(&EnvoyStore, &policy.replay, &meta)
        .map_err(|e| format!("replay store: {e}"))?;
    Ok(meta)
}

struct ApisecHttp {
    policy: Rc<Policy>,
    meta: Rc<StoreMeta>,
    metrics: Rc<Metrics>,
    verifier: Rc<EnvoyVerifier>,
    req: Request,
    ctx: RequestContext,
    request_id: String,
    client_ip: String,
    /// Gateway time (unix seconds) of the current decision step: one clock read per step.
    now: u64,
    decided: bool,
    /// The filter let the request through (the response path then applies grant rules).
    allowed: bool,
    /// Buffering the response to remove hidden fields (PERM-1).
    filtering_response: bool,
    /// Bytes this request counts against the worker's held-body bound while its body is held.
    held: u64,
}

impl Context for ApisecHttp {}

impl ApisecHttp {
    fn audit(&self, outcome: Result<(), &Deny>) {
        let input = AuditInput {
            ts: self.now,
            request_id: &self.request_id,
            method: &self.req.method,
            path: self.req.path(),
            client_ip: &self.client_ip,
        };
        let line = audit::record(&input, &self.ctx, outcome);
        let _ = hostcalls::set_property(vec![AUDIT_PROPERTY], Some(line.as_bytes()));
    }

    fn refuse(&mut self, deny: Deny) -> Action {
        self.decided = true;
        self.release_body();
        self.record_refusal(&deny);
        let body = audit::refusal_body(&deny, &self.request_id);
        let retry = deny.reason.retry_after_seconds().map(|s| s.to_string());
        let mut headers = vec![
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ];
        if let Some(r) = retry.as_deref() {
            headers.push(("retry-after", r));
        }
        let _ = hostcalls::send_http_response(deny.reason.status(), headers, Some(body.as_bytes()));
        Action::Pause
    }

    /// Audit, metrics and the ban counter for a refusal (ours, or Envoy's 429 after we allowed).
    fn record_refusal(&mut self, deny: &Deny) {
        if self.now == 0 {
            // refused before the clock was read (unreadable headers)
            self.now = now_secs().unwrap_or(0);
        }
        self.ctx.ban = engine::count_refusal(
            &self.policy,
            &self.ctx,
            self.req.conn.client_ip,
            deny.reason,
            &EnvoyStore,
            self.now,
        );
        if let Some(ban) = &self.ctx.ban {
            log(
                LogLevel::Warn,
                &format!("apisec: {ban} (request {})", self.request_id),
            );
            self.metrics.banned();
        }
        self.audit(Err(deny));
        self.metrics.denied(deny.reason);
    }

    /// Verified identity for the upstream and for Envoy's rate-limit descriptors.
    fn allow(&mut self) -> Action {
        self.decided = true;
        self.release_body();
        let set = |k: &str, v: Option<&str>| {
            if let Some(v) = v {
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, k, Some(v));
            }
        };
        set("x-apisec-app", self.ctx.app.as_deref());
        set("x-apisec-api", self.ctx.api.as_deref());
        set("x-apisec-level", self.ctx.level.map(|l| l.as_str()));
        set("x-apisec-function", self.ctx.function.as_deref());
        set("x-apisec-user", self.ctx.user.as_deref());
        self.audit(Ok(()));
        self.allowed = true; // counted when the stream ends (on_log), unless refused after all
        Action::Continue
    }

    /// This request no longer holds a body: its bytes leave the worker's held-body count.
    fn release_body(&mut self) {
        let n = std::mem::take(&mut self.held);
        if n > 0 {
            HELD.with(|h| h.set(h.get().saturating_sub(n)));
        }
    }

    fn hidden_fields(&self) -> Option<&[Vec<String>]> {
        let grant = self
            .ctx
            .grant
            .as_deref()
            .and_then(|g| self.policy.grant(g))?;
        (!grant.hide_response_fields.is_empty()).then_some(grant.hide_response_fields.as_slice())
    }

    /// The response cannot be released: replace it with a refusal (headers are still held).
    fn withhold_response(&mut self, deny: Deny) -> Action {
        self.filtering_response = false;
        self.allowed = false;
        self.refuse(deny)
    }

    /// The body is complete (empty without one), decided under the policy in force now.
    fn finish(&mut self, body: &[u8]) -> Action {
        if let Some((policy, meta)) = CURRENT.with(|c| c.borrow().clone()) {
            self.policy = policy;
            self.meta = meta;
        }
        let (policy, meta, verifier) = (
            self.policy.clone(),
            self.meta.clone(),
            self.verifier.clone(),
        );
        let host = Host {
            store: &EnvoyStore,
            meta: &meta,
            verifier: verifier.as_ref(),
        };
        match engine::check_body(&policy, &self.req, &mut self.ctx, body, &host, self.now) {
            Ok(()) => self.allow(),
            Err(d) => self.refuse(d),
        }
    }

    fn read_request(&mut self) -> Result<(), Deny> {
        let pairs = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).map_err(|s| {
            Deny::new(
                DenyReason::HostUnavailable,
                format!("request headers: {s:?}"),
            )
        })?;
        for (name, value) in pairs {
            // Valid UTF-8 (nearly always) is taken as is, without a copy.
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
                    if engine::strips_header(&self.policy, n) {
                        // client-sent x-apisec-* and routing overrides never reach the upstream
                        let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, n);
                    }
                    if !engine::is_internal_header(n) {
                        self.req.headers.push((name, value));
                    }
                }
            }
        }
        if let Ok(Some(addr)) = hostcalls::get_property(vec!["source", "address"]) {
            self.client_ip = message::ip_of_address(&String::from_utf8_lossy(&addr)).to_string();
            self.req.conn.client_ip = self.client_ip.parse().ok();
        }
        if self.req.method.is_empty() || self.req.path_and_query.is_empty() {
            return Err(Deny::new(
                DenyReason::MalformedHeader,
                "missing :method or :path",
            ));
        }
        Ok(())
    }

    /// TLS and the verified client certificate, for APIs whose decision looks at them. Each
    /// property is a host call: ask only what the previous answer makes relevant.
    fn read_transport(&mut self) {
        self.req.conn.tls = matches!(hostcalls::get_property(vec!["connection", "tls_version"]), Ok(Some(v)) if !v.is_empty());
        // A peer certificate counts only when Envoy verified it (mTLS listener with a CA).
        let mtls = self.req.conn.tls
            && matches!(hostcalls::get_property(vec!["connection", "mtls"]), Ok(Some(v)) if v.first() == Some(&1));
        let valid = mtls
            && !matches!(hostcalls::get_property(vec!["connection", "peer_certificate_valid"]), Ok(Some(v)) if v.first() == Some(&0));
        if valid {
            let text = |path: Vec<&str>| match hostcalls::get_property(path) {
                Ok(Some(v)) if !v.is_empty() => Some(String::from_utf8_lossy(&v).into_owned()),
                _ => None,
            };
            self.req.conn.peer_cert_sha256 =
                text(vec!["connection", "sha256_peer_certificate_digest"])
                    .map(|s| s.to_ascii_lowercase());
            self.req.conn.peer_uri_san = text(vec!["connection", "uri_san_peer_certificate"]);
        }
    }
}

impl HttpContext for ApisecHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if let Err(d) = self.read_request() {
            return self.refuse(d);
        }
        let Some(now) = now_secs() else {
            return self.refuse(Deny::new(DenyReason::HostUnavailable, "no clock"));
        };
        self.now = now;
        let declared_len = self
            .req
            .header_values("content-length")
            .next()
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared_len.is_some_and(|n| n > self.policy.max_body_bytes) {
            return self.refuse(Deny::new(
                DenyReason::BodyTooLarge,
                "content-length over max_body_bytes",
            ));
        }
        let (policy, meta, verifier) = (
            self.policy.clone(),
            self.meta.clone(),
            self.verifier.clone(),
        );
        let api = match engine::begin(&policy, &self.req, &EnvoyStore, now) {
            Ok(api) => api,
            Err(d) => return self.refuse(d),
        };
        if engine::needs_transport(api) {
            self.read_transport();
        }
        let host = Host {
            store: &EnvoyStore,
            meta: &meta,
            verifier: verifier.as_ref(),
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
            return self.refuse(d);
        }
        if end_of_stream {
            return self.finish(&[]);
        }
        if self.ctx.level == Some(apisec_core::SecurityLevel::S0) {
            return self.allow(); // nothing in the body to verify at S0
        }
        // Hold the headers until the whole body is in and verified (allow_on_headers_stop_iteration),
        // within this worker's bound on held bodies.
        let held = HELD.with(Cell::get);
        match engine::admit_body(&policy, held, declared_len) {
            Ok(n) => {
                self.held = n;
                HELD.with(|h| h.set(held.saturating_add(n)));
            }
            Err(d) => return self.refuse(d),
        }
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.decided {
            return Action::Continue;
        }
        if body_size as u64 > self.policy.max_body_bytes {
            return self.refuse(Deny::new(
                DenyReason::BodyTooLarge,
                format!("body over {} bytes", self.policy.max_body_bytes),
            ));
        }
        if !end_of_stream {
            return Action::Pause;
        }
        match now_secs() {
            Some(now) => self.now = now,
            None => return self.refuse(Deny::new(DenyReason::HostUnavailable, "no clock")),
        }
        let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(b) => b.unwrap_or_default(),
            Err(s) => {
                return self.refuse(Deny::new(
                    DenyReason::HostUnavailable,
                    format!("request body: {s:?}"),
                ))
            }
        };
        self.finish(&body)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let hides = self.hidden_fields().is_some();
        // Only bans (429 counting) and field hiding need the response: skip the host call otherwise.
        if !self.allowed || (self.policy.bans.is_none() && !hides) {
            return Action::Continue;
        }
        let status = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status")
            .ok()
            .flatten();
        if status.as_deref() == Some("429") {
            // Envoy's rate limiter refused what we allowed: audit it and count it (RL-3).
            self.allowed = false;
            self.record_refusal(&Deny::new(
                DenyReason::RateLimited,
                "rate limit answered 429",
            ));
            return Action::Continue;
        }
        if hides {
            // A compressed response cannot be filtered: withhold it rather than pass it.
            let encoding =
                hostcalls::get_map_value(MapType::HttpResponseHeaders, "content-encoding")
                    .ok()
                    .flatten();
            if encoding.is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity")) {
                return self.withhold_response(Deny::new(
                    DenyReason::ResponseUnfilterable,
                    "the response is compressed; hidden fields cannot be removed",
                ));
            }
        }
        if hides && !end_of_stream {
            self.filtering_response = true;
            return Action::Pause; // hold the headers: content-length changes with the body
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.filtering_response {
            return Action::Continue;
        }
        if body_size as u64 > self.policy.max_body_bytes {
            return self.withhold_response(Deny::new(
                DenyReason::ResponseUnfilterable,
                "response over max_body_bytes",
            ));
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = match hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size) {
            Ok(b) => b.unwrap_or_default(),
            Err(s) => {
                return self.withhold_response(Deny::new(
                    DenyReason::HostUnavailable,
                    format!("response body: {s:?}"),
                ))
            }
        };
        let result = match self.hidden_fields() {
            Some(hidden) => fields::filter_response(hidden, &body),
            None => Ok(None),
        };
        match result {
            Ok(None) => {}
            Ok(Some(filtered)) => {
                if hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_size, &filtered)
                    .is_err()
                {
                    return self.withhold_response(Deny::new(
                        DenyReason::HostUnavailable,
                        "cannot rewrite the response",
                    ));
                }
                let len = filtered.len().to_string();
                let _ = hostcalls::set_map_value(
                    MapType::HttpResponseHeaders,
                    "content-length",
                    Some(&len),
                );
            }
            Err(d) => return self.withhold_response(d),
        }
        self.filtering_response = false;
        Action::Continue
    }

    /// Each request is counted once, by its final outcome: a request the filter let through
    /// but whose response was withheld, or that Envoy's rate limiter answered 429, counts as
    /// denied (counted when that happened), not also as allowed. A request whose client left
    /// before it was complete (or that Envoy ended, e.g. on its request timeout) leaves an
    /// audit record and counts as abandoned: nothing of it went upstream.
    fn on_log(&mut self) {
        self.release_body();
        if self.allowed {
            self.metrics.allowed();
        } else if !self.decided && !self.req.method.is_empty() {
            self.now = now_secs().unwrap_or(self.now);
            let deny = Deny::new(
                DenyReason::RequestAbandoned,
                "the request ended before its body was complete",
            );
            self.audit(Err(&deny));
            self.metrics.abandoned();
            self.metrics.denied(deny.reason);
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.decided {
            return Action::Continue;
        }
        // RFC 9530 digests cover content, not trailers; a signed request must not smuggle any.
        self.refuse(Deny::new(
            DenyReason::MalformedHeader,
            "request trailers are not accepted on signed APIs",
        ))
    }
}
