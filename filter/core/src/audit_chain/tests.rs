//! Unit tests of the parent module.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use super::*;

fn key() -> ChainKey {
    ChainKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([7u8; 32])).unwrap()
}

fn log(n: usize) -> (Vec<String>, Chain) {
    let k = key();
    let mut c = Chain::new(&[1; 8]);
    let lines = (0..n)
        .map(|i| c.seal(&k, &format!("{{\"ts\":{i},\"path\":\"/a\"}}")))
        .collect();
    (lines, c)
}

fn check(lines: &[String], envoy: &str) -> Verdict {
    verify(
        &[("audit.log".into(), lines.join("\n"))],
        &[key()],
        &[("envoy.log".into(), envoy.into())],
        false,
    )
}

fn kinds(v: &Verdict) -> Vec<(&'static str, usize)> {
    v.findings.iter().map(|f| (f.kind, f.at.line)).collect()
}

#[test]
fn a_sealed_record_is_its_json_object_with_chain_fields() {
    let (lines, _) = log(2);
    let rec: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(rec["ts"], 1);
    assert_eq!(rec["seq"], 2);
    assert_eq!(rec["chain"], "0101010101010101-0");
    assert_eq!(rec["mac"].as_str().unwrap().len(), 64);
    assert!(check(&lines, "").intact());
}

/// LOG-5: the operations log is appended to by one process after another, each resuming
/// the chain from the last line; the result verifies as one chain.
#[test]
fn a_chain_resumed_from_its_last_line_continues_it() {
    let (mut lines, _) = log(2);
    let mut resumed = Chain::resume(lines.last().unwrap()).unwrap();
    lines.push(resumed.seal(&key(), "{\"ts\":9}"));
    let rec: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    assert_eq!(
        (rec["seq"].as_u64(), rec["chain"].as_str()),
        (Some(3), Some("0101010101010101-0"))
    );
    assert!(check(&lines, "").intact());
    assert!(
        Chain::resume("{\"ts\":1}").is_none(),
        "an unsealed line starts no chain"
    );
    // a resumed chain that skipped a line (the writer read a stale tail) is caught
    let mut stale = Chain::resume(&lines[1]).unwrap();
    lines.push(stale.seal(&key(), "{\"ts\":10}"));
    assert!(!check(&lines, "").intact());
}

/// LOG-1: every kind of tampering is found, at its line.
#[test]
fn modify_delete_insert_reorder_and_truncate_are_found() {
    let (lines, mut chain) = log(6);
    let cp = chain.checkpoint(100).unwrap();
    assert!(chain.checkpoint(101).is_none(), "nothing new to vouch for");
    let envoy = format!("[info][wasm] wasm log apisec: {cp}\n");
    assert!(check(&lines, &envoy).intact());

    let mut m = lines.clone();
    m[2] = m[2].replace("\"/a\"", "\"/b\"");
    assert_eq!(kinds(&check(&m, &envoy)), [("modified", 3)]);

    let mut d = lines.clone();
    d.remove(3);
    assert_eq!(kinds(&check(&d, &envoy)), [("deleted", 4)]);

    let mut i = lines.clone();
    i.insert(5, lines[1].clone());
    assert_eq!(kinds(&check(&i, &envoy)), [("inserted", 6)]);
    let mut forged = lines.clone();
    forged.insert(5, "{\"ts\":9,\"path\":\"/x\"}".into());
    assert_eq!(kinds(&check(&forged, &envoy)), [("unreadable", 6)]);

    let mut r = lines.clone();
    r.swap(2, 3);
    assert_eq!(kinds(&check(&r, &envoy)), [("reordered", 4)]);

    let t = lines[..4].to_vec();
    assert_eq!(kinds(&check(&t, &envoy)), [("truncated", 1)]);
    // Without the checkpoint, a cut tail is not seen: what the trust model says.
    assert!(check(&t, "").intact());
}

#[test]
fn chains_of_several_workers_interleave_and_keys_rotate() {
    let k = key();
    let mut a = Chain::new(&[1; 8]);
    let mut b = Chain::new(&[2; 8]);
    let mut lines = Vec::new();
    for i in 0..4 {
        lines.push(a.seal(&k, &format!("{{\"n\":{i}}}")));
        lines.push(b.seal(&k, &format!("{{\"n\":{i}}}")));
    }
    let v = check(&lines, "");
    assert!(v.intact(), "{:?}", v.findings);
    assert_eq!((v.records, v.chains), (8, 2));
    // A new key starts a new chain (epoch 1), sealed with the new key.
    let k2 = ChainKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([9u8; 32]))
        .unwrap();
    let line = a.seal(&k2, "{}");
    assert!(line.contains("\"chain\":\"0101010101010101-1\",\"seq\":1"));
    lines.push(line);
    let v = check(&lines, "");
    assert_eq!(kinds(&v), [("unknown_key", 9)]);
    let v = verify(
        &[("a".into(), lines.join("\n"))],
        &[key(), k2.clone()],
        &[],
        false,
    );
    assert!(v.intact(), "{:?}", v.findings);
    // Envoy's own records are counted, not checked; a wrong key finds every record.
    let with_envoy = format!(
        "{}\n{{\"source\":\"envoy\",\"status\":400}}",
        lines.join("\n")
    );
    // Issue 21 item 7: a line shaped like Envoy's own record is a finding by default (anyone
    // can insert one); counted only when the check allows it (older logs).
    let v = verify(
        &[("a".into(), with_envoy.clone())],
        &[key(), k2.clone()],
        &[],
        false,
    );
    assert_eq!(kinds(&v), [("unchained", 10)]);
    let v = verify(&[("a".into(), with_envoy)], &[key(), k2], &[], true);
    assert!(v.intact() && v.unchained == 1);
}

