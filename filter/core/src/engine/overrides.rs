//! Headers and parameters that would let a backend read another request than the one checked:
//! the gateway's own `x-apisec-*` headers, routing overrides (method, URL, forwarding
//! headers) and a form body's `_method` (ATK-2).

use super::*;

/// Client-sent headers some backends and frameworks obey to change the method or the path the
/// gateway checked: stripped before the upstream, or refused (`gateway.override_headers`).
pub const OVERRIDE_HEADERS: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-method",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-override-url",
    // forwarding headers a backend or framework builds its idea of the URL from (issue 21
    // item 5); Envoy itself rewrites x-forwarded-for and x-forwarded-proto
    "x-forwarded-prefix",
    "x-forwarded-path",
    "x-forwarded-host",
    "x-forwarded-uri",
    "x-forwarded-port",
    "x-forwarded-server",
    "x-original-host",
    "forwarded",
];
/// The query or form parameter some frameworks read as the method; it cannot be stripped
/// without changing the signed request, so it is refused.
pub(super) const METHOD_OVERRIDE_PARAM: &str = "_method";

pub fn is_internal_header(name: &str) -> bool {
    name.len() >= INTERNAL_HEADER_PREFIX.len()
        && name
            .get(..INTERNAL_HEADER_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(INTERNAL_HEADER_PREFIX))
}

pub(super) fn is_override_header(name: &str) -> bool {
    OVERRIDE_HEADERS
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
}

/// Whether a client-sent header is removed before the request goes upstream: the gateway's
/// own `x-apisec-*` always, routing overrides when the policy strips them.
pub fn strips_header(policy: &Policy, name: &str) -> bool {
    is_internal_header(name)
        || (policy.override_headers == OverrideMode::Strip && is_override_header(name))
}

/// Routing overrides (issue 8, hole 9): refused when the policy says so; `_method` always,
/// since it is part of the signed request and cannot be stripped.
pub(super) fn check_overrides(policy: &Policy, req: &Request) -> Result<(), Deny> {
    if policy.override_headers == OverrideMode::Refuse {
        if let Some((name, _)) = req.headers.iter().find(|(n, _)| is_override_header(n)) {
            return Err(Deny::new(
                DenyReason::OverrideNotAllowed,
                format!("routing override header {name} is not accepted"),
            ));
        }
    }
    let overrides_method = req.query().is_some_and(|q| {
        fields::form_keys(q.as_bytes()).any(|key| {
            fields::fold(&String::from_utf8_lossy(&fields::form_decode(key)))
                == METHOD_OVERRIDE_PARAM
        })
    });
    if overrides_method {
        return Err(Deny::new(
            DenyReason::OverrideNotAllowed,
            "the _method query parameter overrides the method",
        ));
    }
    Ok(())
}

/// Whether a request's body is a form (URL-encoded or multipart), which some frameworks read
/// `_method` from: such a body is held and looked at, at every level.
pub fn has_form_body(req: &Request) -> bool {
    req.header_values("content-type").any(|ct| {
        let media = ct.split(';').next().unwrap_or("").trim();
        media.eq_ignore_ascii_case("application/x-www-form-urlencoded")
            || media.eq_ignore_ascii_case("multipart/form-data")
    })
}

/// `_method` in a form body (issue 21 item 5, ATK-1): Rails, Laravel and Express's
/// method-override read it from URL-encoded and multipart bodies as well as the query. It is
/// part of the signed body, so it cannot be stripped: refused.
pub(super) fn check_form_override(req: &Request, body: &[u8]) -> Result<(), Deny> {
    if body.is_empty() || !has_form_body(req) {
        return Ok(());
    }
    let urlencoded = fields::form_keys(body).any(|key| {
        fields::fold(String::from_utf8_lossy(&fields::form_decode(key)).trim())
            == METHOD_OVERRIDE_PARAM
    });
    // a multipart part named _method, in any case and quoting
    let lower = body.to_ascii_lowercase();
    let multipart = [&b"name=\"_method\""[..], b"name=_method", b"name='_method'"]
        .iter()
        .any(|needle| lower.windows(needle.len()).any(|w| w == *needle));
    if urlencoded || multipart {
        return Err(Deny::new(
            DenyReason::OverrideNotAllowed,
            "a _method form field overrides the method",
        ));
    }
    Ok(())
}
