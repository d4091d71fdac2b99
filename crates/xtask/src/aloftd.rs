//! Shared pieces of the benchmarks that drive the real `aloftd`: building it, running it as a
//! child process with its own data directory and `XDG_CONFIG_HOME`, a minimal HTTP/1.1 keep-alive
//! client (no client library between the clock and the socket), and the few Machines API calls
//! every such benchmark makes (apps, waits, force-destroys, leftover-VM cleanup).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

pub(crate) fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

pub(crate) fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// The 1-, 5- and 15-minute load averages.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Builds aloftd with cargo's `profile`; returns the binary.
pub(crate) fn build_aloftd(profile: &str) -> anyhow::Result<PathBuf> {
    let root = aloft_testkit::workspace_root();
    let started = Instant::now();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args(["build", "--quiet", "-p", "aloftd", "--profile", profile])
        .status()
        .context("run cargo build for aloftd")?;
    if !status.success() {
        bail!("building aloftd ({profile} profile) failed");
    }
    let dir = if profile == "dev" { "debug" } else { profile };
    let bin = root.join("target").join(dir).join("aloftd");
    if !bin.is_file() {
        bail!("cargo built aloftd but {} is not there", bin.display());
    }
    eprintln!("bench: aloftd built in {:.1} s", started.elapsed().as_secs_f64());
    Ok(bin)
}

pub(crate) fn create_app(conn: &mut Conn, name: &str) -> anyhow::Result<()> {
    conn.expect(
        "POST",
        "/v1/apps",
        Some(&json!({"name": name, "org_slug": "personal"})),
        201,
    )?;
    Ok(())
}

