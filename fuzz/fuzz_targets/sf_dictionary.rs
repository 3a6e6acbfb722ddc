//! RFC 8941 dictionaries (Signature, Signature-Input): never panics; what parses re-serialises
//! to text that parses to the same value.
#![no_main]
use apisec_core::sf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(dict) = sf::parse_dictionary(text) {
        for (_, member) in &dict {
            if let sf::Member::InnerList(list) = member {
                let again = sf::serialize_inner_list(list);
                let field = format!("a={again}");
                let reparsed = sf::parse_dictionary(&field).expect("serialised inner list parses");
                match reparsed.first() {
                    Some((_, sf::Member::InnerList(l))) => assert_eq!(l, list),
                    other => panic!("re-parsed to {other:?}"),
                }
            }
        }
    }
});
