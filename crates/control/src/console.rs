//! `GET /v1/apps/{app}/machines/{id}/console` (an aloft extension, `aloft ssh console`): an
//! interactive command in a started machine, over the request's own HTTP/1.1 connection.
//!
//! The protocol is `aloft_api::console`'s. The request carries [`ConsoleQuery`] (`cmd`, `tty`,
//! `rows`, `cols`, `term`, `user`) and `Connection: upgrade` + `Upgrade: aloft-console`.
//! Everything that can fail is checked **before** the answer, so that every refusal is an
//! ordinary JSON error: the token (401), the query (400), the upgrade headers (426 without
//! them, 400 for another protocol), the console limit (503), the app and machine (404), the
//! machine's state (412) and the program (400 with init's `executable not found: …`). Only
//! then does the server answer `101 Switching Protocols` (`Connection: upgrade`,
//! `Upgrade: aloft-console`) with the command already running, and both sides exchange
//! [`ConsoleFrame`]s:
//!
//! - client → server: `Stdin`, `Eof` (closes the command's stdin), `Resize`, `Signal`. Any
//!   other frame, one that does not decode, or a signal aloft cannot send ends the session
//!   with an `Error` frame naming the problem.
//! - server → client: `Stdout`, `Stderr` as the command writes, then exactly one last frame:
//!   `Exit` when it ended, or `Error` when the session failed (the machine stopped, a malformed
//!   client frame); the server then closes the connection.
//! - When the client closes the connection (or its write side: stdin ends with an `Eof`
//!   frame, never with a half-close) the command is killed.
//!
//! Threading: the host's [`ConsoleSession`] is blocking and `&mut`; one blocking thread owns
//! it and alternates between applying the client's queued commands and waiting briefly
//! ([`POLL`]) for the command's output. One task reads and decodes the client's frames into
//! that queue, another writes the thread's frames to the client; both queues are bounded, so a
//! client that does not read stops the command's output (and the guest's) rather than growing
//! a buffer. Lease rules are `exec`'s: none (a console changes nothing the lease guards).

use std::time::{Duration, Instant};

use aloft_api::{
    ApiError, CONSOLE_UPGRADE, ConsoleEvent, ConsoleFrame, ConsoleQuery, ConsoleSession, Signal, TtySize,
};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::auth::Caller;
use crate::error::blocking;
use crate::machines::{MachinePath, locate, query_pairs};
use crate::upgrade::{Protocol, Upgradable};
use crate::{ApiState, HttpError};

/// Console sessions a server runs at once, unless [`ApiState::with_max_consoles`] says otherwise.
pub(crate) const MAX_CONSOLES: usize = 64;
/// How long the session's thread waits for output before it looks at the client's commands
/// again: the most a keystroke waits before it reaches the command.
const POLL: Duration = Duration::from_millis(10);
/// Frames queued each way between the connection and the session's thread.
const QUEUE: usize = 32;
/// How long a session whose command refused input may take to report the command's exit
/// (input racing an exit), before the failure is reported instead.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// The console's upgrade.
const CONSOLE: Protocol = Protocol {
    token: CONSOLE_UPGRADE,
    what: "the console",
    client: "aloft ssh console",
};

/// `GET …/console?cmd=…&tty=…` with `Upgrade: aloft-console` → `101 Switching Protocols`, then
/// console frames (see the module doc).
pub(crate) async fn console(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    Upgradable(upgrade): Upgradable,
) -> Result<Response, HttpError> {
    let request = ConsoleQuery::from_query(query_pairs(query.as_deref()))?.request;
    let upgrade = match CONSOLE.accept(&headers, upgrade) {
        Ok(upgrade) => upgrade,
        Err(refusal) => return Ok(*refusal),
    };
    let permit = state.consoles().clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            503,
            "this server runs as many console sessions as it allows: close one, or retry later",
        )
    })?;
    let session = blocking(move || {
        let t = locate(&state, &caller, &path)?;
        Ok(t.host.console(&t.id, request)?)
    })
    .await?;
    tokio::spawn(async move {
        // A failed upgrade (the client went away before the 101 reached it) drops the
        // session, which kills the command.
        if let Ok(upgraded) = upgrade.await {
            relay(TokioIo::new(upgraded), session, permit).await;
        }
    });
    Ok(CONSOLE.switching())
}

