//! The policy document: raw serde structs (`deny_unknown_fields`) converted once into a
//! validated `Policy`. It owns the gateway settings (skew, replay layout, size and work bounds,
//! override handling) and composes the concepts that own their schema and compilation: the
//! inventory (`inventory`), apps and credentials (`apps`), grants and lists (`access`), bans
//! (`bans`). The request path never re-checks config.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::access::{self, Grant, RawGrant};
use crate::anomaly::{Anomalies, RawAnomalies};
use crate::apps;
pub use crate::apps::{
    Algorithm, App, CertBinding, Credential, KeyMaterial, RawApp, RawCertificate, RawCredential,
    SecretSource,
};
use crate::audit_chain::{AuditSettings, RawAudit};
use crate::cluster::{self, RawState, StateBackend};
use crate::error::ConfigError;
use crate::inventory::{self, resolve_apis, valid_id, ApiGroup, ApiSet, RawApiGroup};
pub use crate::inventory::{Access, Api, RawApi, SecurityLevel, ServiceObject};
use crate::lists::{self, List, RawList};
pub use crate::message::Method;
pub use crate::mode::Mode;
use crate::rate_limits::{self, RateLimits, RawRateLimit, RawRateStore};
use crate::routes::{self, RawRoute, Route};
use crate::sessions::{RawSessions, Sessions};
use crate::state::bans::{BanSettings, RawBans};
pub use crate::state::nonces::local::ReplaySettings;
use crate::timeutil;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub version: u32,
    #[serde(default)]
    pub gateway: RawGateway,
    pub apis: Vec<RawApi>,
    #[serde(default)]
    pub apps: Vec<RawApp>,
    /// Named sets of APIs: list targets and group-wide lifecycle switches.
    #[serde(default)]
    pub api_groups: Vec<RawApiGroup>,
    /// Explicit permissions for S1-S3 APIs (PERM-2).
    #[serde(default)]
    pub grants: Vec<RawGrant>,
    /// Black and white lists (BWL-1, BWL-2).
    #[serde(default)]
    pub lists: Vec<RawList>,
    /// End users who closed API access for their account (PERM-6).
    #[serde(default)]
    pub opted_out_users: Vec<String>,
    /// Automatic bans after repeated refusals (PERM-4, RL-3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bans: Option<RawBans>,
    /// Where security state lives: this gateway (`local`) or a store every replica shares.
    #[serde(default)]
    pub state: RawState,
    /// The firm's industry, for the Annex A classification (`apisec compliance`, LVL-5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub industry: Option<Industry>,
    /// Per-route narrowing by Envoy route name (routes.rs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RawRoute>,
    /// Sessions (SES-1 … SES-4): the endpoint the gateway answers, timeouts, store bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<RawSessions>,
    /// The audit chain (LOG-1): its key's environment variable, the checkpoint period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<RawAudit>,
    /// Anomaly rules (MON-3, MON-4, MON-9): working hours, usual source ranges, bulk pulls, new
    /// sources, signature failures under a valid key id; alert or block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomalies: Option<RawAnomalies>,
    /// Rate limits and quotas (RL-1, RL-2, RL-4, OPS-4): windows per second, minute, hour and
    /// day, calendar quotas, by app, API, function, user and source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RawRateLimit>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct RawGateway {
    /// How far `created` may be from the gateway clock, either way.
    pub clock_skew_seconds: u64,
    /// How long an accepted nonce is remembered; at least twice the skew.
    pub nonce_lifetime_seconds: u64,
    pub replay: RawReplay,
    /// The local backend's rate-limit counters: keys and counters per key.
    pub rate_limit_store: RawRateStore,
    pub max_body_bytes: u64,
    pub max_signature_header_bytes: u64,
    /// Components every signature must cover, beyond the built-in minimum.
    pub required_components: Vec<String>,
    /// Zone for grant time windows when a grant names none.
    pub default_timezone: String,
    /// Covered components one signature may list, and the largest signature base the gateway
    /// builds: the work one request can cost is bounded.
    pub max_covered_components: u32,
    pub max_signature_base_bytes: u64,
    /// How long a body may take to arrive after its headers; the checks that depend on time
    /// and policy are made again when it is complete.
    pub max_body_seconds: u64,
    /// Request bodies this worker holds for verification at once, in bytes; past it new
    /// bodies are refused (`gateway_busy`) rather than held.
    pub max_held_body_bytes: u64,
    /// Routing overrides (`X-HTTP-Method-Override`, `X-Original-URL`, ...): `strip` them
    /// before the upstream, or `refuse` requests that carry one.
    pub override_headers: OverrideMode,
    /// `report`: every refusal is counted and audited as "would refuse", not enforced (a dry
    /// run of the whole policy). S3 APIs stay enforced unless `report_only_s3`.
    #[serde(skip_serializing_if = "Mode::is_enforce")]
    pub mode: Mode,
    /// Allows report mode (policy, API or route) to cover S3 APIs. Shown by `apisec compliance`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub report_only_s3: bool,
    /// Also export the unlabelled per-code counters `apisec.denied.<code>` and
    /// `apisec.reported.<code>` (one series per refusal code, from before the labelled
    /// `apisec_requests_total`). Off by default (MON-2).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub per_code_counters: bool,
    /// The verified identity the gateway sends upstream (`x-apisec-<name>`): what the backend
    /// and Envoy's rate limiter need. Each header costs every request a host call and Envoy's
    /// work to carry it. A client-sent `x-apisec-*` header is removed whatever this says.
    pub identity_headers: Vec<IdentityHeader>,
    /// Levels whose every API takes the national algorithms only (DATA-5), as an API's own
    /// `crypto: national` does.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub national_levels: Vec<SecurityLevel>,
}

