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
//! - **Snapshots** (`<dir>/snapshots/<snapshot id>.ext4` and `.json`): a copy of the disk
//!   ([`aloft_image::clone_file`]: shared extents where the filesystem can, else only its data
//!   extents; as sparse as the volume), made under a temporary name while whatever writes the
//!   disk is paused (the caller's [`Quiesce`]), fsynced, then its digest ([`digest_file`]: the
//!   SHA-256 of its data extents, each as its offset then its bytes) computed, not paused, and
//!   written to a temporary record. The copy is renamed into place first, its record second:
//!   the record is what makes a snapshot, so a crash leaves none or a whole one, and
//!   [`VolumeStore::open`] removes temporaries and a copy without its record. A snapshot
//!   belongs to no volume's disk: removing the volume leaves it. Deleting removes the record
//!   first.
//! - **Restore / fork**: the snapshot's digest is checked (a copy that no longer matches is
//!   refused: [`VolumeError::Damaged`]), or the source volume's disk is copied paused as for a
//!   snapshot; the copy is made under a temporary name, grown with its filesystem (`e2fsck -fp`,
//!   which also replays a crash-consistent copy's journal, then `resize2fs`) when the size asked
//!   is more than its filesystem, fsynced and renamed into place like a create.
//!
//! Blocking (it runs e2fsprogs); the agent serializes the calls for one volume.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use aloft_api::{SnapshotId, VolumeId, VolumeUsage};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::driver::{SnapshotInfo, VolumeDisk};

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
    /// No snapshot of this id on this host.
    #[error("snapshot {snapshot} is not on this host")]
    NoSnapshot {
        /// The snapshot.
        snapshot: SnapshotId,
    },
    /// A snapshot's content no longer matches the digest taken with it.
    #[error("snapshot {snapshot} is damaged: its content no longer matches its digest; restore another")]
    Damaged {
        /// The snapshot.
        snapshot: SnapshotId,
    },
    /// A snapshot's record could not be read or written.
    #[error("snapshot record {}", path.display())]
    Record {
        /// The record.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// What writes the disk could not be paused for the copy, or continued after it.
    #[error("volume {volume}: {detail}")]
    Pause {
        /// The volume being copied.
        volume: VolumeId,
        /// What failed, naming the machine.
        detail: String,
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
        remove_stray_temps(dir)?;
        let store = Self { dir: dir.to_owned() };
        let snapshots = store.snapshot_dir();
        if snapshots.is_dir() {
            remove_stray_temps(&snapshots)?;
            // A copy renamed into place without its record (a crash between the two renames):
            // never a snapshot anyone was told of.
            for entry in fs::read_dir(&snapshots)
                .map_err(io_err("list", &snapshots))?
                .flatten()
            {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "ext4") && !path.with_extension("json").exists() {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(store)
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
        temp_in(&self.dir, &format!("{id}.ext4"))
    }

    fn sync_dir(&self) -> Result<(), VolumeError> {
        sync_dir(&self.dir)
    }

    /// Where snapshots are kept: `<dir>/snapshots`, one `<snapshot id>.ext4` (the copy) and one
    /// `<snapshot id>.json` (its record, [`SnapshotRecord`]) each.
    fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    /// The copy of snapshot `id`.
    pub(crate) fn snapshot_disk(&self, id: &SnapshotId) -> PathBuf {
        self.snapshot_dir().join(format!("{id}.ext4"))
    }

    fn snapshot_record(&self, id: &SnapshotId) -> PathBuf {
        self.snapshot_dir().join(format!("{id}.json"))
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
        self.install(id, |tmp| {
            let f = File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(tmp)
                .map_err(io_err("create", tmp))?;
            f.set_len(size).map_err(io_err("size", tmp))?;
            drop(f);
            make(tmp)
        })
    }

    /// Makes volume `id`'s disk under a temporary name with `build` (given that name), fsyncs
    /// it, renames it into place (never over a disk made meanwhile, which wins) and fsyncs the
    /// directory; the temporary file is removed whatever happened.
    fn install(
        &self,
        id: &VolumeId,
        build: impl FnOnce(&Path) -> Result<(), VolumeError>,
    ) -> Result<(), VolumeError> {
        let path = self.disk(id);
        let tmp = self.temp(id);
        let made = (|| {
            build(&tmp)?;
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
        resize(&path)?;
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

impl VolumeStore {
    /// Snapshot `snapshot` of volume `id`'s disk. See the module doc; `quiesce` runs the copy
    /// it is given with whatever writes the disk paused (and only the copy: the digest is
    /// computed after). A snapshot of that id already there is answered as it is.
    pub(crate) fn snapshot(
        &self,
        id: &VolumeId,
        snapshot: &SnapshotId,
        quiesce: Quiesce<'_>,
    ) -> Result<SnapshotInfo, VolumeError> {
        if let Some(info) = self.snapshot_info(snapshot)? {
            return Ok(info);
        }
        let disk = self.disk(id);
        if !disk.exists() {
            return Err(VolumeError::NotFound { volume: id.clone() });
        }
        let dir = self.snapshot_dir();
        {
            use std::os::unix::fs::DirBuilderExt as _;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_err("create directory", &dir))?;
        }
        let copy = temp_in(&dir, &format!("{snapshot}.ext4"));
        let record = temp_in(&dir, &format!("{snapshot}.json"));
        let made = (|| {
            quiesce(&mut || clone(&disk, &copy))?;
            let file = File::open(&copy).map_err(io_err("open", &copy))?;
            file.sync_all().map_err(io_err("fsync", &copy))?;
            let meta = file.metadata().map_err(io_err("inspect", &copy))?;
            let rec = SnapshotRecord {
                volume: id.clone(),
                volume_size: meta.len(),
                digest: digest_file(&file, &copy)?,
            };
            write_record(&record, &rec)?;
            // The copy first, then its record: the record is what makes it a snapshot.
            rename_new(&copy, &self.snapshot_disk(snapshot))?;
            rename_new(&record, &self.snapshot_record(snapshot))?;
            sync_dir(&dir)
        })();
        let _ = fs::remove_file(&copy);
        let _ = fs::remove_file(&record);
        made?;
        self.snapshot_info(snapshot)?
            .ok_or_else(|| VolumeError::NoSnapshot {
                snapshot: snapshot.clone(),
            })
    }

    /// Snapshot `id`, `None` when this host has none.
    pub(crate) fn snapshot_info(&self, id: &SnapshotId) -> Result<Option<SnapshotInfo>, VolumeError> {
        let path = self.snapshot_record(id);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let rec: SnapshotRecord =
            serde_json::from_slice(&bytes).map_err(|source| VolumeError::Record { path, source })?;
        // The copy's blocks: as sparse as the volume was (and shared with it where reflinked).
        use std::os::unix::fs::MetadataExt as _;
        let size = fs::metadata(self.snapshot_disk(id)).map_or(0, |m| m.blocks().saturating_mul(512));
        Ok(Some(SnapshotInfo {
            volume: rec.volume,
            size,
            volume_size: rec.volume_size,
            digest: rec.digest,
        }))
    }

    /// Deletes snapshot `id`: its record first (then it is no snapshot any more), then its copy.
    /// Succeeds if there is none.
    pub(crate) fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), VolumeError> {
        for path in [self.snapshot_record(id), self.snapshot_disk(id)] {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("remove", &path)(e)),
                _ => {}
            }
        }
        let dir = self.snapshot_dir();
        if dir.exists() { sync_dir(&dir) } else { Ok(()) }
    }

    /// Makes volume `id`'s disk from snapshot `snapshot`, grown to `size_gb` GiB if that is
    /// more: the copy's digest is checked first ([`VolumeError::Damaged`]). A disk of that id
    /// already there is kept as it is.
    pub(crate) fn restore(
        &self,
        id: &VolumeId,
        snapshot: &SnapshotId,
        size_gb: u32,
    ) -> Result<(), VolumeError> {
        let size = size_bytes(id, size_gb)?;
        if self.disk(id).exists() {
            return Ok(());
        }
        let info = self
            .snapshot_info(snapshot)?
            .ok_or_else(|| VolumeError::NoSnapshot {
                snapshot: snapshot.clone(),
            })?;
        let src = self.snapshot_disk(snapshot);
        let damaged = || VolumeError::Damaged {
            snapshot: snapshot.clone(),
        };
        let file = match File::open(&src) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(damaged()),
            Err(e) => return Err(io_err("open", &src)(e)),
        };
        let len = file.metadata().map_err(io_err("inspect", &src))?.len();
        if len != info.volume_size || digest_file(&file, &src)? != info.digest {
            return Err(damaged());
        }
        drop(file);
        self.copy_in(id, size, &mut |dst| clone(&src, dst))
    }

    /// Makes volume `id`'s disk a copy of volume `source`'s, grown to `size_gb` GiB if that is
    /// more; `quiesce` as for [`VolumeStore::snapshot`]. A disk of that id already there is
    /// kept as it is.
    pub(crate) fn fork(
        &self,
        id: &VolumeId,
        source: &VolumeId,
        size_gb: u32,
        quiesce: Quiesce<'_>,
    ) -> Result<(), VolumeError> {
        let size = size_bytes(id, size_gb)?;
        if self.disk(id).exists() {
            return Ok(());
        }
        let src = self.disk(source);
        if !src.exists() {
            return Err(VolumeError::NotFound {
                volume: source.clone(),
            });
        }
        self.copy_in(id, size, &mut |dst| quiesce(&mut || clone(&src, dst)))
    }

    /// Makes volume `id`'s disk with `copy` (which creates the file it is given), then grows it
    /// and its filesystem to `size` bytes when that is more, fsyncs it and renames it into place.
    fn copy_in(
        &self,
        id: &VolumeId,
        size: u64,
        copy: &mut dyn FnMut(&Path) -> Result<(), VolumeError>,
    ) -> Result<(), VolumeError> {
        self.install(id, |tmp| {
            copy(tmp)?;
            let file = File::options()
                .write(true)
                .open(tmp)
                .map_err(io_err("open", tmp))?;
            let len = file.metadata().map_err(io_err("inspect", tmp))?.len();
            if size > len {
                file.set_len(size).map_err(io_err("grow", tmp))?;
            }
            drop(file);
            // Also when the source's own growth was pending (its disk extended, its filesystem
            // not yet): the new volume has no record of that, so its filesystem fills it now.
            let fs_bytes = read_usage(tmp)
                .map_err(io_err("read the superblock of", tmp))?
                .map(|u| u.blocks.saturating_mul(u.block_size));
            if fs_bytes.is_some_and(|b| b < size.max(len)) {
                resize(tmp)?;
            }
            Ok(())
        })
    }
}

/// Runs the copy it is given with whatever writes the disk being copied paused, and continues
/// it after ([`VolumeStore::snapshot`], [`VolumeStore::fork`]); `|copy| copy()` when nothing
/// does.
pub(crate) type Quiesce<'a> =
    &'a mut dyn FnMut(&mut dyn FnMut() -> Result<(), VolumeError>) -> Result<(), VolumeError>;

/// What `<snapshot id>.json` holds beside a snapshot's copy.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotRecord {
    /// The volume it was taken of.
    volume: VolumeId,
    /// The copy's length: the volume's disk size, bytes.
    volume_size: u64,
    /// [`digest_file`] of the copy as taken.
    digest: String,
}

