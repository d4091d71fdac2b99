//! Applying image layers onto a directory, so that a hostile layer can never read or write outside it.
//!
//! An [`Unpacker`] owns one target root and applies layers in order ([`Unpacker::apply_layer`]); the
//! limits in [`UnpackLimits`] hold for the whole image. [`unpack_layer`] is the one-layer shorthand.
//! Synchronous and blocking (an async caller uses `spawn_blocking`); no threads.
//!
//! # Safety design
//!
//! * Entry names are normalised first ([`path`]): a leading `/` is ignored (layer paths are relative
//!   to the image root), `.` and empty components are dropped, and **any `..` component is an error**,
//!   as are NUL bytes, components over 255 bytes and paths over the length and depth limits.
//! * The target root is opened once; every parent directory is opened from that descriptor with
//!   `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`. A symlink on the way,
//!   whoever planted it, resolves as it would in the guest: an absolute target starts at the root
//!   and `..` stops there, so the kernel guarantees the result is inside the root. Missing parents
//!   are created one component at a time inside the directory just opened.
//! * The final component is never followed: an existing occupant is removed with `unlinkat` (a
//!   directory recursively, through `O_NOFOLLOW` descriptors) and the new entry is created with
//!   `O_CREAT | O_EXCL | O_NOFOLLOW`, `mkdirat`, `symlinkat`, `mknodat` or `linkat`; metadata goes
//!   through the new file's descriptor or `*at` calls with `AT_SYMLINK_NOFOLLOW`. A symlink in the
//!   way is replaced, never written through.
//! * Hardlink targets are normalised like entry names and looked up the same way, so they can only
//!   name an inode already inside the root. Whiteouts delete through the same parent lookup and a
//!   non-following recursive removal.
//! * Limits: content bytes (across all layers), entry count, path length and depth, and the size of
//!   extension headers (PAX, GNU long names), which are read into memory. Everything the layer makes
//!   the decompressor produce counts, so a bomb stops at the limit. The tar stream is read in raw
//!   mode and PAX records are parsed here by their length prefix ([`pax`]).
//!
//! # Decisions
//!
//! * Symlinked parents are followed *inside* the root (as containerd, Docker and umoci do) rather
//!   than refused, so layers that write through an image's own symlinks (`lib -> usr/lib`) apply.
//! * Kept as the image says: numeric owners (names are ignored), all 12 mode bits, mtimes (atime =
//!   PAX atime or mtime; directory times are set at the end of each layer), device nodes and FIFOs.
//! * Extended attributes (PAX `SCHILY.xattr.*`) are kept for `user.*`, `security.capability` and
//!   POSIX ACLs (`system.posix_acl_*`), on regular files and directories. Everything else
//!   (`trusted.*`, which overlayfs interprets, and host-LSM labels like `security.selinux` or
//!   `security.ima`) and attributes on other entry types are dropped and counted
//!   ([`UnpackStats::xattrs_skipped`]). `LIBARCHIVE.xattr.*` records are ignored.
//! * Whiteouts follow the OCI image spec: `.wh.NAME` deletes NAME as lower layers left it, and
//!   `.wh..wh..opq` empties its directory of lower layers' content; what the same layer wrote (before
//!   or after the marker, tracked by inode) survives both. Other `.wh..wh.*` names (aufs metadata)
//!   are ignored; whiteout files are never created.
//! * GNU and PAX sparse files, and PAX sizes that differ from the header's (files over 8 GiB in pure
//!   PAX archives), are refused as unsupported. A layer that ends without the end-of-archive blocks is
//!   accepted, as Go's `archive/tar` does (digests catch truncation); data after those blocks is read
//!   and dropped, up to 1 MiB.
//! * The result holds the image's setuid programs, file capabilities and device nodes, so the host
//!   must not let anyone else reach it: [`Unpacker::new`] refuses a root whose parent directory is not
//!   private (owned by us, no group/other permissions).
//! * Needs root (or `CAP_CHOWN`, `CAP_FOWNER`, `CAP_MKNOD`) for owners and device nodes; without them
//!   those entries fail with an error rather than being silently changed.
//!
//! After an error the root is half-applied and the [`Unpacker`] refuses further layers: the caller
//! deletes the directory. No descriptor outlives a call.

mod path;
mod pax;
mod sys;
mod tree;

use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

pub use crate::manifest::Compression;
use path::{EntryPath, PathProblem, cstring, display};
use pax::PaxHeader;
use sys::Timestamp;
use tree::{Existing, ParentError, Tree, Written};

/// Bytes read from the decompressor per call, and the size of the copy buffer.
const CHUNK: usize = 256 * 1024;

/// Data tolerated after the end-of-archive blocks (tar writers pad to a record size, usually 10 KiB).
const MAX_TRAILING: u64 = 1024 * 1024;

/// Name prefix of an OCI whiteout file.
const WHITEOUT_PREFIX: &[u8] = b".wh.";

/// What remains of an opaque marker's name (`.wh..wh..opq`) after [`WHITEOUT_PREFIX`].
const OPAQUE_REST: &[u8] = b".wh..opq";

