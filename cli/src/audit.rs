//! `apisec audit verify AUDIT_LOG... --key-env VAR [--key-env VAR]... [--checkpoints ENVOY_LOG]...
//! [--format text|json]`: checks the gateway's audit logs (LOG-1): every record against its MAC
//! and the one before it in its chain, the order of each chain, and the checkpoints the gateway
//! wrote to Envoy's log. Exit 0: intact; 1: something was modified, deleted, inserted,
//! reordered or cut off (each finding names its file and line); 2: usage.
//!
//! `apisec audit search AUDIT_LOG... [--id ID] [--app APP] [--api API] [--code CODE]
//! [--status N|4xx|5xx] [--decision D] [--business-errors] [--since T] [--until T]`: the records
//! that match every condition given (LOG-2), one JSON line each, or a table.

use apisec_core::audit_chain::{self, ChainKey};
use apisec_core::evidence;

#[derive(clap::Subcommand)]
pub enum Audit {
    Verify(VerifyArgs),
    Search(SearchArgs),
}

/// Check audit or operations logs' chains (LOG-1, LOG-5): the first modified, deleted,
/// inserted or reordered record with its line, and a tail cut off after a checkpoint in
/// Envoy's log. Strict by default: a line without a chain MAC is a finding, and without
/// checkpoints the logs are not called intact (exit 3). Exit 0 intact, 1 a finding, 2 usage,
/// 3 not verified complete.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("tail").args(["checkpoints", "no_checkpoints"])))]
pub struct VerifyArgs {
    /// The logs, in the order they were written (rotated files first)
    #[arg(required = true, value_name = "LOG")]
    files: Vec<String>,
    /// An environment variable with a chain key (base64); one per key in use (repeat)
    #[arg(long = "key-env", value_name = "VAR", action = clap::ArgAction::Append,
          required_unless_present = "evidence")]
    key_envs: Vec<String>,
    /// Envoy's log with the chains' checkpoints, kept apart from the audit log (repeat per file)
    #[arg(long, value_name = "ENVOY_LOG", action = clap::ArgAction::Append)]
    checkpoints: Vec<String>,
    /// Check the chains alone, knowing that a cut-off tail cannot be seen
    #[arg(long)]
    no_checkpoints: bool,
    /// Count lines without a chain MAC instead of reporting them (logs from before Envoy's own
    /// records had a file of their own)
    #[arg(long)]
    allow_unchained: bool,
    /// Re-verify every S3 record's signature (DATA-4) against the keyring's and the policies'
    /// public keys
    #[arg(long)]
    evidence: bool,
    /// A keyring kept by `policy apply` (retired keys included; repeat)
    #[arg(long = "keyring", value_name = "FILE", action = clap::ArgAction::Append)]
    keyrings: Vec<String>,
    /// A policy whose public keys to use (repeat)
    #[arg(long = "policy", value_name = "FILE", action = clap::ArgAction::Append)]
    policies: Vec<String>,
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    format: String,
}

/// The audit records that match every condition (LOG-2). Exit 0 with a match, 1 with none.
#[derive(clap::Args)]
pub struct SearchArgs {
    /// The audit logs
    #[arg(required = true, value_name = "LOG")]
    files: Vec<String>,
    /// The request id (x-request-id, the transaction serial number)
    #[arg(long, value_name = "REQUEST_ID")]
    id: Option<String>,
    #[arg(long)]
    app: Option<String>,
    #[arg(long)]
    api: Option<String>,
    /// The refusal code
    #[arg(long)]
    code: Option<String>,
    /// The status: N, 4xx or 5xx
    #[arg(long, value_name = "N|4xx|5xx")]
    status: Option<String>,
    #[arg(long, value_parser = ["allow", "deny", "report"])]
    decision: Option<String>,
    /// Calls the gateway let through that the backend answered 4xx or 5xx
    #[arg(long)]
    business_errors: bool,
    /// From this time: RFC 3339 or unix seconds, inclusive
    #[arg(long, value_name = "TIME", value_parser = time_arg)]
    since: Option<u64>,
    /// Until this time: RFC 3339 or unix seconds, inclusive
    #[arg(long, value_name = "TIME", value_parser = time_arg)]
    until: Option<u64>,
    #[arg(long, default_value = "json", value_parser = ["json", "text"])]
    format: String,
}

pub fn run(cmd: Audit) -> Result<u8, String> {
    match cmd {
        Audit::Verify(a) => verify(a),
        Audit::Search(a) => search(a),
    }
}