fn write_record(path: &Path, rec: &SnapshotRecord) -> Result<(), VolumeError> {
    use std::io::Write as _;
    let bytes = serde_json::to_vec(rec).map_err(|source| VolumeError::Record {
        path: path.to_owned(),
        source,
    })?;
    let mut f = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create", path))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", path))
}

/// Clones disk `src` into the new file `dst` ([`aloft_image::clone_file`]).
fn clone(src: &Path, dst: &Path) -> Result<(), VolumeError> {
    aloft_image::clone_file(src, dst)
        .map(drop)
        .map_err(io_err("copy the disk to", dst))
}

/// `sha256:` and the hex SHA-256 of `file`'s data extents, each as its offset (8 bytes,
/// big-endian) then its bytes ([`aloft_api::HostSnapshot::digest`]).
pub(crate) fn digest_file(file: &File, path: &Path) -> Result<String, VolumeError> {
    let len = file.metadata().map_err(io_err("inspect", path))?.len();
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for extent in aloft_image::data_extents(file, len) {
        let extent = extent.map_err(io_err("find the data in", path))?;
        hash.update(extent.start.to_be_bytes());
        let mut pos = extent.start;
        while pos < extent.end {
            let n = usize::try_from(extent.end - pos).map_or(buf.len(), |n| n.min(buf.len()));
            let chunk = buf.get_mut(..n).unwrap_or_default();
            file.read_exact_at(chunk, pos).map_err(io_err("read", path))?;
            hash.update(&*chunk);
            pos += u64::try_from(n).unwrap_or(u64::MAX);
        }
    }
    let mut out = String::from("sha256:");
    for b in hash.finalize() {
        use std::fmt::Write as _;
        let _ = write!(out, "{b:02x}");
    }
    Ok(out)
}

