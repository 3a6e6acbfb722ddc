//! State operations (DESIGN.md "State: local or cluster"): everything a request reads or
//! writes that outlives it, as a typed batch the request's state machine yields and resumes on.
//! A batch runs in order and stops at the first operation that refuses, so what runs after a
//! refusal is never written (a banned caller's nonce is not spent, a replayed request uses no
//! grant). Two backends run batches with the same meaning:
//! - `local` ([`run_local`]): Envoy's shared data, synchronously, on this gateway only;
//! - `cluster` ([`crate::cluster`]): one atomic script on a store every replica shares, reached
//!   by an HTTP callout the request pauses for.

use std::net::IpAddr;

use crate::access;
use crate::bans::Subject;
use crate::cluster::{self, Call, ClusterSettings, Decoded};
use crate::error::{Deny, DenyReason};
use crate::policy::Policy;
use crate::replay;
use crate::store::{SharedStore, StoreMeta};

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
}

impl Answer {
    pub fn refused(d: Deny) -> Answer {
        Answer {
            refused: Some(d),
            ban_started: None,
            note: None,
        }
    }
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

/// Runs a batch on the local store (Envoy shared data), synchronously.
pub fn run_local(
    policy: &Policy,
    store: &dyn SharedStore,
    meta: &StoreMeta,
    batch: &Batch,
) -> Answer {
    let now = batch.now;
    let mut answer = Answer::default();
    for op in &batch.ops {
        let result = match op {
            Op::Ban(s) => match &policy.bans {
                Some(bans) => bans.check(store, s.as_subject(), now),
                None => Ok(()),
            },
            Op::Nonce {
                app,
                nonce,
                created,
                idempotency,
                record,
            } => replay::check(
                store,
                meta,
                &policy.replay,
                policy.clock_skew_seconds,
                app,
                nonce,
                *created,
                now,
                *record,
            )
            .map_err(|d| replay_refusal(d, *idempotency)),
            Op::GrantUse { grant, max } => access::consume_grant_use(store, grant, *max),
            Op::Refusal(s) => {
                if let Some(bans) = &policy.bans {
                    match bans.record_refusal(store, s.as_subject(), now) {
                        Ok(true) => {
                            answer.ban_started = Some(format!(
                                "{} banned for {} s",
                                bans.describe(s.as_subject()),
                                bans.ban_seconds
                            ))
                        }
                        Ok(false) => {}
                        Err(e) => answer.note = Some(format!("ban counter unavailable: {e}")),
                    }
                }
                Ok(())
            }
        };
        if let Err(d) = result {
            answer.refused = Some(d);
            break;
        }
    }
    answer
}

fn params(policy: &Policy) -> cluster::Params<'_> {
    cluster::Params {
        skew: policy.clock_skew_seconds,
        lifetime: policy.replay.lifetime_seconds,
        bans: policy.bans.as_ref(),
    }
}

/// The callout that runs a batch on the cluster store (`full`: with the script's text).
pub fn cluster_call(
    policy: &Policy,
    settings: &ClusterSettings,
    batch: &Batch,
    full: bool,
) -> Call {
    cluster::encode(&params(policy), settings, batch, full)
}

/// What the cluster store's answer to a batch means (`status`: the callout's `:status`;
/// `full`: the batch went with the script's text, so a store that still lacks it is broken).
pub fn cluster_answer(
    policy: &Policy,
    batch: &Batch,
    full: bool,
    status: Option<&str>,
    body: &[u8],
) -> Decoded {
    match cluster::decode(&params(policy), batch, status, body) {
        Decoded::LoadScript if full => {
            Decoded::Answer(cluster::failed("the store lacks the script it was sent"))
        }
        d => d,
    }
}
