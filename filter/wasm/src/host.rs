//! Host adapters: Envoy's clock, log, environment, shared data, crypto and the request facts
//! the lifecycle asks for, each behind the core trait it serves. Nothing here decides.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use apisec_core::cluster::Call;
use apisec_core::crypto::{self, EcdsaVerifier, SoftwareVerifier, VerifierError};
use apisec_core::lifecycle::{self, Config, HostError, HostFacts, Transport};
use apisec_core::policy::SecretSource;
use apisec_core::store::{SharedStore, StoreError};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, Status};

use crate::worker::Plugin;

pub fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

pub fn now_secs() -> Option<u64> {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
}

/// HMAC secrets come from `vm_config.environment_variables`, never from the policy text.
pub struct EnvSecrets;
impl SecretSource for EnvSecrets {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// Envoy shared data: one store per `vm_id`, shared by every worker, with CAS.
pub struct EnvoyStore;
impl SharedStore for EnvoyStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((value, Some(cas))) => Ok(Some((value.unwrap_or_default(), cas))),
            Ok((_, None)) => Ok(None),
            Err(s) => Err(StoreError::Host(format!("get_shared_data: {s:?}"))),
        }
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(s) => Err(StoreError::Host(format!("set_shared_data: {s:?}"))),
        }
    }
}

/// ECDSA through Envoy's BoringSSL (`verify_signature` foreign function); the pure-Rust path
/// only where the host does not offer the function at all.
pub struct EnvoyVerifier {
    pub warned: Cell<bool>,
}
impl EcdsaVerifier for EnvoyVerifier {
    fn verify_p256_sha256(
        &self,
        spki_der: &[u8],
        msg: &[u8],
        sig_raw: &[u8],
    ) -> Result<bool, VerifierError> {
        let Some(der) = crypto::p1363_to_der(sig_raw) else {
            return Ok(false);
        };
        let args = crypto::envoy_verify_args(spki_der, &der, msg);
        match hostcalls::call_foreign_function("verify_signature", Some(&args)) {
            Ok(Some(out)) => crypto::envoy_verify_result(&out).ok_or(VerifierError::Unreadable),
            Ok(None) => Err(VerifierError::Unreadable),
            Err(Status::NotFound) => {
                if !self.warned.replace(true) {
                    log(
                        LogLevel::Warn,
                        "apisec: host has no verify_signature; using the pure-Rust P-256 verifier",
                    );
                }
                SoftwareVerifier.verify_p256_sha256(spki_der, msg, sig_raw)
            }
            Err(s) => Err(VerifierError::Host(format!("verify_signature: {s:?}"))),
        }
    }
}

/// The request facts the lifecycle asks for, read from Envoy only when asked. One is made per
/// callback: the clock is read once in it (a host call), however often the lifecycle asks.
pub struct EnvoyFacts {
    clock: Cell<Option<Option<Duration>>>,
    /// The plugin whose stream asks: its policy in force.
    plugin: Rc<Plugin>,
}

impl EnvoyFacts {
    pub fn new(plugin: Rc<Plugin>) -> Self {
        EnvoyFacts {
            clock: Cell::new(None),
            plugin,
        }
    }

    fn clock(&self) -> Option<Duration> {
        if let Some(t) = self.clock.get() {
            return t;
        }
        let t = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        self.clock.set(Some(t));
        t
    }
}

impl HostFacts for EnvoyFacts {
    fn now(&self) -> Option<u64> {
        self.clock().map(|d| d.as_secs())
    }

    /// Each property is a host call: ask only what the previous answer makes relevant. A peer
    /// certificate counts only when Envoy verified it (mTLS listener with a CA).
    ///
    /// Whether the client presented a certificate is asked as its digest, not as the
    /// `connection.mtls` flag: Envoy answers the digest only when a peer certificate is there
    /// (`mtls` is the same test, `peerCertificatePresented()`), and for the usual connection
    /// without one it answers NotFound, which copies nothing into the VM. The one-byte flag
    /// always did, and each copy is an allocation call into the VM (~8k instructions, issue 24).
    ///
    /// Whether the connection is TLS at all is asked the same way: Envoy answers the peer
    /// certificate's subject on every TLS connection, an empty one when no certificate came
    /// (it answers NotFound on a plain connection), so the usual TLS request copies nothing
    /// for it either. `connection.tls_version`, asked until then, always copied its text.
    fn transport(&self) -> Transport {
        let tls = raw::present(raw::PEER_SUBJECT);
        let mut t = Transport {
            tls,
            ..Default::default()
        };
        if !tls {
            return t;
        }
        let Some(digest) = text_property(vec!["connection", "sha256_peer_certificate_digest"])
        else {
            return t;
        };
        let valid = !matches!(hostcalls::get_property(vec!["connection", "peer_certificate_valid"]), Ok(Some(v)) if v.first() == Some(&0));
        if valid {
            t.peer_cert_sha256 = Some(digest.to_ascii_lowercase());
            t.peer_uri_san = text_property(vec!["connection", "uri_san_peer_certificate"]);
        }
        t
    }

