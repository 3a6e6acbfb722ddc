//! `apisec compliance POLICY [--deployment ENVOY.yaml] [--ecds FILE] [--format table|json]`:
//! the per-API report of core `compliance`, with the deployment facts read from the Envoy
//! bootstrap. Exit 1 when a required control is not met.

use apisec_core::compliance::{assess, AnnexA, Deployment, Report, Status, CONTROLS};
use serde_norway::Value;

/// Per API: what the standard requires at its level and whether the policy and the deployment
/// provide it (requirement IDs), and the Annex A classification, with its scope, the files'
/// SHA-256, the time and the tool version (the report for auditors). Exit 0 compliant, 1 a
/// requirement not met, 3 none unmet but some not judged (no --deployment): unknown is never
/// compliant.
#[derive(clap::Args)]
pub struct Args {
    /// The policy (YAML or JSON)
    policy: String,
    /// The Envoy configuration the gateway runs (e.g. envoy/gateway.yaml)
    #[arg(long, value_name = "ENVOY_YAML")]
    deployment: Option<String>,
    /// The ECDS file the deployment loads the filter from
    #[arg(long, value_name = "FILE")]
    ecds: Option<String>,
    #[arg(long, default_value = "table", value_parser = ["table", "json", "markdown", "csv"])]
    format: String,
}

/// Table A.1, built in (policies/annex-a/table-a1.yaml).
pub const ANNEX_A: &str = include_str!("../../policies/annex-a/table-a1.yaml");

pub fn annex_a() -> Result<AnnexA, String> {
    serde_norway::from_str(ANNEX_A).map_err(|e| format!("table A.1 data: {e}"))
}

fn walk<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    out.push(v);
    match v {
        Value::Mapping(m) => m.values().for_each(|x| walk(x, out)),
        Value::Sequence(s) => s.iter().for_each(|x| walk(x, out)),
        _ => {}
    }
}

fn get<'a>(v: &'a Value, k: &str) -> Option<&'a Value> {
    v.as_mapping().and_then(|m| m.get(Value::String(k.into())))
}

fn type_of(v: &Value) -> &str {
    get(v, "@type").and_then(Value::as_str).unwrap_or("")
}

/// The `failure_policy` of every Wasm filter config among `values` (None: not set).
fn failure_policies(values: &[&Value]) -> Vec<Option<String>> {
    let wasm = values
        .iter()
        .filter(|v| type_of(v).ends_with("filters.http.wasm.v3.Wasm"))
        .filter_map(|v| get(v, "config"))
        .map(|c| {
            get(c, "failure_policy")
                .and_then(Value::as_str)
                .map(str::to_string)
        });
    // The native build (Envoy's dynamic modules) has no failure policy to set: a configuration
    // the module refuses is rejected by Envoy, and no worker runs the chain without the module
    // (there is no VM to fail). It counts as failing closed when it is apisec's own library.
    let native = values
        .iter()
        .filter(|v| type_of(v).ends_with("filters.http.dynamic_modules.v3.DynamicModuleFilter"))
        .map(|v| {
            let lib = get(v, "dynamic_module_config")
                .and_then(|c| get(c, "name"))
                .and_then(Value::as_str);
            (lib == Some("apisec_native")).then(|| "FAIL_CLOSED".to_string())
        });
    wasm.chain(native).collect()
}

