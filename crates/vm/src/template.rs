//! Boot templates: a machine starts by restoring a snapshot of a guest that has already booted,
//! instead of booting a kernel.
//!
//! A template is made once per *shape* ([`Templates::shape`]: everything the guest saw before
//! init stopped to wait: kernel, initramfs, QEMU, accelerator, memory, vCPUs, the disks' number,
//! modes and sizes, whether there is a network device, the extra kernel arguments). Making one
//! boots the first machine's spec with [`TEMPLATE_CMDLINE_FLAG`] and an empty run config: init
//! comes up, reports [`aloft_guest_proto::GuestStatus::awaiting_boot`], and is snapshotted there
//! ([`Vm::suspend`]). Every start of that shape then restores the snapshot with the machine's own
//! disks, tap and run directory and sends init a [`Frame::Boot`](aloft_guest_proto::Frame::Boot)
//! with the machine's run config, the host's clock, fresh random bytes and the machine's MAC;
//! init then boots exactly as a cold guest does from there (root, network, workload).
//!
//! **Memory.** The template's guest memory is a file (`ram`) that its QEMU wrote through a shared
//! mapping; the snapshot holds only the devices' state (QEMU's `x-ignore-shared`). A restored VM
//! maps that file privately: it reads a page from the file (the host's page cache, one copy for
//! every VM of the shape) the first time it touches it, and a page it writes becomes its own. So a
//! start copies no guest memory, and a machine holds privately only what it wrote since; an idle
//! small machine touches ~15 of its template's ~50 MiB. Nothing may ever change the file while a
//! template exists: QEMU before 8.2 discards a free page reported by a privately mapped guest by
//! punching a hole in the *file*, i.e. in every VM's memory at once. Templates therefore boot with
//! free page reporting off ([`PAGE_REPORTING_OFF`]; their restored machines inherit it), and the
//! template's devices still include the balloon, so a machine restored from one has the devices of
//! its spec and suspends and resumes as any other.
//!
//! The guest never touched the disks before the snapshot (no partition table is read, nothing is
//! mounted), so the machine's own disks stand in for the template's; their sizes are part of the
//! shape because the guest read them when it probed the devices.
//!
//! Layout under [`Templates::dir`]: `<id>/snapshot` (device state), `<id>/ram` (guest memory),
//! `<id>/initrd.cpio` (QEMU needs an `-initrd` to start; the restored guest never reads it),
//! `<id>/shape` (the shape's text; `id` is its FNV-1a hash, the text is compared on use),
//! `<id>.lock` (held while one is made: concurrent starts of a new shape make it once),
//! `<id>.build/` (a template being made). A template deleted while machines run from it stays on
//! disk until the last of them exits (they hold its `ram` open).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use aloft_guest_proto::{BootRequest, MAX_FRAME_LEN, RunConfig, TEMPLATE_CMDLINE_FLAG};

use crate::argv::{PAGE_REPORTING_OFF, RamFile};
use crate::error::VmError;
use crate::spec::{RunPaths, VmSpec};
use crate::vm::Vm;

/// How long a template's guest may take to boot to init's wait.
const TEMPLATE_BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a restored template may take to say it waits for its boot request.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(15);

/// Run configs larger than this (as JSON; a machine's `files` are in it) boot cold: the boot
/// request must fit in one channel frame.
const MAX_BOOT_CONFIG_BYTES: usize = MAX_FRAME_LEN - 4096;

/// Random bytes sent to each restored guest ([`BootRequest::seed`]).
const SEED_BYTES: usize = 32;

/// Templates kept; making one more deletes the least recently used beyond it. Every new image
/// (its base's size) or machine size is a new shape, and a template holds the memory its guest
/// touched while booting (~50 MiB of disk for a small guest).
pub const MAX_TEMPLATES: usize = 16;

/// The boot templates of one host, in one directory.
#[derive(Debug, Clone)]
pub struct Templates {
    dir: PathBuf,
}

