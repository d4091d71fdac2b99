//! Machine logs: each machine's workload output (stdout, stderr) and the platform's lines about it
//! ("machine started", "main process exited with code 1, restarting (1/10)"), kept on disk,
//! bounded, and served as a tail ([`crate::Agent::log_tail`]) and as a follow
//! ([`crate::Agent::follow_logs`], a [`LogFollow`]).
//!
//! On disk, under the agent's directory (next to its database):
//!
//! | path | what |
//! |---|---|
//! | `logs/<machine id>/log.jsonl` | the current file: one JSON [`LogEntry`] per line |
//! | `logs/<machine id>/log.1.jsonl` … `log.<K>.jsonl` | rotated files, `1` the newest |
//!
//! The current file grows up to [`LogLimits::file_bytes`]; the line that would take it over
//! rotates it (`log.jsonl` → `log.1.jsonl` → … and `log.<K>.jsonl` is deleted), so a machine
//! never has more than `(K + 1) × file_bytes` on disk. `seq` increases by one per line across
//! rotations and agent restarts (the last one is read back when the log is first opened). The
//! directory is removed when the machine is destroyed (and by the agent's orphan sweep on open).
//!
//! Output comes in chunks; a [`LineSplitter`] per capture cuts it into lines, keeping a partial
//! line until its newline, the end of the VM, or [`MAX_LINE_BYTES`].
//!
//! Followers do not read the files: the writer keeps the newest lines in memory (about
//! [`RECENT_BYTES`]) and wakes followers through a condvar; a follower that falls further behind
//! skips to the oldest line still kept.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;

use aloft_api::{
    ApiError, LogEntry, LogEvent, LogFollower, LogMeta, LogStream, MachineConfig, MachineId, MachineState,
    RestartPolicy, rfc3339,
};

use crate::driver::{ExitInfo, LogReceiver, OutputStream};
use crate::error::AgentError;
use crate::ids::now_ms;
use crate::model::OpKind;
use crate::plan::DEFAULT_MAX_RETRIES;

/// Longest line kept whole, bytes: a longer one is cut into pieces of this size.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Workload output kept in memory per machine for followers, bytes (messages plus a fixed
/// overhead per line).
pub const RECENT_BYTES: usize = 256 * 1024;

/// What one line costs in [`RECENT_BYTES`] beyond its message.
const ENTRY_OVERHEAD: usize = 128;

/// Lines a resuming follower (`after_seq`) gets from disk at most; older ones are skipped.
const RESUME_LINES: usize = 1000;

/// Smallest [`LogLimits::file_bytes`]: room for a full line with its JSON envelope.
const MIN_FILE_BYTES: u64 = 4096;

const CURRENT: &str = "log.jsonl";

/// How much log a machine keeps ([`crate::AgentConfig::log_file_bytes`],
/// [`crate::AgentConfig::log_files_kept`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogLimits {
    /// Size of the current file before it rotates (at least 4 KiB).
    pub(crate) file_bytes: u64,
    /// Rotated files kept.
    pub(crate) keep: usize,
}

impl LogLimits {
    pub(crate) fn new(file_bytes: u64, keep: usize) -> Self {
        Self {
            file_bytes: file_bytes.max(MIN_FILE_BYTES),
            keep,
        }
    }
}

/// One complete line, before it gets its `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    pub(crate) stream: LogStream,
    pub(crate) message: String,
    /// Unix milliseconds: when its first byte arrived.
    pub(crate) at_ms: i64,
}

/// Cuts chunks of output into lines, per stream. Pure: the caller gives the time.
#[derive(Debug, Default)]
pub(crate) struct LineSplitter {
    stdout: Partial,
    stderr: Partial,
}

#[derive(Debug, Default)]
struct Partial {
    bytes: Vec<u8>,
    since_ms: i64,
}

/// Where to cut a full partial line `b`: its end, or before a UTF-8 sequence its last bytes begin
/// but do not complete (so that the character stays whole in the next piece).
fn cut_point(b: &[u8]) -> usize {
    let len = b.len();
    for back in 1..=3.min(len) {
        let p = len - back;
        let lead = b[p];
        if lead & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back
        }
        let need = match lead {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if p + need > len && p > 0 { p } else { len };
    }
    len
}

fn message(bytes: &[u8]) -> String {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    String::from_utf8_lossy(bytes).into_owned()
}

