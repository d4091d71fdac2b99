//! Opening TCP connections to machines.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::net::TcpStream;

/// A connect in progress.
pub type DialFuture = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// Opens TCP connections to machines' private addresses. The daemon supplies one that dials from
/// wherever the machines' network lives (its own namespace or another one).
pub trait Dialer: Send + Sync + fmt::Debug + 'static {
    /// Connects to `addr`. The caller applies its own timeout.
    fn dial(&self, addr: SocketAddr) -> DialFuture;
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
}
