//! Read-only base root filesystems, one per image digest, built once and shared by every machine of
//! that image; and the per-machine writable disks that go over them ([`disk`]).
//!
//! Layout under the cache root, next to `blobs/` and `images/`:
//!
//! ```text
//! <root>/rootfs/<hex>.<fstype>          a finished base (0444), named by the image manifest digest
//! <root>/rootfs/locks/<hex>.lock        one lock file per digest (flock), never removed
//! <root>/rootfs/staging/<hex>.<pid>.<n>/root   layers being unpacked (the build dir is 0700)
//! /dev/shm/aloft-rootfs-<hex>.<pid>.<n>/root     the same, in memory, when the image fits
//! <root>/rootfs/tmp/<hex>.<pid>.<n>.<fstype>   a filesystem being made
//! ```
//!
//! [`RootfsStore::build`] takes the digest's lock (so concurrent builders of one image, in this
//! process or another, wait for the first and then reuse its result), unpacks the layers in order
//! with the safe [`Unpacker`] into a fresh private staging directory (in memory when the image fits,
//! see [`RootfsStore::with_memory_staging`]; on disk otherwise), checking each layer blob's
//! digest again as it is read, makes the filesystem into a temporary file (`mkfs.ext4 -d` or
//! `mkfs.erofs`, see [`RootfsFormat`]), fsyncs it, renames it into place and fsyncs the directory.
//! Whatever fails (a corrupt or missing blob, a hostile layer, the size or entry limit, `mkfs`), the
//! staging directory and the temporary file are removed, so a path `<hex>.<fstype>` always holds a
//! complete filesystem. A crash leaves staging directories and temporary files named after a dead
//! process; [`RootfsStore::open`] removes them.
//!
//! A base's modification time is its last use ([`RootfsStore::get`] and `build` refresh it); garbage
//! collection ([`crate::gc`]) removes the least recently used first.
//!
//! Synchronous and blocking (it runs `mkfs`): async callers use `spawn_blocking`.

pub mod disk;
mod mkfs;

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use crate::blobs::BlobStore;
use crate::digest::{Digest, Sha256};
use crate::manifest::Compression;
use crate::pull::{Layer, PulledImage};
use crate::unpack::{UnpackError, UnpackLimits, Unpacker};

pub use disk::{CloneMethod, DataExtents, DiskError, WritableDisks, clone_file, data_extents};
pub use mkfs::RootfsFormat;

static BUILD_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Where layers are unpacked by default when the image fits (see [`RootfsStore::with_memory_staging`]).
const DEFAULT_MEMORY_STAGING: &str = "/dev/shm";

/// Name prefix of build directories in the memory staging directory.
const MEMORY_PREFIX: &str = "aloft-rootfs-";

/// Largest estimated unpacked image staged in memory.
pub const MEMORY_STAGING_MAX: u64 = 4 << 30;

/// `statfs` type of tmpfs.
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// Why a base root filesystem could not be built, found or removed.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs, reason = "fields are named for what the #[error] message says")]
pub enum RootfsError {
    /// A filesystem operation on the rootfs store failed.
    #[error("rootfs store: {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A layer blob the image needs is not in the blob cache.
    #[error("layer {layer} of image {image} is not in the blob cache; pull the image again")]
    MissingLayer { image: Digest, layer: Digest },
    /// A cached layer blob no longer matches its digest (it was removed from the cache).
    #[error(
        "layer {layer} of image {image} is corrupt in the blob cache (it hashes to {actual}); it was \
         removed, pull the image again"
    )]
    CorruptLayer {
        image: Digest,
        layer: Digest,
        actual: Digest,
    },
    /// A layer could not be applied (hostile or malformed content, over the size or entry limit).
    #[error("unpack layer {layer} of image {image}")]
    Unpack {
        image: Digest,
        layer: Digest,
        #[source]
        source: UnpackError,
    },
    /// The filesystem maker could not run or failed.
    #[error("make the {fstype} root filesystem of image {image} with {program}: {detail}")]
    Mkfs {
        image: Digest,
        fstype: &'static str,
        program: &'static str,
        detail: String,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RootfsError {
    let path = path.to_path_buf();
    move |source| RootfsError::Io { what, path, source }
}

/// A finished base root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// The image manifest digest it was built from.
    pub digest: Digest,
    /// The filesystem image (read-only; attach it as the machine's read-only root disk).
    pub path: PathBuf,
    /// Its format.
    pub format: RootfsFormat,
    /// Its size on disk in bytes (allocated blocks; the file is sparse).
    pub disk_bytes: u64,
    /// Its last use, the garbage collector's LRU key.
    pub last_used: SystemTime,
}

