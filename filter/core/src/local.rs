//! The `local` state backend: a request's batch of state operations ([`crate::state`]) run on
//! Envoy's shared data of this gateway, synchronously (one Envoy; every worker shares it).

use crate::error::{Deny, DenyReason};
use crate::policy::Policy;
use crate::sessions::{Presented, Scope};
use crate::state::nonces::local as replay;
use crate::state::sessions as stored;
use crate::state::{grants, rate_limits, replay_refusal, Answer, Batch, Op, SessionCall};
use crate::store::{self, SharedStore, StoreMeta};

/// Opens the local store for a policy, as every worker does when it loads one: the store's
/// record (salt, start time, replay layout: `store::open`) and every replay slot, created only
/// where absent; a replay layout the running store cannot take is refused. A store that is
/// new first gets the marks its concerns keep from the start: the live-ban mark
/// (`state::bans::local`), which must exist before the store's record does, so before any
/// worker can write a ban. The policy's ban fingerprints are then keyed with the store's salt
/// (`BanSettings::keyed`).
pub fn open(
    store: &dyn SharedStore,
    salt: [u8; 16],
    now: u64,
    policy: &mut Policy,
) -> Result<StoreMeta, String> {
    let opened = (|| {
        if store::is_new(store)? {
            crate::state::bans::local::mark_new_store(store)?;
        }
        store::open(store, salt, now, policy.replay.slots)
    })();
    let meta = opened.map_err(|e| format!("state store: {e}"))?;
    replay::check_layout(&meta, &policy.replay).map_err(|e| e.to_string())?;
    replay::init_slots(store, &policy.replay, &meta).map_err(|e| format!("replay store: {e}"))?;
    if let Some(bans) = policy.bans.as_mut() {
        bans.keyed(meta.salt);
    }
    Ok(meta)
}

/// What one lifecycle event has read of the live-ban mark (`state::bans::local`): whether a
/// ban may be in force. An event that runs several batches at once (the opening batch's
/// source, then the next batch's app) reads the mark once for all of them, as one batch with
/// both subjects would; it is read again after a batch that may have started a ban (a counted
/// refusal, a counted anomaly rule). A ban another worker writes meanwhile is one the request
/// could as well have met a moment later: it applies from the event after.
#[derive(Debug, Default)]
pub struct MarkRead(Option<bool>);

/// Runs a batch on the local store (Envoy shared data), synchronously.
pub fn run_local(
    policy: &Policy,
    store: &dyn SharedStore,
    meta: &StoreMeta,
    batch: &Batch,
) -> Answer {
    run_local_in(policy, store, meta, batch, &mut MarkRead::default())
}

