//! The request lifecycle driven natively, event by event, as the filter drives it in Envoy:
//! the rules that used to sit in the glue (issue 9) are tested here: the content-length bound,
//! the S0 early allow, holding a signed body, trailers on a signed API, a 429 from a limiter
//! after the filter, withholding a response that cannot be filtered, an abandoned upload, and
//! each request counted once by its outcome.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)] // test code

mod common;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use apisec_core::crypto::{content_digest_sha256, SoftwareVerifier};
use apisec_core::lifecycle::{
    Action, Config, Count, Env, HostError, HostFacts, Step, Stream, Transport,
};
use apisec_core::message::Request;
use apisec_core::state::{Answer, Op};
use apisec_core::store::{self, MemoryStore};
use apisec_core::{DenyReason, Policy};
use common::{fresh_store, SECRET_B64, STORE_STARTED};

const NOW: u64 = STORE_STARTED + 1000;

struct FakeHost {
    now: Cell<Option<u64>>,
    request_body: RefCell<Vec<u8>>,
    response_headers: RefCell<HashMap<String, String>>,
    response_body: RefCell<Vec<u8>>,
    transport_asked: Cell<u32>,
    /// The policy in force now, as the VM's root context last loaded it (None: never reloaded).
    current: RefCell<Option<Config>>,
}

impl FakeHost {
    fn new() -> FakeHost {
        FakeHost {
            now: Cell::new(Some(NOW)),
            request_body: RefCell::new(Vec::new()),
            response_headers: RefCell::new(HashMap::from([(
                ":status".to_string(),
                "200".to_string(),
            )])),
            response_body: RefCell::new(Vec::new()),
            transport_asked: Cell::new(0),
            current: RefCell::new(None),
        }
    }
}

impl HostFacts for FakeHost {
    fn now(&self) -> Option<u64> {
        self.now.get()
    }
    fn transport(&self) -> Transport {
        self.transport_asked.set(self.transport_asked.get() + 1);
        Transport {
            tls: true,
            ..Default::default()
        }
    }
    fn request_body(&self, size: usize) -> Result<Vec<u8>, HostError> {
        Ok(self.request_body.borrow()[..size].to_vec())
    }
    fn response_header(&self, name: &str) -> Option<String> {
        self.response_headers.borrow().get(name).cloned()
    }
    fn response_body(&self, size: usize) -> Result<Vec<u8>, HostError> {
        Ok(self.response_body.borrow()[..size].to_vec())
    }
    fn current_config(&self) -> Option<Config> {
        self.current.borrow().clone()
    }
}

fn policy(bans: bool) -> Policy {
    let mut doc = serde_json::json!({
        "version": 1,
        "gateway": {"max_body_bytes": 1000},
        "apis": [{"id": "order", "method": "POST", "path": "/orders", "level": "S1", "service_object": "toB",
                  "access": "write", "user_auth": false, "personal_info": false, "function": "trading"},
                 {"id": "account", "method": "GET", "path": "/accounts", "level": "S1", "service_object": "toB",
                  "access": "read", "user_auth": false, "personal_info": true, "function": "account"},
                 {"id": "quote", "method": "POST", "path": "/quotes", "level": "S0", "service_object": "toB",
                  "access": "read", "user_auth": false, "personal_info": false, "function": "market_data"}],
        "apps": [{"id": "app-a", "credentials": [{"id": "k", "alg": "hmac-sha256", "secret_env": "S"}]}],
        "grants": [{"id": "g", "app": "app-a", "apis": ["order"]},
                   {"id": "g-acct", "app": "app-a", "apis": ["account"], "hide_response_fields": ["mobile"]}]
    });
    if bans {
        doc["bans"] = serde_json::json!({"threshold": 5, "window_seconds": 60, "ban_seconds": 60});
    }
    Policy::from_json(
        &doc.to_string(),
        &HashMap::from([("S".to_string(), SECRET_B64.to_string())]),
    )
    .unwrap()
}

