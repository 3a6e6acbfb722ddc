//! The per-request decision, in two steps that the host drives:
//! `check_headers` (inventory LVL-1, caller identity ID-1..ID-3, RFC 9421 signature DATA-3,
//! DATA-4, freshness ATK-1) and `check_body` (RFC 9530 digest over the whole body, then the
//! nonce is recorded last, so a refused request never uses up its nonce).

use base64::Engine as _;
use sha2::Digest as _;

use crate::access;
use crate::bans::Subject;
use crate::crypto::{self, EcdsaVerifier};
use crate::error::{Deny, DenyReason};
use crate::message::{signature_base, Request};
use crate::policy::{Api, App, KeyMaterial, Policy, SecurityLevel};
use crate::replay::{self, SharedStore};
use crate::sf::{self, BareItem, InnerList, Member};

/// Headers the gateway owns: any client-sent copy is removed before anything else.
pub const INTERNAL_HEADER_PREFIX: &str = "x-apisec-";
pub const APP_ID_HEADER: &str = "x-app-id";
/// The end user a caller acts for; counts only when the signature covers it.
pub const USER_HEADER: &str = "x-user-id";
const MAX_APP_ID_LEN: usize = 128;
const MAX_NONCE_LEN: usize = 128;

pub fn is_internal_header(name: &str) -> bool {
    name.len() >= INTERNAL_HEADER_PREFIX.len()
        && name
            .get(..INTERNAL_HEADER_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(INTERNAL_HEADER_PREFIX))
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
}

