//! The counted rules on the local backend (Envoy's shared data of this gateway).

use crate::sha256::Sha256;

use super::Watch;
use crate::error::{Deny, DenyReason};
use crate::state::bans::BanSettings;
use crate::state::{BanSubject, Op};
use crate::store::{u64_at, update, SharedStore};

/// How long a known source's last call may be stale before it is written again (a source
/// calling all day costs one write an hour, not one per call).
const SEEN_REFRESH_SECONDS: u64 = 3600;
const SEEN_ENTRY: usize = 16; // fp 8 | last seen 8
/// How many failing sources one signature-failure rule tracks per app, key and window.
const FAILING_SOURCES: usize = 64;

fn fingerprint(s: &str) -> [u8; 8] {
    let d = Sha256::new()
        .chain(b"apisec-source\0")
        .chain(s.as_bytes())
        .finalize();
    let mut fp = [0u8; 8];
    fp.copy_from_slice(d.get(..8).unwrap_or(&[0u8; 8]));
    fp
}

fn window_values(v: &[u8], bucket: u64) -> (u64, u64) {
    if v.len() >= 24 && u64_at(v, 0) == bucket {
        (u64_at(v, 8), u64_at(v, 16))
    } else {
        (0, 0)
    }
}

fn encode3(a: u64, b: u64, c: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    for x in [a, b, c] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Runs a counted rule's operation on the local store (Envoy shared data, every worker of this
/// gateway): a rule that matched goes into `answer.anomalies`, a ban it started into
/// `answer.ban_started`. Err refuses the call: a blocking rule matched (`anomaly_blocked`), or
/// the store could not count a call that a rule must see (`host_unavailable`: fail closed).
pub fn run_local(
    store: &dyn SharedStore,
    bans: Option<&BanSettings>,
    op: &Op,
    now: u64,
    answer: &mut crate::state::Answer,
) -> Result<(), Deny> {
    match op {
        Op::Calls {
            watch,
            bucket,
            window,
            max_calls,
            max_bytes,
        } => count_call(
            store, watch, *bucket, *window, *max_calls, *max_bytes, answer,
        ),
        Op::Bytes {
            watch,
            bucket,
            bytes,
            ..
        } => {
            count_bytes(store, watch, *bucket, *bytes, answer);
            Ok(())
        }
        Op::Source {
            watch,
            source,
            learning,
            max,
            forget,
        } => see_source(store, watch, source, *learning, *max, *forget, now, answer),
        Op::KeyFailure {
            watch,
            keyid,
            bucket,
            threshold,
            ban,
            ..
        } => count_key_failure(
            store,
            bans,
            watch,
            keyid,
            *bucket,
            *threshold,
            ban.as_ref(),
            now,
            answer,
        ),
        _ => Ok(()),
    }
}

fn host(e: crate::store::StoreError) -> Deny {
    Deny::new(DenyReason::HostUnavailable, format!("anomaly counter: {e}"))
}

/// A call toward a bulk-pull rule: counted in its window; past the maximum, an anomaly (and a
/// refusal for a blocking rule, which then counts nothing).
fn count_call(
    store: &dyn SharedStore,
    watch: &Watch,
    bucket: u64,
    window: u64,
    max_calls: u64,
    max_bytes: u64,
    answer: &mut crate::state::Answer,
) -> Result<(), Deny> {
    let key = format!("apisec/anomaly/calls/{}/{}", watch.rule, watch.app);
    let over = update(store, &key, |v| {
        // a window already moved on (a slow request) counts in the newer one
        let bucket = (bucket).max(if v.len() >= 24 { u64_at(v, 0) } else { 0 });
        let (calls, bytes) = window_values(v, bucket);
        let over = (calls >= max_calls || bytes > max_bytes).then(|| {
            format!("{} made {calls} calls and received {bytes} response bytes in this {window} s window", watch.app)
        });
        if over.is_some() && watch.blocks() {
            return (None, over);
        }
        (Some(encode3(bucket, calls.saturating_add(1), bytes)), over)
    })
    .map_err(host)?;
    match over {
        Some(detail) if watch.blocks() => {
            answer.anomalies.push(watch.anomaly());
            Err(watch.refusal(&detail))
        }
        Some(_) => {
            answer.anomalies.push(watch.anomaly());
            Ok(())
        }
        None => Ok(()),
    }
}

/// A let-through call's response bytes, added to its bulk-pull window (never refuses; a
/// window already over counts nothing).
fn count_bytes(
    store: &dyn SharedStore,
    watch: &Watch,
    bucket: u64,
    bytes: u64,
    answer: &mut crate::state::Answer,
) {
    let key = format!("apisec/anomaly/calls/{}/{}", watch.rule, watch.app);
    let added = update(store, &key, |v| {
        let stored = if v.len() >= 24 { u64_at(v, 0) } else { 0 };
        if stored > bucket {
            return (None, false); // that window is over: nothing left to count in it
        }
        let (calls, sum) = window_values(v, bucket);
        (
            Some(encode3(bucket, calls, sum.saturating_add(bytes))),
            true,
        )
    });
    if let Err(e) = added {
        answer.note = Some(format!("response bytes not counted: {e}"));
    }
}

/// The source of an app's call, for a new-sources rule: a source not seen within `forget`
/// seconds is an anomaly once learning is over (a blocking rule refuses it and remembers
/// nothing).
#[allow(clippy::too_many_arguments)] // one operation's fields
fn see_source(
    store: &dyn SharedStore,
    watch: &Watch,
    source: &str,
    learning: bool,
    max: u32,
    forget: u64,
    now: u64,
    answer: &mut crate::state::Answer,
) -> Result<(), Deny> {
    let key = format!("apisec/anomaly/src/{}/{}", watch.rule, watch.app);
    let fp = fingerprint(source);
    let new = update(store, &key, |v| {
        let mut seen: Vec<([u8; 8], u64)> = v
            .chunks_exact(SEEN_ENTRY)
            .map(|c| {
                let mut f = [0u8; 8];
                f.copy_from_slice(c.get(..8).unwrap_or(&[0u8; 8]));
                (f, u64_at(c, 8))
            })
            .collect();
        let live = |last: u64| last.saturating_add(forget) > now;
        let known = seen.iter().position(|(f, last)| *f == fp && live(*last));
        match known {
            Some(i) => {
                let stale = seen
                    .get(i)
                    .is_some_and(|(_, last)| now.saturating_sub(*last) >= SEEN_REFRESH_SECONDS);
                if !stale {
                    return (None, false);
                }
                if let Some(e) = seen.get_mut(i) {
                    e.1 = now;
                }
            }
            None => {
                if watch.blocks() && !learning {
                    return (None, true);
                }
                seen.retain(|(f, last)| live(*last) && *f != fp);
                while seen.len() >= max as usize {
                    let oldest = seen
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, (_, last))| *last)
                        .map(|(i, _)| i);
                    match oldest {
                        Some(i) => {
                            seen.remove(i);
                        }
                        None => break,
                    }
                }
                seen.push((fp, now));
            }
        }
        let mut out = Vec::with_capacity(seen.len() * SEEN_ENTRY);
        for (f, last) in &seen {
            out.extend_from_slice(f);
            out.extend_from_slice(&last.to_le_bytes());
        }
        (Some(out), known.is_none())
    })
    .map_err(host)?;
    if new && !learning {
        answer.anomalies.push(watch.anomaly());
        if watch.blocks() {
            return Err(watch.refusal(&format!("{} never called from {source} before", watch.app)));
        }
    }
    Ok(())
}

