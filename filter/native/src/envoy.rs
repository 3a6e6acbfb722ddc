//! Safe wrappers over the ABI's callbacks (abi.rs): the only place besides the exported hooks
//! (lib.rs) where this crate calls into Envoy. Each wrapper takes the pointer Envoy passed to
//! the hook that is running, copies out what it reads, and reports failure as a value.

#![allow(unsafe_code)]

use std::ffi::c_void;

use crate::abi::{self, EnvoyBuffer, EnvoyPtr, Header, ModuleBuffer};

/// Envoy's side of one HTTP stream (`filter_envoy_ptr`), valid during the hook that passed it.
#[derive(Clone, Copy)]
pub struct Filter(pub EnvoyPtr);

/// Envoy's side of one filter configuration (`filter_config_envoy_ptr`): valid until Envoy
/// destroys the configuration, which it does only after every stream and scheduled event of
/// it (`on_http_filter_config_destroy`).
#[derive(Clone, Copy)]
pub struct ConfigHandle(pub EnvoyPtr);
// SAFETY: Envoy's filter configuration object is shared by every worker; the module calls
// config-level callbacks only from the main thread (config_new and scheduled events).
unsafe impl Send for ConfigHandle {}
unsafe impl Sync for ConfigHandle {}

pub fn log(level: u32, msg: &str) {
    // SAFETY: the buffer points to `msg`, alive for the call.
    unsafe { abi::envoy_dynamic_module_callback_log(level, ModuleBuffer::of(msg.as_bytes())) }
}

pub fn concurrency() -> u32 {
    // SAFETY: no arguments; callable from the main thread at config creation.
    unsafe { abi::envoy_dynamic_module_callback_get_concurrency() }
}

impl Filter {
    pub fn worker_index(self) -> u32 {
        // SAFETY: `self.0` is the running hook's filter pointer.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_get_worker_index(self.0) }
    }

    /// Every header pair of a map, repeats included, copied out; None if the map is not there.
    pub fn headers(self, kind: u32) -> Option<Vec<(String, Vec<u8>)>> {
        // SAFETY: the pointer is the running hook's; `out` has room for `n` headers.
        unsafe {
            let n = abi::envoy_dynamic_module_callback_http_get_headers_size(self.0, kind);
            let mut out = vec![Header::EMPTY; n];
            if n > 0
                && !abi::envoy_dynamic_module_callback_http_get_headers(
                    self.0,
                    kind,
                    out.as_mut_ptr(),
                )
            {
                return None;
            }
            Some(out.into_iter().map(Header::to_owned_pair).collect())
        }
    }

    /// The first value of a header.
    pub fn header(self, kind: u32, name: &str) -> Option<Vec<u8>> {
        let mut out = EnvoyBuffer::EMPTY;
        // SAFETY: `name` and `out` live across the call; the view is copied before return.
        let found = unsafe {
            abi::envoy_dynamic_module_callback_http_get_header(
                self.0,
                kind,
                ModuleBuffer::of(name.as_bytes()),
                &mut out,
                0,
                std::ptr::null_mut(),
            )
        };
        found.then(|| out.to_vec())
    }

