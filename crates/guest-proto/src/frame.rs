//! Frames on the host↔guest channel and their sans-IO codec.
//!
//! Wire format, little-endian: `len: u32` (bytes after this field) · `tag: u8` · `chan: u32` ·
//! payload. Control payloads are JSON; data payloads (logs, exec output, stdin) are one stream byte
//! followed by raw bytes, so output is never re-encoded.
//!
//! `chan` names an exec session or a request (chosen by the host, never 0); frames about the workload
//! use `chan = 0`.

use serde::{Deserialize, Serialize};

/// Largest frame accepted, header included. Senders split data into chunks well below it.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Size of `tag` + `chan`.
const HEADER_AFTER_LEN: usize = 5;

/// Version of the channel protocol init speaks, reported in [`GuestStatus::protocol`]; a host
/// sends a frame only to an init whose version knows it (an unknown tag makes init drop what it
/// received).
///
/// * 0: hello, exec (pipes), stdin, signal, stop, process list, set time.
/// * 1: [`ExecRequest::tty`], [`Frame::Resize`], [`Frame::Credit`].
/// * 2: [`Frame::Sync`] / [`Frame::Synced`].
/// * 3: boots from a template ([`crate::TEMPLATE_CMDLINE_FLAG`]): [`GuestStatus::awaiting_boot`]
///   and [`Frame::Boot`].
pub const PROTOCOL_VERSION: u32 = 3;

/// Output stream of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataStream {
    Stdout = 1,
    Stderr = 2,
}

impl DataStream {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Stdout),
            2 => Some(Self::Stderr),
            _ => None,
        }
    }
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// A command to run inside the running guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Extra variables over the workload's environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; the workload's when unset.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// User (`name`, `uid`, `name:group`, `uid:gid`); the workload's when unset.
    #[serde(default)]
    pub user: Option<String>,
    /// When true the host sends [`Frame::Stdin`] frames (empty data closes stdin); otherwise stdin
    /// is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size: it is the command's stdin, stdout and stderr (all
    /// output arrives as [`DataStream::Stdout`]) and its controlling terminal; the command leads
    /// its own session. Stdin frames are always accepted then, whatever `stdin` says. `TERM`
    /// defaults to `xterm` when `env` has none. Needs [`PROTOCOL_VERSION`] 1 (an older init ignores
    /// the field and runs the command on pipes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
}

/// How an exec'd command ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecExit {
    /// Exit code when it exited.
    pub exit_code: Option<i32>,
    /// Signal number when a signal ended it.
    pub signal: Option<i32>,
}

/// How the workload (the machine's main process) ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadExit {
    /// Exit code when it exited.
    pub exit_code: Option<i32>,
    /// Signal number when a signal ended it.
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it.
    pub oom_killed: bool,
    /// It ended after a stop the host asked for.
    pub requested_stop: bool,
}

/// The workload as init sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum WorkloadState {
    /// Init is still preparing (mounts, network, user).
    Starting,
    /// The workload was exec'd.
    Running { pid: i32 },
    /// The workload ended; the guest powers off next.
    Exited { exit: WorkloadExit },
    /// The workload could not be started; `message` says why ("executable not found: /app/x").
    Failed { message: String },
}

/// Sent by init when the host says hello and whenever the workload's state changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    pub workload: WorkloadState,
    /// Guest's monotonic clock in milliseconds since boot.
    pub uptime_ms: u64,
    /// Workload output bytes dropped because the host was away and the buffer was full.
    #[serde(default)]
    pub dropped_log_bytes: u64,
    /// The channel protocol init speaks ([`PROTOCOL_VERSION`]; 0 from an init that predates it).
    #[serde(default)]
    pub protocol: u32,
    /// Init booted as a template ([`crate::TEMPLATE_CMDLINE_FLAG`]) and waits for
    /// [`Frame::Boot`] before it does anything else: the moment a host snapshots it, and the
    /// state a VM restored from that snapshot is in.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub awaiting_boot: bool,
}

/// What a VM restored from a template needs to become one machine ([`Frame::Boot`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRequest {
    /// The machine's run config: what a cold boot reads from [`crate::RUN_CONFIG_PATH`].
    pub config: crate::RunConfig,
    /// The host's wall clock when sent: the template's clock stopped when it was snapshotted.
    pub unix_nanos: u64,
    /// Fresh random bytes from the host (32) that init mixes into the kernel's entropy pool and
    /// reseeds its generator from: every VM restored from one template starts with the same
    /// generator state, and must not go on producing the same numbers.
    pub seed: Vec<u8>,
    /// The machine's MAC address for `eth0` (`52:54:00:…`); the template's device has the MAC
    /// of the VM it was made from.
    #[serde(default)]
    pub mac: Option<String>,
}

