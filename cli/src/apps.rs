//! `apisec apps add` (OPS-7): a caller is registered with its onboarding record (who admitted
//! it, the ticket, the date, its business scenario, its contact, the APIs it asked for); its
//! credentials come next (`apisec credentials issue`), then its grants, which the policy keeps
//! within the APIs it was admitted for. The policy file is edited; `apisec policy apply` makes
//! the change live and logs it.

use apisec_core::apps::{RawAdmission, RawApp};

use crate::policy::{load_policy, save_policy, Record};

#[derive(clap::Subcommand)]
pub enum Apps {
    /// Register a caller with its onboarding record (OPS-7) in the policy file
    Add(AddArgs),
}

#[derive(clap::Args)]
pub struct AddArgs {
    /// The policy file to edit (YAML or JSON)
    policy: String,
    /// The caller's app id (x-app-id)
    #[arg(long)]
    app: String,
    /// Its display name
    #[arg(long, default_value = "")]
    name: String,
    /// Who verified its identity and admission material, the onboarding ticket, and when
    #[command(flatten)]
    record: Record,
    /// The business scenario it uses the APIs for
    #[arg(long)]
    scenario: String,
    /// Its contact for security notices
    #[arg(long, default_value = "")]
    contact: String,
    /// The APIs it asked for: ids, `prefix*`, `group:<id>` (repeat, or comma-separated)
    #[arg(long = "apis", required = true, value_delimiter = ',', action = clap::ArgAction::Append)]
    apis: Vec<String>,
    /// A source range it may call from (repeat; any when none)
    #[arg(long = "allowed-ip", value_name = "CIDR", action = clap::ArgAction::Append)]
    allowed_ips: Vec<String>,
    /// Write the edited policy here (`-`: standard output) instead of in place
    #[arg(long)]
    out: Option<String>,
}

pub fn run(cmd: Apps) -> Result<(), String> {
    let Apps::Add(a) = cmd;
    let mut raw = load_policy(&a.policy)?;
    let (by, ticket, date) = a.record.parts()?;
    if raw.apps.iter().any(|x| x.id == a.app) {
        return Err(format!(
            "{}: app '{}' is already registered",
            a.policy, a.app
        ));
    }
    raw.apps.push(RawApp {
        id: a.app.clone(),
        name: a.name,
        credentials: Vec::new(),
        suspended: false,
        allowed_ips: a.allowed_ips,
        onboarding: false,
        sdk: None,
        admission: Some(RawAdmission {
            by,
            ticket,
            date,
            scenario: a.scenario,
            contact: a.contact,
            apis: a.apis,
        }),
    });
    save_policy(&a.policy, a.out.as_deref(), &raw)?;
    eprintln!(
        "registered app '{}' with its onboarding record; next: `apisec credentials issue {} --app {} ...`, \
         its grants, then `apisec policy apply`",
        a.app, a.policy, a.app
    );
    Ok(())
}
