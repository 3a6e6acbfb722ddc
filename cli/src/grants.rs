//! `apisec grants` (OPS-3, PERM-6): list a policy's grants with their validity, and print the
//! policy without a caller's grants (or one grant), validated, to apply.

use crate::policy::load_policy;

#[derive(clap::Subcommand)]
pub enum Grants {
    /// List grants (all, or one caller's) with their validity (OPS-3)
    List {
        file: String,
        #[arg(long)]
        app: Option<String>,
    },
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

pub fn run(cmd: Grants) -> Result<(), String> {
    match cmd {
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
