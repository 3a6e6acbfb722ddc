//! `apisec compliance POLICY [--deployment ENVOY.yaml] [--ecds FILE] [--format table|json]`:
//! the per-API report of core `compliance`, with the deployment facts read from the Envoy
//! bootstrap. Exit 1 when a required control is not met.

use apisec_core::compliance::{assess, AnnexA, Deployment, Report, Status, CONTROLS};
use serde_yaml::Value;

pub const USAGE: &str = "  apisec compliance POLICY [--deployment ENVOY_YAML] [--ecds FILE] [--format table|json]
                                          per API: what the standard requires at its level and whether
                                          the policy and the deployment provide it (requirement IDs),
                                          and the Annex A classification; exit 1 if a requirement is
                                          not met (the report for auditors)";

/// Table A.1, built in (policies/annex-a/table-a1.yaml).
pub const ANNEX_A: &str = include_str!("../../policies/annex-a/table-a1.yaml");

pub fn annex_a() -> Result<AnnexA, String> {
    serde_yaml::from_str(ANNEX_A).map_err(|e| format!("table A.1 data: {e}"))
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
    values
        .iter()
        .filter(|v| type_of(v).ends_with("filters.http.wasm.v3.Wasm"))
        .filter_map(|v| get(v, "config"))
        .map(|c| {
            get(c, "failure_policy")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect()
}

/// The deployment facts of an Envoy bootstrap (YAML or JSON).
pub fn read_deployment(path: &str, ecds: Option<&str>) -> Result<Deployment, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let doc: Value = serde_yaml::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
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
                let e: Value = serde_yaml::from_str(&t).map_err(|e| format!("ECDS file: {e}"))?;
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
    let mut unmet = 0;
    for a in &r.apis {
        for c in a.checks.iter().filter(|c| c.status == Status::NotMet) {
            unmet += 1;
            println!("NO  {} {} ({}): {}", a.id, c.control, c.ids, c.note);
        }
    }
    for c in &r.findings {
        let tag = if c.status == Status::NotMet {
            "NO "
        } else {
            "!  "
        };
        if c.status == Status::NotMet {
            unmet += 1;
        }
        println!("{tag} policy {} ({}): {}", c.control, c.ids, c.note);
    }
    println!(
        "{}",
        if r.compliant {
            "compliant: every required control is provided".to_string()
        } else {
            format!("NOT compliant: {unmet} required control(s) not provided")
        }
    );
}

pub fn run(args: &[&str]) -> Result<bool, String> {
    let [policy_file, rest @ ..] = args else {
        return Err(format!("usage:\n{USAGE}"));
    };
    let (mut deployment, mut ecds, mut format) = (None, None, "table".to_string());
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match *flag {
            "--deployment" => deployment = Some(value.to_string()),
            "--ecds" => ecds = Some(value.to_string()),
            "--format" => format = value.to_string(),
            f => return Err(format!("unknown option {f}")),
        }
    }
    let raw = crate::load_policy(policy_file)?;
    let policy = raw
        .compile_for_review()
        .map_err(|e| format!("{policy_file}: {e}"))?;
    let d = deployment
        .as_deref()
        .map(|p| read_deployment(p, ecds.as_deref()))
        .transpose()?;
    let report = assess(&raw, &policy, &annex_a()?, d.as_ref());
    match format.as_str() {
        "json" => println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        ),
        "table" => print_table(&report),
        f => return Err(format!("unknown --format {f} (table or json)")),
    }
    Ok(report.compliant)
}
