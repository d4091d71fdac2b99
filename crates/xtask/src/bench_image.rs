//! `cargo xtask bench image`: from an empty cache to a ready base root filesystem, against the usual
//! tools doing the same, and how fast the next machine's writable disk is ready.
//!
//! A local registry (Debian's `docker-registry`, started by the testkit) receives `debian:bookworm`
//! from `aloft_image::bootstrap` (debootstrap minbase, cached after the first build) or, with
//! `--image busybox`, the busybox image. Then, alternating so drift hits both alike:
//!
//! * `aloft_pull_rootfs_ms`: `Puller::pull` into an empty cache, then `RootfsStore::build`.
//! * `baseline_pull_rootfs_ms`: `skopeo copy` to an OCI layout, `umoci unpack`, `du` to size the
//!   filesystem, `mkfs.ext4 -d`.
//! * `second_disk_ms`: `WritableDisks::create` of a 1 GiB writable disk once its template exists.
//!
//! Record numbers from a release build (`cargo run --release -p xtask -- bench image`): in a debug
//! build, hashing and gunzip dominate aloft's time while the baseline's tools are optimised anyway.
//!
//! `--formats` also compares ext4, erofs and erofs+lz4 bases of the same image: build time, size,
//! and under QEMU (TCG here) the machine's start (which includes mounting the root) and the time
//! the guest takes to read every file of the root once.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aloft_guest_proto::{DataStream, RootConfig, RunConfig};
use aloft_image::bootstrap::{self, BootstrapOptions};
use aloft_image::unpack::UnpackLimits;
use aloft_image::{
    Progress, PulledImage, Puller, Reference, RegistryConfig, RootfsFormat, RootfsStore, WritableDisks,
};
use aloft_testkit::Registry;
use aloft_vm::{AccelChoice, DiskSpec, Vm, VmSpec, accel::Accel};
use anyhow::{Context, bail};

use crate::stats::{median, min};

/// Size of the writable disks `second_disk_ms` measures.
const DISK_MIB: u64 = 1024;

/// What `cargo xtask bench image` was asked to do.
#[derive(Debug, Clone)]
pub(crate) struct ImageBench {
    pub(crate) runs: usize,
    /// `debian` (default) or `busybox`.
    pub(crate) image: String,
    /// Base format for `aloft_pull_rootfs_ms`.
    pub(crate) format: RootfsFormat,
    /// Also compare the formats (build, size, in-guest mount and read under QEMU).
    pub(crate) formats: bool,
}

