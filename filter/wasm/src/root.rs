//! The root context: loads a policy (refusing a bad one so Envoy keeps the last good one),
//! opens the state store, keeps the counters, and makes one lifecycle per stream.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use apisec_core::cluster::{self, Decoded, GaugeAnswer, StateBackend};
use apisec_core::lifecycle::{Config, Stream};
use apisec_core::metrics;
use apisec_core::state::Batch;
use apisec_core::store::StoreMeta;
use apisec_core::Policy;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel};

use crate::host::{
    call_body, call_status, log, now_secs, send_call, EnvSecrets, EnvoyStore, EnvoyVerifier,
};
use crate::metrics::Metrics;
use crate::stream::ApisecHttp;
use crate::worker::{Plugin, GENERATION};

/// The root context's tick: each one takes the next step of a gauge pass, so that a pass over
/// a large store is many short calls (issue 24: one 128-key step was ~1.5M instructions in one
/// call, and requests queued behind it on the worker).
const TICK: std::time::Duration = std::time::Duration::from_millis(100);
/// Ticks per second: the once-a-second work (counters to Envoy's stats, starting a gauge pass,
/// the cluster store's byte counts, the chain checkpoint) runs on every tenth.
const TICKS_PER_SECOND: u64 = 10;

#[derive(Default)]
pub struct ApisecRoot {
    config: Option<Config>,
    /// What this plugin's streams share: its policy in force, chain and byte-count queue.
    plugin: Rc<Plugin>,
    metrics: Option<Rc<Metrics>>,
    verifier: Option<Rc<EnvoyVerifier>>,
    /// The cluster store's epoch is known to exist (it is created by the first batch any
    /// replica runs; this worker runs an empty one as soon as it has a cluster policy, so the
    /// epoch predates the first request).
    cluster_opened: bool,
    opening: Option<u32>,
    /// Ticks since the audit chain's head was last written to Envoy's log.
    since_checkpoint: u64,
    /// This worker's pass over the state store for the gauges, while one goes on.
    gauges: Option<metrics::GaugePass>,
    /// The byte counts in flight to the cluster store: the callout's token and what it carries
    /// (put back in the queue if the store does not take them).
    tallying: Option<(u32, Batch, bool)>,
    /// The cluster store lacked the script: the next byte counts go with its text.
    tally_full: bool,
    /// The gauges' callout to the cluster store in flight: its token and whether the script's
    /// text went with it; the next goes with the text when the store lacked it.
    gauging: Option<(u32, bool)>,
    gauge_full: bool,
    /// Ticks since the VM started.
    ticks: u64,
}

impl ApisecRoot {
    /// Every `audit.checkpoint_seconds` (and when the VM stops), the chain's head goes to
    /// Envoy's log if it moved: a tail cut off the audit log is then found missing (LOG-1).
    fn checkpoint(&mut self, now_anyway: bool) {
        let Some(config) = &self.config else { return };
        if config.policy.audit.key.is_none() {
            return;
        }
        self.since_checkpoint += 1;
        if !now_anyway && self.since_checkpoint < config.policy.audit.checkpoint_seconds {
            return;
        }
        self.since_checkpoint = 0;
        let Some(now) = now_secs() else { return };
        if let Some(line) = self.plugin.chain.borrow_mut().checkpoint(now) {
            log(LogLevel::Info, &line);
        }
    }

    /// Sends the byte counts ended streams left for the cluster store, one callout at a time.
    fn flush_tally(&mut self) {
        if self.tallying.is_some() {
            return;
        }
        let Some(config) = &self.config else { return };
        let StateBackend::Cluster(settings) = &config.policy.state else {
            self.plugin.tally.borrow_mut().clear();
            return;
        };
        let Some(now) = now_secs() else { return };
        let ops = std::mem::take(&mut *self.plugin.tally.borrow_mut());
        if ops.is_empty() {
            return;
        }
        let batch = Batch { ops, now };
        let full = std::mem::take(&mut self.tally_full);
        let call = cluster::encode(&config.policy.cluster_params(), settings, &batch, full);
        match send_call(&call) {
            Ok(token) => self.tallying = Some((token, batch, full)),
            Err(e) => {
                log(
                    LogLevel::Warn,
                    &format!("apisec: response byte counts not sent to the cluster store: {e:?}"),
                );
                self.requeue(batch, now);
            }
        }
    }

