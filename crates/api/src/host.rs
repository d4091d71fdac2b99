//! The interface between the control plane and one host's agent: [`MachineHost`].
//!
//! The control plane (the Machines API server) authenticates, checks leases and placement, and
//! then asks the agent that owns a machine to act. It reaches agents only through this trait, so
//! that the server never links the VM side: in the embedded single-host setup the agent itself
//! implements it in-process; in a cluster a client speaking to the remote agent will. Every
//! method blocks (the server calls it from a blocking thread) and answers with the Machines
//! API's types and errors ([`ApiError`], with Fly's status codes).
//!
//! Verbs return once the agent has **accepted** the operation (recorded it durably); callers that
//! want the outcome wait for a state with [`MachineHost::wait`], as Fly's clients do.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    ApiError, ConsoleRequest, ConsoleSession, ExecResponse, Machine, MachineConfig, MachineEvent, MachineId,
    MachineState, MachineVersion, ProcessStat, SecretEnv, Signal, SnapshotId, UpdateMetadataRequest,
    VolumeId, WaitResponse, WaitState,
};

/// A machine to create on a host.
#[derive(Debug, Clone)]
pub struct HostCreate {
    /// The id, chosen by the control plane (so a retried create cannot make two machines).
    pub id: MachineId,
    /// The app.
    pub app: String,
    /// Its name (the id when the user gave none).
    pub name: String,
    /// Its region.
    pub region: String,
    /// The organization's network number.
    pub org: u32,
    /// The config.
    pub config: MachineConfig,
    /// Create without booting (state `created`).
    pub skip_launch: bool,
    /// The app's secrets, decrypted: the host keeps them (sealed) for every boot of this
    /// version and injects them as environment variables, over `config.env`.
    pub secrets: SecretEnv,
}

/// A new config for a machine (`POST …/{id}`).
#[derive(Debug, Clone)]
pub struct HostUpdate {
    /// The whole new config.
    pub config: MachineConfig,
    /// Leave it stopped afterwards.
    pub skip_launch: bool,
    /// Refuse (412) unless the machine is at this version.
    pub current_version: Option<String>,
    /// The app's secrets for the new version, as in [`HostCreate::secrets`].
    pub secrets: SecretEnv,
}

/// How to stop (or restart) a machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostStop {
    /// First signal; the config's `stop_config.signal`, else the image's, else SIGINT.
    pub signal: Option<Signal>,
    /// Wait before killing; the config's `stop_config.timeout`, else the host's default.
    pub timeout: Option<Duration>,
}

/// A `wait` on a host.
#[derive(Debug, Clone)]
pub struct HostWait {
    /// Any of these ends the wait.
    pub states: Vec<WaitState>,
    /// Only this version counts.
    pub version: Option<String>,
    /// Only events after this one count.
    pub from_event_id: Option<String>,
    /// Give up after this long (408).
    pub timeout: Duration,
}

/// Which output stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// The workload's stdout.
    Stdout,
    /// The workload's stderr.
    Stderr,
    /// A line the platform wrote about the machine (boot, exit, restart).
    Platform,
}

/// Who wrote a log line (Fly's `meta.event.provider`: `app` for the workload, `runner` for the
/// platform).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LogEvent {
    /// `app` or `runner`.
    pub provider: String,
}

/// A log line's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LogMeta {
    /// Who wrote it.
    pub event: LogEvent,
    /// Which stream.
    pub stream: LogStream,
}

/// One line of a machine's output, as `GET /v1/apps/{app}/logs` sends it (one JSON object per
/// line). The fields are those of Fly's log entries (`timestamp`, `message`, `level`, `instance`,
/// `region`, `meta.event.provider`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LogEntry {
    /// RFC 3339 with milliseconds, UTC.
    pub timestamp: String,
    /// The line, without its newline (invalid UTF-8 replaced).
    pub message: String,
    /// `info` for stdout and the platform, `error` for stderr.
    pub level: String,
    /// The machine's id.
    pub instance: String,
    /// The machine's region.
    pub region: String,
    /// Stream and provider.
    pub meta: LogMeta,
    /// Position in the machine's log (increasing; a client resumes after it).
    pub seq: u64,
}

