//! `aloft volumes` (aliases `volume`, `vol`): an app's persistent disks, with flyctl's grammar
//! and output. `create NAME` makes volumes (`--count`; `--snapshot-id` restores a snapshot),
//! `list` shows flyctl's table, `show` one volume, `extend` grows one, `update` changes its
//! snapshot settings, `fork` copies one, `snapshots list|create` lists a volume's snapshots and
//! takes one, `destroy` deletes volumes and their data after asking. A machine mounts a volume
//! through its config: `aloft machine run --volume vol_…:/data`, or `[[mounts]]` in aloft.toml on
//! deploy.
//!
//! aloft's volumes are not encrypted at rest (aloftd refuses `encrypted: true`), so the CLI
//! always asks for `encrypted: false`; `--no-encryption` is accepted for flyctl's scripts.
//! Snapshots, restores and forks answer once the copy is made (flyctl's snapshot is scheduled
//! and its command returns at once), so the CLI prints what was made.

use std::str::FromStr as _;

use aloft_api::{
    CreateVolumeRequest, DEFAULT_VOLUME_SIZE_GB, HostStatus, MAX_VOLUME_SIZE_GB, SnapshotId,
    UpdateVolumeRequest, Volume, VolumeId, VolumeSnapshot, VolumeState,
};
use aloft_client::ClientError;
use clap::{Args, Subcommand};

use crate::api::{AppArg, Subject, api_error, confirm, print_json};
use crate::context::Context;
use crate::errors::UserError;

/// `aloft volumes …`.
#[derive(Debug, Subcommand)]
pub(crate) enum VolumesCommand {
    /// Create volumes named NAME (every machine that mounts one gets its own).
    Create(CreateArgs),
    /// List the app's volumes.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show one volume.
    Show(ShowArgs),
    /// Grow a volume (volumes never shrink); its machine may need a restart to see it.
    Extend(ExtendArgs),
    /// Change a volume's snapshot settings.
    Update(UpdateArgs),
    /// Fork a volume: a new volume holding a copy of its data as it is now, on the same host.
    Fork(ForkArgs),
    /// A volume's snapshots: list them, take one (restore one with `volumes create
    /// --snapshot-id`).
    #[command(subcommand, visible_alias = "snapshot", alias = "snaps")]
    Snapshots(SnapshotsCommand),
    /// Destroy volumes and their data (asks first unless --yes).
    #[command(visible_aliases = ["delete", "rm"])]
    Destroy(DestroyArgs),
}

/// `aloft volumes snapshots …`.
#[derive(Debug, Subcommand)]
pub(crate) enum SnapshotsCommand {
    /// List a volume's snapshots, newest first.
    #[command(visible_alias = "ls")]
    List(SnapshotsListArgs),
    /// Take a snapshot of a volume now.
    Create(SnapshotsCreateArgs),
}

/// `aloft volumes create`.
#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// The volume's name: 1 to 30 lowercase letters, digits and underscores (what `[[mounts]]
    /// source` names).
    #[arg(value_name = "NAME")]
    name: String,
    #[command(flatten)]
    app: AppArg,
    /// Size in GB [default: 1, or the snapshot's size with --snapshot-id].
    #[arg(short = 's', long, value_name = "GB", value_parser = parse_size)]
    size: Option<u32>,
    /// The region [default: aloftd's, or the snapshot's with --snapshot-id].
    #[arg(short = 'r', long, value_name = "REGION")]
    region: Option<String>,
    /// How many volumes to create.
    #[arg(short = 'n', long, value_name = "N", default_value = "1", value_parser = clap::value_parser!(u32).range(1..=100))]
    count: u32,
    /// Restore this snapshot (vs_…): the volume starts with its data, in its region
    /// (`aloft volumes snapshots list VOLUME_ID` shows a volume's snapshots).
    #[arg(long, value_name = "ID")]
    snapshot_id: Option<String>,
    /// Days to keep the volume's snapshots, 1 to 60 [default: 5].
    #[arg(long, value_name = "DAYS", value_parser = parse_retention)]
    snapshot_retention: Option<u32>,
    /// Take scheduled snapshots: true or false.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    scheduled_snapshots: Option<bool>,
    /// Place each volume on a host holding no other volume of this name: true or false (aloftd
    /// prefers such a host anyway, and uses another when there is none).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    require_unique_zone: Option<bool>,
    /// Don't encrypt the volume (flyctl's flag; aloft's volumes are never encrypted yet).
    #[arg(long)]
    no_encryption: bool,
    /// Don't ask (flyctl's flag; aloft does not ask before creating).
    #[arg(short = 'y', long)]
    yes: bool,
    /// Print each volume as JSON (the API's object), one after the other.
    #[arg(long)]
    json: bool,
}

