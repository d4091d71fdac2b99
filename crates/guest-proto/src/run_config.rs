//! The run config: everything init needs to turn a root disk into a running workload.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What the host hands init at boot (JSON at [`crate::RUN_CONFIG_PATH`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The guest's hostname (Fly uses the machine id).
    pub hostname: String,
    /// The image's config (OCI `config` section): entrypoint, cmd, env, user, working dir.
    #[serde(default)]
    pub image: ImageConfig,
    /// Replaces entrypoint and cmd entirely (Fly `init.exec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    /// Replaces the image's entrypoint (Fly `init.entrypoint`); an override of the entrypoint also
    /// drops the image's cmd, as Docker does, unless `cmd` is given too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's cmd (Fly `init.cmd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Replaces the image's user: `name`, `uid`, `name:group` or `uid:gid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Replaces the image's working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Variables set by the user (machine config `env`); they override the image's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Platform variables (`FLY_*` and their `ALOFT_*` twins); these win over everything.
    #[serde(default)]
    pub runtime: RuntimeEnv,
    /// Root filesystem: the read-only base and the writable layer.
    #[serde(default)]
    pub root: RootConfig,
    /// Volumes to mount in the new root before the workload starts (Fly `mounts`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountSpec>,
    /// eth0's addresses and routes; `None` leaves only loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetConfig>,
    /// `/etc/resolv.conf`.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Extra `/etc/hosts` lines (localhost and the hostname are always there).
    #[serde(default)]
    pub etc_hosts: Vec<EtcHost>,
    /// Files written before the workload starts (Fly `files`).
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Signal for a graceful stop when the host does not name one (`SIGTERM`, `TERM` or `15`);
    /// image's `StopSignal` when unset, else `SIGINT` as Fly does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
}

/// The parts of an OCI image config init acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `KEY=VALUE` strings, as in the OCI config.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// `ExposedPorts`, sorted and without duplicates (informational: the machine config's services
    /// decide what is reachable).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<ExposedPort>,
    /// `Labels`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A port an image declares, `PORT/PROTO` (`8080/tcp`, `53/udp`); serialized as that string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExposedPort {
    /// 1–65535.
    pub port: u16,
    pub protocol: PortProtocol,
}

/// The transport of an [`ExposedPort`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortProtocol {
    Tcp,
    Udp,
    Sctp,
}

impl PortProtocol {
    /// `tcp`, `udp` or `sctp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

/// Why a string is not a `PORT[/PROTO]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid exposed port {input:?}: expected PORT/PROTO with PORT 1-65535 and PROTO tcp, udp or sctp")]
pub struct ParseExposedPortError {
    pub input: String,
}

impl FromStr for ExposedPort {
    type Err = ParseExposedPortError;

    /// `PORT/PROTO`, or a bare `PORT` (TCP, as Docker reads it); the protocol is case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseExposedPortError { input: s.to_owned() };
        let (port, proto) = s.trim().split_once('/').unwrap_or((s.trim(), "tcp"));
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let port: u16 = port.parse().map_err(|_| err())?;
        if port == 0 {
            return Err(err());
        }
        let protocol = match proto.to_ascii_lowercase().as_str() {
            "tcp" => PortProtocol::Tcp,
            "udp" => PortProtocol::Udp,
            "sctp" => PortProtocol::Sctp,
            _ => return Err(err()),
        };
        Ok(Self { port, protocol })
    }
}

impl fmt::Display for ExposedPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol.as_str())
    }
}

impl Serialize for ExposedPort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ExposedPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Platform facts exported to the workload as `FLY_*` variables and their `ALOFT_*` twins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeEnv {
    #[serde(default)]
    pub app_name: String,
    #[serde(default)]
    pub machine_id: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub private_ip: String,
    #[serde(default)]
    pub process_group: String,
    #[serde(default)]
    pub image_ref: String,
    #[serde(default)]
    pub machine_version: String,
    #[serde(default)]
    pub vm_memory_mb: u32,
    #[serde(default)]
    pub primary_region: String,
}

