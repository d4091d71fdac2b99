//! [`Agent`]: the lifecycle verbs, the executor that runs their steps (persisting each before it
//! acts), the monitors that apply restart policies, `wait`, and recovery on open.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aloft_api::{
    ConsoleRequest, EventSource, HostVolumeStatus, Machine, MachineConfig, MachineEvent, MachineEventRequest,
    MachineId, MachineState, MachineVersion, ProcessStat, SecretEnv, Signal, SnapshotId, StateError, Verb,
    VolumeId, VolumeSource, WaitState,
};
use aloft_secretbox::{Key, Keyring};

use crate::checks::Checks;
use crate::db::Db;
use crate::driver::{
    Driver, DriverError, DriverSession, ExecResult, ExitInfo, LaunchSpec, SnapshotInfo, VmStatus,
    VolumeAttachment,
};
use crate::error::AgentError;
use crate::ids::{new_machine_id, now_ms, ulid};
use crate::keys::{self, SecretsReseal};
use crate::logs::{self, AfterExit, LogFollow, LogLimits, LogStore};
use crate::model::{
    MachineRecord, OpKind, OpParams, OpRecord, OpStatus, Phase, Resources, Scratch, SealedSecrets, Step,
    StepRecord, exit_request,
};
use crate::plan::{self, ExitDecision, Identity, RestartBackoff};

/// The shell a console without a command runs, when the image has it ([`Agent::console`]).
pub(crate) const BASH: &str = "/bin/bash";
/// The shell it runs otherwise.
pub(crate) const SH: &str = "/bin/sh";
/// How long [`Agent::connect`] waits for a machine's port to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Stops an agent as if it were killed: once tripped, the agent writes nothing more and its threads
/// stop at their next step. Tests hand one to [`crate::FakeDriver`] to "crash" at a chosen step;
/// dropping an [`Agent`] trips its own.
#[derive(Debug, Clone, Default)]
pub struct Killswitch(Arc<AtomicBool>);

impl Killswitch {
    /// An untripped switch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Halts the agent using this switch.
    pub fn trip(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether it was tripped.
    pub fn is_tripped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// How an agent runs. [`AgentConfig::new`] has production defaults; tests shorten the waits.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The agent's SQLite database (created if missing).
    pub db_path: PathBuf,
    /// Attempts per step for failures the driver calls retryable.
    pub step_attempts: u32,
    /// Wait between attempts.
    pub retry_delay: Duration,
    /// How long a boot may take until the workload runs.
    pub boot_timeout: Duration,
    /// Stop timeout when neither the request nor `stop_config` gives one (Fly's 5 s).
    pub stop_timeout: Duration,
    /// Writable disk size when the config has no `rootfs.size_gb`, MiB.
    pub disk_mib: u64,
    /// Restart policy backoff.
    pub restart: RestartBackoff,
    /// How often monitors and long waits look at the halt flag.
    pub poll: Duration,
    /// Halts this agent when tripped (tests); `None`: a private one.
    pub killswitch: Option<Killswitch>,
    /// The host's memory and vCPUs: a machine asking for more is refused (422
    /// `insufficient_capacity`). Detected from `/proc/meminfo` and the CPU count by
    /// [`AgentConfig::new`].
    pub host_memory_mb: u32,
    /// See `host_memory_mb`.
    pub host_cpus: u32,
    /// A machine's current log file grows to this many bytes before it rotates (at least 4 KiB;
    /// default 1 MiB). Logs live in `<db dir>/logs/<machine id>/`.
    pub log_file_bytes: u64,
    /// Rotated log files kept per machine (default 2): a machine's log never takes more than
    /// `(log_files_kept + 1) × log_file_bytes` on disk.
    pub log_files_kept: usize,
    /// How often the scheduler looks for machines whose `config.schedule` is due.
    pub schedule_tick: Duration,
    /// The length of an hour for `config.schedule` (an hour; tests shorten it).
    pub schedule_hour: Duration,
    /// The keys the app secrets kept per machine version are sealed with: the current key seals,
    /// previous keys only open what they sealed before a rotation, and [`Agent::open`] seals
    /// that again with the current key. The ring's hint ([`Keyring::with_hint`]) ends the error
    /// of a value whose key is missing: say there where the operator adds a previous key.
    /// `None`: the key in [`AgentConfig::secrets_key_path`] alone (created on first use); a
    /// caller that gives a ring should make that file its current key (aloftd does).
    pub secrets_keys: Option<Arc<Keyring>>,
}

/// `MemTotal` of `/proc/meminfo`, MiB (`u32::MAX` when unreadable: no limit).
fn host_memory_mb() -> u32 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u32::MAX, |kib| u32::try_from(kib / 1024).unwrap_or(u32::MAX))
}

impl AgentConfig {
    /// Production defaults with the database at `db_path`.
    pub fn new(db_path: impl Into<PathBuf>) -> Self {
        Self {
            db_path: db_path.into(),
            step_attempts: 3,
            retry_delay: Duration::from_millis(500),
            boot_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(5),
            disk_mib: 1024,
            restart: RestartBackoff::default(),
            poll: Duration::from_millis(250),
            killswitch: None,
            host_memory_mb: host_memory_mb(),
            host_cpus: std::thread::available_parallelism()
                .map_or(u32::MAX, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
            log_file_bytes: 1024 * 1024,
            log_files_kept: 2,
            schedule_tick: Duration::from_secs(30),
            schedule_hour: Duration::from_secs(3600),
            secrets_keys: None,
        }
    }

    /// The agent's secrets key file: `agent-secrets.key` beside the database (mode 0600,
    /// created on first use).
    pub fn secrets_key_path(&self) -> PathBuf {
        match self.db_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.join("agent-secrets.key"),
            _ => PathBuf::from("agent-secrets.key"),
        }
    }
}

/// A machine to create.
#[derive(Debug, Clone, Default)]
pub struct CreateMachine {
    /// Its id; generated when `None`. A control plane that picks ids can retry a create safely:
    /// the second one fails with [`AgentError::AlreadyExists`].
    pub id: Option<MachineId>,
    /// The app.
    pub app: String,
    /// Its name; the id when `None`.
    pub name: Option<String>,
    /// Its region.
    pub region: String,
    /// The organization number (its private network).
    pub org: u32,
    /// The config.
    pub config: MachineConfig,
    /// Create without booting (state `created`).
    pub skip_launch: bool,
}

/// A stop's parameters (`POST …/stop`).
#[derive(Debug, Clone, Copy, Default)]
pub struct StopOptions {
    /// First signal; `stop_config.signal`, else the image's, else SIGINT.
    pub signal: Option<Signal>,
    /// Wait before killing; `stop_config.timeout`, else [`AgentConfig::stop_timeout`].
    pub timeout: Option<Duration>,
}

/// An update (`POST …/{id}`): the whole new config.
#[derive(Debug, Clone, Default)]
pub struct UpdateMachine {
    /// The new config (full replacement).
    pub config: MachineConfig,
    /// Leave it stopped afterwards.
    pub skip_launch: bool,
    /// Fail with [`AgentError::StaleVersion`] unless the machine is at this version.
    pub current_version: Option<String>,
}

/// What `wait` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitOutcome {
    /// The state that ended the wait.
    pub state: MachineState,
    /// The machine's version.
    pub version: String,
    /// The event that recorded the state (empty if none).
    pub event_id: String,
}

/// An operation the agent accepted. Its steps run in the background; [`OpHandle::wait`] blocks
/// until it finishes.
#[derive(Debug, Clone)]
pub struct OpHandle {
    inner: Arc<Inner>,
    /// The machine.
    pub machine: MachineId,
    /// The operation's id.
    pub op_id: String,
    /// What it does.
    pub kind: OpKind,
    /// The machine's state when it was accepted (`StartResponse.previous_state`).
    pub previous_state: MachineState,
}

impl OpHandle {
    /// Waits until the operation finished and returns the machine as it left it, or why it did
    /// not do what was asked ([`AgentError::OperationFailed`]), [`AgentError::WaitTimeout`], or
    /// [`AgentError::Halted`] if the agent stopped first.
    pub fn wait(&self, timeout: Duration) -> Result<MachineRecord, AgentError> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.inner.generation();
            if let Some(op) = self.inner.db.op(&self.op_id)? {
                match op.status {
                    OpStatus::Done => return self.inner.record(&self.machine),
                    OpStatus::Failed | OpStatus::Cancelled => {
                        let rec = self.inner.record(&self.machine)?;
                        return Err(AgentError::OperationFailed {
                            machine: self.machine.clone(),
                            operation: op.kind.as_str(),
                            state: rec.state,
                            message: op.error.unwrap_or_else(|| "cancelled".to_owned()),
                            user_error: op.scratch.user_error,
                        });
                    }
                    OpStatus::Running | OpStatus::Undoing => {}
                }
            }
            if self.inner.halted() {
                return Err(AgentError::Halted);
            }
            if !self.inner.is_live(&self.op_id) && self.inner.db.op(&self.op_id)?.is_none() {
                // A destroy accepted while another operation ran, which ended without starting it.
                let rec = self.inner.record(&self.machine)?;
                if rec.state == MachineState::Destroyed {
                    return Ok(rec);
                }
            }
            if Instant::now() >= deadline {
                let rec = self.inner.record(&self.machine)?;
                return Err(AgentError::WaitTimeout {
                    machine: self.machine.clone(),
                    wanted: format!("the end of {} operation {}", self.kind.as_str(), self.op_id),
                    timeout,
                    state: rec.state,
                });
            }
            self.inner.wait_change(seen, deadline);
        }
    }
}

/// Events and finished operations kept per machine (the API shows at most 50 events).
const HISTORY: usize = 200;

/// The per-host agent. See the crate docs.
///
/// Dropping it halts it as if it were killed (operations stop at their next step and resume when
/// the agent is opened again; VMs keep running); [`Agent::shutdown`] lets operations finish first.
#[derive(Debug)]
pub struct Agent {
    inner: Arc<Inner>,
    /// What re-sealing the kept secrets did when it opened.
    resealed: SecretsReseal,
    /// `<db>.lock`, held with `flock` while this agent lives: one agent per database.
    _lock: std::fs::File,
}

#[derive(Debug)]
struct Running {
    op_id: String,
    kind: OpKind,
    cancel: Arc<AtomicBool>,
    /// A forced destroy asked for while this operation ran: its op id and source.
    pending_destroy: Option<(String, EventSource)>,
}

/// Machines whose last change [`Live::touched`] remembers, at most; a full read of the host's
/// machines costs the catalog publisher ~7 ms per 1,000, once per this many distinct machines.
const MAX_TOUCHED: usize = 16_384;

#[derive(Debug, Default)]
struct Live {
    running: HashMap<MachineId, Running>,
    monitors: HashMap<MachineId, String>,
    threads: Vec<JoinHandle<()>>,
    generation: u64,
    /// The generation of each machine's last change (for the catalog publisher's partial reads).
    touched: HashMap<MachineId, u64>,
    /// The generation of the last change not tied to one machine.
    touched_all: u64,
    /// Machines whose volume is being copied (a snapshot, a fork), with how many copies: no
    /// operation of theirs is submitted meanwhile (a submission waits), so their VM neither
    /// starts nor ends under the copy. See [`Inner::copy_volume`].
    held: HashMap<MachineId, usize>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    db: Db,
    logs: LogStore,
    checks: Checks,
    driver: Arc<dyn Driver>,
    config: AgentConfig,
    /// Seals the app secrets kept per machine version (current: `<db dir>/agent-secrets.key`)
    /// and opens them (previous keys too).
    secrets_keys: Arc<Keyring>,
    halted: Arc<AtomicBool>,
    closing: AtomicBool,
    live: Mutex<Live>,
    changed: Condvar,
    /// One lock per volume: what changes a volume's disk or filesystem (create, restore, fork,
    /// extend, the growth before a boot, destroy) or copies it (snapshot, fork) holds it, so a
    /// filesystem is never resized twice at once, nor removed or grown while it is resized or
    /// copied. Taken before `live`, never while holding it; two at once in the order of their
    /// ids ([`Inner::with_volumes`]).
    volume_locks: Mutex<HashMap<VolumeId, Arc<Mutex<()>>>>,
}

