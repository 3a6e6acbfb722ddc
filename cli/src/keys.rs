//! `apisec keygen` (OPS-2): a new HMAC secret, or a P-256 or SM2 key pair written as PEM files
//! (the private one readable by its owner only).

use base64::Engine as _;

#[derive(clap::Subcommand)]
pub enum Keygen {
    /// Print a new App_Secret (base64, 32 bytes)
    Hmac,
    /// Write PREFIX.key.pem (private, PKCS#8, mode 0600) and PREFIX.pub.pem
    P256 {
        #[arg(long, value_name = "PREFIX")]
        out: String,
    },
    /// The same for an SM2 key (DATA-5; OpenSSL 3 reads both)
    Sm2 {
        #[arg(long, value_name = "PREFIX")]
        out: String,
    },
}

pub fn run(k: Keygen) -> Result<(), String> {
    match k {
        Keygen::Hmac => keygen_hmac(),
        Keygen::P256 { out } => keygen_p256(&out),
        Keygen::Sm2 { out } => keygen_sm2(&out),
    }
}

pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
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

pub(crate) fn keygen_p256(prefix: &str) -> Result<(), String> {
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

pub(crate) fn keygen_sm2(prefix: &str) -> Result<(), String> {
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

pub(crate) fn write_private(path: &str, data: &[u8]) -> Result<(), String> {
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
