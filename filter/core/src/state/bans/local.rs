//! Automatic bans (PERM-4, RL-3, MON-4, MON-6): N refusals by one app (or by one IP when no
//! app is identified) within a window ban it for a configured time. Counters live in the
//! shared store, so they hold across worker threads and policy reloads; entries expire by
//! time; per-IP state sits in a fixed number of slots with a fixed number of entries each,
//! so a flood of source addresses cannot grow it. An operator lifts a ban through the policy
//! (`bans.lifted`): a ban that began before the lift time no longer applies.
//!
//! **The live-ban mark.** Every request asks whether its source and its app are banned: two
//! store reads, and once a subject has been counted at all its record exists, so each read
//! copies a slot into the VM (an allocation call into it, ~8k instructions in Wasm). One key,
//! [`LIVE_KEY`], holds the latest end of any ban written in this store; a request reads it
//! once in each lifecycle event that checks bans (for all the event's batches:
//! `local::MarkRead`) and looks at the subjects' records only while it lies in the future. The
//! rules that keep it safe:
//! - a writer raises the mark to the new ban's end *before* it writes the ban (a ban the mark
//!   does not cover is never stored; if the mark cannot be raised, the ban is not written and
//!   the caller hears the store's error, as for any failed write);
//! - the mark is created empty only by the worker that finds the store new ([`mark_new_store`],
//!   before the store's own record exists, so before any ban can be written); a store opened
//!   by an earlier build has no mark, and then every request reads the records, as before;
//! - writers never create the mark, and a reader that finds every ban ended empties it by
//!   compare-and-swap, so a raise in between wins.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use siphasher::sip::SipHasher13;
use std::hash::Hasher;

use crate::error::{ConfigError, Deny, DenyReason};
use crate::ip::Cidr;
use crate::store::{create_if_absent, u64_at, update, SharedStore, StoreError};
use crate::timeutil;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawBans {
    /// Refusals within `window_seconds` that trigger a ban.
    pub threshold: u32,
    pub window_seconds: u64,
    pub ban_seconds: u64,
    /// Shared-data keys for per-IP counters, and entries per key.
    #[serde(default = "default_ip_slots")]
    pub ip_slots: u32,
    #[serde(default = "default_entries")]
    pub entries_per_slot: u32,
    /// IPv6 sources are counted and banned by prefix: one host holds a whole /64.
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
    /// Operator lifts: bans on this app or IP that began before `at` are void.
    #[serde(default)]
    pub lifted: Vec<RawLift>,
}

fn default_ip_slots() -> u32 {
    1024
}
fn default_entries() -> u32 {
    16
}
fn default_ipv6_prefix() -> u8 {
    64
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawLift {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// RFC 3339 time of the lift.
    pub at: String,
    #[serde(default)]
    pub by: String,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone)]
enum LiftTarget {
    App(String),
    Ip(Cidr),
}

#[derive(Debug, Clone)]
pub struct BanSettings {
    pub threshold: u32,
    pub window_seconds: u64,
    pub ban_seconds: u64,
    ip_slots: u32,
    entries_per_slot: u32,
    ipv6_prefix: u8,
    lifted: Vec<(LiftTarget, u64)>,
    /// The key of subject fingerprints: the store's own random salt (`keyed`), so that no one
    /// outside can choose an address whose fingerprint is another's.
    key: [u8; 16],
}

