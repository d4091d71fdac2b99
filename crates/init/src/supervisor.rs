//! The main loop once the workload runs: one thread, poll(2) over the signalfd, the channel and
//! every child's pipes. Reaps all children, serves the host's requests, streams output, and
//! powers the machine off when the workload ends.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use aloft_guest_proto::{
    CONSOLE_ERROR_MARKER, CONSOLE_EXIT_MARKER, DataStream, ExecExit, ExecRequest, Frame, GuestStatus,
    PROTOCOL_VERSION, WorkloadExit, WorkloadState,
};

use crate::channel::{CHUNK, Channel};
use crate::session::{Chunk, Pipes, Session};
use crate::spawn::{self, Launch, Spawned};
use crate::sys::{self, Ended};
use crate::{console, procs, spec};

/// Stop timeout when init itself gets SIGTERM/SIGINT/SIGPWR.
const SIGNAL_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the channel's connection is re-checked while no host is connected.
pub(crate) const RECONNECT_POLL_MS: i32 = 50;

/// An exec session's environment: the workload's, then the request's; on a terminal `TERM` is
/// `xterm` unless the request sets it (the workload's own `TERM` describes no terminal of the user's).
fn exec_env(workload: &[(String, String)], req: &ExecRequest) -> Vec<(String, String)> {
    let mut env = workload.to_vec();
    for (k, v) in &req.env {
        spec::set_env(&mut env, k, v);
    }
    if req.tty.is_some() && !req.env.iter().any(|(k, _)| k == "TERM") {
        spec::set_env(&mut env, "TERM", "xterm");
    }
    env
}

/// Milliseconds since boot (`/proc/uptime`).
pub(crate) fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|t| t.parse::<f64>().ok()))
        .map_or(0, |secs| {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "uptime is small and positive"
            )]
            let ms = (secs * 1000.0) as u64;
            ms
        })
}

/// The kernel's OOM-kill counter (`oom_kill` in `/proc/vmstat`).
pub(crate) fn oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// What to run as the workload, and the defaults exec sessions inherit.
#[derive(Debug)]
pub(crate) struct Workload {
    pub(crate) launch: Launch,
    pub(crate) user_spec: String,
    pub(crate) stop_signal: i32,
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Signals,
    Channel,
    Workload(DataStream),
    SessionOut(u32, DataStream),
    SessionIn(u32),
}

#[derive(Debug)]
pub(crate) struct Supervisor {
    ch: Channel,
    sigfd: OwnedFd,
    state: WorkloadState,
    workload: Option<Workload>,
    pid: i32,
    pipes: Pipes,
    ended: Option<Ended>,
    requested_stop: bool,
    kill_at: Option<Instant>,
    oom_at_start: u64,
    sessions: BTreeMap<u32, Session>,
}

impl Supervisor {
    pub(crate) fn new(ch: Channel, sigfd: OwnedFd) -> Self {
        Self {
            ch,
            sigfd,
            state: WorkloadState::Starting,
            workload: None,
            pid: 0,
            pipes: Pipes::default(),
            ended: None,
            requested_stop: false,
            kill_at: None,
            oom_at_start: 0,
            sessions: BTreeMap::new(),
        }
    }

    fn status(&self) -> Frame {
        Frame::Status(GuestStatus {
            workload: self.state.clone(),
            uptime_ms: uptime_ms(),
            dropped_log_bytes: self.ch.dropped_log_bytes,
            protocol: PROTOCOL_VERSION,
            awaiting_boot: false,
        })
    }

    fn set_state(&mut self, state: WorkloadState) {
        self.state = state;
        let status = self.status();
        self.ch.send(&status);
        self.ch.flush();
    }

    /// The workload could not be started: tell the host (waiting briefly for one), print the
    /// error marker, power off.
    pub(crate) fn fail(mut self, message: &str) -> ! {
        self.set_state(WorkloadState::Failed {
            message: message.to_owned(),
        });
        self.drain_channel(true);
        console::line(&format!("{CONSOLE_ERROR_MARKER}{message}"));
        self.power_off()
    }

