//! Sessions on the local backend (Envoy's shared data of this gateway): placed in slots, the
//! app's own share of them first, bounded, evicted idle-longest within the app, ended by an
//! operator's mark.

use sha2::Digest as _;

use crate::crypto::hex;
use crate::error::{Deny, DenyReason};
use crate::sessions::*;
use crate::store::{create_if_absent, SharedStore, StoreError, StoreMeta};

const MAX_CAS_RETRIES: usize = 16;

pub(crate) fn slot_key(slot: u32) -> String {
    crate::state::numbered_key("apisec/session/", u64::from(slot))
}

pub(crate) fn mark_key(kind: &str, name: &str, meta: &StoreMeta) -> String {
    let h = meta.keyed(b"session-mark", &[kind.as_bytes(), name.as_bytes()]);
    format!(
        "apisec/session-end/{kind}/{}",
        hex(h.get(..12).unwrap_or(&h))
    )
}

/// Where a session of `app` lives: one of the app's own slots (keyed hashes of the app), picked
/// by the ID. A full slot then evicts only sessions of the app that fills it (SES-1: one
/// partner cannot push out another's end users); the tag is a keyed hash of the ID.
pub(crate) fn place(meta: &StoreMeta, settings: &Sessions, app: &str, id: &str) -> (u32, String) {
    let word = |h: &[u8; 32]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(h.get(..8).unwrap_or(&[0; 8]));
        u64::from_le_bytes(w)
    };
    let h = meta.keyed(b"session", &[id.as_bytes()]);
    let (k, _) = settings.app_slots();
    let j = word(&h) % u64::from(k);
    let a = meta.keyed(b"session-app", &[app.as_bytes(), &j.to_le_bytes()]);
    let slot = (word(&a) % u64::from(settings.slots.max(1))) as u32;
    let tag = hex(h.get(8..24).unwrap_or(&[]));
    (slot, tag)
}

pub(crate) fn unavailable(e: StoreError) -> Deny {
    Deny::new(DenyReason::HostUnavailable, format!("session store: {e}"))
}

pub(crate) fn read_slot(
    store: &dyn SharedStore,
    key: &str,
) -> Result<(Vec<Session>, Option<u32>), Deny> {
    match store.get(key).map_err(unavailable)? {
        None => Ok((Vec::new(), None)),
        Some((v, cas)) if v.is_empty() => Ok((Vec::new(), Some(cas))),
        Some((v, cas)) => serde_json::from_slice(&v)
            .map(|s| (s, Some(cas)))
            .map_err(|e| Deny::new(DenyReason::HostUnavailable, format!("session slot: {e}"))),
    }
}

/// Writes a slot with compare-and-swap; Ok(false) when another worker wrote first.
pub(crate) fn write_slot(
    store: &dyn SharedStore,
    key: &str,
    sessions: &[Session],
    cas: Option<u32>,
) -> Result<bool, Deny> {
    let text = serde_json::to_vec(sessions)
        .map_err(|e| Deny::new(DenyReason::HostUnavailable, format!("session slot: {e}")))?;
    match cas {
        Some(c) => store.set(key, &text, Some(c)).map_err(unavailable),
        None => create_if_absent(store, key, &text).map_err(unavailable),
    }
}

/// The counter that numbers sessions in the order they are created on this store.
const SEQ_KEY: &str = "apisec/session-seq";

/// The number of the last session created (0 before the first).
fn last_seq(store: &dyn SharedStore) -> Result<u64, Deny> {
    Ok(match store.get(SEQ_KEY).map_err(unavailable)? {
        Some((v, _)) => crate::store::u64_at(&v, 0),
        None => 0,
    })
}

/// Takes the next session number.
fn next_seq(store: &dyn SharedStore) -> Result<u64, Deny> {
    crate::store::update(store, SEQ_KEY, |v| {
        let n = crate::store::u64_at(v, 0).saturating_add(1);
        (Some(n.to_le_bytes().to_vec()), n)
    })
    .map_err(unavailable)
}

/// Where an operator's end of every session of an app or user stands: sessions numbered up
/// to it are ended (written as `seq:<n>`). A mark written by a build before session numbers
/// holds the second of the end and is compared with the session's creation time.
pub(crate) enum Mark {
    None,
    Seq(u64),
    Time(u64),
}

impl Mark {
    fn ends(&self, s: &Session) -> bool {
        match *self {
            Mark::None => false,
            Mark::Seq(n) => s.seq <= n,
            Mark::Time(t) => s.created <= t,
        }
    }
}

pub(crate) fn mark(store: &dyn SharedStore, key: &str) -> Result<Mark, Deny> {
    Ok(match store.get(key).map_err(unavailable)? {
        Some((v, _)) => Mark::parse(&v),
        None => Mark::None,
    })
}

