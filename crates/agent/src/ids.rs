//! Identifiers and clocks: ULIDs for versions, operations and events (`aloft_api::UlidGenerator`),
//! random machine ids, unix milliseconds.

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use aloft_api::{MachineId, UlidGenerator};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `n` random bytes from the kernel, or from std's randomly keyed hasher if `/dev/urandom` cannot be
/// read (ids need uniqueness, not secrecy; the database's keys catch the impossible collision).
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut out))
        .is_ok()
    {
        return out;
    }
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_i64(now_ms());
        let bytes = h.finish().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    out
}

/// A new random machine id (14 hex digits).
pub(crate) fn new_machine_id() -> MachineId {
    MachineId::from_random(random_bytes::<7>())
}

static ULIDS: UlidGenerator = UlidGenerator::new();

/// A new ULID (26 characters, Crockford base32), strictly increasing within this process so that
/// ids made in the same millisecond still sort in creation order.
pub(crate) fn ulid() -> String {
    let random = random_bytes::<10>()
        .iter()
        .fold(0u128, |acc, &b| (acc << 8) | u128::from(b));
    ULIDS.next(u64::try_from(now_ms()).unwrap_or(0), random)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulids_are_26_chars_and_increase() {
        let mut prev = ulid();
        for _ in 0..1000 {
            let next = ulid();
            assert_eq!(next.len(), 26);
            assert!(next > prev, "{next} <= {prev}");
            prev = next;
        }
    }

    #[test]
    fn machine_ids_are_valid() {
        let id = new_machine_id();
        assert_eq!(id.as_str().parse::<MachineId>().unwrap(), id);
    }
}
