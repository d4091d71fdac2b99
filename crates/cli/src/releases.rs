//! `aloft releases [--json]` lists an app's releases (newest first); `aloft releases rollback
//! [VERSION]` redeploys an earlier one (the last complete one before the current when no
//! VERSION) as a new release, followed like a deploy.

use aloft_api::{Release, RollbackRequest};
use clap::{Args, Subcommand};

use crate::api::{AppArg, print_json};
use crate::context::Context;
use crate::deploy::{ReleaseArgs, finish, release_api_error};

/// `aloft releases`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct ReleasesArgs {
    #[command(subcommand)]
    command: Option<ReleasesCommand>,
    #[command(flatten)]
    list: ListArgs,
}

/// `aloft releases …`.
#[derive(Debug, Subcommand)]
pub(crate) enum ReleasesCommand {
    /// List the app's releases, newest first (the default).
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Redeploy an earlier release (default: the last complete one before the current).
    Rollback(RollbackArgs),
}

/// `aloft releases [list]`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    app: AppArg,
    /// Print the releases as JSON (the API's objects).
    #[arg(long)]
    json: bool,
}

/// `aloft releases rollback`.
#[derive(Debug, Args)]
pub(crate) struct RollbackArgs {
    #[command(flatten)]
    app: AppArg,
    /// The release to go back to (`3` or `v3`).
    #[arg(id = "release_version", value_name = "VERSION", value_parser = parse_version)]
    version: Option<u64>,
    /// Return once aloftd has accepted the rollback.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Print the new release as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_version(text: &str) -> Result<u64, String> {
    let t = text.trim();
    t.strip_prefix(['v', 'V'])
        .unwrap_or(t)
        .parse::<u64>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("expected a release version like 3 or v3, got {text:?}"))
}

pub(crate) async fn run(ctx: &Context, args: ReleasesArgs) -> anyhow::Result<()> {
    match args.command {
        None => list(ctx, args.list).await,
        Some(ReleasesCommand::List(list_args)) => list(ctx, list_args).await,
        Some(ReleasesCommand::Rollback(rollback_args)) => rollback(ctx, rollback_args).await,
    }
}

async fn list(ctx: &Context, args: ListArgs) -> anyhow::Result<()> {
    let app = args.app.resolve()?;
    let (client, settings) = ctx.api_client()?;
    let releases = client
        .releases_list(&app)
        .await
        .map_err(|e| release_api_error(e, &settings, &app))?;
    if args.json {
        print_json(&releases)
    } else {
        print!("{}", table(&releases));
        Ok(())
    }
}

async fn rollback(ctx: &Context, args: RollbackArgs) -> anyhow::Result<()> {
    let app = args.app.resolve()?;
    let (client, settings) = ctx.api_client()?;
    let created = client
        .release_rollback(
            &app,
            &RollbackRequest {
                version: args.version,
            },
        )
        .await
        .map_err(|e| release_api_error(e, &settings, &app))?;
    eprintln!(
        "Release v{} of app {app} rolls back to {}: {}",
        created.version,
        created
            .rollback_of
            .map_or_else(|| "an earlier release".to_owned(), |v| format!("v{v}")),
        created.image
    );
    let release = ReleaseArgs {
        detach: args.detach,
        json: args.json,
        ..ReleaseArgs::default()
    };
    finish(&client, &settings, created, &release).await
}

/// VERSION STATUS STRATEGY IMAGE USER CREATED.
pub(crate) fn table(releases: &[Release]) -> String {
    let rows: Vec<Vec<String>> = releases
        .iter()
        .map(|r| {
            let mut status = r.status_str().to_owned();
            if let Some(v) = r.rollback_of {
                status.push_str(&format!(" (rollback of v{v})"));
            }
            vec![
                format!("v{}", r.version),
                status,
                r.strategy.as_str().to_owned(),
                r.image.clone(),
                r.user.clone(),
                r.created_at.clone(),
            ]
        })
        .collect();
    crate::api::table(
        &["VERSION", "STATUS", "STRATEGY", "IMAGE", "USER", "CREATED"],
        &rows,
    )
}

/// A status's API spelling.
pub(crate) trait StatusStr {
    fn status_str(&self) -> &'static str;
}

impl StatusStr for Release {
    fn status_str(&self) -> &'static str {
        use aloft_api::ReleaseStatus as S;
        match self.status {
            S::Pending => "pending",
            S::ReleaseCommand => "release_command",
            S::Running => "running",
            S::Complete => "complete",
            S::RolledBack => "rolled_back",
            S::Failed => "failed",
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn release(version: u64, status: aloft_api::ReleaseStatus) -> Release {
        Release {
            version,
            app: "web".into(),
            status,
            image: format!("127.0.0.1:5000/web:deployment-{version}"),
            strategy: aloft_api::DeployStrategy::Rolling,
            groups: Vec::new(),
            user: "admin".into(),
            created_at: "2026-01-02T03:04:05Z".into(),
            finished_at: None,
            error: None,
            rollback_of: None,
            metadata: Default::default(),
        }
    }

    #[test]
    fn the_table_lists_releases() {
        let mut back = release(3, aloft_api::ReleaseStatus::Running);
        back.rollback_of = Some(1);
        let text = table(&[back, release(2, aloft_api::ReleaseStatus::RolledBack)]);
        assert_eq!(
            text,
            "VERSION   STATUS                     STRATEGY   IMAGE                             USER    CREATED\n\
             v3        running (rollback of v1)   rolling    127.0.0.1:5000/web:deployment-3   admin   2026-01-02T03:04:05Z\n\
             v2        rolled_back                rolling    127.0.0.1:5000/web:deployment-2   admin   2026-01-02T03:04:05Z\n"
        );
    }

    #[test]
    fn versions_parse_with_or_without_v() {
        assert_eq!(parse_version("v3"), Ok(3));
        assert_eq!(parse_version("12"), Ok(12));
        assert!(parse_version("0").is_err());
        assert!(parse_version("x").is_err());
    }
}
