//! Resolving and starting a process (the workload or an exec session): user, working directory
//! and program are checked before forking so failures have clear messages.

use std::fs::{self, File};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::spec::{DEFAULT_PATH, find_program, get_env};
use crate::sys::{self, Credentials};
use crate::users::{ResolvedUser, parse_group, parse_passwd, resolve_user};

/// The user spec resolved against the (final root's) `/etc/passwd` and `/etc/group`.
pub(crate) fn lookup_user(spec: &str) -> Result<ResolvedUser, String> {
    let passwd = parse_passwd(&fs::read_to_string("/etc/passwd").unwrap_or_default());
    let groups = parse_group(&fs::read_to_string("/etc/group").unwrap_or_default());
    resolve_user(spec, &passwd, &groups)
}

/// Everything needed to start a process, already validated.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub(crate) program: PathBuf,
    pub(crate) argv: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) cred: Credentials,
}

/// Checks the working directory and finds the program in the environment's PATH.
pub(crate) fn prepare(
    argv: Vec<String>,
    env: Vec<(String, String)>,
    user: &ResolvedUser,
    workdir: &str,
) -> Result<Launch, String> {
    let Some(first) = argv.first() else {
        return Err("no command given".to_owned());
    };
    if !Path::new(workdir).is_dir() {
        return Err(format!("working directory not found: {workdir}"));
    }
    let path = get_env(&env, "PATH").unwrap_or(DEFAULT_PATH);
    let program = find_program(first, path, workdir)?;
    Ok(Launch {
        program,
        argv,
        env,
        cred: Credentials {
            uid: user.uid,
            gid: user.gid,
            groups: user.groups.clone(),
            workdir: workdir.to_owned(),
        },
    })
}

/// A started process and init's ends of its pipes (non-blocking).
#[derive(Debug)]
pub(crate) struct Spawned {
    pub(crate) pid: i32,
    pub(crate) stdin: Option<File>,
    pub(crate) stdout: File,
    pub(crate) stderr: File,
}

fn nonblocking(fd: impl Into<OwnedFd>) -> Result<File, String> {
    let fd: OwnedFd = fd.into();
    sys::set_nonblocking(fd.as_raw_fd()).map_err(|e| format!("set pipe non-blocking: {e}"))?;
    Ok(File::from(fd))
}

/// Spawns `cmd` (its stdio set up by the caller) as `launch`: the pre-exec hook takes the
/// credentials, makes a new session (with its stdin as the controlling terminal when
/// `controlling_tty`) and execs the program with `launch`'s argv and env.
fn start(cmd: &mut Command, launch: &Launch, controlling_tty: bool) -> Result<std::process::Child, String> {
    let exec_err = |e: std::io::Error| format!("exec {}: {e}", launch.argv[0]);
    sys::prepare_child(
        cmd,
        &launch.cred,
        &launch.program,
        &launch.argv,
        &launch.env,
        controlling_tty,
    )
    .map_err(exec_err)?;
    cmd.spawn().map_err(exec_err)
}

/// Forks and execs `launch` in a new session, stdin from `/dev/null` (or a pipe), stdout and
/// stderr to pipes. An exec failure in the child comes back as the error.
pub(crate) fn spawn(launch: &Launch, stdin_pipe: bool) -> Result<Spawned, String> {
    // Program, argv and env are passed to execve by the pre-exec hook; std only sets up the pipes.
    let mut cmd = Command::new(&launch.program);
    cmd.stdin(if stdin_pipe { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = start(&mut cmd, launch, false)?;
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    let stdin = child.stdin.take().map(nonblocking).transpose()?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let stderr = child.stderr.take().ok_or("no stderr pipe")?;
    // `child` is dropped without waiting: init reaps every child itself with waitpid(-1).
    Ok(Spawned {
        pid,
        stdin,
        stdout: nonblocking(stdout)?,
        stderr: nonblocking(stderr)?,
    })
}

/// Forks and execs `launch` on a new pseudo-terminal of `rows` × `cols`: the slave is its stdin,
/// stdout and stderr and the controlling terminal of its new session; it owns the slave (as after
/// a login). Returns the pid and the master, non-blocking; init keeps no descriptor of the slave,
/// so reading the master fails with EIO once every process of the session closed it.
pub(crate) fn spawn_tty(launch: &Launch, rows: u16, cols: u16) -> Result<(i32, File), String> {
    let (master, slave) = sys::open_pty(rows, cols).map_err(|e| format!("allocate a terminal: {e}"))?;
    let _ = std::os::unix::fs::fchown(&slave, Some(launch.cred.uid), None);
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("duplicate the terminal: {e}"));
    let mut cmd = Command::new(&launch.program);
    cmd.stdin(Stdio::from(dup(&slave)?))
        .stdout(Stdio::from(dup(&slave)?))
        .stderr(Stdio::from(slave));
    let child = start(&mut cmd, launch, true)?;
    // The command holds init's copies of the slave until it is dropped.
    drop(cmd);
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    Ok((pid, nonblocking(master)?))
}
