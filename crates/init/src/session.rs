//! Exec sessions: a command's pipes or pseudo-terminal, its stdin, the flow control of its output
//! ([`Frame::Credit`](aloft_guest_proto::Frame::Credit)) and when its end can be reported. The
//! supervisor polls the descriptors and moves the bytes; nothing here blocks.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use aloft_guest_proto::{DataStream, ExecExit, TtySize};

use crate::channel::CHUNK;
use crate::spawn::{self, Launch};
use crate::sys;

/// After a terminal session's command exited, how long its terminal's output is still relayed
/// before a quiet terminal ends the session (processes it left behind may hold the terminal open).
const TTY_LINGER: Duration = Duration::from_millis(300);
/// Output relayed from a terminal after [`TTY_LINGER`] before the session ends anyway (a process
/// left behind that keeps writing).
const TTY_LINGER_BYTES: usize = 64 * 1024;
/// The EOF character when the terminal's cannot be read.
const DEFAULT_EOF: u8 = 0x04;

/// What a non-blocking read of an output got.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Chunk {
    Data(Vec<u8>),
    /// Nothing waiting.
    Empty,
    /// EOF (or EIO: a terminal whose slave side every process closed). The stream is closed.
    Closed,
}

/// Output pipes of a process (or a terminal's master as `stdout`); `None` once at EOF.
#[derive(Debug, Default)]
pub(crate) struct Pipes {
    pub(crate) stdout: Option<File>,
    pub(crate) stderr: Option<File>,
}

impl Pipes {
    pub(crate) fn closed(&self) -> bool {
        self.stdout.is_none() && self.stderr.is_none()
    }

    pub(crate) fn get(&mut self, stream: DataStream) -> &mut Option<File> {
        match stream {
            DataStream::Stdout => &mut self.stdout,
            DataStream::Stderr => &mut self.stderr,
        }
    }

    /// Reads up to `max` bytes from `stream`. EOF and errors close it.
    pub(crate) fn read_chunk(&mut self, stream: DataStream, max: usize) -> Chunk {
        let slot = self.get(stream);
        let Some(file) = slot.as_mut() else {
            return Chunk::Closed;
        };
        let mut buf = vec![0u8; max.clamp(1, CHUNK)];
        loop {
            match file.read(&mut buf) {
                Ok(0) => {
                    *slot = None;
                    return Chunk::Closed;
                }
                Ok(n) => {
                    buf.truncate(n);
                    return Chunk::Data(buf);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Chunk::Empty,
                Err(_) => {
                    *slot = None;
                    return Chunk::Closed;
                }
            }
        }
    }
}

/// One exec session.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) pid: i32,
    pipes: Pipes,
    stdin: Option<File>,
    stdin_buf: Vec<u8>,
    close_stdin: bool,
    /// The terminal's master (a descriptor of its own for ioctls), when on a terminal.
    tty: Option<File>,
    exit: Option<ExecExit>,
    exited_at: Option<Instant>,
    /// Terminal output relayed after [`TTY_LINGER`].
    lingered: usize,
    /// Output bytes read since the start.
    sent: u64,
    /// Output bytes the host allows since the start; `None` (unlimited) until its first credit.
    granted: Option<u64>,
}

impl Session {
    /// Starts `launch` on pipes (stdin a pipe when `stdin`, else `/dev/null`) or, with `tty`, on a
    /// new pseudo-terminal of that size.
    pub(crate) fn start(launch: &Launch, stdin: bool, tty: Option<TtySize>) -> Result<Self, String> {
        let (pid, pipes, stdin, tty) = match tty {
            Some(size) => {
                let (pid, master) = spawn::spawn_tty(launch, size.rows, size.cols)?;
                let dup = || {
                    master
                        .try_clone()
                        .map_err(|e| format!("duplicate the terminal: {e}"))
                };
                let (input, ioctl) = (dup()?, dup()?);
                let pipes = Pipes {
                    stdout: Some(master),
                    stderr: None,
                };
                (pid, pipes, Some(input), Some(ioctl))
            }
            None => {
                let p = spawn::spawn(launch, stdin)?;
                let pipes = Pipes {
                    stdout: Some(p.stdout),
                    stderr: Some(p.stderr),
                };
                (p.pid, pipes, p.stdin, None)
            }
        };
        Ok(Self {
            pid,
            pipes,
            stdin,
            stdin_buf: Vec::new(),
            close_stdin: false,
            tty,
            exit: None,
            exited_at: None,
            lingered: 0,
            sent: 0,
            granted: None,
        })
    }

