//! `fly-replay`: parsing the header and JSON forms, and the request-side routing hints.
//!
//! An app answers a request with a `fly-replay` response header (`region=sjc;state=x`) or with a
//! body of type `application/vnd.fly.replay+json`, and the edge replays the original request where
//! it says. This module only *reads* those answers ([`parse_header`], [`parse_json`],
//! [`Replay::from_headers`]), reads the client's routing hints ([`RoutingHints`]) and *formats*
//! the headers the edge adds to a replayed request ([`replay_src`], [`replay_failed`]). Choosing
//! machines, buffering bodies and counting hops are the caller's (`http.rs`); the limits it
//! enforces are here ([`MAX_REPLAY_HOPS`], [`MAX_REPLAY_BODY`]).
//!
//! Every [`ReplayError`] from an app's answer is the proxy's error `PA03` (invalid fly-replay).
//!
//! Regions: Fly's region codes are fixed, aloft's regions are labels the operator names. A region
//! field therefore keeps Fly's aliases (`any`, `apac`, `eu`, `na`, `sa`, `us`/`usa`) apart from
//! region names ([`RegionSel`]) and leaves it to the caller to decide what an alias covers.
//!
//! Pure: no I/O, no clock, no randomness.

use std::fmt;
use std::time::{Duration, SystemTime};

use aloft_api::MachineId;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

/// At most this many chained replays of one request; one more is the proxy's error `PA02`.
pub(crate) const MAX_REPLAY_HOPS: u32 = 10;
/// A request body larger than this (1 MiB) cannot be replayed.
pub(crate) const MAX_REPLAY_BODY: usize = 1 << 20;

/// Response header: the app asks for a replay.
pub(crate) const FLY_REPLAY: &str = "fly-replay";
/// Request header on a replayed request: who asked for the replay ([`replay_src`]).
pub(crate) const FLY_REPLAY_SRC: &str = "fly-replay-src";
/// Request header on a request that fell back to the replaying machine ([`replay_failed`]).
pub(crate) const FLY_REPLAY_FAILED: &str = "fly-replay-failed";
/// Request header naming the preferred machine (`prefer_instance`, `fly-prefer-instance-id`)
/// when it could not take the request.
pub(crate) const FLY_PREFERRED_INSTANCE_UNAVAILABLE: &str = "fly-preferred-instance-unavailable";
/// Content type of the JSON form of a replay ([`is_replay_json`]).
pub(crate) const REPLAY_JSON_CONTENT_TYPE: &str = "application/vnd.fly.replay+json";
/// Request header: regions to prefer, in order (`iad,ord,us`).
pub(crate) const FLY_PREFER_REGION: &str = "fly-prefer-region";
/// Request header: the only region to route to.
pub(crate) const FLY_FORCE_REGION: &str = "fly-force-region";
/// Request header: the machine to prefer when it can take the request.
pub(crate) const FLY_PREFER_INSTANCE_ID: &str = "fly-prefer-instance-id";
/// Request header: the only machine to route to.
pub(crate) const FLY_FORCE_INSTANCE_ID: &str = "fly-force-instance-id";

/// Fly's region aliases, as [`RegionSel::Alias`] spells them (`usa` is read as `us`).
///
/// At Fly: `any` is every region (nearest first); `apac`, `eu`, `na`, `sa` are Asia-Pacific,
/// Europe, North and South America; `us` the United States.
pub(crate) const REGION_ALIASES: [&str; 6] = ["any", "apac", "eu", "na", "sa", "us"];

/// Longest region name accepted (a DNS label).
const MAX_REGION_LEN: usize = 63;
/// Longest value quoted back in an error message.
const MAX_QUOTED: usize = 80;
/// Request headers a JSON `transform` may neither set nor delete: they frame the message or
/// belong to one hop, so only the proxy decides them.
const FORBIDDEN_TRANSFORM_HEADERS: [&str; 9] = [
    "connection",
    "content-length",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// One entry of a region list: a region name, or one of Fly's aliases.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum RegionSel {
    /// A region name, as written (1–63 ASCII letters, digits, `-`, `_`).
    Region(String),
    /// One of [`REGION_ALIASES`], lowercase (`usa` becomes `us`). An alias is matched before a
    /// region of the same name; a caller whose operator named a region `eu` may map
    /// `Alias("eu")` to it.
    Alias(String),
}

impl RegionSel {
    /// Reads one entry; `Err` holds why it is not one.
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let lower = s.to_ascii_lowercase();
        let alias = if lower == "usa" { "us" } else { lower.as_str() };
        if REGION_ALIASES.contains(&alias) {
            return Ok(Self::Alias(alias.to_owned()));
        }
        if s.is_empty() {
            return Err("empty region name".to_owned());
        }
        let ok = s.len() <= MAX_REGION_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Self::Region(s.to_owned()))
        } else {
            Err(format!(
                "{:?} is not a region: use a region name (1 to {MAX_REGION_LEN} letters, digits, '-' or '_') or one of {}",
                clip(s),
                REGION_ALIASES.join(", ")
            ))
        }
    }

    /// The name or alias.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Self::Region(s) | Self::Alias(s) => s,
        }
    }
}

impl fmt::Display for RegionSel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do when a replay's target cannot be reached (`fallback=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// Send the request back to the machine that asked for the replay, else fail.
    ForceSelf,
    /// Try the machine that asked for the replay first, then any machine of its app.
    PreferSelf,
}

/// Changes to the request before it is replayed (JSON form only).
///
/// The proxy's own request headers (`fly-replay-src`, `fly-client-ip`, `x-forwarded-*`, …) are
/// meant to be applied after these, so an app cannot forge them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Transform {
    /// New path (and query) of the request, starting with `/`.
    pub(crate) path: Option<String>,
    /// Request headers to remove, lowercase.
    pub(crate) delete_headers: Vec<String>,
    /// Request headers to set (replacing any value), names lowercase, in the order given.
    pub(crate) set_headers: Vec<(String, String)>,
}

