//! Field permissions (PERM-1, field dimension): the request fields a grant forbids and the
//! response fields it hides, for every way a backend can read a field.
//!
//! - A forbidden field is looked for in the query string and in the body *as its declared
//!   content type*: JSON (`application/json`, `*/*+json`) and form (`x-www-form-urlencoded`)
//!   bodies are read; any other type, a missing type, a charset other than UTF-8 or a
//!   `content-encoding` is refused on a restricted API, since the gateway cannot see what the
//!   backend will decode.
//! - Names match without regard to case (Unicode case folding), so `Margin_Override` is
//!   `margin_override`; every member is examined, so a duplicate key cannot hide behind
//!   another; form keys in bracket form (`order[price]`) are paths (`order.price`).
//! - Hidden response fields are removed from the JSON text itself: every byte outside the
//!   removed members passes unchanged (numbers, decimals, key order, spacing).

use crate::error::{Deny, DenyReason};

/// Deepest JSON nesting the gateway reads; deeper documents are refused, never half-read.
pub const MAX_DEPTH: usize = 64;

/// The case-insensitive normal form of a field name: every character upper- then lowercased
/// (so `ſ` and `s`, `K` (Kelvin) and `k` meet, as they do in case-insensitive binders).
pub fn fold(name: &str) -> String {
    name.chars()
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
        .collect()
}

/// The one normal form of a field name, as backends bind names: case folded, and `_`, `-` and
/// white space dropped, so `margin_override`, `marginOverride`, `Margin-Override` and
/// `MARGIN OVERRIDE` are one name (Jackson, Gson, Rails and PHP each map some of these onto
/// one another). Used on both sides: the policy's paths and the request's names.
pub fn normal_name(name: &str) -> String {
    fold(name)
        .chars()
        .filter(|c| !matches!(c, '_' | '-') && !c.is_whitespace())
        .collect()
}

/// The first segment of a path that matches at any depth (`**.margin_override`).
pub const ANY_DEPTH: &str = "**";

/// A field path from the policy (`order.price`, or `**.price` for a `price` at any depth), in
/// normal form.
pub fn parse_path(path: &str) -> Option<Vec<String>> {
    let parts: Vec<String> = path
        .split('.')
        .enumerate()
        .map(|(i, p)| {
            if i == 0 && p == ANY_DEPTH {
                p.to_string()
            } else {
                normal_name(p)
            }
        })
        .collect();
    let any = usize::from(parts.first().is_some_and(|p| p == ANY_DEPTH));
    let names = parts.get(any..).unwrap_or_default();
    (!names.is_empty() && names.iter().all(|p| !p.is_empty() && p != ANY_DEPTH)).then_some(parts)
}

/// Whether `key` (a member's path) is the field `pattern` names (`exact`), or is it or lies
/// inside it (not `exact`). A pattern starting with `**` names its rest at any depth.
fn path_matches(key: &[String], pattern: &[String], exact: bool) -> bool {
    let (anywhere, rest) = match pattern.split_first() {
        Some((first, rest)) if first == ANY_DEPTH => (true, rest),
        _ => (false, pattern),
    };
    let at = |i: usize| {
        key.get(i..i + rest.len())
            .is_some_and(|w| w.iter().zip(rest).all(|(a, b)| a == b))
            && (!exact || i + rest.len() == key.len())
    };
    if anywhere {
        (0..key.len()).any(at)
    } else {
        at(0)
    }
}

/// Whether a name has a control character (`%00`, a tab, DEL): refused in a field name on a
/// restricted API, since backends cut or keep them differently.
fn has_control(name: &str) -> bool {
    name.chars().any(char::is_control)
}

/// How a body can be read by the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Form,
}

