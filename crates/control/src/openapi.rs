//! aloftd's own OpenAPI document (`GET /v1/openapi.json`), generated from the wire types.
//!
//! [`OPERATIONS`] describes every operation aloft serves or is about to serve: Fly's app, machine,
//! lease and metadata operations (with Fly's operationIds and parameter names) and aloft's
//! extensions (marked `x-aloft-extension: true`). Which of them the document contains comes from
//! one place, `compat.rs`: [`compat::IMPLEMENTED`] (Fly's operations) and [`compat::EXTENSIONS`]
//! (aloft's). A test fails when a served operation has no description here, so moving a row to
//! `IMPLEMENTED` is the only step when its description already exists, and adding one entry to
//! [`OPERATIONS`] otherwise.
//!
//! Request and response bodies are the JSON Schemas of `aloft-api`'s types (derived with
//! `schemars` under its `schema` feature, so they follow the serde names), collected under
//! `components/schemas`. A test compares the document with Fly's spec operation by operation
//! (`tests/fixtures/machines-openapi3.json`); `docs/api-compat.md` and ADR 0010 say more.

use aloft_api::{
    App, AppSecret, AppSecrets, AppSecretsUpdateRequest, AppSecretsUpdateResp, Certificate, CreateAppRequest,
    CreateCertificateRequest, CreateLeaseRequest, CreateMachineRequest, CreateReleaseRequest,
    CreateVolumeRequest, DeleteAppSecretResponse, EdgeCaResponse, ErrorResponse, ExecRequest, ExecResponse,
    ExtendVolumeRequest, ExtendVolumeResponse, LeaseEnvelope, ListAppsResponse, ListCertificatesResponse,
    LogEntry, Machine, MachineEvent, MachineVersion, MetadataValueResponse, OkResponse, ProcessStat,
    RegionsResponse, Release, ReleaseEvent, RollbackRequest, SetAppSecretRequest, SetAppSecretResponse,
    SignalRequest, StartResponse, StopRequest, UpdateMachineRequest, UpdateMetadataRequest,
    UpdateVolumeRequest, UpsertMetadataKeyRequest, Volume, VolumeSnapshot, WaitResponse,
};
use axum::Json;
use axum::routing::MethodFilter;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{Map, Value, json};

use crate::compat;

/// The document, as `GET /v1/openapi.json` serves it (no authentication needed: it describes
/// the API, it holds no data).
pub(crate) async fn serve() -> Json<Value> {
    Json(openapi_document())
}

/// aloftd's OpenAPI 3.0 document: every operation of [`compat::IMPLEMENTED`] and
/// [`compat::EXTENSIONS`].
pub(crate) fn openapi_document() -> Value {
    let served: Vec<(MethodFilter, &str)> = compat::IMPLEMENTED
        .iter()
        .chain(compat::EXTENSIONS)
        .copied()
        .collect();
    document(&served)
}

/// Where a parameter goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum In {
    /// A path segment.
    Path,
    /// The query string.
    Query,
    /// A request header.
    Header,
}

impl In {
    fn as_str(self) -> &'static str {
        match self {
            Self::Path => "path",
            Self::Query => "query",
            Self::Header => "header",
        }
    }
}

/// The type of a parameter's value.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ParamType {
    /// Text.
    String,
    /// A whole number.
    Integer,
    /// `true` or `false`.
    Boolean,
    /// One of these words.
    Enum(&'static [&'static str]),
}

/// A path, query or header parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Param {
    /// Its name, as Fly spells it.
    pub(crate) name: &'static str,
    /// Where it goes.
    pub(crate) location: In,
    /// Required (path parameters always are).
    pub(crate) required: bool,
    /// Its value's type.
    pub(crate) ty: ParamType,
    /// What it does.
    pub(crate) description: &'static str,
    /// Not in Fly's spec for this operation: accepted because Fly's clients send it.
    pub(crate) extension: bool,
}

const fn path(name: &'static str, description: &'static str) -> Param {
    Param {
        name,
        location: In::Path,
        required: true,
        ty: ParamType::String,
        description,
        extension: false,
    }
}

const fn query(name: &'static str, ty: ParamType, description: &'static str) -> Param {
    Param {
        name,
        location: In::Query,
        required: false,
        ty,
        description,
        extension: false,
    }
}

impl Param {
    const fn required(mut self) -> Self {
        self.required = true;
        self
    }

    const fn extension(mut self) -> Self {
        self.extension = true;
        self
    }
}

/// A body's schema: an `aloft-api` type's, or written out for the few bodies without one.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Body {
    /// The type's schema (a `$ref` into `components/schemas`, or an array or map of them).
    Type(fn(&mut SchemaGenerator) -> Value),
    /// A schema written here.
    Inline(fn() -> Value),
}

fn schema_of<T: JsonSchema>(generator: &mut SchemaGenerator) -> Value {
    generator.subschema_for::<T>().to_value()
}

/// `T`'s schema.
const fn ty<T: JsonSchema>() -> Body {
    Body::Type(schema_of::<T>)
}

/// One response of an operation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Response {
    /// The HTTP status.
    pub(crate) status: u16,
    /// What it means.
    pub(crate) description: &'static str,
    /// Its body, if any.
    pub(crate) body: Option<Body>,
    /// The body's content type.
    pub(crate) content_type: &'static str,
}

const JSON: &str = "application/json";

const fn ok(status: u16, description: &'static str, body: Body) -> Response {
    Response {
        status,
        description,
        body: Some(body),
        content_type: JSON,
    }
}

const fn empty(status: u16, description: &'static str) -> Response {
    Response {
        status,
        description,
        body: None,
        content_type: JSON,
    }
}

const fn error(status: u16, description: &'static str) -> Response {
    ok(status, description, ty::<ErrorResponse>())
}

/// One operation: what the document says about a (method, path) aloft serves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Operation {
    /// The method.
    pub(crate) method: MethodFilter,
    /// The path below `/v1`, with Fly's parameter names.
    pub(crate) path: &'static str,
    /// Fly's operationId (an aloft one for extensions).
    pub(crate) operation_id: &'static str,
    /// Fly's tag (`Apps`, `Machines` …).
    pub(crate) tag: &'static str,
    /// One line about it.
    pub(crate) summary: &'static str,
    /// Path, query and header parameters.
    pub(crate) params: &'static [Param],
    /// The request body, if it takes one.
    pub(crate) request: Option<Body>,
    /// Responses besides the default error body.
    pub(crate) responses: &'static [Response],
    /// Not in Fly's spec: aloft's own (`x-aloft-extension: true`).
    pub(crate) extension: bool,
    /// Served without a token.
    pub(crate) public: bool,
}

const fn op(
    method: MethodFilter,
    path: &'static str,
    operation_id: &'static str,
    tag: &'static str,
    summary: &'static str,
) -> Operation {
    Operation {
        method,
        path,
        operation_id,
        tag,
        summary,
        params: &[],
        request: None,
        responses: &[],
        extension: false,
        public: false,
    }
}

impl Operation {
    const fn params(mut self, params: &'static [Param]) -> Self {
        self.params = params;
        self
    }

    const fn request(mut self, body: Body) -> Self {
        self.request = Some(body);
        self
    }

    const fn responses(mut self, responses: &'static [Response]) -> Self {
        self.responses = responses;
        self
    }

    const fn extension(mut self) -> Self {
        self.extension = true;
        self
    }

    const fn public(mut self) -> Self {
        self.public = true;
        self
    }
}