    fn request_body(&self, size: usize) -> Result<Vec<u8>, HostError> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            .map(Option::unwrap_or_default)
            .map_err(|s| host_error("get_buffer(request body)", s))
    }

    fn response_header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpResponseHeaders, name)
            .ok()
            .flatten()
    }

    fn response_body(&self, size: usize) -> Result<Vec<u8>, HostError> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
            .map(Option::unwrap_or_default)
            .map_err(|s| host_error("get_buffer(response body)", s))
    }

    fn current_config(&self) -> Option<Config> {
        self.plugin.current.borrow().clone()
    }

    fn random(&self, buf: &mut [u8]) -> bool {
        getrandom::getrandom(buf).is_ok()
    }

    fn now_ms(&self) -> Option<u64> {
        self.clock().map(|d| d.as_millis() as u64)
    }

    fn upstream_address(&self) -> Option<String> {
        text_property(vec!["upstream", "address"])
    }

    fn response_details(&self) -> Option<String> {
        text_property(vec!["response", "code_details"])
    }

    fn route_name(&self) -> Option<String> {
        text_property(vec!["xds", "route_name"])
    }
}

/// The one host call whose answer the SDK flattens: `get_property` reports a property that is
/// there but empty and one that is not there alike (`Ok(None)`), and the difference is a fact
/// (a TLS connection without a client certificate has an empty peer subject; a plain one has
/// none).
#[allow(unsafe_code)] // the host import, declared as the SDK declares it
mod raw {
    use proxy_wasm::types::Status;

    /// `connection.subject_peer_certificate`, as the ABI spells a path (parts split by NUL).
    pub const PEER_SUBJECT: &[u8] = b"connection\0subject_peer_certificate";

    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_property(
            path_data: *const u8,
            path_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> Status;
    }

    /// Whether the host has the property, empty or not (an empty one copies nothing into the
    /// VM; a value it copied is freed here).
    pub fn present(path: &[u8]) -> bool {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: the host writes a pointer it allocated in this VM's memory through the SDK's
        // allocator export, and its size; that buffer is taken back below as the SDK does.
        let status = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
        if !matches!(status, Status::Ok) {
            return false;
        }
        if !data.is_null() {
            // SAFETY: as above; the SDK's `get_property` frees an answer the same way.
            drop(unsafe { Vec::from_raw_parts(data, size, size) });
        }
        true
    }
}

/// A property that is text; None when absent or empty.
fn text_property(path: Vec<&str>) -> Option<String> {
    match hostcalls::get_property(path) {
        Ok(Some(v)) if !v.is_empty() => Some(String::from_utf8_lossy(&v).into_owned()),
        _ => None,
    }
}

/// A failed host call as core names it.
pub fn host_error(call: &'static str, status: Status) -> HostError {
    HostError {
        call,
        status: status as u32,
    }
}

/// Sends a callout to the cluster state store as core built it; the token matches its answer.
pub fn send_call(call: &Call) -> Result<u32, Status> {
    let headers = lifecycle::header_pairs(&call.headers);
    hostcalls::dispatch_http_call(
        &call.cluster,
        headers,
        Some(&call.body),
        vec![],
        std::time::Duration::from_millis(call.timeout_ms),
    )
}

/// The body of a callout's answer, read in its response callback.
pub fn call_body(body_size: usize) -> Vec<u8> {
    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// The `:status` of a callout's answer, read in its response callback; core asks it only when
/// the body is not the store's answer (`cluster::CallStatus`).
pub fn call_status() -> Option<String> {
    hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
}
