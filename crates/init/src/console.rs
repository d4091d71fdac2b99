//! Init's own lines on the serial console (fd 1, which the kernel opened on `/dev/console`).
//! Kept few: serial output is slow under emulation.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static TRACE: AtomicBool = AtomicBool::new(false);

/// Turns boot-step tracing on (the kernel command line had `aloft.trace=1`).
pub(crate) fn enable_trace() {
    TRACE.store(true, Ordering::Relaxed);
}

/// With tracing on, a line `aloft-init: +<ms since kernel start>ms <step>`.
pub(crate) fn trace(step: &str) {
    if TRACE.load(Ordering::Relaxed) {
        line(&format!(
            "aloft-init: +{:.1}ms {step}",
            crate::sys::boot_clock_ms()
        ));
    }
}

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
