//! `HostNet` for real, inside throwaway network namespaces (`aloft_testkit::NetNs`): never the
//! host's own interfaces, routes, sysctls or nftables. Needs root; says so and passes otherwise.
//! Each namespace also holds the fixture's `tap0`, which aloft must leave alone.

#[cfg(test)]
mod tests {
    use std::process::Command;

    use aloft_net::{HostNet, HostNetworks, MachineNet, Namespace, NetError, Plan, PlanConfig};
    use aloft_testkit::NetNs;
    use serde_json::Value;

    fn is_root() -> bool {
        let uid = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .map(|l| l.split_whitespace().nth(1).unwrap() == "0")
            .unwrap();
        if !uid {
            eprintln!("skipped: needs root to create network namespaces");
        }
        uid
    }

    fn out(cmd: &mut Command) -> String {
        let o = cmd.output().unwrap();
        assert!(
            o.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// `ip -j -n NS ARGS` as JSON.
    fn ip(ns: &NetNs, args: &[&str]) -> Value {
        let text = out(Command::new("ip").args(["-j", "-n", &ns.name]).args(args));
        serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text }).unwrap()
    }

    fn links(ns: &NetNs) -> Vec<String> {
        ip(ns, &["link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_owned())
            .collect()
    }

    fn addrs(ns: &NetNs, dev: &str) -> Vec<String> {
        ip(ns, &["addr", "show", "dev", dev])[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect()
    }

    fn routes6(ns: &NetNs, dev: &str) -> Vec<String> {
        ip(ns, &["-6", "route", "show", "dev", dev])
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["dst"].as_str().unwrap().to_owned())
            .collect()
    }

    /// `nft ARGS` inside the namespace.
    fn nft(ns: &NetNs, args: &[&str]) -> String {
        out(Command::new("ip")
            .args(["netns", "exec", &ns.name, "nft"])
            .args(args))
    }

    fn table(ns: &NetNs) -> String {
        nft(ns, &["list", "table", "inet", "aloft"])
    }

    fn has_table(ns: &NetNs) -> bool {
        nft(ns, &["list", "tables"]).contains("table inet aloft")
    }

    fn in_ns(ns: &NetNs, path: &str) -> String {
        out(Command::new("ip").args(["netns", "exec", &ns.name, "cat", path]))
            .trim()
            .to_owned()
    }

    fn owner() -> &'static str {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        if passwd.lines().any(|l| l.starts_with("aloft-vm:")) {
            "aloft-vm"
        } else {
            "nobody"
        }
    }

    fn setup(host: u32) -> (NetNs, Plan, HostNet) {
        let ns = NetNs::new().unwrap();
        let plan = Plan::new(&PlanConfig::new(host)).unwrap();
        let net = HostNet::new(plan.clone())
            .with_namespace(Namespace::Path(ns.path()))
            .with_tap_owner(owner())
            .unwrap();
        net.setup().unwrap();
        (ns, plan, net)
    }

    fn elements_of(ns: &NetNs, m: &MachineNet) -> Vec<String> {
        let t = table(ns);
        [
            format!("\"{}\" . {}", m.tap, m.ip6_prefix),
            format!("\"{}\" . {}", m.tap, m.ip4),
            format!("\"{}\" . {}", m.tap, m.org_prefix),
            format!("\"{}\" . fdaa::/48", m.tap),
        ]
        .into_iter()
        .filter(|e| t.contains(e.as_str()))
        .collect()
    }