const APP: Param = path("app_name", "Fly App Name");
const MACHINE: Param = path("machine_id", "Machine ID");
const KEY: Param = path("key", "Metadata key");
const NONCE: Param = Param {
    name: aloft_api::LEASE_NONCE_HEADER,
    location: In::Header,
    required: false,
    ty: ParamType::String,
    description: "The nonce of the lease held on the machine",
    extension: false,
};
/// The lease nonce on operations whose entry in Fly's spec does not list it (fly-go sends it).
const NONCE_EXT: Param = NONCE.extension();
const AM: &[Param] = &[APP, MACHINE];
const AMN: &[Param] = &[APP, MACHINE, NONCE_EXT];
const MACHINE_STATES: &[&str] = &[
    "creating",
    "created",
    "starting",
    "started",
    "stopping",
    "stopped",
    "suspending",
    "suspended",
    "restarting",
    "updating",
    "replacing",
    "destroying",
    "destroyed",
    "replaced",
    "migrated",
    "failed",
    "launch_failed",
];
const STOP_SIGNALS: &[&str] = &[
    "SIGHUP", "SIGINT", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGTERM",
];
const OK: Response = ok(200, "OK", ty::<OkResponse>());
const MACHINE_OK: Response = ok(200, "The machine", ty::<Machine>());
const BAD: Response = error(400, "Bad request");
const NOT_FOUND: Response = error(404, "No such app or machine");
const LEASED: Response = error(409, "The machine is leased by someone else");
const STATE: Response = error(412, "Not possible in the machine's state, or a stale version");
const VERB: &[Response] = &[OK, NOT_FOUND, LEASED, STATE];
const SECRET: Param = path("secret_name", "App secret name");
const MIN_VERSION: Param = query(
    "min_version",
    ParamType::String,
    "Minimum secrets version to return. Returned when setting a new secret",
);
const SHOW_SECRETS: Param = query(
    "show_secrets",
    ParamType::Boolean,
    "Refused when true: aloft never returns secret values",
);
const SECRETS_QUERY: &[Param] = &[APP, MIN_VERSION, SHOW_SECRETS];
const SECRET_QUERY: &[Param] = &[APP, SECRET, MIN_VERSION, SHOW_SECRETS];
const NO_VERSION: Response = error(422, "min_version is newer than the app's secrets version");
const HOSTNAME: Param = path("hostname", "Certificate Hostname");
const CERT_TAKEN: Response = error(409, "Another app has this hostname");
const CERT_UNDER_BASE: Response = error(422, "The hostname is under the edge's base domain");
const CERT_NOT_FOUND: Response = error(404, "No such app, or the app has no such hostname");
const VOLUME: Param = path("volume_id", "Volume ID");
const VOLUME_NOT_FOUND: Response = error(404, "No such app or volume");

fn memory_response() -> Value {
    json!({"type": "object", "properties": {
        "available_mb": {"type": "integer"}, "limit_mb": {"type": "integer"}}})
}

