//! Randomness, request ids (ULIDs) and timestamps.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `N` bytes from the kernel's CSPRNG.
pub(crate) fn random<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out)?;
    Ok(out)
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const RANDOM_MASK: u128 = (1 << 80) - 1;

/// The last ULID handed out, as (milliseconds, random part).
static LAST: Mutex<(u64, u128)> = Mutex::new((0, 0));

/// A ULID: 48 bits of milliseconds and 80 random bits in Crockford base32. Within this process
/// each one sorts after the previous (the random part counts up inside one millisecond). Request
/// ids need uniqueness, not secrecy: if the kernel's randomness fails, the counter still keeps
/// them distinct.
pub(crate) fn ulid() -> String {
    let ms = u64::try_from(now_ms()).unwrap_or(0) & 0xFFFF_FFFF_FFFF;
    let fresh = random::<10>()
        .map(|b| b.iter().fold(0u128, |acc, &x| (acc << 8) | u128::from(x)))
        .unwrap_or(0);
    let (ms, rand) = {
        let mut last = LAST.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *last = if ms > last.0 {
            (ms, fresh)
        } else {
            (last.0, (last.1 + 1) & RANDOM_MASK)
        };
        *last
    };
    let value = (u128::from(ms) << 80) | rand;
    (0..26)
        .rev()
        .map(|i| char::from(CROCKFORD[usize::try_from((value >> (5 * i)) & 0x1f).unwrap_or(0)]))
        .collect()
}

/// Unix milliseconds as RFC 3339 UTC with seconds: `2026-12-02T05:23:07Z`.
pub(crate) fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, time) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar, in 400-year eras
    // starting on March 1st so that the leap day comes last).
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let march_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * march_month + 2) / 5 + 1;
    let month = if march_month < 10 {
        march_month + 3
    } else {
        march_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        time / 3600,
        time % 3600 / 60,
        time % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulids_sort_in_creation_order() {
        let ids: Vec<String> = (0..1000).map(|_| ulid()).collect();
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1], "{} !< {}", pair[0], pair[1]);
        }
        assert!(
            ids.iter()
                .all(|id| id.len() == 26 && id.bytes().all(|b| CROCKFORD.contains(&b)))
        );
    }

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_777_387_999), "2027-01-01T04:23:07Z");
        assert_eq!(rfc3339(-1000), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0, 0xab, 0x0f]), "00ab0f");
    }
}