/// Bounds on what an image may make the unpacker do. The byte and entry limits hold across all layers
/// an [`Unpacker`] applies; the others per entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Content bytes read from all layers' entries (file data, plus data carried by other entries and
    /// thrown away), including extension headers. Default 8 GiB.
    pub max_bytes: u64,
    /// Entries in all layers (every file, directory, link, node and whiteout). Default 1,000,000.
    pub max_entries: u64,
    /// Length of an entry's normalised path, or a symlink's target, in bytes. Default 4096.
    pub max_path_len: usize,
    /// Components in an entry's path. Default 256.
    pub max_depth: usize,
    /// Size of one extension header (a PAX record set, a GNU long name or long link). Default 1 MiB.
    pub max_header_bytes: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self {
            max_bytes: 8 << 30,
            max_entries: 1_000_000,
            max_path_len: 4096,
            max_depth: 256,
            max_header_bytes: 1 << 20,
        }
    }
}

/// The compression a layer media type names, or [`UnpackError::UnsupportedMediaType`].
pub fn layer_compression(media_type: &str) -> Result<Compression, UnpackError> {
    Compression::of_layer(media_type).ok_or_else(|| UnpackError::UnsupportedMediaType {
        media_type: media_type.to_owned(),
    })
}

/// What applying one layer (or, from [`Unpacker::totals`], all of them) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries read (whiteouts and PAX global headers included, extension headers not).
    pub entries: u64,
    /// Content bytes read (what counts against [`UnpackLimits::max_bytes`]).
    pub bytes: u64,
    /// Whiteout entries applied (`.wh.NAME` and opaque markers).
    pub whiteouts: u64,
    /// Extended attributes dropped by the policy in the module doc.
    pub xattrs_skipped: u64,
}

impl UnpackStats {
    fn add(&mut self, other: &Self) {
        self.entries += other.entries;
        self.bytes += other.bytes;
        self.whiteouts += other.whiteouts;
        self.xattrs_skipped += other.xattrs_skipped;
    }
}

/// Why a layer could not be applied. `entry` fields hold the entry's name as the layer spells it,
/// made printable.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs, reason = "fields are named for what the #[error] message says")]
pub enum UnpackError {
    /// The target root could not be opened (missing, not a directory).
    #[error("open unpack root {path}")]
    OpenRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The target root's parent is reachable by other users.
    #[error(
        "unpack root {path} must sit in a directory only its owner can enter ({parent} is not), since it \
         will hold the image's setuid programs and device nodes"
    )]
    RootNotPrivate { path: PathBuf, parent: PathBuf },
    /// An earlier layer failed on this unpacker.
    #[error("an earlier layer failed; the unpack root is half-applied and must be discarded")]
    Poisoned,
    /// The layer media type is not a tar, tar+gzip or tar+zstd one.
    #[error("unsupported layer media type {media_type}")]
    UnsupportedMediaType { media_type: String },
    /// The decompressor could not be set up.
    #[error("start decompressing the layer")]
    Decompress {
        #[source]
        source: io::Error,
    },
    /// The layer stream could not be read or decoded, or a header is corrupt.
    #[error("read the layer after entry {after}")]
    Read {
        after: String,
        #[source]
        source: io::Error,
    },
    /// An entry's data could not be read, or the layer ends inside it.
    #[error("read layer entry {entry}")]
    ReadEntry {
        entry: String,
        #[source]
        source: io::Error,
    },
    /// The entry's path has a `..` component (or a whiteout names `..`).
    #[error("layer entry {entry} escapes the root")]
    Escape { entry: String },
    /// A hardlink target has a `..` component.
    #[error("layer entry {entry}: hardlink target {target} escapes the root")]
    LinkEscape { entry: String, target: String },
    /// The entry contradicts itself or the format (`problem` says how).
    #[error("layer entry {entry} is malformed: {problem}")]
    Malformed { entry: String, problem: String },
    /// Sparse files and unknown tar types.
    #[error("layer entry {entry} has an unsupported type: {kind}")]
    UnsupportedEntryType { entry: String, kind: String },
    /// Over [`UnpackLimits::max_path_len`] (a path, or a symlink target).
    #[error("layer entry {entry}: path is {len} bytes, over the limit of {max}")]
    PathTooLong { entry: String, len: usize, max: usize },
    /// A component over 255 bytes.
    #[error("layer entry {entry}: a path component is {len} bytes, over the limit of 255")]
    NameTooLong { entry: String, len: usize },
    /// Over [`UnpackLimits::max_depth`].
    #[error("layer entry {entry}: path is {depth} levels deep, over the limit of {max}")]
    PathTooDeep { entry: String, depth: usize, max: usize },
    /// Over [`UnpackLimits::max_bytes`]: a decompression bomb ends here.
    #[error("layer entry {entry}: unpacking it would exceed the limit of {max} bytes")]
    TooManyBytes { entry: String, max: u64 },
    /// Over [`UnpackLimits::max_entries`].
    #[error("layer entry {entry} exceeds the limit of {max} entries")]
    TooManyEntries { entry: String, max: u64 },
    /// A PAX header or GNU long name over [`UnpackLimits::max_header_bytes`].
    #[error("extension header after entry {after} is {len} bytes, over the limit of {max}")]
    HeaderTooLarge { after: String, len: u64, max: u64 },
    /// A prefix of the entry's path is a file or a dangling symlink.
    #[error("layer entry {entry}: parent {parent} is not a directory (or is a symlink to nowhere)")]
    ParentNotDirectory { entry: String, parent: String },
    /// A hardlink names a file that is not in the root.
    #[error("layer entry {entry}: hardlink target {target} does not exist")]
    LinkTargetMissing { entry: String, target: String },
    /// A hardlink names a directory.
    #[error("layer entry {entry}: hardlink target {target} is a directory")]
    LinkTargetDirectory { entry: String, target: String },
    /// More than a little data follows the end-of-archive blocks.
    #[error("layer has more than {max} bytes after its end-of-archive marker")]
    TrailingData { max: u64 },
    /// A filesystem operation on the entry failed (`op` says which).
    #[error("layer entry {entry}: {op}")]
    Io {
        entry: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Applies layers in order onto one root directory. See the module doc for what is guaranteed.
#[derive(Debug)]
pub struct Unpacker {
    tree: Tree,
    limits: UnpackLimits,
    totals: UnpackStats,
    poisoned: bool,
}

impl Unpacker {
    /// Opens `root` (an existing directory, normally empty) as the target. Its parent directory must be
    /// owned by this process's user and closed to group and others (see the module doc).
    pub fn new(root: impl AsRef<Path>, limits: UnpackLimits) -> Result<Self, UnpackError> {
        let root = root.as_ref();
        let open_err = |source| UnpackError::OpenRoot {
            path: root.to_owned(),
            source,
        };
        let canonical = std::fs::canonicalize(root).map_err(open_err)?;
        let private = match canonical.parent() {
            Some(parent) => {
                use std::os::unix::fs::MetadataExt;
                let meta = std::fs::metadata(parent).map_err(open_err)?;
                meta.uid() == sys::euid() && meta.mode() & 0o077 == 0
            }
            None => false,
        };
        if !private {
            return Err(UnpackError::RootNotPrivate {
                parent: canonical.parent().unwrap_or(&canonical).to_owned(),
                path: root.to_owned(),
            });
        }
        let tree = Tree::open(&canonical).map_err(open_err)?;
        Ok(Self {
            tree,
            limits,
            totals: UnpackStats::default(),
            poisoned: false,
        })
    }

    /// Applies one layer, read to its end from `layer` (so a digest-checking reader the caller wraps
    /// around it sees every byte). Returns what this layer did.
    pub fn apply_layer<R: Read>(
        &mut self,
        layer: R,
        compression: Compression,
    ) -> Result<UnpackStats, UnpackError> {
        if self.poisoned {
            return Err(UnpackError::Poisoned);
        }
        self.poisoned = true;
        let mut state = Layer::default();
        let result = self.apply(layer, compression, &mut state);
        self.tree.invalidate();
        self.totals.add(&state.stats);
        result?;
        self.poisoned = false;
        Ok(state.stats)
    }

    /// What all layers applied so far did.
    pub fn totals(&self) -> UnpackStats {
        self.totals
    }

    /// The limits in force.
    pub fn limits(&self) -> &UnpackLimits {
        &self.limits
    }
}

/// Applies one layer onto `root` with its own limits: [`Unpacker::new`] then
/// [`Unpacker::apply_layer`].
pub fn unpack_layer<R: Read>(
    root: &Path,
    layer: R,
    compression: Compression,
    limits: &UnpackLimits,
) -> Result<UnpackStats, UnpackError> {
    Unpacker::new(root, limits.clone())?.apply_layer(layer, compression)
}

/// The decompressed tar stream.
enum Decoder<R: Read> {
    Plain(R),
    Gzip(flate2::read::MultiGzDecoder<R>),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<R>>),
}

