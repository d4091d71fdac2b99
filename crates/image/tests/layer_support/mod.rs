//! Test support for layer unpacking: a tar writer that spells headers byte by byte (the `tar` crate's
//! builder refuses the hostile names these tests need), a fixture with a sentinel tree next to the
//! target root, and a snapshot of every byte and metadata bit of that sentinel tree.
#![allow(
    dead_code,
    reason = "each test file uses a different part of the support module"
)]
#![allow(
    clippy::unwrap_used,
    reason = "test fixtures: a failed setup step fails the test"
)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aloft_image::unpack::{Compression, UnpackError, UnpackLimits, UnpackStats, Unpacker};

/// Metadata a test entry carries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attrs {
    pub(crate) mode: u32,
    pub(crate) uid: u64,
    pub(crate) gid: u64,
    pub(crate) mtime: u64,
}

impl Attrs {
    pub(crate) const FILE: Self = Self {
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 1_600_000_000,
    };
    pub(crate) const DIR: Self = Self {
        mode: 0o755,
        ..Self::FILE
    };
}

/// Writes a tar stream entry by entry.
#[derive(Debug, Default)]
pub(crate) struct Layer {
    out: Vec<u8>,
}

impl Layer {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// One header (with GNU long name/link entries first when needed) plus data, names verbatim.
    pub(crate) fn raw(
        &mut self,
        typeflag: u8,
        name: &[u8],
        link: &[u8],
        data: &[u8],
        attrs: Attrs,
        dev: (u32, u32),
    ) -> &mut Self {
        if name.len() > 100 {
            let mut long = name.to_vec();
            long.push(0);
            self.raw(b'L', b"././@LongLink", b"", &long, Attrs::FILE, (0, 0));
        }
        if link.len() > 100 {
            let mut long = link.to_vec();
            long.push(0);
            self.raw(b'K', b"././@LongLink", b"", &long, Attrs::FILE, (0, 0));
        }
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::new(typeflag));
        header.set_size(data.len() as u64);
        header.set_mode(attrs.mode);
        header.set_uid(attrs.uid);
        header.set_gid(attrs.gid);
        header.set_mtime(attrs.mtime);
        header.set_device_major(dev.0).unwrap();
        header.set_device_minor(dev.1).unwrap();
        let old = header.as_old_mut();
        let n = name.len().min(100);
        old.name[..n].copy_from_slice(&name[..n]);
        let n = link.len().min(100);
        old.linkname[..n].copy_from_slice(&link[..n]);
        header.set_cksum();
        self.out.extend_from_slice(header.as_bytes());
        self.data(data);
        self
    }

    /// Raw data (padded to the block size).
    fn data(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
    }

    /// A PAX header (records formatted with their length) for the next entry.
    pub(crate) fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (key, value) in records {
            let body_len = key.len() + value.len() + 3;
            let mut len = body_len + 1;
            while len != body_len + len.to_string().len() {
                len = body_len + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        self.raw(b'x', b"PaxHeaders/x", b"", &data, Attrs::FILE, (0, 0))
    }

    pub(crate) fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.raw(b'0', name.as_bytes(), b"", data, Attrs::FILE, (0, 0))
    }

    pub(crate) fn file_with(&mut self, name: &str, data: &[u8], attrs: Attrs) -> &mut Self {
        self.raw(b'0', name.as_bytes(), b"", data, attrs, (0, 0))
    }

    pub(crate) fn dir(&mut self, name: &str) -> &mut Self {
        self.raw(b'5', name.as_bytes(), b"", b"", Attrs::DIR, (0, 0))
    }

    pub(crate) fn dir_with(&mut self, name: &str, attrs: Attrs) -> &mut Self {
        self.raw(b'5', name.as_bytes(), b"", b"", attrs, (0, 0))
    }

    pub(crate) fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            b'2',
            name.as_bytes(),
            target.as_bytes(),
            b"",
            Attrs {
                mode: 0o777,
                ..Attrs::FILE
            },
            (0, 0),
        )
    }

    pub(crate) fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(b'1', name.as_bytes(), target.as_bytes(), b"", Attrs::FILE, (0, 0))
    }

    pub(crate) fn char_dev(&mut self, name: &str, major: u32, minor: u32, attrs: Attrs) -> &mut Self {
        self.raw(b'3', name.as_bytes(), b"", b"", attrs, (major, minor))
    }

    pub(crate) fn block_dev(&mut self, name: &str, major: u32, minor: u32, attrs: Attrs) -> &mut Self {
        self.raw(b'4', name.as_bytes(), b"", b"", attrs, (major, minor))
    }

    pub(crate) fn fifo(&mut self, name: &str, attrs: Attrs) -> &mut Self {
        self.raw(b'6', name.as_bytes(), b"", b"", attrs, (0, 0))
    }

    /// The tar stream with its end-of-archive blocks.
    pub(crate) fn tar(&self) -> Vec<u8> {
        let mut out = self.out.clone();
        out.extend_from_slice(&[0; 1024]);
        out
    }

    pub(crate) fn gzip(&self) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&self.tar()).unwrap();
        enc.finish().unwrap()
    }

    pub(crate) fn zstd(&self) -> Vec<u8> {
        zstd::stream::encode_all(&self.tar()[..], 3).unwrap()
    }
}

/// A temp dir holding the target `root/` and, beside it, a sentinel tree `outside/` plus a file
/// `victim` at the top: what a hostile layer would aim at.
#[derive(Debug)]
pub(crate) struct Fixture {
    pub(crate) tmp: tempfile::TempDir,
    pub(crate) root: PathBuf,
    pub(crate) outside: PathBuf,
}

