//! The `cluster` state backend (ATK-1, PERM-4, PERM-5, MON-6 across replicas): every gateway
//! replica runs its requests' state batches on one Redis, reached through Envoy's own HTTP
//! callout to a webdis bridge (unmodified Envoy, no patched host ABI). One batch is one round
//! trip: a Lua script that Redis runs atomically, so two replicas can never both accept one
//! nonce or both spend the last use of a grant.
//!
//! This module owns the settings (`state:` in the policy), the script, the request the host
//! sends and the reading of the answer; the host only dispatches bytes and hands back what came
//! back. Anything but the exact answer the script gives (a timeout, a refused connection, a
//! Redis error, `LOADING`, a body that does not parse) is `state_unavailable`: fail closed.
//!
//! Keys (all under `key_prefix`): `horizon` (requests created at or before it are refused: the
//! store's epoch, moved on when it lost its data or a wider skew window came in), `skew` (the
//! widest window any replica used), `nonce:<hash>`, `grant:<id>`, `count:<subject>`,
//! `ban:<subject>`, and the anomaly counters `vol:`, `src:`, `kf:`. Nonces, counters and bans
//! expire by Redis TTL; grant uses do not.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::apps::SecretSource;
use crate::error::{ConfigError, Deny, DenyReason};
use crate::sessions::Session;
pub use crate::state::script::prepare;
use crate::state::script::{self, script, script_sha, script_words, word, Words};
pub use crate::state::Params;
use crate::state::{self, Answer, Batch, Op};

/// `state:` in the policy.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawState {
    /// `local` (Envoy shared data of this gateway; the default) or `cluster`.
    #[serde(default)]
    pub backend: Backend,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<RawCluster>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    #[default]
    Local,
    Cluster,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// The Envoy cluster that reaches the webdis bridge in front of Redis.
    pub envoy_cluster: String,
    /// `:authority` of the callouts (default: the cluster name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// How long a request waits for the store before it is refused `state_unavailable`.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Prefix of every key (several gateways or environments can share one Redis).
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// Environment variable holding `user:password` for webdis's `http_basic_auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_env: Option<String>,
    /// Nonces one app may record per `nonce_lifetime_seconds` (what it can hold live in the
    /// store): no partner can fill the shared store for the others (ATK-1, MON-5).
    #[serde(default = "default_app_share")]
    pub app_share: u64,
}

fn default_app_share() -> u64 {
    1_000_000
}

fn default_timeout_ms() -> u64 {
    500
}
fn default_prefix() -> String {
    "apisec:".to_string()
}

/// The validated cluster settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub envoy_cluster: String,
    pub authority: String,
    pub timeout_ms: u64,
    pub key_prefix: String,
    pub app_share: u64,
    /// `Basic …` for the callouts, from `credentials_env`.
    authorization: Option<String>,
}

/// Where state lives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StateBackend {
    #[default]
    Local,
    Cluster(ClusterSettings),
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
}