/// `audit verify`; Ok(the exit status): 0 intact, 1 a finding, 3 clean but unverified.
fn verify(a: VerifyArgs) -> Result<u8, String> {
    let VerifyArgs {
        files,
        key_envs,
        checkpoints,
        no_checkpoints,
        allow_unchained,
        evidence,
        keyrings,
        policies,
        format,
    } = a;
    if evidence && keyrings.is_empty() && policies.is_empty() {
        return Err("--evidence needs --keyring or --policy".into());
    }
    let mut keys = Vec::new();
    for var in &key_envs {
        let text =
            std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?;
        keys.push(ChainKey::from_base64(&text).map_err(|e| format!("{var}: {e}"))?);
    }
    let read = |names: &[String]| -> Result<Vec<(String, String)>, String> {
        names
            .iter()
            .map(|n| {
                std::fs::read(n)
                    .map(|b| (n.to_string(), String::from_utf8_lossy(&b).into_owned()))
                    .map_err(|e| format!("{n}: {e}"))
            })
            .collect()
    };
    let logs = read(&files)?;
    let mut verdict = if keys.is_empty() {
        audit_chain::Verdict::default()
    } else {
        audit_chain::verify(&logs, &keys, &read(&checkpoints)?, allow_unchained)
    };
    if !keys.is_empty() && checkpoints.is_empty() && !no_checkpoints {
        verdict.unverified = Some(
            "no --checkpoints: a tail cut off the logs cannot be seen (give Envoy's log, kept \
             where whoever can edit the audit log cannot, or --no-checkpoints to check the \
             chains alone)"
                .into(),
        );
    }
    if evidence {
        let mut ring = Vec::new();
        for (name, text) in read(&keyrings)? {
            ring.extend(crate::keyring::parse(&name, &text)?);
        }
        for p in &policies {
            let raw = crate::load_policy(p)?;
            let doc = serde_json::to_value(&raw).map_err(|e| e.to_string())?;
            ring.extend(evidence::policy_keys(&doc));
        }
        evidence::verify_logs(&logs, &ring, &keys, &mut verdict);
    }
    match format.as_str() {
        "json" => println!(
            "{}",
            serde_json::to_string_pretty(&verdict).map_err(|e| e.to_string())?
        ),
        "text" => {
            println!(
                "{} record(s) in {} chain(s); {} checkpoint(s); {} line(s) of Envoy's own records",
                verdict.records, verdict.chains, verdict.checkpoints, verdict.unchained
            );
            if keys.is_empty() {
                println!("no --key-env given: the chains were not checked");
            } else if checkpoints.is_empty() && no_checkpoints {
                println!("--no-checkpoints: a tail cut off the logs cannot be seen");
            }
            if let (Some(c), Some(v)) = (verdict.evidence_checked, verdict.evidence_verified) {
                println!(
                    "{c} S3 record(s) with evidence; {v} re-verified under the registered key"
                );
            }
            for f in &verdict.findings {
                println!(
                    "{}:{}: {}: {}{}",
                    f.at.file,
                    f.at.line,
                    f.kind,
                    f.detail,
                    if f.chain.is_empty() {
                        String::new()
                    } else {
                        format!(" (chain {})", f.chain)
                    }
                );
            }
            match (&verdict.unverified, verdict.intact()) {
                (_, false) => println!("NOT intact"),
                (Some(why), true) => println!("NOT verified complete: {why}"),
                (None, true) => println!("intact"),
            }
        }
        f => return Err(format!("unknown --format {f}")),
    }
    Ok(match (verdict.intact(), verdict.unverified.is_some()) {
        (false, _) => 1,
        (true, true) => 3,
        (true, false) => 0,
    })
}

/// What `audit search` keeps: every condition given must hold.
#[derive(Default)]
struct Query<'a> {
    id: Option<&'a str>,
    app: Option<&'a str>,
    api: Option<&'a str>,
    code: Option<&'a str>,
    status: Option<&'a str>,
    decision: Option<&'a str>,
    business_errors: bool,
    since: Option<u64>,
    until: Option<u64>,
}

impl Query<'_> {
    fn matches(&self, r: &serde_json::Value) -> bool {
        let text = |k: &str| r.get(k).and_then(serde_json::Value::as_str);
        let status = r.get("status").and_then(serde_json::Value::as_u64);
        let ts = r.get("ts").and_then(serde_json::Value::as_u64);
        let eq = |want: Option<&str>, k: &str| want.is_none_or(|w| text(k) == Some(w));
        let status_ok = self
            .status
            .is_none_or(|want| match want.strip_suffix("xx") {
                Some(class) => status.is_some_and(|s| (s / 100).to_string() == class),
                None => status.is_some_and(|s| s.to_string() == want),
            });
        // let through (allowed, or only reported), and answered with an error
        let business = !self.business_errors
            || (matches!(text("decision"), Some("allow" | "report"))
                && status.is_some_and(|s| s >= 400));
        eq(self.id, "request_id")
            && eq(self.app, "app")
            && eq(self.api, "api")
            && eq(self.code, "code")
            && eq(self.decision, "decision")
            && status_ok
            && business
            && self.since.is_none_or(|t| ts.is_some_and(|x| x >= t))
            && self.until.is_none_or(|t| ts.is_some_and(|x| x <= t))
    }
}

fn time_arg(s: &str) -> Result<u64, String> {
    s.parse::<u64>()
        .ok()
        .or_else(|| apisec_core::timeutil::parse_rfc3339(s))
        .ok_or_else(|| format!("{s}: not unix seconds or an RFC 3339 time with an offset"))
}

/// `apisec audit search`: Ok(0) with a match, Ok(1) without.
fn search(a: SearchArgs) -> Result<u8, String> {
    let q = Query {
        id: a.id.as_deref(),
        app: a.app.as_deref(),
        api: a.api.as_deref(),
        code: a.code.as_deref(),
        status: a.status.as_deref(),
        decision: a.decision.as_deref(),
        business_errors: a.business_errors,
        since: a.since,
        until: a.until,
    };
    let format = a.format.as_str();
    let files = &a.files;
    let mut found = 0usize;
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
        for line in text.lines() {
            let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else {
                continue; // not a record (a partial last line while Envoy writes)
            };
            if !q.matches(&record) {
                continue;
            }
            found += 1;
            if format == "json" {
                println!("{line}");
            } else {
                let f = |k: &str| {
                    record
                        .get(k)
                        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                        .unwrap_or_else(|| "-".into())
                };
                println!(
                    "{} {} {} {} {} {} {} {} {}",
                    crate::rfc3339_utc(
                        record
                            .get("ts")
                            .and_then(serde_json::Value::as_u64)
                            .unwrap_or(0)
                    ),
                    f("request_id"),
                    f("decision"),
                    f("status"),
                    f("code"),
                    f("app"),
                    f("api"),
                    f("method"),
                    f("path")
                );
            }
        }
    }
    Ok(if found > 0 { 0 } else { 1 })
}
