//! Pulling an image into the cache: resolve the reference to a linux/amd64 image manifest, fetch
//! its config and layers (verified, concurrently), and record it.
//!
//! Steps, each of which either completes or leaves the cache as it was:
//!
//! 1. A reference pinned to a digest whose image is fully cached is served from the cache
//!    without the network.
//! 2. `GET /v2/REPO/manifests/REF` (OCI or Docker schema 2; at most `max_manifest_bytes`). An
//!    index or manifest list is resolved to its linux/amd64 entry, fetched by digest. Manifests
//!    fetched by digest are verified against it.
//! 3. The config (at most `max_config_bytes`) is fetched, verified and parsed; an image whose
//!    config names another platform is refused.
//! 4. Layers missing from the cache are downloaded, up to `max_concurrent_downloads` at a time,
//!    each streamed through its digest and size check into the blob cache (see [`crate::blobs`]).
//! 5. Only then are the manifests stored as blobs and the reference recorded (see
//!    [`crate::images`]).

use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::blobs::BlobStore;
use crate::digest::Digest;
use crate::images::{ImageStore, assemble};
use crate::manifest::{self, Compression, ImageConfig, Manifest};
use crate::progress::{Progress, PullEvent};
use crate::reference::Reference;
use crate::registry::{Client, RegistryConfig, RegistryError};

/// A layer of a pulled image, verified and in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The (compressed) blob's digest.
    pub digest: Digest,
    /// The media type as the manifest says.
    pub media_type: String,
    /// How the blob is compressed.
    pub compression: Compression,
    /// Size in bytes of the blob.
    pub size: u64,
    /// The verified blob in the cache (read-only).
    pub path: PathBuf,
}

/// A pulled image: everything needed to unpack and run it, all in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The reference it was pulled as.
    pub reference: Reference,
    /// The linux/amd64 image manifest's digest: the image's identity.
    pub digest: Digest,
    /// The index (manifest list) it was chosen from, if the reference named one.
    pub index_digest: Option<Digest>,
    /// The config blob's digest (the "image ID" of Docker).
    pub config_digest: Digest,
    /// The parsed config.
    pub config: ImageConfig,
    /// Layers, base first.
    pub layers: Vec<Layer>,
}

/// Pulls images from registries into a cache directory. Cheap to clone; share one per process.
#[derive(Debug, Clone)]
pub struct Puller {
    client: Client,
    images: ImageStore,
}

impl Puller {
    /// A puller caching under `cache_root` (`blobs/` and `images/` are created there).
    pub fn new(cache_root: &Path, config: RegistryConfig) -> Result<Self, RegistryError> {
        let images = ImageStore::with_limits(cache_root, config.limits.clone())?;
        Ok(Self {
            client: Client::new(config)?,
            images,
        })
    }

    /// The image records (list, remove, offline load).
    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// The blob cache.
    pub fn blobs(&self) -> &BlobStore {
        self.images.blobs()
    }

