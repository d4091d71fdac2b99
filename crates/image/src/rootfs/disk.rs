//! Per-machine writable disks: the empty ext4 filesystem `aloft-init` mounts as the overlay's upper
//! layer over the read-only base.
//!
//! Making a filesystem costs tens to hundreds of milliseconds, so it is done once per size: a
//! template `<root>/disks/ext4-<MiB>.img` (sparse, no journal, inode tables initialised, so the
//! guest has no background work either) is made under a lock the first time a size is asked for.
//! Each machine's disk is then a clone of it: `FICLONE` where the filesystem shares extents
//! (btrfs, xfs), otherwise a sparse copy of only the template's data extents (`SEEK_DATA` /
//! `SEEK_HOLE` and `copy_file_range`), a few MiB at most. The clone is written to a temporary name
//! next to the destination and renamed over it, so [`WritableDisks::create`] also resets a disk
//! (a stopped machine's writable layer is thrown away) and a reader never sees half a disk.
//!
//! The clone is not fsynced: a writable layer does not outlive a host crash (the machine's disk is
//! reset on its next start anyway), and an fsync would cost more than the copy.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::SeekFrom;
use rustix::io::Errno;

static DISK_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Why a writable disk could not be made.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs, reason = "fields are named for what the #[error] message says")]
pub enum DiskError {
    /// A filesystem operation failed.
    #[error("writable disk: {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `mkfs.ext4` could not make the template.
    #[error("make the writable disk template {path} with mkfs.ext4 (install e2fsprogs): {detail}")]
    Mkfs { path: PathBuf, detail: String },
    /// The size asked for is out of range.
    #[error("writable disk size {size_mib} MiB is out of range: use 16 MiB to 16 TiB")]
    Size { size_mib: u64 },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DiskError {
    let path = path.to_path_buf();
    move |source| DiskError::Io { what, path, source }
}

/// How a file was cloned ([`clone_file`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// The filesystem shared the template's extents (`FICLONE`).
    Reflink,
    /// The template's data extents were copied (`copy_file_range`), holes left as holes.
    SparseCopy,
}

/// Makes writable disks from per-size templates under `<root>/disks`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WritableDisks {
    dir: PathBuf,
}

impl WritableDisks {
    /// Opens (creating if needed) the template directory under `cache_root`.
    pub fn open(cache_root: &Path) -> Result<Self, DiskError> {
        let dir = cache_root.join("disks");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create directory", &dir))?;
        Ok(Self { dir })
    }

    /// The template for `size_mib`, made now if it does not exist yet.
    pub fn template(&self, size_mib: u64) -> Result<PathBuf, DiskError> {
        if !(16..=16 << 20).contains(&size_mib) {
            return Err(DiskError::Size { size_mib });
        }
        let path = self.dir.join(format!("ext4-{size_mib}.img"));
        if path.is_file() {
            return Ok(path);
        }
        let lock_path = self.dir.join(format!("ext4-{size_mib}.lock"));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open lock", &lock_path))?;
        lock.lock().map_err(io_err("lock", &lock_path))?;
        if path.is_file() {
            return Ok(path);
        }
        let n = DISK_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".ext4-{size_mib}.{}.{n}.tmp", std::process::id()));
        let made = make_template(&tmp, size_mib).and_then(|()| {
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io_err("fsync", &tmp))?;
            fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("fsync", &self.dir))
        });
        if made.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        made.map(|()| path)
    }

    /// Makes `dest` a fresh, empty ext4 disk of `size_mib` (replacing whatever was there: this is
    /// also how a disk is reset). `dest`'s directory must be on one filesystem with itself.
    pub fn create(&self, dest: &Path, size_mib: u64) -> Result<CloneMethod, DiskError> {
        let template = self.template(size_mib)?;
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = DISK_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = parent.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        let cloned = clone_file(&template, &tmp)
            .and_then(|method| fs::rename(&tmp, dest).map(|()| method))
            .map_err(io_err("clone the template to", dest));
        if cloned.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        cloned
    }
}

impl WritableDisks {
    /// Resets a stopped machine's writable disk: the same as [`create`](Self::create), spelled for
    /// the caller that throws a writable layer away.
    pub fn reset(&self, disk: &Path, size_mib: u64) -> Result<CloneMethod, DiskError> {
        self.create(disk, size_mib)
    }
}

fn make_template(path: &Path, size_mib: u64) -> Result<(), DiskError> {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
        .args(["-O", "^has_journal"])
        .args(["-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard"])
        .args(["-L", "aloft-rw"])
        .arg(path)
        .arg(format!("{size_mib}M"))
        .output()
        .map_err(io_err("run mkfs.ext4 for", path))?;
    if out.status.success() {
        return Ok(());
    }
    Err(DiskError::Mkfs {
        path: path.to_owned(),
        detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
    })
}

