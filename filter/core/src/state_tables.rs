//! Behaviour tables of the state backends: one per stored concern (`state/tables/<concern>.json`), each a
//! policy and a list of steps (the operations of one batch, when they run, and what the batch
//! must answer). The same table runs against the local backend (`cargo test`, below) and
//! against a real Redis through webdis with the cluster script (`tests/test_state_tables.py`
//! drives `examples/state_tables.rs`): a change that makes the two backends disagree on a row
//! fails one of them. Not on the request path.
//!
//! Time: a step's `at` is seconds after the table starts. The cluster backend's expiries are
//! Redis TTLs in real time, so the cluster runner waits until `at` has really passed; tables
//! keep their windows to a few seconds.

use std::collections::HashMap;

use serde::Deserialize;

use crate::policy::Policy;
use crate::sessions::{Scope, Session};
use crate::state::anomalies::{RuleAction, Watch};
use crate::state::rate_limits::{Counter, Span, Window};
use crate::state::{Answer, BanSubject, Batch, Op, SessionCall};

/// The tables, by concern.
pub const TABLES: [(&str, &str); 6] = [
    ("grants", include_str!("state/tables/grants.json")),
    ("nonces", include_str!("state/tables/nonces.json")),
    ("bans", include_str!("state/tables/bans.json")),
    ("sessions", include_str!("state/tables/sessions.json")),
    ("anomalies", include_str!("state/tables/anomalies.json")),
    ("rate_limits", include_str!("state/tables/rate_limits.json")),
];

/// Where a table's rate-limit windows are placed in time: a fixed instant (a whole day, so
/// every window begins at the table's start), plus the step's `at` and `ms`. The counters read
/// no other clock, so both backends see the same windows wherever the table runs.
const RATE_EPOCH_MS: u64 = 20_000 * 86_400_000;

#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Table {
    /// What the table shows.
    pub about: String,
    /// Merged over a minimal policy (an app `a` with an HMAC credential, one S1 API).
    #[serde(default)]
    pub policy: serde_json::Value,
    pub steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Seconds after the table starts.
    pub at: u64,
    pub ops: Vec<TableOp>,
    pub expect: Expect,
    /// Why the row answers as it does.
    #[serde(default)]
    pub why: String,
}

/// An operation as a table writes it.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum TableOp {
    Ban {
        app: Option<String>,
        ip: Option<String>,
    },
    Refusal {
        app: Option<String>,
        ip: Option<String>,
    },
    Nonce {
        app: String,
        nonce: String,
        created: u64,
        record: bool,
    },
    GrantUse {
        grant: String,
        max: u64,
    },
    SessionCreate {
        id: String,
        app: String,
        ip: String,
    },
    SessionUse {
        id: String,
        app: String,
        ip: String,
    },
    SessionEnd {
        id: String,
        app: String,
        ip: String,
    },
    SessionRevokeApp {
        app: String,
    },
    Calls {
        rule: String,
        app: String,
        window: u64,
        max_calls: u64,
        block: bool,
    },
    /// One rate-limit counter (rule and key), with the windows named, `ms` after the step's
    /// second; several in one op are one call counted toward each.
    Rate {
        counters: Vec<TableCounter>,
        #[serde(default)]
        ms: u64,
    },
}

#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TableCounter {
    pub rule: String,
    pub key: String,
    #[serde(default = "yes")]
    pub refuse: bool,
    #[serde(default)]
    pub per_second: Option<u64>,
    #[serde(default)]
    pub per_minute: Option<u64>,
    #[serde(default)]
    pub quota_day: Option<u64>,
}

fn yes() -> bool {
    true
}

/// What a batch answers, as far as both backends must agree.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The refusal code (`banned`, `replayed`, ...); absent: accepted.
    #[serde(default)]
    pub refused: Option<String>,
    #[serde(default)]
    pub ban_started: bool,
    #[serde(default)]
    pub evicted: bool,
    /// Anomaly rules matched.
    #[serde(default)]
    pub anomalies: Vec<String>,
    /// Rate-limit rules gone over, as `rule:action`.
    #[serde(default)]
    pub rate_limits: Vec<String>,
    /// The refusal's `Retry-After` seconds.
    #[serde(default)]
    pub retry_after: Option<u32>,
}

const MAC: &str = "aa:bb:cc:dd:ee:01";

/// The table's policy: a minimal one with the table's sections over it.
pub fn policy(table: &Table) -> Result<Policy, String> {
    policy_with(table, &serde_json::Value::Null)
}

/// The table's policy with more sections over it (the cluster runner's `state`).
pub fn policy_with(table: &Table, extra: &serde_json::Value) -> Result<Policy, String> {
    let mut doc = serde_json::json!({
        "version": 1,
        "apis": [{"id": "t", "method": "GET", "path": "/t", "level": "S1", "service_object": "toB",
                  "access": "read", "user_auth": false, "personal_info": false, "function": "t"}],
        "apps": [
            {"id": "a", "credentials": [{"id": "a-hmac", "alg": "hmac-sha256", "secret_env": "T"}]},
            {"id": "b", "credentials": [{"id": "b-hmac", "alg": "hmac-sha256", "secret_env": "T"}]}],
        "grants": [{"id": "g", "app": "a", "apis": ["t"]}]
    });
    for more in [&table.policy, extra] {
        if let (Some(base), Some(more)) = (doc.as_object_mut(), more.as_object()) {
            for (k, v) in more {
                base.insert(k.clone(), v.clone());
            }
        }
    }
    let secrets = HashMap::from([(
        "T".to_string(),
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".to_string(),
    )]);
    Policy::from_json(&doc.to_string(), &secrets).map_err(|e| e.to_string())
}

