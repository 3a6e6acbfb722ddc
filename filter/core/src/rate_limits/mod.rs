//! Rate limits and quotas from the policy (RL-1, RL-2, RL-4, OPS-4): the `rate_limits`
//! section, its validation, and which counters a call counts toward. The counters themselves,
//! on either backend, are `crate::state::rate_limits`.
//!
//! A rule selects calls (`apis`, `functions`, `apps`; empty: all) and counts them by the
//! dimensions it names in `by` (`app`, `api`, `function`, `user`, `source`; none: one counter
//! for every call it selects, e.g. an API group as a whole). Every dimension comes from what
//! the gateway verified, never from a header a client can set: the app only once the caller
//! proved to be it (a signature or a certificate), the user only as the signature covered it
//! or the session carries it, the API and its business function from the inventory, the source
//! from the address Envoy saw. A rule whose dimension a call does not have (an unauthenticated
//! call under a rule `by: [app]`) does not count that call: limit such calls `by: [source]`.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::crypto::hex;
use crate::error::ConfigError;
use crate::inventory::{resolve_apis, Api, ApiGroup, ApiSet};
use crate::ip::source_net;
use crate::sha256::Sha256;
use crate::state::rate_limits::local::RateStore;
use crate::state::rate_limits::{Counter, Span, Window};
use crate::timeutil;

/// The largest limit a window may have (the counters' arithmetic stays exact below it).
pub const MAX_LIMIT: u64 = 10_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Dimension {
    App,
    Api,
    Function,
    User,
    Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum RateAction {
    #[default]
    Refuse,
    Alert,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub id: String,
    /// What the rule counts by; empty: one counter for every call it selects.
    #[serde(default)]
    pub by: Vec<Dimension>,
    /// API ids and `group:<id>`; empty: every API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apis: Vec<String>,
    /// Business functions of the inventory; empty: every function.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<String>,
    /// Registered apps; empty: every app (and calls of no proven app).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_second: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_hour: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_day: Option<u64>,
    /// Calendar quotas (a contract's calls per day or month).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<RawQuota>,
    #[serde(default)]
    pub action: RateAction,
    /// A refusal by this rule counts toward a ban of the caller (`bans`, RL-4).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub count_toward_ban: bool,
    /// `by: [source]` counts IPv4 sources by this prefix (32: each address).
    #[serde(default = "default_v4", skip_serializing_if = "is_default_v4")]
    pub source_prefix_v4: u8,
    /// `by: [source]` counts IPv6 sources by this prefix (64: one host's network).
    #[serde(default = "default_v6", skip_serializing_if = "is_default_v6")]
    pub source_prefix_v6: u8,
}

fn default_v4() -> u8 {
    32
}
fn default_v6() -> u8 {
    64
}
fn is_default_v4(v: &u8) -> bool {
    *v == 32
}
fn is_default_v6(v: &u8) -> bool {
    *v == 64
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_month: Option<u64>,
    /// Where a day and a month begin: `Asia/Shanghai`, `UTC`, or `+08:00`.
    pub timezone: String,
}

/// The local backend's counter store (`gateway.rate_limit_store`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct RawRateStore {
    /// Shared-data keys the counters use.
    pub slots: u32,
    /// Counters one key holds; a full key makes room by the counter idle longest.
    pub entries_per_slot: u32,
}

impl Default for RawRateStore {
    fn default() -> Self {
        let d = RateStore::default();
        RawRateStore {
            slots: d.slots,
            entries_per_slot: d.entries_per_slot,
        }
    }
}

impl RawRateStore {
    pub fn compile(&self) -> Result<RateStore, ConfigError> {
        let f = "gateway.rate_limit_store";
        if !(1..=65_536).contains(&self.slots) {
            return Err(ConfigError::new(format!("{f}.slots"), "must be 1 to 65536"));
        }
        if !(1..=256).contains(&self.entries_per_slot) {
            return Err(ConfigError::new(
                format!("{f}.entries_per_slot"),
                "must be 1 to 256",
            ));
        }
        Ok(RateStore {
            slots: self.slots,
            entries_per_slot: self.entries_per_slot,
        })
    }
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct RateLimit {
    pub id: String,
    pub by: Vec<Dimension>,
    /// None: every API.
    pub apis: Option<ApiSet>,
    pub functions: Vec<String>,
    pub apps: Vec<String>,
    /// The windows and their limits, in `Span` order.
    pub limits: Vec<(Span, u64)>,
    quota_offset: i64,
    pub refuse: bool,
    pub ban: bool,
    v4: u8,
    v6: u8,
}

/// The policy's rate limits.
#[derive(Debug, Clone, Default)]
pub struct RateLimits {
    pub rules: Vec<RateLimit>,
    pub store: RateStore,
}

/// What a call presents to the rules, all of it verified.
#[derive(Debug, Clone, Copy, Default)]
pub struct Call<'a> {
    /// The app the caller proved to be (None before or without proof).
    pub app: Option<&'a str>,
    pub api: Option<&'a Api>,
    /// The end user the signature covered or the session carries.
    pub user: Option<&'a str>,
    /// The address Envoy saw.
    pub source: Option<IpAddr>,
}

