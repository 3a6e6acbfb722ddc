//! Who the caller is (ID-1..ID-3): its app's credential, its RFC 9421 signature and the
//! signature's parameters (freshness, nonce, covered components; DATA-3, DATA-4, ATK-1).

use super::*;

pub(super) fn single_member<'a, 's>(
    header: &str,
    dict: &'a [(&'s str, Member<'s>)],
) -> Result<(&'s str, &'a Member<'s>), Deny> {
    match dict {
        [(label, m)] => Ok((label, m)),
        _ => Err(Deny::new(
            DenyReason::SignatureAmbiguous,
            format!(
                "{header} carries {} signatures; exactly one is verified",
                dict.len()
            ),
        )),
    }
}

/// Is `component` covered, directly or by an equivalent that includes it?
pub(crate) fn covers(covered: &[&str], component: &str) -> bool {
    if covered.contains(&component) {
        return true;
    }
    match component {
        "@path" | "@query" => {
            covered.contains(&"@target-uri") || covered.contains(&"@request-target")
        }
        "@authority" => covered.contains(&"@target-uri"),
        _ => false,
    }
}

/// ID-2, ID-3, DATA-2..DATA-4: S1 and above need TLS, then the app's client certificate or its
/// signature; S2 and S3 accept only a certificate or a key pair; S3 always needs the signature
/// (evidence). A certificate bound to another app is refused outright.
#[allow(clippy::too_many_arguments)]
pub(super) fn authenticate(
    policy: &Policy,
    req: &Request,
    app: &App,
    api: &Api,
    has_body: bool,
    now: u64,
    verifier: &dyn EcdsaVerifier,
    ctx: &mut RequestContext,
) -> Result<(), Deny> {
    if !req.conn.tls {
        return Err(Deny::new(
            DenyReason::TlsRequired,
            format!("{} APIs are served over TLS only", api.level.as_str()),
        ));
    }
    let (cert_sha, cert_uri) = (
        req.conn.peer_cert_sha256.as_deref(),
        req.conn.peer_uri_san.as_deref(),
    );
    let bound = app
        .certificates
        .iter()
        .find(|b| b.binding.matches(cert_sha, cert_uri));
    if (cert_sha.is_some() || cert_uri.is_some()) && bound.is_none() {
        return Err(Deny::new(
            DenyReason::CertificateMismatch,
            format!("the client certificate is not bound to app {}", app.id),
        ));
    }
    if let Some(b) = bound {
        crate::apps::check_validity(&b.validity, &b.keyid, now)?;
    }
    let cert_ok = bound.is_some();
    let sig_input = req.unique_header("signature-input")?;
    let sig = req.unique_header("signature")?;
    match (sig_input, sig) {
        (Some(input), Some(sig)) => {
            let user_covered = verify_signature(
                policy, req, app, api, has_body, now, verifier, input, sig, ctx,
            )?;
            ctx.auth = Some(if cert_ok {
                AuthKind::CertificateAndSignature
            } else {
                AuthKind::Signature
            });
            let user = req.unique_header(USER_HEADER)?;
            if user.is_some() && !user_covered {
                return Err(Deny::new(
                    DenyReason::ComponentNotCovered,
                    "x-user-id counts only when the signature covers it",
                ));
            }
            ctx.user = user.map(str::to_string);
            Ok(())
        }
        _ if cert_ok && api.national => Err(Deny::new(
            DenyReason::NationalAlgorithmRequired,
            "a client certificate alone (TLS by Envoy's BoringSSL) is not a national algorithm: \
             sign with hmac-sm3 or sm2-sm3",
        )),
        _ if cert_ok && api.level < SecurityLevel::S3 => {
            // The whole channel is the app's: its user claim is as authentic as the request.
            ctx.auth = Some(AuthKind::Certificate);
            ctx.user = req.unique_header(USER_HEADER)?.map(str::to_string);
            // A write has no signature nonce; its Idempotency-Key is checked like one, so a
            // duplicated write is not executed twice (issue 8, hole 13; ATK-1).
            if !Method::parse(&req.method).is_some_and(Method::is_safe) {
                let key = req.unique_header(IDEMPOTENCY_HEADER)?.ok_or_else(|| {
                    Deny::new(
                        DenyReason::IdempotencyKeyMissing,
                        "a certificate-only write needs an Idempotency-Key",
                    )
                })?;
                if key.is_empty()
                    || key.len() > MAX_NONCE_LEN
                    || !key.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(Deny::new(
                        DenyReason::IdempotencyKeyMissing,
                        "Idempotency-Key is empty, longer than 128 or not printable",
                    ));
                }
                ctx.nonce = Some(format!("\0idempotency\0{key}"));
                ctx.idempotency = true;
                ctx.created = Some(now);
            }
            Ok(())
        }
        _ => Err(Deny::new(
            DenyReason::SignatureMissing,
            if cert_ok {
                "S3 requires a signature even with a client certificate (DATA-4)".to_string()
            } else {
                format!(
                    "{} requires an RFC 9421 signature or the app's client certificate",
                    api.level.as_str()
                )
            },
        )),
    }
}

