//! `apisec policy apply`: the documented way to change the policy of a running gateway (LVL-4,
//! BWL-3, PERM-3, LOG-5). It validates the policy with the filter's own core code (secrets too,
//! when their variables are set here or in `--env-file`), puts it into the ECDS resource Envoy
//! watches (atomically: a temp file in the same directory, then a rename), waits until Envoy
//! reports the version loaded or rejected (`--admin`), and appends the outcome with every change,
//! item by item, to the operations log. The previous policy for the next comparison is kept
//! only when Envoy took the new one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{load_policy, EnvSecrets};

/// `apisec policy apply`: validate (secrets too, where set here or in --env-file), print the
/// changes, write into Envoy's ECDS file atomically, wait until Envoy loads or rejects it, and
/// log the outcome, who, and every change to the operations log, chained under the ops key
/// (LVL-4, BWL-3, LOG-5); keep the policy's public keys in the keyring (DATA-4). Refused: an
/// empty actor, and an unsealed line into a sealed log (no key).
#[derive(clap::Args)]
pub struct Args {
    /// The policy (YAML or JSON)
    pub policy: String,
    /// The ECDS file Envoy watches (envoy/gateway.yaml: build/ecds/apisec.yaml)
    #[arg(long, value_name = "PATH")]
    pub ecds: PathBuf,
    /// Who applies it, for the operations log (never empty)
    #[arg(long, value_name = "NAME", env = "USER", default_value = "operator")]
    pub actor: String,
    /// Envoy's log, to print the reason when Envoy refuses the policy
    #[arg(long, value_name = "PATH")]
    pub envoy_log: Option<PathBuf>,
    /// Validate and print the changes; write nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Where the change comes from (a ticket, a pipeline), for the operations log
    #[arg(long, value_name = "TEXT")]
    pub source: Option<String>,
    /// The operations log (default: operations.log beside the ECDS file)
    #[arg(long, value_name = "PATH")]
    pub ops_log: Option<PathBuf>,
    /// Envoy's admin address: wait until Envoy loads or rejects the policy
    #[arg(long, value_name = "HOST:PORT")]
    pub admin: Option<String>,
    /// How long to wait for Envoy, in seconds
    #[arg(long, value_name = "SECONDS", default_value = "15", value_parser = seconds)]
    pub timeout: Duration,
    /// A .env file with the secrets' variables (KEY=VALUE lines)
    #[arg(long, value_name = "PATH")]
    pub env_file: Option<PathBuf>,
    /// The variable holding the operations log's chain key (base64, 32 bytes or more)
    #[arg(long, value_name = "VAR", default_value = crate::opslog::DEFAULT_KEY_ENV)]
    pub ops_key_env: String,
    /// The keyring of public keys (default: public-keys.jsonl beside the ECDS file)
    #[arg(long, value_name = "PATH")]
    pub keyring: Option<PathBuf>,
}

fn seconds(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| "whole seconds".to_string())
}

impl Args {
    /// The checks clap cannot express.
    pub fn check(self: Box<Self>) -> Result<Box<Self>, String> {
        if self.actor.trim().is_empty() {
            return Err(
                "policy apply needs an actor: --actor NAME (or USER set), never empty".into(),
            );
        }
        Ok(self)
    }
}

/// A `.env` file (the demo's `build/demo.env`), read by `dotenvy`: `KEY=VALUE` lines, quotes,
/// comments; nothing is put into this process's environment.
pub(crate) fn read_env_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    dotenvy::from_path_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .map(|item| item.map_err(|e| format!("{}: {e}", path.display())))
        .collect()
}

pub(crate) struct Secrets(pub(crate) Vec<(String, String)>);
impl apisec_core::policy::SecretSource for Secrets {
    fn get(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| apisec_core::policy::SecretSource::get(&EnvSecrets, name))
    }
}

fn index(doc: &Value, section: &str) -> Vec<(String, Value)> {
    doc.get(section)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|x| Some((x.get("id")?.as_str()?.to_string(), x.clone())))
                .collect()
        })
        .unwrap_or_default()
}

/// The sections whose changes are logged item by item (by `id`).
const ITEMIZED: [&str; 6] = [
    "apis",
    "apps",
    "grants",
    "lists",
    "api_groups",
    "rate_limits",
];