/// `aloft volumes list`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    app: AppArg,
    /// Include destroyed volumes.
    #[arg(long)]
    all: bool,
    /// Print the volumes as JSON (the API's objects).
    #[arg(long)]
    json: bool,
}

/// `aloft volumes show`.
#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    /// The volume's id (vol_…).
    #[arg(value_name = "ID")]
    id: String,
    #[command(flatten)]
    app: AppArg,
    /// Print the volume as JSON (the API's object).
    #[arg(long)]
    json: bool,
}

/// `aloft volumes extend`.
#[derive(Debug, Args)]
pub(crate) struct ExtendArgs {
    /// The volume's id (vol_…).
    #[arg(value_name = "ID")]
    id: String,
    #[command(flatten)]
    app: AppArg,
    /// The new size in GB (larger than the current one).
    #[arg(short = 's', long, value_name = "GB", required = true, value_parser = parse_size)]
    size: u32,
    /// Print the answer as JSON (`{volume, needs_restart}`, the API's object).
    #[arg(long)]
    json: bool,
}

/// `aloft volumes update`.
#[derive(Debug, Args)]
pub(crate) struct UpdateArgs {
    /// The volume's id (vol_…).
    #[arg(value_name = "ID")]
    id: String,
    #[command(flatten)]
    app: AppArg,
    /// Days to keep snapshots, 1 to 60.
    #[arg(long, value_name = "DAYS", value_parser = parse_retention)]
    snapshot_retention: Option<u32>,
    /// Take scheduled snapshots: true or false.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    scheduled_snapshots: Option<bool>,
    /// Print the volume as JSON (the API's object).
    #[arg(long)]
    json: bool,
}

/// `aloft volumes fork`.
#[derive(Debug, Args)]
pub(crate) struct ForkArgs {
    /// The id of the volume to copy (vol_…).
    #[arg(value_name = "ID")]
    id: String,
    #[command(flatten)]
    app: AppArg,
    /// The new volume's name [default: the source's].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// The region [default: the source's; a fork is made on its source's host].
    #[arg(short = 'r', long, value_name = "REGION")]
    region: Option<String>,
    /// Print the new volume as JSON (the API's object).
    #[arg(long)]
    json: bool,
}

/// `aloft volumes snapshots list`.
#[derive(Debug, Args)]
pub(crate) struct SnapshotsListArgs {
    /// The volume's id (vol_…); a destroyed volume's snapshots are listed until they expire.
    #[arg(value_name = "VOLUME_ID")]
    id: String,
    #[command(flatten)]
    app: AppArg,
    /// Print the snapshots as JSON (the API's objects).
    #[arg(long)]
    json: bool,
}

/// `aloft volumes snapshots create`.
#[derive(Debug, Args)]
pub(crate) struct SnapshotsCreateArgs {
    /// The volume's id (vol_…).
    #[arg(value_name = "VOLUME_ID")]
    id: String,
    #[command(flatten)]
    app: AppArg,
    /// Print the snapshot as JSON (the API's object).
    #[arg(long)]
    json: bool,
}

