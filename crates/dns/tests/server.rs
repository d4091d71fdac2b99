//! The server on loopback ports, asked by the real `dig` (an independent implementation of the
//! protocol) and by raw sockets: `.internal` answers over UDP and TCP, TXT strings, NXDOMAIN with
//! the SOA, truncation over UDP and the whole answer over TCP, relaying to a fake upstream (over
//! UDP and TCP, ignoring spoofed answers and itself as an upstream), SERVFAIL when upstreams are
//! silent, malformed input that gets FORMERR or nothing without hurting the next query, and TCP
//! connections' framing, order, idle timeout and cap. Without `dig` the tests fail: run
//! scripts/setup.sh.

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::collections::BTreeSet;
    use std::io::{ErrorKind, Read, Write};
    use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
    use std::process::Command;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use aloft_api::{CatalogEntry, MachineState};
    use aloft_dns::wire::{self, Name, RData, Rcode, Reply};
    use aloft_dns::{Server, ServerConfig, Zone};
    use tokio::runtime::Runtime;

    /// A server on 127.0.0.1 (the same port for UDP and TCP), served by its own runtime.
    struct Harness {
        addr: SocketAddr,
        /// Serves until dropped, with the test.
        _runtime: Runtime,
    }

    /// A UDP socket and a TCP listener on the same free loopback port.
    fn bind_pair() -> (UdpSocket, std::net::TcpListener) {
        for _ in 0..50 {
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            if let Ok(tcp) = std::net::TcpListener::bind(udp.local_addr().unwrap()) {
                return (udp, tcp);
            }
        }
        panic!("no free loopback port for both UDP and TCP");
    }

    fn runtime() -> Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    impl Harness {
        /// Serves `zone`; `config` is given the server's own address, to name upstreams.
        fn start(zone: Zone, config: impl FnOnce(SocketAddr) -> ServerConfig) -> Self {
            Self::start_on(runtime(), zone, config)
        }

        fn start_on(runtime: Runtime, zone: Zone, config: impl FnOnce(SocketAddr) -> ServerConfig) -> Self {
            let (udp, tcp) = bind_pair();
            let addr = udp.local_addr().unwrap();
            let server = Arc::new(Server::new(Arc::new(zone), config(addr)));
            runtime.spawn(async move { server.serve(udp, tcp).await.unwrap() });
            Self {
                addr,
                _runtime: runtime,
            }
        }

        fn dig(&self, args: &[&str]) -> Dig {
            dig(self.addr.port(), args)
        }
    }

    /// What `dig` printed.
    #[derive(Debug)]
    struct Dig {
        status: String,
        flags: Vec<String>,
        answers: Vec<Rr>,
        authority: Vec<Rr>,
        output: String,
    }

    /// A record as `dig` prints it.
    #[derive(Debug)]
    struct Rr {
        name: String,
        ttl: u32,
        rtype: String,
        data: String,
    }

    impl Dig {
        fn has_flag(&self, flag: &str) -> bool {
            self.flags.iter().any(|f| f == flag)
        }

        /// The data of the answers of `rtype`, sorted.
        fn data(&self, rtype: &str) -> Vec<String> {
            let mut data: Vec<String> = self
                .answers
                .iter()
                .filter(|r| r.rtype == rtype)
                .map(|r| r.data.clone())
                .collect();
            data.sort();
            data
        }
    }

    /// Runs `dig @127.0.0.1 -p port +tries=1 +time=2 args…`; fails if it got no answer.
    fn dig(port: u16, args: &[&str]) -> Dig {
        let out = Command::new("dig")
            .args(["@127.0.0.1", "-p", &port.to_string(), "+tries=1", "+time=2"])
            .args(args)
            .output();
        let out = match out {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                panic!("`dig` is not installed: run scripts/setup.sh (it installs bind9-dnsutils)")
            }
            r => r.unwrap(),
        };
        let output = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "dig {args:?} failed: {output}");
        parse_dig(output)
    }

    fn parse_dig(output: String) -> Dig {
        let mut status = String::new();
        let mut flags = Vec::new();
        let (mut answers, mut authority) = (Vec::new(), Vec::new());
        let mut section: Option<&mut Vec<Rr>> = None;
        for line in output.lines() {
            if let Some((_, rest)) = line.split_once("status: ") {
                status = rest.split(',').next().unwrap().to_owned();
            } else if let Some(rest) = line.strip_prefix(";; flags: ") {
                flags = rest
                    .split(';')
                    .next()
                    .unwrap()
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
            } else if line == ";; ANSWER SECTION:" {
                section = Some(&mut answers);
            } else if line == ";; AUTHORITY SECTION:" {
                section = Some(&mut authority);
            } else if line.is_empty() || line.starts_with(';') {
                section = None;
            } else if let Some(records) = section.as_mut() {
                // Name, TTL, class and type, then the data (which may hold blanks).
                let mut rest = line;
                let mut fields = Vec::new();
                for _ in 0..4 {
                    let field = rest.trim_start();
                    let end = field.find(char::is_whitespace).unwrap_or(field.len());
                    fields.push(&field[..end]);
                    rest = &field[end..];
                }
                let [name, ttl, _class, rtype] = fields[..] else {
                    unreachable!()
                };
                let data = rest.trim();
                records.push(Rr {
                    name: name.to_owned(),
                    ttl: ttl.parse().unwrap(),
                    rtype: rtype.to_owned(),
                    data: data.to_owned(),
                });
            }
        }
        assert!(!status.is_empty(), "no header in dig's output: {output}");
        Dig {
            status,
            flags,
            answers,
            authority,
            output,
        }
    }

    /// The character-strings of a TXT record as `dig` prints them (`"a" "b"`).
    fn strings(data: &str) -> Vec<String> {
        data.split('"').skip(1).step_by(2).map(str::to_owned).collect()
    }

    fn id(n: usize) -> String {
        format!("{n:08x}abcdef")
    }

    fn ip(n: usize) -> String {
        format!("fdaa:0:5:a7b:7d:{n:x}:0:2")
    }

    fn machine(app: &str, n: usize, region: &str, state: MachineState) -> CatalogEntry {
        CatalogEntry {
            id: id(n).parse().unwrap(),
            app: app.to_owned(),
            host: "h1".to_owned(),
            region: region.to_owned(),
            state,
            version: "v1".to_owned(),
            private_ip: ip(n),
            services: Vec::new(),
            checks: Vec::new(),
            suspendable: false,
            process_group: "app".to_owned(),
            primary_region: String::new(),
            updated_at: 0,
        }
    }

    /// `web`: machines 1–3 started (ams, ams, fra), 4 stopped; `big`: 60 started in ams.
    fn zone() -> Zone {
        let zone = Zone::new("ams");
        zone.set_org_network("acme", Some(5));
        zone.set_app_org("web", Some("acme"));
        zone.set_app_org("big", Some("acme"));
        for (n, region) in [(1, "ams"), (2, "ams"), (3, "fra")] {
            zone.upsert_machine(machine("web", n, region, MachineState::Started));
        }
        zone.upsert_machine(machine("web", 4, "iad", MachineState::Stopped));
        for n in 100..160 {
            zone.upsert_machine(machine("big", n, "ams", MachineState::Started));
        }
        zone
    }

    fn plain() -> impl FnOnce(SocketAddr) -> ServerConfig {
        |_| ServerConfig::default()
    }

    fn canonical(ips: impl IntoIterator<Item = String>) -> Vec<String> {
        let mut ips: Vec<String> = ips
            .into_iter()
            .map(|i| i.parse::<std::net::Ipv6Addr>().unwrap().to_string())
            .collect();
        ips.sort();
        ips
    }

    #[test]
    fn aaaa_over_udp_and_tcp() {
        let h = Harness::start(zone(), plain());
        for transport in ["+notcp", "+tcp"] {
            let d = h.dig(&["WEB.Internal", "AAAA", transport]);
            assert_eq!(d.status, "NOERROR", "{}", d.output);
            for flag in ["qr", "aa", "rd", "ra"] {
                assert!(d.has_flag(flag), "{flag}: {}", d.output);
            }
            assert!(!d.has_flag("tc"));
            assert_eq!(d.data("AAAA"), canonical((1..=3).map(ip)));
            for rr in &d.answers {
                // The owner is the question as asked (compressed against it), TTL 5.
                assert_eq!((rr.name.as_str(), rr.ttl), ("WEB.Internal.", 5));
            }
        }
        let d = h.dig(&["fra.web.internal", "AAAA"]);
        assert_eq!(d.data("AAAA"), canonical([ip(3)]));
        let d = h.dig(&[&format!("{}.vm.web.internal", id(2)), "AAAA"]);
        assert_eq!(d.data("AAAA"), canonical([ip(2)]));
    }

    #[test]
    fn txt_lists_in_character_strings() {
        let h = Harness::start(zone(), plain());
        let d = h.dig(&["vms.web.internal", "TXT"]);
        let want = format!("{} ams,{} ams,{} fra", id(1), id(2), id(3));
        assert_eq!(d.data("TXT"), [format!("\"{want}\"")]);
        let d = h.dig(&["all.regions.web.internal", "TXT"]);
        assert_eq!(d.data("TXT"), ["\"ams,fra,iad\""]);
        // 60 machines: 1139 bytes in 255-byte strings of one record.
        let d = h.dig(&["vms.big.internal", "TXT", "+tcp"]);
        let [txt] = d.data("TXT").try_into().unwrap();
        let parts = strings(&txt);
        assert_eq!(parts.len(), 5, "{txt}");
        assert!(parts.iter().all(|p| p.len() <= 255));
        let want: Vec<String> = (100..160).map(|n| format!("{} ams", id(n))).collect();
        assert_eq!(parts.concat(), want.join(","));
    }

    #[test]
    fn names_that_do_not_exist_get_nxdomain_and_the_soa() {
        let h = Harness::start(zone(), plain());
        for name in ["nope.internal", "web.flycast", "x._peer.internal"] {
            let d = h.dig(&[name, "AAAA"]);
            assert_eq!(d.status, "NXDOMAIN", "{}", d.output);
            assert!(d.has_flag("aa"));
            assert!(d.answers.is_empty());
            let [soa] = &d.authority[..] else {
                panic!("{}", d.output)
            };
            assert_eq!(soa.rtype, "SOA");
            assert!(soa.data.ends_with(" 5"), "minimum 5: {}", soa.data);
        }
        // A name that exists without the type: NOERROR, no answers, the SOA.
        let d = h.dig(&["web.internal", "TXT"]);
        assert_eq!(
            (d.status.as_str(), d.answers.len(), d.authority.len()),
            ("NOERROR", 0, 1)
        );
    }

    #[test]
    fn big_answers_are_truncated_over_udp_and_whole_over_tcp() {
        let h = Harness::start(zone(), plain());
        let all = canonical((100..160).map(ip));
        let d = h.dig(&["big.internal", "AAAA", "+ignore", "+notcp"]);
        assert!(d.has_flag("tc"), "{}", d.output);
        assert!(d.answers.is_empty(), "{}", d.output);
        // Without EDNS the limit is 512 bytes: still truncated.
        let d = h.dig(&["big.internal", "AAAA", "+ignore", "+notcp", "+noedns"]);
        assert!(d.has_flag("tc"), "{}", d.output);
        let d = h.dig(&["big.internal", "AAAA", "+tcp"]);
        assert!(!d.has_flag("tc"));
        assert_eq!(d.data("AAAA"), all);
        // dig on its own retries a truncated answer over TCP.
        assert_eq!(h.dig(&["big.internal", "AAAA"]).data("AAAA"), all);
    }

    /// How a fake upstream answers.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Upstream {
        /// `A 192.0.2.7` to everything.
        Answers,
        /// First answers that must be ignored (another id, another question, another
        /// address), then `A 192.0.2.7`.
        Tricky,
    }

    const GOOD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
    const BAD: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 66);

    /// `query` answered with an A record, by this crate's codec.
    fn a_answer(query: &[u8], ip: Ipv4Addr) -> Vec<u8> {
        let q = wire::parse_query(query).unwrap();
        let reply = Reply {
            rcode: Rcode::NoError,
            authoritative: false,
            answers: vec![RData::A(ip)],
            soa: None,
            ttl: 60,
        };
        wire::encode_response(&q, &reply, wire::TCP_LIMIT)
    }

    /// A fake upstream on a free loopback port (UDP and TCP) on `runtime`.
    fn fake_upstream(runtime: &Runtime, mode: Upstream) -> SocketAddr {
        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().unwrap();
        udp.set_nonblocking(true).unwrap();
        tcp.set_nonblocking(true).unwrap();
        runtime.spawn(async move {
            let udp = tokio::net::UdpSocket::from_std(udp).unwrap();
            let elsewhere = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut buf = vec![0; 65_535];
            loop {
                let (len, from) = udp.recv_from(&mut buf).await.unwrap();
                let query = &buf[..len];
                if mode == Upstream::Tricky {
                    let mut wrong_id = a_answer(query, BAD);
                    wire::set_id(&mut wrong_id, wire::id(query).unwrap().wrapping_add(1));
                    udp.send_to(&wrong_id, from).await.unwrap();
                    let mut other = wire::parse_query(query).unwrap();
                    other.question.name = Name::from_text("evil.example").unwrap();
                    let reply = Reply {
                        rcode: Rcode::NoError,
                        authoritative: false,
                        answers: vec![RData::A(BAD)],
                        soa: None,
                        ttl: 60,
                    };
                    let other_question = wire::encode_response(&other, &reply, 512);
                    udp.send_to(&other_question, from).await.unwrap();
                    elsewhere.send_to(&a_answer(query, BAD), from).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                udp.send_to(&a_answer(query, GOOD), from).await.unwrap();
            }
        });
        runtime.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
            loop {
                let (mut stream, _) = tcp.accept().await.unwrap();
                let len = stream.read_u16().await.unwrap();
                let mut query = vec![0; usize::from(len)];
                stream.read_exact(&mut query).await.unwrap();
                let answer = a_answer(&query, GOOD);
                stream
                    .write_u16(u16::try_from(answer.len()).unwrap())
                    .await
                    .unwrap();
                stream.write_all(&answer).await.unwrap();
            }
        });
        addr
    }

    #[test]
    fn other_names_are_relayed_to_the_upstream() {
        let runtime = runtime();
        let good = fake_upstream(&runtime, Upstream::Answers);
        // The server's own address first: it must be skipped, not asked (a loop).
        let h = Harness::start_on(runtime, zone(), move |own| ServerConfig {
            upstreams: vec![own, good],
            upstream_timeout: Duration::from_secs(1),
            ..ServerConfig::default()
        });
        for transport in ["+notcp", "+tcp"] {
            let started = Instant::now();
            let d = h.dig(&["Example.COM", "A", transport]);
            assert_eq!(d.status, "NOERROR", "{}", d.output);
            assert_eq!(d.data("A"), [GOOD.to_string()], "{}", d.output);
            assert_eq!(
                (d.answers[0].name.as_str(), d.answers[0].ttl),
                ("Example.COM.", 60)
            );
            // Passed through: the upstream's flags, not ours.
            assert!(!d.has_flag("aa"));
            assert!(
                started.elapsed() < Duration::from_millis(900),
                "{:?}",
                started.elapsed()
            );
        }
        // .internal and .flycast names never go upstream.
        assert_eq!(h.dig(&["nope.flycast", "A"]).status, "NXDOMAIN");
    }

    #[test]
    fn spoofed_and_stray_upstream_answers_are_ignored() {
        let runtime = runtime();
        let tricky = fake_upstream(&runtime, Upstream::Tricky);
        let h = Harness::start_on(runtime, zone(), move |_| ServerConfig {
            upstreams: vec![tricky],
            ..ServerConfig::default()
        });
        let d = h.dig(&["example.com", "A", "+notcp"]);
        assert_eq!(d.data("A"), [GOOD.to_string()], "{}", d.output);
    }

    #[test]
    fn silent_upstreams_get_servfail_within_their_timeouts() {
        let silent1 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let silent2 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let upstreams = vec![silent1.local_addr().unwrap(), silent2.local_addr().unwrap()];
        let h = Harness::start(zone(), move |_| ServerConfig {
            upstreams,
            upstream_timeout: Duration::from_millis(400),
            ..ServerConfig::default()
        });
        let started = Instant::now();
        let d = h.dig(&["example.com", "A", "+time=5"]);
        let took = started.elapsed();
        assert_eq!(d.status, "SERVFAIL", "{}", d.output);
        // Both were tried, one after the other.
        assert!(took >= Duration::from_millis(750), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        // Both upstreams did get the query.
        let mut buf = [0; 512];
        for s in [&silent1, &silent2] {
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let len = s.recv(&mut buf).unwrap();
            assert!(
                wire::question(&buf[..len])
                    .unwrap()
                    .name
                    .eq_ignore_case(&Name::from_text("example.com").unwrap())
            );
        }
        // Without upstreams, other names are refused.
        let h = Harness::start(zone(), plain());
        assert_eq!(h.dig(&["example.com", "A"]).status, "REFUSED");
    }

    /// Relayed queries in flight are bounded: with the one permitted waiting on a silent
    /// upstream, the next gets SERVFAIL at once instead of queueing; once the first has timed
    /// out, relaying works again.
    #[test]
    fn relayed_queries_in_flight_are_bounded() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let upstream = silent.local_addr().unwrap();
        let h = Harness::start(zone(), move |_| ServerConfig {
            upstreams: vec![upstream],
            upstream_timeout: Duration::from_secs(2),
            max_forwarded: 1,
            ..ServerConfig::default()
        });
        let port = h.addr.port();
        let first = std::thread::spawn(move || dig(port, &["first.example", "A", "+time=5"]));
        // The first is with the upstream once the upstream has it.
        let mut buf = [0; 512];
        silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        silent.recv(&mut buf).unwrap();
        let started = Instant::now();
        let second = h.dig(&["second.example", "A", "+time=5"]);
        assert_eq!(second.status, "SERVFAIL", "{}", second.output);
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "the second waited {:?}",
            started.elapsed()
        );
        assert_eq!(first.join().unwrap().status, "SERVFAIL");
        // The permit is back: the next query is relayed (the upstream gets it).
        let third = std::thread::spawn(move || dig(port, &["third.example", "A", "+time=5"]));
        let len = silent.recv(&mut buf).unwrap();
        assert!(
            wire::question(&buf[..len])
                .unwrap()
                .name
                .eq_ignore_case(&Name::from_text("third.example").unwrap())
        );
        assert_eq!(third.join().unwrap().status, "SERVFAIL");
    }

    /// Sends `msg` over UDP; the answer, `None` if none came within half a second.
    fn exchange(server: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        socket.send_to(msg, server).unwrap();
        let mut buf = vec![0; 65_535];
        match socket.recv(&mut buf) {
            Ok(len) => Some(buf[..len].to_vec()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
            Err(e) => panic!("{e}"),
        }
    }

    fn header(id: u16, flags: u16, qdcount: u16) -> Vec<u8> {
        let mut h = Vec::new();
        for word in [id, flags, qdcount, 0, 0, 0] {
            h.extend_from_slice(&word.to_be_bytes());
        }
        h
    }

    #[test]
    fn malformed_datagrams_get_formerr_or_nothing() {
        let h = Harness::start(zone(), plain());
        let formerr = |msg: &[u8], id: u16| {
            let answer = exchange(h.addr, msg).unwrap_or_else(|| panic!("no answer to {msg:?}"));
            assert_eq!(
                answer,
                [&id.to_be_bytes()[..], &[0x81, 0x81, 0, 0, 0, 0, 0, 0, 0, 0]].concat()
            );
        };
        // A compression loop, a pointer forward, a name running off the end, no question,
        // two questions.
        formerr(
            &[header(0x4201, 0x0100, 1), b"\xc0\x0c\x00\x01\x00\x01".to_vec()].concat(),
            0x4201,
        );
        formerr(
            &[
                header(0x4202, 0x0100, 1),
                b"\x01a\xc0\x20\x00\x01\x00\x01".to_vec(),
            ]
            .concat(),
            0x4202,
        );
        formerr(&[header(0x4203, 0x0100, 1), b"\x05ab".to_vec()].concat(), 0x4203);
        formerr(&header(0x4204, 0x0100, 0), 0x4204);
        let mut two = [header(0x4205, 0x0100, 2), b"\x01a\x00\x00\x01\x00\x01".to_vec()].concat();
        two.extend_from_slice(b"\x01b\x00\x00\x01\x00\x01");
        formerr(&two, 0x4205);
        // Shorter than a header, and answers (QR set): nothing at all.
        assert_eq!(exchange(h.addr, &[0x42, 0x06, 1, 0, 0]), None);
        let answer = [
            header(0x4207, 0x8180, 1),
            b"\x03web\x08internal\x00\x00\x1c\x00\x01".to_vec(),
        ]
        .concat();
        assert_eq!(exchange(h.addr, &answer), None);
        // Garbage of every length: FORMERR (or NOTIMP, or even an answer if it happens to
        // parse) to each datagram that has a header and is not a response, nothing to others.
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut queries = BTreeSet::new();
        for len in 0..200 {
            let mut garbage: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed.to_be_bytes()[0]
                })
                .collect();
            // Unique ids, to tell the answers apart.
            wire::set_id(&mut garbage, len);
            if garbage.len() >= wire::HEADER_LEN && !wire::is_response(&garbage) {
                queries.insert(len);
            }
            socket.send_to(&garbage, h.addr).unwrap();
        }
        let mut answered = BTreeSet::new();
        let mut buf = [0; 2048];
        while let Ok(len) = socket.recv(&mut buf) {
            let answer = &buf[..len];
            assert!(wire::is_response(answer));
            answered.insert(wire::id(answer).unwrap());
        }
        assert_eq!(answered, queries);
        // A real update (opcode 5): NOTIMP.
        let update = [
            header(0x4208, 0x2800, 1),
            b"\x03web\x08internal\x00\x00\x06\x00\x01".to_vec(),
        ]
        .concat();
        let answer = exchange(h.addr, &update).unwrap();
        assert_eq!((&answer[..2], answer[3] & 0xf), (&[0x42, 0x08][..], 4));
        // The server still answers.
        assert_eq!(h.dig(&["web.internal", "AAAA"]).data("AAAA").len(), 3);
        assert_eq!(h.dig(&["web.internal", "AAAA", "+tcp"]).data("AAAA").len(), 3);
    }

    fn tcp_query(stream: &mut TcpStream, id: u16, name: &str) {
        let mut q = header(id, 0x0100, 1);
        q.extend_from_slice(Name::from_text(name).unwrap().as_wire());
        q.extend_from_slice(&[0, 28, 0, 1]);
        stream
            .write_all(&u16::try_from(q.len()).unwrap().to_be_bytes())
            .unwrap();
        stream.write_all(&q).unwrap();
    }

    fn tcp_answer(stream: &mut TcpStream) -> Vec<u8> {
        let mut len = [0; 2];
        stream.read_exact(&mut len).unwrap();
        let mut answer = vec![0; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut answer).unwrap();
        answer
    }

    /// Whether the server closed `stream` (within 3 seconds).
    fn closed(stream: &mut TcpStream) -> bool {
        stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0; 16];
        match stream.read(&mut buf) {
            Ok(0) => true,
            Err(e) => e.kind() == ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    #[test]
    fn tcp_connections_take_several_queries_in_order() {
        let h = Harness::start(zone(), plain());
        let mut stream = TcpStream::connect(h.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        // Sent back to back, answered in order.
        tcp_query(&mut stream, 1, "big.internal");
        tcp_query(&mut stream, 2, "nope.internal");
        tcp_query(&mut stream, 3, "web.internal");
        let answers: Vec<Vec<u8>> = (0..3).map(|_| tcp_answer(&mut stream)).collect();
        assert_eq!(wire::id(&answers[0]), Some(1));
        assert_eq!(&answers[0][6..8], &60_u16.to_be_bytes());
        assert_eq!((wire::id(&answers[1]), answers[1][3] & 0xf), (Some(2), 3));
        assert_eq!(wire::id(&answers[2]), Some(3));
        // A message too short to be a query ends the connection.
        stream.write_all(&[0, 3, 1, 2, 3]).unwrap();
        assert!(closed(&mut stream));
    }

    #[test]
    fn idle_and_excess_tcp_connections_are_closed() {
        let h = Harness::start(zone(), |_| ServerConfig {
            max_tcp_connections: 1,
            tcp_idle: Duration::from_millis(1000),
            ..ServerConfig::default()
        });
        let mut first = TcpStream::connect(h.addr).unwrap();
        tcp_query(&mut first, 1, "web.internal");
        first.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        assert_eq!(wire::id(&tcp_answer(&mut first)), Some(1));
        // While it is open, another connection is closed at once.
        let mut second = TcpStream::connect(h.addr).unwrap();
        assert!(closed(&mut second));
        // The first one, idle, is closed too; then there is room again.
        let started = Instant::now();
        assert!(closed(&mut first));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
        let mut third = TcpStream::connect(h.addr).unwrap();
        third.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        tcp_query(&mut third, 3, "web.internal");
        assert_eq!(wire::id(&tcp_answer(&mut third)), Some(3));
    }

    #[test]
    fn stopped_machines_are_listed_but_never_addresses() {
        let h = Harness::start(zone(), plain());
        let d = h.dig(&["iad.web.internal", "AAAA"]);
        assert_eq!(
            (d.status.as_str(), d.answers.len()),
            ("NOERROR", 0),
            "{}",
            d.output
        );
        let d = h.dig(&["all.vms.web.internal", "TXT"]);
        let [txt] = d.data("TXT").try_into().unwrap();
        assert!(txt.contains(&format!("{} iad", id(4))), "{txt}");
    }
}