/// The body's kind from its `content-type` and `content-encoding`, or why it cannot be read.
pub fn body_kind(
    content_type: Option<&str>,
    content_encoding: Option<&str>,
) -> Result<BodyKind, String> {
    if let Some(enc) = content_encoding {
        if !enc.trim().eq_ignore_ascii_case("identity") {
            return Err(format!(
                "content-encoding {enc:?} cannot be read by the gateway"
            ));
        }
    }
    let Some(ct) = content_type else {
        return Err("no content-type".into());
    };
    let mut parts = ct.split(';');
    let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    for param in parts {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        if k.trim().eq_ignore_ascii_case("charset") {
            let v = v.trim().trim_matches('"');
            if !v.eq_ignore_ascii_case("utf-8") && !v.eq_ignore_ascii_case("utf8") {
                return Err(format!("charset {v:?}: only UTF-8 bodies are read"));
            }
        }
    }
    let json = media == "application/json"
        || (media.starts_with("application/") && media.ends_with("+json"));
    if json {
        Ok(BodyKind::Json)
    } else if media == "application/x-www-form-urlencoded" {
        Ok(BodyKind::Form)
    } else {
        Err(format!(
            "content-type {media:?} cannot be checked for fields"
        ))
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// application/x-www-form-urlencoded decoding of one name or value.
pub fn form_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&c) = s.get(i) {
        if c == b'+' {
            out.push(b' ');
        } else if c == b'%' {
            let hi = s.get(i + 1).copied().and_then(hex_val);
            let lo = s.get(i + 2).copied().and_then(hex_val);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
            out.push(c);
        } else {
            out.push(c);
        }
        i += 1;
    }
    out
}

/// The paths a form or query key names, in normal form: `order[price]` and `order.price` are
/// `["order", "price"]` (bracket notation is nesting); `ids[]` is `["ids"]`. The whole key as
/// one name is a second reading (PHP turns `a.b` and `a b` into `a_b`). Err: a control
/// character in the name.
fn form_key_paths(key: &[u8]) -> Result<[Vec<String>; 2], String> {
    let decoded = form_decode(key);
    let text = String::from_utf8_lossy(&decoded);
    if has_control(&text) {
        return Err(format!("control character in field name {text:?}"));
    }
    let nested = text
        .replace("[]", "")
        .replace('[', ".")
        .replace(']', "")
        .split('.')
        .map(normal_name)
        .filter(|s| !s.is_empty())
        .collect();
    let whole: String = normal_name(&text.replace(['.', '[', ']'], ""));
    Ok([nested, vec![whole]])
}

/// Whether a key at `key` is, or lies inside, one of the `paths`.
fn within<'p>(key: &[String], paths: &'p [Vec<String>]) -> Option<&'p Vec<String>> {
    paths.iter().find(|p| path_matches(key, p, false))
}

/// The raw (still encoded) names of a form body or query string: both `&` and `;` separate
/// pairs, as some backends read them; a name ends at its `=`.
pub fn form_keys(form: &[u8]) -> impl Iterator<Item = &[u8]> {
    form.split(|&b| b == b'&' || b == b';')
        .filter(|p| !p.is_empty())
        .map(|pair| pair.split(|&b| b == b'=').next().unwrap_or(pair))
}

/// The first forbidden name in a form body or query string, if any, or a name no rule can be
/// checked against.
fn forbidden_in_form(form: &[u8], paths: &[Vec<String>]) -> Result<Option<Vec<String>>, Deny> {
    for key in form_keys(form) {
        let readings = form_key_paths(key).map_err(|e| Deny::new(DenyReason::FieldForbidden, e))?;
        if let Some(p) = readings.iter().find_map(|k| within(k, paths)) {
            return Ok(Some(p.clone()));
        }
    }
    Ok(None)
}

fn forbidden(path: &[String]) -> Deny {
    Deny::new(
        DenyReason::FieldForbidden,
        format!("field {} is not granted", path.join(".")),
    )
}

