//! Report-only mode (a dry run per policy, API or route) and per-route policy by Envoy route
//! name, driven through the lifecycle as the filter drives it (issue 11).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)] // test code

mod common;

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

use apisec_core::crypto::SoftwareVerifier;
use apisec_core::lifecycle::{
    Action, Config, Count, Env, HostError, HostFacts, Step, Stream, Transport,
};
use apisec_core::report::reportable;
use apisec_core::store;
use apisec_core::{DenyReason, Policy};
use common::{fresh_store, SECRET_B64, STORE_STARTED};
use serde_json::{json, Value};

const NOW: u64 = STORE_STARTED + 1000;

struct RouteHost {
    route: Option<&'static str>,
    asked: Cell<u32>,
}

impl HostFacts for RouteHost {
    fn now(&self) -> Option<u64> {
        Some(NOW)
    }
    fn transport(&self) -> Transport {
        Transport {
            tls: true,
            ..Default::default()
        }
    }
    fn request_body(&self, _: usize) -> Result<Vec<u8>, HostError> {
        Ok(Vec::new())
    }
    fn response_header(&self, _: &str) -> Option<String> {
        None
    }
    fn response_body(&self, _: usize) -> Result<Vec<u8>, HostError> {
        Ok(Vec::new())
    }
    fn route_name(&self) -> Option<String> {
        self.asked.set(self.asked.get() + 1);
        self.route.map(str::to_string)
    }
}

fn api(id: &str, method: &str, path: &str, level: &str) -> Value {
    json!({"id": id, "method": method, "path": path, "level": level, "service_object": "toB",
           "access": "read", "user_auth": false, "personal_info": false, "function": id})
}

fn doc() -> Value {
    json!({
        "version": 1,
        "apis": [api("quote", "GET", "/quotes/{s}", "S0"), api("news", "GET", "/news", "S1"),
                 api("order", "GET", "/orders", "S3")],
        "apps": [{"id": "app-a", "credentials": [{"id": "k", "alg": "hmac-sha256", "secret_env": "S"}]}],
        "grants": [{"id": "g", "app": "app-a", "apis": ["news"]}]
    })
}

fn compile(doc: &Value) -> Result<Policy, String> {
    Policy::from_json(
        &doc.to_string(),
        &HashMap::from([("S".to_string(), SECRET_B64.to_string())]),
    )
    .map_err(|e| e.to_string())
}

/// One GET through the lifecycle: its step, and the counts of its log event.
fn get(
    policy: &Policy,
    path: &str,
    app: &str,
    route: Option<&'static str>,
) -> (Step, Vec<Count>, u32) {
    let store = fresh_store(policy);
    let config = Config {
        policy: Arc::new(policy.clone()),
        meta: Arc::new(store::meta(&store).unwrap()),
    };
    let host = RouteHost {
        route,
        asked: Cell::new(0),
    };
    let held = Cell::new(0);
    let env = Env {
        store: &store,
        verifier: &SoftwareVerifier,
        host: &host,
        held: &held,
        chain: None,
    };
    let pairs: Vec<(String, Vec<u8>)> = vec![
        (":method".into(), b"GET".to_vec()),
        (":scheme".into(), b"https".to_vec()),
        (":authority".into(), b"gw".to_vec()),
        (":path".into(), path.as_bytes().to_vec()),
        ("x-request-id".into(), b"r-1".to_vec()),
        ("x-app-id".into(), app.as_bytes().to_vec()),
    ];
    let mut stream = Stream::new(config);
    let mut step = stream.on_request_headers(Ok(pairs), Some("192.0.2.1:4000"), true, &env);
    let log = stream.on_log(&env);
    step.audit = log.audit; // the record is written when the stream ends
    (step, log.counts, host.asked.get())
}

fn audit(step: &Step) -> Value {
    serde_json::from_str(step.audit.as_deref().unwrap()).unwrap()
}

fn refused_with(step: &Step) -> Option<(u32, String)> {
    match &step.action {
        Action::Refuse { status, body, .. } => {
            let v: Value = serde_json::from_str(body).unwrap();
            Some((*status, v["error"].as_str().unwrap().to_string()))
        }
        _ => None,
    }
}

#[test]
fn a_route_serves_only_the_apis_it_lists() {
    let mut d = doc();
    d["routes"] = json!([{"name": "public", "apis": ["quote"]}, {"name": "partners"}]);
    let p = compile(&d).unwrap();

    let (step, counts, asked) = get(&p, "/quotes/600000", "app-a", Some("public"));
    assert_eq!(step.action, Action::Continue);
    assert_eq!(audit(&step)["decision"], "allow");
    assert_eq!(counts, vec![Count::Allowed]);
    assert_eq!(asked, 1);

    // An API the route does not serve, an unnamed route, no route at all: refused.
    for (path, route, detail) in [
        ("/news", Some("public"), "not served through route 'public'"),
        (
            "/quotes/1",
            Some("internal"),
            "route 'internal' is not in the policy",
        ),
        ("/quotes/1", None, "no named route"),
    ] {
        let (step, _, _) = get(&p, path, "app-a", route);
        assert_eq!(
            refused_with(&step),
            Some((403, "route_not_allowed".into())),
            "{path} {route:?}"
        );
        let rec = audit(&step);
        assert_eq!(rec["code"], "route_not_allowed");
        assert!(rec["detail"].as_str().unwrap().contains(detail), "{rec}");
    }
    // A route without a list serves every API (the S1 refusal is the signature's, not the route's).
    let (step, _, _) = get(&p, "/news", "app-a", Some("partners"));
    assert_eq!(refused_with(&step).unwrap().1, "signature_missing");
}

