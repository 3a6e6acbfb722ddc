//! The filter's labelled metrics (MON-1, MON-2, MON-4, LVL-3): what one request adds to them,
//! and the Envoy stat names that carry the labels.
//!
//! Envoy stats have no labels of their own: a label travels inside the stat name as `;name=value`
//! and Envoy's tag extraction (`stats_config.stats_tags` in `envoy/gateway.yaml`, one regex per
//! label) takes it out again, so that `/stats/prometheus` prints
//! `apisec_requests_total{app="broker-a",api="orders.place",...}`. Wasm stats are created as
//! `wasmcustom.<name>`, and the Prometheus output drops that prefix.
//!
//! Cardinality is bounded by the policy: an app label is a registered app, `unknown` (an
//! `x-app-id` the policy does not know) or `none` (no `x-app-id`); an API label is an inventory
//! id or `none` (no API matched); level, decision and refusal code are closed sets. A request
//! outside the inventory is a shadow-API call, counted with the app it claims.

use std::borrow::Cow;

use crate::cluster::StateBackend;
use crate::policy::Policy;
use crate::state::nonces::local as replay;
use crate::store::{create_if_absent, u64_at, SharedStore};

/// The label names, in the order they appear in stat names (and `stats_tags`).
pub const LABELS: [&str; 5] = ["app", "api", "level", "decision", "code"];

/// Stat names (after Envoy's `wasmcustom.` prefix, before the labels).
pub const REQUESTS: &str = "apisec.requests_total";
pub const REQUEST_BYTES: &str = "apisec.request_bytes_total";
pub const RESPONSE_BYTES: &str = "apisec.response_bytes_total";
pub const DURATION: &str = "apisec.request_duration_ms";
pub const SHADOW_CALLS: &str = "apisec.shadow_calls_total";
pub const ANOMALIES: &str = "apisec.anomalies_total";
pub const RATE_LIMITED: &str = "apisec.rate_limited_total";
pub const SDK_OUTDATED: &str = "apisec.sdk_outdated_total";
pub const SDK_CALLS: &str = "apisec.sdk_calls_total";
pub const BACKEND_RESPONSES: &str = "apisec.backend_responses_total";
pub const SESSIONS_EVICTED: &str = "apisec.sessions_evicted_total";
pub const POLICY_INFO: &str = "apisec.policy_info";
pub const CREDENTIAL_NOT_AFTER: &str = "apisec.credential_not_after";
pub const BANS_ACTIVE: &str = "apisec.bans_active";
pub const REPLAY_LIVE: &str = "apisec.replay_store_live";
pub const REPLAY_CAPACITY: &str = "apisec.replay_store_capacity";
pub const REPLAY_FULLEST: &str = "apisec.replay_slot_fullest_ratio_pct";

/// The most SDK-version series one app's calls define (MON-7); a further version counts as
/// `other`, so a caller cannot grow the stats without bound by inventing versions.
pub const MAX_SDK_VERSIONS_PER_APP: usize = 16;

/// What kind of Envoy stat a series is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every labelled series this module names, with its label names in the order they appear in
/// its stat names. The Wasm glue needs only the names (Envoy's `stats_tags` take the labels
/// out); a host whose stats take label values apart from the name (the native build: a stat
/// is defined once with its label names, then counted with values) defines each from here.
pub const SERIES: &[(&str, Kind, &[&str])] = &[
    (REQUESTS, Kind::Counter, &LABELS),
    (REQUEST_BYTES, Kind::Counter, &["app", "api"]),
    (RESPONSE_BYTES, Kind::Counter, &["app", "api"]),
    (DURATION, Kind::Histogram, &["app", "api"]),
    (SHADOW_CALLS, Kind::Counter, &["app"]),
    (ANOMALIES, Kind::Counter, &["app", "rule", "action"]),
    (RATE_LIMITED, Kind::Counter, &["app", "rule", "action"]),
    (SDK_OUTDATED, Kind::Counter, &["app", "status", "action"]),
    (SDK_CALLS, Kind::Counter, &["app", "version"]),
    (BACKEND_RESPONSES, Kind::Counter, &["app", "api", "status"]),
    (SESSIONS_EVICTED, Kind::Counter, &["app"]),
    (POLICY_INFO, Kind::Gauge, &["version"]),
    (CREDENTIAL_NOT_AFTER, Kind::Gauge, &["app", "credential"]),
    (BANS_ACTIVE, Kind::Gauge, &["subject"]),
    (REPLAY_LIVE, Kind::Gauge, &[]),
    (REPLAY_CAPACITY, Kind::Gauge, &[]),
    (REPLAY_FULLEST, Kind::Gauge, &[]),
];