impl Fixture {
    pub(crate) fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        // The unpacker insists that nobody else can reach the root (it will hold setuid programs).
        std::fs::set_permissions(tmp.path(), PermissionsExt::from_mode(0o700)).unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir_all(outside.join("etc")).unwrap();
        std::fs::create_dir_all(outside.join("dir/sub")).unwrap();
        std::fs::write(outside.join("passwd"), b"root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(outside.join("etc/passwd"), b"daemon:x:1:1::/:/bin/false\n").unwrap();
        std::fs::write(outside.join("etc/shadow"), b"root:$6$secret:19000::::::\n").unwrap();
        std::fs::set_permissions(outside.join("etc/shadow"), PermissionsExt::from_mode(0o600)).unwrap();
        std::fs::write(outside.join("dir/sub/file"), b"keep me").unwrap();
        std::fs::write(outside.join("suid"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(outside.join("suid"), PermissionsExt::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("passwd", outside.join("link")).unwrap();
        std::fs::write(tmp.path().join("victim"), b"top-level sentinel").unwrap();
        Self { tmp, root, outside }
    }

    /// The sentinel tree's absolute path as a tar name would spell it.
    pub(crate) fn outside_abs(&self) -> String {
        self.outside.to_str().unwrap().to_owned()
    }

    /// Every path in the temp dir except the target root, with all its metadata and content.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let mut nodes = BTreeMap::new();
        walk(self.tmp.path(), Path::new("."), &self.root, &mut nodes);
        Snapshot(nodes)
    }

    /// Applies `layers` (plain tar) in order; stops at the first error.
    pub(crate) fn apply(&self, layers: &[Vec<u8>], limits: UnpackLimits) -> Result<UnpackStats, UnpackError> {
        let mut unpacker = Unpacker::new(&self.root, limits)?;
        for layer in layers {
            unpacker.apply_layer(&layer[..], Compression::None)?;
        }
        Ok(unpacker.totals())
    }
}

/// One inode as seen through `lstat`, plus its content or link target. ctime catches every metadata
/// change (chmod, chown, xattrs, link count) even when the value was put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) size: u64,
    pub(crate) ino: u64,
    pub(crate) nlink: u64,
    pub(crate) rdev: u64,
    pub(crate) mtime: (i64, i64),
    pub(crate) ctime: (i64, i64),
    pub(crate) content: Option<Vec<u8>>,
    pub(crate) link: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot(pub BTreeMap<PathBuf, Node>);

impl Snapshot {
    /// Panics with the differing paths unless `self == after`.
    pub(crate) fn assert_unchanged(&self, after: &Snapshot) {
        if self == after {
            return;
        }
        let mut diffs = Vec::new();
        for (path, node) in &self.0 {
            match after.0.get(path) {
                None => diffs.push(format!("deleted: {}", path.display())),
                Some(n) if n != node => diffs.push(format!(
                    "changed: {}\n  before {node:?}\n  after  {n:?}",
                    path.display()
                )),
                Some(_) => {}
            }
        }
        for path in after.0.keys() {
            if !self.0.contains_key(path) {
                diffs.push(format!("created: {}", path.display()));
            }
        }
        panic!("the tree outside the root changed:\n{}", diffs.join("\n"));
    }
}

fn walk(abs: &Path, rel: &Path, skip: &Path, out: &mut BTreeMap<PathBuf, Node>) {
    let meta = std::fs::symlink_metadata(abs).unwrap();
    let ft = meta.file_type();
    let node = Node {
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        size: meta.size(),
        ino: meta.ino(),
        nlink: meta.nlink(),
        rdev: meta.rdev(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
        content: ft.is_file().then(|| std::fs::read(abs).unwrap()),
        link: ft.is_symlink().then(|| std::fs::read_link(abs).unwrap()),
    };
    out.insert(rel.to_owned(), node);
    if ft.is_dir() {
        for entry in std::fs::read_dir(abs).unwrap() {
            let entry = entry.unwrap();
            let child = entry.path();
            if child == skip {
                continue;
            }
            walk(&child, &rel.join(entry.file_name()), skip, out);
        }
    }
}

/// What a test expects of one path inside the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expect {
    File(Vec<u8>),
    Dir,
    Symlink(PathBuf),
    Other,
}

/// The root's tree as path → kind and content (no metadata), for exact comparisons.
pub(crate) fn tree(root: &Path) -> BTreeMap<String, Expect> {
    let mut out = BTreeMap::new();
    fn go(abs: &Path, rel: &str, out: &mut BTreeMap<String, Expect>) {
        for entry in std::fs::read_dir(abs).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ft = entry.file_type().unwrap();
            let value = if ft.is_dir() {
                go(&entry.path(), &rel, out);
                Expect::Dir
            } else if ft.is_symlink() {
                Expect::Symlink(std::fs::read_link(entry.path()).unwrap())
            } else if ft.is_file() {
                Expect::File(std::fs::read(entry.path()).unwrap())
            } else {
                Expect::Other
            };
            out.insert(rel, value);
        }
    }
    go(root, "", &mut out);
    out
}

/// `lgetxattr(2)`: the value of extended attribute `name` on `path` (not followed), if set.
pub(crate) fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    xattr_sys::lgetxattr(path, name)
}

mod xattr_sys {
    //! The one syscall the tests need that std lacks.
    #![expect(unsafe_code, reason = "lgetxattr has no std API")]

    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    pub(super) fn lgetxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let path = CString::new(path.as_os_str().as_bytes()).unwrap();
        let name = CString::new(name).unwrap();
        let mut buf = vec![0u8; 65536];
        // SAFETY: both strings are NUL-terminated; `buf` has `buf.len()` writable bytes.
        let n = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        let n = usize::try_from(n).ok()?;
        buf.truncate(n);
        Some(buf)
    }
}
