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
//! - Every key has a [`KeyId`] (8 bytes of a domain-separated SHA-256 of the key, hex): a
//!   [`Sealed`] value records the id of the key that sealed it (`key_id`; values sealed before
//!   ids were recorded have none: "unknown, try every key").
//! - [`Keyring`]: the current key (seals) and previous keys (open only), for rotating a key
//!   without losing what the old one sealed. [`Keyring::open`] picks the key by id (tries all
//!   for a value without one); a value whose key is not in the ring fails with an error naming
//!   the id it needs and where keys are configured. [`Keyring::needs_reseal`] tells which values
//!   to seal again with the current key.
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

/// Length of a [`KeyId`], bytes.
pub const KEY_ID_LEN: usize = 8;

/// What is hashed before a key's bytes to make its [`KeyId`] (so the id is no plain hash of the
/// key that could match any other use of it).
const KEY_ID_DOMAIN: &[u8] = b"aloft-secretbox key id v1\0";

/// Which key sealed a value: the first 8 bytes of SHA-256(`"aloft-secretbox key id v1\0"` ‖
/// key), shown as 16 hex digits. Not secret; names a key in logs and errors.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; KEY_ID_LEN]);

impl KeyId {
    fn of(bytes: &[u8; KEY_LEN]) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(KEY_ID_DOMAIN);
        ctx.update(bytes);
        let digest = ctx.finish();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest.as_ref()[..KEY_ID_LEN]);
        Self(id)
    }

    /// Whether `text` (a [`Sealed::key_id`]) names this id.
    pub fn matches(&self, text: &str) -> bool {
        text.eq_ignore_ascii_case(&self.to_string())
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

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
    /// The value records the id of a key that is not configured.
    #[error(
        "the value was sealed with key {needed}, which is not among the configured keys ({configured}){}",
        hint_suffix(.hint)
    )]
    UnknownKey {
        /// The key id the value records.
        needed: String,
        /// The configured keys: ids, with their files where known.
        configured: String,
        /// Where keys are configured (empty: nothing to add).
        hint: String,
    },
    /// A value that records no key id (sealed before ids were recorded) opens with none of the
    /// configured keys.
    #[error(
        "could not decrypt a sealed value that records no key id with any configured key ({tried}): it was sealed with another key or for another record, or it was changed{}",
        hint_suffix(.hint)
    )]
    NoKeyOpens {
        /// The keys tried: ids, with their files where known.
        tried: String,
        /// Where keys are configured (empty: nothing to add).
        hint: String,
    },
    /// A sealed value is not valid base64 or has a wrong nonce length.
    #[error("a sealed secret is malformed: {0}")]
    Malformed(&'static str),
}

fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!("; {hint}")
    }
}

