//! Anomaly rules decided from the request alone (MON-3, MON-7, MON-9): access outside the
//! working hours of an API or an app, in an explicit time zone; access from outside an app's
//! usual source ranges. Each rule alerts (the audit record's `anomalies`, the metric
//! `apisec_anomalies_total`, and the request goes on) or blocks (`403 anomaly_blocked`), as
//! the policy says.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Deny, DenyReason};
use crate::ip::Cidr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Alert,
    Block,
}

impl RuleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleAction::Alert => "alert",
            RuleAction::Block => "block",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAnomalies {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub working_hours: Vec<RawHours>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usual_sources: Vec<RawSources>,
}

/// Calls are expected on `days` between `from` and `to` (local time in `timezone`); `to`
/// before `from` is a window across midnight (a futures night session), which belongs to the
/// day it starts on.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHours {
    pub id: String,
    /// A fixed UTC offset, `+08:00`, or `UTC`. Required: no rule runs in a guessed zone.
    pub timezone: String,
    /// mon .. sun; Monday to Friday when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<Vec<String>>,
    /// `HH:MM`, inclusive.
    pub from: String,
    /// `HH:MM`, exclusive.
    pub to: String,
    /// The APIs and apps the rule watches; all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apis: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<String>,
    pub action: RuleAction,
}

/// An app's usual source ranges: a call from elsewhere is an anomaly (distinct from
/// `allowed_ips`, which refuses outright).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSources {
    pub id: String,
    pub app: String,
    pub ranges: Vec<String>,
    pub action: RuleAction,
}

#[derive(Debug, Clone)]
struct Hours {
    id: String,
    offset_seconds: i64,
    /// Bit d set: weekday d (0 = Monday) is a working day.
    days: u8,
    from: u32,
    to: u32,
    apis: Vec<String>,
    apps: Vec<String>,
    action: RuleAction,
}

#[derive(Debug, Clone)]
struct Sources {
    id: String,
    app: String,
    ranges: Vec<Cidr>,
    action: RuleAction,
}

#[derive(Debug, Clone, Default)]
pub struct Anomalies {
    hours: Vec<Hours>,
    sources: Vec<Sources>,
}

/// A rule that matched a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Anomaly {
    pub rule: String,
    pub kind: &'static str,
    pub action: &'static str,
}

