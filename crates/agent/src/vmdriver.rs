//! [`VmDriver`]: the real [`Driver`]: images through `aloft-image` (pull into the blob cache, one
//! read-only base per digest, per-machine writable disks), volumes as sparse ext4 files
//! (`volumes.rs`), VMs through `aloft-vm`, networking through a [`Network`].
//!
//! Layout under [`VmDriverConfig::data_dir`]:
//!
//! | path | what |
//! |---|---|
//! | `machines/<id>/vm.json` | the `VmSpec` the next boot uses (written by `write_spec`) |
//! | `machines/<id>/run/` | the VM's run directory (`aloft-vm`'s `state.json`, sockets, console) |
//! | `machines/<id>/snapshot` | the memory snapshot of a suspended machine |
//! | `disks/<id>.img` | the writable disk |
//! | `volumes/<vol id>.ext4` | a volume's disk: ext4 filling a sparse file of the volume's size |
//! | `volumes/<vol id>.grow` | present while the volume's filesystem has yet to grow to its disk |
//! | `volumes/snapshots/<vs id>.ext4` | a volume snapshot's copy (sparse; kept after its volume goes) |
//! | `volumes/snapshots/<vs id>.json` | its record: volume, size, digest (written last: it makes the snapshot) |
//!
//! A boot's disks, in order: the read-only base (`/dev/vda`), the writable disk (`/dev/vdb`), then
//! the machine's volume read-write; the guest finds the volume by its virtio-blk serial
//! (`aloft_vm::disk_serial`), not by name.
//!
//! Image caches (blobs, bases, disk templates) live under [`VmDriverConfig::cache_dir`].

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use aloft_api::{ConsoleRequest, ListenSocket, MachineId, ProcessStat, Signal, SnapshotId, VolumeId};
use aloft_image::unpack::UnpackLimits;
use aloft_image::{
    Progress, PulledImage, Puller, Reference, RegistryConfig, RegistryError, RootfsFormat, RootfsStore,
    WritableDisks,
};
use aloft_net::Namespace;
use aloft_vm::{
    AccelChoice, DiskSpec, ExecEvent, ExecSession, JailSpec, NetSpec, QemuStatus, Templates, Vm, VmError,
    VmExit, VmSpec,
};

use crate::driver::{
    BaseInfo, Driver, DriverError, DriverOp, DriverSession, ExecResult, ExitInfo, ImageInfo, LaunchSpec,
    LogChunk, LogReceiver, NetInfo, Network, NoNetwork, OutputStream, SessionEvent, SnapshotInfo, VmStatus,
    VolumeDisk, dial,
};
use crate::ids::now_ms;
use crate::volumes::{VolumeError, VolumeStore};

/// How the real driver runs.
#[derive(Debug, Clone)]
pub struct VmDriverConfig {
    /// Machines' directories and disks, and volumes' disks.
    pub data_dir: PathBuf,
    /// The image cache (blobs, records, bases, disk templates).
    pub cache_dir: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The base initramfs (init).
    pub initrd: PathBuf,
    /// Registry access.
    pub registry: RegistryConfig,
    /// Where names without a registry resolve (`127.0.0.1:5000`); Docker Hub when `None`.
    pub default_registry: Option<String>,
    /// Base format.
    pub rootfs_format: RootfsFormat,
    /// Limits for unpacking an image.
    pub unpack_limits: UnpackLimits,
    /// Run QEMU jailed (own user, cgroup, sandbox).
    pub jail: Option<JailSpec>,
    /// Accelerator.
    pub accel: AccelChoice,
    /// Machines' networks.
    pub network: Arc<dyn Network>,
    /// Base builds at once (each may stage up to 4 GiB in memory, ADR 0004); others wait.
    pub max_concurrent_builds: usize,
    /// Start machines from boot templates (`<cache_dir>/templates`, [`aloft_vm::Templates`]):
    /// the first machine of a shape makes one, the next restore it instead of booting a kernel.
    pub boot_templates: bool,
}

impl VmDriverConfig {
    /// Defaults: erofs bases, no jail, probed accelerator, no network.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        cache_dir: impl Into<PathBuf>,
        kernel: PathBuf,
        initrd: PathBuf,
    ) -> Self {
        Self {
            data_dir: data_dir.into(),
            cache_dir: cache_dir.into(),
            kernel,
            initrd,
            registry: RegistryConfig::default(),
            default_registry: None,
            rootfs_format: RootfsFormat::default(),
            unpack_limits: UnpackLimits::default(),
            jail: None,
            accel: AccelChoice::Auto,
            network: Arc::new(NoNetwork),
            max_concurrent_builds: 2,
            boot_templates: true,
        }
    }
}

