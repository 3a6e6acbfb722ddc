//! Benchmark fixture, never deployed: the floor of any Rust proxy-wasm filter in this Envoy.
//!
//! Two fixtures in one module, chosen by the plugin configuration:
//! - anything but `evidence` (the `floor` variant): reads one request header (`x-app-id`) and
//!   continues, so the bench can show how much of apisec's cost is the proxy-wasm boundary
//!   itself (context creation, the callbacks Envoy makes on every stream, one host call) and how
//!   much is apisec's own work;
//! - `evidence` (the `floor_evidence` variant): makes the host calls apisec makes on an allowed
//!   S0 request (Envoy's `wasm:trace` log of one, BENCHMARKS.md) and decides nothing: the
//!   request headers, the client address, the answer's `:status` and upstream host (all four
//!   copied into the VM; LOG-1 and LOG-4 put them in the audit record), two clock reads, a
//!   shared-data read (a key that holds nothing, as the live-ban mark's cheapest case), the
//!   identity header added, the guard's mark and a record of an S0 record's size set in the
//!   filter state, and one latency sample. What a filter that gives S0's evidence through this
//!   ABI pays before it checks anything.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType, MetricType};

#[allow(unsafe_code)] // the SDK's entry point is a #[no_mangle] export
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> { Box::new(super::Root::default()) });
    }}
}

/// The size of an allowed S0 request's audit record in the bench (444 bytes: 2026-12-07).
const RECORD: &[u8; 444] = &[b'x'; 444];

#[derive(Default)]
struct Root {
    /// The latency histogram's id when this is the evidence fixture.
    evidence: Option<u32>,
}

impl Context for Root {}
impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        if config == b"evidence" {
            let id = hostcalls::define_metric(MetricType::Histogram, "floor_evidence_ms").ok();
            self.evidence = id;
            return id.is_some();
        }
        true
    }
    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        match self.evidence {
            Some(histogram) => Some(Box::new(Evidence { histogram })),
            None => Some(Box::new(Floor)),
        }
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Floor;
impl Context for Floor {}
impl HttpContext for Floor {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let _ = hostcalls::get_map_value(MapType::HttpRequestHeaders, "x-app-id");
        Action::Continue
    }
}

struct Evidence {
    histogram: u32,
}
impl Context for Evidence {}
impl HttpContext for Evidence {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let _ = hostcalls::get_current_time();
        let _ = hostcalls::get_map_bytes(MapType::HttpRequestHeaders);
        let _ = hostcalls::get_property(vec!["source", "address"]);
        let _ = hostcalls::get_shared_data("floor-evidence-mark");
        let _ = hostcalls::add_map_value(MapType::HttpRequestHeaders, "x-apisec-app", "bench-app");
        let _ = hostcalls::set_property(vec!["apisec_passed"], Some(b"1"));
        Action::Continue
    }
    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        let _ = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status");
        Action::Continue
    }
    fn on_log(&mut self) {
        let _ = hostcalls::get_current_time();
        let _ = hostcalls::get_property(vec!["upstream", "address"]);
        let _ = hostcalls::set_property(vec!["apisec_audit"], Some(RECORD));
        let _ = hostcalls::record_metric(self.histogram, 1);
    }
}
