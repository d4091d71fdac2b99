//! What the CLI's integration tests share: where the real `aloftd` is, a free port for it, and
//! [`FakeAloftd`]: one aloftd on the in-memory machine driver with the CLI pointed at it.

#![allow(dead_code, reason = "each test file uses part of it")]
#![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `$ALOFTD_BIN`, else `aloftd` in the directory above this test's `deps/`. `aloftd` is a
/// binary of another package, so Cargo does not build it for aloft-cli's tests.
pub(crate) fn aloftd_bin() -> PathBuf {
    let bin = match std::env::var_os("ALOFTD_BIN").filter(|b| !b.is_empty()) {
        Some(bin) => PathBuf::from(bin),
        None => {
            let exe = std::env::current_exe().unwrap();
            let mut dir = exe.parent().unwrap();
            if dir.ends_with("deps") {
                dir = dir.parent().unwrap();
            }
            dir.join("aloftd")
        }
    };
    assert!(
        bin.is_file(),
        "aloftd is not built ({} is missing): this test runs the real daemon, which Cargo \
         does not build for aloft-cli's tests. Build the workspace first \
         (`cargo build --workspace`) or set ALOFTD_BIN to an aloftd binary",
        bin.display()
    );
    bin
}

/// A loopback port nothing listens on right now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A temporary home for one `aloftd` with the in-memory machine driver (`--driver fake`: machines
/// start and stop at once, nothing runs, no root needed) on a free port, and for
/// the real `aloft` reading the config that aloftd wrote. Nothing outside the temporary directory
/// is read or written; dropping it kills the daemon it started (and only that one).
pub(crate) struct FakeAloftd {
    dir: tempfile::TempDir,
    daemon: Option<Child>,
    cli_env: Vec<(String, String)>,
}

impl FakeAloftd {
    /// Starts aloftd without its edge (`--no-edge --network none`); waits until it listens.
    pub(crate) fn start() -> Self {
        Self::start_with(&["--no-edge", "--network", "none"])
    }

    /// Starts aloftd on the fake driver with `args` added to its data directory, API address and
    /// `--driver fake --no-access-log`; waits until it listens.
    pub(crate) fn start_with(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for d in ["home", "config", "work"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let port = free_port();
        let log = dir.path().join("aloftd.log");
        let child = Command::new(aloftd_bin())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--driver", "fake", "--no-access-log"])
            .args(args)
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env("HOME", dir.path().join("home"))
            .env_remove("ALOFT_DATA_DIR")
            .env_remove("ALOFT_LISTEN")
            .env_remove("ALOFT_REGION")
            .env_remove("ALOFT_DRIVER")
            .env_remove("ALOFT_NETWORK")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut env = Self {
            dir,
            daemon: Some(child),
            cli_env: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("aloftd: listening on") && TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return env;
            }
            if let Some(status) = env.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!("aloftd exited with {status} before listening:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "aloftd did not listen in time:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sets `name` to `value` in every `aloft` this runs.
    pub(crate) fn with_cli_env(mut self, name: &str, value: &str) -> Self {
        self.cli_env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// `name` in the temporary directory (`work/` is where `aloft` runs).
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `aloft ARGS…` with this test's config home, no `ALOFT_*`/`FLY_*` from outside, no
    /// terminal, run in `work/` (no aloft.toml unless the test writes one).
    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_aloft"));
        cmd.args(args)
            .current_dir(self.path("work"))
            .env("XDG_CONFIG_HOME", self.path("config"))
            .env("HOME", self.path("home"))
            .env("ALOFT_DATA_DIR", self.path("cli-data"))
            .env_remove("ALOFT_API_URL")
            .env_remove("ALOFT_API_TOKEN")
            .env_remove("FLY_API_TOKEN")
            .env_remove("ALOFT_REGISTRY")
            .envs(self.cli_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    /// [`Self::command`], run to its end.
    pub(crate) fn aloft(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// `aloft ARGS…` that must succeed: its stdout.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.aloft(args);
        assert!(
            out.status.success(),
            "aloft {args:?} failed ({}): {}{}",
            out.status,
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    /// `aloft ARGS…` that must succeed and print JSON.
    pub(crate) fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// `aloft ARGS…` that must fail with `code`: its stderr.
    pub(crate) fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.aloft(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "aloft {args:?}\nstdout: {}\nstderr: {}",
            stdout(&out),
            stderr(&out)
        );
        stderr(&out)
    }
}

impl Drop for FakeAloftd {
    fn drop(&mut self) {
        // Only the daemon this test started.
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A finished command's stdout as text.
pub(crate) fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A finished command's stderr as text.
pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
