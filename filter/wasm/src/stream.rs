//! The HTTP context: maps each Envoy callback to the lifecycle's event and carries out the step
//! it returns. Nothing here decides.

use std::rc::Rc;

use apisec_core::lifecycle::{self, Env, Step, Stream};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType};

use crate::host::{log, EnvoyFacts, EnvoyStore, EnvoyVerifier};
use crate::metrics::Metrics;
use crate::root::HELD;

/// Filter-state key Envoy's access log reads as `%FILTER_STATE(wasm.apisec_audit:PLAIN)%`.
const AUDIT_PROPERTY: &str = "apisec_audit";

pub struct ApisecHttp {
    pub stream: Stream,
    pub metrics: Rc<Metrics>,
    pub verifier: Rc<EnvoyVerifier>,
}

impl Context for ApisecHttp {}

impl ApisecHttp {
    /// Runs one lifecycle event with the host's adapters lent to it, then carries out its step.
    fn event(&mut self, f: impl FnOnce(&mut Stream, &Env<'_>) -> Step) -> Action {
        let verifier = self.verifier.clone();
        let step = HELD.with(|held| {
            let env = Env {
                store: &EnvoyStore,
                verifier: verifier.as_ref(),
                host: &EnvoyFacts,
                held,
            };
            f(&mut self.stream, &env)
        });
        self.carry_out(step)
    }

    fn carry_out(&mut self, step: Step) -> Action {
        for name in &step.remove_headers {
            let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
        }
        for (name, value) in &step.set_headers {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
        }
        if let Some(line) = &step.log {
            log(LogLevel::Warn, line);
        }
        if let Some(audit) = &step.audit {
            let _ = hostcalls::set_property(vec![AUDIT_PROPERTY], Some(audit.as_bytes()));
        }
        self.metrics.add(&step.counts);
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
        match step.action {
            lifecycle::Action::Continue => Action::Continue,
            lifecycle::Action::Pause => Action::Pause,
            lifecycle::Action::Refuse {
                status,
                body,
                retry_after,
            } => {
                let retry = retry_after.map(|s| s.to_string());
                let mut headers = vec![
                    ("content-type", "application/json"),
                    ("cache-control", "no-store"),
                ];
                if let Some(r) = retry.as_deref() {
                    headers.push(("retry-after", r));
                }
                let _ = hostcalls::send_http_response(status, headers, Some(body.as_bytes()));
                Action::Pause
            }
        }
    }
}

impl HttpContext for ApisecHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let pairs =
            hostcalls::get_map_bytes(MapType::HttpRequestHeaders).map_err(|s| format!("{s:?}"));
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
        self.event(|s, env| s.on_response_headers(end_of_stream, env))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.event(|s, env| s.on_response_body(body_size, end_of_stream, env))
    }

    fn on_log(&mut self) {
        let _ = self.event(|s, env| s.on_log(env));
    }
}
