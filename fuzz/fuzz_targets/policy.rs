//! The policy parser and validator: any text is refused with a field-naming error or compiles;
//! it never panics.
#![no_main]
use std::collections::HashMap;

use apisec_core::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let secrets = HashMap::from([("S".to_string(), "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".to_string())]);
    if let Ok(p) = Policy::from_json(text, &secrets) {
        let _ = p.match_api(apisec_core::policy::Method::Get, "/a/b");
    }
});
