//! `aloft apps create NAME | list | destroy NAME`: apps on aloftd, through `aloft-client`.
//!
//! flyctl's grammar and output: `list` prints a NAME / OWNER / STATUS / LATEST DEPLOY table (or
//! the API's app objects with `--json`), `destroy` asks before it destroys unless `--yes` and
//! refuses without a terminal to ask on.

use aloft_api::{App, CreateAppRequest};
use clap::{Args, Subcommand};

use crate::api::{Subject, api_error, confirm, print_json};
use crate::context::Context;

/// The organization apps go to and are listed from unless `--org` says otherwise (aloftd's first
/// token acts for it).
pub(crate) const DEFAULT_ORG: &str = "personal";

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
                .map_err(|e| api_error(e, &settings, Subject::None))?;
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
                .map_err(|e| api_error(e, &settings, Subject::None))?;
            list.apps.sort_by(|a, b| a.name.cmp(&b.name));
            if args.json {
                print_json(&list.apps)?;
            } else {
                // Each app's newest release: when it was last deployed ("-" if never).
                let mut deployed = Vec::with_capacity(list.apps.len());
                for app in &list.apps {
                    let latest = client
                        .release_latest(&app.name)
                        .await
                        .map_err(|e| api_error(e, &settings, Subject::App(&app.name)))?;
                    deployed.push(latest.map(|r| r.created_at).unwrap_or_default());
                }
                print!("{}", table(&list.apps, &deployed));
            }
        }
        AppsCommand::Destroy(args) => {
            let name = args.name;
            // Unknown apps fail before anyone is asked anything.
            client
                .app_get(&name)
                .await
                .map_err(|e| api_error(e, &settings, Subject::App(&name)))?;
            let question = format!(
                "Destroying app {name} destroys its machines and volumes too; this cannot be undone.\n\
                 Destroy app {name}?"
            );
            let refusal = format!("not destroying app {name}");
            let hint = format!("aloft apps destroy {name} --yes");
            if !args.yes && !confirm(&question, &refusal, &hint)? {
                eprintln!("Not destroying app {name}");
                return Ok(());
            }
            client
                .app_delete(&name)
                .await
                .map_err(|e| api_error(e, &settings, Subject::App(&name)))?;
            println!("Destroyed app {name}");
        }
    }
    Ok(())
}

/// flyctl's table: NAME, OWNER, STATUS, LATEST DEPLOY (`deployed[i]`, when app `i`'s newest
/// release was made); "-" when unknown.
fn table(apps: &[App], deployed: &[String]) -> String {
    let rows: Vec<Vec<String>> = apps
        .iter()
        .enumerate()
        .map(|(i, a)| {
            vec![
                a.name.clone(),
                a.organization.slug.clone(),
                a.status.clone(),
                deployed.get(i).cloned().unwrap_or_default(),
            ]
        })
        .collect();
    crate::api::table(&["NAME", "OWNER", "STATUS", "LATEST DEPLOY"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            table(
                &[app("web", "deployed"), app("a-longer-name", "")],
                &["2026-12-03T12:46:05Z".into()]
            ),
            "NAME            OWNER      STATUS     LATEST DEPLOY\n\
             web             personal   deployed   2026-12-03T12:46:05Z\n\
             a-longer-name   personal   -          -\n"
        );
        assert_eq!(table(&[], &[]), "NAME   OWNER   STATUS   LATEST DEPLOY\n");
    }
}
