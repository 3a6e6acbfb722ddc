//! Benchmark fixture, never deployed: the floor of a Rust module on Envoy's dynamic-modules ABI
//! (`v0.2.0`, Envoy 1.40), the native build's counterpart of `bench/floor_filter`.
//!
//! Three fixtures in one module, chosen by the filter configuration:
//! - anything else (the `floor_native` variant, configured empty): reads one request header
//!   (`x-app-id`) and continues: what the dynamic-modules filter itself costs (the stream
//!   object, the hooks Envoy calls on every stream, one callback);
//! - `evidence` (the `floor_evidence_native` variant): makes the callbacks apisec's native build
//!   makes on an allowed S0 request (filter/native: `stream.rs`, `host.rs`, `metrics.rs`) and
//!   decides nothing: the request headers (all pairs), the client address, the worker's index,
//!   the identity header added, the guard's mark set in the filter state; the response's
//!   `:status` and its body's chunk counts; at the stream's end the upstream address, a record
//!   of an S0 record's size set in the filter state, the `apisec.allowed` counter, and one
//!   latency sample into a histogram labelled by app and API (apisec hands its samples to Envoy
//!   once a second from the main thread; this one records each at once, one call a sample
//!   either way). What a module that gives S0's evidence through this ABI pays in Envoy before
//!   it checks anything;
//! - `evidence_s3` (the `floor_s3_native` variant, the bench's S3 POST): the same, with the
//!   callbacks of an allowed S3 request (the connection's TLS facts, the request held until its
//!   body is whole, the body's chunks read as the native build reads them, a record of an S3
//!   record's size), and one ECDSA P-256 verification through `ring`, the native build's
//!   verifier, of a signature made at load over a message of the bench's signature base size.
//!   A failed verification sets no mark, so the guard refuses and the bench stops at its check
//!   before anything is timed (tried with the message altered: "floor_s3_native refused its
//!   requests"). What S3's evidence and its signature cost in this build before anything else.
//!
//! Its own bindings, written from the same ABI as `filter/native/src/abi.rs`; only what the
//! fixtures call.

#![allow(unsafe_code)] // the ABI: exported C functions and Envoy's callbacks

use std::ffi::{c_char, c_void};

type EnvoyPtr = *mut c_void;

/// Bytes lent across the ABI (either side's).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Buf {
    ptr: *const u8,
    len: usize,
}

impl Buf {
    const EMPTY: Buf = Buf {
        ptr: std::ptr::null(),
        len: 0,
    };
    fn of(b: &[u8]) -> Buf {
        Buf {
            ptr: b.as_ptr(),
            len: b.len(),
        }
    }
}

/// A header pair as the ABI passes it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Header {
    key_ptr: *const u8,
    key_len: usize,
    value_ptr: *const u8,
    value_len: usize,
}

const REQUEST_HEADERS: u32 = 0;
const RESPONSE_HEADERS: u32 = 2;
const RECEIVED_REQUEST_BODY: u32 = 0;
const BUFFERED_REQUEST_BODY: u32 = 1;
const RECEIVED_RESPONSE_BODY: u32 = 2;
const BUFFERED_RESPONSE_BODY: u32 = 3;
const ATTR_SOURCE_ADDRESS: u32 = 24;
const ATTR_CONNECTION_MTLS: u32 = 29;
const ATTR_CONNECTION_TLS_VERSION: u32 = 31;
const ATTR_UPSTREAM_ADDRESS: u32 = 41;
const METRICS_SUCCESS: u32 = 0;