/// A stat name as this module makes it, taken apart: its name, and its label values in order.
/// None when the name is not one of [`SERIES`] or its labels are not that series' own.
pub fn split(stat: &str) -> Option<(usize, Vec<&str>)> {
    let mut parts = stat.split(';');
    let name = parts.next()?;
    let index = SERIES.iter().position(|(n, _, _)| *n == name)?;
    let (_, _, labels) = SERIES.get(index)?;
    let mut values = Vec::with_capacity(labels.len());
    for (label, part) in labels.iter().zip(parts.by_ref()) {
        let (k, v) = part.split_once('=')?;
        if k != *label {
            return None;
        }
        values.push(v);
    }
    (values.len() == labels.len() && parts.next().is_none()).then_some((index, values))
}

/// What one request adds to the metrics, when its stream ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub app: String,
    pub api: String,
    pub level: &'static str,
    /// allow, deny or report (report mode: it would have been refused), as in the audit record.
    pub decision: &'static str,
    /// The refusal code, `none` when allowed.
    pub code: &'static str,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: Option<u64>,
    /// The path matched no API of the inventory (a shadow API call).
    pub shadow: bool,
    /// Anomaly rules matched: rule id and action (alert, block).
    pub anomalies: Vec<(String, &'static str)>,
    /// Rate-limit rules the call went over: rule id and action (refuse, alert).
    pub rate_limits: Vec<(String, &'static str)>,
    /// An SDK not acceptable: why (below_minimum, ...) and the action (refuse, flag).
    pub sdk: Option<(&'static str, &'static str)>,
    /// Establishing this session evicted one of the app's own (its cap, or a full store).
    pub session_evicted: bool,
    /// The status class (`2xx` .. `5xx`) of the response to a call the gateway let through
    /// (the backend's, or Envoy's own when it could not reach it): none for a refused call.
    pub backend_status: Option<&'static str>,
    /// The SDK version a registered app's call named (MON-7): the `x-sdk-version` it sent if
    /// that is a version, `none` without one, `malformed` otherwise. None for an unknown app.
    pub sdk_version: Option<String>,
}

/// The status class of an HTTP status, as the `status` label of the backend's responses.
pub fn status_class(status: u32) -> Option<&'static str> {
    match status {
        100..=199 => Some("1xx"),
        200..=299 => Some("2xx"),
        300..=399 => Some("3xx"),
        400..=499 => Some("4xx"),
        500..=599 => Some("5xx"),
        _ => None,
    }
}

/// The `version` label of `apisec.sdk_calls_total` for what a caller sent in `x-sdk-version`.
pub fn sdk_version_label(sent: Option<&str>) -> String {
    match sent {
        None => "none".into(),
        Some(v) if v.len() <= 32 && crate::sdk::Version::parse(v).is_some() => {
            label(v).into_owned()
        }
        Some(_) => "malformed".into(),
    }
}

