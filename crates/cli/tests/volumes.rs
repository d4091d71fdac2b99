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