/// New lines of one machine's log as they are written ([`MachineHost::follow_logs`]).
pub trait LogFollower: Send {
    /// The next line, waiting up to `timeout`: `Ok(None)` when none came in time. Lines come in
    /// order, none twice; if the follower fell too far behind, lines are skipped (not buffered
    /// without bound).
    fn next(&mut self, timeout: Duration) -> Result<Option<LogEntry>, ApiError>;
}

/// One host's machines, as the control plane reaches them. See the module docs.
pub trait MachineHost: Send + Sync + fmt::Debug {
    /// Creates a machine; returns once its image is resolved and its disk made (state
    /// `created`, `starting` or later), or at once with the recorded machine if that takes longer
    /// than the host is willing to hold the request. A create that fails for the user's fault (an
    /// image that does not exist) is a 422 naming why.
    fn create(&self, req: HostCreate) -> Result<Machine, ApiError>;
    /// One machine with its newest events.
    fn get(&self, id: &MachineId) -> Result<Machine, ApiError>;
    /// Every machine of `app` on this host, destroyed ones included, oldest first, without
    /// events (the list view).
    fn list(&self, app: &str) -> Result<Vec<Machine>, ApiError>;
    /// Starts a created, stopped, failed or suspended machine; returns the state it was in.
    fn start(&self, id: &MachineId) -> Result<MachineState, ApiError>;
    /// Stops a started machine (or drops a suspended one's snapshot).
    fn stop(&self, id: &MachineId, how: HostStop) -> Result<(), ApiError>;
    /// Suspends a started machine.
    fn suspend(&self, id: &MachineId) -> Result<(), ApiError>;
    /// Stops and starts a started machine.
    fn restart(&self, id: &MachineId, how: HostStop) -> Result<(), ApiError>;
    /// A new config and version; returns the machine as recorded.
    fn update(&self, id: &MachineId, req: HostUpdate) -> Result<Machine, ApiError>;
    /// Destroys a machine (a started one only with `force`).
    fn destroy(&self, id: &MachineId, force: bool) -> Result<(), ApiError>;
    /// Sends a signal to the workload.
    fn signal(&self, id: &MachineId, signal: Signal) -> Result<(), ApiError>;
    /// Runs a command in a started machine.
    fn exec(&self, id: &MachineId, argv: &[String], timeout: Duration) -> Result<ExecResponse, ApiError>;
    /// The processes of a started machine.
    fn ps(&self, id: &MachineId) -> Result<Vec<ProcessStat>, ApiError>;
    /// Events, newest first, at most `limit`.
    fn events(&self, id: &MachineId, limit: usize) -> Result<Vec<MachineEvent>, ApiError>;
    /// Versions, newest first.
    fn versions(&self, id: &MachineId) -> Result<Vec<MachineVersion>, ApiError>;
    /// Blocks until the machine is in one of the states (408 on timeout).
    fn wait(&self, id: &MachineId, wait: &HostWait) -> Result<WaitResponse, ApiError>;
    /// Changes `config.metadata` without a new version; returns the machine.
    fn update_metadata(&self, id: &MachineId, req: &UpdateMetadataRequest) -> Result<Machine, ApiError>;
    /// The last `lines` lines of a machine's log, oldest first.
    fn log_tail(&self, id: &MachineId, lines: usize) -> Result<Vec<LogEntry>, ApiError>;
    /// Lines written from now on (after `after_seq`, when given: a client that resumes).
    fn follow_logs(&self, id: &MachineId, after_seq: Option<u64>) -> Result<Box<dyn LogFollower>, ApiError>;

    /// Starts an interactive command in a started machine (`aloft ssh console`): its stdin,
    /// stdout and stderr stream through the session until it exits; dropping the session kills
    /// it. 412 when the machine is not started; 400 with init's reason when the command can't
    /// start ("executable not found: …").
    fn console(&self, id: &MachineId, req: ConsoleRequest) -> Result<Box<dyn ConsoleSession>, ApiError>;

    /// Opens a TCP connection from the host to `port` of a started machine's private address
    /// (`aloft proxy`; `crate::tunnel`), made in the machines' network namespace and returned
    /// connected, in blocking mode. 412 unless the machine is started; 422 when it has no
    /// address the host reaches (aloftd runs with `--network none`); 502 naming the port when
    /// the connection is refused or not made within 5 s.
    ///
    /// A direct connection: the control plane runs beside its hosts' agents today (ADR 0011);
    /// a remote agent will relay the stream instead.
    fn connect(&self, id: &MachineId, port: u16) -> Result<std::net::TcpStream, ApiError>;

