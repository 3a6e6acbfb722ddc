//! `apisec inventory POLICY [--format table|csv|json]`: the API inventory (LVL-2).
//! `apisec inventory import OPENAPI_FILE [--policy POLICY]`: inventory entries drafted from an
//! OpenAPI 3 document (core `openapi`), levels left for a person to set, and the difference
//! against the policy's inventory.

use apisec_core::inventory::RawApi;
use apisec_core::openapi;

/// The API inventory (LVL-2): method, path, level, service object, read/write, user
/// authentication, personal information, business function, state, mode, Annex A row.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Edit>,
    /// The policy (YAML or JSON)
    #[arg(required = true)]
    policy: Option<String>,
    #[arg(long, default_value = "table", value_parser = ["table", "csv", "json"])]
    format: String,
}

#[derive(clap::Subcommand)]
enum Edit {
    /// Draft inventory entries from an OpenAPI 3 document (YAML or JSON); levels and the fields
    /// a document cannot tell are left as SET-ME for a person; with --policy, only what the
    /// policy lacks, and what it has that the document does not
    Import {
        #[arg(value_name = "OPENAPI_FILE")]
        file: String,
        #[arg(long, value_name = "POLICY")]
        policy: Option<String>,
    },
    /// Take an API online, offline, or retire it, with its review record (LVL-6, OPS-1, OPS-9):
    /// edits the policy file and names the callers to notify (the apps its grants cover, with
    /// their onboarding contact). Its logs stay at the collector and its callers' public keys
    /// in the keyring
    SetState {
        /// The policy file to edit
        policy: String,
        /// The API's id
        #[arg(long)]
        api: String,
        #[arg(long, value_parser = ["online", "offline", "retired", "draft"])]
        state: String,
        #[command(flatten)]
        record: crate::policy::Record,
        /// Write the edited policy here (`-`: standard output) instead of in place
        #[arg(long)]
        out: Option<String>,
    },
}

/// `inventory set-state`: the API's new state and review, and who to tell.
fn set_state(cmd: Edit) -> Result<(), String> {
    let Edit::SetState {
        policy,
        api,
        state,
        record,
        out,
    } = cmd
    else {
        return Err("not set-state".into());
    };
    let mut raw = crate::load_policy(&policy)?;
    let entry = raw
        .apis
        .iter_mut()
        .find(|a| a.id == api)
        .ok_or_else(|| format!("{policy}: no API '{api}'"))?;
    entry.state = serde_json::from_value(serde_json::Value::String(state.clone()))
        .map_err(|e| e.to_string())?;
    let (by, ticket, date) = record.parts()?;
    entry.review = Some(apisec_core::inventory::Review { by, ticket, date });
    let compiled = raw
        .compile_for_review()
        .map_err(|e| format!("{policy}: {e}"))?;
    let index = compiled.apis().iter().position(|a| a.id == api);
    let mut callers: Vec<&str> = compiled
        .grants
        .iter()
        .filter(|g| index.is_some_and(|i| g.apis.contains(i)))
        .map(|g| g.app.as_str())
        .collect();
    callers.sort_unstable();
    callers.dedup();
    crate::policy::save_policy(&policy, out.as_deref(), &raw)?;
    eprintln!("'{api}' is {state} in {policy}; apply the policy to make it live");
    if state != "online" {
        for app in callers {
            let contact = raw
                .apps
                .iter()
                .find(|a| a.id == app)
                .and_then(|a| a.admission.as_ref())
                .map_or("no contact on record", |a| a.contact.as_str());
            println!("notify\t{app}\t{contact}");
        }
    }
    Ok(())
}

const COLUMNS: &[&str] = &[
    "id",
    "method",
    "path",
    "level",
    "service_object",
    "access",
    "user_auth",
    "personal_info",
    "function",
    "state",
    "mode",
    "annex_a",
];

fn row(a: &RawApi) -> Vec<String> {
    let v = serde_json::to_value(a).unwrap_or_default();
    let text = |k: &str| match v.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => String::new(),
        Some(x) => x.to_string(),
    };
    COLUMNS
        .iter()
        .map(|c| match *c {
            "mode" if text(c).is_empty() => "enforce".into(),
            "state" if text(c).is_empty() => "online".into(),
            c => text(c),
        })
        .collect()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn list(policy_file: &str, format: &str) -> Result<(), String> {
    let raw = crate::load_policy(policy_file)?;
    raw.validate().map_err(|e| format!("{policy_file}: {e}"))?;
    let rows: Vec<Vec<String>> = raw.apis.iter().map(row).collect();
    match format {
        "json" => {
            let docs: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    COLUMNS
                        .iter()
                        .zip(r)
                        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
                        .collect::<serde_json::Map<_, _>>()
                        .into()
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&docs).map_err(|e| e.to_string())?
            );
        }
        "csv" => {
            println!("{}", COLUMNS.join(","));
            for r in &rows {
                println!(
                    "{}",
                    r.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(",")
                );
            }
        }
        "table" => {
            let widths: Vec<usize> = (0..COLUMNS.len())
                .map(|i| {
                    rows.iter()
                        .filter_map(|r| r.get(i))
                        .map(String::len)
                        .chain([COLUMNS.get(i).map_or(0, |c| c.len())])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |cells: Vec<&str>| {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            println!("{}", line(COLUMNS.to_vec()));
            for r in &rows {
                println!("{}", line(r.iter().map(String::as_str).collect()));
            }
        }
        f => return Err(format!("unknown --format {f} (table, csv or json)")),
    }
    Ok(())
}

fn import(file: &str, policy: Option<&str>) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    let doc: serde_json::Value =
        serde_norway::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
    let drafts = openapi::drafts(&doc).map_err(|e| format!("{file}: {e}"))?;
    let apis = match policy {
        Some(p) => crate::load_policy(p)?.apis,
        None => Vec::new(),
    };
    let diff = openapi::diff(&drafts, &apis);
    println!(
        "# apisec inventory import {file}: {} operation(s); {} new{}",
        drafts.len(),
        diff.new.len(),
        policy.map_or(String::new(), |p| format!(
            " to {p}, {} in the policy under another id, {} in the policy but not in the document",
            diff.renamed.len(),
            diff.missing.len()
        ))
    );
    println!(
        "# Set every SET-ME (level: table A.1 in policies/annex-a/table-a1.yaml), then add the"
    );
    println!("# entries under apis:. `apisec policy check` refuses the policy until each is set.");
    for d in &diff.new {
        println!("  - id: {}", d.id);
        println!("    method: {}", d.method);
        println!("    path: \"{}\"", d.path);
        println!("    level: SET-ME            # S0 | S1 | S2 | S3");
        println!("    service_object: SET-ME   # toB | toC | toG");
        println!("    access: {}", d.access);
        println!("    user_auth: SET-ME        # true | false");
        println!("    personal_info: SET-ME    # true | false");
        println!("    function: {}", d.function);
        if !d.description.is_empty() {
            println!("    description: {:?}", d.description);
        }
    }
    for (old, new) in &diff.renamed {
        println!("# in the policy as '{old}', in the document as '{new}'");
    }
    for (id, m, p) in &diff.missing {
        println!("# in the policy, not in the document: {id} ({m} {p}); retire it or document it");
    }
    Ok(())
}

pub fn run(a: Args) -> Result<(), String> {
    match (a.command, a.policy) {
        (Some(Edit::Import { file, policy }), _) => import(&file, policy.as_deref()),
        (Some(cmd @ Edit::SetState { .. }), _) => set_state(cmd),
        (None, Some(policy)) => list(&policy, &a.format),
        (None, None) => Err("give a policy file".into()),
    }
}
