//! Real-VM tests of boot templates: machines restored from a snapshot of a booted guest get
//! their own config, clock, randomness and MAC.

mod common;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use aloft_guest_proto::NetConfig;
    use aloft_vm::{NetSpec, Templates};

    use crate::common::{BOOT_TIMEOUT, TestVm, collect_stdout};

    /// Prints the hostname, 16 random bytes, the guest's clock and eth0's MAC (if any), then
    /// sleeps.
    const REPORT: &str = "echo host=$(hostname); \
        echo random=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'); \
        echo clock=$(date +%s); \
        echo mac=$(cat /sys/class/net/eth0/address 2>/dev/null); \
        exec sleep 1000";

    fn field(out: &str, name: &str) -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {out:?}"))
            .trim()
            .to_owned()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// Starts `t` from `templates` and returns the workload's report.
    fn start(templates: &Templates, t: &TestVm) -> (aloft_vm::TemplateStart, String) {
        start_until(templates, t, "mac=")
    }

    /// Starts `t` from `templates` and returns its output up to `marker`.
    fn start_until(templates: &Templates, t: &TestVm, marker: &str) -> (aloft_vm::TemplateStart, String) {
        let started = templates.start(t.spec.clone()).unwrap();
        let logs = started.vm.logs();
        started.vm.wait_started(BOOT_TIMEOUT).unwrap();
        let mut out = String::new();
        let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
        while !out.contains(marker) && std::time::Instant::now() < deadline {
            out += &collect_stdout(&logs, Duration::from_millis(500));
        }
        (started, out)
    }

    /// The directory of the one template in `templates`.
    fn the_template(templates: &Templates) -> std::path::PathBuf {
        std::fs::read_dir(templates.dir())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.is_dir())
            .expect("a template")
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn machines_of_one_shape_start_from_one_template_each_as_itself() {
        let dir = tempfile::tempdir().unwrap();
        let templates = Templates::new(dir.path().join("templates")).unwrap();
        let first = TestVm::new("first", &["/bin/sh", "-c", REPORT]);
        let second = TestVm::new("second", &["/bin/sh", "-c", REPORT]);

        let (a, out_a) = start(&templates, &first);
        assert!(a.made_template, "the first machine of a shape makes its template");
        assert_eq!(a.cold_reason, None, "{out_a}");
        let (b, out_b) = start(&templates, &second);
        assert!(!b.made_template, "the second one restores it");
        assert_eq!(b.cold_reason, None, "{out_b}");

        // Each has its own config (it came in the boot request, not with the template).
        assert_eq!(field(&out_a, "host"), "first");
        assert_eq!(field(&out_b, "host"), "second");
        // Restored from one snapshot, yet their random generators part ways.
        assert_ne!(field(&out_a, "random"), field(&out_b, "random"));
        assert_eq!(field(&out_b, "random").len(), 32);
        // The clock is the host's, not the template's.
        let clock: u64 = field(&out_b, "clock").parse().unwrap();
        assert!(clock.abs_diff(now()) <= 5, "guest clock {clock}, host {}", now());

        // The restored machine is a machine like any other: exec, stop.
        let out =
            b.vm.exec(
                aloft_guest_proto::ExecRequest {
                    argv: vec!["/bin/cat".into(), "/proc/cmdline".into()],
                    ..Default::default()
                },
                Duration::from_secs(30),
            )
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains(aloft_guest_proto::TEMPLATE_CMDLINE_FLAG));
        b.vm.kill().unwrap();
        a.vm.kill().unwrap();
        second.assert_no_qemu();
        first.assert_no_qemu();
        let left: Vec<_> = std::fs::read_dir(templates.dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        assert_eq!(left.len(), 1, "one template, no build left over: {left:?}");
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn a_template_that_no_longer_loads_boots_its_machine_cold_and_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let templates = Templates::new(dir.path().join("templates")).unwrap();
        let machines: Vec<TestVm> = ["one", "two", "three"]
            .iter()
            .map(|n| TestVm::new(n, &["/bin/sh", "-c", REPORT]))
            .collect();
        let (first, _) = start(&templates, &machines[0]);
        first.vm.kill().unwrap();
        // What an older QEMU's snapshot looks like to this one: not a snapshot.
        let template = the_template(&templates);
        std::fs::write(template.join("snapshot"), b"not a migration stream").unwrap();

        let (second, out) = start(&templates, &machines[1]);
        let reason = second.cold_reason.clone().expect("booted cold");
        assert!(reason.contains("restoring the template failed"), "{reason}");
        assert!(!second.made_template);
        assert_eq!(field(&out, "host"), "two", "the cold boot is the same machine");
        assert!(!template.exists(), "the broken template is gone");
        second.vm.kill().unwrap();

        let (third, out) = start(&templates, &machines[2]);
        assert!(third.made_template, "the next start makes it again");
        assert_eq!(third.cold_reason, None);
        assert_eq!(field(&out, "host"), "three");
        third.vm.kill().unwrap();
        for m in &machines {
            m.assert_no_qemu();
        }
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn a_restored_machine_has_its_own_mac_and_network() {
        let dir = tempfile::tempdir().unwrap();
        let templates = Templates::new(dir.path().join("templates")).unwrap();
        let mut machines = Vec::new();
        for (name, mac) in [("neta", "52:54:00:00:00:0a"), ("netb", "52:54:00:00:00:0b")] {
            let ns = aloft_testkit::NetNs::new().unwrap();
            let mut t = TestVm::new(
                name,
                &[
                    "/bin/sh",
                    "-c",
                    &REPORT.replace("exec sleep 1000", "exec httpd -f -p 8080 -h /var/www"),
                ],
            );
            t.spec.net = Some(NetSpec {
                tap: ns.tap.clone(),
                mac: mac.into(),
                netns: Some(ns.path()),
            });
            t.spec.run_config.network = Some(NetConfig {
                addresses: vec![format!("{}/{}", ns.guest_ip, ns.prefix_len).parse().unwrap()],
                gateways: vec![ns.host_ip.into()],
                mtu: None,
            });
            let (started, out) = start(&templates, &t);
            assert_eq!(started.cold_reason, None);
            assert_eq!(field(&out, "mac"), mac);
            let body = ns
                .http_get(
                    std::net::SocketAddr::from((ns.guest_ip, 8080)),
                    Duration::from_secs(30),
                )
                .unwrap_or_else(|e| panic!("no http answer from {name}: {e}"));
            assert!(body.contains("hello from the guest"), "{body}");
            machines.push((t, started, ns));
        }
        assert!(machines[0].1.made_template && !machines[1].1.made_template);
        for (t, started, _ns) in machines {
            started.vm.kill().unwrap();
            t.assert_no_qemu();
        }
    }

    /// How many of `path`'s pages are in the page cache (`mincore` on a read-only mapping).
    #[expect(unsafe_code, reason = "mmap and mincore have no safe std API")]
    fn cached_pages(path: &std::path::Path) -> usize {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        let len = usize::try_from(f.metadata().unwrap().len()).unwrap();
        // SAFETY: a fresh read-only shared mapping of an open file, unmapped below; mincore
        // writes one byte per page into a vector of exactly that many.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED);
            let mut vec = vec![0u8; len.div_ceil(4096)];
            assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
            libc::munmap(map, len);
            vec.iter().filter(|b| **b & 1 == 1).count()
        }
    }

    /// A hash of `path`'s bytes.
    fn file_hash(path: &std::path::Path) -> u64 {
        use std::hash::Hasher;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write(&std::fs::read(path).unwrap());
        h.finish()
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn restored_machines_map_the_template_memory_and_never_change_it() {
        let dir = tempfile::tempdir().unwrap();
        let templates = Templates::new(dir.path().join("templates")).unwrap();
        let first = TestVm::new("first", &["/bin/sh", "-c", REPORT]);
        let (a, _) = start(&templates, &first);
        a.vm.kill().unwrap();
        let ram = the_template(&templates).join("ram");
        let before = file_hash(&ram);

        // Writes and frees 48 MiB: with free page reporting on, the guest would report those
        // pages within seconds, and QEMU 7.2 would punch them out of the template's file.
        let churn = "dd if=/dev/zero of=/dev/shm/x bs=1M count=48 2>/dev/null; rm /dev/shm/x; \
            sleep 4; echo churned; exec sleep 1000";
        let second = TestVm::new(
            "second",
            &[
                "/bin/sh",
                "-c",
                &format!("{}; {churn}", REPORT.replace("; exec sleep 1000", "")),
            ],
        );
        let (started, out) = start_until(&templates, &second, "churned");
        assert_eq!(started.cold_reason, None);
        assert!(out.contains("churned"), "{out}");
        assert_eq!(field(&out, "host"), "second");

        // Its memory is the template's file, privately mapped.
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", started.vm.pid())).unwrap();
        let line = maps
            .lines()
            .find(|l| l.ends_with(ram.to_str().unwrap()))
            .unwrap_or_else(|| panic!("the guest memory is not a mapping of {}: {maps}", ram.display()));
        assert!(
            line.split_whitespace().nth(1).unwrap().ends_with('p'),
            "not private: {line}"
        );
        // Reporting is off in the guest, as the template booted it.
        let param = started
            .vm
            .exec(
                aloft_guest_proto::ExecRequest {
                    argv: vec![
                        "/bin/cat".into(),
                        "/sys/module/page_reporting/parameters/page_reporting_order".into(),
                    ],
                    ..Default::default()
                },
                Duration::from_secs(30),
            )
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&param.stdout).trim(), "11");
        started.vm.kill().unwrap();
        second.assert_no_qemu();
        first.assert_no_qemu();
        // Reading a hole of the template's file caches zeros: the hash above read them all, and
        // the 48 MiB the machine wrote were mostly copies from holes. They are dropped when a
        // machine ends, so what stays cached is at most the template's data (without the drop:
        // every page of the file). The hash below reads the file again: count first.
        use std::os::unix::fs::MetadataExt;
        let data_pages = usize::try_from(std::fs::metadata(&ram).unwrap().blocks() / 8).unwrap();
        let cached = cached_pages(&ram);
        assert!(
            cached <= data_pages,
            "{cached} pages cached, {data_pages} of data"
        );
        assert_eq!(
            file_hash(&ram),
            before,
            "a restored machine changed its template's memory"
        );
    }
}
