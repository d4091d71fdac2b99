//! Layers applied as an image builder meant them: whiteout and opaque semantics across and within
//! layers, and metadata (owners, modes with setuid/setgid/sticky, times, xattrs, symlinks, hardlinks,
//! device nodes) kept as the image says. Runs as root.

mod layer_support;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::PathBuf;

    use crate::layer_support::{Attrs, Expect, Fixture, Layer, tree, xattr};
    use aloft_image::unpack::{
        Compression, UnpackError, UnpackLimits, Unpacker, layer_compression, unpack_layer,
    };

    fn file(data: &str) -> Expect {
        Expect::File(data.as_bytes().to_vec())
    }

    fn expect(entries: &[(&str, Expect)]) -> BTreeMap<String, Expect> {
        entries
            .iter()
            .map(|(p, e)| ((*p).to_owned(), e.clone()))
            .collect()
    }

    #[test]
    fn three_layers_with_whiteouts_and_opaque_dirs_give_exactly_the_expected_tree() {
        let fx = Fixture::new();
        let base = Layer::new()
            .dir("etc")
            .file("etc/hostname", b"base")
            .file("etc/passwd", b"root")
            .dir("app")
            .file("app/old.js", b"old")
            .dir("app/lib")
            .file("app/lib/dep.js", b"dep")
            .dir("cache")
            .file("cache/a", b"a")
            .dir("usr/lib")
            .symlink("lib", "usr/lib")
            .file("usr/lib/libc.so", b"libc")
            .tar();
        let update = Layer::new()
            // The opaque marker comes after a sibling of this layer: that sibling must survive.
            .dir("app")
            .file("app/new.js", b"new")
            .file("app/.wh..wh..opq", b"")
            .dir("app/lib")
            .file("app/lib/fresh.js", b"fresh")
            .file("etc/.wh.hostname", b"")
            .file(".wh.cache", b"")
            .file("etc/passwd", b"root\nuser")
            // Written through the image's own symlink, as some builders do.
            .file("lib/libm.so", b"libm")
            .tar();
        let last = Layer::new()
            .dir("cache")
            .file("cache/b", b"b")
            .file("app/lib/.wh.fresh.js", b"")
            .file(".wh.lib", b"")
            .tar();
        let stats = fx.apply(&[base, update, last], UnpackLimits::default()).unwrap();
        assert_eq!(stats.whiteouts, 5);
        assert_eq!(
            tree(&fx.root),
            expect(&[
                ("app", Expect::Dir),
                ("app/lib", Expect::Dir),
                ("app/new.js", file("new")),
                ("cache", Expect::Dir),
                ("cache/b", file("b")),
                ("etc", Expect::Dir),
                ("etc/passwd", file("root\nuser")),
                ("usr", Expect::Dir),
                ("usr/lib", Expect::Dir),
                ("usr/lib/libc.so", file("libc")),
                ("usr/lib/libm.so", file("libm")),
            ])
        );
    }

    #[test]
    fn whiteouts_never_delete_what_the_same_layer_wrote() {
        let fx = Fixture::new();
        let lower = Layer::new()
            .dir("d")
            .file("d/lower", b"l")
            .file("f", b"lower f")
            .tar();
        let upper = Layer::new()
            .file("f", b"upper f")
            .file(".wh.f", b"")
            .file("d/upper", b"u")
            .file(".wh.d", b"")
            .file("g", b"g")
            .file(".wh..wh..opq", b"")
            .tar();
        fx.apply(&[lower, upper], UnpackLimits::default()).unwrap();
        assert_eq!(
            tree(&fx.root),
            expect(&[
                ("d", Expect::Dir),
                ("d/upper", file("u")),
                ("f", file("upper f")),
                ("g", file("g")),
            ])
        );
    }

    #[test]
    fn whiteouts_of_missing_paths_and_aufs_metadata_are_harmless() {
        let fx = Fixture::new();
        let layer = Layer::new()
            .file(".wh.nothing", b"")
            .file("missing/dir/.wh.x", b"")
            .file("missing/.wh..wh..opq", b"")
            .file(".wh..wh.plnk", b"")
            .file("kept", b"k")
            .tar();
        let stats = fx.apply(&[layer], UnpackLimits::default()).unwrap();
        assert_eq!(stats.whiteouts, 3);
        assert_eq!(tree(&fx.root), expect(&[("kept", file("k"))]));
    }

    #[test]
    fn metadata_is_kept_as_the_image_says() {
        let fx = Fixture::new();
        let cap = b"\x01\x00\x00\x02\x02\x00\x0a\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
        let layer = Layer::new()
            .dir_with(
                "./",
                Attrs {
                    mode: 0o755,
                    mtime: 1_000,
                    ..Attrs::DIR
                },
            )
            .dir_with(
                "tmp",
                Attrs {
                    mode: 0o1777,
                    mtime: 2_000,
                    ..Attrs::DIR
                },
            )
            .dir_with(
                "srv",
                Attrs {
                    mode: 0o2775,
                    uid: 1000,
                    gid: 50,
                    mtime: 3_000,
                },
            )
            .file_with(
                "srv/data",
                b"owned",
                Attrs {
                    mode: 0o640,
                    uid: 1000,
                    gid: 50,
                    mtime: 4_000,
                },
            )
            .file_with(
                "usr/bin/passwd",
                b"\x7fELF",
                Attrs {
                    mode: 0o4755,
                    mtime: 5_000,
                    ..Attrs::FILE
                },
            )
            .file_with(
                "usr/bin/wall",
                b"\x7fELF",
                Attrs {
                    mode: 0o2755,
                    gid: 5,
                    mtime: 5_001,
                    ..Attrs::FILE
                },
            )
            .pax(&[
                ("mtime", b"1700000000.123456789"),
                ("uid", b"200000"),
                ("gid", b"200001"),
                ("SCHILY.xattr.user.origin", b"image"),
                ("SCHILY.xattr.security.capability", cap),
                ("SCHILY.xattr.security.selinux", b"system_u:object_r:bin_t:s0"),
                ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
            ])
            .file("usr/bin/ping", b"\x7fELF")
            .raw(
                b'2',
                b"usr/bin/sh",
                b"dash",
                b"",
                Attrs {
                    mode: 0o777,
                    uid: 7,
                    gid: 8,
                    mtime: 6_000,
                },
                (0, 0),
            )
            .hardlink("usr/bin/passwd-link", "usr/bin/passwd")
            .char_dev(
                "dev/console",
                5,
                1,
                Attrs {
                    mode: 0o620,
                    gid: 5,
                    ..Attrs::FILE
                },
            )
            .block_dev(
                "dev/vda",
                254,
                0,
                Attrs {
                    mode: 0o660,
                    gid: 6,
                    ..Attrs::FILE
                },
            )
            .fifo(
                "run/initctl",
                Attrs {
                    mode: 0o600,
                    mtime: 7_000,
                    ..Attrs::FILE
                },
            )
            .tar();
        let stats = fx.apply(&[layer], UnpackLimits::default()).unwrap();
        assert_eq!(
            stats.xattrs_skipped, 2,
            "security.selinux and trusted.* are dropped"
        );

        let meta = |p: &str| std::fs::symlink_metadata(fx.root.join(p)).unwrap();
        let root = std::fs::symlink_metadata(&fx.root).unwrap();
        assert_eq!((root.mode() & 0o7777, root.mtime()), (0o755, 1_000));
        let tmp = meta("tmp");
        assert_eq!((tmp.mode() & 0o7777, tmp.mtime()), (0o1777, 2_000));
        let srv = meta("srv");
        assert_eq!((srv.mode() & 0o7777, srv.uid(), srv.gid()), (0o2775, 1000, 50));
        assert_eq!(
            srv.mtime(),
            3_000,
            "a directory's time survives its children being written"
        );
        let data = meta("srv/data");
        assert_eq!(
            (data.mode() & 0o7777, data.uid(), data.gid(), data.mtime()),
            (0o640, 1000, 50, 4_000)
        );
        assert_eq!(meta("usr/bin/passwd").mode() & 0o7777, 0o4755);
        let wall = meta("usr/bin/wall");
        assert_eq!((wall.mode() & 0o7777, wall.gid()), (0o2755, 5));

        let ping = meta("usr/bin/ping");
        assert_eq!((ping.uid(), ping.gid()), (200_000, 200_001));
        assert_eq!((ping.mtime(), ping.mtime_nsec()), (1_700_000_000, 123_456_789));
        let ping_path = fx.root.join("usr/bin/ping");
        assert_eq!(xattr(&ping_path, "user.origin").as_deref(), Some(&b"image"[..]));
        assert_eq!(
            xattr(&ping_path, "security.capability").as_deref(),
            Some(&cap[..])
        );
        assert_eq!(xattr(&ping_path, "security.selinux"), None);
        assert_eq!(xattr(&ping_path, "trusted.overlay.opaque"), None);

        let sh = meta("usr/bin/sh");
        assert!(sh.file_type().is_symlink());
        assert_eq!((sh.uid(), sh.gid(), sh.mtime()), (7, 8, 6_000));
        assert_eq!(
            std::fs::read_link(fx.root.join("usr/bin/sh")).unwrap(),
            PathBuf::from("dash")
        );

        assert_eq!(meta("usr/bin/passwd-link").ino(), meta("usr/bin/passwd").ino());
        assert_eq!(meta("usr/bin/passwd").nlink(), 2);

        let console = meta("dev/console");
        assert!(console.file_type().is_char_device());
        assert_eq!(
            (console.rdev(), console.mode() & 0o7777, console.gid()),
            (libc::makedev(5, 1), 0o620, 5)
        );
        let vda = meta("dev/vda");
        assert!(vda.file_type().is_block_device());
        assert_eq!((vda.rdev(), vda.mode() & 0o7777), (libc::makedev(254, 0), 0o660));
        let fifo = meta("run/initctl");
        assert!(fifo.file_type().is_fifo());
        assert_eq!((fifo.mode() & 0o7777, fifo.mtime()), (0o600, 7_000));
    }

    #[test]
    fn a_rewritten_hardlink_does_not_change_its_sibling() {
        let fx = Fixture::new();
        let lower = Layer::new().file("a", b"original").hardlink("b", "a").tar();
        let upper = Layer::new().file("b", b"replaced").tar();
        fx.apply(&[lower, upper], UnpackLimits::default()).unwrap();
        assert_eq!(std::fs::read(fx.root.join("a")).unwrap(), b"original");
        assert_eq!(std::fs::read(fx.root.join("b")).unwrap(), b"replaced");
    }

    #[test]
    fn gzip_zstd_and_plain_layers_by_media_type() {
        let fx = Fixture::new();
        let mut unpacker = Unpacker::new(&fx.root, UnpackLimits::default()).unwrap();
        let layers = [
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                Layer::new().file("g", b"gzip").gzip(),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Layer::new().file("z", b"zstd").zstd(),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Layer::new().file("d", b"docker").gzip(),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar",
                Layer::new().file("p", b"plain").tar(),
            ),
        ];
        for (media_type, blob) in &layers {
            let compression = layer_compression(media_type).unwrap();
            let stats = unpacker.apply_layer(&blob[..], compression).unwrap();
            assert_eq!(stats.entries, 1, "{media_type}");
        }
        assert_eq!(unpacker.totals().entries, 4);
        assert_eq!(
            tree(&fx.root),
            expect(&[
                ("d", file("docker")),
                ("g", file("gzip")),
                ("p", file("plain")),
                ("z", file("zstd"))
            ])
        );
        assert!(matches!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+bzip2"),
            Err(UnpackError::UnsupportedMediaType { .. })
        ));
    }

    #[test]
    fn corrupt_and_truncated_layers_fail_cleanly() {
        let fx = Fixture::new();
        let mut gz = Layer::new().file("f", &[1u8; 4096]).gzip();
        let mid = gz.len() / 2;
        gz[mid] ^= 0xff;
        let result = unpack_layer(&fx.root, &gz[..], Compression::Gzip, &UnpackLimits::default());
        assert!(result.is_err(), "{result:?}");

        let fx = Fixture::new();
        let tar = Layer::new().file("f", &[1u8; 4096]).tar();
        let result = unpack_layer(
            &fx.root,
            &tar[..1000],
            Compression::None,
            &UnpackLimits::default(),
        );
        assert!(matches!(result, Err(UnpackError::ReadEntry { .. })), "{result:?}");

        let fx = Fixture::new();
        let mut padded = Layer::new().file("f", b"x").tar();
        padded.extend(vec![0u8; 2 << 20]);
        let result = unpack_layer(&fx.root, &padded[..], Compression::None, &UnpackLimits::default());
        assert!(
            matches!(result, Err(UnpackError::TrailingData { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn the_root_must_sit_in_a_private_directory() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::create_dir(tmp.path().join("root")).unwrap();
        let result = Unpacker::new(tmp.path().join("root"), UnpackLimits::default());
        assert!(
            matches!(result, Err(UnpackError::RootNotPrivate { .. })),
            "{result:?}"
        );
        let result = Unpacker::new(tmp.path().join("missing"), UnpackLimits::default());
        assert!(matches!(result, Err(UnpackError::OpenRoot { .. })), "{result:?}");
    }

    #[test]
    fn errors_name_the_entry() {
        let fx = Fixture::new();
        let layer = Layer::new().file("../../etc/passwd", b"x").tar();
        let err =
            unpack_layer(&fx.root, &layer[..], Compression::None, &UnpackLimits::default()).unwrap_err();
        assert_eq!(err.to_string(), "layer entry ../../etc/passwd escapes the root");
        let layer = Layer::new().file("a\nb/../../x", b"x").tar();
        let err =
            unpack_layer(&fx.root, &layer[..], Compression::None, &UnpackLimits::default()).unwrap_err();
        assert_eq!(err.to_string(), "layer entry a\\nb/../../x escapes the root");
    }
}
