//! Real-VM tests: boot the busybox guest and check the workload's life cycle end to end.

mod common;

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use aloft_guest_proto::{ExecRequest, NetConfig};
    use aloft_vm::{JailSpec, NetSpec, QemuStatus, Vm};

    use crate::common::{BOOT_TIMEOUT, TestVm, collect_stdout};

    fn sh(cmd: &str) -> ExecRequest {
        ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
            ..ExecRequest::default()
        }
    }

    /// Waits until the workload printed `line` (its signal handlers are set up by then).
    fn wait_for_line(rx: &std::sync::mpsc::Receiver<aloft_vm::LogChunk>, line: &str) {
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains(line) {
            let c = rx.recv_timeout(BOOT_TIMEOUT).expect("workload output");
            seen.extend_from_slice(&c.data);
        }
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn echo_hi_logs_and_exits_zero() {
        let t = TestVm::new("echo", &["/bin/sh", "-c", "echo hi"]);
        let vm = t.start();
        let logs = vm.logs();
        let pid = vm.wait_started(BOOT_TIMEOUT).unwrap();
        assert!(pid >= 0);
        let exit = vm.wait_exit(BOOT_TIMEOUT).unwrap();
        assert_eq!(collect_stdout(&logs, Duration::from_secs(1)), "hi\n");
        let w = exit.workload.expect("workload exit reported");
        assert_eq!(w.exit_code, Some(0));
        assert!(matches!(exit.qemu_status, QemuStatus::Exited { .. }), "{exit:?}");
        t.assert_no_qemu();
        // The run dir keeps what the caller needs and nothing live; attach reports the exit.
        assert!(!t.run_dir().join("qmp.sock").exists());
        let again = Vm::attach(&t.run_dir())
            .unwrap()
            .wait_exit(Duration::ZERO)
            .unwrap();
        assert_eq!(again.workload, Some(w));
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn exit_code_is_reported() {
        let t = TestVm::new("exit3", &["/bin/sh", "-c", "exit 3"]);
        let vm = t.start();
        let exit = vm.wait_exit(BOOT_TIMEOUT).unwrap();
        assert_eq!(exit.workload.unwrap().exit_code, Some(3));
        t.assert_no_qemu();
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn killing_signal_is_reported() {
        let t = TestVm::new("kill9", &["/bin/sh", "-c", "kill -9 $$"]);
        let vm = t.start();
        let exit = vm.wait_exit(BOOT_TIMEOUT).unwrap();
        let w = exit.workload.unwrap();
        assert_eq!((w.exit_code, w.signal), (None, Some(9)), "{w:?}");
        t.assert_no_qemu();
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn env_user_and_workdir_are_honoured() {
        let mut t = TestVm::new("ident", &["/bin/sh", "-c", "id -u; pwd; echo $FOO"]);
        t.spec.run_config.user = Some("app".into());
        t.spec.run_config.working_dir = Some("/tmp".into());
        t.spec.run_config.env.insert("FOO".into(), "bar baz".into());
        let vm = t.start();
        let logs = vm.logs();
        let exit = vm.wait_exit(BOOT_TIMEOUT).unwrap();
        assert_eq!(exit.workload.unwrap().exit_code, Some(0));
        assert_eq!(
            collect_stdout(&logs, Duration::from_secs(1)),
            "1000\n/tmp\nbar baz\n"
        );
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn hostname_hosts_and_resolv_conf_are_written() {
        let mut t = TestVm::new(
            "etc_files",
            &[
                "/bin/sh",
                "-c",
                "hostname; cat /etc/hostname /etc/hosts /etc/resolv.conf; stat -c '%a %u' /etc; \
                 test -s /etc/passwd && echo passwd kept",
            ],
        );
        t.spec.run_config.runtime.private_ip = "fdaa::5".into();
        t.spec.run_config.dns.nameservers = vec!["fdaa::3".parse().unwrap()];
        t.spec.run_config.dns.search = vec!["internal".into()];
        t.spec.run_config.etc_hosts = vec![aloft_guest_proto::EtcHost {
            ip: "10.1.2.3".parse().unwrap(),
            names: vec!["db".into(), "db.internal".into()],
        }];
        let vm = t.start();
        let logs = vm.logs();
        let exit = vm.wait_exit(BOOT_TIMEOUT).unwrap();
        assert_eq!(exit.workload.unwrap().exit_code, Some(0));
        assert_eq!(
            collect_stdout(&logs, Duration::from_secs(1)),
            "etc-files\netc-files\n\
             127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
             fdaa::5\tetc-files\nfdaa::5\tfly-global-services\n10.1.2.3\tdb db.internal\n\
             nameserver fdaa::3\nsearch internal\n\
             755 0\npasswd kept\n"
        );
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn exec_ps_and_pause_while_running() {
        let t = TestVm::new("exec", &["/bin/sleep", "1000"]);
        let vm = t.start();
        let pid = vm.wait_started(BOOT_TIMEOUT).unwrap();
        let out = vm
            .exec(sh("echo out; echo err >&2; exit 4"), Duration::from_secs(30))
            .unwrap();
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.exit.exit_code, Some(4));
        let ps = vm.ps().unwrap();
        assert!(ps.iter().any(|p| p.pid == pid && p.command == "sleep"), "{ps:?}");
        assert!(
            vm.sync_guest(Duration::from_secs(10)).unwrap(),
            "this init speaks protocol 2"
        );
        let missing = vm.exec(
            ExecRequest {
                argv: vec!["/nope".into()],
                ..ExecRequest::default()
            },
            Duration::from_secs(30),
        );
        assert!(missing.is_err(), "{missing:?}");

        // Paused, the guest answers nothing; continued, it answers what was asked meanwhile.
        std::thread::scope(|s| {
            let (asked, answered_while_paused) = vm
                .paused(|| {
                    let asked = s.spawn(|| vm.exec(sh("echo again"), Duration::from_secs(30)));
                    std::thread::sleep(Duration::from_millis(500));
                    let finished = asked.is_finished();
                    (asked, finished)
                })
                .unwrap();
            assert!(!answered_while_paused, "the guest ran while paused");
            assert_eq!(asked.join().unwrap().unwrap().stdout, b"again\n");
        });
        assert!(
            vm.ps().unwrap().iter().any(|p| p.pid == pid),
            "the workload runs on"
        );

        let exit = vm.kill().unwrap();
        assert_eq!(exit.qemu_status, QemuStatus::Killed);
        t.assert_no_qemu();
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn graceful_stop_within_timeout() {
        let t = TestVm::new(
            "stopok",
            &[
                "/bin/sh",
                "-c",
                "trap 'echo bye; exit 0' TERM; echo ready; while true; do sleep 0.1; done",
            ],
        );
        let vm = t.start();
        let logs = vm.logs();
        wait_for_line(&logs, "ready");
        let t0 = Instant::now();
        let exit = vm.stop(Some(libc::SIGTERM), Duration::from_secs(20)).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(20), "took {:?}", t0.elapsed());
        let w = exit.workload.unwrap();
        assert_eq!(w.exit_code, Some(0), "{exit:?}");
        assert!(w.requested_stop);
        assert!(matches!(exit.qemu_status, QemuStatus::Exited { .. }), "{exit:?}");
        assert!(collect_stdout(&logs, Duration::from_millis(200)).contains("bye"));
        t.assert_no_qemu();
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn stop_kills_a_workload_that_ignores_the_signal() {
        let t = TestVm::new(
            "stopkill",
            &[
                "/bin/sh",
                "-c",
                "trap '' TERM; echo ready; while true; do sleep 0.1; done",
            ],
        );
        let vm = t.start();
        wait_for_line(&vm.logs(), "ready");
        let t0 = Instant::now();
        let exit = vm.stop(Some(libc::SIGTERM), Duration::from_secs(2)).unwrap();
        assert!(
            t0.elapsed() >= Duration::from_secs(2),
            "{:?} {exit:?}",
            t0.elapsed()
        );
        let w = exit.workload.unwrap();
        assert_eq!(w.signal, Some(9), "{exit:?}");
        t.assert_no_qemu();
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn reattach_after_the_handle_is_dropped() {
        let t = TestVm::new("attach", &["/bin/sleep", "1000"]);
        let vm = t.start();
        vm.wait_started(BOOT_TIMEOUT).unwrap();
        let qemu = vm.pid();
        drop(vm);
        assert!(
            std::path::Path::new(&format!("/proc/{qemu}")).exists(),
            "qemu outlives the handle"
        );
        let vm = Vm::attach(&t.run_dir()).unwrap();
        assert_eq!(vm.pid(), qemu);
        assert!(vm.wait_started(BOOT_TIMEOUT).unwrap() > 0);
        let out = vm.exec(sh("echo again"), Duration::from_secs(30)).unwrap();
        assert_eq!(out.stdout, b"again\n");
        let exit = vm.stop(None, Duration::from_secs(10)).unwrap();
        assert!(exit.workload.is_some(), "{exit:?}");
        t.assert_no_qemu();
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn suspend_and_resume_keep_memory() {
        suspend_resume(&TestVm::new("snap", &["/bin/sleep", "1000"]));
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn jailed_suspend_and_resume() {
        let cgroups = aloft_testkit::CgroupParent::new();
        let mut t = TestVm::new("jailsnap", &["/bin/sleep", "1000"]);
        t.spec.jail = Some(JailSpec {
            user: "nobody".into(),
            cgroup_parent: cgroups.name().into(),
        });
        suspend_resume(&t);
        for d in cgroups.machine_dirs(&t.spec.name) {
            assert!(!d.exists(), "{} left", d.display());
        }
    }

    fn suspend_resume(t: &TestVm) {
        let vm = t.start();
        let pid = vm.wait_started(BOOT_TIMEOUT).unwrap();
        let token = format!("token-{}", std::process::id());
        let out = vm
            .exec(
                sh(&format!("echo {token} > /dev/shm/token")),
                Duration::from_secs(30),
            )
            .unwrap();
        assert_eq!(out.exit.exit_code, Some(0));
        let snap = t.dir.path().join("snap.bin");
        let t0 = Instant::now();
        vm.suspend(&snap).unwrap();
        let suspend_time = t0.elapsed();
        t.assert_no_qemu();
        let size = std::fs::metadata(&snap).unwrap().len();
        drop(vm);
        let t0 = Instant::now();
        let vm = Vm::resume(t.spec.clone(), &snap).unwrap();
        let resume_time = t0.elapsed();
        let out = vm
            .exec(sh("cat /dev/shm/token"), Duration::from_secs(30))
            .unwrap();
        let exec_time = t0.elapsed();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), token);
        assert_eq!(
            vm.wait_started(Duration::from_secs(5)).unwrap(),
            pid,
            "same workload"
        );
        eprintln!(
            "snapshot {size} bytes in {suspend_time:?}; resume {resume_time:?}, first exec answered at {exec_time:?}"
        );
        if let Some(jail) = &t.spec.jail {
            // The driver moved the resumed QEMU into its cgroups while it initialised: every
            // thread is in the memory and the cpu hierarchy (v1), or in the one (v2).
            let leaf = format!("/{}/{}", jail.cgroup_parent, t.spec.name);
            let want = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
                1
            } else {
                2
            };
            for task in std::fs::read_dir(format!("/proc/{}/task", vm.pid())).unwrap() {
                let cg = std::fs::read_to_string(task.unwrap().path().join("cgroup")).unwrap();
                assert_eq!(cg.lines().filter(|l| l.ends_with(&leaf)).count(), want, "{cg}");
            }
        }
        // Again, from the resumed machine: both writes survive.
        let out = vm
            .exec(sh("echo second > /dev/shm/second"), Duration::from_secs(30))
            .unwrap();
        assert_eq!(out.exit.exit_code, Some(0));
        vm.suspend(&snap).unwrap();
        t.assert_no_qemu();
        drop(vm);
        let vm = Vm::resume(t.spec.clone(), &snap).unwrap();
        let out = vm
            .exec(sh("cat /dev/shm/token /dev/shm/second"), Duration::from_secs(30))
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .collect::<Vec<_>>(),
            [token.as_str(), "second"]
        );
        // The guest clock was set on resume: guest date is close to the host's.
        let out = vm.exec(sh("date +%s"), Duration::from_secs(30)).unwrap();
        let guest: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(guest.abs_diff(host) <= 5, "guest {guest} host {host}");
        vm.kill().unwrap();
        t.assert_no_qemu();
    }

    /// QEMU's resident memory in MiB.
    fn rss_mib(vm: &Vm) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kib / 1024.0
    }

    /// Fills 64 MiB of the guest's memory (a file on its tmpfs), frees it, and returns QEMU's
    /// RSS with the file, and the lowest RSS seen within `watch` after it was removed.
    fn fill_and_free(t: &TestVm, watch: Duration) -> (f64, f64) {
        let vm = t.start();
        vm.wait_started(BOOT_TIMEOUT).unwrap();
        let fill = vm
            .exec(
                sh("head -c 67108864 /dev/zero > /dev/shm/fill && sync"),
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(fill.exit.exit_code, Some(0), "{fill:?}");
        let full = rss_mib(&vm);
        let freed = vm.exec(sh("rm /dev/shm/fill"), Duration::from_secs(30)).unwrap();
        assert_eq!(freed.exit.exit_code, Some(0));
        let deadline = Instant::now() + watch;
        let mut lowest = rss_mib(&vm);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
            lowest = lowest.min(rss_mib(&vm));
        }
        vm.kill().unwrap();
        t.assert_no_qemu();
        (full, lowest)
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn memory_the_guest_frees_goes_back_to_the_host() {
        let t = TestVm::new("reporting", &["/bin/sleep", "1000"]);
        assert!(t.spec.free_page_reporting, "on by default");
        // Linux reports freed memory 2 s after it was freed, then QEMU discards it.
        let (full, lowest) = fill_and_free(&t, Duration::from_secs(8));
        eprintln!("RSS with 64 MiB filled {full:.1} MiB, after freeing it {lowest:.1} MiB");
        assert!(
            full - lowest >= 48.0,
            "QEMU kept the guest's freed memory: {full:.1} MiB filled, {lowest:.1} MiB after freeing"
        );
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn without_free_page_reporting_the_host_keeps_what_the_guest_touched() {
        // The control for the test above: what makes the difference is the reporting.
        let mut t = TestVm::new("noreporting", &["/bin/sleep", "1000"]);
        t.spec.free_page_reporting = false;
        let (full, lowest) = fill_and_free(&t, Duration::from_secs(5));
        assert!(
            full - lowest < 16.0,
            "RSS fell without reporting: {full:.1} MiB filled, {lowest:.1} MiB after freeing"
        );
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn host_reaches_a_server_in_the_guest() {
        let ns = aloft_testkit::NetNs::new().unwrap();
        let mut t = TestVm::new("net", &["/bin/httpd", "-f", "-p", "8080", "-h", "/var/www"]);
        t.spec.net = Some(NetSpec {
            tap: ns.tap.clone(),
            mac: "52:54:00:12:34:56".into(),
            netns: Some(ns.path()),
        });
        t.spec.run_config.network = Some(NetConfig {
            addresses: vec![format!("{}/{}", ns.guest_ip, ns.prefix_len).parse().unwrap()],
            gateways: vec![ns.host_ip.into()],
            mtu: None,
        });
        let vm = t.start();
        vm.wait_started(BOOT_TIMEOUT).unwrap();
        let body = ns
            .http_get(
                std::net::SocketAddr::from((ns.guest_ip, 8080)),
                Duration::from_secs(30),
            )
            .unwrap_or_else(|e| panic!("no http answer: {e}"));
        assert!(body.contains("hello from the guest"), "{body}");
        let ps = vm.ps().unwrap();
        assert!(
            ps.iter()
                .any(|p| p.listen_sockets.iter().any(|l| l.address.ends_with(":8080"))),
            "{ps:?}"
        );
        vm.kill().unwrap();
        t.assert_no_qemu();
    }

    /// `scripts/setup.sh` builds aloft's microvm-only QEMU beside the guest kernel (ADR 0024), and
    /// a spec picks it over Debian's on `PATH`.
    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn machines_run_on_aloft_s_own_qemu() {
        let t = TestVm::new("ownqemu", &["/bin/sleep", "1000"]);
        let own = t.spec.kernel.with_file_name(aloft_vm::QEMU);
        assert_eq!(t.spec.qemu, own, "run scripts/setup.sh (scripts/build-qemu.sh)");
        let vm = t.start();
        vm.wait_started(BOOT_TIMEOUT).unwrap();
        let exe = std::fs::read_link(format!("/proc/{}/exe", vm.pid())).unwrap();
        assert_eq!(exe, own);
        // No display, sound, USB or TLS libraries: only what microvm and its devices need.
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", vm.pid())).unwrap();
        for lib in [
            "libgnutls",
            "libspice",
            "libusb",
            "libslirp",
            "libjpeg",
            "libcapstone",
        ] {
            assert!(!maps.contains(lib), "aloft's QEMU maps {lib}");
        }
        vm.kill().unwrap();
        t.assert_no_qemu();
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn jailed_vm_runs_unprivileged_in_its_cgroup() {
        let parent = aloft_testkit::CgroupParent::new();
        let mut t = TestVm::new("jail", &["/bin/sleep", "1000"]);
        t.spec.jail = Some(JailSpec {
            user: "nobody".into(),
            cgroup_parent: parent.name().into(),
        });
        t.spec.memory_mib = 128;
        let vm = t.start();
        vm.wait_started(BOOT_TIMEOUT).unwrap();
        let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(uid.split_whitespace().skip(1).all(|u| u == "65534"), "{uid}");
        let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", vm.pid())).unwrap();
        let leaf = format!("/{}/{}", parent.name(), t.spec.name);
        assert!(cgroups.contains(&leaf), "{cgroups}");
        let v1 = std::path::Path::new("/sys/fs/cgroup/memory").join(leaf.trim_start_matches('/'));
        let v2 = std::path::Path::new("/sys/fs/cgroup").join(leaf.trim_start_matches('/'));
        if v1.exists() {
            let limit = std::fs::read_to_string(v1.join("memory.limit_in_bytes")).unwrap();
            assert_eq!(limit.trim(), ((128 + 112) * 1024 * 1024).to_string());
        }
        let out = vm.exec(sh("echo jailed"), Duration::from_secs(30)).unwrap();
        assert_eq!(out.stdout, b"jailed\n");
        vm.stop(None, Duration::from_secs(5)).unwrap();
        t.assert_no_qemu();
        assert!(!v1.exists() && !v2.exists(), "cgroup removed");
    }

    /// Everything an `aloft ssh console` needs from the driver, on one boot: a shell on a
    /// terminal (resize, output, exit code), stdin on pipes, a slow consumer holding back a chatty
    /// command, a missing program, a dropped session killing its command, the VM going away.
    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn exec_sessions_stream_stdin_terminal_and_signals() {
        use aloft_guest_proto::{DataStream, ExecExit, TtySize};
        use aloft_vm::{ExecEvent, ExecSession, VmError};

        /// Receives until `done` holds for the output so far or the session exits; output and exit.
        fn read_until(s: &ExecSession, done: impl Fn(&str) -> bool) -> (String, Option<ExecExit>) {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut out = Vec::new();
            loop {
                let text = String::from_utf8_lossy(&out).into_owned();
                if done(&text) {
                    return (text, None);
                }
                assert!(Instant::now() < deadline, "no match in {text:?}");
                match s.recv(Duration::from_millis(500)).unwrap() {
                    Some(ExecEvent::Output { stream, data }) => {
                        assert_eq!(stream, DataStream::Stdout);
                        out.extend_from_slice(&data);
                    }
                    Some(ExecEvent::Exited(exit)) => {
                        return (String::from_utf8_lossy(&out).into_owned(), Some(exit));
                    }
                    None => {}
                }
            }
        }
        fn running(vm: &Vm, arg: &str) -> bool {
            vm.ps()
                .unwrap()
                .iter()
                .any(|p| p.cmdline.iter().any(|a| a == arg))
        }
        fn wait_gone(vm: &Vm, arg: &str) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while running(vm, arg) {
                assert!(
                    Instant::now() < deadline,
                    "{arg} still runs: {:?}",
                    vm.ps().unwrap()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        let t = TestVm::new("session", &["/bin/sleep", "1000"]);
        let vm = t.start();
        vm.wait_started(BOOT_TIMEOUT).unwrap();
        let req = |argv: &[&str], tty: Option<TtySize>| ExecRequest {
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            stdin: tty.is_none(),
            tty,
            ..ExecRequest::default()
        };

        // A shell on a terminal, from another thread than the one that started it.
        let shell = vm
            .exec_session(req(&["/bin/sh"], Some(TtySize { rows: 24, cols: 80 })))
            .unwrap();
        let shell = std::thread::spawn(move || {
            shell.resize(40, 120).unwrap();
            shell.stdin(b"stty size; echo T=$TERM\n").unwrap();
            // Outputs that the terminal's echo of the typed line cannot match.
            let (text, exit) = read_until(&shell, |t| {
                t.contains("\n40 120\r\n") && t.contains("T=xterm\r\n")
            });
            assert_eq!(exit, None, "{text}");
            shell.stdin(b"echo hi; exit 3\n").unwrap();
            let (text, exit) = read_until(&shell, |_| false);
            assert!(text.contains("\nhi\r\n"), "{text:?}");
            assert_eq!(exit.unwrap().exit_code, Some(3));
            assert!(shell.recv(Duration::ZERO).is_err(), "no events after the exit");
            assert!(shell.stdin(b"x").is_err());
        });
        shell.join().unwrap();

        // stdin on pipes: cat echoes it (bigger than a frame's chunk) and exits at EOF.
        let cat = vm.exec_session(req(&["/bin/cat"], None)).unwrap();
        let input: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes()[..1].to_vec())
            .collect();
        cat.stdin(&input).unwrap();
        cat.stdin(b"").unwrap();
        cat.close_stdin().unwrap();
        cat.resize(10, 10).unwrap();
        let mut echoed = Vec::new();
        let exit = loop {
            match cat.recv(Duration::from_secs(30)).unwrap() {
                Some(ExecEvent::Output { data, .. }) => echoed.extend_from_slice(&data),
                Some(ExecEvent::Exited(exit)) => break exit,
                None => panic!("cat went quiet after {} bytes", echoed.len()),
            }
        };
        assert_eq!(exit.exit_code, Some(0));
        assert!(
            echoed == input,
            "cat echoed {} of {} bytes",
            echoed.len(),
            input.len()
        );

        // A chatty command and a consumer that does not read: the command waits (the host holds
        // at most the session's window), then everything arrives once it reads.
        let chatty = vm
            .exec_session(req(&["head", "-c", "2000000", "/dev/zero"], None))
            .unwrap();
        // With flow control head blocks after the window (plus a pipe's buffer) until the consumer
        // reads. Without, the channel moves these 2 MB well within the pause even under TCG (this
        // assertion fails with the credit turned off).
        std::thread::sleep(Duration::from_secs(3));
        assert!(running(&vm, "2000000"), "head should wait for the consumer");
        let mut zeros = 0usize;
        let exit = loop {
            match chatty.recv(Duration::from_secs(30)).unwrap() {
                Some(ExecEvent::Output { stream, data }) => {
                    assert_eq!(stream, DataStream::Stdout);
                    assert!(data.iter().all(|&b| b == 0));
                    zeros += data.len();
                }
                Some(ExecEvent::Exited(exit)) => break exit,
                None => panic!("quiet after {zeros} bytes"),
            }
        };
        assert_eq!((zeros, exit.exit_code), (2_000_000, Some(0)));

        // stderr is its own stream on pipes.
        let err = vm
            .exec_session(req(&["/bin/sh", "-c", "echo out; echo err >&2"], None))
            .unwrap();
        let (mut out, mut errs) = (Vec::new(), Vec::new());
        while let Some(ev) = err.recv(Duration::from_secs(30)).unwrap() {
            match ev {
                ExecEvent::Output {
                    stream: DataStream::Stdout,
                    data,
                } => out.extend_from_slice(&data),
                ExecEvent::Output { data, .. } => errs.extend_from_slice(&data),
                ExecEvent::Exited(exit) => {
                    assert_eq!(exit.exit_code, Some(0));
                    break;
                }
            }
        }
        assert_eq!((out.as_slice(), errs.as_slice()), (&b"out\n"[..], &b"err\n"[..]));

        // A missing program is init's refusal, naming it.
        match vm.exec_session(req(&["/nope/missing"], None)) {
            Err(VmError::ExecFailed { message }) => assert!(message.contains("/nope/missing"), "{message}"),
            other => panic!("expected ExecFailed, got {other:?}"),
        }
        // Neither stdin nor a terminal: Vm::exec's job.
        assert!(matches!(
            vm.exec_session(ExecRequest {
                argv: vec!["/bin/true".into()],
                ..ExecRequest::default()
            }),
            Err(VmError::ExecFailed { .. })
        ));

        // Dropping a session kills its command; on a terminal its whole process group.
        let sleeper = vm.exec_session(req(&["/bin/sleep", "999"], None)).unwrap();
        let group = vm
            .exec_session(req(
                &["/bin/sh", "-c", "sleep 998; echo never"],
                Some(TtySize { rows: 24, cols: 80 }),
            ))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(running(&vm, "999") && running(&vm, "998")) {
            assert!(Instant::now() < deadline, "{:?}", vm.ps().unwrap());
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(sleeper);
        drop(group);
        wait_gone(&vm, "999");
        wait_gone(&vm, "998");
        wait_gone(&vm, "sleep 998; echo never");

        // The VM going away ends a live session with the error exec gives.
        let orphan = vm.exec_session(req(&["/bin/cat"], None)).unwrap();
        vm.kill().unwrap();
        assert!(
            matches!(
                orphan.recv(Duration::from_secs(10)),
                Err(VmError::NotRunning { .. })
            ),
            "a session outlives its VM only as an error"
        );
        assert!(matches!(
            vm.exec_session(req(&["/bin/cat"], None)),
            Err(VmError::NotRunning { .. })
        ));
        drop(orphan);
        t.assert_no_qemu();
    }
}
