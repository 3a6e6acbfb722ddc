//! Replay protection (ATK-1): each (app, nonce) pair is accepted once, across every worker
//! thread, policy reload and restart, in a store with a fixed number of keys (slots) and a
//! fixed number of live entries per slot.
//!
//! - Placement is a keyed hash under the store's secret salt: a caller cannot choose which
//!   slot its nonces land in, so it cannot aim at another app's slot.
//! - Share: one app holds at most `app_entries_per_slot` of a slot's `entries_per_slot`
//!   entries, so no app can take more than that share of the store.
//! - Horizon: each slot remembers the newest `created` time among the entries it has pruned,
//!   and a slot starts with the store's start time. A request created at or before its slot's
//!   horizon is refused, because the store can no longer vouch that its nonce is unseen. This
//!   is what keeps a reload that widens the skew window, and a restart that empties the store,
//!   from making an accepted request acceptable again. Under a constant policy the horizon
//!   never refuses anything the skew window would accept.
//! - A full slot refuses (fail closed) rather than forget a live nonce.

use crate::error::{ConfigError, Deny, DenyReason};
use crate::store::{create_if_absent, u64_at, SharedStore, StoreError, StoreMeta};

/// The replay store's layout and lifetimes, from the policy's `gateway.replay` and
/// `gateway.nonce_lifetime_seconds`.
#[derive(Debug, Clone)]
pub struct ReplaySettings {
    pub slots: u32,
    pub entries_per_slot: u32,
    pub app_entries_per_slot: u32,
    pub lifetime_seconds: u64,
}

const HEADER: usize = 8; // horizon (unix seconds, LE)
const ENTRY: usize = 32; // tag 8 | app 8 | created 8 | expiry 8
const MAX_CAS_RETRIES: usize = 16;

pub fn slot_key(slot: u32) -> String {
    format!("apisec/replay/{slot}")
}

/// Where a nonce goes and how it is recognised, under the store's salt.
struct Place {
    slot: u32,
    tag: [u8; 8],
    app: [u8; 8],
}

fn place(meta: &StoreMeta, slots: u32, app: &str, nonce: &str) -> Place {
    let h = meta.keyed(b"replay", &[app.as_bytes(), nonce.as_bytes()]);
    let a = meta.keyed(b"replay-app", &[app.as_bytes()]);
    let word = |b: &[u8; 32], at: usize| -> [u8; 8] {
        let mut w = [0u8; 8];
        if let Some(s) = b.get(at..at + 8) {
            w.copy_from_slice(s);
        }
        w
    };
    Place {
        slot: (u64::from_le_bytes(word(&h, 0)) % u64::from(slots.max(1))) as u32,
        tag: word(&h, 8),
        app: word(&a, 0),
    }
}

/// The horizon a fresh slot starts with: requests created before the store started are
/// refused (the store cannot know whether an earlier process accepted them); a request
/// created in the second the store started is not, since that earlier process had stopped.
fn start_horizon(meta: &StoreMeta) -> u64 {
    meta.started_at.saturating_sub(1)
}

/// A policy whose replay layout differs from the one the running store holds its live nonces
/// in is refused: moving to another slot count would forget them (issue 8, hole 2). The
/// layout can change with a restart, after which the store's start time protects it.
pub fn check_layout(meta: &StoreMeta, settings: &ReplaySettings) -> Result<(), ConfigError> {
    if meta.replay_slots != settings.slots {
        return Err(ConfigError::new(
            "gateway.replay.slots",
            format!(
                "the running gateway holds its live nonces in {} slots; changing it to {} \
                 would forget them, so it takes a restart",
                meta.replay_slots, settings.slots
            ),
        ));
    }
    Ok(())
}

/// Creates every slot that does not exist yet, with the store's start as its horizon. Called
/// at configure time; never overwrites a slot another worker or an earlier policy created.
pub fn init_slots(
    store: &dyn SharedStore,
    settings: &ReplaySettings,
    meta: &StoreMeta,
) -> Result<(), StoreError> {
    let fresh = start_horizon(meta).to_le_bytes();
    for slot in 0..settings.slots {
        create_if_absent(store, &slot_key(slot), &fresh)?;
    }
    Ok(())
}

