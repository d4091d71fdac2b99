//! [`FakeDriver`]: an in-memory, deterministic [`Driver`] for tests (the agent's own and the API
//! server's handler tests). Every call is recorded; failures can be injected at any operation,
//! once, a number of times or always, and a [`Killswitch`] can be tripped just before or just
//! after an operation acts, which "kills" the agent at that step boundary.
//!
//! Interactive sessions ([`Driver::exec_session`]) run a tiny deterministic **fake shell**, whatever
//! the argv (unless the program was made missing with [`FakeDriver::missing_program`]: then init's
//! refusal, `executable not found: <program>`). It reads its stdin line by line and answers each
//! complete line:
//!
//! | line | answer |
//! |---|---|
//! | `exit` / `exit N` | exits with code 0 / N (nothing follows) |
//! | `size` | `<rows> <cols>\n` of its terminal, `no tty\n` without one |
//! | `env NAME` | `NAME`'s value from the request's env and a newline (empty when unset) |
//! | `err TEXT` | `TEXT\n` on stderr (on stdout with a terminal, which merges them) |
//! | anything else | the line itself, echoed on stdout |
//!
//! Closing stdin exits it with code 0; any signal ends it with that signal; a resize changes the
//! size `size` reports. While it runs its VM must: when the VM stops, every call fails as for a
//! real guest. Each session is recorded in [`World::sessions`] (argv, terminal, stdin, exit,
//! and whether the session object was dropped: [`FakeSession::closed`]).
//!
//! **Ports**: a fake machine runs nothing, so [`Driver::connect`] to a port of a running fake
//! machine connects to that port of the host's loopback, `127.0.0.1:port` (whatever network the
//! machine was given). A test that listens there plays the machine's workload: this is what
//! makes `aloft proxy`'s API and CLI testable without VMs. A stopped machine's ports refuse as
//! a real one's do ([`DriverError::NotRunning`]); nothing listening is
//! [`DriverError::Unreachable`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aloft_api::{
    ConsoleRequest, ListenSocket, MachineId, ProcessStat, Signal, SnapshotId, TtySize, VolumeId, VolumeUsage,
};
use aloft_guest_proto::ImageConfig;
use aloft_net::Namespace;

use crate::agent::Killswitch;
use crate::driver::{
    BaseInfo, Driver, DriverError, DriverOp, DriverSession, ExecResult, ExitInfo, ImageInfo, LaunchSpec,
    LogChunk, LogReceiver, NetInfo, OutputStream, SessionEvent, SnapshotInfo, VmStatus, VolumeDisk, dial,
};
use crate::ids::now_ms;

/// A fake VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeVm {
    /// QEMU "runs"; `boot` counts boots of this machine.
    Running {
        /// Which boot of the machine this is (1 for the first).
        boot: u64,
    },
    /// It ended.
    Exited(ExitInfo),
    /// It suspended into its snapshot.
    Suspended,
}

/// A fake volume's disk: its size and its filesystem's (smaller while a growth is pending).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeVolume {
    /// The disk's size, GiB.
    pub size_gb: u32,
    /// The filesystem's size, GiB.
    pub fs_gb: u32,
    /// What it holds, as a number: 0 when made empty; tests set it
    /// ([`FakeDriver::write_volume`]) and see it carried by snapshots, restores and forks.
    pub data: u64,
}

/// A fake volume snapshot ([`World::volume_snapshots`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeSnapshot {
    /// The volume it was taken of.
    pub volume: VolumeId,
    /// The volume's disk as it was.
    pub disk: FakeVolume,
    /// Its digest as taken.
    pub digest: String,
    /// Its content no longer matches the digest ([`FakeDriver::damage_snapshot`]).
    pub damaged: bool,
}

/// An interactive session the fake ran ([`World::sessions`]), in the order they started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeSession {
    /// The machine.
    pub machine: MachineId,
    /// What was asked to run.
    pub argv: Vec<String>,
    /// Its terminal's size now (`None`: pipes).
    pub tty: Option<TtySize>,
    /// The extra environment asked for.
    pub env: Vec<(String, String)>,
    /// The user asked for.
    pub user: Option<String>,
    /// Everything written to its stdin.
    pub stdin: Vec<u8>,
    /// Its stdin was closed.
    pub stdin_closed: bool,
    /// How it ended, `(exit code, signal)`; `None` while it runs (or when it was killed by
    /// dropping the session).
    pub exit: Option<(Option<i32>, Option<i32>)>,
    /// The session object was dropped (the command killed if it still ran).
    pub closed: bool,
}

/// When a crash fault trips its switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPhase {
    /// Before the operation acts (the agent recorded the step as started, nothing happened).
    Before,
    /// After it acted (the world changed, the agent did not record it).
    After,
}

#[derive(Debug, Clone)]
enum FaultKind {
    Fail { retryable: bool },
    Crash { phase: CrashPhase, switch: Killswitch },
    WorkloadFailed,
}

#[derive(Debug, Clone)]
struct Fault {
    op: DriverOp,
    /// `None`: always.
    remaining: Option<u32>,
    kind: FaultKind,
}

