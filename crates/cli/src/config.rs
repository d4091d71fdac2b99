//! `aloft config validate | show`: check and print the app config (`aloft.toml`, else `fly.toml`).
//!
//! Both read the file with `aloft-config`, print its warnings on stderr and fail with every error
//! (file, line, column, key and what to do). `validate` also expands the config into machine
//! configs as a deploy does, so it catches what only a deploy would (a `[[files]]` source that
//! can't be read, a VM size with impossible memory); `[[mounts]]` are described by volume name
//! and path, as the deploy sends them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aloft_config::{DiskFiles, ExpandOptions, Loaded, MountPolicy, ProcessGroupConfig};
use clap::{Args, Subcommand};

use crate::errors::UserError;

/// `aloft config …`.
#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Check the config: syntax, values, process groups, and that every group expands into a
    /// machine config.
    Validate(ValidateArgs),
    /// Print the config, normalised: TOML, or JSON with --json; --machines prints each process
    /// group's machine config as the Machines API gets it.
    Show(ShowArgs),
}

/// Which file to read.
#[derive(Debug, Clone, Args)]
pub(crate) struct ConfigFileArgs {
    /// Path to the config file. Default: aloft.toml, else fly.toml, in the current directory.
    #[arg(short = 'c', long = "config", value_name = "PATH")]
    pub(crate) config: Option<PathBuf>,
}

/// `aloft config validate`.
#[derive(Debug, Args)]
pub(crate) struct ValidateArgs {
    #[command(flatten)]
    file: ConfigFileArgs,
}

/// `aloft config show`.
#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    #[command(flatten)]
    file: ConfigFileArgs,
    /// Print JSON instead of TOML.
    #[arg(long)]
    json: bool,
    /// Print the machine config of each process group (JSON; mounts are shown as flyctl would
    /// send them before volumes are assigned).
    #[arg(long)]
    machines: bool,
}

pub(crate) fn run(cmd: ConfigCommand) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Validate(args) => {
            let (path, loaded) = load(&args.file)?;
            print_warnings(&loaded);
            println!("{}", validate(&path, &loaded)?);
            Ok(())
        }
        ConfigCommand::Show(args) => {
            let (path, loaded) = load(&args.file)?;
            print_warnings(&loaded);
            println!("{}", show(&path, &loaded, args.json, args.machines)?);
            Ok(())
        }
    }
}

/// The config file: `--config`, else `aloft.toml` or `fly.toml` in the current directory.
fn resolve(args: &ConfigFileArgs) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.config {
        return Ok(path.clone());
    }
    resolve_in(&std::env::current_dir()?)
}

/// `aloft.toml`, else `fly.toml`, in `cwd`; an error that says to pass `-c` when neither is.
pub(crate) fn resolve_in(cwd: &Path) -> anyhow::Result<PathBuf> {
    if aloft_config::CONFIG_NAMES.iter().all(|n| cwd.join(n).is_file()) {
        eprintln!("warning: both aloft.toml and fly.toml are here; using aloft.toml");
    }
    aloft_config::find(cwd).map_err(|e| {
        UserError {
            message: e.to_string(),
            hint: Some("pass the file with -c/--config PATH".to_owned()),
            code: 1,
        }
        .into()
    })
}

fn load(args: &ConfigFileArgs) -> anyhow::Result<(PathBuf, Loaded)> {
    let path = resolve(args)?;
    let loaded = load_path(&path)?;
    Ok((path, loaded))
}

/// Reads and validates the config at `path`; every problem in one error.
pub(crate) fn load_path(path: &Path) -> anyhow::Result<Loaded> {
    aloft_config::load(path).map_err(|e| invalid(&e))
}

pub(crate) fn invalid(error: &dyn std::error::Error) -> anyhow::Error {
    UserError {
        message: format!("invalid app config:\n{}", aloft_api::error_chain(error)),
        hint: Some("fix the lines above; docs/config.md lists every key and tolerance".to_owned()),
        code: 1,
    }
    .into()
}

pub(crate) fn print_warnings(loaded: &Loaded) {
    for line in loaded.warnings().to_string().lines() {
        eprintln!("warning: {line}");
    }
}

fn expand(path: &Path, loaded: &Loaded, mounts: MountPolicy) -> anyhow::Result<Vec<ProcessGroupConfig>> {
    let files = DiskFiles::next_to(path);
    let opts = ExpandOptions {
        image: None,
        mounts,
        files: &files,
    };
    loaded.config.expand(&opts).map_err(|e| invalid(&e))
}

