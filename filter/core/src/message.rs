//! A host-independent view of an HTTP request, and the RFC 9421 signature base built from it
//! (section 2: derived components and header fields; section 2.5: the base itself).
//! Implements the message-integrity part of DATA-3 and DATA-4.

use std::borrow::Cow;

use crate::error::{Deny, DenyReason};
use crate::fields::form_decode;
use crate::sf::{self, BareItem, InnerList};

/// The HTTP methods an API in the inventory can have. A request with any other method matches
/// no API (`unknown_api`); the exact bytes the caller sent still go into the signature base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

impl Method {
    pub const ALL: [Method; 7] = [
        Method::Get,
        Method::Head,
        Method::Post,
        Method::Put,
        Method::Patch,
        Method::Delete,
        Method::Options,
    ];

    /// Methods are case-sensitive (RFC 9110 9.1): `get` is not `GET`.
    pub fn parse(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
        }
    }

    /// Safe methods (RFC 9110 9.2.1): they read and change nothing.
    pub fn is_safe(self) -> bool {
        matches!(self, Method::Get | Method::Head | Method::Options)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What Envoy established about the connection: the client IP it trusts (after its own
/// `xff_num_trusted_hops` rule) and the TLS state, including a verified peer certificate.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    pub client_ip: Option<std::net::IpAddr>,
    pub tls: bool,
    /// Hex SHA-256 of the verified client certificate (mTLS), lowercase.
    pub peer_cert_sha256: Option<String>,
    /// First URI SAN of the verified client certificate.
    pub peer_uri_san: Option<String>,
}

/// What the gateway knows of a request. Header names are lowercase (Envoy lowercases them);
/// repeated headers appear as repeated pairs, in arrival order.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub conn: Connection,
    pub method: String,
    pub scheme: String,
    pub authority: String,
    /// The request target as Envoy normalised it: path plus optional `?query`.
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
    /// The Envoy route's name, read only when the policy has per-route rules (routes.rs).
    pub route: Option<String>,
}

impl Request {
    pub fn path(&self) -> &str {
        match self.path_and_query.split_once('?') {
            Some((p, _)) => p,
            None => &self.path_and_query,
        }
    }

    pub fn query(&self) -> Option<&str> {
        self.path_and_query.split_once('?').map(|(_, q)| q)
    }

    /// All values of a header, in order.
    pub fn header_values<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.headers
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The single value of a header that must not repeat; a repeat is an ambiguity and refused.
    pub fn unique_header(&self, name: &str) -> Result<Option<&str>, Deny> {
        let mut it = self.header_values(name);
        let first = it.next();
        if it.next().is_some() {
            return Err(Deny::new(
                DenyReason::DuplicateHeader,
                format!("{name} sent more than once"),
            ));
        }
        Ok(first)
    }

    /// RFC 9421 section 2.1: values trimmed, repeated fields joined with ", ".
    fn field_value(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut out: Option<Cow<'_, str>> = None;
        for v in self.header_values(name) {
            let v = v.trim_matches([' ', '\t']);
            match &mut out {
                // one field line, the common case: its text as it is
                None => out = Some(Cow::Borrowed(v)),
                Some(s) => {
                    let s = s.to_mut();
                    s.push_str(", ");
                    s.push_str(v);
                }
            }
        }
        out
    }

    /// RFC 9421 section 2.2.3: lowercase host, default port removed.
    fn authority_normalised(&self) -> Cow<'_, str> {
        let default_port = match self.scheme.as_str() {
            "http" => Some(":80"),
            "https" => Some(":443"),
            _ => None,
        };
        // the port is digits: stripped before lowercasing, as after
        let a = self.authority.as_str();
        let a = default_port.and_then(|p| a.strip_suffix(p)).unwrap_or(a);
        if a.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(a.to_ascii_lowercase())
        } else {
            Cow::Borrowed(a)
        }
    }
}

/// The IP part of Envoy's `source.address` (`1.2.3.4:5678` or `[::1]:5678`).
pub fn ip_of_address(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(ip, _)| ip);
    }
    match addr.rsplit_once(':') {
        Some((ip, port)) if !ip.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => ip,
        _ => addr,
    }
}

