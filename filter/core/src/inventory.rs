//! The API inventory (LVL-1, LVL-2): every API with its method, path template, security level,
//! service object, business function and lifecycle state (OPS-1), and the API groups that
//! switch many APIs at once (MON-5). Its schema, its compilation and its matcher live here; grants
//! and lists refer to APIs through it.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, DenyReason};
use crate::message::Method;
use crate::mode::Mode;

/// Security level of an API (clause 6). Controls escalate with the level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum SecurityLevel {
    S0,
    S1,
    S2,
    S3,
}

impl SecurityLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityLevel::S0 => "S0",
            SecurityLevel::S1 => "S1",
            SecurityLevel::S2 => "S2",
            SecurityLevel::S3 => "S3",
        }
    }
}

/// Who the API serves (LVL-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ServiceObject {
    #[serde(rename = "toB")]
    ToB,
    #[serde(rename = "toC")]
    ToC,
    #[serde(rename = "toG")]
    ToG,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Write,
}

/// Lifecycle of an API or an API group (OPS-1). Only `online` serves traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ApiState {
    Draft,
    #[default]
    Online,
    Offline,
    Retired,
}

impl ApiState {
    pub fn refusal(self) -> Option<DenyReason> {
        match self {
            ApiState::Online => None,
            ApiState::Draft => Some(DenyReason::ApiNotPublished),
            ApiState::Offline => Some(DenyReason::ApiOffline),
            ApiState::Retired => Some(DenyReason::ApiRetired),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    pub id: String,
    pub method: String,
    pub path: String,
    pub level: SecurityLevel,
    pub service_object: ServiceObject,
    pub access: Access,
    pub user_auth: bool,
    pub personal_info: bool,
    pub function: String,
    #[serde(default)]
    pub description: String,
    /// Lifecycle (OPS-1): draft, online, offline, retired.
    #[serde(default)]
    pub state: ApiState,
    /// `report`: refusals are counted and audited as "would refuse", not enforced (a dry run).
    #[serde(default, skip_serializing_if = "Mode::is_enforce")]
    pub mode: Mode,
    /// The row of the standard's table A.1 this API implements (`apisec compliance`); when
    /// absent, `function` is looked up as a row key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annex_a: Option<String>,
    /// `required`: calls carry a live session of the same app (sessions.rs, SES-1).
    #[serde(default, skip_serializing_if = "SessionUse::is_none")]
    pub session: SessionUse,
    /// `national`: calls are signed with the national algorithms only (`hmac-sm3`,
    /// `sm2-sm3`) and a body's Content-Digest carries `sm3` (DATA-5; docs/national.md).
    #[serde(default, skip_serializing_if = "Crypto::is_any")]
    pub crypto: Crypto,
    /// The review of the API's going online and of its last change of state or level (OPS-1,
    /// LVL-4): `policy apply` refuses such a change without a new one (`review_of_changes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<Review>,
}

/// Who reviewed a change of an API (OPS-1), under which ticket, on which date (YYYY-MM-DD).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Review {
    pub by: String,
    pub ticket: String,
    pub date: String,
}

/// OPS-1, LVL-4: an API that goes online (added as online, or moved to online), changes state
/// (online, offline, retired) or changes level carries a review record, and a new one: its
/// ticket differs from the review of the policy in force (the same record cannot approve two
/// changes). Drafts need none; removing an API from the inventory is not a state change
/// (retire it first, with a review). `old` is the inventory in force, `new` the one to apply.
pub fn review_of_changes(old: &[RawApi], new: &[RawApi]) -> Result<(), ConfigError> {
    for (i, a) in new.iter().enumerate() {
        let before = old.iter().find(|o| o.id == a.id);
        let what = match before {
            None if a.state == ApiState::Draft => continue,
            None => format!("added as {}", state_name(a.state)),
            Some(b) if b.state != a.state && b.level != a.level => format!(
                "{} -> {} and {} -> {}",
                state_name(b.state),
                state_name(a.state),
                b.level.as_str(),
                a.level.as_str()
            ),
            Some(b) if b.state != a.state => {
                format!("{} -> {}", state_name(b.state), state_name(a.state))
            }
            Some(b) if b.level != a.level => {
                format!("{} -> {}", b.level.as_str(), a.level.as_str())
            }
            Some(_) => continue,
        };
        let fresh = a.review.as_ref().is_some_and(|r| {
            before
                .and_then(|b| b.review.as_ref())
                .is_none_or(|old| old.ticket != r.ticket)
        });
        if !fresh {
            return Err(ConfigError::new(
                format!("apis[{i}].review"),
                format!(
                    "API '{}' {what}: a change of state or level needs a new review record \
                     (by, ticket, date) whose ticket is not the one in force (OPS-1)",
                    a.id
                ),
            ));
        }
    }
    Ok(())
}

fn state_name(s: ApiState) -> &'static str {
    match s {
        ApiState::Draft => "draft",
        ApiState::Online => "online",
        ApiState::Offline => "offline",
        ApiState::Retired => "retired",
    }
}

