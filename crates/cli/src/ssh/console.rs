//! `aloft ssh console`: a shell, or `-C COMMAND`, in a started machine, with the local stdin,
//! stdout and stderr streaming to and from it until it exits; the CLI exits with its status.
//!
//! Decisions (flyctl's where it has one):
//! - **The machine**: `--machine ID`; else `-s/--select` asks on the terminal which of the app's
//!   started machines (`-r/--region`, `-g/--process-group` narrow the list); else the first
//!   started one, as flyctl does.
//! - **`-C COMMAND`** is split like a shell would (quotes, backslashes; `shlex`), as `aloft machine
//!   exec` and `update --command` split theirs, and run **without** a shell, as flyctl's `-C` is:
//!   pipes and `$VARS` need `-C "sh -c '…'"`. Without `-C`: a login shell (the image's bash, else
//!   sh).
//! - **A pseudo-terminal** when `--pty`, none when `--no-pty` (the last of the two wins), else
//!   one exactly when there is no `-C` and stdin and stdout are both terminals. With one, the
//!   local terminal goes to raw mode (keys such as Ctrl-C and Ctrl-D are bytes for the remote
//!   side) until the session ends, whatever ends it; its size goes with the request and again on
//!   every `SIGWINCH`, and `TERM` (else `xterm`) is passed on. Remote output then all arrives as
//!   stdout, as over SSH.
//! - **Stdin** is read on a thread of its own (a blocked read must not hold up the exit) and sent
//!   as it comes; its end is sent as the end of the command's stdin. Output is written as it
//!   arrives.
//! - **Exit**: the command's status (128 + N when signal N ended it); an error from aloftd's side
//!   of the session prints its message and exits 1, and so does a connection that closes before
//!   the command ended. Without a pty, Ctrl-C ends the CLI, which closes the connection and so
//!   kills the command; with one, a terminating signal sent to the CLI restores the terminal and
//!   exits 128 + N.

use std::future::Future;
use std::io::{self, BufRead, IsTerminal as _, Read, Write};
use std::pin::Pin;

use aloft_api::{ConsoleExit, ConsoleFrame, ConsoleRequest, Machine, MachineState, TtySize};
use aloft_client::{Client, ClientError, ConsoleConnection, ListMachinesParams};
use anyhow::Context as _;
use clap::Args;
use tokio::sync::mpsc;

use super::tty;
use crate::api::{AppArg, Subject, api_error};
use crate::context::{ApiSettings, Context};
use crate::errors::{SilentExit, UserError};

/// A pty's size when the local side has no terminal to take it from.
const DEFAULT_SIZE: TtySize = TtySize { rows: 24, cols: 80 };
/// `TERM` on a pty when the local one is unset or unusable.
const DEFAULT_TERM: &str = "xterm";
/// Bytes of stdin read at a time.
const STDIN_CHUNK: usize = 32 * 1024;

/// `aloft ssh console`.
#[derive(Debug, Args)]
pub(crate) struct ConsoleArgs {
    #[command(flatten)]
    app: AppArg,
    /// The machine [default: the app's first started machine].
    #[arg(long, value_name = "ID")]
    machine: Option<String>,
    /// Choose the machine from the app's started machines.
    #[arg(short = 's', long, conflicts_with = "machine")]
    select: bool,
    /// Only consider machines in this region (without --machine).
    #[arg(short = 'r', long, value_name = "REGION", conflicts_with = "machine")]
    region: Option<String>,
    /// Only consider machines of this process group (without --machine).
    #[arg(short = 'g', long, value_name = "GROUP", conflicts_with = "machine")]
    process_group: Option<String>,
    /// Run this command instead of a shell: a command line split like a shell would, run
    /// without a shell ("sh -c '…'" for pipes and variables).
    #[arg(short = 'C', long, value_name = "COMMAND")]
    command: Option<String>,
    /// Allocate a pseudo-terminal [default: when there is no --command and stdin and stdout are
    /// terminals].
    #[arg(long, overrides_with = "no_pty")]
    pty: bool,
    /// Don't allocate a pseudo-terminal.
    #[arg(long, overrides_with = "pty")]
    no_pty: bool,
    /// Run as this user (NAME, UID, NAME:GROUP or UID:GID) [default: the workload's].
    #[arg(short = 'u', long, value_name = "USER")]
    user: Option<String>,
}

