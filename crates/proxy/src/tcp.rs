//! An app's own public ports (services whose ports are not the edge's HTTP and HTTPS ports):
//! listeners that follow the routing table, and per connection the port's handlers: none (raw
//! TCP to a machine), `proxy_proto` (a PROXY header first), `tls` (terminated here, plaintext to
//! the machine), `http` (served like the main HTTP listener, per request).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use aloft_api::MachinePort;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::http::{ConnInfo, Route};
use crate::proxy_proto;
use crate::routes::{Protocol, Snapshot};
use crate::{Edge, Workers};

/// Ranges wider than this are not listened on (a typo like 1-65535 must not bind everything).
pub(crate) const MAX_RANGE: u16 = 256;

/// The public ports of `proto` services the routing table asks for: port → app (the first app
/// by name wins a port two apps claim).
pub(crate) fn desired_ports(snap: &Snapshot, skip: &[u16], proto: Protocol) -> BTreeMap<u16, String> {
    let mut apps: Vec<_> = snap.apps().collect();
    apps.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = BTreeMap::new();
    for app in apps {
        for m in &app.machines {
            for s in &m.entry.services {
                if Protocol::of(s) != Some(proto) {
                    continue;
                }
                for p in &s.ports {
                    for port in port_list(p) {
                        if !skip.contains(&port) {
                            out.entry(port).or_insert_with(|| app.name.clone());
                        }
                    }
                }
            }
        }
    }
    out
}

/// The ports listened on (port → app and what serves it) that `want` no longer gives to the
/// same app.
pub(crate) fn ports_gone<T>(listening: &HashMap<u16, (String, T)>, want: &BTreeMap<u16, String>) -> Vec<u16> {
    listening
        .iter()
        .filter(|(port, (app, _))| want.get(port) != Some(app))
        .map(|(port, _)| *port)
        .collect()
}

/// The ports `p` names: one, or a range no wider than [`MAX_RANGE`].
pub(crate) fn port_list(p: &MachinePort) -> Vec<u16> {
    match (p.port, p.start_port, p.end_port) {
        (Some(port), _, _) => vec![port],
        (None, Some(a), Some(b)) if a <= b && b - a < MAX_RANGE => (a..=b).collect(),
        _ => Vec::new(),
    }
}

impl Edge {
    /// Listens on apps' own public TCP ports on `ip`, following the routing table: ports appear
    /// and disappear with the services that ask for them (open connections stay). Each port is
    /// accepted on by every one of `workers`, as the HTTP listeners are. Runs until the task is
    /// dropped.
    pub async fn serve_tcp_services(self: Arc<Self>, ip: IpAddr, workers: Workers) {
        let mut listening: HashMap<u16, (String, Vec<JoinHandle<()>>)> = HashMap::new();
        let mut failed: HashSet<(u16, String)> = HashSet::new();
        let skip = [self.config.http_port, self.config.https_port];
        loop {
            let changed = self.routes.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let want = desired_ports(&self.routes.snapshot(), &skip, Protocol::Tcp);
            for port in ports_gone(&listening, &want) {
                if let Some((_, tasks)) = listening.remove(&port) {
                    // The listeners are closed once their tasks are gone: only then may another
                    // app's take the port.
                    for task in &tasks {
                        task.abort();
                    }
                    for task in tasks {
                        let _ = task.await;
                    }
                }
            }
            failed.retain(|(port, app)| want.get(port) == Some(app));
            for (port, app) in &want {
                if listening.contains_key(port) {
                    continue;
                }
                match workers.bind_tcp(SocketAddr::new(ip, *port)) {
                    Ok(listeners) => {
                        failed.remove(&(*port, app.clone()));
                        let tasks = workers
                            .spawn_each(listeners, |l| Arc::clone(&self).accept_tcp(l, app.clone(), *port));
                        listening.insert(*port, (app.clone(), tasks));
                    }
                    Err(e) => {
                        if failed.insert((*port, app.clone())) {
                            eprintln!("edge: cannot listen on {ip}:{port} for app {app}: {e}");
                        }
                    }
                }
            }
            // Retry failed binds now and then; otherwise wait for the table to change.
            let _ = tokio::time::timeout(Duration::from_secs(30), changed).await;
        }
    }

