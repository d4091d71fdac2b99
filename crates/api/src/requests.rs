//! Request and response bodies of the machine endpoints, and their query parameters.
//!
//! Query parameters are parsed from decoded `(name, value)` pairs (`from_query`) rather than
//! through serde, because Fly's clients repeat keys (`state=a&state=b`) and use dynamic names
//! (`metadata.<key>=<value>`). Unknown parameters are ignored; bad values are a 400 naming the
//! parameter.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ApiError, Duration, MachineConfig, MachineState, StopSignal};

/// `POST /apps/{app}/machines` body (`CreateMachineRequest`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreateMachineRequest {
    /// The machine's config; only `config.image` is required.
    pub config: MachineConfig,
    /// Unique name within the app; generated when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Target region; the server's default region when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Create without booting: the machine rests in `created`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_launch: Option<bool>,
    /// Keep the machine out of the proxy's pool (create + cordon; used by bluegreen deploys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_service_registration: Option<bool>,
    /// Take a lease of this many seconds atomically; its nonce comes back in `Machine.nonce`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ttl: Option<u64>,
    /// Fly's log-structured virtual disk; accepted and ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lsvd: Option<bool>,
    /// Do not inject the app's secrets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_secrets: Option<bool>,
    /// The machine must get at least this secrets version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_secrets_version: Option<u64>,
}

impl CreateMachineRequest {
    /// Checks what serde cannot: an image is given and the name is usable.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_image(&self.config)?;
        if let Some(name) = &self.name {
            validate_machine_name(name)?;
        }
        Ok(())
    }
}

/// `POST /apps/{app}/machines/{id}` body (`UpdateMachineRequest`): a full replacement of the
/// config, never a partial patch. `name` and `region` cannot change.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UpdateMachineRequest {
    /// The new config (replaces the old one entirely).
    pub config: MachineConfig,
    /// Must equal the machine's name if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Must equal the machine's region if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Expected current version (`instance_id`); 412 when it moved on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    /// Leave the new version stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_launch: Option<bool>,
    /// Keep the machine out of the proxy's pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_service_registration: Option<bool>,
    /// Take a lease of this many seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ttl: Option<u64>,
    /// Accepted and ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lsvd: Option<bool>,
    /// Do not inject the app's secrets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_secrets: Option<bool>,
    /// The machine must get at least this secrets version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_secrets_version: Option<u64>,
}

impl UpdateMachineRequest {
    /// Checks the image and that `name` and `region`, if given, are the machine's own.
    pub fn validate(&self, name: &str, region: &str) -> Result<(), ApiError> {
        validate_image(&self.config)?;
        if let Some(n) = self.name.as_deref().filter(|n| !n.is_empty() && *n != name) {
            return Err(ApiError::bad_request(format!(
                "name cannot change on update (machine is {name:?}, request says {n:?}); create a new machine instead"
            )));
        }
        if let Some(r) = self.region.as_deref().filter(|r| !r.is_empty() && *r != region) {
            return Err(ApiError::bad_request(format!(
                "region cannot change on update (machine is in {region:?}, request says {r:?}); clone the machine instead"
            )));
        }
        Ok(())
    }
}

fn validate_image(config: &MachineConfig) -> Result<(), ApiError> {
    match config.image.as_deref().map(str::trim) {
        Some(image) if !image.is_empty() => Ok(()),
        _ => Err(ApiError::bad_request(
            "config.image is required: name the image to run, e.g. \"nginx:latest\"",
        )),
    }
}

/// Checks a machine name: 1–63 characters of lowercase letters, digits, `-` and `_`.
pub fn validate_machine_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid machine name {name:?}: use 1 to 63 lowercase letters, digits, '-' or '_'"
        )))
    }
}

/// `POST …/stop` body (optional).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StopRequest {
    /// Signal sent first (default: the config's `stop_config.signal`, else SIGINT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<StopSignal>,
    /// How long to wait before the forced stop (`"10s"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// `{"ok": true}`, the answer of stop, destroy and friends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OkResponse {
    /// Always true on success.
    pub ok: bool,
}

