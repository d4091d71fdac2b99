//! The flags that shape a machine's config (`aloft machine run` and `update`) and how they map
//! onto a `MachineConfig`, with flyctl's spellings: `-p 80:8080/tcp:http:tls`, `-e K=V`,
//! `--metadata K=V`, `--restart no|always|on-fail`, `--rm`, `--entrypoint`, `--vm-size`,
//! `--vm-cpus`, `--vm-memory`, `--vm-cpu-kind`, `-v vol_…:/data`.

use std::collections::BTreeMap;

use aloft_api::{
    CPU_KIND_PERFORMANCE, CPU_KIND_SHARED, DEFAULT_VM_SIZE, GUEST_PRESETS, GuestPreset, MachineConfig,
    MachineGuest, MachineInit, MachineMount, MachinePort, MachineRestart, MachineService, RestartPolicy,
    VolumeId,
};
use clap::Args;

use crate::errors::UserError;

/// Handlers a port may have (Fly's).
const HANDLERS: [&str; 5] = ["http", "tls", "pg_tls", "proxy_proto", "edge_http"];

/// Flags that change a machine's config.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct ConfigFlags {
    /// Publish a port: EDGE[:MACHINE][/PROTOCOL[:HANDLER…]], e.g. 80:8080/tcp:http or
    /// 443:8080/tcp:http:tls (protocol tcp or udp; handlers http, tls, pg_tls, proxy_proto).
    /// Repeatable.
    #[arg(short = 'p', long = "port", value_name = "PORT")]
    pub(crate) ports: Vec<String>,
    /// Set an environment variable, NAME=VALUE. Repeatable.
    #[arg(short = 'e', long = "env", value_name = "NAME=VALUE")]
    pub(crate) env: Vec<String>,
    /// Set a metadata key, NAME=VALUE. Repeatable.
    #[arg(long = "metadata", value_name = "NAME=VALUE")]
    pub(crate) metadata: Vec<String>,
    /// Restart policy when the main process exits: no, always or on-fail(ure).
    #[arg(long, value_name = "POLICY")]
    pub(crate) restart: Option<String>,
    /// Destroy the machine once its main process exits (restart policy no, auto_destroy).
    #[arg(long)]
    pub(crate) rm: bool,
    /// Replace the image's ENTRYPOINT (a command line, split like a shell would).
    #[arg(long, value_name = "COMMAND")]
    pub(crate) entrypoint: Option<String>,
    /// A VM size preset (shared-cpu-1x, performance-2x, …) [run's default: shared-cpu-1x].
    #[arg(long = "vm-size", visible_alias = "size", value_name = "SIZE")]
    pub(crate) vm_size: Option<String>,
    /// Number of vCPUs.
    #[arg(long = "vm-cpus", visible_alias = "cpus", value_name = "N")]
    pub(crate) vm_cpus: Option<u32>,
    /// Memory: MiB (512), or with a unit (512mb, 1gb).
    #[arg(long = "vm-memory", visible_alias = "memory", value_name = "SIZE")]
    pub(crate) vm_memory: Option<String>,
    /// CPU kind: shared or performance.
    #[arg(long = "vm-cpu-kind", visible_alias = "cpu-kind", value_name = "KIND")]
    pub(crate) vm_cpu_kind: Option<String>,
    /// Mount a volume: VOLUME_ID:/PATH (vol_4yx0jvqe1x1dj7gr:/data), or NAME:/PATH for an
    /// unattached volume of that name in the machine's region, as flyctl does. The machine runs
    /// on the volume's host. One per machine.
    #[arg(short = 'v', long = "volume", value_name = "ID:PATH")]
    pub(crate) volumes: Vec<String>,
}

fn usage(message: String, hint: &str) -> anyhow::Error {
    UserError {
        message,
        hint: Some(hint.to_owned()),
        code: 2,
    }
    .into()
}

/// A parsed `-p` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortSpec {
    pub(crate) edge: u16,
    pub(crate) machine: u16,
    pub(crate) protocol: String,
    pub(crate) handlers: Vec<String>,
}

