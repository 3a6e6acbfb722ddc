//! The filter's metrics in Envoy's stats, under the same names and labels as the Wasm build's
//! (core `metrics.rs` names them). Envoy prefixes a dynamic module's stats with its
//! `metrics_namespace` (envoy/apisec-native.yaml sets `wasmcustom`, the Wasm filter's, so that
//! `/stats` shows the same names; the Prometheus output drops the prefix either way).
//!
//! A dynamic module defines its stats only while its configuration is created, each with its
//! label names; a request then counts with label values. So every series of core's
//! [`SERIES`](apisec_core::metrics::SERIES) table is defined here once, and core's stat names
//! (`name;label=value;...`) are taken apart by `metrics::split` where they come formatted.
//!
//! The unlabelled counters are Envoy's at once. A labelled increment costs Envoy a lookup of
//! the series by its tags (measured: about 7 us of a request's CPU for the six a request adds),
//! so what a request adds to labelled series is summed here, per worker, and handed to Envoy
//! once a second from the main thread (the ticker), as the Wasm build sums in its VM.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Mutex;

use apisec_core::lifecycle::Count;
use apisec_core::metrics::{self as series, Kind, Sample, SERIES};
use apisec_core::DenyReason;

use crate::envoy::{ConfigHandle, Filter, MetricKind};

pub struct Metrics {
    allowed: Option<usize>,
    denied: Option<usize>,
    bans: Option<usize>,
    abandoned: Option<usize>,
    reported: Option<usize>,
    sessions_evicted: Option<usize>,
    dropped: Option<usize>,
    by_reason: Vec<(DenyReason, usize)>,
    reported_by_reason: Vec<(DenyReason, usize)>,
    /// Each series of core's table, by its index there.
    series: Vec<Option<usize>>,
    /// How many SDK versions each app's calls counted under (MAX_SDK_VERSIONS_PER_APP).
    sdk_versions: Mutex<HashMap<String, Vec<String>>>,
    /// What requests added to labelled series since the last flush, one table per worker.
    pending: Vec<Mutex<Pending>>,
    /// Where the series a request adds to sit in core's table (found once, not per request).
    at: PerRequest,
}

/// The indices in core's series table of the series every request adds to.
struct PerRequest {
    requests: Option<usize>,
    request_bytes: Option<usize>,
    response_bytes: Option<usize>,
    duration: Option<usize>,
    backend: Option<usize>,
    sdk_calls: Option<usize>,
}

/// FxHash (rustc's): the sums' table is keyed by a hash of short label values in-process,
/// where SipHash's resistance to chosen keys buys nothing (labels are the policy's apps and
/// APIs and core's own words) and costs a request several hundred instructions.
#[derive(Default)]
struct Fx(u64);

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            if let Some(dst) = w.get_mut(..chunk.len()) {
                dst.copy_from_slice(chunk);
            }
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The most latency samples a worker keeps between two flushes; more are counted in
/// `apisec.metrics_series_dropped` (a second of a worker's requests fits many times over).
const MAX_SAMPLES: usize = 200_000;

/// A series, its label values and what requests added to it.
type Sum = (usize, Vec<String>, u64);

/// One worker's sums since the last flush: per series and label values, the increment; and
/// the latency samples.
#[derive(Default)]
struct Pending {
    /// By a hash of (series, labels): the entries with that hash.
    counts: HashMap<u64, Vec<Sum>, BuildHasherDefault<Fx>>,
    samples: Vec<(usize, [String; 2], u64)>,
    dropped: u64,
}

impl Pending {
    fn add(&mut self, series: usize, labels: &[&str], n: u64) {
        let mut h = Fx::default();
        series.hash(&mut h);
        labels.hash(&mut h);
        let bucket = self.counts.entry(h.finish()).or_default();
        match bucket.iter_mut().find(|(s, l, _)| {
            *s == series && l.iter().map(String::as_str).eq(labels.iter().copied())
        }) {
            Some((_, _, v)) => *v = v.saturating_add(n),
            None => bucket.push((series, labels.iter().map(|l| l.to_string()).collect(), n)),
        }
    }
}

