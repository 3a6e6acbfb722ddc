//! Access control through the decision engine: TLS by level and certificate identity (ID-2,
//! ID-3, DATA-1, DATA-2), grants and validity (PERM-2, PERM-3, PERM-5), user dimension and
//! opt-out (PERM-1, PERM-6), lists (BWL-1, BWL-2), source ranges, lifecycle (OPS-1), suspension
//! (MON-5), automatic bans (PERM-4).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)] // test code

mod common;

use std::collections::HashMap;

use apisec_core::engine::{AuthKind, RequestContext};
use apisec_core::message::{Connection, Request};
use apisec_core::signer::{sign, SignParams, SigningKey};
use apisec_core::store::MemoryStore;
use apisec_core::timeutil::parse_rfc3339;
use apisec_core::{DenyReason, Policy};
use base64::Engine as _;
use common::fresh_store;

const SECRET_B64: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const CERT_A: &str = "aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11";
const CERT_B: &str = "bb22bb22bb22bb22bb22bb22bb22bb22bb22bb22bb22bb22bb22bb22bb22bb22";

fn key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).unwrap()
}

fn doc() -> serde_json::Value {
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    let pem = key()
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let api = |id: &str, method: &str, path: &str, level: &str, function: &str| {
        serde_json::json!({"id": id, "method": method, "path": path, "level": level, "service_object": "toB",
            "access": if method == "GET" { "read" } else { "write" }, "user_auth": false, "personal_info": false,
            "function": function})
    };
    serde_json::json!({
        "version": 1,
        "apis": [
            api("quote", "GET", "/quotes", "S0", "market_data"),
            api("news", "GET", "/news", "S1", "info"),
            api("account", "GET", "/account", "S2", "account"),
            api("order", "POST", "/orders", "S3", "trading"),
            api("draft", "GET", "/draft", "S1", "info"),
            api("old", "GET", "/old", "S1", "info"),
        ],
        "api_groups": [{"id": "trading", "apis": ["order"]}],
        "apps": [
            {"id": "a", "credentials": [
                {"id": "a-hmac", "alg": "hmac-sha256", "secret_env": "S"},
                {"id": "a-p256", "alg": "ecdsa-p256-sha256", "public_key_pem": pem},
                {"id": "a-cert", "certificate": {"sha256": CERT_A}}
            ]},
            {"id": "b", "credentials": [{"id": "b-cert", "certificate": {"sha256": CERT_B}}]}
        ],
        "grants": [
            {"id": "g-a", "app": "a", "apis": ["news", "account", "draft", "old"]},
            {"id": "g-a-trade", "app": "a", "apis": ["group:trading"],
             "approval": {"approver": "cro", "ticket": "RISK-7", "date": "2026-11-01"}},
            {"id": "g-b", "app": "b", "apis": ["news", "account"]}
        ]
    })
}

fn compile(v: &serde_json::Value) -> Policy {
    Policy::from_json(
        &v.to_string(),
        &HashMap::from([("S".to_string(), SECRET_B64.to_string())]),
    )
    .unwrap()
}

fn compile_err(v: &serde_json::Value) -> String {
    Policy::from_json(
        &v.to_string(),
        &HashMap::from([("S".to_string(), SECRET_B64.to_string())]),
    )
    .unwrap_err()
    .to_string()
}

const NOW: u64 = 1_795_990_000; // 2026-11-29T22:06:40Z, a Sunday; 06:06 Monday in Shanghai

struct Call {
    req: Request,
    body: Vec<u8>,
}

fn call(method: &str, path: &str, app: &str) -> Call {
    Call {
        req: Request {
            conn: Connection {
                client_ip: Some("203.0.113.9".parse().unwrap()),
                tls: true,
                ..Default::default()
            },
            method: method.into(),
            scheme: "https".into(),
            authority: "gw".into(),
            path_and_query: path.into(),
            headers: vec![("x-app-id".into(), app.into())],
            route: None,
        },
        body: vec![],
    }
}

