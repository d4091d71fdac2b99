//! Manifests, indexes and image configs as registries serve them (OCI image spec and Docker
//! schema 2), parsed defensively, plus the linux/amd64 choice in an index.
//!
//! Pure: no I/O. Unknown JSON fields are ignored (registries add their own); missing required ones,
//! negative sizes, bad digests and unsupported media types are errors, never panics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 image manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// OCI layer, uncompressed tar.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI layer, gzip-compressed tar.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI layer, zstd-compressed tar.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker layer, gzip-compressed tar.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// The manifest media types a pull asks for, in order of preference.
pub const ACCEPTED_MANIFESTS: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST];

/// How a layer blob is compressed (what the unpacker must decode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The compression of a layer media type, or `None` when aloft cannot unpack that type.
    pub fn of_layer(media_type: &str) -> Option<Self> {
        match media_type {
            OCI_LAYER_TAR
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Self::None),
            OCI_LAYER_GZIP
            | DOCKER_LAYER_GZIP
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Self::Gzip),
            OCI_LAYER_ZSTD | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Self::Zstd)
            }
            _ => None,
        }
    }
}

/// Why a manifest or config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON of the expected shape.
    #[error("invalid {what}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A media type aloft does not handle (schema 1, artifacts, foreign configs, …).
    #[error("unsupported media type {media_type} for {what}")]
    UnsupportedMediaType { media_type: String, what: String },
    /// Valid JSON, but not a usable manifest.
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

/// A content descriptor: what a manifest says about a blob it refers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// The blob's media type.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size in bytes.
    pub size: u64,
    /// In an index: the platform of the manifest this entry points to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An index entry's platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture (`amd64`, `arm64`, …).
    pub architecture: String,
    /// Operating system (`linux`, …).
    pub os: String,
    /// CPU variant (`v8`, `v3`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest (OCI or Docker schema 2): one config and ordered layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The manifest's media type (required by Docker, optional in OCI).
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The image config blob.
    pub config: Descriptor,
    /// Layer blobs, base first.
    pub layers: Vec<Descriptor>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An image index (OCI) or manifest list (Docker): one manifest per platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIndex {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The index's media type.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The per-platform manifests.
    pub manifests: Vec<Descriptor>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// A parsed manifest of either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    /// A single-platform image.
    Image(ImageManifest),
    /// An index over several platforms.
    Index(ImageIndex),
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u64>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<serde::de::IgnoredAny>,
    config: Option<serde::de::IgnoredAny>,
}

/// Parses a manifest body. `content_type` is the registry's `Content-Type` header, used when the
/// JSON has no `mediaType` (allowed for OCI). Returns the manifest and its media type.
pub fn parse_manifest(body: &[u8], content_type: Option<&str>) -> Result<(Manifest, String), ManifestError> {
    let probe: Probe = serde_json::from_slice(body).map_err(|source| ManifestError::Json {
        what: "manifest",
        source,
    })?;
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or_default().trim().to_owned())
        .filter(|c| !c.is_empty());
    let media_type = match (probe.media_type, header) {
        (Some(m), _) => m,
        (None, Some(h)) if ACCEPTED_MANIFESTS.contains(&h.as_str()) => h,
        // OCI allows omitting mediaType; tell the two kinds apart by shape.
        (None, _) if probe.manifests.is_some() => OCI_INDEX.to_owned(),
        (None, _) if probe.config.is_some() => OCI_MANIFEST.to_owned(),
        (None, Some(h)) => h,
        (None, None) => "(none)".to_owned(),
    };
    if probe.schema_version != Some(2) || !ACCEPTED_MANIFESTS.contains(&media_type.as_str()) {
        let media_type = if probe.schema_version == Some(1) && !media_type.contains("v1") {
            "application/vnd.docker.distribution.manifest.v1+json".to_owned()
        } else {
            media_type
        };
        return Err(ManifestError::UnsupportedMediaType {
            media_type,
            what: "manifest".to_owned(),
        });
    }
    let manifest = if media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST {
        let index: ImageIndex = serde_json::from_slice(body).map_err(|source| ManifestError::Json {
            what: "image index",
            source,
        })?;
        Manifest::Index(index)
    } else {
        let image: ImageManifest = serde_json::from_slice(body).map_err(|source| ManifestError::Json {
            what: "image manifest",
            source,
        })?;
        Manifest::Image(image)
    };
    Ok((manifest, media_type))
}

