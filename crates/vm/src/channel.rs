//! The host end of the host↔guest channel (`channel.sock`, a QEMU virtio-serial chardev).
//!
//! One reader thread per [`crate::Vm`] owns the connection: it connects (and reconnects while QEMU
//! lives), says [`Frame::Hello`], decodes frames and dispatches them into [`Shared`]: the guest's
//! status (waited on with the condvar), workload logs (fanned out to subscribers, with a bounded
//! backlog for late subscribers), per-`chan` replies (exec, process list, errors) and the frames of
//! streaming exec sessions ([`Inbox`]). Everything the guest sends is untrusted: a decode error drops
//! the connection, never panics.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use aloft_guest_proto::{DataStream, Decoder, Frame, GuestStatus, WorkloadState};

/// Log bytes kept for subscribers that arrive late ([`crate::Vm::logs`]).
const BACKLOG_BYTES: usize = 1 << 20;

/// A chunk of workload output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// Which output stream.
    pub stream: DataStream,
    /// The bytes, as the workload wrote them.
    pub data: Vec<u8>,
}

/// How QEMU ended, as its parent saw it (`None` fields when we were not its parent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RawExit {
    pub(crate) code: Option<i32>,
    pub(crate) signal: Option<i32>,
}

/// State shared by the reader thread, the reaper thread and the [`crate::Vm`] methods.
#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub(crate) status: Option<GuestStatus>,
    /// The workload's pid, remembered after it exited.
    pub(crate) last_pid: Option<i32>,
    pub(crate) connected: bool,
    /// Set by the reaper thread (we are QEMU's parent) or when QEMU was seen gone.
    pub(crate) qemu_exit: Option<RawExit>,
    /// The Vm handle is gone or the VM finished: the reader stops.
    pub(crate) shutdown: bool,
    writer: Option<UnixStream>,
    waiters: HashMap<u32, mpsc::Sender<Frame>>,
    sessions: HashMap<u32, Arc<Inbox>>,
    log_subs: Vec<mpsc::Sender<LogChunk>>,
    backlog: VecDeque<LogChunk>,
    backlog_bytes: usize,
}

/// [`Inner`] plus its condvar (notified on every status, connection and exit change).
#[derive(Debug, Default)]
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    pub(crate) cond: Condvar,
}

