//! Volumes: an app's persistent disks (`/v1/apps/{app}/volumes…`), Fly's shapes.
//!
//! A volume lives on one host of one region, holds an ext4 filesystem and is mounted by at most
//! one machine at a time (`config.mounts[0].volume`); that machine runs on the volume's host. The
//! control plane keeps the volume's record (name, size, host, the machine it is attached to); the
//! host's agent keeps its disk ([`crate::MachineHost::create_volume`] and the verbs beside it).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{ApiError, HostStatus, MachineGuest, ParseIdError};

/// The size of a volume created without one, GB (Fly's default).
pub const DEFAULT_VOLUME_SIZE_GB: u32 = 1;
/// The largest volume, GB (Fly's limit).
pub const MAX_VOLUME_SIZE_GB: u32 = 500;
/// The only filesystem a volume holds.
pub const VOLUME_FSTYPE: &str = "ext4";

/// An id made of a prefix and 16 random lowercase letters and digits (volumes, snapshots).
macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal, $example:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The prefix of every id of this kind.
            pub const PREFIX: &'static str = $prefix;
            const ALPHABET: &'static [u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

            /// A new id from 16 random bytes (the caller supplies randomness so this crate stays
            /// pure). Ids are names, not secrets: the slight bias of reducing a byte modulo 36
            /// does not matter, and the store refuses a duplicate.
            pub fn from_random(bytes: [u8; 16]) -> Self {
                let mut s = String::with_capacity(Self::PREFIX.len() + bytes.len());
                s.push_str(Self::PREFIX);
                for b in bytes {
                    s.push(char::from(Self::ALPHABET[usize::from(b) % Self::ALPHABET.len()]));
                }
                Self(s)
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;

            /// Accepts the prefix followed by 1 to 32 lowercase letters and digits, so that ids
            /// of other Fly-compatible systems parse too; aloft makes 16.
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let ok = s.strip_prefix(Self::PREFIX).is_some_and(|rest| {
                    (1..=32).contains(&rest.len())
                        && rest.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                });
                if ok {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(ParseIdError {
                        kind: $kind,
                        input: s.to_owned(),
                        expected: concat!($prefix, " followed by lowercase letters and digits, e.g. ", $example),
                    })
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = ParseIdError;

            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> Self {
                id.0
            }
        }
    };
}

prefixed_id!(
    /// A volume id: `vol_` and 16 lowercase letters and digits (`vol_4yx0jvqe1x1dj7gr`).
    VolumeId,
    "vol_",
    "volume",
    "vol_4yx0jvqe1x1dj7gr"
);

prefixed_id!(
    /// A volume snapshot's id: `vs_` and 16 lowercase letters and digits
    /// (`vs_2b6lx0rq8ejzd3ky`).
    SnapshotId,
    "vs_",
    "snapshot",
    "vs_2b6lx0rq8ejzd3ky"
);

/// Checks a volume name as Fly does: 1 to 30 lowercase letters, digits and underscores.
/// `[[mounts]].source` names the volumes a process group mounts, so names repeat within an app.
pub fn validate_volume_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=30).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid volume name {name:?}: use 1 to 30 lowercase letters, digits and underscores"
        )))
    }
}

/// Where a volume is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Its disk exists on its host; a machine may mount it.
    Created,
    /// Destroyed (only in the answer to `DELETE`: the record and the disk are gone).
    Destroyed,
}

impl VolumeState {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Destroyed => "destroyed",
        }
    }
}

/// A volume (`Volume`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Volume {
    /// The id.
    pub id: VolumeId,
    /// Its name (several volumes of an app may share one: `[[mounts]].source`).
    pub name: String,
    /// Its state.
    pub state: VolumeState,
    /// Its region.
    pub region: String,
    /// Its zone: aloft's host name within the region (Fly's hardware zone).
    #[serde(default)]
    pub zone: String,
    /// Size, GB.
    pub size_gb: u32,
    /// Encrypted at rest (aloft's volumes are not, yet).
    #[serde(default)]
    pub encrypted: bool,
    /// Filesystem (`ext4`).
    #[serde(default)]
    pub fstype: String,
    /// The machine that mounts it, if one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_machine_id: Option<String>,
    /// The attached machine's allocation (Nomad era); aloft leaves it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_alloc_id: Option<String>,
    /// Created, RFC 3339.
    #[serde(default)]
    pub created_at: String,
    /// Whether the volume's host answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_status: Option<HostStatus>,
    /// Days its snapshots are kept (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_retention: Option<u32>,
    /// Whether a snapshot is taken daily (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_backup_enabled: Option<bool>,
    /// Filesystem block size, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u64>,
    /// Filesystem blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<u64>,
    /// Blocks available to unprivileged users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks_avail: Option<u64>,
    /// Free blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks_free: Option<u64>,
    /// Filesystem size, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    /// Bytes in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_used: Option<u64>,
    /// `local` (a disk on the host) or `cache`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// `POST /v1/apps/{app}/volumes` body (`CreateVolumeRequest`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreateVolumeRequest {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Region; the server's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Size, GB (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_gb: Option<u32>,
    /// Encrypt at rest. aloft can't yet: `true` is refused, absent means `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    /// Filesystem: `ext4` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fstype: Option<String>,
    /// Place it on a host holding no other volume of this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_unique_zone: Option<bool>,
    /// Place it on a host holding no other volume of this app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_zone_app_wide: Option<bool>,
    /// Restore from a snapshot of this app (the new volume is made on the snapshot's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// Fork a volume of this app: a copy of its disk as it is now (made on its host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_volume_id: Option<String>,
    /// Days to keep snapshots (1–60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_retention: Option<u32>,
    /// Scheduled snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_backup_enabled: Option<bool>,
    /// A placement hint: the guest of the machine that will mount it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<MachineGuest>,
    /// A placement hint: the image of the machine that will mount it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_image: Option<String>,
}

