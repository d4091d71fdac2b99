//! A directory tree → one gzip-compressed OCI layer, deterministically.
//!
//! Entries are written in byte order of their paths (a directory before its contents), with the
//! tree's numeric owners, all 12 mode bits, symlinks as symlinks, hardlinks as tar links to the
//! first path of the inode, device nodes and FIFOs with their numbers; sockets are skipped (tar
//! cannot hold them) and so are extended attributes. Modification times are clamped to
//! [`LayerOptions::mtime_clamp`], names of owners are left empty and the gzip header carries no
//! time or name, so the same tree always gives the same digest. The walk never leaves the tree's
//! filesystem: a mount point is written as an empty directory.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::digest::{Digest, Sha256};

use super::BootstrapError;

/// 2023-06-10T00:00:00Z, the day Debian 12 (bookworm) was released: the default latest
/// modification time in bootstrapped layers.
pub const DEFAULT_MTIME_CLAMP: u64 = 1_686_355_200;

/// How [`write_layer`] turns a tree into a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerOptions {
    /// Later modification times are written as this one (seconds since the Unix epoch).
    pub mtime_clamp: u64,
    /// Files owned by this uid (gid) are written as owned by root: for trees built by an
    /// unprivileged user that stand for root-owned files.
    pub map_to_root: Option<(u32, u32)>,
    /// Directories (relative to the root, `var/lib/apt/lists`) written empty: their contents are
    /// left out.
    pub empty_dirs: Vec<PathBuf>,
}

impl Default for LayerOptions {
    fn default() -> Self {
        Self {
            mtime_clamp: DEFAULT_MTIME_CLAMP,
            map_to_root: None,
            empty_dirs: Vec::new(),
        }
    }
}

/// A layer blob written by [`write_layer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// The gzip file.
    pub path: PathBuf,
    /// Digest of the gzip file (the layer's digest in a manifest).
    pub digest: Digest,
    /// Digest of the uncompressed tar (the layer's `diff_id` in an image config).
    pub diff_id: Digest,
    /// Size of the gzip file in bytes.
    pub size: u64,
    /// Entries written.
    pub entries: u64,
}

/// Hashes and counts what passes through.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes = self.bytes.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hashing<W>(inner: W) -> Hashing<W> {
    Hashing {
        inner,
        hash: Sha256::new(),
        bytes: 0,
    }
}

type Sink = Hashing<flate2::write::GzEncoder<Hashing<BufWriter<File>>>>;

/// Writes the tree at `root` as a gzip layer to `out` (created; must not exist).
pub fn write_layer(root: &Path, out: &Path, options: &LayerOptions) -> Result<LayerBlob, BootstrapError> {
    let root_meta = fs::symlink_metadata(root).map_err(BootstrapError::io("read layer root", root))?;
    if !root_meta.is_dir() {
        return Err(BootstrapError::Io {
            what: "read layer root",
            path: root.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(BootstrapError::io("create layer", out))?;
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(hashing(BufWriter::new(file)), flate2::Compression::default());
    let mut writer = Writer {
        builder: tar::Builder::new(hashing(gz)),
        root,
        root_dev: root_meta.dev(),
        options,
        links: HashMap::new(),
        entries: 0,
    };
    writer.walk(Path::new(""))?;
    let write_err = BootstrapError::io("write layer", out);
    let tar_sink = writer
        .builder
        .into_inner()
        .map_err(BootstrapError::io("write layer", out))?;
    let diff_id = tar_sink.hash.finish();
    let gz_sink = tar_sink
        .inner
        .finish()
        .map_err(BootstrapError::io("write layer", out))?;
    let (digest, size) = (gz_sink.hash.finish(), gz_sink.bytes);
    let file = gz_sink
        .inner
        .into_inner()
        .map_err(|e| write_err(e.into_error()))?;
    file.sync_all().map_err(BootstrapError::io("write layer", out))?;
    Ok(LayerBlob {
        path: out.to_path_buf(),
        digest,
        diff_id,
        size,
        entries: writer.entries,
    })
}

struct Writer<'a> {
    builder: tar::Builder<Sink>,
    root: &'a Path,
    root_dev: u64,
    options: &'a LayerOptions,
    /// First path of each multiply-linked inode, by (device, inode).
    links: HashMap<(u64, u64), PathBuf>,
    entries: u64,
}

impl Writer<'_> {
    /// Writes the contents of the directory `rel` (relative to the root), sorted by name.
    fn walk(&mut self, rel: &Path) -> Result<(), BootstrapError> {
        let dir = self.root.join(rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(BootstrapError::io("list", &dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(BootstrapError::io("list", &dir))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let rel = rel.join(&name);
            let path = self.root.join(&rel);
            let meta = fs::symlink_metadata(&path).map_err(BootstrapError::io("stat", &path))?;
            let descend = self.entry(&rel, &path, &meta)?;
            if descend && meta.dev() == self.root_dev && !self.options.empty_dirs.contains(&rel) {
                self.walk(&rel)?;
            }
        }
        Ok(())
    }

    /// Writes one entry; `true` for a directory whose contents come next.
    fn entry(&mut self, rel: &Path, path: &Path, meta: &fs::Metadata) -> Result<bool, BootstrapError> {
        let kind = meta.file_type();
        if kind.is_socket() {
            return Ok(false);
        }
        let err = BootstrapError::io("add to layer", path);
        let mut header = tar::Header::new_gnu();
        let map = |id: u32, mapped: Option<u32>| if mapped == Some(id) { 0 } else { id };
        header.set_uid(u64::from(map(meta.uid(), self.options.map_to_root.map(|m| m.0))));
        header.set_gid(u64::from(map(meta.gid(), self.options.map_to_root.map(|m| m.1))));
        header.set_mode(meta.mode() & 0o7777);
        let mtime = u64::try_from(meta.mtime()).unwrap_or(0);
        header.set_mtime(mtime.min(self.options.mtime_clamp));
        header.set_size(0);
        self.entries = self.entries.saturating_add(1);

        if !kind.is_dir() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key) {
                header.set_entry_type(tar::EntryType::Link);
                let first = first.clone();
                self.builder.append_link(&mut header, rel, &first).map_err(err)?;
                return Ok(false);
            }
            self.links.insert(key, rel.to_path_buf());
        }

        if kind.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            self.builder
                .append_data(&mut header, rel, io::empty())
                .map_err(err)?;
            Ok(true)
        } else if kind.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            let file = File::open(path).map_err(BootstrapError::io("open", path))?;
            // A file that changes size while being read would corrupt the archive; the tar crate
            // refuses short reads, and the layer is only ever built from a tree nobody else writes.
            self.builder.append_data(&mut header, rel, file).map_err(err)?;
            Ok(false)
        } else if kind.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            let target = fs::read_link(path).map_err(BootstrapError::io("read symlink", path))?;
            self.builder.append_link(&mut header, rel, &target).map_err(err)?;
            Ok(false)
        } else {
            let entry_type = if kind.is_char_device() {
                tar::EntryType::Char
            } else if kind.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            };
            header.set_entry_type(entry_type);
            if kind.is_char_device() || kind.is_block_device() {
                let (major, minor) = dev_numbers(meta.rdev());
                header
                    .set_device_major(major)
                    .map_err(BootstrapError::io("add to layer", path))?;
                header
                    .set_device_minor(minor)
                    .map_err(BootstrapError::io("add to layer", path))?;
            }
            self.builder
                .append_data(&mut header, rel, io::empty())
                .map_err(err)?;
            Ok(false)
        }
    }
}

