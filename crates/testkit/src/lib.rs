//! Fixtures shared by aloft's tests and benchmarks: where the guest kernel and initramfs are, busybox
//! root filesystems built from Debian's `busybox-static`, and throwaway network namespaces with a
//! tap device, so guests are reached without touching the host's own network, a real OCI
//! registry (Debian's `docker-registry`) on loopback, and a real ACME CA (Debian's `pebble`) with
//! a DNS responder on loopback; a private etcd (Debian's `etcd-server`) per test for the etcd
//! store; cgroup parents of their own for jailed machines; and TLS servers with self-signed
//! certificates.
//!
//! Only tests, examples and `xtask` depend on this crate; no production crate may.

mod cgroup;
mod etcd;
mod netns;
mod pebble;
mod process;
mod registry;
mod rootfs;
pub mod tls;

use std::path::{Path, PathBuf};

pub use cgroup::CgroupParent;
pub use etcd::Etcd;
pub use netns::NetNs;
pub use pebble::{Pebble, PebbleOptions, free_port};
pub use registry::Registry;
pub use rootfs::{busybox_erofs, busybox_rootfs, busybox_tree, erofs_from_dir, ext4_from_dir, writable_disk};

/// What went wrong preparing a fixture; messages say how to fix the machine.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("guest artifact not found: {path}: run scripts/setup.sh (or set ALOFT_GUEST_DIR)")]
    MissingArtifact { path: PathBuf },
    #[error("{path} not found: run scripts/setup.sh (it installs the Debian package {package})")]
    MissingTool { path: PathBuf, package: &'static str },
    #[error("{what}: {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("command failed: {command}: {stderr}")]
    Command { command: String, stderr: String },
    #[error("pebble (the test ACME CA): {0}")]
    Pebble(String),
    #[error("a test TLS certificate: {0}")]
    Tls(String),
    #[error("push a base image into the test registry")]
    Bootstrap(#[source] aloft_image::bootstrap::BootstrapError),
}

/// The guest kernel and base initramfs a test boots.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Directory for cached fixtures (`target/testkit`).
pub fn cache_dir() -> PathBuf {
    workspace_root().join("target").join("testkit")
}

/// Kernel and initramfs from `$ALOFT_GUEST_DIR`, else `target/guest` (written by `scripts/setup.sh`).
pub fn guest_artifacts() -> Result<GuestArtifacts, FixtureError> {
    let dir = std::env::var_os("ALOFT_GUEST_DIR")
        .map_or_else(|| workspace_root().join("target").join("guest"), PathBuf::from);
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initramfs.cpio");
    for path in [&kernel, &initrd] {
        if !path.is_file() {
            return Err(FixtureError::MissingArtifact { path: path.clone() });
        }
    }
    Ok(GuestArtifacts { kernel, initrd })
}

pub(crate) fn run(cmd: &mut std::process::Command) -> Result<(), FixtureError> {
    let out = cmd.output().map_err(|source| FixtureError::Io {
        what: "spawn",
        path: PathBuf::from(cmd.get_program()),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(FixtureError::Command {
            command: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}
