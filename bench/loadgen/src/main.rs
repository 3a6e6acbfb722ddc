//! apisec-loadgen: the benchmark client, not part of the gateway. It pre-signs unique RFC 9421
//! requests with apisec-core's signer (so client signing is not in the measurement), runs
//! open-loop load at a fixed rate with latency measured from each request's *intended* send
//! time (correcting for coordinated omission, as wrk2 does), and floods unique nonces.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)] // a benchmark tool, not request-path code

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apisec_core::crypto::content_digest_sha256;
use apisec_core::message::Request;
use apisec_core::signer::{sign, SignParams, SigningKey};
use base64::Engine as _;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn need(args: &[String], name: &str) -> String {
    arg(args, name).unwrap_or_else(|| panic!("{name} is required"))
}

#[allow(clippy::disallowed_methods)] // the client's own clock
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[allow(clippy::disallowed_methods)] // the client's own clock
fn instant() -> Instant {
    Instant::now()
}

struct Signer {
    key: SigningKey,
    /// Extra header lines sent but not signed (e.g. a bearer token for the jwt_authn peers).
    extra: Vec<String>,
    app: String,
    keyid: String,
    authority: String,
    prefix: String,
    /// Seconds added to the signing time for `created`.
    created_offset: i64,
}

impl Signer {
    fn from_args(args: &[String]) -> Signer {
        let alg = arg(args, "--alg");
        let key = match (arg(args, "--secret-b64"), arg(args, "--key")) {
            (Some(s), None) if alg.as_deref() == Some("hmac-sm3") => SigningKey::HmacSm3(
                base64::engine::general_purpose::STANDARD
                    .decode(s.trim())
                    .unwrap(),
            ),
            (None, Some(f)) if alg.as_deref() == Some("sm2-sm3") => SigningKey::Sm2(Box::new(
                apisec_core::crypto::sm2_signing_key(
                    &std::fs::read_to_string(f).unwrap(),
                    apisec_core::apps::SM2_DEFAULT_ID,
                )
                .unwrap(),
            )),
            (Some(s), None) => SigningKey::Hmac(
                base64::engine::general_purpose::STANDARD
                    .decode(s.trim())
                    .unwrap(),
            ),
            (None, Some(f)) => {
                use p256::pkcs8::DecodePrivateKey;
                let pem = std::fs::read_to_string(f).unwrap();
                SigningKey::P256(Box::new(
                    p256::ecdsa::SigningKey::from_pkcs8_pem(&pem).unwrap(),
                ))
            }
            _ => panic!("give --secret-b64 or --key"),
        };
        let extra = args
            .windows(2)
            .filter(|w| w[0] == "--header")
            .map(|w| w[1].clone())
            .collect();
        Signer {
            key,
            extra,
            app: need(args, "--app"),
            keyid: need(args, "--keyid"),
            authority: need(args, "--authority"),
            prefix: arg(args, "--nonce-prefix").unwrap_or_else(|| format!("{}", unix_now())),
            // Requests signed before the gateway that will receive them starts must say they
            // were created after it started (a fresh replay store refuses older ones).
            created_offset: arg(args, "--created-offset")
                .map(|v| v.parse().expect("--created-offset is whole seconds"))
                .unwrap_or(0),
        }
    }