impl LineSplitter {
    /// The lines `data` completes (a newline, or a partial line reaching [`MAX_LINE_BYTES`]).
    pub(crate) fn push(&mut self, stream: OutputStream, data: &[u8], now_ms: i64) -> Vec<Line> {
        let (partial, api) = match stream {
            OutputStream::Stdout => (&mut self.stdout, LogStream::Stdout),
            OutputStream::Stderr => (&mut self.stderr, LogStream::Stderr),
        };
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            if partial.bytes.is_empty() {
                partial.since_ms = now_ms;
            }
            let room = MAX_LINE_BYTES - partial.bytes.len();
            match rest.iter().position(|&b| b == b'\n') {
                Some(nl) if nl <= room => {
                    partial.bytes.extend_from_slice(&rest[..nl]);
                    rest = &rest[nl + 1..];
                    out.push(Line {
                        stream: api,
                        message: message(&partial.bytes),
                        at_ms: partial.since_ms,
                    });
                    partial.bytes.clear();
                }
                _ => {
                    let take = rest.len().min(room);
                    partial.bytes.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    while partial.bytes.len() >= MAX_LINE_BYTES {
                        let at = cut_point(&partial.bytes[..MAX_LINE_BYTES]);
                        out.push(Line {
                            stream: api,
                            message: String::from_utf8_lossy(&partial.bytes[..at]).into_owned(),
                            at_ms: partial.since_ms,
                        });
                        partial.bytes.drain(..at);
                        partial.since_ms = now_ms;
                    }
                }
            }
        }
        out
    }

    /// The partial lines left (the output ended without a newline).
    pub(crate) fn flush(&mut self) -> Vec<Line> {
        let mut out = Vec::new();
        for (partial, stream) in [
            (&mut self.stdout, LogStream::Stdout),
            (&mut self.stderr, LogStream::Stderr),
        ] {
            if !partial.bytes.is_empty() {
                out.push(Line {
                    stream,
                    message: message(&partial.bytes),
                    at_ms: partial.since_ms,
                });
                partial.bytes.clear();
            }
        }
        out
    }
}

/// Writes one VM's output into `log` until the VM ends (then its partial lines too), the log is
/// removed, or the agent halts (`halted`, looked at every `poll`).
pub(crate) fn capture(mut rx: LogReceiver, log: &MachineLog, halted: &AtomicBool, poll: Duration) {
    /// Counts the capture as done however it ends.
    struct Done<'a>(&'a MachineLog);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.lock().captures -= 1;
            self.0.cond.notify_all();
        }
    }
    let _done = Done(log);
    let mut lines = LineSplitter::default();
    loop {
        if halted.load(Ordering::SeqCst) || log.removed() {
            return;
        }
        match rx.recv_timeout(poll) {
            Ok(chunk) => {
                // A write that fails (disk full) loses these lines; the next ones try again.
                let _ = log.write(lines.push(chunk.stream, &chunk.data, now_ms()));
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let _ = log.write(lines.flush());
                return;
            }
        }
    }
}

/// The platform line for the end of an operation that left the machine in `state`; `None` for
/// ends not worth a line (a machine created without booting).
pub(crate) fn op_line(
    kind: OpKind,
    from: MachineState,
    state: MachineState,
    error: Option<&str>,
) -> Option<String> {
    if let Some(e) = error {
        return Some(format!("{} failed, machine is {state}: {e}", kind.as_str()));
    }
    match state {
        MachineState::Started if kind == OpKind::Start && from == MachineState::Suspended => {
            Some("machine resumed".into())
        }
        MachineState::Started => Some("machine started".into()),
        MachineState::Stopped => Some("machine stopped".into()),
        MachineState::Suspended => Some("machine suspended".into()),
        MachineState::Destroyed => Some("machine destroyed".into()),
        _ => None,
    }
}

/// What the restart policy does after an exit, for [`exit_line`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterExit {
    /// Restart number `count`.
    Restart { count: u32 },
    /// `auto_destroy`.
    Destroy,
    /// Left stopped.
    Stop,
}

/// The platform line for a VM that ended by itself: how, and what happens next
/// ("main process exited with code 1, restarting (2/10)").
pub(crate) fn exit_line(exit: &ExitInfo, config: &MachineConfig, then: AfterExit) -> String {
    let how = if let Some(f) = &exit.failed {
        format!("main process failed: {f}")
    } else if exit.oom_killed {
        "main process was killed by the out-of-memory killer".to_owned()
    } else if let Some(s) = exit.signal {
        format!("main process was killed by signal {s}")
    } else if let Some(c) = exit.exit_code {
        format!("main process exited with code {c}")
    } else {
        "machine exited".to_owned()
    };
    let restart = config.restart.clone().unwrap_or_default();
    let max = match restart.policy.unwrap_or(RestartPolicy::OnFailure) {
        RestartPolicy::Always => restart.max_retries,
        _ => Some(restart.max_retries.unwrap_or(DEFAULT_MAX_RETRIES)),
    };
    match (then, max) {
        (AfterExit::Restart { count }, Some(max)) => format!("{how}, restarting ({count}/{max})"),
        (AfterExit::Restart { count }, None) => format!("{how}, restarting ({count})"),
        (AfterExit::Destroy, _) => format!("{how}, destroying the machine (auto_destroy)"),
        (AfterExit::Stop, _) => format!("{how}, machine stopped"),
    }
}

/// RFC 3339 with milliseconds, UTC.
fn timestamp(ms: i64) -> String {
    let secs = rfc3339(ms);
    let base = secs.strip_suffix('Z').unwrap_or(&secs);
    format!("{base}.{:03}Z", ms.rem_euclid(1000))
}

/// Every machine's log on this host.
#[derive(Debug)]
pub(crate) struct LogStore {
    root: PathBuf,
    limits: LogLimits,
    machines: Mutex<HashMap<MachineId, Arc<MachineLog>>>,
}