/// Whether a nonce may be used: `Ok` if unseen. With `record`, it is recorded in the same
/// compare-and-swap step (live until the request can no longer be accepted, and at least
/// `lifetime_seconds`); without, the store is only read (a cheap early refusal of a spent
/// nonce while a body is still to come).
#[allow(clippy::too_many_arguments)]
pub fn check(
    store: &dyn SharedStore,
    meta: &StoreMeta,
    settings: &ReplaySettings,
    skew: u64,
    app: &str,
    nonce: &str,
    created: u64,
    now: u64,
    record: bool,
) -> Result<(), Deny> {
    let p = place(meta, settings.slots, app, nonce);
    let key = slot_key(p.slot);
    let expiry = created
        .saturating_add(skew)
        .max(now.saturating_add(settings.lifetime_seconds));
    let host = |e: StoreError| Deny::new(DenyReason::HostUnavailable, format!("replay store: {e}"));

    for _ in 0..MAX_CAS_RETRIES {
        let Some((value, cas)) = store.get(&key).map_err(host)? else {
            // configure creates every slot; one that is missing is created as a fresh slot
            // (horizon = the store's start), never overwriting one created meanwhile
            create_if_absent(store, &key, &start_horizon(meta).to_le_bytes()).map_err(host)?;
            continue;
        };
        let mut horizon = u64_at(&value, 0).max(start_horizon(meta));
        let mut live: Vec<u8> = Vec::with_capacity(value.len() + ENTRY);
        live.extend_from_slice(&[0u8; HEADER]);
        let mut app_live = 0u32;
        for entry in value.get(HEADER..).unwrap_or(&[]).chunks_exact(ENTRY) {
            let (e_created, e_expiry) = (u64_at(entry, 16), u64_at(entry, 24));
            if e_expiry <= now {
                horizon = horizon.max(e_created); // pruned by this write: forgotten from here on
                continue;
            }
            if entry.get(..8) == Some(&p.tag[..]) && entry.get(8..16) == Some(&p.app[..]) {
                return Err(Deny::new(
                    DenyReason::NonceReplayed,
                    format!("nonce {nonce:?} already used"),
                ));
            }
            if entry.get(8..16) == Some(&p.app[..]) {
                app_live += 1;
            }
            live.extend_from_slice(entry);
        }
        if created <= horizon {
            return Err(Deny::new(
                DenyReason::CreatedTooOld,
                format!(
                    "created {created} is not after {horizon}: the replay store cannot vouch \
                     for requests created before it started or before nonces it has forgotten"
                ),
            ));
        }
        if !record {
            return Ok(());
        }
        let live_count = (live.len() - HEADER) / ENTRY;
        if live_count >= settings.entries_per_slot as usize {
            return Err(Deny::new(
                DenyReason::ReplayStoreFull,
                format!(
                    "replay slot {} holds {} live nonces",
                    p.slot, settings.entries_per_slot
                ),
            ));
        }
        if app_live >= settings.app_entries_per_slot {
            return Err(Deny::new(
                DenyReason::ReplayStoreFull,
                format!(
                    "{app} holds its share ({}) of replay slot {}",
                    settings.app_entries_per_slot, p.slot
                ),
            ));
        }
        if let Some(h) = live.get_mut(..HEADER) {
            h.copy_from_slice(&horizon.to_le_bytes());
        }
        live.extend_from_slice(&p.tag);
        live.extend_from_slice(&p.app);
        live.extend_from_slice(&created.to_le_bytes());
        live.extend_from_slice(&expiry.to_le_bytes());
        if store.set(&key, &live, Some(cas)).map_err(host)? {
            return Ok(());
        }
    }
    Err(Deny::new(
        DenyReason::HostUnavailable,
        "replay store: too much contention",
    ))
}

/// Adds the fill of replay slots `slots` to `acc` (a gauge for MON-2): live nonces, and the
/// fullest slot in percent. A pass over the whole store is spread over several calls, so that
/// no call holds a worker long (metrics.rs).
pub fn fill(
    store: &dyn SharedStore,
    settings: &ReplaySettings,
    now: u64,
    slots: std::ops::Range<u32>,
    acc: &mut ReplayFill,
) -> Result<(), StoreError> {
    let per_slot = u64::from(settings.entries_per_slot.max(1));
    acc.capacity = u64::from(settings.slots).saturating_mul(per_slot);
    for slot in slots {
        let Some((value, _)) = store.get(&slot_key(slot))? else {
            continue;
        };
        let live = value
            .get(HEADER..)
            .unwrap_or(&[])
            .chunks_exact(ENTRY)
            .filter(|e| u64_at(e, 24) > now)
            .count() as u64;
        acc.live = acc.live.saturating_add(live);
        acc.fullest_pct = acc.fullest_pct.max(live.saturating_mul(100) / per_slot);
    }
    Ok(())
}

