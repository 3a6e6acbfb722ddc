//! The cluster backend's one atomic script, joined at compile time from each stored concern's
//! Lua beside its module, and the layout of every operation's words: written once here, read
//! by the encoder (which writes the words in this order) and sent to the script as its
//! `LAYOUT` table (which reads them by these names). No position is kept by hand on either side.

use std::sync::OnceLock;

use sha1::Digest;

use crate::crypto::hex;

/// One operation: its code and the names of the words that follow it, in order.
#[derive(Debug)]
pub struct Layout {
    pub code: &'static str,
    pub words: &'static [&'static str],
}

pub const BAN: Layout = Layout {
    code: "B",
    words: &["subject", "lift"],
};
pub const REFUSAL: Layout = Layout {
    code: "R",
    words: &["subject", "window", "threshold", "ban"],
};
pub const NONCE: Layout = Layout {
    code: "N",
    words: &["key", "app", "created", "record", "share"],
};
pub const GRANT_USE: Layout = Layout {
    code: "G",
    words: &["grant", "max"],
};
/// The words every check of a presented session starts with.
const SESSION: [&str; 7] = ["key", "app", "ip", "mac", "ip_unbound", "idle", "lifetime"];
pub const SESSION_USE: Layout = Layout {
    code: "S",
    words: &[
        SESSION[0], SESSION[1], SESSION[2], SESSION[3], SESSION[4], SESSION[5], SESSION[6],
        "refresh",
    ],
};
pub const SESSION_LOGIN: Layout = Layout {
    code: "SL",
    words: &[
        SESSION[0], SESSION[1], SESSION[2], SESSION[3], SESSION[4], SESSION[5], SESSION[6], "user",
        "factors",
    ],
};
pub const SESSION_END: Layout = Layout {
    code: "SE",
    words: &SESSION,
};
pub const SESSION_CREATE: Layout = Layout {
    code: "SC",
    words: &[
        "key",
        "app",
        "ip",
        "mac",
        "user",
        "factors",
        "idle",
        "bound",
        "max_per_app",
        "per_minute",
        "per_source_per_minute",
    ],
};
pub const SESSION_REVOKE: Layout = Layout {
    code: "SR",
    words: &["key"],
};
pub const SESSIONS_END_ALL: Layout = Layout {
    code: "SA",
    words: &["kind", "name", "lifetime"],
};
pub const CALLS: Layout = Layout {
    code: "V",
    words: &[
        "rule",
        "app",
        "bucket",
        "window",
        "max_calls",
        "max_bytes",
        "block",
    ],
};
pub const BYTES: Layout = Layout {
    code: "VB",
    words: &["rule", "app", "bucket", "window", "bytes"],
};
pub const SOURCE: Layout = Layout {
    code: "NS",
    words: &[
        "rule", "app", "source", "learning", "max", "forget", "block",
    ],
};
pub const KEY_FAILURE: Layout = Layout {
    code: "KF",
    words: &[
        "rule",
        "app",
        "keyid",
        "bucket",
        "window",
        "threshold",
        "ban_subject",
        "ban_seconds",
        "lift",
    ],
};
/// One window of a rate-limit counter, checked (RL-1, RL-2): `ms` 0 for a calendar quota.
pub const RATE_CHECK: Layout = Layout {
    code: "RC",
    words: &[
        "key", "rule", "pos", "ms", "bucket", "before", "at", "limit", "ttl", "refuse",
    ],
};
/// Counts every window the batch's `RC`s checked (reached only if none refused).
pub const RATE_COUNT: Layout = Layout {
    code: "RI",
    words: &[],
};
/// The gauges: `n`, then `n` pairs of app and lift time (the one operation of variable length).
pub const GAUGES: Layout = Layout {
    code: "GA",
    words: &["n"],
};

pub const LAYOUTS: [&Layout; 17] = [
    &BAN,
    &REFUSAL,
    &NONCE,
    &GRANT_USE,
    &SESSION_USE,
    &SESSION_LOGIN,
    &SESSION_END,
    &SESSION_CREATE,
    &SESSION_REVOKE,
    &SESSIONS_END_ALL,
    &CALLS,
    &BYTES,
    &SOURCE,
    &KEY_FAILURE,
    &RATE_CHECK,
    &RATE_COUNT,
    &GAUGES,
];

