//! apisec-core: every rule, parser and decision of the apisec gateway, with no dependency on
//! the proxy host. The host passes in the clock (`now`), the shared store, the ECDSA verifier
//! and the secrets; the wasm crate only translates between Envoy and these functions.

#![forbid(unsafe_code)]

pub mod access;
pub mod anomaly;
pub mod apps;
pub mod audit;
pub mod audit_chain;
pub mod cluster;
pub mod compliance;
pub mod crypto;
pub mod diagnose;
pub mod engine;
pub mod error;
pub mod evidence;
pub mod fields;
pub mod inventory;
pub mod ip;
pub mod lifecycle;
pub mod lists;
pub mod local;
pub mod masking;
pub mod message;
pub mod metrics;
pub mod mode;
pub mod openapi;
pub mod policy;
pub mod rate_limits;
pub mod report;
pub mod routes;
pub mod sdk;
pub mod sessions;
pub mod sf;
pub mod sha256;
pub mod signer;
pub mod state;
pub mod state_tables;
pub mod store;
pub mod timeutil;

pub use error::{ConfigError, Deny, DenyReason};
pub use policy::{Policy, RawPolicy, SecurityLevel};
