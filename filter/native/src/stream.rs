//! One HTTP stream: maps each of Envoy's hooks to the lifecycle's event and carries out the
//! step it returns, as the Wasm glue's `stream.rs` does. Nothing here decides.

use std::cell::Cell;
use std::sync::Arc;

use apisec_core::cluster::{self, Decoded, StateBackend};
use apisec_core::lifecycle::{self, Env, Step, Stream};
use apisec_core::state::Batch;

use crate::abi;
use crate::config::FilterConfig;
use crate::envoy::{self, Filter};
use crate::host::{Facts, RingVerifier};
use crate::store::store;

/// Filter-state key Envoy's access log reads as `%FILTER_STATE(wasm.apisec_audit:PLAIN)%`: the
/// Wasm build's key, so that the access-log format and the guard are the same for both.
const AUDIT_KEY: &str = "wasm.apisec_audit";
/// Filter-state key the guard after apisec requires (see the Wasm glue).
const PASSED_KEY: &str = "wasm.apisec_passed";

thread_local! {
    /// Bytes of request bodies this worker holds for verification right now.
    static HELD: Cell<u64> = const { Cell::new(0) };
}

/// What a hook tells Envoy to do with the stream.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Go {
    Continue,
    /// Hold the stream (headers until the body is verified, a body until it is complete).
    Hold,
    /// A local reply was sent: nothing more goes on.
    Answered,
}

pub struct NativeStream {
    pub stream: Stream,
    pub config: Arc<FilterConfig>,
    /// The state batch in flight to the cluster store: its callout id, the batch, whether the
    /// script's text went with it, and whether the stream is held in a response hook.
    pending: Option<(u64, Batch, bool, bool)>,
}

impl NativeStream {
    pub fn new(config: Arc<FilterConfig>) -> NativeStream {
        NativeStream {
            stream: Stream::new(config.config.clone()),
            config,
            pending: None,
        }
    }

    /// Sends a state batch to the cluster store and holds the stream until it answers; a
    /// callout Envoy refuses to start is answered at once as the store being unavailable.
    fn dispatch(&mut self, f: Filter, batch: Batch, full: bool, response: bool) -> Go {
        let config = self.stream.config().clone();
        let StateBackend::Cluster(settings) = &config.policy.state else {
            let answer = cluster::failed("no cluster store in the policy");
            return self.event(f, response, |s, env| s.on_state(answer, env));
        };
        let call = cluster::encode(&config.policy.cluster_params(), settings, &batch, full);
        let headers = lifecycle::header_pairs(&call.headers);
        match f.callout(&call.cluster, &headers, &call.body, call.timeout_ms) {
            Ok(id) => {
                self.pending = Some((id, batch, full, response));
                Go::Hold
            }
            Err(code) => {
                let answer = cluster::failed(&format!("callout refused: Envoy code {code}"));
                self.event(f, response, |s, env| s.on_state(answer, env))
            }
        }
    }

    /// The cluster store answered (or Envoy gave up on it): the machine goes on with what it
    /// means, and the stream is resumed unless the step refused or holds it.
    pub fn callout_done(&mut self, f: Filter, id: u64, status: Option<&str>, body: &[u8]) {
        let Some((sent, batch, full, response)) = self.pending.take() else {
            return;
        };
        if sent != id {
            self.pending = Some((sent, batch, full, response));
            return;
        }
        let go = match cluster::decode(&batch, full, status, body) {
            Decoded::LoadScript => self.dispatch(f, batch, true, response),
            Decoded::Answer(answer) => self.event(f, response, |s, env| s.on_state(answer, env)),
        };
        if go == Go::Continue {
            f.continue_stream(response);
        }
    }