    async fn accept_tcp(self: Arc<Self>, listener: TcpListener, app: String, port: u16) {
        self.accept_clients(listener, move |edge, stream, peer| {
            let app = app.clone();
            async move { edge.serve_tcp_conn(stream, peer, &app, port).await }
        })
        .await;
    }

    async fn serve_tcp_conn(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, app: &str, port: u16) {
        let snap = self.routes.snapshot();
        let Some(app_routes) = snap.app(app).cloned() else {
            return;
        };
        // The port's handlers, from any machine that serves it (machines of one process group
        // share their services).
        let Some(port_cfg) = app_routes
            .machines
            .iter()
            .find_map(|m| m.service_for_port(port))
            .and_then(|s| s.ports.iter().find(|p| port_list(p).contains(&port)).cloned())
        else {
            return;
        };
        let handlers: Vec<&str> = port_cfg.handlers.iter().map(String::as_str).collect();
        let local = stream
            .local_addr()
            .unwrap_or(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port));
        let tls = handlers.contains(&"tls");
        if tls {
            let Some(config) = self.tls.get().cloned() else {
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let Ok(Ok(tls_stream)) =
                tokio::time::timeout(self.config.header_read_timeout, acceptor.accept(stream)).await
            else {
                return;
            };
            if crate::tls::is_acme_tls(tls_stream.get_ref().1.alpn_protocol()) {
                return;
            }
            let sni = tls_stream.get_ref().1.server_name().map(str::to_owned);
            if handlers.contains(&"http") {
                let info = ConnInfo::new(&self.config, peer, port, true, sni);
                let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
                self.serve_conn(tls_stream, info, h2).await;
            } else {
                self.pipe(tls_stream, peer, local, app_routes, port, &port_cfg)
                    .await;
            }
        } else if handlers.contains(&"http") {
            let info = ConnInfo::new(&self.config, peer, port, false, None);
            self.serve_conn(stream, info, false).await;
        } else {
            self.pipe(stream, peer, local, app_routes, port, &port_cfg).await;
        }
    }

    /// Raw TCP (optionally after a PROXY header) between a client and a chosen machine; the
    /// machine's load counts this connection until it closes.
    async fn pipe<S>(
        self: &Arc<Self>,
        mut client: S,
        peer: SocketAddr,
        local: SocketAddr,
        app: Arc<crate::routes::AppRoutes>,
        port: u16,
        port_cfg: &MachinePort,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let route = Route {
            app: app.name.clone(),
            ..Route::default()
        };
        let mut tried = Vec::new();
        for _ in 0..self.config.connect_attempts.max(1) {
            let Ok((machine, guard)) = self.pick(&app, &route, &tried, port, None).await else {
                return;
            };
            let internal = machine.service_for_port(port).and_then(|s| s.internal_port);
            let (Some(ip), Some(internal)) = (machine.ip, internal) else {
                return;
            };
            let addr = SocketAddr::new(ip, internal);
            // A woken machine's probe connection when there is one.
            let Ok(mut backend) = self.client.connect(addr).await else {
                self.mark_failed(&machine.entry.id);
                tried.push(machine.entry.id.clone());
                continue;
            };
            if port_cfg.handlers.iter().any(|h| h == "proxy_proto") {
                let version = port_cfg
                    .proxy_proto_options
                    .as_ref()
                    .and_then(|o| o.version.as_deref());
                let Ok(version) = proxy_proto::Version::from_config(version) else {
                    return;
                };
                if backend.write_all(&version.header(peer, local)).await.is_err() {
                    return;
                }
            }
            let _guard = guard;
            let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
            return;
        }
    }

    /// Serves `GET /metrics` (Prometheus text) on `listener` until the task is dropped.
    pub async fn serve_metrics(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let edge = Arc::clone(&self);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let edge = Arc::clone(&edge);
                    async move {
                        let mut resp = if req.uri().path() == "/metrics" {
                            let mut r = http::Response::new(crate::http::full(edge.metrics_text()));
                            r.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("text/plain; version=0.0.4"),
                            );
                            r
                        } else {
                            http::Response::new(crate::http::full("not found: try /metrics\n"))
                        };
                        if req.uri().path() != "/metrics" {
                            *resp.status_mut() = http::StatusCode::NOT_FOUND;
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}
