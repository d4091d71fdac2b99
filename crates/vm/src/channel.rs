//! The host end of the host↔guest channel (`channel.sock`, a QEMU virtio-serial chardev).
//!
//! One reader thread per [`crate::Vm`] owns the connection: it connects (and reconnects while QEMU
//! lives), says [`Frame::Hello`], decodes frames and dispatches them into [`Shared`]: the guest's
//! status (waited on with the condvar), workload logs (fanned out to subscribers, with a bounded
//! backlog for late subscribers), and per-`chan` replies (exec, process list, errors). Everything the
//! guest sends is untrusted: a decode error drops the connection, never panics.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::Duration;

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
        let bytes = frame.to_bytes();
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

    /// Routes frames for `chan` to the returned receiver until [`Shared::unregister`].
    pub(crate) fn register(&self, chan: u32) -> mpsc::Receiver<Frame> {
        let (tx, rx) = mpsc::channel();
        self.lock().waiters.insert(chan, tx);
        rx
    }

    pub(crate) fn unregister(&self, chan: u32) {
        self.lock().waiters.remove(&chan);
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
            | Frame::Error { chan, .. } => {
                if let Some(tx) = g.waiters.get(&chan) {
                    let _ = tx.send(frame);
                }
            }
            // Host → guest frames coming back are ignored.
            _ => {}
        }
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
