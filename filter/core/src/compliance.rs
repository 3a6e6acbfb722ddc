//! The compliance report (`apisec compliance`): per API, what the standard requires at its level
//! (the controls table of `spec/REQUIREMENTS.md`) and whether the policy and the deployment
//! provide it, naming the requirement IDs, plus the Annex A classification (LVL-5). It is what
//! a firm hands its auditors: it states what the gateway enforces, says "no" where it does not
//! (report mode, no TLS to the backend, no sessions with a two-factor login), and "?" where it
//! cannot tell without the deployment; unknown is never compliant.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::inventory::{ApiState, SecurityLevel};
use crate::policy::{Api, Policy, RawApi, RawPolicy};

/// Table A.1 of the standard as data (`policies/annex-a/table-a1.yaml`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AnnexA {
    pub industries: BTreeMap<String, AnnexIndustry>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AnnexIndustry {
    pub name: String,
    pub rows: Vec<AnnexRow>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AnnexRow {
    pub key: String,
    pub level: SecurityLevel,
    pub category: String,
    pub category_en: String,
    pub modules: String,
}

/// What the Envoy configuration provides, as the CLI read it from the bootstrap YAML.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Deployment {
    pub source: String,
    /// A listener that terminates TLS.
    pub tls_listener: bool,
    /// A listener that requires and verifies client certificates.
    pub mtls_listener: bool,
    /// The access log carries the filter's audit record (`%FILTER_STATE(wasm.apisec_audit...)`).
    pub audit_log: bool,
    /// The backend cluster speaks TLS (an UpstreamTlsContext).
    pub backend_tls: bool,
    /// Every apisec filter entry is `failure_policy: FAIL_CLOSED`.
    pub fail_closed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Required at this level and provided.
    Met,
    /// Required and not provided: the report fails.
    NotMet,
    /// Not required at this level.
    NotRequired,
    /// Recommended (SHOULD) and not provided.
    ShouldNotProvided,
    /// Depends on the deployment, which was not given.
    Unchecked,
    /// No Annex A row names this API.
    Unclassified,
}