/// A parsed replay request.
///
/// Precedence among targets is the caller's; Fly's is: `instance` (exactly that machine), else
/// `prefer_instance` (that machine if it can take the request), else the regions, all within
/// `app` when given (else the replaying app), without the replaying machine when `elsewhere`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Replay {
    /// Target regions in the order given, duplicates removed; empty = any region.
    pub(crate) regions: Vec<RegionSel>,
    /// Exactly this machine.
    pub(crate) instance: Option<MachineId>,
    /// This machine if it can take the request, else normal routing (and the replayed request
    /// carries `fly-preferred-instance-unavailable`).
    pub(crate) prefer_instance: Option<MachineId>,
    /// Another app (a valid app name; whether it may be reached is the caller's check).
    pub(crate) app: Option<String>,
    /// Opaque text passed to the target in `fly-replay-src` (visible ASCII and spaces).
    pub(crate) state: Option<String>,
    /// Exclude the machine that asked for the replay.
    pub(crate) elsewhere: bool,
    /// Give up reaching the target after this long (more than zero).
    pub(crate) timeout: Option<Duration>,
    /// What to do when the target cannot be reached; `None`: answer the error.
    pub(crate) fallback: Option<Fallback>,
    /// Request changes (JSON form only); `None` when there are none.
    pub(crate) transform: Option<Transform>,
    /// What to cache of this replay (`fly-replay-cache*` headers, or the JSON form's `cache`);
    /// `None` when nothing, or when it is not usable (see [`crate::replay_cache::Directive`]).
    pub(crate) cache: Option<crate::replay_cache::Directive>,
}

impl Replay {
    /// Whether it names no target at all (no region, instance, app, nor `elsewhere`).
    fn names_no_target(&self) -> bool {
        self.regions.is_empty()
            && self.instance.is_none()
            && self.prefer_instance.is_none()
            && self.app.is_none()
            && !self.elsewhere
    }

    /// The replay a response's headers ask for: `None` without a `fly-replay` header. Several
    /// `fly-replay` headers are read as one, joined with `;` (a field given twice is an error).
    /// Its [`Replay::cache`] comes from the `fly-replay-cache*` headers.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, ReplayError> {
        if !crate::http::has_fly_header(headers) {
            return Ok(None);
        }
        let mut joined = String::new();
        let mut any = false;
        for value in headers.get_all(FLY_REPLAY) {
            let text = value.to_str().map_err(|_| {
                ReplayError::Syntax("the header is not visible ASCII: write it in ASCII".to_owned())
            })?;
            if any {
                joined.push(';');
            }
            joined.push_str(text);
            any = true;
        }
        if any {
            let mut r = parse_header(&joined)?;
            r.cache = crate::replay_cache::Directive::from_headers(headers);
            Ok(Some(r))
        } else {
            Ok(None)
        }
    }
}

/// Why an app's replay answer, or a client's routing hint, cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReplayError {
    /// Nothing to route by.
    #[error(
        "fly-replay names no target: set at least one of region, instance, prefer_instance, app or elsewhere=true"
    )]
    Empty,
    /// The header's `key=value;…` structure is broken.
    #[error("fly-replay is malformed: {0}")]
    Syntax(String),
    /// The same field twice.
    #[error("fly-replay gives the field {field} more than once: keep one")]
    Duplicate {
        /// The field.
        field: String,
    },
    /// A field's value is not valid.
    #[error("invalid fly-replay field {field} = {value:?}: {reason}")]
    Field {
        /// The field (`region`, `transform.set_headers[0].name`, …).
        field: String,
        /// Its value (shortened when long).
        value: String,
        /// What is wrong and what to write instead.
        reason: String,
    },
    /// The JSON form is not a JSON object.
    #[error(
        "the fly-replay JSON body (application/vnd.fly.replay+json) is not valid: {0}; send one JSON object such as {{\"region\": \"iad\"}}"
    )]
    Json(String),
    /// A client's routing hint header is not valid.
    #[error("invalid request header {header}: {value:?}: {reason}")]
    Hint {
        /// The header.
        header: &'static str,
        /// Its value (shortened when long).
        value: String,
        /// What is wrong and what to write instead.
        reason: String,
    },
}

fn field_err(field: &str, value: &str, reason: impl Into<String>) -> ReplayError {
    ReplayError::Field {
        field: field.to_owned(),
        value: clip(value),
        reason: reason.into(),
    }
}

/// `s`, cut to [`MAX_QUOTED`] characters for an error message.
fn clip(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Parses a `fly-replay` header value: `;`-separated `key=value` fields.
///
/// Keys are case-insensitive and unknown ones are ignored; values may be double-quoted (needed for
/// lists such as `region="iad,ord"`, and for a `;` inside `state`; `\` escapes the next
/// character), whitespace around keys, values and separators is ignored, empty fields (`;;`) are
/// skipped. Fields: `region` (comma list of regions or aliases), `instance`, `prefer_instance`
/// (machine ids), `app`, `state`, `elsewhere` (`true`/`false`), `timeout` (`10s`, `500ms`,
/// `1m`), `fallback` (`force_self`/`prefer_self`). An answer naming no target is
/// [`ReplayError::Empty`].
pub(crate) fn parse_header(value: &str) -> Result<Replay, ReplayError> {
    let mut b = Builder::default();
    for (key, value) in split_fields(value)? {
        b.header_field(&key, &value)?;
    }
    b.finish()
}

/// Splits `key=value;…` into lowercase keys and unquoted values.
fn split_fields(input: &str) -> Result<Vec<(String, String)>, ReplayError> {
    let mut out = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let end = rest.find(['=', ';']).unwrap_or(rest.len());
        let key = rest[..end].trim();
        let after = &rest[end..];
        let Some(after_eq) = after.strip_prefix('=') else {
            if !key.is_empty() {
                return Err(ReplayError::Syntax(format!(
                    "the field {:?} has no value: write {}=<value>",
                    clip(key),
                    clip(key)
                )));
            }
            rest = after.strip_prefix(';').unwrap_or(after);
            continue;
        };
        if key.is_empty() {
            return Err(ReplayError::Syntax(
                "a value without a field name (\"=…\"): write key=value".to_owned(),
            ));
        }
        if !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ReplayError::Syntax(format!(
                "{:?} is not a field name: fields are key=value pairs separated by ';'",
                clip(key)
            )));
        }
        let v = after_eq.trim_start();
        let (value, tail) = if let Some(quoted) = v.strip_prefix('"') {
            let (value, used) = unquote(quoted).ok_or_else(|| {
                ReplayError::Syntax(format!("the quoted value of {key} has no closing '\"'"))
            })?;
            let tail = quoted[used..].trim_start();
            if !(tail.is_empty() || tail.starts_with(';')) {
                return Err(ReplayError::Syntax(format!(
                    "text after the quoted value of {key}: separate fields with ';'"
                )));
            }
            (value, tail)
        } else {
            let end = v.find(';').unwrap_or(v.len());
            (v[..end].trim_end().to_owned(), &v[end..])
        };
        out.push((key.to_ascii_lowercase(), value));
        rest = tail.strip_prefix(';').unwrap_or(tail);
    }
    Ok(out)
}

