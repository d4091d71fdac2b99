//! The app config (fly.toml's schema) and its decoding from the spanned TOML tree.
//!
//! Decoding applies flyctl's tolerances (`internal/appconfig/patches.go`): a table or an array of
//! tables for list sections, the singular and plural spellings (`vm`/`compute`/`computes`,
//! `mount`/`mounts`, `metric`/`metrics`), numbers given as strings and the reverse where flyctl
//! accepts them, legacy shapes (env as a list, `processes = []`, concurrency as `"soft,hard"`).
//! Unknown keys are warnings; wrong types and impossible values are errors pointing at the key.

use std::collections::BTreeMap;

use aloft_api::{
    Autostop, Duration, HeaderValue, HttpOptions, HttpResponseOptions, MachineCheck, MachineHttpHeader,
    MachinePort, MachineServiceCheck, MachineServiceConcurrency, ProxyProtoOptions, ReplayCache,
    ReplayCacheType, RootfsPersist, Static, StopSignal, TlsOptions,
};
use serde::{Serialize, Serializer};

use crate::decode::{Ctx, IntUnit, index, join};
use crate::diag::Origin;
use crate::node::{Node, Value};

/// The default `internal_port` of `[http_service]` and `[[services]]`.
pub const DEFAULT_INTERNAL_PORT: u16 = 8080;
/// The longest `kill_timeout` Fly allows.
pub const MAX_KILL_TIMEOUT_SECS: u64 = 300;

/// An app config: everything `aloft.toml` (or `fly.toml`) says, normalised.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AppConfig {
    /// App name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// Region where `min_machines_running` applies; exported as `PRIMARY_REGION`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_region: Option<String>,
    /// First signal of a stop (default SIGINT on Fly).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kill_signal: Option<StopSignal>,
    /// Time between the kill signal and the forced stop (default 5 s, at most 300 s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kill_timeout: Option<Duration>,
    /// Swap file size in MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_size_mb: Option<u32>,
    /// Command run by `console` in a throwaway machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_command: Option<String>,
    /// Placement on dedicated hosts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_dedication_id: Option<String>,
    /// `[build]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,
    /// `[deploy]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deploy: Option<Deploy>,
    /// `[env]`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// `[processes]`: group name → command line.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub processes: BTreeMap<String, String>,
    /// `[http_service]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_service: Option<HttpService>,
    /// `[[services]]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    /// `[checks.NAME]`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<String, TopLevelCheck>,
    /// `[[mounts]]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// `[[vm]]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vm: Vec<Compute>,
    /// `[[restart]]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restart: Vec<Restart>,
    /// `[[metrics]]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<Metrics>,
    /// `[[statics]]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub statics: Vec<Static>,
    /// `[[files]]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileConfig>,
    /// `[experimental]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experimental: Option<Experimental>,
    /// Where each top-level key is, for messages about the config as a whole.
    #[serde(skip)]
    pub origins: BTreeMap<String, Origin>,
    /// The file it was read from (for messages).
    #[serde(skip)]
    pub path: std::path::PathBuf,
}

/// `[build]`: how the image is made.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Build {
    /// Buildpacks builder image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub builder: Option<String>,
    /// Buildpacks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub buildpacks: Vec<String>,
    /// Build arguments.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, String>,
    /// A prebuilt image: no build.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Dockerfile path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// Ignore file path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignorefile: Option<String>,
    /// Multi-stage build target.
    #[serde(rename = "build-target", skip_serializing_if = "Option::is_none")]
    pub build_target: Option<String>,
    /// Other keys (`builtin`, `settings`, `compose`, `compression`, …), kept verbatim.
    #[serde(flatten)]
    pub other: BTreeMap<String, toml::Value>,
}

/// Deploy strategies.
pub const DEPLOY_STRATEGIES: [&str; 4] = ["rolling", "immediate", "canary", "bluegreen"];

/// `[deploy]`: how releases roll out.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Deploy {
    /// `rolling` (default), `immediate`, `canary` or `bluegreen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// ≥ 1: a count of machines; < 1: a fraction (default 0.33).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<f64>,
    /// Per-machine wait for started and healthy (default 5 m).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_timeout: Option<Duration>,
    /// Command run in an ephemeral machine before the release.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_command: Option<String>,
    /// Time limit of the release command (default 5 m).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_command_timeout: Option<Duration>,
    /// Size of the release command machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_command_vm: Option<Compute>,
    /// Command run once on the first deploy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed_command: Option<String>,
}

/// `[http_service]`: one HTTP service on ports 80 and 443.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HttpService {
    /// Port the app listens on (default 8080).
    pub internal_port: u16,
    /// Redirect http to https.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force_https: Option<bool>,
    /// `off`, `stop` or `suspend` (booleans accepted).
    #[serde(serialize_with = "autostop_str", skip_serializing_if = "Option::is_none")]
    pub auto_stop_machines: Option<Autostop>,
    /// Start machines on demand.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_start_machines: Option<bool>,
    /// Machines kept running in the primary region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_machines_running: Option<u32>,
    /// Process groups this applies to (empty: the default group).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
    /// Load limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<MachineServiceConcurrency>,
    /// TLS options of port 443.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_options: Option<TlsOptions>,
    /// HTTP options of both ports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_options: Option<HttpOptions>,
    /// HTTP checks (`[[http_service.checks]]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<MachineServiceCheck>,
    /// Where it is.
    #[serde(skip)]
    pub origin: Origin,
}

/// `[[services]]`: a service with its own ports.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Service {
    /// `tcp` (default) or `udp`.
    pub protocol: String,
    /// Port the app listens on (default 8080).
    pub internal_port: u16,
    /// `off`, `stop` or `suspend`.
    #[serde(serialize_with = "autostop_str", skip_serializing_if = "Option::is_none")]
    pub auto_stop_machines: Option<Autostop>,
    /// Start machines on demand.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_start_machines: Option<bool>,
    /// Machines kept running in the primary region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_machines_running: Option<u32>,
    /// Process groups (empty: the default group).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
    /// Public ports.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<MachinePort>,
    /// Load limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<MachineServiceConcurrency>,
    /// `[[services.tcp_checks]]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tcp_checks: Vec<MachineServiceCheck>,
    /// `[[services.http_checks]]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http_checks: Vec<MachineServiceCheck>,
    /// Where it is.
    #[serde(skip)]
    pub origin: Origin,
}

/// `[checks.NAME]`: a top-level check.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TopLevelCheck {
    /// The check.
    #[serde(flatten)]
    pub check: MachineCheck,
    /// Process groups (empty: the default group).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
    /// Where it is.
    #[serde(skip)]
    pub origin: Origin,
}

/// `[[mounts]]`: a volume.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Mount {
    /// Volume name.
    pub source: String,
    /// Mount point.
    pub destination: String,
    /// Process groups (empty: the default group).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
    /// Size of a volume the deploy creates, GB.
    #[serde(rename = "initial_size", skip_serializing_if = "Option::is_none")]
    pub initial_size_gb: Option<u64>,
    /// Days snapshots are kept (1–60).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_retention: Option<u32>,
    /// Take daily snapshots (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_snapshots: Option<bool>,
    /// Usage percentage that triggers auto-extension (50–99).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_extend_size_threshold: Option<u32>,
    /// GB added per extension (1–100).
    #[serde(
        rename = "auto_extend_size_increment",
        skip_serializing_if = "Option::is_none"
    )]
    pub auto_extend_size_increment_gb: Option<u64>,
    /// Auto-extension limit, GB (1–500).
    #[serde(rename = "auto_extend_size_limit", skip_serializing_if = "Option::is_none")]
    pub auto_extend_size_limit_gb: Option<u64>,
    /// Where it is.
    #[serde(skip)]
    pub origin: Origin,
}

