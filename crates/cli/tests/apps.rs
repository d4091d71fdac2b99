//! `aloft apps …` end to end: the real `aloftd` on a free port with a temporary data directory
//! and config home (its first start writes the CLI config there), and the real `aloft` reading
//! that config. Nothing outside the temporary directory is read or written.
//!
//! `aloftd` is a binary of another package, so Cargo does not build it for this test: it is
//! taken from `$ALOFTD_BIN`, else from the target directory next to this test's executable
//! (`target/debug/aloftd`). Build the workspace first (`cargo build --workspace`).

mod common;

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Output, Stdio};
    use std::time::{Duration, Instant};

    use serde_json::Value;

    use crate::common::{aloftd_bin, free_port};

    /// A temporary home for one aloftd and the CLI.
    struct Env {
        dir: tempfile::TempDir,
    }

    impl Env {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("home")).unwrap();
            std::fs::create_dir(dir.path().join("config")).unwrap();
            Self { dir }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// Starts aloftd on `port`, pointed only at this test's directories; waits until it
        /// listens.
        fn start_aloftd(&self, port: u16) -> Daemon {
            let log = self.path("aloftd.log");
            let child = Command::new(aloftd_bin())
                .arg("--data-dir")
                .arg(self.path("data"))
                .arg("--no-edge")
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--no-access-log")
                .args(["--driver", "fake"])
                .env("XDG_CONFIG_HOME", self.path("config"))
                .env("HOME", self.path("home"))
                .env_remove("ALOFT_DATA_DIR")
                .env_remove("ALOFT_LISTEN")
                .env_remove("ALOFT_REGION")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let mut daemon = Daemon { child, log };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let text = daemon.log();
                if text.contains("aloftd: listening on") && TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return daemon;
                }
                if let Some(status) = daemon.child.try_wait().unwrap() {
                    panic!("aloftd exited with {status} before listening:\n{text}");
                }
                assert!(
                    Instant::now() < deadline,
                    "aloftd did not listen in time:\n{text}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        /// Runs `aloft ARGS…` with this test's config home, no `ALOFT_*`/`FLY_*` from outside
        /// (but `extra`), and no terminal.
        fn aloft(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
            self.aloft_with_config(&self.path("config"), args, extra)
        }

        fn aloft_with_config(&self, config_home: &Path, args: &[&str], extra: &[(&str, &str)]) -> Output {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_aloft"));
            cmd.args(args)
                .env("XDG_CONFIG_HOME", config_home)
                .env("HOME", self.path("home"))
                .env("ALOFT_DATA_DIR", self.path("cli-data"))
                .env_remove("ALOFT_API_URL")
                .env_remove("ALOFT_API_TOKEN")
                .env_remove("FLY_API_TOKEN")
                .env_remove("ALOFT_REGISTRY")
                .stdin(Stdio::null());
            for (k, v) in extra {
                cmd.env(k, v);
            }
            cmd.output().unwrap()
        }
    }

    /// The aloftd this test started; killed when dropped.
    struct Daemon {
        child: Child,
        log: PathBuf,
    }

    impl Daemon {
        fn log(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }

        fn stop(&mut self) {
            // Only the child this test started.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Drop for Daemon {
        fn drop(&mut self) {
            self.stop();
        }
    }

    fn stdout(out: &Output) -> String {
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn stderr(out: &Output) -> String {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Succeeded; its stdout.
    fn ok(out: &Output) -> String {
        assert!(
            out.status.success(),
            "aloft failed ({}): {}",
            out.status,
            stderr(out)
        );
        stdout(out)
    }

    /// Failed with `code`; its stderr.
    fn failed(out: &Output, code: i32) -> String {
        assert_eq!(
            out.status.code(),
            Some(code),
            "stdout: {}\nstderr: {}",
            stdout(out),
            stderr(out)
        );
        stderr(out)
    }

    fn names(list: &Value) -> Vec<&str> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn create_list_destroy_and_the_errors_users_meet() {
        let env = Env::new();
        let port = free_port();
        let mut daemon = env.start_aloftd(port);
        let config = std::fs::read_to_string(env.path("config/aloft/config.toml")).unwrap();
        assert!(config.contains(&format!("http://127.0.0.1:{port}")), "{config}");

        // Create: flyctl's line, and the API's object with --json.
        assert_eq!(
            ok(&env.aloft(&["apps", "create", "web"], &[])),
            "New app created: web\n"
        );
        let created: Value = serde_json::from_str(&ok(
            &env.aloft(&["apps", "create", "api", "--org", "personal", "--json"], &[])
        ))
        .unwrap();
        assert_eq!(created["name"], "api");
        assert_eq!(created["organization"]["slug"], "personal");

        // A taken name is the server's 422, said plainly.
        let err = failed(&env.aloft(&["apps", "create", "web"], &[]), 1);
        assert!(err.contains("Name has already been taken"), "{err}");
        assert!(err.contains("HTTP 422"), "{err}");
        // So is an invalid one (400).
        let err = failed(&env.aloft(&["apps", "create", "Not_Valid"], &[]), 1);
        assert!(err.contains("invalid app name"), "{err}");

        let list: Value = serde_json::from_str(&ok(&env.aloft(&["apps", "list", "--json"], &[]))).unwrap();
        assert_eq!(names(&list), ["api", "web"]);
        assert_eq!(list[1]["organization"]["slug"], "personal");
        let table = ok(&env.aloft(&["apps", "list"], &[]));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            lines[0].starts_with("NAME") && lines[0].ends_with("LATEST DEPLOY"),
            "{table}"
        );
        assert!(
            lines[2].starts_with("web ") && lines[2].contains(" personal "),
            "{table}"
        );
        assert!(lines[2].ends_with(" -"), "{table}");

        // Destroy without --yes and without a terminal refuses and keeps the app.
        let err = failed(&env.aloft(&["apps", "destroy", "web"], &[]), 1);
        assert!(err.contains("without confirmation"), "{err}");
        assert!(err.contains("--yes"), "{err}");
        assert_eq!(
            ok(&env.aloft(&["apps", "destroy", "web", "--yes"], &[])),
            "Destroyed app web\n"
        );
        let list: Value = serde_json::from_str(&ok(&env.aloft(&["apps", "list", "--json"], &[]))).unwrap();
        assert_eq!(names(&list), ["api"]);

        // Unknown app: exit code 3 and a message naming it.
        let err = failed(&env.aloft(&["apps", "destroy", "web", "--yes"], &[]), 3);
        assert!(err.contains("app web not found"), "{err}");

        // A wrong token: the server's 401 and where the token came from.
        let err = failed(
            &env.aloft(&["apps", "list"], &[("ALOFT_API_TOKEN", "aloft_wrong")]),
            1,
        );
        assert!(err.contains("invalid token") && err.contains("HTTP 401"), "{err}");
        assert!(err.contains("$ALOFT_API_TOKEN"), "{err}");
        // FLY_API_TOKEN is read too.
        let err = failed(
            &env.aloft(&["apps", "list"], &[("FLY_API_TOKEN", "fly_wrong")]),
            1,
        );
        assert!(
            err.contains("HTTP 401") && err.contains("$FLY_API_TOKEN"),
            "{err}"
        );

        // No config and no token: what to do.
        let empty = env.path("empty-config");
        std::fs::create_dir(&empty).unwrap();
        let err = failed(&env.aloft_with_config(&empty, &["apps", "list"], &[]), 1);
        assert!(err.contains("no API token: start aloftd once"), "{err}");
        assert!(err.contains("ALOFT_API_TOKEN"), "{err}");
        // The environment alone is enough.
        let token = config
            .lines()
            .find_map(|l| l.strip_prefix("token = "))
            .unwrap()
            .trim_matches('"')
            .to_owned();
        let url = format!("http://127.0.0.1:{port}");
        let list: Value = serde_json::from_str(&ok(&env.aloft_with_config(
            &empty,
            &["apps", "list", "--json"],
            &[("ALOFT_API_TOKEN", &token), ("ALOFT_API_URL", &url)],
        )))
        .unwrap();
        assert_eq!(names(&list), ["api"]);

        // aloftd stopped: not reachable, exit code 4.
        daemon.stop();
        let err = failed(&env.aloft(&["apps", "list"], &[]), 4);
        assert!(
            err.contains(&format!(
                "aloftd is not reachable at {url} (is it running? start it with `aloftd`)"
            )),
            "{err}"
        );
    }
}
