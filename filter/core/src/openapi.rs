//! Drafting inventory entries from an OpenAPI 3 document (`apisec inventory import`, LVL-2):
//! one entry per operation, with what the document can tell (method, path, read or write, a
//! business function from its first tag, a description) and the rest left for a person to set
//! (level, service object, user authentication, personal information), and the difference
//! against the policy's inventory.

use serde_json::Value;

use crate::inventory::RawApi;
use crate::message::Method;

/// One operation of the document, as an inventory entry to complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    pub id: String,
    pub method: &'static str,
    pub path: String,
    pub access: &'static str,
    pub function: String,
    pub description: String,
}

/// What the document and the policy's inventory disagree on.
#[derive(Debug, Clone, Default)]
pub struct Diff {
    /// Operations the inventory does not have.
    pub new: Vec<Draft>,
    /// Inventory APIs the document does not have (id, method, path).
    pub missing: Vec<(String, String, String)>,
    /// Operations the inventory has under another id (policy id, document id).
    pub renamed: Vec<(String, String)>,
}

const METHODS: &[&str] = &["get", "head", "post", "put", "patch", "delete", "options"];

/// An identifier the inventory accepts, from free text.
fn ident(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
            out.push(c);
        } else if !out.ends_with('.') && !out.is_empty() {
            out.push('.');
        }
    }
    out.trim_end_matches('.').chars().take(128).collect()
}

/// The base path of the first server (`https://api.example.com/v1` gives `/v1`).
fn base_path(doc: &Value) -> String {
    let url = doc
        .pointer("/servers/0/url")
        .and_then(Value::as_str)
        .unwrap_or("");
    let path = match url.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("", |i| rest.get(i..).unwrap_or("")),
        None => url,
    };
    path.trim_end_matches('/').to_string()
}

/// The operations of an OpenAPI 3 document, in document order.
pub fn drafts(doc: &Value) -> Result<Vec<Draft>, String> {
    let version = doc.get("openapi").and_then(Value::as_str).unwrap_or("");
    if !version.starts_with("3.") {
        return Err(format!(
            "not an OpenAPI 3 document (openapi: {version:?}); convert Swagger 2 first"
        ));
    }
    let paths = doc
        .get("paths")
        .and_then(Value::as_object)
        .ok_or("the document has no paths")?;
    let base = base_path(doc);
    let mut out = Vec::new();
    for (path, item) in paths {
        for m in METHODS {
            let Some(op) = item.get(*m) else { continue };
            let method = Method::parse(&m.to_ascii_uppercase())
                .map(Method::as_str)
                .ok_or_else(|| format!("method {m}"))?;
            let full = format!("{base}{path}");
            let id = op
                .get("operationId")
                .and_then(Value::as_str)
                .map(ident)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| ident(&format!("{m} {}", full.replace(['{', '}'], ""))));
            let function = op
                .pointer("/tags/0")
                .and_then(Value::as_str)
                .map(ident)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "unclassified".into());
            out.push(Draft {
                id,
                method,
                access: if matches!(method, "GET" | "HEAD" | "OPTIONS") {
                    "read"
                } else {
                    "write"
                },
                path: full,
                function,
                description: op
                    .get("summary")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            });
        }
    }
    Ok(out)
}

/// A path template with its parameter names left out: `/a/{id}` and `/a/{order_id}` are one.
fn shape(path: &str) -> String {
    path.split('/')
        .map(|s| {
            if s.starts_with('{') && s.ends_with('}') {
                "{}"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The drafts against the inventory: new operations, APIs the document lacks, renamed ones.
pub fn diff(drafts: &[Draft], apis: &[RawApi]) -> Diff {
    let mut d = Diff::default();
    for dr in drafts {
        match apis
            .iter()
            .find(|a| a.method.eq_ignore_ascii_case(dr.method) && shape(&a.path) == shape(&dr.path))
        {
            None => d.new.push(dr.clone()),
            Some(a) if a.id != dr.id => d.renamed.push((a.id.clone(), dr.id.clone())),
            Some(_) => {}
        }
    }
    for a in apis {
        let known = drafts.iter().any(|dr| {
            a.method.eq_ignore_ascii_case(dr.method) && shape(&a.path) == shape(&dr.path)
        });
        if !known {
            d.missing
                .push((a.id.clone(), a.method.clone(), a.path.clone()));
        }
    }
    d
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn operations_become_drafts_and_differences_are_found() {
        let doc = serde_json::json!({
            "openapi": "3.0.3",
            "servers": [{"url": "https://api.example.com/api/v1/"}],
            "paths": {
                "/orders/{orderId}": {
                    "get": {"operationId": "getOrder", "tags": ["trading"], "summary": "One order"},
                    "delete": {"tags": ["trading"]}
                },
                "/quotes/{symbol}": {"get": {"operationId": "quote", "tags": ["market data"]}}
            }
        });
        let d = drafts(&doc).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].id, "getOrder");
        assert_eq!(d[0].path, "/api/v1/orders/{orderId}");
        assert_eq!((d[0].method, d[0].access), ("GET", "read"));
        assert_eq!(d[1].id, "delete.api.v1.orders.orderId");
        assert_eq!(d[1].access, "write");
        assert_eq!(d[2].function, "market.data");
        let raw: Vec<RawApi> = serde_json::from_value(serde_json::json!([
            {"id": "trade.order.get", "method": "GET", "path": "/api/v1/orders/{order_id}", "level": "S2",
             "service_object": "toC", "access": "read", "user_auth": true, "personal_info": true, "function": "trading"},
            {"id": "old", "method": "GET", "path": "/api/v1/old", "level": "S0",
             "service_object": "toC", "access": "read", "user_auth": false, "personal_info": false, "function": "x"}
        ]))
        .unwrap();
        let diff = diff(&d, &raw);
        assert_eq!(
            diff.new.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
            ["delete.api.v1.orders.orderId", "quote"]
        );
        assert_eq!(
            diff.renamed,
            [("trade.order.get".to_string(), "getOrder".to_string())]
        );
        assert_eq!(diff.missing[0].0, "old");
        assert!(drafts(&serde_json::json!({"swagger": "2.0"})).is_err());
    }
}
