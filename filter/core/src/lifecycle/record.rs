//! The end of the stream: the audit record and the metrics sample, the response bytes
//! counted for bulk-pull rules, and a request that ended before it was decided.

use super::*;

impl Stream {
    /// The audit record as decided so far, without what only the ended stream tells (for
    /// tests and tools; the host gets the record from [`Stream::on_log`]).
    pub fn record_so_far(&self) -> Option<String> {
        let d = self.decided.as_ref()?;
        Some(self.record_with(d.outcome(), &LogFacts::default()))
    }

    pub(super) fn record_with(&self, outcome: Outcome<'_>, facts: &LogFacts) -> String {
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
    pub(super) fn sample(&self, outcome: Outcome<'_>, facts: &LogFacts) -> Sample {
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
            rate_limits: self
                .ctx
                .rate_limits
                .iter()
                .map(|h| (metrics::label(&h.rule).into_owned(), h.action))
                .collect(),
            sdk: self
                .ctx
                .sdk
                .as_ref()
                .map(|f| (f.status.as_str(), f.action.as_str())),
            session_evicted: self.evicted,
            // forwarded: an upstream answered, or Envoy answered for one it could not reach
            backend_status: match outcome {
                Outcome::Refused(_) => None,
                _ if facts.upstream.is_some() || facts.details.is_some() => {
                    facts.status.and_then(metrics::status_class)
                }
                _ => None,
            },
            sdk_version: self.ctx.app.as_ref().map(|_| {
                metrics::sdk_version_label(
                    self.req
                        .unique_header(crate::sdk::SDK_HEADER)
                        .ok()
                        .flatten(),
                )
            }),
        }
    }

    /// A let-through call's response bytes, for the bulk-pull rules that count them: run now
    /// on the local store (a count the store could not take goes to the host's log); handed
    /// to the host for the cluster store.
    pub(super) fn tally(&self, bytes: u64, env: &Env<'_>, step: &mut Step) {
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

    pub(super) fn ended(&mut self, env: &Env<'_>) -> Step {
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