/// Reads a quoted string's content (after the opening quote): the value and how many bytes of
/// `s` it used, closing quote included; `None` when it is not closed.
fn unquote(s: &str) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, i + 1)),
            '\\' => out.push(chars.next()?.1),
            c => out.push(c),
        }
    }
    None
}

/// Collects fields into a [`Replay`], validating each.
#[derive(Default)]
struct Builder {
    replay: Replay,
    seen: Vec<&'static str>,
}

impl Builder {
    /// One header-form field; unknown keys are ignored.
    fn header_field(&mut self, key: &str, value: &str) -> Result<(), ReplayError> {
        let field = match key {
            "region" => "region",
            "instance" => "instance",
            "prefer_instance" => "prefer_instance",
            "app" => "app",
            "state" => "state",
            "elsewhere" => "elsewhere",
            "timeout" => "timeout",
            "fallback" => "fallback",
            _ => return Ok(()),
        };
        if self.seen.contains(&field) {
            return Err(ReplayError::Duplicate {
                field: field.to_owned(),
            });
        }
        self.seen.push(field);
        self.text_field(field, value)
    }

    /// Sets one field from its text.
    fn text_field(&mut self, field: &'static str, value: &str) -> Result<(), ReplayError> {
        let r = &mut self.replay;
        let value = value.trim();
        if value.is_empty() {
            if field == "state" {
                return Ok(());
            }
            return Err(field_err(field, value, "the value is empty"));
        }
        match field {
            "region" => push_regions(&mut r.regions, field, value)?,
            "instance" => r.instance = Some(machine_id(field, value)?),
            "prefer_instance" => r.prefer_instance = Some(machine_id(field, value)?),
            "app" => {
                aloft_api::validate_app_name(value).map_err(|e| field_err(field, value, e.to_string()))?;
                r.app = Some(value.to_owned());
            }
            "state" => {
                if !value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
                    return Err(field_err(
                        field,
                        value,
                        "state must be visible ASCII or spaces (it is passed on in a header): encode it, e.g. as base64",
                    ));
                }
                r.state = Some(value.to_owned());
            }
            "elsewhere" => r.elsewhere = parse_bool(field, value)?,
            "timeout" => r.timeout = Some(parse_timeout(field, value)?),
            "fallback" => {
                r.fallback = Some(if value.eq_ignore_ascii_case("force_self") {
                    Fallback::ForceSelf
                } else if value.eq_ignore_ascii_case("prefer_self") {
                    Fallback::PreferSelf
                } else {
                    return Err(field_err(field, value, "use force_self or prefer_self"));
                });
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(self) -> Result<Replay, ReplayError> {
        if self.replay.names_no_target() {
            Err(ReplayError::Empty)
        } else {
            Ok(self.replay)
        }
    }
}

/// Appends a comma list of regions to `out`, skipping empty items and duplicates.
fn push_regions(out: &mut Vec<RegionSel>, field: &str, list: &str) -> Result<(), ReplayError> {
    let before = out.len();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let sel = RegionSel::parse(item).map_err(|reason| field_err(field, list, reason))?;
        if !out.contains(&sel) {
            out.push(sel);
        }
    }
    if out.len() == before && !list.split(',').any(|s| !s.trim().is_empty()) {
        return Err(field_err(
            field,
            list,
            "names no region: write region=iad or region=\"iad,ord\"",
        ));
    }
    Ok(())
}

fn machine_id(field: &str, value: &str) -> Result<MachineId, ReplayError> {
    value
        .parse::<MachineId>()
        .map_err(|e| field_err(field, value, format!("{e}, as in 3d8d9e1f2a9e48")))
}

fn parse_bool(field: &str, value: &str) -> Result<bool, ReplayError> {
    if value.eq_ignore_ascii_case("true") {
        Ok(true)
    } else if value.eq_ignore_ascii_case("false") {
        Ok(false)
    } else {
        Err(field_err(field, value, "use true or false"))
    }
}

fn parse_timeout(field: &str, value: &str) -> Result<Duration, ReplayError> {
    let d = value
        .parse::<aloft_api::Duration>()
        .map_err(|e| field_err(field, value, e.to_string()))?
        .get();
    if d.is_zero() {
        return Err(field_err(
            field,
            value,
            "a timeout of zero would fail every replay: give a duration such as 10s, or leave it out",
        ));
    }
    Ok(d)
}

/// Whether a response's `Content-Type` is the JSON form of a replay (ignoring parameters such as
/// `; charset=utf-8`, case and whitespace).
pub(crate) fn is_replay_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|media| media.trim().eq_ignore_ascii_case(REPLAY_JSON_CONTENT_TYPE))
}

