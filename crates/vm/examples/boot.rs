//! Boot a root filesystem in a microVM and run one command in it.
//!
//! ```text
//! cargo run -p aloft-vm --example boot -- --rootfs DIR_OR_IMAGE [--memory 256] [--vcpus 1] \
//!     [--user U] [--env K=V]... [--workdir D] [--accel auto|kvm|tcg] [--kernel-arg W]... \
//!     [--console] -- /bin/sh -c 'echo hi'
//! ```
//!
//! `--kernel-arg aloft.trace=1 --console` shows where the boot time went.
//!
//! A directory is packed into a temporary erofs image first (`mkfs.erofs`, as image bases are); an
//! image file may be ext4 or erofs. The workload's output
//! is streamed to stdout/stderr and the example exits with the workload's exit code (128 + signal
//! when a signal ended it). Ctrl-C stops the VM gracefully. Everything temporary is removed.
//! Kernel and initramfs come from `$ALOFT_GUEST_DIR` or `<workspace>/target/guest`.
#![expect(
    unsafe_code,
    reason = "blocking SIGINT/SIGTERM and waiting for them with sigwait"
)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aloft_guest_proto::{DataStream, RootConfig, RunConfig};
use aloft_vm::{AccelChoice, DiskSpec, Vm, VmError, VmSpec};
use anyhow::Context;
use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// Root filesystem: a directory (packed into erofs) or an ext4 or erofs image.
    #[arg(long)]
    rootfs: PathBuf,
    #[arg(long, default_value_t = 256)]
    memory: u32,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    workdir: Option<String>,
    /// `KEY=VALUE`, repeatable.
    #[arg(long = "env")]
    env: Vec<String>,
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Extra kernel command line word, repeatable (`aloft.trace=1` times init's boot steps).
    #[arg(long = "kernel-arg")]
    kernel_args: Vec<String>,
    /// Print the guest's serial console when the VM is gone.
    #[arg(long)]
    console: bool,
    /// The command.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it spawns afterwards).
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; pthread_sigmask only changes this
    // thread's mask.
    unsafe {
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
    }
    set
}

/// `ext4` or `erofs`, from the image's superblock magic.
fn fstype_of(image: &std::path::Path) -> anyhow::Result<&'static str> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image).with_context(|| format!("open {}", image.display()))?;
    let mut sb = [0u8; 64];
    f.seek(SeekFrom::Start(1024))?;
    f.read_exact(&mut sb)
        .with_context(|| format!("{} is too small to be a filesystem image", image.display()))?;
    if sb[..4] == 0xE0F5_E1E2u32.to_le_bytes() {
        Ok("erofs")
    } else if sb[56..58] == 0xEF53u16.to_le_bytes() {
        Ok("ext4")
    } else {
        anyhow::bail!(
            "{} is neither an ext4 nor an erofs image (give a directory to pack one)",
            image.display()
        )
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sigset = block_signals();
    let tmp = tempfile::Builder::new().prefix("aloft-boot-").tempdir()?;
    let (rootfs, fstype) = if args.rootfs.is_dir() {
        // Packed as aloft packs image bases (erofs, ADR 0004).
        let img = tmp.path().join("rootfs.erofs");
        aloft_testkit::erofs_from_dir(&args.rootfs, &img)?;
        (img, "erofs")
    } else {
        let fstype = fstype_of(&args.rootfs)?;
        (args.rootfs.clone(), fstype)
    };
    let rw = tmp.path().join("rw.img");
    aloft_testkit::writable_disk(&rw, 256)?;
    let aloft_testkit::GuestArtifacts { kernel, initrd } = aloft_testkit::guest_artifacts()?;
    let mut spec = VmSpec::new(
        format!("boot-{}", std::process::id()),
        kernel,
        initrd,
        tmp.path().join("run"),
    );
    spec.memory_mib = args.memory;
    spec.cmdline_extra.clone_from(&args.kernel_args);
    spec.vcpus = args.vcpus;
    spec.accel = match args.accel.as_str() {
        "kvm" => AccelChoice::Kvm,
        "tcg" => AccelChoice::Tcg,
        _ => AccelChoice::Auto,
    };
    spec.disks = vec![DiskSpec::raw(&rootfs, true), DiskSpec::raw(&rw, false)];
    let mut env = std::collections::BTreeMap::new();
    for kv in &args.env {
        let (k, v) = kv.split_once('=').context("--env takes KEY=VALUE")?;
        env.insert(k.to_owned(), v.to_owned());
    }
    spec.run_config = RunConfig {
        hostname: "boot".into(),
        exec: Some(args.command.clone()),
        user: args.user.clone(),
        working_dir: args.workdir.clone(),
        env,
        root: RootConfig {
            device: Some("/dev/vda".into()),
            fstype: fstype.into(),
            writable_device: Some("/dev/vdb".into()),
        },
        ..RunConfig::default()
    };

    let t0 = Instant::now();
    let vm = Arc::new(Vm::start(spec)?);
    let logs = vm.logs();
    let printer = std::thread::spawn(move || {
        for chunk in logs {
            let _ = match chunk.stream {
                DataStream::Stdout => std::io::stdout().write_all(&chunk.data),
                DataStream::Stderr => std::io::stderr().write_all(&chunk.data),
            };
        }
    });
    {
        let vm = vm.clone();
        std::thread::spawn(move || {
            let mut sig = 0;
            // SAFETY: `sigset` is an initialised set; `sig` is a valid out pointer.
            if unsafe { libc::sigwait(&raw const sigset, &raw mut sig) } == 0 {
                eprintln!("boot: signal {sig}, stopping the vm");
                let _ = vm.stop(None, Duration::from_secs(5));
            }
        });
    }
    let code = match vm.wait_started(Duration::from_secs(120)) {
        Ok(pid) => {
            eprintln!(
                "boot: workload pid {pid} started {:.2?} after launch (qemu pid {}, {})",
                t0.elapsed(),
                vm.pid(),
                vm.accel()
            );
            let exit = vm.wait_exit(Duration::from_secs(365 * 24 * 3600))?;
            match (exit.workload, exit.failed) {
                (Some(w), _) => w.exit_code.or(w.signal.map(|s| 128 + s)).unwrap_or(1),
                (None, Some(msg)) => {
                    eprintln!("boot: {msg}");
                    1
                }
                (None, None) => {
                    eprintln!("boot: vm ended without a workload status: {:?}", exit.qemu_status);
                    1
                }
            }
        }
        Err(e) => {
            let _ = vm.kill();
            if let VmError::WorkloadFailed { .. } = e {
                eprintln!("boot: {e}");
                127
            } else {
                return Err(e.into());
            }
        }
    };
    let _ = vm.kill();
    if args.console {
        eprint!(
            "{}",
            std::fs::read_to_string(vm.console_log()).unwrap_or_default()
        );
    }
    drop(vm);
    let _ = printer.join();
    drop(tmp);
    std::process::exit(code);
}
