//! The seam between the lifecycle state machine and the world: [`Driver`] (images, disks, volumes,
//! network, VMs) and [`Network`] (a machine's tap and addresses), with the plain data they exchange.
//!
//! Every method is keyed by machine id, blocks the calling thread, and is **idempotent**: the agent
//! may call it again after a crash with the same arguments (a step whose outcome was not recorded
//! is performed again), so "already done" must succeed, and "already gone" must succeed for
//! removals.

use std::fmt;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use aloft_api::{ConsoleRequest, MachineId, ProcessStat, Signal, SnapshotId, VolumeId, VolumeUsage};
use aloft_guest_proto::{DnsConfig, EtcHost, ImageConfig, NetConfig, RunConfig};
use aloft_net::Namespace;
use serde::{Deserialize, Serialize};

/// A pulled image, as the agent records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// What the config asked for (`busybox:latest`).
    pub requested: String,
    /// The reference pinned to its manifest digest (`host/busybox@sha256:…`).
    pub pinned: String,
    /// Registry host.
    pub registry: String,
    /// Repository path.
    pub repository: String,
    /// Tag, if the request had one.
    pub tag: String,
    /// Manifest digest, `sha256:…`.
    pub digest: String,
    /// What init receives as the run config's image section.
    pub config: ImageConfig,
}

/// An image's read-only base root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseInfo {
    /// The image file.
    pub path: PathBuf,
    /// The guest's filesystem type for it (`erofs`, `ext4`).
    pub fstype: String,
}

/// A machine's network as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetInfo {
    /// Host tap device; `None`: the machine has no network interface (loopback only).
    pub tap: Option<String>,
    /// The guest NIC's MAC.
    pub mac: Option<String>,
    /// Network namespace holding the tap, if not the agent's.
    pub netns: Option<PathBuf>,
    /// The private (6PN) address reported as `Machine.private_ip`; empty without a network.
    pub private_ip: String,
    /// eth0's addresses and routes.
    pub net_config: Option<NetConfig>,
    /// `/etc/resolv.conf`.
    pub dns: DnsConfig,
    /// Extra `/etc/hosts` lines.
    pub etc_hosts: Vec<EtcHost>,
}

/// The disk index (in the VM's disk list) of a machine's first volume: after the read-only base
/// (0) and the writable disk (1). The guest finds it by that index's virtio-blk serial
/// ([`aloft_vm::disk_serial`]).
pub const FIRST_VOLUME_DISK: usize = 2;

/// A volume attached to a boot ([`LaunchSpec::volumes`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeAttachment {
    /// The volume.
    pub volume: VolumeId,
    /// Its disk on the host ([`VolumeDisk::path`]).
    pub disk: PathBuf,
}

/// A volume's disk on this host ([`Driver::volume_disk`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDisk {
    /// The disk file (what a boot attaches).
    pub path: PathBuf,
    /// Its size, bytes.
    pub size_bytes: u64,
    /// The filesystem's figures from its superblock (`None` when they could not be read).
    pub usage: Option<VolumeUsage>,
    /// The disk grew and its filesystem has not yet ([`Driver::grow_volume_fs`] does it).
    pub grow_pending: bool,
}

/// A volume snapshot kept on this host ([`Driver::snapshot_volume`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The volume it was taken of (which may be gone since: snapshots outlive their volume).
    pub volume: VolumeId,
    /// Bytes the copy takes on the host's disk.
    pub size: u64,
    /// The volume's disk size when it was taken, bytes.
    pub volume_size: u64,
    /// `sha256:…` of the copy's data extents ([`aloft_api::HostSnapshot::digest`]).
    pub digest: String,
}

impl SnapshotInfo {
    /// As the Machines API's host interface answers it.
    pub fn to_api(&self) -> aloft_api::HostSnapshot {
        aloft_api::HostSnapshot {
            size: self.size,
            volume_size: self.volume_size,
            digest: self.digest.clone(),
        }
    }
}