impl Mark {
    fn parse(v: &[u8]) -> Mark {
        let text = std::str::from_utf8(v).unwrap_or("");
        match text.strip_prefix("seq:") {
            Some(n) => n.parse().map(Mark::Seq),
            None => text.parse().map(Mark::Time),
        }
        // unreadable: treat every session as ended (fail closed)
        .unwrap_or(Mark::Seq(u64::MAX))
    }
}

pub(crate) fn live(s: &Session, settings: &Sessions, now: u64) -> bool {
    now.saturating_sub(s.last_seen) <= settings.idle_timeout_seconds
        && now.saturating_sub(s.created) <= settings.max_lifetime_seconds
}

/// Result of establishing a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// An older idle session had to make room (counted as an eviction).
    pub evicted: bool,
}

/// What an edit of a slot came to: write the slot back, or leave it as it was.
pub(crate) enum Edit<T> {
    Write(T),
    Keep(T),
}

/// Reads the slot session `id` lands in, lets `edit` change it (given the session's tag), and
/// writes it back with compare-and-swap; from the start again when another worker wrote first.
pub(crate) fn update<T>(
    store: &dyn SharedStore,
    meta: &StoreMeta,
    settings: &Sessions,
    app: &str,
    id: &str,
    mut edit: impl FnMut(&mut Vec<Session>, &str) -> Result<Edit<T>, Deny>,
) -> Result<T, Deny> {
    let (slot, tag) = place(meta, settings, app, id);
    let key = slot_key(slot);
    for _ in 0..MAX_CAS_RETRIES {
        let (mut all, cas) = read_slot(store, &key)?;
        match edit(&mut all, &tag)? {
            Edit::Keep(out) => return Ok(out),
            Edit::Write(out) => {
                if write_slot(store, &key, &all, cas)? {
                    return Ok(out);
                }
            }
        }
    }
    Err(Deny::new(
        DenyReason::HostUnavailable,
        "session slot kept changing",
    ))
}

/// Records a new session. When its slot is full, expired sessions are dropped first, then
/// the one idle longest is evicted.
pub fn create(
    store: &dyn SharedStore,
    meta: &StoreMeta,
    settings: &Sessions,
    id: &str,
    session: Session,
    now: u64,
) -> Result<Created, Deny> {
    let (_, per_slot) = settings.app_slots();
    let app = session.app.clone();
    let seq = next_seq(store)?;
    update(store, meta, settings, &app, id, |all, tag| {
        all.retain(|s| live(s, settings, now) && s.tag != tag);
        let mut evicted = false;
        let own = all.iter().filter(|s| s.app == app).count();
        if own >= per_slot as usize || all.len() >= settings.entries_per_slot as usize {
            // only the establishing app's own session idle longest makes room
            let oldest = all
                .iter()
                .enumerate()
                .filter(|(_, s)| s.app == app)
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => {
                    all.remove(i);
                    evicted = true;
                }
                None => {
                    return Err(Deny::new(
                        DenyReason::SessionStoreFull,
                        "the session slot is full of other apps' live sessions",
                    ))
                }
            }
        }
        all.push(Session {
            tag: tag.to_string(),
            seq,
            ..session.clone()
        });
        Ok(Edit::Write(Created { evicted }))
    })
}

/// A call presenting a session: it must be live, of the same app, from the bound IP (unless
/// the app is IP-unbound) and MAC, not ended by an operator; it is refreshed. Returns the
/// session as it now is.
pub fn touch(
    store: &dyn SharedStore,
    meta: &StoreMeta,
    settings: &Sessions,
    p: &Presented<'_>,
    now: u64,
) -> Result<Session, Deny> {
    check(store, meta, settings, p, now, true)
}

/// The session a call presents, checked like [`touch`] but not refreshed: read before the
/// call is authorized, for the user it carries.
pub fn read(
    store: &dyn SharedStore,
    meta: &StoreMeta,
    settings: &Sessions,
    p: &Presented<'_>,
    now: u64,
) -> Result<Session, Deny> {
    check(store, meta, settings, p, now, false)
}

