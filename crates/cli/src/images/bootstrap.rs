//! `aloft images bootstrap [busybox|debian|all]`: base images for a fresh installation.

use std::path::PathBuf;
use std::sync::Arc;

use aloft_image::bootstrap::{self, BootstrapOptions, Bootstrapped};
use anyhow::Context as _;
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::context::Context;
use crate::progress::{Display, bytes};

#[derive(Debug, Args)]
pub(crate) struct BootstrapArgs {
    /// Which base image to build.
    #[arg(value_enum, default_value_t = Which::All)]
    which: Which,
    /// Where the debian layer is cached. Default: $ALOFT_CACHE, else ~/.cache/aloft.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Debian mirror for debootstrap.
    #[arg(long, default_value = bootstrap::DEBIAN_MIRROR, value_name = "URL")]
    mirror: String,
    /// Build again even if a cached layer exists.
    #[arg(long)]
    rebuild: bool,
    /// Print the pushed images as a JSON array on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    /// `busybox:latest` from busybox-static (seconds, no root needed).
    Busybox,
    /// `debian:bookworm` with debootstrap minbase (about a minute, needs root).
    Debian,
    /// Both.
    All,
}

/// One pushed image in `--json` output.
#[derive(Debug, Serialize)]
struct Pushed {
    name: &'static str,
    reference: String,
    digest: String,
    layer: String,
    layer_size: u64,
    cached: bool,
}

pub(crate) async fn run(ctx: &Context, args: &BootstrapArgs) -> anyhow::Result<()> {
    let display = Display::new("push");
    let status = Arc::clone(&display);
    let options = BootstrapOptions {
        progress: display.progress(),
        status: Some(Arc::new(move |line: &str| status.status(line))),
        mirror: Some(args.mirror.clone()),
        rebuild: args.rebuild,
    };
    let mut pushed = Vec::new();
    if matches!(args.which, Which::Busybox | Which::All) {
        let target = ctx.reference("busybox:latest")?;
        let result = bootstrap::bootstrap_busybox(&ctx.registry_config, &target, &options).await;
        display.finish();
        let image = result.with_context(|| format!("bootstrap {target}"))?;
        pushed.push(report("busybox", &image, args.json));
    }
    if matches!(args.which, Which::Debian | Which::All) {
        let target = ctx.reference("debian:bookworm")?;
        let cache = args
            .cache_dir
            .clone()
            .unwrap_or_else(bootstrap::default_cache_dir);
        let result = bootstrap::bootstrap_debian(&ctx.registry_config, &target, &cache, &options).await;
        display.finish();
        let image = result.with_context(|| format!("bootstrap {target}"))?;
        pushed.push(report("debian", &image, args.json));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&pushed)?);
    }
    Ok(())
}

fn report(name: &'static str, image: &Bootstrapped, json: bool) -> Pushed {
    if !json {
        println!(
            "pushed {} {} (layer {}{})",
            image.reference,
            image.digest,
            bytes(image.layer_size),
            if image.cached { ", from cache" } else { "" }
        );
    }
    Pushed {
        name,
        reference: image.reference.to_string(),
        digest: image.digest.to_string(),
        layer: image.layer.to_string(),
        layer_size: image.layer_size,
        cached: image.cached,
    }
}
