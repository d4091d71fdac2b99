//! Building a Dockerfile into the platform's registry with buildah (`aloft deploy`, `aloft
//! launch`): `buildah bud`, then `buildah push`, buildah's output streamed to stderr as progress.
//!
//! Decisions:
//! - **Local builds only** (flyctl's `--local-only`); isolated builder machines come later.
//! - **Storage**: buildah's own under the aloft data directory (`<data dir>/buildah/storage`,
//!   run state in `<data dir>/buildah/run`), with the **vfs** driver and **chroot** isolation:
//!   works as root in containers and VMs where overlay mounts and user namespaces may not, leaves
//!   nothing mounted, and never touches the host's `/var/lib/containers`. vfs copies layers, so
//!   large images build slower; `$ALOFT_BUILDAH_DRIVER=overlay` picks overlay where it works.
//! - **Registries**: a `registries.conf` of aloft's own makes the platform registry the one
//!   unqualified names (`FROM busybox`) resolve to, as everywhere in aloft, and marks it plain
//!   HTTP when it is on loopback or `--insecure-registry` says so; other registries keep TLS.
//!   buildah runs with `HOME=<data dir>/buildah/home` and finds it as that home's per-user
//!   `.config/containers/registries.conf`: only then does it skip the host's
//!   `/etc/containers/registries.conf.d`, whose short-name aliases (Debian's `shortnames.conf`
//!   maps `busybox` to Docker Hub) would otherwise win over the search registry
//!   (`$CONTAINERS_REGISTRIES_CONF` and `--registries-conf-dir` leave that directory read).
//!   Credentials for other registries: `$REGISTRY_AUTH_FILE`, else the user's
//!   `~/.docker/config.json` when there is one, else buildah's default for root
//!   (`$XDG_RUNTIME_DIR/containers/auth.json`).
//! - **Tags**: `<registry>/<app>:deployment-<ULID>` (flyctl's `deployment-<ULID>`).
//!
//! buildah is `$ALOFT_BUILDAH` or `buildah` on `PATH` (`scripts/setup.sh` installs Debian's).

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

use crate::errors::UserError;

/// Lines of a failing step's output the error repeats.
const FAILED_STEP_LINES: usize = 40;

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BuildSpec {
    /// The build context directory.
    pub(crate) context: PathBuf,
    /// The Dockerfile (`-f`).
    pub(crate) dockerfile: PathBuf,
    /// The image reference to tag and push.
    pub(crate) tag: String,
    /// `--build-arg K=V`.
    pub(crate) build_args: BTreeMap<String, String>,
    /// A multi-stage target (`[build] build-target`).
    pub(crate) target: Option<String>,
}

/// How buildah is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Buildah {
    /// The binary.
    pub(crate) bin: PathBuf,
    /// `--root`.
    pub(crate) root: PathBuf,
    /// `--runroot`.
    pub(crate) runroot: PathBuf,
    /// `--storage-driver`.
    pub(crate) driver: String,
    /// The `HOME` it runs with.
    pub(crate) home: PathBuf,
    /// The registries.conf written for it (per-user, under `home`).
    pub(crate) registries_conf: PathBuf,
    /// The platform registry (`HOST:PORT`).
    pub(crate) registry: String,
    /// Whether the platform registry speaks plain HTTP.
    pub(crate) insecure: bool,
}

impl Buildah {
    /// buildah with its storage under `data_dir/buildah`, pushing to `registry`.
    pub(crate) fn new(data_dir: &Path, registry: &str, insecure: bool) -> Self {
        let dir = data_dir.join("buildah");
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Self {
            bin: env("ALOFT_BUILDAH").map_or_else(|| PathBuf::from("buildah"), PathBuf::from),
            root: dir.join("storage"),
            runroot: dir.join("run"),
            driver: env("ALOFT_BUILDAH_DRIVER").unwrap_or_else(|| "vfs".to_owned()),
            registries_conf: dir.join("home/.config/containers/registries.conf"),
            home: dir.join("home"),
            registry: registry.to_owned(),
            insecure,
        }
    }

    /// The options every buildah command gets (before the subcommand).
    fn global_args(&self) -> Vec<OsString> {
        vec![
            "--root".into(),
            self.root.clone().into_os_string(),
            "--runroot".into(),
            self.runroot.clone().into_os_string(),
            "--storage-driver".into(),
            self.driver.clone().into(),
        ]
    }

    /// `buildah … bud …` for `spec`.
    pub(crate) fn bud_args(&self, spec: &BuildSpec) -> Vec<OsString> {
        let mut args = self.global_args();
        args.extend(
            ["bud", "--isolation", "chroot", "--layers=false", "-f"]
                .iter()
                .map(OsString::from),
        );
        args.push(spec.dockerfile.clone().into_os_string());
        args.extend(["-t".into(), OsString::from(&spec.tag)]);
        for (k, v) in &spec.build_args {
            args.extend(["--build-arg".into(), OsString::from(format!("{k}={v}"))]);
        }
        if let Some(target) = &spec.target {
            args.extend(["--target".into(), OsString::from(target)]);
        }
        args.push(spec.context.clone().into_os_string());
        args
    }

