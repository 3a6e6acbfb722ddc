//! Grant uses (PERM-5), one stored concern on both backends (grants themselves are
//! `crate::access`):
//! - `local.rs`: the use counter on Envoy's shared data (`local` backend);
//! - this file: the words of `G` on the cluster store and what an `exhausted` reply means;
//! - `grants.lua`: the cluster script's part (joined by `state/script.rs`);
//! - `state/tables/grants.json`: the behaviour both backends must show (`state_tables.rs`).

pub mod local;

pub use local::{consume_grant_use, grant_uses};

use super::script::{self, Words};
use super::{Answer, Batch, Op};
use crate::error::{Deny, DenyReason};

/// Writes a grant use's words; false for another concern's operation.
pub fn encode(body: &mut Vec<u8>, op: &Op) -> bool {
    let Op::GrantUse { grant, max } = op else {
        return false;
    };
    Words::op(body, &script::GRANT_USE)
        .put("grant", grant)
        .put("max", &max.to_string())
        .end();
    true
}

/// `exhausted <used>`: the grant's uses are spent.
pub fn refusal<'r>(
    batch: &Batch,
    first: &str,
    text: &impl Fn(usize) -> Option<&'r str>,
) -> Option<Answer> {
    if first != "exhausted" {
        return None;
    }
    let detail = batch
        .ops
        .iter()
        .find_map(|op| match op {
            Op::GrantUse { grant, max } => Some(format!(
                "grant {grant} used {} of {max} times",
                text(1).unwrap_or("?")
            )),
            _ => None,
        })
        .unwrap_or_else(|| "grant exhausted".into());
    Some(Answer::refused(Deny::new(
        DenyReason::GrantExhausted,
        detail,
    )))
}
