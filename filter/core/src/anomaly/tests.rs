//! The anomaly rules' unit tests.
#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)] // test code

use super::*;
use crate::state::anomalies::run_local;
use crate::state::Answer;
use crate::store::MemoryStore;

fn hours(tz: &str, days: Option<Vec<&str>>, from: &str, to: &str, action: RuleAction) -> Anomalies {
    RawAnomalies {
        working_hours: vec![RawHours {
            id: "h".into(),
            timezone: tz.into(),
            days: days.map(|d| d.into_iter().map(String::from).collect()),
            from: from.into(),
            to: to.into(),
            apis: vec![],
            apps: vec![],
            action,
        }],
        usual_sources: vec![],
        ..Default::default()
    }
    .compile(|_| true, |_| true, None)
    .unwrap()
}

// 2026-11-30 (a Monday) 01:30 UTC = 09:30 in +08:00
const MON_0930_CST: u64 = 1_796_002_200;

#[test]
fn working_hours_in_an_explicit_zone() {
    let h = hours("+08:00", None, "09:00", "15:30", RuleAction::Alert);
    assert_eq!(h.check("a", "x", None, MON_0930_CST), vec![]);
    // the same instant is 01:30 in UTC: outside the same window written for UTC
    let utc = hours("UTC", None, "09:00", "15:30", RuleAction::Alert);
    assert_eq!(
        utc.check("a", "x", None, MON_0930_CST)[0].kind,
        "working_hours"
    );
    // Saturday 09:30 +08:00 is outside Monday to Friday
    assert_eq!(h.check("a", "x", None, MON_0930_CST + 5 * 86_400).len(), 1);
    let at_1530 = MON_0930_CST + 6 * 3600;
    assert!(
        blocking(&h.check("a", "x", None, at_1530)).is_none(),
        "alert only"
    );
    let block = hours("+08:00", None, "09:00", "15:30", RuleAction::Block);
    let d = blocking(&block.check("a", "x", None, at_1530)).unwrap();
    assert_eq!(d.reason, DenyReason::AnomalyBlocked);
}

#[test]
fn a_night_session_belongs_to_the_day_it_starts() {
    // Monday to Friday 21:00 - 02:30 (+08:00)
    let n = hours("+08:00", None, "21:00", "02:30", RuleAction::Block);
    let outside = |t| !n.check("a", "x", None, t).is_empty();
    let mon_2130 = MON_0930_CST + 12 * 3600;
    assert!(!outside(mon_2130));
    assert!(
        !outside(mon_2130 + 4 * 3600),
        "Tuesday 01:30 is Monday's night"
    );
    assert!(outside(mon_2130 + 6 * 3600), "Tuesday 03:30");
    let sat_0130 = MON_0930_CST + 5 * 86_400 - 8 * 3600; // Saturday 01:30: Friday's night
    assert!(!outside(sat_0130));
    assert!(
        outside(sat_0130 + 86_400),
        "Sunday 01:30: Saturday has no night"
    );
}

#[test]
fn usual_sources_and_bad_rules() {
    let s = RawAnomalies {
        working_hours: vec![],
        usual_sources: vec![RawSources {
            id: "desk".into(),
            app: "a".into(),
            ranges: vec!["10.1.0.0/16".into()],
            action: RuleAction::Alert,
        }],
        ..Default::default()
    }
    .compile(|_| true, |_| true, None)
    .unwrap();
    assert_eq!(s.check("a", "x", "10.1.2.3".parse().ok(), 0), vec![]);
    assert_eq!(s.check("b", "x", "192.0.2.1".parse().ok(), 0), vec![]);
    assert_eq!(
        s.check("a", "x", "192.0.2.1".parse().ok(), 0)[0].rule,
        "desk"
    );
    assert_eq!(
        s.check("a", "x", None, 0)[0].rule,
        "desk",
        "no address: not a usual one"
    );
    for (tz, from) in [
        ("CST", "09:00"),
        ("+08", "09:00"),
        ("+08:00", "9:00"),
        ("+08:00", "24:00"),
        ("Asia/Shanghai", "09:00"),
        ("+14:30", "09:00"),
        ("+08:00", "+9:00"),
    ] {
        let raw = RawAnomalies {
            working_hours: vec![RawHours {
                id: "h".into(),
                timezone: tz.into(),
                days: None,
                from: from.into(),
                to: "15:00".into(),
                apis: vec![],
                apps: vec![],
                action: RuleAction::Alert,
            }],
            usual_sources: vec![],
            ..Default::default()
        };
        assert!(
            raw.compile(|_| true, |_| true, None).is_err(),
            "{tz} {from}"
        );
    }
}