/// Verifies the one RFC 9421 signature; returns whether it covers `x-user-id`.
#[allow(clippy::too_many_arguments)]
pub(super) fn verify_signature(
    policy: &Policy,
    req: &Request,
    app: &App,
    api: &Api,
    has_body: bool,
    now: u64,
    verifier: &dyn EcdsaVerifier,
    sig_input: &str,
    sig: &str,
    ctx: &mut RequestContext,
) -> Result<bool, Deny> {
    let digest_owned = ctx.content_digest.clone();
    let digest = digest_owned.as_deref();
    if sig_input.len() + sig.len() > policy.max_signature_header_bytes as usize {
        return Err(Deny::new(
            DenyReason::HeaderTooLarge,
            "signature headers too large",
        ));
    }
    let malformed = |what: &str, e: sf::SfError| {
        Deny::new(DenyReason::SignatureMalformed, format!("{what}: {e}"))
    };
    let inputs = sf::parse_dictionary(sig_input).map_err(|e| malformed("signature-input", e))?;
    let sigs = sf::parse_dictionary(sig).map_err(|e| malformed("signature", e))?;
    let (label, input, signature_bytes) = the_signature(&inputs, &sigs)?;

    check_params(policy, input, now, ctx)?;
    let keyid = ctx.keyid.clone().unwrap_or_default();
    let cred = credential(app, api, input, &keyid)?;
    crate::apps::check_validity(&cred.validity, &keyid, now)?;
    let covered = coverage(policy, req, api, input, has_body, digest)?;
    if let (true, Some(d)) = (api.national, digest) {
        if !crypto::digest_has(d, "sm3") {
            return Err(Deny::new(
                DenyReason::NationalAlgorithmRequired,
                "content-digest has no sm3 member",
            ));
        }
    }

    let base = signature_base(req, input, policy.max_signature_base_bytes)?;
    // The credential's algorithm decides the check: one algorithm's key never verifies
    // another's signature (the signature's own `alg`, if any, was matched to it above).
    let ok = match &cred.key {
        KeyMaterial::Hmac(key) if cred.alg == crate::apps::Algorithm::HmacSm3 => {
            crypto::verify_hmac_sm3(key.bytes(), base.as_bytes(), signature_bytes)
        }
        KeyMaterial::Hmac(key) => key.sha256().verify(base.as_bytes(), signature_bytes),
        KeyMaterial::Sm2 { spki_der, id, .. } => {
            crypto::verify_sm2_sm3(spki_der, id, base.as_bytes(), signature_bytes)
        }
        KeyMaterial::P256 { spki_der, .. } => verifier
            .verify_p256_sha256(spki_der, base.as_bytes(), signature_bytes)
            .map_err(|e| Deny::new(DenyReason::HostUnavailable, format!("ecdsa verifier: {e}")))?,
    };
    if !ok {
        if app.onboarding {
            ctx.onboarding_base = Some(base);
        }
        return Err(Deny::new(
            DenyReason::SignatureInvalid,
            format!("signature {label} by {keyid} does not verify"),
        ));
    }
    if api.level == SecurityLevel::S3 {
        ctx.evidence = Some(evidence_of(
            policy, cred, &keyid, sig_input, sig, base, digest,
        ));
    }
    Ok(covered.contains(&USER_HEADER))
}