/// The deployment facts of an Envoy bootstrap (YAML or JSON).
pub fn read_deployment(path: &str, ecds: Option<&str>) -> Result<Deployment, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let doc: Value = serde_norway::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
    let mut all = Vec::new();
    walk(&doc, &mut all);
    let tls = all
        .iter()
        .filter(|v| type_of(v).ends_with(".DownstreamTlsContext"));
    let mut d = Deployment {
        source: path.to_string(),
        ..Default::default()
    };
    for ctx in tls {
        d.tls_listener = true;
        if get(ctx, "require_client_certificate").and_then(Value::as_bool) == Some(true) {
            d.mtls_listener = true;
        }
    }
    d.audit_log = all.iter().any(|v| {
        v.as_str()
            .is_some_and(|s| s.contains("%FILTER_STATE(wasm.apisec_audit"))
    });
    // Every cluster a route sends to must speak TLS.
    let targets: Vec<&str> = all
        .iter()
        .filter_map(|v| {
            get(v, "route")
                .and_then(|r| get(r, "cluster"))
                .and_then(Value::as_str)
        })
        .collect();
    let clusters = get(&doc, "static_resources")
        .and_then(|s| get(s, "clusters"))
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    d.backend_tls = !targets.is_empty()
        && targets.iter().all(|t| {
            clusters.iter().any(|c| {
                get(c, "name").and_then(Value::as_str) == Some(t)
                    && get(c, "transport_socket")
                        .and_then(|s| get(s, "typed_config"))
                        .is_some_and(|tc| type_of(tc).ends_with(".UpstreamTlsContext"))
            })
        });
    // The apisec filter: inline Wasm configs here, or the ECDS file they are delivered from.
    let mut policies = failure_policies(&all);
    let discovered = all.iter().any(|v| get(v, "config_discovery").is_some());
    if discovered {
        let file = ecds.map(str::to_string).or_else(|| {
            all.iter()
                .filter_map(|v| get(v, "path_config_source").and_then(|p| get(p, "path")))
                .filter_map(Value::as_str)
                .map(str::to_string)
                .next()
        });
        match file.and_then(|f| std::fs::read_to_string(&f).ok()) {
            Some(t) => {
                let e: Value = serde_norway::from_str(&t).map_err(|e| format!("ECDS file: {e}"))?;
                let mut inner = Vec::new();
                walk(&e, &mut inner);
                policies.extend(failure_policies(&inner));
            }
            None => policies.push(None), // cannot tell: not counted as fail-closed
        }
    }
    d.fail_closed =
        !policies.is_empty() && policies.iter().all(|p| p.as_deref() == Some("FAIL_CLOSED"));
    Ok(d)
}

