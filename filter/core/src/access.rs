//! Grants (PERM-2, PERM-3, PERM-5, OPS-3): which app (and which of its end users) may call which
//! APIs, in which contract period and time windows, how many times, with which request fields
//! forbidden and response fields hidden (PERM-1, applied by `fields`), and with which approval
//! for S3. Compiled once from the policy; the request path only evaluates and counts uses.
//! Lists and opt-outs are in `lists`, the inventory and API groups in `inventory`.

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Deny, DenyReason};
use crate::fields;
use crate::inventory::{resolve_apis, Api, SecurityLevel};
pub use crate::inventory::{ApiGroup, ApiSet, ApiState, RawApiGroup};
use crate::lists::normal_user;
use crate::timeutil;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

// ---------------------------------------------------------------- raw document parts

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    /// Days the window applies to; all days when empty.
    #[serde(default)]
    pub days: Vec<Weekday>,
    /// `HH:MM`, inclusive.
    pub from: String,
    /// `HH:MM`, exclusive; `24:00` for the end of the day.
    pub to: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawApproval {
    pub approver: String,
    pub ticket: String,
    /// `YYYY-MM-DD`
    pub date: String,
    #[serde(default)]
    pub assessment: String,
    /// Who applied for the access (OPS-8): access is applied for and reviewed at every level.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub requested_by: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawGrant {
    pub id: String,
    pub app: String,
    /// API ids, patterns (`account.*`, `*`) or groups (`group:trading`).
    #[serde(default)]
    pub apis: Vec<String>,
    /// Business functions: the grant covers every API with one of them.
    #[serde(default)]
    pub functions: Vec<String>,
    /// End users the grant is limited to; any user when empty.
    #[serde(default)]
    pub users: Vec<String>,
    /// Contract period, RFC 3339 with offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// A fixed number of uses, counted across workers and reloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u64>,
    /// Single use.
    #[serde(default)]
    pub once: bool,
    /// Time-of-day windows (e.g. trading sessions), in `timezone`.
    #[serde(default)]
    pub windows: Vec<RawWindow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Required when the grant covers an S3 API (PERM-3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<RawApproval>,
    /// JSON request fields this grant does not allow (dot paths, `order.price`).
    #[serde(default)]
    pub forbid_request_fields: Vec<String>,
    /// JSON response fields removed before the response reaches the caller.
    #[serde(default)]
    pub hide_response_fields: Vec<String>,
}

// ---------------------------------------------------------------- compiled forms

#[derive(Debug, Clone)]
struct Window {
    days: u8, // bit per weekday, Monday = bit 0
    from: u32,
    to: u32,
}

#[derive(Debug, Clone)]
pub struct Grant {
    pub id: String,
    pub app: String,
    pub apis: ApiSet,
    pub users: Vec<String>,
    period: timeutil::Period,
    pub max_uses: Option<u64>,
    windows: Vec<Window>,
    offset: i64,
    pub forbid_request_fields: Vec<Vec<String>>,
    pub hide_response_fields: Vec<Vec<String>>,
}

fn field_paths(field: &str, paths: &[String]) -> Result<Vec<Vec<String>>, ConfigError> {
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            fields::parse_path(p).ok_or_else(|| {
                ConfigError::new(
                    format!("{field}[{i}]"),
                    "a field path is dot-separated names, like order.price",
                )
            })
        })
        .collect()
}

