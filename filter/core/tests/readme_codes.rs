//! The partners' refusal table (docs/partners.md, "Refusals") is the caller's contract: every
//! code the gateway can return is documented there with its status, and nothing else is.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)] // test code

use apisec_core::DenyReason;

#[test]
fn readme_documents_every_refusal_code_with_its_status() {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/partners.md"),
    )
    .unwrap();
    for r in DenyReason::ALL {
        let row = format!("| {} | `{}` |", r.status(), r.code());
        assert!(
            readme.contains(&row),
            "docs/partners.md lacks the row {row}"
        );
    }
    let rows = readme
        .lines()
        .filter(|l| l.starts_with("| 4") || l.starts_with("| 5"))
        .count();
    assert_eq!(
        rows,
        DenyReason::ALL.len(),
        "docs/partners.md lists codes the gateway does not have"
    );
}
