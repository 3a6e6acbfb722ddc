//! `apisec sign`: RFC 9421 request signing for callers and tests (and the partner kit's model):
//! the covered components, the nonce and times, the key (HMAC-SHA-256, HMAC-SM3, P-256 or SM2),
//! and an RFC 9530 Content-Digest for a body.

use apisec_core::apps::Algorithm;
use apisec_core::crypto::{content_digest_sha256, content_digest_sm3};
use apisec_core::message::Request;
use apisec_core::sessions::{MAC_HEADER, SESSION_HEADER};
use apisec_core::signer::{sign, SignParams, SigningKey};
use base64::Engine as _;

struct Url {
    scheme: String,
    authority: String,
    path_and_query: String,
}

fn parse_url(url: &str) -> Result<Url, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("URL needs a scheme, like http://host/path")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    Ok(Url {
        scheme: scheme.to_ascii_lowercase(),
        authority: authority.to_string(),
        path_and_query: path.to_string(),
    })
}

/// `apisec sign`: a request signed with RFC 9421 (created, nonce, keyid, alg) and, with a
/// body, an RFC 9530 Content-Digest, printed ready to send.
#[derive(clap::Args)]
#[command(args_override_self = true)]
pub struct SignArgs {
    /// The caller's app id (x-app-id, covered)
    #[arg(long)]
    app: String,
    /// The credential id the gateway knows the key by
    #[arg(long)]
    keyid: String,
    /// An HMAC secret (base64) from this environment variable
    #[arg(long, value_name = "VAR")]
    secret_env: Option<String>,
    /// An HMAC secret (base64) given here
    #[arg(long, value_name = "B64")]
    secret: Option<String>,
    /// A private key (PKCS#8 PEM, P-256 or SM2)
    #[arg(long, value_name = "PEMFILE")]
    key: Option<String>,
    /// The algorithm (default: hmac-sha256 with a secret, ecdsa-p256-sha256 with a key)
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(Algorithm::ALL.map(Algorithm::as_str)))]
    alg: Option<String>,
    /// The SM2 distinguishing ID (default 1234567812345678)
    #[arg(long, value_name = "ID")]
    sm2_id: Option<String>,
    /// The Content-Digest algorithm (default: sm3 with the national algorithms, else sha-256)
    #[arg(long, value_parser = ["sha-256", "sm3"])]
    digest: Option<String>,
    /// The full URL: scheme, authority, path and query
    #[arg(long)]
    url: String,
    /// The method (default GET, POST with a body)
    #[arg(long, value_name = "M")]
    method: Option<String>,
    /// The body
    #[arg(
        long,
        value_name = "BODY",
        allow_hyphen_values = true,
        conflicts_with = "data_file"
    )]
    data: Option<String>,
    /// The body, from a file
    #[arg(long, value_name = "FILE")]
    data_file: Option<String>,
    /// An extra header, 'name: value' (repeat)
    #[arg(long = "header", value_name = "'name: value'", action = clap::ArgAction::Append)]
    headers: Vec<String>,
    /// An extra component to cover (repeat)
    #[arg(long = "cover", value_name = "COMPONENT", action = clap::ArgAction::Append)]
    cover: Vec<String>,
    /// The nonce (default: 18 random bytes)
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    nonce: Option<String>,
    /// The created time, unix seconds (default now)
    #[arg(long, value_name = "UNIX", allow_negative_numbers = true)]
    created: Option<i64>,
    /// The expires time, unix seconds
    #[arg(long, value_name = "UNIX", allow_negative_numbers = true)]
    expires: Option<i64>,
    /// The signature label
    #[arg(long, value_name = "L", default_value = "sig1")]
    label: String,
    /// A session ID (x-session-id, covered; SES-1)
    #[arg(long, value_name = "ID", requires = "mac", allow_hyphen_values = true)]
    session: Option<String>,
    /// The device MAC (x-device-mac, covered)
    #[arg(long, value_name = "MAC")]
    mac: Option<String>,
    /// What to print
    #[arg(long, default_value = "curl", value_parser = ["curl", "json", "headers"])]
    format: String,
}

