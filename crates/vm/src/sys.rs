//! The few raw system calls the driver needs: detaching QEMU into its own session and cgroup between
//! fork and exec, passing a file descriptor over the QMP socket, sending signals, finding a file's
//! holes and dropping them from the page cache.
#![expect(
    unsafe_code,
    reason = "pre_exec hook, sendmsg with SCM_RIGHTS, kill, lseek(SEEK_DATA) and posix_fadvise have no safe std API"
)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `cmd`'s child start a new session (so it outlives us and our terminal), join the cgroups
/// whose `cgroup.procs` files are `join` (opened for writing by the caller) and inherit `inherit`
/// (same numbers; close-on-exec is cleared in the child only) before exec.
/// With `netns` (an open `/run/netns/NAME`), the child also joins that network namespace.
pub(crate) fn detach_into(cmd: &mut Command, join: Vec<File>, inherit: Vec<OwnedFd>, netns: Option<File>) {
    let hook = move || -> io::Result<()> {
        if let Some(ns) = &netns {
            // SAFETY: `ns` is an open namespace file owned by this closure; setns(2) is a plain
            // syscall, safe between fork and exec, and only affects this (child) process.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        for fd in &inherit {
            // SAFETY: `fd` is open and owned by this closure; fcntl(F_SETFD) is async-signal-safe
            // and only changes this (child) process's descriptor flags.
            if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: setsid has no memory-safety preconditions and is async-signal-safe, as required
        // between fork and exec.
        if unsafe { libc::setsid() } < 0 {
            return Err(io::Error::last_os_error());
        }
        for f in &join {
            // SAFETY: `f` is an open file owned by this closure; the buffer is a valid 1-byte
            // static. write(2) is async-signal-safe. "0" means "the writing process".
            let n = unsafe { libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook only calls async-signal-safe functions (setns, fcntl, setsid, write) and does not
    // allocate (io::Error::last_os_error builds an error from errno without allocating).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Sends `data` with `fd` attached (SCM_RIGHTS) on `stream`.
pub(crate) fn send_with_fd(stream: &UnixStream, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    let fd_len = std::mem::size_of::<libc::c_int>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(u32::try_from(fd_len).unwrap_or(4)) } as usize;
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg_control points at `space` writable, aligned bytes, enough for one cmsghdr with
    // one int (CMSG_SPACE); CMSG_FIRSTHDR returns a pointer inside it; CMSG_DATA points at its
    // payload, which has room for the int. sendmsg only reads `data` through the iovec.
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        if cmsg.is_null() {
            return Err(io::Error::other("no room for the control message"));
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(u32::try_from(fd_len).unwrap_or(4)) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), raw);
        libc::sendmsg(stream.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL)
    };
    let sent = usize::try_from(sent).map_err(|_| io::Error::last_os_error())?;
    if sent < data.len() {
        // The fd went with the first byte; the rest of the command is ordinary data.
        use std::io::Write;
        let mut s = stream;
        s.write_all(&data[sent..])?;
    }
    Ok(())
}

/// Sends `signal` to process `pid`.
pub(crate) fn kill(pid: i32, signal: i32) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: kill has no memory-safety preconditions; pid > 0 targets exactly one process.
    if unsafe { libc::kill(pid, signal) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The holes of `file`'s first `len` bytes, as `(offset, length)` pairs, found with
/// `SEEK_DATA`/`SEEK_HOLE`. A filesystem without hole support reports none.
pub(crate) fn holes(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let seek = |pos: u64, whence| -> io::Result<Option<u64>> {
        let pos = libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: lseek only reads its integer arguments; `file` is open.
        let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after `pos`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(u64::try_from(r).ok())
    };
    let mut holes = Vec::new();
    let mut pos = 0;
    while pos < len {
        let data = seek(pos, libc::SEEK_DATA)?.unwrap_or(len).min(len);
        if data > pos {
            holes.push((pos, data - pos));
        }
        if data >= len {
            break;
        }
        pos = seek(data, libc::SEEK_HOLE)?.unwrap_or(len);
    }
    Ok(holes)
}

/// Asks the kernel to drop `file`'s cached pages in `offset..offset + len` (those no process
/// maps; dirty ones are written first).
pub(crate) fn drop_cache(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let invalid = || io::Error::from(io::ErrorKind::InvalidInput);
    let offset = libc::off_t::try_from(offset).map_err(|_| invalid())?;
    let len = libc::off_t::try_from(len).map_err(|_| invalid())?;
    // SAFETY: posix_fadvise only reads its integer arguments; `file` is open.
    match unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use super::*;

    #[test]
    fn holes_are_the_gaps_between_written_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let mut f = File::create(&path).unwrap();
        f.write_all(&[1; 4096]).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[2; 4096]).unwrap();
        f.set_len(4 << 20).unwrap();
        f.sync_all().unwrap();
        let f = File::open(&path).unwrap();
        assert_eq!(
            holes(&f, 4 << 20).unwrap(),
            [(4096, (1 << 20) - 4096), ((1 << 20) + 4096, (3 << 20) - 4096)]
        );
        // Only the first `len` bytes count.
        assert_eq!(holes(&f, 8192).unwrap(), [(4096, 4096)]);
        assert_eq!(holes(&f, 4096).unwrap(), []);
        drop_cache(&f, 4096, (1 << 20) - 4096).unwrap();
    }
}
