//! `MachineConfig` and everything it contains, as in Fly's Machines API (`fly.MachineConfig` in
//! the OpenAPI spec). Field names, optionality and enum spellings follow the spec; every field is
//! optional on the wire, lists and maps are omitted when empty (fly-go's `omitempty`) and `null` is
//! read as empty. Unknown fields are ignored on input, as the Fly-compatible surface must.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Duration;
use crate::serde_util::null_as_default;

/// The configuration of one machine: what it runs, on what hardware, with which services.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineConfig {
    /// Destroy the machine once its main process exits (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_destroy: Option<bool>,
    /// A scratch drive kept across restarts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_drive: Option<MachineCacheDrive>,
    /// Top-level checks by name.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub checks: BTreeMap<String, MachineCheck>,
    /// Containers of a multi-container machine.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub containers: Vec<ContainerConfig>,
    /// Deprecated: use `services[].autostart`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disable_machine_autostart: Option<bool>,
    /// DNS settings inside the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsConfig>,
    /// Environment variables of the workload.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub env: BTreeMap<String, String>,
    /// Files written into the guest before the workload starts.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub files: Vec<File>,
    /// CPU, memory and GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<MachineGuest>,
    /// The OCI image to run (the only field Fly requires on create).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Overrides of the image's entrypoint and command, and init settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<MachineInit>,
    /// Free-form key/value pairs; the platform uses some keys (`fly_process_group` …).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub metadata: BTreeMap<String, String>,
    /// Prometheus scrape target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MachineMetrics>,
    /// Volumes to mount.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub mounts: Vec<MachineMount>,
    /// Extra processes run by init.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub processes: Vec<MachineProcess>,
    /// What happens when the main process exits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<MachineRestart>,
    /// Root filesystem persistence and size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<MachineRootfs>,
    /// Periodic start: `hourly`, `daily`, `weekly` or `monthly`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Services the proxy routes to this machine.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub services: Vec<MachineService>,
    /// Deprecated: a size preset name; use `guest`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// Machine ids this machine stands by for.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub standbys: Vec<String>,
    /// Static files served by the proxy.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub statics: Vec<Static>,
    /// How the machine is stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_config: Option<StopConfig>,
}

/// A scratch drive (`fly.MachineCacheDrive`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineCacheDrive {
    /// Size in MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_mb: Option<u32>,
}

/// A top-level check (`fly.MachineCheck`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineCheck {
    /// Time to wait after the machine starts before checking.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<Duration>,
    /// Headers sent by http checks.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub headers: Vec<MachineHttpHeader>,
    /// Time between checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// `informational` (default) or `readiness` (takes the machine out of the pool while failing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<CheckKind>,
    /// HTTP method of http checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Path of http checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Port to connect to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `http` or `https` for http checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Longest a check may take before it counts as failing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// TLS server name for https checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// Skip certificate verification for https checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_skip_verify: Option<bool>,
    /// `tcp` or `http`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub r#type: Option<String>,
}

/// What a top-level check's failure means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// Reported only.
    Informational,
    /// A failing check takes the machine out of the proxy's pool.
    Readiness,
}

/// An HTTP header of a check (`fly.MachineHTTPHeader`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineHttpHeader {
    /// Header name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Header values.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub values: Vec<String>,
}

/// DNS settings (`fly.DNSConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DnsConfig {
    /// Forwarding rules.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub dns_forward_rules: Vec<DnsForwardRule>,
    /// Guest hostname.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Guest fully qualified hostname.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname_fqdn: Option<String>,
    /// Resolvers.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub nameservers: Vec<String>,
    /// resolv.conf options.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub options: Vec<DnsOption>,
    /// Search domains.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub searches: Vec<String>,
    /// Keep the machine out of internal DNS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_registration: Option<bool>,
}

/// A DNS forwarding rule (`fly.dnsForwardRule`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DnsForwardRule {
    /// Resolver address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Domain forwarded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basename: Option<String>,
}

/// A resolv.conf option (`fly.dnsOption`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DnsOption {
    /// Option name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Option value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// A file written into the guest (`fly.File`). One of `raw_value`, `secret_name` or