    /// Starts the workload and runs the loop until it ends; then reports and powers off.
    pub(crate) fn run(mut self, workload: Workload) -> ! {
        self.oom_at_start = oom_kills();
        match spawn::spawn(&workload.launch, false) {
            Ok(Spawned {
                pid, stdout, stderr, ..
            }) => {
                self.pid = pid;
                self.pipes = Pipes {
                    stdout: Some(stdout),
                    stderr: Some(stderr),
                };
                self.workload = Some(workload);
                console::trace("workload spawned");
                self.set_state(WorkloadState::Running { pid });
                console::trace("host told");
            }
            Err(message) => self.fail(&message),
        }
        loop {
            self.turn();
            if let Some(ended) = self.ended {
                self.finish(ended);
            }
        }
    }

    /// One poll round.
    fn turn(&mut self) {
        self.ch.refresh();
        if self.ch.has_unread() {
            // What came with a template's boot request (main.rs): no poll announces it.
            for frame in self.ch.read_frames() {
                self.on_frame(frame);
            }
        }
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut srcs: Vec<Source> = Vec::new();
        let mut add = |fd: RawFd, events: i16, src: Source| {
            fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
            srcs.push(src);
        };
        add(self.sigfd.as_raw_fd(), libc::POLLIN, Source::Signals);
        if let Some((fd, ev)) = self.ch.poll_fd() {
            add(fd, ev, Source::Channel);
        }
        if self.ch.accepts_output() {
            for stream in [DataStream::Stdout, DataStream::Stderr] {
                if let Some(f) = self.pipes.get(stream) {
                    add(f.as_raw_fd(), libc::POLLIN, Source::Workload(stream));
                }
            }
            for (&chan, s) in &self.sessions {
                for (fd, stream) in s.output_fds() {
                    add(fd, libc::POLLIN, Source::SessionOut(chan, stream));
                }
            }
        }
        for (&chan, s) in &self.sessions {
            if let Some(fd) = s.stdin_fd() {
                add(fd, libc::POLLOUT, Source::SessionIn(chan));
            }
        }
        let mut timeout = -1;
        if self.ch.exists() && !self.ch.connected() {
            timeout = RECONNECT_POLL_MS;
        }
        let may_read = self.ch.accepts_output();
        let wake = self.sessions.values().filter_map(|s| s.wake_at(may_read));
        if let Some(at) = self.kill_at.into_iter().chain(wake).min() {
            // Rounded up: waking a little early would only poll again for the rest.
            let left = at
                .saturating_duration_since(Instant::now())
                .as_micros()
                .div_ceil(1000);
            let left = i32::try_from(left).unwrap_or(i32::MAX);
            timeout = if timeout < 0 { left } else { timeout.min(left) };
        }
        if let Err(e) = sys::poll(&mut fds, timeout) {
            console::diag(&format!("poll: {e}"));
            std::thread::sleep(Duration::from_millis(10));
            return;
        }
        for (pfd, src) in fds.iter().zip(srcs) {
            if pfd.revents == 0 {
                continue;
            }
            match src {
                Source::Signals => self.on_signals(),
                Source::Channel => {
                    for frame in self.ch.read_frames() {
                        self.on_frame(frame);
                    }
                }
                Source::Workload(stream) => {
                    if let Chunk::Data(data) = self.pipes.read_chunk(stream, CHUNK) {
                        self.ch.log(stream, &data);
                    }
                }
                Source::SessionOut(chan, stream) => self.read_session(chan, stream),
                Source::SessionIn(chan) => {
                    if let Some(s) = self.sessions.get_mut(&chan) {
                        s.pump_stdin();
                    }
                }
            }
        }
        if let Some(at) = self.kill_at
            && Instant::now() >= at
            && self.ended.is_none()
        {
            let _ = sys::kill(self.pid, libc::SIGKILL);
            self.kill_at = None;
        }
        self.finish_sessions();
        self.ch.flush();
    }

