//! `aloft proxy LOCAL[:REMOTE] [REMOTE_HOST]`: flyctl's `fly proxy`, a local port that reaches a
//! port of a machine (a database, an admin port the app does not publish).
//!
//! There is no WireGuard underneath (flyctl dials the machine's 6PN address over its tunnel):
//! every local connection becomes one request to aloftd, `GET …/machines/{id}/proxy?port=R`
//! upgraded to the raw TCP stream ([`aloft_client::Client::proxy`]), and aloftd connects to the
//! machine's private address. The app must listen there (`[::]` or `fly-local-6pn`), not only on
//! its loopback.
//!
//! Decisions (flyctl's where it has one):
//! - **Ports**: `LOCAL[:REMOTE]`, REMOTE defaulting to LOCAL; LOCAL `0` takes a free port (and
//!   then REMOTE must be given). The line printed says the port actually bound.
//! - **The machine**: REMOTE_HOST is a machine id, `ID.vm.APP.internal`, `APP.internal` (the
//!   default target, as flyctl's is), a machine's name or its private address; without one,
//!   `-s/--select` asks on the terminal which of the app's started machines (as `ssh console
//!   -s`), else the first started one, said on stderr. A host name that names an app acts on
//!   that app (`-a` naming another is a usage error).
//! - **Pre-flight**: the machine must exist and be started before anything listens (a clear
//!   error otherwise). The port itself is not probed: a probe would be a connection the app sees;
//!   a refused port is reported on each local connection instead, as flyctl does.
//! - **Connections**: each accepted one opens its own upgrade and is copied both ways until both
//!   directions ended (each end passed on as a half-close). A failed one prints aloftd's message
//!   on stderr (with a hint) and the proxy goes on. `-q` drops the informational lines, not the
//!   errors.
//! - **The end**: Ctrl-C (`SIGINT`) or `SIGTERM` ends the proxy with exit 0; connections still
//!   open are cut.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use aloft_api::{Machine, MachineId, MachineState};
use aloft_client::{Client, ClientError};
use anyhow::Context as _;
use clap::Args;
use tokio::net::{TcpListener, TcpStream};

use crate::api::{AppArg, Subject, api_error};
use crate::context::{ApiSettings, Context};
use crate::errors::{EXIT_NOT_FOUND, UserError};
use crate::ssh::console::{Pick, started_machine};

/// How long to wait before accepting again after a failed accept (out of file descriptors …).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// `aloft proxy`.
#[derive(Debug, Args)]
pub(crate) struct ProxyArgs {
    /// The local port and the machine's: LOCAL[:REMOTE] (REMOTE defaults to LOCAL; LOCAL 0
    /// takes a free port).
    #[arg(value_name = "LOCAL[:REMOTE]", value_parser = parse_ports)]
    ports: Ports,
    /// The machine: its id, ID.vm.APP.internal, APP.internal, its name or its private address
    /// [default: the app's first started machine].
    #[arg(value_name = "REMOTE_HOST")]
    remote_host: Option<String>,
    #[command(flatten)]
    app: AppArg,
    /// Choose the machine from the app's started machines.
    #[arg(short = 's', long, conflicts_with = "remote_host")]
    select: bool,
    /// The local address to listen on.
    #[arg(short = 'b', long, value_name = "ADDR", default_value = "127.0.0.1")]
    bind_addr: String,
    /// Print nothing but errors.
    #[arg(short = 'q', long)]
    quiet: bool,
}

/// `LOCAL[:REMOTE]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ports {
    /// The local port; 0 takes a free one.
    local: u16,
    /// The machine's port (1–65535).
    remote: u16,
}

