//! State operations (docs/design.md "State: local or cluster"): everything a request reads or
//! writes that outlives it, as a typed batch the request's state machine yields and resumes on.
//! A batch runs in order and stops at the first operation that refuses, so what runs after a
//! refusal is never written (a banned caller's nonce is not spent, a replayed request uses no
//! grant). Two backends run batches with the same meaning:
//! - `local` ([`crate::local::run_local`]): Envoy's shared data, synchronously, on this
//!   gateway only;
//! - `cluster` ([`crate::cluster`]): one atomic script on a store every replica shares, reached
//!   by an HTTP callout the request pauses for.

pub mod anomalies;
pub mod bans;
pub mod grants;
pub mod nonces;
pub mod rate_limits;
pub mod script;
pub mod sessions;

pub use anomalies::{Anomaly, Watch};

use std::net::IpAddr;

use crate::error::{Deny, DenyReason};
use crate::sessions::{Scope, Session, Sessions};
use crate::state::bans::BanSettings;
use crate::state::bans::Subject;

/// Who a ban or a refusal counter is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BanSubject {
    App(String),
    Ip(IpAddr),
}

impl BanSubject {
    pub fn as_subject(&self) -> Subject<'_> {
        match self {
            BanSubject::App(a) => Subject::App(a),
            BanSubject::Ip(ip) => Subject::Ip(*ip),
        }
    }
}

/// One state operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Refused `banned` while the subject is banned (a ban that began before an operator's
    /// lift does not count).
    Ban(BanSubject),
    /// The (app, nonce) pair (ATK-1): refused if seen; recorded when `record` (else only read,
    /// to refuse a spent nonce before its body is held).
    Nonce {
        app: String,
        nonce: String,
        created: u64,
        /// The nonce is a certificate-only write's Idempotency-Key.
        idempotency: bool,
        record: bool,
    },
    /// One use of a grant limited to `max` uses (PERM-5).
    GrantUse { grant: String, max: u64 },
    /// One refusal counted toward an automatic ban (PERM-4, RL-3, MON-6).
    Refusal(BanSubject),
    /// A call presenting a session: refused unless live and bound to this app, IP and MAC;
    /// refreshed (SES-1, SES-2).
    SessionUse(SessionCall),
    /// The session a call presents, checked but not refreshed: for the user it carries,
    /// before the call is authorized (ID-4).
    SessionRead(SessionCall),
    /// The login service reported who logged in on this session, with how many factors (ID-4).
    SessionLogin {
        call: SessionCall,
        user: String,
        factors: u8,
    },
    /// A new session (SES-1).
    SessionCreate { id: String, session: Session },
    /// The holder ends its session (SES-3): checked like a use, then removed.
    SessionEnd(SessionCall),
    /// An operator ends one session, every session of an app, or of a user (SES-4, OPS-6).
    SessionRevoke(Scope),
    /// A call of an app counted toward a bulk-pull rule (MON-3) in the window `bucket` (of
    /// `window` seconds): over `max_calls` calls, or `max_bytes` response bytes already
    /// counted, it is an anomaly (refused when the rule blocks, and then not counted).
    Calls {
        watch: Watch,
        bucket: u64,
        window: u64,
        max_calls: u64,
        max_bytes: u64,
    },
    /// The response bytes of a call that ended, added to its window (never refuses).
    Bytes {
        watch: Watch,
        bucket: u64,
        window: u64,
        bytes: u64,
    },
    /// The source of an authenticated call of an app (MON-3): one never seen for the app (or
    /// forgotten after `forget` seconds) is an anomaly, unless the rule is still `learning`;
    /// remembered unless refused; at most `max` sources per app.
    Source {
        watch: Watch,
        source: String,
        learning: bool,
        max: u32,
        forget: u64,
    },
    /// A signature that did not verify under a valid key id of an app (MON-4), counted per key
    /// in the window `bucket`: from the `threshold`th on, an anomaly; a blocking rule bans the
    /// failing source (`ban`: who, for how long), never the key (never refuses).
    KeyFailure {
        watch: Watch,
        keyid: String,
        bucket: u64,
        window: u64,
        threshold: u32,
        ban: Option<(BanSubject, u64)>,
    },
    /// A call counted toward the rate-limit counters that apply to it (RL-1, RL-2, OPS-4):
    /// refused if one that refuses is over a window, else counted toward all of them.
    RateLimit(Vec<rate_limits::Counter>),
}