impl OkResponse {
    /// `{"ok": true}`.
    pub const OK: Self = Self { ok: true };
}

/// `POST …/start` answer: the docs' `{previous_state, migrated, new_host}` plus fly-go's
/// `message` and `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StartResponse {
    /// The state before the start.
    pub previous_state: MachineState,
    /// Whether the machine moved host (always false on one host).
    #[serde(default)]
    pub migrated: bool,
    /// The new host, when migrated.
    #[serde(default)]
    pub new_host: String,
    /// Extra information for humans.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// fly-go reads it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
}

/// States `wait` can wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum WaitState {
    /// `started`.
    Started,
    /// `stopped`.
    Stopped,
    /// `suspended`.
    Suspended,
    /// `destroyed`.
    Destroyed,
    /// `failed`.
    Failed,
    /// Any state that is not transient.
    Settled,
}

impl WaitState {
    /// Parses the query spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "started" => Self::Started,
            "stopped" => Self::Stopped,
            "suspended" => Self::Suspended,
            "destroyed" => Self::Destroyed,
            "failed" => Self::Failed,
            "settled" => Self::Settled,
            _ => return None,
        })
    }

    /// Whether a machine in `state` satisfies this wait.
    pub fn matches(self, state: MachineState) -> bool {
        match self {
            Self::Started => state == MachineState::Started,
            Self::Stopped => state == MachineState::Stopped,
            Self::Suspended => state == MachineState::Suspended,
            Self::Destroyed => state == MachineState::Destroyed,
            Self::Failed => state == MachineState::Failed,
            Self::Settled => state.is_settled(),
        }
    }
}

/// `GET …/wait` query: `state` (repeated or comma-separated, default `started`), `timeout`
/// (seconds, 1–60, default 60), `version` (alias `instance_id`), `from_event_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitQuery {
    /// Any of these ends the wait.
    pub states: Vec<WaitState>,
    /// How long to wait before answering 408.
    pub timeout: std::time::Duration,
    /// Only this version counts.
    pub version: Option<String>,
    /// Only events after this one count.
    pub from_event_id: Option<String>,
}

impl WaitQuery {
    /// Longest wait a request may ask for.
    pub const MAX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

    /// Whether a machine in `state` ends the wait.
    pub fn matches(&self, state: MachineState) -> bool {
        self.states.iter().any(|w| w.matches(state))
    }

    /// Parses decoded query pairs; 400 on bad values.
    pub fn from_query<I, K, V>(pairs: I) -> Result<Self, ApiError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut q = Self {
            states: Vec::new(),
            timeout: Self::MAX_TIMEOUT,
            version: None,
            from_event_id: None,
        };
        for (k, v) in pairs {
            let v = v.as_ref().trim();
            match k.as_ref() {
                "state" => {
                    for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        let state = WaitState::parse(s).ok_or_else(|| {
                            ApiError::bad_request(format!(
                                "invalid state {s:?} in wait: use started, stopped, suspended, destroyed, failed or settled"
                            ))
                        })?;
                        if !q.states.contains(&state) {
                            q.states.push(state);
                        }
                    }
                }
                "timeout" => q.timeout = parse_wait_timeout(v)?,
                "version" | "instance_id" if !v.is_empty() => q.version = Some(v.to_owned()),
                "from_event_id" if !v.is_empty() => q.from_event_id = Some(v.to_owned()),
                _ => {}
            }
        }
        if q.states.is_empty() {
            q.states.push(WaitState::Started);
        }
        Ok(q)
    }
}

fn parse_wait_timeout(v: &str) -> Result<std::time::Duration, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "invalid wait timeout {v:?}: give whole seconds from 1 to 60 (longer waits: repeat the request)"
        ))
    };
    let d = seconds_or_duration(v).ok_or_else(bad)?;
    if d.is_zero() || d > WaitQuery::MAX_TIMEOUT {
        return Err(bad());
    }
    Ok(d)
}

