//! `cargo xtask bench boot`: how fast a machine starts, answers, resumes, and what it costs idle.
//!
//! Baseline in the same run: plain QEMU booting our kernel and base initramfs to init's first console
//! line (`raw_qemu_boot_ms`), so the noise of a shared machine cancels out of what aloft adds
//! (`machine_start_ms - raw_qemu_boot_ms`).
//!
//! `resume_ms` is suspended → the port *answers* again: the first byte of the guest server's
//! answer to a request sent as soon as the port accepts, which is what a user (and a wake through
//! the edge, `bench proxy`'s `wake_ms`) waits for. The port accepting alone (the guest kernel's
//! SYN-ACK, no workload code run) is the detail `resume_accept_ms`.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aloft_guest_proto::{
    CONSOLE_HELLO, NetConfig, PROBE_CMDLINE_FLAG, RootConfig, RunConfig, TRACE_CMDLINE_FLAG,
};
use aloft_image::RootfsFormat;
use aloft_testkit::{GuestArtifacts, NetNs};
use aloft_vm::{AccelChoice, DiskFormat, DiskSpec, JailSpec, NetSpec, Templates, Vm, VmSpec, accel::Accel};
use anyhow::{Context, bail};

use crate::stats::{median, min};

const MEMORY_MIB: u32 = 128;
const PORT: u16 = 8080;
/// `--jail`: the user QEMU drops to (`scripts/setup.sh` creates it, aloftd's default).
const BENCH_JAIL_USER: &str = "aloft-vm";
/// `--jail`: the machines' cgroups go below this one (removed at the end).
const BENCH_CGROUP_PARENT: &str = "aloft-bench";

/// How the benchmark's machines are made, beyond their memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Knobs {
    /// Boot with `aloft.trace=1` and keep init's step timings.
    pub(crate) trace: bool,
    /// [`VmSpec::free_page_reporting`] (on in aloft; off to measure what it saves).
    pub(crate) page_reporting: bool,
    /// Jail the machines as `aloftd` does (QEMU as `aloft-vm` under `-sandbox`, in a cgroup of
    /// its own below `aloft-bench`), to measure what the jail costs.
    pub(crate) jail: bool,
    /// How long a machine stays suspended before its resume is timed. Zero in bench boot;
    /// bench proxy suspends as long before each resume as before each wake, so that the two
    /// compare the same thing (memory freed seconds ago is colder on some hosts).
    pub(crate) suspended_for: Duration,
    /// Right before the timed resume, hand the host's freshly freed memory back warm
    /// ([`crate::hostmem::warm`]). Off in bench boot (its resume comes right after the suspend,
    /// on memory the suspend just freed); bench proxy warms before each wake and each resume alike.
    pub(crate) warm_host_memory: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            trace: false,
            page_reporting: true,
            jail: false,
            suspended_for: Duration::ZERO,
            warm_host_memory: false,
        }
    }
}

/// How a benchmark machine is started.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Via<'a> {
    /// [`Vm::start`]: the kernel boots (a shape's first machine without templates).
    Cold,
    /// [`Templates::start`]: restored from its shape's boot template, made first if missing
    /// (what aloft's agent does).
    Template(&'a Templates),
}

