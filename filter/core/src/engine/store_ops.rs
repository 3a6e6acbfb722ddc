//! When the store is asked: the state operations each step of a request yields (bans, the
//! nonce, grant uses, sessions, counted anomaly rules), in the batches the lifecycle runs.

use super::*;

/// What a request asks before anything else on the local backend: whether its source is
/// banned, so that a banned source costs a shared-data read and no signature verification
/// (MON-6). On the cluster backend this would cost a round trip per request, and the batch
/// after the checks asks it anyway, with the same outcome.
pub fn opening_ops(policy: &Policy, client_ip: Option<std::net::IpAddr>, local: bool) -> Vec<Op> {
    match (&policy.bans, client_ip) {
        (Some(_), Some(ip)) if local => vec![Op::Ban(BanSubject::Ip(ip))],
        _ => Vec::new(),
    }
}

/// The bans a request is checked against, first in every batch it runs: its source address
/// (`ip_ban`: None when the opening batch just checked it), and the app it named (before
/// proving to be it, as before any other check).
pub(super) fn ban_ops(
    policy: &Policy,
    ip_ban: Option<std::net::IpAddr>,
    ctx: &RequestContext,
) -> Vec<Op> {
    let mut ops = Vec::new();
    if policy.bans.is_some() {
        if let Some(ip) = ip_ban {
            ops.push(Op::Ban(BanSubject::Ip(ip)));
        }
        if let Some(app) = &ctx.app {
            ops.push(Op::Ban(BanSubject::App(app.clone())));
        }
    }
    ops
}

pub(super) fn nonce_op(ctx: &RequestContext, now: u64, record: bool) -> Option<Op> {
    let (app, nonce) = (ctx.app.as_ref()?, ctx.nonce.as_ref()?);
    Some(Op::Nonce {
        app: app.clone(),
        nonce: nonce.clone(),
        created: ctx.created.unwrap_or(now),
        idempotency: ctx.idempotency,
        record,
    })
}

/// What a request whose headers passed asks of the state before its body is held: bans, and
/// whether its nonce is spent, so a replay is refused now, not after its body has been held
/// (issue 8, hole 7). Nothing is written.
pub fn early_ops(
    policy: &Policy,
    ip_ban: Option<std::net::IpAddr>,
    ctx: &RequestContext,
    now: u64,
) -> Vec<Op> {
    let mut ops = ban_ops(policy, ip_ban, ctx);
    ops.extend(nonce_op(ctx, now, false));
    if ctx.level == Some(SecurityLevel::S0) {
        // at S0 this batch is the last one before the request goes on
        ops.extend(session_op(ctx));
    }
    ops
}

/// Whether a request with a body at S1 and above spends its nonce and counts in one batch sent
/// with its headers, instead of a read then (`early_ops`) and the final batch once the body
/// is in (issue 24: on the cluster backend one round trip instead of two). Its signature and
/// every header check have passed; what the body can still fail (its digest, forbidden fields)
/// then leaves its nonce spent and its call counted, as an attempt. Not with a grant that counts
/// uses (`max_uses`): a use is spent only by a request that passed every check, in the final
/// batch.
pub fn spends_with_headers(policy: &Policy, ctx: &RequestContext) -> bool {
    let grant = ctx.grant_index.and_then(|i| policy.grants.get(i));
    ctx.level.is_some_and(|l| l > SecurityLevel::S0) && grant.is_none_or(|g| g.max_uses.is_none())
}

/// The rate-limit counters a call counts toward (RL-1, RL-2, OPS-4), from what the gateway
/// verified of it only: the app once the caller proved to be it, the user the signature
/// covered or the session carries, the API from the inventory, the source Envoy saw.
pub fn rate_op(
    policy: &Policy,
    client_ip: Option<std::net::IpAddr>,
    ctx: &RequestContext,
    now_ms: u64,
) -> Option<Op> {
    if policy.rate_limits.is_empty() {
        return None;
    }
    let apis = policy.apis();
    let api = ctx.api.as_deref().and_then(|id| {
        ctx.api_index
            .and_then(|i| apis.get(i))
            .filter(|a| a.id == id)
            .or_else(|| apis.iter().find(|a| a.id == id))
    });
    let call = crate::rate_limits::Call {
        app: ctx.app.as_deref().filter(|_| ctx.auth.is_some()),
        api,
        user: ctx.user.as_deref(),
        source: client_ip,
    };
    let counters = policy.rate_limits.counters(&call, now_ms);
    (!counters.is_empty()).then_some(Op::RateLimit(counters))
}

