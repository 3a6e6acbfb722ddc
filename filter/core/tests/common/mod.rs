//! Helpers shared by the core integration tests: the two decision steps, run the way the host
//! runs them, and a state store opened for a policy.
#![allow(dead_code, clippy::unwrap_used)] // each test crate uses what it needs

use apisec_core::crypto::SoftwareVerifier;
use apisec_core::engine::{begin, check_body, check_headers, Host, RequestContext};
use apisec_core::message::Request;
use apisec_core::replay::init_slots;
use apisec_core::store::{self, MemoryStore};
use apisec_core::{DenyReason, Policy};

/// When the test stores start: requests in the tables are signed after it.
pub const STORE_STARTED: u64 = 1_000_000;

/// `begin`, `check_headers`, then `check_body`, as the filter drives them; the refusal's
/// reason, or what the request established.
pub fn decide(
    policy: &Policy,
    store: &MemoryStore,
    req: &Request,
    body: &[u8],
    now: u64,
) -> Result<RequestContext, DenyReason> {
    let meta = store::meta(store).unwrap();
    let host = Host {
        store,
        meta: &meta,
        verifier: &SoftwareVerifier,
    };
    let mut ctx = RequestContext::default();
    let api = begin(policy, req, store, now).map_err(|d| d.reason)?;
    check_headers(policy, api, req, !body.is_empty(), now, &host, &mut ctx)
        .map_err(|d| d.reason)?;
    check_body(policy, req, &mut ctx, body, &host, now).map_err(|d| d.reason)?;
    Ok(ctx)
}

/// An empty state store opened for the policy, with its replay slots in place.
pub fn fresh_store(policy: &Policy) -> MemoryStore {
    let s = MemoryStore::default();
    let meta = store::open(&s, [9; 16], STORE_STARTED, policy.replay.slots).unwrap();
    init_slots(&s, &policy.replay, &meta).unwrap();
    s
}
