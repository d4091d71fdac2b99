//! `aloft machine …` (alias `m`): one machine at a time, through Fly's Machines API, with
//! flyctl's grammar and output.
//!
//! Verbs that change a machine's state (start, stop, restart, suspend, update, clone, run) are
//! accepted by aloftd before they are done; the CLI then waits for the state they lead to with a
//! spinner (`--detach` skips the wait). `--json` prints the API's objects.

mod render;
mod spec;

use std::time::Duration;

use aloft_api::{
    CreateAppRequest, CreateMachineRequest, ExecRequest, Machine, MachineState, Signal, StopRequest,
    StopSignal, UpdateMachineRequest, WaitState,
};
use aloft_client::{ClientError, ListMachinesParams, RestartParams, WaitParams};
use clap::{Args, Subcommand};

use crate::api::{AppArg, Subject, api_error, confirm, print_json};
use crate::context::Context;
use crate::errors::{SilentExit, UserError};
use crate::spinner::Spinner;

pub(crate) use spec::ConfigFlags;

/// How long `run`, `start`, `update` … wait for the machine by default.
const DEFAULT_WAIT: &str = "5m";

/// `aloft machine …`.
#[derive(Debug, Subcommand)]
pub(crate) enum MachineCommand {
    /// Create and start a machine running IMAGE (CMD replaces the image's command).
    Run(RunArgs),
    /// List the app's machines.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show a machine: its config summary and event log.
    Status(StatusArgs),
    /// Start machines.
    Start(VerbArgs),
    /// Stop machines (the stop signal, then a kill after the timeout).
    Stop(StopArgs),
    /// Restart machines.
    Restart(RestartArgs),
    /// Suspend machines (resume with start).
    Suspend(VerbArgs),
    /// Send SIGKILL to machines' workloads.
    Kill(IdsArgs),
    /// Destroy machines (a running one only with --force).
    #[command(visible_aliases = ["remove", "rm"])]
    Destroy(DestroyArgs),
    /// Change a machine's config (the whole config is replaced by the changed one).
    Update(UpdateArgs),
    /// Create a machine with another one's config.
    Clone(CloneArgs),
    /// Run a command in a started machine; exits with the command's exit code.
    Exec(ExecArgs),
    /// Take machines out of the proxy's pool.
    Cordon(IdsArgs),
    /// Put machines back into the proxy's pool.
    Uncordon(IdsArgs),
    /// Show or clear machines' leases.
    #[command(subcommand)]
    Leases(LeasesCommand),
    /// Wait for a machine to reach a state.
    Wait(WaitArgs),
}

/// `aloft machine leases …`.
#[derive(Debug, Subcommand)]
pub(crate) enum LeasesCommand {
    /// Show the leases held on machines (all of the app's when no ID is given).
    #[command(visible_alias = "list")]
    View(LeasesViewArgs),
    /// Release the leases held on machines (all of the app's when no ID is given).
    Clear(LeasesClearArgs),
}

/// How long to wait, and whether to.
#[derive(Debug, Clone, Args)]
pub(crate) struct WaitFlags {
    /// Return once aloftd accepted the request, without waiting for the machine.
    #[arg(short = 'd', long)]
    detach: bool,
    /// How long to wait for the machine (Go duration: 30s, 5m).
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_WAIT)]
    wait_timeout: String,
}

impl WaitFlags {
    fn timeout(&self) -> anyhow::Result<Duration> {
        parse_duration("--wait-timeout", &self.wait_timeout)
    }
}

/// `aloft machine run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The image to run (names without a registry resolve to the platform's).
    #[arg(value_name = "IMAGE")]
    image: String,
    /// The command (replaces the image's CMD).
    #[arg(value_name = "CMD", trailing_var_arg = true, allow_hyphen_values = true)]
    cmd: Vec<String>,
    #[command(flatten)]
    app: AppArg,
    /// The machine's name, unique in the app [default: generated].
    #[arg(short = 'n', long, value_name = "NAME")]
    name: Option<String>,
    /// The region [default: the server's].
    #[arg(short = 'r', long, value_name = "REGION")]
    region: Option<String>,
    /// The organization of the app, when run creates it.
    #[arg(short = 'o', long, value_name = "SLUG", default_value = crate::apps::DEFAULT_ORG)]
    org: String,
    /// Create the app if it does not exist without asking.
    #[arg(short = 'y', long)]
    yes: bool,
    #[command(flatten)]
    config: ConfigFlags,
    #[command(flatten)]
    wait: WaitFlags,
    /// Print the machine as JSON.
    #[arg(long)]
    json: bool,
}

/// `aloft machine list`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    app: AppArg,
    /// Only print machine ids, one a line.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Include destroyed machines.
    #[arg(long)]
    all: bool,
    /// Only machines in these states (repeatable or comma-separated).
    #[arg(long, value_name = "STATE", value_delimiter = ',')]
    state: Vec<String>,
    /// Only machines in this region.
    #[arg(short = 'r', long, value_name = "REGION")]
    region: Option<String>,
    /// Print the machines as JSON (the API's objects).
    #[arg(long)]
    json: bool,
}

/// `aloft machine status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The machine's id.
    #[arg(value_name = "ID")]
    id: String,
    #[command(flatten)]
    app: AppArg,
    /// Also print the machine's config as JSON.
    #[arg(short = 'd', long = "display-config")]
    display_config: bool,
    /// Print the machine as JSON (the API's object).
    #[arg(long)]
    json: bool,
}