/// The one signature a request carries: its label, its covered components with their
/// parameters, and its bytes.
fn the_signature<'d, 's>(
    inputs: &'d [(&'s str, Member<'s>)],
    sigs: &'d [(&'s str, Member<'s>)],
) -> Result<(&'s str, &'d InnerList<'s>, &'d [u8]), Deny> {
    let (label, input_member) = single_member("signature-input", inputs)?;
    let (sig_label, sig_member) = single_member("signature", sigs)?;
    if label != sig_label {
        return Err(Deny::new(
            DenyReason::SignatureMalformed,
            "signature and signature-input labels differ",
        ));
    }
    let Member::InnerList(input) = input_member else {
        return Err(Deny::new(
            DenyReason::SignatureMalformed,
            "signature-input member is not an inner list",
        ));
    };
    match sig_member {
        Member::Item(sf::Item {
            bare: BareItem::ByteSeq(b),
            ..
        }) => Ok((label, input, b)),
        _ => Err(Deny::new(
            DenyReason::SignatureMalformed,
            "signature member is not a byte sequence",
        )),
    }
}

/// The app's credential named by `keyid`, of the algorithm the signature says (if it says
/// one) and strong enough for the API's level (ID-3).
fn credential<'a>(
    app: &'a App,
    api: &Api,
    input: &InnerList,
    keyid: &str,
) -> Result<&'a crate::apps::Credential, Deny> {
    let cred = app.credential(keyid).ok_or_else(|| {
        Deny::new(
            DenyReason::UnknownKey,
            format!("keyid {keyid:?} is not a credential of {}", app.id),
        )
    })?;
    if let Some(BareItem::String(alg)) = sf::param(&input.params, "alg") {
        if alg != cred.alg.as_str() {
            return Err(Deny::new(
                DenyReason::AlgMismatch,
                format!(
                    "alg {alg:?} but credential {keyid} is {}",
                    cred.alg.as_str()
                ),
            ));
        }
    }
    if api.national && !cred.alg.national() {
        return Err(Deny::new(
            DenyReason::NationalAlgorithmRequired,
            format!(
                "API {} takes the national algorithms only; credential {keyid} is {}",
                api.id,
                cred.alg.as_str()
            ),
        ));
    }
    if !cred.alg.allowed_for(api.level) {
        return Err(Deny::new(
            DenyReason::CredentialNotAllowed,
            format!(
                "{} credentials cannot call {} APIs",
                cred.alg.as_str(),
                api.level.as_str()
            ),
        ));
    }
    Ok(cred)
}

/// The covered components, checked: not too many, every one the policy requires, the session
/// headers a call presents, and `content-digest` whenever there is a body or a digest (DATA-3).
fn coverage<'i>(
    policy: &Policy,
    req: &Request,
    api: &Api,
    input: &'i InnerList<'_>,
    has_body: bool,
    digest: Option<&str>,
) -> Result<Vec<&'i str>, Deny> {
    if input.items.len() > policy.max_covered_components {
        return Err(Deny::new(
            DenyReason::SignatureTooComplex,
            format!(
                "{} covered components, at most {}",
                input.items.len(),
                policy.max_covered_components
            ),
        ));
    }
    let covered: Vec<&str> = input
        .items
        .iter()
        .filter_map(|i| match &i.bare {
            BareItem::String(s) => Some(s.as_ref()),
            _ => None,
        })
        .collect();
    // A call presenting a session signs it: the session headers it sends must be covered
    // (their absence is `session_required`, decided after authentication).
    let session_headers: Vec<&str> = if presents_session(policy, api) {
        [sessions::SESSION_HEADER, sessions::MAC_HEADER]
            .into_iter()
            .filter(|h| req.header_values(h).next().is_some())
            .collect()
    } else {
        Vec::new()
    };
    for required in policy
        .required_components
        .iter()
        .map(String::as_str)
        .chain(session_headers.iter().copied())
    {
        if !covers(&covered, required) {
            return Err(Deny::new(
                DenyReason::ComponentNotCovered,
                format!("{required} is not covered"),
            ));
        }
    }
    if has_body && digest.is_none() {
        return Err(Deny::new(
            DenyReason::DigestMissing,
            "a request with a body needs content-digest",
        ));
    }
    if digest.is_some() && !covered.contains(&"content-digest") {
        return Err(Deny::new(
            DenyReason::ComponentNotCovered,
            "content-digest is not covered",
        ));
    }
    Ok(covered)
}

