//! Refusing a request (or reporting what would have been refused), and what a state batch's
//! answer means for the request waiting on it.

use super::*;

impl Stream {
    pub(super) fn release(&mut self, env: &Env<'_>) {
        let n = std::mem::take(&mut self.held);
        if n > 0 {
            env.held.set(env.held.get().saturating_sub(n));
        }
    }

    /// A refusal (ours, or a limiter's 429 after us): first what it asks of the state (bans,
    /// the refusal counter), then the audit record and the counts.
    pub(super) fn refusal(&mut self, deny: Deny, respond: bool, env: &Env<'_>) -> Step {
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

    pub(super) fn refuse(&mut self, deny: Deny, env: &Env<'_>) -> Step {
        if report::reported_request(&self.config.policy, &self.req, deny.reason) {
            return self.report(deny, env);
        }
        self.refusal(deny, true, env)
    }

    /// Report mode: the refusal is audited and counted as "would refuse" and the request goes
    /// on, without the verified identity headers (nothing was verified) and without touching
    /// the state (no ban counting, no nonce recorded, no grant use).
    pub(super) fn report(&mut self, deny: Deny, env: &Env<'_>) -> Step {
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

    /// The refusal once its state operations answered: a banned caller is told it is banned.
    pub(super) fn refused(&mut self, deny: Deny, respond: bool, mut answer: Answer) -> Step {
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
                retry_after: deny.retry_after(),
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
    pub(super) fn ev_state(&mut self, mut answer: Answer, env: &Env<'_>) -> Step {
        // counted anomaly rules that matched: in the record and the metric, whatever follows
        self.ctx.anomalies.append(&mut answer.anomalies);
        self.ctx.rate_limits.append(&mut answer.rate_limits);
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
                if let Some((_, spent)) = &mut self.spent {
                    *spent = Some(answer);
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

    /// The response cannot be released as it is: replace it with a refusal (its headers are
    /// still held).
    pub(super) fn withhold(&mut self, deny: Deny, env: &Env<'_>) -> Step {
        self.refuse(deny, env)
    }
}