/// A listening socket of a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenSocket {
    /// `tcp` or `udp`.
    pub proto: String,
    /// `0.0.0.0:8080`, `[::]:8080`, `127.0.0.1:3000`.
    pub address: String,
}

/// One process in the guest (shape of Fly's `ps`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: i32,
    pub ppid: i32,
    pub user: String,
    /// Executable name (`/proc/PID/comm`).
    pub command: String,
    pub cmdline: Vec<String>,
    /// Working directory, when readable.
    pub directory: String,
    pub rss_kib: u64,
    /// CPU time used, user + system, in milliseconds.
    pub cpu_ms: u64,
    pub listen_sockets: Vec<ListenSocket>,
}

/// One message on the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    // ---- host → guest ----
    /// The host (re)connected; init answers with [`Frame::Status`] and flushes buffered logs.
    Hello,
    /// Start an exec session `chan`.
    Exec {
        chan: u32,
        req: ExecRequest,
    },
    /// Bytes for session `chan`'s stdin; empty closes it (on a terminal: writes the terminal's
    /// EOF character, `^D`, and the terminal stays open).
    Stdin {
        chan: u32,
        data: Vec<u8>,
    },
    /// Send `signal` to the workload (`chan = 0`) or to session `chan`'s process (on a terminal:
    /// to its process group).
    Signal {
        chan: u32,
        signal: i32,
    },
    /// Session `chan`'s terminal has a new size (the command gets SIGWINCH). Ignored for a session
    /// without a terminal. Protocol 1.
    Resize {
        chan: u32,
        rows: u16,
        cols: u16,
    },
    /// Flow control of session `chan`'s output: init may send `bytes` more of it (stdout and
    /// stderr together) in [`Frame::ExecOutput`]. A session is unlimited until its first credit,
    /// which counts from the session's start: a host that sends [`Frame::Exec`] and then a credit
    /// of W holds at most W bytes of that session's output it has not yet handed on and credited
    /// back. Credit for an unknown session is ignored. A [`Frame::Hello`] lifts the limit of the
    /// sessions running then (their credit came from a host that is gone). Protocol 1.
    Credit {
        chan: u32,
        bytes: u32,
    },
    /// Graceful stop: send `signal` (the run config's stop signal when `None`) to the workload, wait
    /// up to `timeout_ms`, then SIGKILL it; init reports the exit and powers off.
    Stop {
        signal: Option<i32>,
        timeout_ms: u64,
    },
    /// Ask for the process list; the answer comes as [`Frame::Processes`] on the same `chan`.
    ListProcesses {
        chan: u32,
    },
    /// Set the guest's wall clock (after resume from a snapshot the guest's clock is stale).
    SetTime {
        unix_nanos: u64,
    },
    /// Ask init to write the guest's dirty page cache back to its disks (`sync(2)`), e.g. before
    /// the host snapshots a volume; the answer comes as [`Frame::Synced`] on the same `chan`.
    /// Needs [`PROTOCOL_VERSION`] 2: an older init fails to decode the tag and drops the channel,
    /// so a host must never send it to one.
    Sync {
        chan: u32,
    },
    /// Turn a guest restored from a template into a machine: init, waiting since the template
    /// was made ([`GuestStatus::awaiting_boot`]), sets the clock, reseeds the kernel's random
    /// generator, sets `eth0`'s MAC and then boots as from [`crate::RUN_CONFIG_PATH`]. Needs
    /// [`PROTOCOL_VERSION`] 3; only an init that reported `awaiting_boot` acts on it (any other
    /// ignores it).
    Boot(Box<BootRequest>),

    // ---- guest → host ----
    Status(GuestStatus),
    /// Workload output.
    Log {
        stream: DataStream,
        data: Vec<u8>,
    },
    ExecStarted {
        chan: u32,
        pid: i32,
    },
    ExecOutput {
        chan: u32,
        stream: DataStream,
        data: Vec<u8>,
    },
    ExecExited {
        chan: u32,
        exit: ExecExit,
    },
    Processes {
        chan: u32,
        processes: Vec<ProcessInfo>,
    },
    /// The answer to [`Frame::Sync`]: the guest's data has been written back.
    Synced {
        chan: u32,
    },
    /// A request on `chan` failed (exec of a missing program, signal to an unknown session, …).
    Error {
        chan: u32,
        message: String,
    },
}

