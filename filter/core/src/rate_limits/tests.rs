//! Unit tests of the rate-limit rules: validation, and which counters a call counts toward.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use super::*;
use crate::inventory;

fn apis() -> (Vec<Api>, Vec<ApiGroup>) {
    let raw: Vec<crate::inventory::RawApi> = serde_json::from_value(serde_json::json!([
        {"id": "order", "method": "POST", "path": "/orders", "level": "S1", "service_object": "toB",
         "access": "write", "user_auth": false, "personal_info": false, "function": "trading"},
        {"id": "cancel", "method": "DELETE", "path": "/orders/{id}", "level": "S1",
         "service_object": "toB", "access": "write", "user_auth": false, "personal_info": false,
         "function": "trading"},
        {"id": "quote", "method": "GET", "path": "/quotes", "level": "S0", "service_object": "toC",
         "access": "read", "user_auth": false, "personal_info": false, "function": "market_data"}
    ]))
    .unwrap();
    let groups: Vec<crate::inventory::RawApiGroup> =
        serde_json::from_value(serde_json::json!([{"id": "trade", "apis": ["order", "cancel"]}]))
            .unwrap();
    inventory::compile(&raw, &groups).unwrap()
}

fn rules(v: serde_json::Value) -> Result<RateLimits, ConfigError> {
    let raw: Vec<RawRateLimit> =
        serde_json::from_value(v).map_err(|e| ConfigError::new("", e.to_string()))?;
    let (apis, groups) = apis();
    compile(&raw, &RawRateStore::default(), &apis, &groups, &|a| {
        a == "broker-a" || a == "broker-b"
    })
}

#[test]
fn a_bad_rule_is_refused_with_its_field() {
    for (v, field) in [
        (
            serde_json::json!([{"id": "r", "by": ["app"]}]),
            "rate_limits[0]",
        ),
        (
            serde_json::json!([{"id": "r", "per_minute": 0}]),
            "rate_limits[0].per_minute",
        ),
        (
            serde_json::json!([{"id": "r", "per_minute": 1, "apis": ["nope"]}]),
            "rate_limits[0].apis[0]",
        ),
        (
            serde_json::json!([{"id": "r", "per_minute": 1, "functions": ["nope"]}]),
            "rate_limits[0].functions[0]",
        ),
        (
            serde_json::json!([{"id": "r", "per_minute": 1, "apps": ["nobody"]}]),
            "rate_limits[0].apps[0]",
        ),
        (
            serde_json::json!([{"id": "r", "quota": {"per_day": 5, "timezone": "Mars/Olympus"}}]),
            "rate_limits[0].quota.timezone",
        ),
        (
            serde_json::json!([{"id": "r", "per_minute": 1, "by": ["app", "app"]}]),
            "rate_limits[0].by",
        ),
        (
            serde_json::json!([{"id": "r", "per_minute": 1, "action": "alert", "count_toward_ban": true}]),
            "rate_limits[0].count_toward_ban",
        ),
        (
            serde_json::json!([{"id": "r", "per_minute": 1}, {"id": "r", "per_hour": 1}]),
            "rate_limits[1].id",
        ),
        (
            serde_json::json!([{"id": "a b", "per_minute": 1}]),
            "rate_limits[0].id",
        ),
    ] {
        let e = rules(v.clone()).unwrap_err();
        assert_eq!(e.field, field, "{v}: {e}");
    }
    // an unknown field or dimension is an error, not ignored
    assert!(rules(serde_json::json!([{"id": "r", "per_minit": 1}])).is_err());
    assert!(rules(serde_json::json!([{"id": "r", "per_minute": 1, "by": ["header"]}])).is_err());
}

/// RL-2, OPS-4: the dimensions of a call are what the gateway verified; a rule whose
/// dimension the call lacks (no proven app) does not count it.
#[test]
fn counters_are_keyed_by_verified_dimensions_only() {
    let r = rules(serde_json::json!([
        {"id": "per-app-api", "by": ["app", "api"], "apis": ["group:trade"], "per_second": 5, "per_minute": 100},
        {"id": "per-source", "by": ["source"], "per_second": 50, "source_prefix_v4": 24},
        {"id": "per-user", "by": ["user"], "functions": ["trading"], "quota": {"per_day": 1000, "timezone": "Asia/Shanghai"}}
    ]))
    .unwrap();
    let (apis, _) = apis();
    let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
    let now = 1_800_000_000_000;
    let call = |app, api: usize, user, source| Call {
        app,
        api: apis.get(api),
        user,
        source,
    };
    let a = r.counters(&call(Some("broker-a"), 0, None, ip("192.0.2.1")), now);
    assert_eq!(
        a.iter().map(|c| c.rule.as_str()).collect::<Vec<_>>(),
        ["per-app-api", "per-source"]
    );
    assert_eq!(a[0].windows.len(), 2);
    // another app, another API of the group, another address in the same /24
    let b = r.counters(&call(Some("broker-b"), 0, None, ip("192.0.2.77")), now);
    assert_ne!(a[0].key, b[0].key);
    assert_eq!(a[1].key, b[1].key);
    let cancel = r.counters(&call(Some("broker-a"), 1, None, ip("198.51.100.1")), now);
    assert_ne!(a[0].key, cancel[0].key);
    assert_ne!(a[1].key, cancel[1].key);
    // no proven app: the per-app rule does not count the call; outside its APIs neither
    let anonymous = r.counters(&call(None, 0, None, ip("192.0.2.1")), now);
    assert_eq!(anonymous.len(), 1);
    assert_eq!(anonymous[0].rule, "per-source");
    let quote = r.counters(&call(Some("broker-a"), 2, Some("u1"), ip("192.0.2.1")), now);
    assert_eq!(quote.len(), 1);
    // the user rule counts by the verified user, with a calendar quota
    let user = r.counters(&call(Some("broker-a"), 1, Some("u1"), ip("192.0.2.1")), now);
    let q = user.iter().find(|c| c.rule == "per-user").unwrap();
    assert_eq!(q.windows[0].span, Span::QuotaDay);
    assert_eq!(q.windows[0].limit, 1000);
    let other = r.counters(&call(Some("broker-a"), 1, Some("u2"), ip("192.0.2.1")), now);
    assert_ne!(
        q.key,
        other.iter().find(|c| c.rule == "per-user").unwrap().key
    );
    // IPv6 sources count by their /64
    let v6a = r.counters(&call(None, 2, None, ip("2001:db8:1:2::1")), now);
    let v6b = r.counters(&call(None, 2, None, ip("2001:db8:1:2::ffff")), now);
    let v6c = r.counters(&call(None, 2, None, ip("2001:db8:1:3::1")), now);
    assert_eq!(v6a[0].key, v6b[0].key);
    assert_ne!(v6a[0].key, v6c[0].key);
}

/// Refusing rules come first, so a refusal is found before an alerting counter counts.
#[test]
fn refusing_rules_are_counted_first() {
    let r = rules(serde_json::json!([
        {"id": "watch", "action": "alert", "per_second": 1},
        {"id": "stop", "per_second": 10}
    ]))
    .unwrap();
    let c = r.counters(&Call::default(), 1_000);
    assert_eq!(
        c.iter()
            .map(|c| (c.rule.as_str(), c.refuse))
            .collect::<Vec<_>>(),
        [("stop", true), ("watch", false)]
    );
}