/// `image_config` supplies the content.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct File {
    /// Absolute path in the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_path: Option<String>,
    /// Name of an image whose OCI config becomes the content.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_config: Option<String>,
    /// chmod(2) mode bits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Base64-encoded content.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_value: Option<String>,
    /// Name of a secret holding the base64-encoded content.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

impl File {
    /// `raw_value` decoded: standard or URL-safe base64, padded or not, line breaks ignored (what
    /// Fly's clients send). `None` when there is no `raw_value`, `Some(Err(_))` when it is not base64.
    pub fn decoded_raw_value(&self) -> Option<Result<Vec<u8>, base64::DecodeError>> {
        use base64::Engine as _;
        use base64::alphabet;
        use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
        const LENIENT: GeneralPurposeConfig =
            GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
        const STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
        const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);
        let raw = self.raw_value.as_deref()?;
        let compact: String = raw.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        Some(
            STANDARD
                .decode(&compact)
                .or_else(|e| URL_SAFE.decode(&compact).map_err(|_| e)),
        )
    }
}

/// CPU, memory and GPU of a machine (`fly.MachineGuest`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineGuest {
    /// `shared` or `performance`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_kind: Option<String>,
    /// Number of vCPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// GPU model (`a100-pcie-40gb`, `a100-sxm4-80gb`, `l40s`, `a10`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_kind: Option<String>,
    /// Number of GPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// Placement on dedicated hosts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_dedication_id: Option<String>,
    /// Extra kernel command line arguments.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub kernel_args: Vec<String>,
    /// Upper bound for memory growth, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<u32>,
    /// Memory, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// Deprecated: use `MachineConfig.rootfs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persist_rootfs: Option<RootfsPersist>,
}

/// When the root filesystem survives (`fly.MachineRootfs.persist`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum RootfsPersist {
    /// Reset on every start (default).
    Never,
    /// Kept across starts.
    Always,
    /// Kept across restarts only.
    Restart,
}

/// Init overrides (`fly.MachineInit`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineInit {
    /// Replaces the image's CMD.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cmd: Vec<String>,
    /// Replaces the image's ENTRYPOINT.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub entrypoint: Vec<String>,
    /// Replaces both: the exact argv to run.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub exec: Vec<String>,
    /// Extra kernel arguments.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub kernel_args: Vec<String>,
    /// Swap file size, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_size_mb: Option<u32>,
    /// Allocate a TTY for the workload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tty: Option<bool>,
}

/// Prometheus scrape target (`fly.MachineMetrics`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineMetrics {
    /// Scrape over https.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https: Option<bool>,
    /// Path, e.g. `/metrics`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Port in the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A volume mount (`fly.MachineMount`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineMount {
    /// GB added per auto-extension.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub add_size_gb: Option<u32>,
    /// Encrypted at rest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    /// Usage percentage that triggers auto-extension.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extend_threshold_percent: Option<u32>,
    /// Volume name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Mount point in the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Size, GB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_gb: Option<u32>,
    /// Auto-extension stops at this size, GB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_gb_limit: Option<u32>,
    /// Volume id (`vol_…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

/// A process run by init (`fly.MachineProcess`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineProcess {
    /// Command.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cmd: Vec<String>,
    /// Entrypoint.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub entrypoint: Vec<String>,
    /// Environment.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub env: BTreeMap<String, String>,
    /// Environment variables taken from machine fields.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub env_from: Vec<EnvFrom>,
    /// Exact argv.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub exec: Vec<String>,
    /// Use only `secrets`, not the app's secrets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignore_app_secrets: Option<bool>,
    /// Secrets exposed as environment variables.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub secrets: Vec<MachineSecret>,
    /// User to run as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// An environment variable filled from a machine field (`fly.EnvFrom`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EnvFrom {
    /// Variable name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_var: Option<String>,
    /// The machine field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field_ref: Option<FieldRef>,
}

/// Machine fields an [`EnvFrom`] can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum FieldRef {
    /// Machine id.
    Id,
    /// Machine version.
    Version,
    /// App name.
    AppName,
    /// Private (6PN) address.
    PrivateIp,
    /// Region.
    Region,
    /// Image reference.
    Image,
}

