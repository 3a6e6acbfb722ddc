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

use std::collections::HashMap;
use std::path::PathBuf;

use apisec_core::crypto::content_digest_sm3;
use apisec_core::message::{signature_base, Connection, Request};
use apisec_core::sf;
use apisec_core::signer::{sign, SignParams, SigningKey};
use apisec_core::{DenyReason, Policy};
use base64::Engine as _;
use serde_json::{json, Value};

const APP: &str = "vector-app";
const HMAC_KEYID: &str = "vector-hmac-sm3";
const SM2_KEYID: &str = "vector-sm2";
const SM2_ALICE_KEYID: &str = "vector-sm2-alice";
const ALICE: &str = "ALICE123@YAHOO.COM";
/// The App_Secret of the vectors (base64 of 32 bytes). Public test material.
const SECRET_B64: &str = "dmVjdG9yLXNlY3JldC0wMTIzNDU2Nzg5YWJjZGVmMDE=";
/// 2026-01-01T00:00:00Z.
const CREATED: i64 = 1_767_225_600;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../vectors")
}

fn sm2_pem() -> String {
    std::fs::read_to_string(root().join("vector-sm2.key.pem")).unwrap()
}

struct Case {
    name: &'static str,
    note: &'static str,
    key: &'static str,
    method: &'static str,
    url: &'static str,
    body: &'static str,
    nonce: &'static str,
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

fn split_url(url: &str) -> (String, String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let slash = rest.find('/').unwrap();
    (scheme.into(), rest[..slash].into(), rest[slash..].into())
}

fn request(c: &Case) -> Request {
    let (scheme, authority, path_and_query) = split_url(c.url);
    let mut headers = vec![("x-app-id".to_string(), APP.to_string())];
    if !c.body.is_empty() {
        headers.push(("content-type".into(), "application/json".into()));
        headers.push((
            "content-digest".into(),
            content_digest_sm3(c.body.as_bytes()),
        ));
    }
    Request {
        conn: Connection {
            client_ip: Some("198.51.100.7".parse().unwrap()),
            tls: true,
            ..Default::default()
        },
        method: c.method.into(),
        scheme,
        authority,
        path_and_query,
        headers,
        route: None,
    }
}

fn params(c: &Case) -> SignParams {
    let mut components: Vec<String> = ["@method", "@authority", "@path", "@query", "x-app-id"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if !c.body.is_empty() {
        components.push("content-digest".into());
    }
    SignParams {
        label: "sig1".into(),
        components,
        created: CREATED,
        expires: None,
        nonce: Some(c.nonce.into()),
        keyid: match c.key {
            "hmac-sm3" => HMAC_KEYID,
            "sm2" => SM2_KEYID,
            _ => SM2_ALICE_KEYID,
        }
        .into(),
        include_alg: true,
    }
}

fn key(c: &Case) -> SigningKey {
    match c.key {
        "hmac-sm3" => SigningKey::HmacSm3(
            base64::engine::general_purpose::STANDARD
                .decode(SECRET_B64)
                .unwrap(),
        ),
        "sm2" => SigningKey::Sm2 {
            pkcs8_pem: sm2_pem(),
            id: apisec_core::apps::SM2_DEFAULT_ID.into(),
        },
        _ => SigningKey::Sm2 {
            pkcs8_pem: sm2_pem(),
            id: ALICE.into(),
        },
    }
}

/// The case as the gateway's code computes it.
fn computed(c: &Case) -> Value {
    let req = request(c);
    let p = params(c);
    let (input, signature) = sign(&req, &p, &key(c)).unwrap();
    let inner = sf::parse_dictionary(&input).unwrap();
    let list = match &inner[0].1 {
        sf::Member::InnerList(l) => l.clone(),
        sf::Member::Item(_) => panic!("signature-input member is not an inner list"),
    };
    let base = signature_base(&req, &list, usize::MAX).unwrap();
    let headers: Vec<Value> = req.headers.iter().map(|(k, v)| json!([k, v])).collect();
    json!({
        "name": c.name,
        "note": c.note,
        "key": c.key,
        "request": {"method": c.method, "url": c.url, "headers": headers, "body": c.body},
        "params": {
            "label": p.label, "components": p.components, "created": p.created, "nonce": c.nonce,
            "keyid": p.keyid, "alg": key(c).alg(),
        },
        "expected": {
            "content-digest": req.headers.iter().find(|(k, _)| k == "content-digest").map(|(_, v)| v.clone()),
            "signature-input": input,
            "signature_base": base,
            "signature": signature,
        },
    })
}

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
        "cases": CASES.iter().map(computed).collect::<Vec<_>>(),
    })
}