/// `LOCAL[:REMOTE]`: REMOTE defaults to LOCAL; LOCAL may be 0 (a free port) when REMOTE is given.
fn parse_ports(s: &str) -> Result<Ports, String> {
    let usage = "use LOCAL[:REMOTE], e.g. 5432 or 15432:5432 (0:5432 takes a free local port)";
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{p:?} is not a port (0-65535): {usage}"))
    };
    let (local, remote) = match s.split_once(':') {
        Some((l, r)) => (port(l)?, port(r)?),
        None => {
            let p = port(s)?;
            (p, p)
        }
    };
    if remote == 0 {
        return Err(if s.contains(':') {
            format!("the machine's port cannot be 0: {usage}")
        } else {
            "0 takes a free local port; name the machine's port too, e.g. 0:5432".to_owned()
        });
    }
    Ok(Ports { local, remote })
}

/// What REMOTE_HOST names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Remote {
    /// A started machine of the app (no REMOTE_HOST, or `APP.internal`).
    Any,
    /// A machine by id (`ID` or `ID.vm.APP.internal`).
    Id(MachineId),
    /// A machine by name or private address.
    Name(String),
}

/// REMOTE_HOST: what it names, and the app a `….internal` host name names.
fn parse_remote(host: Option<&str>) -> Result<(Remote, Option<String>), UserError> {
    let Some(host) = host.map(str::trim).filter(|h| !h.is_empty()) else {
        return Ok((Remote::Any, None));
    };
    let bad = |why: &str| UserError {
        message: format!("REMOTE_HOST {host:?}: {why}"),
        hint: Some(
            "name the machine by its id, ID.vm.APP.internal, its name or its private address; \
             APP.internal (or nothing) takes the app's first started machine"
                .to_owned(),
        ),
        code: 2,
    };
    let fqdn = host.strip_suffix('.').unwrap_or(host);
    if let Some(name) = fqdn.strip_suffix(".internal") {
        let valid_app = |a: &str| !a.is_empty() && !a.contains('.');
        if let Some((id, app)) = name.split_once(".vm.") {
            let id = id
                .parse::<MachineId>()
                .map_err(|_| bad(&format!("{id:?} is not a machine id (14 lowercase hex digits)")))?;
            if !valid_app(app) {
                return Err(bad("no app in ID.vm.APP.internal"));
            }
            return Ok((Remote::Id(id), Some(app.to_owned())));
        }
        if valid_app(name) {
            return Ok((Remote::Any, Some(name.to_owned())));
        }
        return Err(bad(
            "aloft knows ID.vm.APP.internal and APP.internal, not regions' or other .internal names",
        ));
    }
    Ok(match fqdn.parse::<MachineId>() {
        Ok(id) => (Remote::Id(id), None),
        Err(_) => (Remote::Name(fqdn.to_owned()), None),
    })
}

/// The app: the one a `….internal` REMOTE_HOST names (`-a` must agree), else `-a`, else the
/// config's.
fn app_for(flag: &AppArg, from_host: Option<String>) -> anyhow::Result<String> {
    let Some(host_app) = from_host else {
        return flag.resolve();
    };
    match flag.app.as_deref().map(str::trim).filter(|a| !a.is_empty()) {
        Some(a) if a != host_app => Err(UserError {
            message: format!("REMOTE_HOST names app {host_app} but -a/--app says {a}"),
            hint: Some("drop one of them".to_owned()),
            code: 2,
        }
        .into()),
        _ => Ok(host_app),
    }
}