/// A secret exposed as an environment variable (`fly.MachineSecret`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineSecret {
    /// Variable name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_var: Option<String>,
    /// Secret name when it differs from `env_var`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Restart policy (`fly.MachineRestart`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineRestart {
    /// Spot GPU bid price.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_bid_price: Option<f64>,
    /// With `on-failure`: restarts before giving up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// The policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<RestartPolicy>,
}

/// When a machine whose main process exited is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum RestartPolicy {
    /// Never.
    #[serde(rename = "no")]
    No,
    /// Always.
    #[serde(rename = "always")]
    Always,
    /// When it exits with a non-zero code (default).
    #[serde(rename = "on-failure")]
    OnFailure,
    /// Spot GPU machines.
    #[serde(rename = "spot-price")]
    SpotPrice,
}

/// Root filesystem settings (`fly.MachineRootfs`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineRootfs {
    /// Persistence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persist: Option<RootfsPersist>,
    /// Size, GB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_gb: Option<u32>,
}

/// A service the proxy routes to (`fly.MachineService`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineService {
    /// Start this machine on demand.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    /// Stop or suspend this machine when idle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autostop: Option<Autostop>,
    /// Service checks.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub checks: Vec<MachineServiceCheck>,
    /// Load limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<MachineServiceConcurrency>,
    /// Description of `force_instance_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force_instance_description: Option<String>,
    /// Pin requests to one instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force_instance_key: Option<String>,
    /// Port the workload listens on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internal_port: Option<u16>,
    /// Machines kept running in the primary region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_machines_running: Option<u32>,
    /// Public ports.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<MachinePort>,
    /// `tcp` or `udp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// What the proxy does with an idle machine.
///
/// Accepts `false`/`true` (old format) and `"off"`/`"stop"`/`"suspend"`. Emits a bool for off and
/// stop and the string only for suspend, as fly-go does, so older clients keep decoding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Autostop {
    /// Never stop it.
    Off,
    /// Stop it.
    Stop,
    /// Suspend it (falls back to stop when suspension is impossible).
    Suspend,
}

impl Autostop {
    /// The string form: `off`, `stop` or `suspend`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Stop => "stop",
            Self::Suspend => "suspend",
        }
    }
}

impl fmt::Display for Autostop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Autostop {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Off => serializer.serialize_bool(false),
            Self::Stop => serializer.serialize_bool(true),
            Self::Suspend => serializer.serialize_str("suspend"),
        }
    }
}

impl<'de> Deserialize<'de> for Autostop {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AutostopVisitor;

        impl Visitor<'_> for AutostopVisitor {
            type Value = Autostop;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a bool or one of \"off\", \"stop\", \"suspend\"")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Autostop, E> {
                Ok(if v { Autostop::Stop } else { Autostop::Off })
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Autostop, E> {
                match v {
                    "off" => Ok(Autostop::Off),
                    "stop" => Ok(Autostop::Stop),
                    "suspend" => Ok(Autostop::Suspend),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }

        deserializer.deserialize_any(AutostopVisitor)
    }
}

/// A service check (`fly.MachineServiceCheck`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineServiceCheck {
    /// Time to wait after the machine starts before checking.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<Duration>,
    /// Headers of http checks.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub headers: Vec<MachineHttpHeader>,
    /// Time between checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// HTTP method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// HTTP path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Port; defaults to the service's internal port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `http` or `https`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Longest a check may take.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// TLS server name of https checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// Skip certificate verification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_skip_verify: Option<bool>,
    /// `tcp` or `http`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub r#type: Option<String>,
}

/// Load limits of a service (`fly.MachineServiceConcurrency`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineServiceConcurrency {
    /// Above this the machine gets no new work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hard_limit: Option<u32>,
    /// Above this the proxy prefers other machines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soft_limit: Option<u32>,
    /// `connections` or `requests`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub r#type: Option<String>,
}

/// A public port of a service (`fly.MachinePort`): `port`, or a range `start_port`..=`end_port`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachinePort {
    /// Last port of a range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
    /// Redirect http to https.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force_https: Option<bool>,
    /// `http`, `tls`, `pg_tls`, `proxy_proto`; none means raw TCP.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub handlers: Vec<String>,
    /// Options of the http handler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_options: Option<HttpOptions>,
    /// The port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Options of the proxy_proto handler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_proto_options: Option<ProxyProtoOptions>,
    /// First port of a range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_port: Option<u16>,
    /// Options of the tls handler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_options: Option<TlsOptions>,
}

