//! Unit tests of the session store on the local backend.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]
use std::collections::HashSet;

use super::local::*;
use crate::error::DenyReason;
use crate::sessions::*;
use crate::store::{self, MemoryStore, SharedStore as _, StoreMeta};

fn settings() -> Sessions {
    Sessions {
        create_api: 0,
        logout_api: 1,
        idle_timeout_seconds: 60,
        max_lifetime_seconds: 300,
        slots: 1,
        entries_per_slot: 2,
        ip_unbound_apps: HashSet::from(["mobile".to_string()]),
        operator_route: None,
        operators: Vec::new(),
        login_apis: Vec::new(),
        login_header: "x-apisec-login".into(),
        max_per_app: 2,
        establish_per_minute: 5,
        establish_per_source_per_minute: 3,
    }
}

fn session(app: &str, user: Option<&str>, now: u64) -> Session {
    Session {
        tag: String::new(),
        app: app.into(),
        ip: "192.0.2.1".into(),
        mac: "aa:bb:cc:dd:ee:ff".into(),
        user: user.map(str::to_string),
        factors: 0,
        created: now,
        last_seen: now,
        seq: 0,
    }
}

fn call<'a>(id: &'a str, app: &'a str) -> Presented<'a> {
    Presented {
        id,
        app,
        ip: "192.0.2.1",
        mac: "aa:bb:cc:dd:ee:ff",
    }
}

fn setup() -> (MemoryStore, StoreMeta, Sessions) {
    let s = MemoryStore::default();
    let meta = store::open(&s, [7; 16], 1000, 4).unwrap();
    (s, meta, settings())
}

#[test]
fn a_session_lives_while_used_and_ends_when_idle_or_old() {
    let (s, meta, cfg) = setup();
    create(&s, &meta, &cfg, "id-1", session("app", None, 1000), 1000).unwrap();
    // Each use within the idle timeout refreshes it (SES-2).
    for t in [1050, 1100, 1150, 1200, 1250] {
        assert_eq!(
            touch(&s, &meta, &cfg, &call("id-1", "app"), t)
                .unwrap()
                .last_seen,
            t
        );
    }
    // Past the absolute lifetime, even if used all along.
    let e = touch(&s, &meta, &cfg, &call("id-1", "app"), 1301).unwrap_err();
    assert_eq!(e.reason, DenyReason::SessionExpired);
    // Idle longer than the timeout.
    create(&s, &meta, &cfg, "id-2", session("app", None, 2000), 2000).unwrap();
    let e = touch(&s, &meta, &cfg, &call("id-2", "app"), 2061).unwrap_err();
    assert_eq!(e.reason, DenyReason::SessionExpired);
}

#[test]
fn a_session_is_bound_to_app_ip_and_mac() {
    let (s, meta, cfg) = setup();
    create(&s, &meta, &cfg, "id", session("app", None, 1000), 1000).unwrap();
    let other_app = touch(&s, &meta, &cfg, &call("id", "other"), 1001).unwrap_err();
    assert_eq!(other_app.reason, DenyReason::SessionInvalid);
    let mut p = call("id", "app");
    p.ip = "192.0.2.2";
    assert!(touch(&s, &meta, &cfg, &p, 1001)
        .unwrap_err()
        .detail
        .contains("client IP"));
    let mut p = call("id", "app");
    p.mac = "aa:bb:cc:dd:ee:00";
    assert!(touch(&s, &meta, &cfg, &p, 1001)
        .unwrap_err()
        .detail
        .contains("MAC"));
    // An IP-unbound app may move.
    create(&s, &meta, &cfg, "m", session("mobile", None, 1000), 1000).unwrap();
    let mut p = call("m", "mobile");
    p.ip = "198.51.100.9";
    touch(&s, &meta, &cfg, &p, 1001).unwrap();
    assert_eq!(
        touch(&s, &meta, &cfg, &call("nope", "app"), 1001)
            .unwrap_err()
            .reason,
        DenyReason::SessionInvalid
    );
}

#[test]
fn logout_and_operator_ends_are_final() {
    let (s, meta, cfg) = setup();
    create(
        &s,
        &meta,
        &cfg,
        "a1",
        session("app", Some("u1"), 1000),
        1000,
    )
    .unwrap();
    assert!(remove(&s, &meta, &cfg, "app", "a1").unwrap().is_some());
    assert!(touch(&s, &meta, &cfg, &call("a1", "app"), 1001).is_err());
    assert!(remove(&s, &meta, &cfg, "app", "a1").unwrap().is_none());
    // Every session of an app, at once; a session created later is not affected.
    create(&s, &meta, &cfg, "a2", session("app", None, 1000), 1000).unwrap();
    end_all(&s, &meta, "app", "app").unwrap();
    assert!(touch(&s, &meta, &cfg, &call("a2", "app"), 1011)
        .unwrap_err()
        .detail
        .contains("operator"));
    // Even in the same second as the end (the end is ordered by creation, not by the clock).
    create(&s, &meta, &cfg, "a3", session("app", None, 1010), 1010).unwrap();
    touch(&s, &meta, &cfg, &call("a3", "app"), 1010).unwrap();
    // Every session of a user.
    set_user(&s, &meta, &cfg, "app", "a3", "u9", 2).unwrap();
    end_all(&s, &meta, "user", "u9").unwrap();
    assert!(touch(&s, &meta, &cfg, &call("a3", "app"), 1031).is_err());
}

