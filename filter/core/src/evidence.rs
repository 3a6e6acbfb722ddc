//! Re-verification of S3 signature evidence (DATA-4): an S3 request's audit record keeps what
//! its signature was checked against (the signature base, `Signature-Input`, `Signature`, the
//! content digest, the key id and the key's fingerprint), so that the signature can be checked
//! again later, against the public key that was registered when the request was made, even
//! after that key was rotated out (the keyring of retired keys, `apisec policy apply`).
//!
//! This holds against whoever can write the log, chain key included: a record with a changed
//! order body, path or time no longer verifies under the partner's public key.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::audit_chain::{ChainKey, Finding, Place, Verdict};
pub use crate::crypto::{key_fingerprint, spki_from_pem};
use crate::crypto::{EcdsaVerifier, SoftwareVerifier};
use crate::sf::{self, BareItem, Member};

/// A public key the gateway accepted signatures under, kept for re-verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct KeyringEntry {
    pub app: String,
    pub keyid: String,
    /// Lowercase hex SHA-256 of the key's DER SubjectPublicKeyInfo: what the evidence names.
    pub key_sha256: String,
    pub public_key_pem: String,
    /// For an SM2 key: the signer's distinguishing ID (the default one when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm2_id: Option<String>,
}

/// How the session ID's line of a signature base begins (RFC 9421 `"name": value`).
const SESSION_LINE: &str = "\"x-session-id\": ";
/// What stands in the logged signature base in place of a session ID.
pub const SEALED: &str = "[sealed]";
/// What stands there when the policy has no audit key to seal it with.
pub const REDACTED: &str = "[redacted]";

/// The keystream that hides a session ID in one record's evidence: HMAC-SHA256 under the audit
/// key, in counter mode, over the SHA-256 of the original base (unique per signed request: the
/// base holds its nonce).
fn session_stream(key: &ChainKey, base_sha256: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut i: u32 = 0;
    while out.len() < len {
        let block = key.prf(&[
            b"apisec-evidence-session\0",
            base_sha256.as_bytes(),
            &i.to_be_bytes(),
        ]);
        out.extend_from_slice(&block);
        i = i.saturating_add(1);
    }
    out.truncate(len);
    out
}

/// Base64 SHA-256 of a signature base, as the evidence's `signature_base_sha256` holds it.
fn base_sha256(base: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(crate::sha256::digest(base.as_bytes()))
}

/// A signature base as the log keeps it when it covers a session ID (`seal_session`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedBase {
    /// The base with `[sealed]` (or `[redacted]`) in the session ID's place.
    pub logged: String,
    /// Base64 SHA-256 of the original base, which the log no longer holds: the keystream's
    /// input, and how `apisec audit verify` knows it opened the ID right.
    pub original_sha256: String,
    /// The session ID encrypted under the audit key (base64); None without an audit key.
    pub sealed: Option<String>,
}

/// The session ID is a bearer secret (SES-1, LOG-4) and must not be in the log, though the
/// signature covers it. The logged base has `[sealed]` in its place, and the evidence carries
/// the ID encrypted under the audit key (`session_sealed`, base64) and the hash of the original
/// base, which `apisec audit verify --evidence --key-env VAR` uses to open it and re-verify the
/// signature. Without an audit key the ID is `[redacted]` and the evidence cannot be
/// re-verified. Returns None when the base covers no session ID: it is then logged as it was
/// signed, and nothing is hashed (the hash of a base that stands in the record beside it would
/// repeat it).
pub fn seal_session(key: Option<&ChainKey>, base: &str) -> Option<SealedBase> {
    // most bases cover no session ID: a search, not a copy of every line
    let covered = base
        .match_indices(SESSION_LINE)
        .any(|(i, _)| i == 0 || base.as_bytes().get(i - 1) == Some(&b'\n'));
    if !covered {
        return None;
    }
    let mut sid = None;
    let lines: Vec<String> = base
        .split('\n')
        .map(|l| match l.strip_prefix(SESSION_LINE) {
            Some(v) if sid.is_none() => {
                sid = Some(v.to_string());
                format!(
                    "{SESSION_LINE}{}",
                    if key.is_some() { SEALED } else { REDACTED }
                )
            }
            _ => l.to_string(),
        })
        .collect();
    let sid = sid?;
    let original_sha256 = base_sha256(base);
    let sealed = key.map(|k| {
        let stream = session_stream(k, &original_sha256, sid.len());
        let bytes: Vec<u8> = sid.bytes().zip(stream).map(|(a, b)| a ^ b).collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    });
    Some(SealedBase {
        logged: lines.join("\n"),
        original_sha256,
        sealed,
    })
}