/// Everything the fake holds; tests read it through [`FakeDriver::world`].
#[derive(Debug, Clone, Default)]
pub struct World {
    /// Images pulled.
    pub images: BTreeSet<String>,
    /// Bases built (by digest).
    pub bases: BTreeSet<String>,
    /// Writable disks, with how many times each was (re)made.
    pub disks: BTreeMap<MachineId, u64>,
    /// Networks.
    pub nets: BTreeMap<MachineId, NetInfo>,
    /// Written launch specs.
    pub specs: BTreeMap<MachineId, LaunchSpec>,
    /// VMs.
    pub vms: BTreeMap<MachineId, FakeVm>,
    /// Snapshots.
    pub snapshots: BTreeSet<MachineId>,
    /// Machine directories.
    pub dirs: BTreeSet<MachineId>,
    /// Every call, in order: (operation, machine or image).
    pub calls: Vec<(DriverOp, String)>,
    /// Boots per machine.
    pub boots: BTreeMap<MachineId, u64>,
    /// Volumes' disks.
    pub volumes: BTreeMap<VolumeId, FakeVolume>,
    /// Volume snapshots.
    pub volume_snapshots: BTreeMap<SnapshotId, FakeSnapshot>,
    /// Interactive sessions, oldest first.
    pub sessions: Vec<FakeSession>,
    /// Programs a session cannot start (`executable not found`).
    missing_programs: BTreeSet<String>,
    faults: Vec<Fault>,
    missing_images: BTreeSet<String>,
    exit_on_start: Option<ExitInfo>,
    next_slot: u32,
    blocked: BTreeSet<DriverOp>,
    /// The address networks attached from now on get (`net_config`), see `network_address`.
    net_address: Option<std::net::IpAddr>,
    /// What the workload listens on (`ps`), see `listen`; `None`: tcp `0.0.0.0:8080`.
    listen: Option<Vec<ListenSocket>>,
    /// Receivers handed out by `logs`, per machine; dropped when its VM stops running.
    log_subs: BTreeMap<MachineId, Vec<Sender<LogChunk>>>,
}

impl World {
    /// Every machine id the world holds anything for.
    pub fn residue(&self) -> BTreeSet<MachineId> {
        let mut out = BTreeSet::new();
        out.extend(self.disks.keys().cloned());
        out.extend(self.nets.keys().cloned());
        out.extend(self.specs.keys().cloned());
        out.extend(self.snapshots.iter().cloned());
        out.extend(self.dirs.iter().cloned());
        out.extend(
            self.vms
                .iter()
                .filter(|(_, v)| matches!(v, FakeVm::Running { .. }))
                .map(|(k, _)| k.clone()),
        );
        out
    }

    /// Whether machine `id` has a running VM.
    pub fn running(&self, id: &MachineId) -> bool {
        matches!(self.vms.get(id), Some(FakeVm::Running { .. }))
    }

    /// Disconnects the log receivers of VMs that no longer run (as a real VM's do when it ends).
    fn end_logs(&mut self) {
        let vms = &self.vms;
        self.log_subs
            .retain(|id, _| matches!(vms.get(id), Some(FakeVm::Running { .. })));
    }
}

/// The in-memory driver. Cheap to clone; clones share the world, so a test keeps one to inspect
/// and program it while the agent uses another (and a reopened agent finds the same world).
/// A running fake machine's ports are the host's loopback: [`Driver::connect`] to port `P`
/// reaches whatever listens on `127.0.0.1:P` (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct FakeDriver {
    world: Arc<(Mutex<World>, Condvar)>,
}

/// What the fake workload listens on unless told otherwise: tcp `0.0.0.0:8080`, the default
/// `internal_port` of fly.toml's services (so a deploy of a default config passes a release's
/// listen check).
fn default_listen() -> Vec<ListenSocket> {
    vec![ListenSocket {
        proto: "tcp".into(),
        address: "0.0.0.0:8080".into(),
    }]
}

fn fake_digest(image: &str) -> String {
    // FNV-1a, spread over 64 hex digits: stable and distinct per name.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in image.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("sha256:{h:016x}{h:016x}{h:016x}{h:016x}")
}

impl FakeDriver {
    /// An empty world: every image exists, every operation succeeds, workloads run until stopped.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, World> {
        self.world
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of the world now.
    pub fn world(&self) -> World {
        self.lock().clone()
    }

    fn fault(&self, op: DriverOp, remaining: Option<u32>, kind: FaultKind) {
        self.lock().faults.push(Fault { op, remaining, kind });
    }

    /// `op` fails the next `times` calls (retryable: the agent tries again).
    pub fn fail(&self, op: DriverOp, times: u32) {
        self.fault(op, Some(times), FaultKind::Fail { retryable: true });
    }

    /// `op` fails every time, not retryable.
    pub fn fail_always(&self, op: DriverOp) {
        self.fault(op, None, FaultKind::Fail { retryable: false });
    }

    /// The next call of `op` trips `switch` before or after acting.
    pub fn crash_at(&self, op: DriverOp, phase: CrashPhase, switch: &Killswitch) {
        self.fault(
            op,
            Some(1),
            FaultKind::Crash {
                phase,
                switch: switch.clone(),
            },
        );
    }

    /// The next `wait_started` reports that init could not start the workload.
    pub fn workload_fails_to_start(&self) {
        self.fault(DriverOp::WaitStarted, Some(1), FaultKind::WorkloadFailed);
    }

    /// Calls of `op` wait (after being recorded in `calls`) until [`FakeDriver::unblock`].
    pub fn block(&self, op: DriverOp) {
        self.lock().blocked.insert(op);
    }

