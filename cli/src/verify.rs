//! `apisec verify POLICY REQUEST`: why the gateway accepts or refuses a captured request,
//! offline. The request is decided by the filter's own lifecycle (core `diagnose`); this file
//! only reads the capture and prints what core found.

use std::path::Path;

use apisec_core::crypto::SoftwareVerifier;
use apisec_core::diagnose::{diagnose, Diagnosis};
use apisec_core::message::{Connection, Request};

use crate::apply::{read_env_file, Secrets};

/// Decide a captured request offline as the gateway would and explain it: the signature base
/// the gateway computes, covered components missing, clock skew, digest mismatch. Exit 0
/// accepted, 1 refused.
#[derive(clap::Args)]
pub struct Args {
    /// The policy (YAML or JSON)
    policy: String,
    /// Raw HTTP/1.1 (request line, headers, blank line, body) or the JSON of `apisec sign
    /// --format json`
    request: String,
    /// The time to decide at, unix seconds (default now)
    #[arg(long, value_name = "UNIX")]
    now: Option<u64>,
    /// A .env file with the secrets' variables
    #[arg(long, value_name = "FILE")]
    env_file: Option<String>,
    /// The scheme of a raw capture
    #[arg(long, default_value = "https", value_parser = ["https", "http"])]
    scheme: String,
    /// The client's address
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    client_ip: String,
    /// The Envoy route name the request took (per-route policy)
    #[arg(long, value_name = "NAME")]
    route: Option<String>,
}

struct Capture {
    req: Request,
    body: Vec<u8>,
}

/// Raw HTTP/1.1: `METHOD TARGET HTTP/1.1`, header lines, a blank line, the body.
fn parse_raw(text: &[u8], scheme: &str) -> Result<Capture, String> {
    let split = text
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| text.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)))
        .ok_or("no blank line after the headers")?;
    let (head, body) = (
        text.get(..split.0).unwrap_or_default(),
        text.get(split.0 + split.1..).unwrap_or_default().to_vec(),
    );
    let head = std::str::from_utf8(head).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.lines();
    let first = lines.next().ok_or("empty request")?;
    let mut parts = first.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(format!("bad request line {first:?}"));
    };
    let mut req = Request {
        method: method.to_string(),
        scheme: scheme.to_string(),
        path_and_query: target.to_string(),
        ..Default::default()
    };
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        let k = k.trim().to_ascii_lowercase();
        let v = v.trim().to_string();
        if k == "host" {
            req.authority = v;
        } else {
            req.headers.push((k, v));
        }
    }
    if req.authority.is_empty() {
        return Err("no Host header".into());
    }
    Ok(Capture { req, body })
}

/// The JSON `apisec sign --format json` prints: method, url, headers (object), body.
fn parse_json(text: &str) -> Result<Capture, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("JSON: {e}"))?;
    let field = |k: &str| v.get(k).and_then(serde_json::Value::as_str);
    let url = field("url").ok_or("JSON has no url")?;
    let (scheme, rest) = url.split_once("://").ok_or("url needs a scheme")?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    let mut req = Request {
        method: field("method").unwrap_or("GET").to_string(),
        scheme: scheme.to_string(),
        authority: authority.to_string(),
        path_and_query: path.to_string(),
        ..Default::default()
    };
    match v.get("headers").unwrap_or(&serde_json::Value::Null) {
        serde_json::Value::Object(m) => {
            for (k, val) in m {
                req.headers.push((
                    k.to_ascii_lowercase(),
                    val.as_str().unwrap_or("").to_string(),
                ));
            }
        }
        serde_json::Value::Array(a) => {
            for pair in a {
                let at = |i: usize| pair.get(i).and_then(serde_json::Value::as_str);
                if let (Some(k), Some(val)) = (at(0), at(1)) {
                    req.headers.push((k.to_ascii_lowercase(), val.to_string()));
                }
            }
        }
        _ => return Err("JSON headers must be an object or a list of pairs".into()),
    }
    let body = field("body").unwrap_or("").as_bytes().to_vec();
    Ok(Capture { req, body })
}

