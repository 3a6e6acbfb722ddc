//! Unit tests of the parent module: the endpoint's wire format. The store's rules are tested
//! in `state/sessions/tests.rs`.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]
use super::*;

#[test]
fn macs_and_establish_bodies() {
    assert_eq!(
        normal_mac("AA-BB-CC-00-11-22").as_deref(),
        Some("aa:bb:cc:00:11:22")
    );
    assert_eq!(normal_mac("aa:bb:cc:00:11"), None);
    assert_eq!(normal_mac("aa:bb:cc:00:11:zz"), None);
    let ok = br#"{"caller_code":"app","mac":"AA:BB:CC:DD:EE:FF","ip":"10.0.0.8"}"#;
    assert_eq!(parse_establish(ok, "app").unwrap().0, "aa:bb:cc:dd:ee:ff");
    for bad in [
        &br#"{"caller_code":"other","mac":"aa:bb:cc:dd:ee:ff"}"#[..],
        br#"{"caller_code":"app","mac":"nope"}"#,
        br#"{"caller_code":"app","mac":"aa:bb:cc:dd:ee:ff","ip":"x"}"#,
        br#"{"caller_code":"app","mac":"aa:bb:cc:dd:ee:ff","extra":1}"#,
        b"not json",
    ] {
        assert_eq!(
            parse_establish(bad, "app").unwrap_err().reason,
            DenyReason::SessionRequestInvalid
        );
    }
    assert_eq!(new_id(&[0xff; 24]).len(), 32);
    assert_eq!(parse_login("user=U-1; factors=2"), Some(("u-1".into(), 2)));
    for bad in [
        "user=u",
        "factors=2",
        "user=; factors=2",
        "user=u; factors=0",
        "user=u; factors=x",
        "user=u; factors=2; admin=1",
        "",
    ] {
        assert_eq!(parse_login(bad), None, "{bad}");
    }
}
