//! apisec-native: apisec as an Envoy dynamic module, a native shared library
//! (`libapisec_native.so`) loaded by Envoy's `dynamic_modules` HTTP filter. A second thin glue
//! around the same `apisec-core` as the Wasm filter: it maps Envoy's hooks to the request
//! lifecycle in core and carries out the steps it returns; it decides nothing. The same
//! policy, audit record and chain, metric names and refusal codes as the Wasm build.
//!
//! - `abi`: the ABI (`v0.2.0`, Envoy 1.40) as this module uses it.
//! - `envoy`: safe wrappers over its callbacks.
//! - `config`: one filter configuration (a policy), its stats and its ticker.
//! - `plugin`: what one filter (by name) keeps across its configurations: chains, policy.
//! - `clock`: the host's clock.
//! - `stream`: one HTTP stream, hooks to lifecycle events, steps to callbacks.
//! - `host`: clock, environment, ECDSA (`ring`) and the request facts.
//! - `metrics`: the stats, under the Wasm build's names.
//! - `store`: the local state store, in the process, sharded.
//!
//! No panic reaches Envoy: the crate is built with `panic = "abort"` like the rest, so the
//! lints forbid every panicking construct (unwrap, expect, indexing) on these paths, and
//! `fuzz/fuzz_targets/native_glue.rs` drives the glue's inputs.

/// The module's heap: mimalloc, a thread-caching allocator. Rust's default heap calls the
/// process's `malloc`, Envoy's allocator through its exported symbol: measured at ~110
/// instructions a call, ~70 calls a request at S0 (callgrind); mimalloc's thread-local fast
/// path is a fraction of that. Not in the fuzz build (the sanitizer brings its own heap).
#[cfg(not(fuzzing))]
#[global_allocator]
static HEAP: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod abi;
mod clock;
pub mod config;
mod envoy;
pub mod host;
mod metrics;
mod plugin;
pub mod store;
mod stream;

#[allow(unsafe_code)] // the ABI's hooks: exported C functions taking Envoy's pointers
mod hooks {
    use std::ffi::{c_char, c_void};
    use std::sync::Arc;

    use crate::abi::{self, EnvoyBuffer, EnvoyPtr, Header};
    use crate::config::FilterConfig;
    use crate::envoy::{self, ConfigHandle, Filter};
    use crate::stream::{Go, NativeStream};

    /// The stream behind a module pointer this module made in `on_http_filter_new`.
    fn stream<'a>(ptr: *mut c_void) -> Option<&'a mut NativeStream> {
        // SAFETY: the pointer is a Box<NativeStream> leaked in `on_http_filter_new`, freed
        // only in `on_http_filter_destroy`; Envoy calls a stream's hooks on one thread.
        unsafe { (ptr as *mut NativeStream).as_mut() }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
        abi::ABI_VERSION.as_ptr() as *const c_char
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
        config_envoy: EnvoyPtr,
        name_ptr: *const u8,
        name_len: usize,
        config_ptr: *const u8,
        config_len: usize,
    ) -> *const c_void {
        let name = String::from_utf8_lossy(abi::view(name_ptr, name_len)).into_owned();
        let handle = ConfigHandle(config_envoy);
        match FilterConfig::load(handle, &name, abi::view(config_ptr, config_len)) {
            Ok(config) => {
                let config = Arc::new(config);
                config.start_ticker();
                Arc::into_raw(config) as *const c_void
            }
            Err(e) => {
                envoy::log(abi::LOG_ERROR, &format!("apisec: policy refused: {e}"));
                std::ptr::null()
            }
        }
    }

