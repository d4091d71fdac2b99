//! [`HostNet`]: creates, repairs and removes the host side of machines' networks — taps, their
//! addresses and routes, the platform's service link, forwarding, and the elements of aloft's
//! nftables table.
//!
//! Safety rule: the only interfaces touched are `aloft-m<slot>` taps and the `aloft-svc` link;
//! the only nftables table is `inet aloft`. Names are checked before every change.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use aloft_netlink::{Netlink, NetlinkError};

use crate::nft::{self, Elem, Nft};
use crate::plan::{GATEWAY6, MachineNet, Plan, TAP_PREFIX};
use crate::{Namespace, NetError, tap};

/// The link that holds the platform's addresses on this host (the internal DNS address and the
/// host's own 6PN address). A bridge with no ports: always up, available in every kernel.
pub const SERVICE_LINK: &str = "aloft-svc";

/// What [`HostNet::reconcile`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Taps that were not expected, deleted.
    pub removed_taps: Vec<String>,
    /// Expected taps that were missing, created.
    pub created_taps: Vec<String>,
    /// nftables elements that matched no expected machine, deleted.
    pub removed_elements: usize,
    /// nftables elements that were missing, added.
    pub added_elements: usize,
}

impl ReconcileReport {
    /// Whether nothing had to change.
    pub fn is_clean(&self) -> bool {
        self == &Self::default()
    }
}

/// The host side of machines' networks in one network namespace. Clones share one lock: changes
/// made through them happen one at a time (a reconcile never races a create).
#[derive(Debug, Clone)]
pub struct HostNet {
    plan: Plan,
    ns: Namespace,
    tap_owner: Option<u32>,
    forwarding: bool,
    lock: Arc<Mutex<()>>,
}

impl HostNet {
    /// Works in the caller's namespace, taps owned by root, forwarding enabled by [`Self::setup`].
    pub fn new(plan: Plan) -> Self {
        Self {
            plan,
            ns: Namespace::Current,
            tap_owner: None,
            forwarding: true,
            lock: Arc::default(),
        }
    }

    /// Works in `ns` instead (tests; one namespace per simulated host).
    pub fn with_namespace(mut self, ns: Namespace) -> Self {
        self.ns = ns;
        self
    }

    /// Taps are owned by `user` (the jail user, `aloft-vm`), so QEMU may attach after dropping
    /// privileges.
    pub fn with_tap_owner(mut self, user: &str) -> Result<Self, NetError> {
        self.tap_owner = Some(uid_of(user).ok_or_else(|| NetError::UnknownUser {
            user: user.to_owned(),
        })?);
        Ok(self)
    }

    /// Whether [`Self::setup`] turns on IPv4 and IPv6 forwarding for the namespace (default: yes;
    /// off for hosts whose administrator manages it).
    pub fn with_forwarding(mut self, on: bool) -> Self {
        self.forwarding = on;
        self
    }

    /// The plan in use.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Prepares the host once per start (idempotent): the `inet aloft` table with its sets and
    /// rules, the service link with the DNS address and the host's 6PN address, forwarding.
    pub fn setup(&self) -> Result<(), NetError> {
        let _guard = self.lock();
        self.setup_locked()
    }

