//! Fixtures for the real-VM tests: guest kernel and initramfs, a busybox root filesystem, writable
//! disks, run dirs, taps; and guards that leave nothing behind.
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

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `$ALOFT_GUEST_DIR`, else `<workspace>/target/guest`.
pub(crate) fn guest_dir() -> PathBuf {
    std::env::var_os("ALOFT_GUEST_DIR").map_or_else(|| workspace().join("target/guest"), PathBuf::from)
}

pub(crate) fn kernel() -> PathBuf {
    let k = guest_dir().join("vmlinux");
    assert!(
        k.is_file(),
        "guest kernel {} is missing: run scripts/setup.sh (or set ALOFT_GUEST_DIR)",
        k.display()
    );
    k
}

/// The base initramfs: `<guest dir>/initramfs.cpio`, else one written from the statically built
/// init (`cargo build -p aloft-init --profile guest-init --target x86_64-unknown-linux-gnu`).
pub(crate) fn initrd() -> PathBuf {
    static BUILT: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let i = guest_dir().join("initramfs.cpio");
    if i.is_file() {
        return i;
    }
    let init = workspace().join("target/x86_64-unknown-linux-gnu/guest-init/aloft-init");
    assert!(
        init.is_file(),
        "guest initramfs {} is missing and no static init at {}: run scripts/setup.sh",
        i.display(),
        init.display()
    );
    BUILT
        .get_or_init(|| {
            let d = tempfile::tempdir().unwrap();
            let out = d.path().join("initramfs.cpio");
            aloft_vm::initramfs::write_base(&init, &out).unwrap();
            (d, out)
        })
        .1
        .clone()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A busybox tree: /bin/busybox + applet links, /etc/passwd (root, app 1000, nobody), /etc/group.
pub(crate) fn busybox_tree(dir: &Path) {
    for d in [
        "bin", "etc", "proc", "sys", "dev", "tmp", "run", "root", "home/app", "var/www",
    ] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
        }
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n\
         nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("etc/group"),
        "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n",
    )
    .unwrap();
    std::fs::write(dir.join("var/www/index.html"), "hello from the guest\n").unwrap();
    run(Command::new("chmod").arg("1777").arg(dir.join("tmp")));
    run(Command::new("chown").arg("1000:1000").arg(dir.join("home/app")));
}

/// `mkfs.ext4 -d` of `tree` into `img`.
pub(crate) fn ext4_from_dir(tree: &Path, img: &Path, size: &str) {
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(tree)
        .arg(img)
        .arg(size));
}

/// The busybox root filesystem image, built once per test process.
pub(crate) fn rootfs() -> PathBuf {
    static IMG: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    IMG.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        busybox_tree(&tree);
        let img = d.path().join("rootfs.ext4");
        ext4_from_dir(&tree, &img, "64M");
        (d, img)
    })
    .1
    .clone()
}

/// A fresh sparse writable ext4 disk.
pub(crate) fn rw_disk(img: &Path) {
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-O",
            "^has_journal",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
        ])
        .arg(img)
        .arg("64M"));
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

/// A tap in the host namespace with `172.30.<n>.1/30`, deleted on drop.
pub(crate) struct Tap {
    pub(crate) name: String,
    pub(crate) host_ip: String,
    pub(crate) guest_ip: String,
}

impl Tap {
    pub(crate) fn new() -> Self {
        let pid = std::process::id();
        let name = format!("alt{pid}");
        let n = pid % 250 + 1;
        let host_ip = format!("172.30.{n}.1");
        let guest_ip = format!("172.30.{n}.2");
        let _ = Command::new("ip").args(["link", "del", &name]).output();
        run(Command::new("ip").args(["tuntap", "add", "dev", &name, "mode", "tap"]));
        let tap = Self {
            name,
            host_ip,
            guest_ip,
        };
        run(Command::new("ip").args(["addr", "add", &format!("{}/30", tap.host_ip), "dev", &tap.name]));
        run(Command::new("ip").args(["link", "set", &tap.name, "up"]));
        tap
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.name]).output();
    }
}
