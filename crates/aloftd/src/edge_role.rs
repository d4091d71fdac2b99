//! The edge role: aloft-proxy's [`Edge`] on this host, following the control store's service
//! catalog, waking and idling machines through this host's agents, with TLS from the local CA
//! (and ACME when configured) for `<app>.<base domain>` and custom domains.
//!
//! Wiring only: routing, balancing and TLS live in `aloft-proxy`.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aloft_api::{ApiError, HostStop, MachineHost, MachineId};
use aloft_control::HostHandle;
use aloft_proxy::tls::{
    CertManager, CertManagerConfig, Challenges, Issuer, LocalCa, LocalIssuer, SniResolver, server_config,
};
use aloft_proxy::{
    ControlError, ControlFuture, DialFuture, Dialer, Edge, EdgeConfig, MachineControl, UdpFuture,
    WorkerThreads,
};
use aloft_store::{ControlStore, Store};
use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the edge role needs from aloftd's flags.
#[derive(Debug, Clone)]
pub(crate) struct EdgeSettings {
    /// This edge's name among the edges sharing the store (its host's name): certificate
    /// issuance claims carry it.
    pub(crate) name: String,
    pub(crate) region: String,
    pub(crate) data_dir: PathBuf,
    /// The key file custom domains' private keys are sealed with (`--edge-cert-key`).
    pub(crate) cert_key: PathBuf,
    /// Previous key files (`--edge-cert-key-previous`): they open what they sealed before a
    /// rotation; the certificate manager seals it again with `cert_key`.
    pub(crate) cert_key_previous: Vec<PathBuf>,
    pub(crate) http: SocketAddr,
    pub(crate) https: SocketAddr,
    /// The edge's worker threads (`--edge-threads`); `None`: one per CPU.
    pub(crate) threads: Option<NonZeroUsize>,
    pub(crate) metrics: Option<SocketAddr>,
    pub(crate) base_domain: String,
    pub(crate) autostop_interval: Duration,
    pub(crate) idle_after: Duration,
    pub(crate) machines_netns: Option<PathBuf>,
    /// Custom domains' certificates from this ACME CA (`--acme-*`); the local CA without it.
    pub(crate) acme: Option<crate::acme_issuer::AcmeSettings>,
}

/// The running edge; dropping it stops its listeners and loops, then its worker threads (open
/// connections end with them).
#[derive(Debug)]
pub(crate) struct EdgeRole {
    tasks: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// Dropped after the tasks are aborted (fields drop after `Drop::drop`).
    _threads: WorkerThreads,
}