/// Machines and an app.
#[derive(Debug, Args)]
pub(crate) struct IdsArgs {
    /// Machine ids.
    #[arg(value_name = "ID", required = true)]
    ids: Vec<String>,
    #[command(flatten)]
    app: AppArg,
}

/// A lifecycle verb on machines, then a wait.
#[derive(Debug, Args)]
pub(crate) struct VerbArgs {
    #[command(flatten)]
    ids: IdsArgs,
    #[command(flatten)]
    wait: WaitFlags,
}

/// `aloft machine stop`.
#[derive(Debug, Args)]
pub(crate) struct StopArgs {
    #[command(flatten)]
    verb: VerbArgs,
    /// The signal sent first (SIGINT, SIGTERM, …) [default: the machine's stop signal].
    #[arg(short = 's', long, value_name = "SIGNAL")]
    signal: Option<String>,
    /// How long to wait after the signal before killing (10s, or seconds).
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
}

/// `aloft machine restart`.
#[derive(Debug, Args)]
pub(crate) struct RestartArgs {
    #[command(flatten)]
    verb: VerbArgs,
    /// The signal sent first [default: the machine's stop signal].
    #[arg(short = 's', long, value_name = "SIGNAL")]
    signal: Option<String>,
    /// How long to wait after the signal before killing (10s, or seconds).
    #[arg(long, value_name = "DURATION")]
    time: Option<String>,
    /// Kill the machine right away instead of signalling it first.
    #[arg(long)]
    force: bool,
}

/// `aloft machine destroy`.
#[derive(Debug, Args)]
pub(crate) struct DestroyArgs {
    #[command(flatten)]
    ids: IdsArgs,
    /// Destroy running machines too (kills them).
    #[arg(short = 'f', long)]
    force: bool,
    #[command(flatten)]
    wait: WaitFlags,
}

/// `aloft machine update`.
#[derive(Debug, Args)]
pub(crate) struct UpdateArgs {
    /// The machine's id.
    #[arg(value_name = "ID")]
    id: String,
    #[command(flatten)]
    app: AppArg,
    /// A new image.
    #[arg(short = 'i', long, value_name = "IMAGE")]
    image: Option<String>,
    /// A new command (replaces the image's CMD; a command line, split like a shell would).
    #[arg(long, value_name = "COMMAND")]
    command: Option<String>,
    #[command(flatten)]
    config: ConfigFlags,
    /// Leave the machine stopped after the update.
    #[arg(long)]
    skip_start: bool,
    /// Don't ask for confirmation (required without a terminal).
    #[arg(short = 'y', long)]
    yes: bool,
    #[command(flatten)]
    wait: WaitFlags,
    /// Print the updated machine as JSON.
    #[arg(long)]
    json: bool,
}

/// `aloft machine clone`.
#[derive(Debug, Args)]
pub(crate) struct CloneArgs {
    /// The machine to copy.
    #[arg(value_name = "ID")]
    id: String,
    #[command(flatten)]
    app: AppArg,
    /// The new machine's region [default: the source's].
    #[arg(short = 'r', long, value_name = "REGION")]
    region: Option<String>,
    /// The new machine's name [default: generated].
    #[arg(short = 'n', long, value_name = "NAME")]
    name: Option<String>,
    /// Mount this volume in the clone, VOLUME_ID:/PATH or NAME:/PATH (an unattached volume of
    /// that name), as flyctl's flag does [default: the clone mounts none: the source's volume
    /// is the source's].
    #[arg(long = "attach-volume", value_name = "ID:PATH")]
    attach_volume: Option<String>,
    #[command(flatten)]
    wait: WaitFlags,
    /// Print the new machine as JSON.
    #[arg(long)]
    json: bool,
}

/// `aloft machine exec`.
#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// The machine's id.
    #[arg(value_name = "ID")]
    id: String,
    /// The command: one argument is split like a shell would ("ls -l /"), several are the argv.
    #[arg(
        value_name = "CMD",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    cmd: Vec<String>,
    #[command(flatten)]
    app: AppArg,
    /// Seconds before the command is killed.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// Print the result (exit code, stdout, stderr) as JSON.
    #[arg(long)]
    json: bool,
}

/// `aloft machine leases view`.
#[derive(Debug, Args)]
pub(crate) struct LeasesViewArgs {
    /// Machine ids [default: all of the app's].
    #[arg(value_name = "ID")]
    ids: Vec<String>,
    #[command(flatten)]
    app: AppArg,
    /// Print the leases as JSON (`{machine id: lease}`).
    #[arg(long)]
    json: bool,
}

/// `aloft machine leases clear`.
#[derive(Debug, Args)]
pub(crate) struct LeasesClearArgs {
    /// Machine ids [default: all of the app's].
    #[arg(value_name = "ID")]
    ids: Vec<String>,
    #[command(flatten)]
    app: AppArg,
}

/// `aloft machine wait`.
#[derive(Debug, Args)]
pub(crate) struct WaitArgs {
    /// The machine's id.
    #[arg(value_name = "ID")]
    id: String,
    #[command(flatten)]
    app: AppArg,
    /// The state to wait for: started, stopped, suspended, destroyed, failed or settled.
    #[arg(long, value_name = "STATE", default_value = "settled")]
    state: String,
    /// How long to wait (Go duration: 30s, 5m).
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_WAIT)]
    wait_timeout: String,
    /// Print the wait's answer as JSON.
    #[arg(long)]
    json: bool,
}

/// A client, its settings and the app it acts on.
type Target = crate::api::AppTarget;

