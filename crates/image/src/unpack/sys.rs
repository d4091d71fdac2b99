//! The raw system calls layer unpacking needs, each behind a small safe function: `openat2` with
//! `RESOLVE_IN_ROOT`, the `*at` family that never follows a final symlink, extended attributes on an
//! open file, and reading a directory through a descriptor.
//!
//! Every function takes a directory descriptor plus one single path component (or, for
//! [`openat2_in_root`], a relative path the kernel resolves inside the root), so nothing here ever
//! walks a path from `/`.
#![expect(
    unsafe_code,
    reason = "openat2, the *at family, fsetxattr and readdir on a descriptor have no safe std API"
)]

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

/// How often `openat2` is retried when the kernel reports a concurrent rename or mount (`EAGAIN`).
const OPENAT2_RETRIES: usize = 16;

/// A point in time as the kernel stores it: seconds since the epoch (may be negative) and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timestamp {
    pub(crate) secs: i64,
    pub(crate) nanos: u32,
}

impl Timestamp {
    fn to_timespec(self) -> libc::timespec {
        libc::timespec {
            tv_sec: self.secs,
            // nanos < 1e9 always fits.
            tv_nsec: i64::from(self.nanos),
        }
    }
}

/// What `fstatat`/`fstat` told about one inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) mode: u32,
}

impl Stat {
    pub(crate) fn is_dir(self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }

    pub(crate) fn is_symlink(self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFLNK
    }

