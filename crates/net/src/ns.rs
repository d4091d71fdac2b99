//! Where the host-side work happens: the caller's network namespace, or a named one (tests, and
//! later one namespace per simulated host). Work for a named namespace runs on a short-lived thread
//! that joined it; sockets, devices and child processes (`nft`) made there belong to it.
#![expect(unsafe_code, reason = "setns(2) on a thread that ends with the work it runs")]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// The network namespace [`crate::HostNet`] works in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Namespace {
    /// The calling thread's (production: the host's).
    #[default]
    Current,
    /// A named namespace, `/run/netns/NAME`.
    Path(PathBuf),
}

impl Namespace {
    /// Runs `f` in this namespace and returns its result. `Err` when the namespace can't be
    /// entered (or `f` panicked). `f` runs on a thread of its own that ends with it (for a
    /// named namespace), so it may block for as long as it likes.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let Self::Path(path) = self else {
            return Ok(f());
        };
        let ns = File::open(path)?;
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on an open namespace descriptor changes only this thread's network
                // namespace; the thread ends when `f` returns, so nothing else runs in it.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("network namespace worker panicked")))
        })
    }

    /// For messages: `the host namespace` or the path.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Current => "the current network namespace".to_owned(),
            Self::Path(p) => p.display().to_string(),
        }
    }
}
