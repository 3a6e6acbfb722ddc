//! Property tests (issue 8): sign then verify always accepts; any single-byte change of a
//! covered component, the body or the signature is refused; hiding response fields keeps every
//! byte outside the hidden members (DATA-3, ATK-1, PERM-1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)] // test code

mod common;

use std::collections::HashMap;

use apisec_core::crypto::content_digest_sha256;
use apisec_core::fields;
use apisec_core::message::{Connection, Request};
use apisec_core::Policy;
use common::{decide, fresh_store, SECRET_B64, STORE_STARTED};
use proptest::prelude::*;

const NOW: u64 = STORE_STARTED + 1000;

fn policy() -> Policy {
    let doc = serde_json::json!({
        "version": 1,
        "apis": [{"id": "order", "method": "POST", "path": "/orders/{book}", "level": "S1", "service_object": "toB",
                  "access": "write", "user_auth": false, "personal_info": false, "function": "trading"}],
        "apps": [{"id": "app-a", "credentials": [{"id": "k", "alg": "hmac-sha256", "secret_env": "S"}]}],
        "grants": [{"id": "g", "app": "app-a", "apis": ["order"]}]
    });
    Policy::from_json(
        &doc.to_string(),
        &HashMap::from([("S".to_string(), SECRET_B64.to_string())]),
    )
    .unwrap()
}

/// A signed request for `/orders/{book}?{query}` with `body`.
fn signed(book: &str, query: &str, body: &[u8], nonce: &str) -> Request {
    let mut r = Request {
        conn: Connection {
            client_ip: Some("192.0.2.1".parse().unwrap()),
            tls: true,
            ..Default::default()
        },
        method: "POST".into(),
        scheme: "https".into(),
        authority: "gw.example".into(),
        path_and_query: format!("/orders/{book}?{query}"),
        headers: vec![
            ("x-app-id".into(), "app-a".into()),
            ("content-type".into(), "application/json".into()),
            ("content-digest".into(), content_digest_sha256(body)),
        ],
        route: None,
    };
    common::sign_hmac(
        &mut r,
        [
            "@method",
            "@authority",
            "@path",
            "@query",
            "x-app-id",
            "content-digest",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        NOW,
        nonce,
        None,
    );
    r
}

fn flip(s: &str, at: usize, with: u8) -> Option<String> {
    let mut b = s.as_bytes().to_vec();
    let i = at % b.len().max(1);
    let c = b.get_mut(i)?;
    if *c == with || !with.is_ascii_graphic() {
        return None;
    }
    *c = with;
    String::from_utf8(b).ok()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn sign_then_verify_accepts(book in "[a-z0-9]{1,12}", query in "[a-z]{1,6}=[a-z0-9]{0,8}", body in "[ -~]{1,64}", nonce in "[A-Za-z0-9]{8,32}") {
        let p = policy();
        let store = fresh_store(&p);
        let body = format!("{{\"v\":{}}}", serde_json::to_string(&body).unwrap());
        let req = signed(&book, &query, body.as_bytes(), &nonce);
        prop_assert!(decide(&p, &store, &req, body.as_bytes(), NOW).is_ok());
    }

    #[test]
    fn any_single_byte_change_is_refused(book in "[a-z0-9]{1,12}", query in "[a-z]{1,6}=[a-z0-9]{1,8}", body in "[a-z]{1,32}",
                                         which in 0usize..5, at in 0usize..256, with in 33u8..127) {
        let p = policy();
        let store = fresh_store(&p);
        let body = format!("{{\"v\":\"{body}\"}}");
        let mut req = signed(&book, &query, body.as_bytes(), "n-1");
        let mut sent_body = body.clone().into_bytes();
        let changed = match which {
            0 => flip(&req.path_and_query.clone(), at, with).filter(|x| x.starts_with('/')).map(|x| req.path_and_query = x),
            1 => flip("app-a", at, with).map(|x| req.headers[0].1 = x),
            2 => flip(&body, at, with).map(|x| sent_body = x.into_bytes()),
            3 => {
                let sig = req.headers[4].1.clone();
                // the bytes of the signature value, between the colons
                let start = sig.find(':').unwrap() + 1;
                let end = sig.rfind(':').unwrap();
                let i = start + at % (end - start);
                flip(&sig, i, with).map(|x| req.headers[4].1 = x)
            }
            // hosts compare without case (RFC 9421 2.2.3): a case-only change is the same host
            _ => flip(&req.authority.clone(), at, with)
                .filter(|x| !x.eq_ignore_ascii_case(&req.authority))
                .map(|x| req.authority = x),
        };
        prop_assume!(changed.is_some());
        prop_assert!(decide(&p, &store, &req, &sent_body, NOW).is_err());
    }

    #[test]
    fn hiding_keeps_every_byte_outside_hidden_members(
        keys in proptest::collection::vec("[a-zA-Z][a-zA-Z_]{0,7}", 1..8),
        nums in proptest::collection::vec("-?[1-9][0-9]{0,30}(\\.[0-9]{1,25})?", 1..8),
        ws in "[ \n]{0,2}",
        hide in 0usize..8,
    ) {
        let members: Vec<String> = keys.iter().zip(nums.iter().cycle()).map(|(k, n)| format!("\"{k}\":{ws}{n}")).collect();
        let body = format!("{{{ws}{}{ws}}}", members.join(&format!(",{ws}")));
        let target = keys[hide % keys.len()].clone();
        let paths = vec![fields::parse_path(&target).unwrap()];
        let out = fields::filter_response(&paths, body.as_bytes()).unwrap().expect("the key is present");
        let text = String::from_utf8(out).unwrap();
        // what remains is exactly the members whose key differs (in normal form), byte for byte
        let kept: Vec<&String> = keys.iter().zip(members.iter()).filter(|(k, _)| fields::normal_name(k) != fields::normal_name(&target)).map(|(_, m)| m).collect();
        for m in &kept {
            prop_assert!(text.contains(m.as_str()), "{m} lost from {text}");
        }
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(v.as_object().unwrap().len(), kept.iter().map(|m| m.split(':').next().unwrap()).collect::<std::collections::HashSet<_>>().len());
    }
}
