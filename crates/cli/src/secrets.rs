//! `aloft secrets`: an app's secrets. `list` shows names and digests (aloftd never returns
//! values); `set NAME=VALUE…` (`NAME=-` reads the value from stdin), `unset NAME…` and `import`
//! (dotenv lines from stdin) change them in one step and, unless `--stage`, roll them out to the
//! app's machines; `deploy` rolls out what was staged.
//!
//! Rolling out: a new release of the app's newest complete release (same image and groups), whose
//! machines boot with the app's secrets as they are now, followed to its end. An app that has no
//! release yet gets each machine updated with its current config instead (a new version, same
//! config, the new secrets). Values are never printed.

use std::collections::BTreeMap;
use std::io::Read as _;

use aloft_api::{AppSecret, CreateReleaseRequest, MachineState, ReleaseStatus, UpdateMachineRequest};
use aloft_client::{Client, ClientError, ListMachinesParams};
use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::api::{AppArg, Subject, api_error, print_json};
use crate::context::{ApiSettings, Context};
use crate::errors::UserError;

/// `aloft secrets …`.
#[derive(Debug, Subcommand)]
pub(crate) enum SecretsCommand {
    /// List the app's secrets: names, digests (hex SHA-256) and times, never values.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Set secrets (NAME=VALUE; NAME=- reads the value from stdin) and roll them out.
    Set(SetArgs),
    /// Remove secrets and roll the change out.
    Unset(UnsetArgs),
    /// Set secrets from dotenv-style NAME=VALUE lines on stdin and roll them out.
    Import(ImportArgs),
    /// Roll the app's current secrets out to its machines (after --stage).
    Deploy(DeployArgs),
}

/// `aloft secrets list`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    app: AppArg,
    /// Print the secrets as JSON (the API's objects; no values).
    #[arg(long)]
    json: bool,
}

/// Whether and how a change is rolled out.
#[derive(Debug, Args, Clone, Copy)]
pub(crate) struct RolloutArgs {
    /// Only record the change; `aloft secrets deploy` rolls it out later.
    #[arg(long)]
    stage: bool,
    /// Return once the release is accepted, without following it.
    #[arg(short = 'd', long)]
    detach: bool,
}

/// `aloft secrets set`.
#[derive(Debug, Args)]
pub(crate) struct SetArgs {
    #[command(flatten)]
    app: AppArg,
    /// NAME=VALUE pairs; NAME=- reads that value from stdin.
    #[arg(value_name = "NAME=VALUE", required = true)]
    pairs: Vec<String>,
    #[command(flatten)]
    rollout: RolloutArgs,
}

/// `aloft secrets unset`.
#[derive(Debug, Args)]
pub(crate) struct UnsetArgs {
    #[command(flatten)]
    app: AppArg,
    /// Names to remove.
    #[arg(value_name = "NAME", required = true)]
    names: Vec<String>,
    #[command(flatten)]
    rollout: RolloutArgs,
}

/// `aloft secrets import`.
#[derive(Debug, Args)]
pub(crate) struct ImportArgs {
    #[command(flatten)]
    app: AppArg,
    #[command(flatten)]
    rollout: RolloutArgs,
}

/// `aloft secrets deploy`.
#[derive(Debug, Args)]
pub(crate) struct DeployArgs {
    #[command(flatten)]
    app: AppArg,
    /// Return once the release is accepted, without following it.
    #[arg(short = 'd', long)]
    detach: bool,
}

pub(crate) async fn run(ctx: &Context, cmd: SecretsCommand) -> anyhow::Result<()> {
    match cmd {
        SecretsCommand::List(args) => list(ctx, args).await,
        SecretsCommand::Set(args) => {
            let values = parse_pairs(&args.pairs, read_stdin)?;
            change(ctx, &args.app, values, args.rollout).await
        }
        SecretsCommand::Unset(args) => {
            let values = args.names.iter().map(|n| (n.clone(), None)).collect();
            change(ctx, &args.app, values, args.rollout).await
        }
        SecretsCommand::Import(args) => {
            let text = read_stdin()?;
            let values = parse_dotenv(&text)?
                .into_iter()
                .map(|(k, v)| (k, Some(v)))
                .collect();
            change(ctx, &args.app, values, args.rollout).await
        }
        SecretsCommand::Deploy(args) => {
            let app = args.app.resolve()?;
            let (client, settings) = ctx.api_client()?;
            roll_out(&client, &settings, &app, args.detach).await
        }
    }
}

fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("read secret values from stdin")?;
    Ok(text)
}

fn user(message: String, hint: &str) -> anyhow::Error {
    UserError {
        message,
        hint: Some(hint.to_owned()),
        code: 2,
    }
    .into()
}