#[test]
fn published_vectors_are_what_the_gateway_computes() {
    let path = root().join("national.json");
    let doc = document();
    let text = serde_json::to_string_pretty(&doc).unwrap() + "\n";
    if std::env::var_os("APISEC_WRITE_VECTORS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let published = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        published, text,
        "vectors/national.json differs from what the gateway computes"
    );
}

fn policy() -> Policy {
    let public_pem = std::fs::read_to_string(root().join("vector-sm2.pub.pem")).unwrap();
    let api = |id: &str, m: &str, p: &str, level: &str| {
        json!({"id": id, "method": m, "path": p, "level": level, "service_object": "toB",
               "access": if m == "GET" { "read" } else { "write" }, "user_auth": false,
               "personal_info": level == "S3", "function": id})
    };
    let doc = json!({
        "version": 1,
        "gateway": {"replay": {"slots": 16, "entries_per_slot": 16}},
        "apis": [
            api("research", "GET", "/api/v1/info/research/{id}", "S1"),
            api("screener", "POST", "/api/v1/info/screener", "S1"),
            api("order", "POST", "/api/v1/orders", "S3"),
            api("cancel", "DELETE", "/api/v1/orders/{id}", "S3"),
        ],
        "apps": [{"id": APP, "credentials": [
            {"id": HMAC_KEYID, "alg": "hmac-sm3", "secret_env": "VECTOR_SECRET"},
            {"id": SM2_KEYID, "alg": "sm2-sm3", "public_key_pem": public_pem},
            {"id": SM2_ALICE_KEYID, "alg": "sm2-sm3", "public_key_pem": public_pem, "sm2_id": ALICE},
        ]}],
        "grants": [
            {"id": "g", "app": APP, "apis": ["research", "screener"]},
            {"id": "g3", "app": APP, "apis": ["order", "cancel"],
             "approval": {"approver": "vectors", "ticket": "V-1", "date": "2026-01-01"}},
        ],
    });
    let secrets = HashMap::from([("VECTOR_SECRET".to_string(), SECRET_B64.to_string())]);
    Policy::from_json(&doc.to_string(), &secrets).unwrap()
}

/// Each published case, sent as published, is accepted by the gateway at its `created` time;
/// the same request with one byte of the signature base changed is refused.
#[test]
fn the_gateway_accepts_each_vector_and_refuses_it_changed() {
    let policy = policy();
    for c in CASES {
        let mut req = request(c);
        let (input, signature) = sign(&req, &params(c), &key(c)).unwrap();
        req.headers.push(("signature-input".into(), input));
        req.headers.push(("signature".into(), signature));
        let store = common::fresh_store(&policy);
        let now = CREATED as u64;
        let ok = common::decide(&policy, &store, &req, c.body.as_bytes(), now);
        assert!(ok.is_ok(), "{}: refused {:?}", c.name, ok.err());

        // One byte of a covered component (the port in @authority) changed.
        let mut changed = req.clone();
        changed.authority = "api.example.com:8444".into();
        let store = common::fresh_store(&policy);
        assert_eq!(
            common::decide(&policy, &store, &changed, c.body.as_bytes(), now).err(),
            Some(DenyReason::SignatureInvalid),
            "{}",
            c.name
        );
    }
}