/// `aloft volumes destroy`.
#[derive(Debug, Args)]
pub(crate) struct DestroyArgs {
    /// The volumes' ids (vol_…).
    #[arg(value_name = "ID", required = true)]
    ids: Vec<String>,
    #[command(flatten)]
    app: AppArg,
    /// Don't ask for confirmation (required without a terminal).
    #[arg(short = 'y', long)]
    yes: bool,
}

/// A size in GB, 1 to [`MAX_VOLUME_SIZE_GB`].
fn parse_size(text: &str) -> Result<u32, String> {
    let range = format!("a volume holds 1 to {MAX_VOLUME_SIZE_GB} GB");
    let n: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("not a whole number of GB ({range}, e.g. --size 10)"))?;
    match aloft_api::volume_size_problem(n) {
        None => Ok(n),
        Some(problem) => Err(problem),
    }
}

/// Snapshot retention in days, 1 to 60.
fn parse_retention(text: &str) -> Result<u32, String> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|d| (1..=60).contains(d))
        .ok_or_else(|| "snapshots are kept 1 to 60 days".to_owned())
}

/// The id as given, checked: `vol_` and lowercase letters and digits. A name is refused with
/// where to find the id.
pub(crate) fn parse_id(text: &str, app: Option<&str>) -> anyhow::Result<VolumeId> {
    VolumeId::from_str(text.trim()).map_err(|e| {
        let list = match app {
            Some(app) => format!("aloft volumes list -a {app}"),
            None => "aloft volumes list".to_owned(),
        };
        UserError {
            message: format!("{text:?} is not a volume id: {}", e.expected),
            hint: Some(format!(
                "volumes are named by id here, not by name: {list} shows the ids"
            )),
            code: 2,
        }
        .into()
    })
}

/// The snapshot id as given, checked: `vs_` and lowercase letters and digits.
fn parse_snapshot_id(text: &str, app: &str) -> anyhow::Result<SnapshotId> {
    SnapshotId::from_str(text.trim()).map_err(|e| {
        UserError {
            message: format!("{text:?} is not a snapshot id: {}", e.expected),
            hint: Some(format!(
                "aloft volumes snapshots list VOLUME_ID -a {app} shows a volume's snapshots"
            )),
            code: 2,
        }
        .into()
    })
}

/// A client, its settings and the app it acts on.
type Target = crate::api::AppTarget;

impl Target {
    fn volume_err<'a>(&'a self, id: &'a VolumeId) -> impl Fn(ClientError) -> anyhow::Error + 'a {
        move |e| {
            api_error(
                e,
                &self.settings,
                Subject::Volume {
                    app: &self.app,
                    id: id.as_str(),
                },
            )
        }
    }
}

pub(crate) async fn run(ctx: &Context, cmd: VolumesCommand) -> anyhow::Result<()> {
    match cmd {
        VolumesCommand::Create(args) => create(ctx, args).await,
        VolumesCommand::List(args) => list(ctx, args).await,
        VolumesCommand::Show(args) => {
            let t = Target::new(ctx, &args.app)?;
            let id = parse_id(&args.id, Some(&t.app))?;
            let volume = t
                .client
                .volume_get(&t.app, id.as_str())
                .await
                .map_err(t.volume_err(&id))?;
            if args.json {
                return print_json(&volume);
            }
            print!("{}", details(&volume, &t.app, true));
            Ok(())
        }
        VolumesCommand::Extend(args) => extend(ctx, args).await,
        VolumesCommand::Update(args) => update(ctx, args).await,
        VolumesCommand::Fork(args) => fork(ctx, args).await,
        VolumesCommand::Snapshots(SnapshotsCommand::List(args)) => snapshots_list(ctx, args).await,
        VolumesCommand::Snapshots(SnapshotsCommand::Create(args)) => snapshots_create(ctx, args).await,
        VolumesCommand::Destroy(args) => destroy(ctx, args).await,
    }
}