fn signed_pairs(method: &str, path: &str, body: &[u8], nonce: &str) -> Vec<(String, Vec<u8>)> {
    let mut r = Request {
        method: method.into(),
        scheme: "https".into(),
        authority: "gw".into(),
        path_and_query: path.into(),
        headers: vec![("x-app-id".into(), "app-a".into())],
        route: None,
        ..Default::default()
    };
    let mut components: Vec<String> = ["@method", "@authority", "@path", "@query", "x-app-id"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if !body.is_empty() {
        r.headers
            .push(("content-type".into(), "application/json".into()));
        r.headers
            .push(("content-digest".into(), content_digest_sha256(body)));
        r.headers
            .push(("content-length".into(), body.len().to_string()));
        components.push("content-digest".into());
    }
    common::sign_hmac(&mut r, components, NOW, nonce, None);
    let mut pairs: Vec<(String, Vec<u8>)> = vec![
        (":method".into(), method.into()),
        (":scheme".into(), b"https".to_vec()),
        (":authority".into(), b"gw".to_vec()),
        (":path".into(), path.into()),
        ("x-request-id".into(), b"rid-1".to_vec()),
    ];
    pairs.extend(r.headers.into_iter().map(|(k, v)| (k, v.into_bytes())));
    pairs
}

struct Rig {
    store: MemoryStore,
    host: FakeHost,
    held: Cell<u64>,
    config: Config,
}

impl Rig {
    fn new(bans: bool) -> Rig {
        let p = policy(bans);
        let store = fresh_store(&p);
        let meta = store::meta(&store).unwrap();
        Rig {
            store,
            host: FakeHost::new(),
            held: Cell::new(0),
            config: Config {
                policy: Arc::new(p),
                meta: Arc::new(meta),
            },
        }
    }
    fn env(&self) -> Env<'_> {
        Env {
            store: &self.store,
            verifier: &SoftwareVerifier,
            host: &self.host,
            held: &self.held,
            chain: None,
        }
    }
}

fn refused(step: &Step) -> Option<(u32, String)> {
    match &step.action {
        Action::Refuse { status, body, .. } => {
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            Some((*status, v["error"].as_str().unwrap().to_string()))
        }
        _ => None,
    }
}

/// The code of the request's audit record as decided so far.
fn audit_code(s: &Stream) -> Option<String> {
    code_in(&s.record_so_far()?)
}

fn code_in(record: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(record).unwrap();
    v.get("code").and_then(|c| c.as_str()).map(str::to_string)
}

#[test]
fn a_signed_body_is_held_verified_then_forwarded_and_counted_once() {
    let rig = Rig::new(false);
    let body = br#"{"qty":1}"#;
    *rig.host.request_body.borrow_mut() = body.to_vec();
    let mut s = Stream::new(rig.config.clone());
    let step = s.on_request_headers(
        Ok(signed_pairs("POST", "/orders", body, "n1")),
        Some("192.0.2.1:5000"),
        false,
        &rig.env(),
    );
    assert_eq!(step.action, Action::Pause);
    assert_eq!(
        rig.held.get(),
        body.len() as u64,
        "the declared body is counted as held"
    );
    assert_eq!(
        s.on_request_body(4, false, &rig.env()).action,
        Action::Pause
    );
    let step = s.on_request_body(body.len(), true, &rig.env());
    assert_eq!(step.action, Action::Continue);
    assert!(step.set_identity);
    assert!(s.identity_headers().any(|h| h == ("x-apisec-app", "app-a")));
    assert_eq!(audit_code(&s), None);
    assert_eq!(rig.held.get(), 0, "released once decided");
    assert!(
        step.counts.is_empty(),
        "allowed requests are counted when the stream ends"
    );
    assert_eq!(
        s.on_response_headers(false, &rig.env()).action,
        Action::Continue
    );
    assert_eq!(s.on_log(&rig.env()).counts, vec![Count::Allowed]);
}

