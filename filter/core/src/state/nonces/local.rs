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
//! - An entry is 20 bytes (issue 24: 32 before; at a million live nonces 12 MiB less of
//!   Envoy's memory). A slot written by an earlier build in the 32-byte layout is read as such
//!   and rewritten in the 20-byte one by its next write, so a new module loaded into a running
//!   Envoy keeps every nonce the old one recorded. The header's top bit tells the layouts
//!   apart; an earlier build that meets it reads a horizon in the far future and refuses every
//!   request it guards (`created_too_old`), so going back needs a restart, never a replay.

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

const HEADER: usize = 8; // horizon (unix seconds, LE) | COMPACT
const ENTRY: usize = 20; // tag 8 | app 4 | created 4 | expiry 4 (unix seconds, LE)
/// The header's mark of the 20-byte layout (a horizon in seconds never reaches bit 63).
const COMPACT: u64 = 1 << 63;
/// The layout of the builds before issue 24: tag 8 | app 8 | created 8 | expiry 8.
const WIDE_ENTRY: usize = 32;
const MAX_CAS_RETRIES: usize = 16;

/// One live entry, whichever layout it was read from.
struct Entry<'a> {
    tag: &'a [u8],
    app: &'a [u8],
    created: u64,
    expiry: u64,
}

fn u32_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, |w| u64::from(u32::from_le_bytes(w)))
}

/// A slot's horizon and its entries, in the layout its header names.
fn parse(value: &[u8]) -> (u64, impl Iterator<Item = Entry<'_>>) {
    let header = u64_at(value, 0);
    let compact = header & COMPACT != 0;
    let size = if compact { ENTRY } else { WIDE_ENTRY };
    let entries = value
        .get(HEADER..)
        .unwrap_or(&[])
        .chunks_exact(size)
        .map(move |e| {
            if compact {
                Entry {
                    tag: e.get(..8).unwrap_or(&[]),
                    app: e.get(8..12).unwrap_or(&[]),
                    created: u32_at(e, 12),
                    expiry: u32_at(e, 16),
                }
            } else {
                Entry {
                    tag: e.get(..8).unwrap_or(&[]),
                    app: e.get(8..12).unwrap_or(&[]), // the wide app word's first four bytes
                    created: u64_at(e, 16),
                    expiry: u64_at(e, 24),
                }
            }
        });
    (header & !COMPACT, entries)
}

/// Seconds as the 20-byte layout keeps them (unix time fits in 32 bits until 2106; a later
/// value is kept as the largest, which only makes an entry live longer).
fn secs32(t: u64) -> [u8; 4] {
    u32::try_from(t).unwrap_or(u32::MAX).to_le_bytes()
}

fn push_entry(out: &mut Vec<u8>, tag: &[u8], app: &[u8], created: u64, expiry: u64) {
    out.extend_from_slice(tag);
    out.extend_from_slice(app);
    out.extend_from_slice(&secs32(created));
    out.extend_from_slice(&secs32(expiry));
}

pub fn slot_key(slot: u32) -> String {
    crate::state::numbered_key("apisec/replay/", u64::from(slot))
}

/// Where a nonce goes and how it is recognised, under the store's salt.
struct Place {
    slot: u32,
    tag: [u8; 8],
    app: [u8; 4],
}

fn place(meta: &StoreMeta, slots: u32, app: &str, nonce: &str) -> Place {
    let h = meta.placed(b"replay", &[app.as_bytes(), nonce.as_bytes()]);
    let a = meta.placed(b"replay-app", &[app.as_bytes()]);
    let word = |b: &[u8; 16], at: usize| -> [u8; 8] {
        let mut w = [0u8; 8];
        if let Some(s) = b.get(at..at + 8) {
            w.copy_from_slice(s);
        }
        w
    };
    let mut app = [0u8; 4];
    app.copy_from_slice(&word(&a, 0)[..4]);
    Place {
        slot: (u64::from_le_bytes(word(&h, 0)) % u64::from(slots.max(1))) as u32,
        tag: word(&h, 8),
        app,
    }
}

/// The horizon a fresh slot starts with: requests created before the store started are
/// refused (the store cannot know whether an earlier process accepted them); a request
/// created in the second the store started is not, since that earlier process had stopped.
fn start_horizon(meta: &StoreMeta) -> u64 {
    meta.started_at.saturating_sub(1)
}

