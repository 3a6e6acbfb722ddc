//! Apps and their credentials (ID-1, ID-2, ID-3, OPS-2): who may call, with which keys
//! (HMAC App_Secrets named by environment variable, P-256 and SM2 public keys), which client
//! certificates are bound to them, from which source ranges, whether they are suspended, and
//! from when until when each credential is valid. Its schema, its compilation and its checks
//! live here.

use std::collections::{HashMap, HashSet};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Deny, DenyReason};
use crate::inventory::{valid_id, SecurityLevel};
use crate::ip::Cidr;

/// Signature algorithms a credential can be registered with (RFC 9421 section 3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Algorithm {
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    #[serde(rename = "ecdsa-p256-sha256")]
    EcdsaP256Sha256,
    /// HMAC over SM3 (GB/T 32905), the national counterpart of hmac-sha256 (DATA-5).
    #[serde(rename = "hmac-sm3")]
    HmacSm3,
    /// SM2 signatures over SM3 with the signer's Z value (GB/T 32918, GM/T 0009; DATA-5).
    #[serde(rename = "sm2-sm3")]
    Sm2Sm3,
}

impl Algorithm {
    /// Every algorithm, for the tools that offer them by name.
    pub const ALL: [Algorithm; 4] = [
        Algorithm::HmacSha256,
        Algorithm::HmacSm3,
        Algorithm::EcdsaP256Sha256,
        Algorithm::Sm2Sm3,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::HmacSha256 => "hmac-sha256",
            Algorithm::EcdsaP256Sha256 => "ecdsa-p256-sha256",
            Algorithm::HmacSm3 => "hmac-sm3",
            Algorithm::Sm2Sm3 => "sm2-sm3",
        }
    }

    /// S2 and S3 demand a key pair (ID-3, DATA-4): a shared secret cannot prove who signed.
    pub fn allowed_for(self, level: SecurityLevel) -> bool {
        match self {
            Algorithm::HmacSha256 | Algorithm::HmacSm3 => level <= SecurityLevel::S1,
            Algorithm::EcdsaP256Sha256 | Algorithm::Sm2Sm3 => true,
        }
    }

    /// One of the national algorithms (SM2, SM3; DATA-5).
    pub fn national(self) -> bool {
        matches!(self, Algorithm::HmacSm3 | Algorithm::Sm2Sm3)
    }
}

// ---------------------------------------------------------------- raw document

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawApp {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub credentials: Vec<RawCredential>,
    /// Isolates one caller at once (MON-5): every call refused with `app_suspended`.
    #[serde(default)]
    pub suspended: bool,
    /// Source ranges the app may call from; any when empty.
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// While a partner integrates: a refused signature's response carries the signature base
    /// the gateway computed (never the expected signature), so the partner can compare it
    /// with its own. Off by default; never for production apps (`apisec compliance` shows it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub onboarding: bool,
    /// The SDK versions this app's callers must run (`x-sdk-version`, sdk.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdk: Option<crate::sdk::RawSdk>,
    /// The onboarding record (OPS-7): who admitted the caller, under which ticket, when, for
    /// which business scenario, and the APIs it asked for; its grants may cover those only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<RawAdmission>,
}

/// How a caller was admitted (OPS-7): the record the firm keeps of verifying its identity and
/// admission material, its business scenario and the APIs it needs, before access is granted.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawAdmission {
    /// Who verified the caller's identity and admission material and admitted it.
    pub by: String,
    /// The onboarding ticket (where the material is filed).
    pub ticket: String,
    /// YYYY-MM-DD.
    pub date: String,
    /// The business scenario the caller uses the APIs for.
    pub scenario: String,
    /// The caller's contact for security notices (callers notified at retirement, OPS-9).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub contact: String,
    /// The APIs it asked for: ids, `prefix*` patterns, `group:<id>`.
    pub apis: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    /// The RFC 9421 `keyid` callers put in `Signature-Input`.
    pub id: String,
    /// For signature credentials; a certificate credential has `certificate` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<Algorithm>,
    /// A client certificate bound to the app (ID-2, ID-3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<RawCertificate>,
    /// HMAC: the environment variable holding the base64 App_Secret (never the secret itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// ECDSA and SM2: the app's public key, PEM SubjectPublicKeyInfo (for SM2 the
    /// id-ecPublicKey algorithm with the SM2 curve, OID 1.2.156.10197.1.301, as OpenSSL 3 and
    /// BouncyCastle write it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_pem: Option<String>,
    /// SM2: the signer's distinguishing ID, hashed into its Z value (GM/T 0009); the standard's
    /// default `1234567812345678` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm2_id: Option<String>,
    /// The credential is refused (`credential_not_yet_valid`) before this RFC 3339 time (OPS-2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// The credential is refused (`credential_expired`) after this RFC 3339 time (OPS-2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
}

