//! What the native build's glue (filter/native) takes from Envoy and hands on without the core
//! having parsed it elsewhere: the cluster store's answers to its callouts (any status, any
//! body), the stat names it takes apart for Envoy's labelled stats, and the sequences of reads
//! and compare-and-swap writes its in-process store serves to workers. None may panic (a panic
//! in a dynamic module takes Envoy down), and the store must answer as the model store does.
#![no_main]

use apisec_core::cluster::{self, Decoded};
use apisec_core::state::{Batch, Op};
use apisec_core::store::{MemoryStore, SharedStore};
use apisec_native::store::ShardedStore;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    match selector % 3 {
        0 => {
            // A callout's answer: the status and body as Envoy passes them on.
            let (status, body) = rest.split_at(rest.len().min(3));
            let status = std::str::from_utf8(status).ok();
            let batch = Batch {
                ops: vec![Op::GrantUse { grant: "g".into(), max: 3 }],
                now: 1_800_000_000,
            };
            for full in [false, true] {
                if let Decoded::Answer(a) = cluster::decode(&batch, full, status, body) {
                    assert!(a.refused.is_some() || status == Some("200"), "only a 200 answers");
                }
                let _ = cluster::decode_gauges(full, status, body);
            }
        }
        1 => {
            // A stat name: what splits must be one of the table's series with all its labels.
            let name = String::from_utf8_lossy(rest);
            if let Some((i, values)) = apisec_core::metrics::split(&name) {
                let (series, _, labels) = apisec_core::metrics::SERIES[i];
                assert!(name.starts_with(series));
                assert_eq!(values.len(), labels.len());
            }
        }
        _ => {
            // Store operations: the sharded store against the model (Envoy's shared data).
            let model = MemoryStore::default();
            let store = ShardedStore::default();
            let mut tokens: Vec<(u32, u32)> = Vec::new();
            for op in rest.chunks(3) {
                let [kind, key, value] = [op.first(), op.get(1), op.get(2)].map(|b| b.copied().unwrap_or(0));
                let key = format!("k{}", key % 8);
                let (m, s) = (model.get(&key).ok().flatten(), store.get(&key).ok().flatten());
                assert_eq!(m.as_ref().map(|x| &x.0), s.as_ref().map(|x| &x.0), "values differ");
                let cas = match kind % 3 {
                    0 => None,
                    // the token each store gave for this key, or one it never gave
                    1 => Some((m.map_or(7, |x| x.1), s.map_or(7, |x| x.1))),
                    _ => tokens.last().copied(),
                };
                let wm = model.set(&key, &[value], cas.map(|c| c.0));
                let ws = store.set(&key, &[value], cas.map(|c| c.1));
                assert_eq!(wm.ok(), ws.ok(), "writes differ");
                if let (Ok(Some((_, a))), Ok(Some((_, b)))) = (model.get(&key), store.get(&key)) {
                    tokens.push((a, b));
                }
            }
        }
    }
});
