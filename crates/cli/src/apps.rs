//! `aloft apps create NAME | list | destroy NAME`: apps on aloftd, through `aloft-client`.
//!
//! flyctl's grammar and output: `list` prints a NAME / OWNER / STATUS / LATEST DEPLOY table (or
//! the API's app objects with `--json`), `destroy` asks before it destroys unless `--yes` and
//! refuses without a terminal to ask on.

use std::io::{IsTerminal as _, Write as _};

use aloft_api::{App, CreateAppRequest};
use aloft_client::ClientError;
use clap::{Args, Subcommand};

use crate::context::{ApiSettings, Context};
use crate::errors::{EXIT_NOT_FOUND, EXIT_UNREACHABLE, UserError};

/// The organization apps go to and are listed from unless `--org` says otherwise (aloftd's first
/// token acts for it).
const DEFAULT_ORG: &str = "personal";

/// `aloft apps …`.
#[derive(Debug, Subcommand)]
pub(crate) enum AppsCommand {
    /// Create an app (a name, an organization and a private network; machines come later).
    Create(CreateArgs),
    /// List the apps of an organization.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Destroy an app and everything in it. Asks first unless --yes.
    #[command(visible_alias = "delete")]
    Destroy(DestroyArgs),
}

/// `aloft apps create`.
#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// The app's name: 1 to 63 lowercase letters, digits and hyphens (unique on the platform).
    #[arg(value_name = "NAME")]
    name: String,
    /// The organization that owns it.
    #[arg(short = 'o', long, value_name = "SLUG", default_value = DEFAULT_ORG)]
    org: String,
    /// The private network it joins [default: default].
    #[arg(long, value_name = "NAME")]
    network: Option<String>,
    /// Print the created app as JSON.
    #[arg(long)]
    json: bool,
}

/// `aloft apps list`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// The organization whose apps to list.
    #[arg(short = 'o', long, value_name = "SLUG", default_value = DEFAULT_ORG)]
    org: String,
    /// Print the apps as JSON (the API's app objects).
    #[arg(long)]
    json: bool,
}

/// `aloft apps destroy`.
#[derive(Debug, Args)]
pub(crate) struct DestroyArgs {
    /// The app to destroy.
    #[arg(value_name = "NAME")]
    name: String,
    /// Don't ask for confirmation (required without a terminal).
    #[arg(short = 'y', long)]
    yes: bool,
}

pub(crate) async fn run(ctx: &Context, cmd: AppsCommand) -> anyhow::Result<()> {
    let (client, settings) = ctx.api_client()?;
    match cmd {
        AppsCommand::Create(args) => {
            let request = CreateAppRequest {
                name: args.name.clone(),
                org_slug: args.org,
                network: args.network,
                ..CreateAppRequest::default()
            };
            let app = client
                .app_create(&request)
                .await
                .map_err(|e| api_error(e, &settings, None))?;
            if args.json {
                print_json(&app)?;
            } else {
                println!("New app created: {}", app.name);
            }
        }
        AppsCommand::List(args) => {
            let mut list = client
                .apps_list(&args.org)
                .await
                .map_err(|e| api_error(e, &settings, None))?;
            list.apps.sort_by(|a, b| a.name.cmp(&b.name));
            if args.json {
                print_json(&list.apps)?;
            } else {
                print!("{}", table(&list.apps));
            }
        }
        AppsCommand::Destroy(args) => {
            let name = args.name;
            // Unknown apps fail before anyone is asked anything.
            client
                .app_get(&name)
                .await
                .map_err(|e| api_error(e, &settings, Some(&name)))?;
            if !args.yes && !confirm(&name)? {
                eprintln!("Not destroying app {name}");
                return Ok(());
            }
            client
                .app_delete(&name)
                .await
                .map_err(|e| api_error(e, &settings, Some(&name)))?;
            println!("Destroyed app {name}");
        }
    }
    Ok(())
}

/// Asks on the terminal; without one, refuses (a script must say `--yes`).
fn confirm(name: &str) -> anyhow::Result<bool> {
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    confirm_with(name, terminal, &mut stdin.lock(), &mut std::io::stderr())
}

