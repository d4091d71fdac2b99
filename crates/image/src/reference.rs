//! Image references: `[REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]`, parsed and validated.
//!
//! The grammar is the one of the CNCF distribution project (what `docker`, `skopeo` and every
//! registry accept): a first path component is a registry host when it contains a `.` or a `:` or
//! is `localhost`; repository components are lowercase alphanumerics joined by `.`, `_`, `__` or
//! dashes; a tag is up to 128 word characters, dots and dashes; a digest is `sha256:` and 64 hex.
//!
//! Without a registry, [`Reference::parse`] applies Docker Hub's defaults (`docker.io`, and
//! `library/` for single-component names) so that names mean what they mean everywhere else;
//! [`Reference::parse_with_default_registry`] resolves them against another registry instead (the
//! platform's own, in aloft's embedded mode) and adds no `library/` prefix there. Without a tag
//! or digest the tag is `latest`. With both a tag and a digest, the digest decides what is
//! fetched and the tag is kept only for display.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

/// Docker Hub's canonical registry name in references.
pub const DOCKER_HUB: &str = "docker.io";
/// The host Docker Hub's registry API is served from.
const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// Longest repository name the distribution spec allows.
const MAX_NAME_LEN: usize = 255;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Empty input.
    #[error("empty image reference")]
    Empty,
    /// The registry part is not `HOST[:PORT]`.
    #[error("invalid registry {registry:?} in image reference {input:?}")]
    Registry { input: String, registry: String },
    /// The repository part breaks the grammar.
    #[error(
        "invalid repository {repository:?} in image reference {input:?}: components are \
         lowercase letters and digits separated by '.', '_', '__' or '-', joined by '/'"
    )]
    Repository { input: String, repository: String },
    /// The repository is longer than 255 characters.
    #[error("repository name in {input:?} is longer than 255 characters")]
    TooLong { input: String },
    /// The tag breaks the grammar.
    #[error(
        "invalid tag {tag:?} in image reference {input:?}: up to 128 letters, digits, '_', '.' \
         and '-', not starting with '.' or '-'"
    )]
    Tag { input: String, tag: String },
    /// The digest is not `sha256:<64 hex>`.
    #[error("invalid digest in image reference {input:?}: expected sha256:<64 lowercase hex>")]
    Digest { input: String },
}

