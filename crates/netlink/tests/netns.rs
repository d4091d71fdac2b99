//! Real rtnetlink requests, in a fresh network namespace (never the host's interfaces). Runs only
//! as root; says so and passes otherwise.
#![expect(
    unsafe_code,
    reason = "unshare(2) and geteuid(2) to get a private network namespace"
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
}
