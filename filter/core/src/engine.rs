//! The per-request decision, in two steps that the lifecycle drives:
//! `check_headers` (inventory LVL-1, caller identity ID-1..ID-3, RFC 9421 signature DATA-3,
//! DATA-4, freshness ATK-1) and `check_body` (RFC 9530 digest over the whole body, field
//! rules). Both are pure: what they need of stored state (bans, the nonce, grant uses) is
//! named as state operations (`early_ops`, `final_ops`, `refusal_ops`) that run after them, in
//! one batch, so a refused request never uses up its nonce and a remote store is asked once.

use base64::Engine as _;
use sha2::Digest as _;

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

/// Headers the gateway owns: any client-sent copy is removed before anything else.
pub const INTERNAL_HEADER_PREFIX: &str = "x-apisec-";
pub const APP_ID_HEADER: &str = "x-app-id";
/// The end user a caller acts for; counts only when the signature covers it.
pub const USER_HEADER: &str = "x-user-id";
/// A unique id a caller sends with a certificate-only write, checked like a nonce (ATK-1).
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
const MAX_APP_ID_LEN: usize = 128;
const MAX_NONCE_LEN: usize = 128;

/// Client-sent headers some backends and frameworks obey to change the method or the path the
/// gateway checked: stripped before the upstream, or refused (`gateway.override_headers`).
pub const OVERRIDE_HEADERS: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-method",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-override-url",
    // forwarding headers a backend or framework builds its idea of the URL from (issue 21
    // item 5); Envoy itself rewrites x-forwarded-for and x-forwarded-proto
    "x-forwarded-prefix",
    "x-forwarded-path",
    "x-forwarded-host",
    "x-forwarded-uri",
    "x-forwarded-port",
    "x-forwarded-server",
    "x-original-host",
    "forwarded",
];
/// The query or form parameter some frameworks read as the method; it cannot be stripped
/// without changing the signed request, so it is refused.
const METHOD_OVERRIDE_PARAM: &str = "_method";

pub fn is_internal_header(name: &str) -> bool {
    name.len() >= INTERNAL_HEADER_PREFIX.len()
        && name
            .get(..INTERNAL_HEADER_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(INTERNAL_HEADER_PREFIX))
}

fn is_override_header(name: &str) -> bool {
    OVERRIDE_HEADERS
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
}

