//! PROXY protocol headers (v1 text, v2 binary) for the `proxy_proto` handler.
//!
//! A service port with `handlers = ["proxy_proto"]` gets, before the client's first byte, a
//! header telling the app who the client is (haproxy's `proxy-protocol.txt`). Fly sends v1 unless
//! the handler says `version = "v2"`; so does aloft ([`Version`]).
//!
//! Addresses are canonicalised first: an IPv4-mapped IPv6 address (`::ffff:1.2.3.4`, what a
//! dual-stack listener reports for an IPv4 client) counts as IPv4. When both ends are then IPv4
//! the header is `TCP4` (v2: family `0x11`); otherwise both are written as IPv6, an IPv4 end as its
//! IPv4-mapped form, since one header carries a single address family (`TCP6`, v2: `0x21`).
//!
//! Pure functions: no I/O; the caller writes the bytes to the machine connection.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// The 12-byte signature every v2 header starts with.
pub(crate) const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// v2 version (high nibble 2) and command (low nibble 1: PROXY, a relayed connection).
const V2_VERSION_PROXY: u8 = 0x21;
/// v2 family and transport: TCP over IPv4.
const V2_TCP4: u8 = 0x11;
/// v2 family and transport: TCP over IPv6.
const V2_TCP6: u8 = 0x21;

/// Which PROXY protocol version a `proxy_proto` handler sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Version {
    /// The human-readable text header (`PROXY TCP4 … \r\n`), Fly's default.
    #[default]
    V1,
    /// The binary header.
    V2,
}

/// A `proxy_proto` handler's `version` that aloft does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown PROXY protocol version {0:?} in the proxy_proto handler's options: use \"v1\" or \"v2\"")]
pub(crate) struct UnknownVersion(pub(crate) String);

impl FromStr for Version {
    type Err = UnknownVersion;

    /// `"v1"` or `"v2"`, ignoring ASCII case and surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("v1") {
            Ok(Self::V1)
        } else if t.eq_ignore_ascii_case("v2") {
            Ok(Self::V2)
        } else {
            Err(UnknownVersion(s.to_owned()))
        }
    }
}

impl Version {
    /// The version a handler's options ask for: [`Version::V1`] when they name none.
    pub(crate) fn from_config(version: Option<&str>) -> Result<Self, UnknownVersion> {
        version.map_or(Ok(Self::V1), str::parse)
    }

    /// The header of this version for a connection from `src` (the client) to `dst` (the edge
    /// address the client connected to).
    pub(crate) fn header(self, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        match self {
            Self::V1 => v1(src, dst),
            Self::V2 => v2(src, dst),
        }
    }
}

/// The two addresses of one header, in one family.
enum Pair {
    V4([u8; 4], [u8; 4]),
    V6(Ipv6Addr, Ipv6Addr),
}

/// Canonicalises both addresses and puts them in one family (see the module doc).
fn pair(src: IpAddr, dst: IpAddr) -> Pair {
    let as_v6 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    match (src.to_canonical(), dst.to_canonical()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Pair::V4(s.octets(), d.octets()),
        (s, d) => Pair::V6(as_v6(s), as_v6(d)),
    }
}

/// The v1 (text) header: `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`, or `TCP6` with IPv6
/// addresses in their usual compressed text form.
pub(crate) fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (sp, dp) = (src.port(), dst.port());
    let line = match pair(src.ip(), dst.ip()) {
        Pair::V4(s, d) => format!(
            "PROXY TCP4 {} {} {sp} {dp}\r\n",
            std::net::Ipv4Addr::from(s),
            std::net::Ipv4Addr::from(d)
        ),
        Pair::V6(s, d) => format!("PROXY TCP6 {s} {d} {sp} {dp}\r\n"),
    };
    line.into_bytes()
}