/// Parses the JSON form of a replay (a body of type [`REPLAY_JSON_CONTENT_TYPE`]; the caller
/// bounds its size).
///
/// One object with the header form's fields (case-sensitive, unknown ones ignored, `null` as
/// absent): `region` a string (comma list) or an array of strings, `elsewhere` a boolean (or
/// `"true"`/`"false"`), `timeout` a duration string, the others strings; plus `transform`:
/// `{"path": "/new?q", "delete_headers": ["x-a"], "set_headers": [{"name": "x-b", "value": "1"}]}`
/// (`set_headers` may also be an object `{"x-b": "1"}`); and `cache` (`prefix`, `ttl`,
/// `allow_bypass`, `invalidate`: [`crate::replay_cache::Directive::from_json`]; one that is not
/// usable caches nothing rather than failing the replay).
pub(crate) fn parse_json(body: &[u8]) -> Result<Replay, ReplayError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ReplayError::Json(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(ReplayError::Json(format!(
            "it is a {}, not an object",
            json_kind(&value)
        )));
    };
    let mut b = Builder::default();
    for (key, value) in &map {
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "region" => match value {
                Value::String(s) => push_regions(&mut b.replay.regions, "region", s)?,
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let field = format!("region[{i}]");
                        let s = json_str(&field, item)?;
                        push_regions(&mut b.replay.regions, &field, s)?;
                    }
                    if b.replay.regions.is_empty() {
                        return Err(field_err("region", "[]", "names no region: write [\"iad\"]"));
                    }
                }
                other => return Err(json_type_err("region", other, "a string or an array of strings")),
            },
            "elsewhere" => match value {
                Value::Bool(v) => b.replay.elsewhere = *v,
                Value::String(s) => b.replay.elsewhere = parse_bool("elsewhere", s)?,
                other => return Err(json_type_err("elsewhere", other, "true or false")),
            },
            "instance" => b.text_field("instance", json_str("instance", value)?)?,
            "prefer_instance" => b.text_field("prefer_instance", json_str("prefer_instance", value)?)?,
            "app" => b.text_field("app", json_str("app", value)?)?,
            "state" => b.text_field("state", json_str("state", value)?)?,
            "timeout" => b.text_field("timeout", json_str("timeout", value)?)?,
            "fallback" => b.text_field("fallback", json_str("fallback", value)?)?,
            "transform" => b.replay.transform = parse_transform(value)?,
            "cache" => b.replay.cache = crate::replay_cache::Directive::from_json(value),
            _ => {}
        }
    }
    b.finish()
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn json_type_err(field: &str, v: &Value, want: &str) -> ReplayError {
    field_err(
        field,
        &v.to_string(),
        format!("it is a {}; write {want}", json_kind(v)),
    )
}

fn json_str<'a>(field: &str, v: &'a Value) -> Result<&'a str, ReplayError> {
    v.as_str().ok_or_else(|| json_type_err(field, v, "a string"))
}

/// Reads `transform`; `None` when it changes nothing.
fn parse_transform(v: &Value) -> Result<Option<Transform>, ReplayError> {
    let Value::Object(map) = v else {
        return Err(json_type_err(
            "transform",
            v,
            "an object with path, delete_headers, set_headers",
        ));
    };
    let mut t = Transform::default();
    if let Some(path) = map.get("path").filter(|p| !p.is_null()) {
        let path = json_str("transform.path", path)?;
        let ok = path.starts_with('/') && path.parse::<http::uri::PathAndQuery>().is_ok();
        if !ok {
            return Err(field_err(
                "transform.path",
                path,
                "use a path starting with '/', optionally with a query, e.g. /api/users?page=2",
            ));
        }
        t.path = Some(path.to_owned());
    }
    match map.get("delete_headers") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let field = format!("transform.delete_headers[{i}]");
                t.delete_headers
                    .push(header_name(&field, json_str(&field, item)?)?);
            }
        }
        Some(other) => {
            return Err(json_type_err(
                "transform.delete_headers",
                other,
                "an array of header names",
            ));
        }
    }
    match map.get("set_headers") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let field = format!("transform.set_headers[{i}]");
                let Value::Object(pair) = item else {
                    return Err(json_type_err(
                        &field,
                        item,
                        "{\"name\": \"x-example\", \"value\": \"1\"}",
                    ));
                };
                let name = pair.get("name").unwrap_or(&Value::Null);
                let value = pair.get("value").unwrap_or(&Value::Null);
                push_set_header(&mut t, &field, name, value)?;
            }
        }
        Some(Value::Object(pairs)) => {
            for (name, value) in pairs {
                let field = format!("transform.set_headers.{name}");
                push_set_header(&mut t, &field, &Value::String(name.clone()), value)?;
            }
        }
        Some(other) => {
            return Err(json_type_err(
                "transform.set_headers",
                other,
                "an array of {\"name\": …, \"value\": …} objects",
            ));
        }
    }
    let changes = t.path.is_some() || !t.delete_headers.is_empty() || !t.set_headers.is_empty();
    Ok(changes.then_some(t))
}

fn push_set_header(t: &mut Transform, field: &str, name: &Value, value: &Value) -> Result<(), ReplayError> {
    let name = header_name(
        &format!("{field}.name"),
        json_str(&format!("{field}.name"), name)?,
    )?;
    let value_field = format!("{field}.value");
    let value = json_str(&value_field, value)?;
    if HeaderValue::from_str(value).is_err() {
        return Err(field_err(
            &value_field,
            value,
            "a header value must be visible ASCII or spaces, without line breaks",
        ));
    }
    t.set_headers.push((name, value.to_owned()));
    Ok(())
}

/// A valid request header name that a transform may change, lowercase.
fn header_name(field: &str, name: &str) -> Result<String, ReplayError> {
    let parsed = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
        field_err(
            field,
            name,
            "not a valid header name: use letters, digits and '-'",
        )
    })?;
    let lower = parsed.as_str();
    if FORBIDDEN_TRANSFORM_HEADERS.contains(&lower) {
        return Err(field_err(
            field,
            name,
            "this header frames the request or belongs to one hop; the proxy sets it, a transform cannot",
        ));
    }
    Ok(lower.to_owned())
}

/// The `fly-replay-src` value for a replayed request: `instance=<id>;region=<r>;t=<µs>` then
/// `;state=<state>` when the replay carried one (written as is, which is Fly's format).
///
/// `instance` and `region` are the machine that asked for the replay; `t_micros` the time of
/// the replay in microseconds since the Unix epoch ([`micros_since_epoch`]).
pub(crate) fn replay_src(instance: &str, region: &str, t_micros: u64, state: Option<&str>) -> String {
    let mut s = format!("instance={instance};region={region};t={t_micros}");
    if let Some(state) = state {
        s.push_str(";state=");
        s.push_str(state);
    }
    s
}

