//! Initramfs images in the kernel's `newc` cpio format, written in Rust (no root, no `cpio` tool).
//!
//! [`write_base`] makes the per-host base image (init and the few nodes the kernel needs before init
//! runs); [`compose`] appends a second archive with the machine's run config. The kernel unpacks
//! concatenated archives in order, so composing costs one file copy and no re-encoding.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use aloft_guest_proto::{RUN_CONFIG_PATH, RunConfig};

/// Why an initramfs could not be written.
#[derive(Debug, thiserror::Error)]
#[expect(missing_docs, reason = "fields are named for what the #[error] message says")]
pub enum InitramfsError {
    /// An input file could not be read.
    #[error("read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The output could not be written.
    #[error("write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The base image is not a newc archive.
    #[error("{} is not a newc cpio archive: rebuild it (cargo xtask guest)", path.display())]
    NotCpio { path: PathBuf },
    /// A file exceeds cpio's 4 GiB entry size.
    #[error("{name} is too large for a cpio entry")]
    TooLarge { name: String },
    /// The run config could not be serialized.
    #[error("serialize the run config")]
    RunConfig(#[source] serde_json::Error),
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;
const MAGIC: &[u8] = b"070701";

/// One archive being built in memory.
#[derive(Debug, Default)]
pub(crate) struct Newc {
    buf: Vec<u8>,
    ino: u32,
}

impl Newc {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> Result<(), InitramfsError> {
        let too_large = || InitramfsError::TooLarge {
            name: name.to_owned(),
        };
        let size = u32::try_from(data.len()).map_err(|_| too_large())?;
        let namesize = u32::try_from(name.len() + 1).map_err(|_| too_large())?;
        self.ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        self.buf.extend_from_slice(MAGIC);
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub(crate) fn dir(&mut self, name: &str, perm: u32) -> Result<(), InitramfsError> {
        self.entry(name, S_IFDIR | perm, (0, 0), &[])
    }

    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), InitramfsError> {
        self.entry(name, S_IFREG | perm, (0, 0), data)
    }

    pub(crate) fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), InitramfsError> {
        self.entry(name, S_IFCHR | perm, (major, minor), &[])
    }

    /// Adds the trailer and returns the bytes.
    pub(crate) fn finish(mut self) -> Result<Vec<u8>, InitramfsError> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.buf)
    }
}

/// The base archive's bytes for an init binary's contents.
pub(crate) fn base_bytes(init: &[u8]) -> Result<Vec<u8>, InitramfsError> {
    let mut a = Newc::default();
    for d in ["dev", "proc", "sys", "aloft"] {
        a.dir(d, 0o755)?;
    }
    a.char_dev("dev/console", 0o600, 5, 1)?;
    a.file("init", 0o755, init)?;
    a.finish()
}

/// The run-config archive's bytes.
pub(crate) fn run_config_bytes(run_config: &RunConfig) -> Result<Vec<u8>, InitramfsError> {
    let json = serde_json::to_vec(run_config).map_err(InitramfsError::RunConfig)?;
    let path = RUN_CONFIG_PATH.trim_start_matches('/');
    let mut a = Newc::default();
    if let Some((dir, _)) = path.rsplit_once('/') {
        a.dir(dir, 0o755)?;
    }
    // Root-only: the run config carries the machine's environment, secrets included.
    a.file(path, 0o400, &json)?;
    a.finish()
}

/// Writes `bytes` to `out` through a temporary file next to it, so readers never see half a file.
fn write_atomic(out: &Path, parts: &[&[u8]]) -> Result<(), InitramfsError> {
    let err = |source| InitramfsError::Write {
        path: out.to_owned(),
        source,
    };
    let mut tmp_name = out.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let res = (|| {
        let mut f = fs::File::create(&tmp)?;
        for p in parts {
            f.write_all(p)?;
        }
        f.sync_data()?;
        fs::rename(&tmp, out)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map_err(err)
}

/// Writes the base initramfs: `/init` (0755, `init_binary`), `/dev/console` (char 5:1), `/dev`,
/// `/proc`, `/sys`, `/aloft`.
pub fn write_base(init_binary: &Path, out: &Path) -> Result<(), InitramfsError> {
    let init = fs::read(init_binary).map_err(|source| InitramfsError::Read {
        path: init_binary.to_owned(),
        source,
    })?;
    write_atomic(out, &[&base_bytes(&init)?])
}

/// Writes `base` followed by an archive holding [`RUN_CONFIG_PATH`] to `out`.
pub fn compose(base: &Path, run_config: &RunConfig, out: &Path) -> Result<(), InitramfsError> {
    let base_data = fs::read(base).map_err(|source| InitramfsError::Read {
        path: base.to_owned(),
        source,
    })?;
    if !base_data.starts_with(MAGIC) || !base_data.len().is_multiple_of(4) {
        return Err(InitramfsError::NotCpio {
            path: base.to_owned(),
        });
    }
    write_atomic(out, &[&base_data, &run_config_bytes(run_config)?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn cpio_list(bytes: &[u8]) -> String {
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cpio is installed");
        child.stdin.take().unwrap().write_all(bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn base_archive_lists_with_system_cpio() {
        let bytes = base_bytes(b"\x7fELF fake init").unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let list = cpio_list(&bytes);
        let lines: Vec<&str> = list.lines().collect();
        assert_eq!(lines.len(), 6, "{list}");
        let find = |name: &str| {
            *lines
                .iter()
                .find(|l| l.ends_with(&format!(" {name}")))
                .unwrap_or_else(|| panic!("{name} missing: {list}"))
        };
        assert!(find("init").starts_with("-rwxr-xr-x"));
        assert!(find("dev/console").starts_with("crw-------"));
        assert!(find("dev/console").contains("5,"));
        for d in ["dev", "proc", "sys", "aloft"] {
            assert!(find(d).starts_with("drwxr-xr-x"));
        }
    }

    #[test]
    fn composed_archive_extracts_run_config() {
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("init");
        fs::write(&init, b"#!init").unwrap();
        let base = dir.path().join("base.cpio");
        write_base(&init, &base).unwrap();
        let cfg = RunConfig {
            hostname: "m1".into(),
            ..RunConfig::default()
        };
        let out = dir.path().join("composed.cpio");
        compose(&base, &cfg, &out).unwrap();
        let bytes = fs::read(&out).unwrap();
        // GNU cpio stops at the first trailer; the kernel reads on. List the second archive alone.
        let base_len = fs::read(&base).unwrap().len();
        assert_eq!(&bytes[..base_len], &fs::read(&base).unwrap()[..]);
        let list = cpio_list(&bytes[base_len..]);
        assert!(
            list.contains("-r-------- ") && list.contains("aloft/run.json"),
            "{list}"
        );
        // Extract and compare the JSON.
        let x = dir.path().join("x");
        fs::create_dir(&x).unwrap();
        let mut child = Command::new("cpio")
            .args(["-i", "-d", "--quiet", "aloft/run.json"])
            .current_dir(&x)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes[base_len..]).unwrap();
        assert!(child.wait().unwrap().success());
        let back: RunConfig = serde_json::from_slice(&fs::read(x.join("aloft/run.json")).unwrap()).unwrap();
        assert_eq!(back, cfg);
        assert!(!dir.path().join("composed.cpio.tmp").exists());
    }

    #[test]
    fn compose_rejects_non_cpio_base() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        fs::write(&base, b"not an archive").unwrap();
        let e = compose(&base, &RunConfig::default(), &dir.path().join("o")).unwrap_err();
        assert!(matches!(e, InitramfsError::NotCpio { .. }));
    }
}
