//! What the caller asks for: [`VmSpec`] and its parts, plus validation done before anything starts.

use std::path::{Path, PathBuf};

use aloft_guest_proto::RunConfig;
use serde::{Deserialize, Serialize};

use crate::error::VmError;

/// Smallest guest memory accepted: below it our kernel + init do not boot reliably.
pub const MIN_MEMORY_MIB: u32 = 64;

/// Most vCPUs accepted (the guest kernel is built with `NR_CPUS=64`).
pub const MAX_VCPUS: u32 = 64;

/// Everything needed to run one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Machine id or test name: used in cgroup names and messages (`[A-Za-z0-9_.-]`, ≤ 64 bytes).
    pub name: String,
    /// The QEMU binary: a path, or a bare name looked up on `PATH`. [`VmSpec::new`] takes
    /// [`default_qemu`] for the kernel. Recorded with the VM, so a resume or a reattach uses the
    /// QEMU that made its snapshot (specs recorded before the field existed read
    /// [`crate::QEMU`], Debian's on `PATH`).
    #[serde(default = "qemu_on_path")]
    pub qemu: PathBuf,
    /// Uncompressed `vmlinux` (PVH direct boot).
    pub kernel: PathBuf,
    /// Base initramfs holding `aloft-init` ([`crate::initramfs::write_base`]).
    pub initrd: PathBuf,
    /// Extra kernel arguments, appended after ours.
    pub cmdline_extra: Vec<String>,
    /// Number of vCPUs (1 to [`MAX_VCPUS`]).
    pub vcpus: u32,
    /// Guest memory in MiB (at least [`MIN_MEMORY_MIB`]).
    pub memory_mib: u32,
    /// In order: `/dev/vda`, `/dev/vdb`, … Each also has the virtio-blk serial
    /// [`crate::disk_serial`]`(index)` (`aloft-d0`, `aloft-d1`, …), which the guest reads from
    /// `/sys/block/<dev>/serial`.
    pub disks: Vec<DiskSpec>,
    /// The tap must already exist (created by the caller).
    pub net: Option<NetSpec>,
    /// This VM's private directory, owned by the caller: `qemu.pid`, `qmp.sock`, `channel.sock`,
    /// `console.log`, `qemu.log` (QEMU's own stderr), `initrd.cpio` (composed), `state.json`.
    pub run_dir: PathBuf,
    /// What init runs, written into the composed initramfs.
    pub run_config: RunConfig,
    /// Which accelerator; [`AccelChoice::Auto`] probes (cached).
    pub accel: AccelChoice,
    /// Run QEMU as an unprivileged user, sandboxed and in its own cgroup.
    pub jail: Option<JailSpec>,
    /// Give the guest a virtio balloon that reports its free memory, which QEMU then hands back
    /// to the host ([`crate::PAGE_REPORTING_ORDER`]): an idle guest keeps only what it uses, not
    /// everything it ever touched. Part of the device model, so a suspended VM resumes with the
    /// value it was started with (specs recorded before the field existed read `false`).
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl VmSpec {
    /// A spec with 1 vCPU, 256 MiB, no disks, no network, auto accelerator, no jail, free page
    /// reporting on.
    pub fn new(name: impl Into<String>, kernel: PathBuf, initrd: PathBuf, run_dir: PathBuf) -> Self {
        Self {
            name: name.into(),
            qemu: default_qemu(&kernel),
            kernel,
            initrd,
            cmdline_extra: Vec::new(),
            vcpus: 1,
            memory_mib: 256,
            disks: Vec::new(),
            net: None,
            run_dir,
            run_config: RunConfig::default(),
            accel: AccelChoice::Auto,
            jail: None,
            free_page_reporting: true,
        }
    }

    /// The spec with every host path made absolute against the current directory: QEMU runs in
    /// `/`, and a reattaching process may run elsewhere.
    pub(crate) fn with_absolute_paths(mut self) -> Result<Self, VmError> {
        let abs = |p: &mut PathBuf| -> Result<(), VmError> {
            if p.is_relative() {
                *p = std::path::absolute(&*p).map_err(|e| VmError::io("resolve path", p.clone(), e))?;
            }
            Ok(())
        };
        if is_path(&self.qemu) {
            abs(&mut self.qemu)?;
        }
        abs(&mut self.kernel)?;
        abs(&mut self.initrd)?;
        abs(&mut self.run_dir)?;
        for d in &mut self.disks {
            abs(&mut d.path)?;
        }
        if let Some(ns) = self.net.as_mut().and_then(|n| n.netns.as_mut()) {
            abs(ns)?;
        }
        Ok(self)
    }

    /// Checks everything that can be checked before launching QEMU.
    pub fn validate(&self) -> Result<(), VmError> {
        let invalid = |reason: String| Err(VmError::InvalidSpec { reason });
        if self.name.is_empty()
            || self.name.len() > 64
            || self.name.starts_with('.')
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return invalid(format!(
                "name {:?}: use 1 to 64 characters from [A-Za-z0-9_.-], not starting with a dot",
                self.name
            ));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(VmError::MemoryTooSmall {
                memory_mib: self.memory_mib,
                min_mib: MIN_MEMORY_MIB,
            });
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return invalid(format!("{} vcpus: use 1 to {MAX_VCPUS}", self.vcpus));
        }
        if is_path(&self.qemu) && !self.qemu.is_file() {
            return Err(VmError::QemuNotFound {
                path: self.qemu.clone(),
            });
        }
        if !self.kernel.is_file() {
            return Err(VmError::KernelNotFound {
                path: self.kernel.clone(),
            });
        }
        if !self.initrd.is_file() {
            return Err(VmError::InitrdNotFound {
                path: self.initrd.clone(),
            });
        }
        for d in &self.disks {
            if !d.path.exists() {
                return Err(VmError::DiskNotFound { path: d.path.clone() });
            }
        }
        if let Some(net) = &self.net {
            if net.tap.is_empty()
                || net.tap.len() > 15
                || !net
                    .tap
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return invalid(format!("tap name {:?}: 1 to 15 of [A-Za-z0-9_-]", net.tap));
            }
            if !valid_mac(&net.mac) {
                return invalid(format!(
                    "mac {:?}: expected six hex pairs such as 52:54:00:12:34:56",
                    net.mac
                ));
            }
        }
        // sun_path holds 108 bytes including the NUL.
        let sock = self.run_dir.join("channel.sock");
        if sock.as_os_str().len() > 100 {
            return invalid(format!(
                "run dir {} is too long for unix sockets (keep it under ~85 bytes)",
                self.run_dir.display()
            ));
        }
        if let Some(jail) = &self.jail {
            jail.check()?;
        }
        Ok(())
    }
}

