//! Signals a client may send to a machine (`SignalRequest`), by name or by number.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::StopSignal;

/// A signal of the spec's `SignalRequest.signal` enum.
///
/// Deserializes from a name (`"SIGTERM"`; case-insensitive, `SIG` optional) or from its Linux
/// number (fly-go's kill sends `{"signal": 9}`); serializes as the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    /// Abort (6).
    SIGABRT,
    /// Alarm (14).
    SIGALRM,
    /// Floating point exception (8).
    SIGFPE,
    /// Hangup (1).
    SIGHUP,
    /// Illegal instruction (4).
    SIGILL,
    /// Interrupt (2).
    SIGINT,
    /// Kill (9).
    SIGKILL,
    /// Broken pipe (13).
    SIGPIPE,
    /// Quit (3).
    SIGQUIT,
    /// Segmentation fault (11).
    SIGSEGV,
    /// Terminate (15).
    SIGTERM,
    /// Trace trap (5).
    SIGTRAP,
    /// User signal 1 (10).
    SIGUSR1,
    /// User signal 2 (12).
    SIGUSR2,
}

impl Signal {
    /// Every signal, in the spec's order.
    pub const ALL: [Self; 14] = [
        Self::SIGABRT,
        Self::SIGALRM,
        Self::SIGFPE,
        Self::SIGHUP,
        Self::SIGILL,
        Self::SIGINT,
        Self::SIGKILL,
        Self::SIGPIPE,
        Self::SIGQUIT,
        Self::SIGSEGV,
        Self::SIGTERM,
        Self::SIGTRAP,
        Self::SIGUSR1,
        Self::SIGUSR2,
    ];

    /// The name, e.g. `SIGTERM`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SIGABRT => "SIGABRT",
            Self::SIGALRM => "SIGALRM",
            Self::SIGFPE => "SIGFPE",
            Self::SIGHUP => "SIGHUP",
            Self::SIGILL => "SIGILL",
            Self::SIGINT => "SIGINT",
            Self::SIGKILL => "SIGKILL",
            Self::SIGPIPE => "SIGPIPE",
            Self::SIGQUIT => "SIGQUIT",
            Self::SIGSEGV => "SIGSEGV",
            Self::SIGTERM => "SIGTERM",
            Self::SIGTRAP => "SIGTRAP",
            Self::SIGUSR1 => "SIGUSR1",
            Self::SIGUSR2 => "SIGUSR2",
        }
    }

    /// The Linux (x86-64) signal number.
    pub fn number(self) -> i32 {
        match self {
            Self::SIGHUP => 1,
            Self::SIGINT => 2,
            Self::SIGQUIT => 3,
            Self::SIGILL => 4,
            Self::SIGTRAP => 5,
            Self::SIGABRT => 6,
            Self::SIGFPE => 8,
            Self::SIGKILL => 9,
            Self::SIGUSR1 => 10,
            Self::SIGSEGV => 11,
            Self::SIGUSR2 => 12,
            Self::SIGPIPE => 13,
            Self::SIGALRM => 14,
            Self::SIGTERM => 15,
        }
    }

    /// The signal with Linux number `n`, if it is one of the spec's.
    pub fn from_number(n: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|s| i64::from(s.number()) == n)
    }

    /// Parses a name (case-insensitive, `SIG` optional) or a number.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if let Ok(n) = text.parse::<i64>() {
            return Self::from_number(n);
        }
        let upper = text.to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        Self::ALL.into_iter().find(|s| s.as_str() == full)
    }
}

impl From<StopSignal> for Signal {
    fn from(s: StopSignal) -> Self {
        match s {
            StopSignal::SIGHUP => Self::SIGHUP,
            StopSignal::SIGINT => Self::SIGINT,
            StopSignal::SIGQUIT => Self::SIGQUIT,
            StopSignal::SIGKILL => Self::SIGKILL,
            StopSignal::SIGUSR1 => Self::SIGUSR1,
            StopSignal::SIGUSR2 => Self::SIGUSR2,
            StopSignal::SIGTERM => Self::SIGTERM,
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Signal {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SignalVisitor;
        const EXPECTED: &str = "a signal name such as \"SIGTERM\" or its number such as 15";

        impl Visitor<'_> for SignalVisitor {
            type Value = Signal;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Signal, E> {
                Signal::parse(v).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &EXPECTED))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Signal, E> {
                Signal::from_number(v).ok_or_else(|| E::invalid_value(de::Unexpected::Signed(v), &EXPECTED))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Signal, E> {
                i64::try_from(v)
                    .ok()
                    .and_then(Signal::from_number)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(v), &EXPECTED))
            }
        }

        deserializer.deserialize_any(SignalVisitor)
    }
}

/// `POST …/signal` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SignalRequest {
    /// The signal to send to the workload.
    pub signal: Signal,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn names_and_numbers_are_accepted() {
        let parse = |v| serde_json::from_value::<SignalRequest>(v).map(|r| r.signal);
        assert_eq!(parse(json!({"signal": "SIGTERM"})).unwrap(), Signal::SIGTERM);
        // fly-go's Kill.
        assert_eq!(parse(json!({"signal": 9})).unwrap(), Signal::SIGKILL);
        assert_eq!(parse(json!({"signal": "usr1"})).unwrap(), Signal::SIGUSR1);
        assert_eq!(parse(json!({"signal": "15"})).unwrap(), Signal::SIGTERM);
        for bad in [
            json!({"signal": "SIGSTOP"}),
            json!({"signal": 19}),
            json!({"signal": -1}),
            json!({}),
            json!({"signal": 1.5}),
        ] {
            assert!(parse(bad.clone()).is_err(), "{bad}");
        }
        assert_eq!(
            serde_json::to_value(SignalRequest {
                signal: Signal::SIGKILL
            })
            .unwrap(),
            json!({"signal": "SIGKILL"})
        );
    }

    #[test]
    fn numbers_are_linuxs() {
        for s in Signal::ALL {
            assert_eq!(Signal::from_number(s.number().into()), Some(s));
            assert_eq!(Signal::parse(s.as_str()), Some(s));
        }
        assert_eq!(Signal::from(StopSignal::SIGINT).number(), 2);
    }
}
