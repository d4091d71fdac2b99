//! `aloft scale show | count | vm | memory`: an app's machines per process group, and changes to
//! them made as releases, so aloftd applies them durably like a deploy (and `aloft releases`
//! shows them).
//!
//! Decisions: a scale is a release of the **latest complete release's** image and group configs
//! with `count` set on the groups it targets (`scale count`), or with the targeted groups' guest
//! changed and their counts left alone (`scale vm`, `scale memory`, strategy rolling). A later
//! `aloft deploy` of a config with `[[vm]]` resets a manual `scale vm` (as on Fly). Counts below
//! zero are refused before anything is sent. `--region`: releases carry no region yet (aloftd
//! places machines in its own region), so `--region` must name the region the app's machines
//! are in.

use std::collections::BTreeMap;

use aloft_api::{
    CreateReleaseRequest, DeployStrategy, GuestPreset, Machine, MachineGuest, Release, ReleaseGroup,
};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::api::{AppArg, Subject, api_error, print_json};
use crate::context::{ApiSettings, Context};
use crate::deploy::{ReleaseArgs, finish, release_api_error};
use crate::errors::UserError;

/// `aloft scale …`.
#[derive(Debug, Subcommand)]
pub(crate) enum ScaleCommand {
    /// Show the machines per process group: count, size, regions.
    Show(ShowArgs),
    /// Set the number of machines: N for every group (or --process-group's), or GROUP=N ….
    Count(CountArgs),
    /// Set the VM size (a preset: shared-cpu-1x, performance-2x …).
    Vm(VmArgs),
    /// Set the memory of the machines, in MB.
    Memory(MemoryArgs),
}

/// `aloft scale show`.
#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    #[command(flatten)]
    app: AppArg,
    /// Print the groups as JSON.
    #[arg(long)]
    json: bool,
}

/// The release flags scale commands share.
#[derive(Debug, Clone, Args)]
pub(crate) struct ScaleRelease {
    #[command(flatten)]
    app: AppArg,
    /// Only this process group [default: every group of the latest release].
    #[arg(short = 'g', long = "process-group", value_name = "GROUP")]
    group: Option<String>,
    /// Return once aloftd has accepted the release.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Print the release as JSON.
    #[arg(long)]
    json: bool,
}

/// `aloft scale count`.
#[derive(Debug, Args)]
pub(crate) struct CountArgs {
    /// N, or GROUP=N for each group to change.
    #[arg(value_name = "COUNT", required = true, allow_negative_numbers = true)]
    counts: Vec<String>,
    /// The region (must be the one aloftd places machines in; releases carry none yet).
    #[arg(short = 'r', long, value_name = "REGION")]
    region: Option<String>,
    /// Accepted as flyctl's (which asks before scaling); aloft does not ask.
    #[arg(short = 'y', long)]
    yes: bool,
    #[command(flatten)]
    release: ScaleRelease,
}

/// `aloft scale vm`.
#[derive(Debug, Args)]
pub(crate) struct VmArgs {
    /// The size preset.
    #[arg(value_name = "SIZE")]
    size: String,
    /// Memory in MB instead of the preset's.
    #[arg(long = "vm-memory", value_name = "MB")]
    memory: Option<u32>,
    #[command(flatten)]
    release: ScaleRelease,
}

/// `aloft scale memory`.
#[derive(Debug, Args)]
pub(crate) struct MemoryArgs {
    /// Memory in MB.
    #[arg(value_name = "MB")]
    memory: u32,
    #[command(flatten)]
    release: ScaleRelease,
}

/// One group of `scale show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct GroupScale {
    pub(crate) process: String,
    pub(crate) count: usize,
    pub(crate) cpu_kind: String,
    pub(crate) cpus: u32,
    pub(crate) memory_mb: u32,
    pub(crate) regions: BTreeMap<String, usize>,
}