/// Options of the http handler (`fly.HTTPOptions`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HttpOptions {
    /// Compress responses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compress: Option<bool>,
    /// Speak HTTP/2 to the workload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub h2_backend: Option<bool>,
    /// Seconds to wait for request headers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers_read_timeout: Option<u32>,
    /// Idle connection timeout, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u32>,
    /// Session-based replay caching.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub replay_cache: Vec<ReplayCache>,
    /// Response header handling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<HttpResponseOptions>,
}

/// Response options of the http handler (`fly.HTTPResponseOptions`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HttpResponseOptions {
    /// Headers to add (a string or list) or remove (`false`).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub headers: BTreeMap<String, HeaderValue>,
    /// Don't add the proxy's own response headers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pristine: Option<bool>,
}

/// The value of a response header rule: a value, several values, or a bool (`false` removes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum HeaderValue {
    /// `false` removes the header.
    Bool(bool),
    /// One value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

/// Session-based replay caching rule (`fly.ReplayCache`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ReplayCache {
    /// Clients may bypass the cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_bypass: Option<bool>,
    /// Cookie or header name to key the cache on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Path prefix the rule applies to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Entry lifetime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u32>,
    /// `cookie` or `header`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub r#type: Option<ReplayCacheType>,
}

/// What a replay cache rule keys on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ReplayCacheType {
    /// A cookie.
    Cookie,
    /// A header.
    Header,
}

/// Options of the proxy_proto handler (`fly.ProxyProtoOptions`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ProxyProtoOptions {
    /// `v1` (default) or `v2`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// Options of the tls handler (`fly.TLSOptions`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TlsOptions {
    /// ALPN protocols offered.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub alpn: Vec<String>,
    /// Serve a self-signed certificate when none matches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_self_signed: Option<bool>,
    /// TLS versions allowed.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub versions: Vec<String>,
}

/// Static files served by the proxy (`fly.Static`; `guest_path` and `url_prefix` are required).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Static {
    /// Directory in the guest.
    pub guest_path: String,
    /// Document served for a directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_document: Option<String>,
    /// Serve from this Tigris bucket instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tigris_bucket: Option<String>,
    /// URL prefix mapped onto `guest_path`.
    pub url_prefix: String,
}

/// How a machine is stopped (`fly.StopConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StopConfig {
    /// Signal sent first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<StopSignal>,
    /// Time between the signal and the forced stop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// Signals a stop may start with (the spec's `StopConfig.signal` enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum StopSignal {
    /// Hangup.
    SIGHUP,
    /// Interrupt.
    SIGINT,
    /// Quit.
    SIGQUIT,
    /// Kill (cannot be caught).
    SIGKILL,
    /// User signal 1.
    SIGUSR1,
    /// User signal 2.
    SIGUSR2,
    /// Terminate.
    SIGTERM,
}

impl StopSignal {
    /// Every stop signal, in the spec's order.
    pub const ALL: [Self; 7] = [
        Self::SIGHUP,
        Self::SIGINT,
        Self::SIGQUIT,
        Self::SIGKILL,
        Self::SIGUSR1,
        Self::SIGUSR2,
        Self::SIGTERM,
    ];

    /// The name, e.g. `SIGTERM`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SIGHUP => "SIGHUP",
            Self::SIGINT => "SIGINT",
            Self::SIGQUIT => "SIGQUIT",
            Self::SIGKILL => "SIGKILL",
            Self::SIGUSR1 => "SIGUSR1",
            Self::SIGUSR2 => "SIGUSR2",
            Self::SIGTERM => "SIGTERM",
        }
    }

    /// Parses a signal name; case-insensitive, the `SIG` prefix optional.
    pub fn parse(name: &str) -> Option<Self> {
        let upper = name.trim().to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        Self::ALL.into_iter().find(|s| s.as_str() == full)
    }
}