/// `[[vm]]`: machine size for some process groups.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Compute {
    /// Preset name (lowest precedence).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// Memory from `memory` ("1gb", "512mb" or MB), MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<u32>,
    /// `memory_mb`, overrides `memory`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// vCPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// `shared` or `performance`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_kind: Option<String>,
    /// GPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// GPU model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_kind: Option<String>,
    /// Kernel arguments.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kernel_args: Vec<String>,
    /// Placement on dedicated hosts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_dedication_id: Option<String>,
    /// Root filesystem persistence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persist_rootfs: Option<RootfsPersist>,
    /// Memory ceiling, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<u32>,
    /// Process groups (empty: every group no other `[[vm]]` names).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
    /// Where it is.
    #[serde(skip)]
    pub origin: Origin,
}

/// `[[restart]]`: restart policy for some process groups.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Restart {
    /// `always`, `never` or `on-failure`.
    pub policy: aloft_api::RestartPolicy,
    /// Restarts before giving up (on-failure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Process groups (empty: every group no other `[[restart]]` names).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
    /// Where it is.
    #[serde(skip)]
    pub origin: Origin,
}

/// `[[metrics]]`: a Prometheus scrape target.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Metrics {
    /// Port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Scrape over https.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https: Option<bool>,
    /// Process groups (empty: the default group).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
    /// Where it is.
    #[serde(skip)]
    pub origin: Origin,
}

/// Where a `[[files]]` entry's content comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileSource {
    /// A file next to the config, read at expansion.
    LocalPath(String),
    /// An app secret holding base64 content.
    SecretName(String),
    /// The content itself (plain text; base64-encoded at expansion).
    RawValue(String),
}

/// `[[files]]`: a file written into the guest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileConfig {
    /// Absolute path in the guest.
    pub guest_path: String,
    /// The content.
    #[serde(flatten)]
    pub source: FileSource,
    /// chmod mode bits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Process groups (empty: the default group).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
    /// Where it is.
    #[serde(skip)]
    pub origin: Origin,
}

/// `[experimental]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Experimental {
    /// Command when `[processes]` gives none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// Entrypoint override.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// Exact argv.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exec: Vec<String>,
    /// Other keys (`auto_rollback`, `enable_consul`, `lazy_load_images` …), kept verbatim.
    #[serde(flatten)]
    pub other: BTreeMap<String, toml::Value>,
}

#[expect(
    clippy::ref_option,
    reason = "serde's serialize_with passes a reference to the field"
)]
fn autostop_str<S: Serializer>(value: &Option<Autostop>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(a) => s.serialize_str(a.as_str()),
        None => s.serialize_none(),
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

const TOP_KEYS: &[&str] = &[
    "app",
    "primary_region",
    "kill_signal",
    "kill_timeout",
    "swap_size_mb",
    "console_command",
    "host_dedication_id",
    "build",
    "deploy",
    "env",
    "processes",
    "http_service",
    "services",
    "checks",
    "mounts",
    "mount",
    "vm",
    "compute",
    "computes",
    "restart",
    "metrics",
    "metric",
    "statics",
    "files",
    "experimental",
    "machine_checks",
];

/// Decodes a whole document.
pub(crate) fn decode_app(ctx: &mut Ctx<'_>, root: &Node) -> AppConfig {
    let mut cfg = AppConfig::default();
    let mut moved = MovedFromExperimental::default();
    let Some(entries) = ctx.table(root, "") else {
        return cfg;
    };
    for (key, value) in entries {
        let p = key.name.as_str();
        cfg.origins.insert(key.name.clone(), ctx.origin(&key.span, p));
        match p {
            "app" => cfg.app = ctx.string(value, p),
            "primary_region" => cfg.primary_region = ctx.string(value, p),
            "kill_signal" => cfg.kill_signal = decode_signal(ctx, value, p),
            "kill_timeout" => {
                cfg.kill_timeout = ctx.duration(value, p, IntUnit::Seconds);
                if let Some(d) = cfg.kill_timeout
                    && d.get().as_secs_f64() > MAX_KILL_TIMEOUT_SECS as f64
                {
                    ctx.error(
                        &value.span,
                        p,
                        format!(
                            "{d} is longer than the {MAX_KILL_TIMEOUT_SECS}s maximum; lower kill_timeout"
                        ),
                    );
                }
            }
            "swap_size_mb" => cfg.swap_size_mb = ctx.int(value, p),
            "console_command" => {
                cfg.console_command = ctx.string(value, p);
                if let Some(c) = &cfg.console_command {
                    ctx.split_command(c, &value.span, p);
                }
            }
            "host_dedication_id" => cfg.host_dedication_id = ctx.string(value, p),
            "build" => cfg.build = decode_build(ctx, value, p),
            "deploy" => cfg.deploy = decode_deploy(ctx, value, p),
            "env" => decode_env(ctx, value, p, &mut cfg.env),
            "processes" => cfg.processes = decode_processes(ctx, value, p),
            "http_service" => cfg.http_service = decode_http_service(ctx, value, p),
            "services" => {
                for (node, path) in ctx.tables(value, p) {
                    if let Some(s) = decode_service(ctx, node, &path) {
                        cfg.services.push(s);
                    }
                }
            }
            "checks" => decode_top_checks(ctx, value, p, &mut cfg.checks),
            "mounts" | "mount" => {
                for (node, path) in ctx.tables(value, p) {
                    if let Some(m) = decode_mount(ctx, node, &path) {
                        cfg.mounts.push(m);
                    }
                }
            }
            "vm" | "compute" | "computes" => {
                for (node, path) in ctx.tables(value, p) {
                    if let Some(c) = decode_compute(ctx, node, &path, true) {
                        cfg.vm.push(c);
                    }
                }
            }
            "restart" => {
                for (node, path) in ctx.tables(value, p) {
                    if let Some(r) = decode_restart(ctx, node, &path) {
                        cfg.restart.push(r);
                    }
                }
            }
            "metrics" | "metric" => {
                for (node, path) in ctx.tables(value, p) {
                    if let Some(m) = decode_metrics(ctx, node, &path) {
                        cfg.metrics.push(m);
                    }
                }
            }
            "statics" => {
                for (node, path) in ctx.tables(value, p) {
                    if let Some(s) = decode_static(ctx, node, &path) {
                        cfg.statics.push(s);
                    }
                }
            }
            "files" => {
                for (node, path) in ctx.tables(value, p) {
                    if let Some(f) = decode_file(ctx, node, &path) {
                        cfg.files.push(f);
                    }
                }
            }
            "experimental" => {
                cfg.experimental = decode_experimental(ctx, value, p, &mut moved);
            }
            "machine_checks" => ctx.legacy(
                key,
                p,
                "deploy-time machine checks are not supported by aloft yet",
            ),
            "machine_config" | "container" => {
                ctx.legacy(key, p, "multi-container machines are not supported by aloft yet")
            }
            _ => ctx.unknown(key, p, TOP_KEYS),
        }
    }
    if cfg.kill_timeout.is_none()
        && let Some(d) = moved.kill_timeout
    {
        if d.get().as_secs() > MAX_KILL_TIMEOUT_SECS
            && let Some(origin) = cfg.origins.get("experimental")
        {
            ctx.error_at(
                origin,
                format!("kill_timeout {d} is longer than the {MAX_KILL_TIMEOUT_SECS}s maximum; lower it"),
            );
        }
        cfg.kill_timeout = Some(d);
    }
    if let Some(m) = moved.metrics
        && cfg.metrics.is_empty()
    {
        if m.port.is_none() {
            ctx.error_at(&m.origin, "metrics_path needs metrics_port");
        }
        cfg.metrics.push(m);
    }
    cfg
}

fn decode_signal(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<StopSignal> {
    let name = ctx.string(node, path)?;
    let signal = StopSignal::parse(&name);
    if signal.is_none() {
        let allowed: Vec<&str> = StopSignal::ALL.iter().map(|s| s.as_str()).collect();
        ctx.error(
            &node.span,
            path,
            format!("unsupported signal {name:?}; use one of {}", allowed.join(", ")),
        );
    }
    signal
}

fn decode_build(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<Build> {
    let entries = ctx.table(node, path)?;
    let mut b = Build::default();
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "builder" => b.builder = ctx.string(value, &p),
            "buildpacks" => b.buildpacks = ctx.strings(value, &p).unwrap_or_default(),
            "args" => b.args = ctx.string_map(value, &p).unwrap_or_default(),
            "image" => b.image = ctx.string(value, &p),
            "dockerfile" => b.dockerfile = ctx.string(value, &p),
            "ignorefile" => b.ignorefile = ctx.string(value, &p),
            "build-target" | "build_target" => b.build_target = ctx.string(value, &p),
            "builtin" | "settings" | "compose" | "compression" | "compression_level" => {
                b.other.insert(key.name.clone(), value.to_toml());
            }
            _ => ctx.unknown(
                key,
                &p,
                &[
                    "builder",
                    "buildpacks",
                    "args",
                    "image",
                    "dockerfile",
                    "ignorefile",
                    "build-target",
                    "builtin",
                    "settings",
                    "compose",
                    "compression",
                    "compression_level",
                ],
            ),
        }
    }
    Some(b)
}

fn decode_deploy(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<Deploy> {
    let entries = ctx.table(node, path)?;
    let mut d = Deploy::default();
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "strategy" => {
                d.strategy = ctx.string(value, &p);
                if let Some(s) = &d.strategy
                    && !DEPLOY_STRATEGIES.contains(&s.as_str())
                {
                    ctx.error(
                        &value.span,
                        &p,
                        format!(
                            "unsupported deployment strategy {s:?}; use one of {}",
                            DEPLOY_STRATEGIES.join(", ")
                        ),
                    );
                }
            }
            "max_unavailable" => {
                d.max_unavailable = ctx.float(value, &p);
                if d.max_unavailable.is_some_and(|m| m <= 0.0) {
                    ctx.error(
                        &value.span,
                        &p,
                        "must be above 0: a count of machines (1 or more) or a fraction (below 1)",
                    );
                }
            }
            "wait_timeout" => d.wait_timeout = ctx.duration(value, &p, IntUnit::Seconds),
            "release_command" => {
                d.release_command = ctx.string(value, &p);
                if let Some(c) = &d.release_command {
                    ctx.split_command(c, &value.span, &p);
                }
            }
            "release_command_timeout" => {
                d.release_command_timeout = ctx.duration(value, &p, IntUnit::Seconds);
            }
            "release_command_vm" => {
                d.release_command_vm = decode_compute(ctx, value, &p, false);
            }
            "seed_command" => d.seed_command = ctx.string(value, &p),
            _ => ctx.unknown(
                key,
                &p,
                &[
                    "strategy",
                    "max_unavailable",
                    "wait_timeout",
                    "release_command",
                    "release_command_timeout",
                    "release_command_vm",
                    "seed_command",
                ],
            ),
        }
    }
    Some(d)
}