impl RawRateLimit {
    /// The rule's windows and limits, in `Span` order: at least one.
    fn limits(&self, f: &str) -> Result<Vec<(Span, u64)>, ConfigError> {
        let mut limits = Vec::new();
        let windows = [
            (Span::Second, self.per_second, "per_second"),
            (Span::Minute, self.per_minute, "per_minute"),
            (Span::Hour, self.per_hour, "per_hour"),
            (Span::Day, self.per_day, "per_day"),
            (
                Span::QuotaDay,
                self.quota.as_ref().and_then(|q| q.per_day),
                "quota.per_day",
            ),
            (
                Span::QuotaMonth,
                self.quota.as_ref().and_then(|q| q.per_month),
                "quota.per_month",
            ),
        ];
        for (span, limit, name) in windows {
            if let Some(n) = limit {
                if !(1..=MAX_LIMIT).contains(&n) {
                    return Err(ConfigError::new(
                        format!("{f}.{name}"),
                        format!("must be 1 to {MAX_LIMIT}"),
                    ));
                }
                limits.push((span, n));
            }
        }
        if limits.is_empty() {
            return Err(ConfigError::new(
                f,
                "a rate limit needs at least one of per_second, per_minute, per_hour, per_day \
                 or a quota",
            ));
        }
        Ok(limits)
    }

    fn compile(
        &self,
        f: &str,
        apis: &[Api],
        groups: &[ApiGroup],
        app_exists: &dyn Fn(&str) -> bool,
    ) -> Result<RateLimit, ConfigError> {
        let bad = |field: &str, msg: String| ConfigError::new(format!("{f}.{field}"), msg);
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(bad(
                "id",
                format!("{:?} is not 1-64 letters, digits, '-', '_' or '.'", self.id),
            ));
        }
        for (i, d) in self.by.iter().enumerate() {
            if self.by.iter().take(i).any(|x| x == d) {
                return Err(bad("by", format!("{d:?} is named twice")));
            }
        }
        let set = if self.apis.is_empty() {
            None
        } else {
            Some(resolve_apis(
                &format!("{f}.apis"),
                &self.apis,
                apis,
                groups,
            )?)
        };
        for (i, func) in self.functions.iter().enumerate() {
            if !apis.iter().any(|a| &a.function == func) {
                return Err(bad(
                    &format!("functions[{i}]"),
                    format!("no API of the inventory has the business function {func:?}"),
                ));
            }
        }
        for (i, app) in self.apps.iter().enumerate() {
            if !app_exists(app) {
                return Err(bad(&format!("apps[{i}]"), format!("unknown app {app:?}")));
            }
        }
        let limits = self.limits(f)?;
        let quota_offset = match &self.quota {
            Some(q) => {
                if q.per_day.is_none() && q.per_month.is_none() {
                    return Err(bad("quota", "names neither per_day nor per_month".into()));
                }
                timeutil::zone_offset(&q.timezone).ok_or_else(|| {
                    bad(
                        "quota.timezone",
                        format!(
                            "{:?} is not a known zone or a UTC offset like +08:00",
                            q.timezone
                        ),
                    )
                })?
            }
            None => 0,
        };
        if self.count_toward_ban && self.action == RateAction::Alert {
            return Err(bad(
                "count_toward_ban",
                "an alerting rule refuses nothing, so nothing counts toward a ban".into(),
            ));
        }
        if !(8..=32).contains(&self.source_prefix_v4) {
            return Err(bad("source_prefix_v4", "must be 8 to 32".into()));
        }
        if !(16..=128).contains(&self.source_prefix_v6) {
            return Err(bad("source_prefix_v6", "must be 16 to 128".into()));
        }
        Ok(RateLimit {
            id: self.id.clone(),
            by: self.by.clone(),
            apis: set,
            functions: self.functions.clone(),
            apps: self.apps.clone(),
            limits,
            quota_offset,
            refuse: self.action == RateAction::Refuse,
            ban: self.count_toward_ban,
            v4: self.source_prefix_v4,
            v6: self.source_prefix_v6,
        })
    }
}

