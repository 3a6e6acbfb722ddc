//! Sessions (SES-1 … SES-4, OPS-6): a caller establishes a session at an endpoint the gateway
//! answers itself, sending its caller code, its IP address and its device MAC address; later
//! calls to APIs marked `session: required` carry the session ID (`x-session-id`) and the MAC
//! (`x-device-mac`), covered by the request signature wherever the level requires one. A session
//! is bound to its app, the client IP the gateway saw and the MAC; each accepted call refreshes
//! it; it ends when idle longer than its timeout, at its absolute lifetime, at logout, or when
//! an operator ends it (one session, every session of an app, every session of a user).
//!
//! This module owns the settings, the session record and the wire format of the endpoint. The
//! stored sessions, on either backend, are `crate::state::sessions`.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::crypto::hex;
use crate::error::{ConfigError, Deny, DenyReason};
use crate::inventory::Api;
use crate::message::Method;

/// The header a call carries its session ID in.
pub const SESSION_HEADER: &str = "x-session-id";
/// The header a call carries the device MAC in.
pub const MAC_HEADER: &str = "x-device-mac";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawSessions {
    /// The inventory API (POST) the gateway answers to establish a session.
    pub create_api: String,
    /// The inventory API (DELETE) the gateway answers to end the caller's session (logout).
    pub logout_api: String,
    #[serde(default = "default_idle")]
    pub idle_timeout_seconds: u64,
    #[serde(default = "default_lifetime")]
    pub max_lifetime_seconds: u64,
    /// Shared-data keys for sessions, and sessions per key: at most slots x entries live.
    #[serde(default = "default_slots")]
    pub slots: u32,
    #[serde(default = "default_entries")]
    pub entries_per_slot: u32,
    /// Apps whose sessions are not bound to the client IP (mobile clients change networks).
    /// Shown by `apisec compliance`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_unbound_apps: Vec<String>,
    /// The Envoy route (on an operator-only listener) through which operators end sessions,
    /// and the URI SANs of the operator client certificates allowed there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_route: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operators: Vec<String>,
    /// The firm's login APIs (each `session: required`): their upstream answers name the user
    /// who logged in, and with how many factors, in `login_header` (ID-4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub login_apis: Vec<String>,
    #[serde(default = "default_login_header")]
    pub login_header: String,
    /// Live sessions one app may hold (SES-1, MON-5): past it, establishing evicts the app's own
    /// session idle longest, never another app's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_app: Option<u32>,
    /// Establishes the gateway answers per app, and per app and source address, in a minute
    /// (fixed windows): past either, `429 session_rate_limited`.
    #[serde(default = "default_establish_per_app")]
    pub establish_per_minute: u32,
    #[serde(default = "default_establish_per_source")]
    pub establish_per_source_per_minute: u32,
}

fn default_establish_per_app() -> u32 {
    600
}
fn default_establish_per_source() -> u32 {
    60
}

fn default_login_header() -> String {
    "x-apisec-login".into()
}

fn default_idle() -> u64 {
    900
}
fn default_lifetime() -> u64 {
    8 * 3600
}
fn default_slots() -> u32 {
    1024
}
fn default_entries() -> u32 {
    16
}

/// Compiled session settings.
#[derive(Debug, Clone)]
pub struct Sessions {
    pub create_api: usize,
    pub logout_api: usize,
    pub idle_timeout_seconds: u64,
    pub max_lifetime_seconds: u64,
    pub slots: u32,
    pub entries_per_slot: u32,
    pub ip_unbound_apps: HashSet<String>,
    pub operator_route: Option<String>,
    pub operators: Vec<String>,
    pub login_apis: Vec<usize>,
    pub login_header: String,
    pub max_per_app: u32,
    pub establish_per_minute: u32,
    pub establish_per_source_per_minute: u32,
}

impl Sessions {
    /// How many slots one app's sessions spread over on the local backend, and how many of the
    /// app's sessions one of them holds: together at least `max_per_app`.
    pub(crate) fn app_slots(&self) -> (u32, u32) {
        let per = self.entries_per_slot.max(1);
        let k = self.max_per_app.div_ceil(per).clamp(1, self.slots.max(1));
        (k, self.max_per_app.div_ceil(k).min(per))
    }
}

