//! Field permissions over arbitrary bodies: never panics; a filtered response is valid JSON,
//! is the original with bytes removed only, and no longer holds the hidden field.
#![no_main]
use apisec_core::fields;
use libfuzzer_sys::fuzz_target;

fn is_subsequence(small: &[u8], big: &[u8]) -> bool {
    let mut it = big.iter();
    small.iter().all(|c| it.any(|b| b == c))
}

fuzz_target!(|data: &[u8]| {
    let hidden = vec![fields::parse_path("id").unwrap_or_default(), fields::parse_path("a.b").unwrap_or_default()];
    let _ = fields::check_request(&hidden, std::str::from_utf8(data).ok(), Some("application/json"), None, data);
    let _ = fields::check_request(&hidden, None, Some("application/x-www-form-urlencoded"), None, data);
    if let Ok(Some(out)) = fields::filter_response(&hidden, data) {
        assert!(is_subsequence(&out, data), "filtering only removes bytes");
        assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok(), "filtered output is JSON");
        assert_eq!(fields::filter_response(&hidden, &out).ok(), Some(None), "nothing hidden remains");
    }
});
