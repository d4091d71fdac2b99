//! Sealing secrets at rest (app secrets; the edge's certificate keys): ChaCha20-Poly1305 (from
//! `ring`) under a 32-byte key kept in a file of its own, apart from the database that holds the
//! ciphertexts.
//!
//! - [`Key::load_or_create`] reads the key file, or creates it (32 random bytes, mode 0600,
//!   created atomically: two processes racing end up with the same key). A key file that group or
//!   others may read is refused.
//! - [`Key::seal`] encrypts with a fresh random 96-bit nonce and binds the ciphertext to
//!   *associated data* (the caller's context, e.g. app and secret name), so a ciphertext moved to
//!   another record does not open.
//! - [`Key::open`] decrypts; a wrong key, other associated data or a changed byte fail.
//!
//! Nothing here logs or formats a plaintext: [`Key`]'s `Debug` prints no key bytes.
//! Design notes: `docs/adr/0012-secrets.md` (certificate keys:
//! `docs/adr/0014-edge-certificates.md`).

#![warn(missing_docs)]

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};

/// Length of a key, bytes.
pub const KEY_LEN: usize = 32;

/// Why sealing, opening or loading the key failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretboxError {
    /// Reading or writing the key file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The key file may be read by group or others.
    #[error(
        "secrets key {path} has mode {mode:o}: it must be readable by its owner only; run `chmod 600 {path}`"
    )]
    KeyMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold a key.
    #[error(
        "secrets key {path} holds {len} bytes, not {KEY_LEN}: restore the original key file (secrets sealed with another key cannot be opened)"
    )]
    KeyLength {
        /// The file.
        path: PathBuf,
        /// What it holds.
        len: usize,
    },
    /// The system's random source failed.
    #[error("the system random number generator failed")]
    Random,
    /// Encryption failed (the plaintext is too long for one message).
    #[error("could not encrypt the secret")]
    Seal,
    /// Decryption failed: another key, other associated data, or changed bytes.
    #[error(
        "could not decrypt a sealed secret: it was sealed with another key or for another record, or it was changed"
    )]
    Open,
    /// A sealed value is not valid base64 or has a wrong nonce length.
    #[error("a sealed secret is malformed: {0}")]
    Malformed(&'static str),
}

/// A secret key for [`Key::seal`] and [`Key::open`]. Its `Debug` shows no key bytes.
pub struct Key {
    key: LessSafeKey,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// A sealed value: the nonce and the ciphertext with its tag, both base64. Not secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The 96-bit nonce, base64.
    pub nonce: String,
    /// Ciphertext and 128-bit tag, base64.
    pub ciphertext: String,
}

impl Key {
    /// A key from its bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Result<Self, SecretboxError> {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, bytes).map_err(|_| SecretboxError::Seal)?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
        })
    }

    /// A fresh random key (not saved anywhere).
    pub fn generate() -> Result<Self, SecretboxError> {
        Self::from_bytes(&random_bytes::<KEY_LEN>()?)
    }

    /// The key in `path`, created (32 random bytes, mode 0600) if the file does not exist. The
    /// directory must exist. Refused if group or others may read the file.
    pub fn load_or_create(path: &Path) -> Result<Self, SecretboxError> {
        match std::fs::metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_key_file(path)?,
            Err(source) => {
                return Err(SecretboxError::Io {
                    op: "inspect the secrets key",
                    path: path.to_owned(),
                    source,
                });
            }
        }
        let io = |op| {
            move |source| SecretboxError::Io {
                op,
                path: path.to_owned(),
                source,
            }
        };
        let meta = std::fs::metadata(path).map_err(io("inspect the secrets key"))?;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretboxError::KeyMode {
                path: path.to_owned(),
                mode,
            });
        }
        let bytes = std::fs::read(path).map_err(io("read the secrets key"))?;
        let key: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SecretboxError::KeyLength {
                path: path.to_owned(),
                len: bytes.len(),
            })?;
        Self::from_bytes(&key)
    }

    /// Encrypts `plaintext` under a fresh random nonce, bound to `ad`.
    pub fn seal(&self, plaintext: &[u8], ad: &[u8]) -> Result<Sealed, SecretboxError> {
        let nonce = random_bytes::<NONCE_LEN>()?;
        let mut buf = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(ad), &mut buf)
            .map_err(|_| SecretboxError::Seal)?;
        Ok(Sealed {
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(&buf),
        })
    }

    /// Decrypts what [`Key::seal`] made with the same key and `ad`.
    pub fn open(&self, sealed: &Sealed, ad: &[u8]) -> Result<Vec<u8>, SecretboxError> {
        let nonce = B64
            .decode(&sealed.nonce)
            .map_err(|_| SecretboxError::Malformed("the nonce is not base64"))?;
        let nonce: [u8; NONCE_LEN] = nonce
            .as_slice()
            .try_into()
            .map_err(|_| SecretboxError::Malformed("the nonce is not 96 bits"))?;
        let mut buf = B64
            .decode(&sealed.ciphertext)
            .map_err(|_| SecretboxError::Malformed("the ciphertext is not base64"))?;
        let plain = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(ad), &mut buf)
            .map_err(|_| SecretboxError::Open)?;
        Ok(plain.to_vec())
    }
}