fn index(name: &str) -> Option<usize> {
    SERIES.iter().position(|(n, _, _)| *n == name)
}

impl Metrics {
    /// Defines every stat (only possible now, while Envoy creates the configuration).
    pub fn define(config: ConfigHandle, per_code: bool) -> Metrics {
        let counter = |name: &str| config.define(MetricKind::Counter, name, &[]);
        Metrics {
            allowed: counter("apisec.allowed"),
            denied: counter("apisec.denied"),
            bans: counter("apisec.bans_started"),
            abandoned: counter("apisec.abandoned"),
            reported: counter("apisec.reported"),
            sessions_evicted: counter("apisec.sessions_evicted"),
            dropped: counter("apisec.metrics_series_dropped"),
            by_reason: DenyReason::ALL
                .iter()
                .filter(|_| per_code)
                .filter_map(|r| counter(&format!("apisec.denied.{}", r.code())).map(|id| (*r, id)))
                .collect(),
            reported_by_reason: DenyReason::ALL
                .iter()
                .filter(|r| per_code && apisec_core::report::reportable(**r))
                .filter_map(|r| {
                    counter(&format!("apisec.reported.{}", r.code())).map(|id| (*r, id))
                })
                .collect(),
            series: SERIES
                .iter()
                .map(|(name, kind, labels)| {
                    let kind = match kind {
                        Kind::Counter => MetricKind::Counter,
                        Kind::Gauge => MetricKind::Gauge,
                        Kind::Histogram => MetricKind::Histogram,
                    };
                    config.define(kind, name, labels)
                })
                .collect(),
            sdk_versions: Mutex::new(HashMap::new()),
            pending: (0..crate::envoy::concurrency().max(1))
                .map(|_| Mutex::new(Pending::default()))
                .collect(),
            at: PerRequest {
                requests: index(series::REQUESTS),
                request_bytes: index(series::REQUEST_BYTES),
                response_bytes: index(series::RESPONSE_BYTES),
                duration: index(series::DURATION),
                backend: index(series::BACKEND_RESPONSES),
                sdk_calls: index(series::SDK_CALLS),
            },
        }
    }