fn decode_env(ctx: &mut Ctx<'_>, node: &Node, path: &str, env: &mut BTreeMap<String, String>) {
    match &node.value {
        // Legacy: a list of tables, merged in order.
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                decode_env(ctx, item, &index(path, i), env);
            }
        }
        _ => {
            let Some(entries) = ctx.table(node, path) else {
                return;
            };
            for (key, value) in entries {
                let p = join(path, &key.name);
                if key.name.is_empty() || key.name.contains(['=', '\0']) {
                    ctx.error(
                        &key.span,
                        &p,
                        "an environment variable name must be non-empty, without '=' or NUL",
                    );
                    continue;
                }
                if let Some(v) = ctx.string_lenient(value, &p) {
                    if v.contains('\0') {
                        ctx.error(&value.span, &p, "an environment value can't contain NUL");
                        continue;
                    }
                    if key.name.starts_with("FLY_") {
                        ctx.warn(
                            &key.span,
                            &p,
                            "FLY_* variables are set by the platform and override this value",
                        );
                    }
                    env.insert(key.name.clone(), v);
                }
            }
        }
    }
}

fn decode_processes(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match &node.value {
        // Legacy `processes = []` (what the old GraphQL API returned): no process groups.
        Value::Array(items) if items.is_empty() => {}
        // Legacy list form: `[[processes]] name = "web" command = "bin/web"`.
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let p = index(path, i);
                let Some(entries) = ctx.table(item, &p) else {
                    continue;
                };
                let mut name = None;
                let mut command = String::new();
                for (k, v) in entries {
                    let kp = join(&p, &k.name);
                    match k.name.as_str() {
                        "name" => name = ctx.string(v, &kp),
                        "command" => {
                            if let Some(c) = ctx.string(v, &kp) {
                                ctx.split_command(&c, &v.span, &kp);
                                command = c;
                            }
                        }
                        _ => ctx.unknown(k, &kp, &["name", "command"]),
                    }
                }
                match name {
                    Some(n) if valid_group_name(&n) => {
                        out.insert(n, command);
                    }
                    Some(_) => ctx.error(
                        &item.span,
                        &p,
                        "process group names use lowercase letters, digits, '-' and '_'",
                    ),
                    None => ctx.error(&item.span, &p, "a process in a list needs a `name`"),
                }
            }
        }
        _ => {
            let Some(entries) = ctx.table(node, path) else {
                return out;
            };
            for (key, value) in entries {
                let p = join(path, &key.name);
                if !valid_group_name(&key.name) {
                    ctx.error(
                        &key.span,
                        &p,
                        "process group names use lowercase letters, digits, '-' and '_'",
                    );
                    continue;
                }
                if let Some(cmd) = ctx.string(value, &p) {
                    ctx.split_command(&cmd, &value.span, &p);
                    out.insert(key.name.clone(), cmd);
                }
            }
        }
    }
    out
}

fn valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn decode_autostop(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<Autostop> {
    match &node.value {
        Value::Bool(true) => Some(Autostop::Stop),
        Value::Bool(false) => Some(Autostop::Off),
        Value::Str(s) => match s.to_ascii_lowercase().as_str() {
            "off" | "false" => Some(Autostop::Off),
            // The docs once rejected "on"; it always meant stop.
            "stop" | "true" | "on" => Some(Autostop::Stop),
            "suspend" => Some(Autostop::Suspend),
            _ => {
                ctx.error(
                    &node.span,
                    path,
                    format!("unknown value {s:?}; use \"off\", \"stop\" or \"suspend\""),
                );
                None
            }
        },
        _ => {
            ctx.error(
                &node.span,
                path,
                format!(
                    "expected \"off\", \"stop\", \"suspend\" or a boolean, found {}",
                    node.value.describe()
                ),
            );
            None
        }
    }
}

const HTTP_SERVICE_KEYS: &[&str] = &[
    "internal_port",
    "force_https",
    "auto_stop_machines",
    "auto_start_machines",
    "min_machines_running",
    "processes",
    "concurrency",
    "tls_options",
    "http_options",
    "checks",
    "machine_checks",
];

fn decode_http_service(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<HttpService> {
    let entries = ctx.table(node, path)?;
    let mut s = HttpService {
        internal_port: DEFAULT_INTERNAL_PORT,
        origin: ctx.origin(&node.span, path),
        ..HttpService::default()
    };
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "internal_port" => {
                s.internal_port = decode_port(ctx, value, &p).unwrap_or(s.internal_port);
            }
            "force_https" => s.force_https = ctx.bool(value, &p),
            "auto_stop_machines" => s.auto_stop_machines = decode_autostop(ctx, value, &p),
            "auto_start_machines" => s.auto_start_machines = ctx.bool(value, &p),
            "min_machines_running" => s.min_machines_running = ctx.int(value, &p),
            "processes" => s.processes = ctx.strings(value, &p).unwrap_or_default(),
            "concurrency" => s.concurrency = decode_concurrency(ctx, value, &p),
            "tls_options" => s.tls_options = decode_tls_options(ctx, value, &p),
            "http_options" => s.http_options = decode_http_options(ctx, value, &p),
            "checks" => {
                for (node, cp) in ctx.tables(value, &p) {
                    if let Some(c) = decode_service_check(ctx, node, &cp, "http") {
                        s.checks.push(c);
                    }
                }
            }
            "machine_checks" => ctx.legacy(
                key,
                &p,
                "deploy-time machine checks are not supported by aloft yet",
            ),
            _ => ctx.unknown(key, &p, HTTP_SERVICE_KEYS),
        }
    }
    Some(s)
}