pub(crate) async fn run(ctx: &Context, cmd: ScaleCommand) -> anyhow::Result<()> {
    match cmd {
        ScaleCommand::Show(args) => show(ctx, args).await,
        ScaleCommand::Count(args) => {
            let targets = parse_counts(&args.counts, args.release.group.as_deref())?;
            release(ctx, &args.release, args.region.as_deref(), &|groups| {
                apply_counts(groups, &targets)
            })
            .await
        }
        ScaleCommand::Vm(args) => {
            let preset = GuestPreset::find(&args.size).ok_or_else(|| UserError {
                message: format!("unknown VM size {:?}", args.size),
                hint: Some(
                    "sizes: shared-cpu-1x … shared-cpu-8x, performance-1x … performance-16x".to_owned(),
                ),
                code: 2,
            })?;
            let mut guest = preset.to_guest();
            if let Some(mb) = args.memory {
                guest.memory_mb = Some(mb);
            }
            check_guest(&guest)?;
            let only = args.release.group.clone();
            release(ctx, &args.release, None, &|groups| {
                set_guest(groups, only.as_deref(), &|_| guest.clone())
            })
            .await
        }
        ScaleCommand::Memory(args) => {
            let only = args.release.group.clone();
            let mb = args.memory;
            release(ctx, &args.release, None, &|groups| {
                set_guest(groups, only.as_deref(), &|old| {
                    let mut g = old.cloned().unwrap_or_else(|| {
                        GuestPreset::find(aloft_api::DEFAULT_VM_SIZE)
                            .map(GuestPreset::to_guest)
                            .unwrap_or_default()
                    });
                    g.memory_mb = Some(mb);
                    g
                })
            })
            .await
        }
    }
}

fn check_guest(guest: &MachineGuest) -> anyhow::Result<()> {
    guest.check().map_err(|e| {
        UserError {
            message: format!("that VM does not exist: {e}"),
            hint: Some("aloft scale show prints the current sizes".to_owned()),
            code: 1,
        }
        .into()
    })
}

/// `N` (every group, or `only`) or `GROUP=N …`; below zero or not a number is refused.
pub(crate) fn parse_counts(
    args: &[String],
    only: Option<&str>,
) -> anyhow::Result<BTreeMap<Option<String>, u32>> {
    let mut out = BTreeMap::new();
    for arg in args {
        let (group, n) = match arg.split_once('=') {
            Some((g, n)) => (Some(g.trim().to_owned()), n.trim()),
            None => (only.map(str::to_owned), arg.trim()),
        };
        let count = match n.parse::<i64>() {
            Ok(c) if c < 0 => {
                return Err(UserError {
                    message: format!("cannot scale below zero: {arg}"),
                    hint: Some("aloft scale count 0 stops using machines in a group".to_owned()),
                    code: 2,
                }
                .into());
            }
            Ok(c) => u32::try_from(c).map_err(|_| anyhow::anyhow!("{arg}: too many machines"))?,
            Err(_) => {
                return Err(UserError {
                    message: format!("{arg:?} is not a count: use N or GROUP=N"),
                    hint: None,
                    code: 2,
                }
                .into());
            }
        };
        out.insert(group, count);
    }
    Ok(out)
}

/// Sets the counts: `None` targets every group.
fn apply_counts(groups: &mut [ReleaseGroup], targets: &BTreeMap<Option<String>, u32>) -> anyhow::Result<()> {
    for (target, n) in targets {
        match target {
            None => groups.iter_mut().for_each(|g| g.count = Some(*n)),
            Some(name) => {
                let g = find_group(groups, name)?;
                g.count = Some(*n);
            }
        }
    }
    Ok(())
}

fn set_guest(
    groups: &mut [ReleaseGroup],
    only: Option<&str>,
    guest: &dyn Fn(Option<&MachineGuest>) -> MachineGuest,
) -> anyhow::Result<()> {
    let mut targets: Vec<&mut ReleaseGroup> = match only {
        Some(name) => vec![find_group(groups, name)?],
        None => groups.iter_mut().collect(),
    };
    for g in &mut targets {
        let new = guest(g.config.guest.as_ref());
        check_guest(&new)?;
        g.config.guest = Some(new);
        g.config.size = None;
    }
    Ok(())
}