/// The original signature base of evidence whose session ID was sealed, opened with whichever
/// of `keys` sealed it (the one under which the base hashes to `signature_base_sha256`).
fn unseal_session(e: &StoredEvidence, keys: &[ChainKey]) -> Result<String, Failure> {
    let Some(sealed) = &e.session_sealed else {
        if e.signature_base
            .contains(&format!("{SESSION_LINE}{REDACTED}"))
        {
            return Err(invalid(
                "the session ID was redacted (no audit key): the signature cannot be re-verified",
            ));
        }
        return Ok(e.signature_base.clone());
    };
    let Some(original_sha256) = &e.signature_base_sha256 else {
        return Err(invalid(
            "session_sealed without signature_base_sha256: the sealed ID cannot be opened",
        ));
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(sealed)
        .map_err(|_| invalid("session_sealed is not base64"))?;
    let placeholder = format!("{SESSION_LINE}{SEALED}");
    if keys.is_empty() {
        return Err(invalid(
            "the session ID is sealed: give the audit key (--key-env) to re-verify",
        ));
    }
    for k in keys {
        let stream = session_stream(k, original_sha256, bytes.len());
        let sid: Vec<u8> = bytes.iter().zip(stream).map(|(a, b)| a ^ b).collect();
        let Ok(sid) = String::from_utf8(sid) else {
            continue;
        };
        let base = e
            .signature_base
            .replacen(&placeholder, &format!("{SESSION_LINE}{sid}"), 1);
        if &base_sha256(&base) == original_sha256 {
            return Ok(base);
        }
    }
    Err(invalid(
        "the sealed session ID opens under none of the keys given",
    ))
}

/// The evidence of one record, as the audit record carries it.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StoredEvidence {
    pub keyid: String,
    pub alg: String,
    pub signature_input: String,
    pub signature: String,
    /// The hash of the signed base where the logged one differs from it (a session ID sealed
    /// or redacted); records before 2026-12-07 carry it always.
    #[serde(default)]
    pub signature_base_sha256: Option<String>,
    pub signature_base: String,
    #[serde(default)]
    pub content_digest: Option<String>,
    #[serde(default)]
    pub key_sha256: Option<String>,
    #[serde(default)]
    pub session_sealed: Option<String>,
}

/// Why a piece of evidence does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No key in the keyring matches the evidence's fingerprint (or key id, for records that
    /// predate fingerprints).
    UnknownKey(String),
    /// The evidence contradicts itself or the signature does not verify.
    Invalid(String),
}

fn invalid(s: impl Into<String>) -> Failure {
    Failure::Invalid(s.into())
}

