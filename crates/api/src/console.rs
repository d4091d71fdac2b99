//! Interactive sessions in a machine (`aloft ssh console`): a command, optionally on a terminal,
//! whose stdin, stdout and stderr stream between the user and the guest while it runs.
//!
//! aloft's extension to Fly's API (Fly reaches a machine's SSH server over WireGuard; aloft has
//! neither, and needs none: init runs the command, as for `exec`). The client asks
//! `GET /v1/apps/{app}/machines/{id}/console?…` ([`ConsoleQuery`]) with `Connection: upgrade` and
//! `Upgrade: aloft-console` ([`CONSOLE_UPGRADE`]); the server answers `101 Switching Protocols`
//! and both sides then exchange [`ConsoleFrame`]s on the connection until the command exits (the
//! server's last frame is [`ConsoleFrame::Exit`] or [`ConsoleFrame::Error`]) or either side
//! closes it (the command is then killed). An error before the upgrade is a normal Fly error body.
//!
//! The control plane reaches the machine's host through [`crate::MachineHost::console`], which
//! answers a [`ConsoleSession`]. The codec here is sans-IO, shared by server and client.

use std::time::Duration;

use crate::{ApiError, Signal};

/// The `Upgrade` token of a console connection.
pub const CONSOLE_UPGRADE: &str = "aloft-console";
/// Largest frame payload; senders split larger data.
pub const MAX_CONSOLE_PAYLOAD: usize = 64 * 1024;

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// What to run ([`crate::MachineHost::console`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConsoleRequest {
    /// Program and arguments; empty means a shell: `/bin/bash` if the image has it, else
    /// `/bin/sh` (as `fly ssh console`), not a login shell, so the image's `PATH` holds.
    pub argv: Vec<String>,
    /// Run on a pseudo-terminal of this size (stdout and stderr then arrive as stdout); without,
    /// on pipes.
    pub tty: Option<TtySize>,
    /// Extra environment over the workload's (`TERM` from the client's terminal).
    pub env: Vec<(String, String)>,
    /// User (`name`, `uid`, `name:group`, `uid:gid`); the workload's when unset.
    pub user: Option<String>,
}

/// Something the command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// Output on stdout (or the terminal).
    Stdout(Vec<u8>),
    /// Output on stderr (never with a terminal).
    Stderr(Vec<u8>),
    /// It ended; nothing follows.
    Exit(ConsoleExit),
}

/// How a console's command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ConsoleExit {
    /// Exit code when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal number when a signal ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl ConsoleExit {
    /// The exit status a shell would report: the code, or 128 + the signal.
    pub fn status(self) -> i32 {
        match (self.exit_code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 1,
        }
    }
}

/// A running console command on a host. Dropping it before [`ConsoleEvent::Exit`] kills the
/// command. Every method may block briefly; none blocks for long except [`Self::next`], up to
/// its timeout.
pub trait ConsoleSession: Send {
    /// Writes to the command's stdin (or terminal).
    fn stdin(&mut self, data: &[u8]) -> Result<(), ApiError>;
    /// Closes the command's stdin (on a terminal: sends the terminal's EOF character).
    fn close_stdin(&mut self) -> Result<(), ApiError>;
    /// Resizes the terminal (ignored without one).
    fn resize(&mut self, size: TtySize) -> Result<(), ApiError>;
    /// Sends a signal to the command.
    fn signal(&mut self, signal: Signal) -> Result<(), ApiError>;
    /// The next event, waiting up to `timeout`: `Ok(None)` when none came in time. After
    /// [`ConsoleEvent::Exit`] it answers an error.
    fn next(&mut self, timeout: Duration) -> Result<Option<ConsoleEvent>, ApiError>;
}

/// `GET …/console` query: `cmd` (repeated: one argv element each; none: a shell), `tty`
/// (`true` for a terminal), `rows` and `cols` (its size, default 24×80), `term` (the client's
/// `TERM`), `user`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConsoleQuery {
    /// The request it stands for.
    pub request: ConsoleRequest,
}

