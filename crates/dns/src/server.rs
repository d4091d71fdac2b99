//! Serving DNS: queries over UDP and TCP, answered from the zone or relayed to upstream
//! resolvers.
//!
//! Everything a query starts is bounded: a relayed query waits at most the upstream timeout per
//! upstream, a TCP connection closes after `tcp_idle` without a full query or while an answer
//! cannot be written, and queries in flight to upstreams and TCP connections are capped. What
//! `serve` spawned ends when its future is dropped.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::time::timeout;

use crate::Zone;
use crate::wire::{self, Query, Question, Rcode, Reply};

/// How long a loop pauses after a socket error, so a lasting one (no file descriptors left)
/// does not spin.
const ERROR_PAUSE: Duration = Duration::from_millis(50);
/// Largest UDP datagram.
const MAX_DATAGRAM: usize = 65_535;

/// How a [`Server`] relays and how much it takes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Resolvers names not ours are relayed to, tried in order (see
    /// [`resolv_conf_upstreams`]); none: those names get `REFUSED`.
    pub upstreams: Vec<SocketAddr>,
    /// How long an upstream has to answer before the next one is tried; when all have failed
    /// the asker gets `SERVFAIL`.
    pub upstream_timeout: Duration,
    /// Relayed queries in flight at once; beyond, queries to relay get `SERVFAIL` at once.
    pub max_forwarded: usize,
    /// TCP connections open at once; beyond, new ones are accepted and closed.
    pub max_tcp_connections: usize,
    /// How long a TCP connection may stay without a full query (or a written answer).
    pub tcp_idle: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
            max_forwarded: 1024,
            max_tcp_connections: 256,
            tcp_idle: Duration::from_secs(10),
        }
    }
}

/// The resolvers of a `resolv.conf` (its `nameserver` lines, port 53, in order, each once).
/// Malformed addresses and scoped ones (`fe80::1%eth0`) are skipped.
pub fn resolv_conf_upstreams(text: &str) -> Vec<SocketAddr> {
    let mut upstreams = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        if let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) {
            let addr = SocketAddr::new(ip, 53);
            if !upstreams.contains(&addr) {
                upstreams.push(addr);
            }
        }
    }
    upstreams
}

/// Why a [`Server`] cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The UDP socket cannot be used.
    #[error(
        "cannot serve DNS on the given UDP socket: {0} (give a bound socket, and serve from a \
         tokio runtime with I/O enabled)"
    )]
    Udp(#[source] io::Error),
    /// The TCP listener cannot be used.
    #[error(
        "cannot serve DNS on the given TCP listener: {0} (give a listening socket, and serve \
         from a tokio runtime with I/O enabled)"
    )]
    Tcp(#[source] io::Error),
}

/// The DNS server: answers `.internal` names from a [`Zone`] and relays the others.
#[derive(Debug)]
pub struct Server {
    zone: Arc<Zone>,
    config: ServerConfig,
    /// Permits for relayed queries.
    forwards: Arc<Semaphore>,
    /// Permits for TCP connections.
    connections: Arc<Semaphore>,
}

