//! Streaming exec sessions ([`crate::Vm::exec_session`]): a command in the guest whose stdin, output,
//! terminal size and signals go back and forth while it runs (`aloft ssh console`).
//!
//! Flow control: init sends a session's output only within the credit the host gave it
//! ([`Frame::Credit`]). The host grants [`SESSION_WINDOW`] with the exec and credits output back as
//! [`ExecSession::recv`] hands it on, so a session holds at most that much output on the host
//! however slow its consumer; the command then blocks on its terminal or pipe (backpressure). Other
//! sessions, the workload's logs and replies are unaffected: init simply stops reading that one
//! command's output. A guest whose init predates the protocol (version 0, an old machine still
//! running) gets no credit and its output is unbounded; it cannot have a terminal either.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aloft_guest_proto::{DataStream, ExecExit, ExecRequest, Frame};

use crate::channel::{Inbox, Popped, Shared};
use crate::error::VmError;
use crate::proc;
use crate::vm::VmExit;

/// Output of one session the host holds at most (init's credit): 256 KiB.
pub(crate) const SESSION_WINDOW: u32 = 256 * 1024;
/// Consumed output is credited back to init once this much has accumulated.
const CREDIT_BATCH: u32 = SESSION_WINDOW / 4;
/// Stdin is sent in frames of at most this much data.
const STDIN_CHUNK: usize = 32 * 1024;
/// How long init gets to start the command.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a waiting call checks that the VM is still there.
const LIVENESS_POLL: Duration = Duration::from_millis(100);

/// Something an exec session's command did ([`ExecSession::recv`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Output; on a terminal all of it is [`DataStream::Stdout`].
    #[expect(
        missing_docs,
        reason = "which stream, and the bytes as the command wrote them"
    )]
    Output { stream: DataStream, data: Vec<u8> },
    /// It ended (after all its output); nothing follows.
    Exited(ExecExit),
}

/// What a session needs of its VM once the `&Vm` borrow ended.
#[derive(Debug, Clone)]
pub(crate) struct VmLink {
    pub(crate) shared: Arc<Shared>,
    pub(crate) pid: i32,
    pub(crate) start_time: u64,
    pub(crate) console: PathBuf,
    pub(crate) finished: Arc<Mutex<Option<VmExit>>>,
}

impl VmLink {
    fn finished_exit(&self) -> Option<VmExit> {
        self.finished
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Nothing more can come from the guest: QEMU is gone, or the `Vm` was dropped.
    fn gone(&self) -> bool {
        {
            let g = self.shared.lock();
            if g.qemu_exit.is_some() || g.shutdown {
                return true;
            }
        }
        self.finished_exit().is_some() || !proc::alive(self.pid, self.start_time)
    }

    /// [`VmError::NotRunning`], as [`crate::Vm`]'s methods give it.
    pub(crate) fn not_running(&self) -> VmError {
        let reason = match self.finished_exit() {
            Some(e) => format!("qemu ended: {:?}", e.qemu_status),
            None if proc::alive(self.pid, self.start_time) && self.shared.lock().shutdown => {
                "its handle was dropped".into()
            }
            None => "qemu is gone".into(),
        };
        VmError::NotRunning {
            reason,
            console: crate::console::scan_file(&self.console).tail,
        }
    }

    fn send(&self, frame: &Frame) -> Result<(), VmError> {
        self.shared.send(frame).map_err(|source| {
            if self.gone() {
                self.not_running()
            } else {
                VmError::Channel { op: "send", source }
            }
        })
    }
}

#[derive(Debug, Default)]
struct State {
    /// Exited, refused, or the VM went away: nothing more comes.
    ended: bool,
    /// Output handed on but not yet credited back to init.
    uncredited: u32,
}

/// A running exec session ([`crate::Vm::exec_session`]); `Send + Sync + 'static`, it outlives the
/// `&Vm` it came from. Dropping it before the command exited sends SIGKILL to the command (on a
/// terminal, to its process group) and stops receiving its frames.
#[derive(Debug)]
pub struct ExecSession {
    chan: u32,
    link: VmLink,
    inbox: Arc<Inbox>,
    tty: bool,
    /// Flow control in effect (the guest speaks protocol 1).
    window: Option<u32>,
    state: Mutex<State>,
}

impl ExecSession {
    /// Sends the exec (and the first credit, in the same write) and waits until init started the
    /// command.
    pub(crate) fn start(link: VmLink, chan: u32, req: ExecRequest, protocol: u32) -> Result<Self, VmError> {
        if req.tty.is_some() && protocol < 1 {
            return Err(VmError::ExecFailed {
                message: format!(
                    "the machine's init is too old for a terminal (protocol {protocol}): restart the machine to update it"
                ),
            });
        }
        let window = (protocol >= 1).then_some(SESSION_WINDOW);
        // A guest that ignores its credit is cut off at twice the window.
        let limit = window.map(|w| 2 * w as usize);
        let inbox = link.shared.open_session(chan, limit);
        let session = Self {
            chan,
            tty: req.tty.is_some(),
            link,
            inbox,
            window,
            state: Mutex::new(State::default()),
        };
        let mut frames = vec![Frame::Exec { chan, req }];
        if let Some(bytes) = window {
            frames.push(Frame::Credit { chan, bytes });
        }
        if let Err(source) = session.link.shared.send_all(&frames) {
            session.state().ended = true;
            return Err(if session.link.gone() {
                session.link.not_running()
            } else {
                VmError::Channel { op: "send", source }
            });
        }
        session.wait_started()?;
        Ok(session)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait_started(&self) -> Result<(), VmError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.inbox.pop(left.min(LIVENESS_POLL)) {
                Popped::Frame(Frame::ExecStarted { .. }) => return Ok(()),
                Popped::Frame(Frame::Error { message, .. }) => {
                    self.state().ended = true;
                    return Err(VmError::ExecFailed { message });
                }
                // Init always reports the start first; anything else means it started.
                Popped::Frame(f) => {
                    self.inbox.unpop(f);
                    return Ok(());
                }
                Popped::Overflowed => return Err(self.overflowed()),
                Popped::Empty => {
                    if self.link.gone() {
                        self.state().ended = true;
                        return Err(self.link.not_running());
                    }
                    if Instant::now() >= deadline {
                        // Dropping the session kills the command should it start after all.
                        return Err(VmError::Timeout {
                            op: "start the exec session",
                            after: START_TIMEOUT,
                            hint: String::new(),
                        });
                    }
                }
            }
        }
    }

