//! What the agent persists: machines with the resources their steps made, operations with their
//! plans and steps, events, versions.

use std::path::PathBuf;

use aloft_api::{
    CheckStatus, EventSource, ExitEvent, ImageRef, Machine, MachineConfig, MachineEvent, MachineEventRequest,
    MachineId, MachineState, MonitorEvent, Signal,
};
use serde::{Deserialize, Serialize};

use crate::driver::{BaseInfo, ExitInfo, ImageInfo, NetInfo};
use aloft_api::rfc3339;

/// One machine on this host as the agent records it.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineRecord {
    /// Its id.
    pub id: MachineId,
    /// The app it belongs to.
    pub app: String,
    /// Its name.
    pub name: String,
    /// Its region.
    pub region: String,
    /// The organization number its network belongs to.
    pub org: u32,
    /// Current state.
    pub state: MachineState,
    /// Current version (a ULID; Fly's `instance_id`).
    pub version: String,
    /// The current version's config.
    pub config: MachineConfig,
    /// What the machine holds on the host.
    pub resources: Resources,
    /// Restarts under the restart policy since the last start a user asked for.
    pub restart_count: u32,
    /// The operation in flight, if any.
    pub op_id: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
    /// Health check statuses while the machine is started. Kept in memory, not in the database:
    /// filled by [`crate::Agent::get`], [`crate::Agent::list`] and [`crate::Agent::machine`].
    pub checks: Vec<CheckStatus>,
}

impl MachineRecord {
    /// The machine as the Machines API shows it, with `events` (newest first).
    pub fn to_api(&self, events: Vec<MachineEvent>) -> Machine {
        let image_ref = self.resources.image.as_ref().map(|i| ImageRef {
            registry: i.registry.clone(),
            repository: i.repository.clone(),
            tag: i.tag.clone(),
            digest: i.digest.clone(),
            labels: i.config.labels.clone(),
        });
        Machine {
            id: self.id.clone(),
            name: self.name.clone(),
            state: self.state,
            region: self.region.clone(),
            instance_id: self.version.clone(),
            version: Some(self.version.clone()),
            private_ip: self
                .resources
                .net
                .as_ref()
                .map(|n| n.private_ip.clone())
                .unwrap_or_default(),
            config: Some(self.config.clone()),
            incomplete_config: None,
            image_ref,
            created_at: rfc3339(self.created_at),
            updated_at: rfc3339(self.updated_at),
            events,
            checks: self.checks.clone(),
            nonce: None,
            host_status: Some(aloft_api::HostStatus::Ok),
            cordoned: None,
            containers: Vec::new(),
        }
    }
}

/// What a machine's steps made on the host, recorded as each step completes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resources {
    /// The current version's image.
    pub image: Option<ImageInfo>,
    /// Its base root filesystem.
    pub base: Option<BaseInfo>,
    /// The writable disk.
    pub disk: Option<PathBuf>,
    /// The network.
    pub net: Option<NetInfo>,
    /// A snapshot exists (suspended).
    pub snapshot: bool,
    /// When the running VM was started (unix ms), for the restart window.
    pub started_at: Option<i64>,
    /// How the last VM ended.
    pub last_exit: Option<ExitInfo>,
}

/// The kind of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Create (and usually start) a machine.
    Create,
    /// Start a created, stopped, failed or suspended machine; also a restart-policy restart.
    Start,
    /// Stop a started (or suspended) machine.
    Stop,
    /// Suspend a started machine.
    Suspend,
    /// Stop and start again.
    Restart,
    /// New config, new version.
    Update,
    /// Remove the machine and everything it has.
    Destroy,
}

impl OpKind {
    /// Snake-case name (also Fly's event type, except `create`, which is `launch`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Suspend => "suspend",
            Self::Restart => "restart",
            Self::Update => "update",
            Self::Destroy => "destroy",
        }
    }

    /// Fly's event type for it.
    pub fn event_type(self) -> &'static str {
        match self {
            Self::Create => "launch",
            other => other.as_str(),
        }
    }
}

/// One step of an operation. Each is idempotent (see [`crate::Driver`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Wait out the restart policy's backoff (restarts only).
    Backoff,
    /// Pull the image.
    PullImage,
    /// Build its base.
    BuildBase,
    /// Create the writable disk.
    MakeDisk,
    /// Reset the writable disk to empty (start from stopped).
    ResetDisk,
    /// Attach the network.
    AttachNetwork,
    /// Write the launch spec; for creates and updates also the moment the new version becomes
    /// the machine's current one.
    WriteSpec,
    /// Boot the VM.
    StartVm,
    /// Boot the VM from its snapshot.
    ResumeVm,
    /// Wait until the workload runs.
    WaitStarted,
    /// Graceful stop (falls back to kill).
    StopVm,
    /// Kill the VM.
    KillVm,
    /// Suspend the VM into a snapshot.
    SuspendVm,
    /// Remove the snapshot.
    DiscardSnapshot,
    /// Remove the machine's directory.
    RemoveMachineDir,
    /// Remove the writable disk.
    RemoveDisk,
    /// Detach the network.
    DetachNetwork,
}