    /// `buildah … push …` of `tag` to its registry.
    pub(crate) fn push_args(&self, tag: &str) -> Vec<OsString> {
        let mut args = self.global_args();
        args.push("push".into());
        if self.insecure {
            args.push("--tls-verify=false".into());
        }
        args.extend([OsString::from(tag), OsString::from(format!("docker://{tag}"))]);
        args
    }

    /// The registries.conf: unqualified names resolve to the platform registry, which is plain
    /// HTTP when `insecure`.
    pub(crate) fn registries_conf_text(&self) -> String {
        let quoted = toml::Value::String(self.registry.clone()).to_string();
        format!(
            "# Written by aloft for its builds: names without a registry resolve to the platform's.\n\
             unqualified-search-registries = [{quoted}]\n\
             short-name-mode = \"permissive\"\n\n\
             [[registry]]\n\
             location = {quoted}\n\
             insecure = {}\n",
            self.insecure
        )
    }

    /// Builds `spec` and pushes it, streaming buildah's output to stderr. A failing step is an
    /// error naming the step with its output.
    pub(crate) fn build_and_push(&self, spec: &BuildSpec) -> anyhow::Result<()> {
        let conf_dir = self.registries_conf.parent().unwrap_or(&self.home);
        for dir in [&self.root, &self.runroot, conf_dir] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("create buildah's directory {}", dir.display()))?;
        }
        std::fs::write(&self.registries_conf, self.registries_conf_text())
            .with_context(|| format!("write {}", self.registries_conf.display()))?;
        if !spec.dockerfile.is_file() {
            return Err(UserError {
                message: format!("there is no Dockerfile at {}", spec.dockerfile.display()),
                hint: Some("pass --dockerfile PATH, set [build] dockerfile, or deploy an existing image with --image".to_owned()),
                code: 1,
            }
            .into());
        }
        eprintln!("==> Building image {} with buildah", spec.tag);
        self.run("build", &self.bud_args(spec))?;
        eprintln!("==> Pushing image {}", spec.tag);
        self.run("push", &self.push_args(&spec.tag))?;
        eprintln!("--> Pushed {}", spec.tag);
        Ok(())
    }

    /// Runs buildah with `args`, each output line on stderr as it comes; a failure is a
    /// [`UserError`] with the failing step and its output.
    fn run(&self, what: &str, args: &[OsString]) -> anyhow::Result<()> {
        let mut command = Command::new(&self.bin);
        command
            .args(args)
            .env("HOME", &self.home)
            .env_remove("CONTAINERS_REGISTRIES_CONF")
            .env("BUILDAH_ISOLATION", "chroot");
        if let Some(auth) = docker_auth_file() {
            command.env("REGISTRY_AUTH_FILE", auth);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| -> anyhow::Error {
                if e.kind() == std::io::ErrorKind::NotFound {
                    UserError {
                        message: format!("buildah is not installed ({} not found)", self.bin.display()),
                        hint: Some(
                            "run scripts/setup.sh (or apt-get install buildah), or deploy a built image with --image"
                                .to_owned(),
                        ),
                        code: 1,
                    }
                    .into()
                } else {
                    anyhow::Error::new(e).context(format!("run {}", self.bin.display()))
                }
            })?;
        let (tx, rx) = mpsc::channel::<String>();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(forward(out, tx.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(forward(err, tx.clone()));
        }
        drop(tx);
        let mut log = StepLog::default();
        for line in rx {
            eprintln!("    {line}");
            log.push(line);
        }
        for reader in readers {
            let _ = reader.join();
        }
        let status = child.wait().context("wait for buildah")?;
        if status.success() {
            return Ok(());
        }
        Err(UserError {
            message: log.failure(what, &status.to_string()),
            hint: Some(if what == "build" {
                "fix the Dockerfile step above; the running release is untouched".to_owned()
            } else {
                format!(
                    "is the registry {} running and reachable? (aloftd runs one; scripts/registry.sh start otherwise)",
                    self.registry
                )
            }),
            code: 1,
        }
        .into())
    }
}

/// Sends each line of `reader` on `tx` (a thread per pipe, so neither fills up).
fn forward(
    reader: impl std::io::Read + Send + 'static,
    tx: mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    })
}

/// The current `STEP n/m: …` line and the output since it.
#[derive(Debug, Default)]
pub(crate) struct StepLog {
    step: Option<String>,
    output: VecDeque<String>,
    /// buildah's own `Error: …` line.
    error: Option<String>,
}

impl StepLog {
    pub(crate) fn push(&mut self, line: String) {
        if line.starts_with("STEP ") {
            self.step = Some(line);
            self.output.clear();
        } else if let Some(error) = line
            .strip_prefix("Error: ")
            .or_else(|| line.strip_prefix("error: "))
        {
            self.error = Some(error.to_owned());
        } else {
            if self.output.len() == FAILED_STEP_LINES {
                self.output.pop_front();
            }
            self.output.push_back(line);
        }
    }

