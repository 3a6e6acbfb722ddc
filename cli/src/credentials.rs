//! `apisec credentials issue|rotate|revoke` (OPS-2): a caller's credentials edited in the policy
//! file. Issue adds an HMAC secret (generated here, handed over once) or a P-256 / SM2 public
//! key (the partner's, or a pair generated here); rotate adds the successor from a start time
//! and ends the old one after an overlap, so both work in the overlap and only the new one
//! after it; revoke removes one. `apisec policy apply` makes the change live, logs it
//! (issued, rotated, revoked) and keeps every public key in the keyring, so evidence signed by
//! a revoked key still verifies.

use std::io::Write as _;
use std::path::PathBuf;

use apisec_core::apps::{Algorithm, RawApp, RawCredential};
use base64::Engine as _;

use crate::now;
use crate::policy::{load_policy, save_policy};

#[derive(clap::Subcommand)]
pub enum Credentials {
    /// Add a credential to an app: a new HMAC secret, or a P-256 or SM2 public key
    Issue(Box<IssueArgs>),
    /// Start a successor now (or at --start) and end the old credential after an overlap
    Rotate(Box<RotateArgs>),
    /// Remove a credential from an app (its public key stays in the keyring)
    Revoke {
        /// The policy file to edit
        policy: String,
        #[arg(long)]
        app: String,
        /// The credential (keyid) to remove
        #[arg(long)]
        credential: String,
        /// Write the edited policy here (`-`: standard output) instead of in place
        #[arg(long)]
        out: Option<String>,
    },
}

/// The new credential and its key material.
#[derive(clap::Args)]
pub struct Material {
    /// The new credential's id (the keyid callers send)
    #[arg(long = "id", value_name = "KEYID")]
    id: String,
    /// Its algorithm (rotate: the old one's by default)
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(Algorithm::ALL.map(Algorithm::as_str)))]
    alg: Option<String>,
    /// HMAC: the environment variable that will hold the secret in the gateway's environment
    #[arg(long, value_name = "VAR")]
    secret_env: Option<String>,
    /// HMAC: append VAR=SECRET to this .env file (created with mode 0600) instead of printing it
    #[arg(long, value_name = "PATH")]
    secret_file: Option<PathBuf>,
    /// P-256 / SM2: the partner's public key (PEM); the partner keeps its private key
    #[arg(long, value_name = "PEMFILE", conflicts_with = "key_out")]
    public_key: Option<String>,
    /// P-256 / SM2: generate the pair: PREFIX.key.pem for the partner, the public key into the
    /// policy
    #[arg(long, value_name = "PREFIX")]
    key_out: Option<String>,
    /// SM2: the signer's distinguishing ID (default 1234567812345678)
    #[arg(long, value_name = "ID")]
    sm2_id: Option<String>,
    /// The end of the new credential's validity, RFC 3339 with an offset
    #[arg(long, value_name = "TIME")]
    not_after: Option<String>,
}

#[derive(clap::Args)]
pub struct IssueArgs {
    /// The policy file to edit
    policy: String,
    #[arg(long)]
    app: String,
    #[command(flatten)]
    material: Material,
    /// The start of its validity, RFC 3339 with an offset (default: from when it is applied)
    #[arg(long, value_name = "TIME")]
    not_before: Option<String>,
    /// Write the edited policy here (`-`: standard output) instead of in place
    #[arg(long)]
    out: Option<String>,
}

#[derive(clap::Args)]
pub struct RotateArgs {
    /// The policy file to edit
    policy: String,
    #[arg(long)]
    app: String,
    /// The credential (keyid) being replaced
    #[arg(long, value_name = "KEYID")]
    credential: String,
    #[command(flatten)]
    material: Material,
    /// When the successor starts, RFC 3339 with an offset (default now)
    #[arg(long, value_name = "TIME")]
    start: Option<String>,
    /// How long both work, in days, from the start
    #[arg(long, value_name = "DAYS", default_value = "7")]
    overlap_days: u64,
    /// Write the edited policy here (`-`: standard output) instead of in place
    #[arg(long)]
    out: Option<String>,
}

pub fn run(cmd: Credentials) -> Result<(), String> {
    match cmd {
        Credentials::Issue(a) => {
            let mut raw = load_policy(&a.policy)?;
            let app = find_app(&mut raw.apps, &a.app, &a.policy)?;
            let cred = make(&a.material, None, a.not_before.clone())?;
            let id = cred.id.clone();
            app.credentials.push(cred);
            save_policy(&a.policy, a.out.as_deref(), &raw)?;
            eprintln!(
                "issued '{id}' to '{}'; apply the policy to make it live",
                a.app
            );
            Ok(())
        }
        Credentials::Rotate(a) => rotate(&a),
        Credentials::Revoke {
            policy,
            app,
            credential,
            out,
        } => {
            let mut raw = load_policy(&policy)?;
            let entry = find_app(&mut raw.apps, &app, &policy)?;
            let before = entry.credentials.len();
            entry.credentials.retain(|c| c.id != credential);
            if entry.credentials.len() == before {
                return Err(format!(
                    "{policy}: app '{app}' has no credential '{credential}'"
                ));
            }
            save_policy(&policy, out.as_deref(), &raw)?;
            eprintln!(
                "revoked '{credential}' of '{app}'; apply the policy to make it live (a public key \
                 stays in the keyring, so evidence it signed still verifies)"
            );
            Ok(())
        }
    }
}