/// What is known about a request so far; filled as the checks go, so that a refusal's audit
/// record says as much as was established before it.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub app: Option<String>,
    pub api: Option<String>,
    /// The verified end user (x-user-id), if any.
    pub user: Option<String>,
    /// How the caller authenticated: `signature`, `certificate` or both.
    pub auth: Option<&'static str>,
    /// The grant that let the call through.
    pub grant: Option<String>,
    /// Set when a refusal of this request started an automatic ban.
    pub ban: Option<String>,
    pub level: Option<SecurityLevel>,
    pub function: Option<String>,
    pub keyid: Option<String>,
    pub nonce: Option<String>,
    pub content_digest: Option<String>,
    pub evidence: Option<Evidence>,
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
fn covers(covered: &[&str], component: &str) -> bool {
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

/// Inventory (LVL-1): the API a request is for. A request that matches none is refused.
pub fn find_api<'p>(policy: &'p Policy, req: &Request) -> Result<&'p Api, Deny> {
    policy.match_api(&req.method, req.path()).ok_or_else(|| {
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

/// Step one, when the request headers arrive, for the API `find_api` gave: identify
/// (lifecycle, bans, app), authenticate (TLS, certificate, signature by level) and authorize
/// (user, lists, grant). `has_body` is true when more data follows.
#[allow(clippy::too_many_arguments)]
pub fn check_headers(
    policy: &Policy,
    api: &Api,
    req: &Request,
    has_body: bool,
    now: u64,
    verifier: &dyn EcdsaVerifier,
    store: &dyn SharedStore,
    ctx: &mut RequestContext,
) -> Result<(), Deny> {
    ctx.api = Some(api.id.clone());
    ctx.level = Some(api.level);
    ctx.function = Some(api.function.clone());
    if let Some(reason) = api.state.refusal() {
        return Err(Deny::new(
            reason,
            format!("API {} is {:?}", api.id, api.state),
        ));
    }
    if let (Some(bans), Some(ip)) = (&policy.bans, req.conn.client_ip) {
        bans.check(store, Subject::Ip(ip), now)?;
    }

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
    if let Some(bans) = &policy.bans {
        bans.check(store, Subject::App(&app.id), now)?;
    }
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
        authenticate(policy, req, app, api, has_body, now, verifier, ctx)?;
    }
    authorize(policy, req, app, api, now, ctx)
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
                "certificate+signature"
            } else {
                "signature"
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
            ctx.auth = Some("certificate");
            ctx.user = req.unique_header(USER_HEADER)?.map(str::to_string);
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
    }
    access::check_opt_out(&policy.opted_out_users, ctx.user.as_deref())?;
    access::check_lists(
        &policy.lists,
        api.index,
        &app.id,
        req.conn.client_ip,
        ctx.user.as_deref(),
    )?;
    if api.level > SecurityLevel::S0 {
        let grant =
            access::select_grant(&policy.grants, &app.id, api.index, ctx.user.as_deref(), now)?;
        ctx.grant = Some(grant.id.clone());
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

    let covered: Vec<&str> = input
        .items
        .iter()
        .filter_map(|i| match &i.bare {
            BareItem::String(s) => Some(s.as_str()),
            _ => None,
        })
        .collect();
    for required in &policy.required_components {
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

    let base = signature_base(req, input)?;
    let ok = match &cred.key {
        KeyMaterial::Hmac(key) => crypto::verify_hmac_sha256(key, base.as_bytes(), signature_bytes),
        KeyMaterial::P256 { spki_der } => verifier
            .verify_p256_sha256(spki_der, base.as_bytes(), signature_bytes)
            .map_err(|e| Deny::new(DenyReason::HostUnavailable, format!("ecdsa verifier: {e}")))?,
    };
    if !ok {
        return Err(Deny::new(
            DenyReason::SignatureInvalid,
            format!("signature {label} by {keyid} does not verify"),
        ));
    }
    if api.level == SecurityLevel::S3 {
        ctx.evidence = Some(Evidence {
            keyid: keyid.clone(),
            alg: cred.alg.as_str(),
            signature_input: sig_input.to_string(),
            signature: sig.to_string(),
            signature_base_sha256: base64::engine::general_purpose::STANDARD
                .encode(sha2::Sha256::digest(base.as_bytes())),
            signature_base: base,
            content_digest: digest.map(str::to_string),
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
        Some(BareItem::Integer(_)) => {}
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

/// Step two, when the whole body is in (an empty slice when there is none): the digest is
/// checked against every byte, then the grant's field rules; only then are the nonce and a
/// use of the grant spent.
pub fn check_body(
    policy: &Policy,
    ctx: &RequestContext,
    body: &[u8],
    store: &dyn SharedStore,
    now: u64,
) -> Result<(), Deny> {
    let level = ctx.level.unwrap_or(SecurityLevel::S3);
    if level == SecurityLevel::S0 {
        return Ok(());
    }
    let signed = ctx.nonce.is_some();
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
    let grant = ctx.grant.as_deref().and_then(|g| policy.grant(g));
    if let Some(g) = grant {
        access::check_request_fields(&g.forbid_request_fields, body)?;
    }
    match (&ctx.app, &ctx.nonce) {
        (Some(app), Some(nonce)) => {
            replay::check_and_record(store, &policy.replay, app, nonce, now)?
        }
        _ if ctx.auth == Some("certificate") => {} // mTLS: the channel itself is fresh
        _ => return Err(Deny::new(DenyReason::NonceMissing, "no verified nonce")),
    }
    match grant {
        Some(g) => access::consume_grant_use(store, g),
        None => Err(Deny::new(DenyReason::NoGrant, "no grant selected")),
    }
}

/// Counts a refusal (or a 429 from Envoy's rate limiter) toward an automatic ban: against the
/// app when one was identified, otherwise against the client IP (PERM-4, RL-3, MON-6).
/// Returns a note for the audit record when this refusal started a ban.
pub fn count_refusal(
    policy: &Policy,
    ctx: &RequestContext,
    client_ip: Option<std::net::IpAddr>,
    reason: DenyReason,
    store: &dyn SharedStore,
    now: u64,
) -> Option<String> {
    let bans = policy.bans.as_ref()?;
    if !reason.counts_toward_ban() {
        return None;
    }
    let subject = match (&ctx.app, client_ip) {
        (Some(app), _) => Subject::App(app),
        (None, Some(ip)) => Subject::Ip(ip),
        (None, None) => return None,
    };
    match bans.record_refusal(store, subject, now) {
        Ok(true) => Some(format!(
            "{} banned for {} s",
            subject.describe(),
            bans.ban_seconds
        )),
        Ok(false) => None,
        Err(e) => Some(format!("ban counter unavailable: {e}")),
    }
}
