//! Host adapters of the native build: the clock, the environment, ECDSA with the CPU's
//! instructions, and the request facts the lifecycle asks for, each behind the core trait it
//! serves. Nothing here decides.

use std::cell::Cell;
use std::time::Duration;

use apisec_core::crypto::{EcdsaVerifier, SoftwareVerifier, VerifierError};
use apisec_core::lifecycle::{Config, HostError, HostFacts, Transport};
use apisec_core::policy::SecretSource;

use crate::abi;
use crate::clock::clock;
use crate::envoy::Filter;
use crate::plugin::Plugin;

/// Secrets come from Envoy's own environment (the process's), never from the policy text.
pub struct EnvSecrets;
impl SecretSource for EnvSecrets {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1, BIT STRING of 66
/// bytes): the uncompressed point follows it.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// ECDSA P-256 with SHA-256 through `ring` (assembly with the CPU's instructions); a key in
/// another DER form goes to the pure-Rust verifier, which parses any SPKI.
pub struct RingVerifier;
impl EcdsaVerifier for RingVerifier {
    fn verify_p256_sha256(
        &self,
        spki_der: &[u8],
        msg: &[u8],
        sig_raw: &[u8],
    ) -> Result<bool, VerifierError> {
        match spki_der.strip_prefix(&P256_SPKI_PREFIX[..]) {
            Some(point) if point.len() == 65 && point.first() == Some(&4) => {
                let key = ring::signature::UnparsedPublicKey::new(
                    &ring::signature::ECDSA_P256_SHA256_FIXED,
                    point,
                );
                Ok(key.verify(msg, sig_raw).is_ok())
            }
            _ => SoftwareVerifier.verify_p256_sha256(spki_der, msg, sig_raw),
        }
    }
}

/// The request facts of one stream, read from Envoy only when asked. One is made per hook: the
/// clock is read once in it, however often the lifecycle asks.
pub struct Facts<'a> {
    pub filter: Filter,
    pub plugin: &'a Plugin,
    pub response: bool,
    clock: Cell<Option<Option<Duration>>>,
}

impl<'a> Facts<'a> {
    pub fn new(filter: Filter, plugin: &'a Plugin, response: bool) -> Self {
        Facts {
            filter,
            plugin,
            response,
            clock: Cell::new(None),
        }
    }

    fn clock(&self) -> Option<Duration> {
        if let Some(t) = self.clock.get() {
            return t;
        }
        let t = clock();
        self.clock.set(Some(t));
        t
    }

    fn text(&self, id: u32) -> Option<String> {
        self.filter
            .attribute_string(id)
            .filter(|v| !v.is_empty())
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }
}

impl HostFacts for Facts<'_> {
    fn now(&self) -> Option<u64> {
        self.clock().map(|d| d.as_secs())
    }

    /// A peer certificate counts only when Envoy verified it: the mTLS listeners require a
    /// certificate from the partners' CA, so a handshake with any other fails before a request.
    fn transport(&self) -> Transport {
        let tls = self.text(abi::ATTR_CONNECTION_TLS_VERSION).is_some();
        let mtls = tls && self.filter.attribute_bool(abi::ATTR_CONNECTION_MTLS) == Some(true);
        let mut t = Transport {
            tls,
            ..Default::default()
        };
        if mtls {
            t.peer_cert_sha256 = self
                .text(abi::ATTR_SHA256_PEER_CERTIFICATE_DIGEST)
                .map(|s| s.to_ascii_lowercase());
            t.peer_uri_san = self.text(abi::ATTR_URI_SAN_PEER_CERTIFICATE);
        }
        t
    }

    fn request_body(&self, size: usize) -> Result<Vec<u8>, HostError> {
        let mut body = self.filter.body(true);
        body.truncate(size);
        Ok(body)
    }

    fn response_header(&self, name: &str) -> Option<String> {
        self.filter
            .header(abi::RESPONSE_HEADERS, name)
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    fn response_body(&self, size: usize) -> Result<Vec<u8>, HostError> {
        let mut body = self.filter.body(false);
        body.truncate(size);
        Ok(body)
    }

    fn current_config(&self) -> Option<Config> {
        self.plugin.current()
    }

    fn route_name(&self) -> Option<String> {
        self.text(abi::ATTR_XDS_ROUTE_NAME)
    }

    fn random(&self, buf: &mut [u8]) -> bool {
        getrandom::getrandom(buf).is_ok()
    }

    fn now_ms(&self) -> Option<u64> {
        self.clock().map(|d| d.as_millis() as u64)
    }

    fn upstream_address(&self) -> Option<String> {
        self.text(abi::ATTR_UPSTREAM_ADDRESS)
    }

    fn response_details(&self) -> Option<String> {
        self.text(abi::ATTR_RESPONSE_CODE_DETAILS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apisec_core::crypto::EcdsaVerifier;

    /// The ring path and the pure-Rust path agree on a valid signature, a changed message and
    /// a changed signature (RFC 9421 B.2.4's key and signature form: raw r||s).
    #[test]
    fn ring_verifies_what_the_software_verifier_verifies() {
        use p256::ecdsa::signature::Signer;
        use p256::pkcs8::EncodePublicKey;
        let sk = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let spki = sk.verifying_key().to_public_key_der().unwrap();
        let sig: p256::ecdsa::Signature = sk.sign(b"message");
        let raw = sig.to_bytes();
        assert!(spki.as_bytes().starts_with(&P256_SPKI_PREFIX));
        for (msg, sig, want) in [
            (&b"message"[..], raw.to_vec(), true),
            (&b"messagf"[..], raw.to_vec(), false),
            (
                &b"message"[..],
                {
                    let mut s = raw.to_vec();
                    s[40] ^= 1;
                    s
                },
                false,
            ),
            (&b"message"[..], raw[..63].to_vec(), false),
        ] {
            let ring = RingVerifier
                .verify_p256_sha256(spki.as_bytes(), msg, &sig)
                .unwrap();
            let soft = SoftwareVerifier
                .verify_p256_sha256(spki.as_bytes(), msg, &sig)
                .unwrap();
            assert_eq!(ring, want);
            assert_eq!(soft, want);
        }
    }
}