    pub fn set_header(self, kind: u32, name: &str, value: &[u8]) -> bool {
        // SAFETY: both buffers live across the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.0,
                kind,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::of(value),
            )
        }
    }

    /// Appends a header value without looking for one of the same name (cheaper than
    /// `set_header` in Envoy: no search of the map).
    pub fn add_header(self, kind: u32, name: &str, value: &[u8]) -> bool {
        // SAFETY: both buffers live across the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_add_header(
                self.0,
                kind,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::of(value),
            )
        }
    }

    pub fn remove_header(self, kind: u32, name: &str) -> bool {
        // SAFETY: a null value removes the header; the name lives across the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.0,
                kind,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::null(),
            )
        }
    }

    pub fn attribute_string(self, id: u32) -> Option<Vec<u8>> {
        let mut out = EnvoyBuffer::EMPTY;
        // SAFETY: `out` lives across the call; the view is copied before return.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.0, id, &mut out,
            )
        };
        ok.then(|| out.to_vec())
    }

    pub fn attribute_bool(self, id: u32) -> Option<bool> {
        let mut out = false;
        // SAFETY: `out` lives across the call.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_bool(self.0, id, &mut out)
        };
        ok.then_some(out)
    }

    pub fn send_response(self, status: u32, headers: &[(&str, &str)], body: &[u8], details: &str) {
        let pairs: Vec<Header> = headers
            .iter()
            .map(|(k, v)| Header::of(k, v.as_bytes()))
            .collect();
        // SAFETY: the pairs, the body and the details live across the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_send_response(
                self.0,
                status,
                pairs.as_ptr(),
                pairs.len(),
                ModuleBuffer::of(body),
                ModuleBuffer::of(details.as_bytes()),
            )
        }
    }

    pub fn set_filter_state(self, key: &str, value: &[u8]) -> bool {
        // SAFETY: both buffers live across the call; Envoy copies them.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_filter_state_bytes(
                self.0,
                ModuleBuffer::of(key.as_bytes()),
                ModuleBuffer::of(value),
            )
        }
    }

    /// Envoy's views of one body buffer's chunks (valid during this hook); None if Envoy has
    /// no such buffer.
    fn chunk_views(self, kind: u32) -> Option<Vec<EnvoyBuffer>> {
        // SAFETY: `out` has room for the `n` views Envoy writes.
        unsafe {
            let n = abi::envoy_dynamic_module_callback_http_get_body_chunks_size(self.0, kind);
            let mut out = vec![EnvoyBuffer::EMPTY; n];
            abi::envoy_dynamic_module_callback_http_get_body_chunks(self.0, kind, out.as_mut_ptr())
                .then_some(out)
        }
    }

    /// The chunks of one body buffer, copied out once and joined; None if Envoy has no such
    /// buffer.
    fn body_chunks(self, kind: u32) -> Option<Vec<u8>> {
        let views = self.chunk_views(kind)?;
        let mut body = Vec::with_capacity(views.iter().map(|c| c.len).sum());
        for c in &views {
            body.extend_from_slice(c.as_slice());
        }
        Some(body)
    }

    /// How many bytes one body buffer holds (its chunks' lengths, nothing copied).
    fn body_chunks_len(self, kind: u32) -> usize {
        self.chunk_views(kind)
            .map_or(0, |views| views.iter().map(|c| c.len).sum())
    }

    /// The length of [`Filter::body`], without copying it.
    pub fn body_len(self, request: bool) -> usize {
        let (received, buffered) = kinds(request);
        let mut n = 0;
        if !self.same_buffer(request) {
            n = self.body_chunks_len(buffered);
        }
        n + self.body_chunks_len(received)
    }

    fn same_buffer(self, request: bool) -> bool {
        // SAFETY: the pointer is the running hook's.
        unsafe {
            if request {
                abi::envoy_dynamic_module_callback_http_received_buffered_request_body(self.0)
            } else {
                abi::envoy_dynamic_module_callback_http_received_buffered_response_body(self.0)
            }
        }
    }

    /// The whole body so far: what Envoy buffered for this filter and the part that just
    /// arrived (one buffer when Envoy says the arrived part is the buffered one).
    pub fn body(self, request: bool) -> Vec<u8> {
        let (received, buffered) = kinds(request);
        let mut body = Vec::new();
        if !self.same_buffer(request) {
            body = self.body_chunks(buffered).unwrap_or_default();
        }
        body.extend_from_slice(&self.body_chunks(received).unwrap_or_default());
        body
    }

    /// Puts `new` in place of the whole response body so far.
    pub fn replace_response_body(self, new: &[u8]) -> bool {
        let (received, buffered) = kinds(false);
        // SAFETY: the pointer is the running hook's; `new` lives across the call.
        unsafe {
            if !self.same_buffer(false) {
                let _ = abi::envoy_dynamic_module_callback_http_drain_body(
                    self.0,
                    buffered,
                    usize::MAX,
                );
            }
            abi::envoy_dynamic_module_callback_http_drain_body(self.0, received, usize::MAX)
                && abi::envoy_dynamic_module_callback_http_append_body(
                    self.0,
                    received,
                    ModuleBuffer::of(new),
                )
        }
    }

    pub fn continue_stream(self, response: bool) {
        // SAFETY: called from a callback of this stream (a callout's answer).
        unsafe {
            if response {
                abi::envoy_dynamic_module_callback_http_filter_continue_encoding(self.0)
            } else {
                abi::envoy_dynamic_module_callback_http_filter_continue_decoding(self.0)
            }
        }
    }

    /// Starts an HTTP callout; its id, or None when Envoy refused to start it (the code).
    pub fn callout(
        self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, u32> {
        let pairs: Vec<Header> = headers
            .iter()
            .map(|(k, v)| Header::of(k, v.as_bytes()))
            .collect();
        let mut id = 0u64;
        // SAFETY: every buffer lives across the call; Envoy copies them.
        let r = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_http_callout(
                self.0,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                pairs.as_ptr(),
                pairs.len(),
                ModuleBuffer::of(body),
                timeout_ms,
            )
        };
        if r == abi::CALLOUT_INIT_SUCCESS {
            Ok(id)
        } else {
            Err(r)
        }
    }

    pub fn increment(self, id: usize, labels: &[&str], n: u64) -> bool {
        let values = buffers(labels);
        // SAFETY: the label views live across the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_increment_counter(
                self.0,
                id,
                values.as_ptr(),
                values.len(),
                n,
            ) == abi::METRICS_SUCCESS
        }
    }
}