impl Step {
    /// Snake-case name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backoff => "backoff",
            Self::PullImage => "pull_image",
            Self::BuildBase => "build_base",
            Self::MakeDisk => "make_disk",
            Self::ResetDisk => "reset_disk",
            Self::AttachNetwork => "attach_network",
            Self::WriteSpec => "write_spec",
            Self::StartVm => "start_vm",
            Self::ResumeVm => "resume_vm",
            Self::WaitStarted => "wait_started",
            Self::StopVm => "stop_vm",
            Self::KillVm => "kill_vm",
            Self::SuspendVm => "suspend_vm",
            Self::DiscardSnapshot => "discard_snapshot",
            Self::RemoveMachineDir => "remove_machine_dir",
            Self::RemoveDisk => "remove_disk",
            Self::DetachNetwork => "detach_network",
        }
    }
}

/// Which plan of an operation a step belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The operation's own plan.
    Do,
    /// The plan run after a step of `Do` failed for good (rollback or fallback).
    Undo,
}

/// Where an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpStatus {
    /// Its plan is running.
    Running,
    /// A step failed; its undo plan is running.
    Undoing,
    /// Finished as asked.
    Done,
    /// Finished otherwise (rolled back, fell back, or failed): see the error.
    Failed,
    /// Cancelled by a forced destroy.
    Cancelled,
}

/// The parameters and plans of an operation, fixed when it is submitted (and the undo plan when
/// a step fails), so that recovery runs exactly what was decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpParams {
    /// The steps, in order.
    pub plan: Vec<Step>,
    /// The state the machine was in when the operation was submitted.
    pub from: MachineState,
    /// Where the machine ends when every step succeeded.
    pub target: MachineState,
    /// Stop/restart signal.
    #[serde(default)]
    pub signal: Option<Signal>,
    /// Stop/restart timeout, milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Destroy a running machine.
    #[serde(default)]
    pub force: bool,
    /// Create/update: the new version.
    #[serde(default)]
    pub new_version: Option<String>,
    /// Create/update: its config.
    #[serde(default)]
    pub new_config: Option<MachineConfig>,
    /// Restart-policy restart: how long to wait first, milliseconds.
    #[serde(default)]
    pub backoff_ms: u64,
    /// The undo plan, once a step failed.
    #[serde(default)]
    pub undo: Option<Undo>,
    /// Create/update: the app's secrets for the new version, sealed with the agent's key (never
    /// plaintext in the database).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<SealedSecrets>,
}

/// A version's secrets as the agent keeps them: one sealed JSON object (name → value) bound to
/// the machine and version, with the app's secrets version it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecrets {
    /// The app's secrets version.
    pub version: u64,
    /// The sealed values.
    pub sealed: aloft_secretbox::Sealed,
}

/// What runs after a step failed for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undo {
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Where the machine ends when they succeed.
    pub end: MachineState,
    /// Reaching `end` still does what was asked (a fallback, not a rollback): the operation
    /// counts as done.
    pub fallback: bool,
}

/// What steps found out that later steps of the same operation need.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Scratch {
    /// The pulled image (create/update).
    pub image: Option<ImageInfo>,
    /// Its base.
    pub base: Option<BaseInfo>,
    /// The exit the stop step observed.
    pub exit: Option<ExitInfo>,
    /// The error that made the operation undo.
    pub error: Option<String>,
    /// That error is the user's input (an image that does not exist, a program not in it).
    #[serde(default)]
    pub user_error: bool,
}

/// An operation as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct OpRecord {
    /// A ULID.
    pub id: String,
    /// The machine.
    pub machine: MachineId,
    /// What it does.
    pub kind: OpKind,
    /// Who asked.
    pub source: EventSource,
    /// Where it is.
    pub status: OpStatus,
    /// Its parameters and plans.
    pub params: OpParams,
    /// What its steps found out.
    pub scratch: Scratch,
    /// Why it did not finish as asked.
    pub error: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds, once finished.
    pub finished_at: Option<i64>,
}

/// One step as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    /// Plan.
    pub phase: Phase,
    /// Position in the plan.
    pub idx: usize,
    /// The step.
    pub step: Step,
    /// `started`, `done` or `failed`.
    pub status: String,
    /// Attempts so far.
    pub attempts: u32,
    /// The last error.
    pub error: Option<String>,
}

/// An exit as Fly's event shape carries it.
pub(crate) fn exit_event(exit: &ExitInfo, restarting: bool) -> ExitEvent {
    ExitEvent {
        exit_code: exit.exit_code.unwrap_or(0),
        guest_exit_code: exit.exit_code.unwrap_or(0),
        guest_signal: exit.signal.unwrap_or(0),
        oom_killed: exit.oom_killed,
        requested_stop: exit.requested_stop,
        restarting,
        signal: exit.signal.unwrap_or(0),
        exited_at: rfc3339(exit.exited_at),
    }
}

/// The `request` of an exit event.
pub(crate) fn exit_request(exit: &ExitInfo, restarting: bool, restart_count: u32) -> MachineEventRequest {
    let e = exit_event(exit, restarting);
    let mut extra = std::collections::BTreeMap::new();
    if let Some(f) = &exit.failed {
        extra.insert("error".to_owned(), serde_json::Value::String(f.clone()));
    }
    MachineEventRequest {
        exit_event: Some(e.clone()),
        monitor_event: Some(MonitorEvent { exit_event: Some(e) }),
        restart_count: Some(restart_count),
        extra,
    }
}
