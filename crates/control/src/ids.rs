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
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0, 0xab, 0x0f]), "00ab0f");
    }
}