/// The v2 (binary) header: signature, `0x21` (v2, PROXY), family (`0x11` TCP/IPv4, `0x21`
/// TCP/IPv6), the address block's length (big endian: 12 or 36), source address, destination
/// address, source port, destination port.
pub(crate) fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (family, addrs): (u8, Vec<u8>) = match pair(src.ip(), dst.ip()) {
        Pair::V4(s, d) => (V2_TCP4, [s, d].concat()),
        Pair::V6(s, d) => (V2_TCP6, [s.octets(), d.octets()].concat()),
    };
    // At most 32 address bytes + 4 port bytes: always fits a u16.
    let len = u16::try_from(addrs.len() + 4).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(16 + usize::from(len));
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(V2_VERSION_PROXY);
    out.push(family);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&addrs);
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_is_the_specs_example_line() {
        // proxy-protocol.txt section 2.1's example.
        assert_eq!(
            v1(sa("192.168.0.1:56324"), sa("192.168.0.11:443")),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_vec()
        );
    }

    #[test]
    fn v1_tcp6() {
        assert_eq!(
            v1(sa("[2001:db8::1]:40000"), sa("[fdaa:0:1::3]:8080")),
            b"PROXY TCP6 2001:db8::1 fdaa:0:1::3 40000 8080\r\n".to_vec()
        );
    }

    #[test]
    fn v1_mixed_families_become_tcp6_with_the_ipv4_end_mapped() {
        assert_eq!(
            v1(sa("10.0.0.7:1234"), sa("[2001:db8::2]:443")),
            b"PROXY TCP6 ::ffff:10.0.0.7 2001:db8::2 1234 443\r\n".to_vec()
        );
        assert_eq!(
            v1(sa("[2001:db8::2]:443"), sa("10.0.0.7:1234")),
            b"PROXY TCP6 2001:db8::2 ::ffff:10.0.0.7 443 1234\r\n".to_vec()
        );
    }

    #[test]
    fn v1_ipv4_mapped_on_both_ends_is_tcp4() {
        // What a dual-stack [::] listener reports for an IPv4 client.
        assert_eq!(
            v1(sa("[::ffff:203.0.113.9]:5000"), sa("203.0.113.1:80")),
            b"PROXY TCP4 203.0.113.9 203.0.113.1 5000 80\r\n".to_vec()
        );
    }

    #[test]
    fn v1_stays_within_the_specs_107_bytes() {
        let longest = v1(
            sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535"),
            sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535"),
        );
        assert_eq!(longest.len(), 104);
        assert!(longest.len() <= 107);
    }

    #[test]
    fn v2_tcp4_bytes() {
        let expected: Vec<u8> = vec![
            // signature
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
            // version 2, command PROXY
            0x21, //
            // AF_INET, STREAM
            0x11, //
            // length 12
            0x00, 0x0C, //
            // src 192.168.0.1, dst 192.168.0.11
            192, 168, 0, 1, 192, 168, 0, 11, //
            // src port 56324 = 0xDC04, dst port 443 = 0x01BB
            0xDC, 0x04, 0x01, 0xBB,
        ];
        assert_eq!(v2(sa("192.168.0.1:56324"), sa("192.168.0.11:443")), expected);
    }

    #[test]
    fn v2_tcp6_bytes() {
        let expected: Vec<u8> = vec![
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, //
            0x21, //
            // AF_INET6, STREAM
            0x21, //
            // length 36
            0x00, 0x24, //
            // src 2001:db8::1
            0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, //
            // dst fdaa:0:1::3
            0xFD, 0xAA, 0x00, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x03, //
            // ports 40000 = 0x9C40, 8080 = 0x1F90
            0x9C, 0x40, 0x1F, 0x90,
        ];
        assert_eq!(v2(sa("[2001:db8::1]:40000"), sa("[fdaa:0:1::3]:8080")), expected);
    }

    #[test]
    fn v2_mixed_families_map_the_ipv4_end() {
        let h = v2(sa("10.0.0.7:1234"), sa("[2001:db8::2]:443"));
        assert_eq!(h[13], 0x21);
        assert_eq!(&h[14..16], &[0x00, 0x24]);
        assert_eq!(
            &h[16..32],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 10, 0, 0, 7]
        );
        assert_eq!(&h[48..52], &[0x04, 0xD2, 0x01, 0xBB]);
        assert_eq!(h.len(), 16 + 36);
    }

    #[test]
    fn v2_ipv4_mapped_on_both_ends_is_tcp4() {
        let h = v2(sa("[::ffff:203.0.113.9]:5000"), sa("[::ffff:203.0.113.1]:80"));
        assert_eq!(h[13], 0x11);
        assert_eq!(&h[16..24], &[203, 0, 113, 9, 203, 0, 113, 1]);
        assert_eq!(h.len(), 16 + 12);
    }

    #[test]
    fn versions_parse_from_config() {
        assert_eq!(Version::from_config(None).unwrap(), Version::V1);
        assert_eq!(Version::default(), Version::V1);
        assert_eq!(Version::from_config(Some("v1")).unwrap(), Version::V1);
        assert_eq!(Version::from_config(Some("v2")).unwrap(), Version::V2);
        assert_eq!(" V2 ".parse::<Version>().unwrap(), Version::V2);
        for bad in ["", "v3", "2", "version2"] {
            let err = bad.parse::<Version>().unwrap_err();
            assert_eq!(err, UnknownVersion(bad.to_owned()));
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn header_dispatches_on_the_version() {
        let (s, d) = (sa("192.168.0.1:56324"), sa("192.168.0.11:443"));
        assert_eq!(Version::V1.header(s, d), v1(s, d));
        assert_eq!(Version::V2.header(s, d), v2(s, d));
        assert!(Version::V2.header(s, d).starts_with(&V2_SIGNATURE));
    }
}
