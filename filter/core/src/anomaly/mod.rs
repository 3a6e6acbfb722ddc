//! Anomaly rules (MON-3, MON-4, MON-6, MON-9). Decided from the request alone: access outside
//! the working hours of an API or an app, in an explicit time zone; access from outside an
//! app's usual source ranges. Counted in the state store (local or cluster, so they hold across
//! workers and replicas): bulk pulls (calls or response bytes per app per window above a
//! threshold), a source never seen before for an app, and repeated signature failures under a
//! valid key id. Each rule alerts (the audit record's `anomalies`, the metric
//! `apisec_anomalies_total`, and the request goes on) or blocks (`403 anomaly_blocked`; for
//! signature failures, a ban of the failing source), as the policy says.
//!
//! Counted rules count only calls whose caller proved to be the app (an App_ID is no secret:
//! counting unauthenticated calls would let anyone use up a partner's allowance or teach the
//! gateway a source in its name).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Deny, DenyReason};
use crate::ip::Cidr;
pub use crate::state::anomalies::{Anomaly, RuleAction, Watch};
use crate::state::bans::BanSettings;
use crate::state::{BanSubject, Op};
use crate::timeutil;

mod compile;

#[cfg(test)]
mod tests;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawAnomalies {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub working_hours: Vec<RawHours>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usual_sources: Vec<RawSources>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bulk_pulls: Vec<RawBulk>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub new_sources: Vec<RawNewSources>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signature_failures: Vec<RawKeyFailures>,
}

/// Calls of an app, or response bytes it received, above a threshold within a window (a fixed
/// window of `window_seconds`, aligned to the Unix epoch). Bytes are known when a response
/// ends: the calls after the one that crossed the threshold are the anomaly.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawBulk {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apis: Vec<String>,
    pub window_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_calls: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<u64>,
    pub action: RuleAction,
}

/// A source (an IPv4 address, an IPv6 /64) an app has not called from before, or not within
/// `forget_days`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawNewSources {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<String>,
    /// RFC 3339: until then new sources are learned without an anomaly (when a rule is
    /// introduced, the apps' sources are not known yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learn_until: Option<String>,
    /// Ranges never counted as new: how an operator admits a source a blocking rule refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approved: Vec<String>,
    /// Sources remembered per app; past that, the one seen longest ago is forgotten.
    #[serde(default = "default_max_sources")]
    pub max_sources: u32,
    #[serde(default = "default_forget_days")]
    pub forget_days: u32,
    pub action: RuleAction,
}

fn default_max_sources() -> u32 {
    64
}
fn default_forget_days() -> u32 {
    90
}

/// Signatures that do not verify under a valid key id of an app, `threshold` within a window
/// (fixed, aligned to the epoch): someone holds the key id and not the key (MON-4). `block`
/// bans every source that fails under that key from then on in the window, for `ban_seconds`
/// (default: `bans.ban_seconds`); never the key itself, which would let anyone lock the partner
/// out.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawKeyFailures {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<String>,
    pub threshold: u32,
    pub window_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ban_seconds: Option<u64>,
    pub action: RuleAction,
}

/// Calls are expected on `days` between `from` and `to` (local time in `timezone`); `to`
/// before `from` is a window across midnight (a futures night session), which belongs to the
/// day it starts on.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
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
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
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

#[derive(Debug, Clone)]
struct Bulk {
    id: String,
    apps: Vec<String>,
    apis: Vec<String>,
    window: u64,
    max_calls: Option<u64>,
    max_bytes: Option<u64>,
    action: RuleAction,
}

#[derive(Debug, Clone)]
struct NewSources {
    id: String,
    apps: Vec<String>,
    learn_until: u64,
    approved: Vec<Cidr>,
    max: u32,
    forget: u64,
    action: RuleAction,
}

#[derive(Debug, Clone)]
struct KeyFailures {
    id: String,
    apps: Vec<String>,
    threshold: u32,
    window: u64,
    ban_seconds: u64,
    action: RuleAction,
}

#[derive(Debug, Clone, Default)]
pub struct Anomalies {
    hours: Vec<Hours>,
    sources: Vec<Sources>,
    bulk: Vec<Bulk>,
    new_sources: Vec<NewSources>,
    key_failures: Vec<KeyFailures>,
}

impl Hours {
    fn applies(&self, app: &str, api: &str) -> bool {
        within(&self.apis, api) && within(&self.apps, app)
    }

    /// Whether `now` (unix seconds) falls inside the working window.
    fn inside(&self, now: u64) -> bool {
        let (weekday, minute) = timeutil::local_weekday_minute(now, self.offset_seconds);
        let working = |day: u32| self.days & (1 << day) != 0;
        if self.from < self.to {
            working(weekday) && self.from <= minute && minute < self.to
        } else if minute >= self.from {
            working(weekday)
        } else {
            // after midnight: the night of the day before
            minute < self.to && working((weekday + 6) % 7)
        }
    }
}