extern "C" {
    fn envoy_dynamic_module_callback_http_filter_get_worker_index(filter: EnvoyPtr) -> u32;
    fn envoy_dynamic_module_callback_http_get_headers_size(filter: EnvoyPtr, kind: u32) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: EnvoyPtr,
        kind: u32,
        out: *mut Header,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_header(
        filter: EnvoyPtr,
        kind: u32,
        key: Buf,
        out: *mut Buf,
        index: usize,
        count: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_add_header(
        filter: EnvoyPtr,
        kind: u32,
        key: Buf,
        value: Buf,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: EnvoyPtr,
        id: u32,
        out: *mut Buf,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
        filter: EnvoyPtr,
        key: Buf,
        value: Buf,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter: EnvoyPtr,
        kind: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_filter_get_attribute_bool(
        filter: EnvoyPtr,
        id: u32,
        out: *mut bool,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter: EnvoyPtr,
        kind: u32,
        out: *mut Buf,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_received_buffered_request_body(filter: EnvoyPtr) -> bool;
    fn envoy_dynamic_module_callback_http_received_buffered_response_body(filter: EnvoyPtr)
        -> bool;
    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: EnvoyPtr,
        name: Buf,
        label_names: *const Buf,
        n: usize,
        id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        config: EnvoyPtr,
        name: Buf,
        label_names: *const Buf,
        n: usize,
        id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: EnvoyPtr,
        id: usize,
        label_values: *const Buf,
        n: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
        config: EnvoyPtr,
        id: usize,
        label_values: *const Buf,
        n: usize,
        value: u64,
    ) -> u32;
}

/// The size of an allowed S0 request's audit record in the bench (444 bytes: 2026-12-07).
const RECORD: &[u8; 444] = &[b'x'; 444];
/// The size of an allowed S3 request's audit record in the bench, with its evidence (1,435
/// bytes: 2026-12-07).
const RECORD_S3: &[u8; 1435] = &[b'x'; 1435];
/// A message of the bench's S3 signature base size (350 bytes: 2026-12-07).
const BASE_S3: &[u8; 350] = &[b'b'; 350];

/// One filter configuration: which fixture it is.
enum Config {
    Empty,
    Evidence(Stats),
    /// With a public key (an uncompressed point) and its signature over `BASE_S3`.
    EvidenceS3(Stats, Vec<u8>, Vec<u8>),
}

struct Stats {
    config_envoy: EnvoyPtr,
    allowed: usize,
    duration: usize,
}

impl Config {
    fn stats(&self) -> Option<&Stats> {
        match self {
            Config::Empty => None,
            Config::Evidence(s) | Config::EvidenceS3(s, _, _) => Some(s),
        }
    }
}

fn define(config: EnvoyPtr, histogram: bool, name: &str, labels: &[&str]) -> Option<usize> {
    let names: Vec<Buf> = labels.iter().map(|l| Buf::of(l.as_bytes())).collect();
    let mut id = 0usize;
    let f = if histogram {
        envoy_dynamic_module_callback_http_filter_config_define_histogram
    } else {
        envoy_dynamic_module_callback_http_filter_config_define_counter
    };
    // SAFETY: called from config_new with its config pointer; the buffers live across the call.
    let r = unsafe {
        f(
            config,
            Buf::of(name.as_bytes()),
            names.as_ptr(),
            names.len(),
            &mut id,
        )
    };
    (r == METRICS_SUCCESS).then_some(id)
}

fn stats(config_envoy: EnvoyPtr) -> Option<Stats> {
    Some(Stats {
        config_envoy,
        allowed: define(config_envoy, false, "floor_native.allowed", &[])?,
        duration: define(
            config_envoy,
            true,
            "floor_native.duration_ms",
            &["app", "api"],
        )?,
    })
}

/// A P-256 key made now, and its signature over `BASE_S3`.
fn s3_key() -> Option<(Vec<u8>, Vec<u8>)> {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).ok()?;
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).ok()?;
    let sig = pair.sign(&rng, BASE_S3).ok()?;
    Some((pair.public_key().as_ref().to_vec(), sig.as_ref().to_vec()))
}

/// The clock read, as the native build reads it (the process's clock is Envoy's).
#[allow(clippy::disallowed_methods)]
fn clock() {
    let _ = std::time::SystemTime::now();
}

fn worker_index(f: EnvoyPtr) {
    // SAFETY: the running hook's filter pointer.
    unsafe {
        envoy_dynamic_module_callback_http_filter_get_worker_index(f);
    }
}

fn header(f: EnvoyPtr, kind: u32, name: &str) -> bool {
    let mut out = Buf::EMPTY;
    // SAFETY: `name` and `out` live across the call.
    unsafe {
        envoy_dynamic_module_callback_http_get_header(
            f,
            kind,
            Buf::of(name.as_bytes()),
            &mut out,
            0,
            std::ptr::null_mut(),
        )
    }
}

/// Every request header's view, as the native build asks for them.
fn headers(f: EnvoyPtr) -> usize {
    // SAFETY: the running hook's filter pointer; `out` has room for the `n` pairs Envoy writes.
    unsafe {
        let n = envoy_dynamic_module_callback_http_get_headers_size(f, REQUEST_HEADERS);
        let mut out = vec![
            Header {
                key_ptr: std::ptr::null(),
                key_len: 0,
                value_ptr: std::ptr::null(),
                value_len: 0,
            };
            n
        ];
        envoy_dynamic_module_callback_http_get_headers(f, REQUEST_HEADERS, out.as_mut_ptr());
        out.len()
    }
}