/// The SM2 distinguishing ID when a credential names none (GM/T 0009-2012 section 10).
pub const SM2_DEFAULT_ID: &str = "1234567812345678";

/// How a client certificate is bound to an app: by the SHA-256 fingerprint of the DER
/// certificate (hex), or by a URI SAN (for example a SPIFFE ID).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_san: Option<String>,
}

// ---------------------------------------------------------------- validated policy

/// Where HMAC secrets come from: the filter reads Envoy-provided environment variables.
pub trait SecretSource {
    fn get(&self, name: &str) -> Option<String>;
}

/// Secrets from a map; used in tests and by the CLI.
impl SecretSource for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

#[derive(Clone)]
pub enum KeyMaterial {
    Hmac(Secret),
    /// SubjectPublicKeyInfo DER, as Envoy's `verify_signature` wants it.
    P256 {
        spki_der: Vec<u8>,
        /// Its fingerprint (evidence.rs), named by S3 evidence (DATA-4).
        sha256: String,
    },
    /// An SM2 public key, checked on the SM2 curve, with the signer's distinguishing ID.
    Sm2 {
        spki_der: Vec<u8>,
        sha256: String,
        id: String,
    },
}

/// An HMAC credential's App_Secret, with its HMAC-SHA-256 key made once when the policy is
/// read (the pads hashed ahead, not on every request).
#[derive(Clone)]
pub struct Secret {
    bytes: Vec<u8>,
    sha256: crate::sha256::HmacKey,
}

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        let sha256 = crate::sha256::HmacKey::new(&bytes);
        Secret { bytes, sha256 }
    }

    /// The secret itself (HMAC-SM3 keys it per request).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Its HMAC-SHA-256 key.
    pub fn sha256(&self) -> &crate::sha256::HmacKey {
        &self.sha256
    }
}

impl KeyMaterial {
    /// The public key's fingerprint that S3 evidence names (DATA-4); none for a secret.
    pub fn fingerprint(&self) -> Option<&str> {
        match self {
            KeyMaterial::P256 { sha256, .. } | KeyMaterial::Sm2 { sha256, .. } => Some(sha256),
            KeyMaterial::Hmac(_) => None,
        }
    }
}

