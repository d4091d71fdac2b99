//! The DNS role: this host's internal DNS ([`aloft_dns`]) on the platform's resolver address
//! (`fdaa::3`, which every machine's `/etc/resolv.conf` names; ADR 0007 and ADR 0018), port 53,
//! UDP and TCP, in the machines' network namespace. It runs wherever machines get the host
//! network: without it they could resolve nothing, not even public names.
//!
//! Its zone follows the control store (the service catalog, apps, organizations' networks) on a
//! thread of its own; the server runs on aloftd's runtime. Names outside `.internal` go to the
//! upstream resolvers: `--dns-upstream`, else the `nameserver`s of aloftd's own
//! `/etc/resolv.conf` (asked from aloftd's namespace, so a loopback resolver such as
//! systemd-resolved's works).

use std::net::{Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use aloft_dns::{Server, ServerConfig, Zone};
use aloft_net::Namespace;
use aloft_store::{Follower, Store};
use anyhow::{Context as _, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// The port the resolver listens on.
const PORT: u16 = 53;

/// Where the host's resolvers are listed when `--dns-upstream` gives none.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The DNS role's settings (from aloftd's flags).
#[derive(Debug, Clone)]
pub(crate) struct DnsSettings {
    /// This host's region (`top<N>.nearest.of.` puts its machines first).
    pub(crate) region: String,
    /// The resolver's address (the address plan's DNS address).
    pub(crate) address: Ipv6Addr,
    /// The machines' network namespace (`--machines-netns`); `None`: aloftd's own.
    pub(crate) netns: Option<PathBuf>,
    /// `--dns-upstream`; empty: the host's `/etc/resolv.conf`.
    pub(crate) upstreams: Vec<SocketAddr>,
}

/// The running resolver; dropping it stops the server and the zone's follower.
pub(crate) struct DnsRole {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsRole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
    }
}

/// `ADDR` or `ADDR:PORT` (port 53 when none): a `--dns-upstream` value.
pub(crate) fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    s.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, PORT))
        .map_err(|_| {
            format!("{s:?} is not an address: use e.g. 192.0.2.53, 2001:db8::53 or [2001:db8::53]:5353")
        })
}

/// A socket of `kind` bound to `addr`, made in `netns`. `IPV6_FREEBIND`, so an address the
/// network set-up has only just added binds at once.
fn bind(netns: Option<&PathBuf>, addr: SocketAddr, kind: Type) -> anyhow::Result<Socket> {
    let ns = netns.map_or(Namespace::Current, |p| Namespace::Path(p.clone()));
    let protocol = if kind == Type::STREAM {
        Protocol::TCP
    } else {
        Protocol::UDP
    };
    let made = ns
        .run(|| -> std::io::Result<Socket> {
            let socket = Socket::new(Domain::IPV6, kind, Some(protocol))?;
            socket.set_only_v6(true)?;
            socket.set_freebind_v6(true)?;
            if kind == Type::STREAM {
                socket.set_reuse_address(true)?;
            }
            socket.bind(&SockAddr::from(addr))?;
            if kind == Type::STREAM {
                socket.listen(128)?;
            }
            Ok(socket)
        })
        .context("enter the machines' network namespace")?;
    made.with_context(|| {
        format!(
            "listen for machines' DNS queries on {addr} ({}); if something else serves port 53 on \
             every address, make it listen on its own addresses only, or pass --no-dns (machines \
             then resolve no names)",
            if kind == Type::STREAM { "TCP" } else { "UDP" }
        )
    })
}

/// The upstream resolvers: the flags', else the host's.
fn upstreams(settings: &DnsSettings) -> Vec<SocketAddr> {
    if !settings.upstreams.is_empty() {
        return settings.upstreams.clone();
    }
    let found = std::fs::read_to_string(RESOLV_CONF)
        .map(|text| aloft_dns::resolv_conf_upstreams(&text))
        .unwrap_or_default();
    if found.is_empty() {
        eprintln!(
            "aloftd: warning: {RESOLV_CONF} names no resolver: machines can resolve .internal names \
             only; pass --dns-upstream ADDR for the rest"
        );
    }
    found
}

/// Starts the resolver: loads its zone from `store` (then follows it) and serves on
/// `runtime`.
pub(crate) fn start(
    settings: &DnsSettings,
    store: Arc<dyn Store>,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<DnsRole> {
    let upstreams = upstreams(settings);
    if upstreams.iter().any(|u| u.ip() == settings.address) {
        bail!(
            "--dns-upstream {}: that is the internal DNS itself; name the host's resolvers",
            settings.address
        );
    }
    let addr = SocketAddr::from((settings.address, PORT));
    let udp: UdpSocket = bind(settings.netns.as_ref(), addr, Type::DGRAM)?.into();
    let tcp: TcpListener = bind(settings.netns.as_ref(), addr, Type::STREAM)?.into();
    let zone = Arc::new(Zone::new(settings.region.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    aloft_store::follow(
        store,
        aloft_dns::PREFIXES,
        Arc::clone(&zone) as Arc<dyn Follower>,
        "aloftd-dns",
        Arc::new(move || flag.load(Ordering::Relaxed)),
    )
    .context("start following the control store for the internal DNS")?;
    let server = Arc::new(Server::new(
        zone,
        ServerConfig {
            upstreams: upstreams.clone(),
            ..ServerConfig::default()
        },
    ));
    let task = runtime.spawn(async move {
        if let Err(e) = server.serve(udp, tcp).await {
            eprintln!("aloftd: error: the internal DNS stopped: {e}");
        }
    });
    eprintln!(
        "aloftd: internal DNS on [{}]:{PORT} (other names to {})",
        settings.address,
        if upstreams.is_empty() {
            "nowhere".to_owned()
        } else {
            upstreams
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    Ok(DnsRole { stop, task })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use super::parse_upstream;

    #[test]
    fn upstreams_are_addresses_with_port_53_unless_given() {
        assert_eq!(parse_upstream("192.0.2.1").unwrap().to_string(), "192.0.2.1:53");
        assert_eq!(
            parse_upstream("2001:db8::1").unwrap().to_string(),
            "[2001:db8::1]:53"
        );
        assert_eq!(
            parse_upstream("[2001:db8::1]:5353").unwrap().to_string(),
            "[2001:db8::1]:5353"
        );
        assert_eq!(parse_upstream("127.0.0.1:5300").unwrap().port(), 5300);
        let e = parse_upstream("resolver.example").unwrap_err();
        assert!(e.contains("is not an address"), "{e}");
    }
}
