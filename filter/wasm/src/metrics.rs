//! The filter's metrics in Envoy's stats.
//!
//! Labelled (core `metrics.rs` names them): `apisec.requests_total`, request and response bytes,
//! the latency histogram, shadow-API calls, the policy version, and the local store's gauges.
//! A series is defined the first time it is needed and kept by name; counters are summed in the
//! VM and added to Envoy's once a second by the root context's tick, so a request costs one
//! host call (its latency sample).
//!
//! Unlabelled, one fixed list: `apisec.allowed`, `apisec.denied`,
//! `apisec.denied.<code>`, `apisec.reported`, `apisec.reported.<code>` (report mode: would
//! have been refused), `apisec.bans_started`, `apisec.abandoned`, `apisec.sessions_evicted`. Refusals are counted at
//! once; allowed requests (the hot path) are summed in the VM and added to Envoy's counter once
//! a second by the root context's tick, saving a host call per request.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use apisec_core::lifecycle::Count;
use apisec_core::metrics::{self as series, Sample};
use apisec_core::DenyReason;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

pub struct Metrics {
    allowed: Option<u32>,
    allowed_pending: Cell<u64>,
    denied: Option<u32>,
    bans: Option<u32>,
    abandoned: Option<u32>,
    by_reason: Vec<(DenyReason, u32)>,
    reported: Option<u32>,
    reported_by_reason: Vec<(DenyReason, u32)>,
    sessions_evicted: Option<u32>,
    /// Labelled series defined so far, by stat name (bounded: see `MAX_SERIES`).
    defined: RefCell<HashMap<String, u32>>,
    /// How many SDK-version series each app's calls defined (`MAX_SDK_VERSIONS_PER_APP`).
    sdk_versions: RefCell<HashMap<String, usize>>,
    /// Counter increments not yet added to Envoy's stats, by series (the rarer series).
    pending: RefCell<HashMap<u32, u64>>,
    /// The series every request adds to, by app and API: found by the labels a request
    /// carries, so that a request formats no stat name once its series exist.
    per_api: RefCell<HashMap<u64, Vec<ApiSeries>, BuildHasherDefault<Prehashed>>>,
    dropped: Option<u32>,
}

/// The gauges a plugin's last policy set, kept with the plugin (worker.rs) rather than the
/// root context: Envoy gives a new policy (an ECDS update) a new root context, whose own
/// memory would not know the old policy's series, which would then keep their values beside
/// the new ones (issue 21 item 9).
#[derive(Default)]
pub struct PolicyGauges {
    /// The policy version series set to 1 last (its stat name).
    version: RefCell<Option<String>>,
    /// The credential-end series set last (a credential dropped from the policy goes to 0).
    credentials: RefCell<Vec<String>>,
}

/// The most labelled series one VM defines. The policy bounds the label values (apps, APIs,
/// codes); this bounds what a policy with very many of them can cost Envoy's stats. Samples
/// for series past the bound are counted in `apisec.metrics_series_dropped`.
const MAX_SERIES: usize = 20_000;