#[test]
fn without_routes_the_route_is_never_asked() {
    let p = compile(&doc()).unwrap();
    let (step, _, asked) = get(&p, "/quotes/1", "app-a", Some("anything"));
    assert_eq!(step.action, Action::Continue);
    assert_eq!(asked, 0, "a host call the decision does not need");
}

#[test]
fn report_mode_on_a_route_records_what_would_be_refused_and_lets_it_through() {
    let mut d = doc();
    d["routes"] = json!([{"name": "shadow", "apis": ["quote", "news"], "mode": "report"},
                         {"name": "live", "apis": ["quote", "news"]}]);
    let p = compile(&d).unwrap();
    let (step, counts, _) = get(&p, "/quotes/1", "nobody", Some("shadow"));
    assert_eq!(step.action, Action::Continue);
    assert!(
        !step.set_identity,
        "nothing was verified: no x-apisec-* identity upstream"
    );
    let rec = audit(&step);
    assert_eq!(rec["decision"], "report");
    assert_eq!(rec["code"], "unknown_app");
    assert_eq!(rec["status"], 401);
    assert_eq!(step.counts, vec![Count::Reported(DenyReason::UnknownApp)]);
    assert!(
        counts.is_empty(),
        "a reported request is not also counted allowed"
    );
    // The same request through the enforcing route is refused.
    let (step, _, _) = get(&p, "/quotes/1", "nobody", Some("live"));
    assert_eq!(refused_with(&step), Some((401, "unknown_app".into())));
    assert_eq!(step.counts, vec![Count::Denied(DenyReason::UnknownApp)]);
}

#[test]
fn report_mode_per_api_leaves_the_other_apis_enforced() {
    let mut d = doc();
    d["apis"][1]["mode"] = json!("report");
    let p = compile(&d).unwrap();
    let (step, _, _) = get(&p, "/news", "app-a", None);
    assert_eq!(step.action, Action::Continue);
    assert_eq!(audit(&step)["code"], "signature_missing");
    assert_eq!(
        step.counts,
        vec![Count::Reported(DenyReason::SignatureMissing)]
    );
    let (step, _, _) = get(&p, "/quotes/1", "nobody", None);
    assert_eq!(refused_with(&step), Some((401, "unknown_app".into())));
}

#[test]
fn report_mode_of_the_whole_policy_keeps_s3_enforced_without_the_flag() {
    let mut d = doc();
    d["gateway"] = json!({"mode": "report"});
    let p = compile(&d).unwrap();
    let (step, _, _) = get(&p, "/news", "nobody", None);
    assert_eq!(audit(&step)["decision"], "report");
    let (step, _, _) = get(&p, "/nothing/here", "nobody", None);
    assert_eq!(
        audit(&step)["decision"],
        "report",
        "an unknown API is reported too"
    );
    let (step, _, _) = get(&p, "/orders", "nobody", None);
    assert_eq!(
        refused_with(&step),
        Some((401, "unknown_app".into())),
        "S3 stays enforced"
    );

    d["gateway"]["report_only_s3"] = json!(true);
    let p = compile(&d).unwrap();
    let (step, _, _) = get(&p, "/orders", "nobody", None);
    assert_eq!(step.action, Action::Continue);
    assert_eq!(audit(&step)["decision"], "report");
}

#[test]
fn report_mode_on_an_s3_api_or_route_needs_the_explicit_flag() {
    let mut d = doc();
    d["apis"][2]["mode"] = json!("report");
    let e = compile(&d).unwrap_err();
    assert!(
        e.contains("apis[2].mode") && e.contains("report_only_s3"),
        "{e}"
    );
    let mut d = doc();
    d["routes"] = json!([{"name": "shadow", "mode": "report"}]);
    let e = compile(&d).unwrap_err();
    assert!(e.contains("routes[0].mode") && e.contains("'order'"), "{e}");
    d["routes"] = json!([{"name": "shadow", "apis": ["quote"], "mode": "report"}]);
    compile(&d).unwrap();
    d["routes"] = json!([{"name": "shadow", "mode": "report"}]);
    d["gateway"] = json!({"report_only_s3": true});
    compile(&d).unwrap();
}

#[test]
fn route_names_and_lists_are_checked() {
    let mut d = doc();
    d["routes"] = json!([{"name": "a"}, {"name": "a"}]);
    assert!(compile(&d).unwrap_err().contains("duplicate route 'a'"));
    d["routes"] = json!([{"name": "has space"}]);
    assert!(compile(&d).unwrap_err().contains("routes[0].name"));
    d["routes"] = json!([{"name": "a", "apis": ["typo"]}]);
    assert!(compile(&d).unwrap_err().contains("'typo' matches no API"));
}

#[test]
fn protections_of_the_gateway_itself_are_never_reported() {
    for r in [
        DenyReason::Banned,
        DenyReason::HostUnavailable,
        DenyReason::GatewayBusy,
        DenyReason::BodyTooLarge,
        DenyReason::ResponseUnfilterable,
        DenyReason::OverrideNotAllowed,
    ] {
        assert!(!reportable(r), "{r}");
    }
    assert!(reportable(DenyReason::SignatureInvalid));
    assert!(reportable(DenyReason::NoGrant));
}
