//! Real-VM tests of bad input: each fails with a clear error and leaves no QEMU behind.

mod common;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use aloft_vm::{JailSpec, Vm, VmError};

    use crate::common::{BOOT_TIMEOUT, TestVm};

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn missing_kernel() {
        let mut t = TestVm::new("nokernel", &["/bin/true"]);
        t.spec.kernel = "/nonexistent/vmlinux".into();
        let e = Vm::start(t.spec.clone()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kernel not found: /nonexistent/vmlinux: run scripts/setup.sh"
        );
        t.assert_no_qemu();
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn missing_rootfs_disk() {
        let mut t = TestVm::new("nodisk", &["/bin/true"]);
        t.spec.disks[0].path = "/nonexistent/rootfs.ext4".into();
        let e = Vm::start(t.spec.clone()).unwrap_err();
        assert_eq!(e.to_string(), "disk not found: /nonexistent/rootfs.ext4");
        t.assert_no_qemu();
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn memory_too_small() {
        let mut t = TestVm::new("smallmem", &["/bin/true"]);
        t.spec.memory_mib = 16;
        let e = Vm::start(t.spec.clone()).unwrap_err();
        assert!(matches!(e, VmError::MemoryTooSmall { .. }), "{e}");
        assert!(e.to_string().contains("at least 64 MiB"), "{e}");
        t.assert_no_qemu();
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn jail_user_missing() {
        let mut t = TestVm::new("nouser", &["/bin/true"]);
        t.spec.jail = Some(JailSpec {
            user: "aloft-no-such-user".into(),
            cgroup_parent: "aloft-test".into(),
        });
        let e = Vm::start(t.spec.clone()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "jail user aloft-no-such-user does not exist: run scripts/setup.sh"
        );
        t.assert_no_qemu();
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn missing_tap_is_a_launch_error_with_qemu_stderr() {
        let mut t = TestVm::new("notap", &["/bin/true"]);
        t.spec.net = Some(aloft_vm::NetSpec {
            tap: "aloftnotap0".into(),
            mac: "52:54:00:00:00:01".into(),
            netns: None,
        });
        // QEMU creates a missing tap when run as root; make it fail by using a bogus disk format.
        t.spec.disks[0].format = aloft_vm::DiskFormat::Qcow2;
        let e = Vm::start(t.spec.clone()).unwrap_err();
        assert!(matches!(e, VmError::Launch { .. }), "{e}");
        assert!(e.to_string().contains("qcow2"), "{e}");
        t.assert_no_qemu();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", "aloftnotap0"])
            .output();
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn nonexistent_command() {
        let t = TestVm::new("nocmd", &["/app/x"]);
        let vm = t.start();
        let e = vm.wait_started(BOOT_TIMEOUT).unwrap_err();
        assert!(
            matches!(&e, VmError::WorkloadFailed { message } if message == "executable not found: /app/x"),
            "{e}"
        );
        let exit = vm.wait_exit(BOOT_TIMEOUT).unwrap();
        assert_eq!(exit.failed.as_deref(), Some("executable not found: /app/x"));
        t.assert_no_qemu();
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn unknown_user() {
        let mut t = TestVm::new("nouid", &["/bin/true"]);
        t.spec.run_config.user = Some("ghost".into());
        let vm = t.start();
        let e = vm.wait_started(BOOT_TIMEOUT).unwrap_err();
        assert!(
            matches!(&e, VmError::WorkloadFailed { message } if message.contains("ghost")),
            "{e}"
        );
        vm.wait_exit(BOOT_TIMEOUT).unwrap();
        t.assert_no_qemu();
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn exit_survives_the_host_being_away() {
        // The host drops its handle before the workload runs; the exit comes from the console log.
        let t = TestVm::new("away", &["/bin/sh", "-c", "exit 7"]);
        let vm = t.start();
        let qemu = vm.pid();
        drop(vm);
        let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
        while std::path::Path::new(&format!("/proc/{qemu}/exe")).exists() {
            assert!(std::time::Instant::now() < deadline, "vm did not exit");
            std::thread::sleep(Duration::from_millis(100));
        }
        let exit = Vm::attach(&t.run_dir())
            .unwrap()
            .wait_exit(Duration::ZERO)
            .unwrap();
        assert_eq!(
            exit.workload.unwrap().exit_code,
            Some(7),
            "from channel or console"
        );
        t.assert_no_qemu();
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn kernel_panic_during_boot_is_reported_with_console_lines() {
        let mut t = TestVm::new("panic", &["/bin/true"]);
        t.spec.cmdline_extra = vec!["rdinit=/nonexistent".into()];
        let vm = t.start();
        let e = vm.wait_started(BOOT_TIMEOUT).unwrap_err();
        assert!(matches!(e, VmError::GuestBootFailed { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.starts_with("guest kernel failed to boot: "), "{msg}");
        assert!(msg.contains("Kernel panic"), "{msg}");
        t.assert_no_qemu();
    }
}