impl CreateVolumeRequest {
    /// Checks what a server can check without state; answers 400 or 422 naming the field.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_volume_name(&self.name)?;
        validate_size("size_gb", self.size_gb.unwrap_or(DEFAULT_VOLUME_SIZE_GB))?;
        if let Some(fstype) = self.fstype.as_deref()
            && fstype != VOLUME_FSTYPE
        {
            return Err(ApiError::unprocessable(format!(
                "fstype {fstype:?} is not supported: volumes hold {VOLUME_FSTYPE}"
            )));
        }
        if self.encrypted == Some(true) {
            return Err(ApiError::unprocessable(
                "aloft's volumes are not encrypted at rest yet: create it with encrypted: false (flyctl: --no-encryption)",
            ));
        }
        if self.snapshot_id.is_some() && self.source_volume_id.is_some() {
            return Err(ApiError::unprocessable(
                "give snapshot_id (restore a snapshot) or source_volume_id (fork a volume), not both",
            ));
        }
        if let Some(id) = &self.snapshot_id {
            id.parse::<SnapshotId>()
                .map_err(|e| ApiError::bad_request(format!("snapshot_id: {e}")))?;
        }
        if let Some(id) = &self.source_volume_id {
            id.parse::<VolumeId>()
                .map_err(|e| ApiError::bad_request(format!("source_volume_id: {e}")))?;
        }
        validate_retention(self.snapshot_retention)
    }
}

/// `PUT /v1/apps/{app}/volumes/{id}` body (`UpdateVolumeRequest`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UpdateVolumeRequest {
    /// Scheduled snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_backup_enabled: Option<bool>,
    /// Days to keep snapshots (1–60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_retention: Option<u32>,
}

impl UpdateVolumeRequest {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_retention(self.snapshot_retention)
    }
}

/// `PUT /v1/apps/{app}/volumes/{id}/extend` body (`ExtendVolumeRequest`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ExtendVolumeRequest {
    /// The new size, GB: larger than the current one (volumes never shrink).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_gb: Option<u32>,
}

impl ExtendVolumeRequest {
    /// The new size, checked against the volume's current one.
    pub fn new_size(&self, current_gb: u32) -> Result<u32, ApiError> {
        let Some(size) = self.size_gb else {
            return Err(ApiError::bad_request(
                "size_gb is required: the volume's new size in GB",
            ));
        };
        validate_size("size_gb", size)?;
        if size <= current_gb {
            return Err(ApiError::unprocessable(format!(
                "size_gb {size} is not larger than the volume's {current_gb} GB: volumes can only grow"
            )));
        }
        Ok(size)
    }
}

/// The answer to an extend (`ExtendVolumeResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ExtendVolumeResponse {
    /// The machine mounting the volume must restart to see the new size.
    #[serde(default)]
    pub needs_restart: bool,
    /// The volume.
    pub volume: Volume,
}

/// Why `size_gb` is not a volume size (1 to [`MAX_VOLUME_SIZE_GB`]), if it is not: the one
/// wording the API, the agent and its volume store give.
pub fn volume_size_problem(size_gb: u32) -> Option<String> {
    (!(1..=MAX_VOLUME_SIZE_GB).contains(&size_gb))
        .then(|| format!("{size_gb} GB is out of range: a volume holds 1 to {MAX_VOLUME_SIZE_GB} GB"))
}

fn validate_size(field: &str, size: u32) -> Result<(), ApiError> {
    match volume_size_problem(size) {
        None => Ok(()),
        Some(problem) => Err(ApiError::unprocessable(format!("{field} {problem}"))),
    }
}

