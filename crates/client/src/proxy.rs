//! `GET /v1/apps/{app}/machines/{id}/proxy?port=N`: a TCP connection to a port of a machine
//! (`aloft proxy`; [`aloft_api::ProxyQuery`] and `aloft_api::tunnel` are the contract).
//!
//! The request asks for `Upgrade: aloft-tcp`; aloftd connects to the machine's port before it
//! answers, so a refused or unreachable port is an API error (502) like any other, and on
//! `101 Switching Protocols` the connection carries the TCP stream's bytes as they are, both
//! ways. [`ProxyStream`] is that connection: shutting down its write side passes the end of
//! stream on to the machine's side (a half-close), and a read of 0 bytes is the machine's end.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use aloft_api::{PROXY_UPGRADE, ProxyQuery};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::machines::machine_path;
use crate::{Client, ClientError};

/// An upgraded proxy connection: the bytes of a TCP connection to a machine's port; see
/// [`Client::proxy`].
pub struct ProxyStream {
    io: reqwest::Upgraded,
}

impl fmt::Debug for ProxyStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyStream").finish_non_exhaustive()
    }
}

impl AsyncRead for ProxyStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ProxyStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    /// Ends the client's direction (the machine's side reads the end of stream); the other
    /// direction stays open until the machine's side ends it.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Client {
    /// `GET …/machines/{id}/proxy?port=PORT` upgraded to `aloft-tcp`: a TCP connection to `port`
    /// of a started machine, made by aloftd. Every refusal comes before the upgrade, as an API
    /// error: 404 no such app or machine, 412 the machine is not started, 422 aloftd has no
    /// network to reach it, 502 the port refused or did not answer, 503 too many proxied
    /// connections. A success status other than 101 is a [`ClientError::Upgrade`].
    pub async fn proxy(&self, app: &str, machine_id: &str, port: u16) -> Result<ProxyStream, ClientError> {
        let path = format!(
            "{}?{}",
            machine_path(app, machine_id, "/proxy"),
            ProxyQuery { port }.to_query()
        );
        let io = self.upgrade(&path, PROXY_UPGRADE).await?;
        Ok(ProxyStream { io })
    }
}
