//! Expansion: one `MachineConfig` per process group, as flyctl's `ToMachineConfig` builds it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use aloft_api::{
    DEFAULT_GPU_VM_SIZE, DEFAULT_VM_SIZE, DnsConfig, File, GuestPreset, MachineConfig, MachineGuest,
    MachineInit, MachineMetrics, MachineMount, MachinePort, MachineRestart, MachineService, RestartPolicy,
    StopConfig,
};

use crate::diag::{Diagnostic, Diagnostics, ExpandError, Origin};
use crate::schema::{AppConfig, Compute, FileSource, HttpService, Service};
use crate::validate::applies;

/// Metadata key: the platform version of machines managed by deploys.
pub const METADATA_PLATFORM_VERSION: &str = "fly_platform_version";
/// Metadata key: the machine's process group.
pub const METADATA_PROCESS_GROUP: &str = "fly_process_group";
/// The process group of release command machines.
pub const RELEASE_COMMAND_GROUP: &str = "fly_app_release_command";

/// What to do with `[[mounts]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MountPolicy {
    /// Refuse: for a caller that can't give machines volumes, a config with mounts is an error.
    #[default]
    Refuse,
    /// Describe the mounts (volume name as `name`, path, `initial_size` as `size_gb`, no volume
    /// id), as flyctl does before its deploy assigns volumes; aloftd's release job assigns each
    /// machine its volume.
    Describe,
}

/// Reads the `local_path` of `[[files]]` entries.
pub trait ReadFile {
    /// The content of `path` (as written in the config; relative to the config's directory).
    fn read(&self, path: &str) -> io::Result<Vec<u8>>;
}

/// Reads `[[files]]` from disk, relative to the config file's directory.
#[derive(Debug, Clone)]
pub struct DiskFiles {
    /// Directory relative paths start from.
    pub base: PathBuf,
}

impl DiskFiles {
    /// Files relative to the directory holding `config_path`.
    pub fn next_to(config_path: &Path) -> Self {
        Self {
            base: config_path.parent().map(Path::to_path_buf).unwrap_or_default(),
        }
    }
}

impl ReadFile for DiskFiles {
    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.base.join(path))
    }
}

/// Options of [`AppConfig::expand`].
#[derive(Clone, Copy)]
pub struct ExpandOptions<'a> {
    /// The image to run (`--image` or the build's result); `[build] image` when `None`.
    pub image: Option<&'a str>,
    /// What to do with `[[mounts]]`.
    pub mounts: MountPolicy,
    /// Where `[[files]] local_path` content comes from.
    pub files: &'a dyn ReadFile,
}

impl std::fmt::Debug for ExpandOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpandOptions")
            .field("image", &self.image)
            .field("mounts", &self.mounts)
            .finish_non_exhaustive()
    }
}

/// The machine config of one process group.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessGroupConfig {
    /// Group name.
    pub group: String,
    /// What every machine of the group runs.
    pub config: MachineConfig,
}

impl AppConfig {
    /// One machine config per process group, in group-name order.
    pub fn expand(&self, opts: &ExpandOptions<'_>) -> Result<Vec<ProcessGroupConfig>, ExpandError> {
        let mut errors = Vec::new();
        let mut out = Vec::new();
        for group in self.process_groups() {
            let config = self.expand_group(&group, opts, &mut errors);
            out.push(ProcessGroupConfig { group, config });
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            errors.sort_by_key(|d: &Diagnostic| (d.origin.line, d.origin.column));
            errors.dedup();
            Err(ExpandError::Invalid(Diagnostics {
                path: self.path.clone(),
                items: errors,
            }))
        }
    }

