//! The REST API as an OpenAPI 3.1 document, served at `/api/openapi.json`.
//!
//! Built from the handlers' own `#[utoipa::path]` attributes and the types they read and write
//! (request bodies, outcomes, views, errors), so it changes when they do. `scripts/test` runs
//! schemathesis against it on a live server.

use super::{auth, cdc, commands, error, ops, parked, queries, rebuilds};
use axum::response::IntoResponse;
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{path::Parameter, path::ParameterBuilder, path::ParameterIn, RefOr, Required};
use utoipa::openapi::{ContentBuilder, ResponseBuilder};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tally",
        description = "Loyalty memberships, event-sourced: commands append events, queries read \
                       views. The contract in prose is docs/api.md; live views are on `/ws`."
    ),
    paths(
        commands::enroll,
        commands::update_profile,
        commands::earn,
        commands::redeem,
        commands::suspend,
        commands::reactivate,
        commands::record_purchase,
        queries::get_member,
        queries::list_members,
        queries::member_events,
        auth::sign_up,
        auth::sign_in,
        auth::sign_out,
        auth::me,
        auth::change_password,
        auth::claim,
        auth::member_link,
        auth::create_key,
        auth::keys,
        auth::revoke_key,
        auth::create_person,
        auth::people,
        auth::update_person,
        auth::person_link,
        ops::projections,
        parked::list,
        parked::retry,
        parked::skip,
        rebuilds::start,
        rebuilds::show,
        cdc::receive,
        cdc::list,
        ops::healthz,
        ops::livez,
        ops::metrics,
    ),
    components(schemas(error::ErrorBody)),
    modifiers(&Conventions),
    tags(
        (name = "commands", description = "Change a membership: each appends events, with optimistic concurrency \
                                           (`If-Match`) and idempotency keys"),
        (name = "queries", description = "Read the views"),
        (name = "identity", description = "Accounts, sessions, keys, access links"),
        (name = "operations", description = "Health, metrics, consumer status, parked events, online rebuilds"),
        (name = "cdc", description = "Change data capture: Debezium change events of a system of record, and each source's lag"),
    )
)]
pub struct ApiDoc;

/// What every operation shares, added once here rather than on each handler: how callers
/// authenticate, the error body of every non-2xx answer, and the headers every command reads.
struct Conventions;

impl Modify for Conventions {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some("A key's token")).build(),
            ),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                crate::auth::sessions::COOKIE,
                "A signed-in browser's session (changes must also come from this site's origin)",
            ))),
        );
        doc.security = Some(vec![
            SecurityRequirement::new("bearer", Vec::<String>::new()),
            SecurityRequirement::new("session", Vec::<String>::new()),
        ]);

        let error = ResponseBuilder::new()
            .description("An error: `{\"error\": {\"code\", \"message\"}}` (docs/api.md lists the codes)")
            .content("application/json", ContentBuilder::new().schema(Some(RefOr::Ref(error_ref()))).build())
            .build();
        for item in doc.paths.paths.values_mut() {
            let operations = [&mut item.get, &mut item.post, &mut item.put, &mut item.patch, &mut item.delete];
            for operation in operations.into_iter().flatten() {
                operation.responses.responses.entry("default".into()).or_insert_with(|| error.clone().into());
                let is_command = operation.tags.as_ref().is_some_and(|tags| tags.iter().any(|t| t == "commands"));
                if is_command {
                    operation.parameters.get_or_insert_with(Vec::new).extend(command_headers());
                }
            }
        }
    }
}

fn error_ref() -> utoipa::openapi::Ref {
    utoipa::openapi::Ref::from_schema_name("ErrorBody")
}

/// The headers every command reads (docs/api.md, "Commands").
fn command_headers() -> Vec<Parameter> {
    let header = |name: &str, description: &str| {
        ParameterBuilder::new()
            .name(name)
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(description))
            .schema(Some(utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::Type::String)))
            .build()
    };
    vec![
        header(
            "Idempotency-Key",
            "1 to 200 visible characters: the same key with the same request answers the first answer again \
             (with `Idempotent-Replayed: true`); with another request, 422 `idempotency_key_reused`",
        ),
        header("If-Match", "The member's stream version the command expects; another is 409 `version_conflict`"),
        header("X-Request-Id", "Kept as the events' correlation id"),
    ]
}

/// `GET /api/openapi.json`.
pub async fn document() -> axum::response::Response {
    axum::Json(ApiDoc::openapi()).into_response()
}
