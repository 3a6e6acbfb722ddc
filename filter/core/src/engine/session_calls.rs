//! What a request carries of sessions (SES-1, ID-4): the session endpoints the gateway
//! answers, the session headers a call presents, and the user a session lends it.

use super::*;

/// The session endpoints the gateway answers itself (sessions.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Create,
    Logout,
}

/// Whether `api` is a session endpoint of the policy.
pub fn endpoint(policy: &Policy, api: &Api) -> Option<Endpoint> {
    let s = policy.sessions.as_ref()?;
    if api.index == s.create_api {
        Some(Endpoint::Create)
    } else if api.index == s.logout_api {
        Some(Endpoint::Logout)
    } else {
        None
    }
}

/// Whether a call to `api` presents a session (an API marked `session: required`, logout, or
/// a user-bound API when the policy has sessions).
pub(super) fn presents_session(policy: &Policy, api: &Api) -> bool {
    api.session_required
        || endpoint(policy, api) == Some(Endpoint::Logout)
        || needs_session_user(policy, api)
}

/// Whether `api` acts for an end user who must have logged in on the session (ID-4): an API
/// marked `user_auth` when the policy has sessions. Its authorization waits for the session's
/// user (`apply_session_user`).
pub fn needs_session_user(policy: &Policy, api: &Api) -> bool {
    api.user_auth && policy.sessions.is_some() && endpoint(policy, api).is_none()
}

/// The session's user for a user-bound API (ID-4): someone logged in on it, with two factors
/// at S2 and S3; a client's `x-user-id` must name the same user; then the call is authorized
/// for that user (opt-out, user lists, user grants).
pub fn apply_session_user(
    policy: &Policy,
    req: &Request,
    user: Option<&str>,
    factors: u8,
    now: u64,
    ctx: &mut RequestContext,
) -> Result<(), Deny> {
    let Some(user) = user else {
        return Err(Deny::new(
            DenyReason::UserLoginRequired,
            "no user has logged in on this session",
        ));
    };
    let level = ctx.level.unwrap_or(SecurityLevel::S3);
    if level >= SecurityLevel::S2 && factors < 2 {
        return Err(Deny::new(
            DenyReason::MfaRequired,
            format!(
                "the user logged in with {factors} factor(s); {} needs two",
                level.as_str()
            ),
        ));
    }
    if let Some(claimed) = ctx.user.as_deref() {
        if lists::normal_user(claimed) != user {
            return Err(Deny::new(
                DenyReason::UserMismatch,
                "x-user-id is not the session's user",
            ));
        }
    }
    ctx.user = Some(user.to_string());
    ctx.session_user = Some((user.to_string(), factors));
    let api = find_api(policy, req)?;
    let app = ctx
        .app
        .as_deref()
        .and_then(|a| policy.app(a))
        .ok_or_else(|| Deny::new(DenyReason::UnknownApp, "the app is gone"))?;
    authorize(policy, req, app, api, now, ctx)
}

/// The session a call presents (SES-1): its ID and the device MAC, both required.
pub(super) fn check_session_headers(req: &Request, ctx: &mut RequestContext) -> Result<(), Deny> {
    let id = req.unique_header(sessions::SESSION_HEADER)?;
    let mac = req.unique_header(sessions::MAC_HEADER)?;
    let id = id.filter(|i| {
        (16..=128).contains(&i.len())
            && i.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    let mac = mac.and_then(sessions::normal_mac);
    ctx.client_ip = Some(client_address(req)?);
    match (id, mac) {
        (Some(id), Some(mac)) => {
            ctx.session = Some(id.to_string());
            ctx.mac = Some(mac);
            Ok(())
        }
        (None, _) => Err(Deny::new(
            DenyReason::SessionRequired,
            "no valid x-session-id",
        )),
        (_, None) => Err(Deny::new(
            DenyReason::SessionRequired,
            "no valid x-device-mac",
        )),
    }
}

/// The session a call presents, checked and refreshed (logout ends it instead; see
/// `endpoint_ops`).
pub(super) fn session_op(ctx: &RequestContext) -> Option<Op> {
    Some(Op::SessionUse(session_call(ctx)?))
}

/// What a call presents of its session, for the state operations.
pub fn session_call(ctx: &RequestContext) -> Option<SessionCall> {
    Some(SessionCall {
        id: ctx.session.clone()?,
        app: ctx.app.clone()?,
        ip: ctx.client_ip.clone()?,
        mac: ctx.mac.clone()?,
    })
}
