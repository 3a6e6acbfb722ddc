//! The local state store of the native build: one store per Envoy process, shared by every
//! worker thread, with the semantics of Envoy's Wasm shared data that core's local backend is
//! written for (a missing key is created whatever the CAS; CAS tokens unique across keys). Its
//! keys are sharded over locks by a hash of the key, so that two workers rarely wait on each
//! other. The hash is foldhash under a random seed, not SipHash: every key is one the gateway
//! makes (a slot number, a policy's rule, a registered app or key id, never a caller's
//! bytes), so there is no flood of colliding keys to resist, and a request makes several
//! lookups. It is bounded as shared data is: core's key layout bounds the keys (time-bucketed
//! keys, a ring of replay slots), the store adds none of its own. It survives policy reloads
//! (a module is loaded once per process) and ends with the process, like shared data.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use apisec_core::store::{SharedStore, StoreError};

const SHARDS: usize = 64;

type Entries = HashMap<String, (Vec<u8>, u32), foldhash::fast::RandomState>;
type Shard = Mutex<Entries>;

pub struct ShardedStore {
    shards: Vec<Shard>,
    /// The last CAS token handed out, over all keys.
    token: AtomicU32,
    hasher: foldhash::fast::RandomState,
}

impl Default for ShardedStore {
    fn default() -> Self {
        ShardedStore {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(Default::default())))
                .collect(),
            token: AtomicU32::new(0),
            hasher: Default::default(),
        }
    }
}

/// The process's store.
pub fn store() -> &'static ShardedStore {
    static STORE: OnceLock<ShardedStore> = OnceLock::new();
    STORE.get_or_init(ShardedStore::default)
}

impl ShardedStore {
    fn shard(&self, key: &str) -> Result<std::sync::MutexGuard<'_, Entries>, StoreError> {
        let i = (self.hasher.hash_one(key.as_bytes()) as usize) % SHARDS;
        self.shards
            .get(i)
            .ok_or(StoreError::Host("no shard".into()))?
            .lock()
            .map_err(|_| StoreError::Host("store lock poisoned".into()))
    }

    fn next_token(&self) -> u32 {
        // Never 0 (Envoy's tokens start at 1), wrapping as Envoy's do.
        loop {
            let t = self.token.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if t != 0 {
                return t;
            }
        }
    }
}

impl SharedStore for ShardedStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(self.shard(key)?.get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        let mut shard = self.shard(key)?;
        if let (Some(c), Some((_, cur))) = (cas, shard.get(key)) {
            if *cur != c {
                return Ok(false);
            }
        }
        let token = self.next_token();
        match shard.get_mut(key) {
            Some(entry) => {
                entry.0.clear();
                entry.0.extend_from_slice(value);
                entry.1 = token;
            }
            None => {
                shard.insert(key.to_string(), (value.to_vec(), token));
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_semantics_are_shared_datas() {
        let s = ShardedStore::default();
        assert_eq!(s.get("a").unwrap(), None);
        // A missing key is created whatever the CAS.
        assert!(s.set("a", b"1", Some(12345)).unwrap());
        let (v, t1) = s.get("a").unwrap().unwrap();
        assert_eq!(v, b"1");
        assert!(
            !s.set("a", b"2", Some(t1.wrapping_add(1))).unwrap(),
            "stale CAS refused"
        );
        assert!(s.set("a", b"2", Some(t1)).unwrap());
        let (v, t2) = s.get("a").unwrap().unwrap();
        assert_eq!(v, b"2");
        assert_ne!(t1, t2);
        assert!(
            !s.set("a", b"3", Some(t1)).unwrap(),
            "the old token no longer matches"
        );
        assert!(s.set("b", b"x", None).unwrap());
        let (_, tb) = s.get("b").unwrap().unwrap();
        assert_ne!(tb, t2, "tokens are unique across keys");
    }

    #[test]
    fn workers_racing_on_one_key_lose_no_update() {
        let s = std::sync::Arc::new(ShardedStore::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        loop {
                            let (v, cas) = match s.get("n").unwrap() {
                                Some((v, c)) => {
                                    (u64::from_le_bytes(v.try_into().unwrap()), Some(c))
                                }
                                None => (0, None),
                            };
                            let next = (v + 1).to_le_bytes();
                            let ok = match cas {
                                Some(c) => s.set("n", &next, Some(c)).unwrap(),
                                None => {
                                    apisec_core::store::create_if_absent(&*s, "n", &next).unwrap()
                                }
                            };
                            if ok {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (v, _) = s.get("n").unwrap().unwrap();
        assert_eq!(u64::from_le_bytes(v.try_into().unwrap()), 2000);
    }
}
