//! Base images without the internet: build `busybox` and `debian:bookworm` on this host and push
//! them into a registry (normally the platform's own), so a fresh installation and the tests have
//! images to run. `aloft images bootstrap` is the command; the image benchmark calls
//! [`bootstrap_debian`] directly.
//!
//! * [`bootstrap_busybox`]: a tree from Debian's `busybox-static` ([`busybox_tree`]), `Cmd
//!   ["/bin/sh"]`. Takes a second; needs no root (files are recorded as root's).
//! * [`bootstrap_debian`]: `debootstrap --variant=minbase bookworm` from Debian's mirror (reached
//!   the way apt reaches it, proxies included), `Cmd ["/bin/bash"]`. Needs root and about a
//!   minute; the layer is cached under `CACHE_DIR/bootstrap/`, so later runs only push.
//!
//! Each image is one gzip layer written deterministically ([`layer`]: sorted entries, clamped
//! times, numeric owners), an OCI config with a `PATH`, and an OCI manifest, pushed with
//! [`Pusher`]: the same tree always gives the same digest, and a registry that already has the
//! blobs receives only the manifest.
//!
//! debootstrap runs in a private mount namespace (`unshare --mount`), so the `/proc` and `/sys`
//! it mounts inside the target vanish with it however it ends; its target is a directory under
//! a fresh private (0700) temporary directory, which is deleted afterwards only once
//! `/proc/self/mountinfo` shows nothing mounted beneath it.

mod busybox;
mod debian;
pub mod layer;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

pub use busybox::{BUSYBOX, busybox_tree};
pub use debian::{DEBIAN_MIRROR, bootstrap_debian};
pub use layer::{LayerBlob, LayerOptions, write_layer};

use crate::digest::Digest;
use crate::manifest::{OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST};
use crate::progress::Progress;
use crate::push::Pusher;
use crate::reference::Reference;
use crate::registry::{RegistryConfig, RegistryError};

/// The `PATH` of both base images (Docker's default).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What went wrong building or pushing a base image. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// A host tool is not installed.
    #[error("{path} not found: install the Debian package {package} (scripts/setup.sh does)")]
    MissingTool { path: PathBuf, package: &'static str },
    /// The build needs root and this process is not.
    #[error("building {what} needs root ({why}): run it as root, e.g. with sudo")]
    NeedsRoot { what: &'static str, why: &'static str },
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A helper command failed.
    #[error("{command} failed ({status}): {output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    /// debootstrap failed.
    #[error(
        "debootstrap failed ({status}); is {mirror} reachable (apt's proxy settings apply)? Last output:\n{output}"
    )]
    Debootstrap {
        status: String,
        mirror: String,
        output: String,
    },
    /// Something is still mounted under the build directory after debootstrap ended, so the
    /// directory was left in place rather than deleted through the mount.
    #[error(
        "{mounts} mount(s) remain under {path} after debootstrap; left in place so nothing outside is \
         deleted: unmount them (umount -R {path}) and remove the directory"
    )]
    StillMounted { path: PathBuf, mounts: usize },
    /// The target reference cannot be pushed to.
    #[error("cannot push a base image to {reference}: {reason}")]
    Target { reference: String, reason: &'static str },
    /// Pushing to the registry failed.
    #[error("push to the registry")]
    Registry(#[from] RegistryError),
    /// A background task died.
    #[error("background task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl BootstrapError {
    /// A closure that wraps an `io::Error` from `what` on `path`.
    pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self + use<> {
        let path = path.to_path_buf();
        move |source| Self::Io { what, path, source }
    }
}

/// Receives one line per build step (and debootstrap's own output).
pub type StatusFn = Arc<dyn Fn(&str) + Send + Sync>;

/// Knobs of a bootstrap. `Default` is quiet, uses Debian's main mirror and the cache.
#[derive(Clone, Default)]
pub struct BootstrapOptions {
    /// Push progress (blob bytes), as for pulls.
    pub progress: Progress,
    /// Build steps, one line each (`None`: quiet).
    pub status: Option<StatusFn>,
    /// Debian mirror for debootstrap; [`DEBIAN_MIRROR`] when `None`.
    pub mirror: Option<String>,
    /// Build again even when a cached layer exists.
    pub rebuild: bool,
}

impl BootstrapOptions {
    pub(crate) fn say(&self, line: &str) {
        if let Some(status) = &self.status {
            status(line);
        }
    }
}

impl fmt::Debug for BootstrapOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapOptions")
            .field("progress", &self.progress)
            .field("status", &self.status.as_ref().map(|_| "callback"))
            .field("mirror", &self.mirror)
            .field("rebuild", &self.rebuild)
            .finish()
    }
}

/// A base image now in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrapped {
    /// Where it was pushed.
    pub reference: Reference,
    /// The image manifest's digest (what a pull of `reference` resolves to).
    pub digest: Digest,
    /// The layer's (compressed) digest.
    pub layer: Digest,
    /// The layer's compressed size in bytes.
    pub layer_size: u64,
    /// Whether the layer came from the cache instead of being built.
    pub cached: bool,
}

/// `$ALOFT_CACHE`, else `~/.cache/aloft` (`/var/cache/aloft` without a home directory): where
/// [`bootstrap_debian`] keeps its layer when the caller has no better place.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ALOFT_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache").join("aloft"),
        None => PathBuf::from("/var/cache/aloft"),
    }
}

