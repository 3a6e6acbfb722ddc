//! Masking of personal data in audit records (LOG-4): mainland ID card numbers, mobile numbers
//! and bank card numbers wherever they appear in a logged value (path, query, user, detail), and
//! the account fields the policy names (path parameters and query parameters, by name), keeping
//! only the leading and trailing characters the policy allows.
//!
//! Detection works on runs of digits (a run is not part of a longer one):
//! - ID card: 18 characters, 17 digits and a digit or `X` (GB 11643; the check digit is not
//!   required to match, so a mistyped number is masked too);
//! - mobile: 11 digits `1[3-9]…`, also after `86` or `+86`;
//! - bank card: 16 to 19 digits that pass the Luhn check.
//!
//! A separator between two digits (space, `-`, `+`, `%20`, `%2D`, `%2B`) joins them into one run:
//! `6222-0212-3456-7894` and `+86 138 0013 8000` are masked as the plain numbers are.
//!
//! Over-masking (an 18-digit order number) costs a log reader a little; under-masking would put
//! personal data in the log, so the rules lean that way.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// `audit.mask` in the policy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawMask {
    /// Characters kept at the start and at the end of a masked value (0..=8 each).
    #[serde(default = "default_head")]
    pub keep_head: usize,
    #[serde(default = "default_tail")]
    pub keep_tail: usize,
    /// Names of path parameters (`{account_id}`) and query parameters whose values are account
    /// numbers: masked whatever they look like.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub account_fields: Vec<String>,
}

fn default_head() -> usize {
    3
}
fn default_tail() -> usize {
    4
}

impl Default for RawMask {
    fn default() -> Self {
        RawMask {
            keep_head: default_head(),
            keep_tail: default_tail(),
            account_fields: Vec::new(),
        }
    }
}

/// The compiled masking rules (always on: without `audit.mask`, the defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masking {
    pub keep_head: usize,
    pub keep_tail: usize,
    pub account_fields: Vec<String>,
}

impl Default for Masking {
    fn default() -> Self {
        Masking {
            keep_head: default_head(),
            keep_tail: default_tail(),
            account_fields: Vec::new(),
        }
    }
}

impl RawMask {
    pub fn compile(&self) -> Result<Masking, ConfigError> {
        if self.keep_head > 8 || self.keep_tail > 8 {
            return Err(ConfigError::new(
                "audit.mask.keep_head",
                "keep_head and keep_tail must be 0..8",
            ));
        }
        for (i, f) in self.account_fields.iter().enumerate() {
            if f.is_empty()
                || !f
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(ConfigError::new(
                    format!("audit.mask.account_fields[{i}]"),
                    "a parameter name (A-Z a-z 0-9 _ -)",
                ));
            }
        }
        Ok(Masking {
            keep_head: self.keep_head,
            keep_tail: self.keep_tail,
            account_fields: self.account_fields.clone(),
        })
    }
}

fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// The length of a separator that may stand inside a written number at `i` (space, `-`, `+`,
/// or their URL encodings `%20`, `%2D`, `%2B`), if one does.
fn separator(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b' ' | b'-' | b'+' => Some(1),
        b'%' => {
            let code = b.get(i + 1..i + 3)?;
            (code == b"20" || code.eq_ignore_ascii_case(b"2d") || code.eq_ignore_ascii_case(b"2b"))
                .then_some(3)
        }
        _ => None,
    }
}

/// The part of a digit run (start, end within it) that is personal data, if any.
fn personal(run: &[u8], next: Option<u8>) -> Option<(usize, usize)> {
    let n = run.len();
    let mobile = |r: &[u8]| {
        r.len() == 11 && r.first() == Some(&b'1') && matches!(r.get(1), Some(b'3'..=b'9'))
    };
    if n == 18 || (n == 17 && matches!(next, Some(b'X' | b'x'))) {
        return Some((0, 18)); // an ID card (the 18th character may be the X after the run)
    }
    if mobile(run) {
        return Some((0, 11));
    }
    if n == 13 && run.starts_with(b"86") && mobile(run.get(2..)?) {
        return Some((2, 13));
    }
    if (16..=19).contains(&n) && luhn(run) {
        return Some((0, n));
    }
    None
}

