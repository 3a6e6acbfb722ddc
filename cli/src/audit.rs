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

pub const USAGE: &str = "  apisec audit verify LOG... [--key-env VAR]... (--checkpoints ENVOY_LOG... | --no-checkpoints)
              [--allow-unchained] [--evidence [--keyring FILE]... [--policy FILE]...] [--format text|json]
                                          check audit or operations logs' chains (LOG-1, LOG-5): the
                                          first modified, deleted, inserted or reordered record with
                                          its line, and a tail cut off after a checkpoint in Envoy's
                                          log; the keys are read from environment variables (base64),
                                          one per key in use. --evidence re-verifies every S3
                                          record's signature (DATA-4) against the public keys of the
                                          keyring (kept by policy apply, retired keys included) and
                                          of the policies given. Strict by default: a line
                                          without a chain MAC is a finding (--allow-unchained
                                          counts them, for logs from before Envoy's own records
                                          had a file of their own), and without checkpoints
                                          the logs are not called intact (exit 3; state
                                          --no-checkpoints to check the chains alone).
                                          Exit 0 intact, 1 a finding, 2 usage, 3 unverified
  apisec audit search LOG... [--id REQUEST_ID] [--app APP] [--api API] [--code CODE]
              [--status N|4xx|5xx] [--decision allow|deny|report] [--business-errors]
              [--since TIME] [--until TIME] [--format json|text]
                                          the audit records that match every condition (LOG-2):
                                          --business-errors are calls the gateway let through that
                                          the backend answered 4xx or 5xx; TIME is RFC 3339 or
                                          unix seconds, both bounds inclusive. Exit 0 with a match,
                                          1 with none";

/// Runs the command; Ok(the exit status): 0 intact, 1 a finding, 3 clean but unverified.
pub fn run(args: &[&str]) -> Result<u8, String> {
    if let Some((&"search", rest)) = args.split_first() {
        return search(rest);
    }
    let Some((&"verify", rest)) = args.split_first() else {
        return Err(format!("unknown audit command\n{USAGE}"));
    };
    let mut files = Vec::new();
    let mut key_envs = Vec::new();
    let mut checkpoints = Vec::new();
    let mut format = "text";
    let mut evidence = false;
    let mut keyrings = Vec::new();
    let mut policies = Vec::new();
    let mut allow_unchained = false;
    let mut no_checkpoints = false;
    let mut it = rest.iter();
    while let Some(&a) = it.next() {
        let mut value = || {
            it.next()
                .copied()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a {
            "--key-env" => key_envs.push(value()?),
            "--checkpoints" => checkpoints.push(value()?),
            "--format" => format = value()?,
            "--evidence" => evidence = true,
            "--allow-unchained" => allow_unchained = true,
            "--no-checkpoints" => no_checkpoints = true,
            "--keyring" => keyrings.push(value()?),
            "--policy" => policies.push(value()?),
            s if s.starts_with("--") => return Err(format!("unknown option {s}\n{USAGE}")),
            file => files.push(file),
        }
    }
    if files.is_empty() || (key_envs.is_empty() && !evidence) {
        return Err(format!(
            "give the logs, and --key-env or --evidence\n{USAGE}"
        ));
    }
    if evidence && keyrings.is_empty() && policies.is_empty() {
        return Err(format!("--evidence needs --keyring or --policy\n{USAGE}"));
    }
    let mut keys = Vec::new();
    for var in key_envs {
        let text =
            std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?;
        keys.push(ChainKey::from_base64(&text).map_err(|e| format!("{var}: {e}"))?);
    }
    let read = |names: &[&str]| -> Result<Vec<(String, String)>, String> {
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
    match format {
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
fn search(args: &[&str]) -> Result<u8, String> {
    let mut q = Query::default();
    let mut files = Vec::new();
    let mut format = "json";
    let mut it = args.iter();
    while let Some(&a) = it.next() {
        let mut value = || {
            it.next()
                .copied()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a {
            "--id" => q.id = Some(value()?),
            "--app" => q.app = Some(value()?),
            "--api" => q.api = Some(value()?),
            "--code" => q.code = Some(value()?),
            "--status" => q.status = Some(value()?),
            "--decision" => q.decision = Some(value()?),
            "--business-errors" => q.business_errors = true,
            "--since" => q.since = Some(time_arg(value()?)?),
            "--until" => q.until = Some(time_arg(value()?)?),
            "--format" => format = value()?,
            s if s.starts_with("--") => return Err(format!("unknown option {s}\n{USAGE}")),
            file => files.push(file),
        }
    }
    if files.is_empty() || !matches!(format, "json" | "text") {
        return Err(format!(
            "give the audit logs (and --format json or text)\n{USAGE}"
        ));
    }
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