    /// Lets blocked calls of `op` go on.
    pub fn unblock(&self, op: DriverOp) {
        self.lock().blocked.remove(&op);
        self.world.1.notify_all();
    }

    /// Waits until `op` was called for `what` at least `n` times (tests synchronise on it).
    pub fn wait_for_call(&self, op: DriverOp, what: &str, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |w| {
            w.calls.iter().filter(|(o, m)| *o == op && m == what).count() >= n
        })
    }

    /// Waits until `check` holds for the world (true), or `timeout` passed (false).
    pub fn wait_until(&self, timeout: Duration, check: impl Fn(&World) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut w = self.lock();
        loop {
            if check(&w) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let (g, _) = self
                .world
                .1
                .wait_timeout(w, (deadline - now).min(Duration::from_millis(10)))
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            w = g;
        }
    }

    /// Sessions that run `program` are refused as init refuses a missing one
    /// (`executable not found: <program>`); e.g. `/bin/bash`, for an image without bash.
    pub fn missing_program(&self, program: &str) {
        self.lock().missing_programs.insert(program.to_owned());
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Pulls of `image` fail as "not found".
    pub fn missing_image(&self, image: &str) {
        self.lock().missing_images.insert(image.to_owned());
    }

    /// Networks attached from now on have `addr` as their (only) address in `net_config`, the
    /// address the agent's health checks connect to: tests point it at `127.0.0.1` and listen
    /// there. `None`: no `net_config`, as before.
    pub fn network_address(&self, addr: Option<std::net::IpAddr>) {
        self.lock().net_address = addr;
    }

    /// The sockets the workloads' process listens on from now on (`ps`'s `listen_sockets`), as
    /// `(proto, address)`: e.g. `[("tcp", "127.0.0.1:3000")]`, or none at all. Until a test
    /// calls this, the fake workload listens on tcp `0.0.0.0:8080` (the default internal port; a
    /// release's health gate waits until something listens on each service's `internal_port`).
    pub fn listen(&self, sockets: &[(&str, &str)]) {
        self.lock().listen = Some(
            sockets
                .iter()
                .map(|(proto, address)| ListenSocket {
                    proto: (*proto).to_owned(),
                    address: (*address).to_owned(),
                })
                .collect(),
        );
    }

    /// Every VM started from now on exits at once with `exit` (a crash loop); `None`: they run.
    pub fn exit_on_start(&self, exit: Option<ExitInfo>) {
        self.lock().exit_on_start = exit;
    }

    /// The workload of a running VM writes `data` to `stream`: every receiver [`Driver::logs`]
    /// handed out for this VM gets it. Returns whether any receiver took it (`false` when the VM
    /// does not run or nobody captures its output).
    pub fn emit_log(&self, id: &MachineId, stream: OutputStream, data: &[u8]) -> bool {
        let mut w = self.lock();
        let Some(subs) = w.log_subs.get_mut(id) else {
            return false;
        };
        let chunk = LogChunk {
            stream,
            data: data.to_vec(),
        };
        subs.retain(|tx| tx.send(chunk.clone()).is_ok());
        !subs.is_empty()
    }

    /// Volume `id`'s content becomes `data` (as if a workload wrote to it); `false` when there
    /// is no such volume.
    pub fn write_volume(&self, id: &VolumeId, data: u64) -> bool {
        let mut w = self.lock();
        w.volumes.get_mut(id).map(|v| v.data = data).is_some()
    }

    /// Snapshot `id`'s content changes under it (a bad disk): its digest no longer matches, and
    /// a restore refuses it. `false` when there is no such snapshot.
    pub fn damage_snapshot(&self, id: &SnapshotId) -> bool {
        let mut w = self.lock();
        w.volume_snapshots.get_mut(id).map(|s| s.damaged = true).is_some()
    }

    /// A copy of volume `source` into `id` (restore or fork), grown to `size_gb`.
    fn copy_volume(w: &mut World, id: &VolumeId, disk: FakeVolume, size_gb: u32) {
        w.volumes.entry(id.clone()).or_insert(FakeVolume {
            size_gb: disk.size_gb.max(size_gb),
            fs_gb: disk.size_gb.max(size_gb),
            data: disk.data,
        });
    }

    /// Runs `f` with machine `pause`'s VM paused, if it runs, as the real driver does; the
    /// pause and the continue are recorded in `calls`.
    fn with_paused<T>(w: &mut World, pause: Option<&MachineId>, f: impl FnOnce(&mut World) -> T) -> T {
        let paused = pause.filter(|m| w.running(m));
        if let Some(m) = paused {
            w.calls.push((DriverOp::PauseVm, m.to_string()));
        }
        let out = f(w);
        if let Some(m) = paused {
            w.calls.push((DriverOp::ContinueVm, m.to_string()));
        }
        out
    }

    /// The workload of a running VM ends with `exit` (as if it crashed or finished).
    pub fn exit_workload(&self, id: &MachineId, exit: ExitInfo) {
        let mut w = self.lock();
        if w.running(id) {
            w.vms.insert(id.clone(), FakeVm::Exited(exit));
        }
        w.end_logs();
        drop(w);
        self.world.1.notify_all();
    }

    /// Records the call, applies faults, runs `f`, and applies an after-crash.
    fn act<T>(
        &self,
        op: DriverOp,
        what: &str,
        f: impl FnOnce(&mut World) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        let mut w = self.lock();
        w.calls.push((op, what.to_owned()));
        self.world.1.notify_all();
        // A test that fails while a call is blocked must not hang: give up after a while.
        let give_up = Instant::now() + Duration::from_secs(30);
        while w.blocked.contains(&op) {
            if Instant::now() >= give_up {
                return Err(DriverError::Failed {
                    op,
                    message: "blocked for too long".into(),
                    retryable: false,
                });
            }
            w = self
                .world
                .1
                .wait_timeout(w, Duration::from_millis(100))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        let mut after = None;
        if let Some(i) = w.faults.iter().position(|f| f.op == op) {
            let fault = w.faults[i].clone();
            match &mut w.faults[i].remaining {
                Some(1) => {
                    w.faults.remove(i);
                }
                Some(n) => *n -= 1,
                None => {}
            }
            match fault.kind {
                FaultKind::Fail { retryable } => {
                    return Err(DriverError::Failed {
                        op,
                        message: "injected failure".into(),
                        retryable,
                    });
                }
                FaultKind::WorkloadFailed => {
                    return Err(DriverError::WorkloadFailed {
                        message: "injected: executable not found".into(),
                    });
                }
                FaultKind::Crash {
                    phase: CrashPhase::Before,
                    switch,
                } => {
                    switch.trip();
                    return Err(DriverError::Failed {
                        op,
                        message: "injected crash".into(),
                        retryable: false,
                    });
                }
                FaultKind::Crash {
                    phase: CrashPhase::After,
                    switch,
                } => after = Some(switch),
            }
        }
        let out = f(&mut w);
        w.end_logs();
        drop(w);
        self.world.1.notify_all();
        if let Some(s) = after {
            s.trip();
        }
        out
    }

    fn stop_exit(signal: Option<i32>) -> ExitInfo {
        ExitInfo {
            exit_code: if signal.is_some() { None } else { Some(0) },
            signal,
            requested_stop: true,
            exited_at: now_ms(),
            ..ExitInfo::default()
        }
    }
}

impl Driver for FakeDriver {
    fn pull_image(&self, image: &str) -> Result<ImageInfo, DriverError> {
        self.act(DriverOp::PullImage, image, |w| {
            if w.missing_images.contains(image) {
                return Err(DriverError::Image {
                    image: image.to_owned(),
                    message: "not found in the registry".into(),
                });
            }
            w.images.insert(image.to_owned());
            let digest = fake_digest(image);
            let (repository, tag) = image.split_once(':').unwrap_or((image, "latest"));
            Ok(ImageInfo {
                requested: image.to_owned(),
                pinned: format!("fake.registry/{repository}@{digest}"),
                registry: "fake.registry".into(),
                repository: repository.to_owned(),
                tag: tag.to_owned(),
                digest,
                config: ImageConfig {
                    cmd: vec!["/bin/sh".into()],
                    ..ImageConfig::default()
                },
            })
        })
    }

    fn build_base(&self, image: &ImageInfo) -> Result<BaseInfo, DriverError> {
        self.act(DriverOp::BuildBase, &image.digest, |w| {
            w.bases.insert(image.digest.clone());
            Ok(BaseInfo {
                path: PathBuf::from(format!("/fake/rootfs/{}.erofs", image.digest)),
                fstype: "erofs".into(),
            })
        })
    }

    fn create_disk(&self, id: &MachineId, _size_mib: u64) -> Result<PathBuf, DriverError> {
        self.act(DriverOp::CreateDisk, id.as_str(), |w| {
            *w.disks.entry(id.clone()).or_insert(0) += 1;
            Ok(PathBuf::from(format!("/fake/machines/{id}/rw.img")))
        })
    }

    fn remove_disk(&self, id: &MachineId) -> Result<(), DriverError> {
        self.act(DriverOp::RemoveDisk, id.as_str(), |w| {
            w.disks.remove(id);
            Ok(())
        })
    }

    fn attach_network(&self, id: &MachineId, _org: u32) -> Result<NetInfo, DriverError> {
        self.act(DriverOp::AttachNetwork, id.as_str(), |w| {
            if let Some(n) = w.nets.get(id) {
                return Ok(n.clone());
            }
            w.next_slot += 1;
            let slot = w.next_slot;
            let n = NetInfo {
                tap: Some(format!("aloft-m{slot}")),
                mac: Some(format!("52:54:00:00:00:{:02x}", slot % 256)),
                private_ip: format!("fdaa:0:1:0:1:0:{slot:x}:2"),
                net_config: w.net_address.map(|addr| aloft_guest_proto::NetConfig {
                    addresses: vec![aloft_guest_proto::IpNet {
                        addr,
                        prefix_len: if addr.is_ipv4() { 32 } else { 128 },
                    }],
                    gateways: Vec::new(),
                    mtu: None,
                }),
                ..NetInfo::default()
            };
            w.nets.insert(id.clone(), n.clone());
            Ok(n)
        })
    }

    fn detach_network(&self, id: &MachineId) -> Result<(), DriverError> {
        self.act(DriverOp::DetachNetwork, id.as_str(), |w| {
            w.nets.remove(id);
            Ok(())
        })
    }

    fn write_spec(&self, id: &MachineId, spec: &LaunchSpec) -> Result<(), DriverError> {
        self.act(DriverOp::WriteSpec, id.as_str(), |w| {
            w.dirs.insert(id.clone());
            w.specs.insert(id.clone(), spec.clone());
            Ok(())
        })
    }

    fn start_vm(&self, id: &MachineId) -> Result<(), DriverError> {
        self.act(DriverOp::StartVm, id.as_str(), |w| {
            if !w.specs.contains_key(id) {
                return Err(DriverError::Failed {
                    op: DriverOp::StartVm,
                    message: "no spec written".into(),
                    retryable: false,
                });
            }
            if w.running(id) {
                return Ok(());
            }
            let boot = {
                let b = w.boots.entry(id.clone()).or_insert(0);
                *b += 1;
                *b
            };
            let vm = match &w.exit_on_start {
                Some(exit) => FakeVm::Exited(ExitInfo {
                    exited_at: now_ms(),
                    ..exit.clone()
                }),
                None => FakeVm::Running { boot },
            };
            w.vms.insert(id.clone(), vm);
            Ok(())
        })
    }

    fn wait_started(&self, id: &MachineId, _timeout: Duration) -> Result<(), DriverError> {
        self.act(DriverOp::WaitStarted, id.as_str(), |w| match w.vms.get(id) {
            Some(FakeVm::Running { .. }) => Ok(()),
            Some(FakeVm::Exited(e)) => match &e.failed {
                Some(message) => Err(DriverError::WorkloadFailed {
                    message: message.clone(),
                }),
                None => Ok(()),
            },
            _ => Err(DriverError::NotRunning {
                op: DriverOp::WaitStarted,
            }),
        })
    }

    fn stop_vm(
        &self,
        id: &MachineId,
        signal: Option<Signal>,
        _timeout: Duration,
    ) -> Result<Option<ExitInfo>, DriverError> {
        self.act(DriverOp::StopVm, id.as_str(), |w| match w.vms.get(id).cloned() {
            Some(FakeVm::Running { .. }) => {
                let exit = Self::stop_exit(signal.map(Signal::number));
                w.vms.insert(id.clone(), FakeVm::Exited(exit.clone()));
                Ok(Some(exit))
            }
            Some(FakeVm::Exited(e)) => Ok(Some(e)),
            _ => Ok(None),
        })
    }

    fn kill_vm(&self, id: &MachineId) -> Result<Option<ExitInfo>, DriverError> {
        self.act(DriverOp::KillVm, id.as_str(), |w| match w.vms.get(id).cloned() {
            Some(FakeVm::Running { .. }) => {
                let exit = Self::stop_exit(Some(9));
                w.vms.insert(id.clone(), FakeVm::Exited(exit.clone()));
                Ok(Some(exit))
            }
            Some(FakeVm::Exited(e)) => Ok(Some(e)),
            _ => Ok(None),
        })
    }

    fn suspend_vm(&self, id: &MachineId) -> Result<(), DriverError> {
        self.act(DriverOp::SuspendVm, id.as_str(), |w| match w.vms.get(id) {
            Some(FakeVm::Running { .. }) => {
                w.vms.insert(id.clone(), FakeVm::Suspended);
                w.snapshots.insert(id.clone());
                Ok(())
            }
            Some(FakeVm::Suspended) => Ok(()),
            _ => Err(DriverError::NotRunning {
                op: DriverOp::SuspendVm,
            }),
        })
    }

    fn resume_vm(&self, id: &MachineId) -> Result<(), DriverError> {
        self.act(DriverOp::ResumeVm, id.as_str(), |w| {
            if w.running(id) {
                return Ok(());
            }
            if !w.snapshots.contains(id) {
                return Err(DriverError::Failed {
                    op: DriverOp::ResumeVm,
                    message: "no snapshot".into(),
                    retryable: false,
                });
            }
            let boot = w.boots.get(id).copied().unwrap_or(0);
            w.vms.insert(id.clone(), FakeVm::Running { boot });
            Ok(())
        })
    }

    fn discard_snapshot(&self, id: &MachineId) -> Result<(), DriverError> {
        self.act(DriverOp::DiscardSnapshot, id.as_str(), |w| {
            w.snapshots.remove(id);
            if w.vms.get(id) == Some(&FakeVm::Suspended) {
                w.vms.remove(id);
            }
            Ok(())
        })
    }

    fn vm_status(&self, id: &MachineId) -> Result<VmStatus, DriverError> {
        self.act(DriverOp::VmStatus, id.as_str(), |w| {
            Ok(match w.vms.get(id) {
                Some(FakeVm::Running { .. }) => VmStatus::Running,
                Some(FakeVm::Exited(e)) => VmStatus::Exited(e.clone()),
                Some(FakeVm::Suspended) => VmStatus::Suspended,
                None => VmStatus::Absent,
            })
        })
    }

    fn wait_exit(&self, id: &MachineId, timeout: Duration) -> Result<Option<ExitInfo>, DriverError> {
        // Not recorded in `calls`: monitors poll it.
        let deadline = Instant::now() + timeout;
        let mut w = self.lock();
        loop {
            match w.vms.get(id) {
                Some(FakeVm::Running { .. }) => {}
                Some(FakeVm::Exited(e)) => return Ok(Some(e.clone())),
                _ => {
                    return Err(DriverError::NotRunning {
                        op: DriverOp::WaitExit,
                    });
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let (g, _) = self
                .world
                .1
                .wait_timeout(w, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            w = g;
        }
    }

    fn signal(&self, id: &MachineId, signal: Signal) -> Result<(), DriverError> {
        self.act(DriverOp::Signal, id.as_str(), |w| {
            if !w.running(id) {
                return Err(DriverError::NotRunning { op: DriverOp::Signal });
            }
            // The fake workload dies of the signals that end a shell.
            if matches!(signal, Signal::SIGKILL | Signal::SIGTERM | Signal::SIGINT) {
                w.vms.insert(
                    id.clone(),
                    FakeVm::Exited(ExitInfo {
                        signal: Some(signal.number()),
                        exited_at: now_ms(),
                        ..ExitInfo::default()
                    }),
                );
            }
            Ok(())
        })
    }

    fn exec(&self, id: &MachineId, argv: &[String], _timeout: Duration) -> Result<ExecResult, DriverError> {
        self.act(DriverOp::Exec, id.as_str(), |w| {
            if !w.running(id) {
                return Err(DriverError::NotRunning { op: DriverOp::Exec });
            }
            Ok(ExecResult {
                stdout: format!("{}\n", argv.join(" ")).into_bytes(),
                ..ExecResult::default()
            })
        })
    }

    fn exec_session(
        &self,
        id: &MachineId,
        req: &ConsoleRequest,
    ) -> Result<Box<dyn DriverSession>, DriverError> {
        let index = self.act(DriverOp::ExecSession, id.as_str(), |w| {
            if !w.running(id) {
                return Err(DriverError::NotRunning {
                    op: DriverOp::ExecSession,
                });
            }
            let program = req.argv.first().map(String::as_str).unwrap_or_default();
            if program.is_empty() || w.missing_programs.contains(program) {
                return Err(DriverError::Refused {
                    op: DriverOp::ExecSession,
                    message: format!("executable not found: {program}"),
                });
            }
            w.sessions.push(FakeSession {
                machine: id.clone(),
                argv: req.argv.clone(),
                tty: req.tty,
                env: req.env.clone(),
                user: req.user.clone(),
                stdin: Vec::new(),
                stdin_closed: false,
                exit: None,
                closed: false,
            });
            Ok(w.sessions.len() - 1)
        })?;
        Ok(Box::new(FakeShell {
            driver: self.clone(),
            index,
            machine: id.clone(),
            line: Vec::new(),
            queue: VecDeque::new(),
            ended: false,
            exit_delivered: false,
        }))
    }

    fn ps(&self, id: &MachineId) -> Result<Vec<ProcessStat>, DriverError> {
        self.act(DriverOp::Ps, id.as_str(), |w| {
            if !w.running(id) {
                return Err(DriverError::NotRunning { op: DriverOp::Ps });
            }
            Ok(vec![ProcessStat {
                pid: 1,
                command: "/bin/sh".into(),
                cpu: 0,
                rss: 0,
                rtime: 0,
                stime: 0,
                directory: "/".into(),
                listen_sockets: w.listen.clone().unwrap_or_else(default_listen),
            }])
        })
    }

    /// A fake machine runs nothing, so its ports are the host's loopback: `127.0.0.1:port`,
    /// whatever `net` says (see the type's doc).
    fn connect(
        &self,
        id: &MachineId,
        _net: &NetInfo,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream, DriverError> {
        self.act(DriverOp::Connect, id.as_str(), |w| {
            if w.running(id) {
                Ok(())
            } else {
                Err(DriverError::NotRunning {
                    op: DriverOp::Connect,
                })
            }
        })?;
        // Outside the world's lock: the dial may take up to `timeout`.
        dial(
            &Namespace::Current,
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            timeout,
        )
    }

    fn logs(&self, id: &MachineId) -> Result<Option<LogReceiver>, DriverError> {
        self.act(DriverOp::Logs, id.as_str(), |w| {
            if !w.running(id) {
                return Ok(None);
            }
            let (tx, rx) = std::sync::mpsc::channel();
            w.log_subs.entry(id.clone()).or_default().push(tx);
            Ok(Some(LogReceiver::new(rx, |c| c)))
        })
    }

    fn remove_machine_dir(&self, id: &MachineId) -> Result<(), DriverError> {
        self.act(DriverOp::RemoveMachineDir, id.as_str(), |w| {
            w.vms.remove(id);
            w.specs.remove(id);
            w.dirs.remove(id);
            Ok(())
        })
    }

    fn residue(&self) -> Result<Vec<MachineId>, DriverError> {
        self.act(DriverOp::Residue, "", |w| Ok(w.residue().into_iter().collect()))
    }

    fn create_volume(&self, id: &VolumeId, size_gb: u32) -> Result<(), DriverError> {
        self.act(DriverOp::CreateVolume, id.as_str(), |w| {
            w.volumes.entry(id.clone()).or_insert(FakeVolume {
                size_gb,
                fs_gb: size_gb,
                data: 0,
            });
            Ok(())
        })
    }

    fn volume_disk(&self, id: &VolumeId) -> Result<Option<VolumeDisk>, DriverError> {
        // Not recorded in `calls`: the agent reads it for every config that mounts a volume.
        let w = self.lock();
        Ok(w.volumes.get(id).map(|v| {
            // As a fresh filesystem: 4 KiB blocks, 8 MiB of them taken by its metadata.
            let blocks = u64::from(v.fs_gb) << 18;
            let free = blocks.saturating_sub(2048);
            VolumeDisk {
                path: PathBuf::from(format!("/fake/volumes/{id}.ext4")),
                size_bytes: u64::from(v.size_gb) << 30,
                usage: Some(VolumeUsage {
                    block_size: 4096,
                    blocks,
                    blocks_free: free,
                    blocks_avail: free,
                }),
                grow_pending: v.fs_gb < v.size_gb,
            }
        }))
    }

    fn extend_volume(&self, id: &VolumeId, size_gb: u32) -> Result<(), DriverError> {
        self.act(DriverOp::ExtendVolume, id.as_str(), |w| {
            let v = w.volumes.get_mut(id).ok_or_else(|| DriverError::Failed {
                op: DriverOp::ExtendVolume,
                message: format!("no volume {id}"),
                retryable: false,
            })?;
            v.size_gb = v.size_gb.max(size_gb);
            Ok(())
        })
    }

    fn grow_volume_fs(&self, id: &VolumeId) -> Result<bool, DriverError> {
        self.act(DriverOp::GrowVolumeFs, id.as_str(), |w| {
            // A VM with the disk open must never see its filesystem resized under it.
            let using = w.specs.iter().find(|(m, spec)| {
                spec.volumes.iter().any(|v| v.volume == *id)
                    && matches!(w.vms.get(*m), Some(FakeVm::Running { .. } | FakeVm::Suspended))
            });
            if let Some((m, _)) = using {
                return Err(DriverError::Failed {
                    op: DriverOp::GrowVolumeFs,
                    message: format!("machine {m} has volume {id} open: resizing it now would corrupt it"),
                    retryable: false,
                });
            }
            Ok(match w.volumes.get_mut(id) {
                Some(v) if v.fs_gb < v.size_gb => {
                    v.fs_gb = v.size_gb;
                    true
                }
                _ => false,
            })
        })
    }

    fn remove_volume(&self, id: &VolumeId) -> Result<(), DriverError> {
        self.act(DriverOp::RemoveVolume, id.as_str(), |w| {
            w.volumes.remove(id);
            Ok(())
        })
    }

    fn snapshot_volume(
        &self,
        id: &VolumeId,
        snapshot: &SnapshotId,
        pause: Option<&MachineId>,
    ) -> Result<SnapshotInfo, DriverError> {
        self.act(DriverOp::SnapshotVolume, id.as_str(), |w| {
            if let Some(s) = w.volume_snapshots.get(snapshot) {
                return Ok(fake_snapshot_info(s));
            }
            let disk = *w.volumes.get(id).ok_or_else(|| DriverError::NoVolume {
                op: DriverOp::SnapshotVolume,
                volume: id.clone(),
            })?;
            // Only the copy is made while the VM is paused; the digest is computed after.
            let copy = Self::with_paused(w, pause, |_| disk);
            let s = FakeSnapshot {
                volume: id.clone(),
                digest: fake_digest(&format!("{id}/{}", copy.data)),
                disk: copy,
                damaged: false,
            };
            let info = fake_snapshot_info(&s);
            w.volume_snapshots.insert(snapshot.clone(), s);
            Ok(info)
        })
    }

    fn volume_snapshot(&self, snapshot: &SnapshotId) -> Result<Option<SnapshotInfo>, DriverError> {
        // Not recorded in `calls`: a read.
        Ok(self.lock().volume_snapshots.get(snapshot).map(fake_snapshot_info))
    }

    fn delete_snapshot(&self, snapshot: &SnapshotId) -> Result<(), DriverError> {
        self.act(DriverOp::DeleteSnapshot, snapshot.as_str(), |w| {
            w.volume_snapshots.remove(snapshot);
            Ok(())
        })
    }

    fn restore_volume(&self, id: &VolumeId, snapshot: &SnapshotId, size_gb: u32) -> Result<(), DriverError> {
        self.act(DriverOp::RestoreVolume, id.as_str(), |w| {
            if w.volumes.contains_key(id) {
                return Ok(());
            }
            let s = w
                .volume_snapshots
                .get(snapshot)
                .ok_or_else(|| DriverError::NoSnapshot {
                    op: DriverOp::RestoreVolume,
                    snapshot: snapshot.clone(),
                })?;
            if s.damaged {
                return Err(DriverError::SnapshotDamaged {
                    snapshot: snapshot.clone(),
                });
            }
            let disk = s.disk;
            Self::copy_volume(w, id, disk, size_gb);
            Ok(())
        })
    }

    fn fork_volume(
        &self,
        id: &VolumeId,
        source: &VolumeId,
        size_gb: u32,
        pause: Option<&MachineId>,
    ) -> Result<(), DriverError> {
        self.act(DriverOp::ForkVolume, id.as_str(), |w| {
            if w.volumes.contains_key(id) {
                return Ok(());
            }
            let disk = *w.volumes.get(source).ok_or_else(|| DriverError::NoVolume {
                op: DriverOp::ForkVolume,
                volume: source.clone(),
            })?;
            let copy = Self::with_paused(w, pause, |_| disk);
            Self::copy_volume(w, id, copy, size_gb);
            Ok(())
        })
    }
}

fn fake_snapshot_info(s: &FakeSnapshot) -> SnapshotInfo {
    SnapshotInfo {
        volume: s.volume.clone(),
        // As sparse as a fresh filesystem: its metadata, 8 MiB.
        size: 8 << 20,
        volume_size: u64::from(s.disk.size_gb) << 30,
        digest: s.digest.clone(),
    }
}

/// The fake shell of a session (see the module doc).
struct FakeShell {
    driver: FakeDriver,
    /// Its record in `World::sessions`.
    index: usize,
    machine: MachineId,
    /// Stdin since the last newline.
    line: Vec<u8>,
    /// Events not yet received.
    queue: VecDeque<SessionEvent>,
    /// It exited (its exit is queued or delivered).
    ended: bool,
    /// `recv` handed out the exit.
    exit_delivered: bool,
}

impl FakeShell {
    /// The session's record, once its VM is checked: every call fails when it no longer runs.
    fn record<'a>(&self, w: &'a mut World) -> Result<&'a mut FakeSession, DriverError> {
        if !w.running(&self.machine) {
            return Err(DriverError::NotRunning {
                op: DriverOp::ExecSession,
            });
        }
        w.sessions.get_mut(self.index).ok_or_else(|| DriverError::Failed {
            op: DriverOp::ExecSession,
            message: "the fake session's record is gone".into(),
            retryable: false,
        })
    }

    fn exited(&self) -> DriverError {
        DriverError::Failed {
            op: DriverOp::ExecSession,
            message: "the command has exited".into(),
            retryable: false,
        }
    }

    fn end(&mut self, rec: &mut FakeSession, exit_code: Option<i32>, signal: Option<i32>) {
        self.ended = true;
        rec.exit = Some((exit_code, signal));
        self.queue.push_back(SessionEvent::Exited { exit_code, signal });
    }

    fn out(&mut self, stream: OutputStream, data: Vec<u8>) {
        self.queue.push_back(SessionEvent::Output { stream, data });
    }

    /// Answers one complete line (without its newline).
    fn answer(&mut self, rec: &mut FakeSession, line: &[u8]) {
        let text = String::from_utf8_lossy(line).into_owned();
        let (word, rest) = text.split_once(' ').unwrap_or((text.as_str(), ""));
        match word {
            "exit" => {
                let code = rest.trim().parse().unwrap_or(0);
                self.end(rec, Some(code), None);
            }
            "size" => {
                let answer = rec
                    .tty
                    .map_or_else(|| "no tty\n".to_owned(), |t| format!("{} {}\n", t.rows, t.cols));
                self.out(OutputStream::Stdout, answer.into_bytes());
            }
            "env" => {
                let value = rec
                    .env
                    .iter()
                    .rev()
                    .find(|(k, _)| k == rest.trim())
                    .map_or("", |(_, v)| v.as_str());
                self.out(OutputStream::Stdout, format!("{value}\n").into_bytes());
            }
            "err" => {
                let stream = if rec.tty.is_some() {
                    OutputStream::Stdout
                } else {
                    OutputStream::Stderr
                };
                self.out(stream, format!("{rest}\n").into_bytes());
            }
            _ => {
                let mut echo = line.to_vec();
                echo.push(b'\n');
                self.out(OutputStream::Stdout, echo);
            }
        }
    }
}

impl DriverSession for FakeShell {
    fn stdin(&mut self, data: &[u8]) -> Result<(), DriverError> {
        let driver = self.driver.clone();
        let mut w = driver.lock();
        let rec = self.record(&mut w)?;
        if self.ended || rec.stdin_closed {
            return Err(self.exited());
        }
        rec.stdin.extend_from_slice(data);
        for &b in data {
            if self.ended {
                break;
            }
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.answer(rec, &line);
            } else {
                self.line.push(b);
            }
        }
        drop(w);
        driver.world.1.notify_all();
        Ok(())
    }

    fn close_stdin(&mut self) -> Result<(), DriverError> {
        let driver = self.driver.clone();
        let mut w = driver.lock();
        let rec = self.record(&mut w)?;
        rec.stdin_closed = true;
        if !self.ended {
            self.end(rec, Some(0), None);
        }
        drop(w);
        driver.world.1.notify_all();
        Ok(())
    }

    fn resize(&mut self, rows: u16, cols: u16) -> Result<(), DriverError> {
        let driver = self.driver.clone();
        let mut w = driver.lock();
        let rec = self.record(&mut w)?;
        if let Some(t) = &mut rec.tty {
            *t = TtySize { rows, cols };
        }
        Ok(())
    }

    fn signal(&mut self, signal: i32) -> Result<(), DriverError> {
        let driver = self.driver.clone();
        let mut w = driver.lock();
        let rec = self.record(&mut w)?;
        if !self.ended {
            self.end(rec, None, Some(signal));
        }
        drop(w);
        driver.world.1.notify_all();
        Ok(())
    }

    fn recv(&mut self, timeout: Duration) -> Result<Option<SessionEvent>, DriverError> {
        if self.exit_delivered {
            return Err(self.exited());
        }
        let deadline = Instant::now() + timeout;
        let driver = self.driver.clone();
        let mut w = driver.lock();
        loop {
            self.record(&mut w)?;
            if let Some(event) = self.queue.pop_front() {
                self.exit_delivered = matches!(event, SessionEvent::Exited { .. });
                return Ok(Some(event));
            }
            // Nothing else makes output: wait only to notice the VM stopping.
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            w = driver
                .world
                .1
                .wait_timeout(w, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for FakeShell {
    fn drop(&mut self) {
        let mut w = self.driver.lock();
        if let Some(rec) = w.sessions.get_mut(self.index) {
            rec.closed = true;
        }
        drop(w);
        self.driver.world.1.notify_all();
    }
}