/// The machine REMOTE_HOST names in `app` (an error naming it when there is none).
async fn find_machine(
    client: &Client,
    settings: &ApiSettings,
    app: &str,
    remote: &Remote,
    select: bool,
) -> anyhow::Result<Machine> {
    match remote {
        Remote::Any => {
            let pick = Pick {
                select,
                name_hint: "name the machine: aloft proxy PORTS MACHINE_ID",
                ..Pick::default()
            };
            started_machine(client, settings, app, pick).await
        }
        Remote::Id(id) => client
            .machine_get(app, id.as_str())
            .await
            .map_err(|e| api_error(e, settings, Subject::Machine { app, id: id.as_str() })),
        Remote::Name(name) => {
            let machines = client
                .machines_list(app, &Default::default())
                .await
                .map_err(|e| api_error(e, settings, Subject::App(app)))?;
            let address = name.parse::<std::net::IpAddr>().ok();
            machines
                .into_iter()
                .find(|m| {
                    m.name == *name
                        || address.is_some_and(|a| m.private_ip.parse::<std::net::IpAddr>() == Ok(a))
                })
                .ok_or_else(|| {
                    UserError {
                        message: format!("no machine named {name} in app {app}"),
                        hint: Some(format!(
                            "aloft machine list -a {app} shows its machines; REMOTE_HOST is a machine's \
                             id, name or private address"
                        )),
                        code: EXIT_NOT_FOUND,
                    }
                    .into()
                })
        }
    }
}

/// Refuses a machine that is not started, with how to start it.
fn require_started(machine: &Machine, app: &str) -> anyhow::Result<()> {
    if machine.state == MachineState::Started {
        return Ok(());
    }
    Err(UserError {
        message: format!(
            "machine {} is not started ({}): there is nothing to proxy to",
            machine.id, machine.state
        ),
        hint: Some(format!(
            "start it first: aloft machine start {} -a {app}",
            machine.id
        )),
        code: 1,
    }
    .into())
}

/// What one connection's failed upgrade means, with a hint where there is something to do.
fn connection_error(e: ClientError, settings: &ApiSettings, app: &str, id: &str, port: u16) -> anyhow::Error {
    let hint = match e.status() {
        Some(412) => Some(format!("start it again: aloft machine start {id} -a {app}")),
        Some(422) => {
            Some("aloftd has no network to reach machines with (it runs with --network none)".to_owned())
        }
        Some(502) => Some(format!(
            "is something listening on port {port} in the machine, on its private address? \
             listen on [::] (or fly-local-6pn), not 127.0.0.1"
        )),
        Some(503) => Some("aloftd has as many proxied connections as it allows; close some".to_owned()),
        _ => None,
    };
    match hint {
        Some(hint) => UserError {
            message: e.to_string(),
            hint: Some(hint),
            code: 1,
        }
        .into(),
        None => api_error(e, settings, Subject::Machine { app, id }),
    }
}

/// Prints one connection's failure on stderr (the proxy goes on).
fn report_connection(peer: SocketAddr, error: &anyhow::Error) {
    let (message, hint, _) = crate::errors::describe(error);
    eprintln!("error: connection from {peer}: {message}");
    if let Some(hint) = hint {
        eprintln!("hint: {hint}");
    }
}

/// A closed local connection: the peer going away is no failure worth a line.
fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
    )
}

/// Where the proxy's connections go.
#[derive(Debug, Clone)]
struct Target {
    client: Client,
    settings: ApiSettings,
    app: String,
    id: String,
    port: u16,
}

/// One local connection: its own upgrade, then bytes both ways until both directions ended.
async fn serve(target: Target, mut local: TcpStream, peer: SocketAddr) {
    let _ = local.set_nodelay(true);
    let mut remote = match target.client.proxy(&target.app, &target.id, target.port).await {
        Ok(remote) => remote,
        Err(e) => {
            let e = connection_error(e, &target.settings, &target.app, &target.id, target.port);
            report_connection(peer, &e);
            return;
        }
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut local, &mut remote).await
        && !is_disconnect(&e)
    {
        report_connection(
            peer,
            &anyhow::Error::new(e).context("the proxied connection failed"),
        );
    }
}