/// Builds the busybox image ([`busybox_tree`], `Cmd ["/bin/sh"]`) and pushes it as `target`
/// (e.g. `127.0.0.1:5000/busybox:latest`). Needs `busybox-static`; works unprivileged.
pub async fn bootstrap_busybox(
    registry: &RegistryConfig,
    target: &Reference,
    options: &BootstrapOptions,
) -> Result<Bootstrapped, BootstrapError> {
    check_target(target)?;
    options.say("building busybox from busybox-static");
    let work = tempfile::Builder::new()
        .prefix("aloft-bootstrap-busybox-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .map_err(BootstrapError::io(
            "create temporary directory",
            &std::env::temp_dir(),
        ))?;
    let root = work.path().join("rootfs");
    let blob_path = work.path().join("layer.tar.gz");
    let blob = tokio::task::spawn_blocking(move || -> Result<LayerBlob, BootstrapError> {
        std::fs::create_dir(&root).map_err(BootstrapError::io("create directory", &root))?;
        busybox_tree(&root)?;
        let me = std::fs::metadata(&root).map_err(BootstrapError::io("stat", &root))?;
        use std::os::unix::fs::MetadataExt;
        let options = LayerOptions {
            map_to_root: Some((me.uid(), me.gid())),
            ..LayerOptions::default()
        };
        write_layer(&root, &blob_path, &options)
    })
    .await
    .map_err(BootstrapError::Task)??;
    let image = ImageSpec {
        name: "busybox",
        cmd: &["/bin/sh"],
        labels: BTreeMap::new(),
    };
    let digest = push_image(registry, target, &blob, &image, options).await?;
    Ok(Bootstrapped {
        reference: target.clone(),
        digest,
        layer: blob.digest,
        layer_size: blob.size,
        cached: false,
    })
}

fn check_target(target: &Reference) -> Result<(), BootstrapError> {
    if target.digest().is_some() {
        return Err(BootstrapError::Target {
            reference: target.to_string(),
            reason: "name a tag, not a digest",
        });
    }
    Ok(())
}

/// The parts of an image config that differ between the base images.
struct ImageSpec<'a> {
    name: &'static str,
    cmd: &'a [&'a str],
    labels: BTreeMap<String, String>,
}

/// RFC 3339 form of [`layer::DEFAULT_MTIME_CLAMP`]: the `created` time of every base image, so
/// configs are as reproducible as layers.
const CREATED: &str = "2023-06-10T00:00:00Z";

/// The OCI image config of a one-layer base image.
fn image_config(blob: &LayerBlob, image: &ImageSpec<'_>) -> Vec<u8> {
    let mut labels = image.labels.clone();
    labels.insert("org.opencontainers.image.title".into(), image.name.into());
    labels.insert("dev.aloft.bootstrap".into(), image.name.into());
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "config": {
            "Env": [DEFAULT_PATH],
            "Cmd": image.cmd,
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [blob.diff_id.to_string()]},
        "history": [{"created": CREATED, "created_by": format!("aloft images bootstrap {}", image.name)}],
    });
    // serde_json's maps are sorted, so the bytes are deterministic.
    serde_json::to_vec(&config).unwrap_or_default()
}

/// Pushes layer, config and manifest; returns the manifest's digest.
async fn push_image(
    registry: &RegistryConfig,
    target: &Reference,
    blob: &LayerBlob,
    image: &ImageSpec<'_>,
    options: &BootstrapOptions,
) -> Result<Digest, BootstrapError> {
    options.say(&format!(
        "pushing {} ({} bytes compressed) to {target}",
        image.name, blob.size
    ));
    let pusher = Pusher::new(registry.clone())?;
    let progress = &options.progress;
    pusher
        .push_blob_file(target, &blob.path, &blob.digest, progress)
        .await?;
    let config = Bytes::from(image_config(blob, image));
    let config_size = config.len();
    let config_digest = pusher.push_blob(target, config, progress).await?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest.to_string(), "size": config_size},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": blob.digest.to_string(), "size": blob.size}],
    });
    let body = Bytes::from(serde_json::to_vec(&manifest).unwrap_or_default());
    Ok(pusher.push_manifest(target, OCI_MANIFEST, body, progress).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_config;

    #[test]
    fn config_is_deterministic_and_parses_back() {
        let blob = LayerBlob {
            path: PathBuf::from("/nonexistent"),
            digest: Digest::of(b"gz"),
            diff_id: Digest::of(b"tar"),
            size: 2,
            entries: 1,
        };
        let spec = ImageSpec {
            name: "debian",
            cmd: &["/bin/bash"],
            labels: BTreeMap::new(),
        };
        let a = image_config(&blob, &spec);
        assert_eq!(a, image_config(&blob, &spec));
        let config = parse_config(&a).unwrap();
        assert_eq!(config.cmd, Some(vec!["/bin/bash".to_owned()]));
        assert_eq!(config.env, vec![DEFAULT_PATH.to_owned()]);
        assert_eq!(config.diff_ids, vec![Digest::of(b"tar")]);
        assert_eq!(
            (config.os.as_deref(), config.architecture.as_deref()),
            (Some("linux"), Some("amd64"))
        );
        assert_eq!(config.labels["org.opencontainers.image.title"], "debian");
    }

    #[test]
    fn pinned_targets_are_refused() {
        let r = Reference::parse("127.0.0.1:5000/busybox")
            .unwrap()
            .with_digest(Digest::of(b"x"));
        assert!(matches!(check_target(&r), Err(BootstrapError::Target { .. })));
    }
}
