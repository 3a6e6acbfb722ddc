//! The decision engine end to end in core, with a negative table: every way a request can be
//! wrong gets its own code (ID-1, ID-2, ID-3, DATA-3, DATA-4, ATK-1, LVL-1).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)] // test code

mod common;

use std::collections::HashMap;

use apisec_core::crypto::content_digest_sha256;
use apisec_core::engine::{find_api, RequestContext};
use apisec_core::message::{Connection, Request};
use apisec_core::signer::{sign, SignParams, SigningKey};
use apisec_core::store::MemoryStore;
use apisec_core::{DenyReason, Policy};
use base64::Engine as _;
use common::fresh_store;

const NOW: u64 = 1_800_000_000;
const SECRET_B64: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const P256_PRIV_HEX: &str = "529b85f3597e90ec5b8dfed3e26352bf4af9b4debb1a29bbae77fa105a5c603b";

fn p256_key() -> p256::ecdsa::SigningKey {
    let bytes: Vec<u8> = (0..64)
        .step_by(2)
        .map(|i| u8::from_str_radix(&P256_PRIV_HEX[i..i + 2], 16).unwrap())
        .collect();
    p256::ecdsa::SigningKey::from_slice(&bytes).unwrap()
}

fn policy() -> Policy {
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    let pem = p256_key()
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let doc = serde_json::json!({
        "version": 1,
        "gateway": {"clock_skew_seconds": 300, "nonce_lifetime_seconds": 600, "max_signature_header_bytes": 2048,
                    "replay": {"slots": 16, "entries_per_slot": 16}},
        "apis": [
            {"id": "quote", "method": "GET", "path": "/quotes/{symbol}", "level": "S0", "service_object": "toC",
             "access": "read", "user_auth": false, "personal_info": false, "function": "market_data"},
            {"id": "news", "method": "GET", "path": "/news", "level": "S1", "service_object": "toB",
             "access": "read", "user_auth": false, "personal_info": false, "function": "info"},
            {"id": "order", "method": "POST", "path": "/orders", "level": "S3", "service_object": "toC",
             "access": "write", "user_auth": true, "personal_info": true, "function": "trading"},
            {"id": "account", "method": "GET", "path": "/accounts/{id}", "level": "S2", "service_object": "toC",
             "access": "read", "user_auth": true, "personal_info": true, "function": "account"}
        ],
        "grants": [
            {"id": "g-news", "app": "app-a", "apis": ["news", "account"]},
            {"id": "g-trade", "app": "app-a", "functions": ["trading"],
             "approval": {"approver": "risk-officer", "ticket": "CHG-1", "date": "2026-11-01"}}
        ],
        "apps": [{"id": "app-a", "credentials": [
            {"id": "a-hmac", "alg": "hmac-sha256", "secret_env": "SECRET_A"},
            {"id": "a-p256", "alg": "ecdsa-p256-sha256", "public_key_pem": pem}
        ]}]
    });
    let secrets = HashMap::from([("SECRET_A".to_string(), SECRET_B64.to_string())]);
    Policy::from_json(&doc.to_string(), &secrets).unwrap()
}

fn hmac_key() -> SigningKey {
    SigningKey::Hmac(
        base64::engine::general_purpose::STANDARD
            .decode(SECRET_B64)
            .unwrap(),
    )
}

struct Case {
    req: Request,
    body: Vec<u8>,
}

fn request(method: &str, path: &str, body: &[u8]) -> Case {
    let mut headers = vec![("x-app-id".to_string(), "app-a".to_string())];
    if !body.is_empty() {
        headers.push(("content-digest".into(), content_digest_sha256(body)));
        headers.push(("content-type".into(), "application/json".into()));
    }
    Case {
        req: Request {
            conn: Connection {
                client_ip: Some("127.0.0.1".parse().unwrap()),
                tls: true,
                ..Default::default()
            },
            method: method.into(),
            scheme: "https".into(),
            authority: "gw.example.com".into(),
            path_and_query: path.into(),
            headers,
            route: None,
        },
        body: body.to_vec(),
    }
}

