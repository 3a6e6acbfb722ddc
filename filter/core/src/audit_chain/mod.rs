//! Tamper-evident audit records (LOG-1): every record the gateway writes is sealed into a hash
//! chain with a MAC, and `apisec audit verify` finds the first record that was modified,
//! deleted, inserted or reordered, and a tail cut off after the last checkpoint the gateway
//! emitted.
//!
//! **Chains.** Each worker thread of each gateway replica writes its own chain: a chain id (64
//! random bits from the host, fixed for the worker's life), a sequence number from 1, and
//! `mac = BLAKE3-keyed(mac key, previous record's mac || the record's bytes up to its mac)`,
//! where the mac key is `BLAKE3-derive_key("apisec audit chain mac 2026-12", chain key)` and
//! the record names the key as `"key":"b3:<fingerprint>"`. Records sealed before (their `key`
//! is the bare fingerprint) carry `HMAC-SHA256(chain key, ...)` over the same bytes, and still
//! verify. BLAKE3 costs the VM about a third of HMAC-SHA-256's instructions (issue 24). Workers
//! and replicas never share a counter, so none waits for another; the records of several chains
//! interleave in one file, each chain in its own order (a worker hands Envoy its records one at
//! a time, in sequence). A new key (a policy naming another key) starts a new chain.
//!
//! **Checkpoints.** Every `checkpoint_seconds` each worker whose chain moved writes its head
//! (chain, seq, mac) to Envoy's own log, a different file from the audit log: records cut off
//! the end of the audit log are then missing against a checkpoint.
//!
//! **The key** is a secret given to the gateway in an environment variable (never in the
//! policy text). The record names it by a fingerprint (`key`), so the verifier picks the right
//! one of several (rotation).

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use hmac::{Hmac, Mac};

/// The context string the chain's BLAKE3 mac key is derived under (BLAKE3's derive_key mode):
/// the chain key itself is never used as a BLAKE3 key directly.
const MAC_KEY_CONTEXT: &str = "apisec audit chain mac 2026-12";
/// How a record names a key whose records are sealed with keyed BLAKE3.
const BLAKE3_TAG: &str = "b3:";
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::apps::SecretSource;
use crate::crypto::hex;
use crate::error::ConfigError;
use crate::masking::{Masking, RawMask};

/// The room sealing needs after a record for the chain's fields (name and epoch, sequence, key
/// tag, MAC): `AuditRecord::to_json` makes its buffer with it, so the seal adds them in place.
pub const SEAL_ROOM: usize = 200;

/// What a checkpoint line in Envoy's log starts with.
pub const CHECKPOINT_TAG: &str = "apisec-audit-checkpoint";

/// `audit:` in the policy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// Environment variable holding the chain key (base64, at least 32 bytes). Without it the
    /// records are not chained, and `apisec compliance` says LOG-1 is not met.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_key_env: Option<String>,
    /// How often each worker writes its chain's head to Envoy's log (1..3600).
    #[serde(default = "default_checkpoint")]
    pub checkpoint_seconds: u64,
    /// Masking of personal data in the records (LOG-4); on with its defaults when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<RawMask>,
}

fn default_checkpoint() -> u64 {
    10
}

/// The chain key and its fingerprint.
#[derive(Clone)]
pub struct ChainKey {
    /// HMAC-SHA256 with the key already absorbed (its two key blocks are hashed once, not per
    /// use): the keyed function of the evidence's sealed session ID, and the mac of records
    /// sealed before the chain moved to BLAKE3.
    keyed: Hmac<Sha256>,
    /// The keyed-BLAKE3 key the records are sealed with, derived from the chain key.
    mac_key: [u8; 32],
    /// 16 hex digits of a SHA-256 of the key: names it in records, reveals nothing of it.
    pub id: String,
    /// What a record sealed under this key says in its `key` field: `b3:<id>`.
    tag: String,
}

/// The mac a record carries, by what its `key` field says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MacKind {
    Blake3,
    /// Records sealed before issue 24.
    HmacSha256,
}

impl PartialEq for ChainKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}
impl Eq for ChainKey {}

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChainKey({})", self.id) // never the key
    }
}