fn offset(field: &str, tz: &str) -> Result<i64, ConfigError> {
    if tz == "UTC" || tz == "Z" {
        return Ok(0);
    }
    let bad = || {
        ConfigError::new(
            field,
            format!("{tz:?} is not a UTC offset like +08:00, or UTC"),
        )
    };
    let (sign, rest) = match tz.as_bytes().first() {
        Some(b'+') => (1, tz.get(1..).ok_or_else(bad)?),
        Some(b'-') => (-1, tz.get(1..).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    let minutes = clock(rest).filter(|m| *m <= 14 * 60).ok_or_else(bad)?;
    Ok(sign * i64::from(minutes) * 60)
}

/// Minutes after midnight of `HH:MM`.
fn clock(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl RawAnomalies {
    /// Compiles the rules; `apis` and `apps` are the ids the policy defines.
    pub fn compile(
        &self,
        api_exists: impl Fn(&str) -> bool,
        app_exists: impl Fn(&str) -> bool,
    ) -> Result<Anomalies, ConfigError> {
        let mut ids: Vec<&str> = Vec::new();
        let unique =
            |ids: &mut Vec<&'_ str>, field: String, id: &'_ str| -> Result<(), ConfigError> {
                if id.is_empty() || ids.contains(&id) {
                    return Err(ConfigError::new(
                        field,
                        format!("rule id {id:?} is empty or used twice"),
                    ));
                }
                Ok(())
            };
        let mut out = Anomalies::default();
        for (i, h) in self.working_hours.iter().enumerate() {
            let f = format!("anomalies.working_hours[{i}]");
            unique(&mut ids, format!("{f}.id"), &h.id)?;
            ids.push(&h.id);
            let days = match &h.days {
                None => 0b001_1111,
                Some(list) => {
                    let mut bits = 0u8;
                    for d in list {
                        let n = DAYS.iter().position(|x| x == d).ok_or_else(|| {
                            ConfigError::new(
                                format!("{f}.days"),
                                format!("{d:?} is not mon .. sun"),
                            )
                        })?;
                        bits |= 1 << n;
                    }
                    if bits == 0 {
                        return Err(ConfigError::new(
                            format!("{f}.days"),
                            "no day: every call would be an anomaly",
                        ));
                    }
                    bits
                }
            };
            let from =
                clock(&h.from).ok_or_else(|| ConfigError::new(format!("{f}.from"), "not HH:MM"))?;
            let to =
                clock(&h.to).ok_or_else(|| ConfigError::new(format!("{f}.to"), "not HH:MM"))?;
            if from == to {
                return Err(ConfigError::new(
                    format!("{f}.to"),
                    "from and to are the same time",
                ));
            }
            if let Some(a) = h.apis.iter().find(|a| !api_exists(a)) {
                return Err(ConfigError::new(
                    format!("{f}.apis"),
                    format!("unknown API {a:?}"),
                ));
            }
            if let Some(a) = h.apps.iter().find(|a| !app_exists(a)) {
                return Err(ConfigError::new(
                    format!("{f}.apps"),
                    format!("unknown app {a:?}"),
                ));
            }
            out.hours.push(Hours {
                id: h.id.clone(),
                offset_seconds: offset(&format!("{f}.timezone"), &h.timezone)?,
                days,
                from,
                to,
                apis: h.apis.clone(),
                apps: h.apps.clone(),
                action: h.action,
            });
        }
        for (i, s) in self.usual_sources.iter().enumerate() {
            let f = format!("anomalies.usual_sources[{i}]");
            unique(&mut ids, format!("{f}.id"), &s.id)?;
            ids.push(&s.id);
            if !app_exists(&s.app) {
                return Err(ConfigError::new(
                    format!("{f}.app"),
                    format!("unknown app {:?}", s.app),
                ));
            }
            if s.ranges.is_empty() {
                return Err(ConfigError::new(
                    format!("{f}.ranges"),
                    "no range: every call would be an anomaly",
                ));
            }
            let ranges = s
                .ranges
                .iter()
                .map(|r| {
                    Cidr::parse(r)
                        .map_err(|e| ConfigError::new(format!("{f}.ranges"), format!("{r:?}: {e}")))
                })
                .collect::<Result<_, _>>()?;
            out.sources.push(Sources {
                id: s.id.clone(),
                app: s.app.clone(),
                ranges,
                action: s.action,
            });
        }
        Ok(out)
    }
}

impl Hours {
    fn applies(&self, app: &str, api: &str) -> bool {
        (self.apis.is_empty() || self.apis.iter().any(|a| a == api))
            && (self.apps.is_empty() || self.apps.iter().any(|a| a == app))
    }

    /// Whether `now` (unix seconds) falls inside the working window.
    fn inside(&self, now: u64) -> bool {
        let local = i64::try_from(now)
            .unwrap_or(i64::MAX)
            .saturating_add(self.offset_seconds);
        let days = local.div_euclid(86_400);
        let minute = u32::try_from(local.rem_euclid(86_400) / 60).unwrap_or(0);
        // 1970-01-01 was a Thursday (weekday 3, Monday = 0)
        let weekday = |d: i64| u8::try_from((d + 3).rem_euclid(7)).unwrap_or(0);
        let working = |d: i64| self.days & (1 << weekday(d)) != 0;
        if self.from < self.to {
            working(days) && self.from <= minute && minute < self.to
        } else if minute >= self.from {
            working(days)
        } else {
            minute < self.to && working(days - 1) // after midnight: the night of the day before
        }
    }
}

impl Anomalies {
    pub fn is_empty(&self) -> bool {
        self.hours.is_empty() && self.sources.is_empty()
    }

    /// The rules a call of `app` to `api` at `now` from `ip` matches, each with its action.
    pub fn check(&self, app: &str, api: &str, ip: Option<IpAddr>, now: u64) -> Vec<Anomaly> {
        let hours = self
            .hours
            .iter()
            .filter(|h| h.applies(app, api) && !h.inside(now))
            .map(|h| (h.id.as_str(), "working_hours", h.action));
        let sources = self
            .sources
            .iter()
            .filter(|s| {
                s.app == app && !ip.is_some_and(|ip| s.ranges.iter().any(|r| r.contains(ip)))
            })
            .map(|s| (s.id.as_str(), "usual_sources", s.action));
        hours
            .chain(sources)
            .map(|(rule, kind, action)| Anomaly {
                rule: rule.to_string(),
                kind,
                action: action.as_str(),
            })
            .collect()
    }
}

/// The refusal for matched rules when one of them blocks.
pub fn blocking(found: &[Anomaly]) -> Option<Deny> {
    found.iter().find(|a| a.action == "block").map(|a| {
        Deny::new(
            DenyReason::AnomalyBlocked,
            format!("{} rule {} matched", a.kind, a.rule),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hours(
        tz: &str,
        days: Option<Vec<&str>>,
        from: &str,
        to: &str,
        action: RuleAction,
    ) -> Anomalies {
        RawAnomalies {
            working_hours: vec![RawHours {
                id: "h".into(),
                timezone: tz.into(),
                days: days.map(|d| d.into_iter().map(String::from).collect()),
                from: from.into(),
                to: to.into(),
                apis: vec![],
                apps: vec![],
                action,
            }],
            usual_sources: vec![],
        }
        .compile(|_| true, |_| true)
        .unwrap()
    }

    // 2026-11-30 (a Monday) 01:30 UTC = 09:30 in +08:00
    const MON_0930_CST: u64 = 1_796_002_200;

    #[test]
    fn working_hours_in_an_explicit_zone() {
        let h = hours("+08:00", None, "09:00", "15:30", RuleAction::Alert);
        assert_eq!(h.check("a", "x", None, MON_0930_CST), vec![]);
        // the same instant is 01:30 in UTC: outside the same window written for UTC
        let utc = hours("UTC", None, "09:00", "15:30", RuleAction::Alert);
        assert_eq!(
            utc.check("a", "x", None, MON_0930_CST)[0].kind,
            "working_hours"
        );
        // Saturday 09:30 +08:00 is outside Monday to Friday
        assert_eq!(h.check("a", "x", None, MON_0930_CST + 5 * 86_400).len(), 1);
        let at_1530 = MON_0930_CST + 6 * 3600;
        assert!(
            blocking(&h.check("a", "x", None, at_1530)).is_none(),
            "alert only"
        );
        let block = hours("+08:00", None, "09:00", "15:30", RuleAction::Block);
        let d = blocking(&block.check("a", "x", None, at_1530)).unwrap();
        assert_eq!(d.reason, DenyReason::AnomalyBlocked);
    }

    #[test]
    fn a_night_session_belongs_to_the_day_it_starts() {
        // Monday to Friday 21:00 - 02:30 (+08:00)
        let n = hours("+08:00", None, "21:00", "02:30", RuleAction::Block);
        let outside = |t| !n.check("a", "x", None, t).is_empty();
        let mon_2130 = MON_0930_CST + 12 * 3600;
        assert!(!outside(mon_2130));
        assert!(
            !outside(mon_2130 + 4 * 3600),
            "Tuesday 01:30 is Monday's night"
        );
        assert!(outside(mon_2130 + 6 * 3600), "Tuesday 03:30");
        let sat_0130 = MON_0930_CST + 5 * 86_400 - 8 * 3600; // Saturday 01:30: Friday's night
        assert!(!outside(sat_0130));
        assert!(
            outside(sat_0130 + 86_400),
            "Sunday 01:30: Saturday has no night"
        );
    }

    #[test]
    fn usual_sources_and_bad_rules() {
        let s = RawAnomalies {
            working_hours: vec![],
            usual_sources: vec![RawSources {
                id: "desk".into(),
                app: "a".into(),
                ranges: vec!["10.1.0.0/16".into()],
                action: RuleAction::Alert,
            }],
        }
        .compile(|_| true, |_| true)
        .unwrap();
        assert_eq!(s.check("a", "x", "10.1.2.3".parse().ok(), 0), vec![]);
        assert_eq!(s.check("b", "x", "192.0.2.1".parse().ok(), 0), vec![]);
        assert_eq!(
            s.check("a", "x", "192.0.2.1".parse().ok(), 0)[0].rule,
            "desk"
        );
        assert_eq!(
            s.check("a", "x", None, 0)[0].rule,
            "desk",
            "no address: not a usual one"
        );
        for (tz, from) in [
            ("CST", "09:00"),
            ("+08", "09:00"),
            ("+08:00", "9:00"),
            ("+08:00", "24:00"),
        ] {
            let raw = RawAnomalies {
                working_hours: vec![RawHours {
                    id: "h".into(),
                    timezone: tz.into(),
                    days: None,
                    from: from.into(),
                    to: "15:00".into(),
                    apis: vec![],
                    apps: vec![],
                    action: RuleAction::Alert,
                }],
                usual_sources: vec![],
            };
            assert!(raw.compile(|_| true, |_| true).is_err(), "{tz} {from}");
        }
    }
}