    fn expand_group(
        &self,
        group: &str,
        opts: &ExpandOptions<'_>,
        errors: &mut Vec<Diagnostic>,
    ) -> MachineConfig {
        let default = self.default_group();
        let matches = |processes: &[String]| applies(processes, group, &default);
        let mut mc = MachineConfig {
            image: opts
                .image
                .map(str::to_owned)
                .or_else(|| self.build.as_ref().and_then(|b| b.image.clone())),
            ..MachineConfig::default()
        };

        // Init: the group's command, else [experimental] cmd; entrypoint and exec from
        // [experimental]; swap.
        let mut init = MachineInit {
            swap_size_mb: self.swap_size_mb,
            ..MachineInit::default()
        };
        if let Some(cmd) = self.processes.get(group).filter(|c| !c.trim().is_empty()) {
            // Validated at load time; a command that doesn't split was reported there.
            init.cmd = shlex::split(cmd).unwrap_or_default();
        }
        if let Some(e) = &self.experimental {
            if init.cmd.is_empty() {
                init.cmd.clone_from(&e.cmd);
            }
            init.entrypoint.clone_from(&e.entrypoint);
            init.exec.clone_from(&e.exec);
        }
        if init != MachineInit::default() {
            mc.init = Some(init);
        }

        mc.metadata = BTreeMap::from([
            (METADATA_PLATFORM_VERSION.to_owned(), "v2".to_owned()),
            (METADATA_PROCESS_GROUP.to_owned(), group.to_owned()),
        ]);

        // Services: [http_service] first, then [[services]].
        if let Some(h) = self.http_service.as_ref().filter(|h| matches(&h.processes)) {
            mc.services.push(http_service(h));
        }
        for s in self.services.iter().filter(|s| matches(&s.processes)) {
            mc.services.push(service(s));
        }

        // Top-level checks; a check without a port takes the http_service's.
        let http_port = self
            .http_service
            .as_ref()
            .filter(|h| matches(&h.processes))
            .map(|h| h.internal_port);
        for (name, c) in self.checks.iter().filter(|(_, c)| matches(&c.processes)) {
            let mut check = c.check.clone();
            if check.port.is_none() {
                match http_port {
                    Some(port) => check.port = Some(port),
                    None => errors.push(Diagnostic {
                        origin: c.origin.clone(),
                        message: format!("check {name:?} has no `port` and process group {group:?} has no [http_service] to take it from; set `port`"),
                    }),
                }
            }
            mc.checks.insert(name.clone(), check);
        }

        // Env: [env], then the group and primary region.
        mc.env.clone_from(&self.env);
        mc.env.insert("FLY_PROCESS_GROUP".to_owned(), group.to_owned());
        if let Some(region) = &self.primary_region {
            mc.env.insert("PRIMARY_REGION".to_owned(), region.clone());
        }

        mc.statics.clone_from(&self.statics);

        for m in self.mounts.iter().filter(|m| matches(&m.processes)) {
            match opts.mounts {
                MountPolicy::Refuse => errors.push(Diagnostic {
                    origin: m.origin.clone(),
                    message: format!(
                        "mounts are not accepted here, so volume {:?} can't be mounted at {:?}; remove this mount to go on without it (files written there will not survive a restart)",
                        m.source, m.destination
                    ),
                }),
                MountPolicy::Describe => mc.mounts.push(MachineMount {
                    name: Some(m.source.clone()),
                    path: Some(m.destination.clone()),
                    size_gb: m
                        .initial_size_gb
                        .and_then(|g| u32::try_from(g).ok()),
                    extend_threshold_percent: m.auto_extend_size_threshold,
                    add_size_gb: m
                        .auto_extend_size_increment_gb
                        .and_then(|g| u32::try_from(g).ok()),
                    size_gb_limit: m
                        .auto_extend_size_limit_gb
                        .and_then(|g| u32::try_from(g).ok()),
                    ..MachineMount::default()
                }),
            }
        }

        if self.kill_signal.is_some() || self.kill_timeout.is_some() {
            mc.stop_config = Some(StopConfig {
                signal: self.kill_signal,
                timeout: self.kill_timeout,
            });
        }

        for f in self.files.iter().filter(|f| matches(&f.processes)) {
            let mut file = File {
                guest_path: Some(f.guest_path.clone()),
                mode: f.mode,
                ..File::default()
            };
            match &f.source {
                FileSource::RawValue(v) => file.raw_value = Some(BASE64.encode(v.as_bytes())),
                FileSource::SecretName(s) => file.secret_name = Some(s.clone()),
                FileSource::LocalPath(p) => match opts.files.read(p) {
                    Ok(bytes) => file.raw_value = Some(BASE64.encode(&bytes)),
                    Err(e) => errors.push(Diagnostic {
                        origin: Origin {
                            key: format!("{}.local_path", f.origin.key),
                            ..f.origin.clone()
                        },
                        message: format!(
                            "can't read local_path {p:?}: {e}; paths are relative to the config file"
                        ),
                    }),
                },
            }
            mc.files.push(file);
        }

        // Metrics: the first matching section.
        if let Some(m) = self.metrics.iter().find(|m| matches(&m.processes)) {
            mc.metrics = Some(MachineMetrics {
                port: m.port,
                path: m.path.clone(),
                https: m.https,
            });
        }

        // Guest: the most specific [[vm]] (one naming the group beats one naming none).
        if let Some(vm) = most_specific(&self.vm, group, |v| &v.processes) {
            match self.guest(vm) {
                Ok(g) => mc.guest = Some(g),
                Err(message) => errors.push(Diagnostic {
                    origin: vm.origin.clone(),
                    message,
                }),
            }
        }

        // Restart: the most specific [[restart]], like [[vm]].
        if let Some(r) = most_specific(&self.restart, group, |r| &r.processes) {
            mc.restart = Some(MachineRestart {
                policy: Some(r.policy),
                max_retries: r.retries,
                gpu_bid_price: None,
            });
        }
        mc
    }

