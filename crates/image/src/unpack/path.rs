//! Layer entry paths: the raw bytes a tar header (or its PAX/GNU extension) names, turned into a
//! relative path of plain components, or refused.
//!
//! Pure: no I/O. `.` and empty components are dropped and a leading `/` is ignored (layer paths are
//! relative to the image root whatever their spelling); a `..` component is refused outright, since no
//! layer builder writes one and any use of it is an attempt to climb. Symlinks are not this module's
//! business: the tree code resolves parents inside the root with `openat2(RESOLVE_IN_ROOT)`.

use std::ffi::CString;
use std::io;

/// Longest single path component Linux accepts (`NAME_MAX`).
pub(crate) const NAME_MAX: usize = 255;

/// Why a raw path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PathProblem {
    /// A NUL byte inside the path.
    Nul,
    /// A `..` component.
    DotDot,
    /// Longer than the configured maximum once normalised.
    TooLong { len: usize },
    /// One component longer than [`NAME_MAX`].
    NameTooLong { len: usize },
    /// More components than the configured maximum.
    TooDeep { depth: usize },
}

/// A normalised relative path: components joined by `/`, none of them empty, `.` or `..`. The empty
/// path is the root itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryPath {
    joined: Vec<u8>,
    /// End offset (exclusive) of each component in `joined`.
    ends: Vec<usize>,
}

impl EntryPath {
    /// Normalises `raw` (see the module doc), enforcing `max_len` bytes and `max_depth` components.
    pub(crate) fn parse(raw: &[u8], max_len: usize, max_depth: usize) -> Result<Self, PathProblem> {
        if raw.contains(&0) {
            return Err(PathProblem::Nul);
        }
        let mut joined = Vec::with_capacity(raw.len());
        let mut ends = Vec::new();
        for component in raw.split(|b| *b == b'/') {
            match component {
                b"" | b"." => continue,
                b".." => return Err(PathProblem::DotDot),
                _ => {}
            }
            if component.len() > NAME_MAX {
                return Err(PathProblem::NameTooLong { len: component.len() });
            }
            if !joined.is_empty() {
                joined.push(b'/');
            }
            joined.extend_from_slice(component);
            ends.push(joined.len());
        }
        if joined.len() > max_len {
            return Err(PathProblem::TooLong { len: joined.len() });
        }
        if ends.len() > max_depth {
            return Err(PathProblem::TooDeep { depth: ends.len() });
        }
        Ok(Self { joined, ends })
    }

    /// True for the root itself (`/`, `.`, `./`, the empty name).
    pub(crate) fn is_root(&self) -> bool {
        self.ends.is_empty()
    }

    /// The whole path, components joined by `/`.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.joined
    }

    /// Number of components.
    pub(crate) fn depth(&self) -> usize {
        self.ends.len()
    }

    /// Component `i` (0-based); empty when out of range.
    pub(crate) fn component(&self, i: usize) -> &[u8] {
        let Some(&end) = self.ends.get(i) else { return b"" };
        let start = if i == 0 {
            0
        } else {
            self.ends.get(i - 1).map_or(0, |e| e + 1)
        };
        self.joined.get(start..end).unwrap_or(b"")
    }

    /// The first `n` components joined by `/` (empty for `n == 0`).
    pub(crate) fn prefix(&self, n: usize) -> &[u8] {
        match n.checked_sub(1).and_then(|i| self.ends.get(i)) {
            Some(&end) => self.joined.get(..end).unwrap_or(b""),
            None => b"",
        }
    }

    /// The last component (empty for the root).
    pub(crate) fn name(&self) -> &[u8] {
        self.component(self.depth().saturating_sub(1))
    }

    /// The parent directory's path (empty, the root, for a top-level entry).
    pub(crate) fn parent(&self) -> &[u8] {
        self.prefix(self.depth().saturating_sub(1))
    }
}

