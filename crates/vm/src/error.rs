//! The driver's error type: every variant names what failed and, where there is one, what to do.

use std::path::PathBuf;
use std::time::Duration;

use crate::initramfs::InitramfsError;
use crate::qmp::QmpError;

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("kernel not found: {}: run scripts/setup.sh", path.display())]
    KernelNotFound { path: PathBuf },
    #[error("initramfs not found: {}: run scripts/setup.sh", path.display())]
    InitrdNotFound { path: PathBuf },
    #[error("disk not found: {}", path.display())]
    DiskNotFound { path: PathBuf },
    #[error("snapshot not found: {}", path.display())]
    SnapshotNotFound { path: PathBuf },
    #[error("memory of {memory_mib} MiB is too small: a guest needs at least {min_mib} MiB")]
    MemoryTooSmall { memory_mib: u32, min_mib: u32 },
    #[error("invalid vm spec: {reason}")]
    InvalidSpec { reason: String },
    #[error("jail user {user} does not exist: run scripts/setup.sh")]
    JailUserMissing { user: String },
    #[error("a qemu (pid {pid}) is still running in {}: stop it or use another run dir", run_dir.display())]
    AlreadyRunning { pid: i32, run_dir: PathBuf },
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("build the machine's initramfs")]
    Initramfs(#[from] InitramfsError),
    #[error("start {program}: is QEMU installed? (scripts/setup.sh installs qemu-system-x86)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu failed to start ({status}): {stderr}")]
    Launch { status: String, stderr: String },
    #[error("set up cgroup {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("qmp: {op}")]
    Qmp {
        op: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("host↔guest channel: {op}")]
    Channel {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {after:?} waiting to {op}{}", hint_suffix(hint))]
    Timeout {
        op: &'static str,
        after: Duration,
        hint: String,
    },
    #[error("workload failed to start: {message}")]
    WorkloadFailed { message: String },
    #[error("guest kernel failed to boot: {console}")]
    GuestBootFailed { console: String },
    #[error("the vm is not running ({reason}){}", hint_suffix(console))]
    NotRunning { reason: String, console: String },
    #[error("exec failed: {message}")]
    ExecFailed { message: String },
    #[error("snapshot failed: {message}")]
    Snapshot { message: String },
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