/// What an operator changed, item by item: levels, lifecycle, apps, keys (by id, never the key
/// material), grants, lists, rate limits, opt-outs, bans, gateway settings.
pub fn changes(old: Option<&Value>, new: &Value) -> Vec<Value> {
    let empty = json!({});
    let old = old.unwrap_or(&empty);
    let mut out = Vec::new();
    for section in ITEMIZED {
        let (before, after) = (index(old, section), index(new, section));
        let ids: BTreeSet<&String> = before.iter().chain(after.iter()).map(|(k, _)| k).collect();
        for id in ids {
            let b = before.iter().find(|(k, _)| k == id).map(|(_, v)| v);
            let a = after.iter().find(|(k, _)| k == id).map(|(_, v)| v);
            if b == a {
                continue;
            }
            let change = match (b, a) {
                (None, _) => "added",
                (_, None) => "removed",
                _ => "changed",
            };
            let mut entry = json!({"section": section, "id": id, "change": change});
            if let (Some(Value::Object(b)), Some(Value::Object(a))) = (b, a) {
                let mut fields = serde_json::Map::new();
                let keys: BTreeSet<&String> = b.keys().chain(a.keys()).collect();
                for f in keys {
                    if b.get(f) != a.get(f) && f != "public_key_pem" && f != "credentials" {
                        fields.insert(f.clone(), json!({"before": b.get(f), "after": a.get(f)}));
                    }
                }
                if b.get("credentials") != a.get("credentials") {
                    fields.insert("credentials".into(), credential_changes(b, a));
                }
                if let Some(e) = entry.as_object_mut() {
                    e.insert("fields".into(), Value::Object(fields));
                }
            }
            out.push(entry);
        }
    }
    // every other section whole (bans and their lifts, anomaly rules and the sources they
    // approve, sessions, audit, state, gateway settings, ...): none holds a secret, only the
    // names of the environment variables that do
    let keys: BTreeSet<&String> = [old, new]
        .iter()
        .filter_map(|d| d.as_object())
        .flat_map(|m| m.keys())
        .filter(|k| !ITEMIZED.contains(&k.as_str()))
        .collect();
    for key in keys {
        if old.get(key) != new.get(key) {
            out.push(json!({"section": key, "change": "changed", "before": old.get(key), "after": new.get(key)}));
        }
    }
    out
}