/// A label value as it may sit in a stat name: `;` and `=` delimit labels, and Envoy's
/// Prometheus output accepts any other printable text in a label value.
pub fn label(value: &str) -> Cow<'_, str> {
    if value
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b';' && b != b'=')
    {
        Cow::Borrowed(value)
    } else {
        Cow::Owned(
            value
                .chars()
                .map(|c| {
                    if c.is_ascii_graphic() && c != ';' && c != '=' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect(),
        )
    }
}

/// The app label of a caller: a registered app by its id, else `unknown`, or `none`.
pub fn app_label(policy: &Policy, claimed: Option<&str>) -> String {
    match claimed {
        None => "none".into(),
        Some(id) => match policy.app(id) {
            Some(app) => label(&app.id).into_owned(),
            None => "unknown".into(),
        },
    }
}

/// `apisec.sessions_evicted_total;app=..` for an app label; defined at zero for every
/// registered app when a policy loads, so the series (and its alert) exist before the first
/// eviction.
pub fn sessions_evicted(app_label: &str) -> String {
    let mut s = String::from(SESSIONS_EVICTED);
    named(&mut s, "app", app_label);
    s
}

/// OPS-2: every credential of the policy as `apisec.credential_not_after;app=..;credential=..`,
/// set to its `not_after` in unix seconds, or 0 when it has none. Set when a policy loads (the
/// values change only with the policy), so the expiry alert (`ApisecCredentialExpiresSoon`)
/// costs nothing per request or tick.
pub fn credential_not_after(policy: &Policy) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for id in policy.app_ids() {
        let Some(app) = policy.app(id) else { continue };
        let signing = app
            .credentials
            .iter()
            .map(|c| (&c.keyid, c.validity.not_after));
        let certs = app
            .certificates
            .iter()
            .map(|c| (&c.keyid, c.validity.not_after));
        for (keyid, not_after) in signing.chain(certs) {
            let mut s = String::from(CREDENTIAL_NOT_AFTER);
            named(&mut s, "app", &label(id));
            named(&mut s, "credential", &label(keyid));
            out.push((s, not_after.unwrap_or(0)));
        }
    }
    out.sort();
    out
}

fn named(out: &mut String, name: &str, value: &str) {
    out.push(';');
    out.push_str(name);
    out.push('=');
    out.push_str(value);
}

impl Sample {
    /// `apisec.requests_total;app=..;api=..;level=..;decision=..;code=..`
    pub fn requests(&self) -> String {
        let mut s = String::with_capacity(REQUESTS.len() + 80);
        s.push_str(REQUESTS);
        named(&mut s, "app", &self.app);
        named(&mut s, "api", &self.api);
        named(&mut s, "level", self.level);
        named(&mut s, "decision", self.decision);
        named(&mut s, "code", self.code);
        s
    }
    /// A per-app-and-API stat: bytes and the latency histogram.
    pub fn per_api(&self, stat: &str) -> String {
        let mut s = String::with_capacity(stat.len() + 40);
        s.push_str(stat);
        named(&mut s, "app", &self.app);
        named(&mut s, "api", &self.api);
        s
    }
    /// `apisec.anomalies_total;app=..;rule=..;action=..`, one per rule matched.
    pub fn anomalies(&self) -> impl Iterator<Item = String> + '_ {
        self.anomalies.iter().map(|(rule, action)| {
            let mut s = String::from(ANOMALIES);
            named(&mut s, "app", &self.app);
            named(&mut s, "rule", rule);
            named(&mut s, "action", action);
            s
        })
    }
    /// `apisec.rate_limited_total;app=..;rule=..;action=..`, one per rule the call went over
    /// (RL-1, RL-2, OPS-4).
    pub fn rate_limited(&self) -> impl Iterator<Item = String> + '_ {
        self.rate_limits.iter().map(|(rule, action)| {
            let mut s = String::from(RATE_LIMITED);
            named(&mut s, "app", &self.app);
            named(&mut s, "rule", rule);
            named(&mut s, "action", action);
            s
        })
    }
    /// `apisec.sessions_evicted_total;app=..` (MON-5): the app whose session was evicted (its
    /// own, for an establish of its own).
    pub fn sessions_evicted(&self) -> Option<String> {
        self.session_evicted.then(|| sessions_evicted(&self.app))
    }
    /// `apisec.sdk_outdated_total;app=..;status=..;action=..`
    pub fn sdk_outdated(&self) -> Option<String> {
        self.sdk.map(|(status, action)| {
            let mut s = String::from(SDK_OUTDATED);
            named(&mut s, "app", &self.app);
            named(&mut s, "status", status);
            named(&mut s, "action", action);
            s
        })
    }
    /// `apisec.backend_responses_total;app=..;api=..;status=5xx` for a call let through.
    pub fn backend_responses(&self) -> Option<String> {
        self.backend_status.map(|class| {
            let mut s = self.per_api(BACKEND_RESPONSES);
            named(&mut s, "status", class);
            s
        })
    }
    /// `apisec.sdk_calls_total;app=..;version=..` (MON-7): the SDK versions in use, with
    /// `version` in its place (the host bounds how many one app can define).
    pub fn sdk_calls(&self, version: &str) -> String {
        let mut s = String::from(SDK_CALLS);
        named(&mut s, "app", &self.app);
        named(&mut s, "version", version);
        s
    }
    /// `apisec.shadow_calls_total;app=..`
    pub fn shadow(&self) -> String {
        let mut s = String::from(SHADOW_CALLS);
        named(&mut s, "app", &self.app);
        s
    }
}