    fn setup_locked(&self) -> Result<(), NetError> {
        self.nft().apply(&nft::base_script(&self.plan))?;
        let dns = self.plan.dns();
        let host_addr = self.plan.host_address();
        self.netlink(|nl| {
            if nl.find_link(SERVICE_LINK)?.is_none() {
                nl.create_link(SERVICE_LINK, "bridge")?;
            }
            for addr in [dns, host_addr] {
                ignore_exists(nl.add_address(SERVICE_LINK, addr.into(), 128))?;
            }
            nl.set_link_up(SERVICE_LINK, true)
        })
        .map_err(|source| NetError::Configure {
            name: SERVICE_LINK.to_owned(),
            source,
        })?;
        if self.forwarding {
            self.sysctl("net/ipv4/ip_forward", "1")?;
            self.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
        Ok(())
    }

    /// Creates machine `m`'s tap and its addresses, route and nftables elements. Fails if the tap
    /// exists; on any failure removes what it made.
    pub fn add_machine(&self, m: &MachineNet) -> Result<(), NetError> {
        let _guard = self.lock();
        self.add_machine_locked(m)
    }

    fn add_machine_locked(&self, m: &MachineNet) -> Result<(), NetError> {
        check_tap_name(&m.tap)?;
        m.validate()?;
        let exists = self
            .netlink(|nl| nl.find_link(&m.tap))
            .map_err(|source| NetError::Configure {
                name: m.tap.clone(),
                source,
            })?;
        if exists.is_some() {
            return Err(NetError::TapExists { name: m.tap.clone() });
        }
        let owner = self.tap_owner;
        let tap = m.tap.clone();
        self.ns
            .run(move || tap::create_persistent(&tap, owner))
            .map_err(|source| self.ns_error(source))?
            .map_err(|source| NetError::CreateTap {
                name: m.tap.clone(),
                source,
            })?;
        let rest = self
            .configure_tap(m, false)
            .and_then(|()| self.nft().apply(&nft::add_script(&nft::machine_elements(m))));
        if let Err(e) = rest {
            let _ = self.remove_machine_locked(&m.tap);
            return Err(e);
        }
        Ok(())
    }

    /// Removes the tap `tap` and its nftables elements. Idempotent: what is already gone is no
    /// error. Refuses names that are not aloft's taps.
    pub fn remove_machine(&self, tap: &str) -> Result<(), NetError> {
        let _guard = self.lock();
        self.remove_machine_locked(tap)
    }

    fn remove_machine_locked(&self, tap: &str) -> Result<(), NetError> {
        check_tap_name(tap)?;
        let nft = self.nft();
        let mine: Vec<Elem> = nft.elements()?.into_iter().filter(|e| e.tap == tap).collect();
        nft.apply(&nft::delete_script(&mine))?;
        self.netlink(|nl| match nl.find_link(tap)? {
            Some(_) => nl.delete_link(tap),
            None => Ok(()),
        })
        .map_err(|source| NetError::Configure {
            name: tap.to_owned(),
            source,
        })
    }

    /// Makes the namespace match `expected` after a crash or restart: runs [`Self::setup`],
    /// deletes `aloft-m*` taps and elements no expected machine has, creates missing taps, and
    /// re-adds missing addresses, routes and elements on taps that exist (a tap a running QEMU
    /// holds is never recreated). Interfaces not named `aloft-m*` are left alone.
    pub fn reconcile(&self, expected: &[MachineNet]) -> Result<ReconcileReport, NetError> {
        let _guard = self.lock();
        let mut want_taps = BTreeSet::new();
        for m in expected {
            check_tap_name(&m.tap)?;
            m.validate()?;
            if !want_taps.insert(m.tap.as_str()) {
                return Err(NetError::DuplicateTap { name: m.tap.clone() });
            }
        }
        self.setup_locked()?;
        let mut report = ReconcileReport::default();
        let present = self.taps_locked()?;
        for name in &present {
            if !want_taps.contains(name.as_str()) {
                self.remove_machine_locked(name)?;
                report.removed_taps.push(name.clone());
            }
        }
        let want_elems: BTreeSet<Elem> = expected.iter().flat_map(nft::machine_elements).collect();
        let nft = self.nft();
        let have_elems: BTreeSet<Elem> = nft.elements()?.into_iter().collect();
        let stray: Vec<Elem> = have_elems.difference(&want_elems).cloned().collect();
        nft.apply(&nft::delete_script(&stray))?;
        report.removed_elements = stray.len();
        for m in expected {
            if present.contains(&m.tap) {
                report.added_elements += self.repair_locked(m, &have_elems)?;
            } else {
                self.add_machine_locked(m)?;
                report.created_taps.push(m.tap.clone());
            }
        }
        Ok(report)
    }

    /// Makes machine `m`'s network exist as planned: creates it when its tap is missing (returns
    /// `true`), otherwise repairs the tap in place — addresses, route, elements — and removes
    /// elements of that tap that belong to another machine (an older org, say). Idempotent.
    pub fn ensure_machine(&self, m: &MachineNet) -> Result<bool, NetError> {
        let _guard = self.lock();
        check_tap_name(&m.tap)?;
        m.validate()?;
        if self.taps_locked()?.contains(&m.tap) {
            let nft = self.nft();
            let want = nft::machine_elements(m);
            let have: BTreeSet<Elem> = nft.elements()?.into_iter().filter(|e| e.tap == m.tap).collect();
            let stale: Vec<Elem> = have.iter().filter(|e| !want.contains(e)).cloned().collect();
            nft.apply(&nft::delete_script(&stale))?;
            self.repair_locked(m, &have)?;
            Ok(false)
        } else {
            self.add_machine_locked(m)?;
            Ok(true)
        }
    }

    /// Re-adds what is missing on `m`'s existing tap; `have` holds the elements present. Returns
    /// how many elements were added.
    fn repair_locked(&self, m: &MachineNet, have: &BTreeSet<Elem>) -> Result<usize, NetError> {
        self.configure_tap(m, true)?;
        let missing: Vec<Elem> = nft::machine_elements(m)
            .into_iter()
            .filter(|e| !have.contains(e))
            .collect();
        self.nft().apply(&nft::add_script(&missing))?;
        Ok(missing.len())
    }

    /// Removes everything aloft made in this namespace: every `aloft-m*` tap, the service link
    /// and the `inet aloft` table (uninstall, and tests). Forwarding is left as it is.
    pub fn remove_all(&self) -> Result<(), NetError> {
        let _guard = self.lock();
        let nft = self.nft();
        if nft.list_table()?.is_some() {
            nft.apply(&format!("delete table {}\n", nft::TABLE))?;
        }
        self.netlink(|nl| {
            for link in nl.links()? {
                if is_tap_name(&link.name) || link.name == SERVICE_LINK {
                    nl.delete_link(&link.name)?;
                }
            }
            Ok(())
        })
        .map_err(|source| NetError::Configure {
            name: format!("{TAP_PREFIX}*"),
            source,
        })
    }

    /// The `aloft-m*` taps now present.
    pub fn taps(&self) -> Result<Vec<String>, NetError> {
        let _guard = self.lock();
        self.taps_locked()
    }

    fn taps_locked(&self) -> Result<Vec<String>, NetError> {
        Ok(self
            .netlink(|nl| nl.links())
            .map_err(|source| NetError::Configure {
                name: format!("{TAP_PREFIX}*"),
                source,
            })?
            .into_iter()
            .map(|l| l.name)
            .filter(|n| is_tap_name(n))
            .collect())
    }

    /// MTU, host-side addresses (the IPv4 gateway in the `/31`, `fe80::1`), up, and the route to
    /// the machine's `/112`. With `repair`, what already exists is fine.
    fn configure_tap(&self, m: &MachineNet, repair: bool) -> Result<(), NetError> {
        let ok = |r: Result<(), NetlinkError>| if repair { ignore_exists(r) } else { r };
        self.netlink(|nl| {
            nl.set_mtu(&m.tap, m.mtu)?;
            ok(nl.add_address(&m.tap, m.gateway4.into(), 31))?;
            ok(nl.add_address(&m.tap, GATEWAY6.into(), 64))?;
            nl.set_link_up(&m.tap, true)?;
            ok(nl.add_route(&m.tap, m.ip6_prefix.addr, m.ip6_prefix.prefix_len, None))
        })
        .map_err(|source| NetError::Configure {
            name: m.tap.clone(),
            source,
        })
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn nft(&self) -> Nft {
        Nft { ns: self.ns.clone() }
    }

    /// Runs `f` with a netlink socket in the namespace.
    fn netlink<T: Send>(
        &self,
        f: impl FnOnce(&mut Netlink) -> Result<T, NetlinkError> + Send,
    ) -> Result<T, NetlinkError> {
        self.ns
            .run(|| Netlink::open().and_then(|mut nl| f(&mut nl)))
            .unwrap_or_else(|source| Err(NetlinkError::Open { source }))
    }

    /// Writes `/proc/sys/<key>` from inside the namespace (net sysctls are per namespace).
    fn sysctl(&self, key: &str, value: &str) -> Result<(), NetError> {
        let path = format!("/proc/sys/{key}");
        self.ns
            .run(|| std::fs::write(&path, value))
            .map_err(|source| self.ns_error(source))?
            .map_err(|source| NetError::Sysctl {
                key: key.to_owned(),
                source,
            })
    }

    fn ns_error(&self, source: std::io::Error) -> NetError {
        NetError::Namespace {
            ns: self.ns.describe(),
            source,
        }
    }
}

/// Whether `name` is one of aloft's taps: `aloft-m` followed by digits.
pub fn is_tap_name(name: &str) -> bool {
    name.strip_prefix(TAP_PREFIX)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        && name.len() <= 15
}

fn check_tap_name(name: &str) -> Result<(), NetError> {
    if is_tap_name(name) {
        Ok(())
    } else {
        Err(NetError::NotAloftName {
            name: name.to_owned(),
        })
    }
}

/// `EEXIST` is success when repairing.
fn ignore_exists(r: Result<(), NetlinkError>) -> Result<(), NetlinkError> {
    match r {
        Err(
            NetlinkError::AddAddress { ref source, .. } | NetlinkError::AddPrefixRoute { ref source, .. },
        ) if source.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// The uid of `user` from `/etc/passwd`.
fn uid_of(user: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(user)).then(|| f.nth(1)?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names() {
        for ok in ["aloft-m1", "aloft-m32767", "aloft-m12345678"] {
            assert!(is_tap_name(ok), "{ok}");
        }
        for bad in [
            "aloft-m",
            "aloft-svc",
            "tap0",
            "eth0",
            "aloft-m1x",
            "aloft-m123456789",
            "xaloft-m1",
        ] {
            assert!(!is_tap_name(bad), "{bad}");
            assert!(matches!(check_tap_name(bad), Err(NetError::NotAloftName { .. })));
        }
    }

    /// Packets through real taps, without guests: the test attaches to the taps as QEMU would,
    /// writes frames a guest would send, and reads what the host forwards. A forwarded packet (or
    /// the host's neighbour solicitation for its destination) shows up on the destination tap.
    mod dataplane {
        use std::fs::File;
        use std::io::{Read, Write};
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        use std::process::Command;
        use std::time::{Duration, Instant};

        use aloft_testkit::NetNs;

        use crate::plan::PlanConfig;
        use crate::*;

        fn mac(text: &str) -> [u8; 6] {
            let mut m = [0u8; 6];
            for (b, p) in m.iter_mut().zip(text.split(':')) {
                *b = u8::from_str_radix(p, 16).unwrap();
            }
            m
        }

        fn host_mac(ns: &NetNs, dev: &str) -> [u8; 6] {
            let o = Command::new("ip")
                .args(["-j", "-n", &ns.name, "link", "show", "dev", dev])
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            mac(v[0]["address"].as_str().unwrap())
        }

        fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
            let mut f = Vec::new();
            f.extend_from_slice(&dst);
            f.extend_from_slice(&src);
            f.extend_from_slice(&ethertype.to_be_bytes());
            f
        }

        /// An IPv6 packet with no payload (next header 59).
        fn frame6(dst_mac: [u8; 6], src_mac: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
            let mut f = eth(dst_mac, src_mac, 0x86dd);
            f.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, 59, 64]);
            f.extend_from_slice(&src.octets());
            f.extend_from_slice(&dst.octets());
            f
        }

        /// An IPv4 packet with no payload (protocol 253, for experiments).
        fn frame4(dst_mac: [u8; 6], src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
            let mut f = eth(dst_mac, src_mac, 0x0800);
            let mut h = [0u8; 20];
            h[0] = 0x45;
            h[3] = 20;
            h[6] = 0x40;
            h[8] = 64;
            h[9] = 253;
            h[12..16].copy_from_slice(&src.octets());
            h[16..20].copy_from_slice(&dst.octets());
            let sum: u32 = h
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                .sum();
            let folded = (sum & 0xffff) + (sum >> 16);
            let folded = (folded & 0xffff) + (folded >> 16);
            h[10..12].copy_from_slice(&(!u16::try_from(folded).unwrap()).to_be_bytes());
            f.extend_from_slice(&h);
            f
        }

        /// A TCP SYN from `src` to `dst`:`dport` over IPv6.
        fn syn6(dst_mac: [u8; 6], src_mac: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
            let mut tcp = [0u8; 20];
            tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
            tcp[2..4].copy_from_slice(&dport.to_be_bytes());
            tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
            tcp[12] = 5 << 4;
            tcp[13] = 0x02;
            tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
            // Checksum over the pseudo header (addresses, length, next header) and the segment.
            let mut sum: u32 = 20 + 6;
            for w in src
                .octets()
                .chunks(2)
                .chain(dst.octets().chunks(2))
                .chain(tcp.chunks(2))
            {
                sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
            }
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            tcp[16..18].copy_from_slice(&(!u16::try_from(sum).unwrap()).to_be_bytes());
            let mut f = eth(dst_mac, src_mac, 0x86dd);
            f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
            f.extend_from_slice(&src.octets());
            f.extend_from_slice(&dst.octets());
            f.extend_from_slice(&tcp);
            f
        }

        /// The first IPv4 frame out of `tap` addressed to `dst`, within `wait`.
        fn ipv4_to(tap: &mut File, dst: Ipv4Addr, wait: Duration) -> Option<Vec<u8>> {
            let deadline = Instant::now() + wait;
            let mut buf = [0u8; 2048];
            while Instant::now() < deadline {
                match tap.read(&mut buf) {
                    Ok(n) if n >= 34 && buf[12..14] == [8, 0] && buf[30..34] == dst.octets() => {
                        return Some(buf[..n].to_vec());
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            None
        }

        fn drain(tap: &mut File) {
            let mut buf = [0u8; 2048];
            while tap.read(&mut buf).is_ok() {}
        }

        /// Whether a frame containing `needle` comes out of `tap` within `wait`.
        fn seen(tap: &mut File, needle: &[u8], wait: Duration) -> bool {
            let deadline = Instant::now() + wait;
            let mut buf = [0u8; 2048];
            while Instant::now() < deadline {
                match tap.read(&mut buf) {
                    Ok(n) if buf[..n].windows(needle.len()).any(|w| w == needle) => return true,
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            false
        }

        fn octets(a: IpAddr) -> Vec<u8> {
            match a {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            }
        }

        #[test]
        fn same_org_reaches_other_org_and_spoofers_do_not() {
            if !std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .any(|l| l.starts_with("Uid:\t0\t"))
            {
                eprintln!("skipped: needs root to create network namespaces");
                return;
            }
            let ns = NetNs::new().unwrap();
            let plan = Plan::new(&PlanConfig::new(1)).unwrap();
            let net = HostNet::new(plan.clone()).with_namespace(Namespace::Path(ns.path()));
            net.setup().unwrap();
            let a = plan.machine(1, 1).unwrap();
            let b = plan.machine(1, 2).unwrap();
            let c = plan.machine(2, 3).unwrap();
            for m in [&a, &b, &c] {
                net.add_machine(m).unwrap();
            }
            // tap0 (the fixture's, addressed 172.30.0.1/30) stands in for the uplink: routes to an
            // "internet" behind it, and a known neighbour there so forwarded packets go straight out.
            for args in [
                &["route", "add", "10.99.0.0/24", "dev", "tap0"][..],
                &["-6", "route", "add", "2001:db8::/64", "dev", "tap0"],
                &[
                    "neigh",
                    "add",
                    "10.99.0.5",
                    "lladdr",
                    "02:00:00:00:00:99",
                    "dev",
                    "tap0",
                ],
            ] {
                let o = Command::new("ip")
                    .args(["-n", &ns.name])
                    .args(args)
                    .status()
                    .unwrap();
                assert!(o.success(), "{args:?}");
            }
            let names = ["aloft-m1", "aloft-m2", "aloft-m3", "tap0"];
            let mut taps: Vec<File> = Namespace::Path(ns.path())
                .run(|| names.iter().map(|n| crate::tap::attach(n).unwrap()).collect())
                .unwrap();
            std::thread::sleep(Duration::from_millis(300));
            for t in &mut taps {
                drain(t);
            }
            let [ta, tb, tc, uplink] = &mut taps[..] else {
                unreachable!()
            };
            let a_mac = mac(&a.mac);
            let c_mac = mac(&c.mac);
            let gw_a = host_mac(&ns, &a.tap);
            let gw_c = host_mac(&ns, &c.tap);
            let quiet = Duration::from_millis(700);

            // A guest reaches the host for DNS only: a SYN to another port gets no answer (the host
            // would look the guest up to send its RST).
            let dns = plan.dns();
            tc.write_all(&syn6(gw_c, c_mac, c.ip6, dns, 22)).unwrap();
            assert!(
                !seen(tc, &octets(c.ip6.into()), quiet),
                "a guest reached a host port"
            );
            // Org 1 → org 2: dropped.
            ta.write_all(&frame6(gw_a, a_mac, a.ip6, c.ip6)).unwrap();
            assert!(!seen(tc, &octets(c.ip6.into()), quiet), "org 1 reached org 2");
            // Org 2 pretending to be org 1's machine: dropped.
            tc.write_all(&frame6(gw_c, c_mac, a.ip6, b.ip6)).unwrap();
            assert!(
                !seen(tb, &octets(b.ip6.into()), quiet),
                "a spoofed source got through"
            );
            // Machine to machine over the IPv4 pool: dropped.
            ta.write_all(&frame4(gw_a, a_mac, a.ip4, b.ip4)).unwrap();
            assert!(!seen(tb, &octets(b.ip4.into()), quiet), "ipv4 between machines");
            // 6PN is not routed outside fdaa::/16.
            let outside: Ipv6Addr = "2001:db8::1".parse().unwrap();
            ta.write_all(&frame6(gw_a, a_mac, a.ip6, outside)).unwrap();
            assert!(!seen(uplink, &octets(outside.into()), quiet), "6pn left the host");

            // Same org: forwarded (B's tap sees the packet or the host looking B up).
            ta.write_all(&frame6(gw_a, a_mac, a.ip6, b.ip6)).unwrap();
            assert!(
                seen(tb, &octets(b.ip6.into()), Duration::from_secs(3)),
                "same org blocked"
            );
            // DNS on the host: answered (no server here: a RST, after looking the guest up).
            tc.write_all(&syn6(gw_c, c_mac, c.ip6, dns, 53)).unwrap();
            assert!(
                seen(tc, &octets(c.ip6.into()), Duration::from_secs(3)),
                "dns on the host is unreachable"
            );
            // IPv4 egress: forwarded to the uplink, masqueraded behind its address.
            let dest = Ipv4Addr::new(10, 99, 0, 5);
            ta.write_all(&frame4(gw_a, a_mac, a.ip4, dest)).unwrap();
            let out = ipv4_to(uplink, dest, Duration::from_secs(3)).expect("no ipv4 egress");
            assert_eq!(out[26..30], [172, 30, 0, 1], "source not masqueraded: {out:?}");
            drop(taps);
            net.remove_all().unwrap();
        }
    }

    #[test]
    fn uid_lookup() {
        assert_eq!(uid_of("root"), Some(0));
        assert_eq!(uid_of("no-such-user-here"), None);
    }
}