async fn create(ctx: &Context, args: CreateArgs) -> anyhow::Result<()> {
    aloft_api::validate_volume_name(&args.name).map_err(|e| UserError {
        message: e.message().to_owned(),
        hint: Some("e.g. aloft volumes create data --size 10".to_owned()),
        code: 2,
    })?;
    // flyctl's --no-encryption and --yes change nothing: aloft's volumes are never encrypted,
    // and aloft does not ask before creating one.
    let _ = (args.no_encryption, args.yes);
    let t = Target::new(ctx, &args.app)?;
    let snapshot = args
        .snapshot_id
        .as_deref()
        .map(|s| parse_snapshot_id(s, &t.app))
        .transpose()?;
    let request = CreateVolumeRequest {
        name: args.name.clone(),
        region: args.region.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()),
        // A restore is the snapshot's size unless told otherwise.
        size_gb: args
            .size
            .or_else(|| snapshot.is_none().then_some(DEFAULT_VOLUME_SIZE_GB)),
        encrypted: Some(false),
        require_unique_zone: args.require_unique_zone,
        snapshot_id: snapshot.as_ref().map(|s| s.as_str().to_owned()),
        snapshot_retention: args.snapshot_retention,
        auto_backup_enabled: args.scheduled_snapshots,
        ..CreateVolumeRequest::default()
    };
    let err = |e: ClientError| match &snapshot {
        Some(id) => api_error(
            e,
            &t.settings,
            Subject::Snapshot {
                app: &t.app,
                id: id.as_str(),
            },
        ),
        None => t.app_err()(e),
    };
    for i in 0..args.count {
        let volume = t
            .client
            .volume_create(&t.app, &request)
            .await
            .map_err(err)
            .map_err(|e| {
                if i == 0 {
                    e
                } else {
                    e.context(format!("{i} of {} volumes were created", args.count))
                }
            })?;
        if args.json {
            print_json(&volume)?;
        } else {
            if i > 0 {
                println!();
            }
            print!("{}", details(&volume, &t.app, false));
        }
    }
    Ok(())
}

async fn list(ctx: &Context, args: ListArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.app)?;
    let mut volumes = t.client.volumes_list(&t.app).await.map_err(t.app_err())?;
    if !args.all {
        volumes.retain(|v| v.state != VolumeState::Destroyed);
    }
    // Oldest first; volumes made in the same second keep aloftd's order.
    volumes.sort_by(|a, b| a.created_at.cmp(&b.created_at));
    if args.json {
        return print_json(&volumes);
    }
    print!("{}", table(&volumes));
    Ok(())
}

async fn extend(ctx: &Context, args: ExtendArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.app)?;
    let id = parse_id(&args.id, Some(&t.app))?;
    let answer = t
        .client
        .volume_extend(&t.app, id.as_str(), args.size)
        .await
        .map_err(t.volume_err(&id))?;
    if args.json {
        return print_json(&answer);
    }
    print!("{}", details(&answer.volume, &t.app, false));
    if answer.needs_restart {
        let how = match &answer.volume.attached_machine_id {
            Some(m) => format!(": aloft machine restart {m} -a {}", t.app),
            None => String::new(),
        };
        println!("You need to restart the machine that mounts it to use the new size{how}");
    }
    Ok(())
}

async fn update(ctx: &Context, args: UpdateArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.app)?;
    let id = parse_id(&args.id, Some(&t.app))?;
    if args.snapshot_retention.is_none() && args.scheduled_snapshots.is_none() {
        return Err(UserError {
            message: "nothing to update".to_owned(),
            hint: Some(format!(
                "give --snapshot-retention DAYS and/or --scheduled-snapshots=true|false, e.g. aloft volumes update {id} --snapshot-retention 7"
            )),
            code: 2,
        }
        .into());
    }
    let request = UpdateVolumeRequest {
        auto_backup_enabled: args.scheduled_snapshots,
        snapshot_retention: args.snapshot_retention,
    };
    let volume = t
        .client
        .volume_update(&t.app, id.as_str(), &request)
        .await
        .map_err(t.volume_err(&id))?;
    if args.json {
        return print_json(&volume);
    }
    print!("{}", details(&volume, &t.app, false));
    Ok(())
}