impl Drop for EdgeRole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the edge. Must run inside the tokio runtime.
pub(crate) async fn start(
    settings: EdgeSettings,
    store: Arc<dyn Store>,
    hosts: Vec<HostHandle>,
) -> anyhow::Result<EdgeRole> {
    let mut config = EdgeConfig::new(settings.region.clone());
    config.base_domain = settings.base_domain.clone();
    config.autostop_interval = settings.autostop_interval;
    config.idle_after = settings.idle_after;
    let control = Arc::new(HostControl {
        control: ControlStore::new(Arc::clone(&store)),
        hosts,
    });
    let dialer: Arc<dyn Dialer> = match &settings.machines_netns {
        Some(ns) => Arc::new(NetnsDialer { ns: ns.clone() }),
        None => Arc::new(aloft_proxy::DirectDialer),
    };
    let edge = Edge::new(config, control, dialer);

    // TLS: the local CA for the base domain, custom domains' certificates from the store.
    let ca_dir = settings.data_dir.join("edge").join("ca");
    let ca = Arc::new(
        tokio::task::spawn_blocking(move || LocalCa::open(&ca_dir))
            .await
            .context("open the edge's local CA")?
            .context("open the edge's local CA")?,
    );
    let challenges = Challenges::new();
    let issuer: Arc<dyn Issuer> = match &settings.acme {
        Some(acme) => Arc::new(crate::acme_issuer::AcmeIssuer::new(
            acme,
            &settings.data_dir,
            Arc::clone(&challenges),
            tokio::runtime::Handle::current(),
        )?),
        None => Arc::new(LocalIssuer::new(Arc::clone(&ca))),
    };
    // Custom domains' private keys are sealed in the store with the edges' key file (previous
    // key files only open, during a rotation).
    let key_file = settings.cert_key.clone();
    let previous = settings.cert_key_previous.clone();
    let seal_keys = tokio::task::spawn_blocking(move || open_cert_keys(&key_file, &previous))
        .await
        .context("open the edge's certificate key")??;
    if !seal_keys.previous().is_empty() {
        eprintln!(
            "aloftd: edge certificate keys: {}; keys sealed with a previous one are sealed again with the current one",
            seal_keys.describe()
        );
    }
    let manager = CertManager::new(
        Arc::clone(&store),
        issuer,
        CertManagerConfig::new(
            settings.name.clone(),
            Arc::new(seal_keys),
            settings.cert_key.clone(),
        ),
    );
    let resolver = Arc::new(
        SniResolver::new(&settings.base_domain, ca)
            .with_manager(Arc::clone(&manager))
            .with_challenges(Arc::clone(&challenges)),
    );
    let tls = server_config(resolver).context("build the edge's TLS configuration")?;
    let http_challenges = Arc::clone(&challenges);
    edge.set_acme_http(Arc::new(move |token: &str| http_challenges.http_token(token)));

    let stop = Arc::new(AtomicBool::new(false));
    let stop_flag = Arc::clone(&stop);
    let table = Arc::clone(edge.routes());
    let follow_store = Arc::clone(&store);
    tokio::task::spawn_blocking(move || {
        aloft_proxy::catalog::follow(
            follow_store,
            table,
            Arc::new(move || stop_flag.load(Ordering::Relaxed)),
        )
    })
    .await
    .context("read the service catalog")?
    .context("start following the service catalog")?;

    // Traffic runs on the edge's own threads, one per core, each accepting on its own listener
    // of each port (aloft_proxy::Workers); the once-per-edge loops stay on aloftd's runtime.
    let threads =
        WorkerThreads::start(settings.threads, "aloftd-edge").context("start the edge's threads")?;
    let workers = threads.workers().clone();
    let http = workers.bind_tcp(settings.http).with_context(|| {
        format!(
            "edge: listen for HTTP on {}; pick another address with --edge-http",
            settings.http
        )
    })?;
    let https = workers.bind_tcp(settings.https).with_context(|| {
        format!(
            "edge: listen for HTTPS on {}; pick another address with --edge-https",
            settings.https
        )
    })?;
    let http_addr = local_addr(&http).context("read the edge's HTTP address")?;
    let https_addr = local_addr(&https).context("read the edge's HTTPS address")?;
    let mut tasks = workers.spawn_each(http, |l| Arc::clone(&edge).serve_http(l));
    tasks.extend(workers.spawn_each(https, |l| Arc::clone(&edge).serve_https(l, Arc::clone(&tls))));
    tasks.extend([
        tokio::spawn(aloft_proxy::autostop_loop(Arc::clone(&edge))),
        // Service checks from the edge, through the dialer (inside the machines' namespace).
        tokio::spawn(Arc::clone(&edge).run_checks()),
        tokio::spawn(Arc::clone(&edge).serve_tcp_services(settings.http.ip(), workers.clone())),
        // A UDP port is one socket, on one worker (a client's flow is tied to the socket).
        workers.spawn(0, Arc::clone(&edge).serve_udp_services(settings.http.ip())),
        tokio::spawn(async move {
            if let Err(e) = manager.run().await {
                eprintln!("aloftd: edge: the certificate manager stopped: {e}");
            }
        }),
    ]);
    if let Some(addr) = settings.metrics {
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!("edge: listen for metrics on {addr}; pick another address with --edge-metrics")
        })?;
        eprintln!(
            "aloftd: edge metrics on http://{}/metrics",
            listener.local_addr().context("read the metrics address")?
        );
        tasks.push(tokio::spawn(Arc::clone(&edge).serve_metrics(listener)));
    }
    eprintln!(
        "aloftd: edge on http://{http_addr} and https://{https_addr} for *.{}",
        settings.base_domain
    );
    eprintln!("aloftd: edge on {} threads", workers.len());
    Ok(EdgeRole {
        tasks,
        stop,
        _threads: threads,
    })
}

/// The address a group of listeners sharing one port listens on.
fn local_addr(listeners: &[TcpListener]) -> std::io::Result<SocketAddr> {
    listeners
        .first()
        .ok_or_else(|| std::io::Error::other("the edge has no worker threads"))?
        .local_addr()
}

/// The keys custom domains' private keys are sealed with: the current one in `path`, created
/// (with its directory, 0700) on first use, and the `previous` ones, which must exist.
fn open_cert_keys(path: &std::path::Path, previous: &[PathBuf]) -> anyhow::Result<aloft_secretbox::Keyring> {
    crate::keys::EDGE_CERT.keyring(open_cert_key(path)?, previous)
}

/// The key custom domains' private keys are sealed with, created (with its directory, 0700) on
/// first use.
fn open_cert_key(path: &std::path::Path) -> anyhow::Result<aloft_secretbox::Key> {
    use std::os::unix::fs::DirBuilderExt as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {} for the edge's certificate key", dir.display()))?;
    }
    aloft_secretbox::Key::load_or_create(path).with_context(|| {
        format!(
            "open the edge's certificate key {}; point --edge-cert-key at the key file the other edges use",
            path.display()
        )
    })
}

/// Starts and idles machines through the agent that owns them (found by the placement record).
#[derive(Debug)]
struct HostControl {
    control: ControlStore,
    hosts: Vec<HostHandle>,
}

