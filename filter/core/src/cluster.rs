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
use crate::state::script::{self, script, script_sha, word, Words};
pub use crate::state::Params;
use crate::state::{self, Answer, Batch, Op};

/// `state:` in the policy.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    /// `local` (Envoy shared data of this gateway; the default) or `cluster`.
    #[serde(default)]
    pub backend: Backend,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<RawCluster>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    #[default]
    Local,
    Cluster,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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
        word(&mut body, script());
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
            .map_or(0, |b| b.lifted_at(crate::bans::Subject::App(app)));
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

pub fn decode_gauges(full: bool, status: Option<&str>, body: &[u8]) -> GaugeAnswer {
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
            || state::anomalies::encode(&mut body, p, op);
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
pub fn decode(batch: &Batch, full: bool, status: Option<&str>, body: &[u8]) -> Decoded {
    match read(batch, status, body) {
        Decoded::LoadScript if full => {
            Decoded::Answer(failed("the store lacks the script it was sent"))
        }
        d => d,
    }
}

/// The script's reply, from the callout's status and body (webdis: `{"EVALSHA": [...]}`).
fn reply(status: Option<&str>, body: &[u8]) -> Result<Vec<serde_json::Value>, String> {
    if status != Some("200") {
        return Err(format!(
            "state store answered {} ({} bytes)",
            status.unwrap_or("nothing"),
            body.len()
        ));
    }
    let Ok(serde_json::Value::Object(mut map)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return Err("state store answer is not a JSON object".into());
    };
    let one = map.len() == 1;
    match map.remove("EVALSHA").or_else(|| map.remove("EVAL")) {
        Some(serde_json::Value::Array(r)) if one => Ok(r),
        _ => Err("state store answer has an unexpected shape".into()),
    }
}

fn read(batch: &Batch, status: Option<&str>, body: &[u8]) -> Decoded {
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
                .or_else(|| state::anomalies::refusal(batch, first, &text));
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
                answer.ban_started = Some(crate::bans::started(
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
                    Op::SessionUse(c) | Op::SessionRead(c) => Some(state::sessions::key(&c.id)),
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
                }));
            }
            "evicted" => answer.evicted = true,
            "nothing" => answer.nothing_to_end = true,
            _ => return None,
        }
    }
    Some(answer)
}