fn confirm_with(
    name: &str,
    terminal: bool,
    input: &mut dyn std::io::BufRead,
    output: &mut dyn std::io::Write,
) -> anyhow::Result<bool> {
    if !terminal {
        return Err(UserError {
            message: format!("not destroying app {name} without confirmation: no terminal to ask on"),
            hint: Some(format!("aloft apps destroy {name} --yes")),
            code: 1,
        }
        .into());
    }
    write!(
        output,
        "Destroying app {name} destroys its machines and volumes too; this cannot be undone.\n\
         Destroy app {name}? [y/N] "
    )?;
    output.flush()?;
    let mut answer = String::new();
    input.read_line(&mut answer)?;
    Ok(matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes"))
}

/// A client error as the user should read it, with the exit code (3 unknown app, 4 aloftd not
/// reachable) and a hint for token trouble.
fn api_error(e: ClientError, settings: &ApiSettings, app: Option<&str>) -> anyhow::Error {
    let user = |message: String, hint: Option<String>, code: u8| {
        anyhow::Error::new(UserError { message, hint, code })
    };
    match (&e, app) {
        (ClientError::Unreachable { .. }, _) => user(e.to_string(), None, EXIT_UNREACHABLE),
        (ClientError::Api { status: 404, .. }, Some(app)) => user(
            format!("app {app} not found"),
            Some("aloft apps list shows your apps".to_owned()),
            EXIT_NOT_FOUND,
        ),
        (ClientError::Api { status: 401, .. }, _) => {
            let hint = if settings.token_source.starts_with('$') {
                format!(
                    "the token came from {}; unset it to use the one aloftd's first start wrote to \
                     its config",
                    settings.token_source
                )
            } else {
                format!(
                    "the token came from {}; if it belongs to another aloftd (or a reset data \
                     directory), set ALOFT_API_TOKEN to the token aloftd printed on its first start",
                    settings.token_source
                )
            };
            user(e.to_string(), Some(hint), 1)
        }
        (ClientError::Api { .. }, _) => user(e.to_string(), None, 1),
        _ => anyhow::Error::new(e).context(format!("aloftd at {}", settings.url)),
    }
}

fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// flyctl's table: NAME, OWNER, STATUS, LATEST DEPLOY ("-" when unknown), columns padded to
/// their widest cell.
fn table(apps: &[App]) -> String {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let header = ["NAME", "OWNER", "STATUS", "LATEST DEPLOY"].map(str::to_owned);
    let rows: Vec<[String; 4]> = std::iter::once(header)
        .chain(apps.iter().map(|a| {
            [
                a.name.clone(),
                dash(&a.organization.slug),
                dash(&a.status),
                "-".to_owned(),
            ]
        }))
        .collect();
    let mut widths = [0usize; 4];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destroy_asks_and_only_yes_confirms() {
        for (answer, expected) in [
            ("y\n", true),
            ("YES\n", true),
            ("n\n", false),
            ("\n", false),
            ("", false),
        ] {
            let mut output = Vec::new();
            let confirmed = confirm_with("web", true, &mut answer.as_bytes(), &mut output).unwrap();
            assert_eq!(confirmed, expected, "{answer:?}");
            let prompt = String::from_utf8(output).unwrap();
            assert!(prompt.ends_with("Destroy app web? [y/N] "), "{prompt}");
        }
        let e = confirm_with("web", false, &mut "y\n".as_bytes(), &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("without confirmation"), "{e}");
    }

    #[test]
    fn the_table_is_aligned_with_dashes_for_unknowns() {
        let app = |name: &str, status: &str| App {
            name: name.into(),
            status: status.into(),
            organization: aloft_api::AppOrganizationInfo {
                slug: "personal".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            table(&[app("web", "pending"), app("a-longer-name", "")]),
            "NAME            OWNER      STATUS    LATEST DEPLOY\n\
             web             personal   pending   -\n\
             a-longer-name   personal   -         -\n"
        );
        assert_eq!(table(&[]), "NAME   OWNER   STATUS   LATEST DEPLOY\n");
    }
}
