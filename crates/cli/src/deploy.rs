//! `aloft deploy`: the app config (`aloft.toml`, else `fly.toml`) and an image (`--image`, `[build]
//! image`, else the Dockerfile built with buildah and pushed to the platform registry) become a
//! release that aloftd executes as a durable job; the CLI follows its events until it is final.
//!
//! Exit codes: 0 when the release completes; 1 when the config is invalid, the build fails, or
//! the release is rolled back or fails (with the server's error); `--detach` returns once aloftd
//! has accepted the release. Interrupting the CLI does not stop the release: it runs in aloftd
//! (`aloft releases`, `aloft status`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aloft_api::{CreateReleaseRequest, DeployStrategy, Release, ReleaseEvent, ReleaseGroup};
use aloft_client::Client;
use aloft_config::{DiskFiles, ExpandOptions, Loaded, MountPolicy};
use clap::Args;

use crate::api::{AppArg, Subject, api_error, print_json};
use crate::build::{BuildSpec, Buildah, deployment_tag};
use crate::context::{ApiSettings, Context};
use crate::errors::UserError;
use crate::spinner::Spinner;

/// Build flags (`deploy` and `launch`).
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct BuildArgs {
    /// Deploy this image instead of building one (skips the build).
    #[arg(short = 'i', long, value_name = "IMAGE")]
    pub(crate) image: Option<String>,
    /// A build argument, K=V (repeatable; wins over [build] args).
    #[arg(long = "build-arg", value_name = "K=V", value_parser = parse_build_arg)]
    pub(crate) build_args: Vec<(String, String)>,
    /// The Dockerfile [default: [build] dockerfile, else Dockerfile next to the config].
    #[arg(long, value_name = "PATH")]
    pub(crate) dockerfile: Option<PathBuf>,
    /// Build and push the image, print its name, and deploy nothing.
    #[arg(long)]
    pub(crate) build_only: bool,
}

/// Release flags (`deploy` and `launch`).
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct ReleaseArgs {
    /// rolling, immediate, canary or bluegreen [default: [deploy] strategy, else rolling].
    #[arg(long, value_name = "STRATEGY", value_parser = parse_strategy)]
    pub(crate) strategy: Option<DeployStrategy>,
    /// Return once aloftd has accepted the release (it goes on there: aloft releases).
    #[arg(short = 'd', long)]
    pub(crate) detach: bool,
    /// How long each machine may take to start and pass its checks, e.g. 5m [default: [deploy]
    /// wait_timeout, else 5m].
    #[arg(long, value_name = "DURATION", value_parser = parse_api_duration)]
    pub(crate) wait_timeout: Option<aloft_api::Duration>,
    /// Print the release as JSON when it is accepted (--detach) or final.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `aloft deploy`.
#[derive(Debug, Args)]
pub(crate) struct DeployArgs {
    #[command(flatten)]
    app: AppArg,
    /// The config file [default: aloft.toml, else fly.toml, in the current directory].
    #[arg(short = 'c', long = "config", value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(flatten)]
    build: BuildArgs,
    #[command(flatten)]
    release: ReleaseArgs,
}

fn parse_build_arg(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("expected K=V, got {text:?}")),
    }
}

fn parse_strategy(text: &str) -> Result<DeployStrategy, String> {
    strategy_from_str(text)
        .ok_or_else(|| format!("unknown strategy {text:?}: use rolling, immediate, canary or bluegreen"))
}

fn strategy_from_str(text: &str) -> Option<DeployStrategy> {
    [
        DeployStrategy::Rolling,
        DeployStrategy::Immediate,
        DeployStrategy::Canary,
        DeployStrategy::Bluegreen,
    ]
    .into_iter()
    .find(|s| s.as_str().eq_ignore_ascii_case(text.trim()))
}

fn parse_api_duration(text: &str) -> Result<aloft_api::Duration, String> {
    text.trim()
        .parse::<aloft_api::Duration>()
        .map_err(|e| format!("{e} (e.g. 90s, 5m)"))
}

pub(crate) async fn run(ctx: &Context, args: DeployArgs) -> anyhow::Result<()> {
    let path = match &args.config {
        Some(path) => path.clone(),
        None => crate::config::resolve_in(&std::env::current_dir()?)?,
    };
    deploy(ctx, &path, args.app.app.as_deref(), &args.build, &args.release).await
}