impl RawSessions {
    pub fn compile(&self, apis: &[Api]) -> Result<Sessions, ConfigError> {
        let find = |field: &str, id: &str, method: Method| -> Result<usize, ConfigError> {
            let api = apis.iter().find(|a| a.id == id).ok_or_else(|| {
                ConfigError::new(format!("sessions.{field}"), format!("no API '{id}'"))
            })?;
            if api.method != method {
                return Err(ConfigError::new(
                    format!("sessions.{field}"),
                    format!("'{id}' must be a {} API", method.as_str()),
                ));
            }
            Ok(api.index)
        };
        let create_api = find("create_api", &self.create_api, Method::Post)?;
        let logout_api = find("logout_api", &self.logout_api, Method::Delete)?;
        if !(1..=86_400).contains(&self.idle_timeout_seconds) {
            return Err(ConfigError::new(
                "sessions.idle_timeout_seconds",
                "must be 1..86400",
            ));
        }
        if self.max_lifetime_seconds < self.idle_timeout_seconds
            || self.max_lifetime_seconds > 7 * 86_400
        {
            return Err(ConfigError::new(
                "sessions.max_lifetime_seconds",
                "must be at least idle_timeout_seconds and at most 7 days",
            ));
        }
        if !(1..=65_536).contains(&self.slots) || !(1..=256).contains(&self.entries_per_slot) {
            return Err(ConfigError::new(
                "sessions.slots",
                "slots must be 1..65536 and entries_per_slot 1..256",
            ));
        }
        if self.operator_route.is_some() == self.operators.is_empty() {
            return Err(ConfigError::new(
                "sessions.operators",
                "operator_route and operators go together",
            ));
        }
        let mut login_apis = Vec::new();
        for (i, id) in self.login_apis.iter().enumerate() {
            let field = format!("sessions.login_apis[{i}]");
            let api = apis
                .iter()
                .find(|a| a.id == *id)
                .ok_or_else(|| ConfigError::new(&field, format!("no API '{id}'")))?;
            if !api.session_required {
                return Err(ConfigError::new(
                    field,
                    format!("'{id}' must be session: required (a login is recorded on a session)"),
                ));
            }
            login_apis.push(api.index);
        }
        let h = &self.login_header;
        if h.is_empty()
            || !h
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(ConfigError::new(
                "sessions.login_header",
                "a lowercase header name",
            ));
        }
        let bound = u64::from(self.slots) * u64::from(self.entries_per_slot);
        // by default one app may hold half the store: never all of it
        let max_per_app = self
            .max_per_app
            .unwrap_or(u32::try_from((bound / 2).max(1)).unwrap_or(u32::MAX));
        if max_per_app == 0 || u64::from(max_per_app) > bound {
            return Err(ConfigError::new(
                "sessions.max_per_app",
                format!("must be 1..{bound} (slots x entries_per_slot)"),
            ));
        }
        for (f, v) in [
            ("establish_per_minute", self.establish_per_minute),
            (
                "establish_per_source_per_minute",
                self.establish_per_source_per_minute,
            ),
        ] {
            if !(1..=1_000_000).contains(&v) {
                return Err(ConfigError::new(
                    format!("sessions.{f}"),
                    "must be 1..1000000",
                ));
            }
        }
        Ok(Sessions {
            max_per_app,
            establish_per_minute: self.establish_per_minute,
            establish_per_source_per_minute: self.establish_per_source_per_minute,
            login_apis,
            login_header: h.clone(),
            create_api,
            logout_api,
            idle_timeout_seconds: self.idle_timeout_seconds,
            max_lifetime_seconds: self.max_lifetime_seconds,
            slots: self.slots,
            entries_per_slot: self.entries_per_slot,
            ip_unbound_apps: self.ip_unbound_apps.iter().cloned().collect(),
            operator_route: self.operator_route.clone(),
            operators: self.operators.clone(),
        })
    }
}

/// A MAC address in one normal form (`aa:bb:cc:dd:ee:ff`), from six hex octets separated by
/// `:` or `-`; None for anything else.
pub fn normal_mac(s: &str) -> Option<String> {
    let s = s.trim();
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6
        || !parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return None;
    }
    Some(parts.join(":").to_ascii_lowercase())
}

/// What an establishing caller sends (JSON body).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct EstablishBody {
    caller_code: String,
    mac: String,
    /// The caller's own view of its IP address (recorded; the binding is to the address the
    /// gateway sees).
    #[serde(default)]
    ip: Option<String>,
}

/// The establish request's body, checked: the caller code must be the authenticated App_ID.
/// Returns the normal MAC and the IP the caller declared.
pub fn parse_establish(body: &[u8], app: &str) -> Result<(String, Option<String>), Deny> {
    let bad = |d: String| Deny::new(DenyReason::SessionRequestInvalid, d);
    let b: EstablishBody =
        serde_json::from_slice(body).map_err(|e| bad(format!("session request: {e}")))?;
    if b.caller_code != app {
        return Err(bad(format!(
            "caller_code '{}' is not the authenticated App_ID",
            b.caller_code
        )));
    }
    let mac = normal_mac(&b.mac).ok_or_else(|| bad("mac is not six hex octets".into()))?;
    if let Some(ip) = &b.ip {
        ip.parse::<std::net::IpAddr>()
            .map_err(|_| bad("ip is not an IP address".into()))?;
    }
    Ok((mac, b.ip))
}

/// What an operator sends to end sessions: exactly one of `session_id`, `app`, `user`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct OperatorBody {
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    app: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

/// The operator's request, checked.
pub fn parse_operator(body: &[u8]) -> Result<Scope, Deny> {
    let bad = |d: &str| Deny::new(DenyReason::SessionRequestInvalid, d.to_string());
    let b: OperatorBody = serde_json::from_slice(body).map_err(|e| {
        Deny::new(
            DenyReason::SessionRequestInvalid,
            format!("operator request: {e}"),
        )
    })?;
    let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    match (nonempty(b.session_id), nonempty(b.app), nonempty(b.user)) {
        (Some(id), None, None) => Ok(Scope::Session(id)),
        (None, Some(a), None) => Ok(Scope::App(a)),
        (None, None, Some(u)) => Ok(Scope::User(crate::lists::normal_user(&u))),
        _ => Err(bad("name exactly one of session_id, app, user")),
    }
}

