//! `aloft images pull REF [--json]`.

use aloft_image::{PulledImage, guest_image_config};
use anyhow::Context as _;
use clap::Args;
use serde::Serialize;

use crate::context::Context;
use crate::progress::{Display, bytes};

#[derive(Debug, Args)]
pub(crate) struct PullArgs {
    /// The image: NAME, NAME:TAG, NAME@sha256:…, or REGISTRY/NAME:TAG for another registry.
    #[arg(value_name = "REF")]
    reference: String,
    /// Print the pulled image as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
    /// Only cache the image; do not build its base root filesystem (which needs root).
    #[arg(long)]
    no_rootfs: bool,
}

/// `--json` output.
#[derive(Debug, Serialize)]
struct PullOutput {
    reference: String,
    /// The linux/amd64 image manifest's digest.
    digest: String,
    index_digest: Option<String>,
    config_digest: String,
    /// Compressed bytes of all layers.
    size: u64,
    layers: Vec<LayerOutput>,
    /// What a machine's init runs (the image config mapped to the run config's image section).
    config: serde_json::Value,
    /// Parts of the image config that were dropped or adjusted on the way.
    warnings: Vec<String>,
    /// The read-only base root filesystem machines of this image boot from (`null` with
    /// `--no-rootfs`).
    rootfs: Option<RootfsOutput>,
}

#[derive(Debug, Serialize)]
struct RootfsOutput {
    path: String,
    /// `ext4` or `erofs`.
    fstype: &'static str,
    /// Allocated bytes on disk.
    disk_bytes: u64,
    /// Whether it existed already (built by an earlier pull of the same digest).
    reused: bool,
    /// Time spent building it (0 when reused).
    build_ms: u64,
}

#[derive(Debug, Serialize)]
struct LayerOutput {
    digest: String,
    media_type: String,
    size: u64,
}

pub(crate) async fn run(ctx: &Context, args: &PullArgs) -> anyhow::Result<()> {
    let reference = ctx.reference(&args.reference)?;
    let puller = ctx.puller()?;
    let display = Display::new("pull");
    let result = puller.pull(&reference, &display.progress()).await;
    display.finish();
    let image = result?;
    let guest = guest_image_config(&image.config);
    for warning in &guest.warnings {
        eprintln!("warning: {warning}");
    }
    if !args.json {
        println!("{}", summary(&image));
    }
    let rootfs = if args.no_rootfs {
        None
    } else {
        let base = build_base(ctx, &image).await?;
        if !args.json {
            let how = if base.reused {
                "already built".to_owned()
            } else {
                format!("built in {} ms", base.build_ms)
            };
            println!(
                "base rootfs {} ({}, {}, {how})",
                base.path,
                base.fstype,
                bytes(base.disk_bytes)
            );
        }
        Some(base)
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&output(&image, rootfs))?);
    }
    Ok(())
}

/// Builds (or finds) the image's base root filesystem.
async fn build_base(ctx: &Context, image: &PulledImage) -> anyhow::Result<RootfsOutput> {
    let store = ctx.rootfs()?;
    let fstype = store.format().fstype();
    let pulled = image.clone();
    let (base, stats) = tokio::task::spawn_blocking(move || store.build(&pulled))
        .await?
        .with_context(|| {
            format!(
                "build the base root filesystem of {} (the image itself is cached; --no-rootfs skips this)",
                image.reference
            )
        })?;
    Ok(RootfsOutput {
        path: base.path.display().to_string(),
        fstype,
        disk_bytes: base.disk_bytes,
        reused: stats.reused,
        build_ms: stats.unpack_ms.saturating_add(stats.mkfs_ms),
    })
}

fn output(image: &PulledImage, rootfs: Option<RootfsOutput>) -> PullOutput {
    let guest = guest_image_config(&image.config);
    PullOutput {
        reference: image.reference.to_string(),
        digest: image.digest.to_string(),
        index_digest: image.index_digest.as_ref().map(ToString::to_string),
        config_digest: image.config_digest.to_string(),
        size: image.layers.iter().map(|l| l.size).sum(),
        layers: image
            .layers
            .iter()
            .map(|l| LayerOutput {
                digest: l.digest.to_string(),
                media_type: l.media_type.clone(),
                size: l.size,
            })
            .collect(),
        config: serde_json::to_value(&guest.image).unwrap_or_default(),
        warnings: guest.warnings.iter().map(ToString::to_string).collect(),
        rootfs,
    }
}

fn summary(image: &PulledImage) -> String {
    let size: u64 = image.layers.iter().map(|l| l.size).sum();
    format!(
        "pulled {} {} ({} layer{}, {})",
        image.reference,
        image.digest,
        image.layers.len(),
        if image.layers.len() == 1 { "" } else { "s" },
        bytes(size)
    )
}