impl RuntimeEnv {
    /// The variables, in a stable order: `FLY_APP_NAME`, …, then the `ALOFT_*` twins. Empty facts
    /// are left out rather than exported as empty strings.
    pub fn vars(&self) -> Vec<(String, String)> {
        let mem = if self.vm_memory_mb == 0 {
            String::new()
        } else {
            self.vm_memory_mb.to_string()
        };
        let facts: [(&str, &str); 9] = [
            ("APP_NAME", &self.app_name),
            ("MACHINE_ID", &self.machine_id),
            ("ALLOC_ID", &self.machine_id),
            ("REGION", &self.region),
            ("PRIVATE_IP", &self.private_ip),
            ("PROCESS_GROUP", &self.process_group),
            ("IMAGE_REF", &self.image_ref),
            ("MACHINE_VERSION", &self.machine_version),
            ("VM_MEMORY_MB", &mem),
        ];
        let mut out = Vec::new();
        for prefix in ["FLY_", "ALOFT_"] {
            for (k, v) in facts {
                if !v.is_empty() {
                    out.push((format!("{prefix}{k}"), v.to_owned()));
                }
            }
        }
        if !self.primary_region.is_empty() {
            out.push(("PRIMARY_REGION".to_owned(), self.primary_region.clone()));
        }
        out
    }
}

/// Root filesystem layout. Devices are guest paths (`/dev/vda`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootConfig {
    /// The image's read-only base; `None` runs from the initramfs itself (probe and tests only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// `ext4`, `erofs` or `squashfs`.
    #[serde(default = "default_fstype")]
    pub fstype: String,
    /// An empty or previously used ext4 disk for the writable layer; `None` puts the writable layer
    /// in guest memory (tmpfs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable_device: Option<String>,
}

fn default_fstype() -> String {
    "ext4".to_owned()
}

impl Default for RootConfig {
    fn default() -> Self {
        Self {
            device: None,
            fstype: default_fstype(),
            writable_device: None,
        }
    }
}

/// A volume init mounts (read-write) in the new root, after the root switch and before the
/// workload starts, creating its mount point. A volume that cannot be mounted fails the boot with
/// a message naming it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    /// The volume's id (`vol_…`), for messages.
    pub volume: String,
    /// The virtio-blk serial of the volume's disk, as the guest reads it from
    /// `/sys/block/<dev>/serial`: how init finds the disk whatever name (`vdc`, …) the guest kernel
    /// gave it.
    pub serial: String,
    /// Absolute mount point in the guest.
    pub path: String,
    /// The volume's filesystem (`ext4`).
    #[serde(default = "default_fstype")]
    pub fstype: String,
}

/// eth0 configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Addresses with prefix length (`172.30.0.2/30`, `fdaa:0:1::2/64`).
    pub addresses: Vec<IpNet>,
    /// Default gateways (one per family at most).
    #[serde(default)]
    pub gateways: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// `/etc/resolv.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    #[serde(default)]
    pub nameservers: Vec<IpAddr>,
    #[serde(default)]
    pub search: Vec<String>,
}

/// One `/etc/hosts` line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcHost {
    pub ip: IpAddr,
    pub names: Vec<String>,
}

/// A file init writes before starting the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute path inside the guest.
    pub guest_path: String,
    /// The content, as bytes (the API's base64 is decoded by the host).
    pub contents: Vec<u8>,
    /// Permission bits; 0o644 when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// An address with its prefix length, `ADDR/LEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// Why a string is not an `ADDR/LEN`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address {input:?}: expected ADDR/PREFIX such as 172.30.0.2/30 or fdaa::2/64")]
pub struct ParseIpNetError {
    pub input: String,
}

