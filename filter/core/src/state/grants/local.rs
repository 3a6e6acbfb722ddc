//! Grant uses on the `local` backend (PERM-5): one counter per limited grant in Envoy's shared
//! data, counted by compare-and-swap across every worker of this gateway.

use crate::error::{Deny, DenyReason};
use crate::store::{u64_at, update, SharedStore, StoreError};

fn uses_key(grant: &str) -> String {
    format!("apisec/grant-uses/{grant}")
}

/// Counts one use of a limited grant, atomically across workers (PERM-5): the counter is
/// created only if absent and updated only by compare-and-swap, so no interleaving of workers
/// can count a use twice or lose one.
pub fn consume_grant_use(store: &dyn SharedStore, grant: &str, max: u64) -> Result<(), Deny> {
    let key = uses_key(grant);
    let host =
        |e: StoreError| Deny::new(DenyReason::HostUnavailable, format!("grant counter: {e}"));
    let used = update(store, &key, |v| {
        let used = u64_at(v, 0);
        let write = (used < max).then(|| (used + 1).to_le_bytes().to_vec());
        (write, used)
    })
    .map_err(host)?;
    if used >= max {
        return Err(Deny::new(
            DenyReason::GrantExhausted,
            format!("grant {grant} used {used} of {max} times"),
        ));
    }
    Ok(())
}

/// How many times a grant has been used (for operators and tests).
pub fn grant_uses(store: &dyn SharedStore, grant_id: &str) -> u64 {
    match store.get(&uses_key(grant_id)) {
        Ok(Some((v, _))) => u64_at(&v, 0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{InterleavingStore, MemoryStore};

    #[test]
    fn grant_use_counter_is_exact_and_bounded() {
        let store = MemoryStore::default();
        for _ in 0..3 {
            consume_grant_use(&store, "g", 3).unwrap();
        }
        assert_eq!(
            consume_grant_use(&store, "g", 3).unwrap_err().reason,
            DenyReason::GrantExhausted
        );
        assert_eq!(grant_uses(&store, "g"), 3);
    }

    /// Issue 8, hole 12 (PERM-5): a `once` grant used by two workers at the same moment. Worker
    /// B reads "no counter yet"; worker A creates the counter and spends the use; then B goes on.
    /// An unchecked create by B wiped A's use and let B spend it again.
    #[test]
    fn once_grant_race_between_two_workers_spends_one_use() {
        let mem = MemoryStore::default();
        let worker_b = InterleavingStore {
            inner: &mem,
            at: 1,
            between: |m: &MemoryStore| consume_grant_use(m, "once", 1).unwrap(),
            reads: std::cell::Cell::new(0),
        };
        assert_eq!(
            consume_grant_use(&worker_b, "once", 1).unwrap_err().reason,
            DenyReason::GrantExhausted
        );
        assert_eq!(grant_uses(&mem, "once"), 1);
    }
}
