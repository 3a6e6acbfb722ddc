//! The operations log (LOG-5): one JSON object per line for each operator action, sealed into
//! a chain like the audit log (`audit_chain.rs`) when a key is given, so that `apisec audit
//! verify` finds a record modified, deleted, inserted or reordered. Each `apisec` run appends
//! and continues the chain from the file's last line.
//!
//! Who acted: the operator's own `--actor` is only a claim, so each record also carries what
//! the operating system says: the real user id and its name, the kernel's login user id
//! (`/proc/self/loginuid`, set at login and not changeable by the user's processes, e.g. under
//! `sudo`), and the user `sudo` ran for.

use std::io::Write as _;
use std::path::Path;

use apisec_core::audit_chain::{Chain, ChainKey};
use rand_core::{OsRng, RngCore};
use serde_json::{json, Value};

/// The environment variable holding the operations log's chain key, unless `--ops-key-env`.
pub const DEFAULT_KEY_ENV: &str = "APISEC_OPS_KEY";

/// The chain key from `var`, in the environment or in `extra` (an `--env-file`'s pairs).
pub fn key(var: &str, extra: &[(String, String)]) -> Result<Option<ChainKey>, String> {
    let text = std::env::var(var)
        .ok()
        .or_else(|| extra.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone()));
    match text {
        None => Ok(None),
        Some(t) => ChainKey::from_base64(&t)
            .map(Some)
            .map_err(|e| format!("{var}: {e}")),
    }
}

fn passwd_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_string())
    })
}

/// The real user id of this process, from the kernel.
fn real_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Who is acting: the operator's claim and what the operating system knows.
pub fn operator(declared: &str) -> Value {
    let uid = real_uid();
    // 4294967295: no login session recorded (a service, a container without PAM login)
    let login_uid = std::fs::read_to_string("/proc/self/loginuid")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .filter(|&u| u != u32::MAX);
    json!({
        "declared": declared,
        "uid": uid,
        "user": uid.and_then(passwd_name),
        "login_uid": login_uid,
        "login_user": login_uid.and_then(passwd_name),
        "sudo_user": std::env::var("SUDO_USER").ok(),
    })
}

/// Appends `record` to the log at `path`, sealed into the file's chain when `key` is given.
/// Returns whether it was sealed.
pub fn append(path: &Path, key: Option<&ChainKey>, record: &Value) -> Result<bool, String> {
    let text = record.to_string();
    let line = match key {
        Some(key) => {
            let existing = std::fs::read_to_string(path).unwrap_or_default();
            let last = existing.lines().rev().find(|l| !l.trim().is_empty());
            let mut chain = last.and_then(Chain::resume).unwrap_or_else(|| {
                let mut name = [0u8; 8];
                OsRng.fill_bytes(&mut name);
                Chain::new(&name)
            });
            chain.seal(key, &text)
        }
        None => text,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    writeln!(f, "{line}").map_err(|e| format!("{}: {e}", path.display()))?;
    f.sync_all()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(key.is_some())
}
