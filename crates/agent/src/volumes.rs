//! Volume disks on the host ([`VolumeStore`], used by [`crate::VmDriver`]): one sparse file per
//! volume, `<dir>/<volume id>.ext4`, holding an ext4 filesystem that fills it. The file is the
//! record: a volume exists on this host exactly when its disk does.
//!
//! - **Create**: `mkfs.ext4` into a temporary file beside the disk (sparse; journalled, unlike a
//!   machine's throw-away writable layer, since a volume must survive a host crash; inode tables
//!   and journal left to lazy init, and the discard mke2fs does first punches holes that read as
//!   zeros, so it writes only a few MiB whatever the size), fsync, rename into place (never over
//!   an existing disk), fsync the directory. A crash leaves no disk or a whole one, plus at most a
//!   temporary file that [`VolumeStore::open`] removes.
//! - **Extend**: `<id>.grow` is written and fsynced *before* the file grows, and removed only once
//!   the filesystem fills the file (`e2fsck -fp`, then `resize2fs`), so a crash anywhere leaves the
//!   record of what is still to do and redoing it is harmless. The file grows at once, which is
//!   safe under a running VM (QEMU keeps the size it opened); the filesystem grows only while no
//!   VM has the disk, when the agent says so ([`VolumeStore::grow_fs`]).
//! - **Usage**: read from the ext4 superblock in the file ([`parse_superblock`]).
//!
//! Blocking (it runs e2fsprogs); the agent serializes the calls for one volume.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use aloft_api::{MAX_VOLUME_SIZE_GB, VolumeId, VolumeUsage};

use crate::driver::VolumeDisk;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Bytes in one GB of a volume's size (sizes are GiB, as Fly's are).
pub(crate) const GIB: u64 = 1 << 30;

