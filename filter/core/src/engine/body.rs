//! The body (DATA-3, PERM-3): whether a worker may hold it, then its digest and field rules.

use super::*;

/// Step two, when the whole body is in (an empty slice when there is none), under the policy
/// in force *now*: a body that took too long is refused; if the policy changed while the body
/// was coming, the headers are decided again under the new one, else the checks that depend
/// on time are made again (issue 8, hole 6). Then the digest is checked against every byte,
/// then the grant's field rules, and only then are the nonce and a use of the grant spent.
pub fn check_body(
    policy: &Policy,
    req: &Request,
    ctx: &mut RequestContext,
    body: &[u8],
    host: &Host<'_>,
    now: u64,
) -> Result<(), Deny> {
    if ctx.generation != policy.generation {
        let api = begin(policy, req)?;
        let started = ctx.started;
        let session_user = ctx.session_user.take();
        *ctx = RequestContext::default();
        check_headers(policy, api, req, !body.is_empty(), now, host, ctx)?;
        if needs_session_user(policy, api) {
            let (user, factors) = session_user.ok_or_else(|| {
                Deny::new(
                    DenyReason::UserLoginRequired,
                    "no session user read before the reload",
                )
            })?;
            apply_session_user(policy, req, Some(&user), factors, now, ctx)?;
        }
        ctx.started = started;
    }
    check_form_override(req, body)?;
    let level = ctx.level.unwrap_or(SecurityLevel::S3);
    if level == SecurityLevel::S0 {
        return Ok(());
    }
    if !body.is_empty() {
        recheck(policy, ctx, now)?;
    }
    let signed = ctx.nonce.is_some() && !ctx.idempotency;
    match &ctx.content_digest {
        Some(d) => crypto::verify_content_digest(d, body)?,
        None if signed && !body.is_empty() => {
            return Err(Deny::new(
                DenyReason::DigestMissing,
                "a request with a body needs content-digest",
            ))
        }
        None => {}
    }
    let grant = ctx.grant_index.and_then(|i| policy.grants.get(i));
    if let Some(g) = grant.filter(|g| !g.forbid_request_fields.is_empty()) {
        fields::check_request(
            &g.forbid_request_fields,
            req.query(),
            req.unique_header("content-type")?,
            req.unique_header("content-encoding")?,
            body,
        )?;
    }
    // A certificate-only read has no nonce: the app's own TLS channel is fresh.
    if ctx.nonce.is_none() && ctx.auth != Some(AuthKind::Certificate) {
        return Err(Deny::new(DenyReason::NonceMissing, "no verified nonce"));
    }
    match grant {
        Some(_) => Ok(()),
        None => Err(Deny::new(DenyReason::NoGrant, "no grant selected")),
    }
}

/// The body a held request would add to this worker's held bodies; refused when the worker
/// already holds its bound (issue 8, hole 7). `declared` is the content-length, if any.
pub fn admit_body(policy: &Policy, held: u64, declared: Option<u64>) -> Result<u64, Deny> {
    let want = declared
        .unwrap_or(policy.max_body_bytes)
        .min(policy.max_body_bytes);
    if held.saturating_add(want) > policy.max_held_body_bytes {
        return Err(Deny::new(
            DenyReason::GatewayBusy,
            format!(
                "this worker holds {held} bytes of bodies, at most {}",
                policy.max_held_body_bytes
            ),
        ));
    }
    Ok(want)
}