fn validate_retention(days: Option<u32>) -> Result<(), ApiError> {
    match days {
        Some(d) if !(1..=60).contains(&d) => Err(ApiError::unprocessable(format!(
            "snapshot_retention {d} is out of range: 1 to 60 days"
        ))),
        _ => Ok(()),
    }
}

/// The status of a snapshot that was taken ([`VolumeSnapshot::status`]).
pub const SNAPSHOT_CREATED: &str = "created";

/// Days a volume's snapshots are kept unless its `snapshot_retention` says otherwise (Fly's).
pub const DEFAULT_SNAPSHOT_RETENTION_DAYS: u32 = 5;

/// A snapshot of a volume (`VolumeSnapshot`): its disk as it was at one instant, from which a new
/// volume can be made (`CreateVolumeRequest::snapshot_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct VolumeSnapshot {
    /// The id.
    pub id: SnapshotId,
    /// Taken, RFC 3339.
    pub created_at: String,
    /// `sha256:…` of the copy's data as taken (`aloft_api::HostSnapshot::digest`), what a
    /// restore checks.
    pub digest: String,
    /// Days it is kept from `created_at`.
    pub retention_days: u32,
    /// Bytes it holds on its host's disk (a snapshot is as sparse as the volume).
    pub size: u64,
    /// `created` once taken.
    pub status: String,
    /// The volume's size when it was taken, bytes.
    pub volume_size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_made_and_parsed() {
        let id = VolumeId::from_random([0, 1, 35, 36, 255, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]);
        assert_eq!(id.as_str(), "vol_01z039abcdefghij");
        assert_eq!(id.as_str().parse::<VolumeId>().unwrap(), id);
        for bad in [
            "",
            "vol_",
            "vol_ABC",
            "vol-abc",
            "abc",
            "vol_a/b",
            &format!("vol_{}", "a".repeat(33)),
        ] {
            assert!(bad.parse::<VolumeId>().is_err(), "{bad:?}");
        }
        let e = serde_json::from_str::<VolumeId>("\"nope\"").unwrap_err();
        assert!(e.to_string().contains("vol_ followed by"), "{e}");
    }

    #[test]
    fn names_follow_fly() {
        for ok in ["data", "pg_data", "a", "x1", &"a".repeat(30)] {
            validate_volume_name(ok).unwrap();
        }
        for bad in ["", "Data", "my-data", "a b", &"a".repeat(31)] {
            assert_eq!(validate_volume_name(bad).unwrap_err().status(), 400, "{bad:?}");
        }
    }

    #[test]
    fn create_requests_are_checked() {
        let ok = CreateVolumeRequest {
            name: "data".into(),
            ..Default::default()
        };
        ok.validate().unwrap();
        let cases = [
            CreateVolumeRequest {
                size_gb: Some(0),
                ..ok.clone()
            },
            CreateVolumeRequest {
                size_gb: Some(501),
                ..ok.clone()
            },
            CreateVolumeRequest {
                fstype: Some("xfs".into()),
                ..ok.clone()
            },
            CreateVolumeRequest {
                encrypted: Some(true),
                ..ok.clone()
            },
            CreateVolumeRequest {
                snapshot_id: Some("vs_1".into()),
                source_volume_id: Some("vol_1".into()),
                ..ok.clone()
            },
            CreateVolumeRequest {
                snapshot_retention: Some(61),
                ..ok.clone()
            },
        ];
        for c in cases {
            assert_eq!(c.validate().unwrap_err().status(), 422, "{c:?}");
        }
        for (snapshot, source) in [(Some("vs_"), None), (Some("vol_1"), None), (None, Some("vs_1"))] {
            let c = CreateVolumeRequest {
                snapshot_id: snapshot.map(str::to_owned),
                source_volume_id: source.map(str::to_owned),
                ..ok.clone()
            };
            assert_eq!(c.validate().unwrap_err().status(), 400, "{c:?}");
        }
        for (snapshot, source) in [(Some("vs_1"), None), (None, Some("vol_1"))] {
            CreateVolumeRequest {
                snapshot_id: snapshot.map(str::to_owned),
                source_volume_id: source.map(str::to_owned),
                ..ok.clone()
            }
            .validate()
            .unwrap();
        }
        CreateVolumeRequest {
            encrypted: Some(false),
            fstype: Some("ext4".into()),
            size_gb: Some(500),
            ..ok
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn volumes_only_grow() {
        let req = ExtendVolumeRequest { size_gb: Some(3) };
        assert_eq!(req.new_size(1).unwrap(), 3);
        assert_eq!(req.new_size(3).unwrap_err().status(), 422);
        assert_eq!(
            ExtendVolumeRequest { size_gb: None }
                .new_size(1)
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            ExtendVolumeRequest { size_gb: Some(900) }
                .new_size(1)
                .unwrap_err()
                .status(),
            422
        );
    }
}