/// Which algorithms an API accepts (DATA-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Crypto {
    #[default]
    Any,
    National,
}

impl Crypto {
    pub fn is_any(&self) -> bool {
        *self == Crypto::Any
    }
}

/// Whether an API needs a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum SessionUse {
    #[default]
    None,
    Required,
}

impl SessionUse {
    pub fn is_none(&self) -> bool {
        *self == SessionUse::None
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawApiGroup {
    pub id: String,
    /// API ids or patterns (`trade.*`, `*`).
    pub apis: Vec<String>,
    /// A group-wide lifecycle switch (degradation switch); `online` leaves each API's own state.
    #[serde(default)]
    pub state: ApiState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Literal(String),
    Param,
}

#[derive(Debug, Clone)]
pub struct Api {
    pub id: String,
    pub method: Method,
    pub path: String,
    pub level: SecurityLevel,
    pub service_object: ServiceObject,
    pub access: Access,
    pub user_auth: bool,
    pub personal_info: bool,
    pub function: String,
    /// Position in the inventory; grants and lists refer to APIs by it.
    pub index: usize,
    /// Effective lifecycle state: the API's own, or its group's switch when that is not online.
    pub state: ApiState,
    pub mode: Mode,
    pub session_required: bool,
    /// Only the national algorithms (DATA-5): the API's own `crypto: national`, or its level
    /// in `gateway.national_levels`.
    pub national: bool,
    pub(crate) segments: Vec<Segment>,
}

impl Api {
    pub(crate) fn matches(&self, segments: &[&str]) -> bool {
        self.segments.len() == segments.len()
            && self.segments.iter().zip(segments).all(|(t, s)| match t {
                Segment::Literal(l) => l == s,
                Segment::Param => !s.is_empty(),
            })
    }

    /// Literal segments beat parameters, earliest first: `/a/b` wins over `/a/{x}`. A bit per
    /// segment, most significant first (templates deeper than 64 segments compare on the first 64).
    pub(crate) fn specificity(&self) -> u64 {
        self.segments
            .iter()
            .take(64)
            .enumerate()
            .fold(0u64, |acc, (i, s)| {
                acc | (u64::from(matches!(s, Segment::Literal(_))) << (63 - i))
            })
    }
}

/// A set of APIs, resolved to indexes into the inventory at compile time.
#[derive(Debug, Clone, Default)]
pub struct ApiSet(pub(crate) Vec<bool>);

impl ApiSet {
    pub fn contains(&self, api_index: usize) -> bool {
        self.0.get(api_index).copied().unwrap_or(false)
    }
    pub(crate) fn is_empty(&self) -> bool {
        !self.0.iter().any(|b| *b)
    }
}

#[derive(Debug, Clone)]
pub struct ApiGroup {
    pub id: String,
    pub apis: ApiSet,
    pub state: ApiState,
}

fn pattern_matches(pattern: &str, id: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => id.starts_with(prefix),
        None => pattern == id,
    }
}

/// Resolves ids, `prefix*` patterns and `group:<id>` references; a reference that matches
/// nothing is an error (a typo must not silently grant or block nothing).
pub fn resolve_apis(
    field: &str,
    patterns: &[String],
    apis: &[Api],
    groups: &[ApiGroup],
) -> Result<ApiSet, ConfigError> {
    let mut set = vec![false; apis.len()];
    for (i, p) in patterns.iter().enumerate() {
        if let Some(g) = p.strip_prefix("group:") {
            let group = groups.iter().find(|x| x.id == g).ok_or_else(|| {
                ConfigError::new(format!("{field}[{i}]"), format!("no API group '{g}'"))
            })?;
            for (j, s) in set.iter_mut().enumerate() {
                *s |= group.apis.contains(j);
            }
            continue;
        }
        let mut matched = false;
        for (s, a) in set.iter_mut().zip(apis) {
            if pattern_matches(p, &a.id) {
                *s = true;
                matched = true;
            }
        }
        if !matched {
            return Err(ConfigError::new(
                format!("{field}[{i}]"),
                format!("'{p}' matches no API"),
            ));
        }
    }
    Ok(ApiSet(set))
}

pub(crate) fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
}

