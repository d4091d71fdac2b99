//! Persistent tap devices through `/dev/net/tun` (not netlink: tun devices are made by ioctl).
//! The only other unsafe code of the crate besides [`crate::ns`].
#![expect(
    unsafe_code,
    reason = "ioctl(2) on /dev/net/tun: TUNSETIFF, TUNSETOWNER, TUNSETPERSIST"
)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

// From linux/if_tun.h: _IOW('T', 202..204, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the rest of the union unused).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq(name: &str) -> io::Result<IfReq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > 15 || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"));
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    Ok(req)
}

/// Opens `/dev/net/tun` and binds it to tap `name`, creating the tap when it does not exist (in
/// the calling thread's network namespace).
fn open_tap(name: &str) -> io::Result<File> {
    let mut req = ifreq(name)?;
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one (same layout and size) and
    // lives across the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &raw mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun)
}

/// Creates tap `name`, persistent (it outlives this call) and, with `owner`, owned by that uid so
/// an unprivileged QEMU may attach to it. The caller checked that no link of that name exists: on
/// an existing tap TUNSETIFF attaches instead of creating. If a step fails the tap is not
/// persistent yet and disappears when the descriptor closes.
pub(crate) fn create_persistent(name: &str, owner: Option<u32>) -> io::Result<()> {
    let tun = open_tap(name)?;
    if let Some(uid) = owner {
        // SAFETY: TUNSETOWNER takes the uid as the integer argument itself.
        if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETOWNER, libc::c_ulong::from(uid)) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: TUNSETPERSIST takes 0 or 1 as the integer argument itself.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches to an existing tap as QEMU does; frames written are received by the host, frames the
/// host sends can be read. Non-blocking.
#[cfg(test)]
pub(crate) fn attach(name: &str) -> io::Result<File> {
    let tun = open_tap(name)?;
    // SAFETY: fcntl F_GETFL/F_SETFL on a descriptor we own.
    let rc = unsafe {
        let flags = libc::fcntl(tun.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(tun.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_ifreq_is_the_kernels_size() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert!(ifreq("").is_err());
        assert!(ifreq("a-name-that-is-too-long").is_err());
        let r = ifreq("aloft-m1").unwrap();
        assert_eq!(&r.name[..9], b"aloft-m1\0");
        assert_eq!(r.flags, IFF_TAP | IFF_NO_PI);
    }
}