/// Why a step did not complete.
enum StepError {
    /// The driver failed for good.
    Failed(DriverError),
    /// The agent's own bookkeeping failed (database, halt): stop executing.
    Agent(AgentError),
}

impl From<AgentError> for StepError {
    fn from(e: AgentError) -> Self {
        Self::Agent(e)
    }
}

/// What a successful step changes in the records.
enum Effect {
    None,
    Image(crate::driver::ImageInfo),
    Base(crate::driver::BaseInfo),
    Disk(PathBuf),
    Net(crate::driver::NetInfo),
    SpecWritten,
    Booted,
    Exited(Option<ExitInfo>),
    Suspended,
    SnapshotGone,
    DiskGone,
    NetGone,
}

/// How long a snapshot or fork waits for the operations in flight of the machine mounting its
/// volume (a start, a stop) to end before it gives up ([`AgentError::Busy`], 409).
const COPY_SETTLE: Duration = Duration::from_secs(60);

/// Machines held for a copy of their volume ([`Inner::hold`]); released on drop.
struct Hold<'a> {
    inner: &'a Inner,
    machines: Vec<MachineId>,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut live = self.inner.lock();
        for m in &self.machines {
            if let Some(n) = live.held.get_mut(m) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    live.held.remove(m);
                }
            }
        }
        drop(live);
        self.inner.changed.notify_all();
    }
}

/// Refuses (422) a volume of `size_gb` GiB made from `source` whose disk is `source_bytes`.
fn check_holds(id: &VolumeId, size_gb: u32, source_bytes: u64, source: &str) -> Result<(), AgentError> {
    if u64::from(size_gb) * crate::volumes::GIB >= source_bytes {
        return Ok(());
    }
    Err(AgentError::VolumeRequest {
        volume: id.clone(),
        reason: format!(
            "{source} holds {} GB: ask for at least that (size_gb)",
            source_bytes.div_ceil(crate::volumes::GIB)
        ),
    })
}

/// Refuses a volume size out of Fly's range (422).
fn check_volume_size(id: &VolumeId, size_gb: u32) -> Result<(), AgentError> {
    match aloft_api::volume_size_problem(size_gb) {
        None => Ok(()),
        Some(problem) => Err(AgentError::VolumeRequest {
            volume: id.clone(),
            reason: format!("size {problem}"),
        }),
    }
}

fn volume_failed(id: &VolumeId, source: DriverError) -> AgentError {
    match source {
        DriverError::NoVolume { volume, .. } => return AgentError::VolumeNotFound { volume },
        DriverError::NoSnapshot { snapshot, .. } => return AgentError::SnapshotNotFound { snapshot },
        DriverError::SnapshotDamaged { snapshot } => return AgentError::SnapshotDamaged { snapshot },
        _ => {}
    }
    AgentError::Volume {
        volume: id.clone(),
        source,
    }
}

/// Whether `config` mounts volume `id`.
fn mounts(config: &MachineConfig, id: &VolumeId) -> bool {
    config
        .mounts
        .iter()
        .any(|m| m.volume.as_deref().map(str::trim) == Some(id.as_str()))
}

/// Takes `<db>.lock` (`flock`, released by the kernel when the process dies).
fn lock_db(db: &std::path::Path) -> Result<std::fs::File, AgentError> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let io = |source| AgentError::Io {
        op: "lock",
        path: path.clone(),
        source,
    };
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(AgentError::Locked { path: db.to_owned() }),
        Err(e) => Err(io(e.into())),
    }
}