/// The real driver. See the module doc.
#[derive(Debug)]
pub struct VmDriver {
    config: VmDriverConfig,
    puller: Puller,
    rootfs: RootfsStore,
    disks: WritableDisks,
    volumes: VolumeStore,
    rt: tokio::runtime::Runtime,
    vms: Mutex<HashMap<MachineId, Arc<Vm>>>,
    builds: (Mutex<usize>, Condvar),
    templates: Option<Templates>,
}

/// One of [`VmDriverConfig::max_concurrent_builds`] build slots, given back on drop.
struct BuildSlot<'a>(&'a (Mutex<usize>, Condvar));

impl Drop for BuildSlot<'_> {
    fn drop(&mut self) {
        let mut n = self.0.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *n = n.saturating_sub(1);
        self.0.1.notify_one();
    }
}

fn io_failed(op: DriverOp, what: &str, path: &Path, e: &std::io::Error) -> DriverError {
    DriverError::Failed {
        op,
        message: format!("{what} {}: {e}", path.display()),
        retryable: false,
    }
}

fn volume_failed(op: DriverOp, e: &VolumeError) -> DriverError {
    match e {
        VolumeError::NoSnapshot { snapshot } => DriverError::NoSnapshot {
            op,
            snapshot: snapshot.clone(),
        },
        VolumeError::Damaged { snapshot } => DriverError::SnapshotDamaged {
            snapshot: snapshot.clone(),
        },
        VolumeError::NotFound { volume } => DriverError::NoVolume {
            op,
            volume: volume.clone(),
        },
        _ => DriverError::failed(op, e, false),
    }
}

fn vm_failed(op: DriverOp, e: &VmError) -> DriverError {
    match e {
        VmError::WorkloadFailed { message } => DriverError::WorkloadFailed {
            message: message.clone(),
        },
        VmError::NotRunning { .. } => DriverError::NotRunning { op },
        VmError::ExecFailed { message } => DriverError::Refused {
            op,
            message: message.clone(),
        },
        VmError::Timeout { .. } | VmError::Qmp { .. } | VmError::Channel { .. } => {
            DriverError::failed(op, e, true)
        }
        _ => DriverError::failed(op, e, false),
    }
}

fn output_stream(stream: aloft_guest_proto::DataStream) -> OutputStream {
    match stream {
        aloft_guest_proto::DataStream::Stdout => OutputStream::Stdout,
        aloft_guest_proto::DataStream::Stderr => OutputStream::Stderr,
    }
}

/// An interactive command in a guest ([`Driver::exec_session`]): `aloft-vm`'s session, whose
/// drop kills the command.
#[derive(Debug)]
struct VmSession(ExecSession);

impl DriverSession for VmSession {
    fn stdin(&mut self, data: &[u8]) -> Result<(), DriverError> {
        self.0
            .stdin(data)
            .map_err(|e| vm_failed(DriverOp::ExecSession, &e))
    }

    fn close_stdin(&mut self) -> Result<(), DriverError> {
        self.0
            .close_stdin()
            .map_err(|e| vm_failed(DriverOp::ExecSession, &e))
    }

    fn resize(&mut self, rows: u16, cols: u16) -> Result<(), DriverError> {
        self.0
            .resize(rows, cols)
            .map_err(|e| vm_failed(DriverOp::ExecSession, &e))
    }

    fn signal(&mut self, signal: i32) -> Result<(), DriverError> {
        self.0
            .signal(signal)
            .map_err(|e| vm_failed(DriverOp::ExecSession, &e))
    }

    fn recv(&mut self, timeout: Duration) -> Result<Option<SessionEvent>, DriverError> {
        Ok(
            match self
                .0
                .recv(timeout)
                .map_err(|e| vm_failed(DriverOp::ExecSession, &e))?
            {
                None => None,
                Some(ExecEvent::Output { stream, data }) => Some(SessionEvent::Output {
                    stream: output_stream(stream),
                    data,
                }),
                Some(ExecEvent::Exited(exit)) => Some(SessionEvent::Exited {
                    exit_code: exit.exit_code,
                    signal: exit.signal,
                }),
            },
        )
    }
}