/// Each concern's Lua, in the order the script needs them (bans first: anomalies and the
/// gauges use its helpers).
const PARTS: [&str; 9] = [
    include_str!("prelude.lua"),
    include_str!("bans/bans.lua"),
    include_str!("nonces/nonces.lua"),
    include_str!("grants/grants.lua"),
    include_str!("sessions/sessions.lua"),
    include_str!("anomalies/anomalies.lua"),
    include_str!("rate_limits/rate_limits.lua"),
    include_str!("gauges.lua"),
    include_str!("run.lua"),
];

/// The script's text: the layout table, then each concern's Lua. Built once per VM.
pub fn script() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        let mut s = String::from("local LAYOUT = {\n");
        for l in LAYOUTS {
            s.push_str("  ");
            s.push_str(l.code);
            s.push_str(" = {");
            for (i, w) in l.words.iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                s.push('\'');
                s.push_str(w);
                s.push('\'');
            }
            s.push_str("},\n");
        }
        s.push_str("}\n");
        for part in PARTS {
            s.push_str(part);
        }
        s
    })
}

/// Hex SHA-1 of [`script`], as Redis names a loaded script: computed once per VM (hashing the
/// ~12 kB script in wasm cost ~294k instructions, and every callout names it).
pub fn script_sha() -> &'static str {
    static SHA: OnceLock<String> = OnceLock::new();
    SHA.get_or_init(|| hex(&sha1::Sha1::digest(script().as_bytes())))
}

/// The script's text as the word an `EVAL` sends ([`word`]), encoded once per VM.
pub fn script_words() -> &'static [u8] {
    static WORDS: OnceLock<Vec<u8>> = OnceLock::new();
    WORDS.get_or_init(|| {
        let mut out = Vec::with_capacity(script().len() * 2);
        word(&mut out, script());
        out
    })
}

/// Builds what every callout reuses (the script's text, its digest, its encoded words) now, as
/// a policy for the cluster store is loaded, rather than in the first callout that needs each:
/// in the Wasm build that was a call of about a million instructions in a worker's tick (the
/// first gauge pass) or in a request.
pub fn prepare() {
    let _ = (script_sha(), script_words());
}

/// webdis reads a command as `/`-separated, percent-decoded words; `+` would decode to a
/// space, and a final `.ext` would pick an output format, so everything but letters, digits,
/// `-` and `_` is encoded, and the command never ends with a caller's bytes.
pub fn word(out: &mut Vec<u8>, w: &str) {
    out.push(b'/');
    for &b in w.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b);
        } else {
            out.push(b'%');
            for d in [b >> 4, b & 15] {
                out.push(if d < 10 { b'0' + d } else { b'A' + d - 10 });
            }
        }
    }
}

/// A yes/no word.
pub fn flag(b: bool) -> &'static str {
    if b {
        "1"
    } else {
        "0"
    }
}

/// The code word that ends a batch whose words did not follow their layout: the script knows
/// no such operation and fails the batch (the request is refused `state_unavailable`).
pub const MISMATCH: &str = "layout-mismatch";

/// Writes one operation's words by name, in its layout's order. A name out of order or a word
/// missing writes [`MISMATCH`] after it, so that a slip fails closed, never shifts meaning.
pub struct Words<'a> {
    out: &'a mut Vec<u8>,
    layout: &'static Layout,
    next: usize,
    broken: bool,
}

impl<'a> Words<'a> {
    pub fn op(out: &'a mut Vec<u8>, layout: &'static Layout) -> Self {
        word(out, layout.code);
        Words {
            out,
            layout,
            next: 0,
            broken: false,
        }
    }

    pub fn put(mut self, name: &str, value: &str) -> Self {
        if self.layout.words.get(self.next) != Some(&name) {
            self.broken = true;
        }
        word(self.out, value);
        self.next += 1;
        self
    }