impl Target {
    fn err(&self, id: &str) -> impl Fn(ClientError) -> anyhow::Error + '_ {
        let id = id.to_owned();
        move |e| {
            api_error(
                e,
                &self.settings,
                Subject::Machine {
                    app: &self.app,
                    id: &id,
                },
            )
        }
    }

    async fn get(&self, id: &str) -> anyhow::Result<Machine> {
        self.client.machine_get(&self.app, id).await.map_err(self.err(id))
    }

    /// Waits for one of `states` with a spinner saying `what`; the state reached. `version` and
    /// `from_event_id` scope the wait to one version and to later events.
    async fn wait(
        &self,
        id: &str,
        states: &[WaitState],
        scope: Scope<'_>,
        timeout: Duration,
        what: &str,
    ) -> anyhow::Result<MachineState> {
        let spinner = Spinner::start(what);
        let params = WaitParams {
            states: states.to_vec(),
            version: scope.version.filter(|v| !v.is_empty()).map(str::to_owned),
            from_event_id: scope.from_event_id.filter(|e| !e.is_empty()).map(str::to_owned),
        };
        let deadline = std::time::Instant::now() + timeout;
        let result = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.client.machine_wait_for(&self.app, id, &params, left).await {
                // Right after an update, the new version may not be recorded yet: like flyctl,
                // try again shortly.
                Err(e) if is_unrecorded_version(&e) && left > VERSION_RETRY => {
                    std::thread::sleep(VERSION_RETRY);
                }
                other => break other,
            }
        };
        match result {
            Ok(reached) => {
                spinner.finish(true);
                Ok(reached.state)
            }
            Err(e) if e.is_wait_timeout() => {
                spinner.finish(false);
                Err(UserError {
                    message: format!(
                        "machine {id} did not reach {} within {}",
                        states_text(states),
                        humantime(timeout)
                    ),
                    hint: Some(format!(
                        "aloft machine status {id} -a {} shows its state and events; wait longer with \
                         --wait-timeout",
                        self.app
                    )),
                    code: 1,
                }
                .into())
            }
            Err(e) => {
                spinner.finish(false);
                Err(self.err(id)(e))
            }
        }
    }
}

/// What a wait counts: one version, events after one.
#[derive(Debug, Clone, Copy, Default)]
struct Scope<'a> {
    version: Option<&'a str>,
    from_event_id: Option<&'a str>,
}

impl<'a> Scope<'a> {
    fn version(version: &'a str) -> Self {
        Self {
            version: Some(version),
            from_event_id: None,
        }
    }
}

/// Pause before asking again about a version the server does not know yet.
const VERSION_RETRY: Duration = Duration::from_millis(250);

/// A 404 about the version a wait named (the machine itself exists).
fn is_unrecorded_version(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { status: 404, message } if message.contains("has no version"))
}

fn states_text(states: &[WaitState]) -> String {
    let names: Vec<String> = states
        .iter()
        .map(|s| {
            serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        })
        .collect();
    names.join(" or ")
}

fn humantime(d: Duration) -> String {
    aloft_api::Duration::from(d).to_string()
}

/// A Go duration (`10s`, `1m30s`) or whole seconds.
fn parse_duration(flag: &str, text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    text.parse::<aloft_api::Duration>()
        .map(aloft_api::Duration::get)
        .map_err(|e| {
            UserError {
                message: format!("invalid {flag} {text:?}: {e}"),
                hint: Some(format!("e.g. {flag} 30s, {flag} 5m or {flag} 90")),
                code: 2,
            }
            .into()
        })
}

fn parse_stop_signal(text: &str) -> anyhow::Result<StopSignal> {
    StopSignal::parse(text).ok_or_else(|| {
        UserError {
            message: format!("invalid --signal {text:?}"),
            hint: Some("use SIGINT, SIGTERM, SIGQUIT, SIGHUP, SIGKILL, SIGUSR1 or SIGUSR2".to_owned()),
            code: 2,
        }
        .into()
    })
}

fn parse_wait_state(text: &str) -> anyhow::Result<WaitState> {
    WaitState::parse(&text.trim().to_ascii_lowercase()).ok_or_else(|| {
        UserError {
            message: format!("invalid --state {text:?}"),
            hint: Some("use started, stopped, suspended, destroyed, failed or settled".to_owned()),
            code: 2,
        }
        .into()
    })
}

pub(crate) async fn run(ctx: &Context, cmd: MachineCommand) -> anyhow::Result<()> {
    match cmd {
        MachineCommand::Run(args) => run_machine(ctx, args).await,
        MachineCommand::List(args) => list(ctx, args).await,
        MachineCommand::Status(args) => status(ctx, args).await,
        MachineCommand::Start(args) => start(ctx, args).await,
        MachineCommand::Stop(args) => stop(ctx, args).await,
        MachineCommand::Restart(args) => restart(ctx, args).await,
        MachineCommand::Suspend(args) => suspend(ctx, args).await,
        MachineCommand::Kill(args) => {
            let t = Target::new(ctx, &args.app)?;
            for id in &args.ids {
                t.client
                    .machine_signal(&t.app, id, Signal::SIGKILL)
                    .await
                    .map_err(t.err(id))?;
                println!("Sent SIGKILL to machine {id}");
            }
            Ok(())
        }
        MachineCommand::Destroy(args) => destroy(ctx, args).await,
        MachineCommand::Update(args) => update(ctx, args).await,
        MachineCommand::Clone(args) => clone(ctx, args).await,
        MachineCommand::Exec(args) => exec(ctx, args).await,
        MachineCommand::Cordon(args) => {
            let t = Target::new(ctx, &args.app)?;
            for id in &args.ids {
                t.client.machine_cordon(&t.app, id).await.map_err(t.err(id))?;
                println!("Cordoned machine {id}: the proxy no longer routes to it");
            }
            Ok(())
        }
        MachineCommand::Uncordon(args) => {
            let t = Target::new(ctx, &args.app)?;
            for id in &args.ids {
                t.client.machine_uncordon(&t.app, id).await.map_err(t.err(id))?;
                println!("Uncordoned machine {id}: the proxy routes to it again");
            }
            Ok(())
        }
        MachineCommand::Leases(LeasesCommand::View(args)) => leases_view(ctx, args).await,
        MachineCommand::Leases(LeasesCommand::Clear(args)) => leases_clear(ctx, args).await,
        MachineCommand::Wait(args) => wait(ctx, args).await,
    }
}