/// Parses `EDGE[:MACHINE][/PROTOCOL[:HANDLER…]]`.
pub(crate) fn parse_port(spec: &str) -> anyhow::Result<PortSpec> {
    let hint = "write -p EDGE[:MACHINE][/PROTOCOL[:HANDLER…]], e.g. -p 80:8080/tcp:http";
    let bad = |why: String| usage(format!("invalid port {spec:?}: {why}"), hint);
    let (ports, proto) = match spec.trim().split_once('/') {
        Some((ports, proto)) => (ports, Some(proto)),
        None => (spec.trim(), None),
    };
    let number = |text: &str, what: &str| -> anyhow::Result<u16> {
        text.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad(format!("{what} {text:?} is not a port number from 1 to 65535")))
    };
    let (edge, machine) = match ports.split_once(':') {
        Some((edge, machine)) => (number(edge, "edge port")?, number(machine, "machine port")?),
        None => {
            let port = number(ports, "port")?;
            (port, port)
        }
    };
    let mut protocol = "tcp".to_owned();
    let mut handlers = Vec::new();
    if let Some(proto) = proto {
        let mut parts = proto.split(':');
        protocol = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        if !matches!(protocol.as_str(), "tcp" | "udp") {
            return Err(bad(format!("protocol {protocol:?} is neither tcp nor udp")));
        }
        for handler in parts {
            let handler = handler.trim().to_ascii_lowercase();
            if !HANDLERS.contains(&handler.as_str()) {
                return Err(bad(format!(
                    "unknown handler {handler:?} (use {})",
                    HANDLERS.join(", ")
                )));
            }
            if protocol == "udp" {
                return Err(bad("udp ports take no handlers".to_owned()));
            }
            if !handlers.contains(&handler) {
                handlers.push(handler);
            }
        }
    }
    Ok(PortSpec {
        edge,
        machine,
        protocol,
        handlers,
    })
}

/// Parses `--volume VOLUME_ID:/PATH` into a mount of that volume (aloftd fills in its name and
/// size). A `NAME:/PATH` is turned into an id by [`super::volume_names_to_ids`] first.
pub(crate) fn parse_volume(spec: &str) -> anyhow::Result<MachineMount> {
    let hint = "write --volume VOLUME_ID:/PATH or NAME:/PATH, e.g. --volume data:/data \
                (aloft volumes list shows them; aloft volumes create NAME makes one)";
    let bad = |why: String| usage(format!("invalid --volume {spec:?}: {why}"), hint);
    let Some((id, path)) = spec.trim().split_once(':') else {
        return Err(bad("expected VOLUME_ID:/PATH".to_owned()));
    };
    let id = id.trim();
    let id: VolumeId = id.parse().map_err(|_| {
        if id.is_empty() {
            bad("no volume id before the ':'".to_owned())
        } else if aloft_api::validate_volume_name(id).is_ok() {
            bad(format!("{id:?} names a volume, and this command takes its id"))
        } else {
            bad(format!(
                "{id:?} is neither a volume id (vol_ and lowercase letters and digits) nor a \
                 volume name (lowercase letters, digits and underscores)"
            ))
        }
    })?;
    let path = path.trim();
    if path.contains(':') {
        return Err(bad("mount options (ID:PATH:OPTIONS) are not supported".to_owned()));
    }
    if !path.starts_with('/') || path.trim_end_matches('/').is_empty() {
        return Err(bad(format!("the mount path {path:?} must be absolute and not /")));
    }
    Ok(MachineMount {
        volume: Some(id.to_string()),
        path: Some(path.to_owned()),
        ..MachineMount::default()
    })
}

/// One service per (protocol, machine port), with its edge ports in the order given.
pub(crate) fn services(ports: &[PortSpec]) -> Vec<MachineService> {
    let mut services: Vec<MachineService> = Vec::new();
    for p in ports {
        let port = MachinePort {
            port: Some(p.edge),
            handlers: p.handlers.clone(),
            ..MachinePort::default()
        };
        let same = services.iter_mut().find(|s| {
            s.internal_port == Some(p.machine) && s.protocol.as_deref() == Some(p.protocol.as_str())
        });
        match same {
            Some(service) => service.ports.push(port),
            None => services.push(MachineService {
                protocol: Some(p.protocol.clone()),
                internal_port: Some(p.machine),
                ports: vec![port],
                ..MachineService::default()
            }),
        }
    }
    services
}