/// One grant, checked field by field (its APIs and groups, validity, windows, use limits, field
/// rules, the approval of an S3 grant), each error naming its field. Longer than most
/// functions: it is one straight list of field checks in the order the reference documents
/// them, and splitting it would scatter that order.
pub fn compile_grant(
    field: &str,
    g: &RawGrant,
    apis: &[Api],
    groups: &[ApiGroup],
    default_zone: &str,
) -> Result<Grant, ConfigError> {
    if g.apis.is_empty() && g.functions.is_empty() {
        return Err(ConfigError::new(
            format!("{field}.apis"),
            "a grant names APIs or business functions",
        ));
    }
    let mut set = resolve_apis(&format!("{field}.apis"), &g.apis, apis, groups)?;
    for (i, f) in g.functions.iter().enumerate() {
        let mut any = false;
        for (j, a) in apis.iter().enumerate() {
            if a.function == *f {
                if let Some(s) = set.0.get_mut(j) {
                    *s = true;
                }
                any = true;
            }
        }
        if !any {
            return Err(ConfigError::new(
                format!("{field}.functions[{i}]"),
                format!("no API has business function '{f}'"),
            ));
        }
    }
    if set.is_empty() {
        return Err(ConfigError::new(
            format!("{field}.apis"),
            "the grant covers no API",
        ));
    }
    let s0_only = apis
        .iter()
        .enumerate()
        .filter(|(j, _)| set.contains(*j))
        .all(|(_, a)| a.level == SecurityLevel::S0);
    if s0_only {
        return Err(ConfigError::new(
            format!("{field}.apis"),
            "S0 APIs need no grant; this grant covers only S0 APIs",
        ));
    }
    let covers_s3 = apis
        .iter()
        .enumerate()
        .any(|(j, a)| set.contains(j) && a.level == SecurityLevel::S3);
    match &g.approval {
        None if covers_s3 => {
            return Err(ConfigError::new(
                format!("{field}.approval"),
                format!("grant '{}' covers S3 APIs and needs an approval record (approver, ticket, date) (PERM-3)", g.id),
            ))
        }
        Some(a) => {
            if a.approver.trim().is_empty() || a.ticket.trim().is_empty() {
                return Err(ConfigError::new(format!("{field}.approval"), format!("grant '{}': approver and ticket are required", g.id)));
            }
            if timeutil::parse_date(&a.date).is_none() {
                return Err(ConfigError::new(format!("{field}.approval.date"), "must be YYYY-MM-DD"));
            }
        }
        None => {}
    }
    let period = timeutil::Period::parse(field, &g.not_before, &g.not_after)?;
    let max_uses = match (g.once, g.max_uses) {
        (true, Some(_)) => {
            return Err(ConfigError::new(
                format!("{field}.once"),
                "give once or max_uses, not both",
            ));
        }
        (true, None) => Some(1),
        (false, Some(0)) => {
            return Err(ConfigError::new(
                format!("{field}.max_uses"),
                "must be at least 1",
            ))
        }
        (false, m) => m,
    };
    let zone = g.timezone.as_deref().unwrap_or(default_zone);
    let offset = timeutil::zone_offset(zone).ok_or_else(|| {
        ConfigError::new(
            format!("{field}.timezone"),
            format!("'{zone}' is not supported: use a zone without daylight saving (Asia/Shanghai, Asia/Hong_Kong, UTC, ...) or an offset like +08:00"),
        )
    })?;
    let mut windows = Vec::new();
    for (i, w) in g.windows.iter().enumerate() {
        let wf = format!("{field}.windows[{i}]");
        let from = timeutil::parse_hhmm(&w.from)
            .ok_or_else(|| ConfigError::new(format!("{wf}.from"), "must be HH:MM"))?;
        let to = timeutil::parse_hhmm(&w.to)
            .ok_or_else(|| ConfigError::new(format!("{wf}.to"), "must be HH:MM"))?;
        if from >= to {
            return Err(ConfigError::new(
                format!("{wf}.to"),
                "must be after from (split a window that crosses midnight in two)",
            ));
        }
        let days = if w.days.is_empty() {
            0x7f
        } else {
            w.days.iter().fold(0u8, |acc, d| acc | 1 << (*d as u8))
        };
        windows.push(Window { days, from, to });
    }
    Ok(Grant {
        id: g.id.clone(),
        app: g.app.clone(),
        apis: set,
        users: g.users.iter().map(|u| normal_user(u)).collect(),
        period,
        max_uses,
        windows,
        offset,
        forbid_request_fields: field_paths(
            &format!("{field}.forbid_request_fields"),
            &g.forbid_request_fields,
        )?,
        hide_response_fields: field_paths(
            &format!("{field}.hide_response_fields"),
            &g.hide_response_fields,
        )?,
    })
}

/// The response fields any grant of `api` hides (their union): what a call that selected no
/// grant (report mode) must not see.
pub fn hidden_by_any_grant(apis: &[Api], grants: &[Grant], api: &str) -> Vec<Vec<String>> {
    let Some(index) = apis.iter().position(|a| a.id == api) else {
        return Vec::new();
    };
    let mut out: Vec<Vec<String>> = Vec::new();
    for g in grants.iter().filter(|g| g.apis.contains(index)) {
        for f in &g.hide_response_fields {
            if !out.contains(f) {
                out.push(f.clone());
            }
        }
    }
    out
}

impl Grant {
    fn covers(&self, app: &str, api_index: usize, user: Option<&str>) -> bool {
        self.app == app
            && self.apis.contains(api_index)
            && (self.users.is_empty() || user.is_some_and(|u| self.users.iter().any(|x| x == u)))
    }

    /// Why this grant is not valid now, if it is not.
    fn validity(&self, now: u64) -> Option<Deny> {
        match self.period.outside(now) {
            Some(timeutil::Outside::Before(nb)) => {
                return Some(Deny::new(
                    DenyReason::GrantNotYetValid,
                    format!("grant {} starts at {nb}", self.id),
                ));
            }
            Some(timeutil::Outside::After(na)) => {
                return Some(Deny::new(
                    DenyReason::GrantExpired,
                    format!("grant {} ended at {na}", self.id),
                ));
            }
            None => {}
        }
        if !self.windows.is_empty() {
            let (day, minute) = timeutil::local_weekday_minute(now, self.offset);
            let open = self
                .windows
                .iter()
                .any(|w| w.days & (1 << day) != 0 && minute >= w.from && minute < w.to);
            if !open {
                return Some(Deny::new(
                    DenyReason::GrantOutsideWindow,
                    format!("grant {} is closed at this time", self.id),
                ));
            }
        }
        None
    }
}

/// Picks the grant that lets this call through (PERM-2): the first covering grant that is valid
/// now. With none, the refusal says why the nearest one failed.
/// The grant's contract period and windows at `now` (PERM-5), for a grant already selected.
pub fn check_grant_validity(grant: &Grant, now: u64) -> Result<(), Deny> {
    match grant.validity(now) {
        Some(d) => Err(d),
        None => Ok(()),
    }
}

/// The first grant that lets this app (and user) call the API now: its index in `grants`.
pub fn select_grant(
    grants: &[Grant],
    app: &str,
    api_index: usize,
    user: Option<&str>,
    now: u64,
) -> Result<usize, Deny> {
    let mut first_problem: Option<Deny> = None;
    for (i, g) in grants
        .iter()
        .enumerate()
        .filter(|(_, g)| g.covers(app, api_index, user))
    {
        match g.validity(now) {
            None => return Ok(i),
            Some(d) => {
                first_problem.get_or_insert(d);
            }
        }
    }
    Err(first_problem.unwrap_or_else(|| {
        Deny::new(
            DenyReason::NoGrant,
            format!("no grant lets {app} call this API"),
        )
    }))
}
