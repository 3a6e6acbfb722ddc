//! Native timing of the decision engine's hot path (not a test; `cargo run --release -p
//! apisec-core --example hot_path`). It separates the filter's own work from Envoy host-call
//! costs when reading `make bench` results.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::disallowed_methods
)] // a measuring tool

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use apisec_core::audit_chain::Chain;
use apisec_core::crypto::SoftwareVerifier;
use apisec_core::lifecycle::{Action, Config, Env, HostError, HostFacts, Stream, Transport};
use apisec_core::message::{Connection, Request};
use apisec_core::signer::{sign, SignParams, SigningKey};
use apisec_core::store::MemoryStore;
use apisec_core::Policy;
use base64::Engine as _;

fn main() {
    let secret = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let doc = serde_json::json!({
        "version": 1,
        "gateway": {"replay": {"slots": 65536, "entries_per_slot": 32}},
        "apis": [
            {"id": "s0", "method": "GET", "path": "/bench/s0", "level": "S0", "service_object": "toB", "access": "read",
             "user_auth": false, "personal_info": false, "function": "market_data"},
            {"id": "s1", "method": "GET", "path": "/bench/s1", "level": "S1", "service_object": "toB", "access": "read",
             "user_auth": false, "personal_info": false, "function": "info"}],
        "apps": [{"id": "a", "credentials": [{"id": "a-hmac", "alg": "hmac-sha256", "secret_env": "S"}]}],
        "grants": [{"id": "g", "app": "a", "apis": ["s1"]}],
        "bans": {"threshold": 1000000, "window_seconds": 60, "ban_seconds": 60},
        "audit": {"chain_key_env": "K"}
    });
    let mut policy = Policy::from_json(
        &doc.to_string(),
        &HashMap::from([
            ("S".to_string(), secret.to_string()),
            ("K".to_string(), secret.to_string()),
        ]),
    )
    .unwrap();
    let store = MemoryStore::default();
    let now = 1_800_000_000u64;
    // as the glues open it: the live-ban mark first, the slots, the bans keyed with the salt
    let meta = apisec_core::local::open(&store, [3; 16], now - 10, &mut policy).unwrap();
    let config = Config {
        policy: Arc::new(policy.clone()),
        meta: Arc::new(meta),
    };
    let host = Tls(now);
    let held = Cell::new(0);
    let chain = RefCell::new(Chain::new(&[7; 8]));
    let env = Env {
        store: &store,
        verifier: &SoftwareVerifier,
        host: &host,
        held: &held,
        chain: Some(&chain),
    };
    let key = SigningKey::Hmac(
        base64::engine::general_purpose::STANDARD
            .decode(secret)
            .unwrap(),
    );
    let n: usize = std::env::var("HOT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let reqs: Vec<Request> = (0..n)
        .map(|i| {
            let mut r = Request {
                conn: Connection {
                    client_ip: Some("127.0.0.1".parse().unwrap()),
                    tls: true,
                    ..Default::default()
                },
                method: "GET".into(),
                scheme: "https".into(),
                authority: "127.0.0.1:10443".into(),
                path_and_query: format!("/bench/s1?i={i}"),
                headers: vec![
                    ("x-app-id".into(), "a".into()),
                    ("user-agent".into(), "wrk".into()),
                ],
                route: None,
            };
            let p = SignParams {
                label: "sig1".into(),
                components: ["@method", "@authority", "@path", "@query", "x-app-id"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                created: now as i64,
                expires: None,
                nonce: Some(format!("n{i}")),
                keyid: "a-hmac".into(),
                include_alg: true,
            };
            let (si, s) = sign(&r, &p, &key).unwrap();
            r.headers.push(("signature-input".into(), si));
            r.headers.push(("signature".into(), s));
            r
        })
        .collect();
    let t = Instant::now();
    for r in reqs.iter().take(if std::env::var("HOT_S0").is_ok() {
        0
    } else {
        n
    }) {
        let step = Stream::new(config.clone()).on_request_headers(
            Ok(pairs(r)),
            Some("127.0.0.1:1"),
            true,
            &env,
        );
        assert_eq!(step.action, Action::Continue);
    }
    println!(
        "S1 decision (native): {:.2} us/request",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    let mut s0 = reqs[0].clone();
    s0.path_and_query = "/bench/s0".into();
    let t = Instant::now();
    let s0_pairs = pairs(&s0);
    for _ in 0..n {
        let step = Stream::new(config.clone()).on_request_headers(
            Ok(s0_pairs.clone()),
            Some("127.0.0.1:1"),
            true,
            &env,
        );
        assert_eq!(step.action, Action::Continue);
    }
    println!(
        "S0 decision (native): {:.2} us/request",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    // The whole S0 stream as Envoy drives it: request headers, response headers, the end
    // (the audit record sealed into the chain, the metrics sample). HOT_STREAM=N runs only
    // this, N times: `valgrind --tool=callgrind` on it shows where the filter's own
    // instructions go, by function.
    let m: usize = std::env::var("HOT_STREAM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n);
    let t = Instant::now();
    for _ in 0..m {
        let mut stream = Stream::new(config.clone());
        let step = stream.on_request_headers(Ok(s0_pairs.clone()), Some("127.0.0.1:1"), true, &env);
        assert_eq!(step.action, Action::Continue);
        let _ = stream.on_response_headers(true, &env);
        let step = stream.on_log(&env);
        assert!(step.audit.is_some() && step.sample.is_some());
    }
    println!(
        "S0 stream with its sealed audit record (native): {:.2} us/request",
        t.elapsed().as_secs_f64() * 1e6 / m as f64
    );
}

/// A host on a TLS connection with a fixed clock.
struct Tls(u64);

impl HostFacts for Tls {
    fn now(&self) -> Option<u64> {
        Some(self.0)
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
    fn response_header(&self, name: &str) -> Option<String> {
        (name == ":status").then(|| "200".to_string())
    }
    fn now_ms(&self) -> Option<u64> {
        Some(self.0 * 1000)
    }
    fn upstream_address(&self) -> Option<String> {
        Some("127.0.0.1:8081".into())
    }
    fn response_body(&self, _: usize) -> Result<Vec<u8>, HostError> {
        Ok(Vec::new())
    }
}

/// The headers as the host hands them over.
fn pairs(r: &Request) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = vec![
        (":method".into(), r.method.clone().into_bytes()),
        (":scheme".into(), r.scheme.clone().into_bytes()),
        (":authority".into(), r.authority.clone().into_bytes()),
        (":path".into(), r.path_and_query.clone().into_bytes()),
    ];
    out.extend(
        r.headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
    );
    out
}