    /// Makes a volume's disk: an empty ext4 filesystem of `size_gb`. Idempotent: a disk of that
    /// id already there is kept as it is (a retried create), whatever its size.
    fn create_volume(&self, req: &HostVolume) -> Result<(), ApiError>;
    /// A volume's disk as the host sees it: its size and the machine that mounts it; 404 when
    /// the host has no disk of that id.
    fn volume(&self, id: &VolumeId) -> Result<HostVolumeStatus, ApiError>;
    /// Grows a volume's disk and its filesystem to `size_gb`. When a started machine mounts
    /// it, the filesystem grows before that machine's next boot and the answer is `true`
    /// (Fly's `needs_restart`).
    fn extend_volume(&self, id: &VolumeId, size_gb: u32) -> Result<bool, ApiError>;
    /// Deletes a volume's disk and its data. 412 while a machine that is not destroyed mounts
    /// it (naming the machine); `Ok` when there is no such disk. The volume's snapshots stay
    /// (they are deleted one by one, [`MachineHost::delete_snapshot`]).
    fn destroy_volume(&self, id: &VolumeId) -> Result<(), ApiError>;

    /// Takes snapshot `snapshot` of volume `id`: a copy of its disk at one instant, kept on this
    /// host. When a started machine mounts the volume, that machine's VM is paused while the
    /// disk is copied, so the copy is crash-consistent (what a power cut would have left, which
    /// ext4's journal recovers) and the guest sees only a pause. Idempotent: a snapshot of that
    /// id already there is answered as it is. 404 when the host has no such volume.
    fn snapshot_volume(&self, id: &VolumeId, snapshot: &SnapshotId) -> Result<HostSnapshot, ApiError>;
    /// Deletes a snapshot's copy. `Ok` when there is none.
    fn delete_snapshot(&self, snapshot: &SnapshotId) -> Result<(), ApiError>;
}

/// What a volume's disk starts from ([`HostVolume::source`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    /// A snapshot kept on this host (a restore; 404 when the host has none of that id).
    Snapshot(SnapshotId),
    /// Another volume's disk on this host, as it is now (a fork; its machine, if started, is
    /// paused while it is copied, as for a snapshot).
    Volume(VolumeId),
}

/// A snapshot as its host took it ([`MachineHost::snapshot_volume`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSnapshot {
    /// Bytes the copy takes on the host's disk.
    pub size: u64,
    /// The volume's size when it was taken, bytes.
    pub volume_size: u64,
    /// `sha256:` and the hex SHA-256 of the copy's data extents, each as its offset (8 bytes,
    /// big-endian) then its bytes; holes are skipped, so it costs what the data does. A restore
    /// computes it again and refuses a copy that no longer matches.
    pub digest: String,
}

/// A volume's disk to make on a host ([`MachineHost::create_volume`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVolume {
    /// The id, chosen by the control plane.
    pub id: VolumeId,
    /// The app it belongs to.
    pub app: String,
    /// Size, GB. With a source, at least the source's size: the filesystem is grown to it.
    pub size_gb: u32,
    /// What the disk starts from; `None`: an empty filesystem.
    pub source: Option<VolumeSource>,
}

/// A volume's disk as its host sees it ([`MachineHost::volume`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostVolumeStatus {
    /// The disk's size, GB.
    pub size_gb: u32,
    /// The machine (not destroyed) whose config mounts it.
    pub attached_machine_id: Option<MachineId>,
    /// The filesystem's figures from its superblock, when the host could read them (they may
    /// lag a mounted filesystem's by a few seconds).
    pub usage: Option<VolumeUsage>,
}

/// An ext4 filesystem's figures ([`HostVolumeStatus::usage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VolumeUsage {
    /// Block size, bytes.
    pub block_size: u64,
    /// Blocks.
    pub blocks: u64,
    /// Free blocks.
    pub blocks_free: u64,
    /// Free blocks less those reserved for root.
    pub blocks_avail: u64,
}