pub(crate) fn parse_template(field: &str, path: &str) -> Result<Vec<Segment>, ConfigError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(ConfigError::new(field, "path must start with '/'"));
    };
    if path.contains(['?', '#', '%', '*']) || path.contains("//") {
        return Err(ConfigError::new(
            field,
            "path must be a normalised template without '?', '#', '%', '*' or '//'",
        ));
    }
    let mut names = HashSet::new();
    rest.split('/')
        .map(|seg| {
            if let Some(inner) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if !valid_id(inner) || !names.insert(inner.to_string()) {
                    return Err(ConfigError::new(
                        field,
                        format!("bad or repeated path parameter '{{{inner}}}'"),
                    ));
                }
                Ok(Segment::Param)
            } else if seg.contains(['{', '}']) {
                Err(ConfigError::new(
                    field,
                    "a path parameter must be a whole segment, like /orders/{id}",
                ))
            } else if seg == "." || seg == ".." {
                Err(ConfigError::new(
                    field,
                    "'.' and '..' segments are not allowed",
                ))
            } else {
                Ok(Segment::Literal(seg.to_string()))
            }
        })
        .collect()
}

/// The inventory (LVL-1, LVL-2) and API groups with their switches (OPS-1, MON-5), compiled
/// from the policy's `apis` and `api_groups`.
pub fn compile(
    raw_apis: &[RawApi],
    raw_groups: &[RawApiGroup],
) -> Result<(Vec<Api>, Vec<ApiGroup>), ConfigError> {
    if raw_apis.is_empty() {
        return Err(ConfigError::new(
            "apis",
            "the inventory is empty: every request would be refused",
        ));
    }
    let mut apis: Vec<Api> = Vec::with_capacity(raw_apis.len());
    for (i, a) in raw_apis.iter().enumerate() {
        let field = format!("apis[{i}]");
        if !valid_id(&a.id) {
            return Err(ConfigError::new(
                format!("{field}.id"),
                "must be 1-128 characters of A-Z a-z 0-9 . _ - :",
            ));
        }
        if apis.iter().any(|x| x.id == a.id) {
            return Err(ConfigError::new(
                format!("{field}.id"),
                format!("duplicate API id '{}'", a.id),
            ));
        }
        let Some(method) = Method::parse(&a.method) else {
            return Err(ConfigError::new(
                format!("{field}.method"),
                "must be one of GET HEAD POST PUT PATCH DELETE OPTIONS (uppercase)",
            ));
        };
        if a.function.trim().is_empty() {
            return Err(ConfigError::new(
                format!("{field}.function"),
                "business function is required (LVL-2)",
            ));
        }
        let segments = parse_template(&format!("{field}.path"), &a.path)?;
        if let Some(other) = apis
            .iter()
            .find(|x| x.method == method && x.segments == segments)
        {
            return Err(ConfigError::new(
                format!("{field}.path"),
                format!(
                    "'{} {}' overlaps API '{}' exactly: a request could not tell them apart",
                    a.method, a.path, other.id
                ),
            ));
        }
        if let Some(r) = &a.review {
            if r.by.trim().is_empty() || r.ticket.trim().is_empty() {
                return Err(ConfigError::new(
                    format!("{field}.review"),
                    "a review names who reviewed (by) and the ticket",
                ));
            }
            if crate::timeutil::parse_date(&r.date).is_none() {
                return Err(ConfigError::new(
                    format!("{field}.review.date"),
                    "must be YYYY-MM-DD",
                ));
            }
        }
        if a.level == SecurityLevel::S0 && a.personal_info {
            return Err(ConfigError::new(
                format!("{field}.level"),
                "an API carrying personal information cannot be S0 (public)",
            ));
        }
        apis.push(Api {
            id: a.id.clone(),
            method,
            path: a.path.clone(),
            level: a.level,
            service_object: a.service_object,
            access: a.access,
            user_auth: a.user_auth,
            personal_info: a.personal_info,
            function: a.function.clone(),
            index: apis.len(),
            state: a.state,
            mode: a.mode,
            session_required: a.session == SessionUse::Required,
            national: a.crypto == Crypto::National,
            segments,
        });
    }

    let mut groups: Vec<ApiGroup> = Vec::new();
    for (i, g) in raw_groups.iter().enumerate() {
        let field = format!("api_groups[{i}]");
        if !valid_id(&g.id) || groups.iter().any(|x| x.id == g.id) {
            return Err(ConfigError::new(
                format!("{field}.id"),
                format!("missing, invalid or duplicate group id '{}'", g.id),
            ));
        }
        if g.apis.iter().any(|p| p.starts_with("group:")) {
            return Err(ConfigError::new(
                format!("{field}.apis"),
                "groups list APIs, not other groups",
            ));
        }
        let set = resolve_apis(&format!("{field}.apis"), &g.apis, &apis, &groups)?;
        groups.push(ApiGroup {
            id: g.id.clone(),
            apis: set,
            state: g.state,
        });
    }
    // A group's switch overrides the API's own state when it is not online (degradation).
    for api in apis.iter_mut() {
        if let Some(g) = groups
            .iter()
            .find(|g| g.apis.contains(api.index) && g.state != ApiState::Online)
        {
            if api.state == ApiState::Online {
                api.state = g.state;
            }
        }
    }

    Ok((apis, groups))
}

