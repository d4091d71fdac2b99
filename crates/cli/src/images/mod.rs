//! `aloft images …`: the local image cache and the registry's base images.

mod bootstrap;
mod gc;
mod list;
mod pull;
mod rm;

use clap::Subcommand;

use crate::context::Context;

/// `aloft images` subcommands, one file each.
#[derive(Debug, Subcommand)]
pub(crate) enum ImagesCommand {
    /// List the images in the local cache.
    #[command(visible_alias = "ls")]
    List(list::ListArgs),
    /// Pull an image into the local cache and build its base root filesystem (names without a
    /// registry come from --registry).
    Pull(pull::PullArgs),
    /// Remove an image from the local cache, and its base root filesystem when no other name uses
    /// it (blobs stay until garbage collection).
    #[command(visible_alias = "remove")]
    Rm(rm::RmArgs),
    /// Build base images on this host and push them into the registry: busybox (from
    /// busybox-static) and debian:bookworm (debootstrap; needs root and Debian's mirror).
    Bootstrap(bootstrap::BootstrapArgs),
    /// Remove cached blobs and base root filesystems no cached image needs, least recently used
    /// first, until the cache fits a budget.
    Gc(gc::GcArgs),
}

pub(crate) async fn run(ctx: &Context, cmd: ImagesCommand) -> anyhow::Result<()> {
    match cmd {
        ImagesCommand::List(args) => list::run(ctx, &args).await,
        ImagesCommand::Pull(args) => pull::run(ctx, &args).await,
        ImagesCommand::Rm(args) => rm::run(ctx, &args).await,
        ImagesCommand::Bootstrap(args) => bootstrap::run(ctx, &args).await,
        ImagesCommand::Gc(args) => gc::run(ctx, &args).await,
    }
}