impl Status {
    pub fn cell(self) -> &'static str {
        match self {
            Status::Met => "yes",
            Status::NotMet => "NO",
            Status::NotRequired => "-",
            Status::ShouldNotProvided => "should",
            Status::Unchecked => "?",
            Status::Unclassified => "n/a",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Short column name.
    pub control: &'static str,
    pub ids: &'static str,
    pub status: Status,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiReport {
    pub id: String,
    pub level: &'static str,
    pub function: String,
    pub user_auth: bool,
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub industry: Option<String>,
    pub deployment: Option<Deployment>,
    pub apis: Vec<ApiReport>,
    /// Findings about the policy or deployment as a whole.
    pub findings: Vec<Check>,
    /// True when no required control is unmet and none is left unverified.
    pub compliant: bool,
    /// Required controls the report could not judge (`?`: the deployment was not given):
    /// unknown is never compliant (issue 21 item 11).
    pub unverified: usize,
    /// `compliant`, `not_compliant` (a required control unmet) or `unverified` (none unmet,
    /// some not judged).
    pub verdict: &'static str,
    /// What the report judges and about what: filled by the command that makes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub about: Option<About>,
}

/// What a report is about, for an auditor to tie it to the files and the time it was made.
#[derive(Debug, Clone, Serialize)]
pub struct About {
    /// The clauses this report judges (the columns and the policy-wide findings); others of
    /// the standard are not judged here.
    pub scope: Vec<String>,
    pub policy_file: String,
    pub policy_sha256: String,
    /// Each deployment file read, with its SHA-256.
    pub deployment_files: Vec<(String, String)>,
    pub generated_at: String,
    pub tool_version: String,
}

/// The clauses `assess` judges: every column's IDs and the policy-wide findings'.
pub fn scope() -> Vec<String> {
    let mut ids: Vec<String> = CONTROLS
        .iter()
        .flat_map(|(_, ids)| ids.split(' '))
        .chain(["LVL-1", "ID-2", "SES-1", "LOG-1"])
        .flat_map(|id| {
            // a range such as SES-1..4
            match id.split_once("..").and_then(|(head, to)| {
                let (name, from) = head.rsplit_once('-')?;
                Some((name, from.parse::<u32>().ok()?, to.parse::<u32>().ok()?))
            }) {
                Some((name, from, to)) => (from..=to).map(|n| format!("{name}-{n}")).collect(),
                None => vec![id.to_string()],
            }
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The columns, in order: control name and requirement IDs.
pub const CONTROLS: &[(&str, &str)] = &[
    ("annex_a", "LVL-5"),
    ("identity", "ID-1 ID-2 ID-3"),
    ("tls", "DATA-1"),
    ("grant", "PERM-2"),
    ("approval", "PERM-3"),
    ("integrity", "DATA-3"),
    ("non_repudiation", "DATA-4"),
    ("replay", "ATK-1"),
    ("user_2fa", "SES-1..4 ID-4"),
    ("audit", "LOG-1"),
    ("backend_tls", "DATA-2"),
    ("enforced", "LVL-1"),
    ("rate_limit", "RL-1 RL-2 OPS-4"),
    ("national", "DATA-5"),
    ("review", "OPS-1 LVL-4"),
];

fn check(i: usize, status: Status, note: impl Into<String>) -> Check {
    let (control, ids) = CONTROLS.get(i).copied().unwrap_or(("?", ""));
    Check {
        control,
        ids,
        status,
        note: note.into(),
    }
}

fn deployed(
    d: Option<&Deployment>,
    f: impl Fn(&Deployment) -> bool,
    yes: &str,
    no: &str,
) -> (Status, String) {
    match d {
        None => (Status::Unchecked, "no --deployment given".into()),
        Some(d) if f(d) => (Status::Met, yes.into()),
        Some(_) => (Status::NotMet, no.into()),
    }
}

/// Assesses `raw` (compiled as `policy`) against the standard, Annex A and the deployment.
pub fn assess(
    raw: &RawPolicy,
    policy: &Policy,
    annex: &AnnexA,
    deployment: Option<&Deployment>,
) -> Report {
    let industry = raw.industry.as_ref().map(|i| i.as_str().to_string());
    let table = industry.as_deref().and_then(|i| annex.industries.get(i));
    let mut apis = Vec::new();
    for (raw_api, api) in raw.apis.iter().zip(policy.apis()) {
        apis.push(ApiReport {
            id: api.id.clone(),
            level: api.level.as_str(),
            function: api.function.clone(),
            user_auth: raw_api.user_auth,
            checks: api_checks(raw, raw_api, policy, api, table, deployment),
        });
    }
    let findings = findings(raw, policy, deployment);
    let all = || apis.iter().flat_map(|a| &a.checks).chain(&findings);
    let unmet = all().any(|c| c.status == Status::NotMet);
    let unverified = all().filter(|c| c.status == Status::Unchecked).count();
    let verdict = match (unmet, unverified) {
        (true, _) => "not_compliant",
        (false, 0) => "compliant",
        (false, _) => "unverified",
    };
    Report {
        industry,
        deployment: deployment.cloned(),
        apis,
        findings,
        compliant: verdict == "compliant",
        unverified,
        verdict,
        about: None,
    }
}

/// One API's row of the report: each requirement of its level, met or not. Longer than most
/// functions: one check per column of the report, in the column order the report prints.
fn api_checks(
    raw: &RawPolicy,
    raw_api: &RawApi,
    policy: &Policy,
    api: &Api,
    table: Option<&AnnexIndustry>,
    deployment: Option<&Deployment>,
) -> Vec<Check> {
    use SecurityLevel::{S0, S1, S2, S3};
    let level = api.level;
    let grants: Vec<_> = policy
        .grants
        .iter()
        .filter(|g| g.apis.contains(api.index))
        .collect();
    let mut checks = Vec::new();

    checks.push(annex_check(raw_api, api, policy, table));
    // Identity and authentication, as the filter enforces them per level.
    checks.push(check(
        1,
        Status::Met,
        match level {
            S0 => "App_ID (x-app-id) of a registered app",
            S1 => "App_ID with an RFC 9421 signature (HMAC or P-256) or a bound client certificate",
            S2 | S3 => "App_ID with a P-256 signature or a bound client certificate (HMAC refused)",
        },
    ));
    // TLS: the filter refuses S1+ over plain HTTP; the deployment must offer a TLS listener.
    checks.push(if level == S0 {
        check(2, Status::NotRequired, "")
    } else {
        let (s, n) = deployed(
            deployment,
            |d| d.tls_listener,
            "refused without TLS (tls_required); TLS listener present",
            "no TLS listener in the deployment",
        );
        check(2, s, n)
    });
    // Grants.
    checks.push(if level == S0 {
        check(3, Status::NotRequired, "")
    } else {
        check(
            3,
            Status::Met,
            format!(
                "explicit grant required; {} grant(s): {}",
                grants.len(),
                grants
                    .iter()
                    .map(|g| g.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    });
    // Approval record for S3 grants (the policy is refused without one).
    checks.push(if level == S3 {
        let tickets: Vec<String> = raw
            .grants
            .iter()
            .filter(|g| grants.iter().any(|x| x.id == g.id))
            .filter_map(|g| {
                g.approval
                    .as_ref()
                    .map(|a| format!("{}: {} {}", g.id, a.ticket, a.date))
            })
            .collect();
        check(
            4,
            Status::Met,
            format!(
                "every S3 grant carries one (enforced at load): {}",
                tickets.join("; ")
            ),
        )
    } else {
        check(4, Status::NotRequired, "")
    });
    // Integrity of the request.
    checks.push(match level {
        S0 => check(5, Status::NotRequired, ""),
        S1 | S3 => check(5, Status::Met, "RFC 9421 signature over method, authority, path, query, App_ID and Content-Digest of the body"),
        S2 => check(5, Status::Met, "RFC 9421 signature, or a certificate-only call over mutual TLS (channel integrity, Idempotency-Key for writes)"),
    });
    checks.push(if level == S3 {
        check(
            6,
            Status::Met,
            "P-256 signature required; signature, input and base kept in the audit record",
        )
    } else {
        check(6, Status::NotRequired, "")
    });
    checks.push(if level == S0 {
        check(7, Status::ShouldNotProvided, "S0 carries no nonce")
    } else {
        check(7, Status::Met, "created within the skew window and nonce once per app (Idempotency-Key for certificate-only writes)")
    });
    checks.push(match (&policy.sessions, raw_api.user_auth && level >= S2) {
        (_, false) => check(8, Status::NotRequired, ""),
        (Some(s), true) if !s.login_apis.is_empty() => check(8, Status::Met, format!(
            "a live session bound to app, IP and MAC, whose user logged in with two factors as reported by {}",
            s.login_apis.iter().filter_map(|i| policy.apis().get(*i)).map(|a| a.id.as_str()).collect::<Vec<_>>().join(", "))),
        (Some(_), true) => check(8, Status::NotMet, "the policy has sessions but no login_apis: no user can log in"),
        (None, true) => check(8, Status::NotMet, "the policy has no sessions: x-user-id is asserted by the signing app, with no evidence of a two-factor login"),
    });
    let (s, n) = deployed(
        deployment,
        |d| d.audit_log,
        "one JSON record per request in the access log",
        "the access log does not carry the apisec audit record",
    );
    checks.push(check(9, s, n));
    checks.push(if level >= S2 {
        let (s, n) = deployed(
            deployment,
            |d| d.backend_tls,
            "TLS from the gateway to the backend",
            "plain HTTP from the gateway to the backend (use envoy/gateway-upstream-tls.yaml)",
        );
        check(10, s, n)
    } else {
        check(10, Status::NotRequired, "")
    });
    let report_mode =
        api.mode.is_report() || (policy.mode.is_report() && (level != S3 || policy.report_only_s3));
    checks.push(if report_mode {
        check(
            11,
            Status::NotMet,
            "report mode: refusals are recorded, not enforced",
        )
    } else {
        check(11, Status::Met, "enforced")
    });
    checks.push(rate_limit_check(policy, api));
    checks.push(national_check(policy, api, &grants));
    checks.push(review_check(raw_api, api));
    checks
}

/// DATA-5: whether the API takes the national algorithms only, and whether an app it is
/// granted to can call it so (an `hmac-sm3` or `sm2-sm3` credential the level allows).
fn national_check(policy: &Policy, api: &Api, grants: &[&crate::access::Grant]) -> Check {
    if !api.national {
        return check(
            13,
            Status::NotRequired,
            "international algorithms accepted (crypto: national not set)",
        );
    }
    let able: Vec<&str> = grants
        .iter()
        .filter_map(|g| policy.app(&g.app))
        .filter(|app| {
            app.credentials
                .iter()
                .any(|c| c.alg.national() && c.alg.allowed_for(api.level))
        })
        .map(|app| app.id.as_str())
        .collect();
    if able.is_empty() {
        return check(
            13,
            Status::NotMet,
            "national algorithms only, and no app granted this API has a national credential",
        );
    }
    check(
        13,
        Status::Met,
        format!(
            "national algorithms only (SM2/SM3, sm3 digests); callers with a national credential: {}; \
             TLCP (SM2/SM4 transport), where required, ends in a terminator in front of Envoy, \
             which cannot end it (docs/national.md)",
            able.join(", ")
        ),
    )
}

/// OPS-1, LVL-4: an API online (in effect) went online after a review, which its record
/// names; `policy apply` refuses a change of state or level without a new one.
fn review_check(raw_api: &RawApi, api: &Api) -> Check {
    match (&raw_api.review, api.state) {
        (Some(r), _) => check(
            14,
            Status::Met,
            format!("reviewed by {}, ticket {}, {}", r.by, r.ticket, r.date),
        ),
        (None, ApiState::Online) => check(
            14,
            Status::NotMet,
            "online without a review record (by, ticket, date)",
        ),
        (None, _) => check(14, Status::NotRequired, "not online"),
    }
}

/// RL-1, RL-2, OPS-4: the policy's rate limits that refuse calls of this API, with their
/// windows and what they count by.
fn rate_limit_check(policy: &Policy, api: &Api) -> Check {
    let mut refusing = Vec::new();
    let mut alerting = Vec::new();
    for r in policy.rate_limits.covering(api) {
        let windows: Vec<&str> = r.limits.iter().map(|(s, _)| s.name()).collect();
        let by: Vec<String> =
            r.by.iter()
                .map(|d| format!("{d:?}").to_lowercase())
                .collect();
        let by = if by.is_empty() {
            "all calls".to_string()
        } else {
            by.join("+")
        };
        let text = format!("{} ({} by {by})", r.id, windows.join(", "));
        if r.refuse {
            refusing.push(text);
        } else {
            alerting.push(text);
        }
    }
    match (refusing.is_empty(), alerting.is_empty()) {
        (false, _) => check(12, Status::Met, refusing.join("; ")),
        (true, false) => check(
            12,
            Status::NotMet,
            format!("only alerting rules: {}", alerting.join("; ")),
        ),
        (true, true) => check(
            12,
            Status::NotMet,
            "no rate limit of the policy selects this API",
        ),
    }
}

/// Annex A (LVL-5): the row of table A.1 the API implements, and whether its level is at
/// least the row's.
fn annex_check(
    raw_api: &RawApi,
    api: &Api,
    policy: &Policy,
    table: Option<&AnnexIndustry>,
) -> Check {
    let level = api.level;
    // Annex A (LVL-5): the row this API implements, and its level.
    let key = raw_api.annex_a.as_deref().unwrap_or(&api.function);
    let own_endpoint = policy
        .sessions
        .as_ref()
        .is_some_and(|s| s.create_api == api.index || s.logout_api == api.index);
    match table {
        _ if own_endpoint => check(
            0,
            Status::Met,
            "the gateway's own session endpoint (SES-1, SES-3), answered by the gateway: \
             not a business interface of table A.1",
        ),
        None => check(
            0,
            Status::Unclassified,
            "the policy names no industry (industry: securities | futures | funds)",
        ),
        Some(t) => match t.rows.iter().find(|r| r.key == key) {
            Some(r) if r.level > level => check(
                0,
                Status::NotMet,
                format!(
                    "table A.1 ({} {}) places '{}' ({}) at {}; the policy gives {}",
                    t.name,
                    r.category,
                    r.key,
                    r.modules,
                    r.level.as_str(),
                    level.as_str()
                ),
            ),
            Some(r) => check(
                0,
                Status::Met,
                format!(
                    "{} {} {} ({}): {}",
                    t.name,
                    r.level.as_str(),
                    r.category,
                    r.key,
                    r.modules
                ),
            ),
            None if raw_api.annex_a.is_some() => check(
                0,
                Status::NotMet,
                format!("annex_a '{key}' is not a row of table A.1 for {}", t.name),
            ),
            None => check(
                0,
                Status::Unclassified,
                format!("function '{key}' is not a row key of table A.1; set annex_a"),
            ),
        },
    }
}

/// What concerns the whole policy or deployment rather than one API: report mode, unbound
/// sessions, an unchained audit log, onboarding apps, a filter that fails open.
fn findings(raw: &RawPolicy, policy: &Policy, deployment: Option<&Deployment>) -> Vec<Check> {
    let mut findings = Vec::new();
    let finding = |control: &'static str, ids: &'static str, status: Status, note: String| Check {
        control,
        ids,
        status,
        note,
    };
    if policy.report_only_s3 {
        findings.push(finding(
            "report_only_s3",
            "LVL-1",
            Status::NotMet,
            "gateway.report_only_s3 is set: report mode may cover S3 APIs".into(),
        ));
    }
    if policy.mode.is_report() {
        findings.push(finding(
            "mode",
            "LVL-1",
            Status::NotMet,
            "gateway.mode is report: the whole policy is a dry run".into(),
        ));
    }
    for r in policy.routes.iter().filter(|r| r.mode.is_report()) {
        findings.push(finding(
            "route_mode",
            "LVL-1",
            Status::NotMet,
            format!("route '{}' is in report mode", r.name),
        ));
    }
    if let Some(s) = &raw.sessions {
        for app in &s.ip_unbound_apps {
            findings.push(finding(
                "session_ip_binding",
                "SES-1",
                Status::ShouldNotProvided,
                format!("sessions of app '{app}' are not bound to the client IP (ip_unbound_apps)"),
            ));
        }
    }
    if policy.audit.key_env.is_none() {
        findings.push(finding(
            "audit_chain",
            "LOG-1",
            Status::NotMet,
            "audit.chain_key_env is not set: the audit records are not chained, so a record \
             can be changed, deleted or reordered without trace"
                .into(),
        ));
    }
    for a in raw.apps.iter().filter(|a| a.onboarding) {
        findings.push(finding("onboarding", "ID-2", Status::ShouldNotProvided, format!("app '{}' is in onboarding: a refused signature's response shows the signature base", a.id)));
    }
    if let Some(d) = deployment {
        if !d.fail_closed {
            findings.push(finding(
                "fail_closed",
                "LVL-1",
                Status::NotMet,
                format!(
                    "{}: an apisec filter is not failure_policy: FAIL_CLOSED",
                    d.source
                ),
            ));
        }
    }
    findings
}
