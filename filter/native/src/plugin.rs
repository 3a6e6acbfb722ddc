//! What a plugin (one apisec filter, by its `filter_name`) keeps across its configurations:
//! the policy in force, the audit chains (one per worker) and the gauges its last policy set.
//! A policy reload (a new configuration of the same name) finds it here.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use apisec_core::audit_chain::Chain;
use apisec_core::lifecycle::Config;
use apisec_core::state::{Batch, Op};

use crate::envoy;

/// What one plugin (one apisec filter, by its `filter_name`) keeps across its configurations:
/// a policy reload (a new configuration of the same name) finds it, so that the chains go on,
/// a held body completes under the policy in force, and the gauges the old policy set are
/// cleared.
pub struct Plugin {
    pub current: Mutex<Option<Config>>,
    /// One audit chain per worker (LOG-1): a worker's records reach the access log in the
    /// order it sealed them. Named by 64 random bits when the plugin starts.
    pub chains: Vec<Mutex<Chain>>,
    /// The gauge series the last policy set (its version, its credentials' ends).
    pub gauges: Mutex<Vec<String>>,
    /// When the chains' heads were last written to Envoy's log (unix seconds). Every
    /// configuration of the plugin ticks (Envoy makes one per listener that names the
    /// filter); the first due takes the turn.
    pub checkpointed_at: AtomicU64,
    /// Response byte counts of ended streams not yet sent to the cluster store (anomaly.rs):
    /// a stream that ended has no request left to wait for them, so the ticker sends them.
    pub tally: Mutex<Vec<Op>>,
}

impl Plugin {
    fn new(workers: usize) -> Plugin {
        Plugin {
            current: Mutex::new(None),
            chains: (0..workers.max(1))
                .map(|_| Mutex::new(Chain::new(&chain_name())))
                .collect(),
            gauges: Mutex::new(Vec::new()),
            checkpointed_at: AtomicU64::new(0),
            tally: Mutex::new(Vec::new()),
        }
    }

    /// The policy this plugin loaded last.
    pub fn current(&self) -> Option<Config> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    /// Queues an ended stream's byte counts for the cluster store (bounded by `anomaly::pend`).
    pub fn pend_tally(&self, batch: Batch) {
        let lost = match self.tally.lock() {
            Ok(mut t) => apisec_core::anomaly::pend(&mut t, batch.ops, batch.now),
            Err(_) => batch.ops.len(),
        };
        if lost > 0 {
            envoy::log(
                crate::abi::LOG_WARN,
                &format!("apisec: {lost} response byte counts dropped: the queue for the cluster store is full"),
            );
        }
    }

    /// This worker's chain.
    pub fn chain(&self, worker: u32) -> Option<&Mutex<Chain>> {
        let n = self.chains.len().max(1);
        self.chains.get(worker as usize % n)
    }
}

fn chain_name() -> [u8; 8] {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        let ns = crate::clock::clock().map_or(0, |d| d.as_nanos() as u64);
        b = ns.to_le_bytes();
    }
    b
}

/// The plugin of a filter name, made on first use with one chain per worker.
pub fn plugin(name: &str) -> Arc<Plugin> {
    static PLUGINS: OnceLock<Mutex<HashMap<String, Arc<Plugin>>>> = OnceLock::new();
    let plugins = PLUGINS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = match plugins.lock() {
        Ok(m) => m,
        Err(p) => p.into_inner(),
    };
    map.entry(name.to_string())
        .or_insert_with(|| Arc::new(Plugin::new(envoy::concurrency() as usize)))
        .clone()
}