/// A destroy's error; a 412 (the machine runs) says how to get past it.
fn destroy_error(t: &Target, id: &str, e: ClientError) -> anyhow::Error {
    let running = matches!(&e, ClientError::Api { status: 412, .. });
    let err = t.err(id)(e);
    if running {
        match err.downcast::<UserError>() {
            Ok(mut user) => {
                user.hint = Some(format!(
                    "stop it first (aloft machine stop {id}) or destroy it with --force"
                ));
                user.into()
            }
            Err(err) => err,
        }
    } else {
        err
    }
}

async fn destroy(ctx: &Context, args: DestroyArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.ids.app)?;
    let timeout = args.wait.timeout()?;
    for id in &args.ids.ids {
        t.client
            .machine_delete(&t.app, id, args.force)
            .await
            .map_err(|e| destroy_error(&t, id, e))?;
        if !args.wait.detach {
            let what = format!("Waiting for machine {id} to be destroyed");
            match t
                .wait(id, &[WaitState::Destroyed], Scope::default(), timeout, &what)
                .await
            {
                Ok(_) => {}
                // Gone already.
                Err(e) if crate::errors::describe(&e).2 == crate::errors::EXIT_NOT_FOUND => {}
                Err(e) => return Err(e),
            }
        }
        println!("Destroyed machine {id}");
    }
    Ok(())
}

/// `--volume NAME:/PATH` as flyctl takes it: NAME becomes the id of an unattached volume of that
/// name (the oldest) in `region` (any region when `None`: aloftd places the machine in its
/// own). Entries naming an id, or malformed ones (left to [`spec::parse_volume`] to explain),
/// are kept as they are.
async fn volume_names_to_ids(t: &Target, specs: &mut [String], region: Option<&str>) -> anyhow::Result<()> {
    for spec in specs.iter_mut() {
        let Some((name, path)) = spec.trim().split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.parse::<aloft_api::VolumeId>().is_ok() || aloft_api::validate_volume_name(name).is_err() {
            continue;
        }
        let volumes = t.client.volumes_list(&t.app).await.map_err(t.app_err())?;
        let free = volumes.iter().find(|v| {
            v.name == name
                && v.attached_machine_id.is_none()
                && v.state == aloft_api::VolumeState::Created
                && region.is_none_or(|r| v.region == r)
        });
        let Some(v) = free else {
            let place = region.map(|r| format!(" in region {r}")).unwrap_or_default();
            return Err(UserError {
                message: format!("app {} has no unattached volume named {name}{place}", t.app),
                hint: Some(format!(
                    "create one with aloft volumes create {name} -a {}, or give a volume id (aloft volumes list)",
                    t.app
                )),
                code: 1,
            }
            .into());
        };
        *spec = format!("{}:{path}", v.id);
    }
    Ok(())
}

async fn run_machine(ctx: &Context, args: RunArgs) -> anyhow::Result<()> {
    let mut args = args;
    let t = Target::new(ctx, &args.app)?;
    let timeout = args.wait.timeout()?;
    volume_names_to_ids(&t, &mut args.config.volumes, args.region.as_deref()).await?;
    let config = spec::run_config(&args.image, &args.cmd, &args.config)?;
    if let Some(name) = &args.name {
        aloft_api::validate_machine_name(name).map_err(|e| UserError {
            message: e.message().to_owned(),
            hint: None,
            code: 2,
        })?;
    }
    ensure_app(&t, &args.org, args.yes).await?;
    let request = CreateMachineRequest {
        config,
        name: args.name,
        region: args.region,
        ..CreateMachineRequest::default()
    };
    let machine = t
        .client
        .machine_create(&t.app, &request)
        .await
        .map_err(t.app_err())?;
    let id = machine.id.to_string();
    if !args.json {
        println!(
            "Success! A machine has been successfully launched in app {}",
            t.app
        );
        println!(" Machine ID: {id}");
        println!(" Instance ID: {}", machine.instance_id);
        println!(" State: {}", machine.state);
    }
    let mut machine = machine;
    if !args.wait.detach {
        // A one-off command may have started and ended already: any of these ends the wait.
        let states = [
            WaitState::Started,
            WaitState::Stopped,
            WaitState::Failed,
            WaitState::Destroyed,
        ];
        let reached = t
            .wait(
                &id,
                &states,
                Scope::version(&machine.instance_id),
                timeout,
                &format!("Waiting for machine {id} to start"),
            )
            .await?;
        match reached {
            MachineState::Started => {
                if !args.json {
                    println!("Machine started, you can connect via the following private ip");
                    println!("  {}", machine.private_ip);
                }
            }
            MachineState::Failed => {
                return Err(UserError {
                    message: format!("machine {id} failed to start"),
                    hint: Some(format!(
                        "aloft machine status {id} -a {app} and aloft logs -a {app} --machine {id} --no-tail say why",
                        app = t.app
                    )),
                    code: 1,
                }
                .into());
            }
            other => {
                if !args.json {
                    println!("Machine {id} ran and is now {other}");
                }
            }
        }
        if args.json {
            machine = match t.client.machine_get(&t.app, &id).await {
                Ok(m) => m,
                // Destroyed (--rm) and gone: the created machine is what there is to print.
                Err(e) if e.is_not_found() => machine,
                Err(e) => return Err(t.err(&id)(e)),
            };
        }
    }
    if args.json {
        print_json(&machine)?;
    }
    Ok(())
}

