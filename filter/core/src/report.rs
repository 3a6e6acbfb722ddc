//! Report-only mode (a dry run): a new rule is evaluated and its refusals are counted and
//! audited as "would refuse", with their code, while the request goes on, as Envoy RBAC's shadow
//! rules do. It can be set for the whole policy (`gateway.mode`), for one API (`apis[].mode`)
//! or for one Envoy route (`routes[].mode`); any of them puts a request in report mode.
//!
//! What is never reported, only enforced: S3 APIs unless the policy says
//! `gateway.report_only_s3: true` (shown by `apisec compliance`); a ban already in force; and
//! the refusals that protect the gateway itself or data a decision already covers (host
//! failures, a worker's held-body bound, body size, a response whose hidden fields cannot be
//! removed), a routing override a backend might obey, anything at the session endpoints the
//! gateway answers itself, plus what is not a decision of this filter (a limiter's 429, an
//! abandoned request) and the policy's rate limits, which protect the backend (a new limit is
//! tried with `action: alert`).

use crate::engine;
use crate::error::DenyReason;
use crate::inventory::{Api, SecurityLevel};
use crate::message::Request;
use crate::policy::Policy;
use crate::routes::{self, Route};

/// Refusals that report mode can turn into "would refuse".
pub fn reportable(reason: DenyReason) -> bool {
    !matches!(
        reason,
        DenyReason::Banned
            | DenyReason::HostUnavailable
            | DenyReason::GatewayBusy
            | DenyReason::BodyTooLarge
            | DenyReason::ResponseUnfilterable
            | DenyReason::RateLimited
            | DenyReason::RequestAbandoned
            | DenyReason::OverrideNotAllowed
    )
}

/// Whether a refusal for `reason` of a request for `api` (None: not identified) through `route`
/// is reported instead of enforced.
pub fn reported(
    policy: &Policy,
    api: Option<&Api>,
    route: Option<&Route>,
    reason: DenyReason,
) -> bool {
    let report = policy.mode.is_report()
        || api.is_some_and(|a| a.mode.is_report())
        || route.is_some_and(|r| r.mode.is_report());
    if !report || !reportable(reason) {
        return false;
    }
    // The session endpoints are answered by the gateway: nothing of them may go upstream.
    if api.is_some_and(|a| engine::endpoint(policy, a).is_some()) {
        return false;
    }
    match api {
        Some(a) if a.level == SecurityLevel::S3 => policy.report_only_s3,
        _ => true,
    }
}

/// Whether anything in the policy is in report mode (a refusal need not look further if not).
pub fn any(policy: &Policy) -> bool {
    policy.mode.is_report()
        || policy.routes.iter().any(|r| r.mode.is_report())
        || policy.apis().iter().any(|a| a.mode.is_report())
}

/// Whether this request's refusal for `reason` is reported instead of enforced: the request's
/// API and route as far as they can be told.
pub fn reported_request(policy: &Policy, req: &Request, reason: DenyReason) -> bool {
    if !any(policy) {
        return false;
    }
    let api = engine::find_api(policy, req).ok();
    let route = routes::find(&policy.routes, req.route.as_deref())
        .ok()
        .flatten();
    reported(policy, api, route, reason)
}
