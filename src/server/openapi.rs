//! The OpenAPI document of the control plane, generated from the handlers and types
//! themselves, served at `/openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::control;

#[derive(OpenApi)]
#[openapi(
    info(title = "Warden control plane", description = "Spawn, read and end agents; reload policy."),
    paths(
        control::create,
        control::list,
        control::get,
        control::budget,
        control::terminate,
        control::replace,
        control::quarantine,
        control::reload,
    ),
    modifiers(&BearerKeys),
    tags(
        (name = "agents", description = "Leads and the sub-agents they spawn"),
        (name = "policy", description = "What the operator allows"),
    )
)]
pub struct ControlPlane;

/// Agents and the operator authenticate with `Authorization: Bearer <key>`.
struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build();
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The document as JSON.
pub fn document() -> String {
    ControlPlane::openapi()
        .to_pretty_json()
        .expect("a generated OpenAPI document always serializes")
}