/// The QEMU for machines booting `kernel`: aloft's own build beside it (`scripts/build-qemu.sh`
/// puts `qemu-system-x86_64`, microvm and our virtio devices only, next to `vmlinux`; ADR 0024) when
/// there is one, else [`crate::QEMU`] on `PATH` (Debian's, with every device model: it runs the same
/// machines for ~18 MiB more host memory each).
pub fn default_qemu(kernel: &Path) -> PathBuf {
    kernel
        .parent()
        .map(|dir| dir.join(crate::QEMU))
        .filter(|p| p.is_file())
        .unwrap_or_else(qemu_on_path)
}

/// [`crate::QEMU`], to be found on `PATH`.
fn qemu_on_path() -> PathBuf {
    PathBuf::from(crate::QEMU)
}

/// Whether `qemu` names a file by path (`bin/qemu`, `/opt/…`) rather than a program to look up on
/// `PATH` (`qemu-system-x86_64`).
fn is_path(qemu: &Path) -> bool {
    qemu.components().count() > 1
}

/// `qemu` itself when it is a path, else where `PATH` has it (`None`: nowhere).
pub(crate) fn resolve_qemu(qemu: &Path) -> Option<PathBuf> {
    if is_path(qemu) {
        return Some(qemu.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(qemu))
        .find(|c| c.is_file())
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether `user` is in `/etc/passwd` (the jail user is a local system user).
pub(crate) fn user_exists(user: &str) -> bool {
    std::fs::read_to_string("/etc/passwd")
        .map(|s| s.lines().any(|l| l.split(':').next() == Some(user)))
        .unwrap_or(false)
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Image file (or block device).
    pub path: PathBuf,
    /// Attach read-only (`readonly=on`).
    pub read_only: bool,
    /// Image format.
    pub format: DiskFormat,
}

impl DiskSpec {
    /// A raw disk.
    pub fn raw(path: impl Into<PathBuf>, read_only: bool) -> Self {
        Self {
            path: path.into(),
            read_only,
            format: DiskFormat::Raw,
        }
    }
}

/// Image format of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Raw image.
    Raw,
    /// qcow2 image (e.g. a copy-on-write overlay over a base).
    Qcow2,
}

impl DiskFormat {
    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// A tap device the caller created, and the guest's MAC on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// Tap device name (≤ 15 characters).
    pub tap: String,
    /// The guest NIC's MAC, `52:54:00:xx:xx:xx`.
    pub mac: String,
    /// Network namespace holding the tap (`/run/netns/NAME`); QEMU joins it before exec. `None`:
    /// the tap is in the caller's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
}

/// Jail settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailSpec {
    /// Unprivileged user QEMU runs as after opening its files (`aloft-vm`).
    pub user: String,
    /// Cgroup (relative to each hierarchy's root) under which `<parent>/<name>` is made (`aloft`).
    pub cgroup_parent: String,
}

impl JailSpec {
    /// Whether a VM can be jailed so: the user exists and the cgroup parent is a relative path.
    /// (Jailing also needs root, which only starting a VM finds out.)
    pub fn check(&self) -> Result<(), VmError> {
        if !user_exists(&self.user) {
            return Err(VmError::JailUserMissing {
                user: self.user.clone(),
            });
        }
        if self.cgroup_parent.is_empty()
            || self
                .cgroup_parent
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(VmError::InvalidSpec {
                reason: format!(
                    "cgroup parent {:?}: a relative path such as \"aloft\"",
                    self.cgroup_parent
                ),
            });
        }
        Ok(())
    }
}

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// Probe with the spec's QEMU ([`crate::accel::resolve`], cached).
    #[default]
    Auto,
    /// KVM without probing.
    Kvm,
    /// TCG (emulation) without probing.
    Tcg,
}