/// The kinds of counted rules, as the audit record and the metric name them.
pub const BULK_PULL: &str = "bulk_pull";
pub const NEW_SOURCE: &str = "new_source";
pub const SIGNATURE_FAILURES: &str = "signature_failures";

/// Whether a rule's list of apps or APIs takes `id`: an empty list takes every one.
fn within(list: &[String], id: &str) -> bool {
    list.is_empty() || list.iter().any(|a| a == id)
}

fn watch(rule: &str, app: &str, kind: &'static str, action: RuleAction) -> Watch {
    Watch {
        rule: rule.to_string(),
        app: app.to_string(),
        kind,
        action,
    }
}

impl Anomalies {
    pub fn is_empty(&self) -> bool {
        self.hours.is_empty() && self.sources.is_empty() && !self.counted()
    }

    /// Whether any rule counts in the state store.
    pub fn counted(&self) -> bool {
        !self.bulk.is_empty() || !self.new_sources.is_empty() || !self.key_failures.is_empty()
    }

    /// What an authenticated call of `app` to `api` from `ip` asks of the counted rules, in
    /// the batch that lets it through: its count toward bulk pulls, and its source.
    pub fn call_ops(&self, app: &str, api: &str, ip: Option<IpAddr>, now: u64) -> Vec<Op> {
        let mut ops = Vec::new();
        for b in &self.bulk {
            if within(&b.apps, app) && within(&b.apis, api) {
                ops.push(Op::Calls {
                    watch: watch(&b.id, app, BULK_PULL, b.action),
                    bucket: now / b.window,
                    window: b.window,
                    max_calls: b.max_calls.unwrap_or(u64::MAX),
                    max_bytes: b.max_bytes.unwrap_or(u64::MAX),
                });
            }
        }
        for n in &self.new_sources {
            let approved = ip.is_some_and(|ip| n.approved.iter().any(|c| c.contains(ip)));
            if within(&n.apps, app) && !approved {
                ops.push(Op::Source {
                    watch: watch(&n.id, app, NEW_SOURCE, n.action),
                    // no address from the host: one unknown source, never a known one
                    source: ip.map_or_else(|| "unknown".into(), |ip| crate::ip::source(ip, 64)),
                    learning: now < n.learn_until,
                    max: n.max,
                    forget: n.forget,
                });
            }
        }
        ops
    }

    /// The response bytes an authenticated call of `app` to `api` received, for the bulk-pull
    /// rules that count bytes (run when the stream ends).
    pub fn bytes_ops(&self, app: &str, api: &str, bytes: u64, now: u64) -> Vec<Op> {
        if bytes == 0 {
            return Vec::new();
        }
        self.bulk
            .iter()
            .filter(|b| b.max_bytes.is_some() && within(&b.apps, app) && within(&b.apis, api))
            .map(|b| Op::Bytes {
                watch: watch(&b.id, app, BULK_PULL, b.action),
                bucket: now / b.window,
                window: b.window,
                bytes,
            })
            .collect()
    }

    /// A signature by `app`'s key `keyid` that did not verify, sent from `ip`.
    pub fn failure_ops(&self, app: &str, keyid: &str, ip: Option<IpAddr>, now: u64) -> Vec<Op> {
        self.key_failures
            .iter()
            .filter(|k| within(&k.apps, app))
            .map(|k| Op::KeyFailure {
                watch: watch(&k.id, app, SIGNATURE_FAILURES, k.action),
                keyid: keyid.to_string(),
                bucket: now / k.window,
                window: k.window,
                threshold: k.threshold,
                ban: ip
                    .filter(|_| k.action == RuleAction::Block)
                    .map(|ip| (BanSubject::Ip(ip), k.ban_seconds)),
            })
            .collect()
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

/// Response bytes waiting to be sent to the cluster store, at most this many windows' worth.
pub const MAX_PENDING_TALLIES: usize = 4096;

/// Adds the byte counts of an ended stream (`ops`, from [`Anomalies::bytes_ops`]) to those a
/// worker has not sent to the cluster store yet: one count per rule, app and window, so the
/// pending list stays as long as the rules and apps in use, and a window that is over is
/// dropped (nothing is counted in it any more). Answers how many counts found no room.
pub fn pend(pending: &mut Vec<Op>, ops: Vec<Op>, now: u64) -> usize {
    pending.retain(|op| match op {
        Op::Bytes { bucket, window, .. } => *bucket >= now / (*window).max(1),
        _ => false,
    });
    let mut lost = 0;
    for op in ops {
        let Op::Bytes {
            watch,
            bucket,
            bytes,
            ..
        } = &op
        else {
            continue;
        };
        let same = pending.iter_mut().find_map(|p| match p {
            Op::Bytes {
                watch: w,
                bucket: b,
                bytes: n,
                ..
            } if w == watch && b == bucket => Some(n),
            _ => None,
        });
        if let Some(n) = same {
            *n = n.saturating_add(*bytes);
        } else if pending.len() < MAX_PENDING_TALLIES {
            pending.push(op);
        } else {
            lost += 1;
        }
    }
    lost
}