fn image_failed(op: DriverOp, image: &str, e: &RegistryError) -> DriverError {
    match e {
        RegistryError::NotFound { .. }
        | RegistryError::Unauthorized { .. }
        | RegistryError::NoPlatform { .. }
        | RegistryError::WrongPlatform { .. }
        | RegistryError::Reference(_)
        | RegistryError::UnsupportedMediaType { .. }
        | RegistryError::ManifestTooLarge { .. } => {
            let DriverError::Failed { message, .. } = DriverError::failed(op, e, false) else {
                return DriverError::failed(op, e, false);
            };
            DriverError::Image {
                image: image.to_owned(),
                message,
            }
        }
        RegistryError::Unreachable { .. } | RegistryError::Truncated { .. } => {
            DriverError::failed(op, e, true)
        }
        _ => DriverError::failed(op, e, false),
    }
}

fn exit_info(exit: &VmExit, requested: bool) -> ExitInfo {
    let w = exit.workload.unwrap_or_default();
    ExitInfo {
        exit_code: w.exit_code,
        signal: w.signal,
        oom_killed: w.oom_killed,
        requested_stop: requested || w.requested_stop || exit.qemu_status == QemuStatus::Killed,
        failed: exit.failed.clone(),
        exited_at: now_ms(),
    }
}

fn private_dir(path: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}

