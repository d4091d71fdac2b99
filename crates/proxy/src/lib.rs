//! aloft's edge proxy: users reach an app by name and the edge picks a machine for them.
//!
//! An [`Edge`] keeps a routing table ([`RoutingTable`]) built from the service catalog that
//! agents publish into the control store (`/catalog/…`, followed live by [`catalog`]), listens
//! for HTTP and HTTPS (and an app's own TCP and UDP ports), and for each request:
//!
//! 1. finds the app by Host/SNI (`<app>.<base domain>` or a custom domain);
//! 2. picks a machine: started, not cordoned, service checks not critical (undecided ones rank
//!    it last; see below), least loaded then closest, honouring `concurrency` soft and hard
//!    limits; when every running machine is at or over its soft limit it wakes a stopped or
//!    suspended one ([`MachineControl`]) and holds the request until it accepts; at the hard
//!    limit requests wait in a bounded queue, then get a 503;
//! 3. forwards it over pooled keep-alive connections (HTTP/1.1, or h2c with `h2_backend`),
//!    retrying on another machine when the connect fails before anything was sent;
//! 4. follows `fly-replay` answers (remembering them for a while when the app asks, see
//!    `replay_cache`), adds Fly's request and response headers, and answers its own
//!    errors with Fly's proxy error codes (`PR01`, `PC01`, …) in a header and a short page.
//!
//! UDP services ([`Edge::serve_udp_services`]) are relayed per client address: each flow is
//! stuck to one machine chosen by the same balancer (it counts as a connection, and wakes a
//! stopped machine while holding its first datagrams), through a socket connected to the
//! machine's private address, until it is idle for a while; datagrams go to the address the
//! guest knows as `fly-global-services`.
//!
//! Service health checks run from the edge ([`Edge::run_checks`], one task for all): each started
//! machine's service checks, as `aloft_api::checks` resolves them from its catalog entry (the
//! agent's definition), through the [`Dialer`], after the grace period and then every interval.
//! The edge's result for a check governs routing once it has one; until then the status the
//! agent published stands in. A critical check keeps the machine out of the pool for new requests
//! (open connections stay); checks of a machine that stops, leaves or changes version start over.
//!
//! An autostop loop stops or suspends excess idle machines as Fly's does. Figures for
//! Prometheus come from [`Edge::metrics_text`].
//!
//! HTTP/1.x, both to clients (`h1_server`) and to machines (`h1`), is the edge's own code over
//! `httparse` and the `http` types; hyper serves HTTP/2 to clients and speaks h2c and upgrades
//! to machines (ADR 0015).
//!
//! The proxy reaches machines only through two small traits the daemon implements:
//! [`MachineControl`] (start/suspend/stop a machine) and [`Dialer`] (open a TCP connection, or a
//! connected UDP socket, to a machine's private address, e.g. from inside the machines' network
//! namespace). It depends on
//! `aloft-api` (wire types) and `aloft-store` (the catalog); it must not depend on the agent, the
//! VM, image or network crates, nor on the control plane's HTTP API.
//!
//! Threading: tokio, thread-per-core ([`WorkerThreads`]): each worker thread runs a
//! single-threaded runtime and accepts on its own listener of the shared public port, so a
//! client connection and the machine connections its requests use stay on one thread; loops
//! that run once per edge run on one worker. The edge also runs on any runtime it is given
//! ([`Workers::current`]). Shared state is behind short std locks never held across an `.await`; the
//! routing table is an immutable snapshot swapped on every change, so a request never waits for
//! a catalog update and a catalog update never waits for requests.

mod balance;
pub mod catalog;
mod clients;
mod config;
mod dial;
mod error;
mod h1;
mod h1_server;
mod health;
mod http;
mod load;
mod metrics;
mod proxy_proto;
mod replay;
mod replay_cache;
mod routes;
mod scale;
mod tcp;
pub mod tls;
mod udp;
mod upstream;
mod workers;