    fn overflowed(&self) -> VmError {
        let _ = self.link.send(&Frame::Signal {
            chan: self.chan,
            signal: libc::SIGKILL,
        });
        self.state().ended = true;
        VmError::ExecFailed {
            message: format!(
                "the guest sent more output than exec session {}'s window of {} bytes allows; the command was killed",
                self.chan,
                self.window.unwrap_or(0)
            ),
        }
    }

    /// Errors once the session ended.
    fn check_open(&self) -> Result<(), VmError> {
        if self.state().ended {
            return Err(VmError::ExecFailed {
                message: format!("exec session {} already ended", self.chan),
            });
        }
        Ok(())
    }

    /// Credits handed-on output back to init, in batches (sent without holding the state lock).
    fn credit(&self, consumed: usize) {
        if self.window.is_none() {
            return;
        }
        let bytes = {
            let mut st = self.state();
            st.uncredited = st
                .uncredited
                .saturating_add(u32::try_from(consumed).unwrap_or(u32::MAX));
            if st.uncredited < CREDIT_BATCH {
                return;
            }
            std::mem::take(&mut st.uncredited)
        };
        let credit = Frame::Credit {
            chan: self.chan,
            bytes,
        };
        if self.link.shared.send(&credit).is_err() {
            let mut st = self.state();
            st.uncredited = st.uncredited.saturating_add(bytes);
        }
    }

    /// Writes `data` to the command's stdin (or terminal), in frames well below the frame limit.
    /// Empty data is a no-op.
    pub fn stdin(&self, data: &[u8]) -> Result<(), VmError> {
        self.check_open()?;
        for chunk in data.chunks(STDIN_CHUNK) {
            self.link.send(&Frame::Stdin {
                chan: self.chan,
                data: chunk.to_vec(),
            })?;
        }
        Ok(())
    }

    /// Closes the command's stdin once what was sent is written; on a terminal, types the
    /// terminal's EOF character (`^D`) instead and the terminal stays open.
    pub fn close_stdin(&self) -> Result<(), VmError> {
        self.check_open()?;
        self.link.send(&Frame::Stdin {
            chan: self.chan,
            data: Vec::new(),
        })
    }

    /// Resizes the terminal (the command gets SIGWINCH); a no-op for a session without one.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), VmError> {
        self.check_open()?;
        if !self.tty {
            return Ok(());
        }
        self.link.send(&Frame::Resize {
            chan: self.chan,
            rows,
            cols,
        })
    }

    /// Sends `signal` to the command (on a terminal, to its process group).
    pub fn signal(&self, signal: i32) -> Result<(), VmError> {
        self.check_open()?;
        self.link.send(&Frame::Signal {
            chan: self.chan,
            signal,
        })
    }

    /// The next event within `timeout` (`Ok(None)` when none came). Init's refusal to start the
    /// command is [`VmError::ExecFailed`] from [`crate::Vm::exec_session`] already; the VM going
    /// away is [`VmError::NotRunning`], as from [`crate::Vm::exec`]. After
    /// [`ExecEvent::Exited`] (or an error) further calls return an error.
    ///
    /// Init's complaints about a request that raced the command's end (stdin or a signal for a
    /// session that just ended) are not events and are skipped.
    pub fn recv(&self, timeout: Duration) -> Result<Option<ExecEvent>, VmError> {
        self.check_open()?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.inbox.pop(left.min(LIVENESS_POLL)) {
                Popped::Frame(Frame::ExecOutput { stream, data, .. }) => {
                    self.credit(data.len());
                    return Ok(Some(ExecEvent::Output { stream, data }));
                }
                Popped::Frame(Frame::ExecExited { exit, .. }) => {
                    self.state().ended = true;
                    self.link.shared.close_session(self.chan);
                    return Ok(Some(ExecEvent::Exited(exit)));
                }
                Popped::Frame(_) => {}
                Popped::Overflowed => return Err(self.overflowed()),
                Popped::Empty => {
                    if self.link.gone() {
                        self.state().ended = true;
                        return Err(self.link.not_running());
                    }
                    // A credit that could not be sent (channel reconnecting) is retried here.
                    self.credit(0);
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
            }
        }
    }
}

impl Drop for ExecSession {
    fn drop(&mut self) {
        if !self.state().ended {
            let _ = self.link.shared.send(&Frame::Signal {
                chan: self.chan,
                signal: libc::SIGKILL,
            });
            // Whatever it still writes is read and dropped: init must not wait on credit.
            if self.window.is_some() {
                let _ = self.link.shared.send(&Frame::Credit {
                    chan: self.chan,
                    bytes: u32::MAX,
                });
            }
        }
        self.link.shared.close_session(self.chan);
    }
}