/// Everything needed to boot one version of a machine; written by [`Driver::write_spec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// The read-only base (`/dev/vda`).
    pub base: BaseInfo,
    /// The writable disk (`/dev/vdb`).
    pub disk: PathBuf,
    /// Volumes, attached read-write after the writable disk (disk [`FIRST_VOLUME_DISK`] on);
    /// the run config's `mounts` say where init mounts each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeAttachment>,
    /// The network.
    pub net: NetInfo,
    /// Extra guest kernel arguments (`guest.kernel_args`, `init.kernel_args`).
    pub kernel_args: Vec<String>,
    /// What init runs.
    pub run_config: RunConfig,
}

/// How a machine's VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExitInfo {
    /// The workload's exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended the workload.
    pub signal: Option<i32>,
    /// Killed by the guest's out-of-memory killer.
    pub oom_killed: bool,
    /// The end was asked for (stop, restart, destroy).
    pub requested_stop: bool,
    /// Init could not start the workload: its message.
    pub failed: Option<String>,
    /// Unix milliseconds.
    pub exited_at: i64,
}

impl ExitInfo {
    /// Whether the restart policy `on-failure` counts this as a failure: anything but exit code 0.
    pub fn is_failure(&self) -> bool {
        self.exit_code != Some(0) || self.signal.is_some() || self.oom_killed || self.failed.is_some()
    }
}

/// What the driver knows about a machine's VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStatus {
    /// QEMU runs (the workload may be starting, running, or have just exited).
    Running,
    /// The VM ended; how.
    Exited(ExitInfo),
    /// The VM suspended itself into its snapshot.
    Suspended,
    /// Nothing is known: never started, or its run directory is gone.
    Absent,
}

/// Output of [`Driver::exec`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecResult {
    /// Exit code.
    pub exit_code: i32,
    /// Signal that ended it (0 if none).
    pub exit_signal: i32,
    /// Its stdout.
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: Vec<u8>,
}

/// Something an interactive command did ([`DriverSession::recv`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// It wrote `data` to `stream` (always [`OutputStream::Stdout`] on a terminal).
    Output {
        /// Which stream.
        stream: OutputStream,
        /// The bytes.
        data: Vec<u8>,
    },
    /// It ended; nothing follows.
    Exited {
        /// Exit code when it exited.
        exit_code: Option<i32>,
        /// Signal number when a signal ended it.
        signal: Option<i32>,
    },
}

/// An interactive command running in a guest ([`Driver::exec_session`]): stdin open, output
/// streamed as it comes. Owned by one thread at a time; dropping it before
/// [`SessionEvent::Exited`] kills the command. Every method may block briefly; only
/// [`DriverSession::recv`] waits, up to its timeout. Once the VM is gone every call fails.
pub trait DriverSession: Send {
    /// Writes `data` to the command's stdin (or terminal).
    fn stdin(&mut self, data: &[u8]) -> Result<(), DriverError>;
    /// Closes its stdin (on a terminal: the terminal's EOF character).
    fn close_stdin(&mut self) -> Result<(), DriverError>;
    /// Resizes its terminal; ignored without one.
    fn resize(&mut self, rows: u16, cols: u16) -> Result<(), DriverError>;
    /// Sends signal number `signal` to the command.
    fn signal(&mut self, signal: i32) -> Result<(), DriverError>;
    /// The next event, waiting up to `timeout`; `Ok(None)` when none came in time. After
    /// [`SessionEvent::Exited`] it fails.
    fn recv(&mut self, timeout: Duration) -> Result<Option<SessionEvent>, DriverError>;
}

/// Which output stream of the workload a [`LogChunk`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputStream {
    /// Its stdout.
    Stdout,
    /// Its stderr.
    Stderr,
}

/// A piece of a workload's output, as the guest sent it (not split into lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// Which stream.
    pub stream: OutputStream,
    /// The bytes.
    pub data: Vec<u8>,
}