#[test]
fn keys_are_checked_and_never_shown() {
    assert!(ChainKey::from_base64("c2hvcnQ=").is_err());
    assert!(ChainKey::from_base64("not base64!").is_err());
    let k = key();
    assert_eq!(format!("{k:?}"), format!("ChainKey({})", k.id));
}

/// LOG-4: a record's mac is keyed BLAKE3 under a key derived from the chain key, over the
/// previous mac and the record's bytes up to its own mac; the record names the key `b3:<id>`.
#[test]
fn a_record_is_sealed_with_keyed_blake3_under_a_derived_key() {
    let (lines, _) = log(2);
    let k = key();
    let rec: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(rec["key"], format!("b3:{}", k.id));
    let cut = lines[0].find(",\"mac\":").unwrap();
    let content = format!("{}}}", &lines[0][..cut]);
    let mac_key = blake3::derive_key("apisec audit chain mac 2026-12", &[7u8; 32]);
    let mut h = blake3::Hasher::new_keyed(&mac_key);
    h.update(&[0u8; 32]);
    h.update(content.as_bytes());
    assert_eq!(rec["mac"], hex(h.finalize().as_bytes()));
    // the chain key is not the BLAKE3 key itself
    assert_ne!(mac_key, [7u8; 32]);
}

/// Records sealed with HMAC-SHA256 before the chain moved to BLAKE3 still verify, and a change
/// to one is still found.
#[test]
fn records_sealed_with_hmac_before_still_verify() {
    let k = key();
    let mut prev = [0u8; 32];
    let mut lines = Vec::new();
    for seq in 1..=3u64 {
        let content = format!(
            "{{\"ts\":{seq},\"chain\":\"0202020202020202-0\",\"seq\":{seq},\"key\":\"{}\"}}",
            k.id
        );
        let mac = k.mac(MacKind::HmacSha256, &prev, content.as_bytes());
        prev = mac;
        lines.push(format!(
            "{},\"mac\":\"{}\"}}",
            content.strip_suffix('}').unwrap(),
            hex(&mac)
        ));
    }
    assert!(
        check(&lines, "").intact(),
        "{:?}",
        check(&lines, "").findings
    );
    lines[1] = lines[1].replace("\"ts\":2", "\"ts\":7");
    assert_eq!(kinds(&check(&lines, "")), vec![("modified", 2)]);
}

/// A BLAKE3 record relabelled as an HMAC one (its `key` field stripped of `b3:`) or the other
/// way round no longer verifies: the label is under the mac.
#[test]
fn a_record_relabelled_to_the_other_mac_is_modified() {
    let (mut lines, _) = log(3);
    let k = key();
    lines[1] = lines[1].replace(&format!("\"b3:{}\"", k.id), &format!("\"{}\"", k.id));
    assert_eq!(kinds(&check(&lines, "")), vec![("modified", 2)]);
}

#[test]
fn a_record_is_extended_where_its_object_closes() {
    let k = key();
    let members = |line: &str| {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        // (sorted: the order is checked on the text below)
        v.as_object().unwrap().keys().cloned().collect::<Vec<_>>()
    };
    let mut c = Chain::new(&[2; 8]);
    // members kept, the chain's after them; trailing blanks dropped; an empty object gets no
    // leading comma; what is not an object is sealed as an object of nothing
    let line = c.seal(&k, "{\"ts\":1,\"path\":\"/a\"}  \n");
    assert_eq!(members(&line), ["chain", "key", "mac", "path", "seq", "ts"]);
    assert!(
        line.starts_with("{\"ts\":1,\"path\":\"/a\",\"chain\":"),
        "{line}"
    );
    let line = c.seal(&k, "{ }");
    assert!(line.starts_with("{ \"chain\":"), "{line}");
    let line = c.seal(&k, "not an object");
    assert!(line.starts_with("{\"chain\":"), "{line}");
    // the owned and the borrowed forms seal alike
    let (mut a, mut b) = (Chain::new(&[3; 8]), Chain::new(&[3; 8]));
    for body in ["{\"n\":1}", "{}", "x"] {
        assert_eq!(a.seal(&k, body), b.seal_owned(&k, body.to_string()));
    }
}
