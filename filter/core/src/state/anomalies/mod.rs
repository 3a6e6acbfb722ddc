//! The anomaly rules' counters (MON-5, MON-8, ATK-4), one stored concern on both backends
//! (the policy's rules and their compilation are `crate::anomaly`):
//! - this file: which rule an operation serves, what it does when it matches, what a match
//!   leaves in the audit record, and its words on the cluster store;
//! - `local.rs`: the counters on Envoy's shared data (`local` backend);
//! - `anomalies.lua`: the cluster script's part (joined by `state/script.rs`);
//! - `state/tables/anomalies.json`: the behaviour both backends must show (`state_tables.rs`).

pub mod local;

pub use local::run_local;

use serde::{Deserialize, Serialize};

use super::bans::subject_name;
use super::script::{self, flag, Words};
use super::{Answer, Batch, Op, Params};
use crate::error::{Deny, DenyReason};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
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

/// A rule that matched a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Anomaly {
    pub rule: String,
    pub kind: &'static str,
    pub action: &'static str,
}

/// The counted anomaly rule an operation serves (anomaly.rs), and for which app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub rule: String,
    pub app: String,
    pub kind: &'static str,
    pub action: RuleAction,
}

impl Watch {
    pub fn blocks(&self) -> bool {
        self.action == RuleAction::Block
    }

    /// The rule matched: for the audit record and the metric.
    pub fn anomaly(&self) -> Anomaly {
        Anomaly {
            rule: self.rule.clone(),
            kind: self.kind,
            action: self.action.as_str(),
        }
    }

    /// The refusal of a blocking rule that matched.
    pub fn refusal(&self, detail: &str) -> Deny {
        Deny::new(
            DenyReason::AnomalyBlocked,
            format!("{} rule {} matched: {detail}", self.kind, self.rule),
        )
    }
}

/// Writes a counted anomaly rule's words (`V`, `VB`, `NS`, `KF`); false for another concern's
/// operation.
pub fn encode(body: &mut Vec<u8>, p: &Params<'_>, op: &Op) -> bool {
    match op {
        Op::Calls {
            watch,
            bucket,
            window,
            max_calls,
            max_bytes,
        } => Words::op(body, &script::CALLS)
            .put("rule", &watch.rule)
            .put("app", &watch.app)
            .put("bucket", &bucket.to_string())
            .put("window", &window.to_string())
            .put("max_calls", &max_calls.to_string())
            .put("max_bytes", &max_bytes.to_string())
            .put("block", flag(watch.blocks()))
            .end(),
        Op::Bytes {
            watch,
            bucket,
            window,
            bytes,
        } => Words::op(body, &script::BYTES)
            .put("rule", &watch.rule)
            .put("app", &watch.app)
            .put("bucket", &bucket.to_string())
            .put("window", &window.to_string())
            .put("bytes", &bytes.to_string())
            .end(),
        Op::Source {
            watch,
            source,
            learning,
            max,
            forget,
        } => Words::op(body, &script::SOURCE)
            .put("rule", &watch.rule)
            .put("app", &watch.app)
            .put("source", source)
            .put("learning", flag(*learning))
            .put("max", &max.to_string())
            .put("forget", &forget.to_string())
            .put("block", flag(watch.blocks()))
            .end(),
        Op::KeyFailure {
            watch,
            keyid,
            bucket,
            window,
            threshold,
            ban,
        } => {
            let (subject, seconds, lift) = match ban {
                Some((s, secs)) => (
                    subject_name(p, s),
                    *secs,
                    p.bans.map_or(0, |b| b.lifted_at(s.as_subject())),
                ),
                None => (String::new(), 0, 0),
            };
            Words::op(body, &script::KEY_FAILURE)
                .put("rule", &watch.rule)
                .put("app", &watch.app)
                .put("keyid", keyid)
                .put("bucket", &bucket.to_string())
                .put("window", &window.to_string())
                .put("threshold", &threshold.to_string())
                .put("ban_subject", &subject)
                .put("ban_seconds", &seconds.to_string())
                .put("lift", &lift.to_string())
                .end();
        }
        _ => return false,
    }
    true
}

/// `blocked <rule> [calls bytes]`: a blocking rule refused the batch.
pub fn refusal<'r>(
    batch: &Batch,
    first: &str,
    text: &impl Fn(usize) -> Option<&'r str>,
) -> Option<Answer> {
    if first != "blocked" {
        return None;
    }
    let watch = batch.watch(text(1)?)?;
    let detail = match batch.ops.iter().find(|o| o.watch() == Some(watch)) {
        Some(Op::Source { source, .. }) => {
            format!("{} never called from {source} before", watch.app)
        }
        _ => format!(
            "{} made {} calls and received {} response bytes in this window (cluster store)",
            watch.app,
            text(2).unwrap_or("?"),
            text(3).unwrap_or("?")
        ),
    };
    let mut answer = Answer::refused(watch.refusal(&detail));
    answer.anomalies.push(watch.anomaly());
    Some(answer)
}