/// Refuses a request that carries a field the grant forbids, in its query or its body.
pub fn check_request(
    forbidden_paths: &[Vec<String>],
    query: Option<&str>,
    content_type: Option<&str>,
    content_encoding: Option<&str>,
    body: &[u8],
) -> Result<(), Deny> {
    if forbidden_paths.is_empty() {
        return Ok(());
    }
    if let Some(p) = match query {
        Some(q) => forbidden_in_form(q.as_bytes(), forbidden_paths)?,
        None => None,
    } {
        return Err(forbidden(&p));
    }
    if body.is_empty() {
        return Ok(());
    }
    let kind = body_kind(content_type, content_encoding).map_err(|why| {
        Deny::new(
            DenyReason::ContentTypeUnsupported,
            format!("the grant restricts fields and the body cannot be checked: {why}"),
        )
    })?;
    let hit: Option<Vec<String>> = match kind {
        BodyKind::Form => forbidden_in_form(body, forbidden_paths)?,
        BodyKind::Json => {
            let spans = scan_json(body, forbidden_paths, Match::Within).map_err(|e| {
                Deny::new(
                    DenyReason::FieldForbidden,
                    format!("the grant restricts fields and the body is not valid JSON: {e}"),
                )
            })?;
            spans.into_iter().next().map(|s| s.path)
        }
    };
    match hit {
        Some(p) => Err(forbidden(&p)),
        None => Ok(()),
    }
}

