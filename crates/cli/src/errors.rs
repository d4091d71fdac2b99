//! Turning errors into what a user reads, and exit codes.
//!
//! Exit codes: 1 any failure, 2 bad usage (clap), 3 the image, app, machine or local record does
//! not exist, 4 the registry or aloftd cannot be reached; `aloft machine exec` and `aloft ssh
//! console` exit with their command's code.

use std::fmt;
use std::process::ExitCode;

use aloft_image::RegistryError;
use aloft_image::bootstrap::BootstrapError;

/// Exit code for "no such image".
pub(crate) const EXIT_NOT_FOUND: u8 = 3;
/// Exit code for "registry unreachable".
pub(crate) const EXIT_UNREACHABLE: u8 = 4;

/// An error a command detected itself, with what to do about it.
#[derive(Debug)]
pub(crate) struct UserError {
    pub(crate) message: String,
    pub(crate) hint: Option<String>,
    pub(crate) code: u8,
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UserError {}

/// Ends the command with `code` and nothing more said (what it had to say is printed): `aloft
/// machine exec` and `aloft ssh console` passing on their command's exit code.
#[derive(Debug)]
pub(crate) struct SilentExit(pub(crate) u8);

impl fmt::Display for SilentExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for SilentExit {}

/// Prints `error` (with its causes and a hint) on stderr and picks the exit code.
pub(crate) fn report(error: &anyhow::Error) -> ExitCode {
    if let Some(SilentExit(code)) = error.downcast_ref::<SilentExit>() {
        return ExitCode::from(*code);
    }
    let (message, hint, code) = describe(error);
    eprintln!("error: {message}");
    if let Some(hint) = hint {
        eprintln!("hint: {hint}");
    }
    ExitCode::from(code)
}

/// The message (with causes), hint and exit code for `error`.
pub(crate) fn describe(error: &anyhow::Error) -> (String, Option<String>, u8) {
    if let Some(user) = error.downcast_ref::<UserError>() {
        return (user.message.clone(), user.hint.clone(), user.code);
    }
    let registry_error = error.chain().find_map(|e| e.downcast_ref::<RegistryError>());
    match registry_error {
        Some(RegistryError::Unreachable { registry, source, .. }) => {
            let cause = root_cause(source);
            let hint = if is_loopback(registry) {
                "is it running? scripts/registry.sh start"
            } else {
                "check the address, your network, and --insecure-registry for plain-HTTP registries"
            };
            (
                format!("registry {registry} is not reachable ({hint}): {cause}"),
                None,
                EXIT_UNREACHABLE,
            )
        }
        Some(e @ RegistryError::NotFound { .. }) => (
            e.to_string(),
            Some("aloft images bootstrap builds busybox and debian:bookworm into the registry".into()),
            EXIT_NOT_FOUND,
        ),
        _ => {
            let hint = error
                .chain()
                .find_map(|e| match e.downcast_ref::<BootstrapError>() {
                    Some(BootstrapError::NeedsRoot { .. }) => {
                        Some("aloft images bootstrap busybox works without root".to_owned())
                    }
                    _ => None,
                });
            (chain(error), hint, 1)
        }
    }
}

/// `top: cause: cause`, each message once.
fn chain(error: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for e in error.chain() {
        let text = e.to_string();
        if text.is_empty() || last.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        last = text;
    }
    out
}

/// The innermost message (for a connection failure: "Connection refused (os error 111)").
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut e = error;
    while let Some(next) = e.source() {
        e = next;
    }
    e.to_string()
}

pub(crate) fn is_loopback(registry: &str) -> bool {
    let host = registry
        .strip_prefix('[')
        .and_then(|r| r.split_once(']').map(|(h, _)| h))
        .unwrap_or_else(|| registry.rsplit_once(':').map_or(registry, |(h, _)| h));
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_recognised() {
        for r in [
            "127.0.0.1:5000",
            "localhost:5000",
            "localhost",
            "[::1]:5000",
            "127.0.0.2",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in ["registry.example.com:5000", "10.0.0.1:5000", "[fd00::1]:5000"] {
            assert!(!is_loopback(r), "{r}");
        }
    }

    #[test]
    fn user_errors_keep_their_code_and_hint() {
        let e = anyhow::Error::new(UserError {
            message: "image not found locally: x".into(),
            hint: Some("aloft images list".into()),
            code: EXIT_NOT_FOUND,
        });
        let (message, hint, code) = describe(&e);
        assert_eq!(message, "image not found locally: x");
        assert_eq!(hint.as_deref(), Some("aloft images list"));
        assert_eq!(code, EXIT_NOT_FOUND);
    }

    #[test]
    fn causes_are_chained_once() {
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(describe(&e), ("outer: inner".to_owned(), None, 1));
    }
}