impl<R: Read> Decoder<R> {
    fn new(input: R, compression: Compression) -> io::Result<Self> {
        Ok(match compression {
            Compression::None => Self::Plain(input),
            Compression::Gzip => Self::Gzip(flate2::read::MultiGzDecoder::new(input)),
            Compression::Zstd => Self::Zstd(zstd::stream::read::Decoder::new(input)?),
        })
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(r) => r.read(buf),
            Self::Gzip(r) => r.read(buf),
            Self::Zstd(r) => r.read(buf),
        }
    }
}

/// State of the layer being applied.
#[derive(Debug, Default)]
struct Layer {
    stats: UnpackStats,
    /// Inodes this layer created or rewrote: whiteouts and opaque markers leave them alone.
    written: Written,
    /// Directory times, set once the layer is done (creating children changes them).
    dir_times: Vec<(EntryPath, Timestamp, Timestamp)>,
    buf: Vec<u8>,
}

/// Extension headers read since the last real entry; they describe the next one.
#[derive(Debug, Default, PartialEq, Eq)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<PaxHeader>,
}

/// Entry types the unpacker materialises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

/// Owner, mode, times and the extended attributes kept by policy.
#[derive(Debug)]
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    atime: Timestamp,
    mtime: Timestamp,
    xattrs: Vec<(CString, Vec<u8>)>,
}

