//! The addressing plan: pure functions from (org, host, slot) to every address a machine's network
//! needs, and the slot allocator whose state the caller persists. No I/O.
//!
//! # Layout
//!
//! IPv6 follows Fly's 6PN layout, so an organization is one `/48` and a machine one `/112`:
//!
//! ```text
//! fdaa : OOOO:OOOO : HHHH:HHHH : SSSS:SSSS : GGGG
//! ULA    org (32)    host (32)   slot (32)   free for the guest (16)
//! ```
//!
//! - org `/48` (`fdaa:O:O::/48`): what isolation compares; org 0 is the platform's own
//!   (`fdaa::3`, the internal DNS, lives there), so real orgs are numbered from 1;
//! - org on one host `/80` (`fdaa:O:O:H:H::/80`): what another host routes here;
//! - machine `/112`: routed to the machine's tap; the guest is `…::2`.
//!
//! The guest's IPv6 gateway is the link-local `fe80::1` on the host side of the tap, so the host
//! holds no address inside any organization's prefix.
//!
//! IPv4 is host-local, for egress (masqueraded) and the proxy: a `/31` per slot out of a pool
//! (default `172.19.0.0/16`); slot `s` gets `pool + 2s` on the host side and `pool + 2s + 1` in the
//! guest. Slot 0 is never handed out (its `/31` is the pool's network address).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aloft_guest_proto::{DnsConfig, EtcHost, IpNet, NetConfig};
use serde::{Deserialize, Serialize};

/// Prefix of every tap aloft creates; [`crate::HostNet::reconcile`] removes strays by it.
pub const TAP_PREFIX: &str = "aloft-m";

/// The host side of every tap: the guest's IPv6 gateway.
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The 6PN space: `fdaa::/16`.
pub const SIXPN: IpNet = IpNet {
    addr: IpAddr::V6(Ipv6Addr::new(0xfdaa, 0, 0, 0, 0, 0, 0, 0)),
    prefix_len: 16,
};

/// Length of an organization's prefix.
pub const ORG_PREFIX_LEN: u8 = 48;
/// Length of one organization's prefix on one host.
pub const HOST_PREFIX_LEN: u8 = 80;
/// Length of one machine's prefix.
pub const MACHINE_PREFIX_LEN: u8 = 112;

/// Bad plan input or an exhausted pool. Messages say what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Org 0 is the platform's.
    #[error("org number 0 is reserved for the platform: number organizations from 1")]
    ReservedOrg,
    /// The IPv4 pool is not a usable IPv4 prefix.
    #[error(
        "ipv4 pool {pool}: use an IPv4 network address with a prefix of /8 to /30, such as 172.19.0.0/16"
    )]
    BadPool {
        /// The rejected pool.
        pool: IpNet,
    },
    /// The DNS address is outside the platform's `fdaa::/48`.
    #[error("dns address {addr}: use an address in fdaa::/48 (the platform's prefix), such as fdaa::3")]
    BadDns {
        /// The rejected address.
        addr: Ipv6Addr,
    },
    /// MTU out of range.
    #[error("mtu {mtu}: use 1280 (the IPv6 minimum) to 9000")]
    BadMtu {
        /// The rejected MTU.
        mtu: u32,
    },
    /// A slot outside `1..=max_slot`.
    #[error("slot {slot} is outside this host's range 1..={max_slot}")]
    SlotOutOfRange {
        /// The slot.
        slot: u32,
        /// The largest slot of the pool.
        max_slot: u32,
    },
    /// Every slot is taken.
    #[error(
        "no free network slot on this host (all {max_slot} in use): free a machine's slot or use a larger ipv4 pool"
    )]
    Exhausted {
        /// The largest slot of the pool.
        max_slot: u32,
    },
    /// A (persisted) machine network whose parts do not agree.
    #[error(
        "network of the machine in slot {slot} is inconsistent ({reason}): recompute it with Plan::machine"
    )]
    Inconsistent {
        /// Its slot.
        slot: u32,
        /// What disagrees.
        reason: &'static str,
    },
    /// Persisted allocator state that does not fit this plan.
    #[error(
        "allocator state holds slot {slot} (owner {owner}) outside 1..={max_slot}: the ipv4 pool shrank; use the old pool or free those machines"
    )]
    StateOutOfRange {
        /// The slot.
        slot: u32,
        /// Who holds it.
        owner: String,
        /// The largest slot of the pool.
        max_slot: u32,
    },
    /// The same owner holds two slots in persisted state.
    #[error("allocator state gives {owner} two slots ({first} and {second}): free one of them")]
    DuplicateOwner {
        /// Who.
        owner: String,
        /// One slot.
        first: u32,
        /// The other.
        second: u32,
    },
}