    /// Byte counts the store did not take, back in the queue for the next tick.
    fn requeue(&mut self, batch: Batch, now: u64) {
        let _ = apisec_core::anomaly::pend(&mut self.plugin.tally.borrow_mut(), batch.ops, now);
    }

    fn open_cluster(&mut self) {
        if self.cluster_opened || self.opening.is_some() {
            return;
        }
        let Some(config) = &self.config else { return };
        let StateBackend::Cluster(settings) = &config.policy.state else {
            return;
        };
        cluster::prepare();
        let Some(now) = now_secs() else { return };
        let batch = Batch { ops: vec![], now };
        let call = cluster::encode(&config.policy.cluster_params(), settings, &batch, true);
        match send_call(&call) {
            Ok(token) => self.opening = Some(token),
            Err(e) => log(
                LogLevel::Warn,
                &format!("apisec: cluster state store not reachable yet: {e:?}"),
            ),
        }
    }
}

/// Opens the state store for a policy (`local::open`: its record, its replay slots, the ban
/// fingerprints keyed with its salt). A layout the running store cannot take is refused.
fn open_store(policy: &mut Policy) -> Result<StoreMeta, String> {
    let now = now_secs().ok_or("no clock")?;
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| format!("no random source: {e}"))?;
    apisec_core::local::open(&EnvoyStore, salt, now, policy)
}

impl Context for ApisecRoot {
    fn on_http_call_response(&mut self, token: u32, _: usize, body_size: usize, _: usize) {
        if let Some((sent, full)) = self.gauging {
            if sent == token {
                self.gauging = None;
                let body = call_body(body_size);
                match cluster::decode_gauges(full, call_status, &body) {
                    GaugeAnswer::Counts(counts) => {
                        if let (Some(m), Some(config)) = (&self.metrics, &self.config) {
                            m.gauges(metrics::cluster_gauges(&config.policy, &counts));
                        }
                    }
                    GaugeAnswer::LoadScript => self.gauge_full = true,
                    GaugeAnswer::Failed(why) => log(
                        LogLevel::Warn,
                        &format!("apisec: gauges not read from the cluster store: {why}"),
                    ),
                }
                return;
            }
        }
        if let Some((sent, batch, full)) = self.tallying.take() {
            if sent == token {
                let body = call_body(body_size);
                let now = now_secs().unwrap_or(batch.now);
                match cluster::decode(&batch, full, call_status, &body) {
                    Decoded::Answer(a) if a.refused.is_none() => {}
                    Decoded::LoadScript => {
                        self.tally_full = true;
                        self.requeue(batch, now);
                    }
                    Decoded::Answer(a) => {
                        let why = a.refused.map(|d| d.detail).unwrap_or_default();
                        log(
                            LogLevel::Warn,
                            &format!("apisec: response byte counts not taken by the cluster store ({why}); kept for the next try"),
                        );
                        self.requeue(batch, now);
                    }
                }
                return;
            }
            self.tallying = Some((sent, batch, full));
        }
        if self.opening != Some(token) {
            return;
        }
        self.opening = None;
        let body = call_body(body_size);
        if self.config.is_none() {
            return;
        }
        let batch = Batch::default();
        match cluster::decode(&batch, true, call_status, &body) {
            Decoded::Answer(a) if a.refused.is_none() => {
                self.cluster_opened = true;
                log(LogLevel::Info, "apisec: cluster state store answered");
            }
            decoded => log(
                LogLevel::Warn,
                &format!(
                    "apisec: cluster state store did not answer as expected ({}); requests are \
                     refused state_unavailable until it does",
                    cluster::why_not(decoded)
                ),
            ),
        }
    }

    fn on_done(&mut self) -> bool {
        if let Some(m) = &self.metrics {
            m.flush();
        }
        self.checkpoint(true);
        true
    }
}