/// A number of seconds (`"10"`) or a Go duration (`"10s"`).
fn seconds_or_duration(v: &str) -> Option<std::time::Duration> {
    if let Ok(secs) = v.parse::<u64>() {
        return Some(std::time::Duration::from_secs(secs));
    }
    v.parse::<Duration>().ok().map(Duration::get)
}

/// Go's `strconv.ParseBool` spellings, plus an empty value meaning true (`?force`).
fn parse_bool(name: &str, v: &str) -> Result<bool, ApiError> {
    match v {
        "" | "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(ApiError::bad_request(format!(
            "invalid value {v:?} for {name}: use true or false"
        ))),
    }
}

/// `GET …/wait` answer (`WaitMachineResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WaitResponse {
    /// True when the state was reached.
    pub ok: bool,
    /// The state reached.
    pub state: MachineState,
    /// The machine's version.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// The event that reached it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub event_id: String,
}

/// `GET /apps/{app}/machines` query.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListMachinesQuery {
    /// Also list destroyed (and replaced) machines.
    pub include_deleted: bool,
    /// Only this region.
    pub region: Option<String>,
    /// Only these states (empty: all).
    pub states: Vec<MachineState>,
    /// Drop config, checks, events, host status and nonce ([`crate::Machine::summary`]).
    pub summary: bool,
    /// `metadata.<key>=<value>` filters; all must match.
    pub metadata: BTreeMap<String, String>,
}

impl ListMachinesQuery {
    /// Parses decoded query pairs; 400 on bad values.
    pub fn from_query<I, K, V>(pairs: I) -> Result<Self, ApiError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut q = Self::default();
        for (k, v) in pairs {
            let (k, v) = (k.as_ref(), v.as_ref().trim());
            match k {
                "include_deleted" => q.include_deleted = parse_bool(k, v)?,
                "summary" => q.summary = parse_bool(k, v)?,
                "region" if !v.is_empty() => q.region = Some(v.to_owned()),
                "state" => {
                    for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        let state = s
                            .parse::<MachineState>()
                            .map_err(|e| ApiError::bad_request(e.to_string()))?;
                        if !q.states.contains(&state) {
                            q.states.push(state);
                        }
                    }
                }
                _ => {
                    if let Some(key) = k.strip_prefix("metadata.").filter(|key| !key.is_empty()) {
                        q.metadata.insert(key.to_owned(), v.to_owned());
                    }
                }
            }
        }
        Ok(q)
    }

    /// Whether a machine passes the filters.
    pub fn matches(&self, m: &crate::Machine) -> bool {
        (self.include_deleted || !m.state.is_terminal())
            && self.region.as_ref().is_none_or(|r| *r == m.region)
            && (self.states.is_empty() || self.states.contains(&m.state))
            && self.metadata.iter().all(|(k, v)| {
                m.config
                    .as_ref()
                    .and_then(|c| c.metadata.get(k))
                    .is_some_and(|mv| mv == v)
            })
    }
}

/// `DELETE …/{id}` query: `force=true`, or fly-go's `kill=true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DestroyQuery {
    /// Destroy even a running machine.
    pub force: bool,
}

impl DestroyQuery {
    /// Parses decoded query pairs; 400 on bad values.
    pub fn from_query<I, K, V>(pairs: I) -> Result<Self, ApiError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut q = Self::default();
        for (k, v) in pairs {
            let k = k.as_ref();
            if k == "force" || k == "kill" {
                q.force |= parse_bool(k, v.as_ref().trim())?;
            }
        }
        Ok(q)
    }
}

/// `POST …/restart` query: `timeout` (Go duration or seconds), `signal`, fly-go's `force_stop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RestartQuery {
    /// Time between the signal and the forced stop.
    pub timeout: Option<std::time::Duration>,
    /// Signal sent first.
    pub signal: Option<StopSignal>,
    /// Stop forcibly right away.
    pub force_stop: bool,
}

