//! A template boot (`aloft.template=1` on the kernel command line): init comes up as far as the
//! channel, then waits for the host's [`Frame::Boot`] instead of reading the run config. The host
//! snapshots the guest while it waits (it does so on seeing [`GuestStatus::awaiting_boot`], which
//! init sends only from here), and restores that snapshot for each new machine, possibly days
//! later. The boot request turns the restored guest into one machine: the wall clock, a fresh seed
//! for the kernel's random generator (every restored copy starts with the template's generator
//! state), `eth0`'s MAC, and the run config, which then boots exactly as a cold boot's does.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use aloft_guest_proto::{BootRequest, Frame, GuestStatus, PROTOCOL_VERSION, WorkloadState};
use aloft_netlink::Netlink;

use crate::channel::Channel;
use crate::supervisor::{RECONNECT_POLL_MS, uptime_ms};
use crate::{boot, console, sys};

/// The answer to a request that needs a booted machine.
pub(crate) const NOT_BOOTED: &str = "the machine is not booted yet";

/// Fewest seed bytes a boot request may carry (128 bits; the host sends 32).
const MIN_SEED_LEN: usize = 16;

/// What init does with one frame from the host while it waits for its boot request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// A host (re)connected: answer with [`awaiting_status`].
    Hello,
    /// Send this back (a request that needs a booted machine).
    Reply(Frame),
    /// Nothing to do.
    Ignore,
    /// Stop waiting and become this machine.
    Boot(Box<BootRequest>),
}

/// The waiting state's answer to `frame`: a pure function, so the host's view of a template is
/// testable without a channel.
pub(crate) fn step(frame: Frame) -> Step {
    match frame {
        Frame::Hello => Step::Hello,
        Frame::Boot(req) => Step::Boot(req),
        Frame::Exec { chan, .. }
        | Frame::Stdin { chan, .. }
        | Frame::Signal { chan, .. }
        | Frame::Resize { chan, .. }
        | Frame::ListProcesses { chan }
        | Frame::Sync { chan } => Step::Reply(Frame::Error {
            chan,
            message: NOT_BOOTED.to_owned(),
        }),
        // No session has credit to take, no workload to stop; the boot request carries the time.
        Frame::Credit { .. } | Frame::Stop { .. } | Frame::SetTime { .. } => Step::Ignore,
        // Guest → host frames have no business arriving here.
        Frame::Status(_)
        | Frame::Log { .. }
        | Frame::ExecStarted { .. }
        | Frame::ExecOutput { .. }
        | Frame::ExecExited { .. }
        | Frame::Processes { .. }
        | Frame::Synced { .. }
        | Frame::Error { .. } => Step::Ignore,
    }
}

/// The status a waiting template reports: starting, and awaiting its boot request.
pub(crate) fn awaiting_status(uptime_ms: u64, dropped_log_bytes: u64) -> Frame {
    Frame::Status(GuestStatus {
        workload: WorkloadState::Starting,
        uptime_ms,
        dropped_log_bytes,
        protocol: PROTOCOL_VERSION,
        awaiting_boot: true,
    })
}

/// How the wait ended.
#[derive(Debug)]
pub(crate) enum Waited {
    /// The host's boot request.
    Boot(Box<BootRequest>),
    /// Init got this stop signal (SIGTERM, SIGINT, SIGPWR) first: there is nothing to stop, so the
    /// guest powers off.
    Stopped(i32),
}

/// Handles one batch of frames read from the channel: queues the answers and returns the boot
/// request if there was one. Frames after it go back to the channel for the supervisor.
fn on_frames(ch: &mut Channel, frames: Vec<Frame>, uptime_ms: impl Fn() -> u64) -> Option<Box<BootRequest>> {
    let mut frames = frames.into_iter();
    while let Some(frame) = frames.next() {
        match step(frame) {
            Step::Hello => {
                let status = awaiting_status(uptime_ms(), ch.dropped_log_bytes);
                ch.hello(&status);
            }
            Step::Reply(reply) => ch.send(&reply),
            Step::Ignore => {}
            Step::Boot(req) => {
                ch.put_back(frames);
                return Some(req);
            }
        }
    }
    None
}

