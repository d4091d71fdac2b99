//! The local terminal of an interactive console: its size, and raw mode for as long as the
//! session lasts (restored when the guard drops: on every return, error and unwinding panic).

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use aloft_api::TtySize;
use rustix::termios::{OptionalActions, Termios, tcgetattr, tcgetwinsize, tcsetattr};

/// The largest size the API takes in each direction.
const MAX_CELLS: u16 = 1000;

/// The size of the terminal `fd` is, when it is one and knows its size.
pub(crate) fn size_of(fd: impl AsFd) -> Option<TtySize> {
    let ws = tcgetwinsize(fd).ok()?;
    size_from(ws.ws_row, ws.ws_col)
}

/// A terminal's rows and columns as the API takes them: `None` when unknown (zero), else capped
/// at the API's limit.
pub(crate) fn size_from(rows: u16, cols: u16) -> Option<TtySize> {
    (rows > 0 && cols > 0).then(|| TtySize {
        rows: rows.min(MAX_CELLS),
        cols: cols.min(MAX_CELLS),
    })
}

/// The local terminal's size: stdin's, else stdout's.
pub(crate) fn local_size() -> Option<TtySize> {
    size_of(io::stdin()).or_else(|| size_of(io::stdout()))
}

/// A terminal in raw mode (no line editing, no echo, no signals from keys: Ctrl-C, Ctrl-Z and
/// Ctrl-D are bytes for the remote side); its settings are put back on drop.
#[derive(Debug)]
pub(crate) struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

impl RawMode {
    /// Puts the terminal `fd` is in raw mode (an error when it is not a terminal).
    pub(crate) fn enter(fd: impl AsFd) -> io::Result<Self> {
        let fd = fd.as_fd().try_clone_to_owned()?;
        let saved = tcgetattr(&fd)?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(&fd, OptionalActions::Drain, &raw)?;
        Ok(Self { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Nothing better to do when it fails (the terminal is gone): `reset` fixes the rest.
        let _ = tcsetattr(&self.fd, OptionalActions::Drain, &self.saved);
    }
}

#[cfg(test)]
mod tests {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    use rustix::termios::{LocalModes, Winsize, tcsetwinsize};

    use super::*;

    /// A pseudo-terminal pair: (controller, terminal).
    fn pty() -> (OwnedFd, std::fs::File) {
        let controller = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        grantpt(&controller).unwrap();
        unlockpt(&controller).unwrap();
        let name = ptsname(&controller, Vec::new()).unwrap();
        let terminal = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name.to_str().unwrap())
            .unwrap();
        (controller, terminal)
    }

    #[test]
    fn raw_mode_is_entered_and_restored() {
        let (_controller, terminal) = pty();
        let before = tcgetattr(&terminal).unwrap();
        assert!(
            before
                .local_modes
                .contains(LocalModes::ICANON | LocalModes::ECHO | LocalModes::ISIG)
        );
        {
            let _raw = RawMode::enter(&terminal).unwrap();
            let raw = tcgetattr(&terminal).unwrap();
            assert!(
                !raw.local_modes
                    .intersects(LocalModes::ICANON | LocalModes::ECHO | LocalModes::ISIG)
            );
        }
        let after = tcgetattr(&terminal).unwrap();
        assert_eq!(after.local_modes, before.local_modes);
        assert_eq!(after.input_modes, before.input_modes);
        assert_eq!(after.output_modes, before.output_modes);
        // Not a terminal: an error, nothing changed.
        let file = tempfile::tempfile().unwrap();
        assert!(RawMode::enter(&file).is_err());
        assert_eq!(size_of(&file), None);
    }

    #[test]
    fn sizes_come_from_the_terminal_and_are_capped() {
        let (controller, terminal) = pty();
        let ws = |rows, cols| Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        tcsetwinsize(&controller, ws(50, 132)).unwrap();
        assert_eq!(size_of(&terminal), Some(TtySize { rows: 50, cols: 132 }));
        tcsetwinsize(&controller, ws(0, 0)).unwrap();
        assert_eq!(size_of(&terminal), None);
        assert_eq!(size_from(5000, 80), Some(TtySize { rows: 1000, cols: 80 }));
        assert_eq!(size_from(24, 0), None);
    }
}
