//! The published signing test vectors (`vectors/signing.json`, docs/partners.md "Partner kit"): for a fixed
//! key, request and parameters, the exact Content-Digest, Signature-Input, signature base and
//! signature the gateway expects, for HMAC-SHA256 and ECDSA P-256 (ID-2, DATA-3, DATA-4).
//!
//! This test signs each case with the gateway's own code and compares every byte with the file,
//! then runs the signed request through the whole gateway decision (it must be accepted) and a
//! one-byte change of it (it must be refused). `APISEC_WRITE_VECTORS=1 cargo test --test
//! vectors` rewrites the file from the cases below after a deliberate change.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)] // test code

mod common;

use apisec_core::crypto::content_digest_sha256;
use apisec_core::signer::SigningKey;
use apisec_core::Policy;
use base64::Engine as _;
use common::vectors::{root, Case, Vectors, APP, SECRET_B64};
use serde_json::{json, Value};

const HMAC_KEYID: &str = "vector-hmac";
const P256_KEYID: &str = "vector-p256";

fn p256_key() -> p256::ecdsa::SigningKey {
    use p256::pkcs8::DecodePrivateKey;
    let pem = std::fs::read_to_string(root().join("vector-p256.key.pem")).unwrap();
    p256::ecdsa::SigningKey::from_pkcs8_pem(&pem).unwrap()
}

const CASES: &[Case] = &[
    Case {
        name: "s1-get-hmac",
        note: "S1 read with a query string; no body, so no content-digest",
        key: "hmac",
        method: "GET",
        url: "https://api.example.com:8443/api/v1/info/research/r-2026-001?lang=zh-CN&format=pdf",
        body: "",
        nonce: "4LxY0rDq7H9bWk2tVn5pZs",
    },
    Case {
        name: "s1-post-hmac-json",
        note: "a JSON body: content-digest (sha-256) is covered",
        key: "hmac",
        method: "POST",
        url: "https://api.example.com:8443/api/v1/info/screener",
        body: r#"{"industry":"banking","min_cap":"1000000000"}"#,
        nonce: "Qm8vT1cX3nRa6YdE0uJk9w",
    },
    Case {
        name: "s3-post-p256-utf8",
        note: "ECDSA P-256 over a body with non-ASCII text: the digest is over the UTF-8 bytes",
        key: "p256",
        method: "POST",
        url: "https://api.example.com:8443/api/v1/orders",
        body: r#"{"symbol":"600000","side":"buy","qty":100,"memo":"浦发银行"}"#,
        nonce: "Zx4H7pLq2Wc9Rt6Vb1Nm3k",
    },
    Case {
        name: "s3-delete-p256",
        note: "ECDSA P-256, no body, an empty query (@query is \"?\")",
        key: "p256",
        method: "DELETE",
        url: "https://api.example.com:8443/api/v1/orders/O-20260101-0001",
        body: "",
        nonce: "Hd2Kf8Ys5Bn0Xq7Tm4Wr1c",
    },
];

fn keyid(c: &Case) -> &'static str {
    if c.key == "hmac" {
        HMAC_KEYID
    } else {
        P256_KEYID
    }
}

fn key(c: &Case) -> SigningKey {
    match c.key {
        "hmac" => SigningKey::Hmac(
            base64::engine::general_purpose::STANDARD
                .decode(SECRET_B64)
                .unwrap(),
        ),
        _ => SigningKey::P256(Box::new(p256_key())),
    }
}

const VECTORS: Vectors = Vectors {
    cases: CASES,
    digest: content_digest_sha256,
    keyid,
    key,
};

fn document() -> Value {
    let public_pem = std::fs::read_to_string(root().join("vector-p256.pub.pem")).unwrap();
    json!({
        "description": "apisec signing test vectors: RFC 9421 HTTP Message Signatures with RFC 9530 \
            Content-Digest, as the gateway expects them. For each case, build the request, compute \
            content-digest, signature-input and the signature base, and compare byte for byte; \
            HMAC signatures must match exactly. ECDSA signatures here use deterministic nonces \
            (RFC 6979); a library that draws a random nonce produces a different signature that \
            must verify with the public key. Keys are public test material: never use them for \
            anything else.",
        "keys": {
            "hmac": {"keyid": HMAC_KEYID, "alg": "hmac-sha256", "secret_b64": SECRET_B64},
            "p256": {
                "keyid": P256_KEYID, "alg": "ecdsa-p256-sha256",
                "private_key_file": "vector-p256.key.pem", "public_key_pem": public_pem,
            },
        },
        "app_id": APP,
        "cases": VECTORS.cases_computed(),
    })
}

#[test]
fn published_vectors_are_what_the_gateway_computes() {
    VECTORS.check_published("signing.json", &document());
}

fn policy() -> Policy {
    let public_pem = std::fs::read_to_string(root().join("vector-p256.pub.pem")).unwrap();
    common::vectors::policy(json!([
        {"id": HMAC_KEYID, "alg": "hmac-sha256", "secret_env": "VECTOR_SECRET"},
        {"id": P256_KEYID, "alg": "ecdsa-p256-sha256", "public_key_pem": public_pem},
    ]))
}

/// Each published case, sent as published, is accepted by the gateway at its `created` time;
/// the same request with one byte of the signature base changed is refused.
#[test]
fn the_gateway_accepts_each_vector_and_refuses_it_changed() {
    VECTORS.check_decided(&policy());
}
