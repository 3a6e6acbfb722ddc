//! The anomaly rules' stored concern (anomaly.rs holds the rules): which rule an operation
//! serves and what it does when it matches, and what a match leaves in the audit record. Its
//! cluster script is `anomalies.lua` beside this file.

use serde::{Deserialize, Serialize};

use crate::error::{Deny, DenyReason};

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