/// `NAME=VALUE` arguments; `NAME=-` takes stdin (once, without its final newline).
fn parse_pairs(
    pairs: &[String],
    stdin: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    let mut stdin = Some(stdin);
    let mut out = BTreeMap::new();
    for pair in pairs {
        let Some((name, value)) = pair.split_once('=') else {
            return Err(user(
                format!("{pair:?} is not NAME=VALUE"),
                "write secrets as NAME=VALUE, or NAME=- to read the value from stdin",
            ));
        };
        let value = if value == "-" {
            let read = stdin.take().ok_or_else(|| {
                user(
                    format!("{name}=-: only one value can come from stdin"),
                    "set the others as NAME=VALUE, or use `aloft secrets import`",
                )
            })?;
            let mut v = read()?;
            if v.ends_with('\n') {
                v.pop();
                if v.ends_with('\r') {
                    v.pop();
                }
            }
            v
        } else {
            value.to_owned()
        };
        out.insert(name.trim().to_owned(), Some(value));
    }
    Ok(out)
}

/// dotenv lines: `NAME=VALUE`, optionally `export NAME=VALUE`, values optionally in single
/// quotes (literal) or double quotes (`\n`, `\"`, `\\` escapes); blank lines and `#` comments
/// are skipped.
fn parse_dotenv(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else {
            return Err(user(
                format!("line {} of stdin is not NAME=VALUE", i + 1),
                "give one NAME=VALUE per line (# starts a comment)",
            ));
        };
        let value = value.trim();
        let value = if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            inner.to_owned()
        } else if let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            let mut s = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    match chars.next() {
                        Some('n') => s.push('\n'),
                        Some('t') => s.push('\t'),
                        Some(other) => s.push(other),
                        None => s.push('\\'),
                    }
                } else {
                    s.push(c);
                }
            }
            s
        } else {
            value.to_owned()
        };
        out.insert(name.trim().to_owned(), value);
    }
    if out.is_empty() {
        return Err(user(
            "stdin held no NAME=VALUE lines".to_owned(),
            "pipe a dotenv file in: aloft secrets import < .env",
        ));
    }
    Ok(out)
}

async fn list(ctx: &Context, args: ListArgs) -> anyhow::Result<()> {
    let app = args.app.resolve()?;
    let (client, settings) = ctx.api_client()?;
    let secrets = client
        .secrets_list(&app)
        .await
        .map_err(|e| api_error(e, &settings, Subject::App(&app)))?;
    if args.json {
        print_json(&secrets)
    } else {
        print!("{}", table(&secrets));
        Ok(())
    }
}

/// NAME DIGEST CREATED AT.
fn table(secrets: &[AppSecret]) -> String {
    let rows: Vec<Vec<String>> = secrets
        .iter()
        .map(|s| vec![s.name.clone(), s.digest.clone(), s.created_at.clone()])
        .collect();
    crate::api::table(&["NAME", "DIGEST", "CREATED AT"], &rows)
}

async fn change(
    ctx: &Context,
    app: &AppArg,
    values: BTreeMap<String, Option<String>>,
    rollout: RolloutArgs,
) -> anyhow::Result<()> {
    let app = app.resolve()?;
    let (client, settings) = ctx.api_client()?;
    let names: Vec<String> = values.keys().cloned().collect();
    let resp = client
        .secrets_update(&app, values)
        .await
        .map_err(|e| api_error(e, &settings, Subject::App(&app)))?;
    eprintln!(
        "Secrets of app {app} changed ({}): secrets version {}",
        names.join(", "),
        resp.version
    );
    if rollout.stage {
        eprintln!("Staged: `aloft secrets deploy -a {app}` rolls them out to the app's machines");
        return Ok(());
    }
    roll_out(&client, &settings, &app, rollout.detach).await
}

/// Whether aloftd answered that it has no releases API.
fn no_releases(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { status: 404 | 405 | 501, message } if !message.to_ascii_lowercase().starts_with("app"))
}

/// Rolls the app's current secrets out: a release of the newest complete release, else an
/// update of each machine with its own config.
async fn roll_out(client: &Client, settings: &ApiSettings, app: &str, detach: bool) -> anyhow::Result<()> {
    let newest = match client.releases_list(app).await {
        Ok(releases) => releases.into_iter().find(|r| r.status == ReleaseStatus::Complete),
        Err(e) if no_releases(&e) => None,
        Err(e) => return Err(api_error(e, settings, Subject::App(app))),
    };
    if let Some(base) = newest {
        let created = client
            .release_create(
                app,
                &CreateReleaseRequest {
                    image: Some(base.image.clone()),
                    groups: base.groups.clone(),
                    strategy: base.strategy,
                    metadata: BTreeMap::from([(
                        "reason".to_owned(),
                        format!("secrets rollout (redeploy of v{})", base.version),
                    )]),
                    ..CreateReleaseRequest::default()
                },
            )
            .await
            .map_err(|e| api_error(e, settings, Subject::App(app)))?;
        eprintln!(
            "Release v{} redeploys v{} ({}) with the new secrets",
            created.version, base.version, base.image
        );
        if detach {
            println!("v{}", created.version);
            return Ok(());
        }
        return follow(client, settings, app, created.version).await;
    }
    update_machines(client, settings, app).await
}