/// Validates the section: ids unique, every API, function and app known.
pub fn compile(
    raw: &[RawRateLimit],
    store: &RawRateStore,
    apis: &[Api],
    groups: &[ApiGroup],
    app_exists: &dyn Fn(&str) -> bool,
) -> Result<RateLimits, ConfigError> {
    let mut rules: Vec<RateLimit> = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let f = format!("rate_limits[{i}]");
        if rules.iter().any(|x| x.id == r.id) {
            return Err(ConfigError::new(
                format!("{f}.id"),
                format!("{:?} is used twice", r.id),
            ));
        }
        rules.push(r.compile(&f, apis, groups, app_exists)?);
    }
    Ok(RateLimits {
        rules,
        store: store.compile()?,
    })
}

impl RateLimit {
    /// Whether the rule selects calls of an API (its APIs and business functions).
    pub fn selects_api(&self, api: &Api) -> bool {
        self.apis.as_ref().is_none_or(|set| set.contains(api.index))
            && (self.functions.is_empty() || self.functions.contains(&api.function))
    }

    /// Whether the rule selects a call (its APIs, functions and apps).
    pub fn selects(&self, call: &Call<'_>) -> bool {
        let api_ok = match call.api {
            Some(api) => self.selects_api(api),
            None => self.apis.is_none() && self.functions.is_empty(),
        };
        let app_ok =
            self.apps.is_empty() || call.app.is_some_and(|a| self.apps.iter().any(|x| x == a));
        api_ok && app_ok
    }

    /// The counter's name for a call: the rule and the values of its dimensions, hashed; None
    /// when the call lacks one of them.
    fn key(&self, call: &Call<'_>) -> Option<String> {
        let mut h = Sha256::new();
        h.update(b"apisec-rate\0");
        let mut part = |v: &[u8]| {
            h.update(&(v.len() as u64).to_le_bytes());
            h.update(v);
        };
        part(self.id.as_bytes());
        for d in &self.by {
            match d {
                Dimension::App => part(call.app?.as_bytes()),
                Dimension::Api => part(call.api?.id.as_bytes()),
                Dimension::Function => part(call.api?.function.as_bytes()),
                Dimension::User => part(call.user?.as_bytes()),
                Dimension::Source => {
                    let (mut net, bits) = source_net(call.source?, self.v6);
                    if bits == 32 {
                        // an IPv4 source (mapped): its /v4 network
                        let v4 = u32::from_be_bytes([net[12], net[13], net[14], net[15]]);
                        let mask = u32::MAX.checked_shl(32 - u32::from(self.v4)).unwrap_or(0);
                        net[12..].copy_from_slice(&(v4 & mask).to_be_bytes());
                        part(&net);
                        part(&[self.v4]);
                    } else {
                        part(&net);
                        part(&[bits]);
                    }
                }
            }
        }
        let d = h.finalize();
        Some(hex(d.get(..16).unwrap_or(&[])))
    }

    /// The rule's windows at `now_ms`.
    fn windows(&self, now_ms: u64) -> Vec<Window> {
        let (day, month, day_end, month_end) =
            timeutil::local_day_month(now_ms / 1000, self.quota_offset);
        self.limits
            .iter()
            .map(|&(span, limit)| match span {
                Span::QuotaDay => Window {
                    span,
                    limit,
                    bucket: day,
                    at: day_end.saturating_mul(1000).saturating_sub(now_ms),
                },
                Span::QuotaMonth => Window {
                    span,
                    limit,
                    bucket: month,
                    at: month_end.saturating_mul(1000).saturating_sub(now_ms),
                },
                _ => Window::sliding(span, limit, now_ms),
            })
            .collect()
    }
}

impl RateLimits {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The counters a call counts toward at `now_ms`, refusing rules first (a refusal is found
    /// before an alerting counter is counted and taken back).
    pub fn counters(&self, call: &Call<'_>, now_ms: u64) -> Vec<Counter> {
        let mut out: Vec<Counter> = self
            .rules
            .iter()
            .filter(|r| r.selects(call))
            .filter_map(|r| {
                Some(Counter {
                    rule: r.id.clone(),
                    key: r.key(call)?,
                    refuse: r.refuse,
                    ban: r.ban,
                    windows: r.windows(now_ms),
                })
            })
            .collect();
        out.sort_by_key(|c| !c.refuse);
        out
    }

    /// The rules that select calls of an API (for `apisec compliance`).
    pub fn covering<'a>(&'a self, api: &'a Api) -> impl Iterator<Item = &'a RateLimit> + 'a {
        self.rules.iter().filter(move |r| r.selects_api(api))
    }
}

#[cfg(test)]
mod tests;