/// A secret key for [`Key::seal`] and [`Key::open`]. Its `Debug` shows no key bytes.
pub struct Key {
    key: LessSafeKey,
    id: KeyId,
    path: Option<PathBuf>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// A sealed value: the nonce and the ciphertext with its tag, both base64, and the id of the key
/// that sealed it. Not secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The 96-bit nonce, base64.
    pub nonce: String,
    /// Ciphertext and 128-bit tag, base64.
    pub ciphertext: String,
    /// The [`KeyId`] of the key that sealed it (hex); `None` for values sealed before ids were
    /// recorded (any key may have sealed them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

impl Key {
    /// A key from its bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Result<Self, SecretboxError> {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, bytes).map_err(|_| SecretboxError::Seal)?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
            id: KeyId::of(bytes),
            path: None,
        })
    }

    /// The key's id (what [`Key::seal`] records in [`Sealed::key_id`]).
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The file the key was read from, if it was.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The id, and the file in parentheses where known: how messages name a key.
    fn describe(&self) -> String {
        match &self.path {
            Some(p) => format!("{} ({})", self.id, p.display()),
            None => self.id.to_string(),
        }
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
        Self::load(path)
    }

    /// The key in `path`, which must exist (a previous key of a [`Keyring`]: creating one would
    /// open nothing). Refused if group or others may read the file.
    pub fn load(path: &Path) -> Result<Self, SecretboxError> {
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
        let mut key = Self::from_bytes(&key)?;
        key.path = Some(path.to_owned());
        Ok(key)
    }

    /// Encrypts `plaintext` under a fresh random nonce, bound to `ad`; the result records this
    /// key's id.
    pub fn seal(&self, plaintext: &[u8], ad: &[u8]) -> Result<Sealed, SecretboxError> {
        let nonce = random_bytes::<NONCE_LEN>()?;
        let mut buf = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(ad), &mut buf)
            .map_err(|_| SecretboxError::Seal)?;
        Ok(Sealed {
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(&buf),
            key_id: Some(self.id.to_string()),
        })
    }

    /// Decrypts what [`Key::seal`] made with the same key and `ad`. A value that records another
    /// key's id is refused without trying ([`SecretboxError::UnknownKey`]).
    pub fn open(&self, sealed: &Sealed, ad: &[u8]) -> Result<Vec<u8>, SecretboxError> {
        if let Some(needed) = sealed.key_id.as_deref()
            && !self.id.matches(needed)
        {
            return Err(SecretboxError::UnknownKey {
                needed: needed.to_owned(),
                configured: self.describe(),
                hint: String::new(),
            });
        }
        self.open_unchecked(sealed, ad)
    }

    /// [`Key::open`] without looking at the recorded key id.
    fn open_unchecked(&self, sealed: &Sealed, ad: &[u8]) -> Result<Vec<u8>, SecretboxError> {
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

/// The keys of one kind of sealed value: the current key, which seals, and previous keys, which
/// only open (what they sealed until a rotation). Its `Debug` shows key ids, no key bytes.
pub struct Keyring {
    current: Key,
    previous: Vec<Key>,
    hint: String,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current.id)
            .field(
                "previous",
                &self.previous.iter().map(|k| k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl From<Key> for Keyring {
    fn from(key: Key) -> Self {
        Self::new(key)
    }
}

impl Keyring {
    /// A ring sealing with `current`, with no previous keys.
    pub fn new(current: Key) -> Self {
        Self {
            current,
            previous: Vec::new(),
            hint: String::new(),
        }
    }

    /// This ring with `key` as a previous key too (opens, never seals). A key already in the
    /// ring (the same id) is not added twice.
    #[must_use]
    pub fn with_previous(mut self, key: Key) -> Self {
        if !self.keys().any(|k| k.id == key.id) {
            self.previous.push(key);
        }
        self
    }

    /// This ring with `hint` added to its errors: where the operator configures keys (e.g. "give
    /// aloftd the key file with --secrets-key-previous FILE").
    #[must_use]
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = hint.into();
        self
    }

    /// The key that seals.
    pub fn current(&self) -> &Key {
        &self.current
    }

    /// The previous keys, in the order given.
    pub fn previous(&self) -> &[Key] {
        &self.previous
    }

    /// Every key: the current one first.
    fn keys(&self) -> impl Iterator<Item = &Key> {
        std::iter::once(&self.current).chain(&self.previous)
    }

    /// The keys for messages and logs: `current ID (FILE), previous ID (FILE), …`.
    pub fn describe(&self) -> String {
        let mut out = format!("current {}", self.current.describe());
        for k in &self.previous {
            out.push_str(", previous ");
            out.push_str(&k.describe());
        }
        out
    }

    /// Seals with the current key ([`Key::seal`]).
    pub fn seal(&self, plaintext: &[u8], ad: &[u8]) -> Result<Sealed, SecretboxError> {
        self.current.seal(plaintext, ad)
    }

    /// Opens `sealed` with the key whose id it records, or, for a value that records none, with
    /// the first key that opens it (the current one first). A recorded id that no key here has
    /// is [`SecretboxError::UnknownKey`], naming it; a value without an id that no key opens is
    /// [`SecretboxError::NoKeyOpens`].
    pub fn open(&self, sealed: &Sealed, ad: &[u8]) -> Result<Vec<u8>, SecretboxError> {
        match sealed.key_id.as_deref() {
            Some(needed) => match self.keys().find(|k| k.id.matches(needed)) {
                Some(key) => key.open_unchecked(sealed, ad),
                None => Err(SecretboxError::UnknownKey {
                    needed: needed.to_owned(),
                    configured: self.describe(),
                    hint: self.hint.clone(),
                }),
            },
            None => {
                for key in self.keys() {
                    match key.open_unchecked(sealed, ad) {
                        Ok(plain) => return Ok(plain),
                        Err(e @ SecretboxError::Malformed(_)) => return Err(e),
                        Err(_) => {}
                    }
                }
                Err(SecretboxError::NoKeyOpens {
                    tried: self.describe(),
                    hint: self.hint.clone(),
                })
            }
        }
    }

    /// Whether `sealed` should be sealed again with the current key: it records another key's
    /// id, or none (sealed before ids were recorded).
    pub fn needs_reseal(&self, sealed: &Sealed) -> bool {
        !sealed
            .key_id
            .as_deref()
            .is_some_and(|id| self.current.id.matches(id))
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
        // Another key: refused by id, without trying; and by decryption when no id is recorded.
        let other = Key::generate().unwrap();
        assert!(matches!(
            other.open(&s, b"web\0DB_PASSWORD"),
            Err(SecretboxError::UnknownKey { .. })
        ));
        let no_id = Sealed {
            key_id: None,
            ..s.clone()
        };
        assert!(matches!(
            other.open(&no_id, b"web\0DB_PASSWORD"),
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

    /// Two keys in files (0600) under `dir`: (A, B).
    fn two_key_files(dir: &Path) -> (PathBuf, PathBuf) {
        let (a, b) = (dir.join("a.key"), dir.join("b.key"));
        Key::load_or_create(&a).unwrap();
        Key::load_or_create(&b).unwrap();
        (a, b)
    }

    #[test]
    fn sealed_values_record_their_key_id() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = two_key_files(dir.path());
        let k = Key::load(&a).unwrap();
        assert_eq!(k.path(), Some(a.as_path()));
        let id = k.id().to_string();
        assert_eq!(id.len(), 2 * KEY_ID_LEN);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        // Derived from the key with a domain: the same file gives the same id, and the id is no
        // prefix of the key's plain SHA-256.
        assert_eq!(Key::load(&a).unwrap().id(), k.id());
        let bytes = std::fs::read(&a).unwrap();
        assert!(!digest(&bytes).starts_with(&id));
        let s = k.seal(b"v", b"ad").unwrap();
        assert_eq!(s.key_id.as_deref(), Some(id.as_str()));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["key_id"], id.as_str());
        // A value from before ids (no `key_id`) still parses, opens, and serializes without one.
        let old: Sealed =
            serde_json::from_value(serde_json::json!({"nonce": s.nonce, "ciphertext": s.ciphertext}))
                .unwrap();
        assert_eq!(old.key_id, None);
        assert_eq!(k.open(&old, b"ad").unwrap(), b"v");
        assert!(serde_json::to_value(&old).unwrap().get("key_id").is_none());
        // A previous key must exist: loading one never creates it.
        assert!(matches!(
            Key::load(&dir.path().join("missing.key")),
            Err(SecretboxError::Io { .. })
        ));
        assert!(!dir.path().join("missing.key").exists());
    }

    #[test]
    fn a_rotated_keyring_opens_old_values_and_reseals_them_with_the_current_key() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = two_key_files(dir.path());
        let before = Keyring::new(Key::load(&a).unwrap());
        let sealed_a = before.seal(b"hunter2", b"ad").unwrap();
        assert!(!before.needs_reseal(&sealed_a));

        // Rotated: B seals, A opens what it sealed.
        let rotated = Keyring::new(Key::load(&b).unwrap()).with_previous(Key::load(&a).unwrap());
        assert_eq!(rotated.open(&sealed_a, b"ad").unwrap(), b"hunter2");
        assert!(rotated.needs_reseal(&sealed_a));
        let plain = rotated.open(&sealed_a, b"ad").unwrap();
        let sealed_b = rotated.seal(&plain, b"ad").unwrap();
        assert_eq!(sealed_b.key_id, Some(Key::load(&b).unwrap().id().to_string()));
        assert!(!rotated.needs_reseal(&sealed_b));
        // Other associated data still fails with the right key.
        assert!(matches!(
            rotated.open(&sealed_a, b"other"),
            Err(SecretboxError::Open)
        ));

        // A dropped: B alone opens the re-sealed value, and names A for the old one.
        let after = Keyring::new(Key::load(&b).unwrap())
            .with_hint("give aloftd the key file with --secrets-key-previous FILE");
        assert_eq!(after.open(&sealed_b, b"ad").unwrap(), b"hunter2");
        let e = after.open(&sealed_a, b"ad").unwrap_err();
        let a_id = Key::load(&a).unwrap().id().to_string();
        assert!(
            matches!(&e, SecretboxError::UnknownKey { needed, .. } if *needed == a_id),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains(&a_id), "{msg}");
        assert!(msg.contains(&b.display().to_string()), "{msg}");
        assert!(msg.contains("--secrets-key-previous"), "{msg}");
        assert!(!msg.contains("hunter2"));
    }

    #[test]
    fn values_without_key_id_open_with_any_key_of_the_ring() {
        let a = Key::generate().unwrap();
        let b = Key::generate().unwrap();
        let mut old = a.seal(b"v", b"ad").unwrap();
        old.key_id = None;
        let ring = Keyring::new(b).with_previous(a).with_hint("add keys with --x");
        assert_eq!(ring.open(&old, b"ad").unwrap(), b"v");
        assert!(ring.needs_reseal(&old), "no id: sealed again to record one");
        // Opened by the current key, still re-sealed to record the id.
        let mut current_old = ring.seal(b"w", b"ad").unwrap();
        current_old.key_id = None;
        assert_eq!(ring.open(&current_old, b"ad").unwrap(), b"w");
        assert!(ring.needs_reseal(&current_old));
        // No key opens it: the error lists the keys tried and the hint.
        let stranger = Key::generate().unwrap();
        let mut lost = stranger.seal(b"v", b"ad").unwrap();
        lost.key_id = None;
        let e = ring.open(&lost, b"ad").unwrap_err();
        assert!(matches!(e, SecretboxError::NoKeyOpens { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&ring.current().id().to_string()), "{msg}");
        assert!(msg.contains("--x"), "{msg}");
        // The same key given twice is kept once.
        let c = Key::from_bytes(&[7; KEY_LEN]).unwrap();
        let c_id = c.id();
        let ring = Keyring::new(c)
            .with_previous(Key::from_bytes(&[7; KEY_LEN]).unwrap())
            .with_previous(Key::from_bytes(&[8; KEY_LEN]).unwrap())
            .with_previous(Key::from_bytes(&[8; KEY_LEN]).unwrap());
        assert_eq!(ring.previous().len(), 1);
        assert!(format!("{ring:?}").contains(&c_id.to_string()));
    }

    #[test]
    fn digest_is_hex_sha256() {
        assert_eq!(
            digest(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