/// The loaded policy's version as a gauge set to 1: `apisec.policy_info;version=<12 hex>`,
/// the first 48 bits of the SHA-256 of the policy text Envoy gave the filter. Every replica
/// that runs the same policy shows the same version.
pub fn policy_info(policy_text: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(policy_text);
    let mut s = String::from(POLICY_INFO);
    named(
        &mut s,
        "version",
        &crate::crypto::hex(d.get(..6).unwrap_or(&[])),
    );
    s
}

use crate::state::nonces::local::ReplayFill;

/// The key whose owner measures the store's gauges this round: one worker of the replica
/// starts a pass every `GAUGE_SECONDS`, not every worker.
const GAUGE_TURN_KEY: &str = "apisec/metrics/gauges-at";
pub const GAUGE_SECONDS: u64 = 10;
/// Store keys one tick reads at most: a pass over a large store is spread over ticks, so that
/// no tick holds its worker (and the requests queued on it) for long. A replay slot costs
/// about 12k instructions to read and count (a host call and its copy): 12 keys keep a tick
/// near 150k (issue 24: under 200k). The host ticks 10 times a second, so a pass reads 120
/// keys a second (the default replay store of 65,536 slots in about 9 minutes).
pub const GAUGE_KEYS_PER_TICK: u32 = 12;

/// Whether this worker starts a pass now: it is due, and this worker claimed the round.
pub fn gauge_turn(store: &dyn SharedStore, now: u64) -> bool {
    let last = match store.get(GAUGE_TURN_KEY) {
        Ok(Some((v, cas))) => Some((u64_at(&v, 0), cas)),
        Ok(None) => None,
        Err(_) => return false,
    };
    match last {
        Some((at, _)) if now < at.saturating_add(GAUGE_SECONDS) => false,
        Some((_, cas)) => store
            .set(GAUGE_TURN_KEY, &now.to_le_bytes(), Some(cas))
            .unwrap_or(false),
        None => create_if_absent(store, GAUGE_TURN_KEY, &now.to_le_bytes()).unwrap_or(false),
    }
}

/// Keeps the round of a pass that is still going: other workers do not start a second pass
/// beside it, and take over `GAUGE_SECONDS` after it stopped moving (its worker stopped).
pub fn gauge_hold(store: &dyn SharedStore, now: u64) {
    let _ = store.set(GAUGE_TURN_KEY, &now.to_le_bytes(), None);
}