mod tag {
    pub(super) const HELLO: u8 = 1;
    pub(super) const EXEC: u8 = 2;
    pub(super) const STDIN: u8 = 3;
    pub(super) const SIGNAL: u8 = 4;
    pub(super) const STOP: u8 = 5;
    pub(super) const LIST_PROCESSES: u8 = 6;
    pub(super) const SET_TIME: u8 = 7;
    pub(super) const RESIZE: u8 = 8;
    pub(super) const CREDIT: u8 = 9;
    pub(super) const SYNC: u8 = 10;
    pub(super) const BOOT: u8 = 11;
    pub(super) const STATUS: u8 = 64;
    pub(super) const LOG: u8 = 65;
    pub(super) const EXEC_STARTED: u8 = 66;
    pub(super) const EXEC_OUTPUT: u8 = 67;
    pub(super) const EXEC_EXITED: u8 = 68;
    pub(super) const PROCESSES: u8 = 69;
    pub(super) const ERROR: u8 = 70;
    pub(super) const SYNCED: u8 = 71;
}

#[derive(Serialize, Deserialize)]
struct SignalBody {
    signal: i32,
}

#[derive(Serialize, Deserialize)]
struct ResizeBody {
    rows: u16,
    cols: u16,
}

#[derive(Serialize, Deserialize)]
struct CreditBody {
    bytes: u32,
}

#[derive(Serialize, Deserialize)]
struct StopBody {
    signal: Option<i32>,
    timeout_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct SetTimeBody {
    unix_nanos: u64,
}

#[derive(Serialize, Deserialize)]
struct PidBody {
    pid: i32,
}

#[derive(Serialize, Deserialize)]
struct MessageBody {
    message: String,
}

/// Why bytes on the channel are not a frame. The channel is unusable after any of these: the
/// reader should drop the connection.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLong { len: usize },
    #[error("frame of {len} bytes is shorter than its header")]
    TooShort { len: usize },
    #[error("unknown frame tag {tag}")]
    UnknownTag { tag: u8 },
    #[error("unknown output stream {stream} in frame tag {tag}")]
    UnknownStream { tag: u8, stream: u8 },
    #[error("malformed body of frame tag {tag}")]
    Body {
        tag: u8,
        #[source]
        source: serde_json::Error,
    },
}