/// Why a volume's disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A file operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An e2fsprogs tool failed or is missing.
    #[error("{tool} {} failed (e2fsprogs must be installed on the host): {detail}", path.display())]
    Tool {
        /// `mkfs.ext4`, `e2fsck` or `resize2fs`.
        tool: &'static str,
        /// The disk.
        path: PathBuf,
        /// Its exit status and stderr.
        detail: String,
    },
    /// No disk of this volume on this host.
    #[error("volume {volume} has no disk on this host")]
    NotFound {
        /// The volume.
        volume: VolumeId,
    },
    /// A size out of range, or smaller than the disk (volumes never shrink).
    #[error("volume {volume}: {reason}")]
    Size {
        /// The volume.
        volume: VolumeId,
        /// What is wrong with the size.
        reason: String,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> VolumeError {
    let path = path.to_owned();
    move |source| VolumeError::Io { what, path, source }
}

/// The volume disks in one directory. See the module doc.
#[derive(Debug, Clone)]
pub(crate) struct VolumeStore {
    dir: PathBuf,
}

impl VolumeStore {
    /// Opens (creating, mode 0700) `dir` and removes the temporary files a crashed process left.
    pub(crate) fn open(dir: &Path) -> Result<Self, VolumeError> {
        use std::os::unix::fs::DirBuilderExt as _;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create directory", dir))?;
        let mine = format!(".{}.", std::process::id());
        for entry in fs::read_dir(dir).map_err(io_err("list", dir))?.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // `.<id>.ext4.<pid>.<n>.tmp`: only other (dead) processes' ones; ours may be in use.
            if name.starts_with('.') && name.ends_with(".tmp") && !name.contains(&format!(".ext4{mine}")) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Self { dir: dir.to_owned() })
    }

    /// The disk of volume `id`.
    pub(crate) fn disk(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("{id}.ext4"))
    }

    /// The record of a filesystem still to grow.
    fn grow_marker(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("{id}.grow"))
    }

    fn temp(&self, id: &VolumeId) -> PathBuf {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!(".{id}.ext4.{}.{n}.tmp", std::process::id()))
    }

    fn sync_dir(&self) -> Result<(), VolumeError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync", &self.dir))
    }

    /// Makes the disk of `id`: `size_gb` GiB of empty ext4. Kept as it is when it exists.
    pub(crate) fn create(&self, id: &VolumeId, size_gb: u32) -> Result<(), VolumeError> {
        self.create_with(id, size_gb, mkfs)
    }

    /// [`VolumeStore::create`] with `make` writing the filesystem into the sized temporary file.
    fn create_with(
        &self,
        id: &VolumeId,
        size_gb: u32,
        make: impl FnOnce(&Path) -> Result<(), VolumeError>,
    ) -> Result<(), VolumeError> {
        let size = size_bytes(id, size_gb)?;
        let path = self.disk(id);
        if path.exists() {
            return Ok(());
        }
        let tmp = self.temp(id);
        let made = (|| {
            let f = File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err("create", &tmp))?;
            f.set_len(size).map_err(io_err("size", &tmp))?;
            drop(f);
            make(&tmp)?;
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io_err("fsync", &tmp))?;
            rename_new(&tmp, &path)?;
            self.sync_dir()
        })();
        // After a successful rename there is no temporary file left to remove.
        let _ = fs::remove_file(&tmp);
        made
    }

    /// The disk of `id`, its size, its filesystem's figures; `None` when there is no disk.
    pub(crate) fn status(&self, id: &VolumeId) -> Result<Option<VolumeDisk>, VolumeError> {
        let path = self.disk(id);
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("inspect", &path)(e)),
        };
        Ok(Some(VolumeDisk {
            usage: read_usage(&path).ok().flatten(),
            size_bytes: meta.len(),
            grow_pending: self.grow_marker(id).exists(),
            path,
        }))
    }

    /// Grows the disk of `id` to `size_gb` GiB and records that its filesystem must follow
    /// ([`VolumeStore::grow_fs`] does that). The filesystem is not touched: safe while a VM runs
    /// from the disk. The disk's own size again is a retry and only keeps the record.
    pub(crate) fn extend(&self, id: &VolumeId, size_gb: u32) -> Result<(), VolumeError> {
        let size = size_bytes(id, size_gb)?;
        let path = self.disk(id);
        let file = match File::options().write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(VolumeError::NotFound { volume: id.clone() });
            }
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let current = file.metadata().map_err(io_err("inspect", &path))?.len();
        if size < current {
            return Err(VolumeError::Size {
                volume: id.clone(),
                reason: format!(
                    "its disk is {} GB already and volumes never shrink: ask for more than that",
                    current / GIB
                ),
            });
        }
        // The record first: a crash after the file grew must not leave the filesystem behind.
        let marker = self.grow_marker(id);
        if !marker.exists() {
            File::options()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&marker)
                .and_then(|f| f.sync_all())
                .map_err(io_err("create", &marker))?;
            self.sync_dir()?;
        }
        if size > current {
            file.set_len(size).map_err(io_err("grow", &path))?;
            file.sync_all().map_err(io_err("fsync", &path))?;
        }
        Ok(())
    }

    /// Grows the filesystem of `id` to fill its disk when [`VolumeStore::extend`] left that to
    /// do; `true` when it did. **Only while no VM has the disk open**: `e2fsck -fp` (resize2fs
    /// refuses a filesystem mounted since its last check), then `resize2fs`, both offline.
    pub(crate) fn grow_fs(&self, id: &VolumeId) -> Result<bool, VolumeError> {
        let marker = self.grow_marker(id);
        if !marker.exists() {
            return Ok(false);
        }
        let path = self.disk(id);
        if !path.exists() {
            // The volume is gone: nothing left to grow.
            let _ = fs::remove_file(&marker);
            return Ok(false);
        }
        // e2fsck -p: 0 clean, 1 errors fixed, 2 fixed and "reboot" (meaningless offline); 4 and
        // up are errors it could not fix, which resize2fs must not run on.
        run("e2fsck", &path, &["-f", "-p"], |code| code <= 2)?;
        run("resize2fs", &path, &[], |code| code == 0)?;
        fs::remove_file(&marker).map_err(io_err("remove", &marker))?;
        self.sync_dir()?;
        Ok(true)
    }

    /// Deletes the disk of `id` (and any record of a pending growth); succeeds if there is none.
    pub(crate) fn remove(&self, id: &VolumeId) -> Result<(), VolumeError> {
        let path = self.disk(id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("remove", &path)(e)),
            _ => {}
        }
        let marker = self.grow_marker(id);
        match fs::remove_file(&marker) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &marker)(e)),
            _ => self.sync_dir(),
        }
    }
}

