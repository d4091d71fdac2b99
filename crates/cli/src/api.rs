//! What the commands that talk to aloftd share: which app they act on (`-a/--app`, else the
//! `app` of `aloft.toml`/`fly.toml` here), client errors as users should read them, JSON and
//! table output, and asking before something irreversible.

use std::io::{IsTerminal as _, Write as _};
use std::path::Path;

use aloft_client::{Client, ClientError};
use clap::Args;

use crate::context::{ApiSettings, Context};
use crate::errors::{EXIT_NOT_FOUND, EXIT_UNREACHABLE, UserError};

/// `-a/--app`.
#[derive(Debug, Clone, Args)]
pub(crate) struct AppArg {
    /// The app [default: `app` in aloft.toml or fly.toml in the current directory].
    #[arg(short = 'a', long = "app", value_name = "APP")]
    pub(crate) app: Option<String>,
}

impl AppArg {
    /// The app named by `-a`, else by the config file in the current directory.
    pub(crate) fn resolve(&self) -> anyhow::Result<String> {
        let cwd = std::env::current_dir()?;
        resolve_app(self.app.as_deref(), &cwd)
    }
}

/// `-a APP`, else the `app` of `aloft.toml` (or `fly.toml`) in `dir`; an error that says to
/// pass `-a` when neither names one.
pub(crate) fn resolve_app(flag: Option<&str>, dir: &Path) -> anyhow::Result<String> {
    if let Some(app) = flag.map(str::trim).filter(|a| !a.is_empty()) {
        return Ok(app.to_owned());
    }
    let missing = |why: String| -> anyhow::Error {
        UserError {
            message: format!("no app given: {why}"),
            hint: Some("pass the app with -a/--app NAME (aloft apps list shows yours)".to_owned()),
            code: 1,
        }
        .into()
    };
    let Ok(path) = aloft_config::find(dir) else {
        return Err(missing(format!(
            "there is no aloft.toml or fly.toml in {}",
            dir.display()
        )));
    };
    let loaded =
        aloft_config::load(&path).map_err(|e| missing(format!("{} does not load ({e})", path.display())))?;
    loaded
        .config
        .app
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .ok_or_else(|| missing(format!("{} has no app = \"NAME\"", path.display())))
}

/// A client, its settings and the app a command acts on (`-a`, else the app of aloft.toml).
pub(crate) struct AppTarget {
    pub(crate) client: Client,
    pub(crate) settings: ApiSettings,
    pub(crate) app: String,
}

impl AppTarget {
    pub(crate) fn new(ctx: &Context, app: &AppArg) -> anyhow::Result<Self> {
        let app = app.resolve()?;
        let (client, settings) = ctx.api_client()?;
        Ok(Self {
            client,
            settings,
            app,
        })
    }

    /// Maps a client error about the app itself to what the user sees.
    pub(crate) fn app_err(&self) -> impl Fn(ClientError) -> anyhow::Error + '_ {
        move |e| api_error(e, &self.settings, Subject::App(&self.app))
    }
}

/// What a request was about, for the messages of 404s.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Subject<'a> {
    /// Nothing in particular.
    None,
    /// An app.
    App(&'a str),
    /// A machine of an app.
    Machine { app: &'a str, id: &'a str },
    /// A volume of an app.
    Volume { app: &'a str, id: &'a str },
    /// A volume snapshot of an app (restoring it).
    Snapshot { app: &'a str, id: &'a str },
}

