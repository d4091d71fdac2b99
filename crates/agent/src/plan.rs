//! Pure decisions: which steps a verb takes from a state, what runs when a step fails for good,
//! what the restart policy does with an exit, and what init is given to boot a version. No I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use aloft_api::{
    GuestPreset, MachineConfig, MachineGuest, MachineState, RestartPolicy, RootfsPersist, VOLUME_FSTYPE,
    VolumeId,
};
use aloft_guest_proto::{FileSpec, MountSpec, RootConfig, RunConfig, RuntimeEnv};

use crate::driver::{BaseInfo, ExitInfo, FIRST_VOLUME_DISK, ImageInfo, NetInfo};
use crate::error::AgentError;
use crate::model::{OpKind, Step, Undo};

/// The steps of `kind` from `from`, and the state they end in.
pub(crate) fn plan(kind: OpKind, from: MachineState, skip_launch: bool) -> (Vec<Step>, MachineState) {
    use MachineState as S;
    use Step::*;
    match (kind, from) {
        (OpKind::Create, _) => {
            let mut steps = vec![PullImage, BuildBase, MakeDisk, AttachNetwork, WriteSpec];
            if skip_launch {
                (steps, S::Created)
            } else {
                steps.extend([StartVm, WaitStarted]);
                (steps, S::Started)
            }
        }
        (OpKind::Start, S::Suspended) => (vec![ResumeVm, DiscardSnapshot, WaitStarted], S::Started),
        (OpKind::Start, S::Created) => (vec![AttachNetwork, WriteSpec, StartVm, WaitStarted], S::Started),
        // A restart-policy restart (from `started`, the VM just exited) keeps the writable layer.
        (OpKind::Start, S::Started) => (
            vec![Backoff, KillVm, AttachNetwork, WriteSpec, StartVm, WaitStarted],
            S::Started,
        ),
        (OpKind::Start, _) => (
            vec![KillVm, AttachNetwork, ResetDisk, WriteSpec, StartVm, WaitStarted],
            S::Started,
        ),
        (OpKind::Stop, S::Suspended) => (vec![DiscardSnapshot], S::Stopped),
        (OpKind::Stop, _) => (vec![StopVm], S::Stopped),
        (OpKind::Suspend, _) => (vec![SuspendVm], S::Suspended),
        (OpKind::Restart, _) => (
            vec![StopVm, ResetDisk, WriteSpec, StartVm, WaitStarted],
            S::Started,
        ),
        (OpKind::Update, S::Started) => {
            let mut steps = vec![PullImage, BuildBase, StopVm, ResetDisk, WriteSpec];
            if skip_launch {
                (steps, S::Stopped)
            } else {
                steps.extend([StartVm, WaitStarted]);
                (steps, S::Started)
            }
        }
        (OpKind::Update, _) => (
            vec![
                PullImage,
                BuildBase,
                KillVm,
                DiscardSnapshot,
                ResetDisk,
                WriteSpec,
            ],
            S::Stopped,
        ),
        (OpKind::Destroy, _) => (
            vec![
                KillVm,
                DiscardSnapshot,
                RemoveMachineDir,
                RemoveDisk,
                DetachNetwork,
            ],
            S::Destroyed,
        ),
    }
}

/// Whether `kind` keeps the writable layer under `config`'s `rootfs.persist` (or the deprecated
/// `guest.persist_rootfs`): `always` keeps it across starts, `restart` across restarts.
pub(crate) fn keeps_rootfs(kind: OpKind, config: &MachineConfig) -> bool {
    let persist = config
        .rootfs
        .as_ref()
        .and_then(|r| r.persist)
        .or_else(|| config.guest.as_ref().and_then(|g| g.persist_rootfs))
        .unwrap_or(RootfsPersist::Never);
    matches!(
        (kind, persist),
        (OpKind::Start, RootfsPersist::Always)
            | (OpKind::Restart, RootfsPersist::Always | RootfsPersist::Restart)
    )
}

