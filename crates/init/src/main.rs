//! `aloft-init`: PID 1 of every aloft guest.
//!
//! Boots the guest from the initramfs: mounts `/proc`, `/sys`, `/dev`, reads the run config
//! (`/aloft/run.json`; a template boot waits for it on the channel instead, see [`template`]),
//! assembles the overlay root (read-only image + writable layer) and switches into it, mounts the
//! machine's volumes (found by their disks' virtio-blk serials), sets hostname, `/etc/hosts`, DNS,
//! network and files, then starts the workload as the image's user, forwards its output and serves
//! exec/ps/signal/stop requests over the virtio-serial channel, reaps every process, reports the
//! exit and powers off.
//!
//! Static binary, one thread, no async runtime: poll(2) over a signalfd, the channel and pipes.
//! Depends only on `aloft-guest-proto` (the contract with the host), `aloft-netlink`, `libc` and
//! `serde_json` — never on host-side crates, tokio or NSS (users come from `/etc/passwd` directly).
//! Never panics on bad input: every failure is a message reported to the host and the console.

mod boot;
mod channel;
mod console;
mod procs;
mod session;
mod spawn;
mod spec;
mod supervisor;
mod sys;
mod template;
mod users;

use std::os::fd::OwnedFd;
use std::time::Duration;

use aloft_guest_proto::{
    BootRequest, CONSOLE_HELLO, PROBE_CMDLINE_FLAG, RUN_CONFIG_PATH, RunConfig, TEMPLATE_CMDLINE_FLAG,
    TRACE_CMDLINE_FLAG,
};

use crate::channel::Channel;
use crate::supervisor::{Supervisor, Workload};

fn main() {
    console::line(CONSOLE_HELLO);
    let _ = boot::mount_proc();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == PROBE_CMDLINE_FLAG) {
        loop {
            let _ = sys::power_off();
        }
    }
    if cmdline.split_whitespace().any(|w| w == TRACE_CMDLINE_FLAG) {
        console::enable_trace();
    }
    console::trace("init running");
    boot::mount_sys_dev();
    if sys::ensure_console_fds() {
        console::line(CONSOLE_HELLO);
    }
    // Block the signals before any child exists so none is lost; the signalfd reports them.
    let sigfd = match sys::signalfd(&[libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGPWR]) {
        Ok(fd) => fd,
        Err(e) => {
            console::line(&format!(
                "{}signalfd: {e}",
                aloft_guest_proto::CONSOLE_ERROR_MARKER
            ));
            loop {
                let _ = sys::power_off();
            }
        }
    };
    let ch = Channel::open();
    console::trace("channel opened");
    let (ch, sigfd, cfg) = if cmdline.split_whitespace().any(|w| w == TEMPLATE_CMDLINE_FLAG) {
        await_boot(ch, sigfd)
    } else {
        match read_config() {
            Ok(cfg) => (ch, sigfd, cfg),
            Err(message) => Supervisor::new(ch, sigfd).fail(&message),
        }
    };
    let prepared = prepare(&cfg);
    let sup = Supervisor::new(ch, sigfd);
    match prepared {
        Ok(workload) => sup.run(workload),
        Err(message) => sup.fail(&message),
    }
}

/// A template boot: waits for the host's boot request (indefinitely: the guest is snapshotted
/// while it waits), applies it, and returns the run config it carries. Any failure is the boot's.
fn await_boot(mut ch: Channel, sigfd: OwnedFd) -> (Channel, OwnedFd, RunConfig) {
    let req = match template::wait_for_boot(&mut ch, &sigfd) {
        Ok(template::Waited::Boot(req)) => req,
        Ok(template::Waited::Stopped(signo)) => {
            console::diag(&format!(
                "signal {signo} while waiting for the boot request: powering off"
            ));
            sys::sync();
            loop {
                let e = sys::power_off();
                console::diag(&format!("power off: {e}"));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Err(message) => Supervisor::new(ch, sigfd).fail(&message),
    };
    console::trace("boot request received");
    if let Err(message) = template::become_machine(&req) {
        Supervisor::new(ch, sigfd).fail(&message);
    }
    let BootRequest { config, .. } = *req;
    (ch, sigfd, config)
}

fn read_config() -> Result<RunConfig, String> {
    let text =
        std::fs::read(RUN_CONFIG_PATH).map_err(|e| format!("read run config {RUN_CONFIG_PATH}: {e}"))?;
    serde_json::from_slice(&text).map_err(|e| format!("parse run config {RUN_CONFIG_PATH}: {e}"))
}

/// Every boot step up to a validated workload launch.
fn prepare(cfg: &RunConfig) -> Result<Workload, String> {
    console::trace("run config read");
    boot::switch_root(&cfg.root)?;
    console::trace("root mounted");
    boot::mount_runtime_fs();
    console::trace("runtime mounted");
    boot::mount_volumes(&cfg.mounts)?;
    console::trace("volumes mounted");
    boot::identity(cfg)?;
    console::trace("identity set");
    boot::network(cfg.network.as_ref())?;
    console::trace("network up");
    boot::write_files(&cfg.files)?;
    let user_spec = cfg
        .user
        .clone()
        .or_else(|| cfg.image.user.clone())
        .unwrap_or_default();
    let user = spawn::lookup_user(&user_spec)?;
    let env = spec::build_env(cfg, user.home.as_deref());
    let argv = spec::workload_argv(cfg)?;
    let workdir = cfg
        .working_dir
        .clone()
        .or_else(|| cfg.image.working_dir.clone())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/".to_owned());
    let launch = spawn::prepare(argv, env, &user, &workdir)?;
    console::trace("workload resolved");
    Ok(Workload {
        launch,
        user_spec,
        stop_signal: spec::stop_signal(cfg),
    })
}
