//! `aloft volumes …`, `aloft machine run --volume` and deploys with `[[mounts]]` end to end: the
//! real `aloftd` with the in-memory machine driver (`--driver fake --network none`: machines start
//! and stop at once, volumes are records of the fake host, no root needed) on a free port with a
//! temporary data directory and config home, and the real `aloft` reading the config aloftd
//! wrote. Nothing outside the temporary directory is read or written.
//!
//! `aloftd` is taken from `$ALOFTD_BIN`, else from the target directory next to this test's
//! executable (`target/debug/aloftd`): build it first (`cargo build -p aloftd`).

mod common;

#[cfg(test)]
mod tests {

    use serde_json::Value;

    use crate::common::{FakeAloftd as Env, stderr, stdout};

    impl Env {
        /// `aloft machine run -a web -v SPEC busybox`, which must fail with `code`: its stderr.
        fn run_fails(&self, spec: &str, code: i32) -> String {
            self.fails(
                &["machine", "run", "-a", "web", "--yes", "-v", spec, "busybox"],
                code,
            )
        }

        /// The app's volumes (`--all`) as JSON objects.
        fn volumes(&self, app: &str) -> Vec<Value> {
            self.json(&["volumes", "list", "-a", app, "--all", "--json"])
                .as_array()
                .unwrap()
                .clone()
        }
    }

    fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
        v[key].as_str().unwrap_or_else(|| panic!("no {key} in {v}"))
    }

    #[test]
    fn create_list_show_extend_update_destroy() {
        let env = Env::start();
        env.ok(&["apps", "create", "web"]);

        // create --json: the API's object, not encrypted, 1 GB by default.
        let first = env.json(&["volumes", "create", "data", "-a", "web", "--json"]);
        let id = str_of(&first, "id").to_owned();
        assert!(id.starts_with("vol_"), "{first}");
        assert_eq!(first["name"], "data");
        assert_eq!(first["state"], "created");
        assert_eq!(first["size_gb"], 1);
        assert_eq!(first["encrypted"], false);

        // --count: flyctl's block for each, with the app and the size.
        let out = env.ok(&[
            "vol", "create", "data", "-a", "web", "--size", "2", "--count", "2",
        ]);
        let ids: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("                  ID: "))
            .collect();
        assert_eq!(ids.len(), 2, "{out}");
        assert!(ids.iter().all(|i| i.starts_with("vol_") && *i != id), "{out}");
        assert_eq!(out.matches("             Size GB: 2\n").count(), 2, "{out}");
        assert_eq!(out.matches("                 App: web\n").count(), 2, "{out}");
        assert_eq!(out.matches("           Encrypted: false\n").count(), 2, "{out}");

        // list: flyctl's columns, one row per volume, oldest first.
        let table = env.ok(&["volumes", "list", "-a", "web"]);
        let lines: Vec<&str> = table.lines().collect();
        let header: Vec<&str> = lines[0]
            .split("   ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(
            header,
            [
                "ID",
                "STATE",
                "NAME",
                "SIZE",
                "REGION",
                "ZONE",
                "ENCRYPTED",
                "ATTACHED VM",
                "CREATED AT"
            ],
            "{table}"
        );
        assert_eq!(lines.len(), 4, "{table}");
        for line in &lines[1..] {
            let cells: Vec<&str> = line.split_whitespace().collect();
            let size = if cells[0] == id {
                "1GB"
            } else {
                assert!(ids.contains(&cells[0]), "{table}");
                "2GB"
            };
            assert_eq!(&cells[1..4], ["created", "data", size], "{table}");
            assert_eq!(cells[6], "false", "{table}");
            assert_eq!(cells[7], "-", "not attached: {table}");
        }
        let listed = env.json(&["vol", "ls", "-a", "web", "--json"]);
        let listed = listed.as_array().unwrap();
        assert_eq!(listed.len(), 3);
        let mine = listed.iter().find(|v| v["id"] == first["id"]).unwrap();
        assert_eq!(mine["size_gb"], 1);
        assert_eq!(mine["name"], "data");

        // show: the block, with the machine that mounts it (none).
        let shown = env.ok(&["volumes", "show", &id, "-a", "web"]);
        assert!(
            shown.starts_with(&format!("                  ID: {id}\n")),
            "{shown}"
        );
        assert!(shown.contains("                Name: data\n"), "{shown}");
        assert!(shown.contains("         Attached VM: -\n"), "{shown}");
        assert_eq!(
            env.json(&["volumes", "show", &id, "-a", "web", "--json"])["id"],
            id.as_str()
        );

        // extend: grows; an unattached volume needs no restart; never shrinks (the server says).
        let out = env.ok(&["volumes", "extend", &id, "--size", "3", "-a", "web"]);
        assert!(out.contains("             Size GB: 3\n"), "{out}");
        assert!(!out.contains("restart"), "{out}");
        let answer = env.json(&["volumes", "extend", &id, "-s", "4", "-a", "web", "--json"]);
        assert_eq!(answer["volume"]["size_gb"], 4, "{answer}");
        assert_eq!(answer["needs_restart"], false, "{answer}");
        let err = env.fails(&["volumes", "extend", &id, "--size", "2", "-a", "web"], 1);
        assert!(err.contains("can only grow"), "{err}");
        assert_eq!(
            env.json(&["volumes", "show", &id, "-a", "web", "--json"])["size_gb"],
            4
        );

        // update: the snapshot settings.
        let updated = env.json(&[
            "volumes",
            "update",
            &id,
            "-a",
            "web",
            "--snapshot-retention",
            "7",
            "--scheduled-snapshots=false",
            "--json",
        ]);
        assert_eq!(updated["snapshot_retention"], 7, "{updated}");
        assert_eq!(updated["auto_backup_enabled"], false, "{updated}");
        let out = env.ok(&["volumes", "update", &id, "-a", "web", "--scheduled-snapshots"]);
        assert!(out.contains(" Scheduled snapshots: true\n"), "{out}");
        assert!(out.contains("  Snapshot retention: 7\n"), "{out}");
        let err = env.fails(&["volumes", "update", &id, "-a", "web"], 2);
        assert!(err.contains("nothing to update"), "{err}");

        // destroy: without a terminal it needs --yes, and nothing is destroyed.
        let err = env.fails(&["volumes", "destroy", &id, "-a", "web"], 1);
        assert!(
            err.contains(&format!("not destroying volume {id} without confirmation")),
            "{err}"
        );
        assert!(err.contains("--yes"), "{err}");
        assert_eq!(env.volumes("web").len(), 3);
        // An unknown volume fails before anything is destroyed.
        let err = env.fails(
            &[
                "volumes",
                "destroy",
                &id,
                "vol_0000000000000000",
                "-a",
                "web",
                "--yes",
            ],
            3,
        );
        assert!(
            err.contains("volume vol_0000000000000000 not found in app web"),
            "{err}"
        );
        assert_eq!(env.volumes("web").len(), 3);

        let mut all = vec![id.as_str()];
        all.extend(ids.iter().copied());
        let mut args = vec!["volumes", "destroy"];
        args.extend(all.iter().copied());
        args.extend(["-a", "web", "--yes"]);
        let out = env.ok(&args);
        for v in &all {
            assert!(
                out.contains(&format!("Destroyed volume ID: {v} name: data\n")),
                "{out}"
            );
        }
        let live: Vec<Value> = env
            .volumes("web")
            .into_iter()
            .filter(|v| v["state"] != "destroyed")
            .collect();
        assert!(live.is_empty(), "{live:?}");
        assert_eq!(env.ok(&["volumes", "list", "-a", "web"]).lines().count(), 1);
        let err = env.fails(&["volumes", "show", &id, "-a", "web"], 3);
        assert!(
            err.contains(&format!("volume {id} not found in app web")),
            "{err}"
        );
        assert!(err.contains("aloft volumes list -a web"), "{err}");

        // An unknown app says so.
        let err = env.fails(&["volumes", "list", "-a", "nope"], 3);
        assert!(err.contains("app nope not found"), "{err}");
    }

    #[test]
    fn a_volume_mounted_by_a_machine_is_not_destroyed() {
        let env = Env::start();
        env.ok(&["apps", "create", "web"]);
        let volume = env.json(&["volumes", "create", "pg_data", "-a", "web", "--json"]);
        let vol = str_of(&volume, "id").to_owned();

        // Neither an id nor a name: refused before anything is sent.
        let err = env.run_fails("Pg-Data:/data", 2);
        assert!(err.contains("\"Pg-Data\" is neither a volume id"), "{err}");
        assert!(err.contains("aloft volumes list"), "{err}");
        // A name with no unattached volume of it: refused, saying how to make one.
        let err = env.run_fails("other:/data", 1);
        assert!(err.contains("no unattached volume named other"), "{err}");
        assert!(err.contains("aloft volumes create other -a web"), "{err}");
        let machines = env.json(&["machine", "list", "-a", "web", "--json"]);
        assert_eq!(machines.as_array().unwrap().len(), 0, "{machines}");

        // machine run --volume ID:/PATH mounts it; aloftd fills in its name and size.
        let mount = format!("{vol}:/data");
        let machine = env.json(&[
            "machine", "run", "-a", "web", "--yes", "--json", "--volume", &mount, "busybox", "sleep", "inf",
        ]);
        let mid = str_of(&machine, "id").to_owned();
        assert_eq!(machine["state"], "started", "{machine}");
        let mounts = &machine["config"]["mounts"];
        assert_eq!(mounts[0]["volume"], vol.as_str(), "{machine}");
        assert_eq!(mounts[0]["path"], "/data", "{machine}");
        assert_eq!(mounts[0]["name"], "pg_data", "{machine}");
        assert_eq!(mounts.as_array().unwrap().len(), 1, "{machine}");

        // The volume shows the machine: list, table and show.
        let listed = env.volumes("web");
        assert_eq!(listed[0]["attached_machine_id"], mid.as_str(), "{listed:?}");
        let table = env.ok(&["volumes", "list", "-a", "web"]);
        assert_eq!(
            table.lines().nth(1).unwrap().split_whitespace().nth(7),
            Some(mid.as_str()),
            "{table}"
        );
        let shown = env.ok(&["volumes", "show", &vol, "-a", "web"]);
        assert!(
            shown.contains(&format!("         Attached VM: {mid}\n")),
            "{shown}"
        );

        // Growing a mounted volume: its started machine must restart to see it.
        let out = env.ok(&["volumes", "extend", &vol, "--size", "2", "-a", "web"]);
        assert!(
            out.contains(&format!("aloft machine restart {mid} -a web")),
            "{out}"
        );

        // destroy is refused with the server's message and how to get past it.
        let out = env.aloft(&["volumes", "destroy", &vol, "-a", "web", "--yes"]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("HTTP 412"), "{err}");
        assert!(
            err.contains(&mid),
            "the server's message names the machine: {err}"
        );
        assert!(
            err.contains(&format!(
                "hint: a volume can't be destroyed while a machine mounts it: destroy machine {mid} first"
            )),
            "{err}"
        );
        assert!(!stdout(&out).contains("Destroyed"), "{}", stdout(&out));
        assert_eq!(
            env.json(&["volumes", "show", &vol, "-a", "web", "--json"])["state"],
            "created"
        );

        // Once the machine is gone, the volume is free: NAME:/PATH finds it, as flyctl does.
        env.ok(&["machine", "destroy", &mid, "-a", "web", "--force"]);
        let again = env.json(&[
            "machine",
            "run",
            "-a",
            "web",
            "--yes",
            "--json",
            "-v",
            "pg_data:/srv",
            "busybox",
            "sleep",
            "inf",
        ]);
        assert_eq!(again["config"]["mounts"][0]["volume"], vol.as_str(), "{again}");
        assert_eq!(again["config"]["mounts"][0]["path"], "/srv", "{again}");
        // Attached now, so the name finds no volume for a second machine.
        let err = env.run_fails("pg_data:/srv", 1);
        assert!(err.contains("no unattached volume named pg_data"), "{err}");

        // A clone gets no volume of its source's, unless it is given one.
        let src = str_of(&again, "id").to_owned();
        let out = env.aloft(&["machine", "clone", &src, "-a", "web", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains("--attach-volume"), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!(
                "aloft volumes fork {vol} -a web, then --attach-volume NEW_ID:/srv"
            )),
            "{}",
            stderr(&out)
        );
        let plain: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(plain["config"].get("mounts").is_none(), "{plain}");
        env.ok(&["volumes", "create", "pg_data", "-a", "web"]);
        let cloned = env.json(&[
            "machine",
            "clone",
            &src,
            "-a",
            "web",
            "--json",
            "--attach-volume",
            "pg_data:/data",
        ]);
        let spare = &cloned["config"]["mounts"][0];
        assert_eq!(spare["name"], "pg_data", "{cloned}");
        assert_ne!(
            spare["volume"],
            vol.as_str(),
            "the clone took the unattached one: {cloned}"
        );
        for id in [str_of(&plain, "id"), str_of(&cloned, "id")] {
            env.ok(&["machine", "destroy", id, "-a", "web", "--force"]);
        }

        // Once its machine is gone, the volume goes too.
        env.ok(&["machine", "destroy", str_of(&again, "id"), "-a", "web", "--force"]);
        let out = env.ok(&["volumes", "destroy", &vol, "-a", "web", "--yes"]);
        assert_eq!(out, format!("Destroyed volume ID: {vol} name: pg_data\n"));
    }

    #[test]
    fn bad_input_is_refused_with_what_to_do() {
        let env = Env::start();
        env.ok(&["apps", "create", "web"]);
        let err = env.fails(&["volumes", "create", "data", "--size", "0", "-a", "web"], 2);
        assert!(err.contains("--size"), "{err}");
        assert!(err.contains("a volume holds 1 to 500 GB"), "{err}");
        let err = env.fails(&["volumes", "create", "data", "--size", "ten", "-a", "web"], 2);
        assert!(err.contains("not a whole number of GB"), "{err}");
        let err = env.fails(&["volumes", "create", "My-Data", "-a", "web"], 2);
        assert!(err.contains("invalid volume name"), "{err}");
        let err = env.fails(
            &[
                "volumes",
                "create",
                "data",
                "--snapshot-retention",
                "90",
                "-a",
                "web",
            ],
            2,
        );
        assert!(err.contains("1 to 60 days"), "{err}");
        let err = env.fails(&["volumes", "show", "data", "-a", "web"], 2);
        assert!(err.contains("\"data\" is not a volume id"), "{err}");
        assert!(err.contains("aloft volumes list -a web shows the ids"), "{err}");
        let err = env.fails(&["volumes", "extend", "vol_0000000000000000", "-a", "web"], 2);
        assert!(err.contains("--size"), "{err}");
        // Nothing was created by any of these.
        assert!(env.volumes("web").is_empty());

        // A well-formed id the app does not have.
        let err = env.fails(
            &[
                "volumes",
                "extend",
                "vol_0000000000000000",
                "--size",
                "2",
                "-a",
                "web",
            ],
            3,
        );
        assert!(
            err.contains("volume vol_0000000000000000 not found in app web"),
            "{err}"
        );

        // --volume in machine run: the form, the path, one volume.
        for (spec, why) in [
            ("vol_0000000000000000", "expected VOLUME_ID:/PATH"),
            ("vol_0000000000000000:data", "must be absolute"),
            ("Data:/data", "is neither a volume id"),
        ] {
            let err = env.run_fails(spec, 2);
            assert!(err.contains(why), "{spec}: {err}");
        }
        let err = env.fails(
            &[
                "machine",
                "run",
                "-a",
                "web",
                "--yes",
                "-v",
                "vol_0000000000000000:/a",
                "-v",
                "vol_0000000000000001:/b",
                "busybox",
            ],
            2,
        );
        assert!(err.contains("at most one"), "{err}");
        // A well-formed id of no volume: the server refuses, nothing is created.
        let err = env.run_fails("vol_0000000000000000:/data", 1);
        assert!(err.contains("vol_0000000000000000"), "{err}");
        let machines = env.json(&["machine", "list", "-a", "web", "--json"]);
        assert_eq!(machines.as_array().unwrap().len(), 0, "{machines}");
    }

    /// The cells of a table's lines (columns are separated by three spaces or more).
    fn cells(line: &str) -> Vec<&str> {
        line.split("   ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect()
    }

    #[test]
    fn snapshots_restores_and_forks() {
        let env = Env::start();
        env.ok(&["apps", "create", "web"]);
        let volume = env.json(&["volumes", "create", "data", "-a", "web", "--size", "2", "--json"]);
        let vol = str_of(&volume, "id").to_owned();

        // None yet: flyctl's sentence, and an empty array.
        let out = env.ok(&["volumes", "snapshots", "list", &vol, "-a", "web"]);
        assert_eq!(out, format!("No snapshots available for volume {vol}\n"));
        let none = env.json(&["volumes", "snapshots", "ls", &vol, "-a", "web", "--json"]);
        assert_eq!(none, serde_json::json!([]));

        // create: one now, said in a line with its size on the host (the fake's 8 MiB).
        let out = env.ok(&["volumes", "snapshots", "create", &vol, "-a", "web"]);
        let first = out
            .strip_prefix("Snapshot ")
            .and_then(|rest| rest.strip_suffix(&format!(" of volume {vol} created (8.0 MiB)\n")))
            .unwrap_or_else(|| panic!("{out}"))
            .to_owned();
        assert!(first.starts_with("vs_"), "{out}");
        // Timestamps have whole seconds: the second is newer than the first.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let second = env.json(&["vol", "snapshot", "create", &vol, "-a", "web", "--json"]);
        let second_id = str_of(&second, "id").to_owned();
        assert!(second_id.starts_with("vs_") && second_id != first, "{second}");
        assert_eq!(second["status"], "created", "{second}");
        assert_eq!(second["retention_days"], 5, "{second}");
        assert_eq!(second["size"], 8 << 20, "{second}");
        assert_eq!(second["volume_size"], 2u64 << 30, "{second}");
        assert!(str_of(&second, "digest").starts_with("sha256:"), "{second}");

        // list: flyctl's columns, newest first, sizes as people write them.
        let table = env.ok(&["volumes", "snapshots", "list", &vol, "-a", "web"]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            cells(lines[0]),
            ["ID", "STATUS", "SIZE", "CREATED AT", "RETENTION DAYS"],
            "{table}"
        );
        assert_eq!(lines.len(), 3, "{table}");
        for (line, id) in lines[1..].iter().zip([&second_id, &first]) {
            let row = cells(line);
            assert_eq!(row[0], id.as_str(), "newest first: {table}");
            assert_eq!(&row[1..3], ["created", "8.0 MiB"], "{table}");
            assert!(row[3].ends_with('Z'), "{table}");
            assert_eq!(row[4], "5", "{table}");
        }
        let listed = env.json(&["volumes", "snapshots", "list", &vol, "-a", "web", "--json"]);
        let ids: Vec<&str> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|s| str_of(s, "id"))
            .collect();
        assert_eq!(ids, [second_id.as_str(), first.as_str()], "{listed}");
        assert_eq!(listed[0], second, "the listing shows what create answered");

        // A later retention applies to the snapshots taken after it.
        env.ok(&[
            "volumes",
            "update",
            &vol,
            "-a",
            "web",
            "--snapshot-retention",
            "9",
        ]);
        let third = env.json(&["volumes", "snapshots", "create", &vol, "-a", "web", "--json"]);
        assert_eq!(third["retention_days"], 9, "{third}");

        // Restore: a new volume of the snapshot's size, named as asked; or larger with --size.
        let restored = env.json(&[
            "volumes",
            "create",
            "restored",
            "--snapshot-id",
            &first,
            "-a",
            "web",
            "--json",
        ]);
        let restored_id = str_of(&restored, "id").to_owned();
        assert_ne!(restored_id, vol);
        assert_eq!(restored["name"], "restored", "{restored}");
        assert_eq!(restored["size_gb"], 2, "the snapshot's size: {restored}");
        assert_eq!(restored["state"], "created", "{restored}");
        assert_eq!(restored["region"], volume["region"], "{restored}");
        let out = env.ok(&[
            "volumes",
            "create",
            "bigger",
            "--snapshot-id",
            &second_id,
            "-s",
            "5",
            "-a",
            "web",
        ]);
        assert!(out.contains("                Name: bigger\n"), "{out}");
        assert!(out.contains("             Size GB: 5\n"), "{out}");
        let err = env.fails(
            &[
                "volumes",
                "create",
                "smaller",
                "--snapshot-id",
                &first,
                "-s",
                "1",
                "-a",
                "web",
            ],
            1,
        );
        assert!(err.contains("smaller than"), "{err}");

        // Fork: the source's name and size by default, a new id; --name names it.
        let fork = env.json(&["volumes", "fork", &vol, "-a", "web", "--json"]);
        let fork_id = str_of(&fork, "id").to_owned();
        assert_ne!(fork_id, vol);
        assert_eq!(fork["name"], "data", "{fork}");
        assert_eq!(fork["size_gb"], 2, "{fork}");
        assert_eq!(fork["region"], volume["region"], "{fork}");
        let out = env.ok(&["volumes", "fork", &vol, "--name", "copy", "-a", "web"]);
        assert!(out.starts_with("                  ID: vol_"), "{out}");
        assert!(!out.contains(&format!("ID: {vol}\n")), "a new volume: {out}");
        assert!(out.contains("                Name: copy\n"), "{out}");
        assert!(out.contains("             Size GB: 2\n"), "{out}");
        assert!(out.contains("                 App: web\n"), "{out}");
        let mut names: Vec<String> = env
            .volumes("web")
            .iter()
            .map(|v| str_of(v, "name").to_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["bigger", "copy", "data", "data", "restored"]);
        // A fork has no snapshots of its own.
        let out = env.ok(&["volumes", "snapshots", "list", &fork_id, "-a", "web"]);
        assert!(out.starts_with("No snapshots available"), "{out}");

        // The volume goes, its snapshots stay: listed under its id, and restored.
        env.ok(&["volumes", "destroy", &vol, "-a", "web", "--yes"]);
        let kept = env.json(&["volumes", "snapshots", "list", &vol, "-a", "web", "--json"]);
        assert_eq!(kept.as_array().unwrap().len(), 3, "{kept}");
        let again = env.json(&[
            "volumes",
            "create",
            "again",
            "--snapshot-id",
            &first,
            "-a",
            "web",
            "--json",
        ]);
        assert_eq!(again["size_gb"], 2, "{again}");
        // But no new snapshot of it is taken.
        let err = env.fails(&["volumes", "snapshots", "create", &vol, "-a", "web"], 3);
        assert!(
            err.contains(&format!("volume {vol} not found in app web")),
            "{err}"
        );
    }

    #[test]
    fn snapshot_mistakes_are_refused_with_what_to_do() {
        let env = Env::start();
        env.ok(&["apps", "create", "web"]);
        env.ok(&["apps", "create", "other"]);
        let volume = env.json(&["volumes", "create", "data", "-a", "web", "--json"]);
        let vol = str_of(&volume, "id").to_owned();
        let theirs = env.json(&["volumes", "create", "data", "-a", "other", "--json"]);
        let theirs = str_of(&theirs, "id").to_owned();
        let their_snapshot = env.json(&["volumes", "snapshots", "create", &theirs, "-a", "other", "--json"]);
        let their_snapshot = str_of(&their_snapshot, "id").to_owned();

        // Names are not ids, for the volume and for the snapshot; nothing is sent.
        for args in [
            ["volumes", "snapshots", "list", "data"],
            ["volumes", "snapshots", "create", "data"],
            ["volumes", "fork", "data", "--json"],
        ] {
            let mut args = args.to_vec();
            args.extend(["-a", "web"]);
            let err = env.fails(&args, 2);
            assert!(err.contains("\"data\" is not a volume id"), "{args:?}: {err}");
            assert!(err.contains("aloft volumes list -a web shows the ids"), "{err}");
        }
        let err = env.fails(
            &[
                "volumes",
                "create",
                "data",
                "--snapshot-id",
                "latest",
                "-a",
                "web",
            ],
            2,
        );
        assert!(err.contains("\"latest\" is not a snapshot id"), "{err}");
        assert!(
            err.contains("hint: aloft volumes snapshots list VOLUME_ID -a web"),
            "{err}"
        );
        let err = env.fails(&["volumes", "fork", &vol, "--name", "My-Copy", "-a", "web"], 2);
        assert!(err.contains("invalid volume name"), "{err}");
        let err = env.fails(&["volumes", "snapshots", "create", "-a", "web"], 2);
        assert!(err.contains("VOLUME_ID"), "{err}");

        // Unknown ones (another app's are unknown here): exit 3, what to run instead.
        for args in [
            vec!["volumes", "snapshots", "list", "vol_0000000000000000"],
            vec!["volumes", "snapshots", "create", "vol_0000000000000000"],
            vec!["volumes", "fork", "vol_0000000000000000"],
        ] {
            let mut args = args.clone();
            args.extend(["-a", "web"]);
            let err = env.fails(&args, 3);
            assert!(
                err.contains("volume vol_0000000000000000 not found in app web"),
                "{args:?}: {err}"
            );
            assert!(err.contains("aloft volumes list -a web"), "{err}");
        }
        let err = env.fails(&["volumes", "snapshots", "list", &theirs, "-a", "web"], 3);
        assert!(
            err.contains(&format!("volume {theirs} not found in app web")),
            "{err}"
        );
        for snapshot in ["vs_0000000000000000", their_snapshot.as_str()] {
            let err = env.fails(
                &[
                    "volumes",
                    "create",
                    "data",
                    "--snapshot-id",
                    snapshot,
                    "-a",
                    "web",
                ],
                3,
            );
            assert!(
                err.contains(&format!("error: snapshot {snapshot} not found in app web")),
                "{err}"
            );
            assert!(
                err.contains(
                    "hint: aloft volumes snapshots list VOLUME_ID -a web shows a volume's snapshots"
                ),
                "{err}"
            );
        }
        let err = env.fails(&["volumes", "snapshots", "list", &vol, "-a", "nope"], 3);
        assert!(err.contains("app nope not found"), "{err}");

        // A fork or a restore stays in its source's region: aloftd says so.
        let err = env.fails(
            &["volumes", "fork", &vol, "--region", "elsewhere", "-a", "web"],
            1,
        );
        assert!(err.contains("leave region out"), "{err}");
        let err = env.fails(
            &[
                "volumes",
                "create",
                "data",
                "--snapshot-id",
                &their_snapshot,
                "--region",
                "elsewhere",
                "-a",
                "other",
            ],
            1,
        );
        assert!(err.contains("leave region out"), "{err}");
        // None of these made a volume.
        assert_eq!(env.volumes("web").len(), 1);
        assert_eq!(env.volumes("other").len(), 1);
    }

    #[test]
    fn deploys_mount_volumes_by_name_and_keep_them() {
        let env = Env::start();
        std::fs::write(
            env.path("work").join("aloft.toml"),
            "app = 'web'\n\n[http_service]\ninternal_port = 8080\n\n[[mounts]]\nsource = 'data'\ndestination = '/data'\ninitial_size = '2gb'\n",
        )
        .unwrap();
        env.ok(&["apps", "create", "web"]);
        let report = env.ok(&["config", "validate"]);
        assert!(
            report.contains("volume data at /data (2 GB when created)"),
            "{report}"
        );

        // The first deploy makes a volume per machine, of initial_size, and mounts it.
        env.ok(&["deploy", "--image", "busybox:latest"]);
        let machines = env.json(&["machine", "list", "-a", "web", "--json"]);
        let machines = machines.as_array().unwrap().clone();
        assert!(!machines.is_empty());
        let volumes = env.volumes("web");
        assert_eq!(volumes.len(), machines.len(), "{volumes:?}");
        let mut mounted = Vec::new();
        for m in &machines {
            let mount = &m["config"]["mounts"][0];
            assert_eq!(mount["path"], "/data", "{m}");
            let vol = str_of(mount, "volume").to_owned();
            let v = volumes
                .iter()
                .find(|v| v["id"] == vol.as_str())
                .unwrap_or_else(|| panic!("{vol} is not among {volumes:?}"));
            assert_eq!(v["name"], "data");
            assert_eq!(v["size_gb"], 2);
            assert_eq!(v["attached_machine_id"], m["id"]);
            mounted.push(vol);
        }
        mounted.sort();

        // A second deploy keeps the machines' volumes: no new ones, the same attached.
        env.ok(&["deploy", "--image", "busybox:v2"]);
        let volumes = env.volumes("web");
        let mut ids: Vec<String> = volumes.iter().map(|v| str_of(v, "id").to_owned()).collect();
        ids.sort();
        assert_eq!(ids, mounted, "{volumes:?}");
        let machines = env.json(&["machine", "list", "-a", "web", "--json"]);
        let mut now: Vec<String> = machines
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                assert_eq!(m["config"]["image"], "busybox:v2", "{m}");
                str_of(&m["config"]["mounts"][0], "volume").to_owned()
            })
            .collect();
        now.sort();
        assert_eq!(now, mounted);
    }
}