impl ConsoleQuery {
    /// Reads the query's pairs; 400 naming a bad one.
    pub fn from_query(pairs: impl IntoIterator<Item = (String, String)>) -> Result<Self, ApiError> {
        let mut req = ConsoleRequest::default();
        let mut tty = false;
        let (mut rows, mut cols) = (24u16, 80u16);
        for (k, v) in pairs {
            match k.as_str() {
                "cmd" => req.argv.push(v),
                "tty" => {
                    tty = match v.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(ApiError::bad_request(format!("tty={v:?}: use true or false"))),
                    }
                }
                "rows" | "cols" => {
                    let n: u16 = v.parse().ok().filter(|n| (1..=1000).contains(n)).ok_or_else(|| {
                        ApiError::bad_request(format!("{k}={v:?}: use a number from 1 to 1000"))
                    })?;
                    if k == "rows" {
                        rows = n;
                    } else {
                        cols = n;
                    }
                }
                "term" => {
                    if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(ApiError::bad_request(format!(
                            "term={v:?}: a terminal type such as xterm-256color"
                        )));
                    }
                    req.env.push(("TERM".to_owned(), v));
                }
                "user" => req.user = Some(v),
                _ => {}
            }
        }
        if req.argv.iter().any(String::is_empty) {
            return Err(ApiError::bad_request("cmd: an argument is empty"));
        }
        if tty {
            req.tty = Some(TtySize { rows, cols });
        }
        Ok(Self { request: req })
    }

    /// The query string for `req` (what a client sends).
    pub fn to_query(req: &ConsoleRequest) -> String {
        let mut q = form_pairs(req.argv.iter().map(|a| ("cmd", a.as_str())));
        if let Some(size) = req.tty {
            let (rows, cols) = (size.rows.to_string(), size.cols.to_string());
            q.push_str(&form_pairs([
                ("tty", "true"),
                ("rows", rows.as_str()),
                ("cols", cols.as_str()),
            ]));
        }
        for (k, v) in &req.env {
            if k == "TERM" {
                q.push_str(&form_pairs([("term", v.as_str())]));
            }
        }
        if let Some(u) = &req.user {
            q.push_str(&form_pairs([("user", u.as_str())]));
        }
        q.trim_start_matches('&').to_owned()
    }
}

/// `&k=v` for each pair, percent-encoded.
fn form_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        out.push('&');
        out.push_str(k);
        out.push('=');
        for b in v.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// One message on an upgraded console connection. Wire form: `kind: u8` · `len: u32` big-endian
/// · `len` bytes of payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleFrame {
    // ---- client → server ----
    /// Bytes for stdin (kind 0); at most [`MAX_CONSOLE_PAYLOAD`].
    Stdin(Vec<u8>),
    /// Stdin is closed (kind 1, empty payload).
    Eof,
    /// The terminal's new size (kind 2: rows, cols as u16 big-endian).
    Resize(TtySize),
    /// A signal for the command (kind 3: the signal number as i32 big-endian).
    Signal(i32),
    // ---- server → client ----
    /// Output on stdout or the terminal (kind 16).
    Stdout(Vec<u8>),
    /// Output on stderr (kind 17).
    Stderr(Vec<u8>),
    /// The command ended (kind 18: [`ConsoleExit`] as JSON); the last frame.
    Exit(ConsoleExit),
    /// The session failed (kind 19: UTF-8 message); the last frame.
    Error(String),
}

/// Why bytes are not a console frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsoleFrameError {
    /// An unknown kind byte.
    #[error("unknown console frame kind {0}")]
    UnknownKind(u8),
    /// A payload over [`MAX_CONSOLE_PAYLOAD`].
    #[error("console frame of {0} bytes is over the limit of {MAX_CONSOLE_PAYLOAD}")]
    TooLarge(usize),
    /// A payload that does not fit its kind.
    #[error("malformed console frame of kind {kind}: {reason}")]
    Malformed {
        /// The kind.
        kind: u8,
        /// What is wrong.
        reason: String,
    },
}

impl ConsoleFrame {
    const HEADER: usize = 5;