/// What runs after step `failed` of `kind` (from `from`) failed for good, and where the machine
/// ends: a rollback (create before boot, update before the old VM stopped), a fallback (suspend
/// stops instead, a snapshot that does not resume boots cold), or just making sure no VM is left
/// half-started (`failed`).
pub(crate) fn undo(kind: OpKind, from: MachineState, failed: Step) -> Undo {
    use MachineState as S;
    use Step::*;
    let (steps, end) = match (kind, failed) {
        (OpKind::Create, StartVm | WaitStarted) => (vec![KillVm], S::Failed),
        (OpKind::Create, _) => (
            vec![KillVm, RemoveMachineDir, RemoveDisk, DetachNetwork],
            S::Destroyed,
        ),
        (OpKind::Update, PullImage | BuildBase) => (Vec::new(), from),
        (OpKind::Suspend, _) => (vec![StopVm], S::Stopped),
        (OpKind::Start, ResumeVm) if from == S::Suspended => {
            return Undo {
                steps: vec![KillVm, DiscardSnapshot, WriteSpec, StartVm, WaitStarted],
                end: S::Started,
                fallback: true,
            };
        }
        (OpKind::Destroy, _) => (Vec::new(), S::Failed),
        _ => (vec![KillVm], S::Failed),
    };
    Undo {
        steps,
        end,
        fallback: false,
    }
}

/// The state shown while an undo plan runs.
pub(crate) fn undo_state(kind: OpKind, end: MachineState, current: MachineState) -> MachineState {
    match (kind, end) {
        (OpKind::Create, MachineState::Destroyed) => MachineState::LaunchFailed,
        (OpKind::Suspend, MachineState::Stopped) => MachineState::Stopping,
        _ => current,
    }
}

/// Restart-policy knobs ([`crate::AgentConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartBackoff {
    /// Wait before the first restart; doubles per restart.
    pub initial: Duration,
    /// Longest wait.
    pub max: Duration,
    /// An instance that ran this long before exiting starts the count afresh.
    pub window: Duration,
}

impl Default for RestartBackoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            window: Duration::from_secs(300),
        }
    }
}

/// Fly's default `max_retries` for `on-failure`.
pub const DEFAULT_MAX_RETRIES: u32 = 10;

/// What to do after the workload exited on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitDecision {
    /// Start it again after `backoff`; this is restart number `count`.
    Restart { backoff: Duration, count: u32 },
    /// Destroy it (`auto_destroy`).
    Destroy,
    /// Leave it stopped.
    Stop,
}

/// The restart policy applied to `exit`, given the restarts so far (`restarts`, already reset by
/// the caller when the instance outlived the window).
pub(crate) fn on_exit(
    config: &MachineConfig,
    exit: &ExitInfo,
    restarts: u32,
    backoff: &RestartBackoff,
) -> ExitDecision {
    let restart = config.restart.clone().unwrap_or_default();
    let policy = restart.policy.unwrap_or(RestartPolicy::OnFailure);
    let wants = match policy {
        RestartPolicy::No => false,
        RestartPolicy::Always => restart.max_retries.is_none_or(|max| restarts < max),
        RestartPolicy::OnFailure | RestartPolicy::SpotPrice => {
            exit.is_failure() && restarts < restart.max_retries.unwrap_or(DEFAULT_MAX_RETRIES)
        }
    };
    if wants {
        let factor = 1u32.checked_shl(restarts.min(20)).unwrap_or(u32::MAX);
        let wait = backoff.initial.saturating_mul(factor).min(backoff.max);
        ExitDecision::Restart {
            backoff: wait,
            count: restarts + 1,
        }
    } else if config.auto_destroy == Some(true) {
        ExitDecision::Destroy
    } else {
        ExitDecision::Stop
    }
}

