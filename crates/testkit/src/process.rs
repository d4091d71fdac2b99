//! What the server fixtures (etcd, the registry, Pebble) share: a child's output into a log file,
//! the wait for it to be ready, and a plain HTTP probe. Each fixture owns exactly the child it
//! spawned and ends it through its handle, never by name.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::FixtureError;

/// Sends `cmd`'s stdout and stderr to `log` (appended to, so a restarted server's log follows
/// the first one's) and closes its stdin.
pub(crate) fn log_into(cmd: &mut Command, log: &Path) -> Result<(), FixtureError> {
    let io = |what| {
        move |source| FixtureError::Io {
            what,
            path: log.to_path_buf(),
            source,
        }
    };
    let out = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io("create the log"))?;
    let err = out.try_clone().map_err(io("open the log"))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    Ok(())
}

/// Polls `ready` every 20 ms until it holds. An error, naming `command` and quoting `log`, when
/// the child exits first or `timeout` passes (`waiting_for` says what did not happen). The child
/// is left to its owner to end.
pub(crate) fn wait_ready(
    child: &mut Child,
    command: &str,
    log: &Path,
    timeout: Duration,
    waiting_for: &str,
    mut ready: impl FnMut() -> bool,
) -> Result<(), FixtureError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(FixtureError::Command {
                command: command.to_owned(),
                stderr: format!("exited with {status}: {}", read_log(log).trim()),
            });
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(FixtureError::Command {
                command: command.to_owned(),
                stderr: format!("{waiting_for} within {timeout:?}: {}", read_log(log).trim()),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A log file's text ("" when it cannot be read).
pub(crate) fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `GET path` over HTTP/1.0 to `addr`: the answer when its status is 200, `None` otherwise (not
/// listening yet, another status, no answer within `timeout`).
pub(crate) fn http_get_200(addr: SocketAddr, path: &str, timeout: Duration) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut answer = Vec::new();
    let _ = stream.take(64 * 1024).read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    (answer.starts_with("HTTP/1.") && answer.get(9..12) == Some("200")).then_some(answer)
}

#[cfg(test)]
mod tests {
    use std::io::BufRead as _;
    use std::net::TcpListener;

    use super::*;

    /// A one-shot HTTP server answering `status` to the first request.
    fn serve_once(status: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let mut s = s;
            let _ = write!(s, "HTTP/1.0 {status}\r\n\r\nbody");
        });
        addr
    }

    #[test]
    fn only_a_200_counts() {
        let ok = http_get_200(serve_once("200 OK"), "/", Duration::from_secs(5));
        assert!(ok.is_some_and(|a| a.ends_with("body")));
        assert_eq!(
            http_get_200(serve_once("404 Not Found"), "/", Duration::from_secs(5)),
            None
        );
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert_eq!(http_get_200(closed, "/", Duration::from_secs(1)), None);
    }

    #[test]
    fn a_child_that_exits_or_never_gets_ready_is_an_error_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo broken config; exit 3"]);
        log_into(&mut cmd, &log).unwrap();
        let mut child = cmd.spawn().unwrap();
        let e = wait_ready(&mut child, "sh x", &log, Duration::from_secs(10), "never", || {
            false
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sh x") && e.contains("exit status: 3") && e.contains("broken config"),
            "{e}"
        );

        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        log_into(&mut cmd, &log).unwrap();
        let mut child = cmd.spawn().unwrap();
        let e = wait_ready(
            &mut child,
            "sleep 30",
            &log,
            Duration::from_millis(100),
            "no answer",
            || false,
        )
        .unwrap_err()
        .to_string();
        let _ = child.kill();
        let _ = child.wait();
        assert!(e.contains("no answer within"), "{e}");
        // Appended: the first child's output is still there.
        assert!(read_log(&log).contains("broken config"));

        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut child = cmd.spawn().unwrap();
        let mut polls = 0;
        wait_ready(&mut child, "sleep 30", &log, Duration::from_secs(10), "-", || {
            polls += 1;
            polls == 3
        })
        .unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}