/// What building a base did, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildStats {
    /// Whether the base was already there (built by an earlier or concurrent builder).
    pub reused: bool,
    /// Whether the layers were staged in memory (see [`RootfsStore::with_memory_staging`]).
    pub staged_in_memory: bool,
    /// Milliseconds spent unpacking layers into the staging directory.
    pub unpack_ms: u64,
    /// Milliseconds spent making the filesystem.
    pub mkfs_ms: u64,
    /// Milliseconds spent making it durable (fsync, rename, directory fsync).
    pub sync_ms: u64,
    /// Files, directories and links in the staged tree.
    pub entries: u64,
}

/// The store of base root filesystems (`<root>/rootfs`). Cheap to clone.
#[derive(Debug, Clone)]
pub struct RootfsStore {
    dir: PathBuf,
    locks: PathBuf,
    staging: PathBuf,
    tmp: PathBuf,
    blobs: BlobStore,
    format: RootfsFormat,
    limits: UnpackLimits,
    memory: Option<PathBuf>,
}

impl RootfsStore {
    /// Opens (creating if needed) the store under `cache_root`, building bases as `format` within
    /// `limits` (which hold for a whole image). Removes what crashed builders left behind.
    pub fn open(cache_root: &Path, format: RootfsFormat, limits: UnpackLimits) -> Result<Self, RootfsError> {
        let dir = cache_root.join("rootfs");
        let store = Self {
            locks: dir.join("locks"),
            staging: dir.join("staging"),
            tmp: dir.join("tmp"),
            dir,
            blobs: BlobStore::open(cache_root).map_err(|e| RootfsError::Io {
                what: "open the blob cache under",
                path: cache_root.to_owned(),
                source: io::Error::other(e),
            })?,
            format,
            limits,
            memory: Some(PathBuf::from(DEFAULT_MEMORY_STAGING)),
        };
        for d in [&store.dir, &store.locks, &store.staging, &store.tmp] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(io_err("create directory", d))?;
            // Staged trees hold the image's setuid programs and device nodes: only we may enter.
            fs::set_permissions(d, fs::Permissions::from_mode(0o700)).map_err(io_err("chmod", d))?;
        }
        store.remove_orphans();
        Ok(store)
    }

    /// Unpacks layers in `dir` (a tmpfs) when an image fits there, or never with `None`. The
    /// default is `/dev/shm`: staging in memory spares the disk a write and a read of every file,
    /// which is most of the build time on a small host. Only the finished base goes to disk.
    pub fn with_memory_staging(mut self, dir: Option<PathBuf>) -> Self {
        self.memory = dir;
        self.remove_orphans();
        self
    }

    /// The format new bases are built in.
    pub fn format(&self) -> RootfsFormat {
        self.format
    }

    /// The blob cache layers are read from.
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// Where the base of image `digest` lives (whether or not it is built).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join(format!("{}.{}", digest.hex(), self.format.extension()))
    }

    /// The base of image `digest` if it is built, marking it used now.
    pub fn get(&self, digest: &Digest) -> Option<Base> {
        let path = self.path(digest);
        touch(&path);
        base_at(digest.clone(), path, self.format)
    }

    /// Every finished base, in every format (a store whose format changed still sees, and its
    /// garbage collector still removes, the old ones), in no particular order.
    pub fn list(&self) -> Result<Vec<Base>, RootfsError> {
        let entries = fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let parsed = RootfsFormat::ALL.into_iter().find_map(|format| {
                let hex = name.strip_suffix(format.extension())?.strip_suffix('.')?;
                Some((Digest::from_hex(hex).ok()?, format))
            });
            if let Some((digest, format)) = parsed
                && let Some(base) = base_at(digest, entry.path(), format)
            {
                out.push(base);
            }
        }
        Ok(out)
    }

    /// Builds the base of `image` unless it exists, and returns it. Concurrent callers for the same
    /// digest (threads or processes) wait for one build; on any error nothing is left behind.
    pub fn build(&self, image: &PulledImage) -> Result<(Base, BuildStats), RootfsError> {
        let path = self.path(&image.digest);
        if let Some(base) = self.get(&image.digest) {
            return Ok((base, reused()));
        }
        let _lock = self.lock(&image.digest, true)?;
        // Someone else may have finished while we waited for the lock.
        if let Some(base) = self.get(&image.digest) {
            return Ok((base, reused()));
        }
        let n = BUILD_COUNTER.fetch_add(1, Ordering::Relaxed);
        let unique = format!("{}.{}.{n}", image.digest.hex(), std::process::id());

        let started = Instant::now();
        let mut staged = None;
        if let Some(memory) = self.memory_staging(image) {
            // Unpacking into memory may run out of room when the layers compress better than
            // estimated, or find its name taken in the shared tmpfs: then once more on disk.
            match self.stage(image, &memory.join(format!("{MEMORY_PREFIX}{unique}"))) {
                Ok(dir) => staged = Some(dir),
                Err(e) if memory_unusable(&e) => {}
                Err(e) => return Err(e),
            }
        }
        let staged_in_memory = staged.is_some();
        let build_dir = match staged {
            Some(dir) => dir,
            None => self.stage(image, &self.staging.join(&unique))?,
        };
        let root = build_dir.0.join("root");
        let unpack_ms = millis(started);

        let started = Instant::now();
        let tmp = Scratch::file(self.tmp.join(format!("{unique}.{}", self.format.extension())));
        let entries = mkfs::make(self.format, &image.digest, &root, &tmp.0)?;
        // The staged tree is no longer needed: free the space before the fsync.
        drop(build_dir);
        let mkfs_ms = millis(started);
        let started = Instant::now();
        let file = File::open(&tmp.0).map_err(io_err("open", &tmp.0))?;
        file.sync_all().map_err(io_err("fsync", &tmp.0))?;
        fs::set_permissions(&tmp.0, fs::Permissions::from_mode(0o444)).map_err(io_err("chmod", &tmp.0))?;
        fs::rename(&tmp.0, &path).map_err(io_err("rename into place", &path))?;
        tmp.disarm();
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync", &self.dir))?;
        let sync_ms = millis(started);
        let base =
            base_at(image.digest.clone(), path.clone(), self.format).ok_or_else(|| RootfsError::Io {
                what: "stat the new base",
                path,
                source: io::Error::from(io::ErrorKind::NotFound),
            })?;
        Ok((
            base,
            BuildStats {
                reused: false,
                staged_in_memory,
                unpack_ms,
                mkfs_ms,
                sync_ms,
                entries,
            },
        ))
    }

    /// Removes the bases of `digest` (in every format) unless a build of it holds its lock.
    /// Returns the bytes freed, or `None` when there was none or it was busy.
    pub fn remove(&self, digest: &Digest) -> Result<Option<u64>, RootfsError> {
        let Some(_lock) = self.lock(digest, false)? else {
            return Ok(None);
        };
        let mut freed = None;
        for format in RootfsFormat::ALL {
            let path = self.dir.join(format!("{}.{}", digest.hex(), format.extension()));
            let Some(base) = base_at(digest.clone(), path.clone(), format) else {
                continue;
            };
            match fs::remove_file(&path) {
                Ok(()) => freed = Some(freed.unwrap_or(0) + base.disk_bytes),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(RootfsError::Io {
                        what: "remove",
                        path,
                        source,
                    });
                }
            }
        }
        Ok(freed)
    }

    /// Where to unpack `image` in memory, if anywhere: a tmpfs directory when the image's estimated
    /// unpacked size (compressed layers × 4, plain ones × 1) fits in half its free space and in
    /// [`MEMORY_STAGING_MAX`].
    fn memory_staging(&self, image: &PulledImage) -> Option<PathBuf> {
        let dir = self.memory.as_ref()?;
        let estimate = image
            .layers
            .iter()
            .map(|l| match l.compression {
                Compression::None => l.size,
                _ => l.size.saturating_mul(4),
            })
            .fold(0u64, u64::saturating_add)
            .min(self.limits.max_bytes);
        let fs = rustix::fs::statfs(dir.as_path()).ok()?;
        #[expect(clippy::cast_sign_loss, reason = "f_type is a magic number")]
        let tmpfs = fs.f_type as u64 == TMPFS_MAGIC;
        let vfs = rustix::fs::statvfs(dir.as_path()).ok()?;
        let free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        (tmpfs && estimate <= (free / 2).min(MEMORY_STAGING_MAX)).then(|| dir.clone())
    }

    /// Makes the private build directory `dir` and unpacks every layer into `dir/root`.
    fn stage(&self, image: &PulledImage, dir: &Path) -> Result<Scratch, RootfsError> {
        // `mkdir` fails on anything already there (a planted symlink included), and 0700 keeps
        // other users out of the staged tree; the unpacker checks both again.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create staging directory", dir))?;
        let build_dir = Scratch::dir(dir.to_owned());
        let root = dir.join("root");
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&root)
            .map_err(io_err("create staging directory", &root))?;
        self.unpack_all(image, &root)?;
        Ok(build_dir)
    }

    /// Takes the digest's lock: blocking, or `None` when `wait` is false and it is held.
    fn lock(&self, digest: &Digest, wait: bool) -> Result<Option<File>, RootfsError> {
        let path = self.locks.join(format!("{}.lock", digest.hex()));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open lock", &path))?;
        if wait {
            file.lock().map_err(io_err("lock", &path))?;
            return Ok(Some(file));
        }
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(source)) => Err(RootfsError::Io {
                what: "lock",
                path,
                source,
            }),
        }
    }

    fn unpack_all(&self, image: &PulledImage, root: &Path) -> Result<(), RootfsError> {
        let mut unpacker =
            Unpacker::new(root, self.limits.clone()).map_err(|source| RootfsError::Unpack {
                image: image.digest.clone(),
                layer: image
                    .layers
                    .first()
                    .map_or(image.digest.clone(), |l| l.digest.clone()),
                source,
            })?;
        for layer in &image.layers {
            self.apply(&mut unpacker, image, layer)?;
        }
        Ok(())
    }

    /// Applies one layer, hashing the blob as it streams through the unpacker.
    fn apply(&self, unpacker: &mut Unpacker, image: &PulledImage, layer: &Layer) -> Result<(), RootfsError> {
        let path = self.blobs.path(&layer.digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RootfsError::MissingLayer {
                    image: image.digest.clone(),
                    layer: layer.digest.clone(),
                });
            }
            Err(source) => {
                return Err(RootfsError::Io {
                    what: "open layer blob",
                    path,
                    source,
                });
            }
        };
        let mut reader = HashingReader {
            inner: io::BufReader::with_capacity(256 * 1024, file),
            hasher: Sha256::new(),
        };
        let applied = unpacker.apply_layer(&mut reader, layer.compression);
        // The unpacker reads the layer to its end, so the hash covers the whole blob; a corrupt
        // blob is reported as such even when it also broke the decompressor.
        let rest = io::copy(&mut reader, &mut io::sink());
        let actual = reader.hasher.finish();
        if rest.is_ok() && actual != layer.digest {
            // Best effort: a corrupt blob must not be used again; a pull fetches it anew.
            let _ = self.blobs.remove(&layer.digest);
            return Err(RootfsError::CorruptLayer {
                image: image.digest.clone(),
                layer: layer.digest.clone(),
                actual,
            });
        }
        applied.map_err(|source| RootfsError::Unpack {
            image: image.digest.clone(),
            layer: layer.digest.clone(),
            source,
        })?;
        rest.map_err(io_err("read layer blob", &path))?;
        Ok(())
    }

    /// Removes staging directories and temporary files whose builder process is gone.
    fn remove_orphans(&self) {
        let dirs = [Some(&self.staging), Some(&self.tmp), self.memory.as_ref()];
        for dir in dirs.into_iter().flatten() {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            let shared = Some(dir) == self.memory.as_ref();
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                // In a shared tmpfs, only our own build directories.
                let name = match name.strip_prefix(MEMORY_PREFIX) {
                    Some(rest) => rest,
                    None if shared => continue,
                    None => name,
                };
                if shared && !same_owner_dir(&entry.path(), &self.dir) {
                    continue;
                }
                let Some(pid) = name.split('.').nth(1) else {
                    continue;
                };
                let Ok(pid) = pid.parse::<u32>() else { continue };
                if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                    continue;
                }
                let path = entry.path();
                // Best effort; a concurrent opener may be removing it too.
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = fs::remove_dir_all(&path);
                } else {
                    let _ = fs::remove_file(&path);
                }
            }
        }
    }
}