fn counted(yaml: serde_json::Value, bans: Option<&BanSettings>) -> Anomalies {
    serde_json::from_value::<RawAnomalies>(yaml)
        .unwrap()
        .compile(|_| true, |_| true, bans)
        .unwrap()
}

fn run(
    store: &MemoryStore,
    a: &Anomalies,
    ops: Vec<Op>,
    bans: Option<&BanSettings>,
    now: u64,
) -> (Answer, Option<Deny>) {
    let mut answer = Answer::default();
    for op in &ops {
        if let Err(d) = run_local(store, bans, op, now, &mut answer) {
            return (answer, Some(d));
        }
    }
    let _ = a;
    (answer, None)
}

const T: u64 = 1_800_000_000; // a multiple of 3600

/// MON-3: calls over the window's maximum are anomalies; a blocking rule refuses them and
/// does not count them; a new window starts from nothing.
#[test]
fn bulk_pulls_by_calls_in_alert_and_block() {
    let a = counted(
        serde_json::json!({"bulk_pulls": [
            {"id": "watch", "apps": ["a"], "window_seconds": 3600, "max_calls": 2, "action": "alert"},
            {"id": "stop", "apps": ["b"], "window_seconds": 3600, "max_calls": 2, "action": "block"}]}),
        None,
    );
    let store = MemoryStore::default();
    for (n, want) in [(1, 0), (2, 0), (3, 1), (4, 1)] {
        let (ans, refused) = run(&store, &a, a.call_ops("a", "x", None, T + n), None, T + n);
        assert!(refused.is_none());
        assert_eq!(ans.anomalies.len(), want, "call {n}");
    }
    assert_eq!(
        a.call_ops("c", "x", None, T).len(),
        0,
        "rules name their apps"
    );
    for n in 1..=2 {
        assert!(
            run(&store, &a, a.call_ops("b", "x", None, T + n), None, T + n)
                .1
                .is_none()
        );
    }
    for _ in 0..3 {
        let (ans, refused) = run(&store, &a, a.call_ops("b", "x", None, T + 5), None, T + 5);
        assert_eq!(refused.unwrap().reason, DenyReason::AnomalyBlocked);
        assert_eq!(ans.anomalies[0].action, "block");
    }
    let next = T + 3600;
    assert!(
        run(&store, &a, a.call_ops("b", "x", None, next), None, next)
            .1
            .is_none()
    );
}

/// MON-3: response bytes counted when a response ends; the calls after the window's bytes
/// passed the maximum are the anomaly; a late tally for an ended window is dropped.
#[test]
fn bulk_pulls_by_response_bytes() {
    let a = counted(
        serde_json::json!({"bulk_pulls": [
            {"id": "bytes", "window_seconds": 60, "max_response_bytes": 1000, "apis": ["x"], "action": "block"}]}),
        None,
    );
    let store = MemoryStore::default();
    assert!(a.bytes_ops("a", "y", 5000, T).is_empty(), "another API");
    assert!(run(&store, &a, a.call_ops("a", "x", None, T), None, T)
        .1
        .is_none());
    run(&store, &a, a.bytes_ops("a", "x", 600, T), None, T);
    assert!(
        run(&store, &a, a.call_ops("a", "x", None, T + 1), None, T + 1)
            .1
            .is_none()
    );
    run(&store, &a, a.bytes_ops("a", "x", 600, T + 1), None, T + 1);
    let refused = run(&store, &a, a.call_ops("a", "x", None, T + 2), None, T + 2)
        .1
        .unwrap();
    assert!(
        refused.detail.contains("1200 response bytes"),
        "{}",
        refused.detail
    );
    // the next window; a tally from the last one does not count in it
    let next = T + 60;
    assert!(
        run(&store, &a, a.call_ops("a", "x", None, next), None, next)
            .1
            .is_none()
    );
    run(&store, &a, a.bytes_ops("a", "x", 5000, T + 59), None, next);
    assert!(run(
        &store,
        &a,
        a.call_ops("a", "x", None, next + 1),
        None,
        next + 1
    )
    .1
    .is_none());
    assert!(
        run(
            &store,
            &a,
            a.call_ops("b", "x", None, next + 1),
            None,
            next + 1
        )
        .1
        .is_none(),
        "per app"
    );
}