/// Extended attributes an image may carry onto the host tree (see the module doc).
fn xattr_allowed(name: &[u8]) -> bool {
    name.starts_with(b"user.")
        || name == b"security.capability"
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

/// Offset of the type flag in a tar header.
const TYPEFLAG: usize = 156;

impl Unpacker {
    fn apply<R: Read>(
        &mut self,
        input: R,
        compression: Compression,
        layer: &mut Layer,
    ) -> Result<(), UnpackError> {
        let decoder =
            Decoder::new(input, compression).map_err(|source| UnpackError::Decompress { source })?;
        let mut archive = tar::Archive::new(BufReader::with_capacity(CHUNK, decoder));
        let mut last = String::from("(start of layer)");
        {
            let read_err = |after: &str, source| UnpackError::Read {
                after: after.to_owned(),
                source,
            };
            let entries = archive.entries().map_err(|e| read_err(&last, e))?.raw(true);
            let mut pending = Pending::default();
            for next in entries {
                let mut entry = next.map_err(|e| read_err(&last, e))?;
                match entry.header().as_bytes()[TYPEFLAG] {
                    b'L' => {
                        let mut name = self.read_extension(&mut entry, layer, &last)?;
                        // A GNU long name is NUL-terminated.
                        if let Some(nul) = name.iter().position(|b| *b == 0) {
                            name.truncate(nul);
                        }
                        set_once(&mut pending.long_name, name, &last)?;
                    }
                    b'K' => {
                        let mut name = self.read_extension(&mut entry, layer, &last)?;
                        if let Some(nul) = name.iter().position(|b| *b == 0) {
                            name.truncate(nul);
                        }
                        set_once(&mut pending.long_link, name, &last)?;
                    }
                    b'x' => {
                        let data = self.read_extension(&mut entry, layer, &last)?;
                        let header = pax::parse(&data).map_err(|problem| UnpackError::Malformed {
                            entry: format!("(PAX header after {last})"),
                            problem: problem.to_owned(),
                        })?;
                        set_once(&mut pending.pax, header, &last)?;
                    }
                    b'g' => {
                        // Global PAX headers are ignored, as by Docker and containerd.
                        self.count(layer, "(PAX global header)")?;
                        self.pump(&mut entry, None, layer, "(PAX global header)")?;
                    }
                    _ => last = self.apply_entry(&mut entry, std::mem::take(&mut pending), layer)?,
                }
            }
            if pending != Pending::default() {
                return Err(UnpackError::Malformed {
                    entry: format!("(extension header after {last})"),
                    problem: "the layer ends before the entry it describes".to_owned(),
                });
            }
        }
        self.set_dir_times(layer)?;
        let mut rest = archive.into_inner().take(MAX_TRAILING + 1);
        let trailing = io::copy(&mut rest, &mut io::sink()).map_err(|e| UnpackError::Read {
            after: last.clone(),
            source: e,
        })?;
        if trailing > MAX_TRAILING {
            return Err(UnpackError::TrailingData { max: MAX_TRAILING });
        }
        Ok(())
    }

    /// Counts one entry against the limit.
    fn count(&self, layer: &mut Layer, entry: &str) -> Result<(), UnpackError> {
        if self.totals.entries + layer.stats.entries >= self.limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                entry: entry.to_owned(),
                max: self.limits.max_entries,
            });
        }
        layer.stats.entries += 1;
        Ok(())
    }

    /// Fails unless `n` more content bytes fit in the limit.
    fn check_bytes(&self, layer: &Layer, n: u64, entry: &str) -> Result<(), UnpackError> {
        let used = self.totals.bytes.saturating_add(layer.stats.bytes);
        if used.saturating_add(n) > self.limits.max_bytes {
            return Err(UnpackError::TooManyBytes {
                entry: entry.to_owned(),
                max: self.limits.max_bytes,
            });
        }
        Ok(())
    }

    /// Reads the data of an extension header (bounded by `max_header_bytes`).
    fn read_extension<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        layer: &mut Layer,
        after: &str,
    ) -> Result<Vec<u8>, UnpackError> {
        let len = entry.size();
        if len > self.limits.max_header_bytes {
            return Err(UnpackError::HeaderTooLarge {
                after: after.to_owned(),
                len,
                max: self.limits.max_header_bytes,
            });
        }
        let what = format!("(extension header after {after})");
        self.check_bytes(layer, len, &what)?;
        let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        let read = entry
            .read_to_end(&mut data)
            .map_err(|source| UnpackError::ReadEntry {
                entry: what.clone(),
                source,
            })?;
        if read as u64 != len {
            return Err(UnpackError::ReadEntry {
                entry: what,
                source: io::ErrorKind::UnexpectedEof.into(),
            });
        }
        layer.stats.bytes += len;
        Ok(data)
    }

    /// Copies the rest of `entry`'s data into `out` (or nowhere), counting it against the limit.
    /// Returns the number of bytes.
    fn pump<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        mut out: Option<&mut File>,
        layer: &mut Layer,
        name: &str,
    ) -> Result<u64, UnpackError> {
        if layer.buf.is_empty() {
            layer.buf = vec![0; CHUNK];
        }
        let mut total = 0u64;
        loop {
            let n = match entry.read(&mut layer.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(UnpackError::ReadEntry {
                        entry: name.to_owned(),
                        source,
                    });
                }
            };
            let chunk = layer.buf.get(..n).unwrap_or_default();
            self.check_bytes(layer, n as u64, name)?;
            if let Some(file) = out.as_mut() {
                file.write_all(chunk).map_err(|source| UnpackError::Io {
                    entry: name.to_owned(),
                    op: "write the file's content",
                    source,
                })?;
            }
            layer.stats.bytes += n as u64;
            total += n as u64;
        }
        Ok(total)
    }

    /// Applies one real entry; returns its printable name.
    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        ext: Pending,
        layer: &mut Layer,
    ) -> Result<String, UnpackError> {
        let header = entry.header().clone();
        let pax = ext.pax.unwrap_or_default();
        // As Go's archive/tar: PAX path over the header's, a GNU long name over both.
        let raw_path = match (ext.long_name, &pax.path) {
            (Some(name), _) => name,
            (None, Some(path)) => path.clone(),
            (None, None) => header.path_bytes().into_owned(),
        };
        let name = display(&raw_path);
        self.count(layer, &name)?;
        self.check_bytes(layer, entry.size(), &name)?;
        let malformed = |problem: &str| UnpackError::Malformed {
            entry: name.clone(),
            problem: problem.to_owned(),
        };
        if pax.size.is_some_and(|size| size != entry.size()) {
            return Err(malformed(
                "its PAX size differs from its header's (files over 8 GiB are not supported)",
            ));
        }
        let kind = self.kind_of(&header, &raw_path, &pax, &name)?;
        let path = self.parse_path(&raw_path, &name)?;

        if let Some(rest) = path.name().strip_prefix(WHITEOUT_PREFIX) {
            let rest = rest.to_vec();
            self.whiteout(&path, &rest, layer, &name)?;
            self.pump(entry, None, layer, &name)?;
            return Ok(name);
        }

        let raw_link = match (ext.long_link, &pax.linkpath) {
            (Some(link), _) => Some(link),
            (None, Some(link)) => Some(link.clone()),
            (None, None) => header.link_name_bytes().map(|l| l.into_owned()),
        };
        let meta = self.meta(&header, pax, layer, &name)?;

        if path.is_root() {
            if kind != Kind::Dir {
                return Err(malformed("it would replace the root directory"));
            }
            let root = self
                .tree
                .root()
                .try_clone_to_owned()
                .map_err(|source| UnpackError::Io {
                    entry: name.clone(),
                    op: "open the root",
                    source,
                })?;
            set_fd_meta(root.as_fd(), &meta).map_err(|(op, source)| UnpackError::Io {
                entry: name.clone(),
                op,
                source,
            })?;
            layer.dir_times.push((path, meta.atime, meta.mtime));
        } else {
            match kind {
                Kind::File => self.make_file(entry, &path, &meta, layer, &name)?,
                Kind::Dir => self.make_dir(&path, &meta, layer, &name)?,
                Kind::Hardlink => self.make_hardlink(&path, raw_link, layer, &name)?,
                Kind::Symlink => self.make_symlink(&path, raw_link, &meta, layer, &name)?,
                Kind::Char | Kind::Block | Kind::Fifo => {
                    self.make_node(kind, &header, &path, &meta, layer, &name)?
                }
            }
        }
        self.pump(entry, None, layer, &name)?;
        Ok(name)
    }

    fn kind_of(
        &self,
        header: &tar::Header,
        raw_path: &[u8],
        pax: &PaxHeader,
        name: &str,
    ) -> Result<Kind, UnpackError> {
        let unsupported = |kind: &str| UnpackError::UnsupportedEntryType {
            entry: name.to_owned(),
            kind: kind.to_owned(),
        };
        if pax.sparse {
            return Err(unsupported("PAX sparse file"));
        }
        Ok(match header.as_bytes()[TYPEFLAG] {
            // Pre-POSIX archives mark directories with a trailing slash on a '\0' type.
            0 if raw_path.ends_with(b"/") => Kind::Dir,
            0 | b'0' | b'7' => Kind::File,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            b'S' => return Err(unsupported("GNU sparse file")),
            other => return Err(unsupported(&format!("type flag {}", display(&[other])))),
        })
    }

    fn parse_path(&self, raw: &[u8], name: &str) -> Result<EntryPath, UnpackError> {
        let entry = name.to_owned();
        EntryPath::parse(raw, self.limits.max_path_len, self.limits.max_depth).map_err(
            |problem| match problem {
                PathProblem::DotDot => UnpackError::Escape { entry },
                PathProblem::Nul => UnpackError::Malformed {
                    entry,
                    problem: "its path contains a NUL byte".to_owned(),
                },
                PathProblem::TooLong { len } => UnpackError::PathTooLong {
                    entry,
                    len,
                    max: self.limits.max_path_len,
                },
                PathProblem::NameTooLong { len } => UnpackError::NameTooLong { entry, len },
                PathProblem::TooDeep { depth } => UnpackError::PathTooDeep {
                    entry,
                    depth,
                    max: self.limits.max_depth,
                },
            },
        )
    }

    fn meta(
        &self,
        header: &tar::Header,
        pax: PaxHeader,
        layer: &mut Layer,
        name: &str,
    ) -> Result<Meta, UnpackError> {
        let malformed = |problem: String| UnpackError::Malformed {
            entry: name.to_owned(),
            problem,
        };
        let id = |pax: Option<u64>, field: io::Result<u64>, what: &str| -> Result<u32, UnpackError> {
            let value = match pax {
                Some(v) => v,
                None => field.map_err(|e| malformed(format!("bad {what}: {e}")))?,
            };
            u32::try_from(value).map_err(|_| malformed(format!("{what} {value} does not fit in 32 bits")))
        };
        let uid = id(pax.uid, header.uid(), "uid")?;
        let gid = id(pax.gid, header.gid(), "gid")?;
        let mode = header.mode().map_err(|e| malformed(format!("bad mode: {e}")))? & 0o7777;
        let mtime = match pax.mtime {
            Some(t) => t,
            None => {
                let secs = header.mtime().map_err(|e| malformed(format!("bad mtime: {e}")))?;
                let secs =
                    i64::try_from(secs).map_err(|_| malformed(format!("mtime {secs} is out of range")))?;
                Timestamp { secs, nanos: 0 }
            }
        };
        let atime = pax.atime.unwrap_or(mtime);
        let mut xattrs = Vec::new();
        for (key, value) in pax.xattrs {
            if !xattr_allowed(&key) {
                layer.stats.xattrs_skipped += 1;
                continue;
            }
            let key =
                CString::new(key).map_err(|_| malformed("an xattr name contains a NUL byte".to_owned()))?;
            xattrs.push((key, value));
        }
        Ok(Meta {
            uid,
            gid,
            mode,
            atime,
            mtime,
            xattrs,
        })
    }

    /// Opens the entry's parent directory inside the root (creating missing ones).
    fn parent(&mut self, path: &EntryPath, name: &str) -> Result<OwnedFd, UnpackError> {
        self.tree.parent_dir(path).map_err(|e| match e {
            ParentError::NotDirectory(parent) => UnpackError::ParentNotDirectory {
                entry: name.to_owned(),
                parent: display(&parent),
            },
            ParentError::Io(source) => UnpackError::Io {
                entry: name.to_owned(),
                op: "open its parent directory",
                source,
            },
        })
    }

    /// Clears the way for a new entry at `path` in `dir` (see [`tree::prepare`]).
    fn prepare(
        &mut self,
        dir: BorrowedFd<'_>,
        file_name: &CString,
        is_dir: bool,
        name: &str,
    ) -> Result<Existing, UnpackError> {
        let (existing, removed) =
            tree::prepare(dir, file_name, is_dir).map_err(|source| UnpackError::Io {
                entry: name.to_owned(),
                op: "remove what is in its place",
                source,
            })?;
        if removed {
            self.tree.invalidate();
        }
        Ok(existing)
    }

    fn make_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &EntryPath,
        meta: &Meta,
        layer: &mut Layer,
        name: &str,
    ) -> Result<(), UnpackError> {
        let io_err = |op| {
            move |source| UnpackError::Io {
                entry: name.to_owned(),
                op,
                source,
            }
        };
        let dir = self.parent(path, name)?;
        let file_name = cstring(path.name()).map_err(io_err("name the file"))?;
        self.prepare(dir.as_fd(), &file_name, false, name)?;
        let fd = sys::openat(
            dir.as_fd(),
            &file_name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        )
        .map_err(io_err("create the file"))?;
        let mut file = File::from(fd);
        let size = entry.size();
        let written = self.pump(entry, Some(&mut file), layer, name)?;
        if written != size {
            return Err(UnpackError::ReadEntry {
                entry: name.to_owned(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, format!("{written} of {size} bytes")),
            });
        }
        set_fd_meta(file.as_fd(), meta).map_err(|(op, source)| io_err(op)(source))?;
        sys::set_times(file.as_fd(), meta.atime, meta.mtime).map_err(io_err("set its times"))?;
        let st = sys::fstat(file.as_fd()).map_err(io_err("stat the new file"))?;
        layer.written.insert((st.dev, st.ino));
        Ok(())
    }

    fn make_dir(
        &mut self,
        path: &EntryPath,
        meta: &Meta,
        layer: &mut Layer,
        name: &str,
    ) -> Result<(), UnpackError> {
        let io_err = |op| {
            move |source| UnpackError::Io {
                entry: name.to_owned(),
                op,
                source,
            }
        };
        let dir = self.parent(path, name)?;
        let dir_name = cstring(path.name()).map_err(io_err("name the directory"))?;
        if self.prepare(dir.as_fd(), &dir_name, true, name)? == Existing::Nothing {
            sys::mkdirat(dir.as_fd(), &dir_name, 0o700).map_err(io_err("create the directory"))?;
        }
        let fd = sys::openat(
            dir.as_fd(),
            &dir_name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(io_err("open the directory"))?;
        set_fd_meta(fd.as_fd(), meta).map_err(|(op, source)| io_err(op)(source))?;
        let st = sys::fstat(fd.as_fd()).map_err(io_err("stat the directory"))?;
        layer.written.insert((st.dev, st.ino));
        layer.dir_times.push((path.clone(), meta.atime, meta.mtime));
        Ok(())
    }

    fn make_symlink(
        &mut self,
        path: &EntryPath,
        target: Option<Vec<u8>>,
        meta: &Meta,
        layer: &mut Layer,
        name: &str,
    ) -> Result<(), UnpackError> {
        let io_err = |op| {
            move |source| UnpackError::Io {
                entry: name.to_owned(),
                op,
                source,
            }
        };
        let malformed = |problem: &str| UnpackError::Malformed {
            entry: name.to_owned(),
            problem: problem.to_owned(),
        };
        let target = target
            .filter(|t| !t.is_empty())
            .ok_or_else(|| malformed("a symlink without a target"))?;
        if target.len() > self.limits.max_path_len {
            return Err(UnpackError::PathTooLong {
                entry: name.to_owned(),
                len: target.len(),
                max: self.limits.max_path_len,
            });
        }
        // The target is stored as the image says and never resolved here.
        let target = CString::new(target).map_err(|_| malformed("its symlink target contains a NUL byte"))?;
        let dir = self.parent(path, name)?;
        let link_name = cstring(path.name()).map_err(io_err("name the symlink"))?;
        self.prepare(dir.as_fd(), &link_name, false, name)?;
        sys::symlinkat(&target, dir.as_fd(), &link_name).map_err(io_err("create the symlink"))?;
        sys::lchown_at(dir.as_fd(), &link_name, meta.uid, meta.gid)
            .map_err(io_err("set the symlink's owner"))?;
        sys::set_times_at(dir.as_fd(), &link_name, meta.atime, meta.mtime)
            .map_err(io_err("set the symlink's times"))?;
        layer.stats.xattrs_skipped += meta.xattrs.len() as u64;
        let id = tree::identity_at(dir.as_fd(), &link_name).map_err(io_err("stat the symlink"))?;
        layer.written.insert(id);
        Ok(())
    }

    fn make_node(
        &mut self,
        kind: Kind,
        header: &tar::Header,
        path: &EntryPath,
        meta: &Meta,
        layer: &mut Layer,
        name: &str,
    ) -> Result<(), UnpackError> {
        let io_err = |op| {
            move |source| UnpackError::Io {
                entry: name.to_owned(),
                op,
                source,
            }
        };
        let number = |field: io::Result<Option<u32>>| {
            field
                .map(Option::unwrap_or_default)
                .map_err(|e| UnpackError::Malformed {
                    entry: name.to_owned(),
                    problem: format!("bad device number: {e}"),
                })
        };
        let (file_type, dev) = match kind {
            Kind::Char => (
                libc::S_IFCHR,
                libc::makedev(number(header.device_major())?, number(header.device_minor())?),
            ),
            Kind::Block => (
                libc::S_IFBLK,
                libc::makedev(number(header.device_major())?, number(header.device_minor())?),
            ),
            _ => (libc::S_IFIFO, 0),
        };
        let dir = self.parent(path, name)?;
        let node_name = cstring(path.name()).map_err(io_err("name the node"))?;
        self.prepare(dir.as_fd(), &node_name, false, name)?;
        sys::mknodat(dir.as_fd(), &node_name, file_type | 0o600, dev).map_err(io_err("create the node"))?;
        sys::lchown_at(dir.as_fd(), &node_name, meta.uid, meta.gid)
            .map_err(io_err("set the node's owner"))?;
        sys::lchmod_at(dir.as_fd(), &node_name, meta.mode).map_err(io_err("set the node's mode"))?;
        sys::set_times_at(dir.as_fd(), &node_name, meta.atime, meta.mtime)
            .map_err(io_err("set the node's times"))?;
        layer.stats.xattrs_skipped += meta.xattrs.len() as u64;
        let id = tree::identity_at(dir.as_fd(), &node_name).map_err(io_err("stat the node"))?;
        layer.written.insert(id);
        Ok(())
    }

    fn make_hardlink(
        &mut self,
        path: &EntryPath,
        target: Option<Vec<u8>>,
        layer: &mut Layer,
        name: &str,
    ) -> Result<(), UnpackError> {
        let io_err = |op| {
            move |source| UnpackError::Io {
                entry: name.to_owned(),
                op,
                source,
            }
        };
        let raw = target
            .filter(|t| !t.is_empty())
            .ok_or_else(|| UnpackError::Malformed {
                entry: name.to_owned(),
                problem: "a hardlink without a target".to_owned(),
            })?;
        let shown = display(&raw);
        let target = match self.parse_path(&raw, &shown) {
            Ok(target) => target,
            Err(UnpackError::Escape { .. }) => {
                return Err(UnpackError::LinkEscape {
                    entry: name.to_owned(),
                    target: shown,
                });
            }
            Err(e) => return Err(e),
        };
        let missing = || UnpackError::LinkTargetMissing {
            entry: name.to_owned(),
            target: shown.clone(),
        };
        let is_dir = || UnpackError::LinkTargetDirectory {
            entry: name.to_owned(),
            target: shown.clone(),
        };
        if target.is_root() {
            return Err(is_dir());
        }
        if target == *path {
            return Err(UnpackError::Malformed {
                entry: name.to_owned(),
                problem: "a hardlink to itself".to_owned(),
            });
        }
        let target_dir = self
            .tree
            .lookup_dir(target.parent())
            .map_err(io_err("open the hardlink target's directory"))?
            .ok_or_else(missing)?;
        let target_name = cstring(target.name()).map_err(io_err("name the hardlink target"))?;
        match sys::lstat_at(target_dir.as_fd(), &target_name) {
            Ok(st) if st.is_dir() => return Err(is_dir()),
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(missing()),
            Err(source) => return Err(io_err("stat the hardlink target")(source)),
        }
        let dir = self.parent(path, name)?;
        let link_name = cstring(path.name()).map_err(io_err("name the hardlink"))?;
        self.prepare(dir.as_fd(), &link_name, false, name)?;
        match sys::linkat(target_dir.as_fd(), &target_name, dir.as_fd(), &link_name) {
            Ok(()) => {}
            // Clearing the way removed the target (it was below the entry's own path).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(missing()),
            Err(source) => return Err(io_err("create the hardlink")(source)),
        }
        let id = tree::identity_at(dir.as_fd(), &link_name).map_err(io_err("stat the hardlink"))?;
        layer.written.insert(id);
        Ok(())
    }

    /// Applies a whiteout entry at `path`, whose name is `.wh.` + `rest`.
    fn whiteout(
        &mut self,
        path: &EntryPath,
        rest: &[u8],
        layer: &mut Layer,
        name: &str,
    ) -> Result<(), UnpackError> {
        let io_err = |op| {
            move |source| UnpackError::Io {
                entry: name.to_owned(),
                op,
                source,
            }
        };
        if rest != OPAQUE_REST && rest.starts_with(WHITEOUT_PREFIX) {
            // `.wh..wh.*`: aufs bookkeeping (hardlink dirs, `.wh..wh.aufs`), meaningless here.
            return Ok(());
        }
        match rest {
            b"" | b"." => {
                return Err(UnpackError::Malformed {
                    entry: name.to_owned(),
                    problem: "a whiteout that names no file".to_owned(),
                });
            }
            b".." => {
                return Err(UnpackError::Escape {
                    entry: name.to_owned(),
                });
            }
            _ => {}
        }
        layer.stats.whiteouts += 1;
        // Nothing to hide when the directory does not exist (or is not a directory).
        let Some(dir) = self
            .tree
            .lookup_dir(path.parent())
            .map_err(io_err("open the whiteout's directory"))?
        else {
            return Ok(());
        };
        self.tree.invalidate();
        if rest == OPAQUE_REST {
            tree::clear(dir.as_fd(), Some(&layer.written), 0)
                .map_err(io_err("empty the opaque directory"))?;
        } else {
            let victim = cstring(rest).map_err(io_err("name the whiteout's target"))?;
            tree::remove(dir.as_fd(), &victim, Some(&layer.written), 0)
                .map_err(io_err("delete the whited-out path"))?;
        }
        Ok(())
    }

    /// Sets the times of the directories this layer named, now that their children exist.
    fn set_dir_times(&mut self, layer: &mut Layer) -> Result<(), UnpackError> {
        for (path, atime, mtime) in std::mem::take(&mut layer.dir_times) {
            let name = display(path.as_bytes());
            let io_err = |op| {
                let name = name.clone();
                move |source| UnpackError::Io {
                    entry: name,
                    op,
                    source,
                }
            };
            if path.is_root() {
                sys::set_times(self.tree.root(), atime, mtime).map_err(io_err("set the root's times"))?;
                continue;
            }
            // A directory removed or replaced later in the layer has no times to set.
            let Some(dir) = self
                .tree
                .lookup_dir(path.parent())
                .map_err(io_err("open its parent directory"))?
            else {
                continue;
            };
            let dir_name = cstring(path.name()).map_err(io_err("name the directory"))?;
            match sys::lstat_at(dir.as_fd(), &dir_name) {
                Ok(st) if st.is_dir() => {
                    sys::set_times_at(dir.as_fd(), &dir_name, atime, mtime)
                        .map_err(io_err("set the directory's times"))?;
                }
                _ => continue,
            }
        }
        Ok(())
    }
}

