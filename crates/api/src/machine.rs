//! The `Machine` object, its events, check statuses and versions (`Machine`, `MachineEvent`,
//! `CheckStatus`, `ImageRef`, `MachineVersion` in Fly's spec).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::serde_util::null_as_default;
use crate::{MachineConfig, MachineId, MachineState};

/// A machine as the API returns it.
///
/// Timestamps are RFC 3339 strings (`2024-05-01T12:00:00Z`), versions and event ids ULIDs; this
/// crate carries them as text and leaves generating them to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Machine {
    /// 14 hex digits.
    pub id: MachineId,
    /// Unique name within the app; generated when the create request has none.
    #[serde(default)]
    pub name: String,
    /// Current state.
    pub state: MachineState,
    /// Region the machine lives in (immutable).
    #[serde(default)]
    pub region: String,
    /// The current version (a ULID, new per update).
    #[serde(default)]
    pub instance_id: String,
    /// Same as `instance_id` (newer clients read this one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The private (6PN-style) address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub private_ip: String,
    /// The current config; omitted by `summary=true` lists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<MachineConfig>,
    /// The config as far as it is known while the host is unreachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incomplete_config: Option<MachineConfig>,
    /// The resolved image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_ref: Option<ImageRef>,
    /// When the machine was created (RFC 3339).
    #[serde(default)]
    pub created_at: String,
    /// When the machine last changed (RFC 3339).
    #[serde(default)]
    pub updated_at: String,
    /// Recent events, newest first.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub events: Vec<MachineEvent>,
    /// Status of the machine's checks.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub checks: Vec<CheckStatus>,
    /// The lease nonce, only on a create that asked for `lease_ttl`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Whether the machine's host answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_status: Option<HostStatus>,
    /// The proxy does not route to a cordoned machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cordoned: Option<bool>,
    /// Containers of a multi-container machine.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub containers: Vec<ContainerStatus>,
}

impl Machine {
    /// The machine as `GET …/machines?summary=true` shows it: without config, checks, events,
    /// host status and nonce.
    pub fn summary(mut self) -> Self {
        self.config = None;
        self.incomplete_config = None;
        self.checks.clear();
        self.events.clear();
        self.host_status = None;
        self.nonce = None;
        self
    }
}

/// Whether a machine's host answers (`Machine.host_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum HostStatus {
    /// Reachable.
    Ok,
    /// Not known yet.
    Unknown,
    /// Not answering; `incomplete_config` replaces `config`.
    Unreachable,
}

/// The state of one container of a multi-container machine.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContainerStatus {
    /// Container name.
    #[serde(default)]
    pub name: String,
    /// Its state.
    #[serde(default)]
    pub state: String,
}

/// A resolved image (`ImageRef`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ImageRef {
    /// Registry host, e.g. `registry-1.docker.io`.
    #[serde(default)]
    pub registry: String,
    /// Repository, e.g. `library/nginx`.
    #[serde(default)]
    pub repository: String,
    /// Tag, e.g. `latest`.
    #[serde(default)]
    pub tag: String,
    /// Manifest digest, `sha256:…`.
    #[serde(default)]
    pub digest: String,
    /// Image labels.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
}

/// The status of one check (`CheckStatus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CheckStatus {
    /// Check name (services' checks are named `servicecheck-NN-tcp-PORT` by Fly).
    #[serde(default)]
    pub name: String,
    /// `passing`, `warning` or `critical`.
    pub status: CheckState,
    /// The last check's output.
    #[serde(default)]
    pub output: String,
    /// When it last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub updated_at: String,
}

/// A check's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum CheckState {
    /// Healthy.
    Passing,
    /// Not failing yet, not passing either (e.g. in the grace period).
    Warning,
    /// Failing.
    Critical,
}

/// Who caused an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum EventSource {
    /// A user's API call.
    User,
    /// The platform (restart policy, autostop, host failure …); Fly names it `flyd`.
    Flyd,
}

/// One lifecycle event of a machine (`MachineEvent`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineEvent {
    /// A ULID.
    #[serde(default)]
    pub id: String,
    /// `launch`, `start`, `stop`, `exit`, `update`, `restart`, `suspend`, `destroy` …
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The state it led to (`created`, `started`, `stopped` …).
    #[serde(default)]
    pub status: String,
    /// Who caused it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<EventSource>,
    /// Unix milliseconds.
    #[serde(default)]
    pub timestamp: i64,
    /// Details: exit status, restart count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<MachineEventRequest>,
}

/// Details of an event (`request` in the spec is a free object; these are the keys fly-go reads).
/// Keys aloft does not know are kept as they were.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineEventRequest {
    /// How the main process ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_event: Option<ExitEvent>,
    /// The same, as Fly's monitor reports it.
    #[serde(rename = "MonitorEvent", skip_serializing_if = "Option::is_none")]
    pub monitor_event: Option<MonitorEvent>,
    /// Restarts so far under the restart policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_count: Option<u32>,
    /// Anything else.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Fly's monitor event wrapper (`MonitorEvent`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MonitorEvent {
    /// How the main process ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_event: Option<ExitEvent>,
}