/// Every operation aloft describes; the document holds those that `compat.rs` lists as served.
pub(crate) const OPERATIONS: &[Operation] = &[
    // Apps.
    op(MethodFilter::GET, "/apps", "Apps_list", "Apps", "List apps")
        .params(&[
            query("org_slug", ParamType::String, "The org slug, or 'personal'").required(),
            query("app_role", ParamType::String, "Filter apps by role"),
            query(
                "limit",
                ParamType::Integer,
                "fly-go's page size; everything comes in one page",
            )
            .extension(),
            query(
                "cursor",
                ParamType::String,
                "fly-go's page cursor; everything comes in one page",
            )
            .extension(),
        ])
        .responses(&[ok(200, "The apps", ty::<ListAppsResponse>()), BAD]),
    op(
        MethodFilter::POST,
        "/apps",
        "Apps_create",
        "Apps",
        "Create an app",
    )
    .params(&[query(
        "wait",
        ParamType::Boolean,
        "fly-go's; the app exists when the answer comes",
    )
    .extension()])
    .request(ty::<CreateAppRequest>())
    .responses(&[
        ok(201, "Created", ty::<App>()),
        BAD,
        error(422, "The name is taken (status name_taken)"),
    ]),
    op(
        MethodFilter::GET,
        "/apps/{app_name}",
        "Apps_show",
        "Apps",
        "Get an app",
    )
    .params(&[APP])
    .responses(&[ok(200, "The app", ty::<App>()), error(404, "app not found")]),
    op(
        MethodFilter::DELETE,
        "/apps/{app_name}",
        "Apps_delete",
        "Apps",
        "Destroy an app",
    )
    .params(&[APP])
    .responses(&[
        empty(202, "Accepted"),
        error(409, "The app still has machines that are not destroyed"),
    ]),
    // Machines.
    op(
        MethodFilter::GET,
        "/apps/{app_name}/machines",
        "Machines_list",
        "Machines",
        "List machines",
    )
    .params(&[
        APP,
        query(
            "include_deleted",
            ParamType::Boolean,
            "Include destroyed machines",
        ),
        query("region", ParamType::String, "Only machines in this region"),
        query(
            "state",
            ParamType::Enum(MACHINE_STATES),
            "Only machines in these states (repeated or comma-separated)",
        ),
        query(
            "summary",
            ParamType::Boolean,
            "Leave out config, checks, events and host status",
        ),
    ])
    .responses(&[ok(200, "The machines", ty::<Vec<Machine>>()), BAD, NOT_FOUND]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/machines",
        "Machines_create",
        "Machines",
        "Create a machine",
    )
    .params(&[APP])
    .request(ty::<CreateMachineRequest>())
    .responses(&[MACHINE_OK, BAD, NOT_FOUND, error(422, "Cannot be placed or run")]),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/machines/{machine_id}",
        "Machines_show",
        "Machines",
        "Get a machine",
    )
    .params(AM)
    .responses(&[MACHINE_OK, NOT_FOUND]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}",
        "Machines_update",
        "Machines",
        "Update a machine",
    )
    .params(AMN)
    .request(ty::<UpdateMachineRequest>())
    .responses(&[MACHINE_OK, BAD, NOT_FOUND, LEASED, STATE]),
    op(
        MethodFilter::DELETE,
        "/apps/{app_name}/machines/{machine_id}",
        "Machines_delete",
        "Machines",
        "Destroy a machine",
    )
    .params(&[
        APP,
        MACHINE,
        query("force", ParamType::Boolean, "Destroy even if running"),
        query("kill", ParamType::Boolean, "Same as force (older clients)").extension(),
        NONCE_EXT,
    ])
    .responses(VERB),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/cordon",
        "Machines_cordon",
        "Machines",
        "Take a machine out of the proxy's pool",
    )
    .params(AMN)
    .responses(VERB),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/uncordon",
        "Machines_uncordon",
        "Machines",
        "Put a machine back into the proxy's pool",
    )
    .params(AMN)
    .responses(VERB),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/machines/{machine_id}/events",
        "Machines_list_events",
        "Machines",
        "A machine's events, newest first",
    )
    .params(&[
        APP,
        MACHINE,
        query(
            "limit",
            ParamType::Integer,
            "At most this many (default 20, at most 50)",
        ),
    ])
    .responses(&[ok(200, "The events", ty::<Vec<MachineEvent>>()), BAD, NOT_FOUND]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/exec",
        "Machines_exec",
        "Machines",
        "Run a command in a machine",
    )
    .params(AMN)
    .request(ty::<ExecRequest>())
    .responses(&[
        ok(
            200,
            "How the command ended and what it wrote",
            ty::<ExecResponse>(),
        ),
        BAD,
        NOT_FOUND,
        STATE,
    ]),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/machines/{machine_id}/lease",
        "Machines_show_lease",
        "Machines",
        "The lease held on a machine",
    )
    .params(AM)
    .responses(&[
        ok(
            200,
            "The lease (Fly's envelope: status and data)",
            ty::<LeaseEnvelope>(),
        ),
        NOT_FOUND,
    ]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/lease",
        "Machines_create_lease",
        "Machines",
        "Take or refresh a lease",
    )
    .params(&[
        APP,
        MACHINE,
        NONCE,
        query(
            "ttl",
            ParamType::Integer,
            "Seconds (fly-go sends it here; wins over the body's)",
        )
        .extension(),
    ])
    .request(ty::<CreateLeaseRequest>())
    .responses(&[
        ok(
            201,
            "The lease (Fly's envelope: status and data)",
            ty::<LeaseEnvelope>(),
        ),
        BAD,
        NOT_FOUND,
        LEASED,
    ]),
    op(
        MethodFilter::DELETE,
        "/apps/{app_name}/machines/{machine_id}/lease",
        "Machines_release_lease",
        "Machines",
        "Release a lease",
    )
    .params(&[APP, MACHINE, NONCE])
    .responses(&[OK, BAD, NOT_FOUND, LEASED]),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/machines/{machine_id}/memory",
        "Machines_get_memory",
        "Machines",
        "A machine's memory limit",
    )
    .params(AM)
    .responses(&[ok(200, "The memory", Body::Inline(memory_response)), NOT_FOUND]),
    op(
        MethodFilter::PUT,
        "/apps/{app_name}/machines/{machine_id}/memory",
        "Machines_set_memory_limit",
        "Machines",
        "Change a machine's memory limit",
    )
    .params(AM)
    .request(Body::Inline(
        || json!({"type": "object", "properties": {"limit_mb": {"type": "integer"}}}),
    ))
    .responses(&[
        ok(200, "The memory", Body::Inline(memory_response)),
        BAD,
        NOT_FOUND,
    ]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/memory/reclaim",
        "Machines_reclaim_memory",
        "Machines",
        "Reclaim memory from a machine",
    )
    .params(AM)
    .request(Body::Inline(
        || json!({"type": "object", "properties": {"amount_mb": {"type": "integer"}}}),
    ))
    .responses(&[
        ok(
            200,
            "What was reclaimed",
            Body::Inline(|| json!({"type": "object", "properties": {"actual_mb": {"type": "integer"}}})),
        ),
        BAD,
        NOT_FOUND,
    ]),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/machines/{machine_id}/metadata",
        "Machines_show_metadata",
        "Machines",
        "A machine's metadata",
    )
    .params(AM)
    .responses(&[
        ok(
            200,
            "The metadata",
            ty::<std::collections::BTreeMap<String, String>>(),
        ),
        NOT_FOUND,
    ]),
    op(
        MethodFilter::PUT,
        "/apps/{app_name}/machines/{machine_id}/metadata",
        "Machines_update_metadata",
        "Machines",
        "Set and delete metadata keys",
    )
    .params(AMN)
    .request(ty::<UpdateMetadataRequest>())
    .responses(&[empty(204, "Updated"), BAD, NOT_FOUND, STATE]),
    op(
        MethodFilter::PATCH,
        "/apps/{app_name}/machines/{machine_id}/metadata",
        "Machines_update_metadata",
        "Machines",
        "Set and delete metadata keys",
    )
    .params(AMN)
    .request(ty::<UpdateMetadataRequest>())
    .responses(&[empty(204, "Updated"), BAD, NOT_FOUND, STATE]),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/machines/{machine_id}/metadata/{key}",
        "Machines_get_metadata_key",
        "Machines",
        "One metadata value",
    )
    .params(&[APP, MACHINE, KEY])
    .responses(&[
        ok(200, "The value", ty::<MetadataValueResponse>()),
        error(404, "No such app, machine or key"),
    ]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/metadata/{key}",
        "Machines_upsert_metadata",
        "Machines",
        "Set one metadata value",
    )
    .params(&[APP, MACHINE, KEY, NONCE_EXT])
    .request(ty::<UpsertMetadataKeyRequest>())
    .responses(&[empty(204, "Set"), BAD, NOT_FOUND]),
    op(
        MethodFilter::DELETE,
        "/apps/{app_name}/machines/{machine_id}/metadata/{key}",
        "Machines_delete_metadata",
        "Machines",
        "Delete one metadata value",
    )
    .params(&[APP, MACHINE, KEY, NONCE_EXT])
    .responses(&[empty(204, "Deleted"), NOT_FOUND]),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/machines/{machine_id}/ps",
        "Machines_list_processes",
        "Machines",
        "A machine's processes",
    )
    .params(&[
        APP,
        MACHINE,
        query("sort_by", ParamType::String, "Sort by this field"),
        query("order", ParamType::String, "asc or desc"),
    ])
    .responses(&[
        ok(200, "The processes", ty::<Vec<ProcessStat>>()),
        BAD,
        NOT_FOUND,
        STATE,
    ]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/restart",
        "Machines_restart",
        "Machines",
        "Restart a machine",
    )
    .params(&[
        APP,
        MACHINE,
        query(
            "timeout",
            ParamType::String,
            "Wait this long before the forced stop (\"10s\" or seconds)",
        ),
        query("signal", ParamType::Enum(STOP_SIGNALS), "Signal sent first"),
        query("force_stop", ParamType::Boolean, "Stop forcibly right away").extension(),
        NONCE_EXT,
    ])
    .responses(VERB),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/signal",
        "Machines_signal",
        "Machines",
        "Send a signal to a machine's workload",
    )
    .params(AMN)
    .request(ty::<SignalRequest>())
    .responses(&[OK, BAD, NOT_FOUND, LEASED, STATE]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/start",
        "Machines_start",
        "Machines",
        "Start a machine",
    )
    .params(AMN)
    .responses(&[
        ok(200, "The state it was in", ty::<StartResponse>()),
        NOT_FOUND,
        LEASED,
        STATE,
    ]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/stop",
        "Machines_stop",
        "Machines",
        "Stop a machine",
    )
    .params(AMN)
    .request(ty::<StopRequest>())
    .responses(&[OK, BAD, NOT_FOUND, LEASED, STATE]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/suspend",
        "Machines_suspend",
        "Machines",
        "Suspend a machine",
    )
    .params(AMN)
    .responses(VERB),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/machines/{machine_id}/versions",
        "Machines_list_versions",
        "Machines",
        "A machine's versions, newest first",
    )
    .params(AM)
    .responses(&[ok(200, "The versions", ty::<Vec<MachineVersion>>()), NOT_FOUND]),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/machines/{machine_id}/wait",
        "Machines_wait",
        "Machines",
        "Wait for a machine to reach a state",
    )
    .params(&[
        APP,
        MACHINE,
        query("version", ParamType::String, "Only this version counts"),
        query("instance_id", ParamType::String, "Same as version (deprecated)"),
        query(
            "from_event_id",
            ParamType::String,
            "Only events after this one count",
        ),
        query("timeout", ParamType::Integer, "Seconds, 1 to 60 (default 60)"),
        query(
            "state",
            ParamType::Enum(&[
                "started",
                "stopped",
                "suspended",
                "destroyed",
                "failed",
                "settled",
            ]),
            "Any of these states (repeated or comma-separated; default started)",
        ),
    ])
    .responses(&[
        ok(200, "The state reached", ty::<WaitResponse>()),
        BAD,
        NOT_FOUND,
        error(408, "Not in time"),
    ]),
    op(
        MethodFilter::GET,
        "/platform/regions",
        "Platform_regions_get",
        "Platform",
        "The regions machines can run in",
    )
    .responses(&[ok(200, "OK", ty::<RegionsResponse>())]),
    // aloft's own: releases (server-side deploys).
    op(
        MethodFilter::GET,
        "/apps/{app_name}/releases",
        "Releases_list",
        "Releases",
        "The app's releases, newest first",
    )
    .params(&[APP])
    .responses(&[ok(200, "The releases", ty::<Vec<Release>>()), NOT_FOUND])
    .extension(),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/releases",
        "Releases_create",
        "Releases",
        "Deploy: record a release and start its job",
    )
    .params(&[APP])
    .request(ty::<CreateReleaseRequest>())
    .responses(&[
        ok(201, "The release, pending", ty::<Release>()),
        BAD,
        NOT_FOUND,
        error(409, "Another release of the app is still running"),
        error(422, "The request cannot be deployed"),
    ])
    .extension(),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/releases/rollback",
        "Releases_rollback",
        "Releases",
        "Redeploy an earlier release (default: the last complete one before the newest)",
    )
    .params(&[APP])
    .request(ty::<RollbackRequest>())
    .responses(&[
        ok(201, "The new release", ty::<Release>()),
        NOT_FOUND,
        error(409, "Another release of the app is still running"),
        error(422, "Nothing to roll back to"),
    ])
    .extension(),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/releases/{version}",
        "Releases_show",
        "Releases",
        "One release",
    )
    .params(&[APP, path("version", "Release version")])
    .responses(&[ok(200, "The release", ty::<Release>()), NOT_FOUND])
    .extension(),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/releases/{version}/events",
        "Releases_events",
        "Releases",
        "A release's progress",
    )
    .params(&[
        APP,
        path("version", "Release version"),
        query(
            "follow",
            ParamType::Boolean,
            "Keep the response open until the release is over",
        ),
    ])
    .responses(&[
        Response {
            status: 200,
            description: "One JSON ReleaseEvent per line",
            body: Some(ty::<ReleaseEvent>()),
            content_type: "application/x-ndjson",
        },
        NOT_FOUND,
    ])
    .extension(),
    // aloft's own.
    op(
        MethodFilter::GET,
        "/apps/{app_name}/logs",
        "Apps_logs",
        "Apps",
        "The app's machines' output",
    )
    .params(&[
        APP,
        query("instance", ParamType::String, "Only this machine's lines"),
        query("machine", ParamType::String, "Same as instance"),
        query(
            "region",
            ParamType::String,
            "Only lines of machines in this region",
        ),
        query(
            "limit",
            ParamType::Integer,
            "At most this many recent lines per machine",
        ),
        query(
            "follow",
            ParamType::Boolean,
            "Keep the response open and send new lines as they come",
        ),
    ])
    .responses(&[
        Response {
            status: 200,
            description: "One JSON LogEntry per line",
            body: Some(ty::<LogEntry>()),
            content_type: "application/x-ndjson",
        },
        BAD,
        NOT_FOUND,
    ])
    .extension(),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/machines/{machine_id}/console",
        "Machines_console",
        "Machines",
        "An interactive command in a machine (aloft ssh console), over the upgraded connection",
    )
    .params(&[
        APP,
        MACHINE,
        query(
            "cmd",
            ParamType::String,
            "One argument of the command, repeated in order; none: a shell (/bin/bash, else /bin/sh)",
        ),
        query(
            "tty",
            ParamType::Boolean,
            "Run on a pseudo-terminal (stderr then arrives as stdout)",
        ),
        query(
            "rows",
            ParamType::Integer,
            "The terminal's rows, 1 to 1000 (default 24)",
        ),
        query(
            "cols",
            ParamType::Integer,
            "The terminal's columns, 1 to 1000 (default 80)",
        ),
        query("term", ParamType::String, "TERM for the command"),
        query(
            "user",
            ParamType::String,
            "Run as this user (name, uid, name:group or uid:gid); the workload's by default",
        ),
        Param {
            name: "Upgrade",
            location: In::Header,
            required: true,
            ty: ParamType::Enum(&[aloft_api::CONSOLE_UPGRADE]),
            description: "aloft-console, with `Connection: upgrade`",
            extension: false,
        },
    ])
    .responses(&[
        empty(
            101,
            "Switching Protocols: the command runs; console frames (aloft_api::ConsoleFrame: kind u8, \
             length u32 big-endian, payload) flow both ways until its Exit or Error frame",
        ),
        BAD,
        NOT_FOUND,
        STATE,
        error(426, "The request did not ask for the aloft-console upgrade"),
        error(503, "The server runs as many console sessions as it allows"),
    ])
    .extension(),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/machines/{machine_id}/proxy",
        "Machines_proxy",
        "Machines",
        "A TCP connection to a port of a machine (aloft proxy), over the upgraded connection",
    )
    .params(&[
        APP,
        MACHINE,
        Param {
            name: "port",
            location: In::Query,
            required: true,
            ty: ParamType::Integer,
            description: "The machine's port to connect to, 1 to 65535",
            extension: false,
        },
        Param {
            name: "Upgrade",
            location: In::Header,
            required: true,
            ty: ParamType::Enum(&[aloft_api::PROXY_UPGRADE]),
            description: "aloft-tcp, with `Connection: upgrade`",
            extension: false,
        },
    ])
    .responses(&[
        empty(
            101,
            "Switching Protocols: connected to the machine's port; the connection carries its TCP \
             bytes both ways, an end of stream passed on as a half-close",
        ),
        BAD,
        NOT_FOUND,
        STATE,
        error(422, "The machine has no network address the host can reach"),
        error(426, "The request did not ask for the aloft-tcp upgrade"),
        error(502, "Nothing accepted a connection on the machine's port in time"),
        error(503, "The server runs as many proxied connections as it allows"),
    ])
    .extension(),
    op(
        MethodFilter::GET,
        "/openapi.json",
        "OpenAPI_show",
        "Meta",
        "This document",
    )
    .responses(&[ok(
        200,
        "aloftd's OpenAPI 3.0 document",
        Body::Inline(|| json!({"type": "object"})),
    )])
    .extension()
    .public(),
    // Secrets (values are never returned: no `value` in any answer, `show_secrets` refused).
    op(
        MethodFilter::GET,
        "/apps/{app_name}/secrets",
        "Secrets_list",
        "Secrets",
        "List app secrets belonging to an app (names and digests, never values)",
    )
    .params(SECRETS_QUERY)
    .responses(&[ok(200, "The secrets", ty::<AppSecrets>()), BAD, NO_VERSION]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/secrets",
        "Secrets_update",
        "Secrets",
        "Update app secrets belonging to an app (null unsets), in one transaction",
    )
    .params(&[APP])
    .request(ty::<AppSecretsUpdateRequest>())
    .responses(&[
        ok(
            200,
            "The secrets afterwards and the new version",
            ty::<AppSecretsUpdateResp>(),
        ),
        BAD,
    ]),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/secrets/{secret_name}",
        "Secret_get",
        "Secrets",
        "Get an app secret (name and digest, never its value)",
    )
    .params(SECRET_QUERY)
    .responses(&[
        ok(200, "The secret", ty::<AppSecret>()),
        error(404, "No such app or secret"),
        NO_VERSION,
    ]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/secrets/{secret_name}",
        "Secret_create",
        "Secrets",
        "Create or update Secret",
    )
    .params(&[APP, SECRET])
    .request(ty::<SetAppSecretRequest>())
    .responses(&[ok(201, "Created", ty::<SetAppSecretResponse>()), BAD]),
    op(
        MethodFilter::DELETE,
        "/apps/{app_name}/secrets/{secret_name}",
        "Secret_delete",
        "Secrets",
        "Delete an app secret",
    )
    .params(&[APP, SECRET])
    .responses(&[
        ok(200, "The new version", ty::<DeleteAppSecretResponse>()),
        error(404, "No such app or secret"),
    ]),
    // Volumes (docs/volumes.md).
    op(
        MethodFilter::GET,
        "/apps/{app_name}/volumes",
        "Volumes_list",
        "Volumes",
        "List Volumes",
    )
    .params(&[
        APP,
        query(
            "summary",
            ParamType::Boolean,
            "Accepted; every volume comes whole",
        ),
    ])
    .responses(&[
        ok(200, "The app's volumes", ty::<Vec<Volume>>()),
        error(404, "No such app"),
    ]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/volumes",
        "Volumes_create",
        "Volumes",
        "Create Volume",
    )
    .params(&[APP])
    .request(ty::<CreateVolumeRequest>())
    .responses(&[
        ok(
            200,
            "The volume, its disk made on a host of the region",
            ty::<Volume>(),
        ),
        BAD,
        error(404, "No such app, or no such snapshot or source volume in the app"),
        error(
            422,
            "Not possible: encrypted, a size out of range or below the source's, a region other than the source's, no host in the region",
        ),
    ]),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/volumes/{volume_id}",
        "Volumes_get_by_id",
        "Volumes",
        "Get Volume",
    )
    .params(&[APP, VOLUME])
    .responses(&[ok(200, "The volume", ty::<Volume>()), VOLUME_NOT_FOUND]),
    op(
        MethodFilter::PUT,
        "/apps/{app_name}/volumes/{volume_id}",
        "Volumes_update",
        "Volumes",
        "Update Volume",
    )
    .params(&[APP, VOLUME])
    .request(ty::<UpdateVolumeRequest>())
    .responses(&[ok(200, "The volume", ty::<Volume>()), BAD, VOLUME_NOT_FOUND]),
    op(
        MethodFilter::DELETE,
        "/apps/{app_name}/volumes/{volume_id}",
        "Volume_delete",
        "Volumes",
        "Destroy Volume",
    )
    .params(&[APP, VOLUME])
    .responses(&[
        ok(200, "The volume, destroyed with its data", ty::<Volume>()),
        VOLUME_NOT_FOUND,
        error(412, "A machine mounts the volume: destroy that machine first"),
    ]),
    op(
        MethodFilter::PUT,
        "/apps/{app_name}/volumes/{volume_id}/extend",
        "Volumes_extend",
        "Volumes",
        "Extend Volume",
    )
    .params(&[APP, VOLUME])
    .request(ty::<ExtendVolumeRequest>())
    .responses(&[
        ok(200, "The volume at its new size", ty::<ExtendVolumeResponse>()),
        BAD,
        VOLUME_NOT_FOUND,
        error(422, "Not larger than the volume, or above the largest size"),
    ]),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/volumes/{volume_id}/snapshots",
        "Volumes_list_snapshots",
        "Volumes",
        "List Snapshots",
    )
    .params(&[APP, VOLUME])
    .responses(&[
        ok(
            200,
            "The volume's snapshots, newest first (also after the volume was destroyed, while they are kept)",
            ty::<Vec<VolumeSnapshot>>(),
        ),
        error(404, "No such app, nor a volume or a snapshot of one of that id"),
    ]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/volumes/{volume_id}/snapshots",
        "createVolumeSnapshot",
        "Volumes",
        "Create Snapshot",
    )
    .params(&[APP, VOLUME])
    .responses(&[
        ok(
            200,
            "The snapshot, taken now on the volume's host (Fly answers no body; fly-go reads none)",
            ty::<VolumeSnapshot>(),
        ),
        VOLUME_NOT_FOUND,
        error(409, "The app or volume was destroyed while the snapshot was taken"),
    ]),
    // Certificates of custom domains, issued by the edge (docs/adr/0014-edge-certificates.md).
    op(
        MethodFilter::GET,
        "/apps/{app_name}/certificates",
        "App_Certificates_list",
        "TLS Certificates",
        "List certificates for app",
    )
    .params(&[
        APP,
        query("filter", ParamType::String, "Hostname filter (substring match)"),
        query(
            "cursor",
            ParamType::String,
            "Pagination cursor (accepted; every certificate comes in one page)",
        ),
        query(
            "limit",
            ParamType::Integer,
            "Results per page (accepted; every certificate comes in one page)",
        ),
    ])
    .responses(&[ok(200, "OK", ty::<ListCertificatesResponse>())]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/certificates/acme",
        "App_Certificates_acme_create",
        "TLS Certificates",
        "Request ACME certificate (the edge's local CA issues it when no ACME is configured)",
    )
    .params(&[APP])
    .request(ty::<CreateCertificateRequest>())
    .responses(&[
        ok(201, "Created", ty::<Certificate>()),
        BAD,
        CERT_TAKEN,
        CERT_UNDER_BASE,
    ]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/certificates",
        "App_Certificates_create",
        "TLS Certificates",
        "Add a custom domain to the app; the edge issues its certificate",
    )
    .params(&[APP])
    .request(ty::<CreateCertificateRequest>())
    .responses(&[
        ok(201, "Created", ty::<Certificate>()),
        BAD,
        CERT_TAKEN,
        CERT_UNDER_BASE,
    ])
    .extension(),
    op(
        MethodFilter::GET,
        "/apps/{app_name}/certificates/{hostname}",
        "App_Certificates_show",
        "TLS Certificates",
        "Get certificate details",
    )
    .params(&[APP, HOSTNAME])
    .responses(&[ok(200, "OK", ty::<Certificate>()), CERT_NOT_FOUND]),
    op(
        MethodFilter::DELETE,
        "/apps/{app_name}/certificates/{hostname}",
        "App_Certificates_delete",
        "TLS Certificates",
        "Remove certificate",
    )
    .params(&[APP, HOSTNAME])
    .responses(&[empty(204, "No Content"), CERT_NOT_FOUND]),
    op(
        MethodFilter::POST,
        "/apps/{app_name}/certificates/{hostname}/check",
        "App_Certificates_check",
        "TLS Certificates",
        "Re-validate certificate: a failed one is queued again",
    )
    .params(&[APP, HOSTNAME])
    .responses(&[ok(200, "OK", ty::<Certificate>()), CERT_NOT_FOUND]),
    op(
        MethodFilter::GET,
        "/platform/edge-ca",
        "Platform_edge_ca_get",
        "Platform",
        "The root certificate of the edge's local CA (PEM), for clients to trust",
    )
    .responses(&[
        ok(200, "The root", ty::<EdgeCaResponse>()),
        error(503, "This server runs no edge, or its CA is not made yet"),
    ])
    .extension(),
];