/// `bytes` as a C string; the callers only pass bytes already checked to hold no NUL.
pub(crate) fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// A raw name made safe to print in an error or a log line: lossy UTF-8, control characters escaped,
/// cut after 200 characters.
pub(crate) fn display(raw: &[u8]) -> String {
    const MAX_CHARS: usize = 200;
    let lossy = String::from_utf8_lossy(raw);
    let mut out = String::new();
    for (i, c) in lossy.chars().enumerate() {
        if i == MAX_CHARS {
            out.push_str(&format!("… ({} bytes)", raw.len()));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<String, PathProblem> {
        EntryPath::parse(raw.as_bytes(), 4096, 64).map(|p| String::from_utf8(p.as_bytes().to_vec()).unwrap())
    }

    #[test]
    fn plain_and_oddly_spelled_paths_normalise() {
        assert_eq!(parse("usr/bin/env").unwrap(), "usr/bin/env");
        assert_eq!(parse("./usr/bin/").unwrap(), "usr/bin");
        assert_eq!(parse("usr//bin/./env").unwrap(), "usr/bin/env");
        assert_eq!(parse(".wh.foo").unwrap(), ".wh.foo");
        assert_eq!(parse("...").unwrap(), "...");
        assert_eq!(parse("a/..b/c..").unwrap(), "a/..b/c..");
    }

    #[test]
    fn absolute_paths_become_relative_to_the_root() {
        assert_eq!(parse("/etc/passwd").unwrap(), "etc/passwd");
        assert_eq!(parse("//etc//passwd").unwrap(), "etc/passwd");
    }

    #[test]
    fn root_spellings_are_the_root() {
        for raw in ["", ".", "./", "/", "//", "./././"] {
            let p = EntryPath::parse(raw.as_bytes(), 10, 10).unwrap();
            assert!(p.is_root(), "{raw:?}");
            assert_eq!(p.name(), b"");
            assert_eq!(p.parent(), b"");
        }
    }

    #[test]
    fn dotdot_is_refused_anywhere() {
        for raw in [
            "..",
            "../etc/passwd",
            "a/../../b",
            "a/b/..",
            "/..",
            "a/../b",
            "./../x",
        ] {
            assert_eq!(parse(raw), Err(PathProblem::DotDot), "{raw:?}");
        }
    }

    #[test]
    fn nul_is_refused() {
        assert_eq!(EntryPath::parse(b"a\0/b", 100, 10), Err(PathProblem::Nul));
    }

    #[test]
    fn limits_are_enforced_after_normalisation() {
        assert_eq!(
            EntryPath::parse(b"abc/def", 6, 10),
            Err(PathProblem::TooLong { len: 7 })
        );
        assert!(EntryPath::parse(b"./././abc/./def", 7, 10).is_ok());
        assert_eq!(
            EntryPath::parse(b"a/b/c", 100, 2),
            Err(PathProblem::TooDeep { depth: 3 })
        );
        let long = vec![b'x'; NAME_MAX + 1];
        assert_eq!(
            EntryPath::parse(&long, 10_000, 10),
            Err(PathProblem::NameTooLong { len: NAME_MAX + 1 })
        );
        assert!(EntryPath::parse(&long[..NAME_MAX], 10_000, 10).is_ok());
    }

    #[test]
    fn components_prefixes_parent_and_name() {
        let p = EntryPath::parse(b"/usr/lib/x86_64/libc.so", 100, 10).unwrap();
        assert_eq!(p.depth(), 4);
        assert_eq!(p.component(0), b"usr");
        assert_eq!(p.component(3), b"libc.so");
        assert_eq!(p.component(4), b"");
        assert_eq!(p.prefix(0), b"");
        assert_eq!(p.prefix(2), b"usr/lib");
        assert_eq!(p.parent(), b"usr/lib/x86_64");
        assert_eq!(p.name(), b"libc.so");
        let top = EntryPath::parse(b"etc", 100, 10).unwrap();
        assert_eq!(top.parent(), b"");
        assert_eq!(top.name(), b"etc");
    }

    #[test]
    fn display_escapes_control_characters_and_truncates() {
        assert_eq!(display(b"../../etc/passwd"), "../../etc/passwd");
        assert_eq!(display(b"a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
        let long = display(&[b'a'; 500]);
        assert!(long.starts_with(&"a".repeat(200)));
        assert!(long.ends_with("(500 bytes)"));
    }
}
