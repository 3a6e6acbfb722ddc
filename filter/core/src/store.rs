//! The local state store: a process-wide key/value store with compare-and-swap, as Envoy's
//! shared data is (one store per `vm_id`, shared by every worker thread). Everything that
//! outlives a request (nonces, grant use counts, refusal counters and bans) lives here, and
//! every write to it is conditional: a key is created only if absent, and updated only if
//! nobody wrote it since it was read (PERM-5, ATK-1).
//!
//! Envoy creates a missing key whatever CAS token the write carries, and compares the token
//! only for an existing key; tokens are unique across all keys of the store. So a write that
//! carries a token belonging to another key creates a missing key and fails on an existing
//! one: [`create_if_absent`] is the one conditional create this host allows.

/// Why the store could not answer. The request path turns each into a refusal
/// (`host_unavailable`): a store that cannot answer means refuse, never accept unchecked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The host refused the call (with its status).
    Host(String),
    /// The store holds something this code did not write, or lost what it wrote.
    Corrupt(&'static str),
    /// Compare-and-swap kept losing to other workers.
    Contention,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Host(s) => write!(f, "host: {s}"),
            StoreError::Corrupt(s) => write!(f, "corrupt: {s}"),
            StoreError::Contention => f.write_str("too much contention"),
        }
    }
}

/// A process-wide key/value store with compare-and-swap, like Envoy's shared data.
pub trait SharedStore {
    /// The value and its CAS token, or None if the key was never written.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Writes if `cas` still matches (None: unconditional). Ok(false) on a CAS mismatch.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError>;
}

/// The little-endian u64 at byte `at` of a stored value; 0 where the value is too short (a
/// counter or time that was never written).
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_le_bytes)
}