/// What an S3 request leaves in its audit record so that its signature can be verified again
/// later (LOG-5): the headers, the base (with a session ID sealed) and the key's fingerprint.
fn evidence_of(
    policy: &Policy,
    cred: &crate::apps::Credential,
    keyid: &str,
    sig_input: &str,
    sig: &str,
    base: String,
    digest: Option<&str>,
) -> Evidence {
    // the session ID the signature covers stays out of the log (issue 21 item 6); a base
    // that covers none is logged as signed, and not hashed
    let (base, signature_base_sha256, session_sealed) =
        match evidence::seal_session(policy.audit.key.as_ref(), &base) {
            Some(s) => (s.logged, Some(s.original_sha256), s.sealed),
            None => (base, None, None),
        };
    Evidence {
        keyid: keyid.to_string(),
        alg: cred.alg.as_str(),
        signature_input: sig_input.to_string(),
        signature: sig.to_string(),
        signature_base_sha256,
        signature_base: base,
        session_sealed,
        content_digest: digest.map(str::to_string),
        key_sha256: cred.key.fingerprint().map(str::to_string),
    }
}

pub(super) fn check_params(
    policy: &Policy,
    input: &InnerList,
    now: u64,
    ctx: &mut RequestContext,
) -> Result<(), Deny> {
    let bad = |what: &str| Deny::new(DenyReason::SignatureMalformed, what.to_string());
    let created = match sf::param(&input.params, "created") {
        None => {
            return Err(Deny::new(
                DenyReason::CreatedMissing,
                "no created parameter",
            ))
        }
        Some(BareItem::Integer(c)) if *c >= 0 => *c as u64,
        Some(_) => return Err(bad("created is not a non-negative integer")),
    };
    ctx.created = Some(created);
    let skew = policy.clock_skew_seconds;
    if created.saturating_add(skew) < now {
        return Err(Deny::new(
            DenyReason::CreatedTooOld,
            format!("created {created}, now {now}, skew {skew}"),
        ));
    }
    if created > now.saturating_add(skew) {
        return Err(Deny::new(
            DenyReason::CreatedInFuture,
            format!("created {created}, now {now}, skew {skew}"),
        ));
    }
    match sf::param(&input.params, "expires") {
        None => {}
        Some(BareItem::Integer(e)) if *e < 0 || (*e as u64) <= now => {
            return Err(Deny::new(
                DenyReason::SignatureExpired,
                format!("expires {e}, now {now}"),
            ));
        }
        Some(BareItem::Integer(e)) => ctx.expires = Some(*e as u64),
        Some(_) => return Err(bad("expires is not an integer")),
    }
    match sf::param(&input.params, "nonce") {
        Some(BareItem::String(n)) if !n.is_empty() && n.len() <= MAX_NONCE_LEN => {
            ctx.nonce = Some(n.to_string())
        }
        Some(BareItem::String(_)) => {
            return Err(Deny::new(
                DenyReason::NonceMissing,
                "nonce empty or longer than 128",
            ))
        }
        None => return Err(Deny::new(DenyReason::NonceMissing, "no nonce parameter")),
        Some(_) => return Err(bad("nonce is not a string")),
    }
    match sf::param(&input.params, "keyid") {
        Some(BareItem::String(k)) => ctx.keyid = Some(k.to_string()),
        None => return Err(Deny::new(DenyReason::UnknownKey, "no keyid parameter")),
        Some(_) => return Err(bad("keyid is not a string")),
    }
    match sf::param(&input.params, "alg") {
        None | Some(BareItem::String(_)) => Ok(()),
        Some(_) => Err(bad("alg is not a string")),
    }
}
