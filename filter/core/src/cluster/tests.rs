//! Unit tests of the parent module.
#![allow(clippy::unwrap_used, clippy::panic)] // test code

use super::*;
use crate::sessions::{Misuse, Scope, Sessions};
use crate::state::sessions::key as session_key;
use crate::state::{BanSubject, SessionCall, Watch};

#[test]
fn words_cannot_break_the_command() {
    let mut out = Vec::new();
    word(&mut out, "a+b/c.json d%");
    assert_eq!(out, b"/a%2Bb%2Fc%2Ejson%20d%25");
}

#[test]
fn the_script_is_named_by_its_sha1() {
    assert_eq!(script_sha().len(), 40);
}

const P: Params<'static> = Params {
    skew: 300,
    lifetime: 600,
    bans: None,
    sessions: None,
};

fn nonce_batch(idempotency: bool) -> Batch {
    Batch {
        ops: vec![Op::Nonce {
            app: "a".into(),
            nonce: "n/1+.json".into(),
            created: 1000,
            idempotency,
            record: true,
        }],
        now: 1001,
    }
}

fn reason(d: Decoded) -> Option<DenyReason> {
    match d {
        Decoded::Answer(a) => a.refused.map(|d| d.reason),
        Decoded::LoadScript => panic!("unexpected"),
    }
}

