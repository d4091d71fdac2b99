//! `aloft launch`: a new app from the current directory (a Dockerfile) or an image: writes
//! `aloft.toml`, creates the app, and deploys it unless `--no-deploy`.
//!
//! The config is flyctl's launch defaults, except `force_https = false` (aloft's edge may have no
//! certificate yet): `[http_service]` on the port of the Dockerfile's first `EXPOSE` (8080 without
//! one, `--port` wins), machines stopped when idle and started on demand, none kept running,
//! `[[vm]] size = "shared-cpu-1x"`. The app is created before the file is written, so a taken
//! name leaves nothing behind.
//!
//! Where an aloft.toml or fly.toml is already there (an app moving from Fly), launch uses it as
//! it is, as flyctl offers to: it creates the app the file names (or `--name`, which must agree
//! with it) and deploys that config; `--port` and `--region` are not applied to it. `--yes`
//! replaces the file with a new one instead.

use std::collections::BTreeMap;
use std::path::Path;

use aloft_api::CreateAppRequest;
use clap::Args;

use crate::api::{Subject, api_error};
use crate::apps::DEFAULT_ORG;
use crate::context::Context;
use crate::deploy::{BuildArgs, ReleaseArgs};
use crate::errors::UserError;

/// aloftd's region when the API does not say (`aloftd --region`'s default).
const DEFAULT_REGION: &str = "local";

/// `aloft launch`.
#[derive(Debug, Args)]
pub(crate) struct LaunchArgs {
    /// The app's name [default: the directory's name].
    #[arg(short = 'n', long, value_name = "APP")]
    name: Option<String>,
    /// The organization that owns it.
    #[arg(short = 'o', long, value_name = "SLUG", default_value = DEFAULT_ORG)]
    org: String,
    /// primary_region [default: aloftd's region].
    #[arg(short = 'r', long, value_name = "REGION")]
    region: Option<String>,
    /// The port the app listens on [default: the Dockerfile's first EXPOSE, else 8080].
    #[arg(long, visible_alias = "internal-port", value_name = "PORT")]
    port: Option<u16>,
    /// Write the config and create the app, deploy nothing.
    #[arg(long)]
    no_deploy: bool,
    /// Replace an existing aloft.toml/fly.toml with a new one (without it, launch uses that
    /// config).
    #[arg(short = 'y', long)]
    yes: bool,
    #[command(flatten)]
    build: BuildArgs,
    #[command(flatten)]
    release: ReleaseArgs,
}

/// What the generated config says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LaunchPlan {
    pub(crate) app: String,
    pub(crate) region: String,
    /// `[build] image`, else `[build] dockerfile`.
    pub(crate) image: Option<String>,
    pub(crate) dockerfile: Option<String>,
    pub(crate) port: u16,
}

pub(crate) async fn run(ctx: &Context, args: LaunchArgs) -> anyhow::Result<()> {
    let dir = std::env::current_dir()?;
    let existing: Vec<&str> = aloft_config::CONFIG_NAMES
        .iter()
        .copied()
        .filter(|n| dir.join(n).is_file())
        .collect();
    if let Some(name) = existing.first()
        && !args.yes
    {
        return launch_existing(ctx, &args, &dir.join(name)).await;
    }
    let dockerfile_name = args
        .build
        .dockerfile
        .as_ref()
        .map_or_else(|| "Dockerfile".to_owned(), |d| d.display().to_string());
    let dockerfile_text = std::fs::read_to_string(dir.join(&dockerfile_name)).ok();
    if args.build.image.is_none() && dockerfile_text.is_none() {
        return Err(UserError {
            message: format!(
                "there is no {dockerfile_name} in {} and no --image",
                dir.display()
            ),
            hint: Some(
                "add a Dockerfile, or launch an existing image: aloft launch --image IMAGE".to_owned(),
            ),
            code: 1,
        }
        .into());
    }
    let app = match &args.name {
        Some(name) => name.trim().to_owned(),
        None => app_name_from_dir(&dir).ok_or_else(|| UserError {
            message: format!(
                "no app name can be made from the directory name {}",
                dir.display()
            ),
            hint: Some("pass one with --name APP".to_owned()),
            code: 1,
        })?,
    };
    let (client, settings) = ctx.api_client()?;
    let region = match &args.region {
        Some(r) => r.clone(),
        None => client
            .nearest_region()
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| DEFAULT_REGION.to_owned()),
    };
    let plan = LaunchPlan {
        app: app.clone(),
        region,
        image: args.build.image.clone(),
        dockerfile: args.build.image.is_none().then(|| dockerfile_name.clone()),
        port: args
            .port
            .or_else(|| dockerfile_text.as_deref().and_then(exposed_port))
            .unwrap_or(aloft_config::DEFAULT_INTERNAL_PORT),
    };
    let text = config_text(&plan);
    // Never write a config aloft can't read.
    aloft_config::parse(&text, &dir.join("aloft.toml"))
        .map_err(|e| anyhow::anyhow!("the generated aloft.toml does not parse (a bug): {e}"))?;

    create_app(&client, &settings, &app, &args.org).await?;
    let path = dir.join("aloft.toml");
    std::fs::write(&path, &text).map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
    eprintln!(
        "Wrote {} (port {}, region {})",
        path.display(),
        plan.port,
        plan.region
    );
    let mut build = args.build.clone();
    if build.image.is_none() {
        build.dockerfile = Some(dir.join(&dockerfile_name));
    }
    deploy_launched(ctx, &args, &path, &app, &build).await
}