/// The output of one running VM ([`Driver::logs`]): chunks in the order the workload wrote them,
/// until the VM ends (then [`RecvTimeoutError::Disconnected`]).
pub struct LogReceiver {
    recv: Box<dyn FnMut(Duration) -> Result<LogChunk, RecvTimeoutError> + Send>,
}

impl LogReceiver {
    /// Wraps a channel of the driver's own chunk type, converted by `map`.
    pub fn new<T: Send + 'static>(rx: Receiver<T>, map: impl Fn(T) -> LogChunk + Send + 'static) -> Self {
        Self {
            recv: Box::new(move |timeout| rx.recv_timeout(timeout).map(&map)),
        }
    }

    /// The next chunk, waiting up to `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<LogChunk, RecvTimeoutError> {
        (self.recv)(timeout)
    }
}

impl fmt::Debug for LogReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogReceiver").finish_non_exhaustive()
    }
}

/// Which driver operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[expect(missing_docs, reason = "one variant per Driver method, named after it")]
pub enum DriverOp {
    PullImage,
    BuildBase,
    CreateDisk,
    RemoveDisk,
    AttachNetwork,
    DetachNetwork,
    WriteSpec,
    StartVm,
    WaitStarted,
    StopVm,
    KillVm,
    SuspendVm,
    ResumeVm,
    DiscardSnapshot,
    VmStatus,
    WaitExit,
    Signal,
    Exec,
    ExecSession,
    Ps,
    Logs,
    RemoveMachineDir,
    Residue,
    CreateVolume,
    ExtendVolume,
    GrowVolumeFs,
    RemoveVolume,
    VolumeDisk,
    Connect,
    PauseVm,
    ContinueVm,
    SnapshotVolume,
    VolumeSnapshot,
    DeleteSnapshot,
    RestoreVolume,
    ForkVolume,
}

impl DriverOp {
    /// Snake-case name, as in step records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PullImage => "pull_image",
            Self::BuildBase => "build_base",
            Self::CreateDisk => "create_disk",
            Self::RemoveDisk => "remove_disk",
            Self::AttachNetwork => "attach_network",
            Self::DetachNetwork => "detach_network",
            Self::WriteSpec => "write_spec",
            Self::StartVm => "start_vm",
            Self::WaitStarted => "wait_started",
            Self::StopVm => "stop_vm",
            Self::KillVm => "kill_vm",
            Self::SuspendVm => "suspend_vm",
            Self::ResumeVm => "resume_vm",
            Self::DiscardSnapshot => "discard_snapshot",
            Self::VmStatus => "vm_status",
            Self::WaitExit => "wait_exit",
            Self::Signal => "signal",
            Self::Exec => "exec",
            Self::ExecSession => "exec_session",
            Self::Ps => "ps",
            Self::Logs => "logs",
            Self::RemoveMachineDir => "remove_machine_dir",
            Self::Residue => "residue",
            Self::CreateVolume => "create_volume",
            Self::ExtendVolume => "extend_volume",
            Self::GrowVolumeFs => "grow_volume_fs",
            Self::RemoveVolume => "remove_volume",
            Self::VolumeDisk => "volume_disk",
            Self::Connect => "connect",
            Self::PauseVm => "pause_vm",
            Self::ContinueVm => "continue_vm",
            Self::SnapshotVolume => "snapshot_volume",
            Self::VolumeSnapshot => "volume_snapshot",
            Self::DeleteSnapshot => "delete_snapshot",
            Self::RestoreVolume => "restore_volume",
            Self::ForkVolume => "fork_volume",
        }
    }
}

