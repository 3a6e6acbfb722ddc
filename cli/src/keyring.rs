//! The keyring of public keys (DATA-4): every P-256 public key a policy applied by `apisec
//! policy apply` registered, kept after the policy drops it, so that S3 evidence signed under
//! a key that was rotated out can still be re-verified (`apisec audit verify --evidence`).
//! One JSON object per line (`evidence::KeyringEntry`, with when it was first applied);
//! lines are only ever appended.

use std::path::Path;

use apisec_core::evidence::{self, KeyringEntry};
use serde_json::{json, Value};

/// The entries of a keyring file.
pub fn parse(name: &str, text: &str) -> Result<Vec<KeyringEntry>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("{name}:{}: {e}", i + 1)))
        .collect()
}

/// Appends the policy's public keys that the keyring does not hold yet; returns how many.
pub fn remember(path: &Path, policy: &Value, ts: &str) -> Result<usize, String> {
    // every key ever applied is one line: the whole file is what "already known" means
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let known = parse(&path.display().to_string(), &text)?;
    let new: Vec<KeyringEntry> = evidence::policy_keys(policy)
        .into_iter()
        .filter(|k| {
            !known
                .iter()
                .any(|o| o.key_sha256 == k.key_sha256 && o.app == k.app && o.keyid == k.keyid)
        })
        .collect();
    if new.is_empty() {
        return Ok(0);
    }
    let mut lines = Vec::with_capacity(new.len());
    for k in &new {
        let mut line = serde_json::to_value(k).map_err(|e| e.to_string())?;
        if let Some(o) = line.as_object_mut() {
            o.insert("first_applied".into(), json!(ts));
        }
        lines.push(line.to_string());
    }
    crate::opslog::append_lines(path, &lines)?;
    Ok(new.len())
}