/// What to do with a message.
#[derive(Debug)]
enum Handled {
    /// Send this.
    Answer(Vec<u8>),
    /// Relay it upstream.
    Forward(Query),
    /// Say nothing.
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Server {
    /// A server answering from `zone`.
    pub fn new(zone: Arc<Zone>, config: ServerConfig) -> Self {
        let permits = |n: usize| Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS)));
        Self {
            zone,
            forwards: permits(config.max_forwarded),
            connections: permits(config.max_tcp_connections),
            config,
        }
    }

    /// Serves on `udp` and `tcp` until the future is dropped. The sockets may have been made in
    /// another network namespace by the caller: this sets them non-blocking and registers them
    /// with tokio. Queries are relayed from sockets made here, in the calling process's own
    /// namespace: a UDP socket of its own per relayed query (a random source port), one TCP
    /// connection per query that came over TCP. An upstream equal to `udp`'s own address is
    /// never used (a host whose resolv.conf names this server must not loop).
    pub async fn serve(
        self: Arc<Self>,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> Result<(), ServerError> {
        let udp = udp
            .set_nonblocking(true)
            .and_then(|()| UdpSocket::from_std(udp))
            .map_err(ServerError::Udp)?;
        let tcp = tcp
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(tcp))
            .map_err(ServerError::Tcp)?;
        let local = udp.local_addr().map_err(ServerError::Udp)?;
        // Everything spawned below watches this channel and ends when its sender, dropped with
        // this future, is gone.
        let (_stop, stopped) = watch::channel(());
        let upstreams = self
            .config
            .upstreams
            .iter()
            .copied()
            .filter(|&u| u != local)
            .collect();
        let relay = Arc::new(Relay {
            upstreams,
            timeout: self.config.upstream_timeout,
        });
        let udp = Arc::new(udp);
        tokio::select! {
            never = self.serve_udp(&udp, &relay, &stopped) => match never {},
            never = self.serve_tcp(tcp, &relay, &stopped) => match never {},
        }
    }

    async fn serve_udp(
        self: &Arc<Self>,
        udp: &Arc<UdpSocket>,
        relay: &Arc<Relay>,
        stopped: &watch::Receiver<()>,
    ) -> Infallible {
        let mut buf = vec![0; MAX_DATAGRAM];
        loop {
            let (len, client) = match udp.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("dns: cannot receive a UDP query: {e}");
                    tokio::time::sleep(ERROR_PAUSE).await;
                    continue;
                }
            };
            let msg = buf.get(..len).unwrap_or_default();
            match self.handle(msg, client.ip(), Transport::Udp, relay.has_upstreams()) {
                // Lost answers are UDP's lot: the asker asks again.
                Handled::Answer(answer) => drop(udp.send_to(&answer, client).await),
                Handled::Forward(query) => self.relay_udp(query, msg, client, udp, relay, stopped),
                Handled::Drop => {}
            }
        }
    }

    /// Relays a UDP query on a task of its own, its answer (or `SERVFAIL`) sent from there.
    fn relay_udp(
        &self,
        query: Query,
        raw: &[u8],
        client: SocketAddr,
        udp: &Arc<UdpSocket>,
        relay: &Arc<Relay>,
        stopped: &watch::Receiver<()>,
    ) {
        let limit = query.udp_limit();
        let Ok(permit) = Arc::clone(&self.forwards).try_acquire_owned() else {
            let answer = wire::encode_response(&query, &Reply::error(Rcode::ServFail), limit);
            // Best effort, without waiting: the server is busy.
            drop(udp.try_send_to(&answer, client));
            return;
        };
        let raw = raw.to_vec();
        let (udp, relay) = (Arc::clone(udp), Arc::clone(relay));
        spawn(stopped, async move {
            let answer = match relay.exchange_udp(&raw, &query.question, limit).await {
                Some(mut answer) => {
                    wire::set_id(&mut answer, query.id);
                    wire::truncated(answer, limit)
                }
                None => wire::encode_response(&query, &Reply::error(Rcode::ServFail), limit),
            };
            drop(permit);
            drop(udp.send_to(&answer, client).await);
        });
    }

    async fn serve_tcp(
        self: &Arc<Self>,
        listener: TcpListener,
        relay: &Arc<Relay>,
        stopped: &watch::Receiver<()>,
    ) -> Infallible {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("dns: cannot accept a TCP connection: {e}");
                    tokio::time::sleep(ERROR_PAUSE).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.connections).try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let (server, relay) = (Arc::clone(self), Arc::clone(relay));
            spawn(stopped, async move {
                server.connection(stream, peer.ip(), &relay).await;
                drop(permit);
            });
        }
    }

    /// Answers the queries of one TCP connection in order (RFC 7766), until it closes, idles,
    /// or sends something that gets no answer.
    async fn connection(&self, mut stream: TcpStream, peer: IpAddr, relay: &Relay) {
        let idle = self.config.tcp_idle;
        // Answers are written whole, in one go.
        drop(stream.set_nodelay(true));
        loop {
            let Ok(Ok(len)) = timeout(idle, stream.read_u16()).await else {
                return;
            };
            let mut msg = vec![0; usize::from(len)];
            let Ok(Ok(_)) = timeout(idle, stream.read_exact(&mut msg)).await else {
                return;
            };
            let answer = match self.handle(&msg, peer, Transport::Tcp, relay.has_upstreams()) {
                Handled::Answer(answer) => answer,
                Handled::Forward(query) => self.relay_tcp(query, msg, relay).await,
                Handled::Drop => return,
            };
            let Some(framed) = framed(&answer) else {
                return;
            };
            let Ok(Ok(())) = timeout(idle, stream.write_all(&framed)).await else {
                return;
            };
        }
    }

    /// Relays a TCP query over TCP: the upstream's answer with the asker's id, or `SERVFAIL`.
    async fn relay_tcp(&self, query: Query, raw: Vec<u8>, relay: &Relay) -> Vec<u8> {
        let answer = match Arc::clone(&self.forwards).try_acquire_owned() {
            Ok(_permit) => relay.exchange_tcp(raw, &query.question).await,
            Err(_) => None,
        };
        match answer {
            Some(mut answer) => {
                wire::set_id(&mut answer, query.id);
                answer
            }
            None => wire::encode_response(&query, &Reply::error(Rcode::ServFail), wire::TCP_LIMIT),
        }
    }

    /// What to do with `msg` from `source`: drop what is not a query (too short for a header,
    /// or a response: never answer an answer); answer what cannot be relayed or is ours;
    /// relay the rest.
    fn handle(&self, msg: &[u8], source: IpAddr, transport: Transport, has_upstreams: bool) -> Handled {
        if msg.len() < wire::HEADER_LEN || wire::is_response(msg) {
            return Handled::Drop;
        }
        let header_only = |rcode| wire::error_response(msg, rcode).map_or(Handled::Drop, Handled::Answer);
        if wire::opcode(msg) != Some(wire::OPCODE_QUERY) {
            return header_only(Rcode::NotImp);
        }
        let Ok(query) = wire::parse_query(msg) else {
            return header_only(Rcode::FormErr);
        };
        let q = &query.question;
        let reply = if query.edns.is_some_and(|e| e.version > 0) {
            Reply::error(Rcode::BadVers)
        } else if matches!(q.qtype, wire::TYPE_AXFR | wire::TYPE_IXFR) {
            // No zone transfers, of ours or (over a one-answer relay) of others.
            Reply::error(Rcode::Refused)
        } else if let Some(reply) = self.zone.resolve(source, &q.name, q.qtype) {
            if matches!(q.qclass, wire::CLASS_IN | wire::CLASS_ANY) {
                reply
            } else {
                Reply::error(Rcode::Refused)
            }
        } else if has_upstreams {
            return Handled::Forward(query);
        } else {
            Reply::error(Rcode::Refused)
        };
        let limit = match transport {
            Transport::Udp => query.udp_limit(),
            Transport::Tcp => wire::TCP_LIMIT,
        };
        Handled::Answer(wire::encode_response(&query, &reply, limit))
    }
}