impl std::fmt::Debug for KeyMaterial {
    // Secrets never reach logs, not even through Debug.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyMaterial::Hmac(_) => f.write_str("Hmac(<redacted>)"),
            KeyMaterial::P256 { .. } => f.write_str("P256(<public key>)"),
            KeyMaterial::Sm2 { .. } => f.write_str("Sm2(<public key>)"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Credential {
    pub keyid: String,
    pub alg: Algorithm,
    pub key: KeyMaterial,
    pub validity: Validity,
}

/// When a credential may be used (OPS-2): the period grants have too (PERM-5).
pub type Validity = crate::timeutil::Period;

/// Refuses a credential outside its period, naming it and the bound it is past.
pub fn check_validity(validity: &Validity, keyid: &str, now: u64) -> Result<(), Deny> {
    match validity.outside(now) {
        Some(crate::timeutil::Outside::Before(nb)) => Err(Deny::new(
            DenyReason::CredentialNotYetValid,
            format!("credential {keyid} is valid from {nb}"),
        )),
        Some(crate::timeutil::Outside::After(na)) => Err(Deny::new(
            DenyReason::CredentialExpired,
            format!("credential {keyid} expired at {na}"),
        )),
        None => Ok(()),
    }
}

/// A client certificate bound to an app by one of its credentials.
#[derive(Debug, Clone)]
pub struct BoundCertificate {
    pub keyid: String,
    pub binding: CertBinding,
    pub validity: Validity,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertBinding {
    Sha256(String),
    UriSan(String),
}

impl CertBinding {
    pub fn matches(&self, sha256: Option<&str>, uri_san: Option<&str>) -> bool {
        match self {
            CertBinding::Sha256(f) => sha256.is_some_and(|s| s.eq_ignore_ascii_case(f)),
            CertBinding::UriSan(u) => uri_san == Some(u.as_str()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct App {
    pub id: String,
    pub credentials: Vec<Credential>,
    pub certificates: Vec<BoundCertificate>,
    pub suspended: bool,
    pub allowed_ips: Vec<Cidr>,
    pub onboarding: bool,
    pub sdk: Option<crate::sdk::SdkRule>,
}

impl App {
    pub fn credential(&self, keyid: &str) -> Option<&Credential> {
        self.credentials.iter().find(|c| c.keyid == keyid)
    }
}

fn valid_env_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !s.as_bytes().first().is_some_and(|b| b.is_ascii_digit())
}

fn decode_p256_pem(field: &str, pem: &str) -> Result<Vec<u8>, ConfigError> {
    crate::crypto::spki_from_pem(pem).ok_or_else(|| {
        ConfigError::new(
            field,
            "not a P-256 public key in PEM SubjectPublicKeyInfo form",
        )
    })
}

/// An HMAC credential: the App_Secret comes from the environment variable it names (never
/// from the policy text). Without a secret source (the CLI's check) only the shape is checked.
fn hmac_key(
    cfield: &str,
    c: &RawCredential,
    secrets: Option<&dyn SecretSource>,
) -> Result<KeyMaterial, ConfigError> {
    if c.public_key_pem.is_some() {
        return Err(ConfigError::new(
            format!("{cfield}.public_key_pem"),
            "an HMAC credential takes secret_env, not a public key",
        ));
    }
    let Some(env) = &c.secret_env else {
        return Err(ConfigError::new(
            format!("{cfield}.secret_env"),
            "an HMAC credential needs secret_env (the variable holding the base64 App_Secret)",
        ));
    };
    if !valid_env_name(env) {
        return Err(ConfigError::new(
            format!("{cfield}.secret_env"),
            "not a valid environment variable name",
        ));
    }
    match secrets {
        None => Ok(KeyMaterial::Hmac(Secret::new(Vec::new()))),
        Some(src) => {
            let Some(value) = src.get(env) else {
                return Err(ConfigError::new(
                    format!("{cfield}.secret_env"),
                    format!("environment variable {env} is not set in the gateway"),
                ));
            };
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(value.trim())
                .map_err(|_| {
                    ConfigError::new(
                        format!("{cfield}.secret_env"),
                        format!("{env} is not valid base64"),
                    )
                })?;
            if bytes.len() < 32 {
                return Err(ConfigError::new(
                    format!("{cfield}.secret_env"),
                    format!(
                        "{env} decodes to {} bytes; an App_Secret needs at least 32",
                        bytes.len()
                    ),
                ));
            }
            Ok(KeyMaterial::Hmac(Secret::new(bytes)))
        }
    }
}

/// A key-pair credential's public key PEM: it has one, and no secret.
fn public_key_pem<'c>(
    cfield: &str,
    c: &'c RawCredential,
    alg: Algorithm,
) -> Result<&'c str, ConfigError> {
    if c.secret_env.is_some() {
        return Err(ConfigError::new(
            format!("{cfield}.secret_env"),
            format!(
                "an {} credential takes public_key_pem, not a secret",
                alg.as_str()
            ),
        ));
    }
    c.public_key_pem.as_deref().ok_or_else(|| {
        ConfigError::new(
            format!("{cfield}.public_key_pem"),
            format!("an {} credential needs public_key_pem", alg.as_str()),
        )
    })
}

/// An SM2 credential: an SM2 public key in PEM SubjectPublicKeyInfo form (a P-256 key, or
/// any other curve, is refused: one algorithm's key never verifies the other's signature),
/// with its distinguishing ID.
fn sm2_key(cfield: &str, c: &RawCredential) -> Result<KeyMaterial, ConfigError> {
    let pem = public_key_pem(cfield, c, Algorithm::Sm2Sm3)?;
    let field = format!("{cfield}.public_key_pem");
    let spki_der = crate::crypto::sm2_spki_from_pem(pem).ok_or_else(|| {
        ConfigError::new(
            &field,
            "not an SM2 public key (PEM SubjectPublicKeyInfo with the SM2 curve 1.2.156.10197.1.301)",
        )
    })?;
    let id = c
        .sm2_id
        .clone()
        .unwrap_or_else(|| SM2_DEFAULT_ID.to_string());
    if id.is_empty() || id.len() > 1024 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            format!("{cfield}.sm2_id"),
            "1 to 1024 printable ASCII characters",
        ));
    }
    Ok(KeyMaterial::Sm2 {
        sha256: crate::crypto::key_fingerprint(&spki_der),
        spki_der,
        id,
    })
}

/// A key-pair credential: a P-256 public key in PEM SubjectPublicKeyInfo form.
fn p256_key(cfield: &str, c: &RawCredential) -> Result<KeyMaterial, ConfigError> {
    let pem = public_key_pem(cfield, c, Algorithm::EcdsaP256Sha256)?;
    let spki_der = decode_p256_pem(&format!("{cfield}.public_key_pem"), pem)?;
    Ok(KeyMaterial::P256 {
        sha256: crate::crypto::key_fingerprint(&spki_der),
        spki_der,
    })
}

/// Apps and their credentials (ID-1..ID-3, OPS-2), compiled from the policy's `apps`; secrets
/// are resolved when a source is given (the filter), only their shape is checked without one
/// (the CLI). Longer than most functions: one straight list of each app's and each
/// credential's field checks, in the order the reference documents them.
pub fn compile(
    raw_apps: &[RawApp],
    secrets: Option<&dyn SecretSource>,
) -> Result<HashMap<String, App>, ConfigError> {
    let mut apps = HashMap::new();
    let mut keyids = HashSet::new();
    let mut cert_owners: Vec<(String, CertBinding)> = Vec::new();
    for (i, app) in raw_apps.iter().enumerate() {
        let field = format!("apps[{i}]");
        if !valid_id(&app.id) {
            return Err(ConfigError::new(
                format!("{field}.id"),
                "must be 1-128 characters of A-Z a-z 0-9 . _ - :",
            ));
        }
        let mut credentials = Vec::new();
        let mut certificates = Vec::new();
        let mut allowed_ips = Vec::new();
        for (j, r) in app.allowed_ips.iter().enumerate() {
            allowed_ips.push(
                Cidr::parse(r)
                    .map_err(|m| ConfigError::new(format!("{field}.allowed_ips[{j}]"), m))?,
            );
        }
        for (j, c) in app.credentials.iter().enumerate() {
            let cfield = format!("{field}.credentials[{j}]");
            if !valid_id(&c.id) {
                return Err(ConfigError::new(
                    format!("{cfield}.id"),
                    "must be 1-128 characters of A-Z a-z 0-9 . _ - :",
                ));
            }
            if !keyids.insert(c.id.clone()) {
                return Err(ConfigError::new(
                    format!("{cfield}.id"),
                    format!("duplicate credential id '{}'", c.id),
                ));
            }
            let validity = Validity::parse(&cfield, &c.not_before, &c.not_after)?;
            if let Some(cert) = &c.certificate {
                if c.alg.is_some() || c.secret_env.is_some() || c.public_key_pem.is_some() {
                    return Err(ConfigError::new(
                        cfield,
                        "a certificate credential has only id, certificate and its validity",
                    ));
                }
                let binding = match (&cert.sha256, &cert.uri_san) {
                    (Some(fp), None) => {
                        let hex: String = fp
                            .chars()
                            .filter(|ch| *ch != ':')
                            .collect::<String>()
                            .to_ascii_lowercase();
                        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                            return Err(ConfigError::new(
                                format!("{cfield}.certificate.sha256"),
                                "must be the 64 hex digits of the certificate's SHA-256 fingerprint",
                            ));
                        }
                        CertBinding::Sha256(hex)
                    }
                    (None, Some(uri)) if !uri.is_empty() => CertBinding::UriSan(uri.clone()),
                    _ => {
                        return Err(ConfigError::new(
                            format!("{cfield}.certificate"),
                            "give exactly one of sha256 or uri_san",
                        ))
                    }
                };
                if let Some((other, _)) = cert_owners.iter().find(|(_, b)| *b == binding) {
                    return Err(ConfigError::new(
                        format!("{cfield}.certificate"),
                        format!("the same certificate is already bound to app '{other}'"),
                    ));
                }
                cert_owners.push((app.id.clone(), binding.clone()));
                certificates.push(BoundCertificate {
                    keyid: c.id.clone(),
                    binding,
                    validity,
                });
                continue;
            }
            let Some(alg) = c.alg else {
                return Err(ConfigError::new(
                    format!("{cfield}.alg"),
                    "a credential needs alg (hmac-sha256, ecdsa-p256-sha256, hmac-sm3, sm2-sm3) or certificate",
                ));
            };
            if c.sm2_id.is_some() && alg != Algorithm::Sm2Sm3 {
                return Err(ConfigError::new(
                    format!("{cfield}.sm2_id"),
                    "only an sm2-sm3 credential has a distinguishing ID",
                ));
            }
            let key = match alg {
                Algorithm::HmacSha256 | Algorithm::HmacSm3 => hmac_key(&cfield, c, secrets)?,
                Algorithm::EcdsaP256Sha256 => p256_key(&cfield, c)?,
                Algorithm::Sm2Sm3 => sm2_key(&cfield, c)?,
            };
            credentials.push(Credential {
                keyid: c.id.clone(),
                alg,
                key,
                validity,
            });
        }
        if apps
            .insert(
                app.id.clone(),
                App {
                    id: app.id.clone(),
                    credentials,
                    certificates,
                    suspended: app.suspended,
                    allowed_ips,
                    onboarding: app.onboarding,
                    sdk: app
                        .sdk
                        .as_ref()
                        .map(|r| r.compile(&format!("{field}.sdk")))
                        .transpose()?,
                },
            )
            .is_some()
        {
            return Err(ConfigError::new(
                format!("{field}.id"),
                format!("duplicate app id '{}'", app.id),
            ));
        }
    }

