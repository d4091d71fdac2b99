//! Records of pulled images: which manifest a tag (or digest) resolved to, so images can be
//! listed, removed and used again without the registry.
//!
//! Layout under the cache root, next to `blobs/`:
//!
//! ```text
//! <root>/images/<registry>/<repository…>/_tags/<tag>        pulled by tag
//! <root>/images/<registry>/<repository…>/_digests/<hex>     pulled by digest
//! ```
//!
//! `<registry>` is `HOST[:PORT]` as in the reference (`docker.io`, `127.0.0.1:5000`), the
//! repository's components are directories. `_tags` and `_digests` cannot clash with repository
//! components (those start with a letter or digit), and every part is validated by the reference
//! parser, so no record path can leave `images/`. Each record is a small JSON file written
//! atomically (temporary file, fsync, rename):
//!
//! ```json
//! {"reference":"127.0.0.1:5000/apps/web:v1","digest":"sha256:…","index_digest":"sha256:…","pulled_at":1700000000}
//! ```
//!
//! `digest` is the linux/amd64 image manifest; `index_digest` the index or manifest list the
//! reference pointed to, if any. Both manifests are blobs in the blob cache, so a record plus the
//! cache is a complete image. A record is written only after every blob of its image is cached.
//! Removing a record leaves the blobs: collecting unreferenced blobs is a separate pass
//! ([`ImageStore::referenced_blobs`] lists what must stay).

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::blobs::BlobStore;
use crate::digest::Digest;
use crate::manifest::{self, ImageManifest, Manifest};
use crate::pull::{Layer, PulledImage};
use crate::reference::Reference;
use crate::registry::{Limits, RegistryError};

/// What a pull left behind for one reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// The reference as pulled (registry, repository, and tag or digest).
    pub reference: Reference,
    /// The linux/amd64 image manifest's digest.
    pub digest: Digest,
    /// The index (manifest list) the reference resolved through, if any.
    pub index_digest: Option<Digest>,
    /// When the pull finished (seconds since the Unix epoch).
    pub pulled_at: u64,
}

#[derive(Serialize, Deserialize)]
struct RecordFile {
    reference: String,
    digest: Digest,
    index_digest: Option<Digest>,
    pulled_at: u64,
}

/// The image records (`<root>/images`) over a blob cache.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    blobs: BlobStore,
    limits: Limits,
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError {
    let path = path.to_path_buf();
    move |source| RegistryError::Records { what, path, source }
}

impl ImageStore {
    /// Opens (creating if needed) the records and blob cache under `cache_root`.
    pub fn open(cache_root: &Path) -> Result<Self, RegistryError> {
        Self::with_limits(cache_root, Limits::default())
    }

    pub(crate) fn with_limits(cache_root: &Path, limits: Limits) -> Result<Self, RegistryError> {
        let dir = cache_root.join("images");
        fs::create_dir_all(&dir).map_err(io_error("create directory", &dir))?;
        Ok(Self {
            dir,
            blobs: BlobStore::open(cache_root)?,
            limits,
        })
    }

    /// The blob cache the records point into.
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    fn record_path(&self, reference: &Reference) -> PathBuf {
        let mut path = self.dir.join(reference.registry());
        for component in reference.repository().split('/') {
            path.push(component);
        }
        match (reference.digest(), reference.tag()) {
            (Some(digest), _) => path.join("_digests").join(digest.hex()),
            (None, tag) => path.join("_tags").join(tag.unwrap_or("latest")),
        }
    }