/// A machine started by [`Templates::start`].
#[derive(Debug)]
pub struct TemplateStart {
    /// The running VM (wait for its workload with [`Vm::wait_started`]).
    pub vm: Vm,
    /// `true` when this start made its shape's template first.
    pub made_template: bool,
    /// Why the machine booted cold instead (a run config too large for a boot request, a
    /// template that could not be made or restored); `None` when it was restored.
    pub cold_reason: Option<String>,
}

impl Templates {
    /// Templates kept in `dir` (created, mode 0700: snapshots hold guest memory).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, VmError> {
        let dir = std::path::absolute(dir.into()).map_err(|e| VmError::io("resolve path", ".", e))?;
        fs::create_dir_all(&dir).map_err(|e| VmError::io("create templates dir", &dir, e))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| VmError::io("restrict templates dir", &dir, e))?;
        Ok(Self { dir })
    }

    /// Where the templates are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts `spec`'s machine from its shape's template, making the template first when there
    /// is none. Falls back to a cold [`Vm::start`] (and says why in
    /// [`TemplateStart::cold_reason`]) when the run config is too large for a boot request or
    /// the template cannot be made or restored; a template whose snapshot does not load or whose
    /// guest does not answer is deleted (it may come from an older QEMU), so the next start makes
    /// a new one. Errors only when the
    /// cold start fails too, or the spec itself is invalid.
    pub fn start(&self, spec: VmSpec) -> Result<TemplateStart, VmError> {
        let spec = spec.with_absolute_paths()?;
        spec.validate()?;
        let config_len = serde_json::to_vec(&spec.run_config).map_or(usize::MAX, |j| j.len());
        if config_len > MAX_BOOT_CONFIG_BYTES {
            let reason = format!(
                "its run config is {config_len} bytes, more than a boot request carries ({MAX_BOOT_CONFIG_BYTES})"
            );
            return cold(spec, reason, false);
        }
        let (template, made) = match self.template_for(&spec) {
            Ok(t) => t,
            Err(e) => return cold(spec, format!("no template: {e}"), false),
        };
        match restore_and_boot(&spec, &template) {
            Ok(vm) => Ok(TemplateStart {
                vm,
                made_template: made,
                cold_reason: None,
            }),
            Err(e) => {
                // A snapshot this QEMU cannot load (an older QEMU's) or a guest that never asked
                // for its boot request condemns the template; a machine's own trouble (its tap,
                // its disks) does not, and its cold boot will say so.
                if matches!(
                    e,
                    VmError::Snapshot { .. } | VmError::Template { .. } | VmError::Timeout { .. }
                ) {
                    let _ = fs::remove_dir_all(&template);
                }
                cold(spec, format!("restoring the template failed: {e}"), made)
            }
        }
    }

    /// The text that names `spec`'s shape: everything that makes two guests identical up to
    /// init's wait for its boot request. Host-side details (paths of disks and run directory,
    /// tap name, jail) are not in it: they are the restoring QEMU's, not the guest's.
    pub fn shape(spec: &VmSpec) -> Result<String, VmError> {
        let accel = crate::accel::resolve(spec);
        let mut s = String::from("aloft boot template 2\n");
        let qemu = crate::spec::resolve_qemu(&spec.qemu).ok_or_else(|| VmError::QemuNotFound {
            path: spec.qemu.clone(),
        })?;
        s += &format!("qemu {}\n", file_identity(&qemu)?);
        s += &format!("accel {accel:?}\n");
        s += &format!("kernel {}\n", file_identity(&spec.kernel)?);
        s += &format!("initrd {}\n", file_identity(&spec.initrd)?);
        s += &format!("memory_mib {} vcpus {}\n", spec.memory_mib, spec.vcpus);
        s += &format!("free_page_reporting {}\n", spec.free_page_reporting);
        s += &format!("cmdline_extra {:?}\n", spec.cmdline_extra);
        for (i, d) in spec.disks.iter().enumerate() {
            let len = fs::metadata(&d.path)
                .map_err(|e| VmError::io("read disk size", &d.path, e))?
                .len();
            s += &format!(
                "disk {i} read_only {} format {} bytes {len}\n",
                d.read_only,
                d.format.as_str()
            );
        }
        s += &format!("network {}\n", spec.net.is_some());
        Ok(s)
    }

    /// The directory of `spec`'s template, made now if missing; `true` if this call made it.
    fn template_for(&self, spec: &VmSpec) -> Result<(PathBuf, bool), VmError> {
        let shape = Self::shape(spec)?;
        let id = format!("{:016x}", fnv1a(shape.as_bytes()));
        let dir = self.dir.join(&id);
        if is_ready(&dir, &shape) {
            touch(&dir);
            return Ok((dir, false));
        }
        let lock_path = self.dir.join(format!("{id}.lock"));
        let lock =
            File::create(&lock_path).map_err(|e| VmError::io("create template lock", &lock_path, e))?;
        // flock(2); released when `lock` is closed.
        lock.lock()
            .map_err(|e| VmError::io("lock template", &lock_path, e))?;
        if is_ready(&dir, &shape) {
            return Ok((dir, false));
        }
        make(spec, &id, &shape, &dir, &self.dir.join(format!("{id}.build")))?;
        drop(lock);
        self.prune(MAX_TEMPLATES);
        Ok((dir, true))
    }

    /// Deletes the least recently used templates beyond `keep` (never one being made).
    fn prune(&self, keep: usize) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut templates: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .map(|e| e.path())
            .filter_map(|p| {
                let used = fs::metadata(p.join("shape")).and_then(|m| m.modified()).ok()?;
                Some((used, p))
            })
            .collect();
        if templates.len() <= keep {
            return;
        }
        templates.sort();
        let excess = templates.len() - keep;
        for (_, dir) in templates.into_iter().take(excess) {
            let Some(name) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            // Held while its shape's template is (re)made: leave that one alone.
            let lock = File::create(self.dir.join(format!("{name}.lock")));
            if lock.as_ref().is_ok_and(|l| l.try_lock().is_ok()) {
                let _ = fs::remove_dir_all(&dir);
                let _ = fs::remove_file(self.dir.join(format!("{name}.lock")));
            }
        }
    }
}

