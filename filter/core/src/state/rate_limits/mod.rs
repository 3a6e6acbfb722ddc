//! Rate-limit counters (RL-1, RL-2, OPS-4), one stored concern on both backends (the policy's
//! rules, and which counters a call counts toward, are `crate::rate_limits`):
//! - this file: a counter and its windows, the arithmetic both backends share (what a window
//!   holds now, whether it is over, how long until it admits again), and its words on the
//!   cluster store;
//! - `local.rs`: the counters on Envoy's shared data (`local` backend);
//! - `rate_limits.lua`: the cluster script's part (joined by `state/script.rs`);
//! - `state/tables/rate_limits.json`: the behaviour both backends must show (`state_tables.rs`).
//!
//! **Algorithm.** A per-second, -minute, -hour or -day limit is a sliding-window counter: the
//! calls of the current fixed window plus the previous window's calls weighted by how much of
//! it the sliding window still covers (`cur + prev * (W - elapsed) / W`, in milliseconds,
//! rounded up, so that a call's place is not freed before its weight has gone). It never admits
//! more than the limit within one fixed window, and when the previous window's calls were spread
//! evenly it admits at most the limit in any window's length (at most one call fewer, from the
//! rounding); its worst case, every call of the previous window in its last instant, admits up
//! to twice the limit within one window's length across the edge (a plain fixed window allows
//! that within an instant). A quota is a
//! fixed calendar period (a day or a month in the rule's time zone), counted exactly.
//!
//! **Atomicity.** A call counts toward every counter that applies to it, or toward none: the
//! windows are all checked first, and only a call that every refusing counter admits is
//! counted (an alerting counter over its limit lets the call on and says so). A refused call
//! counts nothing.

pub mod local;

use serde::Serialize;

use super::script::{self, flag, Words};
use super::{Answer, Batch, Op};
use crate::error::{Deny, DenyReason};

/// The windows a rule may count over, each at a fixed position of a counter's stored state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Second,
    Minute,
    Hour,
    Day,
    /// A calendar day in the rule's time zone (a quota).
    QuotaDay,
    /// A calendar month in the rule's time zone (a quota).
    QuotaMonth,
}

impl Span {
    pub const ALL: [Span; 6] = [
        Span::Second,
        Span::Minute,
        Span::Hour,
        Span::Day,
        Span::QuotaDay,
        Span::QuotaMonth,
    ];

    /// Its position in a counter's stored state.
    pub fn pos(self) -> usize {
        self as usize
    }

    /// Its name in the policy, the audit record and the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Span::Second => "second",
            Span::Minute => "minute",
            Span::Hour => "hour",
            Span::Day => "day",
            Span::QuotaDay => "quota_day",
            Span::QuotaMonth => "quota_month",
        }
    }

    /// The length of a sliding window in milliseconds; None for a calendar quota.
    pub fn sliding_ms(self) -> Option<u64> {
        match self {
            Span::Second => Some(1_000),
            Span::Minute => Some(60_000),
            Span::Hour => Some(3_600_000),
            Span::Day => Some(86_400_000),
            Span::QuotaDay | Span::QuotaMonth => None,
        }
    }
}

/// One window of a counter at the time of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub span: Span,
    pub limit: u64,
    /// Sliding: the fixed window the call falls in (`now_ms / W`). Quota: the period's index
    /// (days or months since the epoch, in the rule's zone).
    pub bucket: u64,
    /// Sliding: milliseconds since the fixed window began. Quota: milliseconds until the
    /// period ends.
    pub at: u64,
}

impl Window {
    /// The sliding window at `now_ms`.
    pub fn sliding(span: Span, limit: u64, now_ms: u64) -> Window {
        let ms = span.sliding_ms().unwrap_or(1).max(1);
        Window {
            span,
            limit,
            bucket: now_ms / ms,
            at: now_ms % ms,
        }
    }

    /// How many calls the window holds now, from the counts of the current fixed window (or
    /// period) and the one before it.
    pub fn holds(&self, cur: u64, prev: u64) -> u64 {
        match self.span.sliding_ms() {
            Some(ms) => {
                let weight = ms.saturating_sub(self.at);
                let carried = (u128::from(prev) * u128::from(weight)).div_ceil(u128::from(ms));
                cur.saturating_add(u64::try_from(carried).unwrap_or(u64::MAX))
            }
            None => cur,
        }
    }

    /// Whether one more call would take the window past its limit.
    pub fn over(&self, cur: u64, prev: u64) -> bool {
        self.holds(cur, prev) >= self.limit
    }

    /// Whole seconds until the window admits a call again (at least 1).
    pub fn retry_after(&self, cur: u64, prev: u64) -> u32 {
        let wait_ms = match self.span.sliding_ms() {
            None => self.at,
            Some(ms) => {
                let limit = self.limit.max(1);
                // the first offset x into a fixed window where `held` calls of the window
                // before leave room for one more besides `cur`: ceil(held * (W - x) / W) <=
                // limit - cur - 1, that is x >= W - floor((limit - cur - 1) * W / held)
                let first_x = |held: u64, cur: u64| {
                    let room = u128::from(limit.saturating_sub(cur).saturating_sub(1))
                        * u128::from(ms)
                        / u128::from(held.max(1));
                    u64::try_from(u128::from(ms).saturating_sub(room)).unwrap_or(ms)
                };
                if cur >= limit {
                    // the next fixed window, then until these calls' weight leaves room
                    ms.saturating_sub(self.at).saturating_add(first_x(cur, 0))
                } else {
                    first_x(prev, cur).saturating_sub(self.at)
                }
            }
        };
        u32::try_from(wait_ms.div_ceil(1000).max(1)).unwrap_or(u32::MAX)
    }