/// The method's name in an OpenAPI path item (`get`, `post` …).
pub(crate) fn method_name(method: MethodFilter) -> Option<&'static str> {
    [
        (MethodFilter::GET, "get"),
        (MethodFilter::POST, "post"),
        (MethodFilter::PUT, "put"),
        (MethodFilter::PATCH, "patch"),
        (MethodFilter::DELETE, "delete"),
    ]
    .into_iter()
    .find(|(f, _)| *f == method)
    .map(|(_, name)| name)
}

/// The description of (method, path), if [`OPERATIONS`] has one.
pub(crate) fn describe(method: MethodFilter, path: &str) -> Option<&'static Operation> {
    OPERATIONS.iter().find(|o| o.method == method && o.path == path)
}

fn body_schema(body: Body, generator: &mut SchemaGenerator) -> Value {
    match body {
        Body::Type(schema) => schema(generator),
        Body::Inline(schema) => schema(),
    }
}

fn param_json(p: &Param) -> Value {
    let schema = match p.ty {
        ParamType::String => json!({"type": "string"}),
        ParamType::Integer => json!({"type": "integer"}),
        ParamType::Boolean => json!({"type": "boolean"}),
        ParamType::Enum(words) => json!({"type": "string", "enum": words}),
    };
    let mut v = json!({
        "name": p.name,
        "in": p.location.as_str(),
        "description": p.description,
        "required": p.required,
        "schema": schema,
    });
    if p.extension {
        v["x-aloft-extension"] = Value::Bool(true);
    }
    v
}