const SERVICE_KEYS: &[&str] = &[
    "protocol",
    "internal_port",
    "auto_stop_machines",
    "auto_start_machines",
    "min_machines_running",
    "processes",
    "ports",
    "concurrency",
    "tcp_checks",
    "http_checks",
    "machine_checks",
];

fn decode_service(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<Service> {
    let entries = ctx.table(node, path)?;
    let mut s = Service {
        protocol: "tcp".to_owned(),
        internal_port: DEFAULT_INTERNAL_PORT,
        origin: ctx.origin(&node.span, path),
        ..Service::default()
    };
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "protocol" => {
                if let Some(proto) = ctx.string(value, &p) {
                    let proto = proto.to_ascii_lowercase();
                    if proto == "tcp" || proto == "udp" {
                        s.protocol = proto;
                    } else {
                        ctx.error(
                            &value.span,
                            &p,
                            format!("unknown protocol {proto:?}; use \"tcp\" or \"udp\""),
                        );
                    }
                }
            }
            "internal_port" => {
                s.internal_port = decode_port(ctx, value, &p).unwrap_or(s.internal_port);
            }
            "auto_stop_machines" => s.auto_stop_machines = decode_autostop(ctx, value, &p),
            "auto_start_machines" => s.auto_start_machines = ctx.bool(value, &p),
            "min_machines_running" => s.min_machines_running = ctx.int(value, &p),
            "processes" => s.processes = ctx.strings(value, &p).unwrap_or_default(),
            "ports" => {
                for (node, pp) in ctx.tables(value, &p) {
                    if let Some(port) = decode_machine_port(ctx, node, &pp) {
                        s.ports.push(port);
                    }
                }
            }
            "concurrency" => s.concurrency = decode_concurrency(ctx, value, &p),
            "tcp_checks" => {
                for (node, cp) in ctx.tables(value, &p) {
                    if let Some(c) = decode_service_check(ctx, node, &cp, "tcp") {
                        s.tcp_checks.push(c);
                    }
                }
            }
            "http_checks" => {
                for (node, cp) in ctx.tables(value, &p) {
                    if let Some(c) = decode_service_check(ctx, node, &cp, "http") {
                        s.http_checks.push(c);
                    }
                }
            }
            "machine_checks" => ctx.legacy(
                key,
                &p,
                "deploy-time machine checks are not supported by aloft yet",
            ),
            "script_checks" => ctx.legacy(key, &p, "script checks only ran on Fly's old Nomad platform"),
            _ => ctx.unknown(key, &p, SERVICE_KEYS),
        }
    }
    if s.protocol == "udp"
        && s.ports
            .iter()
            .any(|p| !p.handlers.is_empty() || p.force_https.is_some_and(|f| f))
    {
        ctx.error(
            &node.span,
            path,
            "a udp service takes no handlers and no force_https; remove them or use protocol = \"tcp\"",
        );
    }
    Some(s)
}

/// A port number 1–65535 (a string holding one is accepted).
fn decode_port(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<u16> {
    let port: u16 = ctx.int(node, path)?;
    if port == 0 {
        ctx.error(&node.span, path, "port 0 is not a port; use 1 to 65535");
        return None;
    }
    Some(port)
}

const HANDLERS: &[&str] = &["http", "tls", "pg_tls", "proxy_proto", "edge_http"];

fn decode_machine_port(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<MachinePort> {
    let entries = ctx.table(node, path)?;
    let mut port = MachinePort::default();
    // A port key that is there but invalid has its own error: no "needs a port" besides.
    let mut bad_port = false;
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "port" | "start_port" | "end_port" => {
                let decoded = decode_port(ctx, value, &p);
                bad_port |= decoded.is_none();
                match key.name.as_str() {
                    "port" => port.port = decoded,
                    "start_port" => port.start_port = decoded,
                    _ => port.end_port = decoded,
                }
            }
            "handlers" => {
                port.handlers = ctx.strings(value, &p).unwrap_or_default();
                for h in &port.handlers {
                    if !HANDLERS.contains(&h.as_str()) {
                        ctx.error(
                            &value.span,
                            &p,
                            format!("unknown handler {h:?}; use http, tls, pg_tls or proxy_proto"),
                        );
                    }
                }
            }
            "force_https" => port.force_https = ctx.bool(value, &p),
            "tls_options" => port.tls_options = decode_tls_options(ctx, value, &p),
            "http_options" => port.http_options = decode_http_options(ctx, value, &p),
            "proxy_proto_options" => {
                if let Some(entries) = ctx.table(value, &p) {
                    let mut o = ProxyProtoOptions::default();
                    for (k, v) in entries {
                        let kp = join(&p, &k.name);
                        match k.name.as_str() {
                            "version" => o.version = ctx.string(v, &kp),
                            _ => ctx.unknown(k, &kp, &["version"]),
                        }
                    }
                    port.proxy_proto_options = Some(o);
                }
            }
            _ => ctx.unknown(
                key,
                &p,
                &[
                    "port",
                    "start_port",
                    "end_port",
                    "handlers",
                    "force_https",
                    "tls_options",
                    "http_options",
                    "proxy_proto_options",
                ],
            ),
        }
    }
    match (port.port, port.start_port, port.end_port) {
        (Some(_), None, None) | (None, Some(_), Some(_)) => {}
        _ if bad_port => {}
        (None, None, None) => ctx.error(
            &node.span,
            path,
            "a port needs `port`, or `start_port` and `end_port` for a range",
        ),
        (Some(_), _, _) => ctx.error(
            &node.span,
            path,
            "give either `port` or a `start_port`/`end_port` range, not both",
        ),
        _ => ctx.error(
            &node.span,
            path,
            "a port range needs both `start_port` and `end_port`",
        ),
    }
    if let (Some(start), Some(end)) = (port.start_port, port.end_port)
        && start > end
    {
        ctx.error(
            &node.span,
            path,
            format!("start_port {start} is above end_port {end}"),
        );
    }
    Some(port)
}

fn decode_concurrency(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<MachineServiceConcurrency> {
    // Legacy "soft,hard" string.
    if let Value::Str(s) = &node.value {
        let parsed = s
            .split_once(',')
            .and_then(|(soft, hard)| Some((soft.trim().parse().ok()?, hard.trim().parse().ok()?)));
        return match parsed {
            Some((soft, hard)) => Some(MachineServiceConcurrency {
                soft_limit: Some(soft),
                hard_limit: Some(hard),
                r#type: Some("requests".to_owned()),
            }),
            None => {
                ctx.error(
                    &node.span,
                    path,
                    format!("can't read concurrency {s:?}; write a [{path}] table with type, soft_limit and hard_limit"),
                );
                None
            }
        };
    }
    let entries = ctx.table(node, path)?;
    let mut c = MachineServiceConcurrency::default();
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "type" => {
                c.r#type = ctx.string(value, &p);
                if let Some(t) = &c.r#type
                    && t != "connections"
                    && t != "requests"
                {
                    ctx.error(
                        &value.span,
                        &p,
                        format!("unknown concurrency type {t:?}; use \"connections\" or \"requests\""),
                    );
                }
            }
            "soft_limit" => c.soft_limit = ctx.int(value, &p),
            "hard_limit" => c.hard_limit = ctx.int(value, &p),
            _ => ctx.unknown(key, &p, &["type", "soft_limit", "hard_limit"]),
        }
    }
    if let (Some(soft), Some(hard)) = (c.soft_limit, c.hard_limit)
        && soft > hard
    {
        ctx.error(
            &node.span,
            path,
            format!(
                "soft_limit {soft} is above hard_limit {hard}; the soft limit must not exceed the hard one"
            ),
        );
    }
    Some(c)
}