/// A verified fact the gateway may send upstream, as `x-apisec-<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum IdentityHeader {
    App,
    Api,
    Level,
    Function,
    User,
}

impl IdentityHeader {
    pub const ALL: [IdentityHeader; 5] = [
        IdentityHeader::App,
        IdentityHeader::Api,
        IdentityHeader::Level,
        IdentityHeader::Function,
        IdentityHeader::User,
    ];

    pub fn header(self) -> &'static str {
        match self {
            IdentityHeader::App => "x-apisec-app",
            IdentityHeader::Api => "x-apisec-api",
            IdentityHeader::Level => "x-apisec-level",
            IdentityHeader::Function => "x-apisec-function",
            IdentityHeader::User => "x-apisec-user",
        }
    }
}

/// The industries of table A.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Industry {
    Securities,
    Futures,
    Funds,
}

impl Industry {
    pub fn as_str(self) -> &'static str {
        match self {
            Industry::Securities => "securities",
            Industry::Futures => "futures",
            Industry::Funds => "funds",
        }
    }
}

/// What the gateway does with a client-sent routing override header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum OverrideMode {
    Strip,
    Refuse,
}

impl Default for RawGateway {
    fn default() -> Self {
        Self {
            clock_skew_seconds: 300,
            nonce_lifetime_seconds: 900,
            replay: RawReplay::default(),
            rate_limit_store: RawRateStore::default(),
            max_body_bytes: 1024 * 1024,
            max_signature_header_bytes: 8192,
            required_components: Vec::new(),
            default_timezone: "Asia/Shanghai".to_string(),
            max_covered_components: 24,
            max_signature_base_bytes: 16 * 1024,
            max_body_seconds: 30,
            max_held_body_bytes: 64 * 1024 * 1024,
            override_headers: OverrideMode::Strip,
            mode: Mode::Enforce,
            report_only_s3: false,
            per_code_counters: false,
            identity_headers: IdentityHeader::ALL.to_vec(),
            national_levels: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct RawReplay {
    /// Number of shared-data keys the replay cache uses.
    pub slots: u32,
    /// Live nonces each slot can hold. Capacity = slots * entries_per_slot.
    pub entries_per_slot: u32,
    /// Live nonces one app may hold in one slot (its share of the store); default half of
    /// `entries_per_slot`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_entries_per_slot: Option<u32>,
}

impl Default for RawReplay {
    fn default() -> Self {
        Self {
            slots: 4096,
            entries_per_slot: 64,
            app_entries_per_slot: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Policy {
    /// Set by the host: which load of the policy this is (a body that completes under a newer
    /// generation is decided again).
    pub generation: u64,
    pub clock_skew_seconds: u64,
    pub replay: ReplaySettings,
    pub max_body_bytes: u64,
    pub max_signature_header_bytes: u64,
    pub required_components: Vec<String>,
    pub max_covered_components: usize,
    pub max_signature_base_bytes: usize,
    pub max_body_seconds: u64,
    pub max_held_body_bytes: u64,
    pub override_headers: OverrideMode,
    pub per_code_counters: bool,
    pub identity_headers: Vec<IdentityHeader>,
    apis: Vec<Api>,
    apps: HashMap<String, App>,
    pub grants: Vec<Grant>,
    pub lists: Vec<List>,
    pub opted_out_users: HashSet<String>,
    pub bans: Option<BanSettings>,
    pub state: StateBackend,
    pub mode: Mode,
    pub report_only_s3: bool,
    pub routes: Vec<Route>,
    pub sessions: Option<Sessions>,
    pub audit: AuditSettings,
    pub anomalies: Anomalies,
    pub rate_limits: RateLimits,
}

/// The minimum every signature covers (docs/design.md "Wire protocol").
pub const BASE_REQUIRED_COMPONENTS: &[&str] =
    &["@method", "@authority", "@path", "@query", "x-app-id"];

const DERIVED: &[&str] = &[
    "@method",
    "@target-uri",
    "@authority",
    "@scheme",
    "@request-target",
    "@path",
    "@query",
];

fn valid_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl RawPolicy {
    /// Parses the JSON text Envoy hands the filter. Unknown fields are errors.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|e| ConfigError::new("", format!("policy JSON: {e}")))
    }

    /// The environment variables the policy reads its secrets from (HMAC App_Secrets, the
    /// cluster store's credentials), once each and sorted: what Envoy must hand the VM.
    pub fn secret_env_names(&self) -> Vec<String> {
        let apps = self
            .apps
            .iter()
            .flat_map(|a| a.credentials.iter().filter_map(|c| c.secret_env.clone()));
        let store = self
            .state
            .cluster
            .as_ref()
            .and_then(|c| c.credentials_env.clone());
        let audit = self.audit.as_ref().and_then(|a| a.chain_key_env.clone());
        apps.chain(store)
            .chain(audit)
            .collect::<std::collections::BTreeSet<String>>()
            .into_iter()
            .collect()
    }

    /// Checks everything that does not need secrets; the CLI runs exactly this.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.compile(None).map(|_| ())
    }

    /// The compiled policy without its secrets (HMAC keys left out): for review tools such as
    /// the compliance report, never for deciding requests.
    pub fn compile_for_review(&self) -> Result<Policy, ConfigError> {
        self.compile(None)
    }

    /// Validates and binds secrets: the filter's `on_configure` runs exactly this.
    pub fn into_policy(self, secrets: &dyn SecretSource) -> Result<Policy, ConfigError> {
        self.compile(Some(secrets))
    }

    fn compile(&self, secrets: Option<&dyn SecretSource>) -> Result<Policy, ConfigError> {
        if self.version != 1 {
            return Err(ConfigError::new("version", "only version 1 is supported"));
        }
        let g = &self.gateway;
        let (app_entries, required) = self.compile_gateway()?;
        let (mut apis, groups) = inventory::compile(&self.apis, &self.api_groups)?;
        if self.gateway.national_levels.contains(&SecurityLevel::S0) {
            return Err(ConfigError::new(
                "gateway.national_levels",
                "S0 APIs are not signed: S1, S2 or S3",
            ));
        }
        for a in &mut apis {
            a.national |= self.gateway.national_levels.contains(&a.level);
        }
        let apps = apps::compile(&self.apps, secrets)?;
        let grants = self.compile_grants(&apis, &groups, &apps)?;
        let lists = self.compile_lists(&apis, &groups)?;
        let bans = self.bans.as_ref().map(RawBans::compile).transpose()?;
        let state = self.state.compile(secrets)?;
        let routes = routes::compile(&self.routes, &apis, &groups)?;
        self.check_report_scope(&apis, &routes)?;
        let sessions = self
            .sessions
            .as_ref()
            .map(|s| s.compile(&apis))
            .transpose()?;
        if let (None, Some(a)) = (&sessions, apis.iter().find(|a| a.session_required)) {
            return Err(ConfigError::new(
                "sessions",
                format!(
                    "API '{}' requires a session and the policy has no sessions section",
                    a.id
                ),
            ));
        }

        let anomalies = self
            .anomalies
            .as_ref()
            .map(|a| {
                a.compile(
                    |id| apis.iter().any(|x| x.id == id),
                    |id| apps.contains_key(id),
                    bans.as_ref(),
                )
            })
            .transpose()?
            .unwrap_or_default();

        let rate_limits = rate_limits::compile(
            &self.rate_limits,
            &g.rate_limit_store,
            &apis,
            &groups,
            &|id| apps.contains_key(id),
        )?;

        Ok(Policy {
            anomalies,
            rate_limits,
            mode: g.mode,
            report_only_s3: g.report_only_s3,
            routes,
            sessions,
            audit: self
                .audit
                .as_ref()
                .map(|a| a.compile(secrets))
                .transpose()?
                .unwrap_or_default(),
            generation: 0,
            grants,
            lists,
            opted_out_users: self
                .opted_out_users
                .iter()
                .map(|u| lists::normal_user(u))
                .collect(),
            bans,
            state,
            clock_skew_seconds: g.clock_skew_seconds,
            replay: ReplaySettings {
                slots: g.replay.slots,
                entries_per_slot: g.replay.entries_per_slot,
                app_entries_per_slot: app_entries,
                lifetime_seconds: g.nonce_lifetime_seconds,
            },
            max_covered_components: g.max_covered_components as usize,
            max_signature_base_bytes: g.max_signature_base_bytes as usize,
            max_body_seconds: g.max_body_seconds,
            max_held_body_bytes: g.max_held_body_bytes,
            override_headers: g.override_headers,
            per_code_counters: g.per_code_counters,
            identity_headers: g.identity_headers.clone(),
            max_body_bytes: g.max_body_bytes,
            max_signature_header_bytes: g.max_signature_header_bytes,
            required_components: required,
            apis,
            apps,
        })
    }

    /// Report mode never covers an S3 API by accident: an S3 API or a route serving one set to
    /// `report` needs `gateway.report_only_s3: true`.
    fn check_report_scope(&self, apis: &[Api], routes: &[Route]) -> Result<(), ConfigError> {
        if self.gateway.report_only_s3 {
            return Ok(());
        }
        if let Some((i, a)) = apis
            .iter()
            .enumerate()
            .find(|(_, a)| a.mode.is_report() && a.level == SecurityLevel::S3)
        {
            return Err(ConfigError::new(
                format!("apis[{i}].mode"),
                format!(
                    "'{}' is S3: report mode needs gateway.report_only_s3: true",
                    a.id
                ),
            ));
        }
        for (i, r) in routes.iter().enumerate() {
            let s3 = apis
                .iter()
                .find(|a| a.level == SecurityLevel::S3 && r.serves(a));
            if let (true, Some(a)) = (r.mode.is_report(), s3) {
                return Err(ConfigError::new(
                    format!("routes[{i}].mode"),
                    format!(
                        "route '{}' serves S3 API '{}': report mode needs gateway.report_only_s3: true",
                        r.name, a.id
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Gateway settings (ATK-1 replay and skew, size and work bounds, required components,
    /// the default zone): one app's replay share and the components every signature covers.
    fn compile_gateway(&self) -> Result<(u32, Vec<String>), ConfigError> {
        let g = &self.gateway;
        if !(1..=3600).contains(&g.clock_skew_seconds) {
            return Err(ConfigError::new(
                "gateway.clock_skew_seconds",
                "must be between 1 and 3600",
            ));
        }
        if g.nonce_lifetime_seconds < 2 * g.clock_skew_seconds || g.nonce_lifetime_seconds > 86400 {
            return Err(ConfigError::new(
                "gateway.nonce_lifetime_seconds",
                "must be at least twice clock_skew_seconds (a request is acceptable for that long) and at most 86400",
            ));
        }
        for (i, h) in g.identity_headers.iter().enumerate() {
            if g.identity_headers.iter().take(i).any(|x| x == h) {
                return Err(ConfigError::new(
                    "gateway.identity_headers",
                    format!("{h:?} is named twice"),
                ));
            }
        }
        if !(1..=65536).contains(&g.replay.slots) {
            return Err(ConfigError::new(
                "gateway.replay.slots",
                "must be between 1 and 65536",
            ));
        }
        if !(1..=1024).contains(&g.replay.entries_per_slot) {
            return Err(ConfigError::new(
                "gateway.replay.entries_per_slot",
                "must be between 1 and 1024",
            ));
        }
        let app_entries = g
            .replay
            .app_entries_per_slot
            .unwrap_or((g.replay.entries_per_slot / 2).max(1));
        if app_entries == 0 || app_entries > g.replay.entries_per_slot {
            return Err(ConfigError::new(
                "gateway.replay.app_entries_per_slot",
                "must be between 1 and entries_per_slot",
            ));
        }
        if !(4..=256).contains(&g.max_covered_components) {
            return Err(ConfigError::new(
                "gateway.max_covered_components",
                "must be between 4 and 256",
            ));
        }
        if !(1024..=1024 * 1024).contains(&g.max_signature_base_bytes) {
            return Err(ConfigError::new(
                "gateway.max_signature_base_bytes",
                "must be between 1024 and 1048576",
            ));
        }
        if !(1..=600).contains(&g.max_body_seconds) {
            return Err(ConfigError::new(
                "gateway.max_body_seconds",
                "must be between 1 and 600",
            ));
        }
        if g.max_held_body_bytes < g.max_body_bytes || g.max_held_body_bytes > 1 << 32 {
            return Err(ConfigError::new(
                "gateway.max_held_body_bytes",
                "must be at least max_body_bytes and at most 4 GiB",
            ));
        }
        if !(1..=16 * 1024 * 1024).contains(&g.max_body_bytes) {
            return Err(ConfigError::new(
                "gateway.max_body_bytes",
                "must be between 1 and 16777216",
            ));
        }
        if !(256..=65536).contains(&g.max_signature_header_bytes) {
            return Err(ConfigError::new(
                "gateway.max_signature_header_bytes",
                "must be between 256 and 65536",
            ));
        }
        let mut required: Vec<String> = BASE_REQUIRED_COMPONENTS
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (i, c) in g.required_components.iter().enumerate() {
            let field = format!("gateway.required_components[{i}]");
            let ok = if c.starts_with('@') {
                DERIVED.contains(&c.as_str())
            } else {
                valid_header_name(c)
            };
            if !ok {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "'{c}' is not a lowercase header name or a supported derived component"
                    ),
                ));
            }
            if !required.contains(c) {
                required.push(c.clone());
            }
        }

        if timeutil::zone_offset(&g.default_timezone).is_none() {
            return Err(ConfigError::new(
                "gateway.default_timezone",
                format!("'{}' is not supported: use a zone without daylight saving or an offset like +08:00", g.default_timezone),
            ));
        }
        Ok((app_entries, required))
    }

    /// Grants (PERM-1..PERM-6, OPS-3), each naming a registered app.
    fn compile_grants(
        &self,
        apis: &[Api],
        groups: &[ApiGroup],
        apps: &HashMap<String, App>,
    ) -> Result<Vec<Grant>, ConfigError> {
        let g = &self.gateway;
        let admitted = self.admissions(apis, groups)?;
        let mut grants: Vec<Grant> = Vec::new();
        for (i, raw) in self.grants.iter().enumerate() {
            let field = format!("grants[{i}]");
            if !valid_id(&raw.id) || grants.iter().any(|x| x.id == raw.id) {
                return Err(ConfigError::new(
                    format!("{field}.id"),
                    format!("missing, invalid or duplicate grant id '{}'", raw.id),
                ));
            }
            if !apps.contains_key(&raw.app) {
                return Err(ConfigError::new(
                    format!("{field}.app"),
                    format!("no app '{}'", raw.app),
                ));
            }
            let grant = access::compile_grant(&field, raw, apis, groups, &g.default_timezone)?;
            // OPS-7: an admitted app's grants stay within the APIs it was admitted for
            if let Some((afield, admitted)) = admitted.get(grant.app.as_str()) {
                let outside = apis
                    .iter()
                    .enumerate()
                    .find(|(j, _)| grant.apis.contains(*j) && !admitted.contains(*j));
                if let Some((_, api)) = outside {
                    return Err(ConfigError::new(
                        format!("{field}.apis"),
                        format!(
                            "grant '{}' covers '{}', which app '{}' was not admitted for ({afield}; OPS-7)",
                            grant.id, api.id, grant.app
                        ),
                    ));
                }
            }
            grants.push(grant);
        }
        Ok(grants)
    }

    /// OPS-7: each onboarding record is complete, and the APIs it admits resolve; by app.
    fn admissions(
        &self,
        apis: &[Api],
        groups: &[ApiGroup],
    ) -> Result<HashMap<&str, (String, ApiSet)>, ConfigError> {
        let mut out = HashMap::new();
        for (i, app) in self.apps.iter().enumerate() {
            let Some(adm) = &app.admission else {
                continue;
            };
            let field = format!("apps[{i}].admission");
            for (name, value) in [
                ("by", &adm.by),
                ("ticket", &adm.ticket),
                ("scenario", &adm.scenario),
            ] {
                if value.trim().is_empty() {
                    return Err(ConfigError::new(
                        format!("{field}.{name}"),
                        "is required (OPS-7)",
                    ));
                }
            }
            if timeutil::parse_date(&adm.date).is_none() {
                return Err(ConfigError::new(
                    format!("{field}.date"),
                    "must be YYYY-MM-DD",
                ));
            }
            let set = resolve_apis(&format!("{field}.apis"), &adm.apis, apis, groups)?;
            out.insert(app.id.as_str(), (format!("{field}.apis"), set));
        }
        Ok(out)
    }

    /// Black and white lists (BWL-1, BWL-2).
    fn compile_lists(&self, apis: &[Api], groups: &[ApiGroup]) -> Result<Vec<List>, ConfigError> {
        let mut lists: Vec<List> = Vec::new();
        for (i, raw) in self.lists.iter().enumerate() {
            let field = format!("lists[{i}]");
            if !valid_id(&raw.id) || lists.iter().any(|x| x.id == raw.id) {
                return Err(ConfigError::new(
                    format!("{field}.id"),
                    format!("missing, invalid or duplicate list id '{}'", raw.id),
                ));
            }
            lists.push(lists::compile_list(&field, raw, apis, groups)?);
        }
        Ok(lists)
    }
}

impl Policy {
    pub fn from_json(text: &str, secrets: &dyn SecretSource) -> Result<Self, ConfigError> {
        RawPolicy::from_json(text)?.into_policy(secrets)
    }

    /// What of the policy the cluster store's operations need.
    pub fn cluster_params(&self) -> cluster::Params<'_> {
        cluster::Params {
            skew: self.clock_skew_seconds,
            lifetime: self.replay.lifetime_seconds,
            bans: self.bans.as_ref(),
            sessions: self.sessions.as_ref(),
        }
    }

    /// Finds the inventoried API for a method and a normalised path (without query).
    pub fn match_api(&self, method: Method, path: &str) -> Option<&Api> {
        let segments: Vec<&str> = match path.strip_prefix('/') {
            Some(rest) => rest.split('/').collect(),
            None => return None,
        };
        self.apis
            .iter()
            .filter(|a| a.method == method && a.matches(&segments))
            .max_by_key(|a| a.specificity())
    }

    pub fn app(&self, id: &str) -> Option<&App> {
        self.apps.get(id)
    }

    pub fn apis(&self) -> &[Api] {
        &self.apis
    }

    /// The registered app ids.
    pub fn app_ids(&self) -> impl Iterator<Item = &str> {
        self.apps.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests;
