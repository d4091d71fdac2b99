//! `aloft`, the command-line interface. flyctl is the model: command groups (`aloft apps …`,
//! `aloft images …`, `aloft config …`),
//! each subcommand in its own file with the same shape (clap args struct, `run(ctx, args)`), and
//! errors that say what to do next.
//!
//! The CLI talks to the platform through `aloft-client` → `aloft-api` (`cli → client → api`), as
//! `aloft apps` does. **Temporary deviation:** until `aloftd` serves images through the agent's
//! host API, `aloft images` links `aloft-image` and works on the local data directory
//! (`--data-dir`) and registry (`--registry`) directly; when that API lands, these commands move
//! onto it and this crate drops its `aloft-image` dependency. Nothing else may be linked directly: no `vm`,
//! no store, no control plane.
//!
//! Threading: one current-thread tokio runtime per invocation; blocking file work goes through
//! `spawn_blocking` inside `aloft-image`.

mod apps;
mod config;
mod context;
mod errors;
mod images;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::context::{Context, GlobalArgs};

/// aloft: run apps as microVMs on your own machines.
#[derive(Debug, Parser)]
#[command(name = "aloft", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Command groups, one module each.
#[derive(Debug, Subcommand)]
enum Command {
    /// Manage images: list, pull, remove, bootstrap base images.
    #[command(subcommand)]
    Images(images::ImagesCommand),
    /// Manage apps: create, list, destroy.
    #[command(subcommand)]
    Apps(apps::AppsCommand),
    /// Check and print the app config (aloft.toml, else fly.toml).
    #[command(subcommand)]
    Config(config::ConfigCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let ctx = Context::new(cli.global)?;
        match cli.command {
            Command::Images(cmd) => images::run(&ctx, cmd).await,
            Command::Config(cmd) => config::run(cmd),
            Command::Apps(cmd) => apps::run(&ctx, cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => errors::report(&e),
    }
}