/// How this host numbers its machines' networks (user input; defaults suit one host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// This host's number in the cluster (the 6PN host field).
    pub host: u32,
    /// Host-local IPv4 range cut into a `/31` per machine.
    #[serde(default = "default_pool")]
    pub ipv4_pool: IpNet,
    /// The internal DNS server's address, given to guests as their nameserver (in `fdaa::/48`).
    #[serde(default = "default_dns")]
    pub dns: Ipv6Addr,
    /// The guests' and taps' MTU. 1420 leaves room for a WireGuard or VXLAN underlay between hosts
    /// later without changing running machines.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
}

fn default_pool() -> IpNet {
    IpNet {
        addr: IpAddr::V4(Ipv4Addr::new(172, 19, 0, 0)),
        prefix_len: 16,
    }
}

fn default_dns() -> Ipv6Addr {
    Ipv6Addr::new(0xfdaa, 0, 0, 0, 0, 0, 0, 3)
}

fn default_mtu() -> u32 {
    1420
}

impl PlanConfig {
    /// Defaults for host number `host`: pool `172.19.0.0/16`, DNS `fdaa::3`, MTU 1420.
    pub fn new(host: u32) -> Self {
        Self {
            host,
            ipv4_pool: default_pool(),
            dns: default_dns(),
            mtu: default_mtu(),
        }
    }
}

/// A validated [`PlanConfig`]: turns (org, slot) into a [`MachineNet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    host: u32,
    pool: Ipv4Addr,
    pool_len: u8,
    dns: Ipv6Addr,
    mtu: u32,
}

impl Plan {
    /// Checks `config`.
    pub fn new(config: &PlanConfig) -> Result<Self, PlanError> {
        let bad_pool = || PlanError::BadPool {
            pool: config.ipv4_pool,
        };
        let IpAddr::V4(pool) = config.ipv4_pool.addr else {
            return Err(bad_pool());
        };
        let len = config.ipv4_pool.prefix_len;
        if !(8..=30).contains(&len) || u32::from(pool) & !prefix_mask4(len) != 0 {
            return Err(bad_pool());
        }
        let [a, b, c, ..] = config.dns.segments();
        if (a, b, c) != (0xfdaa, 0, 0) {
            return Err(PlanError::BadDns { addr: config.dns });
        }
        if !(1280..=9000).contains(&config.mtu) {
            return Err(PlanError::BadMtu { mtu: config.mtu });
        }
        Ok(Self {
            host: config.host,
            pool,
            pool_len: len,
            dns: config.dns,
            mtu: config.mtu,
        })
    }

    /// The largest slot: one `/31` per slot, slot 0 unused.
    pub fn max_slot(&self) -> u32 {
        (1u32 << (32 - u32::from(self.pool_len) - 1)) - 1
    }

    /// This host's number.
    pub fn host(&self) -> u32 {
        self.host
    }

    /// The IPv4 pool.
    pub fn ipv4_pool(&self) -> IpNet {
        IpNet {
            addr: self.pool.into(),
            prefix_len: self.pool_len,
        }
    }

    /// The internal DNS address.
    pub fn dns(&self) -> Ipv6Addr {
        self.dns
    }

    /// The MTU of taps and guests.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// The platform's own address on this host (`fdaa:0:0:H:H::1`), the source of host→guest
    /// connections (proxy, health checks).
    pub fn host_address(&self) -> Ipv6Addr {
        let [h1, h2] = split(self.host);
        Ipv6Addr::new(0xfdaa, 0, 0, h1, h2, 0, 0, 1)
    }

