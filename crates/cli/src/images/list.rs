//! `aloft images list [--json]`.

use aloft_image::ImageRecord;
use anyhow::Context as _;
use clap::Args;
use serde::Serialize;

use crate::context::Context;
use crate::progress::{bytes, short};

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

/// One image in `--json` output.
#[derive(Debug, Serialize)]
pub(crate) struct ListedImage {
    /// The reference as pulled (`127.0.0.1:5000/busybox:latest`).
    reference: String,
    registry: String,
    repository: String,
    tag: Option<String>,
    /// The linux/amd64 image manifest's digest.
    digest: String,
    /// The index it was chosen from, when the reference named one.
    index_digest: Option<String>,
    /// Compressed bytes of its layers, when all are cached.
    size: Option<u64>,
    /// Whether every blob is still in the cache.
    complete: bool,
    /// The base root filesystem, when built.
    rootfs: Option<String>,
    /// Seconds since the Unix epoch.
    pulled_at: u64,
}

pub(crate) async fn run(ctx: &Context, args: &ListArgs) -> anyhow::Result<()> {
    let puller = ctx.puller()?;
    let images = puller.images().clone();
    let rootfs = ctx.rootfs()?;
    let listed = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<ListedImage>> {
        let records = images.list().context("list the image cache")?;
        Ok(records
            .into_iter()
            .map(|record| {
                let loaded = images.load(&record.reference).ok().flatten();
                let size = loaded.map(|image| image.layers.iter().map(|l| l.size).sum());
                let base = rootfs.path(&record.digest);
                let base = base.is_file().then(|| base.display().to_string());
                listed(&record, size, base)
            })
            .collect())
    })
    .await??;

    if args.json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(());
    }
    if listed.is_empty() {
        eprintln!(
            "no images in {} (aloft images pull NAME)",
            ctx.image_dir().display()
        );
        return Ok(());
    }
    let name_width = listed.iter().map(|i| name(i).len()).max().unwrap_or(0).max(10);
    println!(
        "{:name_width$}  {:16}  {:>10}  DIGEST",
        "REPOSITORY", "TAG", "SIZE"
    );
    for image in &listed {
        let tag = image.tag.as_deref().unwrap_or("<none>");
        let size = image.size.map_or_else(|| "incomplete".to_owned(), bytes);
        let digest = image.digest.parse().map(|d| short(&d)).unwrap_or_default();
        println!("{:name_width$}  {tag:16}  {size:>10}  {digest}", name(image));
    }
    Ok(())
}

fn name(image: &ListedImage) -> String {
    format!("{}/{}", image.registry, image.repository)
}

fn listed(record: &ImageRecord, size: Option<u64>, rootfs: Option<String>) -> ListedImage {
    let r = &record.reference;
    ListedImage {
        reference: r.to_string(),
        registry: r.registry().to_owned(),
        repository: r.repository().to_owned(),
        tag: r.tag().map(str::to_owned),
        digest: record.digest.to_string(),
        index_digest: record.index_digest.as_ref().map(ToString::to_string),
        size,
        complete: size.is_some(),
        rootfs,
        pulled_at: record.pulled_at,
    }
}