impl RawBans {
    pub fn compile(&self) -> Result<BanSettings, ConfigError> {
        if self.threshold == 0 {
            return Err(ConfigError::new("bans.threshold", "must be at least 1"));
        }
        if !(1..=86400).contains(&self.window_seconds) {
            return Err(ConfigError::new(
                "bans.window_seconds",
                "must be between 1 and 86400",
            ));
        }
        if !(1..=30 * 86400).contains(&self.ban_seconds) {
            return Err(ConfigError::new(
                "bans.ban_seconds",
                "must be between 1 and 2592000",
            ));
        }
        if !(1..=65536).contains(&self.ip_slots) || !(1..=256).contains(&self.entries_per_slot) {
            return Err(ConfigError::new(
                "bans.ip_slots",
                "ip_slots 1..65536, entries_per_slot 1..256",
            ));
        }
        if !(16..=128).contains(&self.ipv6_prefix) {
            return Err(ConfigError::new(
                "bans.ipv6_prefix",
                "must be between 16 and 128",
            ));
        }
        let mut lifted = Vec::new();
        for (i, l) in self.lifted.iter().enumerate() {
            let f = format!("bans.lifted[{i}]");
            let at = timeutil::parse_rfc3339(&l.at).ok_or_else(|| {
                ConfigError::new(format!("{f}.at"), "must be an RFC 3339 time with an offset")
            })?;
            let target = match (&l.app, &l.ip) {
                (Some(a), None) => LiftTarget::App(a.clone()),
                (None, Some(ip)) => LiftTarget::Ip(
                    Cidr::parse(ip).map_err(|m| ConfigError::new(format!("{f}.ip"), m))?,
                ),
                _ => return Err(ConfigError::new(f, "a lift names exactly one of app or ip")),
            };
            lifted.push((target, at));
        }
        Ok(BanSettings {
            threshold: self.threshold,
            window_seconds: self.window_seconds,
            ban_seconds: self.ban_seconds,
            ip_slots: self.ip_slots,
            entries_per_slot: self.entries_per_slot,
            ipv6_prefix: self.ipv6_prefix,
            lifted,
            key: [0; 16],
        })
    }
}

/// Who a refusal counts against.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    App(&'a str),
    Ip(IpAddr),
}

const ENTRY: usize = 36; // fp 8 | window_start 8 | count 4 | banned_at 8 | banned_until 8

#[derive(Debug, Clone, Copy, Default)]
struct Record {
    fp: [u8; 8],
    window_start: u64,
    count: u32,
    banned_at: u64,
    banned_until: u64,
}

impl Record {
    fn decode(b: &[u8]) -> Record {
        let mut fp = [0u8; 8];
        if let Some(s) = b.get(..8) {
            fp.copy_from_slice(s);
        }
        let count = b
            .get(16..20)
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
            .map_or(0, u32::from_le_bytes);
        Record {
            fp,
            window_start: u64_at(b, 8),
            count,
            banned_at: u64_at(b, 20),
            banned_until: u64_at(b, 28),
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.fp);
        out.extend_from_slice(&self.window_start.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.banned_at.to_le_bytes());
        out.extend_from_slice(&self.banned_until.to_le_bytes());
    }
}

/// The live-ban mark: empty (no ban in force), or the latest ban end as 8 bytes LE.
pub const LIVE_KEY: &str = "apisec/ban/live-until";

/// The ban end a live-ban mark holds; None when it is empty or unreadable.
fn live_until(mark: &[u8]) -> Option<u64> {
    (mark.len() == 8).then(|| u64_at(mark, 0))
}

/// Creates the live-ban mark, empty, in a store that is new (its own record not yet written):
/// called before that record is created, so before any worker can write a ban. Never
/// overwrites a mark another worker created or raised.
pub fn mark_new_store(store: &dyn SharedStore) -> Result<(), StoreError> {
    create_if_absent(store, LIVE_KEY, &[]).map(|_| ())
}

/// The prefix of an app's ban record (the app's ID follows).
const APP_KEY: &str = "apisec/ban/app/";

/// The shared-data key of a slot of per-source counters.
fn ip_key(slot: u64) -> String {
    crate::state::numbered_key("apisec/ban/ip/", slot)
}

impl BanSettings {
    /// The source a refusal counts against: an IPv4 address, or an IPv6 address's prefix.
    pub fn source(&self, ip: IpAddr) -> String {
        crate::ip::source(ip, self.ipv6_prefix)
    }

    /// How a subject is named in the audit record and the log.
    pub fn describe(&self, subject: Subject<'_>) -> String {
        match subject {
            Subject::App(a) => format!("app {a}"),
            Subject::Ip(ip) => format!("source {}", self.source(ip)),
        }
    }

    /// A subject's fingerprint (the IPv6 prefix for a source), as its ban record keeps it.
    pub fn fingerprint(&self, subject: Subject<'_>) -> [u8; 8] {
        self.locate(subject).1
    }