/// Waits, for as long as it takes, for the host's boot request, answering every hello with
/// [`awaiting_status`]. Blocks in poll(2) on the signalfd and the channel; while no host is
/// connected the port cannot be polled for one (it reports POLLHUP at once), so the connection is
/// re-checked every [`RECONNECT_POLL_MS`] then, as the supervisor does. `Err` when there is no
/// channel: no boot request could ever come.
pub(crate) fn wait_for_boot(ch: &mut Channel, sigfd: &OwnedFd) -> Result<Waited, String> {
    if !ch.exists() {
        return Err(format!(
            "booted as a template ({}), but there is no channel ({}) to receive the boot request on",
            aloft_guest_proto::TEMPLATE_CMDLINE_FLAG,
            aloft_guest_proto::CHANNEL_NAME
        ));
    }
    loop {
        ch.refresh();
        let mut fds = vec![libc::pollfd {
            fd: sigfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some((fd, events)) = ch.poll_fd() {
            fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
        }
        let timeout = if ch.connected() { -1 } else { RECONNECT_POLL_MS };
        if let Err(e) = sys::poll(&mut fds, timeout) {
            console::diag(&format!("poll: {e}"));
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        if fds[0].revents != 0 {
            for signo in sys::read_signals(sigfd.as_fd()) {
                if matches!(signo, libc::SIGTERM | libc::SIGINT | libc::SIGPWR) {
                    return Ok(Waited::Stopped(signo));
                }
            }
            // No child exists yet; reap whatever SIGCHLD announced all the same.
            while sys::reap_one().is_some() {}
        }
        if fds.get(1).is_some_and(|p| p.revents != 0) {
            let frames = ch.read_frames();
            if let Some(req) = on_frames(ch, frames, uptime_ms) {
                ch.flush();
                return Ok(Waited::Boot(req));
            }
        }
        ch.flush();
    }
}

/// Makes the restored guest this machine, before its run config boots: sets the wall clock
/// (a failure is only logged, as for [`Frame::SetTime`]), reseeds the kernel's random generator
/// from the host's seed, sets `eth0`'s MAC (while the link is still down: its IPv6 link-local
/// address comes from it). An `Err` is the boot failure's message.
pub(crate) fn become_machine(req: &BootRequest) -> Result<(), String> {
    if let Err(e) = sys::set_realtime(req.unix_nanos) {
        console::diag(&format!("set time: {e}"));
    }
    console::trace("clock set");
    reseed_random(&req.seed)?;
    console::trace("random generator reseeded");
    if let Some(mac) = &req.mac {
        set_mac(mac)?;
        console::trace("mac set");
    }
    Ok(())
}

/// Mixes `seed` into the kernel's entropy pool and has the generator rekey from it.
fn reseed_random(seed: &[u8]) -> Result<(), String> {
    if seed.len() < MIN_SEED_LEN {
        return Err(format!(
            "the host sent a seed of {} bytes; it needs at least {MIN_SEED_LEN}",
            seed.len()
        ));
    }
    let random = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("open /dev/urandom to seed the kernel's random generator: {e}"))?;
    sys::add_entropy(&random, seed)
        .map_err(|e| format!("add the host's seed to the kernel's entropy pool: {e}"))?;
    sys::reseed_crng(&random).map_err(|e| format!("reseed the kernel's random generator: {e}"))
}

/// A MAC address in the form the host sends: six two-digit hex pairs separated by `:`
/// (`52:54:00:12:34:56`, either case), nothing else.
pub(crate) fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut pairs = text.split(':');
    for byte in &mut mac {
        let pair = pairs.next()?;
        // from_str_radix alone would take "+a" or a single digit.
        if pair.len() != 2 || !pair.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    pairs.next().is_none().then_some(mac)
}

/// Sets `eth0`'s MAC address to `text`.
fn set_mac(text: &str) -> Result<(), String> {
    let mac = parse_mac(text).ok_or_else(|| {
        format!("the host sent an invalid MAC address {text:?} (six hex pairs separated by colons, like 52:54:00:12:34:56)")
    })?;
    let mut nl = Netlink::open().map_err(|e| boot::error_chain(&e))?;
    if nl.find_link("eth0").map_err(|e| boot::error_chain(&e))?.is_none() {
        return Err(format!(
            "the host sent a MAC address ({text}) for eth0, but this machine has no eth0"
        ));
    }
    nl.set_link_address("eth0", mac)
        .map_err(|e| boot::error_chain(&e))
}

#[cfg(test)]
mod tests {
    use aloft_guest_proto::{ExecRequest, RunConfig};

    use super::*;

    fn boot_request() -> Box<BootRequest> {
        Box::new(BootRequest {
            config: RunConfig {
                hostname: "m1".into(),
                ..RunConfig::default()
            },
            unix_nanos: 1_700_000_000_000_000_000,
            seed: vec![7; 32],
            mac: Some("52:54:00:12:34:56".into()),
        })
    }

    fn not_booted(chan: u32) -> Step {
        Step::Reply(Frame::Error {
            chan,
            message: NOT_BOOTED.to_owned(),
        })
    }

    #[test]
    fn requests_on_a_channel_are_refused_until_booted_and_the_rest_ignored() {
        assert_eq!(step(Frame::Hello), Step::Hello);
        assert_eq!(step(Frame::Boot(boot_request())), Step::Boot(boot_request()));
        for (frame, chan) in [
            (
                Frame::Exec {
                    chan: 3,
                    req: ExecRequest::default(),
                },
                3,
            ),
            (Frame::ListProcesses { chan: 4 }, 4),
            (Frame::Sync { chan: 5 }, 5),
            (
                Frame::Stdin {
                    chan: 6,
                    data: vec![1],
                },
                6,
            ),
            (Frame::Signal { chan: 0, signal: 15 }, 0),
            (
                Frame::Resize {
                    chan: 7,
                    rows: 1,
                    cols: 1,
                },
                7,
            ),
        ] {
            assert_eq!(step(frame), not_booted(chan));
        }
        for frame in [
            Frame::Credit { chan: 3, bytes: 10 },
            Frame::Stop {
                signal: None,
                timeout_ms: 10,
            },
            Frame::SetTime { unix_nanos: 1 },
            Frame::Synced { chan: 1 },
            awaiting_status(1, 0),
        ] {
            assert_eq!(step(frame), Step::Ignore);
        }
    }

    #[test]
    fn the_awaiting_status_says_so() {
        let Frame::Status(s) = awaiting_status(1234, 5) else {
            panic!("not a status")
        };
        assert_eq!(
            s,
            GuestStatus {
                workload: WorkloadState::Starting,
                uptime_ms: 1234,
                dropped_log_bytes: 5,
                protocol: PROTOCOL_VERSION,
                awaiting_boot: true,
            }
        );
    }

    /// A batch as the host may send it after a restore: the answers are queued in order, and what
    /// came after the boot request is left for the supervisor.
    #[test]
    fn a_batch_is_answered_up_to_the_boot_request() {
        let mut ch = Channel::connected_without_port();
        let frames = vec![
            Frame::Hello,
            Frame::ListProcesses { chan: 2 },
            Frame::SetTime { unix_nanos: 5 },
            Frame::Boot(boot_request()),
            Frame::Sync { chan: 3 },
            Frame::Hello,
        ];
        let req = on_frames(&mut ch, frames, || 42);
        assert_eq!(req, Some(boot_request()));
        assert!(ch.said_hello());
        assert_eq!(
            ch.take_sent(),
            [
                awaiting_status(42, 0),
                Frame::Error {
                    chan: 2,
                    message: NOT_BOOTED.to_owned()
                }
            ]
        );
        assert_eq!(ch.read_frames(), [Frame::Sync { chan: 3 }, Frame::Hello]);

        let mut ch = Channel::connected_without_port();
        assert_eq!(on_frames(&mut ch, vec![Frame::Hello, Frame::Hello], || 7), None);
        assert_eq!(ch.take_sent(), [awaiting_status(7, 0), awaiting_status(7, 0)]);
        assert!(!ch.has_unread());
    }

    #[test]
    fn macs_are_six_hex_pairs_and_nothing_else() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Some([0x52, 0x54, 0x00, 0x12, 0x34, 0x56])
        );
        assert_eq!(
            parse_mac("52:54:00:aB:cD:eF"),
            Some([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef])
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:56:",
            ":52:54:00:12:34:56",
            "52-54-00-12-34-56",
            "525400123456",
            "52:54:0:12:34:56",
            "52:54:000:12:34:56",
            "52:54:+0:12:34:56",
            "52:54:00:12:34:5g",
            " 52:54:00:12:34:56",
            "52:54:00:12:34:56\n",
            "52:54:00:12:34:é",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bad_seeds_and_macs_fail_with_the_value_named() {
        let e = reseed_random(&[1; 15]).unwrap_err();
        assert_eq!(e, "the host sent a seed of 15 bytes; it needs at least 16");
        assert_eq!(
            reseed_random(&[]).unwrap_err(),
            "the host sent a seed of 0 bytes; it needs at least 16"
        );
        let e = set_mac("52:54:00:12:34").unwrap_err();
        assert!(e.contains("invalid MAC address \"52:54:00:12:34\""), "{e}");
    }
}