/// An app's credentials, by id, never the key material (LOG-5): issued (a new id), revoked (an
/// id gone), rotated (the same id with another key, algorithm or validity).
fn credential_changes(
    before: &serde_json::Map<String, Value>,
    after: &serde_json::Map<String, Value>,
) -> Value {
    let by_id = |x: &serde_json::Map<String, Value>| -> Vec<(String, Value)> {
        x.get("credentials")
            .and_then(Value::as_array)
            .map(|c| {
                c.iter()
                    .filter_map(|c| Some((c.get("id")?.as_str()?.to_string(), c.clone())))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (b, a) = (by_id(before), by_id(after));
    let find = |list: &[(String, Value)], id: &str| {
        list.iter().find(|(k, _)| k == id).map(|(_, v)| v.clone())
    };
    let issued: Vec<&String> = a
        .iter()
        .filter(|(id, _)| find(&b, id).is_none())
        .map(|(id, _)| id)
        .collect();
    let revoked: Vec<&String> = b
        .iter()
        .filter(|(id, _)| find(&a, id).is_none())
        .map(|(id, _)| id)
        .collect();
    let rotated: Vec<&String> = a
        .iter()
        .filter(|(id, v)| find(&b, id).is_some_and(|old| &old != v))
        .map(|(id, _)| id)
        .collect();
    json!({"issued": issued, "revoked": revoked, "rotated": rotated})
}

/// The filter's ECDS counters from Envoy's admin: (update_success, update_rejected).
fn ecds_counters(admin: &str) -> Result<(u64, u64), String> {
    let text = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .build()
        .get(&format!("http://{admin}/stats"))
        .query("filter", "extension_config_discovery.http_filter")
        .call()
        .map_err(|e| format!("admin {admin}: {e}"))?
        .into_string()
        .map_err(|e| format!("admin {admin}: {e}"))?;
    let counter = |name: &str| -> u64 {
        text.lines()
            .filter(|l| {
                l.contains(".apisec.") && l.split(':').next().is_some_and(|k| k.ends_with(name))
            })
            .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<u64>().ok())
            .sum()
    };
    Ok((counter(".update_success"), counter(".update_rejected")))
}

/// A policy validated and rendered into the ECDS resource, ready to write.
struct Prepared {
    policy_json: String,
    new: Value,
    unchecked: Vec<String>,
    ecds_text: String,
    ecds: Value,
}

/// Validates the policy with the filter's own code and renders the ECDS resource; an error is
/// the reason the policy is refused.
fn prepare(args: &Args, env_pairs: Vec<(String, String)>) -> Result<Prepared, String> {
    let raw = load_policy(&args.policy)?;
    raw.validate()
        .map_err(|e| format!("{}: {e}", args.policy))?;
    // OPS-1, LVL-4: against the policy in force (none before the first apply, when every API
    // that is not a draft goes online), each change of state or level carries a new review.
    let applied = args.ecds.with_file_name("applied-policy.json");
    let in_force = match std::fs::read_to_string(&applied) {
        Ok(text) => {
            serde_json::from_str::<apisec_core::policy::RawPolicy>(&text)
                .map_err(|e| {
                    format!(
                        "{}: the policy in force cannot be read: {e}",
                        applied.display()
                    )
                })?
                .apis
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("{}: {e}", applied.display())),
    };
    apisec_core::inventory::review_of_changes(&in_force, &raw.apis)
        .map_err(|e| format!("{}: {e}", args.policy))?;
    let secrets = Secrets(env_pairs);
    // Envoy refuses a VM config that names an environment variable twice.
    let names: Vec<String> = raw.secret_env_names();
    let unchecked: Vec<String> = names
        .iter()
        .filter(|n| apisec_core::policy::SecretSource::get(&secrets, n).is_none())
        .cloned()
        .collect();
    if unchecked.is_empty() {
        raw.clone()
            .into_policy(&secrets)
            .map_err(|e| format!("{}: {e}", args.policy))?;
    }
    let policy_json = serde_json::to_string(&raw).map_err(|e| e.to_string())?;
    let new: Value = serde_json::from_str(&policy_json).map_err(|e| e.to_string())?;

    // The ECDS resource as rendered: only the policy, the secret names and the version change.
    let ecds_text =
        std::fs::read_to_string(&args.ecds).map_err(|e| format!("{}: {e}", args.ecds.display()))?;
    // JSON as this command writes it, or YAML as the checked-in template envoy/apisec-ecds.yaml.
    let mut ecds: Value =
        serde_norway::from_str(&ecds_text).map_err(|e| format!("{}: {e}", args.ecds.display()))?;
    let native = ecds
        .pointer("/resources/0/typed_config/@type")
        .and_then(Value::as_str)
        == Some(NATIVE_FILTER_TYPE);
    if native {
        // The native build (envoy/apisec-native-ecds.yaml): the policy in `filter_config`;
        // secrets come from Envoy's own environment, so there is no list of names to keep.
        let config = ecds
            .pointer_mut("/resources/0/typed_config")
            .and_then(Value::as_object_mut)
            .ok_or("the ECDS file holds no filter config at resources[0]")?;
        config.insert(
            "filter_config".into(),
            json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": policy_json}),
        );
    } else {
        let config = ecds
            .pointer_mut("/resources/0/typed_config/config")
            .ok_or("the ECDS file holds no Wasm filter config at resources[0]")?;
        let config = config
            .as_object_mut()
            .ok_or("the ECDS Wasm filter config is not an object")?;
        config.insert(
            "configuration".into(),
            json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": policy_json}),
        );
        config
            .get_mut("vm_config")
            .and_then(Value::as_object_mut)
            .ok_or("the ECDS Wasm filter config has no vm_config")?
            .insert(
                "environment_variables".into(),
                json!({"host_env_keys": names}),
            );
    }

    Ok(Prepared {
        policy_json,
        new,
        unchecked,
        ecds_text,
        ecds,
    })
}

/// The type of the native build's filter (Envoy's dynamic modules).
const NATIVE_FILTER_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter";

/// Applies a policy; every outcome, a policy refused here included, goes to the operations log.
pub fn apply(args: &Args) -> Result<(), String> {
    let env_pairs = match &args.env_file {
        Some(f) => read_env_file(f)?,
        None => Vec::new(),
    };
    let ops_key = crate::opslog::key(&args.ops_key_env, &env_pairs)?;
    let ops_log = args
        .ops_log
        .clone()
        .unwrap_or_else(|| args.ecds.with_file_name("operations.log"));
    if !args.dry_run {
        crate::opslog::check_writable(&ops_log, ops_key.as_ref(), &args.ops_key_env)?;
    }
    let now = crate::clock()?; // the operator's clock, for the version and the log
    let record = |outcome: &str, fields: Value| -> Result<bool, String> {
        let mut r = json!({
            "ts": crate::rfc3339_utc(now.as_secs()),
            "action": "policy_apply",
            "actor": args.actor,
            "operator": crate::opslog::operator(&args.actor),
            "source": args.source.clone().unwrap_or_else(|| args.policy.clone()),
            "outcome": outcome,
        });
        if let (Some(r), Value::Object(f)) = (r.as_object_mut(), fields) {
            r.extend(f);
        }
        crate::opslog::append(&ops_log, ops_key.as_ref(), &r)
    };
    let prepared = match prepare(args, env_pairs) {
        Ok(p) => p,
        Err(reason) if args.dry_run => return Err(format!("{reason} (dry run: nothing recorded)")),
        Err(reason) => {
            // Refused before Envoy saw it: recorded as rejected, with the reason (LOG-5).
            let sha = std::fs::read(&args.policy)
                .ok()
                .map(|b| crate::sha256_hex(&b));
            record(
                "rejected",
                json!({"rejected_by": "apisec", "reason": reason, "policy_file_sha256": sha}),
            )?;
            return Err(format!(
                "{reason}; recorded as rejected in {}",
                ops_log.display()
            ));
        }
    };
    let Prepared {
        policy_json,
        new,
        unchecked,
        ecds_text,
        mut ecds,
    } = prepared;
    // What changes, shown before anything is written (and, with --dry-run, instead).
    let applied = args.ecds.with_file_name("applied-policy.json");
    let old: Option<Value> = std::fs::read_to_string(&applied)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let items = changes(old.as_ref(), &new);
    print_changes(&items);
    if args.dry_run {
        println!(
            "{}: valid; dry run: nothing written or recorded",
            args.policy
        );
        return Ok(());
    }
    ecds.as_object_mut()
        .ok_or("the ECDS file is not a JSON object")?
        .insert("version_info".into(), json!(now.as_nanos().to_string()));
    let baseline = match &args.admin {
        Some(a) => Some(ecds_counters(a)?),
        None => None,
    };
    crate::write_atomically(&args.ecds, &ecds.to_string(), 0o600)?;
    let outcome = match (&args.admin, baseline) {
        (Some(a), Some((ok0, bad0))) => {
            #[allow(clippy::disallowed_methods)] // the operator's clock bounds the wait
            let deadline = Instant::now() + args.timeout;
            loop {
                let (ok, bad) = ecds_counters(a)?;
                if ok > ok0 {
                    break "applied";
                }
                if bad > bad0 {
                    break "rejected";
                }
                #[allow(clippy::disallowed_methods)]
                let late = Instant::now() > deadline;
                if late {
                    break "unconfirmed";
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        _ => "written",
    };

    // Envoy keeps the last good policy in memory; the file goes back to it as well, so that a
    // restart does not load what was refused.
    let restored = matches!(outcome, "rejected" | "unconfirmed");
    if restored {
        crate::write_atomically(&args.ecds, &ecds_text, 0o600)?;
    }
    let mut keys_added = 0;
    if outcome == "applied" || outcome == "written" {
        std::fs::write(&applied, &policy_json)
            .map_err(|e| format!("{}: {e}", applied.display()))?;
        // Every public key the gateway may accept S3 signatures under is kept for
        // re-verification (DATA-4), also after a later policy rotates it out.
        let keyring = args
            .keyring
            .clone()
            .unwrap_or_else(|| args.ecds.with_file_name("public-keys.jsonl"));
        keys_added = crate::keyring::remember(&keyring, &new, &crate::rfc3339_utc(now.as_secs()))?;
    }
    let envoy_reason = (outcome == "rejected")
        .then(|| args.envoy_log.as_deref().and_then(envoy_refusal))
        .flatten();
    let reason = match outcome {
        "rejected" => Some(envoy_reason.clone().unwrap_or_else(|| {
            "Envoy refused it; its log says why (apisec: policy refused: ...)".into()
        })),
        "unconfirmed" => Some("Envoy did not report the new version in time".to_string()),
        _ => None,
    };
    let sealed = record(
        outcome,
        json!({
            "rejected_by": (outcome == "rejected").then_some("envoy"),
            "reason": reason,
            "policy_sha256": crate::sha256_hex(policy_json.as_bytes()),
            "ecds_restored": restored,
            "keyring_added": keys_added,
            "secrets_not_checked_here": unchecked,
            "changes": items,
        }),
    )?;
    if !sealed {
        eprintln!(
            "warning: the operations log is not sealed: set {} (a base64 key of 32 bytes or more) to chain it (LOG-5)",
            args.ops_key_env
        );
    }
    let n = items.len();
    match outcome {
        "applied" => {
            println!(
                "{}: applied; Envoy loaded it; {n} change(s) logged to {}",
                args.policy,
                ops_log.display()
            );
            Ok(())
        }
        "written" => {
            println!(
                "{}: written to {}; {n} change(s) logged",
                args.policy,
                args.ecds.display()
            );
            Ok(())
        }
        "rejected" => {
            Err(format!(
            "{}: Envoy rejected it: {}; the last good policy stays, in Envoy and in the ECDS file",
            args.policy,
            envoy_reason.as_deref().unwrap_or("see its log (apisec: policy refused: ...)")
        ))
        }
        _ => Err(format!(
            "{}: Envoy did not report the new version within {} s",
            args.policy,
            args.timeout.as_secs()
        )),
    }
}

/// The change list, one line each, as the operator sees it before the policy is written.
fn print_changes(items: &[Value]) {
    if items.is_empty() {
        println!("no change to apis, apps, grants, lists or groups");
    }
    for c in items {
        let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("");
        let fields: Vec<&str> = c
            .get("fields")
            .and_then(Value::as_object)
            .map(|f| f.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let how = if fields.is_empty() {
            String::new()
        } else {
            format!(" ({})", fields.join(", "))
        };
        // every change item names its section (`changes` writes one into each)
        println!("  {:<8} {} {}{how}", s("change"), s("section"), s("id"));
    }
}

/// The last reason Envoy's log gives for refusing a policy (`apisec: policy refused: ...`).
fn envoy_refusal(log: &std::path::Path) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let text = String::from_utf8_lossy(&text);
    text.lines().rev().find_map(|l| {
        l.split_once("apisec: policy refused: ")
            .map(|(_, r)| r.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LOG-5: credentials are logged as issued, revoked or rotated, by id, never the key.
    #[test]
    fn credential_changes_name_issued_revoked_and_rotated_ids() {
        let app = |creds: Value| json!({"apps": [{"id": "a", "credentials": creds}]});
        let old = app(json!([
            {"id": "k1", "alg": "hmac-sha256", "secret_env": "S1"},
            {"id": "k2", "alg": "ecdsa-p256-sha256", "public_key_pem": "OLD"},
        ]));
        let new = app(json!([
            {"id": "k2", "alg": "ecdsa-p256-sha256", "public_key_pem": "NEW"},
            {"id": "k3", "alg": "hmac-sha256", "secret_env": "S3"},
        ]));
        let items = changes(Some(&old), &new);
        assert_eq!(
            items[0]["fields"]["credentials"],
            json!({"issued": ["k3"], "revoked": ["k1"], "rotated": ["k2"]})
        );
        let text = serde_json::to_string(&items).unwrap();
        assert!(
            !text.contains("NEW") && !text.contains("OLD"),
            "no key material: {text}"
        );
    }

    /// LOG-5: a change to any other section is logged whole, as an operator admitting a source
    /// to a new-sources rule (MON-3); an unchanged one is not.
    #[test]
    fn other_sections_are_logged_when_they_change() {
        let rule = |approved: Value| {
            json!({"anomalies": {"new_sources": [{"id": "n", "approved": approved, "action": "block"}]},
                   "gateway": {"mode": "enforce"}})
        };
        let items = changes(Some(&rule(json!([]))), &rule(json!(["203.0.113.7/32"])));
        assert_eq!(items.len(), 1, "{items:?}");
        assert_eq!(items[0]["section"], "anomalies");
        assert_eq!(
            items[0]["after"]["new_sources"][0]["approved"],
            json!(["203.0.113.7/32"])
        );
    }
}