impl Frame {
    /// Appends this frame's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let json = |out: &mut Vec<u8>, t: u8, chan: u32, body: &dyn erased::Json| {
            out.push(t);
            out.extend_from_slice(&chan.to_le_bytes());
            body.write(out);
        };
        let data = |out: &mut Vec<u8>, t: u8, chan: u32, stream: u8, bytes: &[u8]| {
            out.push(t);
            out.extend_from_slice(&chan.to_le_bytes());
            if stream != 0 {
                out.push(stream);
            }
            out.extend_from_slice(bytes);
        };
        match self {
            Self::Hello => data(out, tag::HELLO, 0, 0, &[]),
            Self::Exec { chan, req } => json(out, tag::EXEC, *chan, req),
            Self::Stdin { chan, data: d } => data(out, tag::STDIN, *chan, 0, d),
            Self::Signal { chan, signal } => json(out, tag::SIGNAL, *chan, &SignalBody { signal: *signal }),
            Self::Resize { chan, rows, cols } => {
                json(
                    out,
                    tag::RESIZE,
                    *chan,
                    &ResizeBody {
                        rows: *rows,
                        cols: *cols,
                    },
                );
            }
            Self::Credit { chan, bytes } => json(out, tag::CREDIT, *chan, &CreditBody { bytes: *bytes }),
            Self::Stop { signal, timeout_ms } => {
                json(
                    out,
                    tag::STOP,
                    0,
                    &StopBody {
                        signal: *signal,
                        timeout_ms: *timeout_ms,
                    },
                );
            }
            Self::ListProcesses { chan } => data(out, tag::LIST_PROCESSES, *chan, 0, &[]),
            Self::Sync { chan } => data(out, tag::SYNC, *chan, 0, &[]),
            Self::Boot(req) => json(out, tag::BOOT, 0, req),
            Self::SetTime { unix_nanos } => {
                json(
                    out,
                    tag::SET_TIME,
                    0,
                    &SetTimeBody {
                        unix_nanos: *unix_nanos,
                    },
                );
            }
            Self::Status(s) => json(out, tag::STATUS, 0, s),
            Self::Log { stream, data: d } => data(out, tag::LOG, 0, *stream as u8, d),
            Self::ExecStarted { chan, pid } => json(out, tag::EXEC_STARTED, *chan, &PidBody { pid: *pid }),
            Self::ExecOutput {
                chan,
                stream,
                data: d,
            } => {
                data(out, tag::EXEC_OUTPUT, *chan, *stream as u8, d);
            }
            Self::ExecExited { chan, exit } => json(out, tag::EXEC_EXITED, *chan, exit),
            Self::Processes { chan, processes } => json(out, tag::PROCESSES, *chan, processes),
            Self::Synced { chan } => data(out, tag::SYNCED, *chan, 0, &[]),
            Self::Error { chan, message } => {
                json(
                    out,
                    tag::ERROR,
                    *chan,
                    &MessageBody {
                        message: message.clone(),
                    },
                );
            }
        }
        let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// This frame as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes one frame body (everything after the length field).
    fn decode_body(body: &[u8]) -> Result<Self, DecodeError> {
        if body.len() < HEADER_AFTER_LEN {
            return Err(DecodeError::TooShort { len: body.len() });
        }
        let t = body[0];
        let chan = u32::from_le_bytes([body[1], body[2], body[3], body[4]]);
        let payload = &body[HEADER_AFTER_LEN..];
        fn parse<T: for<'a> Deserialize<'a>>(t: u8, p: &[u8]) -> Result<T, DecodeError> {
            serde_json::from_slice(p).map_err(|source| DecodeError::Body { tag: t, source })
        }
        let stream_data = |p: &[u8]| -> Result<(DataStream, Vec<u8>), DecodeError> {
            let (&s, rest) = p.split_first().ok_or(DecodeError::TooShort { len: body.len() })?;
            let stream = DataStream::from_byte(s).ok_or(DecodeError::UnknownStream { tag: t, stream: s })?;
            Ok((stream, rest.to_vec()))
        };
        Ok(match t {
            tag::HELLO => Self::Hello,
            tag::EXEC => Self::Exec {
                chan,
                req: parse(t, payload)?,
            },
            tag::STDIN => Self::Stdin {
                chan,
                data: payload.to_vec(),
            },
            tag::SIGNAL => Self::Signal {
                chan,
                signal: parse::<SignalBody>(t, payload)?.signal,
            },
            tag::RESIZE => {
                let b: ResizeBody = parse(t, payload)?;
                Self::Resize {
                    chan,
                    rows: b.rows,
                    cols: b.cols,
                }
            }
            tag::CREDIT => Self::Credit {
                chan,
                bytes: parse::<CreditBody>(t, payload)?.bytes,
            },
            tag::STOP => {
                let b: StopBody = parse(t, payload)?;
                Self::Stop {
                    signal: b.signal,
                    timeout_ms: b.timeout_ms,
                }
            }
            tag::LIST_PROCESSES => Self::ListProcesses { chan },
            tag::SYNC => Self::Sync { chan },
            tag::BOOT => Self::Boot(Box::new(parse(t, payload)?)),
            tag::SET_TIME => Self::SetTime {
                unix_nanos: parse::<SetTimeBody>(t, payload)?.unix_nanos,
            },
            tag::STATUS => Self::Status(parse(t, payload)?),
            tag::LOG => {
                let (stream, data) = stream_data(payload)?;
                Self::Log { stream, data }
            }
            tag::EXEC_STARTED => Self::ExecStarted {
                chan,
                pid: parse::<PidBody>(t, payload)?.pid,
            },
            tag::EXEC_OUTPUT => {
                let (stream, data) = stream_data(payload)?;
                Self::ExecOutput { chan, stream, data }
            }
            tag::EXEC_EXITED => Self::ExecExited {
                chan,
                exit: parse(t, payload)?,
            },
            tag::PROCESSES => Self::Processes {
                chan,
                processes: parse(t, payload)?,
            },
            tag::ERROR => Self::Error {
                chan,
                message: parse::<MessageBody>(t, payload)?.message,
            },
            tag::SYNCED => Self::Synced { chan },
            other => return Err(DecodeError::UnknownTag { tag: other }),
        })
    }
}

mod erased {
    /// Object-safe "serialize as JSON into a buffer", so `encode` can take any body.
    pub(super) trait Json {
        fn write(&self, out: &mut Vec<u8>);
    }
    impl<T: serde::Serialize> Json for T {
        fn write(&self, out: &mut Vec<u8>) {
            // Serializing these plain structs into a Vec cannot fail: no maps with non-string keys,
            // no I/O. Should it ever, the frame carries an empty body and the peer reports it.
            let _ = serde_json::to_writer(out, self);
        }
    }
}