impl Reference {
    /// Parses a reference, applying Docker Hub's defaults to names without a registry.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        Self::parse_inner(input, None)
    }

    /// Parses a reference; names without a registry resolve against `default_registry`
    /// (`HOST[:PORT]`), with Docker Hub's `library/` prefix only when that registry is Docker Hub.
    pub fn parse_with_default_registry(input: &str, default_registry: &str) -> Result<Self, ReferenceError> {
        if !valid_registry(default_registry) {
            return Err(ReferenceError::Registry {
                input: input.to_owned(),
                registry: default_registry.to_owned(),
            });
        }
        Self::parse_inner(input, Some(default_registry))
    }

    /// A reference from its parts, validated like a parsed one. `tag` defaults to `latest` when
    /// `digest` is `None` too.
    pub fn new(
        registry: &str,
        repository: &str,
        tag: Option<&str>,
        digest: Option<Digest>,
    ) -> Result<Self, ReferenceError> {
        let input = format!("{registry}/{repository}");
        if !valid_registry(registry) {
            return Err(ReferenceError::Registry {
                input,
                registry: registry.to_owned(),
            });
        }
        check_repository(&input, repository)?;
        if let Some(tag) = tag
            && !valid_tag(tag)
        {
            return Err(ReferenceError::Tag {
                input,
                tag: tag.to_owned(),
            });
        }
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_owned()),
            (tag, _) => tag.map(str::to_owned),
        };
        Ok(Self {
            registry: canonical_registry(registry),
            repository: repository.to_owned(),
            tag,
            digest,
        })
    }

    fn parse_inner(input: &str, default_registry: Option<&str>) -> Result<Self, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (name_and_tag, digest) = match input.split_once('@') {
            Some((rest, digest)) => {
                let digest = digest.parse::<Digest>().map_err(|_| ReferenceError::Digest {
                    input: input.to_owned(),
                })?;
                (rest, Some(digest))
            }
            None => (input, None),
        };
        // A tag is after the last ':' that follows the last '/' (a ':' before it is a port).
        let last_slash = name_and_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_and_tag[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&name_and_tag[..at], Some(&name_and_tag[at + 1..]))
            }
            None => (name_and_tag, None),
        };
        if let Some(tag) = tag
            && !valid_tag(tag)
        {
            return Err(ReferenceError::Tag {
                input: input.to_owned(),
                tag: tag.to_owned(),
            });
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.bytes().any(|b| b.is_ascii_uppercase()) =>
            {
                if !valid_registry(first) {
                    return Err(ReferenceError::Registry {
                        input: input.to_owned(),
                        registry: first.to_owned(),
                    });
                }
                (canonical_registry(first), rest.to_owned())
            }
            _ => {
                let registry = default_registry.map_or(DOCKER_HUB.to_owned(), canonical_registry);
                let repository = if registry == DOCKER_HUB && !name.contains('/') {
                    format!("library/{name}")
                } else {
                    name.to_owned()
                };
                (registry, repository)
            }
        };
        check_repository(input, &repository)?;
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_owned()),
            (tag, _) => tag.map(str::to_owned),
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The registry as written in references (`HOST[:PORT]`; Docker Hub is `docker.io`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host (and port) the registry's HTTP API is served from.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The repository path, e.g. `library/debian`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if the reference has one (`latest` when neither a tag nor a digest was given).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What goes after `/manifests/` in the registry API: the digest when pinned, else the tag.
    pub fn api_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => "latest".to_owned(),
        }
    }

    /// The same repository pinned to `digest` (tag dropped).
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest),
        }
    }

    /// The same repository with `tag` (digest dropped). `tag` must be valid.
    pub fn with_tag(&self, tag: &str) -> Result<Self, ReferenceError> {
        if !valid_tag(tag) {
            return Err(ReferenceError::Tag {
                input: self.to_string(),
                tag: tag.to_owned(),
            });
        }
        Ok(Self {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: Some(tag.to_owned()),
            digest: None,
        })
    }

    /// `REPOSITORY:TAG` or `REPOSITORY@DIGEST`: the image's name within its registry, as error
    /// messages show it.
    pub fn name_in_registry(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => format!("{}@{digest}", self.repository),
            (None, Some(tag)) => format!("{}:{tag}", self.repository),
            (None, None) => self.repository.clone(),
        }
    }

    /// Whether the registry is on this host's loopback (`localhost`, 127.0.0.0/8, `[::1]`):
    /// such registries are spoken to over plain HTTP.
    pub fn is_loopback(&self) -> bool {
        is_loopback_registry(&self.registry)
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Whether `registry` (`HOST[:PORT]`) names this host's loopback.
pub(crate) fn is_loopback_registry(registry: &str) -> bool {
    let host = split_host_port(registry).0;
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn canonical_registry(registry: &str) -> String {
    let lower = registry.to_ascii_lowercase();
    if lower == "index.docker.io" || lower == "registry-1.docker.io" {
        DOCKER_HUB.to_owned()
    } else {
        lower
    }
}

/// Splits `HOST[:PORT]` (HOST may be `[v6]`) into host and optional port text.
fn split_host_port(registry: &str) -> (&str, Option<&str>) {
    if registry.starts_with('[') {
        match registry.find(']') {
            Some(end) => {
                let (host, rest) = registry.split_at(end + 1);
                (host, rest.strip_prefix(':'))
            }
            None => (registry, None),
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        }
    }
}

fn valid_registry(registry: &str) -> bool {
    let (host, port) = split_host_port(registry);
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || port.parse::<u16>().is_err())
    {
        return false;
    }
    if let Some(v6) = host.strip_prefix('[') {
        return v6
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
                && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        })
}