fn decode_tls_options(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<TlsOptions> {
    let entries = ctx.table(node, path)?;
    let mut o = TlsOptions::default();
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "alpn" => o.alpn = ctx.strings(value, &p).unwrap_or_default(),
            "versions" => o.versions = ctx.strings(value, &p).unwrap_or_default(),
            "default_self_signed" => o.default_self_signed = ctx.bool(value, &p),
            _ => ctx.unknown(key, &p, &["alpn", "versions", "default_self_signed"]),
        }
    }
    Some(o)
}

fn decode_http_options(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<HttpOptions> {
    let entries = ctx.table(node, path)?;
    let mut o = HttpOptions::default();
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "compress" => o.compress = ctx.bool(value, &p),
            "h2_backend" => o.h2_backend = ctx.bool(value, &p),
            "idle_timeout" => o.idle_timeout = ctx.int(value, &p),
            "headers_read_timeout" => o.headers_read_timeout = ctx.int(value, &p),
            "response" => o.response = decode_response_options(ctx, value, &p),
            "replay_cache" => {
                for (node, rp) in ctx.tables(value, &p) {
                    if let Some(r) = decode_replay_cache(ctx, node, &rp) {
                        o.replay_cache.push(r);
                    }
                }
            }
            _ => ctx.unknown(
                key,
                &p,
                &[
                    "compress",
                    "h2_backend",
                    "idle_timeout",
                    "headers_read_timeout",
                    "response",
                    "replay_cache",
                ],
            ),
        }
    }
    Some(o)
}

fn decode_response_options(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<HttpResponseOptions> {
    let entries = ctx.table(node, path)?;
    let mut o = HttpResponseOptions::default();
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "pristine" => o.pristine = ctx.bool(value, &p),
            "headers" => {
                let Some(headers) = ctx.table(value, &p) else {
                    continue;
                };
                for (hk, hv) in headers {
                    let hp = join(&p, &hk.name);
                    let v = match &hv.value {
                        Value::Bool(b) => Some(HeaderValue::Bool(*b)),
                        Value::Array(_) => ctx.strings(hv, &hp).map(HeaderValue::Many),
                        _ => ctx.string_lenient(hv, &hp).map(HeaderValue::One),
                    };
                    if let Some(v) = v {
                        o.headers.insert(hk.name.clone(), v);
                    }
                }
            }
            _ => ctx.unknown(key, &p, &["pristine", "headers"]),
        }
    }
    Some(o)
}

fn decode_replay_cache(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<ReplayCache> {
    let entries = ctx.table(node, path)?;
    let mut r = ReplayCache::default();
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "path_prefix" => r.path_prefix = ctx.string(value, &p),
            "ttl_seconds" => r.ttl_seconds = ctx.int(value, &p),
            "name" => r.name = ctx.string(value, &p),
            "allow_bypass" => r.allow_bypass = ctx.bool(value, &p),
            "type" => {
                r.r#type = match ctx.string(value, &p).as_deref() {
                    Some("cookie") => Some(ReplayCacheType::Cookie),
                    Some("header") => Some(ReplayCacheType::Header),
                    Some(other) => {
                        ctx.error(
                            &value.span,
                            &p,
                            format!("unknown replay cache type {other:?}; use \"cookie\" or \"header\""),
                        );
                        None
                    }
                    None => None,
                };
            }
            _ => ctx.unknown(
                key,
                &p,
                &["path_prefix", "ttl_seconds", "name", "allow_bypass", "type"],
            ),
        }
    }
    Some(r)
}

/// Fields shared by service checks and top-level checks.
#[derive(Debug, Default)]
struct CheckFields {
    r#type: Option<String>,
    port: Option<u16>,
    interval: Option<Duration>,
    timeout: Option<Duration>,
    grace_period: Option<Duration>,
    method: Option<String>,
    path: Option<String>,
    protocol: Option<String>,
    tls_skip_verify: Option<bool>,
    tls_server_name: Option<String>,
    headers: Vec<MachineHttpHeader>,
    processes: Vec<String>,
    kind: Option<aloft_api::CheckKind>,
}

const CHECK_KEYS: &[&str] = &[
    "type",
    "port",
    "interval",
    "timeout",
    "grace_period",
    "method",
    "path",
    "protocol",
    "tls_skip_verify",
    "tls_server_name",
    "headers",
];

/// Reads a check's keys. `top_level` allows keys valid only there (`processes`, `kind`);
/// `default_type` is the check's type when it gives none. A `protocol` or `tls_server_name` that
/// would make an http check always critical is warned about (`aloft_api::checks` resolves them).
fn decode_check_fields(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    top_level: bool,
    default_type: Option<&str>,
) -> Option<CheckFields> {
    let entries = ctx.table(node, path)?;
    let mut c = CheckFields::default();
    let mut protocol_at = None;
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "type" => {
                c.r#type = ctx.string(value, &p).map(|t| t.to_ascii_lowercase());
                if let Some(t) = &c.r#type
                    && t != "tcp"
                    && t != "http"
                {
                    ctx.error(
                        &value.span,
                        &p,
                        format!("unknown check type {t:?}; use \"tcp\" or \"http\""),
                    );
                }
            }
            "port" => c.port = decode_port(ctx, value, &p),
            // Integers in checks are milliseconds (flyctl's patchChecks).
            "interval" => c.interval = ctx.duration(value, &p, IntUnit::Millis),
            "timeout" => c.timeout = ctx.duration(value, &p, IntUnit::Millis),
            "grace_period" => c.grace_period = ctx.duration(value, &p, IntUnit::Millis),
            "method" => c.method = ctx.string(value, &p),
            "path" => c.path = ctx.string(value, &p),
            "protocol" => {
                c.protocol = ctx.string(value, &p);
                protocol_at = Some((value.span.clone(), p));
            }
            "tls_skip_verify" => c.tls_skip_verify = ctx.bool(value, &p),
            "tls_server_name" => {
                c.tls_server_name = ctx.string(value, &p);
                if let Some(why) = c
                    .tls_server_name
                    .as_deref()
                    .and_then(aloft_api::checks::server_name_problem)
                {
                    ctx.warn(
                        &value.span,
                        &p,
                        format!("{why}; until then the check is critical"),
                    );
                }
            }
            "headers" => c.headers = decode_check_headers(ctx, value, &p),
            "restart_limit" => ctx.legacy(key, &p, "restart_limit only worked on Fly's old Nomad platform"),
            "processes" if top_level => {
                c.processes = ctx.strings(value, &p).unwrap_or_default();
            }
            "kind" if top_level => {
                c.kind = match ctx.string(value, &p).as_deref() {
                    Some("informational") => Some(aloft_api::CheckKind::Informational),
                    Some("readiness") => Some(aloft_api::CheckKind::Readiness),
                    Some(other) => {
                        ctx.error(
                            &value.span,
                            &p,
                            format!("unknown check kind {other:?}; use \"informational\" or \"readiness\""),
                        );
                        None
                    }
                    None => None,
                };
            }
            _ => ctx.unknown(key, &p, CHECK_KEYS),
        }
    }
    if let (Some((span, p)), Some(proto)) = (protocol_at, c.protocol.as_deref())
        && c.r#type.as_deref().or(default_type) == Some("http")
        && !proto.eq_ignore_ascii_case("http")
        && !proto.eq_ignore_ascii_case("https")
    {
        ctx.warn(
            &span,
            &p,
            format!("unknown protocol {proto:?}, so the check is always critical; use \"http\" or \"https\""),
        );
    }
    Some(c)
}

