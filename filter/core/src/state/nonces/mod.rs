//! Nonces (ATK-1), one stored concern on both backends:
//! - `local.rs`: the replay store's layout and its rule on Envoy's shared data (`local`);
//! - this file: the words of `N` on the cluster store, the key of an (app, nonce) pair there,
//!   and what `replayed`, `too_old` and `full` replies mean;
//! - `nonces.lua`: the cluster script's part (joined by `state/script.rs`);
//! - `state/tables/nonces.json`: the behaviour both backends must show (`state_tables.rs`).

pub mod local;

pub use local::{ReplayFill, ReplaySettings};

use sha2::{Digest, Sha256};

use super::script::{self, Words};
use super::{replay_refusal, Answer, Batch, Op};
use crate::crypto::hex;
use crate::error::{Deny, DenyReason};

/// The key of an (app, nonce) pair: a hash, so a caller's bytes never become key syntax.
pub fn key(app: &str, nonce: &str) -> String {
    let mut h = Sha256::new();
    for part in [app, nonce] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    hex(digest.get(..16).unwrap_or(&digest))
}

/// Writes a nonce's words (`share`: the nonces one app may record per lifetime); false for
/// another concern's operation.
pub fn encode(body: &mut Vec<u8>, share: u64, op: &Op) -> bool {
    let Op::Nonce {
        app,
        nonce,
        created,
        record,
        ..
    } = op
    else {
        return false;
    };
    Words::op(body, &script::NONCE)
        .put("key", &key(app, nonce))
        .put("app", app)
        .put("created", &created.to_string())
        .put("record", script::flag(*record))
        .put("share", &share.to_string())
        .end();
    true
}

/// The batch's nonce operation: its app, nonce and whether it is an Idempotency-Key.
fn nonce_of(batch: &Batch) -> (&str, &str, bool) {
    batch
        .ops
        .iter()
        .find_map(|op| match op {
            Op::Nonce {
                app,
                nonce,
                idempotency,
                ..
            } => Some((app.as_str(), nonce.as_str(), *idempotency)),
            _ => None,
        })
        .unwrap_or(("?", "?", false))
}

/// `replayed`, `too_old <horizon>`, `full <held>`: the nonce refused the batch.
pub fn refusal<'r>(
    batch: &Batch,
    first: &str,
    text: &impl Fn(usize) -> Option<&'r str>,
) -> Option<Answer> {
    let deny = match first {
        "replayed" => {
            let (_, nonce, idempotency) = nonce_of(batch);
            replay_refusal(
                Deny::new(
                    DenyReason::NonceReplayed,
                    format!("nonce {nonce:?} already used (cluster store)"),
                ),
                idempotency,
            )
        }
        "too_old" => Deny::new(
            DenyReason::CreatedTooOld,
            format!(
                "created is not after {}: the cluster store cannot vouch for requests created \
                 before its epoch",
                text(1).unwrap_or("?")
            ),
        ),
        "full" => {
            let (app, _, _) = nonce_of(batch);
            Deny::new(
                DenyReason::ReplayStoreFull,
                format!(
                    "{app} holds its share ({}) of the cluster replay store",
                    text(1).unwrap_or("?")
                ),
            )
        }
        _ => return None,
    };
    Some(Answer::refused(deny))
}