pub(crate) fn check(
    store: &dyn SharedStore,
    meta: &StoreMeta,
    settings: &Sessions,
    p: &Presented<'_>,
    now: u64,
    refresh: bool,
) -> Result<Session, Deny> {
    update(store, meta, settings, p.app, p.id, |all, tag| {
        let Some(s) = all.iter_mut().find(|s| s.tag == tag) else {
            return Err(Misuse::Unknown.deny());
        };
        if now.saturating_sub(s.created) > settings.max_lifetime_seconds {
            return Err(Misuse::Lifetime.deny());
        }
        if now.saturating_sub(s.last_seen) > settings.idle_timeout_seconds {
            return Err(Misuse::Idle(now.saturating_sub(s.last_seen)).deny());
        }
        if s.app != p.app {
            return Err(Misuse::OtherApp.deny());
        }
        if s.ip != p.ip && !settings.ip_unbound_apps.contains(&s.app) {
            return Err(Misuse::OtherIp.deny());
        }
        if s.mac != p.mac {
            return Err(Misuse::OtherMac.deny());
        }
        let app_end = mark(store, &mark_key("app", &s.app, meta))?;
        let user_end = match &s.user {
            Some(u) => mark(store, &mark_key("user", u, meta))?,
            None => Mark::None,
        };
        if app_end.ends(s) || user_end.ends(s) {
            return Err(Misuse::EndedByOperator.deny());
        }
        if !refresh {
            return Ok(Edit::Keep(s.clone()));
        }
        s.last_seen = now;
        Ok(Edit::Write(s.clone()))
    })
}

/// Removes one session of `app` (logout by its holder, or an operator's end of one session,
/// tried for each registered app). Returns the removed session, None if there was none.
pub fn remove(
    store: &dyn SharedStore,
    meta: &StoreMeta,
    settings: &Sessions,
    app: &str,
    id: &str,
) -> Result<Option<Session>, Deny> {
    update(store, meta, settings, app, id, |all, tag| {
        Ok(
            match all.iter().position(|s| s.tag == tag && s.app == app) {
                Some(i) => Edit::Write(Some(all.remove(i))),
                None => Edit::Keep(None),
            },
        )
    })
}

/// Counts an establish of `app` from `source` at `now` (fixed one-minute windows) and refuses
/// it past `establish_per_minute` for the app or `establish_per_source_per_minute` for the app
/// and that source (the 64 busiest sources of the app are tracked).
pub fn admit_establish(
    store: &dyn SharedStore,
    settings: &Sessions,
    app: &str,
    source: &str,
    now: u64,
) -> Result<(), Deny> {
    let fp = {
        let h = sha2::Sha256::digest(source.as_bytes());
        let mut f = [0u8; 8];
        f.copy_from_slice(h.get(..8).unwrap_or(&[0; 8]));
        f
    };
    let key = format!("apisec/session-rate/{app}");
    let (total, from) =
        crate::store::count_in_window(store, &key, now / 60, Some(fp), 64).map_err(unavailable)?;
    if total > u64::from(settings.establish_per_minute) {
        return Err(Deny::new(
            DenyReason::SessionRateLimited,
            format!(
                "app {app}: {total} establishes this minute, at most {}",
                settings.establish_per_minute
            ),
        ));
    }
    if from > u64::from(settings.establish_per_source_per_minute) {
        return Err(Deny::new(
            DenyReason::SessionRateLimited,
            format!(
                "app {app} from {source}: {from} establishes this minute, at most {}",
                settings.establish_per_source_per_minute
            ),
        ));
    }
    Ok(())
}

/// An operator ends every session of an app or of a user created so far, at once, by a mark
/// (the number of the last session created) every later use checks. (One session: [`remove`].)
pub fn end_all(
    store: &dyn SharedStore,
    meta: &StoreMeta,
    kind: &str,
    name: &str,
) -> Result<(), Deny> {
    let key = mark_key(kind, name, meta);
    let last = last_seq(store)?;
    for _ in 0..MAX_CAS_RETRIES {
        let (current, cas) = match store.get(&key).map_err(unavailable)? {
            Some((v, c)) => (Mark::parse(&v), Some(c)),
            None => (Mark::None, None),
        };
        // never back: another end may have written a later number meanwhile
        let at = match current {
            Mark::Seq(n) => n.max(last),
            Mark::None | Mark::Time(_) => last,
        };
        let text = format!("seq:{at}");
        let done = match cas {
            Some(c) => store
                .set(&key, text.as_bytes(), Some(c))
                .map_err(unavailable)?,
            None => create_if_absent(store, &key, text.as_bytes()).map_err(unavailable)?,
        };
        if done {
            return Ok(());
        }
    }
    Err(Deny::new(
        DenyReason::HostUnavailable,
        "session mark kept changing",
    ))
}

/// Binds the logged-in user and the number of factors to a session (ID-4). False when the
/// session is gone.
pub fn set_user(
    store: &dyn SharedStore,
    meta: &StoreMeta,
    settings: &Sessions,
    app: &str,
    id: &str,
    user: &str,
    factors: u8,
) -> Result<bool, Deny> {
    update(store, meta, settings, app, id, |all, tag| {
        Ok(match all.iter_mut().find(|s| s.tag == tag) {
            Some(s) => {
                s.user = Some(user.to_string());
                s.factors = factors;
                Edit::Write(true)
            }
            None => Edit::Keep(false),
        })
    })
}
