//! The driver's error type: every variant names what failed and, where there is one, what to do.
//!
//! Fields are the identifying facts for the message (paths, users, sizes) and the underlying
//! `#[source]`; they are public so callers can map variants to API errors.

use std::path::PathBuf;
use std::time::Duration;

use crate::initramfs::InitramfsError;
use crate::qmp::QmpError;

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
#[expect(missing_docs, reason = "fields are named for what the #[error] message says")]
pub enum VmError {
    /// The spec's QEMU binary (a path) does not exist.
    #[error("QEMU not found: {}: run scripts/setup.sh (it builds aloft's QEMU beside the guest kernel)", path.display())]
    QemuNotFound { path: PathBuf },
    /// The spec's kernel does not exist.
    #[error("kernel not found: {}: run scripts/setup.sh", path.display())]
    KernelNotFound { path: PathBuf },
    /// The spec's base initramfs does not exist.
    #[error("initramfs not found: {}: run scripts/setup.sh", path.display())]
    InitrdNotFound { path: PathBuf },
    /// A disk image does not exist.
    #[error("disk not found: {}", path.display())]
    DiskNotFound { path: PathBuf },
    /// The snapshot to resume from does not exist.
    #[error("snapshot not found: {}", path.display())]
    SnapshotNotFound { path: PathBuf },
    /// Rejected before launch: below [`crate::MIN_MEMORY_MIB`].
    #[error("memory of {memory_mib} MiB is too small: a guest needs at least {min_mib} MiB")]
    MemoryTooSmall { memory_mib: u32, min_mib: u32 },
    /// Any other spec problem (name, vcpus, tap, MAC, run dir length, cgroup parent).
    #[error("invalid vm spec: {reason}")]
    InvalidSpec { reason: String },
    /// The jail user is not in `/etc/passwd`.
    #[error("jail user {user} does not exist: run scripts/setup.sh")]
    JailUserMissing { user: String },
    /// The run dir's `state.json` names a QEMU that still runs.
    #[error("a qemu (pid {pid}) is still running in {}: stop it or use another run dir", run_dir.display())]
    AlreadyRunning { pid: i32, run_dir: PathBuf },
    /// A file operation failed (`op` says which).
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The machine's initramfs could not be composed.
    #[error("build the machine's initramfs")]
    Initramfs(#[from] InitramfsError),
    /// QEMU could not be executed at all.
    #[error(
        "start {program}: is QEMU installed? (scripts/setup.sh builds aloft's and installs Debian's qemu-system-x86)"
    )]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited during its setup; `stderr` is what it printed (`qemu.log`).
    #[error("qemu failed to start ({status}): {stderr}")]
    Launch { status: String, stderr: String },
    /// Creating or joining the jail's cgroup failed.
    #[error("set up cgroup {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A QMP exchange failed.
    #[error("qmp: {op}")]
    Qmp {
        op: &'static str,
        #[source]
        source: QmpError,
    },
    /// The host↔guest channel failed.
    #[error("host↔guest channel: {op}")]
    Channel {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// An operation did not finish in time; `hint` holds the last console lines when useful.
    #[error("timed out after {after:?} waiting to {op}{}", hint_suffix(hint))]
    Timeout {
        op: &'static str,
        after: Duration,
        hint: String,
    },
    /// Init could not start the workload; `message` is init's ("executable not found: /app/x").
    #[error("workload failed to start: {message}")]
    WorkloadFailed { message: String },
    /// The guest died before init reported anything (kernel panic, OOM); the last console lines.
    #[error("guest kernel failed to boot: {console}")]
    GuestBootFailed { console: String },
    /// The VM is gone (or finished) so the operation cannot run.
    #[error("the vm is not running ({reason}){}", hint_suffix(console))]
    NotRunning { reason: String, console: String },
    /// Init refused an exec or process-list request.
    #[error("exec failed: {message}")]
    ExecFailed { message: String },
    /// The VM was paused ([`crate::Vm::paused`]) and could not be continued: it stays paused.
    #[error("the vm stays paused: qmp cont failed; stop and start the machine to run it again")]
    StillPaused {
        #[source]
        source: QmpError,
    },
    /// Writing or restoring a snapshot failed.
    #[error("snapshot failed: {message}")]
    Snapshot { message: String },

    #[error("boot template: {message}")]
    Template { message: String },
    /// `state.json` could not be written or parsed.
    #[error("vm state in {}", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!(": last console lines: {hint}")
    }
}

impl VmError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