    /// The words past the layout's own (the gauges' pairs).
    pub fn extra(self, value: &str) -> Self {
        word(self.out, value);
        self
    }

    pub fn end(self) {
        if self.broken || self.next != self.layout.words.len() {
            word(self.out, MISMATCH);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn words(body: &[u8]) -> Vec<String> {
        String::from_utf8(body.to_vec())
            .unwrap()
            .split('/')
            .skip(1)
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn words_follow_their_layout_or_the_batch_fails() {
        let mut body = Vec::new();
        Words::op(&mut body, &GRANT_USE)
            .put("grant", "g1")
            .put("max", "3")
            .end();
        assert_eq!(words(&body), ["G", "g1", "3"]);
        // out of order: the words are written, then a code the script refuses
        let mut body = Vec::new();
        Words::op(&mut body, &GRANT_USE)
            .put("max", "3")
            .put("grant", "g1")
            .end();
        assert_eq!(words(&body), ["G", "3", "g1", MISMATCH]);
        // one missing
        let mut body = Vec::new();
        Words::op(&mut body, &GRANT_USE).put("grant", "g1").end();
        assert_eq!(words(&body), ["G", "g1", MISMATCH]);
    }

    /// The Lua of each operation, from `OPS.<code> = function(a)` to its `end` in column 0.
    fn handlers() -> Vec<(String, String)> {
        let text = script();
        let mut out = Vec::new();
        let starts: Vec<usize> = text.match_indices("\nOPS.").map(|(i, _)| i + 1).collect();
        for (n, &at) in starts.iter().enumerate() {
            let end = starts.get(n + 1).copied().unwrap_or(text.len());
            let block = &text[at..end];
            let block = &block[..block.find("\nend\n").unwrap()];
            let code = block["OPS.".len()..].split(' ').next().unwrap().to_string();
            out.push((code, block.to_string()));
        }
        out
    }

    /// Both sides agree: every layout has a handler and every handler a layout, and a handler
    /// reads only the words its layout names (a word read by a name the encoder does not write
    /// would be nil in Lua and change the rule's meaning).
    #[test]
    fn every_handler_reads_only_the_words_of_its_layout() {
        let handlers = handlers();
        let mut codes: Vec<&str> = handlers.iter().map(|(c, _)| c.as_str()).collect();
        codes.sort_unstable();
        let mut expected: Vec<&str> = LAYOUTS.iter().map(|l| l.code).collect();
        expected.sort_unstable();
        assert_eq!(codes, expected);
        for (code, block) in &handlers {
            let layout = LAYOUTS.iter().find(|l| l.code == code).unwrap();
            let mut rest = block.as_str();
            while let Some(i) = rest.find("a.") {
                let before = rest[..i].chars().last();
                rest = &rest[i + 2..];
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
                    continue; // part of another name (`ta.x`)
                }
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    name == "_i" || layout.words.contains(&name.as_str()),
                    "{code} reads `a.{name}`, which its layout {:?} does not write",
                    layout.words
                );
            }
        }
        // the session check shared by S, SL and SE reads the words they all start with
        let shared = script()
            .split("local function session(a, refresh)")
            .nth(1)
            .unwrap();
        let shared = shared.split("\nend\n").next().unwrap();
        for name in ["key", "app", "ip", "mac", "ip_unbound", "idle", "lifetime"] {
            assert!(shared.contains(&format!("a.{name}")), "{name}");
            for l in [&SESSION_USE, &SESSION_LOGIN, &SESSION_END] {
                assert!(l.words.contains(&name));
            }
        }
    }

    #[test]
    fn the_script_starts_with_the_layouts_and_is_hashed_once() {
        assert!(script().starts_with("local LAYOUT = {\n  B = {'subject', 'lift'},\n"));
        assert_eq!(script_sha().len(), 40);
        assert!(std::ptr::eq(script_sha(), script_sha()));
        // the text's word for EVAL, encoded once, is the word of the text
        let mut once = Vec::new();
        word(&mut once, script());
        assert_eq!(script_words(), once.as_slice());
        assert!(std::ptr::eq(script_words(), script_words()));
    }
}
