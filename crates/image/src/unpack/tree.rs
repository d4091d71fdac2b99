//! The target tree: every change an entry makes, done through descriptors that cannot leave the root.
//!
//! A parent directory is always opened with `openat2(RESOLVE_IN_ROOT)` from the root descriptor, so a
//! symlink on the way (planted by this layer or an earlier one) resolves the way it would inside the
//! guest and never above the root. The final component is then handled with an `*at` call on that
//! parent that never follows it (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, `O_EXCL`, `unlinkat`): an
//! existing symlink there is replaced, never written through.

use std::collections::HashSet;
use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use super::path::{EntryPath, cstring};
use super::sys::{self, Stat};

/// Deepest directory nesting [`remove`] walks into (each level holds one descriptor).
const MAX_REMOVE_DEPTH: usize = 1024;

/// Inodes (device, inode number) the current layer created or rewrote; whiteouts keep these.
pub(crate) type Written = HashSet<(u64, u64)>;

/// Why a parent directory could not be had.
#[derive(Debug)]
pub(crate) enum ParentError {
    /// The prefix `.0` exists but is not a directory (a file, or a symlink leading nowhere).
    NotDirectory(Vec<u8>),
    Io(io::Error),
}

/// The root being unpacked into, plus a one-entry cache of the last parent directory opened.
#[derive(Debug)]
pub(crate) struct Tree {
    root: OwnedFd,
    /// Last resolved parent: its path and an `O_PATH` descriptor. Any removal clears it, since only a
    /// removal can change what an already resolvable path resolves to.
    cache: Option<(Vec<u8>, OwnedFd)>,
}

impl Tree {
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let root = File::open(path)?;
        if !root.metadata()?.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        Ok(Self {
            root: root.into(),
            cache: None,
        })
    }

    /// The root directory itself (a readable descriptor: metadata calls work on it).
    pub(crate) fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Forgets the cached parent; called after anything was removed.
    pub(crate) fn invalidate(&mut self) {
        self.cache = None;
    }

    /// Opens directory `rel` (normalised, empty for the root) inside the root, as `O_PATH`.
    fn resolve(&self, rel: &[u8]) -> io::Result<OwnedFd> {
        let path = if rel.is_empty() {
            cstring(b".")?
        } else {
            cstring(rel)?
        };
        sys::openat2_in_root(self.root.as_fd(), &path, libc::O_PATH | libc::O_DIRECTORY)
    }

    /// Opens directory `rel` if it exists; `None` when it (or a prefix) is missing or not a directory.
    pub(crate) fn lookup_dir(&mut self, rel: &[u8]) -> io::Result<Option<OwnedFd>> {
        if let Some((path, fd)) = &self.cache
            && path == rel
        {
            return fd.try_clone().map(Some);
        }
        match self.resolve(rel) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens the parent directory of `path`, creating missing directories (mode 0755, owned by us)
    /// one component at a time, each inside the one before.
    pub(crate) fn parent_dir(&mut self, path: &EntryPath) -> Result<OwnedFd, ParentError> {
        let rel = path.parent();
        if let Some((cached, fd)) = &self.cache
            && cached == rel
        {
            return fd.try_clone().map_err(ParentError::Io);
        }
        let fd = match self.resolve(rel) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.create_parents(path)?,
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Err(self.not_dir_prefix(path)),
            Err(e) => return Err(ParentError::Io(e)),
        };
        let copy = fd.try_clone().map_err(ParentError::Io)?;
        self.cache = Some((rel.to_vec(), copy));
        Ok(fd)
    }

    /// The slow path of [`Tree::parent_dir`]: finds the longest existing prefix, then creates the rest.
    fn create_parents(&self, path: &EntryPath) -> Result<OwnedFd, ParentError> {
        let parents = path.depth().saturating_sub(1);
        let mut current = self.resolve(b"").map_err(ParentError::Io)?;
        let mut i = 0;
        while i < parents {
            match self.resolve(path.prefix(i + 1)) {
                Ok(fd) => current = fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                    return Err(ParentError::NotDirectory(path.prefix(i + 1).to_vec()));
                }
                Err(e) => return Err(ParentError::Io(e)),
            }
            i += 1;
        }
        // Everything from component `i` on is missing: each new directory is empty, so the rest are
        // created inside it by name, with no lookup that could be redirected.
        while i < parents {
            let name = cstring(path.component(i)).map_err(ParentError::Io)?;
            match sys::mkdirat(current.as_fd(), &name, 0o755) {
                Ok(()) => {}
                // The name exists yet did not resolve: a symlink whose target is missing.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    return Err(ParentError::NotDirectory(path.prefix(i + 1).to_vec()));
                }
                Err(e) => return Err(ParentError::Io(e)),
            }
            let dir = sys::openat(
                current.as_fd(),
                &name,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(ParentError::Io)?;
            // mkdir's mode went through the umask; implicit directories are 0755 like Docker's.
            File::from(dir.try_clone().map_err(ParentError::Io)?)
                .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .map_err(ParentError::Io)?;
            current = dir;
            i += 1;
        }
        Ok(current)
    }

    /// Names the first prefix of `path`'s parent that is not a directory (for the error message).
    fn not_dir_prefix(&self, path: &EntryPath) -> ParentError {
        let parents = path.depth().saturating_sub(1);
        for i in 1..=parents {
            if let Err(e) = self.resolve(path.prefix(i))
                && e.raw_os_error() == Some(libc::ENOTDIR)
            {
                return ParentError::NotDirectory(path.prefix(i).to_vec());
            }
        }
        ParentError::NotDirectory(path.parent().to_vec())
    }
}