/// Checks one record's evidence against the keyring: the base's hash (where the record has
/// one), the signature
/// parameters as the base's last line, the content digest in the base, and the signature
/// under the registered public key. Returns the key that verified it.
pub fn check<'k>(
    e: &StoredEvidence,
    keyring: &'k [KeyringEntry],
    keys: &[ChainKey],
) -> Result<&'k KeyringEntry, Failure> {
    if e.alg != "ecdsa-p256-sha256" && e.alg != crate::apps::Algorithm::Sm2Sm3.as_str() {
        return Err(invalid(format!(
            "algorithm {} cannot be re-verified by a third party",
            e.alg
        )));
    }
    let opened = unseal_session(e, keys)?;
    let e = &StoredEvidence {
        signature_base: opened,
        ..e.clone()
    };
    if let Some(claimed) = &e.signature_base_sha256 {
        if &base_sha256(&e.signature_base) != claimed {
            return Err(invalid(
                "signature_base_sha256 is not the hash of signature_base",
            ));
        }
    }
    let (label, params) = e
        .signature_input
        .split_once('=')
        .ok_or_else(|| invalid("signature_input is not label=params"))?;
    let last = e.signature_base.rsplit('\n').next().unwrap_or("");
    if last != format!("\"@signature-params\": {params}") {
        return Err(invalid(
            "the signature base does not end with the signature's parameters",
        ));
    }
    if let Some(d) = &e.content_digest {
        let line = format!("\"content-digest\": {d}");
        if !e.signature_base.split('\n').any(|l| l == line) {
            return Err(invalid("the content digest is not in the signature base"));
        }
    }
    let dict =
        sf::parse_dictionary(&e.signature).map_err(|_| invalid("signature is not a dictionary"))?;
    let sig = dict
        .iter()
        .find(|(l, _)| *l == label)
        .and_then(|(_, m)| match m {
            Member::Item(i) => match &i.bare {
                BareItem::ByteSeq(b) => Some(b.clone()),
                _ => None,
            },
            Member::InnerList(_) => None,
        })
        .ok_or_else(|| invalid(format!("no byte sequence labelled {label} in signature")))?;
    let candidates: Vec<&KeyringEntry> = match &e.key_sha256 {
        Some(fp) => keyring.iter().filter(|k| &k.key_sha256 == fp).collect(),
        None => keyring.iter().filter(|k| k.keyid == e.keyid).collect(),
    };
    if candidates.is_empty() {
        return Err(Failure::UnknownKey(format!(
            "{} ({})",
            e.keyid,
            e.key_sha256.as_deref().unwrap_or("no fingerprint")
        )));
    }
    let sm2 = e.alg == crate::apps::Algorithm::Sm2Sm3.as_str();
    for k in candidates {
        // the evidence's algorithm decides how the key is read: an SM2 key never verifies an
        // ECDSA signature, nor the reverse (DATA-5)
        let Some(der) = key_der(sm2, &k.public_key_pem) else {
            continue;
        };
        if key_fingerprint(&der) != k.key_sha256 {
            continue; // a keyring line whose fingerprint does not match its key is ignored
        }
        let ok = if sm2 {
            let id = k.sm2_id.as_deref().unwrap_or(crate::apps::SM2_DEFAULT_ID);
            crate::crypto::verify_sm2_sm3(&der, id, e.signature_base.as_bytes(), &sig)
        } else {
            SoftwareVerifier
                .verify_p256_sha256(&der, e.signature_base.as_bytes(), &sig)
                .unwrap_or(false)
        };
        if ok {
            return Ok(k);
        }
    }
    Err(invalid(format!(
        "the signature does not verify under {}'s registered key",
        e.keyid
    )))
}

/// A public key's DER SubjectPublicKeyInfo, read as an SM2 key or as a P-256 one.
fn key_der(sm2: bool, pem: &str) -> Option<Vec<u8>> {
    if sm2 {
        crate::crypto::sm2_spki_from_pem(pem)
    } else {
        spki_from_pem(pem)
    }
}

/// Re-checks the S3 evidence of every record in the logs (`files`: name and text) against the
/// keyring, adding what it finds to `verdict` (its line, and why).
pub fn verify_logs(
    files: &[(String, String)],
    keyring: &[KeyringEntry],
    keys: &[ChainKey],
    verdict: &mut Verdict,
) {
    let (mut checked, mut verified) = (0usize, 0usize);
    for (file, text) in files {
        for (i, line) in text.lines().enumerate() {
            let Ok(rec) = serde_json::from_str::<serde_json::Value>(line) else {
                continue; // the chain check reports unreadable lines
            };
            let Some(ev) = rec.get("evidence") else {
                continue;
            };
            checked += 1;
            let at = Place {
                file: file.clone(),
                line: i + 1,
            };
            let failure = match serde_json::from_value::<StoredEvidence>(ev.clone()) {
                Err(e) => Failure::Invalid(format!("evidence is not readable: {e}")),
                Ok(e) if rec.get("keyid").and_then(|k| k.as_str()) != Some(e.keyid.as_str()) => {
                    Failure::Invalid("the record's keyid is not the evidence's".into())
                }
                Ok(e) => match check(&e, keyring, keys) {
                    Ok(_) => {
                        verified += 1;
                        continue;
                    }
                    Err(f) => f,
                },
            };
            let (kind, detail) = match failure {
                Failure::UnknownKey(k) => (
                    "evidence_key_unknown",
                    format!("no registered key {k} in the keyring"),
                ),
                Failure::Invalid(d) => ("evidence_invalid", d),
            };
            verdict.findings.push(Finding {
                at,
                kind,
                chain: String::new(),
                seq: rec.get("seq").and_then(|s| s.as_u64()),
                detail,
            });
        }
    }
    verdict.evidence_checked = Some(checked);
    verdict.evidence_verified = Some(verified);
}

