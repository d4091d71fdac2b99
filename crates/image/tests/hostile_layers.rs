//! A corpus of hostile layers, generated here, each escape technique alone and combined. For every one
//! a sentinel tree sits beside the target root; after the unpack (which either succeeds with the
//! attack neutralised inside the root, or fails with the error the design promises) every path,
//! byte, owner, mode, time, link count and link target outside the root must be as before.
//!
//! Runs as root (owners and device nodes need it), as on the dev machines and CI.
//!
//! Written so that a regression cannot hurt the machine running it: every symlink that a destructive
//! step (a whiteout, an opaque marker, a device node, an overwrite) goes through points into the
//! fixture's own temp dir, where a regression shows up in the snapshot. Symlinks to `/` are only used
//! to create new, uniquely named files (`aloft-escape-probe`), whose absence from the root then fails
//! the test. (A careless run without `RESOLVE_IN_ROOT` once cleared a dev machine's `/etc`.)

mod layer_support;

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use crate::layer_support::{Attrs, Fixture, Layer};
    use aloft_image::unpack::{Compression, UnpackError, UnpackLimits, UnpackStats, Unpacker};

    /// Builds the layers (they may name the fixture's absolute paths), applies them as plain tar, and
    /// asserts nothing outside the root changed.
    fn attack(build: impl FnOnce(&Fixture) -> Vec<Vec<u8>>) -> (Fixture, Result<UnpackStats, UnpackError>) {
        attack_with(UnpackLimits::default(), build)
    }

    fn attack_with(
        limits: UnpackLimits,
        build: impl FnOnce(&Fixture) -> Vec<Vec<u8>>,
    ) -> (Fixture, Result<UnpackStats, UnpackError>) {
        let fx = Fixture::new();
        let layers = build(&fx);
        let before = fx.snapshot();
        let result = fx.apply(&layers, limits);
        before.assert_unchanged(&fx.snapshot());
        (fx, result)
    }

    /// Reads a file inside the root (relative path, never through the host's `/`).
    fn read_inside(fx: &Fixture, rel: &str) -> Vec<u8> {
        let meta = std::fs::symlink_metadata(fx.root.join(rel)).unwrap();
        assert!(meta.is_file(), "{rel} is not a regular file");
        std::fs::read(fx.root.join(rel)).unwrap()
    }

    /// `abs` without its leading slash: where an absolute name lands inside the root.
    fn rel(abs: &str) -> &str {
        abs.trim_start_matches('/')
    }

    #[test]
    fn dotdot_names_are_refused() {
        for name in [
            "../outside/passwd",
            "../victim",
            "a/../../victim",
            "./../outside/etc/passwd",
            "..",
            "x/..",
        ] {
            let (_fx, result) = attack(|_| vec![Layer::new().file(name, b"pwned").tar()]);
            assert!(
                matches!(result, Err(UnpackError::Escape { .. })),
                "{name}: {result:?}"
            );
        }
    }

    #[test]
    fn absolute_names_land_inside_the_root() {
        let (fx, result) = attack(|fx| {
            let abs = fx.outside_abs();
            vec![
                Layer::new()
                    .file(&format!("{abs}/passwd"), b"pwned")
                    .file("/aloft-escape-probe/passwd", b"inside")
                    .tar(),
            ]
        });
        result.unwrap();
        let abs = fx.outside_abs();
        assert_eq!(read_inside(&fx, &format!("{}/passwd", rel(&abs))), b"pwned");
        assert_eq!(read_inside(&fx, "aloft-escape-probe/passwd"), b"inside");
    }

    #[test]
    fn symlinked_parent_pointing_up_is_clamped_to_the_root() {
        // `evil -> ../outside` resolves to <root>/outside, which does not exist: refused.
        let (_fx, result) = attack(|_| {
            vec![
                Layer::new()
                    .symlink("evil", "../outside")
                    .file("evil/passwd", b"pwned")
                    .tar(),
            ]
        });
        assert!(
            matches!(result, Err(UnpackError::ParentNotDirectory { .. })),
            "{result:?}"
        );

        // With an `outside/` inside the root, the same layer writes there.
        let (fx, result) = attack(|_| {
            vec![
                Layer::new()
                    .dir("outside")
                    .symlink("evil", "../../../outside")
                    .file("evil/passwd", b"pwned")
                    .tar(),
            ]
        });
        result.unwrap();
        assert_eq!(read_inside(&fx, "outside/passwd"), b"pwned");
    }

    #[test]
    fn symlinked_parent_with_absolute_target_outside_is_refused() {
        let (_fx, result) = attack(|fx| {
            let abs = fx.outside_abs();
            vec![
                Layer::new()
                    .symlink("evil", &abs)
                    .file("evil/passwd", b"pwned")
                    .file("evil/new", b"pwned")
                    .tar(),
            ]
        });
        assert!(
            matches!(result, Err(UnpackError::ParentNotDirectory { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn symlinked_parent_with_absolute_target_resolves_inside_the_root() {
        let (fx, result) = attack(|fx| {
            let abs = fx.outside_abs();
            vec![
                Layer::new()
                    .file(&format!("{abs}/placeholder"), b"")
                    .symlink("evil", &abs)
                    .file("evil/passwd", b"pwned")
                    .tar(),
            ]
        });
        result.unwrap();
        assert_eq!(
            read_inside(&fx, &format!("{}/passwd", rel(&fx.outside_abs()))),
            b"pwned"
        );
    }

    #[test]
    fn symlink_to_slash_then_nested_write_stays_inside() {
        let (fx, result) = attack(|_| {
            vec![
                Layer::new()
                    .symlink("s", "/")
                    .file("s/aloft-escape-probe/passwd", b"pwned")
                    .symlink("up", "..")
                    .file("up/up/victim", b"pwned too")
                    .tar(),
            ]
        });
        result.unwrap();
        assert_eq!(read_inside(&fx, "aloft-escape-probe/passwd"), b"pwned");
        assert_eq!(read_inside(&fx, "victim"), b"pwned too");
    }

    #[test]
    fn magic_links_do_not_lead_out() {
        let (_fx, result) = attack(|fx| {
            let abs = fx.outside_abs();
            vec![
                Layer::new()
                    .symlink("p", "/proc/self/root")
                    .file(&format!("p{abs}/passwd"), b"pwned")
                    .tar(),
            ]
        });
        assert!(
            matches!(result, Err(UnpackError::ParentNotDirectory { .. })),
            "{result:?}"
        );

        // Even with a real /proc-shaped path in the root, nothing resolves through the host's procfs.
        let (fx, result) = attack(|fx| {
            vec![
                Layer::new()
                    .dir("proc/self")
                    .symlink("fd", "/proc/self/root")
                    .file(&format!("fd{}/x", fx.outside_abs()), b"pwned")
                    .tar(),
            ]
        });
        assert!(
            matches!(result, Err(UnpackError::ParentNotDirectory { .. })),
            "{result:?}"
        );
        assert!(std::fs::symlink_metadata(fx.root.join("proc/self/root")).is_err());
    }

    #[test]
    fn symlink_loops_fail_cleanly() {
        let (_fx, result) = attack(|_| {
            vec![
                Layer::new()
                    .symlink("a", "b")
                    .symlink("b", "a")
                    .file("a/x", b"pwned")
                    .tar(),
            ]
        });
        assert!(matches!(result, Err(UnpackError::Io { .. })), "{result:?}");
    }

    #[test]
    fn hardlink_to_an_absolute_outside_file_is_refused() {
        let (_fx, result) = attack(|fx| {
            vec![
                Layer::new()
                    .hardlink("h", &format!("{}/passwd", fx.outside_abs()))
                    .tar(),
            ]
        });
        assert!(
            matches!(result, Err(UnpackError::LinkTargetMissing { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn hardlink_with_dotdot_is_refused() {
        for target in ["../outside/passwd", "../victim", "a/../../victim"] {
            let (_fx, result) = attack(|_| vec![Layer::new().hardlink("h", target).tar()]);
            assert!(
                matches!(result, Err(UnpackError::LinkEscape { .. })),
                "{target}: {result:?}"
            );
        }
    }

    #[test]
    fn hardlink_through_a_symlinked_dir_is_refused() {
        for link in ["ABS", "../outside", "../../../outside"] {
            let (_fx, result) = attack(|fx| {
                let target = if link == "ABS" {
                    fx.outside_abs()
                } else {
                    link.to_owned()
                };
                vec![Layer::new().symlink("d", &target).hardlink("h", "d/passwd").tar()]
            });
            assert!(
                matches!(result, Err(UnpackError::LinkTargetMissing { .. })),
                "{link}: {result:?}"
            );
        }
    }

    #[test]
    fn hardlink_to_a_symlink_links_the_symlink_itself() {
        let (fx, result) = attack(|fx| {
            vec![
                Layer::new()
                    .symlink("s", &format!("{}/passwd", fx.outside_abs()))
                    .hardlink("h", "s")
                    .tar(),
            ]
        });
        result.unwrap();
        let s = std::fs::symlink_metadata(fx.root.join("s")).unwrap();
        let h = std::fs::symlink_metadata(fx.root.join("h")).unwrap();
        assert!(h.file_type().is_symlink());
        assert_eq!((s.ino(), s.nlink()), (h.ino(), 2));
    }

    #[test]
    fn hardlink_to_a_directory_is_refused() {
        let (_fx, result) = attack(|_| vec![Layer::new().dir("d").hardlink("h", "d").tar()]);
        assert!(
            matches!(result, Err(UnpackError::LinkTargetDirectory { .. })),
            "{result:?}"
        );
        let (_fx, result) = attack(|_| vec![Layer::new().hardlink("h", "/").tar()]);
        assert!(
            matches!(result, Err(UnpackError::LinkTargetDirectory { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn whiteouts_naming_dotdot_are_refused() {
        for name in ["../outside/.wh.passwd", "../.wh.victim", "a/.wh...", ".wh.."] {
            let (_fx, result) = attack(|_| vec![Layer::new().file(name, b"").tar()]);
            assert!(
                matches!(
                    result,
                    Err(UnpackError::Escape { .. } | UnpackError::Malformed { .. })
                ),
                "{name}: {result:?}"
            );
        }
    }

    #[test]
    fn whiteouts_through_symlinks_stay_inside() {
        let (fx, result) = attack(|fx| {
            let abs = fx.outside_abs();
            vec![
                Layer::new()
                    .file("outside/passwd", b"inside")
                    .symlink("up", "..")
                    .symlink("abs", &abs)
                    .tar(),
                Layer::new()
                    .file("abs/.wh.passwd", b"")
                    .file("up/.wh.victim", b"")
                    .file("up/.wh.outside", b"")
                    .file("up/up/up/.wh.passwd", b"")
                    .tar(),
            ]
        });
        let stats = result.unwrap();
        assert_eq!(stats.whiteouts, 4);
        // `up/.wh.outside` resolved to <root>/outside: the root's own copy is gone.
        assert!(!fx.root.join("outside").exists());
    }

    #[test]
    fn opaque_markers_in_symlinked_dirs_stay_inside() {
        let (fx, result) = attack(|fx| {
            let abs = fx.outside_abs();
            vec![
                Layer::new().file("lower", b"lower layer").tar(),
                Layer::new()
                    .symlink("t", &abs)
                    .file("t/.wh..wh..opq", b"")
                    .symlink("up", "..")
                    .file("up/.wh..wh..opq", b"")
                    .symlink("s", fx.tmp.path().to_str().unwrap())
                    .file("s/.wh..wh..opq", b"")
                    .tar(),
            ]
        });
        result.unwrap();
        // The opaque marker reached the root itself: the lower file went, this layer's symlinks stayed.
        let mut names: Vec<_> = std::fs::read_dir(&fx.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["s", "t", "up"]);
    }

    #[test]
    fn whiteouts_remove_symlinks_not_their_targets() {
        let (fx, result) = attack(|fx| {
            let abs = fx.outside_abs();
            vec![
                Layer::new()
                    .symlink("s", &format!("{abs}/passwd"))
                    .symlink("d", &abs)
                    .dir("o")
                    .symlink("o/link", "../../outside")
                    .symlink("o/abs", &abs)
                    .tar(),
                Layer::new()
                    .file(".wh.s", b"")
                    .file(".wh.d", b"")
                    .dir("o")
                    .file("o/.wh..wh..opq", b"")
                    .tar(),
            ]
        });
        result.unwrap();
        assert_eq!(
            crate::layer_support::tree(&fx.root).len(),
            1,
            "only the emptied o/ remains"
        );
        assert!(fx.root.join("o").is_dir());
    }

    #[test]
    fn symlink_replaced_by_a_dir_later_in_the_layer() {
        let (fx, result) = attack(|fx| {
            vec![
                Layer::new()
                    .symlink("x", &fx.outside_abs())
                    .dir("x")
                    .file("x/passwd", b"pwned")
                    .tar(),
            ]
        });
        result.unwrap();
        assert!(std::fs::symlink_metadata(fx.root.join("x")).unwrap().is_dir());
        assert_eq!(read_inside(&fx, "x/passwd"), b"pwned");
    }

    #[test]
    fn dir_swapped_for_a_symlink_then_written_through() {
        let (_fx, result) = attack(|fx| {
            vec![
                Layer::new()
                    .dir("x")
                    .file("x/a", b"")
                    .symlink("x", &fx.outside_abs())
                    .file("x/passwd", b"pwned")
                    .tar(),
            ]
        });
        assert!(
            matches!(result, Err(UnpackError::ParentNotDirectory { .. })),
            "{result:?}"
        );

        let (fx, result) = attack(|_| {
            vec![
                Layer::new()
                    .dir("x")
                    .file("x/a", b"")
                    .symlink("x", "/")
                    .file("x/aloft-escape-probe", b"pwned")
                    .tar(),
            ]
        });
        result.unwrap();
        assert_eq!(read_inside(&fx, "aloft-escape-probe"), b"pwned");
    }

    #[test]
    fn two_layer_attacks_plant_a_symlink_then_use_it() {
        let plant = |fx: &Fixture| Layer::new().symlink("lib", &fx.outside_abs()).tar();
        let (_fx, result) = attack(|fx| vec![plant(fx), Layer::new().file("lib/passwd", b"pwned").tar()]);
        assert!(
            matches!(result, Err(UnpackError::ParentNotDirectory { .. })),
            "{result:?}"
        );

        let (_fx, result) = attack(|fx| vec![plant(fx), Layer::new().hardlink("h", "lib/passwd").tar()]);
        assert!(
            matches!(result, Err(UnpackError::LinkTargetMissing { .. })),
            "{result:?}"
        );

        let (_fx, result) = attack(|fx| vec![plant(fx), Layer::new().file("lib/.wh.passwd", b"").tar()]);
        result.unwrap();

        let (_fx, result) = attack(|fx| vec![plant(fx), Layer::new().dir("lib/etc").tar()]);
        assert!(
            matches!(result, Err(UnpackError::ParentNotDirectory { .. })),
            "{result:?}"
        );

        // Replacing the symlink by a directory first makes the write land in that directory.
        let (fx, result) = attack(|fx| {
            vec![
                plant(fx),
                Layer::new().dir("lib").file("lib/passwd", b"pwned").tar(),
            ]
        });
        result.unwrap();
        assert_eq!(read_inside(&fx, "lib/passwd"), b"pwned");
    }

    #[test]
    fn entries_replace_a_symlink_instead_of_writing_through_it() {
        let (fx, result) = attack(|fx| {
            let abs = fx.outside_abs();
            vec![
                Layer::new()
                    .symlink("f", &format!("{abs}/passwd"))
                    .symlink("d", &abs)
                    .symlink("n", &format!("{abs}/etc/shadow"))
                    .symlink("l", &format!("{abs}/suid"))
                    .tar(),
                Layer::new()
                    .file_with(
                        "f",
                        b"pwned",
                        Attrs {
                            mode: 0o4777,
                            uid: 1000,
                            ..Attrs::FILE
                        },
                    )
                    .dir_with(
                        "d",
                        Attrs {
                            mode: 0o777,
                            uid: 1000,
                            ..Attrs::DIR
                        },
                    )
                    .fifo(
                        "n",
                        Attrs {
                            mode: 0o666,
                            ..Attrs::FILE
                        },
                    )
                    .symlink("l", "/bin/sh")
                    .tar(),
            ]
        });
        result.unwrap();
        assert_eq!(read_inside(&fx, "f"), b"pwned");
        assert!(std::fs::symlink_metadata(fx.root.join("d")).unwrap().is_dir());
        assert!(
            std::fs::symlink_metadata(fx.root.join("n"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        assert_eq!(
            std::fs::read_link(fx.root.join("l")).unwrap().to_str(),
            Some("/bin/sh")
        );
    }

    #[test]
    fn symlink_metadata_is_never_applied_to_the_target() {
        let (fx, result) = attack(|fx| {
            let abs = fx.outside_abs();
            let attrs = Attrs {
                mode: 0o777,
                uid: 4242,
                gid: 4343,
                mtime: 1,
            };
            vec![
                Layer::new()
                    .raw(b'2', b"s", format!("{abs}/passwd").as_bytes(), b"", attrs, (0, 0))
                    .raw(b'2', b"t", abs.as_bytes(), b"", attrs, (0, 0))
                    .tar(),
            ]
        });
        result.unwrap();
        let s = std::fs::symlink_metadata(fx.root.join("s")).unwrap();
        assert_eq!((s.uid(), s.gid(), s.mtime()), (4242, 4343, 1));
    }

    #[test]
    fn overly_long_and_deep_paths_are_refused() {
        let long = format!("{}x", "a/".repeat(2100));
        let (_fx, result) = attack(|_| vec![Layer::new().file(&long, b"").tar()]);
        assert!(
            matches!(result, Err(UnpackError::PathTooLong { .. })),
            "{result:?}"
        );

        let deep = format!("{}x", "a/".repeat(300));
        let (_fx, result) = attack(|_| vec![Layer::new().file(&deep, b"").tar()]);
        assert!(
            matches!(result, Err(UnpackError::PathTooDeep { .. })),
            "{result:?}"
        );

        let wide = "n".repeat(300);
        let (_fx, result) = attack(|_| vec![Layer::new().file(&wide, b"").tar()]);
        assert!(
            matches!(result, Err(UnpackError::NameTooLong { .. })),
            "{result:?}"
        );

        let (_fx, result) = attack(|fx| {
            vec![
                Layer::new()
                    .symlink("s", &format!("{}/{}", fx.outside_abs(), "x/".repeat(2100)))
                    .tar(),
            ]
        });
        assert!(
            matches!(result, Err(UnpackError::PathTooLong { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn decompression_bomb_fails_cleanly() {
        // 64 MiB of zeros compresses to ~64 KiB; the limit is 8 MiB.
        let limits = UnpackLimits {
            max_bytes: 8 << 20,
            ..UnpackLimits::default()
        };
        let fx = Fixture::new();
        let before = fx.snapshot();
        let bomb = gzip_zero_file("bomb", 64 << 20);
        assert!(bomb.len() < 1 << 20, "the bomb should be small: {}", bomb.len());
        let mut unpacker = Unpacker::new(&fx.root, limits.clone()).unwrap();
        let result = unpacker.apply_layer(&bomb[..], Compression::Gzip);
        assert!(
            matches!(result, Err(UnpackError::TooManyBytes { .. })),
            "{result:?}"
        );
        assert!(
            !fx.root.join("bomb").exists(),
            "refused before any byte was written"
        );
        // And nothing more is accepted on that unpacker.
        let again = unpacker.apply_layer(&Layer::new().file("x", b"").tar()[..], Compression::None);
        assert!(matches!(again, Err(UnpackError::Poisoned)), "{again:?}");
        before.assert_unchanged(&fx.snapshot());

        // Many files under the limit each, over it together: stops at the limit, across layers too.
        let (fx, result) = attack_with(limits, |_| {
            let chunk = vec![7u8; 1 << 20];
            let mut first = Layer::new();
            let mut second = Layer::new();
            for i in 0..5 {
                first.file(&format!("a{i}"), &chunk);
                second.file(&format!("b{i}"), &chunk);
            }
            vec![first.tar(), second.tar()]
        });
        assert!(
            matches!(result, Err(UnpackError::TooManyBytes { .. })),
            "{result:?}"
        );
        let written: u64 = std::fs::read_dir(&fx.root)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(written <= 8 << 20, "{written} bytes written");
    }

    /// A gzip'd layer holding one file of `size` zero bytes, produced without holding it in memory.
    fn gzip_zero_file(name: &str, size: u64) -> Vec<u8> {
        use std::io::Write;
        let mut header = tar::Header::new_gnu();
        header.set_path(name).unwrap();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_cksum();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(header.as_bytes()).unwrap();
        let zeros = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(zeros.len() as u64);
            enc.write_all(&zeros[..usize::try_from(n).unwrap()]).unwrap();
            left -= n;
        }
        enc.write_all(&[0; 1024]).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn entry_count_bomb_fails_cleanly() {
        let limits = UnpackLimits {
            max_entries: 1000,
            ..UnpackLimits::default()
        };
        let (fx, result) = attack_with(limits, |_| {
            let mut layer = Layer::new();
            for i in 0..3000 {
                layer.file(&format!("f{i}"), b"");
            }
            vec![layer.tar()]
        });
        assert!(
            matches!(result, Err(UnpackError::TooManyEntries { .. })),
            "{result:?}"
        );
        assert_eq!(std::fs::read_dir(&fx.root).unwrap().count(), 1000);
    }

    #[test]
    fn oversized_extension_headers_are_refused() {
        let huge = vec![b'a'; 2 << 20];
        let (_fx, result) =
            attack(|_| vec![Layer::new().raw(b'0', &huge, b"", b"", Attrs::FILE, (0, 0)).tar()]);
        assert!(
            matches!(result, Err(UnpackError::HeaderTooLarge { .. })),
            "{result:?}"
        );

        let (_fx, result) = attack(|_| vec![Layer::new().pax(&[("comment", &huge)]).file("x", b"").tar()]);
        assert!(
            matches!(result, Err(UnpackError::HeaderTooLarge { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn pax_and_gnu_names_are_checked_like_header_names() {
        let (_fx, result) = attack(|_| {
            vec![
                Layer::new()
                    .pax(&[("path", b"../outside/passwd")])
                    .file("harmless", b"pwned")
                    .tar(),
            ]
        });
        assert!(matches!(result, Err(UnpackError::Escape { .. })), "{result:?}");

        let (_fx, result) = attack(|fx| {
            let target = format!("{}/passwd", fx.outside_abs());
            vec![
                Layer::new()
                    .pax(&[("linkpath", target.as_bytes())])
                    .hardlink("h", "harmless")
                    .tar(),
            ]
        });
        assert!(
            matches!(result, Err(UnpackError::LinkTargetMissing { .. })),
            "{result:?}"
        );

        let (_fx, result) = attack(|_| {
            vec![
                Layer::new()
                    .pax(&[("path", b"a\0/../../victim")])
                    .file("x", b"")
                    .tar(),
            ]
        });
        assert!(matches!(result, Err(UnpackError::Malformed { .. })), "{result:?}");

        // A GNU long name (over 100 bytes) climbing out.
        let long = format!(
            "{}/../../../../../../../../../../../../../../../../../../../victim",
            "d".repeat(120)
        );
        let (_fx, result) = attack(|_| vec![Layer::new().file(&long, b"pwned").tar()]);
        assert!(matches!(result, Err(UnpackError::Escape { .. })), "{result:?}");

        // A record smuggled inside a value is data, not a record (the tar crate's own parser would read it).
        let (fx, result) = attack(|_| {
            vec![
                Layer::new()
                    .pax(&[("SCHILY.xattr.user.x", b"\n25 path=../outside/passwd\n")])
                    .file("ok", b"fine")
                    .tar(),
            ]
        });
        result.unwrap();
        assert_eq!(read_inside(&fx, "ok"), b"fine");
    }

    #[test]
    fn device_nodes_are_created_inside_only() {
        let (fx, result) = attack(|fx| {
            vec![
                Layer::new()
                    .char_dev(
                        "dev/null",
                        1,
                        3,
                        Attrs {
                            mode: 0o666,
                            ..Attrs::FILE
                        },
                    )
                    .block_dev(
                        "dev/sda",
                        8,
                        0,
                        Attrs {
                            mode: 0o660,
                            gid: 6,
                            ..Attrs::FILE
                        },
                    )
                    .fifo(
                        "run/fifo",
                        Attrs {
                            mode: 0o600,
                            ..Attrs::FILE
                        },
                    )
                    .char_dev(&format!("{}/passwd", fx.outside_abs()), 1, 3, Attrs::FILE)
                    .tar(),
            ]
        });
        result.unwrap();
        let null = std::fs::symlink_metadata(fx.root.join("dev/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!((null.rdev(), null.mode() & 0o7777), (libc::makedev(1, 3), 0o666));
        let sda = std::fs::symlink_metadata(fx.root.join("dev/sda")).unwrap();
        assert!(sda.file_type().is_block_device());
        assert_eq!((sda.rdev(), sda.gid()), (libc::makedev(8, 0), 6));
        assert!(
            std::fs::symlink_metadata(fx.root.join("run/fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );

        for name in ["../outside/null", "../victim"] {
            let (_fx, result) = attack(|_| vec![Layer::new().char_dev(name, 1, 3, Attrs::FILE).tar()]);
            assert!(
                matches!(result, Err(UnpackError::Escape { .. })),
                "{name}: {result:?}"
            );
        }
    }

    #[test]
    fn setuid_files_are_kept_inside_only() {
        let (fx, result) = attack(|_| {
            vec![
                Layer::new()
                    .file_with(
                        "bin/su",
                        b"\x7fELF",
                        Attrs {
                            mode: 0o4755,
                            ..Attrs::FILE
                        },
                    )
                    .tar(),
            ]
        });
        result.unwrap();
        assert_eq!(
            std::fs::metadata(fx.root.join("bin/su")).unwrap().mode() & 0o7777,
            0o4755
        );

        let (_fx, result) = attack(|_| {
            vec![
                Layer::new()
                    .file_with(
                        "../outside/suid2",
                        b"x",
                        Attrs {
                            mode: 0o4755,
                            ..Attrs::FILE
                        },
                    )
                    .tar(),
            ]
        });
        assert!(matches!(result, Err(UnpackError::Escape { .. })), "{result:?}");
    }

    #[test]
    fn the_root_cannot_be_replaced() {
        let (_fx, result) = attack(|fx| vec![Layer::new().symlink(".", &fx.outside_abs()).tar()]);
        assert!(matches!(result, Err(UnpackError::Malformed { .. })), "{result:?}");
        let (_fx, result) = attack(|_| vec![Layer::new().file("/", b"x").tar()]);
        assert!(matches!(result, Err(UnpackError::Malformed { .. })), "{result:?}");
        let (_fx, result) = attack(|_| vec![Layer::new().hardlink("./", "x").tar()]);
        assert!(result.is_err(), "{result:?}");
    }

    #[test]
    fn sparse_and_unknown_entry_types_are_refused() {
        for typeflag in [b'S', b'V', b'M', b'Z'] {
            let (_fx, result) = attack(|_| {
                vec![
                    Layer::new()
                        .raw(typeflag, b"x", b"", b"", Attrs::FILE, (0, 0))
                        .tar(),
                ]
            });
            assert!(
                matches!(result, Err(UnpackError::UnsupportedEntryType { .. })),
                "{result:?}"
            );
        }
        let (_fx, result) = attack(|_| {
            vec![
                Layer::new()
                    .pax(&[("GNU.sparse.major", b"1")])
                    .file("x", b"")
                    .tar(),
            ]
        });
        assert!(
            matches!(result, Err(UnpackError::UnsupportedEntryType { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn every_technique_combined_in_two_layers() {
        let (fx, result) = attack(|fx| {
            let abs = fx.outside_abs();
            vec![
                Layer::new()
                    .symlink("slash", "/")
                    .symlink("abs", &abs)
                    .symlink("up", "..")
                    .symlink("proc", "/proc/self/root")
                    .dir("usr/lib")
                    .symlink("lib", "usr/lib")
                    .file(&format!("{abs}/passwd"), b"shadow copy")
                    .hardlink("hl", &format!("{abs}/passwd"))
                    .tar(),
                Layer::new()
                    .file("slash/aloft-escape-probe/passwd", b"pwned")
                    .file("up/victim", b"pwned")
                    .file("lib/libc.so", b"lib")
                    .file("abs/.wh.passwd", b"")
                    .file("slash/aloft-escape-probe/kept", b"same layer")
                    .char_dev("up/dev/mem", 1, 1, Attrs::FILE)
                    .hardlink("slash/aloft-escape-probe/h2", "up/victim")
                    .symlink("abs", "/")
                    .file("abs/aloft-escape-probe/last", b"through the new symlink")
                    .file("up/.wh..wh..opq", b"")
                    .tar(),
            ]
        });
        result.unwrap();
        // The opaque marker at the (clamped) root removed the first layer's entries that this layer did
        // not rewrite; everything this layer wrote is inside.
        assert_eq!(read_inside(&fx, "aloft-escape-probe/passwd"), b"pwned");
        assert_eq!(read_inside(&fx, "victim"), b"pwned");
        assert_eq!(read_inside(&fx, "aloft-escape-probe/kept"), b"same layer");
        assert_eq!(
            read_inside(&fx, "aloft-escape-probe/last"),
            b"through the new symlink"
        );
        assert_eq!(read_inside(&fx, "usr/lib/libc.so"), b"lib");
        assert!(
            std::fs::symlink_metadata(fx.root.join("dev/mem"))
                .unwrap()
                .file_type()
                .is_char_device()
        );
        assert_eq!(
            std::fs::metadata(fx.root.join("aloft-escape-probe/h2"))
                .unwrap()
                .ino(),
            std::fs::metadata(fx.root.join("victim")).unwrap().ino()
        );
        for lower in ["hl", "proc", "slash", "up", "lib"] {
            assert!(
                std::fs::symlink_metadata(fx.root.join(lower)).is_err(),
                "{lower}: lower layer, under the opaque root"
            );
        }
        assert_eq!(
            std::fs::read_link(fx.root.join("abs")).unwrap().to_str(),
            Some("/")
        );
    }
}
