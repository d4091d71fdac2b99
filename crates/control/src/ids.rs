//! Randomness, request ids (ULIDs) and timestamps.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use aloft_api::UlidGenerator;

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Unix milliseconds of an RFC 3339 time in UTC as the API writes them
/// (`2026-12-02T05:23:07Z`, fractions of a second and `+00:00` accepted); `None` for anything
/// else.
pub(crate) fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = s.split_once('T')?;
    let mut date = date.splitn(3, '-');
    let year: i64 = date.next()?.parse().ok()?;
    let month: i64 = date.next()?.parse().ok()?;
    let day: i64 = date.next()?.parse().ok()?;
    let (time, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut time = time.splitn(3, ':');
    let hour: i64 = time.next()?.parse().ok()?;
    let minute: i64 = time.next()?.parse().ok()?;
    let second: i64 = time.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let millis: i64 = format!("{fraction:0<3}").get(..3)?.parse().ok()?;
    // A civil date to days since 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y.rem_euclid(400);
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(((days * 86_400 + hour * 3600 + minute * 60 + second) * 1000) + millis)
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

static ULIDS: UlidGenerator = UlidGenerator::new();

/// A ULID (see [`UlidGenerator`]): within this process each one sorts after the previous. Request
/// ids need uniqueness, not secrecy: if the kernel's randomness fails, the counter still keeps them
/// distinct.
pub(crate) fn ulid() -> String {
    let fresh = random::<10>()
        .map(|b| b.iter().fold(0u128, |acc, &x| (acc << 8) | u128::from(x)))
        .unwrap_or(0);
    ULIDS.next(u64::try_from(now_ms()).unwrap_or(0), fresh)
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
                .all(|id| id.len() == 26 && id.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()))
        );
    }

    #[test]
    fn rfc3339_parses_what_the_api_writes() {
        for ms in [0, 951_782_400_000, 1_696_259_269_000, 1_798_777_387_000, -1000] {
            assert_eq!(parse_rfc3339_ms(&aloft_api::rfc3339(ms)), Some(ms), "{ms}");
        }
        assert_eq!(
            parse_rfc3339_ms("2023-10-02T15:07:49.155Z"),
            Some(1_696_259_269_155)
        );
        assert_eq!(
            parse_rfc3339_ms("2023-10-02T15:07:49.1+00:00"),
            Some(1_696_259_269_100)
        );
        for bad in [
            "",
            "2023-10-02",
            "2023-10-02T15:07:49",
            "2023-13-02T15:07:49Z",
            "2023-10-02T25:07:49Z",
            "2023-10-02T15:07:49.x1Z",
            "2023-10-02T15:07:49+02:00",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0, 0xab, 0x0f]), "00ab0f");
    }
}
