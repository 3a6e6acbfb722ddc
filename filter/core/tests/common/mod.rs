//! Helpers shared by the core integration tests: a request decided by the lifecycle, event by
//! event, the way the filter drives it in Envoy (the order of checks lives only there), and a
//! state store opened for a policy.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::panic
)] // test helpers; each test crate uses what it needs

pub mod vectors;

use std::sync::Arc;

use apisec_core::crypto::SoftwareVerifier;
use apisec_core::diagnose;
use apisec_core::engine::RequestContext;
use apisec_core::lifecycle::{Action, Config};
use apisec_core::message::Request;
use apisec_core::state::nonces::local::init_slots;
use apisec_core::store::{self, MemoryStore};
use apisec_core::{DenyReason, Policy};

/// When the test stores start: requests in the tables are signed after it.
pub const STORE_STARTED: u64 = 1_000_000;

/// The App_Secret (base64) of the test apps' HMAC credential `k`.
pub const SECRET_B64: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// Signs `r` with credential `k` (HMAC, `SECRET_B64`) over `components` and adds the
/// `Signature-Input` and `Signature` headers.
pub fn sign_hmac(
    r: &mut Request,
    components: Vec<String>,
    created: u64,
    nonce: &str,
    expires: Option<i64>,
) {
    use base64::Engine as _;
    let p = apisec_core::signer::SignParams {
        label: "sig1".into(),
        components,
        created: created as i64,
        expires,
        nonce: Some(nonce.into()),
        keyid: "k".into(),
        include_alg: true,
    };
    let key = apisec_core::signer::SigningKey::Hmac(
        base64::engine::general_purpose::STANDARD
            .decode(SECRET_B64)
            .unwrap(),
    );
    let (si, s) = apisec_core::signer::sign(r, &p, &key).unwrap();
    r.headers.push(("signature-input".into(), si));
    r.headers.push(("signature".into(), s));
}

/// The request decided by the lifecycle (headers, then the body if any; `diagnose::run`, the
/// driver `apisec verify` uses): the refusal's reason, or what the request established.
pub fn decide(
    policy: &Policy,
    store: &MemoryStore,
    req: &Request,
    body: &[u8],
    now: u64,
) -> Result<RequestContext, DenyReason> {
    let config = Config {
        policy: Arc::new(policy.clone()),
        meta: Arc::new(store::meta(store).unwrap()),
    };
    let (step, stream) = diagnose::run(config, store, &SoftwareVerifier, req, body, now);
    match step.action {
        Action::Continue => Ok(stream.context().clone()),
        Action::Refuse { body, .. } => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let code = v["error"].as_str().unwrap();
            Err(*DenyReason::ALL.iter().find(|r| r.code() == code).unwrap())
        }
        Action::Answer { .. } => Ok(stream.context().clone()),
        Action::Pause => panic!("the lifecycle still holds a complete request"),
    }
}

/// An empty state store opened for the policy, with its replay slots in place.
pub fn fresh_store(policy: &Policy) -> MemoryStore {
    let s = MemoryStore::default();
    let meta = store::open(&s, [9; 16], STORE_STARTED, policy.replay.slots).unwrap();
    init_slots(&s, &policy.replay, &meta).unwrap();
    s
}