fn params(keyid: &str, nonce: &str, with_digest: bool) -> SignParams {
    let mut components: Vec<String> = ["@method", "@authority", "@path", "@query", "x-app-id"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if with_digest {
        components.push("content-digest".into());
    }
    SignParams {
        label: "sig1".into(),
        components,
        created: NOW as i64,
        expires: None,
        nonce: Some(nonce.into()),
        keyid: keyid.into(),
        include_alg: true,
    }
}

fn signed(mut c: Case, p: &SignParams, key: &SigningKey) -> Case {
    let (input, sig) = sign(&c.req, p, key).unwrap();
    c.req.headers.push(("signature-input".into(), input));
    c.req.headers.push(("signature".into(), sig));
    c
}

fn run(policy: &Policy, store: &MemoryStore, c: &Case) -> Result<RequestContext, DenyReason> {
    common::decide(policy, store, &c.req, &c.body, NOW)
}

fn header(c: &Case, name: &str) -> String {
    c.req
        .headers
        .iter()
        .find(|(k, _)| k == name)
        .unwrap()
        .1
        .clone()
}

fn set_header(c: &mut Case, name: &str, value: &str) {
    for (k, v) in c.req.headers.iter_mut() {
        if k == name {
            *v = value.to_string();
        }
    }
}

#[test]
fn accepted_per_level() {
    let p = policy();
    let store = fresh_store(&p);
    // S0: a known App_ID is enough (ID-1)
    let ctx = run(&p, &store, &request("GET", "/quotes/600000", b"")).unwrap();
    assert_eq!(ctx.api.as_deref(), Some("quote"));
    // S1 with HMAC (ID-2)
    run(
        &p,
        &store,
        &signed(
            request("GET", "/news?page=2", b""),
            &params("a-hmac", "n1", false),
            &hmac_key(),
        ),
    )
    .unwrap();
    // S1 with a key pair
    let ec = SigningKey::P256(Box::new(p256_key()));
    run(
        &p,
        &store,
        &signed(
            request("GET", "/news", b""),
            &params("a-p256", "n2", false),
            &ec,
        ),
    )
    .unwrap();
    // S2 with a key pair (ID-3)
    run(
        &p,
        &store,
        &signed(
            request("GET", "/accounts/42", b""),
            &params("a-p256", "n3", false),
            &ec,
        ),
    )
    .unwrap();
    // S3 with a body: evidence recorded (DATA-4)
    let body = br#"{"symbol":"600000","qty":100}"#;
    let ctx = run(
        &p,
        &store,
        &signed(
            request("POST", "/orders", body),
            &params("a-p256", "n4", true),
            &ec,
        ),
    )
    .unwrap();
    let ev = ctx.evidence.expect("S3 evidence");
    assert!(ev.signature_base.contains("\"content-digest\": sha-256=:"));
    assert_eq!(ev.keyid, "a-p256");
}

/// The negative table: each row breaks one thing and expects exactly one code.
#[test]
fn negative_table() {
    let p = policy();
    let ec = || SigningKey::P256(Box::new(p256_key()));
    let body = br#"{"symbol":"600000","qty":100}"#.to_vec();
    type Build = Box<dyn Fn() -> Case>;
    let order = move |n: &str| {
        signed(
            request("POST", "/orders", &body),
            &params("a-p256", n, true),
            &ec(),
        )
    };
    let news = |prm: SignParams| signed(request("GET", "/news", b""), &prm, &hmac_key());

    let rows: Vec<(&str, Build, DenyReason)> = vec![
        (
            "tampered header",
            Box::new(move || {
                let mut c = news(params("a-hmac", "t1", false));
                c.req.path_and_query = "/news?page=9".into();
                c
            }),
            DenyReason::SignatureInvalid,
        ),
        (
            "tampered body",
            Box::new({
                let order = order.clone();
                move || {
                    let mut c = order("t2");
                    c.body[3] ^= 1;
                    c
                }
            }),
            DenyReason::DigestMismatch,
        ),
        (
            "wrong digest, re-signed",
            Box::new(move || {
                let mut c = request("POST", "/orders", br#"{"qty":1}"#);
                set_header(&mut c, "content-digest", &content_digest_sha256(b"other"));
                signed(
                    c,
                    &params("a-p256", "t3", true),
                    &SigningKey::P256(Box::new(p256_key())),
                )
            }),
            DenyReason::DigestMismatch,
        ),
        (
            "body without content-digest",
            Box::new(move || {
                let mut c = request("POST", "/orders", br#"{"qty":1}"#);
                c.req.headers.retain(|(k, _)| k != "content-digest");
                signed(
                    c,
                    &params("a-p256", "t4", false),
                    &SigningKey::P256(Box::new(p256_key())),
                )
            }),
            DenyReason::DigestMissing,
        ),
        (
            "digest present but not covered",
            Box::new(move || {
                signed(
                    request("POST", "/orders", br#"{"qty":1}"#),
                    &params("a-p256", "t5", false),
                    &SigningKey::P256(Box::new(p256_key())),
                )
            }),
            DenyReason::ComponentNotCovered,
        ),
        (
            "missing covered component x-app-id",
            Box::new(move || {
                let mut prm = params("a-hmac", "t6", false);
                prm.components.retain(|c| c != "x-app-id");
                news(prm)
            }),
            DenyReason::ComponentNotCovered,
        ),
        (
            "missing nonce",
            Box::new(move || {
                let mut prm = params("a-hmac", "x", false);
                prm.nonce = None;
                news(prm)
            }),
            DenyReason::NonceMissing,
        ),
        (
            "created too old",
            Box::new(move || {
                let mut prm = params("a-hmac", "t7", false);
                prm.created -= 301;
                news(prm)
            }),
            DenyReason::CreatedTooOld,
        ),
        (
            "created in future",
            Box::new(move || {
                let mut prm = params("a-hmac", "t8", false);
                prm.created += 301;
                news(prm)
            }),
            DenyReason::CreatedInFuture,
        ),
        (
            "expired",
            Box::new(move || {
                let mut prm = params("a-hmac", "t9", false);
                prm.expires = Some(NOW as i64 - 1);
                news(prm)
            }),
            DenyReason::SignatureExpired,
        ),
        (
            "unknown keyid",
            Box::new(move || news(params("nope", "t10", false))),
            DenyReason::UnknownKey,
        ),
        (
            "alg mismatch",
            Box::new(move || {
                let mut c = news(params("a-hmac", "t11", false));
                let v = header(&c, "signature-input").replace("hmac-sha256", "ecdsa-p256-sha256");
                set_header(&mut c, "signature-input", &v);
                c
            }),
            DenyReason::AlgMismatch,
        ),
        (
            "hmac on S3",
            Box::new(move || {
                signed(
                    request("POST", "/orders", br#"{"q":1}"#),
                    &params("a-hmac", "t12", true),
                    &hmac_key(),
                )
            }),
            DenyReason::CredentialNotAllowed,
        ),
        (
            "hmac on S2",
            Box::new(move || {
                signed(
                    request("GET", "/accounts/1", b""),
                    &params("a-hmac", "t13", false),
                    &hmac_key(),
                )
            }),
            DenyReason::CredentialNotAllowed,
        ),
        (
            "duplicate labels",
            Box::new(move || {
                let mut c = news(params("a-hmac", "t14", false));
                let v = header(&c, "signature-input");
                set_header(&mut c, "signature-input", &format!("{v}, {v}"));
                c
            }),
            DenyReason::SignatureMalformed,
        ),
        (
            "two signatures",
            Box::new(move || {
                let mut c = news(params("a-hmac", "t15", false));
                let v = header(&c, "signature-input");
                set_header(
                    &mut c,
                    "signature-input",
                    &format!("{v}, {}", v.replacen("sig1", "sig2", 1)),
                );
                c
            }),
            DenyReason::SignatureAmbiguous,
        ),
        (
            "label mismatch",
            Box::new(move || {
                let mut c = news(params("a-hmac", "t16", false));
                let v = header(&c, "signature").replacen("sig1", "sig9", 1);
                set_header(&mut c, "signature", &v);
                c
            }),
            DenyReason::SignatureMalformed,
        ),
        (
            "malformed signature-input",
            Box::new(move || {
                let mut c = news(params("a-hmac", "t17", false));
                set_header(&mut c, "signature-input", "sig1=(\"@method\"");
                c
            }),
            DenyReason::SignatureMalformed,
        ),
        (
            "malformed signature",
            Box::new(move || {
                let mut c = news(params("a-hmac", "t18", false));
                set_header(&mut c, "signature", "sig1=:@@@:");
                c
            }),
            DenyReason::SignatureMalformed,
        ),
        (
            "oversized signature header",
            Box::new(move || {
                let mut c = news(params("a-hmac", "t19", false));
                set_header(&mut c, "signature", &format!("sig1=:{}:", "A".repeat(4000)));
                c
            }),
            DenyReason::HeaderTooLarge,
        ),
        (
            "duplicate signature header",
            Box::new(move || {
                let mut c = news(params("a-hmac", "t20", false));
                let v = header(&c, "signature");
                c.req.headers.push(("signature".into(), v));
                c
            }),
            DenyReason::DuplicateHeader,
        ),
        (
            "duplicate x-app-id",
            Box::new(move || {
                let mut c = news(params("a-hmac", "t21", false));
                c.req.headers.push(("x-app-id".into(), "app-b".into()));
                c
            }),
            DenyReason::DuplicateHeader,
        ),
        (
            "no signature on S1",
            Box::new(|| request("GET", "/news", b"")),
            DenyReason::SignatureMissing,
        ),
        (
            "no app id",
            Box::new(|| {
                let mut c = request("GET", "/quotes/1", b"");
                c.req.headers.clear();
                c
            }),
            DenyReason::AppIdMissing,
        ),
        (
            "unknown app",
            Box::new(|| {
                let mut c = request("GET", "/quotes/1", b"");
                set_header(&mut c, "x-app-id", "ghost");
                c
            }),
            DenyReason::UnknownApp,
        ),
        (
            "unknown api",
            Box::new(|| request("GET", "/admin", b"")),
            DenyReason::UnknownApi,
        ),
        (
            "wrong method",
            Box::new(|| request("DELETE", "/news", b"")),
            DenyReason::UnknownApi,
        ),
        (
            "signature by another key",
            Box::new(move || {
                let other = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
                signed(
                    request("GET", "/accounts/1", b""),
                    &params("a-p256", "t22", false),
                    &SigningKey::P256(Box::new(other)),
                )
            }),
            DenyReason::SignatureInvalid,
        ),
    ];
    for (name, build, want) in rows {
        let store = fresh_store(&p);
        assert_eq!(run(&p, &store, &build()).err(), Some(want), "{name}");
    }
}

#[test]
fn replayed_request_refused_and_a_body_refusal_spends_the_nonce() {
    let p = policy();
    let store = fresh_store(&p);
    let c = signed(
        request("GET", "/news", b""),
        &params("a-hmac", "once", false),
        &hmac_key(),
    );
    run(&p, &store, &c).unwrap();
    assert_eq!(run(&p, &store, &c).err(), Some(DenyReason::NonceReplayed));

    // A signed request with a body spends its nonce with its headers (one trip to the store,
    // issue 24): a body that fails its digest has spent it, and the same signed headers with the
    // right body are a replay; the client signs again.
    let ec = SigningKey::P256(Box::new(p256_key()));
    let good = signed(
        request("POST", "/orders", b"{}"),
        &params("a-p256", "keep", true),
        &ec,
    );
    let mut bad = Case {
        req: good.req.clone(),
        body: b"{}!".to_vec(),
    };
    assert_eq!(
        run(&p, &store, &bad).err(),
        Some(DenyReason::DigestMismatch)
    );
    bad.body = b"{}".to_vec();
    assert_eq!(run(&p, &store, &bad).err(), Some(DenyReason::NonceReplayed));
    let again = signed(
        request("POST", "/orders", b"{}"),
        &params("a-p256", "keep-2", true),
        &ec,
    );
    run(&p, &store, &again).unwrap();
}

/// The host reads TLS and client-certificate facts only when `needs_transport` says the decision
/// looks at them: never skipped for S1 and above (ID-2, ID-3, DATA-1), skipped for S0; a
/// request that matches no API is refused as unknown_api before any of them is read.
#[test]
fn transport_facts_are_read_for_s1_and_above_only() {
    use apisec_core::engine::needs_transport;
    let p = policy();
    let needs = |method: &str, path: &str| {
        needs_transport(find_api(&p, &request(method, path, b"").req).unwrap())
    };
    assert!(!needs("GET", "/quotes/600000"));
    assert!(needs("GET", "/news"));
    assert!(needs("GET", "/accounts/42"));
    assert!(needs("POST", "/orders"));
    for (method, path) in [("GET", "/nowhere"), ("DELETE", "/news")] {
        let refused = find_api(&p, &request(method, path, b"").req).unwrap_err();
        assert_eq!(refused.reason, DenyReason::UnknownApi);
    }
    // Without those facts an S1 request is refused, never let through.
    let store = fresh_store(&p);
    let mut c = signed(
        request("GET", "/news", b""),
        &params("a-hmac", "t1", false),
        &hmac_key(),
    );
    c.req.conn = Connection::default();
    assert_eq!(run(&p, &store, &c).unwrap_err(), DenyReason::TlsRequired);
}