/// The last step of a launch, the app created and its config in place at `path`: the deploy,
/// unless `--no-deploy`.
async fn deploy_launched(
    ctx: &Context,
    args: &LaunchArgs,
    path: &Path,
    app: &str,
    build: &BuildArgs,
) -> anyhow::Result<()> {
    if args.no_deploy {
        println!("App {app} is ready: aloft deploy deploys it");
        return Ok(());
    }
    crate::deploy::deploy(ctx, path, Some(app), build, &args.release)
        .await
        .map_err(|e| deploy_failed_after_launch(e, app))
}

/// Creates app `app` in `org`; a taken name is said as such.
async fn create_app(
    client: &aloft_client::Client,
    settings: &crate::context::ApiSettings,
    app: &str,
    org: &str,
) -> anyhow::Result<()> {
    let request = CreateAppRequest {
        name: app.to_owned(),
        org_slug: org.to_owned(),
        ..CreateAppRequest::default()
    };
    client.app_create(&request).await.map_err(|e| match &e {
        aloft_client::ClientError::Api {
            status: 409 | 422,
            message,
        } => UserError {
            message: format!("the app name {app} is taken ({message})"),
            hint: Some("choose another with --name APP".to_owned()),
            code: 1,
        }
        .into(),
        _ => api_error(e, settings, Subject::None),
    })?;
    eprintln!("Created app {app} in organization {org}");
    Ok(())
}

/// `aloft launch` next to an existing aloft.toml or fly.toml at `path`: the app it names (or
/// `--name`) is created and that config deployed, the file left as it is.
async fn launch_existing(ctx: &Context, args: &LaunchArgs, path: &Path) -> anyhow::Result<()> {
    let loaded = crate::config::load_path(path)?;
    crate::config::print_warnings(&loaded);
    let named = loaded
        .config
        .app
        .as_deref()
        .map(str::trim)
        .filter(|a| !a.is_empty());
    let app = match (args.name.as_deref().map(str::trim), named) {
        (Some(flag), Some(file)) if flag != file => {
            return Err(UserError {
                message: format!("{} is for app {file}, not {flag}", path.display()),
                hint: Some(format!(
                    "drop --name to launch {file}, or change app in {} first",
                    path.display()
                )),
                code: 1,
            }
            .into());
        }
        (Some(name), _) | (None, Some(name)) => name.to_owned(),
        (None, None) => {
            return Err(UserError {
                message: format!("{} names no app", path.display()),
                hint: Some("add app = \"NAME\" to it, or pass --name APP".to_owned()),
                code: 1,
            }
            .into());
        }
    };
    eprintln!(
        "Using the existing {} (aloft launch --yes writes a new one instead)",
        path.display()
    );
    if args.port.is_some() || args.region.is_some() {
        eprintln!("note: --port and --region are not applied to an existing config");
    }
    let (client, settings) = ctx.api_client()?;
    create_app(&client, &settings, &app, &args.org).await?;
    deploy_launched(ctx, args, path, &app, &args.build).await
}

/// A deploy that failed once the app was created and aloft.toml written: launching again would
/// find both, so the way on is `aloft deploy`, which the error's hint now says.
fn deploy_failed_after_launch(e: anyhow::Error, app: &str) -> anyhow::Error {
    let next = format!(
        "app {app} exists and its config is in place: `aloft deploy` tries again (not `aloft launch`)"
    );
    if e.is::<crate::errors::SilentExit>() {
        // The failure is on the screen already.
        eprintln!("hint: {next}");
        return e;
    }
    let (message, hint, code) = crate::errors::describe(&e);
    UserError {
        message,
        hint: Some(hint.map_or_else(|| next.clone(), |h| format!("{h}\n{next}"))),
        code,
    }
    .into()
}

