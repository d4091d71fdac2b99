//! The content-addressed blob cache every image shares: layers, configs and manifests, each stored
//! once under its SHA-256 digest.
//!
//! Layout under the cache root:
//!
//! ```text
//! <root>/blobs/sha256/<hex>   a verified blob, read-only (0444), never modified in place
//! <root>/blobs/tmp/           blobs being written: <hex>.<pid>.<n>.partial
//! ```
//!
//! A blob only ever lands in `sha256/` through [`BlobWriter::commit`]: the bytes are written to a
//! temporary file in `tmp/` (same filesystem) while their digest and length are checked, then
//! the file is fsynced, renamed into place atomically and the directory fsynced. A digest mismatch,
//! a short or long body, a size over the limit, a crash or a dropped writer leaves nothing in
//! `sha256/` (a dropped writer removes its temporary file; a crash leaves one that
//! [`BlobStore::open`] deletes once it is a day old). So a path in `sha256/` always holds exactly
//! the bytes its name promises, and concurrent writers of the same blob are harmless: the last
//! rename wins with identical content.
//!
//! Synchronous (std I/O): async callers run it in `spawn_blocking`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::digest::{Digest, Sha256};

/// Temporary files older than this are left over from a crash and deleted on open.
const STALE_TEMP_AGE: Duration = Duration::from_secs(24 * 60 * 60);

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// What went wrong storing or reading a blob.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// A filesystem operation on the cache failed.
    #[error("blob cache: {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The bytes hash to another digest than the one they were fetched as.
    #[error("digest mismatch for blob {expected}: got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    /// Fewer bytes arrived than the descriptor announced.
    #[error("blob {digest} truncated: got {got} of {expected} bytes")]
    Truncated { digest: Digest, expected: u64, got: u64 },
    /// More bytes arrived than the descriptor announced.
    #[error("blob {digest} is larger than its descriptor says ({expected} bytes)")]
    Oversized { digest: Digest, expected: u64 },
    /// The blob is (or is announced to be) larger than the configured limit.
    #[error("blob {digest} exceeds the size limit of {limit} bytes ({size} bytes)")]
    TooLarge { digest: Digest, size: u64, limit: u64 },
}

/// The blob cache (`<root>/blobs`). Cheap to clone.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    tmp: PathBuf,
}

impl BlobStore {
    /// Opens (creating if needed) the blob cache under `cache_root`, deleting day-old temporary
    /// files a crash left behind.
    pub fn open(cache_root: &Path) -> Result<Self, BlobError> {
        let dir = cache_root.join("blobs").join("sha256");
        let tmp = cache_root.join("blobs").join("tmp");
        for d in [&dir, &tmp] {
            fs::create_dir_all(d).map_err(|source| BlobError::Io {
                what: "create directory",
                path: d.clone(),
                source,
            })?;
        }
        let store = Self { dir, tmp };
        store.remove_stale_temp(STALE_TEMP_AGE);
        Ok(store)
    }