impl fmt::Display for DriverOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed driver operation.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The operation failed; `retryable` says whether trying again may help (network, timeouts).
    #[error("{op}: {message}")]
    Failed {
        /// What was being done.
        op: DriverOp,
        /// What went wrong, with the underlying error's chain.
        message: String,
        /// Whether a retry may succeed.
        retryable: bool,
    },
    /// The image does not exist or may not be pulled: a retry will not help.
    #[error("image {image}: {message}")]
    Image {
        /// The reference.
        image: String,
        /// Why.
        message: String,
    },
    /// Init could not start the workload (its message, e.g. "executable not found").
    #[error("workload failed to start: {message}")]
    WorkloadFailed {
        /// Init's message.
        message: String,
    },
    /// Init refused what was asked of a running machine (an exec'd command it could not start,
    /// e.g. "executable not found: /app/x"): the caller's to fix, not the platform's.
    #[error("{op}: {message}")]
    Refused {
        /// What was being done.
        op: DriverOp,
        /// Init's message.
        message: String,
    },
    /// The operation needs a running VM and there is none.
    #[error("{op}: the machine is not running")]
    NotRunning {
        /// What was being done.
        op: DriverOp,
    },
    /// The machine has no address the host reaches: it has no network ([`NoNetwork`]).
    #[error("{op}: the machine has no network address the host can reach")]
    NoAddress {
        /// What was being done.
        op: DriverOp,
    },
    /// No snapshot of this id on this host ([`Driver::restore_volume`]).
    #[error("{op}: snapshot {snapshot} is not on this host")]
    NoSnapshot {
        /// What was being done.
        op: DriverOp,
        /// The snapshot.
        snapshot: SnapshotId,
    },
    /// No disk of this volume on this host (the source of a snapshot or a fork).
    #[error("{op}: volume {volume} has no disk on this host")]
    NoVolume {
        /// What was being done.
        op: DriverOp,
        /// The volume.
        volume: VolumeId,
    },
    /// A snapshot's content no longer matches the digest taken with it: it cannot be restored.
    #[error("snapshot {snapshot} is damaged: its content no longer matches its digest; restore another")]
    SnapshotDamaged {
        /// The snapshot.
        snapshot: SnapshotId,
    },
    /// Nothing accepted a connection on the machine's port ([`Driver::connect`]): refused, no
    /// route, or no answer in time. The workload's to fix (or the caller's port), not the
    /// platform's.
    #[error("nothing accepted a connection on port {port} ({reason})")]
    Unreachable {
        /// The machine's port.
        port: u16,
        /// Why, as the OS said it (`connection refused`, `no answer within 5s` …).
        reason: String,
    },
}

impl DriverError {
    /// A failure with the full chain of `e` as its message.
    pub fn failed(op: DriverOp, e: &(dyn std::error::Error + 'static), retryable: bool) -> Self {
        Self::Failed {
            op,
            message: aloft_api::error_chain(e),
            retryable,
        }
    }

    /// Whether trying the same step again may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Failed { retryable: true, .. })
    }
}