    /// The guest of a `[[vm]]`: the preset (`size`, or the default), then `memory`, then the
    /// explicit fields, each overriding the previous.
    pub fn guest(&self, vm: &Compute) -> Result<MachineGuest, String> {
        let size = vm.size.as_deref().unwrap_or(if vm.gpu_kind.is_some() {
            DEFAULT_GPU_VM_SIZE
        } else {
            DEFAULT_VM_SIZE
        });
        let preset = GuestPreset::find(size).ok_or_else(|| format!("unknown VM size {size:?}"))?;
        let mut g = preset.to_guest();
        if let Some(id) = &self.host_dedication_id {
            g.host_dedication_id = Some(id.clone());
        }
        if let Some(mb) = vm.memory {
            g.memory_mb = Some(mb);
        }
        macro_rules! over {
            ($($field:ident),*) => {$(
                if let Some(v) = &vm.$field {
                    g.$field = Some(v.clone());
                }
            )*};
        }
        over!(
            memory_mb,
            cpus,
            cpu_kind,
            gpus,
            gpu_kind,
            host_dedication_id,
            persist_rootfs,
            max_memory_mb
        );
        if !vm.kernel_args.is_empty() {
            g.kernel_args.clone_from(&vm.kernel_args);
        }
        g.check().map_err(|e| e.to_string())?;
        Ok(g)
    }

    /// The config of the ephemeral machine that runs `[deploy] release_command`, or `None`
    /// without one: the command replaces CMD, no services, no volumes, no restart, destroyed
    /// when done, env `RELEASE_COMMAND=1`.
    pub fn release_command_config(&self, image: Option<&str>) -> Option<MachineConfig> {
        let command = self.deploy.as_ref()?.release_command.as_deref()?;
        let mut env = self.env.clone();
        env.insert("RELEASE_COMMAND".to_owned(), "1".to_owned());
        env.insert("FLY_PROCESS_GROUP".to_owned(), RELEASE_COMMAND_GROUP.to_owned());
        if let Some(region) = &self.primary_region {
            env.insert("PRIMARY_REGION".to_owned(), region.clone());
        }
        let guest = self
            .deploy
            .as_ref()
            .and_then(|d| d.release_command_vm.as_ref())
            .and_then(|vm| self.guest(vm).ok());
        Some(MachineConfig {
            image: image
                .map(str::to_owned)
                .or_else(|| self.build.as_ref().and_then(|b| b.image.clone())),
            init: Some(MachineInit {
                cmd: shlex::split(command).unwrap_or_default(),
                entrypoint: self
                    .experimental
                    .as_ref()
                    .map(|e| e.entrypoint.clone())
                    .unwrap_or_default(),
                swap_size_mb: self.swap_size_mb,
                ..MachineInit::default()
            }),
            restart: Some(MachineRestart {
                policy: Some(RestartPolicy::No),
                ..MachineRestart::default()
            }),
            auto_destroy: Some(true),
            dns: Some(DnsConfig {
                skip_registration: Some(true),
                ..DnsConfig::default()
            }),
            metadata: BTreeMap::from([
                (METADATA_PLATFORM_VERSION.to_owned(), "v2".to_owned()),
                (
                    METADATA_PROCESS_GROUP.to_owned(),
                    RELEASE_COMMAND_GROUP.to_owned(),
                ),
            ]),
            env,
            guest,
            stop_config: (self.kill_signal.is_some() || self.kill_timeout.is_some()).then_some(StopConfig {
                signal: self.kill_signal,
                timeout: self.kill_timeout,
            }),
            ..MachineConfig::default()
        })
    }
}

/// The last section naming `group` in its `processes`, else the last naming no group.
fn most_specific<'a, T>(items: &'a [T], group: &str, processes: impl Fn(&T) -> &[String]) -> Option<&'a T> {
    items
        .iter()
        .rfind(|x| processes(x).iter().any(|p| p == group))
        .or_else(|| items.iter().rfind(|x| processes(x).is_empty()))
}

