//! The QEMU command line, as a pure function of the spec and the accelerator.
//!
//! QEMU 7.2 quirks that shaped it (measured on the dev machines):
//! * `-daemonize` is not used: with `-sandbox …,spawn=deny` the daemonizing fork happens after the
//!   seccomp filter is installed and QEMU dies with SIGSYS. The driver detaches QEMU itself (own
//!   session, stdio to `qemu.log`).
//! * `elevateprivileges=deny` (and `=children`) kill QEMU when `-runas` drops to the jail user, for the
//!   same reason. After `-runas` QEMU has no way back to root anyway, and `spawn=deny` stops it from
//!   executing set-uid programs, so leaving it at its default loses nothing.

use std::path::Path;

use crate::spec::{Accel, RunPaths, VmSpec};

/// The QEMU binary's name: Debian's on `PATH`, or aloft's own build of the same name beside the
/// guest kernel ([`crate::default_qemu`]).
pub const QEMU: &str = "qemu-system-x86_64";

/// Kernel arguments always given.
const BASE_CMDLINE: &str = "console=ttyS0 quiet pci=off reboot=k panic=-1";

/// TSC rate assumed when the host's cannot be read.
const DEFAULT_TSC_KHZ: u64 = 2_000_000;

/// Needed on `microvm` under TCG: without them the boot hangs in TSC calibration. TCG's `rdtsc`
/// returns the host's TSC, so the rate given must be the host's, or the guest clock drifts (with
/// 2 GHz on a 2.45 GHz host the guest's seconds were 18 % short).
fn tcg_cmdline(tsc_khz: u64) -> String {
    format!("tsc_early_khz={tsc_khz} tsc=reliable")
}

/// Pure: the TSC rate in kHz from `/proc/cpuinfo` text (x86 reports the TSC rate as `cpu MHz` on
/// hosts without frequency scaling, which is what VM hosts are).
pub(crate) fn parse_cpu_khz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    if !(100.0..100_000.0).contains(&mhz) {
        return None;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "range checked above"
    )]
    Some((mhz * 1000.0).round() as u64)
}

/// The host's TSC rate in kHz (for TCG guests).
pub(crate) fn host_tsc_khz() -> u64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| parse_cpu_khz(&s))
        .unwrap_or(DEFAULT_TSC_KHZ)
}

/// How QEMU starts its guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Boot {
    /// A cold boot.
    Cold,
    /// Wait for a migration stream (`-incoming defer`, then QMP `migrate-incoming`).
    Incoming,
}

/// Guest memory backed by a file instead of anonymous memory (boot templates).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct RamFile {
    /// The file (QEMU opens it by path, as root, before it drops privileges).
    pub(crate) path: std::path::PathBuf,
    /// `true`: the guest writes the file (a template being made); `false`: the guest's writes
    /// stay private to its QEMU (copy on write) and the file is only read.
    pub(crate) shared: bool,
}

/// The id of the machine's RAM backend: QEMU's own name for microvm's RAM, so snapshots taken
/// with a file-backed RAM and with the default one name the same RAM block.
pub(crate) const RAM_ID: &str = "microvm.ram";