async fn fork(ctx: &Context, args: ForkArgs) -> anyhow::Result<()> {
    if let Some(name) = &args.name {
        aloft_api::validate_volume_name(name).map_err(|e| UserError {
            message: e.message().to_owned(),
            hint: Some("e.g. aloft volumes fork vol_… --name data_copy".to_owned()),
            code: 2,
        })?;
    }
    let t = Target::new(ctx, &args.app)?;
    let id = parse_id(&args.id, Some(&t.app))?;
    // As flyctl does: the source first, for its name (and an unknown id says so plainly).
    let source = t
        .client
        .volume_get(&t.app, id.as_str())
        .await
        .map_err(t.volume_err(&id))?;
    let request = CreateVolumeRequest {
        name: args.name.unwrap_or(source.name),
        // A fork is made on its source's host: aloftd refuses another region, saying so.
        region: args.region.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()),
        encrypted: Some(false),
        source_volume_id: Some(id.as_str().to_owned()),
        ..CreateVolumeRequest::default()
    };
    let volume = t
        .client
        .volume_create(&t.app, &request)
        .await
        .map_err(t.volume_err(&id))?;
    if args.json {
        return print_json(&volume);
    }
    print!("{}", details(&volume, &t.app, false));
    Ok(())
}

async fn snapshots_list(ctx: &Context, args: SnapshotsListArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.app)?;
    let id = parse_id(&args.id, Some(&t.app))?;
    let mut snapshots = t
        .client
        .volume_snapshots(&t.app, id.as_str())
        .await
        .map_err(t.volume_err(&id))?;
    // Newest first (aloftd's order); snapshots taken in the same second keep it.
    snapshots.sort_by(|a, b| b.created_at.cmp(&a.created_at));
    if args.json {
        return print_json(&snapshots);
    }
    if snapshots.is_empty() {
        println!("No snapshots available for volume {id}");
        return Ok(());
    }
    print!("{}", snapshot_table(&snapshots));
    Ok(())
}

async fn snapshots_create(ctx: &Context, args: SnapshotsCreateArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.app)?;
    let id = parse_id(&args.id, Some(&t.app))?;
    let snapshot = t
        .client
        .create_volume_snapshot(&t.app, id.as_str())
        .await
        .map_err(t.volume_err(&id))?;
    if args.json {
        return print_json(&snapshot);
    }
    println!(
        "Snapshot {} of volume {id} created ({})",
        snapshot.id,
        crate::progress::bytes(snapshot.size)
    );
    Ok(())
}