    fn read_session(&mut self, chan: u32, stream: DataStream) {
        let Some(s) = self.sessions.get_mut(&chan) else {
            return;
        };
        if let Some(data) = s.read(stream) {
            self.ch.send(&Frame::ExecOutput { chan, stream, data });
        }
    }

    /// Sends `ExecExited` for sessions whose process was reaped and whose output is all sent.
    fn finish_sessions(&mut self) {
        let now = Instant::now();
        let mut done = Vec::new();
        let mut last = Vec::new();
        for (&chan, s) in &mut self.sessions {
            let exit = s.settle(now, self.ch.accepts_output(), &mut last);
            for data in last.drain(..) {
                self.ch.send(&Frame::ExecOutput {
                    chan,
                    stream: DataStream::Stdout,
                    data,
                });
            }
            if let Some(exit) = exit {
                done.push((chan, exit));
            }
        }
        for (chan, exit) in done {
            self.sessions.remove(&chan);
            self.ch.send(&Frame::ExecExited { chan, exit });
        }
    }

    fn on_signals(&mut self) {
        for signo in sys::read_signals(self.sigfd.as_fd()) {
            match signo {
                libc::SIGCHLD => self.reap(),
                libc::SIGTERM | libc::SIGINT | libc::SIGPWR => self.stop(None, SIGNAL_STOP_TIMEOUT),
                _ => {}
            }
        }
        // A SIGCHLD can be merged with others or arrive while a signal is being read: reap anyway.
        self.reap();
    }

    fn reap(&mut self) {
        while let Some((pid, how)) = sys::reap_one() {
            if pid == self.pid && self.ended.is_none() {
                self.ended = Some(how);
            } else if let Some(s) = self.sessions.values_mut().find(|s| s.pid == pid && s.running()) {
                let exit = match how {
                    Ended::Code(c) => ExecExit {
                        exit_code: Some(c),
                        signal: None,
                    },
                    Ended::Signal(sig) => ExecExit {
                        exit_code: None,
                        signal: Some(sig),
                    },
                };
                s.exited(exit, Instant::now());
            }
        }
    }