/// Makes sure the app exists; creates it (asking first unless `yes`) when it does not, as
/// flyctl's `machine run` offers to.
async fn ensure_app(t: &Target, org: &str, yes: bool) -> anyhow::Result<()> {
    match t.client.app_get(&t.app).await {
        Ok(_) => return Ok(()),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(t.app_err()(e)),
    }
    let app = &t.app;
    let question = format!("App {app} does not exist. Create it in organization {org}?");
    let refusal = format!("not creating app {app}");
    let hint = format!("create it with aloft apps create {app}, or pass --yes to let machine run create it");
    if !yes && !confirm(&question, &refusal, &hint)? {
        return Err(UserError {
            message: format!("app {app} not found"),
            hint: Some(format!("aloft apps create {app}")),
            code: crate::errors::EXIT_NOT_FOUND,
        }
        .into());
    }
    let request = CreateAppRequest {
        name: app.clone(),
        org_slug: org.to_owned(),
        ..CreateAppRequest::default()
    };
    t.client
        .app_create(&request)
        .await
        .map_err(|e| api_error(e, &t.settings, Subject::None))?;
    eprintln!("Created app {app} in organization {org}");
    Ok(())
}

async fn list(ctx: &Context, args: ListArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.app)?;
    let states = args
        .state
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim().parse::<MachineState>().map_err(|e| {
                anyhow::Error::new(UserError {
                    message: e.to_string(),
                    hint: Some("e.g. --state started,stopped".to_owned()),
                    code: 2,
                })
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let params = ListMachinesParams {
        include_deleted: args.all,
        region: args.region,
        states,
        ..ListMachinesParams::default()
    };
    let mut machines = t
        .client
        .machines_list(&t.app, &params)
        .await
        .map_err(t.app_err())?;
    machines.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
    if args.json {
        return print_json(&machines);
    }
    if args.quiet {
        for m in &machines {
            println!("{}", m.id);
        }
        return Ok(());
    }
    if machines.is_empty() {
        println!("No machines are available on this app {}", t.app);
        return Ok(());
    }
    let n = machines.len();
    println!(
        "{n} machine{} ha{} been retrieved from app {}.\n",
        if n == 1 { "" } else { "s" },
        if n == 1 { "s" } else { "ve" },
        t.app
    );
    print!("{}", render::list_table(&machines));
    Ok(())
}

async fn status(ctx: &Context, args: StatusArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.app)?;
    let mut machine = t.get(&args.id).await?;
    if machine.events.is_empty() {
        // Some servers leave events out of the machine; ask for them.
        if let Ok(events) = t.client.machine_events(&t.app, &args.id, None).await {
            machine.events = events;
        }
    }
    if args.json {
        return print_json(&machine);
    }
    print!("{}", render::status(&machine));
    if args.display_config {
        println!("\nConfig:");
        let config = machine.config.as_ref().or(machine.incomplete_config.as_ref());
        println!("{}", serde_json::to_string_pretty(&config)?);
    }
    Ok(())
}

async fn start(ctx: &Context, args: VerbArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.ids.app)?;
    let timeout = args.wait.timeout()?;
    for id in &args.ids.ids {
        t.client.machine_start(&t.app, id).await.map_err(t.err(id))?;
        if !args.wait.detach {
            let states = [WaitState::Started, WaitState::Failed];
            let reached = t
                .wait(
                    id,
                    &states,
                    Scope::default(),
                    timeout,
                    &format!("Waiting for machine {id} to start"),
                )
                .await?;
            if reached == MachineState::Failed {
                return Err(failed(&t, id, "start"));
            }
        }
        println!("{id} has been started");
    }
    Ok(())
}

fn failed(t: &Target, id: &str, verb: &str) -> anyhow::Error {
    UserError {
        message: format!("machine {id} failed to {verb}"),
        hint: Some(format!("aloft machine status {id} -a {} shows its events", t.app)),
        code: 1,
    }
    .into()
}

async fn stop(ctx: &Context, args: StopArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.verb.ids.app)?;
    let wait_timeout = args.verb.wait.timeout()?;
    let request = StopRequest {
        signal: args.signal.as_deref().map(parse_stop_signal).transpose()?,
        timeout: args
            .timeout
            .as_deref()
            .map(|t| parse_duration("--timeout", t))
            .transpose()?
            .map(aloft_api::Duration::from),
    };
    for id in &args.verb.ids.ids {
        t.client
            .machine_stop(&t.app, id, &request)
            .await
            .map_err(t.err(id))?;
        if !args.verb.wait.detach {
            let states = [WaitState::Stopped, WaitState::Failed, WaitState::Destroyed];
            t.wait(
                id,
                &states,
                Scope::default(),
                wait_timeout,
                &format!("Waiting for machine {id} to stop"),
            )
            .await?;
        }
        println!("{id} has been stopped");
    }
    Ok(())
}