/// `size_gb` in bytes, checked against Fly's range.
fn size_bytes(id: &VolumeId, size_gb: u32) -> Result<u64, VolumeError> {
    if (1..=MAX_VOLUME_SIZE_GB).contains(&size_gb) {
        Ok(u64::from(size_gb) * GIB)
    } else {
        Err(VolumeError::Size {
            volume: id.clone(),
            reason: format!("size {size_gb} GB is out of range: a volume holds 1 to {MAX_VOLUME_SIZE_GB} GB"),
        })
    }
}

/// Renames `from` to `to` unless `to` exists (then `from` is left for the caller to remove: a
/// disk made meanwhile wins).
fn rename_new(from: &Path, to: &Path) -> Result<(), VolumeError> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    use rustix::io::Errno;
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        // A filesystem without RENAME_NOREPLACE: the agent serializes creates of one volume.
        Err(Errno::INVAL | Errno::NOSYS) => fs::rename(from, to).map_err(io_err("rename into place", to)),
        Err(e) => Err(io_err("rename into place", to)(e.into())),
    }
}

/// `mkfs.ext4` over the whole of `path` (see the module doc for the options).
fn mkfs(path: &Path) -> Result<(), VolumeError> {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096"])
        // The whole size is the user's: no blocks reserved for root (nothing else shares the
        // filesystem, and most workloads run as root anyway).
        .args(["-m", "0"])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
        .arg(path)
        .output()
        .map_err(|source| tool_missing("mkfs.ext4", path, &source))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(VolumeError::Tool {
            tool: "mkfs.ext4",
            path: path.to_owned(),
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        })
    }
}

fn tool_missing(tool: &'static str, path: &Path, e: &io::Error) -> VolumeError {
    VolumeError::Tool {
        tool,
        path: path.to_owned(),
        detail: format!("could not run it: {e}"),
    }
}