impl RestartQuery {
    /// Parses decoded query pairs; 400 on bad values.
    pub fn from_query<I, K, V>(pairs: I) -> Result<Self, ApiError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut q = Self::default();
        for (k, v) in pairs {
            let (k, v) = (k.as_ref(), v.as_ref().trim());
            match k {
                "timeout" if !v.is_empty() => {
                    q.timeout = Some(seconds_or_duration(v).ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "invalid restart timeout {v:?}: give seconds (\"10\") or a duration (\"10s\")"
                        ))
                    })?);
                }
                "signal" if !v.is_empty() => {
                    q.signal = Some(StopSignal::parse(v).ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "invalid signal {v:?}: use SIGHUP, SIGINT, SIGQUIT, SIGKILL, SIGUSR1, SIGUSR2 or SIGTERM"
                        ))
                    })?);
                }
                "force_stop" => q.force_stop = parse_bool(k, v)?,
                _ => {}
            }
        }
        Ok(q)
    }
}

/// `GET …/events` query: `limit`, default 20, at most 50 (larger values are clamped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsQuery {
    /// How many events, newest first.
    pub limit: usize,
}

impl EventsQuery {
    /// The default limit.
    pub const DEFAULT_LIMIT: usize = 20;
    /// The largest limit.
    pub const MAX_LIMIT: usize = 50;

    /// Parses decoded query pairs; 400 on a limit that is not a positive number.
    pub fn from_query<I, K, V>(pairs: I) -> Result<Self, ApiError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut limit = Self::DEFAULT_LIMIT;
        for (k, v) in pairs {
            let v = v.as_ref().trim();
            if k.as_ref() == "limit" && !v.is_empty() {
                limit = v.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    ApiError::bad_request(format!("invalid limit {v:?}: give a number from 1 to 50"))
                })?;
            }
        }
        Ok(Self {
            limit: limit.min(Self::MAX_LIMIT),
        })
    }
}

/// `PUT`/`PATCH …/metadata` body (`updateMetadataRequest`). A `null` or `""` value deletes the
/// key; a stale `machine_version` is a 412.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UpdateMetadataRequest {
    /// Keys to set or (with null / "") delete.
    #[serde(default)]
    pub metadata: BTreeMap<String, Option<String>>,
    /// Expected current version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_version: Option<String>,
    /// Client's timestamp (informational).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

impl UpdateMetadataRequest {
    /// Applies the request to a metadata map: sets values, deletes null or empty ones.
    pub fn apply(&self, metadata: &mut BTreeMap<String, String>) {
        for (k, v) in &self.metadata {
            match v.as_deref() {
                None | Some("") => {
                    metadata.remove(k);
                }
                Some(v) => {
                    metadata.insert(k.clone(), v.to_owned());
                }
            }
        }
    }
}

/// `POST …/metadata/{key}` body (`upsertMetadataKeyRequest`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UpsertMetadataKeyRequest {
    /// The value.
    #[serde(default)]
    pub value: String,
    /// Client's timestamp (informational).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// `GET …/metadata/{key}` answer (`metadataValueResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MetadataValueResponse {
    /// The value.
    pub value: String,
}

/// `POST …/exec` body (`MachineExecRequest`): `command` (argv), or the deprecated `cmd` string.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ExecRequest {
    /// Argv to run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Deprecated: a command line, split on whitespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    /// Container of a multi-container machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Standard input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Seconds before the command is killed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// fly-go sends it; ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine: Option<bool>,
}

impl ExecRequest {
    /// The argv to run: `command`, else `cmd` split on whitespace; 400 if both are empty.
    pub fn argv(&self) -> Result<Vec<String>, ApiError> {
        let argv = if self.command.is_empty() {
            self.cmd
                .as_deref()
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        } else {
            self.command.clone()
        };
        if argv.first().is_none_or(String::is_empty) {
            return Err(ApiError::bad_request(
                "exec needs a command: give \"command\": [\"prog\", \"arg\", …]",
            ));
        }
        Ok(argv)
    }
}

