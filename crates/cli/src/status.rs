//! `aloft status [--json] [--watch]`: the app, its latest release, and its machines grouped by
//! process group (`metadata.fly_process_group`) and region, with state, checks and release.

use std::time::Duration;

use aloft_api::{App, CheckState, Machine, Release};
use aloft_client::ListMachinesParams;
use clap::Args;
use serde::Serialize;

use crate::api::{AppArg, Subject, api_error, print_json};
use crate::context::Context;
use crate::releases::StatusStr as _;

/// `aloft status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    app: AppArg,
    /// Print the app, its latest release and machines as JSON.
    #[arg(long)]
    json: bool,
    /// Show it again every 2 seconds until interrupted.
    #[arg(short = 'w', long)]
    watch: bool,
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
pub(crate) struct AppStatus {
    pub(crate) app: App,
    pub(crate) release: Option<Release>,
    pub(crate) machines: Vec<Machine>,
}

pub(crate) async fn run(ctx: &Context, args: StatusArgs) -> anyhow::Result<()> {
    let app = args.app.resolve()?;
    let (client, settings) = ctx.api_client()?;
    loop {
        let status = fetch(&client, &settings, &app).await?;
        if args.json {
            if args.watch {
                println!("{}", serde_json::to_string(&status)?);
            } else {
                print_json(&status)?;
            }
        } else {
            if args.watch && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render(&status));
        }
        if !args.watch {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

pub(crate) async fn fetch(
    client: &aloft_client::Client,
    settings: &crate::context::ApiSettings,
    app: &str,
) -> anyhow::Result<AppStatus> {
    let info = client
        .app_get(app)
        .await
        .map_err(|e| api_error(e, settings, Subject::App(app)))?;
    // An aloftd without releases still shows its machines.
    let release = match client.releases_list(app).await {
        Ok(list) => list.into_iter().next(),
        Err(e) if matches!(e.status(), Some(404 | 405 | 501)) => None,
        Err(e) => return Err(api_error(e, settings, Subject::App(app))),
    };
    let mut machines = client
        .machines_list(app, &ListMachinesParams::default())
        .await
        .map_err(|e| api_error(e, settings, Subject::App(app)))?;
    machines.sort_by(|a, b| (group(a), &a.region, &a.id).cmp(&(group(b), &b.region, &b.id)));
    Ok(AppStatus {
        app: info,
        release,
        machines,
    })
}

/// A machine's process group (`fly_process_group`, else the legacy `process_group`), `-` for
/// machines outside any.
pub(crate) fn group(m: &Machine) -> &str {
    m.config
        .as_ref()
        .and_then(|c| {
            c.metadata
                .get(aloft_config::METADATA_PROCESS_GROUP)
                .or_else(|| c.metadata.get("process_group"))
        })
        .map_or("-", String::as_str)
}

/// The release a machine runs (`fly_release_version` in its metadata).
fn machine_release(m: &Machine) -> String {
    m.config
        .as_ref()
        .and_then(|c| c.metadata.get("fly_release_version"))
        .map_or_else(String::new, |v| format!("v{}", v.trim_start_matches('v')))
}

/// flyctl's checks column: `2 total, 1 passing, 1 critical`.
pub(crate) fn checks_summary(m: &Machine) -> String {
    if m.checks.is_empty() {
        return String::new();
    }
    let count = |s: CheckState| m.checks.iter().filter(|c| c.status == s).count();
    let mut parts = vec![format!("{} total", m.checks.len())];
    for (state, name) in [
        (CheckState::Passing, "passing"),
        (CheckState::Warning, "warning"),
        (CheckState::Critical, "critical"),
    ] {
        let n = count(state);
        if n > 0 {
            parts.push(format!("{n} {name}"));
        }
    }
    parts.join(", ")
}

/// The text form: the app, the release, then the machines table.
pub(crate) fn render(s: &AppStatus) -> String {
    let release = s.release.as_ref().map_or_else(
        || "none yet (aloft deploy)".to_owned(),
        |r| format!("v{} {} ({})", r.version, r.status_str(), r.image),
    );
    let mut out = format!(
        "App\n  Name     = {}\n  Owner    = {}\n  Status   = {}\n  Release  = {release}\n\n",
        s.app.name,
        s.app.organization.slug,
        if s.app.status.is_empty() {
            "-"
        } else {
            &s.app.status
        },
    );
    if s.machines.is_empty() {
        out.push_str("No machines (aloft deploy creates them)\n");
        return out;
    }
    let rows: Vec<Vec<String>> = s
        .machines
        .iter()
        .map(|m| {
            vec![
                group(m).to_owned(),
                m.id.to_string(),
                machine_release(m),
                m.region.clone(),
                m.state.as_str().to_owned(),
                checks_summary(m),
                m.updated_at.clone(),
            ]
        })
        .collect();
    out.push_str("Machines\n");
    out.push_str(&crate::api::table(
        &[
            "PROCESS",
            "ID",
            "VERSION",
            "REGION",
            "STATE",
            "CHECKS",
            "LAST UPDATED",
        ],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, group: Option<&str>, checks: &[&str]) -> Machine {
        let mut metadata = serde_json::Map::new();
        if let Some(g) = group {
            metadata.insert("fly_process_group".into(), g.into());
            metadata.insert("fly_release_version".into(), "2".into());
        }
        let checks: Vec<serde_json::Value> = checks
            .iter()
            .map(|s| serde_json::json!({"name": "c", "status": s}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "id": id, "name": id, "state": "started", "region": "local",
            "instance_id": "01HBZ8QEXHS0YR4R1N6S1XGEE2",
            "updated_at": "2026-01-02T03:04:05Z",
            "config": {"image": "busybox", "metadata": metadata},
            "checks": checks,
        }))
        .unwrap()
    }

    #[test]
    fn machines_are_grouped_and_checks_summed() {
        let m = machine("0a0a0a0a0a0a0a", Some("web"), &["passing", "critical", "passing"]);
        assert_eq!(checks_summary(&m), "3 total, 2 passing, 1 critical");
        assert_eq!(checks_summary(&machine("0b0b0b0b0b0b0b", None, &[])), "");
        assert_eq!(group(&m), "web");
        assert_eq!(group(&machine("0b0b0b0b0b0b0b", None, &[])), "-");
        let app: App = serde_json::from_value(serde_json::json!({
            "name": "web", "status": "deployed", "organization": {"slug": "personal", "name": "personal"}
        }))
        .unwrap();
        let status = AppStatus {
            app,
            release: Some(crate::releases::tests::release(
                2,
                aloft_api::ReleaseStatus::Complete,
            )),
            machines: vec![m, machine("3d8d413b29d089", Some("worker"), &[])],
        };
        assert_eq!(
            render(&status),
            "App\n  Name     = web\n  Owner    = personal\n  Status   = deployed\n  \
             Release  = v2 complete (127.0.0.1:5000/web:deployment-2)\n\n\
             Machines\n\
             PROCESS   ID               VERSION   REGION   STATE     CHECKS                           LAST UPDATED\n\
             web       0a0a0a0a0a0a0a   v2        local    started   3 total, 2 passing, 1 critical   2026-01-02T03:04:05Z\n\
             worker    3d8d413b29d089   v2        local    started   -                                2026-01-02T03:04:05Z\n"
        );
    }
}
