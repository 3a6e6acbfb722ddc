//! The RFC 9421 signature base builder over arbitrary requests and covered-component lists:
//! never panics and never builds more than the bound.
#![no_main]
use apisec_core::message::{signature_base, Request};
use apisec_core::sf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut parts = text.splitn(4, '\n');
    let (Some(input), Some(path), Some(headers)) = (parts.next(), parts.next(), parts.next()) else { return };
    let req = Request {
        method: "POST".into(),
        scheme: "https".into(),
        authority: "gw.example".into(),
        path_and_query: path.into(),
        headers: headers
            .split('\r')
            .filter_map(|h| h.split_once(':'))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let Ok(dict) = sf::parse_dictionary(input) else { return };
    for (_, member) in &dict {
        if let sf::Member::InnerList(list) = member {
            if let Ok(base) = signature_base(&req, list, 4096) {
                // the bound applies before the final @signature-params line
                assert!(base.len() <= 4096 + 64 + input.len() * 2);
            }
        }
    }
});
