//! Pure rtnetlink message encoding and reply parsing: bytes in, bytes out, no syscalls.
//!
//! Layouts follow `linux/netlink.h`, `linux/rtnetlink.h`, `linux/if_link.h` and `linux/if_addr.h`;
//! everything is in native byte order except addresses, which are in network order.

use std::net::IpAddr;

/// `sizeof(struct nlmsghdr)`.
pub(crate) const NLMSG_HDRLEN: usize = 16;

pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;

pub(crate) const RTM_NEWLINK: u16 = 16;
pub(crate) const RTM_DELLINK: u16 = 17;
pub(crate) const RTM_GETLINK: u16 = 18;
pub(crate) const RTM_NEWADDR: u16 = 20;
pub(crate) const RTM_NEWROUTE: u16 = 24;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_ROOT | NLM_F_MATCH`: return every object.
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
/// Flag for attributes that contain attributes.
const NLA_F_NESTED: u16 = 0x8000;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
/// `IFA_F_NODAD`: skip duplicate address detection so an IPv6 address is usable at once.
pub const IFA_F_NODAD: u32 = 0x02;

const RTA_DST: u16 = 1;
const RTA_GATEWAY: u16 = 5;
const RTA_OIF: u16 = 4;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;

const IFF_UP: u32 = 0x1;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Longest interface name, without the NUL (`IFNAMSIZ - 1`).
pub const MAX_IFNAME_LEN: usize = 15;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A request being built: header first, then the family header, then attributes.
#[derive(Debug)]
struct Builder {
    buf: Vec<u8>,
}

impl Builder {
    fn new(ty: u16, flags: u16, seq: u32) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched in finish
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel
        Self { buf }
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    fn attr(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        // rta_len counts header + payload (unpadded); the next attribute starts 4-aligned.
        let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// An attribute holding the attributes `inner` adds (`NLA_F_NESTED`).
    fn nested(&mut self, ty: u16, inner: impl FnOnce(&mut Self)) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        inner(self);
        let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.buf[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        std::mem::take(&mut self.buf)
    }
}

/// `struct ifinfomsg`.
fn ifinfomsg(index: i32, flags: u32, change: u32) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[0] = AF_UNSPEC;
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

fn name_attr(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

fn family(addr: &IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn addr_bytes(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// `RTM_GETLINK` for one interface by name.
pub fn get_link(seq: u32, name: &str) -> Vec<u8> {
    Builder::new(RTM_GETLINK, 0, seq)
        .bytes(&ifinfomsg(0, 0, 0))
        .attr(IFLA_IFNAME, &name_attr(name))
        .finish()
}

/// `RTM_GETLINK` dump: every link of the namespace.
pub fn dump_links(seq: u32) -> Vec<u8> {
    Builder::new(RTM_GETLINK, NLM_F_DUMP, seq)
        .bytes(&ifinfomsg(0, 0, 0))
        .finish()
}

/// `RTM_NEWLINK` creating a link of `kind` (`"dummy"`, `"bridge"`: kinds that need no other
/// attribute) named `name`. Fails with `EEXIST` when the name is taken.
pub fn new_link(seq: u32, name: &str, kind: &str) -> Vec<u8> {
    let mut kind_z = kind.as_bytes().to_vec();
    kind_z.push(0);
    Builder::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, seq)
        .bytes(&ifinfomsg(0, 0, 0))
        .attr(IFLA_IFNAME, &name_attr(name))
        .nested(IFLA_LINKINFO, |b| {
            b.attr(IFLA_INFO_KIND, &kind_z);
        })
        .finish()
}

/// `RTM_NEWLINK` creating a veth pair: `name` here and its peer `peer` (both in this namespace).
pub fn new_veth(seq: u32, name: &str, peer: &str) -> Vec<u8> {
    Builder::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, seq)
        .bytes(&ifinfomsg(0, 0, 0))
        .attr(IFLA_IFNAME, &name_attr(name))
        .nested(IFLA_LINKINFO, |b| {
            b.attr(IFLA_INFO_KIND, b"veth\0").nested(IFLA_INFO_DATA, |b| {
                // The peer is a whole link description: an ifinfomsg, then its attributes.
                b.nested(VETH_INFO_PEER, |b| {
                    b.bytes(&ifinfomsg(0, 0, 0)).attr(IFLA_IFNAME, &name_attr(peer));
                });
            });
        })
        .finish()
}

/// `RTM_NEWLINK` moving link `index` into the network namespace open as descriptor `ns_fd`.
pub fn set_link_netns(seq: u32, index: i32, ns_fd: u32) -> Vec<u8> {
    Builder::new(RTM_NEWLINK, 0, seq)
        .bytes(&ifinfomsg(index, 0, 0))
        .attr(IFLA_NET_NS_FD, &ns_fd.to_ne_bytes())
        .finish()
}

/// `RTM_NEWLINK` on an existing link: set it up or down.
pub fn set_link_up(seq: u32, index: i32, up: bool) -> Vec<u8> {
    let flags = if up { IFF_UP } else { 0 };
    Builder::new(RTM_NEWLINK, 0, seq)
        .bytes(&ifinfomsg(index, flags, IFF_UP))
        .finish()
}

/// `RTM_NEWLINK` on an existing link: set its MTU.
pub fn set_link_mtu(seq: u32, index: i32, mtu: u32) -> Vec<u8> {
    Builder::new(RTM_NEWLINK, 0, seq)
        .bytes(&ifinfomsg(index, 0, 0))
        .attr(IFLA_MTU, &mtu.to_ne_bytes())
        .finish()
}

/// `RTM_NEWLINK` on an existing link: set its hardware (MAC) address.
pub fn set_link_address(seq: u32, index: i32, mac: [u8; 6]) -> Vec<u8> {
    Builder::new(RTM_NEWLINK, 0, seq)
        .bytes(&ifinfomsg(index, 0, 0))
        .attr(IFLA_ADDRESS, &mac)
        .finish()
}

/// `RTM_DELLINK` by name.
pub fn del_link(seq: u32, name: &str) -> Vec<u8> {
    Builder::new(RTM_DELLINK, 0, seq)
        .bytes(&ifinfomsg(0, 0, 0))
        .attr(IFLA_IFNAME, &name_attr(name))
        .finish()
}

/// `RTM_NEWADDR`: `addr/prefix_len` on link `index`, with `IFA_F_*` `flags` (e.g. [`IFA_F_NODAD`]).
pub fn add_addr(seq: u32, index: i32, addr: IpAddr, prefix_len: u8, flags: u32) -> Vec<u8> {
    // struct ifaddrmsg { family, prefixlen, flags, scope, index }
    let mut m = [0u8; 8];
    m[0] = family(&addr);
    m[1] = prefix_len;
    m[2] = u8::try_from(flags & 0xff).unwrap_or(0);
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    let a = addr_bytes(&addr);
    let mut b = Builder::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, seq);
    b.bytes(&m);
    if addr.is_ipv4() {
        b.attr(IFA_LOCAL, &a);
    }
    b.attr(IFA_ADDRESS, &a);
    if flags != 0 {
        b.attr(IFA_FLAGS, &flags.to_ne_bytes());
    }
    b.finish()
}

/// `RTM_NEWROUTE`: a default route (`0.0.0.0/0` or `::/0`) via `gateway`, out of link `index`.
pub fn add_default_route(seq: u32, index: i32, gateway: IpAddr) -> Vec<u8> {
    // struct rtmsg { family, dst_len, src_len, tos, table, protocol, scope, type, flags: u32 }
    let mut m = [0u8; 12];
    m[0] = family(&gateway);
    m[4] = RT_TABLE_MAIN;
    m[5] = RTPROT_BOOT;
    m[6] = RT_SCOPE_UNIVERSE;
    m[7] = RTN_UNICAST;
    Builder::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, seq)
        .bytes(&m)
        .attr(RTA_GATEWAY, &addr_bytes(&gateway))
        .attr(RTA_OIF, &index.to_ne_bytes())
        .finish()
}

/// `RTM_NEWROUTE`: a route to `dst/prefix_len` out of link `index`, via `gateway` or, without
/// one, directly on the link (scope link). The family is `dst`'s; a gateway of the other family
/// is the kernel's to reject.
pub fn add_route(seq: u32, index: i32, dst: IpAddr, prefix_len: u8, gateway: Option<IpAddr>) -> Vec<u8> {
    let mut m = [0u8; 12];
    m[0] = family(&dst);
    m[1] = prefix_len;
    m[4] = RT_TABLE_MAIN;
    m[5] = RTPROT_BOOT;
    m[6] = if gateway.is_some() {
        RT_SCOPE_UNIVERSE
    } else {
        RT_SCOPE_LINK
    };
    m[7] = RTN_UNICAST;
    let mut b = Builder::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, seq);
    b.bytes(&m).attr(RTA_DST, &addr_bytes(&dst));
    if let Some(gw) = gateway {
        b.attr(RTA_GATEWAY, &addr_bytes(&gw));
    }
    b.attr(RTA_OIF, &index.to_ne_bytes()).finish()
}

/// One message of a reply, as far as this crate cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `NLMSG_ERROR` for request `seq`: `errno` 0 is the ACK, otherwise a positive errno.
    Ack {
        /// Sequence number of the request.
        seq: u32,
        /// 0 for success, else the positive errno.
        errno: i32,
    },
    /// `RTM_NEWLINK` (answer to a GETLINK) with the link's index and name.
    Link {
        /// Sequence number of the request.
        seq: u32,
        /// The link's interface index.
        index: i32,
        /// `IFLA_IFNAME`, when present and UTF-8.
        name: Option<String>,
    },
    /// `NLMSG_DONE`: the end of a dump.
    Done {
        /// Sequence number of the request.
        seq: u32,
    },
    /// Anything else (`NLMSG_DONE`, other types).
    Other {
        /// Sequence number of the message.
        seq: u32,
    },
}

/// Splits a datagram from the kernel into messages. Truncated or malformed messages end parsing.
pub fn parse_replies(mut buf: &[u8]) -> Vec<Reply> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        let body = &buf[NLMSG_HDRLEN..len];
        let reply = match ty {
            NLMSG_ERROR if body.len() >= 4 => {
                let err = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
                Reply::Ack {
                    seq,
                    errno: err.saturating_neg(),
                }
            }
            RTM_NEWLINK if body.len() >= 16 => Reply::Link {
                seq,
                index: i32::from_ne_bytes([body[4], body[5], body[6], body[7]]),
                name: link_name(&body[16..]),
            },
            NLMSG_DONE => Reply::Done { seq },
            _ => Reply::Other { seq },
        };
        out.push(reply);
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

/// `IFLA_IFNAME` among a link message's attributes.
fn link_name(mut attrs: &[u8]) -> Option<String> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]) & !NLA_F_NESTED;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if ty == IFLA_IFNAME {
            let payload = &attrs[4..len];
            let end = payload.iter().position(|&b| b == 0).unwrap_or(payload.len());
            return String::from_utf8(payload[..end].to_vec()).ok();
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// (type, payload) of every attribute starting at `at`.
    fn attrs(b: &[u8], mut at: usize) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        while at + 4 <= b.len() {
            let len = u16_at(b, at) as usize;
            out.push((u16_at(b, at + 2), b[at + 4..at + len].to_vec()));
            at += align4(len);
        }
        out
    }

    #[test]
    fn header_has_length_type_flags_and_seq() {
        let m = set_link_up(7, 3, true);
        assert_eq!(m.len(), 32);
        assert_eq!(u32_at(&m, 0), 32);
        assert_eq!(u16_at(&m, 4), RTM_NEWLINK);
        assert_eq!(u16_at(&m, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(&m, 8), 7);
        // ifinfomsg: index 3, flags IFF_UP, change IFF_UP
        assert_eq!(u32_at(&m, 20), 3);
        assert_eq!(u32_at(&m, 24), IFF_UP);
        assert_eq!(u32_at(&m, 28), IFF_UP);
        let down = set_link_up(8, 3, false);
        assert_eq!(u32_at(&down, 24), 0);
        assert_eq!(u32_at(&down, 28), IFF_UP);
    }

    #[test]
    fn names_are_nul_terminated_and_padded() {
        let m = get_link(1, "eth0");
        assert_eq!(u16_at(&m, 4), RTM_GETLINK);
        assert_eq!(m.len() % 4, 0);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(attrs(&m, 32), vec![(IFLA_IFNAME, b"eth0\0".to_vec())]);
        let d = del_link(2, "tap-abc");
        assert_eq!(u16_at(&d, 4), RTM_DELLINK);
        assert_eq!(attrs(&d, 32), vec![(IFLA_IFNAME, b"tap-abc\0".to_vec())]);
    }

    #[test]
    fn mtu_attribute() {
        let m = set_link_mtu(1, 2, 1420);
        assert_eq!(attrs(&m, 32), vec![(IFLA_MTU, 1420u32.to_ne_bytes().to_vec())]);
        assert_eq!(u32_at(&m, 28), 0, "no flag change");
    }

    #[test]
    fn mac_address_attribute() {
        let m = set_link_address(6, 2, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(
            m.len(),
            44,
            "header, ifinfomsg, 4 + 6 bytes of attribute padded to 12"
        );
        assert_eq!(u16_at(&m, 4), RTM_NEWLINK);
        assert_eq!(
            u16_at(&m, 6),
            NLM_F_REQUEST | NLM_F_ACK,
            "changes a link, creates none"
        );
        assert_eq!(u32_at(&m, 8), 6);
        assert_eq!(u32_at(&m, 20), 2);
        assert_eq!(u32_at(&m, 24), 0, "no flags");
        assert_eq!(
            u32_at(&m, 28),
            0,
            "no flag change: up or down, the link stays as it is"
        );
        assert_eq!(u16_at(&m, 32), 10, "rta_len: header and the 6 bytes, unpadded");
        assert_eq!(u16_at(&m, 34), IFLA_ADDRESS);
        assert_eq!(
            attrs(&m, 32),
            vec![(IFLA_ADDRESS, vec![0x52, 0x54, 0x00, 0x12, 0x34, 0x56])]
        );
        assert_eq!(&m[42..], &[0, 0], "padding");
    }

    #[test]
    fn ipv4_address_has_local_and_address() {
        let m = add_addr(5, 2, "10.0.0.2".parse().unwrap(), 30, 0);
        assert_eq!(u16_at(&m, 4), RTM_NEWADDR);
        assert_eq!(
            u16_at(&m, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(m[16], AF_INET);
        assert_eq!(m[17], 30);
        assert_eq!(u32_at(&m, 20), 2);
        assert_eq!(
            attrs(&m, 24),
            vec![(IFA_LOCAL, vec![10, 0, 0, 2]), (IFA_ADDRESS, vec![10, 0, 0, 2])]
        );
    }

    #[test]
    fn ipv6_address_carries_nodad() {
        let a: IpAddr = "fdaa::2".parse().unwrap();
        let m = add_addr(5, 2, a, 64, IFA_F_NODAD);
        assert_eq!(m[16], AF_INET6);
        assert_eq!(m[17], 64);
        assert_eq!(m[18], 0x02);
        let IpAddr::V6(v6) = a else { unreachable!() };
        assert_eq!(
            attrs(&m, 24),
            vec![
                (IFA_ADDRESS, v6.octets().to_vec()),
                (IFA_FLAGS, IFA_F_NODAD.to_ne_bytes().to_vec())
            ]
        );
    }

    #[test]
    fn default_route_v4_and_v6() {
        let m = add_default_route(9, 4, "172.30.0.1".parse().unwrap());
        assert_eq!(u16_at(&m, 4), RTM_NEWROUTE);
        assert_eq!(
            &m[16..24],
            &[AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, 0, RTN_UNICAST]
        );
        assert_eq!(
            attrs(&m, 28),
            vec![
                (RTA_GATEWAY, vec![172, 30, 0, 1]),
                (RTA_OIF, 4i32.to_ne_bytes().to_vec())
            ]
        );
        let m6 = add_default_route(9, 4, "fe80::1".parse().unwrap());
        assert_eq!(m6[16], AF_INET6);
        assert_eq!(attrs(&m6, 28)[0].1.len(), 16);
    }

    #[test]
    fn dump_and_new_link() {
        let d = dump_links(4);
        assert_eq!(u16_at(&d, 4), RTM_GETLINK);
        assert_eq!(u16_at(&d, 6), NLM_F_REQUEST | NLM_F_ACK | NLM_F_DUMP);
        assert_eq!(d.len(), 32);
        let n = new_link(5, "aloft-dns", "dummy");
        assert_eq!(u16_at(&n, 4), RTM_NEWLINK);
        assert_eq!(
            u16_at(&n, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        let a = attrs(&n, 32);
        assert_eq!(a[0], (IFLA_IFNAME, b"aloft-dns\0".to_vec()));
        assert_eq!(a[1].0, IFLA_LINKINFO | NLA_F_NESTED);
        assert_eq!(attrs(&a[1].1, 0), vec![(IFLA_INFO_KIND, b"dummy\0".to_vec())]);
        assert_eq!(u32_at(&n, 0) as usize, n.len());
    }

    #[test]
    fn veth_peer_and_netns_move() {
        let m = new_veth(2, "ve0", "ve1");
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        let top = attrs(&m, 32);
        assert_eq!(top[0], (IFLA_IFNAME, b"ve0\0".to_vec()));
        let info = attrs(&top[1].1, 0);
        assert_eq!(info[0], (IFLA_INFO_KIND, b"veth\0".to_vec()));
        assert_eq!(info[1].0, IFLA_INFO_DATA | NLA_F_NESTED);
        let data = attrs(&info[1].1, 0);
        assert_eq!(data[0].0, VETH_INFO_PEER | NLA_F_NESTED);
        let peer = &data[0].1;
        assert_eq!(peer[..16], ifinfomsg(0, 0, 0));
        assert_eq!(attrs(peer, 16), vec![(IFLA_IFNAME, b"ve1\0".to_vec())]);

        let n = set_link_netns(3, 9, 5);
        assert_eq!(u16_at(&n, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(&n, 20), 9);
        assert_eq!(attrs(&n, 32), vec![(IFLA_NET_NS_FD, 5u32.to_ne_bytes().to_vec())]);
    }

    #[test]
    fn prefix_routes_on_link_and_via_gateway() {
        let m = add_route(3, 7, "fdaa:0:1:0:2:0:5::".parse().unwrap(), 112, None);
        assert_eq!(u16_at(&m, 4), RTM_NEWROUTE);
        assert_eq!(
            &m[16..24],
            &[
                AF_INET6,
                112,
                0,
                0,
                RT_TABLE_MAIN,
                RTPROT_BOOT,
                RT_SCOPE_LINK,
                RTN_UNICAST
            ]
        );
        let a = attrs(&m, 28);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].0, RTA_DST);
        assert_eq!(a[1], (RTA_OIF, 7i32.to_ne_bytes().to_vec()));
        let v4 = add_route(
            3,
            7,
            "10.1.0.0".parse().unwrap(),
            16,
            Some("10.0.0.1".parse().unwrap()),
        );
        assert_eq!(&v4[16..18], &[AF_INET, 16]);
        assert_eq!(v4[22], RT_SCOPE_UNIVERSE);
        assert_eq!(
            attrs(&v4, 28),
            vec![
                (RTA_DST, vec![10, 1, 0, 0]),
                (RTA_GATEWAY, vec![10, 0, 0, 1]),
                (RTA_OIF, 7i32.to_ne_bytes().to_vec())
            ]
        );
    }

    fn reply(ty: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&u32::try_from(NLMSG_HDRLEN + body.len()).unwrap().to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&0u16.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(body);
        v.resize(align4(v.len()), 0);
        v
    }

    #[test]
    fn parses_acks_errors_and_links() {
        let mut link = ifinfomsg(12, 0, 0).to_vec();
        link.extend_from_slice(&9u16.to_ne_bytes());
        link.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        link.extend_from_slice(b"tap0\0\0\0\0");
        let mut dgram = reply(RTM_NEWLINK, 3, &link);
        let mut err = (-libc::EEXIST).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0; 16]);
        dgram.extend(reply(NLMSG_ERROR, 3, &err));
        dgram.extend(reply(NLMSG_ERROR, 4, &[0; 20]));
        dgram.extend(reply(NLMSG_DONE, 5, &[0; 4]));
        dgram.extend(reply(RTM_NEWLINK, 6, &ifinfomsg(13, 0, 0)));
        dgram.extend(reply(99, 7, &[0; 4]));
        assert_eq!(
            parse_replies(&dgram),
            vec![
                Reply::Link {
                    seq: 3,
                    index: 12,
                    name: Some("tap0".into())
                },
                Reply::Ack {
                    seq: 3,
                    errno: libc::EEXIST
                },
                Reply::Ack { seq: 4, errno: 0 },
                Reply::Done { seq: 5 },
                Reply::Link {
                    seq: 6,
                    index: 13,
                    name: None
                },
                Reply::Other { seq: 7 },
            ]
        );
    }

    #[test]
    fn truncated_replies_do_not_panic() {
        let full = reply(NLMSG_ERROR, 1, &[0; 20]);
        for n in 0..full.len() {
            let _ = parse_replies(&full[..n]);
        }
        let mut bad = full.clone();
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_replies(&bad).is_empty());
    }
}