/// QEMU's option syntax splits on commas; a literal comma is written twice.
fn esc(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// The kernel command line for `spec`.
pub(crate) fn kernel_cmdline(spec: &VmSpec, accel: Accel, tsc_khz: u64) -> String {
    let mut parts = vec![BASE_CMDLINE.to_owned()];
    if accel == Accel::Tcg {
        parts.push(tcg_cmdline(tsc_khz));
    }
    if spec.free_page_reporting {
        parts.push(format!(
            "page_reporting.page_reporting_order={PAGE_REPORTING_ORDER}"
        ));
    }
    parts.extend(spec.cmdline_extra.iter().cloned());
    parts.join(" ")
}

/// The size, as a power of two of 4 KiB pages, of the free blocks a guest with
/// [`VmSpec::free_page_reporting`] reports to the host: 5 is 128 KiB. Linux's default is its
/// pageblock order (4 MiB in our kernel), and it reports only while a zone has 32 such blocks free
/// above its low watermark, which a 128 MiB guest never has; at 128 KiB it needs 4 MiB. Smaller
/// blocks would hand back more of a fragmented guest's memory for more reports (each one a
/// virtqueue round trip and an `madvise` in QEMU). Our kernel honours the command line's value
/// (`kernel/patches/0002-…`).
pub const PAGE_REPORTING_ORDER: u32 = 5;

/// A free page reporting order beyond the largest free block of our kernel (6.1's `MAX_ORDER` is
/// 11: blocks of up to 2^10 pages): a guest booted with it reports nothing. Boot templates boot so
/// (see [`crate::template`]; it needs `kernel/patches/0002-…`, which keeps a command-line value
/// this large instead of replacing it with the driver's).
pub(crate) const PAGE_REPORTING_OFF: u32 = 11;

/// TCG's translated-code cache in MiB. QEMU's default (1 GiB) would be host memory a machine keeps
/// for good once touched; a guest kernel's boot and an idle workload fit in far less, and boot time
/// was the same from 16 to 256 MiB (`cargo xtask bench boot`). Workloads with more hot code than this
/// are retranslated more often under TCG; KVM hosts do not have the cache at all.
pub(crate) const TCG_TB_SIZE_MIB: u64 = 16;

/// Accelerator and CPU arguments.
pub(crate) fn accel_args(accel: Accel) -> [&'static str; 4] {
    match accel {
        Accel::Tcg => ["-accel", "tcg,tb-size=16", "-cpu", "max"],
        Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
    }
}

/// The virtio-blk serial of the disk at `index` in [`VmSpec::disks`]: `aloft-d<index>`. The
/// guest reads it from `/sys/block/<dev>/serial`, so it can find a disk by its place in the spec
/// whatever name (`vda`, `vdb`, …) its kernel gave it (`aloft-init` finds volumes so). Part of the
/// device's configuration on the command line, so a resumed snapshot keeps it.
pub fn disk_serial(index: usize) -> String {
    format!("aloft-d{index}")
}

/// Descriptors of one disk opened by the driver (jailed VMs): QEMU gets them as an fd set and
/// never opens the image by path. A writable disk needs both: after an incoming migration QEMU
/// reopens its images when the VM is activated, by then as the jail user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DiskFds {
    pub(crate) read_only: i32,
    pub(crate) read_write: Option<i32>,
}

/// The full argv (program first) for `spec`; `tsc_khz` is the host's TSC rate (used under TCG, see
/// [`host_tsc_khz`]). An incoming (resume) boot appends to the console log of the earlier run.
/// `disk_fds` is empty (QEMU opens disks by path) or has one entry per disk.
pub(crate) fn qemu_argv(
    spec: &VmSpec,
    accel: Accel,
    boot: Boot,
    tsc_khz: u64,
    disk_fds: &[DiskFds],
    ram: Option<&RamFile>,
) -> Vec<String> {
    let paths = RunPaths::new(&spec.run_dir);
    let machine = match ram {
        Some(_) => format!("microvm,memory-backend={RAM_ID}"),
        None => "microvm".to_owned(),
    };
    let mut a: Vec<String> = vec![spec.qemu.to_string_lossy().into_owned(), "-M".into(), machine];
    if let Some(r) = ram {
        a.push("-object".into());
        a.push(format!(
            "memory-backend-file,id={RAM_ID},size={}M,mem-path={},share={}",
            spec.memory_mib,
            esc(&r.path),
            if r.shared { "on" } else { "off" }
        ));
    }
    a.extend(accel_args(accel).iter().map(|s| (*s).to_owned()));
    let push = |a: &mut Vec<String>, items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
    push(
        &mut a,
        &[
            "-m",
            &spec.memory_mib.to_string(),
            "-smp",
            &spec.vcpus.to_string(),
        ],
    );
    push(
        &mut a,
        &[
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-display",
            "none",
            "-no-reboot",
        ],
    );
    push(&mut a, &["-kernel", &spec.kernel.to_string_lossy()]);
    push(&mut a, &["-initrd", &paths.initrd().to_string_lossy()]);
    push(&mut a, &["-append", &kernel_cmdline(spec, accel, tsc_khz)]);
    let append = if boot == Boot::Incoming { "on" } else { "off" };
    push(
        &mut a,
        &[
            "-chardev",
            &format!("file,id=con0,path={},append={append}", esc(&paths.console())),
            "-serial",
            "chardev:con0",
        ],
    );
    for (i, d) in spec.disks.iter().enumerate() {
        let ro = if d.read_only { ",readonly=on" } else { "" };
        let file = match disk_fds.get(i) {
            Some(fds) => {
                let set = i + 1;
                let path = esc(&d.path);
                push(
                    &mut a,
                    &[
                        "-add-fd",
                        &format!("fd={},set={set},opaque=rdonly:{path}", fds.read_only),
                    ],
                );
                if let Some(rw) = fds.read_write {
                    push(
                        &mut a,
                        &["-add-fd", &format!("fd={rw},set={set},opaque=rdwr:{path}")],
                    );
                }
                format!("/dev/fdset/{set}")
            }
            None => esc(&d.path),
        };
        push(
            &mut a,
            &[
                "-drive",
                &format!("id=d{i},file={file},format={},if=none{ro}", d.format.as_str()),
                "-device",
                &format!("virtio-blk-device,drive=d{i},serial={}", disk_serial(i)),
            ],
        );
    }
    if let Some(net) = &spec.net {
        push(
            &mut a,
            &[
                "-netdev",
                &format!("tap,id=n0,ifname={},script=no,downscript=no,vhost=off", net.tap),
                "-device",
                &format!("virtio-net-device,netdev=n0,mac={}", net.mac),
            ],
        );
    }
    push(
        &mut a,
        &[
            "-device",
            // Port 0 is reserved for a console; ours is port 1. The default of 31 ports makes the
            // guest set up 64 virtqueues it never uses.
            "virtio-serial-device,max_ports=2",
            "-chardev",
            &format!("socket,id=ch0,path={},server=on,wait=off", esc(&paths.channel())),
            "-device",
            &format!(
                "virtserialport,chardev=ch0,name={}",
                aloft_guest_proto::CHANNEL_NAME
            ),
        ],
    );
    push(
        &mut a,
        &[
            "-chardev",
            &format!("socket,id=qmp,path={},server=on,wait=off", esc(&paths.qmp())),
            "-mon",
            "chardev=qmp,mode=control",
        ],
    );
    if spec.free_page_reporting {
        push(
            &mut a,
            &["-device", "virtio-balloon-device,free-page-reporting=on"],
        );
    }
    push(&mut a, &["-pidfile", &paths.pidfile().to_string_lossy()]);
    if let Some(jail) = &spec.jail {
        push(
            &mut a,
            &[
                "-runas",
                &jail.user,
                "-sandbox",
                "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
            ],
        );
    }
    if boot == Boot::Incoming {
        push(&mut a, &["-incoming", "defer"]);
    }
    a
}

