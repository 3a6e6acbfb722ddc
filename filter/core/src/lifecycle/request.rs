//! The request's way in: its headers (identity, signature, the operator path), its body
//! held and decided, the state batch that admits it, and trailers.

use super::*;

impl Stream {
    /// Reads the Envoy route's name when the policy in force narrows per route or has an
    /// operator route.
    pub(super) fn read_route(&mut self, env: &Env<'_>) {
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
    pub(super) fn operator(&mut self, end_of_stream: bool, env: &Env<'_>) -> Option<Step> {
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
    pub(super) fn operator_ops(&mut self, body: &[u8]) -> Result<Vec<Op>, Deny> {
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

    pub(super) fn allow(&mut self, mut step: Step, env: &Env<'_>) -> Step {
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
    pub(super) fn ev_request_headers(
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

    pub(super) fn headers(&mut self, end_of_stream: bool, env: &Env<'_>) -> Step {
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
    pub(super) fn after_checks(
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
        let spends = self.served.is_none() && engine::spends_with_headers(&policy, &self.ctx);
        let mut ops = if spends {
            // One trip to the store for a request with a body (issue 24): its bans, its nonce
            // recorded and its counts go now, before the body is held, so a replay is still
            // refused before its body (ATK-1). The body's own checks come when it is complete;
            // one that fails them has spent its nonce (the client signs again) and counted.
            let now_ms = env.host.now_ms().unwrap_or(now.saturating_mul(1000));
            self.spent = Some((policy.generation, None));
            engine::final_ops(
                &policy,
                self.req.conn.client_ip,
                self.ip_ban(),
                &self.ctx,
                now,
                now_ms,
            )
        } else {
            engine::early_ops(&policy, self.ip_ban(), &self.ctx, now)
        };
        self.ip_checked = false; // a ban may start while the body comes: asked again then
        if self.ctx.level == Some(SecurityLevel::S0)
            && self.served.is_none()
            && !engine::has_form_body(&self.req)
        {
            // nothing in the body to verify at S0 (a form body may carry _method: held): this
            // batch is the last, so the call counts toward its rate limits here
            let now_ms = env.host.now_ms().unwrap_or(now.saturating_mul(1000));
            ops.extend(engine::rate_op(
                &policy,
                self.req.conn.client_ip,
                &self.ctx,
                now_ms,
            ));
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
            if let Some((_, answer)) = &mut self.spent {
                *answer = Some(Answer::default());
            }
            return Step::pause();
        }
        self.ask(ops, Waiting::Early { s0: false })
    }

    /// A part of the request body arrived (`size`: all of it so far).
    pub(super) fn ev_request_body(
        &mut self,
        size: usize,
        end_of_stream: bool,
        env: &Env<'_>,
    ) -> Step {
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
    pub(super) fn finish(&mut self, body: &[u8], env: &Env<'_>) -> Step {
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
        // A request that spent its nonce and counted with its headers (`after_checks`) has no
        // batch left to ask, unless the policy was reloaded while its body came.
        let reloaded = match self.spent.take() {
            Some((generation, answer)) if generation == self.ctx.generation => {
                self.fingerprint_session();
                return self.accepted(answer.unwrap_or_default(), env);
            }
            Some(_) => true,
            None => false,
        };
        let now_ms = env.host.now_ms().unwrap_or(self.now.saturating_mul(1000));
        let mut ops = engine::final_ops(
            &policy,
            self.req.conn.client_ip,
            self.ip_ban(),
            &self.ctx,
            self.now,
            now_ms,
        );
        if reloaded {
            // The request was checked again under the new policy: its bans, counts and any
            // grant use are asked again under it; its nonce is already spent, by this request.
            ops.retain(|op| !matches!(op, Op::Nonce { .. }));
        }
        if let Some(Served::Create(_)) = self.served {
            match self.create_op(body, env) {
                Ok(op) => ops.push(op),
                Err(d) => return self.refuse(d, env),
            }
        }
        self.fingerprint_session();
        if ops.is_empty() {
            return self.accepted(Answer::default(), env);
        }
        self.ask(ops, Waiting::Final)
    }

    /// The session the request presented, by fingerprint, for its record.
    fn fingerprint_session(&mut self) {
        if let Some(id) = &self.ctx.session {
            self.ctx.session_fp = Some(sessions::fingerprint(id));
        }
    }

    /// Establishing a session (SES-1): the body names the caller and its device; the ID comes
    /// from the host's random source.
    pub(super) fn create_op(&mut self, body: &[u8], env: &Env<'_>) -> Result<Op, Deny> {
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
                seq: 0,
            },
        })
    }

    /// The request passed and its state answered: forwarded, or answered by the gateway.
    pub(super) fn accepted(&mut self, answer: Answer, env: &Env<'_>) -> Step {
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
                // the user logged in on the session it ended, if any: whom the logout concerns
                if let Some(user) = answer.session.as_deref().and_then(|s| s.user.clone()) {
                    self.ctx.user = Some(user);
                }
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
    pub(super) fn ev_request_trailers(&mut self, env: &Env<'_>) -> Step {
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
}
