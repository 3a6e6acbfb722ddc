//! A filter configuration (one `config_new`, one policy): the policy loaded and refused when
//! bad (Envoy then rejects the configuration and keeps the last good one), the state store
//! opened, the stats defined, and a ticker for the once-a-second work on Envoy's main thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use apisec_core::cluster::{self, Decoded, GaugeAnswer, StateBackend};
use apisec_core::lifecycle::{self, Config};
use apisec_core::metrics::{self, GaugePass};
use apisec_core::state::Batch;
use apisec_core::Policy;

use crate::abi;
use crate::clock::now_secs;
use crate::envoy::{self, ConfigHandle, Scheduler};
use crate::host::EnvSecrets;
use crate::metrics::Metrics;
use crate::plugin::{plugin, Plugin};
use crate::store::store;

/// Gauge-pass steps per tick (a tick a second; the Wasm build takes one step per 100 ms tick).
const STEPS_PER_TICK: usize = 10;

/// How many policies this process has loaded (a policy's generation).
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Envoy calls a configuration's hooks from every worker and the main thread: what it holds
/// must be shareable (checked here at compile time, since Envoy's pointer hides it from Rust).
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<FilterConfig>();
};

pub struct FilterConfig {
    pub envoy: ConfigHandle,
    pub config: Config,
    pub plugin: Arc<Plugin>,
    pub metrics: Metrics,
    /// The once-a-second ticker's scheduler (None once the configuration is destroyed).
    ticker: Arc<Mutex<Option<Scheduler>>>,
    /// This configuration's pass over the store for the gauges, while one goes on.
    gauges: Mutex<Option<GaugePass>>,
    /// Its callouts to the cluster store from the main thread.
    calls: Mutex<ConfigCalls>,
}

/// The configuration's own callouts to the cluster store (as the Wasm glue's root context
/// makes them): the first, empty batch that creates the store's epoch before any request, the
/// byte counts ended streams left, and the gauges' counts.
#[derive(Default)]
struct ConfigCalls {
    opened: bool,
    opening: Option<u64>,
    /// In flight: the callout, the byte counts it carries (put back if not taken), the text.
    tallying: Option<(u64, Batch, bool)>,
    tally_full: bool,
    gauging: Option<(u64, bool)>,
    gauge_full: bool,
}

impl FilterConfig {
    /// Loads a policy; an error refuses the configuration (Envoy keeps the last good one).
    pub fn load(envoy: ConfigHandle, name: &str, text: &[u8]) -> Result<FilterConfig, String> {
        let text = std::str::from_utf8(text).map_err(|_| "the policy is not UTF-8".to_string())?;
        let mut policy = Policy::from_json(text, &EnvSecrets).map_err(|e| e.to_string())?;
        let now = now_secs().ok_or("no clock")?;
        let mut salt = [0u8; 16];
        getrandom::getrandom(&mut salt).map_err(|e| format!("no random source: {e}"))?;
        let meta = apisec_core::local::open(store(), salt, now, &mut policy)?;
        policy.generation = GENERATION.fetch_add(1, Ordering::Relaxed) + 1;
        if let StateBackend::Cluster(_) = &policy.state {
            cluster::prepare();
        }
        let config = Config {
            policy: Arc::new(policy),
            meta: Arc::new(meta),
        };
        let plugin = plugin(name);
        if let Ok(mut c) = plugin.current.lock() {
            *c = Some(config.clone());
        }
        let metrics = Metrics::define(envoy, config.policy.per_code_counters);
        let fc = FilterConfig {
            envoy,
            config,
            plugin,
            metrics,
            ticker: Arc::new(Mutex::new(None)),
            gauges: Mutex::new(None),
            calls: Mutex::new(ConfigCalls::default()),
        };
        fc.policy_gauges(text.as_bytes());
        envoy::log(
            abi::LOG_INFO,
            &format!(
                "apisec: policy loaded: {} APIs",
                fc.config.policy.apis().len()
            ),
        );
        Ok(fc)
    }