async fn destroy(ctx: &Context, args: DestroyArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.app)?;
    let ids = args
        .ids
        .iter()
        .map(|id| parse_id(id, Some(&t.app)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Unknown volumes fail before anyone is asked anything.
    let mut volumes = Vec::with_capacity(ids.len());
    for id in &ids {
        volumes.push(
            t.client
                .volume_get(&t.app, id.as_str())
                .await
                .map_err(t.volume_err(id))?,
        );
    }
    if !args.yes {
        let described: Vec<String> = volumes.iter().map(describe).collect();
        let (question, refusal) = if let [only] = volumes.as_slice() {
            (
                format!(
                    "Destroying volume {} deletes its data; this cannot be undone.\nDestroy volume {}?",
                    described[0], only.id
                ),
                format!("not destroying volume {}", only.id),
            )
        } else {
            (
                format!(
                    "Destroying volumes {} deletes their data; this cannot be undone.\nDestroy {} volumes?",
                    described.join(", "),
                    volumes.len()
                ),
                format!("not destroying {} volumes", volumes.len()),
            )
        };
        let ids_text: Vec<&str> = ids.iter().map(VolumeId::as_str).collect();
        let hint = format!("aloft volumes destroy {} -a {} --yes", ids_text.join(" "), t.app);
        if !confirm(&question, &refusal, &hint)? {
            eprintln!("Not destroying {}", ids_text.join(", "));
            return Ok(());
        }
    }
    for (id, before) in ids.iter().zip(&volumes) {
        let gone = t
            .client
            .volume_delete(&t.app, id.as_str())
            .await
            .map_err(|e| destroy_error(&t, id, before, e))?;
        println!("Destroyed volume ID: {id} name: {}", gone.name);
    }
    Ok(())
}

/// `vol_… (data, 3 GB, mounted by machine …)`.
fn describe(v: &Volume) -> String {
    let mut s = format!("{} ({}, {} GB", v.id, v.name, v.size_gb);
    if let Some(m) = &v.attached_machine_id {
        s.push_str(&format!(", mounted by machine {m}"));
    }
    s.push(')');
    s
}

/// A destroy's error; a 412 (a machine mounts it) says how to get past it.
fn destroy_error(t: &Target, id: &VolumeId, before: &Volume, e: ClientError) -> anyhow::Error {
    let mounted = matches!(&e, ClientError::Api { status: 412, .. });
    let err = t.volume_err(id)(e);
    if !mounted {
        return err;
    }
    match err.downcast::<UserError>() {
        Ok(mut user) => {
            user.hint = Some(match &before.attached_machine_id {
                Some(m) => format!(
                    "a volume can't be destroyed while a machine mounts it: destroy machine {m} first \
                     (aloft machine destroy {m} -a {} --force), then the volume",
                    t.app
                ),
                None => format!(
                    "a volume can't be destroyed while a machine mounts it: aloft machine list -a {} \
                     shows which one (VOLUME column); destroy that machine first",
                    t.app
                ),
            });
            user.into()
        }
        Err(err) => err,
    }
}

/// flyctl's table: ID STATE NAME SIZE REGION ZONE ENCRYPTED ATTACHED VM CREATED AT; a `*` marks
/// volumes whose host did not answer.
fn table(volumes: &[Volume]) -> String {
    let mut unreachable = false;
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            let mut id = v.id.to_string();
            if v.host_status == Some(HostStatus::Unreachable) {
                unreachable = true;
                id.push('*');
            }
            vec![
                id,
                v.state.as_str().to_owned(),
                v.name.clone(),
                format!("{}GB", v.size_gb),
                v.region.clone(),
                v.zone.clone(),
                v.encrypted.to_string(),
                v.attached_machine_id.clone().unwrap_or_default(),
                v.created_at.clone(),
            ]
        })
        .collect();
    let mut out = crate::api::table(
        &[
            "ID",
            "STATE",
            "NAME",
            "SIZE",
            "REGION",
            "ZONE",
            "ENCRYPTED",
            "ATTACHED VM",
            "CREATED AT",
        ],
        &rows,
    );
    if unreachable {
        out.push_str("* These volumes' hosts could not be reached.\n");
    }
    out
}

/// flyctl's snapshot table: ID STATUS SIZE CREATED AT RETENTION DAYS, sizes as people write them.
fn snapshot_table(snapshots: &[VolumeSnapshot]) -> String {
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.status.clone(),
                crate::progress::bytes(s.size),
                s.created_at.clone(),
                s.retention_days.to_string(),
            ]
        })
        .collect();
    crate::api::table(&["ID", "STATUS", "SIZE", "CREATED AT", "RETENTION DAYS"], &rows)
}

