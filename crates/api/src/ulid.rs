//! ULIDs (machine versions, events, operations, request ids): 48 bits of Unix milliseconds and 80
//! random bits in Crockford base32, 26 characters, sorting in creation order.
//!
//! Pure: the caller supplies the clock and the randomness, so this crate stays free of I/O.

use std::sync::Mutex;

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const RANDOM_MASK: u128 = (1 << 80) - 1;

/// Hands out ULIDs that strictly increase within one generator: inside one millisecond (or if the
/// clock steps back) the random part counts up from the previous one instead of being drawn anew.
#[derive(Debug, Default)]
pub struct UlidGenerator {
    last: Mutex<(u64, u128)>,
}

impl UlidGenerator {
    /// A generator that has handed out nothing yet (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            last: Mutex::new((0, 0)),
        }
    }

    /// The next ULID at `unix_ms`, with `random` (only its low 80 bits are used) as the random part
    /// when time has moved on.
    pub fn next(&self, unix_ms: u64, random: u128) -> String {
        let ms = unix_ms & 0xFFFF_FFFF_FFFF;
        let (ms, rand) = {
            let mut last = self
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *last = if ms > last.0 {
                (ms, random & RANDOM_MASK)
            } else {
                (last.0, (last.1 + 1) & RANDOM_MASK)
            };
            *last
        };
        encode((u128::from(ms) << 80) | rand)
    }
}

fn encode(value: u128) -> String {
    (0..26)
        .rev()
        .map(|i| char::from(CROCKFORD[usize::try_from((value >> (5 * i)) & 0x1f).unwrap_or(0)]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_millisecond_and_clock_steps_back_still_increase() {
        let g = UlidGenerator::new();
        let a = g.next(1_000, 5);
        let b = g.next(1_000, 1);
        let c = g.next(999, 0);
        let d = g.next(1_001, 0);
        assert!(a < b && b < c && c < d, "{a} {b} {c} {d}");
        for id in [&a, &b, &c, &d] {
            assert_eq!(id.len(), 26);
            assert!(id.bytes().all(|x| CROCKFORD.contains(&x)));
        }
    }

    #[test]
    fn known_encoding() {
        // The ULID spec's example time, 1469918176385 ms, with a zero random part.
        assert_eq!(
            UlidGenerator::new().next(1_469_918_176_385, 0),
            "01ARYZ6S410000000000000000"
        );
    }
}
