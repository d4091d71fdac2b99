//! Fixtures for the real-VM tests on top of `aloft-testkit`: a test VM's run dir and spec, and a
//! guard that leaves no QEMU behind.
#![allow(dead_code, reason = "each test binary uses a different subset")]
#![allow(
    clippy::unwrap_used,
    reason = "test fixtures: a failed setup step fails the test"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use aloft_guest_proto::{RootConfig, RunConfig};
use aloft_vm::{AccelChoice, DiskSpec, Vm, VmSpec};

pub(crate) const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The guest kernel (`target/guest/vmlinux` or `$ALOFT_GUEST_DIR`).
pub(crate) fn kernel() -> PathBuf {
    aloft_testkit::guest_artifacts().unwrap().kernel
}

/// The base initramfs next to the kernel.
pub(crate) fn initrd() -> PathBuf {
    aloft_testkit::guest_artifacts().unwrap().initrd
}

/// The busybox root filesystem image, built once and cached under `target/testkit`.
pub(crate) fn rootfs() -> PathBuf {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| aloft_testkit::busybox_rootfs(&aloft_testkit::cache_dir()).unwrap())
        .clone()
}

/// A fresh sparse writable ext4 disk.
pub(crate) fn rw_disk(img: &Path) {
    aloft_testkit::writable_disk(img, 64).unwrap();
}

/// A test VM's run dir and spec; the guard kills any VM started from it on drop and checks that
/// no process is left mentioning the run dir.
pub(crate) struct TestVm {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) spec: VmSpec,
}

impl TestVm {
    /// busybox root (ro, /dev/vda) + writable layer (/dev/vdb), running `argv`.
    pub(crate) fn new(name: &str, argv: &[&str]) -> Self {
        let dir = tempfile::Builder::new().prefix("aloft-vm-").tempdir().unwrap();
        let rw = dir.path().join("rw.img");
        rw_disk(&rw);
        let run_dir = dir.path().join("run");
        let mut spec = VmSpec::new(
            format!("{name}-{}", std::process::id()),
            kernel(),
            initrd(),
            run_dir,
        );
        spec.accel = AccelChoice::Auto;
        spec.disks = vec![DiskSpec::raw(rootfs(), true), DiskSpec::raw(&rw, false)];
        spec.run_config = RunConfig {
            hostname: name.replace('_', "-"),
            exec: Some(argv.iter().map(|s| (*s).to_owned()).collect()),
            root: RootConfig {
                device: Some("/dev/vda".into()),
                fstype: "ext4".into(),
                writable_device: Some("/dev/vdb".into()),
            },
            ..RunConfig::default()
        };
        Self { dir, spec }
    }

    pub(crate) fn run_dir(&self) -> PathBuf {
        self.spec.run_dir.clone()
    }

    pub(crate) fn start(&self) -> Vm {
        Vm::start(self.spec.clone()).expect("vm starts")
    }

    /// Asserts that no process mentions the run dir (QEMU is gone).
    pub(crate) fn assert_no_qemu(&self) {
        let left = aloft_vm::processes_mentioning(&self.spec.run_dir);
        assert!(left.is_empty(), "processes left behind: {left:?}");
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        // Whatever the test did, leave no QEMU behind.
        if let Ok(vm) = Vm::attach(&self.spec.run_dir) {
            let _ = vm.kill();
        }
        for pid in aloft_vm::processes_mentioning(&self.spec.run_dir) {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }
}

/// Collects the workload's stdout from a log receiver until it disconnects or `timeout`.
pub(crate) fn collect_stdout(
    rx: &std::sync::mpsc::Receiver<aloft_vm::LogChunk>,
    timeout: Duration,
) -> String {
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(c) if c.stream == aloft_guest_proto::DataStream::Stdout => out.extend_from_slice(&c.data),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
