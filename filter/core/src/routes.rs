//! Per-route policy: Envoy has no per-route configuration for Wasm filters, so a route narrows
//! the policy through what the filter can read of it, its name (`xds.route_name`; the `name` of
//! a route in the route configuration). A policy with a `routes` section serves a request only
//! through a route it names, only the APIs that route lists, and in the route's mode
//! (report-only for a dry run on one route). Without a `routes` section the route is not read.

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Deny, DenyReason};
use crate::inventory::{self, Api, ApiGroup, ApiSet};
use crate::mode::Mode;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// The Envoy route's name.
    pub name: String,
    /// The APIs served through this route (ids, `prefix*`, `group:<id>`); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apis: Vec<String>,
    #[serde(default, skip_serializing_if = "Mode::is_enforce")]
    pub mode: Mode,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// None: every API.
    pub apis: Option<ApiSet>,
    pub mode: Mode,
}

pub fn compile(
    raw: &[RawRoute],
    apis: &[Api],
    groups: &[ApiGroup],
) -> Result<Vec<Route>, ConfigError> {
    let mut out: Vec<Route> = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let field = format!("routes[{i}]");
        if r.name.is_empty() || r.name.len() > 256 || !r.name.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ConfigError::new(
                format!("{field}.name"),
                "must be the Envoy route's name (printable ASCII, no spaces)",
            ));
        }
        if out.iter().any(|x| x.name == r.name) {
            return Err(ConfigError::new(
                format!("{field}.name"),
                format!("duplicate route '{}'", r.name),
            ));
        }
        let set = if r.apis.is_empty() {
            None
        } else {
            Some(inventory::resolve_apis(
                &format!("{field}.apis"),
                &r.apis,
                apis,
                groups,
            )?)
        };
        out.push(Route {
            name: r.name.clone(),
            apis: set,
            mode: r.mode,
        });
    }
    Ok(out)
}

impl Route {
    pub fn serves(&self, api: &Api) -> bool {
        self.apis.as_ref().is_none_or(|s| s.contains(api.index))
    }
}

/// The route a request came through, when the policy has routes: one it does not name (or no
/// route at all) is refused, so that a renamed or new route never widens what is served.
pub fn find<'p>(routes: &'p [Route], name: Option<&str>) -> Result<Option<&'p Route>, Deny> {
    if routes.is_empty() {
        return Ok(None);
    }
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return Err(Deny::new(
            DenyReason::RouteNotAllowed,
            "the request came through no named route",
        ));
    };
    routes
        .iter()
        .find(|r| r.name == name)
        .map(Some)
        .ok_or_else(|| {
            Deny::new(
                DenyReason::RouteNotAllowed,
                format!("route '{name}' is not in the policy"),
            )
        })
}

/// The API must be one the route serves.
pub fn check_api(route: &Route, api: &Api) -> Result<(), Deny> {
    if route.serves(api) {
        return Ok(());
    }
    Err(Deny::new(
        DenyReason::RouteNotAllowed,
        format!(
            "API '{}' is not served through route '{}'",
            api.id, route.name
        ),
    ))
}