/// Microseconds from the Unix epoch to `t` (0 before it, `u64::MAX` after year 586 912).
pub(crate) fn micros_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Why a replay fell back to the machine that asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailReason {
    /// The replay's `timeout` passed.
    Timeout,
    /// Every candidate was tried and failed.
    RetriesExhausted,
    /// No machine matched the target.
    NoCandidate,
}

impl FailReason {
    /// As written in `fly-replay-failed`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::RetriesExhausted => "retries_exhausted",
            Self::NoCandidate => "no_candidate",
        }
    }
}

/// What `fly-replay-failed` reports; empty strings for what the replay did not name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplayFailure<'a> {
    /// The target machine the replay asked for (`instance`/`prefer_instance`), or `""`.
    pub(crate) instance: &'a str,
    /// The target app the replay asked for, or `""`.
    pub(crate) app: &'a str,
    /// The target region(s) the replay asked for (comma-separated), or `""`.
    pub(crate) region: &'a str,
    /// The machine that asked for the replay (and now gets the request back).
    pub(crate) replay_source: &'a str,
    /// Why it failed.
    pub(crate) reason: FailReason,
    /// How long the proxy tried.
    pub(crate) elapsed: Duration,
}

/// The `fly-replay-failed` value: `instance=…;app=…;region=…;replay_source=…;reason=…;elapsed_ms=…`
/// (every field present, empty when unknown; `elapsed_ms` whole milliseconds).
pub(crate) fn replay_failed(f: &ReplayFailure<'_>) -> String {
    format!(
        "instance={};app={};region={};replay_source={};reason={};elapsed_ms={}",
        f.instance,
        f.app,
        f.region,
        f.replay_source,
        f.reason.as_str(),
        f.elapsed.as_millis()
    )
}

/// A client's request-side routing hints.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct RoutingHints {
    /// `fly-prefer-region`: regions (or aliases) to prefer, in order, duplicates removed.
    pub(crate) prefer_regions: Vec<RegionSel>,
    /// `fly-force-region`: the only region (or alias) to route to.
    pub(crate) force_region: Option<RegionSel>,
    /// `fly-prefer-instance-id`: the machine to prefer.
    pub(crate) prefer_instance: Option<MachineId>,
    /// `fly-force-instance-id`: the only machine to route to.
    pub(crate) force_instance: Option<MachineId>,
}

impl RoutingHints {
    /// Reads `fly-prefer-region` (comma list; several headers are joined), `fly-force-region`,
    /// `fly-prefer-instance-id` and `fly-force-instance-id` (machine ids: 14 lowercase hex
    /// digits). A header given twice (except `fly-prefer-region`), empty, not ASCII or not
    /// valid is an error naming it.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Result<Self, ReplayError> {
        let mut hints = Self::default();
        if !crate::http::has_fly_header(headers) {
            return Ok(hints);
        }
        for value in headers.get_all(FLY_PREFER_REGION) {
            let text = hint_text(FLY_PREFER_REGION, value)?;
            let before = hints.prefer_regions.len();
            for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let sel =
                    RegionSel::parse(item).map_err(|reason| hint_err(FLY_PREFER_REGION, text, reason))?;
                if !hints.prefer_regions.contains(&sel) {
                    hints.prefer_regions.push(sel);
                }
            }
            if hints.prefer_regions.len() == before && !text.split(',').any(|s| !s.trim().is_empty()) {
                return Err(hint_err(
                    FLY_PREFER_REGION,
                    text,
                    "names no region: write e.g. iad,ord",
                ));
            }
        }
        if let Some(text) = single_hint(headers, FLY_FORCE_REGION)? {
            let sel = RegionSel::parse(text).map_err(|reason| hint_err(FLY_FORCE_REGION, text, reason))?;
            hints.force_region = Some(sel);
        }
        hints.prefer_instance = hint_machine(headers, FLY_PREFER_INSTANCE_ID)?;
        hints.force_instance = hint_machine(headers, FLY_FORCE_INSTANCE_ID)?;
        Ok(hints)
    }
}

fn hint_err(header: &'static str, value: &str, reason: impl Into<String>) -> ReplayError {
    ReplayError::Hint {
        header,
        value: clip(value),
        reason: reason.into(),
    }
}

/// A hint header's trimmed text; empty is an error.
fn hint_text<'a>(header: &'static str, value: &'a HeaderValue) -> Result<&'a str, ReplayError> {
    let text = value
        .to_str()
        .map_err(|_| {
            hint_err(
                header,
                &String::from_utf8_lossy(value.as_bytes()),
                "not visible ASCII",
            )
        })?
        .trim();
    if text.is_empty() {
        return Err(hint_err(
            header,
            text,
            "the value is empty: remove the header or give a value",
        ));
    }
    Ok(text)
}

/// The text of a header that may appear at most once.
fn single_hint<'a>(headers: &'a HeaderMap, header: &'static str) -> Result<Option<&'a str>, ReplayError> {
    let mut values = headers.get_all(header).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        let n = headers.get_all(header).iter().count();
        let shown = String::from_utf8_lossy(first.as_bytes());
        return Err(hint_err(header, &shown, format!("given {n} times: send it once")));
    }
    hint_text(header, first).map(Some)
}

