//! Benchmark fixture, never deployed: the floor of any Rust proxy-wasm filter in this Envoy.
//! It reads one request header (`x-app-id`) and continues, so the bench can show how much of
//! apisec's cost is the proxy-wasm boundary itself (context creation, the callbacks Envoy makes
//! on every stream, one host call) and how much is apisec's own work.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MapType};

#[allow(unsafe_code)] // the SDK's entry point is a #[no_mangle] export
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> { Box::new(super::Root) });
    }}
}

struct Root;
impl Context for Root {}
impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        true
    }
    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Floor))
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