    #[test]
    fn two_orgs_get_taps_addresses_routes_and_rules_and_teardown_leaves_nothing() {
        if !is_root() {
            return;
        }
        let host_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
        let (ns, plan, net) = setup(1);
        let a = plan.machine(1, 1).unwrap();
        let b = plan.machine(2, 2).unwrap();
        net.add_machine(&a).unwrap();
        net.add_machine(&b).unwrap();

        for m in [&a, &b] {
            let link = &ip(&ns, &["-d", "link", "show", &m.tap])[0];
            assert_eq!(link["mtu"], 1420);
            assert_eq!(link["linkinfo"]["info_kind"], "tun", "{link}");
            assert_eq!(link["linkinfo"]["info_data"]["type"], "tap", "{link}");
            assert_eq!(link["linkinfo"]["info_data"]["persist"], true, "{link}");
            assert_eq!(link["linkinfo"]["info_data"]["user"], owner(), "{link}");
            assert!(
                link["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
                "{link}"
            );
            let have = addrs(&ns, &m.tap);
            for want in [format!("{}/31", m.gateway4), "fe80::1/64".to_owned()] {
                assert!(have.contains(&want), "{want} not in {have:?}");
            }
            assert!(routes6(&ns, &m.tap).contains(&m.ip6_prefix.to_string()));
            assert_eq!(elements_of(&ns, m).len(), 4, "{}", table(&ns));
        }
        assert_eq!(a.ip6_prefix.to_string(), "fdaa:0:1:0:1:0:1:0/112");
        assert_eq!(b.org_prefix.to_string(), "fdaa:0:2::/48");
        let svc = addrs(&ns, "aloft-svc");
        assert!(svc.contains(&"fdaa::3/128".to_owned()), "{svc:?}");
        assert!(svc.contains(&"fdaa::1:0:0:1/128".to_owned()), "{svc:?}");
        let t = table(&ns);
        assert!(t.contains("masquerade"), "{t}");
        assert!(t.contains("iifname . ip6 daddr != @reach6 drop"), "{t}");
        assert_eq!(in_ns(&ns, "/proc/sys/net/ipv4/ip_forward"), "1");
        assert_eq!(in_ns(&ns, "/proc/sys/net/ipv6/conf/all/forwarding"), "1");
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
            host_forward,
            "the host's own sysctl is untouched"
        );

        // setup again: same rules, elements kept.
        let rules = t.lines().count();
        net.setup().unwrap();
        assert_eq!(table(&ns).lines().count(), rules);
        assert_eq!(elements_of(&ns, &a).len(), 4);

        // A second create of the same tap is refused and changes nothing.
        let e = net.add_machine(&a).unwrap_err();
        assert!(matches!(e, NetError::TapExists { .. }), "{e}");
        assert_eq!(elements_of(&ns, &a).len(), 4);

        // Teardown removes exactly one machine, and is idempotent.
        net.remove_machine(&a.tap).unwrap();
        net.remove_machine(&a.tap).unwrap();
        assert!(!links(&ns).contains(&a.tap));
        assert!(elements_of(&ns, &a).is_empty(), "{}", table(&ns));
        assert_eq!(elements_of(&ns, &b).len(), 4);
        assert_eq!(net.taps().unwrap(), vec![b.tap.clone()]);

        net.remove_all().unwrap();
        net.remove_all().unwrap();
        assert!(!has_table(&ns));
        let left = links(&ns);
        assert!(left.iter().all(|l| !l.starts_with("aloft")), "{left:?}");
        assert!(
            left.contains(&"tap0".to_owned()),
            "the fixture's tap is not ours: {left:?}"
        );
    }