/// Milliseconds since the Unix epoch of an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
pub(crate) fn unix_ms(t: &str) -> Option<f64> {
    let t = t.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.splitn(3, '-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut hms = time.splitn(3, ':');
    let (h, min) = (hms.next()?.parse::<i64>().ok()?, hms.next()?.parse::<i64>().ok()?);
    let sec: f64 = hms.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    #[expect(clippy::cast_precision_loss, reason = "seconds since 1970 fit in f64 exactly")]
    let secs = (days * 86_400 + h * 3600 + min * 60) as f64;
    Some((secs + sec) * 1000.0)
}

pub(crate) fn wait_state(conn: &mut Conn, app: &str, id: &str, state: &str) -> anyhow::Result<()> {
    let w = conn.expect(
        "GET",
        &format!("/v1/apps/{app}/machines/{id}/wait?state={state}&timeout=60"),
        None,
        200,
    )?;
    if w["ok"] != true {
        bail!("waiting for {id} to be {state}: {w}");
    }
    Ok(())
}

/// Force-destroys a machine and waits until it is gone.
pub(crate) fn destroy(conn: &mut Conn, app: &str, id: &str) -> anyhow::Result<()> {
    conn.expect(
        "DELETE",
        &format!("/v1/apps/{app}/machines/{id}?force=true"),
        None,
        200,
    )?;
    let (status, body) = conn.request(
        "GET",
        &format!("/v1/apps/{app}/machines/{id}/wait?state=destroyed&timeout=60"),
        None,
    )?;
    // Once destroyed, the machine may be gone from the API altogether.
    if status != 200 && status != 404 {
        bail!(
            "waiting for {id} to be destroyed: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

/// Destroys every machine of `app`.
pub(crate) fn destroy_all(conn: &mut Conn, app: &str) -> anyhow::Result<()> {
    let list = conn.expect("GET", &format!("/v1/apps/{app}/machines"), None, 200)?;
    let mut first_err = None;
    for m in list.as_array().map(Vec::as_slice).unwrap_or_default() {
        if let Some(id) = m["id"].as_str()
            && let Err(e) = destroy(conn, app, id)
        {
            eprintln!("bench: could not destroy {id}: {e:#}");
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// The last resort after aloftd stopped: QEMU processes whose command line names this daemon's
/// data directory were started by it for this benchmark; kill them by pid.
fn kill_leftover_vms(data_dir: &Path) {
    let needle = data_dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("qemu-system") && cmdline.contains(&needle) {
            eprintln!("bench: killing leftover VM {pid} of this benchmark");
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// aloftd as a child process.

/// A running aloftd with its own data directory, CLI config directory and log file.
pub(crate) struct Daemon {
    child: Child,
    addr: SocketAddr,
    token: String,
    dir: tempfile::TempDir,
    /// The cgroup parent its machines are jailed under (VM driver only): removed, with what
    /// its machines left, once the daemon and its machines are gone.
    cgroups: Option<aloft_testkit::CgroupParent>,
}

impl Daemon {
    /// Starts `bin` with `flags` on a free loopback port (its directory `aloft-bench-{bench}-…`); waits until it wrote the CLI config
    /// (token and URL) and accepts connections.
    pub(crate) fn start(bench: &str, bin: &Path, flags: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("aloft-bench-{bench}-"))
            .tempdir()?;
        let log = std::fs::File::create(dir.path().join("aloftd.log"))?;
        let config_home = dir.path().join("config");
        let vms = flags.windows(2).any(|w| w == ["--driver", "vm"]);
        let cgroups = vms.then(aloft_testkit::CgroupParent::new);
        let child = Command::new(bin)
            .args(flags)
            .args(
                cgroups
                    .as_ref()
                    .map(|c| vec!["--cgroup-parent", c.name()])
                    .unwrap_or_default(),
            )
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0", "--no-access-log"])
            // The edge's fixed default ports would collide between runs: benches that want
            // the edge pass its addresses.
            .args(if flags.iter().any(|f| f.starts_with("--edge")) {
                &[][..]
            } else {
                &["--no-edge"][..]
            })
            .env("XDG_CONFIG_HOME", &config_home)
            .env("HOME", dir.path())
            .env_remove("ALOFT_DATA_DIR")
            .env_remove("ALOFT_LISTEN")
            .env_remove("ALOFT_REGION")
            .env_remove("ALOFT_DRIVER")
            .env_remove("ALOFT_GUEST_DIR")
            .env_remove("ALOFT_REGISTRY")
            .env_remove("ALOFT_NETWORK")
            .env_remove("ALOFT_MACHINES_NETNS")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut daemon = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: String::new(),
            dir,
            cgroups,
        };
        let config = config_home.join("aloft").join("config.toml");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((url, token)) = read_cli_config(&config) {
                daemon.addr = url
                    .strip_prefix("http://")
                    .and_then(|a| a.parse().ok())
                    .with_context(|| format!("aloftd wrote an API URL {url:?}"))?;
                daemon.token = token;
                if TcpStream::connect(daemon.addr).is_ok() {
                    return Ok(daemon);
                }
            }
            if let Some(status) = daemon.child.try_wait()? {
                bail!("aloftd exited with {status} at start:\n{}", daemon.log_tail());
            }
            if Instant::now() > deadline {
                bail!("aloftd did not come up within a minute:\n{}", daemon.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn conn(&self) -> Conn {
        Conn {
            addr: self.addr,
            token: self.token.clone(),
            stream: None,
        }
    }

    /// Its CPU use over 2 s in which nobody calls it, and its thread count.
    pub(crate) fn idle_cpu(&self) -> anyhow::Result<Idle> {
        let pid = self.child.id();
        let machines = std::fs::read_dir(self.data_dir().join("logs")).map_or(0, Iterator::count);
        let before = proc_cpu_s(pid)?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        let cpu_pct = (proc_cpu_s(pid)? - before) / t0.elapsed().as_secs_f64() * 100.0;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Ok(Idle {
            cpu_pct,
            threads,
            machines,
        })
    }

    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The last 4 KiB of what it printed.
    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read(self.dir.path().join("aloftd.log")).unwrap_or_default();
        let from = log.len().saturating_sub(4096);
        String::from_utf8_lossy(&log[from..]).into_owned()
    }

    /// SIGTERM, then up to 15 s to exit, then SIGKILL: only this child, by its pid; then (VM
    /// driver) the QEMU processes of its machines a failed run left running.
    pub(crate) fn stop(mut self) {
        self.terminate();
    }

    /// Stops aloftd, then kills what machines it left running (aloftd leaves machines running
    /// when it stops; benchmarks destroy theirs first, so this only catches a failed run's).
    fn terminate(&mut self) {
        self.stop_aloftd();
        if self.cgroups.is_some() {
            kill_leftover_vms(&self.data_dir());
        }
    }

    fn stop_aloftd(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("bench: aloftd ignored SIGTERM for 15 s; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// A process at rest.
pub(crate) struct Idle {
    /// CPU time / wall time, percent of one core.
    pub(crate) cpu_pct: f64,
    pub(crate) threads: usize,
    /// Machines with a log directory (every machine the agent has).
    pub(crate) machines: usize,
}

/// User + system CPU seconds process `pid` used so far (`/proc/PID/stat`, in USER_HZ = 100
/// ticks on Linux).
pub(crate) fn proc_cpu_s(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    // Fields from the 3rd (state) on: utime is the 14th, stime the 15th.
    let mut fields = after_comm.split_whitespace().skip(11);
    let mut tick = || -> anyhow::Result<f64> {
        Ok(fields
            .next()
            .with_context(|| format!("short /proc/{pid}/stat"))?
            .parse::<f64>()?)
    };
    Ok((tick()? + tick()?) / 100.0)
}

/// `api_url` and `token` from the CLI config aloftd writes on its first start.
pub(crate) fn read_cli_config(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let v = l.strip_prefix(name)?.trim_start().strip_prefix('=')?.trim();
            Some(v.trim_matches('"').to_owned())
        })
    };
    Some((field("api_url")?, field("token")?))
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 keep-alive client.

/// One keep-alive connection to aloftd (opened on first use, reopened when the server closed it).
pub(crate) struct Conn {
    addr: SocketAddr,
    token: String,
    stream: Option<BufReader<TcpStream>>,
}

impl Conn {
    pub(crate) fn connect(&mut self) -> anyhow::Result<()> {
        let stream = TcpStream::connect(self.addr).with_context(|| format!("connect to {}", self.addr))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        self.stream = Some(BufReader::with_capacity(64 * 1024, stream));
        Ok(())
    }

    /// Sends one request and reads the whole answer: (status, body).
    pub(crate) fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: aloftd\r\nAuthorization: Bearer {}\r\n",
            self.token
        );
        match body {
            Some(b) => req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                b.len()
            )),
            None if method == "GET" => req.push_str("\r\n"),
            None => req.push_str("Content-Length: 0\r\n\r\n"),
        }
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        // A kept-alive connection the server closed meanwhile fails before any answer: retry
        // once on a fresh one.
        let reused = self.stream.is_some();
        match self.exchange(&bytes) {
            Ok(r) => Ok(r),
            Err(e) if reused && e.downcast_ref::<Closed>().is_some() => {
                self.stream = None;
                self.exchange(&bytes)
            }
            Err(e) => {
                self.stream = None;
                Err(e.context(format!("{method} {path}")))
            }
        }
    }

    fn exchange(&mut self, request: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        if self.stream.is_none() {
            self.connect()?;
        }
        let r = self.stream.as_mut().context("no connection")?;
        if r.get_mut().write_all(request).is_err() {
            return Err(Closed.into());
        }
        let (status, body, close) = read_response(r)?;
        if close {
            self.stream = None;
        }
        Ok((status, body))
    }

    /// A JSON request that must answer `status`; the answer's JSON (`null` when empty).
    pub(crate) fn expect(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        status: u16,
    ) -> anyhow::Result<Value> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let (got, resp) = self.request(method, path, body.as_deref())?;
        if got != status {
            bail!(
                "{method} {path}: HTTP {got} (expected {status}): {}",
                String::from_utf8_lossy(&resp)
            );
        }
        if resp.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&resp).with_context(|| format!("{method} {path}: the answer is not JSON"))
    }
}

/// The server closed the connection before answering.
#[derive(Debug)]
struct Closed;

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the server closed the connection")
    }
}

impl std::error::Error for Closed {}

/// Reads one response: (status, body, whether the server closes the connection).
pub(crate) fn read_response(r: &mut BufReader<TcpStream>) -> anyhow::Result<(u16, Vec<u8>, bool)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(Closed.into());
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let (mut length, mut chunked, mut close) = (None, false, false);
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            bail!("bad header line {h:?}");
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = Some(value.parse::<usize>()?),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or_default(), 16)
                .with_context(|| format!("bad chunk size {line:?}"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let at = body.len();
            body.resize(at + size, 0);
            r.read_exact(&mut body[at..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else if close {
        r.read_to_end(&mut body)?;
    }
    Ok((status, body, close))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_to_unix_ms() {
        assert_eq!(unix_ms("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(unix_ms("2026-12-02T07:37:47.715Z"), Some(1_796_197_067_715.0));
        assert_eq!(unix_ms("2000-03-01T00:00:01.5Z"), Some(951_868_801_500.0));
        assert_eq!(unix_ms("yesterday"), None);
    }

    #[test]
    fn reads_own_cpu_time() {
        let cpu = proc_cpu_s(std::process::id()).unwrap();
        assert!(cpu >= 0.0, "{cpu}");
    }

    #[test]
    fn reads_the_cli_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "api_url = \"http://127.0.0.1:4\"\ntoken = \"aloft_x\"\n").unwrap();
        assert_eq!(
            read_cli_config(&path),
            Some(("http://127.0.0.1:4".into(), "aloft_x".into()))
        );
    }

    #[test]
    fn reads_chunked_and_sized_answers() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi\
                  HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            )
            .unwrap();
        });
        let mut r = BufReader::new(TcpStream::connect(addr).unwrap());
        assert_eq!(read_response(&mut r).unwrap(), (200, b"hi".to_vec(), false));
        assert_eq!(read_response(&mut r).unwrap(), (404, b"abcde".to_vec(), false));
        server.join().unwrap();
    }
}