/// Reads `key` (empty when it was never written), lets `change` decide what to write (None:
/// nothing) and what to answer, and writes it by compare-and-swap, from the start again when
/// another worker wrote first.
/// A count in a fixed window (`bucket`), with a bounded table of per-member counts beside it:
/// the value is `bucket | total | (member fingerprint | count)*`, at most `max_members`
/// members (the one with the fewest counts makes room). Adds one to the total and, when
/// `member` is given, to its count; returns both after the addition.
pub fn count_in_window(
    store: &dyn SharedStore,
    key: &str,
    bucket: u64,
    member: Option<[u8; 8]>,
    max_members: usize,
) -> Result<(u64, u64), StoreError> {
    update(store, key, |v| {
        let same = v.len() >= 16 && u64_at(v, 0) == bucket;
        let total = if same { u64_at(v, 8) } else { 0 }.saturating_add(1);
        let mut members: Vec<([u8; 8], u64)> = if same {
            v.get(16..)
                .unwrap_or_default()
                .chunks_exact(16)
                .map(|c| {
                    let mut f = [0u8; 8];
                    f.copy_from_slice(c.get(..8).unwrap_or(&[0u8; 8]));
                    (f, u64_at(c, 8))
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut mine = 0;
        if let Some(fp) = member {
            if let Some(e) = members.iter_mut().find(|e| e.0 == fp) {
                e.1 = e.1.saturating_add(1);
                mine = e.1;
            } else {
                if members.len() >= max_members {
                    if let Some(i) = (0..members.len()).min_by_key(|&i| members.get(i).map(|e| e.1))
                    {
                        members.remove(i);
                    }
                }
                members.push((fp, 1));
                mine = 1;
            }
        }
        let mut out = bucket.to_le_bytes().to_vec();
        out.extend_from_slice(&total.to_le_bytes());
        for (f, c) in &members {
            out.extend_from_slice(f);
            out.extend_from_slice(&c.to_le_bytes());
        }
        (Some(out), (total, mine))
    })
}

pub fn update<R>(
    store: &dyn SharedStore,
    key: &str,
    mut change: impl FnMut(&[u8]) -> (Option<Vec<u8>>, R),
) -> Result<R, StoreError> {
    for _ in 0..16 {
        let Some((value, cas)) = store.get(key)? else {
            create_if_absent(store, key, &[])?;
            continue;
        };
        let (write, answer) = change(&value);
        match write {
            None => return Ok(answer),
            Some(v) => {
                if store.set(key, &v, Some(cas))? {
                    return Ok(answer);
                }
            }
        }
    }
    Err(StoreError::Contention)
}

/// A key whose only purpose is to own a CAS token that no other key can hold.
const TOKEN_KEY: &str = "apisec/cas-token";

/// Creates `key` holding `value` if it does not exist; Ok(false) if it already does (someone
/// else created it first, possibly a moment ago on another worker). Never overwrites.
pub fn create_if_absent(
    store: &dyn SharedStore,
    key: &str,
    value: &[u8],
) -> Result<bool, StoreError> {
    if store.get(key)?.is_some() {
        return Ok(false);
    }
    let token = match store.get(TOKEN_KEY)? {
        Some((_, cas)) => cas,
        None => {
            // The token key's value is never read, so an unconditional write is harmless.
            store.set(TOKEN_KEY, b"", None)?;
            store
                .get(TOKEN_KEY)?
                .map(|(_, cas)| cas)
                .ok_or(StoreError::Corrupt("the token key vanished"))?
        }
    };
    store.set(key, value, Some(token))
}

/// What the store itself remembers about its life: when it started (it knows nothing from
/// before), the secret that places entries (callers cannot steer where their entries go), and
/// the replay layout its live nonces are stored in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreMeta {
    pub salt: [u8; 16],
    pub started_at: u64,
    pub replay_slots: u32,
}

const META_KEY: &str = "apisec/meta";
const META_LEN: usize = 1 + 16 + 8 + 4;

impl StoreMeta {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(META_LEN);
        out.push(1);
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&self.started_at.to_le_bytes());
        out.extend_from_slice(&self.replay_slots.to_le_bytes());
        out
    }

    fn decode(b: &[u8]) -> Option<StoreMeta> {
        if b.len() != META_LEN || b.first() != Some(&1) {
            return None;
        }
        Some(StoreMeta {
            salt: b.get(1..17)?.try_into().ok()?,
            started_at: u64::from_le_bytes(b.get(17..25)?.try_into().ok()?),
            replay_slots: u32::from_le_bytes(b.get(25..29)?.try_into().ok()?),
        })
    }

    /// A keyed hash of `parts`: where an entry goes and how it is recognised. Without the salt
    /// nobody can compute it, so a caller cannot aim its entries at another caller's slot.
    /// SHA-256 over the salt: 32 bytes, for the sessions' 128-bit tags.
    pub fn keyed(&self, domain: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        let mut h = crate::sha256::Sha256::new();
        h.update(&self.salt);
        h.update(domain);
        for p in parts {
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p);
        }
        h.finalize()
    }

    /// The same keyed placement in 16 bytes, with SipHash-1-3-128 (a PRF made for hash-flooding
    /// resistance, as the bans' fingerprints use) under the salt: for what runs on every
    /// request (a nonce's slot and 64-bit tag, a rate counter's), where two SHA-256 cost ~7k
    /// instructions natively and more in wasm.
    pub fn placed(&self, domain: &[u8], parts: &[&[u8]]) -> [u8; 16] {
        use core::hash::Hasher;
        let mut h = siphasher::sip128::SipHasher13::new_with_key(&self.salt);
        h.write(&(domain.len() as u64).to_le_bytes());
        h.write(domain);
        for p in parts {
            h.write(&(p.len() as u64).to_le_bytes());
            h.write(p);
        }
        siphasher::sip128::Hasher128::finish128(&h).as_bytes()
    }
}

/// Opens the store: creates its record on first use (with `salt` from the host's random
/// source and `now` as its start), or reads the record another worker or an earlier policy
/// wrote. Whoever creates it first wins; everyone then uses the winner's record.
pub fn open(
    store: &dyn SharedStore,
    salt: [u8; 16],
    now: u64,
    replay_slots: u32,
) -> Result<StoreMeta, StoreError> {
    let fresh = StoreMeta {
        salt,
        started_at: now,
        replay_slots,
    };
    create_if_absent(store, META_KEY, &fresh.encode())?;
    match store.get(META_KEY)? {
        Some((v, _)) => StoreMeta::decode(&v).ok_or(StoreError::Corrupt("unreadable store record")),
        None => Err(StoreError::Corrupt("the store record vanished")),
    }
}

/// Whether the store is new: its record not yet written by any worker.
pub fn is_new(store: &dyn SharedStore) -> Result<bool, StoreError> {
    Ok(store.get(META_KEY)?.is_none())
}

/// Reads the store's record on the request path (never creates it there).
pub fn meta(store: &dyn SharedStore) -> Result<StoreMeta, StoreError> {
    match store.get(META_KEY)? {
        Some((v, _)) => StoreMeta::decode(&v).ok_or(StoreError::Corrupt("unreadable store record")),
        None => Err(StoreError::Corrupt("the store was not opened")),
    }
}

/// In-memory store with Envoy's semantics (a missing key is created whatever the CAS; tokens
/// unique across keys), for tests and native hosts.
type Entries = std::collections::HashMap<String, (Vec<u8>, u32)>;

#[derive(Default)]
pub struct MemoryStore {
    /// The entries and the last CAS token handed out.
    inner: std::sync::Mutex<(Entries, u32)>,
}