    Ok(apps)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The names the tools offer are the names the policy reads, one for each algorithm.
    #[test]
    fn every_algorithm_by_its_policy_name() {
        for a in Algorithm::ALL {
            let parsed: Algorithm = serde_json::from_value(serde_json::json!(a.as_str())).unwrap();
            assert_eq!(parsed, a);
        }
        let names: std::collections::HashSet<&str> =
            Algorithm::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(names.len(), 4);
    }

    fn apps(credential: serde_json::Value) -> Result<HashMap<String, App>, ConfigError> {
        let raw: Vec<RawApp> =
            serde_json::from_value(serde_json::json!([{"id": "a", "credentials": [credential]}]))
                .unwrap();
        let secrets: HashMap<String, String> = [(
            "S".to_string(),
            "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTAxMjM=".to_string(),
        )]
        .into();
        compile(&raw, Some(&secrets))
    }

    /// OPS-2: a credential is refused before `not_before` and after `not_after` (both bounds
    /// inclusive, as a grant's), with its own codes; a certificate binding has a period too.
    #[test]
    fn a_credential_is_valid_within_its_period_only() {
        let compiled = apps(
            serde_json::json!({"id": "k", "alg": "hmac-sha256", "secret_env": "S",
            "not_before": "2026-01-01T00:00:00Z", "not_after": "2026-12-31T23:59:59+08:00"}),
        )
        .unwrap();
        let v = compiled["a"].credentials[0].validity;
        let (start, end) = (1_767_225_600, 1_798_732_799); // 2026-01-01Z, 2026-12-31 23:59:59 +08:00
        assert_eq!(v.not_before, Some(start));
        assert_eq!(v.not_after, Some(end));
        assert_eq!(
            check_validity(&v, "k", start - 1).unwrap_err().reason,
            DenyReason::CredentialNotYetValid
        );
        check_validity(&v, "k", start).unwrap();
        check_validity(&v, "k", end).unwrap();
        assert_eq!(
            check_validity(&v, "k", end + 1).unwrap_err().reason,
            DenyReason::CredentialExpired
        );
        let cert = apps(
            serde_json::json!({"id": "c", "certificate": {"uri_san": "spiffe://x/a"},
            "not_after": "2026-01-01T00:00:00Z"}),
        )
        .unwrap();
        let bound = &cert["a"].certificates[0];
        assert_eq!(
            (bound.keyid.as_str(), bound.validity.not_after),
            ("c", Some(start))
        );
        check_validity(&Validity::default(), "k", u64::MAX).unwrap();
    }

    #[test]
    fn a_bad_period_is_refused_with_its_field() {
        let e = apps(
            serde_json::json!({"id": "k", "alg": "hmac-sha256", "secret_env": "S",
            "not_before": "2026-02-01T00:00:00Z", "not_after": "2026-01-01T00:00:00Z"}),
        )
        .unwrap_err();
        assert_eq!(e.field, "apps[0].credentials[0].not_after");
        let e = apps(
            serde_json::json!({"id": "k", "alg": "hmac-sha256", "secret_env": "S",
            "not_after": "2026-01-01"}),
        )
        .unwrap_err();
        assert_eq!(e.field, "apps[0].credentials[0].not_after");
    }
}