    /// The fingerprint of a subject and the store key of its record. The fingerprint is
    /// SipHash-1-3 under the store's salt over the subject's kind and bytes (an IPv6 source by
    /// its prefix): cheap on the request path (a SHA-256 cost ~8k instructions per subject in
    /// wasm), and unpredictable to a caller without the salt, so that no one can pick an
    /// address whose fingerprint, and so whose record, is another's.
    fn locate(&self, subject: Subject<'_>) -> (String, [u8; 8]) {
        let mut h = SipHasher13::new_with_key(&self.key);
        match subject {
            Subject::App(a) => {
                h.write(b"app\0");
                h.write(a.as_bytes());
            }
            Subject::Ip(ip) => {
                h.write(b"ip\0");
                let (net, bits) = crate::ip::source_net(ip, self.ipv6_prefix);
                h.write(&net);
                h.write_u8(bits);
            }
        }
        let fp = h.finish().to_le_bytes();
        let key = match subject {
            Subject::App(a) => {
                let mut k = String::with_capacity(APP_KEY.len() + a.len());
                k.push_str(APP_KEY);
                k.push_str(a);
                k
            }
            Subject::Ip(_) => ip_key(u64::from_le_bytes(fp) % u64::from(self.ip_slots.max(1))),
        };
        (key, fp)
    }

    /// Binds the settings to the store they count in: fingerprints are keyed with its salt.
    pub fn keyed(&mut self, salt: [u8; 16]) {
        self.key = salt;
    }

    pub fn lifted_at(&self, subject: Subject<'_>) -> u64 {
        self.lifted
            .iter()
            .filter(|(t, _)| match (t, subject) {
                (LiftTarget::App(a), Subject::App(s)) => a == s,
                (LiftTarget::Ip(c), Subject::Ip(ip)) => c.contains(ip),
                _ => false,
            })
            .map(|(_, at)| *at)
            .max()
            .unwrap_or(0)
    }

    fn live_in(
        &self,
        store: &dyn SharedStore,
        key: &str,
        lift: u64,
        now: u64,
    ) -> Result<u64, StoreError> {
        Ok(store
            .get(key)?
            .map(|(v, _)| {
                v.chunks_exact(ENTRY)
                    .map(Record::decode)
                    .filter(|r| r.banned_until > now && r.banned_at >= lift)
                    .count() as u64
            })
            .unwrap_or(0))
    }

    /// How many slots hold per-source counters.
    pub fn ip_slots(&self) -> u32 {
        self.ip_slots
    }

