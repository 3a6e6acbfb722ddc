//! The per-request decision, in two steps that the lifecycle drives:
//! `check_headers` (inventory LVL-1, caller identity ID-1..ID-3, RFC 9421 signature DATA-3,
//! DATA-4, freshness ATK-1) and `check_body` (RFC 9530 digest over the whole body, field
//! rules). Both are pure: what they need of stored state (bans, the nonce, grant uses) is
//! named as state operations (`early_ops`, `final_ops`, `refusal_ops`) that run after them, in
//! one batch, so a refused request never uses up its nonce and a remote store is asked once.

use crate::access;
use crate::anomaly;
use crate::crypto::{self, EcdsaVerifier};
use crate::error::{Deny, DenyReason};
use crate::evidence;
use crate::fields;
use crate::lists;
use crate::message::{signature_base, Method, Request};
use crate::policy::{Api, App, KeyMaterial, OverrideMode, Policy, SecurityLevel};
use crate::routes;
use crate::sdk;
use crate::sessions;
use crate::sf::{self, BareItem, InnerList, Member};
use crate::state::{BanSubject, Op, SessionCall};

mod authorize;
mod body;
mod overrides;
mod session_calls;
mod signature;
mod store_ops;

use authorize::*;
pub use body::*;
pub use overrides::*;
pub use session_calls::*;
pub(crate) use signature::*;
pub use store_ops::*;

/// Headers the gateway owns: any client-sent copy is removed before anything else.
pub const INTERNAL_HEADER_PREFIX: &str = "x-apisec-";
pub const APP_ID_HEADER: &str = "x-app-id";
/// The end user a caller acts for; counts only when the signature covers it.
pub const USER_HEADER: &str = "x-user-id";
/// A unique id a caller sends with a certificate-only write, checked like a nonce (ATK-1).
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
const MAX_APP_ID_LEN: usize = 128;
const MAX_NONCE_LEN: usize = 128;

/// What the host lends a decision: the ECDSA verifier.
pub struct Host<'a> {
    pub verifier: &'a dyn EcdsaVerifier,
}

/// How a caller proved to be its app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// An RFC 9421 signature by one of the app's credentials.
    Signature,
    /// The app's client certificate on the mTLS listener, alone.
    Certificate,
    /// Both: the certificate is the app's and the request is signed.
    CertificateAndSignature,
}

impl AuthKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthKind::Signature => "signature",
            AuthKind::Certificate => "certificate",
            AuthKind::CertificateAndSignature => "certificate+signature",
        }
    }
}

/// What a third party needs to re-verify an S3 request later (DATA-4): the exact signature
/// base, the signature and the key that made it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Evidence {
    pub keyid: String,
    pub alg: &'static str,
    pub signature_input: String,
    pub signature: String,
    /// The hash of the signed base where the logged one differs from it (evidence.rs
    /// `seal_session`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature_base_sha256: Option<String>,
    pub signature_base: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_digest: Option<String>,
    /// The fingerprint of the public key that verified it (evidence.rs): re-verification finds
    /// the key by it, also after the key was rotated out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    /// The session ID the signature covers, sealed under the audit key (evidence.rs); the
    /// logged base has `[sealed]` in its place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_sealed: Option<String>,
}

/// What is known about a request so far; filled as the checks go, so that a refusal's audit
/// record says as much as was established before it.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub app: Option<String>,
    pub api: Option<String>,
    /// The API's place in the inventory of the policy that matched it.
    pub api_index: Option<usize>,
    /// The verified end user (x-user-id), if any.
    pub user: Option<String>,
    /// How the caller authenticated (None: not authenticated, as at S0).
    pub auth: Option<AuthKind>,
    /// The grant that let the call through: its id (for the audit record) and its index in
    /// the policy that selected it (the stream keeps that policy, or decides again).
    pub grant: Option<String>,
    pub grant_index: Option<usize>,
    /// Set when a refusal of this request started an automatic ban (or could not be counted).
    pub ban: Option<String>,
    pub level: Option<SecurityLevel>,
    pub function: Option<String>,
    pub keyid: Option<String>,
    pub nonce: Option<String>,
    pub content_digest: Option<String>,
    pub evidence: Option<Evidence>,
    /// The signature's `created` and `expires` (re-checked when a body completes late).
    pub created: Option<u64>,
    pub expires: Option<u64>,
    /// The nonce is a certificate-only write's `Idempotency-Key`, not a signature nonce.
    pub idempotency: bool,
    /// Gateway time when the headers were decided, and the policy generation that decided them.
    pub started: u64,
    pub generation: u64,
    /// The signature base of a signature that did not verify, kept only for an app in
    /// onboarding: its refusal shows it to the caller.
    pub onboarding_base: Option<String>,
    /// The session the call presents (`x-session-id`) and the device MAC (normal form).
    pub session: Option<String>,
    pub mac: Option<String>,
    /// The client address a session is bound to (set for calls presenting or creating one).
    pub client_ip: Option<String>,
    /// For the audit record: a fingerprint of the session (never the ID) and what happened to
    /// it (created, logged_out, ended_by_operator).
    pub session_fp: Option<String>,
    pub session_event: Option<&'static str>,
    /// The operator (client certificate URI SAN) and what they ended, on the operator path.
    pub operator: Option<String>,
    /// The user the session carries and the factors they logged in with, once read (ID-4).
    pub session_user: Option<(String, u8)>,
    /// The caller's SDK version when it is not acceptable (sdk.rs): flagged or refused.
    pub sdk: Option<sdk::SdkFlag>,
    /// Anomaly rules the call matched (anomaly.rs): recorded, counted, and refused if one blocks.
    pub anomalies: Vec<anomaly::Anomaly>,
    /// Rate-limit rules the call went over (rate_limits.rs): recorded and counted.
    pub rate_limits: Vec<crate::state::rate_limits::RateHit>,
}