pub(crate) fn run(args: &ImageBench) -> anyhow::Result<()> {
    let runs = args.runs.max(1);
    if cfg!(debug_assertions) {
        // Hashing and gunzip in an unoptimised build take most of aloft's time; the baseline's
        // tools are optimised Go binaries either way.
        eprintln!(
            "bench image: WARNING: debug build; record numbers from `cargo run --release -p xtask -- bench image`"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let registry = Registry::start()?;
    let host = registry.host();
    let config = RegistryConfig {
        insecure: vec![host.clone()],
        ..RegistryConfig::default()
    };
    let reference = push_image(&rt, &config, &host, &args.image)?;
    eprintln!("bench image: {reference}, base {:?}, {runs} runs", args.format);

    let work = tempfile::Builder::new().prefix("aloft-bench-image-").tempdir()?;
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o700))?;

    let mut aloft = Vec::new();
    let mut pull = Vec::new();
    let mut unpack = Vec::new();
    let mut mkfs = Vec::new();
    let mut sync = Vec::new();
    let mut baseline = Vec::new();
    let mut base_bytes = 0;
    for i in 0..runs {
        baseline.push(baseline_run(
            &host,
            &reference,
            &work.path().join(format!("b{i}")),
        )?);
        let a = aloft_run(
            &rt,
            &config,
            &reference,
            args.format,
            &work.path().join(format!("a{i}")),
        )?;
        aloft.push(a.total_ms);
        pull.push(a.pull_ms);
        unpack.push(a.unpack_ms);
        mkfs.push(a.mkfs_ms);
        sync.push(a.sync_ms);
        base_bytes = a.base_bytes;
    }
    let disks = second_disks(&work.path().join("disks"), runs.max(5) * 2)?;

    let rows: [(&str, &[f64], &str); 3] = [
        (
            "aloft_pull_rootfs_ms",
            &aloft,
            "empty cache → base rootfs ready (target ≤ 0.6 × baseline)",
        ),
        (
            "baseline_pull_rootfs_ms",
            &baseline,
            "skopeo copy + umoci unpack + du + mkfs.ext4 -d",
        ),
        (
            "second_disk_ms",
            &disks.samples,
            "base built → next machine's 1 GiB writable disk ready (target ≤ 50)",
        ),
    ];
    println!(
        "{:<24} {:>10} {:>10}  {:<4} what",
        "metric", "median", "min", "unit"
    );
    let mut metrics = serde_json::Map::new();
    for (name, samples, what) in rows {
        let med = median(samples).unwrap_or(f64::NAN);
        println!(
            "{name:<24} {med:>10.1} {:>10.1}  ms   {what}",
            min(samples).unwrap_or(f64::NAN)
        );
        metrics.insert(
            name.to_owned(),
            serde_json::json!({ "value": round1(med), "unit": "ms" }),
        );
    }
    let ratio = median(&aloft).unwrap_or(f64::NAN) / median(&baseline).unwrap_or(f64::NAN);
    println!("aloft / baseline = {ratio:.2} (target ≤ 0.60); where aloft's time goes:");
    for (name, samples, what) in [
        ("  pull_ms", &pull, "manifest, config, layers into the blob cache"),
        (
            "  unpack_ms",
            &unpack,
            "layers applied into the staging directory",
        ),
        ("  mkfs_ms", &mkfs, "filesystem made from the staged tree"),
        ("  sync_ms", &sync, "base fsynced and renamed into place"),
    ] {
        println!(
            "{name:<24} {:>10.1} {:>10.1}  ms   {what}",
            median(samples).unwrap_or(f64::NAN),
            min(samples).unwrap_or(f64::NAN)
        );
    }
    println!(
        "base: {:.1} MiB allocated; writable disk clone method: {}",
        mib(base_bytes),
        disks.method
    );

    if args.formats {
        compare_formats(&rt, &config, &reference, work.path(), runs.min(3))?;
    }
    println!("{}", serde_json::json!({ "bench": "image", "metrics": metrics }));
    Ok(())
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

#[expect(clippy::cast_precision_loss, reason = "sizes for display")]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// Pushes the benchmark image into the local registry; returns its reference there.
fn push_image(
    rt: &tokio::runtime::Runtime,
    config: &RegistryConfig,
    host: &str,
    image: &str,
) -> anyhow::Result<Reference> {
    let options = BootstrapOptions {
        status: Some(std::sync::Arc::new(|line: &str| eprintln!("bootstrap: {line}"))),
        ..BootstrapOptions::default()
    };
    let started = Instant::now();
    let pushed = match image {
        "debian" => {
            let target = Reference::parse(&format!("{host}/debian:bookworm"))?;
            rt.block_on(bootstrap::bootstrap_debian(
                config,
                &target,
                &bootstrap::default_cache_dir(),
                &options,
            ))?
        }
        "busybox" => {
            let target = Reference::parse(&format!("{host}/busybox:latest"))?;
            rt.block_on(bootstrap::bootstrap_busybox(config, &target, &options))?
        }
        other => bail!("unknown benchmark image {other:?}: use debian or busybox"),
    };
    eprintln!(
        "bench image: pushed {} ({:.1} MiB layer) in {:.0} ms",
        pushed.reference,
        mib(pushed.layer_size),
        ms(started)
    );
    Ok(pushed.reference)
}

struct AloftRun {
    total_ms: f64,
    pull_ms: f64,
    unpack_ms: f64,
    mkfs_ms: f64,
    sync_ms: f64,
    base_bytes: u64,
}

fn private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    Ok(())
}

