//! The published national-algorithm test vectors (`vectors/national.json`, docs/national.md;
//! DATA-5): for a fixed key, request and parameters, the exact Content-Digest (`sm3`),
//! Signature-Input, signature base and signature the gateway expects, for HMAC-SM3 and SM2
//! (with the default distinguishing ID and with another one).
//!
//! This test signs each case with the gateway's own code and compares every byte with the file,
//! then runs the signed request through the whole gateway decision (it must be accepted) and a
//! one-byte change of it (it must be refused). `APISEC_WRITE_VECTORS=1 cargo test --test
//! national_vectors` rewrites the file from the cases below after a deliberate change.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)] // test code

mod common;

use apisec_core::crypto::{content_digest_sm3, sm2_signing_key};
use apisec_core::signer::SigningKey;
use apisec_core::Policy;
use base64::Engine as _;
use common::vectors::{root, Case, Vectors, APP, SECRET_B64};
use serde_json::{json, Value};

const HMAC_KEYID: &str = "vector-hmac-sm3";
const SM2_KEYID: &str = "vector-sm2";
const SM2_ALICE_KEYID: &str = "vector-sm2-alice";
const ALICE: &str = "ALICE123@YAHOO.COM";

fn sm2_pem() -> String {
    std::fs::read_to_string(root().join("vector-sm2.key.pem")).unwrap()
}

const CASES: &[Case] = &[
    Case {
        name: "s1-get-hmac-sm3",
        note: "S1 read with a query string, HMAC-SM3; no body, so no content-digest",
        key: "hmac-sm3",
        method: "GET",
        url: "https://api.example.com:8443/api/v1/info/research/r-2026-001?lang=zh-CN&format=pdf",
        body: "",
        nonce: "sm3Lx0rDq7H9bWk2tVn5pZ",
    },
    Case {
        name: "s1-post-hmac-sm3-json",
        note: "a JSON body: content-digest (sm3) is covered",
        key: "hmac-sm3",
        method: "POST",
        url: "https://api.example.com:8443/api/v1/info/screener",
        body: r#"{"industry":"banking","min_cap":"1000000000"}"#,
        nonce: "sm3Qm8vT1cX3nRa6YdE0uJ",
    },
    Case {
        name: "s3-post-sm2-utf8",
        note: "SM2 with the default distinguishing ID over a body with non-ASCII text: the sm3 digest is over the UTF-8 bytes",
        key: "sm2",
        method: "POST",
        url: "https://api.example.com:8443/api/v1/orders",
        body: r#"{"symbol":"600000","side":"buy","qty":100,"memo":"浦发银行"}"#,
        nonce: "sm2Zx4H7pLq2Wc9Rt6Vb1N",
    },
    Case {
        name: "s3-delete-sm2-alice",
        note: "SM2 with the distinguishing ID ALICE123@YAHOO.COM (credential sm2_id), no body",
        key: "sm2-alice",
        method: "DELETE",
        url: "https://api.example.com:8443/api/v1/orders/O-20260101-0001",
        body: "",
        nonce: "sm2Hd2Kf8Ys5Bn0Xq7Tm4W",
    },
];

fn keyid(c: &Case) -> &'static str {
    match c.key {
        "hmac-sm3" => HMAC_KEYID,
        "sm2" => SM2_KEYID,
        _ => SM2_ALICE_KEYID,
    }
}

fn key(c: &Case) -> SigningKey {
    match c.key {
        "hmac-sm3" => SigningKey::HmacSm3(
            base64::engine::general_purpose::STANDARD
                .decode(SECRET_B64)
                .unwrap(),
        ),
        "sm2" => SigningKey::Sm2(Box::new(
            sm2_signing_key(&sm2_pem(), apisec_core::apps::SM2_DEFAULT_ID).unwrap(),
        )),
        _ => SigningKey::Sm2(Box::new(sm2_signing_key(&sm2_pem(), ALICE).unwrap())),
    }
}

const VECTORS: Vectors = Vectors {
    cases: CASES,
    digest: content_digest_sm3,
    keyid,
    key,
};

fn document() -> Value {
    let public_pem = std::fs::read_to_string(root().join("vector-sm2.pub.pem")).unwrap();
    json!({
        "description": "apisec national-algorithm test vectors (DATA-5; docs/national.md): RFC 9421 \
            HTTP Message Signatures with HMAC-SM3 and SM2 over SM3, and an RFC 9530-style \
            Content-Digest with the sm3 member. For each case, build the request, compute \
            content-digest, signature-input and the signature base, and compare byte for byte; \
            HMAC-SM3 signatures must match exactly. SM2 signatures are r || s (64 bytes, not DER) \
            and use deterministic nonces here; a library that draws a random nonce produces a \
            different signature that must verify with the public key and the same \
            distinguishing ID. Keys are public test material: never use them for anything else.",
        "keys": {
            "hmac-sm3": {"keyid": HMAC_KEYID, "alg": "hmac-sm3", "secret_b64": SECRET_B64},
            "sm2": {
                "keyid": SM2_KEYID, "alg": "sm2-sm3", "sm2_id": apisec_core::apps::SM2_DEFAULT_ID,
                "private_key_file": "vector-sm2.key.pem", "public_key_pem": public_pem,
            },
            "sm2-alice": {
                "keyid": SM2_ALICE_KEYID, "alg": "sm2-sm3", "sm2_id": ALICE,
                "private_key_file": "vector-sm2.key.pem", "public_key_pem": public_pem,
            },
        },
        "app_id": APP,
        "cases": VECTORS.cases_computed(),
    })
}

#[test]
fn published_vectors_are_what_the_gateway_computes() {
    VECTORS.check_published("national.json", &document());
}

fn policy() -> Policy {
    let public_pem = std::fs::read_to_string(root().join("vector-sm2.pub.pem")).unwrap();
    common::vectors::policy(json!([
        {"id": HMAC_KEYID, "alg": "hmac-sm3", "secret_env": "VECTOR_SECRET"},
        {"id": SM2_KEYID, "alg": "sm2-sm3", "public_key_pem": public_pem},
        {"id": SM2_ALICE_KEYID, "alg": "sm2-sm3", "public_key_pem": public_pem, "sm2_id": ALICE},
    ]))
}

/// Each published case, sent as published, is accepted by the gateway at its `created` time;
/// the same request with one byte of the signature base changed is refused.
#[test]
fn the_gateway_accepts_each_vector_and_refuses_it_changed() {
    VECTORS.check_decided(&policy());
}