/// Everything on this host a machine's lifecycle touches. See the module doc: blocking,
/// idempotent, keyed by machine id. Implementations: [`crate::VmDriver`] (real) and
/// [`crate::FakeDriver`] (in memory).
pub trait Driver: Send + Sync + fmt::Debug {
    /// Resolves and caches `image` (a reference as the user wrote it). Idempotent.
    fn pull_image(&self, image: &str) -> Result<ImageInfo, DriverError>;
    /// The read-only base of a pulled image, built once per digest. Idempotent.
    fn build_base(&self, image: &ImageInfo) -> Result<BaseInfo, DriverError>;
    /// Creates the machine's writable disk, or resets it to empty if it exists.
    fn create_disk(&self, id: &MachineId, size_mib: u64) -> Result<PathBuf, DriverError>;
    /// Removes the writable disk; succeeds if there is none.
    fn remove_disk(&self, id: &MachineId) -> Result<(), DriverError>;
    /// Gives the machine its network (tap, addresses) in organization `org`; the same answer for
    /// the same machine every time.
    fn attach_network(&self, id: &MachineId, org: u32) -> Result<NetInfo, DriverError>;
    /// Removes the machine's network; succeeds if there is none.
    fn detach_network(&self, id: &MachineId) -> Result<(), DriverError>;
    /// Writes what [`Driver::start_vm`] boots, replacing an earlier spec.
    fn write_spec(&self, id: &MachineId, spec: &LaunchSpec) -> Result<(), DriverError>;
    /// Boots the machine from its written spec; a VM already running from it is adopted.
    fn start_vm(&self, id: &MachineId) -> Result<(), DriverError>;
    /// Waits until init reports the workload started (or it already ran and exited).
    fn wait_started(&self, id: &MachineId, timeout: Duration) -> Result<(), DriverError>;
    /// Graceful stop: `signal` (or the spec's), `timeout`, then kill. `None` if it was not running.
    fn stop_vm(
        &self,
        id: &MachineId,
        signal: Option<Signal>,
        timeout: Duration,
    ) -> Result<Option<ExitInfo>, DriverError>;
    /// Kills the VM. `None` if it was not running.
    fn kill_vm(&self, id: &MachineId) -> Result<Option<ExitInfo>, DriverError>;
    /// Suspends the VM into the machine's snapshot; QEMU exits. Already suspended: success.
    fn suspend_vm(&self, id: &MachineId) -> Result<(), DriverError>;
    /// Boots the VM again from its snapshot (same spec). A VM already running is adopted.
    fn resume_vm(&self, id: &MachineId) -> Result<(), DriverError>;
    /// Removes the machine's snapshot; succeeds if there is none.
    fn discard_snapshot(&self, id: &MachineId) -> Result<(), DriverError>;
    /// What the VM is doing; reattaches to a VM this process has not seen yet.
    fn vm_status(&self, id: &MachineId) -> Result<VmStatus, DriverError>;
    /// Waits up to `timeout` for the VM to end; `None` while it still runs.
    fn wait_exit(&self, id: &MachineId, timeout: Duration) -> Result<Option<ExitInfo>, DriverError>;
    /// Sends `signal` to the workload.
    fn signal(&self, id: &MachineId, signal: Signal) -> Result<(), DriverError>;
    /// Runs a command in the guest.
    fn exec(&self, id: &MachineId, argv: &[String], timeout: Duration) -> Result<ExecResult, DriverError>;
    /// Starts an interactive command in the guest: `req.argv` (never empty: the agent chose the
    /// program), with `req.env` over the workload's environment, as `req.user`, stdin open, on
    /// a pseudo-terminal of `req.tty`'s size when set. Returns once init started it; init's
    /// refusal (`executable not found: …`) is [`DriverError::Refused`] with init's message. Not
    /// idempotent (each call starts a command), and not a lifecycle step: only called for a
    /// caller, never replayed.
    fn exec_session(
        &self,
        id: &MachineId,
        req: &ConsoleRequest,
    ) -> Result<Box<dyn DriverSession>, DriverError>;
    /// The guest's processes.
    fn ps(&self, id: &MachineId) -> Result<Vec<ProcessStat>, DriverError>;
    /// Opens a TCP connection from the host to `port` of the machine's running VM, on the
    /// address and in the network namespace of `net` (the network [`Driver::attach_network`]
    /// gave it), within `timeout`; returned connected, in blocking mode. No address in `net`
    /// (no network): [`DriverError::NoAddress`]; refused or not answered in time:
    /// [`DriverError::Unreachable`]. Not a lifecycle step: only called for a caller.
    fn connect(
        &self,
        id: &MachineId,
        net: &NetInfo,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream, DriverError>;
    /// The workload output of the machine's running VM from its boot on (what the VM still
    /// buffers of it, then new output as it comes); `None` when no VM runs. Called once per boot
    /// (after [`Driver::start_vm`] or [`Driver::resume_vm`], and when the agent reattaches); a
    /// second call for the same VM may repeat what the first one got.
    fn logs(&self, id: &MachineId) -> Result<Option<LogReceiver>, DriverError>;
    /// Removes everything else the machine has on the host (run directory, spec, logs); kills a
    /// VM still running from it first. Succeeds if there is nothing.
    fn remove_machine_dir(&self, id: &MachineId) -> Result<(), DriverError>;
    /// Every machine id that has anything on this host (VM, disk, network, directory): what
    /// recovery compares with its records to find orphans.
    fn residue(&self) -> Result<Vec<MachineId>, DriverError>;

    /// Makes a volume's disk: an empty ext4 filesystem of `size_gb` GiB, never seen half-made.
    /// A disk of that id already there is kept as it is, whatever its size (a retried create).
    fn create_volume(&self, id: &VolumeId, size_gb: u32) -> Result<(), DriverError>;
    /// A volume's disk; `None` when this host has none of that id.
    fn volume_disk(&self, id: &VolumeId) -> Result<Option<VolumeDisk>, DriverError>;
    /// Grows a volume's disk to `size_gb` GiB and records that its filesystem must grow too
    /// ([`VolumeDisk::grow_pending`]); the filesystem is left alone, so this is safe while a VM
    /// has the disk open. The same size again only keeps the record. Never shrinks.
    fn extend_volume(&self, id: &VolumeId, size_gb: u32) -> Result<(), DriverError>;
    /// Grows a volume's filesystem to its disk when an extend left that pending; `true` when it
    /// did. Only while no VM has the disk open: the filesystem is checked and resized offline.
    fn grow_volume_fs(&self, id: &VolumeId) -> Result<bool, DriverError>;
    /// Deletes a volume's disk and its data; succeeds if there is none. Its snapshots stay.
    fn remove_volume(&self, id: &VolumeId) -> Result<(), DriverError>;

    /// Takes snapshot `snapshot` of volume `id`: a copy of its disk (as sparse as it is, shared
    /// extents where the filesystem can), its digest, kept under the snapshot's id; never seen
    /// half-made. When `pause` names a machine whose VM runs, that VM is paused for the copy
    /// (only: the digest is computed afterwards) and always continued after it, so the copy is
    /// crash-consistent; a VM that is not running (any more) is not paused. A snapshot of that
    /// id already there is answered as it is. No disk: [`DriverError::NoVolume`]. Not a
    /// lifecycle step: only called for a caller.
    fn snapshot_volume(
        &self,
        id: &VolumeId,
        snapshot: &SnapshotId,
        pause: Option<&MachineId>,
    ) -> Result<SnapshotInfo, DriverError>;
    /// A snapshot kept on this host; `None` when there is none of that id.
    fn volume_snapshot(&self, snapshot: &SnapshotId) -> Result<Option<SnapshotInfo>, DriverError>;
    /// Deletes a snapshot; succeeds if there is none.
    fn delete_snapshot(&self, snapshot: &SnapshotId) -> Result<(), DriverError>;
    /// Makes volume `id`'s disk from snapshot `snapshot`: the copy's digest is checked
    /// ([`DriverError::SnapshotDamaged`] when it no longer matches), and the disk and its
    /// filesystem are grown to `size_gb` GiB when that is more than the snapshot's volume was;
    /// never seen half-made. A disk of that id already there is kept as it is (a retried
    /// create). No such snapshot: [`DriverError::NoSnapshot`]. The caller checked that
    /// `size_gb` holds the snapshot.
    fn restore_volume(&self, id: &VolumeId, snapshot: &SnapshotId, size_gb: u32) -> Result<(), DriverError>;
    /// Makes volume `id`'s disk a copy of volume `source`'s as it is now, grown (with its
    /// filesystem) to `size_gb` GiB when that is more; `pause` as for
    /// [`Driver::snapshot_volume`]. A disk of that id already there is kept as it is. No
    /// source disk: [`DriverError::NoVolume`].
    fn fork_volume(
        &self,
        id: &VolumeId,
        source: &VolumeId,
        size_gb: u32,
        pause: Option<&MachineId>,
    ) -> Result<(), DriverError>;
}

/// Connects to `addr` within `timeout` from network namespace `ns`: the socket is made (and
/// connected) on a thread in that namespace, and stays in it. What [`Driver::connect`]
/// implementations share; a failed connection is [`DriverError::Unreachable`] naming `port`
/// and why, a namespace that cannot be entered a [`DriverError::Failed`].
pub(crate) fn dial(ns: &Namespace, addr: SocketAddr, timeout: Duration) -> Result<TcpStream, DriverError> {
    let connected = ns
        .run(|| TcpStream::connect_timeout(&addr, timeout))
        .map_err(|e| DriverError::Failed {
            op: DriverOp::Connect,
            message: format!("cannot enter the machines' network namespace: {e}"),
            retryable: false,
        })?;
    connected.map_err(|e| DriverError::Unreachable {
        port: addr.port(),
        reason: match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                format!("no answer within {}s", timeout.as_secs_f32())
            }
            _ => e.to_string(),
        },
    })
}