    /// One raw HTTP/1.1 request with a unique nonce. With a body: POST with content-digest.
    fn request(&self, path: &str, body: Option<&[u8]>, n: usize) -> Vec<u8> {
        let mut headers = vec![("x-app-id".to_string(), self.app.clone())];
        let mut components: Vec<String> = ["@method", "@authority", "@path", "@query", "x-app-id"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(b) = body {
            let digest = match self.key {
                SigningKey::HmacSm3(_) | SigningKey::Sm2(_) => {
                    apisec_core::crypto::content_digest_sm3(b)
                }
                _ => content_digest_sha256(b),
            };
            headers.push(("content-digest".into(), digest));
            headers.push(("content-type".into(), "application/json".into()));
            components.push("content-digest".into());
        }
        let method = if body.is_some() { "POST" } else { "GET" };
        let req = Request {
            conn: Default::default(),
            method: method.into(),
            scheme: "https".into(),
            authority: self.authority.clone(),
            path_and_query: path.into(),
            headers: headers.clone(),
            route: None,
        };
        let params = SignParams {
            label: "sig1".into(),
            components,
            created: unix_now() + self.created_offset,
            expires: None,
            nonce: Some(format!("{}-{n}", self.prefix)),
            keyid: self.keyid.clone(),
            include_alg: true,
        };
        let (input, sig) = sign(&req, &params, &self.key).unwrap();
        let mut out = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\n", self.authority);
        for (k, v) in headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!("signature-input: {input}\r\nsignature: {sig}\r\n"));
        for h in &self.extra {
            out.push_str(&format!("{h}\r\n"));
        }
        if let Some(b) = body {
            out.push_str(&format!("content-length: {}\r\n\r\n", b.len()));
            let mut bytes = out.into_bytes();
            bytes.extend_from_slice(b);
            return bytes;
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    fn variant(&self, variant: &str, n: usize) -> Vec<u8> {
        match variant {
            "s1" => self.request(&format!("/bench/s1?i={n}"), None, n),
            "s3" => {
                let body = format!("{{\"symbol\":\"600000\",\"side\":\"buy\",\"qty\":{n}}}");
                self.request("/bench/s3", Some(body.as_bytes()), n)
            }
            v => panic!("unknown variant {v}"),
        }
    }
}

fn presign(args: &[String]) {
    let signer = Signer::from_args(args);
    let variant = need(args, "--variant");
    let count: usize = need(args, "--count").parse().unwrap();
    let mut out = std::io::BufWriter::new(std::fs::File::create(need(args, "--out")).unwrap());
    for n in 0..count {
        out.write_all(&signer.variant(&variant, n)).unwrap();
        out.write_all(&[0]).unwrap();
    }
    out.flush().unwrap();
}

fn load_requests(path: &str) -> Vec<Vec<u8>> {
    std::fs::read(path)
        .unwrap()
        .split(|b| *b == 0)
        .filter(|r| !r.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn connect(addr: &str, ca: &str) -> Tls {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_nodelay(true).unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// Reads one HTTP/1.1 response; returns its status. `buf` keeps bytes of the next response.
fn read_response(s: &mut Tls, buf: &mut Vec<u8>) -> u16 {
    let mut chunk = [0u8; 16384];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let total = end + 4 + len;
            while buf.len() < total {
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0, "connection closed mid-response");
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..total);
            return status;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Open loop: request i is due at t0 + i/rate whatever happened before; its latency counts
/// from that due time, so a stall shows in the percentiles instead of hiding (CO-corrected).
fn open(args: &[String]) {
    let addr = need(args, "--addr");
    let ca = need(args, "--ca");
    let rate: f64 = need(args, "--rate").parse().unwrap();
    let seconds: f64 = need(args, "--seconds").parse().unwrap();
    let conns: usize = arg(args, "--connections").map_or(16, |c| c.parse().unwrap());
    let reqs = Arc::new(load_requests(&need(args, "--file")));
    let cycle = arg(args, "--cycle").is_some();
    let total = (rate * seconds) as usize;
    assert!(
        cycle || reqs.len() >= total,
        "need {total} pre-signed requests, have {}",
        reqs.len()
    );
    let streams: Vec<Tls> = (0..conns).map(|_| connect(&addr, &ca)).collect();
    let t0 = instant() + Duration::from_millis(200);
    let handles: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(k, mut s)| {
            let reqs = reqs.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(total / conns + 1);
                let mut bad = 0usize;
                let mut buf = Vec::new();
                let mut i = k;
                while i < total {
                    let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                    let now = instant();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    s.write_all(&reqs[i % reqs.len()]).unwrap();
                    if read_response(&mut s, &mut buf) != 200 {
                        bad += 1;
                    }
                    lat.push(instant().duration_since(due).as_micros() as u64);
                    i += conns;
                }
                (lat, bad)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total);
    let mut bad = 0;
    for h in handles {
        let (l, b) = h.join().unwrap();
        all.extend(l);
        bad += b;
    }
    let elapsed = instant().duration_since(t0).as_secs_f64();
    all.sort_unstable();
    println!(
        "{}",
        serde_json::json!({
            "requests": all.len(), "non_200": bad, "rate": rate, "achieved_rate": all.len() as f64 / elapsed,
            "p50_us": percentile(&all, 0.50), "p99_us": percentile(&all, 0.99),
            "p999_us": percentile(&all, 0.999), "max_us": all.last().copied().unwrap_or(0),
        })
    );
}

/// Closed loop over unique S1 requests, signed in chunks between sends.
fn flood(args: &[String]) {
    let signer = Signer::from_args(args);
    let addr = need(args, "--addr");
    let ca = need(args, "--ca");
    let count: usize = need(args, "--count").parse().unwrap();
    let chunk: usize = arg(args, "--chunk").map_or(50_000, |c| c.parse().unwrap());
    let conns: usize = arg(args, "--connections").map_or(8, |c| c.parse().unwrap());
    let mut statuses: std::collections::BTreeMap<u16, usize> = Default::default();
    let mut streams: Vec<Tls> = (0..conns).map(|_| connect(&addr, &ca)).collect();
    let mut sent = 0;
    let mut busy = Duration::ZERO;
    while sent < count {
        let n = chunk.min(count - sent);
        let reqs: Arc<Vec<Vec<u8>>> =
            Arc::new((sent..sent + n).map(|i| signer.variant("s1", i)).collect());
        let next = Arc::new(AtomicUsize::new(0));
        let started = instant();
        let handles: Vec<_> = streams
            .drain(..)
            .map(|mut s| {
                let reqs = reqs.clone();
                let next = next.clone();
                std::thread::spawn(move || {
                    let mut st: std::collections::BTreeMap<u16, usize> = Default::default();
                    let mut buf = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= reqs.len() {
                            break;
                        }
                        s.write_all(&reqs[i]).unwrap();
                        *st.entry(read_response(&mut s, &mut buf)).or_default() += 1;
                    }
                    (s, st)
                })
            })
            .collect();
        for h in handles {
            let (s, st) = h.join().unwrap();
            streams.push(s);
            for (k, v) in st {
                *statuses.entry(k).or_default() += v;
            }
        }
        busy += instant().duration_since(started);
        sent += n;
    }
    let by_status: serde_json::Map<String, serde_json::Value> = statuses
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
        .collect();
    println!(
        "{}",
        serde_json::json!({"requests": sent, "statuses": by_status, "seconds_sending": busy.as_secs_f64()})
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("presign") => presign(&args),
        Some("open") => open(&args),
        Some("flood") => flood(&args),
        _ => eprintln!("usage: apisec-loadgen presign|open|flood ..."),
    }
}
