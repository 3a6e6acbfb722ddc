//! Runs the state behaviour tables (`filter/core/src/state/tables/`) against the cluster
//! backend: the real script, encoded and decoded by the same code the filter runs. It speaks
//! JSON lines so that the test (`tests/test_state_tables.py`) carries each batch to a real
//! webdis in front of a real Redis, as Envoy's callout would:
//!
//! - out: `{"body": "<the callout's body>"}`, then reads one line back:
//!   `{"status": "200", "body": "<webdis's answer>"}`;
//! - out, at the end: `{"done": true, "failures": [...]}`; the exit status is 1 on a failure.
//!
//! Each table gets its own key prefix, and its steps run at their `at` in real time (Redis
//! expires keys in real time).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    clippy::indexing_slicing,
    clippy::panic
)] // a test driver

use std::io::{BufRead, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apisec_core::cluster::{self, Decoded, StateBackend};
use apisec_core::state_tables::{self as table, Table, TABLES};

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn main() {
    let only = std::env::args().nth(1);
    let run = format!("{}", now_secs());
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut out = std::io::stdout();
    let mut failures = Vec::new();
    let mut ask = |body: &[u8]| -> (String, Vec<u8>) {
        let line = serde_json::json!({"body": String::from_utf8_lossy(body)});
        writeln!(out, "{line}").unwrap();
        out.flush().unwrap();
        let reply: serde_json::Value =
            serde_json::from_str(&lines.next().expect("an answer").unwrap()).unwrap();
        (
            reply["status"].as_str().unwrap_or("").to_string(),
            reply["body"].as_str().unwrap_or("").as_bytes().to_vec(),
        )
    };
    for (name, text) in TABLES {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let table: Table = serde_json::from_str(text).unwrap();
        let state = serde_json::json!({"state": {"backend": "cluster", "cluster": {
            "envoy_cluster": "apisec_state", "key_prefix": format!("tables:{run}:{name}:")}}});
        let policy = table::policy_with(&table, &state).unwrap();
        let StateBackend::Cluster(settings) = &policy.state else {
            panic!("no cluster state")
        };
        // a second from now, so that the store's horizon (set by the first batch at its `now`)
        // lies before every nonce the table creates
        let start = now_secs() + 1;
        for (n, step) in table.steps.iter().enumerate() {
            while now_secs() < start + step.at {
                std::thread::sleep(Duration::from_millis(100));
            }
            let batch = table::batch(step, start).unwrap();
            let mut full = false;
            let answer = loop {
                let call = cluster::encode(&policy.cluster_params(), settings, &batch, full);
                let (status, body) = ask(&call.body);
                match cluster::decode(&batch, full, Some(status.as_str()), &body) {
                    Decoded::LoadScript if !full => full = true,
                    Decoded::LoadScript => panic!("the store refused the script"),
                    Decoded::Answer(a) => break a,
                }
            };
            if let Err(e) = table::check(name, n, step, &answer) {
                failures.push(e);
            }
        }
    }
    let line = serde_json::json!({"done": true, "failures": failures});
    let mut out = std::io::stdout();
    writeln!(out, "{line}").unwrap();
    std::process::exit(i32::from(!failures.is_empty()));
}