    /// Everything about the network of the machine of `org` in `slot`. Deterministic: the same
    /// inputs give the same addresses, tap name and MAC.
    pub fn machine(&self, org: u32, slot: u32) -> Result<MachineNet, PlanError> {
        if org == 0 {
            return Err(PlanError::ReservedOrg);
        }
        let max_slot = self.max_slot();
        if slot == 0 || slot > max_slot {
            return Err(PlanError::SlotOutOfRange { slot, max_slot });
        }
        let [o1, o2] = split(org);
        let [h1, h2] = split(self.host);
        let [s1, s2] = split(slot);
        let prefix = Ipv6Addr::new(0xfdaa, o1, o2, h1, h2, s1, s2, 0);
        let base = u32::from(self.pool) + 2 * slot;
        let [_, m1, m2, m3] = slot.to_be_bytes();
        Ok(MachineNet {
            org,
            host: self.host,
            slot,
            tap: format!("{TAP_PREFIX}{slot}"),
            mac: format!("52:54:00:{m1:02x}:{m2:02x}:{m3:02x}"),
            ip6: Ipv6Addr::new(0xfdaa, o1, o2, h1, h2, s1, s2, 2),
            ip6_prefix: IpNet {
                addr: prefix.into(),
                prefix_len: MACHINE_PREFIX_LEN,
            },
            org_prefix: org_prefix(org),
            gateway6: GATEWAY6,
            ip4: Ipv4Addr::from(base + 1),
            gateway4: Ipv4Addr::from(base),
            dns: self.dns,
            mtu: self.mtu,
        })
    }
}

/// `fdaa:O:O::/48` for org `org`.
pub fn org_prefix(org: u32) -> IpNet {
    let [o1, o2] = split(org);
    IpNet {
        addr: Ipv6Addr::new(0xfdaa, o1, o2, 0, 0, 0, 0, 0).into(),
        prefix_len: ORG_PREFIX_LEN,
    }
}

/// `fdaa:O:O:H:H::/80`: org `org`'s machines on host `host`; another host routes this here.
pub fn host_prefix(org: u32, host: u32) -> IpNet {
    let [o1, o2] = split(org);
    let [h1, h2] = split(host);
    IpNet {
        addr: Ipv6Addr::new(0xfdaa, o1, o2, h1, h2, 0, 0, 0).into(),
        prefix_len: HOST_PREFIX_LEN,
    }
}

/// The platform's own `/48` (org 0): DNS and host addresses.
pub fn platform_prefix() -> IpNet {
    org_prefix(0)
}

/// Whether `addr` is inside `net` (same family, same leading `prefix_len` bits).
pub fn contains(net: &IpNet, addr: IpAddr) -> bool {
    match (net.addr, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = prefix_mask4(net.prefix_len);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if net.prefix_len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(net.prefix_len.min(128)))
            };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

fn split(v: u32) -> [u16; 2] {
    let [a, b, c, d] = v.to_be_bytes();
    [u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d])]
}

fn prefix_mask4(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

/// One machine's network: what the host configures and what the guest gets. Persist it with the
/// machine so a reconcile recreates exactly this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineNet {
    /// Organization number (≥ 1).
    pub org: u32,
    /// Host number.
    pub host: u32,
    /// Slot on this host.
    pub slot: u32,
    /// Tap device name (`aloft-m<slot>`).
    pub tap: String,
    /// The guest NIC's MAC.
    pub mac: String,
    /// The guest's 6PN address (`…::2` of its `/112`).
    pub ip6: Ipv6Addr,
    /// The machine's `/112`, routed to the tap.
    pub ip6_prefix: IpNet,
    /// The organization's `/48`.
    pub org_prefix: IpNet,
    /// The guest's IPv6 gateway (link-local, on the host side of the tap).
    pub gateway6: Ipv6Addr,
    /// The guest's private IPv4 (the odd half of its `/31`).
    pub ip4: Ipv4Addr,
    /// The host side of the `/31`: the guest's IPv4 gateway.
    pub gateway4: Ipv4Addr,
    /// The guest's nameserver.
    pub dns: Ipv6Addr,
    /// MTU of the tap and the guest's eth0.
    pub mtu: u32,
}