/// MON-3: a source never seen for the app is an anomaly once (alert), refused (block)
/// unless approved; learned silently before `learn_until`; the oldest forgotten past the
/// bound; forgotten after `forget_days`.
#[test]
fn new_sources_learn_alert_block_and_forget() {
    let a = counted(
        serde_json::json!({"new_sources": [
            {"id": "seen", "apps": ["a"], "max_sources": 2, "forget_days": 1, "action": "alert"},
            {"id": "gate", "apps": ["b"], "approved": ["10.9.0.0/16"], "learn_until": "2027-01-15T08:00:00Z", "action": "block"}]}),
        None,
    );
    let store = MemoryStore::default();
    let ip = |s: &str| s.parse::<IpAddr>().ok();
    let go = |app: &str, src: &str, now: u64| {
        run(&store, &a, a.call_ops(app, "x", ip(src), now), None, now)
    };
    assert_eq!(go("a", "192.0.2.1", T).0.anomalies[0].kind, NEW_SOURCE);
    assert!(
        go("a", "192.0.2.1", T + 1).0.anomalies.is_empty(),
        "seen now"
    );
    assert_eq!(go("a", "192.0.2.2", T + 2).0.anomalies.len(), 1);
    assert_eq!(
        go("a", "192.0.2.3", T + 3).0.anomalies.len(),
        1,
        "evicts .1, the oldest"
    );
    assert!(go("a", "192.0.2.3", T + 4).0.anomalies.is_empty());
    assert_eq!(
        go("a", "192.0.2.1", T + 5).0.anomalies.len(),
        1,
        ".1 was forgotten for room"
    );
    assert_eq!(
        go("a", "192.0.2.3", T + 4 + 86_400).0.anomalies.len(),
        1,
        "forgotten after a day"
    );
    // IPv6: one /64 is one source
    assert_eq!(go("a", "2001:db8:1:2::1", T + 10).0.anomalies.len(), 1);
    assert!(go("a", "2001:db8:1:2::99", T + 11).0.anomalies.is_empty());
    // block: learning until 2027-01-15T08:00:00Z (1_800_000_000 + 0), then refusing
    let learn = 1_800_000_000 - 100;
    assert!(
        go("b", "192.0.2.7", learn).1.is_none()
            && go("b", "192.0.2.7", learn).0.anomalies.is_empty()
    );
    let after = 1_800_000_000 + 10;
    assert!(go("b", "192.0.2.7", after).1.is_none(), "learned");
    let (ans, refused) = go("b", "192.0.2.8", after);
    assert_eq!(refused.unwrap().reason, DenyReason::AnomalyBlocked);
    assert_eq!(ans.anomalies[0].action, "block");
    assert!(
        go("b", "192.0.2.8", after + 1).1.is_some(),
        "a refused source is not learned"
    );
    assert!(
        a.call_ops("b", "x", ip("10.9.3.4"), after).is_empty(),
        "approved"
    );
}