impl ChainKey {
    /// A key from its base64 text (at least 32 bytes).
    pub fn from_base64(text: &str) -> Result<ChainKey, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| "not valid base64".to_string())?;
        if bytes.len() < 32 {
            return Err(format!(
                "decodes to {} bytes; a chain key needs at least 32",
                bytes.len()
            ));
        }
        let digest = Sha256::new()
            .chain_update(b"apisec-audit-key\0")
            .chain_update(&bytes)
            .finalize();
        let id = hex(digest.get(..8).unwrap_or(&digest));
        // HMAC takes a key of any length: new_from_slice cannot fail for it.
        let keyed = Hmac::<Sha256>::new_from_slice(&bytes).map_err(|e| e.to_string())?;
        let mac_key = blake3::derive_key(MAC_KEY_CONTEXT, &bytes);
        let tag = format!("{BLAKE3_TAG}{id}");
        Ok(ChainKey {
            keyed,
            mac_key,
            id,
            tag,
        })
    }

    /// HMAC-SHA256 under this key over the parts in order: a keyed function for other uses
    /// of the audit key (the evidence's sealed session ID), each with its own first part.
    pub fn prf(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = self.keyed.clone();
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// The mac of a record: over the previous record's mac and the record's bytes up to its own.
    fn mac(&self, kind: MacKind, prev: &[u8; 32], content: &[u8]) -> [u8; 32] {
        match kind {
            MacKind::Blake3 => {
                let mut h = blake3::Hasher::new_keyed(&self.mac_key);
                h.update(prev);
                h.update(content);
                *h.finalize().as_bytes()
            }
            MacKind::HmacSha256 => {
                let mut m = self.keyed.clone();
                m.update(prev);
                m.update(content);
                m.finalize().into_bytes().into()
            }
        }
    }
}

/// The key fingerprint and mac a record's `key` field names.
fn named_key(field: &str) -> (&str, MacKind) {
    match field.strip_prefix(BLAKE3_TAG) {
        Some(id) => (id, MacKind::Blake3),
        None => (field, MacKind::HmacSha256),
    }
}

/// The compiled `audit:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// None: records are not chained (no `chain_key_env`, or the CLI without the secret).
    pub key: Option<ChainKey>,
    pub key_env: Option<String>,
    pub checkpoint_seconds: u64,
    pub mask: Masking,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            key: None,
            key_env: None,
            checkpoint_seconds: default_checkpoint(),
            mask: Masking::default(),
        }
    }
}

impl RawAudit {
    /// `secrets` is None where they cannot be read (the CLI): the key is then only named.
    pub fn compile(
        &self,
        secrets: Option<&dyn SecretSource>,
    ) -> Result<AuditSettings, ConfigError> {
        if !(1..=3600).contains(&self.checkpoint_seconds) {
            return Err(ConfigError::new(
                "audit.checkpoint_seconds",
                "must be between 1 and 3600",
            ));
        }
        let key =
            match (&self.chain_key_env, secrets) {
                (None, _) | (Some(_), None) => None,
                (Some(var), Some(s)) => {
                    let text = s.get(var).ok_or_else(|| {
                        ConfigError::new(
                            "audit.chain_key_env",
                            format!("environment variable {var} is not set in the gateway"),
                        )
                    })?;
                    Some(ChainKey::from_base64(&text).map_err(|e| {
                        ConfigError::new("audit.chain_key_env", format!("{var}: {e}"))
                    })?)
                }
            };
        Ok(AuditSettings {
            key,
            key_env: self.chain_key_env.clone(),
            checkpoint_seconds: self.checkpoint_seconds,
            mask: self.mask.clone().unwrap_or_default().compile()?,
        })
    }
}

/// One worker's chain.
#[derive(Debug, Clone)]
pub struct Chain {
    base: String,
    epoch: u32,
    key_id: String,
    seq: u64,
    prev: [u8; 32],
    checkpointed: u64,
}

impl Chain {
    /// A chain named by 64 random bits from the host.
    pub fn new(random: &[u8; 8]) -> Chain {
        Chain {
            base: hex(random),
            epoch: 0,
            key_id: String::new(),
            seq: 0,
            prev: [0; 32],
            checkpointed: 0,
        }
    }