impl FromStr for IpNet {
    type Err = ParseIpNetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseIpNetError { input: s.to_owned() };
        let (addr, len) = s.split_once('/').ok_or_else(err)?;
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        let prefix_len: u8 = len.parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(err());
        }
        Ok(Self { addr, prefix_len })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipnet_parses_and_rejects() {
        let v4: IpNet = "172.30.0.2/30".parse().unwrap();
        assert_eq!(v4.to_string(), "172.30.0.2/30");
        let v6: IpNet = "fdaa:0:1::2/64".parse().unwrap();
        assert_eq!(v6.prefix_len, 64);
        for bad in ["172.30.0.2", "172.30.0.2/33", "fdaa::2/129", "x/1", "1.2.3.4/-1"] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn run_config_round_trips_and_rejects_unknown_fields() {
        let mut cfg = RunConfig {
            hostname: "m1".into(),
            ..RunConfig::default()
        };
        cfg.network = Some(NetConfig {
            addresses: vec!["10.0.0.2/24".parse().unwrap()],
            gateways: vec!["10.0.0.1".parse().unwrap()],
            mtu: None,
        });
        let json = serde_json::to_string(&cfg).unwrap();
        let back: RunConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
        assert!(serde_json::from_str::<RunConfig>(r#"{"hostname":"x","bogus":1}"#).is_err());
    }

    #[test]
    fn mounts_round_trip_and_are_left_out_when_empty() {
        let none = serde_json::to_string(&RunConfig::default()).unwrap();
        assert!(!none.contains("mounts"), "{none}");
        let cfg: RunConfig = serde_json::from_str(
            r#"{"hostname":"m","mounts":[{"volume":"vol_1","serial":"aloft-d2","path":"/data"}]}"#,
        )
        .unwrap();
        assert_eq!(
            cfg.mounts,
            [MountSpec {
                volume: "vol_1".into(),
                serial: "aloft-d2".into(),
                path: "/data".into(),
                fstype: "ext4".into(),
            }]
        );
        let back: RunConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        assert!(
            serde_json::from_str::<MountSpec>(r#"{"volume":"v","serial":"s","path":"/d","ro":true}"#)
                .is_err()
        );
    }

    #[test]
    fn exposed_ports_parse_print_and_reject() {
        let p: ExposedPort = "8080/tcp".parse().unwrap();
        assert_eq!((p.port, p.protocol), (8080, PortProtocol::Tcp));
        assert_eq!("53/UDP".parse::<ExposedPort>().unwrap().to_string(), "53/udp");
        assert_eq!("443".parse::<ExposedPort>().unwrap().to_string(), "443/tcp");
        assert_eq!(
            "9/sctp".parse::<ExposedPort>().unwrap().protocol,
            PortProtocol::Sctp
        );
        for bad in [
            "",
            "/tcp",
            "0/tcp",
            "65536/tcp",
            "http",
            "80/icmp",
            "80-90/tcp",
            "+80/tcp",
            "80/tcp/x",
        ] {
            assert!(bad.parse::<ExposedPort>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn image_config_without_ports_and_labels_parses_and_omits_them() {
        // A run config written before exposed_ports and labels existed still parses.
        let old = r#"{"hostname":"m","image":{"entrypoint":["/bin/sh"],"cmd":[],"env":["A=1"]}}"#;
        let cfg: RunConfig = serde_json::from_str(old).unwrap();
        assert!(cfg.image.exposed_ports.is_empty() && cfg.image.labels.is_empty());
        let json = serde_json::to_string(&cfg.image).unwrap();
        assert!(
            !json.contains("exposed_ports") && !json.contains("labels"),
            "{json}"
        );

        let mut image = ImageConfig {
            exposed_ports: vec!["53/udp".parse().unwrap(), "8080/tcp".parse().unwrap()],
            ..ImageConfig::default()
        };
        image
            .labels
            .insert("org.opencontainers.image.title".into(), "web".into());
        let json = serde_json::to_string(&image).unwrap();
        assert!(
            json.contains(r#""exposed_ports":["53/udp","8080/tcp"]"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<ImageConfig>(&json).unwrap(), image);
        assert!(serde_json::from_str::<ImageConfig>(r#"{"exposed_ports":["x/tcp"]}"#).is_err());
    }

    #[test]
    fn runtime_env_has_fly_and_aloft_twins_and_skips_empty() {
        let env = RuntimeEnv {
            app_name: "web".into(),
            machine_id: "abc".into(),
            vm_memory_mb: 256,
            ..RuntimeEnv::default()
        };
        let vars = env.vars();
        let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("FLY_APP_NAME"), Some("web"));
        assert_eq!(get("ALOFT_APP_NAME"), Some("web"));
        assert_eq!(get("FLY_ALLOC_ID"), Some("abc"));
        assert_eq!(get("FLY_VM_MEMORY_MB"), Some("256"));
        assert_eq!(get("FLY_REGION"), None);
    }
}
