//! Black and white lists (BWL-1, BWL-2, OPS-5) and the users who closed API access (PERM-6):
//! entries by app, source range, end user, or several together, each list over a set of APIs,
//! and the one normal form end-user ids are compared in. Its schema, its compilation and its
//! checks live here.

use std::collections::HashSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Deny, DenyReason};
use crate::inventory::{resolve_apis, Api, ApiGroup, ApiSet};
use crate::ip::Cidr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ListMode {
    /// Whitelist: only callers matching an entry pass.
    Allow,
    /// Blacklist: callers matching an entry are refused.
    Deny,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawListEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// An address or CIDR, IPv4 or IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawList {
    pub id: String,
    pub mode: ListMode,
    /// APIs the list applies to: ids, patterns or `group:<id>`.
    pub apis: Vec<String>,
    pub entries: Vec<RawListEntry>,
}

#[derive(Debug, Clone)]
struct Entry {
    app: Option<String>,
    ip: Option<Cidr>,
    user: Option<String>,
}

impl Entry {
    /// Every dimension the entry names must match (app + IP together, BWL-1).
    fn matches(&self, app: &str, ip: Option<IpAddr>, user: Option<&str>) -> bool {
        self.app.as_deref().is_none_or(|a| a == app)
            && self.ip.is_none_or(|c| ip.is_some_and(|ip| c.contains(ip)))
            && self.user.as_deref().is_none_or(|u| user == Some(u))
    }
}

#[derive(Debug, Clone)]
pub struct List {
    pub id: String,
    mode: ListMode,
    apis: ApiSet,
    entries: Vec<Entry>,
}

pub fn compile_list(
    field: &str,
    l: &RawList,
    apis: &[Api],
    groups: &[ApiGroup],
) -> Result<List, ConfigError> {
    let set = resolve_apis(&format!("{field}.apis"), &l.apis, apis, groups)?;
    let mut entries = Vec::new();
    for (i, e) in l.entries.iter().enumerate() {
        let ef = format!("{field}.entries[{i}]");
        if e.app.is_none() && e.ip.is_none() && e.user.is_none() {
            return Err(ConfigError::new(
                ef,
                "an entry names an app, an ip, a user, or several of them",
            ));
        }
        let ip =
            e.ip.as_deref()
                .map(|s| Cidr::parse(s).map_err(|m| ConfigError::new(format!("{ef}.ip"), m)))
                .transpose()?;
        entries.push(Entry {
            app: e.app.clone(),
            ip,
            user: e.user.as_deref().map(normal_user),
        });
    }
    if l.mode == ListMode::Allow && entries.is_empty() {
        return Err(ConfigError::new(
            format!("{field}.entries"),
            "an empty whitelist would refuse every caller",
        ));
    }
    Ok(List {
        id: l.id.clone(),
        mode: l.mode,
        apis: set,
        entries,
    })
}

/// Black and white lists for one call (BWL-1, BWL-2): any matching blacklist entry refuses;
/// each whitelist covering the API must have a matching entry.
pub fn check_lists(
    lists: &[List],
    api_index: usize,
    app: &str,
    ip: Option<IpAddr>,
    user: Option<&str>,
) -> Result<(), Deny> {
    for l in lists.iter().filter(|l| l.apis.contains(api_index)) {
        let hit = l.entries.iter().any(|e| e.matches(app, ip, user));
        match l.mode {
            ListMode::Deny if hit => {
                return Err(Deny::new(
                    DenyReason::Blacklisted,
                    format!("listed in blacklist {}", l.id),
                ));
            }
            ListMode::Allow if !hit => {
                return Err(Deny::new(
                    DenyReason::NotWhitelisted,
                    format!("not in whitelist {}", l.id),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The one normal form of an end-user id (BWL-1, PERM-6): user ids are compared without
/// regard to ASCII case, so `U-FROZEN-0001` is the listed `u-frozen-0001`. Request ids are
/// printable ASCII (checked before this); the policy's ids pass through here too.
pub fn normal_user(u: &str) -> String {
    u.trim().to_ascii_lowercase()
}

/// The opt-out set (PERM-6): users who closed API access for their account.
pub fn check_opt_out(opted_out: &HashSet<String>, user: Option<&str>) -> Result<(), Deny> {
    match user {
        Some(u) if opted_out.contains(u) => Err(Deny::new(
            DenyReason::UserOptedOut,
            format!("user {u} closed API access"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_modes_and_dimensions() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let deny = List {
            id: "bl".into(),
            mode: ListMode::Deny,
            apis: ApiSet(vec![true, false]),
            entries: vec![
                Entry {
                    app: Some("bad".into()),
                    ip: None,
                    user: None,
                },
                Entry {
                    app: Some("a".into()),
                    ip: Some(Cidr::parse("198.51.100.0/24").unwrap()),
                    user: None,
                },
                Entry {
                    app: None,
                    ip: Some(Cidr::parse("2001:db8::/32").unwrap()),
                    user: None,
                },
                Entry {
                    app: None,
                    ip: None,
                    user: Some("u9".into()),
                },
            ],
        };
        let lists = [deny];
        assert!(check_lists(&lists, 0, "a", ip("203.0.113.1"), None).is_ok());
        assert_eq!(
            check_lists(&lists, 0, "bad", ip("203.0.113.1"), None)
                .unwrap_err()
                .reason,
            DenyReason::Blacklisted
        );
        assert_eq!(
            check_lists(&lists, 0, "a", ip("198.51.100.7"), None)
                .unwrap_err()
                .reason,
            DenyReason::Blacklisted
        );
        assert!(
            check_lists(&lists, 0, "b", ip("198.51.100.7"), None).is_ok(),
            "app + ip: both must match"
        );
        assert_eq!(
            check_lists(&lists, 0, "b", ip("2001:db8::5"), None)
                .unwrap_err()
                .reason,
            DenyReason::Blacklisted
        );
        assert_eq!(
            check_lists(&lists, 0, "b", None, Some("u9"))
                .unwrap_err()
                .reason,
            DenyReason::Blacklisted
        );
        assert!(
            check_lists(&lists, 1, "bad", None, None).is_ok(),
            "list does not cover API 1"
        );
        let allow = [List {
            id: "wl".into(),
            mode: ListMode::Allow,
            apis: ApiSet(vec![true]),
            entries: vec![Entry {
                app: None,
                ip: Some(Cidr::parse("10.0.0.0/8").unwrap()),
                user: None,
            }],
        }];
        assert!(check_lists(&allow, 0, "a", ip("10.1.2.3"), None).is_ok());
        assert_eq!(
            check_lists(&allow, 0, "a", ip("11.1.2.3"), None)
                .unwrap_err()
                .reason,
            DenyReason::NotWhitelisted
        );
    }
}
