//! Test fixture, never deployed: a filter whose VM traps on the first request, standing in for
//! any fault that kills the apisec VM. The e2e test loads it with the gateway's own rendered
//! configuration and checks that requests are refused, never passed (FAIL_CLOSED).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

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
        Some(Box::new(Trap))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Trap;
impl Context for Trap {}
impl HttpContext for Trap {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        std::process::abort()
    }
}