impl LogStore {
    /// Logs under `root` (`<agent dir>/logs`); nothing is created until a line is written.
    pub(crate) fn new(root: PathBuf, limits: LogLimits) -> Self {
        Self {
            root,
            limits,
            machines: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<MachineId, Arc<MachineLog>>> {
        self.machines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The machine's log if it was opened.
    pub(crate) fn get(&self, id: &MachineId) -> Option<Arc<MachineLog>> {
        self.lock().get(id).cloned()
    }

    /// The machine's log (opened, and its last `seq` read back, on first use).
    pub(crate) fn machine(&self, id: &MachineId, region: &str) -> Arc<MachineLog> {
        let mut map = self.lock();
        if let Some(log) = map.get(id) {
            return log.clone();
        }
        let log = Arc::new(MachineLog::open(
            self.root.join(id.as_str()),
            id.to_string(),
            region.to_owned(),
            self.limits,
        ));
        map.insert(id.clone(), log.clone());
        log
    }

    /// Removes the machine's log: its files go, writers stop, followers end. Idempotent.
    pub(crate) fn remove(&self, id: &MachineId) -> Result<(), AgentError> {
        // The handle stays (marked removed) so that a late writer cannot bring the files back.
        let log = self
            .lock()
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(MachineLog::new(
                    self.root.join(id.as_str()),
                    id.to_string(),
                    String::new(),
                    self.limits,
                ))
            })
            .clone();
        log.remove()
    }

    /// Machine ids that have a log directory (for the orphan sweep).
    pub(crate) fn on_disk(&self) -> Vec<MachineId> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect()
    }
}

/// One machine's log. See the module docs.
#[derive(Debug)]
pub(crate) struct MachineLog {
    dir: PathBuf,
    instance: String,
    region: String,
    limits: LogLimits,
    state: Mutex<State>,
    cond: Condvar,
}

#[derive(Debug)]
struct State {
    next_seq: u64,
    current: Option<File>,
    current_bytes: u64,
    removed: bool,
    recent: VecDeque<LogEntry>,
    recent_bytes: usize,
    /// Capture threads writing into this log.
    captures: usize,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AgentError {
    let path = path.to_owned();
    move |source| AgentError::Io { op, path, source }
}

/// The complete lines of a log file, parsed (unparsable lines skipped).
fn read_entries(path: &Path) -> Vec<LogEntry> {
    let Ok(f) = File::open(path) else {
        return Vec::new();
    };
    BufReader::new(f)
        .split(b'\n')
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_slice(&l).ok())
        .collect()
}

impl MachineLog {
    fn new(dir: PathBuf, instance: String, region: String, limits: LogLimits) -> Self {
        Self {
            dir,
            instance,
            region,
            limits,
            state: Mutex::new(State {
                next_seq: 1,
                current: None,
                current_bytes: 0,
                removed: false,
                recent: VecDeque::new(),
                recent_bytes: 0,
                captures: 0,
            }),
            cond: Condvar::new(),
        }
    }

    /// The log in `dir`, its next `seq` read back from the newest file that has a line.
    fn open(dir: PathBuf, instance: String, region: String, limits: LogLimits) -> Self {
        let log = Self::new(dir, instance, region, limits);
        let last = log
            .files()
            .iter()
            .find_map(|p| read_entries(p).last().map(|e| e.seq));
        log.lock().next_seq = last.map_or(1, |s| s.saturating_add(1));
        log
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn path(&self, n: usize) -> PathBuf {
        if n == 0 {
            self.dir.join(CURRENT)
        } else {
            self.dir.join(format!("log.{n}.jsonl"))
        }
    }

    /// The files, newest first (current, then `1` … `K`).
    fn files(&self) -> Vec<PathBuf> {
        (0..=self.limits.keep).map(|n| self.path(n)).collect()
    }

    /// Appends complete lines; nothing once the log is removed.
    pub(crate) fn write(&self, lines: Vec<Line>) -> Result<(), AgentError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut st = self.lock();
        if st.removed {
            return Ok(());
        }
        let mut result = Ok(());
        for line in lines {
            let entry = self.entry(line, st.next_seq);
            match self.append(&mut st, &entry) {
                Ok(()) => {
                    st.next_seq += 1;
                    st.recent_bytes += entry.message.len() + ENTRY_OVERHEAD;
                    st.recent.push_back(entry);
                    while st.recent_bytes > RECENT_BYTES {
                        let Some(old) = st.recent.pop_front() else { break };
                        st.recent_bytes -= old.message.len() + ENTRY_OVERHEAD;
                    }
                }
                Err(e) => {
                    // The file is in doubt: reopen it for the next line.
                    st.current = None;
                    result = Err(e);
                }
            }
        }
        drop(st);
        self.cond.notify_all();
        result
    }

    /// One platform line.
    pub(crate) fn platform(&self, message: impl Into<String>, at_ms: i64) -> Result<(), AgentError> {
        self.write(vec![Line {
            stream: LogStream::Platform,
            message: message.into(),
            at_ms,
        }])
    }

    fn entry(&self, line: Line, seq: u64) -> LogEntry {
        let (level, provider) = match line.stream {
            LogStream::Stderr => ("error", "app"),
            LogStream::Stdout => ("info", "app"),
            LogStream::Platform => ("info", "runner"),
        };
        LogEntry {
            timestamp: timestamp(line.at_ms),
            message: line.message,
            level: level.to_owned(),
            instance: self.instance.clone(),
            region: self.region.clone(),
            meta: LogMeta {
                event: LogEvent {
                    provider: provider.to_owned(),
                },
                stream: line.stream,
            },
            seq,
        }
    }

