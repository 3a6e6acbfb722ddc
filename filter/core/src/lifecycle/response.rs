//! The response's way back: its status read once, fields hidden from a body, a login
//! service's report of who logged in, and a response that cannot be filtered withheld.

use super::*;

impl Stream {
    /// The response fields the selected grant hides, if any (in `policy`, the stream's own).
    pub(super) fn hidden_fields<'p>(&self, policy: &'p Policy) -> Option<Cow<'p, [Vec<String>]>> {
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

    /// The response headers. Only a limiter's 429 and field hiding look at the response;
    /// otherwise the host is asked nothing.
    pub(super) fn ev_response_headers(&mut self, end_of_stream: bool, env: &Env<'_>) -> Step {
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
    pub(super) fn login_report(&mut self, env: &Env<'_>) -> Option<Step> {
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
            let withheld = self.withhold(d, env);
            step.absorb(withheld);
            return Some(step);
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
        step.absorb(ask);
        Some(step)
    }

    /// A part of the response body arrived (`size`: all of it so far).
    pub(super) fn ev_response_body(
        &mut self,
        size: usize,
        end_of_stream: bool,
        env: &Env<'_>,
    ) -> Step {
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
    pub(super) fn ev_response_rewrite_failed(&mut self, env: &Env<'_>) -> Step {
        let d = Deny::new(DenyReason::HostUnavailable, "cannot rewrite the response");
        self.withhold(d, env)
    }
}