    /// How long the store keeps a count of this window (seconds): the window and the next.
    pub fn ttl_seconds(&self) -> u64 {
        match self.span {
            Span::QuotaDay => 2 * 86_400,
            Span::QuotaMonth => 62 * 86_400,
            s => 2 * s.sliding_ms().unwrap_or(1000) / 1000 + 1,
        }
    }
}

/// The counter of one rule for one key (the rule's dimensions of a call: its app, API, user,
/// source ...), with the windows that apply now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    pub rule: String,
    /// The store's name for the counter: a hash of the rule id and the key's values, so a
    /// caller's bytes never become key syntax.
    pub key: String,
    /// Over a limit, the call is refused (else it goes on, and the hit is reported).
    pub refuse: bool,
    /// A refusal counts toward a ban of the caller (RL-4).
    pub ban: bool,
    pub windows: Vec<Window>,
}

impl Counter {
    /// What a counter over its limit in `window` leaves in the record.
    pub fn hit(&self, window: &Window) -> RateHit {
        RateHit {
            rule: self.rule.clone(),
            window: window.span.name(),
            action: if self.refuse { "refuse" } else { "alert" },
            ban: self.ban,
        }
    }

    /// The refusal of a call over this counter's `window`.
    pub fn refusal(&self, window: &Window, cur: u64, prev: u64) -> Deny {
        let mut d = Deny::new(
            DenyReason::RateLimited,
            format!(
                "rate limit {}: {} per {} (holds {})",
                self.rule,
                window.limit,
                window.span.name(),
                window.holds(cur, prev)
            ),
        );
        d.retry_after = Some(window.retry_after(cur, prev));
        d
    }
}

/// A rate-limit rule a call went over: in the audit record (`rate_limits`) and the metric
/// `apisec_rate_limited_total` (per rule and action).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RateHit {
    pub rule: String,
    pub window: &'static str,
    pub action: &'static str,
    #[serde(skip)]
    pub ban: bool,
}

/// Adds an alerting counter's hit once per rule.
pub fn note_alert(answer: &mut Answer, hit: RateHit) {
    if !answer.rate_limits.iter().any(|h| h.rule == hit.rule) {
        answer.rate_limits.push(hit);
    }
}

/// Writes the counters' words: one `RC` per window (checked, not counted), then one `RI` that
/// counts them all; false for another concern's operation.
pub fn encode(body: &mut Vec<u8>, op: &Op) -> bool {
    let Op::RateLimit(counters) = op else {
        return false;
    };
    for c in counters {
        for w in &c.windows {
            Words::op(body, &script::RATE_CHECK)
                .put("key", &c.key)
                .put("rule", &c.rule)
                .put("pos", &w.span.pos().to_string())
                .put("ms", &w.span.sliding_ms().unwrap_or(0).to_string())
                .put("bucket", &w.bucket.to_string())
                .put("before", &w.bucket.saturating_sub(1).to_string())
                .put("at", &w.at.to_string())
                .put("limit", &w.limit.to_string())
                .put("ttl", &w.ttl_seconds().to_string())
                .put("refuse", flag(c.refuse))
                .end();
        }
    }
    Words::op(body, &script::RATE_COUNT).end();
    true
}

/// The counter and window of the batch a reply names by rule and window position.
fn named<'b>(batch: &'b Batch, rule: &str, pos: usize) -> Option<(&'b Counter, &'b Window)> {
    batch.ops.iter().find_map(|op| match op {
        Op::RateLimit(cs) => cs.iter().find(|c| c.rule == rule).and_then(|c| {
            c.windows
                .iter()
                .find(|w| w.span.pos() == pos)
                .map(|w| (c, w))
        }),
        _ => None,
    })
}

/// `rate_limited <rule> <pos> <cur> <prev>`: a refusing counter is over in that window.
pub fn refusal<'r>(
    batch: &Batch,
    first: &str,
    text: &impl Fn(usize) -> Option<&'r str>,
) -> Option<Answer> {
    if first != "rate_limited" {
        return None;
    }
    let (rule, pos) = (text(1)?, text(2)?.parse::<usize>().ok()?);
    let (cur, prev) = (text(3)?.parse().ok()?, text(4)?.parse().ok()?);
    let (c, w) = named(batch, rule, pos)?;
    let mut answer = Answer::refused(c.refusal(w, cur, prev));
    answer.rate_limits.push(c.hit(w));
    Some(answer)
}

/// `rate_alert <rule> <pos>` in an accepted batch's findings.
pub fn alert(batch: &Batch, answer: &mut Answer, rule: &str, pos: &str) -> Option<()> {
    let (c, w) = named(batch, rule, pos.parse().ok()?)?;
    note_alert(answer, c.hit(w));
    Some(())
}

#[cfg(test)]
mod tests;
