//! Init's own lines on the serial console (fd 1, which the kernel opened on `/dev/console`).
//! Kept few: serial output is slow under emulation.

use std::io::Write;

/// One line, flushed; errors ignored (there is nowhere else to report them).
pub(crate) fn line(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}");
    let _ = out.flush();
}

/// A diagnostic line, prefixed `aloft-init: `.
pub(crate) fn diag(s: &str) {
    line(&format!("aloft-init: {s}"));
}
