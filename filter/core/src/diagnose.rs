//! Explaining a decision offline (`apisec verify`): a captured request is decided by the same
//! lifecycle the filter runs, and its signature is taken apart so that a partner whose request
//! is refused sees where it differs: the signature base the gateway computes, which required
//! component is not covered, how far `created` is from the gateway clock, whether the body
//! matches its Content-Digest. Nothing here decides; the decision is the lifecycle's.

use std::cell::Cell;
use std::sync::Arc;

use crate::crypto::{self, EcdsaVerifier};
use crate::engine::{self, USER_HEADER};
use crate::error::Deny;
use crate::lifecycle::{Action, Config, Env, HostError, HostFacts, Step, Stream, Transport};
use crate::message::{signature_base, Request};
use crate::policy::Policy;
use crate::sf::{self, BareItem, Member};
use crate::store::{MemoryStore, SharedStore};

/// What the offline check found.
#[derive(Debug, Clone)]
pub struct Diagnosis {
    /// The API the request is for (id, level), if the inventory names one.
    pub api: Option<(String, &'static str)>,
    /// The lifecycle's decision: None accepted, or the refusal (status, code, detail).
    pub refusal: Option<(u32, &'static str, String)>,
    pub signature: Option<SignatureFacts>,
    pub digest: DigestFacts,
}

#[derive(Debug, Clone)]
pub struct SignatureFacts {
    pub label: String,
    pub components: Vec<String>,
    pub keyid: Option<String>,
    pub alg: Option<String>,
    pub created: Option<i64>,
    /// `created` minus the gateway clock, seconds (negative: the request is older).
    pub skew: Option<i64>,
    /// The window `created` must be within, either way.
    pub window: u64,
    /// Components the gateway requires that the signature does not cover.
    pub missing: Vec<String>,
    /// The signature base the gateway computes, or why it cannot.
    pub base: Result<String, String>,
}

#[derive(Debug, Clone)]
pub struct DigestFacts {
    pub header: Option<String>,
    /// `sha-256=:...:` of the body as received.
    pub body_sha256: String,
    /// Whether the header matches the body (None: no header).
    pub matches: Option<Result<(), String>>,
}

struct Captured<'a> {
    now: u64,
    req: &'a Request,
    body: &'a [u8],
}

impl HostFacts for Captured<'_> {
    fn now(&self) -> Option<u64> {
        Some(self.now)
    }
    fn transport(&self) -> Transport {
        Transport {
            tls: self.req.conn.tls,
            peer_cert_sha256: self.req.conn.peer_cert_sha256.clone(),
            peer_uri_san: self.req.conn.peer_uri_san.clone(),
        }
    }
    fn request_body(&self, size: usize) -> Result<Vec<u8>, HostError> {
        Ok(self.body.get(..size).unwrap_or(self.body).to_vec())
    }
    fn response_header(&self, _: &str) -> Option<String> {
        None
    }
    fn response_body(&self, _: usize) -> Result<Vec<u8>, HostError> {
        Ok(Vec::new())
    }
    fn route_name(&self) -> Option<String> {
        self.req.route.clone()
    }
}

/// One complete request (headers, then its body) driven through the lifecycle, as Envoy
/// drives it, on `store` at gateway time `now`: the last step and the stream. Used here for the
/// offline decision and by the core tests.
pub fn run(
    config: Config,
    store: &dyn SharedStore,
    verifier: &dyn EcdsaVerifier,
    req: &Request,
    body: &[u8],
    now: u64,
) -> (Step, Stream) {
    let host = Captured { now, req, body };
    let held = Cell::new(0);
    let env = Env {
        store,
        verifier,
        host: &host,
        held: &held,
        chain: None,
    };
    let mut pairs: Vec<(String, Vec<u8>)> = vec![
        (":method".into(), req.method.clone().into_bytes()),
        (":scheme".into(), req.scheme.clone().into_bytes()),
        (":authority".into(), req.authority.clone().into_bytes()),
        (":path".into(), req.path_and_query.clone().into_bytes()),
        ("x-request-id".into(), b"offline".to_vec()),
    ];
    pairs.extend(
        req.headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
    );
    let source = req.conn.client_ip.map(|ip| match ip {
        std::net::IpAddr::V4(v4) => format!("{v4}:40000"),
        std::net::IpAddr::V6(v6) => format!("[{v6}]:40000"),
    });
    let mut stream = Stream::new(config);
    let mut step = stream.on_request_headers(Ok(pairs), source.as_deref(), body.is_empty(), &env);
    if step.action == Action::Pause {
        step = stream.on_request_body(body.len(), true, &env);
    }
    (step, stream)
}