fn print_table(r: &Report) {
    let heads = [
        "annex", "id", "tls", "grant", "appr", "integ", "nonrep", "replay", "2fa", "audit",
        "bk-tls", "enforced",
    ];
    let width = r.apis.iter().map(|a| a.id.len()).max().unwrap_or(3).max(3);
    println!(
        "industry: {}    deployment: {}",
        r.industry.as_deref().unwrap_or("(none)"),
        r.deployment
            .as_ref()
            .map_or("(not given)", |d| d.source.as_str())
    );
    print!("{:width$}  lvl ", "api");
    for h in heads {
        print!(" {h:>8}");
    }
    println!();
    for a in &r.apis {
        print!("{:width$}  {}  ", a.id, a.level);
        for c in &a.checks {
            print!(" {:>8}", c.status.cell());
        }
        println!();
    }
    println!();
    println!(
        "columns: {}",
        CONTROLS
            .iter()
            .map(|(c, ids)| format!("{c} ({ids})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("yes: provided  NO: required, not provided  -: not required at this level  should: recommended, not provided  ?: depends on the deployment (not given)  n/a: not classified by table A.1");
    for a in &r.apis {
        for c in a.checks.iter().filter(|c| c.status == Status::NotMet) {
            println!("NO  {} {} ({}): {}", a.id, c.control, c.ids, c.note);
        }
    }
    for c in &r.findings {
        let tag = if c.status == Status::NotMet {
            "NO "
        } else {
            "!  "
        };
        println!("{tag} policy {} ({}): {}", c.control, c.ids, c.note);
    }
    print_about(r, "");
    println!("{}", verdict_line(r));
}

/// The report's last line: its verdict, with the count behind it.
fn verdict_line(r: &Report) -> String {
    let unmet = unmet_count(r);
    match r.verdict {
        "compliant" => "compliant: every required control is provided".to_string(),
        "unverified" => format!(
            "NOT verified: {} required control(s) not judged (give --deployment); none found unmet",
            r.unverified
        ),
        _ => format!("NOT compliant: {unmet} required control(s) not provided"),
    }
}

fn print_about(r: &Report, prefix: &str) {
    let Some(a) = &r.about else { return };
    println!(
        "{prefix}scope: {} (other clauses of the standard are not judged here)",
        a.scope.join(" ")
    );
    println!(
        "{prefix}policy: {} sha256 {}",
        a.policy_file, a.policy_sha256
    );
    for (f, h) in &a.deployment_files {
        println!("{prefix}deployment file: {f} sha256 {h}");
    }
    println!(
        "{prefix}generated: {} by apisec {}",
        a.generated_at, a.tool_version
    );
}

fn unmet_count(r: &Report) -> usize {
    r.apis
        .iter()
        .flat_map(|a| &a.checks)
        .chain(&r.findings)
        .filter(|c| c.status == Status::NotMet)
        .count()
}

/// One row per API and control, for a spreadsheet: api, level, control, ids, status, note.
fn print_csv(r: &Report) {
    let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    println!("api,level,control,ids,status,note");
    for a in &r.apis {
        for c in &a.checks {
            println!(
                "{},{},{},{},{},{}",
                q(&a.id),
                a.level,
                c.control,
                q(c.ids),
                c.status.cell(),
                q(&c.note)
            );
        }
    }
    for c in &r.findings {
        println!(
            "{},,{},{},{},{}",
            q("(policy)"),
            c.control,
            q(c.ids),
            c.status.cell(),
            q(&c.note)
        );
    }
}

/// The report as Markdown: the header facts, one table of every API's cells, the findings.
fn print_markdown(r: &Report) {
    println!("# apisec compliance report\n");
    print_about(r, "- ");
    println!("- industry: {}", r.industry.as_deref().unwrap_or("(none)"));
    println!("- **verdict: {}**\n", verdict_line(r));
    print!("| api | level |");
    for (c, ids) in CONTROLS {
        print!(" {c} ({ids}) |");
    }
    println!();
    println!("|---|---|{}", "---|".repeat(CONTROLS.len()));
    for a in &r.apis {
        print!("| {} | {} |", a.id, a.level);
        for c in &a.checks {
            print!(" {} |", c.status.cell());
        }
        println!();
    }
    println!("\n| where | control | ids | status | note |\n|---|---|---|---|---|");
    for a in &r.apis {
        for c in a
            .checks
            .iter()
            .filter(|c| c.status != Status::Met && c.status != Status::NotRequired)
        {
            println!(
                "| {} | {} | {} | {} | {} |",
                a.id,
                c.control,
                c.ids,
                c.status.cell(),
                c.note.replace('|', "\\|")
            );
        }
    }
    for c in &r.findings {
        println!(
            "| policy | {} | {} | {} | {} |",
            c.control,
            c.ids,
            c.status.cell(),
            c.note.replace('|', "\\|")
        );
    }
}

/// Runs the command; Ok(the exit status): 0 compliant, 1 not, 3 not judged in full.
pub fn run(a: Args) -> Result<u8, String> {
    let Args {
        policy,
        deployment,
        ecds,
        format,
    } = a;
    let policy_file = policy.as_str();
    let raw = crate::load_policy(policy_file)?;
    let policy = raw
        .compile_for_review()
        .map_err(|e| format!("{policy_file}: {e}"))?;
    let d = deployment
        .as_deref()
        .map(|p| read_deployment(p, ecds.as_deref()))
        .transpose()?;
    let mut report = assess(&raw, &policy, &annex_a()?, d.as_ref());
    let hash = |f: &str| -> Result<String, String> {
        std::fs::read(f)
            .map(|b| crate::sha256_hex(&b))
            .map_err(|e| format!("{f}: {e}"))
    };
    let mut files = Vec::new();
    for f in deployment.iter().chain(ecds.iter()) {
        files.push((f.clone(), hash(f)?));
    }
    let now = crate::now()?; // the report's own time, for the auditor
    report.about = Some(apisec_core::compliance::About {
        scope: apisec_core::compliance::scope(),
        policy_file: policy_file.to_string(),
        policy_sha256: hash(policy_file)?,
        deployment_files: files,
        generated_at: crate::rfc3339_utc(now),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
    });
    match format.as_str() {
        "json" => println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        ),
        "table" => print_table(&report),
        "markdown" => print_markdown(&report),
        "csv" => print_csv(&report),
        f => {
            return Err(format!(
                "unknown --format {f} (table, json, markdown or csv)"
            ))
        }
    }
    Ok(match report.verdict {
        "compliant" => 0,
        "unverified" => 3,
        _ => 1,
    })
}
