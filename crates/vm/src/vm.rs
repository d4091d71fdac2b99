//! [`Vm`]: launching, reattaching to and controlling one QEMU `microvm`.

use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aloft_guest_proto::{
    BootRequest, ExecExit, ExecRequest, Frame, GuestStatus, ProcessInfo, WorkloadExit, WorkloadState,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::argv::{Boot, DiskFds, RamFile, qemu_argv};
use crate::cgroup::{self, Cgroup, Layout};
use crate::channel::{self, LogChunk, RawExit, Shared};
use crate::console;
use crate::error::VmError;
use crate::qmp::{Qmp, QmpError};
use crate::session::{ExecSession, VmLink};
use crate::spec::{Accel, RunPaths, VmSpec};
use crate::{initramfs, proc, sys};

/// How long QEMU gets to set itself up (sockets listening) after spawn.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Time for init to power off after the workload ended on a stop, before QEMU is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
/// QMP read/write timeout per command.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Snapshot and restore limit.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a start or a restore asks whether QEMU got there (its monitor answering, the
/// restored guest running): on every start's and resume's critical path, where a 5 ms pause
/// cost ~2.5 ms on average at each of the two waits; a failed connect or a `query-status` costs
/// microseconds.
const POLL: Duration = Duration::from_millis(1);
/// The name under which the snapshot fd is handed to QEMU.
const SNAPSHOT_FD_NAME: &str = "aloft-snap";

/// Output of [`Vm::exec`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// How the command ended.
    pub exit: ExecExit,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

/// How QEMU ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum QemuStatus {
    /// QEMU exited by itself (guest powered off, guest panic with `-no-reboot`, or a QEMU error).
    /// `code`/`signal` are known only when this process was QEMU's parent.
    #[expect(missing_docs, reason = "QEMU's exit code or killing signal")]
    Exited { code: Option<i32>, signal: Option<i32> },
    /// The driver killed it (stop timeout, [`Vm::kill`]).
    Killed,
    /// It quit after writing a snapshot ([`Vm::suspend`]).
    Suspended,
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmExit {
    /// The workload's end, from the channel or, if the channel missed it, the console log.
    pub workload: Option<WorkloadExit>,
    /// Init could not start the workload: its message.
    pub failed: Option<String>,
    /// How QEMU itself ended.
    pub qemu_status: QemuStatus,
}

/// What `attach` needs, persisted in `<run_dir>/state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmState {
    spec: VmSpec,
    accel: Accel,
    argv: Vec<String>,
    pid: i32,
    /// `/proc/PID/stat` start time, so a reused pid is never mistaken for our QEMU.
    start_time: u64,
    cgroup: Option<Cgroup>,
    exit: Option<VmExit>,
    /// The file its memory is in (a boot template's), if not anonymous memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ram: Option<RamFile>,
}

/// A running (or finished) VM.
///
/// Dropping a `Vm` only disconnects from it: QEMU keeps running (see [`Vm::attach`]). Once QEMU is
/// gone, the driver's cleanup (cgroup, sockets, pidfile) happens in whichever of [`Vm::wait_exit`],
/// [`Vm::stop`], [`Vm::kill`], [`Vm::suspend`], [`Vm::wait_started`] or [`Vm::attach`] notices it;
/// `console.log`, `qemu.log`, `initrd.cpio` and `state.json` stay in the run dir for the caller.
#[derive(Debug)]
pub struct Vm {
    spec: VmSpec,
    accel: Accel,
    argv: Vec<String>,
    paths: RunPaths,
    pid: i32,
    start_time: u64,
    cgroup: Option<Cgroup>,
    /// See [`VmState::ram`].
    ram: Option<RamFile>,
    shared: Arc<Shared>,
    next_chan: AtomicU32,
    /// Shared with exec sessions, which outlive the `&Vm` borrow.
    finished: Arc<Mutex<Option<VmExit>>>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shared.shut_down();
    }
}

/// Kills and cleans up what a failed launch left.
struct LaunchGuard {
    child: Option<Child>,
    cgroup: Option<Cgroup>,
    paths: RunPaths,
    armed: bool,
}

impl Drop for LaunchGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(cg) = &self.cgroup {
            cg.remove();
        }
        remove_runtime_files(&self.paths);
    }
}

fn remove_runtime_files(paths: &RunPaths) {
    for p in [paths.qmp(), paths.channel(), paths.pidfile()] {
        let _ = fs::remove_file(p);
    }
}

fn write_state(paths: &RunPaths, state: &VmState) -> Result<(), VmError> {
    let path = paths.state();
    let json = serde_json::to_vec_pretty(state).map_err(|source| VmError::State {
        path: path.clone(),
        source,
    })?;
    let tmp = paths.dir.join("state.json.tmp");
    fs::write(&tmp, json)
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(|e| VmError::io("write", &path, e))
}

fn read_state(run_dir: &Path) -> Result<VmState, VmError> {
    let path = RunPaths::new(run_dir).state();
    let bytes = fs::read(&path).map_err(|e| VmError::io("read vm state", &path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| VmError::State { path, source })
}

fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn qmp_err(op: &'static str) -> impl FnOnce(QmpError) -> VmError {
    move |source| VmError::Qmp { op, source }
}

/// Continues a VM [`Vm::paused`] paused, when finished or dropped.
struct Continue<'a> {
    vm: &'a Vm,
    qmp: Option<Qmp>,
}