    /// Whether the command is still running (not reaped yet).
    pub(crate) fn running(&self) -> bool {
        self.exit.is_none()
    }

    /// Output bytes the host lets this session send now (at most a chunk).
    fn allowance(&self) -> usize {
        let left = self.granted.map_or(u64::MAX, |g| g.saturating_sub(self.sent));
        usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK)
    }

    /// The output descriptors to poll for reading: none while the host's credit is used up.
    pub(crate) fn output_fds(&self) -> Vec<(RawFd, DataStream)> {
        if self.allowance() == 0 {
            return Vec::new();
        }
        [
            (&self.pipes.stdout, DataStream::Stdout),
            (&self.pipes.stderr, DataStream::Stderr),
        ]
        .into_iter()
        .filter_map(|(f, s)| f.as_ref().map(|f| (f.as_raw_fd(), s)))
        .collect()
    }

    /// The stdin descriptor to poll for writing, while input waits.
    pub(crate) fn stdin_fd(&self) -> Option<RawFd> {
        match (&self.stdin, self.stdin_buf.is_empty()) {
            (Some(f), false) => Some(f.as_raw_fd()),
            _ => None,
        }
    }

    /// Reads one chunk of `stream` within the host's credit; `None` when nothing was read.
    pub(crate) fn read(&mut self, stream: DataStream) -> Option<Vec<u8>> {
        let max = self.allowance();
        if max == 0 {
            return None;
        }
        match self.pipes.read_chunk(stream, max) {
            Chunk::Data(d) => {
                self.sent += d.len() as u64;
                if self.past_linger(Instant::now()) {
                    self.lingered += d.len();
                }
                Some(d)
            }
            Chunk::Empty | Chunk::Closed => None,
        }
    }

    /// The host allows `bytes` more output.
    pub(crate) fn credit(&mut self, bytes: u32) {
        self.granted = Some(self.granted.unwrap_or(0).saturating_add(u64::from(bytes)));
    }

    /// No more flow control: the host that granted credit is gone.
    pub(crate) fn lift_credit(&mut self) {
        self.granted = None;
    }

    /// Input from the host. Empty closes stdin once what is buffered is written; on a terminal it
    /// writes the terminal's EOF character instead (the terminal stays open).
    pub(crate) fn input(&mut self, data: &[u8]) {
        if data.is_empty() {
            match &self.tty {
                Some(t) => self.stdin_buf.push(sys::eof_char(t).unwrap_or(DEFAULT_EOF)),
                None => self.close_stdin = true,
            }
        } else if self.stdin.is_some() {
            self.stdin_buf.extend_from_slice(data);
        }
        self.pump_stdin();
    }

    /// Writes buffered stdin without blocking; closes it when asked and drained.
    pub(crate) fn pump_stdin(&mut self) {
        if let Some(f) = &mut self.stdin {
            while !self.stdin_buf.is_empty() {
                match f.write(&self.stdin_buf) {
                    Ok(n) => {
                        self.stdin_buf.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(_) => {
                        // EPIPE: the process closed its stdin (EIO: the terminal is gone).
                        self.stdin = None;
                        self.stdin_buf.clear();
                        return;
                    }
                }
            }
        }
        if self.close_stdin && self.stdin_buf.is_empty() {
            self.stdin = None;
        }
    }

    /// Sets the terminal's size (SIGWINCH to its foreground process group); a session without a
    /// terminal ignores it.
    pub(crate) fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        match &self.tty {
            Some(t) => sys::set_winsize(t, rows, cols),
            None => Ok(()),
        }
    }

    /// Sends `signal` to the command, or on a terminal to its process group (the session it leads).
    pub(crate) fn signal(&self, signal: i32) -> io::Result<()> {
        let target = if self.tty.is_some() { -self.pid } else { self.pid };
        sys::kill(target, signal)
    }

    /// The command was reaped.
    pub(crate) fn exited(&mut self, exit: ExecExit, now: Instant) {
        self.exit = Some(exit);
        self.exited_at = Some(now);
    }

    fn past_linger(&self, now: Instant) -> bool {
        self.exited_at.is_some_and(|at| now >= at + TTY_LINGER)
    }

    /// When [`Session::settle`] must run again even if no descriptor is ready: a terminal session
    /// whose command exited and that may read (nothing to wait for while the host holds back).
    pub(crate) fn wake_at(&self, may_read: bool) -> Option<Instant> {
        let at = self.exited_at? + TTY_LINGER;
        (self.tty.is_some() && !self.pipes.closed() && may_read && self.allowance() > 0).then_some(at)
    }

    /// After the command exited: the session's end once its output is all read. Pipes end at EOF.
    /// A terminal ends at EIO (every process closed it) or, when processes the command left behind
    /// still hold it, once it is quiet after [`TTY_LINGER`] or [`TTY_LINGER_BYTES`] later: then the
    /// master is closed (they get SIGHUP). `out` gets what a last read found; `may_read` says
    /// whether the host takes output now.
    pub(crate) fn settle(
        &mut self,
        now: Instant,
        may_read: bool,
        out: &mut Vec<Vec<u8>>,
    ) -> Option<ExecExit> {
        let exit = self.exit?;
        if self.tty.is_some() && !self.pipes.closed() && may_read && self.past_linger(now) {
            if self.lingered >= TTY_LINGER_BYTES {
                self.pipes = Pipes::default();
            } else if self.allowance() > 0 {
                match self.read(DataStream::Stdout) {
                    Some(d) => out.push(d),
                    None => self.pipes = Pipes::default(),
                }
            }
        }
        if self.pipes.closed() {
            self.stdin = None;
            self.tty = None;
            Some(exit)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::sys::{Credentials, Ended};

    const PATH: (&str, &str) = ("PATH", "/usr/bin:/bin");

    /// A launch as whoever runs the test (init's credential change is then a no-op).
    fn launch(argv: &[&str], env: &[(&str, &str)]) -> Launch {
        let me = std::fs::metadata("/proc/self").unwrap();
        Launch {
            program: argv[0].into(),
            argv: argv.iter().map(|&a| a.to_owned()).collect(),
            env: env.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())).collect(),
            cred: Credentials {
                uid: me.uid(),
                gid: me.gid(),
                groups: vec![me.gid()],
                workdir: "/".into(),
            },
        }
    }

    fn tty(rows: u16, cols: u16) -> Option<TtySize> {
        Some(TtySize { rows, cols })
    }

    /// The supervisor's loop for one session on its own: relays output, feeds stdin, reaps this
    /// session's child only (tests run in parallel in one process).
    struct Driver {
        s: Session,
        out: Vec<u8>,
        err: Vec<u8>,
    }

    impl Driver {
        fn new(s: Session) -> Self {
            Self {
                s,
                out: Vec::new(),
                err: Vec::new(),
            }
        }

        /// Runs the loop until `until` holds (`None`) or the session ended (its exit). Panics
        /// after 20 s.
        fn run(&mut self, until: impl Fn(&Self) -> bool) -> Option<ExecExit> {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                assert!(
                    Instant::now() < deadline,
                    "session stuck; output {:?}",
                    self.text()
                );
                if until(self) {
                    return None;
                }
                let mut fds: Vec<libc::pollfd> = Vec::new();
                let mut what = Vec::new();
                for (fd, stream) in self.s.output_fds() {
                    fds.push(libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    what.push(Some(stream));
                }
                if let Some(fd) = self.s.stdin_fd() {
                    fds.push(libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    });
                    what.push(None);
                }
                sys::poll(&mut fds, 20).unwrap();
                for (p, w) in fds.iter().zip(what) {
                    if p.revents == 0 {
                        continue;
                    }
                    match w {
                        Some(stream) => {
                            if let Some(d) = self.s.read(stream) {
                                match stream {
                                    DataStream::Stdout => self.out.extend_from_slice(&d),
                                    DataStream::Stderr => self.err.extend_from_slice(&d),
                                }
                            }
                        }
                        None => self.s.pump_stdin(),
                    }
                }
                if self.s.running()
                    && let Some((_, how)) = sys::reap(self.s.pid)
                {
                    let exit = match how {
                        Ended::Code(c) => ExecExit {
                            exit_code: Some(c),
                            signal: None,
                        },
                        Ended::Signal(s) => ExecExit {
                            exit_code: None,
                            signal: Some(s),
                        },
                    };
                    self.s.exited(exit, Instant::now());
                }
                let mut last = Vec::new();
                let end = self.s.settle(Instant::now(), true, &mut last);
                for d in last {
                    self.out.extend_from_slice(&d);
                }
                if end.is_some() {
                    return end;
                }
            }
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.out).into_owned()
        }
    }

    #[test]
    fn shell_on_a_terminal_computes_resizes_and_exits() {
        let l = launch(&["/bin/sh"], &[PATH, ("PS1", "$ ")]);
        let mut d = Driver::new(Session::start(&l, false, tty(24, 80)).unwrap());
        // Outputs are computed so the terminal's echo of the input never matches them.
        d.s.input(b"echo $((6*7))\n");
        d.run(|d| d.text().contains("42\r\n"));
        // The terminal is stdin, stdout and stderr, and the shell's controlling terminal.
        d.s.input(b"test -t 0 && test -t 1 && test -t 2 && echo T$((1+1)); tty </dev/tty >/dev/null && echo C$((1+2))\n");
        d.run(|d| d.text().contains("T2\r\n") && d.text().contains("C3\r\n"));
        d.s.resize(40, 120).unwrap();
        d.s.input(b"stty size\n");
        d.run(|d| d.text().contains("40 120\r\n"));
        d.s.input(b"exit 3\n");
        let exit = d.run(|_| false).unwrap();
        assert_eq!(exit.exit_code, Some(3), "{}", d.text());
        assert!(d.err.is_empty(), "a terminal has no separate stderr");
    }

    #[test]
    fn terminal_output_written_just_before_exit_is_not_lost() {
        let l = launch(&["/bin/sh", "-c", "seq 1 3000; exit 5"], &[PATH]);
        let mut d = Driver::new(Session::start(&l, false, tty(24, 80)).unwrap());
        let exit = d.run(|_| false).unwrap();
        assert_eq!(exit.exit_code, Some(5));
        let text = d.text();
        assert!(
            text.ends_with("2999\r\n3000\r\n"),
            "tail: {:?}",
            &text[text.len().saturating_sub(40)..]
        );
    }

    #[test]
    fn empty_input_on_a_terminal_is_eof_and_keeps_it_open() {
        let l = launch(&["/bin/cat"], &[]);
        let mut d = Driver::new(Session::start(&l, false, tty(24, 80)).unwrap());
        d.s.input(b"abc\n");
        // The terminal's echo, then cat's copy.
        d.run(|d| d.text().matches("abc\r\n").count() == 2);
        d.s.input(b"");
        let exit = d.run(|_| false).unwrap();
        assert_eq!(exit.exit_code, Some(0), "{}", d.text());
    }

    #[test]
    fn a_process_left_holding_the_terminal_does_not_keep_the_session() {
        // The background sleep ignores SIGHUP and keeps the terminal open after the shell exits.
        let l = launch(
            &["/bin/sh", "-c", "trap '' HUP; sleep 10 & echo started"],
            &[PATH],
        );
        let mut d = Driver::new(Session::start(&l, false, tty(24, 80)).unwrap());
        let t0 = Instant::now();
        let exit = d.run(|_| false).unwrap();
        assert_eq!(exit.exit_code, Some(0));
        assert!(d.text().contains("started"));
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    #[test]
    fn signal_on_a_terminal_reaches_the_process_group() {
        // Sent to the shell alone, SIGTERM would wait for sleep to finish before the trap runs;
        // sent to the group it ends sleep at once. "ready" comes from the subshell that becomes
        // sleep, so sleep (or its subshell, with the default disposition) exists by then.
        let l = launch(
            &[
                "/bin/sh",
                "-c",
                "trap 'echo trapped' TERM; (echo ready; exec sleep 30); echo after",
            ],
            &[PATH],
        );
        let mut d = Driver::new(Session::start(&l, false, tty(24, 80)).unwrap());
        d.run(|d| d.text().contains("ready"));
        let t0 = Instant::now();
        d.s.signal(libc::SIGTERM).unwrap();
        let exit = d.run(|_| false).unwrap();
        assert_eq!(exit.exit_code, Some(0), "{}", d.text());
        assert!(d.text().contains("trapped\r\nafter\r\n"), "{}", d.text());
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    }

    #[test]
    fn stdin_pipe_is_fed_and_closed() {
        let l = launch(&["/bin/sh", "-c", "cat; echo err >&2"], &[PATH]);
        let mut d = Driver::new(Session::start(&l, true, None).unwrap());
        let big = vec![b'x'; 300 * 1024];
        d.s.input(&big);
        d.s.input(b"");
        let exit = d.run(|_| false).unwrap();
        assert_eq!(exit.exit_code, Some(0));
        assert_eq!(d.out.len(), big.len());
        assert_eq!(d.err, b"err\n");
    }

    #[test]
    fn output_stops_at_the_credit_and_resumes_with_more() {
        let l = launch(&["/bin/sh", "-c", "head -c 100000 /dev/zero"], &[PATH]);
        for on_tty in [None, tty(24, 80)] {
            let mut d = Driver::new(Session::start(&l, false, on_tty).unwrap());
            d.s.credit(10_000);
            // The session stops polling its output once 10 000 bytes were read.
            d.run(|d| d.s.output_fds().is_empty());
            assert_eq!(d.out.len(), 10_000);
            std::thread::sleep(Duration::from_millis(100));
            assert!(
                d.s.read(DataStream::Stdout).is_none(),
                "no read beyond the credit"
            );
            d.s.credit(50_000);
            d.run(|d| d.s.output_fds().is_empty());
            assert_eq!(d.out.len(), 60_000);
            d.s.lift_credit();
            let exit = d.run(|_| false).unwrap();
            assert_eq!(exit.exit_code, Some(0));
            assert_eq!(d.out.len(), 100_000);
        }
    }

    #[test]
    fn resize_without_a_terminal_is_ignored_and_a_bad_program_is_an_error() {
        let l = launch(&["/bin/true"], &[]);
        let mut d = Driver::new(Session::start(&l, false, None).unwrap());
        d.s.resize(10, 10).unwrap();
        assert_eq!(d.run(|_| false).unwrap().exit_code, Some(0));
        let bad = launch(&["/nonexistent/x"], &[]);
        let e = Session::start(&bad, false, tty(24, 80)).unwrap_err();
        assert!(e.contains("/nonexistent/x"), "{e}");
    }

    #[test]
    fn terminal_descriptors_are_close_on_exec() {
        let (master, slave) = sys::open_pty(24, 80).unwrap();
        for fd in [master.as_raw_fd(), slave.as_raw_fd()] {
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            assert_ne!(flags & 0o2_000_000, 0, "fd {fd}: {info}");
        }
    }
}