impl MachineNet {
    /// Checks that the parts agree (the tap is the slot's, the 6PN address is in its `/112`, the
    /// `/112` in the org's `/48`, the IPv4 pair one `/31`, …): a persisted value may be stale or
    /// edited, and the host acts on it.
    pub fn validate(&self) -> Result<(), PlanError> {
        let bad = |reason| {
            Err(PlanError::Inconsistent {
                slot: self.slot,
                reason,
            })
        };
        if self.org == 0 {
            return Err(PlanError::ReservedOrg);
        }
        if self.tap != format!("{TAP_PREFIX}{}", self.slot) || self.tap.len() > 15 {
            return bad("tap name is not aloft-m<slot>");
        }
        if self.ip6_prefix.prefix_len != MACHINE_PREFIX_LEN || !contains(&self.ip6_prefix, self.ip6.into()) {
            return bad("6PN address outside its /112");
        }
        if self.org_prefix != org_prefix(self.org) || !contains(&self.org_prefix, self.ip6_prefix.addr) {
            return bad("the /112 is not in the organization's /48");
        }
        if self.gateway6 != GATEWAY6 {
            return bad("IPv6 gateway is not fe80::1");
        }
        if u32::from(self.ip4) & !1 != u32::from(self.gateway4) || self.ip4 == self.gateway4 {
            return bad("IPv4 address and gateway are not the two halves of one /31");
        }
        if !contains(&platform_prefix(), self.dns.into()) {
            return bad("nameserver outside fdaa::/48");
        }
        if !(1280..=9000).contains(&self.mtu) {
            return bad("mtu outside 1280 to 9000");
        }
        let octets: Vec<&str> = self.mac.split(':').collect();
        if octets.len() != 6
            || !octets
                .iter()
                .all(|o| o.len() == 2 && u8::from_str_radix(o, 16).is_ok())
        {
            return bad("mac is not six hex pairs");
        }
        Ok(())
    }

    /// eth0's configuration for `aloft-init`: the 6PN address in its `/112`, the IPv4 in its `/31`,
    /// both gateways, the MTU.
    pub fn net_config(&self) -> NetConfig {
        NetConfig {
            addresses: vec![
                IpNet {
                    addr: self.ip6.into(),
                    prefix_len: MACHINE_PREFIX_LEN,
                },
                IpNet {
                    addr: self.ip4.into(),
                    prefix_len: 31,
                },
            ],
            gateways: vec![self.gateway4.into(), self.gateway6.into()],
            mtu: Some(self.mtu),
        }
    }

    /// `/etc/resolv.conf`: the host's internal DNS.
    pub fn dns_config(&self) -> DnsConfig {
        DnsConfig {
            nameservers: vec![self.dns.into()],
            search: Vec::new(),
        }
    }

    /// Extra `/etc/hosts` lines: `fly-local-6pn` (as on Fly) for the guest's 6PN address.
    pub fn etc_hosts(&self) -> Vec<EtcHost> {
        vec![EtcHost {
            ip: self.ip6.into(),
            names: vec!["fly-local-6pn".to_owned()],
        }]
    }
}

/// The allocator's persisted state: who holds which slot, and where the next search starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotState {
    /// Slot → owner (a machine id).
    pub used: BTreeMap<u32, String>,
    /// The next search starts here (next fit: a freed slot is reused as late as possible, so a
    /// stale address in someone's cache rarely points at a new machine).
    #[serde(default)]
    pub next: u32,
}

/// Hands out and frees slots `1..=max_slot`. The caller persists [`SlotAllocator::state`] after
/// every change, before acting on it.
#[derive(Debug, Clone)]
pub struct SlotAllocator {
    max_slot: u32,
    state: SlotState,
}

impl SlotAllocator {
    /// An allocator over `1..=max_slot` starting from persisted `state` (checked).
    pub fn new(max_slot: u32, state: SlotState) -> Result<Self, PlanError> {
        let mut owners: BTreeMap<&str, u32> = BTreeMap::new();
        for (&slot, owner) in &state.used {
            if slot == 0 || slot > max_slot {
                return Err(PlanError::StateOutOfRange {
                    slot,
                    owner: owner.clone(),
                    max_slot,
                });
            }
            if let Some(first) = owners.insert(owner, slot) {
                return Err(PlanError::DuplicateOwner {
                    owner: owner.clone(),
                    first,
                    second: slot,
                });
            }
        }
        Ok(Self { max_slot, state })
    }

