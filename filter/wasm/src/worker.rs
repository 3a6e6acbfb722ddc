//! What one worker's VM keeps across its streams and policy reloads: the request bodies it
//! holds and the policy generations (VM-wide), and per plugin the policy in force, the byte
//! counts waiting for the cluster store, the audit chain and the policy's gauges. The root
//! context writes them; streams and host adapters read them here.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use apisec_core::audit_chain::Chain;
use apisec_core::lifecycle::Config;
use apisec_core::state::Op;
use proxy_wasm::hostcalls;

thread_local! {
    /// How many policies this VM has loaded, over all its plugins (a policy's generation).
    pub static GENERATION: Cell<u64> = const { Cell::new(0) };
    /// Bytes of request bodies this worker holds for verification right now.
    pub static HELD: Cell<u64> = const { Cell::new(0) };
    /// Each plugin's state, by plugin name (the Wasm filter's `config.name`).
    static PLUGINS: RefCell<HashMap<String, Rc<Plugin>>> = RefCell::new(HashMap::new());
}

/// The state of the plugin named `name` in this VM, made on first use. Envoy gives every
/// policy an ECDS update delivers a new root context, under the same plugin name: the new
/// root finds the state the old one kept (its streams then finish under the new policy, its
/// chain and queue go on). Two filters of different names are two plugins, whatever their
/// `vm_config`.
pub fn plugin(name: &str) -> Rc<Plugin> {
    PLUGINS.with(|p| {
        p.borrow_mut()
            .entry(name.to_string())
            .or_insert_with(|| Rc::new(Plugin::default()))
            .clone()
    })
}

/// What one plugin (one apisec filter, by its name) keeps for its streams. Envoy runs two
/// apisec filters in one VM when their `vm_config` is the same (same `vm_id`, code and
/// environment) even if their policies differ, and what is here must be each one's own: a
/// stream is decided under its own filter's policy, sealed into its own filter's chain and
/// counted for its own filter's cluster store (a VM-wide policy let a body on one listener be
/// decided under the other listener's policy).
pub struct Plugin {
    /// The policy this plugin loaded last: a stream whose body completes after a reload is
    /// decided under it, not under the one its headers saw.
    pub current: RefCell<Option<Config>>,
    /// Response byte counts of ended streams not yet sent to the cluster store (anomaly.rs).
    pub tally: RefCell<Vec<Op>>,
    /// This plugin's audit chain on this worker (LOG-1), kept across policy reloads; named by
    /// 64 random bits when the plugin starts.
    pub chain: RefCell<Chain>,
    /// The gauges this plugin's last policy set (policy version, credentials' ends).
    pub gauges: crate::metrics::PolicyGauges,
}

impl Default for Plugin {
    fn default() -> Self {
        Plugin {
            current: RefCell::new(None),
            tally: RefCell::new(Vec::new()),
            chain: RefCell::new(Chain::new(&chain_name())),
            gauges: crate::metrics::PolicyGauges::default(),
        }
    }
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
