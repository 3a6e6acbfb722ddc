//! Replay protection (ATK-1): each (app, nonce) pair is accepted once within the nonce
//! lifetime, across every worker thread, in a store with a fixed number of keys (slots) and a
//! fixed number of live entries per slot. Expired entries are pruned on write, so the store
//! never grows past `slots * entries_per_slot` entries; a slot full of live nonces refuses
//! (fail closed) rather than forget one.

use sha2::{Digest, Sha256};

use crate::error::{Deny, DenyReason};
use crate::policy::ReplaySettings;

/// A process-wide key/value store with compare-and-swap, like Envoy's shared data.
pub trait SharedStore {
    /// The value and its CAS token, or None if the key was never written.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, String>;
    /// Writes if `cas` still matches (None: unconditional). Ok(false) on a CAS mismatch.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, String>;
}

const ENTRY: usize = 24; // 16-byte fingerprint + 8-byte expiry (unix seconds, LE)
const MAX_CAS_RETRIES: usize = 16;

pub fn slot_key(slot: u32) -> String {
    format!("apisec/replay/{slot}")
}

fn fingerprint(app: &str, nonce: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(app.as_bytes());
    h.update([0u8]);
    h.update(nonce.as_bytes());
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(d.get(..16).unwrap_or(&[0u8; 16]));
    out
}

/// Writes an empty value to every slot that has none yet. Called at configure time so that the
/// request path never creates a key (Envoy's CAS cannot guard a key that does not exist yet).
pub fn init_slots(store: &dyn SharedStore, settings: &ReplaySettings) -> Result<(), String> {
    for slot in 0..settings.slots {
        let key = slot_key(slot);
        if store.get(&key)?.is_none() {
            store.set(&key, &[], None)?;
        }
    }
    Ok(())
}

/// Accepts the nonce if unseen (recording it until `now + lifetime`), refuses it otherwise.
pub fn check_and_record(
    store: &dyn SharedStore,
    settings: &ReplaySettings,
    app: &str,
    nonce: &str,
    now: u64,
) -> Result<(), Deny> {
    let fp = fingerprint(app, nonce);
    let slot_count = u64::from(settings.slots.max(1));
    let slot = (u64::from_le_bytes([fp[0], fp[1], fp[2], fp[3], fp[4], fp[5], fp[6], fp[7]])
        % slot_count) as u32;
    let key = slot_key(slot);
    let expiry = now.saturating_add(settings.lifetime_seconds);
    let host = |e: String| Deny::new(DenyReason::HostUnavailable, format!("replay store: {e}"));

    for _ in 0..MAX_CAS_RETRIES {
        let (value, cas) = match store.get(&key).map_err(host)? {
            Some((v, cas)) => (v, Some(cas)),
            // A slot configure did not create (should not happen): create it, then retry.
            None => {
                store.set(&key, &[], None).map_err(host)?;
                continue;
            }
        };
        let mut live: Vec<u8> = Vec::with_capacity(value.len() + ENTRY);
        for entry in value.chunks_exact(ENTRY) {
            let (efp, eexp) = entry.split_at(16);
            let mut exp = [0u8; 8];
            exp.copy_from_slice(eexp);
            if u64::from_le_bytes(exp) <= now {
                continue; // expired: pruned by this write
            }
            if efp == fp {
                return Err(Deny::new(
                    DenyReason::NonceReplayed,
                    format!("nonce {nonce:?} already used"),
                ));
            }
            live.extend_from_slice(entry);
        }
        if live.len() / ENTRY >= settings.entries_per_slot as usize {
            return Err(Deny::new(
                DenyReason::ReplayStoreFull,
                format!(
                    "replay slot {slot} holds {} live nonces",
                    settings.entries_per_slot
                ),
            ));
        }
        live.extend_from_slice(&fp);
        live.extend_from_slice(&expiry.to_le_bytes());
        if store.set(&key, &live, cas).map_err(host)? {
            return Ok(());
        }
    }
    Err(Deny::new(
        DenyReason::HostUnavailable,
        "replay store: too much contention",
    ))
}

/// In-memory store with Envoy's semantics, for tests and native hosts.
type Entries = std::collections::HashMap<String, (Vec<u8>, u32)>;

#[derive(Default)]
pub struct MemoryStore {
    /// The entries and the last CAS token handed out.
    inner: std::sync::Mutex<(Entries, u32)>,
}