    /// The slot `owner` holds, or a new one. Idempotent, so a retried create gets the same slot.
    pub fn allocate(&mut self, owner: &str) -> Result<u32, PlanError> {
        if let Some(slot) = self.slot_of(owner) {
            return Ok(slot);
        }
        let start = if (1..=self.max_slot).contains(&self.state.next) {
            self.state.next
        } else {
            1
        };
        let candidates = (start..=self.max_slot).chain(1..start);
        for slot in candidates {
            if let std::collections::btree_map::Entry::Vacant(e) = self.state.used.entry(slot) {
                e.insert(owner.to_owned());
                self.state.next = if slot == self.max_slot { 1 } else { slot + 1 };
                return Ok(slot);
            }
        }
        Err(PlanError::Exhausted {
            max_slot: self.max_slot,
        })
    }

    /// Frees `owner`'s slot; returns it, or `None` when it held none.
    pub fn free(&mut self, owner: &str) -> Option<u32> {
        let slot = self.slot_of(owner)?;
        self.state.used.remove(&slot);
        Some(slot)
    }

    /// The slot `owner` holds.
    pub fn slot_of(&self, owner: &str) -> Option<u32> {
        self.state
            .used
            .iter()
            .find_map(|(&slot, o)| (o == owner).then_some(slot))
    }

    /// How many slots are in use.
    pub fn in_use(&self) -> usize {
        self.state.used.len()
    }

    /// The state to persist.
    pub fn state(&self) -> &SlotState {
        &self.state
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn plan(host: u32) -> Plan {
        Plan::new(&PlanConfig::new(host)).unwrap()
    }

    #[test]
    fn layout_encodes_org_host_and_slot() {
        let m = plan(0x0002_0003).machine(0x0001_0018, 0x0005_0006).unwrap_err();
        assert!(matches!(m, PlanError::SlotOutOfRange { .. }), "{m}");
        let m = plan(0x0002_0003).machine(0x0001_0018, 300).unwrap();
        assert_eq!(m.ip6.to_string(), "fdaa:1:18:2:3:0:12c:2");
        assert_eq!(m.ip6_prefix.to_string(), "fdaa:1:18:2:3:0:12c:0/112");
        assert_eq!(m.org_prefix.to_string(), "fdaa:1:18::/48");
        assert_eq!(
            host_prefix(0x0001_0018, 0x0002_0003).to_string(),
            "fdaa:1:18:2:3::/80"
        );
        assert_eq!(m.gateway6.to_string(), "fe80::1");
        assert_eq!(m.ip4.to_string(), "172.19.2.89");
        assert_eq!(m.gateway4.to_string(), "172.19.2.88");
        assert_eq!(m.tap, "aloft-m300");
        assert_eq!(m.mac, "52:54:00:00:01:2c");
        assert_eq!(m.dns.to_string(), "fdaa::3");
        assert_eq!(plan(7).host_address().to_string(), "fdaa::7:0:0:1");
        assert_eq!(platform_prefix().to_string(), "fdaa::/48");
    }

    #[test]
    fn guest_config_has_addresses_gateways_mtu_dns_and_hosts() {
        let m = plan(1).machine(5, 1).unwrap();
        let net = m.net_config();
        let addrs: Vec<String> = net.addresses.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["fdaa:0:5:0:1:0:1:2/112", "172.19.0.3/31"]);
        assert_eq!(
            net.gateways,
            vec![IpAddr::from(Ipv4Addr::new(172, 19, 0, 2)), IpAddr::from(GATEWAY6)]
        );
        assert_eq!(net.mtu, Some(1420));
        assert_eq!(m.dns_config().nameservers, vec![IpAddr::from(default_dns())]);
        let hosts = m.etc_hosts();
        assert_eq!(hosts[0].ip, IpAddr::from(m.ip6));
        assert_eq!(hosts[0].names, ["fly-local-6pn"]);
        // The guest's v4 and its gateway share one /31; v6 /112 holds the guest address.
        assert_eq!(u32::from(m.ip4) & !1, u32::from(m.gateway4));
    }