impl Op {
    /// The counted anomaly rule this operation serves, if any.
    pub fn watch(&self) -> Option<&Watch> {
        match self {
            Op::Calls { watch, .. }
            | Op::Bytes { watch, .. }
            | Op::Source { watch, .. }
            | Op::KeyFailure { watch, .. } => Some(watch),
            _ => None,
        }
    }
}

/// What a call presents of its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCall {
    pub id: String,
    pub app: String,
    pub ip: String,
    pub mac: String,
}

/// What a request asks of the state backend at one point of its life.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    pub ops: Vec<Op>,
    /// Gateway time of the decision.
    pub now: u64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The operation of the batch that serves anomaly rule `rule`.
    pub fn watch(&self, rule: &str) -> Option<&Watch> {
        self.ops
            .iter()
            .filter_map(Op::watch)
            .find(|w| w.rule == rule)
    }
}

/// What a batch came to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Answer {
    /// The first operation that refused (or the backend could not answer: a refusal too).
    pub refused: Option<Deny>,
    /// A refusal counted by this batch started a ban (for the audit record and the log).
    pub ban_started: Option<String>,
    /// The refusal could not be counted (the request is refused all the same).
    pub note: Option<String>,
    /// The session a `SessionUse` found (after its refresh).
    pub session: Option<Box<Session>>,
    /// A `SessionCreate` evicted the session idle longest to make room.
    pub evicted: bool,
    /// A `SessionRevoke` of one session found none.
    pub nothing_to_end: bool,
    /// Counted anomaly rules the batch found matched (with a refusal: the one that blocked).
    pub anomalies: Vec<Anomaly>,
    /// Rate-limit rules the call went over (with a refusal: the one that refused).
    pub rate_limits: Vec<rate_limits::RateHit>,
}

impl Answer {
    pub fn refused(d: Deny) -> Answer {
        Answer {
            refused: Some(d),
            ..Answer::default()
        }
    }
}

/// A store key made of a prefix and a number (a slot), without a formatter: built on the
/// request path for every replay, ban and session lookup.
pub(crate) fn numbered_key(prefix: &str, n: u64) -> String {
    let mut key = String::with_capacity(prefix.len() + 20);
    key.push_str(prefix);
    crate::sf::push_u64(&mut key, n);
    key
}

/// A nonce refusal, named for what the caller sent: an Idempotency-Key seen before is a
/// duplicate write, not a replayed signature.
pub fn replay_refusal(d: Deny, idempotency: bool) -> Deny {
    if idempotency && d.reason == DenyReason::NonceReplayed {
        Deny::new(DenyReason::IdempotencyKeyReplayed, d.detail)
    } else {
        d
    }
}

/// What of the policy the store's operations need.
#[derive(Debug, Clone, Copy)]
pub struct Params<'a> {
    pub skew: u64,
    pub lifetime: u64,
    pub bans: Option<&'a BanSettings>,
    pub sessions: Option<&'a Sessions>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_numbered_key_reads_as_the_formatter_writes_it() {
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            101,
            1_000,
            65_535,
            1_796_647_950_123,
            u64::MAX,
        ] {
            assert_eq!(
                super::numbered_key("apisec/replay/", n),
                format!("apisec/replay/{n}")
            );
            let mut s = String::from("x");
            crate::sf::push_u64(&mut s, n);
            assert_eq!(s, format!("x{n}"));
        }
    }
}