/// The guest size a config asks for: (vcpus, memory MiB).
pub(crate) fn guest_size(config: &MachineConfig) -> Result<(u32, u32), AgentError> {
    let preset = match &config.size {
        Some(name) => Some(GuestPreset::find(name).ok_or_else(|| AgentError::InvalidConfig {
            reason: format!("unknown size {name:?}; use a preset such as shared-cpu-1x or give guest.cpus and guest.memory_mb"),
        })?),
        None => None,
    };
    let guest = match (&config.guest, preset) {
        (Some(g), _) => g.clone(),
        (None, Some(p)) => p.to_guest(),
        (None, None) => MachineGuest::default(),
    };
    guest.check().map_err(|e| AgentError::InvalidConfig {
        reason: e.to_string(),
    })?;
    Ok((guest.cpus.unwrap_or(1), guest.memory_mb.unwrap_or(256)))
}

/// The writable disk size, MiB.
pub(crate) fn disk_mib(config: &MachineConfig, default: u64) -> u64 {
    config
        .rootfs
        .as_ref()
        .and_then(|r| r.size_gb)
        .map_or(default, |gb| u64::from(gb) * 1024)
}

/// Checks a config before anything is recorded: what would make every boot fail is refused.
pub(crate) fn validate(config: &MachineConfig) -> Result<(), AgentError> {
    let invalid = |reason: &str| {
        Err(AgentError::InvalidConfig {
            reason: reason.to_owned(),
        })
    };
    match config.image.as_deref().map(str::trim) {
        None | Some("") => {
            return invalid(
                "image is required: set config.image to an image reference such as busybox:latest",
            );
        }
        Some(_) => {}
    }
    guest_size(config)?;
    files(config, None)?;
    if !config.containers.is_empty() {
        return invalid(
            "multi-container machines (config.containers) are not supported yet: use config.image",
        );
    }
    volume_mount(config)?;
    for (i, service) in config.services.iter().enumerate() {
        if !matches!(service.internal_port, Some(p) if p > 0) {
            return Err(AgentError::InvalidConfig {
                reason: format!(
                    "services[{i}].internal_port is required: the port the app listens on, 1 to 65535"
                ),
            });
        }
        if let Some(p) = service.protocol.as_deref()
            && !p.eq_ignore_ascii_case("tcp")
            && !p.eq_ignore_ascii_case("udp")
        {
            return Err(AgentError::InvalidConfig {
                reason: format!("services[{i}].protocol {p:?} is not served: use tcp or udp"),
            });
        }
    }
    if let Some(s) = &config.schedule
        && schedule_period(s, Duration::from_secs(3600)).is_none()
    {
        return Err(AgentError::InvalidConfig {
            reason: format!("unknown schedule {s:?}: use hourly, daily, weekly or monthly"),
        });
    }
    Ok(())
}

/// A machine's volume mount (`config.mounts[0]`), checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeMount {
    /// The volume.
    pub(crate) volume: VolumeId,
    /// Where the guest sees it: absolute, normalized, no trailing slash.
    pub(crate) path: String,
}

/// Where a volume may not be mounted, nor under: the kernel's filesystems, which init moves into
/// the new root (a volume over them would hide the machine's devices or its view of itself).
const RESERVED_MOUNT_PATHS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// The volume `config` mounts, checked as far as it can be without looking at the host: at most
/// one mount (as on Fly), naming a volume id, at a usable path. Errors are [`AgentError::Mount`]
/// (422). Whether the volume is on this host and free is the agent's to check.
pub(crate) fn volume_mount(config: &MachineConfig) -> Result<Option<VolumeMount>, AgentError> {
    let refuse = |reason: String| Err(AgentError::Mount { reason });
    let m = match config.mounts.as_slice() {
        [] => return Ok(None),
        [m] => m,
        more => {
            return refuse(format!(
                "config.mounts has {} entries: only one volume per machine (a machine mounts at most one volume); keep one mount",
                more.len()
            ));
        }
    };
    let volume = match m.volume.as_deref().map(str::trim) {
        None | Some("") => {
            return refuse(
                "mounts[0].volume is required: the id (vol_…) of a volume on the machine's host".to_owned(),
            );
        }
        Some(v) => match v.parse::<VolumeId>() {
            Ok(id) => id,
            Err(e) => return refuse(format!("mounts[0].volume: {e}")),
        },
    };
    match m.path.as_deref().map(str::trim) {
        None | Some("") => refuse(
            "mounts[0].path is required: where the volume appears in the guest, such as /data".to_owned(),
        ),
        Some(_) => match mount_path(m.path.as_deref().unwrap_or_default()) {
            Ok(path) => Ok(Some(VolumeMount { volume, path })),
            Err(reason) => refuse(format!("mounts[0].path: {reason}")),
        },
    }
}

