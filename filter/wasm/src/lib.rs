//! apisec-filter: the proxy-wasm glue between Envoy and apisec-core. It maps Envoy's callbacks
//! to the request lifecycle in core (`apisec_core::lifecycle`) and carries out the steps it
//! returns; the host adapters answer what the lifecycle asks. No rule lives here.
//!
//! - `host`: Envoy's clock, log, environment, shared data, crypto and request facts.
//! - `metrics`: the counters.
//! - `root`: policy loading, the state store, one lifecycle per stream.
//! - `stream`: callbacks to lifecycle events, steps to host calls.
//! - `worker`: what one worker's VM keeps across streams (held bodies, policy generations) and
//!   what each plugin in it keeps (policy in force, audit chain, byte counts for the cluster
//!   store).

mod host;
mod metrics;
mod root;
mod stream;
mod worker;

#[allow(unsafe_code)] // the SDK's entry point is a #[no_mangle] export
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
        proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
            Box::new(super::root::ApisecRoot::default())
        });
    }}
}
