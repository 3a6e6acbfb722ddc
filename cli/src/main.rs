//! `apisec`: the operator and client command line. Key generation (OPS-2), policy check and
//! conversion to the JSON the filter reads, applying it to a running gateway, grants, the
//! inventory, compliance, audit log verification and search, ending sessions, and RFC 9421
//! request signing and offline verification for callers and tests.
#![forbid(unsafe_code)]

mod apply;
mod apps;
mod audit;
mod compliance;
mod credentials;
mod grants;
mod inventory;
mod keyring;
mod keys;
mod opslog;
mod policy;
mod render;
mod sessions;
mod sign;
mod verify;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

pub(crate) use policy::load_policy;

#[derive(Parser)]
#[command(
    name = "apisec",
    version,
    about = "apisec: the API security gateway's operator and client command line",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an HMAC secret or a key pair (OPS-2)
    #[command(subcommand)]
    Keygen(keys::Keygen),
    /// Check, convert and apply a policy file
    #[command(subcommand)]
    Policy(policy::Policy),
    /// List and revoke grants (OPS-3, PERM-6)
    #[command(subcommand)]
    Grants(grants::Grants),
    /// Register a caller with its onboarding record (OPS-7)
    #[command(subcommand)]
    Apps(apps::Apps),
    /// Issue, rotate and revoke a caller's credentials (OPS-2)
    #[command(subcommand)]
    Credentials(credentials::Credentials),
    /// Kubernetes manifests for Istio or Envoy Gateway, made from the policy
    #[command(subcommand)]
    Render(render::Render),
    /// Sign a request with RFC 9421 and RFC 9530 and print it ready to send
    Sign(Box<sign::SignArgs>),
    /// Decide a captured request offline as the gateway would, and explain it
    Verify(verify::Args),
    /// The API inventory, and drafts from an OpenAPI document (LVL-2)
    Inventory(inventory::Args),
    /// End sessions through the gateway's operator listener (SES-4, OPS-6)
    #[command(subcommand)]
    Sessions(sessions::Sessions),
    /// Per API, each requirement of its level: met or not (the auditors' report)
    Compliance(compliance::Args),
    /// Verify and search audit and operations logs (LOG-1, LOG-2, LOG-5)
    #[command(subcommand)]
    Audit(Box<audit::Audit>),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let status = |r: Result<u8, String>| r.map(|s| (s != 0).then_some(s));
    let result: Result<Option<u8>, String> = match cli.command {
        Command::Keygen(k) => keys::run(k).map(|()| None),
        Command::Policy(p) => policy::run(p).map(|()| None),
        Command::Grants(g) => grants::run(g).map(|()| None),
        Command::Apps(a) => apps::run(a).map(|()| None),
        Command::Credentials(c) => credentials::run(c).map(|()| None),
        Command::Render(r) => render::run(r).map(|()| None),
        Command::Sign(a) => sign::run(*a).map(|()| None),
        Command::Inventory(a) => inventory::run(a).map(|()| None),
        Command::Sessions(s) => sessions::run(s).map(|()| None),
        Command::Compliance(a) => status(compliance::run(a)),
        Command::Audit(a) => status(audit::run(*a)),
        Command::Verify(a) => verify::run(a).map(|ok| (!ok).then_some(1)),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "apisec", &mut std::io::stdout());
            Ok(None)
        }
    };
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(code)) => ExitCode::from(code),
        Err(e) => {
            eprintln!("apisec: {e}");
            ExitCode::from(2)
        }
    }
}

/// This machine's clock since the epoch: the operator's and the client's tools read it here, and
/// only here (core never reads a clock).
pub(crate) fn clock() -> Result<std::time::Duration, String> {
    #[allow(clippy::disallowed_methods)]
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())
}

/// Unix seconds now.
pub(crate) fn now() -> Result<u64, String> {
    Ok(clock()?.as_secs())
}

/// Today, YYYY-MM-DD (UTC), for records the operator does not date.
pub(crate) fn today() -> Result<String, String> {
    rfc3339_utc(now()?)
        .get(..10)
        .map(str::to_string)
        .ok_or_else(|| "clock".to_string())
}

/// Replaces `path` with `text` atomically: a temporary file in the same directory (created with
/// `mode`, less the umask), written and synced, then renamed over it, so a reader (Envoy
/// watching the ECDS file, an operator) sees the old file or the new one, never a part.
pub(crate) fn write_atomically(
    path: &std::path::Path,
    text: &str,
    mode: u32,
) -> Result<(), String> {
    use std::io::Write as _;
    let dir = path.parent().ok_or("the path has no directory")?;
    let tmp = dir.join(format!(".apisec-write-{}.tmp", std::process::id()));
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
        let mut f = opts
            .open(&tmp)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.sync_all()
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Lowercase hex SHA-256.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    apisec_core::crypto::hex(&sha2::Sha256::digest(data))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for unix seconds.
pub(crate) fn rfc3339_utc(t: u64) -> String {
    let (days, secs) = ((t / 86400) as i64, t % 86400);
    // civil from days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

pub(crate) struct EnvSecrets;
impl apisec_core::policy::SecretSource for EnvSecrets {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}