fn find_group<'a>(groups: &'a mut [ReleaseGroup], name: &str) -> anyhow::Result<&'a mut ReleaseGroup> {
    let known: Vec<String> = groups.iter().map(|g| g.group.clone()).collect();
    groups.iter_mut().find(|g| g.group == name).ok_or_else(|| {
        UserError {
            message: format!(
                "the app has no process group {name:?} (it has {})",
                known.join(", ")
            ),
            hint: Some("groups come from [processes] in aloft.toml".to_owned()),
            code: 1,
        }
        .into()
    })
}

/// A release of the latest complete one with `change` applied to its groups.
async fn release(
    ctx: &Context,
    args: &ScaleRelease,
    region: Option<&str>,
    change: &dyn Fn(&mut [ReleaseGroup]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let app = args.app.resolve()?;
    let (client, settings) = ctx.api_client()?;
    let releases = client
        .releases_list(&app)
        .await
        .map_err(|e| release_api_error(e, &settings, &app))?;
    let base = base_release(&releases, &app)?;
    if let Some(region) = region {
        check_region(&client, &settings, &app, region).await?;
    }
    let mut groups = base.groups.clone();
    for g in &mut groups {
        g.count = None;
    }
    change(&mut groups)?;
    let request = CreateReleaseRequest {
        image: Some(base.image.clone()),
        groups,
        strategy: DeployStrategy::Rolling,
        metadata: BTreeMap::from([("aloft_scale".to_owned(), "true".to_owned())]),
        ..CreateReleaseRequest::default()
    };
    let created = client
        .release_create(&app, &request)
        .await
        .map_err(|e| release_api_error(e, &settings, &app))?;
    eprintln!("Release v{} of app {app} scales it", created.version);
    let flags = ReleaseArgs {
        detach: args.detach,
        json: args.json,
        ..ReleaseArgs::default()
    };
    finish(&client, &settings, created, &flags).await
}

/// The newest complete release: what a scale starts from.
pub(crate) fn base_release<'a>(releases: &'a [Release], app: &str) -> anyhow::Result<&'a Release> {
    releases
        .iter()
        .find(|r| r.status == aloft_api::ReleaseStatus::Complete)
        .ok_or_else(|| {
            UserError {
                message: format!("app {app} has no complete release to scale"),
                hint: Some("deploy it first: aloft deploy".to_owned()),
                code: 1,
            }
            .into()
        })
}

async fn check_region(
    client: &aloft_client::Client,
    settings: &ApiSettings,
    app: &str,
    region: &str,
) -> anyhow::Result<()> {
    let machines = client
        .machines_list(app, &aloft_client::ListMachinesParams::default())
        .await
        .map_err(|e| api_error(e, settings, Subject::App(app)))?;
    let regions: std::collections::BTreeSet<&str> = machines.iter().map(|m| m.region.as_str()).collect();
    if regions.is_empty() || regions.contains(region) {
        return Ok(());
    }
    Err(UserError {
        message: format!(
            "cannot scale in region {region}: aloftd places this app's machines in {}",
            regions.into_iter().collect::<Vec<_>>().join(", ")
        ),
        hint: Some("drop --region (releases carry no region yet)".to_owned()),
        code: 1,
    }
    .into())
}

async fn show(ctx: &Context, args: ShowArgs) -> anyhow::Result<()> {
    let app = args.app.resolve()?;
    let (client, settings) = ctx.api_client()?;
    let machines = client
        .machines_list(&app, &aloft_client::ListMachinesParams::default())
        .await
        .map_err(|e| api_error(e, &settings, Subject::App(&app)))?;
    let groups = summarize(&machines);
    if args.json {
        return print_json(&groups);
    }
    println!("VM Resources for app: {app}\n");
    print!("{}", show_table(&groups));
    Ok(())
}

