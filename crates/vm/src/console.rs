//! Reading the serial console log: init's markers (the exit status when the channel missed it) and
//! the signs of a guest kernel that failed to boot.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use aloft_guest_proto::{CONSOLE_ERROR_MARKER, CONSOLE_EXIT_MARKER, CONSOLE_HELLO, WorkloadExit};

/// Only the end of a console log is read: markers are printed last, panics are at the end.
const READ_TAIL: u64 = 256 * 1024;

/// What the console says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ConsoleFacts {
    /// Init printed its hello line.
    pub(crate) hello: bool,
    /// The last exit marker's status.
    pub(crate) exit: Option<WorkloadExit>,
    /// The last error marker's message.
    pub(crate) error: Option<String>,
    /// The kernel panicked or ran out of memory before init reported anything.
    pub(crate) boot_failure: bool,
    /// The last few non-empty lines, joined with " | " (for error messages); when the kernel
    /// failed, its first failure line ("Kernel panic - not syncing: …") comes first.
    pub(crate) tail: String,
}

const FAILURE_SIGNS: [&str; 4] = [
    "Kernel panic",
    "Out of memory",
    "not syncing",
    "Initramfs unpacking failed",
];

/// Pure: scans console text.
pub(crate) fn scan(text: &str) -> ConsoleFacts {
    let mut f = ConsoleFacts::default();
    let mut lines: Vec<&str> = Vec::new();
    let mut failure_line = None;
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        if line.contains(CONSOLE_HELLO) {
            f.hello = true;
        }
        if let Some(i) = line.find(CONSOLE_EXIT_MARKER)
            && let Ok(exit) = serde_json::from_str(line[i + CONSOLE_EXIT_MARKER.len()..].trim())
        {
            f.exit = Some(exit);
        }
        if let Some(i) = line.find(CONSOLE_ERROR_MARKER) {
            f.error = Some(line[i + CONSOLE_ERROR_MARKER.len()..].trim().to_owned());
        }
        if FAILURE_SIGNS.iter().any(|s| line.contains(s)) && !f.boot_failure {
            f.boot_failure = true;
            failure_line = Some(line.trim());
        }
        if !line.trim().is_empty() {
            lines.push(line.trim());
        }
    }
    let start = lines.len().saturating_sub(8);
    f.tail = lines[start..].join(" | ");
    if let Some(l) = failure_line
        && !lines[start..].contains(&l)
    {
        f.tail = format!("{l} | … | {}", f.tail);
    }
    f
}

/// Reads the end of the console log (lossy UTF-8; missing file = empty).
pub(crate) fn read_tail(path: &Path) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > READ_TAIL {
        let _ = file.seek(SeekFrom::Start(len - READ_TAIL));
    }
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Scans the console log file.
pub(crate) fn scan_file(path: &Path) -> ConsoleFacts {
    scan(&read_tail(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exit_marker_with_crlf_and_noise() {
        let log = "[    0.1] booting\r\naloft-init: hello\r\nhi\r\n\
                   aloft-init: exit {\"exit_code\":3,\"signal\":null,\"oom_killed\":false,\"requested_stop\":false}\r\n\
                   [    1.0] reboot: Power down\r\n";
        let f = scan(log);
        assert!(f.hello);
        assert_eq!(f.exit.unwrap().exit_code, Some(3));
        assert_eq!(f.error, None);
        assert!(!f.boot_failure);
        assert!(f.tail.ends_with("reboot: Power down"));
    }

    #[test]
    fn finds_error_marker() {
        let f = scan("aloft-init: hello\naloft-init: error: executable not found: /app/x\n");
        assert_eq!(f.error.as_deref(), Some("executable not found: /app/x"));
        assert_eq!(f.exit, None);
    }

    #[test]
    fn garbage_exit_marker_is_ignored() {
        let f = scan("aloft-init: exit {not json\n");
        assert_eq!(f.exit, None);
    }

    #[test]
    fn detects_kernel_panic_and_keeps_tail() {
        let mut log = String::new();
        for i in 0..20 {
            log.push_str(&format!("line {i}\n"));
        }
        log.push_str("Kernel panic - not syncing: System is deadlocked on memory\n");
        let f = scan(&log);
        assert!(f.boot_failure);
        assert!(!f.hello);
        assert_eq!(f.tail.matches(" | ").count(), 7);
        assert!(f.tail.contains("deadlocked on memory"));
        // A panic followed by a long backtrace still names the panic first.
        for i in 0..20 {
            log.push_str(&format!("[ 0.6] trace {i}\n"));
        }
        let f = scan(&log);
        assert!(f.tail.starts_with("Kernel panic - not syncing"), "{}", f.tail);
        assert!(f.tail.ends_with("trace 19"), "{}", f.tail);
    }
}