    /// The chain a sealed line ends, continued by whoever appends the next line: a log that
    /// outlives its writer (the operations log, appended to by one `apisec` run after another).
    /// None when the line is not a sealed record.
    pub fn resume(last_line: &str) -> Option<Chain> {
        let v: serde_json::Value = serde_json::from_str(last_line).ok()?;
        let (base, epoch) = v.get("chain")?.as_str()?.rsplit_once('-')?;
        let mac = v.get("mac")?.as_str()?;
        let mut prev = [0u8; 32];
        if mac.len() != 64 {
            return None;
        }
        for (i, b) in prev.iter_mut().enumerate() {
            *b = u8::from_str_radix(mac.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Chain {
            base: base.to_string(),
            epoch: epoch.parse().ok()?,
            key_id: v.get("key")?.as_str()?.to_string(),
            seq: v.get("seq")?.as_u64()?,
            prev,
            checkpointed: 0,
        })
    }

    fn id(&self) -> String {
        format!("{}-{}", self.base, self.epoch)
    }

    /// The record `body` (one JSON object) sealed into the chain: the chain id, the sequence
    /// number and the key's fingerprint are added, then the MAC over the previous MAC and every
    /// byte before it.
    pub fn seal(&mut self, key: &ChainKey, body: &str) -> String {
        self.seal_owned(key, body.to_string())
    }

    /// [`Chain::seal`] of a record the caller gives away: its members are extended in place.
    pub fn seal_owned(&mut self, key: &ChainKey, body: String) -> String {
        if key.tag != self.key_id {
            if self.seq > 0 {
                self.epoch = self.epoch.wrapping_add(1);
            }
            self.key_id = key.tag.clone();
            self.seq = 0;
            self.prev = [0; 32];
            self.checkpointed = 0;
        }
        self.seq += 1;
        // the object without its closing brace (an object of nothing if it is not one)
        let kept = body.trim_end().len();
        let mut line = if body.get(..kept).is_some_and(|b| b.ends_with('}')) {
            let mut line = body;
            line.truncate(kept - 1);
            line
        } else {
            String::from("{")
        };
        if !line.trim_end().ends_with('{') {
            line.push(',');
        }
        line.reserve(SEAL_ROOM);
        line.push_str("\"chain\":\"");
        line.push_str(&self.base);
        line.push('-');
        crate::sf::push_u64(&mut line, u64::from(self.epoch));
        line.push_str("\",\"seq\":");
        crate::sf::push_u64(&mut line, self.seq);
        line.push_str(",\"key\":\"");
        line.push_str(&key.tag);
        line.push_str("\"}");
        let mac = key.mac(MacKind::Blake3, &self.prev, line.as_bytes());
        self.prev = mac;
        line.pop();
        line.push_str(",\"mac\":\"");
        crate::crypto::push_hex(&mut line, &mac);
        line.push_str("\"}");
        line
    }

    /// The chain's head for Envoy's log, if it moved since the last checkpoint.
    pub fn checkpoint(&mut self, now: u64) -> Option<String> {
        if self.seq == 0 || self.seq == self.checkpointed {
            return None;
        }
        self.checkpointed = self.seq;
        Some(format!(
            "{CHECKPOINT_TAG} {{\"chain\":\"{}\",\"seq\":{},\"mac\":\"{}\",\"ts\":{now}}}",
            self.id(),
            self.seq,
            hex(&self.prev)
        ))
    }
}

/// Where a record was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Place {
    pub file: String,
    pub line: usize,
}

/// What the verifier found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    #[serde(flatten)]
    pub at: Place,
    /// modified, deleted, inserted, reordered, truncated, unreadable, unknown_key;
    /// evidence_invalid, evidence_key_unknown (evidence.rs)
    pub kind: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub chain: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub detail: String,
}

/// The verifier's report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    /// Chained records read.
    pub records: usize,
    pub chains: usize,
    /// Lines shaped like Envoy's own records (`"source":"envoy"`), which carry no MAC. The
    /// shipped configuration writes those to a log of their own (`envoy-access.log`), so in
    /// an audit log they are findings (`unchained`) unless the check allows them.
    pub unchained: usize,
    pub checkpoints: usize,
    /// With `--evidence`: S3 records whose evidence was checked, and how many verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence_checked: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence_verified: Option<usize>,
    pub findings: Vec<Finding>,
    /// Why an otherwise clean check cannot be called intact (no checkpoints to see a cut
    /// tail by): the verifier's exit status is then 3, not 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unverified: Option<String>,
}

impl Verdict {
    pub fn intact(&self) -> bool {
        self.findings.is_empty()
    }
}