/// The login service's report (`user=<id>; factors=<n>`): the user and the number of factors
/// they logged in with (1..9); None for anything else.
pub fn parse_login(value: &str) -> Option<(String, u8)> {
    let mut user = None;
    let mut factors = None;
    for part in value.split(';') {
        let (k, v) = part.split_once('=')?;
        match k.trim() {
            "user" => user = Some(v.trim()),
            "factors" => factors = v.trim().parse::<u8>().ok().filter(|n| (1..=9).contains(n)),
            _ => return None,
        }
    }
    let user = user
        .filter(|u| !u.is_empty() && u.len() <= 128 && u.bytes().all(|b| b.is_ascii_graphic()))?;
    Some((crate::lists::normal_user(user), factors?))
}

/// The session ID the gateway hands out: 192 bits from the host's random source, URL-safe.
pub fn new_id(random: &[u8; 24]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
}

/// A short, non-reversible name of a session for audit records (the ID itself is a bearer
/// secret and never logged). Not keyed: every replica, and every restart, names one session
/// alike, so its records can be followed across them; 192 random bits cannot be found back
/// from 64 bits of their hash.
pub fn fingerprint(id: &str) -> String {
    let h = crate::sha256::Sha256::new()
        .chain(b"apisec-session-fp\0")
        .chain(id.as_bytes())
        .finalize();
    hex(h.get(..8).unwrap_or(&h))
}

/// Why a presented session is refused: the one wording of each refusal, for both backends
/// (the cluster store's script answers with [`Misuse::word`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misuse {
    /// Never established, logged out, evicted or ended by an operator one by one.
    Unknown,
    Lifetime,
    /// Idle for this many seconds.
    Idle(u64),
    OtherApp,
    OtherIp,
    OtherMac,
    /// Created before an operator ended every session of its app or user.
    EndedByOperator,
}

impl Misuse {
    pub fn deny(self) -> Deny {
        let (reason, detail) = match self {
            Misuse::Unknown => (
                DenyReason::SessionInvalid,
                "no such session (never established, logged out or evicted)".to_string(),
            ),
            Misuse::Lifetime => (
                DenyReason::SessionExpired,
                "past the session's absolute lifetime".to_string(),
            ),
            Misuse::Idle(s) => (DenyReason::SessionExpired, format!("idle for {s} s")),
            Misuse::OtherApp => (
                DenyReason::SessionInvalid,
                "the session belongs to another app".to_string(),
            ),
            Misuse::OtherIp => (
                DenyReason::SessionInvalid,
                "the session is bound to another client IP".to_string(),
            ),
            Misuse::OtherMac => (
                DenyReason::SessionInvalid,
                "the session is bound to another device MAC".to_string(),
            ),
            Misuse::EndedByOperator => (
                DenyReason::SessionInvalid,
                "ended by an operator".to_string(),
            ),
        };
        Deny::new(reason, detail)
    }

    /// How the cluster store's script names it.
    pub fn word(self) -> &'static str {
        match self {
            Misuse::Unknown => "unknown",
            Misuse::Lifetime => "lifetime",
            Misuse::Idle(_) => "idle",
            Misuse::OtherApp => "app",
            Misuse::OtherIp => "ip",
            Misuse::OtherMac => "mac",
            Misuse::EndedByOperator => "operator",
        }
    }

    /// The script's answer `session <word> [seconds]`, read back; None for anything else.
    pub fn from_word(word: &str, seconds: Option<&str>) -> Option<Misuse> {
        Some(match word {
            "unknown" => Misuse::Unknown,
            "lifetime" => Misuse::Lifetime,
            "idle" => Misuse::Idle(seconds?.parse().ok()?),
            "app" => Misuse::OtherApp,
            "ip" => Misuse::OtherIp,
            "mac" => Misuse::OtherMac,
            "operator" => Misuse::EndedByOperator,
            _ => return None,
        })
    }
}

/// What the store keeps of one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Session {
    /// Keyed hash of the ID (the ID itself is not stored).
    pub tag: String,
    pub app: String,
    /// The client IP the gateway saw at establishment.
    pub ip: String,
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default)]
    pub factors: u8,
    pub created: u64,
    pub last_seen: u64,
    /// The session's number in the order sessions were created on this store (local
    /// backend; the cluster store numbers its own): an operator's end covers the sessions
    /// numbered up to its mark, exactly, whatever second they were created in.
    #[serde(default)]
    pub seq: u64,
}

/// Who an operator's forced end is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Session(String),
    App(String),
    User(String),
}

/// What a call presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented<'a> {
    pub id: &'a str,
    pub app: &'a str,
    pub ip: &'a str,
    pub mac: &'a str,
}

#[cfg(test)]
mod tests;