impl Masking {
    /// `value` with every character but the first `keep_head` and last `keep_tail` replaced by
    /// `*`; a value too short for that keeps at most a quarter of its length at each end, so
    /// something is always masked.
    pub fn hide(&self, value: &str) -> String {
        let chars: Vec<char> = value.chars().collect();
        let n = chars.len();
        let (head, tail) = self.ends(n);
        chars
            .iter()
            .enumerate()
            .map(|(i, c)| if i < head || i + tail >= n { *c } else { '*' })
            .collect()
    }

    /// `text` with the ID card, mobile and bank card numbers in it masked. A number may be
    /// written with separators inside it (`6222-0212-3456-7894`, `138 0013 8000`,
    /// `+86-138-0013-8000`, `%20` or `%2D` in a URL): one separator between two digits joins
    /// them into one run before the checks, and the digits are masked where they stand.
    pub fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let b = text.as_bytes();
        let mut out: Option<String> = None;
        let mut done = 0; // bytes of `text` already in `out`
        let mut i = 0;
        let mut digits: Vec<u8> = Vec::new();
        let mut at: Vec<usize> = Vec::new(); // the byte offset of each digit of the run
        while i < b.len() {
            if !b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
                continue;
            }
            digits.clear();
            at.clear();
            loop {
                while let Some(d) = b.get(i).copied().filter(u8::is_ascii_digit) {
                    digits.push(d);
                    at.push(i);
                    i += 1;
                }
                match separator(b, i) {
                    Some(len) if b.get(i + len).is_some_and(u8::is_ascii_digit) => i += len,
                    _ => break,
                }
            }
            let Some((from, to)) = personal(&digits, b.get(i).copied()) else {
                continue;
            };
            let (Some(&first), Some(&last)) =
                (at.get(from), at.get(to.min(at.len()).saturating_sub(1)))
            else {
                continue;
            };
            // an ID card's X after the run belongs to the number
            let end = if to > at.len() { i + 1 } else { last + 1 };
            let Some(before) = text.get(done..first) else {
                continue;
            };
            let n = to - from;
            let (head, tail) = self.ends(n);
            let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
            o.push_str(before);
            let mut k = 0; // digits of the number so far
            for (j, c) in text.get(first..end).unwrap_or("").char_indices() {
                let digit =
                    at.get(from + k) == Some(&(first + j)) || (to > at.len() && first + j == i);
                if digit {
                    o.push(if k < head || k + tail >= n { c } else { '*' });
                    k += 1;
                } else {
                    o.push(c);
                }
            }
            done = end;
            i = i.max(end);
        }
        match out {
            None => Cow::Borrowed(text),
            Some(mut o) => {
                o.push_str(text.get(done..).unwrap_or(""));
                Cow::Owned(o)
            }
        }
    }

    /// How many characters `hide` keeps at the start and the end of a value of `n` characters.
    fn ends(&self, n: usize) -> (usize, usize) {
        if self.keep_head + self.keep_tail < n {
            (self.keep_head, self.keep_tail)
        } else {
            (self.keep_head.min(n / 4), self.keep_tail.min(n / 4))
        }
    }

    /// A request path masked: the segments the API's template names as account fields (by
    /// `{name}`), then the personal data patterns everywhere.
    pub fn path<'a>(&self, template: Option<&str>, path: &'a str) -> Cow<'a, str> {
        let Some(template) = template.filter(|_| !self.account_fields.is_empty()) else {
            return self.text(path);
        };
        let mut changed = false;
        let segments: Vec<Cow<'_, str>> = path
            .split('/')
            .zip(template.split('/').map(Some).chain(std::iter::repeat(None)))
            .map(|(seg, t)| {
                let name = t
                    .and_then(|t| t.strip_prefix('{'))
                    .and_then(|t| t.strip_suffix('}'));
                match name {
                    Some(n) if self.account_fields.iter().any(|f| f == n) && !seg.is_empty() => {
                        changed = true;
                        Cow::Owned(self.hide(seg))
                    }
                    _ => self.text(seg),
                }
            })
            .collect();
        if !changed && segments.iter().all(|s| matches!(s, Cow::Borrowed(_))) {
            return Cow::Borrowed(path);
        }
        Cow::Owned(segments.join("/"))
    }

    /// A query string masked: the values of the parameters named as account fields, then the
    /// personal data patterns everywhere.
    pub fn query<'a>(&self, query: &'a str) -> Cow<'a, str> {
        if self.account_fields.is_empty() {
            return self.text(query);
        }
        let parts: Vec<Cow<'_, str>> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, v)) if self.account_fields.iter().any(|f| f == k) && !v.is_empty() => {
                    Cow::Owned(format!("{k}={}", self.hide(v)))
                }
                _ => self.text(p),
            })
            .collect();
        if parts.iter().all(|p| matches!(p, Cow::Borrowed(_))) {
            return Cow::Borrowed(query);
        }
        Cow::Owned(parts.join("&"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn m() -> Masking {
        RawMask {
            keep_head: 3,
            keep_tail: 4,
            account_fields: vec!["account_id".into()],
        }
        .compile()
        .unwrap()
    }

    /// LOG-4: each kind of personal data, wherever it is in a value.
    #[test]
    fn id_cards_mobiles_and_bank_cards_are_masked_wherever_they_appear() {
        let m = m();
        assert_eq!(
            m.text("id=110101199003071234&x=1"),
            "id=110***********1234&x=1"
        );
        assert_eq!(m.text("/u/11010119900307123X/"), "/u/110***********123X/");
        assert_eq!(m.text("user 13800138000 logged"), "user 138****8000 logged");
        assert_eq!(m.text("+8613800138000"), "+86138****8000");
        assert_eq!(
            m.text("card:6222021234567890128"),
            "card:622************0128"
        );
        assert_eq!(m.text("4111111111111111"), "411*********1111");
        // Not personal: too short, too long, a 16-digit run failing Luhn, a landline.
        for keep in [
            "/api/v1/orders/20261130",
            "12345678901234567890123",
            "4111111111111112",
            "02150001234",
            "23800138000",
        ] {
            assert!(matches!(m.text(keep), Cow::Borrowed(_)), "{keep}");
        }
    }

    /// Issue 21 item 8: numbers written with separators, as people and forms write them.
    #[test]
    fn numbers_with_separators_are_masked() {
        let m = m();
        for (written, masked) in [
            ("6222-0212-3456-7894", "622*-****-****-7894"),
            ("6222+0212+3456+7894", "622*+****+****+7894"),
            ("6222 0212 3456 7894", "622* **** **** 7894"),
            ("6222%200212%203456%207894", "622*%20****%20****%207894"),
            ("6222%2D0212%2d3456%2D7894", "622*%2D****%2d****%2D7894"),
            ("138-0013-8000", "138-****-8000"),
            ("+86-138-0013-8000", "+86-138-****-8000"),
            ("+86 138 0013 8000", "+86 138 **** 8000"),
            ("q=138%2D0013%2D8000&p=1", "q=138%2D****%2D8000&p=1"),
            ("110101-19900307-123X", "110***-********-123X"),
        ] {
            assert_eq!(m.text(written), masked, "{written}");
        }
        // separators alone do not make personal data of short numbers
        for keep in ["2026-11-30", "qty=100 200", "1-2-3", "600000-600001"] {
            assert!(matches!(m.text(keep), Cow::Borrowed(_)), "{keep}");
        }
    }

    #[test]
    fn account_fields_are_masked_by_name_in_paths_and_queries() {
        let m = m();
        let t = "/api/v1/accounts/{account_id}/balance";
        assert_eq!(
            m.path(Some(t), "/api/v1/accounts/8800123/balance"),
            "/api/v1/accounts/8*****3/balance"
        );
        assert_eq!(
            m.path(Some(t), "/api/v1/accounts/8800123456/balance"),
            "/api/v1/accounts/880***3456/balance"
        );
        assert_eq!(
            m.query("account_id=8800123456&mobile=13800138000&page=2"),
            "account_id=880***3456&mobile=138****8000&page=2"
        );
        assert!(matches!(
            m.path(Some("/q/{symbol}"), "/q/600000"),
            Cow::Borrowed(_)
        ));
        // Without a template the patterns still apply.
        assert_eq!(m.path(None, "/p/13800138000"), "/p/138****8000");
    }

    #[test]
    fn short_values_keep_at_most_a_quarter_at_each_end() {
        let m = m();
        assert_eq!(m.hide("abc"), "***");
        assert_eq!(m.hide("12345678"), "123*5678");
        assert_eq!(m.hide("1234567"), "1*****7");
        assert!(RawMask {
            keep_head: 9,
            ..RawMask::default()
        }
        .compile()
        .is_err());
    }
}