pub(crate) fn run(runs: usize, knobs: Knobs, format: RootfsFormat) -> anyhow::Result<()> {
    let runs = runs.max(1);
    let guest = aloft_testkit::guest_artifacts()?;
    let accel = aloft_vm::accel::probe(&guest.kernel, &guest.initrd);
    let cache = aloft_testkit::cache_dir();
    let rootfs = match format {
        RootfsFormat::Ext4 => aloft_testkit::busybox_rootfs(&cache)?,
        RootfsFormat::Erofs => aloft_testkit::busybox_erofs(&cache)?,
        RootfsFormat::ErofsLz4 => bail!("bench boot: --format ext4 or erofs"),
    };
    let fstype = format.fstype();
    eprintln!(
        "bench boot: accelerator {accel:?}, QEMU {}, {runs} runs, {MEMORY_MIB} MiB, 1 vCPU, busybox base as {fstype}, free page reporting {}{}",
        aloft_vm::default_qemu(&guest.kernel).display(),
        if knobs.page_reporting { "on" } else { "off" },
        if knobs.jail { ", jailed" } else { "" }
    );
    let work = tempfile::Builder::new().prefix("aloft-bench-").tempdir()?;
    // `--jail`: the machines' cgroups go below this parent, removed when the run ends, failed or not.
    let _cgroups = knobs
        .jail
        .then(|| aloft_testkit::CgroupParent::named(BENCH_CGROUP_PARENT));

    let templates = Templates::new(work.path().join("templates"))?;
    // A shape's first start makes its template: timed once, apart from the runs.
    let first = machine_run(
        &guest,
        accel,
        &rootfs,
        fstype,
        &work.path().join("first"),
        MEMORY_MIB,
        knobs,
        Via::Template(&templates),
    )?;
    if !first.made_template || first.cold_reason.is_some() {
        bail!(
            "the first start did not make a template: {}",
            first.cold_reason.unwrap_or_default()
        );
    }

    // Baseline, restored machine and cold machine alternate, so drift in the machine's load
    // hits all alike.
    let mut raw = Vec::new();
    let mut start = Vec::new();
    let mut port = Vec::new();
    let mut resume = Vec::new();
    let mut resume_accept = Vec::new();
    let mut rss = Vec::new();
    let mut anon = Vec::new();
    let mut cold_start = Vec::new();
    let mut cold_port = Vec::new();
    let mut qemu_up = Vec::new();
    let mut resumed_rss = Vec::new();
    let mut hello = Vec::new();
    let mut last_trace = String::new();
    for i in 0..runs {
        raw.push(raw_qemu_boot(&guest, accel)?);
        let dir = work.path().join(format!("m{i}"));
        let m = machine_run(
            &guest,
            accel,
            &rootfs,
            fstype,
            &dir,
            MEMORY_MIB,
            knobs,
            Via::Template(&templates),
        )?;
        if let Some(reason) = m.cold_reason {
            bail!("run {i} booted cold instead of restoring the template: {reason}");
        }
        start.push(m.start_ms);
        port.push(m.port_ms);
        resume.push(m.resume_ms);
        resume_accept.push(m.resume_accept_ms);
        rss.push(m.idle_rss_mib);
        anon.push(m.idle_anon_mib);
        resumed_rss.push(m.resumed_rss_mib);
        let c = machine_run(
            &guest,
            accel,
            &rootfs,
            fstype,
            &work.path().join(format!("c{i}")),
            MEMORY_MIB,
            knobs,
            Via::Cold,
        )?;
        last_trace.clone_from(&c.trace);
        cold_start.push(c.start_ms);
        cold_port.push(c.port_ms);
        qemu_up.push(c.qemu_up_ms);
        hello.push(c.hello_ms.unwrap_or(f64::NAN));
    }

    let rows: [(&str, &[f64], &str, &str); 6] = [
        (
            "raw_qemu_boot_ms",
            &raw,
            "ms",
            "baseline: plain QEMU, our kernel+initrd, to init's first line",
        ),
        (
            "machine_start_ms",
            &start,
            "ms",
            "VmSpec → workload started, restored from the shape's boot template (target ≤ 1200 under TCG)",
        ),
        (
            "port_ready_ms",
            &port,
            "ms",
            "VmSpec → guest TCP port accepts through the tap",
        ),
        (
            "resume_ms",
            &resume,
            "ms",
            "suspended → the guest's server answers again: first HTTP byte (target ≤ 350)",
        ),
        (
            "idle_rss_mib",
            &rss,
            "MiB",
            "host RSS of an idle 128 MiB machine (target ≤ 60)",
        ),
        (
            "idle_anon_mib",
            &anon,
            "MiB",
            "of which private (RssAnon): what each further machine costs",
        ),
    ];
    println!(
        "{:<18} {:>10} {:>10}  {:<5} what",
        "metric", "median", "min", "unit"
    );
    let mut metrics = serde_json::Map::new();
    for (name, samples, unit, what) in rows {
        let med = median(samples).unwrap_or(f64::NAN);
        let lo = min(samples).unwrap_or(f64::NAN);
        println!("{name:<18} {med:>10.1} {lo:>10.1}  {unit:<5} {what}");
        metrics.insert(
            name.to_owned(),
            serde_json::json!({ "value": round1(med), "unit": unit }),
        );
    }
    let added = median(&start).unwrap_or(f64::NAN) - median(&raw).unwrap_or(f64::NAN);
    let cold_added = median(&cold_start).unwrap_or(f64::NAN) - median(&raw).unwrap_or(f64::NAN);
    println!(
        "aloft adds {added:.1} ms to a bare boot (target ≤ 150); a cold boot (no template) adds {cold_added:.1}:"
    );
    for (name, samples, unit, what) in [
        (
            "  first_start_ms",
            &[first.start_ms][..],
            "ms",
            "a shape's first start: boot the template, snapshot it, restore it, start (once)",
        ),
        (
            "  cold_start_ms",
            &cold_start,
            "ms",
            "VmSpec → workload started, kernel booted (no template)",
        ),
        (
            "  cold_port_ms",
            &cold_port,
            "ms",
            "VmSpec → guest TCP port accepts, kernel booted",
        ),
        (
            "  qemu_up_ms",
            &qemu_up,
            "ms",
            "cold: Vm::start returned: QEMU launched, monitor answers",
        ),
        (
            "  init_hello_ms",
            &hello,
            "ms",
            "cold: init's first console line (compare raw_qemu_boot_ms)",
        ),
        (
            "  resume_accept_ms",
            &resume_accept,
            "ms",
            "suspended → the guest's port accepts (its kernel's SYN-ACK; no workload code yet)",
        ),
        (
            "  resumed_rss_mib",
            &resumed_rss,
            "MiB",
            "host RSS of the resumed machine at its first answer (its whole snapshot loaded)",
        ),
    ] {
        let med = median(samples).unwrap_or(f64::NAN);
        let lo = min(samples).unwrap_or(f64::NAN);
        println!("{name:<18} {med:>10.1} {lo:>10.1}  {unit:<5} {what}");
    }
    if knobs.trace {
        println!("init's boot steps in the last cold run (ms since the kernel started):");
        print!("{last_trace}");
    }
    println!("{}", serde_json::json!({ "bench": "boot", "metrics": metrics }));
    Ok(())
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// Plain QEMU (the binary machines run on: [`aloft_vm::default_qemu`]), our kernel and base
/// initramfs, `aloft.probe=1`: time to init's hello line.
fn raw_qemu_boot(guest: &GuestArtifacts, accel: Accel) -> anyhow::Result<f64> {
    let (accel_args, cpu, extra) = match accel {
        Accel::Kvm => ("kvm", "host", ""),
        Accel::Tcg => ("tcg", "max", " tsc_early_khz=2000000 tsc=reliable"),
    };
    let qemu = aloft_vm::default_qemu(&guest.kernel);
    let t0 = Instant::now();
    let mut child = Command::new(&qemu)
        .args(["-M", "microvm", "-accel", accel_args, "-cpu", cpu, "-smp", "1"])
        .args([
            "-m",
            &MEMORY_MIB.to_string(),
            "-nodefaults",
            "-no-user-config",
            "-nographic",
        ])
        .args(["-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .args([
            "-append",
            &format!("console=ttyS0 quiet pci=off reboot=k panic=-1{extra} {PROBE_CMDLINE_FLAG}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {}", qemu.display()))?;
    let mut out = child.stdout.take().context("qemu stdout")?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let found = loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break None;
        }
        seen.extend_from_slice(&buf[..n]);
        if seen
            .windows(CONSOLE_HELLO.len())
            .any(|w| w == CONSOLE_HELLO.as_bytes())
        {
            break Some(t0.elapsed());
        }
        if t0.elapsed() > Duration::from_secs(30) {
            break None;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    match found {
        Some(d) => Ok(d.as_secs_f64() * 1000.0),
        None => bail!(
            "raw boot never printed {CONSOLE_HELLO:?}; console: {}",
            String::from_utf8_lossy(&seen)
        ),
    }
}

struct MachineRun {
    qemu_up_ms: f64,
    /// Init's hello line (a cold boot's; a restored guest said it when its template booted).
    hello_ms: Option<f64>,
    /// This start made its shape's template.
    made_template: bool,
    /// Why a start via a template booted cold.
    cold_reason: Option<String>,
    start_ms: f64,
    port_ms: f64,
    /// Suspended → the first byte of the guest's answer to an HTTP request sent once its port
    /// accepts: a resumed guest's first answer runs code its emulator must translate afresh.
    resume_ms: f64,
    /// Suspended → the guest's port accepts again.
    resume_accept_ms: f64,
    idle_rss_mib: f64,
    idle_anon_mib: f64,
    /// Host RSS of the resumed QEMU at the guest's first answer.
    resumed_rss_mib: f64,
    /// init's `aloft.trace=1` lines, when tracing.
    trace: String,
}

/// The benchmark machine's spec: the busybox `rootfs` (read-only) + a fresh 64 MiB writable ext4
/// disk under `dir`, workload `httpd -f -p 8080`, 1 vCPU, `memory_mib`; with `ns`, a tap in that
/// network namespace and a static address, else no network.
#[expect(
    clippy::too_many_arguments,
    reason = "the benchmark machine's knobs, spelled out"
)]
fn machine_spec(
    guest: &GuestArtifacts,
    accel: Accel,
    rootfs: &Path,
    fstype: &str,
    dir: &Path,
    memory_mib: u32,
    ns: Option<&NetNs>,
    knobs: Knobs,
) -> anyhow::Result<VmSpec> {
    std::fs::create_dir_all(dir)?;
    let rw = dir.join("rw.ext4");
    aloft_testkit::writable_disk(&rw, 64)?;
    let network = match ns {
        Some(ns) => Some(NetConfig {
            addresses: vec![format!("{}/{}", ns.guest_ip, ns.prefix_len).parse()?],
            gateways: vec![ns.host_ip.into()],
            mtu: None,
        }),
        None => None,
    };
    let run_config = RunConfig {
        hostname: "bench".into(),
        cmd: Some(vec![
            "/bin/httpd".into(),
            "-f".into(),
            "-p".into(),
            PORT.to_string(),
            "-h".into(),
            "/".into(),
        ]),
        root: RootConfig {
            device: Some("/dev/vda".into()),
            fstype: fstype.into(),
            writable_device: Some("/dev/vdb".into()),
        },
        network,
        ..RunConfig::default()
    };
    Ok(VmSpec {
        name: format!("bench-{}", std::process::id()),
        qemu: aloft_vm::default_qemu(&guest.kernel),
        kernel: guest.kernel.clone(),
        initrd: guest.initrd.clone(),
        cmdline_extra: if knobs.trace {
            vec![TRACE_CMDLINE_FLAG.to_owned()]
        } else {
            Vec::new()
        },
        vcpus: 1,
        memory_mib,
        disks: vec![
            DiskSpec {
                path: rootfs.to_path_buf(),
                read_only: true,
                format: DiskFormat::Raw,
            },
            DiskSpec {
                path: rw,
                read_only: false,
                format: DiskFormat::Raw,
            },
        ],
        net: ns.map(|ns| NetSpec {
            tap: ns.tap.clone(),
            mac: "52:54:00:12:34:56".into(),
            netns: Some(ns.path()),
        }),
        run_dir: dir.join("run"),
        run_config,
        accel: match accel {
            Accel::Kvm => AccelChoice::Kvm,
            Accel::Tcg => AccelChoice::Tcg,
        },
        jail: knobs.jail.then(|| JailSpec {
            user: BENCH_JAIL_USER.into(),
            cgroup_parent: BENCH_CGROUP_PARENT.into(),
        }),
        free_page_reporting: knobs.page_reporting,
    })
}

