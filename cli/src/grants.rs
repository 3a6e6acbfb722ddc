//! `apisec grants` (OPS-3, PERM-6): list a policy's grants with their validity, and print the
//! policy without a caller's grants (or one grant), validated, to apply.

use apisec_core::access::{RawApproval, RawGrant};

use crate::policy::{load_policy, save_policy};
use crate::today;

#[derive(clap::Subcommand)]
pub enum Grants {
    /// List grants (all, or one caller's) with their validity (OPS-3)
    List {
        file: String,
        #[arg(long)]
        app: Option<String>,
    },
    /// Add a grant with the record of its application and review (OPS-8, PERM-3), at any level
    Add(Box<AddArgs>),
    /// Print the policy without that caller's grants (or one grant), validated, as YAML
    /// (comments are not kept)
    Revoke {
        file: String,
        #[arg(long)]
        app: String,
        #[arg(long, value_name = "ID")]
        grant: Option<String>,
    },
}

#[derive(clap::Args)]
pub struct AddArgs {
    /// The policy file to edit
    file: String,
    /// The caller
    #[arg(long)]
    app: String,
    /// The grant's id
    #[arg(long = "id", value_name = "GRANT")]
    id: String,
    /// API ids, `prefix*`, `group:<id>` (repeat, or comma-separated)
    #[arg(long, value_delimiter = ',', action = clap::ArgAction::Append)]
    apis: Vec<String>,
    /// Business functions (repeat, or comma-separated)
    #[arg(long, value_delimiter = ',', action = clap::ArgAction::Append)]
    functions: Vec<String>,
    /// Who applied for the access
    #[arg(long)]
    requested_by: String,
    /// Who reviewed and approved it
    #[arg(long)]
    approved_by: String,
    /// The ticket of the application and its review
    #[arg(long)]
    ticket: String,
    /// The date of the approval, YYYY-MM-DD (default today)
    #[arg(long)]
    date: Option<String>,
    /// The risk assessment's reference (S3, PERM-3)
    #[arg(long, default_value = "")]
    assessment: String,
    /// The end of the grant's validity, RFC 3339 with an offset (PERM-5)
    #[arg(long, value_name = "TIME")]
    not_after: Option<String>,
    /// Write the edited policy here (`-`: standard output) instead of in place
    #[arg(long)]
    out: Option<String>,
}

fn grants_add(a: &AddArgs) -> Result<(), String> {
    let mut raw = load_policy(&a.file)?;
    if raw.grants.iter().any(|g| g.id == a.id) {
        return Err(format!("{}: grant '{}' exists", a.file, a.id));
    }
    let doc = serde_json::json!({
        "id": a.id, "app": a.app, "apis": a.apis, "functions": a.functions,
        "not_after": a.not_after,
    });
    let mut grant: RawGrant = serde_json::from_value(doc).map_err(|e| e.to_string())?;
    grant.approval = Some(RawApproval {
        approver: a.approved_by.clone(),
        ticket: a.ticket.clone(),
        date: match &a.date {
            Some(d) => d.clone(),
            None => today()?,
        },
        assessment: a.assessment.clone(),
        requested_by: a.requested_by.clone(),
    });
    raw.grants.push(grant);
    save_policy(&a.file, a.out.as_deref(), &raw)?;
    eprintln!(
        "granted '{}' to '{}' (requested by {}, approved by {}, {}); apply the policy to make it live",
        a.id, a.app, a.requested_by, a.approved_by, a.ticket
    );
    Ok(())
}

pub fn run(cmd: Grants) -> Result<(), String> {
    match cmd {
        Grants::Add(a) => grants_add(&a),
        Grants::List { file, app } => grants_list(&file, app.as_deref()),
        Grants::Revoke { file, app, grant } => grants_revoke(&file, &app, grant.as_deref()),
    }
}

fn grants_list(file: &str, app: Option<&str>) -> Result<(), String> {
    let raw = load_policy(file)?;
    raw.validate().map_err(|e| format!("{file}: {e}"))?;
    let mut n = 0;
    for g in raw.grants.iter().filter(|g| app.is_none_or(|a| g.app == a)) {
        n += 1;
        let mut what: Vec<String> = g.apis.clone();
        what.extend(g.functions.iter().map(|f| format!("function:{f}")));
        let mut validity = Vec::new();
        if let Some(t) = &g.not_before {
            validity.push(format!("from {t}"));
        }
        if let Some(t) = &g.not_after {
            validity.push(format!("until {t}"));
        }
        if g.once {
            validity.push("single use".into());
        }
        if let Some(m) = g.max_uses {
            validity.push(format!("{m} uses"));
        }
        if !g.windows.is_empty() {
            validity.push(format!("{} time windows", g.windows.len()));
        }
        if !g.users.is_empty() {
            validity.push(format!("users {}", g.users.join(",")));
        }
        let approval = g
            .approval
            .as_ref()
            .map(|a| format!(" approved by {} ({}, {})", a.approver, a.ticket, a.date));
        println!(
            "{}\t{}\t{}\t{}{}",
            g.id,
            g.app,
            what.join(","),
            if validity.is_empty() {
                "no limits".to_string()
            } else {
                validity.join("; ")
            },
            approval.unwrap_or_default()
        );
    }
    if n == 0 {
        eprintln!(
            "no grants{}",
            app.map(|a| format!(" for {a}")).unwrap_or_default()
        );
    }
    Ok(())
}

fn grants_revoke(file: &str, app: &str, grant: Option<&str>) -> Result<(), String> {
    let mut raw = load_policy(file)?;
    let before = raw.grants.len();
    raw.grants
        .retain(|g| !(g.app == app && grant.is_none_or(|id| g.id == id)));
    if raw.grants.len() == before {
        return Err(format!("{file}: no matching grant for {app}"));
    }
    raw.validate().map_err(|e| format!("{file}: {e}"))?;
    eprintln!(
        "removed {} grant(s) of {app}; apply the printed policy to take effect",
        before - raw.grants.len()
    );
    print!(
        "{}",
        serde_norway::to_string(&raw).map_err(|e| e.to_string())?
    );
    Ok(())
}