/// Deploys the config at `path` (shared with `aloft launch`).
pub(crate) async fn deploy(
    ctx: &Context,
    path: &Path,
    app_flag: Option<&str>,
    build: &BuildArgs,
    release: &ReleaseArgs,
) -> anyhow::Result<()> {
    let loaded = crate::config::load_path(path)?;
    crate::config::print_warnings(&loaded);
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let app = crate::api::resolve_app(app_flag, &dir)?;
    // Every group must expand before anything is built (mounts, files, VM sizes).
    expand(path, &loaded, "registry/placeholder:latest")?;

    let prebuilt = build
        .image
        .clone()
        .or_else(|| loaded.config.build.as_ref().and_then(|b| b.image.clone()))
        .filter(|i| !i.trim().is_empty());
    let api = if build.build_only {
        None
    } else {
        let (client, settings) = ctx.api_client()?;
        // An unknown app fails before a build, not after.
        client
            .app_get(&app)
            .await
            .map_err(|e| api_error(e, &settings, Subject::App(&app)))?;
        Some((client, settings))
    };
    let image = match prebuilt {
        Some(image) => {
            if build.build_only {
                return Err(UserError {
                    message: "--build-only with an image to deploy: there is nothing to build".to_owned(),
                    hint: Some("drop --image (and [build] image) to build the Dockerfile".to_owned()),
                    code: 2,
                }
                .into());
            }
            image.trim().to_owned()
        }
        None => {
            let spec = build_spec(ctx, &loaded, &dir, &app, build);
            let buildah = Buildah::new(&ctx.data_dir, &ctx.registry, ctx.registry_insecure());
            tokio::task::spawn_blocking(move || buildah.build_and_push(&spec).map(|()| spec.tag)).await??
        }
    };
    if build.build_only {
        println!("{image}");
        return Ok(());
    }
    let Some((client, settings)) = api else {
        return Ok(());
    };
    let groups = expand(path, &loaded, &image)?;
    let request = release_request(&loaded, &image, groups, release);
    let created = client
        .release_create(&app, &request)
        .await
        .map_err(|e| release_api_error(e, &settings, &app))?;
    eprintln!(
        "Release v{} of app {app} created: {} ({} strategy)",
        created.version,
        created.image,
        created.strategy.as_str()
    );
    finish(&client, &settings, created, release).await
}

/// After a release is created: print it (`--detach`) or follow it to the end.
pub(crate) async fn finish(
    client: &Client,
    settings: &ApiSettings,
    created: Release,
    release: &ReleaseArgs,
) -> anyhow::Result<()> {
    if release.detach {
        if release.json {
            print_json(&created)?;
        } else {
            println!("v{}", created.version);
            eprintln!(
                "The release goes on in aloftd: aloft releases -a {} shows how it ends",
                created.app
            );
        }
        return Ok(());
    }
    let done = follow(client, settings, &created).await?;
    if release.json {
        print_json(&done)?;
    }
    outcome(&done)
}

/// The end of a final release: Ok when complete, else the server's error.
pub(crate) fn outcome(release: &Release) -> anyhow::Result<()> {
    use aloft_api::ReleaseStatus as S;
    match release.status {
        S::Complete => {
            eprintln!("Release v{} of app {} is complete", release.version, release.app);
            Ok(())
        }
        status => {
            let what = if status == S::RolledBack {
                "failed and was rolled back"
            } else {
                "failed"
            };
            Err(UserError {
                message: format!(
                    "release v{} of app {} {what}: {}",
                    release.version,
                    release.app,
                    release.error.as_deref().unwrap_or("no reason given")
                ),
                hint: Some(format!(
                    "aloft logs -a {app} shows the machines' output; aloft releases -a {app} the releases",
                    app = release.app
                )),
                code: 1,
            }
            .into())
        }
    }
}