/// A failed network operation (returned by [`Network`] implementations).
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The network backend failed.
    #[error("{op} for machine {machine}: {message}")]
    Failed {
        /// `attach` or `detach`.
        op: &'static str,
        /// The machine.
        machine: String,
        /// Why.
        message: String,
    },
}

/// A machine's host-side network: taps, addresses, firewall. The real implementation wraps
/// `aloft-net` (`HostNet` and its slot allocator); [`NoNetwork`] gives machines loopback only.
/// Same rules as [`Driver`]: blocking, idempotent, keyed by machine id.
pub trait Network: Send + Sync + fmt::Debug {
    /// Creates (or finds) the machine's network in organization `org`.
    fn attach(&self, id: &MachineId, org: u32) -> Result<NetInfo, NetworkError>;
    /// Removes it; succeeds if there is none.
    fn detach(&self, id: &MachineId) -> Result<(), NetworkError>;
    /// Machines that have a network here (for the orphan sweep).
    fn attached(&self) -> Result<Vec<MachineId>, NetworkError>;
}

/// No network at all: machines get loopback only and no private address. The default until a host
/// network is configured.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNetwork;

impl Network for NoNetwork {
    fn attach(&self, _id: &MachineId, _org: u32) -> Result<NetInfo, NetworkError> {
        Ok(NetInfo::default())
    }