/// Marks a template used now (what [`Templates::prune`] orders by).
fn touch(dir: &Path) {
    if let Ok(f) = File::options().write(true).open(dir.join("shape")) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// A cold start of `spec`, reporting why it was not restored.
fn cold(spec: VmSpec, reason: String, made_template: bool) -> Result<TemplateStart, VmError> {
    Ok(TemplateStart {
        vm: Vm::start(spec)?,
        made_template,
        cold_reason: Some(reason),
    })
}

/// A finished template of `shape` is in `dir`.
fn is_ready(dir: &Path, shape: &str) -> bool {
    dir.join("snapshot").is_file()
        && dir.join("ram").is_file()
        && dir.join("initrd.cpio").is_file()
        && fs::read_to_string(dir.join("shape")).is_ok_and(|s| s == shape)
}

/// Boots `spec`'s shape as a template in `build`, snapshots it at init's wait and moves it to
/// `dir`. Nothing is left in `build` on failure.
fn make(spec: &VmSpec, id: &str, shape: &str, dir: &Path, build: &Path) -> Result<(), VmError> {
    let _ = fs::remove_dir_all(build);
    fs::create_dir_all(build).map_err(|e| VmError::io("create template dir", build, e))?;
    let result = (|| {
        let mut t = spec.clone();
        t.name = format!("template-{id}");
        t.run_dir = build.join("run");
        // The template must hold no machine's secrets: its config arrives after the restore.
        t.run_config = RunConfig::default();
        t.cmdline_extra.push(TEMPLATE_CMDLINE_FLAG.to_owned());
        if t.free_page_reporting {
            // After the order the spec's own command line sets: the last value wins.
            t.cmdline_extra.push(format!(
                "page_reporting.page_reporting_order={PAGE_REPORTING_OFF}"
            ));
        }
        let ram = RamFile {
            path: build.join("ram"),
            shared: true,
        };
        let vm = Vm::start_with_ram(t, &ram)?;
        if let Err(e) = vm.wait_awaiting_boot(TEMPLATE_BOOT_TIMEOUT) {
            let _ = vm.kill();
            return Err(e);
        }
        let snapshot = build.join("snapshot");
        vm.suspend(&snapshot)?;
        for file in [&snapshot, &ram.path] {
            File::open(file)
                .and_then(|f| f.sync_all())
                .map_err(|e| VmError::io("sync template", file, e))?;
        }
        let initrd = RunPaths::new(&build.join("run")).initrd();
        fs::rename(&initrd, build.join("initrd.cpio"))
            .map_err(|e| VmError::io("keep template initramfs", &initrd, e))?;
        let _ = fs::remove_dir_all(build.join("run"));
        let shape_path = build.join("shape");
        File::create(&shape_path)
            .and_then(|mut f| {
                f.write_all(shape.as_bytes())?;
                f.sync_all()
            })
            .map_err(|e| VmError::io("write template shape", &shape_path, e))?;
        let _ = fs::remove_dir_all(dir);
        fs::rename(build, dir).map_err(|e| VmError::io("install template", dir, e))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(build);
    }
    result
}

/// Restores `template` as `spec`'s machine and sends init its boot request.
fn restore_and_boot(spec: &VmSpec, template: &Path) -> Result<Vm, VmError> {
    let paths = RunPaths::new(&spec.run_dir);
    fs::create_dir_all(&paths.dir).map_err(|e| VmError::io("create run dir", &paths.dir, e))?;
    // QEMU needs an -initrd; the restored guest never reads it. A link to the template's saves
    // composing and syncing one.
    let initrd = paths.initrd();
    let _ = fs::remove_file(&initrd);
    let src = template.join("initrd.cpio");
    if fs::hard_link(&src, &initrd).is_err() {
        fs::copy(&src, &initrd).map_err(|e| VmError::io("copy template initramfs", &initrd, e))?;
    }
    // A cold boot's console log must not be read as this run's (the restore appends to it).
    let _ = fs::remove_file(paths.console());
    let ram = RamFile {
        path: template.join("ram"),
        shared: false,
    };
    let vm = Vm::restore(spec.clone(), &template.join("snapshot"), Some(&ram))?;
    let booted = (|| {
        vm.wait_awaiting_boot(RESTORE_TIMEOUT)?;
        vm.send_boot(BootRequest {
            config: spec.run_config.clone(),
            unix_nanos: std::time::SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            seed: random_bytes(SEED_BYTES)?,
            mac: spec.net.as_ref().map(|n| n.mac.clone()),
        })
    })();
    match booted {
        Ok(()) => Ok(vm),
        Err(e) => {
            let _ = vm.kill();
            Err(e)
        }
    }
}

/// `n` bytes from the host's random generator.
fn random_bytes(n: usize) -> Result<Vec<u8>, VmError> {
    let mut buf = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| VmError::io("read random bytes from", "/dev/urandom", e))?;
    Ok(buf)
}

/// A file's identity for a shape: path, size and modification time (a rebuilt kernel or an
/// upgraded QEMU changes it).
fn file_identity(path: &Path) -> Result<String, VmError> {
    let m = fs::metadata(path).map_err(|e| VmError::io("read", path, e))?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!("{} {} {mtime}", path.display(), m.len()))
}

