//! Every shipped example policy (Annex A classification, LVL-5) passes validation, and each
//! follows the Annex A levels: market data and public information S0, licensed information S1,
//! account APIs S2, trading S3.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)] // test code

use apisec_core::policy::RawPolicy;
use apisec_core::SecurityLevel;

#[test]
fn example_policies_validate_and_follow_annex_a() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let raw: RawPolicy =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        raw.validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for api in &raw.apis {
            let expected = match api.function.as_str() {
                "market_data" | "public_info" => SecurityLevel::S0,
                "licensed_info" => SecurityLevel::S1,
                "account" | "settlement" => SecurityLevel::S2,
                "trading" | "funds_transfer" => {
                    if api.access == apisec_core::policy::Access::Read {
                        SecurityLevel::S2
                    } else {
                        SecurityLevel::S3
                    }
                }
                other => panic!("{}: unexpected function {other}", path.display()),
            };
            assert_eq!(api.level, expected, "{}: {}", path.display(), api.id);
        }
        seen += 1;
    }
    assert!(seen >= 3, "securities, futures and funds examples");
}