/// Check headers: a table of name → value (or list of values), or the API's list of
/// `{name, values}`.
fn decode_check_headers(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Vec<MachineHttpHeader> {
    let mut out = Vec::new();
    match &node.value {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let p = index(path, i);
                let Some(entries) = ctx.table(item, &p) else {
                    continue;
                };
                let mut h = MachineHttpHeader::default();
                for (k, v) in entries {
                    let kp = join(&p, &k.name);
                    match k.name.as_str() {
                        "name" => h.name = ctx.string(v, &kp),
                        "values" => h.values = ctx.strings(v, &kp).unwrap_or_default(),
                        "value" => h.values = ctx.strings(v, &kp).unwrap_or_default(),
                        _ => ctx.unknown(k, &kp, &["name", "values"]),
                    }
                }
                out.push(h);
            }
        }
        _ => {
            let Some(entries) = ctx.table(node, path) else {
                return out;
            };
            for (k, v) in entries {
                let kp = join(path, &k.name);
                let values = match &v.value {
                    Value::Array(_) => ctx.strings(v, &kp),
                    _ => ctx.string_lenient(v, &kp).map(|s| vec![s]),
                };
                if let Some(values) = values {
                    out.push(MachineHttpHeader {
                        name: Some(k.name.clone()),
                        values,
                    });
                }
            }
        }
    }
    out
}

fn decode_service_check(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    default_type: &str,
) -> Option<MachineServiceCheck> {
    let c = decode_check_fields(ctx, node, path, false, Some(default_type))?;
    Some(MachineServiceCheck {
        r#type: Some(c.r#type.unwrap_or_else(|| default_type.to_owned())),
        port: c.port,
        interval: c.interval,
        timeout: c.timeout,
        grace_period: c.grace_period,
        method: c.method,
        path: c.path,
        protocol: c.protocol,
        tls_skip_verify: c.tls_skip_verify,
        tls_server_name: c.tls_server_name,
        headers: c.headers,
    })
}

fn decode_top_checks(ctx: &mut Ctx<'_>, node: &Node, path: &str, out: &mut BTreeMap<String, TopLevelCheck>) {
    let named: Vec<(String, &Node, String)> = match &node.value {
        // Legacy list form: each item carries its `name`.
        Value::Array(items) => {
            let mut v = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let p = index(path, i);
                let name = match &item.value {
                    Value::Table(entries) => {
                        entries
                            .iter()
                            .find(|(k, _)| k.name == "name")
                            .and_then(|(_, n)| match &n.value {
                                Value::Str(s) => Some(s.clone()),
                                _ => None,
                            })
                    }
                    _ => None,
                };
                match name {
                    Some(name) => v.push((name, item, p)),
                    None => ctx.error(&item.span, &p, "a check in a list needs a string `name`"),
                }
            }
            v
        }
        _ => {
            let Some(entries) = ctx.table(node, path) else {
                return;
            };
            entries
                .iter()
                .map(|(k, v)| (k.name.clone(), v, join(path, &k.name)))
                .collect()
        }
    };
    for (name, node, p) in named {
        let Some(mut fields) = strip_name_and_decode(ctx, node, &p) else {
            continue;
        };
        if fields.r#type.is_none() {
            ctx.error(
                &node.span,
                &p,
                "a check needs `type = \"tcp\"` or `type = \"http\"`",
            );
        }
        if let Some(interval) = fields.interval
            && interval.get() < std::time::Duration::from_secs(2)
        {
            ctx.error(
                &node.span,
                &p,
                format!("interval {interval} is too short; the minimum is 2s"),
            );
        }
        if let Some(timeout) = fields.timeout
            && timeout.get() > std::time::Duration::from_secs(60)
        {
            ctx.error(
                &node.span,
                &p,
                format!("timeout {timeout} is too long; the maximum is 60s"),
            );
        }
        let processes = std::mem::take(&mut fields.processes);
        out.insert(
            name,
            TopLevelCheck {
                check: MachineCheck {
                    r#type: fields.r#type,
                    port: fields.port,
                    interval: fields.interval,
                    timeout: fields.timeout,
                    grace_period: fields.grace_period,
                    method: fields.method,
                    path: fields.path,
                    protocol: fields.protocol,
                    tls_skip_verify: fields.tls_skip_verify,
                    tls_server_name: fields.tls_server_name,
                    headers: fields.headers,
                    kind: fields.kind,
                },
                processes,
                origin: ctx.origin(&node.span, &p),
            },
        );
    }
}

/// Decodes a top-level check, accepting the `name` key of the legacy list form.
fn strip_name_and_decode(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<CheckFields> {
    match &node.value {
        Value::Table(entries) if entries.iter().any(|(k, _)| k.name == "name") => {
            let stripped = Node {
                span: node.span.clone(),
                value: Value::Table(
                    entries
                        .iter()
                        .filter(|(k, _)| k.name != "name")
                        .cloned()
                        .collect(),
                ),
            };
            decode_check_fields(ctx, &stripped, path, true, None)
        }
        _ => decode_check_fields(ctx, node, path, true, None),
    }
}

/// A size with an optional unit, in multiples of `unit` bytes; a bare number is already in
/// that unit. `binary` picks 1024-based units for `k`, `m`, `g`, `t` (RAM) instead of 1000-based
/// (disk, as flyctl's `FromHumanSize`).
pub(crate) fn parse_size(text: &str, unit: u64, binary: bool) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase().replace(['_', ' '], "");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let number: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size; write e.g. \"512mb\", \"1gb\" or a number"))?;
    if suffix.is_empty() {
        if number.fract() != 0.0 || number < 0.0 {
            return Err(format!("{text:?} is not a whole number"));
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "checked whole and non-negative"
        )]
        return Ok(number as u64);
    }
    let base: f64 = if binary { 1024.0 } else { 1000.0 };
    let exp = match suffix.trim_end_matches('b').trim_end_matches('i') {
        "" => 0,
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        "p" => 5,
        _ => {
            return Err(format!("{text:?} has an unknown unit; use kb, mb, gb or tb"));
        }
    };
    let bytes = number * base.powi(exp);
    #[expect(clippy::cast_precision_loss, reason = "units are small powers")]
    let units = bytes / unit as f64;
    if !units.is_finite() || units > 1e15 {
        return Err(format!("{text:?} is too large"));
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "finite, non-negative and bounded above"
    )]
    Ok(units.floor() as u64)
}

const MIB: u64 = 1024 * 1024;
const GB: u64 = 1000 * 1000 * 1000;

fn decode_size(ctx: &mut Ctx<'_>, node: &Node, path: &str, unit: u64, binary: bool) -> Option<u64> {
    let text = ctx.string_lenient(node, path)?;
    match parse_size(&text, unit, binary) {
        Ok(v) => Some(v),
        Err(e) => {
            ctx.error(&node.span, path, e);
            None
        }
    }
}