/// Whether `path` is a directory (not a symlink) owned by the owner of `ours`.
fn same_owner_dir(path: &Path, ours: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(me) = fs::metadata(ours) else {
        return false;
    };
    fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.uid() == me.uid())
}

/// Whether a build in memory failed for want of room, or because its directory name was taken.
fn memory_unusable(e: &RootfsError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(
                io.raw_os_error(),
                Some(libc::ENOSPC | libc::EDQUOT | libc::EEXIST)
            )
        {
            return true;
        }
        source = err.source();
    }
    false
}

fn reused() -> BuildStats {
    BuildStats {
        reused: true,
        ..BuildStats::default()
    }
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn base_at(digest: Digest, path: PathBuf, format: RootfsFormat) -> Option<Base> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(&path).ok().filter(fs::Metadata::is_file)?;
    Some(Base {
        digest,
        disk_bytes: meta.blocks().saturating_mul(512),
        last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        path,
        format,
    })
}

/// Marks `path` used now (its mtime is the LRU key). Best effort: a base that cannot be touched is
/// merely collected earlier.
pub(crate) fn touch(path: &Path) {
    if let Ok(f) = File::open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// A staging directory or temporary file removed on drop unless disarmed.
struct Scratch(PathBuf, bool);

impl Scratch {
    fn dir(path: PathBuf) -> Self {
        Self(path, true)
    }

    fn file(path: PathBuf) -> Self {
        Self(path, false)
    }

    fn disarm(mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.0.as_os_str().is_empty() {
            return;
        }
        // Best effort: the path is ours (unique name) and may not exist yet.
        if self.1 {
            let _ = fs::remove_dir_all(&self.0);
        } else {
            let _ = fs::remove_file(&self.0);
        }
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
