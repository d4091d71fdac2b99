//! Making a read-only filesystem image from a staged tree: `mkfs.ext4 -d` or `mkfs.erofs`.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use super::RootfsError;
use crate::digest::Digest;

/// The filesystem a base root is built as. See `docs/adr/0004-rootfs-format.md` for the numbers
/// behind the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum RootfsFormat {
    /// ext4 without a journal (`mkfs.ext4 -d`), sized from the tree.
    Ext4,
    /// erofs, uncompressed (`mkfs.erofs`).
    #[default]
    Erofs,
    /// erofs with lz4-compressed extents (`mkfs.erofs -zlz4`): smaller, costs guest CPU to read.
    ErofsLz4,
}

impl RootfsFormat {
    /// Every format.
    pub const ALL: [Self; 3] = [Self::Ext4, Self::Erofs, Self::ErofsLz4];

    /// The `fstype` the guest mounts it as (`RootConfig::fstype`).
    pub fn fstype(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Erofs | Self::ErofsLz4 => "erofs",
        }
    }

    /// The file name extension of bases in this format.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Erofs => "erofs",
            Self::ErofsLz4 => "lz4.erofs",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Self::Ext4 => "mkfs.ext4",
            Self::Erofs | Self::ErofsLz4 => "mkfs.erofs",
        }
    }
}

impl std::str::FromStr for RootfsFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ext4" => Ok(Self::Ext4),
            "erofs" => Ok(Self::Erofs),
            "erofs-lz4" => Ok(Self::ErofsLz4),
            other => Err(format!(
                "unknown root filesystem format {other}: use ext4, erofs or erofs-lz4"
            )),
        }
    }
}

/// What a staged tree needs from a filesystem.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TreeSize {
    /// Inodes (distinct; hardlinks count once).
    pub(crate) inodes: u64,
    /// 4 KiB blocks for file data, directories and long symlinks.
    pub(crate) blocks: u64,
}

/// Walks `root` without following symlinks.
pub(crate) fn measure(root: &Path) -> io::Result<TreeSize> {
    let mut size = TreeSize::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        size.inodes += 1;
        size.blocks += 1;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?; // lstat: DirEntry::metadata does not follow
            if meta.is_dir() {
                stack.push(entry.path());
                continue;
            }
            if meta.nlink() > 1 && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            size.inodes += 1;
            if meta.is_file() || (meta.file_type().is_symlink() && meta.len() >= 60) {
                size.blocks += meta.len().div_ceil(4096);
            }
        }
    }
    Ok(size)
}

/// The ext4 image size (bytes) and inode count for a tree: data, inode tables (256 B per inode),
/// plus 10% and 8 MiB for metadata (group descriptors, bitmaps, extent blocks, directory growth).
pub(crate) fn ext4_geometry(tree: TreeSize) -> (u64, u64) {
    let inodes = tree.inodes + tree.inodes / 10 + 256;
    let bytes = tree.blocks * 4096 + inodes * 256;
    let bytes = bytes + bytes / 10 + (8 << 20);
    (bytes.next_multiple_of(1 << 20), inodes)
}

/// Makes `out` from `root` as `format`; returns the number of inodes in the tree.
pub(crate) fn make(
    format: RootfsFormat,
    image: &Digest,
    root: &Path,
    out: &Path,
) -> Result<u64, RootfsError> {
    let fail = |detail: String| RootfsError::Mkfs {
        image: image.clone(),
        fstype: format.fstype(),
        program: format.program(),
        detail,
    };
    let tree = measure(root).map_err(|e| fail(format!("measure the staged tree: {e}")))?;
    match format {
        RootfsFormat::Ext4 => {
            let (mut bytes, inodes) = ext4_geometry(tree);
            // The estimate is generous; should it still be short, try once with twice the room.
            let mut attempt = 0;
            loop {
                let mut cmd = Command::new("mkfs.ext4");
                cmd.args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-I", "256"])
                    .args(["-N", &inodes.to_string()])
                    // Read-only base: no journal, no room to grow, no reserved blocks.
                    .args(["-O", "^has_journal,^resize_inode"])
                    .args(["-E", "root_owner=0:0,nodiscard", "-L", "aloft-base", "-d"])
                    .arg(root)
                    .arg(out)
                    .arg(format!("{}k", bytes / 1024));
                match run(&mut cmd) {
                    Ok(()) => return Ok(tree.inodes),
                    Err(_) if attempt == 0 => {
                        attempt += 1;
                        bytes *= 2;
                        // mkfs.ext4 refuses to overwrite nothing, but a half-written file is
                        // simply truncated by -F; remove it for a clean retry.
                        let _ = fs::remove_file(out);
                    }
                    Err(e) => return Err(fail(e)),
                }
            }
        }
        RootfsFormat::Erofs | RootfsFormat::ErofsLz4 => {
            let mut cmd = Command::new("mkfs.erofs");
            cmd.arg("--quiet");
            if format == RootfsFormat::ErofsLz4 {
                cmd.arg("-zlz4");
            }
            cmd.arg(out).arg(root);
            run(&mut cmd).map_err(fail)?;
            Ok(tree.inodes)
        }
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            format!("{program} is not installed (install e2fsprogs and erofs-utils, see scripts/setup.sh)")
        } else {
            format!("run {program}: {e}")
        }
    })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    let mut detail = format!("{program} failed ({})", out.status);
    if !stderr.is_empty() {
        detail.push_str(": ");
        detail.extend(stderr.chars().take(2000));
    }
    Err(detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_leaves_room() {
        let (bytes, inodes) = ext4_geometry(TreeSize {
            inodes: 10_000,
            blocks: 20_000,
        });
        assert!(inodes > 10_000);
        assert!(bytes > 20_000 * 4096 + 10_000 * 256);
        assert_eq!(bytes % (1 << 20), 0);
    }

    #[test]
    fn measure_counts_hardlinks_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), vec![1u8; 5000]).unwrap();
        fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("l")).unwrap();
        let size = measure(dir.path()).unwrap();
        // root, d, a (once), l
        assert_eq!(size.inodes, 4);
        // root + d + 2 blocks of a
        assert_eq!(size.blocks, 4);
    }

    #[test]
    fn mkfs_failure_is_reported_with_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("f"), b"x").unwrap();
        let image = Digest::of(b"image");
        for format in RootfsFormat::ALL {
            // The output's directory does not exist: every mkfs fails.
            let out = dir.path().join("missing").join("base.img");
            let err = make(format, &image, &root, &out).unwrap_err();
            let RootfsError::Mkfs { program, detail, .. } = &err else {
                panic!("{err:?}");
            };
            assert_eq!(*program, format.program());
            assert!(detail.contains("failed"), "{detail}");
            assert!(!out.exists());
        }
    }

    #[test]
    fn formats_parse() {
        assert_eq!("erofs-lz4".parse::<RootfsFormat>(), Ok(RootfsFormat::ErofsLz4));
        assert!("xfs".parse::<RootfsFormat>().is_err());
    }
}