impl MemoryStore {
    /// Total bytes of the values that hold state: what the store costs in memory.
    pub fn value_bytes(&self) -> usize {
        self.inner
            .lock()
            .map(|g| {
                g.0.iter()
                    .filter(|(k, _)| *k != META_KEY && *k != TOKEN_KEY)
                    .map(|(_, (v, _))| v.len())
                    .sum()
            })
            .unwrap_or(0)
    }
    /// Keys that hold state, leaving out the store's own record and token key.
    pub fn key_count(&self) -> usize {
        self.inner
            .lock()
            .map(|g| {
                g.0.keys()
                    .filter(|k| *k != META_KEY && *k != TOKEN_KEY)
                    .count()
            })
            .unwrap_or(0)
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let g = self
            .inner
            .lock()
            .map_err(|_| StoreError::Host("poisoned".into()))?;
        Ok(g.0.get(key).cloned())
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| StoreError::Host("poisoned".into()))?;
        let (map, counter) = &mut *g;
        if let (Some(c), Some((_, cur))) = (cas, map.get(key)) {
            if *cur != c {
                return Ok(false);
            }
        }
        *counter = counter.wrapping_add(1).max(1);
        map.insert(key.to_string(), (value.to_vec(), *counter));
        Ok(true)
    }
}

/// A store that runs `between` once, right after the `at`-th read: another worker acting
/// between a read and the write that depends on it. For deterministic interleaving tests.
pub struct InterleavingStore<'a, F: Fn(&MemoryStore)> {
    pub inner: &'a MemoryStore,
    pub at: usize,
    pub between: F,
    pub reads: std::cell::Cell<usize>,
}

impl<F: Fn(&MemoryStore)> SharedStore for InterleavingStore<'_, F> {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let v = self.inner.get(key);
        let n = self.reads.get() + 1;
        self.reads.set(n);
        if n == self.at {
            (self.between)(self.inner);
        }
        v
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        self.inner.set(key, value, cas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_are_keyed_and_separated() {
        let meta = |salt| StoreMeta {
            salt,
            started_at: 0,
            replay_slots: 1,
        };
        let (a, b) = (meta([1; 16]), meta([2; 16]));
        let nonce: &[&[u8]] = &[b"app", b"nonce"];
        // the same input under the same salt lands in the same place; another salt elsewhere
        assert_eq!(a.placed(b"replay", nonce), a.placed(b"replay", nonce));
        assert_ne!(a.placed(b"replay", nonce), b.placed(b"replay", nonce));
        // parts are length-framed: moving a byte between them is another input
        assert_ne!(
            a.placed(b"replay", nonce),
            a.placed(b"replay", &[b"appn", b"once"])
        );
        // so is the domain: a rate key never shares a nonce's place by its bytes
        assert_ne!(a.placed(b"replay", &[b"x"]), a.placed(b"rate", &[b"x"]));
        assert_ne!(a.placed(b"rep", &[b"layx"]), a.placed(b"replay", &[b"x"]));
    }

    #[test]
    fn create_if_absent_never_overwrites() {
        let s = MemoryStore::default();
        assert!(create_if_absent(&s, "k", b"first").unwrap());
        assert!(!create_if_absent(&s, "k", b"second").unwrap());
        assert_eq!(s.get("k").unwrap().unwrap().0, b"first");
    }

    /// Another worker creates and updates the key between our "is it there?" read and our
    /// create: the create must fail instead of wiping the other worker's update.
    #[test]
    fn create_racing_another_worker_keeps_its_update() {
        let mem = MemoryStore::default();
        let racing = InterleavingStore {
            inner: &mem,
            at: 1,
            between: |m: &MemoryStore| {
                m.set("k", b"0", None).unwrap();
                let (_, cas) = m.get("k").unwrap().unwrap();
                assert!(m.set("k", b"1", Some(cas)).unwrap());
            },
            reads: std::cell::Cell::new(0),
        };
        assert!(!create_if_absent(&racing, "k", b"0").unwrap());
        assert_eq!(mem.get("k").unwrap().unwrap().0, b"1");
    }

    #[test]
    fn first_opener_wins_and_later_ones_read_its_record() {
        let s = MemoryStore::default();
        let a = open(&s, [1; 16], 100, 64).unwrap();
        let b = open(&s, [2; 16], 200, 128).unwrap();
        assert_eq!(a, b);
        assert_eq!(b.salt, [1; 16]);
        assert_eq!(b.started_at, 100);
        assert_eq!(meta(&s).unwrap(), a);
        assert!(meta(&MemoryStore::default()).is_err());
    }
}
