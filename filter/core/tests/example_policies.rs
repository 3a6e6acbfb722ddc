//! Every shipped example policy passes validation and follows table A.1 of the standard
//! exactly (LVL-5): each names its industry, each API names a row of the table (by `annex_a`,
//! or by a `function` that is a row key), and its level is the row's level; only the gateway's
//! own session endpoints (`sessions.create_api`, `.logout_api`) are no business interface. The table is
//! `policies/annex-a/table-a1.yaml`, the data `apisec compliance` checks against.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)] // test code

use apisec_core::compliance::AnnexA;
use apisec_core::policy::RawPolicy;

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn annex() -> AnnexA {
    let text = std::fs::read_to_string(root().join("policies/annex-a/table-a1.yaml")).unwrap();
    serde_norway::from_str(&text).unwrap()
}

#[test]
fn table_a1_has_every_industry_and_level_of_the_standard() {
    let a = annex();
    let names: Vec<_> = a.industries.keys().map(String::as_str).collect();
    assert_eq!(names, ["funds", "futures", "securities"]);
    for (name, ind) in &a.industries {
        let mut levels: Vec<_> = ind.rows.iter().map(|r| r.level.as_str()).collect();
        levels.dedup();
        assert_eq!(levels, ["S0", "S1", "S2", "S3"], "{name}");
        let mut keys: Vec<_> = ind.rows.iter().map(|r| r.key.as_str()).collect();
        keys.sort_unstable();
        let n = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), n, "{name}: duplicate row keys");
    }
    // The row the funds example depends on: 客户持仓份额查询 is S3 for funds.
    let funds = &a.industries["funds"];
    let holdings = funds
        .rows
        .iter()
        .find(|r| r.key == "holdings_query")
        .unwrap();
    assert_eq!(holdings.level.as_str(), "S3");
    assert!(funds
        .rows
        .iter()
        .any(|r| r.key == "trading" && r.modules.contains("客户持仓份额查询")));
}

#[test]
fn example_policies_validate_and_follow_table_a1_exactly() {
    let a = annex();
    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("policies")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let raw: RawPolicy =
            serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        raw.validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let industry = raw
            .industry
            .unwrap_or_else(|| panic!("{}: names no industry", path.display()));
        let table = &a.industries[industry.as_str()];
        // The gateway's own session endpoints are not business interfaces of the table.
        let own: Vec<&str> = raw
            .sessions
            .iter()
            .flat_map(|s| [s.create_api.as_str(), s.logout_api.as_str()])
            .collect();
        for api in raw.apis.iter().filter(|a| !own.contains(&a.id.as_str())) {
            let key = api.annex_a.as_deref().unwrap_or(&api.function);
            let row =
                table.rows.iter().find(|r| r.key == key).unwrap_or_else(|| {
                    panic!("{}: {} names no row ({key})", path.display(), api.id)
                });
            assert_eq!(api.level, row.level, "{}: {}", path.display(), api.id);
        }
        seen += 1;
    }
    assert_eq!(seen, 3, "securities, futures and funds examples");
}
