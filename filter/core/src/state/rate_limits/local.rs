//! Rate-limit counters on the `local` backend: Envoy's shared data, counted by
//! compare-and-swap across every worker of this gateway (not across replicas: that is the
//! `cluster` backend).
//!
//! The store has a fixed number of keys (`slots`), each holding at most `entries_per_slot`
//! counters, placed by a keyed hash under the store's secret salt (a caller cannot choose which
//! slot its counter lands in). A counter's entry is `tag 8 | last call (ms) 8`, then for each
//! window position (`Span::ALL`) `bucket 8 | count 8 | count of the bucket before 8`. A new
//! counter in a full slot takes the place of the counter idle longest, which starts again at
//! zero if it comes back: size the store for the keys that are live at once (docs/policy.md).

use super::{note_alert, Counter, RateHit, Span, Window};
use crate::error::{Deny, DenyReason};
use crate::state::Answer;
use crate::store::{u64_at, update, SharedStore, StoreError, StoreMeta};

/// The local counters' layout, from the policy's `gateway.rate_limit_store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateStore {
    pub slots: u32,
    pub entries_per_slot: u32,
}

impl Default for RateStore {
    fn default() -> Self {
        RateStore {
            slots: 1024,
            entries_per_slot: 16,
        }
    }
}

const WINDOWS: usize = Span::ALL.len();
const ENTRY: usize = 16 + WINDOWS * 24;

/// Where a window's `bucket | count | count before` sit in an entry.
fn offset(span: Span) -> usize {
    16 + span.pos() * 24
}

fn slot_key(slot: u64) -> String {
    format!("apisec/rate/{slot}")
}

/// The slot and tag of a counter, under the store's salt.
fn place(meta: &StoreMeta, settings: &RateStore, key: &str) -> (String, [u8; 8]) {
    let h = meta.placed(b"rate", &[key.as_bytes()]);
    let mut tag = [0u8; 8];
    tag.copy_from_slice(h.get(8..16).unwrap_or(&[0u8; 8]));
    let slot = u64_at(&h, 0) % u64::from(settings.slots.max(1));
    (slot_key(slot), tag)
}

/// The counts of `w` now (this window or period, and the one before), from an entry.
fn counts(entry: &[u8], w: &Window) -> (u64, u64) {
    let at = offset(w.span);
    let (bucket, cur, prev) = (
        u64_at(entry, at),
        u64_at(entry, at + 8),
        u64_at(entry, at + 16),
    );
    let sliding = w.span.sliding_ms().is_some();
    if bucket == w.bucket {
        (cur, if sliding { prev } else { 0 })
    } else if sliding && bucket.checked_add(1) == Some(w.bucket) {
        (0, cur)
    } else {
        (0, 0)
    }
}

fn put(entry: &mut [u8], at: usize, v: u64) {
    if let Some(s) = entry.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// What one counter came to.
enum Checked {
    Over(Window, u64, u64),
    Counted(Vec<RateHit>),
}

/// Checks one counter in its slot and, if no refusing window is over, counts the call in it.
fn check_and_count(
    value: &[u8],
    tag: &[u8; 8],
    c: &Counter,
    now_ms: u64,
    settings: &RateStore,
) -> (Option<Vec<u8>>, Checked) {
    let mut entries: Vec<&[u8]> = value.chunks_exact(ENTRY).collect();
    let found = entries.iter().position(|e| e.get(..8) == Some(&tag[..]));
    let mut entry = [0u8; ENTRY];
    if let Some(e) = found.and_then(|i| entries.get(i)) {
        entry.copy_from_slice(e);
    } else {
        entry[..8].copy_from_slice(tag);
    }
    let mut alerts = Vec::new();
    for w in &c.windows {
        let (cur, prev) = counts(&entry, w);
        if w.over(cur, prev) {
            if c.refuse {
                return (None, Checked::Over(w.clone(), cur, prev));
            }
            alerts.push(c.hit(w));
        }
    }
    for w in &c.windows {
        let (cur, prev) = counts(&entry, w);
        let at = offset(w.span);
        put(&mut entry, at, w.bucket);
        put(&mut entry, at + 8, cur.saturating_add(1));
        put(&mut entry, at + 16, prev);
    }
    put(&mut entry, 8, now_ms);
    match found {
        Some(i) => {
            entries.remove(i);
        }
        None if entries.len() >= settings.entries_per_slot.max(1) as usize => {
            // the counter idle longest makes room
            if let Some(i) =
                (0..entries.len()).min_by_key(|&i| entries.get(i).map_or(0, |e| u64_at(e, 8)))
            {
                entries.remove(i);
            }
        }
        None => {}
    }
    let mut out = Vec::with_capacity((entries.len() + 1) * ENTRY);
    for e in entries {
        out.extend_from_slice(e);
    }
    out.extend_from_slice(&entry);
    (Some(out), Checked::Counted(alerts))
}

/// Takes back one counted call of a counter (a later counter refused the call).
fn uncount(store: &dyn SharedStore, key: &str, tag: &[u8; 8], c: &Counter) {
    let _ = update(store, key, |value| {
        let mut v = value.to_vec();
        let Some(entry) = v
            .chunks_exact_mut(ENTRY)
            .find(|e| e.get(..8) == Some(&tag[..]))
        else {
            return (None, ());
        };
        for w in &c.windows {
            let at = offset(w.span);
            if u64_at(entry, at) == w.bucket {
                let n = u64_at(entry, at + 8).saturating_sub(1);
                put(entry, at + 8, n);
            }
        }
        (Some(v), ())
    });
}

/// Runs the counters of one call: refused (and nothing counted) if a refusing counter is over
/// one of its windows, else counted toward every counter, alerting ones over their limit
/// reported in `answer.rate_limits`.
pub fn run(
    store: &dyn SharedStore,
    meta: &StoreMeta,
    settings: &RateStore,
    counters: &[Counter],
    now_ms: u64,
    answer: &mut Answer,
) -> Result<(), Deny> {
    let host = |e: StoreError| Deny::new(DenyReason::HostUnavailable, format!("rate counter: {e}"));
    let mut done: Vec<(String, [u8; 8], &Counter)> = Vec::new();
    let mut alerts = Vec::new();
    for c in counters {
        let (key, tag) = place(meta, settings, &c.key);
        let checked = update(store, &key, |v| {
            check_and_count(v, &tag, c, now_ms, settings)
        });
        let refusal = match checked {
            Ok(Checked::Counted(hits)) => {
                alerts.extend(hits);
                done.push((key, tag, c));
                continue;
            }
            Ok(Checked::Over(w, cur, prev)) => {
                answer.rate_limits = vec![c.hit(&w)];
                c.refusal(&w, cur, prev)
            }
            Err(e) => host(e),
        };
        for (key, tag, c) in &done {
            uncount(store, key, tag, c);
        }
        return Err(refusal);
    }
    for hit in alerts {
        note_alert(answer, hit);
    }
    Ok(())
}