/// `POST …/exec` answer (`flydv1.ExecResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ExecResponse {
    /// Exit code of the command.
    #[serde(default)]
    pub exit_code: i32,
    /// Signal that killed it (0 if none).
    #[serde(default)]
    pub exit_signal: i32,
    /// Standard output (lossy UTF-8).
    #[serde(default)]
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    #[serde(default)]
    pub stderr: String,
}

/// One process of `GET …/ps` (`ProcessStat`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ProcessStat {
    /// Process id in the guest.
    #[serde(default)]
    pub pid: u32,
    /// Command line.
    #[serde(default)]
    pub command: String,
    /// CPU usage, percent.
    #[serde(default)]
    pub cpu: u64,
    /// Resident memory, bytes.
    #[serde(default)]
    pub rss: u64,
    /// Run time, user.
    #[serde(default)]
    pub rtime: u64,
    /// Run time, system.
    #[serde(default)]
    pub stime: u64,
    /// Working directory.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub directory: String,
    /// Sockets it listens on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listen_sockets: Vec<ListenSocket>,
}

/// A listening socket (`ListenSocket`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ListenSocket {
    /// `tcp` or `udp`.
    #[serde(default)]
    pub proto: String,
    /// `address:port`.
    #[serde(default)]
    pub address: String,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn create_request_like_flyctl_sends() {
        let input = json!({
            "name": "web-1",
            "region": "ams",
            "config": {
                "image": "registry.fly.io/app:deployment-01J",
                "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
                "metadata": {"fly_platform_version": "v2", "fly_process_group": "app"},
                "restart": {"policy": "always"}
            },
            "skip_launch": true,
            "skip_service_registration": false,
            "lease_ttl": 13,
            "min_secrets_version": 3
        });
        let req: CreateMachineRequest = serde_json::from_value(input.clone()).unwrap();
        req.validate().unwrap();
        assert_eq!(req.lease_ttl, Some(13));
        assert_eq!(serde_json::to_value(&req).unwrap(), input);
        // Fields newer than the spec are ignored.
        let newer: CreateMachineRequest =
            serde_json::from_value(json!({"config": {"image": "nginx"}, "spot": true})).unwrap();
        newer.validate().unwrap();
    }

    #[test]
    fn create_request_errors_name_the_field() {
        let missing = serde_json::from_value::<CreateMachineRequest>(json!({"name": "x"})).unwrap_err();
        assert!(missing.to_string().contains("config"), "{missing}");
        let no_image: CreateMachineRequest = serde_json::from_value(json!({"config": {}})).unwrap();
        let e = no_image.validate().unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.message().contains("config.image"));
        let bad_name = CreateMachineRequest {
            config: MachineConfig {
                image: Some("nginx".into()),
                ..Default::default()
            },
            name: Some("Bad Name".into()),
            ..Default::default()
        };
        assert_eq!(bad_name.validate().unwrap_err().status(), 400);
        assert!(
            serde_json::from_value::<CreateMachineRequest>(
                json!({"config": {"image": "x"}, "lease_ttl": -1})
            )
            .is_err()
        );
    }

    #[test]
    fn update_request_keeps_name_and_region() {
        let req: UpdateMachineRequest = serde_json::from_value(json!({
            "config": {"image": "nginx:2"}, "current_version": "01HBZ8QEXHS0YR4R1N6S1XGEE2", "region": "ams"
        }))
        .unwrap();
        req.validate("web-1", "ams").unwrap();
        assert!(
            req.validate("web-1", "fra")
                .unwrap_err()
                .message()
                .contains("region")
        );
        let renamed = UpdateMachineRequest {
            name: Some("other".into()),
            ..req
        };
        assert!(
            renamed
                .validate("web-1", "ams")
                .unwrap_err()
                .message()
                .contains("name")
        );
    }

    #[test]
    fn stop_request_shapes() {
        let r: StopRequest = serde_json::from_value(json!({"signal": "SIGTERM", "timeout": "10s"})).unwrap();
        assert_eq!(r.signal, Some(StopSignal::SIGTERM));
        assert_eq!(r.timeout, Some(Duration::from_secs(10)));
        assert_eq!(
            serde_json::to_value(r).unwrap(),
            json!({"signal": "SIGTERM", "timeout": "10s"})
        );
        assert_eq!(
            serde_json::from_value::<StopRequest>(json!({})).unwrap(),
            StopRequest::default()
        );
        assert!(serde_json::from_value::<StopRequest>(json!({"signal": "SIGSTOP"})).is_err());
    }

    #[test]
    fn wait_query_accepts_fly_go_and_docs_forms() {
        let q = WaitQuery::from_query([
            ("state", "started"),
            ("state", "stopped"),
            ("instance_id", "01H"),
            ("timeout", "30"),
        ])
        .unwrap();
        assert_eq!(q.states, [WaitState::Started, WaitState::Stopped]);
        assert_eq!(q.version.as_deref(), Some("01H"));
        assert_eq!(q.timeout, std::time::Duration::from_secs(30));
        let csv = WaitQuery::from_query([("state", "stopped,settled"), ("version", "01J")]).unwrap();
        assert_eq!(csv.states, [WaitState::Stopped, WaitState::Settled]);
        assert!(csv.matches(MachineState::Failed));
        assert!(!csv.matches(MachineState::Stopping));
        let default = WaitQuery::from_query(Vec::<(&str, &str)>::new()).unwrap();
        assert_eq!(default.states, [WaitState::Started]);
        assert_eq!(default.timeout, WaitQuery::MAX_TIMEOUT);
        for bad in [
            [("state", "running")],
            [("timeout", "61")],
            [("timeout", "0")],
            [("timeout", "soon")],
        ] {
            assert_eq!(WaitQuery::from_query(bad).unwrap_err().status(), 400, "{bad:?}");
        }
        assert_eq!(
            WaitQuery::from_query([("timeout", "45s")])
                .unwrap()
                .timeout
                .as_secs(),
            45
        );
    }

    #[test]
    fn list_query_filters() {
        let q = ListMachinesQuery::from_query([
            ("state", "started,stopped"),
            ("region", "ams"),
            ("summary", "true"),
            ("metadata.fly_process_group", "app"),
        ])
        .unwrap();
        assert!(q.summary && !q.include_deleted);
        assert_eq!(q.states, [MachineState::Started, MachineState::Stopped]);
        assert_eq!(q.metadata["fly_process_group"], "app");
        let m: crate::Machine = serde_json::from_value(json!({
            "id": "3d8d413b29d089", "state": "started", "region": "ams",
            "config": {"image": "x", "metadata": {"fly_process_group": "app"}}
        }))
        .unwrap();
        assert!(q.matches(&m));
        let mut other = m.clone();
        other.region = "fra".into();
        assert!(!q.matches(&other));
        let mut destroyed = m.clone();
        destroyed.state = MachineState::Destroyed;
        assert!(!ListMachinesQuery::default().matches(&destroyed));
        assert!(
            ListMachinesQuery::from_query([("include_deleted", "1")])
                .unwrap()
                .matches(&destroyed)
        );
        assert_eq!(
            ListMachinesQuery::from_query([("state", "runnin")])
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            ListMachinesQuery::from_query([("summary", "yes")])
                .unwrap_err()
                .status(),
            400
        );
    }

    #[test]
    fn destroy_restart_and_events_queries() {
        assert!(DestroyQuery::from_query([("force", "true")]).unwrap().force);
        assert!(DestroyQuery::from_query([("kill", "true")]).unwrap().force);
        assert!(!DestroyQuery::from_query([("kill", "false")]).unwrap().force);
        assert!(DestroyQuery::from_query([("force", "maybe")]).is_err());
        let r = RestartQuery::from_query([("timeout", "10"), ("signal", "SIGTERM"), ("force_stop", "true")])
            .unwrap();
        assert_eq!(r.timeout, Some(std::time::Duration::from_secs(10)));
        assert_eq!(r.signal, Some(StopSignal::SIGTERM));
        assert!(r.force_stop);
        assert_eq!(
            RestartQuery::from_query([("timeout", "1m30s")])
                .unwrap()
                .timeout
                .unwrap()
                .as_secs(),
            90
        );
        assert!(RestartQuery::from_query([("timeout", "-1")]).is_err());
        assert!(RestartQuery::from_query([("signal", "SIGSEGV")]).is_err());
        assert_eq!(
            EventsQuery::from_query(Vec::<(&str, &str)>::new()).unwrap().limit,
            20
        );
        assert_eq!(EventsQuery::from_query([("limit", "500")]).unwrap().limit, 50);
        assert!(EventsQuery::from_query([("limit", "0")]).is_err());
    }

    #[test]
    fn metadata_requests() {
        let r: UpdateMetadataRequest = serde_json::from_value(json!({
            "metadata": {"a": "1", "b": null, "c": ""}, "machine_version": "01H"
        }))
        .unwrap();
        let mut md = BTreeMap::from([
            ("b".to_owned(), "x".to_owned()),
            ("c".to_owned(), "y".to_owned()),
            ("d".to_owned(), "z".to_owned()),
        ]);
        r.apply(&mut md);
        assert_eq!(
            md,
            BTreeMap::from([("a".to_owned(), "1".to_owned()), ("d".to_owned(), "z".to_owned())])
        );
        let u: UpsertMetadataKeyRequest =
            serde_json::from_value(json!({"value": "v", "updated_at": "2024-01-01T00:00:00Z"})).unwrap();
        assert_eq!(u.value, "v");
    }

    #[test]
    fn exec_accepts_command_and_cmd() {
        let new: ExecRequest =
            serde_json::from_value(json!({"command": ["ls", "-l"], "timeout": 5, "machine": true})).unwrap();
        assert_eq!(new.argv().unwrap(), ["ls", "-l"]);
        let old: ExecRequest = serde_json::from_value(json!({"cmd": "ls  -l /"})).unwrap();
        assert_eq!(old.argv().unwrap(), ["ls", "-l", "/"]);
        assert_eq!(ExecRequest::default().argv().unwrap_err().status(), 400);
        let resp = ExecResponse {
            exit_code: 0,
            exit_signal: 0,
            stdout: "hi\n".into(),
            stderr: String::new(),
        };
        assert_eq!(
            serde_json::to_value(&resp).unwrap(),
            json!({"exit_code": 0, "exit_signal": 0, "stdout": "hi\n", "stderr": ""})
        );
    }

    #[test]
    fn ps_round_trips() {
        let input = json!([{
            "pid": 1, "command": "/usr/sbin/nginx -g daemon off;", "cpu": 0, "rss": 5_242_880u64,
            "rtime": 10, "stime": 2, "directory": "/",
            "listen_sockets": [{"proto": "tcp", "address": "0.0.0.0:8080"}]
        }]);
        let ps: Vec<ProcessStat> = serde_json::from_value(input.clone()).unwrap();
        assert_eq!(serde_json::to_value(&ps).unwrap(), input);
    }

    #[test]
    fn start_and_wait_responses() {
        let docs = json!({"previous_state": "stopped", "migrated": false, "new_host": ""});
        let r: StartResponse = serde_json::from_value(docs.clone()).unwrap();
        assert_eq!(r.previous_state, MachineState::Stopped);
        assert_eq!(serde_json::to_value(&r).unwrap(), docs);
        let w = json!({"ok": true, "state": "started", "version": "01H", "event_id": "01J"});
        let wr: WaitResponse = serde_json::from_value(w.clone()).unwrap();
        assert_eq!(serde_json::to_value(&wr).unwrap(), w);
        assert_eq!(serde_json::to_value(OkResponse::OK).unwrap(), json!({"ok": true}));
    }
}