    /// Records that `reference` resolved to the image manifest `digest` (through `index_digest`).
    pub(crate) fn record(
        &self,
        reference: &Reference,
        digest: &Digest,
        index_digest: Option<&Digest>,
    ) -> Result<(), RegistryError> {
        let path = self.record_path(reference);
        let parent = path.parent().unwrap_or(&self.dir).to_path_buf();
        fs::create_dir_all(&parent).map_err(io_error("create directory", &parent))?;
        let file = RecordFile {
            reference: reference.to_string(),
            digest: digest.clone(),
            index_digest: index_digest.cloned(),
            pulled_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let json = serde_json::to_vec(&file).unwrap_or_default();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Tags and hex never start with '.', so the temporary name cannot be a record. Unique
        // per write: several machines of one image record its tag at once in one process.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = parent.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&parent)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_error("write record", &path)(e)
        })
    }

    /// The record for `reference` (by its digest if it has one, else its tag).
    pub fn lookup(&self, reference: &Reference) -> Result<Option<ImageRecord>, RegistryError> {
        let path = self.record_path(reference);
        match fs::read(&path) {
            Ok(data) => Ok(parse_record(&data)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("read record", &path)(e)),
        }
    }

    /// Every record, sorted by registry, repository, tag, digest.
    pub fn list(&self) -> Result<Vec<ImageRecord>, RegistryError> {
        let mut out = Vec::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("list", &dir)(e)),
            };
            let records_dir = dir.file_name().is_some_and(|n| n == "_tags" || n == "_digests");
            for entry in entries.flatten() {
                let path = entry.path();
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if records_dir {
                    let hidden = entry.file_name().to_string_lossy().starts_with('.');
                    if !is_dir
                        && !hidden
                        && let Some(record) = fs::read(&path).ok().and_then(|d| parse_record(&d))
                    {
                        out.push(record);
                    }
                } else if is_dir {
                    stack.push(path);
                }
            }
        }
        out.sort_by(|a, b| {
            let key = |r: &ImageRecord| {
                (
                    r.reference.registry().to_owned(),
                    r.reference.repository().to_owned(),
                    r.reference.tag().map(str::to_owned),
                    r.reference.digest().cloned(),
                )
            };
            key(a).cmp(&key(b))
        });
        Ok(out)
    }

    /// Forgets `reference` (its blobs stay until collected); `false` when it was not recorded.
    pub fn remove(&self, reference: &Reference) -> Result<bool, RegistryError> {
        let path = self.record_path(reference);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error("remove record", &path)(e)),
        }
    }

    /// The image recorded for `reference`, from the cache alone; `None` when there is no record
    /// or a blob is missing.
    pub fn load(&self, reference: &Reference) -> Result<Option<PulledImage>, RegistryError> {
        match self.lookup(reference)? {
            Some(record) => self.load_manifest(reference, &record.digest, record.index_digest),
            None => Ok(None),
        }
    }

    /// Builds the image whose manifest (or index) is the cached blob `digest`; `None` when a blob
    /// is missing.
    pub(crate) fn load_manifest(
        &self,
        reference: &Reference,
        digest: &Digest,
        index_digest: Option<Digest>,
    ) -> Result<Option<PulledImage>, RegistryError> {
        let Ok(body) = self.blobs.read(digest, self.limits.max_manifest_bytes) else {
            return Ok(None);
        };
        let (manifest, media_type) =
            manifest::parse_manifest(&body, None).map_err(|e| RegistryError::manifest(reference, e))?;
        match manifest {
            Manifest::Index(index) if index_digest.is_none() => match manifest::select_linux_amd64(&index) {
                Some(entry) => self.load_manifest(reference, &entry.digest, Some(digest.clone())),
                None => Err(RegistryError::NoPlatform {
                    image: reference.to_string(),
                }),
            },
            Manifest::Index(_) => Err(RegistryError::UnsupportedMediaType {
                media_type,
                what: format!("nested index of {reference}"),
            }),
            Manifest::Image(m) => {
                manifest::check_image_manifest(&m, self.limits.max_layers)
                    .map_err(|e| RegistryError::manifest(reference, e))?;
                let Ok(config) = self.blobs.read(&m.config.digest, self.limits.max_config_bytes) else {
                    return Ok(None);
                };
                let config =
                    manifest::parse_config(&config).map_err(|e| RegistryError::manifest(reference, e))?;
                if m.layers.iter().any(|l| !self.blobs.contains(&l.digest, l.size)) {
                    return Ok(None);
                }
                Ok(Some(assemble(
                    &self.blobs,
                    reference,
                    digest.clone(),
                    index_digest,
                    &m,
                    config,
                )))
            }
        }
    }

    /// Every blob some record needs: indexes, manifests, configs and layers. Blobs outside this
    /// set can be deleted (when no pull is running).
    pub fn referenced_blobs(&self) -> Result<BTreeSet<Digest>, RegistryError> {
        let mut keep = BTreeSet::new();
        for record in self.list()? {
            if let Some(index) = &record.index_digest {
                keep.insert(index.clone());
            }
            keep.insert(record.digest.clone());
            if let Ok(body) = self.blobs.read(&record.digest, self.limits.max_manifest_bytes)
                && let Ok((Manifest::Image(m), _)) = manifest::parse_manifest(&body, None)
            {
                keep.insert(m.config.digest.clone());
                keep.extend(m.layers.iter().map(|l| l.digest.clone()));
            }
        }
        Ok(keep)
    }
}