/// The accelerator a VM actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization (`-accel kvm -cpu host`).
    Kvm,
    /// QEMU's emulator (`-accel tcg -cpu max`).
    Tcg,
}

impl Accel {
    /// `kvm` or `tcg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The files in a run dir.
#[derive(Debug, Clone)]
pub(crate) struct RunPaths {
    pub(crate) dir: PathBuf,
}

impl RunPaths {
    pub(crate) fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }
    pub(crate) fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    pub(crate) fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub(crate) fn channel(&self) -> PathBuf {
        self.dir.join("channel.sock")
    }
    pub(crate) fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub(crate) fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    pub(crate) fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.cpio")
    }
    pub(crate) fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_validation() {
        assert!(valid_mac("52:54:00:12:34:56"));
        assert!(!valid_mac("52:54:00:12:34"));
        assert!(!valid_mac("52:54:00:12:34:5g"));
    }

    #[test]
    fn small_memory_is_rejected_first() {
        let mut s = VmSpec::new("t", "/nonexistent".into(), "/nonexistent".into(), "/tmp/x".into());
        s.memory_mib = 32;
        let e = s.validate().unwrap_err();
        assert!(e.to_string().contains("at least 64 MiB"), "{e}");
        s.memory_mib = 128;
        let e = s.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "kernel not found: /nonexistent: run scripts/setup.sh"
        );
    }

    #[test]
    fn relative_paths_become_absolute() {
        let mut s = VmSpec::new("t", "k/vmlinux".into(), "/abs/initrd".into(), "run".into());
        s.disks = vec![DiskSpec::raw("rootfs.ext4", true)];
        let s = s.with_absolute_paths().unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(s.kernel, cwd.join("k/vmlinux"));
        assert_eq!(s.initrd, Path::new("/abs/initrd"));
        assert_eq!(s.run_dir, cwd.join("run"));
        assert_eq!(s.disks[0].path, cwd.join("rootfs.ext4"));
    }

    #[test]
    fn the_qemu_beside_the_kernel_is_preferred() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        let s = VmSpec::new("t", kernel.clone(), "/i".into(), "/tmp/x".into());
        assert_eq!(s.qemu, Path::new(crate::QEMU), "no build beside it: PATH's");
        let own = dir.path().join(crate::QEMU);
        std::fs::write(&own, b"").unwrap();
        let s = VmSpec::new("t", kernel, "/i".into(), "/tmp/x".into());
        assert_eq!(s.qemu, own);
    }

    #[test]
    fn a_missing_qemu_path_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        let initrd = dir.path().join("initramfs.cpio");
        std::fs::write(&kernel, b"").unwrap();
        std::fs::write(&initrd, b"").unwrap();
        let mut s = VmSpec::new("t", kernel, initrd, dir.path().join("run"));
        s.qemu = dir.path().join("gone/qemu-system-x86_64");
        let e = s.validate().unwrap_err();
        assert!(matches!(e, VmError::QemuNotFound { .. }), "{e}");
        assert!(e.to_string().contains("gone/qemu-system-x86_64"), "{e}");
        s.qemu = crate::QEMU.into();
        s.validate().unwrap();
    }

    #[test]
    fn a_relative_qemu_path_becomes_absolute_and_a_bare_name_stays() {
        let mut s = VmSpec::new("t", "/k".into(), "/i".into(), "/tmp/x".into());
        s.qemu = "bin/qemu".into();
        let s = s.with_absolute_paths().unwrap();
        assert_eq!(s.qemu, std::env::current_dir().unwrap().join("bin/qemu"));
        let s = VmSpec::new("t", "/k".into(), "/i".into(), "/tmp/x".into())
            .with_absolute_paths()
            .unwrap();
        assert_eq!(s.qemu, Path::new(crate::QEMU));
    }

    #[test]
    fn specs_recorded_before_the_qemu_field_run_on_path_s_qemu() {
        let mut v = serde_json::to_value(VmSpec::new("t", "/k".into(), "/i".into(), "/x".into())).unwrap();
        v.as_object_mut().unwrap().remove("qemu");
        let s: VmSpec = serde_json::from_value(v).unwrap();
        assert_eq!(s.qemu, Path::new(crate::QEMU));
    }

    #[test]
    fn names_are_checked() {
        let mut s = VmSpec::new("../x", "/k".into(), "/i".into(), "/tmp/x".into());
        assert!(matches!(s.validate(), Err(VmError::InvalidSpec { .. })));
        s.name = "ok-name_1.2".into();
        assert!(matches!(s.validate(), Err(VmError::KernelNotFound { .. })));
    }
}
