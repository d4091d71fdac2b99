//! Throwaway network namespaces holding one tap device: a guest's network without touching the
//! host's. Needs root. The namespace (and the tap in it) is deleted on drop.
#![expect(unsafe_code, reason = "setns(2) to connect from inside the test namespace")]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{FixtureError, run};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace with a tap device `tap0` addressed `172.30.0.1/30`; the guest gets
/// `172.30.0.2/30`. Each namespace is private, so every one can use the same addresses.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
    pub tap: String,
    pub host_ip: Ipv4Addr,
    pub guest_ip: Ipv4Addr,
    pub prefix_len: u8,
}

impl NetNs {
    /// Creates the namespace and the tap.
    pub fn new() -> Result<Self, FixtureError> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("aloft-t{}-{n}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self {
            name,
            tap: "tap0".to_owned(),
            host_ip: Ipv4Addr::new(172, 30, 0, 1),
            guest_ip: Ipv4Addr::new(172, 30, 0, 2),
            prefix_len: 30,
        };
        let ip = |args: &[&str]| run(Command::new("ip").args(["-n", &ns.name]).args(args));
        ip(&["tuntap", "add", "dev", &ns.tap, "mode", "tap"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/{}", ns.host_ip, ns.prefix_len),
            "dev",
            &ns.tap,
        ])?;
        ip(&["link", "set", &ns.tap, "up"])?;
        ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `/run/netns/NAME`, for `setns(2)`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Connects to `port` on the guest from inside the namespace. The returned stream keeps
    /// working in any thread.
    pub fn connect_tcp(&self, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
        self.connect_tcp_to(SocketAddr::from((self.guest_ip, port)), timeout)
    }

    /// Connects to any `addr` from inside the namespace (a guest's 6PN address, another tap's
    /// guest). The returned stream keeps working in any thread.
    pub fn connect_tcp_to(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = File::open(&path)?;
            // SAFETY: setns on a valid namespace fd only changes this short-lived thread's network
            // namespace; the thread ends right after connecting.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            TcpStream::connect_timeout(&addr, timeout)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("connect thread panicked")))
    }
    /// `GET /index.html` over HTTP/1.0 from inside the namespace to `addr`, retrying refused,
    /// reset or timed-out attempts every 200 ms until `timeout`; the whole response (possibly
    /// empty), or the last error once `timeout` has passed.
    pub fn http_get(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = (|| -> std::io::Result<String> {
                let mut s = self.connect_tcp_to(addr, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
                let mut resp = String::new();
                s.read_to_string(&mut resp)?;
                Ok(resp)
            })();
            match attempt {
                Ok(r) => return Ok(r),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}