/// A signature that did not verify under a valid key id: counted over all sources (the
/// anomaly) and per source (only a source's own failures ban it).
#[allow(clippy::too_many_arguments)] // one operation's fields
fn count_key_failure(
    store: &dyn SharedStore,
    bans: Option<&BanSettings>,
    watch: &Watch,
    keyid: &str,
    bucket: u64,
    threshold: u32,
    ban: Option<&(BanSubject, u64)>,
    now: u64,
    answer: &mut crate::state::Answer,
) -> Result<(), Deny> {
    let key = format!(
        "apisec/anomaly/keyfail/{}/{}/{keyid}",
        watch.rule, watch.app
    );
    // Beside the count over all sources (the anomaly), each failing source's own count
    // in a bounded table: only a source's own failures ban it. Key ids are public, so a
    // stranger's failures under a partner's key id must not ban the partner's address.
    let fp = match (ban, bans) {
        (Some((subject, _)), Some(b)) => Some(b.fingerprint(subject.as_subject())),
        _ => None,
    };
    let counted = crate::store::count_in_window(store, &key, bucket, fp, FAILING_SOURCES);
    let (n, from) = match counted {
        Ok(n) => n,
        Err(e) => {
            answer.note = Some(format!("signature failure not counted: {e}"));
            return Ok(());
        }
    };
    if n < u64::from(threshold) {
        return Ok(());
    }
    answer.anomalies.push(watch.anomaly());
    if from < u64::from(threshold) {
        return Ok(());
    }
    if let (Some((subject, seconds)), Some(b)) = (ban, bans) {
        match b.impose(store, subject.as_subject(), now, *seconds) {
            Ok(true) => {
                answer.ban_started = Some(crate::state::bans::started(
                    &b.describe(subject.as_subject()),
                    *seconds,
                    Some(&watch.rule),
                ))
            }
            Ok(false) => {}
            Err(e) => answer.note = Some(format!("ban not started: {e}")),
        }
    }
    Ok(())
}