/// What the client asked of the command.
#[derive(Debug)]
enum Command {
    Stdin(Vec<u8>),
    Eof,
    Resize(TtySize),
    Signal(Signal),
    /// The client broke the protocol: end with this error.
    Abort(String),
}

/// Runs a session over an upgraded connection until the command ends or either side goes.
async fn relay<T>(io: T, session: Box<dyn ConsoleSession>, permit: OwnedSemaphorePermit)
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(io);
    let (commands, command_rx) = mpsc::channel(QUEUE);
    let (frames_tx, mut frames) = mpsc::channel(QUEUE);
    let thread = tokio::task::spawn_blocking(move || {
        pump(session, command_rx, &frames_tx);
        // The session is dropped here (killing a command that still runs), then the permit.
        drop(permit);
    });
    let reader = tokio::spawn(read_client(rd, commands));
    let mut buf = Vec::new();
    while let Some(frame) = frames.recv().await {
        buf.clear();
        let mut last = false;
        // Whatever is queued goes out in one write.
        let mut next = Some(frame);
        while let Some(frame) = next.take() {
            last = matches!(frame, ConsoleFrame::Exit(_) | ConsoleFrame::Error(_));
            frame.encode(&mut buf);
            if last || buf.len() >= aloft_api::MAX_CONSOLE_PAYLOAD {
                break;
            }
            next = frames.try_recv().ok();
        }
        let written = wr.write_all(&buf).await.is_ok() && wr.flush().await.is_ok();
        if !written || last {
            break;
        }
    }
    // The client's side is done with too: the thread sees the queues close and ends, dropping
    // the session, before the client sees the connection close.
    reader.abort();
    drop(frames);
    let _ = thread.await;
    let _ = wr.shutdown().await;
}