fn hint_machine(headers: &HeaderMap, header: &'static str) -> Result<Option<MachineId>, ReplayError> {
    single_hint(headers, header)?
        .map(|text| {
            text.parse::<MachineId>()
                .map_err(|e| hint_err(header, text, format!("{e}, as in 3d8d9e1f2a9e48")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3d8d9e1f2a9e48";
    const ID2: &str = "0123456789abcd";

    fn id(s: &str) -> MachineId {
        s.parse().unwrap()
    }

    fn region(s: &str) -> RegionSel {
        RegionSel::Region(s.to_owned())
    }

    fn alias(s: &str) -> RegionSel {
        RegionSel::Alias(s.to_owned())
    }

    /// The field an error names, for asserting on.
    fn err_field(e: &ReplayError) -> &str {
        match e {
            ReplayError::Field { field, .. } | ReplayError::Duplicate { field } => field,
            other => panic!("not a field error: {other:?}"),
        }
    }

    #[test]
    fn constants_match_fly_limits() {
        assert_eq!(MAX_REPLAY_HOPS, 10);
        assert_eq!(MAX_REPLAY_BODY, 1_048_576);
    }

    #[test]
    fn header_single_region() {
        let r = parse_header("region=sjc").unwrap();
        assert_eq!(
            r,
            Replay {
                regions: vec![region("sjc")],
                ..Replay::default()
            }
        );
    }

    #[test]
    fn header_all_fields() {
        let r = parse_header(&format!(
            "region=\"iad,ord,us,any\";instance={ID};prefer_instance={ID2};app=my-worker;state=abc 123;elsewhere=true;timeout=2s;fallback=force_self"
        ))
        .unwrap();
        assert_eq!(
            r.regions,
            vec![region("iad"), region("ord"), alias("us"), alias("any")]
        );
        assert_eq!(r.instance, Some(id(ID)));
        assert_eq!(r.prefer_instance, Some(id(ID2)));
        assert_eq!(r.app.as_deref(), Some("my-worker"));
        assert_eq!(r.state.as_deref(), Some("abc 123"));
        assert!(r.elsewhere);
        assert_eq!(r.timeout, Some(Duration::from_secs(2)));
        assert_eq!(r.fallback, Some(Fallback::ForceSelf));
        assert_eq!(r.transform, None);
    }

    #[test]
    fn header_is_whitespace_and_case_tolerant() {
        let r =
            parse_header("  Region = \"iad , ORD\" ; ELSEWHERE=True ;; Fallback = Prefer_Self ; ").unwrap();
        assert_eq!(r.regions, vec![region("iad"), region("ORD")]);
        assert!(r.elsewhere);
        assert_eq!(r.fallback, Some(Fallback::PreferSelf));
    }

    #[test]
    fn header_aliases_are_recognised_and_usa_is_us() {
        let r = parse_header("region=\"APAC,eu,na,sa,usa,us,Any\"").unwrap();
        assert_eq!(
            r.regions,
            vec![
                alias("apac"),
                alias("eu"),
                alias("na"),
                alias("sa"),
                alias("us"),
                alias("any")
            ]
        );
    }

    #[test]
    fn header_region_list_unquoted_and_deduplicated() {
        let r = parse_header("region=iad,ord,iad,,").unwrap();
        assert_eq!(r.regions, vec![region("iad"), region("ord")]);
    }

    #[test]
    fn header_quoted_state_may_hold_separators_and_escapes() {
        let r = parse_header(r#"app=a;state="x;y=z \"q\"""#).unwrap();
        assert_eq!(r.state.as_deref(), Some(r#"x;y=z "q""#));
        assert_eq!(r.app.as_deref(), Some("a"));
    }

    #[test]
    fn header_unknown_keys_are_ignored() {
        let r = parse_header("future_field=1;region=iad;cache=whatever").unwrap();
        assert_eq!(r.regions, vec![region("iad")]);
    }

    #[test]
    fn header_durations() {
        for (text, want) in [
            ("10s", Duration::from_secs(10)),
            ("500ms", Duration::from_millis(500)),
            ("1m", Duration::from_secs(60)),
            ("1m30s", Duration::from_secs(90)),
            ("1.5s", Duration::from_millis(1500)),
        ] {
            let r = parse_header(&format!("app=a;timeout={text}")).unwrap();
            assert_eq!(r.timeout, Some(want), "{text}");
        }
        for bad in ["10", "0s", "0", "-1s", "soon", "10 parsecs"] {
            let e = parse_header(&format!("app=a;timeout={bad}")).unwrap_err();
            assert_eq!(err_field(&e), "timeout", "{bad}: {e}");
        }
    }

    #[test]
    fn header_elsewhere_alone_is_a_target_and_false_is_not() {
        assert!(parse_header("elsewhere=true").unwrap().elsewhere);
        assert_eq!(parse_header("elsewhere=false").unwrap_err(), ReplayError::Empty);
    }

    #[test]
    fn header_without_a_target_is_empty() {
        for v in [
            "",
            "  ",
            ";",
            "state=x",
            "timeout=1s;fallback=prefer_self",
            "unknown=1",
            "state=",
        ] {
            assert_eq!(parse_header(v).unwrap_err(), ReplayError::Empty, "{v:?}");
        }
        assert!(ReplayError::Empty.to_string().contains("region"));
    }

    #[test]
    fn header_invalid_values_name_their_field() {
        for (v, field) in [
            ("instance=nope", "instance"),
            ("instance=3D8D9E1F2A9E48", "instance"),
            ("prefer_instance=3d8d9e1f2a9e4", "prefer_instance"),
            ("app=Bad_App", "app"),
            ("app=-x", "app"),
            ("region=i@d", "region"),
            ("region=\"iad,o rd\"", "region"),
            ("region=", "region"),
            ("region=\",,\"", "region"),
            ("elsewhere=yes", "elsewhere"),
            ("region=iad;fallback=retry", "fallback"),
            ("region=iad;state=\"a\u{1}b\"", "state"),
            ("region=iad;state=caf\u{e9}", "state"),
        ] {
            let e = parse_header(v).unwrap_err();
            assert_eq!(err_field(&e), field, "{v:?}: {e}");
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn header_duplicate_fields_are_errors_even_across_case() {
        let e = parse_header("region=iad;Region=ord").unwrap_err();
        assert_eq!(
            e,
            ReplayError::Duplicate {
                field: "region".to_owned()
            }
        );
    }

    #[test]
    fn header_syntax_errors() {
        for v in [
            "region",
            "region=iad;elsewhere",
            "=iad",
            "region=\"iad",
            "region=\"iad\" ord",
            "re gion=iad",
        ] {
            assert!(
                matches!(parse_header(v), Err(ReplayError::Syntax(_))),
                "{v:?}: {:?}",
                parse_header(v)
            );
        }
    }

    #[test]
    fn long_values_are_shortened_in_errors() {
        let long = "x".repeat(500);
        let e = parse_header(&format!("app={long}")).unwrap_err();
        let ReplayError::Field { value, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(value.chars().count(), MAX_QUOTED + 1);
        assert!(value.ends_with('…'));
    }

    #[test]
    fn from_headers_joins_several_and_is_none_without() {
        let mut h = HeaderMap::new();
        assert_eq!(Replay::from_headers(&h).unwrap(), None);
        h.append(FLY_REPLAY, HeaderValue::from_static("region=iad"));
        h.append(FLY_REPLAY, HeaderValue::from_static("state=s1"));
        let r = Replay::from_headers(&h).unwrap().unwrap();
        assert_eq!(r.regions, vec![region("iad")]);
        assert_eq!(r.state.as_deref(), Some("s1"));
        h.append(FLY_REPLAY, HeaderValue::from_static("region=ord"));
        assert!(matches!(
            Replay::from_headers(&h),
            Err(ReplayError::Duplicate { .. })
        ));
        let mut bad = HeaderMap::new();
        bad.insert(FLY_REPLAY, HeaderValue::from_bytes(b"region=\xff").unwrap());
        assert!(matches!(Replay::from_headers(&bad), Err(ReplayError::Syntax(_))));
    }

    #[test]
    fn content_type_detection() {
        for yes in [
            "application/vnd.fly.replay+json",
            "Application/VND.Fly.Replay+JSON",
            "application/vnd.fly.replay+json; charset=utf-8",
            "  application/vnd.fly.replay+json ;x=y",
        ] {
            assert!(is_replay_json(yes), "{yes}");
        }
        for no in [
            "application/json",
            "",
            "application/vnd.fly.replay+jsonx",
            "text/plain; application/vnd.fly.replay+json",
        ] {
            assert!(!is_replay_json(no), "{no}");
        }
    }

    #[test]
    fn json_all_fields() {
        let body = serde_json::json!({
            "region": "iad,eu",
            "instance": ID,
            "prefer_instance": ID2,
            "app": "api",
            "state": "s",
            "elsewhere": true,
            "timeout": "500ms",
            "fallback": "prefer_self",
            "transform": {
                "path": "/v2/users?page=2",
                "delete_headers": ["Cookie", "x-internal"],
                "set_headers": [{"name": "X-Tenant", "value": "acme"}, {"name": "x-b", "value": ""}]
            },
            "cache": {"prefix": "/some/path/*", "ttl": 30},
            "future": [1, 2, 3]
        });
        let r = parse_json(body.to_string().as_bytes()).unwrap();
        assert_eq!(
            r,
            Replay {
                regions: vec![region("iad"), alias("eu")],
                instance: Some(id(ID)),
                prefer_instance: Some(id(ID2)),
                app: Some("api".to_owned()),
                state: Some("s".to_owned()),
                elsewhere: true,
                timeout: Some(Duration::from_millis(500)),
                fallback: Some(Fallback::PreferSelf),
                transform: Some(Transform {
                    path: Some("/v2/users?page=2".to_owned()),
                    delete_headers: vec!["cookie".to_owned(), "x-internal".to_owned()],
                    set_headers: vec![
                        ("x-tenant".to_owned(), "acme".to_owned()),
                        ("x-b".to_owned(), String::new())
                    ],
                }),
                cache: Some(crate::replay_cache::Directive::Store {
                    host: None,
                    pattern: crate::replay_cache::Pattern {
                        path: "/some/path/".to_owned(),
                        prefix: true,
                    },
                    ttl: Duration::from_secs(30),
                    allow_bypass: false,
                }),
            }
        );
    }

    #[test]
    fn json_fly_example_with_cache_is_accepted() {
        let r = parse_json(
            br#"{"app": "example-app", "region": "syd", "cache": {"prefix": "/some/path/*", "ttl": 30}}"#,
        )
        .unwrap();
        assert_eq!(r.app.as_deref(), Some("example-app"));
        assert_eq!(r.regions, vec![region("syd")]);
    }

    #[test]
    fn json_region_array_nulls_and_string_booleans() {
        let r =
            parse_json(br#"{"region": ["iad", "ord,iad", "usa"], "instance": null, "elsewhere": "true"}"#)
                .unwrap();
        assert_eq!(r.regions, vec![region("iad"), region("ord"), alias("us")]);
        assert_eq!(r.instance, None);
        assert!(r.elsewhere);
    }

    #[test]
    fn json_set_headers_as_an_object() {
        let r = parse_json(br#"{"app": "a", "transform": {"set_headers": {"X-A": "1"}}}"#).unwrap();
        assert_eq!(
            r.transform.unwrap().set_headers,
            vec![("x-a".to_owned(), "1".to_owned())]
        );
    }

    #[test]
    fn json_empty_transform_is_none() {
        let r =
            parse_json(br#"{"app": "a", "transform": {"delete_headers": [], "set_headers": []}}"#).unwrap();
        assert_eq!(r.transform, None);
    }

    #[test]
    fn json_transform_alone_is_no_target() {
        assert_eq!(
            parse_json(br#"{"transform": {"path": "/x"}}"#).unwrap_err(),
            ReplayError::Empty
        );
        assert_eq!(parse_json(b"{}").unwrap_err(), ReplayError::Empty);
    }

    #[test]
    fn json_not_an_object() {
        for body in [
            &b"[]"[..],
            b"\"region=iad\"",
            b"not json",
            b"",
            b"{\"app\": \"a\"",
        ] {
            assert!(matches!(parse_json(body), Err(ReplayError::Json(_))), "{body:?}");
        }
    }

    #[test]
    fn json_invalid_values_name_their_field() {
        for (body, field) in [
            (r#"{"region": 5}"#, "region"),
            (r#"{"region": []}"#, "region"),
            (r#"{"region": ["iad", 1]}"#, "region[1]"),
            (r#"{"region": ["i d"]}"#, "region[0]"),
            (r#"{"instance": 1234}"#, "instance"),
            (r#"{"instance": "zz"}"#, "instance"),
            (r#"{"app": "a", "elsewhere": 1}"#, "elsewhere"),
            (r#"{"app": "a", "timeout": 10}"#, "timeout"),
            (r#"{"app": "a", "timeout": "0ms"}"#, "timeout"),
            (r#"{"app": "a", "state": "line\nbreak"}"#, "state"),
            (r#"{"app": "a", "transform": []}"#, "transform"),
            (
                r#"{"app": "a", "transform": {"path": "relative"}}"#,
                "transform.path",
            ),
            (r#"{"app": "a", "transform": {"path": "/a b"}}"#, "transform.path"),
            (
                r#"{"app": "a", "transform": {"delete_headers": "x"}}"#,
                "transform.delete_headers",
            ),
            (
                r#"{"app": "a", "transform": {"delete_headers": ["bad header"]}}"#,
                "transform.delete_headers[0]",
            ),
            (
                r#"{"app": "a", "transform": {"delete_headers": ["Content-Length"]}}"#,
                "transform.delete_headers[0]",
            ),
            (
                r#"{"app": "a", "transform": {"set_headers": [{"name": "transfer-encoding", "value": "chunked"}]}}"#,
                "transform.set_headers[0].name",
            ),
            (
                r#"{"app": "a", "transform": {"set_headers": [{"name": "x-a", "value": "a\r\nb"}]}}"#,
                "transform.set_headers[0].value",
            ),
            (
                r#"{"app": "a", "transform": {"set_headers": [{"name": "x-a"}]}}"#,
                "transform.set_headers[0].value",
            ),
            (
                r#"{"app": "a", "transform": {"set_headers": ["x-a: 1"]}}"#,
                "transform.set_headers[0]",
            ),
            (
                r#"{"app": "a", "transform": {"set_headers": {"x-a": 1}}}"#,
                "transform.set_headers.x-a.value",
            ),
        ] {
            let e = parse_json(body.as_bytes()).unwrap_err();
            assert_eq!(err_field(&e), field, "{body}: {e}");
        }
    }

    #[test]
    fn replay_src_format() {
        assert_eq!(
            replay_src(ID, "iad", 1_700_000_000_123_456, Some("abc")),
            "instance=3d8d9e1f2a9e48;region=iad;t=1700000000123456;state=abc"
        );
        assert_eq!(
            replay_src(ID, "iad", 42, None),
            "instance=3d8d9e1f2a9e48;region=iad;t=42"
        );
        // The value must be usable as a header.
        assert!(HeaderValue::from_str(&replay_src(ID, "iad", 42, Some("a b"))).is_ok());
    }

    #[test]
    fn micros_since_epoch_counts_microseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(micros_since_epoch(t), 1_700_000_000_123_456);
        assert_eq!(
            micros_since_epoch(SystemTime::UNIX_EPOCH - Duration::from_secs(1)),
            0
        );
    }

    #[test]
    fn replay_failed_format() {
        let f = ReplayFailure {
            instance: "",
            app: "my-worker",
            region: "iad,ord",
            replay_source: ID,
            reason: FailReason::Timeout,
            elapsed: Duration::from_micros(2_000_999),
        };
        assert_eq!(
            replay_failed(&f),
            "instance=;app=my-worker;region=iad,ord;replay_source=3d8d9e1f2a9e48;reason=timeout;elapsed_ms=2000"
        );
        let f = ReplayFailure {
            instance: ID2,
            reason: FailReason::RetriesExhausted,
            ..f
        };
        assert!(replay_failed(&f).contains("instance=0123456789abcd;"));
        assert!(replay_failed(&f).contains(";reason=retries_exhausted;"));
        assert_eq!(FailReason::NoCandidate.as_str(), "no_candidate");
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hints_absent_are_empty() {
        let h = RoutingHints::from_headers(&HeaderMap::new()).unwrap();
        assert_eq!(h, RoutingHints::default());
    }

    #[test]
    fn hints_all_headers() {
        let h = RoutingHints::from_headers(&headers(&[
            ("fly-prefer-region", "iad, ord,us"),
            ("Fly-Prefer-Region", "ord,fra"),
            ("fly-force-region", " sjc "),
            ("fly-prefer-instance-id", ID),
            ("fly-force-instance-id", ID2),
        ]))
        .unwrap();
        assert_ne!(h, RoutingHints::default());
        assert_eq!(
            h.prefer_regions,
            vec![region("iad"), region("ord"), alias("us"), region("fra")]
        );
        assert_eq!(h.force_region, Some(region("sjc")));
        assert_eq!(h.prefer_instance, Some(id(ID)));
        assert_eq!(h.force_instance, Some(id(ID2)));
    }

    #[test]
    fn hints_invalid_values_name_their_header() {
        for (pairs, header) in [
            (vec![("fly-prefer-region", "iad,o d")], FLY_PREFER_REGION),
            (vec![("fly-prefer-region", ",")], FLY_PREFER_REGION),
            (vec![("fly-prefer-region", "")], FLY_PREFER_REGION),
            (vec![("fly-force-region", "iad,ord")], FLY_FORCE_REGION),
            (vec![("fly-force-region", "")], FLY_FORCE_REGION),
            (
                vec![("fly-force-region", "iad"), ("fly-force-region", "ord")],
                FLY_FORCE_REGION,
            ),
            (
                vec![("fly-prefer-instance-id", "3D8D9E1F2A9E48")],
                FLY_PREFER_INSTANCE_ID,
            ),
            (
                vec![("fly-force-instance-id", "3d8d9e1f2a9e48a")],
                FLY_FORCE_INSTANCE_ID,
            ),
            (
                vec![("fly-force-instance-id", ID), ("fly-force-instance-id", ID)],
                FLY_FORCE_INSTANCE_ID,
            ),
        ] {
            let e = RoutingHints::from_headers(&headers(&pairs)).unwrap_err();
            let ReplayError::Hint { header: got, .. } = &e else {
                panic!("{pairs:?}: {e:?}")
            };
            assert_eq!(*got, header, "{pairs:?}");
            assert!(e.to_string().contains(header), "{e}");
        }
        let mut h = HeaderMap::new();
        h.insert(FLY_FORCE_REGION, HeaderValue::from_bytes(b"\xfft").unwrap());
        assert!(matches!(
            RoutingHints::from_headers(&h),
            Err(ReplayError::Hint { .. })
        ));
    }

    #[test]
    fn region_sel_displays_its_name() {
        assert_eq!(region("iad").to_string(), "iad");
        assert_eq!(RegionSel::parse("USA").unwrap().to_string(), "us");
        assert!(!RegionSel::parse("x".repeat(64).as_str()).unwrap_err().is_empty());
        assert_eq!(
            RegionSel::parse(&"x".repeat(63)).unwrap(),
            region(&"x".repeat(63))
        );
    }
}