/// `msg` with its 2-byte length in front, `None` if it is too long for that.
fn framed(msg: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(msg.len()).ok()?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    Some(out)
}

/// Spawns `task`, ended when the server stops (`stopped`'s sender is dropped).
fn spawn(stopped: &watch::Receiver<()>, task: impl Future<Output = ()> + Send + 'static) {
    let mut stopped = stopped.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = task => {}
            _ = stopped.changed() => {}
        }
    });
}

/// A random message id, `None` if the system has no randomness to give.
fn random_id() -> Option<u16> {
    let [a, b, ..] = getrandom::u32().ok()?.to_ne_bytes();
    Some(u16::from_ne_bytes([a, b]))
}

/// Relaying to upstream resolvers.
#[derive(Debug)]
struct Relay {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
}

/// Whether `answer` answers the relayed query sent with `id` and `question`.
fn answers(answer: &[u8], id: u16, question: &Question) -> bool {
    wire::id(answer) == Some(id)
        && wire::is_response(answer)
        && wire::question(answer).is_ok_and(|q| q.same_as(question))
}

impl Relay {
    fn has_upstreams(&self) -> bool {
        !self.upstreams.is_empty()
    }

    /// Asks the upstreams in turn over UDP; the first answer, `None` if none answered in time.
    /// An answer longer than `limit` (what the asker takes over UDP) comes back cut short; its
    /// header and question are whole, which is all a truncated answer keeps.
    ///
    /// Each query has a socket of its own: a fresh random source port beside the random id
    /// (RFC 5452), and, connected, the kernel drops datagrams from anyone but the upstream.
    async fn exchange_udp(&self, query: &[u8], question: &Question, limit: usize) -> Option<Vec<u8>> {
        for &upstream in &self.upstreams {
            let id = random_id()?;
            let mut msg = query.to_vec();
            wire::set_id(&mut msg, id);
            let attempt = async {
                let unspecified: IpAddr = if upstream.is_ipv4() {
                    Ipv4Addr::UNSPECIFIED.into()
                } else {
                    Ipv6Addr::UNSPECIFIED.into()
                };
                let socket = UdpSocket::bind((unspecified, 0)).await.ok()?;
                socket.connect(upstream).await.ok()?;
                socket.send(&msg).await.ok()?;
                let mut buf = vec![0; limit.saturating_add(1)];
                loop {
                    // An error (the upstream's port is closed) moves on to the next one at once.
                    let len = socket.recv(&mut buf).await.ok()?;
                    let answer = buf.get(..len).unwrap_or_default();
                    if answers(answer, id, question) {
                        return Some(answer.to_vec());
                    }
                    // Late or forged: keep listening until the timeout.
                }
            };
            if let Ok(Some(answer)) = timeout(self.timeout, attempt).await {
                return Some(answer);
            }
        }
        None
    }

