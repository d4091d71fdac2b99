//! Identifiers and clocks: ULIDs for versions, operations and events, random machine ids, unix
//! milliseconds and their RFC 3339 spelling.

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use aloft_api::MachineId;

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

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

static LAST_ULID: Mutex<(u64, u128)> = Mutex::new((0, 0));

/// A new ULID (26 characters, Crockford base32), strictly increasing within this process so that
/// ids made in the same millisecond still sort in creation order.
pub(crate) fn ulid() -> String {
    let ms = u64::try_from(now_ms()).unwrap_or(0) & 0xFFFF_FFFF_FFFF;
    let fresh = {
        let b = random_bytes::<10>();
        let mut r = 0u128;
        for byte in b {
            r = (r << 8) | u128::from(byte);
        }
        r
    };
    let (ms, rand) = {
        let mut last = LAST_ULID
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = if ms <= last.0 {
            (last.0, (last.1 + 1) & ((1u128 << 80) - 1))
        } else {
            (ms, fresh)
        };
        *last = next;
        next
    };
    let value = (u128::from(ms) << 80) | rand;
    let mut out = [0u8; 26];
    for (i, slot) in out.iter_mut().enumerate() {
        let shift = 5 * (25 - i);
        let idx = usize::try_from((value >> shift) & 0x1f).unwrap_or(0);
        *slot = CROCKFORD[idx];
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `ms` (unix milliseconds) as RFC 3339 in UTC, seconds precision: `2026-12-02T05:23:07Z`.
pub(crate) fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Decodes standard or URL-safe base64, with or without padding (the API's `files[].raw_value`).
pub(crate) fn base64_decode(input: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for c in input.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).unwrap_or(0));
        }
    }
    Some(out)
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
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_696_259_269_155), "2023-10-02T15:07:49Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn base64_decodes_both_alphabets() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("-_8").unwrap(), [0xfb, 0xff]);
        assert!(base64_decode("a*b").is_none());
    }

    #[test]
    fn machine_ids_are_valid() {
        let id = new_machine_id();
        assert_eq!(id.as_str().parse::<MachineId>().unwrap(), id);
    }
}