struct Sealed {
    at: Place,
    chain: String,
    seq: u64,
    key: String,
    content: String,
    mac: [u8; 32],
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
struct ChainFields {
    chain: String,
    seq: u64,
    key: String,
}

/// One line: a sealed record, an unchained one, or unreadable (the reason).
enum Line {
    Sealed(Sealed),
    Unchained,
    Unreadable(String),
}

fn read_line(at: Place, line: &str) -> Line {
    const TAIL: usize = ",\"mac\":\"".len() + 64 + "\"}".len();
    let split = line
        .len()
        .checked_sub(TAIL)
        .filter(|&i| line.is_char_boundary(i));
    if let Some(i) = split {
        let (head, tail) = line.split_at(i);
        if let Some(mac) = tail
            .strip_prefix(",\"mac\":\"")
            .and_then(|t| t.strip_suffix("\"}"))
        {
            let Some(mac) = unhex32(mac) else {
                return Line::Unreadable("its mac is not 64 hex digits".into());
            };
            let content = format!("{head}}}");
            return match serde_json::from_str::<ChainFields>(&content) {
                Ok(f) => Line::Sealed(Sealed {
                    at,
                    chain: f.chain,
                    seq: f.seq,
                    key: f.key,
                    content,
                    mac,
                }),
                Err(_) => match serde_json::from_str::<serde_json::Value>(&content) {
                    Ok(_) => Line::Unreadable("a sealed record without chain, seq or key".into()),
                    Err(e) => Line::Unreadable(format!("not JSON: {e}")),
                },
            };
        }
    }
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(m))
            if m.get("source").and_then(|v| v.as_str()) == Some("envoy") =>
        {
            Line::Unchained
        }
        Ok(_) => Line::Unreadable("a record without a mac (added by hand, or not sealed)".into()),
        Err(e) => Line::Unreadable(format!("not JSON: {e}")),
    }
}

/// A checkpoint read from Envoy's log.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
struct Checkpoint {
    chain: String,
    seq: u64,
    mac: String,
}

/// Checks audit logs (`files`: name and text, in the order they were written, rotated files
/// first) against the keys, and against the checkpoints found in Envoy's logs.
pub fn verify(
    files: &[(String, String)],
    keys: &[ChainKey],
    envoy_logs: &[(String, String)],
    allow_unchained: bool,
) -> Verdict {
    let mut v = Verdict::default();
    let mut chains: BTreeMap<String, Vec<Sealed>> = BTreeMap::new();
    for (name, text) in files {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = Place {
                file: name.clone(),
                line: i + 1,
            };
            match read_line(at.clone(), line) {
                Line::Sealed(s) => {
                    v.records += 1;
                    chains.entry(s.chain.clone()).or_default().push(s);
                }
                Line::Unchained => {
                    v.unchained += 1;
                    if !allow_unchained {
                        // anyone who can write the log can add such a line: nothing vouches
                        // for it (issue 21 item 7)
                        v.findings.push(Finding {
                            at,
                            kind: "unchained",
                            chain: String::new(),
                            seq: None,
                            detail: "a line without a chain MAC (Envoy's own records go to \
                                     their own log; here it may have been inserted)"
                                .into(),
                        });
                    }
                }
                Line::Unreadable(why) => v.findings.push(Finding {
                    at,
                    kind: "unreadable",
                    chain: String::new(),
                    seq: None,
                    detail: why,
                }),
            }
        }
    }
    v.chains = chains.len();
    let keys: HashMap<&str, &ChainKey> = keys.iter().map(|k| (k.id.as_str(), k)).collect();
    for (chain, records) in &chains {
        check_chain(chain, records, &keys, &mut v.findings);
    }
    for (name, text) in envoy_logs {
        for (i, line) in text.lines().enumerate() {
            let Some(pos) = line.find(CHECKPOINT_TAG) else {
                continue;
            };
            let json = line.get(pos + CHECKPOINT_TAG.len()..).unwrap_or("").trim();
            let Ok(cp) = serde_json::from_str::<Checkpoint>(json) else {
                continue;
            };
            v.checkpoints += 1;
            let at = Place {
                file: name.clone(),
                line: i + 1,
            };
            let found = chains
                .get(&cp.chain)
                .and_then(|r| r.iter().find(|s| s.seq == cp.seq));
            let last = chains
                .get(&cp.chain)
                .and_then(|r| r.iter().map(|s| s.seq).max());
            let problem = match (found, last) {
                (Some(s), _) if unhex32(&cp.mac) == Some(s.mac) => None,
                (Some(_), _) => Some(format!(
                    "the checkpoint vouches for record {} of chain {} with another mac",
                    cp.seq, cp.chain
                )),
                (None, Some(last)) => Some(format!(
                    "the checkpoint vouches for record {} of chain {}; the log holds it up to \
                     record {last}: its tail was cut off",
                    cp.seq, cp.chain
                )),
                (None, None) => Some(format!(
                    "the checkpoint vouches for record {} of chain {}; the log holds no record \
                     of that chain",
                    cp.seq, cp.chain
                )),
            };
            if let Some(detail) = problem {
                v.findings.push(Finding {
                    at,
                    kind: "truncated",
                    chain: cp.chain.clone(),
                    seq: Some(cp.seq),
                    detail,
                });
            }
        }
    }
    v.findings
        .sort_by(|a, b| (&a.at.file, a.at.line).cmp(&(&b.at.file, b.at.line)));
    v
}