impl MemoryStore {
    /// Total bytes of all values: what the store costs in memory.
    pub fn value_bytes(&self) -> usize {
        self.inner
            .lock()
            .map(|g| g.0.values().map(|(v, _)| v.len()).sum())
            .unwrap_or(0)
    }
    pub fn key_count(&self) -> usize {
        self.inner.lock().map(|g| g.0.len()).unwrap_or(0)
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, String> {
        let g = self.inner.lock().map_err(|_| "poisoned".to_string())?;
        Ok(g.0.get(key).cloned())
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, String> {
        let mut g = self.inner.lock().map_err(|_| "poisoned".to_string())?;
        let (map, counter) = &mut *g;
        if let (Some(c), Some((_, cur))) = (cas, map.get(key)) {
            if *cur != c {
                return Ok(false);
            }
        }
        *counter += 1;
        map.insert(key.to_string(), (value.to_vec(), *counter));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(slots: u32, entries: u32) -> ReplaySettings {
        ReplaySettings {
            slots,
            entries_per_slot: entries,
            lifetime_seconds: 600,
        }
    }

    #[test]
    fn nonce_accepted_once_per_app() {
        let store = MemoryStore::default();
        let s = settings(16, 8);
        init_slots(&store, &s).unwrap();
        check_and_record(&store, &s, "app-a", "n1", 1000).unwrap();
        let err = check_and_record(&store, &s, "app-a", "n1", 1001).unwrap_err();
        assert_eq!(err.reason, DenyReason::NonceReplayed);
        // the same nonce from another app is a different pair
        check_and_record(&store, &s, "app-b", "n1", 1001).unwrap();
        // after the lifetime the entry is gone
        check_and_record(&store, &s, "app-a", "n1", 1000 + 600).unwrap();
    }

    /// The bound: a flood of unique nonces never grows the store past slots * entries, and a
    /// full store refuses instead of forgetting.
    #[test]
    fn flood_of_unique_nonces_stays_bounded() {
        let store = MemoryStore::default();
        let s = settings(64, 16);
        init_slots(&store, &s).unwrap();
        let (mut ok, mut full) = (0, 0);
        for i in 0..100_000u32 {
            match check_and_record(&store, &s, "flood", &format!("n{i}"), 5000) {
                Ok(()) => ok += 1,
                Err(d) => {
                    assert_eq!(d.reason, DenyReason::ReplayStoreFull);
                    full += 1
                }
            }
        }
        assert_eq!(ok, 64 * 16);
        assert_eq!(full, 100_000 - 64 * 16);
        assert_eq!(store.key_count(), 64);
        assert!(store.value_bytes() <= 64 * 16 * ENTRY);
        // once they expire, the space is reused and the bound still holds
        for i in 0..10_000u32 {
            let _ = check_and_record(&store, &s, "flood", &format!("m{i}"), 5000 + 601);
        }
        assert_eq!(store.key_count(), 64);
        assert!(store.value_bytes() <= 64 * 16 * ENTRY);
        check_and_record(&store, &s, "other", "fresh", 5000 + 1300).unwrap();
    }

    struct FailingStore;
    impl SharedStore for FailingStore {
        fn get(&self, _: &str) -> Result<Option<(Vec<u8>, u32)>, String> {
            Err("down".into())
        }
        fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<bool, String> {
            Err("down".into())
        }
    }

    #[test]
    fn store_failure_refuses() {
        let err = check_and_record(&FailingStore, &settings(1, 1), "a", "n", 1).unwrap_err();
        assert_eq!(err.reason, DenyReason::HostUnavailable);
    }

    /// A store whose CAS always loses: the check gives up and refuses instead of looping.
    struct ContendedStore(MemoryStore);
    impl SharedStore for ContendedStore {
        fn get(&self, k: &str) -> Result<Option<(Vec<u8>, u32)>, String> {
            self.0.get(k)
        }
        fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<bool, String> {
            Ok(false)
        }
    }

    #[test]
    fn endless_contention_refuses() {
        let store = ContendedStore(MemoryStore::default());
        store.0.set(&slot_key(0), &[], None).unwrap();
        let err = check_and_record(&store, &settings(1, 4), "a", "n", 1).unwrap_err();
        assert_eq!(err.reason, DenyReason::HostUnavailable);
    }
}