    /// Bans in force now on the policy's apps (a gauge for MON-4): one read per app.
    pub fn active_apps<'a>(
        &self,
        store: &dyn SharedStore,
        apps: impl Iterator<Item = &'a str>,
        now: u64,
    ) -> Result<u64, StoreError> {
        let mut n = 0u64;
        for app in apps {
            let subject = Subject::App(app);
            n = n.saturating_add(self.live_in(
                store,
                &self.locate(subject).0,
                self.lifted_at(subject),
                now,
            )?);
        }
        Ok(n)
    }

    /// Bans in force now on sources, in the source slots `slots` (a pass over every slot is
    /// spread over several calls). A source ban lifted by range is counted until it ends (the
    /// store keeps a fingerprint of the source, not the address).
    pub fn active_sources(
        &self,
        store: &dyn SharedStore,
        slots: std::ops::Range<u32>,
        now: u64,
    ) -> Result<u64, StoreError> {
        let mut n = 0u64;
        for slot in slots {
            n = n.saturating_add(self.live_in(store, &ip_key(u64::from(slot)), 0, now)?);
        }
        Ok(n)
    }

    /// Whether any ban may be in force now, from the live-ban mark alone (one read; nothing is
    /// copied while it is empty). True when the store has no mark (opened by an earlier build)
    /// or the mark is unreadable: then every subject's record is read. A mark whose bans have
    /// all ended is emptied by compare-and-swap (a writer's raise in between wins).
    pub fn any_live(&self, store: &dyn SharedStore, now: u64) -> Result<bool, StoreError> {
        let Some((mark, cas)) = store.get(LIVE_KEY)? else {
            return Ok(true);
        };
        if mark.is_empty() {
            return Ok(false);
        }
        if live_until(&mark).is_none_or(|end| end > now) {
            return Ok(true);
        }
        // Losing this race (a ban written meanwhile) leaves the raised mark in place.
        let _ = store.set(LIVE_KEY, &[], Some(cas))?;
        Ok(false)
    }

    /// Raises the live-ban mark to `until` before a ban ending then is written. A store without
    /// a mark (opened by an earlier build) reads every record anyway: it is left without one.
    fn raise_live(&self, store: &dyn SharedStore, until: u64) -> Result<(), StoreError> {
        for _ in 0..16 {
            let Some((mark, cas)) = store.get(LIVE_KEY)? else {
                return Ok(());
            };
            if live_until(&mark).is_some_and(|end| end >= until) {
                return Ok(());
            }
            if store.set(LIVE_KEY, &until.to_le_bytes(), Some(cas))? {
                return Ok(());
            }
        }
        Err(StoreError::Contention)
    }

    /// A live ban on the subject: refused with `banned` until it ends.
    pub fn check(
        &self,
        store: &dyn SharedStore,
        subject: Subject<'_>,
        now: u64,
    ) -> Result<(), Deny> {
        let (key, fp) = self.locate(subject);
        let value = match store.get(&key) {
            Ok(v) => v.map(|(v, _)| v).unwrap_or_default(),
            Err(e) => {
                return Err(Deny::new(
                    DenyReason::HostUnavailable,
                    format!("ban store: {e}"),
                ))
            }
        };
        let lift = self.lifted_at(subject);
        for r in value.chunks_exact(ENTRY).map(Record::decode) {
            if r.fp == fp && r.banned_until > now && r.banned_at >= lift {
                return Err(Deny::new(
                    DenyReason::Banned,
                    format!("{} banned until {}", self.describe(subject), r.banned_until),
                ));
            }
        }
        Ok(())
    }

    /// Counts one refusal; returns true when this refusal started a ban.
    pub fn record_refusal(
        &self,
        store: &dyn SharedStore,
        subject: Subject<'_>,
        now: u64,
    ) -> Result<bool, StoreError> {
        let lift = self.lifted_at(subject);
        self.update(store, subject, now, |mut r| {
            if r.banned_until > now && r.banned_at >= lift {
                return None; // already banned; refusals while banned do not extend it
            }
            let voided = r.banned_until > 0 && r.banned_at < lift;
            if voided || now >= r.window_start.saturating_add(self.window_seconds) {
                r = Record {
                    fp: r.fp,
                    window_start: now,
                    ..Default::default()
                };
            }
            r.count = r.count.saturating_add(1);
            let started = r.count >= self.threshold;
            if started {
                r = banned(r.fp, now, self.ban_seconds);
            }
            Some((r, started))
        })
    }

    /// Bans the subject for `seconds` from now unless a ban is in force on it already (an
    /// anomaly rule that blocks the source of signature failures, anomaly.rs); true when this
    /// started one.
    pub fn impose(
        &self,
        store: &dyn SharedStore,
        subject: Subject<'_>,
        now: u64,
        seconds: u64,
    ) -> Result<bool, StoreError> {
        let lift = self.lifted_at(subject);
        self.update(store, subject, now, |r| {
            (r.banned_until <= now || r.banned_at < lift)
                .then(|| (banned(r.fp, now, seconds), true))
        })
    }

    /// Changes the subject's record as `change` says (None: leave it, answer false), in its slot,
    /// by compare-and-swap.
    fn update(
        &self,
        store: &dyn SharedStore,
        subject: Subject<'_>,
        now: u64,
        change: impl Fn(Record) -> Option<(Record, bool)>,
    ) -> Result<bool, StoreError> {
        let (key, fp) = self.locate(subject);
        update(store, &key, |value| {
            let mut records: Vec<Record> = value.chunks_exact(ENTRY).map(Record::decode).collect();
            let pos = records.iter().position(|r| r.fp == fp);
            let r = pos.and_then(|p| records.get(p).copied()).unwrap_or(Record {
                fp,
                ..Default::default()
            });
            let Some((r, answer)) = change(r) else {
                return (None, Ok(false));
            };
            // the mark covers a ban before the ban is stored (module doc)
            if r.banned_until > now {
                if let Err(e) = self.raise_live(store, r.banned_until) {
                    return (None, Err(e));
                }
            }
            match pos {
                Some(p) => {
                    if let Some(slot) = records.get_mut(p) {
                        *slot = r;
                    }
                }
                None => {
                    // Drop stale entries, then make room: the oldest unbanned entry goes first.
                    records.retain(|x| {
                        x.banned_until > now
                            || now < x.window_start.saturating_add(self.window_seconds)
                    });
                    while records.len() >= self.entries_per_slot as usize {
                        let victim = records
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, x)| {
                                (x.banned_until > now, x.banned_until, x.window_start)
                            })
                            .map(|(i, _)| i);
                        match victim {
                            Some(i) => {
                                records.remove(i);
                            }
                            None => break,
                        }
                    }
                    records.push(r);
                }
            }
            let mut out = Vec::with_capacity(records.len() * ENTRY);
            for x in &records {
                x.encode(&mut out);
            }
            (Some(out), Ok(answer))
        })?
    }
}