impl RawState {
    /// Validates the section; `secrets` is None where they cannot be read (the CLI without
    /// the gateway's environment), and then the credentials are only named.
    pub fn compile(&self, secrets: Option<&dyn SecretSource>) -> Result<StateBackend, ConfigError> {
        match (self.backend, &self.cluster) {
            (Backend::Local, None) => Ok(StateBackend::Local),
            (Backend::Local, Some(_)) => Err(ConfigError::new(
                "state.cluster",
                "only with backend: cluster",
            )),
            (Backend::Cluster, None) => Err(ConfigError::new(
                "state.cluster",
                "backend: cluster needs the cluster section (envoy_cluster, ...)",
            )),
            (Backend::Cluster, Some(c)) => {
                if !valid_name(&c.envoy_cluster) {
                    return Err(ConfigError::new(
                        "state.cluster.envoy_cluster",
                        "1 to 100 of A-Z a-z 0-9 . _ - :",
                    ));
                }
                let authority = c
                    .authority
                    .clone()
                    .unwrap_or_else(|| c.envoy_cluster.clone());
                if !valid_name(&authority) {
                    return Err(ConfigError::new(
                        "state.cluster.authority",
                        "1 to 100 of A-Z a-z 0-9 . _ - :",
                    ));
                }
                if !(10..=10_000).contains(&c.timeout_ms) {
                    return Err(ConfigError::new(
                        "state.cluster.timeout_ms",
                        "must be between 10 and 10000",
                    ));
                }
                if !valid_name(&c.key_prefix) || c.key_prefix.len() > 64 {
                    return Err(ConfigError::new(
                        "state.cluster.key_prefix",
                        "1 to 64 of A-Z a-z 0-9 . _ - :",
                    ));
                }
                if !(1..=1_000_000_000).contains(&c.app_share) {
                    return Err(ConfigError::new(
                        "state.cluster.app_share",
                        "must be between 1 and 1000000000",
                    ));
                }
                let authorization = match (&c.credentials_env, secrets) {
                    (None, _) | (Some(_), None) => None,
                    (Some(var), Some(s)) => {
                        let v = s.get(var).ok_or_else(|| {
                            ConfigError::new(
                                "state.cluster.credentials_env",
                                format!("environment variable {var} is not set"),
                            )
                        })?;
                        if !v.contains(':') {
                            return Err(ConfigError::new(
                                "state.cluster.credentials_env",
                                format!("{var} must hold user:password"),
                            ));
                        }
                        Some(format!(
                            "Basic {}",
                            base64::engine::general_purpose::STANDARD.encode(v.trim())
                        ))
                    }
                };
                Ok(StateBackend::Cluster(ClusterSettings {
                    envoy_cluster: c.envoy_cluster.clone(),
                    authority,
                    timeout_ms: c.timeout_ms,
                    key_prefix: c.key_prefix.clone(),
                    app_share: c.app_share,
                    authorization,
                }))
            }
        }
    }
}

/// One HTTP callout for the host to dispatch, as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub cluster: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

/// The script's command and the words every run starts with.
fn command(p: &Params<'_>, settings: &ClusterSettings, now: u64, full: bool) -> Vec<u8> {
    let mut body = Vec::with_capacity(if full { script().len() * 2 } else { 256 });
    if full {
        body.extend_from_slice(b"EVAL");
        body.extend_from_slice(script_words());
    } else {
        body.extend_from_slice(b"EVALSHA");
        word(&mut body, script_sha());
    }
    word(&mut body, "0");
    word(&mut body, &settings.key_prefix);
    word(&mut body, &now.to_string());
    word(&mut body, &p.skew.to_string());
    word(&mut body, &p.lifetime.to_string());
    body
}

/// The callout that carries `body` to the store.
fn call(settings: &ClusterSettings, body: Vec<u8>) -> Call {
    let mut headers = vec![
        (":method", "POST".to_string()),
        (":path", "/".to_string()),
        (":authority", settings.authority.clone()),
        ("content-type", "text/plain".to_string()),
    ];
    if let Some(a) = &settings.authorization {
        headers.push(("authorization", a.clone()));
    }
    Call {
        cluster: settings.envoy_cluster.clone(),
        headers,
        body,
        timeout_ms: settings.timeout_ms,
    }
}

/// What the cluster store holds, for the gauges (MON-4, ATK-1): bans in force on the policy's
/// apps and on sources, the nonces the apps recorded in their shares, and the fullest share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounts {
    pub apps_banned: u64,
    pub sources_banned: u64,
    pub nonces: u64,
    pub fullest_share: u64,
}

/// The callout that reads the gauges (read only; one worker per replica, every
/// `metrics::GAUGE_SECONDS`).
pub fn encode_gauges<'a>(
    p: &Params<'_>,
    settings: &ClusterSettings,
    apps: impl Iterator<Item = &'a str>,
    now: u64,
    full: bool,
) -> Call {
    let mut body = command(p, settings, now, full);
    let apps: Vec<&str> = apps.collect();
    let mut words = Words::op(&mut body, &script::GAUGES).put("n", &apps.len().to_string());
    for app in apps {
        let lift = p
            .bans
            .map_or(0, |b| b.lifted_at(crate::state::bans::Subject::App(app)));
        words = words.extra(app).extra(&lift.to_string());
    }
    words.end();
    call(settings, body)
}

/// The gauges' answer: the counts, the store lacking the script, or why there are none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GaugeAnswer {
    Counts(StoreCounts),
    LoadScript,
    Failed(String),
}