/// `machine_start_ms` alone, for other benchmarks' baselines: boots the benchmark machine
/// ([`machine_spec`], no network, `memory_mib`) and returns `VmSpec` → workload started in ms;
/// the VM is killed before returning.
pub(crate) fn machine_start_ms(
    guest: &GuestArtifacts,
    accel: Accel,
    rootfs: &Path,
    fstype: &str,
    dir: &Path,
    memory_mib: u32,
    via: Via<'_>,
) -> anyhow::Result<f64> {
    let spec = machine_spec(
        guest,
        accel,
        rootfs,
        fstype,
        dir,
        memory_mib,
        None,
        Knobs::default(),
    )?;
    let t0 = Instant::now();
    let (vm, _, _) = start(spec, via)?;
    let started = vm.wait_started(Duration::from_secs(30));
    let start_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let _ = vm.kill();
    started?;
    Ok(start_ms)
}

/// A resume's times, for other benchmarks' baselines.
pub(crate) struct ResumeTimes {
    /// Suspended → the first byte of the guest's first HTTP answer (`resume_ms`).
    pub(crate) answer_ms: f64,
    /// Suspended → the guest's port accepts again (`resume_accept_ms`).
    pub(crate) accept_ms: f64,
}

/// `resume_ms` alone, for other benchmarks' baselines: one full [`machine_run`] (the
/// benchmark machine, with `memory_mib` of memory, in a network namespace of its own, booted,
/// idled, suspended for `suspended_for`, the host's free memory warmed, resumed) and its suspended
/// → first HTTP answer byte, and → port accepts, in ms. A snapshot's restore time grows with the
/// memory, so a baseline must use the compared machine's size.
pub(crate) fn machine_resume(
    guest: &GuestArtifacts,
    accel: Accel,
    rootfs: &Path,
    fstype: &str,
    dir: &Path,
    memory_mib: u32,
    suspended_for: Duration,
) -> anyhow::Result<ResumeTimes> {
    let templates = Templates::new(dir.join("templates"))?;
    let m = machine_run(
        guest,
        accel,
        rootfs,
        fstype,
        dir,
        memory_mib,
        Knobs {
            suspended_for,
            warm_host_memory: true,
            ..Knobs::default()
        },
        Via::Template(&templates),
    )?;
    Ok(ResumeTimes {
        answer_ms: m.resume_ms,
        accept_ms: m.resume_accept_ms,
    })
}

