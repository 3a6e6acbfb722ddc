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
use crate::replay;
use crate::store::{create_if_absent, SharedStore};

/// The label names, in the order they appear in stat names (and `stats_tags`).
pub const LABELS: [&str; 5] = ["app", "api", "level", "decision", "code"];

/// Stat names (after Envoy's `wasmcustom.` prefix, before the labels).
pub const REQUESTS: &str = "apisec.requests_total";
pub const REQUEST_BYTES: &str = "apisec.request_bytes_total";
pub const RESPONSE_BYTES: &str = "apisec.response_bytes_total";
pub const DURATION: &str = "apisec.request_duration_ms";
pub const SHADOW_CALLS: &str = "apisec.shadow_calls_total";
pub const POLICY_INFO: &str = "apisec.policy_info";
pub const BANS_ACTIVE: &str = "apisec.bans_active";
pub const REPLAY_LIVE: &str = "apisec.replay_store_live";
pub const REPLAY_CAPACITY: &str = "apisec.replay_store_capacity";
pub const REPLAY_FULLEST: &str = "apisec.replay_slot_fullest_ratio_pct";

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

/// The fill of the replay store (ATK-1, MON-2): live nonces, capacity, and how full the
/// fullest slot is in percent (a full slot refuses `replay_store_full`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayFill {
    pub live: u64,
    pub capacity: u64,
    pub fullest_pct: u64,
}

/// The key whose owner measures the store's gauges this round: one worker of the replica
/// reads the store every `GAUGE_SECONDS`, not every worker.
const GAUGE_TURN_KEY: &str = "apisec/metrics/gauges-at";
pub const GAUGE_SECONDS: u64 = 10;

/// Whether this worker measures the gauges now: it is due, and this worker claimed the round.
pub fn gauge_turn(store: &dyn SharedStore, now: u64) -> bool {
    let last = match store.get(GAUGE_TURN_KEY) {
        Ok(Some((v, cas))) => Some((
            v.get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_le_bytes),
            cas,
        )),
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

/// The gauges of the local state store (Envoy shared data): active bans by subject and the
/// replay store's fill. With the `cluster` backend the state is in the cluster store, whose
/// own exporter reports it; these read nothing then.
pub fn store_gauges(policy: &Policy, store: &dyn SharedStore, now: u64) -> Vec<(String, u64)> {
    if !matches!(policy.state, StateBackend::Local) {
        return Vec::new();
    }
    let mut out = Vec::new();
    if let Some(bans) = &policy.bans {
        if let Ok((apps, ips)) = bans.active(store, policy.app_ids(), now) {
            out.push((format!("{BANS_ACTIVE};subject=app"), apps));
            out.push((format!("{BANS_ACTIVE};subject=ip"), ips));
        }
    }
    if let Ok(f) = replay::fill(store, &policy.replay, now) {
        out.push((REPLAY_LIVE.into(), f.live));
        out.push((REPLAY_CAPACITY.into(), f.capacity));
        out.push((REPLAY_FULLEST.into(), f.fullest_pct));
    }
    out
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
        }
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