/// How a machine's main process ended (fly-go's `MachineExitEvent`; zero and false values are
/// omitted, as fly-go does).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ExitEvent {
    /// The VM's exit code.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub exit_code: i32,
    /// The workload's exit code.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub guest_exit_code: i32,
    /// The signal that killed the workload (0 if none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub guest_signal: i32,
    /// Killed by the out-of-memory killer.
    #[serde(default, skip_serializing_if = "is_false")]
    pub oom_killed: bool,
    /// The exit was asked for (stop, restart, destroy).
    #[serde(default, skip_serializing_if = "is_false")]
    pub requested_stop: bool,
    /// The restart policy restarts the machine.
    #[serde(default, skip_serializing_if = "is_false")]
    pub restarting: bool,
    /// The signal that stopped the VM (0 if none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub signal: i32,
    /// When (RFC 3339).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub exited_at: String,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One version of a machine's config (`MachineVersion`, `GET …/versions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineVersion {
    /// The version's ULID.
    #[serde(default)]
    pub version: String,
    /// The config the user gave it.
    #[serde(default)]
    pub user_config: MachineConfig,
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn fly_machine() -> Value {
        // Shaped like the docs' "Get a Machine" response.
        json!({
            "id": "3d8d413b29d089",
            "name": "restless-sun-1234",
            "state": "started",
            "region": "ams",
            "instance_id": "01HBZ8QEXHS0YR4R1N6S1XGEE2",
            "private_ip": "fdaa:0:18:a7b:196:e274:9ce1:2",
            "config": {
                "image": "registry-1.docker.io/library/nginx:latest",
                "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
                "restart": {"policy": "always"},
                "init": {}
            },
            "image_ref": {
                "registry": "registry-1.docker.io",
                "repository": "library/nginx",
                "tag": "latest",
                "digest": "sha256:0d17b565c37bcbd895e9d92315a05c1c3c9a29f762b011a10c54a66cd53c9b31",
                "labels": {"maintainer": "NGINX Docker Maintainers"}
            },
            "created_at": "2023-10-02T15:07:47Z",
            "updated_at": "2023-10-02T15:07:49Z",
            "events": [
                {
                    "id": "01HBZ8QRZ3SMDZBT8KWTJKBFGN",
                    "type": "start",
                    "status": "started",
                    "source": "flyd",
                    "timestamp": 1_696_259_269_155i64
                },
                {
                    "id": "01HBZ8QEY7Y1V2CNPD8Q5FG6EV",
                    "type": "exit",
                    "status": "stopped",
                    "source": "flyd",
                    "timestamp": 1_696_259_268_000i64,
                    "request": {
                        "exit_event": {
                            "exit_code": 1, "guest_exit_code": 1, "oom_killed": true,
                            "restarting": true, "exited_at": "2023-10-02T15:07:48Z"
                        },
                        "restart_count": 2,
                        "MonitorEvent": {"exit_event": {"exit_code": 1}},
                        "something_new": [1, 2]
                    }
                }
            ],
            "checks": [
                {"name": "servicecheck-00-tcp-8080", "status": "passing", "output": "Success",
                 "updated_at": "2023-10-02T15:08:00Z"}
            ],
            "host_status": "ok"
        })
    }

    #[test]
    fn fly_machine_round_trips() {
        let input = fly_machine();
        let m: Machine = serde_json::from_value(input.clone()).unwrap();
        assert_eq!(m.state, MachineState::Started);
        assert_eq!(m.host_status, Some(HostStatus::Ok));
        let exit = m.events[1].request.as_ref().unwrap();
        assert!(exit.exit_event.as_ref().unwrap().oom_killed);
        assert_eq!(exit.restart_count, Some(2));
        assert!(exit.extra.contains_key("something_new"));
        assert_eq!(serde_json::to_value(&m).unwrap(), input);
    }

    #[test]
    fn summary_drops_what_the_spec_says() {
        let m: Machine = serde_json::from_value(fly_machine()).unwrap();
        let out = serde_json::to_value(m.summary()).unwrap();
        for gone in ["config", "checks", "events", "host_status", "nonce"] {
            assert!(out.get(gone).is_none(), "{gone}");
        }
        assert_eq!(out["state"], "started");
    }

    #[test]
    fn bad_machines_are_rejected() {
        let mut bad_state = fly_machine();
        bad_state["state"] = json!("running");
        assert!(serde_json::from_value::<Machine>(bad_state).is_err());
        let mut bad_id = fly_machine();
        bad_id["id"] = json!("../etc");
        assert!(serde_json::from_value::<Machine>(bad_id).is_err());
        let mut bad_check = fly_machine();
        bad_check["checks"][0]["status"] = json!("fine");
        assert!(serde_json::from_value::<Machine>(bad_check).is_err());
    }

    #[test]
    fn versions_round_trip() {
        let input = json!([{"version": "01HBZ8QEXHS0YR4R1N6S1XGEE2", "user_config": {"image": "nginx"}}]);
        let v: Vec<MachineVersion> = serde_json::from_value(input.clone()).unwrap();
        assert_eq!(v[0].user_config.image.as_deref(), Some("nginx"));
        assert_eq!(serde_json::to_value(&v).unwrap(), input);
    }
}