/// RFC 9421 section 2.2.8: re-encode with the form-urlencoded percent-encode set, space as %20.
fn query_param_encode(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(bytes.len());
    for &c in bytes {
        if c.is_ascii_alphanumeric() || b"*-._".contains(&c) {
            out.push(c as char);
        } else {
            out.push('%');
            out.push(
                HEX.get(usize::from(c >> 4))
                    .copied()
                    .map_or('0', char::from),
            );
            out.push(
                HEX.get(usize::from(c & 15))
                    .copied()
                    .map_or('0', char::from),
            );
        }
    }
    out
}

/// One covered component's identifier and value(s), as they go into the base.
fn component_lines(
    req: &Request,
    item: &sf::Item,
    ident: &str,
    lines: &mut String,
) -> Result<(), Deny> {
    let BareItem::String(name) = &item.bare else {
        return Err(Deny::new(
            DenyReason::SignatureMalformed,
            "covered component is not a string",
        ));
    };
    let missing = |what: &str| Deny::new(DenyReason::ComponentMissing, format!("{name}: {what}"));

    let allowed_params: &[&str] = if name == "@query-param" {
        &["name"]
    } else {
        &[]
    };
    if let Some((k, _)) = item
        .params
        .iter()
        .find(|(k, _)| !allowed_params.contains(k))
    {
        return Err(missing(&format!(
            "component parameter ;{k} is not supported"
        )));
    }

    let mut push = |prefix: &str, value: &str| {
        lines.push_str(ident);
        lines.push_str(": ");
        lines.push_str(prefix);
        lines.push_str(value);
        lines.push('\n');
    };
    match name.as_ref() {
        "@method" => push("", &req.method),
        "@scheme" => push("", &req.scheme.to_ascii_lowercase()),
        "@authority" => push("", &req.authority_normalised()),
        "@target-uri" => push(
            "",
            &format!(
                "{}://{}{}",
                req.scheme.to_ascii_lowercase(),
                req.authority_normalised(),
                req.path_and_query
            ),
        ),
        "@request-target" => push("", &req.path_and_query),
        "@path" => {
            let p = req.path();
            push("", if p.is_empty() { "/" } else { p })
        }
        "@query" => push("?", req.query().unwrap_or("")),
        "@query-param" => {
            let Some(BareItem::String(want)) = sf::param(&item.params, "name") else {
                return Err(missing("needs a name parameter"));
            };
            let mut found = false;
            for pair in req
                .query()
                .unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
            {
                let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
                if query_param_encode(&form_decode(n.as_bytes())) == *want {
                    push("", &query_param_encode(&form_decode(v.as_bytes())));
                    found = true;
                }
            }
            if !found {
                return Err(missing("query parameter not present"));
            }
        }
        "@signature-params" | "@status" | "@request-response" => {
            return Err(missing("not allowed in a request signature"))
        }
        n if n.starts_with('@') => return Err(missing("unknown derived component")),
        n => {
            if n.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(Deny::new(
                    DenyReason::SignatureMalformed,
                    "header component names must be lowercase",
                ));
            }
            match req.field_value(n) {
                Some(v) => push("", &v),
                None => return Err(missing("header not present")),
            }
        }
    }
    Ok(())
}

