//! The two error boundaries: `ConfigError` for operators (a refused policy), and `DenyReason`
//! for a refused request (status + snake_case code to the caller; detail to the audit log only).

use std::fmt;

/// Why a policy document was refused. The message names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

macro_rules! deny_reasons {
    ($( $(#[$doc:meta])* $variant:ident => ($code:literal, $status:literal) ),* $(,)?) => {
        /// Why a request was refused. The code is stable: callers, audit records, metrics and
        /// the refusal table (docs/partners.md) all use it.
        #[non_exhaustive]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DenyReason {
            $( $(#[$doc])* $variant, )*
        }

        impl DenyReason {
            pub const ALL: &'static [DenyReason] = &[$(DenyReason::$variant),*];

            pub fn code(self) -> &'static str {
                match self { $(DenyReason::$variant => $code,)* }
            }

            pub fn status(self) -> u32 {
                match self { $(DenyReason::$variant => $status,)* }
            }
        }
    };
}

deny_reasons! {
    /// No `x-app-id` header (ID-1).
    AppIdMissing => ("app_id_missing", 401),
    /// `x-app-id` names no app in the policy.
    UnknownApp => ("unknown_app", 401),
    /// Method and path match no API in the inventory (LVL-1: deny by default).
    UnknownApi => ("unknown_api", 403),
    /// A header that must be unique (x-app-id, Signature, Signature-Input, Content-Digest) was repeated.
    DuplicateHeader => ("duplicate_header", 400),
    /// A header value is not valid for its field.
    MalformedHeader => ("malformed_header", 400),
    /// Signature headers, or all headers together, exceed the configured size.
    HeaderTooLarge => ("header_too_large", 400),
    /// Request body larger than `limits.max_body_bytes`.
    BodyTooLarge => ("body_too_large", 413),
    /// The API's level requires a signature and none was sent (ID-2, DATA-3).
    SignatureMissing => ("signature_missing", 401),
    /// `Signature` / `Signature-Input` are not valid structured fields, or their labels differ.
    SignatureMalformed => ("signature_malformed", 400),
    /// More than one signature label: the gateway verifies exactly one.
    SignatureAmbiguous => ("signature_ambiguous", 400),
    /// The signature does not verify over the signature base.
    SignatureInvalid => ("signature_invalid", 401),
    /// `expires` is in the past.
    SignatureExpired => ("signature_expired", 401),
    /// `created` parameter absent.
    CreatedMissing => ("created_missing", 401),
    /// `created` older than the skew window.
    CreatedTooOld => ("created_too_old", 401),
    /// `created` further in the future than the skew window.
    CreatedInFuture => ("created_in_future", 401),
    /// `nonce` parameter absent or empty (ATK-1).
    NonceMissing => ("nonce_missing", 401),
    /// The (app, nonce) pair was already accepted (ATK-1).
    NonceReplayed => ("nonce_replayed", 401),
    /// `keyid` names no credential of this app.
    UnknownKey => ("unknown_key", 401),
    /// The request's `alg` differs from the credential's registered algorithm.
    AlgMismatch => ("alg_mismatch", 401),
    /// The credential's algorithm is not strong enough for the API's level (ID-3).
    CredentialNotAllowed => ("credential_not_allowed", 401),
    /// The credential (key, secret or bound certificate) is past its `not_after` (OPS-2).
    CredentialExpired => ("credential_expired", 401),
    /// The credential's `not_before` has not come yet (OPS-2).
    CredentialNotYetValid => ("credential_not_yet_valid", 401),
    /// The API takes the national algorithms only (DATA-5): an international signature, a
    /// client certificate alone, or a Content-Digest without `sm3`.
    NationalAlgorithmRequired => ("national_algorithm_required", 401),
    /// A component the policy requires is not covered by the signature.
    ComponentNotCovered => ("component_not_covered", 401),
    /// A covered component is absent from the request, or unsupported.
    ComponentMissing => ("component_missing", 400),
    /// A body was sent but `Content-Digest` is missing (DATA-3).
    DigestMissing => ("digest_missing", 401),
    /// `Content-Digest` does not match the body.
    DigestMismatch => ("digest_mismatch", 401),
    /// `Content-Digest` carries no supported algorithm (sha-256, sha-512).
    DigestUnsupported => ("digest_unsupported", 400),
    /// The replay store is full of live nonces: refuse rather than forget one (fail closed).
    ReplayStoreFull => ("replay_store_full", 503),
    /// The host's shared store or crypto failed: fail closed.
    HostUnavailable => ("host_unavailable", 503),
    /// The cluster state store did not answer in time, or answered something unexpected: the
    /// request cannot be checked against state every replica shares, so it is refused.
    StateUnavailable => ("state_unavailable", 503),
    /// The API needs a session and the call carries no `x-session-id` / `x-device-mac` (SES-1).
    SessionRequired => ("session_required", 401),
    /// The session does not exist (never established, logged out, evicted, ended by an
    /// operator) or is not this caller's (another app, client IP or device MAC) (SES-1, SES-3, SES-4).
    SessionInvalid => ("session_invalid", 401),
    /// The session was idle longer than its timeout, or is past its absolute lifetime (SES-2).
    SessionExpired => ("session_expired", 401),
    /// The session request's body is not what the endpoint takes (caller code, MAC).
    SessionRequestInvalid => ("session_request_invalid", 400),
    /// Too many sessions established by this app, or by this app from this source, this minute
    /// (`sessions.establish_per_minute`, `establish_per_source_per_minute`).
    SessionRateLimited => ("session_rate_limited", 429),
    /// No room for a new session: its place in the store is full of other apps' live sessions
    /// (never evicted for it).
    SessionStoreFull => ("session_store_full", 503),
    /// A user-bound API (`user_auth`) called on a session no user has logged in on (ID-4).
    UserLoginRequired => ("user_login_required", 401),
    /// A user-bound S2/S3 API called on a session whose user logged in with one factor (ID-4).
    MfaRequired => ("mfa_required", 403),
    /// The caller's `x-user-id` is not the session's user: a client cannot override it.
    UserMismatch => ("user_mismatch", 403),
    /// The login service's report (`sessions.login_header`) is not `user=<id>; factors=<n>`:
    /// the login answer is withheld.
    LoginReportInvalid => ("login_report_invalid", 502),
    /// The operator path was reached without an operator's client certificate (SES-4, OPS-6).
    OperatorNotAllowed => ("operator_not_allowed", 403),
    /// The caller's SDK (`x-sdk-version`) is below its app's minimum, a known-bad version,
    /// missing or not a version, and the app's `sdk.action` is `refuse`.
    SdkOutdated => ("sdk_outdated", 403),
    /// An anomaly rule in block mode matched: outside working hours, outside the app's usual
    /// source ranges, a bulk pull, a source the app never called from (MON-3, MON-9).
    AnomalyBlocked => ("anomaly_blocked", 403),
    /// The request came through an Envoy route the policy does not name, or the route does not
    /// serve this API (per-route policy).
    RouteNotAllowed => ("route_not_allowed", 403),
    /// The API is a draft: not yet through review (OPS-1).
    ApiNotPublished => ("api_not_published", 404),
    /// The API (or its group) is switched offline: degradation or circuit breaker (OPS-1, MON-5).
    ApiOffline => ("api_offline", 503),
    /// The API is retired (OPS-1).
    ApiRetired => ("api_retired", 410),
    /// The app is suspended by the operator (MON-5).
    AppSuspended => ("app_suspended", 403),
    /// The client IP is outside the app's allowed source ranges (BWL-1).
    IpNotAllowed => ("ip_not_allowed", 403),
    /// S1 and above need TLS (DATA-1, DATA-2).
    TlsRequired => ("tls_required", 403),
    /// The client certificate is not bound to the claimed app (ID-2, ID-3).
    CertificateMismatch => ("certificate_mismatch", 401),
    /// No grant lets this app call this API (PERM-2).
    NoGrant => ("no_grant", 403),
    /// The grant's contract period has not started (PERM-5).
    GrantNotYetValid => ("grant_not_yet_valid", 403),
    /// The grant's contract period is over (PERM-5).
    GrantExpired => ("grant_expired", 403),
    /// Outside the grant's time windows (PERM-5).
    GrantOutsideWindow => ("grant_outside_window", 403),
    /// The grant's uses are used up (PERM-5).
    GrantExhausted => ("grant_exhausted", 403),
    /// The end user closed API access for their account (PERM-6).
    UserOptedOut => ("user_opted_out", 403),
    /// Matched a blacklist entry (BWL-2).
    Blacklisted => ("blacklisted", 403),
    /// Not on the whitelist that covers this API (BWL-2).
    NotWhitelisted => ("not_whitelisted", 403),
    /// The request carries a field the grant does not allow (PERM-1).
    FieldForbidden => ("field_forbidden", 403),
    /// Hidden response fields could not be removed, so the response is withheld (PERM-1).
    ResponseUnfilterable => ("response_unfilterable", 502),
    /// Banned after repeated refusals, or as the source of signature failures under a valid key id
    /// (PERM-4, RL-3, MON-4).
    Banned => ("banned", 403),
    /// A rate limit of the policy (`rate_limits`, RL-1, RL-2, OPS-4) refused the call, with
    /// `Retry-After` until its window admits again; or Envoy's rate limiter answered 429 for a
    /// request the filter had allowed (RL-3), and the caller sees Envoy's own 429.
    RateLimited => ("rate_limited", 429),
    /// A restricted API's body whose content type the gateway cannot check (PERM-1).
    ContentTypeUnsupported => ("content_type_unsupported", 415),
    /// More covered components, or a larger signature base, than the gateway builds.
    SignatureTooComplex => ("signature_too_complex", 400),
    /// A routing override (`X-HTTP-Method-Override`, `X-Original-URL`, `_method`, ...).
    OverrideNotAllowed => ("override_not_allowed", 400),
    /// The body did not complete within `gateway.max_body_seconds` of its headers.
    BodyTimeout => ("body_timeout", 408),
    /// The client went away before its request was complete; nothing was sent upstream.
    RequestAbandoned => ("request_abandoned", 408),
    /// This worker already holds its bound of request bodies awaiting verification.
    GatewayBusy => ("gateway_busy", 503),
    /// A certificate-only write without an `Idempotency-Key` (ATK-1).
    IdempotencyKeyMissing => ("idempotency_key_missing", 400),
    /// This app already used this `Idempotency-Key` (ATK-1).
    IdempotencyKeyReplayed => ("idempotency_key_replayed", 409),
}

impl DenyReason {
    /// Refusals that count toward an automatic ban: authentication and permission failures and
    /// malformed probing (PERM-4, MON-6). Lifecycle, size and host failures are not the caller's doing.
    pub fn counts_toward_ban(self) -> bool {
        matches!(self.status(), 400 | 401 | 403 | 429) && self != DenyReason::Banned
    }
}

impl DenyReason {
    /// Extra response headers for a refusal: `Retry-After` for an API switched offline.
    pub fn retry_after_seconds(self) -> Option<u32> {
        match self {
            DenyReason::ApiOffline | DenyReason::ReplayStoreFull => Some(300),
            DenyReason::GatewayBusy => Some(5),
            _ => None,
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A refusal with the detail that goes to the audit log (never to the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deny {
    pub reason: DenyReason,
    pub detail: String,
    /// Seconds the caller should wait (`Retry-After`), when this refusal knows better than its
    /// reason's default (a rate limit: until its window admits again).
    pub retry_after: Option<u32>,
}

impl Deny {
    pub fn new(reason: DenyReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// The `Retry-After` seconds the caller is told: this refusal's own, else its reason's.
    pub fn retry_after(&self) -> Option<u32> {
        self.retry_after.or(self.reason.retry_after_seconds())
    }
}

impl From<DenyReason> for Deny {
    fn from(reason: DenyReason) -> Self {
        Self {
            reason,
            detail: String::new(),
            retry_after: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for r in DenyReason::ALL {
            assert!(seen.insert(r.code()), "duplicate code {}", r.code());
            assert!(r.code().chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            assert!(matches!(
                r.status(),
                400 | 401 | 403 | 404 | 408 | 409 | 410 | 413 | 415 | 429 | 502 | 503
            ));
        }
    }
}
