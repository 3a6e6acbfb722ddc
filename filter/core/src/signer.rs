//! The client side of RFC 9421: builds `Signature-Input` / `Signature` for a request. The CLI's
//! `sign` command and the tests use it; the gateway only verifies.

use base64::Engine as _;

use crate::crypto;
use crate::error::Deny;
use crate::message::{signature_base, Request};
use crate::sf::{self, BareItem, InnerList, Item};

pub enum SigningKey {
    Hmac(Vec<u8>),
    P256(Box<p256::ecdsa::SigningKey>),
    /// HMAC-SM3 (DATA-5).
    HmacSm3(Vec<u8>),
    /// SM2 over SM3 (DATA-5), with the signer's distinguishing ID (`crypto::sm2_signing_key`).
    Sm2(Box<sm2::dsa::SigningKey>),
}

impl SigningKey {
    pub fn alg(&self) -> &'static str {
        match self {
            SigningKey::Hmac(_) => "hmac-sha256",
            SigningKey::P256(_) => "ecdsa-p256-sha256",
            SigningKey::HmacSm3(_) => "hmac-sm3",
            SigningKey::Sm2(_) => "sm2-sm3",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SignParams {
    pub label: String,
    pub components: Vec<String>,
    pub created: i64,
    pub expires: Option<i64>,
    pub nonce: Option<String>,
    pub keyid: String,
    /// Put `alg` into the parameters (optional in RFC 9421; the gateway checks it if present).
    pub include_alg: bool,
}

/// Returns (`Signature-Input` value, `Signature` value).
pub fn sign(req: &Request, p: &SignParams, key: &SigningKey) -> Result<(String, String), Deny> {
    let mut params = vec![("created", BareItem::Integer(p.created))];
    if let Some(e) = p.expires {
        params.push(("expires", BareItem::Integer(e)));
    }
    if let Some(n) = &p.nonce {
        params.push(("nonce", BareItem::String(n.into())));
    }
    params.push(("keyid", BareItem::String(p.keyid.as_str().into())));
    if p.include_alg {
        params.push(("alg", BareItem::String(key.alg().into())));
    }
    let items = p
        .components
        .iter()
        .map(|c| match c.split_once(";name=") {
            Some((n, v)) => Item {
                bare: BareItem::String(n.into()),
                params: vec![("name", BareItem::String(v.trim_matches('"').into()))],
            },
            None => Item {
                bare: BareItem::String(c.as_str().into()),
                params: vec![],
            },
        })
        .collect();
    let input = InnerList { items, params };
    let base = signature_base(req, &input, usize::MAX)?;
    let sig = match key {
        SigningKey::Hmac(k) => crypto::sign_hmac_sha256(k, base.as_bytes()),
        SigningKey::P256(k) => {
            use p256::ecdsa::signature::Signer;
            let s: p256::ecdsa::Signature = k.sign(base.as_bytes());
            s.to_bytes().to_vec()
        }
        SigningKey::HmacSm3(k) => crypto::sign_hmac_sm3(k, base.as_bytes()),
        SigningKey::Sm2(k) => crypto::sign_sm2_sm3(k, base.as_bytes()).ok_or_else(|| {
            Deny::new(
                crate::error::DenyReason::SignatureMalformed,
                "the SM2 key did not sign",
            )
        })?,
    };
    Ok((
        format!("{}={}", p.label, sf::serialize_inner_list(&input)),
        format!(
            "{}=:{}:",
            p.label,
            base64::engine::general_purpose::STANDARD.encode(sig)
        ),
    ))
}