/// A valid app name from a directory name: lowercase letters, digits and hyphens, at most 63.
pub(crate) fn app_name_from_dir(dir: &Path) -> Option<String> {
    let name = dir.file_name()?.to_string_lossy().to_ascii_lowercase();
    let mut out = String::new();
    for c in name.chars() {
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(c);
    }
    let out: String = out.chars().take(63).collect();
    let out = out.trim_end_matches('-').to_owned();
    (!out.is_empty()).then_some(out)
}

/// The aloft.toml of `plan`.
pub(crate) fn config_text(plan: &LaunchPlan) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let build = match (&plan.image, &plan.dockerfile) {
        (Some(image), _) => format!("  image = {}\n", q(image)),
        (None, Some(dockerfile)) => format!("  dockerfile = {}\n", q(dockerfile)),
        (None, None) => String::new(),
    };
    format!(
        "# aloft.toml for app {app}, written by `aloft launch` (fly.toml's format: docs/config.md).\n\
         app = {app}\n\
         primary_region = {region}\n\
         \n\
         [build]\n\
         {build}\
         \n\
         [http_service]\n\
         \x20 internal_port = {port}\n\
         \x20 force_https = false\n\
         \x20 auto_stop_machines = \"stop\"\n\
         \x20 auto_start_machines = true\n\
         \x20 min_machines_running = 0\n\
         \x20 processes = [\"app\"]\n\
         \n\
         [[vm]]\n\
         \x20 size = \"shared-cpu-1x\"\n",
        app = q(&plan.app),
        region = q(&plan.region),
        port = plan.port,
    )
}