    fn stop(&mut self, signal: Option<i32>, timeout: Duration) {
        if !matches!(self.state, WorkloadState::Running { .. }) || self.ended.is_some() {
            return;
        }
        let sig = signal.unwrap_or_else(|| self.workload.as_ref().map_or(libc::SIGINT, |w| w.stop_signal));
        self.requested_stop = true;
        if let Err(e) = sys::kill(self.pid, sig) {
            console::diag(&format!("stop: signal {sig} to {}: {e}", self.pid));
        }
        let at = Instant::now() + timeout;
        self.kill_at = Some(self.kill_at.map_or(at, |old| old.min(at)));
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Hello => {
                // A host that (re)connects did not grant the running sessions' credit: were it a
                // new one (the agent restarted), they would wait for credit forever.
                for s in self.sessions.values_mut() {
                    s.lift_credit();
                }
                let status = self.status();
                self.ch.hello(&status);
            }
            Frame::Exec { chan, req } => self.exec(chan, req),
            Frame::Stdin { chan, data } => {
                if let Some(s) = self.sessions.get_mut(&chan) {
                    s.input(&data);
                } else {
                    self.error(chan, format!("no such session: {chan}"));
                }
            }
            Frame::Resize { chan, rows, cols } => match self.sessions.get(&chan) {
                Some(s) => {
                    if let Err(e) = s.resize(rows, cols) {
                        self.error(chan, format!("resize the terminal of session {chan}: {e}"));
                    }
                }
                None => self.error(chan, format!("no such session: {chan}")),
            },
            Frame::Credit { chan, bytes } => {
                // Credit can race the session's end: an unknown session is no error.
                if let Some(s) = self.sessions.get_mut(&chan) {
                    s.credit(bytes);
                }
            }
            Frame::Signal { chan: 0, signal } => {
                if matches!(self.state, WorkloadState::Running { .. }) && self.ended.is_none() {
                    if let Err(e) = sys::kill(self.pid, signal) {
                        self.error(0, format!("signal {signal} to the workload: {e}"));
                    }
                } else {
                    self.error(0, "the workload is not running".to_owned());
                }
            }
            Frame::Signal { chan, signal } => match self.sessions.get(&chan) {
                Some(s) if s.running() => {
                    if let Err(e) = s.signal(signal) {
                        self.error(chan, format!("signal {signal} to session {chan}: {e}"));
                    }
                }
                _ => self.error(chan, format!("no such session: {chan}")),
            },
            Frame::Stop { signal, timeout_ms } => self.stop(signal, Duration::from_millis(timeout_ms)),
            Frame::ListProcesses { chan } => {
                let processes = procs::list_processes();
                self.ch.send(&Frame::Processes { chan, processes });
            }
            Frame::Sync { chan } => {
                // Blocks until the page cache is on the disks: the host is about to snapshot one.
                sys::sync();
                self.ch.send(&Frame::Synced { chan });
                self.ch.flush();
            }
            Frame::SetTime { unix_nanos } => {
                if let Err(e) = sys::set_realtime(unix_nanos) {
                    console::diag(&format!("set time: {e}"));
                }
            }
            // Only a template that still waits acts on a boot request (template.rs); this one is
            // booted. Not echoed back: it carries the whole run config and the seed.
            Frame::Boot(_) => console::diag("boot request for a booted machine: ignored"),
            other => self.error(0, format!("unexpected frame from the host: {other:?}")),
        }
    }

    fn error(&mut self, chan: u32, message: String) {
        self.ch.send(&Frame::Error { chan, message });
    }

    fn exec(&mut self, chan: u32, req: ExecRequest) {
        if chan == 0 || self.sessions.contains_key(&chan) {
            return self.error(chan, format!("session {chan} already exists"));
        }
        let Some(w) = &self.workload else {
            return self.error(chan, "the workload is not running".to_owned());
        };
        let user_spec = req.user.as_deref().unwrap_or(&w.user_spec);
        let workdir = req.working_dir.as_deref().unwrap_or(&w.launch.cred.workdir);
        let mut env = exec_env(&w.launch.env, &req);
        let other_user = req.user.is_some();
        let started = spawn::lookup_user(user_spec)
            .and_then(|user| {
                // Another user than the workload's gets its own HOME unless the request sets one.
                if other_user && !req.env.iter().any(|(k, _)| k == "HOME") {
                    spec::set_env(&mut env, "HOME", user.home.as_deref().unwrap_or("/"));
                }
                spawn::prepare(req.argv, env, &user, workdir)
            })
            .and_then(|launch| Session::start(&launch, req.stdin, req.tty));
        match started {
            Ok(s) => {
                self.ch.send(&Frame::ExecStarted { chan, pid: s.pid });
                self.sessions.insert(chan, s);
            }
            Err(message) => self.error(chan, message),
        }
    }

    /// The workload ended: report, stop everything else, power off.
    fn finish(&mut self, ended: Ended) -> ! {
        // Whatever it wrote before exiting is in the pipes: forward it before the exit.
        for stream in [DataStream::Stdout, DataStream::Stderr] {
            while let Chunk::Data(data) = self.pipes.read_chunk(stream, CHUNK) {
                self.ch.log(stream, &data);
            }
        }
        self.pipes = Pipes::default();
        let (exit_code, signal) = match ended {
            Ended::Code(c) => (Some(c), None),
            Ended::Signal(s) => (None, Some(s)),
        };
        let exit = WorkloadExit {
            exit_code,
            signal,
            oom_killed: signal == Some(libc::SIGKILL) && oom_kills() > self.oom_at_start,
            requested_stop: self.requested_stop,
        };
        self.set_state(WorkloadState::Exited { exit });
        let json = serde_json::to_string(&exit).unwrap_or_default();
        console::line(&format!("{CONSOLE_EXIT_MARKER}{json}"));
        self.kill_everything();
        sys::sync();
        self.drain_channel(false);
        self.power_off()
    }

    /// SIGTERM to every process, up to a second to go, then SIGKILL.
    fn kill_everything(&mut self) {
        // kill(-1) also "reaches" kernel threads, so it cannot tell whether anyone is left; every
        // user process is init's child or becomes one when its parent dies, so ask waitid instead.
        while sys::reap_one().is_some() {}
        if sys::no_children() {
            return;
        }
        let _ = sys::kill(-1, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            while sys::reap_one().is_some() {}
            if sys::no_children() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = sys::kill(-1, libc::SIGKILL);
        std::thread::sleep(Duration::from_millis(20));
        while sys::reap_one().is_some() {}
    }

    /// Flushes the outgoing queue for up to ~2 s. With `wait_for_host`, also waits that long for a
    /// host to connect and say hello (the failure path: the host should learn why).
    fn drain_channel(&mut self, wait_for_host: bool) {
        if !self.ch.exists() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            self.ch.refresh();
            if self.ch.connected() {
                for frame in self.ch.read_frames() {
                    match frame {
                        Frame::Hello => {
                            let status = self.status();
                            self.ch.hello(&status);
                        }
                        Frame::Exec { chan, .. } | Frame::ListProcesses { chan } => {
                            self.error(chan, "the machine is shutting down".to_owned());
                        }
                        // Syncing is still meaningful (and cheap) while shutting down.
                        Frame::Sync { chan } => {
                            sys::sync();
                            self.ch.send(&Frame::Synced { chan });
                        }
                        _ => {}
                    }
                }
                self.ch.flush();
            }
            let done = if self.ch.said_hello() {
                !self.ch.has_pending()
            } else {
                !wait_for_host && !self.ch.connected()
            };
            if done || Instant::now() >= deadline {
                return;
            }
            let mut pfd: Vec<libc::pollfd> = self
                .ch
                .poll_fd()
                .map(|(fd, events)| libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                })
                .into_iter()
                .collect();
            let _ = sys::poll(&mut pfd, RECONNECT_POLL_MS);
        }
    }

    fn power_off(&mut self) -> ! {
        sys::sync();
        loop {
            let e = sys::power_off();
            console::diag(&format!("power off: {e}"));
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use aloft_guest_proto::TtySize;

    use super::*;

    #[test]
    fn term_defaults_to_xterm_on_a_terminal_only() {
        let workload = vec![
            ("PATH".to_owned(), "/bin".to_owned()),
            ("TERM".to_owned(), "dumb".to_owned()),
        ];
        let get = |env: &[(String, String)], k: &str| spec::get_env(env, k).map(str::to_owned);
        let tty = Some(TtySize { rows: 24, cols: 80 });
        let plain = ExecRequest::default();
        assert_eq!(get(&exec_env(&workload, &plain), "TERM").as_deref(), Some("dumb"));
        let on_tty = ExecRequest {
            tty,
            ..ExecRequest::default()
        };
        let env = exec_env(&workload, &on_tty);
        assert_eq!(get(&env, "TERM").as_deref(), Some("xterm"));
        assert_eq!(get(&env, "PATH").as_deref(), Some("/bin"));
        let own = ExecRequest {
            tty,
            env: vec![("TERM".into(), "screen-256color".into())],
            ..ExecRequest::default()
        };
        assert_eq!(
            get(&exec_env(&workload, &own), "TERM").as_deref(),
            Some("screen-256color")
        );
    }
}