/// `--pty`, `--no-pty` or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PtyFlag {
    Auto,
    On,
    Off,
}

impl ConsoleArgs {
    fn pty_flag(&self) -> PtyFlag {
        match (self.pty, self.no_pty) {
            (true, _) => PtyFlag::On,
            (false, true) => PtyFlag::Off,
            (false, false) => PtyFlag::Auto,
        }
    }
}

/// Whether the session gets a pseudo-terminal: as the flag says, else exactly when no command
/// was given and stdin and stdout are both terminals (flyctl's rule).
fn wants_pty(flag: PtyFlag, has_command: bool, stdin_tty: bool, stdout_tty: bool) -> bool {
    match flag {
        PtyFlag::On => true,
        PtyFlag::Off => false,
        PtyFlag::Auto => !has_command && stdin_tty && stdout_tty,
    }
}

/// The argv for `-C COMMAND`: the line split like a shell would; none (a login shell) without.
fn command_argv(command: Option<&str>) -> anyhow::Result<Vec<String>> {
    let Some(line) = command else {
        return Ok(Vec::new());
    };
    let usage = |message: String| UserError {
        message,
        hint: Some(
            "aloft ssh console -C \"ls -l /\"; pipes and variables need a shell: -C \"sh -c 'ps | grep x'\""
                .to_owned(),
        ),
        code: 2,
    };
    let argv =
        shlex::split(line).ok_or_else(|| usage(format!("invalid command {line:?}: unbalanced quotes")))?;
    if argv.first().is_none_or(String::is_empty) {
        return Err(usage("-C/--command is empty".to_owned()).into());
    }
    Ok(argv)
}

/// `TERM` for a pty: the local one when the API takes it, else `xterm`.
fn term(local: Option<&str>) -> String {
    local
        .filter(|t| !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or(DEFAULT_TERM)
        .to_owned()
}

/// The exit code the CLI passes on: the command's status (128 + N for signal N), 255 above
/// that, 1 for what no process can exit with (a negative code).
fn exit_code(exit: ConsoleExit) -> u8 {
    match exit.status() {
        s if s < 0 => 1,
        s => u8::try_from(s).unwrap_or(u8::MAX),
    }
}

/// The app's started machines in the region and process group asked for, in the API's order.
fn candidates<'a>(machines: &'a [Machine], region: Option<&str>, group: Option<&str>) -> Vec<&'a Machine> {
    machines
        .iter()
        .filter(|m| m.state == MachineState::Started)
        .filter(|m| region.is_none_or(|r| m.region == r))
        .filter(|m| group.is_none_or(|g| crate::status::group(m) == g))
        .collect()
}

/// Asks which of `machines` (more than one) on the terminal; again on an answer that is not one
/// of the numbers. Refuses without a terminal, with `name_hint` (how to name the machine
/// instead) as the hint.
fn choose_with(
    machines: &[&Machine],
    terminal: bool,
    name_hint: &str,
    input: &mut dyn BufRead,
    output: &mut dyn Write,
) -> anyhow::Result<usize> {
    if !terminal {
        return Err(UserError {
            message: "--select needs a terminal to ask on".to_owned(),
            hint: Some(name_hint.to_owned()),
            code: 2,
        }
        .into());
    }
    writeln!(output, "Select a machine:")?;
    for (i, m) in machines.iter().enumerate() {
        let name = if m.name.is_empty() { "-" } else { m.name.as_str() };
        writeln!(
            output,
            "{:>3}) {}  {}  {}  {}",
            i + 1,
            m.id,
            name,
            m.region,
            crate::status::group(m)
        )?;
    }
    loop {
        write!(output, "Machine [1-{}]: ", machines.len())?;
        output.flush()?;
        let mut answer = String::new();
        if input.read_line(&mut answer)? == 0 {
            return Err(UserError {
                message: "no machine chosen".to_owned(),
                hint: None,
                code: 1,
            }
            .into());
        }
        match answer.trim().parse::<usize>() {
            Ok(n) if (1..=machines.len()).contains(&n) => return Ok(n - 1),
            _ => writeln!(output, "{:?} is not one of the numbers", answer.trim())?,
        }
    }
}