    #[test]
    fn deterministic_and_unique() {
        let p = plan(3);
        assert_eq!(p.machine(9, 77).unwrap(), p.machine(9, 77).unwrap());
        let mut v6 = BTreeSet::new();
        let mut v4 = BTreeSet::new();
        let mut taps = BTreeSet::new();
        let mut macs = BTreeSet::new();
        for slot in (1..=p.max_slot()).step_by(97).chain([p.max_slot()]) {
            let m = p.machine(1, slot).unwrap();
            assert!(v6.insert(m.ip6));
            assert!(v4.insert(m.ip4) && v4.insert(m.gateway4));
            assert!(taps.insert(m.tap.clone()));
            assert!(m.tap.len() <= 15);
            assert!(macs.insert(m.mac.clone()));
        }
        // Same slot, other org or host: other 6PN, same host-local v4.
        let a = p.machine(1, 5).unwrap();
        let b = p.machine(2, 5).unwrap();
        let c = plan(4).machine(1, 5).unwrap();
        assert_ne!(a.ip6, b.ip6);
        assert_ne!(a.ip6, c.ip6);
        assert_ne!(a.org_prefix, b.org_prefix);
        assert_eq!(a.org_prefix, c.org_prefix);
        assert_eq!(a.ip4, b.ip4);
        // The last slot stays inside the pool.
        let last = p.machine(1, p.max_slot()).unwrap();
        assert_eq!(last.ip4, Ipv4Addr::new(172, 19, 255, 255));
    }

    #[test]
    fn bad_input_is_rejected() {
        let p = plan(1);
        assert_eq!(p.machine(0, 1).unwrap_err(), PlanError::ReservedOrg);
        assert!(matches!(p.machine(1, 0), Err(PlanError::SlotOutOfRange { .. })));
        assert!(matches!(
            p.machine(1, 32768),
            Err(PlanError::SlotOutOfRange { max_slot: 32767, .. })
        ));
        let mut c = PlanConfig::new(1);
        for pool in ["172.19.0.1/16", "fdaa::/64", "10.0.0.0/31", "10.0.0.0/4"] {
            c.ipv4_pool = pool.parse().unwrap();
            let e = Plan::new(&c).unwrap_err();
            assert!(matches!(e, PlanError::BadPool { .. }), "{pool}: {e}");
        }
        c = PlanConfig::new(1);
        c.dns = "fd00::3".parse().unwrap();
        assert!(matches!(Plan::new(&c), Err(PlanError::BadDns { .. })));
        c.dns = "fdaa:0:1::3".parse().unwrap();
        assert!(matches!(Plan::new(&c), Err(PlanError::BadDns { .. })));
        c = PlanConfig::new(1);
        c.mtu = 576;
        assert_eq!(
            Plan::new(&c).unwrap_err().to_string(),
            "mtu 576: use 1280 (the IPv6 minimum) to 9000"
        );
        c.mtu = 1500;
        c.ipv4_pool = "10.20.30.0/30".parse().unwrap();
        assert_eq!(Plan::new(&c).unwrap().max_slot(), 1);
    }

    #[test]
    fn machine_nets_from_the_plan_validate_and_edited_ones_do_not() {
        let p = plan(9);
        let m = p.machine(3, 17).unwrap();
        m.validate().unwrap();
        let json = serde_json::to_string(&m).unwrap();
        let back: MachineNet = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        type Edit = fn(&mut MachineNet);
        let edits: [(&str, Edit); 8] = [
            ("tap", |m| m.tap = "eth0".into()),
            ("6PN", |m| m.ip6 = "fdaa:0:3:0:9:0:18:2".parse().unwrap()),
            ("/48", |m| m.org = 4),
            ("/48", |m| m.org_prefix = org_prefix(4)),
            ("fe80::1", |m| m.gateway6 = "fe80::2".parse().unwrap()),
            ("/31", |m| m.gateway4 = Ipv4Addr::new(172, 19, 0, 1)),
            ("mtu", |m| m.mtu = 100),
            ("mac", |m| m.mac = "52:54:00:zz:00:01".into()),
        ];
        for (what, edit) in edits {
            let mut bad = m.clone();
            edit(&mut bad);
            let e = bad.validate().unwrap_err();
            assert!(e.to_string().contains(what), "{what}: {e}");
        }
        let mut zero = m.clone();
        zero.org = 0;
        assert_eq!(zero.validate().unwrap_err(), PlanError::ReservedOrg);
    }

