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
use sha2::{Digest, Sha256};

use crate::bans::BanSettings;
use crate::error::{ConfigError, Deny, DenyReason};
use crate::ip::Cidr;
pub use crate::state::anomalies::{Anomaly, RuleAction, Watch};
use crate::state::{BanSubject, Op};
use crate::store::{u64_at, update, SharedStore};
use crate::timeutil;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
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

/// A rule's zone: a fixed offset (`+08:00`, at most 14 hours) or `UTC`; never a zone name
/// (the rule names its offset, nothing is looked up).
fn offset(field: &str, tz: &str) -> Result<i64, ConfigError> {
    if tz == "UTC" || tz == "Z" {
        return Ok(0);
    }
    timeutil::parse_offset(tz)
        .filter(|o| o.abs() <= 14 * 3600)
        .ok_or_else(|| {
            ConfigError::new(
                field,
                format!("{tz:?} is not a UTC offset like +08:00, or UTC"),
            )
        })
}

/// Minutes after midnight of `HH:MM`, before 24:00.
fn clock(s: &str) -> Option<u32> {
    timeutil::parse_hhmm(s).filter(|m| *m < 24 * 60)
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl RawAnomalies {
    /// Compiles the rules; `apis` and `apps` are the ids the policy defines, `bans` its
    /// automatic bans (a blocking signature-failure rule bans with them).
    pub fn compile(
        &self,
        api_exists: impl Fn(&str) -> bool,
        app_exists: impl Fn(&str) -> bool,
        bans: Option<&BanSettings>,
    ) -> Result<Anomalies, ConfigError> {
        let mut ids: Vec<&str> = Vec::new();
        let unique = |ids: &mut Vec<&'_ str>,
                      field: String,
                      id: &'_ str|
         -> Result<(), ConfigError> {
            let named = !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !named || ids.contains(&id) {
                return Err(ConfigError::new(
                    field,
                    format!("rule id {id:?} is not 1 to 64 of A-Z a-z 0-9 . _ -, or is used twice"),
                ));
            }
            Ok(())
        };
        let known = |field: String, apis: &[String], apps: &[String]| -> Result<(), ConfigError> {
            if let Some(a) = apis.iter().find(|a| !api_exists(a)) {
                return Err(ConfigError::new(
                    format!("{field}.apis"),
                    format!("unknown API {a:?}"),
                ));
            }
            if let Some(a) = apps.iter().find(|a| !app_exists(a)) {
                return Err(ConfigError::new(
                    format!("{field}.apps"),
                    format!("unknown app {a:?}"),
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
            known(f.clone(), &h.apis, &h.apps)?;
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
        for (i, b) in self.bulk_pulls.iter().enumerate() {
            let f = format!("anomalies.bulk_pulls[{i}]");
            unique(&mut ids, format!("{f}.id"), &b.id)?;
            ids.push(&b.id);
            known(f.clone(), &b.apis, &b.apps)?;
            if !(1..=86_400).contains(&b.window_seconds) {
                return Err(ConfigError::new(
                    format!("{f}.window_seconds"),
                    "must be between 1 and 86400",
                ));
            }
            if b.max_calls.is_none() && b.max_response_bytes.is_none() {
                return Err(ConfigError::new(
                    f,
                    "names max_calls, max_response_bytes or both",
                ));
            }
            if b.max_calls == Some(0) || b.max_response_bytes == Some(0) {
                return Err(ConfigError::new(f, "a maximum of 0 refuses every call"));
            }
            out.bulk.push(Bulk {
                id: b.id.clone(),
                apps: b.apps.clone(),
                apis: b.apis.clone(),
                window: b.window_seconds,
                max_calls: b.max_calls,
                max_bytes: b.max_response_bytes,
                action: b.action,
            });
        }
        for (i, n) in self.new_sources.iter().enumerate() {
            let f = format!("anomalies.new_sources[{i}]");
            unique(&mut ids, format!("{f}.id"), &n.id)?;
            ids.push(&n.id);
            known(f.clone(), &[], &n.apps)?;
            let learn_until = match &n.learn_until {
                None => 0,
                Some(t) => timeutil::parse_rfc3339(t).ok_or_else(|| {
                    ConfigError::new(
                        format!("{f}.learn_until"),
                        "must be an RFC 3339 time with an offset",
                    )
                })?,
            };
            let approved = n
                .approved
                .iter()
                .map(|r| {
                    Cidr::parse(r).map_err(|e| {
                        ConfigError::new(format!("{f}.approved"), format!("{r:?}: {e}"))
                    })
                })
                .collect::<Result<_, _>>()?;
            if !(1..=1024).contains(&n.max_sources) {
                return Err(ConfigError::new(
                    format!("{f}.max_sources"),
                    "must be between 1 and 1024",
                ));
            }
            if !(1..=3650).contains(&n.forget_days) {
                return Err(ConfigError::new(
                    format!("{f}.forget_days"),
                    "must be between 1 and 3650",
                ));
            }
            out.new_sources.push(NewSources {
                id: n.id.clone(),
                apps: n.apps.clone(),
                learn_until,
                approved,
                max: n.max_sources,
                forget: u64::from(n.forget_days) * 86_400,
                action: n.action,
            });
        }
        for (i, k) in self.signature_failures.iter().enumerate() {
            let f = format!("anomalies.signature_failures[{i}]");
            unique(&mut ids, format!("{f}.id"), &k.id)?;
            ids.push(&k.id);
            known(f.clone(), &[], &k.apps)?;
            if k.threshold == 0 {
                return Err(ConfigError::new(
                    format!("{f}.threshold"),
                    "must be at least 1",
                ));
            }
            if !(1..=86_400).contains(&k.window_seconds) {
                return Err(ConfigError::new(
                    format!("{f}.window_seconds"),
                    "must be between 1 and 86400",
                ));
            }
            if k.ban_seconds
                .is_some_and(|b| !(1..=30 * 86_400).contains(&b))
            {
                return Err(ConfigError::new(
                    format!("{f}.ban_seconds"),
                    "must be between 1 and 2592000",
                ));
            }
            let ban_seconds = match (k.action, bans) {
                (RuleAction::Block, None) => {
                    return Err(ConfigError::new(
                        format!("{f}.action"),
                        "block bans the failing source: the policy needs a bans section",
                    ))
                }
                (_, b) => k.ban_seconds.or(b.map(|b| b.ban_seconds)).unwrap_or(3600),
            };
            if k.action == RuleAction::Alert && k.ban_seconds.is_some() {
                return Err(ConfigError::new(
                    format!("{f}.ban_seconds"),
                    "only with action: block",
                ));
            }
            out.key_failures.push(KeyFailures {
                id: k.id.clone(),
                apps: k.apps.clone(),
                threshold: k.threshold,
                window: k.window_seconds,
                ban_seconds,
                action: k.action,
            });
        }
        Ok(out)
    }
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

/// How many failing sources one signature-failure rule tracks per app, key and window.
const FAILING_SOURCES: usize = 64;

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

/// How long a known source's last call may be stale before it is written again (a source
/// calling all day costs one write an hour, not one per call).
const SEEN_REFRESH_SECONDS: u64 = 3600;
const SEEN_ENTRY: usize = 16; // fp 8 | last seen 8

fn fingerprint(s: &str) -> [u8; 8] {
    let d = Sha256::new()
        .chain_update(b"apisec-source\0")
        .chain_update(s.as_bytes())
        .finalize();
    let mut fp = [0u8; 8];
    fp.copy_from_slice(d.get(..8).unwrap_or(&[0u8; 8]));
    fp
}

fn window_values(v: &[u8], bucket: u64) -> (u64, u64) {
    if v.len() >= 24 && u64_at(v, 0) == bucket {
        (u64_at(v, 8), u64_at(v, 16))
    } else {
        (0, 0)
    }
}

fn encode3(a: u64, b: u64, c: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    for x in [a, b, c] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Runs a counted rule's operation on the local store (Envoy shared data, every worker of this
/// gateway): a rule that matched goes into `answer.anomalies`, a ban it started into
/// `answer.ban_started`. Err refuses the call: a blocking rule matched (`anomaly_blocked`), or
/// the store could not count a call that a rule must see (`host_unavailable`: fail closed).
pub fn run_local(
    store: &dyn SharedStore,
    bans: Option<&BanSettings>,
    op: &Op,
    now: u64,
    answer: &mut crate::state::Answer,
) -> Result<(), Deny> {
    let host = |e: crate::store::StoreError| {
        Deny::new(DenyReason::HostUnavailable, format!("anomaly counter: {e}"))
    };
    match op {
        Op::Calls {
            watch,
            bucket,
            window,
            max_calls,
            max_bytes,
        } => {
            let key = format!("apisec/anomaly/calls/{}/{}", watch.rule, watch.app);
            let over = update(store, &key, |v| {
                // a window already moved on (a slow request) counts in the newer one
                let bucket = (*bucket).max(if v.len() >= 24 { u64_at(v, 0) } else { 0 });
                let (calls, bytes) = window_values(v, bucket);
                let over = (calls >= *max_calls || bytes > *max_bytes).then(|| {
                    format!("{} made {calls} calls and received {bytes} response bytes in this {window} s window", watch.app)
                });
                if over.is_some() && watch.blocks() {
                    return (None, over);
                }
                (Some(encode3(bucket, calls.saturating_add(1), bytes)), over)
            })
            .map_err(host)?;
            match over {
                Some(detail) if watch.blocks() => {
                    answer.anomalies.push(watch.anomaly());
                    Err(watch.refusal(&detail))
                }
                Some(_) => {
                    answer.anomalies.push(watch.anomaly());
                    Ok(())
                }
                None => Ok(()),
            }
        }
        Op::Bytes {
            watch,
            bucket,
            bytes,
            ..
        } => {
            let key = format!("apisec/anomaly/calls/{}/{}", watch.rule, watch.app);
            let added = update(store, &key, |v| {
                let stored = if v.len() >= 24 { u64_at(v, 0) } else { 0 };
                if stored > *bucket {
                    return (None, false); // that window is over: nothing left to count in it
                }
                let (calls, sum) = window_values(v, *bucket);
                (
                    Some(encode3(*bucket, calls, sum.saturating_add(*bytes))),
                    true,
                )
            });
            if let Err(e) = added {
                answer.note = Some(format!("response bytes not counted: {e}"));
            }
            Ok(())
        }
        Op::Source {
            watch,
            source,
            learning,
            max,
            forget,
        } => {
            let key = format!("apisec/anomaly/src/{}/{}", watch.rule, watch.app);
            let fp = fingerprint(source);
            let new = update(store, &key, |v| {
                let mut seen: Vec<([u8; 8], u64)> = v
                    .chunks_exact(SEEN_ENTRY)
                    .map(|c| {
                        let mut f = [0u8; 8];
                        f.copy_from_slice(c.get(..8).unwrap_or(&[0u8; 8]));
                        (f, u64_at(c, 8))
                    })
                    .collect();
                let live = |last: u64| last.saturating_add(*forget) > now;
                let known = seen.iter().position(|(f, last)| *f == fp && live(*last));
                match known {
                    Some(i) => {
                        let stale = seen.get(i).is_some_and(|(_, last)| {
                            now.saturating_sub(*last) >= SEEN_REFRESH_SECONDS
                        });
                        if !stale {
                            return (None, false);
                        }
                        if let Some(e) = seen.get_mut(i) {
                            e.1 = now;
                        }
                    }
                    None => {
                        if watch.blocks() && !learning {
                            return (None, true);
                        }
                        seen.retain(|(f, last)| live(*last) && *f != fp);
                        while seen.len() >= *max as usize {
                            let oldest = seen
                                .iter()
                                .enumerate()
                                .min_by_key(|(_, (_, last))| *last)
                                .map(|(i, _)| i);
                            match oldest {
                                Some(i) => {
                                    seen.remove(i);
                                }
                                None => break,
                            }
                        }
                        seen.push((fp, now));
                    }
                }
                let mut out = Vec::with_capacity(seen.len() * SEEN_ENTRY);
                for (f, last) in &seen {
                    out.extend_from_slice(f);
                    out.extend_from_slice(&last.to_le_bytes());
                }
                (Some(out), known.is_none())
            })
            .map_err(host)?;
            if new && !learning {
                answer.anomalies.push(watch.anomaly());
                if watch.blocks() {
                    return Err(
                        watch.refusal(&format!("{} never called from {source} before", watch.app))
                    );
                }
            }
            Ok(())
        }
        Op::KeyFailure {
            watch,
            keyid,
            bucket,
            threshold,
            ban,
            ..
        } => {
            let key = format!(
                "apisec/anomaly/keyfail/{}/{}/{keyid}",
                watch.rule, watch.app
            );
            // Beside the count over all sources (the anomaly), each failing source's own count
            // in a bounded table: only a source's own failures ban it. Key ids are public, so a
            // stranger's failures under a partner's key id must not ban the partner's address.
            let fp = match (ban, bans) {
                (Some((subject, _)), Some(b)) => Some(b.fingerprint(subject.as_subject())),
                _ => None,
            };
            let counted = crate::store::count_in_window(store, &key, *bucket, fp, FAILING_SOURCES);
            let (n, from) = match counted {
                Ok(n) => n,
                Err(e) => {
                    answer.note = Some(format!("signature failure not counted: {e}"));
                    return Ok(());
                }
            };
            if n < u64::from(*threshold) {
                return Ok(());
            }
            answer.anomalies.push(watch.anomaly());
            if from < u64::from(*threshold) {
                return Ok(());
            }
            if let (Some((subject, seconds)), Some(b)) = (ban, bans) {
                match b.impose(store, subject.as_subject(), now, *seconds) {
                    Ok(true) => {
                        answer.ban_started = Some(crate::bans::started(
                            &b.describe(subject.as_subject()),
                            *seconds,
                            Some(&watch.rule),
                        ))
                    }
                    Ok(false) => {}
                    Err(e) => answer.note = Some(format!("ban not started: {e}")),
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)] // test code
mod tests {
    use super::*;
    use crate::state::Answer;
    use crate::store::MemoryStore;

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
            ..Default::default()
        }
        .compile(|_| true, |_| true, None)
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
            ..Default::default()
        }
        .compile(|_| true, |_| true, None)
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
            ("Asia/Shanghai", "09:00"),
            ("+14:30", "09:00"),
            ("+08:00", "+9:00"),
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
                ..Default::default()
            };
            assert!(
                raw.compile(|_| true, |_| true, None).is_err(),
                "{tz} {from}"
            );
        }
    }

    fn counted(yaml: serde_json::Value, bans: Option<&BanSettings>) -> Anomalies {
        serde_json::from_value::<RawAnomalies>(yaml)
            .unwrap()
            .compile(|_| true, |_| true, bans)
            .unwrap()
    }

    fn run(
        store: &MemoryStore,
        a: &Anomalies,
        ops: Vec<Op>,
        bans: Option<&BanSettings>,
        now: u64,
    ) -> (Answer, Option<Deny>) {
        let mut answer = Answer::default();
        for op in &ops {
            if let Err(d) = run_local(store, bans, op, now, &mut answer) {
                return (answer, Some(d));
            }
        }
        let _ = a;
        (answer, None)
    }

    const T: u64 = 1_800_000_000; // a multiple of 3600

    /// MON-3: calls over the window's maximum are anomalies; a blocking rule refuses them and
    /// does not count them; a new window starts from nothing.
    #[test]
    fn bulk_pulls_by_calls_in_alert_and_block() {
        let a = counted(
            serde_json::json!({"bulk_pulls": [
                {"id": "watch", "apps": ["a"], "window_seconds": 3600, "max_calls": 2, "action": "alert"},
                {"id": "stop", "apps": ["b"], "window_seconds": 3600, "max_calls": 2, "action": "block"}]}),
            None,
        );
        let store = MemoryStore::default();
        for (n, want) in [(1, 0), (2, 0), (3, 1), (4, 1)] {
            let (ans, refused) = run(&store, &a, a.call_ops("a", "x", None, T + n), None, T + n);
            assert!(refused.is_none());
            assert_eq!(ans.anomalies.len(), want, "call {n}");
        }
        assert_eq!(
            a.call_ops("c", "x", None, T).len(),
            0,
            "rules name their apps"
        );
        for n in 1..=2 {
            assert!(
                run(&store, &a, a.call_ops("b", "x", None, T + n), None, T + n)
                    .1
                    .is_none()
            );
        }
        for _ in 0..3 {
            let (ans, refused) = run(&store, &a, a.call_ops("b", "x", None, T + 5), None, T + 5);
            assert_eq!(refused.unwrap().reason, DenyReason::AnomalyBlocked);
            assert_eq!(ans.anomalies[0].action, "block");
        }
        let next = T + 3600;
        assert!(
            run(&store, &a, a.call_ops("b", "x", None, next), None, next)
                .1
                .is_none()
        );
    }

    /// MON-3: response bytes counted when a response ends; the calls after the window's bytes
    /// passed the maximum are the anomaly; a late tally for an ended window is dropped.
    #[test]
    fn bulk_pulls_by_response_bytes() {
        let a = counted(
            serde_json::json!({"bulk_pulls": [
                {"id": "bytes", "window_seconds": 60, "max_response_bytes": 1000, "apis": ["x"], "action": "block"}]}),
            None,
        );
        let store = MemoryStore::default();
        assert!(a.bytes_ops("a", "y", 5000, T).is_empty(), "another API");
        assert!(run(&store, &a, a.call_ops("a", "x", None, T), None, T)
            .1
            .is_none());
        run(&store, &a, a.bytes_ops("a", "x", 600, T), None, T);
        assert!(
            run(&store, &a, a.call_ops("a", "x", None, T + 1), None, T + 1)
                .1
                .is_none()
        );
        run(&store, &a, a.bytes_ops("a", "x", 600, T + 1), None, T + 1);
        let refused = run(&store, &a, a.call_ops("a", "x", None, T + 2), None, T + 2)
            .1
            .unwrap();
        assert!(
            refused.detail.contains("1200 response bytes"),
            "{}",
            refused.detail
        );
        // the next window; a tally from the last one does not count in it
        let next = T + 60;
        assert!(
            run(&store, &a, a.call_ops("a", "x", None, next), None, next)
                .1
                .is_none()
        );
        run(&store, &a, a.bytes_ops("a", "x", 5000, T + 59), None, next);
        assert!(run(
            &store,
            &a,
            a.call_ops("a", "x", None, next + 1),
            None,
            next + 1
        )
        .1
        .is_none());
        assert!(
            run(
                &store,
                &a,
                a.call_ops("b", "x", None, next + 1),
                None,
                next + 1
            )
            .1
            .is_none(),
            "per app"
        );
    }

    /// MON-3: a source never seen for the app is an anomaly once (alert), refused (block)
    /// unless approved; learned silently before `learn_until`; the oldest forgotten past the
    /// bound; forgotten after `forget_days`.
    #[test]
    fn new_sources_learn_alert_block_and_forget() {
        let a = counted(
            serde_json::json!({"new_sources": [
                {"id": "seen", "apps": ["a"], "max_sources": 2, "forget_days": 1, "action": "alert"},
                {"id": "gate", "apps": ["b"], "approved": ["10.9.0.0/16"], "learn_until": "2027-01-15T08:00:00Z", "action": "block"}]}),
            None,
        );
        let store = MemoryStore::default();
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        let go = |app: &str, src: &str, now: u64| {
            run(&store, &a, a.call_ops(app, "x", ip(src), now), None, now)
        };
        assert_eq!(go("a", "192.0.2.1", T).0.anomalies[0].kind, NEW_SOURCE);
        assert!(
            go("a", "192.0.2.1", T + 1).0.anomalies.is_empty(),
            "seen now"
        );
        assert_eq!(go("a", "192.0.2.2", T + 2).0.anomalies.len(), 1);
        assert_eq!(
            go("a", "192.0.2.3", T + 3).0.anomalies.len(),
            1,
            "evicts .1, the oldest"
        );
        assert!(go("a", "192.0.2.3", T + 4).0.anomalies.is_empty());
        assert_eq!(
            go("a", "192.0.2.1", T + 5).0.anomalies.len(),
            1,
            ".1 was forgotten for room"
        );
        assert_eq!(
            go("a", "192.0.2.3", T + 4 + 86_400).0.anomalies.len(),
            1,
            "forgotten after a day"
        );
        // IPv6: one /64 is one source
        assert_eq!(go("a", "2001:db8:1:2::1", T + 10).0.anomalies.len(), 1);
        assert!(go("a", "2001:db8:1:2::99", T + 11).0.anomalies.is_empty());
        // block: learning until 2027-01-15T08:00:00Z (1_800_000_000 + 0), then refusing
        let learn = 1_800_000_000 - 100;
        assert!(
            go("b", "192.0.2.7", learn).1.is_none()
                && go("b", "192.0.2.7", learn).0.anomalies.is_empty()
        );
        let after = 1_800_000_000 + 10;
        assert!(go("b", "192.0.2.7", after).1.is_none(), "learned");
        let (ans, refused) = go("b", "192.0.2.8", after);
        assert_eq!(refused.unwrap().reason, DenyReason::AnomalyBlocked);
        assert_eq!(ans.anomalies[0].action, "block");
        assert!(
            go("b", "192.0.2.8", after + 1).1.is_some(),
            "a refused source is not learned"
        );
        assert!(
            a.call_ops("b", "x", ip("10.9.3.4"), after).is_empty(),
            "approved"
        );
    }

    /// MON-4: failures under one key from many sources, each under the ban threshold of its
    /// own, reach the rule's threshold; from then on a blocking rule bans each failing source;
    /// the key and other sources stay usable.
    #[test]
    fn signature_failures_ban_the_source_not_the_key() {
        let bans = crate::bans::RawBans {
            threshold: 100,
            window_seconds: 60,
            ban_seconds: 600,
            ip_slots: 4,
            entries_per_slot: 8,
            ipv6_prefix: 64,
            lifted: vec![],
        }
        .compile()
        .unwrap();
        let a = counted(
            serde_json::json!({"signature_failures": [
                {"id": "imp", "apps": ["a"], "threshold": 3, "window_seconds": 300, "ban_seconds": 900, "action": "block"},
                {"id": "watch", "apps": ["b"], "threshold": 2, "window_seconds": 300, "action": "alert"}]}),
            Some(&bans),
        );
        let store = MemoryStore::default();
        let ip = |n: u8| Some(IpAddr::from([192, 0, 2, n]));
        let fail = |app: &str, n: u8, now: u64| {
            run(
                &store,
                &a,
                a.failure_ops(app, "k1", ip(n), now),
                Some(&bans),
                now,
            )
            .0
        };
        assert!(fail("a", 1, T).anomalies.is_empty());
        assert!(fail("a", 2, T + 1).anomalies.is_empty());
        // Issue 21 item 2: strangers' failures under the partner's public key id, then one
        // genuine failure of the partner: an anomaly for the key, but no source banned, least
        // of all the partner's.
        let third = fail("a", 3, T + 2);
        assert_eq!(third.anomalies[0].kind, SIGNATURE_FAILURES);
        assert!(third.ban_started.is_none(), "{:?}", third.ban_started);
        let sub = |n: u8| crate::bans::Subject::Ip(IpAddr::from([192, 0, 2, n]));
        assert!(bans.check(&store, sub(3), T + 3).is_ok());
        // a source whose own failures reach the threshold is banned, and only it
        assert!(fail("a", 9, T + 3).ban_started.is_none());
        assert!(fail("a", 9, T + 4).ban_started.is_none());
        assert_eq!(
            fail("a", 9, T + 5).ban_started.as_deref(),
            Some("source 192.0.2.9 banned for 900 s (rule imp)")
        );
        assert!(bans.check(&store, sub(9), T + 6).is_err());
        for n in [1, 2, 3] {
            assert!(bans.check(&store, sub(n), T + 6).is_ok(), "source {n}");
        }
        assert!(
            bans.check(&store, sub(9), T + 5 + 900).is_ok(),
            "the ban ends"
        );
        // alert: recorded, nobody banned
        fail("b", 5, T);
        let second = fail("b", 5, T + 1);
        assert_eq!(second.anomalies[0].action, "alert");
        assert!(second.ban_started.is_none());
        assert!(bans.check(&store, sub(5), T + 2).is_ok());
        // block without bans is refused at load
        let no_bans =
            serde_json::from_value::<RawAnomalies>(serde_json::json!({"signature_failures": [
            {"id": "imp", "threshold": 3, "window_seconds": 300, "action": "block"}]}))
            .unwrap()
            .compile(|_| true, |_| true, None);
        assert!(no_bans.unwrap_err().to_string().contains("bans section"));
    }

    #[test]
    fn counted_rules_refuse_bad_settings() {
        for bad in [
            serde_json::json!({"bulk_pulls": [{"id": "x", "window_seconds": 60, "action": "alert"}]}),
            serde_json::json!({"bulk_pulls": [{"id": "x", "window_seconds": 0, "max_calls": 1, "action": "alert"}]}),
            serde_json::json!({"bulk_pulls": [{"id": "x", "window_seconds": 60, "max_calls": 0, "action": "alert"}]}),
            serde_json::json!({"bulk_pulls": [{"id": "a/b", "window_seconds": 60, "max_calls": 1, "action": "alert"}]}),
            serde_json::json!({"new_sources": [{"id": "x", "max_sources": 0, "action": "alert"}]}),
            serde_json::json!({"new_sources": [{"id": "x", "learn_until": "tomorrow", "action": "alert"}]}),
            serde_json::json!({"new_sources": [{"id": "x", "approved": ["10.0.0.1/8"], "action": "alert"}]}),
            serde_json::json!({"signature_failures": [{"id": "x", "threshold": 0, "window_seconds": 60, "action": "alert"}]}),
            serde_json::json!({"signature_failures": [{"id": "x", "threshold": 2, "window_seconds": 60, "ban_seconds": 60, "action": "alert"}]}),
        ] {
            let raw: RawAnomalies = serde_json::from_value(bad.clone()).unwrap();
            assert!(raw.compile(|_| true, |_| true, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn pending_byte_counts_merge_and_drop_ended_windows() {
        let a = counted(
            serde_json::json!({"bulk_pulls": [
                {"id": "bytes", "window_seconds": 60, "max_response_bytes": 1000, "action": "alert"}]}),
            None,
        );
        let mut pending = Vec::new();
        assert_eq!(pend(&mut pending, a.bytes_ops("a", "x", 10, T), T), 0);
        pend(&mut pending, a.bytes_ops("a", "x", 5, T + 1), T + 1);
        pend(&mut pending, a.bytes_ops("b", "x", 7, T + 1), T + 1);
        assert_eq!(pending.len(), 2);
        assert!(matches!(&pending[0], Op::Bytes { bytes: 15, .. }));
        pend(&mut pending, a.bytes_ops("a", "x", 1, T + 60), T + 60);
        assert_eq!(pending.len(), 1, "the ended window is dropped");
        assert!(matches!(&pending[0], Op::Bytes { bytes: 1, .. }));
    }
}