/// Expands the config and summarises each process group.
fn validate(path: &Path, loaded: &Loaded) -> anyhow::Result<String> {
    let groups = expand(path, loaded, MountPolicy::Describe)?;
    let mut out = format!("{} is valid", path.display());
    if !loaded.warnings.is_empty() {
        out.push_str(&format!(" ({} warning(s) above)", loaded.warnings.len()));
    }
    for g in &groups {
        let c = &g.config;
        let mut parts = Vec::new();
        if let Some(init) = &c.init
            && !init.cmd.is_empty()
        {
            parts.push(format!("cmd {:?}", init.cmd.join(" ")));
        }
        parts.push(count(c.services.len(), "service"));
        let checks = c.checks.len() + c.services.iter().map(|s| s.checks.len()).sum::<usize>();
        parts.push(count(checks, "check"));
        if let Some(guest) = &c.guest {
            let cpus = guest.cpus.unwrap_or(1);
            parts.push(format!(
                "{} {} cpu{}, {} MB",
                cpus,
                guest.cpu_kind.as_deref().unwrap_or("shared"),
                if cpus == 1 { "" } else { "s" },
                guest.memory_mb.unwrap_or(256)
            ));
        }
        for m in &c.mounts {
            let mut mount = format!(
                "volume {} at {}",
                m.name.as_deref().unwrap_or_default(),
                m.path.as_deref().unwrap_or_default()
            );
            if let Some(gb) = m.size_gb {
                mount.push_str(&format!(" ({gb} GB when created)"));
            }
            parts.push(mount);
        }
        out.push_str(&format!("\n  {}: {}", g.group, parts.join(", ")));
    }
    Ok(out)
}

fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The config as TOML or JSON, or the machine configs as JSON.
fn show(path: &Path, loaded: &Loaded, json: bool, machines: bool) -> anyhow::Result<String> {
    if machines {
        let groups: BTreeMap<String, _> = expand(path, loaded, MountPolicy::Describe)?
            .into_iter()
            .map(|g| (g.group, g.config))
            .collect();
        return Ok(serde_json::to_string_pretty(&groups)?);
    }
    if json {
        return Ok(serde_json::to_string_pretty(&loaded.config)?);
    }
    Ok(loaded.config.to_toml()?.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const APP: &str = "app = 'demo'\nprimary_region = 'ams'\n\n[processes]\napp = 'bin/web'\nworker = 'bin/worker'\n\n[http_service]\ninternal_port = 3000\nprocesses = ['app']\n\n[[vm]]\nmemory = '512mb'\n";

    #[test]
    fn validate_summarises_each_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "fly.toml", APP);
        let loaded = aloft_config::load(&path).unwrap();
        let report = validate(&path, &loaded).unwrap();
        let lines: Vec<&str> = report.lines().collect();
        assert!(lines[0].ends_with("fly.toml is valid"), "{report}");
        assert_eq!(
            lines[1],
            "  app: cmd \"bin/web\", 1 service, 0 checks, 1 shared cpu, 512 MB"
        );
        assert_eq!(
            lines[2],
            "  worker: cmd \"bin/worker\", 0 services, 0 checks, 1 shared cpu, 512 MB"
        );
    }

    #[test]
    fn validate_describes_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "aloft.toml",
            "app = 'demo'\n\n[mounts]\nsource = 'data'\ndestination = '/data'\ninitial_size = '10gb'\n",
        );
        let loaded = aloft_config::load(&path).unwrap();
        let report = validate(&path, &loaded).unwrap();
        assert!(
            report.ends_with(", volume data at /data (10 GB when created)"),
            "{report}"
        );
        let machines: serde_json::Value =
            serde_json::from_str(&show(&path, &loaded, false, true).unwrap()).unwrap();
        assert_eq!(
            machines["app"]["mounts"],
            serde_json::json!([{"name": "data", "path": "/data", "size_gb": 10}])
        );
    }

    #[test]
    fn invalid_config_reports_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "fly.toml", "[http_service]\ninternal_port = 'x'\n");
        let err = load(&ConfigFileArgs { config: Some(path) }).unwrap_err();
        let (message, _, _) = crate::errors::describe(&err);
        assert!(
            message.ends_with(
                "fly.toml:2:17: http_service.internal_port: expected an integer, found a string (\"x\")"
            ),
            "{message}"
        );
    }

    #[test]
    fn show_prints_toml_json_and_machines() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "fly.toml", APP);
        let loaded = aloft_config::load(&path).unwrap();
        let toml = show(&path, &loaded, false, false).unwrap();
        assert!(toml.contains("[http_service]\ninternal_port = 3000"), "{toml}");
        let json: serde_json::Value =
            serde_json::from_str(&show(&path, &loaded, true, false).unwrap()).unwrap();
        assert_eq!(json["app"], "demo");
        let machines: serde_json::Value =
            serde_json::from_str(&show(&path, &loaded, false, true).unwrap()).unwrap();
        assert_eq!(machines["app"]["services"][0]["internal_port"], 3000);
        assert_eq!(machines["worker"]["env"]["FLY_PROCESS_GROUP"], "worker");
        assert_eq!(machines["worker"]["guest"]["memory_mb"], 512);
    }

    #[test]
    fn aloft_toml_wins_over_fly_toml() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "fly.toml", "app = 'fly'\n");
        assert_eq!(
            aloft_config::find(dir.path()).unwrap(),
            dir.path().join("fly.toml")
        );
        write(dir.path(), "aloft.toml", "app = 'aloft'\n");
        assert_eq!(
            aloft_config::find(dir.path()).unwrap(),
            dir.path().join("aloft.toml")
        );
    }

    #[test]
    fn missing_config_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = aloft_config::find(dir.path()).unwrap_err();
        assert!(err.to_string().contains("no aloft.toml or fly.toml"));
        assert!(err.to_string().contains("--config PATH"));
    }
}