impl Continue<'_> {
    /// Sends `cont`, on a fresh QMP connection if the first one fails.
    fn finish(mut self) -> Result<(), VmError> {
        self.send()
    }

    fn send(&mut self) -> Result<(), VmError> {
        let first = match self.qmp.take() {
            Some(mut q) => q.execute("cont", None).map(drop),
            None => return Ok(()),
        };
        let Err(first) = first else { return Ok(()) };
        match self.vm.qmp() {
            Ok(mut q) => q
                .execute("cont", None)
                .map(drop)
                .map_err(|source| VmError::StillPaused { source }),
            Err(_) => Err(VmError::StillPaused { source: first }),
        }
    }
}

impl Drop for Continue<'_> {
    fn drop(&mut self) {
        // Only reached with a connection left when `f` panicked: continue all the same.
        let _ = self.send();
    }
}

impl Vm {
    /// Validates `spec`, composes the machine's initramfs, launches QEMU detached (own session; in
    /// its cgroup and as the jail user when `spec.jail` is set), connects QMP and the channel, and
    /// returns. Does not wait for the workload: see [`Vm::wait_started`].
    ///
    /// Returns once QEMU's monitor answers, i.e. QEMU is set up and the guest is booting.
    pub fn start(spec: VmSpec) -> Result<Vm, VmError> {
        let spec = spec.with_absolute_paths()?;
        spec.validate()?;
        Self::launch(spec, Boot::Cold, None)
    }

    /// [`Vm::start`] with its RAM in `ram` (a template being made).
    pub(crate) fn start_with_ram(spec: VmSpec, ram: &RamFile) -> Result<Vm, VmError> {
        Self::launch(spec, Boot::Cold, Some(ram))
    }

    /// A new QEMU from `snapshot` (written by [`Vm::suspend`] with the same spec), running again;
    /// then the guest's wall clock is set ([`Frame::SetTime`]). The same tap and MAC must be used.
    pub fn resume(spec: VmSpec, snapshot: &Path) -> Result<Vm, VmError> {
        let spec = spec.with_absolute_paths()?;
        spec.validate()?;
        if !snapshot.is_file() {
            return Err(VmError::SnapshotNotFound {
                path: snapshot.to_owned(),
            });
        }
        let vm = Self::restore(spec, snapshot, None)?;
        let _ = vm.shared.send(&Frame::SetTime {
            unix_nanos: now_unix_nanos(),
        });
        Ok(vm)
    }

    /// A new QEMU for `spec` running the guest of `snapshot` (a suspended machine's or a boot
    /// template's); killed again if the restore fails.
    pub(crate) fn restore(spec: VmSpec, snapshot: &Path, ram: Option<&RamFile>) -> Result<Vm, VmError> {
        let file = File::open(snapshot).map_err(|e| VmError::io("open snapshot", snapshot, e))?;
        let vm = Self::launch(spec, Boot::Incoming, ram)?;
        if let Err(e) = vm.restore_from(&file, ram.is_some()) {
            let _ = vm.kill();
            return Err(e);
        }
        Ok(vm)
    }

    /// Waits until init reports that it booted as a template and waits for
    /// [`Frame::Boot`] ([`GuestStatus::awaiting_boot`]). An init that reports anything else (one
    /// that predates templates reads its config and fails or starts) is a
    /// [`VmError::Template`] error, as is a QEMU that exits.
    pub(crate) fn wait_awaiting_boot(&self, timeout: Duration) -> Result<(), VmError> {
        self.wait_until(
            timeout,
            "wait for init to await its boot request",
            |g| match g.status.as_ref() {
                Some(s) if s.awaiting_boot => Some(Ok(())),
                Some(s) if s.workload != WorkloadState::Starting => Some(Err(VmError::Template {
                    message: format!(
                        "init did not wait for its boot request (protocol {}, workload {:?}): rebuild the initramfs (cargo xtask guest)",
                        s.protocol, s.workload
                    ),
                })),
                _ => None,
            },
            || {
                Err(VmError::Template {
                    message: format!("qemu exited before init was ready: {}", self.console_facts().tail),
                })
            },
        )
    }

