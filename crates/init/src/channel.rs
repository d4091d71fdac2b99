//! The host↔guest channel: the `aloft.0` virtio-serial port, non-blocking.
//!
//! While no host is connected the port reports POLLHUP, reads return 0 and writes would block, so
//! the supervisor (and a template waiting for its boot request) re-checks the connection on a
//! short timer instead of polling the fd. Writes go through an outgoing queue of whole frames
//! (PID 1 never blocks on the host); workload logs are kept in a bounded buffer until a host says
//! hello, and what does not fit is counted as dropped.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use aloft_guest_proto::{CHANNEL_NAME, DataStream, Decoder, Frame};

use crate::{console, sys};

/// Largest data chunk per frame.
pub(crate) const CHUNK: usize = 32 * 1024;
/// Workload output kept while no host listens.
const LOG_BUFFER: usize = 256 * 1024;
/// Outgoing bytes queued before init stops reading its children's output (backpressure).
const OUT_HIGH_WATER: usize = 1024 * 1024;

/// Finds the `aloft.0` port's device node, creating it from sysfs when devtmpfs lacks it.
fn find_port() -> Option<String> {
    for entry in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() != CHANNEL_NAME {
            continue;
        }
        let dev = format!("/dev/{}", entry.file_name().to_string_lossy());
        if fs::metadata(&dev).is_err() {
            let numbers = fs::read_to_string(entry.path().join("dev")).unwrap_or_default();
            let (major, minor) = numbers.trim().split_once(':')?;
            sys::mknod_char(&dev, 0o600, major.parse().ok()?, minor.parse().ok()?).ok()?;
        }
        return Some(dev);
    }
    None
}

#[derive(Debug)]
pub(crate) struct Channel {
    file: Option<File>,
    connected: bool,
    hello: bool,
    dec: Decoder,
    /// Frames read from the current connection but not handled yet ([`Channel::put_back`]);
    /// [`Channel::read_frames`] returns them first.
    unread: VecDeque<Frame>,
    out: VecDeque<Vec<u8>>,
    /// Bytes of `out[0]` already written.
    out_off: usize,
    out_bytes: usize,
    logs: VecDeque<(DataStream, Vec<u8>)>,
    log_bytes: usize,
    pub(crate) dropped_log_bytes: u64,
}

