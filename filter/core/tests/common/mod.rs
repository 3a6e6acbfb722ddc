//! Helpers shared by the core integration tests: the two decision steps, run the way the host
//! runs them, and a replay store laid out for a policy.
#![allow(dead_code, clippy::unwrap_used)] // each test crate uses what it needs

use apisec_core::crypto::SoftwareVerifier;
use apisec_core::engine::{check_body, check_headers, find_api, RequestContext};
use apisec_core::message::Request;
use apisec_core::replay::{init_slots, MemoryStore};
use apisec_core::{DenyReason, Policy};

/// `find_api`, `check_headers`, then `check_body`, as the filter drives them; the refusal's
/// reason, or what the request established.
pub fn decide(
    policy: &Policy,
    store: &MemoryStore,
    req: &Request,
    body: &[u8],
    now: u64,
) -> Result<RequestContext, DenyReason> {
    let mut ctx = RequestContext::default();
    let api = find_api(policy, req).map_err(|d| d.reason)?;
    check_headers(
        policy,
        api,
        req,
        !body.is_empty(),
        now,
        &SoftwareVerifier,
        store,
        &mut ctx,
    )
    .map_err(|d| d.reason)?;
    check_body(policy, &ctx, body, store, now).map_err(|d| d.reason)?;
    Ok(ctx)
}

/// An empty replay store with the policy's slots in place.
pub fn fresh_store(policy: &Policy) -> MemoryStore {
    let s = MemoryStore::default();
    init_slots(&s, &policy.replay).unwrap();
    s
}
