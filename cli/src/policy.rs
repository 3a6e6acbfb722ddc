//! `apisec policy`: check a policy file (the filter's own validation), print it as the JSON the
//! filter reads or the secret variables it names, apply it to a running gateway (apply.rs), and
//! print the JSON Schema of the policy file for editors and CI.

use apisec_core::policy::RawPolicy;

use crate::EnvSecrets;

#[derive(clap::Subcommand)]
pub enum Policy {
    /// Validate a policy (YAML or JSON); secrets are checked only if their environment
    /// variables are set. With --against (the policy in force, e.g. the ECDS file's
    /// applied-policy.json), an API's change of state or level needs a new review record
    /// (OPS-1, LVL-4)
    Check {
        file: String,
        #[arg(long, value_name = "IN_FORCE")]
        against: Option<String>,
    },
    /// Print the validated policy as the compact JSON the filter reads
    Json { file: String },
    /// Print the environment variables the policy names for secrets, one per line (Envoy's
    /// host_env_keys)
    Env { file: String },
    /// Validate, print the changes, write into Envoy's ECDS file atomically, wait until Envoy
    /// loads or rejects it, and log it to the operations log (LVL-4, BWL-3, LOG-5)
    Apply(Box<crate::apply::Args>),
    /// Print the JSON Schema (draft-07) of the policy file, generated from the types the filter
    /// reads, for editors and CI (checked in as policies/policy.schema.json)
    Schema,
}

pub fn run(cmd: Policy) -> Result<(), String> {
    match cmd {
        Policy::Check { file, against } => policy_check(&file, against.as_deref()),
        Policy::Json { file } => policy_json(&file),
        Policy::Env { file } => policy_env(&file),
        Policy::Apply(a) => crate::apply::apply(&*a.check()?),
        Policy::Schema => {
            let mut schema = schemars::schema_for!(RawPolicy);
            schema.schema.metadata().title = Some("apisec policy".into());
            println!(
                "{}",
                serde_json::to_string_pretty(&schema).map_err(|e| e.to_string())?
            );
            Ok(())
        }
    }
}

pub fn load_policy(file: &str) -> Result<RawPolicy, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    // YAML is a superset of JSON: one parser for both, the same raw structs as the filter.
    serde_norway::from_str::<RawPolicy>(&text).map_err(|e| format!("{file}: {e}"))
}

fn policy_env(file: &str) -> Result<(), String> {
    for name in load_policy(file)?.secret_env_names() {
        println!("{name}");
    }
    Ok(())
}

/// A policy checked as `policy check` checks it: the filter's validation; with `in_force` (the
/// policy in force), the review of each API's change of state or level (OPS-1, LVL-4); and
/// its secrets when every variable they name is set here. The policy, and the variables not
/// set (whose secrets were not checked).
pub fn checked(file: &str, in_force: Option<&str>) -> Result<(RawPolicy, Vec<String>), String> {
    let raw = load_policy(file)?;
    raw.validate().map_err(|e| format!("{file}: {e}"))?;
    if let Some(old) = in_force {
        let old = load_policy(old)?;
        apisec_core::inventory::review_of_changes(&old.apis, &raw.apis)
            .map_err(|e| format!("{file}: {e}"))?;
    }
    let missing: Vec<String> = raw
        .secret_env_names()
        .into_iter()
        .filter(|e| std::env::var(e).is_err())
        .collect();
    if missing.is_empty() {
        raw.clone()
            .into_policy(&EnvSecrets)
            .map_err(|e| format!("{file}: {e}"))?;
    }
    Ok((raw, missing))
}

fn policy_check(file: &str, in_force: Option<&str>) -> Result<(), String> {
    let (raw, missing) = checked(file, in_force)?;
    println!(
        "{file}: valid: {} APIs, {} apps{}",
        raw.apis.len(),
        raw.apps.len(),
        if missing.is_empty() {
            String::new()
        } else {
            format!(
                " (secrets not checked here, not set: {})",
                missing.join(", ")
            )
        }
    );
    Ok(())
}

fn policy_json(file: &str) -> Result<(), String> {
    let raw = load_policy(file)?;
    raw.validate().map_err(|e| format!("{file}: {e}"))?;
    println!(
        "{}",
        serde_json::to_string(&raw).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// Writes an edited policy (validated first) to `out`, `-` for standard output, or back to
/// `src` in place (a temporary file renamed over it). The file is written from its data: YAML
/// comments are not kept, and the count of those dropped is said.
pub fn save_policy(src: &str, out: Option<&str>, raw: &RawPolicy) -> Result<(), String> {
    raw.validate().map_err(|e| format!("{src}: {e}"))?;
    let text = serde_norway::to_string(raw).map_err(|e| e.to_string())?;
    let dest = out.unwrap_or(src);
    if dest == "-" {
        print!("{text}");
        return Ok(());
    }
    let comments = std::fs::read_to_string(src)
        .map(|t| {
            t.lines()
                .filter(|l| l.trim_start().starts_with('#'))
                .count()
        })
        .unwrap_or(0);
    // 0o666 less the umask: the mode a plain write gives a new file
    crate::write_atomically(std::path::Path::new(dest), &text, 0o666)?;
    if comments > 0 && dest == src {
        eprintln!(
            "note: {dest} was rewritten from its data; its {comments} comment line(s) are not kept \
             (review the change with a diff before applying it)"
        );
    }
    Ok(())
}

/// Who signs a record (reviewed a change, or admitted a caller), its ticket, and its date.
#[derive(clap::Args)]
pub struct Record {
    /// Who reviewed the change (or verified and admitted the caller)
    #[arg(long)]
    pub by: String,
    /// The ticket where it is filed (a new one for each change: `policy apply` refuses a reused
    /// review)
    #[arg(long)]
    pub ticket: String,
    /// YYYY-MM-DD (default today, UTC)
    #[arg(long)]
    pub date: Option<String>,
}

impl Record {
    /// (by, ticket, date), the date filled in with today.
    pub fn parts(self) -> Result<(String, String, String), String> {
        let date = match self.date {
            Some(d) => d,
            None => crate::today()?,
        };
        Ok((self.by, self.ticket, date))
    }
}
