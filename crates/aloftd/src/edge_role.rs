//! The edge role: aloft-proxy's [`Edge`] on this host, following the control store's service
//! catalog, waking and idling machines through this host's agents, with TLS from the local CA
//! (and ACME when configured) for `<app>.<base domain>` and custom domains.
//!
//! Wiring only: routing, balancing and TLS live in `aloft-proxy`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aloft_api::{ApiError, HostStop, MachineHost, MachineId};
use aloft_control::HostHandle;
use aloft_proxy::tls::{CertManager, Challenges, Issuer, LocalCa, LocalIssuer, SniResolver, server_config};
use aloft_proxy::{ControlError, ControlFuture, DialFuture, Dialer, Edge, EdgeConfig, MachineControl};
use aloft_store::{ControlStore, Store};
use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the edge role needs from aloftd's flags.
#[derive(Debug, Clone)]
pub(crate) struct EdgeSettings {
    pub(crate) region: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) http: SocketAddr,
    pub(crate) https: SocketAddr,
    pub(crate) metrics: Option<SocketAddr>,
    pub(crate) base_domain: String,
    pub(crate) autostop_interval: Duration,
    pub(crate) idle_after: Duration,
    pub(crate) machines_netns: Option<PathBuf>,
    /// Custom domains' certificates from this ACME CA (`--acme-*`); the local CA without it.
    pub(crate) acme: Option<crate::acme_issuer::AcmeSettings>,
}

/// The running edge; dropping it stops its listeners and loops (open connections end with the
/// runtime).
#[derive(Debug)]
pub(crate) struct EdgeRole {
    tasks: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
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
    let manager = CertManager::new(Arc::clone(&store), issuer);
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

    let http = TcpListener::bind(settings.http).await.with_context(|| {
        format!(
            "edge: listen for HTTP on {}; pick another address with --edge-http",
            settings.http
        )
    })?;
    let https = TcpListener::bind(settings.https).await.with_context(|| {
        format!(
            "edge: listen for HTTPS on {}; pick another address with --edge-https",
            settings.https
        )
    })?;
    let http_addr = http.local_addr().context("read the edge's HTTP address")?;
    let https_addr = https.local_addr().context("read the edge's HTTPS address")?;
    let mut tasks = vec![
        tokio::spawn(Arc::clone(&edge).serve_http(http)),
        tokio::spawn(Arc::clone(&edge).serve_https(https, tls)),
        tokio::spawn(aloft_proxy::autostop_loop(Arc::clone(&edge))),
        tokio::spawn(Arc::clone(&edge).serve_tcp_services(settings.http.ip())),
        tokio::spawn(async move {
            if let Err(e) = manager.run().await {
                eprintln!("aloftd: edge: the certificate manager stopped: {e}");
            }
        }),
    ];
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
    Ok(EdgeRole { tasks, stop })
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

impl Dialer for NetnsDialer {
    fn dial(&self, addr: SocketAddr) -> DialFuture {
        let ns = aloft_net::Namespace::Path(self.ns.clone());
        Box::pin(async move {
            let family = if addr.is_ipv4() {
                rustix::net::AddressFamily::INET
            } else {
                rustix::net::AddressFamily::INET6
            };
            let fd = ns.run(|| {
                rustix::net::socket_with(
                    family,
                    rustix::net::SocketType::STREAM,
                    rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
                    None,
                )
            })??;
            let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
            socket.set_nodelay(true)?;
            socket.connect(addr).await
        })
    }
}