/// What a callout that could not be made or got no answer means: the store is unavailable.
pub fn failed(detail: &str) -> Answer {
    Answer::refused(Deny::new(
        DenyReason::StateUnavailable,
        format!("state store: {detail}"),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)] // test code
mod tests {
    use super::*;
    use crate::sessions::{Misuse, Scope, Sessions};
    use crate::state::sessions::key as session_key;
    use crate::state::{BanSubject, SessionCall, Watch};

    #[test]
    fn words_cannot_break_the_command() {
        let mut out = Vec::new();
        word(&mut out, "a+b/c.json d%");
        assert_eq!(out, b"/a%2Bb%2Fc%2Ejson%20d%25");
    }

    #[test]
    fn the_script_is_named_by_its_sha1() {
        assert_eq!(script_sha().len(), 40);
    }

    const P: Params<'static> = Params {
        skew: 300,
        lifetime: 600,
        bans: None,
        sessions: None,
    };

    fn nonce_batch(idempotency: bool) -> Batch {
        Batch {
            ops: vec![Op::Nonce {
                app: "a".into(),
                nonce: "n/1+.json".into(),
                created: 1000,
                idempotency,
                record: true,
            }],
            now: 1001,
        }
    }

    fn reason(d: Decoded) -> Option<DenyReason> {
        match d {
            Decoded::Answer(a) => a.refused.map(|d| d.reason),
            Decoded::LoadScript => panic!("unexpected"),
        }
    }

    /// Fail closed: only the script's own answers mean anything; everything else (Envoy's
    /// synthesized 503/504, webdis's 403, a Redis error or LOADING, garbage) is unavailable.
    #[test]
    fn anything_but_the_scripts_answer_is_state_unavailable() {
        let b = nonce_batch(false);
        let un = Some(DenyReason::StateUnavailable);
        assert_eq!(reason(decode(&b, false, None, b"")), un);
        assert_eq!(
            reason(decode(&b, false, Some("504"), b"upstream request timeout")),
            un
        );
        assert_eq!(reason(decode(&b, false, Some("403"), b"")), un);
        assert_eq!(reason(decode(&b, false, Some("200"), b"not json")), un);
        assert_eq!(
            reason(decode(
                &b,
                false,
                Some("200"),
                br#"{"EVALSHA":[false,"LOADING Redis is loading"]}"#
            )),
            un
        );
        assert_eq!(
            reason(decode(&b, false, Some("200"), br#"{"EVALSHA":["maybe"]}"#)),
            un
        );
        assert_eq!(
            reason(decode(
                &b,
                false,
                Some("200"),
                br#"{"EVALSHA":["ok"],"x":1}"#
            )),
            un
        );
        assert_eq!(
            reason(decode(&b, false, Some("200"), br#"{"GET":["ok"]}"#)),
            un
        );
        assert_eq!(
            reason(decode(&b, false, Some("200"), br#"{"EVALSHA":["ok"]}"#)),
            None
        );
        assert_eq!(
            decode(
                &b,
                false,
                Some("200"),
                br#"{"EVALSHA":[false,"NOSCRIPT No matching script."]}"#
            ),
            Decoded::LoadScript
        );
    }

    #[test]
    fn the_scripts_refusals_keep_their_codes() {
        let ok = Some("200");
        let b = nonce_batch(false);
        assert_eq!(
            reason(decode(&b, false, ok, br#"{"EVALSHA":["replayed"]}"#)),
            Some(DenyReason::NonceReplayed)
        );
        assert_eq!(
            reason(decode(
                &nonce_batch(true),
                false,
                ok,
                br#"{"EVAL":["replayed"]}"#
            )),
            Some(DenyReason::IdempotencyKeyReplayed)
        );
        assert_eq!(
            reason(decode(&b, false, ok, br#"{"EVALSHA":["too_old","999"]}"#)),
            Some(DenyReason::CreatedTooOld)
        );
        assert_eq!(
            reason(decode(&b, false, ok, br#"{"EVALSHA":["full","3"]}"#)),
            Some(DenyReason::ReplayStoreFull)
        );
        assert_eq!(
            reason(decode(&b, false, ok, br#"{"EVALSHA":["exhausted","1"]}"#)),
            Some(DenyReason::GrantExhausted)
        );
        assert_eq!(
            reason(decode(
                &b,
                false,
                ok,
                br#"{"EVALSHA":["banned","ip/192.0.2.1","2000"]}"#
            )),
            Some(DenyReason::Banned)
        );
        match decode(
            &b,
            false,
            ok,
            br#"{"EVALSHA":["ok","ban","app/a","600",""]}"#,
        ) {
            Decoded::Answer(a) => {
                assert_eq!(a.ban_started.as_deref(), Some("app a banned for 600 s"))
            }
            other => panic!("{other:?}"),
        }
    }

    /// The gauges' read (MON-4, ATK-1): the apps with their lift times, and the answer read
    /// back; anything else is no gauges, never made-up ones.
    #[test]
    fn gauges_are_asked_and_read() {
        let call = encode_gauges(&P, &settings(), ["a", "b c"].into_iter(), 1000, false);
        let text = String::from_utf8(call.body).unwrap();
        assert!(text.ends_with("/GA/2/a/0/b%20c/0"), "{text}");
        assert_eq!(
            decode_gauges(
                false,
                Some("200"),
                br#"{"EVALSHA":["gauges","1","2","30","20"]}"#
            ),
            GaugeAnswer::Counts(StoreCounts {
                apps_banned: 1,
                sources_banned: 2,
                nonces: 30,
                fullest_share: 20
            })
        );
        assert_eq!(
            decode_gauges(
                false,
                Some("200"),
                br#"{"EVALSHA":[false,"NOSCRIPT No matching script"]}"#
            ),
            GaugeAnswer::LoadScript
        );
        for (status, body) in [
            (
                Some("200"),
                &br#"{"EVALSHA":["gauges","1","x","30","20"]}"#[..],
            ),
            (Some("200"), br#"{"EVALSHA":["ok"]}"#),
            (Some("503"), b""),
            (None, b""),
        ] {
            assert!(matches!(
                decode_gauges(false, status, body),
                GaugeAnswer::Failed(_)
            ));
        }
        assert!(matches!(
            decode_gauges(true, Some("200"), br#"{"EVAL":[false,"NOSCRIPT x"]}"#),
            GaugeAnswer::Failed(_)
        ));
    }

    fn watched(rule: &str, kind: &'static str, block: bool) -> Watch {
        Watch {
            rule: rule.into(),
            app: "a".into(),
            kind,
            action: if block {
                crate::anomaly::RuleAction::Block
            } else {
                crate::anomaly::RuleAction::Alert
            },
        }
    }

    /// The counted anomaly rules' words, and what their answers mean (MON-3, MON-4).
    #[test]
    fn anomaly_operations_and_their_answers() {
        use crate::anomaly::{BULK_PULL, NEW_SOURCE, SIGNATURE_FAILURES};
        let b = Batch {
            ops: vec![
                Op::Calls {
                    watch: watched("bulk", BULK_PULL, true),
                    bucket: 7,
                    window: 60,
                    max_calls: 10,
                    max_bytes: u64::MAX,
                },
                Op::Source {
                    watch: watched("src", NEW_SOURCE, false),
                    source: "2001:db8::/64".into(),
                    learning: false,
                    max: 64,
                    forget: 86400,
                },
                Op::KeyFailure {
                    watch: watched("imp", SIGNATURE_FAILURES, true),
                    keyid: "k 1".into(),
                    bucket: 3,
                    window: 300,
                    threshold: 5,
                    ban: Some((BanSubject::Ip("192.0.2.9".parse().unwrap()), 900)),
                },
            ],
            now: 1000,
        };
        let call = encode(&P, &settings(), &b, false);
        let text = String::from_utf8(call.body).unwrap();
        assert!(
            text.ends_with(
                "/V/bulk/a/7/60/10/18446744073709551615/1/NS/src/a/2001%3Adb8%3A%3A%2F64/0/64/86400/0\
                 /KF/imp/a/k%201/3/300/5/ip%2F192%2E0%2E2%2E9/900/0"
            ),
            "{text}"
        );
        let ok = Some("200");
        match decode(&b, false, ok, br#"{"EVALSHA":["ok","anomaly","src","anomaly","imp","ban","ip/192.0.2.9","900","imp"]}"#) {
            Decoded::Answer(a) => {
                assert_eq!(a.anomalies.len(), 2);
                assert_eq!((a.anomalies[0].kind, a.anomalies[0].action), (NEW_SOURCE, "alert"));
                assert_eq!((a.anomalies[1].kind, a.anomalies[1].action), (SIGNATURE_FAILURES, "block"));
                assert_eq!(
                    a.ban_started.as_deref(),
                    Some("source 192.0.2.9 banned for 900 s (rule imp)")
                );
            }
            other => panic!("{other:?}"),
        }
        match decode(&b, false, ok, br#"{"EVALSHA":["blocked","bulk","10","0"]}"#) {
            Decoded::Answer(a) => {
                let d = a.refused.unwrap();
                assert_eq!(d.reason, DenyReason::AnomalyBlocked);
                assert!(d.detail.contains("made 10 calls"), "{}", d.detail);
                assert_eq!(a.anomalies[0].rule, "bulk");
            }
            other => panic!("{other:?}"),
        }
        // a rule the batch did not ask about is not the script's answer: fail closed
        for body in [
            &br#"{"EVALSHA":["blocked","other"]}"#[..],
            br#"{"EVALSHA":["ok","anomaly","other"]}"#,
            br#"{"EVALSHA":["ok","ban","ip/192.0.2.9","x",""]}"#,
        ] {
            assert_eq!(
                reason(decode(&b, false, ok, body)),
                Some(DenyReason::StateUnavailable)
            );
        }
    }

    fn sessions() -> Sessions {
        Sessions {
            create_api: 0,
            logout_api: 1,
            idle_timeout_seconds: 60,
            max_lifetime_seconds: 600,
            slots: 4,
            entries_per_slot: 8,
            ip_unbound_apps: ["mobile".to_string()].into_iter().collect(),
            operator_route: None,
            operators: Vec::new(),
            login_apis: Vec::new(),
            login_header: "x-apisec-login".into(),
            max_per_app: 2,
            establish_per_minute: 5,
            establish_per_source_per_minute: 3,
        }
    }

    fn session_call(id: &str, app: &str) -> SessionCall {
        SessionCall {
            id: id.into(),
            app: app.into(),
            ip: "192.0.2.1".into(),
            mac: "aa:bb:cc:dd:ee:ff".into(),
        }
    }

    fn settings() -> ClusterSettings {
        let settings = RawState {
            backend: Backend::Cluster,
            cluster: Some(RawCluster {
                envoy_cluster: "apisec_state".into(),
                authority: None,
                timeout_ms: 500,
                key_prefix: "apisec:".into(),
                credentials_env: None,
                app_share: 1000,
            }),
        }
        .compile(None)
        .unwrap();
        let StateBackend::Cluster(c) = settings else {
            panic!()
        };
        c
    }

    fn words_of(p: &Params<'_>, ops: Vec<Op>) -> Vec<String> {
        let c = settings();
        let body = String::from_utf8(encode(p, &c, &Batch { ops, now: 1000 }, false).body).unwrap();
        body.split('/').skip(7).map(str::to_string).collect()
    }

    /// Each session operation has the words the script reads, the session ID never among them
    /// (its hash is the key), and the IP binding relaxed only for the apps the policy names.
    #[test]
    fn session_operations_carry_a_hash_of_the_id_and_the_policys_numbers() {
        let s = sessions();
        let p = Params {
            sessions: Some(&s),
            ..P
        };
        let key = session_key("secret-id");
        assert_eq!(key.len(), 32);
        let w = words_of(&p, vec![Op::SessionUse(session_call("secret-id", "app"))]);
        assert_eq!(
            w,
            [
                "S",
                &key,
                "app",
                "192%2E0%2E2%2E1",
                "aa%3Abb%3Acc%3Add%3Aee%3Aff",
                "0",
                "60",
                "600",
                "1"
            ]
        );
        let w = words_of(
            &p,
            vec![Op::SessionRead(session_call("secret-id", "mobile"))],
        );
        assert_eq!((w[5].as_str(), w[8].as_str()), ("1", "0"));
        let w = words_of(
            &p,
            vec![Op::SessionLogin {
                call: session_call("secret-id", "app"),
                user: "u-1".into(),
                factors: 2,
            }],
        );
        assert_eq!(
            (w[0].as_str(), w.len(), w[8].as_str(), w[9].as_str()),
            ("SL", 10, "u-1", "2")
        );
        assert_eq!(
            words_of(&p, vec![Op::SessionEnd(session_call("secret-id", "app"))]).len(),
            8
        );
        let created = Session {
            tag: String::new(),
            app: "app".into(),
            ip: "192.0.2.1".into(),
            mac: "aa:bb:cc:dd:ee:ff".into(),
            user: None,
            factors: 0,
            created: 1000,
            last_seen: 1000,
        };
        let w = words_of(
            &p,
            vec![Op::SessionCreate {
                id: "secret-id".into(),
                session: created,
            }],
        );
        assert_eq!(w.len(), 12);
        assert_eq!(
            (w[0].as_str(), w[1].as_str(), w[5].as_str(), w[8].as_str()),
            ("SC", key.as_str(), "", "32")
        );
        assert_eq!(&w[9..], ["2", "5", "3"]);
        let w = words_of(
            &p,
            vec![Op::SessionRevoke(Scope::Session("secret-id".into()))],
        );
        assert_eq!(w, ["SR", &key]);
        let w = words_of(&p, vec![Op::SessionRevoke(Scope::User("u-1".into()))]);
        assert_eq!(w, ["SA", "user", "u-1", "600"]);
        let w = words_of(&p, vec![Op::SessionRevoke(Scope::App("app".into()))]);
        assert_eq!(w, ["SA", "app", "app", "600"]);
        // Without sessions in the policy, a word the script refuses: the batch fails.
        let w = words_of(&P, vec![Op::SessionRevoke(Scope::App("app".into()))]);
        assert_eq!(w, [script::MISMATCH]);
    }

    #[test]
    fn session_answers_are_read_back() {
        let ok = Some("200");
        let b = Batch {
            ops: vec![Op::SessionUse(session_call("id", "app"))],
            now: 1000,
        };
        let body = br#"{"EVALSHA":["ok","session","app","192.0.2.1","aa:bb:cc:dd:ee:ff","u-1","2","990","1000"]}"#;
        match decode(&b, false, ok, body) {
            Decoded::Answer(a) => {
                let got = a.session.unwrap();
                assert_eq!(got.user.as_deref(), Some("u-1"));
                assert_eq!((got.factors, got.created, got.last_seen), (2, 990, 1000));
                assert_eq!(got.tag, session_key("id"));
                assert!(a.refused.is_none());
            }
            other => panic!("{other:?}"),
        }
        let anonymous = br#"{"EVALSHA":["ok","session","app","192.0.2.1","aa:bb:cc:dd:ee:ff","","0","990","1000"]}"#;
        match decode(&b, false, ok, anonymous) {
            Decoded::Answer(a) => assert_eq!(a.session.unwrap().user, None),
            other => panic!("{other:?}"),
        }
        match decode(&b, false, ok, br#"{"EVALSHA":["ok","evicted","nothing"]}"#) {
            Decoded::Answer(a) => assert!(a.evicted && a.nothing_to_end && a.refused.is_none()),
            other => panic!("{other:?}"),
        }
        // Each refusal keeps its code and the wording the local backend gives.
        for (body, misuse) in [
            (
                &br#"{"EVALSHA":["session","unknown"]}"#[..],
                Misuse::Unknown,
            ),
            (br#"{"EVALSHA":["session","lifetime"]}"#, Misuse::Lifetime),
            (br#"{"EVALSHA":["session","idle","75"]}"#, Misuse::Idle(75)),
            (br#"{"EVALSHA":["session","app"]}"#, Misuse::OtherApp),
            (br#"{"EVALSHA":["session","ip"]}"#, Misuse::OtherIp),
            (br#"{"EVALSHA":["session","mac"]}"#, Misuse::OtherMac),
            (
                br#"{"EVALSHA":["session","operator"]}"#,
                Misuse::EndedByOperator,
            ),
        ] {
            match decode(&b, false, ok, body) {
                Decoded::Answer(a) => assert_eq!(a.refused, Some(misuse.deny())),
                other => panic!("{other:?}"),
            }
        }
        // Fail closed on anything else: a short session, an unknown finding or refusal.
        for body in [
            &br#"{"EVALSHA":["ok","session","app","192.0.2.1"]}"#[..],
            br#"{"EVALSHA":["ok","session","app","192.0.2.1","m","","x","990","1000"]}"#,
            br#"{"EVALSHA":["ok","welcome"]}"#,
            br#"{"EVALSHA":["session","maybe"]}"#,
            br#"{"EVALSHA":["session","idle"]}"#,
            br#"{"EVALSHA":["ok",1]}"#,
        ] {
            assert_eq!(
                reason(decode(&b, false, ok, body)),
                Some(DenyReason::StateUnavailable),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// The caller's nonce never reaches the command as syntax: it is hashed into the key.
    #[test]
    fn the_command_carries_no_caller_bytes() {
        let c = settings();
        let call = encode(&P, &c, &nonce_batch(false), false);
        let body = String::from_utf8(call.body).unwrap();
        assert!(body.starts_with("EVALSHA/"), "{body}");
        assert!(!body.contains("n/1") && !body.contains("json"), "{body}");
        assert_eq!(body.split('/').count(), 1 + 1 + 1 + 4 + 6);
        assert!(body.ends_with("/1000"), "the app's share ends it: {body}");
    }
}
