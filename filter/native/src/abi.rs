//! Envoy's dynamic-modules ABI, version `v0.2.0` (Envoy 1.40), as this module uses it: the
//! types, the callbacks Envoy exports and the constants they take. Written by hand from the
//! ABI's header and checked against the binary (`nm -D` lists every callback named here; the
//! version string is the only `v0.x.y` string in it). Envoy refuses a module whose
//! `envoy_dynamic_module_on_program_init` returns null and logs a mismatch of the string; the
//! e2e tests check that Envoy logs `ABI version v0.2.0 matched`.
//!
//! Every pointer Envoy passes is valid only for the hook that passed it (or, for views into
//! its headers and bodies, until a setter is called); nothing here outlives that.

#![allow(unsafe_code)]

use std::ffi::c_void;

/// The ABI version this module is built for, NUL-terminated for `on_program_init`.
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

pub type EnvoyPtr = *mut c_void;

/// `len` bytes Envoy passed at `ptr` (a hook's argument or a view it handed out), in place;
/// empty for a null pointer. Valid only during the hook that passed them: not to be kept.
pub fn view<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: Envoy passes `len` readable bytes at `ptr`, valid during the hook.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// Bytes owned by the module, lent to Envoy for one call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    pub ptr: *const u8,
    pub len: usize,
}

impl ModuleBuffer {
    pub fn of(b: &[u8]) -> ModuleBuffer {
        ModuleBuffer {
            ptr: b.as_ptr(),
            len: b.len(),
        }
    }
    /// The null buffer: "no value" (a header removed).
    pub fn null() -> ModuleBuffer {
        ModuleBuffer {
            ptr: std::ptr::null(),
            len: 0,
        }
    }
}

/// Bytes owned by Envoy, lent to the module.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    pub ptr: *const u8,
    pub len: usize,
}

impl EnvoyBuffer {
    pub const EMPTY: EnvoyBuffer = EnvoyBuffer {
        ptr: std::ptr::null(),
        len: 0,
    };
    /// The bytes in place. Envoy's view is valid only during the current hook: the slice must
    /// not be kept beyond it.
    pub fn as_slice(&self) -> &[u8] {
        view(self.ptr, self.len)
    }
    /// The bytes, copied out.
    pub fn to_vec(self) -> Vec<u8> {
        self.as_slice().to_vec()
    }
}

/// A header pair; the same layout whichever side owns it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Header {
    pub key_ptr: *const u8,
    pub key_len: usize,
    pub value_ptr: *const u8,
    pub value_len: usize,
}

impl Header {
    pub const EMPTY: Header = Header {
        key_ptr: std::ptr::null(),
        key_len: 0,
        value_ptr: std::ptr::null(),
        value_len: 0,
    };
    pub fn of(key: &str, value: &[u8]) -> Header {
        Header {
            key_ptr: key.as_ptr(),
            key_len: key.len(),
            value_ptr: value.as_ptr(),
            value_len: value.len(),
        }
    }
    /// The name, as a view into Envoy's header (valid during the hook).
    pub fn key(self) -> EnvoyBuffer {
        EnvoyBuffer {
            ptr: self.key_ptr,
            len: self.key_len,
        }
    }
    /// The value, as a view into Envoy's header (valid during the hook).
    pub fn value(self) -> EnvoyBuffer {
        EnvoyBuffer {
            ptr: self.value_ptr,
            len: self.value_len,
        }
    }
    /// The pair as owned text and bytes (the name lower-cased, as Envoy keeps it).
    pub fn to_owned_pair(self) -> (String, Vec<u8>) {
        let k = String::from_utf8(self.key().to_vec())
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        (k, self.value().to_vec())
    }
}

// Header map types.
pub const REQUEST_HEADERS: u32 = 0;
pub const RESPONSE_HEADERS: u32 = 2;

// Body types.
pub const RECEIVED_REQUEST_BODY: u32 = 0;
pub const BUFFERED_REQUEST_BODY: u32 = 1;
pub const RECEIVED_RESPONSE_BODY: u32 = 2;
pub const BUFFERED_RESPONSE_BODY: u32 = 3;