/// One app and API's request series: bytes, latency, and the request counter per outcome,
/// with the increments not yet added to Envoy's stats beside their ids.
struct ApiSeries {
    app: String,
    api: String,
    bytes_in: Option<u32>,
    bytes_out: Option<u32>,
    duration: Option<u32>,
    pending_in: u64,
    pending_out: u64,
    /// By level, decision and code (closed sets: a handful per API).
    requests: Vec<Outcome>,
    /// The responses to calls let through, by status class: the class, its series, pending.
    backend: Vec<(&'static str, Option<u32>, u64)>,
    /// This app's calls here by SDK version (MON-7): the version label, its series, pending.
    sdk: Vec<(String, Option<u32>, u64)>,
}

/// Adds one to the entry for `key` (a status class, an SDK version), making the entry with its
/// series the first time the key is seen.
fn count_by<K, Q>(
    entries: &mut Vec<(K, Option<u32>, u64)>,
    key: &Q,
    make: impl FnOnce() -> (K, Option<u32>),
) where
    K: std::borrow::Borrow<Q>,
    Q: PartialEq + ?Sized,
{
    match entries.iter_mut().find(|(k, _, _)| k.borrow() == key) {
        Some((_, _, pending)) => add(pending, 1),
        None => {
            let (k, id) = make();
            entries.push((k, id, 1));
        }
    }
}

struct Outcome {
    level: &'static str,
    decision: &'static str,
    code: &'static str,
    id: Option<u32>,
    pending: u64,
}

/// FNV-1a over the app and API labels: the key of their series (labels are a few dozen bytes;
/// hashing them with the map's default SipHash cost more than the lookup saves). A collision
/// only shares a bucket: entries are told apart by their labels.
fn key_of(app: &str, api: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in app.bytes().chain([0xff]).chain(api.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The hasher of a map whose keys are hashes already.
#[derive(Default)]
struct Prehashed(u64);
impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

fn add(v: &mut u64, n: u64) {
    *v = v.saturating_add(n);
}

impl Metrics {
    /// The fixed counters; the per-code ones only when the policy asks for them
    /// (`gateway.per_code_counters`).
    pub fn define(per_code: bool) -> Self {
        let def = |name: &str| hostcalls::define_metric(MetricType::Counter, name).ok();
        Metrics {
            allowed: def("apisec.allowed"),
            allowed_pending: Cell::new(0),
            denied: def("apisec.denied"),
            bans: def("apisec.bans_started"),
            abandoned: def("apisec.abandoned"),
            by_reason: DenyReason::ALL
                .iter()
                .filter(|_| per_code)
                .filter_map(|r| def(&format!("apisec.denied.{}", r.code())).map(|id| (*r, id)))
                .collect(),
            reported: def("apisec.reported"),
            sessions_evicted: def("apisec.sessions_evicted"),
            reported_by_reason: DenyReason::ALL
                .iter()
                .filter(|r| per_code && apisec_core::report::reportable(**r))
                .filter_map(|r| def(&format!("apisec.reported.{}", r.code())).map(|id| (*r, id)))
                .collect(),
            defined: RefCell::new(HashMap::new()),
            sdk_versions: RefCell::new(HashMap::new()),
            pending: RefCell::new(HashMap::new()),
            per_api: RefCell::new(HashMap::default()),
            dropped: def("apisec.metrics_series_dropped"),
        }
    }

    /// The id of a labelled series, defined on first use.
    fn series(&self, name: String, kind: MetricType) -> Option<u32> {
        let mut defined = self.defined.borrow_mut();
        if let Some(id) = defined.get(&name) {
            return Some(*id);
        }
        if defined.len() >= MAX_SERIES {
            Self::bump(self.dropped);
            return None;
        }
        let id = hostcalls::define_metric(kind, &name).ok()?;
        defined.insert(name, id);
        Some(id)
    }

    /// The series of an app's calls with the SDK version it named (MON-7); past
    /// `MAX_SDK_VERSIONS_PER_APP` versions of one app, a new one counts as `other`.
    fn sdk_series(&self, s: &Sample, version: &str) -> Option<u32> {
        let name = s.sdk_calls(version);
        if let Some(id) = self.defined.borrow().get(&name) {
            return Some(*id);
        }
        let full = {
            let mut per_app = self.sdk_versions.borrow_mut();
            let n = per_app.entry(s.app.clone()).or_insert(0);
            let full = *n >= series::MAX_SDK_VERSIONS_PER_APP;
            if !full {
                *n += 1;
            }
            full
        };
        let name = if full { s.sdk_calls("other") } else { name };
        self.series(name, MetricType::Counter)
    }

    fn later(&self, name: String, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(id) = self.series(name, MetricType::Counter) {
            let mut pending = self.pending.borrow_mut();
            let v = pending.entry(id).or_insert(0);
            *v = v.saturating_add(n);
        }
    }

    /// What one request adds: counted now, reaching Envoy with the next flush; its latency
    /// goes to the histogram at once.
    pub fn sample(&self, s: &Sample) {
        let duration = {
            let mut per_api = self.per_api.borrow_mut();
            let bucket = per_api.entry(key_of(&s.app, &s.api)).or_default();
            let found = bucket.iter().position(|a| a.app == s.app && a.api == s.api);
            let i = match found {
                Some(i) => i,
                None => {
                    bucket.push(ApiSeries {
                        app: s.app.clone(),
                        api: s.api.clone(),
                        bytes_in: self
                            .series(s.per_api(series::REQUEST_BYTES), MetricType::Counter),
                        bytes_out: self
                            .series(s.per_api(series::RESPONSE_BYTES), MetricType::Counter),
                        duration: self.series(s.per_api(series::DURATION), MetricType::Histogram),
                        pending_in: 0,
                        pending_out: 0,
                        requests: Vec::new(),
                        backend: Vec::new(),
                        sdk: Vec::new(),
                    });
                    bucket.len() - 1
                }
            };
            let Some(api) = bucket.get_mut(i) else {
                return;
            };
            add(&mut api.pending_in, s.bytes_in);
            add(&mut api.pending_out, s.bytes_out);
            let found = api
                .requests
                .iter()
                .position(|o| o.level == s.level && o.decision == s.decision && o.code == s.code);
            let i = match found {
                Some(i) => i,
                None => {
                    api.requests.push(Outcome {
                        level: s.level,
                        decision: s.decision,
                        code: s.code,
                        id: self.series(s.requests(), MetricType::Counter),
                        pending: 0,
                    });
                    api.requests.len() - 1
                }
            };
            if let Some(o) = api.requests.get_mut(i) {
                add(&mut o.pending, 1);
                if o.id.is_none() {
                    Self::bump(self.dropped);
                }
            }
            if let Some(class) = s.backend_status {
                count_by(&mut api.backend, class, || {
                    let name = s.backend_responses();
                    (
                        class,
                        name.and_then(|n| self.series(n, MetricType::Counter)),
                    )
                });
            }
            if let Some(version) = &s.sdk_version {
                count_by(&mut api.sdk, version.as_str(), || {
                    (version.clone(), self.sdk_series(s, version))
                });
            }
            api.duration
        };
        if let (Some(id), Some(ms)) = (duration, s.duration_ms) {
            let _ = hostcalls::record_metric(id, ms);
        }
        if s.shadow {
            self.later(s.shadow(), 1);
        }
        for name in s.anomalies() {
            self.later(name, 1);
        }
        for name in s.rate_limited() {
            self.later(name, 1);
        }
        if let Some(name) = s.sdk_outdated() {
            self.later(name, 1);
        }
        if let Some(name) = s.sessions_evicted() {
            self.later(name, 1);
        }
    }

    /// The loaded policy's version (`apisec_policy_info{version} 1`; the one before goes to 0)
    /// and its credentials' ends (OPS-2; one the policy no longer has reads 0, like no end),
    /// remembered in the plugin's `gauges`. Also defines every registered app's eviction
    /// counter at zero.
    pub fn policy_loaded(
        &self,
        policy_text: &[u8],
        policy: &apisec_core::policy::Policy,
        gauges: &PolicyGauges,
    ) {
        let name = series::policy_info(policy_text);
        let id = self.series(name.clone(), MetricType::Gauge);
        let old = gauges.version.replace(Some(name.clone()));
        if let Some(old) = old.filter(|o| *o != name) {
            if let Some(old_id) = self.series(old, MetricType::Gauge) {
                let _ = hostcalls::record_metric(old_id, 0);
            }
        }
        if let Some(id) = id {
            let _ = hostcalls::record_metric(id, 1);
        }
        for app in policy.app_ids() {
            let name = apisec_core::metrics::sessions_evicted(&apisec_core::metrics::label(app));
            let _ = self.series(name, MetricType::Counter);
        }
        let ends = apisec_core::metrics::credential_not_after(policy);
        let gone: Vec<(String, u64)> = gauges
            .credentials
            .replace(ends.iter().map(|(n, _)| n.clone()).collect())
            .into_iter()
            .filter(|old| !ends.iter().any(|(n, _)| n == old))
            .map(|old| (old, 0))
            .collect();
        self.gauges(gone);
        self.gauges(ends);
    }

    /// Sets gauges to what was measured.
    pub fn gauges(&self, values: Vec<(String, u64)>) {
        for (name, v) in values {
            if let Some(id) = self.series(name, MetricType::Gauge) {
                let _ = hostcalls::record_metric(id, v);
            }
        }
    }
    fn increment(id: Option<u32>, n: u64) {
        if let (Some(id), true) = (id, n > 0) {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    fn bump(id: Option<u32>) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }
    fn allowed(&self) {
        self.allowed_pending
            .set(self.allowed_pending.get().saturating_add(1));
    }
    /// Adds the allowed requests summed since the last flush to Envoy's counter.
    pub fn flush(&self) {
        let n = self.allowed_pending.replace(0);
        if let (Some(id), true) = (self.allowed, n > 0) {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
        for (id, n) in self.pending.borrow_mut().drain() {
            Self::increment(Some(id), n);
        }
        for api in self.per_api.borrow_mut().values_mut().flatten() {
            Self::increment(api.bytes_in, std::mem::take(&mut api.pending_in));
            Self::increment(api.bytes_out, std::mem::take(&mut api.pending_out));
            for o in &mut api.requests {
                Self::increment(o.id, std::mem::take(&mut o.pending));
            }
            for (_, id, pending) in &mut api.backend {
                Self::increment(*id, std::mem::take(pending));
            }
            for (_, id, pending) in &mut api.sdk {
                Self::increment(*id, std::mem::take(pending));
            }
        }
    }
    fn banned(&self) {
        Self::bump(self.bans);
    }
    fn abandoned(&self) {
        Self::bump(self.abandoned);
    }
    fn denied(&self, reason: DenyReason) {
        Self::bump(self.denied);
        Self::bump(Self::of(&self.by_reason, reason));
    }
    fn reported(&self, reason: DenyReason) {
        Self::bump(self.reported);
        Self::bump(Self::of(&self.reported_by_reason, reason));
    }
    fn of(ids: &[(DenyReason, u32)], reason: DenyReason) -> Option<u32> {
        ids.iter().find(|(r, _)| *r == reason).map(|(_, id)| *id)
    }
    /// Adds what a lifecycle step counted.
    pub fn add(&self, counts: &[Count]) {
        for c in counts {
            match c {
                Count::Allowed => self.allowed(),
                Count::Denied(r) => self.denied(*r),
                Count::BanStarted => self.banned(),
                Count::Abandoned => self.abandoned(),
                Count::Reported(r) => self.reported(*r),
                Count::SessionEvicted => Self::bump(self.sessions_evicted),
            }
        }
    }
}
