//! Garbage collection of base root filesystems and blobs within a disk budget.
//!
//! What stays, always: everything an image record needs ([`ImageStore::referenced_blobs`] and the
//! recorded images' bases) and everything an image in use by a machine needs (the caller passes
//! the manifest digests of the images its machines run: their manifests, configs, layers and
//! bases). Everything else is a candidate. When the store (bases plus blobs, counted by allocated
//! bytes) is over the budget, candidates go least recently used first (a base's last use is its
//! mtime, refreshed whenever it is looked up; a blob's is when it was cached) until the store fits.
//! Candidates younger than [`GcOptions::grace`] are spared: a pull in progress has cached blobs no
//! record names yet. A base whose build holds its lock is skipped.
//!
//! When everything left is in use, the store may stay over budget; [`GcReport::over_budget`] says so.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime};

use crate::blobs::{BlobError, BlobStore};
use crate::digest::Digest;
use crate::images::ImageStore;
use crate::manifest::{self, Manifest};
use crate::registry::RegistryError;
use crate::rootfs::{RootfsError, RootfsStore};

/// Manifests larger than this are not read when looking for an in-use image's blobs.
const MAX_MANIFEST: u64 = 4 << 20;

/// Why garbage collection stopped.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// The image records could not be read (nothing was removed).
    #[error("gc: read the image records")]
    Records(#[source] RegistryError),
    /// Listing or removing a base failed.
    #[error("gc: base root filesystems")]
    Rootfs(#[source] RootfsError),
    /// Listing or removing a blob failed.
    #[error("gc: blob cache")]
    Blobs(#[source] BlobError),
}

/// How much to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcOptions {
    /// Bytes the bases and blobs together may use.
    pub budget_bytes: u64,
    /// Unreferenced items younger than this are kept (pulls and builds in progress). Default 10 min.
    pub grace: Duration,
}

impl GcOptions {
    /// A budget with the default grace period.
    pub fn with_budget(budget_bytes: u64) -> Self {
        Self {
            budget_bytes,
            grace: Duration::from_secs(600),
        }
    }
}

/// What kind of item was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GcKind {
    /// A base root filesystem (named by its image manifest digest).
    Base,
    /// A blob of the cache.
    Blob,
}

/// One removed item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Base or blob.
    pub kind: GcKind,
    /// Its digest.
    pub digest: Digest,
    /// Bytes freed.
    pub bytes: u64,
}

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Bytes used before.
    pub used_before: u64,
    /// Bytes used after.
    pub used_after: u64,
    /// Bytes freed (sum of `removed`).
    pub freed: u64,
    /// What was removed, least recently used first.
    pub removed: Vec<Removed>,
    /// Still over the budget: everything left is referenced, in use, young or busy.
    pub over_budget: bool,
}

struct Candidate {
    kind: GcKind,
    digest: Digest,
    bytes: u64,
    last_used: SystemTime,
}

/// Removes unreferenced bases and blobs, least recently used first, until bases and blobs fit in
/// `options.budget_bytes`. `in_use` holds the image manifest digests machines run; nothing they
/// need is touched.
pub fn collect(
    images: &ImageStore,
    rootfs: &RootfsStore,
    in_use: &BTreeSet<Digest>,
    options: &GcOptions,
) -> Result<GcReport, GcError> {
    let blobs = images.blobs();
    let mut keep_blobs = images.referenced_blobs().map_err(GcError::Records)?;
    let mut keep_bases: BTreeSet<Digest> = images
        .list()
        .map_err(GcError::Records)?
        .into_iter()
        .map(|r| r.digest)
        .collect();
    for digest in in_use {
        keep_bases.insert(digest.clone());
        keep_blobs.extend(needed_by(blobs, digest));
    }

    let now = SystemTime::now();
    let mut used = 0u64;
    let mut candidates = Vec::new();
    for base in rootfs.list().map_err(GcError::Rootfs)? {
        used = used.saturating_add(base.disk_bytes);
        if !keep_bases.contains(&base.digest) {
            candidates.push(Candidate {
                kind: GcKind::Base,
                digest: base.digest,
                bytes: base.disk_bytes,
                last_used: base.last_used,
            });
        }
    }
    for (digest, _) in blobs.list().map_err(GcError::Blobs)? {
        let Ok(meta) = std::fs::metadata(blobs.path(&digest)) else {
            continue; // removed meanwhile
        };
        let bytes = meta.blocks().saturating_mul(512);
        used = used.saturating_add(bytes);
        if !keep_blobs.contains(&digest) {
            candidates.push(Candidate {
                kind: GcKind::Blob,
                digest,
                bytes,
                last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
    }

    let mut report = GcReport {
        used_before: used,
        ..GcReport::default()
    };
    candidates.sort_by_key(|c| c.last_used);
    for c in candidates {
        if used <= options.budget_bytes {
            break;
        }
        let young = now
            .duration_since(c.last_used)
            .is_ok_and(|age| age < options.grace)
            || c.last_used > now;
        if young {
            continue;
        }
        let freed = match c.kind {
            GcKind::Base => rootfs.remove(&c.digest).map_err(GcError::Rootfs)?,
            GcKind::Blob => blobs
                .remove(&c.digest)
                .map_err(GcError::Blobs)?
                .then_some(c.bytes),
        };
        if let Some(bytes) = freed {
            used = used.saturating_sub(bytes);
            report.freed = report.freed.saturating_add(bytes);
            report.removed.push(Removed {
                kind: c.kind,
                digest: c.digest,
                bytes,
            });
        }
    }
    report.used_after = used;
    report.over_budget = used > options.budget_bytes;
    Ok(report)
}

/// The blobs image `digest` needs: its manifest, config and layers (those the cache can tell).
fn needed_by(blobs: &BlobStore, digest: &Digest) -> Vec<Digest> {
    let mut out = vec![digest.clone()];
    if let Ok(body) = blobs.read(digest, MAX_MANIFEST)
        && let Ok((Manifest::Image(m), _)) = manifest::parse_manifest(&body, None)
    {
        out.push(m.config.digest.clone());
        out.extend(m.layers.iter().map(|l| l.digest.clone()));
    }
    out
}
