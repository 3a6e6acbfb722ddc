//! Stored sessions (SES-1..SES-5), one stored concern on both backends (the settings, the
//! session record and the endpoint's wire format are `crate::sessions`):
//! - `local.rs`: the session store on Envoy's shared data (`local` backend);
//! - this file: the words of `S`, `SL`, `SE`, `SC`, `SR` and `SA` on the cluster store, the
//!   store's key of a session there, and what `session`, `session_rate` and `session_full`
//!   replies mean;
//! - `sessions.lua`: the cluster script's part (joined by `state/script.rs`);
//! - `state/tables/sessions.json`: the behaviour both backends must show (`state_tables.rs`).

pub mod local;

pub use local::{admit_establish, create, end_all, read, remove, set_user, touch, Created};

#[cfg(test)]
mod tests;

use sha2::{Digest, Sha256};

use super::script::{self, flag, Layout, Words};
use super::{Answer, Op, Params, SessionCall};
use crate::crypto::hex;
use crate::error::{Deny, DenyReason};
use crate::sessions::{Misuse, Scope, Sessions};

/// The store's key of a session: a hash of its ID (a bearer secret, never sent to the store).
pub fn key(id: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"apisec-session\0")
        .chain_update(id.as_bytes())
        .finalize();
    hex(digest.get(..16).unwrap_or(&digest))
}

/// Writes a session operation's words; false for another concern's operation. The lifecycle
/// asks for sessions only under a policy that has them; should one come anyway, a code the
/// script refuses is written and the batch fails.
pub fn encode(body: &mut Vec<u8>, p: &Params<'_>, op: &Op) -> bool {
    let is_session = matches!(
        op,
        Op::SessionUse(_)
            | Op::SessionRead(_)
            | Op::SessionLogin { .. }
            | Op::SessionCreate { .. }
            | Op::SessionEnd(_)
            | Op::SessionRevoke(_)
    );
    if !is_session {
        return false;
    }
    match p.sessions {
        Some(s) => session_op(body, s, op),
        None => script::word(body, script::MISMATCH),
    }
    true
}

fn session_words<'b>(
    body: &'b mut Vec<u8>,
    layout: &'static Layout,
    s: &Sessions,
    c: &SessionCall,
) -> Words<'b> {
    Words::op(body, layout)
        .put("key", &key(&c.id))
        .put("app", &c.app)
        .put("ip", &c.ip)
        .put("mac", &c.mac)
        .put("ip_unbound", flag(s.ip_unbound_apps.contains(&c.app)))
        .put("idle", &s.idle_timeout_seconds.to_string())
        .put("lifetime", &s.max_lifetime_seconds.to_string())
}

/// A session operation's words.
fn session_op(body: &mut Vec<u8>, s: &Sessions, op: &Op) {
    match op {
        Op::SessionUse(c) | Op::SessionRead(c) => session_words(body, &script::SESSION_USE, s, c)
            .put("refresh", flag(matches!(op, Op::SessionUse(_))))
            .end(),
        Op::SessionLogin {
            call,
            user,
            factors,
        } => session_words(body, &script::SESSION_LOGIN, s, call)
            .put("user", user)
            .put("factors", &factors.to_string())
            .end(),
        Op::SessionEnd(c) => session_words(body, &script::SESSION_END, s, c).end(),
        Op::SessionCreate { id, session } => {
            let bound = u64::from(s.slots) * u64::from(s.entries_per_slot);
            Words::op(body, &script::SESSION_CREATE)
                .put("key", &key(id))
                .put("app", &session.app)
                .put("ip", &session.ip)
                .put("mac", &session.mac)
                .put("user", session.user.as_deref().unwrap_or(""))
                .put("factors", &session.factors.to_string())
                .put("idle", &s.idle_timeout_seconds.to_string())
                .put("bound", &bound.to_string())
                .put("max_per_app", &s.max_per_app.to_string())
                .put("per_minute", &s.establish_per_minute.to_string())
                .put(
                    "per_source_per_minute",
                    &s.establish_per_source_per_minute.to_string(),
                )
                .end();
        }
        Op::SessionRevoke(Scope::Session(id)) => Words::op(body, &script::SESSION_REVOKE)
            .put("key", &key(id))
            .end(),
        Op::SessionRevoke(Scope::App(name)) | Op::SessionRevoke(Scope::User(name)) => {
            let kind = if matches!(op, Op::SessionRevoke(Scope::App(_))) {
                "app"
            } else {
                "user"
            };
            Words::op(body, &script::SESSIONS_END_ALL)
                .put("kind", kind)
                .put("name", name)
                .put("lifetime", &s.max_lifetime_seconds.to_string())
                .end();
        }
        _ => {}
    }
}

/// `session <misuse> [idle]`, `session_rate <by> <count>`, `session_full`: the session
/// operation refused the batch.
pub fn refusal<'r>(first: &str, text: &impl Fn(usize) -> Option<&'r str>) -> Option<Answer> {
    let deny = match first {
        "session" => Misuse::from_word(text(1)?, text(2))?.deny(),
        "session_rate" => Deny::new(
            DenyReason::SessionRateLimited,
            format!(
                "{} establishes this minute by the {} (cluster store)",
                text(2).unwrap_or("?"),
                if text(1) == Some("source") {
                    "app from this source"
                } else {
                    "app"
                }
            ),
        ),
        "session_full" => Deny::new(
            DenyReason::SessionStoreFull,
            "the session store is at its bound with other apps' live sessions (cluster store)",
        ),
        _ => return None,
    };
    Some(Answer::refused(deny))
}