fn subject(app: &Option<String>, ip: &Option<String>) -> Result<BanSubject, String> {
    match (app, ip) {
        (Some(a), None) => Ok(BanSubject::App(a.clone())),
        (None, Some(ip)) => ip
            .parse()
            .map(BanSubject::Ip)
            .map_err(|_| format!("not an address: {ip}")),
        _ => Err("a subject is one of app or ip".into()),
    }
}

/// A step's batch, at `start + at`.
pub fn batch(step: &Step, start: u64) -> Result<Batch, String> {
    let now = start + step.at;
    let call = |id: &str, app: &str, ip: &str| SessionCall {
        id: id.into(),
        app: app.into(),
        ip: ip.into(),
        mac: MAC.into(),
    };
    let mut ops = Vec::new();
    for op in &step.ops {
        ops.push(match op {
            TableOp::Ban { app, ip } => Op::Ban(subject(app, ip)?),
            TableOp::Refusal { app, ip } => Op::Refusal(subject(app, ip)?),
            TableOp::Nonce {
                app,
                nonce,
                created,
                record,
            } => Op::Nonce {
                app: app.clone(),
                nonce: nonce.clone(),
                created: start + created,
                idempotency: false,
                record: *record,
            },
            TableOp::GrantUse { grant, max } => Op::GrantUse {
                grant: grant.clone(),
                max: *max,
            },
            TableOp::SessionCreate { id, app, ip } => Op::SessionCreate {
                id: id.clone(),
                session: Session {
                    tag: String::new(),
                    app: app.clone(),
                    ip: ip.clone(),
                    mac: MAC.into(),
                    user: None,
                    factors: 0,
                    created: now,
                    last_seen: now,
                    seq: 0,
                },
            },
            TableOp::SessionUse { id, app, ip } => Op::SessionUse(call(id, app, ip)),
            TableOp::SessionEnd { id, app, ip } => Op::SessionEnd(call(id, app, ip)),
            TableOp::SessionRevokeApp { app } => Op::SessionRevoke(Scope::App(app.clone())),
            TableOp::Calls {
                rule,
                app,
                window,
                max_calls,
                block,
            } => Op::Calls {
                watch: Watch {
                    rule: rule.clone(),
                    app: app.clone(),
                    kind: "bulk_pull",
                    action: if *block {
                        RuleAction::Block
                    } else {
                        RuleAction::Alert
                    },
                },
                bucket: now / window.max(&1),
                window: *window,
                max_calls: *max_calls,
                max_bytes: u64::MAX / 2,
            },
            TableOp::Rate { counters, ms } => {
                let now_ms = RATE_EPOCH_MS + step.at * 1000 + ms;
                Op::RateLimit(counters.iter().map(|c| rate_counter(c, now_ms)).collect())
            }
        });
    }
    Ok(Batch { ops, now })
}

fn rate_counter(c: &TableCounter, now_ms: u64) -> Counter {
    let mut windows = Vec::new();
    for (span, limit) in [(Span::Second, c.per_second), (Span::Minute, c.per_minute)] {
        if let Some(l) = limit {
            windows.push(Window::sliding(span, l, now_ms));
        }
    }
    if let Some(limit) = c.quota_day {
        windows.push(Window {
            span: Span::QuotaDay,
            limit,
            bucket: now_ms / 86_400_000,
            at: 86_400_000 - now_ms % 86_400_000,
        });
    }
    Counter {
        rule: c.rule.clone(),
        key: c.key.clone(),
        refuse: c.refuse,
        ban: false,
        windows,
    }
}

/// What an answer says, in a table's terms.
pub fn outcome(answer: &Answer) -> Expect {
    Expect {
        refused: answer.refused.as_ref().map(|d| d.reason.code().to_string()),
        ban_started: answer.ban_started.is_some(),
        evicted: answer.evicted,
        anomalies: answer.anomalies.iter().map(|a| a.rule.clone()).collect(),
        rate_limits: answer
            .rate_limits
            .iter()
            .map(|h| format!("{}:{}", h.rule, h.action))
            .collect(),
        retry_after: answer.refused.as_ref().and_then(|d| d.retry_after),
    }
}

/// Whether a step's answer is the one the table expects; the difference when not.
pub fn check(name: &str, n: usize, step: &Step, answer: &Answer) -> Result<(), String> {
    let got = outcome(answer);
    if got == step.expect {
        Ok(())
    } else {
        Err(format!(
            "table {name}, step {n} (at {} s: {}): expected {:?}, got {:?} (refusal detail: {:?})",
            step.at,
            step.why,
            step.expect,
            got,
            answer.refused.as_ref().map(|d| d.detail.clone())
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    /// Every table on the local backend (Envoy's shared data, here in memory).
    #[test]
    fn local_backend_answers_every_table() {
        for (name, text) in TABLES {
            let table: Table = serde_json::from_str(text).unwrap();
            let mut policy = policy(&table).unwrap();
            let mem = MemoryStore::default();
            let start = 1_800_000_000;
            let meta = crate::local::open(&mem, [9; 16], start - 1, &mut policy).unwrap();
            for (n, step) in table.steps.iter().enumerate() {
                let b = batch(step, start).unwrap();
                let answer = crate::local::run_local(&policy, &mem, &meta, &b);
                check(name, n, step, &answer).unwrap();
            }
        }
    }
}