impl HostControl {
    /// `f` on the machine's agent; with `unleased_only`, refused while someone holds the
    /// machine's lease (a release is changing it: idling it now would fail the release).
    fn call(
        &self,
        app: &str,
        id: &MachineId,
        unleased_only: bool,
        f: impl FnOnce(&dyn MachineHost, &MachineId) -> Result<(), ApiError> + Send + 'static,
    ) -> ControlFuture {
        let control = self.control.clone();
        let hosts = self.hosts.clone();
        let (app, id) = (app.to_owned(), id.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let record = control
                    .get_machine(&app, id.as_str())
                    .map_err(|e| ControlError::Failed(e.to_string()))?
                    .ok_or_else(|| {
                        ControlError::Refused(format!("machine {id} of app {app} is not known"))
                    })?;
                if unleased_only
                    && let Some(lease) = control
                        .get_lease(&app, id.as_str())
                        .map_err(|e| ControlError::Failed(e.to_string()))?
                {
                    return Err(ControlError::Refused(format!(
                        "machine {id} is leased by {:?} (a release is changing it)",
                        lease.owner
                    )));
                }
                let host = hosts
                    .iter()
                    .find(|h| h.name == record.value.host)
                    .ok_or_else(|| {
                        ControlError::Failed(format!("host {} is not reachable", record.value.host))
                    })?;
                f(&*host.agent, &id).map_err(|e| {
                    if e.status() < 500 {
                        ControlError::Refused(e.to_string())
                    } else {
                        ControlError::Failed(e.to_string())
                    }
                })
            })
            .await
            .map_err(|e| ControlError::Failed(format!("the call did not finish: {e}")))?
        })
    }
}

impl MachineControl for HostControl {
    fn start(&self, app: &str, id: &MachineId) -> ControlFuture {
        self.call(app, id, false, |h, id| h.start(id).map(|_| ()))
    }

    fn stop(&self, app: &str, id: &MachineId) -> ControlFuture {
        self.call(app, id, true, |h, id| h.stop(id, HostStop::default()))
    }

    fn suspend(&self, app: &str, id: &MachineId) -> ControlFuture {
        self.call(app, id, true, |h, id| h.suspend(id))
    }
}

/// Dials machines from inside the network namespace their taps live in: the socket is made in
/// the namespace (on a short-lived thread that entered it: a socket belongs to the namespace it
/// was made in) and connected asynchronously from the runtime.
#[derive(Debug)]
struct NetnsDialer {
    ns: PathBuf,
}

impl NetnsDialer {
    /// A non-blocking socket of `kind` for `addr`'s family, made inside the namespace.
    fn socket(
        ns: &aloft_net::Namespace,
        addr: SocketAddr,
        kind: rustix::net::SocketType,
    ) -> std::io::Result<std::os::fd::OwnedFd> {
        let family = if addr.is_ipv4() {
            rustix::net::AddressFamily::INET
        } else {
            rustix::net::AddressFamily::INET6
        };
        let fd = ns.run(|| {
            rustix::net::socket_with(
                family,
                kind,
                rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
                None,
            )
        })??;
        Ok(fd)
    }
}

impl Dialer for NetnsDialer {
    fn dial(&self, addr: SocketAddr) -> DialFuture {
        let ns = aloft_net::Namespace::Path(self.ns.clone());
        Box::pin(async move {
            let fd = Self::socket(&ns, addr, rustix::net::SocketType::STREAM)?;
            let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
            socket.set_nodelay(true)?;
            socket.connect(addr).await
        })
    }

    fn udp(&self, addr: SocketAddr) -> UdpFuture {
        let ns = aloft_net::Namespace::Path(self.ns.clone());
        Box::pin(async move {
            // Made in the namespace, it binds (on connect) and routes there too.
            let fd = Self::socket(&ns, addr, rustix::net::SocketType::DGRAM)?;
            let socket = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd))?;
            socket.connect(addr).await?;
            Ok(socket)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::net::{IpAddr, SocketAddr};
    use std::time::Duration;

    use aloft_proxy::Dialer as _;

    use super::NetnsDialer;

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:\t0\t"))
    }

    /// A UDP socket from the dialer lives in the machines' namespace: it reaches an echo bound
    /// on the namespace's tap address (which the test's own namespace does not have) and gets
    /// the answer back.
    #[tokio::test]
    async fn netns_dialer_udp_reaches_a_socket_inside_the_namespace() {
        if !is_root() {
            eprintln!("skipped: needs root to create network namespaces");
            return;
        }
        let ns = aloft_testkit::NetNs::new().unwrap();
        let inside = aloft_net::Namespace::Path(ns.path());
        let echo = inside
            .run(|| std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(ns.host_ip), 0)))
            .unwrap()
            .unwrap();
        let addr = echo.local_addr().unwrap();
        echo.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let server = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let (n, from) = echo.recv_from(&mut buf).unwrap();
            let mut answer = b"echo:".to_vec();
            answer.extend_from_slice(&buf[..n]);
            echo.send_to(&answer, from).unwrap();
        });
        let dialer = NetnsDialer { ns: ns.path() };
        let socket = dialer.udp(addr).await.unwrap();
        assert_eq!(socket.peer_addr().unwrap(), addr);
        socket.send(b"ping").await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"echo:ping");
        server.join().unwrap();
        // The same address from this namespace is nobody's: the socket really is elsewhere.
        assert!(
            std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(ns.host_ip), 0)).is_err(),
            "the test namespace has the tap's address too; the check above proves nothing"
        );
    }
}