pub fn decode_gauges(full: bool, status: impl CallStatus, body: &[u8]) -> GaugeAnswer {
    let reply = match reply(status, body) {
        Ok(r) => r,
        Err(e) => return GaugeAnswer::Failed(e),
    };
    let text = |i: usize| reply.get(i).and_then(|v| v.as_str());
    let number = |i: usize| text(i).and_then(|t| t.parse::<u64>().ok());
    match (reply.first(), text(0)) {
        (Some(serde_json::Value::Bool(false)), _)
            if !full && text(1).is_some_and(|m| m.starts_with("NOSCRIPT")) =>
        {
            GaugeAnswer::LoadScript
        }
        (_, Some("gauges")) => match (number(1), number(2), number(3), number(4)) {
            (Some(a), Some(s), Some(n), Some(f)) => GaugeAnswer::Counts(StoreCounts {
                apps_banned: a,
                sources_banned: s,
                nonces: n,
                fullest_share: f,
            }),
            _ => GaugeAnswer::Failed("state store answer has an unexpected shape".into()),
        },
        _ => GaugeAnswer::Failed("state store answer has an unexpected shape".into()),
    }
}

/// The callout that runs `batch` (`full`: the script's text, for a Redis that does not hold it
/// yet; else its SHA-1).
pub fn encode(p: &Params<'_>, settings: &ClusterSettings, batch: &Batch, full: bool) -> Call {
    let mut body = command(p, settings, batch.now, full);
    for op in &batch.ops {
        // each operation belongs to one stored concern, which writes its words
        let written = state::bans::encode(&mut body, p, op)
            || state::nonces::encode(&mut body, settings.app_share, op)
            || state::grants::encode(&mut body, op)
            || state::sessions::encode(&mut body, p, op)
            || state::anomalies::encode(&mut body, p, op)
            || state::rate_limits::encode(&mut body, op);
        if !written {
            word(&mut body, script::MISMATCH);
        }
    }
    call(settings, body)
}

/// What the store's answer means for the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Answer(Answer),
    /// Redis does not hold the script (it restarted): send the batch again with its text.
    LoadScript,
}

fn unavailable(detail: impl Into<String>) -> Decoded {
    Decoded::Answer(Answer::refused(Deny::new(
        DenyReason::StateUnavailable,
        detail.into(),
    )))
}

/// Reads the callout's answer: `status` is its `:status` (None: the host gave none, as for a
/// callout that failed or timed out), `body` what came with it.
/// `full`: the batch went with the script's text, so a store that still lacks it is broken.
pub fn decode(batch: &Batch, full: bool, status: impl CallStatus, body: &[u8]) -> Decoded {
    match read(batch, status, body) {
        Decoded::LoadScript if full => {
            Decoded::Answer(failed("the store lacks the script it was sent"))
        }
        d => d,
    }
}

/// The callout's `:status`, as a glue has it: at hand (`Option<&str>`), or asked of the host
/// only when needed (a closure; in the Wasm build each answer the host copies into the VM
/// costs an allocation call into it).
pub trait CallStatus {
    fn status(self) -> Option<String>;
}

impl CallStatus for Option<&str> {
    fn status(self) -> Option<String> {
        self.map(str::to_string)
    }
}

impl<F: FnOnce() -> Option<String>> CallStatus for F {
    fn status(self) -> Option<String> {
        self()
    }
}

/// The script's reply, from the callout's body (webdis: `{"EVALSHA": [...]}`, the script's
/// words in the array) and, when the body is not that, its status for the reason. A body that
/// is the script's reply is taken whatever the status says: the script ran and answered (webdis
/// sends its JSON only with 200; its errors, Envoy's own answers for the store and a callout
/// that failed carry no such body), so the status is asked only to say why there is none.
fn reply(status: impl CallStatus, body: &[u8]) -> Result<Vec<serde_json::Value>, String> {
    let object = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut map)) => {
            let one = map.len() == 1;
            if let Some(serde_json::Value::Array(r)) =
                map.remove("EVALSHA").or_else(|| map.remove("EVAL"))
            {
                if one {
                    return Ok(r);
                }
            }
            true
        }
        _ => false,
    };
    let status = status.status();
    if status.as_deref() != Some("200") {
        return Err(format!(
            "state store answered {} ({} bytes)",
            status.as_deref().unwrap_or("nothing"),
            body.len()
        ));
    }
    Err(match object {
        true => "state store answer has an unexpected shape".into(),
        false => "state store answer is not a JSON object".into(),
    })
}

