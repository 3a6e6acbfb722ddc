//! The host's clock: the glue reads it and hands core `now` (in the Wasm build Envoy's
//! `get_current_time` host call does this; here the process's own clock is Envoy's).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[allow(clippy::disallowed_methods)]
pub fn clock() -> Option<Duration> {
    SystemTime::now().duration_since(UNIX_EPOCH).ok()
}

pub fn now_secs() -> Option<u64> {
    clock().map(|d| d.as_secs())
}
