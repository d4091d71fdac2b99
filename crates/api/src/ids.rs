//! Identifiers, validated on parse.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A machine id as Fly spells them: 14 lowercase hex digits (`3d8d9e1f2a9e48`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(try_from = "String", into = "String")]
pub struct MachineId(String);

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} id {input:?}: {expected}")]
pub struct ParseIdError {
    /// Which id (`machine`, …).
    pub kind: &'static str,
    /// The text that failed to parse.
    pub input: String,
    /// What a valid id looks like.
    pub expected: &'static str,
}

impl MachineId {
    /// Length of a machine id.
    pub const LEN: usize = 14;

    /// A new id from 7 random bytes (the caller supplies randomness so this crate stays pure).
    pub fn from_random(bytes: [u8; 7]) -> Self {
        use fmt::Write as _;
        let mut s = String::with_capacity(Self::LEN);
        for b in bytes {
            let _ = write!(s, "{b:02x}");
        }
        Self(s)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for MachineId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = s.len() == Self::LEN
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ParseIdError {
                kind: "machine",
                input: s.to_owned(),
                expected: "14 lowercase hex digits",
            })
        }
    }
}

impl TryFrom<String> for MachineId {
    type Error = ParseIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MachineId> for String {
    fn from(id: MachineId) -> Self {
        id.0
    }
}

impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ids_validate() {
        let id = MachineId::from_random([0x3d, 0x8d, 0x9e, 0x1f, 0x2a, 0x9e, 0x48]);
        assert_eq!(id.as_str(), "3d8d9e1f2a9e48");
        assert_eq!(id.as_str().parse::<MachineId>().unwrap(), id);
        for bad in [
            "",
            "3D8D9E1F2A9E48",
            "3d8d9e1f2a9e4",
            "3d8d9e1f2a9e48a",
            "../../etc/passw",
        ] {
            assert!(bad.parse::<MachineId>().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<MachineId>("\"zz\"").is_err());
    }
}