/// What the audit record and the log say of a ban a request started: whom (as
/// [`BanSettings::describe`] names it), for how long, and the anomaly rule that started it, if
/// one did (anomaly.rs).
pub fn started(subject: &str, seconds: u64, rule: Option<&str>) -> String {
    match rule {
        Some(r) => format!("{subject} banned for {seconds} s (rule {r})"),
        None => format!("{subject} banned for {seconds} s"),
    }
}

/// A record banned from `now` for `seconds`, its counter reset.
fn banned(fp: [u8; 8], now: u64, seconds: u64) -> Record {
    Record {
        fp,
        window_start: now,
        count: 0,
        banned_at: now,
        banned_until: now.saturating_add(seconds),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn settings(lifted: Vec<RawLift>) -> BanSettings {
        RawBans {
            threshold: 3,
            window_seconds: 60,
            ban_seconds: 600,
            ip_slots: 2,
            entries_per_slot: 4,
            ipv6_prefix: 64,
            lifted,
        }
        .compile()
        .unwrap()
    }

    /// A store that counts the reads of each key and can refuse writes to one key.
    #[derive(Default)]
    struct Watched {
        inner: MemoryStore,
        reads: std::sync::Mutex<std::collections::HashMap<String, u32>>,
        refuse_writes_to: Option<&'static str>,
    }

    impl Watched {
        fn reads(&self, key: &str) -> u32 {
            self.reads.lock().unwrap().get(key).copied().unwrap_or(0)
        }
        fn total_reads(&self) -> u32 {
            self.reads.lock().unwrap().values().sum()
        }
    }

    impl SharedStore for Watched {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            *self
                .reads
                .lock()
                .unwrap()
                .entry(key.to_string())
                .or_default() += 1;
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
            if self.refuse_writes_to == Some(key) {
                return Ok(false); // another worker always wins: contention
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn the_live_mark_covers_every_ban_and_empties_when_they_end() {
        // PERM-4: a request looks at subjects' records only while a ban may be in force
        let s = settings(vec![]);
        let store = Watched::default();
        mark_new_store(&store).unwrap();
        let app = Subject::App("a");
        assert!(!s.any_live(&store, 1000).unwrap());
        // refusals below the threshold are counted, not bans: the mark stays empty
        s.record_refusal(&store, app, 1000).unwrap();
        s.record_refusal(&store, app, 1001).unwrap();
        assert!(!s.any_live(&store, 1001).unwrap());
        assert_eq!(store.inner.get(LIVE_KEY).unwrap().unwrap().0, b"");
        // the ban: the mark holds its end before the ban is stored
        assert!(s.record_refusal(&store, app, 1002).unwrap());
        let mark = store.inner.get(LIVE_KEY).unwrap().unwrap().0;
        assert_eq!(u64_at(&mark, 0), 1602);
        assert!(s.any_live(&store, 1601).unwrap());
        assert!(s.check(&store, app, 1601).is_err());
        // an imposed ban ending later raises it; one ending earlier leaves it
        assert!(s.impose(&store, Subject::App("b"), 1100, 1000).unwrap());
        assert_eq!(
            u64_at(&store.inner.get(LIVE_KEY).unwrap().unwrap().0, 0),
            2100
        );
        assert!(s.impose(&store, Subject::App("c"), 1100, 10).unwrap());
        assert_eq!(
            u64_at(&store.inner.get(LIVE_KEY).unwrap().unwrap().0, 0),
            2100
        );
        // every ban ended: the reader empties the mark, and the next reads copy nothing
        assert!(!s.any_live(&store, 2100).unwrap());
        assert_eq!(store.inner.get(LIVE_KEY).unwrap().unwrap().0, b"");
        assert!(!s.any_live(&store, 2101).unwrap());
        // a ban after that raises the mark again
        for t in 3000..3003 {
            s.record_refusal(&store, app, t).unwrap();
        }
        assert!(s.any_live(&store, 3003).unwrap());
        assert!(s.check(&store, app, 3003).is_err());
    }

    #[test]
    fn a_store_without_the_mark_reads_every_record() {
        // a store opened by a build before the mark: no request may skip a ban stored there
        let s = settings(vec![]);
        let store = MemoryStore::default();
        let app = Subject::App("a");
        assert!(s.any_live(&store, 1000).unwrap());
        for t in 1000..1003 {
            s.record_refusal(&store, app, t).unwrap();
        }
        // writers never create the mark: it stays absent, and every request keeps looking
        assert!(store.get(LIVE_KEY).unwrap().is_none());
        assert!(s.any_live(&store, 5000).unwrap());
        assert!(s.check(&store, app, 1500).is_err());
        // an unreadable mark counts as live too
        store.set(LIVE_KEY, b"xyz", None).unwrap();
        assert!(s.any_live(&store, 5000).unwrap());
    }

    #[test]
    fn a_ban_the_mark_cannot_cover_is_not_stored() {
        // fail closed the other way round: a ban no request would look for is never written;
        // the refusal that would start it reports the store's error
        let s = settings(vec![]);
        let store = Watched {
            refuse_writes_to: Some(LIVE_KEY),
            ..Default::default()
        };
        mark_new_store(&store.inner).unwrap();
        let app = Subject::App("a");
        s.record_refusal(&store, app, 1000).unwrap();
        s.record_refusal(&store, app, 1001).unwrap();
        assert!(matches!(
            s.record_refusal(&store, app, 1002),
            Err(StoreError::Contention)
        ));
        assert!(s.check(&store, app, 1002).is_ok());
        assert!(!s.any_live(&store, 1002).unwrap());
    }

    /// A policy with bans after `threshold` refusals, and a new store opened for it.
    fn opened(threshold: u32) -> (crate::policy::Policy, Watched, crate::store::StoreMeta) {
        let doc = serde_json::json!({
            "version": 1,
            "apis": [{"id": "t", "method": "GET", "path": "/t", "level": "S0", "service_object": "toB",
                      "access": "read", "user_auth": false, "personal_info": false, "function": "t"}],
            "apps": [{"id": "a"}],
            "bans": {"threshold": threshold, "window_seconds": 60, "ban_seconds": 600}
        });
        let secrets = std::collections::HashMap::<String, String>::new();
        let mut policy = crate::policy::Policy::from_json(&doc.to_string(), &secrets).unwrap();
        let store = Watched::default();
        let meta = crate::local::open(&store, [3; 16], 999, &mut policy).unwrap();
        (policy, store, meta)
    }

    #[test]
    fn a_batch_reads_the_mark_once_and_no_record_while_no_ban_is_in_force() {
        use crate::state::{BanSubject, Batch, Op};
        let (policy, store, meta) = opened(3);
        let ip = BanSubject::Ip("192.0.2.9".parse().unwrap());
        let app = BanSubject::App("a".into());
        let batch = Batch {
            now: 1000,
            ops: vec![Op::Ban(ip.clone()), Op::Ban(app.clone())],
        };
        let (before, live_before) = (store.total_reads(), store.reads(LIVE_KEY));
        let answer = crate::local::run_local(&policy, &store, &meta, &batch);
        assert!(answer.refused.is_none());
        // one read for two subjects, and it was the mark's
        assert_eq!(store.total_reads() - before, 1);
        assert_eq!(store.reads(LIVE_KEY) - live_before, 1);
        // a ban on the app: both subjects' records are read again, and the app is refused
        for t in 1000..1003 {
            let refusal = Batch {
                now: t,
                ops: vec![Op::Refusal(app.clone())],
            };
            crate::local::run_local(&policy, &store, &meta, &refusal);
        }
        let answer = crate::local::run_local(&policy, &store, &meta, &Batch { now: 1003, ..batch });
        assert_eq!(
            answer.refused.map(|d| d.reason),
            Some(crate::error::DenyReason::Banned)
        );
    }

    #[test]
    fn an_event_reads_the_mark_once_for_its_batches_and_again_after_a_counted_refusal() {
        use crate::local::{run_local_in, MarkRead};
        use crate::state::{Answer, BanSubject, Batch, Op};
        let (policy, store, meta) = opened(1);
        let run = |op: Op, mark: &mut MarkRead| -> Answer {
            let batch = Batch {
                now: 1000,
                ops: vec![op],
            };
            run_local_in(&policy, &store, &meta, &batch, mark)
        };
        let ip = BanSubject::Ip("192.0.2.9".parse().unwrap());
        let app = BanSubject::App("a".into());
        // the opening batch (the source), then the next (the app), in one event: one read
        let mut mark = MarkRead::default();
        let live_before = store.reads(LIVE_KEY);
        let before = store.total_reads();
        let a = run(Op::Ban(ip), &mut mark);
        let b = run(Op::Ban(app.clone()), &mut mark);
        assert!(a.refused.is_none() && b.refused.is_none());
        assert_eq!(store.reads(LIVE_KEY) - live_before, 1);
        assert_eq!(store.total_reads() - before, 1);
        // a batch that counts a refusal (threshold 1: it bans the app) makes the event read the
        // mark again, so its next check sees the ban
        let counted = run(Op::Refusal(app.clone()), &mut mark);
        assert!(counted.ban_started.is_some());
        let after = run(Op::Ban(app.clone()), &mut mark);
        assert_eq!(
            after.refused.map(|d| d.reason),
            Some(crate::error::DenyReason::Banned)
        );
        // and a new event reads it afresh
        let fresh = run(Op::Ban(app), &mut MarkRead::default());
        assert_eq!(
            fresh.refused.map(|d| d.reason),
            Some(crate::error::DenyReason::Banned)
        );
    }

    #[test]
    fn fingerprints_are_keyed_by_the_store_salt() {
        let ip = |s: &str| Subject::Ip(s.parse().unwrap());
        let mut a = settings(vec![]);
        a.keyed([1; 16]);
        let mut b = settings(vec![]);
        b.keyed([2; 16]);
        let src = ip("192.0.2.7");
        // the same subject under the same salt: the same record; another salt: another
        assert_eq!(a.fingerprint(src), a.fingerprint(src));
        assert_ne!(a.fingerprint(src), b.fingerprint(src));
        // one IPv6 /64 is one source; a mapped IPv4 address is that IPv4 source
        assert_eq!(
            a.fingerprint(ip("2001:db8:1:2::1")),
            a.fingerprint(ip("2001:db8:1:2::ff"))
        );
        assert_ne!(
            a.fingerprint(ip("2001:db8:1:2::1")),
            a.fingerprint(ip("2001:db8:1:3::1"))
        );
        assert_eq!(a.fingerprint(ip("::ffff:192.0.2.7")), a.fingerprint(src));
        // an app and a source never share a fingerprint by their bytes
        assert_ne!(a.fingerprint(Subject::App("192.0.2.7")), a.fingerprint(src));
    }

    #[test]
    fn threshold_window_ban_and_expiry() {
        let s = settings(vec![]);
        let store = MemoryStore::default();
        let app = Subject::App("a");
        assert!(!s.record_refusal(&store, app, 1000).unwrap());
        assert!(!s.record_refusal(&store, app, 1010).unwrap());
        s.check(&store, app, 1010).unwrap();
        assert!(
            s.record_refusal(&store, app, 1020).unwrap(),
            "third refusal bans"
        );
        assert_eq!(
            s.check(&store, app, 1021).unwrap_err().reason,
            DenyReason::Banned
        );
        s.check(&store, Subject::App("b"), 1021).unwrap();
        assert!(
            s.check(&store, app, 1020 + 600).is_ok(),
            "bans expire by themselves"
        );
        // refusals spread wider than the window never ban
        let ip = Subject::Ip("192.0.2.1".parse().unwrap());
        for t in [0u64, 70, 140, 210] {
            assert!(!s.record_refusal(&store, ip, 5000 + t).unwrap());
        }
    }

    #[test]
    fn active_bans_are_counted_by_subject_until_they_end_or_are_lifted() {
        let s = settings(vec![]);
        let store = MemoryStore::default();
        let ip = Subject::Ip("192.0.2.7".parse().unwrap());
        for t in 0..3 {
            s.record_refusal(&store, Subject::App("a"), 1_800_000_000 + t)
                .unwrap();
            s.record_refusal(&store, ip, 1_800_000_000 + t).unwrap();
        }
        s.record_refusal(&store, Subject::App("b"), 1_800_000_000)
            .unwrap(); // counted, not banned
        let apps = ["a", "b", "c"];
        let active = |s: &BanSettings, now| {
            (
                s.active_apps(&store, apps.into_iter(), now).unwrap(),
                s.active_sources(&store, 0..s.ip_slots, now).unwrap(),
            )
        };
        assert_eq!(active(&s, 1_800_000_010), (1, 1));
        let lifted = settings(vec![RawLift {
            app: Some("a".into()),
            ip: None,
            at: "2027-01-15T08:00:05Z".into(),
            by: "ops".into(),
            reason: "checked".into(),
        }]);
        assert_eq!(active(&lifted, 1_800_000_010), (0, 1));
        let after = 1_800_000_002 + s.ban_seconds;
        assert_eq!(active(&s, after), (0, 0));
    }

    #[test]
    fn operator_lift_voids_earlier_bans() {
        let store = MemoryStore::default();
        let app = Subject::App("a");
        let s = settings(vec![]);
        for t in 0..3 {
            s.record_refusal(&store, app, 1_800_000_000 + t).unwrap();
        }
        assert!(s.check(&store, app, 1_800_000_010).is_err());
        let lifted = settings(vec![RawLift {
            app: Some("a".into()),
            ip: None,
            at: "2027-01-15T08:00:05Z".into(), // 1_800_000_005
            by: "ops".into(),
            reason: "partner fixed its clock".into(),
        }]);
        lifted.check(&store, app, 1_800_000_010).unwrap();
        // a new ban after the lift applies again
        for t in 20..23 {
            lifted
                .record_refusal(&store, app, 1_800_000_000 + t)
                .unwrap();
        }
        assert!(lifted.check(&store, app, 1_800_000_030).is_err());
    }

    /// Issue 8, hole 13: an IPv6 host owns a /64; rotating addresses inside it is one source.
    #[test]
    fn ipv6_sources_count_by_prefix() {
        let s = settings(vec![]);
        let store = MemoryStore::default();
        let ip = |x: &str| Subject::Ip(x.parse().unwrap());
        s.record_refusal(&store, ip("2001:db8:1:2::1"), 100)
            .unwrap();
        s.record_refusal(&store, ip("2001:db8:1:2:aaaa::9"), 100)
            .unwrap();
        assert!(s
            .record_refusal(&store, ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), 100)
            .unwrap());
        assert!(s.check(&store, ip("2001:db8:1:2::77"), 101).is_err());
        s.check(&store, ip("2001:db8:1:3::1"), 101).unwrap();
        assert_eq!(
            s.describe(ip("2001:db8:1:2::1")),
            "source 2001:db8:1:2::/64"
        );
    }

    #[test]
    fn an_imposed_ban_holds_and_does_not_extend_a_live_one() {
        let s = settings(vec![]);
        let store = MemoryStore::default();
        let ip = Subject::Ip("192.0.2.9".parse().unwrap());
        assert!(s.impose(&store, ip, 100, 50).unwrap());
        assert_eq!(
            s.check(&store, ip, 149).unwrap_err().reason,
            DenyReason::Banned
        );
        assert!(
            !s.impose(&store, ip, 120, 500).unwrap(),
            "a live ban is not extended"
        );
        s.check(&store, ip, 150).unwrap();
        s.check(&store, Subject::Ip("192.0.2.10".parse().unwrap()), 120)
            .unwrap();
    }

    /// An IPv4-mapped IPv6 source is its IPv4 address, not the one /64 every mapped address
    /// shares.
    #[test]
    fn mapped_ipv4_sources_are_their_own() {
        let s = settings(vec![]);
        let a: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(s.source(a), "192.0.2.1");
        assert_ne!(s.source("::ffff:192.0.2.2".parse().unwrap()), s.source(a));
    }

    #[test]
    fn ip_flood_stays_bounded() {
        let s = settings(vec![]);
        let store = MemoryStore::default();
        for i in 0..5000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            s.record_refusal(&store, Subject::Ip(ip), 100).unwrap();
        }
        assert_eq!(store.key_count(), 2);
        assert!(store.value_bytes() <= 2 * 4 * ENTRY);
    }
}