/// How a command that needs one started machine picks it when none is named.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Pick<'a> {
    /// Ask on the terminal (`-s/--select`) when there is more than one; else take the first.
    pub(crate) select: bool,
    /// Only machines of this region.
    pub(crate) region: Option<&'a str>,
    /// Only machines of this process group.
    pub(crate) group: Option<&'a str>,
    /// How to name the machine instead, the hint when `--select` has no terminal to ask on.
    pub(crate) name_hint: &'a str,
}

/// One of the app's started machines (`pick.region` and `pick.group` narrow them): chosen on
/// the terminal with `pick.select`, else the first in the API's order (flyctl's rule). An error
/// that says how to start one when there is none.
pub(crate) async fn started_machine(
    client: &Client,
    settings: &ApiSettings,
    app: &str,
    pick: Pick<'_>,
) -> anyhow::Result<Machine> {
    let machines = client
        .machines_list(app, &ListMachinesParams::default())
        .await
        .map_err(|e| api_error(e, settings, Subject::App(app)))?;
    let found = candidates(&machines, pick.region, pick.group);
    let Some(first) = found.first() else {
        let mut within = String::new();
        if let Some(r) = pick.region {
            within.push_str(&format!(" in region {r}"));
        }
        if let Some(g) = pick.group {
            within.push_str(&format!(" in process group {g}"));
        }
        return Err(UserError {
            message: format!("app {app} has no started machine{within}"),
            hint: Some(format!(
                "start one (aloft machine start ID -a {app}; aloft machine list -a {app} shows them)"
            )),
            code: 1,
        }
        .into());
    };
    if !pick.select || found.len() == 1 {
        return Ok((*first).clone());
    }
    let stdin = io::stdin();
    let terminal = stdin.is_terminal();
    let i = choose_with(
        &found,
        terminal,
        pick.name_hint,
        &mut stdin.lock(),
        &mut io::stderr(),
    )?;
    Ok(found[i].clone())
}

/// The machine to connect to: `--machine`, else one of the app's started machines (chosen with
/// `--select`, else the first).
async fn pick_machine(
    client: &Client,
    settings: &ApiSettings,
    app: &str,
    args: &ConsoleArgs,
) -> anyhow::Result<String> {
    if let Some(id) = args.machine.as_deref().map(str::trim).filter(|id| !id.is_empty()) {
        return Ok(id.to_owned());
    }
    let pick = Pick {
        select: args.select,
        region: args.region.as_deref(),
        group: args.process_group.as_deref(),
        name_hint: "name the machine with --machine ID",
    };
    Ok(started_machine(client, settings, app, pick).await?.id.to_string())
}

/// A refused console as the user should read it: a machine that is not started says how to
/// start it.
fn console_error(e: ClientError, settings: &ApiSettings, app: &str, id: &str) -> anyhow::Error {
    if e.status() == Some(412) {
        return UserError {
            message: e.to_string(),
            hint: Some(format!("start it first: aloft machine start {id} -a {app}")),
            code: 1,
        }
        .into();
    }
    api_error(e, settings, Subject::Machine { app, id })
}

pub(crate) async fn run(ctx: &Context, args: ConsoleArgs) -> anyhow::Result<()> {
    let argv = command_argv(args.command.as_deref())?;
    let stdin_tty = io::stdin().is_terminal();
    let pty = wants_pty(
        args.pty_flag(),
        args.command.is_some(),
        stdin_tty,
        io::stdout().is_terminal(),
    );
    let app = args.app.resolve()?;
    let (client, settings) = ctx.api_client()?;
    let id = pick_machine(&client, &settings, &app, &args).await?;
    let request = ConsoleRequest {
        argv,
        tty: pty.then(|| tty::local_size().unwrap_or(DEFAULT_SIZE)),
        env: if pty {
            let local = std::env::var("TERM").ok();
            vec![("TERM".to_owned(), term(local.as_deref()))]
        } else {
            Vec::new()
        },
        user: args.user.clone().filter(|u| !u.trim().is_empty()),
    };
    let conn = client
        .console(&app, &id, &request)
        .await
        .map_err(|e| console_error(e, &settings, &app, &id))?;

    // The signal handlers are in place before the terminal goes raw: a resize or a `kill`
    // from then on is seen.
    let raw_mode = pty && stdin_tty;
    let interrupted: Pin<Box<dyn Future<Output = i32>>> = if raw_mode {
        Box::pin(terminating_signal()?)
    } else {
        Box::pin(std::future::pending())
    };
    let (tx, rx) = mpsc::channel(16);
    if pty {
        spawn_resizer(tx.clone())?;
    }
    // From here until `raw` drops (on every way out of this function), a local terminal is raw.
    let raw = if raw_mode {
        Some(tty::RawMode::enter(io::stdin()).context("put the terminal in raw mode")?)
    } else {
        None
    };
    spawn_stdin(io::stdin(), tx)?;
    let exit = relay(conn, rx, &mut io::stdout(), &mut io::stderr(), interrupted).await;
    drop(raw);
    match exit_code(exit?) {
        0 => Ok(()),
        code => Err(SilentExit(code).into()),
    }
}

