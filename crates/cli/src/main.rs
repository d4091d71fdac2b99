//! `aloft`, the command-line interface. flyctl is the model: command groups (`aloft apps …`,
//! `aloft machine …`, `aloft volumes …`, `aloft ssh console`, `aloft proxy`, `aloft logs`,
//! `aloft images …`, `aloft config …`, `aloft completion`), each subcommand in its own file with the same shape
//! (clap args struct, `run(ctx, args)`), and errors that say what to do next.
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

mod api;
mod apps;
mod build;
mod certs;
mod completion;
mod config;
mod context;
mod deploy;
mod errors;
mod images;
mod launch;
mod logs;
mod machine;
mod progress;
mod proxy;
mod releases;
mod scale;
mod secrets;
mod spinner;
mod ssh;
mod status;
mod volumes;

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
    /// Manage machines: run, list, status, start, stop, update, exec, destroy …
    #[command(subcommand, visible_alias = "m", alias = "machines")]
    Machine(Box<machine::MachineCommand>),
    /// Show an app's logs, following new lines unless --no-tail.
    Logs(logs::LogsArgs),
    /// Check and print the app config (aloft.toml, else fly.toml).
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Build (unless --image) and deploy the app in aloft.toml as a new release.
    Deploy(deploy::DeployArgs),
    /// Create an app from the Dockerfile here (or --image): write aloft.toml, create, deploy.
    Launch(launch::LaunchArgs),
    /// List the app's releases; roll back to an earlier one.
    Releases(releases::ReleasesArgs),
    /// Show the app, its latest release and its machines by process group.
    Status(status::StatusArgs),
    /// Show or change the number and size of the app's machines (as a release).
    #[command(subcommand)]
    Scale(scale::ScaleCommand),
    /// App secrets: list (digests only), set, unset, import, deploy.
    #[command(subcommand)]
    Secrets(secrets::SecretsCommand),
    /// Custom domains' TLS certificates (add, list, show, check, remove) and the edge CA's root.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Interactive sessions in machines: ssh console (a shell or a command, on a terminal).
    #[command(subcommand)]
    Ssh(ssh::SshCommand),
    /// Proxy a local port to a port of a machine, through aloftd (no WireGuard).
    Proxy(proxy::ProxyArgs),
    /// Persistent volumes: create, list, show, extend, update, fork, snapshots, destroy.
    #[command(subcommand, visible_alias = "vol", alias = "volume")]
    Volumes(volumes::VolumesCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion(completion::CompletionArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completion(args) = &cli.command {
        use std::io::Write as _;
        let script = completion::script::<Cli>(args);
        let mut out = std::io::stdout().lock();
        return match out.write_all(&script).and_then(|()| out.flush()) {
            Ok(()) => ExitCode::SUCCESS,
            // `aloft completion bash | head`: the reader is gone, nothing to report.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: write the completion script: {e}");
                ExitCode::FAILURE
            }
        };
    }
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
            Command::Machine(cmd) => machine::run(&ctx, *cmd).await,
            Command::Logs(args) => logs::run(&ctx, args).await,
            Command::Deploy(args) => deploy::run(&ctx, args).await,
            Command::Launch(args) => launch::run(&ctx, args).await,
            Command::Releases(args) => releases::run(&ctx, args).await,
            Command::Status(args) => status::run(&ctx, args).await,
            Command::Scale(cmd) => scale::run(&ctx, cmd).await,
            Command::Secrets(cmd) => secrets::run(&ctx, cmd).await,
            Command::Certs(cmd) => certs::run(&ctx, cmd).await,
            Command::Volumes(cmd) => volumes::run(&ctx, cmd).await,
            Command::Ssh(cmd) => ssh::run(&ctx, cmd).await,
            Command::Proxy(args) => proxy::run(&ctx, args).await,
            // Handled before the runtime starts.
            Command::Completion(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => errors::report(&e),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    /// Every command's flags are well-formed and none clashes with a global one (`-t`, `-a` …).
    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "aloft",
            "m",
            "ls",
            "-a",
            "web",
            "-t",
            "tok",
            "--api-url",
            "http://h:1",
        ])
        .unwrap();
        assert_eq!(cli.global.access_token.as_deref(), Some("tok"));
        assert!(matches!(cli.command, Command::Machine(m) if matches!(*m, machine::MachineCommand::List(_))));
    }

    #[test]
    fn completions_cover_the_command_groups() {
        let Command::Completion(args) = Cli::try_parse_from(["aloft", "completion", "bash"])
            .unwrap()
            .command
        else {
            panic!("not completion");
        };
        let script = String::from_utf8(completion::script::<Cli>(&args)).unwrap();
        for word in [
            "machine",
            "logs",
            "apps",
            "--no-tail",
            "--vm-memory",
            "uncordon",
            "volumes",
            "--scheduled-snapshots",
            "--snapshot-id",
            "fork",
            "snapshots",
            "ssh",
            "--no-pty",
            "proxy",
            "--bind-addr",
        ] {
            assert!(script.contains(word), "{word}");
        }
    }
}
