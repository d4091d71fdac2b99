//! Fly's error body (`ErrorResponse`) and the status codes the Machines API answers with.

use std::fmt;

use serde::{Deserialize, Serialize};

/// `error` and its sources on one line, joined by `: ` (what a server logs behind a 500, what a
/// client shows). Crates that don't depend on this one (`image`, `init`) keep a copy.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The error body of the Fly-compatible API: `{"error": "...", "status": "unknown"}`.
///
/// On input `message` is accepted for `error` (fly-go reads both); the deprecated `details`
/// object is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ErrorResponse {
    /// What went wrong, for humans; some clients match on it (`lease currently held by`).
    #[serde(alias = "message", default)]
    pub error: String,
    /// `unknown`, or `insufficient_capacity` when placement failed.
    #[serde(default)]
    pub status: ErrorStatus,
}

/// The machine-readable part of an error body (`main.statusCode` in the spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorStatus {
    /// Any error but a capacity one.
    #[default]
    Unknown,
    /// No host in the region has room for the machine.
    InsufficientCapacity,
    /// The host holding the machine's volume has no room (fly-go suggests forking the volume).
    VolumePlacementCapacity,
    /// An app name is taken (app names are global).
    NameTaken,
}

/// An API error: an HTTP status code and the body that goes with it.
///
/// Constructors exist for every status the Machines API uses; the message is shown to the
/// client, so it must be safe (no paths, no internals) and say what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: u16,
    body: ErrorResponse,
}

impl ApiError {
    /// An error with any status code.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorResponse {
                error: message.into(),
                status: ErrorStatus::Unknown,
            },
        }
    }

    /// 400: malformed request, bad query parameters.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// 401: no token, or one that is not valid.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, message)
    }

    /// 403: a valid token that may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, message)
    }

    /// 404: unknown app, machine, lease, metadata key … `what` names it (`machine 3d8d…`).
    pub fn not_found(what: impl fmt::Display) -> Self {
        Self::new(404, format!("{what} not found"))
    }

    /// 404 for an unknown app, worded exactly `app not found`: fly-go's app-name probe compares
    /// the text.
    pub fn app_not_found() -> Self {
        Self::new(404, "app not found")
    }

    /// 403 for an app that exists in an organization the caller cannot see, worded exactly
    /// `unauthorized`: fly-go's app-name probe reads it as "taken".
    pub fn app_in_other_org() -> Self {
        Self::forbidden("unauthorized")
    }

    /// 408: a `wait` that timed out (clients read it as "not yet").
    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self::new(408, message)
    }

    /// 409: a conflict, e.g. a name already in use.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }

    /// 409 for a lease held by someone else. flyctl matches the text `lease currently held by`.
    pub fn lease_held(owner: &str, expires_at_unix: i64) -> Self {
        Self::conflict(format!(
            "lease currently held by {owner}, expires at unix time {expires_at_unix}; \
             pass its nonce in the fly-machine-lease-nonce header or wait for it to expire"
        ))
    }

    /// 412: a verb not allowed in the current state, or a stale `machine_version`.
    pub fn precondition_failed(message: impl Into<String>) -> Self {
        Self::new(412, message)
    }

    /// 422: a request that parses but cannot be carried out (e.g. an app name already taken).
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(422, message)
    }

    /// 422 with `status: name_taken` for an app name in use; the text keeps the legacy phrase
    /// `Name has already been taken` that older clients match.
    pub fn name_taken(name: &str) -> Self {
        let mut e = Self::unprocessable(format!(
            "Name has already been taken: app {name:?} exists; app names are unique across the platform, pick another"
        ));
        e.body.status = ErrorStatus::NameTaken;
        e
    }

    /// 422 with `status: insufficient_capacity`: no host has room.
    pub fn insufficient_capacity(message: impl Into<String>) -> Self {
        let mut e = Self::unprocessable(message);
        e.body.status = ErrorStatus::InsufficientCapacity;
        e
    }

    /// 500 with a message safe to show; the details belong in the server's log.
    pub fn internal() -> Self {
        Self::new(500, "internal error; the server's log has the details")
    }

    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The message shown to the client.
    pub fn message(&self) -> &str {
        &self.body.error
    }

    /// The JSON body.
    pub fn body(&self) -> &ErrorResponse {
        &self.body
    }

    /// The JSON body, owned.
    pub fn into_body(self) -> ErrorResponse {
        self.body
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.body.error, self.status)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_error_chain_is_the_error_then_its_causes() {
        let io = std::io::Error::other("disk full");
        let outer = std::io::Error::other(Wrapped(io));
        assert_eq!(error_chain(&outer), "writing: disk full");
        assert_eq!(error_chain(&std::io::Error::other("alone")), "alone");
    }

    /// "writing", caused by an inner error.
    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("writing")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn constructors_pick_fly_status_codes() {
        let cases = [
            (ApiError::bad_request("x"), 400),
            (ApiError::unauthorized("x"), 401),
            (ApiError::forbidden("x"), 403),
            (ApiError::not_found("machine 3d8d9e1f2a9e48"), 404),
            (ApiError::request_timeout("x"), 408),
            (ApiError::conflict("x"), 409),
            (ApiError::lease_held("alice@example.com", 1), 409),
            (ApiError::precondition_failed("x"), 412),
            (ApiError::unprocessable("x"), 422),
            (ApiError::insufficient_capacity("x"), 422),
            (ApiError::internal(), 500),
            (ApiError::app_not_found(), 404),
            (ApiError::app_in_other_org(), 403),
            (ApiError::name_taken("web"), 422),
        ];
        for (e, code) in cases {
            assert_eq!(e.status(), code, "{e}");
        }
        assert_eq!(
            ApiError::not_found("machine 3d8d9e1f2a9e48").message(),
            "machine 3d8d9e1f2a9e48 not found"
        );
        assert!(
            ApiError::lease_held("alice", 5)
                .message()
                .contains("lease currently held by alice")
        );
    }

    #[test]
    fn texts_fly_go_matches_on_are_exact() {
        assert_eq!(ApiError::app_not_found().message(), "app not found");
        assert_eq!(ApiError::app_in_other_org().message(), "unauthorized");
        let taken = ApiError::name_taken("web");
        assert!(taken.message().contains("Name has already been taken"));
        assert_eq!(
            serde_json::to_value(taken.body()).unwrap()["status"],
            json!("name_taken")
        );
        let vol: ErrorResponse =
            serde_json::from_value(json!({"error": "x", "status": "volume_placement_capacity"})).unwrap();
        assert_eq!(vol.status, ErrorStatus::VolumePlacementCapacity);
    }

    #[test]
    fn body_is_fly_shaped() {
        let e = ApiError::insufficient_capacity("no host has 8 cpus free");
        assert_eq!(
            serde_json::to_value(e.body()).unwrap(),
            json!({"error": "no host has 8 cpus free", "status": "insufficient_capacity"})
        );
        assert_eq!(
            serde_json::to_value(ApiError::bad_request("bad").into_body()).unwrap(),
            json!({"error": "bad", "status": "unknown"})
        );
    }

    #[test]
    fn bodies_from_fly_and_fly_go_parse() {
        let fly: ErrorResponse = serde_json::from_value(json!({
            "error": "machine not found", "status": "unknown", "details": {"x": 1}
        }))
        .unwrap();
        assert_eq!(fly.error, "machine not found");
        let go: ErrorResponse = serde_json::from_value(json!({"message": "nope"})).unwrap();
        assert_eq!(go.error, "nope");
        assert_eq!(go.status, ErrorStatus::Unknown);
    }
}