/// The hash map of the per-request look-ups (apps, machines, hosts): foldhash, randomly seeded
/// per map, in place of SipHash, which was ~4 % of the edge's instructions per request. Their
/// keys come from the catalog, never from a client, who only looks them up.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub use config::{EdgeConfig, RegionRtt};
pub use dial::{DialFuture, Dialer, DirectDialer, UdpFuture};
pub use error::ERROR_HEADER;
pub use error::ProxyCode;
pub use routes::{RoutingTable, Snapshot};
pub use scale::{ControlError, ControlFuture, MachineControl, autostop_loop, autostop_pass};
pub use workers::{WorkerThreads, Workers};

use std::sync::{Arc, OnceLock};

/// Answers ACME HTTP-01 challenges: token → key authorization.
pub type AcmeHttpResponder = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The edge: its routing table, load counters, connection pool and loops. Cheap to clone via
/// `Arc`; every listener and loop holds one.
#[derive(Debug)]
pub struct Edge {
    config: EdgeConfig,
    routes: Arc<RoutingTable>,
    loads: load::Loads,
    control: Arc<dyn MachineControl>,
    dialer: Arc<dyn Dialer>,
    client: upstream::Upstreams,
    metrics: metrics::Metrics,
    health: health::Health,
    wakes: scale::Wakes,
    clients: clients::ClientLimits,
    udp_clients: clients::ClientLimits,
    udp_flows: udp::FlowTotal,
    replay_cache: replay_cache::ReplayCache,
    tls: OnceLock<Arc<rustls::ServerConfig>>,
    /// The port the HTTPS listener really binds (`force_https` sends clients that name ports
    /// there).
    https_bound: OnceLock<u16>,
    acme_http: OnceLock<AcmeHttp>,
}

struct AcmeHttp(AcmeHttpResponder);

impl std::fmt::Debug for AcmeHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AcmeHttp")
    }
}

impl Edge {
    /// An edge with an empty routing table; fill it with [`RoutingTable::upsert`] or follow the
    /// store with [`catalog::follow`].
    pub fn new(config: EdgeConfig, control: Arc<dyn MachineControl>, dialer: Arc<dyn Dialer>) -> Arc<Self> {
        let client = upstream::Upstreams::new(dialer.clone(), &config);
        Arc::new(Self {
            routes: Arc::default(),
            loads: load::Loads::default(),
            control,
            client,
            dialer,
            metrics: metrics::Metrics::default(),
            health: health::Health::default(),
            wakes: scale::Wakes::default(),
            clients: clients::ClientLimits::default(),
            udp_clients: clients::ClientLimits::default(),
            udp_flows: udp::FlowTotal::default(),
            replay_cache: replay_cache::ReplayCache::default(),
            tls: OnceLock::new(),
            https_bound: OnceLock::new(),
            acme_http: OnceLock::new(),
            config,
        })
    }

    /// Answers `/.well-known/acme-challenge/{token}` on the HTTP listener with `responder`
    /// (ACME HTTP-01). Set once; later calls are ignored.
    pub fn set_acme_http(&self, responder: AcmeHttpResponder) {
        let _ = self.acme_http.set(AcmeHttp(responder));
    }

    /// The routing table.
    pub fn routes(&self) -> &Arc<RoutingTable> {
        &self.routes
    }

    /// Its configuration.
    pub fn config(&self) -> &EdgeConfig {
        &self.config
    }

    /// Passive health: machine `id` gets nothing for `failed_backoff` (a connect to it, or a
    /// request it dropped, just failed).
    pub(crate) fn mark_failed(&self, id: &aloft_api::MachineId) {
        let load = self.loads.machine(id);
        self.loads.mark_failed(&load, self.config.failed_backoff);
    }

    /// Runs the service checks of the routing table's started machines from the edge, through
    /// its [`Dialer`], and routes by their results (see the crate docs). One task for every
    /// check; it ends when the edge is dropped (it holds no reference to it), or when aborted.
    /// Without it, routing follows the check statuses the catalog carries.
    pub async fn run_checks(self: Arc<Self>) {
        let prober = self.health.prober(self.routes.clone(), self.dialer.clone());
        drop(self);
        prober.run().await;
    }

    /// Prometheus text exposition of the edge's figures.
    pub fn metrics_text(&self) -> String {
        self.metrics.render(self)
    }
}