/// Checks that an image manifest is something aloft can run: a known config type and layer types
/// it can unpack, at most `max_layers` layers.
pub fn check_image_manifest(manifest: &ImageManifest, max_layers: usize) -> Result<(), ManifestError> {
    if manifest.config.media_type != OCI_CONFIG && manifest.config.media_type != DOCKER_CONFIG {
        return Err(ManifestError::UnsupportedMediaType {
            media_type: manifest.config.media_type.clone(),
            what: "image config".to_owned(),
        });
    }
    if manifest.layers.len() > max_layers {
        return Err(ManifestError::Invalid {
            what: "image manifest",
            reason: format!(
                "{} layers, more than the limit of {max_layers}",
                manifest.layers.len()
            ),
        });
    }
    for layer in &manifest.layers {
        if Compression::of_layer(&layer.media_type).is_none() {
            return Err(ManifestError::UnsupportedMediaType {
                media_type: layer.media_type.clone(),
                what: format!("layer {}", layer.digest),
            });
        }
    }
    Ok(())
}

/// Picks the linux/amd64 image manifest of an index: an entry without a CPU variant first, else
/// the first linux/amd64 entry. Entries that are not image manifests (nested indexes, attestations
/// with an `unknown` platform) are never chosen.
pub fn select_linux_amd64(index: &ImageIndex) -> Option<&Descriptor> {
    let candidates = index.manifests.iter().filter(|d| {
        (d.media_type == OCI_MANIFEST || d.media_type == DOCKER_MANIFEST)
            && d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    let mut first = None;
    for d in candidates {
        if d.platform.as_ref().is_some_and(|p| p.variant.is_none()) {
            return Some(d);
        }
        first = first.or(Some(d));
    }
    first
}

/// What an image asks of the process it runs, from its config blob (`config` in the OCI image
/// config; the same field names in Docker's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `architecture` (e.g. `amd64`), when the config says.
    pub architecture: Option<String>,
    /// `os` (e.g. `linux`), when the config says.
    pub os: Option<String>,
    /// `Entrypoint`; `None` when unset (distinct from an empty list).
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`; `None` when unset.
    pub cmd: Option<Vec<String>>,
    /// `Env`, `KEY=VALUE` strings in image order.
    pub env: Vec<String>,
    /// `WorkingDir`; `None` when unset or empty.
    pub working_dir: Option<String>,
    /// `User` (`name`, `uid`, `uid:gid`, …); `None` when unset or empty.
    pub user: Option<String>,
    /// `ExposedPorts` keys (`80/tcp`, `53/udp`, …), sorted.
    pub exposed_ports: Vec<String>,
    /// `StopSignal` (`SIGTERM`, `15`, …); `None` when unset.
    pub stop_signal: Option<String>,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `rootfs.diff_ids`: digests of the uncompressed layers, base first.
    pub diff_ids: Vec<Digest>,
}

#[derive(Deserialize)]
struct RawConfig {
    architecture: Option<String>,
    os: Option<String>,
    config: Option<RawRunConfig>,
    rootfs: Option<RawRootFs>,
}

#[derive(Deserialize)]
struct RawRootFs {
    #[serde(default)]
    diff_ids: Vec<Digest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawRunConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde::de::IgnoredAny>>,
    stop_signal: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

/// Parses an image config blob.
pub fn parse_config(body: &[u8]) -> Result<ImageConfig, ManifestError> {
    let raw: RawConfig = serde_json::from_slice(body).map_err(|source| ManifestError::Json {
        what: "image config",
        source,
    })?;
    let run = raw.config.unwrap_or(RawRunConfig {
        entrypoint: None,
        cmd: None,
        env: None,
        working_dir: None,
        user: None,
        exposed_ports: None,
        stop_signal: None,
        labels: None,
    });
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    Ok(ImageConfig {
        architecture: non_empty(raw.architecture),
        os: non_empty(raw.os),
        entrypoint: run.entrypoint,
        cmd: run.cmd,
        env: run.env.unwrap_or_default(),
        working_dir: non_empty(run.working_dir),
        user: non_empty(run.user),
        exposed_ports: run
            .exposed_ports
            .map(|m| m.into_keys().collect())
            .unwrap_or_default(),
        stop_signal: non_empty(run.stop_signal),
        labels: run.labels.unwrap_or_default(),
        diff_ids: raw.rootfs.map(|r| r.diff_ids).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    fn desc(media_type: &str, digest: &Digest, platform: Option<(&str, &str, Option<&str>)>) -> String {
        let platform = platform.map_or(String::new(), |(os, arch, variant)| {
            let variant = variant.map_or(String::new(), |v| format!(r#","variant":"{v}""#));
            format!(r#","platform":{{"os":"{os}","architecture":"{arch}"{variant}}}"#)
        });
        format!(r#"{{"mediaType":"{media_type}","digest":"{digest}","size":10{platform}}}"#)
    }

    #[test]
    fn parses_oci_and_docker_manifests() {
        for mt in [OCI_MANIFEST, DOCKER_MANIFEST] {
            let body = format!(
                r#"{{"schemaVersion":2,"mediaType":"{mt}","config":{},"layers":[{}],"extra":1}}"#,
                desc(OCI_CONFIG, &d("c"), None),
                desc(OCI_LAYER_GZIP, &d("l"), None)
            );
            let (m, media_type) = parse_manifest(body.as_bytes(), None).unwrap();
            assert_eq!(media_type, mt);
            let Manifest::Image(m) = m else {
                panic!("not an image")
            };
            assert_eq!(m.layers.len(), 1);
            check_image_manifest(&m, 10).unwrap();
        }
        // OCI without mediaType: by header, then by shape.
        let body = format!(
            r#"{{"schemaVersion":2,"config":{},"layers":[]}}"#,
            desc(OCI_CONFIG, &d("c"), None)
        );
        let (_, mt) = parse_manifest(body.as_bytes(), Some(&format!("{DOCKER_MANIFEST}; x=y"))).unwrap();
        assert_eq!(mt, DOCKER_MANIFEST);
        let (_, mt) = parse_manifest(body.as_bytes(), None).unwrap();
        assert_eq!(mt, OCI_MANIFEST);
    }

    #[test]
    fn rejects_unsupported_and_malformed_manifests() {
        let schema1 = br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#;
        let err = parse_manifest(
            schema1,
            Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("unsupported media type application/vnd.docker.distribution.manifest.v1"),
            "{err}"
        );
        let err = parse_manifest(schema1, None).unwrap_err();
        assert!(matches!(err, ManifestError::UnsupportedMediaType { .. }), "{err}");
        let artifact =
            br#"{"schemaVersion":2,"mediaType":"application/vnd.cncf.oras.artifact.manifest.v1+json"}"#;
        assert!(matches!(
            parse_manifest(artifact, None),
            Err(ManifestError::UnsupportedMediaType { .. })
        ));
        for bad in [
            &b""[..],
            b"null",
            b"[]",
            b"{",
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
            br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:00","size":1},"layers":[]}"#,
            br#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":-1}]}"#,
        ] {
            assert!(parse_manifest(bad, None).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn checks_config_and_layer_media_types() {
        let m = |config: &str, layer: &str| ImageManifest {
            schema_version: 2,
            media_type: None,
            config: serde_json::from_str(&desc(config, &d("c"), None)).unwrap(),
            layers: vec![serde_json::from_str(&desc(layer, &d("l"), None)).unwrap()],
            annotations: None,
        };
        let err = check_image_manifest(&m("application/vnd.cncf.helm.config.v1+json", OCI_LAYER_GZIP), 10)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported media type application/vnd.cncf.helm.config.v1+json for image config"
        );
        let err = check_image_manifest(&m(DOCKER_CONFIG, "application/x-foo"), 10).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("unsupported media type application/x-foo for layer sha256:"),
            "{err}"
        );
        assert!(check_image_manifest(&m(OCI_CONFIG, OCI_LAYER_ZSTD), 0).is_err());
        assert!(check_image_manifest(&m(OCI_CONFIG, OCI_LAYER_ZSTD), 1).is_ok());
        assert_eq!(Compression::of_layer(DOCKER_LAYER_GZIP), Some(Compression::Gzip));
        assert_eq!(Compression::of_layer(OCI_LAYER_TAR), Some(Compression::None));
        assert_eq!(Compression::of_layer(OCI_LAYER_ZSTD), Some(Compression::Zstd));
    }

    #[test]
    fn selects_linux_amd64() {
        let idx = |entries: Vec<String>| -> ImageIndex {
            let body = format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
                entries.join(",")
            );
            match parse_manifest(body.as_bytes(), None).unwrap().0 {
                Manifest::Index(i) => i,
                Manifest::Image(_) => panic!("not an index"),
            }
        };
        let (arm, v3, plain, att) = (d("arm"), d("v3"), d("plain"), d("att"));
        let index = idx(vec![
            desc(OCI_MANIFEST, &arm, Some(("linux", "arm64", Some("v8")))),
            desc(OCI_MANIFEST, &att, Some(("unknown", "unknown", None))),
            desc(OCI_MANIFEST, &v3, Some(("linux", "amd64", Some("v3")))),
            desc(OCI_MANIFEST, &plain, Some(("linux", "amd64", None))),
        ]);
        assert_eq!(select_linux_amd64(&index).unwrap().digest, plain);
        let index = idx(vec![
            desc(OCI_MANIFEST, &arm, Some(("linux", "arm64", None))),
            desc(DOCKER_MANIFEST, &v3, Some(("linux", "amd64", Some("v3")))),
        ]);
        assert_eq!(select_linux_amd64(&index).unwrap().digest, v3);
        let index = idx(vec![
            desc(OCI_MANIFEST, &arm, Some(("linux", "arm64", None))),
            desc(OCI_INDEX, &plain, Some(("linux", "amd64", None))),
            desc(OCI_MANIFEST, &att, Some(("windows", "amd64", None))),
            desc(OCI_MANIFEST, &att, None),
        ]);
        assert!(select_linux_amd64(&index).is_none());
    }

    #[test]
    fn parses_the_run_config() {
        let body = br#"{
            "architecture": "amd64", "os": "linux",
            "config": {
                "Entrypoint": ["/bin/app"], "Cmd": null, "Env": ["A=1", "PATH=/bin"],
                "WorkingDir": "", "User": "1000:1000",
                "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
                "StopSignal": "SIGINT", "Labels": {"k": "v"}, "Unknown": true
            },
            "rootfs": {"type": "layers", "diff_ids": ["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]},
            "history": [{"created_by": "x"}]
        }"#;
        let c = parse_config(body).unwrap();
        assert_eq!(c.entrypoint, Some(vec!["/bin/app".to_owned()]));
        assert_eq!(c.cmd, None);
        assert_eq!(c.env, vec!["A=1", "PATH=/bin"]);
        assert_eq!(c.working_dir, None);
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.exposed_ports, vec!["53/udp", "8080/tcp"]);
        assert_eq!(c.stop_signal.as_deref(), Some("SIGINT"));
        assert_eq!(c.labels.get("k").map(String::as_str), Some("v"));
        assert_eq!(c.diff_ids.len(), 1);
        assert_eq!(c.architecture.as_deref(), Some("amd64"));

        let minimal = parse_config(br#"{"architecture":"amd64","os":"linux"}"#).unwrap();
        assert_eq!(minimal.entrypoint, None);
        assert!(minimal.env.is_empty());
        assert!(parse_config(b"[1]").is_err());
        assert!(parse_config(br#"{"config":{"Env":"A=1"}}"#).is_err());
    }
}
