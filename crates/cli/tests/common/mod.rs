//! What the CLI's integration tests share: where the real `aloftd` is, and a free port for it.

#![allow(dead_code, reason = "each test file uses part of it")]
#![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

use std::path::PathBuf;

/// `$ALOFTD_BIN`, else `aloftd` in the directory above this test's `deps/`. `aloftd` is a
/// binary of another package, so Cargo does not build it for aloft-cli's tests.
pub(crate) fn aloftd_bin() -> PathBuf {
    let bin = match std::env::var_os("ALOFTD_BIN").filter(|b| !b.is_empty()) {
        Some(bin) => PathBuf::from(bin),
        None => {
            let exe = std::env::current_exe().unwrap();
            let mut dir = exe.parent().unwrap();
            if dir.ends_with("deps") {
                dir = dir.parent().unwrap();
            }
            dir.join("aloftd")
        }
    };
    assert!(
        bin.is_file(),
        "aloftd is not built ({} is missing): this test runs the real daemon, which Cargo \
         does not build for aloft-cli's tests. Build the workspace first \
         (`cargo build --workspace`) or set ALOFTD_BIN to an aloftd binary",
        bin.display()
    );
    bin
}

/// A loopback port nothing listens on right now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
