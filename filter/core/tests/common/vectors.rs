//! The published signing vectors' harness, shared by `tests/vectors.rs` (`vectors/signing.json`:
//! HMAC-SHA256, ECDSA P-256) and `tests/national_vectors.rs` (`vectors/national.json`:
//! HMAC-SM3, SM2): each file's cases are signed with the gateway's own code and compared byte
//! for byte with the file, then decided by the gateway (accepted) and changed by one byte
//! (refused). `APISEC_WRITE_VECTORS=1` rewrites a file after a deliberate change.

use std::path::PathBuf;

use apisec_core::message::{signature_base, Connection, Request};
use apisec_core::sf;
use apisec_core::signer::{sign, SignParams, SigningKey};
use apisec_core::{DenyReason, Policy};
use serde_json::{json, Value};

pub const APP: &str = "vector-app";
/// The App_Secret of the vectors (base64 of 32 bytes). Public test material.
pub const SECRET_B64: &str = "dmVjdG9yLXNlY3JldC0wMTIzNDU2Nzg5YWJjZGVmMDE=";
/// 2026-01-01T00:00:00Z.
pub const CREATED: i64 = 1_767_225_600;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../vectors")
}

pub struct Case {
    pub name: &'static str,
    pub note: &'static str,
    pub key: &'static str,
    pub method: &'static str,
    pub url: &'static str,
    pub body: &'static str,
    pub nonce: &'static str,
}

/// One file of vectors: its cases, the Content-Digest a body gets, and each case's key.
pub struct Vectors {
    pub cases: &'static [Case],
    pub digest: fn(&[u8]) -> String,
    pub keyid: fn(&Case) -> &'static str,
    pub key: fn(&Case) -> SigningKey,
}

fn split_url(url: &str) -> (String, String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let slash = rest.find('/').unwrap();
    (scheme.into(), rest[..slash].into(), rest[slash..].into())
}

impl Vectors {
    pub fn request(&self, c: &Case) -> Request {
        let (scheme, authority, path_and_query) = split_url(c.url);
        let mut headers = vec![("x-app-id".to_string(), APP.to_string())];
        if !c.body.is_empty() {
            headers.push(("content-type".into(), "application/json".into()));
            headers.push(("content-digest".into(), (self.digest)(c.body.as_bytes())));
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

    pub fn params(&self, c: &Case) -> SignParams {
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
            keyid: (self.keyid)(c).into(),
            include_alg: true,
        }
    }

    /// The case as the gateway's code computes it.
    pub fn computed(&self, c: &Case) -> Value {
        let req = self.request(c);
        let p = self.params(c);
        let key = (self.key)(c);
        let (input, signature) = sign(&req, &p, &key).unwrap();
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
                "keyid": p.keyid, "alg": key.alg(),
            },
            "expected": {
                "content-digest": req.headers.iter().find(|(k, _)| k == "content-digest").map(|(_, v)| v.clone()),
                "signature-input": input,
                "signature_base": base,
                "signature": signature,
            },
        })
    }

    /// Every case as computed.
    pub fn cases_computed(&self) -> Vec<Value> {
        self.cases.iter().map(|c| self.computed(c)).collect()
    }

    /// `vectors/<file>` is exactly `doc` (rewritten first with `APISEC_WRITE_VECTORS=1`).
    pub fn check_published(&self, file: &str, doc: &Value) {
        let path = root().join(file);
        let text = serde_json::to_string_pretty(doc).unwrap() + "\n";
        if std::env::var_os("APISEC_WRITE_VECTORS").is_some() {
            std::fs::write(&path, &text).unwrap();
        }
        let published = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            published, text,
            "vectors/{file} differs from what the gateway computes"
        );
    }

    /// Each case, sent as published, is accepted by the gateway at its `created` time; the same
    /// request with one byte of the signature base changed is refused.
    pub fn check_decided(&self, policy: &Policy) {
        for c in self.cases {
            let mut req = self.request(c);
            let (input, signature) = sign(&req, &self.params(c), &(self.key)(c)).unwrap();
            req.headers.push(("signature-input".into(), input));
            req.headers.push(("signature".into(), signature));
            let store = super::fresh_store(policy);
            let now = CREATED as u64;
            let ok = super::decide(policy, &store, &req, c.body.as_bytes(), now);
            assert!(ok.is_ok(), "{}: refused {:?}", c.name, ok.err());

            // One byte of a covered component (the port in @authority) changed.
            let mut changed = req.clone();
            changed.authority = "api.example.com:8444".into();
            let store = super::fresh_store(policy);
            assert_eq!(
                super::decide(policy, &store, &changed, c.body.as_bytes(), now).err(),
                Some(DenyReason::SignatureInvalid),
                "{}",
                c.name
            );
        }
    }
}

/// The policy a vector file's cases are decided under: the same four APIs and grants for every
/// file, with that file's credentials (their secret, where one has it, in `VECTOR_SECRET`).
pub fn policy(credentials: Value) -> Policy {
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
        "apps": [{"id": APP, "credentials": credentials}],
        "grants": [
            {"id": "g", "app": APP, "apis": ["research", "screener"]},
            {"id": "g3", "app": APP, "apis": ["order", "cancel"],
             "approval": {"approver": "vectors", "ticket": "V-1", "date": "2026-01-01"}},
        ],
    });
    let secrets =
        std::collections::HashMap::from([("VECTOR_SECRET".to_string(), SECRET_B64.to_string())]);
    Policy::from_json(&doc.to_string(), &secrets).unwrap()
}