/// What a request that passed every check spends, in one batch: bans first, then its nonce
/// (checked and recorded), then its rate limits, then a use of its grant. `check_body` made
/// sure a request that needs a nonce has one.
pub fn final_ops(
    policy: &Policy,
    client_ip: Option<std::net::IpAddr>,
    ip_ban: Option<std::net::IpAddr>,
    ctx: &RequestContext,
    now: u64,
    now_ms: u64,
) -> Vec<Op> {
    let mut ops = ban_ops(policy, ip_ban, ctx);
    if ctx.level.is_some_and(|l| l > SecurityLevel::S0) {
        ops.extend(nonce_op(ctx, now, true));
    }
    // After the nonce: a replayed copy is refused before it uses up the caller's limit.
    ops.extend(rate_op(policy, client_ip, ctx, now_ms));
    // Counted anomaly rules see only callers that proved to be their app; after the nonce, so
    // a replayed copy from elsewhere is refused before it counts or teaches a source.
    if let (Some(app), Some(api), Some(_)) = (&ctx.app, &ctx.api, ctx.auth) {
        if policy.anomalies.counted() {
            ops.extend(policy.anomalies.call_ops(app, api, client_ip, now));
        }
    }
    let logout = policy
        .sessions
        .as_ref()
        .zip(ctx.api.as_deref())
        .is_some_and(|(s, api)| policy.apis().get(s.logout_api).is_some_and(|a| a.id == api));
    match session_call(ctx) {
        Some(c) if logout => ops.push(Op::SessionEnd(c)),
        Some(c) => ops.push(Op::SessionUse(c)),
        None => {}
    }
    if ctx.level.is_some_and(|l| l > SecurityLevel::S0) {
        let grant = ctx.grant_index.and_then(|i| policy.grants.get(i));
        if let Some((g, max)) = grant.and_then(|g| g.max_uses.map(|m| (g, m))) {
            ops.push(Op::GrantUse {
                grant: g.id.clone(),
                max,
            });
        }
    }
    ops
}

/// What a refusal (ours, or a 429 from Envoy's rate limiter) asks of the state (PERM-4, RL-3,
/// MON-6): the bans, checked first as for every request (a banned caller is told it is banned,
/// and its refusals are not counted), then one refusal counted. An App_ID is no secret, so a
/// refusal counts against the app only when the caller proved to be it (authenticated by
/// signature or certificate); any other refusal counts against its source address (issue 8,
/// hole 5), and so does a replay, which anyone who saw the request can send.
pub fn refusal_ops(
    policy: &Policy,
    ctx: &RequestContext,
    client_ip: Option<std::net::IpAddr>,
    ip_ban: Option<std::net::IpAddr>,
    reason: DenyReason,
    now: u64,
) -> Vec<Op> {
    // a store that cannot answer is not asked again about the same request
    let unavailable = matches!(
        reason,
        DenyReason::StateUnavailable | DenyReason::HostUnavailable
    );
    if reason == DenyReason::Banned || unavailable {
        return Vec::new();
    }
    // An onboarding app's client is expected to fail while it is being written: its refusals
    // never ban (the source is often a host many apps share); they are still audited, counted,
    // and counted per key for the alert below.
    let onboarding = ctx
        .app
        .as_deref()
        .and_then(|a| policy.app(a))
        .is_some_and(|a| a.onboarding);
    // A signature that does not verify under a valid key id of the app (MON-4): counted per
    // key by the anomaly rules, whose block bans the failing source, never the key.
    let failures = match (&ctx.app, &ctx.keyid) {
        (Some(app), Some(keyid)) if reason == DenyReason::SignatureInvalid => {
            let ip = client_ip.filter(|_| !onboarding);
            policy.anomalies.failure_ops(app, keyid, ip, now)
        }
        _ => Vec::new(),
    };
    if onboarding && ctx.auth.is_none() {
        return failures;
    }
    if policy.bans.is_none() {
        return failures;
    }
    // A refusal by one of the policy's rate limits counts only where its rule says so (RL-4).
    let rate_rule =
        reason == DenyReason::RateLimited && ctx.rate_limits.iter().any(|h| h.action == "refuse");
    let rate_counts = ctx
        .rate_limits
        .iter()
        .any(|h| h.action == "refuse" && h.ban);
    let mut ops = ban_ops(policy, ip_ban, ctx);
    if reason.counts_toward_ban() && (!rate_rule || rate_counts) {
        // A replayed request proves only that someone holds a copy of it.
        let replay = matches!(
            reason,
            DenyReason::NonceReplayed | DenyReason::IdempotencyKeyReplayed
        );
        let subject = match (&ctx.app, ctx.auth, client_ip) {
            (Some(app), Some(_), _) if !replay => Some(BanSubject::App(app.clone())),
            (_, _, Some(ip)) => Some(BanSubject::Ip(ip)),
            _ => None,
        };
        ops.extend(subject.map(Op::Refusal));
    }
    ops.extend(failures); // after the refusal counter: a ban it starts is not started twice
    ops
}