fn decode_mount(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<Mount> {
    let entries = ctx.table(node, path)?;
    let mut m = Mount {
        origin: ctx.origin(&node.span, path),
        ..Mount::default()
    };
    let mut source = None;
    let mut destination = None;
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "source" => source = ctx.string(value, &p),
            "destination" => {
                destination = ctx.string(value, &p);
                if let Some(d) = &destination
                    && (d == "/" || !d.starts_with('/'))
                {
                    ctx.error(
                        &value.span,
                        &p,
                        format!("destination {d:?} must be an absolute path other than \"/\""),
                    );
                }
            }
            "processes" => m.processes = ctx.strings(value, &p).unwrap_or_default(),
            "initial_size" => {
                m.initial_size_gb = decode_size(ctx, value, &p, GB, false);
                if m.initial_size_gb == Some(0) {
                    ctx.error(&value.span, &p, "initial_size must be at least 1GB");
                }
            }
            "snapshot_retention" => {
                m.snapshot_retention = ctx.int(value, &p);
                if m.snapshot_retention.is_some_and(|d| !(1..=60).contains(&d)) {
                    ctx.error(&value.span, &p, "snapshot_retention must be 1 to 60 days");
                }
            }
            "scheduled_snapshots" => m.scheduled_snapshots = ctx.bool(value, &p),
            "auto_extend_size_threshold" => {
                m.auto_extend_size_threshold = ctx.int(value, &p);
                if m.auto_extend_size_threshold
                    .is_some_and(|t| !(50..=99).contains(&t))
                {
                    ctx.error(
                        &value.span,
                        &p,
                        "auto_extend_size_threshold must be 50 to 99 (percent)",
                    );
                }
            }
            "auto_extend_size_increment" => {
                m.auto_extend_size_increment_gb = decode_size(ctx, value, &p, GB, false);
                if m.auto_extend_size_increment_gb
                    .is_some_and(|g| !(1..=100).contains(&g))
                {
                    ctx.error(&value.span, &p, "auto_extend_size_increment must be 1GB to 100GB");
                }
            }
            "auto_extend_size_limit" => {
                m.auto_extend_size_limit_gb = decode_size(ctx, value, &p, GB, false);
                if m.auto_extend_size_limit_gb
                    .is_some_and(|g| !(1..=500).contains(&g))
                {
                    ctx.error(&value.span, &p, "auto_extend_size_limit must be 1GB to 500GB");
                }
            }
            _ => ctx.unknown(
                key,
                &p,
                &[
                    "source",
                    "destination",
                    "processes",
                    "initial_size",
                    "snapshot_retention",
                    "scheduled_snapshots",
                    "auto_extend_size_threshold",
                    "auto_extend_size_increment",
                    "auto_extend_size_limit",
                ],
            ),
        }
    }
    let extend = (
        m.auto_extend_size_threshold.is_some(),
        m.auto_extend_size_increment_gb.is_some(),
    );
    if extend.0 != extend.1 {
        ctx.error(
            &node.span,
            path,
            "auto-extension needs both auto_extend_size_threshold and auto_extend_size_increment",
        );
    }
    match (source, destination) {
        (Some(s), Some(d)) => {
            m.source = s;
            m.destination = d;
            Some(m)
        }
        (s, d) => {
            let missing: Vec<&str> = [
                ("`source` (the volume name)", s.is_none()),
                ("`destination` (where it is mounted)", d.is_none()),
            ]
            .into_iter()
            .filter_map(|(k, missing)| missing.then_some(k))
            .collect();
            ctx.error(
                &node.span,
                path,
                format!("a mount needs {}", missing.join(" and ")),
            );
            None
        }
    }
}

/// `[[vm]]` (and `[deploy] release_command_vm`, without `processes`).
fn decode_compute(ctx: &mut Ctx<'_>, node: &Node, path: &str, with_processes: bool) -> Option<Compute> {
    let entries = ctx.table(node, path)?;
    let mut c = Compute {
        origin: ctx.origin(&node.span, path),
        ..Compute::default()
    };
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "size" => {
                c.size = ctx.string(value, &p);
                if let Some(s) = &c.size
                    && aloft_api::GuestPreset::find(s).is_none()
                {
                    let names: Vec<&str> = aloft_api::GUEST_PRESETS.iter().map(|p| p.name).collect();
                    ctx.error(
                        &value.span,
                        &p,
                        format!("unknown VM size {s:?}; use one of {}", names.join(", ")),
                    );
                }
            }
            "memory" => {
                c.memory = decode_size(ctx, value, &p, MIB, true).and_then(|mb| u32::try_from(mb).ok());
                if c.memory == Some(0) {
                    ctx.error(&value.span, &p, "memory can't be zero");
                }
            }
            "memory_mb" => c.memory_mb = ctx.int(value, &p),
            "cpus" => c.cpus = ctx.int(value, &p),
            "cpu_kind" => {
                c.cpu_kind = ctx.string(value, &p);
                if let Some(k) = &c.cpu_kind
                    && k != aloft_api::CPU_KIND_SHARED
                    && k != aloft_api::CPU_KIND_PERFORMANCE
                {
                    ctx.error(
                        &value.span,
                        &p,
                        format!("unknown cpu_kind {k:?}; use \"shared\" or \"performance\""),
                    );
                }
            }
            "gpus" => c.gpus = ctx.int(value, &p),
            "gpu_kind" => c.gpu_kind = ctx.string(value, &p),
            "kernel_args" => c.kernel_args = ctx.strings(value, &p).unwrap_or_default(),
            "host_dedication_id" => c.host_dedication_id = ctx.string(value, &p),
            "max_memory_mb" => c.max_memory_mb = ctx.int(value, &p),
            "persist_rootfs" => {
                c.persist_rootfs = match ctx.string(value, &p).as_deref() {
                    Some("never") => Some(RootfsPersist::Never),
                    Some("always") => Some(RootfsPersist::Always),
                    Some("restart") => Some(RootfsPersist::Restart),
                    Some(other) => {
                        ctx.error(
                            &value.span,
                            &p,
                            format!(
                                "unknown persist_rootfs {other:?}; use \"never\", \"restart\" or \"always\""
                            ),
                        );
                        None
                    }
                    None => None,
                };
            }
            "processes" if with_processes => {
                c.processes = ctx.strings(value, &p).unwrap_or_default();
            }
            _ => ctx.unknown(
                key,
                &p,
                &[
                    "size",
                    "memory",
                    "memory_mb",
                    "cpus",
                    "cpu_kind",
                    "gpus",
                    "gpu_kind",
                    "kernel_args",
                    "host_dedication_id",
                    "max_memory_mb",
                    "persist_rootfs",
                    "processes",
                ],
            ),
        }
    }
    Some(c)
}

fn decode_restart(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<Restart> {
    let entries = ctx.table(node, path)?;
    let mut r = Restart {
        policy: aloft_api::RestartPolicy::OnFailure,
        retries: None,
        processes: Vec::new(),
        origin: ctx.origin(&node.span, path),
    };
    let mut have_policy = false;
    let mut policy_key = false;
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "policy" => {
                policy_key = true;
                let Some(text) = ctx.string(value, &p) else {
                    continue;
                };
                let policy = match text.as_str() {
                    "always" => Some(aloft_api::RestartPolicy::Always),
                    "never" | "no" => Some(aloft_api::RestartPolicy::No),
                    "on-failure" | "on_failure" | "on-fail" => Some(aloft_api::RestartPolicy::OnFailure),
                    _ => None,
                };
                match policy {
                    Some(policy) => {
                        r.policy = policy;
                        have_policy = true;
                    }
                    None => ctx.error(
                        &value.span,
                        &p,
                        format!(
                            "unknown restart policy {text:?}; use \"always\", \"never\" or \"on-failure\""
                        ),
                    ),
                }
            }
            "retries" | "max_retries" => r.retries = ctx.int(value, &p),
            "processes" => r.processes = ctx.strings(value, &p).unwrap_or_default(),
            _ => ctx.unknown(key, &p, &["policy", "retries", "processes"]),
        }
    }
    if !have_policy {
        if policy_key {
            return None;
        }
        ctx.error(
            &node.span,
            path,
            "a [[restart]] section needs `policy` (\"always\", \"never\" or \"on-failure\")",
        );
        return None;
    }
    Some(r)
}

fn decode_metrics(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<Metrics> {
    let entries = ctx.table(node, path)?;
    let mut m = Metrics {
        origin: ctx.origin(&node.span, path),
        ..Metrics::default()
    };
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "port" => m.port = decode_port(ctx, value, &p),
            "path" => m.path = ctx.string(value, &p),
            "https" => m.https = ctx.bool(value, &p),
            "processes" => m.processes = ctx.strings(value, &p).unwrap_or_default(),
            _ => ctx.unknown(key, &p, &["port", "path", "https", "processes"]),
        }
    }
    if m.port.is_none() {
        ctx.error(&node.span, path, "metrics need the `port` to scrape");
    }
    Some(m)
}