/// `[http_service]` → one tcp service with port 80 (http, force_https) and 443 (http + tls).
fn http_service(h: &HttpService) -> MachineService {
    MachineService {
        protocol: Some("tcp".to_owned()),
        internal_port: Some(h.internal_port),
        autostop: h.auto_stop_machines,
        autostart: h.auto_start_machines,
        min_machines_running: h.min_machines_running,
        concurrency: h.concurrency.clone(),
        checks: h.checks.clone(),
        ports: vec![
            MachinePort {
                port: Some(80),
                handlers: vec!["http".to_owned()],
                force_https: h.force_https,
                http_options: h.http_options.clone(),
                ..MachinePort::default()
            },
            MachinePort {
                port: Some(443),
                handlers: vec!["http".to_owned(), "tls".to_owned()],
                http_options: h.http_options.clone(),
                tls_options: h.tls_options.clone(),
                ..MachinePort::default()
            },
        ],
        ..MachineService::default()
    }
}

fn service(s: &Service) -> MachineService {
    MachineService {
        protocol: Some(s.protocol.clone()),
        internal_port: Some(s.internal_port),
        autostop: s.auto_stop_machines,
        autostart: s.auto_start_machines,
        min_machines_running: s.min_machines_running,
        concurrency: s.concurrency.clone(),
        ports: s.ports.clone(),
        checks: s.tcp_checks.iter().chain(&s.http_checks).cloned().collect(),
        ..MachineService::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoFiles;

    impl ReadFile for NoFiles {
        fn read(&self, path: &str) -> io::Result<Vec<u8>> {
            Err(io::Error::new(io::ErrorKind::NotFound, path.to_owned()))
        }
    }

    fn groups(text: &str) -> BTreeMap<String, MachineConfig> {
        let loaded = crate::parse(text, Path::new("t.toml")).unwrap();
        let opts = ExpandOptions {
            image: Some("img"),
            mounts: MountPolicy::Refuse,
            files: &NoFiles,
        };
        loaded
            .config
            .expand(&opts)
            .unwrap()
            .into_iter()
            .map(|g| (g.group, g.config))
            .collect()
    }

    const TWO_GROUPS: &str = r#"
        app = "demo"
        [processes]
        web = "bin/web --port 8080"
        worker = "bin/worker"
        [http_service]
        internal_port = 8080
        processes = ["web"]
        [checks.alive]
        type = "http"
        path = "/health"
        processes = ["web"]
        [[vm]]
        size = "shared-cpu-2x"
        [[vm]]
        memory = "2gb"
        cpu_kind = "performance"
        cpus = 1
        processes = ["worker"]
        [[restart]]
        policy = "always"
        [[restart]]
        policy = "never"
        processes = ["worker"]
        [[metrics]]
        port = 9091
        [[statics]]
        guest_path = "/app/public"
        url_prefix = "/"
        [[files]]
        guest_path = "/etc/motd"
        raw_value = "hello"
        processes = ["worker"]
    "#;

    #[test]
    fn sections_go_to_the_groups_they_name() {
        let g = groups(TWO_GROUPS);
        let (web, worker) = (&g["web"], &g["worker"]);
        assert_eq!(web.init.as_ref().unwrap().cmd, ["bin/web", "--port", "8080"]);
        assert_eq!(worker.init.as_ref().unwrap().cmd, ["bin/worker"]);
        assert_eq!(web.services.len(), 1);
        assert!(worker.services.is_empty());
        // A check without a port takes the group's http_service port.
        assert_eq!(web.checks["alive"].port, Some(8080));
        assert!(worker.checks.is_empty());
        // [[vm]] and [[restart]] without processes apply to groups no other section names.
        let wg = web.guest.as_ref().unwrap();
        assert_eq!((wg.cpus, wg.memory_mb), (Some(2), Some(512)));
        let kg = worker.guest.as_ref().unwrap();
        assert_eq!(
            (kg.cpu_kind.as_deref(), kg.cpus, kg.memory_mb),
            (Some("performance"), Some(1), Some(2048))
        );
        assert_eq!(web.restart.as_ref().unwrap().policy, Some(RestartPolicy::Always));
        assert_eq!(worker.restart.as_ref().unwrap().policy, Some(RestartPolicy::No));
        // [[metrics]] without processes: the default group only ("web": no "app" group, first name).
        assert_eq!(web.metrics.as_ref().unwrap().port, Some(9091));
        assert!(worker.metrics.is_none());
        // [[statics]] everywhere; [[files]] where named, content base64.
        assert_eq!(web.statics.len(), 1);
        assert_eq!(worker.statics.len(), 1);
        assert!(web.files.is_empty());
        assert_eq!(worker.files[0].raw_value.as_deref(), Some("aGVsbG8="));
        assert_eq!(web.image.as_deref(), Some("img"));
    }

    #[test]
    fn experimental_commands_and_defaults() {
        let g = groups(
            "[experimental]\ncmd = \"bundle exec puma -C 'config/puma.rb'\"\nentrypoint = [\"/tini\", \"--\"]\n",
        );
        let init = g["app"].init.clone().unwrap();
        assert_eq!(init.cmd, ["bundle", "exec", "puma", "-C", "config/puma.rb"]);
        assert_eq!(init.entrypoint, ["/tini", "--"]);
        assert!(g["app"].guest.is_none(), "no [[vm]]: the server's default size");
        assert!(g["app"].stop_config.is_none());
    }

    #[test]
    fn gpu_kind_alone_picks_the_gpu_default_size() {
        let g = groups("[[vm]]\ngpu_kind = \"a10\"\n");
        let guest = g["app"].guest.clone().unwrap();
        assert_eq!(guest.cpu_kind.as_deref(), Some("performance"));
        assert_eq!(guest.cpus, Some(8));
        assert_eq!(guest.gpu_kind.as_deref(), Some("a10"));
    }

    #[test]
    fn https_checks_reach_the_machine_config_from_every_place_a_check_is_written() {
        let text = r#"
            app = "demo"
            [http_service]
            internal_port = 8443
            [[http_service.checks]]
            protocol = "https"
            tls_skip_verify = true
            tls_server_name = "web.example.com"
            [[services]]
            internal_port = 9443
            [[services.ports]]
            port = 9443
            [[services.http_checks]]
            protocol = "HTTPS"
            tls_server_name = "svc.example.com"
            [checks.alive]
            type = "http"
            port = 7443
            protocol = "https"
            tls_skip_verify = false
            tls_server_name = "top.example.com"
        "#;
        let loaded = crate::parse(text, Path::new("t.toml")).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let g = groups(text);
        let mc = &g["app"];
        let web = &mc.services[0].checks[0];
        assert_eq!(
            (
                web.protocol.as_deref(),
                web.tls_skip_verify,
                web.tls_server_name.as_deref()
            ),
            (Some("https"), Some(true), Some("web.example.com"))
        );
        let svc = &mc.services[1].checks[0];
        assert_eq!(
            (
                svc.protocol.as_deref(),
                svc.tls_skip_verify,
                svc.tls_server_name.as_deref()
            ),
            (Some("HTTPS"), None, Some("svc.example.com"))
        );
        let top = &mc.checks["alive"];
        assert_eq!(
            (
                top.protocol.as_deref(),
                top.tls_skip_verify,
                top.tls_server_name.as_deref()
            ),
            (Some("https"), Some(false), Some("top.example.com"))
        );
        // And they resolve into https probes on both sides that run checks.
        let tls: Vec<Option<aloft_api::checks::Tls>> = aloft_api::checks::specs(mc)
            .into_iter()
            .map(|c| match c.probe {
                aloft_api::checks::Probe::Http { tls, .. } => tls,
                other => panic!("{other:?}"),
            })
            .collect();
        let t = |skip_verify, name: &str| {
            Some(aloft_api::checks::Tls {
                skip_verify,
                server_name: Some(name.to_owned()),
            })
        };
        assert_eq!(
            tls,
            [
                t(false, "top.example.com"),
                t(true, "web.example.com"),
                t(false, "svc.example.com")
            ]
        );
    }

    #[test]
    fn https_settings_that_keep_a_check_critical_are_warned_about() {
        let text = r#"
            app = "demo"
            [[services]]
            internal_port = 9443
            [[services.ports]]
            port = 9443
            [[services.http_checks]]
            protocol = "h2"
            [[services.tcp_checks]]
            protocol = "tcp"
            [checks.alive]
            type = "http"
            port = 7443
            protocol = "https"
            tls_server_name = "10.0.0.1"
        "#;
        let loaded = crate::parse(text, Path::new("t.toml")).unwrap();
        let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings.iter().any(|w| w.contains("checks.alive.tls_server_name")
                && w.contains("is an IP address")
                && w.contains("critical")),
            "{warnings:?}"
        );
        assert!(
            warnings.iter().any(|w| w.contains("unknown protocol \"h2\"")),
            "{warnings:?}"
        );
    }
}