fn remove_file(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl VmDriver {
    /// Opens the caches and directories.
    pub fn new(config: VmDriverConfig) -> Result<Self, DriverError> {
        for d in [
            config.data_dir.clone(),
            config.data_dir.join("machines"),
            config.data_dir.join("disks"),
            config.cache_dir.clone(),
        ] {
            private_dir(&d).map_err(|e| io_failed(DriverOp::Residue, "create", &d, &e))?;
        }
        let puller = Puller::new(&config.cache_dir, config.registry.clone())
            .map_err(|e| DriverError::failed(DriverOp::PullImage, &e, false))?;
        let rootfs = RootfsStore::open(
            &config.cache_dir,
            config.rootfs_format,
            config.unpack_limits.clone(),
        )
        .map_err(|e| DriverError::failed(DriverOp::BuildBase, &e, false))?;
        let disks = WritableDisks::open(&config.cache_dir)
            .map_err(|e| DriverError::failed(DriverOp::CreateDisk, &e, false))?;
        let volumes = VolumeStore::open(&config.data_dir.join("volumes"))
            .map_err(|e| volume_failed(DriverOp::CreateVolume, &e))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DriverError::failed(DriverOp::PullImage, &e, false))?;
        let templates = if config.boot_templates {
            Some(
                Templates::new(config.cache_dir.join("templates"))
                    .map_err(|e| vm_failed(DriverOp::StartVm, &e))?,
            )
        } else {
            None
        };
        Ok(Self {
            templates,
            config,
            puller,
            rootfs,
            disks,
            volumes,
            rt,
            vms: Mutex::new(HashMap::new()),
            builds: (Mutex::new(0), Condvar::new()),
        })
    }

    fn build_slot(&self) -> BuildSlot<'_> {
        let (count, cond) = &self.builds;
        let mut n = count.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *n >= self.config.max_concurrent_builds.max(1) {
            n = cond.wait(n).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *n += 1;
        BuildSlot(&self.builds)
    }

    fn machine_dir(&self, id: &MachineId) -> PathBuf {
        self.config.data_dir.join("machines").join(id.as_str())
    }

    fn run_dir(&self, id: &MachineId) -> PathBuf {
        self.machine_dir(id).join("run")
    }

    fn disk_path(&self, id: &MachineId) -> PathBuf {
        self.config.data_dir.join("disks").join(format!("{id}.img"))
    }

    fn snapshot(&self, id: &MachineId) -> PathBuf {
        self.machine_dir(id).join("snapshot")
    }

    fn spec_path(&self, id: &MachineId) -> PathBuf {
        self.machine_dir(id).join("vm.json")
    }

    fn reference(&self, image: &str) -> Result<Reference, DriverError> {
        let parsed = match &self.config.default_registry {
            Some(reg) => Reference::parse_with_default_registry(image, reg),
            None => Reference::parse(image),
        };
        parsed.map_err(|e| DriverError::Image {
            image: image.to_owned(),
            message: e.to_string(),
        })
    }

    fn pull(&self, reference: &Reference, image: &str) -> Result<PulledImage, DriverError> {
        self.rt
            .block_on(self.puller.pull(reference, &Progress::none()))
            .map_err(|e| image_failed(DriverOp::PullImage, image, &e))
    }

    fn lock_vms(&self) -> std::sync::MutexGuard<'_, HashMap<MachineId, Arc<Vm>>> {
        self.vms.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The machine's VM handle: cached, or reattached from its run dir; `None` when it never ran.
    fn vm(&self, id: &MachineId) -> Option<Arc<Vm>> {
        if let Some(vm) = self.lock_vms().get(id) {
            return Some(vm.clone());
        }
        let run = self.run_dir(id);
        if !run.join("state.json").exists() {
            return None;
        }
        let vm = Arc::new(Vm::attach(&run).ok()?);
        self.lock_vms().insert(id.clone(), vm.clone());
        Some(vm)
    }

    fn running(vm: &Vm) -> bool {
        matches!(vm.wait_exit(Duration::ZERO), Err(VmError::Timeout { .. }))
    }

    /// Runs `copy` (a copy of volume `volume`'s disk) with machine `pause`'s VM paused, when it
    /// names one whose VM runs ([`Vm::paused`]), after asking its guest to write its page cache
    /// back ([`Vm::sync_guest`]); a VM that ended meanwhile writes nothing, and the copy runs all
    /// the same.
    fn quiesced(
        &self,
        volume: &VolumeId,
        pause: Option<&MachineId>,
        copy: &mut dyn FnMut() -> Result<(), VolumeError>,
    ) -> Result<(), VolumeError> {
        let Some((machine, vm)) = pause.and_then(|m| Some((m, self.vm(m)?))) else {
            return copy();
        };
        if !Self::running(&vm) {
            return copy();
        }
        // Data the guest has not written back yet (its page cache) would be missing from the
        // copy. Without the sync the copy is still crash-consistent, so a failure only warns.
        match vm.sync_guest(Duration::from_secs(10)) {
            Ok(true) => {}
            Ok(false) => eprintln!(
                "volume {volume}: machine {machine}'s init is too old to sync its disks: the snapshot may miss recent writes"
            ),
            Err(e) => eprintln!(
                "volume {volume}: could not sync machine {machine}'s disks before the snapshot (it may miss recent writes): {}",
                aloft_api::error_chain(&e)
            ),
        }
        match vm.paused(&mut *copy) {
            Ok(copied) => copied,
            Err(e @ VmError::StillPaused { .. }) => Err(VolumeError::Pause {
                volume: volume.clone(),
                detail: format!(
                    "machine {machine} was paused for the copy and could not be continued: {}",
                    aloft_api::error_chain(&e)
                ),
            }),
            // It ended between the look and the pause: nothing writes the disk any more.
            Err(_) if !Self::running(&vm) => copy(),
            Err(e) => Err(VolumeError::Pause {
                volume: volume.clone(),
                detail: format!(
                    "could not pause machine {machine} for a consistent copy: {}",
                    aloft_api::error_chain(&e)
                ),
            }),
        }
    }

    fn forget(&self, id: &MachineId) {
        self.lock_vms().remove(id);
    }

    /// The machine's spec as written, jailed as the driver is configured now (a machine whose
    /// spec was written by a driver that did not jail is jailed from its next start on).
    fn read_spec(&self, id: &MachineId, op: DriverOp) -> Result<VmSpec, DriverError> {
        let path = self.spec_path(id);
        let bytes = fs::read(&path).map_err(|e| io_failed(op, "read", &path, &e))?;
        let mut spec: VmSpec =
            serde_json::from_slice(&bytes).map_err(|e| DriverError::failed(op, &e, false))?;
        spec.jail.clone_from(&self.config.jail);
        Ok(spec)
    }

    /// Kills QEMU processes that run from this machine's run dir but that no state.json names
    /// (a crash between spawning QEMU and recording it). Only ever our own QEMUs: the run dir is
    /// this driver's.
    fn kill_strays(&self, id: &MachineId) {
        for pid in aloft_vm::processes_mentioning(&self.run_dir(id)) {
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .arg(pid.to_string())
                .status();
        }
    }

    fn convert_ps(p: aloft_guest_proto::ProcessInfo) -> ProcessStat {
        ProcessStat {
            pid: u32::try_from(p.pid).unwrap_or(0),
            command: if p.cmdline.is_empty() {
                p.command
            } else {
                p.cmdline.join(" ")
            },
            cpu: p.cpu_ms,
            rss: p.rss_kib.saturating_mul(1024),
            rtime: p.cpu_ms,
            stime: 0,
            directory: p.directory,
            listen_sockets: p
                .listen_sockets
                .into_iter()
                .map(|s| ListenSocket {
                    proto: s.proto,
                    address: s.address,
                })
                .collect(),
        }
    }
}