fn check_repository(input: &str, repository: &str) -> Result<(), ReferenceError> {
    if repository.len() > MAX_NAME_LEN {
        return Err(ReferenceError::TooLong {
            input: input.to_owned(),
        });
    }
    if repository.split('/').all(valid_path_component) {
        Ok(())
    } else {
        Err(ReferenceError::Repository {
            input: input.to_owned(),
            repository: repository.to_owned(),
        })
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__', or one or more '-'.
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
fn valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    bytes.first().is_some_and(|&b| word(b))
        && bytes.len() <= 128
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(r: &Reference) -> (String, String, Option<String>, Option<String>) {
        (
            r.registry().to_owned(),
            r.repository().to_owned(),
            r.tag().map(str::to_owned),
            r.digest().map(ToString::to_string),
        )
    }

    fn p(s: &str) -> (String, String, Option<String>, Option<String>) {
        parts(&Reference::parse(s).unwrap())
    }

    fn o(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn docker_hub_defaults() {
        assert_eq!(
            p("debian"),
            ("docker.io".into(), "library/debian".into(), o("latest"), None)
        );
        assert_eq!(
            p("debian:bookworm"),
            ("docker.io".into(), "library/debian".into(), o("bookworm"), None)
        );
        assert_eq!(
            p("grafana/loki:2.9"),
            ("docker.io".into(), "grafana/loki".into(), o("2.9"), None)
        );
        assert_eq!(
            p("index.docker.io/library/busybox"),
            ("docker.io".into(), "library/busybox".into(), o("latest"), None)
        );
        assert_eq!(
            Reference::parse("debian").unwrap().api_host(),
            "registry-1.docker.io"
        );
    }

    #[test]
    fn explicit_registries_ports_and_digests() {
        assert_eq!(
            p("127.0.0.1:5000/apps/web:v1"),
            ("127.0.0.1:5000".into(), "apps/web".into(), o("v1"), None)
        );
        assert_eq!(
            p("localhost/web"),
            ("localhost".into(), "web".into(), o("latest"), None)
        );
        assert_eq!(
            p("localhost:5000/web"),
            ("localhost:5000".into(), "web".into(), o("latest"), None)
        );
        assert_eq!(
            p(&format!("[::1]:5000/a/b@sha256:{HEX}")),
            (
                "[::1]:5000".into(),
                "a/b".into(),
                None,
                o(&format!("sha256:{HEX}"))
            )
        );
        assert_eq!(
            p(&format!("ghcr.io/o/r:t@sha256:{HEX}")),
            (
                "ghcr.io".into(),
                "o/r".into(),
                o("t"),
                o(&format!("sha256:{HEX}"))
            )
        );
        let r = Reference::parse(&format!("ghcr.io/o/r:t@sha256:{HEX}")).unwrap();
        assert_eq!(r.api_reference(), format!("sha256:{HEX}"));
        assert_eq!(r.to_string(), format!("ghcr.io/o/r:t@sha256:{HEX}"));
        assert!(Reference::parse("127.0.0.1:5000/x").unwrap().is_loopback());
        assert!(Reference::parse("[::1]:5000/x").unwrap().is_loopback());
        assert!(Reference::parse("localhost:1/x").unwrap().is_loopback());
        assert!(!Reference::parse("registry.example:5000/x").unwrap().is_loopback());
    }

    #[test]
    fn default_registry_override() {
        let r = Reference::parse_with_default_registry("busybox:1", "127.0.0.1:5000").unwrap();
        assert_eq!(
            parts(&r),
            ("127.0.0.1:5000".into(), "busybox".into(), o("1"), None)
        );
        let r = Reference::parse_with_default_registry("ghcr.io/a/b", "127.0.0.1:5000").unwrap();
        assert_eq!(r.registry(), "ghcr.io");
        assert!(Reference::parse_with_default_registry("x", "bad host").is_err());
    }

    #[test]
    fn repository_grammar() {
        for ok in ["a", "a0", "a.b", "a_b", "a__b", "a-b", "a---b", "a/b/c", "0"] {
            assert!(Reference::parse(&format!("r.io/{ok}")).is_ok(), "{ok}");
        }
        for bad in [
            "A", "a_", "_a", "a..b", "a___b", "a//b", "a/", "a/.", "a/..", "-a", "a-", "a$b", "a b", "a._b",
        ] {
            assert!(
                matches!(
                    Reference::parse(&format!("r.io/{bad}")),
                    Err(ReferenceError::Repository { .. } | ReferenceError::Tag { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            Reference::parse(&format!("r.io/{}", "a".repeat(256))),
            Err(ReferenceError::TooLong { .. })
        ));
        // An uppercase first component is neither a repository nor a valid registry host…
        assert!(Reference::parse("Foo/bar").is_ok_and(|r| r.registry() == "foo"));
    }

    #[test]
    fn tags_digests_and_registries_are_validated() {
        assert!(matches!(
            Reference::parse("r.io/a:"),
            Err(ReferenceError::Tag { .. })
        ));
        assert!(matches!(
            Reference::parse("r.io/a:-x"),
            Err(ReferenceError::Tag { .. })
        ));
        assert!(matches!(
            Reference::parse(&format!("r.io/a:{}", "x".repeat(129))),
            Err(ReferenceError::Tag { .. })
        ));
        assert!(Reference::parse(&format!("r.io/a:{}", "x".repeat(128))).is_ok());
        assert!(matches!(
            Reference::parse("r.io/a@sha256:abc"),
            Err(ReferenceError::Digest { .. })
        ));
        assert!(matches!(
            Reference::parse(&format!("r.io/a@md5:{HEX}")),
            Err(ReferenceError::Digest { .. })
        ));
        assert!(matches!(
            Reference::parse("r.io:99999/a"),
            Err(ReferenceError::Registry { .. })
        ));
        assert!(matches!(
            Reference::parse("-r.io/a"),
            Err(ReferenceError::Registry { .. })
        ));
        assert!(matches!(
            Reference::parse("[zz]:5/a"),
            Err(ReferenceError::Registry { .. })
        ));
        assert!(matches!(Reference::parse(""), Err(ReferenceError::Empty)));
        assert!(Reference::parse("a@b@c").is_err());
    }

    #[test]
    fn with_digest_and_tag() {
        let r = Reference::parse("r.io/a:t").unwrap();
        let d = Digest::of(b"x");
        let pinned = r.with_digest(d.clone());
        assert_eq!(pinned.tag(), None);
        assert_eq!(pinned.digest(), Some(&d));
        assert_eq!(pinned.name_in_registry(), format!("a@{d}"));
        assert_eq!(r.name_in_registry(), "a:t");
        assert_eq!(pinned.with_tag("u").unwrap().to_string(), "r.io/a:u");
        assert!(r.with_tag("../x").is_err());
    }

    #[test]
    fn new_validates() {
        assert!(Reference::new("r.io", "a/b", Some("t"), None).is_ok());
        assert_eq!(
            Reference::new("r.io", "a", None, None).unwrap().tag(),
            Some("latest")
        );
        assert!(Reference::new("r.io", "A", None, None).is_err());
        assert!(Reference::new("r io", "a", None, None).is_err());
        assert!(Reference::new("r.io", "a", Some("/"), None).is_err());
    }
}