#[cfg(test)]
mod review_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn api(id: &str, level: &str, state: &str, ticket: Option<&str>) -> RawApi {
        let mut v = serde_json::json!({"id": id, "method": "GET", "path": format!("/{id}"),
            "level": level, "service_object": "toB", "access": "read", "user_auth": false,
            "personal_info": false, "function": "f", "state": state});
        if let Some(t) = ticket {
            v["review"] = serde_json::json!({"by": "board", "ticket": t, "date": "2026-12-01"});
        }
        serde_json::from_value(v).unwrap()
    }

    /// OPS-1, LVL-4: going online, a state change and a level change each need a review whose
    /// ticket is not the one in force; drafts and unchanged APIs need none.
    #[test]
    fn a_change_of_state_or_level_needs_a_new_review() {
        let in_force = [api("a", "S1", "online", Some("T-1"))];
        // unchanged, or only described differently: nothing to review
        review_of_changes(&in_force, &in_force).unwrap();
        // a level change under the review in force: refused, naming the API and the change
        let e = review_of_changes(&in_force, &[api("a", "S2", "online", Some("T-1"))]).unwrap_err();
        assert_eq!(e.field, "apis[0].review");
        assert!(e.message.contains("'a' S1 -> S2"), "{}", e.message);
        review_of_changes(&in_force, &[api("a", "S2", "online", Some("T-2"))]).unwrap();
        // taken offline without a review record at all
        let e = review_of_changes(&in_force, &[api("a", "S1", "offline", None)]).unwrap_err();
        assert!(e.message.contains("online -> offline"), "{}", e.message);
        // added: a draft needs none, online needs one
        review_of_changes(
            &in_force,
            &[in_force[0].clone(), api("b", "S0", "draft", None)],
        )
        .unwrap();
        let e = review_of_changes(
            &in_force,
            &[in_force[0].clone(), api("b", "S0", "online", None)],
        )
        .unwrap_err();
        assert!(e.message.contains("added as online"), "{}", e.message);
        // and from a draft to online
        let drafted = [api("b", "S0", "draft", None)];
        assert!(review_of_changes(&drafted, &[api("b", "S0", "online", None)]).is_err());
        review_of_changes(&drafted, &[api("b", "S0", "online", Some("T-9"))]).unwrap();
    }
}