/// `NAME=VALUE` (the value may contain `=` and be empty; the name may not).
pub(crate) fn parse_kv(flag: &str, text: &str) -> anyhow::Result<(String, String)> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(usage(
            format!("invalid {flag} {text:?}: expected NAME=VALUE"),
            &format!("e.g. {flag} LOG_LEVEL=debug"),
        )),
    }
}

fn parse_kvs(flag: &str, items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    items.iter().map(|i| parse_kv(flag, i)).collect()
}

/// `no`, `always`, `on-fail` / `on-failure` (flyctl accepts both).
pub(crate) fn parse_restart(text: &str) -> anyhow::Result<RestartPolicy> {
    match text.trim().to_ascii_lowercase().as_str() {
        "no" | "never" => Ok(RestartPolicy::No),
        "always" => Ok(RestartPolicy::Always),
        "on-fail" | "on-failure" => Ok(RestartPolicy::OnFailure),
        _ => Err(usage(
            format!("invalid --restart {text:?}"),
            "use --restart no, always or on-fail",
        )),
    }
}

/// Memory in MiB: a number (MiB) or a number with `mb`/`mib`/`m` or `gb`/`gib`/`g`.
pub(crate) fn parse_memory(text: &str) -> anyhow::Result<u32> {
    let lower = text.trim().to_ascii_lowercase();
    let digits_end = lower.find(|c: char| !c.is_ascii_digit()).unwrap_or(lower.len());
    let (number, unit) = lower.split_at(digits_end);
    let factor = match unit.trim() {
        "" | "m" | "mb" | "mib" => Some(1),
        "g" | "gb" | "gib" => Some(1024),
        _ => None,
    };
    number
        .parse::<u32>()
        .ok()
        .zip(factor)
        .and_then(|(n, f)| n.checked_mul(f))
        .filter(|mb| *mb > 0)
        .ok_or_else(|| {
            usage(
                format!("invalid --vm-memory {text:?}"),
                "give MiB (--vm-memory 512) or a size with a unit (512mb, 2gb)",
            )
        })
}

/// The guest after the size flags: `--vm-size` replaces it, then cpus, memory and kind change
/// it; `base` when no flag is given.
fn guest(base: Option<MachineGuest>, flags: &ConfigFlags) -> anyhow::Result<Option<MachineGuest>> {
    let mut guest = base;
    if let Some(size) = &flags.vm_size {
        let preset = GuestPreset::find(&size.trim().to_ascii_lowercase()).ok_or_else(|| {
            let names: Vec<&str> = GUEST_PRESETS.iter().map(|p| p.name).collect();
            usage(
                format!("unknown --vm-size {size:?}"),
                &format!("use one of {}", names.join(", ")),
            )
        })?;
        guest = Some(preset.to_guest());
    }
    let touched = flags.vm_cpus.is_some() || flags.vm_memory.is_some() || flags.vm_cpu_kind.is_some();
    if !touched {
        return Ok(guest);
    }
    let mut g = guest.unwrap_or_else(|| {
        GuestPreset::find(DEFAULT_VM_SIZE)
            .map(GuestPreset::to_guest)
            .unwrap_or_default()
    });
    if let Some(kind) = &flags.vm_cpu_kind {
        let kind = kind.trim().to_ascii_lowercase();
        if kind != CPU_KIND_SHARED && kind != CPU_KIND_PERFORMANCE {
            return Err(usage(
                format!("invalid --vm-cpu-kind {kind:?}"),
                "use --vm-cpu-kind shared or performance",
            ));
        }
        g.cpu_kind = Some(kind);
    }
    if let Some(cpus) = flags.vm_cpus {
        if cpus == 0 {
            return Err(usage(
                "--vm-cpus must be at least 1".to_owned(),
                "e.g. --vm-cpus 2",
            ));
        }
        g.cpus = Some(cpus);
    }
    if let Some(memory) = &flags.vm_memory {
        g.memory_mb = Some(parse_memory(memory)?);
    }
    Ok(Some(g))
}