/// Hex SHA-256 of `value`: the digest the API shows instead of a secret's value.
pub fn digest(value: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, value);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn random_bytes<const N: usize>() -> Result<[u8; N], SecretboxError> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| SecretboxError::Random)?;
    Ok(out)
}

/// Writes a new key to a private temporary file, then links it into place: the key file appears
/// whole or not at all, and of two racing creators the second keeps the first one's key.
fn create_key_file(path: &Path) -> Result<(), SecretboxError> {
    let key = random_bytes::<KEY_LEN>()?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let io = |op, p: &Path| {
        let p = p.to_owned();
        move |source| SecretboxError::Io { op, path: p, source }
    };
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create the secrets key", &tmp))?;
    let written = file
        .write_all(&key)
        .and_then(|()| file.sync_all())
        .map_err(io("write the secrets key", &tmp));
    drop(file);
    let linked = written.and_then(|()| match std::fs::hard_link(&tmp, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(SecretboxError::Io {
            op: "install the secrets key",
            path: path.to_owned(),
            source,
        }),
    });
    let _ = std::fs::remove_file(&tmp);
    linked?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let k = Key::generate().unwrap();
        let s = k.seal(b"hunter2", b"web\0DB_PASSWORD").unwrap();
        assert_eq!(k.open(&s, b"web\0DB_PASSWORD").unwrap(), b"hunter2");
        assert!(!s.ciphertext.contains("hunter2"));
        // Other associated data, another key, a changed byte: refused.
        assert!(matches!(k.open(&s, b"web\0OTHER"), Err(SecretboxError::Open)));
        let other = Key::generate().unwrap();
        assert!(matches!(
            other.open(&s, b"web\0DB_PASSWORD"),
            Err(SecretboxError::Open)
        ));
        let mut bytes = B64.decode(&s.ciphertext).unwrap();
        bytes[0] ^= 1;
        let tampered = Sealed {
            ciphertext: B64.encode(bytes),
            ..s.clone()
        };
        assert!(k.open(&tampered, b"web\0DB_PASSWORD").is_err());
        // Fresh nonces: the same plaintext seals differently.
        let again = k.seal(b"hunter2", b"web\0DB_PASSWORD").unwrap();
        assert_ne!(again.nonce, s.nonce);
        assert_ne!(again.ciphertext, s.ciphertext);
        assert!(
            k.open(
                &Sealed {
                    nonce: "AA==".into(),
                    ..s
                },
                b""
            )
            .is_err()
        );
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let k1 = Key::load_or_create(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let sealed = k1.seal(b"v", b"ad").unwrap();
        let k2 = Key::load_or_create(&path).unwrap();
        assert_eq!(k2.open(&sealed, b"ad").unwrap(), b"v");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
        assert_eq!(format!("{k2:?}"), "Key(<redacted>)");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Key::load_or_create(&path).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");

        let short = dir.path().join("short.key");
        std::fs::write(&short, b"abc").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Key::load_or_create(&short),
            Err(SecretboxError::KeyLength { len: 3, .. })
        ));
    }

    #[test]
    fn digest_is_hex_sha256() {
        assert_eq!(
            digest(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