/// A volume's mount point checked and normalized (one trailing slash is dropped): absolute, no
/// empty, `.` or `..` components, not `/`, not at or under [`RESERVED_MOUNT_PATHS`]. The error
/// says what to write instead.
pub(crate) fn mount_path(path: &str) -> Result<String, String> {
    if path.is_empty() {
        return Err("is required: where the volume appears in the guest, such as /data".to_owned());
    }
    if !path.starts_with('/') {
        return Err(format!(
            "{path:?} is not an absolute path: write it from /, such as /data"
        ));
    }
    if path.contains('\0') {
        return Err(format!("{path:?} contains a NUL byte"));
    }
    if path.len() > 1024 {
        return Err("is longer than 1024 bytes".to_owned());
    }
    let trimmed = match path.strip_suffix('/') {
        Some(t) if !t.is_empty() => t,
        _ => path,
    };
    if trimmed == "/" {
        return Err(
            "/ is the machine's root filesystem and cannot be a volume: mount it at a directory such as /data"
                .to_owned(),
        );
    }
    if trimmed
        .split('/')
        .skip(1)
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "{path:?} is not a normalized path (no //, . or .. components): write it as a plain absolute path such as /data"
        ));
    }
    if let Some(r) = RESERVED_MOUNT_PATHS.iter().find(|r| {
        trimmed == **r
            || trimmed
                .strip_prefix(**r)
                .is_some_and(|rest| rest.starts_with('/'))
    }) {
        return Err(format!(
            "{path:?} is in {r}, which the guest kernel provides: mount the volume elsewhere, such as /data"
        ));
    }
    Ok(trimmed.to_owned())
}

/// How long after its last start a machine with `config.schedule` is started again, given the
/// length of an hour (shortened by tests); `None` for a schedule Fly does not have. Empty means
/// no schedule. A month is 30 days.
pub(crate) fn schedule_period(schedule: &str, hour: Duration) -> Option<Duration> {
    Some(match schedule.trim() {
        "hourly" => hour,
        "daily" => hour * 24,
        "weekly" => hour * 24 * 7,
        "monthly" => hour * 24 * 30,
        _ => return None,
    })
}

/// Checks that every secret `config` names (`processes[0].secrets`, `files[].secret_name`) is
/// among `secrets`, before a create or update is accepted.
pub(crate) fn check_secret_refs(
    config: &MachineConfig,
    secrets: &BTreeMap<String, String>,
) -> Result<(), AgentError> {
    process_secrets(config, secrets)?;
    files(config, Some(secrets))?;
    Ok(())
}