/// The fill of the replay store (ATK-1, MON-2): live nonces, capacity, and how full the
/// fullest slot is in percent (a full slot refuses `replay_store_full`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayFill {
    pub live: u64,
    pub capacity: u64,
    pub fullest_pct: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{self, MemoryStore};

    fn settings(slots: u32, entries: u32, app_entries: u32) -> ReplaySettings {
        ReplaySettings {
            slots,
            entries_per_slot: entries,
            app_entries_per_slot: app_entries,
            lifetime_seconds: 600,
        }
    }

    fn opened(s: &ReplaySettings, started: u64) -> (MemoryStore, StoreMeta) {
        let store = MemoryStore::default();
        let meta = store::open(&store, [7; 16], started, s.slots).unwrap();
        init_slots(&store, s, &meta).unwrap();
        (store, meta)
    }

    #[test]
    fn fill_counts_live_nonces_and_the_fullest_slot() {
        let s = settings(2, 4, 4);
        let (store, meta) = opened(&s, 100);
        for n in 0..5 {
            rec(&store, &meta, &s, "a", &format!("n{n}"), 200, 200).unwrap();
        }
        let mut f = ReplayFill::default();
        fill(&store, &s, 200, 0..1, &mut f).unwrap();
        fill(&store, &s, 200, 1..2, &mut f).unwrap();
        assert_eq!((f.live, f.capacity), (5, 8));
        assert!(
            f.fullest_pct >= 75,
            "five nonces in two slots of four: one holds three or more"
        );
        let mut later = ReplayFill::default();
        fill(&store, &s, 200 + 601, 0..2, &mut later).unwrap();
        assert_eq!(
            (later.live, later.fullest_pct),
            (0, 0),
            "expired entries are not live"
        );
    }

    fn rec(
        store: &MemoryStore,
        meta: &StoreMeta,
        s: &ReplaySettings,
        app: &str,
        n: &str,
        created: u64,
        now: u64,
    ) -> Result<(), DenyReason> {
        check(store, meta, s, 300, app, n, created, now, true).map_err(|d| d.reason)
    }

    #[test]
    fn nonce_accepted_once_per_app() {
        let s = settings(16, 8, 8);
        let (store, meta) = opened(&s, 900);
        rec(&store, &meta, &s, "app-a", "n1", 1000, 1000).unwrap();
        assert_eq!(
            rec(&store, &meta, &s, "app-a", "n1", 1000, 1001),
            Err(DenyReason::NonceReplayed)
        );
        // a read-only check sees it too, and records nothing
        assert_eq!(
            check(&store, &meta, &s, 300, "app-a", "n1", 1000, 1001, false)
                .unwrap_err()
                .reason,
            DenyReason::NonceReplayed
        );
        check(&store, &meta, &s, 300, "app-a", "n2", 1000, 1001, false).unwrap();
        rec(&store, &meta, &s, "app-a", "n2", 1000, 1002).unwrap();
        // the same nonce from another app is a different pair
        rec(&store, &meta, &s, "app-b", "n1", 1001, 1001).unwrap();
    }

    /// The bound: a flood of unique nonces never grows the store past slots * entries, and a
    /// full store refuses instead of forgetting.
    #[test]
    fn flood_of_unique_nonces_stays_bounded() {
        let s = settings(64, 16, 16);
        let (store, meta) = opened(&s, 4000);
        let (mut ok, mut full) = (0, 0);
        for i in 0..100_000u32 {
            match rec(&store, &meta, &s, "flood", &format!("n{i}"), 5000, 5000) {
                Ok(()) => ok += 1,
                Err(r) => {
                    assert_eq!(r, DenyReason::ReplayStoreFull);
                    full += 1
                }
            }
        }
        assert_eq!(ok, 64 * 16);
        assert_eq!(full, 100_000 - 64 * 16);
        assert_eq!(store.key_count(), 64);
        assert!(store.value_bytes() <= 64 * (HEADER + 16 * ENTRY));
        // once they expire, the space is reused and the bound still holds
        for i in 0..10_000u32 {
            let _ = rec(&store, &meta, &s, "flood", &format!("m{i}"), 5601, 5601);
        }
        assert_eq!(store.key_count(), 64);
        assert!(store.value_bytes() <= 64 * (HEADER + 16 * ENTRY));
        rec(&store, &meta, &s, "other", "fresh", 6900, 6900).unwrap();
    }

    /// Issue 8, hole 4: one app can no longer fill another app's slot, nor more than its
    /// share of the store. Its nonces land where the salt puts them, not where it chooses.
    #[test]
    fn one_app_cannot_take_more_than_its_share() {
        let s = settings(4, 8, 2);
        let (store, meta) = opened(&s, 4000);
        let mut ok = 0;
        for i in 0..1000u32 {
            if rec(&store, &meta, &s, "greedy", &format!("n{i}"), 5000, 5000).is_ok() {
                ok += 1;
            }
        }
        assert_eq!(
            ok,
            4 * 2,
            "the greedy app holds exactly its share of every slot"
        );
        // every other app still finds room in every slot
        let mut other_ok = 0;
        for i in 0..24u32 {
            if rec(
                &store,
                &meta,
                &s,
                &format!("app-{}", i % 3),
                &format!("x{i}"),
                5000,
                5000,
            )
            .is_ok()
            {
                other_ok += 1;
            }
        }
        assert!(other_ok >= 12, "other apps are served ({other_ok} of 24)");
    }

    /// The salt decides the slot: two stores with different salts place the same pair apart,
    /// so a caller who knows its nonce still cannot know its slot.
    #[test]
    fn placement_depends_on_the_secret_salt() {
        let a = StoreMeta {
            salt: [1; 16],
            started_at: 0,
            replay_slots: 4096,
        };
        let b = StoreMeta {
            salt: [2; 16],
            ..a.clone()
        };
        let differ = (0..64)
            .filter(|i| {
                place(&a, 4096, "x", &format!("n{i}")).slot
                    != place(&b, 4096, "x", &format!("n{i}")).slot
            })
            .count();
        assert!(differ > 60);
    }

    /// Issue 8, hole 2: widening the skew window after a nonce was pruned must not accept
    /// its request again. The slot's horizon covers it.
    #[test]
    fn widened_skew_cannot_bring_back_a_pruned_nonce() {
        let s = settings(1, 8, 8);
        let (store, meta) = opened(&s, 0);
        rec(&store, &meta, &s, "a", "order-1", 1000, 1000).unwrap(); // expires at 1600
                                                                     // the entry is pruned by a later write, after it expired
        rec(&store, &meta, &s, "a", "other", 1700, 1700).unwrap();
        // now the operator widens the skew to 3600: "order-1" (created 1000) would be inside it
        let err = check(&store, &meta, &s, 3600, "a", "order-1", 1000, 1750, true).unwrap_err();
        assert_eq!(err.reason, DenyReason::CreatedTooOld);
        // a fresh request is unaffected
        check(&store, &meta, &s, 3600, "a", "order-2", 1740, 1750, true).unwrap();
    }

    /// Issue 8, hole 3: a store that starts empty refuses signatures created before it started.
    #[test]
    fn a_fresh_store_refuses_what_was_signed_before_it_started() {
        let s = settings(4, 8, 8);
        let (store, meta) = opened(&s, 5000);
        assert_eq!(
            rec(&store, &meta, &s, "a", "old", 4990, 5001),
            Err(DenyReason::CreatedTooOld)
        );
        assert_eq!(
            rec(&store, &meta, &s, "a", "before", 4999, 5001),
            Err(DenyReason::CreatedTooOld)
        );
        rec(&store, &meta, &s, "a", "at", 5000, 5001).unwrap();
    }

    struct FailingStore;
    impl SharedStore for FailingStore {
        fn get(&self, _: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            Err(StoreError::Host("down".into()))
        }
        fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<bool, StoreError> {
            Err(StoreError::Host("down".into()))
        }
    }

    #[test]
    fn store_failure_refuses() {
        let meta = StoreMeta {
            salt: [0; 16],
            started_at: 0,
            replay_slots: 1,
        };
        let err = check(
            &FailingStore,
            &meta,
            &settings(1, 1, 1),
            300,
            "a",
            "n",
            1,
            1,
            true,
        )
        .unwrap_err();
        assert_eq!(err.reason, DenyReason::HostUnavailable);
    }

    /// A store whose CAS always loses: the check gives up and refuses instead of looping.
    struct ContendedStore(MemoryStore);
    impl SharedStore for ContendedStore {
        fn get(&self, k: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            self.0.get(k)
        }
        fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<bool, StoreError> {
            Ok(false)
        }
    }

    #[test]
    fn endless_contention_refuses() {
        let store = ContendedStore(MemoryStore::default());
        store
            .0
            .set(&slot_key(0), &0u64.to_le_bytes(), None)
            .unwrap();
        let meta = StoreMeta {
            salt: [0; 16],
            started_at: 0,
            replay_slots: 1,
        };
        let err = check(&store, &meta, &settings(1, 4, 4), 300, "a", "n", 1, 1, true).unwrap_err();
        assert_eq!(err.reason, DenyReason::HostUnavailable);
    }
}