impl Shared {
    /// Locks the state. A poisoned lock (a panicking thread) still holds consistent plain data.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits on the condvar for at most `d`.
    pub(crate) fn wait<'a>(&self, g: MutexGuard<'a, Inner>, d: Duration) -> MutexGuard<'a, Inner> {
        match self.cond.wait_timeout(g, d) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        }
    }

    /// Sends a frame to the guest.
    pub(crate) fn send(&self, frame: &Frame) -> std::io::Result<()> {
        self.send_all(std::slice::from_ref(frame))
    }

    /// Routes frames for `chan` to the returned receiver until [`Shared::unregister`].
    pub(crate) fn register(&self, chan: u32) -> mpsc::Receiver<Frame> {
        let (tx, rx) = mpsc::channel();
        self.lock().waiters.insert(chan, tx);
        rx
    }

    pub(crate) fn unregister(&self, chan: u32) {
        self.lock().waiters.remove(&chan);
    }

    /// Routes frames for session `chan` into a new [`Inbox`] until [`Shared::close_session`];
    /// `limit` bounds the output bytes it holds.
    pub(crate) fn open_session(&self, chan: u32, limit: Option<usize>) -> Arc<Inbox> {
        let inbox = Arc::new(Inbox::new(limit));
        self.lock().sessions.insert(chan, inbox.clone());
        inbox
    }

    pub(crate) fn close_session(&self, chan: u32) {
        self.lock().sessions.remove(&chan);
    }

    /// Sends frames to the guest in one write (the guest reads them together).
    pub(crate) fn send_all(&self, frames: &[Frame]) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        for f in frames {
            f.encode(&mut bytes);
        }
        let g = self.lock();
        let Some(w) = g.writer.as_ref() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "not connected to the guest",
            ));
        };
        let mut w = w;
        w.write_all(&bytes)
    }

    /// A receiver of workload output: the backlog first, then live chunks.
    pub(crate) fn subscribe_logs(&self) -> mpsc::Receiver<LogChunk> {
        let (tx, rx) = mpsc::channel();
        let mut g = self.lock();
        for c in &g.backlog {
            let _ = tx.send(c.clone());
        }
        g.log_subs.push(tx);
        rx
    }

    /// Stops the reader and closes the connection.
    pub(crate) fn shut_down(&self) {
        let mut g = self.lock();
        g.shutdown = true;
        g.log_subs.clear();
        if let Some(w) = g.writer.take() {
            let _ = w.shutdown(Shutdown::Both);
        }
        drop(g);
        self.cond.notify_all();
    }

    /// Applies one frame from the guest.
    pub(crate) fn dispatch(&self, frame: Frame) {
        let mut g = self.lock();
        match frame {
            Frame::Status(s) => {
                if let WorkloadState::Running { pid } = s.workload {
                    g.last_pid = Some(pid);
                }
                g.status = Some(s);
                drop(g);
                self.cond.notify_all();
            }
            Frame::Log { stream, data } => {
                let chunk = LogChunk { stream, data };
                g.log_subs.retain(|s| s.send(chunk.clone()).is_ok());
                g.backlog_bytes += chunk.data.len();
                g.backlog.push_back(chunk);
                while g.backlog_bytes > BACKLOG_BYTES {
                    let Some(old) = g.backlog.pop_front() else { break };
                    g.backlog_bytes -= old.data.len();
                }
            }
            Frame::ExecStarted { chan, .. }
            | Frame::ExecOutput { chan, .. }
            | Frame::ExecExited { chan, .. }
            | Frame::Processes { chan, .. }
            | Frame::Synced { chan, .. }
            | Frame::Error { chan, .. } => {
                if let Some(tx) = g.waiters.get(&chan) {
                    let _ = tx.send(frame);
                } else if let Some(inbox) = g.sessions.get(&chan) {
                    inbox.push(frame);
                }
            }
            // Host → guest frames coming back are ignored.
            _ => {}
        }
    }
}

/// What [`Inbox::pop`] got.
#[derive(Debug)]
pub(crate) enum Popped {
    Frame(Frame),
    /// Nothing came in time.
    Empty,
    /// The guest sent more output than the limit: what was held is dropped, nothing more comes.
    Overflowed,
}

/// The frames of one streaming exec session, from the reader thread to its [`crate::ExecSession`].
/// The output it holds is bounded by the session's flow-control window (init sends no more than
/// the host credited); a guest that ignores it overflows the inbox instead of growing it.
#[derive(Debug)]
pub(crate) struct Inbox {
    state: Mutex<InboxState>,
    cond: Condvar,
}

#[derive(Debug)]
struct InboxState {
    frames: VecDeque<Frame>,
    output_bytes: usize,
    limit: Option<usize>,
    overflowed: bool,
}