/// Reads `input` on a thread of its own and queues it as stdin frames, then the end of stdin
/// (at its end or on a read error). The thread is not joined: a read blocked on a terminal ends
/// with the process.
fn spawn_stdin<R: Read + Send + 'static>(mut input: R, tx: mpsc::Sender<ConsoleFrame>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("console-stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; STDIN_CHUNK];
            loop {
                let frame = match input.read(&mut buf) {
                    Ok(0) => ConsoleFrame::Eof,
                    Ok(n) => ConsoleFrame::Stdin(buf[..n].to_vec()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => ConsoleFrame::Eof,
                };
                let last = frame == ConsoleFrame::Eof;
                if tx.blocking_send(frame).is_err() || last {
                    return;
                }
            }
        })
        .map(drop)
}

/// Queues a resize frame with the local terminal's size on every `SIGWINCH`.
fn spawn_resizer(tx: mpsc::Sender<ConsoleFrame>) -> io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut winch = signal(SignalKind::window_change())?;
    tokio::spawn(async move {
        while winch.recv().await.is_some() {
            if let Some(size) = tty::local_size()
                && tx.send(ConsoleFrame::Resize(size)).await.is_err()
            {
                return;
            }
        }
    });
    Ok(())
}

/// The first of SIGTERM, SIGHUP, SIGINT and SIGQUIT to arrive, by number. While the terminal is
/// raw their default action would leave it so; caught, the session ends and the terminal is put
/// back.
fn terminating_signal() -> io::Result<impl Future<Output = i32>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => 15,
            _ = hup.recv() => 1,
            _ = int.recv() => 2,
            _ = quit.recv() => 3,
        }
    })
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs a session: sends the frames `outgoing` yields (stdin, its end, resizes) on a task of its
/// own, and writes the server's output to `stdout` and `stderr` as it arrives, until the
/// command's exit (returned), an error frame or a closed connection (errors), or `interrupted`
/// (an error that exits 128 + the signal's number).
async fn relay(
    conn: ConsoleConnection,
    mut outgoing: mpsc::Receiver<ConsoleFrame>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    mut interrupted: Pin<Box<dyn Future<Output = i32> + '_>>,
) -> anyhow::Result<ConsoleExit> {
    let (mut reader, mut writer) = conn.split();
    // A send fails when the server has gone; the reader then sees how it ended.
    let _sender = AbortOnDrop(tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if writer.send(&frame).await.is_err() {
                return;
            }
        }
    }));
    loop {
        let frame = tokio::select! {
            frame = reader.next() => frame.context("the console connection to aloftd failed")?,
            signal = &mut interrupted => {
                return Err(UserError {
                    message: format!("interrupted by signal {signal}; the command in the machine is killed"),
                    hint: None,
                    code: u8::try_from(128 + signal).unwrap_or(1),
                }
                .into());
            }
        };
        match frame {
            Some(ConsoleFrame::Stdout(data)) => {
                stdout
                    .write_all(&data)
                    .and_then(|()| stdout.flush())
                    .context("write stdout")?;
            }
            Some(ConsoleFrame::Stderr(data)) => {
                stderr
                    .write_all(&data)
                    .and_then(|()| stderr.flush())
                    .context("write stderr")?;
            }
            Some(ConsoleFrame::Exit(exit)) => return Ok(exit),
            Some(ConsoleFrame::Error(message)) => {
                return Err(UserError {
                    message,
                    hint: None,
                    code: 1,
                }
                .into());
            }
            Some(other) => anyhow::bail!("aloftd sent a frame only a client sends: {other:?}"),
            None => {
                return Err(UserError {
                    message: "the connection to aloftd closed before the command exited".to_owned(),
                    hint: None,
                    code: 1,
                }
                .into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ConsoleArgs,
    }

    fn parse(args: &[&str]) -> Result<ConsoleArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("console").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn flags_are_flyctls() {
        let a = parse(&[
            "-a",
            "web",
            "--machine",
            "3d8d413b29d089",
            "-C",
            "ls -l",
            "--pty",
            "-u",
            "postgres",
        ])
        .unwrap();
        assert_eq!(a.app.app.as_deref(), Some("web"));
        assert_eq!(a.machine.as_deref(), Some("3d8d413b29d089"));
        assert_eq!(a.command.as_deref(), Some("ls -l"));
        assert_eq!(a.user.as_deref(), Some("postgres"));
        assert_eq!(a.pty_flag(), PtyFlag::On);
        let a = parse(&["-s", "-r", "ams", "-g", "worker", "--command", "id"]).unwrap();
        assert!(a.select);
        assert_eq!(a.region.as_deref(), Some("ams"));
        assert_eq!(a.process_group.as_deref(), Some("worker"));
        assert_eq!(a.pty_flag(), PtyFlag::Auto);
        // The last of --pty and --no-pty wins.
        assert_eq!(parse(&["--pty", "--no-pty"]).unwrap().pty_flag(), PtyFlag::Off);
        assert_eq!(parse(&["--no-pty", "--pty"]).unwrap().pty_flag(), PtyFlag::On);
        // --select, --region and --process-group choose among machines: not with --machine.
        for extra in [["-s", ""], ["-r", "ams"], ["-g", "app"]] {
            let mut argv = vec!["--machine", "x"];
            argv.extend(extra.iter().filter(|a| !a.is_empty()));
            assert!(parse(&argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn pty_decision_matrix() {
        use PtyFlag::{Auto, Off, On};
        for command in [false, true] {
            for stdin_tty in [false, true] {
                for stdout_tty in [false, true] {
                    let case = (command, stdin_tty, stdout_tty);
                    assert!(wants_pty(On, command, stdin_tty, stdout_tty), "{case:?}");
                    assert!(!wants_pty(Off, command, stdin_tty, stdout_tty), "{case:?}");
                    assert_eq!(
                        wants_pty(Auto, command, stdin_tty, stdout_tty),
                        !command && stdin_tty && stdout_tty,
                        "{case:?}"
                    );
                }
            }
        }
        // Spelled out: only an interactive shell on a terminal gets one by default.
        assert!(wants_pty(Auto, false, true, true));
        assert!(!wants_pty(Auto, true, true, true));
        assert!(!wants_pty(Auto, false, false, true));
        assert!(!wants_pty(Auto, false, true, false));
    }

    #[test]
    fn commands_split_like_a_shell_and_bad_ones_are_usage_errors() {
        assert_eq!(command_argv(None).unwrap(), Vec::<String>::new());
        assert_eq!(command_argv(Some("sh")).unwrap(), ["sh"]);
        assert_eq!(
            command_argv(Some(r#"sh -c 'echo "a b" | wc -c'"#)).unwrap(),
            ["sh", "-c", r#"echo "a b" | wc -c"#]
        );
        assert_eq!(command_argv(Some(r"ls  a\ b")).unwrap(), ["ls", "a b"]);
        for bad in ["", "   ", "'oops", "''"] {
            let e = command_argv(Some(bad)).unwrap_err();
            let (_, hint, code) = crate::errors::describe(&e);
            assert_eq!(code, 2, "{bad:?}");
            assert!(hint.unwrap().contains("sh -c"), "{bad:?}");
        }
    }

    #[test]
    fn term_and_exit_codes() {
        assert_eq!(term(Some("xterm-256color")), "xterm-256color");
        assert_eq!(term(None), "xterm");
        assert_eq!(term(Some("")), "xterm");
        assert_eq!(term(Some("a b")), "xterm");
        let exit = |exit_code, signal| ConsoleExit { exit_code, signal };
        assert_eq!(exit_code(exit(Some(0), None)), 0);
        assert_eq!(exit_code(exit(Some(3), None)), 3);
        assert_eq!(exit_code(exit(None, Some(9))), 137);
        assert_eq!(exit_code(exit(Some(300), None)), 255);
        assert_eq!(exit_code(exit(Some(-1), None)), 1);
        assert_eq!(exit_code(exit(None, None)), 1);
    }

    fn machine(id: &str, state: &str, region: &str, group: Option<&str>) -> Machine {
        let metadata = group.map_or_else(
            || serde_json::json!({}),
            |g| serde_json::json!({ "fly_process_group": g }),
        );
        serde_json::from_value(serde_json::json!({
            "id": id,
            "name": format!("{id}-name"),
            "state": state,
            "region": region,
            "instance_id": "01HBZ8QEXHS0YR4R1N6S1XGEE2",
            "config": {"image": "busybox", "metadata": metadata},
        }))
        .unwrap()
    }

    #[test]
    fn candidates_are_started_machines_of_the_region_and_group() {
        let ms = [
            machine("a0000000000001", "stopped", "ams", Some("app")),
            machine("a0000000000002", "started", "ams", Some("app")),
            machine("a0000000000003", "started", "fra", Some("worker")),
            machine("a0000000000004", "started", "fra", None),
        ];
        let ids = |found: Vec<&Machine>| found.iter().map(|m| m.id.to_string()).collect::<Vec<_>>();
        assert_eq!(
            ids(candidates(&ms, None, None)),
            ["a0000000000002", "a0000000000003", "a0000000000004"]
        );
        assert_eq!(
            ids(candidates(&ms, Some("fra"), None)),
            ["a0000000000003", "a0000000000004"]
        );
        assert_eq!(ids(candidates(&ms, None, Some("worker"))), ["a0000000000003"]);
        assert!(candidates(&ms, Some("ams"), Some("worker")).is_empty());
    }

    #[test]
    fn select_asks_until_a_number_fits() {
        let ms = [
            machine("a0000000000002", "started", "ams", Some("app")),
            machine("a0000000000003", "started", "fra", Some("worker")),
        ];
        let found: Vec<&Machine> = ms.iter().collect();
        let mut out = Vec::new();
        let i = choose_with(&found, true, "h", &mut "x\n3\n2\n".as_bytes(), &mut out).unwrap();
        assert_eq!(i, 1);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("Select a machine:\n"), "{text}");
        assert!(
            text.contains("  1) a0000000000002  a0000000000002-name  ams  app\n"),
            "{text}"
        );
        assert!(
            text.contains("  2) a0000000000003  a0000000000003-name  fra  worker\n"),
            "{text}"
        );
        assert_eq!(text.matches("Machine [1-2]: ").count(), 3, "{text}");
        assert!(text.contains("\"3\" is not one of the numbers"), "{text}");
        // The end of input, or no terminal at all, chooses nothing.
        assert!(choose_with(&found, true, "h", &mut "".as_bytes(), &mut Vec::new()).is_err());
        let e = choose_with(&found, false, "name it", &mut "1\n".as_bytes(), &mut Vec::new()).unwrap_err();
        let (_, hint, code) = crate::errors::describe(&e);
        assert_eq!((hint.as_deref(), code), (Some("name it"), 2));
    }

    /// A fake console server on a pipe: echoes each stdin line on stdout, `err X` on stderr,
    /// and ends with `exit N` (the exit frame) or `fail X` (an error frame) or `drop` (closes).
    /// Returns the frames it received.
    fn fake_server(io: tokio::io::DuplexStream) -> tokio::task::JoinHandle<Vec<ConsoleFrame>> {
        tokio::spawn(async move {
            let (mut reader, mut writer) = ConsoleConnection::new(io).split();
            let mut got = Vec::new();
            let mut line = Vec::new();
            while let Some(frame) = reader.next().await.unwrap() {
                got.push(frame.clone());
                let ConsoleFrame::Stdin(data) = frame else {
                    continue;
                };
                for b in data {
                    if b != b'\n' {
                        line.push(b);
                        continue;
                    }
                    let text = String::from_utf8(std::mem::take(&mut line)).unwrap();
                    let reply = match text.split_once(' ').unwrap_or((&text, "")) {
                        ("exit", n) => ConsoleFrame::Exit(ConsoleExit {
                            exit_code: Some(n.parse().unwrap()),
                            signal: None,
                        }),
                        ("fail", m) => ConsoleFrame::Error(m.to_owned()),
                        ("drop", _) => return got,
                        ("err", m) => ConsoleFrame::Stderr(format!("{m}\n").into_bytes()),
                        _ => ConsoleFrame::Stdout(format!("{text}\n").into_bytes()),
                    };
                    let last = matches!(reply, ConsoleFrame::Exit(_) | ConsoleFrame::Error(_));
                    writer.send(&reply).await.unwrap();
                    if last {
                        writer.shutdown().await.unwrap();
                        return got;
                    }
                }
            }
            got
        })
    }

    /// The relay with `input` as stdin: (result, stdout, stderr, frames the server got).
    async fn session(
        input: &'static str,
    ) -> (anyhow::Result<ConsoleExit>, String, String, Vec<ConsoleFrame>) {
        let (client, server) = tokio::io::duplex(1024);
        let server = fake_server(server);
        let (tx, rx) = mpsc::channel(4);
        spawn_stdin(input.as_bytes(), tx).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let result = relay(
            ConsoleConnection::new(client),
            rx,
            &mut out,
            &mut err,
            Box::pin(std::future::pending()),
        )
        .await;
        let got = server.await.unwrap();
        (
            result,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
            got,
        )
    }

    #[tokio::test]
    async fn relay_passes_stdin_and_output_and_returns_the_exit() {
        let (result, out, err, _) = session("echo hi\nerr oops\nexit 3\n").await;
        assert_eq!(result.unwrap().status(), 3);
        assert_eq!(out, "echo hi\n");
        assert_eq!(err, "oops\n");
    }

    #[tokio::test]
    async fn relay_sends_the_end_of_stdin() {
        let (client, server) = tokio::io::duplex(1024);
        let (tx, rx) = mpsc::channel(4);
        spawn_stdin(&b"abc"[..], tx).unwrap();
        let server = tokio::spawn(async move {
            let (mut reader, mut writer) = ConsoleConnection::new(server).split();
            let mut got = Vec::new();
            loop {
                let frame = reader.next().await.unwrap().unwrap();
                let eof = frame == ConsoleFrame::Eof;
                got.push(frame);
                if eof {
                    break;
                }
            }
            writer
                .send(&ConsoleFrame::Exit(ConsoleExit {
                    exit_code: Some(0),
                    signal: None,
                }))
                .await
                .unwrap();
            got
        });
        let exit = relay(
            ConsoleConnection::new(client),
            rx,
            &mut Vec::new(),
            &mut Vec::new(),
            Box::pin(std::future::pending()),
        )
        .await
        .unwrap();
        assert_eq!(exit.status(), 0);
        assert_eq!(
            server.await.unwrap(),
            [ConsoleFrame::Stdin(b"abc".to_vec()), ConsoleFrame::Eof]
        );
    }

    #[tokio::test]
    async fn relay_reports_error_frames_closed_connections_and_signals() {
        let (result, out, _, _) = session("one\nfail the machine stopped\n").await;
        let (message, _, code) = crate::errors::describe(&result.unwrap_err());
        assert_eq!((message.as_str(), code), ("the machine stopped", 1));
        assert_eq!(out, "one\n");

        let (result, _, _, _) = session("drop\n").await;
        let (message, _, code) = crate::errors::describe(&result.unwrap_err());
        assert_eq!(
            (message.as_str(), code),
            ("the connection to aloftd closed before the command exited", 1)
        );

        // A terminating signal ends the session with 128 + its number.
        let (client, mut server) = tokio::io::duplex(64);
        let (_tx, rx) = mpsc::channel(4);
        let result = relay(
            ConsoleConnection::new(client),
            rx,
            &mut Vec::new(),
            &mut Vec::new(),
            Box::pin(async { 15 }),
        )
        .await;
        assert_eq!(crate::errors::describe(&result.unwrap_err()).2, 143);
        server.shutdown().await.unwrap();
    }
}