/// Builds the RFC 9421 signature base for the covered components and parameters of one
/// signature. The `@signature-params` line re-serialises the inner list canonically.
/// At most `max_bytes` are built: a request cannot make the gateway build an unbounded base
/// (issue 8, hole 8).
pub fn signature_base(req: &Request, input: &InnerList, max_bytes: usize) -> Result<String, Deny> {
    let mut base = String::with_capacity(256);
    // each component's identifier, serialised once into one buffer; `seen` holds where
    let mut idents = String::with_capacity(128);
    let mut seen: Vec<std::ops::Range<usize>> = Vec::with_capacity(input.items.len());
    for item in &input.items {
        let start = idents.len();
        sf::serialize_item(&mut idents, item);
        let ident = idents.get(start..).unwrap_or_default();
        if seen.iter().any(|r| idents.get(r.clone()) == Some(ident)) {
            return Err(Deny::new(
                DenyReason::SignatureMalformed,
                format!("component {ident} covered twice"),
            ));
        }
        component_lines(req, item, ident, &mut base)?;
        seen.push(start..idents.len());
        if base.len() > max_bytes {
            return Err(Deny::new(
                DenyReason::SignatureTooComplex,
                format!("signature base over {max_bytes} bytes"),
            ));
        }
    }
    // `@signature-params`: the inner list canonically, from the identifiers serialised above
    base.push_str("\"@signature-params\": (");
    for (i, r) in seen.iter().enumerate() {
        if i > 0 {
            base.push(' ');
        }
        base.push_str(idents.get(r.clone()).unwrap_or_default());
    }
    base.push(')');
    sf::serialize_params(&mut base, &input.params);
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn rfc_request() -> Request {
        Request {
            conn: Default::default(),
            method: "POST".into(),
            scheme: "https".into(),
            authority: "example.com".into(),
            path_and_query: "/foo?param=Value&Pet=dog".into(),
            headers: vec![
                ("host".into(), "example.com".into()),
                ("date".into(), "Tue, 20 Apr 2021 02:07:55 GMT".into()),
                ("content-type".into(), "application/json".into()),
                (
                    "content-digest".into(),
                    "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:".into(),
                ),
                ("content-length".into(), "18".into()),
            ],
            route: None,
        }
    }

    fn input(s: &str) -> InnerList<'_> {
        match sf::parse_dictionary(s).unwrap().remove(0).1 {
            sf::Member::InnerList(l) => l,
            sf::Member::Item(_) => panic!("not an inner list"),
        }
    }

    /// A component covered twice is refused (RFC 9421 2.5: each at most once), also when the
    /// two differ only in how they were written; the same name with another parameter is not
    /// the same component.
    #[test]
    fn a_component_covered_twice_is_refused() {
        let mut req = rfc_request();
        req.path_and_query = "/foo?a=1&b=2".into();
        for twice in [
            r#"s=("@method" "@path" "@method")"#,
            r#"s=("@query-param";name="a" "@query-param";name="a")"#,
            r#"s=("content-type" "date" "content-type")"#,
        ] {
            let e = signature_base(&req, &input(twice), usize::MAX).unwrap_err();
            assert_eq!(e.reason, DenyReason::SignatureMalformed, "{twice}");
            assert!(e.detail.contains("covered twice"), "{twice}: {}", e.detail);
        }
        let base = signature_base(
            &req,
            &input(r#"s=("@query-param";name="a" "@query-param";name="b")"#),
            usize::MAX,
        )
        .unwrap();
        assert!(
            base.starts_with("\"@query-param\";name=\"a\": 1\n\"@query-param\";name=\"b\": 2\n")
        );
    }

    /// RFC 9421 Appendix B.2.5, exact bytes.
    #[test]
    fn rfc9421_b25_signature_base() {
        let base = signature_base(
            &rfc_request(),
            &input(r#"sig-b25=("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret""#), usize::MAX,
        )
        .unwrap();
        assert_eq!(
            base,
            "\"date\": Tue, 20 Apr 2021 02:07:55 GMT\n\"@authority\": example.com\n\"content-type\": application/json\n\"@signature-params\": (\"date\" \"@authority\" \"content-type\");created=1618884473;keyid=\"test-shared-secret\""
        );
    }

    /// RFC 9421 Appendix B.2.2 (covered components; the RSA signature itself is not usable here).
    #[test]
    fn rfc9421_b22_signature_base() {
        let base = signature_base(
            &rfc_request(),
            &input(r#"sig-b22=("@authority" "content-digest" "@query-param";name="Pet");created=1618884473;keyid="test-key-rsa-pss";tag="header-example""#), usize::MAX,
        )
        .unwrap();
        assert_eq!(
            base,
            "\"@authority\": example.com\n\"content-digest\": sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:\n\"@query-param\";name=\"Pet\": dog\n\"@signature-params\": (\"@authority\" \"content-digest\" \"@query-param\";name=\"Pet\");created=1618884473;keyid=\"test-key-rsa-pss\";tag=\"header-example\""
        );
    }

    /// RFC 9421 section 2.2 examples for each derived component.
    #[test]
    fn derived_components() {
        let req = Request {
            conn: Default::default(),
            method: "POST".into(),
            scheme: "https".into(),
            authority: "WWW.Example.com:443".into(),
            path_and_query: "/path?param=value&foo=bar&baz=batman&qux=".into(),
            headers: vec![],
            route: None,
        };
        let base = signature_base(
            &req,
            &input(r#"s=("@method" "@target-uri" "@authority" "@scheme" "@request-target" "@path" "@query" "@query-param";name="qux")"#), usize::MAX,
        )
        .unwrap();
        assert_eq!(
            base,
            "\"@method\": POST\n\"@target-uri\": https://www.example.com/path?param=value&foo=bar&baz=batman&qux=\n\"@authority\": www.example.com\n\"@scheme\": https\n\"@request-target\": /path?param=value&foo=bar&baz=batman&qux=\n\"@path\": /path\n\"@query\": ?param=value&foo=bar&baz=batman&qux=\n\"@query-param\";name=\"qux\": \n\"@signature-params\": (\"@method\" \"@target-uri\" \"@authority\" \"@scheme\" \"@request-target\" \"@path\" \"@query\" \"@query-param\";name=\"qux\")"
        );
    }

    /// RFC 9421 section 2.2.8 re-encoding example.
    #[test]
    fn query_param_reencoding() {
        let req = Request {
            path_and_query: "/p?var=this%20is%20a%20big%0Avalue&bar=with+plus+whitespace&fa%C3%A7ade%22%3A%20=something".into(),
            ..Default::default()
        };
        let base = signature_base(
            &req,
            &input(r#"s=("@query-param";name="var" "@query-param";name="bar" "@query-param";name="fa%C3%A7ade%22%3A%20")"#), usize::MAX,
        )
        .unwrap();
        assert!(base.starts_with(
            "\"@query-param\";name=\"var\": this%20is%20a%20big%0Avalue\n\"@query-param\";name=\"bar\": with%20plus%20whitespace\n\"@query-param\";name=\"fa%C3%A7ade%22%3A%20\": something\n"
        ), "{base}");
    }

    /// RFC 9421 section 2.2.3, each way the authority can come: lowercased only when it has
    /// an uppercase letter, the default port of the scheme removed and any other kept.
    #[test]
    fn authority_forms() {
        for (scheme, sent, want) in [
            ("https", "api.example.com", "api.example.com"),
            ("https", "api.example.com:443", "api.example.com"),
            ("https", "API.Example.com:443", "api.example.com"),
            ("https", "api.example.com:8443", "api.example.com:8443"),
            ("http", "Api.Example.COM:80", "api.example.com"),
            ("http", "api.example.com:443", "api.example.com:443"),
            ("https", "[2001:DB8::1]:443", "[2001:db8::1]"),
        ] {
            let req = Request {
                scheme: scheme.into(),
                authority: sent.into(),
                ..Default::default()
            };
            assert_eq!(req.authority_normalised(), want, "{scheme} {sent}");
        }
    }

    #[test]
    fn ip_of_address_forms() {
        assert_eq!(ip_of_address("10.1.2.3:443"), "10.1.2.3");
        assert_eq!(ip_of_address("[2001:db8::1]:443"), "2001:db8::1");
        assert_eq!(ip_of_address("2001:db8::1"), "2001:db8::1");
        assert_eq!(ip_of_address("127.0.0.1"), "127.0.0.1");
    }

    #[test]
    fn empty_query_and_repeated_headers() {
        let req = Request {
            path_and_query: "/p".into(),
            headers: vec![("x-a".into(), " one ".into()), ("x-a".into(), "two".into())],
            ..Default::default()
        };
        let base = signature_base(&req, &input(r#"s=("@query" "x-a")"#), usize::MAX).unwrap();
        assert!(
            base.starts_with("\"@query\": ?\n\"x-a\": one, two\n"),
            "{base}"
        );
    }

    #[test]
    fn refusals() {
        let req = rfc_request();
        for (s, reason) in [
            (r#"s=("x-missing")"#, DenyReason::ComponentMissing),
            (
                r#"s=("@query-param";name="nope")"#,
                DenyReason::ComponentMissing,
            ),
            (r#"s=("@query-param")"#, DenyReason::ComponentMissing),
            (r#"s=("@status")"#, DenyReason::ComponentMissing),
            (r#"s=("@bogus")"#, DenyReason::ComponentMissing),
            (r#"s=("date";sf)"#, DenyReason::ComponentMissing),
            (r#"s=("date" "date")"#, DenyReason::SignatureMalformed),
            (r#"s=("Date")"#, DenyReason::SignatureMalformed),
            (r#"s=(date)"#, DenyReason::SignatureMalformed),
        ] {
            assert_eq!(
                signature_base(&req, &input(s), usize::MAX,)
                    .unwrap_err()
                    .reason,
                reason,
                "{s}"
            );
        }
    }
}