    /// Asks the upstreams in turn over TCP, one connection each; the first answer, `None` if
    /// none answered in time.
    async fn exchange_tcp(&self, mut query: Vec<u8>, question: &Question) -> Option<Vec<u8>> {
        for &upstream in &self.upstreams {
            // The connection is the query's own: any id will do, a fresh one costs nothing.
            let id = random_id().unwrap_or_default();
            wire::set_id(&mut query, id);
            let attempt = async {
                let mut stream = TcpStream::connect(upstream).await.ok()?;
                drop(stream.set_nodelay(true));
                stream.write_all(&framed(&query)?).await.ok()?;
                let len = stream.read_u16().await.ok()?;
                let mut answer = vec![0; usize::from(len)];
                stream.read_exact(&mut answer).await.ok()?;
                answers(&answer, id, question).then_some(answer)
            };
            if let Ok(Some(answer)) = timeout(self.timeout, attempt).await {
                return Some(answer);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use super::*;

    #[test]
    fn resolv_conf_nameservers_are_the_upstreams() {
        let text = "# generated\nsearch example.com\nnameserver 10.0.0.2\nnameserver   2001:db8::53 \
                    # v6\n nameserver fe80::1%eth0\nnameserver nonsense\nnameserver\nnameserver \
                    10.0.0.2\noptions ndots:2\n;nameserver 10.9.9.9\nnameserver 127.0.0.53";
        let want: Vec<SocketAddr> = ["10.0.0.2:53", "[2001:db8::53]:53", "127.0.0.53:53"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(resolv_conf_upstreams(text), want);
        assert!(resolv_conf_upstreams("").is_empty());
    }

    fn server() -> Server {
        let zone = Zone::new("ams");
        zone.set_app_org("web", Some("acme"));
        Server::new(Arc::new(zone), ServerConfig::default())
    }

    /// `web.internal` (or `name`) of `qtype`, id 0x0102, RD.
    fn query(name: &[u8], qtype: u16) -> Vec<u8> {
        let mut q = vec![1, 2, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(name);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    const WEB: &[u8] = b"\x03web\x08internal\x00";
    const OTHER: &[u8] = b"\x07example\x03com\x00";

    fn handle(msg: &[u8], has_upstreams: bool) -> Handled {
        server().handle(msg, "127.0.0.1".parse().unwrap(), Transport::Udp, has_upstreams)
    }

    fn rcode(handled: &Handled) -> u8 {
        match handled {
            Handled::Answer(a) => a[3] & 0xf,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_is_answered_relayed_or_dropped() {
        // Ours: NODATA for a known app without machines.
        let ours = handle(&query(WEB, wire::TYPE_AAAA), true);
        assert_eq!(rcode(&ours), 0);
        // Not ours: relayed, or refused without upstreams.
        assert!(matches!(
            handle(&query(OTHER, wire::TYPE_A), true),
            Handled::Forward(_)
        ));
        assert_eq!(rcode(&handle(&query(OTHER, wire::TYPE_A), false)), 5);
        // Too short, or a response: nothing.
        assert!(matches!(handle(&query(WEB, 28)[..11], true), Handled::Drop));
        let mut response = query(WEB, 28);
        response[2] |= 0x80;
        assert!(matches!(handle(&response, true), Handled::Drop));
        // Another opcode: NOTIMP; a broken question: FORMERR, header only.
        let mut notify = query(WEB, 28);
        notify[2] |= 4 << 3;
        assert_eq!(rcode(&handle(&notify, true)), 4);
        let formerr = handle(&query(b"\x03web\x08inter", 28)[..20], true);
        assert_eq!(rcode(&formerr), 1);
        let Handled::Answer(formerr) = formerr else {
            unreachable!()
        };
        assert_eq!(formerr.len(), wire::HEADER_LEN);
        assert_eq!(&formerr[..2], &[1, 2]);
        // Zone transfers and other classes of our names are refused.
        assert_eq!(rcode(&handle(&query(OTHER, wire::TYPE_AXFR), true)), 5);
        let mut chaos = query(WEB, 28);
        let last = chaos.len() - 1;
        chaos[last] = 3;
        assert_eq!(rcode(&handle(&chaos, true)), 5);
        // An EDNS version this server does not speak: BADVERS (16: 0 here, 1 in the OPT).
        let mut v1 = query(WEB, 28);
        v1[11] = 1;
        v1.extend_from_slice(&[0, 0, 41, 4, 0, 0, 1, 0, 0, 0, 0]);
        let Handled::Answer(badvers) = handle(&v1, true) else {
            panic!()
        };
        assert_eq!((badvers[3] & 0xf, badvers[badvers.len() - 6]), (0, 1));
    }

    #[test]
    fn frames_carry_their_length() {
        assert_eq!(framed(b"abc").unwrap(), [0, 3, b'a', b'b', b'c']);
        assert!(framed(&vec![0; 65_536]).is_none());
    }
}
