//! `apisec sessions end --url https://HOST:PORT --cert OPERATOR.pem --key OPERATOR.key --ca CA.pem
//! (--session ID | --app APP | --user USER)`: an operator ends one session, every session of an
//! app, or of a user, at once (SES-4, OPS-6), through the gateway's operator listener (mutual
//! TLS with the operator's certificate; the route the policy names `sessions.operator_route`).

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(clap::Subcommand)]
pub enum Sessions {
    /// End one session, every session of an app, or every session of a user, on every worker
    /// at once (SES-4, OPS-6), through the gateway's operator listener with the operator's
    /// certificate
    #[command(group(clap::ArgGroup::new("scope").required(true).args(["session", "app", "user"])))]
    End {
        /// The operator listener, https://HOST:PORT
        #[arg(long)]
        url: String,
        /// The operator's client certificate (PEM)
        #[arg(long, value_name = "OPERATOR.pem")]
        cert: String,
        /// Its private key (PEM)
        #[arg(long, value_name = "OPERATOR.key")]
        key: String,
        /// The CA of the gateway's certificate
        #[arg(long, value_name = "CA.pem")]
        ca: String,
        /// A session ID as the gateway issued it (base64url: it may begin with `-`)
        #[arg(long, value_name = "ID", allow_hyphen_values = true)]
        session: Option<String>,
        #[arg(long, value_name = "APP", allow_hyphen_values = true)]
        app: Option<String>,
        #[arg(long, value_name = "USER", allow_hyphen_values = true)]
        user: Option<String>,
    },
}

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

/// One POST over TLS with the operator's certificate; the status and the body of the answer.
fn post(url: &str, body: &str, config: rustls::ClientConfig) -> Result<(u16, String), String> {
    let base = url
        .strip_prefix("https://")
        .ok_or("--url must be https://HOST:PORT")?
        .trim_end_matches('/');
    let agent = ureq::AgentBuilder::new()
        .tls_config(Arc::new(config))
        .timeout(Duration::from_secs(10))
        .build();
    let answer = agent
        .post(&format!("https://{base}{PATH}"))
        .set("content-type", "application/json")
        .send_string(body);
    let response = match answer {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(format!("{url}: {e}")),
    };
    let status = response.status();
    let text = response.into_string().map_err(|e| format!("{url}: {e}"))?;
    Ok((status, text))
}

pub fn run(cmd: Sessions) -> Result<(), String> {
    let Sessions::End {
        url,
        cert,
        key,
        ca,
        session,
        app,
        user,
    } = cmd;
    let scope = match (session, app, user) {
        (Some(s), None, None) => serde_json::json!({"session_id": s}),
        (None, Some(a), None) => serde_json::json!({"app": a}),
        (None, None, Some(u)) => serde_json::json!({"user": u}),
        _ => return Err("give exactly one of --session, --app, --user".into()),
    };
    let config = tls_config(&cert, &key, &ca)?;
    let (status, body) = post(&url, &scope.to_string(), config)?;
    if status == 200 {
        println!("{body}");
        Ok(())
    } else {
        Err(format!("the gateway answered {status}: {body}"))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cmd {
        #[command(subcommand)]
        sessions: super::Sessions,
    }

    fn parse(scope: &[&str]) -> Result<super::Sessions, clap::Error> {
        let mut args = vec!["apisec-sessions", "end", "--url", "https://gw:10445"];
        args.extend(["--cert", "op.pem", "--key", "op.key", "--ca", "ca.pem"]);
        args.extend(scope);
        Cmd::try_parse_from(args).map(|c| c.sessions)
    }

    /// A session ID is base64url and may begin with `-`: the CI run of 2026-12-06 met one
    /// (`-R...`) that clap took for an option, so the operator could not end that session.
    #[test]
    fn a_session_id_beginning_with_a_hyphen_is_a_value() {
        let Ok(super::Sessions::End { session, .. }) = parse(&["--session", "-Rb0_x"]) else {
            panic!("refused");
        };
        assert_eq!(session.as_deref(), Some("-Rb0_x"));
        let Ok(super::Sessions::End { user, .. }) = parse(&["--user", "-u1"]) else {
            panic!("refused");
        };
        assert_eq!(user.as_deref(), Some("-u1"));
        // still exactly one scope
        assert!(parse(&["--session", "-a", "--app", "demo"]).is_err());
        assert!(parse(&[]).is_err());
    }
}