// Header hook results.
pub const HEADERS_CONTINUE: u32 = 0;
pub const HEADERS_STOP_ITERATION: u32 = 1;
// Body hook results.
pub const BODY_CONTINUE: u32 = 0;
pub const BODY_STOP_AND_BUFFER: u32 = 1;
// Trailer hook results.
pub const TRAILERS_CONTINUE: u32 = 0;
pub const TRAILERS_STOP: u32 = 1;

// Attribute ids (envoy_dynamic_module_type_attribute_id).
pub const ATTR_RESPONSE_CODE_DETAILS: u32 = 16;
pub const ATTR_SOURCE_ADDRESS: u32 = 24;
pub const ATTR_CONNECTION_MTLS: u32 = 29;
pub const ATTR_CONNECTION_TLS_VERSION: u32 = 31;
pub const ATTR_URI_SAN_PEER_CERTIFICATE: u32 = 37;
pub const ATTR_SHA256_PEER_CERTIFICATE_DIGEST: u32 = 38;
pub const ATTR_UPSTREAM_ADDRESS: u32 = 41;
pub const ATTR_XDS_ROUTE_NAME: u32 = 61;

// Log levels.
pub const LOG_INFO: u32 = 2;
pub const LOG_WARN: u32 = 3;
pub const LOG_ERROR: u32 = 4;

// Callout results.
pub const CALLOUT_INIT_SUCCESS: u32 = 0;
pub const CALLOUT_SUCCESS: u32 = 0;

// Metrics results.
pub const METRICS_SUCCESS: u32 = 0;

extern "C" {
    pub fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);

    pub fn envoy_dynamic_module_callback_get_concurrency() -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_get_worker_index(filter: EnvoyPtr) -> u32;

    pub fn envoy_dynamic_module_callback_http_get_headers_size(
        filter: EnvoyPtr,
        kind: u32,
    ) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_headers(
        filter: EnvoyPtr,
        kind: u32,
        out: *mut Header,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_header(
        filter: EnvoyPtr,
        kind: u32,
        key: ModuleBuffer,
        out: *mut EnvoyBuffer,
        index: usize,
        count: *mut usize,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter: EnvoyPtr,
        kind: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_add_header(
        filter: EnvoyPtr,
        kind: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: EnvoyPtr,
        id: u32,
        out: *mut EnvoyBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_bool(
        filter: EnvoyPtr,
        id: u32,
        out: *mut bool,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_send_response(
        filter: EnvoyPtr,
        status: u32,
        headers: *const Header,
        n: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    pub fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
        filter: EnvoyPtr,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter: EnvoyPtr,
        kind: u32,
    ) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter: EnvoyPtr,
        kind: u32,
        out: *mut EnvoyBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_received_buffered_request_body(
        filter: EnvoyPtr,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_received_buffered_response_body(
        filter: EnvoyPtr,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_drain_body(
        filter: EnvoyPtr,
        kind: u32,
        n: usize,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_append_body(
        filter: EnvoyPtr,
        kind: u32,
        data: ModuleBuffer,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: EnvoyPtr);
    pub fn envoy_dynamic_module_callback_http_filter_continue_encoding(filter: EnvoyPtr);

    pub fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter: EnvoyPtr,
        callout_id: *mut u64,
        cluster: ModuleBuffer,
        headers: *const Header,
        n: usize,
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        config: EnvoyPtr,
        callout_id: *mut u64,
        cluster: ModuleBuffer,
        headers: *const Header,
        n: usize,
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: EnvoyPtr,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        n: usize,
        id: *mut usize,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: EnvoyPtr,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        n: usize,
        id: *mut usize,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        config: EnvoyPtr,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        n: usize,
        id: *mut usize,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: EnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        n: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: EnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        n: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
        config: EnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        n: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        config: EnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        n: usize,
        value: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        config: EnvoyPtr,
    ) -> *mut c_void;
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
        scheduler: *mut c_void,
    );
}
