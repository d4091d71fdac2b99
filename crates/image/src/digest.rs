//! Content digests: the `sha256:<64 lowercase hex>` names every blob and manifest goes by.
//!
//! Only SHA-256 is accepted (the only algorithm registries use in practice); anything else is
//! rejected at parse time, so a [`Digest`] always names a path in the blob cache safely (no `/`,
//! no `..`, fixed length).

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// A validated `sha256:<hex>` content digest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest {
    /// 64 lowercase hex characters.
    hex: String,
}

/// A digest string that is not `sha256:` followed by 64 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {input:?}: expected sha256:<64 lowercase hex characters>")]
pub struct DigestError {
    /// What was given (cut to 100 characters).
    pub input: String,
}

impl Digest {
    /// The SHA-256 digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(data);
        hasher.finish()
    }

    /// The 64 hex characters, without the `sha256:` prefix.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The algorithm (always `sha256`).
    pub fn algorithm(&self) -> &'static str {
        "sha256"
    }

    /// Parses bare hex (64 lowercase characters) as a SHA-256 digest.
    pub fn from_hex(hex: &str) -> Result<Self, DigestError> {
        if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Self { hex: hex.to_owned() })
        } else {
            Err(DigestError {
                input: hex.chars().take(100).collect(),
            })
        }
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("sha256:") {
            Some(hex) => Self::from_hex(hex).map_err(|_| DigestError {
                input: s.chars().take(100).collect(),
            }),
            None => Err(DigestError {
                input: s.chars().take(100).collect(),
            }),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An incremental SHA-256 hasher that yields a [`Digest`].
#[derive(Debug, Clone, Default)]
pub struct Sha256(sha2::Sha256);

impl Sha256 {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self(sha2::Sha256::new())
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        let out = self.0.finalize();
        let mut hex = String::with_capacity(64);
        for byte in out {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            hex.push(char::from(HEX[usize::from(byte >> 4)]));
            hex.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        Digest { hex }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_empty_input_is_the_well_known_one() {
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn parse_round_trips_and_rejects_bad_input() {
        let d = Digest::of(b"abc");
        assert_eq!(d.to_string().parse::<Digest>(), Ok(d.clone()));
        for bad in [
            "",
            "sha256:",
            "sha512:ab",
            "sha256:ABCDEF",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}/", "a".repeat(63)),
            &format!("sha256:{}", "a".repeat(65)),
            &format!("sha256:../{}", "a".repeat(61)),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn serde_uses_the_string_form() {
        let d = Digest::of(b"x");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{d}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"md5:abc\"").is_err());
    }
}
