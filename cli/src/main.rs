//! `apisec`: the operator and client command line. Key generation (OPS-2), policy check and
//! conversion to the JSON the filter reads, and RFC 9421 request signing for callers and tests.
#![forbid(unsafe_code)]

mod apply;
mod audit;
mod compliance;
mod inventory;
mod keyring;
mod opslog;
mod sessions;
mod verify;

use std::collections::HashMap;
use std::process::ExitCode;

use apisec_core::crypto::{content_digest_sha256, content_digest_sm3};
use apisec_core::message::Request;
use apisec_core::policy::RawPolicy;
use apisec_core::sessions::{MAC_HEADER, SESSION_HEADER};
use apisec_core::signer::{sign, SignParams, SigningKey};
use base64::Engine as _;

const USAGE: &str = "usage:
  apisec keygen hmac                      print a new App_Secret (base64, 32 bytes)
  apisec keygen p256 --out PREFIX         write PREFIX.key.pem (private, PKCS#8) and PREFIX.pub.pem
  apisec keygen sm2 --out PREFIX          the same for an SM2 key (DATA-5; OpenSSL 3 reads both)
  apisec policy check FILE [--against IN_FORCE]
                                          validate a policy (YAML or JSON); secrets are checked
                                          only if their environment variables are set; with
                                          --against (the policy in force, e.g. the ECDS file's
                                          applied-policy.json), an API's change of state or level
                                          needs a new review record (OPS-1, LVL-4)
  apisec policy json FILE                 print the validated policy as the compact JSON the filter reads
  apisec policy env FILE                  print the environment variables the policy names for
                                          secrets, one per line (Envoy's host_env_keys)
  apisec policy apply FILE --ecds PATH [--admin HOST:PORT] [--actor NAME] [--source TEXT]
              [--ops-log PATH] [--timeout SECONDS] [--env-file PATH] [--ops-key-env VAR]
              [--keyring PATH] [--envoy-log PATH] [--dry-run]
                                          validate (secrets too, where set here or in --env-file),
                                          print the changes, write into Envoy's ECDS file
                                          atomically, wait until Envoy loads or rejects it
                                          (--admin; with --envoy-log, print Envoy's reason), log
                                          the outcome, who, and every change to the operations
                                          log, chained under APISEC_OPS_KEY (LVL-4, BWL-3,
                                          LOG-5); keep the policy's public keys in the keyring
                                          (DATA-4). Refused: an empty actor, and an unsealed line
                                          into a sealed log (no key). --dry-run: validate and
                                          print the changes only
  apisec grants list FILE [--app APP]     list grants (all, or one caller's) with their validity (OPS-3)
  apisec grants revoke FILE --app APP [--grant ID]
                                          print the policy without that caller's grants (or one
                                          grant), validated, as YAML (comments are not kept)
  apisec sign --app APP --keyid KEYID (--secret-env VAR | --secret B64 | --key PEMFILE)
              [--alg hmac-sha256|hmac-sm3|ecdsa-p256-sha256|sm2-sm3] [--sm2-id ID]
              [--digest sha-256|sm3]
              --url URL [--method M] [--data BODY | --data-file FILE] [--header 'name: value']...
              [--cover COMPONENT]... [--nonce N] [--created UNIX] [--expires UNIX] [--label L]
              [--session ID --mac MAC] [--format curl|json|headers]
                                          sign a request with RFC 9421 (created, nonce, keyid, alg)
                                          and RFC 9530 content-digest; print it ready to send;
                                          --session and --mac add x-session-id and x-device-mac,
                                          covered by the signature";

fn usage() -> String {
    format!(
        "{USAGE}\n{}\n{}\n{}\n{}\n{}",
        verify::USAGE,
        audit::USAGE,
        compliance::USAGE,
        inventory::USAGE,
        sessions::USAGE
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["keygen", "hmac"] => keygen_hmac(),
        ["keygen", "p256", "--out", prefix] => keygen_p256(prefix),
        ["keygen", "sm2", "--out", prefix] => keygen_sm2(prefix),
        ["policy", "check", file] => policy_check(file, None),
        ["policy", "check", file, "--against", in_force] => policy_check(file, Some(in_force)),
        ["policy", "json", file] => policy_json(file),
        ["policy", "env", file] => policy_env(file),
        ["policy", "apply", rest @ ..] => apply::parse(rest).and_then(|a| apply::apply(&a)),
        ["grants", "list", file] => grants_list(file, None),
        ["grants", "list", file, "--app", app] => grants_list(file, Some(app)),
        ["grants", "revoke", file, "--app", app] => grants_revoke(file, app, None),
        ["grants", "revoke", file, "--app", app, "--grant", id] => {
            grants_revoke(file, app, Some(id))
        }
        ["sign", rest @ ..] => sign_cmd(rest),
        ["inventory", rest @ ..] => inventory::run(rest),
        ["sessions", rest @ ..] => sessions::run(rest),
        ["compliance", rest @ ..] => match compliance::run(rest) {
            Ok(0) => Ok(()),
            Ok(status) => return ExitCode::from(status),
            Err(e) => Err(e),
        },
        ["audit", rest @ ..] => match audit::run(rest) {
            Ok(0) => Ok(()),
            Ok(status) => return ExitCode::from(status),
            Err(e) => Err(e),
        },
        ["verify", rest @ ..] => match verify::run(rest) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        ["help"] | ["--help"] | ["-h"] => {
            println!("{}", usage());
            Ok(())
        }
        _ => Err(format!("unknown command\n{}", usage())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apisec: {e}");
            ExitCode::from(2)
        }
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut b)
        .map_err(|e| format!("random: {e}"))?;
    Ok(b)
}

fn keygen_hmac() -> Result<(), String> {
    println!(
        "{}",
        base64::engine::general_purpose::STANDARD.encode(random_bytes::<32>()?)
    );
    Ok(())
}

fn keygen_p256(prefix: &str) -> Result<(), String> {
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    let private = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| e.to_string())?;
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| e.to_string())?;
    write_key_pair(prefix, private.as_bytes(), &public, "")
}

fn keygen_sm2(prefix: &str) -> Result<(), String> {
    use sm2::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let key = sm2::SecretKey::random(&mut rand_core::OsRng);
    let private = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| e.to_string())?;
    let public = key
        .public_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| e.to_string())?;
    write_key_pair(prefix, private.as_bytes(), &public, ", alg sm2-sm3")
}