impl Driver for VmDriver {
    fn pull_image(&self, image: &str) -> Result<ImageInfo, DriverError> {
        let reference = self.reference(image)?;
        let pulled = self.pull(&reference, image)?;
        let pinned = reference.with_digest(pulled.digest.clone());
        Ok(ImageInfo {
            requested: image.to_owned(),
            pinned: pinned.to_string(),
            registry: reference.registry().to_owned(),
            repository: reference.repository().to_owned(),
            tag: reference.tag().unwrap_or_default().to_owned(),
            digest: pulled.digest.to_string(),
            config: aloft_image::guest_image_config(&pulled.config).image,
        })
    }

    fn build_base(&self, image: &ImageInfo) -> Result<BaseInfo, DriverError> {
        let digest = image
            .digest
            .parse::<aloft_image::Digest>()
            .map_err(|e| DriverError::failed(DriverOp::BuildBase, &e, false))?;
        if let Some(base) = self.rootfs.get(&digest) {
            return Ok(BaseInfo {
                path: base.path,
                fstype: base.format.fstype().to_owned(),
            });
        }
        // Pinned to the digest, the pull is answered from the cache when the blobs are there.
        let pinned = Reference::parse(&image.pinned)
            .map_err(|e| DriverError::failed(DriverOp::BuildBase, &e, false))?;
        let pulled = self.pull(&pinned, &image.requested)?;
        let _slot = self.build_slot();
        let (base, _) = self
            .rootfs
            .build(&pulled)
            .map_err(|e| DriverError::failed(DriverOp::BuildBase, &e, false))?;
        Ok(BaseInfo {
            path: base.path,
            fstype: base.format.fstype().to_owned(),
        })
    }

    fn create_disk(&self, id: &MachineId, size_mib: u64) -> Result<PathBuf, DriverError> {
        let path = self.disk_path(id);
        self.disks
            .create(&path, size_mib)
            .map_err(|e| DriverError::failed(DriverOp::CreateDisk, &e, false))?;
        Ok(path)
    }

    fn remove_disk(&self, id: &MachineId) -> Result<(), DriverError> {
        let path = self.disk_path(id);
        remove_file(&path).map_err(|e| io_failed(DriverOp::RemoveDisk, "remove", &path, &e))
    }

    fn attach_network(&self, id: &MachineId, org: u32) -> Result<NetInfo, DriverError> {
        self.config
            .network
            .attach(id, org)
            .map_err(|e| DriverError::failed(DriverOp::AttachNetwork, &e, true))
    }

    fn detach_network(&self, id: &MachineId) -> Result<(), DriverError> {
        self.config
            .network
            .detach(id)
            .map_err(|e| DriverError::failed(DriverOp::DetachNetwork, &e, true))
    }