#[test]
fn content_length_over_the_bound_is_refused_at_the_headers() {
    let rig = Rig::new(false);
    let mut pairs = signed_pairs("POST", "/orders", b"{}", "n1");
    for (k, v) in pairs.iter_mut() {
        if k == "content-length" {
            *v = b"5000".to_vec();
        }
    }
    let mut s = Stream::new(rig.config.clone());
    let step = s.on_request_headers(Ok(pairs), Some("192.0.2.1:5000"), false, &rig.env());
    assert_eq!(refused(&step), Some((413, "body_too_large".into())));
    assert_eq!(step.counts, vec![Count::Denied(DenyReason::BodyTooLarge)]);
    assert!(
        s.on_log(&rig.env()).counts.is_empty(),
        "counted once, when refused"
    );
}

#[test]
fn s0_goes_through_at_the_headers_without_transport_facts() {
    let rig = Rig::new(false);
    let pairs: Vec<(String, Vec<u8>)> = vec![
        (":method".into(), b"POST".to_vec()),
        (":path".into(), b"/quotes".to_vec()),
        ("x-app-id".into(), b"app-a".to_vec()),
        ("x-apisec-app".into(), b"forged".to_vec()),
        ("x-http-method-override".into(), b"DELETE".to_vec()),
    ];
    let mut s = Stream::new(rig.config.clone());
    let step = s.on_request_headers(Ok(pairs), Some("192.0.2.1:5000"), false, &rig.env());
    assert_eq!(
        step.action,
        Action::Continue,
        "S0 does not wait for its body"
    );
    assert_eq!(
        step.remove_headers,
        vec![
            "x-apisec-app".to_string(),
            "x-http-method-override".to_string()
        ]
    );
    assert_eq!(rig.host.transport_asked.get(), 0);
    assert_eq!(rig.held.get(), 0);
    assert_eq!(
        s.on_request_body(10, true, &rig.env()).action,
        Action::Continue
    );
}

#[test]
fn trailers_on_a_held_signed_request_are_refused() {
    let rig = Rig::new(false);
    let mut s = Stream::new(rig.config.clone());
    s.on_request_headers(
        Ok(signed_pairs("POST", "/orders", b"{}", "n1")),
        Some("192.0.2.1:5000"),
        false,
        &rig.env(),
    );
    let step = s.on_request_trailers(&rig.env());
    assert_eq!(refused(&step), Some((400, "malformed_header".into())));
    assert_eq!(rig.held.get(), 0);
}

#[test]
fn a_limiters_429_becomes_a_refusal_in_audit_and_counts() {
    let rig = Rig::new(true);
    let mut s = Stream::new(rig.config.clone());
    let step = s.on_request_headers(
        Ok(signed_pairs("POST", "/orders", b"", "n1")),
        Some("192.0.2.1:5000"),
        true,
        &rig.env(),
    );
    assert_eq!(step.action, Action::Continue);
    rig.host
        .response_headers
        .borrow_mut()
        .insert(":status".into(), "429".into());
    let step = s.on_response_headers(true, &rig.env());
    assert_eq!(
        step.action,
        Action::Continue,
        "the caller gets the limiter's own 429"
    );
    assert_eq!(audit_code(&s).as_deref(), Some("rate_limited"));
    assert_eq!(step.counts, vec![Count::Denied(DenyReason::RateLimited)]);
    assert!(
        s.on_log(&rig.env()).counts.is_empty(),
        "not also counted as allowed"
    );
}