fn decode_static(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<Static> {
    let entries = ctx.table(node, path)?;
    let mut guest_path = None;
    let mut url_prefix = None;
    let mut s = Static::default();
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "guest_path" => guest_path = ctx.string(value, &p),
            "url_prefix" => url_prefix = ctx.string(value, &p),
            "tigris_bucket" => s.tigris_bucket = ctx.string(value, &p),
            "index_document" => s.index_document = ctx.string(value, &p),
            _ => ctx.unknown(
                key,
                &p,
                &["guest_path", "url_prefix", "tigris_bucket", "index_document"],
            ),
        }
    }
    match (guest_path, url_prefix) {
        (Some(g), Some(u)) => {
            s.guest_path = g;
            s.url_prefix = u;
            Some(s)
        }
        _ => {
            ctx.error(
                &node.span,
                path,
                "a static needs both `guest_path` and `url_prefix`",
            );
            None
        }
    }
}

fn decode_file(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<FileConfig> {
    let entries = ctx.table(node, path)?;
    let mut guest_path = None;
    let mut sources = Vec::new();
    let mut mode = None;
    let mut processes = Vec::new();
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "guest_path" => {
                guest_path = ctx.string(value, &p);
                if let Some(g) = &guest_path
                    && !g.starts_with('/')
                {
                    ctx.error(&value.span, &p, format!("guest_path {g:?} must be absolute"));
                }
            }
            "local_path" => {
                if let Some(v) = ctx.string(value, &p) {
                    sources.push(FileSource::LocalPath(v));
                }
            }
            "secret_name" => {
                if let Some(v) = ctx.string(value, &p) {
                    sources.push(FileSource::SecretName(v));
                }
            }
            "raw_value" => {
                if let Some(v) = ctx.string(value, &p) {
                    sources.push(FileSource::RawValue(v));
                }
            }
            "mode" => mode = ctx.int(value, &p),
            "processes" => processes = ctx.strings(value, &p).unwrap_or_default(),
            _ => ctx.unknown(
                key,
                &p,
                &[
                    "guest_path",
                    "local_path",
                    "secret_name",
                    "raw_value",
                    "mode",
                    "processes",
                ],
            ),
        }
    }
    let Some(guest_path) = guest_path else {
        ctx.error(&node.span, path, "a file needs `guest_path`");
        return None;
    };
    if sources.len() != 1 {
        ctx.error(
            &node.span,
            path,
            "a file needs exactly one of `local_path`, `secret_name` or `raw_value`",
        );
        return None;
    }
    let source = sources.pop()?;
    Some(FileConfig {
        guest_path,
        source,
        mode,
        processes,
        origin: ctx.origin(&node.span, path),
    })
}

const EXPERIMENTAL_KEYS: &[&str] = &[
    "cmd",
    "entrypoint",
    "exec",
    "auto_rollback",
    "enable_consul",
    "enable_etcd",
    "lazy_load_images",
    "attached",
    "machine_config",
];

/// Keys of `[experimental]` that flyctl moves elsewhere (`kill_timeout`, `metrics_port`,
/// `metrics_path`).
#[derive(Debug, Default)]
struct MovedFromExperimental {
    kill_timeout: Option<Duration>,
    metrics: Option<Metrics>,
}

fn decode_experimental(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    moved: &mut MovedFromExperimental,
) -> Option<Experimental> {
    let entries = ctx.table(node, path)?;
    let mut e = Experimental::default();
    for (key, value) in entries {
        let p = join(path, &key.name);
        match key.name.as_str() {
            "cmd" => e.cmd = ctx.command(value, &p).unwrap_or_default(),
            "entrypoint" => e.entrypoint = ctx.command(value, &p).unwrap_or_default(),
            "exec" => e.exec = ctx.command(value, &p).unwrap_or_default(),
            "auto_rollback" | "enable_consul" | "enable_etcd" | "lazy_load_images" => {
                ctx.bool(value, &p);
                e.other.insert(key.name.clone(), value.to_toml());
            }
            "attached" | "machine_config" => {
                e.other.insert(key.name.clone(), value.to_toml());
            }
            "use_zstd" => {
                ctx.bool(value, &p);
                e.other.insert(key.name.clone(), value.to_toml());
            }
            // Old homes of top-level settings, moved where flyctl moves them.
            "kill_timeout" => moved.kill_timeout = ctx.duration(value, &p, IntUnit::Seconds),
            "metrics_port" | "metrics_path" => {
                let m = moved.metrics.get_or_insert_with(|| Metrics {
                    origin: ctx.origin(&key.span, &p),
                    ..Metrics::default()
                });
                if key.name == "metrics_port" {
                    m.port = decode_port(ctx, value, &p);
                } else {
                    m.path = ctx.string(value, &p);
                }
            }
            "allowed_public_ports" | "private_network" => {
                ctx.legacy(key, &p, "a setting of Fly's old Nomad platform");
            }
            _ => ctx.unknown(key, &p, EXPERIMENTAL_KEYS),
        }
    }
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512mb", MIB, true), Ok(512));
        assert_eq!(parse_size("1gb", MIB, true), Ok(1024));
        assert_eq!(parse_size("1GB", MIB, true), Ok(1024));
        assert_eq!(parse_size("2048", MIB, true), Ok(2048));
        assert_eq!(parse_size("1.5gb", MIB, true), Ok(1536));
        assert_eq!(parse_size("1gib", MIB, true), Ok(1024));
        assert_eq!(parse_size("10GB", GB, false), Ok(10));
        assert_eq!(parse_size("10", GB, false), Ok(10));
        assert!(parse_size("lots", MIB, true).is_err());
        assert!(parse_size("5 parsecs", MIB, true).is_err());
    }

    #[test]
    fn legacy_shapes_are_read_like_flyctl() {
        let text = r#"
            kill_timeout = ""
            [experimental]
            kill_timeout = 30
            metrics_port = 9091
            metrics_path = "/metrics"
            [[processes]]
            name = "web"
            command = "bin/web"
            [[processes]]
            name = "worker"
            [env]
            PORT = 8080
            [[services]]
            concurrency = "20,25"
            processes = ["web"]
            [[services.ports]]
            port = 80
            [[services.http_checks]]
            interval = 10000
            headers = [{ name = "Host", value = "example.com" }]
        "#;
        let loaded = crate::parse(text, std::path::Path::new("t.toml")).unwrap();
        let cfg = &loaded.config;
        assert_eq!(cfg.kill_timeout, Some(Duration::from_secs(30)));
        assert_eq!(cfg.metrics[0].port, Some(9091));
        assert_eq!(cfg.metrics[0].path.as_deref(), Some("/metrics"));
        assert_eq!(cfg.processes["web"], "bin/web");
        assert_eq!(cfg.processes["worker"], "");
        assert_eq!(cfg.env["PORT"], "8080");
        let s = &cfg.services[0];
        let c = s.concurrency.as_ref().unwrap();
        assert_eq!(
            (c.r#type.as_deref(), c.soft_limit, c.hard_limit),
            (Some("requests"), Some(20), Some(25))
        );
        assert_eq!(s.http_checks[0].interval, Some(Duration::from_secs(10)));
        assert_eq!(s.http_checks[0].headers[0].name.as_deref(), Some("Host"));
        assert_eq!(s.http_checks[0].headers[0].values, ["example.com"]);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    }

    #[test]
    fn unknown_keys_get_a_suggestion() {
        let loaded = crate::parse(
            "[http_service]\ninternal_prot = 80\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(
            loaded.warnings[0].to_string(),
            "2:1: http_service.internal_prot: unknown key, ignored (did you mean `internal_port`?)"
        );
    }

    #[test]
    fn group_names() {
        assert!(valid_group_name("app"));
        assert!(valid_group_name("worker-2"));
        assert!(!valid_group_name("Web"));
        assert!(!valid_group_name(""));
    }
}