/// Removes hidden fields from a JSON response. `Ok(None)`: nothing to remove. A body that is
/// not JSON is withheld (Err) rather than passed unfiltered.
pub fn filter_response(hidden: &[Vec<String>], body: &[u8]) -> Result<Option<Vec<u8>>, Deny> {
    if hidden.is_empty() || body.is_empty() {
        return Ok(None);
    }
    let spans = scan_json(body, hidden, Match::Exact).map_err(|e| {
        Deny::new(
            DenyReason::ResponseUnfilterable,
            format!("response is not JSON ({e}); hidden fields cannot be removed"),
        )
    })?;
    if spans.is_empty() {
        return Ok(None);
    }
    let mut cuts: Vec<(usize, usize)> = spans.iter().map(|s| (s.start, s.end)).collect();
    cuts.sort_unstable();
    let mut out = Vec::with_capacity(body.len());
    let mut at = 0usize;
    for (start, end) in cuts {
        if end <= at {
            continue; // inside a range already cut
        }
        let start = start.max(at);
        out.extend_from_slice(body.get(at..start).unwrap_or(&[]));
        at = end;
    }
    out.extend_from_slice(body.get(at..).unwrap_or(&[]));
    Ok(Some(out))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Match {
    /// The member's path is a target path (hide exactly that field).
    Exact,
    /// The member's path is a target path or lies inside one (forbid the field and its parts).
    Within,
}

/// A matched object member: the bytes to cut to remove it (with one separating comma).
struct Span {
    start: usize,
    end: usize,
    path: Vec<String>,
}

/// One member of an object as it was read: where its key starts and its value ends.
struct Member {
    key_start: usize,
    value_end: usize,
    matched: Option<Vec<String>>,
}

struct Scanner<'a, 't> {
    b: &'a [u8],
    i: usize,
    targets: &'t [Vec<String>],
    mode: Match,
    spans: Vec<Span>,
}

/// Reads a whole JSON document (RFC 8259, UTF-8, at most `MAX_DEPTH` deep) and returns the
/// members whose folded path matches a target. Arrays are transparent: `orders.price` names
/// the `price` of every element of `orders`.
fn scan_json(body: &[u8], targets: &[Vec<String>], mode: Match) -> Result<Vec<Span>, String> {
    if std::str::from_utf8(body).is_err() {
        return Err("not UTF-8".into());
    }
    let mut s = Scanner {
        b: body,
        i: 0,
        targets,
        mode,
        spans: Vec::new(),
    };
    s.ws();
    s.value(&mut Vec::new(), 0, false)?;
    s.ws();
    if s.i != body.len() {
        return Err(format!("trailing data at byte {}", s.i));
    }
    Ok(s.spans)
}

impl Scanner<'_, '_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }
    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected {:?} at byte {}", c as char, self.i))
        }
    }

    /// `muted`: inside a member already matched, nothing below is reported again.
    fn value(&mut self, path: &mut Vec<String>, depth: usize, muted: bool) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH}"));
        }
        match self.peek() {
            Some(b'{') => self.object(path, depth, muted),
            Some(b'[') => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    self.value(path, depth + 1, muted)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return Err(format!("expected ',' or ']' at byte {}", self.i)),
                    }
                }
            }
            Some(b'"') => self.string().map(|_| ()),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(format!("unexpected byte at {}", self.i)),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), String> {
        if self.b.get(self.i..self.i + word.len()) == Some(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(format!("bad literal at byte {}", self.i))
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<(), String> {
        let bad = |i: usize| format!("bad number at byte {i}");
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(bad(self.i)),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(bad(self.i));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(bad(self.i));
            }
        }
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let mut v = 0u32;
        for _ in 0..4 {
            let d = self
                .peek()
                .and_then(hex_val)
                .ok_or_else(|| format!("bad \\u escape at byte {}", self.i))?;
            v = v << 4 | u32::from(d);
            self.i += 1;
        }
        Ok(v)
    }

    /// A string, decoded (escapes resolved); the body was checked to be UTF-8.
    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err("unterminated string".into());
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = self.peek().ok_or("unterminated escape")?;
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xD800..0xDC00).contains(&hi) {
                                if self.b.get(self.i..self.i + 2) != Some(b"\\u") {
                                    return Err("lone surrogate".into());
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err("lone surrogate".into());
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else if (0xDC00..0xE000).contains(&hi) {
                                return Err("lone surrogate".into());
                            } else {
                                hi
                            };
                            char::from_u32(cp).ok_or("bad code point")?
                        }
                        _ => return Err(format!("bad escape at byte {}", self.i)),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                0x00..=0x1f => {
                    return Err(format!("control character in string at byte {}", self.i))
                }
                _ => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| "not UTF-8".to_string())
    }

    fn matches(&self, path: &[String]) -> Option<Vec<String>> {
        let exact = self.mode == Match::Exact;
        let hit = self.targets.iter().any(|t| path_matches(path, t, exact));
        hit.then(|| path.to_vec())
    }

    fn object(&mut self, path: &mut Vec<String>, depth: usize, muted: bool) -> Result<(), String> {
        let open = self.i;
        self.expect(b'{')?;
        let mut members: Vec<Member> = Vec::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            let key_start = self.i;
            let key = self.string()?;
            self.ws();
            self.expect(b':')?;
            self.ws();
            if self.mode == Match::Within && has_control(&key) {
                return Err(format!("control character in field name {key:?}"));
            }
            path.push(normal_name(&key));
            let matched = if muted { None } else { self.matches(path) };
            self.value(path, depth + 1, muted || matched.is_some())?;
            path.pop();
            members.push(Member {
                key_start,
                value_end: self.i,
                matched,
            });
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    break;
                }
                _ => return Err(format!("expected ',' or '}}' at byte {}", self.i)),
            }
        }
        let _ = open;
        // Cut each matched member with one separator: the comma after it when a kept member
        // follows, else the comma before it.
        let last_kept = members.iter().rposition(|m| m.matched.is_none());
        for (i, m) in members.iter().enumerate() {
            let Some(p) = &m.matched else { continue };
            let (start, end) = match last_kept {
                Some(k) if i < k => (
                    m.key_start,
                    members.get(i + 1).map_or(m.value_end, |n| n.key_start),
                ),
                Some(_) if i > 0 => (
                    members.get(i - 1).map_or(m.key_start, |p| p.value_end),
                    m.value_end,
                ),
                _ => (m.key_start, m.value_end),
            };
            // when nothing is kept, cut from the first key to the last value
            let (start, end) = if last_kept.is_none() {
                (
                    members.first().map_or(start, |f| f.key_start),
                    members.last().map_or(end, |l| l.value_end),
                )
            } else {
                (start, end)
            };
            self.spans.push(Span {
                start,
                end,
                path: p.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