    fn remove_stale_temp(&self, age: Duration) {
        let Ok(entries) = fs::read_dir(&self.tmp) else {
            return;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|elapsed| elapsed > age);
            if old {
                // Best effort: another process may have removed it already.
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Where the blob `digest` lives (whether or not it is present).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// The size of the cached blob `digest`, or `None` when it is not cached.
    pub fn size(&self, digest: &Digest) -> Option<u64> {
        fs::metadata(self.path(digest))
            .ok()
            .filter(fs::Metadata::is_file)
            .map(|m| m.len())
    }

    /// Whether `digest` is cached with exactly `size` bytes.
    pub fn contains(&self, digest: &Digest, size: u64) -> bool {
        self.size(digest) == Some(size)
    }

    /// Starts writing the blob `digest`. `expected_size` (from a descriptor) is enforced while
    /// writing and at commit; `limit` caps the size regardless.
    pub fn writer(
        &self,
        digest: &Digest,
        expected_size: Option<u64>,
        limit: u64,
    ) -> Result<BlobWriter, BlobError> {
        if let Some(size) = expected_size
            && size > limit
        {
            return Err(BlobError::TooLarge {
                digest: digest.clone(),
                size,
                limit,
            });
        }
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp_path = self
            .tmp
            .join(format!("{}.{}.{n}.partial", digest.hex(), std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(|source| BlobError::Io {
                what: "create temporary file",
                path: tmp_path.clone(),
                source,
            })?;
        Ok(BlobWriter {
            file: Some(file),
            tmp_path,
            final_path: self.path(digest),
            dir: self.dir.clone(),
            hasher: Sha256::new(),
            written: 0,
            digest: digest.clone(),
            expected_size,
            limit,
        })
    }

    /// Stores `data` as the blob `digest` after checking that it hashes to it.
    pub fn insert(&self, digest: &Digest, data: &[u8]) -> Result<PathBuf, BlobError> {
        let size = u64::try_from(data.len()).unwrap_or(u64::MAX);
        if self.contains(digest, size) {
            return Ok(self.path(digest));
        }
        let mut writer = self.writer(digest, Some(size), size)?;
        writer.write_chunk(data)?;
        writer.commit()
    }

    /// Reads a cached blob of at most `limit` bytes, checking its digest again (for the small
    /// blobs a pull re-reads: manifests and configs).
    pub fn read(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, BlobError> {
        let path = self.path(digest);
        let io_err = |what, source| BlobError::Io {
            what,
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(|e| io_err("open", e))?;
        let size = file.metadata().map_err(|e| io_err("stat", e))?.len();
        if size > limit {
            return Err(BlobError::TooLarge {
                digest: digest.clone(),
                size,
                limit,
            });
        }
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        file.take(limit)
            .read_to_end(&mut data)
            .map_err(|e| io_err("read", e))?;
        let actual = Digest::of(&data);
        if &actual != digest {
            return Err(BlobError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        Ok(data)
    }

    /// Hashes a cached blob again; a mismatch means the disk changed under the cache.
    pub fn verify(&self, digest: &Digest) -> Result<(), BlobError> {
        let path = self.path(digest);
        let mut file = File::open(&path).map_err(|source| BlobError::Io {
            what: "open",
            path: path.clone(),
            source,
        })?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = file.read(&mut buf).map_err(|source| BlobError::Io {
                what: "read",
                path: path.clone(),
                source,
            })?;
            if n == 0 {
                break;
            }
            hasher.update(buf.get(..n).unwrap_or_default());
        }
        let actual = hasher.finish();
        if &actual == digest {
            Ok(())
        } else {
            Err(BlobError::DigestMismatch {
                expected: digest.clone(),
                actual,
            })
        }
    }

    /// Deletes the cached blob `digest`; `false` when it was not there.
    pub fn remove(&self, digest: &Digest) -> Result<bool, BlobError> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(BlobError::Io {
                what: "remove",
                path,
                source,
            }),
        }
    }

    /// Every cached blob with its size (unordered).
    pub fn list(&self) -> Result<Vec<(Digest, u64)>, BlobError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| BlobError::Io {
            what: "list",
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(digest) = name.to_str().and_then(|n| Digest::from_hex(n).ok()) else {
                continue;
            };
            if let Ok(meta) = entry.metadata() {
                out.push((digest, meta.len()));
            }
        }
        Ok(out)
    }
}

/// A blob being written: bytes are hashed and counted as they arrive; [`commit`](Self::commit)
/// moves it into the cache only if digest and size match. Dropping it uncommitted deletes the
/// temporary file.
#[derive(Debug)]
pub struct BlobWriter {
    file: Option<File>,
    tmp_path: PathBuf,
    final_path: PathBuf,
    dir: PathBuf,
    hasher: Sha256,
    written: u64,
    digest: Digest,
    expected_size: Option<u64>,
    limit: u64,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends `data`, failing as soon as the blob grows past its announced size or the limit.
    pub fn write_chunk(&mut self, data: &[u8]) -> Result<(), BlobError> {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        let total = self.written.saturating_add(len);
        if let Some(expected) = self.expected_size
            && total > expected
        {
            return Err(BlobError::Oversized {
                digest: self.digest.clone(),
                expected,
            });
        }
        if total > self.limit {
            return Err(BlobError::TooLarge {
                digest: self.digest.clone(),
                size: total,
                limit: self.limit,
            });
        }
        let Some(file) = self.file.as_mut() else {
            return Err(self.io_error("write", io::Error::other("writer already finished")));
        };
        if let Err(e) = file.write_all(data) {
            return Err(self.io_error("write", e));
        }
        self.hasher.update(data);
        self.written = total;
        Ok(())
    }

    fn io_error(&self, what: &'static str, source: io::Error) -> BlobError {
        BlobError::Io {
            what,
            path: self.tmp_path.clone(),
            source,
        }
    }

    /// Checks size and digest, then fsyncs and renames the blob into the cache; returns its path.
    pub fn commit(mut self) -> Result<PathBuf, BlobError> {
        if let Some(expected) = self.expected_size
            && self.written < expected
        {
            return Err(BlobError::Truncated {
                digest: self.digest.clone(),
                expected,
                got: self.written,
            });
        }
        let actual = std::mem::take(&mut self.hasher).finish();
        if actual != self.digest {
            return Err(BlobError::DigestMismatch {
                expected: self.digest.clone(),
                actual,
            });
        }
        let Some(file) = self.file.take() else {
            return Err(self.io_error("commit", io::Error::other("writer already finished")));
        };
        if let Err(e) = file.sync_all() {
            return Err(self.io_error("fsync", e));
        }
        if let Err(e) = file.set_permissions(fs::Permissions::from_mode(0o444)) {
            return Err(self.io_error("chmod", e));
        }
        drop(file);
        if let Err(source) = fs::rename(&self.tmp_path, &self.final_path) {
            return Err(BlobError::Io {
                what: "rename into the cache",
                path: self.final_path.clone(),
                source,
            });
        }
        // The rename is durable once the directory is synced.
        let synced = File::open(&self.dir).and_then(|d| d.sync_all());
        if let Err(source) = synced {
            return Err(BlobError::Io {
                what: "fsync directory",
                path: self.dir.clone(),
                source,
            });
        }
        Ok(self.final_path.clone())
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_chunk(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Not committed (or the commit failed before or at the rename): leave nothing behind.
        if self.file.is_some() || self.tmp_path.exists() {
            self.file = None;
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_entries(root: &Path) -> usize {
        fs::read_dir(root.join("blobs/tmp")).unwrap().count()
    }

    #[test]
    fn commit_verifies_and_lands_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = b"hello blob";
        let digest = Digest::of(data);
        let mut w = store.writer(&digest, Some(10), 1 << 20).unwrap();
        w.write_chunk(b"hello").unwrap();
        assert!(store.size(&digest).is_none(), "not visible before commit");
        w.write_chunk(b" blob").unwrap();
        let path = w.commit().unwrap();
        assert_eq!(fs::read(&path).unwrap(), data);
        assert!(store.contains(&digest, 10));
        assert_eq!(store.read(&digest, 100).unwrap(), data);
        store.verify(&digest).unwrap();
        assert_eq!(tmp_entries(dir.path()), 0);
        assert_eq!(store.list().unwrap(), vec![(digest.clone(), 10)]);
        assert!(store.remove(&digest).unwrap());
        assert!(!store.remove(&digest).unwrap());
    }

    #[test]
    fn mismatch_truncation_and_overflow_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = Digest::of(b"good");

        let mut w = store.writer(&digest, Some(4), 100).unwrap();
        w.write_chunk(b"evil").unwrap();
        let err = w.commit().unwrap_err();
        assert!(matches!(err, BlobError::DigestMismatch { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("digest mismatch for blob {digest}: got {}", Digest::of(b"evil"))
        );

        let mut w = store.writer(&digest, Some(4), 100).unwrap();
        w.write_chunk(b"goo").unwrap();
        let err = w.commit().unwrap_err();
        assert!(
            matches!(
                err,
                BlobError::Truncated {
                    got: 3,
                    expected: 4,
                    ..
                }
            ),
            "{err}"
        );

        let mut w = store.writer(&digest, Some(4), 100).unwrap();
        let err = w.write_chunk(b"goodies").unwrap_err();
        assert!(matches!(err, BlobError::Oversized { .. }), "{err}");
        drop(w);

        let mut w = store.writer(&digest, None, 3).unwrap();
        let err = w.write_chunk(b"good").unwrap_err();
        assert!(matches!(err, BlobError::TooLarge { .. }), "{err}");
        drop(w);

        let err = store.writer(&digest, Some(4), 3).unwrap_err();
        assert!(err.to_string().contains("exceeds the size limit"), "{err}");

        assert!(store.size(&digest).is_none());
        assert_eq!(tmp_entries(dir.path()), 0);
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn insert_checks_the_digest_and_read_rechecks_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = Digest::of(b"one");
        assert!(matches!(
            store.insert(&digest, b"two"),
            Err(BlobError::DigestMismatch { .. })
        ));
        store.insert(&digest, b"one").unwrap();
        store.insert(&digest, b"one").unwrap();
        // Corrupt it on disk behind the cache's back: read and verify notice.
        let path = store.path(&digest);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, b"onf").unwrap();
        assert!(matches!(
            store.read(&digest, 10),
            Err(BlobError::DigestMismatch { .. })
        ));
        assert!(store.verify(&digest).is_err());
        assert!(matches!(store.read(&digest, 2), Err(BlobError::TooLarge { .. })));
    }

    #[test]
    fn stale_temp_files_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let stale = dir.path().join("blobs/tmp/x.partial");
        fs::write(&stale, b"junk").unwrap();
        let fresh = dir.path().join("blobs/tmp/y.partial");
        fs::write(&fresh, b"junk").unwrap();
        let old = SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
        File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(old)
            .unwrap();
        drop(store);
        BlobStore::open(dir.path()).unwrap();
        assert!(!stale.exists());
        assert!(fresh.exists());
    }
}