/// A client error as the user should read it, with the exit code (3 unknown app, machine or
/// volume, 4 aloftd not reachable) and a hint for token trouble.
pub(crate) fn api_error(e: ClientError, settings: &ApiSettings, subject: Subject<'_>) -> anyhow::Error {
    let user = |message: String, hint: Option<String>, code: u8| {
        anyhow::Error::new(UserError { message, hint, code })
    };
    match (&e, subject) {
        (ClientError::Unreachable { .. }, _) => user(e.to_string(), None, EXIT_UNREACHABLE),
        (ClientError::Api { status: 404, .. }, Subject::App(app)) => app_not_found(app),
        (ClientError::Api { status: 404, message }, Subject::Machine { app, id }) => {
            // "app not found" is about the app; "machine X (in app Y) not found" about the machine.
            if message.trim_start().to_ascii_lowercase().starts_with("app") {
                app_not_found(app)
            } else {
                user(
                    format!("machine {id} not found in app {app}"),
                    Some(format!("aloft machine list -a {app} shows its machines")),
                    EXIT_NOT_FOUND,
                )
            }
        }
        (ClientError::Api { status: 404, message }, Subject::Volume { app, id }) => {
            if message.trim_start().to_ascii_lowercase().starts_with("app") {
                app_not_found(app)
            } else {
                user(
                    format!("volume {id} not found in app {app}"),
                    Some(format!("aloft volumes list -a {app} shows its volumes")),
                    EXIT_NOT_FOUND,
                )
            }
        }
        (ClientError::Api { status: 404, message }, Subject::Snapshot { app, id }) => {
            let lower = message.trim_start().to_ascii_lowercase();
            if lower.starts_with("app") {
                app_not_found(app)
            } else if lower.contains("snapshot") {
                user(
                    format!("snapshot {id} not found in app {app}"),
                    Some(format!(
                        "aloft volumes snapshots list VOLUME_ID -a {app} shows a volume's snapshots \
                         (aloft volumes list -a {app} shows the volumes)"
                    )),
                    EXIT_NOT_FOUND,
                )
            } else {
                user(e.to_string(), None, EXIT_NOT_FOUND)
            }
        }
        (ClientError::Api { status: 401, .. }, _) => {
            let hint = if settings.token_source == "--access-token" {
                "the token came from --access-token; drop it to use $ALOFT_API_TOKEN or the CLI config's"
                    .to_owned()
            } else if settings.token_source.starts_with('$') {
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
        (ClientError::Api { status: 409, message }, _) if message.contains("lease currently held") => user(
            e.to_string(),
            Some("wait for the lease to expire, or clear it: aloft machine leases clear ID".to_owned()),
            1,
        ),
        (ClientError::Api { .. }, _) => user(e.to_string(), None, 1),
        _ => anyhow::Error::new(e).context(format!("aloftd at {}", settings.url)),
    }
}

fn app_not_found(app: &str) -> anyhow::Error {
    UserError {
        message: format!("app {app} not found"),
        hint: Some("aloft apps list shows your apps".to_owned()),
        code: EXIT_NOT_FOUND,
    }
    .into()
}

/// Pretty JSON and a newline on stdout.
pub(crate) fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// A table: a header row and rows, each column padded to its widest cell and separated by three
/// spaces, trailing spaces trimmed; empty cells print as `-`.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| (*h).to_owned()).collect())
        .chain(rows.iter().map(|row| {
            row.iter()
                .map(|c| if c.is_empty() { "-".to_owned() } else { c.clone() })
                .collect()
        }))
        .collect();
    let mut widths = vec![0usize; header.len()];
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

/// Asks `question [y/N]` on the terminal; without one, refuses with `refusal` and `hint` (a
/// script must say `--yes`).
pub(crate) fn confirm(question: &str, refusal: &str, hint: &str) -> anyhow::Result<bool> {
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    confirm_with(
        question,
        refusal,
        hint,
        terminal,
        &mut stdin.lock(),
        &mut std::io::stderr(),
    )
}

pub(crate) fn confirm_with(
    question: &str,
    refusal: &str,
    hint: &str,
    terminal: bool,
    input: &mut dyn std::io::BufRead,
    output: &mut dyn std::io::Write,
) -> anyhow::Result<bool> {
    if !terminal {
        return Err(UserError {
            message: format!("{refusal} without confirmation: no terminal to ask on"),
            hint: Some(hint.to_owned()),
            code: 1,
        }
        .into());
    }
    write!(output, "{question} [y/N] ")?;
    output.flush()?;
    let mut answer = String::new();
    input.read_line(&mut answer)?;
    Ok(matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_app_comes_from_the_flag_else_the_config_here() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(resolve_app(Some("web"), dir.path()).unwrap(), "web");
        let e = resolve_app(None, dir.path()).unwrap_err();
        assert!(e.to_string().contains("no aloft.toml or fly.toml"), "{e}");
        let (_, hint, _) = crate::errors::describe(&e);
        assert!(hint.unwrap().contains("-a/--app"));

        std::fs::write(dir.path().join("fly.toml"), "app = 'from-fly'\n").unwrap();
        assert_eq!(resolve_app(None, dir.path()).unwrap(), "from-fly");
        assert_eq!(resolve_app(Some(" "), dir.path()).unwrap(), "from-fly");
        std::fs::write(dir.path().join("aloft.toml"), "primary_region = 'ams'\n").unwrap();
        let e = resolve_app(None, dir.path()).unwrap_err();
        assert!(e.to_string().contains("has no app"), "{e}");
        std::fs::write(dir.path().join("aloft.toml"), "app = 'from-aloft'\n").unwrap();
        assert_eq!(resolve_app(None, dir.path()).unwrap(), "from-aloft");
    }

    #[test]
    fn confirmation_needs_a_yes_and_a_terminal() {
        for (answer, expected) in [
            ("y\n", true),
            ("YES\n", true),
            ("n\n", false),
            ("\n", false),
            ("", false),
        ] {
            let mut output = Vec::new();
            let confirmed = confirm_with(
                "Do it?",
                "not doing it",
                "--yes",
                true,
                &mut answer.as_bytes(),
                &mut output,
            )
            .unwrap();
            assert_eq!(confirmed, expected, "{answer:?}");
            assert_eq!(String::from_utf8(output).unwrap(), "Do it? [y/N] ");
        }
        let e = confirm_with(
            "Do it?",
            "not doing it",
            "x --yes",
            false,
            &mut "y\n".as_bytes(),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "not doing it without confirmation: no terminal to ask on"
        );
    }

    #[test]
    fn tables_pad_columns_and_dash_empty_cells() {
        let rows = vec![
            vec!["web".to_owned(), String::new(), "x".to_owned()],
            vec!["a-longer-name".to_owned(), "p".to_owned(), String::new()],
        ];
        assert_eq!(
            table(&["NAME", "OWNER", "STATUS"], &rows),
            "NAME            OWNER   STATUS\n\
             web             -       x\n\
             a-longer-name   p       -\n"
        );
    }

    #[test]
    fn not_found_names_the_machine_volume_or_app() {
        let settings = ApiSettings {
            url: "http://x".into(),
            token: "t".into(),
            token_source: "$ALOFT_API_TOKEN".into(),
        };
        let api = |message: &str| ClientError::Api {
            status: 404,
            message: message.into(),
        };
        let subject = Subject::Machine {
            app: "web",
            id: "3d8d413b29d089",
        };
        let e = api_error(
            api("machine 3d8d413b29d089 in app web not found"),
            &settings,
            subject,
        );
        let (message, hint, code) = crate::errors::describe(&e);
        assert_eq!(message, "machine 3d8d413b29d089 not found in app web");
        assert_eq!(
            hint.as_deref(),
            Some("aloft machine list -a web shows its machines")
        );
        assert_eq!(code, EXIT_NOT_FOUND);
        let e = api_error(api("app not found"), &settings, subject);
        assert_eq!(crate::errors::describe(&e).0, "app web not found");
        let volume = Subject::Volume {
            app: "web",
            id: "vol_0000000000000000",
        };
        let e = api_error(api("volume vol_0000000000000000 not found"), &settings, volume);
        let (message, hint, code) = crate::errors::describe(&e);
        assert_eq!(message, "volume vol_0000000000000000 not found in app web");
        assert_eq!(
            hint.as_deref(),
            Some("aloft volumes list -a web shows its volumes")
        );
        assert_eq!(code, EXIT_NOT_FOUND);
        let e = api_error(api("app not found"), &settings, volume);
        assert_eq!(crate::errors::describe(&e).0, "app web not found");
        let snapshot = Subject::Snapshot {
            app: "web",
            id: "vs_0000000000000000",
        };
        let e = api_error(api("snapshot vs_0000000000000000 not found"), &settings, snapshot);
        let (message, hint, code) = crate::errors::describe(&e);
        assert_eq!(message, "snapshot vs_0000000000000000 not found in app web");
        assert!(
            hint.as_deref()
                .is_some_and(|h| h.starts_with("aloft volumes snapshots list VOLUME_ID -a web")),
            "{hint:?}"
        );
        assert_eq!(code, EXIT_NOT_FOUND);
        let e = api_error(api("app not found"), &settings, snapshot);
        assert_eq!(crate::errors::describe(&e).0, "app web not found");
        let e = api_error(api("region ams not found"), &settings, snapshot);
        assert_eq!(
            crate::errors::describe(&e),
            ("region ams not found (HTTP 404)".to_owned(), None, EXIT_NOT_FOUND)
        );
        let held = ClientError::Api {
            status: 409,
            message: "lease currently held by me@example.com".into(),
        };
        let (_, hint, code) = crate::errors::describe(&api_error(held, &settings, subject));
        assert!(hint.unwrap().contains("leases clear"));
        assert_eq!(code, 1);
    }
}