/// Applies the flags to `config`: env and metadata are merged (a flag wins over what is there),
/// `-p` replaces the services, `--restart`/`--rm` the restart policy, `--entrypoint` and a
/// non-empty `cmd` the init's entrypoint and command, `--volume` the mount.
pub(crate) fn apply(config: &mut MachineConfig, flags: &ConfigFlags, cmd: &[String]) -> anyhow::Result<()> {
    config.env.extend(parse_kvs("--env", &flags.env)?);
    config.metadata.extend(parse_kvs("--metadata", &flags.metadata)?);
    if !flags.ports.is_empty() {
        let ports = flags
            .ports
            .iter()
            .map(|p| parse_port(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        config.services = services(&ports);
    }
    let restart = flags.restart.as_deref().map(parse_restart).transpose()?;
    if flags.rm {
        if restart.is_some_and(|r| r != RestartPolicy::No) {
            return Err(usage(
                "--rm and --restart other than no contradict each other".to_owned(),
                "drop --restart (--rm means restart no) or drop --rm",
            ));
        }
        config.restart = Some(MachineRestart {
            policy: Some(RestartPolicy::No),
            ..MachineRestart::default()
        });
        config.auto_destroy = Some(true);
    } else if let Some(policy) = restart {
        config.restart = Some(MachineRestart {
            policy: Some(policy),
            ..MachineRestart::default()
        });
    }
    if let Some(entrypoint) = &flags.entrypoint {
        let argv = shlex::split(entrypoint).ok_or_else(|| {
            usage(
                format!("invalid --entrypoint {entrypoint:?}: unbalanced quotes"),
                "quote it like a shell command line",
            )
        })?;
        config.init.get_or_insert_with(MachineInit::default).entrypoint = argv;
    }
    if !cmd.is_empty() {
        config.init.get_or_insert_with(MachineInit::default).cmd = cmd.to_vec();
    }
    config.guest = guest(config.guest.take(), flags)?;
    match flags.volumes.as_slice() {
        [] => {}
        [one] => config.mounts = vec![parse_volume(one)?],
        [..] => {
            return Err(usage(
                format!(
                    "{} volumes given: a machine mounts at most one",
                    flags.volumes.len()
                ),
                "give --volume once",
            ));
        }
    }
    Ok(())
}

/// The config `aloft machine run IMAGE [CMD]` creates: flyctl's defaults (shared-cpu-1x, restart
/// always, or no with `--rm`) and the flags.
pub(crate) fn run_config(image: &str, cmd: &[String], flags: &ConfigFlags) -> anyhow::Result<MachineConfig> {
    let mut config = MachineConfig {
        image: Some(image.to_owned()),
        restart: Some(MachineRestart {
            policy: Some(RestartPolicy::Always),
            ..MachineRestart::default()
        }),
        ..MachineConfig::default()
    };
    apply(&mut config, flags, cmd)?;
    if config.guest.is_none() {
        config.guest = GuestPreset::find(DEFAULT_VM_SIZE).map(GuestPreset::to_guest);
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn port(edge: u16, machine: u16, protocol: &str, handlers: &[&str]) -> PortSpec {
        PortSpec {
            edge,
            machine,
            protocol: protocol.into(),
            handlers: handlers.iter().map(|h| (*h).to_owned()).collect(),
        }
    }

    #[test]
    fn port_specs_in_flyctls_forms() {
        assert_eq!(parse_port("80").unwrap(), port(80, 80, "tcp", &[]));
        assert_eq!(parse_port("80:8080").unwrap(), port(80, 8080, "tcp", &[]));
        assert_eq!(
            parse_port("80:8080/tcp:http").unwrap(),
            port(80, 8080, "tcp", &["http"])
        );
        assert_eq!(
            parse_port("443:8080/TCP:http:tls").unwrap(),
            port(443, 8080, "tcp", &["http", "tls"])
        );
        assert_eq!(parse_port("53/udp").unwrap(), port(53, 53, "udp", &[]));
        for bad in [
            "",
            "x",
            "0",
            "70000",
            "80:",
            "80/sctp",
            "80/tcp:gopher",
            "53/udp:http",
            "80:8080:1",
        ] {
            let e = parse_port(bad).unwrap_err();
            let (message, hint, code) = crate::errors::describe(&e);
            assert!(message.starts_with("invalid port"), "{bad}: {message}");
            assert!(hint.unwrap().contains("-p EDGE"), "{bad}");
            assert_eq!(code, 2);
        }
    }

    #[test]
    fn ports_on_one_machine_port_share_a_service() {
        let specs = [
            parse_port("80:8080/tcp:http").unwrap(),
            parse_port("443:8080/tcp:http:tls").unwrap(),
            parse_port("5432/tcp").unwrap(),
        ];
        assert_eq!(
            serde_json::to_value(services(&specs)).unwrap(),
            json!([
                {"protocol": "tcp", "internal_port": 8080, "ports": [
                    {"port": 80, "handlers": ["http"]},
                    {"port": 443, "handlers": ["http", "tls"]}
                ]},
                {"protocol": "tcp", "internal_port": 5432, "ports": [{"port": 5432}]}
            ])
        );
    }

    #[test]
    fn env_and_metadata_pairs() {
        assert_eq!(parse_kv("--env", "A=1").unwrap(), ("A".into(), "1".into()));
        assert_eq!(parse_kv("--env", "A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_kv("--env", "A=").unwrap(), ("A".into(), String::new()));
        for bad in ["A", "=1", ""] {
            let e = parse_kv("--env", bad).unwrap_err();
            assert!(e.to_string().contains("expected NAME=VALUE"), "{e}");
        }
    }

    #[test]
    fn restart_spellings() {
        assert_eq!(parse_restart("no").unwrap(), RestartPolicy::No);
        assert_eq!(parse_restart("Always").unwrap(), RestartPolicy::Always);
        assert_eq!(parse_restart("on-fail").unwrap(), RestartPolicy::OnFailure);
        assert_eq!(parse_restart("on-failure").unwrap(), RestartPolicy::OnFailure);
        assert!(parse_restart("sometimes").is_err());
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512").unwrap(), 512);
        assert_eq!(parse_memory("512mb").unwrap(), 512);
        assert_eq!(parse_memory("2GB").unwrap(), 2048);
        assert_eq!(parse_memory("1g").unwrap(), 1024);
        for bad in ["", "0", "lots", "1tb", "-5"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn run_defaults_and_flags_map_onto_the_config() {
        let plain = run_config("busybox", &[], &ConfigFlags::default()).unwrap();
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            json!({
                "image": "busybox",
                "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
                "restart": {"policy": "always"}
            })
        );
        let flags = ConfigFlags {
            ports: vec!["80:8080/tcp:http".into()],
            env: vec!["A=1".into(), "B=x=y".into()],
            metadata: vec!["team=web".into()],
            rm: true,
            entrypoint: Some("/bin/sh -c".into()),
            vm_cpus: Some(2),
            vm_memory: Some("1gb".into()),
            ..ConfigFlags::default()
        };
        let cmd = vec!["echo hi".to_owned()];
        let config = run_config("busybox", &cmd, &flags).unwrap();
        assert_eq!(
            serde_json::to_value(&config).unwrap(),
            json!({
                "image": "busybox",
                "auto_destroy": true,
                "env": {"A": "1", "B": "x=y"},
                "metadata": {"team": "web"},
                "guest": {"cpu_kind": "shared", "cpus": 2, "memory_mb": 1024},
                "init": {"entrypoint": ["/bin/sh", "-c"], "cmd": ["echo hi"]},
                "restart": {"policy": "no"},
                "services": [{"protocol": "tcp", "internal_port": 8080, "ports": [{"port": 80, "handlers": ["http"]}]}]
            })
        );
        let sized = ConfigFlags {
            vm_size: Some("performance-2x".into()),
            vm_memory: Some("8192".into()),
            restart: Some("on-fail".into()),
            ..ConfigFlags::default()
        };
        let config = run_config("busybox", &[], &sized).unwrap();
        assert_eq!(
            serde_json::to_value(&config.guest).unwrap(),
            json!({"cpu_kind": "performance", "cpus": 2, "memory_mb": 8192})
        );
        assert_eq!(config.restart.unwrap().policy, Some(RestartPolicy::OnFailure));
        assert_eq!(config.auto_destroy, None);
    }

    #[test]
    fn contradictions_and_unknown_sizes_are_refused() {
        let both = ConfigFlags {
            rm: true,
            restart: Some("always".into()),
            ..ConfigFlags::default()
        };
        assert!(
            run_config("x", &[], &both)
                .unwrap_err()
                .to_string()
                .contains("--rm")
        );
        let rm_no = ConfigFlags {
            rm: true,
            restart: Some("no".into()),
            ..ConfigFlags::default()
        };
        assert!(run_config("x", &[], &rm_no).is_ok());
        let size = ConfigFlags {
            vm_size: Some("huge".into()),
            ..ConfigFlags::default()
        };
        let e = run_config("x", &[], &size).unwrap_err();
        assert!(crate::errors::describe(&e).1.unwrap().contains("shared-cpu-1x"));
        let kind = ConfigFlags {
            vm_cpu_kind: Some("gpu".into()),
            ..ConfigFlags::default()
        };
        assert!(run_config("x", &[], &kind).is_err());
        let quotes = ConfigFlags {
            entrypoint: Some("sh -c 'oops".into()),
            ..ConfigFlags::default()
        };
        assert!(run_config("x", &[], &quotes).is_err());
    }

    #[test]
    fn volumes_are_mounted_by_id() {
        let config = run_config(
            "busybox",
            &[],
            &ConfigFlags {
                volumes: vec!["vol_4yx0jvqe1x1dj7gr:/data".into()],
                ..ConfigFlags::default()
            },
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&config.mounts).unwrap(),
            json!([{"volume": "vol_4yx0jvqe1x1dj7gr", "path": "/data"}])
        );
        for (bad, why) in [
            ("data:/data", "\"data\" names a volume"),
            ("vol_4yx0jvqe1x1dj7gr", "expected VOLUME_ID:/PATH"),
            (":/data", "no volume id"),
            ("vol_4yx0jvqe1x1dj7gr:data", "must be absolute"),
            ("vol_4yx0jvqe1x1dj7gr:/", "must be absolute and not /"),
            ("vol_4yx0jvqe1x1dj7gr:/data:size=3", "mount options"),
            ("VOL_X:/data", "is neither a volume id"),
        ] {
            let e = parse_volume(bad).unwrap_err();
            let (message, hint, code) = crate::errors::describe(&e);
            assert!(message.starts_with("invalid --volume"), "{bad}: {message}");
            assert!(message.contains(why), "{bad}: {message}");
            assert!(hint.unwrap().contains("aloft volumes list"), "{bad}");
            assert_eq!(code, 2);
        }
        let two = ConfigFlags {
            volumes: vec![
                "vol_4yx0jvqe1x1dj7gr:/data".into(),
                "vol_0000000000000000:/more".into(),
            ],
            ..ConfigFlags::default()
        };
        let e = run_config("busybox", &[], &two).unwrap_err();
        assert!(e.to_string().contains("at most one"), "{e}");
        // update: --volume replaces the mount; no flag keeps it.
        let mut config = config;
        apply(&mut config, &ConfigFlags::default(), &[]).unwrap();
        assert_eq!(config.mounts.len(), 1);
        apply(
            &mut config,
            &ConfigFlags {
                volumes: vec!["vol_0000000000000000:/srv".into()],
                ..ConfigFlags::default()
            },
            &[],
        )
        .unwrap();
        assert_eq!(config.mounts[0].volume.as_deref(), Some("vol_0000000000000000"));
        assert_eq!(config.mounts[0].path.as_deref(), Some("/srv"));
    }

    #[test]
    fn update_changes_only_what_the_flags_say() {
        let mut config = run_config(
            "busybox",
            &["sleep".into(), "inf".into()],
            &ConfigFlags {
                env: vec!["A=1".into()],
                ports: vec!["80:8080/tcp:http".into()],
                ..ConfigFlags::default()
            },
        )
        .unwrap();
        let before = config.clone();
        apply(&mut config, &ConfigFlags::default(), &[]).unwrap();
        assert_eq!(config, before);
        apply(
            &mut config,
            &ConfigFlags {
                env: vec!["A=2".into(), "B=3".into()],
                vm_memory: Some("512".into()),
                ..ConfigFlags::default()
            },
            &[],
        )
        .unwrap();
        assert_eq!(config.env["A"], "2");
        assert_eq!(config.env["B"], "3");
        assert_eq!(config.services, before.services);
        assert_eq!(config.init, before.init);
        let guest = config.guest.unwrap();
        assert_eq!((guest.cpus, guest.memory_mb), (Some(1), Some(512)));
    }
}
