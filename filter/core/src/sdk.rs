//! SDK versions (issue 13): a caller names the version of the signing SDK it runs in
//! `x-sdk-version`; an app's `sdk` setting names the minimum version and known-bad versions.
//! A call below the minimum, on a known-bad version, without the header or with one that is
//! not a version is refused `sdk_outdated` or flagged (the response carries `x-apisec-sdk`),
//! as the app's `action` says, and counted (`apisec_sdk_outdated_total`).

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Deny, DenyReason};

pub const SDK_HEADER: &str = "x-sdk-version";
/// The response header of a flagged call: `<status>; minimum=<version>`.
pub const FLAG_HEADER: &str = "x-apisec-sdk";
const MAX_VERSION_LEN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum SdkAction {
    /// Refused `sdk_outdated` (the default: an SDK with a known hole must not sign orders).
    #[default]
    Refuse,
    /// Let through with `x-apisec-sdk` on the response, recorded and counted.
    Flag,
}

impl SdkAction {
    pub fn as_str(self) -> &'static str {
        match self {
            SdkAction::Refuse => "refuse",
            SdkAction::Flag => "flag",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawSdk {
    /// The lowest version accepted, dotted numbers (`2.1.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<String>,
    /// Versions refused or flagged whatever the minimum (a release with a known flaw).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub known_bad: Vec<String>,
    #[serde(default)]
    pub action: SdkAction,
}

/// A version: up to four dotted numbers, an optional `-pre-release` (lower than the release).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    numbers: [u64; 4],
    /// false for a pre-release, so that `2.1.0-rc1` < `2.1.0`.
    release: bool,
}

impl Version {
    pub fn parse(text: &str) -> Option<Version> {
        let (core, pre) = match text.split_once('-') {
            Some((c, p)) if !p.is_empty() => (c, true),
            Some(_) => return None,
            None => (text, false),
        };
        let mut numbers = [0u64; 4];
        for (n, part) in core.split('.').enumerate() {
            if part.is_empty() || part.len() > 9 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            *numbers.get_mut(n)? = part.parse().ok()?;
        }
        Some(Version {
            numbers,
            release: !pre,
        })
    }
}

#[derive(Debug, Clone)]
pub struct SdkRule {
    pub minimum: Option<(String, Version)>,
    pub known_bad: Vec<Version>,
    pub action: SdkAction,
}

impl RawSdk {
    pub fn compile(&self, field: &str) -> Result<SdkRule, ConfigError> {
        let parse = |f: String, v: &str| {
            Version::parse(v).ok_or_else(|| {
                ConfigError::new(f, format!("{v:?} is not a version (dotted numbers)"))
            })
        };
        Ok(SdkRule {
            minimum: match &self.minimum {
                Some(m) => Some((m.clone(), parse(format!("{field}.minimum"), m)?)),
                None => None,
            },
            known_bad: self
                .known_bad
                .iter()
                .enumerate()
                .map(|(i, v)| parse(format!("{field}.known_bad[{i}]"), v))
                .collect::<Result<_, _>>()?,
            action: self.action,
        })
    }
}

/// Why a call's SDK is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outdated {
    Missing,
    Malformed,
    BelowMinimum,
    KnownBad,
}

impl Outdated {
    pub fn as_str(self) -> &'static str {
        match self {
            Outdated::Missing => "missing",
            Outdated::Malformed => "malformed",
            Outdated::BelowMinimum => "below_minimum",
            Outdated::KnownBad => "known_bad",
        }
    }
}

/// A flagged call's finding, for the response header, the audit record and the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdkFlag {
    pub status: Outdated,
    pub action: SdkAction,
    /// The version the caller sent (printable, bounded), if any.
    pub version: Option<String>,
    pub minimum: Option<String>,
}

impl SdkFlag {
    /// The value of `x-apisec-sdk` on a flagged call's response.
    pub fn header(&self) -> String {
        match &self.minimum {
            Some(m) => format!("{}; minimum={m}", self.status.as_str()),
            None => self.status.as_str().to_string(),
        }
    }
}

/// Checks the version a call sends against its app's rule: what to record (None when the
/// version is acceptable), and the refusal when the rule refuses.
pub fn check(rule: &SdkRule, sent: Option<&str>) -> (Option<SdkFlag>, Option<Deny>) {
    let shown =
        sent.filter(|v| v.len() <= MAX_VERSION_LEN && v.bytes().all(|b| b.is_ascii_graphic()));
    let status = match sent.map(Version::parse) {
        None => Some(Outdated::Missing),
        Some(None) => Some(Outdated::Malformed),
        Some(Some(v)) if rule.known_bad.contains(&v) => Some(Outdated::KnownBad),
        Some(Some(v)) if rule.minimum.as_ref().is_some_and(|(_, m)| &v < m) => {
            Some(Outdated::BelowMinimum)
        }
        Some(Some(_)) => None,
    };
    let Some(status) = status else {
        return (None, None);
    };
    let flag = SdkFlag {
        status,
        action: rule.action,
        version: shown.map(str::to_string),
        minimum: rule.minimum.as_ref().map(|(m, _)| m.clone()),
    };
    let deny = (rule.action == SdkAction::Refuse).then(|| {
        Deny::new(
            DenyReason::SdkOutdated,
            format!(
                "SDK version {:?} is {} (minimum {})",
                flag.version.as_deref().unwrap_or("-"),
                status.as_str(),
                flag.minimum.as_deref().unwrap_or("-")
            ),
        )
    });
    (Some(flag), deny)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: SdkAction) -> SdkRule {
        RawSdk {
            minimum: Some("2.1.0".into()),
            known_bad: vec!["2.3.1".into()],
            action,
        }
        .compile("apps[0].sdk")
        .unwrap()
    }

    #[test]
    fn versions_compare_by_number_and_pre_releases_come_first() {
        let v = |s| Version::parse(s).unwrap();
        assert!(v("2.10") > v("2.9.9"));
        assert_eq!(v("2.1"), v("2.1.0"));
        assert!(v("2.1.0-rc1") < v("2.1.0"));
        for bad in ["", "2..1", "v2.1", "2.1.0.0.0", "2.1-", "1234567890"] {
            assert!(Version::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn outdated_missing_and_known_bad_are_refused_or_flagged() {
        let refuse = rule(SdkAction::Refuse);
        assert_eq!(check(&refuse, Some("2.1.0")), (None, None));
        assert_eq!(check(&refuse, Some("3.0")), (None, None));
        for (sent, status) in [
            (Some("2.0.9"), Outdated::BelowMinimum),
            (Some("2.1.0-rc1"), Outdated::BelowMinimum),
            (Some("2.3.1"), Outdated::KnownBad),
            (None, Outdated::Missing),
            (Some("latest"), Outdated::Malformed),
        ] {
            let (flag, deny) = check(&refuse, sent);
            let d = deny.unwrap();
            assert_eq!(d.reason, DenyReason::SdkOutdated);
            assert!(d.detail.contains(status.as_str()), "{}", d.detail);
            assert_eq!(flag.unwrap().status, status);
            let (f, deny) = check(&rule(SdkAction::Flag), sent);
            assert!(deny.is_none());
            assert_eq!(f.unwrap().status, status);
        }
        let (f, _) = check(&rule(SdkAction::Flag), Some("2.0.0"));
        assert_eq!(f.unwrap().header(), "below_minimum; minimum=2.1.0");
        let bad = RawSdk {
            minimum: Some("x".into()),
            known_bad: vec![],
            action: SdkAction::Flag,
        };
        assert!(bad.compile("f").is_err());
    }
}