/// A fresh slot's value: the start horizon, in the 20-byte layout.
fn fresh_slot(meta: &StoreMeta) -> [u8; HEADER] {
    (start_horizon(meta) | COMPACT).to_le_bytes()
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
    let fresh = fresh_slot(meta);
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
            create_if_absent(store, &key, &fresh_slot(meta)).map_err(host)?;
            continue;
        };
        let (stored_horizon, entries) = parse(&value);
        let mut horizon = stored_horizon.max(start_horizon(meta));
        let mut live: Vec<u8> = Vec::with_capacity(value.len() + ENTRY);
        live.extend_from_slice(&[0u8; HEADER]);
        let mut app_live = 0u32;
        for e in entries {
            if e.expiry <= now {
                horizon = horizon.max(e.created); // pruned by this write: forgotten from here on
                continue;
            }
            if e.tag == p.tag && e.app == p.app {
                return Err(Deny::new(
                    DenyReason::NonceReplayed,
                    format!("nonce {nonce:?} already used"),
                ));
            }
            if e.app == p.app {
                app_live += 1;
            }
            push_entry(&mut live, e.tag, e.app, e.created, e.expiry);
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
            h.copy_from_slice(&(horizon | COMPACT).to_le_bytes());
        }
        push_entry(&mut live, &p.tag, &p.app, created, expiry);
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
        let live = parse(&value).1.filter(|e| e.expiry > now).count() as u64;
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
        // slots of eight: wherever the salt's hash puts five nonces, none is refused as full
        let s = settings(2, 8, 8);
        let (store, meta) = opened(&s, 100);
        for n in 0..5 {
            rec(&store, &meta, &s, "a", &format!("n{n}"), 200, 200).unwrap();
        }
        let mut f = ReplayFill::default();
        fill(&store, &s, 200, 0..1, &mut f).unwrap();
        fill(&store, &s, 200, 1..2, &mut f).unwrap();
        assert_eq!((f.live, f.capacity), (5, 16));
        assert!(
            f.fullest_pct >= 37,
            "five nonces in two slots of eight: one holds three or more"
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

    /// A slot an earlier build wrote in the 32-byte layout (a new module loaded into a running
    /// Envoy finds its shared data): its nonces are still refused, its horizon still holds, and
    /// its next write keeps them in the 20-byte layout.
    #[test]
    fn a_slot_in_the_wide_layout_keeps_its_nonces() {
        let s = settings(1, 8, 8);
        let (store, meta) = opened(&s, 100);
        let p = place(&meta, 1, "app-a", "old-nonce");
        let mut app8 = [0u8; 8];
        app8[..4].copy_from_slice(&p.app);
        app8[4..].copy_from_slice(&[9, 9, 9, 9]); // the wide app word's other half is not compared
        let mut wide = 150u64.to_le_bytes().to_vec(); // horizon 150, no COMPACT mark
        wide.extend_from_slice(&p.tag);
        wide.extend_from_slice(&app8);
        wide.extend_from_slice(&1000u64.to_le_bytes());
        wide.extend_from_slice(&1900u64.to_le_bytes());
        store.set(&slot_key(0), &wide, None).unwrap();
        assert_eq!(
            rec(&store, &meta, &s, "app-a", "old-nonce", 1000, 1010),
            Err(DenyReason::NonceReplayed)
        );
        assert_eq!(
            rec(&store, &meta, &s, "app-a", "before-horizon", 150, 1010),
            Err(DenyReason::CreatedTooOld)
        );
        rec(&store, &meta, &s, "app-a", "new-nonce", 1005, 1010).unwrap();
        let (value, _) = store.get(&slot_key(0)).unwrap().unwrap();
        assert_eq!(
            value.len(),
            HEADER + 2 * ENTRY,
            "rewritten in the 20-byte layout"
        );
        assert_eq!(u64_at(&value, 0), 150 | COMPACT);
        for n in ["old-nonce", "new-nonce"] {
            assert_eq!(
                rec(&store, &meta, &s, "app-a", n, 1005, 1020),
                Err(DenyReason::NonceReplayed)
            );
        }
        let mut f = ReplayFill::default();
        fill(&store, &s, 1020, 0..1, &mut f).unwrap();
        assert_eq!(f.live, 2);
    }

    /// An earlier build reads the 20-byte layout's header as a horizon far in the future, so
    /// it refuses what it guards rather than take a spent nonce for a new one.
    #[test]
    fn the_compact_mark_reads_as_a_far_horizon_to_an_earlier_build() {
        let s = settings(1, 8, 8);
        let (store, _) = opened(&s, 100);
        let (value, _) = store.get(&slot_key(0)).unwrap().unwrap();
        assert!(u64_at(&value, 0) > u64::from(u32::MAX) * 1000);
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