/// The public keys of a policy's apps (JSON as `apisec policy json` gives it), for the keyring.
pub fn policy_keys(policy: &serde_json::Value) -> Vec<KeyringEntry> {
    let mut out = Vec::new();
    for app in policy
        .get("apps")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        let app_id = app.get("id").and_then(|i| i.as_str()).unwrap_or_default();
        for c in app
            .get("credentials")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
        {
            let (Some(keyid), Some(pem)) = (
                c.get("id").and_then(|i| i.as_str()),
                c.get("public_key_pem").and_then(|p| p.as_str()),
            ) else {
                continue;
            };
            let sm2 = c.get("alg").and_then(|a| a.as_str())
                == Some(crate::apps::Algorithm::Sm2Sm3.as_str());
            if let Some(der) = key_der(sm2, pem) {
                out.push(KeyringEntry {
                    app: app_id.to_string(),
                    keyid: keyid.to_string(),
                    key_sha256: key_fingerprint(&der),
                    public_key_pem: pem.to_string(),
                    sm2_id: sm2.then(|| {
                        c.get("sm2_id")
                            .and_then(|i| i.as_str())
                            .unwrap_or(crate::apps::SM2_DEFAULT_ID)
                            .to_string()
                    }),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    // the tests hash with the sha2 crate: a reference beside core's sha256 module
    use p256::ecdsa::{signature::Signer, Signature, SigningKey};
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    use sha2::{Digest, Sha256};

    fn key(seed: u8) -> (SigningKey, KeyringEntry) {
        let sk = SigningKey::from_bytes(&[seed; 32].into()).unwrap();
        let pk = sk.verifying_key();
        let der = pk.to_public_key_der().unwrap();
        let entry = KeyringEntry {
            app: "a".into(),
            keyid: "k1".into(),
            key_sha256: key_fingerprint(der.as_bytes()),
            public_key_pem: pk.to_public_key_pem(LineEnding::LF).unwrap(),
            sm2_id: None,
        };
        (sk, entry)
    }

    /// Evidence of `base` (its last line the parameters `params`) signed by `sk`, as logged.
    fn signed(sk: &SigningKey, entry: &KeyringEntry, params: &str, base: String) -> StoredEvidence {
        let sig: Signature = sk.sign(base.as_bytes());
        StoredEvidence {
            keyid: "k1".into(),
            alg: "ecdsa-p256-sha256".into(),
            signature_input: format!("sig1={params}"),
            signature: format!(
                "sig1=:{}:",
                base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())
            ),
            signature_base_sha256: None,
            signature_base: base,
            content_digest: None,
            key_sha256: Some(entry.key_sha256.clone()),
            session_sealed: None,
        }
    }

    fn evidence(sk: &SigningKey, entry: &KeyringEntry, body_digest: &str) -> StoredEvidence {
        let params = "(\"@method\" \"@path\" \"content-digest\");created=1700000000;keyid=\"k1\"";
        let base = format!(
            "\"@method\": POST\n\"@path\": /api/v1/orders\n\"content-digest\": {body_digest}\n\"@signature-params\": {params}"
        );
        StoredEvidence {
            content_digest: Some(body_digest.into()),
            ..signed(sk, entry, params, base)
        }
    }

    #[test]
    fn evidence_verifies_under_the_registered_key_and_a_forgery_does_not() {
        let (sk, entry) = key(3);
        let (_, other) = key(4);
        let e = evidence(&sk, &entry, "sha-256=:AAAA:");
        assert_eq!(
            check(&e, &[other.clone(), entry.clone()], &[]).unwrap(),
            &entry
        );
        assert!(matches!(
            check(&e, &[other], &[]),
            Err(Failure::UnknownKey(_))
        ));
        // the order changed after the fact: the base, its hash and the digest rewritten to agree
        let mut forged = e.clone();
        forged.signature_base = forged.signature_base.replace("AAAA", "BBBB");
        forged.content_digest = Some("sha-256=:BBBB:".into());
        assert!(
            matches!(check(&forged, std::slice::from_ref(&entry), &[]), Err(Failure::Invalid(m)) if m.contains("does not verify"))
        );
        // so with the hash that records before 2026-12-07 carry, rewritten to agree
        forged.signature_base_sha256 = Some(
            base64::engine::general_purpose::STANDARD
                .encode(Sha256::digest(forged.signature_base.as_bytes())),
        );
        assert!(
            matches!(check(&forged, std::slice::from_ref(&entry), &[]), Err(Failure::Invalid(m)) if m.contains("does not verify"))
        );
        // such a record verifies with its hash, and not with a hash of another base
        let mut hashed = e.clone();
        hashed.signature_base_sha256 = Some(
            base64::engine::general_purpose::STANDARD
                .encode(Sha256::digest(e.signature_base.as_bytes())),
        );
        assert_eq!(
            check(&hashed, std::slice::from_ref(&entry), &[]).unwrap(),
            &entry
        );
        hashed.signature_base_sha256 = forged.signature_base_sha256.clone();
        assert!(
            matches!(check(&hashed, std::slice::from_ref(&entry), &[]), Err(Failure::Invalid(m)) if m.contains("is not the hash"))
        );
        // inconsistent evidence is refused before any key is tried
        let mut lying = e.clone();
        lying.content_digest = Some("sha-256=:CCCC:".into());
        assert!(matches!(
            check(&lying, std::slice::from_ref(&entry), &[]),
            Err(Failure::Invalid(_))
        ));
        let mut rehashed = e;
        rehashed.signature_base.push(' ');
        assert!(matches!(
            check(&rehashed, &[entry], &[]),
            Err(Failure::Invalid(_))
        ));
    }

    /// Issue 21 item 6: a session ID the signature covers is sealed under the audit key in the
    /// log, and the evidence still re-verifies with that key, and only with it.
    #[test]
    fn a_covered_session_id_is_sealed_and_the_evidence_still_verifies() {
        let (sk, entry) = key(5);
        let sid = "s-3f9a0c7e1b2d4a6f8e0c1b3d5f7a9c2e";
        let params = "(\"@method\" \"x-session-id\");created=1700000000;keyid=\"k1\"";
        let base =
            format!("\"@method\": POST\n\"x-session-id\": {sid}\n\"@signature-params\": {params}");
        let original = signed(&sk, &entry, params, base.clone());
        let sha = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(base.as_bytes()));
        let audit_key =
            ChainKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([7u8; 32]))
                .unwrap();
        let other_key =
            ChainKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([8u8; 32]))
                .unwrap();
        let s = seal_session(Some(&audit_key), &base).unwrap();
        assert_eq!(s.original_sha256, sha);
        assert!(!s.logged.contains(sid) && s.logged.contains("\"x-session-id\": [sealed]"));
        let sealed = s.sealed.unwrap();
        assert!(!sealed.contains(sid));
        let e = StoredEvidence {
            signature_base: s.logged,
            signature_base_sha256: Some(sha),
            session_sealed: Some(sealed),
            ..original
        };
        let ring = std::slice::from_ref(&entry);
        assert_eq!(
            check(&e, ring, &[other_key.clone(), audit_key.clone()]).unwrap(),
            &entry
        );
        assert!(
            matches!(check(&e, ring, &[]), Err(Failure::Invalid(m)) if m.contains("--key-env"))
        );
        assert!(
            matches!(check(&e, ring, &[other_key]), Err(Failure::Invalid(m)) if m.contains("none of the keys"))
        );
        // the sealed ID cannot be opened without the original base's hash
        let unhashed = StoredEvidence {
            signature_base_sha256: None,
            ..e.clone()
        };
        assert!(
            matches!(check(&unhashed, ring, std::slice::from_ref(&audit_key)), Err(Failure::Invalid(m)) if m.contains("without signature_base_sha256"))
        );
        // without an audit key: redacted, and said to be unverifiable
        let r = seal_session(None, &base).unwrap();
        assert!(r.sealed.is_none() && !r.logged.contains(sid) && r.logged.contains("[redacted]"));
        let e = StoredEvidence {
            signature_base: r.logged,
            session_sealed: None,
            ..e
        };
        assert!(
            matches!(check(&e, ring, std::slice::from_ref(&audit_key)), Err(Failure::Invalid(m)) if m.contains("redacted"))
        );
        // a base without a session ID is left as it is
        assert!(seal_session(Some(&audit_key), "\"@method\": GET").is_none());
        // the line's name inside another line's value is not the session's line; first or
        // last, it is
        let inside = "\"x-note\": \"x-session-id\": abc\n\"@method\": GET";
        assert!(seal_session(Some(&audit_key), inside).is_none());
        for b in [
            format!("\"x-session-id\": {sid}\n\"@method\": GET"),
            format!("\"@method\": GET\n\"x-session-id\": {sid}"),
        ] {
            let logged = seal_session(Some(&audit_key), &b).unwrap().logged;
            assert!(
                !logged.contains(sid) && logged.contains("[sealed]"),
                "{logged}"
            );
        }
    }
}
