//! `aloft images rm REF`.

use anyhow::Context as _;
use clap::Args;

use crate::context::Context;
use crate::errors::{EXIT_NOT_FOUND, UserError};

#[derive(Debug, Args)]
pub(crate) struct RmArgs {
    /// The image, as listed by `aloft images list` (NAME, NAME:TAG or NAME@DIGEST).
    #[arg(value_name = "REF")]
    reference: String,
}

pub(crate) async fn run(ctx: &Context, args: &RmArgs) -> anyhow::Result<()> {
    let reference = ctx.reference(&args.reference)?;
    let puller = ctx.puller()?;
    let images = puller.images().clone();
    let rootfs = ctx.rootfs()?;
    let r = reference.clone();
    let removed = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Option<u64>>> {
        let Some(record) = images.lookup(&r)? else {
            return Ok(None);
        };
        if !images.remove(&r)? {
            return Ok(None);
        }
        // The base goes with the last reference to its digest; blobs stay for garbage collection.
        let still_used = images.list()?.iter().any(|other| other.digest == record.digest);
        let freed = if still_used {
            None
        } else {
            rootfs.remove(&record.digest)?
        };
        Ok(Some(freed))
    })
    .await?
    .with_context(|| format!("remove {reference}"))?;
    let Some(freed) = removed else {
        return Err(UserError {
            message: format!("image not found locally: {reference}"),
            hint: Some("aloft images list shows what is cached".into()),
            code: EXIT_NOT_FOUND,
        }
        .into());
    };
    println!("removed {reference}");
    if let Some(bytes) = freed {
        println!(
            "removed its base root filesystem ({})",
            crate::progress::bytes(bytes)
        );
    }
    Ok(())
}