fn attribute(f: EnvoyPtr, id: u32) -> bool {
    let mut out = Buf::EMPTY;
    // SAFETY: `out` lives across the call.
    unsafe { envoy_dynamic_module_callback_http_filter_get_attribute_string(f, id, &mut out) }
}

fn set_filter_state(f: EnvoyPtr, key: &str, value: &[u8]) -> bool {
    // SAFETY: both buffers live across the call; Envoy copies them.
    unsafe {
        envoy_dynamic_module_callback_http_set_filter_state_bytes(
            f,
            Buf::of(key.as_bytes()),
            Buf::of(value),
        )
    }
}

/// `len` bytes Envoy passed at `ptr`, in place; empty for a null pointer (the fixture's
/// `abi::view` of filter/native: its only reader of Envoy's bytes). Valid during the hook.
fn view<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: Envoy passes `len` readable bytes at `ptr`, valid during the hook.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// One body buffer's chunk views (as the native build's `chunk_views` asks for them): their
/// length, and the bytes they hold copied out when `into` is given.
fn chunks(f: EnvoyPtr, kind: u32, mut into: Option<&mut Vec<u8>>) -> usize {
    let mut len = 0;
    let mut out = Vec::new();
    // SAFETY: `out` has room for the `n` views Envoy writes.
    let ok = unsafe {
        let n = envoy_dynamic_module_callback_http_get_body_chunks_size(f, kind);
        out.resize(n, Buf::EMPTY);
        envoy_dynamic_module_callback_http_get_body_chunks(f, kind, out.as_mut_ptr())
    };
    if ok {
        for c in &out {
            len += c.len;
            if let Some(into) = into.as_deref_mut() {
                into.extend_from_slice(view(c.ptr, c.len));
            }
        }
    }
    len
}

/// A body so far, read as the native build's `body` and `body_len` read it: the buffered part
/// (unless Envoy says it is the part that just arrived) and the received part; its length, and
/// its bytes copied into `into` when given.
fn body(f: EnvoyPtr, request: bool, mut into: Option<&mut Vec<u8>>) -> usize {
    let (received, buffered) = if request {
        (RECEIVED_REQUEST_BODY, BUFFERED_REQUEST_BODY)
    } else {
        (RECEIVED_RESPONSE_BODY, BUFFERED_RESPONSE_BODY)
    };
    // SAFETY: the running hook's filter pointer.
    let same = unsafe {
        if request {
            envoy_dynamic_module_callback_http_received_buffered_request_body(f)
        } else {
            envoy_dynamic_module_callback_http_received_buffered_response_body(f)
        }
    };
    let mut len = 0;
    if !same {
        len += chunks(f, buffered, into.as_deref_mut());
    }
    len + chunks(f, received, into)
}