    /// The policy's version and its credentials' ends (OPS-2); the series the plugin's last
    /// policy set and this one does not go to 0. Every registered app's eviction counter
    /// exists at zero.
    fn policy_gauges(&self, text: &[u8]) {
        let policy = &self.config.policy;
        let mut values = vec![(metrics::policy_info(text), 1)];
        values.extend(metrics::credential_not_after(policy));
        if let Ok(mut last) = self.plugin.gauges.lock() {
            let gone: Vec<(String, u64)> = last
                .iter()
                .filter(|old| !values.iter().any(|(n, _)| n == *old))
                .map(|old| (old.clone(), 0))
                .collect();
            self.metrics.gauges(self.envoy, &gone);
            *last = values.iter().map(|(n, _)| n.clone()).collect();
        }
        self.metrics.gauges(self.envoy, &values);
        for app in policy.app_ids() {
            self.metrics
                .zero(self.envoy, &metrics::sessions_evicted(&metrics::label(app)));
        }
    }

    /// Starts the ticker: a thread that asks Envoy's main thread for a tick at once and then
    /// every second, until the configuration is destroyed. The first tick opens the cluster
    /// store (its epoch) before the listener serves, as the Wasm build's configure does: a
    /// request the store sees first would set the epoch itself, and one signed in the second
    /// before would be refused as older than the store.
    pub fn start_ticker(&self) {
        let scheduler = self.envoy.scheduler();
        if let Ok(mut t) = self.ticker.lock() {
            *t = Some(scheduler);
        }
        let ticker = Arc::downgrade(&self.ticker);
        let spawned = std::thread::Builder::new()
            .name("apisec-ticker".into())
            .spawn(move || loop {
                {
                    let Some(t) = ticker.upgrade() else { return };
                    let Ok(guard) = t.lock() else { return };
                    match guard.as_ref() {
                        Some(s) => s.commit(0),
                        None => return,
                    }
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            });
        if spawned.is_err() {
            envoy::log(
                abi::LOG_WARN,
                "apisec: no ticker thread: chain checkpoints and gauges wait for traffic",
            );
        }
    }

    /// Stops the ticker (the configuration is being destroyed): no event is committed after.
    pub fn stop_ticker(&self) {
        if let Ok(mut t) = self.ticker.lock() {
            if let Some(s) = t.take() {
                s.delete();
            }
        }
    }

    /// Once a second, on Envoy's main thread: the chains' checkpoints and the store's gauges.
    pub fn tick(&self) {
        self.metrics.flush(self.envoy);
        let Some(now) = now_secs() else { return };
        self.checkpoint(now, false);
        if let StateBackend::Cluster(_) = &self.config.policy.state {
            self.cluster_tick(now);
            return;
        }
        let Ok(mut pass) = self.gauges.lock() else {
            return;
        };
        if pass.is_none() && metrics::gauge_turn(store(), now) {
            *pass = Some(GaugePass::default());
        }
        // At the Wasm build's pace (GAUGE_KEYS_PER_TICK keys ten times a second): the main
        // thread serves no request, but a whole pass at once is a burst of CPU every round.
        if let Some(p) = pass.as_mut() {
            for _ in 0..STEPS_PER_TICK {
                if let Some(values) = p.step(&self.config.policy, store(), now) {
                    self.metrics.gauges(self.envoy, &values);
                    *pass = None;
                    return;
                }
            }
            metrics::gauge_hold(store(), now);
        }
    }

    /// Every `audit.checkpoint_seconds` (and when the configuration goes), each chain's head
    /// goes to Envoy's log if it moved: a tail cut off the audit log is then found (LOG-1).
    pub fn checkpoint(&self, now: u64, now_anyway: bool) {
        if self.config.policy.audit.key.is_none() {
            return;
        }
        let last = self.plugin.checkpointed_at.load(Ordering::Relaxed);
        let due = now >= last.saturating_add(self.config.policy.audit.checkpoint_seconds);
        if !(now_anyway || due)
            || self
                .plugin
                .checkpointed_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        for chain in &self.plugin.chains {
            let line = match chain.lock() {
                Ok(mut c) => c.checkpoint(now),
                Err(_) => None,
            };
            if let Some(line) = line {
                envoy::log(abi::LOG_INFO, &line);
            }
        }
    }

    /// Sends one call to the cluster store from the configuration; None when Envoy refused it.
    fn send(&self, call: &cluster::Call, what: &str) -> Option<u64> {
        let headers = lifecycle::header_pairs(&call.headers);
        match self
            .envoy
            .callout(&call.cluster, &headers, &call.body, call.timeout_ms)
        {
            Ok(id) => Some(id),
            Err(code) => {
                envoy::log(
                    abi::LOG_WARN,
                    &format!("apisec: {what}: callout refused (Envoy code {code})"),
                );
                None
            }
        }
    }

    /// The cluster store's part of the tick: open it, send the byte counts, read the gauges.
    fn cluster_tick(&self, now: u64) {
        let StateBackend::Cluster(settings) = &self.config.policy.state else {
            return;
        };
        let policy = &self.config.policy;
        let Ok(mut calls) = self.calls.lock() else {
            return;
        };
        if !calls.opened && calls.opening.is_none() {
            let call = cluster::encode(
                &policy.cluster_params(),
                settings,
                &Batch { ops: vec![], now },
                true,
            );
            calls.opening = self.send(&call, "cluster state store not reachable yet");
        }
        if calls.tallying.is_none() {
            let ops = match self.plugin.tally.lock() {
                Ok(mut t) => std::mem::take(&mut *t),
                Err(_) => Vec::new(),
            };
            if !ops.is_empty() {
                let batch = Batch { ops, now };
                let full = std::mem::take(&mut calls.tally_full);
                let call = cluster::encode(&policy.cluster_params(), settings, &batch, full);
                match self.send(&call, "response byte counts not sent to the cluster store") {
                    Some(id) => calls.tallying = Some((id, batch, full)),
                    None => self.plugin.pend_tally(batch),
                }
            }
        }
        if calls.gauging.is_none() && metrics::gauge_turn(store(), now) {
            let full = std::mem::take(&mut calls.gauge_full);
            let call = cluster::encode_gauges(
                &policy.cluster_params(),
                settings,
                policy.app_ids(),
                now,
                full,
            );
            calls.gauging = self
                .send(&call, "gauges not read from the cluster store")
                .map(|id| (id, full));
        }
    }

    /// A callout of the configuration's answered (main thread).
    pub fn callout_done(&self, id: u64, status: Option<&str>, body: &[u8]) {
        let Ok(mut calls) = self.calls.lock() else {
            return;
        };
        if let Some((sent, full)) = calls.gauging {
            if sent == id {
                calls.gauging = None;
                match cluster::decode_gauges(full, status, body) {
                    GaugeAnswer::Counts(counts) => self.metrics.gauges(
                        self.envoy,
                        &metrics::cluster_gauges(&self.config.policy, &counts),
                    ),
                    GaugeAnswer::LoadScript => calls.gauge_full = true,
                    GaugeAnswer::Failed(why) => envoy::log(
                        abi::LOG_WARN,
                        &format!("apisec: gauges not read from the cluster store: {why}"),
                    ),
                }
                return;
            }
        }
        if let Some((sent, batch, full)) = calls.tallying.take() {
            if sent == id {
                match cluster::decode(&batch, full, status, body) {
                    Decoded::Answer(a) if a.refused.is_none() => {}
                    Decoded::LoadScript => {
                        calls.tally_full = true;
                        self.plugin.pend_tally(batch);
                    }
                    Decoded::Answer(a) => {
                        let why = a.refused.map(|d| d.detail).unwrap_or_default();
                        envoy::log(
                            abi::LOG_WARN,
                            &format!("apisec: response byte counts not taken by the cluster store ({why}); kept for the next try"),
                        );
                        self.plugin.pend_tally(batch);
                    }
                }
                return;
            }
            calls.tallying = Some((sent, batch, full));
        }
        if calls.opening == Some(id) {
            calls.opening = None;
            match cluster::decode(&Batch::default(), true, status, body) {
                Decoded::Answer(a) if a.refused.is_none() => {
                    calls.opened = true;
                    envoy::log(abi::LOG_INFO, "apisec: cluster state store answered");
                }
                decoded => envoy::log(
                    abi::LOG_WARN,
                    &format!(
                        "apisec: cluster state store did not answer as expected ({}); requests are \
                         refused state_unavailable until it does",
                        cluster::why_not(decoded)
                    ),
                ),
            }
        }
    }
}