async fn restart(ctx: &Context, args: RestartArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.verb.ids.app)?;
    let wait_timeout = args.verb.wait.timeout()?;
    let params = RestartParams {
        signal: args.signal.as_deref().map(parse_stop_signal).transpose()?,
        timeout: args
            .time
            .as_deref()
            .map(|t| parse_duration("--time", t))
            .transpose()?,
        force_stop: args.force,
    };
    for id in &args.verb.ids.ids {
        let before = t.get(id).await?;
        t.client
            .machine_restart(&t.app, id, &params)
            .await
            .map_err(t.err(id))?;
        if !args.verb.wait.detach {
            let states = [WaitState::Started, WaitState::Failed];
            let reached = t
                .wait(
                    id,
                    &states,
                    Scope {
                        version: None,
                        // The machine is still started when the restart is accepted: only what
                        // happens after it counts.
                        from_event_id: before.events.first().map(|e| e.id.as_str()),
                    },
                    wait_timeout,
                    &format!("Waiting for machine {id} to restart"),
                )
                .await?;
            if reached == MachineState::Failed {
                return Err(failed(&t, id, "restart"));
            }
        }
        println!("{id} has been restarted");
    }
    Ok(())
}

async fn suspend(ctx: &Context, args: VerbArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.ids.app)?;
    let timeout = args.wait.timeout()?;
    for id in &args.ids.ids {
        t.client.machine_suspend(&t.app, id).await.map_err(t.err(id))?;
        if !args.wait.detach {
            // Suspension falls back to a stop where it is impossible.
            let states = [WaitState::Suspended, WaitState::Stopped, WaitState::Failed];
            t.wait(
                id,
                &states,
                Scope::default(),
                timeout,
                &format!("Waiting for machine {id} to suspend"),
            )
            .await?;
        }
        println!("{id} has been suspended");
    }
    Ok(())
}

async fn update(ctx: &Context, args: UpdateArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.app)?;
    let timeout = args.wait.timeout()?;
    let machine = t.get(&args.id).await?;
    let Some(old) = machine.config.clone() else {
        return Err(UserError {
            message: format!(
                "aloftd did not send machine {}'s config (is its host reachable?)",
                args.id
            ),
            hint: Some("try again once aloft machine status shows it".to_owned()),
            code: 1,
        }
        .into());
    };
    let mut new = old.clone();
    if let Some(image) = args.image.as_deref().map(str::trim).filter(|i| !i.is_empty()) {
        new.image = Some(image.to_owned());
    }
    let cmd = match &args.command {
        Some(command) => shlex::split(command).ok_or_else(|| UserError {
            message: format!("invalid --command {command:?}: unbalanced quotes"),
            hint: Some("quote it like a shell command line".to_owned()),
            code: 2,
        })?,
        None => Vec::new(),
    };
    let mut flags = args.config.clone();
    volume_names_to_ids(&t, &mut flags.volumes, Some(&machine.region)).await?;
    spec::apply(&mut new, &flags, &cmd)?;
    let diff = render::config_diff(&old, &new);
    if diff.is_empty() && !args.skip_start {
        eprintln!("No changes to apply to machine {}", args.id);
        if args.json {
            print_json(&machine)?;
        }
        return Ok(());
    }
    if !args.json {
        eprintln!(
            "Configuration changes to be applied to machine {} ({}):\n",
            args.id, machine.name
        );
        eprintln!("{diff}");
    }
    let question = format!("Apply changes to machine {}?", args.id);
    let refusal = format!("not updating machine {}", args.id);
    let hint = format!("aloft machine update {} --yes …", args.id);
    if !args.yes && !confirm(&question, &refusal, &hint)? {
        eprintln!("Not updating machine {}", args.id);
        return Ok(());
    }
    let was_running = machine.state == MachineState::Started;
    let request = UpdateMachineRequest {
        config: new,
        current_version: Some(machine.instance_id.clone()).filter(|v| !v.is_empty()),
        skip_launch: args.skip_start.then_some(true),
        ..UpdateMachineRequest::default()
    };
    let updated = t
        .client
        .machine_update(&t.app, &args.id, &request)
        .await
        .map_err(t.err(&args.id))?;
    if !args.json {
        println!("Machine {} updated to version {}", args.id, updated.instance_id);
    }
    let mut updated = updated;
    if !args.wait.detach && was_running && !args.skip_start {
        let states = [WaitState::Started, WaitState::Failed];
        let reached = t
            .wait(
                &args.id,
                &states,
                Scope::version(&updated.instance_id),
                timeout,
                &format!("Waiting for machine {} to start", args.id),
            )
            .await?;
        if reached == MachineState::Failed {
            return Err(failed(&t, &args.id, "start after the update"));
        }
        updated = t.get(&args.id).await?;
    }
    if args.json {
        print_json(&updated)?;
    } else if !was_running && !args.skip_start {
        println!(
            "Machine {} was not started before the update, so it stays {}",
            args.id, updated.state
        );
    }
    Ok(())
}