async fn follow(client: &Client, settings: &ApiSettings, app: &str, version: u64) -> anyhow::Result<()> {
    let mut events = client
        .release_events(app, version, true)
        .await
        .map_err(|e| api_error(e, settings, Subject::App(app)))?;
    let mut last = ReleaseStatus::Pending;
    while let Some(e) = events
        .next()
        .await
        .map_err(|e| api_error(e, settings, Subject::App(app)))?
    {
        let who = e
            .machine
            .as_deref()
            .map(|m| format!("[{m}] "))
            .unwrap_or_default();
        eprintln!("{who}{}", e.message);
        last = e.status;
    }
    let done = client
        .release_get(app, version)
        .await
        .map_err(|e| api_error(e, settings, Subject::App(app)))?;
    if done.status == ReleaseStatus::Complete || (last == ReleaseStatus::Complete && done.error.is_none()) {
        eprintln!("Release v{version} is complete: the machines run with the new secrets");
        Ok(())
    } else {
        Err(UserError {
            message: format!(
                "release v{version} did not complete: {}",
                done.error.unwrap_or_else(|| "see aloft releases".to_owned())
            ),
            hint: Some(format!("`aloft secrets deploy -a {app}` tries again")),
            code: 1,
        }
        .into())
    }
}

/// No release yet: every machine gets a new version with its current config (and so the new
/// secrets).
async fn update_machines(client: &Client, settings: &ApiSettings, app: &str) -> anyhow::Result<()> {
    let machines = client
        .machines_list(app, &ListMachinesParams::default())
        .await
        .map_err(|e| api_error(e, settings, Subject::App(app)))?;
    let live: Vec<_> = machines
        .into_iter()
        .filter(|m| !matches!(m.state, MachineState::Destroyed | MachineState::Destroying))
        .collect();
    if live.is_empty() {
        eprintln!("App {app} has no release and no machines: new machines get the secrets when created");
        return Ok(());
    }
    eprintln!(
        "App {app} has no release yet: updating its {} machine(s) with their current config",
        live.len()
    );
    for m in live {
        let Some(config) = m.config.clone() else {
            continue;
        };
        let stopped = !matches!(m.state, MachineState::Started | MachineState::Starting);
        client
            .machine_update(
                app,
                m.id.as_str(),
                &UpdateMachineRequest {
                    config,
                    skip_launch: Some(stopped),
                    ..UpdateMachineRequest::default()
                },
            )
            .await
            .map_err(|e| api_error(e, settings, Subject::App(app)))?;
        eprintln!("  {} updated", m.id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_and_stdin() {
        let got = parse_pairs(&["A=1".into(), "B=x=y".into(), "C=-".into()], || {
            Ok("from stdin\n".into())
        })
        .unwrap();
        assert_eq!(got["A"].as_deref(), Some("1"));
        assert_eq!(got["B"].as_deref(), Some("x=y"));
        assert_eq!(got["C"].as_deref(), Some("from stdin"));
        assert!(parse_pairs(&["A".into()], || Ok(String::new())).is_err());
        assert!(parse_pairs(&["A=-".into(), "B=-".into()], || Ok(String::new())).is_err());
    }

    #[test]
    fn dotenv() {
        let got = parse_dotenv("# comment\n\nexport A=1\nB = 'lit \\n'\nC=\"two\\nlines\"\nD=with spaces\n")
            .unwrap();
        assert_eq!(got["A"], "1");
        assert_eq!(got["B"], "lit \\n");
        assert_eq!(got["C"], "two\nlines");
        assert_eq!(got["D"], "with spaces");
        assert!(parse_dotenv("# nothing\n").is_err());
        assert!(parse_dotenv("NOEQUALS\n").is_err());
    }

    #[test]
    fn the_table_shows_digests() {
        let text = table(&[AppSecret {
            name: "DB".into(),
            digest: "ab12".into(),
            created_at: "2026-01-02T03:04:05Z".into(),
            updated_at: "2026-01-02T03:04:05Z".into(),
        }]);
        assert!(text.starts_with("NAME"), "{text}");
        assert!(text.contains("DB") && text.contains("ab12"), "{text}");
    }
}