/// The client address as the gateway saw it: what a session is bound to.
pub fn client_address(req: &Request) -> Result<String, Deny> {
    req.conn.client_ip.map(|ip| ip.to_string()).ok_or_else(|| {
        Deny::new(
            DenyReason::HostUnavailable,
            "no client address for the session",
        )
    })
}

/// The first step for every request: the route it came through (when the policy narrows per
/// route, routes.rs) and the inventory (LVL-1) name the API. (Bans are state: every batch a
/// request runs checks them first, see `ban_ops`.)
pub fn begin<'p>(policy: &'p Policy, req: &Request) -> Result<&'p Api, Deny> {
    let route = routes::find(&policy.routes, req.route.as_deref())?;
    let api = find_api(policy, req)?;
    if let Some(r) = route {
        routes::check_api(r, api)?;
    }
    Ok(api)
}

/// The registered app a request names in a single `x-app-id`, unverified: what a shadow-API
/// call (one outside the inventory, never authenticated) is recorded and counted with.
pub fn claimed_app(policy: &Policy, req: &Request) -> Option<String> {
    let id = req.unique_header(APP_ID_HEADER).ok().flatten()?;
    policy.app(id).map(|a| a.id.clone())
}

/// Inventory (LVL-1): the API a request is for. A request that matches none is refused.
pub fn find_api<'p>(policy: &'p Policy, req: &Request) -> Result<&'p Api, Deny> {
    let method = Method::parse(&req.method);
    method
        .and_then(|m| policy.match_api(m, req.path()))
        .ok_or_else(|| {
            Deny::new(
                DenyReason::UnknownApi,
                format!("{} {} is not in the inventory", req.method, req.path()),
            )
        })
}

/// Whether deciding a request for `api` needs the transport facts beyond the client address
/// (TLS, the verified client certificate). Only S1 and above look at them (ID-2, ID-3, DATA-1),
/// and each fact costs the host a property lookup, so an S0 request is decided without them.
pub fn needs_transport(api: &Api) -> bool {
    api.level > SecurityLevel::S0
}

/// Step one, when the request headers arrive, for the API `begin` gave: identify (lifecycle,
/// bans, app), authenticate (TLS, certificate, signature by level) and authorize (user, lists,
/// grant). `has_body` is true when more data follows.
pub fn check_headers(
    policy: &Policy,
    api: &Api,
    req: &Request,
    has_body: bool,
    now: u64,
    host: &Host<'_>,
    ctx: &mut RequestContext,
) -> Result<(), Deny> {
    ctx.started = now;
    ctx.generation = policy.generation;
    ctx.api = Some(api.id.clone());
    ctx.api_index = Some(api.index);
    ctx.level = Some(api.level);
    ctx.function = Some(api.function.clone());
    if let Some(reason) = api.state.refusal() {
        // recorded with the registered app it claims (unverified, as a shadow-API call is),
        // so that the callers still using an API out of service can be found (OPS-1)
        ctx.app = claimed_app(policy, req);
        return Err(Deny::new(
            reason,
            format!("API {} is {:?}", api.id, api.state),
        ));
    }
    check_overrides(policy, req)?;

    let app_id = req
        .unique_header(APP_ID_HEADER)?
        .ok_or_else(|| Deny::new(DenyReason::AppIdMissing, "no x-app-id"))?;
    if app_id.is_empty()
        || app_id.len() > MAX_APP_ID_LEN
        || !app_id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Deny::new(
            DenyReason::MalformedHeader,
            "x-app-id is empty, too long or not printable",
        ));
    }
    let app = policy.app(app_id).ok_or_else(|| {
        Deny::new(
            DenyReason::UnknownApp,
            format!("app {app_id:?} is not registered"),
        )
    })?;
    ctx.app = Some(app.id.clone());
    if app.suspended {
        return Err(Deny::new(
            DenyReason::AppSuspended,
            format!("app {} is suspended", app.id),
        ));
    }
    if !app.allowed_ips.is_empty() {
        let inside = req
            .conn
            .client_ip
            .is_some_and(|ip| app.allowed_ips.iter().any(|c| c.contains(ip)));
        if !inside {
            return Err(Deny::new(
                DenyReason::IpNotAllowed,
                format!(
                    "{:?} is outside the source ranges of {}",
                    req.conn.client_ip, app.id
                ),
            ));
        }
    }

    let digest = req.unique_header("content-digest")?;
    ctx.content_digest = digest.map(str::to_string);
    if let Some(d) = digest {
        if d.len() > policy.max_signature_header_bytes as usize {
            return Err(Deny::new(
                DenyReason::HeaderTooLarge,
                "content-digest too large",
            ));
        }
    }

    if api.level > SecurityLevel::S0 {
        authenticate(policy, req, app, api, has_body, now, host.verifier, ctx)?;
    }
    if let Some(rule) = &app.sdk {
        let sent = req.unique_header(sdk::SDK_HEADER)?;
        let (flag, refused) = sdk::check(rule, sent);
        ctx.sdk = flag;
        if let Some(d) = refused {
            return Err(d);
        }
    }
    if !policy.anomalies.is_empty() {
        ctx.anomalies = policy
            .anomalies
            .check(&app.id, &api.id, req.conn.client_ip, now);
        if let Some(d) = anomaly::blocking(&ctx.anomalies) {
            return Err(d);
        }
    }
    if presents_session(policy, api) {
        check_session_headers(req, ctx)?;
    }
    if needs_session_user(policy, api) {
        return Ok(()); // authorized once the session's user is known
    }
    authorize(policy, req, app, api, now, ctx)
}