    /// This worker's table of sums.
    fn pending(&self, f: Filter) -> Option<std::sync::MutexGuard<'_, Pending>> {
        let n = self.pending.len().max(1);
        self.pending
            .get(f.worker_index() as usize % n)
            .and_then(|p| p.lock().ok())
    }

    /// Hands the sums since the last flush to Envoy (main thread, once a second).
    pub fn flush(&self, config: ConfigHandle) {
        for p in &self.pending {
            let taken = match p.lock() {
                Ok(mut p) => std::mem::take(&mut *p),
                Err(_) => continue,
            };
            for (series, labels, n) in taken.counts.into_values().flatten() {
                if let Some(Some(id)) = self.series.get(series) {
                    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
                    config.increment(*id, &labels, n);
                }
            }
            for (series, [app, api], ms) in taken.samples {
                if let Some(Some(id)) = self.series.get(series) {
                    config.record(*id, &[&app, &api], ms);
                }
            }
            if let (Some(id), true) = (self.dropped, taken.dropped > 0) {
                config.increment(id, &[], taken.dropped);
            }
        }
    }

    fn bump(f: Filter, id: Option<usize>) {
        if let Some(id) = id {
            f.increment(id, &[], 1);
        }
    }

    /// Adds what a lifecycle step counted.
    pub fn add(&self, f: Filter, counts: &[Count]) {
        let of = |ids: &[(DenyReason, usize)], r: DenyReason| {
            ids.iter().find(|(x, _)| *x == r).map(|(_, id)| *id)
        };
        for c in counts {
            match c {
                Count::Allowed => Self::bump(f, self.allowed),
                Count::Denied(r) => {
                    Self::bump(f, self.denied);
                    Self::bump(f, of(&self.by_reason, *r));
                }
                Count::BanStarted => Self::bump(f, self.bans),
                Count::Abandoned => Self::bump(f, self.abandoned),
                Count::Reported(r) => {
                    Self::bump(f, self.reported);
                    Self::bump(f, of(&self.reported_by_reason, *r));
                }
                Count::SessionEvicted => Self::bump(f, self.sessions_evicted),
            }
        }
    }

    /// A counter named the way core names it (`name;label=value;...`).
    fn count_named(&self, f: Filter, p: &mut Pending, stat: &str, n: u64) {
        match series::split(stat) {
            Some((i, values)) => p.add(i, &values, n),
            None => Self::bump(f, self.dropped),
        }
    }

    /// What one request adds, when its stream ends: summed in this worker's table.
    pub fn sample(&self, f: Filter, s: &Sample) {
        let sdk = s.sdk_version.as_deref().map(|v| self.sdk_label(&s.app, v));
        let Some(mut p) = self.pending(f) else {
            Self::bump(f, self.dropped);
            return;
        };
        let per_api = [s.app.as_str(), s.api.as_str()];
        let at = &self.at;
        if let Some(i) = at.requests {
            p.add(i, &[&s.app, &s.api, s.level, s.decision, s.code], 1);
        }
        if let (Some(i), true) = (at.request_bytes, s.bytes_in > 0) {
            p.add(i, &per_api, s.bytes_in);
        }
        if let (Some(i), true) = (at.response_bytes, s.bytes_out > 0) {
            p.add(i, &per_api, s.bytes_out);
        }
        if let (Some(i), Some(ms)) = (at.duration, s.duration_ms) {
            if p.samples.len() < MAX_SAMPLES {
                p.samples.push((i, [s.app.clone(), s.api.clone()], ms));
            } else {
                p.dropped = p.dropped.saturating_add(1);
            }
        }
        if let (Some(i), Some(class)) = (at.backend, s.backend_status) {
            p.add(i, &[&s.app, &s.api, class], 1);
        }
        if let (Some(i), Some(version)) = (at.sdk_calls, &sdk) {
            p.add(i, &[&s.app, version], 1);
        }
        if s.shadow {
            self.count_named(f, &mut p, &s.shadow(), 1);
        }
        for name in s.anomalies().chain(s.rate_limited()) {
            self.count_named(f, &mut p, &name, 1);
        }
        if let Some(name) = s.sdk_outdated() {
            self.count_named(f, &mut p, &name, 1);
        }
        if let Some(name) = s.sessions_evicted() {
            self.count_named(f, &mut p, &name, 1);
        }
    }

    /// The version label an app's call counts under: its own, or `other` past the bound.
    fn sdk_label(&self, app: &str, version: &str) -> String {
        let Ok(mut seen) = self.sdk_versions.lock() else {
            return "other".into();
        };
        let versions = seen.entry(app.to_string()).or_default();
        if versions.iter().any(|v| v == version) {
            return version.to_string();
        }
        if versions.len() >= series::MAX_SDK_VERSIONS_PER_APP {
            return "other".into();
        }
        versions.push(version.to_string());
        version.to_string()
    }

    /// Sets gauges named the way core names them (main thread).
    pub fn gauges(&self, config: ConfigHandle, values: &[(String, u64)]) {
        for (name, v) in values {
            if let Some((i, labels)) = series::split(name) {
                if let Some(Some(id)) = self.series.get(i) {
                    config.set_gauge(*id, &labels, *v);
                }
            }
        }
    }

    /// Makes a counter of a series exist at zero (the eviction counter of every registered
    /// app, so that its series and alert exist before the first eviction); main thread.
    pub fn zero(&self, config: ConfigHandle, name: &str) {
        if let Some((i, labels)) = series::split(name) {
            if let Some(Some(id)) = self.series.get(i) {
                config.increment(*id, &labels, 0);
            }
        }
    }
}