async fn clone(ctx: &Context, args: CloneArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.app)?;
    let timeout = args.wait.timeout()?;
    let source = t.get(&args.id).await?;
    let Some(mut config) = source.config.clone() else {
        return Err(UserError {
            message: format!("aloftd did not send machine {}'s config", args.id),
            hint: None,
            code: 1,
        }
        .into());
    };
    let region = Some(args.region.unwrap_or_else(|| source.region.clone())).filter(|r| !r.is_empty());
    if let Some(spec) = args.attach_volume {
        let mut specs = [spec];
        volume_names_to_ids(&t, &mut specs, region.as_deref()).await?;
        let [spec] = specs;
        config.mounts = vec![spec::parse_volume(&spec)?];
    } else if !config.mounts.is_empty() {
        // A volume belongs to one machine: the clone gets none unless it is given one.
        let mount = &config.mounts[0];
        let copy = match (mount.volume.as_deref(), mount.path.as_deref()) {
            (Some(vol), Some(path)) => format!(
                "; for a copy of its data: aloft volumes fork {vol} -a {}, then --attach-volume NEW_ID:{path}",
                t.app
            ),
            _ => String::new(),
        };
        eprintln!(
            "warning: machine {} has a volume; the clone is created without one (give it one with --attach-volume ID:/PATH or NAME:/PATH{copy})",
            args.id
        );
        config.mounts.clear();
    }
    let request = CreateMachineRequest {
        config,
        name: args.name,
        region,
        ..CreateMachineRequest::default()
    };
    let machine = t
        .client
        .machine_create(&t.app, &request)
        .await
        .map_err(t.app_err())?;
    let id = machine.id.to_string();
    if !args.json {
        println!("Cloned machine {} into {id} ({})", args.id, machine.name);
    }
    let mut machine = machine;
    if !args.wait.detach {
        let states = [
            WaitState::Started,
            WaitState::Stopped,
            WaitState::Failed,
            WaitState::Destroyed,
        ];
        let reached = t
            .wait(
                &id,
                &states,
                Scope::version(&machine.instance_id),
                timeout,
                &format!("Waiting for machine {id} to start"),
            )
            .await?;
        if reached == MachineState::Failed {
            return Err(failed(&t, &id, "start"));
        }
        if args.json {
            machine = t.get(&id).await?;
        } else {
            println!("Machine {id} is {reached}");
        }
    }
    if args.json {
        print_json(&machine)?;
    }
    Ok(())
}

/// The argv of `exec`: one argument is a command line, several are the argv as given.
fn exec_argv(cmd: &[String]) -> anyhow::Result<Vec<String>> {
    let argv = match cmd {
        [line] => shlex::split(line).ok_or_else(|| UserError {
            message: format!("invalid command {line:?}: unbalanced quotes"),
            hint: Some(
                "quote it like a shell command line, or pass the arguments separately after --".to_owned(),
            ),
            code: 2,
        })?,
        _ => cmd.to_vec(),
    };
    if argv.first().is_none_or(String::is_empty) {
        return Err(UserError {
            message: "no command to run".to_owned(),
            hint: Some("aloft machine exec ID -- ls -l /".to_owned()),
            code: 2,
        }
        .into());
    }
    Ok(argv)
}

/// The exit code the CLI passes on: the command's, or 128 + the signal that killed it.
fn exec_exit_code(exit_code: i32, exit_signal: i32) -> u8 {
    let code = if exit_signal > 0 {
        128 + exit_signal
    } else {
        exit_code
    };
    u8::try_from(code.clamp(0, 255)).unwrap_or(1)
}

async fn exec(ctx: &Context, args: ExecArgs) -> anyhow::Result<()> {
    let argv = exec_argv(&args.cmd)?;
    let t = Target::new(ctx, &args.app)?;
    let request = ExecRequest {
        command: argv,
        timeout: args.timeout,
        ..ExecRequest::default()
    };
    let result = t
        .client
        .machine_exec(&t.app, &args.id, &request)
        .await
        .map_err(t.err(&args.id))?;
    if args.json {
        return print_json(&result);
    }
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        out.write_all(result.stdout.as_bytes())?;
        out.flush()?;
        let mut err = std::io::stderr().lock();
        err.write_all(result.stderr.as_bytes())?;
        err.flush()?;
    }
    match exec_exit_code(result.exit_code, result.exit_signal) {
        0 => Ok(()),
        code => Err(SilentExit(code).into()),
    }
}

/// The machines named, else all of the app's.
async fn ids_or_all(t: &Target, ids: &[String]) -> anyhow::Result<Vec<String>> {
    if !ids.is_empty() {
        return Ok(ids.to_vec());
    }
    let machines = t
        .client
        .machines_list(&t.app, &ListMachinesParams::default())
        .await
        .map_err(t.app_err())?;
    Ok(machines.into_iter().map(|m| m.id.to_string()).collect())
}

async fn leases_view(ctx: &Context, args: LeasesViewArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.app)?;
    let mut leases = Vec::new();
    for id in ids_or_all(&t, &args.ids).await? {
        match t.client.lease_get(&t.app, &id).await {
            Ok(lease) => leases.push((id, lease)),
            // No lease, or a machine that went away meanwhile.
            Err(e) if e.is_not_found() && args.ids.is_empty() => {}
            Err(e) if e.is_not_found() => {
                // Tell an unknown machine from one without a lease.
                t.get(&id).await?;
            }
            Err(e) => return Err(t.err(&id)(e)),
        }
    }
    if args.json {
        let map: std::collections::BTreeMap<&str, &aloft_api::LeaseEnvelope> =
            leases.iter().map(|(id, l)| (id.as_str(), l)).collect();
        return print_json(&map);
    }
    if leases.is_empty() {
        println!("No leases are held on the machines of app {}", t.app);
    } else {
        print!("{}", render::leases_table(&leases));
    }
    Ok(())
}

