//! A busybox root tree from Debian's `busybox-static`: one static binary and a symlink per applet.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use super::BootstrapError;

/// Where Debian's `busybox-static` installs the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Writes a minimal busybox root tree into the existing directory `dir`: `/bin/busybox` (copied
/// from the host's `busybox-static`) with every applet as a symlink in `/bin`; `/sbin`, `/etc`,
/// `/root`, `/proc`, `/sys`, `/dev`, `/run`, `/tmp` (mode 1777); users `root` and `nobody`
/// (65534) in `/etc/passwd` and `/etc/group`; empty `/etc/hosts`, `/etc/resolv.conf` and
/// `/etc/hostname` (init fills them). Files are owned by the calling user.
pub fn busybox_tree(dir: &Path) -> Result<(), BootstrapError> {
    if !Path::new(BUSYBOX).is_file() {
        return Err(BootstrapError::MissingTool {
            path: BUSYBOX.into(),
            package: "busybox-static",
        });
    }
    for d in ["bin", "sbin", "etc", "tmp", "root", "proc", "sys", "dev", "run"] {
        let path = dir.join(d);
        fs::create_dir_all(&path).map_err(BootstrapError::io("create directory", &path))?;
    }
    let tmp = dir.join("tmp");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))
        .map_err(BootstrapError::io("chmod", &tmp))?;
    let bb = dir.join("bin/busybox");
    fs::copy(BUSYBOX, &bb).map_err(BootstrapError::io("copy busybox", Path::new(BUSYBOX)))?;
    let list = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .map_err(BootstrapError::io("run busybox --list", Path::new(BUSYBOX)))?;
    if !list.status.success() {
        return Err(BootstrapError::Command {
            command: format!("{BUSYBOX} --list"),
            status: list.status.to_string(),
            output: String::from_utf8_lossy(&list.stderr).trim().to_owned(),
        });
    }
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') || applet.starts_with('.') {
            continue;
        }
        let link = dir.join("bin").join(applet);
        if link.symlink_metadata().is_err() {
            symlink("busybox", &link).map_err(BootstrapError::io("symlink applet", &link))?;
        }
    }
    let files: [(&str, &str); 5] = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hosts", ""),
        ("etc/resolv.conf", ""),
        ("etc/hostname", ""),
    ];
    for (name, contents) in files {
        let path = dir.join(name);
        fs::write(&path, contents).map_err(BootstrapError::io("write", &path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_has_a_shell_applets_and_users() {
        let dir = tempfile::tempdir().unwrap();
        busybox_tree(dir.path()).unwrap();
        let sh = dir.path().join("bin/sh");
        assert_eq!(fs::read_link(&sh).unwrap(), Path::new("busybox"));
        assert!(dir.path().join("bin/ls").symlink_metadata().is_ok());
        assert_eq!(
            fs::metadata(dir.path().join("tmp")).unwrap().permissions().mode() & 0o7777,
            0o1777
        );
        let passwd = fs::read_to_string(dir.path().join("etc/passwd")).unwrap();
        assert!(passwd.starts_with("root:x:0:0:"));
        // Building over an existing tree is fine (testkit adds to it, then calls again).
        busybox_tree(dir.path()).unwrap();
    }
}