/// What [`prepare`] found at the entry's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Existing {
    /// Nothing there (any previous occupant has been removed).
    Nothing,
    /// A directory, kept because the entry is a directory too.
    Directory,
}

/// Makes room for a new entry `name` in `dir`: a directory stays when the entry is a directory,
/// anything else there is removed (a directory with everything below it; a symlink itself, never
/// what it points to). Returns whether something was removed as the second value.
pub(crate) fn prepare(dir: BorrowedFd<'_>, name: &CStr, entry_is_dir: bool) -> io::Result<(Existing, bool)> {
    match sys::lstat_at(dir, name) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok((Existing::Nothing, false)),
        Err(e) => Err(e),
        Ok(st) if st.is_dir() && entry_is_dir => Ok((Existing::Directory, false)),
        Ok(_) => {
            remove(dir, name, None, 0)?;
            Ok((Existing::Nothing, true))
        }
    }
}

/// Removes `name` from `dir` and, for a directory, everything below it, never following a symlink.
/// With `keep`, inodes in that set survive, and so does every directory on the way to one of them:
/// that is how a whiteout deletes lower layers' files but not the current layer's. Returns whether
/// anything was kept.
pub(crate) fn remove(
    dir: BorrowedFd<'_>,
    name: &CStr,
    keep: Option<&Written>,
    depth: usize,
) -> io::Result<bool> {
    let st = match sys::lstat_at(dir, name) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
        Err(e) => return Err(e),
    };
    let written = keep.is_some_and(|set| set.contains(&(st.dev, st.ino)));
    if !st.is_dir() {
        if written {
            return Ok(true);
        }
        sys::unlinkat(dir, name, false)?;
        return Ok(false);
    }
    if depth >= MAX_REMOVE_DEPTH {
        return Err(io::Error::other(format!(
            "directories nested deeper than {MAX_REMOVE_DEPTH} levels"
        )));
    }
    let child_dir = sys::openat(dir, name, libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)?;
    let kept_below = clear(child_dir.as_fd(), keep, depth + 1)?;
    if written || kept_below {
        return Ok(true);
    }
    sys::unlinkat(dir, name, true)?;
    Ok(false)
}

/// Removes everything in directory `dir` (see [`remove`] for `keep`); returns whether anything was kept.
pub(crate) fn clear(dir: BorrowedFd<'_>, keep: Option<&Written>, depth: usize) -> io::Result<bool> {
    let mut kept = false;
    for child in sys::read_dir_names(dir)? {
        kept |= remove(dir, &child, keep, depth)?;
    }
    Ok(kept)
}

/// The identity of `name` in `dir` (not followed), to record in [`Written`].
pub(crate) fn identity_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<(u64, u64)> {
    let st: Stat = sys::lstat_at(dir, name)?;
    Ok((st.dev, st.ino))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn remove_keeps_written_inodes_and_their_ancestors() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("d");
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/old"), b"").unwrap();
        std::fs::write(d.join("a/b/new"), b"").unwrap();
        std::fs::write(d.join("a/lower"), b"").unwrap();
        std::fs::create_dir_all(d.join("gone/x")).unwrap();
        symlink("/", d.join("a/link")).unwrap();
        let dir = File::open(&d).unwrap();
        let bdir = File::open(d.join("a/b")).unwrap();
        let mut keep = Written::new();
        keep.insert(identity_at(bdir.as_fd(), c"new").unwrap());

        assert!(clear(dir.as_fd(), Some(&keep), 0).unwrap());
        let mut left: Vec<_> = walk(&d);
        left.sort();
        assert_eq!(left, ["a", "a/b", "a/b/new"]);
    }

    #[test]
    fn remove_without_keep_deletes_the_tree_but_not_symlink_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("precious"), b"x").unwrap();
        let d = tmp.path().join("d");
        std::fs::create_dir_all(d.join("t/sub")).unwrap();
        symlink(&outside, d.join("t/sub/out")).unwrap();
        symlink(&outside, d.join("t/out")).unwrap();
        let dir = File::open(&d).unwrap();
        assert!(!remove(dir.as_fd(), c"t", None, 0).unwrap());
        assert!(walk(&d).is_empty());
        assert_eq!(std::fs::read(outside.join("precious")).unwrap(), b"x");
    }

    #[test]
    fn prepare_keeps_a_directory_for_a_directory_and_replaces_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("dir")).unwrap();
        std::fs::write(tmp.path().join("dir/f"), b"").unwrap();
        symlink(tmp.path().join("dir"), tmp.path().join("link")).unwrap();
        let dir = File::open(tmp.path()).unwrap();
        assert_eq!(
            prepare(dir.as_fd(), c"dir", true).unwrap(),
            (Existing::Directory, false)
        );
        assert_eq!(
            prepare(dir.as_fd(), c"link", true).unwrap(),
            (Existing::Nothing, true)
        );
        assert!(
            tmp.path().join("dir/f").exists(),
            "a symlink's target must not be removed"
        );
        assert_eq!(
            prepare(dir.as_fd(), c"dir", false).unwrap(),
            (Existing::Nothing, true)
        );
        assert_eq!(
            prepare(dir.as_fd(), c"missing", false).unwrap(),
            (Existing::Nothing, false)
        );
        assert!(walk(tmp.path()).is_empty());
    }

    fn walk(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            out.push(name.clone());
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()).into_iter().map(|c| format!("{name}/{c}")));
            }
        }
        out
    }
}