async fn leases_clear(ctx: &Context, args: LeasesClearArgs) -> anyhow::Result<()> {
    let t = Target::new(ctx, &args.app)?;
    for id in ids_or_all(&t, &args.ids).await? {
        let lease = match t.client.lease_get(&t.app, &id).await {
            Ok(lease) => lease,
            Err(e) if e.is_not_found() => {
                if !args.ids.is_empty() {
                    t.get(&id).await?;
                    println!("Machine {id} holds no lease");
                }
                continue;
            }
            Err(e) => return Err(t.err(&id)(e)),
        };
        t.client
            .lease_release(&t.app, &id, &lease.data.nonce)
            .await
            .map_err(t.err(&id))?;
        println!("Cleared the lease on machine {id} (held by {})", lease.data.owner);
    }
    Ok(())
}

async fn wait(ctx: &Context, args: WaitArgs) -> anyhow::Result<()> {
    let state = parse_wait_state(&args.state)?;
    let timeout = parse_duration("--wait-timeout", &args.wait_timeout)?;
    let t = Target::new(ctx, &args.app)?;
    let params = WaitParams::state(state);
    let spinner = Spinner::start(&format!(
        "Waiting for machine {} to be {}",
        args.id,
        args.state.trim()
    ));
    let result = t
        .client
        .machine_wait_for(&t.app, &args.id, &params, timeout)
        .await;
    spinner.finish(result.is_ok());
    match result {
        Ok(reached) if args.json => print_json(&reached),
        Ok(reached) => {
            println!("Machine {} is {}", args.id, reached.state);
            Ok(())
        }
        Err(e) if e.is_wait_timeout() => Err(UserError {
            message: format!(
                "machine {} did not become {} within {}",
                args.id,
                args.state.trim(),
                humantime(timeout)
            ),
            hint: Some("wait longer with --wait-timeout".to_owned()),
            code: 1,
        }
        .into()),
        Err(e) => Err(t.err(&args.id)(e)),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: MachineCommand,
    }

    fn parse(args: &[&str]) -> MachineCommand {
        Cli::try_parse_from(std::iter::once("m").chain(args.iter().copied()))
            .unwrap()
            .cmd
    }

    #[test]
    fn run_takes_flyctls_flags_and_the_command_after_the_image() {
        let MachineCommand::Run(run) = parse(&[
            "run",
            "-a",
            "web",
            "-p",
            "80:8080/tcp:http",
            "-e",
            "A=1",
            "--region",
            "local",
            "--name",
            "one",
            "--vm-cpus",
            "2",
            "--vm-memory",
            "512",
            "--restart",
            "on-fail",
            "--metadata",
            "k=v",
            "--entrypoint",
            "/bin/sh -c",
            "--detach",
            "busybox",
            "echo",
            "-n",
            "hi",
        ]) else {
            panic!("not run");
        };
        assert_eq!(run.image, "busybox");
        assert_eq!(run.cmd, ["echo", "-n", "hi"]);
        assert_eq!(run.app.app.as_deref(), Some("web"));
        assert_eq!(run.config.ports, ["80:8080/tcp:http"]);
        assert_eq!(run.config.vm_cpus, Some(2));
        assert!(run.wait.detach);
        let config = spec::run_config(&run.image, &run.cmd, &run.config).unwrap();
        assert_eq!(config.init.unwrap().cmd, ["echo", "-n", "hi"]);
        assert_eq!(config.metadata["k"], "v");
    }

    #[test]
    fn exec_argv_splits_one_line_and_keeps_several_args() {
        assert_eq!(exec_argv(&["ls -l '/a b'".into()]).unwrap(), ["ls", "-l", "/a b"]);
        assert_eq!(
            exec_argv(&["ls".into(), "-l".into(), "/a b".into()]).unwrap(),
            ["ls", "-l", "/a b"]
        );
        assert!(exec_argv(&["'oops".into()]).is_err());
        assert!(exec_argv(&[String::new()]).is_err());
        let MachineCommand::Exec(exec) = parse(&["exec", "3d8d413b29d089", "-a", "web", "--", "ls", "-l"])
        else {
            panic!("not exec");
        };
        assert_eq!(exec.cmd, ["ls", "-l"]);
    }

    #[test]
    fn exec_exit_codes_pass_through() {
        assert_eq!(exec_exit_code(0, 0), 0);
        assert_eq!(exec_exit_code(3, 0), 3);
        assert_eq!(exec_exit_code(0, 9), 137);
        assert_eq!(exec_exit_code(300, 0), 255);
        assert_eq!(exec_exit_code(-1, 0), 0);
    }

    #[test]
    fn durations_signals_and_states() {
        assert_eq!(parse_duration("--t", "90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("--t", "1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("--t", "soon").is_err());
        assert_eq!(parse_stop_signal("term").unwrap(), StopSignal::SIGTERM);
        assert!(parse_stop_signal("SIGSEGV").is_err());
        assert_eq!(parse_wait_state("Stopped").unwrap(), WaitState::Stopped);
        assert!(parse_wait_state("running").is_err());
        assert_eq!(
            states_text(&[WaitState::Started, WaitState::Failed]),
            "started or failed"
        );
    }

    #[test]
    fn aliases_and_id_lists() {
        let MachineCommand::Destroy(d) = parse(&["rm", "a", "b", "-f"]) else {
            panic!("not destroy");
        };
        assert_eq!(d.ids.ids, ["a", "b"]);
        assert!(d.force);
        assert!(matches!(parse(&["ls", "--json"]), MachineCommand::List(l) if l.json));
        assert!(matches!(
            parse(&["leases", "view", "--json"]),
            MachineCommand::Leases(LeasesCommand::View(v)) if v.json && v.ids.is_empty()
        ));
        assert!(Cli::try_parse_from(["m", "start"]).is_err(), "an id is required");
    }
}