    /// Appends the frame's wire form to `out`. Payloads over [`MAX_CONSOLE_PAYLOAD`] are the
    /// caller's to split (see [`Self::chunks`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (kind, payload): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            Self::Stdin(d) => (0, d.as_slice().into()),
            Self::Eof => (1, (&[][..]).into()),
            Self::Resize(s) => {
                let mut p = Vec::with_capacity(4);
                p.extend_from_slice(&s.rows.to_be_bytes());
                p.extend_from_slice(&s.cols.to_be_bytes());
                (2, p.into())
            }
            Self::Signal(s) => (3, s.to_be_bytes().to_vec().into()),
            Self::Stdout(d) => (16, d.as_slice().into()),
            Self::Stderr(d) => (17, d.as_slice().into()),
            Self::Exit(e) => (18, serde_json::to_vec(e).unwrap_or_default().into()),
            Self::Error(m) => (19, m.as_bytes().into()),
        };
        out.push(kind);
        out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&payload);
    }

    /// Data frames of at most [`MAX_CONSOLE_PAYLOAD`] each, made by `make` from `data`'s chunks.
    pub fn chunks(data: &[u8], make: fn(Vec<u8>) -> Self) -> impl Iterator<Item = Self> + '_ {
        data.chunks(MAX_CONSOLE_PAYLOAD).map(move |c| make(c.to_vec()))
    }

    /// The first frame in `buf` and its length in bytes, or `Ok(None)` when `buf` holds only
    /// part of one (read more and call again).
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, ConsoleFrameError> {
        let Some(header) = buf.get(..Self::HEADER) else {
            return Ok(None);
        };
        let kind = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > MAX_CONSOLE_PAYLOAD {
            return Err(ConsoleFrameError::TooLarge(len));
        }
        let Some(payload) = buf.get(Self::HEADER..Self::HEADER + len) else {
            return Ok(None);
        };
        let malformed = |reason: &str| ConsoleFrameError::Malformed {
            kind,
            reason: reason.to_owned(),
        };
        let frame = match kind {
            0 => Self::Stdin(payload.to_vec()),
            1 => Self::Eof,
            2 => match payload {
                [r0, r1, c0, c1] => Self::Resize(TtySize {
                    rows: u16::from_be_bytes([*r0, *r1]),
                    cols: u16::from_be_bytes([*c0, *c1]),
                }),
                _ => return Err(malformed("a resize is 4 bytes")),
            },
            3 => match payload {
                [a, b, c, d] => Self::Signal(i32::from_be_bytes([*a, *b, *c, *d])),
                _ => return Err(malformed("a signal is 4 bytes")),
            },
            16 => Self::Stdout(payload.to_vec()),
            17 => Self::Stderr(payload.to_vec()),
            18 => Self::Exit(serde_json::from_slice(payload).map_err(|e| malformed(&e.to_string()))?),
            19 => Self::Error(String::from_utf8_lossy(payload).into_owned()),
            k => return Err(ConsoleFrameError::UnknownKind(k)),
        };
        Ok(Some((frame, Self::HEADER + len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_whole_and_in_pieces() {
        let frames = [
            ConsoleFrame::Stdin(b"ls -l\n".to_vec()),
            ConsoleFrame::Eof,
            ConsoleFrame::Resize(TtySize { rows: 40, cols: 120 }),
            ConsoleFrame::Signal(2),
            ConsoleFrame::Stdout(vec![0, 255, 10]),
            ConsoleFrame::Stderr(Vec::new()),
            ConsoleFrame::Exit(ConsoleExit {
                exit_code: Some(3),
                signal: None,
            }),
            ConsoleFrame::Error("the machine stopped".into()),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        // Whole.
        let mut at = 0;
        for f in &frames {
            let (got, n) = ConsoleFrame::decode(&wire[at..]).unwrap().unwrap();
            assert_eq!(&got, f);
            at += n;
        }
        assert_eq!(at, wire.len());
        // Every prefix of the first frame is incomplete, not an error.
        let mut first = Vec::new();
        frames[0].encode(&mut first);
        for end in 0..first.len() {
            assert_eq!(ConsoleFrame::decode(&first[..end]).unwrap(), None, "{end}");
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        assert_eq!(
            ConsoleFrame::decode(&[9, 0, 0, 0, 0]).unwrap_err(),
            ConsoleFrameError::UnknownKind(9)
        );
        assert!(matches!(
            ConsoleFrame::decode(&[0, 0, 2, 0, 0]).unwrap_err(),
            ConsoleFrameError::TooLarge(_)
        ));
        assert!(matches!(
            ConsoleFrame::decode(&[2, 0, 0, 0, 1, 7]).unwrap_err(),
            ConsoleFrameError::Malformed { kind: 2, .. }
        ));
        assert!(matches!(
            ConsoleFrame::decode(&[18, 0, 0, 0, 1, b'x']).unwrap_err(),
            ConsoleFrameError::Malformed { kind: 18, .. }
        ));
        let big = vec![7u8; MAX_CONSOLE_PAYLOAD * 2 + 1];
        let parts: Vec<_> = ConsoleFrame::chunks(&big, ConsoleFrame::Stdin).collect();
        assert_eq!(parts.len(), 3);
    }

    #[test]
    fn queries_round_trip_and_bad_ones_are_named() {
        let req = ConsoleRequest {
            argv: vec!["sh".into(), "-c".into(), "echo a&b =ü".into()],
            tty: Some(TtySize { rows: 50, cols: 132 }),
            env: vec![("TERM".into(), "xterm-256color".into())],
            user: Some("postgres".into()),
        };
        let q = ConsoleQuery::to_query(&req);
        let pairs = q.split('&').map(|p| {
            let (k, v) = p.split_once('=').unwrap();
            let mut bytes = Vec::new();
            let mut it = v.bytes();
            while let Some(b) = it.next() {
                if b == b'%' {
                    let h = [it.next().unwrap(), it.next().unwrap()];
                    bytes.push(u8::from_str_radix(std::str::from_utf8(&h).unwrap(), 16).unwrap());
                } else {
                    bytes.push(b);
                }
            }
            (k.to_owned(), String::from_utf8(bytes).unwrap())
        });
        assert_eq!(ConsoleQuery::from_query(pairs).unwrap().request, req);
        let shell = ConsoleQuery::from_query(Vec::new()).unwrap().request;
        assert_eq!(shell, ConsoleRequest::default());
        let tty = ConsoleQuery::from_query([("tty".to_owned(), "1".to_owned())]).unwrap();
        assert_eq!(tty.request.tty, Some(TtySize { rows: 24, cols: 80 }));
        for (k, v) in [
            ("tty", "maybe"),
            ("rows", "0"),
            ("cols", "x"),
            ("term", "a b"),
            ("cmd", ""),
        ] {
            let e = ConsoleQuery::from_query([(k.to_owned(), v.to_owned())]).unwrap_err();
            assert_eq!(e.status(), 400, "{k}={v}");
        }
        assert_eq!(
            ConsoleExit {
                exit_code: None,
                signal: Some(9)
            }
            .status(),
            137
        );
    }
}