impl fmt::Display for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One container of a multi-container machine (`fly.ContainerConfig`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContainerConfig {
    /// Command.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cmd: Vec<String>,
    /// Containers this one waits for.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub depends_on: Vec<ContainerDependency>,
    /// Entrypoint.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub entrypoint: Vec<String>,
    /// Environment.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub env: BTreeMap<String, String>,
    /// Environment from machine fields.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub env_from: Vec<EnvFrom>,
    /// Exact argv.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub exec: Vec<String>,
    /// Files written before start.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub files: Vec<File>,
    /// Health checks.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub healthchecks: Vec<ContainerHealthcheck>,
    /// Image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Name, unique in the machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Restart policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<MachineRestart>,
    /// Secrets as environment variables.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub secrets: Vec<MachineSecret>,
    /// How it is stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopConfig>,
    /// User override.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A dependency between containers (`fly.ContainerDependency`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContainerDependency {
    /// What to wait for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub condition: Option<ContainerDependencyCondition>,
    /// The container waited for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Condition of a [`ContainerDependency`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ContainerDependencyCondition {
    /// Exited with status 0.
    ExitedSuccessfully,
    /// Health checks pass.
    Healthy,
    /// Started.
    Started,
}

/// A container health check (`fly.ContainerHealthcheck`); durations are integer seconds here.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContainerHealthcheck {
    /// Run a command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecHealthcheck>,
    /// Failures before unhealthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
    /// Seconds after start before checking.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<u32>,
    /// An HTTP request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHealthcheck>,
    /// Seconds between checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<u32>,
    /// `readiness` or `liveness`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<ContainerHealthcheckKind>,
    /// Unique in the container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Successes before healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success_threshold: Option<u32>,
    /// A TCP connect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpHealthcheck>,
    /// Seconds a check may take.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
    /// What happens when unhealthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unhealthy: Option<UnhealthyPolicy>,
}

/// Kind of a container health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ContainerHealthcheckKind {
    /// Gates traffic.
    Readiness,
    /// Gates the container's life.
    Liveness,
}

/// Scheme of an HTTP container health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ContainerHealthcheckScheme {
    /// Plain HTTP.
    Http,
    /// HTTPS.
    Https,
}

/// What happens to an unhealthy container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum UnhealthyPolicy {
    /// Stop it.
    Stop,
}

/// A command health check (`fly.ExecHealthcheck`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ExecHealthcheck {
    /// argv.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub command: Vec<String>,
}

/// An HTTP health check (`fly.HTTPHealthcheck`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HttpHealthcheck {
    /// Headers sent.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub headers: Vec<MachineHttpHeader>,
    /// Method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `http` or `https`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<ContainerHealthcheckScheme>,
    /// TLS server name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// Skip certificate verification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_skip_verify: Option<bool>,
}

/// A TCP health check (`fly.TCPHealthcheck`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TcpHealthcheck {
    /// Port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[cfg(test)]
mod tests {

    #[test]
    fn raw_values_decode_from_both_alphabets_with_or_without_padding() {
        let file = |v: &str| File {
            raw_value: Some(v.to_owned()),
            ..File::default()
        };
        assert_eq!(file("aGVsbG8=").decoded_raw_value().unwrap().unwrap(), b"hello");
        assert_eq!(file("aGVs\nbG8").decoded_raw_value().unwrap().unwrap(), b"hello");
        assert_eq!(file("-_8").decoded_raw_value().unwrap().unwrap(), [0xfb, 0xff]);
        assert_eq!(file("+/8=").decoded_raw_value().unwrap().unwrap(), [0xfb, 0xff]);
        assert!(file("a*b").decoded_raw_value().unwrap().is_err());
        assert!(File::default().decoded_raw_value().is_none());
    }

    use serde_json::{Value, json};

    use super::*;

    /// Every property of `fly.MachineConfig` and what it contains, generated from the OpenAPI
    /// spec's schemas (one value per field, the last value of each enum).
    const FULL: &str = include_str!("../tests/fixtures/machine_config_full.json");

    #[test]
    fn every_spec_field_round_trips() {
        let input: Value = serde_json::from_str(FULL).unwrap();
        let config: MachineConfig = serde_json::from_value(input.clone()).unwrap();
        let output = serde_json::to_value(&config).unwrap();
        assert_eq!(output, input);
        assert_eq!(
            config.services[0].autostop,
            Some(Autostop::Suspend),
            "fixture exercises the string form"
        );
    }