/// 64-bit FNV-1a: a stable name for a shape (its text is compared on use, so a collision
/// only costs a rebuild).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskSpec, NetSpec};

    fn spec(dir: &Path) -> VmSpec {
        let kernel = dir.join("vmlinux");
        let initrd = dir.join("initramfs.cpio");
        fs::write(&kernel, b"k").unwrap();
        fs::write(&initrd, b"i").unwrap();
        let base = dir.join("base.img");
        let rw = dir.join("rw.img");
        fs::write(&base, vec![0u8; 4096]).unwrap();
        fs::write(&rw, vec![0u8; 8192]).unwrap();
        let mut s = VmSpec::new("m1", kernel, initrd, dir.join("run"));
        s.accel = crate::AccelChoice::Tcg;
        s.disks = vec![DiskSpec::raw(&base, true), DiskSpec::raw(&rw, false)];
        s
    }

    #[test]
    fn a_shape_is_what_the_guest_saw_not_where_the_host_keeps_things() {
        let dir = tempfile::tempdir().unwrap();
        let a = spec(dir.path());
        let mut b = a.clone();
        b.name = "m2".into();
        b.run_dir = dir.path().join("elsewhere");
        b.run_config.hostname = "other".into();
        let rw2 = dir.path().join("rw2.img");
        fs::write(&rw2, vec![0u8; 8192]).unwrap();
        b.disks[1].path = rw2;
        assert_eq!(Templates::shape(&a).unwrap(), Templates::shape(&b).unwrap());

        let mut c = a.clone();
        c.memory_mib = 512;
        let mut d = a.clone();
        fs::write(dir.path().join("rw3.img"), vec![0u8; 4096]).unwrap();
        d.disks[1].path = dir.path().join("rw3.img");
        let mut e = a.clone();
        e.net = Some(NetSpec {
            tap: "tap0".into(),
            mac: "52:54:00:00:00:01".into(),
            netns: None,
        });
        let mut f = a.clone();
        f.cmdline_extra.push("aloft.trace=1".into());
        let mut g = a.clone();
        g.free_page_reporting = false;
        for (what, other) in [
            ("memory", c),
            ("disk size", d),
            ("network", e),
            ("cmdline", f),
            ("reporting", g),
        ] {
            assert_ne!(
                Templates::shape(&a).unwrap(),
                Templates::shape(&other).unwrap(),
                "{what} is part of a shape"
            );
        }
    }

    #[test]
    fn the_least_recently_used_templates_go_beyond_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let t = Templates::new(dir.path().join("t")).unwrap();
        let base = std::time::SystemTime::now() - Duration::from_secs(100);
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            let d = t.dir().join(name);
            fs::create_dir(&d).unwrap();
            fs::write(d.join("shape"), name).unwrap();
            File::options()
                .write(true)
                .open(d.join("shape"))
                .unwrap()
                .set_modified(base + Duration::from_secs(i as u64 * 10))
                .unwrap();
        }
        touch(&t.dir().join("a"));
        // A template being made keeps its lock: it stays whatever its age.
        let held = File::create(t.dir().join("b.lock")).unwrap();
        held.lock().unwrap();
        t.prune(2);
        let mut left: Vec<String> = fs::read_dir(t.dir())
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["a", "b", "d"],
            "c was the least recently used one not locked"
        );
    }

    #[test]
    fn fnv1a_is_the_published_function() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn a_template_is_ready_only_whole_and_of_its_shape() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path();
        assert!(!is_ready(t, "s"));
        fs::write(t.join("snapshot"), b"x").unwrap();
        fs::write(t.join("initrd.cpio"), b"x").unwrap();
        assert!(!is_ready(t, "s"), "no shape file");
        fs::write(t.join("shape"), b"other").unwrap();
        assert!(!is_ready(t, "s"), "another shape with the same hash");
        fs::write(t.join("shape"), b"s").unwrap();
        assert!(!is_ready(t, "s"), "no memory file (a template of an older aloft)");
        fs::write(t.join("ram"), b"x").unwrap();
        assert!(is_ready(t, "s"));
    }
}