/// Machines (destroyed ones left out) per process group.
pub(crate) fn summarize(machines: &[Machine]) -> Vec<GroupScale> {
    let mut groups: BTreeMap<String, GroupScale> = BTreeMap::new();
    for m in machines.iter().filter(|m| m.state.as_str() != "destroyed") {
        let guest = m
            .config
            .as_ref()
            .and_then(|c| c.guest.clone())
            .unwrap_or_default();
        let process = crate::status::group(m).to_owned();
        let g = groups.entry(process.clone()).or_insert_with(|| GroupScale {
            process,
            count: 0,
            cpu_kind: guest.cpu_kind.clone().unwrap_or_else(|| "shared".to_owned()),
            cpus: guest.cpus.unwrap_or(1),
            memory_mb: guest.memory_mb.unwrap_or(256),
            regions: BTreeMap::new(),
        });
        g.count += 1;
        *g.regions.entry(m.region.clone()).or_default() += 1;
    }
    groups.into_values().collect()
}

fn show_table(groups: &[GroupScale]) -> String {
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                g.process.clone(),
                g.count.to_string(),
                g.cpu_kind.clone(),
                g.cpus.to_string(),
                format!("{}MB", g.memory_mb),
                g.regions
                    .iter()
                    .map(|(r, n)| format!("{r}({n})"))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    crate::api::table(&["PROCESS", "COUNT", "KIND", "CPUS", "MEMORY", "REGIONS"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_parse_and_refuse_below_zero() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let c = parse_counts(&args(&["3"]), None).unwrap();
        assert_eq!(c, BTreeMap::from([(None, 3)]));
        let c = parse_counts(&args(&["web=2", "worker=0"]), None).unwrap();
        assert_eq!(c[&Some("web".to_owned())], 2);
        assert_eq!(c[&Some("worker".to_owned())], 0);
        let c = parse_counts(&args(&["1"]), Some("web")).unwrap();
        assert_eq!(c, BTreeMap::from([(Some("web".to_owned()), 1)]));
        let e = parse_counts(&args(&["-1"]), None).unwrap_err();
        assert_eq!(e.to_string(), "cannot scale below zero: -1");
        let e = parse_counts(&args(&["web=-2"]), None).unwrap_err();
        assert!(e.to_string().contains("below zero"), "{e}");
        assert!(parse_counts(&args(&["many"]), None).is_err());
    }

    fn groups() -> Vec<ReleaseGroup> {
        ["web", "worker"]
            .iter()
            .map(|g| ReleaseGroup {
                group: (*g).to_owned(),
                config: aloft_api::MachineConfig::default(),
                count: None,
            })
            .collect()
    }

    #[test]
    fn counts_and_guests_apply_to_the_targeted_groups() {
        let mut gs = groups();
        apply_counts(&mut gs, &BTreeMap::from([(Some("worker".to_owned()), 3)])).unwrap();
        assert_eq!((gs[0].count, gs[1].count), (None, Some(3)));
        apply_counts(&mut gs, &BTreeMap::from([(None, 2)])).unwrap();
        assert_eq!((gs[0].count, gs[1].count), (Some(2), Some(2)));
        let e = apply_counts(&mut gs, &BTreeMap::from([(Some("db".to_owned()), 1)])).unwrap_err();
        assert!(e.to_string().contains("no process group \"db\""), "{e}");

        let mut gs = groups();
        let big = GuestPreset::find("shared-cpu-2x").unwrap().to_guest();
        set_guest(&mut gs, Some("web"), &|_| big.clone()).unwrap();
        assert_eq!(gs[0].config.guest.as_ref().unwrap().cpus, Some(2));
        assert!(gs[1].config.guest.is_none());
        let e = set_guest(&mut gs, None, &|_| MachineGuest {
            memory_mb: Some(1),
            ..big.clone()
        })
        .unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
