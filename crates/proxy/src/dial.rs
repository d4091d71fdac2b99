//! Opening connections to machines: TCP streams, and connected UDP sockets for UDP flows.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;

use tokio::net::{TcpStream, UdpSocket};

/// A connect in progress.
pub type DialFuture = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// A UDP socket being opened and connected.
pub type UdpFuture = Pin<Box<dyn Future<Output = io::Result<UdpSocket>> + Send>>;

/// Opens connections to machines' private addresses. The daemon supplies one that dials from
/// wherever the machines' network lives (its own namespace or another one).
pub trait Dialer: Send + Sync + fmt::Debug + 'static {
    /// Connects to `addr`. The caller applies its own timeout.
    fn dial(&self, addr: SocketAddr) -> DialFuture;

    /// A UDP socket made where the machines' network lives, bound to an ephemeral port and
    /// connected to `addr`: it sends only there and receives only from there, and a machine
    /// with nothing bound on the port makes its next receive fail with `ConnectionRefused`.
    fn udp(&self, addr: SocketAddr) -> UdpFuture;
}

/// The wildcard address of `addr`'s family, port 0: where a socket that will connect to `addr`
/// binds.
fn any_of(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

/// Dials from the edge's own network namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectDialer;

impl Dialer for DirectDialer {
    fn dial(&self, addr: SocketAddr) -> DialFuture {
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }

    fn udp(&self, addr: SocketAddr) -> UdpFuture {
        Box::pin(async move {
            let socket = UdpSocket::bind(any_of(addr)).await?;
            socket.connect(addr).await?;
            Ok(socket)
        })
    }
}