#[test]
fn a_full_slot_evicts_the_session_idle_longest() {
    let (s, meta, cfg) = setup();
    assert!(
        !create(&s, &meta, &cfg, "x1", session("app", None, 1000), 1000)
            .unwrap()
            .evicted
    );
    assert!(
        !create(&s, &meta, &cfg, "x2", session("app", None, 1001), 1001)
            .unwrap()
            .evicted
    );
    touch(&s, &meta, &cfg, &call("x1", "app"), 1002).unwrap(); // x2 now idle longest
    assert!(
        create(&s, &meta, &cfg, "x3", session("app", None, 1003), 1003)
            .unwrap()
            .evicted
    );
    assert!(touch(&s, &meta, &cfg, &call("x2", "app"), 1004).is_err());
    touch(&s, &meta, &cfg, &call("x1", "app"), 1004).unwrap();
    touch(&s, &meta, &cfg, &call("x3", "app"), 1004).unwrap();
}

/// Issue 21 item 1 (SES-1, MON-5): another app's establishes never evict a session; an app
/// past its cap evicts its own; a slot full of others' sessions refuses.
#[test]
fn one_app_cannot_evict_another_apps_sessions() {
    let (s, meta, mut cfg) = setup();
    cfg.entries_per_slot = 3;
    cfg.max_per_app = 2;
    create(
        &s,
        &meta,
        &cfg,
        "v1",
        session("victim", Some("u1"), 1000),
        1000,
    )
    .unwrap();
    for (i, t) in (0..4).zip(1001..) {
        let c = create(
            &s,
            &meta,
            &cfg,
            &format!("m{i}"),
            session("mallory", None, t),
            t,
        );
        // the first two fit; later ones evict mallory's own
        assert_eq!(c.unwrap().evicted, i >= 2, "{i}");
    }
    touch(&s, &meta, &cfg, &call("v1", "victim"), 1010).unwrap();
    // a slot full of others' live sessions refuses instead of evicting them
    cfg.max_per_app = 3;
    create(&s, &meta, &cfg, "m9", session("mallory", None, 1011), 1011).unwrap();
    let full = create(&s, &meta, &cfg, "n1", session("newcomer", None, 1012), 1012).unwrap_err();
    assert_eq!(full.reason, DenyReason::SessionStoreFull);
    touch(&s, &meta, &cfg, &call("v1", "victim"), 1013).unwrap();
}

#[test]
fn establishes_are_bounded_per_app_and_per_source() {
    let (s, _, cfg) = setup();
    for t in 0..3 {
        admit_establish(&s, &cfg, "a", "192.0.2.1", 6000 + t).unwrap();
    }
    let e = admit_establish(&s, &cfg, "a", "192.0.2.1", 6003).unwrap_err();
    assert_eq!(e.reason, DenyReason::SessionRateLimited);
    admit_establish(&s, &cfg, "a", "192.0.2.2", 6004).unwrap(); // the app's 5th
    assert!(admit_establish(&s, &cfg, "a", "192.0.2.3", 6005).is_err()); // its 6th
    admit_establish(&s, &cfg, "b", "192.0.2.1", 6006).unwrap(); // another app
    admit_establish(&s, &cfg, "a", "192.0.2.1", 6060).unwrap(); // the next minute
}

#[test]
fn an_end_never_moves_back_and_a_mark_from_before_session_numbers_still_ends() {
    let (s, meta, cfg) = setup();
    create(&s, &meta, &cfg, "b1", session("app", None, 1000), 1000).unwrap();
    // A later number already in the mark (another end that saw a later session) stays.
    let key = mark_key("app", "app", &meta);
    s.set(&key, b"seq:99", None).unwrap();
    end_all(&s, &meta, "app", "app").unwrap();
    assert_eq!(s.get(&key).unwrap().unwrap().0, b"seq:99");
    // A mark written as a second (the build before session numbers) ends what was created up
    // to that second; an unreadable mark ends everything (fail closed).
    create(&s, &meta, &cfg, "u1", session("other", None, 1000), 1000).unwrap();
    create(&s, &meta, &cfg, "u2", session("other", None, 1005), 1005).unwrap();
    let other = mark_key("app", "other", &meta);
    s.set(&other, b"1002", None).unwrap();
    assert!(touch(&s, &meta, &cfg, &call("u1", "other"), 1006).is_err());
    touch(&s, &meta, &cfg, &call("u2", "other"), 1006).unwrap();
    s.set(&other, b"garbage", None).unwrap();
    assert!(touch(&s, &meta, &cfg, &call("u2", "other"), 1006).is_err());
}