    /// Pulls `reference` (linux/amd64) into the cache and records it.
    pub async fn pull(
        &self,
        reference: &Reference,
        progress: &Progress,
    ) -> Result<PulledImage, RegistryError> {
        if let Some(digest) = reference.digest() {
            let images = self.images.clone();
            let (r, d) = (reference.clone(), digest.clone());
            let cached = tokio::task::spawn_blocking(move || images.load_manifest(&r, &d, None))
                .await
                .map_err(RegistryError::Task)?;
            if let Ok(Some(image)) = cached {
                self.finish(reference, &image, None, progress).await?;
                return Ok(image);
            }
        }

        let limits = &self.client.config().limits;
        let (body, content_type, digest) = self.client.get_manifest(reference, progress).await?;
        let (parsed, _) = manifest::parse_manifest(&body, content_type.as_deref())
            .map_err(|e| RegistryError::manifest(reference, e))?;
        let (image_manifest, digest, body, index) = match parsed {
            Manifest::Image(m) => (m, digest, body, None),
            Manifest::Index(index) => {
                let entry =
                    manifest::select_linux_amd64(&index).ok_or_else(|| RegistryError::NoPlatform {
                        image: reference.to_string(),
                    })?;
                if entry.size > limits.max_manifest_bytes {
                    return Err(RegistryError::ManifestTooLarge {
                        image: reference.with_digest(entry.digest.clone()).to_string(),
                        limit: limits.max_manifest_bytes,
                    });
                }
                let child = reference.with_digest(entry.digest.clone());
                let (child_body, child_type, child_digest) =
                    self.client.get_manifest(&child, progress).await?;
                match manifest::parse_manifest(&child_body, child_type.as_deref())
                    .map_err(|e| RegistryError::manifest(&child, e))?
                {
                    (Manifest::Image(m), _) => (m, child_digest, child_body, Some((digest, body))),
                    (Manifest::Index(_), media_type) => {
                        return Err(RegistryError::UnsupportedMediaType {
                            media_type,
                            what: format!("nested index in {reference}"),
                        });
                    }
                }
            }
        };
        manifest::check_image_manifest(&image_manifest, limits.max_layers)
            .map_err(|e| RegistryError::manifest(reference, e))?;
        progress.emit(PullEvent::Resolved {
            reference: reference.to_string(),
            digest: digest.clone(),
            layers: image_manifest.layers.len(),
            total_bytes: image_manifest
                .layers
                .iter()
                .fold(image_manifest.config.size, |sum, l| sum.saturating_add(l.size)),
        });

        let store = self.blobs().clone();
        let config_body = self
            .client
            .fetch_small_blob(
                reference,
                &image_manifest.config,
                limits.max_config_bytes,
                &store,
                progress,
            )
            .await?;
        let config =
            manifest::parse_config(&config_body).map_err(|e| RegistryError::manifest(reference, e))?;
        let os = config.os.as_deref().unwrap_or("linux");
        let arch = config.architecture.as_deref().unwrap_or("amd64");
        if os != "linux" || arch != "amd64" {
            return Err(RegistryError::WrongPlatform {
                image: reference.to_string(),
                platform: format!("{os}/{arch}"),
            });
        }

        self.fetch_layers(reference, &image_manifest.layers, progress)
            .await?;

        // Every blob is in: now the manifests, then the record.
        let index_digest = index.as_ref().map(|(d, _)| d.clone());
        let image = assemble(
            &store,
            reference,
            digest.clone(),
            index_digest,
            &image_manifest,
            config,
        );
        let manifests = std::iter::once((digest, Bytes::from(body)))
            .chain(index.map(|(d, b)| (d, Bytes::from(b))))
            .collect();
        self.finish(reference, &image, Some(manifests), progress).await?;
        Ok(image)
    }

    /// Stores `manifests` as blobs, records the image, reports it done.
    async fn finish(
        &self,
        reference: &Reference,
        image: &PulledImage,
        manifests: Option<Vec<(Digest, Bytes)>>,
        progress: &Progress,
    ) -> Result<(), RegistryError> {
        let images = self.images.clone();
        let reference = reference.clone();
        let (digest, index_digest) = (image.digest.clone(), image.index_digest.clone());
        tokio::task::spawn_blocking(move || -> Result<(), RegistryError> {
            for (d, body) in manifests.unwrap_or_default() {
                images.blobs().insert(&d, &body)?;
            }
            images.record(&reference, &digest, index_digest.as_ref())
        })
        .await
        .map_err(RegistryError::Task)??;
        progress.emit(PullEvent::Done {
            digest: image.digest.clone(),
        });
        Ok(())
    }

    async fn fetch_layers(
        &self,
        reference: &Reference,
        layers: &[manifest::Descriptor],
        progress: &Progress,
    ) -> Result<(), RegistryError> {
        let parallel = self.client.config().max_concurrent_downloads.max(1);
        let limit = self.client.config().limits.max_blob_bytes;
        let mut pending = Vec::new();
        for layer in layers {
            // The same blob twice in one image is fetched once.
            if !pending
                .iter()
                .any(|l: &manifest::Descriptor| l.digest == layer.digest)
            {
                pending.push(layer.clone());
            }
        }
        pending.reverse(); // pop() from the front of the image
        let mut running = tokio::task::JoinSet::new();
        loop {
            while running.len() < parallel {
                let Some(layer) = pending.pop() else { break };
                let client = self.client.clone();
                let store = self.blobs().clone();
                let reference = reference.clone();
                let progress = progress.clone();
                running.spawn(async move {
                    client
                        .fetch_blob(&reference, &layer, limit, &store, &progress)
                        .await
                });
            }
            let failed = match running.join_next().await {
                None => return Ok(()),
                Some(Ok(Ok(_path))) => continue,
                Some(Ok(Err(e))) => e,
                Some(Err(e)) => RegistryError::Task(e),
            };
            // Stop the other downloads and wait until they are gone; their writers then delete
            // their temporary files (on a blocking thread, right after).
            running.abort_all();
            while running.join_next().await.is_some() {}
            return Err(failed);
        }
    }
}