    #[test]
    fn fly_go_machine_config_round_trips() {
        // The shape flyctl sends for a fly.toml-deployed app.
        let input = json!({
            "image": "registry.fly.io/app:deployment-01J",
            "env": {"FLY_PROCESS_GROUP": "app", "PRIMARY_REGION": "ams"},
            "init": {"swap_size_mb": 512},
            "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
            "metadata": {"fly_platform_version": "v2", "fly_process_group": "app"},
            "services": [{
                "protocol": "tcp",
                "internal_port": 8080,
                "autostop": true,
                "autostart": true,
                "min_machines_running": 0,
                "ports": [
                    {"port": 80, "handlers": ["http"], "force_https": true},
                    {"port": 443, "handlers": ["http", "tls"]}
                ],
                "concurrency": {"type": "connections", "hard_limit": 25, "soft_limit": 20},
                "checks": [{"type": "tcp", "interval": "15s", "timeout": "2s", "grace_period": "1s"}]
            }],
            "checks": {"alive": {"type": "http", "port": 8080, "path": "/health", "interval": "1m0s"}},
            "restart": {"policy": "on-failure", "max_retries": 10},
            "stop_config": {"signal": "SIGINT", "timeout": "5s"}
        });
        let config: MachineConfig = serde_json::from_value(input.clone()).unwrap();
        assert_eq!(serde_json::to_value(&config).unwrap(), input);
        assert_eq!(
            config.restart.as_ref().and_then(|r| r.policy),
            Some(RestartPolicy::OnFailure)
        );
        assert_eq!(
            config.stop_config.and_then(|s| s.timeout),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn autostop_accepts_bools_and_strings_and_emits_like_fly_go() {
        let parse = |v: Value| serde_json::from_value::<Autostop>(v);
        assert_eq!(parse(json!(false)).unwrap(), Autostop::Off);
        assert_eq!(parse(json!(true)).unwrap(), Autostop::Stop);
        assert_eq!(parse(json!("off")).unwrap(), Autostop::Off);
        assert_eq!(parse(json!("stop")).unwrap(), Autostop::Stop);
        assert_eq!(parse(json!("suspend")).unwrap(), Autostop::Suspend);
        assert!(parse(json!("sometimes")).is_err());
        assert!(parse(json!(1)).is_err());
        let emit = |a: Autostop| serde_json::to_value(a).unwrap();
        assert_eq!(emit(Autostop::Off), json!(false));
        assert_eq!(emit(Autostop::Stop), json!(true));
        assert_eq!(emit(Autostop::Suspend), json!("suspend"));
    }

    #[test]
    fn nulls_read_as_empty_and_unknown_fields_are_ignored() {
        let config: MachineConfig = serde_json::from_value(json!({
            "image": "nginx",
            "env": null,
            "services": null,
            "spot": {"max_price_fraction": 0.5},
            "init": {"cmd": null}
        }))
        .unwrap();
        assert!(config.env.is_empty());
        assert!(config.services.is_empty());
        assert_eq!(
            serde_json::to_value(&config).unwrap(),
            json!({"image": "nginx", "init": {}})
        );
    }

    #[test]
    fn durations_accept_nanosecond_integers() {
        let check: MachineServiceCheck =
            serde_json::from_value(json!({"type": "tcp", "interval": 15_000_000_000u64})).unwrap();
        assert_eq!(check.interval, Some(Duration::from_secs(15)));
        assert_eq!(
            serde_json::to_value(&check).unwrap(),
            json!({"type": "tcp", "interval": "15s"})
        );
    }

    #[test]
    fn bad_enum_values_are_rejected() {
        for bad in [
            json!({"restart": {"policy": "sometimes"}}),
            json!({"stop_config": {"signal": "SIGSTOP"}}),
            json!({"checks": {"a": {"kind": "liveness"}}}),
            json!({"guest": {"persist_rootfs": "forever"}}),
            json!({"services": [{"internal_port": 70000}]}),
            json!({"statics": [{"guest_path": "/public"}]}),
        ] {
            assert!(
                serde_json::from_value::<MachineConfig>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn stop_signals_parse_leniently() {
        assert_eq!(StopSignal::parse("sigterm"), Some(StopSignal::SIGTERM));
        assert_eq!(StopSignal::parse("INT"), Some(StopSignal::SIGINT));
        assert_eq!(StopSignal::parse("SIGSTOP"), None);
        for s in StopSignal::ALL {
            assert_eq!(StopSignal::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        }
    }
}
