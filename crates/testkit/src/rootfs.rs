//! Busybox root filesystems and writable disks.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{FixtureError, run};

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FixtureError {
    let path = path.to_path_buf();
    move |source| FixtureError::Io { what, path, source }
}

/// Writes a busybox root tree into `dir`: the base image's tree ([`aloft_image::bootstrap::busybox_tree`]:
/// `/bin/busybox` with every applet linked in `/bin`, `/tmp` (1777), empty `/etc/hosts` and friends)
/// plus what tests rely on: users `root`, `app` (1000, owning `/home/app`) and `nobody` (65534), a group
/// `extra` with `app` in it, and `/var/www/index.html` ("hello from the guest") for HTTP tests.
pub fn busybox_tree(dir: &Path) -> Result<(), FixtureError> {
    aloft_image::bootstrap::busybox_tree(dir).map_err(|e| match e {
        aloft_image::bootstrap::BootstrapError::MissingTool { path, package } => {
            FixtureError::MissingTool { path, package }
        }
        other => FixtureError::Command {
            command: "aloft_image::bootstrap::busybox_tree".to_owned(),
            stderr: other.to_string(),
        },
    })?;
    for d in ["home/app", "var/www"] {
        fs::create_dir_all(dir.join(d)).map_err(io("create directory", &dir.join(d)))?;
    }
    std::os::unix::fs::chown(dir.join("home/app"), Some(1000), Some(1000))
        .map_err(io("chown", &dir.join("home/app")))?;
    let files: [(&str, &str); 3] = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        (
            "etc/group",
            "root:x:0:\napp:x:1000:\nextra:x:2000:app\nnogroup:x:65534:\n",
        ),
        ("var/www/index.html", "hello from the guest\n"),
    ];
    for (name, contents) in files {
        fs::write(dir.join(name), contents).map_err(io("write", &dir.join(name)))?;
    }
    Ok(())
}

/// Packs `dir` into an ext4 image of `size_mib` (sparse), owned as in the tree. No journal: the
/// image is mounted read-only, as aloft's bases are.
pub fn ext4_from_dir(dir: &Path, image: &Path, size_mib: u32) -> Result<(), FixtureError> {
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-E", "root_owner=0:0", "-d"])
        .arg(dir)
        .arg(image)
        .arg(format!("{size_mib}M")))
}

/// Packs `dir` into an uncompressed erofs image (the format of aloft's image bases, ADR 0004).
pub fn erofs_from_dir(dir: &Path, image: &Path) -> Result<(), FixtureError> {
    run(Command::new("mkfs.erofs").arg("--quiet").arg(image).arg(dir))
}

/// An empty, sparse ext4 disk for a guest's writable layer: no journal and fully initialised inode
/// tables, so the guest spends no time on either.
pub fn writable_disk(image: &Path, size_mib: u32) -> Result<(), FixtureError> {
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-O",
            "^has_journal",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
        ])
        .arg(image)
        .arg(format!("{size_mib}M")))
}

/// A busybox ext4 root image, built once and cached in `cache_dir` (safe to call from parallel test
/// processes: the image is built under a unique name and renamed into place).
pub fn busybox_rootfs(cache_dir: &Path) -> Result<PathBuf, FixtureError> {
    // Bump the version when the tree or the format changes, so stale cached images are not reused.
    cached_busybox(cache_dir, "busybox-rootfs-v3.ext4", |tree, image| {
        ext4_from_dir(tree, image, 32)
    })
}

/// The same busybox tree as an erofs image, as aloft builds image bases; cached like
/// [`busybox_rootfs`].
pub fn busybox_erofs(cache_dir: &Path) -> Result<PathBuf, FixtureError> {
    cached_busybox(cache_dir, "busybox-rootfs-v3.erofs", erofs_from_dir)
}

fn cached_busybox(
    cache_dir: &Path,
    name: &str,
    make: impl FnOnce(&Path, &Path) -> Result<(), FixtureError>,
) -> Result<PathBuf, FixtureError> {
    let image = cache_dir.join(name);
    if image.is_file() {
        return Ok(image);
    }
    fs::create_dir_all(cache_dir).map_err(io("create directory", cache_dir))?;
    let unique = format!("{}-{:?}", std::process::id(), std::thread::current().id());
    let tree = cache_dir.join(format!("busybox-tree-{unique}"));
    let tmp = cache_dir.join(format!("{name}.{unique}.tmp"));
    let built = busybox_tree(&tree).and_then(|()| make(&tree, &tmp));
    let _ = fs::remove_dir_all(&tree);
    if let Err(e) = built {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &image).map_err(io("rename", &image))?;
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_tree_has_shell_and_users() {
        let dir = tempfile::tempdir().unwrap();
        busybox_tree(dir.path()).unwrap();
        assert!(
            dir.path()
                .join("bin/sh")
                .symlink_metadata()
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let passwd = fs::read_to_string(dir.path().join("etc/passwd")).unwrap();
        assert!(passwd.contains("app:x:1000:1000"));
    }
}
