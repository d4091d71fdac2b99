//! Busybox root filesystems and writable disks.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{FixtureError, run};

const BUSYBOX: &str = "/bin/busybox";

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FixtureError {
    let path = path.to_path_buf();
    move |source| FixtureError::Io { what, path, source }
}

/// Writes a busybox root tree into `dir`: `/bin/busybox` with every applet linked in `/bin`, users
/// `root`, `app` (1000, owning `/home/app`) and `nobody` (65534), `/tmp` (1777), empty `/etc/hosts`
/// and friends, and `/var/www/index.html` ("hello from the guest") for HTTP tests.
pub fn busybox_tree(dir: &Path) -> Result<(), FixtureError> {
    for d in [
        "bin", "sbin", "etc", "tmp", "root", "home/app", "proc", "sys", "dev", "run", "var/www",
    ] {
        fs::create_dir_all(dir.join(d)).map_err(io("create directory", &dir.join(d)))?;
    }
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).map_err(io("chmod", dir))?;
    let bb = dir.join("bin/busybox");
    fs::copy(BUSYBOX, &bb).map_err(io("copy busybox (install busybox-static)", Path::new(BUSYBOX)))?;
    let list = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .map_err(io("run busybox --list", Path::new(BUSYBOX)))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let link = dir.join("bin").join(applet);
        if !link.exists() {
            symlink("busybox", &link).map_err(io("symlink applet", &link))?;
        }
    }
    std::os::unix::fs::chown(dir.join("home/app"), Some(1000), Some(1000))
        .map_err(io("chown", &dir.join("home/app")))?;
    let files: [(&str, &str); 6] = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        (
            "etc/group",
            "root:x:0:\napp:x:1000:\nextra:x:2000:app\nnogroup:x:65534:\n",
        ),
        ("etc/hosts", ""),
        ("etc/resolv.conf", ""),
        ("etc/hostname", ""),
        ("var/www/index.html", "hello from the guest\n"),
    ];
    for (name, contents) in files {
        fs::write(dir.join(name), contents).map_err(io("write", &dir.join(name)))?;
    }
    Ok(())
}

/// Packs `dir` into an ext4 image of `size_mib` (sparse), owned as in the tree.
pub fn ext4_from_dir(dir: &Path, image: &Path, size_mib: u32) -> Result<(), FixtureError> {
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(dir)
        .arg(image)
        .arg(format!("{size_mib}M")))
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
    // Bump the version when the tree changes, so stale cached images are not reused.
    let image = cache_dir.join("busybox-rootfs-v2.ext4");
    if image.is_file() {
        return Ok(image);
    }
    fs::create_dir_all(cache_dir).map_err(io("create directory", cache_dir))?;
    let unique = format!("{}-{:?}", std::process::id(), std::thread::current().id());
    let tree = cache_dir.join(format!("busybox-tree-{unique}"));
    let tmp = cache_dir.join(format!("busybox-rootfs-{unique}.ext4"));
    let built = busybox_tree(&tree).and_then(|()| ext4_from_dir(&tree, &tmp, 32));
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