fn rotate(a: &RotateArgs) -> Result<(), String> {
    let mut raw = load_policy(&a.policy)?;
    let start = match &a.start {
        Some(t) => apisec_core::timeutil::parse_rfc3339(t)
            .ok_or_else(|| format!("--start {t}: not an RFC 3339 time with an offset"))?,
        None => now()?,
    };
    let end = start.saturating_add(a.overlap_days.saturating_mul(86_400));
    let app = find_app(&mut raw.apps, &a.app, &a.policy)?;
    let old = app
        .credentials
        .iter_mut()
        .find(|c| c.id == a.credential)
        .ok_or_else(|| {
            format!(
                "{}: app '{}' has no credential '{}'",
                a.policy, a.app, a.credential
            )
        })?;
    if old.certificate.is_some() {
        return Err(format!(
            "'{}' is a bound certificate: issue the new certificate's binding with the firm's PKI and \
             give this one a not_after",
            a.credential
        ));
    }
    let old_alg = old.alg;
    // the overlap ends the old credential, and never lets it live longer than it already would
    let current = old
        .not_after
        .as_deref()
        .and_then(apisec_core::timeutil::parse_rfc3339);
    let end = current.map_or(end, |t| t.min(end));
    old.not_after = Some(crate::rfc3339_utc(end));
    let successor = make(&a.material, old_alg, Some(crate::rfc3339_utc(start)))?;
    let id = successor.id.clone();
    app.credentials.push(successor);
    save_policy(&a.policy, a.out.as_deref(), &raw)?;
    eprintln!(
        "'{id}' starts {} and '{}' ends {} ({} day(s) of overlap); apply the policy to make it live",
        crate::rfc3339_utc(start),
        a.credential,
        crate::rfc3339_utc(end),
        a.overlap_days
    );
    Ok(())
}

fn find_app<'a>(apps: &'a mut [RawApp], id: &str, policy: &str) -> Result<&'a mut RawApp, String> {
    apps.iter_mut()
        .find(|a| a.id == id)
        .ok_or_else(|| format!("{policy}: no app '{id}' (register it with `apisec apps add`)"))
}

fn algorithm(name: &str) -> Result<Algorithm, String> {
    Algorithm::ALL
        .into_iter()
        .find(|a| a.as_str() == name)
        .ok_or_else(|| format!("no algorithm {name}"))
}

/// The credential entry, with its key material made or read.
fn make(
    m: &Material,
    default_alg: Option<Algorithm>,
    not_before: Option<String>,
) -> Result<RawCredential, String> {
    let alg = match (&m.alg, default_alg) {
        (Some(a), _) => algorithm(a)?,
        (None, Some(a)) => a,
        (None, None) => return Err("--alg is required".into()),
    };
    let mut cred = RawCredential {
        id: m.id.clone(),
        alg: Some(alg),
        certificate: None,
        secret_env: None,
        public_key_pem: None,
        sm2_id: None,
        not_before,
        not_after: m.not_after.clone(),
    };
    match alg {
        Algorithm::HmacSha256 | Algorithm::HmacSm3 => {
            let var = m.secret_env.clone().ok_or(
                "an HMAC credential needs --secret-env VAR (the gateway reads the secret from it)",
            )?;
            let secret = base64::engine::general_purpose::STANDARD
                .encode(crate::keys::random_bytes::<32>()?);
            hand_over(&var, &secret, m.secret_file.as_ref())?;
            cred.secret_env = Some(var);
        }
        Algorithm::EcdsaP256Sha256 | Algorithm::Sm2Sm3 => {
            let pem = match (&m.public_key, &m.key_out) {
                (Some(file), None) => {
                    std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?
                }
                (None, Some(prefix)) => {
                    if alg == Algorithm::Sm2Sm3 {
                        crate::keys::keygen_sm2(prefix)?;
                    } else {
                        crate::keys::keygen_p256(prefix)?;
                    }
                    std::fs::read_to_string(format!("{prefix}.pub.pem"))
                        .map_err(|e| format!("{prefix}.pub.pem: {e}"))?
                }
                _ => {
                    return Err(
                        "a key credential needs --public-key PEMFILE or --key-out PREFIX".into(),
                    )
                }
            };
            cred.public_key_pem = Some(pem);
            if alg == Algorithm::Sm2Sm3 {
                cred.sm2_id.clone_from(&m.sm2_id);
            }
        }
    }
    Ok(cred)
}

/// The new secret goes to the operator once: appended to a .env file only its owner reads, or
/// printed; it is not kept anywhere else.
fn hand_over(var: &str, secret: &str, file: Option<&PathBuf>) -> Result<(), String> {
    let Some(path) = file else {
        println!("{var}={secret}");
        eprintln!(
            "the secret above is shown once: put it in the gateways' environment as {var} and give it \
             to the partner over a secure channel"
        );
        return Ok(());
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    writeln!(f, "{var}={secret}").map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!("wrote {var} to {}", path.display());
    Ok(())
}
