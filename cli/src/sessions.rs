//! `apisec sessions end --url https://HOST:PORT --cert OPERATOR.pem --key OPERATOR.key --ca CA.pem
//! (--session ID | --app APP | --user USER)`: an operator ends one session, every session of an
//! app, or of a user, at once (SES-4, OPS-6), through the gateway's operator listener (mutual
//! TLS with the operator's certificate; the route the policy names `sessions.operator_route`).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

pub const USAGE: &str = "  apisec sessions end --url https://HOST:PORT --cert OPERATOR.pem --key OPERATOR.key --ca CA.pem
              (--session ID | --app APP | --user USER)
                                          end one session, every session of an app, or every session of
                                          a user, on every worker at once (SES-4, OPS-6), through the
                                          gateway's operator listener with the operator's certificate";

/// The operator path the filter answers on the operator route.
const PATH: &str = "/apisec/v1/operator/sessions/end";

fn tls_config(cert: &str, key: &str, ca: &str) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{ca}: {e}"))? {
        roots
            .add(c.map_err(|e| format!("{ca}: {e}"))?)
            .map_err(|e| format!("{ca}: {e}"))?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{cert}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("client certificate: {e}"))
}

/// One HTTP/1.1 POST over TLS; the status and the body of the answer.
fn post(url: &str, body: &str, config: rustls::ClientConfig) -> Result<(u16, String), String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or("--url must be https://HOST:PORT")?;
    let authority = rest.trim_end_matches('/');
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))?;
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:443")
    };
    let mut sock = TcpStream::connect(&addr).map_err(|e| format!("{addr}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let request = format!(
        "POST {PATH} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes())
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut answer = Vec::new();
    match tls.read_to_end(&mut answer) {
        Ok(_) => {}
        // Envoy may close without close_notify after `connection: close`.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {}
        Err(e) => return Err(format!("{addr}: {e}")),
    }
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {head:?}"))?;
    Ok((status, body.to_string()))
}

pub fn run(args: &[&str]) -> Result<(), String> {
    let ["end", rest @ ..] = args else {
        return Err(format!("usage:\n{USAGE}"));
    };
    let mut opts = std::collections::HashMap::new();
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        opts.insert(*flag, *value);
    }
    let need = |k: &str| {
        opts.get(k)
            .copied()
            .ok_or_else(|| format!("{k} is required\nusage:\n{USAGE}"))
    };
    let scope = match (opts.get("--session"), opts.get("--app"), opts.get("--user")) {
        (Some(s), None, None) => serde_json::json!({"session_id": s}),
        (None, Some(a), None) => serde_json::json!({"app": a}),
        (None, None, Some(u)) => serde_json::json!({"user": u}),
        _ => return Err("give exactly one of --session, --app, --user".into()),
    };
    let config = tls_config(need("--cert")?, need("--key")?, need("--ca")?)?;
    let (status, body) = post(need("--url")?, &scope.to_string(), config)?;
    if status == 200 {
        println!("{body}");
        Ok(())
    } else {
        Err(format!("the gateway answered {status}: {body}"))
    }
}