/// A callout's answer as Envoy handed it to `*_http_callout_done`: its `:status` (None when the
/// callout failed: reset, or an answer over the buffer limit) and its body, copied out.
pub fn callout_answer(
    result: u32,
    headers: *const Header,
    n_headers: usize,
    chunks: *const EnvoyBuffer,
    n_chunks: usize,
) -> (Option<String>, Vec<u8>) {
    if result != abi::CALLOUT_SUCCESS {
        return (None, Vec::new());
    }
    let mut status = None;
    if !headers.is_null() {
        // SAFETY: Envoy passes `n_headers` pairs, valid during the hook.
        for h in unsafe { std::slice::from_raw_parts(headers, n_headers) } {
            if h.key().as_slice() == b":status" {
                status = Some(String::from_utf8_lossy(h.value().as_slice()).into_owned());
            }
        }
    }
    let mut body = Vec::new();
    if !chunks.is_null() {
        // SAFETY: Envoy passes `n_chunks` views, valid during the hook.
        for c in unsafe { std::slice::from_raw_parts(chunks, n_chunks) } {
            body.extend_from_slice(c.as_slice());
        }
    }
    (status, body)
}

/// Label names or values as the ABI takes them (views, alive while `labels` is).
fn buffers(labels: &[&str]) -> Vec<ModuleBuffer> {
    labels
        .iter()
        .map(|l| ModuleBuffer::of(l.as_bytes()))
        .collect()
}

fn kinds(request: bool) -> (u32, u32) {
    if request {
        (abi::RECEIVED_REQUEST_BODY, abi::BUFFERED_REQUEST_BODY)
    } else {
        (abi::RECEIVED_RESPONSE_BODY, abi::BUFFERED_RESPONSE_BODY)
    }
}

/// A metric's kind as the ABI defines it.
#[derive(Clone, Copy)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl ConfigHandle {
    /// Defines a metric (only while the configuration is being created); its id.
    pub fn define(self, kind: MetricKind, name: &str, labels: &[&str]) -> Option<usize> {
        let names = buffers(labels);
        let mut id = 0usize;
        let f = match kind {
            MetricKind::Counter => {
                abi::envoy_dynamic_module_callback_http_filter_config_define_counter
            }
            MetricKind::Gauge => abi::envoy_dynamic_module_callback_http_filter_config_define_gauge,
            MetricKind::Histogram => {
                abi::envoy_dynamic_module_callback_http_filter_config_define_histogram
            }
        };
        // SAFETY: called from config_new with its config pointer; buffers live across the call.
        let r = unsafe {
            f(
                self.0,
                ModuleBuffer::of(name.as_bytes()),
                names.as_ptr(),
                names.len(),
                &mut id,
            )
        };
        (r == abi::METRICS_SUCCESS).then_some(id)
    }

    pub fn set_gauge(self, id: usize, labels: &[&str], v: u64) -> bool {
        let values = buffers(labels);
        // SAFETY: main thread, the configuration alive; buffers live across the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_set_gauge(
                self.0,
                id,
                values.as_ptr(),
                values.len(),
                v,
            ) == abi::METRICS_SUCCESS
        }
    }

    pub fn increment(self, id: usize, labels: &[&str], n: u64) -> bool {
        let values = buffers(labels);
        // SAFETY: main thread, the configuration alive; buffers live across the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_increment_counter(
                self.0,
                id,
                values.as_ptr(),
                values.len(),
                n,
            ) == abi::METRICS_SUCCESS
        }
    }

    /// Starts an HTTP callout from the configuration (main thread): its id, or Envoy's code.
    pub fn callout(
        self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, u32> {
        let pairs: Vec<Header> = headers
            .iter()
            .map(|(k, v)| Header::of(k, v.as_bytes()))
            .collect();
        let mut id = 0u64;
        // SAFETY: main thread, the configuration alive; every buffer lives across the call.
        let r = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.0,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                pairs.as_ptr(),
                pairs.len(),
                ModuleBuffer::of(body),
                timeout_ms,
            )
        };
        if r == abi::CALLOUT_INIT_SUCCESS {
            Ok(id)
        } else {
            Err(r)
        }
    }

    pub fn record(self, id: usize, labels: &[&str], v: u64) -> bool {
        let values = buffers(labels);
        // SAFETY: main thread, the configuration alive; buffers live across the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
                self.0,
                id,
                values.as_ptr(),
                values.len(),
                v,
            ) == abi::METRICS_SUCCESS
        }
    }

    pub fn scheduler(self) -> Scheduler {
        // SAFETY: main thread, the configuration alive.
        Scheduler(unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.0)
        })
    }
}

/// A configuration's scheduler: events committed to it (from any thread) run on Envoy's main
/// thread as `on_http_filter_config_scheduled`.
pub struct Scheduler(*mut c_void);
// SAFETY: the ABI allows commit from any thread; the owner serialises commit and delete.
unsafe impl Send for Scheduler {}

impl Scheduler {
    pub fn commit(&self, event: u64) {
        if !self.0.is_null() {
            // SAFETY: not deleted (delete consumes self).
            unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
                    self.0, event,
                )
            }
        }
    }
    pub fn delete(self) {
        if !self.0.is_null() {
            // SAFETY: deleted once; self is consumed.
            unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.0)
            }
        }
    }
}
