//! The inventory's path matcher (LVL-1) over arbitrary methods and paths: never panics, and a
//! match is always an API whose method is the request's.
#![no_main]
use std::collections::HashMap;
use std::sync::OnceLock;

use apisec_core::Policy;
use libfuzzer_sys::fuzz_target;

fn policy() -> &'static Policy {
    static P: OnceLock<Policy> = OnceLock::new();
    P.get_or_init(|| {
        let api = |id: &str, m: &str, p: &str| serde_json::json!({"id": id, "method": m, "path": p, "level": "S0",
            "service_object": "toB", "access": "read", "user_auth": false, "personal_info": false, "function": "f"});
        let doc = serde_json::json!({"version": 1, "apis": [
            api("a", "GET", "/api/v1/orders/{id}"), api("b", "GET", "/api/v1/orders/open"),
            api("c", "POST", "/api/v1/orders"), api("d", "GET", "/api/v1/accounts/{a}/positions/{p}"), api("e", "GET", "/")],
            "apps": []});
        Policy::from_json(&doc.to_string(), &HashMap::new()).expect("fuzz policy compiles")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (method, path) = text.split_once(' ').unwrap_or(("GET", text));
    let Some(method) = apisec_core::policy::Method::parse(method) else { return };
    if let Some(api) = policy().match_api(method, path) {
        assert_eq!(api.method, method);
    }
});