/// Sets owner, mode and kept extended attributes on an open file or directory, in that order: chown
/// clears setuid bits and file capabilities, so it goes first. Errors name the step.
fn set_fd_meta(fd: BorrowedFd<'_>, meta: &Meta) -> Result<(), (&'static str, io::Error)> {
    std::os::unix::fs::fchown(fd, Some(meta.uid), Some(meta.gid)).map_err(|e| ("set its owner", e))?;
    sys::fchmod(fd, meta.mode).map_err(|e| ("set its mode", e))?;
    for (key, value) in &meta.xattrs {
        sys::set_xattr(fd, key, value).map_err(|e| ("set an extended attribute", e))?;
    }
    Ok(())
}

/// Stores `value` in `slot` unless a header of the same kind already did (two describing one entry
/// is refused, rather than guessing which one other readers would believe).
fn set_once<T>(slot: &mut Option<T>, value: T, after: &str) -> Result<(), UnpackError> {
    if slot.is_some() {
        return Err(UnpackError::Malformed {
            entry: format!("(extension header after {after})"),
            problem: "two extension headers of one kind for one entry".to_owned(),
        });
    }
    *slot = Some(value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_map_to_compression() {
        use Compression::*;
        for (media_type, expected) in [
            ("application/vnd.oci.image.layer.v1.tar", None),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Gzip),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Zstd),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Gzip,
            ),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", Gzip),
            ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", Gzip),
        ] {
            assert_eq!(layer_compression(media_type).unwrap(), expected, "{media_type}");
        }
        for bad in [
            "application/vnd.oci.image.config.v1+json",
            "application/vnd.oci.image.layer.v1.tar+bzip2",
            "",
        ] {
            assert!(layer_compression(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn xattr_policy_keeps_guest_data_and_drops_host_interpreted_namespaces() {
        for kept in [
            "user.foo",
            "security.capability",
            "system.posix_acl_access",
            "system.posix_acl_default",
        ] {
            assert!(xattr_allowed(kept.as_bytes()), "{kept}");
        }
        for dropped in [
            "trusted.overlay.opaque",
            "trusted.overlay.redirect",
            "security.selinux",
            "security.ima",
            "security.evm",
            "security.capability2",
            "system.nfs4_acl",
            "user",
            "",
        ] {
            assert!(!xattr_allowed(dropped.as_bytes()), "{dropped}");
        }
    }

    #[test]
    fn whiteout_names_are_classified() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let mut unpacker = Unpacker::new(&root, UnpackLimits::default()).unwrap();
        let mut layer = Layer::default();
        let path = EntryPath::parse(b"d/.wh.x", 100, 10).unwrap();
        for (rest, ok) in [
            (&b"x"[..], true),
            (b".wh.plnk", true),
            (b".wh..opq", true),
            (b"", false),
            (b".", false),
            (b"..", false),
        ] {
            let result = unpacker.whiteout(&path, rest, &mut layer, "d/.wh.x");
            assert_eq!(result.is_ok(), ok, "{:?}: {result:?}", display(rest));
        }
        // `.wh..wh.plnk` is aufs bookkeeping, not counted; the missing `d` makes the others no-ops.
        assert_eq!(layer.stats.whiteouts, 2);
    }
}