impl RootContext for ApisecRoot {
    /// Refusing here (false) makes Envoy reject the new config and keep the last good one.
    fn on_configure(&mut self, size: usize) -> bool {
        let text = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            _ => {
                log(
                    LogLevel::Error,
                    "apisec: policy refused: no plugin configuration",
                );
                return false;
            }
        };
        let mut policy = match Policy::from_json(&text, &EnvSecrets) {
            Ok(p) => p,
            Err(e) => {
                log(LogLevel::Error, &format!("apisec: policy refused: {e}"));
                return false;
            }
        };
        let meta = match open_store(&mut policy) {
            Ok(m) => m,
            Err(e) => {
                log(LogLevel::Error, &format!("apisec: policy refused: {e}"));
                return false;
            }
        };
        policy.generation = GENERATION.with(|g| {
            g.set(g.get() + 1);
            g.get()
        });
        log(
            LogLevel::Info,
            &format!("apisec: policy loaded: {} APIs", policy.apis().len()),
        );
        let config = Config {
            policy: Arc::new(policy),
            meta: Arc::new(meta),
        };
        // The plugin's state by its name: a reload's new root context takes over the old one's.
        let name = hostcalls::get_property(vec!["plugin_name"])
            .ok()
            .flatten()
            .map(|n| String::from_utf8_lossy(&n).into_owned())
            .unwrap_or_default();
        self.plugin = crate::worker::plugin(&name);
        *self.plugin.current.borrow_mut() = Some(config.clone());
        self.config = Some(config);
        if self.metrics.is_none() {
            let per_code = self
                .config
                .as_ref()
                .is_some_and(|c| c.policy.per_code_counters);
            self.metrics = Some(Rc::new(Metrics::define(per_code)));
            let _ = hostcalls::set_tick_period(TICK);
        }
        if let (Some(m), Some(c)) = (&self.metrics, &self.config) {
            m.policy_loaded(text.as_bytes(), &c.policy, &self.plugin.gauges);
        }
        self.cluster_opened = false;
        self.open_cluster();
        if self.verifier.is_none() {
            self.verifier = Some(Rc::new(EnvoyVerifier {
                warned: Cell::new(false),
            }));
        }
        true
    }

    fn on_tick(&mut self) {
        self.ticks = self.ticks.wrapping_add(1);
        let second = self.ticks.is_multiple_of(TICKS_PER_SECOND);
        if let (Some(m), Some(config)) = (&self.metrics, &self.config) {
            if second {
                m.flush();
            }
            if let Some(now) = now_secs() {
                if let StateBackend::Cluster(settings) = &config.policy.state {
                    if second && self.gauging.is_none() && metrics::gauge_turn(&EnvoyStore, now) {
                        let full = std::mem::take(&mut self.gauge_full);
                        let call = cluster::encode_gauges(
                            &config.policy.cluster_params(),
                            settings,
                            config.policy.app_ids(),
                            now,
                            full,
                        );
                        if let Ok(token) = send_call(&call) {
                            self.gauging = Some((token, full));
                        }
                    }
                } else if second && self.gauges.is_none() && metrics::gauge_turn(&EnvoyStore, now) {
                    self.gauges = Some(metrics::GaugePass::default());
                }
                if let Some(pass) = &mut self.gauges {
                    if let Some(values) = pass.step(&config.policy, &EnvoyStore, now) {
                        m.gauges(values);
                        self.gauges = None;
                    } else if second {
                        metrics::gauge_hold(&EnvoyStore, now);
                    }
                }
            }
        }
        if second {
            self.open_cluster();
            self.flush_tally();
            self.checkpoint(false);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let (Some(config), Some(metrics), Some(verifier)) =
            (&self.config, &self.metrics, &self.verifier)
        else {
            return None; // never configured: Envoy's failure policy (FAIL_CLOSED) applies
        };
        Some(Box::new(ApisecHttp {
            stream: Stream::new(config.clone()),
            plugin: self.plugin.clone(),
            metrics: metrics.clone(),
            verifier: verifier.clone(),
            pending: None,
            on_response: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