fn operation_json(o: &Operation, generator: &mut SchemaGenerator) -> Value {
    let mut responses = Map::new();
    for r in o.responses {
        let mut v = json!({"description": r.description});
        if let Some(body) = r.body {
            v["content"] = json!({r.content_type: {"schema": body_schema(body, generator)}});
        }
        responses.insert(r.status.to_string(), v);
    }
    responses.insert(
        "default".to_owned(),
        json!({"description": "An error", "content": {JSON: {"schema": schema_of::<ErrorResponse>(generator)}}}),
    );
    let mut v = json!({
        "operationId": o.operation_id,
        "tags": [o.tag],
        "summary": o.summary,
        "parameters": o.params.iter().map(param_json).collect::<Vec<_>>(),
        "responses": responses,
    });
    if let Some(body) = o.request {
        v["requestBody"] = json!({
            "required": true,
            "content": {JSON: {"schema": body_schema(body, generator)}},
        });
    }
    if o.extension {
        v["x-aloft-extension"] = Value::Bool(true);
    }
    if o.public {
        v["security"] = json!([]);
    }
    v
}

/// The document for the operations `served` (those without a description are left out; a test
/// makes sure there are none).
pub(crate) fn document(served: &[(MethodFilter, &str)]) -> Value {
    let mut generator = SchemaSettings::openapi3().into_generator();
    let mut paths = Map::new();
    for (method, path) in served {
        let (Some(o), Some(name)) = (describe(*method, path), method_name(*method)) else {
            continue;
        };
        let item = paths
            .entry(o.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(item) = item {
            item.insert(name.to_owned(), operation_json(o, &mut generator));
        }
    }
    let schemas = generator.take_definitions(true);
    json!({
        "openapi": "3.0.1",
        "info": {
            "title": "aloft Machines API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The operations of Fly's Machines API that aloftd serves, with Fly's paths, \
                            parameters and JSON, and aloft's extensions (x-aloft-extension). \
                            docs/api-compat.md lists what is implemented and what is not yet.",
        },
        "servers": [{"url": "/v1"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An aloft token (aloft_<id>_<secret>); fly-go's `FlyV1 <token>` form is accepted too",
                },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::compat::{EXTENSIONS, IMPLEMENTED, NOT_YET};

    /// Fly's spec, as published (OpenAPI 3.0.1).
    const FLY_SPEC: &str = include_str!("../tests/fixtures/machines-openapi3.json");
    const SPEC_OPERATIONS: &str = include_str!("../tests/fixtures/fly_operations.txt");

    /// Where aloft knowingly differs from Fly's spec, as [`compare`] words it. `+` is a field or
    /// parameter aloft has and Fly's spec does not (fly-go's extras, or fields newer than the
    /// spec), `-` one of Fly's that aloft lacks. New drift fails the test, and so does an entry
    /// here that no longer happens: keep the list exact.
    const KNOWN_DRIFT: &[&str] = &[
        // aloft never returns a secret's value (docs/adr/0012-secrets.md).
        "AppSecret -value",
        "SetAppSecretResponse -value",
        // fly-go's fields and aloft's additions the spec does not list.
        "App +app_role",
        "App +cname_target",
        "CreateAppRequest +app_role_id",
        "Machine +containers",
        "Machine +cordoned",
        "Machine +version",
        "ErrorResponse -details",
        "MachineExecRequest +machine",
        // The spec says a lease answer (GET and POST …/lease) is a bare `Lease`; Fly answers,
        // and fly-go reads, the envelope `{status, data: Lease, message, code}`, as aloft does.
        "Lease +code",
        "Lease +data",
        "Lease +message",
        "Lease +status",
        "Lease -description",
        "Lease -expires_at",
        "Lease -nonce",
        "Lease -owner",
        "Lease -version",
        // Certificates (ADR 0014): one `Certificate` shape answers show, check, create and each
        // list item: aloft's status/source/issuer/expiry/error and DNS hints instead of Fly's
        // per-challenge flags, issued-certificate list, DNS provider and validation report.
        "CertificateCheckResponse +app",
        "CertificateCheckResponse +check_hints",
        "CertificateCheckResponse +created_at",
        "CertificateCheckResponse +error",
        "CertificateCheckResponse +expires_at",
        "CertificateCheckResponse +issuer",
        "CertificateCheckResponse +source",
        "CertificateCheckResponse +updated_at",
        "CertificateCheckResponse -certificates",
        "CertificateCheckResponse -dns_provider",
        "CertificateCheckResponse -dns_records",
        "CertificateCheckResponse -rate_limited_until",
        "CertificateCheckResponse -validation",
        "CertificateCheckResponse -validation_errors",
        "CertificateDetail +app",
        "CertificateDetail +check_hints",
        "CertificateDetail +created_at",
        "CertificateDetail +error",
        "CertificateDetail +expires_at",
        "CertificateDetail +issuer",
        "CertificateDetail +source",
        "CertificateDetail +updated_at",
        "CertificateDetail -certificates",
        "CertificateDetail -dns_provider",
        "CertificateDetail -rate_limited_until",
        "CertificateDetail -validation",
        "CertificateDetail -validation_errors",
        "CertificateSummary +app",
        "CertificateSummary +check_hints",
        "CertificateSummary +dns_requirements",
        "CertificateSummary +error",
        "CertificateSummary +expires_at",
        "CertificateSummary +issuer",
        "CertificateSummary +source",
        "CertificateSummary -acme_alpn_configured",
        "CertificateSummary -acme_dns_configured",
        "CertificateSummary -acme_http_configured",
        "CertificateSummary -dns_provider",
        "CertificateSummary -has_custom_certificate",
        "CertificateSummary -has_fly_certificate",
        "CertificateSummary -ownership_txt_configured",
        // No ownership TXT record or DNS-01 challenge (HTTP-01 and TLS-ALPN-01 only); one page.
        "DNSRequirements -acme_challenge",
        "DNSRequirements -ownership",
        "listCertificatesResponse -next_cursor",
    ];

    fn fly() -> Value {
        serde_json::from_str(FLY_SPEC).unwrap()
    }

    /// The document with every described operation, served or not yet.
    fn everything() -> Value {
        let all: Vec<(MethodFilter, &str)> = OPERATIONS.iter().map(|o| (o.method, o.path)).collect();
        document(&all)
    }

    /// Follows `$ref`s; returns the schema and the name of the last component it came from.
    fn resolve<'a>(doc: &'a Value, mut schema: &'a Value) -> (&'a Value, Option<String>) {
        let mut name = None;
        for _ in 0..16 {
            let Some(r) = schema.get("$ref").and_then(Value::as_str) else {
                break;
            };
            let key = r.trim_start_matches("#/components/schemas/");
            name = Some(key.to_owned());
            schema = &doc["components"]["schemas"][key];
        }
        (schema, name)
    }

    /// The schemas a value may match: itself and, through allOf/anyOf/oneOf, its alternatives.
    fn alternatives<'a>(doc: &'a Value, schema: &'a Value, out: &mut Vec<&'a Value>) {
        let (schema, _) = resolve(doc, schema);
        out.push(schema);
        for key in ["allOf", "anyOf", "oneOf"] {
            for s in schema.get(key).and_then(Value::as_array).into_iter().flatten() {
                alternatives(doc, s, out);
            }
        }
    }

    /// A schema's named fields (`None` if it names none: not an object, or a free-form one),
    /// its items and its map values.
    #[derive(Default)]
    struct Shape<'a> {
        fields: Option<std::collections::BTreeMap<&'a str, &'a Value>>,
        items: Option<&'a Value>,
        values: Option<&'a Value>,
    }

    fn shape<'a>(doc: &'a Value, schema: &'a Value) -> Shape<'a> {
        let mut all = Vec::new();
        alternatives(doc, schema, &mut all);
        let mut s = Shape::default();
        for a in all {
            if let Some(props) = a.get("properties").and_then(Value::as_object) {
                let fields = s.fields.get_or_insert_with(Default::default);
                fields.extend(props.iter().map(|(k, v)| (k.as_str(), v)));
            }
            if let Some(items) = a.get("items") {
                s.items = Some(items);
            }
            if let Some(values) = a.get("additionalProperties").filter(|v| v.is_object()) {
                s.values = Some(values);
            }
        }
        s
    }

    /// Compares the field names of `ours` (in `our_doc`) and `theirs` (in `fly_doc`) recursively.
    /// Drift is worded `<where> +field` (ours only) or `<where> -field` (Fly's only), `<where>`
    /// being Fly's component name when there is one, so a shared type's drift shows once.
    fn compare_schema(
        docs: (&Value, &Value),
        ours: &Value,
        theirs: &Value,
        at: &str,
        seen: &mut BTreeSet<String>,
        drift: &mut BTreeSet<String>,
    ) {
        let (our_doc, fly_doc) = docs;
        let (_, fly_name) = resolve(fly_doc, theirs);
        let at = fly_name.unwrap_or_else(|| at.to_owned());
        let (_, our_name) = resolve(our_doc, ours);
        if !seen.insert(format!("{at}|{}", our_name.unwrap_or_default())) {
            return;
        }
        let (o, f) = (shape(our_doc, ours), shape(fly_doc, theirs));
        if let (Some(of), Some(ff)) = (&o.fields, &f.fields) {
            for name in of.keys().filter(|n| !ff.contains_key(*n)) {
                drift.insert(format!("{at} +{name}"));
            }
            for name in ff.keys().filter(|n| !of.contains_key(*n)) {
                drift.insert(format!("{at} -{name}"));
            }
            for (name, theirs) in ff {
                if let Some(ours) = of.get(name) {
                    compare_schema(docs, ours, theirs, &format!("{at}.{name}"), seen, drift);
                }
            }
        } else if o.fields.is_none() && f.fields.is_some() {
            drift.insert(format!(
                "{at} is an object with fields in Fly's spec, not in ours"
            ));
        }
        if let (Some(oi), Some(fi)) = (o.items, f.items) {
            compare_schema(docs, oi, fi, &format!("{at}[]"), seen, drift);
        }
        if let (Some(ov), Some(fv)) = (o.values, f.values) {
            compare_schema(docs, ov, fv, &format!("{at}{{}}"), seen, drift);
        }
    }

    fn json_schema(content: &Value) -> Option<&Value> {
        let content = content.get("content")?;
        content
            .get(JSON)
            .or_else(|| content.as_object()?.values().next())?
            .get("schema")
    }

    fn params(op: &Value) -> Vec<(String, String, bool)> {
        op.get("parameters")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["in"].as_str().unwrap_or_default().to_owned(),
                    p["name"].as_str().unwrap_or_default().to_ascii_lowercase(),
                    p.get("x-aloft-extension") == Some(&Value::Bool(true)),
                )
            })
            .collect()
    }

    /// Every difference between `ours` and Fly's spec, operation by operation: existence,
    /// operationId, parameters (name and location), success statuses, and the field names of
    /// request and response bodies.
    fn compare(ours: &Value, fly: &Value) -> BTreeSet<String> {
        let mut drift = BTreeSet::new();
        let mut seen = BTreeSet::new();
        let paths = ours["paths"].as_object().unwrap();
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let at = format!("{} {path}", method.to_ascii_uppercase());
                let theirs = &fly["paths"][path][method];
                let extension = op.get("x-aloft-extension") == Some(&Value::Bool(true));
                if extension {
                    if !theirs.is_null() {
                        drift.insert(format!("{at} is in Fly's spec but marked x-aloft-extension"));
                    }
                    continue;
                }
                if theirs.is_null() {
                    drift.insert(format!("{at} is not in Fly's spec"));
                    continue;
                }
                if op["operationId"] != theirs["operationId"] {
                    drift.insert(format!(
                        "{at} operationId {} is Fly's {}",
                        op["operationId"], theirs["operationId"]
                    ));
                }
                let fly_params: BTreeSet<(String, String)> =
                    params(theirs).into_iter().map(|(l, n, _)| (l, n)).collect();
                let our_params = params(op);
                for (location, name, ext) in &our_params {
                    let in_fly = fly_params.contains(&(location.clone(), name.clone()));
                    if in_fly && *ext {
                        drift.insert(format!(
                            "{at} {location} parameter {name} is Fly's, not an extension"
                        ));
                    } else if !in_fly && !ext {
                        drift.insert(format!("{at} +{location} parameter {name}"));
                    }
                }
                for (location, name) in &fly_params {
                    if !our_params.iter().any(|(l, n, _)| l == location && n == name) {
                        drift.insert(format!("{at} -{location} parameter {name}"));
                    }
                }
                match (
                    op.get("requestBody").and_then(json_schema),
                    theirs.get("requestBody").and_then(json_schema),
                ) {
                    (Some(o), Some(f)) => {
                        compare_schema((ours, fly), o, f, &format!("{at} request"), &mut seen, &mut drift);
                    }
                    (Some(_), None) => {
                        drift.insert(format!("{at} +request body"));
                    }
                    (None, Some(_)) => {
                        drift.insert(format!("{at} -request body"));
                    }
                    (None, None) => {}
                }
                let success = |r: &Value| -> BTreeSet<String> {
                    r["responses"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(code, _)| code.clone())
                        .filter(|c| c.starts_with('2'))
                        .collect()
                };
                let (our_ok, fly_ok) = (success(op), success(theirs));
                for code in our_ok.symmetric_difference(&fly_ok) {
                    let sign = if our_ok.contains(code) { '+' } else { '-' };
                    drift.insert(format!("{at} {sign}status {code}"));
                }
                for (code, response) in op["responses"].as_object().unwrap() {
                    let fly_response = &theirs["responses"][code];
                    if let (Some(o), Some(f)) = (json_schema(response), json_schema(fly_response)) {
                        compare_schema((ours, fly), o, f, &format!("{at} {code}"), &mut seen, &mut drift);
                    }
                }
            }
        }
        drift
    }

    fn assert_known(drift: &BTreeSet<String>) {
        let known: BTreeSet<String> = KNOWN_DRIFT.iter().map(|s| (*s).to_owned()).collect();
        let new: Vec<_> = drift.difference(&known).collect();
        let gone: Vec<_> = known.difference(drift).collect();
        assert!(
            new.is_empty() && gone.is_empty(),
            "drift from Fly's spec changed.\nnew (fix the type or the description, or add to KNOWN_DRIFT with a reason): {new:#?}\nno longer drifting (remove from KNOWN_DRIFT): {gone:#?}\nall drift now: {drift:#?}"
        );
    }

    #[test]
    fn every_served_operation_is_described() {
        for (method, path) in IMPLEMENTED {
            let o = describe(*method, path).unwrap_or_else(|| {
                panic!("{method:?} {path} is served but openapi::OPERATIONS does not describe it")
            });
            assert!(!o.extension, "{path} is Fly's, not an extension");
        }
        for (method, path) in EXTENSIONS {
            let o = describe(*method, path).unwrap_or_else(|| {
                panic!("{method:?} {path} is served but openapi::OPERATIONS does not describe it")
            });
            assert!(o.extension, "{path} is aloft's own: mark it .extension()");
        }
    }

    #[tokio::test]
    async fn extensions_are_routed() {
        use std::sync::Arc;

        use aloft_store::SqliteStore;
        use axum::body::Body;
        use axum::http::{Request, header};
        use http_body_util::BodyExt as _;
        use tower::ServiceExt as _;

        use crate::{ApiConfig, ApiState, create_token, router};

        let dir = tempfile::tempdir().unwrap();
        let state = ApiState::new(
            Arc::new(SqliteStore::open(dir.path().join("control.db")).unwrap()),
            ApiConfig {
                region: "test".into(),
                access_log: false,
            },
        );
        let token = create_token(state.control(), "personal", "t").unwrap().token;
        for (method, path) in EXTENSIONS {
            let uri = format!("/v1{path}").replace("{app_name}", "web");
            let req = Request::builder()
                .method(method_name(*method).unwrap().to_ascii_uppercase().as_str())
                .uri(&uri)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap();
            let response = router(state.clone()).oneshot(req).await.unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8_lossy(&body);
            assert!(
                ![405, 501].contains(&status) && !text.contains("no route for"),
                "{uri}: {status} {text}"
            );
        }
    }

    #[test]
    fn every_machine_operation_of_fly_is_described_once() {
        let mut keys = BTreeSet::new();
        for o in OPERATIONS {
            assert!(keys.insert((method_name(o.method), o.path)), "{} twice", o.path);
        }
        let undescribed: BTreeSet<String> = NOT_YET
            .iter()
            .chain(IMPLEMENTED)
            .filter(|(_, p)| p.contains("/machines") || *p == "/apps" || *p == "/apps/{app_name}")
            .filter(|(m, p)| describe(*m, p).is_none())
            .map(|(m, p)| format!("{} {p}", method_name(*m).unwrap_or("?")))
            .collect();
        // Fly's org-wide machine list answers `OrgMachinesResponse`, which aloft-api has no
        // type for yet.
        let expected = BTreeSet::from(["get /orgs/{org_slug}/machines".to_owned()]);
        assert_eq!(undescribed, expected);
    }

    #[test]
    fn the_document_holds_exactly_the_served_operations() {
        let doc = openapi_document();
        let mut listed = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                listed.insert((method.clone(), path.clone()));
            }
        }
        let served: BTreeSet<(String, String)> = IMPLEMENTED
            .iter()
            .chain(EXTENSIONS)
            .map(|(m, p)| (method_name(*m).unwrap().to_owned(), (*p).to_owned()))
            .collect();
        assert_eq!(listed, served);
        assert_eq!(doc["openapi"], "3.0.1");
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    }

    #[test]
    fn every_ref_resolves() {
        let doc = everything();
        fn walk(doc: &Value, v: &Value) {
            match v {
                Value::Object(map) => {
                    if let Some(r) = map.get("$ref").and_then(Value::as_str) {
                        let key = r
                            .strip_prefix("#/components/schemas/")
                            .unwrap_or_else(|| panic!("{r}"));
                        assert!(doc["components"]["schemas"].get(key).is_some(), "dangling {r}");
                    }
                    map.values().for_each(|v| walk(doc, v));
                }
                Value::Array(a) => a.iter().for_each(|v| walk(doc, v)),
                _ => {}
            }
        }
        walk(&doc, &doc);
        let logs = &doc["paths"]["/apps/{app_name}/logs"]["get"];
        assert_eq!(logs["x-aloft-extension"], true);
        let ndjson = &logs["responses"]["200"]["content"]["application/x-ndjson"]["schema"];
        assert_eq!(ndjson["$ref"], "#/components/schemas/LogEntry");
        let props = &doc["components"]["schemas"]["MachineEvent"]["properties"];
        assert!(props.get("type").is_some(), "serde names: {props}");
    }

    #[test]
    fn the_operation_list_fixture_is_the_specs() {
        let fly = fly();
        let mut from_spec = BTreeSet::new();
        for (path, item) in fly["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                from_spec.insert(format!("{} {path}", method.to_ascii_uppercase()));
            }
        }
        let listed: BTreeSet<String> = SPEC_OPERATIONS
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(str::to_owned)
            .collect();
        assert_eq!(from_spec, listed);
        assert_eq!(from_spec.len(), 76);
    }

    /// The compat test: every described operation (served or about to be) against Fly's spec.
    #[test]
    fn the_document_matches_flys_spec() {
        let drift = compare(&everything(), &fly());
        for line in &drift {
            println!("known drift: {line}");
        }
        assert_known(&drift);
        // The served document is a part of it.
        let served = compare(&openapi_document(), &fly());
        assert!(served.is_subset(&drift));
    }

    #[test]
    fn real_drift_fails() {
        let (ours, fly) = (everything(), fly());
        // Fly renames a field of a shared type.
        let mut renamed = fly.clone();
        let guest = renamed["components"]["schemas"]["fly.MachineGuest"]["properties"]
            .as_object_mut()
            .unwrap();
        let cpus = guest.remove("cpus").unwrap();
        guest.insert("cpu_count".into(), cpus);
        let drift = compare(&ours, &renamed);
        assert!(drift.contains("fly.MachineGuest +cpus"), "{drift:#?}");
        assert!(drift.contains("fly.MachineGuest -cpu_count"), "{drift:#?}");
        // Ours renames one (what a changed serde attribute would do).
        let mut ours_renamed = ours.clone();
        let machine = ours_renamed["components"]["schemas"]["Machine"]["properties"]
            .as_object_mut()
            .unwrap();
        let region = machine.remove("region").unwrap();
        machine.insert("regoin".into(), region);
        let drift = compare(&ours_renamed, &fly);
        assert!(
            drift.contains("Machine +regoin") && drift.contains("Machine -region"),
            "{drift:#?}"
        );
        // A parameter, an operationId, a path.
        let mut tampered = fly.clone();
        let wait = &mut tampered["paths"]["/apps/{app_name}/machines/{machine_id}/wait"]["get"];
        wait["parameters"][6]["name"] = json!("states");
        wait["operationId"] = json!("Machines_wait2");
        let destroy = tampered["paths"]["/apps/{app_name}"].as_object_mut().unwrap();
        destroy.remove("delete");
        let drift = compare(&ours, &tampered);
        for expected in [
            "GET /apps/{app_name}/machines/{machine_id}/wait +query parameter state",
            "GET /apps/{app_name}/machines/{machine_id}/wait -query parameter states",
            "DELETE /apps/{app_name} is not in Fly's spec",
        ] {
            assert!(drift.contains(expected), "{expected}: {drift:#?}");
        }
        assert!(drift.iter().any(|d| d.contains("Machines_wait2")), "{drift:#?}");
        // Each of these fails the compat test's assertion.
        for tampered in [compare(&ours, &renamed), compare(&ours_renamed, &fly), drift] {
            let result = std::panic::catch_unwind(|| assert_known(&tampered));
            assert!(result.is_err());
        }
    }
}