    fn from_raw(st: &libc::stat) -> Self {
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode,
        }
    }
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Takes ownership of a descriptor a syscall just returned (or reports its error).
fn owned_fd(ret: libc::c_int) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ret` is a fresh descriptor the kernel just returned to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(ret) })
}

/// Opens `path` relative to `root` with `openat2(2)`, resolving every component as if `root` were
/// `/`: `..` stops at `root`, absolute symlinks start from `root`, magic links (`/proc/PID/fd/N`)
/// and mount crossings are refused. The result can never be outside `root`.
pub(crate) fn openat2_in_root(root: BorrowedFd<'_>, path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: open_how is a plain struct of integers; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags =
        u64::try_from(flags | libc::O_CLOEXEC).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;
    let mut tries = 0;
    loop {
        // SAFETY: `path` is NUL-terminated and outlives the call; `how` is a valid open_how and the
        // size passed is its size; `root` is an open descriptor for the duration of the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                path.as_ptr(),
                &raw const how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if ret >= 0 {
            let fd =
                libc::c_int::try_from(ret).map_err(|_| io::Error::other("openat2 returned an invalid fd"))?;
            return owned_fd(fd);
        }
        let err = io::Error::last_os_error();
        let raw = err.raw_os_error();
        if (raw == Some(libc::EAGAIN) || raw == Some(libc::EINTR)) && tries < OPENAT2_RETRIES {
            tries += 1;
            continue;
        }
        return Err(err);
    }
}

/// `openat(2)` of one component `name` inside `dir`; callers pass `O_NOFOLLOW` where it matters.
pub(crate) fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated and outlives the call; `dir` is open. The mode is passed as the
    // variadic argument openat expects (an unsigned int).
    owned_fd(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC, mode) })
}

/// `fstatat(2)` of `name` inside `dir`, never following a symlink at `name`.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Stat> {
    // SAFETY: an all-zero stat is a valid value for the kernel to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated, `st` is a writable stat, `dir` is open.
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &raw mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(Stat::from_raw(&st))
}

/// `fstat(2)` of an open descriptor.
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    // SAFETY: an all-zero stat is a valid value for the kernel to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a writable stat and `fd` is open.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &raw mut st) })?;
    Ok(Stat::from_raw(&st))
}

/// `mkdirat(2)`: creates directory `name` in `dir` (never follows: mkdir fails on any existing name).
pub(crate) fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call; `dir` is open.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })
}

/// `mknodat(2)`: creates a device node or FIFO `name` in `dir` (fails on any existing name).
pub(crate) fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, dev: libc::dev_t) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call; `dir` is open.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) })
}

/// `symlinkat(2)`: creates symlink `name` in `dir` pointing at `target` (the target is only stored).
pub(crate) fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated and outlive the call; `dir` is open.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
}

/// `linkat(2)` without `AT_SYMLINK_FOLLOW`: a new name `new_name` in `new_dir` for the inode at
/// `old_name` in `old_dir` (a symlink there is linked itself, not followed).
pub(crate) fn linkat(
    old_dir: BorrowedFd<'_>,
    old_name: &CStr,
    new_dir: BorrowedFd<'_>,
    new_name: &CStr,
) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated and outlive the call; both descriptors are open.
    check(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old_name.as_ptr(),
            new_dir.as_raw_fd(),
            new_name.as_ptr(),
            0,
        )
    })
}

/// `unlinkat(2)`: removes `name` from `dir` (an empty directory when `dir_entry`); never follows.
pub(crate) fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, dir_entry: bool) -> io::Result<()> {
    let flags = if dir_entry { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `name` is NUL-terminated and outlives the call; `dir` is open.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })
}

/// `fchmod(2)`: sets the mode (including setuid/setgid/sticky) of an open file or directory.
pub(crate) fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: fchmod has no memory-safety preconditions; `fd` is open.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })
}

/// `fchownat(2)` with `AT_SYMLINK_NOFOLLOW`: changes the owner of `name` itself, even a symlink.
pub(crate) fn lchown_at(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call; `dir` is open.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// Changes the mode of `name` in `dir` without following a symlink there: `fchmodat2(2)` with
/// `AT_SYMLINK_NOFOLLOW` (Linux 6.6+), or on older kernels `fchmodat` after checking that `name` is
/// not a symlink (the caller is the only writer of the tree, so the check cannot go stale).
pub(crate) fn lchmod_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call; `dir` is open; the arguments match
    // fchmodat2(int dirfd, const char *path, mode_t mode, unsigned int flags).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            mode,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    if lstat_at(dir, name)?.is_symlink() {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    // SAFETY: `name` is NUL-terminated and outlives the call; `dir` is open; `name` is not a
    // symlink (checked just above), so following is irrelevant.
    check(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) })
}

/// `utimensat(2)` with `AT_SYMLINK_NOFOLLOW`: sets the times of `name` itself, even a symlink.
pub(crate) fn set_times_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    atime: Timestamp,
    mtime: Timestamp,
) -> io::Result<()> {
    let times = [atime.to_timespec(), mtime.to_timespec()];
    // SAFETY: `times` is an array of two timespecs as utimensat requires; `name` is NUL-terminated
    // and outlives the call; `dir` is open.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// `futimens(3)`: sets the times of an open file or directory.
pub(crate) fn set_times(fd: BorrowedFd<'_>, atime: Timestamp, mtime: Timestamp) -> io::Result<()> {
    let times = [atime.to_timespec(), mtime.to_timespec()];
    // SAFETY: `times` is an array of two timespecs as futimens requires; `fd` is open.
    check(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) })
}

/// `fsetxattr(2)`: sets extended attribute `name` on an open (non-`O_PATH`) file or directory.
pub(crate) fn set_xattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; `value` points at `value.len()` readable bytes; both outlive
    // the call; `fd` is open.
    check(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

/// The effective user id of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Names in directory `dir` (which may be an `O_PATH` descriptor), without `.` and `..`.
pub(crate) fn read_dir_names(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    // A fresh open file description, so this read neither depends on nor moves `dir`'s offset.
    let fresh = openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let raw = fresh.into_raw_fd();
    // SAFETY: `raw` is an open directory descriptor we own; on success fdopendir takes it over (closedir
    // closes it), on failure it stays ours and is closed right below.
    let stream = unsafe { libc::fdopendir(raw) };
    if stream.is_null() {
        let err = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `raw` is still ours; wrapping it closes it on drop.
        drop(unsafe { OwnedFd::from_raw_fd(raw) });
        return Err(err);
    }
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: __errno_location returns this thread's errno slot; clearing it lets us tell the end
        // of the stream (NULL, errno 0) from an error (NULL, errno set).
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is a valid DIR* from fdopendir, not yet closed.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            let err = io::Error::last_os_error();
            break if err.raw_os_error() == Some(0) {
                Ok(())
            } else {
                Err(err)
            };
        }
        // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated; it stays valid until
        // the next readdir/closedir, and we copy it out before either.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        let bytes = name.to_bytes();
        if bytes != b"." && bytes != b".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: `stream` is valid and closed exactly once; this also closes `raw`.
    unsafe { libc::closedir(stream) };
    result.map(|()| names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn in_root_resolution_is_clamped_to_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root_path = tmp.path().join("root");
        std::fs::create_dir_all(root_path.join("inside")).unwrap();
        std::os::unix::fs::symlink("../../..", root_path.join("up")).unwrap();
        std::os::unix::fs::symlink("/", root_path.join("slash")).unwrap();
        let root = std::fs::File::open(&root_path).unwrap();
        for path in [c"up", c"slash", c"up/up/up", c"slash/inside/../.."] {
            let fd = openat2_in_root(root.as_fd(), path, libc::O_PATH | libc::O_DIRECTORY).unwrap();
            let st = fstat(fd.as_fd()).unwrap();
            let root_st = fstat(root.as_fd()).unwrap();
            assert_eq!(
                (st.dev, st.ino),
                (root_st.dev, root_st.ino),
                "{path:?} resolved outside the root"
            );
        }
    }

    #[test]
    fn read_dir_names_lists_entries_twice() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a"), b"").unwrap();
        std::fs::create_dir(tmp.path().join("b")).unwrap();
        let dir = std::fs::File::open(tmp.path()).unwrap();
        for _ in 0..2 {
            let mut names = read_dir_names(dir.as_fd()).unwrap();
            names.sort();
            assert_eq!(names, vec![c"a".to_owned(), c"b".to_owned()]);
        }
    }
}