/// The first TCP port the final stage of a Dockerfile EXPOSEs: instructions are case-insensitive,
/// lines continue with the escape character (`\`, or the one of an `# escape=` directive),
/// comments are skipped, `$VAR`/`${VAR}`/`${VAR:-default}` take ARG and ENV defaults, and each
/// FROM starts a new stage.
pub(crate) fn exposed_port(dockerfile: &str) -> Option<u16> {
    let mut escape = '\\';
    let mut directives = true;
    let mut logical = Vec::new();
    let mut current = String::new();
    for raw in dockerfile.lines() {
        let line = raw.trim();
        if directives {
            if let Some(rest) = line.strip_prefix('#')
                && let Some((k, v)) = rest.split_once('=')
            {
                if k.trim().eq_ignore_ascii_case("escape") {
                    escape = v.trim().chars().next().unwrap_or('\\');
                }
                continue;
            }
            directives = false;
        }
        if line.starts_with('#') || (line.is_empty() && !current.is_empty()) {
            continue;
        }
        if let Some(body) = line.strip_suffix(escape) {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        if !current.trim().is_empty() {
            logical.push(std::mem::take(&mut current));
        }
        current.clear();
    }
    if !current.trim().is_empty() {
        logical.push(current);
    }

    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut port = None;
    for line in logical {
        let (instr, rest) = line
            .trim()
            .split_once(char::is_whitespace)
            .unwrap_or((line.trim(), ""));
        let rest = rest.trim();
        match instr.to_ascii_uppercase().as_str() {
            "FROM" => port = None,
            "ARG" | "ENV" => {
                for word in rest.split_whitespace() {
                    if let Some((k, v)) = word.split_once('=') {
                        vars.insert(k.to_owned(), substitute(v.trim_matches('"'), &vars));
                    }
                }
                // `ENV KEY value` (the legacy form).
                if !rest.contains('=')
                    && let Some((k, v)) = rest.split_once(char::is_whitespace)
                {
                    vars.insert(k.to_owned(), v.trim().trim_matches('"').to_owned());
                }
            }
            "EXPOSE" if port.is_none() => {
                port = substitute(rest, &vars).split_whitespace().find_map(|spec| {
                    let (p, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
                    // A range exposes its first port.
                    let p = p.split('-').next().unwrap_or(p);
                    (proto.eq_ignore_ascii_case("tcp"))
                        .then(|| p.parse::<u16>().ok())
                        .flatten()
                        .filter(|p| *p > 0)
                });
            }
            _ => {}
        }
    }
    port
}

/// `$VAR`, `${VAR}` and `${VAR:-default}` from `vars`; unknown variables are empty.
fn substitute(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let braced = chars.peek() == Some(&'{');
        if braced {
            chars.next();
        }
        let mut name = String::new();
        let mut default = None;
        while let Some(&n) = chars.peek() {
            if braced {
                chars.next();
                if n == '}' {
                    break;
                }
                if n == ':' && default.is_none() {
                    default = Some(String::new());
                    if chars.peek() == Some(&'-') {
                        chars.next();
                    }
                    continue;
                }
                match &mut default {
                    Some(d) => d.push(n),
                    None => name.push(n),
                }
            } else if n.is_ascii_alphanumeric() || n == '_' {
                name.push(n);
                chars.next();
            } else {
                break;
            }
        }
        match vars.get(&name).filter(|v| !v.is_empty()) {
            Some(v) => out.push_str(v),
            None => out.push_str(default.as_deref().unwrap_or("")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expose_takes_the_first_tcp_port_of_the_final_stage() {
        assert_eq!(exposed_port("FROM x\nEXPOSE 8080/tcp 9090\n"), Some(8080));
        assert_eq!(exposed_port("FROM x\nexpose 53/udp 3000\n"), Some(3000));
        assert_eq!(exposed_port("FROM x\nRUN true\n"), None);
        assert_eq!(
            exposed_port("FROM b AS build\nEXPOSE 1111\nFROM x\nEXPOSE 2222\n"),
            Some(2222)
        );
        assert_eq!(exposed_port("FROM b AS build\nEXPOSE 1111\nFROM x\n"), None);
        assert_eq!(exposed_port("FROM x\nEXPOSE 4000-4010\n"), Some(4000));
    }

    #[test]
    fn expose_reads_args_comments_and_continuations() {
        let text = "# syntax=docker/dockerfile:1\n\
                    ARG PORT=5000\n\
                    FROM x\n\
                    # EXPOSE 1\n\
                    RUN echo a \\\n  && echo b\n\
                    EXPOSE \\\n    # a comment inside\n    ${PORT}/tcp \\\n    9090\n";
        assert_eq!(exposed_port(text), Some(5000));
        assert_eq!(exposed_port("FROM x\nENV PORT 7000\nEXPOSE $PORT\n"), Some(7000));
        assert_eq!(exposed_port("FROM x\nEXPOSE ${NOPE:-6000}\n"), Some(6000));
        assert_eq!(exposed_port("# escape=`\nFROM x\nEXPOSE `\n  4444\n"), Some(4444));
    }

    #[test]
    fn app_names_come_from_the_directory() {
        assert_eq!(
            app_name_from_dir(Path::new("/src/My App_2")).as_deref(),
            Some("my-app-2")
        );
        assert_eq!(app_name_from_dir(Path::new("/src/__")), None);
        assert_eq!(app_name_from_dir(Path::new("/")), None);
    }

    #[test]
    fn the_generated_config_parses_and_round_trips() {
        let plan = LaunchPlan {
            app: "web".into(),
            region: "local".into(),
            image: None,
            dockerfile: Some("Dockerfile".into()),
            port: 3000,
        };
        let text = config_text(&plan);
        let loaded = aloft_config::parse(&text, Path::new("aloft.toml")).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let c = &loaded.config;
        assert_eq!(c.app.as_deref(), Some("web"));
        assert_eq!(c.primary_region.as_deref(), Some("local"));
        assert_eq!(
            c.build.as_ref().unwrap().dockerfile.as_deref(),
            Some("Dockerfile")
        );
        let http = c.http_service.as_ref().unwrap();
        assert_eq!(http.internal_port, 3000);
        assert_eq!(http.force_https, Some(false));
        assert_eq!(http.min_machines_running, Some(0));
        assert_eq!(c.vm[0].size.as_deref(), Some("shared-cpu-1x"));
        // Normalised and parsed again: the same config.
        let again = aloft_config::parse(&c.to_toml().unwrap(), Path::new("aloft.toml")).unwrap();
        assert_eq!(again.config.to_toml().unwrap(), c.to_toml().unwrap());
        // It expands into a machine config on the port.
        let files = aloft_config::DiskFiles::next_to(Path::new("aloft.toml"));
        let groups = c
            .expand(&aloft_config::ExpandOptions {
                image: Some("r/web:1"),
                mounts: aloft_config::MountPolicy::Describe,
                files: &files,
            })
            .unwrap();
        assert_eq!(groups[0].config.services[0].internal_port, Some(3000));

        let with_image = LaunchPlan {
            image: Some("registry.example/x:1 \"q\"".into()),
            dockerfile: None,
            ..plan
        };
        let loaded = aloft_config::parse(&config_text(&with_image), Path::new("aloft.toml")).unwrap();
        assert_eq!(
            loaded.config.build.unwrap().image.as_deref(),
            Some("registry.example/x:1 \"q\"")
        );
    }
}