/// The status is asked only when the body is not the script's reply (each answer the Wasm
/// host copies into the VM is an allocation call into it), and then it says why.
#[test]
fn the_status_is_asked_only_for_a_body_that_is_not_the_scripts_reply() {
    let b = nonce_batch(false);
    let asked = std::cell::Cell::new(0);
    let status = |s: &'static str| {
        let asked = &asked;
        move || {
            asked.set(asked.get() + 1);
            Some(s.to_string())
        }
    };
    assert_eq!(
        reason(decode(&b, false, status("200"), br#"{"EVALSHA":["ok"]}"#)),
        None
    );
    assert_eq!(
        reason(decode(
            &b,
            false,
            status("200"),
            br#"{"EVALSHA":["replayed"]}"#
        )),
        Some(DenyReason::NonceReplayed)
    );
    assert_eq!(asked.get(), 0);
    let why = |d: Decoded| match d {
        Decoded::Answer(a) => a.refused.map(|d| (d.reason, d.detail)),
        Decoded::LoadScript => panic!("unexpected"),
    };
    assert_eq!(
        why(decode(&b, false, status("503"), b"no healthy upstream")),
        Some((
            DenyReason::StateUnavailable,
            "state store answered 503 (19 bytes)".into()
        ))
    );
    assert_eq!(asked.get(), 1);
    assert_eq!(
        why(decode(&b, false, status("200"), br#"{"EVALSHA":"ok"}"#)).map(|w| w.1),
        Some("state store answer has an unexpected shape".into())
    );
    assert_eq!(asked.get(), 2);
    assert_eq!(
        why(decode(&b, false, || None, b"")).map(|w| w.1),
        Some("state store answered nothing (0 bytes)".into())
    );
}

/// Fail closed: only the script's own answers mean anything; everything else (Envoy's
/// synthesized 503/504, webdis's 403, a Redis error or LOADING, garbage) is unavailable.
#[test]
fn anything_but_the_scripts_answer_is_state_unavailable() {
    let b = nonce_batch(false);
    let un = Some(DenyReason::StateUnavailable);
    assert_eq!(reason(decode(&b, false, None, b"")), un);
    assert_eq!(
        reason(decode(&b, false, Some("504"), b"upstream request timeout")),
        un
    );
    assert_eq!(reason(decode(&b, false, Some("403"), b"")), un);
    assert_eq!(reason(decode(&b, false, Some("200"), b"not json")), un);
    assert_eq!(
        reason(decode(
            &b,
            false,
            Some("200"),
            br#"{"EVALSHA":[false,"LOADING Redis is loading"]}"#
        )),
        un
    );
    assert_eq!(
        reason(decode(&b, false, Some("200"), br#"{"EVALSHA":["maybe"]}"#)),
        un
    );
    assert_eq!(
        reason(decode(
            &b,
            false,
            Some("200"),
            br#"{"EVALSHA":["ok"],"x":1}"#
        )),
        un
    );
    assert_eq!(
        reason(decode(&b, false, Some("200"), br#"{"GET":["ok"]}"#)),
        un
    );
    assert_eq!(
        reason(decode(&b, false, Some("200"), br#"{"EVALSHA":["ok"]}"#)),
        None
    );
    assert_eq!(
        decode(
            &b,
            false,
            Some("200"),
            br#"{"EVALSHA":[false,"NOSCRIPT No matching script."]}"#
        ),
        Decoded::LoadScript
    );
}

#[test]
fn the_scripts_refusals_keep_their_codes() {
    let ok = Some("200");
    let b = nonce_batch(false);
    assert_eq!(
        reason(decode(&b, false, ok, br#"{"EVALSHA":["replayed"]}"#)),
        Some(DenyReason::NonceReplayed)
    );
    assert_eq!(
        reason(decode(
            &nonce_batch(true),
            false,
            ok,
            br#"{"EVAL":["replayed"]}"#
        )),
        Some(DenyReason::IdempotencyKeyReplayed)
    );
    assert_eq!(
        reason(decode(&b, false, ok, br#"{"EVALSHA":["too_old","999"]}"#)),
        Some(DenyReason::CreatedTooOld)
    );
    assert_eq!(
        reason(decode(&b, false, ok, br#"{"EVALSHA":["full","3"]}"#)),
        Some(DenyReason::ReplayStoreFull)
    );
    assert_eq!(
        reason(decode(&b, false, ok, br#"{"EVALSHA":["exhausted","1"]}"#)),
        Some(DenyReason::GrantExhausted)
    );
    assert_eq!(
        reason(decode(
            &b,
            false,
            ok,
            br#"{"EVALSHA":["banned","ip/192.0.2.1","2000"]}"#
        )),
        Some(DenyReason::Banned)
    );
    match decode(
        &b,
        false,
        ok,
        br#"{"EVALSHA":["ok","ban","app/a","600",""]}"#,
    ) {
        Decoded::Answer(a) => {
            assert_eq!(a.ban_started.as_deref(), Some("app a banned for 600 s"))
        }
        other => panic!("{other:?}"),
    }
}

/// The gauges' read (MON-4, ATK-1): the apps with their lift times, and the answer read
/// back; anything else is no gauges, never made-up ones.
#[test]
fn gauges_are_asked_and_read() {
    let call = encode_gauges(&P, &settings(), ["a", "b c"].into_iter(), 1000, false);
    let text = String::from_utf8(call.body).unwrap();
    assert!(text.ends_with("/GA/2/a/0/b%20c/0"), "{text}");
    assert_eq!(
        decode_gauges(
            false,
            Some("200"),
            br#"{"EVALSHA":["gauges","1","2","30","20"]}"#
        ),
        GaugeAnswer::Counts(StoreCounts {
            apps_banned: 1,
            sources_banned: 2,
            nonces: 30,
            fullest_share: 20
        })
    );
    assert_eq!(
        decode_gauges(
            false,
            Some("200"),
            br#"{"EVALSHA":[false,"NOSCRIPT No matching script"]}"#
        ),
        GaugeAnswer::LoadScript
    );
    for (status, body) in [
        (
            Some("200"),
            &br#"{"EVALSHA":["gauges","1","x","30","20"]}"#[..],
        ),
        (Some("200"), br#"{"EVALSHA":["ok"]}"#),
        (Some("503"), b""),
        (None, b""),
    ] {
        assert!(matches!(
            decode_gauges(false, status, body),
            GaugeAnswer::Failed(_)
        ));
    }
    assert!(matches!(
        decode_gauges(true, Some("200"), br#"{"EVAL":[false,"NOSCRIPT x"]}"#),
        GaugeAnswer::Failed(_)
    ));
}

fn watched(rule: &str, kind: &'static str, block: bool) -> Watch {
    Watch {
        rule: rule.into(),
        app: "a".into(),
        kind,
        action: if block {
            crate::anomaly::RuleAction::Block
        } else {
            crate::anomaly::RuleAction::Alert
        },
    }
}

/// The counted anomaly rules' words, and what their answers mean (MON-3, MON-4).
#[test]
fn anomaly_operations_and_their_answers() {
    use crate::anomaly::{BULK_PULL, NEW_SOURCE, SIGNATURE_FAILURES};
    let b = Batch {
        ops: vec![
            Op::Calls {
                watch: watched("bulk", BULK_PULL, true),
                bucket: 7,
                window: 60,
                max_calls: 10,
                max_bytes: u64::MAX,
            },
            Op::Source {
                watch: watched("src", NEW_SOURCE, false),
                source: "2001:db8::/64".into(),
                learning: false,
                max: 64,
                forget: 86400,
            },
            Op::KeyFailure {
                watch: watched("imp", SIGNATURE_FAILURES, true),
                keyid: "k 1".into(),
                bucket: 3,
                window: 300,
                threshold: 5,
                ban: Some((BanSubject::Ip("192.0.2.9".parse().unwrap()), 900)),
            },
        ],
        now: 1000,
    };
    let call = encode(&P, &settings(), &b, false);
    let text = String::from_utf8(call.body).unwrap();
    assert!(
        text.ends_with(
            "/V/bulk/a/7/60/10/18446744073709551615/1/NS/src/a/2001%3Adb8%3A%3A%2F64/0/64/86400/0\
             /KF/imp/a/k%201/3/300/5/ip%2F192%2E0%2E2%2E9/900/0"
        ),
        "{text}"
    );
    let ok = Some("200");
    match decode(
        &b,
        false,
        ok,
        br#"{"EVALSHA":["ok","anomaly","src","anomaly","imp","ban","ip/192.0.2.9","900","imp"]}"#,
    ) {
        Decoded::Answer(a) => {
            assert_eq!(a.anomalies.len(), 2);
            assert_eq!(
                (a.anomalies[0].kind, a.anomalies[0].action),
                (NEW_SOURCE, "alert")
            );
            assert_eq!(
                (a.anomalies[1].kind, a.anomalies[1].action),
                (SIGNATURE_FAILURES, "block")
            );
            assert_eq!(
                a.ban_started.as_deref(),
                Some("source 192.0.2.9 banned for 900 s (rule imp)")
            );
        }
        other => panic!("{other:?}"),
    }
    match decode(&b, false, ok, br#"{"EVALSHA":["blocked","bulk","10","0"]}"#) {
        Decoded::Answer(a) => {
            let d = a.refused.unwrap();
            assert_eq!(d.reason, DenyReason::AnomalyBlocked);
            assert!(d.detail.contains("made 10 calls"), "{}", d.detail);
            assert_eq!(a.anomalies[0].rule, "bulk");
        }
        other => panic!("{other:?}"),
    }
    // a rule the batch did not ask about is not the script's answer: fail closed
    for body in [
        &br#"{"EVALSHA":["blocked","other"]}"#[..],
        br#"{"EVALSHA":["ok","anomaly","other"]}"#,
        br#"{"EVALSHA":["ok","ban","ip/192.0.2.9","x",""]}"#,
    ] {
        assert_eq!(
            reason(decode(&b, false, ok, body)),
            Some(DenyReason::StateUnavailable)
        );
    }
}

fn sessions() -> Sessions {
    Sessions {
        create_api: 0,
        logout_api: 1,
        idle_timeout_seconds: 60,
        max_lifetime_seconds: 600,
        slots: 4,
        entries_per_slot: 8,
        ip_unbound_apps: ["mobile".to_string()].into_iter().collect(),
        operator_route: None,
        operators: Vec::new(),
        login_apis: Vec::new(),
        login_header: "x-apisec-login".into(),
        max_per_app: 2,
        establish_per_minute: 5,
        establish_per_source_per_minute: 3,
    }
}

fn session_call(id: &str, app: &str) -> SessionCall {
    SessionCall {
        id: id.into(),
        app: app.into(),
        ip: "192.0.2.1".into(),
        mac: "aa:bb:cc:dd:ee:ff".into(),
    }
}

fn settings() -> ClusterSettings {
    let settings = RawState {
        backend: Backend::Cluster,
        cluster: Some(RawCluster {
            envoy_cluster: "apisec_state".into(),
            authority: None,
            timeout_ms: 500,
            key_prefix: "apisec:".into(),
            credentials_env: None,
            app_share: 1000,
        }),
    }
    .compile(None)
    .unwrap();
    let StateBackend::Cluster(c) = settings else {
        panic!()
    };
    c
}

fn words_of(p: &Params<'_>, ops: Vec<Op>) -> Vec<String> {
    let c = settings();
    let body = String::from_utf8(encode(p, &c, &Batch { ops, now: 1000 }, false).body).unwrap();
    body.split('/').skip(7).map(str::to_string).collect()
}

/// Each session operation has the words the script reads, the session ID never among them
/// (its hash is the key), and the IP binding relaxed only for the apps the policy names.
#[test]
fn session_operations_carry_a_hash_of_the_id_and_the_policys_numbers() {
    let s = sessions();
    let p = Params {
        sessions: Some(&s),
        ..P
    };
    let key = session_key("secret-id");
    assert_eq!(key.len(), 32);
    let w = words_of(&p, vec![Op::SessionUse(session_call("secret-id", "app"))]);
    assert_eq!(
        w,
        [
            "S",
            &key,
            "app",
            "192%2E0%2E2%2E1",
            "aa%3Abb%3Acc%3Add%3Aee%3Aff",
            "0",
            "60",
            "600",
            "1"
        ]
    );
    let w = words_of(
        &p,
        vec![Op::SessionRead(session_call("secret-id", "mobile"))],
    );
    assert_eq!((w[5].as_str(), w[8].as_str()), ("1", "0"));
    let w = words_of(
        &p,
        vec![Op::SessionLogin {
            call: session_call("secret-id", "app"),
            user: "u-1".into(),
            factors: 2,
        }],
    );
    assert_eq!(
        (w[0].as_str(), w.len(), w[8].as_str(), w[9].as_str()),
        ("SL", 10, "u-1", "2")
    );
    assert_eq!(
        words_of(&p, vec![Op::SessionEnd(session_call("secret-id", "app"))]).len(),
        8
    );
    let created = Session {
        tag: String::new(),
        app: "app".into(),
        ip: "192.0.2.1".into(),
        mac: "aa:bb:cc:dd:ee:ff".into(),
        user: None,
        factors: 0,
        created: 1000,
        last_seen: 1000,
        seq: 0,
    };
    let w = words_of(
        &p,
        vec![Op::SessionCreate {
            id: "secret-id".into(),
            session: created,
        }],
    );
    assert_eq!(w.len(), 12);
    assert_eq!(
        (w[0].as_str(), w[1].as_str(), w[5].as_str(), w[8].as_str()),
        ("SC", key.as_str(), "", "32")
    );
    assert_eq!(&w[9..], ["2", "5", "3"]);
    let w = words_of(
        &p,
        vec![Op::SessionRevoke(Scope::Session("secret-id".into()))],
    );
    assert_eq!(w, ["SR", &key]);
    let w = words_of(&p, vec![Op::SessionRevoke(Scope::User("u-1".into()))]);
    assert_eq!(w, ["SA", "user", "u-1", "600"]);
    let w = words_of(&p, vec![Op::SessionRevoke(Scope::App("app".into()))]);
    assert_eq!(w, ["SA", "app", "app", "600"]);
    // Without sessions in the policy, a word the script refuses: the batch fails.
    let w = words_of(&P, vec![Op::SessionRevoke(Scope::App("app".into()))]);
    assert_eq!(w, [script::MISMATCH]);
}

#[test]
fn session_answers_are_read_back() {
    let ok = Some("200");
    let b = Batch {
        ops: vec![Op::SessionUse(session_call("id", "app"))],
        now: 1000,
    };
    let body = br#"{"EVALSHA":["ok","session","app","192.0.2.1","aa:bb:cc:dd:ee:ff","u-1","2","990","1000"]}"#;
    match decode(&b, false, ok, body) {
        Decoded::Answer(a) => {
            let got = a.session.unwrap();
            assert_eq!(got.user.as_deref(), Some("u-1"));
            assert_eq!((got.factors, got.created, got.last_seen), (2, 990, 1000));
            assert_eq!(got.tag, session_key("id"));
            assert!(a.refused.is_none());
        }
        other => panic!("{other:?}"),
    }
    let anonymous = br#"{"EVALSHA":["ok","session","app","192.0.2.1","aa:bb:cc:dd:ee:ff","","0","990","1000"]}"#;
    match decode(&b, false, ok, anonymous) {
        Decoded::Answer(a) => assert_eq!(a.session.unwrap().user, None),
        other => panic!("{other:?}"),
    }
    match decode(&b, false, ok, br#"{"EVALSHA":["ok","evicted","nothing"]}"#) {
        Decoded::Answer(a) => assert!(a.evicted && a.nothing_to_end && a.refused.is_none()),
        other => panic!("{other:?}"),
    }
    // Each refusal keeps its code and the wording the local backend gives.
    for (body, misuse) in [
        (
            &br#"{"EVALSHA":["session","unknown"]}"#[..],
            Misuse::Unknown,
        ),
        (br#"{"EVALSHA":["session","lifetime"]}"#, Misuse::Lifetime),
        (br#"{"EVALSHA":["session","idle","75"]}"#, Misuse::Idle(75)),
        (br#"{"EVALSHA":["session","app"]}"#, Misuse::OtherApp),
        (br#"{"EVALSHA":["session","ip"]}"#, Misuse::OtherIp),
        (br#"{"EVALSHA":["session","mac"]}"#, Misuse::OtherMac),
        (
            br#"{"EVALSHA":["session","operator"]}"#,
            Misuse::EndedByOperator,
        ),
    ] {
        match decode(&b, false, ok, body) {
            Decoded::Answer(a) => assert_eq!(a.refused, Some(misuse.deny())),
            other => panic!("{other:?}"),
        }
    }
    // Fail closed on anything else: a short session, an unknown finding or refusal.
    for body in [
        &br#"{"EVALSHA":["ok","session","app","192.0.2.1"]}"#[..],
        br#"{"EVALSHA":["ok","session","app","192.0.2.1","m","","x","990","1000"]}"#,
        br#"{"EVALSHA":["ok","welcome"]}"#,
        br#"{"EVALSHA":["session","maybe"]}"#,
        br#"{"EVALSHA":["session","idle"]}"#,
        br#"{"EVALSHA":["ok",1]}"#,
    ] {
        assert_eq!(
            reason(decode(&b, false, ok, body)),
            Some(DenyReason::StateUnavailable),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

/// The caller's nonce never reaches the command as syntax: it is hashed into the key.
#[test]
fn the_command_carries_no_caller_bytes() {
    let c = settings();
    let call = encode(&P, &c, &nonce_batch(false), false);
    let body = String::from_utf8(call.body).unwrap();
    assert!(body.starts_with("EVALSHA/"), "{body}");
    assert!(!body.contains("n/1") && !body.contains("json"), "{body}");
    assert_eq!(body.split('/').count(), 1 + 1 + 1 + 4 + 6);
    assert!(body.ends_with("/1000"), "the app's share ends it: {body}");
}
