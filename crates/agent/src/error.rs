//! [`AgentError`]: what the agent's public calls return, and how the API maps each to an HTTP
//! status ([`AgentError::to_api`]).

use std::path::PathBuf;
use std::time::Duration;

use aloft_api::{ApiError, MachineId, MachineState, SnapshotId, StateError, VolumeId};

use crate::driver::DriverError;

/// Why an agent call failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No machine with this id on this host (404).
    #[error("machine {machine} not found on this host")]
    NotFound {
        /// The id asked for.
        machine: String,
    },
    /// A create named an id that exists (409).
    #[error("machine {machine} already exists: choose another id or omit it")]
    AlreadyExists {
        /// The id.
        machine: MachineId,
    },
    /// The verb is not allowed in the machine's state (412); the message names the state.
    #[error(transparent)]
    State(#[from] StateError),
    /// Another operation is running on the machine (409).
    #[error(
        "machine {machine} is busy: {operation} operation {op_id} is in progress; wait for the machine to settle and retry"
    )]
    Busy {
        /// The machine.
        machine: MachineId,
        /// The running operation's kind.
        operation: &'static str,
        /// Its id.
        op_id: String,
    },
    /// An update's `current_version` is not the machine's version (412).
    #[error(
        "machine {machine} is at version {current}, not {expected}: fetch the machine again and retry with its version"
    )]
    StaleVersion {
        /// The machine.
        machine: MachineId,
        /// What the caller expected.
        expected: String,
        /// What it is.
        current: String,
    },
    /// `wait` named a version this machine never had (404).
    #[error("machine {machine} has no version {version}")]
    UnknownVersion {
        /// The machine.
        machine: MachineId,
        /// The version asked for.
        version: String,
    },
    /// `wait` named an event this machine does not have (400).
    #[error("machine {machine} has no event {event_id}: pass an event id from this machine's events")]
    UnknownEvent {
        /// The machine.
        machine: MachineId,
        /// The event id asked for.
        event_id: String,
    },
    /// The agent's secrets key or a sealed secret could not be used (500).
    #[error("agent secrets: {source}")]
    Secrets {
        /// Why.
        #[from]
        source: aloft_secretbox::SecretboxError,
    },
    /// The config cannot be run (400).
    #[error("invalid machine config: {reason}")]
    InvalidConfig {
        /// What to change.
        reason: String,
    },
    /// The config's `mounts` cannot be honoured (422): more than one, a bad volume id or path, a
    /// volume this host does not have or another machine mounts. The reason says what to change.
    #[error("{reason}")]
    Mount {
        /// What is wrong and what to do.
        reason: String,
    },
    /// No disk of this volume on this host (404).
    #[error("volume {volume} not found on this host")]
    VolumeNotFound {
        /// The volume asked for.
        volume: VolumeId,
    },
    /// The volume is mounted by a machine that is not destroyed (412).
    #[error(
        "volume {volume} is mounted by machine {machine}: destroy that machine, or update it without the mount, first"
    )]
    VolumeInUse {
        /// The volume.
        volume: VolumeId,
        /// The machine whose config mounts it.
        machine: MachineId,
    },
    /// A volume request that cannot be carried out as asked (422): a size out of range, smaller
    /// than the disk.
    #[error("volume {volume}: {reason}")]
    VolumeRequest {
        /// The volume.
        volume: VolumeId,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A volume's disk could not be made, grown, read or removed (500).
    #[error("volume {volume}")]
    Volume {
        /// The volume.
        volume: VolumeId,
        /// What failed.
        #[source]
        source: DriverError,
    },
    /// No snapshot of this id on this host (404).
    #[error("snapshot {snapshot} not found on this host")]
    SnapshotNotFound {
        /// The snapshot asked for.
        snapshot: SnapshotId,
    },
    /// A snapshot's content no longer matches the digest taken with it (409): it cannot be
    /// restored.
    #[error("snapshot {snapshot} is damaged: its content no longer matches its digest; restore another")]
    SnapshotDamaged {
        /// The snapshot.
        snapshot: SnapshotId,
    },
    /// A snapshot of this id was taken of another volume (409).
    #[error("snapshot {snapshot} is a snapshot of volume {volume}: give this snapshot another id")]
    SnapshotConflict {
        /// The snapshot.
        snapshot: SnapshotId,
        /// The volume it is of.
        volume: VolumeId,
    },
    /// A snapshot could not be read or deleted (500).
    #[error("snapshot {snapshot}")]
    Snapshot {
        /// The snapshot.
        snapshot: SnapshotId,
        /// What failed.
        #[source]
        source: DriverError,
    },
    /// A volume could not be held still for a copy: machines kept coming to mount it (409).
    #[error(
        "volume {volume} could not be copied: {} kept changing; retry once it settles",
        machine.as_ref().map_or_else(|| "what mounts it".to_owned(), |m| format!("machine {m}, which mounts it,"))
    )]
    VolumeCopyBusy {
        /// The volume.
        volume: VolumeId,
        /// The machine mounting it, if any.
        machine: Option<MachineId>,
    },
    /// The machine is bigger than this host (422 `insufficient_capacity`).
    #[error(
        "{what} of {asked} is more than this host has ({host}): ask for a smaller guest (guest.cpus, guest.memory_mb)"
    )]
    InsufficientCapacity {
        /// `memory` or `cpus`.
        what: &'static str,
        /// Asked for, with unit.
        asked: String,
        /// The host's, with unit.
        host: String,
    },
    /// `wait` timed out (408: "not yet").
    #[error("machine {machine} did not reach {wanted} within {timeout:?}; it is {state}")]
    WaitTimeout {
        /// The machine.
        machine: MachineId,
        /// The states waited for.
        wanted: String,
        /// How long.
        timeout: Duration,
        /// The state it is in.
        state: MachineState,
    },
    /// An operation finished without doing what was asked (see `state` for where the machine
    /// ended; the machine's events say more).
    #[error("{operation} of machine {machine} failed, machine is now {state}: {message}")]
    OperationFailed {
        /// The machine.
        machine: MachineId,
        /// The operation's kind.
        operation: &'static str,
        /// Where the machine ended.
        state: MachineState,
        /// What went wrong.
        message: String,
        /// The user's input is at fault (e.g. an image that does not exist): 422, not 500.
        user_error: bool,
    },
    /// A driver call made directly for the caller (signal, exec, ps) failed.
    #[error("machine {machine}")]
    Driver {
        /// The machine.
        machine: MachineId,
        /// What failed.
        #[source]
        source: DriverError,
    },
    /// The agent's database failed.
    #[error("agent database: {op}")]
    Database {
        /// What was being done.
        op: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A record in the agent's database does not parse.
    #[error("agent database: corrupt {what}; restore the database from a backup or remove the machine")]
    Corrupt {
        /// Which record.
        what: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A file operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another agent has this database open.
    #[error("another agent uses {}: stop it first (one agent per database)", path.display())]
    Locked {
        /// The database.
        path: PathBuf,
    },
    /// This agent instance stopped (shut down, or halted as if killed); reopen the agent.
    #[error("the agent stopped before the operation finished; it resumes when the agent is opened again")]
    Halted,
}

impl AgentError {
    pub(crate) fn db(op: &'static str) -> impl FnOnce(rusqlite::Error) -> Self {
        move |source| Self::Database { op, source }
    }

    /// The API error for this failure: status code and a message safe to show.
    pub fn to_api(&self) -> ApiError {
        match self {
            Self::NotFound { machine } => ApiError::not_found(format_args!("machine {machine}")),
            Self::AlreadyExists { .. } | Self::Busy { .. } => ApiError::conflict(self.to_string()),
            Self::State(e) => ApiError::from(*e),
            Self::StaleVersion { .. } => ApiError::precondition_failed(self.to_string()),
            Self::UnknownVersion { .. } => ApiError::not_found(format_args!("{self}")),
            Self::UnknownEvent { .. } | Self::InvalidConfig { .. } => ApiError::bad_request(self.to_string()),
            Self::WaitTimeout { .. } => ApiError::request_timeout(self.to_string()),
            Self::InsufficientCapacity { .. } => ApiError::insufficient_capacity(self.to_string()),
            Self::Mount { .. } | Self::VolumeRequest { .. } => ApiError::unprocessable(self.to_string()),
            Self::VolumeNotFound { volume } => ApiError::not_found(format_args!("volume {volume}")),
            Self::VolumeInUse { .. } => ApiError::precondition_failed(self.to_string()),
            Self::SnapshotNotFound { snapshot } => ApiError::not_found(format_args!("snapshot {snapshot}")),
            Self::SnapshotDamaged { .. } | Self::SnapshotConflict { .. } | Self::VolumeCopyBusy { .. } => {
                ApiError::conflict(self.to_string())
            }
            Self::OperationFailed { user_error: true, .. } => ApiError::unprocessable(self.to_string()),
            Self::Driver {
                machine,
                source: source @ DriverError::NotRunning { .. },
            } => ApiError::precondition_failed(format!("machine {machine}: {source}")),
            Self::Driver {
                machine,
                source: source @ DriverError::Refused { .. },
            } => ApiError::bad_request(format!("machine {machine}: {source}")),
            Self::Driver {
                machine,
                source: DriverError::NoAddress { .. },
            } => ApiError::unprocessable(format!(
                "machine {machine} has no network address the host can reach (aloftd runs with \
                 --network none): aloft proxy needs --network host"
            )),
            Self::Driver {
                machine,
                source: DriverError::Unreachable { port, reason },
            } => ApiError::new(
                502,
                format!(
                    "nothing accepted a connection on port {port} of machine {machine} ({reason}): \
                     is the app listening on [::] or fly-local-6pn?"
                ),
            ),
            Self::Halted | Self::Locked { .. } => ApiError::new(503, self.to_string()),
            Self::OperationFailed { .. }
            | Self::Driver { .. }
            | Self::Database { .. }
            | Self::Corrupt { .. }
            | Self::Secrets { .. }
            | Self::Volume { .. }
            | Self::Snapshot { .. }
            | Self::Io { .. } => ApiError::internal(),
        }
    }
}

#[cfg(test)]
mod tests {
    use aloft_api::Verb;

    use super::*;

    #[test]
    fn statuses_follow_the_api() {
        let id: MachineId = "3d8d413b29d089".parse().unwrap();
        let e = AgentError::State(StateError {
            verb: Verb::Start,
            state: MachineState::Replacing,
        });
        assert_eq!(e.to_api().status(), 412);
        assert!(e.to_string().contains("replacing"), "{e}");
        let busy = AgentError::Busy {
            machine: id.clone(),
            operation: "stop",
            op_id: "01X".into(),
        };
        assert_eq!(busy.to_api().status(), 409);
        assert_eq!(
            AgentError::NotFound {
                machine: id.to_string()
            }
            .to_api()
            .status(),
            404
        );
        assert_eq!(AgentError::Halted.to_api().status(), 503);
        let vol: VolumeId = "vol_0123456789abcdef".parse().unwrap();
        let in_use = AgentError::VolumeInUse {
            volume: vol.clone(),
            machine: id.clone(),
        }
        .to_api();
        assert_eq!(in_use.status(), 412);
        assert!(in_use.message().contains(id.as_str()), "{}", in_use.message());
        let missing = AgentError::VolumeNotFound { volume: vol }.to_api();
        assert_eq!(missing.status(), 404);
        assert_eq!(missing.message(), "volume vol_0123456789abcdef not found");
        // A proxied connection's failures (`Agent::connect`) say what to do.
        let no_net = AgentError::Driver {
            machine: id.clone(),
            source: DriverError::NoAddress {
                op: crate::DriverOp::Connect,
            },
        }
        .to_api();
        assert_eq!(no_net.status(), 422);
        assert!(no_net.message().contains(id.as_str()), "{}", no_net.message());
        assert!(
            no_net.message().contains("--network host"),
            "{}",
            no_net.message()
        );
        let refused = AgentError::Driver {
            machine: id.clone(),
            source: DriverError::Unreachable {
                port: 5432,
                reason: "connection refused".into(),
            },
        }
        .to_api();
        assert_eq!(refused.status(), 502);
        assert_eq!(
            refused.message(),
            "nothing accepted a connection on port 5432 of machine 3d8d413b29d089 (connection refused): \
             is the app listening on [::] or fly-local-6pn?"
        );
        let mount = AgentError::Mount {
            reason: "only one volume per machine".into(),
        };
        assert_eq!(mount.to_api().status(), 422);
    }
}