    #[test]
    fn prefix_containment() {
        let n: IpNet = "fdaa:0:1::/48".parse().unwrap();
        assert!(contains(&n, "fdaa:0:1:ffff::1".parse().unwrap()));
        assert!(!contains(&n, "fdaa:0:2::1".parse().unwrap()));
        assert!(!contains(&n, "10.0.0.1".parse().unwrap()));
        let v4: IpNet = "172.19.0.0/16".parse().unwrap();
        assert!(contains(&v4, "172.19.200.1".parse().unwrap()));
        assert!(!contains(&v4, "172.20.0.1".parse().unwrap()));
        assert!(contains(
            &"0.0.0.0/0".parse().unwrap(),
            "1.2.3.4".parse().unwrap()
        ));
    }

    #[test]
    fn allocator_hands_out_frees_and_runs_out() {
        let mut a = SlotAllocator::new(3, SlotState::default()).unwrap();
        assert_eq!(a.allocate("m1").unwrap(), 1);
        assert_eq!(a.allocate("m2").unwrap(), 2);
        assert_eq!(a.allocate("m1").unwrap(), 1, "idempotent per owner");
        assert_eq!(a.allocate("m3").unwrap(), 3);
        let e = a.allocate("m4").unwrap_err();
        assert_eq!(e, PlanError::Exhausted { max_slot: 3 });
        assert!(e.to_string().contains("free a machine's slot"), "{e}");
        assert_eq!(a.free("m2"), Some(2));
        assert_eq!(a.free("m2"), None);
        assert_eq!(a.in_use(), 2);
        assert_eq!(a.allocate("m4").unwrap(), 2);
        assert_eq!(a.slot_of("m4"), Some(2));
    }

    #[test]
    fn allocator_reuses_freed_slots_late_and_round_trips_its_state() {
        let mut a = SlotAllocator::new(100, SlotState::default()).unwrap();
        for i in 0..10 {
            a.allocate(&format!("m{i}")).unwrap();
        }
        a.free("m0");
        // Next fit: slot 1 is free but 11 comes first.
        assert_eq!(a.allocate("n").unwrap(), 11);
        let json = serde_json::to_string(a.state()).unwrap();
        let state: SlotState = serde_json::from_str(&json).unwrap();
        let mut b = SlotAllocator::new(100, state).unwrap();
        assert_eq!(b.slot_of("m5"), Some(6));
        assert_eq!(b.allocate("o").unwrap(), 12);
        // Every owner has a distinct slot.
        let slots: BTreeSet<u32> = b.state().used.keys().copied().collect();
        assert_eq!(slots.len(), b.in_use());
    }

    #[test]
    fn allocator_wraps_and_checks_persisted_state() {
        let mut state = SlotState::default();
        state.used.insert(2, "x".into());
        state.next = 3;
        let mut a = SlotAllocator::new(3, state.clone()).unwrap();
        assert_eq!(a.allocate("y").unwrap(), 3);
        assert_eq!(a.allocate("z").unwrap(), 1, "wraps to the start");
        state.used.insert(9, "far".into());
        assert!(matches!(
            SlotAllocator::new(3, state.clone()),
            Err(PlanError::StateOutOfRange { slot: 9, .. })
        ));
        state.used.remove(&9);
        state.used.insert(1, "x".into());
        assert!(matches!(
            SlotAllocator::new(3, state),
            Err(PlanError::DuplicateOwner { .. })
        ));
    }

    #[test]
    fn config_defaults_from_json() {
        let c: PlanConfig = serde_json::from_str(r#"{"host": 4}"#).unwrap();
        assert_eq!(c, PlanConfig::new(4));
        assert!(serde_json::from_str::<PlanConfig>(r#"{"host": 4, "nope": 1}"#).is_err());
    }
}