    #[test]
    fn reconcile_removes_strays_and_recreates_missing() {
        if !is_root() {
            return;
        }
        let (ns, plan, net) = setup(2);
        let m1 = plan.machine(1, 1).unwrap();
        let m2 = plan.machine(1, 2).unwrap();
        let m3 = plan.machine(3, 3).unwrap();
        for m in [&m1, &m2, &m3] {
            net.add_machine(m).unwrap();
        }
        // The crash left: m2's tap gone, a stray tap, a stray element, m1 missing an address and
        // an element.
        out(Command::new("ip").args(["-n", &ns.name, "link", "del", &m2.tap]));
        out(Command::new("ip").args(["-n", &ns.name, "tuntap", "add", "dev", "aloft-m99", "mode", "tap"]));
        nft(
            &ns,
            &[
                "add",
                "element",
                "inet",
                "aloft",
                "guest4",
                "{ \"aloft-m77\" . 172.19.0.155 }",
            ],
        );
        nft(
            &ns,
            &[
                "delete",
                "element",
                "inet",
                "aloft",
                "guest4",
                &format!("{{ \"{}\" . {} }}", m1.tap, m1.ip4),
            ],
        );
        out(Command::new("ip").args([
            "-n",
            &ns.name,
            "addr",
            "del",
            &format!("{}/31", m1.gateway4),
            "dev",
            &m1.tap,
        ]));

        let report = net.reconcile(&[m1.clone(), m2.clone()]).unwrap();
        let mut removed = report.removed_taps.clone();
        removed.sort();
        assert_eq!(removed, ["aloft-m3", "aloft-m99"]);
        assert_eq!(report.created_taps, ["aloft-m2"]);
        // Removed: aloft-m77's element (m3's went with its tap). Added: m1's lost guest4 element
        // (m2's elements had stayed; its new tap matches them again).
        assert_eq!(report.removed_elements, 1, "{report:?}");
        assert_eq!(report.added_elements, 1, "{report:?}");

        let mut taps = net.taps().unwrap();
        taps.sort();
        assert_eq!(taps, ["aloft-m1", "aloft-m2"]);
        for m in [&m1, &m2] {
            assert_eq!(elements_of(&ns, m).len(), 4, "{}", table(&ns));
            assert!(addrs(&ns, &m.tap).contains(&format!("{}/31", m.gateway4)));
            assert!(routes6(&ns, &m.tap).contains(&m.ip6_prefix.to_string()));
        }
        assert!(!table(&ns).contains("aloft-m77"));
        assert!(!table(&ns).contains("aloft-m3\""));
        assert!(links(&ns).contains(&"tap0".to_owned()));

        // Nothing left to do the second time.
        assert!(net.reconcile(&[m1, m2]).unwrap().is_clean());
        // An empty expectation removes every machine, keeps the base.
        let r = net.reconcile(&[]).unwrap();
        assert_eq!(r.removed_taps.len(), 2);
        assert!(net.taps().unwrap().is_empty());
        assert!(has_table(&ns));
    }

    #[test]
    fn a_failed_create_leaves_no_tap_and_no_rules() {
        if !is_root() {
            return;
        }
        let (ns, plan, net) = setup(3);
        let m = plan.machine(4, 9).unwrap();
        // Someone else's route to the machine's prefix makes the last netlink step fail.
        out(Command::new("ip").args([
            "-n",
            &ns.name,
            "-6",
            "route",
            "add",
            &m.ip6_prefix.to_string(),
            "dev",
            "tap0",
        ]));
        let e = net.add_machine(&m).unwrap_err();
        assert!(
            matches!(e, NetError::Configure { ref name, .. } if name == "aloft-m9"),
            "{e:?}"
        );
        assert!(!links(&ns).contains(&m.tap));
        assert!(elements_of(&ns, &m).is_empty());
        assert!(
            routes6(&ns, "tap0").contains(&m.ip6_prefix.to_string()),
            "theirs is untouched"
        );
    }

    #[test]
    fn foreign_names_are_refused() {
        if !is_root() {
            return;
        }
        let (ns, plan, net) = setup(4);
        let e = net.remove_machine("tap0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "refusing to touch interface tap0: aloft manages only taps named aloft-m<slot>"
        );
        let mut m = plan.machine(1, 1).unwrap();
        m.tap = "tap0".into();
        assert!(matches!(net.add_machine(&m), Err(NetError::NotAloftName { .. })));
        assert!(matches!(net.reconcile(&[m]), Err(NetError::NotAloftName { .. })));
        // Persisted values that do not hang together, or two machines on one tap: refused before
        // anything changes.
        let mut edited = plan.machine(1, 2).unwrap();
        edited.ip6 = "fdaa:0:9::2".parse().unwrap();
        let e = net.add_machine(&edited).unwrap_err();
        assert!(e.to_string().contains("inconsistent"), "{e}");
        let ok = plan.machine(1, 2).unwrap();
        let e = net.reconcile(&[ok.clone(), ok]).unwrap_err();
        assert!(matches!(e, NetError::DuplicateTap { .. }), "{e}");
        assert!(net.taps().unwrap().is_empty());
        assert!(links(&ns).contains(&"tap0".to_owned()));
        assert!(addrs(&ns, "tap0").contains(&"172.30.0.1/30".to_owned()));
        net.remove_all().unwrap();
        assert!(links(&ns).contains(&"tap0".to_owned()));
    }

