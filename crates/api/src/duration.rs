//! Durations as Fly's API spells them: Go duration strings (`"15s"`, `"1m30s"`) or integers.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A non-negative duration on the wire.
///
/// Deserializes from a Go duration string (`"10s"`, `"1m0s"`, `"1.5h"`, `"250ms"`) or from an
/// integer number of **nanoseconds** (what fly-go's `Duration` does with a JSON number).
/// Serializes as a Go duration string in Go's canonical form (`time.Duration.String()`), which is
/// what fly-go emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    /// A duration of `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Self(std::time::Duration::from_millis(millis))
    }

    /// The standard library duration.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Self(d)
    }
}

/// Why a string is not a Go duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: {reason}; use a number followed by a unit (ns, us, ms, s, m, h), e.g. \"10s\" or \"1m30s\""
)]
pub struct ParseDurationError {
    /// The text that failed to parse.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

const NANOS_PER: [(&str, u128); 8] = [
    ("ns", 1),
    ("us", 1_000),
    ("\u{b5}s", 1_000),
    ("\u{3bc}s", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseDurationError {
            input: input.to_owned(),
            reason,
        };
        let mut s = input.trim();
        if let Some(rest) = s.strip_prefix('+') {
            s = rest;
        } else if s.starts_with('-') {
            return Err(err("negative durations are not allowed"));
        }
        if s == "0" {
            return Ok(Self::default());
        }
        if s.is_empty() {
            return Err(err("empty"));
        }
        let mut total: u128 = 0;
        while !s.is_empty() {
            let num_len = s
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(s.len());
            let (num, rest) = s.split_at(num_len);
            if num.is_empty() || num == "." {
                return Err(err("expected a number"));
            }
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let (unit, rest) = rest.split_at(unit_len);
            if unit.is_empty() {
                return Err(err("missing unit"));
            }
            let Some(&(_, scale)) = NANOS_PER.iter().find(|(u, _)| *u == unit) else {
                return Err(err("unknown unit"));
            };
            let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
            if frac_part.contains('.') {
                return Err(err("more than one decimal point"));
            }
            let whole: u128 = if int_part.is_empty() {
                0
            } else {
                int_part.parse().map_err(|_| err("number too large"))?
            };
            let mut value = whole.checked_mul(scale).ok_or_else(|| err("too large"))?;
            // Fractional part: digits beyond nanosecond precision are dropped, as Go does.
            let mut frac_scale = scale;
            for digit in frac_part.bytes() {
                frac_scale /= 10;
                if frac_scale == 0 {
                    break;
                }
                value += u128::from(digit - b'0') * frac_scale;
            }
            total = total.checked_add(value).ok_or_else(|| err("too large"))?;
            s = rest;
        }
        let secs = u64::try_from(total / 1_000_000_000).map_err(|_| err("too large"))?;
        let nanos = u32::try_from(total % 1_000_000_000).map_err(|_| err("too large"))?;
        Ok(Self(std::time::Duration::new(secs, nanos)))
    }
}

/// Writes `value / 10^digits` with trailing fractional zeros removed (Go's `fmtFrac`).
fn write_frac(f: &mut fmt::Formatter<'_>, value: u128, digits: u32) -> fmt::Result {
    let div = 10u128.pow(digits);
    let whole = value / div;
    let frac = value % div;
    if frac == 0 {
        return write!(f, "{whole}");
    }
    let mut frac_str = format!("{frac:0width$}", width = digits as usize);
    while frac_str.ends_with('0') {
        frac_str.pop();
    }
    write!(f, "{whole}.{frac_str}")
}

impl fmt::Display for Duration {
    /// Go's `time.Duration.String()`: `"0s"`, `"1.5µs"`, `"250ms"`, `"15s"`, `"1m0s"`, `"2h3m4.5s"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        if nanos < 1_000 {
            return write!(f, "{nanos}ns");
        }
        if nanos < 1_000_000 {
            write_frac(f, nanos, 3)?;
            return f.write_str("\u{b5}s");
        }
        if nanos < 1_000_000_000 {
            write_frac(f, nanos, 6)?;
            return f.write_str("ms");
        }
        let secs_total = nanos / 1_000_000_000;
        let sub = nanos % 1_000_000_000;
        let hours = secs_total / 3600;
        let minutes = (secs_total % 3600) / 60;
        let secs = secs_total % 60;
        if hours > 0 {
            write!(f, "{hours}h{minutes}m")?;
        } else if minutes > 0 {
            write!(f, "{minutes}m")?;
        }
        write_frac(f, secs * 1_000_000_000 + sub, 9)?;
        f.write_str("s")
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = Duration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"10s\" or an integer number of nanoseconds")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Ok(Duration(std::time::Duration::from_nanos(v)))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                u64::try_from(v)
                    .map(|n| Duration(std::time::Duration::from_nanos(n)))
                    .map_err(|_| E::custom("negative durations are not allowed"))
            }
        }

        deserializer.deserialize_any(DurationVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        let cases = [
            ("0", 0),
            ("0s", 0),
            ("15s", 15_000_000_000),
            ("1m0s", 60_000_000_000),
            ("1m30s", 90_000_000_000),
            ("1.5h", 5_400_000_000_000),
            ("250ms", 250_000_000),
            ("2h45m", 9_900_000_000_000),
            ("1us", 1_000),
            ("1\u{b5}s", 1_000),
            ("300ns", 300),
            (".5s", 500_000_000),
        ];
        for (input, nanos) in cases {
            let d: Duration = input.parse().unwrap();
            assert_eq!(d.0.as_nanos(), nanos, "{input}");
        }
        for bad in ["", "10", "s", "-1s", "1x", "1..5s", "1.2.3s", "5 s"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_like_go() {
        let cases = [
            (0, "0s"),
            (300, "300ns"),
            (1_500, "1.5\u{b5}s"),
            (250_000_000, "250ms"),
            (15_000_000_000, "15s"),
            (60_000_000_000, "1m0s"),
            (90_500_000_000, "1m30.5s"),
            (3_600_000_000_000, "1h0m0s"),
        ];
        for (nanos, text) in cases {
            let d = Duration(std::time::Duration::from_nanos(nanos));
            assert_eq!(d.to_string(), text);
            assert_eq!(text.parse::<Duration>().unwrap(), d);
        }
    }

    #[test]
    fn json_accepts_strings_and_nanoseconds() {
        let d: Duration = serde_json::from_str("\"10s\"").unwrap();
        assert_eq!(d, Duration::from_secs(10));
        let d: Duration = serde_json::from_str("10000000000").unwrap();
        assert_eq!(d, Duration::from_secs(10));
        assert!(serde_json::from_str::<Duration>("-5").is_err());
        assert!(serde_json::from_str::<Duration>("\"ten\"").is_err());
        assert_eq!(
            serde_json::to_string(&Duration::from_secs(90)).unwrap(),
            "\"1m30s\""
        );
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::Duration;

    proptest! {
        #[test]
        fn display_parses_back(nanos in 0u64..=u64::MAX / 4) {
            let d = Duration(std::time::Duration::from_nanos(nanos));
            prop_assert_eq!(d.to_string().parse::<Duration>().unwrap(), d);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,24}") {
            let _ = s.parse::<Duration>();
        }

        #[test]
        fn unit_sequences_parse(parts in proptest::collection::vec((0u32..10_000, 0usize..6), 1..5)) {
            let units = ["ns", "us", "ms", "s", "m", "h"];
            let text: String = parts.iter().map(|(n, u)| format!("{n}{}", units[*u])).collect();
            prop_assert!(text.parse::<Duration>().is_ok(), "{}", text);
        }
    }
}