/// The gauges from the cluster store's counts (cluster.rs `GA`): bans in force by subject,
/// and the replay store's fill as the cluster backend bounds it, by app share: live is the
/// nonces the apps recorded in their shares, capacity the shares' sum, and the fullest "slot"
/// the fullest app share (a full share refuses `replay_store_full`).
pub fn cluster_gauges(policy: &Policy, counts: &crate::cluster::StoreCounts) -> Vec<(String, u64)> {
    let StateBackend::Cluster(settings) = &policy.state else {
        return Vec::new();
    };
    let share = settings.app_share.max(1);
    let mut out = vec![
        (REPLAY_LIVE.into(), counts.nonces),
        (
            REPLAY_CAPACITY.into(),
            share.saturating_mul(policy.app_ids().count() as u64),
        ),
        (
            REPLAY_FULLEST.into(),
            counts.fullest_share.saturating_mul(100) / share,
        ),
    ];
    if policy.bans.is_some() {
        out.push((format!("{BANS_ACTIVE};subject=app"), counts.apps_banned));
        out.push((format!("{BANS_ACTIVE};subject=ip"), counts.sources_banned));
    }
    out
}

/// One pass over the local state store (Envoy shared data) for its gauges: active bans by
/// subject and the replay store's fill, `GAUGE_KEYS_PER_TICK` keys a tick. With the `cluster`
/// backend the state is in the cluster store, read in one callout instead
/// ([`cluster_gauges`]); there is no pass.
#[derive(Debug, Clone, Default)]
pub struct GaugePass {
    /// The next key: replay slots first, then ban source slots, then the apps' ban keys.
    next: u32,
    replay: ReplayFill,
    ban_sources: u64,
}

