//! `GET /v1/apps/{app}/machines/{id}/console`: an interactive command in a machine
//! (`aloft ssh console`; [`aloft_api::ConsoleQuery`] is the contract).
//!
//! The request asks for `Upgrade: aloft-console`; on `101 Switching Protocols` the connection
//! carries [`ConsoleFrame`]s both ways (reqwest's HTTP/1.1 upgrade, no other HTTP stack). Any
//! other answer is an API error as for every endpoint. [`ConsoleConnection::split`] gives a
//! [`ConsoleReader`] of the server's frames and a [`ConsoleWriter`] of the client's, to be driven
//! from different tasks.

use std::fmt;
use std::io;

use aloft_api::{CONSOLE_UPGRADE, ConsoleFrame, ConsoleFrameError, ConsoleQuery, ConsoleRequest};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::machines::machine_path;
use crate::{Client, ClientError};

/// Bytes asked of the connection per read.
const READ_CHUNK: usize = 16 * 1024;

/// Why a console connection's frames stopped making sense.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Reading or writing the connection failed.
    #[error("console connection: {0}")]
    Io(#[from] io::Error),
    /// The server sent bytes that are not a frame.
    #[error("console connection: {0}")]
    Frame(#[from] ConsoleFrameError),
    /// The connection closed in the middle of a frame.
    #[error("console connection closed in the middle of a frame")]
    Truncated,
}

/// An upgraded console connection; see [`Client::console`].
pub struct ConsoleConnection {
    reader: ConsoleReader,
    writer: ConsoleWriter,
}

impl fmt::Debug for ConsoleConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleConnection").finish_non_exhaustive()
    }
}

impl ConsoleConnection {
    /// Frames over `io`: the upgraded HTTP connection, or any byte stream (tests use a pipe).
    pub fn new<S>(io: S) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(io);
        Self {
            reader: ConsoleReader {
                io: Box::new(read),
                buf: Vec::new(),
            },
            writer: ConsoleWriter {
                io: Box::new(write),
                buf: Vec::new(),
            },
        }
    }

    /// The server's frames and the way to send the client's.
    pub fn split(self) -> (ConsoleReader, ConsoleWriter) {
        (self.reader, self.writer)
    }
}

/// Frames from the server: output, then [`ConsoleFrame::Exit`] or [`ConsoleFrame::Error`].
pub struct ConsoleReader {
    io: Box<dyn AsyncRead + Send + Unpin>,
    /// Bytes read and not yet decoded.
    buf: Vec<u8>,
}

impl fmt::Debug for ConsoleReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleReader")
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl ConsoleReader {
    /// The next frame; `Ok(None)` when the connection closed between frames.
    ///
    /// Cancel-safe: dropping the future (a `select!` branch that lost) loses nothing; the bytes
    /// read so far stay buffered for the next call.
    pub async fn next(&mut self) -> Result<Option<ConsoleFrame>, ConsoleError> {
        loop {
            if let Some((frame, used)) = ConsoleFrame::decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(Some(frame));
            }
            self.buf.reserve(READ_CHUNK);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ConsoleError::Truncated)
                };
            }
        }
    }
}

/// Frames to the server: stdin, its end, resizes and signals.
pub struct ConsoleWriter {
    io: Box<dyn AsyncWrite + Send + Unpin>,
    /// The wire form of the frame being sent (kept to save allocations).
    buf: Vec<u8>,
}

impl fmt::Debug for ConsoleWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleWriter").finish_non_exhaustive()
    }
}

impl ConsoleWriter {
    /// Sends one frame and flushes it. Data frames over [`aloft_api::MAX_CONSOLE_PAYLOAD`] are
    /// sent as several (the server would refuse one that large).
    pub async fn send(&mut self, frame: &ConsoleFrame) -> io::Result<()> {
        self.buf.clear();
        match frame {
            ConsoleFrame::Stdin(data) => {
                for part in ConsoleFrame::chunks(data, ConsoleFrame::Stdin) {
                    part.encode(&mut self.buf);
                }
            }
            other => other.encode(&mut self.buf),
        }
        self.io.write_all(&self.buf).await?;
        self.io.flush().await
    }

    /// Closes the client's side of the connection (the server sees it end; the command is
    /// killed unless it has exited).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.io.shutdown().await
    }
}

impl Client {
    /// `GET …/machines/{id}/console` upgraded to `aloft-console`: runs `request` in a started
    /// machine and returns the connection its frames go over. The command runs until it exits or
    /// the connection is dropped. Errors before the upgrade are API errors (412: the machine is
    /// not started; 404: no such machine); a success status other than 101 is a
    /// [`ClientError::Upgrade`].
    pub async fn console(
        &self,
        app: &str,
        machine_id: &str,
        request: &ConsoleRequest,
    ) -> Result<ConsoleConnection, ClientError> {
        let mut path = machine_path(app, machine_id, "/console");
        let query = ConsoleQuery::to_query(request);
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query);
        }
        let upgraded = self.upgrade(&path, CONSOLE_UPGRADE).await?;
        Ok(ConsoleConnection::new(upgraded))
    }
}

#[cfg(test)]
mod tests {
    use aloft_api::{ConsoleExit, MAX_CONSOLE_PAYLOAD, TtySize};

    use super::*;

    fn wire(frames: &[ConsoleFrame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            f.encode(&mut out);
        }
        out
    }