#[expect(
    clippy::too_many_arguments,
    reason = "the benchmark machine's knobs, spelled out"
)]
fn machine_run(
    guest: &GuestArtifacts,
    accel: Accel,
    rootfs: &Path,
    fstype: &str,
    dir: &Path,
    memory_mib: u32,
    knobs: Knobs,
    via: Via<'_>,
) -> anyhow::Result<MachineRun> {
    let ns = NetNs::new()?;
    let spec = machine_spec(guest, accel, rootfs, fstype, dir, memory_mib, Some(&ns), knobs)?;

    let console = spec.run_dir.join("console.log");
    let t0 = Instant::now();
    let hello =
        matches!(via, Via::Cold).then(|| std::thread::spawn(move || wait_console_hello(&console, t0)));
    let (vm, made_template, cold_reason) = start(spec.clone(), via)?;
    let qemu_up_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let result = (|| -> anyhow::Result<MachineRun> {
        vm.wait_started(Duration::from_secs(30))?;
        let start_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let hello_ms = match hello {
            Some(h) => Some(
                h.join()
                    .map_err(|_| anyhow::anyhow!("console watcher panicked"))?
                    .context("init's hello line never reached the console log")?,
            ),
            None => None,
        };
        wait_port(&ns, Duration::from_secs(30))?;
        let port_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let trace = std::fs::read_to_string(vm.console_log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("aloft-init: +"))
            .map(|l| format!("  {}\n", &l["aloft-init: ".len()..]))
            .collect();
        let mut run = MachineRun {
            qemu_up_ms,
            hello_ms,
            made_template,
            cold_reason,
            start_ms,
            port_ms,
            resume_ms: f64::NAN,
            resume_accept_ms: f64::NAN,
            idle_rss_mib: f64::NAN,
            idle_anon_mib: f64::NAN,
            resumed_rss_mib: f64::NAN,
            trace,
        };
        if matches!(via, Via::Cold) {
            return Ok(run);
        }

        std::thread::sleep(Duration::from_secs(3));
        run.idle_rss_mib = rss_mib(vm.pid(), "VmRSS")?;
        run.idle_anon_mib = rss_mib(vm.pid(), "RssAnon")?;

        let snapshot = dir.join("snapshot.bin");
        vm.suspend(&snapshot)?;
        std::thread::sleep(knobs.suspended_for);
        if knobs.warm_host_memory {
            crate::hostmem::warm(crate::hostmem::WARM_MIB).context("warm the host's free memory")?;
        }
        let t1 = Instant::now();
        let resumed = Vm::resume(spec.clone(), &snapshot)?;
        let port_again = wait_port(&ns, Duration::from_secs(30));
        run.resume_accept_ms = t1.elapsed().as_secs_f64() * 1000.0;
        let answer = port_again.and_then(first_answer);
        run.resume_ms = t1.elapsed().as_secs_f64() * 1000.0;
        run.resumed_rss_mib = rss_mib(resumed.pid(), "VmRSS").unwrap_or(f64::NAN);
        let _ = resumed.kill();
        answer?;
        Ok(run)
    })();
    let _ = vm.kill();
    result
}

