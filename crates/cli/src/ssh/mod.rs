//! `aloft ssh …`: flyctl's `ssh console`, an interactive shell or command in a machine.
//!
//! There is no SSH underneath (Fly reaches a machine's SSH server over WireGuard; aloft has
//! neither): the CLI asks aloftd for a console (`GET …/machines/{id}/console`, upgraded to
//! console frames; `aloft_api::ConsoleQuery`), and init runs the command in the guest, on a
//! pseudo-terminal when the session has one. The group keeps flyctl's name and grammar.

pub(crate) mod console;
mod tty;

use clap::Subcommand;

use crate::context::Context;

/// `aloft ssh …`.
#[derive(Debug, Subcommand)]
pub(crate) enum SshCommand {
    /// Run a shell (or -C COMMAND) in a started machine, interactively; exits with its status.
    Console(console::ConsoleArgs),
}

pub(crate) async fn run(ctx: &Context, cmd: SshCommand) -> anyhow::Result<()> {
    match cmd {
        SshCommand::Console(args) => console::run(ctx, args).await,
    }
}