/// Decodes the client's frames into `commands` until it closes the connection or breaks the
/// protocol.
async fn read_client<R: AsyncRead + Send + Unpin>(mut rd: R, commands: mpsc::Sender<Command>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        loop {
            let command = match ConsoleFrame::decode(&buf) {
                Ok(None) => break,
                Ok(Some((frame, n))) => {
                    buf.drain(..n);
                    command(frame)
                }
                Err(e) => Command::Abort(format!("malformed console frame from the client: {e}")),
            };
            let abort = matches!(command, Command::Abort(_));
            if commands.send(command).await.is_err() || abort {
                return;
            }
        }
        match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The command a client frame asks for.
fn command(frame: ConsoleFrame) -> Command {
    match frame {
        ConsoleFrame::Stdin(data) => Command::Stdin(data),
        ConsoleFrame::Eof => Command::Eof,
        ConsoleFrame::Resize(size) if size.rows > 0 && size.cols > 0 => Command::Resize(size),
        ConsoleFrame::Resize(size) => Command::Abort(format!(
            "a terminal of {}x{} cells: rows and columns must be at least 1",
            size.rows, size.cols
        )),
        ConsoleFrame::Signal(n) => Signal::from_number(i64::from(n)).map_or_else(
            || {
                let known: Vec<String> = Signal::ALL
                    .iter()
                    .map(|s| format!("{} ({s})", s.number()))
                    .collect();
                Command::Abort(format!(
                    "signal {n} is not one aloft sends; use one of {}",
                    known.join(", ")
                ))
            },
            Command::Signal,
        ),
        ConsoleFrame::Stdout(_)
        | ConsoleFrame::Stderr(_)
        | ConsoleFrame::Exit(_)
        | ConsoleFrame::Error(_) => Command::Abort(
            "a client sends only stdin, eof, resize and signal console frames; this one is the server's"
                .into(),
        ),
    }
}

/// The session's thread: applies the client's commands and forwards the command's events
/// until it exits, the session fails, or the client is gone.
fn pump(
    mut session: Box<dyn ConsoleSession>,
    mut commands: mpsc::Receiver<Command>,
    frames: &mpsc::Sender<ConsoleFrame>,
) {
    // A command that failed: the error, and until when an exit may still explain it.
    let mut failed: Option<(String, Instant)> = None;
    loop {
        loop {
            let command = match commands.try_recv() {
                Ok(c) => c,
                Err(mpsc::error::TryRecvError::Empty) => break,
                // The client went away.
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            };
            let result = match command {
                // Input after a failure goes nowhere, as into a closed pipe.
                _ if failed.is_some() => Ok(()),
                Command::Stdin(data) => session.stdin(&data),
                Command::Eof => session.close_stdin(),
                Command::Resize(size) => session.resize(size),
                Command::Signal(s) => session.signal(s),
                Command::Abort(message) => {
                    let _ = frames.blocking_send(ConsoleFrame::Error(message));
                    return;
                }
            };
            if let Err(e) = result {
                failed = Some((e.message().to_owned(), Instant::now() + EXIT_GRACE));
            }
        }
        if let Some((message, until)) = &failed
            && Instant::now() >= *until
        {
            let _ = frames.blocking_send(ConsoleFrame::Error(message.clone()));
            return;
        }
        let sent = match session.next(POLL) {
            Ok(None) => true,
            Ok(Some(ConsoleEvent::Stdout(data))) => {
                ConsoleFrame::chunks(&data, ConsoleFrame::Stdout).all(|f| frames.blocking_send(f).is_ok())
            }
            Ok(Some(ConsoleEvent::Stderr(data))) => {
                ConsoleFrame::chunks(&data, ConsoleFrame::Stderr).all(|f| frames.blocking_send(f).is_ok())
            }
            Ok(Some(ConsoleEvent::Exit(exit))) => {
                let _ = frames.blocking_send(ConsoleFrame::Exit(exit));
                return;
            }
            Err(e) => {
                let _ = frames.blocking_send(ConsoleFrame::Error(e.message().to_owned()));
                return;
            }
        };
        if !sent {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use aloft_api::ConsoleExit;
    use tokio::io::DuplexStream;
    use tokio::sync::Semaphore;

    use super::*;

    /// A scripted session: `next` hands out `events` (one per call), `stdin` fails once
    /// `refuse_stdin`; what it was sent goes into `log`, then `dropped` when it is gone.
    struct Script {
        events: VecDeque<ConsoleEvent>,
        refuse_stdin: bool,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl ConsoleSession for Script {
        fn stdin(&mut self, data: &[u8]) -> Result<(), ApiError> {
            if self.refuse_stdin {
                return Err(ApiError::precondition_failed("stdin is closed"));
            }
            self.log
                .lock()
                .unwrap()
                .push(format!("stdin {}", String::from_utf8_lossy(data)));
            Ok(())
        }

        fn close_stdin(&mut self) -> Result<(), ApiError> {
            self.log.lock().unwrap().push("eof".into());
            Ok(())
        }

        fn resize(&mut self, size: TtySize) -> Result<(), ApiError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("resize {}x{}", size.rows, size.cols));
            Ok(())
        }

        fn signal(&mut self, signal: Signal) -> Result<(), ApiError> {
            self.log.lock().unwrap().push(format!("signal {signal}"));
            Ok(())
        }

        fn next(&mut self, timeout: Duration) -> Result<Option<ConsoleEvent>, ApiError> {
            match self.events.pop_front() {
                Some(e) => Ok(Some(e)),
                None => {
                    std::thread::sleep(timeout);
                    Ok(None)
                }
            }
        }
    }

    impl Drop for Script {
        fn drop(&mut self) {
            self.log.lock().unwrap().push("dropped".into());
        }
    }

    /// Runs `script` over an in-memory connection; the client's end and the permits (one, held).
    fn start(script: Script) -> (DuplexStream, Arc<Semaphore>) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let permits = Arc::new(Semaphore::new(1));
        let permit = permits.clone().try_acquire_owned().unwrap();
        tokio::spawn(relay(server, Box::new(script), permit));
        (client, permits)
    }

    async fn send(c: &mut DuplexStream, frame: &ConsoleFrame) {
        let mut wire = Vec::new();
        frame.encode(&mut wire);
        c.write_all(&wire).await.unwrap();
    }

    /// Every frame until the server closes.
    async fn all_frames(c: &mut DuplexStream) -> Vec<ConsoleFrame> {
        let mut wire = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut wire))
            .await
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        let mut at = 0;
        while let Some((f, n)) = ConsoleFrame::decode(&wire[at..]).unwrap() {
            out.push(f);
            at += n;
        }
        assert_eq!(at, wire.len(), "a partial frame at the end");
        out
    }

    #[tokio::test]
    async fn commands_reach_the_session_and_events_the_client_in_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let big = vec![b'x'; aloft_api::MAX_CONSOLE_PAYLOAD + 10];
        let script = Script {
            events: VecDeque::from([
                ConsoleEvent::Stdout(big.clone()),
                ConsoleEvent::Stderr(b"e".to_vec()),
            ]),
            refuse_stdin: false,
            log: log.clone(),
        };
        let (mut c, permits) = start(script);
        send(&mut c, &ConsoleFrame::Stdin(b"ls\n".to_vec())).await;
        send(&mut c, &ConsoleFrame::Resize(TtySize { rows: 3, cols: 4 })).await;
        send(&mut c, &ConsoleFrame::Signal(2)).await;
        send(&mut c, &ConsoleFrame::Eof).await;
        // Closing the client's side ends the session once its commands are applied.
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.shutdown().await.unwrap();
        let frames = all_frames(&mut c).await;
        assert_eq!(
            frames,
            [
                ConsoleFrame::Stdout(big[..aloft_api::MAX_CONSOLE_PAYLOAD].to_vec()),
                ConsoleFrame::Stdout(vec![b'x'; 10]),
                ConsoleFrame::Stderr(b"e".to_vec()),
            ]
        );
        assert_eq!(
            *log.lock().unwrap(),
            ["stdin ls\n", "resize 3x4", "signal SIGINT", "eof", "dropped"]
        );
        assert_eq!(permits.available_permits(), 1, "the permit is back");
    }

    #[tokio::test]
    async fn input_racing_the_exit_still_reports_the_exit() {
        let log = Arc::new(Mutex::new(Vec::new()));
        // The command exited (its exit not yet received) and refuses input.
        let exit = ConsoleExit {
            exit_code: Some(4),
            signal: None,
        };
        let script = Script {
            events: VecDeque::from([ConsoleEvent::Exit(exit)]),
            refuse_stdin: true,
            log: log.clone(),
        };
        let (mut c, _) = start(script);
        send(&mut c, &ConsoleFrame::Stdin(b"late\n".to_vec())).await;
        assert_eq!(all_frames(&mut c).await, [ConsoleFrame::Exit(exit)]);
        // A command that refuses input and does not exit: the failure, after the grace.
        let script = Script {
            events: VecDeque::new(),
            refuse_stdin: true,
            log,
        };
        let (mut c, _) = start(script);
        send(&mut c, &ConsoleFrame::Stdin(b"x\n".to_vec())).await;
        let started = Instant::now();
        assert_eq!(
            all_frames(&mut c).await,
            [ConsoleFrame::Error("stdin is closed".into())]
        );
        assert!(started.elapsed() >= EXIT_GRACE - Duration::from_millis(100));
    }
}