impl Agent {
    /// Opens (or creates) the agent's database and **recovers**: operations that were in flight
    /// resume from their first unfinished step (or continue their rollback); started machines are
    /// reattached and watched again, and an exit that happened meanwhile goes through the restart
    /// policy; anything the driver holds for machines that do not exist (or are destroyed) is
    /// removed.
    pub fn open(config: AgentConfig, driver: Arc<dyn Driver>) -> Result<Agent, AgentError> {
        let halted = config
            .killswitch
            .as_ref()
            .map_or_else(|| Arc::new(AtomicBool::new(false)), |k| k.0.clone());
        if let Some(parent) = config.db_path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|source| AgentError::Io {
                op: "create the agent's directory",
                path: parent.to_owned(),
                source,
            })?;
        }
        let lock = lock_db(&config.db_path)?;
        let db = Db::open(&config.db_path, halted.clone())?;
        let secrets_keys = match &config.secrets_keys {
            Some(keys) => Arc::clone(keys),
            None => Arc::new(Keyring::new(Key::load_or_create(&config.secrets_key_path())?)),
        };
        // Before anything runs: values a previous key sealed are sealed again with the current.
        let resealed = keys::reseal(&db, &secrets_keys)?;
        let log_root = match config.db_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.join("logs"),
            _ => PathBuf::from("logs"),
        };
        let logs = LogStore::new(
            log_root,
            LogLimits::new(config.log_file_bytes, config.log_files_kept),
        );
        let inner = Arc::new(Inner {
            db,
            logs,
            checks: Checks::default(),
            driver,
            config,
            secrets_keys,
            halted,
            closing: AtomicBool::new(false),
            live: Mutex::new(Live::default()),
            changed: Condvar::new(),
            volume_locks: Mutex::new(HashMap::new()),
        });
        let agent = Agent {
            inner,
            resealed,
            _lock: lock,
        };
        agent.inner.recover()?;
        {
            let mut live = agent.inner.lock();
            agent.inner.spawn(&mut live, |me| me.schedule_loop());
        }
        Ok(agent)
    }

    /// What [`Agent::open`] did to the secrets it keeps sealed with a key other than the current
    /// one (see [`AgentConfig::secrets_keys`]): counts, and the values no configured key opens.
    pub fn secrets_resealed(&self) -> &SecretsReseal {
        &self.resealed
    }

    /// Accepts a create: the machine is recorded (state `creating`) before anything is made.
    pub fn create(&self, req: CreateMachine) -> Result<OpHandle, AgentError> {
        self.inner.create(req, &SecretEnv::default())
    }

    /// [`Agent::create`] with the app's secrets: kept sealed for this version and injected as
    /// environment variables at each of its boots.
    pub fn create_with_secrets(
        &self,
        req: CreateMachine,
        secrets: &SecretEnv,
    ) -> Result<OpHandle, AgentError> {
        self.inner.create(req, secrets)
    }

    /// Starts a created, stopped, failed or suspended machine.
    pub fn start(&self, id: &MachineId) -> Result<OpHandle, AgentError> {
        self.inner
            .submit(id, Verb::Start, OpKind::Start, EventSource::User, |_, p| Ok(p))
    }

    /// Stops a started machine (or discards a suspended one's snapshot).
    pub fn stop(&self, id: &MachineId, opts: StopOptions) -> Result<OpHandle, AgentError> {
        self.inner
            .submit(id, Verb::Stop, OpKind::Stop, EventSource::User, |rec, mut p| {
                let (signal, timeout) = self.inner.stop_params(&rec.config, opts);
                p.signal = signal;
                p.timeout_ms = Some(timeout);
                Ok(p)
            })
    }

    /// Suspends a started machine (falls back to a stop when the snapshot fails).
    pub fn suspend(&self, id: &MachineId) -> Result<OpHandle, AgentError> {
        self.inner.submit(
            id,
            Verb::Suspend,
            OpKind::Suspend,
            EventSource::User,
            |rec, mut p| {
                let (signal, timeout) = self.inner.stop_params(&rec.config, StopOptions::default());
                p.signal = signal;
                p.timeout_ms = Some(timeout);
                Ok(p)
            },
        )
    }

    /// Stops and starts a started machine.
    pub fn restart(&self, id: &MachineId, opts: StopOptions) -> Result<OpHandle, AgentError> {
        self.inner.submit(
            id,
            Verb::Restart,
            OpKind::Restart,
            EventSource::User,
            |rec, mut p| {
                let (signal, timeout) = self.inner.stop_params(&rec.config, opts);
                p.signal = signal;
                p.timeout_ms = Some(timeout);
                Ok(p)
            },
        )
    }

    /// Gives the machine a new config and version; the old version becomes `replaced`. A started
    /// machine boots the new version (unless `skip_launch`); any other stays stopped.
    pub fn update(&self, id: &MachineId, req: &UpdateMachine) -> Result<OpHandle, AgentError> {
        self.update_with_secrets(id, req, &SecretEnv::default())
    }

    /// [`Agent::update`] with the app's secrets for the new version (the old version's go with
    /// it).
    pub fn update_with_secrets(
        &self,
        id: &MachineId,
        req: &UpdateMachine,
        secrets: &SecretEnv,
    ) -> Result<OpHandle, AgentError> {
        plan::validate(&req.config)?;
        plan::check_secret_refs(&req.config, &secrets.values)?;
        self.inner.check_capacity(&req.config)?;
        let skip = req.skip_launch;
        self.inner.submit_with(
            id,
            Verb::Update,
            OpKind::Update,
            EventSource::User,
            skip,
            |rec, mut p| {
                if let Some(expected) = &req.current_version
                    && *expected != rec.version
                {
                    return Err(AgentError::StaleVersion {
                        machine: rec.id.clone(),
                        expected: expected.clone(),
                        current: rec.version.clone(),
                    });
                }
                // Under the live lock, as a create's check: no two machines take one volume.
                self.inner.check_mount_on_host(&rec.id, &req.config)?;
                let (signal, timeout) = self.inner.stop_params(&rec.config, StopOptions::default());
                p.signal = signal;
                p.timeout_ms = Some(timeout);
                let version = ulid();
                p.secrets = self.inner.seal_secrets(&rec.id, &version, secrets)?;
                p.new_version = Some(version);
                p.new_config = Some(req.config.clone());
                Ok(p)
            },
        )
    }

    /// Destroys a machine; a started one (or one in the middle of an operation, which is
    /// cancelled at its next step) only with `force`.
    pub fn destroy(&self, id: &MachineId, force: bool) -> Result<OpHandle, AgentError> {
        self.inner.destroy(id, force, EventSource::User)
    }

    /// Changes `config.metadata` (`PUT`/`PATCH …/metadata`): null or empty values delete keys. No
    /// new version and no reboot: metadata is read by the platform, not the guest. A stale
    /// `machine_version` is [`AgentError::StaleVersion`] (412); refused while an operation runs
    /// (it may be installing another config) and on a destroyed machine.
    pub fn update_metadata(
        &self,
        id: &MachineId,
        req: &aloft_api::UpdateMetadataRequest,
    ) -> Result<MachineRecord, AgentError> {
        let live = self.inner.lock();
        let mut rec = self.inner.record(id)?;
        if rec.state.is_terminal() {
            return Err(AgentError::NotFound {
                machine: id.to_string(),
            });
        }
        if let Some(op_id) = &rec.op_id {
            return Err(AgentError::Busy {
                machine: id.clone(),
                operation: live.running.get(id).map_or("an", |r| r.kind.as_str()),
                op_id: op_id.clone(),
            });
        }
        if let Some(expected) = &req.machine_version
            && *expected != rec.version
        {
            return Err(AgentError::StaleVersion {
                machine: id.clone(),
                expected: expected.clone(),
                current: rec.version.clone(),
            });
        }
        req.apply(&mut rec.config.metadata);
        rec.updated_at = now_ms();
        self.inner.db.write(|tx| tx.update_machine(&rec))?;
        drop(live);
        self.inner.notify_machine(id);
        Ok(rec)
    }

    /// Sends `signal` to a started machine's workload (the restart policy sees the exit if it
    /// ends).
    pub fn signal(&self, id: &MachineId, signal: Signal) -> Result<(), AgentError> {
        self.inner.direct(id, Verb::Signal)?;
        self.inner
            .driver
            .signal(id, signal)
            .map_err(|source| AgentError::Driver {
                machine: id.clone(),
                source,
            })
    }

    /// `SIGKILL` to the workload (fly-go's kill).
    pub fn kill(&self, id: &MachineId) -> Result<(), AgentError> {
        self.signal(id, Signal::SIGKILL)
    }

    /// Runs a command in a started machine.
    pub fn exec(&self, id: &MachineId, argv: &[String], timeout: Duration) -> Result<ExecResult, AgentError> {
        if argv.is_empty() {
            return Err(AgentError::InvalidConfig {
                reason: "exec needs a command".into(),
            });
        }
        self.inner.direct(id, Verb::Exec)?;
        self.inner
            .driver
            .exec(id, argv, timeout)
            .map_err(|source| AgentError::Driver {
                machine: id.clone(),
                source,
            })
    }

    /// Starts an interactive command in a started machine (`aloft ssh console`), under the same
    /// rules as [`Agent::exec`] (412 unless started, 409 while an operation runs). An empty argv
    /// runs a shell: `/bin/bash` when the image has it, else `/bin/sh`, found by asking init
    /// for bash first and falling back to sh when init answers `executable not found` (no extra
    /// round trip when bash is there; one refused start when it is not). Either runs without
    /// `-l`, so the image's environment (`PATH`) stays as the workload has it.
    pub fn console(
        &self,
        id: &MachineId,
        req: &ConsoleRequest,
    ) -> Result<Box<dyn DriverSession>, AgentError> {
        self.inner.direct(id, Verb::Exec)?;
        let failed = |source| AgentError::Driver {
            machine: id.clone(),
            source,
        };
        if !req.argv.is_empty() {
            return self.inner.driver.exec_session(id, req).map_err(failed);
        }
        let shell = |program: &str| ConsoleRequest {
            argv: vec![program.to_owned()],
            ..req.clone()
        };
        match self.inner.driver.exec_session(id, &shell(BASH)) {
            Err(DriverError::Refused { message, .. }) if message.contains("executable not found") => {
                self.inner.driver.exec_session(id, &shell(SH)).map_err(failed)
            }
            other => other.map_err(failed),
        }
    }

    /// Opens a TCP connection from this host to `port` of a started machine (`aloft proxy`),
    /// on its private address and in its network's namespace, within [`CONNECT_TIMEOUT`];
    /// returned connected, in blocking mode. The same rules as [`Agent::exec`] (412 unless
    /// started, 409 while an operation runs); [`DriverError::NoAddress`] when the machine has no
    /// network, [`DriverError::Unreachable`] when nothing accepted the connection in time.
    pub fn connect(&self, id: &MachineId, port: u16) -> Result<std::net::TcpStream, AgentError> {
        let rec = self.inner.direct(id, Verb::Proxy)?;
        let net = rec.resources.net.unwrap_or_default();
        self.inner
            .driver
            .connect(id, &net, port, CONNECT_TIMEOUT)
            .map_err(|source| AgentError::Driver {
                machine: id.clone(),
                source,
            })
    }

    /// The processes of a started machine.
    pub fn ps(&self, id: &MachineId) -> Result<Vec<ProcessStat>, AgentError> {
        self.inner.direct(id, Verb::Ps)?;
        self.inner.driver.ps(id).map_err(|source| AgentError::Driver {
            machine: id.clone(),
            source,
        })
    }

    /// One machine's record, with its check statuses.
    pub fn get(&self, id: &MachineId) -> Result<MachineRecord, AgentError> {
        let mut rec = self.inner.record(id)?;
        rec.checks = self.inner.checks.statuses(id);
        Ok(rec)
    }

    /// One machine as the API shows it, with its 20 newest events and its check statuses.
    pub fn machine(&self, id: &MachineId) -> Result<Machine, AgentError> {
        let rec = self.get(id)?;
        Ok(rec.to_api(self.inner.db.events(id, 20)?))
    }

    /// Every machine on this host, destroyed ones included, oldest first, with check statuses.
    pub fn list(&self) -> Result<Vec<MachineRecord>, AgentError> {
        let mut machines = self.inner.db.machines()?;
        for m in &mut machines {
            m.checks = self.inner.checks.statuses(&m.id);
        }
        Ok(machines)
    }

    /// The machines of `app` on this host, destroyed ones included, oldest first, with check
    /// statuses (an indexed read: the cost does not grow with other apps' machines).
    pub fn list_app(&self, app: &str) -> Result<Vec<MachineRecord>, AgentError> {
        let mut machines = self.inner.db.machines_of(app)?;
        for m in &mut machines {
            m.checks = self.inner.checks.statuses(&m.id);
        }
        Ok(machines)
    }

    /// The newest `lines` lines of a machine's log (workload output and platform lines), oldest
    /// first, across rotated files. A destroyed machine has none.
    pub fn log_tail(&self, id: &MachineId, lines: usize) -> Result<Vec<aloft_api::LogEntry>, AgentError> {
        let rec = self.inner.record(id)?;
        if rec.state.is_terminal() {
            return Ok(Vec::new());
        }
        Ok(self.inner.logs.machine(id, &rec.region).tail(lines))
    }

    /// Follows a machine's log: lines written from now on (with `after_seq`, first those after it
    /// still on disk). The follower ends when the machine is destroyed.
    pub fn follow_logs(&self, id: &MachineId, after_seq: Option<u64>) -> Result<LogFollow, AgentError> {
        let rec = self.inner.record(id)?;
        if rec.state.is_terminal() {
            return Ok(LogFollow::ended(id, &rec.region));
        }
        Ok(self.inner.logs.machine(id, &rec.region).follow(after_seq))
    }

    /// A machine's events, newest first, at most `limit`.
    pub fn events(&self, id: &MachineId, limit: usize) -> Result<Vec<MachineEvent>, AgentError> {
        self.inner.record(id)?;
        self.inner.db.events(id, limit)
    }

    /// A machine's versions, newest first.
    pub fn versions(&self, id: &MachineId) -> Result<Vec<MachineVersion>, AgentError> {
        self.inner.record(id)?;
        let mut v: Vec<MachineVersion> = self
            .inner
            .db
            .versions(id)?
            .into_iter()
            .map(|(version, user_config, _)| MachineVersion { version, user_config })
            .collect();
        v.reverse();
        Ok(v)
    }

    /// A machine's operations, oldest first, with their steps.
    pub fn operations(&self, id: &MachineId) -> Result<Vec<(OpRecord, Vec<StepRecord>)>, AgentError> {
        self.inner
            .db
            .ops(id)?
            .into_iter()
            .map(|op| {
                let steps = self.inner.db.steps(&op.id)?;
                Ok((op, steps))
            })
            .collect()
    }

    /// Waits until the machine is in one of `states` (`GET …/wait`). With `version`, only that
    /// version counts (an old, replaced version is `replaced`, which satisfies `stopped`,
    /// `destroyed` and `settled`). With `from_event_id`, only states recorded by later events count.
    pub fn wait(
        &self,
        id: &MachineId,
        states: &[WaitState],
        version: Option<&str>,
        from_event_id: Option<&str>,
        timeout: Duration,
    ) -> Result<WaitOutcome, AgentError> {
        self.inner.wait(id, states, version, from_event_id, timeout)
    }

    /// Blocks until the machine's record satisfies `done` (checked at once and after every change
    /// the agent makes), for at most `timeout`; returns the record as it was last seen either way
    /// (the caller looks at it to tell which).
    pub fn wait_until(
        &self,
        id: &MachineId,
        timeout: Duration,
        done: impl Fn(&MachineRecord) -> bool,
    ) -> Result<MachineRecord, AgentError> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.inner.generation();
            let rec = self.inner.record(id)?;
            if done(&rec) || Instant::now() >= deadline {
                return Ok(rec);
            }
            if self.inner.halted() {
                return Err(AgentError::Halted);
            }
            self.inner.wait_change(seen, deadline);
        }
    }

    /// Makes volume `id`'s disk on this host: `size_gb` GiB of empty ext4, or, with a `source`,
    /// a copy of a snapshot kept here (its digest checked: [`AgentError::SnapshotDamaged`]) or
    /// of another volume's disk as it is now (its machine's VM paused for the copy, as for
    /// [`Agent::snapshot_volume`]), grown with its filesystem to `size_gb` when that is more
    /// (less than the source: [`AgentError::VolumeRequest`], 422). Idempotent: a disk already
    /// there is kept as it is, whatever its size or source (a retried create).
    pub fn create_volume(
        &self,
        id: &VolumeId,
        size_gb: u32,
        source: Option<&VolumeSource>,
    ) -> Result<(), AgentError> {
        check_volume_size(id, size_gb)?;
        let inner = &self.inner;
        let d = &*inner.driver;
        match source {
            None => inner.with_volume(id, || {
                d.create_volume(id, size_gb).map_err(|e| volume_failed(id, e))
            }),
            Some(VolumeSource::Snapshot(snapshot)) => inner.with_volume(id, || {
                if d.volume_disk(id).map_err(|e| volume_failed(id, e))?.is_some() {
                    return Ok(());
                }
                let info = d
                    .volume_snapshot(snapshot)
                    .map_err(|e| volume_failed(id, e))?
                    .ok_or_else(|| AgentError::SnapshotNotFound {
                        snapshot: snapshot.clone(),
                    })?;
                check_holds(id, size_gb, info.volume_size, &format!("snapshot {snapshot}"))?;
                d.restore_volume(id, snapshot, size_gb)
                    .map_err(|e| volume_failed(id, e))
            }),
            Some(VolumeSource::Volume(source)) => {
                if source == id {
                    return Err(AgentError::VolumeRequest {
                        volume: id.clone(),
                        reason: "a volume cannot be forked into itself: give the new volume another id"
                            .into(),
                    });
                }
                if inner
                    .with_volume(id, || d.volume_disk(id))
                    .map_err(|e| volume_failed(id, e))?
                    .is_some()
                {
                    return Ok(());
                }
                let disk = d
                    .volume_disk(source)
                    .map_err(|e| volume_failed(source, e))?
                    .ok_or_else(|| AgentError::VolumeNotFound {
                        volume: source.clone(),
                    })?;
                check_holds(id, size_gb, disk.size_bytes, &format!("volume {source}"))?;
                inner.copy_volume(source, Some(id), |pause| {
                    d.fork_volume(id, source, size_gb, pause)
                        .map_err(|e| volume_failed(id, e))
                })
            }
        }
    }

    /// Takes snapshot `snapshot` of volume `id`: a copy of its disk at one instant, kept on this
    /// host until [`Agent::delete_snapshot`] (it outlives the volume). When a VM of the machine
    /// mounting the volume runs, it is paused for the copy only (not for the digest), so the
    /// copy is crash-consistent; while the copy is made, that machine's operations wait (see
    /// [`Inner::copy_volume`]). Idempotent: a snapshot of that id already there is answered as
    /// it is. No such volume: [`AgentError::VolumeNotFound`] (404).
    pub fn snapshot_volume(&self, id: &VolumeId, snapshot: &SnapshotId) -> Result<SnapshotInfo, AgentError> {
        let d = &*self.inner.driver;
        let existing = || -> Result<Option<SnapshotInfo>, AgentError> {
            match d.volume_snapshot(snapshot).map_err(|e| volume_failed(id, e))? {
                Some(info) if info.volume != *id => Err(AgentError::SnapshotConflict {
                    snapshot: snapshot.clone(),
                    volume: info.volume,
                }),
                found => Ok(found),
            }
        };
        if let Some(info) = existing()? {
            return Ok(info);
        }
        if d.volume_disk(id).map_err(|e| volume_failed(id, e))?.is_none() {
            return Err(AgentError::VolumeNotFound { volume: id.clone() });
        }
        self.inner.copy_volume(id, None, |pause| {
            // Taken meanwhile by a retry that overtook this one: answered as it is.
            if let Some(info) = existing()? {
                return Ok(info);
            }
            d.snapshot_volume(id, snapshot, pause)
                .map_err(|e| volume_failed(id, e))
        })
    }

    /// Snapshot `snapshot` as this host keeps it; `None` when it has none of that id.
    pub fn volume_snapshot(&self, snapshot: &SnapshotId) -> Result<Option<SnapshotInfo>, AgentError> {
        self.inner
            .driver
            .volume_snapshot(snapshot)
            .map_err(|source| AgentError::Snapshot {
                snapshot: snapshot.clone(),
                source,
            })
    }

    /// Deletes snapshot `snapshot`'s copy. `Ok` when there is none.
    pub fn delete_snapshot(&self, snapshot: &SnapshotId) -> Result<(), AgentError> {
        self.inner
            .driver
            .delete_snapshot(snapshot)
            .map_err(|source| AgentError::Snapshot {
                snapshot: snapshot.clone(),
                source,
            })
    }

    /// Volume `id` as this host sees it: its disk's size, the machine (not destroyed) whose
    /// config mounts it, its filesystem's figures. [`AgentError::VolumeNotFound`] without a disk.
    pub fn volume(&self, id: &VolumeId) -> Result<HostVolumeStatus, AgentError> {
        let disk = self
            .inner
            .driver
            .volume_disk(id)
            .map_err(|source| volume_failed(id, source))?
            .ok_or_else(|| AgentError::VolumeNotFound { volume: id.clone() })?;
        let attached = self.inner.volume_users(id)?.into_iter().next();
        Ok(HostVolumeStatus {
            size_gb: u32::try_from(disk.size_bytes / crate::volumes::GIB).unwrap_or(u32::MAX),
            attached_machine_id: attached.map(|m| m.id),
            usage: disk.usage,
        })
    }

    /// Grows volume `id` to `size_gb` GiB; `true` when the machine mounting it must restart to
    /// see the new size (Fly's `needs_restart`).
    ///
    /// The disk grows at once. Its filesystem grows at once too when no machine could have the
    /// disk open: every machine mounting it is created, stopped or failed, with no operation in
    /// flight and no VM left. Otherwise growing it is left to that machine's next cold boot
    /// (the step that writes its launch spec, which runs with no VM and no snapshot), and the
    /// answer is `true`. That includes a **suspended** machine: its snapshot holds the mounted
    /// filesystem's state in guest memory, and resizing a filesystem the guest has mounted,
    /// from the host, would corrupt it; it resumes with the old size and grows when it next
    /// boots cold (a stop and start, or a resume that falls back to a cold boot).
    pub fn extend_volume(&self, id: &VolumeId, size_gb: u32) -> Result<bool, AgentError> {
        check_volume_size(id, size_gb)?;
        self.inner
            .with_volume(id, || self.inner.extend_volume(id, size_gb))
    }

    /// Deletes volume `id`'s disk and its data. [`AgentError::VolumeInUse`] (412) while a
    /// machine that is not destroyed mounts it; `Ok` when there is no disk.
    pub fn destroy_volume(&self, id: &VolumeId) -> Result<(), AgentError> {
        self.inner.with_volume(id, || {
            // Under the live lock: no create or update can take the volume between the check
            // and the removal.
            let _live = self.inner.lock();
            if let Some(m) = self.inner.volume_users(id)?.into_iter().next() {
                return Err(AgentError::VolumeInUse {
                    volume: id.clone(),
                    machine: m.id,
                });
            }
            self.inner
                .driver
                .remove_volume(id)
                .map_err(|source| volume_failed(id, source))
        })
    }

    /// Graceful shutdown: no new operations; those in flight get until `deadline` to finish (the
    /// rest resume on the next open); monitors stop; VMs keep running.
    pub fn shutdown(self, deadline: Duration) {
        self.inner.closing.store(true, Ordering::SeqCst);
        let end = Instant::now() + deadline;
        loop {
            let seen = self.inner.generation();
            if self.inner.lock().running.is_empty() || Instant::now() >= end {
                break;
            }
            self.inner.wait_change(seen, end);
        }
        // Drop halts and joins what is left.
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.inner.halted.store(true, Ordering::SeqCst);
        self.inner.checks.stop_all();
        self.inner.notify();
        let threads = std::mem::take(&mut self.inner.lock().threads);
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Agent {
    /// The agent's shared state, for the catalog publisher (`catalog.rs`).
    pub(crate) fn shared(&self) -> &Arc<Inner> {
        &self.inner
    }
}

/// What the catalog publisher (`catalog.rs`) reads.
impl Inner {
    /// Every machine record, destroyed ones included (without check statuses).
    pub(crate) fn all_machines(&self) -> Result<Vec<MachineRecord>, AgentError> {
        self.db.machines()
    }

    /// One machine's record, if it exists (without check statuses).
    pub(crate) fn machine_record(&self, id: &MachineId) -> Result<Option<MachineRecord>, AgentError> {
        self.db.machine(id)
    }

    /// A machine's check statuses (empty unless it is started and has checks).
    pub(crate) fn check_statuses(&self, id: &MachineId) -> Vec<aloft_api::CheckStatus> {
        self.checks.statuses(id)
    }

    /// Changes whenever any check status may have changed (checks do not bump the generation).
    pub(crate) fn checks_epoch(&self) -> u64 {
        self.checks.epoch()
    }

    /// Runs `f` on a thread the agent joins when it is dropped; refused once it halted.
    pub(crate) fn spawn_worker(
        self: &Arc<Self>,
        f: impl FnOnce(Arc<Inner>) + Send + 'static,
    ) -> Result<(), AgentError> {
        let mut live = self.lock();
        if self.halted() {
            return Err(AgentError::Halted);
        }
        self.spawn(&mut live, f);
        Ok(())
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Live> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn halted(&self) -> bool {
        self.halted.load(Ordering::SeqCst)
    }

    fn stopping(&self) -> bool {
        self.halted() || self.closing.load(Ordering::SeqCst)
    }

    /// Bumped (under the live lock, with a notification of `changed`) by every change of a
    /// machine's record or the agent's live state: read it before looking, then
    /// [`Inner::wait_change`] from it, and no change is missed.
    pub(crate) fn generation(&self) -> u64 {
        self.lock().generation
    }

    fn is_live(&self, op_id: &str) -> bool {
        self.lock().running.values().any(|r| r.op_id == op_id)
    }

    /// Something changed (not tied to one machine): a new generation, waiters woken.
    pub(crate) fn notify(&self) {
        let mut live = self.lock();
        self.bump(&mut live, None);
    }

    /// Machine `id` changed: a new generation, waiters woken.
    fn notify_machine(&self, id: &MachineId) {
        let mut live = self.lock();
        self.bump(&mut live, Some(id));
    }

    /// A new generation (recording which machine changed, if one did), waiters woken. Every
    /// change of a machine record goes through here.
    fn bump(&self, live: &mut Live, id: Option<&MachineId>) {
        live.generation = live.generation.wrapping_add(1);
        let g = live.generation;
        match id {
            Some(id) => {
                live.touched.insert(id.clone(), g);
                // Destroyed machines stay in the map, so it would grow with every machine the
                // host ever had: past the bound it is forgotten, which readers see as a change
                // not tied to one machine (they read everything once).
                if live.touched.len() > MAX_TOUCHED {
                    live.touched.clear();
                    live.touched_all = g;
                }
            }
            None => live.touched_all = g,
        }
        self.changed.notify_all();
    }

    /// The generation now and the machines changed after generation `since`; `None` when a
    /// change not tied to one machine happened since (read them all).
    pub(crate) fn changed_since(&self, since: u64) -> (u64, Option<Vec<MachineId>>) {
        let live = self.lock();
        if live.touched_all > since {
            return (live.generation, None);
        }
        let ids = live
            .touched
            .iter()
            .filter(|(_, g)| **g > since)
            .map(|(id, _)| id.clone())
            .collect();
        (live.generation, Some(ids))
    }

    /// Blocks until something changed after `seen`, the agent halts, or `deadline`.
    pub(crate) fn wait_change(&self, seen: u64, deadline: Instant) {
        let mut live = self.lock();
        while live.generation == seen && !self.halted() {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            let (g, _) = self
                .changed
                .wait_timeout(live, (deadline - now).min(self.config.poll))
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            live = g;
        }
    }

    fn spawn(self: &Arc<Self>, live: &mut Live, f: impl FnOnce(Arc<Inner>) + Send + 'static) {
        live.threads.retain(|t| !t.is_finished());
        let me = self.clone();
        live.threads.push(std::thread::spawn(move || f(me)));
    }

    /// Captures the output of the machine's running VM into its log, on a thread that ends with
    /// the VM (or when the agent halts).
    fn capture(&self, live: &mut Live, id: &MachineId, region: &str) {
        let Ok(Some(rx)) = self.driver.logs(id) else {
            return;
        };
        let log = self.logs.machine(id, region);
        log.capture_started();
        let halted = self.halted.clone();
        let poll = self.config.poll;
        live.threads.retain(|t| !t.is_finished());
        live.threads
            .push(std::thread::spawn(move || logs::capture(rx, &log, &halted, poll)));
    }

    /// Lets the capture of an ended VM write its last output (briefly: its receiver disconnects
    /// when the VM ends).
    fn output_done(&self, id: &MachineId) {
        if let Some(log) = self.logs.get(id) {
            log.wait_captured(Duration::from_secs(1));
        }
    }

    /// Writes a platform line into the machine's log (best effort: a log that cannot be written
    /// must not fail the lifecycle).
    fn platform_line(&self, id: &MachineId, region: &str, message: String) {
        let _ = self.logs.machine(id, region).platform(message, now_ms());
    }

    fn record(&self, id: &MachineId) -> Result<MachineRecord, AgentError> {
        self.db.machine(id)?.ok_or_else(|| AgentError::NotFound {
            machine: id.to_string(),
        })
    }

    fn stop_params(&self, config: &MachineConfig, opts: StopOptions) -> (Option<Signal>, u64) {
        let sc = config.stop_config.clone().unwrap_or_default();
        let signal = opts.signal.or(sc.signal.map(Signal::from));
        let timeout = opts
            .timeout
            .or(sc.timeout.map(|d| d.0))
            .unwrap_or(self.config.stop_timeout);
        (signal, u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))
    }

    /// Checks a verb that changes no state (signal, exec, ps) against the machine's state.
    fn direct(&self, id: &MachineId, verb: Verb) -> Result<MachineRecord, AgentError> {
        let rec = self.record(id)?;
        verb.transition(rec.state)?;
        if let Some(op_id) = &rec.op_id {
            return Err(self.busy(id, op_id));
        }
        Ok(rec)
    }

    fn busy(&self, id: &MachineId, op_id: &str) -> AgentError {
        let operation = self.lock().running.get(id).map_or("an", |r| r.kind.as_str());
        AgentError::Busy {
            machine: id.clone(),
            operation,
            op_id: op_id.to_owned(),
        }
    }

    fn event(
        kind: &str,
        status: MachineState,
        source: EventSource,
        request: Option<MachineEventRequest>,
    ) -> MachineEvent {
        MachineEvent {
            id: ulid(),
            kind: kind.to_owned(),
            status: status.as_str().to_owned(),
            source: Some(source),
            timestamp: now_ms(),
            request,
        }
    }

    fn new_op(id: &MachineId, kind: OpKind, source: EventSource, params: OpParams) -> OpRecord {
        OpRecord {
            id: ulid(),
            machine: id.clone(),
            kind,
            source,
            status: OpStatus::Running,
            params,
            scratch: Scratch::default(),
            error: None,
            created_at: now_ms(),
            finished_at: None,
        }
    }

    fn base_params(kind: OpKind, from: MachineState, skip_launch: bool) -> OpParams {
        let (plan, target) = plan::plan(kind, from, skip_launch);
        OpParams {
            plan,
            from,
            target,
            signal: None,
            timeout_ms: None,
            force: false,
            new_version: None,
            new_config: None,
            backoff_ms: 0,
            undo: None,
            secrets: None,
        }
    }

    /// `secrets` sealed for `version` of machine `id` (`None` when there are none).
    fn seal_secrets(
        &self,
        id: &MachineId,
        version: &str,
        secrets: &SecretEnv,
    ) -> Result<Option<SealedSecrets>, AgentError> {
        if secrets.values.is_empty() {
            return Ok(None);
        }
        let json = serde_json::to_vec(&secrets.values).map_err(|source| AgentError::Corrupt {
            what: format!("secrets of machine {id}"),
            source,
        })?;
        let sealed = self.secrets_keys.seal(&json, &keys::secrets_ad(id, version))?;
        Ok(Some(SealedSecrets {
            version: secrets.version,
            sealed,
        }))
    }

    /// Opens what [`Inner::seal_secrets`] sealed.
    fn open_secrets(
        &self,
        id: &MachineId,
        version: &str,
        sealed: &SealedSecrets,
    ) -> Result<std::collections::BTreeMap<String, String>, AgentError> {
        let json = self
            .secrets_keys
            .open(&sealed.sealed, &keys::secrets_ad(id, version))?;
        serde_json::from_slice(&json).map_err(|source| AgentError::Corrupt {
            what: format!("secrets of machine {id}"),
            source,
        })
    }

    /// Refuses a config bigger than the host.
    fn check_capacity(&self, config: &MachineConfig) -> Result<(), AgentError> {
        let (cpus, memory_mb) = plan::guest_size(config)?;
        if memory_mb > self.config.host_memory_mb {
            return Err(AgentError::InsufficientCapacity {
                what: "memory",
                asked: format!("{memory_mb} MiB"),
                host: format!("{} MiB", self.config.host_memory_mb),
            });
        }
        if cpus > self.config.host_cpus {
            return Err(AgentError::InsufficientCapacity {
                what: "cpus",
                asked: cpus.to_string(),
                host: self.config.host_cpus.to_string(),
            });
        }
        Ok(())
    }

    /// Runs `f` holding the lock of volume `id` (see [`Inner::volume_locks`]).
    fn with_volume<T>(&self, id: &VolumeId, f: impl FnOnce() -> T) -> T {
        let lock = self
            .volume_locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(id.clone())
            .or_default()
            .clone();
        let _held = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f()
    }

    /// Runs `copy` (a copy of volume `id`'s disk: a snapshot, a fork into volume `also`) with
    /// the disk held still, passing it the machine whose VM must be paused for the copy (one
    /// that mounts the volume and whose VM runs), if any.
    ///
    /// The machines mounting the volume are held first ([`Live::held`]: their submissions
    /// wait), then their operations in flight are waited for (up to [`COPY_SETTLE`]; then
    /// [`AgentError::Busy`]), then the volume's lock is taken (and `also`'s: cold boots grow
    /// volumes under it, so none of a machine mounting it gets past that step meanwhile) and
    /// the mounting machines read again: one that came since (a create) makes it start over.
    /// So no VM of the volume starts, resumes, stops or suspends while it is copied, and one
    /// that runs is paused. The hold ends when `copy` returns, whatever it returns.
    fn copy_volume<T>(
        &self,
        id: &VolumeId,
        also: Option<&VolumeId>,
        copy: impl FnOnce(Option<&MachineId>) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        let deadline = Instant::now() + COPY_SETTLE;
        let mut copy = Some(copy);
        loop {
            let hold = self.hold(id)?;
            self.settle(&hold.machines, deadline)?;
            let attempt = self.with_volumes(id, also, || {
                let users = self.volume_users(id)?;
                if users
                    .iter()
                    .any(|u| !hold.machines.contains(&u.id) || u.op_id.is_some())
                {
                    return Ok(None);
                }
                let mut pause = None;
                for u in &users {
                    match self.driver.vm_status(&u.id) {
                        Ok(VmStatus::Running) => pause = Some(u.id.clone()),
                        Ok(_) => {}
                        Err(source) => {
                            return Err(AgentError::Driver {
                                machine: u.id.clone(),
                                source,
                            });
                        }
                    }
                }
                let f = copy.take().ok_or(AgentError::Halted)?;
                f(pause.as_ref()).map(Some)
            })?;
            drop(hold);
            if let Some(out) = attempt {
                return Ok(out);
            }
            if Instant::now() >= deadline {
                let machine = self.volume_users(id)?.into_iter().next();
                return Err(AgentError::VolumeCopyBusy {
                    volume: id.clone(),
                    machine: machine.map(|m| m.id),
                });
            }
        }
    }

    /// Runs `f` holding the locks of volume `id` and, when given, of volume `also`, taken in
    /// the order of their ids (so two copies between the same volumes cannot deadlock).
    fn with_volumes<T>(&self, id: &VolumeId, also: Option<&VolumeId>, f: impl FnOnce() -> T) -> T {
        match also {
            Some(other) if other < id => self.with_volume(other, || self.with_volume(id, f)),
            Some(other) if other > id => self.with_volume(id, || self.with_volume(other, f)),
            _ => self.with_volume(id, f),
        }
    }

    /// Holds the machines mounting volume `id` (see [`Live::held`]) until the hold is dropped.
    fn hold(&self, id: &VolumeId) -> Result<Hold<'_>, AgentError> {
        let mut live = self.lock();
        if self.stopping() {
            return Err(AgentError::Halted);
        }
        let machines: Vec<MachineId> = self.volume_users(id)?.into_iter().map(|r| r.id).collect();
        for m in &machines {
            *live.held.entry(m.clone()).or_default() += 1;
        }
        Ok(Hold {
            inner: self,
            machines,
        })
    }

    /// Waits until none of `machines` has an operation in flight; [`AgentError::Busy`] at
    /// `deadline`.
    fn settle(&self, machines: &[MachineId], deadline: Instant) -> Result<(), AgentError> {
        loop {
            let seen = self.generation();
            let mut busy = None;
            for m in machines {
                if let Some(rec) = self.db.machine(m)?
                    && let Some(op) = rec.op_id
                {
                    busy = Some((rec.id, op));
                    break;
                }
            }
            let Some((machine, op_id)) = busy else {
                return Ok(());
            };
            if self.halted() {
                return Err(AgentError::Halted);
            }
            if Instant::now() >= deadline {
                return Err(self.busy(&machine, &op_id));
            }
            self.wait_change(seen, deadline);
        }
    }

    /// Waits, holding `live`, while machine `id` is held for a copy of its volume (see
    /// [`Live::held`]); gives up when the agent halts.
    fn wait_unheld<'a>(&'a self, mut live: MutexGuard<'a, Live>, id: &MachineId) -> MutexGuard<'a, Live> {
        while live.held.contains_key(id) && !self.halted() {
            let (g, _) = self
                .changed
                .wait_timeout(live, self.config.poll)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            live = g;
        }
        live
    }

    /// [`Agent::extend_volume`], holding the volume's lock.
    fn extend_volume(&self, id: &VolumeId, size_gb: u32) -> Result<bool, AgentError> {
        let d = &*self.driver;
        let disk = d
            .volume_disk(id)
            .map_err(|source| volume_failed(id, source))?
            .ok_or_else(|| AgentError::VolumeNotFound { volume: id.clone() })?;
        let asked = u64::from(size_gb) * crate::volumes::GIB;
        if asked < disk.size_bytes {
            return Err(AgentError::VolumeRequest {
                volume: id.clone(),
                reason: format!(
                    "its disk is {} GB and volumes never shrink: ask for more than that",
                    disk.size_bytes / crate::volumes::GIB
                ),
            });
        }
        if asked == disk.size_bytes && !disk.grow_pending {
            // A retry of an extend that is done.
            return Ok(false);
        }
        d.extend_volume(id, size_gb)
            .map_err(|source| volume_failed(id, source))?;
        // Read holding the volume's lock: a boot submitted from now on grows the filesystem
        // itself before it starts (under the same lock), and one already in flight counts as a
        // machine that may have the disk open.
        let offline = self.volume_users(id)?.iter().all(|m| {
            m.op_id.is_none()
                && matches!(
                    m.state,
                    MachineState::Created | MachineState::Stopped | MachineState::Failed
                )
                && matches!(d.vm_status(&m.id), Ok(VmStatus::Absent | VmStatus::Exited(_)))
        });
        if !offline {
            return Ok(true);
        }
        d.grow_volume_fs(id).map_err(|source| volume_failed(id, source))?;
        Ok(false)
    }

    /// The machines, not destroyed, that mount volume `id`: in their config, or in the config an
    /// update in flight is installing. One at most, unless the database was edited by hand.
    fn volume_users(&self, id: &VolumeId) -> Result<Vec<MachineRecord>, AgentError> {
        let mut users = Vec::new();
        for rec in self.db.machines()? {
            if rec.state.is_terminal() {
                continue;
            }
            let pending = match &rec.op_id {
                Some(op) => self
                    .db
                    .op(op)?
                    .and_then(|o| o.params.new_config)
                    .is_some_and(|c| mounts(&c, id)),
                None => false,
            };
            if pending || mounts(&rec.config, id) {
                users.push(rec);
            }
        }
        Ok(users)
    }

    /// Checks what `config`'s mount needs of this host, for machine `machine` (being created or
    /// updated): the volume's disk is here and no other machine mounts it. Called under the
    /// live lock, up to the write that records the config, so two machines never take one
    /// volume.
    fn check_mount_on_host(&self, machine: &MachineId, config: &MachineConfig) -> Result<(), AgentError> {
        let Some(m) = plan::volume_mount(config)? else {
            return Ok(());
        };
        let disk = self
            .driver
            .volume_disk(&m.volume)
            .map_err(|source| volume_failed(&m.volume, source))?;
        if disk.is_none() {
            return Err(AgentError::Mount {
                reason: format!(
                    "volume {} is not on this host: a machine mounts a volume of its own host; create the volume there, or place the machine on the volume's host",
                    m.volume
                ),
            });
        }
        if let Some(other) = self
            .volume_users(&m.volume)?
            .into_iter()
            .find(|r| r.id != *machine)
        {
            return Err(AgentError::Mount {
                reason: format!(
                    "volume {} is mounted by machine {}: a volume is mounted by one machine at a time; destroy that machine (or update it without the mount) first, or use another volume",
                    m.volume, other.id
                ),
            });
        }
        Ok(())
    }

    /// Before machine `id` boots: grows volume `volume`'s filesystem if an extend left that for
    /// this moment. A failure does not stop the boot (the volume keeps its old size, and its data
    /// is all there); it is said in the machine's log, and the next boot tries again.
    fn grow_before_boot(&self, id: &MachineId, region: &str, volume: &VolumeId) {
        match self.with_volume(volume, || self.driver.grow_volume_fs(volume)) {
            Ok(false) => {}
            Ok(true) => self.platform_line(
                id,
                region,
                format!("volume {volume}: filesystem grown to fill its extended disk"),
            ),
            Err(e) => self.platform_line(
                id,
                region,
                format!(
                    "volume {volume}: could not grow its filesystem to its extended disk ({e}); it keeps its old size until a later boot manages"
                ),
            ),
        }
    }

    fn create(self: &Arc<Self>, req: CreateMachine, secrets: &SecretEnv) -> Result<OpHandle, AgentError> {
        plan::validate(&req.config)?;
        plan::check_secret_refs(&req.config, &secrets.values)?;
        self.check_capacity(&req.config)?;
        let id = req.id.clone().unwrap_or_else(new_machine_id);
        let mut live = self.lock();
        if self.stopping() {
            return Err(AgentError::Halted);
        }
        if self.db.machine(&id)?.is_some() {
            return Err(AgentError::AlreadyExists { machine: id });
        }
        // Under the live lock until the machine is recorded: no two machines take one volume.
        self.check_mount_on_host(&id, &req.config)?;
        let version = ulid();
        let sealed = self.seal_secrets(&id, &version, secrets)?;
        let params = OpParams {
            new_version: Some(version.clone()),
            new_config: Some(req.config.clone()),
            secrets: sealed.clone(),
            ..Self::base_params(OpKind::Create, MachineState::Creating, req.skip_launch)
        };
        let op = Self::new_op(&id, OpKind::Create, EventSource::User, params);
        let now = now_ms();
        let rec = MachineRecord {
            id: id.clone(),
            app: req.app,
            name: req.name.unwrap_or_else(|| id.to_string()),
            region: req.region,
            org: req.org,
            state: MachineState::Creating,
            version: version.clone(),
            config: req.config,
            resources: Resources::default(),
            restart_count: 0,
            op_id: Some(op.id.clone()),
            created_at: now,
            updated_at: now,
            checks: Vec::new(),
        };
        self.db.write(|tx| {
            tx.insert_machine(&rec)?;
            tx.insert_version(&id, &version, &rec.config, now)?;
            tx.put_secrets(&id, &version, sealed.as_ref())?;
            tx.insert_op(&op)
        })?;
        Ok(self.launch(&mut live, &op, MachineState::Creating))
    }

    /// Registers `op` as running and starts its executor.
    fn launch(self: &Arc<Self>, live: &mut Live, op: &OpRecord, previous: MachineState) -> OpHandle {
        // The operation owns the VM now: a monitor of the instance before it is stale, and its
        // checks stop (they start again if it ends started).
        live.monitors.remove(&op.machine);
        self.checks.stop(&op.machine);
        live.running.insert(
            op.machine.clone(),
            Running {
                op_id: op.id.clone(),
                kind: op.kind,
                cancel: Arc::new(AtomicBool::new(false)),
                pending_destroy: None,
            },
        );
        self.bump(live, Some(&op.machine));
        let (machine, op_id) = (op.machine.clone(), op.id.clone());
        self.spawn(live, move |me| me.run(&machine, op_id));
        OpHandle {
            inner: self.clone(),
            machine: op.machine.clone(),
            op_id: op.id.clone(),
            kind: op.kind,
            previous_state: previous,
        }
    }

    fn submit(
        self: &Arc<Self>,
        id: &MachineId,
        verb: Verb,
        kind: OpKind,
        source: EventSource,
        build: impl FnOnce(&MachineRecord, OpParams) -> Result<OpParams, AgentError>,
    ) -> Result<OpHandle, AgentError> {
        self.submit_with(id, verb, kind, source, false, build)
    }

    fn submit_with(
        self: &Arc<Self>,
        id: &MachineId,
        verb: Verb,
        kind: OpKind,
        source: EventSource,
        skip_launch: bool,
        build: impl FnOnce(&MachineRecord, OpParams) -> Result<OpParams, AgentError>,
    ) -> Result<OpHandle, AgentError> {
        let mut live = self.wait_unheld(self.lock(), id);
        if self.stopping() {
            return Err(AgentError::Halted);
        }
        let mut rec = self.record(id)?;
        if let Some(op_id) = &rec.op_id {
            // A transient state names the operation better than "busy" (the API's 412).
            verb.transition(rec.state)?;
            let operation = live.running.get(id).map_or("an", |r| r.kind.as_str());
            return Err(AgentError::Busy {
                machine: id.clone(),
                operation,
                op_id: op_id.clone(),
            });
        }
        let transition = verb.transition(rec.state)?;
        let from = rec.state;
        let mut params = build(&rec, Self::base_params(kind, from, skip_launch))?;
        if plan::keeps_rootfs(kind, &rec.config) {
            params.plan.retain(|s| *s != Step::ResetDisk);
        }
        let op = Self::new_op(id, kind, source, params);
        rec.state = transition.via.unwrap_or(rec.state);
        rec.op_id = Some(op.id.clone());
        rec.updated_at = now_ms();
        self.db.write(|tx| {
            tx.insert_op(&op)?;
            tx.update_machine(&rec)
        })?;
        Ok(self.launch(&mut live, &op, from))
    }

    fn destroy(
        self: &Arc<Self>,
        id: &MachineId,
        force: bool,
        source: EventSource,
    ) -> Result<OpHandle, AgentError> {
        let mut live = self.wait_unheld(self.lock(), id);
        if self.stopping() {
            return Err(AgentError::Halted);
        }
        let rec = self.record(id)?;
        let verb = Verb::Destroy { force };
        if let Some(running) = live.running.get_mut(id) {
            verb.transition(rec.state)?;
            if running.kind == OpKind::Destroy {
                return Err(AgentError::State(StateError {
                    verb,
                    state: MachineState::Destroying,
                }));
            }
            if let Some((op_id, _)) = &running.pending_destroy {
                return Err(AgentError::Busy {
                    machine: id.clone(),
                    operation: "destroy",
                    op_id: op_id.clone(),
                });
            }
            let op_id = ulid();
            running.pending_destroy = Some((op_id.clone(), source));
            running.cancel.store(true, Ordering::SeqCst);
            return Ok(OpHandle {
                inner: self.clone(),
                machine: id.clone(),
                op_id,
                kind: OpKind::Destroy,
                previous_state: rec.state,
            });
        }
        drop(live);
        self.submit(id, verb, OpKind::Destroy, source, |_, mut p| {
            p.force = force;
            Ok(p)
        })
    }

    /// Runs operation `op_id` of `machine` (and any destroy chained after it) to its end.
    fn run(self: &Arc<Self>, machine: &MachineId, op_id: String) {
        let mut op_id = op_id;
        loop {
            match self.execute(&op_id) {
                Ok(Some(next)) => op_id = next,
                Ok(None) => break,
                Err(_) => {
                    // Halted (the operation resumes on the next open), or the database failed: the
                    // record still names the operation, so the machine stays busy until then.
                    let mut live = self.lock();
                    if live.running.get(machine).is_some_and(|r| r.op_id == op_id) {
                        live.running.remove(machine);
                    }
                    drop(live);
                    self.notify_machine(machine);
                    return;
                }
            }
        }
        self.after_op(machine);
    }

    /// Called with the live lock held right after an operation's last record was written: hands
    /// over to a destroy asked for meanwhile (its id), or lets the machine go (`None`).
    fn hand_over(
        &self,
        live: &mut Live,
        machine: &MachineId,
        op_id: &str,
    ) -> Result<Option<String>, AgentError> {
        let pending = live
            .running
            .get(machine)
            .filter(|r| r.op_id == op_id)
            .and_then(|r| r.pending_destroy.clone());
        if let Some((pid, src)) = pending
            && let Some(next) = self.chain_destroy(machine, op_id, pid, src)?
        {
            if let Some(r) = live.running.get_mut(machine) {
                r.op_id.clone_from(&next);
                r.kind = OpKind::Destroy;
                r.pending_destroy = None;
                r.cancel.store(false, Ordering::SeqCst);
            }
            return Ok(Some(next));
        }
        if live.running.get(machine).is_some_and(|r| r.op_id == op_id) {
            live.running.remove(machine);
        }
        Ok(None)
    }

    /// After the last operation: watch a started machine's VM.
    fn after_op(self: &Arc<Self>, machine: &MachineId) {
        let Ok(Some(rec)) = self.db.machine(machine) else {
            return;
        };
        if rec.state == MachineState::Started && rec.op_id.is_none() {
            let token = ulid();
            let mut live = self.lock();
            if self.stopping() || live.running.contains_key(machine) {
                return;
            }
            live.monitors.insert(machine.clone(), token.clone());
            let m = machine.clone();
            self.spawn(&mut live, move |me| me.monitor(&m, &token));
        }
    }

    /// Records a destroy that was asked for while `prev` ran and has just finished (or been
    /// cancelled); returns its id, or `None` when the machine is destroyed already.
    fn chain_destroy(
        &self,
        machine: &MachineId,
        prev: &str,
        op_id: String,
        source: EventSource,
    ) -> Result<Option<String>, AgentError> {
        let mut rec = self.record(machine)?;
        if rec.state == MachineState::Destroyed {
            return Ok(None);
        }
        let mut params = Self::base_params(OpKind::Destroy, rec.state, false);
        params.force = true;
        let mut op = Self::new_op(machine, OpKind::Destroy, source, params);
        op.id = op_id;
        let prev = self
            .db
            .op(prev)?
            .filter(|p| matches!(p.status, OpStatus::Running | OpStatus::Undoing))
            .map(|mut p| {
                p.status = OpStatus::Cancelled;
                p.error = Some("cancelled by a forced destroy".into());
                p.finished_at = Some(now_ms());
                p
            });
        self.db.write(|tx| {
            if let Some(p) = &prev {
                tx.update_op(p)?;
            }
            tx.insert_op(&op)?;
            rec.state = MachineState::Destroying;
            rec.op_id = Some(op.id.clone());
            rec.updated_at = now_ms();
            tx.update_machine(&rec)
        })?;
        Ok(Some(op.id))
    }

    fn cancelled(&self, machine: &MachineId) -> bool {
        self.lock()
            .running
            .get(machine)
            .is_some_and(|r| r.cancel.load(Ordering::SeqCst))
    }

    /// Runs an operation's remaining steps. `Ok(Some(id))`: a cancelled operation handed over to
    /// destroy `id`; `Ok(None)`: finished.
    fn execute(self: &Arc<Self>, op_id: &str) -> Result<Option<String>, AgentError> {
        let Some(mut op) = self.db.op(op_id)? else {
            return Ok(None);
        };
        let done: Vec<(Phase, usize)> = self
            .db
            .steps(op_id)?
            .into_iter()
            .filter(|s| s.status == "done")
            .map(|s| (s.phase, s.idx))
            .collect();
        if op.status == OpStatus::Running {
            for idx in 0..op.params.plan.len() {
                if done.contains(&(Phase::Do, idx)) {
                    continue;
                }
                if self.cancelled(&op.machine) {
                    return self.cancel(&op);
                }
                match self.run_step(&mut op, Phase::Do, idx) {
                    Ok(()) => {}
                    Err(StepError::Agent(e)) => return Err(e),
                    Err(StepError::Failed(e)) => {
                        let failed = op.params.plan[idx];
                        self.begin_undo(&mut op, failed, &e)?;
                        break;
                    }
                }
            }
            if op.status == OpStatus::Running {
                return self.finish(&op, None);
            }
        }
        if op.status == OpStatus::Undoing {
            let (steps, mut end) = op
                .params
                .undo
                .clone()
                .map_or((Vec::new(), MachineState::Failed), |u| (u.steps, u.end));
            for (idx, step) in steps.iter().enumerate() {
                if done.contains(&(Phase::Undo, idx)) {
                    continue;
                }
                match self.run_step(&mut op, Phase::Undo, idx) {
                    Ok(()) => {}
                    Err(StepError::Agent(e)) => return Err(e),
                    Err(StepError::Failed(e)) => {
                        // The fallback failed too: make sure nothing runs, and leave it failed.
                        let _ = self.driver.kill_vm(&op.machine);
                        let msg = op.scratch.error.clone().unwrap_or_default();
                        op.scratch.error = Some(format!("{msg}; then {}: {e}", step.as_str()));
                        end = MachineState::Failed;
                        break;
                    }
                }
            }
            return self.finish(&op, Some(end));
        }
        Ok(None)
    }

    fn cancel(&self, op: &OpRecord) -> Result<Option<String>, AgentError> {
        let mut live = self.lock();
        let next = self.hand_over(&mut live, &op.machine, &op.id)?;
        self.bump(&mut live, Some(&op.machine));
        Ok(next)
    }

    fn begin_undo(&self, op: &mut OpRecord, failed: Step, e: &DriverError) -> Result<(), AgentError> {
        let undo = plan::undo(op.kind, op.params.from, failed);
        let end = undo.end;
        let message = e.to_string();
        op.status = OpStatus::Undoing;
        op.params.undo = Some(undo);
        op.scratch.error = Some(message);
        op.scratch.user_error = matches!(e, DriverError::Image { .. } | DriverError::WorkloadFailed { .. });
        let mut rec = self.record(&op.machine)?;
        rec.state = plan::undo_state(op.kind, end, rec.state);
        rec.updated_at = now_ms();
        self.db.write(|tx| {
            tx.update_op(op)?;
            tx.update_machine(&rec)
        })?;
        self.notify_machine(&op.machine);
        Ok(())
    }

    /// Records the end of an operation: `end` is `None` when every step succeeded.
    fn finish(&self, op: &OpRecord, end: Option<MachineState>) -> Result<Option<String>, AgentError> {
        let mut op = op.clone();
        let mut rec = self.record(&op.machine)?;
        let now = now_ms();
        let success = end.is_none();
        let state = end.unwrap_or(op.params.target);
        // A fallback that still got the machine where it was asked to go (a snapshot that did not
        // resume, booted cold) is a success; the event keeps the error.
        let fallback = op.params.undo.as_ref().is_some_and(|u| u.fallback);
        op.status = if success || (fallback && state == op.params.target) {
            OpStatus::Done
        } else {
            OpStatus::Failed
        };
        op.finished_at = Some(now);
        if !success {
            let message = op.scratch.error.clone().unwrap_or_else(|| "failed".into());
            op.error = Some(message);
        }
        let mut request = match (&op.scratch.exit, op.kind) {
            (Some(exit), OpKind::Stop | OpKind::Suspend | OpKind::Destroy) => {
                Some(exit_request(exit, false, rec.restart_count))
            }
            _ => None,
        };
        if let Some(err) = &op.error {
            let r = request.get_or_insert_with(MachineEventRequest::default);
            r.extra
                .insert("error".to_owned(), serde_json::Value::String(err.clone()));
        }
        if state == MachineState::Started && op.source == EventSource::User {
            rec.restart_count = 0;
        }
        rec.state = state;
        rec.op_id = None;
        rec.updated_at = now;
        let event = Self::event(op.kind.event_type(), state, op.source, request);
        let line = logs::op_line(
            op.kind,
            op.params.from,
            state,
            (op.status == OpStatus::Failed).then(|| op.error.as_deref().unwrap_or("failed")),
        );
        // Before the record: whoever sees the machine settled finds the line in its log and its
        // checks running.
        if let Some(line) = line {
            self.platform_line(&rec.id, &rec.region, line);
        }
        if state == MachineState::Started {
            self.checks
                .start(&rec.id, &rec.config, rec.resources.net.as_ref());
        } else {
            self.checks.stop(&rec.id);
        }
        if state == MachineState::Destroyed {
            // A failure here leaves the directory to the sweep on the next open.
            let _ = self.logs.remove(&rec.id);
        }
        // Under the live lock, so that no verb sees the machine settled while it is still
        // registered as busy, and a pending destroy is chained without a gap.
        let mut live = self.lock();
        self.db.write(|tx| {
            tx.update_op(&op)?;
            tx.update_machine(&rec)?;
            if state == MachineState::Destroyed {
                tx.put_secrets(&rec.id, "", None)?;
            }
            tx.insert_event(&rec.id, &event)?;
            tx.prune(&rec.id, HISTORY)
        })?;
        let next = self.hand_over(&mut live, &op.machine, &op.id);
        self.bump(&mut live, Some(&op.machine));
        drop(live);
        next
    }

    /// Runs one step: persisted as started, performed, persisted with its outcome (and effects);
    /// retryable failures are tried again up to `step_attempts` times.
    fn run_step(&self, op: &mut OpRecord, phase: Phase, idx: usize) -> Result<(), StepError> {
        let step = match phase {
            Phase::Do => op.params.plan[idx],
            Phase::Undo => op.params.undo.as_ref().map_or(Step::KillVm, |u| u.steps[idx]),
        };
        let attempts = self.config.step_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.db
                .write(|tx| tx.step_started(&op.id, phase, idx, step, now_ms()))?;
            let before = self.record(&op.machine)?;
            match self.perform(op, step, &before) {
                Ok(effect) => {
                    let mut rec = self.record(&op.machine)?;
                    self.apply(op, &mut rec, effect);
                    rec.updated_at = now_ms();
                    let commit_version = step == Step::WriteSpec && op.kind == OpKind::Update;
                    let old_version = rec.version.clone();
                    if commit_version
                        && let (Some(v), Some(c)) = (&op.params.new_version, &op.params.new_config)
                        && rec.version != *v
                    {
                        rec.version.clone_from(v);
                        rec.config = c.clone();
                        rec.resources.image.clone_from(&op.scratch.image);
                        rec.resources.base.clone_from(&op.scratch.base);
                    }
                    self.db.write(|tx| {
                        tx.step_finished(&op.id, phase, idx, None, now_ms())?;
                        if commit_version && old_version != rec.version {
                            let now = now_ms();
                            tx.insert_version(&rec.id, &rec.version, &rec.config, now)?;
                            tx.put_secrets(&rec.id, &rec.version, op.params.secrets.as_ref())?;
                            tx.replace_version(&rec.id, &old_version, now)?;
                            let mut extra = MachineEventRequest::default();
                            extra.extra.insert(
                                "previous_version".into(),
                                serde_json::Value::String(old_version.clone()),
                            );
                            tx.insert_event(
                                &rec.id,
                                &Self::event("update", MachineState::Replaced, op.source, Some(extra)),
                            )?;
                        }
                        tx.update_op(op)?;
                        tx.update_machine(&rec)
                    })?;
                    self.notify_machine(&op.machine);
                    return Ok(());
                }
                Err(e) => {
                    let msg = e.to_string();
                    self.db
                        .write(|tx| tx.step_finished(&op.id, phase, idx, Some(&msg), now_ms()))?;
                    if self.halted() {
                        return Err(StepError::Agent(AgentError::Halted));
                    }
                    if e.retryable() && attempt < attempts && !self.cancelled(&op.machine) {
                        std::thread::sleep(self.config.retry_delay);
                        continue;
                    }
                    return Err(StepError::Failed(e));
                }
            }
        }
    }

    fn apply(&self, op: &mut OpRecord, rec: &mut MachineRecord, effect: Effect) {
        let r = &mut rec.resources;
        match effect {
            Effect::None | Effect::SpecWritten => {}
            Effect::Image(i) => {
                if op.kind == OpKind::Create {
                    r.image = Some(i.clone());
                }
                op.scratch.image = Some(i);
            }
            Effect::Base(b) => {
                if op.kind == OpKind::Create {
                    r.base = Some(b.clone());
                }
                op.scratch.base = Some(b);
            }
            Effect::Disk(p) => r.disk = Some(p),
            Effect::Net(n) => r.net = Some(n),
            Effect::Booted => {
                r.started_at = Some(now_ms());
                r.snapshot = false;
            }
            Effect::Exited(exit) => {
                if let Some(e) = &exit {
                    r.last_exit = Some(e.clone());
                    op.scratch.exit = Some(e.clone());
                }
                r.started_at = None;
            }
            Effect::Suspended => {
                r.snapshot = true;
                r.started_at = None;
            }
            Effect::SnapshotGone => r.snapshot = false,
            Effect::DiskGone => r.disk = None,
            Effect::NetGone => r.net = None,
        }
    }

    fn driver_failed(op: crate::driver::DriverOp, message: String) -> DriverError {
        DriverError::Failed {
            op,
            message,
            retryable: false,
        }
    }

    /// Does one step against the driver; `rec` is the machine as recorded before it.
    fn perform(&self, op: &OpRecord, step: Step, rec: &MachineRecord) -> Result<Effect, DriverError> {
        use crate::driver::DriverOp;
        let id = &op.machine;
        let d = &*self.driver;
        let timeout = Duration::from_millis(op.params.timeout_ms.unwrap_or(5_000));
        let config = op.params.new_config.as_ref().unwrap_or(&rec.config);
        match step {
            Step::Backoff => {
                let wait = Duration::from_millis(op.params.backoff_ms);
                let end = Instant::now() + wait;
                while Instant::now() < end && !self.halted() && !self.cancelled(id) {
                    std::thread::sleep((end - Instant::now()).min(self.config.poll));
                }
                Ok(Effect::None)
            }
            Step::PullImage => {
                let image = config.image.clone().unwrap_or_default();
                d.pull_image(&image).map(Effect::Image)
            }
            Step::BuildBase => {
                let image =
                    op.scratch.image.as_ref().ok_or_else(|| {
                        Self::driver_failed(DriverOp::BuildBase, "no image was pulled".into())
                    })?;
                d.build_base(image).map(Effect::Base)
            }
            Step::MakeDisk | Step::ResetDisk => d
                .create_disk(id, plan::disk_mib(config, self.config.disk_mib))
                .map(Effect::Disk),
            Step::AttachNetwork => d.attach_network(id, rec.org).map(Effect::Net),
            Step::WriteSpec => {
                let spec = self.launch_spec(op, rec)?;
                // Every plan writes the spec with no VM of the machine running and no snapshot
                // of it left, before it boots: the one safe moment to grow a volume's
                // filesystem that an extend had to leave for the next boot.
                for v in &spec.volumes {
                    self.grow_before_boot(id, &rec.region, &v.volume);
                }
                d.write_spec(id, &spec).map(|()| Effect::SpecWritten)
            }
            Step::StartVm | Step::ResumeVm => {
                if step == Step::StartVm {
                    d.start_vm(id)?;
                } else {
                    d.resume_vm(id)?;
                }
                self.capture(&mut self.lock(), id, &rec.region);
                Ok(Effect::Booted)
            }
            Step::WaitStarted => {
                // In slices, so that a halted agent does not sit in a long boot.
                let end = Instant::now() + self.config.boot_timeout;
                loop {
                    let left = end.saturating_duration_since(Instant::now());
                    match d.wait_started(id, left.min(Duration::from_secs(1))) {
                        Ok(()) => return Ok(Effect::None),
                        Err(DriverError::Failed {
                            op: DriverOp::WaitStarted,
                            retryable: true,
                            message,
                        }) => {
                            if left.is_zero() || self.halted() {
                                // The boot timeout is the whole budget: no retries on top of it.
                                return Err(DriverError::Failed {
                                    op: DriverOp::WaitStarted,
                                    message,
                                    retryable: false,
                                });
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Step::StopVm => {
                let signal = op.params.signal;
                match d.stop_vm(id, signal, timeout) {
                    Ok(exit) => Ok(Effect::Exited(exit)),
                    // A stop that fails ends in a kill.
                    Err(_) => d.kill_vm(id).map(Effect::Exited),
                }
            }
            Step::KillVm => d.kill_vm(id).map(Effect::Exited),
            Step::SuspendVm => d.suspend_vm(id).map(|()| Effect::Suspended),
            Step::DiscardSnapshot => d.discard_snapshot(id).map(|()| Effect::SnapshotGone),
            Step::RemoveMachineDir => d.remove_machine_dir(id).map(|()| Effect::None),
            Step::RemoveDisk => d.remove_disk(id).map(|()| Effect::DiskGone),
            Step::DetachNetwork => d.detach_network(id).map(|()| Effect::NetGone),
        }
    }

    fn launch_spec(&self, op: &OpRecord, rec: &MachineRecord) -> Result<LaunchSpec, DriverError> {
        use crate::driver::DriverOp;
        let bad = |m: String| Self::driver_failed(DriverOp::WriteSpec, m);
        let new = matches!(op.kind, OpKind::Create | OpKind::Update);
        let (config, version, image, base) = if new {
            (
                op.params.new_config.as_ref().unwrap_or(&rec.config),
                op.params.new_version.as_deref().unwrap_or(&rec.version),
                op.scratch.image.as_ref().or(rec.resources.image.as_ref()),
                op.scratch.base.as_ref().or(rec.resources.base.as_ref()),
            )
        } else {
            (
                &rec.config,
                rec.version.as_str(),
                rec.resources.image.as_ref(),
                rec.resources.base.as_ref(),
            )
        };
        let image = image.ok_or_else(|| bad("the machine has no pulled image".into()))?;
        let base = base.ok_or_else(|| bad("the machine has no base root filesystem".into()))?;
        let disk = rec
            .resources
            .disk
            .clone()
            .ok_or_else(|| bad("the machine has no writable disk".into()))?;
        let net = rec.resources.net.clone().unwrap_or_default();
        let who = Identity {
            id: rec.id.as_str(),
            app: &rec.app,
            region: &rec.region,
            version,
        };
        // The version's secrets: the operation's own for a create or update, else the ones kept
        // for the current version.
        let sealed = if new {
            op.params.secrets.clone()
        } else {
            self.db
                .secrets(&rec.id)
                .map_err(|e| bad(e.to_string()))?
                .and_then(|(v, s)| (v == version).then_some(s))
        };
        let secrets = sealed
            .map(|s| self.open_secrets(&rec.id, version, &s))
            .transpose()
            .map_err(|e| bad(e.to_string()))?
            .unwrap_or_default();
        let run_config =
            plan::run_config(who, config, &secrets, image, base, &net).map_err(|e| bad(e.to_string()))?;
        let (vcpus, memory_mib) = plan::guest_size(config).map_err(|e| bad(e.to_string()))?;
        // In the order of the run config's mounts (at most one).
        let volumes = match plan::volume_mount(config).map_err(|e| bad(e.to_string()))? {
            Some(m) => {
                let disk = self.driver.volume_disk(&m.volume)?.ok_or_else(|| {
                    bad(format!(
                        "volume {} has no disk on this host: its machine cannot boot without it",
                        m.volume
                    ))
                })?;
                vec![VolumeAttachment {
                    volume: m.volume,
                    disk: disk.path,
                }]
            }
            None => Vec::new(),
        };
        Ok(LaunchSpec {
            vcpus,
            memory_mib,
            base: base.clone(),
            disk,
            volumes,
            net,
            kernel_args: plan::kernel_args(config),
            run_config,
        })
    }

    /// Watches a started machine's VM until it ends, then applies the restart policy. `token`
    /// identifies this instance: a monitor whose machine was started again since is stale.
    fn monitor(self: &Arc<Self>, id: &MachineId, token: &str) {
        loop {
            if self.stopping() {
                return;
            }
            match self.driver.wait_exit(id, self.config.poll) {
                Ok(None) => {}
                Ok(Some(exit)) => {
                    self.output_done(id);
                    let _ = self.on_exit(id, Some(token), &exit);
                    return;
                }
                Err(DriverError::NotRunning { .. }) => {
                    self.output_done(id);
                    let _ = self.on_exit(
                        id,
                        Some(token),
                        &ExitInfo {
                            exited_at: now_ms(),
                            ..ExitInfo::default()
                        },
                    );
                    return;
                }
                Err(_) => std::thread::sleep(self.config.poll),
            }
        }
    }

    /// A started machine's VM ended without being asked: record the exit and apply the restart
    /// policy, all in one transaction (an exit is never half-handled).
    fn on_exit(
        self: &Arc<Self>,
        id: &MachineId,
        token: Option<&str>,
        exit: &ExitInfo,
    ) -> Result<(), AgentError> {
        let mut live = self.lock();
        if self.halted() || live.running.contains_key(id) {
            return Ok(());
        }
        if let Some(t) = token
            && live.monitors.get(id).map(String::as_str) != Some(t)
        {
            return Ok(());
        }
        live.monitors.remove(id);
        self.checks.stop(id);
        let mut rec = self.record(id)?;
        if rec.state != MachineState::Started || rec.op_id.is_some() {
            return Ok(());
        }
        let now = now_ms();
        let window = i64::try_from(self.config.restart.window.as_millis()).unwrap_or(i64::MAX);
        if rec
            .resources
            .started_at
            .is_some_and(|s| now.saturating_sub(s) >= window)
        {
            rec.restart_count = 0;
        }
        let decision = plan::on_exit(&rec.config, exit, rec.restart_count, &self.config.restart);
        let restarting = matches!(decision, ExitDecision::Restart { .. });
        let line = logs::exit_line(
            exit,
            &rec.config,
            match decision {
                ExitDecision::Restart { count, .. } => AfterExit::Restart { count },
                ExitDecision::Destroy => AfterExit::Destroy,
                ExitDecision::Stop => AfterExit::Stop,
            },
        );
        rec.resources.last_exit = Some(exit.clone());
        rec.resources.started_at = None;
        let exit_ev = Self::event(
            "exit",
            MachineState::Stopped,
            EventSource::Flyd,
            Some(exit_request(exit, restarting, rec.restart_count)),
        );
        let op = match decision {
            ExitDecision::Restart { backoff, count } => {
                rec.restart_count = count;
                let mut p = Self::base_params(OpKind::Start, MachineState::Started, false);
                p.backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
                rec.state = MachineState::Starting;
                Some(Self::new_op(id, OpKind::Start, EventSource::Flyd, p))
            }
            ExitDecision::Destroy => {
                let mut p = Self::base_params(OpKind::Destroy, MachineState::Stopped, false);
                p.force = true;
                rec.state = MachineState::Destroying;
                Some(Self::new_op(id, OpKind::Destroy, EventSource::Flyd, p))
            }
            ExitDecision::Stop => {
                rec.state = MachineState::Stopped;
                None
            }
        };
        rec.op_id = op.as_ref().map(|o| o.id.clone());
        rec.updated_at = now;
        self.db.write(|tx| {
            tx.insert_event(id, &exit_ev)?;
            if let Some(op) = &op {
                tx.insert_op(op)?;
            }
            tx.update_machine(&rec)
        })?;
        // Before the restart is launched, so that the line comes before the next boot's output.
        self.platform_line(id, &rec.region, line);
        match op {
            Some(op) => {
                self.launch(&mut live, &op, MachineState::Started);
            }
            None => self.bump(&mut live, Some(id)),
        }
        Ok(())
    }

    fn wait(
        &self,
        id: &MachineId,
        states: &[WaitState],
        version: Option<&str>,
        from_event_id: Option<&str>,
        timeout: Duration,
    ) -> Result<WaitOutcome, AgentError> {
        let states = if states.is_empty() {
            &[WaitState::Started][..]
        } else {
            states
        };
        let matches = |s: MachineState| states.iter().any(|w| w.matches(s));
        let deadline = Instant::now() + timeout;
        let from_seq = match from_event_id {
            Some(e) => Some(
                self.db
                    .event_seq(id, e)?
                    .ok_or_else(|| AgentError::UnknownEvent {
                        machine: id.clone(),
                        event_id: e.to_owned(),
                    })?,
            ),
            None => None,
        };
        loop {
            let seen = self.generation();
            let rec = self.record(id)?;
            if let Some(v) = version
                && v != rec.version
            {
                let versions = self.db.versions(id)?;
                let known = versions.iter().find(|(ver, _, _)| ver == v).map(|(_, _, r)| *r);
                // The version of an update in flight (the update's answer named it) is not
                // recorded until the update installs it: wait for it like for any state.
                let pending = known.is_none()
                    && match &rec.op_id {
                        Some(op) => self
                            .db
                            .op(op)?
                            .is_some_and(|o| o.params.new_version.as_deref() == Some(v)),
                        None => false,
                    };
                if known.is_none() && !pending {
                    return Err(AgentError::UnknownVersion {
                        machine: id.clone(),
                        version: v.to_owned(),
                    });
                }
                let satisfied = known == Some(true)
                    && states
                        .iter()
                        .any(|w| matches!(w, WaitState::Stopped | WaitState::Destroyed | WaitState::Settled));
                if satisfied {
                    return Ok(WaitOutcome {
                        state: MachineState::Replaced,
                        version: v.to_owned(),
                        event_id: String::new(),
                    });
                }
            } else if let Some(seq) = from_seq {
                for (_, ev) in self.db.events_after(id, seq)? {
                    if let Ok(s) = ev.status.parse::<MachineState>()
                        && matches(s)
                    {
                        return Ok(WaitOutcome {
                            state: s,
                            version: rec.version,
                            event_id: ev.id,
                        });
                    }
                }
            } else if matches(rec.state) {
                let event_id = self.db.events(id, 1)?.pop().map(|e| e.id).unwrap_or_default();
                return Ok(WaitOutcome {
                    state: rec.state,
                    version: rec.version,
                    event_id,
                });
            }
            if Instant::now() >= deadline {
                return Err(AgentError::WaitTimeout {
                    machine: id.clone(),
                    wanted: states
                        .iter()
                        .map(|w| format!("{w:?}").to_lowercase())
                        .collect::<Vec<_>>()
                        .join(" or "),
                    timeout,
                    state: rec.state,
                });
            }
            if self.halted() {
                return Err(AgentError::Halted);
            }
            self.wait_change(seen, deadline);
        }
    }

    /// The scheduler: every [`AgentConfig::schedule_tick`], machines with a `config.schedule`
    /// that are stopped (or created and never started) and whose last start is a period ago are
    /// started (source `flyd`). The period counts from the newest `launch` or `start` event, or
    /// from the machine's creation.
    fn schedule_loop(self: Arc<Self>) {
        loop {
            let deadline = Instant::now() + self.config.schedule_tick;
            while Instant::now() < deadline {
                if self.stopping() {
                    return;
                }
                let seen = self.generation();
                self.wait_change(seen, deadline);
            }
            if let Err(e) = self.start_due() {
                if matches!(e, AgentError::Halted) {
                    return;
                }
                eprintln!("aloft-agent: scheduler: {e}");
            }
        }
    }

    /// Starts every scheduled machine that is due; see [`Inner::schedule_loop`].
    fn start_due(self: &Arc<Self>) -> Result<(), AgentError> {
        let now = now_ms();
        for rec in self.db.machines()? {
            let Some(period) = rec
                .config
                .schedule
                .as_deref()
                .filter(|s| !s.trim().is_empty())
                .and_then(|s| plan::schedule_period(s, self.config.schedule_hour))
            else {
                continue;
            };
            if !matches!(rec.state, MachineState::Stopped | MachineState::Created) || rec.op_id.is_some() {
                continue;
            }
            let last = self
                .db
                .events(&rec.id, 50)?
                .into_iter()
                .find(|e| e.kind == "launch" || e.kind == "start")
                .map_or(rec.created_at, |e| e.timestamp);
            let period_ms = i64::try_from(period.as_millis()).unwrap_or(i64::MAX);
            if now.saturating_sub(last) < period_ms {
                continue;
            }
            match self.submit(&rec.id, Verb::Start, OpKind::Start, EventSource::Flyd, |_, p| {
                Ok(p)
            }) {
                // Someone else acted on it meanwhile: the next tick looks again.
                Ok(_) | Err(AgentError::State(_) | AgentError::Busy { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// See [`Agent::open`].
    fn recover(self: &Arc<Self>) -> Result<(), AgentError> {
        let machines = self.db.machines()?;
        let mut exited = Vec::new();
        {
            let mut live = self.lock();
            for rec in &machines {
                if let Some(op_id) = &rec.op_id {
                    match self.db.op(op_id)? {
                        Some(op) if matches!(op.status, OpStatus::Running | OpStatus::Undoing) => {
                            self.launch(&mut live, &op, op.params.from);
                            continue;
                        }
                        _ => {
                            // The operation finished but the machine still names it: the finish
                            // transaction writes both, so this is a database edited by hand.
                            let mut fixed = rec.clone();
                            fixed.op_id = None;
                            if !fixed.state.is_settled() {
                                fixed.state = MachineState::Failed;
                            }
                            self.db.write(|tx| tx.update_machine(&fixed))?;
                        }
                    }
                }
                match rec.state {
                    MachineState::Started => match self.driver.vm_status(&rec.id) {
                        Ok(VmStatus::Running) => {
                            self.capture(&mut live, &rec.id, &rec.region);
                            self.checks
                                .start(&rec.id, &rec.config, rec.resources.net.as_ref());
                            let token = ulid();
                            live.monitors.insert(rec.id.clone(), token.clone());
                            let m = rec.id.clone();
                            self.spawn(&mut live, move |me| me.monitor(&m, &token));
                        }
                        Ok(VmStatus::Exited(exit)) => exited.push((rec.id.clone(), exit)),
                        Ok(VmStatus::Absent | VmStatus::Suspended) | Err(_) => exited.push((
                            rec.id.clone(),
                            ExitInfo {
                                exited_at: now_ms(),
                                failed: Some("the vm was gone when the agent restarted".into()),
                                ..ExitInfo::default()
                            },
                        )),
                    },
                    MachineState::Created | MachineState::Stopped | MachineState::Failed => {
                        if matches!(self.driver.vm_status(&rec.id), Ok(VmStatus::Running)) {
                            let _ = self.driver.kill_vm(&rec.id);
                        }
                    }
                    _ => {}
                }
            }
        }
        for (id, exit) in exited {
            self.on_exit(&id, None, &exit)?;
        }
        self.sweep(&machines);
        Ok(())
    }

    /// Removes what the driver holds for machines with no record, or a destroyed one.
    fn sweep(&self, machines: &[MachineRecord]) {
        for id in self.driver.residue().unwrap_or_default() {
            let known = machines
                .iter()
                .find(|m| m.id == id)
                .is_some_and(|m| !m.state.is_terminal());
            if known {
                continue;
            }
            let d = &*self.driver;
            let _ = d.kill_vm(&id);
            let _ = d.discard_snapshot(&id);
            let _ = d.remove_machine_dir(&id);
            let _ = d.remove_disk(&id);
            let _ = d.detach_network(&id);
        }
        for id in self.logs.on_disk() {
            let live = machines.iter().any(|m| m.id == id && !m.state.is_terminal());
            if !live {
                let _ = self.logs.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn the_changed_machines_map_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::open(
            AgentConfig::new(dir.path().join("agent.db")),
            Arc::new(crate::FakeDriver::new()),
        )
        .unwrap();
        let since = agent.inner.generation();
        let ids: Vec<MachineId> = (0..=MAX_TOUCHED)
            .map(|i| format!("{i:014x}").parse().unwrap())
            .collect();
        for id in &ids[..MAX_TOUCHED] {
            agent.inner.notify_machine(id);
        }
        let (_, changed) = agent.inner.changed_since(since);
        assert_eq!(changed.map(|c| c.len()), Some(MAX_TOUCHED));
        // One more machine: the map is forgotten and readers are told to read everything.
        agent.inner.notify_machine(&ids[MAX_TOUCHED]);
        assert_eq!(agent.inner.lock().touched.len(), 0);
        let (now, changed) = agent.inner.changed_since(since);
        assert_eq!(changed, None);
        // Later changes are tracked one by one again.
        agent.inner.notify_machine(&ids[0]);
        assert_eq!(agent.inner.changed_since(now).1, Some(vec![ids[0].clone()]));
    }
}