#[test]
fn a_response_that_cannot_be_filtered_is_withheld() {
    for (encoding, body, code) in [
        (None, &b"<html>mobile</html>"[..], "response_unfilterable"),
        (Some("gzip"), &b"{}"[..], "response_unfilterable"),
    ] {
        let rig = Rig::new(false);
        let mut s = Stream::new(rig.config.clone());
        let step = s.on_request_headers(
            Ok(signed_pairs("GET", "/accounts", b"", "n1")),
            Some("192.0.2.1:5000"),
            true,
            &rig.env(),
        );
        assert_eq!(step.action, Action::Continue);
        if let Some(e) = encoding {
            rig.host
                .response_headers
                .borrow_mut()
                .insert("content-encoding".into(), e.into());
            let step = s.on_response_headers(false, &rig.env());
            assert_eq!(refused(&step), Some((502, code.into())));
            continue;
        }
        assert_eq!(
            s.on_response_headers(false, &rig.env()).action,
            Action::Pause
        );
        *rig.host.response_body.borrow_mut() = body.to_vec();
        let step = s.on_response_body(body.len(), true, &rig.env());
        assert_eq!(refused(&step), Some((502, code.into())));
        assert!(
            s.on_log(&rig.env()).counts.is_empty(),
            "withheld: a denial only"
        );
    }
    // a JSON response: the hidden field is cut, every other byte kept
    let rig = Rig::new(false);
    let mut s = Stream::new(rig.config.clone());
    s.on_request_headers(
        Ok(signed_pairs("GET", "/accounts", b"", "n1")),
        Some("192.0.2.1:5000"),
        true,
        &rig.env(),
    );
    assert_eq!(
        s.on_response_headers(false, &rig.env()).action,
        Action::Pause
    );
    let body = br#"{"balance": 10.010, "mobile": "138"}"#;
    *rig.host.response_body.borrow_mut() = body.to_vec();
    let step = s.on_response_body(body.len(), true, &rig.env());
    assert_eq!(
        step.response_body.as_deref(),
        Some(&br#"{"balance": 10.010}"#[..])
    );
    assert_eq!(s.on_log(&rig.env()).counts, vec![Count::Allowed]);
}

#[test]
fn an_abandoned_upload_is_audited_and_released() {
    let rig = Rig::new(false);
    let mut s = Stream::new(rig.config.clone());
    s.on_request_headers(
        Ok(signed_pairs("POST", "/orders", br#"{"qty":1}"#, "n1")),
        Some("192.0.2.1:5000"),
        false,
        &rig.env(),
    );
    assert!(rig.held.get() > 0);
    let step = s.on_log(&rig.env());
    assert_eq!(
        code_in(step.audit.as_deref().unwrap()).as_deref(),
        Some("request_abandoned")
    );
    assert_eq!(
        step.counts,
        vec![
            Count::Abandoned,
            Count::Denied(DenyReason::RequestAbandoned)
        ]
    );
    assert_eq!(rig.held.get(), 0);
}

#[test]
fn no_clock_fails_closed() {
    let rig = Rig::new(false);
    rig.host.now.set(None);
    let mut s = Stream::new(rig.config.clone());
    let step = s.on_request_headers(
        Ok(signed_pairs("POST", "/orders", b"", "n1")),
        Some("192.0.2.1:5000"),
        true,
        &rig.env(),
    );
    assert_eq!(refused(&step), Some((503, "host_unavailable".into())));
    let mut s = Stream::new(rig.config.clone());
    let step = s.on_request_headers(
        Err(HostError {
            call: "get_map_bytes",
            status: 1,
        }),
        None,
        true,
        &rig.env(),
    );
    assert_eq!(refused(&step), Some((503, "host_unavailable".into())));
}

/// The cluster store's settings the cluster tests run with.
fn cluster_state() -> apisec_core::cluster::RawState {
    apisec_core::cluster::RawState {
        backend: apisec_core::cluster::Backend::Cluster,
        cluster: Some(apisec_core::cluster::RawCluster {
            envoy_cluster: "apisec_state".into(),
            authority: None,
            timeout_ms: 500,
            key_prefix: "apisec:".into(),
            credentials_env: None,
            app_share: 1000,
        }),
    }
}

/// The cluster backend (issue 10): the machine asks the host to run state batches and waits.
fn cluster_rig(bans: bool) -> Rig {
    let mut rig = Rig::new(bans);
    let mut p = (*rig.config.policy).clone();
    p.state = cluster_state().compile(None).unwrap();
    rig.config.policy = Arc::new(p);
    rig
}

/// The headers of an order signed over `signed`, whose body arrives as `sent` (a different
/// `sent` is a tampered body): the stream and the step its headers gave.
fn order_headers(rig: &Rig, signed: &[u8], sent: &[u8]) -> (Stream, Step) {
    *rig.host.request_body.borrow_mut() = sent.to_vec();
    let mut s = Stream::new(rig.config.clone());
    let step = s.on_request_headers(
        Ok(signed_pairs("POST", "/orders", signed, "n1")),
        Some("192.0.2.1:5000"),
        false,
        &rig.env(),
    );
    (s, step)
}

/// Issue 24 (ATK-1): a signed request with a body makes one trip to the cluster store. The
/// batch goes with its headers and records its nonce (a replay is refused before its body is
/// held); the body is decided when it is complete, and no second batch follows.
#[test]
fn cluster_state_is_asked_once_for_a_body_and_the_request_waits_for_the_answer() {
    let rig = cluster_rig(false);
    let body = br#"{"qty":1}"#;
    let (mut s, step) = order_headers(&rig, body, body);
    let batch = step.state.clone().expect("a state batch");
    assert_eq!(step.action, Action::Pause);
    assert!(matches!(
        batch.ops.as_slice(),
        [Op::Nonce { record: true, .. }]
    ));
    // the whole body arrives while the store is still answering: nothing goes on
    let step = s.on_request_body(body.len(), true, &rig.env());
    assert_eq!(step.action, Action::Pause);
    assert!(step.state.is_none());
    // the answer: the body is decided, and the request goes on without another batch
    let step = s.on_state(Answer::default(), &rig.env());
    assert!(step.state.is_none(), "one batch: {:?}", step.state);
    assert_eq!(step.action, Action::Continue);
    assert!(step.set_identity);
    assert!(s.identity_headers().any(|h| h == ("x-apisec-app", "app-a")));
    assert_eq!(s.on_log(&rig.env()).counts, vec![Count::Allowed]);
}

/// A body that fails its digest after the one batch is refused; its nonce is spent (the batch
/// recorded it) and nothing goes upstream.
#[test]
fn a_body_that_fails_after_the_one_batch_is_refused() {
    let rig = cluster_rig(false);
    let body = br#"{"qty":1}"#;
    let (mut s, step) = order_headers(&rig, body, br#"{"qty":9}"#);
    assert!(matches!(
        step.state.expect("the batch").ops.as_slice(),
        [Op::Nonce { record: true, .. }]
    ));
    assert_eq!(
        s.on_state(Answer::default(), &rig.env()).action,
        Action::Pause
    );
    let step = s.on_request_body(body.len(), true, &rig.env());
    // the refusal's own batch (bans and its counter) runs, then the refusal
    let step = match step.state {
        Some(_) => s.on_state(Answer::default(), &rig.env()),
        None => step,
    };
    assert_eq!(refused(&step), Some((401, "digest_mismatch".into())));
}

/// A grant that counts uses keeps two batches: a read before the body is held, and the nonce
/// recorded with the use once the body passed, so only a request that passed every check
/// spends a use.
#[test]
fn a_grant_that_counts_uses_spends_one_only_after_the_body() {
    let mut rig = cluster_rig(false);
    let mut p = (*rig.config.policy).clone();
    for g in &mut p.grants {
        g.max_uses = Some(5);
    }
    rig.config.policy = Arc::new(p);
    let body = br#"{"qty":1}"#;
    let (mut s, step) = order_headers(&rig, body, body);
    assert!(matches!(
        step.state.expect("the early read").ops.as_slice(),
        [Op::Nonce { record: false, .. }]
    ));
    assert_eq!(
        s.on_state(Answer::default(), &rig.env()).action,
        Action::Pause
    );
    let step = s.on_request_body(body.len(), true, &rig.env());
    assert!(matches!(
        step.state.expect("the final batch").ops.as_slice(),
        [Op::Nonce { record: true, .. }, Op::GrantUse { max: 5, .. }]
    ));
    assert_eq!(
        s.on_state(Answer::default(), &rig.env()).action,
        Action::Continue
    );
}

/// A policy reloaded while the body comes: the request is checked again under the new policy,
/// and its bans and counts asked again under it, without its nonce (already spent by it).
#[test]
fn a_reload_during_the_body_asks_again_without_the_nonce() {
    let rig = cluster_rig(true);
    let body = br#"{"qty":1}"#;
    let (mut s, step) = order_headers(&rig, body, body);
    assert!(matches!(
        step.state.expect("the batch").ops.as_slice(),
        [Op::Ban(_), Op::Ban(_), Op::Nonce { record: true, .. }]
    ));
    assert_eq!(
        s.on_state(Answer::default(), &rig.env()).action,
        Action::Pause
    );
    let mut reloaded = (*rig.config.policy).clone();
    reloaded.generation += 1;
    *rig.host.current.borrow_mut() = Some(Config {
        policy: Arc::new(reloaded),
        meta: rig.config.meta.clone(),
    });
    let step = s.on_request_body(body.len(), true, &rig.env());
    let ops = step.state.expect("the bans asked again").ops;
    assert!(
        matches!(ops.as_slice(), [Op::Ban(_), Op::Ban(_)]),
        "{ops:?}"
    );
    assert_eq!(
        s.on_state(Answer::default(), &rig.env()).action,
        Action::Continue
    );
}

/// Issue 23 (RL-1, RL-2): a rate limit rides in the request's one final batch, after its nonce,
/// on the cluster backend no extra round trip; the store's refusal is a 429 with Retry-After.
#[test]
fn a_rate_limit_rides_in_the_final_batch_and_its_refusal_says_when_to_retry() {
    let mut rig = cluster_rig(false);
    let mut raw: apisec_core::policy::RawPolicy = serde_json::from_value(serde_json::json!({
        "version": 1,
        "apis": [{"id": "order", "method": "POST", "path": "/orders", "level": "S1", "service_object": "toB",
                  "access": "write", "user_auth": false, "personal_info": false, "function": "trading"}],
        "apps": [{"id": "app-a", "credentials": [{"id": "k", "alg": "hmac-sha256", "secret_env": "S"}]}],
        "grants": [{"id": "g", "app": "app-a", "apis": ["order"]}],
        "rate_limits": [{"id": "orders", "by": ["app", "api"], "per_second": 5, "per_minute": 60, "per_hour": 600}]
    }))
    .unwrap();
    raw.state = cluster_state();
    let p = raw
        .into_policy(&HashMap::from([("S".to_string(), SECRET_B64.to_string())]))
        .unwrap();
    rig.config.policy = Arc::new(p);
    let mut s = Stream::new(rig.config.clone());
    let step = s.on_request_headers(
        Ok(signed_pairs("POST", "/orders", b"", "n1")),
        Some("192.0.2.1:5000"),
        true,
        &rig.env(),
    );
    let batch = step.state.expect("the one batch of the request");
    let [Op::Nonce { record: true, .. }, Op::RateLimit(counters)] = batch.ops.as_slice() else {
        panic!("expected the nonce, then the rate limit: {:?}", batch.ops);
    };
    assert_eq!(counters.len(), 1);
    assert_eq!(counters[0].windows.len(), 3);
    // the store answers that the minute window is full: 429, Retry-After, the rule recorded
    let c = &counters[0];
    let w = &c.windows[1];
    let mut answer = Answer::refused(c.refusal(w, 60, 0));
    answer.rate_limits.push(c.hit(w));
    let step = s.on_state(answer, &rig.env());
    assert_eq!(refused(&step), Some((429, "rate_limited".into())));
    let Action::Refuse { retry_after, .. } = &step.action else {
        panic!("a refusal");
    };
    assert!(
        retry_after.is_some_and(|r| (1..=120).contains(&r)),
        "{retry_after:?}"
    );
    let record: serde_json::Value = serde_json::from_str(&s.record_so_far().unwrap()).unwrap();
    assert_eq!(
        record["rate_limits"],
        serde_json::json!([{"rule": "orders", "window": "minute", "action": "refuse"}])
    );
}

#[test]
fn a_store_that_cannot_answer_refuses_503_and_is_not_asked_again() {
    let rig = cluster_rig(true);
    let mut s = Stream::new(rig.config.clone());
    let step = s.on_request_headers(
        Ok(signed_pairs("POST", "/orders", b"", "n1")),
        Some("192.0.2.1:5000"),
        true,
        &rig.env(),
    );
    let batch = step.state.expect("the final batch");
    assert!(matches!(
        batch.ops.as_slice(),
        [Op::Ban(_), Op::Ban(_), Op::Nonce { record: true, .. }]
    ));
    let step = s.on_state(
        apisec_core::cluster::failed("callout timed out"),
        &rig.env(),
    );
    assert_eq!(refused(&step), Some((503, "state_unavailable".into())));
    assert!(
        step.state.is_none(),
        "no refusal batch for an unavailable store"
    );
    assert_eq!(audit_code(&s).as_deref(), Some("state_unavailable"));
}

#[test]
fn a_refusal_in_cluster_mode_waits_for_its_count_and_reports_a_ban() {
    let rig = cluster_rig(true);
    let mut s = Stream::new(rig.config.clone());
    let mut pairs = signed_pairs("POST", "/orders", b"", "n1");
    for (k, v) in pairs.iter_mut() {
        if k == "signature" {
            *v = b"sig1=:AAAA:".to_vec();
        }
    }
    let step = s.on_request_headers(Ok(pairs), Some("192.0.2.1:5000"), true, &rig.env());
    let batch = step.state.expect("the refusal batch");
    assert!(matches!(batch.ops.last(), Some(Op::Refusal(_))));
    assert_eq!(step.action, Action::Pause, "refused only once counted");
    let answer = Answer {
        ban_started: Some("source 192.0.2.1 banned for 60 s".into()),
        ..Answer::default()
    };
    let step = s.on_state(answer, &rig.env());
    assert_eq!(refused(&step), Some((401, "signature_invalid".into())));
    assert!(step.counts.contains(&Count::BanStarted));
}

#[test]
fn a_refusal_the_store_cannot_count_stands_and_says_so() {
    let rig = cluster_rig(true);
    let mut s = Stream::new(rig.config.clone());
    let mut pairs = signed_pairs("POST", "/orders", b"", "n1");
    for (k, v) in pairs.iter_mut() {
        if k == "signature" {
            *v = b"sig1=:AAAA:".to_vec();
        }
    }
    let step = s.on_request_headers(Ok(pairs), Some("192.0.2.1:5000"), true, &rig.env());
    assert!(step.state.is_some());
    let step = s.on_state(apisec_core::cluster::failed("timed out"), &rig.env());
    assert_eq!(refused(&step), Some((401, "signature_invalid".into())));
    let audit: serde_json::Value = serde_json::from_str(&s.record_so_far().unwrap()).unwrap();
    assert!(
        audit["ban"]
            .as_str()
            .unwrap()
            .starts_with("refusal not counted"),
        "{audit}"
    );
    assert!(!step.counts.contains(&Count::BanStarted));
}
