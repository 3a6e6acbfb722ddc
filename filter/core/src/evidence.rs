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
use sha2::{Digest, Sha256};

use crate::audit_chain::{Finding, Place, Verdict};
use crate::crypto::{hex, EcdsaVerifier, SoftwareVerifier};
use crate::sf::{self, BareItem, Member};

/// A public key the gateway accepted signatures under, kept for re-verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringEntry {
    pub app: String,
    pub keyid: String,
    /// Lowercase hex SHA-256 of the key's DER SubjectPublicKeyInfo: what the evidence names.
    pub key_sha256: String,
    pub public_key_pem: String,
}

/// The fingerprint of a public key, as the evidence and the keyring name it.
pub fn key_fingerprint(spki_der: &[u8]) -> String {
    hex(&Sha256::digest(spki_der))
}

/// A P-256 public key from PEM, as DER SubjectPublicKeyInfo.
pub fn spki_from_pem(pem: &str) -> Option<Vec<u8>> {
    use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
    let key = p256::PublicKey::from_public_key_pem(pem.trim()).ok()?;
    key.to_public_key_der().ok().map(|d| d.as_bytes().to_vec())
}

/// The evidence of one record, as the audit record carries it.
#[derive(Debug, Clone, Deserialize)]
pub struct StoredEvidence {
    pub keyid: String,
    pub alg: String,
    pub signature_input: String,
    pub signature: String,
    pub signature_base_sha256: String,
    pub signature_base: String,
    #[serde(default)]
    pub content_digest: Option<String>,
    #[serde(default)]
    pub key_sha256: Option<String>,
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

/// Checks one record's evidence against the keyring: the base's hash, the signature
/// parameters as the base's last line, the content digest in the base, and the signature
/// under the registered public key. Returns the key that verified it.
pub fn check<'k>(
    e: &StoredEvidence,
    keyring: &'k [KeyringEntry],
) -> Result<&'k KeyringEntry, Failure> {
    if e.alg != "ecdsa-p256-sha256" {
        return Err(invalid(format!(
            "algorithm {} cannot be re-verified by a third party",
            e.alg
        )));
    }
    let hash = base64::engine::general_purpose::STANDARD
        .encode(Sha256::digest(e.signature_base.as_bytes()));
    if hash != e.signature_base_sha256 {
        return Err(invalid(
            "signature_base_sha256 is not the hash of signature_base",
        ));
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
        .find(|(l, _)| l == label)
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
    for k in candidates {
        let Some(der) = spki_from_pem(&k.public_key_pem) else {
            continue;
        };
        if key_fingerprint(&der) != k.key_sha256 {
            continue; // a keyring line whose fingerprint does not match its key is ignored
        }
        if SoftwareVerifier
            .verify_p256_sha256(&der, e.signature_base.as_bytes(), &sig)
            .unwrap_or(false)
        {
            return Ok(k);
        }
    }
    Err(invalid(format!(
        "the signature does not verify under {}'s registered key",
        e.keyid
    )))
}

/// Re-checks the S3 evidence of every record in the logs (`files`: name and text) against the
/// keyring, adding what it finds to `verdict` (its line, and why).
pub fn verify_logs(files: &[(String, String)], keyring: &[KeyringEntry], verdict: &mut Verdict) {
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
                Ok(e) => match check(&e, keyring) {
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
            if let Some(der) = spki_from_pem(pem) {
                out.push(KeyringEntry {
                    app: app_id.to_string(),
                    keyid: keyid.to_string(),
                    key_sha256: key_fingerprint(&der),
                    public_key_pem: pem.to_string(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::{signature::Signer, Signature, SigningKey};
    use p256::pkcs8::{EncodePublicKey, LineEnding};

    fn key(seed: u8) -> (SigningKey, KeyringEntry) {
        let sk = SigningKey::from_bytes(&[seed; 32].into()).unwrap();
        let pk = sk.verifying_key();
        let der = pk.to_public_key_der().unwrap();
        let entry = KeyringEntry {
            app: "a".into(),
            keyid: "k1".into(),
            key_sha256: key_fingerprint(der.as_bytes()),
            public_key_pem: pk.to_public_key_pem(LineEnding::LF).unwrap(),
        };
        (sk, entry)
    }

    fn evidence(sk: &SigningKey, entry: &KeyringEntry, body_digest: &str) -> StoredEvidence {
        let params = "(\"@method\" \"@path\" \"content-digest\");created=1700000000;keyid=\"k1\"";
        let base = format!(
            "\"@method\": POST\n\"@path\": /api/v1/orders\n\"content-digest\": {body_digest}\n\"@signature-params\": {params}"
        );
        let sig: Signature = sk.sign(base.as_bytes());
        StoredEvidence {
            keyid: "k1".into(),
            alg: "ecdsa-p256-sha256".into(),
            signature_input: format!("sig1={params}"),
            signature: format!(
                "sig1=:{}:",
                base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())
            ),
            signature_base_sha256: base64::engine::general_purpose::STANDARD
                .encode(Sha256::digest(base.as_bytes())),
            signature_base: base,
            content_digest: Some(body_digest.into()),
            key_sha256: Some(entry.key_sha256.clone()),
        }
    }

    #[test]
    fn evidence_verifies_under_the_registered_key_and_a_forgery_does_not() {
        let (sk, entry) = key(3);
        let (_, other) = key(4);
        let e = evidence(&sk, &entry, "sha-256=:AAAA:");
        assert_eq!(check(&e, &[other.clone(), entry.clone()]).unwrap(), &entry);
        assert!(matches!(check(&e, &[other]), Err(Failure::UnknownKey(_))));
        // the order changed after the fact: the base, its hash and the digest rewritten to agree
        let mut forged = e.clone();
        forged.signature_base = forged.signature_base.replace("AAAA", "BBBB");
        forged.content_digest = Some("sha-256=:BBBB:".into());
        forged.signature_base_sha256 = base64::engine::general_purpose::STANDARD
            .encode(Sha256::digest(forged.signature_base.as_bytes()));
        assert!(
            matches!(check(&forged, std::slice::from_ref(&entry)), Err(Failure::Invalid(m)) if m.contains("does not verify"))
        );
        // inconsistent evidence is refused before any key is tried
        let mut lying = e.clone();
        lying.content_digest = Some("sha-256=:CCCC:".into());
        assert!(matches!(
            check(&lying, std::slice::from_ref(&entry)),
            Err(Failure::Invalid(_))
        ));
        let mut rehashed = e;
        rehashed.signature_base.push(' ');
        assert!(matches!(
            check(&rehashed, &[entry]),
            Err(Failure::Invalid(_))
        ));
    }
}
