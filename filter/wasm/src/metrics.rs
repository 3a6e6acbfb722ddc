//! The filter's counters in Envoy's stats: one fixed list, `apisec.allowed`, `apisec.denied`,
//! `apisec.denied.<code>`, `apisec.reported`, `apisec.reported.<code>` (report mode: would
//! have been refused), `apisec.bans_started`, `apisec.abandoned`, `apisec.sessions_evicted`. Refusals are counted at
//! once; allowed requests (the hot path) are summed in the VM and added to Envoy's counter once
//! a second by the root context's tick, saving a host call per request.

use std::cell::Cell;

use apisec_core::lifecycle::Count;
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
}

impl Metrics {
    pub fn define() -> Self {
        let def = |name: &str| hostcalls::define_metric(MetricType::Counter, name).ok();
        Metrics {
            allowed: def("apisec.allowed"),
            allowed_pending: Cell::new(0),
            denied: def("apisec.denied"),
            bans: def("apisec.bans_started"),
            abandoned: def("apisec.abandoned"),
            by_reason: DenyReason::ALL
                .iter()
                .filter_map(|r| def(&format!("apisec.denied.{}", r.code())).map(|id| (*r, id)))
                .collect(),
            reported: def("apisec.reported"),
            sessions_evicted: def("apisec.sessions_evicted"),
            reported_by_reason: DenyReason::ALL
                .iter()
                .filter(|r| apisec_core::report::reportable(**r))
                .filter_map(|r| def(&format!("apisec.reported.{}", r.code())).map(|id| (*r, id)))
                .collect(),
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
