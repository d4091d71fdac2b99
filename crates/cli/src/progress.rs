//! Transfer progress on stderr: one line redrawn in place (`\r`) when stderr is a terminal, plain
//! lines otherwise (logs, CI, tests). Hand-rolled: no progress-bar dependency.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aloft_image::{Digest, Progress, PullEvent};

/// Longest redrawn line (a terminal narrower than this wraps it; fine).
const MAX_LINE: usize = 160;
/// Fastest redraw rate.
const REDRAW: Duration = Duration::from_millis(100);

/// Shows a pull's or push's events. Share it through [`Display::progress`].
#[derive(Debug)]
pub(crate) struct Display {
    tty: bool,
    /// What the transfer is called in messages (`pull`, `push`).
    verb: &'static str,
    state: Mutex<State>,
}

struct State {
    /// Where everything goes (stderr, or a buffer in tests).
    out: Box<dyn Write + Send>,
    /// Blobs in order of first appearance.
    blobs: Vec<Blob>,
    last_draw: Option<Instant>,
    drawn: bool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("blobs", &self.blobs)
            .field("drawn", &self.drawn)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Blob {
    digest: Digest,
    transferred: u64,
    size: u64,
    done: bool,
}

impl Display {
    /// A display for stderr (redrawing when it is a terminal).
    pub(crate) fn new(verb: &'static str) -> Arc<Self> {
        Self::with_output(verb, std::io::stderr().is_terminal(), Box::new(std::io::stderr()))
    }

    /// A display writing to `out`, redrawing lines when `tty`.
    fn with_output(verb: &'static str, tty: bool, out: Box<dyn Write + Send>) -> Arc<Self> {
        Arc::new(Self {
            tty,
            verb,
            state: Mutex::new(State {
                out,
                blobs: Vec::new(),
                last_draw: None,
                drawn: false,
            }),
        })
    }

    /// A progress sink feeding this display.
    pub(crate) fn progress(self: &Arc<Self>) -> Progress {
        let me = Arc::clone(self);
        Progress::new(move |event| me.event(event))
    }

    /// A status line (a build step); redraws in place on a terminal for `I: …` chatter.
    pub(crate) fn status(&self, line: &str) {
        let mut state = self.lock();
        if self.tty && line.starts_with("I: ") {
            draw(&mut state, &format!("  {line}"));
        } else {
            self.line(&mut state, line);
        }
    }

