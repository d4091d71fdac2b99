//! Boot steps before the workload starts: early mounts, the overlay root and `switch_root`, the
//! new root's mounts, volumes, hostname, `/etc` files, network and user files. Each step returns
//! the message the user sees when it fails.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use aloft_guest_proto::{FileSpec, MountSpec, NetConfig, RootConfig, RunConfig};
use aloft_netlink::Netlink;

use crate::spec;
use crate::sys;

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

fn mount_fs(fstype: &str, target: &str, flags: libc::c_ulong, data: Option<&str>) -> io::Result<()> {
    let _ = fs::create_dir_all(target);
    sys::mount(fstype, target, Some(fstype), flags, data)
}

/// `/proc` only: the probe check needs it and nothing else.
pub(crate) fn mount_proc() -> io::Result<()> {
    mount_fs("proc", "/proc", NOSUID_NODEV_NOEXEC, None)
}

/// `/sys` and devtmpfs on `/dev` (errors ignored: already mounted by the kernel is fine).
pub(crate) fn mount_sys_dev() {
    let _ = mount_fs("sysfs", "/sys", NOSUID_NODEV_NOEXEC, None);
    let _ = mount_fs("devtmpfs", "/dev", libc::MS_NOSUID, Some("mode=0755"));
}

fn is_mountpoint(path: &str) -> bool {
    fs::read_to_string("/proc/self/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(path)))
}

fn wait_for(path: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !Path::new(path).exists() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

const LOWER: &str = "/run/aloft/lower";
const RW: &str = "/run/aloft/rw";
const NEWROOT: &str = "/newroot";

/// Mounts the read-only base and the writable layer, overlays them at `/newroot`, moves `/proc`,
/// `/sys`, `/dev` into it and makes it `/`. Does nothing when there is no root device.
pub(crate) fn switch_root(root: &RootConfig) -> Result<(), String> {
    let Some(device) = &root.device else { return Ok(()) };
    if !wait_for(device, Duration::from_secs(2)) {
        return Err(format!("root device {device} not found"));
    }
    let fstype = root.fstype.as_str();
    if !matches!(fstype, "ext4" | "erofs" | "squashfs") {
        return Err(format!(
            "unsupported root filesystem type {fstype:?} (ext4, erofs or squashfs)"
        ));
    }
    crate::console::trace("root device found");
    let _ = fs::create_dir_all(LOWER);
    sys::mount(device, LOWER, Some(fstype), libc::MS_RDONLY, None)
        .map_err(|e| format!("mount root {device} ({fstype}) read-only: {e}"))?;
    crate::console::trace("lower mounted");
    let _ = fs::create_dir_all(RW);
    match &root.writable_device {
        Some(wdev) => {
            if !wait_for(wdev, Duration::from_secs(2)) {
                return Err(format!("writable device {wdev} not found"));
            }
            sys::mount(wdev, RW, Some("ext4"), 0, None)
                .map_err(|e| format!("mount writable disk {wdev}: {e}"))?;
        }
        None => sys::mount("tmpfs", RW, Some("tmpfs"), 0, Some("mode=0755"))
            .map_err(|e| format!("mount tmpfs for the writable layer: {e}"))?,
    }
    crate::console::trace("rw mounted");
    for d in ["upper", "work"] {
        fs::create_dir_all(format!("{RW}/{d}")).map_err(|e| format!("create {RW}/{d}: {e}"))?;
    }
    crate::console::trace("upper made");
    let _ = fs::create_dir_all(NEWROOT);
    let opts = format!("lowerdir={LOWER},upperdir={RW}/upper,workdir={RW}/work");
    sys::mount("overlay", NEWROOT, Some("overlay"), 0, Some(&opts))
        .map_err(|e| format!("mount overlay root: {e}"))?;
    crate::console::trace("overlay mounted");
    for d in ["/proc", "/sys", "/dev"] {
        let target = format!("{NEWROOT}{d}");
        let _ = fs::create_dir_all(&target);
        sys::mount(d, &target, None, libc::MS_MOVE, None)
            .map_err(|e| format!("move {d} into the new root: {e}"))?;
    }
    std::env::set_current_dir(NEWROOT).map_err(|e| format!("chdir {NEWROOT}: {e}"))?;
    sys::mount(".", "/", None, libc::MS_MOVE, None).map_err(|e| format!("move the new root to /: {e}"))?;
    std::os::unix::fs::chroot(".").map_err(|e| format!("chroot into the new root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// devpts, /dev/shm, /run and cgroup2 in the final root (best effort: an image without a mount
/// point gets one where the root is writable).
pub(crate) fn mount_runtime_fs() {
    if !is_mountpoint("/dev/pts") {
        let _ = mount_fs(
            "devpts",
            "/dev/pts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        );
        if !Path::new("/dev/ptmx").exists() {
            let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
        }
    }
    if !is_mountpoint("/dev/shm") {
        let _ = mount_fs(
            "tmpfs",
            "/dev/shm",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        );
    }
    if !is_mountpoint("/run") {
        let _ = mount_fs(
            "tmpfs",
            "/run",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=0755"),
        );
    }
    if !is_mountpoint("/sys/fs/cgroup") {
        let _ = mount_fs("cgroup2", "/sys/fs/cgroup", NOSUID_NODEV_NOEXEC, None);
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
}

/// The device node (`/dev/vdc`) of the block device whose virtio-blk serial is `serial`, looked
/// up in `sys_block` (`/sys/block`: `<dev>/serial` holds it, NUL-padded to 20 bytes at most).
pub(crate) fn disk_by_serial(sys_block: &Path, serial: &str) -> Option<String> {
    let entries = fs::read_dir(sys_block).ok()?;
    for entry in entries.flatten() {
        let Ok(found) = fs::read(entry.path().join("serial")) else {
            continue;
        };
        let found = String::from_utf8_lossy(&found);
        if found.trim_end_matches(['\0', '\n', ' ']) == serial {
            return entry.file_name().to_str().map(|name| format!("/dev/{name}"));
        }
    }
    None
}

/// The run config's volumes, each mounted read-write at its path in the new root (the mount point
/// made if missing). After the root switch and the runtime mounts, before the files are written
/// (a file may belong on a volume) and before the workload starts.
pub(crate) fn mount_volumes(mounts: &[MountSpec]) -> Result<(), String> {
    for m in mounts {
        let vol = &m.volume;
        if !m.path.starts_with('/') {
            return Err(format!(
                "volume {vol}: mount point {:?} is not an absolute path",
                m.path
            ));
        }
        // The disk was probed before init ran; its node may take a moment to appear.
        let deadline = Instant::now() + Duration::from_secs(2);
        let dev = loop {
            match disk_by_serial(Path::new("/sys/block"), &m.serial) {
                Some(dev) if Path::new(&dev).exists() => break dev,
                _ if Instant::now() >= deadline => {
                    return Err(format!(
                        "volume {vol}: its disk (virtio-blk serial {}) is not attached to this machine",
                        m.serial
                    ));
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        fs::create_dir_all(&m.path)
            .map_err(|e| format!("volume {vol}: create its mount point {}: {e}", m.path))?;
        sys::mount(&dev, &m.path, Some(&m.fstype), 0, None)
            .map_err(|e| format!("volume {vol}: mount {dev} ({}) at {}: {e}", m.fstype, m.path))?;
    }
    Ok(())
}

fn write_file(path: &str, contents: &[u8], mode: u32) -> io::Result<()> {
    if let Some(parent) = Path::new(path).parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(path, contents)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Hostname, `/etc/hosts`, `/etc/resolv.conf`.
pub(crate) fn identity(cfg: &RunConfig) -> Result<(), String> {
    if !cfg.hostname.is_empty() {
        sys::sethostname(&cfg.hostname).map_err(|e| format!("set hostname {:?}: {e}", cfg.hostname))?;
        let _ = write_file("/etc/hostname", format!("{}\n", cfg.hostname).as_bytes(), 0o644);
    }
    write_file("/etc/hosts", spec::hosts_file(cfg).as_bytes(), 0o644)
        .map_err(|e| format!("write /etc/hosts: {e}"))?;
    if let Some(resolv) = spec::resolv_conf(cfg) {
        // The image may ship resolv.conf as a symlink (systemd-resolved); replace it.
        if fs::symlink_metadata("/etc/resolv.conf").is_ok_and(|m| m.file_type().is_symlink()) {
            let _ = fs::remove_file("/etc/resolv.conf");
        }
        write_file("/etc/resolv.conf", resolv.as_bytes(), 0o644)
            .map_err(|e| format!("write /etc/resolv.conf: {e}"))?;
    }
    Ok(())
}

/// Loopback up; eth0 up with its MTU, addresses and default routes.
pub(crate) fn network(net: Option<&NetConfig>) -> Result<(), String> {
    let mut nl = Netlink::open().map_err(|e| error_chain(&e))?;
    nl.set_link_up("lo", true).map_err(|e| error_chain(&e))?;
    let Some(net) = net else { return Ok(()) };
    if !wait_for("/sys/class/net/eth0", Duration::from_secs(2)) {
        return Err("network interface eth0 not found".to_owned());
    }
    if let Some(mtu) = net.mtu {
        nl.set_mtu("eth0", mtu).map_err(|e| error_chain(&e))?;
    }
    nl.set_link_up("eth0", true).map_err(|e| error_chain(&e))?;
    for a in &net.addresses {
        nl.add_address("eth0", a.addr, a.prefix_len)
            .map_err(|e| error_chain(&e))?;
    }
    for gw in &net.gateways {
        nl.add_default_route("eth0", *gw).map_err(|e| error_chain(&e))?;
    }
    Ok(())
}

/// The run config's `files`.
pub(crate) fn write_files(files: &[FileSpec]) -> Result<(), String> {
    for f in files {
        write_file(&f.guest_path, &f.contents, f.mode.unwrap_or(0o644))
            .map_err(|e| format!("write file {}: {e}", f.guest_path))?;
    }
    Ok(())
}

/// `error: cause: cause` on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn disks_are_found_by_their_serial() {
        let dir = tempfile::tempdir().unwrap();
        let block = dir.path();
        for (dev, serial) in [
            ("vda", &b"aloft-d0"[..]),
            ("vdb", b"aloft-d1\0\0\0\0\0\0\0\0\0\0\0\0"),
            ("vdc", b"aloft-d2"),
            ("vdd", b"aloft-d22"),
        ] {
            fs::create_dir_all(block.join(dev)).unwrap();
            fs::write(block.join(dev).join("serial"), serial).unwrap();
        }
        // A device without a serial file (loop devices, …) is skipped.
        fs::create_dir_all(block.join("loop0")).unwrap();
        assert_eq!(disk_by_serial(block, "aloft-d2").as_deref(), Some("/dev/vdc"));
        assert_eq!(disk_by_serial(block, "aloft-d1").as_deref(), Some("/dev/vdb"));
        assert_eq!(disk_by_serial(block, "aloft-d22").as_deref(), Some("/dev/vdd"));
        assert_eq!(disk_by_serial(block, "aloft-d3"), None);
        assert_eq!(disk_by_serial(&block.join("nope"), "aloft-d0"), None);
    }

    #[test]
    fn a_volume_that_is_not_attached_is_named_in_the_error() {
        let m = MountSpec {
            volume: "vol_x".into(),
            serial: "aloft-d-not-attached-anywhere".into(),
            path: "/data".into(),
            fstype: "ext4".into(),
        };
        let e = mount_volumes(&[MountSpec {
            path: "data".into(),
            ..m.clone()
        }])
        .unwrap_err();
        assert!(e.contains("vol_x") && e.contains("not an absolute path"), "{e}");
        let e = mount_volumes(&[m]).unwrap_err();
        assert!(
            e.contains("volume vol_x: its disk") && e.contains("not attached"),
            "{e}"
        );
    }
}