impl GaugePass {
    /// Reads the next keys. Some(gauges) when the pass is complete; None while it goes on.
    /// A store that cannot answer ends the pass with nothing published.
    pub fn step(
        &mut self,
        policy: &Policy,
        store: &dyn SharedStore,
        now: u64,
    ) -> Option<Vec<(String, u64)>> {
        if !matches!(policy.state, StateBackend::Local) {
            return Some(Vec::new());
        }
        let replay_slots = policy.replay.slots;
        let ban_slots = policy.bans.as_ref().map_or(0, |b| b.ip_slots());
        let end = self.next.saturating_add(GAUGE_KEYS_PER_TICK);
        if self.next < replay_slots {
            let range = self.next..end.min(replay_slots);
            self.next = range.end;
            if replay::fill(store, &policy.replay, now, range, &mut self.replay).is_err() {
                return Some(Vec::new());
            }
            return None;
        }
        let sources_end = replay_slots.saturating_add(ban_slots);
        if let (Some(bans), true) = (&policy.bans, self.next < sources_end) {
            let range = self.next - replay_slots..end.min(sources_end) - replay_slots;
            self.next = end.min(sources_end);
            match bans.active_sources(store, range, now) {
                Ok(n) => self.ban_sources = self.ban_sources.saturating_add(n),
                Err(_) => return Some(Vec::new()),
            }
            return None;
        }
        let mut out = vec![
            (REPLAY_LIVE.into(), self.replay.live),
            (REPLAY_CAPACITY.into(), self.replay.capacity),
            (REPLAY_FULLEST.into(), self.replay.fullest_pct),
        ];
        if let Some(bans) = &policy.bans {
            let Ok(apps) = bans.active_apps(store, policy.app_ids(), now) else {
                return Some(Vec::new());
            };
            out.push((format!("{BANS_ACTIVE};subject=app"), apps));
            out.push((format!("{BANS_ACTIVE};subject=ip"), self.ban_sources));
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sample {
        Sample {
            app: "broker-a".into(),
            api: "orders.place".into(),
            level: "S3",
            decision: "deny",
            code: "nonce_replayed",
            bytes_in: 10,
            bytes_out: 20,
            duration_ms: Some(3),
            shadow: false,
            anomalies: vec![("night".into(), "alert")],
            rate_limits: vec![],
            sdk: Some(("known_bad", "flag")),
            session_evicted: true,
            backend_status: None,
            sdk_version: Some("2.4.0".into()),
        }
    }

    /// Issue 26 (MON-7, error rate from the backend's status): a call let through counts its
    /// response's status class per app and API; the SDK version label is the version sent,
    /// `none` or `malformed`, never free text.
    #[test]
    fn every_stat_name_splits_into_its_series_and_labels() {
        let mut s = sample();
        s.anomalies = vec![("burst".into(), "alert")];
        s.rate_limits = vec![("per-app".into(), "refuse")];
        s.sdk = Some(("below_minimum", "flag"));
        s.backend_status = Some("5xx");
        let names = [
            s.requests(),
            s.per_api(REQUEST_BYTES),
            s.per_api(RESPONSE_BYTES),
            s.per_api(DURATION),
            s.shadow(),
            s.sdk_calls("1.2.0"),
            s.sdk_outdated().unwrap_or_default(),
            s.backend_responses().unwrap_or_default(),
            sessions_evicted("broker-a"),
            policy_info(b"x"),
            format!("{BANS_ACTIVE};subject=ip"),
            REPLAY_LIVE.to_string(),
        ];
        let mut all: Vec<String> = names.to_vec();
        all.extend(s.anomalies());
        all.extend(s.rate_limited());
        for name in &all {
            let (i, values) = split(name).unwrap_or_else(|| panic!("{name} does not split"));
            let (series, _, labels) = SERIES[i];
            assert!(name.starts_with(series), "{name}");
            assert_eq!(values.len(), labels.len(), "{name}");
        }
        let requests = s.requests();
        let (i, values) = split(&requests).unwrap_or_default();
        assert_eq!(SERIES[i].0, REQUESTS);
        assert_eq!(
            values,
            ["broker-a", "orders.place", "S3", "deny", "nonce_replayed"]
        );
        assert!(
            split("apisec.requests_total;app=a").is_none(),
            "too few labels"
        );
        assert!(
            split("apisec.shadow_calls_total;api=a").is_none(),
            "another label"
        );
        assert!(
            split("apisec.shadow_calls_total;app=a;x=y").is_none(),
            "too many"
        );
        assert!(split("apisec.unknown;app=a").is_none());
    }

    #[test]
    fn backend_status_and_sdk_versions_are_bounded_labels() {
        let mut s = sample();
        assert_eq!(s.backend_responses(), None);
        s.backend_status = status_class(503);
        assert_eq!(
            s.backend_responses().unwrap(),
            "apisec.backend_responses_total;app=broker-a;api=orders.place;status=5xx"
        );
        assert_eq!(status_class(404), Some("4xx"));
        assert_eq!(status_class(99), None);
        assert_eq!(sdk_version_label(Some("2.4.0-rc1")), "2.4.0-rc1");
        assert_eq!(sdk_version_label(None), "none");
        assert_eq!(sdk_version_label(Some("2.4;app=x")), "malformed");
        assert_eq!(sdk_version_label(Some(&"9.".repeat(20))), "malformed");
        assert_eq!(
            s.sdk_calls("2.4.0"),
            "apisec.sdk_calls_total;app=broker-a;version=2.4.0"
        );
    }

    #[test]
    fn names_carry_labels_in_order() {
        let s = sample();
        assert_eq!(
            s.requests(),
            "apisec.requests_total;app=broker-a;api=orders.place;level=S3;decision=deny;code=nonce_replayed"
        );
        assert_eq!(
            s.per_api(DURATION),
            "apisec.request_duration_ms;app=broker-a;api=orders.place"
        );
        assert_eq!(s.shadow(), "apisec.shadow_calls_total;app=broker-a");
        assert_eq!(
            s.anomalies().collect::<Vec<_>>(),
            ["apisec.anomalies_total;app=broker-a;rule=night;action=alert"]
        );
        assert_eq!(
            s.sessions_evicted().unwrap(),
            "apisec.sessions_evicted_total;app=broker-a"
        );
        assert_eq!(
            s.sdk_outdated().unwrap(),
            "apisec.sdk_outdated_total;app=broker-a;status=known_bad;action=flag"
        );
    }

    /// MON-2, MON-4: a pass over the local store is spread over ticks, and its gauges count
    /// the live nonces and the bans in force.
    #[test]
    fn a_gauge_pass_reads_the_store_a_few_keys_a_tick() {
        use crate::state::bans::Subject;
        use crate::store::{self, MemoryStore};
        let doc = serde_json::json!({
            "version": 1,
            "gateway": {"replay": {"slots": 300, "entries_per_slot": 8}},
            "apis": [{"id": "quote", "method": "GET", "path": "/q", "level": "S0", "service_object": "toC",
                      "access": "read", "user_auth": false, "personal_info": false, "function": "market_data"}],
            "apps": [{"id": "app-a"}],
            "bans": {"threshold": 1, "window_seconds": 60, "ban_seconds": 600, "ip_slots": 100}
        });
        let secrets = std::collections::HashMap::<String, String>::new();
        let policy = Policy::from_json(&doc.to_string(), &secrets).unwrap();
        let db = MemoryStore::default();
        let meta = store::open(&db, [1; 16], 100, 300).unwrap();
        replay::init_slots(&db, &policy.replay, &meta).unwrap();
        for n in 0..3 {
            replay::check(
                &db,
                &meta,
                &policy.replay,
                300,
                "app-a",
                &format!("n{n}"),
                200,
                200,
                true,
            )
            .unwrap();
        }
        let bans = policy.bans.as_ref().unwrap();
        bans.record_refusal(&db, Subject::App("app-a"), 200)
            .unwrap();
        bans.record_refusal(&db, Subject::Ip("192.0.2.1".parse().unwrap()), 200)
            .unwrap();
        assert_eq!(policy.app_ids().collect::<Vec<_>>(), ["app-a"]);
        assert_eq!(bans.active_apps(&db, policy.app_ids(), 201).unwrap(), 1);
        assert!(gauge_turn(&db, 201), "the first worker claims the round");
        assert!(!gauge_turn(&db, 202), "a second worker does not");
        gauge_hold(&db, 215);
        assert!(
            !gauge_turn(&db, 220),
            "the pass goes on: no second one beside it"
        );
        assert!(
            gauge_turn(&db, 225),
            "a pass that stopped moving is taken over"
        );
        let mut pass = GaugePass::default();
        let mut ticks = 1;
        let gauges = loop {
            if let Some(g) = pass.step(&policy, &db, 201) {
                break g;
            }
            ticks += 1;
        };
        // 300 replay slots and 100 source slots, GAUGE_KEYS_PER_TICK keys a tick, then the apps
        assert_eq!(
            ticks,
            300u32.div_ceil(GAUGE_KEYS_PER_TICK) + 100u32.div_ceil(GAUGE_KEYS_PER_TICK) + 1
        );
        let get = |n: &str| gauges.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
        assert_eq!(get(REPLAY_LIVE), Some(3));
        assert_eq!(get(REPLAY_CAPACITY), Some(2400));
        assert_eq!(get("apisec.bans_active;subject=app"), Some(1));
        assert_eq!(get("apisec.bans_active;subject=ip"), Some(1));
    }

    #[test]
    fn label_values_cannot_forge_labels() {
        assert_eq!(label("a;code=x"), "a_code_x");
        assert_eq!(label("a b\u{e9}"), "a_b_");
        assert!(matches!(label("orders.place"), Cow::Borrowed(_)));
    }

    #[test]
    fn policy_version_is_a_content_hash() {
        let a = policy_info(b"{\"version\":1}");
        assert!(a.starts_with("apisec.policy_info;version="));
        assert_eq!(a.len(), "apisec.policy_info;version=".len() + 12);
        assert_eq!(a, policy_info(b"{\"version\":1}"));
        assert_ne!(a, policy_info(b"{\"version\":1} "));
    }
}