    /// Ends the redrawn line, if any.
    pub(crate) fn finish(&self) {
        let mut state = self.lock();
        if state.drawn {
            let _ = writeln!(state.out);
            state.drawn = false;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while drawing leaves nothing inconsistent worth refusing to print over.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Prints a full line, above the redrawn one.
    fn line(&self, state: &mut State, text: &str) {
        if state.drawn {
            let _ = write!(state.out, "\r\x1b[2K");
            state.drawn = false;
        }
        let _ = writeln!(state.out, "{text}");
    }

    fn event(&self, event: PullEvent) {
        let mut state = self.lock();
        // Byte progress redraws at most every REDRAW; every other event shows at once.
        let force = !matches!(event, PullEvent::BlobProgress { .. });
        match event {
            PullEvent::Resolved {
                reference,
                digest,
                layers,
                total_bytes,
            } => {
                let text = format!(
                    "{}ing {reference} ({}, {layers} layer{}, {})",
                    self.verb,
                    short(&digest),
                    if layers == 1 { "" } else { "s" },
                    bytes(total_bytes)
                );
                self.line(&mut state, &text);
            }
            PullEvent::BlobCached { digest, size } => {
                let blob = blob(&mut state, &digest, size);
                blob.transferred = size;
                blob.done = true;
                if !self.tty {
                    let where_ = if self.verb == "push" {
                        "in the registry"
                    } else {
                        "cached"
                    };
                    self.line(
                        &mut state,
                        &format!("  {} {} already {where_}", short(&digest), bytes(size)),
                    );
                }
            }
            PullEvent::BlobProgress {
                digest,
                transferred,
                size,
            } => {
                blob(&mut state, &digest, size).transferred = transferred;
            }
            PullEvent::BlobDone { digest, size } => {
                let blob = blob(&mut state, &digest, size);
                blob.transferred = size;
                blob.done = true;
                if !self.tty {
                    self.line(&mut state, &format!("  {} {} done", short(&digest), bytes(size)));
                }
            }
            PullEvent::Retrying {
                what,
                attempt,
                delay,
                error,
            } => {
                // The innermost cause ("Connection refused (os error 111)") says enough here.
                let cause = error.rsplit(": ").next().unwrap_or(&error);
                let text = format!(
                    "  {what}: attempt {attempt} failed ({cause}); retrying in {:.1}s",
                    delay.as_secs_f64()
                );
                self.line(&mut state, &text);
            }
            PullEvent::Done { digest } => {
                if self.tty && !state.blobs.is_empty() {
                    // The final state of every blob stays on screen.
                    redraw(&mut state, true);
                    let _ = writeln!(state.out);
                    state.drawn = false;
                }
                if !self.tty {
                    self.line(&mut state, &format!("  {} complete", short(&digest)));
                }
                state.blobs.clear();
            }
        }
        if self.tty {
            redraw(&mut state, force);
        }
    }
}

/// The entry for `digest`, added when new.
fn blob<'a>(state: &'a mut State, digest: &Digest, size: u64) -> &'a mut Blob {
    let index = match state.blobs.iter().position(|b| &b.digest == digest) {
        Some(i) => i,
        None => {
            state.blobs.push(Blob {
                digest: digest.clone(),
                transferred: 0,
                size,
                done: false,
            });
            state.blobs.len() - 1
        }
    };
    &mut state.blobs[index]
}

/// Redraws the per-blob line (at most every [`REDRAW`] unless `force`).
fn redraw(state: &mut State, force: bool) {
    if state.blobs.is_empty() {
        return;
    }
    let now = Instant::now();
    if !force && state.last_draw.is_some_and(|t| now.duration_since(t) < REDRAW) {
        return;
    }
    state.last_draw = Some(now);
    let (mut sent, mut total) = (0u64, 0u64);
    let mut parts = Vec::new();
    for b in &state.blobs {
        sent = sent.saturating_add(b.transferred);
        total = total.saturating_add(b.size);
        let what = if b.done {
            "done".to_owned()
        } else {
            format!("{}/{}", bytes(b.transferred), bytes(b.size))
        };
        parts.push(format!("{} {what}", short(&b.digest)));
    }
    let line = format!("  {} of {} | {}", bytes(sent), bytes(total), parts.join("  "));
    draw(state, &line);
}

fn draw(state: &mut State, line: &str) {
    let line: String = line.chars().take(MAX_LINE).collect();
    let _ = write!(state.out, "\r\x1b[2K{line}");
    let _ = state.out.flush();
    state.drawn = true;
}

/// The first 12 hex digits of a digest.
pub(crate) fn short(digest: &Digest) -> String {
    digest.hex().chars().take(12).collect()
}

/// Bytes in binary units, one decimal.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    #[expect(clippy::cast_precision_loss, reason = "a display value")]
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_like_people_write_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(1 << 30), "1.0 GiB");
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(30 << 20), "30.0 MiB");
    }

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn pull_events(display: &Display) {
        let (layer, config) = (Digest::of(b"layer"), Digest::of(b"config"));
        display.event(PullEvent::Resolved {
            reference: "127.0.0.1:5000/busybox:latest".into(),
            digest: Digest::of(b"manifest"),
            layers: 1,
            total_bytes: 2 << 20,
        });
        display.event(PullEvent::BlobCached {
            digest: config,
            size: 500,
        });
        // Byte progress is throttled: let the redraw interval pass.
        std::thread::sleep(REDRAW + Duration::from_millis(20));
        display.event(PullEvent::BlobProgress {
            digest: layer.clone(),
            transferred: 1 << 20,
            size: 2 << 20,
        });
        display.event(PullEvent::Retrying {
            what: "blob".into(),
            attempt: 1,
            delay: Duration::from_millis(500),
            error: "error sending request: Connection reset by peer".into(),
        });
        display.event(PullEvent::BlobDone {
            digest: layer,
            size: 2 << 20,
        });
        display.event(PullEvent::Done {
            digest: Digest::of(b"manifest"),
        });
        display.finish();
    }

    #[test]
    fn terminal_output_redraws_one_line_with_per_layer_bytes() {
        let buf = Buffer::default();
        let display = Display::with_output("pull", true, Box::new(buf.clone()));
        pull_events(&display);
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(
            out.starts_with("pulling 127.0.0.1:5000/busybox:latest ("),
            "{out:?}"
        );
        assert!(out.contains("\r\x1b[2K  500 B of 500 B"), "{out:?}");
        let layer = short(&Digest::of(b"layer"));
        assert!(out.contains(&format!("{layer} 1.0 MiB/2.0 MiB")), "{out:?}");
        assert!(
            out.contains("attempt 1 failed (Connection reset by peer); retrying in 0.5s\n"),
            "{out:?}"
        );
        assert!(
            out.ends_with(&format!(
                "2.0 MiB of 2.0 MiB | {} done  {layer} done\n",
                short(&Digest::of(b"config"))
            )),
            "the final state stays, on its own line: {out:?}"
        );
    }

    #[test]
    fn plain_output_has_one_line_per_step_and_no_redraws() {
        let buf = Buffer::default();
        let display = Display::with_output("pull", false, Box::new(buf.clone()));
        pull_events(&display);
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(!out.contains('\r'), "{out:?}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert!(lines[1].ends_with("500 B already cached"), "{out}");
        assert!(lines[3].ends_with("2.0 MiB done"), "{out}");
        assert!(lines[4].ends_with("complete"), "{out}");
    }

    #[test]
    fn events_update_blobs_in_order() {
        let display = Display::new("pull");
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        display.event(PullEvent::BlobProgress {
            digest: a.clone(),
            transferred: 5,
            size: 10,
        });
        display.event(PullEvent::BlobCached {
            digest: b.clone(),
            size: 3,
        });
        display.event(PullEvent::BlobDone {
            digest: a.clone(),
            size: 10,
        });
        let state = display.lock();
        let blobs: Vec<_> = state
            .blobs
            .iter()
            .map(|b| (b.digest.clone(), b.transferred, b.done))
            .collect();
        assert_eq!(blobs, vec![(a, 10, true), (b, 3, true)]);
    }
}