    /// The configuration behind a module pointer, with one more owner.
    fn config(ptr: *const c_void) -> Option<Arc<FilterConfig>> {
        if ptr.is_null() {
            return None;
        }
        let ptr = ptr as *const FilterConfig;
        // SAFETY: the pointer came from Arc::into_raw in config_new and is released only in
        // config_destroy, after every stream of the configuration.
        unsafe {
            Arc::increment_strong_count(ptr);
            Some(Arc::from_raw(ptr))
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(ptr: *const c_void) {
        if ptr.is_null() {
            return;
        }
        // SAFETY: the reference config_new handed Envoy, given back once.
        let config = unsafe { Arc::from_raw(ptr as *const FilterConfig) };
        if let Some(now) = crate::clock::now_secs() {
            config.checkpoint(now, true);
        }
        config.metrics.flush(config.envoy);
        config.stop_ticker();
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
        _config_envoy: EnvoyPtr,
        ptr: *const c_void,
        _event: u64,
    ) {
        if let Some(config) = config(ptr) {
            config.tick();
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
        _name_ptr: *const u8,
        _name_len: usize,
        _config_ptr: *const u8,
        _config_len: usize,
    ) -> *const c_void {
        envoy::log(
            abi::LOG_ERROR,
            "apisec: per-route configuration is not supported: the policy names its APIs",
        );
        std::ptr::null()
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(
        _ptr: *const c_void,
    ) {
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
        config_ptr: *const c_void,
        _filter_envoy: EnvoyPtr,
    ) -> *mut c_void {
        match config(config_ptr) {
            Some(config) => Box::into_raw(Box::new(NativeStream::new(config))) as *mut c_void,
            // Null closes the stream: nothing passes unchecked.
            None => std::ptr::null_mut(),
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(ptr: *mut c_void) {
        if !ptr.is_null() {
            // SAFETY: the Box leaked in on_http_filter_new, freed once here.
            drop(unsafe { Box::from_raw(ptr as *mut NativeStream) });
        }
    }

    fn headers_status(go: Go) -> u32 {
        match go {
            Go::Continue => abi::HEADERS_CONTINUE,
            Go::Hold | Go::Answered => abi::HEADERS_STOP_ITERATION,
        }
    }

    fn body_status(go: Go) -> u32 {
        match go {
            Go::Continue => abi::BODY_CONTINUE,
            Go::Hold | Go::Answered => abi::BODY_STOP_AND_BUFFER,
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
        f: EnvoyPtr,
        ptr: *mut c_void,
        end_of_stream: bool,
    ) -> u32 {
        match stream(ptr) {
            Some(s) => headers_status(s.request_headers(Filter(f), end_of_stream)),
            None => abi::HEADERS_STOP_ITERATION,
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
        f: EnvoyPtr,
        ptr: *mut c_void,
        end_of_stream: bool,
    ) -> u32 {
        match stream(ptr) {
            Some(s) => body_status(s.request_body(Filter(f), end_of_stream)),
            None => abi::BODY_STOP_AND_BUFFER,
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
        f: EnvoyPtr,
        ptr: *mut c_void,
    ) -> u32 {
        match stream(ptr).map(|s| s.request_trailers(Filter(f))) {
            Some(Go::Continue) => abi::TRAILERS_CONTINUE,
            _ => abi::TRAILERS_STOP,
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
        f: EnvoyPtr,
        ptr: *mut c_void,
        end_of_stream: bool,
    ) -> u32 {
        match stream(ptr) {
            Some(s) => headers_status(s.response_headers(Filter(f), end_of_stream)),
            None => abi::HEADERS_STOP_ITERATION,
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
        f: EnvoyPtr,
        ptr: *mut c_void,
        end_of_stream: bool,
    ) -> u32 {
        match stream(ptr) {
            Some(s) => body_status(s.response_body(Filter(f), end_of_stream)),
            None => abi::BODY_STOP_AND_BUFFER,
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
        _f: EnvoyPtr,
        _ptr: *mut c_void,
    ) -> u32 {
        abi::TRAILERS_CONTINUE
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
        f: EnvoyPtr,
        ptr: *mut c_void,
    ) {
        if let Some(s) = stream(ptr) {
            s.complete(Filter(f));
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
        f: EnvoyPtr,
        ptr: *mut c_void,
        callout_id: u64,
        result: u32,
        headers: *const Header,
        headers_len: usize,
        body: *const EnvoyBuffer,
        body_len: usize,
    ) {
        let (status, body) = envoy::callout_answer(result, headers, headers_len, body, body_len);
        if let Some(s) = stream(ptr) {
            s.callout_done(Filter(f), callout_id, status.as_deref(), &body);
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
        _config_envoy: EnvoyPtr,
        ptr: *const c_void,
        callout_id: u64,
        result: u32,
        headers: *const Header,
        headers_len: usize,
        body: *const EnvoyBuffer,
        body_len: usize,
    ) {
        let (status, body) = envoy::callout_answer(result, headers, headers_len, body, body_len);
        if let Some(config) = config(ptr) {
            config.callout_done(callout_id, status.as_deref(), &body);
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
        _f: EnvoyPtr,
        _ptr: *mut c_void,
        _stream: u64,
        _headers: *const Header,
        _n: usize,
        _end: bool,
    ) {
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
        _f: EnvoyPtr,
        _ptr: *mut c_void,
        _stream: u64,
        _data: *const EnvoyBuffer,
        _n: usize,
        _end: bool,
    ) {
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
        _f: EnvoyPtr,
        _ptr: *mut c_void,
        _stream: u64,
        _trailers: *const Header,
        _n: usize,
    ) {
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
        _f: EnvoyPtr,
        _ptr: *mut c_void,
        _stream: u64,
    ) {
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
        _f: EnvoyPtr,
        _ptr: *mut c_void,
        _stream: u64,
        _reason: u32,
    ) {
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
        _f: EnvoyPtr,
        _ptr: *mut c_void,
        _event: u64,
    ) {
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
        _f: EnvoyPtr,
        _ptr: *mut c_void,
    ) {
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
        _f: EnvoyPtr,
        _ptr: *mut c_void,
    ) {
    }
}