    /// The entry as one JSON line no longer than a file, its message shortened if need be.
    fn encode(&self, entry: &LogEntry) -> Vec<u8> {
        let limit = usize::try_from(self.limits.file_bytes).unwrap_or(usize::MAX);
        let mut e = entry.clone();
        loop {
            let mut json = serde_json::to_vec(&e).unwrap_or_default();
            json.push(b'\n');
            if json.len() <= limit || e.message.is_empty() {
                return json;
            }
            let mut half = e.message.len() / 2;
            while !e.message.is_char_boundary(half) {
                half -= 1;
            }
            e.message.truncate(half);
        }
    }

    fn append(&self, st: &mut State, entry: &LogEntry) -> Result<(), AgentError> {
        let json = self.encode(entry);
        let len = json.len() as u64;
        if st.current.is_none() {
            self.open_current(st)?;
        }
        if st.current_bytes > 0 && st.current_bytes + len > self.limits.file_bytes {
            self.rotate(st)?;
        }
        let Some(f) = st.current.as_mut() else {
            return Ok(());
        };
        let path = self.path(0);
        f.write_all(&json).map_err(io("write", &path))?;
        st.current_bytes += len;
        Ok(())
    }

    /// Opens the current file for appending; a line cut short by a crash is dropped.
    fn open_current(&self, st: &mut State) -> Result<(), AgentError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io("create", &self.dir))?;
        let path = self.path(0);
        let mut f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io("open", &path))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).map_err(io("read", &path))?;
        let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if keep < bytes.len() {
            f.set_len(keep as u64).map_err(io("truncate", &path))?;
        }
        f.seek(SeekFrom::Start(keep as u64)).map_err(io("seek", &path))?;
        st.current = Some(f);
        st.current_bytes = keep as u64;
        Ok(())
    }

    fn rotate(&self, st: &mut State) -> Result<(), AgentError> {
        st.current = None;
        let keep = self.limits.keep;
        let oldest = self.path(keep);
        match fs::remove_file(&oldest) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("remove", &oldest)(e)),
            _ => {}
        }
        for n in (0..keep).rev() {
            let from = self.path(n);
            if from.exists() {
                fs::rename(&from, self.path(n + 1)).map_err(io("rotate", &from))?;
            }
        }
        self.open_current(st)
    }

    fn remove(&self) -> Result<(), AgentError> {
        let mut st = self.lock();
        st.removed = true;
        st.current = None;
        let result = match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", &self.dir)(e)),
            _ => Ok(()),
        };
        drop(st);
        self.cond.notify_all();
        result
    }

    /// Registers a capture thread about to start ([`capture`] counts it as done when it ends).
    pub(crate) fn capture_started(&self) {
        self.lock().captures += 1;
    }

    /// Waits up to `timeout` until no capture thread writes into this log: called when a VM ended,
    /// so that its last output comes before the platform's line about the exit.
    pub(crate) fn wait_captured(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while st.captures > 0 {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Whether the log was removed (the machine is destroyed).
    pub(crate) fn removed(&self) -> bool {
        self.lock().removed
    }

    /// Every complete line on disk, oldest first. Called with the lock held, so that no rotation
    /// happens in between.
    fn all(&self, _st: &State) -> Vec<LogEntry> {
        let mut files = self.files();
        files.reverse();
        files.iter().flat_map(|p| read_entries(p)).collect()
    }

    /// The newest `lines` lines, oldest first.
    pub(crate) fn tail(&self, lines: usize) -> Vec<LogEntry> {
        let st = self.lock();
        if st.removed || lines == 0 {
            return Vec::new();
        }
        let mut all = self.all(&st);
        let skip = all.len().saturating_sub(lines);
        all.drain(..skip);
        all
    }

    /// A follower of lines written from now on; with `after_seq`, first the lines after it that
    /// are still on disk (at most the newest 1000).
    pub(crate) fn follow(self: &Arc<Self>, after_seq: Option<u64>) -> LogFollow {
        let st = self.lock();
        let mut pending = VecDeque::new();
        let mut skipped = 0;
        if let Some(after) = after_seq
            && !st.removed
        {
            let mut all: Vec<LogEntry> = self.all(&st).into_iter().filter(|e| e.seq > after).collect();
            let skip = all.len().saturating_sub(RESUME_LINES);
            if let Some(first) = all.first() {
                skipped = first.seq.saturating_sub(after + 1);
            }
            if skip > 0 {
                skipped += all[skip].seq.saturating_sub(all[0].seq);
            }
            all.drain(..skip);
            pending.extend(all);
        }
        LogFollow {
            log: self.clone(),
            next_seq: st.next_seq,
            pending,
            skipped,
        }
    }
}

/// New lines of one machine's log as they are written: what [`crate::Agent::follow_logs`]
/// returns. See [`LogFollower`].
#[derive(Debug)]
pub struct LogFollow {
    log: Arc<MachineLog>,
    next_seq: u64,
    pending: VecDeque<LogEntry>,
    skipped: u64,
}

impl LogFollow {
    /// A follower that has ended already (of a destroyed machine).
    pub(crate) fn ended(id: &MachineId, region: &str) -> Self {
        let log = MachineLog::new(
            PathBuf::new(),
            id.to_string(),
            region.to_owned(),
            LogLimits::new(0, 0),
        );
        log.lock().removed = true;
        Self {
            log: Arc::new(log),
            next_seq: 1,
            pending: VecDeque::new(),
            skipped: 0,
        }
    }

    /// Lines this follower skipped because it fell too far behind (or resumed from a `seq` that
    /// was rotated away).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Whether the machine was destroyed and every line before that was returned: [`next`]
    /// only answers with an error from now on.
    ///
    /// [`next`]: LogFollower::next
    pub fn is_ended(&self) -> bool {
        if !self.pending.is_empty() {
            return false;
        }
        let st = self.log.lock();
        st.removed && st.recent.back().is_none_or(|e| e.seq < self.next_seq)
    }
}

impl LogFollower for LogFollow {
    /// The next line, waiting up to `timeout`; once the machine is destroyed and its last lines
    /// were returned, a 404 error saying so (the follow is over).
    fn next(&mut self, timeout: Duration) -> Result<Option<LogEntry>, ApiError> {
        if let Some(e) = self.pending.pop_front() {
            self.next_seq = self.next_seq.max(e.seq + 1);
            return Ok(Some(e));
        }
        let deadline = Instant::now() + timeout;
        let mut st = self.log.lock();
        loop {
            if let Some(front) = st.recent.front() {
                if self.next_seq < front.seq {
                    self.skipped += front.seq - self.next_seq;
                    self.next_seq = front.seq;
                }
                let idx = usize::try_from(self.next_seq - front.seq).unwrap_or(usize::MAX);
                if let Some(e) = st.recent.get(idx) {
                    self.next_seq = e.seq + 1;
                    return Ok(Some(e.clone()));
                }
            }
            if st.removed {
                return Err(ApiError::not_found(format_args!(
                    "machine {} (destroyed; its log is gone)",
                    self.log.instance
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            st = self
                .log
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use aloft_api::{LogFollower, LogStream, MachineConfig, MachineId, WaitState};

    use super::*;
    use crate::{Agent, AgentConfig, CreateMachine, ExitInfo, FakeDriver, OutputStream, RestartBackoff};

    const T: Duration = Duration::from_secs(10);

    fn msgs(lines: &[Line]) -> Vec<&str> {
        lines.iter().map(|l| l.message.as_str()).collect()
    }

    #[test]
    fn splitter_cuts_lines_and_keeps_partial_ones_per_stream() {
        let mut s = LineSplitter::default();
        assert!(s.push(OutputStream::Stdout, b"hel", 1).is_empty());
        assert!(s.push(OutputStream::Stderr, b"err ", 2).is_empty());
        let out = s.push(OutputStream::Stdout, b"lo\r\nworld\n\nnext", 3);
        assert_eq!(msgs(&out), ["hello", "world", ""]);
        assert_eq!(out[0].at_ms, 1, "a line is dated by its first byte");
        assert_eq!(out[1].at_ms, 3);
        assert!(out.iter().all(|l| l.stream == LogStream::Stdout));
        let out = s.push(OutputStream::Stderr, b"line\n", 4);
        assert_eq!(msgs(&out), ["err line"]);
        assert_eq!(out[0].stream, LogStream::Stderr);
        let rest = s.flush();
        assert_eq!(msgs(&rest), ["next"]);
        assert!(s.flush().is_empty());
        // Invalid UTF-8 is replaced, not dropped.
        let out = s.push(OutputStream::Stdout, b"a\xffb\n", 5);
        assert_eq!(msgs(&out), ["a\u{fffd}b"]);
    }

    #[test]
    fn splitter_cuts_overlong_lines_on_char_boundaries() {
        let mut s = LineSplitter::default();
        let mut long = vec![b'x'; MAX_LINE_BYTES - 1];
        long.extend_from_slice("é".as_bytes()); // straddles the cap
        long.extend_from_slice(b"tail\n");
        let out = s.push(OutputStream::Stdout, &long[..100], 1);
        assert!(out.is_empty());
        let out = s.push(OutputStream::Stdout, &long[100..], 2);
        assert_eq!(
            out.len(),
            2,
            "{:?}",
            out.iter().map(|l| l.message.len()).collect::<Vec<_>>()
        );
        assert_eq!(out[0].message.len(), MAX_LINE_BYTES - 1);
        assert!(out[0].message.bytes().all(|b| b == b'x'));
        assert_eq!(out[1].message, "étail");
        // A line of exactly the cap with its newline is one line.
        let mut exact = vec![b'y'; MAX_LINE_BYTES];
        exact.push(b'\n');
        let out = s.push(OutputStream::Stdout, &exact, 3);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].message.len(), MAX_LINE_BYTES);
        assert!(s.flush().is_empty());
    }

    #[test]
    fn timestamps_have_milliseconds() {
        assert_eq!(timestamp(1_696_259_269_155), "2023-10-02T15:07:49.155Z");
        assert_eq!(timestamp(7), "1970-01-01T00:00:00.007Z");
    }

    fn line(n: usize) -> Line {
        Line {
            stream: LogStream::Stdout,
            message: format!("line {n} {}", "z".repeat(100)),
            at_ms: 1,
        }
    }

    fn disk_usage(dir: &Path) -> (u64, usize) {
        let mut total = 0;
        let mut files = 0;
        for e in fs::read_dir(dir).unwrap() {
            let len = e.unwrap().metadata().unwrap().len();
            total += len;
            files += 1;
        }
        (total, files)
    }

    #[test]
    fn rotation_keeps_disk_within_budget_and_tail_reads_across_files() {
        let tmp = tempfile::tempdir().unwrap();
        let limits = LogLimits::new(4096, 2);
        let dir = tmp.path().join("m");
        let log = MachineLog::open(dir.clone(), "m1".into(), "local".into(), limits);
        for n in 0..500 {
            log.write(vec![line(n)]).unwrap();
            let (total, files) = disk_usage(&dir);
            assert!(total <= 3 * 4096, "{total} bytes on disk after line {n}");
            assert!(files <= 3, "{files} files");
        }
        for f in fs::read_dir(&dir).unwrap() {
            assert!(f.unwrap().metadata().unwrap().len() <= 4096);
        }
        assert!(dir.join("log.2.jsonl").exists(), "rotated twice at least");
        // The tail spans the rotated files: contiguous seqs ending at the last line.
        let all = log.tail(usize::MAX);
        assert!(all.len() > 25, "{} lines kept", all.len());
        assert!(all.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        assert_eq!(all.last().unwrap().seq, 500);
        assert_eq!(all.last().unwrap().message, line(499).message);
        let first_in_current = read_entries(&dir.join(CURRENT))[0].seq;
        let tail = log.tail(usize::try_from(500 - first_in_current + 6).unwrap());
        assert_eq!(
            tail.first().unwrap().seq,
            first_in_current - 5,
            "reaches into log.1"
        );
        assert_eq!(tail.len(), usize::try_from(500 - first_in_current + 6).unwrap());
        // A message too big for a file is shortened to fit.
        log.write(vec![Line {
            stream: LogStream::Stderr,
            message: "\u{1}".repeat(MAX_LINE_BYTES),
            at_ms: 1,
        }])
        .unwrap();
        assert!(disk_usage(&dir).0 <= 3 * 4096);
        assert_eq!(log.tail(1)[0].seq, 501);
        // No limit below the minimum.
        assert_eq!(LogLimits::new(10, 0).file_bytes, MIN_FILE_BYTES);
    }

    #[test]
    fn seq_continues_after_reopen_and_a_torn_last_line_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let limits = LogLimits::new(4096, 1);
        let log = MachineLog::open(dir.clone(), "m1".into(), "local".into(), limits);
        for n in 0..60 {
            log.write(vec![line(n)]).unwrap();
        }
        drop(log);
        // A crash in the middle of a line.
        fs::OpenOptions::new()
            .append(true)
            .open(dir.join(CURRENT))
            .unwrap()
            .write_all(b"{\"timestamp\":\"20")
            .unwrap();
        let log = MachineLog::open(dir.clone(), "m1".into(), "local".into(), limits);
        log.platform("machine started", 2).unwrap();
        let tail = log.tail(3);
        assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), [59, 60, 61]);
        assert_eq!(tail[2].message, "machine started");
        assert_eq!(tail[2].meta.event.provider, "runner");
        // With the current file rotated away and empty, the seq comes from log.1.
        drop(log);
        fs::rename(dir.join(CURRENT), dir.join("log.1.jsonl")).unwrap();
        fs::write(dir.join(CURRENT), b"").unwrap();
        let log = MachineLog::open(dir, "m1".into(), "local".into(), limits);
        log.write(vec![line(0)]).unwrap();
        assert_eq!(log.tail(1)[0].seq, 62);
    }

    #[test]
    fn a_follower_that_falls_behind_skips() {
        let tmp = tempfile::tempdir().unwrap();
        let log = Arc::new(MachineLog::open(
            tmp.path().join("m"),
            "m1".into(),
            "local".into(),
            LogLimits::new(1 << 20, 2),
        ));
        let mut f = log.follow(None);
        assert_eq!(f.next(Duration::from_millis(10)).unwrap(), None);
        let n = RECENT_BYTES / (ENTRY_OVERHEAD + 100) + 100;
        for i in 0..n {
            log.write(vec![line(i)]).unwrap();
        }
        let first = f.next(Duration::ZERO).unwrap().unwrap();
        assert!(first.seq > 1, "the oldest lines were skipped");
        assert_eq!(f.skipped(), first.seq - 1);
        let mut last = first.seq;
        while let Some(e) = f.next(Duration::ZERO).unwrap() {
            assert_eq!(e.seq, last + 1);
            last = e.seq;
        }
        assert_eq!(last, n as u64);
        // Memory stays bounded.
        assert!(log.lock().recent_bytes <= RECENT_BYTES);
        // A resuming follower gets what is on disk after its seq, then new lines.
        let mut r = log.follow(Some(last - 3));
        let got: Vec<u64> = (0..3)
            .map(|_| r.next(Duration::ZERO).unwrap().unwrap().seq)
            .collect();
        assert_eq!(got, [last - 2, last - 1, last]);
        assert_eq!(r.next(Duration::ZERO).unwrap(), None);
        log.platform("new", 1).unwrap();
        assert_eq!(r.next(Duration::ZERO).unwrap().unwrap().message, "new");
    }

    // The agent with the fake driver.

    fn agent(dir: &Path, fake: &FakeDriver, file_bytes: u64) -> Agent {
        let config = AgentConfig {
            retry_delay: Duration::from_millis(1),
            boot_timeout: Duration::from_secs(2),
            stop_timeout: Duration::from_millis(100),
            restart: RestartBackoff {
                initial: Duration::from_millis(2),
                max: Duration::from_millis(16),
                window: Duration::from_secs(600),
            },
            poll: Duration::from_millis(10),
            log_file_bytes: file_bytes,
            log_files_kept: 2,
            ..AgentConfig::new(dir.join("agent.db"))
        };
        Agent::open(config, Arc::new(fake.clone())).unwrap()
    }

    fn start(agent: &Agent) -> MachineId {
        let h = agent
            .create(CreateMachine {
                app: "app1".into(),
                region: "ams".into(),
                org: 1,
                config: MachineConfig {
                    image: Some("busybox".into()),
                    ..MachineConfig::default()
                },
                ..CreateMachine::default()
            })
            .unwrap();
        h.wait(T).unwrap();
        h.machine
    }

    /// Waits until the log's tail has a line with `message`; returns the whole tail.
    fn wait_for(agent: &Agent, id: &MachineId, message: &str) -> Vec<LogEntry> {
        let deadline = Instant::now() + T;
        loop {
            let tail = agent.log_tail(id, 10_000).unwrap();
            if tail.iter().any(|e| e.message == message) {
                return tail;
            }
            assert!(Instant::now() < deadline, "no line {message:?} in {tail:#?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn find<'a>(tail: &'a [LogEntry], message: &str) -> &'a LogEntry {
        tail.iter().find(|e| e.message == message).unwrap()
    }

    #[test]
    fn workload_output_and_platform_lines_are_captured() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = FakeDriver::new();
        let agent = agent(tmp.path(), &fake, 1 << 20);
        let id = start(&agent);
        assert!(fake.emit_log(&id, OutputStream::Stdout, b"hello\nwor"));
        assert!(fake.emit_log(&id, OutputStream::Stderr, b"oops\n"));
        assert!(fake.emit_log(&id, OutputStream::Stdout, b"ld\n"));
        let tail = wait_for(&agent, &id, "world");
        let started = find(&tail, "machine started");
        assert_eq!(started.meta.stream, LogStream::Platform);
        assert_eq!(started.meta.event.provider, "runner");
        assert_eq!(started.level, "info");
        let hello = find(&tail, "hello");
        assert_eq!(
            (
                hello.meta.stream,
                hello.level.as_str(),
                hello.meta.event.provider.as_str()
            ),
            (LogStream::Stdout, "info", "app")
        );
        assert_eq!(
            (hello.instance.as_str(), hello.region.as_str()),
            (id.as_str(), "ams")
        );
        let oops = find(&tail, "oops");
        assert_eq!(
            (oops.meta.stream, oops.level.as_str()),
            (LogStream::Stderr, "error")
        );
        assert!(started.seq < hello.seq && hello.seq < oops.seq && oops.seq < find(&tail, "world").seq);
        assert!(tail.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        assert_eq!(agent.log_tail(&id, 2).unwrap().len(), 2);
        assert!(tmp.path().join("logs").join(id.as_str()).join(CURRENT).exists());

        // The workload crashes mid-line: the partial line, then why it ended and what follows.
        assert!(fake.emit_log(&id, OutputStream::Stdout, b"no newline"));
        fake.exit_workload(
            &id,
            ExitInfo {
                exit_code: Some(3),
                exited_at: 1,
                ..ExitInfo::default()
            },
        );
        let tail = wait_for(&agent, &id, "main process exited with code 3, restarting (1/10)");
        let partial = find(&tail, "no newline");
        assert!(partial.seq < find(&tail, "main process exited with code 3, restarting (1/10)").seq);
        // The restart boots again and captures the new VM's output.
        agent.wait(&id, &[WaitState::Started], None, None, T).unwrap();
        let deadline = Instant::now() + T;
        while !fake.emit_log(&id, OutputStream::Stdout, b"second boot\n") {
            assert!(
                Instant::now() < deadline,
                "the restarted VM's output is not captured"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        wait_for(&agent, &id, "second boot");

        agent
            .stop(&id, crate::StopOptions::default())
            .unwrap()
            .wait(T)
            .unwrap();
        wait_for(&agent, &id, "machine stopped");
    }

    #[test]
    fn seq_continues_across_agent_restarts_and_rotation() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = FakeDriver::new();
        let a = agent(tmp.path(), &fake, 4096);
        let id = start(&a);
        for n in 0..100 {
            assert!(fake.emit_log(&id, OutputStream::Stdout, format!("first {n}\n").as_bytes()));
        }
        wait_for(&a, &id, "first 99");
        drop(a);
        // The VM kept running; the new agent reattaches and captures it.
        let a = agent(tmp.path(), &fake, 4096);
        let deadline = Instant::now() + T;
        while !fake.emit_log(&id, OutputStream::Stdout, b"after reopen\n") {
            assert!(Instant::now() < deadline, "not captured after the reopen");
            std::thread::sleep(Duration::from_millis(5));
        }
        let tail = wait_for(&a, &id, "after reopen");
        assert!(tail.windows(2).all(|w| w[1].seq == w[0].seq + 1), "{tail:#?}");
        assert_eq!(find(&tail, "after reopen").seq, find(&tail, "first 99").seq + 1);
        let dir = tmp.path().join("logs").join(id.as_str());
        assert!(disk_usage(&dir).0 <= 3 * 4096);
        assert!(dir.join("log.1.jsonl").exists());
    }

    #[test]
    fn followers_see_new_lines_and_end_when_the_machine_is_destroyed() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = FakeDriver::new();
        let agent = agent(tmp.path(), &fake, 1 << 20);
        let id = start(&agent);
        wait_for(&agent, &id, "machine started");
        let mut f = agent.follow_logs(&id, None).unwrap();
        assert_eq!(f.next(Duration::from_millis(20)).unwrap(), None, "only new lines");
        let emitter = {
            let (fake, id) = (fake.clone(), id.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                fake.emit_log(&id, OutputStream::Stderr, b"live\n")
            })
        };
        let e = f.next(T).unwrap().expect("woken by the writer");
        assert_eq!((e.message.as_str(), e.meta.stream), ("live", LogStream::Stderr));
        assert!(emitter.join().unwrap());
        // A client resuming after the first line gets everything after it.
        let mut resumed = agent.follow_logs(&id, Some(1)).unwrap();
        assert_eq!(resumed.next(Duration::ZERO).unwrap().unwrap().message, "live");

        let dir = tmp.path().join("logs").join(id.as_str());
        assert!(dir.exists());
        agent.destroy(&id, true).unwrap().wait(T).unwrap();
        // The follower gets the last lines, then ends.
        let mut seen = Vec::new();
        let end = loop {
            match f.next(T) {
                Ok(Some(e)) => seen.push(e.message),
                Ok(None) => panic!("the follower did not end; saw {seen:?}"),
                Err(e) => break e,
            }
        };
        assert_eq!(end.status(), 404);
        assert_eq!(seen.last().map(String::as_str), Some("machine destroyed"));
        assert!(f.is_ended());
        assert!(!dir.exists(), "the log goes with the machine");
        assert!(agent.log_tail(&id, 10).unwrap().is_empty());
        let mut late = agent.follow_logs(&id, None).unwrap();
        assert!(late.next(Duration::ZERO).is_err());
        assert!(late.is_ended());
    }

    #[test]
    fn orphaned_logs_are_removed_on_open() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = FakeDriver::new();
        let a = agent(tmp.path(), &fake, 1 << 20);
        let id = start(&a);
        wait_for(&a, &id, "machine started");
        drop(a);
        let orphan = tmp.path().join("logs").join("0123456789abcd");
        fs::create_dir_all(&orphan).unwrap();
        fs::write(orphan.join(CURRENT), b"").unwrap();
        let not_a_machine = tmp.path().join("logs").join("README");
        fs::write(&not_a_machine, b"kept").unwrap();
        let a = agent(tmp.path(), &fake, 1 << 20);
        assert!(!orphan.exists());
        assert!(not_a_machine.exists(), "only machine directories are swept");
        assert!(
            tmp.path().join("logs").join(id.as_str()).exists(),
            "a live machine keeps its log"
        );
        assert!(!a.log_tail(&id, 10).unwrap().is_empty());
    }

    #[test]
    fn op_and_exit_lines() {
        let config = MachineConfig::default();
        let crash = ExitInfo {
            exit_code: Some(1),
            ..ExitInfo::default()
        };
        assert_eq!(
            exit_line(&crash, &config, AfterExit::Restart { count: 2 }),
            "main process exited with code 1, restarting (2/10)"
        );
        let oom = ExitInfo {
            oom_killed: true,
            signal: Some(9),
            ..ExitInfo::default()
        };
        assert_eq!(
            exit_line(&oom, &config, AfterExit::Stop),
            "main process was killed by the out-of-memory killer, machine stopped"
        );
        let always = MachineConfig {
            restart: Some(aloft_api::MachineRestart {
                policy: Some(RestartPolicy::Always),
                max_retries: None,
                gpu_bid_price: None,
            }),
            ..MachineConfig::default()
        };
        let signalled = ExitInfo {
            signal: Some(15),
            ..ExitInfo::default()
        };
        assert_eq!(
            exit_line(&signalled, &always, AfterExit::Restart { count: 4 }),
            "main process was killed by signal 15, restarting (4)"
        );
        assert_eq!(
            op_line(
                OpKind::Start,
                MachineState::Suspended,
                MachineState::Started,
                None
            )
            .as_deref(),
            Some("machine resumed")
        );
        assert_eq!(
            op_line(
                OpKind::Create,
                MachineState::Creating,
                MachineState::Created,
                None
            ),
            None
        );
        assert_eq!(
            op_line(
                OpKind::Start,
                MachineState::Stopped,
                MachineState::Failed,
                Some("boom")
            )
            .as_deref(),
            Some("start failed, machine is failed: boom")
        );
    }
}