fn parse_record(data: &[u8]) -> Option<ImageRecord> {
    let file: RecordFile = serde_json::from_slice(data).ok()?;
    Some(ImageRecord {
        reference: Reference::parse(&file.reference).ok()?,
        digest: file.digest,
        index_digest: file.index_digest,
        pulled_at: file.pulled_at,
    })
}

/// A [`PulledImage`] from a checked manifest whose blobs are all cached.
pub(crate) fn assemble(
    blobs: &BlobStore,
    reference: &Reference,
    digest: Digest,
    index_digest: Option<Digest>,
    m: &ImageManifest,
    config: manifest::ImageConfig,
) -> PulledImage {
    PulledImage {
        reference: reference.clone(),
        digest,
        index_digest,
        config_digest: m.config.digest.clone(),
        config,
        layers: m
            .layers
            .iter()
            .map(|l| Layer {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                compression: manifest::Compression::of_layer(&l.media_type)
                    .unwrap_or(manifest::Compression::None),
                size: l.size,
                path: blobs.path(&l.digest),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_records_of_one_tag_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(ImageStore::open(dir.path()).unwrap());
        let tagged = Reference::parse("127.0.0.1:5000/busybox:b").unwrap();
        let threads: Vec<_> = (0..8u8)
            .map(|i| {
                let (store, tagged) = (store.clone(), tagged.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        store.record(&tagged, &Digest::of(&[i]), None).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(store.lookup(&tagged).unwrap().is_some());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("images/127.0.0.1:5000/busybox/_tags"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn records_round_trip_list_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let tagged = Reference::parse("127.0.0.1:5000/apps/web:v1").unwrap();
        let nested = Reference::parse("127.0.0.1:5000/apps/web/worker:v1").unwrap();
        let d1 = Digest::of(b"1");
        let pinned = tagged.with_digest(d1.clone());
        store.record(&tagged, &d1, None).unwrap();
        store.record(&nested, &d1, Some(&Digest::of(b"i"))).unwrap();
        store.record(&pinned, &d1, None).unwrap();
        assert!(
            dir.path()
                .join("images/127.0.0.1:5000/apps/web/_tags/v1")
                .is_file()
        );
        let r = store.lookup(&tagged).unwrap().unwrap();
        assert_eq!(r.digest, d1);
        assert_eq!(r.reference, tagged);
        let all = store.list().unwrap();
        assert_eq!(all.len(), 3);
        // Tagged before pinned (`None` tag sorts first), parents before nested repositories.
        assert_eq!(all[0].reference, pinned);
        assert_eq!(all[1].reference, tagged);
        assert_eq!(all[2].index_digest, Some(Digest::of(b"i")));
        // Nothing is cached, so the image cannot be loaded offline.
        assert!(store.load(&tagged).unwrap().is_none());
        assert!(store.remove(&tagged).unwrap());
        assert!(!store.remove(&tagged).unwrap());
        assert!(store.lookup(&tagged).unwrap().is_none());
        assert_eq!(store.list().unwrap().len(), 2);
        assert!(store.referenced_blobs().unwrap().contains(&d1));
    }
}