/// [`run_local`] for one of the batches a lifecycle event runs, with what the event has read
/// of the live-ban mark so far.
pub fn run_local_in(
    policy: &Policy,
    store: &dyn SharedStore,
    meta: &StoreMeta,
    batch: &Batch,
    mark: &mut MarkRead,
) -> Answer {
    let now = batch.now;
    let mut answer = Answer::default();
    let live = &mut mark.0;
    for op in &batch.ops {
        let result = match op {
            Op::Ban(s) => match &policy.bans {
                // the live-ban mark, read once for the subjects; unreadable: look (the record
                // reads then answer for the store)
                Some(bans) => {
                    match *live.get_or_insert_with(|| bans.any_live(store, now).unwrap_or(true)) {
                        true => bans.check(store, s.as_subject(), now),
                        false => Ok(()),
                    }
                }
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
            Op::GrantUse { grant, max } => grants::consume_grant_use(store, grant, *max),
            Op::RateLimit(counters) => rate_limits::local::run(
                store,
                meta,
                &policy.rate_limits.store,
                counters,
                now.saturating_mul(1000),
                &mut answer,
            ),
            Op::Refusal(s) => {
                // may start a ban: a later subject's check reads the mark again
                *live = None;
                if let Some(bans) = &policy.bans {
                    match bans.record_refusal(store, s.as_subject(), now) {
                        Ok(true) => {
                            answer.ban_started = Some(crate::state::bans::started(
                                &bans.describe(s.as_subject()),
                                bans.ban_seconds,
                                None,
                            ))
                        }
                        Ok(false) => {}
                        Err(e) => answer.note = Some(format!("ban counter unavailable: {e}")),
                    }
                }
                Ok(())
            }
            Op::SessionUse(c) => session_check(policy, store, meta, c, now, true).map(|s| {
                answer.session = Some(Box::new(s));
            }),
            Op::SessionRead(c) => session_check(policy, store, meta, c, now, false).map(|s| {
                answer.session = Some(Box::new(s));
            }),
            Op::SessionLogin {
                call,
                user,
                factors,
            } => session_check(policy, store, meta, call, now, false).and_then(|_| {
                let cfg = policy.sessions.as_ref().ok_or_else(no_sessions)?;
                match stored::set_user(store, meta, cfg, &call.app, &call.id, user, *factors)? {
                    true => Ok(()),
                    false => Err(Deny::new(DenyReason::SessionInvalid, "the session is gone")),
                }
            }),
            Op::SessionCreate { id, session } => match &policy.sessions {
                Some(cfg) => stored::admit_establish(store, cfg, &session.app, &session.ip, now)
                    .and_then(|()| stored::create(store, meta, cfg, id, session.clone(), now))
                    .map(|c| answer.evicted = c.evicted),
                None => Err(no_sessions()),
            },
            Op::SessionEnd(c) => session_check(policy, store, meta, c, now, true).and_then(|s| {
                let cfg = policy.sessions.as_ref().ok_or_else(no_sessions)?;
                stored::remove(store, meta, cfg, &c.app, &c.id)?;
                // the session it ended, for the audit record's user
                answer.session = Some(Box::new(s));
                Ok(())
            }),
            Op::Calls { .. } | Op::Bytes { .. } | Op::Source { .. } | Op::KeyFailure { .. } => {
                // a counted rule may start a ban, as a refusal does
                *live = None;
                crate::state::anomalies::run_local(
                    store,
                    policy.bans.as_ref(),
                    op,
                    now,
                    &mut answer,
                )
            }
            Op::SessionRevoke(scope) => match (&policy.sessions, scope) {
                (None, _) => Err(no_sessions()),
                (Some(cfg), Scope::Session(id)) => {
                    // the operator names the ID only: its app's slots, for each registered app
                    let mut found = Ok(false);
                    for app in policy.app_ids() {
                        found = stored::remove(store, meta, cfg, app, id).map(|s| s.is_some());
                        if !matches!(found, Ok(false)) {
                            break;
                        }
                    }
                    found.map(|f| answer.nothing_to_end = !f)
                }
                (Some(_), Scope::App(a)) => stored::end_all(store, meta, "app", a),
                (Some(_), Scope::User(u)) => stored::end_all(store, meta, "user", u),
            },
        };
        if let Err(d) = result {
            answer.refused = Some(d);
            break;
        }
    }
    answer
}

fn no_sessions() -> Deny {
    Deny::new(DenyReason::SessionInvalid, "the policy has no sessions")
}

/// The session a call presents, checked; refreshed when `refresh` (a use), else only read.
fn session_check(
    policy: &Policy,
    store: &dyn SharedStore,
    meta: &StoreMeta,
    c: &SessionCall,
    now: u64,
    refresh: bool,
) -> Result<crate::sessions::Session, Deny> {
    let cfg = policy.sessions.as_ref().ok_or_else(no_sessions)?;
    let p = Presented {
        id: &c.id,
        app: &c.app,
        ip: &c.ip,
        mac: &c.mac,
    };
    if refresh {
        stored::touch(store, meta, cfg, &p, now)
    } else {
        stored::read(store, meta, cfg, &p, now)
    }
}