    /// Runs one lifecycle event with the host's adapters lent to it, then carries out its step.
    fn event(
        &mut self,
        f: Filter,
        response: bool,
        ev: impl FnOnce(&mut Stream, &Env<'_>) -> Step,
    ) -> Go {
        let config = self.config.clone();
        let facts = Facts::new(f, &config.plugin, response);
        let chain = config.plugin.chain(f.worker_index());
        let step = HELD.with(|held| {
            let env = Env {
                store: store(),
                verifier: &RingVerifier,
                host: &facts,
                held,
                chain: chain.map(|c| c as &dyn apisec_core::audit_chain::Seal),
            };
            ev(&mut self.stream, &env)
        });
        self.carry_out(f, step, response)
    }

    fn carry_out(&mut self, f: Filter, mut step: Step, response: bool) -> Go {
        for name in &step.remove_headers {
            f.remove_header(abi::REQUEST_HEADERS, name);
        }
        for name in &step.remove_response_headers {
            f.remove_header(abi::RESPONSE_HEADERS, name);
        }
        for (name, value) in &step.response_headers {
            f.set_header(abi::RESPONSE_HEADERS, name, value.as_bytes());
        }
        if step.set_identity {
            // Added, not set: every x-apisec-* header the client sent was removed when its
            // request headers came (core's `strips_header`: internal headers always), before
            // any step sets identity, so there is none of the same name to replace.
            for (name, value) in self.stream.identity_headers() {
                f.add_header(abi::REQUEST_HEADERS, name, value.as_bytes());
            }
        }
        if step.passed {
            f.set_filter_state(PASSED_KEY, b"1");
        }
        if let Some(line) = &step.log {
            envoy::log(abi::LOG_WARN, line);
        }
        if let Some(audit) = &step.audit {
            f.set_filter_state(AUDIT_KEY, audit.as_bytes());
        }
        self.config.metrics.add(f, &step.counts);
        if let Some(sample) = &step.sample {
            self.config.metrics.sample(f, sample);
        }
        if let Some(body) = &step.response_body {
            if !f.replace_response_body(body) {
                return self.event(f, response, |s, env| s.on_response_rewrite_failed(env));
            }
            f.set_header(
                abi::RESPONSE_HEADERS,
                "content-length",
                body.len().to_string().as_bytes(),
            );
        }
        if let Some(batch) = step.tally.take() {
            self.config.plugin.pend_tally(batch);
        }
        // The local backend ran every state batch inside the lifecycle; a cluster one goes out.
        if let Some(batch) = step.state.take() {
            return self.dispatch(f, batch, false, response);
        }
        if let Some(reply) = step.action.reply() {
            let headers = lifecycle::header_pairs(&reply.headers);
            let details = match step.action {
                lifecycle::Action::Answer { .. } => "apisec_answer",
                _ => "apisec_refused",
            };
            f.send_response(reply.status, &headers, reply.body.as_bytes(), details);
            return Go::Answered;
        }
        match step.action {
            lifecycle::Action::Pause => Go::Hold,
            _ => Go::Continue,
        }
    }

    pub fn request_headers(&mut self, f: Filter, end_of_stream: bool) -> Go {
        let pairs = f.headers(abi::REQUEST_HEADERS).ok_or(lifecycle::HostError {
            call: "get_headers(request headers)",
            status: 1,
        });
        let source = f
            .attribute_string(abi::ATTR_SOURCE_ADDRESS)
            .map(|a| String::from_utf8_lossy(&a).into_owned());
        self.event(f, false, |s, env| {
            s.on_request_headers(pairs, source.as_deref(), end_of_stream, env)
        })
    }

    pub fn request_body(&mut self, f: Filter, end_of_stream: bool) -> Go {
        let size = f.body_len(true);
        self.event(f, false, |s, env| {
            s.on_request_body(size, end_of_stream, env)
        })
    }

    pub fn request_trailers(&mut self, f: Filter) -> Go {
        self.event(f, false, |s, env| s.on_request_trailers(env))
    }

    pub fn response_headers(&mut self, f: Filter, end_of_stream: bool) -> Go {
        self.event(f, true, |s, env| s.on_response_headers(end_of_stream, env))
    }

    pub fn response_body(&mut self, f: Filter, end_of_stream: bool) -> Go {
        let size = f.body_len(false);
        self.event(f, true, |s, env| {
            s.on_response_body(size, end_of_stream, env)
        })
    }

    pub fn complete(&mut self, f: Filter) {
        let _ = self.event(f, true, |s, env| s.on_log(env));
    }
}