/// Incremental decoder: feed it bytes as they arrive, take frames out.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(DecodeError::TooLong { len });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = Frame::decode_body(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        frame.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello,
            Frame::Exec {
                chan: 7,
                req: ExecRequest {
                    argv: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
                    env: vec![("A".into(), "b".into())],
                    working_dir: Some("/tmp".into()),
                    user: Some("nobody".into()),
                    stdin: true,
                    tty: None,
                },
            },
            Frame::Exec {
                chan: 8,
                req: ExecRequest {
                    argv: vec!["/bin/sh".into()],
                    tty: Some(TtySize { rows: 40, cols: 120 }),
                    ..ExecRequest::default()
                },
            },
            Frame::Resize {
                chan: 8,
                rows: 50,
                cols: 200,
            },
            Frame::Credit {
                chan: 8,
                bytes: 256 * 1024,
            },
            Frame::Stdin {
                chan: 7,
                data: b"input".to_vec(),
            },
            Frame::Stdin {
                chan: 7,
                data: vec![],
            },
            Frame::Signal { chan: 0, signal: 15 },
            Frame::Stop {
                signal: None,
                timeout_ms: 5000,
            },
            Frame::ListProcesses { chan: 3 },
            Frame::Sync { chan: 4 },
            Frame::SetTime {
                unix_nanos: 1_700_000_000_000_000_000,
            },
            Frame::Status(GuestStatus {
                workload: WorkloadState::Exited {
                    exit: WorkloadExit {
                        exit_code: None,
                        signal: Some(9),
                        oom_killed: true,
                        requested_stop: false,
                    },
                },
                uptime_ms: 1234,
                dropped_log_bytes: 0,
                protocol: PROTOCOL_VERSION,
                awaiting_boot: false,
            }),
            Frame::Status(GuestStatus {
                workload: WorkloadState::Starting,
                uptime_ms: 700,
                dropped_log_bytes: 0,
                protocol: PROTOCOL_VERSION,
                awaiting_boot: true,
            }),
            Frame::Boot(Box::new(BootRequest {
                config: crate::RunConfig {
                    hostname: "m1".into(),
                    ..crate::RunConfig::default()
                },
                unix_nanos: 1_700_000_000_000_000_000,
                seed: vec![7; 32],
                mac: Some("52:54:00:12:34:56".into()),
            })),
            Frame::Status(GuestStatus {
                workload: WorkloadState::Failed {
                    message: "executable not found: /app/x".into(),
                },
                uptime_ms: 1,
                dropped_log_bytes: 5,
                protocol: 0,
                awaiting_boot: false,
            }),
            Frame::Log {
                stream: DataStream::Stderr,
                data: vec![0, 255, 10],
            },
            Frame::ExecStarted { chan: 7, pid: 42 },
            Frame::ExecOutput {
                chan: 7,
                stream: DataStream::Stdout,
                data: b"hi\n".to_vec(),
            },
            Frame::ExecExited {
                chan: 7,
                exit: ExecExit {
                    exit_code: Some(3),
                    signal: None,
                },
            },
            Frame::Processes {
                chan: 3,
                processes: vec![ProcessInfo {
                    pid: 1,
                    ppid: 0,
                    user: "root".into(),
                    command: "init".into(),
                    cmdline: vec!["/init".into()],
                    directory: "/".into(),
                    rss_kib: 900,
                    cpu_ms: 12,
                    listen_sockets: vec![ListenSocket {
                        proto: "tcp".into(),
                        address: "0.0.0.0:8080".into(),
                    }],
                }],
            },
            Frame::Synced { chan: 4 },
            Frame::Error {
                chan: 9,
                message: "no such session".into(),
            },
        ]
    }

    #[test]
    fn every_frame_round_trips_byte_by_byte() {
        let frames = all_frames();
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let mut dec = Decoder::new();
        let mut got = Vec::new();
        for b in wire {
            dec.push(&[b]);
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert_eq!(dec.pending(), 0);
    }

    #[test]
    fn oversized_frame_is_rejected_before_buffering_it() {
        let mut dec = Decoder::new();
        dec.push(&(u32::MAX).to_le_bytes());
        assert!(matches!(dec.next_frame(), Err(DecodeError::TooLong { .. })));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for body in [
            vec![],
            vec![99, 0, 0, 0, 0],
            vec![tag::EXEC, 0, 0, 0, 0, b'{'],
            vec![tag::LOG, 0, 0, 0, 0, 7],
        ] {
            let mut wire = u32::try_from(body.len()).unwrap().to_le_bytes().to_vec();
            wire.extend_from_slice(&body);
            let mut dec = Decoder::new();
            dec.push(&wire);
            assert!(dec.next_frame().is_err(), "body {body:?} should be rejected");
        }
    }

    /// The body an older host sends (no `tty`) and an older init reports (no `protocol`).
    #[test]
    fn old_exec_requests_and_statuses_still_decode() {
        let body = br#"{"argv":["/bin/cat"],"env":[],"working_dir":null,"user":null,"stdin":true}"#;
        let mut wire = u32::try_from(5 + body.len()).unwrap().to_le_bytes().to_vec();
        wire.push(tag::EXEC);
        wire.extend_from_slice(&7u32.to_le_bytes());
        wire.extend_from_slice(body);
        let mut dec = Decoder::new();
        dec.push(&wire);
        let Some(Frame::Exec { chan: 7, req }) = dec.next_frame().unwrap() else {
            panic!("not an exec frame");
        };
        assert_eq!(req.tty, None);
        assert!(req.stdin);
        assert_eq!(req.argv, ["/bin/cat"]);

        let status: GuestStatus =
            serde_json::from_str(r#"{"workload":{"state":"starting"},"uptime_ms":3}"#).unwrap();
        assert_eq!(status.protocol, 0);
    }

    /// `tty` is left out when unset (an older init sees the request it always saw) and is
    /// `{"rows":…,"cols":…}` when set.
    #[test]
    fn tty_field_on_the_wire() {
        let plain = serde_json::to_value(ExecRequest::default()).unwrap();
        assert!(plain.get("tty").is_none(), "{plain}");
        let tty = serde_json::to_value(ExecRequest {
            tty: Some(TtySize { rows: 40, cols: 120 }),
            ..ExecRequest::default()
        })
        .unwrap();
        assert_eq!(tty["tty"], serde_json::json!({"rows": 40, "cols": 120}));
    }

    /// The new frames' tags and bodies are part of the contract with already-built guests.
    #[test]
    fn resize_and_credit_wire_format() {
        let body = |f: &Frame| f.to_bytes()[4..].to_vec();
        let mut want = vec![8, 3, 0, 0, 0];
        want.extend_from_slice(br#"{"rows":40,"cols":120}"#);
        assert_eq!(
            body(&Frame::Resize {
                chan: 3,
                rows: 40,
                cols: 120
            }),
            want
        );
        let mut want = vec![9, 3, 0, 0, 0];
        want.extend_from_slice(br#"{"bytes":65536}"#);
        assert_eq!(
            body(&Frame::Credit {
                chan: 3,
                bytes: 65536
            }),
            want
        );
        for bad in [
            vec![tag::RESIZE, 1, 0, 0, 0],
            [&[tag::RESIZE, 1, 0, 0, 0][..], br#"{"rows":-1,"cols":2}"#].concat(),
            [&[tag::CREDIT, 1, 0, 0, 0][..], br#"{"bytes":"x"}"#].concat(),
        ] {
            let mut wire = u32::try_from(bad.len()).unwrap().to_le_bytes().to_vec();
            wire.extend_from_slice(&bad);
            let mut dec = Decoder::new();
            dec.push(&wire);
            assert!(dec.next_frame().is_err(), "body {bad:?} should be rejected");
        }
    }

    /// Sync and Synced are a bare header (tags 10 and 71), like ListProcesses.
    #[test]
    fn sync_and_synced_wire_format() {
        assert_eq!(Frame::Sync { chan: 5 }.to_bytes(), [5, 0, 0, 0, 10, 5, 0, 0, 0]);
        assert_eq!(Frame::Synced { chan: 5 }.to_bytes(), [5, 0, 0, 0, 71, 5, 0, 0, 0]);
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let mut dec = Decoder::new();
            dec.push(&bytes);
            for _ in 0..8 {
                match dec.next_frame() {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }

        #[test]
        fn data_frames_round_trip(chan in 1u32.., data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let f = Frame::ExecOutput { chan, stream: DataStream::Stdout, data };
            let mut dec = Decoder::new();
            dec.push(&f.to_bytes());
            proptest::prop_assert_eq!(dec.next_frame().unwrap(), Some(f));
        }
    }
}
