//! Unit tests of the rate-limit counters: the window arithmetic and the local backend.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use super::local::{run, RateStore};
use super::*;
use crate::store::{self, MemoryStore, SharedStore};

fn counter(rule: &str, refuse: bool, windows: Vec<Window>) -> Counter {
    Counter {
        rule: rule.into(),
        key: format!("k-{rule}"),
        refuse,
        ban: false,
        windows,
    }
}

/// RL-1: the sliding window weights the previous window's calls by the part it still covers.
#[test]
fn a_sliding_window_carries_the_previous_windows_calls_by_weight() {
    // 10 per minute; 30 s into this minute, with 8 calls in the last one and 2 in this one
    let w = Window::sliding(Span::Minute, 10, 60_000 * 100 + 30_000);
    assert_eq!(w.bucket, 100);
    assert_eq!(w.holds(2, 8), 2 + 4);
    assert!(!w.over(2, 8));
    assert!(w.over(6, 8)); // 6 + 4 = 10: one more would pass the limit
                           // the wait is until enough of the previous minute has slid out: 6 + ceil(8*(60-x)/60) < 10
                           // from x = 37.5 s, so 7.5 s from now, told as 8
    let wait = w.retry_after(6, 8);
    assert_eq!(wait, 8);
    let later = Window::sliding(Span::Minute, 10, 60_000 * 100 + 37_500);
    assert!(!later.over(6, 8));
    let sooner = Window::sliding(Span::Minute, 10, 60_000 * 100 + 37_000);
    assert!(sooner.over(6, 8));
    // a call's place is not freed before its weight has gone: 3 calls just before the edge
    // still fill a limit of 3 just after it
    let edge = Window::sliding(Span::Minute, 3, 60_000 * 101 + 1);
    assert!(edge.over(0, 3));
}

/// RL-1: a full current window waits for the next one, and there for its own calls to slide
/// out far enough.
#[test]
fn a_full_window_says_how_long_until_it_admits_again() {
    let w = Window::sliding(Span::Second, 5, 1_000 * 7 + 200);
    assert!(w.over(5, 0));
    let wait = w.retry_after(5, 0);
    // 0.8 s to the next second; there ceil(5*(1-x)) <= 4 from x = 0.2 s: 1 s in all
    assert_eq!(wait, 1);
    let then = Window::sliding(Span::Second, 5, 1_000 * 7 + 200 + u64::from(wait) * 1000);
    assert_eq!(then.bucket, 8);
    assert!(!then.over(0, 5));
    let before = Window::sliding(Span::Second, 5, 1_000 * 8 + 199);
    assert!(before.over(0, 5));
    // a quota waits for its period to end
    let q = Window {
        span: Span::QuotaDay,
        limit: 3,
        bucket: 20_000,
        at: 3_600_500,
    };
    assert!(q.over(3, 99));
    assert_eq!(q.retry_after(3, 0), 3601);
}

fn setup() -> (MemoryStore, crate::store::StoreMeta) {
    let s = MemoryStore::default();
    let meta = store::open(&s, [7; 16], 1, 8).unwrap();
    (s, meta)
}

/// RL-1, RL-2: two windows on one counter both apply; a refused call counts in neither.
#[test]
fn every_window_applies_and_a_refused_call_counts_nothing() {
    let (s, meta) = setup();
    let settings = RateStore::default();
    let now = 1_000_000_000;
    let c = |now| {
        counter(
            "r",
            true,
            vec![
                Window::sliding(Span::Second, 10, now),
                Window::sliding(Span::Minute, 3, now),
            ],
        )
    };
    for i in 0..3 {
        let mut a = Answer::default();
        run(&s, &meta, &settings, &[c(now + i)], now + i, &mut a).unwrap();
    }
    let mut a = Answer::default();
    let d = run(&s, &meta, &settings, &[c(now + 5)], now + 5, &mut a).unwrap_err();
    assert_eq!(d.reason, DenyReason::RateLimited);
    assert!(d.retry_after.unwrap() > 1);
    assert_eq!(a.rate_limits[0].window, "minute");
    assert_eq!(a.rate_limits[0].action, "refuse");
    // two minutes later the minute window has emptied
    let later = now + 120_000;
    run(&s, &meta, &settings, &[c(later)], later, &mut a).unwrap();
}

/// A call over a later counter is refused, and the earlier counters it passed give the call
/// back: nothing is counted toward any of them.
#[test]
fn a_refusal_by_one_counter_takes_the_call_back_from_the_others() {
    let (s, meta) = setup();
    let settings = RateStore::default();
    let now = 5_000_000;
    let wide = |now| counter("wide", true, vec![Window::sliding(Span::Hour, 2, now)]);
    let narrow = |now| counter("narrow", true, vec![Window::sliding(Span::Hour, 1, now)]);
    let mut a = Answer::default();
    run(&s, &meta, &settings, &[narrow(now)], now, &mut a).unwrap();
    for _ in 0..3 {
        let d = run(&s, &meta, &settings, &[wide(now), narrow(now)], now, &mut a).unwrap_err();
        assert_eq!(a.rate_limits[0].rule, "narrow");
        assert_eq!(d.reason, DenyReason::RateLimited);
    }
    // `wide` still has both its calls
    run(&s, &meta, &settings, &[wide(now)], now, &mut a).unwrap();
    run(&s, &meta, &settings, &[wide(now)], now, &mut a).unwrap();
    assert!(run(&s, &meta, &settings, &[wide(now)], now, &mut a).is_err());
}

/// An alerting counter over its limit lets the call on, counts it, and reports its rule once.
#[test]
fn an_alerting_counter_reports_and_lets_the_call_on() {
    let (s, meta) = setup();
    let settings = RateStore::default();
    let now = 9_000_000;
    let c = counter(
        "watch",
        false,
        vec![
            Window::sliding(Span::Second, 1, now),
            Window::sliding(Span::Minute, 1, now),
        ],
    );
    let mut a = Answer::default();
    run(&s, &meta, &settings, std::slice::from_ref(&c), now, &mut a).unwrap();
    assert!(a.rate_limits.is_empty());
    run(&s, &meta, &settings, std::slice::from_ref(&c), now, &mut a).unwrap();
    assert_eq!(a.rate_limits.len(), 1);
    assert_eq!(a.rate_limits[0].action, "alert");
}

/// A full slot makes room by the counter idle longest; the store stays within its bound.
#[test]
fn a_full_slot_evicts_the_counter_idle_longest() {
    let (s, meta) = setup();
    let settings = RateStore {
        slots: 1,
        entries_per_slot: 2,
    };
    let c = |rule: &str, now| counter(rule, true, vec![Window::sliding(Span::Day, 1, now)]);
    let mut a = Answer::default();
    run(&s, &meta, &settings, &[c("a", 1_000)], 1_000, &mut a).unwrap();
    run(&s, &meta, &settings, &[c("b", 2_000)], 2_000, &mut a).unwrap();
    assert!(run(&s, &meta, &settings, &[c("a", 3_000)], 3_000, &mut a).is_err());
    // a refused call changes nothing, so `a` (last counted at 1 s) is idle longest: `c` takes
    // its place, and `b` keeps its count
    run(&s, &meta, &settings, &[c("c", 4_000)], 4_000, &mut a).unwrap();
    assert!(run(&s, &meta, &settings, &[c("b", 5_000)], 5_000, &mut a).is_err());
    let (v, _) = s.get("apisec/rate/0").unwrap().unwrap();
    assert_eq!(v.len(), 2 * (16 + 6 * 24));
}
