//! A spinner on stderr while the CLI waits for aloftd (a machine to start, stop …): redrawn in
//! place on a terminal by a small thread, one plain line otherwise (logs, CI, tests).

use std::io::{IsTerminal as _, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
const TICK: Duration = Duration::from_millis(100);

/// A running spinner; [`Spinner::finish`] ends it with a line saying how it went.
#[derive(Debug)]
pub(crate) struct Spinner {
    message: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    started: Instant,
    tty: bool,
}

impl Spinner {
    /// Starts `message` ("Waiting for machine X to start").
    pub(crate) fn start(message: &str) -> Self {
        let tty = std::io::stderr().is_terminal();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = if tty {
            let (stop, message) = (Arc::clone(&stop), message.to_owned());
            std::thread::Builder::new()
                .name("spinner".into())
                .spawn(move || {
                    let mut frame = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let mut err = std::io::stderr().lock();
                        let _ = write!(err, "\r\x1b[2K{} {message}", FRAMES[frame % FRAMES.len()]);
                        let _ = err.flush();
                        drop(err);
                        frame += 1;
                        std::thread::sleep(TICK);
                    }
                })
                .ok()
        } else {
            eprintln!("{message} ...");
            None
        };
        Self {
            message: message.to_owned(),
            stop,
            thread,
            started: Instant::now(),
            tty,
        }
    }

    /// Prints `line` on stderr above the spinner (which redraws below it on its next tick).
    pub(crate) fn line(&self, line: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = writeln!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Ends the spinner with `✓ MESSAGE (1.2s)` or, when `!ok`, `✗ MESSAGE`.
    pub(crate) fn finish(mut self, ok: bool) {
        self.end();
        let elapsed = self.started.elapsed().as_secs_f64();
        let mark = if ok { '✓' } else { '✗' };
        if self.tty {
            eprintln!("\r\x1b[2K{mark} {} ({elapsed:.1}s)", self.message);
        } else if ok {
            eprintln!("{mark} done ({elapsed:.1}s)");
        }
    }

    fn end(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.end();
            eprint!("\r\x1b[2K");
        }
    }
}