/// Runs an e2fsprogs `tool` on `path`; `ok` says which exit codes are success.
fn run(tool: &'static str, path: &Path, args: &[&str], ok: impl Fn(i32) -> bool) -> Result<(), VolumeError> {
    let out = Command::new(tool)
        .args(args)
        .arg(path)
        .output()
        .map_err(|source| tool_missing(tool, path, &source))?;
    match out.status.code() {
        Some(code) if ok(code) => Ok(()),
        _ => Err(VolumeError::Tool {
            tool,
            path: path.to_owned(),
            detail: format!(
                "{}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }),
    }
}

/// The figures in the ext4 superblock of the filesystem in `path`; `None` when it holds none.
pub(crate) fn read_usage(path: &Path) -> io::Result<Option<VolumeUsage>> {
    let mut sb = [0u8; 1024];
    File::open(path)?.read_exact_at(&mut sb, 1024)?;
    Ok(parse_superblock(&sb))
}

/// An ext2/3/4 superblock (the 1024 bytes at offset 1024) read for its block counts; `None` when
/// it is not one (bad magic, an impossible block size).
pub(crate) fn parse_superblock(sb: &[u8]) -> Option<VolumeUsage> {
    let u32_at = |off: usize| -> Option<u64> {
        let b: [u8; 4] = sb.get(off..off + 4)?.try_into().ok()?;
        Some(u64::from(u32::from_le_bytes(b)))
    };
    let magic = u16::from_le_bytes(sb.get(0x38..0x3a)?.try_into().ok()?);
    if magic != 0xEF53 {
        return None;
    }
    // ext4 blocks are 1 KiB to 64 KiB.
    let log_block_size = u32_at(24)?;
    if log_block_size > 6 {
        return None;
    }
    let wide = u32_at(0x60)? & 0x80 != 0; // INCOMPAT_64BIT: the counts have high halves
    let count = |lo: usize, hi: usize| -> Option<u64> {
        let high = if wide { u32_at(hi)? } else { 0 };
        Some(high << 32 | u32_at(lo)?)
    };
    let blocks = count(4, 0x150)?;
    let reserved = count(8, 0x154)?;
    let free = count(12, 0x158)?;
    Some(VolumeUsage {
        block_size: 1024 << log_block_size,
        blocks,
        blocks_free: free,
        blocks_avail: free.saturating_sub(reserved),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn vol(s: &str) -> VolumeId {
        s.parse().unwrap()
    }

    #[test]
    fn superblocks_are_parsed_from_real_filesystems() {
        let dir = tempfile::tempdir().unwrap();
        // 64bit and not, 1 KiB and 4 KiB blocks, with and without reserved blocks.
        for (features, block, reserve_pct) in [("64bit", 4096u64, "5"), ("^64bit", 1024, "0")] {
            let path = dir.path().join(format!("fs-{block}"));
            File::create(&path).unwrap().set_len(64 << 20).unwrap();
            let out = Command::new("mkfs.ext4")
                .args([
                    "-q",
                    "-F",
                    "-O",
                    features,
                    "-b",
                    &block.to_string(),
                    "-m",
                    reserve_pct,
                ])
                .arg(&path)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let u = read_usage(&path).unwrap().unwrap();
            assert_eq!(u.block_size, block);
            assert_eq!(u.blocks * block, 64 << 20, "{u:?}");
            assert!(u.blocks_free > 0 && u.blocks_free < u.blocks, "{u:?}");
            let reserved = u.blocks_free - u.blocks_avail;
            if reserve_pct == "0" {
                assert_eq!(reserved, 0, "{u:?}");
            } else {
                // 5 % of the blocks, as mke2fs rounds it.
                assert_eq!(reserved, u.blocks * 5 / 100, "{u:?}");
            }
            // dumpe2fs agrees on the free count.
            let dump = Command::new("dumpe2fs").arg("-h").arg(&path).output().unwrap();
            let text = String::from_utf8_lossy(&dump.stdout);
            let free: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("Free blocks:"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert_eq!(u.blocks_free, free);
        }
    }

    #[test]
    fn superblock_parsing_refuses_what_is_not_ext4_and_reads_high_halves() {
        assert_eq!(parse_superblock(&[0u8; 1024]), None);
        assert_eq!(parse_superblock(&[0u8; 10]), None);
        let mut sb = [0u8; 1024];
        sb[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[24] = 2; // 4 KiB
        sb[4..8].copy_from_slice(&7u32.to_le_bytes());
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        sb[12..16].copy_from_slice(&5u32.to_le_bytes());
        sb[8..12].copy_from_slice(&2u32.to_le_bytes());
        // Without the 64bit feature the high halves do not count.
        let u = parse_superblock(&sb).unwrap();
        assert_eq!(
            (u.block_size, u.blocks, u.blocks_free, u.blocks_avail),
            (4096, 7, 5, 3)
        );
        sb[0x60] = 0x80;
        assert_eq!(parse_superblock(&sb).unwrap().blocks, (1 << 32) + 7);
        sb[24] = 40;
        assert_eq!(parse_superblock(&sb), None);
    }

    #[test]
    fn volumes_are_made_once_grown_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        // A temporary file a crashed process left is removed on open.
        std::fs::create_dir_all(dir.path().join("v")).unwrap();
        let stale = dir.path().join("v/.vol_x.ext4.1.0.tmp");
        std::fs::write(&stale, b"half").unwrap();
        let store = VolumeStore::open(&dir.path().join("v")).unwrap();
        assert!(!stale.exists());
        let id = vol("vol_0123456789abcdef");
        assert!(store.status(&id).unwrap().is_none());
        let t = std::time::Instant::now();
        store.create(&id, 2).unwrap();
        let made_in = t.elapsed();
        let disk = store.status(&id).unwrap().unwrap();
        assert_eq!(disk.size_bytes, 2 * GIB);
        assert!(!disk.grow_pending);
        let u = disk.usage.unwrap();
        assert_eq!(u.blocks * u.block_size, 2 * GIB, "{u:?}");
        assert_eq!(u.blocks_free, u.blocks_avail, "no blocks reserved for root");
        let allocated = fs::metadata(&disk.path).unwrap().blocks() * 512;
        assert!(
            allocated < 64 << 20,
            "sparse: {allocated} bytes allocated in {made_in:?}"
        );
        assert_eq!(fs::metadata(&disk.path).unwrap().mode() & 0o777, 0o600);

        // Idempotent: a second create keeps the disk (and its data) whatever the size asked.
        fs::OpenOptions::new()
            .write(true)
            .open(&disk.path)
            .unwrap()
            .write_all_at(b"marker", 1 << 30)
            .unwrap();
        store.create(&id, 5).unwrap();
        let again = store.status(&id).unwrap().unwrap();
        assert_eq!(again.size_bytes, 2 * GIB);
        let mut buf = [0u8; 6];
        File::open(&disk.path)
            .unwrap()
            .read_exact_at(&mut buf, 1 << 30)
            .unwrap();
        assert_eq!(&buf, b"marker");
        // No temporary files were left.
        let names: Vec<_> = fs::read_dir(dir.path().join("v"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["vol_0123456789abcdef.ext4"]);
    }

    #[test]
    fn extending_grows_the_disk_then_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(dir.path()).unwrap();
        let id = vol("vol_0123456789abcdef");
        assert!(matches!(store.extend(&id, 2), Err(VolumeError::NotFound { .. })));
        store.create(&id, 1).unwrap();
        assert!(!store.grow_fs(&id).unwrap(), "nothing to grow yet");
        store.extend(&id, 3).unwrap();
        let d = store.status(&id).unwrap().unwrap();
        assert_eq!(d.size_bytes, 3 * GIB);
        assert!(d.grow_pending);
        let before = d.usage.unwrap();
        assert_eq!(before.blocks * before.block_size, GIB, "the filesystem waits");
        // A retry of the same extend keeps the pending growth.
        store.extend(&id, 3).unwrap();
        assert!(store.status(&id).unwrap().unwrap().grow_pending);
        assert!(store.grow_fs(&id).unwrap());
        let d = store.status(&id).unwrap().unwrap();
        assert!(!d.grow_pending);
        let after = d.usage.unwrap();
        assert_eq!(after.blocks * after.block_size, 3 * GIB, "{after:?}");
        assert!(after.blocks_free > before.blocks_free);
        assert!(!store.grow_fs(&id).unwrap(), "done once");
        // Never shrinks; sizes out of range are refused.
        let e = store.extend(&id, 2).unwrap_err();
        assert!(e.to_string().contains("never shrink"), "{e}");
        assert!(matches!(store.extend(&id, 501), Err(VolumeError::Size { .. })));
        assert!(matches!(
            store.create(&vol("vol_x"), 0),
            Err(VolumeError::Size { .. })
        ));
        assert!(
            store.status(&vol("vol_x")).unwrap().is_none(),
            "nothing left behind"
        );
        // The filesystem is sound after all this.
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(store.disk(&id))
            .output()
            .unwrap();
        assert!(fsck.status.success(), "{fsck:?}");

        store.remove(&id).unwrap();
        assert!(store.status(&id).unwrap().is_none());
        store.remove(&id).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_failed_make_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(dir.path()).unwrap();
        let id = vol("vol_abc");
        let res = store.create_with(&id, 1, |tmp| {
            assert!(tmp.is_file(), "the temporary disk exists while it is made");
            Err(VolumeError::Tool {
                tool: "mkfs.ext4",
                path: tmp.to_owned(),
                detail: "injected".into(),
            })
        });
        assert!(matches!(res, Err(VolumeError::Tool { .. })), "{res:?}");
        assert!(store.status(&id).unwrap().is_none());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the temporary file is gone"
        );
    }
}