/// The environment of the workload: `config.env`, then the app's secrets over it (unless
/// `processes[0].ignore_app_secrets`), then `processes[0].secrets` (`env_var` ← secret `name`).
fn environment(
    config: &MachineConfig,
    secrets: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, AgentError> {
    let mut env = config.env.clone();
    let ignore = config
        .processes
        .first()
        .and_then(|p| p.ignore_app_secrets)
        .unwrap_or(false);
    if !ignore {
        env.extend(secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    env.extend(process_secrets(config, secrets)?);
    Ok(env)
}

/// `processes[0].secrets` resolved: (env var, value).
fn process_secrets(
    config: &MachineConfig,
    secrets: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, AgentError> {
    let Some(p) = config.processes.first() else {
        return Ok(Vec::new());
    };
    p.secrets
        .iter()
        .map(|s| {
            let var = s.env_var.clone().or_else(|| s.name.clone()).unwrap_or_default();
            let name = s.name.clone().unwrap_or_else(|| var.clone());
            if var.is_empty() {
                return Err(AgentError::InvalidConfig {
                    reason: "processes[].secrets: an entry has neither env_var nor name".to_owned(),
                });
            }
            let value = secrets.get(&name).ok_or_else(|| AgentError::InvalidConfig {
                reason: format!(
                    "processes[].secrets: the app has no secret {name}; set it with `aloft secrets set {name}=…`"
                ),
            })?;
            Ok((var, value.clone()))
        })
        .collect()
}

/// The files init writes. `secrets: None` only checks them (a `secret_name` is resolved when the
/// secrets are known).
fn files(
    config: &MachineConfig,
    secrets: Option<&BTreeMap<String, String>>,
) -> Result<Vec<FileSpec>, AgentError> {
    config
        .files
        .iter()
        .map(|f| {
            let path = f.guest_path.clone().unwrap_or_default();
            if !path.starts_with('/') {
                return Err(AgentError::InvalidConfig {
                    reason: format!("files: guest_path {path:?} must be an absolute path"),
                });
            }
            let contents = match (&f.raw_value, &f.secret_name, &f.image_config) {
                (Some(_), _, _) => match f.decoded_raw_value() {
                    Some(Ok(bytes)) => bytes,
                    _ => {
                        return Err(AgentError::InvalidConfig {
                            reason: format!("files: raw_value of {path} is not base64"),
                        });
                    }
                },
                (None, Some(name), _) => match secrets {
                    None => Vec::new(),
                    Some(secrets) => {
                        let value = secrets.get(name).ok_or_else(|| AgentError::InvalidConfig {
                            reason: format!(
                                "files: {path} names secret {name}, which the app does not have; set it with `aloft secrets set {name}=…` (base64 content)"
                            ),
                        })?;
                        use base64::Engine as _;
                        base64::engine::general_purpose::STANDARD
                            .decode(value.trim())
                            .map_err(|_| AgentError::InvalidConfig {
                                reason: format!(
                                    "files: secret {name} for {path} is not base64; store the file's content base64-encoded"
                                ),
                            })?
                    }
                },
                _ => {
                    return Err(AgentError::InvalidConfig {
                        reason: format!("files: {path} needs raw_value"),
                    });
                }
            };
            Ok(FileSpec {
                guest_path: path,
                contents,
                mode: f.mode,
            })
        })
        .collect()
}

/// Facts about the machine init exports as `FLY_*`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Identity<'a> {
    pub(crate) id: &'a str,
    pub(crate) app: &'a str,
    pub(crate) region: &'a str,
    pub(crate) version: &'a str,
}

/// The run config init boots `config` with; the app's `secrets` become environment variables
/// over `config.env` (and `files[].secret_name` contents).
pub(crate) fn run_config(
    who: Identity<'_>,
    config: &MachineConfig,
    secrets: &BTreeMap<String, String>,
    image: &ImageInfo,
    base: &BaseInfo,
    net: &NetInfo,
) -> Result<RunConfig, AgentError> {
    let (_, memory_mb) = guest_size(config)?;
    let init = config.init.clone().unwrap_or_default();
    let some = |v: Vec<String>| if v.is_empty() { None } else { Some(v) };
    let hostname = config
        .dns
        .as_ref()
        .and_then(|d| d.hostname.clone())
        .unwrap_or_else(|| who.id.to_owned());
    Ok(RunConfig {
        hostname,
        image: image.config.clone(),
        exec: some(init.exec),
        entrypoint: some(init.entrypoint),
        cmd: some(init.cmd),
        user: None,
        working_dir: None,
        env: environment(config, secrets)?,
        runtime: RuntimeEnv {
            app_name: who.app.to_owned(),
            machine_id: who.id.to_owned(),
            region: who.region.to_owned(),
            private_ip: net.private_ip.clone(),
            process_group: config
                .metadata
                .get("fly_process_group")
                .or_else(|| config.metadata.get("process_group"))
                .cloned()
                .unwrap_or_default(),
            image_ref: image.pinned.clone(),
            machine_version: who.version.to_owned(),
            vm_memory_mb: memory_mb,
            primary_region: config.env.get("PRIMARY_REGION").cloned().unwrap_or_default(),
        },
        root: RootConfig {
            device: Some("/dev/vda".into()),
            fstype: base.fstype.clone(),
            writable_device: Some("/dev/vdb".into()),
        },
        // The launch spec attaches the volume as disk `FIRST_VOLUME_DISK`.
        mounts: volume_mount(config)?
            .map(|m| MountSpec {
                volume: m.volume.to_string(),
                serial: aloft_vm::disk_serial(FIRST_VOLUME_DISK),
                path: m.path,
                fstype: VOLUME_FSTYPE.to_owned(),
            })
            .into_iter()
            .collect(),
        network: net.net_config.clone(),
        dns: net.dns.clone(),
        etc_hosts: net.etc_hosts.clone(),
        files: files(config, Some(secrets))?,
        stop_signal: config
            .stop_config
            .as_ref()
            .and_then(|s| s.signal)
            .map(|s| s.as_str().to_owned()),
    })
}

/// Guest kernel arguments from the config.
pub(crate) fn kernel_args(config: &MachineConfig) -> Vec<String> {
    let mut args = config
        .guest
        .as_ref()
        .map(|g| g.kernel_args.clone())
        .unwrap_or_default();
    if let Some(init) = &config.init {
        args.extend(init.kernel_args.iter().cloned());
    }
    args
}

#[cfg(test)]
mod tests {
    use aloft_api::{MachineRestart, Verb};

    use super::*;

    fn exit(code: i32) -> ExitInfo {
        ExitInfo {
            exit_code: Some(code),
            ..ExitInfo::default()
        }
    }

    fn cfg(policy: Option<RestartPolicy>, max: Option<u32>) -> MachineConfig {
        MachineConfig {
            image: Some("busybox".into()),
            restart: Some(MachineRestart {
                policy,
                max_retries: max,
                gpu_bid_price: None,
            }),
            ..MachineConfig::default()
        }
    }

    #[test]
    fn restart_policies_decide() {
        let b = RestartBackoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            window: Duration::from_secs(60),
        };
        assert_eq!(
            on_exit(&cfg(Some(RestartPolicy::No), None), &exit(1), 0, &b),
            ExitDecision::Stop
        );
        assert_eq!(
            on_exit(&cfg(Some(RestartPolicy::Always), None), &exit(0), 0, &b),
            ExitDecision::Restart {
                backoff: Duration::from_millis(100),
                count: 1
            }
        );
        assert_eq!(
            on_exit(&cfg(Some(RestartPolicy::OnFailure), None), &exit(0), 0, &b),
            ExitDecision::Stop
        );
        assert_eq!(
            on_exit(&cfg(Some(RestartPolicy::OnFailure), Some(2)), &exit(3), 1, &b),
            ExitDecision::Restart {
                backoff: Duration::from_millis(200),
                count: 2
            }
        );
        assert_eq!(
            on_exit(&cfg(Some(RestartPolicy::OnFailure), Some(2)), &exit(3), 2, &b),
            ExitDecision::Stop
        );
        // Default: on-failure with 10 retries; backoff is capped.
        assert_eq!(
            on_exit(&cfg(None, None), &exit(1), 9, &b),
            ExitDecision::Restart {
                backoff: Duration::from_secs(1),
                count: 10
            }
        );
        assert_eq!(on_exit(&cfg(None, None), &exit(1), 10, &b), ExitDecision::Stop);
        let mut auto = cfg(Some(RestartPolicy::No), None);
        auto.auto_destroy = Some(true);
        assert_eq!(on_exit(&auto, &exit(0), 0, &b), ExitDecision::Destroy);
        let killed = ExitInfo {
            signal: Some(9),
            ..ExitInfo::default()
        };
        assert!(matches!(
            on_exit(&cfg(Some(RestartPolicy::OnFailure), None), &killed, 0, &b),
            ExitDecision::Restart { .. }
        ));
    }

    #[test]
    fn plans_end_where_the_api_says() {
        use MachineState as S;
        for (kind, verb, from) in [
            (OpKind::Start, Verb::Start, S::Stopped),
            (OpKind::Start, Verb::Start, S::Created),
            (OpKind::Start, Verb::Start, S::Suspended),
            (OpKind::Start, Verb::Start, S::Failed),
            (OpKind::Stop, Verb::Stop, S::Started),
            (OpKind::Stop, Verb::Stop, S::Suspended),
            (OpKind::Suspend, Verb::Suspend, S::Started),
            (OpKind::Restart, Verb::Restart, S::Started),
            (OpKind::Update, Verb::Update, S::Started),
            (OpKind::Update, Verb::Update, S::Stopped),
            (OpKind::Destroy, Verb::Destroy { force: false }, S::Stopped),
            (OpKind::Destroy, Verb::Destroy { force: true }, S::Started),
        ] {
            let (_, target) = plan(kind, from, false);
            assert_eq!(verb.transition(from).unwrap().to, target, "{kind:?} from {from}");
        }
    }

    #[test]
    fn mount_paths_are_absolute_normalized_and_not_the_kernels() {
        for (ok, normalized) in [
            ("/data", "/data"),
            ("/data/", "/data"),
            ("/var/lib/postgresql", "/var/lib/postgresql"),
            ("/run/x", "/run/x"),
            ("/devices", "/devices"),
            ("/a b/c.d", "/a b/c.d"),
        ] {
            assert_eq!(mount_path(ok).as_deref(), Ok(normalized), "{ok:?}");
        }
        for (bad, says) in [
            ("", "is required"),
            ("data", "not an absolute path"),
            ("./data", "not an absolute path"),
            ("/", "root filesystem"),
            ("//", "root filesystem"),
            ("/a//b", "not a normalized path"),
            ("/a/./b", "not a normalized path"),
            ("/a/..", "not a normalized path"),
            ("/../data", "not a normalized path"),
            ("/data//", "not a normalized path"),
            ("/proc", "in /proc"),
            ("/sys/fs/x", "in /sys"),
            ("/dev/", "in /dev"),
            ("/a\0b", "NUL"),
        ] {
            let e = mount_path(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        assert!(mount_path(&format!("/{}", "a".repeat(2000))).is_err());
    }

    #[test]
    fn configs_are_validated() {
        let mut c = MachineConfig::default();
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("image is required")
        );
        c.image = Some("busybox".into());
        validate(&c).unwrap();
        c.size = Some("shared-cpu-3x".into());
        assert!(validate(&c).unwrap_err().to_string().contains("unknown size"));
        c.size = Some("shared-cpu-2x".into());
        assert_eq!(guest_size(&c).unwrap(), (2, 512));
        c.files = vec![aloft_api::File {
            guest_path: Some("etc/x".into()),
            raw_value: Some("aGk=".into()),
            ..aloft_api::File::default()
        }];
        assert!(validate(&c).unwrap_err().to_string().contains("absolute"));
        c.files.clear();

        // A service the edge could not reach: no port to dial, or a transport it does not serve.
        let service = |port: Option<u16>, protocol: Option<&str>| aloft_api::MachineService {
            internal_port: port,
            protocol: protocol.map(str::to_owned),
            ..aloft_api::MachineService::default()
        };
        for (bad, says) in [
            (
                service(None, Some("tcp")),
                "services[0].internal_port is required",
            ),
            (service(Some(0), None), "services[0].internal_port is required"),
            (service(Some(80), Some("sctp")), "\"sctp\" is not served"),
        ] {
            c.services = vec![bad];
            let e = validate(&c).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
        c.services = vec![service(Some(8080), None), service(Some(53), Some("UDP"))];
        validate(&c).unwrap();
    }
}