fn signed(mut c: Call, keyid: &str, nonce: &str, extra: &[&str]) -> Call {
    let k = if keyid.ends_with("hmac") {
        SigningKey::Hmac(
            base64::engine::general_purpose::STANDARD
                .decode(SECRET_B64)
                .unwrap(),
        )
    } else {
        SigningKey::P256(Box::new(key()))
    };
    let mut components: Vec<String> = ["@method", "@authority", "@path", "@query", "x-app-id"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    components.extend(extra.iter().map(|s| s.to_string()));
    let p = SignParams {
        label: "s".into(),
        components,
        created: NOW as i64,
        expires: None,
        nonce: Some(nonce.into()),
        keyid: keyid.into(),
        include_alg: false,
    };
    let (i, s) = sign(&c.req, &p, &k).unwrap();
    c.req.headers.push(("signature-input".into(), i));
    c.req.headers.push(("signature".into(), s));
    c
}

fn with_cert(mut c: Call, sha: &str) -> Call {
    c.req.conn.peer_cert_sha256 = Some(sha.into());
    c
}

fn run_at(
    p: &Policy,
    store: &MemoryStore,
    c: &Call,
    now: u64,
) -> Result<RequestContext, DenyReason> {
    common::decide(p, store, &c.req, &c.body, now)
}

#[test]
fn tls_and_certificate_identity_by_level() {
    let p = compile(&doc());
    let s = fresh_store(&p);
    let run = |c: &Call| run_at(&p, &s, c, NOW);
    // plain HTTP: S0 passes, S1+ refused (DATA-1)
    let mut plain = call("GET", "/news", "a");
    plain.req.conn.tls = false;
    assert_eq!(run(&plain).err(), Some(DenyReason::TlsRequired));
    let mut plain_s0 = call("GET", "/quotes", "a");
    plain_s0.req.conn.tls = false;
    run(&plain_s0).unwrap();
    // certificate alone: S1 and S2 (ID-2, ID-3)
    assert_eq!(
        run(&with_cert(call("GET", "/news", "a"), CERT_A))
            .unwrap()
            .auth,
        Some(AuthKind::Certificate)
    );
    run(&with_cert(call("GET", "/account", "a"), CERT_A)).unwrap();
    // S3 needs the signature even with a certificate (DATA-4)
    let mut order = with_cert(call("POST", "/orders", "a"), CERT_A);
    assert_eq!(run(&order).err(), Some(DenyReason::SignatureMissing));
    order = signed(order, "a-p256", "o1", &[]);
    assert_eq!(
        run(&order).unwrap().auth,
        Some(AuthKind::CertificateAndSignature)
    );
    // b's certificate claiming to be a
    assert_eq!(
        run(&with_cert(call("GET", "/news", "a"), CERT_B)).err(),
        Some(DenyReason::CertificateMismatch)
    );
    // an unbound certificate is not a credential either
    assert_eq!(
        run(&with_cert(call("GET", "/news", "a"), &"cc".repeat(32))).err(),
        Some(DenyReason::CertificateMismatch)
    );
    // neither certificate nor signature
    assert_eq!(
        run(&call("GET", "/account", "a")).err(),
        Some(DenyReason::SignatureMissing)
    );
}

#[test]
fn grants_required_and_validity() {
    let mut d = doc();
    let p = compile(&d);
    let s = fresh_store(&p);
    // b holds no grant for the order API (PERM-2); S0 needs none
    let mut bq = call("GET", "/quotes", "b");
    bq.req.conn.tls = false;
    run_at(&p, &s, &bq, NOW).unwrap();
    d["grants"][2]["apis"] = serde_json::json!(["news"]);
    let p = compile(&d);
    assert_eq!(
        run_at(
            &p,
            &s,
            &with_cert(call("GET", "/account", "b"), CERT_B),
            NOW
        )
        .err(),
        Some(DenyReason::NoGrant)
    );

    // contract period (PERM-5)
    d["grants"][2]["not_before"] = "2026-12-01T00:00:00+08:00".into();
    d["grants"][2]["not_after"] = "2026-12-31T00:00:00+08:00".into();
    let p = compile(&d);
    let news_b = with_cert(call("GET", "/news", "b"), CERT_B);
    assert_eq!(
        run_at(&p, &s, &news_b, NOW).err(),
        Some(DenyReason::GrantNotYetValid)
    );
    run_at(
        &p,
        &s,
        &news_b,
        parse_rfc3339("2026-12-15T10:00:00+08:00").unwrap(),
    )
    .unwrap();
    assert_eq!(
        run_at(
            &p,
            &s,
            &news_b,
            parse_rfc3339("2027-01-01T00:00:00+08:00").unwrap()
        )
        .err(),
        Some(DenyReason::GrantExpired)
    );

    // trading-session window in Shanghai time, weekdays only
    d["grants"][2]["not_before"] = serde_json::Value::Null;
    d["grants"][2]["not_after"] = serde_json::Value::Null;
    d["grants"][2]["windows"] = serde_json::json!([
        {"days": ["mon", "tue", "wed", "thu", "fri"], "from": "09:30", "to": "11:30"},
        {"days": ["mon", "tue", "wed", "thu", "fri"], "from": "13:00", "to": "15:00"}
    ]);
    let p = compile(&d);
    let at = |t: &str| run_at(&p, &s, &news_b, parse_rfc3339(t).unwrap()).err();
    assert_eq!(
        at("2026-11-30T10:00:00+08:00"),
        None,
        "Monday morning session"
    );
    assert_eq!(
        at("2026-11-30T12:00:00+08:00"),
        Some(DenyReason::GrantOutsideWindow),
        "lunch break"
    );
    assert_eq!(at("2026-11-30T14:59:00+08:00"), None);
    assert_eq!(
        at("2026-11-30T15:00:00+08:00"),
        Some(DenyReason::GrantOutsideWindow)
    );
    assert_eq!(
        at("2026-11-29T10:00:00+08:00"),
        Some(DenyReason::GrantOutsideWindow),
        "Sunday"
    );
    assert_eq!(at("2026-11-30T02:00:00Z"), None, "10:00 in Shanghai");
}

#[test]
fn limited_and_single_use_grants() {
    let mut d = doc();
    d["grants"][2]["max_uses"] = 2.into();
    let p = compile(&d);
    let s = fresh_store(&p);
    let c = with_cert(call("GET", "/news", "b"), CERT_B);
    run_at(&p, &s, &c, NOW).unwrap();
    run_at(&p, &s, &c, NOW).unwrap();
    assert_eq!(
        run_at(&p, &s, &c, NOW).err(),
        Some(DenyReason::GrantExhausted)
    );
    // uses survive a reload of the same policy
    let p2 = compile(&d);
    assert_eq!(
        run_at(&p2, &s, &c, NOW).err(),
        Some(DenyReason::GrantExhausted)
    );

    let mut d = doc();
    d["grants"][2]["once"] = true.into();
    d["grants"][2]["id"] = "g-b-once".into();
    let p = compile(&d);
    run_at(&p, &s, &c, NOW).unwrap();
    assert_eq!(
        run_at(&p, &s, &c, NOW).err(),
        Some(DenyReason::GrantExhausted)
    );
}

#[test]
fn grant_validation_errors_name_the_grant() {
    let mut d = doc();
    d["grants"][1].as_object_mut().unwrap().remove("approval");
    assert!(compile_err(&d).contains(
        "grants[1].approval: grant 'g-a-trade' covers S3 APIs and needs an approval record"
    ));
    let mut d = doc();
    d["grants"][0]["apis"] = serde_json::json!(["nws"]);
    assert!(compile_err(&d).contains("grants[0].apis[0]: 'nws' matches no API"));
    let mut d = doc();
    d["grants"][0]["once"] = true.into();
    d["grants"][0]["max_uses"] = 3.into();
    assert!(compile_err(&d).contains("grants[0].once"));
    let mut d = doc();
    d["grants"][0]["timezone"] = "America/New_York".into();
    assert!(compile_err(&d).contains("grants[0].timezone"));
    let mut d = doc();
    d["grants"][0]["windows"] = serde_json::json!([{"from": "15:00", "to": "09:30"}]);
    assert!(compile_err(&d).contains("grants[0].windows[0].to"));
    let mut d = doc();
    d["grants"][0]["app"] = "ghost".into();
    assert!(compile_err(&d).contains("grants[0].app"));
    let mut d = doc();
    d["lists"] =
        serde_json::json!([{"id": "wl", "mode": "allow", "apis": ["news"], "entries": []}]);
    assert!(compile_err(&d).contains("empty whitelist"));
    let mut d = doc();
    d["lists"] = serde_json::json!([{"id": "bl", "mode": "deny", "apis": ["*"], "entries": [{"ip": "10.0.0.1/8"}]}]);
    assert!(compile_err(&d).contains("lists[0].entries[0].ip"));
    let mut d = doc();
    d["apps"][1]["credentials"][0]["certificate"]["sha256"] = CERT_A.into();
    assert!(compile_err(&d).contains("already bound to app 'a'"));
}

#[test]
fn user_dimension_opt_out_and_user_grants() {
    let mut d = doc();
    d["opted_out_users"] = serde_json::json!(["u-closed"]);
    d["grants"][0]["users"] = serde_json::json!(["u-1", "u-closed"]);
    let p = compile(&d);
    let s = fresh_store(&p);
    let with_user = |u: &str| {
        let mut c = call("GET", "/news", "a");
        c.req.headers.push(("x-user-id".into(), u.into()));
        c
    };
    let ctx = run_at(
        &p,
        &s,
        &signed(with_user("u-1"), "a-hmac", "n1", &["x-user-id"]),
        NOW,
    )
    .unwrap();
    assert_eq!(ctx.user.as_deref(), Some("u-1"));
    assert_eq!(
        run_at(
            &p,
            &s,
            &signed(with_user("u-2"), "a-hmac", "n2", &["x-user-id"]),
            NOW
        )
        .err(),
        Some(DenyReason::NoGrant)
    );
    assert_eq!(
        run_at(
            &p,
            &s,
            &signed(with_user("u-closed"), "a-hmac", "n3", &["x-user-id"]),
            NOW
        )
        .err(),
        Some(DenyReason::UserOptedOut)
    );
    // a user claim the signature does not cover does not count, and is refused
    assert_eq!(
        run_at(&p, &s, &signed(with_user("u-1"), "a-hmac", "n4", &[]), NOW).err(),
        Some(DenyReason::ComponentNotCovered)
    );
}

#[test]
fn lists_source_ranges_suspension_and_lifecycle() {
    let mut d = doc();
    d["lists"] = serde_json::json!([
        {"id": "bl", "mode": "deny", "apis": ["*"], "entries": [{"app": "b", "ip": "203.0.113.0/24"}]},
        {"id": "wl-trading", "mode": "allow", "apis": ["group:trading"], "entries": [{"ip": "198.51.100.0/24"}]}
    ]);
    d["apis"][4]["state"] = "draft".into();
    d["apis"][5]["state"] = "retired".into();
    let p = compile(&d);
    let s = fresh_store(&p);
    let run = |c: &Call| run_at(&p, &s, c, NOW).err();
    assert_eq!(
        run(&with_cert(call("GET", "/news", "b"), CERT_B)),
        Some(DenyReason::Blacklisted)
    );
    let mut other_ip = with_cert(call("GET", "/news", "b"), CERT_B);
    other_ip.req.conn.client_ip = Some("192.0.2.1".parse().unwrap());
    assert_eq!(run(&other_ip), None, "app + ip entry needs both");
    let order = signed(call("POST", "/orders", "a"), "a-p256", "o2", &[]);
    assert_eq!(run(&order), Some(DenyReason::NotWhitelisted));
    let mut order_ok = signed(call("POST", "/orders", "a"), "a-p256", "o3", &[]);
    order_ok.req.conn.client_ip = Some("198.51.100.20".parse().unwrap());
    assert_eq!(run(&order_ok), None);
    assert_eq!(
        run(&with_cert(call("GET", "/draft", "a"), CERT_A)),
        Some(DenyReason::ApiNotPublished)
    );
    assert_eq!(
        run(&with_cert(call("GET", "/old", "a"), CERT_A)),
        Some(DenyReason::ApiRetired)
    );

    let mut d = doc();
    d["api_groups"][0]["state"] = "offline".into();
    d["apps"][1]["suspended"] = true.into();
    d["apps"][0]["allowed_ips"] = serde_json::json!(["10.0.0.0/8", "2001:db8::/32"]);
    let p = compile(&d);
    let s = fresh_store(&p);
    let run = |c: &Call| run_at(&p, &s, c, NOW).err();
    assert_eq!(
        run(&signed(call("POST", "/orders", "a"), "a-p256", "o4", &[])),
        Some(DenyReason::ApiOffline)
    );
    assert_eq!(
        run(&with_cert(call("GET", "/news", "b"), CERT_B)),
        Some(DenyReason::AppSuspended)
    );
    assert_eq!(
        run(&with_cert(call("GET", "/news", "a"), CERT_A)),
        Some(DenyReason::IpNotAllowed)
    );
    let mut v6 = with_cert(call("GET", "/news", "a"), CERT_A);
    v6.req.conn.client_ip = Some("2001:db8::7".parse().unwrap());
    assert_eq!(run(&v6), None);
}

#[test]
fn bans_through_the_engine() {
    let mut d = doc();
    d["bans"] = serde_json::json!({"threshold": 2, "window_seconds": 60, "ban_seconds": 300});
    let p = compile(&d);
    let s = fresh_store(&p);
    let bans = p.bans.as_ref().unwrap();
    let ip = "203.0.113.9".parse().unwrap();
    bans.record_refusal(&s, apisec_core::state::bans::Subject::Ip(ip), NOW)
        .unwrap();
    assert!(bans
        .record_refusal(&s, apisec_core::state::bans::Subject::Ip(ip), NOW)
        .unwrap());
    // a banned IP is refused before anything else, whatever app it claims
    assert_eq!(
        run_at(
            &p,
            &s,
            &with_cert(call("GET", "/news", "a"), CERT_A),
            NOW + 1
        )
        .err(),
        Some(DenyReason::Banned)
    );
    assert!(run_at(
        &p,
        &s,
        &with_cert(call("GET", "/news", "a"), CERT_A),
        NOW + 301
    )
    .is_ok());
}
