//! Core-level tests of the rules issue 8 added (the e2e twins are in tests/test_attacks.py):
//! checks made again when a body completes late or under a new policy, the body time bound,
//! the held-body bound, who a refusal counts against, routing overrides, the user normal form.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)] // test code

mod common;

use std::collections::HashMap;

use apisec_core::crypto::{content_digest_sha256, SoftwareVerifier};
use apisec_core::engine::{self, begin, check_body, check_headers, Host, RequestContext};
use apisec_core::local;
use apisec_core::message::{Connection, Request};
use apisec_core::state::Batch;
use apisec_core::store::{self, MemoryStore};
use apisec_core::{DenyReason, Policy};
use common::{fresh_store, SECRET_B64, STORE_STARTED};

const NOW: u64 = STORE_STARTED + 1000;

fn policy_with(edit: impl FnOnce(&mut serde_json::Value)) -> Policy {
    let mut doc = serde_json::json!({
        "version": 1,
        "gateway": {"max_body_seconds": 10},
        "apis": [{"id": "order", "method": "POST", "path": "/orders", "level": "S1", "service_object": "toB",
                  "access": "write", "user_auth": false, "personal_info": false, "function": "trading"},
                 {"id": "quote", "method": "GET", "path": "/quotes", "level": "S0", "service_object": "toB",
                  "access": "read", "user_auth": false, "personal_info": false, "function": "market_data"}],
        "apps": [{"id": "app-a", "credentials": [{"id": "k", "alg": "hmac-sha256", "secret_env": "S"}]}],
        "grants": [{"id": "g", "app": "app-a", "apis": ["order"], "not_after": "2027-01-15T08:20:00Z"}],
        "lists": [{"id": "bl", "mode": "deny", "apis": ["*"], "entries": [{"user": "U-Frozen"}]}],
        "bans": {"threshold": 2, "window_seconds": 60, "ban_seconds": 600}
    });
    edit(&mut doc);
    Policy::from_json(
        &doc.to_string(),
        &HashMap::from([("S".to_string(), SECRET_B64.to_string())]),
    )
    .unwrap()
}