/// One chain's records, as read (file order): in sequence from 1, each MAC over the one before.
fn check_chain(
    chain: &str,
    records: &[Sealed],
    keys: &HashMap<&str, &ChainKey>,
    out: &mut Vec<Finding>,
) {
    let finding = |s: &Sealed, kind: &'static str, detail: String| Finding {
        at: s.at.clone(),
        kind,
        chain: chain.to_string(),
        seq: Some(s.seq),
        detail,
    };
    // Order as written: a record whose number is not above the one before it was moved there
    // (or is a copy of an earlier record).
    let mut seen: HashMap<u64, &Place> = HashMap::new();
    let mut high = 0u64;
    for s in records {
        if let Some(first) = seen.get(&s.seq) {
            out.push(finding(
                s,
                "inserted",
                format!(
                    "a second record {} (the first is at {}:{})",
                    s.seq, first.file, first.line
                ),
            ));
            continue;
        }
        seen.insert(s.seq, &s.at);
        if s.seq < high {
            out.push(finding(
                s,
                "reordered",
                format!("record {} comes after record {high}", s.seq),
            ));
        }
        high = high.max(s.seq);
    }
    // In sequence: no gaps, each MAC over the previous one.
    let mut by_seq: Vec<&Sealed> = Vec::new();
    let mut taken = std::collections::HashSet::new();
    for s in records {
        if taken.insert(s.seq) {
            by_seq.push(s);
        }
    }
    by_seq.sort_by_key(|s| s.seq);
    let mut prev: Option<(u64, [u8; 32])> = None;
    for s in by_seq {
        let (id, kind) = named_key(&s.key);
        let Some(key) = keys.get(id) else {
            out.push(finding(
                s,
                "unknown_key",
                format!("sealed with key {}, which was not given", s.key),
            ));
            prev = Some((s.seq, s.mac));
            continue;
        };
        let expected_prev = match prev {
            None if s.seq == 1 => Some([0; 32]),
            None => {
                out.push(finding(
                    s,
                    "deleted",
                    format!(
                        "the chain starts at record {}: records 1 to {} are missing (deleted, \
                         or in a file not given)",
                        s.seq,
                        s.seq - 1
                    ),
                ));
                None
            }
            Some((n, mac)) if s.seq == n + 1 => Some(mac),
            Some((n, _)) => {
                out.push(finding(
                    s,
                    "deleted",
                    format!("records {} to {} are missing", n + 1, s.seq - 1),
                ));
                None
            }
        };
        if let Some(p) = expected_prev {
            let want = key.mac(kind, &p, s.content.as_bytes());
            if !crate::crypto::constant_time_eq(&want, &s.mac) {
                out.push(finding(
                    s,
                    "modified",
                    format!(
                        "record {} does not match its mac: changed after it was written, or \
                         not written by the gateway",
                        s.seq
                    ),
                ));
            }
        }
        prev = Some((s.seq, s.mac));
    }
}

/// Where a host keeps a worker's chain: the Wasm glue in a `RefCell` (one VM per worker), the
/// native glue behind a `Mutex` (its checkpoints are taken from Envoy's main thread). The
/// lifecycle seals through this, never caring which.
pub trait Seal {
    /// `Chain::seal_owned` on the chain held here.
    fn seal(&self, key: &ChainKey, body: String) -> String;
}

impl Seal for std::cell::RefCell<Chain> {
    fn seal(&self, key: &ChainKey, body: String) -> String {
        self.borrow_mut().seal_owned(key, body)
    }
}

impl Seal for std::sync::Mutex<Chain> {
    /// A lock is poisoned only by a panic while it was held; the release builds abort on panic,
    /// so this is for test builds, where the record is still sealed rather than lost.
    fn seal(&self, key: &ChainKey, body: String) -> String {
        match self.lock() {
            Ok(mut c) => c.seal_owned(key, body),
            Err(poisoned) => poisoned.into_inner().seal_owned(key, body),
        }
    }
}

#[cfg(test)]
mod tests;