impl Inbox {
    fn new(limit: Option<usize>) -> Self {
        Self {
            state: Mutex::new(InboxState {
                frames: VecDeque::new(),
                output_bytes: 0,
                limit,
                overflowed: false,
            }),
            cond: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, frame: Frame) {
        let mut g = self.lock();
        if g.overflowed {
            return;
        }
        if let Frame::ExecOutput { data, .. } = &frame {
            let held = g.output_bytes + data.len();
            if g.limit.is_some_and(|l| held > l) {
                g.overflowed = true;
                g.frames.clear();
                g.output_bytes = 0;
                drop(g);
                self.cond.notify_all();
                return;
            }
            g.output_bytes = held;
        }
        g.frames.push_back(frame);
        drop(g);
        self.cond.notify_all();
    }

    /// Puts a frame back in front (it was taken before its turn).
    pub(crate) fn unpop(&self, frame: Frame) {
        let mut g = self.lock();
        if let Frame::ExecOutput { data, .. } = &frame {
            g.output_bytes += data.len();
        }
        g.frames.push_front(frame);
    }

    /// The next frame, waiting up to `wait`.
    pub(crate) fn pop(&self, wait: Duration) -> Popped {
        let deadline = Instant::now() + wait;
        let mut g = self.lock();
        loop {
            if g.overflowed {
                return Popped::Overflowed;
            }
            if let Some(f) = g.frames.pop_front() {
                if let Frame::ExecOutput { data, .. } = &f {
                    g.output_bytes -= data.len();
                }
                return Popped::Frame(f);
            }
            let now = Instant::now();
            if now >= deadline {
                return Popped::Empty;
            }
            g = match self.cond.wait_timeout(g, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Output bytes held.
    #[cfg(test)]
    pub(crate) fn output_bytes(&self) -> usize {
        self.lock().output_bytes
    }
}

/// Starts the reader thread for `path`. `alive` says whether QEMU still runs (no reconnect after).
pub(crate) fn spawn_reader(
    path: PathBuf,
    shared: Arc<Shared>,
    alive: impl Fn() -> bool + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("aloft-vm-channel".into())
        .spawn(move || reader_loop(&path, &shared, &alive))
        .map(|_| ())
}

fn reader_loop(path: &std::path::Path, shared: &Shared, alive: &dyn Fn() -> bool) {
    loop {
        if shared.lock().shutdown {
            return;
        }
        let Ok(stream) = UnixStream::connect(path) else {
            if !alive() {
                let mut g = shared.lock();
                g.qemu_exit.get_or_insert_with(RawExit::default);
                drop(g);
                shared.cond.notify_all();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let Ok(writer) = stream.try_clone() else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let _ = writer.set_write_timeout(Some(Duration::from_secs(10)));
        {
            let mut g = shared.lock();
            if g.shutdown {
                return;
            }
            g.writer = Some(writer);
            g.connected = true;
        }
        shared.cond.notify_all();
        let _ = shared.send(&Frame::Hello);
        read_frames(stream, shared);
        {
            let mut g = shared.lock();
            g.connected = false;
            if let Some(w) = g.writer.take() {
                let _ = w.shutdown(Shutdown::Both);
            }
        }
        shared.cond.notify_all();
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads until EOF, an error or a malformed frame.
fn read_frames(mut stream: UnixStream, shared: &Shared) {
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => shared.dispatch(f),
                Ok(None) => break,
                Err(_) => {
                    // Untrusted input: drop the connection; the loop reconnects and says hello.
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_guest_proto::ExecExit;

    #[test]
    fn dispatch_routes_status_logs_and_replies() {
        let s = Shared::default();
        s.dispatch(Frame::Log {
            stream: DataStream::Stdout,
            data: b"early".to_vec(),
        });
        let logs = s.subscribe_logs();
        s.dispatch(Frame::Log {
            stream: DataStream::Stderr,
            data: b"late".to_vec(),
        });
        assert_eq!(logs.try_recv().unwrap().data, b"early");
        assert_eq!(logs.try_recv().unwrap().stream, DataStream::Stderr);

        s.dispatch(Frame::Status(GuestStatus {
            workload: WorkloadState::Running { pid: 42 },
            uptime_ms: 1,
            dropped_log_bytes: 0,
            protocol: 0,
            awaiting_boot: false,
        }));
        assert_eq!(s.lock().last_pid, Some(42));

        let rx = s.register(7);
        s.dispatch(Frame::ExecExited {
            chan: 7,
            exit: ExecExit::default(),
        });
        s.dispatch(Frame::ExecExited {
            chan: 8,
            exit: ExecExit::default(),
        });
        assert!(matches!(rx.try_recv(), Ok(Frame::ExecExited { chan: 7, .. })));
        assert!(rx.try_recv().is_err());
        s.unregister(7);
        assert!(s.send(&Frame::Hello).is_err(), "not connected yet");
    }

    #[test]
    fn session_frames_go_to_their_inbox_and_output_is_bounded() {
        let s = Shared::default();
        let inbox = s.open_session(5, Some(10));
        let out = |data: &[u8]| Frame::ExecOutput {
            chan: 5,
            stream: DataStream::Stdout,
            data: data.to_vec(),
        };
        s.dispatch(Frame::ExecStarted { chan: 5, pid: 9 });
        s.dispatch(out(b"123456"));
        s.dispatch(out(b"7890"));
        s.dispatch(Frame::ExecExited {
            chan: 6,
            exit: ExecExit::default(),
        });
        assert_eq!(inbox.output_bytes(), 10);
        assert!(matches!(
            inbox.pop(Duration::ZERO),
            Popped::Frame(Frame::ExecStarted { pid: 9, .. })
        ));
        assert!(
            matches!(inbox.pop(Duration::ZERO), Popped::Frame(Frame::ExecOutput { data, .. }) if data == b"123456")
        );
        assert_eq!(inbox.output_bytes(), 4);
        // Popped bytes make room again.
        s.dispatch(out(b"abcdef"));
        assert!(
            matches!(inbox.pop(Duration::ZERO), Popped::Frame(Frame::ExecOutput { data, .. }) if data == b"7890")
        );
        let Popped::Frame(f) = inbox.pop(Duration::ZERO) else {
            panic!("expected a frame");
        };
        inbox.unpop(f);
        assert_eq!(inbox.output_bytes(), 6);
        assert!(
            matches!(inbox.pop(Duration::ZERO), Popped::Frame(Frame::ExecOutput { data, .. }) if data == b"abcdef")
        );
        let t0 = Instant::now();
        assert!(matches!(inbox.pop(Duration::from_millis(50)), Popped::Empty));
        assert!(t0.elapsed() >= Duration::from_millis(50));
        // Beyond the limit: overflowed for good, nothing held.
        s.dispatch(out(b"0123456789A"));
        s.dispatch(out(b"x"));
        assert!(matches!(inbox.pop(Duration::ZERO), Popped::Overflowed));
        assert_eq!(inbox.output_bytes(), 0);
        s.close_session(5);
        s.dispatch(out(b"y"));
        assert!(matches!(inbox.pop(Duration::ZERO), Popped::Overflowed));
    }

    #[test]
    fn a_waiting_pop_wakes_on_a_frame() {
        let s = Arc::new(Shared::default());
        let inbox = s.open_session(3, None);
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            s2.dispatch(Frame::ExecExited {
                chan: 3,
                exit: ExecExit::default(),
            });
        });
        let t0 = Instant::now();
        assert!(matches!(
            inbox.pop(Duration::from_secs(10)),
            Popped::Frame(Frame::ExecExited { .. })
        ));
        assert!(t0.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
    }

    #[test]
    fn backlog_is_bounded() {
        let s = Shared::default();
        for _ in 0..40 {
            s.dispatch(Frame::Log {
                stream: DataStream::Stdout,
                data: vec![b'x'; 64 * 1024],
            });
        }
        assert!(s.lock().backlog_bytes <= BACKLOG_BYTES);
    }

    #[test]
    fn reader_survives_garbage_and_reconnects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("channel.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let shared = Arc::new(Shared::default());
        spawn_reader(path, shared.clone(), || true).unwrap();
        // First connection: expect hello, send garbage.
        let (mut c1, _) = listener.accept().unwrap();
        let mut hello = [0u8; 9];
        c1.read_exact(&mut hello).unwrap();
        assert_eq!(hello.to_vec(), Frame::Hello.to_bytes());
        c1.write_all(&[5, 0, 0, 0, 99, 0, 0, 0, 0]).unwrap();
        // Second connection: a proper status.
        let (mut c2, _) = listener.accept().unwrap();
        c2.read_exact(&mut hello).unwrap();
        let st = Frame::Status(GuestStatus {
            workload: WorkloadState::Starting,
            uptime_ms: 5,
            dropped_log_bytes: 0,
            protocol: 0,
            awaiting_boot: false,
        });
        c2.write_all(&st.to_bytes()).unwrap();
        let mut g = shared.lock();
        for _ in 0..50 {
            if g.status.is_some() {
                break;
            }
            g = shared.wait(g, Duration::from_millis(100));
        }
        assert_eq!(g.status.as_ref().unwrap().uptime_ms, 5);
        drop(g);
        shared.shut_down();
    }
}
