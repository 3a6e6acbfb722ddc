//! Unit tests of the parent module.

use super::*;

const P256_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqIVYZVLCrPZHGHjP17CTW0/+D9Lf\nw0EkjqF7xB4FivAxzic30tMM4GF+hR6Dxh71Z50VGGdldkkDXZCnTNnoXQ==\n-----END PUBLIC KEY-----\n";

fn base() -> serde_json::Value {
    serde_json::json!({
        "version": 1,
        "apis": [
            {"id": "quote", "method": "GET", "path": "/api/v1/quotes/{symbol}", "level": "S0",
             "service_object": "toC", "access": "read", "user_auth": false, "personal_info": false, "function": "market_data"},
            {"id": "quote-all", "method": "GET", "path": "/api/v1/quotes/all", "level": "S1",
             "service_object": "toB", "access": "read", "user_auth": false, "personal_info": false, "function": "market_data"}
        ],
        "apps": [
            {"id": "app-a", "credentials": [
                {"id": "a-hmac", "alg": "hmac-sha256", "secret_env": "SECRET_A"},
                {"id": "a-p256", "alg": "ecdsa-p256-sha256", "public_key_pem": P256_PEM}
            ]}
        ]
    })
}

fn secrets() -> HashMap<String, String> {
    HashMap::from([(
        "SECRET_A".to_string(),
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".to_string(),
    )])
}

fn compile(v: serde_json::Value) -> Result<Policy, ConfigError> {
    Policy::from_json(&v.to_string(), &secrets())
}

#[test]
fn valid_policy_compiles_and_matches_most_specific() {
    let p = compile(base()).unwrap();
    assert_eq!(
        p.match_api(Method::Get, "/api/v1/quotes/600000")
            .unwrap()
            .id,
        "quote"
    );
    assert_eq!(
        p.match_api(Method::Get, "/api/v1/quotes/all").unwrap().id,
        "quote-all"
    );
    assert!(p.match_api(Method::Post, "/api/v1/quotes/all").is_none());
    assert!(p.match_api(Method::Get, "/api/v1/quotes/").is_none());
    assert!(p.match_api(Method::Get, "/api/v1/quotes/a/b").is_none());
    assert!(p.match_api(Method::Get, "api/v1/quotes/a").is_none());
    let app = p.app("app-a").unwrap();
    assert!(
        matches!(app.credential("a-hmac").unwrap().key, KeyMaterial::Hmac(ref k) if k.bytes().len() == 32)
    );
    assert!(
        matches!(app.credential("a-p256").unwrap().key, KeyMaterial::P256 { ref spki_der, .. } if spki_der.len() == 91)
    );
}

#[test]
fn secret_never_in_debug_output() {
    let p = compile(base()).unwrap();
    let dbg = format!("{p:?}");
    assert!(dbg.contains("<redacted>"));
    assert!(!dbg.contains("48, 49, 50"));
}

/// Each mutation must be refused with a message naming the field.
#[test]
fn bad_policies_are_refused_naming_the_field() {
    type Mutation = fn(&mut serde_json::Value);
    let cases: Vec<(&str, Mutation)> = vec![
        ("version", |v| v["version"] = 2.into()),
        ("unknown field", |v| v["gatewya"] = serde_json::json!({})),
        ("unknown field", |v| v["apis"][0]["levle"] = "S1".into()),
        ("unknown variant", |v| v["apis"][0]["level"] = "S4".into()),
        ("apis[1].id", |v| v["apis"][1]["id"] = "quote".into()),
        ("apis[0].method", |v| v["apis"][0]["method"] = "get".into()),
        ("apis[0].path", |v| v["apis"][0]["path"] = "api/v1".into()),
        ("apis[0].path", |v| {
            v["apis"][0]["path"] = "/api/{a}x".into()
        }),
        ("apis[0].path", |v| {
            v["apis"][0]["path"] = "/api/{a}/{a}".into()
        }),
        ("apis[1].path", |v| {
            v["apis"][1]["path"] = "/api/v1/quotes/{other}".into()
        }),
        ("apis[0].function", |v| {
            v["apis"][0]["function"] = " ".into()
        }),
        ("apis[0].level", |v| {
            v["apis"][0]["personal_info"] = true.into()
        }),
        ("apis", |v| v["apis"] = serde_json::json!([])),
        ("gateway.clock_skew_seconds", |v| {
            v["gateway"] = serde_json::json!({"clock_skew_seconds": 0})
        }),
        (
            "gateway.nonce_lifetime_seconds",
            |v| {
                v["gateway"] =
                    serde_json::json!({"clock_skew_seconds": 300, "nonce_lifetime_seconds": 400})
            },
        ),
        ("gateway.replay.slots", |v| {
            v["gateway"] = serde_json::json!({"replay": {"slots": 0}})
        }),
        ("gateway.required_components[0]", |v| {
            v["gateway"] = serde_json::json!({"required_components": ["X-Upper"]})
        }),
        ("apps[0].credentials[0].secret_env", |v| {
            v["apps"][0]["credentials"][0]["secret_env"] = "MISSING_VAR".into()
        }),
        ("apps[0].credentials[0].public_key_pem", |v| {
            v["apps"][0]["credentials"][0]["public_key_pem"] = P256_PEM.into()
        }),
        ("apps[0].credentials[1].public_key_pem", |v| {
            v["apps"][0]["credentials"][1]["public_key_pem"] =
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----".into()
        }),
        ("apps[0].credentials[1].id", |v| {
            v["apps"][0]["credentials"][1]["id"] = "a-hmac".into()
        }),
        ("apps[1].id", |v| {
            let dup = v["apps"][0].clone();
            v["apps"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"id": dup["id"], "credentials": []}));
        }),
        ("unknown variant", |v| {
            v["apps"][0]["credentials"][0]["alg"] = "rsa-pss-sha512".into()
        }),
    ];
    for (expect, mutate) in cases {
        let mut v = base();
        mutate(&mut v);
        let err = compile(v).expect_err(expect);
        assert!(
            err.to_string().contains(expect),
            "expected '{expect}' in '{err}'"
        );
    }
}

#[test]
fn short_or_invalid_secret_refused() {
    let mut s = secrets();
    s.insert("SECRET_A".into(), "c2hvcnQ=".into());
    let err = Policy::from_json(&base().to_string(), &s).unwrap_err();
    assert!(err.to_string().contains("at least 32"), "{err}");
    s.insert("SECRET_A".into(), "not base64!".into());
    let err = Policy::from_json(&base().to_string(), &s).unwrap_err();
    assert!(err.to_string().contains("not valid base64"), "{err}");
}

#[test]
fn validate_without_secrets_checks_structure() {
    let raw = RawPolicy::from_json(&base().to_string()).unwrap();
    raw.validate().unwrap();
}
