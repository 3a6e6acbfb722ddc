//! The `local` state backend: a request's batch of state operations ([`crate::state`]) run on
//! Envoy's shared data of this gateway, synchronously (one Envoy; every worker shares it).

use crate::access;
use crate::policy::Policy;
use crate::replay;
use crate::state::{replay_refusal, Answer, Batch, Op};
use crate::store::{SharedStore, StoreMeta};

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
