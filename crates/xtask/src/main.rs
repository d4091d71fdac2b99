//! `cargo xtask`: project automation that is code rather than shell.
//!
//! * `cargo xtask guest` — builds the static `aloft-init` and the base initramfs
//!   (`target/guest/initramfs.cpio`) that every machine boots.
//! * `cargo xtask bench NAME` (`boot`, `image`, `api`, `deploy`, `proxy`) — runs a benchmark; prints a table and, as its last line, one JSON
//!   object `{"bench":NAME,"metrics":{…}}`.
//!
//! Nothing in the product depends on this crate.

mod aloftd;
mod bench_api;
mod bench_boot;
mod bench_deploy;
mod bench_image;
mod bench_proxy;
mod hostmem;
mod stats;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "aloft project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the static aloft-init and the base initramfs into target/guest/.
    Guest,
    /// Run a benchmark (`boot`, `image`, `api`, `deploy`, `proxy`).
    Bench {
        name: String,
        /// Runs per measurement (the median is reported); default 5 (`deploy`: 3; `proxy`: the
        /// wake and resume samples).
        #[arg(long)]
        runs: Option<usize>,
        /// Boot machines with `aloft.trace=1` and print init's step timings of the last run
        /// (adds a few console writes to every start).
        #[arg(long)]
        trace: bool,
        /// `image` only: the image pushed to the local registry (`debian` or `busybox`).
        #[arg(long, default_value = "debian")]
        image: String,
        /// The base rootfs format (`ext4`, `erofs`, `erofs-lz4`; `boot`: `ext4` or `erofs`);
        /// default: the image store's.
        #[arg(long)]
        format: Option<aloft_image::RootfsFormat>,
        /// `image` only: also compare the base formats (build, size, in-guest mount and read).
        #[arg(long)]
        formats: bool,
        /// `api`, `deploy`: the cargo profile aloftd is built with and measured in (`release`: what
        /// users run; `dev`).
        #[arg(long, default_value = "release")]
        aloftd_profile: String,
        /// `proxy` only: seconds of each wrk run.
        #[arg(long, default_value_t = 10)]
        duration: u32,
        /// `proxy` only: wrk's keep-alive connections.
        #[arg(long, default_value_t = 64)]
        connections: u32,
        /// `proxy` only: rounds of direct, nginx, aloft (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// `proxy` only: just the wrk part, no VM (no `wake_ms`, `resume_ms`).
        #[arg(long)]
        skip_vm: bool,
        /// `boot` only: machines without free page reporting (to measure what it saves).
        #[arg(long)]
        no_page_reporting: bool,
        /// `boot` only: machines jailed as aloftd runs them (to measure what the jail costs).
        #[arg(long)]
        jail: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Guest => guest(),
        Cmd::Bench {
            name,
            runs,
            trace,
            image,
            format,
            formats,
            aloftd_profile,
            duration,
            connections,
            rounds,
            skip_vm,
            no_page_reporting,
            jail,
        } => match name.as_str() {
            "boot" => bench_boot::run(
                runs.unwrap_or(5),
                bench_boot::Knobs {
                    trace,
                    page_reporting: !no_page_reporting,
                    jail,
                    ..bench_boot::Knobs::default()
                },
                format.unwrap_or_default(),
            ),
            "image" => bench_image::run(&bench_image::ImageBench {
                runs: runs.unwrap_or(5),
                image,
                format: format.unwrap_or_default(),
                formats,
            }),
            "api" => bench_api::run(&bench_api::ApiBench {
                runs: runs.unwrap_or(5),
                profile: aloftd_profile,
            }),
            "deploy" => bench_deploy::run(&bench_deploy::DeployBench {
                runs: runs.unwrap_or(3),
                profile: aloftd_profile,
            }),
            "proxy" => bench_proxy::run(&bench_proxy::ProxyBench {
                duration_s: duration,
                connections,
                rounds,
                runs: runs.unwrap_or(5),
                skip_vm,
            }),
            other => bail!("unknown benchmark {other:?}; available: boot, image, api, deploy, proxy"),
        },
    }
}

/// Where `scripts/setup.sh` and the tests expect the guest artifacts.
fn guest_dir() -> PathBuf {
    aloft_testkit::workspace_root().join("target").join("guest")
}

fn guest() -> anyhow::Result<()> {
    let root = aloft_testkit::workspace_root();
    let target = "x86_64-unknown-linux-gnu";
    // A static binary: the guest root filesystem is the user's image, whose libc we cannot rely on.
    // RUSTFLAGS with an explicit --target applies to the init binary only, not to build scripts.
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "--quiet",
            "-p",
            "aloft-init",
            "--profile",
            "guest-init",
            "--target",
            target,
        ])
        .status()
        .context("run cargo build for aloft-init")?;
    if !status.success() {
        bail!("building aloft-init failed");
    }
    let init = root
        .join("target")
        .join(target)
        .join("guest-init")
        .join("aloft-init");
    let bytes = std::fs::read(&init).with_context(|| format!("read {}", init.display()))?;
    if bytes
        .windows(b"/lib64/ld-linux".len())
        .any(|w| w == b"/lib64/ld-linux")
    {
        bail!(
            "{} is dynamically linked; the guest needs a static binary",
            init.display()
        );
    }
    let out = guest_dir().join("initramfs.cpio");
    std::fs::create_dir_all(guest_dir())?;
    aloft_vm::initramfs::write_base(&init, &out).with_context(|| format!("write {}", out.display()))?;
    println!(
        "guest: {} ({} KiB), {} ({} KiB)",
        init.display(),
        bytes.len() / 1024,
        out.display(),
        std::fs::metadata(&out)?.len() / 1024
    );
    Ok(())
}