    /// The server's frames arrive whole however the bytes are cut, then the clean end.
    #[tokio::test]
    async fn reader_decodes_frames_cut_anywhere() {
        let frames = vec![
            ConsoleFrame::Stdout(b"hi\n".to_vec()),
            ConsoleFrame::Stderr(vec![0xff; 3]),
            ConsoleFrame::Stdout(vec![b'x'; MAX_CONSOLE_PAYLOAD]),
            ConsoleFrame::Exit(ConsoleExit {
                exit_code: Some(3),
                signal: None,
            }),
        ];
        let bytes = wire(&frames);
        for cut in [1, 2, 5, 7, 4096, bytes.len()] {
            let (client, mut server) = tokio::io::duplex(64);
            let (mut reader, _writer) = ConsoleConnection::new(client).split();
            let bytes = bytes.clone();
            let feeder = tokio::spawn(async move {
                for piece in bytes.chunks(cut) {
                    server.write_all(piece).await.unwrap();
                }
                server.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            while let Some(f) = reader.next().await.unwrap() {
                got.push(f);
            }
            assert_eq!(got, frames, "cut {cut}");
            feeder.await.unwrap();
        }
    }

    #[tokio::test]
    async fn reader_reports_a_truncated_or_bad_frame() {
        let (client, mut server) = tokio::io::duplex(64);
        let (mut reader, _writer) = ConsoleConnection::new(client).split();
        let mut bytes = wire(&[ConsoleFrame::Stdout(b"abc".to_vec())]);
        bytes.pop();
        server.write_all(&bytes).await.unwrap();
        drop(server);
        assert!(matches!(reader.next().await, Err(ConsoleError::Truncated)));

        let (client, mut server) = tokio::io::duplex(64);
        let (mut reader, _writer) = ConsoleConnection::new(client).split();
        server.write_all(&[42, 0, 0, 0, 0]).await.unwrap();
        assert!(matches!(
            reader.next().await,
            Err(ConsoleError::Frame(ConsoleFrameError::UnknownKind(42)))
        ));
    }

    /// A `next` abandoned half-way through a frame (a `select!` branch that lost) keeps what it
    /// read: the frame arrives whole on the next call.
    #[tokio::test]
    async fn reader_next_is_cancel_safe() {
        let (client, mut server) = tokio::io::duplex(64);
        let (mut reader, _writer) = ConsoleConnection::new(client).split();
        let bytes = wire(&[ConsoleFrame::Stdout(b"abcdef".to_vec())]);
        server.write_all(&bytes[..7]).await.unwrap();
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), reader.next()).await;
        assert!(waited.is_err(), "{waited:?}");
        server.write_all(&bytes[7..]).await.unwrap();
        assert_eq!(
            reader.next().await.unwrap(),
            Some(ConsoleFrame::Stdout(b"abcdef".to_vec()))
        );
    }

    /// What the writer sends decodes to the frames given, big stdin split under the limit.
    #[tokio::test]
    async fn writer_sends_frames_and_splits_big_stdin() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let (_reader, mut writer) = ConsoleConnection::new(client).split();
        let big = vec![7u8; MAX_CONSOLE_PAYLOAD + 10];
        let size = TtySize { rows: 40, cols: 100 };
        writer.send(&ConsoleFrame::Resize(size)).await.unwrap();
        writer.send(&ConsoleFrame::Stdin(big.clone())).await.unwrap();
        writer.send(&ConsoleFrame::Eof).await.unwrap();
        writer.shutdown().await.unwrap();
        let mut bytes = Vec::new();
        server.read_to_end(&mut bytes).await.unwrap();
        let mut got = Vec::new();
        let mut at = 0;
        while let Some((f, n)) = ConsoleFrame::decode(&bytes[at..]).unwrap() {
            got.push(f);
            at += n;
        }
        assert_eq!(at, bytes.len());
        assert_eq!(
            got,
            [
                ConsoleFrame::Resize(size),
                ConsoleFrame::Stdin(big[..MAX_CONSOLE_PAYLOAD].to_vec()),
                ConsoleFrame::Stdin(big[MAX_CONSOLE_PAYLOAD..].to_vec()),
                ConsoleFrame::Eof,
            ]
        );
    }

    /// A reader and a writer on separate tasks against a fake server that echoes stdin and
    /// exits with the status the last line names.
    #[tokio::test]
    async fn halves_work_from_separate_tasks() {
        let (client, server) = tokio::io::duplex(256);
        let fake = tokio::spawn(async move {
            let (mut sr, mut sw) = ConsoleConnection::new(server).split();
            let mut input = Vec::new();
            loop {
                match sr.next().await.unwrap() {
                    Some(ConsoleFrame::Stdin(d)) => {
                        input.extend_from_slice(&d);
                        sw.send(&ConsoleFrame::Stdout(d)).await.unwrap();
                    }
                    Some(ConsoleFrame::Eof) | None => break,
                    Some(other) => panic!("unexpected {other:?}"),
                }
            }
            let code = String::from_utf8(input)
                .unwrap()
                .trim()
                .rsplit(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            sw.send(&ConsoleFrame::Exit(ConsoleExit {
                exit_code: Some(code),
                signal: None,
            }))
            .await
            .unwrap();
        });
        let (mut reader, mut writer) = ConsoleConnection::new(client).split();
        let sender = tokio::spawn(async move {
            for line in ["echo hi\n", "exit 3\n"] {
                writer.send(&ConsoleFrame::Stdin(line.into())).await.unwrap();
            }
            writer.send(&ConsoleFrame::Eof).await.unwrap();
            writer
        });
        let mut out = Vec::new();
        let exit = loop {
            match reader.next().await.unwrap() {
                Some(ConsoleFrame::Stdout(d)) => out.extend_from_slice(&d),
                Some(ConsoleFrame::Exit(e)) => break e,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(out, b"echo hi\nexit 3\n");
        assert_eq!(exit.status(), 3);
        fake.await.unwrap();
        drop(sender.await.unwrap());
    }
}
