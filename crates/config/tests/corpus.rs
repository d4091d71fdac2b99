//! The real-world corpus: 40 fly.toml files from public repositories (`corpus/INDEX.tsv` says
//! where each came from and what it exercises). Every file must parse and expand, except where
//! flyctl itself rejects it, and there with a message that names the line and key.
//!
//! Each file's expansion (mounts described, `[[files]]` content replaced by a placeholder) and its
//! warnings are snapshotted in `corpus-expanded/NAME.json`; `ALOFT_BLESS=1` rewrites the snapshots
//! after a deliberate change. The tests below that spell values out document the semantics.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use aloft_api::{Autostop, Duration, MachineConfig, RestartPolicy, StopSignal};
    use aloft_config::{ExpandOptions, Loaded, MountPolicy, ProcessGroupConfig, ReadFile};
    use serde_json::{Value, json};

    /// Files flyctl rejects, with what aloft says about them.
    const FLYCTL_REJECTS: &[(&str, &str)] = &[(
        // flyctl: "Unknown type for service concurrency: []map[string]interface {}"
        "20-00-ld-homework-system.toml",
        "20-00-ld-homework-system.toml:27:3: services[0].concurrency: expected a single table, found an array of tables; write [services.concurrency] instead of [[services.concurrency]]",
    )];

    struct Placeholder;

    impl ReadFile for Placeholder {
        fn read(&self, path: &str) -> std::io::Result<Vec<u8>> {
            Ok(format!("content of {path}").into_bytes())
        }
    }

    fn dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
    }

    /// The corpus files listed in INDEX.tsv.
    fn index() -> Vec<String> {
        let text = std::fs::read_to_string(dir().join("INDEX.tsv")).unwrap();
        text.lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split('\t').next().unwrap().to_owned())
            .collect()
    }

    fn load(name: &str) -> Loaded {
        aloft_config::load(&dir().join(name)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn expand(loaded: &Loaded, mounts: MountPolicy) -> Result<Vec<ProcessGroupConfig>, String> {
        let opts = ExpandOptions {
            image: None,
            mounts,
            files: &Placeholder,
        };
        loaded.config.expand(&opts).map_err(|e| e.to_string())
    }

    /// The machine config of `group` in corpus file `name`, mounts described.
    fn machine(name: &str, group: &str) -> MachineConfig {
        let groups = expand(&load(name), MountPolicy::Describe).unwrap();
        groups
            .into_iter()
            .find(|g| g.group == group)
            .unwrap_or_else(|| panic!("{name} has no group {group}"))
            .config
    }

    fn strip_dir(text: &str) -> String {
        text.replace(&format!("{}/", dir().display()), "")
    }

    #[test]
    fn every_corpus_file_parses_and_expands_unless_flyctl_rejects_it() {
        let names = index();
        assert_eq!(names.len(), 40, "INDEX.tsv lists 40 files");
        let bless = std::env::var_os("ALOFT_BLESS").is_some();
        let snapshots = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus-expanded");
        let mut failures = Vec::new();
        for name in &names {
            let path = dir().join(name);
            assert!(path.is_file(), "{name} is listed but missing");
            if let Some((_, expected)) = FLYCTL_REJECTS.iter().find(|(n, _)| n == name) {
                match aloft_config::load(&path) {
                    Ok(_) => failures.push(format!("{name}: accepted, but flyctl rejects it")),
                    Err(e) => {
                        let actual = strip_dir(&e.to_string());
                        if actual != *expected {
                            failures.push(format!("{name}: expected {expected}\n  actual {actual}"));
                        }
                    }
                }
                continue;
            }
            let loaded = match aloft_config::load(&path) {
                Ok(l) => l,
                Err(e) => {
                    failures.push(strip_dir(&e.to_string()));
                    continue;
                }
            };
            let described = match expand(&loaded, MountPolicy::Describe) {
                Ok(g) => g,
                Err(e) => {
                    failures.push(strip_dir(&e));
                    continue;
                }
            };
            // Under the refusing policy, a file with mounts is refused, naming each mount's line.
            match (
                expand(&loaded, MountPolicy::Refuse),
                loaded.config.mounts.is_empty(),
            ) {
                (Ok(_), true) => {}
                (Err(e), false) => {
                    for line in e.lines() {
                        if !line.contains("mounts are not accepted here") {
                            failures.push(format!("{name}: unexpected expansion error {line}"));
                        }
                    }
                }
                (Ok(_), false) => failures.push(format!("{name}: mounts were not refused")),
                (Err(e), true) => failures.push(strip_dir(&e)),
            }
            let snapshot = json!({
                "warnings": loaded.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "groups": described
                    .iter()
                    .map(|g| (g.group.clone(), serde_json::to_value(&g.config).unwrap()))
                    .collect::<serde_json::Map<String, Value>>(),
            });
            let snapshot_path = snapshots.join(name).with_extension("json");
            let text = serde_json::to_string_pretty(&snapshot).unwrap() + "\n";
            if bless {
                std::fs::create_dir_all(&snapshots).unwrap();
                std::fs::write(&snapshot_path, text).unwrap();
            } else if std::fs::read_to_string(&snapshot_path).ok().as_deref() != Some(&text) {
                failures.push(format!(
                    "{name}: expansion differs from {} (ALOFT_BLESS=1 to update after review):\n{text}",
                    snapshot_path.display()
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn services_with_tcp_checks_and_kill_settings() {
        // 01: [[services]] with concurrency and a tcp check; kill_signal/kill_timeout → stop_config.
        let m = machine("01-fly-apps-live_beats.toml", "app");
        let s = &m.services[0];
        assert_eq!(s.protocol.as_deref(), Some("tcp"));
        assert_eq!(s.internal_port, Some(4000));
        assert_eq!(s.ports.len(), 2);
        assert_eq!(s.ports[1].handlers, ["tls", "http"]);
        let c = s.concurrency.as_ref().unwrap();
        assert_eq!((c.soft_limit, c.hard_limit), (Some(2000), Some(2500)));
        assert_eq!(s.checks[0].r#type.as_deref(), Some("tcp"));
        assert_eq!(s.checks[0].grace_period, Some(Duration::from_secs(20)));
        let stop = m.stop_config.unwrap();
        assert_eq!(stop.signal, Some(StopSignal::SIGTERM));
        assert_eq!(stop.timeout, Some(Duration::from_secs(5)));
        assert_eq!(m.env["PRIMARY_REGION"], "iad");
        assert_eq!(m.env["FLY_PROCESS_GROUP"], "app");
        assert_eq!(m.metadata["fly_platform_version"], "v2");
        assert_eq!(m.metadata["fly_process_group"], "app");
    }

    #[test]
    fn http_service_expands_to_ports_80_and_443() {
        // 33: [http_service] with the `fly launch` defaults; [[vm]] with memory and memory_mb.
        let m = machine("33-fly-apps-hello-fly.toml", "app");
        let s = &m.services[0];
        assert_eq!(s.internal_port, Some(8080));
        assert_eq!(s.autostop, Some(Autostop::Stop));
        assert_eq!(s.autostart, Some(true));
        assert_eq!(s.min_machines_running, Some(0));
        assert_eq!(s.ports[0].port, Some(80));
        assert_eq!(s.ports[0].handlers, ["http"]);
        assert_eq!(s.ports[0].force_https, Some(true));
        assert_eq!(s.ports[1].port, Some(443));
        assert_eq!(s.ports[1].handlers, ["http", "tls"]);
        let g = m.guest.unwrap();
        assert_eq!(
            (g.cpu_kind.as_deref(), g.cpus, g.memory_mb),
            (Some("shared"), Some(1), Some(1024))
        );
    }

    #[test]
    fn autostop_spellings() {
        let autostop = |name| machine(name, "app").services[0].autostop;
        assert_eq!(
            autostop("10-fly-apps-ollama-open-webui.toml"),
            Some(Autostop::Stop)
        ); // true
        assert_eq!(
            autostop("14-openstatusHQ-openstatus.toml"),
            Some(Autostop::Suspend)
        );
        assert_eq!(autostop("26-rubys-showcase.toml"), Some(Autostop::Off)); // false
        assert_eq!(autostop("40-0x2E-fusion.toml"), Some(Autostop::Off)); // "off"
        assert_eq!(autostop("33-fly-apps-hello-fly.toml"), Some(Autostop::Stop)); // "stop"
    }

    #[test]
    fn process_groups_filter_services_and_commands() {
        // 29: two groups; the service names only `app`.
        let app = machine("29-kmcphillips-twilio-rails-example.toml", "app");
        let sidekiq = machine("29-kmcphillips-twilio-rails-example.toml", "sidekiq");
        assert_eq!(app.init.unwrap().cmd, ["bin/rails", "fly:server"]);
        assert_eq!(sidekiq.init.unwrap().cmd, ["bin/rails", "fly:sidekiq"]);
        assert_eq!(app.services.len(), 1);
        assert!(sidekiq.services.is_empty());
        assert_eq!(sidekiq.env["FLY_PROCESS_GROUP"], "sidekiq");
        // 30: no `app` group; [[vm]] names both groups; http_service only `server`.
        let loaded = load("30-yjl9903-AnimeGarden.toml");
        assert_eq!(loaded.config.process_groups(), ["cron", "server"]);
        let server = machine("30-yjl9903-AnimeGarden.toml", "server");
        let cron = machine("30-yjl9903-AnimeGarden.toml", "cron");
        assert_eq!(server.services[0].min_machines_running, Some(3));
        assert!(cron.services.is_empty());
        assert_eq!(cron.guest.unwrap().memory_mb, Some(512));
    }

    #[test]
    fn vm_sizes_and_gpus() {
        // 16: root dotted key vm.size = "a100-40gb".
        let g = machine("16-fly-apps-python_gpu_example.toml", "app")
            .guest
            .unwrap();
        assert_eq!(g.gpu_kind.as_deref(), Some("a100-pcie-40gb"));
        assert_eq!((g.cpus, g.memory_mb, g.gpus), (Some(8), Some(32768), Some(1)));
        // 10: size performance-8x, memory "16gb", gpu_kind l40s.
        let g = machine("10-fly-apps-ollama-open-webui.toml", "app")
            .guest
            .unwrap();
        assert_eq!(g.cpu_kind.as_deref(), Some("performance"));
        assert_eq!((g.cpus, g.memory_mb), (Some(8), Some(16384)));
        assert_eq!(g.gpu_kind.as_deref(), Some("l40s"));
        // 38: kernel_args across lines with a trailing comma.
        let g = machine("38-mythal-boluo.toml", "app").guest.unwrap();
        assert_eq!(g.kernel_args.len(), 6);
        assert_eq!(g.kernel_args[0], "sysctl.net.core.somaxconn=65535");
    }

    #[test]
    fn numbers_and_durations_in_every_spelling() {
        // 23: port "443" as a string; check intervals as millisecond integers.
        let s = &machine("23-fly-apps-grpc-service.toml", "app").services[0];
        assert_eq!(s.ports[0].port, Some(443));
        assert_eq!(s.checks[0].interval, Some(Duration::from_secs(10)));
        // 37: internal_port = 3_000.
        let s = &machine("37-mythal-boluo.toml", "app").services[0];
        assert_eq!(s.internal_port, Some(3000));
        // 19: kill_timeout = 120 (seconds) and a top-level https check.
        let m = machine("19-fly-apps-cockroachdb.toml", "app");
        assert_eq!(m.stop_config.unwrap().timeout, Some(Duration::from_secs(120)));
        let check = &m.checks["crdb_live"];
        assert_eq!(check.protocol.as_deref(), Some("https"));
        assert_eq!(check.tls_skip_verify, Some(true));
        assert_eq!(check.grace_period, Some(Duration::from_secs(60)));
        // 11: env values that are booleans become strings.
        let m = machine("11-fly-apps-elixir_prom_ex_example.toml", "app");
        assert_eq!(m.env["GF_USERS_ALLOW_SIGN_UP"], "false");
        assert_eq!(m.image.as_deref(), Some("grafana/grafana:8.0.2"));
    }

    #[test]
    fn restart_metrics_files_statics_and_experimental() {
        // 15: [[restart]] always, [[metrics]] array, [experimental] cmd, three services.
        let m = machine("15-unkeyed-unkey.toml", "app");
        assert_eq!(m.restart.unwrap().policy, Some(RestartPolicy::Always));
        assert_eq!(m.metrics.unwrap().port, Some(2112));
        assert_eq!(m.services.len(), 3);
        assert_eq!(
            m.services[0].ports[0]
                .http_options
                .as_ref()
                .and_then(|o| o.response.as_ref())
                .and_then(|r| r.pristine),
            Some(true)
        );
        // 31: [[restart]] on-failure with retries.
        let r = machine("31-Accurate0-maccas-api.toml", "app").restart.unwrap();
        assert_eq!(
            (r.policy, r.max_retries),
            (Some(RestartPolicy::OnFailure), Some(10))
        );
        // 17: [[files]] local_path → base64 content; experimental entrypoint string.
        let m = machine("17-fly-apps-vllm-demo.toml", "app");
        assert_eq!(m.files[0].guest_path.as_deref(), Some("/start.sh"));
        assert!(m.files[0].raw_value.is_some());
        assert_eq!(m.init.unwrap().entrypoint, ["/start.sh"]);
        // 07: five statics, swap.
        let m = machine("07-kentcdodds-kentcdodds.com.toml", "app");
        assert_eq!(m.statics.len(), 5);
        assert_eq!(m.init.unwrap().swap_size_mb, Some(512));
    }

    #[test]
    fn udp_and_tls_options() {
        // 35: a udp and a tcp service on the same internal port.
        let m = machine("35-fly-apps-udp-echo-.toml", "app");
        let protocols: Vec<_> = m
            .services
            .iter()
            .map(|s| s.protocol.as_deref().unwrap())
            .collect();
        assert_eq!(protocols, ["udp", "tcp"]);
        // 38: tls alpn and h2_backend carried on the http_service ports.
        let m = machine("38-mythal-boluo.toml", "app");
        let p443 = &m.services[0].ports[1];
        assert_eq!(p443.tls_options.as_ref().unwrap().alpn, ["h2", "http/1.1"]);
        assert_eq!(p443.http_options.as_ref().unwrap().h2_backend, Some(true));
    }

    #[test]
    fn mounts_are_described_or_refused() {
        // 26: auto-extend settings.
        let loaded = load("26-rubys-showcase.toml");
        let m = &expand(&loaded, MountPolicy::Describe).unwrap()[0].config.mounts[0];
        assert_eq!(m.name.as_deref(), Some("smooth_volume"));
        assert_eq!(m.path.as_deref(), Some("/data"));
        assert_eq!(
            (m.extend_threshold_percent, m.add_size_gb, m.size_gb_limit),
            (Some(80), Some(1), Some(100))
        );
        let refused = strip_dir(&expand(&loaded, MountPolicy::Refuse).unwrap_err());
        assert_eq!(
            refused,
            "26-rubys-showcase.toml:11:1: mounts[0]: mounts are not accepted here, so volume \"smooth_volume\" can't be mounted at \"/data\"; remove this mount to go on without it (files written there will not survive a restart)"
        );
        // 11: the legacy singular [mount].
        assert_eq!(
            load("11-fly-apps-elixir_prom_ex_example.toml").config.mounts[0].source,
            "grafana_storage"
        );
    }

    #[test]
    fn unknown_and_legacy_keys_are_warnings() {
        let loaded = load("39-Camier-searxng-convivial-instance.toml");
        let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
        assert!(
            warnings.contains(&"47:3: redis: unknown key, ignored".to_owned()),
            "{warnings:?}"
        );
        assert!(
            warnings.contains(&"51:2: scale: unknown key, ignored".to_owned()),
            "{warnings:?}"
        );
    }

    #[test]
    fn release_command_machine() {
        let loaded = load("08-supabase-realtime.toml");
        let m = loaded.config.release_command_config(Some("img")).unwrap();
        assert_eq!(m.env["RELEASE_COMMAND"], "1");
        assert_eq!(m.metadata["fly_process_group"], "fly_app_release_command");
        assert_eq!(m.auto_destroy, Some(true));
        assert_eq!(m.restart.unwrap().policy, Some(RestartPolicy::No));
        assert!(m.services.is_empty());
        assert!(!m.init.unwrap().cmd.is_empty());
    }
}

#[cfg(test)]
mod round_trip {
    use std::path::Path;

    /// `config show` output is itself a valid config that means the same thing.
    #[test]
    fn normalised_toml_parses_back_to_the_same_config() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let Ok(first) = aloft_config::load(&path) else {
                continue;
            };
            let text = first.config.to_toml().unwrap();
            let second = aloft_config::parse(&text, Path::new("shown.toml"))
                .unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()));
            assert!(
                second.warnings.is_empty(),
                "{}: {:?}\n{text}",
                path.display(),
                second.warnings
            );
            assert_eq!(
                serde_json::to_value(&first.config).unwrap(),
                serde_json::to_value(&second.config).unwrap(),
                "{}\n{text}",
                path.display()
            );
            checked += 1;
        }
        assert_eq!(checked, 39);
    }
}

#[cfg(test)]
mod robustness {
    use std::path::Path;

    use proptest::prelude::*;

    fn corpus() -> Vec<String> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
        let mut texts: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        texts.sort();
        texts
    }

    fn expand_all(text: &str) {
        struct NoFiles;
        impl aloft_config::ReadFile for NoFiles {
            fn read(&self, _: &str) -> std::io::Result<Vec<u8>> {
                Err(std::io::ErrorKind::NotFound.into())
            }
        }
        if let Ok(loaded) = aloft_config::parse(text, Path::new("fuzz.toml")) {
            let opts = aloft_config::ExpandOptions {
                image: None,
                mounts: aloft_config::MountPolicy::Describe,
                files: &NoFiles,
            };
            let _ = loaded.config.expand(&opts);
            let _ = loaded.config.to_toml();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Bad input gets an error, never a panic: corpus files with a span of bytes replaced.
        #[test]
        fn mangled_corpus_files_never_panic(
            file in 0usize..39,
            at in 0usize..4096,
            len in 0usize..16,
            junk in "[\\[\\]=\"'{},.0-9a-z_ \\n#-]{0,12}",
        ) {
            let texts = corpus();
            let text = &texts[file % texts.len()];
            let mut start = at.min(text.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let mut end = (start + len).min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let mangled = format!("{}{}{}", &text[..start], junk, &text[end..]);
            expand_all(&mangled);
        }

        /// Values of every type in every known key: errors, no panics.
        #[test]
        fn odd_values_never_panic(
            key in prop::sample::select(vec![
                "kill_timeout", "kill_signal", "swap_size_mb", "http_service.internal_port",
                "http_service.auto_stop_machines", "vm.memory", "vm.size", "vm.cpus",
                "mounts.initial_size", "deploy.max_unavailable", "checks.a.interval",
                "services.ports", "processes.web", "env.X", "restart.policy",
            ]),
            value in prop::sample::select(vec![
                "1", "-1", "0", "1.5", "1e300", "nan", "inf", "\"\"", "\"x\"", "\"10s\"",
                "\"-5s\"", "true", "[]", "[1, \"a\"]", "{}", "{ a = 1 }", "1979-05-27T07:32:00Z",
                "99999999999999999999", "\"99999999999999999999gb\"",
            ]),
        ) {
            let (table, leaf) = key.rsplit_once('.').unwrap_or(("", key));
            let text = if table.is_empty() {
                format!("{leaf} = {value}\n")
            } else {
                format!("[{table}]\n{leaf} = {value}\n")
            };
            expand_all(&text);
        }
    }
}