    #[test]
    fn host_networks_attach_detach_persist_and_repair() {
        if !is_root() {
            return;
        }
        let (ns, plan, net) = setup(5);
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("net.json");
        let nets = HostNetworks::open(net.clone(), &state).unwrap();
        let a = nets.attach("m-a", 1).unwrap();
        assert_eq!(nets.attach("m-a", 1).unwrap(), a, "idempotent");
        let b = nets.attach("m-b", 2).unwrap();
        assert_ne!(a.slot, b.slot);
        assert_eq!(a, plan.machine(1, a.slot).unwrap());
        assert!(matches!(nets.attach("m-a", 2), Err(NetError::OrgMismatch { .. })));
        assert_eq!(nets.attached(), ["m-a", "m-b"]);
        assert_eq!(elements_of(&ns, &a).len(), 4);

        // A crash left m-a's tap half configured: attach repairs it in place.
        out(Command::new("ip").args(["-n", &ns.name, "addr", "flush", "dev", &a.tap]));
        nft(
            &ns,
            &[
                "delete",
                "element",
                "inet",
                "aloft",
                "reach6",
                &format!("{{ \"{}\" . {} }}", a.tap, a.org_prefix),
            ],
        );
        assert_eq!(nets.attach("m-a", 1).unwrap(), a);
        assert!(addrs(&ns, &a.tap).contains(&format!("{}/31", a.gateway4)));
        assert_eq!(elements_of(&ns, &a).len(), 4);

        // A new process reads the same state; detach frees the slot and removes the tap.
        drop(nets);
        let nets = HostNetworks::open(net.clone(), &state).unwrap();
        assert_eq!(nets.get("m-b"), Some(b.clone()));
        nets.detach("m-b").unwrap();
        nets.detach("m-b").unwrap();
        assert!(!links(&ns).contains(&b.tap));
        assert!(elements_of(&ns, &b).is_empty());
        assert!(!nets.state().slots.used.contains_key(&b.slot));

        // Reconcile from the state file: the tap deleted behind its back comes back, strays go.
        out(Command::new("ip").args(["-n", &ns.name, "link", "del", &a.tap]));
        out(Command::new("ip").args(["-n", &ns.name, "tuntap", "add", "dev", "aloft-m42", "mode", "tap"]));
        let r = nets.reconcile().unwrap();
        assert_eq!(r.created_taps, vec![a.tap.clone()]);
        assert_eq!(r.removed_taps, ["aloft-m42"]);
        assert_eq!(net.taps().unwrap(), vec![a.tap.clone()]);
    }

    #[test]
    fn host_networks_leave_nothing_when_the_pool_is_exhausted_or_creation_fails() {
        if !is_root() {
            return;
        }
        let ns = NetNs::new().unwrap();
        let mut config = PlanConfig::new(6);
        config.ipv4_pool = "10.77.0.0/30".parse().unwrap();
        let plan = Plan::new(&config).unwrap();
        let net = HostNet::new(plan.clone()).with_namespace(Namespace::Path(ns.path()));
        net.setup().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let nets = HostNetworks::open(net.clone(), dir.path().join("net.json")).unwrap();
        // Someone else's route to the only slot's prefix: creation fails and is rolled back.
        let only = plan.machine(1, 1).unwrap();
        out(Command::new("ip").args([
            "-n",
            &ns.name,
            "-6",
            "route",
            "add",
            &only.ip6_prefix.to_string(),
            "dev",
            "tap0",
        ]));
        assert!(matches!(nets.attach("m1", 1), Err(NetError::Configure { .. })));
        assert!(nets.attached().is_empty());
        assert!(nets.state().slots.used.is_empty());
        assert!(net.taps().unwrap().is_empty());
        out(Command::new("ip").args([
            "-n",
            &ns.name,
            "-6",
            "route",
            "del",
            &only.ip6_prefix.to_string(),
            "dev",
            "tap0",
        ]));
        nets.attach("m1", 1).unwrap();
        let e = nets.attach("m2", 1).unwrap_err();
        assert!(e.to_string().contains("no free network slot"), "{e}");
        assert_eq!(nets.attached(), ["m1"]);
        assert_eq!(net.taps().unwrap(), ["aloft-m1"]);
    }
}