/// The lifecycle's decision on the captured request, with an empty replay store (a nonce used
/// before cannot be judged offline).
fn decide(
    policy: &Policy,
    req: &Request,
    body: &[u8],
    now: u64,
    verifier: &dyn EcdsaVerifier,
) -> Result<Option<(u32, &'static str, String)>, String> {
    let mem = MemoryStore::default();
    let mut policy = policy.clone();
    let meta = crate::local::open(&mem, [0; 16], 0, &mut policy)?;
    let config = Config {
        policy: Arc::new(policy),
        meta: Arc::new(meta),
    };
    let (step, stream) = run(config, &mem, verifier, req, body, now);
    let record: Option<serde_json::Value> = stream
        .record_so_far()
        .and_then(|a| serde_json::from_str(&a).ok());
    Ok(match (&step.action, record) {
        (Action::Refuse { status, .. }, Some(rec)) => {
            let text = |k: &str| rec.get(k).and_then(serde_json::Value::as_str).unwrap_or("");
            let code = text("code");
            let code = crate::DenyReason::ALL
                .iter()
                .find(|r| r.code() == code)
                .map_or("unknown", |r| r.code());
            Some((*status, code, text("detail").to_string()))
        }
        (Action::Refuse { status, .. }, None) => Some((*status, "unknown", String::new())),
        _ => None,
    })
}

fn signature_facts(policy: &Policy, req: &Request, now: u64) -> Option<SignatureFacts> {
    let input_text = req.header_values("signature-input").next()?;
    let mut facts = SignatureFacts {
        label: String::new(),
        components: Vec::new(),
        keyid: None,
        alg: None,
        created: None,
        skew: None,
        window: policy.clock_skew_seconds,
        missing: Vec::new(),
        base: Err("signature-input is not a valid structured field".into()),
    };
    let Ok(dict) = sf::parse_dictionary(input_text) else {
        return Some(facts);
    };
    let Some((label, Member::InnerList(input))) = dict.first() else {
        facts.base = Err("signature-input has no inner list".into());
        return Some(facts);
    };
    facts.label = label.to_string();
    let mut covered: Vec<&str> = Vec::new();
    for item in &input.items {
        let mut text = String::new();
        sf::serialize_item(&mut text, item);
        facts.components.push(text);
        if let BareItem::String(s) = &item.bare {
            covered.push(s.as_ref());
        }
    }
    let text = |k: &str| match sf::param(&input.params, k) {
        Some(BareItem::String(s)) => Some(s.to_string()),
        _ => None,
    };
    facts.keyid = text("keyid");
    facts.alg = text("alg");
    if let Some(BareItem::Integer(c)) = sf::param(&input.params, "created") {
        facts.created = Some(*c);
        facts.skew = Some(c.saturating_sub(i64::try_from(now).unwrap_or(i64::MAX)));
    }
    facts.missing = policy
        .required_components
        .iter()
        .filter(|r| !engine::covers(&covered, r))
        .cloned()
        .collect();
    let has_digest = req.header_values("content-digest").next().is_some();
    if has_digest && !covered.contains(&"content-digest") {
        facts.missing.push("content-digest".into());
    }
    let user_sent = req.header_values(USER_HEADER).next().is_some();
    if user_sent && !covered.contains(&USER_HEADER) {
        facts.missing.push(USER_HEADER.into());
    }
    facts.base = signature_base(req, input, policy.max_signature_base_bytes)
        .map_err(|d: Deny| format!("{}: {}", d.reason.code(), d.detail));
    Some(facts)
}

/// Explains the gateway's decision on `req` with `body` at gateway time `now`.
pub fn diagnose(
    policy: &Policy,
    req: &Request,
    body: &[u8],
    now: u64,
    verifier: &dyn EcdsaVerifier,
) -> Result<Diagnosis, String> {
    let api = engine::find_api(policy, req)
        .ok()
        .map(|a| (a.id.clone(), a.level.as_str()));
    let header = req
        .header_values("content-digest")
        .next()
        .map(str::to_string);
    let matches = header
        .as_deref()
        .map(|h| crypto::verify_content_digest(h, body).map_err(|d| d.detail));
    Ok(Diagnosis {
        api,
        refusal: decide(policy, req, body, now, verifier)?,
        signature: signature_facts(policy, req, now),
        digest: DigestFacts {
            header,
            body_sha256: crypto::content_digest_sha256(body),
            matches,
        },
    })
}