fn order(body: &[u8], nonce: &str, expires: Option<i64>, extra: &[(&str, &str)]) -> Request {
    let mut r = Request {
        conn: Connection {
            client_ip: Some("192.0.2.9".parse().unwrap()),
            tls: true,
            ..Default::default()
        },
        method: "POST".into(),
        scheme: "https".into(),
        authority: "gw".into(),
        path_and_query: "/orders".into(),
        headers: vec![
            ("x-app-id".into(), "app-a".into()),
            ("content-type".into(), "application/json".into()),
            ("content-digest".into(), content_digest_sha256(body)),
        ],
        route: None,
    };
    let mut components: Vec<String> = [
        "@method",
        "@authority",
        "@path",
        "@query",
        "x-app-id",
        "content-digest",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (k, v) in extra {
        r.headers.push((k.to_string(), v.to_string()));
        components.push(k.to_string());
    }
    common::sign_hmac(&mut r, components, NOW, nonce, expires);
    r
}

/// Headers at `t0` under `p0`, body at `t1` under `p1`, as the filter drives a held body.
fn held(
    p0: &Policy,
    p1: &Policy,
    s: &MemoryStore,
    req: &Request,
    body: &[u8],
    t0: u64,
    t1: u64,
) -> Result<RequestContext, DenyReason> {
    let meta = store::meta(s).unwrap();
    let host = Host {
        verifier: &SoftwareVerifier,
    };
    let mut ctx = RequestContext::default();
    let api = begin(p0, req).map_err(|d| d.reason)?;
    check_headers(p0, api, req, true, t0, &host, &mut ctx).map_err(|d| d.reason)?;
    check_body(p1, req, &mut ctx, body, &host, t1).map_err(|d| d.reason)?;
    let ops = engine::final_ops(
        p1,
        req.conn.client_ip,
        req.conn.client_ip,
        &ctx,
        t1,
        t1 * 1000,
    );
    let answer = local::run_local(p1, s, &meta, &Batch { ops, now: t1 });
    match answer.refused {
        Some(d) => Err(d.reason),
        None => Ok(ctx),
    }
}

#[test]
fn checks_hold_when_the_body_completes() {
    let p = policy_with(|_| {});
    let s = fresh_store(&p);
    let body = b"{\"qty\":1}";
    held(
        &p,
        &p,
        &s,
        &order(body, "n1", None, &[]),
        body,
        NOW,
        NOW + 2,
    )
    .unwrap();
    // the body took longer than max_body_seconds
    assert_eq!(
        held(
            &p,
            &p,
            &s,
            &order(body, "n2", None, &[]),
            body,
            NOW,
            NOW + 11
        )
        .unwrap_err(),
        DenyReason::BodyTimeout
    );
    // the signature expired while the body was coming
    let e = Some(NOW as i64 + 3);
    assert_eq!(
        held(&p, &p, &s, &order(body, "n3", e, &[]), body, NOW, NOW + 5).unwrap_err(),
        DenyReason::SignatureExpired
    );
    // the grant ended while the body was coming (not_after = NOW + 5 here)
    let ends =
        policy_with(|d| d["grants"][0]["not_after"] = serde_json::json!(format_time(NOW + 5)));
    let s2 = fresh_store(&ends);
    assert_eq!(
        held(
            &ends,
            &ends,
            &s2,
            &order(body, "n4", None, &[]),
            body,
            NOW,
            NOW + 8
        )
        .unwrap_err(),
        DenyReason::GrantExpired
    );
}

fn format_time(t: u64) -> String {
    // RFC 3339 in UTC, for the policy
    let days = t / 86400;
    let secs = t % 86400;
    let (y, m, d) = civil(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[test]
fn a_policy_reload_during_the_body_decides_again() {
    let p0 = policy_with(|_| {});
    let mut p1 = policy_with(|d| d["apps"][0]["suspended"] = serde_json::json!(true));
    p1.generation = 1;
    let s = fresh_store(&p0);
    let body = b"{}";
    assert_eq!(
        held(
            &p0,
            &p1,
            &s,
            &order(body, "n1", None, &[]),
            body,
            NOW,
            NOW + 1
        )
        .unwrap_err(),
        DenyReason::AppSuspended
    );
    let mut same = policy_with(|_| {});
    same.generation = 1;
    held(
        &p0,
        &same,
        &s,
        &order(body, "n2", None, &[]),
        body,
        NOW,
        NOW + 1,
    )
    .unwrap();
}

#[test]
fn held_bodies_are_bounded() {
    let p = policy_with(|d| {
        d["gateway"] = serde_json::json!({"max_body_bytes": 1000, "max_held_body_bytes": 2500})
    });
    assert_eq!(engine::admit_body(&p, 0, Some(10)).unwrap(), 10);
    assert_eq!(
        engine::admit_body(&p, 0, None).unwrap(),
        1000,
        "chunked bodies reserve the maximum"
    );
    assert_eq!(engine::admit_body(&p, 2000, Some(400)).unwrap(), 400);
    assert_eq!(
        engine::admit_body(&p, 2000, Some(600)).unwrap_err().reason,
        DenyReason::GatewayBusy
    );
}

#[test]
fn refusals_count_against_the_app_only_once_it_is_authenticated() {
    let p = policy_with(|_| {});
    let s = fresh_store(&p);
    let ip = Some("192.0.2.9".parse().unwrap());
    let mut ctx = RequestContext {
        app: Some("app-a".into()),
        ..Default::default()
    };
    let count = |ctx: &RequestContext, ip, reason| {
        let ops = engine::refusal_ops(&p, ctx, ip, ip, reason, 0);
        local::run_local(&p, &s, &store::meta(&s).unwrap(), &Batch { ops, now: NOW }).ban_started
    };
    // unauthenticated: twice against the source, which is then banned; the app is not
    count(&ctx, ip, DenyReason::SignatureInvalid);
    let note = count(&ctx, ip, DenyReason::SignatureInvalid).unwrap();
    assert!(note.starts_with("source 192.0.2.9"), "{note}");
    // authenticated, but a replay: still the source (another one here)
    ctx.auth = Some(engine::AuthKind::Signature);
    let other = Some("192.0.2.10".parse().unwrap());
    count(&ctx, other, DenyReason::NonceReplayed);
    let note = count(&ctx, other, DenyReason::NonceReplayed).unwrap();
    assert!(note.starts_with("source 192.0.2.10"), "{note}");
    // a banned source's refusals are not counted (its batch stops at the ban)
    assert_eq!(count(&ctx, other, DenyReason::NoGrant), None);
    // authenticated refusals from a source that is not banned ban the app
    let third = Some("192.0.2.11".parse().unwrap());
    count(&ctx, third, DenyReason::NoGrant);
    let note = count(&ctx, third, DenyReason::NoGrant).unwrap();
    assert!(note.starts_with("app app-a"), "{note}");
}

#[test]
fn overrides_and_user_normal_form() {
    // without bans: these refusals come from one source and would ban it
    let no_bans = |d: &mut serde_json::Value| {
        d.as_object_mut().unwrap().remove("bans");
    };
    let strip = policy_with(no_bans);
    assert!(engine::strips_header(&strip, "x-http-method-override"));
    assert!(engine::strips_header(&strip, "x-apisec-app"));
    assert!(!engine::strips_header(&strip, "x-request-id"));
    let refuse = policy_with(|d| {
        no_bans(d);
        d["gateway"]["override_headers"] = serde_json::json!("refuse");
    });
    assert!(!engine::strips_header(&refuse, "x-original-url"));
    let s = fresh_store(&refuse);
    let body = b"{}";
    let mut req = order(body, "n1", None, &[]);
    req.headers.push(("x-original-url".into(), "/admin".into()));
    assert_eq!(
        common::decide(&refuse, &s, &req, body, NOW).unwrap_err(),
        DenyReason::OverrideNotAllowed
    );
    let mut q = order(body, "n2", None, &[]);
    q.path_and_query = "/orders?_METHOD=DELETE".into();
    assert_eq!(
        common::decide(&strip, &s, &q, body, NOW).unwrap_err(),
        DenyReason::OverrideNotAllowed
    );
    // the blacklist's `U-Frozen` and a request's `u-frozen` are one user
    let listed = order(body, "n3", None, &[("x-user-id", "u-FROZEN")]);
    assert_eq!(
        common::decide(&strip, &s, &listed, body, NOW).unwrap_err(),
        DenyReason::Blacklisted
    );
}