/// Whether a client-sent header is removed before the request goes upstream: the gateway's
/// own `x-apisec-*` always, routing overrides when the policy strips them.
pub fn strips_header(policy: &Policy, name: &str) -> bool {
    is_internal_header(name)
        || (policy.override_headers == OverrideMode::Strip && is_override_header(name))
}

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
    pub signature_base_sha256: String,
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
}

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
fn presents_session(policy: &Policy, api: &Api) -> bool {
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

/// The client address as the gateway saw it: what a session is bound to.
pub fn client_address(req: &Request) -> Result<String, Deny> {
    req.conn.client_ip.map(|ip| ip.to_string()).ok_or_else(|| {
        Deny::new(
            DenyReason::HostUnavailable,
            "no client address for the session",
        )
    })
}

/// The session a call presents (SES-1): its ID and the device MAC, both required.
fn check_session_headers(req: &Request, ctx: &mut RequestContext) -> Result<(), Deny> {
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

fn single_member<'a>(
    header: &str,
    dict: &'a [(String, Member)],
) -> Result<(&'a str, &'a Member), Deny> {
    match dict {
        [(label, m)] => Ok((label.as_str(), m)),
        _ => Err(Deny::new(
            DenyReason::SignatureAmbiguous,
            format!(
                "{header} carries {} signatures; exactly one is verified",
                dict.len()
            ),
        )),
    }
}

/// Is `component` covered, directly or by an equivalent that includes it?
pub(crate) fn covers(covered: &[&str], component: &str) -> bool {
    if covered.contains(&component) {
        return true;
    }
    match component {
        "@path" | "@query" => {
            covered.contains(&"@target-uri") || covered.contains(&"@request-target")
        }
        "@authority" => covered.contains(&"@target-uri"),
        _ => false,
    }
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
    ctx.level = Some(api.level);
    ctx.function = Some(api.function.clone());
    if let Some(reason) = api.state.refusal() {
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
fn ban_ops(policy: &Policy, ip_ban: Option<std::net::IpAddr>, ctx: &RequestContext) -> Vec<Op> {
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

fn nonce_op(ctx: &RequestContext, now: u64, record: bool) -> Option<Op> {
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

/// The session a call presents, checked and refreshed (logout ends it instead; see
/// `endpoint_ops`).
fn session_op(ctx: &RequestContext) -> Option<Op> {
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

/// What a request that passed every check spends, in one batch: bans first, then its nonce
/// (checked and recorded), then a use of its grant. `check_body` made sure a request that
/// needs a nonce has one.
pub fn final_ops(
    policy: &Policy,
    client_ip: Option<std::net::IpAddr>,
    ip_ban: Option<std::net::IpAddr>,
    ctx: &RequestContext,
    now: u64,
) -> Vec<Op> {
    let mut ops = ban_ops(policy, ip_ban, ctx);
    if ctx.level.is_some_and(|l| l > SecurityLevel::S0) {
        ops.extend(nonce_op(ctx, now, true));
    }
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

/// Routing overrides (issue 8, hole 9): refused when the policy says so; `_method` always,
/// since it is part of the signed request and cannot be stripped.
fn check_overrides(policy: &Policy, req: &Request) -> Result<(), Deny> {
    if policy.override_headers == OverrideMode::Refuse {
        if let Some((name, _)) = req.headers.iter().find(|(n, _)| is_override_header(n)) {
            return Err(Deny::new(
                DenyReason::OverrideNotAllowed,
                format!("routing override header {name} is not accepted"),
            ));
        }
    }
    let overrides_method = req.query().is_some_and(|q| {
        fields::form_keys(q.as_bytes()).any(|key| {
            fields::fold(&String::from_utf8_lossy(&fields::form_decode(key)))
                == METHOD_OVERRIDE_PARAM
        })
    });
    if overrides_method {
        return Err(Deny::new(
            DenyReason::OverrideNotAllowed,
            "the _method query parameter overrides the method",
        ));
    }
    Ok(())
}

/// Whether a request's body is a form (URL-encoded or multipart), which some frameworks read
/// `_method` from: such a body is held and looked at, at every level.
pub fn has_form_body(req: &Request) -> bool {
    req.header_values("content-type").any(|ct| {
        let media = ct.split(';').next().unwrap_or("").trim();
        media.eq_ignore_ascii_case("application/x-www-form-urlencoded")
            || media.eq_ignore_ascii_case("multipart/form-data")
    })
}

/// `_method` in a form body (issue 21 item 5, ATK-1): Rails, Laravel and Express's
/// method-override read it from URL-encoded and multipart bodies as well as the query. It is
/// part of the signed body, so it cannot be stripped: refused.
fn check_form_override(req: &Request, body: &[u8]) -> Result<(), Deny> {
    if body.is_empty() || !has_form_body(req) {
        return Ok(());
    }
    let urlencoded = fields::form_keys(body).any(|key| {
        fields::fold(String::from_utf8_lossy(&fields::form_decode(key)).trim())
            == METHOD_OVERRIDE_PARAM
    });
    // a multipart part named _method, in any case and quoting
    let lower = body.to_ascii_lowercase();
    let multipart = [&b"name=\"_method\""[..], b"name=_method", b"name='_method'"]
        .iter()
        .any(|needle| lower.windows(needle.len()).any(|w| w == *needle));
    if urlencoded || multipart {
        return Err(Deny::new(
            DenyReason::OverrideNotAllowed,
            "a _method form field overrides the method",
        ));
    }
    Ok(())
}

/// ID-2, ID-3, DATA-2..DATA-4: S1 and above need TLS, then the app's client certificate or its
/// signature; S2 and S3 accept only a certificate or a key pair; S3 always needs the signature
/// (evidence). A certificate bound to another app is refused outright.
#[allow(clippy::too_many_arguments)]
fn authenticate(
    policy: &Policy,
    req: &Request,
    app: &App,
    api: &Api,
    has_body: bool,
    now: u64,
    verifier: &dyn EcdsaVerifier,
    ctx: &mut RequestContext,
) -> Result<(), Deny> {
    if !req.conn.tls {
        return Err(Deny::new(
            DenyReason::TlsRequired,
            format!("{} APIs are served over TLS only", api.level.as_str()),
        ));
    }
    let (cert_sha, cert_uri) = (
        req.conn.peer_cert_sha256.as_deref(),
        req.conn.peer_uri_san.as_deref(),
    );
    let cert_ok = app
        .certificates
        .iter()
        .any(|b| b.matches(cert_sha, cert_uri));
    if (cert_sha.is_some() || cert_uri.is_some()) && !cert_ok {
        return Err(Deny::new(
            DenyReason::CertificateMismatch,
            format!("the client certificate is not bound to app {}", app.id),
        ));
    }
    let sig_input = req.unique_header("signature-input")?;
    let sig = req.unique_header("signature")?;
    match (sig_input, sig) {
        (Some(input), Some(sig)) => {
            let user_covered = verify_signature(
                policy, req, app, api, has_body, now, verifier, input, sig, ctx,
            )?;
            ctx.auth = Some(if cert_ok {
                AuthKind::CertificateAndSignature
            } else {
                AuthKind::Signature
            });
            let user = req.unique_header(USER_HEADER)?;
            if user.is_some() && !user_covered {
                return Err(Deny::new(
                    DenyReason::ComponentNotCovered,
                    "x-user-id counts only when the signature covers it",
                ));
            }
            ctx.user = user.map(str::to_string);
            Ok(())
        }
        _ if cert_ok && api.level < SecurityLevel::S3 => {
            // The whole channel is the app's: its user claim is as authentic as the request.
            ctx.auth = Some(AuthKind::Certificate);
            ctx.user = req.unique_header(USER_HEADER)?.map(str::to_string);
            // A write has no signature nonce; its Idempotency-Key is checked like one, so a
            // duplicated write is not executed twice (issue 8, hole 13; ATK-1).
            if !Method::parse(&req.method).is_some_and(Method::is_safe) {
                let key = req.unique_header(IDEMPOTENCY_HEADER)?.ok_or_else(|| {
                    Deny::new(
                        DenyReason::IdempotencyKeyMissing,
                        "a certificate-only write needs an Idempotency-Key",
                    )
                })?;
                if key.is_empty()
                    || key.len() > MAX_NONCE_LEN
                    || !key.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(Deny::new(
                        DenyReason::IdempotencyKeyMissing,
                        "Idempotency-Key is empty, longer than 128 or not printable",
                    ));
                }
                ctx.nonce = Some(format!("\0idempotency\0{key}"));
                ctx.idempotency = true;
                ctx.created = Some(now);
            }
            Ok(())
        }
        _ => Err(Deny::new(
            DenyReason::SignatureMissing,
            if cert_ok {
                "S3 requires a signature even with a client certificate (DATA-4)".to_string()
            } else {
                format!(
                    "{} requires an RFC 9421 signature or the app's client certificate",
                    api.level.as_str()
                )
            },
        )),
    }
}

/// PERM-2, PERM-5, PERM-6, BWL-1, BWL-2 for an identified (and, above S0, authenticated) caller.
fn authorize(
    policy: &Policy,
    req: &Request,
    app: &App,
    api: &Api,
    now: u64,
    ctx: &mut RequestContext,
) -> Result<(), Deny> {
    if let Some(u) = &ctx.user {
        if u.is_empty() || u.len() > 128 || !u.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Deny::new(
                DenyReason::MalformedHeader,
                "x-user-id is empty, too long or not printable",
            ));
        }
        ctx.user = Some(lists::normal_user(u));
    }
    lists::check_opt_out(&policy.opted_out_users, ctx.user.as_deref())?;
    lists::check_lists(
        &policy.lists,
        api.index,
        &app.id,
        req.conn.client_ip,
        ctx.user.as_deref(),
    )?;
    if api.level > SecurityLevel::S0 {
        let i = access::select_grant(&policy.grants, &app.id, api.index, ctx.user.as_deref(), now)?;
        ctx.grant = policy.grants.get(i).map(|g| g.id.clone());
        ctx.grant_index = Some(i);
    }
    Ok(())
}

/// Verifies the one RFC 9421 signature; returns whether it covers `x-user-id`.
#[allow(clippy::too_many_arguments)]
fn verify_signature(
    policy: &Policy,
    req: &Request,
    app: &App,
    api: &Api,
    has_body: bool,
    now: u64,
    verifier: &dyn EcdsaVerifier,
    sig_input: &str,
    sig: &str,
    ctx: &mut RequestContext,
) -> Result<bool, Deny> {
    let digest_owned = ctx.content_digest.clone();
    let digest = digest_owned.as_deref();
    if sig_input.len() + sig.len() > policy.max_signature_header_bytes as usize {
        return Err(Deny::new(
            DenyReason::HeaderTooLarge,
            "signature headers too large",
        ));
    }
    let malformed = |what: &str, e: sf::SfError| {
        Deny::new(DenyReason::SignatureMalformed, format!("{what}: {e}"))
    };
    let inputs = sf::parse_dictionary(sig_input).map_err(|e| malformed("signature-input", e))?;
    let sigs = sf::parse_dictionary(sig).map_err(|e| malformed("signature", e))?;
    let (label, input_member) = single_member("signature-input", &inputs)?;
    let (sig_label, sig_member) = single_member("signature", &sigs)?;
    if label != sig_label {
        return Err(Deny::new(
            DenyReason::SignatureMalformed,
            "signature and signature-input labels differ",
        ));
    }
    let Member::InnerList(input) = input_member else {
        return Err(Deny::new(
            DenyReason::SignatureMalformed,
            "signature-input member is not an inner list",
        ));
    };
    let signature_bytes = match sig_member {
        Member::Item(sf::Item {
            bare: BareItem::ByteSeq(b),
            ..
        }) => b,
        _ => {
            return Err(Deny::new(
                DenyReason::SignatureMalformed,
                "signature member is not a byte sequence",
            ))
        }
    };

    check_params(policy, input, now, ctx)?;
    let keyid = ctx.keyid.clone().unwrap_or_default();
    let cred = app.credential(&keyid).ok_or_else(|| {
        Deny::new(
            DenyReason::UnknownKey,
            format!("keyid {keyid:?} is not a credential of {}", app.id),
        )
    })?;
    if let Some(BareItem::String(alg)) = sf::param(&input.params, "alg") {
        if alg != cred.alg.as_str() {
            return Err(Deny::new(
                DenyReason::AlgMismatch,
                format!(
                    "alg {alg:?} but credential {keyid} is {}",
                    cred.alg.as_str()
                ),
            ));
        }
    }
    if !cred.alg.allowed_for(api.level) {
        return Err(Deny::new(
            DenyReason::CredentialNotAllowed,
            format!(
                "{} credentials cannot call {} APIs",
                cred.alg.as_str(),
                api.level.as_str()
            ),
        ));
    }

    if input.items.len() > policy.max_covered_components {
        return Err(Deny::new(
            DenyReason::SignatureTooComplex,
            format!(
                "{} covered components, at most {}",
                input.items.len(),
                policy.max_covered_components
            ),
        ));
    }
    let covered: Vec<&str> = input
        .items
        .iter()
        .filter_map(|i| match &i.bare {
            BareItem::String(s) => Some(s.as_str()),
            _ => None,
        })
        .collect();
    // A call presenting a session signs it: the session headers it sends must be covered
    // (their absence is `session_required`, decided after authentication).
    let session_headers: Vec<&str> = if presents_session(policy, api) {
        [sessions::SESSION_HEADER, sessions::MAC_HEADER]
            .into_iter()
            .filter(|h| req.header_values(h).next().is_some())
            .collect()
    } else {
        Vec::new()
    };
    for required in policy
        .required_components
        .iter()
        .map(String::as_str)
        .chain(session_headers.iter().copied())
    {
        if !covers(&covered, required) {
            return Err(Deny::new(
                DenyReason::ComponentNotCovered,
                format!("{required} is not covered"),
            ));
        }
    }
    if has_body && digest.is_none() {
        return Err(Deny::new(
            DenyReason::DigestMissing,
            "a request with a body needs content-digest",
        ));
    }
    if digest.is_some() && !covered.contains(&"content-digest") {
        return Err(Deny::new(
            DenyReason::ComponentNotCovered,
            "content-digest is not covered",
        ));
    }

    let base = signature_base(req, input, policy.max_signature_base_bytes)?;
    let ok = match &cred.key {
        KeyMaterial::Hmac(key) => crypto::verify_hmac_sha256(key, base.as_bytes(), signature_bytes),
        KeyMaterial::P256 { spki_der, .. } => verifier
            .verify_p256_sha256(spki_der, base.as_bytes(), signature_bytes)
            .map_err(|e| Deny::new(DenyReason::HostUnavailable, format!("ecdsa verifier: {e}")))?,
    };
    if !ok {
        if app.onboarding {
            ctx.onboarding_base = Some(base);
        }
        return Err(Deny::new(
            DenyReason::SignatureInvalid,
            format!("signature {label} by {keyid} does not verify"),
        ));
    }
    if api.level == SecurityLevel::S3 {
        let base_sha256 =
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(base.as_bytes()));
        // the session ID the signature covers stays out of the log (issue 21 item 6)
        let (base, session_sealed) =
            match evidence::seal_session(policy.audit.key.as_ref(), &base, &base_sha256) {
                Some((logged, sealed)) => (logged, sealed),
                None => (base, None),
            };
        ctx.evidence = Some(Evidence {
            keyid: keyid.clone(),
            alg: cred.alg.as_str(),
            signature_input: sig_input.to_string(),
            signature: sig.to_string(),
            signature_base_sha256: base_sha256,
            signature_base: base,
            session_sealed,
            content_digest: digest.map(str::to_string),
            key_sha256: match &cred.key {
                KeyMaterial::P256 { sha256, .. } => Some(sha256.clone()),
                KeyMaterial::Hmac(_) => None,
            },
        });
    }
    Ok(covered.contains(&USER_HEADER))
}

fn check_params(
    policy: &Policy,
    input: &InnerList,
    now: u64,
    ctx: &mut RequestContext,
) -> Result<(), Deny> {
    let bad = |what: &str| Deny::new(DenyReason::SignatureMalformed, what.to_string());
    let created = match sf::param(&input.params, "created") {
        None => {
            return Err(Deny::new(
                DenyReason::CreatedMissing,
                "no created parameter",
            ))
        }
        Some(BareItem::Integer(c)) if *c >= 0 => *c as u64,
        Some(_) => return Err(bad("created is not a non-negative integer")),
    };
    ctx.created = Some(created);
    let skew = policy.clock_skew_seconds;
    if created.saturating_add(skew) < now {
        return Err(Deny::new(
            DenyReason::CreatedTooOld,
            format!("created {created}, now {now}, skew {skew}"),
        ));
    }
    if created > now.saturating_add(skew) {
        return Err(Deny::new(
            DenyReason::CreatedInFuture,
            format!("created {created}, now {now}, skew {skew}"),
        ));
    }
    match sf::param(&input.params, "expires") {
        None => {}
        Some(BareItem::Integer(e)) if *e < 0 || (*e as u64) <= now => {
            return Err(Deny::new(
                DenyReason::SignatureExpired,
                format!("expires {e}, now {now}"),
            ));
        }
        Some(BareItem::Integer(e)) => ctx.expires = Some(*e as u64),
        Some(_) => return Err(bad("expires is not an integer")),
    }
    match sf::param(&input.params, "nonce") {
        Some(BareItem::String(n)) if !n.is_empty() && n.len() <= MAX_NONCE_LEN => {
            ctx.nonce = Some(n.clone())
        }
        Some(BareItem::String(_)) => {
            return Err(Deny::new(
                DenyReason::NonceMissing,
                "nonce empty or longer than 128",
            ))
        }
        None => return Err(Deny::new(DenyReason::NonceMissing, "no nonce parameter")),
        Some(_) => return Err(bad("nonce is not a string")),
    }
    match sf::param(&input.params, "keyid") {
        Some(BareItem::String(k)) => ctx.keyid = Some(k.clone()),
        None => return Err(Deny::new(DenyReason::UnknownKey, "no keyid parameter")),
        Some(_) => return Err(bad("keyid is not a string")),
    }
    match sf::param(&input.params, "alg") {
        None | Some(BareItem::String(_)) => Ok(()),
        Some(_) => Err(bad("alg is not a string")),
    }
}

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

/// What may have changed while a body was arriving under the same policy: the time bound on
/// the body itself, the signature's `expires` and `created` window, the grant's validity and
/// windows. (Bans that started meanwhile are checked by the final batch.)
fn recheck(policy: &Policy, ctx: &RequestContext, now: u64) -> Result<(), Deny> {
    let took = now.saturating_sub(ctx.started);
    if took > policy.max_body_seconds {
        return Err(Deny::new(
            DenyReason::BodyTimeout,
            format!(
                "the body took {took} s, at most {}",
                policy.max_body_seconds
            ),
        ));
    }
    if let Some(e) = ctx.expires.filter(|e| *e <= now) {
        return Err(Deny::new(
            DenyReason::SignatureExpired,
            format!("expires {e}, now {now} (when the body completed)"),
        ));
    }
    if let Some(c) = ctx
        .created
        .filter(|c| c.saturating_add(policy.clock_skew_seconds) < now)
    {
        return Err(Deny::new(
            DenyReason::CreatedTooOld,
            format!("created {c}, now {now} (when the body completed)"),
        ));
    }
    if let Some(g) = ctx.grant_index.and_then(|i| policy.grants.get(i)) {
        access::check_grant_validity(g, now)?;
    }
    Ok(())
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
    let mut ops = ban_ops(policy, ip_ban, ctx);
    if reason.counts_toward_ban() {
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