/// Starts `spec` `via` a template or cold: the VM, whether it made its shape's template, and
/// why it booted cold if it was to be restored.
fn start(spec: VmSpec, via: Via<'_>) -> anyhow::Result<(Vm, bool, Option<String>)> {
    Ok(match via {
        Via::Cold => (Vm::start(spec)?, false, None),
        Via::Template(t) => {
            let s = t.start(spec)?;
            (s.vm, s.made_template, s.cold_reason)
        }
    })
}

/// Milliseconds from `t0` until init's hello line is in the console log (polled every
/// millisecond), or `None` after 30 s.
fn wait_console_hello(console: &Path, t0: Instant) -> Option<f64> {
    while t0.elapsed() < Duration::from_secs(30) {
        if std::fs::read(console).is_ok_and(|c| {
            c.windows(CONSOLE_HELLO.len())
                .any(|w| w == CONSOLE_HELLO.as_bytes())
        }) {
            return Some(t0.elapsed().as_secs_f64() * 1000.0);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// Polls until the guest's port accepts a connection.
fn wait_port(ns: &NetNs, timeout: Duration) -> anyhow::Result<std::net::TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(conn) = ns.connect_tcp(PORT, Duration::from_millis(200)) {
            return Ok(conn);
        }
        if Instant::now() > deadline {
            bail!("guest port {PORT} did not accept within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `GET /` on `s`, the connection [`wait_port`] opened (as an edge forwards a held request
/// on the connection that found the machine up), and waits for the first byte of the answer (any
/// status: busybox httpd answers 404 for a missing page just as fast).
fn first_answer(mut s: std::net::TcpStream) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut byte = [0u8; 1];
    let n = s.read(&mut byte).context("the resumed guest's answer")?;
    if n == 0 {
        bail!("the resumed guest closed the connection without answering");
    }
    Ok(())
}

/// A resident-set field of `/proc/PID/status` (`VmRSS`, `RssAnon`) in MiB.
fn rss_mib(pid: i32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .with_context(|| format!("{field} missing from /proc/{pid}/status"))?
        .parse()?;
    Ok(kib / 1024.0)
}