/// Checks the filesystem in `path` (`e2fsck -fp`: it also replays the journal a crash-consistent
/// copy has) and grows it to fill its file (`resize2fs`). Offline only.
fn resize(path: &Path) -> Result<(), VolumeError> {
    // e2fsck -p: 0 clean, 1 errors fixed, 2 fixed and "reboot" (meaningless offline); 4 and
    // up are errors it could not fix, which resize2fs must not run on.
    run("e2fsck", path, &["-f", "-p"], |code| code <= 2)?;
    run("resize2fs", path, &[], |code| code == 0)
}

/// A temporary name for `name` in `dir`: `.<name>.<pid>.<n>.tmp`.
fn temp_in(dir: &Path, name: &str) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

fn sync_dir(dir: &Path) -> Result<(), VolumeError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// Removes the temporary files (`.<name>.<pid>.<n>.tmp`) crashed processes left in `dir`; this
/// process's own may be in use.
fn remove_stray_temps(dir: &Path) -> Result<(), VolumeError> {
    let mine = format!(".{}.", std::process::id());
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))?.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name
            .strip_suffix(".tmp")
            .and_then(|n| n.rsplit_once('.'))
            .is_some_and(|(rest, _)| rest.ends_with(&mine[..mine.len() - 1]));
        if name.starts_with('.') && name.ends_with(".tmp") && !ours && entry.path().is_file() {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// `size_gb` in bytes, checked against Fly's range.
fn size_bytes(id: &VolumeId, size_gb: u32) -> Result<u64, VolumeError> {
    match aloft_api::volume_size_problem(size_gb) {
        None => Ok(u64::from(size_gb) * GIB),
        Some(problem) => Err(VolumeError::Size {
            volume: id.clone(),
            reason: format!("size {problem}"),
        }),
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

    /// Writes `data` as file `/name` into the ext4 filesystem in `disk` (offline, debugfs).
    fn put_file(disk: &Path, name: &str, data: &[u8]) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join(name);
        fs::write(&src, data).unwrap();
        let out = Command::new("debugfs")
            .arg("-w")
            .arg("-R")
            .arg(format!("write {} {name}", src.display()))
            .arg(disk)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    /// File `/name` of the ext4 filesystem in `disk` (debugfs).
    fn get_file(disk: &Path, name: &str) -> Vec<u8> {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat {name}"))
            .arg(disk)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        out.stdout
    }

    fn fsck_clean(disk: &Path) {
        let fsck = Command::new("e2fsck").arg("-fn").arg(disk).output().unwrap();
        assert!(fsck.status.success(), "{fsck:?}");
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// No quiescing: the copy runs as it is.
    fn plain(copy: &mut dyn FnMut() -> Result<(), VolumeError>) -> Result<(), VolumeError> {
        copy()
    }

    fn snap(s: &str) -> SnapshotId {
        s.parse().unwrap()
    }

    #[test]
    fn snapshots_restores_and_forks_copy_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(dir.path()).unwrap();
        let v = vol("vol_a");
        let s = snap("vs_1");
        store.create(&v, 1).unwrap();
        put_file(&store.disk(&v), "hello", b"before the snapshot");

        // The copy runs inside `quiesce`, and only the copy: the snapshot is not there yet.
        let mut quiesced = 0;
        let info = store
            .snapshot(&v, &s, &mut |copy| {
                quiesced += 1;
                assert!(store.snapshot_info(&s).unwrap().is_none());
                copy()
            })
            .unwrap();
        assert_eq!(quiesced, 1);
        assert_eq!(info.volume, v);
        assert_eq!(info.volume_size, GIB);
        assert!(info.size > 0 && info.size < 64 << 20, "sparse: {}", info.size);
        let copy = store.snapshot_disk(&s);
        let recomputed = digest_file(&File::open(&copy).unwrap(), &copy).unwrap();
        assert_eq!(info.digest, recomputed);
        assert_eq!(info.digest.len(), "sha256:".len() + 64);
        assert_eq!(fs::metadata(&copy).unwrap().mode() & 0o777, 0o600);
        // A retake answers the snapshot as it is, without copying again.
        put_file(&store.disk(&v), "later", b"after the snapshot");
        let again = store.snapshot(&v, &s, &mut |_| panic!("copied again")).unwrap();
        assert_eq!(again, info);

        // A restore holds the snapshot's files, grown to the size asked.
        let r = vol("vol_restored");
        store.restore(&r, &s, 2).unwrap();
        let disk = store.status(&r).unwrap().unwrap();
        assert_eq!(disk.size_bytes, 2 * GIB);
        assert!(!disk.grow_pending);
        let u = disk.usage.unwrap();
        assert_eq!(u.blocks * u.block_size, 2 * GIB, "{u:?}");
        assert_eq!(get_file(&disk.path, "hello"), b"before the snapshot");
        assert!(get_file(&disk.path, "later").is_empty(), "not in the snapshot");
        fsck_clean(&disk.path);
        // At the snapshot's size, the copy as it is.
        let same = vol("vol_same");
        store.restore(&same, &s, 1).unwrap();
        assert_eq!(store.status(&same).unwrap().unwrap().size_bytes, GIB);
        assert_eq!(get_file(&store.disk(&same), "hello"), b"before the snapshot");

        // A fork is the volume as it is now.
        let f = vol("vol_fork");
        let mut quiesced = 0;
        store
            .fork(&f, &v, 3, &mut |copy| {
                quiesced += 1;
                copy()
            })
            .unwrap();
        assert_eq!(quiesced, 1);
        assert_eq!(store.status(&f).unwrap().unwrap().size_bytes, 3 * GIB);
        assert_eq!(get_file(&store.disk(&f), "later"), b"after the snapshot");
        fsck_clean(&store.disk(&f));
        // A retried restore or fork keeps the disk.
        put_file(&store.disk(&f), "mine", b"kept");
        store.fork(&f, &v, 3, &mut plain).unwrap();
        store.restore(&f, &s, 3).unwrap();
        assert_eq!(get_file(&store.disk(&f), "mine"), b"kept");
        // A source whose disk grew and whose filesystem has not yet: the copy's fills it.
        store.extend(&v, 2).unwrap();
        let p = vol("vol_pending");
        store.fork(&p, &v, 2, &mut plain).unwrap();
        let d = store.status(&p).unwrap().unwrap();
        assert!(!d.grow_pending);
        let u = d.usage.unwrap();
        assert_eq!(u.blocks * u.block_size, 2 * GIB, "{u:?}");
        assert!(matches!(
            store.fork(&vol("vol_x"), &vol("vol_none"), 1, &mut plain),
            Err(VolumeError::NotFound { .. })
        ));
        assert!(matches!(
            store.snapshot(&vol("vol_none"), &snap("vs_2"), &mut plain),
            Err(VolumeError::NotFound { .. })
        ));

        // The snapshot outlives its volume, until it is deleted.
        store.remove(&v).unwrap();
        let info_after = store.snapshot_info(&s).unwrap().unwrap();
        assert_eq!(info_after, info);
        store.delete_snapshot(&s).unwrap();
        store.delete_snapshot(&s).unwrap();
        assert!(store.snapshot_info(&s).unwrap().is_none());
        assert!(matches!(
            store.restore(&vol("vol_late"), &s, 1),
            Err(VolumeError::NoSnapshot { .. })
        ));
        // Nothing temporary was left anywhere.
        assert!(names(&dir.path().join("snapshots")).is_empty());
        assert_eq!(
            names(dir.path()),
            [
                "snapshots",
                "vol_fork.ext4",
                "vol_pending.ext4",
                "vol_restored.ext4",
                "vol_same.ext4"
            ]
        );
    }

    #[test]
    fn a_snapshot_whose_content_changed_is_not_restored() {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(dir.path()).unwrap();
        let v = vol("vol_a");
        let s = snap("vs_1");
        store.create(&v, 1).unwrap();
        put_file(&store.disk(&v), "hello", &[b'x'; 20_000]);
        store.snapshot(&v, &s, &mut plain).unwrap();
        // Flip one byte of the file's data in the copy (any byte of its data extents counts).
        let copy = store.snapshot_disk(&s);
        let f = File::options().read(true).write(true).open(&copy).unwrap();
        let extent = aloft_image::data_extents(&f, f.metadata().unwrap().len())
            .last()
            .unwrap()
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, extent.start).unwrap();
        f.write_all_at(&[!b[0]], extent.start).unwrap();
        drop(f);
        let e = store.restore(&vol("vol_b"), &s, 1).unwrap_err();
        assert!(matches!(e, VolumeError::Damaged { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "snapshot vs_1 is damaged: its content no longer matches its digest; restore another"
        );
        assert!(store.status(&vol("vol_b")).unwrap().is_none());
        // A copy of the wrong length is damaged too.
        File::options()
            .write(true)
            .open(&copy)
            .unwrap()
            .set_len(GIB / 2)
            .unwrap();
        assert!(matches!(
            store.restore(&vol("vol_b"), &s, 1),
            Err(VolumeError::Damaged { .. })
        ));
        fs::remove_file(&copy).unwrap();
        assert!(matches!(
            store.restore(&vol("vol_b"), &s, 1),
            Err(VolumeError::Damaged { .. })
        ));
        assert_eq!(names(dir.path()), ["snapshots", "vol_a.ext4"]);
    }

    #[test]
    fn a_failed_copy_leaves_no_snapshot_and_strays_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(dir.path()).unwrap();
        let v = vol("vol_a");
        store.create(&v, 1).unwrap();
        let e = store
            .snapshot(&v, &snap("vs_1"), &mut |_| {
                Err(VolumeError::Pause {
                    volume: vol("vol_a"),
                    detail: "injected".into(),
                })
            })
            .unwrap_err();
        assert!(matches!(e, VolumeError::Pause { .. }), "{e:?}");
        assert!(store.snapshot_info(&snap("vs_1")).unwrap().is_none());
        assert!(names(&dir.path().join("snapshots")).is_empty());
        let e = store
            .fork(&vol("vol_b"), &v, 1, &mut |_| {
                Err(VolumeError::Pause {
                    volume: vol("vol_a"),
                    detail: "injected".into(),
                })
            })
            .unwrap_err();
        assert!(matches!(e, VolumeError::Pause { .. }), "{e:?}");
        assert_eq!(names(dir.path()), ["snapshots", "vol_a.ext4"]);

        // What a crashed process left: temporaries, a copy renamed without its record.
        store.snapshot(&v, &snap("vs_whole"), &mut plain).unwrap();
        let snaps = dir.path().join("snapshots");
        for stray in [".vs_2.ext4.1.0.tmp", ".vs_2.json.1.1.tmp", "vs_3.ext4"] {
            fs::write(snaps.join(stray), b"half").unwrap();
        }
        fs::write(dir.path().join(".vol_b.ext4.1.2.tmp"), b"half").unwrap();
        let store = VolumeStore::open(dir.path()).unwrap();
        assert_eq!(names(&snaps), ["vs_whole.ext4", "vs_whole.json"]);
        assert_eq!(names(dir.path()), ["snapshots", "vol_a.ext4"]);
        assert!(store.snapshot_info(&snap("vs_3")).unwrap().is_none());
        assert!(store.snapshot_info(&snap("vs_whole")).unwrap().is_some());
    }

    #[test]
    fn the_digest_covers_data_extents_and_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 8192], 8 << 20).unwrap();
        f.sync_all().unwrap();
        let mut h = Sha256::new();
        h.update((8u64 << 20).to_be_bytes());
        h.update([7u8; 8192]);
        let want: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let f = File::open(&path).unwrap();
        assert_eq!(digest_file(&f, &path).unwrap(), format!("sha256:{want}"));
        // The same bytes elsewhere are another digest.
        let g = dir.path().join("g");
        let gf = File::create(&g).unwrap();
        gf.set_len(64 << 20).unwrap();
        gf.write_all_at(&[7u8; 8192], 16 << 20).unwrap();
        assert_ne!(
            digest_file(&File::open(&g).unwrap(), &g).unwrap(),
            digest_file(&f, &path).unwrap()
        );
    }
}