/// MON-4: failures under one key from many sources, each under the ban threshold of its
/// own, reach the rule's threshold; from then on a blocking rule bans each failing source;
/// the key and other sources stay usable.
#[test]
fn signature_failures_ban_the_source_not_the_key() {
    let bans = crate::state::bans::RawBans {
        threshold: 100,
        window_seconds: 60,
        ban_seconds: 600,
        ip_slots: 4,
        entries_per_slot: 8,
        ipv6_prefix: 64,
        lifted: vec![],
    }
    .compile()
    .unwrap();
    let a = counted(
        serde_json::json!({"signature_failures": [
            {"id": "imp", "apps": ["a"], "threshold": 3, "window_seconds": 300, "ban_seconds": 900, "action": "block"},
            {"id": "watch", "apps": ["b"], "threshold": 2, "window_seconds": 300, "action": "alert"}]}),
        Some(&bans),
    );
    let store = MemoryStore::default();
    let ip = |n: u8| Some(IpAddr::from([192, 0, 2, n]));
    let fail = |app: &str, n: u8, now: u64| {
        run(
            &store,
            &a,
            a.failure_ops(app, "k1", ip(n), now),
            Some(&bans),
            now,
        )
        .0
    };
    assert!(fail("a", 1, T).anomalies.is_empty());
    assert!(fail("a", 2, T + 1).anomalies.is_empty());
    // Issue 21 item 2: strangers' failures under the partner's public key id, then one
    // genuine failure of the partner: an anomaly for the key, but no source banned, least
    // of all the partner's.
    let third = fail("a", 3, T + 2);
    assert_eq!(third.anomalies[0].kind, SIGNATURE_FAILURES);
    assert!(third.ban_started.is_none(), "{:?}", third.ban_started);
    let sub = |n: u8| crate::state::bans::Subject::Ip(IpAddr::from([192, 0, 2, n]));
    assert!(bans.check(&store, sub(3), T + 3).is_ok());
    // a source whose own failures reach the threshold is banned, and only it
    assert!(fail("a", 9, T + 3).ban_started.is_none());
    assert!(fail("a", 9, T + 4).ban_started.is_none());
    assert_eq!(
        fail("a", 9, T + 5).ban_started.as_deref(),
        Some("source 192.0.2.9 banned for 900 s (rule imp)")
    );
    assert!(bans.check(&store, sub(9), T + 6).is_err());
    for n in [1, 2, 3] {
        assert!(bans.check(&store, sub(n), T + 6).is_ok(), "source {n}");
    }
    assert!(
        bans.check(&store, sub(9), T + 5 + 900).is_ok(),
        "the ban ends"
    );
    // alert: recorded, nobody banned
    fail("b", 5, T);
    let second = fail("b", 5, T + 1);
    assert_eq!(second.anomalies[0].action, "alert");
    assert!(second.ban_started.is_none());
    assert!(bans.check(&store, sub(5), T + 2).is_ok());
    // block without bans is refused at load
    let no_bans =
        serde_json::from_value::<RawAnomalies>(serde_json::json!({"signature_failures": [
        {"id": "imp", "threshold": 3, "window_seconds": 300, "action": "block"}]}))
        .unwrap()
        .compile(|_| true, |_| true, None);
    assert!(no_bans.unwrap_err().to_string().contains("bans section"));
}

#[test]
fn counted_rules_refuse_bad_settings() {
    for bad in [
        serde_json::json!({"bulk_pulls": [{"id": "x", "window_seconds": 60, "action": "alert"}]}),
        serde_json::json!({"bulk_pulls": [{"id": "x", "window_seconds": 0, "max_calls": 1, "action": "alert"}]}),
        serde_json::json!({"bulk_pulls": [{"id": "x", "window_seconds": 60, "max_calls": 0, "action": "alert"}]}),
        serde_json::json!({"bulk_pulls": [{"id": "a/b", "window_seconds": 60, "max_calls": 1, "action": "alert"}]}),
        serde_json::json!({"new_sources": [{"id": "x", "max_sources": 0, "action": "alert"}]}),
        serde_json::json!({"new_sources": [{"id": "x", "learn_until": "tomorrow", "action": "alert"}]}),
        serde_json::json!({"new_sources": [{"id": "x", "approved": ["10.0.0.1/8"], "action": "alert"}]}),
        serde_json::json!({"signature_failures": [{"id": "x", "threshold": 0, "window_seconds": 60, "action": "alert"}]}),
        serde_json::json!({"signature_failures": [{"id": "x", "threshold": 2, "window_seconds": 60, "ban_seconds": 60, "action": "alert"}]}),
    ] {
        let raw: RawAnomalies = serde_json::from_value(bad.clone()).unwrap();
        assert!(raw.compile(|_| true, |_| true, None).is_err(), "{bad}");
    }
}

#[test]
fn pending_byte_counts_merge_and_drop_ended_windows() {
    let a = counted(
        serde_json::json!({"bulk_pulls": [
            {"id": "bytes", "window_seconds": 60, "max_response_bytes": 1000, "action": "alert"}]}),
        None,
    );
    let mut pending = Vec::new();
    assert_eq!(pend(&mut pending, a.bytes_ops("a", "x", 10, T), T), 0);
    pend(&mut pending, a.bytes_ops("a", "x", 5, T + 1), T + 1);
    pend(&mut pending, a.bytes_ops("b", "x", 7, T + 1), T + 1);
    assert_eq!(pending.len(), 2);
    assert!(matches!(&pending[0], Op::Bytes { bytes: 15, .. }));
    pend(&mut pending, a.bytes_ops("a", "x", 1, T + 60), T + 60);
    assert_eq!(pending.len(), 1, "the ended window is dropped");
    assert!(matches!(&pending[0], Op::Bytes { bytes: 1, .. }));
}