/// Clones `src` into the new file `dst` (created mode 0600; an existing `dst` is an error):
/// `FICLONE` when the filesystem shares extents (btrfs, xfs: instant, no space taken), else a
/// sparse copy of `src`'s data extents ([`data_extents`]) with `copy_file_range`, holes left as
/// holes. Not fsynced: the caller does that if the copy must outlive a crash. `dst` is left
/// behind on failure, for the caller (who named it) to remove.
pub fn clone_file(src: &Path, dst: &Path) -> io::Result<CloneMethod> {
    let from = File::open(src)?;
    let to = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)?;
    match rustix::fs::ioctl_ficlone(&to, &from) {
        Ok(()) => return Ok(CloneMethod::Reflink),
        Err(Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOTTY | Errno::BADF) => {}
        Err(e) => return Err(e.into()),
    }
    let len = from.metadata()?.len();
    to.set_len(len)?;
    for extent in data_extents(&from, len) {
        let extent = extent?;
        let (mut off_in, mut off_out) = (extent.start, extent.start);
        while off_in < extent.end {
            let chunk = usize::try_from(extent.end - off_in)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            let n = rustix::fs::copy_file_range(&from, Some(&mut off_in), &to, Some(&mut off_out), chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} shrank while it was copied", src.display()),
                ));
            }
        }
    }
    Ok(CloneMethod::SparseCopy)
}

/// The data extents of the first `len` bytes of `file`, in order, as byte ranges: what
/// `SEEK_DATA` / `SEEK_HOLE` report, so adjacent allocated extents come as one range and holes
/// are skipped (a filesystem without hole reporting gives one range, the whole file).
pub fn data_extents(file: &File, len: u64) -> DataExtents<'_> {
    DataExtents { file, len, pos: 0 }
}

/// The iterator [`data_extents`] returns.
#[derive(Debug)]
pub struct DataExtents<'a> {
    file: &'a File,
    len: u64,
    pos: u64,
}

impl Iterator for DataExtents<'_> {
    type Item = io::Result<std::ops::Range<u64>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.len {
            return None;
        }
        let data = match rustix::fs::seek(self.file, SeekFrom::Data(self.pos)) {
            Ok(d) if d < self.len => d,
            // Only a hole is left (or data past `len`).
            Ok(_) | Err(Errno::NXIO) => {
                self.pos = self.len;
                return None;
            }
            Err(e) => {
                self.pos = self.len;
                return Some(Err(e.into()));
            }
        };
        let hole = match rustix::fs::seek(self.file, SeekFrom::Hole(data)) {
            Ok(h) => h.min(self.len),
            Err(e) => {
                self.pos = self.len;
                return Some(Err(e.into()));
            }
        };
        self.pos = hole;
        Some(Ok(data..hole))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        use std::io::{Seek, Write};
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(io::SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.seek(io::SeekFrom::Start((64 << 20) - 4096)).unwrap();
        f.write_all(&[9u8; 4096]).unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        clone_file(&src, &dst).unwrap();
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        let blocks = fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(blocks < 1 << 20, "copy is sparse: {blocks} bytes allocated");
    }

    #[test]
    fn data_extents_are_the_data_and_not_the_holes() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 8192], 8 << 20).unwrap();
        f.write_all_at(&[9u8; 4096], (64 << 20) - 4096).unwrap();
        let f = File::open(&path).unwrap();
        let len = f.metadata().unwrap().len();
        let extents: Vec<_> = data_extents(&f, len).map(Result::unwrap).collect();
        assert_eq!(
            extents,
            [(8 << 20)..(8 << 20) + 8192, (64 << 20) - 4096..64 << 20]
        );
        // Bounded by `len`; an empty file has none.
        let mut first = data_extents(&f, (8 << 20) + 4096).map(Result::unwrap);
        assert_eq!(first.next(), Some((8 << 20)..(8 << 20) + 4096));
        assert_eq!(first.next(), None);
        let empty = File::create(dir.path().join("e")).unwrap();
        assert_eq!(data_extents(&empty, 0).count(), 0);
        // clone_file refuses to overwrite.
        let e = clone_file(&path, &path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn size_out_of_range_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let disks = WritableDisks::open(dir.path()).unwrap();
        assert!(matches!(
            disks.create(&dir.path().join("d"), 1),
            Err(DiskError::Size { size_mib: 1 })
        ));
        assert!(!dir.path().join("d").exists());
    }
}
