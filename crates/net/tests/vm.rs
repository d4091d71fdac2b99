//! Real guests on taps made by `HostNet`, in a throwaway namespace standing in for the host: the
//! host reaches a guest's server at its 6PN and IPv4 addresses, a guest of the same organization
//! reaches it, a guest of another organization does not.

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    use aloft_guest_proto::{ExecRequest, RootConfig, RunConfig};
    use aloft_net::{HostNet, HostNetworks, MachineNet, Namespace, Plan, PlanConfig};
    use aloft_testkit::NetNs;
    use aloft_vm::{AccelChoice, DiskSpec, NetSpec, Vm, VmSpec};

    const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

    /// A guest on `m`'s tap running `argv`; killed on drop.
    struct Guest {
        _dir: tempfile::TempDir,
        vm: Vm,
        run_dir: PathBuf,
    }

    impl Guest {
        fn start(ns: &NetNs, m: &MachineNet, name: &str, argv: &[&str]) -> Self {
            let artifacts = aloft_testkit::guest_artifacts().unwrap();
            let rootfs = aloft_testkit::busybox_rootfs(&aloft_testkit::cache_dir()).unwrap();
            let dir = tempfile::Builder::new().prefix("aloft-net-").tempdir().unwrap();
            let rw = dir.path().join("rw.img");
            aloft_testkit::writable_disk(&rw, 64).unwrap();
            let run_dir = dir.path().join("run");
            let mut spec = VmSpec::new(
                format!("{name}-{}", std::process::id()),
                artifacts.kernel,
                artifacts.initrd,
                run_dir.clone(),
            );
            spec.accel = AccelChoice::Auto;
            spec.memory_mib = 128;
            spec.disks = vec![DiskSpec::raw(rootfs, true), DiskSpec::raw(&rw, false)];
            spec.net = Some(NetSpec {
                tap: m.tap.clone(),
                mac: m.mac.clone(),
                netns: Some(ns.path()),
            });
            spec.run_config = RunConfig {
                hostname: name.to_owned(),
                exec: Some(argv.iter().map(|s| (*s).to_owned()).collect()),
                root: RootConfig {
                    device: Some("/dev/vda".into()),
                    fstype: "ext4".into(),
                    writable_device: Some("/dev/vdb".into()),
                },
                network: Some(m.net_config()),
                dns: m.dns_config(),
                etc_hosts: m.etc_hosts(),
                ..RunConfig::default()
            };
            let vm = Vm::start(spec).unwrap();
            vm.wait_started(BOOT_TIMEOUT).unwrap();
            Self {
                _dir: dir,
                vm,
                run_dir,
            }
        }

        /// Runs `cmd` with `sh -c` in the guest: (exit code, stdout + stderr).
        fn sh(&self, cmd: &str) -> (Option<i32>, String) {
            let out = self
                .vm
                .exec(
                    ExecRequest {
                        argv: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
                        ..ExecRequest::default()
                    },
                    Duration::from_secs(60),
                )
                .unwrap();
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            (out.exit.exit_code, text)
        }
    }

    impl Drop for Guest {
        fn drop(&mut self) {
            let _ = self.vm.kill();
            let left = aloft_vm::processes_mentioning(&self.run_dir);
            assert!(
                left.is_empty() || std::thread::panicking(),
                "qemu left behind: {left:?}"
            );
        }
    }

    /// GET /index.html from inside `ns` to `addr`, retrying for 30 s.
    fn http_get(ns: &NetNs, addr: SocketAddr) -> String {
        ns.http_get(addr, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no http answer from {addr}: {e}"))
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots real guests; enable feature vm-tests"
    )]
    fn guests_reach_their_org_and_not_another() {
        let ns = NetNs::new().unwrap();
        let plan = Plan::new(&PlanConfig::new(1)).unwrap();
        let net = HostNet::new(plan)
            .with_namespace(Namespace::Path(ns.path()))
            .with_tap_owner("aloft-vm")
            .unwrap();
        // As the agent does: machine id → network, state in a file, reconcile at start.
        let dir = tempfile::tempdir().unwrap();
        let nets = HostNetworks::open(net.clone(), dir.path().join("net.json")).unwrap();
        assert!(nets.reconcile().unwrap().is_clean());
        let server = nets.attach("server", 1).unwrap();
        let friend = nets.attach("friend", 1).unwrap();
        let stranger = nets.attach("stranger", 2).unwrap();

        let srv = Guest::start(
            &ns,
            &server,
            "server",
            &["/bin/httpd", "-f", "-p", "8080", "-h", "/var/www"],
        );
        // The host (the proxy's side) reaches the server at its 6PN and its IPv4 address.
        let body = http_get(&ns, SocketAddr::from((server.ip6, 8080)));
        assert!(body.contains("hello from the guest"), "{body}");
        let body = http_get(&ns, SocketAddr::from((server.ip4, 8080)));
        assert!(body.contains("hello from the guest"), "{body}");
        // The guest sees its addresses and the /etc/hosts alias.
        let (code, ip) = srv.sh("ip -6 addr show dev eth0; cat /etc/hosts /etc/resolv.conf");
        assert_eq!(code, Some(0), "{ip}");
        assert!(ip.contains(&format!("{}/112", server.ip6)), "{ip}");
        assert!(ip.contains("fly-local-6pn"), "{ip}");
        assert!(ip.contains("nameserver fdaa::3"), "{ip}");

        // busybox nc and ping (busybox's static wget crashes on IPv6 literals).
        let get =
            |addr: String| format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {addr} 8080");
        let ping = |addr: String| format!("ping -c 1 -W 3 {addr}");
        let friend_vm = Guest::start(&ns, &friend, "friend", &["/bin/sleep", "1000"]);
        let (code, out) = friend_vm.sh(&get(server.ip6.to_string()));
        assert_eq!(code, Some(0), "same org: {out}");
        assert!(out.contains("hello from the guest"), "same org: {out}");
        let (code, out) = friend_vm.sh(&ping(server.ip6.to_string()));
        assert_eq!(code, Some(0), "same org ping: {out}");

        let stranger_vm = Guest::start(&ns, &stranger, "stranger", &["/bin/sleep", "1000"]);
        let (_, out) = stranger_vm.sh(&get(server.ip6.to_string()));
        assert!(
            !out.contains("hello from the guest"),
            "another org reached the server: {out}"
        );
        let (code, out) = stranger_vm.sh(&ping(server.ip6.to_string()));
        assert_ne!(code, Some(0), "another org pinged the server: {out}");
        // Nor over the host-local IPv4 pool.
        let (_, out) = stranger_vm.sh(&get(server.ip4.to_string()));
        assert!(
            !out.contains("hello from the guest"),
            "another org reached the server over ipv4: {out}"
        );
        // The stranger's own network works: it pings the platform's DNS address on the host.
        let (code, out) = stranger_vm.sh("ping -c 1 -W 3 fdaa::3");
        assert_eq!(code, Some(0), "stranger's own network: {out}");

        drop((srv, friend_vm, stranger_vm));
        for id in ["server", "friend", "stranger"] {
            nets.detach(id).unwrap();
        }
        assert!(net.taps().unwrap().is_empty());
        assert!(nets.attached().is_empty());
        net.remove_all().unwrap();
    }
}
