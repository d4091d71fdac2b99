//! `aloft-netlink`: a small synchronous rtnetlink client over a raw `AF_NETLINK`/`NETLINK_ROUTE`
//! socket — look up and list links, create simple links (dummy, bridge) and veth pairs, move a
//! link into another network namespace, set links up/down, set their MTU and MAC address, add
//! addresses, default routes and prefix routes, delete a link.
//!
//! Used in the guest by `aloft-init` (a static, single-threaded PID 1) and on the host by the
//! networking code. Blocking calls on the caller's thread; no async runtime, no netlink crates, no
//! other aloft crate: it depends on `libc` and `thiserror` only.
//!
//! Every request asks for an ACK and checks the kernel's answer, so each method either did what it
//! says or returns a [`NetlinkError`] naming the operation, the interface and the address.
//!
//! Message encoding lives in [`msg`] as pure functions (unit tested without a socket); the only
//! unsafe code is the socket plumbing in `sock`.

#![warn(missing_docs)]

pub mod msg;
mod sock;

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};

use msg::Reply;

/// A failed netlink operation. Messages name what was attempted (`add address 10.0.0.2/30 to eth0`);
/// the source is the kernel's errno.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened or bound.
    #[error("open rtnetlink socket")]
    Open {
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The interface name is empty, too long or contains a NUL.
    #[error("invalid interface name {name:?}")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// No such interface, or the lookup failed.
    #[error("look up interface {name}")]
    Lookup {
        /// Interface name.
        name: String,
        /// The OS error (`ENODEV` when it does not exist).
        #[source]
        source: io::Error,
    },
    /// Setting the link up or down failed.
    #[error("set {name} {}", if *up { "up" } else { "down" })]
    SetState {
        /// Interface name.
        name: String,
        /// The state asked for.
        up: bool,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Setting the MTU failed.
    #[error("set mtu {mtu} on {name}")]
    SetMtu {
        /// Interface name.
        name: String,
        /// The MTU asked for.
        mtu: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Setting the hardware (MAC) address failed.
    #[error("set MAC address {} on {name}", mac_text(address))]
    SetAddress {
        /// Interface name.
        name: String,
        /// The address asked for.
        address: [u8; 6],
        /// The OS error (`EADDRNOTAVAIL` for a multicast or all-zero address, `EBUSY` when the
        /// device cannot change it while up).
        #[source]
        source: io::Error,
    },
    /// Adding an address failed.
    #[error("add address {addr}/{prefix_len} to {name}")]
    AddAddress {
        /// Interface name.
        name: String,
        /// The address.
        addr: IpAddr,
        /// Its prefix length.
        prefix_len: u8,
        /// The OS error (`EEXIST` when it is already there).
        #[source]
        source: io::Error,
    },
    /// Adding a default route failed.
    #[error("add default route via {gateway} on {name}")]
    AddRoute {
        /// Interface name.
        name: String,
        /// The gateway.
        gateway: IpAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Listing the namespace's links failed.
    #[error("list network interfaces")]
    ListLinks {
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating a link failed.
    #[error("create {kind} link {name}")]
    CreateLink {
        /// Interface name.
        name: String,
        /// Link kind (`dummy`, `bridge`).
        kind: String,
        /// The OS error (`EEXIST` when the name is taken).
        #[source]
        source: io::Error,
    },
    /// Moving a link into another network namespace failed.
    #[error("move link {name} into another network namespace")]
    MoveLink {
        /// Interface name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Adding a route to a prefix failed.
    #[error("add route to {dst}/{prefix_len} on {name}")]
    AddPrefixRoute {
        /// Interface name.
        name: String,
        /// Destination prefix.
        dst: IpAddr,
        /// Its length.
        prefix_len: u8,
        /// The OS error (`EEXIST` when it is already there).
        #[source]
        source: io::Error,
    },
    /// Deleting a link failed.
    #[error("delete link {name}")]
    DeleteLink {
        /// Interface name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// `52:54:00:12:34:56`.
fn mac_text(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// A network interface as listed by [`Netlink::links`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: i32,
    /// Interface name.
    pub name: String,
}

/// An open rtnetlink socket. Requests are sent one at a time and each waits for its ACK.
#[derive(Debug)]
pub struct Netlink {
    sock: sock::Socket,
    seq: u32,
}

impl Netlink {
    /// Opens and binds a `NETLINK_ROUTE` socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let sock = sock::Socket::open().map_err(|source| NetlinkError::Open { source })?;
        Ok(Self { sock, seq: 0 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `req` and feeds every reply to `on_reply` until it returns a result.
    fn exchange<T>(
        &mut self,
        req: &[u8],
        mut on_reply: impl FnMut(Reply) -> Option<io::Result<T>>,
    ) -> io::Result<T> {
        self.sock.send(req)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.sock.recv(&mut buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "netlink socket closed",
                ));
            }
            for reply in msg::parse_replies(&buf[..n]) {
                if let Some(done) = on_reply(reply) {
                    return done;
                }
            }
        }
    }

    /// Sends `req` (built with sequence number `seq`) and reads replies until the kernel's
    /// `NLMSG_ERROR` for it. Returns the link index if a `RTM_NEWLINK` came back first.
    fn transact(&mut self, seq: u32, req: &[u8]) -> io::Result<Option<i32>> {
        let mut link = None;
        self.exchange(req, |reply| match reply {
            Reply::Link { seq: s, index, .. } if s == seq => {
                link = Some(index);
                None
            }
            Reply::Ack { seq: s, errno } if s == seq => Some(if errno == 0 {
                Ok(link)
            } else {
                Err(io::Error::from_raw_os_error(errno))
            }),
            _ => None,
        })
    }

    /// Sends the dump request `req` and collects every link until `NLMSG_DONE`.
    fn dump(&mut self, seq: u32, req: &[u8]) -> io::Result<Vec<Link>> {
        let mut links = Vec::new();
        self.exchange(req, |reply| match reply {
            Reply::Link {
                seq: s,
                index,
                name: Some(name),
            } if s == seq => {
                links.push(Link { index, name });
                None
            }
            Reply::Done { seq: s } if s == seq => Some(Ok(())),
            Reply::Ack { seq: s, errno } if s == seq && errno != 0 => {
                Some(Err(io::Error::from_raw_os_error(errno)))
            }
            _ => None,
        })?;
        Ok(links)
    }

    fn check_name(name: &str) -> Result<(), NetlinkError> {
        if name.is_empty() || name.len() > msg::MAX_IFNAME_LEN || name.contains('\0') {
            return Err(NetlinkError::InvalidName {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    /// The interface index of `name`.
    pub fn link_index(&mut self, name: &str) -> Result<i32, NetlinkError> {
        Self::check_name(name)?;
        let seq = self.next_seq();
        let lookup = |source| NetlinkError::Lookup {
            name: name.to_owned(),
            source,
        };
        match self.transact(seq, &msg::get_link(seq, name)) {
            Ok(Some(index)) => Ok(index),
            Ok(None) => Err(lookup(io::Error::from_raw_os_error(libc::ENODEV))),
            Err(e) => Err(lookup(e)),
        }
    }

    /// The interface index of `name`, or `None` when there is no such interface.
    pub fn find_link(&mut self, name: &str) -> Result<Option<i32>, NetlinkError> {
        match self.link_index(name) {
            Ok(index) => Ok(Some(index)),
            Err(NetlinkError::Lookup { source, .. }) if source.raw_os_error() == Some(libc::ENODEV) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Every link in the socket's network namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let seq = self.next_seq();
        self.dump(seq, &msg::dump_links(seq))
            .map_err(|source| NetlinkError::ListLinks { source })
    }

    /// Creates a link of `kind` that needs no other attribute (`"dummy"`, `"bridge"`), down.
    pub fn create_link(&mut self, name: &str, kind: &str) -> Result<(), NetlinkError> {
        Self::check_name(name)?;
        let seq = self.next_seq();
        self.transact(seq, &msg::new_link(seq, name, kind))
            .map(drop)
            .map_err(|source| NetlinkError::CreateLink {
                name: name.to_owned(),
                kind: kind.to_owned(),
                source,
            })
    }

    /// Creates the veth pair `name` ↔ `peer`, both down, in this namespace.
    pub fn create_veth(&mut self, name: &str, peer: &str) -> Result<(), NetlinkError> {
        Self::check_name(name)?;
        Self::check_name(peer)?;
        let seq = self.next_seq();
        self.transact(seq, &msg::new_veth(seq, name, peer))
            .map(drop)
            .map_err(|source| NetlinkError::CreateLink {
                name: name.to_owned(),
                kind: "veth".to_owned(),
                source,
            })
    }

    /// Moves link `name` into the network namespace `ns` (an open `/run/netns/NAME` or
    /// `/proc/PID/ns/net`). It arrives there down, without addresses.
    pub fn move_to_netns(&mut self, name: &str, ns: impl AsFd) -> Result<(), NetlinkError> {
        let index = self.link_index(name)?;
        let move_err = |source| NetlinkError::MoveLink {
            name: name.to_owned(),
            source,
        };
        let fd = u32::try_from(ns.as_fd().as_raw_fd())
            .map_err(|_| move_err(io::Error::from_raw_os_error(libc::EBADF)))?;
        let seq = self.next_seq();
        self.transact(seq, &msg::set_link_netns(seq, index, fd))
            .map(drop)
            .map_err(move_err)
    }

    /// Adds a route to `dst/prefix_len` out of `name`: via `gateway`, or on the link without one.
    pub fn add_route(
        &mut self,
        name: &str,
        dst: IpAddr,
        prefix_len: u8,
        gateway: Option<IpAddr>,
    ) -> Result<(), NetlinkError> {
        let index = self.link_index(name)?;
        let seq = self.next_seq();
        self.transact(seq, &msg::add_route(seq, index, dst, prefix_len, gateway))
            .map(drop)
            .map_err(|source| NetlinkError::AddPrefixRoute {
                name: name.to_owned(),
                dst,
                prefix_len,
                source,
            })
    }

    /// Sets `name` up (`true`) or down.
    pub fn set_link_up(&mut self, name: &str, up: bool) -> Result<(), NetlinkError> {
        let index = self.link_index(name)?;
        let seq = self.next_seq();
        self.transact(seq, &msg::set_link_up(seq, index, up))
            .map(drop)
            .map_err(|source| NetlinkError::SetState {
                name: name.to_owned(),
                up,
                source,
            })
    }

    /// Sets the MTU of `name`.
    pub fn set_mtu(&mut self, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        let index = self.link_index(name)?;
        let seq = self.next_seq();
        self.transact(seq, &msg::set_link_mtu(seq, index, mtu))
            .map(drop)
            .map_err(|source| NetlinkError::SetMtu {
                name: name.to_owned(),
                mtu,
                source,
            })
    }

    /// Sets the hardware (MAC) address of `name`. Best done while the link is down: the IPv6
    /// link-local address is derived from it when the link comes up, and some devices refuse the
    /// change while up.
    pub fn set_link_address(&mut self, name: &str, address: [u8; 6]) -> Result<(), NetlinkError> {
        let index = self.link_index(name)?;
        let seq = self.next_seq();
        self.transact(seq, &msg::set_link_address(seq, index, address))
            .map(drop)
            .map_err(|source| NetlinkError::SetAddress {
                name: name.to_owned(),
                address,
                source,
            })
    }

    /// Adds `addr/prefix_len` to `name`. IPv6 addresses skip duplicate address detection
    /// (`IFA_F_NODAD`) so they are usable at once.
    pub fn add_address(&mut self, name: &str, addr: IpAddr, prefix_len: u8) -> Result<(), NetlinkError> {
        let index = self.link_index(name)?;
        let seq = self.next_seq();
        let flags = if addr.is_ipv6() { msg::IFA_F_NODAD } else { 0 };
        self.transact(seq, &msg::add_addr(seq, index, addr, prefix_len, flags))
            .map(drop)
            .map_err(|source| NetlinkError::AddAddress {
                name: name.to_owned(),
                addr,
                prefix_len,
                source,
            })
    }

    /// Adds a default route (IPv4 or IPv6, after the gateway's family) via `gateway` out of `name`.
    pub fn add_default_route(&mut self, name: &str, gateway: IpAddr) -> Result<(), NetlinkError> {
        let index = self.link_index(name)?;
        let seq = self.next_seq();
        self.transact(seq, &msg::add_default_route(seq, index, gateway))
            .map(drop)
            .map_err(|source| NetlinkError::AddRoute {
                name: name.to_owned(),
                gateway,
                source,
            })
    }

    /// Deletes the link `name` (a tap, veth, bridge…).
    pub fn delete_link(&mut self, name: &str) -> Result<(), NetlinkError> {
        Self::check_name(name)?;
        let seq = self.next_seq();
        self.transact(seq, &msg::del_link(seq, name))
            .map(drop)
            .map_err(|source| NetlinkError::DeleteLink {
                name: name.to_owned(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_name_operation_interface_and_address() {
        let e = NetlinkError::AddAddress {
            name: "eth0".into(),
            addr: "10.0.0.2".parse().unwrap(),
            prefix_len: 30,
            source: io::Error::from_raw_os_error(libc::EEXIST),
        };
        assert_eq!(e.to_string(), "add address 10.0.0.2/30 to eth0");
        let e = NetlinkError::SetState {
            name: "lo".into(),
            up: true,
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert_eq!(e.to_string(), "set lo up");
        let e = NetlinkError::AddRoute {
            name: "eth0".into(),
            gateway: "fdaa::1".parse().unwrap(),
            source: io::Error::from_raw_os_error(libc::ENETUNREACH),
        };
        assert_eq!(e.to_string(), "add default route via fdaa::1 on eth0");
        let e = NetlinkError::SetAddress {
            name: "eth0".into(),
            address: [0x52, 0x54, 0x00, 0xab, 0x0c, 0xff],
            source: io::Error::from_raw_os_error(libc::EADDRNOTAVAIL),
        };
        assert_eq!(e.to_string(), "set MAC address 52:54:00:ab:0c:ff on eth0");
    }

    #[test]
    fn bad_names_are_rejected_before_any_syscall() {
        for bad in ["", "a-name-that-is-too-long", "et\0h"] {
            assert!(matches!(
                Netlink::check_name(bad),
                Err(NetlinkError::InvalidName { .. })
            ));
        }
        assert!(Netlink::check_name("eth0").is_ok());
    }
}
