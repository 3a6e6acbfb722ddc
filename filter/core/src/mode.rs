//! Whether a rule's refusals are enforced or only reported (report-only mode, report.rs): a
//! setting of the whole policy, of an API and of an Envoy route.

use serde::{Deserialize, Serialize};

/// Whether refusals are enforced or only reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Report,
}

impl Mode {
    pub fn is_report(self) -> bool {
        self == Mode::Report
    }
    pub fn is_enforce(&self) -> bool {
        *self == Mode::Enforce
    }
}