pub fn run(a: SignArgs) -> Result<(), String> {
    let app = a.app;
    let keyid = a.keyid;
    let url = parse_url(&a.url)?;
    let body: Vec<u8> = match (a.data, a.data_file) {
        (Some(d), None) => d.into_bytes(),
        (None, Some(f)) => std::fs::read(&f).map_err(|e| format!("{f}: {e}"))?,
        (None, None) => Vec::new(),
        _ => return Err("give --data or --data-file, not both".into()),
    };
    let method = a.method.unwrap_or_else(|| {
        if body.is_empty() {
            "GET".into()
        } else {
            "POST".into()
        }
    });

    let alg = a.alg;
    if a.sm2_id.is_some() && alg.as_deref() != Some("sm2-sm3") {
        return Err("--sm2-id goes with --alg sm2-sm3".into());
    }
    let secret = match (a.secret_env, a.secret) {
        (Some(var), None) => {
            Some(decode_b64(&std::env::var(&var).map_err(|_| {
                format!("environment variable {var} is not set")
            })?)?)
        }
        (None, Some(s)) => Some(decode_b64(&s)?),
        (None, None) => None,
        _ => return Err("give exactly one of --secret-env, --secret, --key".into()),
    };
    let key = match (secret, a.key, alg.as_deref()) {
        (Some(k), None, None | Some("hmac-sha256")) => SigningKey::Hmac(k),
        (Some(k), None, Some("hmac-sm3")) => SigningKey::HmacSm3(k),
        (None, Some(file), None | Some("ecdsa-p256-sha256")) => {
            use p256::pkcs8::DecodePrivateKey;
            let pem = std::fs::read_to_string(&file).map_err(|e| format!("{file}: {e}"))?;
            let k = p256::ecdsa::SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
                format!("{file}: not a PKCS#8 P-256 key ({e}); an SM2 key needs --alg sm2-sm3")
            })?;
            SigningKey::P256(Box::new(k))
        }
        (None, Some(file), Some("sm2-sm3")) => {
            let pem = std::fs::read_to_string(&file).map_err(|e| format!("{file}: {e}"))?;
            let id = a
                .sm2_id
                .unwrap_or_else(|| apisec_core::apps::SM2_DEFAULT_ID.into());
            let k = apisec_core::crypto::sm2_signing_key(&pem, &id)
                .ok_or_else(|| format!("{file}: not a PKCS#8 SM2 private key"))?;
            SigningKey::Sm2(Box::new(k))
        }
        (None, None, _) => return Err("give exactly one of --secret-env, --secret, --key".into()),
        (Some(_), Some(_), _) => {
            return Err("give exactly one of --secret-env, --secret, --key".into())
        }
        (_, _, Some(alg)) => {
            return Err(format!(
                "--alg {alg} does not go with that key (hmac-sha256 or hmac-sm3 with a secret, \
                 ecdsa-p256-sha256 or sm2-sm3 with --key)"
            ))
        }
    };
    let national = matches!(key, SigningKey::HmacSm3(_) | SigningKey::Sm2(_));

    let mut headers: Vec<(String, String)> = vec![("x-app-id".into(), app)];
    for h in &a.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| format!("bad --header {h:?}, want 'name: value'"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut components: Vec<String> = ["@method", "@authority", "@path", "@query", "x-app-id"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // A session (SES-1): its ID and the device MAC travel in headers the signature covers.
    for (opt, name) in [(a.session, SESSION_HEADER), (a.mac, MAC_HEADER)] {
        if let Some(v) = opt {
            headers.push((name.to_string(), v));
            components.push(name.to_string());
        }
    }
    if !body.is_empty() {
        // A body goes as JSON unless the caller says otherwise (--header 'content-type: ...'):
        // the gateway checks a restricted API's body as its declared type (PERM-1).
        if !headers.iter().any(|(k, _)| k == "content-type") {
            headers.push(("content-type".into(), "application/json".into()));
        }
        // sm3 with the national algorithms (DATA-5), sha-256 otherwise, unless --digest says
        let digest = match a.digest.as_deref() {
            None if national => content_digest_sm3(&body),
            None | Some("sha-256") => content_digest_sha256(&body),
            Some("sm3") => content_digest_sm3(&body),
            Some(d) => return Err(format!("--digest {d}: sha-256 or sm3")),
        };
        headers.push(("content-digest".into(), digest));
        components.push("content-digest".into());
    }
    for c in a.cover {
        if !components.contains(&c) {
            components.push(c);
        }
    }
    let now = crate::now()? as i64; // the client's own clock
    let nonce = match a.nonce {
        Some(n) => n,
        None => base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(crate::keys::random_bytes::<18>()?),
    };
    let params = SignParams {
        label: a.label,
        components,
        created: a.created.unwrap_or(now),
        expires: a.expires,
        nonce: Some(nonce),
        keyid,
        include_alg: true,
    };
    let req = Request {
        conn: Default::default(),
        method: method.clone(),
        scheme: url.scheme.clone(),
        authority: url.authority.clone(),
        path_and_query: url.path_and_query.clone(),
        headers: headers.clone(),
        route: None,
    };
    let (input, sig) =
        sign(&req, &params, &key).map_err(|d| format!("cannot sign: {} {}", d.reason, d.detail))?;
    headers.push(("signature-input".into(), input));
    headers.push(("signature".into(), sig));

    let full_url = format!("{}://{}{}", url.scheme, url.authority, url.path_and_query);
    match a.format.as_str() {
        "json" => {
            let hmap: serde_json::Map<String, serde_json::Value> = headers
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            let out = serde_json::json!({
                "method": method, "url": full_url, "headers": hmap,
                "body": String::from_utf8_lossy(&body),
            });
            println!("{out}");
        }
        "headers" => {
            for (k, v) in &headers {
                println!("{k}: {v}");
            }
        }
        "curl" => {
            let q = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
            let mut cmd = format!("curl -sS -X {method} {}", q(&full_url));
            if url.scheme == "https" {
                cmd.push_str(" --cacert build/certs/ca.pem");
            }
            for (k, v) in &headers {
                cmd.push_str(&format!(" \\\n  -H {}", q(&format!("{k}: {v}"))));
            }
            if !body.is_empty() {
                cmd.push_str(&format!(
                    " \\\n  --data-binary {}",
                    q(&String::from_utf8_lossy(&body))
                ));
            }
            println!("{cmd}");
        }
        f => return Err(format!("unknown --format {f}")),
    }
    Ok(())
}

fn decode_b64(s: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|_| "the secret is not valid base64".to_string())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cmd {
        #[command(flatten)]
        args: super::SignArgs,
    }

    /// Session IDs and nonces are base64url and may begin with `-`: values, not options.
    #[test]
    fn a_session_or_nonce_beginning_with_a_hyphen_is_a_value() {
        let cmd = Cmd::try_parse_from([
            "apisec-sign",
            "--app",
            "demo",
            "--keyid",
            "k",
            "--url",
            "https://gw/x",
            "--session",
            "-Rb0_x",
            "--mac",
            "aa:bb:cc:dd:ee:ff",
            "--nonce",
            "-n0nce",
        ]);
        let Ok(cmd) = cmd else {
            panic!("refused");
        };
        assert_eq!(cmd.args.session.as_deref(), Some("-Rb0_x"));
        assert_eq!(cmd.args.nonce.as_deref(), Some("-n0nce"));
    }
}