    fn write_spec(&self, id: &MachineId, spec: &LaunchSpec) -> Result<(), DriverError> {
        let dir = self.machine_dir(id);
        private_dir(&dir).map_err(|e| io_failed(DriverOp::WriteSpec, "create", &dir, &e))?;
        let mut vm = VmSpec::new(
            id.as_str(),
            self.config.kernel.clone(),
            self.config.initrd.clone(),
            self.run_dir(id),
        );
        vm.cmdline_extra.clone_from(&spec.kernel_args);
        vm.vcpus = spec.vcpus;
        vm.memory_mib = spec.memory_mib;
        vm.disks = vec![
            DiskSpec::raw(&spec.base.path, true),
            DiskSpec::raw(&spec.disk, false),
        ];
        // Disk `FIRST_VOLUME_DISK` on, as the run config's mounts expect them.
        vm.disks
            .extend(spec.volumes.iter().map(|v| DiskSpec::raw(&v.disk, false)));
        vm.net = match (&spec.net.tap, &spec.net.mac) {
            (Some(tap), Some(mac)) => Some(NetSpec {
                tap: tap.clone(),
                mac: mac.clone(),
                netns: spec.net.netns.clone(),
            }),
            _ => None,
        };
        vm.run_config = spec.run_config.clone();
        vm.accel = self.config.accel;
        vm.jail.clone_from(&self.config.jail);
        let json = serde_json::to_vec_pretty(&vm)
            .map_err(|e| DriverError::failed(DriverOp::WriteSpec, &e, false))?;
        let path = self.spec_path(id);
        let tmp = dir.join("vm.json.tmp");
        // The run config holds the workload's environment, app secrets included: owner-only
        // (in a 0700 machine directory).
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(&json)?;
                f.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| io_failed(DriverOp::WriteSpec, "write", &path, &e))
    }

    fn start_vm(&self, id: &MachineId) -> Result<(), DriverError> {
        if let Some(vm) = self.vm(id) {
            if Self::running(&vm) {
                return Ok(());
            }
            self.forget(id);
        }
        self.kill_strays(id);
        let spec = self.read_spec(id, DriverOp::StartVm)?;
        let vm = match &self.templates {
            Some(templates) => {
                let started = templates
                    .start(spec)
                    .map_err(|e| vm_failed(DriverOp::StartVm, &e))?;
                if started.made_template {
                    eprintln!("machine {id}: made a boot template for its shape");
                }
                if let Some(reason) = &started.cold_reason {
                    eprintln!("machine {id}: booted without a template: {reason}");
                }
                started.vm
            }
            None => Vm::start(spec).map_err(|e| vm_failed(DriverOp::StartVm, &e))?,
        };
        self.lock_vms().insert(id.clone(), Arc::new(vm));
        Ok(())
    }

    fn wait_started(&self, id: &MachineId, timeout: Duration) -> Result<(), DriverError> {
        let vm = self.vm(id).ok_or(DriverError::NotRunning {
            op: DriverOp::WaitStarted,
        })?;
        vm.wait_started(timeout)
            .map(|_| ())
            .map_err(|e| vm_failed(DriverOp::WaitStarted, &e))
    }

    fn stop_vm(
        &self,
        id: &MachineId,
        signal: Option<Signal>,
        timeout: Duration,
    ) -> Result<Option<ExitInfo>, DriverError> {
        let Some(vm) = self.vm(id) else {
            self.kill_strays(id);
            return Ok(None);
        };
        let exit = vm
            .stop(signal.map(Signal::number), timeout)
            .map_err(|e| vm_failed(DriverOp::StopVm, &e))?;
        self.forget(id);
        Ok(Some(exit_info(&exit, true)))
    }

    fn kill_vm(&self, id: &MachineId) -> Result<Option<ExitInfo>, DriverError> {
        let Some(vm) = self.vm(id) else {
            self.kill_strays(id);
            return Ok(None);
        };
        let exit = vm.kill().map_err(|e| vm_failed(DriverOp::KillVm, &e))?;
        self.forget(id);
        Ok(Some(exit_info(&exit, true)))
    }

    fn suspend_vm(&self, id: &MachineId) -> Result<(), DriverError> {
        let snapshot = self.snapshot(id);
        let vm = self.vm(id).ok_or(DriverError::NotRunning {
            op: DriverOp::SuspendVm,
        })?;
        if !Self::running(&vm) && snapshot.exists() {
            return Ok(());
        }
        vm.suspend(&snapshot)
            .map_err(|e| vm_failed(DriverOp::SuspendVm, &e))?;
        self.forget(id);
        Ok(())
    }

    fn resume_vm(&self, id: &MachineId) -> Result<(), DriverError> {
        if let Some(vm) = self.vm(id) {
            if Self::running(&vm) {
                return Ok(());
            }
            self.forget(id);
        }
        let spec = self.read_spec(id, DriverOp::ResumeVm)?;
        let vm = Vm::resume(spec, &self.snapshot(id)).map_err(|e| vm_failed(DriverOp::ResumeVm, &e))?;
        self.lock_vms().insert(id.clone(), Arc::new(vm));
        Ok(())
    }

    fn discard_snapshot(&self, id: &MachineId) -> Result<(), DriverError> {
        let path = self.snapshot(id);
        remove_file(&path).map_err(|e| io_failed(DriverOp::DiscardSnapshot, "remove", &path, &e))
    }

    fn vm_status(&self, id: &MachineId) -> Result<VmStatus, DriverError> {
        let Some(vm) = self.vm(id) else {
            return Ok(if self.snapshot(id).exists() {
                VmStatus::Suspended
            } else {
                VmStatus::Absent
            });
        };
        Ok(match vm.wait_exit(Duration::ZERO) {
            Err(VmError::Timeout { .. }) => VmStatus::Running,
            Ok(exit) if exit.qemu_status == QemuStatus::Suspended => VmStatus::Suspended,
            Ok(exit) => VmStatus::Exited(exit_info(&exit, false)),
            Err(e) => return Err(vm_failed(DriverOp::VmStatus, &e)),
        })
    }

    fn wait_exit(&self, id: &MachineId, timeout: Duration) -> Result<Option<ExitInfo>, DriverError> {
        let vm = self.vm(id).ok_or(DriverError::NotRunning {
            op: DriverOp::WaitExit,
        })?;
        match vm.wait_exit(timeout) {
            Ok(exit) => Ok(Some(exit_info(&exit, false))),
            Err(VmError::Timeout { .. }) => Ok(None),
            Err(e) => Err(vm_failed(DriverOp::WaitExit, &e)),
        }
    }

    fn signal(&self, id: &MachineId, signal: Signal) -> Result<(), DriverError> {
        let vm = self
            .vm(id)
            .ok_or(DriverError::NotRunning { op: DriverOp::Signal })?;
        vm.signal(signal.number())
            .map_err(|e| vm_failed(DriverOp::Signal, &e))
    }

    fn exec(&self, id: &MachineId, argv: &[String], timeout: Duration) -> Result<ExecResult, DriverError> {
        let vm = self
            .vm(id)
            .ok_or(DriverError::NotRunning { op: DriverOp::Exec })?;
        let out = vm
            .exec(
                aloft_guest_proto::ExecRequest {
                    argv: argv.to_vec(),
                    ..aloft_guest_proto::ExecRequest::default()
                },
                timeout,
            )
            .map_err(|e| vm_failed(DriverOp::Exec, &e))?;
        Ok(ExecResult {
            exit_code: out.exit.exit_code.unwrap_or(0),
            exit_signal: out.exit.signal.unwrap_or(0),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    fn exec_session(
        &self,
        id: &MachineId,
        req: &ConsoleRequest,
    ) -> Result<Box<dyn DriverSession>, DriverError> {
        let vm = self.vm(id).ok_or(DriverError::NotRunning {
            op: DriverOp::ExecSession,
        })?;
        let session = vm
            .exec_session(aloft_guest_proto::ExecRequest {
                argv: req.argv.clone(),
                env: req.env.clone(),
                user: req.user.clone(),
                stdin: true,
                tty: req.tty.map(|t| aloft_guest_proto::TtySize {
                    rows: t.rows,
                    cols: t.cols,
                }),
                ..aloft_guest_proto::ExecRequest::default()
            })
            .map_err(|e| vm_failed(DriverOp::ExecSession, &e))?;
        Ok(Box::new(VmSession(session)))
    }

    fn ps(&self, id: &MachineId) -> Result<Vec<ProcessStat>, DriverError> {
        let vm = self.vm(id).ok_or(DriverError::NotRunning { op: DriverOp::Ps })?;
        Ok(vm
            .ps()
            .map_err(|e| vm_failed(DriverOp::Ps, &e))?
            .into_iter()
            .map(Self::convert_ps)
            .collect())
    }

    /// To the machine's private (6PN) address, from the namespace its tap lives in (aloftd's
    /// `--machines-netns`, else the host's): the address the edge dials too.
    fn connect(
        &self,
        id: &MachineId,
        net: &NetInfo,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream, DriverError> {
        let ip: IpAddr = net.private_ip.parse().map_err(|_| DriverError::NoAddress {
            op: DriverOp::Connect,
        })?;
        self.vm(id).ok_or(DriverError::NotRunning {
            op: DriverOp::Connect,
        })?;
        let ns = net.netns.clone().map_or(Namespace::Current, Namespace::Path);
        dial(&ns, SocketAddr::new(ip, port), timeout)
    }

    fn logs(&self, id: &MachineId) -> Result<Option<LogReceiver>, DriverError> {
        let Some(vm) = self.vm(id) else {
            return Ok(None);
        };
        if !Self::running(&vm) {
            return Ok(None);
        }
        Ok(Some(LogReceiver::new(vm.logs(), |c: aloft_vm::LogChunk| {
            LogChunk {
                stream: output_stream(c.stream),
                data: c.data,
            }
        })))
    }

    fn remove_machine_dir(&self, id: &MachineId) -> Result<(), DriverError> {
        if let Some(vm) = self.vm(id) {
            let _ = vm.kill();
        }
        self.forget(id);
        self.kill_strays(id);
        let dir = self.machine_dir(id);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_failed(DriverOp::RemoveMachineDir, "remove", &dir, &e))
            }
            _ => Ok(()),
        }
    }

    fn residue(&self) -> Result<Vec<MachineId>, DriverError> {
        let mut out = Vec::new();
        let machines = self.config.data_dir.join("machines");
        let disks = self.config.data_dir.join("disks");
        for (dir, suffix) in [(&machines, ""), (&disks, ".img")] {
            let entries = fs::read_dir(dir).map_err(|e| io_failed(DriverOp::Residue, "list", dir, &e))?;
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str().and_then(|n| n.strip_suffix(suffix)) else {
                    continue;
                };
                if let Ok(id) = name.parse::<MachineId>()
                    && !out.contains(&id)
                {
                    out.push(id);
                }
            }
        }
        for id in self
            .config
            .network
            .attached()
            .map_err(|e| DriverError::failed(DriverOp::Residue, &e, false))?
        {
            if !out.contains(&id) {
                out.push(id);
            }
        }
        Ok(out)
    }

    fn create_volume(&self, id: &VolumeId, size_gb: u32) -> Result<(), DriverError> {
        self.volumes
            .create(id, size_gb)
            .map_err(|e| volume_failed(DriverOp::CreateVolume, &e))
    }

    fn volume_disk(&self, id: &VolumeId) -> Result<Option<VolumeDisk>, DriverError> {
        self.volumes
            .status(id)
            .map_err(|e| volume_failed(DriverOp::VolumeDisk, &e))
    }

    fn extend_volume(&self, id: &VolumeId, size_gb: u32) -> Result<(), DriverError> {
        self.volumes
            .extend(id, size_gb)
            .map_err(|e| volume_failed(DriverOp::ExtendVolume, &e))
    }

    fn grow_volume_fs(&self, id: &VolumeId) -> Result<bool, DriverError> {
        self.volumes
            .grow_fs(id)
            .map_err(|e| volume_failed(DriverOp::GrowVolumeFs, &e))
    }

    fn remove_volume(&self, id: &VolumeId) -> Result<(), DriverError> {
        self.volumes
            .remove(id)
            .map_err(|e| volume_failed(DriverOp::RemoveVolume, &e))
    }

    fn snapshot_volume(
        &self,
        id: &VolumeId,
        snapshot: &SnapshotId,
        pause: Option<&MachineId>,
    ) -> Result<SnapshotInfo, DriverError> {
        self.volumes
            .snapshot(id, snapshot, &mut |copy| self.quiesced(id, pause, copy))
            .map_err(|e| volume_failed(DriverOp::SnapshotVolume, &e))
    }

    fn volume_snapshot(&self, snapshot: &SnapshotId) -> Result<Option<SnapshotInfo>, DriverError> {
        self.volumes
            .snapshot_info(snapshot)
            .map_err(|e| volume_failed(DriverOp::VolumeSnapshot, &e))
    }

    fn delete_snapshot(&self, snapshot: &SnapshotId) -> Result<(), DriverError> {
        self.volumes
            .delete_snapshot(snapshot)
            .map_err(|e| volume_failed(DriverOp::DeleteSnapshot, &e))
    }

    fn restore_volume(&self, id: &VolumeId, snapshot: &SnapshotId, size_gb: u32) -> Result<(), DriverError> {
        self.volumes
            .restore(id, snapshot, size_gb)
            .map_err(|e| volume_failed(DriverOp::RestoreVolume, &e))
    }

    fn fork_volume(
        &self,
        id: &VolumeId,
        source: &VolumeId,
        size_gb: u32,
        pause: Option<&MachineId>,
    ) -> Result<(), DriverError> {
        self.volumes
            .fork(id, source, size_gb, &mut |copy| {
                self.quiesced(source, pause, copy)
            })
            .map_err(|e| volume_failed(DriverOp::ForkVolume, &e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use super::*;

    fn driver(dir: &Path) -> VmDriver {
        VmDriver::new(VmDriverConfig::new(
            dir.join("data"),
            dir.join("cache"),
            dir.join("vmlinux"),
            dir.join("initrd"),
        ))
        .unwrap()
    }

    #[test]
    fn connect_needs_an_address_then_a_running_vm() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        let id: MachineId = "3d8d413b29d089".parse().unwrap();
        let t = Duration::from_secs(1);
        // No network (`--network none`): no address, whatever the VM does.
        let e = d.connect(&id, &NetInfo::default(), 5432, t).unwrap_err();
        assert!(matches!(e, DriverError::NoAddress { .. }), "{e:?}");
        let net = NetInfo {
            private_ip: "127.0.0.1".into(),
            ..NetInfo::default()
        };
        let e = d.connect(&id, &net, 5432, t).unwrap_err();
        assert!(matches!(e, DriverError::NotRunning { .. }), "{e:?}");
    }
}
