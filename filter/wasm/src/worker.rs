//! What one worker's VM keeps across its streams and policy reloads: the policy in force, the
//! request bodies it holds, the byte counts waiting for the cluster store, and its audit chain.
//! The root context writes them; streams and host adapters read them here.

use std::cell::{Cell, RefCell};

use apisec_core::audit_chain::Chain;
use apisec_core::lifecycle::Config;
use apisec_core::state::Op;
use proxy_wasm::hostcalls;

thread_local! {
    /// The policy most recently loaded in this VM (one VM per worker): a stream whose body
    /// completes after a reload is decided under it, not under the one its headers saw.
    pub static CURRENT: RefCell<Option<Config>> = const { RefCell::new(None) };
    /// How many policies this VM has loaded (a policy's generation).
    pub static GENERATION: Cell<u64> = const { Cell::new(0) };
    /// Bytes of request bodies this worker holds for verification right now.
    pub static HELD: Cell<u64> = const { Cell::new(0) };
    /// Response byte counts of ended streams not yet sent to the cluster store (anomaly.rs).
    pub static TALLY: RefCell<Vec<Op>> = const { RefCell::new(Vec::new()) };
    /// This worker's audit chain (LOG-1): one per VM, kept across policy reloads; named by 64
    /// random bits when the VM starts.
    pub static CHAIN: RefCell<Chain> = RefCell::new(Chain::new(&chain_name()));
}

fn chain_name() -> [u8; 8] {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // No random source: the clock's nanoseconds still tell workers and restarts apart.
        let ns = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        b = ns.to_le_bytes();
    }
    b
}

/// The policy in force in this VM now.
pub fn current() -> Option<Config> {
    CURRENT.with(|c| c.borrow().clone())
}
