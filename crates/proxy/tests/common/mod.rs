//! Helpers the edge's integration tests share: loopback addresses and machine ids handed out per
//! test file (each file takes its own range of 127.0.x.y, so files running at once never meet),
//! the fake machines' internal port, small hyper servers standing for machines, catalog entries,
//! and polling.

#![allow(dead_code, reason = "each test file uses part of these")]
#![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use aloft_api::{CatalogEntry, MachineId, MachinePort, MachineService, MachineState};
use aloft_proxy::{ControlFuture, MachineControl};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// The edge's control.

/// A control for tests whose machines are always started: every call succeeds, nothing happens.
#[derive(Debug)]
pub(crate) struct NoControl;

impl MachineControl for NoControl {
    fn start(&self, _app: &str, _id: &MachineId) -> ControlFuture {
        Box::pin(async { Ok(()) })
    }
    fn stop(&self, _app: &str, _id: &MachineId) -> ControlFuture {
        Box::pin(async { Ok(()) })
    }
    fn suspend(&self, _app: &str, _id: &MachineId) -> ControlFuture {
        Box::pin(async { Ok(()) })
    }
}

// ---------------------------------------------------------------------------------------------
// Addresses and ids.

/// The TCP internal port every fake machine of this process listens on: an ephemeral port held
/// on 127.0.0.1 for the whole process, so no other process picks it for 127.0.x.y.
pub(crate) fn internal_port() -> u16 {
    static PORT: OnceLock<(std::net::TcpListener, u16)> = OnceLock::new();
    PORT.get_or_init(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        (l, p)
    })
    .1
}

/// Loopback addresses 127.0.`first`..=`last`.2–251, one per call, for a test file's machines.
#[derive(Debug)]
pub(crate) struct Loopback {
    n: AtomicU32,
    first: u8,
    last: u8,
}

impl Loopback {
    pub(crate) const fn new(first: u8, last: u8) -> Self {
        Self {
            n: AtomicU32::new(0),
            first,
            last,
        }
    }

    /// A loopback address no machine of this range had.
    pub(crate) fn next(&self) -> IpAddr {
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        let third = u32::from(self.first) + n / 250;
        assert!(third <= u32::from(self.last), "too many machines");
        let [_, _, _, third] = third.to_be_bytes();
        let [_, _, _, host] = (n % 250 + 2).to_be_bytes();
        IpAddr::V4(Ipv4Addr::new(127, 0, third, host))
    }
}

/// Machine ids tagged with a test file's two bytes.
#[derive(Debug)]
pub(crate) struct Ids {
    n: AtomicU32,
    tag: [u8; 2],
}

impl Ids {
    pub(crate) const fn new(tag: [u8; 2]) -> Self {
        Self {
            n: AtomicU32::new(1),
            tag,
        }
    }

    pub(crate) fn next(&self) -> MachineId {
        let [a, b, c, d] = self.n.fetch_add(1, Ordering::Relaxed).to_be_bytes();
        MachineId::from_random([self.tag[0], self.tag[1], 0, a, b, c, d])
    }
}

/// A started machine of `app` at `ip` with one `http` service on public port 80 forwarding to
/// [`internal_port`].
pub(crate) fn http_entry(app: &str, id: MachineId, ip: IpAddr) -> CatalogEntry {
    CatalogEntry {
        id,
        app: app.to_owned(),
        host: "host1".to_owned(),
        region: "test".to_owned(),
        state: MachineState::Started,
        version: "v1".to_owned(),
        private_ip: ip.to_string(),
        services: vec![MachineService {
            internal_port: Some(internal_port()),
            ports: vec![MachinePort {
                port: Some(80),
                handlers: vec!["http".to_owned()],
                ..MachinePort::default()
            }],
            ..MachineService::default()
        }],
        checks: Vec::new(),
        suspendable: false,
        process_group: String::new(),
        primary_region: String::new(),
        updated_at: 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Fake machines.

pub(crate) type BackendBody = BoxBody<Bytes, Infallible>;
pub(crate) type BoxFut = Pin<Box<dyn Future<Output = Response<BackendBody>> + Send>>;
pub(crate) type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxFut + Send + Sync>;

pub(crate) fn body(b: impl Into<Bytes>) -> BackendBody {
    Full::new(b.into()).boxed()
}

/// A running fake machine server; dropping it closes the listener.
#[derive(Debug)]
pub(crate) struct Backend {
    accept: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Serves `handler` (HTTP/1.1 with upgrades, and h2c prior knowledge) on `addr`.
pub(crate) fn serve_backend(addr: SocketAddr, handler: Handler) -> Backend {
    serve_counting(addr, handler, Arc::default())
}

/// [`serve_backend`], counting requests in `seen`.
pub(crate) fn serve_counting(addr: SocketAddr, handler: Handler, seen: Arc<AtomicUsize>) -> Backend {
    let std = std::net::TcpListener::bind(addr).unwrap();
    std.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(std).unwrap();
    let accept = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Backend { accept }
}

// ---------------------------------------------------------------------------------------------
// Waiting and reading figures.

/// Polls `cond` every `every` until it holds (5 s at most).
pub(crate) async fn until_every(every: Duration, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(every).await;
    }
}

/// A metric's value (0 when it is not there).
pub(crate) fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Whether the metric is there at all.
pub(crate) fn has_metric(text: &str, name_and_labels: &str) -> bool {
    text.lines().any(|l| {
        l.strip_prefix(name_and_labels)
            .is_some_and(|v| v.starts_with(' '))
    })
}