fn read(batch: &Batch, status: impl CallStatus, body: &[u8]) -> Decoded {
    let reply = match reply(status, body) {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    let reply = &reply;
    let text = |i: usize| reply.get(i).and_then(|v| v.as_str());
    match (reply.first(), text(0)) {
        (Some(serde_json::Value::Bool(false)), _) => {
            let msg = text(1).unwrap_or("");
            if msg.starts_with("NOSCRIPT") {
                return Decoded::LoadScript;
            }
            let first = msg.split_whitespace().next().unwrap_or("error");
            unavailable(format!("state store error: {first}"))
        }
        (_, Some("ok")) => match found(batch, reply) {
            Some(answer) => Decoded::Answer(answer),
            None => unavailable("state store answer has an unexpected shape"),
        },
        (_, Some(first)) => {
            // a refusal, in the words of the concern whose operation refused
            let refused = state::bans::refusal(first, &text)
                .or_else(|| state::nonces::refusal(batch, first, &text))
                .or_else(|| state::grants::refusal(batch, first, &text))
                .or_else(|| state::sessions::refusal(first, &text))
                .or_else(|| state::anomalies::refusal(batch, first, &text))
                .or_else(|| state::rate_limits::refusal(batch, first, &text));
            match refused {
                Some(answer) => Decoded::Answer(answer),
                None => unavailable("state store answer has an unexpected shape"),
            }
        }
        _ => unavailable("state store answer has an unexpected shape"),
    }
}

/// What a batch that passed found (`ok` and its findings), as an answer; None for a shape the
/// script does not give.
fn found(batch: &Batch, reply: &[serde_json::Value]) -> Option<Answer> {
    let mut answer = Answer::default();
    let mut words = reply.iter().skip(1).map(|v| v.as_str());
    while let Some(w) = words.next() {
        match w? {
            "ban" => {
                let subject = words.next()??;
                let secs: u64 = words.next()??.parse().ok()?;
                let rule = words.next()??;
                answer.ban_started = Some(crate::state::bans::started(
                    &state::bans::describe(subject),
                    secs,
                    Some(rule).filter(|r| !r.is_empty()),
                ));
            }
            "anomaly" => {
                let watch = batch.watch(words.next()??)?;
                answer.anomalies.push(watch.anomaly());
            }
            "session" => {
                let mut f = || words.next().flatten().map(str::to_string);
                let (app, ip, mac, user) = (f()?, f()?, f()?, f()?);
                let factors = f()?.parse().ok()?;
                let (created, last_seen) = (f()?.parse().ok()?, f()?.parse().ok()?);
                let tag = batch.ops.iter().find_map(|op| match op {
                    Op::SessionUse(c) | Op::SessionRead(c) | Op::SessionEnd(c) => {
                        Some(state::sessions::key(&c.id))
                    }
                    _ => None,
                })?;
                answer.session = Some(Box::new(Session {
                    tag,
                    app,
                    ip,
                    mac,
                    user: Some(user).filter(|u| !u.is_empty()),
                    factors,
                    created,
                    last_seen,
                    seq: 0,
                }));
            }
            "rate_alert" => {
                let (rule, pos) = (words.next()??, words.next()??);
                state::rate_limits::alert(batch, &mut answer, rule, pos)?;
            }
            "evicted" => answer.evicted = true,
            "nothing" => answer.nothing_to_end = true,
            _ => return None,
        }
    }
    Some(answer)
}

/// Why an answer is not the store's "ok", in words for the log.
pub fn why_not(decoded: Decoded) -> String {
    match decoded {
        Decoded::Answer(a) => match a.refused {
            Some(d) => d.detail,
            None => "ok".into(),
        },
        Decoded::LoadScript => "the store lacks the script".into(),
    }
}

/// What a callout that could not be made or got no answer means: the store is unavailable.
pub fn failed(detail: &str) -> Answer {
    Answer::refused(Deny::new(
        DenyReason::StateUnavailable,
        format!("state store: {detail}"),
    ))
}

#[cfg(test)]
mod tests;
