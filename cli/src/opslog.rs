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

/// The last non-empty line of the file at `path`, read from its end (the log only grows; a
/// run reads what it continues, not the whole history). None for a file that does not exist
/// yet; an error for one that cannot be read, so a chain is never restarted beside it.
pub fn last_line(path: &Path) -> Result<Option<String>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let len = f.seek(SeekFrom::End(0)).map_err(err)?;
    let mut tail: Vec<u8> = Vec::new();
    let mut at = len;
    while at > 0 {
        let step = at.min(64 * 1024);
        at -= step;
        let mut chunk = vec![0u8; step as usize];
        f.seek(SeekFrom::Start(at)).map_err(err)?;
        f.read_exact(&mut chunk).map_err(err)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
        let text = String::from_utf8_lossy(&tail);
        let trimmed = text.trim_end();
        // a whole line: one that starts after a newline, or at the start of the file
        if let Some(line) = trimmed.rfind('\n').and_then(|pos| trimmed.get(pos + 1..)) {
            return Ok(Some(line.to_string()));
        }
        if at == 0 && !trimmed.is_empty() {
            return Ok(Some(trimmed.to_string()));
        }
    }
    Ok(None)
}

/// Whether a record can be appended to the log at `path` with `key`: never an unsealed line
/// into a sealed (chained) log, which would then verify "NOT intact" for good (issue 21 item
/// 12). Checked before anything is applied, so that a change is never made unrecorded.
pub fn check_writable(path: &Path, key: Option<&ChainKey>, key_env: &str) -> Result<(), String> {
    unsealed_refused(path, key, last_line(path)?.as_deref(), key_env)
}

fn unsealed_refused(
    path: &Path,
    key: Option<&ChainKey>,
    last: Option<&str>,
    key_env: &str,
) -> Result<(), String> {
    if key.is_none() && last.and_then(Chain::resume).is_some() {
        return Err(format!(
            "{} is a sealed (chained) operations log and {key_env} is not set: an unsealed \
             line would break its chain for good. Set {key_env} (or pass --env-file with it); \
             nothing was changed",
            path.display()
        ));
    }
    Ok(())
}

/// Appends `record` to the log at `path`, sealed into the file's chain when `key` is given.
/// Returns whether it was sealed.
pub fn append(path: &Path, key: Option<&ChainKey>, record: &Value) -> Result<bool, String> {
    let last = last_line(path)?;
    unsealed_refused(path, key, last.as_deref(), DEFAULT_KEY_ENV)?;
    let text = record.to_string();
    let line = match key {
        Some(key) => {
            let mut chain = last.as_deref().and_then(Chain::resume).unwrap_or_else(|| {
                let mut name = [0u8; 8];
                OsRng.fill_bytes(&mut name);
                Chain::new(&name)
            });
            chain.seal(key, &text)
        }
        None => text,
    };
    append_lines(path, &[line])?;
    Ok(key.is_some())
}

/// Appends `lines` to the file at `path` (created if missing) and syncs it to disk: the
/// operations log and the keyring only ever grow.
pub fn append_lines(path: &Path, lines: &[String]) -> Result<(), String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    for line in lines {
        writeln!(f, "{line}").map_err(err)?;
    }
    f.sync_all().map_err(err)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use super::*;

    #[test]
    fn the_last_line_is_read_from_the_end() {
        let dir = std::env::temp_dir().join(format!("apisec-opslog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ops.log");
        assert_eq!(last_line(&path).unwrap(), None, "no file yet");
        std::fs::write(&path, "").unwrap();
        assert_eq!(last_line(&path).unwrap(), None);
        std::fs::write(&path, "only").unwrap();
        assert_eq!(last_line(&path).unwrap().as_deref(), Some("only"));
        // a long history: the last line spans the 64 KiB chunk boundary
        let long = "y".repeat(100_000);
        let text = format!("{}\nsecond\n{long}\n\n", "x".repeat(200_000));
        std::fs::write(&path, text).unwrap();
        assert_eq!(last_line(&path).unwrap().as_deref(), Some(long.as_str()));
        std::fs::remove_dir_all(&dir).unwrap();
        // a path that cannot be read as a file is an error, not an empty log
        assert!(last_line(&std::env::temp_dir()).is_err());
    }
}
