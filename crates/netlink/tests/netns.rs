//! Real rtnetlink requests, in a fresh network namespace (never the host's interfaces). Runs only
//! as root; says so and passes otherwise.
#![expect(
    unsafe_code,
    reason = "unshare(2) and geteuid(2) to get a private network namespace; SIOCGIFHWADDR to read a MAC back"
)]

use aloft_netlink::{Netlink, NetlinkError};

/// Runs `f` on a new thread moved into a new, empty network namespace.
fn in_fresh_netns(f: impl FnOnce() + Send + 'static) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to create a network namespace");
        return false;
    }
    std::thread::spawn(move || {
        // SAFETY: unshare(CLONE_NEWNET) only moves this thread into a new network namespace; the
        // thread ends with the test, so no other code runs in it.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        f();
    })
    .join()
    .expect("netns thread panicked");
    true
}

/// `name`'s MAC address as the calling thread's network namespace sees it (`SIOCGIFHWADDR`; the
/// host's `/sys` shows the host's namespace, not this one).
fn hardware_address(name: &str) -> [u8; 6] {
    // SAFETY: a plain socket(2) call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    // SAFETY: SIOCGIFHWADDR reads the name from and writes the address into `req`, valid for the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SIOCGIFHWADDR,
            &raw mut req,
        )
    };
    assert_eq!(rc, 0, "SIOCGIFHWADDR {name}: {}", std::io::Error::last_os_error());
    // SAFETY: SIOCGIFHWADDR filled the union's sockaddr member.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    std::array::from_fn(|i| u8::from_ne_bytes(data[i].to_ne_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configures_loopback_in_a_private_namespace() {
        in_fresh_netns(|| {
            let mut nl = Netlink::open().unwrap();
            assert_eq!(nl.link_index("lo").unwrap(), 1);
            nl.set_link_up("lo", true).unwrap();
            nl.set_mtu("lo", 1500).unwrap();
            nl.add_address("lo", "10.9.0.2".parse().unwrap(), 24).unwrap();
            nl.add_address("lo", "fd00:9::2".parse().unwrap(), 64).unwrap();
            nl.add_default_route("lo", "10.9.0.1".parse().unwrap()).unwrap();
            // No IPv6 prefix route on loopback, so the gateway is unreachable: the kernel's error comes back.
            let v6 = nl
                .add_default_route("lo", "fd00:9::1".parse().unwrap())
                .unwrap_err();
            assert_eq!(v6.to_string(), "add default route via fd00:9::1 on lo");

            let dup = nl.add_address("lo", "10.9.0.2".parse().unwrap(), 24).unwrap_err();
            assert_eq!(dup.to_string(), "add address 10.9.0.2/24 to lo");
            let NetlinkError::AddAddress { source, .. } = dup else {
                panic!("{dup:?}")
            };
            assert_eq!(source.raw_os_error(), Some(libc::EEXIST));

            let routes = std::fs::read_to_string("/proc/thread-self/net/route").unwrap();
            assert!(
                routes.lines().any(|l| l.starts_with("lo\t00000000\t")),
                "{routes}"
            );
            let missing = nl.set_link_up("eth9", true).unwrap_err();
            assert_eq!(missing.to_string(), "look up interface eth9");
            assert!(nl.delete_link("nosuch0").is_err());
            nl.set_link_up("lo", false).unwrap();
        });
    }

    #[test]
    fn creates_lists_routes_and_deletes_links() {
        in_fresh_netns(|| {
            let mut nl = Netlink::open().unwrap();
            assert_eq!(nl.find_link("link7").unwrap(), None);
            nl.create_link("link7", "bridge").unwrap();
            let index = nl.find_link("link7").unwrap().unwrap();
            let links = nl.links().unwrap();
            assert!(links.iter().any(|l| l.name == "lo" && l.index == 1), "{links:?}");
            assert!(
                links.iter().any(|l| l.name == "link7" && l.index == index),
                "{links:?}"
            );
            let dup = nl.create_link("link7", "bridge").unwrap_err();
            assert_eq!(dup.to_string(), "create bridge link link7");

            nl.set_link_up("link7", true).unwrap();
            nl.add_route("link7", "10.8.0.0".parse().unwrap(), 16, None)
                .unwrap();
            nl.add_route("link7", "fd00:8::".parse().unwrap(), 64, None)
                .unwrap();
            nl.add_address("link7", "10.7.0.1".parse().unwrap(), 24).unwrap();
            nl.add_route(
                "link7",
                "10.6.0.0".parse().unwrap(),
                24,
                Some("10.7.0.2".parse().unwrap()),
            )
            .unwrap();
            let routes = std::fs::read_to_string("/proc/thread-self/net/route").unwrap();
            // 10.8.0.0/16 and 10.6.0.0/24 (via 10.7.0.2), little-endian hex as the kernel prints them
            assert!(routes.contains("link7\t0000080A\t00000000"), "{routes}");
            assert!(routes.contains("link7\t0000060A\t0200070A"), "{routes}");
            let v6 = std::fs::read_to_string("/proc/thread-self/net/ipv6_route").unwrap();
            assert!(
                v6.lines()
                    .any(|l| l.starts_with("fd000008000000000000000000000000 40") && l.ends_with("link7")),
                "{v6}"
            );
            let again = nl
                .add_route("link7", "10.8.0.0".parse().unwrap(), 16, None)
                .unwrap_err();
            assert_eq!(again.to_string(), "add route to 10.8.0.0/16 on link7");

            nl.create_link("br7", "bridge").unwrap();
            nl.delete_link("link7").unwrap();
            nl.delete_link("br7").unwrap();
            assert_eq!(nl.find_link("link7").unwrap(), None);
            assert_eq!(nl.links().unwrap().len(), 1, "only lo is left");
        });
    }

    #[test]
    fn veth_pair_and_a_move_into_another_namespace() {
        in_fresh_netns(|| {
            // A second namespace, held open by its descriptor.
            let other = std::thread::spawn(|| {
                // SAFETY: as in_fresh_netns: this short-lived thread alone enters the namespace.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                assert_eq!(rc, 0);
                std::fs::File::open("/proc/thread-self/ns/net").unwrap()
            })
            .join()
            .unwrap();
            let mut nl = Netlink::open().unwrap();
            nl.create_veth("ve0", "ve1").unwrap();
            let names: Vec<String> = nl.links().unwrap().into_iter().map(|l| l.name).collect();
            assert!(
                names.contains(&"ve0".into()) && names.contains(&"ve1".into()),
                "{names:?}"
            );
            let dup = nl.create_veth("ve0", "ve9").unwrap_err();
            assert_eq!(dup.to_string(), "create veth link ve0");

            nl.move_to_netns("ve1", &other).unwrap();
            assert_eq!(nl.find_link("ve1").unwrap(), None);
            assert!(nl.find_link("ve0").unwrap().is_some());
            let other_again = other.try_clone().unwrap();
            let there = std::thread::spawn(move || {
                // SAFETY: setns on an open namespace descriptor, in a thread that ends right after.
                let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&other), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0);
                let mut nl = Netlink::open().unwrap();
                nl.links()
                    .unwrap()
                    .into_iter()
                    .map(|l| l.name)
                    .collect::<Vec<_>>()
            })
            .join()
            .unwrap();
            assert!(there.contains(&"ve1".into()), "{there:?}");
            let e = nl.move_to_netns("nosuch", &other_again).unwrap_err();
            assert_eq!(e.to_string(), "look up interface nosuch");
            nl.delete_link("ve0").unwrap();
        });
    }

    #[test]
    fn sets_a_mac_address_while_down() {
        in_fresh_netns(|| {
            let mut nl = Netlink::open().unwrap();
            nl.create_link("brmac7", "bridge").unwrap();
            let mac = [0x52, 0x54, 0x00, 0x0a, 0xbc, 0xde];
            nl.set_link_address("brmac7", mac).unwrap();
            assert_eq!(hardware_address("brmac7"), mac);
            // A multicast address is refused by the kernel, and the error names it.
            let e = nl
                .set_link_address("brmac7", [0x01, 0x00, 0x5e, 0, 0, 1])
                .unwrap_err();
            assert_eq!(e.to_string(), "set MAC address 01:00:5e:00:00:01 on brmac7");
            let NetlinkError::SetAddress { source, .. } = e else {
                panic!("{e:?}")
            };
            assert_eq!(source.raw_os_error(), Some(libc::EADDRNOTAVAIL));
            let missing = nl.set_link_address("eth9", mac).unwrap_err();
            assert_eq!(missing.to_string(), "look up interface eth9");
            nl.delete_link("brmac7").unwrap();
        });
    }
}
