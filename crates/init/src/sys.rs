//! Thin wrappers over the syscalls init needs that std does not offer. This is the only module
//! with unsafe code; everything else calls these safe functions.
#![expect(
    unsafe_code,
    reason = "PID 1 needs raw syscalls: mount, reboot, signalfd, poll, waitpid, kill, terminal and random ioctls"
)]

use std::ffi::{CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

fn cstr(s: impl AsRef<OsStr>) -> io::Result<CString> {
    CString::new(s.as_ref().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Milliseconds since the kernel started (`CLOCK_BOOTTIME`).
pub(crate) fn boot_clock_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec owned by this frame.
    let _ = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) };
    #[expect(clippy::cast_precision_loss, reason = "uptime in ms fits an f64 exactly")]
    let ms = ts.tv_sec as f64 * 1000.0 + ts.tv_nsec as f64 / 1e6;
    ms
}

/// mount(2). `data` is the comma-separated option string.
pub(crate) fn mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = cstr(source)?;
    let target = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call, or null where
    // mount(2) accepts null (fstype for MS_MOVE, data).
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref().map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    })
    .map(drop)
}

/// mknod(2) for a character device.
pub(crate) fn mknod_char(path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let path = cstr(path)?;
    // SAFETY: `path` is a valid C string; makedev/mknod take plain integers.
    check(unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | mode, libc::makedev(major, minor)) }).map(drop)
}

/// Points fds 0, 1 and 2 at `/dev/console` when the kernel could not (no `/dev/console` in the
/// initramfs). Returns whether it had to.
pub(crate) fn ensure_console_fds() -> bool {
    // SAFETY: F_GETFD on a descriptor number only queries it.
    if unsafe { libc::fcntl(1, libc::F_GETFD) } >= 0 {
        return false;
    }
    let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return false;
    };
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, which are closed (checked above) and owned
        // by nobody in this process.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
    true
}

pub(crate) fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, valid for the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

pub(crate) fn sync() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

/// Powers the machine off. Only returns if the kernel refused (not PID 1, no privilege).
pub(crate) fn power_off() -> io::Error {
    // SAFETY: reboot(2) with a constant command; on success it does not return.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    io::Error::last_os_error()
}

/// Blocks `signals` for the process and returns a non-blocking signalfd that reports them.
pub(crate) fn signalfd(signals: &[libc::c_int]) -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for all these calls.
    unsafe {
        libc::sigemptyset(&raw mut set);
        for &s in signals {
            libc::sigaddset(&raw mut set, s);
        }
        check(libc::sigprocmask(
            libc::SIG_BLOCK,
            &raw const set,
            std::ptr::null_mut(),
        ))?;
    }
    // SAFETY: `set` is initialised; -1 asks for a new descriptor.
    let fd = check(unsafe { libc::signalfd(-1, &raw const set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) })?;
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Signal numbers waiting on a signalfd (empty when none).
pub(crate) fn read_signals(fd: BorrowedFd<'_>) -> Vec<i32> {
    let mut out = Vec::new();
    loop {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is valid for writes of `size` bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut info).cast(), size) };
        if usize::try_from(n).ok() != Some(size) {
            return out;
        }
        out.push(i32::try_from(info.ssi_signo).unwrap_or(0));
    }
}

/// poll(2) on `fds`; EINTR counts as "nothing ready".
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the given length.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(e)
        };
    }
    Ok(usize::try_from(rc).unwrap_or(0))
}

/// How a child ended, from its wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Code(i32),
    Signal(i32),
}

/// Reaps one exited child without blocking: `Some((pid, how))`, or `None` when none is waiting.
pub(crate) fn reap_one() -> Option<(i32, Ended)> {
    reap(-1)
}

/// Reaps child `pid` (any child for -1) without blocking.
pub(crate) fn reap(pid: i32) -> Option<(i32, Ended)> {
    let mut status = 0;
    // SAFETY: `status` is a valid out pointer.
    let pid = unsafe { libc::waitpid(pid, &raw mut status, libc::WNOHANG) };
    if pid <= 0 {
        return None;
    }
    let how = if libc::WIFSIGNALED(status) {
        Ended::Signal(libc::WTERMSIG(status))
    } else {
        Ended::Code(libc::WEXITSTATUS(status))
    };
    Some((pid, how))
}

/// Whether init has no children left at all (waitid reports ECHILD).
pub(crate) fn no_children() -> bool {
    // SAFETY: siginfo_t is plain data, and a valid out pointer for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid out pointer; WNOWAIT leaves any zombie to be reaped later.
    let rc = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &raw mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD)
}