/// The hooks Envoy calls (a private module: Envoy's pointers are dereferenced only here and in
/// the callbacks, never by a caller of this crate).
mod hooks {
    use super::*;

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
        c"v0.2.0".as_ptr()
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
        config_envoy: EnvoyPtr,
        _name_ptr: *const u8,
        _name_len: usize,
        config_ptr: *const u8,
        config_len: usize,
    ) -> *const c_void {
        let config = match view(config_ptr, config_len) {
            b"evidence" => stats(config_envoy).map(Config::Evidence),
            b"evidence_s3" => match (stats(config_envoy), s3_key()) {
                (Some(s), Some((key, sig))) => Some(Config::EvidenceS3(s, key, sig)),
                _ => None,
            },
            _ => Some(Config::Empty),
        };
        match config {
            Some(c) => Box::into_raw(Box::new(c)) as *const c_void,
            None => std::ptr::null(),
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(ptr: *const c_void) {
        if !ptr.is_null() {
            // SAFETY: the Box leaked in config_new, given back once.
            drop(unsafe { Box::from_raw(ptr as *mut Config) });
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
        _name_ptr: *const u8,
        _name_len: usize,
        _config_ptr: *const u8,
        _config_len: usize,
    ) -> *const c_void {
        std::ptr::null()
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(
        _ptr: *const c_void,
    ) {
    }

    /// The stream's module pointer is its configuration's (the fixtures keep nothing per
    /// stream).
    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
        config_ptr: *const c_void,
        _filter_envoy: EnvoyPtr,
    ) -> *mut c_void {
        config_ptr as *mut c_void
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(_ptr: *mut c_void) {}

    fn config<'a>(ptr: *mut c_void) -> Option<&'a Config> {
        // SAFETY: the pointer is a Config leaked in config_new, alive while its streams are.
        unsafe { (ptr as *const Config).as_ref() }
    }

    /// What both evidence fixtures do when a request is let through: the identity header
    /// added and the guard's mark set.
    fn pass(f: EnvoyPtr) {
        // SAFETY: both buffers live across the call.
        unsafe {
            envoy_dynamic_module_callback_http_add_header(
                f,
                REQUEST_HEADERS,
                Buf::of(b"x-apisec-app"),
                Buf::of(b"bench-app"),
            );
        }
        set_filter_state(f, "wasm.apisec_passed", b"1");
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
        f: EnvoyPtr,
        ptr: *mut c_void,
        _end_of_stream: bool,
    ) -> u32 {
        let Some(config) = config(ptr) else {
            return 1;
        };
        if let Config::Empty = config {
            header(f, REQUEST_HEADERS, "x-app-id");
            return 0;
        }
        clock();
        headers(f);
        worker_index(f);
        attribute(f, ATTR_SOURCE_ADDRESS);
        match config {
            Config::EvidenceS3(..) => {
                // the connection's TLS facts, as an S3 API requires them
                attribute(f, ATTR_CONNECTION_TLS_VERSION);
                let mut mtls = false;
                // SAFETY: `mtls` lives across the call.
                unsafe {
                    envoy_dynamic_module_callback_http_filter_get_attribute_bool(
                        f,
                        ATTR_CONNECTION_MTLS,
                        &mut mtls,
                    );
                }
                // held until the body is whole (every S3 request of the bench has one; one
                // without would wait for its timeout)
                1
            }
            _ => {
                pass(f);
                0
            }
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
        f: EnvoyPtr,
        ptr: *mut c_void,
        end_of_stream: bool,
    ) -> u32 {
        let Some(Config::EvidenceS3(_, key, sig)) = config(ptr) else {
            return 0;
        };
        clock();
        worker_index(f);
        let so_far = body(f, true, None);
        if !end_of_stream {
            return 1; // buffered until the body is whole
        }
        worker_index(f);
        let mut whole = Vec::new();
        body(f, true, Some(&mut whole));
        let key = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            key.as_slice(),
        );
        // The body is read twice, as the native build reads it (its length, then its bytes for
        // the digest); a mismatch would be Envoy's fault, not the fixture's.
        if so_far == whole.len() && key.verify(BASE_S3, sig).is_ok() {
            pass(f);
        }
        0
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
        _f: EnvoyPtr,
        _ptr: *mut c_void,
    ) -> u32 {
        0
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
        f: EnvoyPtr,
        ptr: *mut c_void,
        _end_of_stream: bool,
    ) -> u32 {
        if config(ptr).and_then(Config::stats).is_some() {
            worker_index(f);
            header(f, RESPONSE_HEADERS, ":status");
        }
        0
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
        f: EnvoyPtr,
        ptr: *mut c_void,
        _end_of_stream: bool,
    ) -> u32 {
        if config(ptr).and_then(Config::stats).is_some() {
            worker_index(f);
            // the native build asks for the body's length in each body hook
            body(f, false, None);
        }
        0
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
        _f: EnvoyPtr,
        _ptr: *mut c_void,
    ) -> u32 {
        0
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
        f: EnvoyPtr,
        ptr: *mut c_void,
    ) {
        let Some(config) = config(ptr) else {
            return;
        };
        let Some(stats) = config.stats() else {
            return;
        };
        let record: &[u8] = match config {
            Config::EvidenceS3(..) => RECORD_S3,
            _ => RECORD,
        };
        clock();
        worker_index(f);
        attribute(f, ATTR_UPSTREAM_ADDRESS);
        set_filter_state(f, "wasm.apisec_audit", record);
        worker_index(f);
        let labels = [Buf::of(b"bench-app"), Buf::of(b"bench-api")];
        // SAFETY: the hook's filter pointer and the configuration's; the labels live across
        // the calls.
        unsafe {
            envoy_dynamic_module_callback_http_filter_increment_counter(
                f,
                stats.allowed,
                std::ptr::null(),
                0,
                1,
            );
            envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
                stats.config_envoy,
                stats.duration,
                labels.as_ptr(),
                labels.len(),
                1,
            );
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
        _f: EnvoyPtr,
        _ptr: *mut c_void,
        _callout_id: u64,
        _result: u32,
        _headers: *const Header,
        _headers_len: usize,
        _body: *const Buf,
        _body_len: usize,
    ) {
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
        _data: *const Buf,
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
