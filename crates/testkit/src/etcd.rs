//! A real etcd for tests: Debian's `etcd-server` (3.4) as a one-member cluster on free loopback
//! ports, with its data in a temporary directory (on `/dev/shm` when there is one: etcd syncs
//! every write to disk, and a test's history need not survive the machine).
//!
//! One etcd per test, so that revisions one test counts are not moved by another's writes. The
//! fixture owns exactly one process: it kills and reaps that child on drop (by its handle, never
//! by name), and removes the data directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use crate::{FixtureError, free_port, process};

/// Where Debian installs etcd (package `etcd-server`, installed by `scripts/setup.sh`).
pub(crate) const ETCD_BIN: &str = "/usr/bin/etcd";

/// How long etcd may take to elect itself and answer `/health`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running one-member etcd on loopback.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    client: SocketAddr,
    peer: String,
    dir: PathBuf,
}

impl Etcd {
    /// Starts etcd with a fresh data directory and waits until it answers `/health`. Fails
    /// (loudly, never skipping) when the binary is missing: `scripts/setup.sh` installs it.
    pub fn start() -> Result<Self, FixtureError> {
        if !Path::new(ETCD_BIN).is_file() {
            return Err(FixtureError::MissingTool {
                path: PathBuf::from(ETCD_BIN),
                package: "etcd-server",
            });
        }
        let parent = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = parent.join(format!("aloft-etcd-{}-{}", std::process::id(), unique()));
        // Ports are found by binding :0 and released before etcd binds them; another process may
        // take one in between, so an etcd that dies at start is retried with others.
        let mut last = None;
        for _ in 0..5 {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(|source| FixtureError::Io {
                what: "create the etcd directory",
                path: dir.clone(),
                source,
            })?;
            match Self::start_in(&dir) {
                Ok(etcd) => return Ok(etcd),
                Err(e) => last = Some(e),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(last.unwrap_or_else(|| FixtureError::Command {
            command: ETCD_BIN.to_owned(),
            stderr: "did not start".to_owned(),
        }))
    }

    fn start_in(dir: &Path) -> Result<Self, FixtureError> {
        let client = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let peer = format!("http://127.0.0.1:{}", free_port()?);
        let child = spawn(dir, client, &peer)?;
        let mut etcd = Self {
            child,
            client,
            peer,
            dir: dir.to_path_buf(),
        };
        // On failure, dropping `etcd` kills and reaps it (and the caller retries elsewhere).
        etcd.wait_healthy()?;
        Ok(etcd)
    }

    /// Kills etcd and starts it again on the same ports and data: what a client sees when a
    /// member restarts (connections reset, history kept).
    pub fn restart(&mut self) -> Result<(), FixtureError> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.dir, self.client, &self.peer)?;
        self.wait_healthy()
    }

    fn wait_healthy(&mut self) -> Result<(), FixtureError> {
        let client = self.client;
        process::wait_ready(
            &mut self.child,
            &format!("{ETCD_BIN} --data-dir {}", self.dir.display()),
            &self.dir.join("etcd.log"),
            READY_TIMEOUT,
            "/health did not answer",
            || healthy(client),
        )
    }

    /// The client URL, `http://127.0.0.1:PORT`: what `aloftd --etcd` and `EtcdOptions` take.
    pub fn url(&self) -> String {
        format!("http://{}", self.client)
    }

    /// The client address.
    pub fn addr(&self) -> SocketAddr {
        self.client
    }

    /// etcd's own log (warnings and errors).
    pub fn log(&self) -> String {
        process::read_log(&self.dir.join("etcd.log"))
    }

    /// The process id of the etcd this fixture started.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Exactly the child we spawned, through its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts etcd as a one-member cluster with its data under `dir`, logging into `dir/etcd.log`.
fn spawn(dir: &Path, client: SocketAddr, peer: &str) -> Result<Child, FixtureError> {
    let client_url = format!("http://{client}");
    let mut cmd = Command::new(ETCD_BIN);
    cmd.arg("--name")
        .arg("test")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", peer])
        .args(["--initial-advertise-peer-urls", peer])
        .args(["--initial-cluster", &format!("test={peer}")])
        // A one-member cluster elects itself after one election timeout: keep it short.
        .args(["--heartbeat-interval", "50", "--election-timeout", "250"])
        .args([
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
            "--log-level",
            "warn",
        ]);
    process::log_into(&mut cmd, &dir.join("etcd.log"))?;
    // The caller's environment must not configure this etcd (ETCD_* variables are flags).
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ETCD_") {
            cmd.env_remove(name);
        }
    }
    cmd.spawn().map_err(|source| FixtureError::Io {
        what: "spawn",
        path: PathBuf::from(ETCD_BIN),
        source,
    })
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Whether `GET /health` answers 200 with `"health":"true"` (etcd has a leader).
fn healthy(addr: SocketAddr) -> bool {
    process::http_get_200(addr, "/health", Duration::from_secs(2)).is_some_and(|a| a.contains("\"true\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_and_stops() {
        let etcd = Etcd::start().expect("etcd starts (scripts/setup.sh installs etcd-server)");
        assert!(healthy(etcd.addr()));
        assert!(etcd.url().starts_with("http://127.0.0.1:"));
        let (pid, addr, dir) = (etcd.pid(), etcd.addr(), etcd.dir.clone());
        assert!(dir.is_dir());
        let mut etcd = etcd;
        etcd.restart().unwrap();
        assert!(healthy(etcd.addr()));
        assert_ne!(etcd.pid(), pid);
        let pid = etcd.pid();
        drop(etcd);
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(!cmdline.contains("etcd"), "still running: {cmdline}");
        assert!(!healthy(addr));
        assert!(!dir.exists());
    }
}