/// kill(2); `pid` -1 means every process but init.
pub(crate) fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) takes plain integers.
    check(unsafe { libc::kill(pid, signal) }).map(drop)
}

pub(crate) fn set_realtime(unix_nanos: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(unix_nanos / 1_000_000_000).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::try_from(unix_nanos % 1_000_000_000).unwrap_or(0),
    };
    // SAFETY: `ts` is a valid timespec.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &raw const ts) }).map(drop)
}

/// `_IOC_WRITE` in its place (`asm-generic/ioctl.h`; these architectures have their own).
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const IOC_WRITE: u32 = 1 << 30;
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const IOC_WRITE: u32 = 4 << 29;

/// `RNDADDENTROPY` from `linux/random.h`: `_IOW('R', 0x03, int[2])` (libc lacks it).
const RNDADDENTROPY: u32 = IOC_WRITE | (8 << 16) | ((b'R' as u32) << 8) | 0x03;
/// `RNDRESEEDCRNG` from `linux/random.h`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: u32 = ((b'R' as u32) << 8) | 0x07;

/// The request number as the C library's `ioctl` takes it (`unsigned long` in glibc, `int` in musl).
#[allow(
    clippy::cast_possible_wrap,
    clippy::cast_possible_truncation,
    clippy::cast_lossless,
    reason = "ioctl numbers are 32-bit patterns, whatever type the C library declares"
)]
const fn ioctl_request(n: u32) -> libc::Ioctl {
    n as libc::Ioctl
}

/// A `struct rand_pool_info` (`linux/random.h`) carrying `seed`, credited with 8 bits of entropy
/// per byte, as 32-bit words (the struct's alignment): `int entropy_count` (bits), `int buf_size`
/// (bytes), then the bytes (`__u32 buf[]`), the last word zero-padded. `None` when the counts do
/// not fit an `int`.
pub(crate) fn rand_pool_info(seed: &[u8]) -> Option<Vec<u32>> {
    let bits = i32::try_from(seed.len().checked_mul(8)?).ok()?;
    let bytes = i32::try_from(seed.len()).ok()?;
    let mut words = Vec::with_capacity(2 + seed.len().div_ceil(4));
    words.push(u32::from_ne_bytes(bits.to_ne_bytes()));
    words.push(u32::from_ne_bytes(bytes.to_ne_bytes()));
    for chunk in seed.chunks(4) {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        words.push(u32::from_ne_bytes(w));
    }
    Some(words)
}

/// `RNDADDENTROPY` on `random` (`/dev/urandom`): mixes `seed` into the kernel's input pool and
/// credits 8 bits of entropy per byte. Needs `CAP_SYS_ADMIN`.
pub(crate) fn add_entropy(random: &File, seed: &[u8]) -> io::Result<()> {
    let info = rand_pool_info(seed).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `info` is a complete rand_pool_info, 4-byte aligned, whose buf_size (`seed.len()`)
    // bytes all lie inside the vector; the kernel only reads it during the call.
    check(unsafe { libc::ioctl(random.as_raw_fd(), ioctl_request(RNDADDENTROPY), info.as_ptr()) }).map(drop)
}

/// `RNDRESEEDCRNG` on `random`: the kernel's generator rekeys from the input pool now (Linux
/// 4.17+), so what it returns next depends on what [`add_entropy`] just added. `ENODATA` while the
/// generator is not yet initialised.
pub(crate) fn reseed_crng(random: &File) -> io::Result<()> {
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(random.as_raw_fd(), ioctl_request(RNDRESEEDCRNG)) }).map(drop)
}

pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns; F_GETFL/F_SETFL take plain integers.
    unsafe {
        let flags = check(libc::fcntl(fd, libc::F_GETFL))?;
        check(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
    }
    Ok(())
}

/// A new pseudo-terminal of `rows` × `cols`: the master (close-on-exec, blocking) and the slave
/// (close-on-exec, not a controlling terminal of init). The slave is opened from the master
/// (`TIOCGPTPEER`), so no `/dev/pts` path is looked up.
pub(crate) fn open_pty(rows: u16, cols: u16) -> io::Result<(File, OwnedFd)> {
    let master = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open("/dev/ptmx")?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int through the pointer, which is valid for the call.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &raw const unlock) })?;
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor.
    let fd = check(unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    let slave = unsafe { OwnedFd::from_raw_fd(fd) };
    set_winsize(&master, rows, cols)?;
    Ok((master, slave))
}

/// Sets a terminal's size (on a pty master: the foreground process group gets SIGWINCH).
pub(crate) fn set_winsize(fd: &impl AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize through the pointer, which is valid for the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &raw const ws) }).map(drop)
}

