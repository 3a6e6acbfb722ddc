//! The HTTP context: maps each Envoy callback to the lifecycle's event and carries out the step
//! it returns. Nothing here decides.

use std::rc::Rc;

use apisec_core::cluster::{self, Decoded, StateBackend};
use apisec_core::lifecycle::{self, Env, Step, Stream};
use apisec_core::state::Batch;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType};

use crate::host::{
    call_body, call_status, host_error, log, send_call, EnvoyFacts, EnvoyStore, EnvoyVerifier,
};
use crate::metrics::Metrics;
use crate::worker::{Plugin, HELD};

/// Filter-state key Envoy's access log reads as `%FILTER_STATE(wasm.apisec_audit:PLAIN)%`.
const AUDIT_PROPERTY: &str = "apisec_audit";
/// Filter-state key the guard after apisec requires (`wasm.apisec_passed`): only apisec code
/// sets it, so a request that passed a worker without a VM is refused there.
const PASSED_PROPERTY: &str = "apisec_passed";

pub struct ApisecHttp {
    pub stream: Stream,
    /// The plugin (filter configuration) this stream belongs to: its policy, chain and queue.
    pub plugin: Rc<Plugin>,
    pub metrics: Rc<Metrics>,
    pub verifier: Rc<EnvoyVerifier>,
    /// The state batch in flight to the cluster store: its callout token, the batch, and
    /// whether the script's text went with it.
    pub pending: Option<(u32, Batch, bool)>,
    /// The stream is held in a response callback (else in a request one).
    pub on_response: bool,
}

impl Context for ApisecHttp {
    /// The cluster store answered (or Envoy gave up on it): the machine goes on with what it
    /// means, and the stream is resumed unless the step refused or holds it.
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        let Some((sent, batch, full)) = self.pending.take() else {
            return;
        };
        if sent != token {
            self.pending = Some((sent, batch, full));
            return;
        }
        let body = call_body(body_size);
        let decoded = cluster::decode(&batch, full, call_status, &body);
        let action = match decoded {
            Decoded::LoadScript => self.dispatch(batch, true),
            Decoded::Answer(answer) => self.event(|s, env| s.on_state(answer, env)),
        };
        if action == Action::Continue {
            let _ = if self.on_response {
                hostcalls::resume_http_response()
            } else {
                hostcalls::resume_http_request()
            };
        }
    }
}

impl ApisecHttp {
    /// Runs one lifecycle event with the host's adapters lent to it, then carries out its step.
    fn event(&mut self, f: impl FnOnce(&mut Stream, &Env<'_>) -> Step) -> Action {
        let verifier = self.verifier.clone();
        let plugin = self.plugin.clone();
        let facts = EnvoyFacts::new(plugin.clone());
        let step = HELD.with(|held| {
            let env = Env {
                store: &EnvoyStore,
                verifier: verifier.as_ref(),
                host: &facts,
                held,
                chain: Some(&plugin.chain),
            };
            f(&mut self.stream, &env)
        });
        self.carry_out(step)
    }

    /// Sends a state batch to the cluster store and holds the stream until it answers; a
    /// callout Envoy refuses to make is answered at once as the store being unavailable.
    fn dispatch(&mut self, batch: Batch, full: bool) -> Action {
        let config = self.stream.config().clone();
        let StateBackend::Cluster(settings) = &config.policy.state else {
            let answer = apisec_core::cluster::failed("no cluster store in the policy");
            return self.event(|s, env| s.on_state(answer, env));
        };
        let call = cluster::encode(&config.policy.cluster_params(), settings, &batch, full);
        match send_call(&call) {
            Ok(token) => {
                self.pending = Some((token, batch, full));
                Action::Pause
            }
            Err(e) => {
                let answer = apisec_core::cluster::failed(&format!("callout refused: {e:?}"));
                self.event(|s, env| s.on_state(answer, env))
            }
        }
    }

    fn carry_out(&mut self, mut step: Step) -> Action {
        for name in &step.remove_headers {
            let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
        }
        for name in &step.remove_response_headers {
            let _ = hostcalls::remove_map_value(MapType::HttpResponseHeaders, name);
        }
        for (name, value) in &step.response_headers {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
        }
        if step.set_identity {
            // Added, not set (a set searches the map first): every x-apisec-* header the
            // client sent was removed when its request headers came (core's
            // `strips_header`), before any step sets identity, so none of that name is there.
            for (name, value) in self.stream.identity_headers() {
                let _ = hostcalls::add_map_value(MapType::HttpRequestHeaders, name, value);
            }
        }
        if step.passed {
            let _ = hostcalls::set_property(vec![PASSED_PROPERTY], Some(b"1"));
        }
        if let Some(line) = &step.log {
            log(LogLevel::Warn, line);
        }
        if let Some(audit) = &step.audit {
            let _ = hostcalls::set_property(vec![AUDIT_PROPERTY], Some(audit.as_bytes()));
        }
        self.metrics.add(&step.counts);
        if let Some(sample) = &step.sample {
            self.metrics.sample(sample);
        }
        if let Some(body) = &step.response_body {
            // From 0 with any length: Envoy drains the whole body and puts this in its place.
            let replaced = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, usize::MAX, body);
            if replaced.is_err() {
                return self.event(|s, env| s.on_response_rewrite_failed(env));
            }
            let len = body.len().to_string();
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                "content-length",
                Some(&len),
            );
        }
        if let Some(batch) = step.tally.take() {
            let lost = apisec_core::anomaly::pend(
                &mut self.plugin.tally.borrow_mut(),
                batch.ops,
                batch.now,
            );
            if lost > 0 {
                log(LogLevel::Warn, &format!("apisec: {lost} response byte counts dropped: the queue for the cluster store is full"));
            }
        }
        if let Some(batch) = step.state.take() {
            return self.dispatch(batch, false);
        }
        if let Some(reply) = step.action.reply() {
            let headers = lifecycle::header_pairs(&reply.headers);
            let _ =
                hostcalls::send_http_response(reply.status, headers, Some(reply.body.as_bytes()));
            return Action::Pause;
        }
        match step.action {
            lifecycle::Action::Pause => Action::Pause,
            _ => Action::Continue,
        }
    }
}

impl HttpContext for ApisecHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let pairs = hostcalls::get_map_bytes(MapType::HttpRequestHeaders)
            .map_err(|s| host_error("get_map_bytes(request headers)", s));
        let source = hostcalls::get_property(vec!["source", "address"])
            .ok()
            .flatten()
            .map(|a| String::from_utf8_lossy(&a).into_owned());
        self.event(|s, env| s.on_request_headers(pairs, source.as_deref(), end_of_stream, env))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.event(|s, env| s.on_request_body(body_size, end_of_stream, env))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.event(|s, env| s.on_request_trailers(env))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.on_response = true;
        self.event(|s, env| s.on_response_headers(end_of_stream, env))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.event(|s, env| s.on_response_body(body_size, end_of_stream, env))
    }

    fn on_log(&mut self) {
        let _ = self.event(|s, env| s.on_log(env));
    }
}