/// Linux's encoding of a device number (glibc's `gnu_dev_major`/`gnu_dev_minor`).
fn dev_numbers(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & 0xffff_f000);
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xffff_ff00);
    (
        u32::try_from(major).unwrap_or(u32::MAX),
        u32::try_from(minor).unwrap_or(u32::MAX),
    )
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    /// (path, type, mode, uid, gid, mtime, link target, device) of every entry.
    type Row = (
        String,
        tar::EntryType,
        u32,
        u64,
        u64,
        u64,
        Option<String>,
        Option<(u32, u32)>,
    );

    fn entries(blob: &Path) -> Vec<Row> {
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(File::open(blob).unwrap()));
        let mut out = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let h = entry.header().clone();
            let dev = matches!(h.entry_type(), tar::EntryType::Char | tar::EntryType::Block)
                .then(|| h.device_major().unwrap().zip(h.device_minor().unwrap()))
                .flatten();
            let link = entry
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned());
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            out.push((
                path,
                h.entry_type(),
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                h.mtime().unwrap(),
                link,
                dev,
            ));
        }
        out
    }

    fn sample_tree(root: &Path) {
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("etc/apt/lists")).unwrap();
        fs::write(root.join("etc/apt/lists/big"), "left out").unwrap();
        fs::write(root.join("bin/tool"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::hard_link(root.join("bin/tool"), root.join("bin/tool-again")).unwrap();
        symlink("tool", root.join("bin/sh")).unwrap();
        symlink("/nonexistent/../outside", root.join("dangling")).unwrap();
        let long = "d".repeat(120);
        fs::create_dir_all(root.join(&long)).unwrap();
        fs::write(root.join(&long).join("f".repeat(120)), "deep").unwrap();
        fs::create_dir(root.join("tmp")).unwrap();
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    }

    fn opts() -> LayerOptions {
        LayerOptions {
            empty_dirs: vec![PathBuf::from("etc/apt/lists")],
            ..LayerOptions::default()
        }
    }

    #[test]
    fn layer_keeps_modes_links_and_order_and_leaves_out_emptied_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        sample_tree(&root);
        let blob = write_layer(&root, &dir.path().join("layer.tar.gz"), &opts()).unwrap();
        let rows = entries(&blob.path);
        let paths: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let mut sorted = paths.clone();
        sorted.sort_unstable();
        assert_eq!(paths, sorted, "entries are in path order");
        assert_eq!(blob.entries, u64::try_from(rows.len()).unwrap());
        assert!(paths.contains(&"etc/apt/lists") && !paths.contains(&"etc/apt/lists/big"));

        let row = |p: &str| rows.iter().find(|r| r.0 == p).unwrap().clone();
        let tool = row("bin/tool");
        assert_eq!((tool.1, tool.2), (tar::EntryType::Regular, 0o4755));
        assert!(tool.5 <= DEFAULT_MTIME_CLAMP);
        let again = row("bin/tool-again");
        assert_eq!(
            (again.1, again.6.as_deref()),
            (tar::EntryType::Link, Some("bin/tool"))
        );
        assert_eq!(row("bin/sh").6.as_deref(), Some("tool"));
        assert_eq!(row("dangling").6.as_deref(), Some("/nonexistent/../outside"));
        assert_eq!(row("tmp").2, 0o1777);
        let deep = format!("{}/{}", "d".repeat(120), "f".repeat(120));
        assert_eq!(row(&deep).1, tar::EntryType::Regular);

        // Uncompressed digest = diff_id, compressed digest = digest.
        let gz = fs::read(&blob.path).unwrap();
        assert_eq!(Digest::of(&gz), blob.digest);
        assert_eq!(u64::try_from(gz.len()).unwrap(), blob.size);
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(Digest::of(&tar), blob.diff_id);
    }

    #[test]
    fn same_tree_built_twice_gives_the_same_digest() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        sample_tree(&a);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        sample_tree(&b);
        let la = write_layer(&a, &dir.path().join("a.tar.gz"), &opts()).unwrap();
        let lb = write_layer(&b, &dir.path().join("b.tar.gz"), &opts()).unwrap();
        assert_eq!((&la.digest, &la.diff_id), (&lb.digest, &lb.diff_id));
        // The clamp decides the times: a later clamp changes the digest.
        let later = LayerOptions {
            mtime_clamp: u64::MAX >> 1,
            ..opts()
        };
        let lc = write_layer(&a, &dir.path().join("c.tar.gz"), &later).unwrap();
        assert_ne!(lc.diff_id, lb.diff_id);
    }

    #[test]
    fn owners_are_kept_or_mapped_to_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("f"), "x").unwrap();
        let meta = fs::metadata(root.join("f")).unwrap();
        let kept = write_layer(&root, &dir.path().join("k.tar.gz"), &LayerOptions::default()).unwrap();
        let row = &entries(&kept.path)[0];
        assert_eq!((row.3, row.4), (u64::from(meta.uid()), u64::from(meta.gid())));
        let mapped = LayerOptions {
            map_to_root: Some((meta.uid(), meta.gid())),
            ..LayerOptions::default()
        };
        let mapped = write_layer(&root, &dir.path().join("m.tar.gz"), &mapped).unwrap();
        let row = &entries(&mapped.path)[0];
        assert_eq!((row.3, row.4), (0, 0));
    }

    #[test]
    fn device_nodes_fifos_and_foreign_owners_survive_when_root() {
        if !nix_is_root() {
            eprintln!("skipped: creating device nodes and foreign owners needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("dev")).unwrap();
        for (name, kind, dev) in [("null", "c", "1 3"), ("loop9", "b", "7 9"), ("fifo", "p", "")] {
            let status = std::process::Command::new("mknod")
                .arg(root.join("dev").join(name))
                .arg(kind)
                .args(dev.split_whitespace())
                .status()
                .unwrap();
            assert!(status.success());
        }
        fs::write(root.join("owned"), "x").unwrap();
        std::os::unix::fs::chown(root.join("owned"), Some(1234), Some(5678)).unwrap();
        let blob = write_layer(&root, &dir.path().join("l.tar.gz"), &LayerOptions::default()).unwrap();
        let rows = entries(&blob.path);
        let row = |p: &str| rows.iter().find(|r| r.0 == p).unwrap().clone();
        assert_eq!(
            (row("dev/null").1, row("dev/null").7),
            (tar::EntryType::Char, Some((1, 3)))
        );
        assert_eq!(row("dev/loop9").7, Some((7, 9)));
        assert_eq!(row("dev/fifo").1, tar::EntryType::Fifo);
        assert_eq!((row("owned").3, row("owned").4), (1234, 5678));
    }

    #[test]
    fn missing_root_and_existing_output_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("l.tar.gz");
        assert!(write_layer(&dir.path().join("nope"), &out, &LayerOptions::default()).is_err());
        fs::write(&out, "taken").unwrap();
        assert!(write_layer(dir.path(), &out, &LayerOptions::default()).is_err());
        assert_eq!(fs::read(&out).unwrap(), b"taken");
    }

    #[test]
    fn device_numbers_decode_like_glibc() {
        assert_eq!(dev_numbers(0x0103), (1, 3));
        // major 4100 and minor 300 need the bits above the classic 8+8.
        let (major, minor) = (4100u64, 300u64);
        let rdev =
            ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12);
        assert_eq!(dev_numbers(rdev), (4100, 300));
    }

    fn nix_is_root() -> bool {
        fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
    }
}