/// The terminal's EOF character (`VEOF`; on a pty master, the slave's settings), `None` when
/// disabled or unreadable.
pub(crate) fn eof_char(fd: &impl AsRawFd) -> Option<u8> {
    // SAFETY: termios is plain data.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid out pointer for tcgetattr.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &raw mut t) } < 0 {
        return None;
    }
    Some(t.c_cc[libc::VEOF]).filter(|&c| c != 0)
}

/// Clock ticks per second (`/proc/PID/stat` times are in these).
pub(crate) fn clock_ticks() -> u64 {
    // SAFETY: sysconf takes a constant name.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// Identity and place the child takes on between fork and exec.
#[derive(Debug, Clone)]
pub(crate) struct Credentials {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) groups: Vec<u32>,
    pub(crate) workdir: String,
}

/// Makes `cmd` start a new session, drop to `cred`, chdir to its working directory and execve
/// `program` with exactly `argv` and `env` in the child (after fork; std reports any failure as the
/// spawn error). The child starts with an empty signal mask and default signal dispositions. With
/// `controlling_tty`, its stdin (a terminal) becomes the new session's controlling terminal.
///
/// A process that is not root and already has `cred`'s uid and gid keeps its identity (nothing to
/// drop to; `setgroups` would fail): the unit tests run this way. Init is root.
///
/// execve is called here rather than by std because std uses execvp, which runs a file without a
/// `#!` line through `/bin/sh` on ENOEXEC; a workload with a bad binary must fail with
/// "Exec format error" instead, as under Docker.
pub(crate) fn prepare_child(
    cmd: &mut Command,
    cred: &Credentials,
    program: &std::path::Path,
    argv: &[String],
    env: &[(String, String)],
    controlling_tty: bool,
) -> io::Result<()> {
    let dir = cstr(&cred.workdir)?;
    let path = cstr(program)?;
    let argv: Vec<CString> = argv.iter().map(cstr).collect::<io::Result<_>>()?;
    let envp: Vec<CString> = env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}")))
        .collect::<io::Result<_>>()?;
    let groups: Vec<libc::gid_t> = cred.groups.clone();
    let (uid, gid) = (cred.uid, cred.gid);
    let hook = move || -> io::Result<()> {
        // Init is single-threaded, so allocating in the forked child cannot deadlock on a lock
        // held by another thread.
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
        envp_ptrs.push(std::ptr::null());
        // SAFETY: runs in the forked child; every pointer refers to a NUL-terminated string owned
        // by this closure, and the pointer arrays are NULL-terminated.
        unsafe {
            // Init blocks the signals it reads from its signalfd and std ignores SIGPIPE; the
            // child starts with an empty mask and default dispositions.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut empty);
            check(libc::sigprocmask(
                libc::SIG_SETMASK,
                &raw const empty,
                std::ptr::null_mut(),
            ))?;
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            check(libc::setsid())?;
            if controlling_tty {
                check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
            }
            if libc::geteuid() == 0 || libc::getuid() != uid || libc::getgid() != gid {
                check(libc::setgroups(groups.len(), groups.as_ptr()))?;
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
            }
            check(libc::chdir(dir.as_ptr()))?;
            libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr());
        }
        Err(io::Error::last_os_error())
    };
    // SAFETY: the hook only makes syscalls on data it owns, in a child of a single-threaded parent.
    unsafe { cmd.pre_exec(hook) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values `linux/random.h` gives on the architectures guests run on.
    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn random_ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
    }

    #[test]
    fn rand_pool_info_layout() {
        let seed: Vec<u8> = (1..=18).collect();
        let words = rand_pool_info(&seed).unwrap();
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(
            bytes.len(),
            8 + 20,
            "two ints, then 18 bytes padded to whole words"
        );
        assert_eq!(bytes[0..4], 144i32.to_ne_bytes(), "entropy_count: 8 bits a byte");
        assert_eq!(bytes[4..8], 18i32.to_ne_bytes(), "buf_size: bytes");
        assert_eq!(bytes[8..26], seed[..]);
        assert_eq!(bytes[26..], [0, 0]);

        let words = rand_pool_info(&[0xab; 32]).unwrap();
        assert_eq!(words.len(), 2 + 8);
        assert_eq!(words[0], 256);
        assert_eq!(words[1], 32);
        assert!(words[2..].iter().all(|w| *w == 0xabab_abab));
        assert_eq!(rand_pool_info(&[]).unwrap(), [0, 0]);
    }
}
