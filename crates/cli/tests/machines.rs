//! `aloft machine …` and `aloft logs` end to end: the real `aloftd` with the in-memory machine
//! driver (`--driver fake --network none`: machines start and stop at once, nothing runs, no root
//! needed) on a free port with a temporary data directory and config home, and the real `aloft`
//! reading the config aloftd wrote. Nothing outside the temporary directory is read or written.
//!
//! The fake driver's `exec` answers with the argv joined by spaces on stdout and exit code 0, so
//! the exec test checks what the CLI sends and prints, not a real command.
//!
//! `aloftd` is taken from `$ALOFTD_BIN`, else from the target directory next to this test's
//! executable (`target/debug/aloftd`): build it first (`cargo build -p aloftd`).

mod common;

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader};
    use std::process::{Output, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use serde_json::Value;

    use crate::common::{FakeAloftd as Env, stderr, stdout};

    impl Env {
        /// `aloft machine run … --json` in app `web`: the machine.
        fn run_machine(&self, extra: &[&str]) -> Value {
            let mut args = vec!["machine", "run", "-a", "web", "--yes", "--json"];
            args.extend_from_slice(extra);
            self.json(&args)
        }
    }

    fn ok(out: &Output) -> String {
        assert!(
            out.status.success(),
            "aloft failed ({}): {}{}",
            out.status,
            stdout(out),
            stderr(out)
        );
        stdout(out)
    }

    fn failed(out: &Output, code: i32) -> String {
        assert_eq!(
            out.status.code(),
            Some(code),
            "stdout: {}\nstderr: {}",
            stdout(out),
            stderr(out)
        );
        stderr(out)
    }

    fn state(env: &Env, id: &str) -> String {
        env.json(&["m", "status", id, "-a", "web", "--json"])["state"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn run_list_lifecycle_exec_update_clone_destroy() {
        let env = Env::start();

        // run in an app that does not exist: without a terminal it needs --yes.
        let err = failed(&env.aloft(&["machine", "run", "-a", "web", "busybox"]), 1);
        assert!(err.contains("not creating app web without confirmation"), "{err}");
        assert!(err.contains("--yes"), "{err}");

        // run: flyctl's lines, the app created, the machine started.
        let out = env.aloft(&[
            "m",
            "run",
            "-a",
            "web",
            "--yes",
            "--name",
            "one",
            "-e",
            "A=1",
            "--metadata",
            "team=core",
            "-p",
            "80:8080/tcp:http",
            "-p",
            "443:8080/tcp:http:tls",
            "busybox",
            "sleep",
            "inf",
        ]);
        let text = ok(&out);
        assert!(
            text.starts_with("Success! A machine has been successfully launched in app web\n"),
            "{text}"
        );
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix(" Machine ID: "))
            .unwrap()
            .to_owned();
        assert_eq!(id.len(), 14, "{text}");
        assert!(
            text.contains("Machine started, you can connect via the following private ip\n"),
            "{text}"
        );
        assert!(
            stderr(&out).contains("Created app web in organization personal"),
            "{}",
            stderr(&out)
        );

        // list: the API's objects with the config run sent.
        let list = env.json(&["m", "list", "-a", "web", "--json"]);
        let m = &list.as_array().unwrap()[0];
        assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
        assert_eq!(m["id"], id.as_str());
        assert_eq!(m["name"], "one");
        assert_eq!(m["state"], "started");
        let config = &m["config"];
        assert_eq!(config["image"], "busybox");
        assert_eq!(config["env"]["A"], "1");
        assert_eq!(config["metadata"]["team"], "core");
        assert_eq!(config["init"]["cmd"], serde_json::json!(["sleep", "inf"]));
        assert_eq!(config["restart"]["policy"], "always");
        assert_eq!(config["guest"]["memory_mb"], 256);
        assert_eq!(config["services"][0]["internal_port"], 8080);
        assert_eq!(
            config["services"][0]["ports"][1]["handlers"],
            serde_json::json!(["http", "tls"])
        );
        // The table and the ids.
        let table = ok(&env.aloft(&["m", "ls", "-a", "web"]));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "1 machine has been retrieved from app web.", "{table}");
        assert!(
            lines[2].starts_with("ID ") && lines[2].contains(" STATE ") && lines[2].ends_with(" SIZE"),
            "{table}"
        );
        let cells: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(cells[..4], [id.as_str(), "one", "started", "local"], "{table}");
        assert!(lines[3].ends_with(" shared-cpu-1x:256MB"), "{table}");
        assert_eq!(
            ok(&env.aloft(&["m", "list", "-a", "web", "-q"])),
            format!("{id}\n")
        );

        // The app from fly.toml in the working directory instead of -a.
        std::fs::write(env.path("work/fly.toml"), "app = 'web'\n").unwrap();
        assert_eq!(ok(&env.aloft(&["m", "list", "-q"])), format!("{id}\n"));
        std::fs::remove_file(env.path("work/fly.toml")).unwrap();
        let err = failed(&env.aloft(&["m", "list"]), 1);
        assert!(err.contains("no app given") && err.contains("-a/--app"), "{err}");

        // stop, start, restart, suspend: each waits for its state.
        assert_eq!(
            ok(&env.aloft(&["m", "stop", &id, "-a", "web"])),
            format!("{id} has been stopped\n")
        );
        assert_eq!(state(&env, &id), "stopped");
        assert_eq!(
            ok(&env.aloft(&["m", "start", &id, "-a", "web"])),
            format!("{id} has been started\n")
        );
        assert_eq!(state(&env, &id), "started");
        assert_eq!(
            ok(&env.aloft(&["m", "restart", &id, "-a", "web"])),
            format!("{id} has been restarted\n")
        );
        assert_eq!(state(&env, &id), "started");
        assert_eq!(
            ok(&env.aloft(&["m", "suspend", &id, "-a", "web"])),
            format!("{id} has been suspended\n")
        );
        assert_eq!(state(&env, &id), "suspended");
        ok(&env.aloft(&["m", "start", &id, "-a", "web"]));

        // status: details and the event log, newest first.
        let status = ok(&env.aloft(&["m", "status", &id, "-a", "web"]));
        assert!(status.starts_with(&format!("Machine ID: {id}\n")), "{status}");
        assert!(status.contains("\n  Command       = sleep inf\n"), "{status}");
        let events = status.split("Event Logs\n").nth(1).unwrap();
        assert!(events.starts_with("STATE "), "{status}");
        for event in ["launch", "stop", "suspend", "restart"] {
            assert!(events.contains(&format!(" {event} ")), "{event}: {status}");
        }

        // exec: the fake echoes the argv; --json gives the API's answer.
        assert_eq!(
            ok(&env.aloft(&["m", "exec", &id, "-a", "web", "echo 'a b'"])),
            "echo a b\n"
        );
        assert_eq!(
            ok(&env.aloft(&["m", "exec", &id, "-a", "web", "--", "ls", "-l"])),
            "ls -l\n"
        );
        let exec = env.json(&["m", "exec", &id, "-a", "web", "--json", "uname"]);
        assert_eq!(exec["exit_code"], 0);
        assert_eq!(exec["stdout"], "uname\n");

        // update: shows the diff, refuses without a terminal unless --yes, replaces the config.
        let out = env.aloft(&["m", "update", &id, "-a", "web", "-e", "B=2", "--vm-memory", "512"]);
        let err = failed(&out, 1);
        assert!(err.contains("+     \"memory_mb\": 512"), "{err}");
        assert!(err.contains("without confirmation"), "{err}");
        let updated = env.json(&[
            "m",
            "update",
            &id,
            "-a",
            "web",
            "-e",
            "B=2",
            "--vm-memory",
            "512",
            "--yes",
            "--json",
        ]);
        assert_eq!(updated["state"], "started");
        assert_eq!(updated["config"]["env"], serde_json::json!({"A": "1", "B": "2"}));
        assert_eq!(updated["config"]["guest"]["memory_mb"], 512);
        assert_eq!(
            updated["config"]["services"], config["services"],
            "untouched parts stay"
        );
        assert_ne!(updated["instance_id"], m["instance_id"]);
        let same = env.aloft(&["m", "update", &id, "-a", "web", "-e", "B=2", "--yes"]);
        assert!(stderr(&same).contains("No changes"), "{}", stderr(&same));

        // clone: the same config in a new machine.
        let clone = env.json(&["m", "clone", &id, "-a", "web", "--name", "two", "--json"]);
        let clone_id = clone["id"].as_str().unwrap().to_owned();
        assert_ne!(clone_id, id);
        assert_eq!(clone["name"], "two");
        assert_eq!(clone["state"], "started");
        assert_eq!(clone["config"]["env"]["B"], "2");
        assert_eq!(
            env.json(&["m", "list", "-a", "web", "--json"])
                .as_array()
                .unwrap()
                .len(),
            2
        );

        // cordon and uncordon.
        ok(&env.aloft(&["m", "cordon", &clone_id, "-a", "web"]));
        assert_eq!(
            env.json(&["m", "status", &clone_id, "-a", "web", "--json"])["cordoned"],
            true
        );
        ok(&env.aloft(&["m", "uncordon", &clone_id, "-a", "web"]));
        assert_ne!(
            env.json(&["m", "status", &clone_id, "-a", "web", "--json"])["cordoned"],
            true
        );

        // leases: none held.
        assert_eq!(
            env.json(&["m", "leases", "view", "-a", "web", "--json"]),
            serde_json::json!({})
        );
        assert!(ok(&env.aloft(&["m", "leases", "view", "-a", "web"])).contains("No leases"));

        // wait for a state the machine is in, and time out on one it is not.
        assert_eq!(
            ok(&env.aloft(&["m", "wait", &id, "-a", "web", "--state", "started"])),
            format!("Machine {id} is started\n")
        );
        let err = failed(
            &env.aloft(&[
                "m",
                "wait",
                &id,
                "-a",
                "web",
                "--state",
                "stopped",
                "--wait-timeout",
                "1s",
            ]),
            1,
        );
        assert!(err.contains("did not become stopped within 1s"), "{err}");

        // kill sends SIGKILL.
        assert_eq!(
            ok(&env.aloft(&["m", "kill", &clone_id, "-a", "web"])),
            format!("Sent SIGKILL to machine {clone_id}\n")
        );

        // destroy: a started machine only with --force.
        let err = failed(&env.aloft(&["m", "destroy", &id, "-a", "web"]), 1);
        assert!(err.contains("--force"), "{err}");
        assert_eq!(
            ok(&env.aloft(&["m", "destroy", &id, "-a", "web", "--force"])),
            format!("Destroyed machine {id}\n")
        );
        let left = env.json(&["m", "list", "-a", "web", "--json"]);
        assert!(
            left.as_array().unwrap().iter().all(|m| m["id"] != id.as_str()),
            "{left}"
        );
        let all = env.json(&["m", "list", "-a", "web", "--all", "--json"]);
        assert!(
            all.as_array()
                .unwrap()
                .iter()
                .any(|m| m["id"] == id.as_str() && m["state"] == "destroyed"),
            "{all}"
        );

        // Unknown machines and apps: exit code 3, named.
        let err = failed(&env.aloft(&["m", "status", "0123456789abcd", "-a", "web"]), 3);
        assert!(
            err.contains("machine 0123456789abcd not found in app web"),
            "{err}"
        );
        let err = failed(&env.aloft(&["m", "list", "-a", "nope"]), 3);
        assert!(err.contains("app nope not found"), "{err}");
        // A wrong --access-token: the server's 401 and where the token came from.
        let err = failed(
            &env.aloft(&["m", "list", "-a", "web", "--access-token", "aloft_wrong"]),
            1,
        );
        assert!(
            err.contains("HTTP 401") && err.contains("--access-token"),
            "{err}"
        );
        // Bad flags: usage errors (2) with the form to use.
        let err = failed(
            &env.aloft(&["m", "run", "-a", "web", "-p", "80/sctp", "busybox"]),
            2,
        );
        assert!(err.contains("invalid port") && err.contains("-p EDGE"), "{err}");
        let err = failed(
            &env.aloft(&["m", "run", "-a", "web", "--rm", "--restart", "always", "busybox"]),
            2,
        );
        assert!(err.contains("--rm"), "{err}");
    }

    #[test]
    fn run_rm_detach_and_restart_policies() {
        let env = Env::start();
        let m = env.run_machine(&["--rm", "--detach", "busybox", "true"]);
        assert_eq!(m["config"]["restart"]["policy"], "no");
        assert_eq!(m["config"]["auto_destroy"], true);
        let m = env.run_machine(&["--restart", "on-fail", "--vm-size", "shared-cpu-2x", "busybox"]);
        assert_eq!(m["state"], "started");
        assert_eq!(m["config"]["restart"]["policy"], "on-failure");
        assert_eq!(
            m["config"]["guest"],
            serde_json::json!({"cpu_kind": "shared", "cpus": 2, "memory_mb": 512})
        );
        let m = env.run_machine(&["--entrypoint", "/bin/sh -c", "busybox", "echo hi"]);
        assert_eq!(
            m["config"]["init"],
            serde_json::json!({"entrypoint": ["/bin/sh", "-c"], "cmd": ["echo hi"]})
        );
    }

    /// Log lines of app `web`, as the CLI prints them without following.
    fn log_lines(env: &Env, args: &[&str]) -> Vec<String> {
        let mut all = vec!["logs", "-a", "web", "--no-tail"];
        all.extend_from_slice(args);
        ok(&env.aloft(&all)).lines().map(str::to_owned).collect()
    }

    #[test]
    fn logs_print_what_is_there_and_follow_new_lines() {
        let env = Env::start();
        let id = env.run_machine(&["busybox"])["id"].as_str().unwrap().to_owned();
        ok(&env.aloft(&["m", "stop", &id, "-a", "web"]));

        // --no-tail: what there is, flyctl's format, then exit.
        let lines = log_lines(&env, &[]);
        assert!(!lines.is_empty(), "the platform logs starts and stops");
        for line in &lines {
            assert!(line.contains(&format!("[{id}] local [")), "{line}");
        }
        let json = ok(&env.aloft(&["logs", "-a", "web", "--no-tail", "--json", "--machine", &id]));
        for line in json.lines() {
            let entry: Value = serde_json::from_str(line).unwrap();
            assert_eq!(entry["instance"], id.as_str());
        }
        assert_eq!(json.lines().count(), lines.len());
        let err = failed(
            &env.aloft(&["logs", "-a", "web", "--no-tail", "--machine", "0123456789abcd"]),
            3,
        );
        assert!(
            err.contains("machine 0123456789abcd not found in app web"),
            "{err}"
        );
        let err = failed(&env.aloft(&["logs", "-a", "nope", "--no-tail"]), 3);
        assert!(err.contains("app nope not found"), "{err}");

        // Following: a line written after the command started arrives.
        let mut follow = env
            .command(&["logs", "-a", "web", "--machine", &id])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = BufReader::new(follow.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in reader.lines() {
                if tx.send(line.unwrap_or_default()).is_err() {
                    break;
                }
            }
        });
        // The existing lines come first.
        for _ in 0..lines.len() {
            rx.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        ok(&env.aloft(&["m", "start", &id, "-a", "web"]));
        let line = rx.recv_timeout(Duration::from_secs(10));
        // Only the child this test started.
        let _ = follow.kill();
        let _ = follow.wait();
        let line = line.expect("a line after the start");
        assert!(line.contains(&format!("[{id}] local [")), "{line}");
    }

    #[test]
    fn deploy_releases_status_scale_and_rollback() {
        let env = Env::start();
        std::fs::write(
            env.path("work").join("aloft.toml"),
            "app = 'web'\n[http_service]\ninternal_port = 8080\n",
        )
        .unwrap();
        ok(&env.aloft(&["apps", "create", "web"]));

        // A first deploy of a group with services: a release that completes with two machines.
        ok(&env.aloft(&["deploy", "--image", "busybox:latest"]));
        let releases = env.json(&["releases", "--json"]);
        assert_eq!(releases[0]["version"], 1);
        assert_eq!(releases[0]["status"], "complete");
        let status = env.json(&["status", "--json"]);
        let machines = env.json(&["machine", "list", "-a", "web", "--json"]);
        assert_eq!(machines.as_array().unwrap().len(), 2, "{status}");
        assert!(
            machines
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["config"]["metadata"]["fly_release_version"] == "1")
        );

        // Scaling is a release too.
        ok(&env.aloft(&["scale", "count", "3", "--yes"]));
        let machines = env.json(&["machine", "list", "-a", "web", "--json"]);
        assert_eq!(machines.as_array().unwrap().len(), 3);

        // A new image, then back.
        ok(&env.aloft(&["deploy", "--image", "busybox:v2", "--strategy", "immediate"]));
        let machines = env.json(&["machine", "list", "-a", "web", "--json"]);
        assert!(
            machines
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["config"]["image"] == "busybox:v2")
        );
        ok(&env.aloft(&["releases", "rollback"]));
        let machines = env.json(&["machine", "list", "-a", "web", "--json"]);
        assert_eq!(machines.as_array().unwrap().len(), 3);
        assert!(
            machines
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["config"]["image"] == "busybox:latest")
        );
        let releases = env.json(&["releases", "--json"]);
        assert_eq!(releases[0]["rollback_of"], 2, "{releases}");
    }

    #[test]
    fn a_deploy_goes_on_in_aloftd_when_the_cli_is_killed() {
        let env = Env::start();
        std::fs::write(
            env.path("work").join("aloft.toml"),
            "app = 'web'\n[http_service]\ninternal_port = 8080\n",
        )
        .unwrap();
        ok(&env.aloft(&["apps", "create", "web"]));
        // Many machines, replaced one at a time: the release outlasts the CLI by far.
        ok(&env.aloft(&["deploy", "--image", "busybox:latest"]));
        ok(&env.aloft(&["scale", "count", "12"]));

        let mut cli = env
            .command(&["deploy", "--image", "busybox:v2", "--strategy", "rolling"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let err = cli.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                if tx.send(line.unwrap_or_default()).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("aloft deploy printed no release version");
            if line.contains("Release v3 of app web created") {
                break;
            }
        }
        // Only the child this test started.
        let _ = cli.kill();
        let _ = cli.wait();
        let killed = Instant::now();

        // The release outlives the CLI (12 machines take aloftd far longer than this look) and
        // goes on in aloftd to the end.
        let releases = env.json(&["releases", "--json"]);
        assert_eq!(releases[0]["version"], 3, "{releases}");
        assert!(
            ["pending", "running"].contains(&releases[0]["status"].as_str().unwrap()),
            "the release was over before the CLI was killed ({:?}): {releases}",
            killed.elapsed()
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let releases = env.json(&["releases", "--json"]);
            if releases[0]["status"] == "complete" {
                break;
            }
            assert!(
                ["pending", "running"].contains(&releases[0]["status"].as_str().unwrap()),
                "{releases}"
            );
            assert!(
                Instant::now() < deadline,
                "the release never completed: {releases}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let machines = env.json(&["machine", "list", "-a", "web", "--json"]);
        let machines = machines.as_array().unwrap();
        assert_eq!(machines.len(), 12);
        assert!(
            machines
                .iter()
                .all(|m| m["config"]["metadata"]["fly_release_version"] == "3"
                    && m["config"]["image"] == "busybox:v2"
                    && m["state"] == "started"),
            "{machines:?}"
        );
    }

    #[test]
    fn launch_writes_the_config_creates_the_app_and_deploys() {
        let env = Env::start();
        let work = env.path("work");
        std::fs::write(
            work.join("Dockerfile"),
            "FROM busybox\nEXPOSE 3000/tcp 9090\nCMD [\"httpd\", \"-f\"]\n",
        )
        .unwrap();
        ok(&env.aloft(&[
            "launch",
            "--name",
            "shop",
            "--image",
            "busybox:latest",
            "--no-deploy",
        ]));
        let config = std::fs::read_to_string(work.join("aloft.toml")).unwrap();
        assert!(config.contains("app = \"shop\""), "{config}");
        assert!(
            config.contains("internal_port = 3000"),
            "the Dockerfile's first EXPOSE: {config}"
        );
        // The written config is what `aloft config validate` accepts.
        ok(&env.aloft(&["config", "validate"]));
        assert!(
            env.json(&["releases", "--json", "-a", "shop"])
                .as_array()
                .unwrap()
                .is_empty()
        );
        // The fake workload listens on 8080: say so, and deploy.
        std::fs::write(
            work.join("aloft.toml"),
            config.replace("internal_port = 3000", "internal_port = 8080"),
        )
        .unwrap();
        ok(&env.aloft(&["deploy", "--image", "busybox:latest"]));
        let releases = env.json(&["releases", "--json", "-a", "shop"]);
        assert_eq!(releases[0]["status"], "complete", "{releases}");
        let machines = env.json(&["machine", "list", "-a", "shop", "--json"]);
        assert_eq!(
            machines.as_array().unwrap().len(),
            2,
            "a service gets two machines"
        );
        // Launching again does not overwrite the config without --yes, and a taken name is refused.
        let again = env.aloft(&["launch", "--name", "shop", "--image", "busybox:latest"]);
        assert!(!again.status.success());
        let err = String::from_utf8_lossy(&again.stderr);
        assert!(
            err.contains("aloft.toml") || err.contains("taken") || err.contains("exists"),
            "{err}"
        );

        // A launch whose deploy fails (the app listens on 8080, not 3000) leaves the app and its
        // config in place, and says to go on with `aloft deploy`, not to launch again.
        let other = work.join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("Dockerfile"), "FROM busybox\nEXPOSE 3000\n").unwrap();
        let failed = env
            .command(&[
                "launch",
                "--name",
                "other",
                "--image",
                "busybox:latest",
                "--wait-timeout",
                "2s",
            ])
            .current_dir(&other)
            .output()
            .unwrap();
        assert!(!failed.status.success());
        let err = String::from_utf8_lossy(&failed.stderr);
        assert!(err.contains("8080"), "says where the app listens: {err}");
        assert!(
            err.contains("`aloft deploy` tries again (not `aloft launch`)"),
            "{err}"
        );
        assert!(other.join("aloft.toml").is_file());
    }

    #[test]
    fn launch_next_to_a_fly_toml_uses_it_as_it_is() {
        let env = Env::start();
        let work = env.path("work");
        // An app moving from Fly: its fly.toml, an image, a service on the fake workload's port.
        let fly_toml = "app = \"moved\"\nprimary_region = \"ams\"\n\n[build]\n  image = \"busybox:latest\"\n\n\
                        [http_service]\n  internal_port = 8080\n  auto_stop_machines = \"stop\"\n";
        std::fs::write(work.join("fly.toml"), fly_toml).unwrap();
        // --name must agree with the file.
        let other = env.aloft(&["launch", "--name", "elsewhere"]);
        assert!(!other.status.success());
        let err = String::from_utf8_lossy(&other.stderr);
        assert!(err.contains("is for app moved, not elsewhere"), "{err}");

        ok(&env.aloft(&["launch"]));
        let releases = env.json(&["releases", "--json", "-a", "moved"]);
        assert_eq!(releases[0]["status"], "complete", "{releases}");
        assert_eq!(
            std::fs::read_to_string(work.join("fly.toml")).unwrap(),
            fly_toml,
            "the file is left as it is"
        );
        assert!(!work.join("aloft.toml").exists());
        let machines = env.json(&["machine", "list", "-a", "moved", "--json"]);
        assert_eq!(machines.as_array().unwrap().len(), 2, "{machines}");
    }
}
