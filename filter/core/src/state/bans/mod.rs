//! Refusal counters and bans (PERM-4, RL-3, MON-6), one stored concern on both backends:
//! - `local.rs`: the settings, the rule and its store on Envoy's shared data (`local` backend);
//! - this file: the words of `B` (a ban check) and `R` (one refusal counted) on the cluster
//!   store, what a `banned` reply means, and how a subject is named there;
//! - `bans.lua`: the cluster script's part (joined by `state/script.rs`);
//! - `state/tables/bans.json`: the behaviour both backends must show (`state_tables.rs`).

pub mod local;

pub use local::{started, BanSettings, RawBans, RawLift, Subject};

use super::script::{self, Words};
use super::{Answer, BanSubject, Op, Params};
use crate::error::{Deny, DenyReason};

/// A subject's name in the store: `app/<id>`, or `ip/<source>` (an IPv6 source by its prefix).
pub fn subject_name(p: &Params<'_>, s: &BanSubject) -> String {
    match (s, p.bans) {
        (BanSubject::App(a), _) => format!("app/{a}"),
        (BanSubject::Ip(ip), Some(b)) => format!("ip/{}", b.source(*ip)),
        (BanSubject::Ip(ip), None) => format!("ip/{ip}"),
    }
}

/// A subject as the audit record names it (`app a`, `source 192.0.2.1`), from its store name.
pub fn describe(subject: &str) -> String {
    match subject.split_once('/') {
        Some(("ip", s)) => format!("source {s}"),
        Some((kind, s)) => format!("{kind} {s}"),
        None => subject.to_string(),
    }
}

/// Writes a ban check's or a refusal's words; false for another concern's operation.
pub fn encode(body: &mut Vec<u8>, p: &Params<'_>, op: &Op) -> bool {
    match op {
        Op::Ban(s) => {
            let lift = p.bans.map_or(0, |b| b.lifted_at(s.as_subject()));
            Words::op(body, &script::BAN)
                .put("subject", &subject_name(p, s))
                .put("lift", &lift.to_string())
                .end();
        }
        Op::Refusal(s) => {
            let (window, threshold, ban) = p.bans.map_or((1, u32::MAX, 1), |b| {
                (b.window_seconds, b.threshold, b.ban_seconds)
            });
            Words::op(body, &script::REFUSAL)
                .put("subject", &subject_name(p, s))
                .put("window", &window.to_string())
                .put("threshold", &threshold.to_string())
                .put("ban", &ban.to_string())
                .end();
        }
        _ => return false,
    }
    true
}

/// `banned <subject> <until>`: a ban in force refused the batch.
pub fn refusal<'r>(first: &str, text: &impl Fn(usize) -> Option<&'r str>) -> Option<Answer> {
    (first == "banned").then(|| {
        Answer::refused(Deny::new(
            DenyReason::Banned,
            format!(
                "{} banned until {}",
                describe(text(1).unwrap_or("?")),
                text(2).unwrap_or("?")
            ),
        ))
    })
}