    /// Waits on the guest's status until `decide` decides, QEMU is gone (then `gone` does), or
    /// `timeout` passes ([`VmError::Timeout`] naming `op`, with the console's last lines).
    fn wait_until<T>(
        &self,
        timeout: Duration,
        op: &'static str,
        mut decide: impl FnMut(&channel::Inner) -> Option<Result<T, VmError>>,
        gone: impl FnOnce() -> Result<T, VmError>,
    ) -> Result<T, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(decided) = decide(&self.shared.lock()) {
                return decided;
            }
            if self.finished_exit().is_some() || !self.is_alive() || self.shared.lock().qemu_exit.is_some() {
                return gone();
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VmError::Timeout {
                    op,
                    after: timeout,
                    hint: self.console_facts().tail,
                });
            }
            let g = self.shared.lock();
            drop(
                self.shared
                    .wait(g, (deadline - now).min(Duration::from_millis(50))),
            );
        }
    }

    /// Sends a restored template its machine's boot request.
    pub(crate) fn send_boot(&self, req: BootRequest) -> Result<(), VmError> {
        self.send(&Frame::Boot(Box::new(req)))
    }

    /// Loads `file` into this new QEMU; with `ignore_shared`, a snapshot that left its memory in
    /// a file (a template's).
    fn restore_from(&self, file: &File, ignore_shared: bool) -> Result<(), VmError> {
        let mut q = self.qmp()?;
        if ignore_shared {
            set_ignore_shared(&mut q, true)?;
        }
        q.execute_with_fd("getfd", Some(json!({ "fdname": SNAPSHOT_FD_NAME })), file.as_fd())
            .map_err(qmp_err("pass the snapshot to qemu"))?;
        q.execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("fd:{SNAPSHOT_FD_NAME}") })),
        )
        .map_err(qmp_err("restore the snapshot"))?;
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let st = match q.execute("query-status", None) {
                Ok(v) => v,
                Err(_) if !self.is_alive() => {
                    return Err(VmError::Snapshot {
                        message: format!(
                            "qemu exited while restoring: {}",
                            fs::read_to_string(self.paths.qemu_log())
                                .unwrap_or_default()
                                .trim()
                        ),
                    });
                }
                Err(e) => return Err(qmp_err("query status")(e)),
            };
            match st["status"].as_str().unwrap_or("") {
                "running" => return Ok(()),
                "inmigrate" => {}
                // The snapshot was taken from a paused VM: run it.
                "paused" | "postmigrate" | "prelaunch" => {
                    q.execute("cont", None)
                        .map_err(qmp_err("resume the restored vm"))?;
                }
                other => {
                    return Err(VmError::Snapshot {
                        message: format!("restored vm is {other}"),
                    });
                }
            }
            if Instant::now() > deadline {
                return Err(VmError::Timeout {
                    op: "restore the snapshot",
                    after: MIGRATION_TIMEOUT,
                    hint: String::new(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    #[expect(clippy::needless_pass_by_value, reason = "the spec moves into the Vm's state")]
    fn launch(spec: VmSpec, boot: Boot, ram: Option<&RamFile>) -> Result<Vm, VmError> {
        let paths = RunPaths::new(&spec.run_dir);
        fs::create_dir_all(&paths.dir).map_err(|e| VmError::io("create run dir", &paths.dir, e))?;
        if let Ok(old) = read_state(&paths.dir)
            && old.exit.is_none()
            && proc::alive(old.pid, old.start_time)
        {
            return Err(VmError::AlreadyRunning {
                pid: old.pid,
                run_dir: paths.dir.clone(),
            });
        }
        remove_runtime_files(&paths);
        let _ = fs::remove_file(paths.qemu_log());
        let _ = fs::remove_file(paths.state());
        if boot == Boot::Cold {
            // Stale exit markers from an earlier run must not be read as this run's.
            let _ = fs::remove_file(paths.console());
        }
        let accel = crate::accel::resolve(&spec);
        // A restored guest runs from its snapshot's memory: the initramfs it booted from was
        // unpacked long ago and QEMU only needs the file to be there. Composing it again (the
        // base plus the run config, written and synced) would cost every resume time that grows
        // with the config (a machine's `files` are in it).
        if boot == Boot::Cold || !paths.initrd().is_file() {
            initramfs::compose(&spec.initrd, &spec.run_config, &paths.initrd())?;
        }
        // Jailed: open the disks here and hand QEMU descriptors (see `DiskFds`).
        let mut inherit = Vec::new();
        let mut disk_fds = Vec::new();
        if spec.jail.is_some() {
            for d in &spec.disks {
                let open = |write: bool| {
                    OpenOptions::new()
                        .read(true)
                        .write(write)
                        .open(&d.path)
                        .map(std::os::fd::OwnedFd::from)
                        .map_err(|e| VmError::io("open disk", &d.path, e))
                };
                let ro = open(false)?;
                let rw = if d.read_only { None } else { Some(open(true)?) };
                disk_fds.push(DiskFds {
                    read_only: ro.as_raw_fd(),
                    read_write: rw.as_ref().map(AsRawFd::as_raw_fd),
                });
                inherit.push(ro);
                inherit.extend(rw);
            }
        }
        let argv = qemu_argv(&spec, accel, boot, crate::argv::host_tsc_khz(), &disk_fds, ram);

        let mut guard = LaunchGuard {
            child: None,
            cgroup: None,
            paths: paths.clone(),
            armed: true,
        };
        // The cgroups' `cgroup.procs`, opened: QEMU joins them before it runs a guest. One that
        // boots joins them itself between fork and exec. One that waits for its incoming stream
        // cannot run the guest before `restore_from`, so the driver moves it while it
        // initialises: a move waits for an RCU grace period per hierarchy, 5–30 ms here, which
        // would otherwise be on every resume's and template start's path. What QEMU allocated
        // before the move (~6 MiB of its start-up, measured) stays charged to our cgroup; the
        // guest's memory, loaded after it, is the machine's.
        let mut join = Vec::new();
        let mut join_later = Vec::new();
        if let Some(jail) = &spec.jail {
            let l = cgroup::limits(spec.memory_mib, spec.vcpus, accel);
            let cg = Cgroup::create(cgroup::plan(
                &Layout::detect(),
                &jail.cgroup_parent,
                &spec.name,
                l,
            ))?;
            guard.cgroup = Some(cg.clone());
            for p in &cg.procs {
                let f = OpenOptions::new()
                    .write(true)
                    .open(p)
                    .map_err(|source| VmError::Cgroup {
                        path: p.clone(),
                        source,
                    })?;
                if boot == Boot::Incoming {
                    join_later.push((p.clone(), f));
                } else {
                    join.push(f);
                }
            }
        }
        let log = File::create(paths.qemu_log()).map_err(|e| VmError::io("create", paths.qemu_log(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| VmError::io("open", paths.qemu_log(), e))?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .current_dir("/");
        let netns = match spec.net.as_ref().and_then(|n| n.netns.as_ref()) {
            Some(path) => {
                Some(File::open(path).map_err(|e| VmError::io("open network namespace", path.clone(), e))?)
            }
            None => None,
        };
        sys::detach_into(&mut cmd, join, inherit, netns);
        let child = cmd.spawn().map_err(|source| VmError::Spawn {
            program: argv[0].clone(),
            source,
        })?;
        // Closes our copies of the disk and cgroup descriptors.
        drop(cmd);
        let pid = i32::try_from(child.id()).unwrap_or(-1);
        guard.child = Some(child);
        let start_time = proc::start_time(pid).unwrap_or(0);
        let joining = (!join_later.is_empty()).then(|| {
            std::thread::spawn(move || -> Result<(), VmError> {
                for (path, mut f) in join_later {
                    std::io::Write::write_all(&mut f, pid.to_string().as_bytes())
                        .map_err(|source| VmError::Cgroup { path, source })?;
                }
                Ok(())
            })
        });

        // QEMU is set up when its monitor answers.
        let deadline = Instant::now() + LAUNCH_TIMEOUT;
        loop {
            if let Some(c) = guard.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(VmError::Launch {
                    status: status.to_string(),
                    stderr: fs::read_to_string(paths.qemu_log())
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                });
            }
            if paths.qmp().exists() && Qmp::connect(&paths.qmp(), QMP_TIMEOUT).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(VmError::Timeout {
                    op: "start qemu",
                    after: LAUNCH_TIMEOUT,
                    hint: fs::read_to_string(paths.qemu_log())
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                });
            }
            std::thread::sleep(POLL);
        }
        // A failed move leaves QEMU outside its limits: the guard kills it.
        match joining.map(std::thread::JoinHandle::join) {
            None | Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => return Err(e),
            Some(Err(_)) => {
                return Err(VmError::Launch {
                    status: "the thread moving qemu into its cgroup panicked".into(),
                    stderr: String::new(),
                });
            }
        }

        let state = VmState {
            spec: spec.clone(),
            accel,
            argv: argv.clone(),
            pid,
            start_time,
            cgroup: guard.cgroup.clone(),
            exit: None,
            ram: ram.cloned(),
        };
        write_state(&paths, &state)?;
        let vm = Vm::from_state(state, Arc::new(Shared::default()));
        vm.spawn_reader()?;
        // Hand the child to a reaper thread: it records QEMU's exit status and keeps it from
        // lingering as a zombie. If this process dies, QEMU (own session) carries on.
        let Some(mut child) = guard.child.take() else {
            return Err(VmError::NotRunning {
                reason: "qemu handle lost".into(),
                console: String::new(),
            });
        };
        let shared = vm.shared.clone();
        let reaper = std::thread::Builder::new()
            .name("aloft-vm-reaper".into())
            .spawn(move || {
                let st = child.wait();
                let mut g = shared.lock();
                g.qemu_exit = Some(match st {
                    Ok(s) => RawExit {
                        code: s.code(),
                        signal: s.signal(),
                    },
                    Err(_) => RawExit::default(),
                });
                drop(g);
                shared.cond.notify_all();
            });
        if let Err(e) = reaper {
            let _ = sys::kill(pid, libc::SIGKILL);
            return Err(VmError::Channel {
                op: "start the reaper thread",
                source: e,
            });
        }
        guard.armed = false;
        drop(guard);
        if let Err(e) = vm.wait_connected(Duration::from_secs(5)) {
            let _ = vm.kill();
            return Err(e);
        }
        Ok(vm)
    }

    fn from_state(state: VmState, shared: Arc<Shared>) -> Vm {
        let paths = RunPaths::new(&state.spec.run_dir);
        // Channel ids: start somewhere else after every (re)attach, so replies meant for an
        // earlier host process never match a new request.
        let seed = u32::try_from(now_unix_nanos() % 0x3fff_ffff).unwrap_or(1) + 1;
        Vm {
            spec: state.spec,
            accel: state.accel,
            argv: state.argv,
            paths,
            pid: state.pid,
            start_time: state.start_time,
            cgroup: state.cgroup,
            ram: state.ram,
            shared,
            next_chan: AtomicU32::new(seed),
            finished: Arc::new(Mutex::new(state.exit)),
        }
    }

    fn spawn_reader(&self) -> Result<(), VmError> {
        let (pid, start) = (self.pid, self.start_time);
        channel::spawn_reader(self.paths.channel(), self.shared.clone(), move || {
            proc::alive(pid, start)
        })
        .map_err(|source| VmError::Channel {
            op: "start the reader thread",
            source,
        })
    }

    fn wait_connected(&self, timeout: Duration) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        while !g.connected {
            if g.qemu_exit.is_some() || Instant::now() > deadline {
                drop(g);
                let facts = self.console_facts();
                if facts.boot_failure {
                    return Err(VmError::GuestBootFailed { console: facts.tail });
                }
                return Err(VmError::Channel {
                    op: "connect",
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, "channel.sock did not accept"),
                });
            }
            g = self.shared.wait(g, Duration::from_millis(20));
        }
        Ok(())
    }

    /// Reattaches to the VM in `run_dir` after the controlling process restarted: reads
    /// `state.json`, checks the pid (and its start time) and reconnects the channel. A VM that is
    /// gone is returned too; [`Vm::wait_exit`] then gives its exit at once.
    pub fn attach(run_dir: &Path) -> Result<Vm, VmError> {
        let state = read_state(run_dir)?;
        let done = state.exit.is_some();
        let vm = Vm::from_state(state, Arc::new(Shared::default()));
        if done {
            return Ok(vm);
        }
        if !vm.is_alive() {
            vm.finish(QemuStatus::Exited {
                code: None,
                signal: None,
            });
            return Ok(vm);
        }
        vm.spawn_reader()?;
        vm.wait_connected(Duration::from_secs(5))?;
        Ok(vm)
    }

    fn is_alive(&self) -> bool {
        proc::alive(self.pid, self.start_time)
    }

    fn qmp(&self) -> Result<Qmp, VmError> {
        Qmp::connect(&self.paths.qmp(), QMP_TIMEOUT).map_err(qmp_err("connect"))
    }

    fn console_facts(&self) -> console::ConsoleFacts {
        console::scan_file(&self.paths.console())
    }

    fn not_running(&self) -> VmError {
        self.link().not_running()
    }

    /// What an exec session keeps of this VM.
    fn link(&self) -> VmLink {
        VmLink {
            shared: self.shared.clone(),
            pid: self.pid,
            start_time: self.start_time,
            console: self.paths.console(),
            finished: self.finished.clone(),
        }
    }

    fn finished_exit(&self) -> Option<VmExit> {
        self.finished
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records the end: exit from the channel or console, cgroup and sockets removed, state.json
    /// updated. Idempotent.
    fn finish(&self, qemu_status: QemuStatus) -> VmExit {
        let mut fin = self
            .finished
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(e) = &*fin {
            return e.clone();
        }
        let (status, raw) = {
            // QEMU is gone: let the reader drain what the guest sent last (final logs, the exit
            // status) until it sees the connection close.
            let deadline = Instant::now() + Duration::from_millis(500);
            let mut g = self.shared.lock();
            while g.connected && Instant::now() < deadline {
                g = self.shared.wait(g, Duration::from_millis(20));
            }
            (g.status.clone(), g.qemu_exit)
        };
        let facts = self.console_facts();
        let mut workload = None;
        let mut failed = None;
        match status.map(|s| s.workload) {
            Some(WorkloadState::Exited { exit }) => workload = Some(exit),
            Some(WorkloadState::Failed { message }) => failed = Some(message),
            _ => {}
        }
        if workload.is_none() && failed.is_none() {
            workload = facts.exit;
            failed = facts.error;
        }
        let qemu_status = match (qemu_status, raw) {
            (QemuStatus::Exited { .. }, Some(r)) => QemuStatus::Exited {
                code: r.code,
                signal: r.signal,
            },
            (s, _) => s,
        };
        let exit = VmExit {
            workload,
            failed,
            qemu_status,
        };
        self.shared.shut_down();
        if let Some(cg) = &self.cgroup {
            cg.remove();
        }
        remove_runtime_files(&self.paths);
        if let Some(ram) = self.ram.as_ref().filter(|r| !r.shared) {
            drop_cached_holes(&ram.path);
        }
        let state = VmState {
            spec: self.spec.clone(),
            accel: self.accel,
            argv: self.argv.clone(),
            pid: self.pid,
            start_time: self.start_time,
            cgroup: self.cgroup.clone(),
            exit: Some(exit.clone()),
            ram: self.ram.clone(),
        };
        let _ = write_state(&self.paths, &state);
        *fin = Some(exit.clone());
        exit
    }

    /// Waits until QEMU is gone, at most `timeout`; `true` when it is.
    fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        loop {
            if g.qemu_exit.is_some() {
                return true;
            }
            drop(g);
            if !self.is_alive() {
                // Give our reaper (if we are QEMU's parent) a moment to record the real status.
                let mut g = self.shared.lock();
                if g.qemu_exit.is_none() {
                    g = self.shared.wait(g, Duration::from_millis(50));
                }
                drop(g);
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self.shared.lock();
            g = self
                .shared
                .wait(g, (deadline - now).min(Duration::from_millis(50)));
        }
    }

    /// Waits until init reports the workload started and returns its pid (in the guest). A workload
    /// that already exited by the time the host heard of it gives its pid if the host saw it running,
    /// else 0. Errors: [`VmError::WorkloadFailed`] with init's message, [`VmError::GuestBootFailed`]
    /// when the kernel died, [`VmError::Timeout`] (the VM keeps running: stop or kill it).
    pub fn wait_started(&self, timeout: Duration) -> Result<i32, VmError> {
        self.wait_until(
            timeout,
            "wait for the workload to start",
            |g| match g.status.as_ref().map(|s| &s.workload) {
                Some(WorkloadState::Running { pid }) => Some(Ok(*pid)),
                Some(WorkloadState::Exited { .. }) => Some(Ok(g.last_pid.unwrap_or(0))),
                Some(WorkloadState::Failed { message }) => Some(Err(VmError::WorkloadFailed {
                    message: message.clone(),
                })),
                Some(WorkloadState::Starting) | None => None,
            },
            || {
                let exit = self.finish(QemuStatus::Exited {
                    code: None,
                    signal: None,
                });
                let facts = self.console_facts();
                if let Some(message) = exit.failed {
                    return Err(VmError::WorkloadFailed { message });
                }
                if exit.workload.is_some() {
                    return Ok(self.shared.lock().last_pid.unwrap_or(0));
                }
                if facts.boot_failure || !facts.hello {
                    return Err(VmError::GuestBootFailed { console: facts.tail });
                }
                Err(self.not_running())
            },
        )
    }

    /// The guest's last reported status (workload state, guest uptime), if any yet.
    pub fn status(&self) -> Option<GuestStatus> {
        self.shared.lock().status.clone()
    }

    fn next_chan(&self) -> u32 {
        loop {
            let c = self.next_chan.fetch_add(1, Ordering::Relaxed);
            if c != 0 {
                return c;
            }
        }
    }

    fn ensure_running(&self) -> Result<(), VmError> {
        if self.finished_exit().is_some() || !self.is_alive() {
            return Err(self.not_running());
        }
        Ok(())
    }

    fn send(&self, frame: &Frame) -> Result<(), VmError> {
        self.shared
            .send(frame)
            .map_err(|source| VmError::Channel { op: "send", source })
    }

    /// Runs a command in the guest and collects its output. On timeout the command is killed
    /// (SIGKILL) and [`VmError::Timeout`] returned. Init's refusal (e.g. missing program) is
    /// [`VmError::ExecFailed`]. The command's stdin is `/dev/null`: a request with `req.stdin` is
    /// refused (nothing here could feed it; [`Vm::exec_session`] does).
    pub fn exec(&self, req: ExecRequest, timeout: Duration) -> Result<ExecOutput, VmError> {
        if req.stdin {
            return Err(VmError::ExecFailed {
                message: "Vm::exec cannot feed stdin: use Vm::exec_session for a command with input".into(),
            });
        }
        self.ensure_running()?;
        let chan = self.next_chan();
        let rx = self.shared.register(chan);
        let res = self.exec_inner(chan, &rx, req, timeout);
        self.shared.unregister(chan);
        res
    }

    fn exec_inner(
        &self,
        chan: u32,
        rx: &mpsc::Receiver<Frame>,
        req: ExecRequest,
        timeout: Duration,
    ) -> Result<ExecOutput, VmError> {
        self.send(&Frame::Exec { chan, req })?;
        let mut out = ExecOutput::default();
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let _ = self.send(&Frame::Signal {
                    chan,
                    signal: libc::SIGKILL,
                });
                return Err(VmError::Timeout {
                    op: "run the exec'd command",
                    after: timeout,
                    hint: String::new(),
                });
            }
            match rx.recv_timeout((deadline - now).min(Duration::from_millis(100))) {
                Ok(Frame::ExecOutput { stream, data, .. }) => match stream {
                    aloft_guest_proto::DataStream::Stdout => out.stdout.extend_from_slice(&data),
                    aloft_guest_proto::DataStream::Stderr => out.stderr.extend_from_slice(&data),
                },
                Ok(Frame::ExecExited { exit, .. }) => {
                    out.exit = exit;
                    return Ok(out);
                }
                Ok(Frame::Error { message, .. }) => return Err(VmError::ExecFailed { message }),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if !self.is_alive() {
                        return Err(self.not_running());
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(self.not_running()),
            }
        }
    }

    /// Starts a command in the guest whose stdin (`req.stdin` must be true, or `req.tty` set) and
    /// output stream while it runs; returns once init started it. With `req.tty` the command runs on
    /// a pseudo-terminal of that size (all its output is stdout; `TERM` is `xterm` unless
    /// `req.env` sets it); an empty `req.argv` is refused by init (the caller picks the shell).
    ///
    /// Errors: init's refusal ("executable not found: /x") is [`VmError::ExecFailed`]; a terminal
    /// on a machine whose init predates them (started before the update) is
    /// [`VmError::ExecFailed`] too; the VM going away is [`VmError::NotRunning`], as for
    /// [`Vm::exec`]. The session holds at most 256 KiB of output the caller has not taken with
    /// [`ExecSession::recv`]; beyond that the command waits (see [`ExecSession`]).
    pub fn exec_session(&self, req: ExecRequest) -> Result<ExecSession, VmError> {
        if !req.stdin && req.tty.is_none() {
            return Err(VmError::ExecFailed {
                message: "an exec session needs req.stdin or req.tty: Vm::exec runs a command without input"
                    .into(),
            });
        }
        self.ensure_running()?;
        let protocol = self.guest_protocol()?;
        ExecSession::start(self.link(), self.next_chan(), req, protocol)
    }

    /// The channel protocol of the guest's init, from its status (which follows every hello: a
    /// host that just attached waits for it briefly).
    fn guest_protocol(&self) -> Result<u32, VmError> {
        let timeout = Duration::from_secs(5);
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        loop {
            if let Some(s) = &g.status {
                return Ok(s.protocol);
            }
            let now = Instant::now();
            if now >= deadline || g.qemu_exit.is_some() {
                drop(g);
                if !self.is_alive() {
                    return Err(self.not_running());
                }
                return Err(VmError::Timeout {
                    op: "hear from the guest's init",
                    after: timeout,
                    hint: String::new(),
                });
            }
            g = self
                .shared
                .wait(g, (deadline - now).min(Duration::from_millis(50)));
        }
    }

    /// Sends `signal` to the workload.
    pub fn signal(&self, signal: i32) -> Result<(), VmError> {
        self.ensure_running()?;
        self.send(&Frame::Signal { chan: 0, signal })
    }

    /// The guest's processes (with listening sockets).
    pub fn ps(&self) -> Result<Vec<ProcessInfo>, VmError> {
        self.ensure_running()?;
        self.request(
            |chan| Frame::ListProcesses { chan },
            "list the guest's processes",
            Duration::from_secs(10),
            |frame| match frame {
                Frame::Processes { processes, .. } => Some(processes),
                _ => None,
            },
        )
    }

    /// Asks the guest's init to write its page cache back to the disks ([`Frame::Sync`]), so that a
    /// copy of a disk taken next (a volume snapshot) holds what the guest has written, and waits up
    /// to `timeout` for the answer. `Ok(false)`, sending nothing, when the guest's init is too old
    /// to know the frame (protocol below 2: it would drop the channel).
    pub fn sync_guest(&self, timeout: Duration) -> Result<bool, VmError> {
        self.ensure_running()?;
        if self.guest_protocol()? < 2 {
            return Ok(false);
        }
        self.request(
            |chan| Frame::Sync { chan },
            "sync the guest's disks",
            timeout,
            |frame| matches!(frame, Frame::Synced { .. }).then_some(true),
        )
    }

    /// Sends the request `make` builds on a channel of its own and waits up to `timeout` (`op`
    /// names it in the error) for the frame `answer` accepts; init's [`Frame::Error`] on that
    /// channel is the request's failure, other frames on it are skipped.
    fn request<T>(
        &self,
        make: impl FnOnce(u32) -> Frame,
        op: &'static str,
        timeout: Duration,
        answer: impl Fn(Frame) -> Option<T>,
    ) -> Result<T, VmError> {
        let chan = self.next_chan();
        let rx = self.shared.register(chan);
        let res = (|| {
            self.send(&make(chan))?;
            let deadline = Instant::now() + timeout;
            loop {
                let now = Instant::now();
                if now >= deadline {
                    return Err(VmError::Timeout {
                        op,
                        after: timeout,
                        hint: String::new(),
                    });
                }
                match rx.recv_timeout((deadline - now).min(Duration::from_millis(100))) {
                    Ok(Frame::Error { message, .. }) => return Err(VmError::ExecFailed { message }),
                    Ok(frame) => {
                        if let Some(found) = answer(frame) {
                            return Ok(found);
                        }
                        if !self.is_alive() {
                            return Err(self.not_running());
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if !self.is_alive() {
                            return Err(self.not_running());
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Err(self.not_running()),
                }
            }
        })();
        self.shared.unregister(chan);
        res
    }

    /// Graceful stop: asks init ([`Frame::Stop`]: `signal`, or the run config's stop signal, then
    /// SIGKILL after `timeout`), waits `timeout` + [`STOP_GRACE`] for the guest to power off, then
    /// kills QEMU. Returns how it ended.
    pub fn stop(&self, signal: Option<i32>, timeout: Duration) -> Result<VmExit, VmError> {
        if let Some(e) = self.finished_exit() {
            return Ok(e);
        }
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        // A guest still booting gets the frame once its init opens the channel.
        let _ = self.send(&Frame::Stop { signal, timeout_ms });
        if self.wait_gone(timeout + STOP_GRACE) {
            return Ok(self.finish(QemuStatus::Exited {
                code: None,
                signal: None,
            }));
        }
        self.kill()
    }

    /// Kills QEMU (SIGKILL) and cleans up.
    pub fn kill(&self) -> Result<VmExit, VmError> {
        if let Some(e) = self.finished_exit() {
            return Ok(e);
        }
        if self.is_alive() {
            let _ = sys::kill(self.pid, libc::SIGKILL);
        }
        if !self.wait_gone(Duration::from_secs(10)) {
            return Err(VmError::Timeout {
                op: "kill qemu",
                after: Duration::from_secs(10),
                hint: String::new(),
            });
        }
        Ok(self.finish(QemuStatus::Killed))
    }

    /// Waits until the VM is gone (workload ended and guest powered off, or QEMU died).
    pub fn wait_exit(&self, timeout: Duration) -> Result<VmExit, VmError> {
        if let Some(e) = self.finished_exit() {
            return Ok(e);
        }
        if self.wait_gone(timeout) {
            return Ok(self.finish(QemuStatus::Exited {
                code: None,
                signal: None,
            }));
        }
        Err(VmError::Timeout {
            op: "wait for the vm to exit",
            after: timeout,
            hint: String::new(),
        })
    }

    /// Runs `f` with the VM paused: its vCPUs stopped (QMP `stop`), so the guest writes nothing
    /// to its disks, then continued (QMP `cont`) whatever `f` did, panics included. The guest
    /// sees only a pause (its clocks jump). What a consistent copy of a running VM's disk needs.
    ///
    /// `f` does not run when the VM cannot be paused (not running, QMP failing). When it ran and
    /// the VM cannot be continued (tried twice, on fresh QMP connections), the answer is
    /// [`VmError::StillPaused`]: `f`'s outcome is dropped and the VM is left paused.
    pub fn paused<T>(&self, f: impl FnOnce() -> T) -> Result<T, VmError> {
        self.ensure_running()?;
        let mut q = self.qmp()?;
        q.execute("stop", None).map_err(qmp_err("pause the vm"))?;
        // Continued on drop, so that a panic in `f` does not leave the guest frozen.
        let guard = Continue {
            vm: self,
            qmp: Some(q),
        };
        let out = f();
        guard.finish().map(|()| out)
    }

    /// Pauses the VM and writes its memory and device state to `snapshot` (created, mode 0600); QEMU
    /// then exits. On failure the VM is resumed and the partial file removed. Restart with
    /// [`Vm::resume`].
    ///
    /// Memory in a shared file (a boot template being made) is left out of the
    /// snapshot, the file holds it; a VM restored from a template (its memory a private mapping)
    /// writes all of it, like any other.
    pub fn suspend(&self, snapshot: &Path) -> Result<(), VmError> {
        self.ensure_running()?;
        let mut q = self.qmp()?;
        q.execute("stop", None).map_err(qmp_err("pause the vm"))?;
        // Off in a new QEMU, but a restore from a template turned it on.
        let res = match &self.ram {
            Some(ram) => set_ignore_shared(&mut q, ram.shared),
            None => Ok(()),
        }
        .and_then(|()| self.save_to(&mut q, snapshot));
        if let Err(e) = res {
            let _ = q.execute("cont", None);
            let _ = fs::remove_file(snapshot);
            return Err(e);
        }
        let _ = q.execute("quit", None);
        drop(q);
        if !self.wait_gone(Duration::from_secs(10)) {
            let _ = sys::kill(self.pid, libc::SIGKILL);
            self.wait_gone(Duration::from_secs(5));
        }
        self.finish(QemuStatus::Suspended);
        Ok(())
    }

    fn save_to(&self, q: &mut Qmp, snapshot: &Path) -> Result<(), VmError> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(snapshot)
            .map_err(|e| VmError::io("create snapshot", snapshot, e))?;
        // QEMU 7.2 rate-limits migration to 32 MiB/s by default: lift it, the target is a file.
        q.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 1u64 << 40 })),
        )
        .map_err(qmp_err("set migration parameters"))?;
        q.execute_with_fd("getfd", Some(json!({ "fdname": SNAPSHOT_FD_NAME })), file.as_fd())
            .map_err(qmp_err("pass the snapshot file to qemu"))?;
        drop(file);
        q.execute(
            "migrate",
            Some(json!({ "uri": format!("fd:{SNAPSHOT_FD_NAME}") })),
        )
        .map_err(qmp_err("start the snapshot"))?;
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let v = q
                .execute("query-migrate", None)
                .map_err(qmp_err("query the snapshot"))?;
            match v["status"].as_str().unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(VmError::Snapshot {
                        message: v["error-desc"].as_str().unwrap_or("migration failed").to_owned(),
                    });
                }
                _ => {}
            }
            if Instant::now() > deadline {
                let _ = q.execute("migrate_cancel", None);
                return Err(VmError::Timeout {
                    op: "write the snapshot",
                    after: MIGRATION_TIMEOUT,
                    hint: String::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Workload output: a receiver that first gets the buffered backlog (up to 1 MiB of the most
    /// recent chunks), then every new chunk as it arrives. Each call makes a new, independent
    /// receiver; it disconnects when the VM finishes or the `Vm` is dropped.
    pub fn logs(&self) -> mpsc::Receiver<LogChunk> {
        self.shared.subscribe_logs()
    }

    /// QEMU's pid (read `/proc/PID/status` for its RSS).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The serial console log (kernel messages and init's markers).
    pub fn console_log(&self) -> PathBuf {
        self.paths.console()
    }

    /// Whether this process still has the host↔guest channel connected.
    pub fn channel_connected(&self) -> bool {
        self.shared.lock().connected
    }

    /// The accelerator this VM runs with.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The spec it was started with.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// QEMU's command line.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }
}

/// Sets the migration capability that leaves shared file-backed RAM out of a snapshot; a restore
/// of such a snapshot must set it too.
fn set_ignore_shared(q: &mut Qmp, on: bool) -> Result<(), VmError> {
    q.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": on }] })),
    )
    .map(drop)
    .map_err(qmp_err("leave shared memory out of the snapshot"))
}

/// Drops from the page cache what it holds of `ram`'s holes, pages no VM still maps.
///
/// A VM restored from a boot template reads a page of the template's memory file that the
/// template never wrote (a hole) as zeros, and the kernel caches those zeros like file data: a
/// VM writing fresh memory (a copy on write from the hole) or suspending (which reads all of its
/// memory) leaves up to its whole memory size of cached zeros behind. They are free to drop, and
/// only the template's data is worth keeping cached for the next restore.
fn drop_cached_holes(ram: &Path) {
    let Ok(file) = File::open(ram) else { return };
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return;
    };
    for (offset, len) in sys::holes(&file, len).unwrap_or_default() {
        let _ = sys::drop_cache(&file, offset, len);
    }
}
