//! End to end from an image to a running guest: push a busybox image to the test registry, pull
//! it, build its read-only base rootfs, clone a writable disk, boot it and run a command whose
//! output could only come from that root filesystem; then reset the writable disk.

mod common;

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use aloft_guest_proto::{RootConfig, RunConfig};
    use aloft_image::unpack::UnpackLimits;
    use aloft_image::{Digest, Progress, Puller, Reference, RootfsFormat, RootfsStore, WritableDisks};
    use aloft_testkit::Registry;
    use aloft_vm::{AccelChoice, DiskSpec, Vm, VmSpec};

    use crate::common::{BOOT_TIMEOUT, collect_stdout, initrd, kernel};

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn pulled_busybox_image_boots_from_its_base_rootfs() {
        let registry = Registry::start().unwrap();
        let config = registry.client_config();
        let pushed = registry.push_busybox().unwrap();
        let target = Reference::parse(&format!("{}/busybox:latest", registry.host())).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();

        let dir = tempfile::Builder::new()
            .prefix("aloft-image-boot-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let cache = dir.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        let pulled = rt
            .block_on(
                Puller::new(&cache, config)
                    .unwrap()
                    .pull(&target, &Progress::none()),
            )
            .unwrap();
        assert_eq!(pulled.digest, pushed.digest);
        let store = RootfsStore::open(&cache, RootfsFormat::default(), UnpackLimits::default()).unwrap();
        let (base, _) = store.build(&pulled).unwrap();
        let disks = WritableDisks::open(&cache).unwrap();
        let rw = dir.path().join("rw.img");
        disks.create(&rw, 64).unwrap();

        // The image's busybox is the host's busybox-static; the initramfs holds only aloft-init, so
        // a shell that runs and hashes to it came from the base.
        let host_busybox = Digest::of(&std::fs::read("/bin/busybox").unwrap());
        let script = "sha256sum /bin/busybox; grep -c '^root:' /etc/passwd; \
                      echo written > /root/marker && cat /root/marker; \
                      grep ' / ' /proc/mounts | cut -d' ' -f3";
        let spec = VmSpec {
            name: format!("image-boot-{}", std::process::id()),
            disks: vec![DiskSpec::raw(&base.path, true), DiskSpec::raw(&rw, false)],
            run_config: RunConfig {
                hostname: "image-boot".into(),
                image: aloft_image::guest_image_config(&pulled.config).image,
                exec: Some(vec!["/bin/sh".into(), "-c".into(), script.into()]),
                root: RootConfig {
                    device: Some("/dev/vda".into()),
                    fstype: base.format.fstype().into(),
                    writable_device: Some("/dev/vdb".into()),
                },
                ..RunConfig::default()
            },
            accel: AccelChoice::Auto,
            ..VmSpec::new("image-boot", kernel(), initrd(), dir.path().join("run"))
        };
        let vm = Vm::start(spec).unwrap();
        let logs = vm.logs();
        let exit = vm.wait_exit(BOOT_TIMEOUT);
        let _ = vm.kill();
        let exit = exit.unwrap();
        let out = collect_stdout(&logs, Duration::from_secs(1));
        assert_eq!(exit.workload.and_then(|w| w.exit_code), Some(0), "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                format!("{}  /bin/busybox", host_busybox.hex()).as_str(),
                "1",
                "written",
                "overlay",
            ],
            "{out}"
        );

        // Reset on stop: the writable layer is a fresh empty filesystem again.
        disks.reset(&rw, 64).unwrap();
        let check = std::process::Command::new("debugfs")
            .args(["-R", "ls -l /"])
            .arg(&rw)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&check.stdout);
        assert!(
            listing.contains("lost+found") && !listing.contains("upper"),
            "{listing}"
        );
    }
}