fn aloft_run(
    rt: &tokio::runtime::Runtime,
    config: &RegistryConfig,
    reference: &Reference,
    format: RootfsFormat,
    cache: &Path,
) -> anyhow::Result<AloftRun> {
    private_dir(cache)?;
    let t0 = Instant::now();
    let puller = Puller::new(cache, config.clone())?;
    let pulled = rt.block_on(puller.pull(reference, &Progress::none()))?;
    let pull_ms = ms(t0);
    let store = RootfsStore::open(cache, format, UnpackLimits::default())?;
    let (base, stats) = store.build(&pulled)?;
    let total_ms = ms(t0);
    if stats.reused {
        bail!("the cache was not empty");
    }
    let run = AloftRun {
        total_ms,
        pull_ms,
        unpack_ms: stats.unpack_ms as f64,
        mkfs_ms: stats.mkfs_ms as f64,
        sync_ms: stats.sync_ms as f64,
        base_bytes: base.disk_bytes,
    };
    fs::remove_dir_all(cache)?;
    Ok(run)
}

fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn baseline_run(host: &str, reference: &Reference, dir: &Path) -> anyhow::Result<f64> {
    private_dir(dir)?;
    let tag = reference.tag().unwrap_or("latest");
    let layout = format!("oci:{}:{tag}", dir.join("layout").display());
    let bundle = dir.join("bundle");
    let image = dir.join("base.ext4");
    let t0 = Instant::now();
    sh(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{host}/{}:{tag}", reference.repository()))
        .arg(&layout))?;
    sh(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", dir.join("layout").display()))
        .arg(&bundle))?;
    let rootfs = bundle.join("rootfs");
    let du = sh(Command::new("du").arg("-sm").arg(&rootfs))?;
    let used: u64 = du
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du prints a size")?;
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&rootfs)
        .arg(&image)
        .arg(format!("{}M", used * 3 / 2 + 64)))?;
    let elapsed = ms(t0);
    fs::remove_dir_all(dir)?;
    Ok(elapsed)
}

struct Disks {
    samples: Vec<f64>,
    method: String,
}

/// Makes the template (not timed), then times `n` further disks.
fn second_disks(dir: &Path, n: usize) -> anyhow::Result<Disks> {
    private_dir(dir)?;
    let disks = WritableDisks::open(dir)?;
    let first = disks.create(&dir.join("m0.img"), DISK_MIB)?;
    let mut samples = Vec::new();
    for i in 1..=n {
        let dest = dir.join(format!("m{i}.img"));
        let t0 = Instant::now();
        disks.create(&dest, DISK_MIB)?;
        samples.push(ms(t0));
    }
    let allocated = fs::metadata(dir.join("m1.img"))?.blocks() * 512;
    Ok(Disks {
        samples,
        method: format!("{first:?}, {:.1} MiB of data per disk", mib(allocated)),
    })
}

/// Build time, size, start and read-everything time of each base format.
fn compare_formats(
    rt: &tokio::runtime::Runtime,
    config: &RegistryConfig,
    reference: &Reference,
    work: &Path,
    runs: usize,
) -> anyhow::Result<()> {
    let cache = work.join("formats");
    private_dir(&cache)?;
    let pulled = rt.block_on(Puller::new(&cache, config.clone())?.pull(reference, &Progress::none()))?;
    let guest = aloft_testkit::guest_artifacts()?;
    let accel = aloft_vm::accel::probe(&guest.kernel, &guest.initrd);
    println!("formats ({runs} runs each, guest under {accel:?}, 1 vCPU, 256 MiB):");
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}",
        "format", "build_ms", "mkfs_ms", "size_mib", "start_ms", "read_all_ms", "read_mib"
    );
    for format in [RootfsFormat::Ext4, RootfsFormat::Erofs, RootfsFormat::ErofsLz4] {
        let store = RootfsStore::open(&cache, format, UnpackLimits::default())?;
        let (mut build, mut mkfs, mut start, mut read) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut size = 0;
        let mut read_mib = 0.0;
        for i in 0..runs {
            store.remove(&pulled.digest)?;
            let t0 = Instant::now();
            let (base, stats) = store.build(&pulled)?;
            build.push(ms(t0));
            mkfs.push(stats.mkfs_ms as f64);
            size = base.disk_bytes;
            let (s, r, bytes) = boot_and_read(
                &guest,
                accel,
                &base.path,
                format,
                &work.join(format!("vm-{}-{i}", format.extension())),
                &pulled,
            )?;
            start.push(s);
            read.push(r);
            read_mib = bytes;
        }
        println!(
            "{:<10} {:>9.0} {:>9.0} {:>9.1} {:>9.0} {:>10.0} {:>9.1}",
            format.extension(),
            median(&build).unwrap_or(f64::NAN),
            median(&mkfs).unwrap_or(f64::NAN),
            mib(size),
            median(&start).unwrap_or(f64::NAN),
            median(&read).unwrap_or(f64::NAN),
            read_mib,
        );
    }
    Ok(())
}