impl Channel {
    /// Opens the port; without one (no device, old host) the channel stays closed forever.
    pub(crate) fn open() -> Self {
        let file = find_port().and_then(|dev| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
                .open(&dev)
                .map_err(|e| console::diag(&format!("open channel {dev}: {e}")))
                .ok()
        });
        Self::with_file(file)
    }

    fn with_file(file: Option<File>) -> Self {
        Self {
            file,
            connected: false,
            hello: false,
            dec: Decoder::new(),
            unread: VecDeque::new(),
            out: VecDeque::new(),
            out_off: 0,
            out_bytes: 0,
            logs: VecDeque::new(),
            log_bytes: 0,
            dropped_log_bytes: 0,
        }
    }

    /// A channel without a port that behaves as if a host were connected (for tests: what it
    /// would send is in [`Channel::take_sent`]).
    #[cfg(test)]
    pub(crate) fn connected_without_port() -> Self {
        let mut ch = Self::with_file(None);
        ch.connected = true;
        ch
    }

    /// The frames queued for the host, taken out of the queue (tests).
    #[cfg(test)]
    pub(crate) fn take_sent(&mut self) -> Vec<Frame> {
        self.out_bytes = 0;
        self.out_off = 0;
        self.out
            .drain(..)
            .map(|bytes| {
                let mut d = Decoder::new();
                d.push(&bytes);
                d.next_frame().expect("a whole frame").expect("a valid frame")
            })
            .collect()
    }

    pub(crate) fn exists(&self) -> bool {
        self.file.is_some()
    }

    pub(crate) fn connected(&self) -> bool {
        self.connected
    }

    pub(crate) fn said_hello(&self) -> bool {
        self.hello
    }

    /// Re-reads whether a host is connected (no POLLHUP) and resets per-connection state on a change.
    pub(crate) fn refresh(&mut self) {
        let Some(file) = &self.file else { return };
        let mut pfd = [libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let now = match sys::poll(&mut pfd, 0) {
            Ok(_) => pfd[0].revents & libc::POLLHUP == 0,
            Err(_) => false,
        };
        if now != self.connected {
            self.set_connected(now);
        }
    }

    fn set_connected(&mut self, now: bool) {
        self.connected = now;
        self.hello = false;
        self.dec = Decoder::new();
        // Requests of a host that is gone: like its half-received frame, nobody waits for them.
        self.unread.clear();
        if self.out_off > 0 {
            // Half-sent to the previous host: the rest would corrupt the next connection's stream.
            if let Some(f) = self.out.pop_front() {
                self.out_bytes -= f.len();
            }
            self.out_off = 0;
        }
    }

    /// (fd, events) for the main poll, while connected.
    pub(crate) fn poll_fd(&self) -> Option<(RawFd, i16)> {
        let file = self.file.as_ref().filter(|_| self.connected)?;
        let events = if self.out.is_empty() {
            libc::POLLIN
        } else {
            libc::POLLIN | libc::POLLOUT
        };
        Some((file.as_raw_fd(), events))
    }

    /// Frames read but not handled, to be returned again (in order, before anything newer) by the
    /// next [`Channel::read_frames`]: what came after the boot request of a template boot, for the
    /// supervisor. Dropped if the host disconnects first.
    pub(crate) fn put_back(&mut self, frames: impl IntoIterator<Item = Frame>) {
        let mut frames: VecDeque<Frame> = frames.into_iter().collect();
        frames.append(&mut self.unread);
        self.unread = frames;
    }

    /// Whether [`Channel::put_back`] left frames that no poll would announce.
    pub(crate) fn has_unread(&self) -> bool {
        !self.unread.is_empty()
    }

    /// Reads what the host sent and returns the whole frames, after any put back. A malformed
    /// stream is discarded.
    pub(crate) fn read_frames(&mut self) -> Vec<Frame> {
        let mut frames: Vec<Frame> = self.unread.drain(..).collect();
        let Some(file) = &mut self.file else { return frames };
        let mut buf = [0u8; 16 * 1024];
        let mut eof = false;
        loop {
            match file.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => self.dec.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        loop {
            match self.dec.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    console::diag(&format!("channel: {e}; dropping received bytes"));
                    self.dec = Decoder::new();
                    break;
                }
            }
        }
        if eof && self.connected {
            self.set_connected(false);
        }
        frames
    }

    /// Queues a frame for the connected host; without a host it is dropped (the host gets the
    /// current status when it says hello).
    pub(crate) fn send(&mut self, frame: &Frame) {
        if !self.connected {
            return;
        }
        let bytes = frame.to_bytes();
        self.out_bytes += bytes.len();
        self.out.push_back(bytes);
    }

    /// Workload output: straight to the host after its hello, otherwise into the bounded buffer.
    pub(crate) fn log(&mut self, stream: DataStream, data: &[u8]) {
        if self.hello {
            for chunk in data.chunks(CHUNK) {
                self.send(&Frame::Log {
                    stream,
                    data: chunk.to_vec(),
                });
            }
            return;
        }
        self.logs.push_back((stream, data.to_vec()));
        self.log_bytes += data.len();
        while self.log_bytes > LOG_BUFFER {
            let Some((_, old)) = self.logs.pop_front() else {
                break;
            };
            self.log_bytes -= old.len();
            self.dropped_log_bytes += old.len() as u64;
        }
    }

    /// The host said hello: `status` first, then the buffered logs.
    pub(crate) fn hello(&mut self, status: &Frame) {
        self.hello = true;
        self.send(status);
        let logs = std::mem::take(&mut self.logs);
        self.log_bytes = 0;
        for (stream, data) in logs {
            self.log(stream, &data);
        }
    }

    /// Whether init may read more child output now (false while the host is slow to read).
    pub(crate) fn accepts_output(&self) -> bool {
        self.out_bytes < OUT_HIGH_WATER
    }

    pub(crate) fn has_pending(&self) -> bool {
        !self.out.is_empty()
    }

    /// Writes queued frames until the port would block.
    pub(crate) fn flush(&mut self) {
        let Some(file) = &mut self.file else { return };
        if !self.connected {
            return;
        }
        while let Some(front) = self.out.front() {
            match file.write(&front[self.out_off..]) {
                Ok(0) => break,
                Ok(n) => {
                    self.out_off += n;
                    if self.out_off == front.len() {
                        self.out_bytes -= front.len();
                        self.out.pop_front();
                        self.out_off = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_bounded_while_no_host_listens_and_oldest_dropped() {
        let mut ch = Channel::with_file(None);
        ch.log(DataStream::Stdout, b"first\n");
        let big = vec![b'x'; 100 * 1024];
        for _ in 0..3 {
            ch.log(DataStream::Stderr, &big);
        }
        assert_eq!(ch.dropped_log_bytes, 6 + 100 * 1024);
        assert_eq!(ch.log_bytes, 200 * 1024);
        assert!(ch.logs.iter().all(|(s, _)| *s == DataStream::Stderr));
    }

    #[test]
    fn hello_queues_status_then_buffered_logs_in_chunks() {
        let mut ch = Channel::with_file(None);
        ch.log(DataStream::Stdout, &vec![b'a'; CHUNK + 10]);
        ch.connected = true;
        let status = Frame::Hello; // any frame stands in for the status here
        ch.hello(&status);
        let frames: Vec<Frame> = ch
            .out
            .iter()
            .map(|b| {
                let mut d = aloft_guest_proto::Decoder::new();
                d.push(b);
                d.next_frame().unwrap().unwrap()
            })
            .collect();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0], Frame::Hello);
        assert!(matches!(&frames[1], Frame::Log { data, .. } if data.len() == CHUNK));
        assert!(matches!(&frames[2], Frame::Log { data, .. } if data.len() == 10));
        assert_eq!(ch.log_bytes, 0);
        assert!(!ch.accepts_output() || ch.out_bytes < OUT_HIGH_WATER);
    }

    #[test]
    fn frames_put_back_come_first_and_go_with_the_host() {
        let mut ch = Channel::with_file(None);
        ch.connected = true;
        ch.put_back([Frame::Sync { chan: 2 }, Frame::Hello]);
        ch.put_back([Frame::Sync { chan: 1 }]);
        assert!(ch.has_unread());
        assert_eq!(
            ch.read_frames(),
            [Frame::Sync { chan: 1 }, Frame::Sync { chan: 2 }, Frame::Hello]
        );
        assert!(!ch.has_unread());
        ch.put_back([Frame::Hello]);
        ch.set_connected(false);
        assert!(!ch.has_unread());
        assert!(ch.read_frames().is_empty());
    }

    #[test]
    fn nothing_is_queued_without_a_host() {
        let mut ch = Channel::with_file(None);
        ch.send(&Frame::Hello);
        assert!(!ch.has_pending());
    }
}