/// The argv of the accelerator probe: `qemu` boots `kernel` + `initrd` with
/// [`aloft_guest_proto::PROBE_CMDLINE_FLAG`], console on stdout.
pub(crate) fn probe_argv(
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    accel: Accel,
    tsc_khz: u64,
) -> Vec<String> {
    let mut a: Vec<String> = vec![qemu.to_string_lossy().into_owned(), "-M".into(), "microvm".into()];
    a.extend(accel_args(accel).iter().map(|s| (*s).to_owned()));
    let mut cmdline = format!("{BASE_CMDLINE} {}", aloft_guest_proto::PROBE_CMDLINE_FLAG);
    if accel == Accel::Tcg {
        cmdline = format!("{cmdline} {}", tcg_cmdline(tsc_khz));
    }
    for s in [
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        &kernel.to_string_lossy(),
        "-initrd",
        &initrd.to_string_lossy(),
        "-append",
        &cmdline,
    ] {
        a.push(s.to_owned());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskSpec, JailSpec, NetSpec};

    fn spec() -> VmSpec {
        VmSpec::new(
            "m1",
            "/g/vmlinux".into(),
            "/g/initramfs.cpio".into(),
            "/run/aloft/m1".into(),
        )
    }

    fn joined(a: &[String]) -> String {
        a.join(" ")
    }

    fn pair(a: &[String], flag: &str) -> Vec<String> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }

    #[test]
    fn the_spec_names_the_qemu_binary() {
        let mut s = spec();
        s.qemu = "/opt/aloft/guest/qemu-system-x86_64".into();
        let a = qemu_argv(&s, Accel::Tcg, Boot::Incoming, 2_000_000, &[], None);
        assert_eq!(a[0], "/opt/aloft/guest/qemu-system-x86_64");
    }

    #[test]
    fn tb_size_matches_its_constant() {
        assert_eq!(
            accel_args(Accel::Tcg)[1],
            format!("tcg,tb-size={TCG_TB_SIZE_MIB}")
        );
    }

    #[test]
    fn tcg_minimal() {
        let a = qemu_argv(&spec(), Accel::Tcg, Boot::Cold, 2_445_404, &[], None);
        assert_eq!(a[0], "qemu-system-x86_64");
        let j = joined(&a);
        assert!(j.starts_with("qemu-system-x86_64 -M microvm -accel tcg,tb-size=16 -cpu max -m 256 -smp 1"));
        assert_eq!(
            pair(&a, "-append"),
            [
                "console=ttyS0 quiet pci=off reboot=k panic=-1 tsc_early_khz=2445404 tsc=reliable \
              page_reporting.page_reporting_order=5"
            ]
        );
        assert_eq!(pair(&a, "-kernel"), ["/g/vmlinux"]);
        assert_eq!(
            pair(&a, "-initrd"),
            ["/run/aloft/m1/initrd.cpio"],
            "the composed initrd, not the base"
        );
        assert!(j.contains(
            "-chardev file,id=con0,path=/run/aloft/m1/console.log,append=off -serial chardev:con0"
        ));
        assert!(j.contains(
            "-device virtio-serial-device,max_ports=2 -chardev socket,id=ch0,path=/run/aloft/m1/channel.sock,server=on,wait=off \
             -device virtserialport,chardev=ch0,name=aloft.0"
        ));
        assert!(j.contains("-chardev socket,id=qmp,path=/run/aloft/m1/qmp.sock,server=on,wait=off -mon chardev=qmp,mode=control"));
        assert!(j.contains("-no-reboot"));
        assert_eq!(pair(&a, "-pidfile"), ["/run/aloft/m1/qemu.pid"]);
        for absent in [
            "-daemonize",
            "-runas",
            "-sandbox",
            "-incoming",
            "-drive",
            "-netdev",
        ] {
            assert!(!a.iter().any(|x| x == absent), "{absent} in {j}");
        }
    }

    #[test]
    fn kvm_has_no_tsc_flags() {
        let mut s = spec();
        s.cmdline_extra = vec!["loglevel=3".into()];
        s.vcpus = 2;
        s.memory_mib = 512;
        let a = qemu_argv(&s, Accel::Kvm, Boot::Cold, 2_445_404, &[], None);
        let j = joined(&a);
        assert!(j.starts_with("qemu-system-x86_64 -M microvm -accel kvm -cpu host -m 512 -smp 2"));
        assert_eq!(
            pair(&a, "-append"),
            [
                "console=ttyS0 quiet pci=off reboot=k panic=-1 page_reporting.page_reporting_order=5 loglevel=3"
            ]
        );
    }

    #[test]
    fn file_backed_ram_names_the_default_ram_block() {
        let mut s = spec();
        s.memory_mib = 256;
        let ram = |shared| RamFile {
            path: std::path::PathBuf::from("/t/a,b/ram"),
            shared,
        };
        for (shared, mode) in [(true, "on"), (false, "off")] {
            let a = qemu_argv(&s, Accel::Tcg, Boot::Incoming, 1, &[], Some(&ram(shared)));
            assert_eq!(pair(&a, "-M"), ["microvm,memory-backend=microvm.ram"]);
            assert_eq!(
                pair(&a, "-object"),
                [format!(
                    "memory-backend-file,id=microvm.ram,size=256M,mem-path=/t/a,,b/ram,share={mode}"
                )]
            );
            // `-m` stays: QEMU checks it against the backend's size.
            assert_eq!(pair(&a, "-m"), ["256"]);
        }
        let a = qemu_argv(&s, Accel::Tcg, Boot::Incoming, 1, &[], None);
        assert_eq!(pair(&a, "-M"), ["microvm"]);
        assert!(pair(&a, "-object").is_empty());
    }

    #[test]
    fn free_page_reporting_is_a_balloon_and_an_order_together() {
        let on = qemu_argv(&spec(), Accel::Kvm, Boot::Cold, 2_445_404, &[], None);
        assert!(
            pair(&on, "-device").contains(&"virtio-balloon-device,free-page-reporting=on".to_owned()),
            "{on:?}"
        );
        assert!(pair(&on, "-append")[0].contains(&format!(
            "page_reporting.page_reporting_order={PAGE_REPORTING_ORDER}"
        )));

        let mut s = spec();
        s.free_page_reporting = false;
        let off = qemu_argv(&s, Accel::Kvm, Boot::Incoming, 2_445_404, &[], None);
        assert!(!joined(&off).contains("balloon"), "{off:?}");
        assert!(!joined(&off).contains("page_reporting"), "{off:?}");
    }

    #[test]
    fn a_spec_recorded_before_free_page_reporting_resumes_without_it() {
        // A suspended VM's device model must match its snapshot: specs written before the field
        // existed had no balloon.
        let mut v = serde_json::to_value(spec()).unwrap();
        v.as_object_mut().unwrap().remove("free_page_reporting");
        let old: VmSpec = serde_json::from_value(v).unwrap();
        assert!(!old.free_page_reporting);
        assert!(!joined(&qemu_argv(&old, Accel::Tcg, Boot::Incoming, 1, &[], None)).contains("balloon"));
    }

    #[test]
    fn disks_in_order_with_readonly_and_escaped_commas() {
        let mut s = spec();
        s.disks = vec![
            DiskSpec::raw("/img/base.ext4", true),
            DiskSpec {
                path: "/img/a,b.qcow2".into(),
                read_only: false,
                format: crate::DiskFormat::Qcow2,
            },
        ];
        let a = qemu_argv(&s, Accel::Tcg, Boot::Cold, 2_000_000, &[], None);
        assert_eq!(
            pair(&a, "-drive"),
            [
                "id=d0,file=/img/base.ext4,format=raw,if=none,readonly=on",
                "id=d1,file=/img/a,,b.qcow2,format=qcow2,if=none"
            ]
        );
        assert_eq!(
            pair(&a, "-device")[..2],
            [
                "virtio-blk-device,drive=d0,serial=aloft-d0",
                "virtio-blk-device,drive=d1,serial=aloft-d1"
            ]
        );
        // virtio-blk keeps 20 bytes of a serial: far more disks than a VM can have still fit.
        assert_eq!(disk_serial(99_999_999_999), "aloft-d99999999999");
        assert!(disk_serial(99_999_999_999).len() <= 20);
    }

    #[test]
    fn net_and_jail_and_incoming() {
        let mut s = spec();
        s.net = Some(NetSpec {
            tap: "tap-m1".into(),
            mac: "52:54:00:12:34:56".into(),
            netns: None,
        });
        s.jail = Some(JailSpec {
            user: "aloft-vm".into(),
            cgroup_parent: "aloft".into(),
        });
        let a = qemu_argv(&s, Accel::Tcg, Boot::Incoming, 2_000_000, &[], None);
        assert_eq!(
            pair(&a, "-netdev"),
            ["tap,id=n0,ifname=tap-m1,script=no,downscript=no,vhost=off"]
        );
        assert!(
            pair(&a, "-device").contains(&"virtio-net-device,netdev=n0,mac=52:54:00:12:34:56".to_owned())
        );
        assert_eq!(pair(&a, "-runas"), ["aloft-vm"]);
        assert_eq!(
            pair(&a, "-sandbox"),
            ["on,obsolete=deny,spawn=deny,resourcecontrol=deny"]
        );
        assert_eq!(pair(&a, "-incoming"), ["defer"]);
        assert!(
            joined(&a).contains("console.log,append=on"),
            "resume keeps the console log"
        );
    }

    #[test]
    fn jailed_disks_are_fd_sets() {
        let mut s = spec();
        s.disks = vec![
            DiskSpec::raw("/img/base.ext4", true),
            DiskSpec::raw("/img/rw.img", false),
        ];
        let fds = [
            DiskFds {
                read_only: 7,
                read_write: None,
            },
            DiskFds {
                read_only: 8,
                read_write: Some(9),
            },
        ];
        let a = qemu_argv(&s, Accel::Tcg, Boot::Cold, 2_000_000, &fds, None);
        assert_eq!(
            pair(&a, "-add-fd"),
            [
                "fd=7,set=1,opaque=rdonly:/img/base.ext4",
                "fd=8,set=2,opaque=rdonly:/img/rw.img",
                "fd=9,set=2,opaque=rdwr:/img/rw.img"
            ]
        );
        assert_eq!(
            pair(&a, "-drive"),
            [
                "id=d0,file=/dev/fdset/1,format=raw,if=none,readonly=on",
                "id=d1,file=/dev/fdset/2,format=raw,if=none"
            ]
        );
    }

    #[test]
    fn tsc_rate_comes_from_cpuinfo() {
        let info = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2445.404\ncache size\t: 512 KB\n";
        assert_eq!(parse_cpu_khz(info), Some(2_445_404));
        assert_eq!(parse_cpu_khz("cpu MHz : nonsense"), None);
        assert_eq!(parse_cpu_khz("cpu MHz : 0.001"), None);
        assert_eq!(parse_cpu_khz(""), None);
    }

    #[test]
    fn probe_boots_with_the_probe_flag() {
        let a = probe_argv(
            Path::new("/q/qemu"),
            Path::new("/k"),
            Path::new("/i"),
            Accel::Kvm,
            2_000_000,
        );
        assert_eq!(a[0], "/q/qemu");
        let j = joined(&a);
        assert!(j.contains("-accel kvm -cpu host"));
        assert!(j.contains("aloft.probe=1"));
        assert!(j.contains("-serial stdio"));
    }
}
