//! `GET /v1/apps/{app}/machines/{id}/proxy?port=N` (an aloft extension, `aloft proxy`, flyctl's
//! `fly proxy`): a TCP connection to a port of a machine, over the request's own HTTP/1.1
//! connection.
//!
//! The protocol is `aloft_api::tunnel`'s. The request carries [`ProxyQuery`] (`port`) and
//! `Connection: upgrade` + `Upgrade: aloft-tcp`. Everything that can fail is checked **before**
//! the answer, so that every refusal is an ordinary JSON error: the token (401), the query
//! (400), the upgrade headers (426 without them, 400 for another protocol), the proxy limit
//! (503), the app and machine (404), the machine's state (412), its network (422) and the
//! connection to its port itself (502: refused, or not accepted within the host's 5 s). Only
//! then does the server answer `101 Switching Protocols` (`Connection: upgrade`,
//! `Upgrade: aloft-tcp`) with the machine's side already connected; from then on the client's
//! connection carries the TCP stream's bytes as they are, both ways.
//!
//! Either side's end of stream is passed on as a half-close (the other side's write half is
//! shut down) while the other direction goes on; the proxy ends when both directions ended, or
//! at once when either side fails (both connections are then closed). The machine's side has
//! TCP keepalive, so a machine that vanished without a word (its VM killed) ends the proxy too.
//!
//! Each proxied connection holds one of the server's permits ([`ApiState::with_max_proxies`])
//! until both sides are closed. Lease rules are `exec`'s: none (a connection changes nothing
//! the lease guards).

use std::time::Duration;

use aloft_api::{ApiError, PROXY_UPGRADE, ProxyQuery};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;

use crate::auth::Caller;
use crate::error::blocking;
use crate::machines::{MachinePath, locate, query_pairs};
use crate::upgrade::{Protocol, Upgradable};
use crate::{ApiState, HttpError};

/// Proxied connections a server carries at once, unless [`ApiState::with_max_proxies`] says
/// otherwise.
pub(crate) const MAX_PROXIES: usize = 256;
/// Idle time before the first keepalive probe on the machine's side, then the time between
/// probes; [`KEEPALIVE_RETRIES`] unanswered probes end the connection.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// See [`KEEPALIVE`].
const KEEPALIVE_RETRIES: u32 = 4;
/// Bytes buffered each way: what one read may carry before it is written on.
const BUFFER: usize = 64 * 1024;

/// The proxy's upgrade.
const PROXY: Protocol = Protocol {
    token: PROXY_UPGRADE,
    what: "a proxied connection",
    client: "aloft proxy",
};

/// `GET …/proxy?port=N` with `Upgrade: aloft-tcp` → `101 Switching Protocols`, then the machine
/// port's bytes (see the module doc).
pub(crate) async fn proxy(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    Upgradable(upgrade): Upgradable,
) -> Result<Response, HttpError> {
    let ProxyQuery { port } = ProxyQuery::from_query(query_pairs(query.as_deref()))?;
    let upgrade = match PROXY.accept(&headers, upgrade) {
        Ok(upgrade) => upgrade,
        Err(refusal) => return Ok(*refusal),
    };
    let permit = state.proxies().clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            503,
            "this server runs as many proxied connections as it allows: close one, or retry later",
        )
    })?;
    let machine = blocking(move || {
        let t = locate(&state, &caller, &path)?;
        Ok(t.host.connect(&t.id, port)?)
    })
    .await?;
    let machine = machine_side(machine)
        .map_err(|e| HttpError::internal(format!("prepare the connection to port {port}: {e}")))?;
    tokio::spawn(async move {
        // A failed upgrade (the client went away before the 101 reached it) closes the
        // machine's side.
        if let Ok(upgraded) = upgrade.await {
            relay(TokioIo::new(upgraded), machine, permit).await;
        }
    });
    Ok(PROXY.switching())
}

/// The host's blocking connection to the machine as a tokio stream, with keepalive and without
/// Nagle's delay (the client's writes are already what it meant to send).
fn machine_side(stream: std::net::TcpStream) -> std::io::Result<tokio::net::TcpStream> {
    stream.set_nonblocking(true)?;
    stream.set_nodelay(true)?;
    socket2::SockRef::from(&stream).set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE)
            .with_interval(KEEPALIVE)
            .with_retries(KEEPALIVE_RETRIES),
    )?;
    tokio::net::TcpStream::from_std(stream)
}

/// Copies both ways until both directions ended (each end of stream passed on as a shutdown of
/// the other side's write half) or either side failed; then both are closed and the permit is
/// given back.
async fn relay<C, M>(mut client: C, mut machine: M, permit: OwnedSemaphorePermit)
where
    C: AsyncRead + AsyncWrite + Unpin,
    M: AsyncRead + AsyncWrite + Unpin,
{
    // Either side failing (a reset, a broken pipe) ends the proxy: nothing to tell anyone,
    // the other side sees its connection close.
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut machine, BUFFER, BUFFER).await;
    drop(client);
    drop(machine);
    drop(permit);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::sync::Arc;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
    use tokio::sync::Semaphore;

    use super::*;

    const T: Duration = Duration::from_secs(10);

    /// Relays between two in-memory connections: the client's end, the machine's end, the
    /// relay's task and the permits (one, held by the relay).
    fn start() -> (
        DuplexStream,
        DuplexStream,
        tokio::task::JoinHandle<()>,
        Arc<Semaphore>,
    ) {
        let (client, client_server) = tokio::io::duplex(1 << 16);
        let (machine_server, machine) = tokio::io::duplex(1 << 16);
        let permits = Arc::new(Semaphore::new(1));
        let permit = permits.clone().try_acquire_owned().unwrap();
        let task = tokio::spawn(relay(client_server, machine_server, permit));
        (client, machine, task, permits)
    }

    async fn read_to_end(s: &mut DuplexStream) -> Vec<u8> {
        let mut out = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        out
    }

    #[tokio::test]
    async fn an_end_of_stream_is_passed_on_as_a_half_close() {
        let (mut client, mut machine, task, permits) = start();
        client.write_all(b"query").await.unwrap();
        client.shutdown().await.unwrap();
        // The machine reads to the client's end, then answers: the answer still arrives.
        assert_eq!(read_to_end(&mut machine).await, b"query");
        machine.write_all(b"answer").await.unwrap();
        assert!(!task.is_finished(), "one direction is still open");
        assert_eq!(permits.available_permits(), 0);
        machine.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut client).await, b"answer");
        tokio::time::timeout(T, task).await.unwrap().unwrap();
        assert_eq!(permits.available_permits(), 1, "the permit is back");
    }

    #[tokio::test]
    async fn the_machine_closing_first_ends_the_proxy_once_the_client_is_done() {
        let (mut client, mut machine, task, permits) = start();
        machine.write_all(b"banner").await.unwrap();
        drop(machine);
        assert_eq!(read_to_end(&mut client).await, b"banner");
        // The client may still write (to a machine that is gone: the bytes go nowhere) and
        // ends its side.
        client.shutdown().await.unwrap();
        tokio::time::timeout(T, task).await.unwrap().unwrap();
        assert_eq!(permits.available_permits(), 1);
    }

    #[tokio::test]
    async fn the_client_going_away_closes_the_machines_side() {
        let (client, mut machine, task, permits) = start();
        drop(client);
        assert_eq!(read_to_end(&mut machine).await, b"");
        drop(machine);
        tokio::time::timeout(T, task).await.unwrap().unwrap();
        assert_eq!(permits.available_permits(), 1);
    }
}