    /// The message of a failed `what` (build or push).
    pub(crate) fn failure(&self, what: &str, status: &str) -> String {
        let mut message = match (&self.step, what) {
            (Some(step), "build") => format!("the image build failed at {step}"),
            _ => format!("buildah {what} failed ({status})"),
        };
        if let Some(error) = &self.error {
            message.push_str(&format!("\n{error}"));
        }
        let output: Vec<&str> = self
            .output
            .iter()
            .map(String::as_str)
            .filter(|l| !l.trim().is_empty() && !l.starts_with("subprocess exited"))
            .collect();
        if !output.is_empty() {
            message.push_str("\noutput of the step:\n");
            for line in output {
                message.push_str(&format!("  {line}\n"));
            }
            message.truncate(message.trim_end().len());
        }
        message
    }
}

/// The user's `~/.docker/config.json` when there is one and `$REGISTRY_AUTH_FILE` is not set:
/// buildah runs with a `HOME` of aloft's and would not find it there.
fn docker_auth_file() -> Option<PathBuf> {
    if std::env::var_os("REGISTRY_AUTH_FILE").is_some_and(|v| !v.is_empty()) {
        return None;
    }
    let file = PathBuf::from(std::env::var_os("HOME")?).join(".docker/config.json");
    file.is_file().then_some(file)
}

/// `deployment-<ULID>`: flyctl's tag for a deploy's image.
pub(crate) fn deployment_tag() -> String {
    static ULIDS: aloft_api::UlidGenerator = aloft_api::UlidGenerator::new();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
    let random =
        (u128::from(now.subsec_nanos()) << 32) ^ u128::from(std::process::id()) ^ (u128::from(ms) << 64);
    format!("deployment-{}", ULIDS.next(ms, random))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buildah() -> Buildah {
        Buildah::new(Path::new("/data"), "127.0.0.1:5000", true)
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn the_build_command_line() {
        let spec = BuildSpec {
            context: PathBuf::from("/src"),
            dockerfile: PathBuf::from("/src/Dockerfile.prod"),
            tag: "127.0.0.1:5000/web:deployment-01".into(),
            build_args: BTreeMap::from([("A".into(), "1".into()), ("B".into(), "x y".into())]),
            target: Some("final".into()),
        };
        let b = Buildah {
            bin: "buildah".into(),
            driver: "vfs".into(),
            ..buildah()
        };
        assert_eq!(
            strings(&b.bud_args(&spec)).join(" "),
            "--root /data/buildah/storage --runroot /data/buildah/run --storage-driver vfs \
             bud --isolation chroot --layers=false -f /src/Dockerfile.prod \
             -t 127.0.0.1:5000/web:deployment-01 --build-arg A=1 --build-arg B=x y --target final /src"
        );
        assert_eq!(
            strings(&b.push_args("127.0.0.1:5000/web:1"))[6..],
            [
                "push",
                "--tls-verify=false",
                "127.0.0.1:5000/web:1",
                "docker://127.0.0.1:5000/web:1"
            ]
        );
        let secure = Buildah {
            insecure: false,
            ..b.clone()
        };
        assert!(!strings(&secure.push_args("r/web:1")).contains(&"--tls-verify=false".to_owned()));
    }

    #[test]
    fn registries_conf_makes_the_platform_registry_the_default() {
        let text = buildah().registries_conf_text();
        let conf: toml::Table = text.parse().unwrap();
        assert_eq!(
            conf["unqualified-search-registries"][0].as_str(),
            Some("127.0.0.1:5000")
        );
        assert_eq!(conf["registry"][0]["location"].as_str(), Some("127.0.0.1:5000"));
        assert_eq!(conf["registry"][0]["insecure"].as_bool(), Some(true));
    }

    #[test]
    fn a_failed_step_is_named_with_its_output() {
        let mut log = StepLog::default();
        for line in [
            "STEP 1/2: FROM 127.0.0.1:5000/busybox:latest",
            "Trying to pull ...",
            "STEP 2/2: RUN echo failing; exit 3",
            "failing",
            "subprocess exited with status 3",
            "Error: building at STEP \"RUN echo failing; exit 3\": exit status 3",
        ] {
            log.push(line.to_owned());
        }
        assert_eq!(
            log.failure("build", "exit status: 3"),
            "the image build failed at STEP 2/2: RUN echo failing; exit 3\n\
             building at STEP \"RUN echo failing; exit 3\": exit status 3\n\
             output of the step:\n  failing"
        );
        assert_eq!(
            StepLog::default().failure("push", "exit status: 1"),
            "buildah push failed (exit status: 1)"
        );
    }

    #[test]
    fn deployment_tags_are_ulids_in_order() {
        let (a, b) = (deployment_tag(), deployment_tag());
        assert_eq!(a.len(), "deployment-".len() + 26, "{a}");
        assert!(a < b, "{a} {b}");
    }
}
