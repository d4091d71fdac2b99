//! Pushing images to a registry: single blobs and manifests, or a whole OCI image layout
//! directory (what `skopeo copy … oci:DIR`, `umoci` and `buildah` write). Used by tests and by
//! the base-image bootstrap.
//!
//! Blobs the registry already has are skipped (`HEAD`); others are uploaded in one `PUT` up to
//! the chunk size (16 MiB), else in `PATCH` chunks closed by a `PUT`. Manifests go last, children
//! of an index before the index, so a tag never points at missing content.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::digest::Digest;
use crate::manifest::{self, Manifest};
use crate::progress::{Progress, PullEvent};
use crate::reference::Reference;
use crate::registry::{Client, RegistryConfig, RegistryError, pushable_manifest};

/// Default upload chunk size.
const CHUNK_SIZE: u64 = 16 << 20;
/// The OCI layout annotation naming a manifest's tag.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Pushes blobs, manifests and OCI layouts to registries. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Pusher {
    client: Client,
    chunk_size: u64,
}

impl Pusher {
    /// A pusher using `config`'s transport, credentials and retries.
    pub fn new(config: RegistryConfig) -> Result<Self, RegistryError> {
        Ok(Self {
            client: Client::new(config)?,
            chunk_size: CHUNK_SIZE,
        })
    }

    /// Uploads blobs larger than `bytes` in chunks of that size (default 16 MiB).
    pub fn with_chunk_size(mut self, bytes: u64) -> Self {
        self.chunk_size = bytes.max(1);
        self
    }

    /// Uploads `data` to `reference`'s repository unless the registry has it; returns its digest.
    pub async fn push_blob(
        &self,
        reference: &Reference,
        data: Bytes,
        progress: &Progress,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&data);
        let size = u64::try_from(data.len()).unwrap_or(u64::MAX);
        if self.client.blob_exists(reference, &digest, progress).await? {
            progress.emit(PullEvent::BlobCached {
                digest: digest.clone(),
                size,
            });
            return Ok(digest);
        }
        let read = |offset: u64, len: u64| {
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            let end = usize::try_from(offset.saturating_add(len)).unwrap_or(usize::MAX);
            let chunk = data.slice(start.min(data.len())..end.min(data.len()));
            async move { Ok(chunk) }
        };
        self.client
            .upload_blob(reference, &digest, size, self.chunk_size, read, progress)
            .await?;
        Ok(digest)
    }

    /// Uploads the file `path` as the blob `digest` unless the registry has it (the registry
    /// checks the digest).
    pub async fn push_blob_file(
        &self,
        reference: &Reference,
        path: &Path,
        digest: &Digest,
        progress: &Progress,
    ) -> Result<(), RegistryError> {
        let layout_error = |reason: String| RegistryError::Layout {
            path: path.to_path_buf(),
            reason,
        };
        let size = std::fs::metadata(path)
            .map_err(|e| layout_error(format!("stat blob: {e}")))?
            .len();
        if self.client.blob_exists(reference, digest, progress).await? {
            progress.emit(PullEvent::BlobCached {
                digest: digest.clone(),
                size,
            });
            return Ok(());
        }
        let path: PathBuf = path.to_path_buf();
        let read = |offset: u64, len: u64| {
            let path = path.clone();
            async move {
                tokio::task::spawn_blocking(move || -> Result<Bytes, RegistryError> {
                    let file = std::fs::File::open(&path).map_err(|e| RegistryError::Layout {
                        path: path.clone(),
                        reason: format!("open blob: {e}"),
                    })?;
                    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
                    file.read_exact_at(&mut buf, offset)
                        .map_err(|e| RegistryError::Layout {
                            path: path.clone(),
                            reason: format!("read blob: {e}"),
                        })?;
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(RegistryError::Task)?
            }
        };
        self.client
            .upload_blob(reference, digest, size, self.chunk_size, read, progress)
            .await
    }

    /// Stores a manifest (or index) under `reference`'s tag or digest; returns its digest.
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        media_type: &str,
        body: Bytes,
        progress: &Progress,
    ) -> Result<Digest, RegistryError> {
        if !pushable_manifest(media_type) {
            return Err(RegistryError::UnsupportedMediaType {
                media_type: media_type.to_owned(),
                what: format!("manifest pushed to {reference}"),
            });
        }
        self.client
            .put_manifest(reference, media_type, body, progress)
            .await
    }

    /// Pushes the image of an OCI layout directory as `reference`: the manifest of `index.json`
    /// whose `org.opencontainers.image.ref.name` is the reference's tag, else its only one. An
    /// index is pushed with all its manifests. Returns the digest the tag now points to.
    pub async fn push_oci_layout(
        &self,
        layout: &Path,
        reference: &Reference,
        progress: &Progress,
    ) -> Result<Digest, RegistryError> {
        let layout_error = |reason: String| RegistryError::Layout {
            path: layout.to_path_buf(),
            reason,
        };
        let index_path = layout.join("index.json");
        let index_body =
            std::fs::read(&index_path).map_err(|e| layout_error(format!("read index.json: {e}")))?;
        let index: manifest::ImageIndex = serde_json::from_slice(&index_body)
            .map_err(|e| layout_error(format!("parse index.json: {e}")))?;
        let tag = reference.tag();
        let named: Vec<_> = index
            .manifests
            .iter()
            .filter(|d| {
                d.annotations
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME))
                    .is_some_and(|name| Some(name.as_str()) == tag)
            })
            .collect();
        let top = match (named.as_slice(), index.manifests.as_slice()) {
            ([one], _) => (*one).clone(),
            ([], [one]) => one.clone(),
            _ => {
                return Err(layout_error(format!(
                    "index.json has {} manifests and none (or several) named {}",
                    index.manifests.len(),
                    tag.unwrap_or("(no tag)")
                )));
            }
        };
        self.push_layout_manifest(layout, reference, &top, true, progress)
            .await?;
        progress.emit(PullEvent::Done {
            digest: top.digest.clone(),
        });
        Ok(top.digest)
    }

    /// Pushes one manifest of a layout and everything it refers to; `tagged` pushes it under the
    /// reference's tag, else by digest.
    async fn push_layout_manifest(
        &self,
        layout: &Path,
        reference: &Reference,
        desc: &manifest::Descriptor,
        tagged: bool,
        progress: &Progress,
    ) -> Result<(), RegistryError> {
        let blob = |d: &Digest| layout.join("blobs").join(d.algorithm()).join(d.hex());
        let path = blob(&desc.digest);
        let body = std::fs::read(&path).map_err(|e| RegistryError::Layout {
            path: path.clone(),
            reason: format!("read manifest: {e}"),
        })?;
        let (parsed, media_type) = manifest::parse_manifest(&body, Some(&desc.media_type))
            .map_err(|e| RegistryError::manifest(reference, e))?;
        match parsed {
            Manifest::Image(m) => {
                for d in std::iter::once(&m.config).chain(&m.layers) {
                    self.push_blob_file(reference, &blob(&d.digest), &d.digest, progress)
                        .await?;
                }
            }
            Manifest::Index(index) => {
                for child in &index.manifests {
                    Box::pin(self.push_layout_manifest(layout, reference, child, false, progress)).await?;
                }
            }
        }
        let target = if tagged {
            reference.clone()
        } else {
            reference.with_digest(desc.digest.clone())
        };
        self.client
            .put_manifest(&target, &media_type, Bytes::from(body), progress)
            .await?;
        Ok(())
    }
}