pub(crate) async fn run(ctx: &Context, args: ProxyArgs) -> anyhow::Result<()> {
    let (remote, host_app) = parse_remote(args.remote_host.as_deref())?;
    let app = app_for(&args.app, host_app)?;
    let (client, settings) = ctx.api_client()?;
    let machine = find_machine(&client, &settings, &app, &remote, args.select).await?;
    require_started(&machine, &app)?;

    // The handlers are in place before the line that says the proxy listens.
    let (mut interrupt, mut terminate) = {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind| signal(kind).context("listen for Ctrl-C");
        (listen(SignalKind::interrupt())?, listen(SignalKind::terminate())?)
    };
    let bind = args.bind_addr.trim();
    let listener = TcpListener::bind((bind, args.ports.local))
        .await
        .map_err(|e| UserError {
            message: format!("listen on {bind} port {}: {e}", args.ports.local),
            hint: Some(if e.kind() == io::ErrorKind::AddrInUse {
                "choose another local port (0 takes a free one): aloft proxy 0:PORT".to_owned()
            } else {
                "-b/--bind-addr takes a local address, e.g. 127.0.0.1 or ::1".to_owned()
            }),
            code: 1,
        })?;
    let local = listener.local_addr().context("the address listened on")?;
    if !args.quiet {
        if remote == Remote::Any && !args.select {
            let name = if machine.name.is_empty() || machine.name == machine.id.as_str() {
                String::new()
            } else {
                format!(" ({})", machine.name)
            };
            eprintln!(
                "Using machine {}{name}, the first started machine of app {app} (name another as REMOTE_HOST or choose with -s)",
                machine.id
            );
        }
        println!(
            "Proxying local port {} to remote [{}]:{}",
            local.port(),
            machine.id,
            args.ports.remote
        );
    }
    let target = Target {
        client,
        settings,
        app,
        id: machine.id.to_string(),
        port: args.ports.remote,
    };
    loop {
        tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((conn, peer)) => {
                    tokio::spawn(serve(target.clone(), conn, peer));
                }
                Err(e) => {
                    eprintln!("error: accept a connection on {local}: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ProxyArgs,
    }

    fn parse(args: &[&str]) -> Result<ProxyArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("proxy").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn flags_are_flyctls() {
        let a = parse(&["15432:5432", "web-1", "-a", "web", "-b", "0.0.0.0", "-q"]).unwrap();
        assert_eq!(
            a.ports,
            Ports {
                local: 15432,
                remote: 5432
            }
        );
        assert_eq!(a.remote_host.as_deref(), Some("web-1"));
        assert_eq!(a.app.app.as_deref(), Some("web"));
        assert_eq!(a.bind_addr, "0.0.0.0");
        assert!(a.quiet && !a.select);
        let a = parse(&["5432", "-s"]).unwrap();
        assert_eq!(
            a.ports,
            Ports {
                local: 5432,
                remote: 5432
            }
        );
        assert_eq!(a.bind_addr, "127.0.0.1");
        assert!(a.select && !a.quiet && a.remote_host.is_none());
        // --select chooses among machines: not with one named.
        assert!(parse(&["5432", "web-1", "-s"]).is_err());
        assert!(parse(&[]).is_err());
    }

    #[test]
    fn ports_are_local_then_remote() {
        let p = |local, remote| Ports { local, remote };
        assert_eq!(parse_ports("5432"), Ok(p(5432, 5432)));
        assert_eq!(parse_ports("15432:5432"), Ok(p(15432, 5432)));
        assert_eq!(parse_ports("0:22"), Ok(p(0, 22)));
        assert_eq!(parse_ports("65535:1"), Ok(p(65535, 1)));
        let e = parse_ports("0").unwrap_err();
        assert!(e.contains("0:5432"), "{e}");
        for bad in ["", ":", "x", "5432:", ":5432", "1:0", "65536", "1:2:3", "-1"] {
            assert!(parse_ports(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn remote_hosts_name_a_machine_and_maybe_the_app() {
        let id: MachineId = "3d8d413b29d089".parse().unwrap();
        assert_eq!(parse_remote(None).unwrap(), (Remote::Any, None));
        assert_eq!(parse_remote(Some(" ")).unwrap(), (Remote::Any, None));
        assert_eq!(
            parse_remote(Some("3d8d413b29d089")).unwrap(),
            (Remote::Id(id.clone()), None)
        );
        for host in [
            "3d8d413b29d089.vm.web.internal",
            "3d8d413b29d089.vm.web.internal.",
        ] {
            assert_eq!(
                parse_remote(Some(host)).unwrap(),
                (Remote::Id(id.clone()), Some("web".to_owned())),
                "{host}"
            );
        }
        assert_eq!(
            parse_remote(Some("web.internal")).unwrap(),
            (Remote::Any, Some("web".to_owned()))
        );
        assert_eq!(
            parse_remote(Some("web-1")).unwrap(),
            (Remote::Name("web-1".to_owned()), None)
        );
        assert_eq!(
            parse_remote(Some("fdaa::3")).unwrap(),
            (Remote::Name("fdaa::3".to_owned()), None)
        );
        for bad in [
            "xyz.vm.web.internal",
            "3d8d413b29d089.vm..internal",
            "ams.web.internal",
            ".internal",
        ] {
            let e = parse_remote(Some(bad)).unwrap_err();
            assert_eq!(e.code, 2, "{bad}");
            assert!(e.hint.unwrap().contains("ID.vm.APP.internal"), "{bad}");
        }
    }

    #[test]
    fn the_host_names_app_agrees_with_the_flag() {
        let flag = |a: Option<&str>| AppArg {
            app: a.map(str::to_owned),
        };
        assert_eq!(app_for(&flag(None), Some("web".into())).unwrap(), "web");
        assert_eq!(app_for(&flag(Some("web")), Some("web".into())).unwrap(), "web");
        assert_eq!(app_for(&flag(Some("api")), None).unwrap(), "api");
        let e = app_for(&flag(Some("api")), Some("web".into())).unwrap_err();
        let (message, _, code) = crate::errors::describe(&e);
        assert_eq!(
            (message.as_str(), code),
            ("REMOTE_HOST names app web but -a/--app says api", 2)
        );
    }

    #[test]
    fn connection_errors_say_what_to_do() {
        let settings = ApiSettings {
            url: "http://x".into(),
            token: "t".into(),
            token_source: "$ALOFT_API_TOKEN".into(),
        };
        let api = |status, message: &str| ClientError::Api {
            status,
            message: message.into(),
        };
        let id = "3d8d413b29d089";
        let describe = |e| crate::errors::describe(&connection_error(e, &settings, "web", id, 5432));
        let (message, hint, _) = describe(api(502, "connection to port 5432 refused"));
        assert_eq!(message, "connection to port 5432 refused (HTTP 502)");
        assert!(hint.unwrap().contains("[::]"));
        let (_, hint, _) = describe(api(412, "machine is not started (stopped)"));
        assert_eq!(
            hint.as_deref(),
            Some("start it again: aloft machine start 3d8d413b29d089 -a web")
        );
        assert!(
            describe(api(422, "no network"))
                .1
                .unwrap()
                .contains("--network none")
        );
        let (message, _, code) = describe(api(404, "machine not found"));
        assert_eq!(
            (message.as_str(), code),
            ("machine 3d8d413b29d089 not found in app web", 3)
        );
    }

    fn machine(state: &str) -> Machine {
        serde_json::from_value(serde_json::json!({
            "id": "3d8d413b29d089",
            "name": "web-1",
            "state": state,
            "region": "local",
        }))
        .unwrap()
    }

    #[test]
    fn only_a_started_machine_is_proxied_to() {
        require_started(&machine("started"), "web").unwrap();
        let e = require_started(&machine("stopped"), "web").unwrap_err();
        let (message, hint, code) = crate::errors::describe(&e);
        assert!(message.contains("is not started (stopped)"), "{message}");
        assert_eq!(
            hint.as_deref(),
            Some("start it first: aloft machine start 3d8d413b29d089 -a web")
        );
        assert_eq!(code, 1);
    }
}
