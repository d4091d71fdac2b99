//! `aloft logs`: an app's log lines, as flyctl prints them
//! (`TIMESTAMP PROVIDER[MACHINE] REGION [LEVEL] MESSAGE`), following new ones until interrupted
//! unless `--no-tail`; `--json` prints one log entry object per line.

use std::io::Write as _;

use aloft_api::LogEntry;
use aloft_client::LogsQuery;
use clap::Args;

use crate::api::{AppArg, Subject, api_error};
use crate::context::Context;

/// `aloft logs`.
#[derive(Debug, Args)]
pub(crate) struct LogsArgs {
    #[command(flatten)]
    app: AppArg,
    /// Only this machine's lines.
    #[arg(short = 'i', long = "machine", visible_alias = "instance", value_name = "ID")]
    machine: Option<String>,
    /// Only lines of machines in this region.
    #[arg(short = 'r', long, value_name = "REGION")]
    region: Option<String>,
    /// Print the lines there are and exit instead of following new ones.
    #[arg(short = 'n', long)]
    no_tail: bool,
    /// How many of the lines already written to print first [default: the server's].
    #[arg(long, value_name = "N")]
    lines: Option<usize>,
    /// Print each entry as a JSON object, one a line.
    #[arg(long)]
    json: bool,
}

/// One entry as flyctl prints it.
pub(crate) fn format_entry(e: &LogEntry) -> String {
    format!(
        "{} {}[{}] {} [{}] {}",
        e.timestamp, e.meta.event.provider, e.instance, e.region, e.level, e.message
    )
}

pub(crate) async fn run(ctx: &Context, args: LogsArgs) -> anyhow::Result<()> {
    let app = args.app.resolve()?;
    let (client, settings) = ctx.api_client()?;
    let subject = match &args.machine {
        Some(id) => Subject::Machine { app: &app, id },
        None => Subject::App(&app),
    };
    let query = LogsQuery {
        instance: args.machine.clone(),
        region: args.region.clone(),
        limit: args.lines,
        follow: !args.no_tail,
    };
    let mut stream = client
        .logs(&app, &query)
        .await
        .map_err(|e| api_error(e, &settings, subject))?;
    let mut out = std::io::stdout().lock();
    while let Some(entry) = stream
        .next()
        .await
        .map_err(|e| api_error(e, &settings, subject))?
    {
        let line = if args.json {
            serde_json::to_string(&entry)?
        } else {
            format_entry(&entry)
        };
        // A closed pipe (`aloft logs | head`) ends the command quietly.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_print_like_flyctls() {
        let entry: LogEntry = serde_json::from_value(serde_json::json!({
            "timestamp": "2026-12-02T07:00:00.123Z", "message": "listening on :8080", "level": "info",
            "instance": "3d8d413b29d089", "region": "local",
            "meta": {"event": {"provider": "app"}, "stream": "stdout"}, "seq": 4
        }))
        .unwrap();
        assert_eq!(
            format_entry(&entry),
            "2026-12-02T07:00:00.123Z app[3d8d413b29d089] local [info] listening on :8080"
        );
    }
}