    fn detach(&self, _id: &MachineId) -> Result<(), NetworkError> {
        Ok(())
    }

    fn attached(&self) -> Result<Vec<MachineId>, NetworkError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::io::{Read as _, Write as _};
    use std::net::{IpAddr, Ipv4Addr, TcpListener};

    use super::*;

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:\t0\t"))
    }

    #[test]
    fn dial_names_the_port_nothing_accepted_on() {
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let e = dial(&Namespace::Current, closed, Duration::from_secs(5)).unwrap_err();
        match &e {
            DriverError::Unreachable { port, reason } => {
                assert_eq!(*port, closed.port());
                assert!(reason.to_lowercase().contains("refused"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains(&format!("port {}", closed.port())), "{e}");
    }

    /// The socket is made in the namespace: it reaches a listener bound on an address only the
    /// namespace has, and its own address is the namespace's.
    #[test]
    fn dial_makes_its_socket_in_the_namespace() {
        if !is_root() {
            eprintln!("skipped: needs root to create network namespaces");
            return;
        }
        let ns = aloft_testkit::NetNs::new().unwrap();
        let inside = Namespace::Path(ns.path());
        let listener = inside
            .run(|| TcpListener::bind(SocketAddr::new(IpAddr::V4(ns.host_ip), 0)))
            .unwrap()
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = dial(&inside, addr, Duration::from_secs(5)).unwrap();
        let (mut server, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(peer.ip(), IpAddr::V4(ns.host_ip));
        assert_ne!(peer.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        client.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }
}