/// PREFIX.key.pem (private, mode 0600) and PREFIX.pub.pem; `alg` is said of the public one.
fn write_key_pair(prefix: &str, private: &[u8], public: &str, alg: &str) -> Result<(), String> {
    let priv_path = format!("{prefix}.key.pem");
    write_private(&priv_path, private)?;
    std::fs::write(format!("{prefix}.pub.pem"), public).map_err(|e| e.to_string())?;
    println!(
        "wrote {priv_path} (keep it with the app) and {prefix}.pub.pem (goes in the policy{alg})"
    );
    Ok(())
}

fn write_private(path: &str, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).map_err(|e| format!("{path}: {e}"))?;
    f.write_all(data).map_err(|e| format!("{path}: {e}"))
}

pub(crate) fn load_policy(file: &str) -> Result<RawPolicy, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    // YAML is a superset of JSON: one parser for both, the same raw structs as the filter.
    serde_yaml::from_str::<RawPolicy>(&text).map_err(|e| format!("{file}: {e}"))
}

/// Lowercase hex SHA-256.
fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    apisec_core::crypto::hex(&sha2::Sha256::digest(data))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for unix seconds.
fn rfc3339_utc(t: u64) -> String {
    let (days, secs) = ((t / 86400) as i64, t % 86400);
    // civil from days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

struct EnvSecrets;
impl apisec_core::policy::SecretSource for EnvSecrets {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

fn policy_env(file: &str) -> Result<(), String> {
    for name in load_policy(file)?.secret_env_names() {
        println!("{name}");
    }
    Ok(())
}

fn policy_check(file: &str, in_force: Option<&str>) -> Result<(), String> {
    let raw = load_policy(file)?;
    raw.validate().map_err(|e| format!("{file}: {e}"))?;
    if let Some(old) = in_force {
        let old = load_policy(old)?;
        apisec_core::inventory::review_of_changes(&old.apis, &raw.apis)
            .map_err(|e| format!("{file}: {e}"))?;
    }
    let envs = raw.secret_env_names();
    let missing: Vec<&str> = envs
        .iter()
        .map(String::as_str)
        .filter(|e| std::env::var(e).is_err())
        .collect();
    if missing.is_empty() {
        raw.clone()
            .into_policy(&EnvSecrets)
            .map_err(|e| format!("{file}: {e}"))?;
    }
    println!(
        "{file}: valid: {} APIs, {} apps{}",
        raw.apis.len(),
        raw.apps.len(),
        if missing.is_empty() {
            String::new()
        } else {
            format!(
                " (secrets not checked here, not set: {})",
                missing.join(", ")
            )
        }
    );
    Ok(())
}

fn policy_json(file: &str) -> Result<(), String> {
    let raw = load_policy(file)?;
    raw.validate().map_err(|e| format!("{file}: {e}"))?;
    println!(
        "{}",
        serde_json::to_string(&raw).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn grants_list(file: &str, app: Option<&str>) -> Result<(), String> {
    let raw = load_policy(file)?;
    raw.validate().map_err(|e| format!("{file}: {e}"))?;
    let mut n = 0;
    for g in raw.grants.iter().filter(|g| app.is_none_or(|a| g.app == a)) {
        n += 1;
        let mut what: Vec<String> = g.apis.clone();
        what.extend(g.functions.iter().map(|f| format!("function:{f}")));
        let mut validity = Vec::new();
        if let Some(t) = &g.not_before {
            validity.push(format!("from {t}"));
        }
        if let Some(t) = &g.not_after {
            validity.push(format!("until {t}"));
        }
        if g.once {
            validity.push("single use".into());
        }
        if let Some(m) = g.max_uses {
            validity.push(format!("{m} uses"));
        }
        if !g.windows.is_empty() {
            validity.push(format!("{} time windows", g.windows.len()));
        }
        if !g.users.is_empty() {
            validity.push(format!("users {}", g.users.join(",")));
        }
        let approval = g
            .approval
            .as_ref()
            .map(|a| format!(" approved by {} ({}, {})", a.approver, a.ticket, a.date));
        println!(
            "{}\t{}\t{}\t{}{}",
            g.id,
            g.app,
            what.join(","),
            if validity.is_empty() {
                "no limits".to_string()
            } else {
                validity.join("; ")
            },
            approval.unwrap_or_default()
        );
    }
    if n == 0 {
        eprintln!(
            "no grants{}",
            app.map(|a| format!(" for {a}")).unwrap_or_default()
        );
    }
    Ok(())
}

fn grants_revoke(file: &str, app: &str, grant: Option<&str>) -> Result<(), String> {
    let mut raw = load_policy(file)?;
    let before = raw.grants.len();
    raw.grants
        .retain(|g| !(g.app == app && grant.is_none_or(|id| g.id == id)));
    if raw.grants.len() == before {
        return Err(format!("{file}: no matching grant for {app}"));
    }
    raw.validate().map_err(|e| format!("{file}: {e}"))?;
    eprintln!(
        "removed {} grant(s) of {app}; apply the printed policy to take effect",
        before - raw.grants.len()
    );
    print!(
        "{}",
        serde_yaml::to_string(&raw).map_err(|e| e.to_string())?
    );
    Ok(())
}

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

fn sign_cmd(args: &[&str]) -> Result<(), String> {
    let mut opts: HashMap<&str, Vec<String>> = HashMap::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let name = flag
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {flag}"))?;
        let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
        opts.entry(name).or_default().push(value.to_string());
    }
    let one = |k: &str| opts.get(k).and_then(|v| v.last()).cloned();
    let need = |k: &str| one(k).ok_or_else(|| format!("--{k} is required"));
    let known = [
        "app",
        "keyid",
        "secret-env",
        "secret",
        "key",
        "url",
        "method",
        "data",
        "data-file",
        "header",
        "cover",
        "nonce",
        "created",
        "expires",
        "label",
        "format",
        "session",
        "mac",
        "alg",
        "sm2-id",
        "digest",
    ];
    if let Some(k) = opts.keys().find(|k| !known.contains(k)) {
        return Err(format!("unknown option --{k}"));
    }

    let app = need("app")?;
    let keyid = need("keyid")?;
    let url = parse_url(&need("url")?)?;
    let body: Vec<u8> = match (one("data"), one("data-file")) {
        (Some(d), None) => d.into_bytes(),
        (None, Some(f)) => std::fs::read(&f).map_err(|e| format!("{f}: {e}"))?,
        (None, None) => Vec::new(),
        _ => return Err("give --data or --data-file, not both".into()),
    };
    let method = one("method").unwrap_or_else(|| {
        if body.is_empty() {
            "GET".into()
        } else {
            "POST".into()
        }
    });

    let alg = one("alg");
    if one("sm2-id").is_some() && alg.as_deref() != Some("sm2-sm3") {
        return Err("--sm2-id goes with --alg sm2-sm3".into());
    }
    let secret = match (one("secret-env"), one("secret")) {
        (Some(var), None) => {
            Some(decode_b64(&std::env::var(&var).map_err(|_| {
                format!("environment variable {var} is not set")
            })?)?)
        }
        (None, Some(s)) => Some(decode_b64(&s)?),
        (None, None) => None,
        _ => return Err("give exactly one of --secret-env, --secret, --key".into()),
    };
    let key = match (secret, one("key"), alg.as_deref()) {
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
            let id = one("sm2-id").unwrap_or_else(|| apisec_core::apps::SM2_DEFAULT_ID.into());
            let k = apisec_core::crypto::sm2_signing_key(&pem, &id)
                .ok_or_else(|| format!("{file}: not a PKCS#8 SM2 private key"))?;
            SigningKey::Sm2(Box::new(k))
        }
        (None, None, _) => return Err("give exactly one of --secret-env, --secret, --key".into()),
        (Some(_), Some(_), _) => {
            return Err("give exactly one of --secret-env, --secret, --key".into())
        }
        (_, _, Some(a)) => {
            return Err(format!(
                "--alg {a} does not go with that key (hmac-sha256 or hmac-sm3 with a secret, \
                 ecdsa-p256-sha256 or sm2-sm3 with --key)"
            ))
        }
    };
    let national = matches!(key, SigningKey::HmacSm3(_) | SigningKey::Sm2(_));

    let mut headers: Vec<(String, String)> = vec![("x-app-id".into(), app)];
    for h in opts.get("header").into_iter().flatten() {
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
    for (opt, name) in [("session", SESSION_HEADER), ("mac", MAC_HEADER)] {
        if let Some(v) = one(opt) {
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
        let digest = match one("digest").as_deref() {
            None if national => content_digest_sm3(&body),
            None | Some("sha-256") => content_digest_sha256(&body),
            Some("sm3") => content_digest_sm3(&body),
            Some(d) => return Err(format!("--digest {d}: sha-256 or sm3")),
        };
        headers.push(("content-digest".into(), digest));
        components.push("content-digest".into());
    }
    for c in opts.get("cover").into_iter().flatten() {
        if !components.contains(c) {
            components.push(c.clone());
        }
    }
    #[allow(clippy::disallowed_methods)] // the client's own clock; core never reads it
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs() as i64;
    let parse_int = |k: &str| -> Result<Option<i64>, String> {
        one(k)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| format!("--{k} must be an integer"))
            })
            .transpose()
    };
    let nonce = match one("nonce") {
        Some(n) => n,
        None => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<18>()?),
    };
    let params = SignParams {
        label: one("label").unwrap_or_else(|| "sig1".into()),
        components,
        created: parse_int("created")?.unwrap_or(now),
        expires: parse_int("expires")?,
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
    match one("format").as_deref().unwrap_or("curl") {
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
