//! `aloft ssh console` end to end: the real `aloftd` with the in-memory machine driver
//! (`--driver fake --network none`) on a free port with a temporary data directory and config
//! home, and the real `aloft`, on pipes and on a pseudo-terminal.
//!
//! The fake driver's console runs a fake shell: each line of stdin is answered when its newline
//! arrives — `exit N` ends it with status N, `size` prints the pty's `ROWS COLS` (or `no tty`),
//! `env NAME` prints that variable of the session's extra environment, `err TEXT` prints TEXT on
//! stderr (on stdout with a pty), and any other line is echoed on stdout. The end of stdin ends
//! it with 0.
//!
//! `aloftd` is taken from `$ALOFTD_BIN`, else from the target directory next to this test's
//! executable (`target/debug/aloftd`): build it first (`cargo build -p aloftd`).

mod common;

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::os::fd::{AsFd, OwnedFd};
    use std::process::{Child, Command, Output, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    use rustix::termios::{LocalModes, Winsize, tcgetattr, tcsetwinsize};

    use crate::common::{FakeAloftd as Env, stderr, stdout};

    impl Env {
        /// `aloft ARGS…` with `input` on a pipe as stdin.
        fn aloft_with_stdin(&self, args: &[&str], input: &str) -> Output {
            let mut child = self
                .command(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let input = input.to_owned();
            // Written on a thread: the session may end before all of it is read.
            let writer = std::thread::spawn(move || {
                let _ = stdin.write_all(input.as_bytes());
            });
            let out = child.wait_with_output().unwrap();
            writer.join().unwrap();
            out
        }

        /// A started machine in app `web` (created with it): its id.
        fn machine(&self) -> String {
            let out = self.aloft(&[
                "machine", "run", "-a", "web", "--yes", "--json", "busybox", "sleep", "inf",
            ]);
            assert!(out.status.success(), "{}", stderr(&out));
            let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            m["id"].as_str().unwrap().to_owned()
        }
    }

    /// aloftd for these tests: `aloft` runs with a `TERM` of the test's, to see it passed on.
    fn start() -> Env {
        Env::start().with_cli_env("TERM", "xterm-aloft-test")
    }

    fn code(out: &Output) -> Option<i32> {
        out.status.code()
    }

    #[test]
    fn console_on_pipes_relays_stdin_and_output_and_exits_with_the_status() {
        let env = start();
        let id = env.machine();

        // `echo 'echo hi' | aloft ssh console -C sh`, and the command's status as the CLI's.
        let out = env.aloft_with_stdin(
            &["ssh", "console", "-a", "web", "--machine", &id, "-C", "sh"],
            "echo hi\nerr oops\nsize\nenv TERM\nexit 3\n",
        );
        assert_eq!(code(&out), Some(3), "{}", stderr(&out));
        // No pty without terminals (and none asked for): no TERM sent, stderr kept apart.
        assert_eq!(stdout(&out), "echo hi\nno tty\n\n");
        assert_eq!(stderr(&out), "oops\n");

        // No --machine: the app's first started machine. The end of stdin ends the shell: 0.
        let out = env.aloft_with_stdin(&["ssh", "console", "-a", "web", "-C", "sh"], "echo a b\n");
        assert_eq!(code(&out), Some(0), "{}", stderr(&out));
        assert_eq!(stdout(&out), "echo a b\n");

        // --pty without a local terminal: the default size, TERM passed on, stderr merged.
        let out = env.aloft_with_stdin(
            &[
                "ssh", "console", "-a", "web", "--pty", "-C", "sh -i", "-u", "root",
            ],
            "size\nenv TERM\nerr merged\nexit 0\n",
        );
        assert_eq!(code(&out), Some(0), "{}", stderr(&out));
        assert_eq!(stdout(&out), "24 80\nxterm-aloft-test\nmerged\n");
        assert_eq!(stderr(&out), "");

        // No -C: a shell, on pipes no pty.
        let out = env.aloft_with_stdin(&["ssh", "console", "-a", "web"], "size\nexit 4\n");
        assert_eq!(code(&out), Some(4), "{}", stderr(&out));
        assert_eq!(stdout(&out), "no tty\n");
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let env = start();

        // An app without machines.
        let out = env.aloft(&["apps", "create", "web"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = env.aloft(&["ssh", "console", "-a", "web", "-C", "sh"]);
        assert_eq!(code(&out), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("app web has no started machine"),
            "{}",
            stderr(&out)
        );

        let id = env.machine();
        // An unknown machine: exit 3 naming it.
        let out = env.aloft(&[
            "ssh",
            "console",
            "-a",
            "web",
            "--machine",
            "0000000000dead",
            "-C",
            "sh",
        ]);
        assert_eq!(code(&out), Some(3), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("error: machine 0000000000dead not found in app web"),
            "{}",
            stderr(&out)
        );
        // An unknown app.
        let out = env.aloft(&["ssh", "console", "-a", "nope", "--machine", &id, "-C", "sh"]);
        assert_eq!(code(&out), Some(3), "{}", stderr(&out));
        assert!(stderr(&out).contains("app nope not found"), "{}", stderr(&out));
        // A command line that does not split: a usage error before anything is sent.
        let out = env.aloft(&["ssh", "console", "-a", "web", "--machine", &id, "-C", "sh -c 'x"]);
        assert_eq!(code(&out), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains("unbalanced quotes"), "{}", stderr(&out));
        // --select without a terminal to ask on (two started machines to choose from).
        let _second = env.machine();
        let out = env.aloft(&["ssh", "console", "-a", "web", "-s", "-C", "sh"]);
        assert_eq!(code(&out), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("--select needs a terminal"),
            "{}",
            stderr(&out)
        );

        // A stopped machine: the server's 412 and how to start it.
        let out = env.aloft(&["machine", "stop", &id, "-a", "web"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = env.aloft(&["ssh", "console", "-a", "web", "--machine", &id, "-C", "sh"]);
        assert_eq!(code(&out), Some(1), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("(HTTP 412)") && err.contains("stopped"), "{err}");
        assert!(
            err.contains(&format!("hint: start it first: aloft machine start {id} -a web")),
            "{err}"
        );
    }

    /// A pseudo-terminal: the controller (the test's side) and the terminal (the CLI's).
    fn pty(rows: u16, cols: u16) -> (OwnedFd, std::fs::File) {
        let controller = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        grantpt(&controller).unwrap();
        unlockpt(&controller).unwrap();
        let name = ptsname(&controller, Vec::new()).unwrap();
        let terminal = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name.to_str().unwrap())
            .unwrap();
        set_size(&controller, rows, cols);
        (controller, terminal)
    }

    fn set_size(controller: impl AsFd, rows: u16, cols: u16) {
        tcsetwinsize(
            controller,
            Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            },
        )
        .unwrap();
    }

    fn raw(terminal: &std::fs::File) -> bool {
        !tcgetattr(terminal)
            .unwrap()
            .local_modes
            .contains(LocalModes::ICANON)
    }

    /// Waits up to 20 s for `what` to hold.
    fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `aloft ssh console` on a terminal (stdin and stdout), stderr on a pipe: what the CLI
    /// wrote to the terminal so far, the controller to type on, the terminal and the child.
    struct OnTerminal {
        output: Arc<Mutex<Vec<u8>>>,
        controller: std::fs::File,
        terminal: std::fs::File,
        child: Child,
    }

    impl OnTerminal {
        /// Starts it; with `raw`, waits until the terminal is raw (the session is then up).
        fn start(env: &Env, args: &[&str], raw_mode: bool) -> Self {
            let (controller, terminal) = pty(50, 132);
            let before = tcgetattr(&terminal).unwrap();
            assert!(before.local_modes.contains(LocalModes::ICANON | LocalModes::ECHO));
            let child = env
                .command(args)
                .stdin(Stdio::from(terminal.try_clone().unwrap()))
                .stdout(Stdio::from(terminal.try_clone().unwrap()))
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let controller = std::fs::File::from(controller);
            let output = Arc::new(Mutex::new(Vec::new()));
            let mut reader = controller.try_clone().unwrap();
            let sink = Arc::clone(&output);
            // Not joined: it ends with the test process (the terminal stays open on our side).
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = reader.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
            // Typing before the terminal is raw would be echoed and edited by the local line
            // discipline: wait for raw mode (the session is then connected).
            let mut me = Self {
                output,
                controller,
                terminal,
                child,
            };
            if raw_mode {
                wait_for("raw mode", || {
                    if let Some(status) = me.child.try_wait().unwrap() {
                        panic!("aloft exited with {status} before raw mode");
                    }
                    raw(&me.terminal)
                });
            }
            me
        }

        fn output(&self) -> String {
            String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
        }

        fn type_text(&mut self, text: &str) {
            self.controller.write_all(text.as_bytes()).unwrap();
        }

        /// Types `line` until the output contains `want` (the fake shell answers each line).
        fn type_until(&mut self, line: &str, want: &str) {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                self.type_text(line);
                let until = Instant::now() + Duration::from_millis(200);
                while Instant::now() < until {
                    if self.output().contains(want) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                assert!(
                    Instant::now() < deadline,
                    "no {want:?} after typing {line:?}: {:?}",
                    self.output()
                );
            }
        }

        fn wait(mut self) -> (Option<i32>, String, std::fs::File) {
            let status = self.child.wait().unwrap();
            let mut err = String::new();
            self.child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            (status.code(), err, self.terminal)
        }
    }

    fn signal(child: &Child, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name}");
    }

    #[test]
    fn console_on_a_terminal_is_raw_sized_resized_and_restored() {
        let env = start();
        let id = env.machine();

        // Terminals on both sides and no -C: a pty by default, the terminal raw.
        let mut t = OnTerminal::start(&env, &["ssh", "console", "-a", "web", "--machine", &id], true);
        t.type_until("size\n", "50 132\n");
        t.type_until("env TERM\n", "xterm-aloft-test\n");
        // Ctrl-C is a byte for the remote side, not the end of the CLI.
        t.type_until("\u{3}\n", "\u{3}\n");
        assert_eq!(t.child.try_wait().unwrap(), None, "Ctrl-C ended the CLI");
        // A resize is passed on when SIGWINCH comes.
        set_size(&t.controller, 60, 200);
        signal(&t.child, "WINCH");
        t.type_until("size\n", "60 200\n");
        t.type_text("exit 5\n");
        let (code, err, terminal) = t.wait();
        assert_eq!(code, Some(5), "{err}");
        assert_eq!(err, "");
        // The terminal is as it was.
        let after = tcgetattr(&terminal).unwrap();
        assert!(
            after
                .local_modes
                .contains(LocalModes::ICANON | LocalModes::ECHO | LocalModes::ISIG),
            "{after:?}"
        );

        // -C with --pty on a terminal: one.
        let mut t = OnTerminal::start(&env, &["ssh", "console", "-a", "web", "-C", "sh", "--pty"], true);
        t.type_until("size\n", "50 132\n");
        // A signal that would end the CLI ends the session and puts the terminal back.
        signal(&t.child, "TERM");
        let (code, err, terminal) = t.wait();
        assert_eq!(code, Some(143), "{err}");
        assert!(err.contains("interrupted by signal 15"), "{err}");
        assert!(!raw(&terminal));
    }

    #[test]
    fn a_command_on_a_terminal_gets_no_pty_by_default() {
        let env = start();
        let _id = env.machine();
        let mut t = OnTerminal::start(&env, &["ssh", "console", "-a", "web", "-C", "sh"], false);
        // The terminal stays cooked (it echoes what is typed); the shell has no tty.
        t.type_until("size\n", "no tty");
        assert!(!raw(&t.terminal));
        t.type_text("exit 6\n");
        let (code, err, _) = t.wait();
        assert_eq!(code, Some(6), "{err}");
    }
}