/// Follows the release's events with a spinner until it is final; the final release.
pub(crate) async fn follow(
    client: &Client,
    settings: &ApiSettings,
    release: &Release,
) -> anyhow::Result<Release> {
    let app = release.app.clone();
    let version = release.version;
    let spinner = Spinner::start(&format!("Deploying release v{version} of app {app}"));
    let mut last_seq = 0u64;
    let mut attempts = 0u32;
    loop {
        match client.release_events(&app, version, true).await {
            Ok(mut stream) => {
                while let Ok(Some(event)) = stream.next().await {
                    if event.seq > last_seq {
                        last_seq = event.seq;
                        spinner.line(&format_event(&event));
                    }
                }
            }
            Err(e) if e.status().is_some() => {
                spinner.finish(false);
                return Err(release_api_error(e, settings, &app));
            }
            Err(_) => {}
        }
        // The stream ended: final, or the connection dropped (aloftd restarting) and the
        // release goes on; look, and follow again if need be.
        match client.release_get(&app, version).await {
            Ok(current) if current.status.is_final() => {
                spinner.finish(current.status == aloft_api::ReleaseStatus::Complete);
                return Ok(current);
            }
            Ok(_) => {}
            Err(e) if e.status().is_some() => {
                spinner.finish(false);
                return Err(release_api_error(e, settings, &app));
            }
            Err(_) => {}
        }
        attempts += 1;
        if attempts > 30 {
            spinner.finish(false);
            return Err(UserError {
                message: format!("lost track of release v{version} of app {app}: aloftd does not answer"),
                hint: Some(format!(
                    "the release goes on in aloftd; aloft releases -a {app} shows how it ends"
                )),
                code: 4,
            }
            .into());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// One event as a progress line: `TIME [LEVEL] [machine ID:] MESSAGE`.
pub(crate) fn format_event(event: &ReleaseEvent) -> String {
    // 2026-01-02T03:04:05.678Z → 03:04:05
    let time = event
        .timestamp
        .split_once('T')
        .map_or(event.timestamp.as_str(), |(_, t)| t.get(..8).unwrap_or(t));
    let level = match event.level.as_str() {
        "" | "info" => String::new(),
        other => format!("{}: ", other.to_ascii_uppercase()),
    };
    let machine = event
        .machine
        .as_deref()
        .map_or_else(String::new, |m| format!("machine {m}: "));
    format!("  {time} {level}{machine}{}", event.message)
}

/// API errors of the release endpoints: a 404 about releases means an aloftd without them.
pub(crate) fn release_api_error(
    e: aloft_client::ClientError,
    settings: &ApiSettings,
    app: &str,
) -> anyhow::Error {
    match &e {
        aloft_client::ClientError::Api {
            status: 404 | 405 | 501,
            message,
        } if !message.to_ascii_lowercase().starts_with("app") => UserError {
            message: format!("aloftd at {} does not serve releases ({e})", settings.url),
            hint: Some("upgrade aloftd: releases came with issue 5".to_owned()),
            code: 1,
        }
        .into(),
        _ => api_error(e, settings, Subject::App(app)),
    }
}

/// The build of `[build]` and the flags: Dockerfile, context (the config's directory), args, tag.
pub(crate) fn build_spec(
    ctx: &Context,
    loaded: &Loaded,
    dir: &Path,
    app: &str,
    build: &BuildArgs,
) -> BuildSpec {
    let config_build = loaded.config.build.clone().unwrap_or_default();
    let dockerfile = build
        .dockerfile
        .clone()
        .or_else(|| config_build.dockerfile.as_ref().map(|d| dir.join(d)))
        .unwrap_or_else(|| dir.join("Dockerfile"));
    let mut build_args: BTreeMap<String, String> = config_build.args.clone();
    build_args.extend(build.build_args.iter().cloned());
    BuildSpec {
        context: if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir.to_path_buf()
        },
        dockerfile,
        tag: format!("{}/{app}:{}", ctx.registry, deployment_tag()),
        build_args,
        target: config_build.build_target.clone(),
    }
}

fn expand(
    path: &Path,
    loaded: &Loaded,
    image: &str,
) -> anyhow::Result<Vec<aloft_config::ProcessGroupConfig>> {
    let files = DiskFiles::next_to(path);
    let opts = ExpandOptions {
        image: Some(image),
        // `[[mounts]]` go to aloftd described by volume name and path: the release gives each
        // machine an unattached volume of that name in its region, or a new one of
        // `initial_size`.
        mounts: MountPolicy::Describe,
        files: &files,
    };
    loaded
        .config
        .expand(&opts)
        .map_err(|e| crate::config::invalid(&e))
}

/// The release for `image`: every group with the count left to aloftd, the strategy and wait of
/// the flags over `[deploy]`, the release command.
pub(crate) fn release_request(
    loaded: &Loaded,
    image: &str,
    groups: Vec<aloft_config::ProcessGroupConfig>,
    release: &ReleaseArgs,
) -> CreateReleaseRequest {
    let deploy = loaded.config.deploy.clone().unwrap_or_default();
    let strategy = release
        .strategy
        .or_else(|| deploy.strategy.as_deref().and_then(strategy_from_str))
        .unwrap_or_default();
    // The API takes a count; a fraction (< 1, fly.toml's default 0.33) is left to aloftd.
    let max_unavailable = deploy
        .max_unavailable
        .filter(|m| *m >= 1.0)
        .and_then(|m| format!("{:.0}", m.floor()).parse::<u32>().ok());
    let wait_timeout = release.wait_timeout.or(deploy.wait_timeout);
    let mut metadata = BTreeMap::from([(
        "aloft_cli_version".to_owned(),
        env!("CARGO_PKG_VERSION").to_owned(),
    )]);
    if let Ok(user) = std::env::var("USER")
        && !user.is_empty()
    {
        metadata.insert("local_user".to_owned(), user);
    }
    CreateReleaseRequest {
        image: Some(image.to_owned()),
        groups: groups
            .into_iter()
            .map(|g| ReleaseGroup {
                group: g.group,
                config: g.config,
                count: None,
            })
            .collect(),
        strategy,
        max_unavailable,
        wait_timeout,
        release_command: loaded.config.release_command_config(Some(image)),
        metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(text: &str) -> Loaded {
        aloft_config::parse(text, Path::new("/nonexistent/aloft.toml")).unwrap()
    }

    #[test]
    fn the_release_request_follows_the_config_and_the_flags() {
        let l = loaded(
            "app = 'web'\n[processes]\nweb = 'serve'\nworker = 'work'\n\
             [deploy]\nstrategy = 'immediate'\nmax_unavailable = 2\nwait_timeout = '90s'\n\
             release_command = 'migrate'\n[http_service]\ninternal_port = 3000\nprocesses = ['web']\n",
        );
        let groups = expand(Path::new("/nonexistent/aloft.toml"), &l, "r/web:1").unwrap();
        let req = release_request(&l, "r/web:1", groups, &ReleaseArgs::default());
        assert_eq!(req.strategy, DeployStrategy::Immediate);
        assert_eq!(req.max_unavailable, Some(2));
        assert_eq!(req.wait_timeout.unwrap().0, Duration::from_secs(90));
        let names: Vec<&str> = req.groups.iter().map(|g| g.group.as_str()).collect();
        assert_eq!(names, ["web", "worker"]);
        assert!(req.groups.iter().all(|g| g.count.is_none()));
        assert_eq!(req.groups[0].config.image.as_deref(), Some("r/web:1"));
        assert_eq!(req.groups[0].config.services[0].internal_port, Some(3000));
        assert!(req.groups[1].config.services.is_empty());
        let rc = req.release_command.unwrap();
        assert_eq!(rc.init.unwrap().cmd, ["migrate"]);

        let flags = ReleaseArgs {
            strategy: Some(DeployStrategy::Canary),
            wait_timeout: Some("2m".parse().unwrap()),
            ..ReleaseArgs::default()
        };
        let l = loaded("app = 'web'\n[deploy]\nmax_unavailable = 0.5\n");
        let groups = expand(Path::new("/nonexistent/aloft.toml"), &l, "r/web:1").unwrap();
        let req = release_request(&l, "r/web:1", groups, &flags);
        assert_eq!(req.strategy, DeployStrategy::Canary);
        assert_eq!(req.max_unavailable, None);
        assert_eq!(req.wait_timeout.unwrap().0, Duration::from_secs(120));
        assert!(req.release_command.is_none());
    }

    #[test]
    fn events_print_as_progress_lines() {
        let event = |level: &str, machine: Option<&str>| ReleaseEvent {
            seq: 1,
            timestamp: "2026-01-02T03:04:05.678Z".into(),
            level: level.into(),
            machine: machine.map(str::to_owned),
            message: "started".into(),
            status: aloft_api::ReleaseStatus::Running,
        };
        assert_eq!(format_event(&event("info", None)), "  03:04:05 started");
        assert_eq!(
            format_event(&event("warn", Some("3d8d413b29d089"))),
            "  03:04:05 WARN: machine 3d8d413b29d089: started"
        );
    }

    #[test]
    fn build_flags_parse() {
        assert_eq!(parse_build_arg("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(parse_build_arg("A").is_err());
        assert_eq!(parse_strategy("BlueGreen").unwrap(), DeployStrategy::Bluegreen);
        assert!(parse_strategy("fast").unwrap_err().contains("rolling"));
    }
}