fn print(d: &Diagnosis, c: &Capture, now: u64) {
    let r = &c.req;
    println!(
        "request     {} {}://{}{}  (body {} bytes)",
        r.method,
        r.scheme,
        r.authority,
        r.path_and_query,
        c.body.len()
    );
    match &d.api {
        Some((id, level)) => println!("api         {id} ({level})"),
        None => println!(
            "api         none: {} {} is not in the inventory",
            r.method,
            r.path()
        ),
    }
    match &d.signature {
        None => println!("signature   none (no Signature-Input header)"),
        Some(s) => {
            println!(
                "signature   label {}, keyid {}, alg {}",
                s.label,
                s.keyid.as_deref().unwrap_or("(none)"),
                s.alg.as_deref().unwrap_or("(none: the credential's)")
            );
            println!("covered     {}", s.components.join(" "));
            if s.missing.is_empty() {
                println!("required    all covered");
            } else {
                println!("required    NOT COVERED: {}", s.missing.join(", "));
            }
            match (s.created, s.skew) {
                (Some(c), Some(skew)) => {
                    let verdict = if skew.unsigned_abs() <= s.window {
                        "within"
                    } else {
                        "OUTSIDE"
                    };
                    let side = if skew < 0 { "behind" } else { "ahead of" };
                    println!(
                        "created     {c}: {} s {side} the gateway clock ({now}); {verdict} the window of ±{} s",
                        skew.unsigned_abs(),
                        s.window
                    );
                }
                _ => println!("created     MISSING"),
            }
        }
    }
    match (&d.digest.header, &d.digest.matches) {
        (None, _) if c.body.is_empty() => println!("digest      none (no body)"),
        (None, _) => println!(
            "digest      MISSING: the body's would be content-digest: {}",
            d.digest.body_sha256
        ),
        (Some(_), Some(Ok(()))) => println!("digest      content-digest matches the body"),
        (Some(h), _) => println!(
            "digest      MISMATCH: header {h}; the body as received is {}",
            d.digest.body_sha256
        ),
    }
    if let Some(s) = &d.signature {
        match &s.base {
            Ok(base) => {
                println!("signature base (what the gateway verifies, byte for byte; lines end in \\n, the last has none):");
                for line in base.lines() {
                    println!("  {line}");
                }
            }
            Err(e) => println!("signature base cannot be built: {e}"),
        }
    }
    match &d.refusal {
        None => println!("decision    accepted"),
        Some((status, code, detail)) => {
            println!("decision    refused {status} {code}: {detail}");
        }
    }
    println!("            (offline: a nonce used before cannot be judged; bans and grant use counts start empty)");
}

pub fn run(a: Args) -> Result<bool, String> {
    let Args {
        policy,
        request,
        now,
        env_file,
        scheme,
        client_ip,
        route,
    } = a;
    let (policy_file, request_file) = (policy.as_str(), request.as_str());
    let raw = crate::load_policy(policy_file)?;
    let secrets = Secrets(match &env_file {
        Some(f) => read_env_file(Path::new(f))?,
        None => Vec::new(),
    });
    let policy = raw.into_policy(&secrets).map_err(|e| {
        format!("{policy_file}: {e} (HMAC secrets come from the environment or --env-file)")
    })?;
    let text = std::fs::read(request_file).map_err(|e| format!("{request_file}: {e}"))?;
    let mut capture = if text.trim_ascii_start().starts_with(b"{") {
        parse_json(&String::from_utf8_lossy(&text))?
    } else {
        parse_raw(&text, &scheme)?
    };
    capture.req.conn = Connection {
        client_ip: Some(client_ip.parse().map_err(|_| "--client-ip is not an IP")?),
        tls: capture.req.scheme == "https",
        ..Default::default()
    };
    capture.req.route = route;
    let now = match now {
        Some(n) => n,
        None => crate::now()?, // the operator's clock stands for the gateway's
    };
    let d = diagnose(&policy, &capture.req, &capture.body, now, &SoftwareVerifier)?;
    print(&d, &capture, now);
    Ok(d.refusal.is_none())
}
