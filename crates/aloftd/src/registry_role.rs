//! The embedded registry: in the single-host setup aloftd runs a real OCI registry (Debian's
//! `docker-registry`, CNCF distribution) on loopback, with its storage under the data directory,
//! and image names without a registry resolve to it. aloftd supervises it: a registry that dies
//! is started again (with backoff), and it is stopped when aloftd stops. A registry left behind
//! by an aloftd that was killed is recognised by its pid file and command line (ours: it serves
//! our config file) and replaced; anything else on the address is an error naming the address.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rustix::process::{Pid, Signal, kill_process};

/// Debian's registry binary (`scripts/setup.sh` installs the `docker-registry` package).
pub(crate) const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// How long the registry may take to listen.
const READY: Duration = Duration::from_secs(15);
/// Longest wait between restarts of a registry that keeps dying.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The supervised registry. Dropping it stops the registry.
pub(crate) struct EmbeddedRegistry {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    child: Arc<Mutex<Option<Child>>>,
    supervisor: Option<JoinHandle<()>>,
}

struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn config(&self) -> PathBuf {
        self.dir.join("config.yml")
    }
    fn pid(&self) -> PathBuf {
        self.dir.join("registry.pid")
    }
    fn log(&self) -> PathBuf {
        self.dir.join("registry.log")
    }
}

/// The pid in `pid_file` if that process still serves `config` (a registry an earlier aloftd
/// started and did not stop because it was killed).
fn leftover(pid_file: &Path, config: &Path) -> Option<Pid> {
    let pid: i32 = std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = args.first().is_some_and(|a| *a == REGISTRY_BIN.as_bytes())
        && args
            .get(2)
            .is_some_and(|a| *a == config.as_os_str().as_encoded_bytes());
    if ours { Pid::from_raw(pid) } else { None }
}

fn stop_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, Signal::TERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn spawn(layout: &Layout) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(layout.log())
        .with_context(|| format!("open {}", layout.log().display()))?;
    let child = Command::new(REGISTRY_BIN)
        .arg("serve")
        .arg(layout.config())
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicate the registry log")?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {REGISTRY_BIN}"))?;
    std::fs::write(layout.pid(), child.id().to_string())
        .with_context(|| format!("write {}", layout.pid().display()))?;
    Ok(child)
}

fn wait_listening(addr: SocketAddr, child: &mut Child, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            bail!(
                "the embedded registry exited ({status}) before listening on {addr}; its log {} ends with:\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if Instant::now() >= deadline {
            stop_child(child);
            bail!(
                "the embedded registry did not listen on {addr} within {}s; see {}",
                READY.as_secs(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl EmbeddedRegistry {
    /// Starts the registry on `addr` with storage in `<data_dir>/registry/storage`, waits until
    /// it listens, and supervises it.
    pub(crate) fn start(data_dir: &Path, addr: SocketAddr) -> anyhow::Result<Self> {
        if !Path::new(REGISTRY_BIN).is_file() {
            bail!(
                "{REGISTRY_BIN} is missing (package docker-registry; scripts/setup.sh installs it): \
                 install it, or use another registry with --registry HOST:PORT"
            );
        }
        let layout = Layout {
            dir: data_dir.join("registry"),
        };
        std::fs::create_dir_all(layout.dir.join("storage"))
            .with_context(|| format!("create {}", layout.dir.display()))?;
        if let Some(pid) = leftover(&layout.pid(), &layout.config()) {
            // Started by an earlier aloftd that was killed before it could stop it.
            let _ = kill_process(pid, Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while leftover(&layout.pid(), &layout.config()).is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            bail!(
                "{addr} is already in use (another registry, e.g. scripts/registry.sh?): use it with \
                 --registry {addr}, or put the embedded one elsewhere with --embedded-registry ADDR"
            );
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            layout.dir.join("storage").display()
        );
        let mut f = std::fs::File::create(layout.config())
            .with_context(|| format!("write {}", layout.config().display()))?;
        f.write_all(config.as_bytes())
            .with_context(|| format!("write {}", layout.config().display()))?;
        let mut child = spawn(&layout)?;
        wait_listening(addr, &mut child, &layout.log())?;
        let child = Arc::new(Mutex::new(Some(child)));
        let stopping = Arc::new(AtomicBool::new(false));
        let supervisor = {
            let (child, stopping) = (child.clone(), stopping.clone());
            std::thread::Builder::new()
                .name("aloftd-registry".into())
                .spawn(move || supervise(&layout, addr, &child, &stopping))
                .context("start the registry's supervisor")?
        };
        Ok(Self {
            addr,
            stopping,
            child,
            supervisor: Some(supervisor),
        })
    }

    /// `HOST:PORT` for image references.
    pub(crate) fn host(&self) -> String {
        self.addr.to_string()
    }
}

/// Restarts the registry whenever it exits, with a backoff that doubles up to [`MAX_BACKOFF`]
/// and resets once a registry stayed up for a minute.
fn supervise(layout: &Layout, addr: SocketAddr, child: &Mutex<Option<Child>>, stopping: &AtomicBool) {
    let mut backoff = Duration::from_secs(1);
    let mut started = Instant::now();
    while !stopping.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(250));
        let mut guard = child.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let exited = match guard.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            None => true,
        };
        if !exited || stopping.load(Ordering::SeqCst) {
            continue;
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        eprintln!(
            "aloftd: the embedded registry on {addr} exited; starting it again in {}s (log: {})",
            backoff.as_secs(),
            layout.log().display()
        );
        drop(guard);
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        match spawn(layout) {
            Ok(c) => {
                started = Instant::now();
                *child.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(c);
            }
            Err(e) => eprintln!("aloftd: warning: restarting the embedded registry: {e:#}"),
        }
    }
}

impl Drop for EmbeddedRegistry {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(s) = self.supervisor.take() {
            let _ = s.join();
        }
        if let Some(mut c) = self
            .child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            stop_child(&mut c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_serves_restarts_and_stops() {
        if !Path::new(REGISTRY_BIN).is_file() {
            panic!("{REGISTRY_BIN} is missing: run scripts/setup.sh");
        }
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let reg = EmbeddedRegistry::start(dir.path(), addr).unwrap();
        assert_eq!(reg.host(), format!("127.0.0.1:{port}"));
        let get_v2 = || {
            use std::io::Read as _;
            let mut s = TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok::<_, std::io::Error>(out)
        };
        assert!(get_v2().unwrap().starts_with("HTTP/1.0 200"));

        // A second one on the same address is refused with a clear message.
        let e = EmbeddedRegistry::start(&dir.path().join("other"), addr)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("already in use"), "{e:#}");

        // Killed behind aloftd's back: the supervisor starts it again.
        let first = leftover(
            &dir.path().join("registry/registry.pid"),
            &dir.path().join("registry/config.yml"),
        )
        .unwrap();
        kill_process(first, Signal::KILL).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = leftover(
                &dir.path().join("registry/registry.pid"),
                &dir.path().join("registry/config.yml"),
            );
            if now.is_some_and(|p| p != first) && get_v2().is_ok_and(|r| r.starts_with("HTTP/1.0 200")) {
                break;
            }
            assert!(Instant::now() < deadline, "the registry was not restarted");
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(reg);
        assert!(TcpStream::connect(addr).is_err(), "stopped with aloftd");
        assert!(
            leftover(
                &dir.path().join("registry/registry.pid"),
                &dir.path().join("registry/config.yml")
            )
            .is_none()
        );
    }
}