/// Boots `base` with a fresh writable disk and reads every file of the root once; returns
/// (VmSpec → workload started ms, in-guest read ms, MiB read).
fn boot_and_read(
    guest: &aloft_testkit::GuestArtifacts,
    accel: Accel,
    base: &Path,
    format: RootfsFormat,
    dir: &Path,
    image: &PulledImage,
) -> anyhow::Result<(f64, f64, f64)> {
    private_dir(dir)?;
    let rw = dir.join("rw.img");
    WritableDisks::open(dir)?.create(&rw, 256)?;
    // dash or busybox sh; date +%s%N from coreutils or busybox.
    let script = "s=$(date +%s%N); n=$(find / -xdev -type f -print0 | xargs -0 cat | wc -c); \
                  e=$(date +%s%N); echo \"read_ns=$((e-s)) bytes=$n\"";
    let spec = VmSpec {
        name: format!("bench-image-{}", std::process::id()),
        qemu: aloft_vm::default_qemu(&guest.kernel),
        kernel: guest.kernel.clone(),
        initrd: guest.initrd.clone(),
        cmdline_extra: Vec::new(),
        vcpus: 1,
        memory_mib: 256,
        disks: vec![DiskSpec::raw(base, true), DiskSpec::raw(&rw, false)],
        net: None,
        run_dir: dir.join("run"),
        run_config: RunConfig {
            hostname: "bench".into(),
            image: aloft_image::guest_image_config(&image.config).image,
            exec: Some(vec!["/bin/sh".into(), "-c".into(), script.into()]),
            root: RootConfig {
                device: Some("/dev/vda".into()),
                fstype: format.fstype().into(),
                writable_device: Some("/dev/vdb".into()),
            },
            ..RunConfig::default()
        },
        accel: match accel {
            Accel::Kvm => AccelChoice::Kvm,
            Accel::Tcg => AccelChoice::Tcg,
        },
        jail: None,
        free_page_reporting: true,
    };
    let t0 = Instant::now();
    let vm = Vm::start(spec)?;
    let logs = vm.logs();
    let result = (|| -> anyhow::Result<(f64, f64, f64)> {
        vm.wait_started(Duration::from_secs(60))?;
        let start_ms = ms(t0);
        let exit = vm.wait_exit(Duration::from_secs(600))?;
        let mut out = Vec::new();
        while let Ok(chunk) = logs.recv_timeout(Duration::from_millis(200)) {
            if chunk.stream == DataStream::Stdout {
                out.extend_from_slice(&chunk.data);
            }
        }
        let out = String::from_utf8_lossy(&out);
        let field = |name: &str| -> Option<f64> {
            out.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse().ok())
        };
        match (field("read_ns="), field("bytes=")) {
            (Some(ns), Some(bytes)) => Ok((start_ms, ns / 1e6, bytes / f64::from(1 << 20))),
            _ => bail!("the guest's read script printed {out:?} ({exit:?})"),
        }
    })();
    let _ = vm.kill();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mib_and_round() {
        assert_eq!(round1(1.26), 1.3);
        assert!((mib(3 << 20) - 3.0).abs() < 1e-9);
    }

    #[test]
    fn unknown_image_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let err = push_image(&rt, &RegistryConfig::default(), "127.0.0.1:1", "alpine").unwrap_err();
        assert!(err.to_string().contains("unknown benchmark image"), "{err}");
    }
}