/// flyctl's volume block (labels right-aligned to 20 columns); `more` adds the machine that
/// mounts it, the filesystem's use and an unreachable host (`show`).
fn details(v: &Volume, app: &str, more: bool) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("ID", v.id.to_string()),
        ("Name", v.name.clone()),
        ("App", app.to_owned()),
        ("Region", v.region.clone()),
        ("Zone", v.zone.clone()),
        ("Size GB", v.size_gb.to_string()),
        ("Encrypted", v.encrypted.to_string()),
        ("Created at", v.created_at.clone()),
    ];
    if let Some(days) = v.snapshot_retention {
        rows.push(("Snapshot retention", days.to_string()));
    }
    if let Some(on) = v.auto_backup_enabled {
        rows.push(("Scheduled snapshots", on.to_string()));
    }
    if more {
        rows.push((
            "Attached VM",
            v.attached_machine_id.clone().unwrap_or_else(|| "-".to_owned()),
        ));
        if let (Some(used), Some(total)) = (v.bytes_used, v.bytes_total) {
            rows.push((
                "Used",
                format!(
                    "{} of {}",
                    crate::progress::bytes(used),
                    crate::progress::bytes(total)
                ),
            ));
        }
        if v.host_status == Some(HostStatus::Unreachable) {
            rows.push(("Host", "unreachable".to_owned()));
        }
    }
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{k:>20}: {v}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume() -> Volume {
        serde_json::from_value(serde_json::json!({
            "id": "vol_4yx0jvqe1x1dj7gr",
            "name": "data",
            "state": "created",
            "region": "local",
            "zone": "host1",
            "size_gb": 3,
            "encrypted": false,
            "fstype": "ext4",
            "attached_machine_id": "3d8d413b29d089",
            "created_at": "2026-01-02T03:04:05Z",
            "snapshot_retention": 5,
            "auto_backup_enabled": true,
            "bytes_total": 3_000_000_000u64,
            "bytes_used": 1_610_612_736u64
        }))
        .unwrap()
    }

    #[test]
    fn the_table_has_flyctls_columns() {
        let mut free = volume();
        free.id = "vol_0000000000000000".parse().unwrap();
        free.attached_machine_id = None;
        free.host_status = Some(HostStatus::Unreachable);
        let text = table(&[volume(), free]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ID                      STATE     NAME   SIZE   REGION   ZONE    ENCRYPTED   ATTACHED VM      CREATED AT"
        );
        assert_eq!(
            lines[1],
            "vol_4yx0jvqe1x1dj7gr    created   data   3GB    local    host1   false       3d8d413b29d089   2026-01-02T03:04:05Z"
        );
        assert!(lines[2].starts_with("vol_0000000000000000*"), "{text}");
        assert!(lines[2].contains("   -   "), "{text}");
        assert_eq!(lines[3], "* These volumes' hosts could not be reached.");
        assert_eq!(table(&[]).lines().count(), 1);
    }

    #[test]
    fn details_align_labels_like_flyctl() {
        let text = details(&volume(), "web", true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "                  ID: vol_4yx0jvqe1x1dj7gr");
        assert_eq!(lines[2], "                 App: web");
        assert_eq!(lines[5], "             Size GB: 3");
        assert!(text.contains(" Scheduled snapshots: true\n"), "{text}");
        assert!(text.contains("         Attached VM: 3d8d413b29d089\n"), "{text}");
        assert!(
            text.contains("                Used: 1.5 GiB of 2.8 GiB\n"),
            "{text}"
        );
        assert!(!details(&volume(), "web", false).contains("Attached VM"));
    }

    fn snapshot(id: &str, created_at: &str, size: u64) -> VolumeSnapshot {
        VolumeSnapshot {
            id: id.parse().unwrap(),
            created_at: created_at.to_owned(),
            digest: "sha256:00".to_owned(),
            retention_days: 5,
            size,
            status: aloft_api::SNAPSHOT_CREATED.to_owned(),
            volume_size: 1 << 30,
        }
    }

    #[test]
    fn the_snapshot_table_has_flyctls_columns() {
        let text = snapshot_table(&[
            snapshot("vs_2b6lx0rq8ejzd3ky", "2026-01-02T03:04:05Z", 1_572_864),
            snapshot("vs_0000000000000000", "2026-01-01T03:04:05Z", 0),
        ]);
        assert_eq!(
            text,
            "ID                    STATUS    SIZE      CREATED AT             RETENTION DAYS\n\
             vs_2b6lx0rq8ejzd3ky   created   1.5 MiB   2026-01-02T03:04:05Z   5\n\
             vs_0000000000000000   created   0 B       2026-01-01T03:04:05Z   5\n"
        );
    }

    /// The grammar: flyctl's words and aliases, the volume id where flyctl takes it.
    #[test]
    fn snapshot_and_fork_commands_parse() {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: VolumesCommand,
        }
        let parse = |args: &[&str]| {
            <Cli as clap::Parser>::try_parse_from(std::iter::once("volumes").chain(args.iter().copied()))
                .map(|c| c.cmd)
        };
        for words in [["snapshots", "list"], ["snapshot", "ls"], ["snaps", "list"]] {
            let args = [words[0], words[1], "vol_4yx0jvqe1x1dj7gr", "-a", "web", "--json"];
            let Ok(VolumesCommand::Snapshots(SnapshotsCommand::List(l))) = parse(&args) else {
                panic!("{words:?}");
            };
            assert_eq!(l.id, "vol_4yx0jvqe1x1dj7gr");
            assert_eq!(l.app.app.as_deref(), Some("web"));
            assert!(l.json);
        }
        let Ok(VolumesCommand::Snapshots(SnapshotsCommand::Create(c))) =
            parse(&["snapshots", "create", "vol_4yx0jvqe1x1dj7gr"])
        else {
            panic!("snapshots create");
        };
        assert!(!c.json);
        assert!(
            parse(&["snapshots", "create"]).is_err(),
            "a volume id is required"
        );
        let Ok(VolumesCommand::Create(c)) = parse(&["create", "data", "--snapshot-id", "vs_1"]) else {
            panic!("create --snapshot-id");
        };
        assert_eq!(c.snapshot_id.as_deref(), Some("vs_1"));
        assert_eq!(
            c.size, None,
            "a restore is the snapshot's size unless told otherwise"
        );
        let Ok(VolumesCommand::Fork(f)) = parse(&[
            "fork",
            "vol_4yx0jvqe1x1dj7gr",
            "--name",
            "copy",
            "-r",
            "local",
            "--json",
        ]) else {
            panic!("fork");
        };
        assert_eq!(
            (f.id.as_str(), f.name.as_deref(), f.region.as_deref(), f.json),
            ("vol_4yx0jvqe1x1dj7gr", Some("copy"), Some("local"), true)
        );
    }

    #[test]
    fn sizes_ids_and_retention_are_checked() {
        assert_eq!(parse_size("10"), Ok(10));
        assert_eq!(parse_size(" 500 "), Ok(500));
        for bad in ["0", "501", "-1", "ten", "1.5", ""] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("1 to 500 GB"), "{bad}: {e}");
        }
        assert_eq!(parse_retention("60"), Ok(60));
        assert!(parse_retention("0").is_err());
        assert!(parse_retention("61").is_err());
        assert_eq!(
            parse_id("vol_4yx0jvqe1x1dj7gr", None).unwrap().as_str(),
            "vol_4yx0jvqe1x1dj7gr"
        );
        let e = parse_id("data", Some("web")).unwrap_err();
        let (message, hint, code) = crate::errors::describe(&e);
        assert!(message.starts_with("\"data\" is not a volume id"), "{message}");
        assert!(hint.unwrap().contains("aloft volumes list -a web"));
        assert_eq!(code, 2);
        assert_eq!(
            parse_snapshot_id(" vs_2b6lx0rq8ejzd3ky ", "web")
                .unwrap()
                .as_str(),
            "vs_2b6lx0rq8ejzd3ky"
        );
        for bad in ["vol_4yx0jvqe1x1dj7gr", "vs_", "VS_1", "snap"] {
            let e = parse_snapshot_id(bad, "web").unwrap_err();
            let (message, hint, code) = crate::errors::describe(&e);
            assert!(
                message.contains("is not a snapshot id: vs_ followed by"),
                "{message}"
            );
            assert_eq!(
                hint.as_deref(),
                Some("aloft volumes snapshots list VOLUME_ID -a web shows a volume's snapshots")
            );
            assert_eq!(code, 2);
        }
    }
}
