//! `aloft completion bash|zsh|fish|elvish|powershell`: the shell's completion script on stdout.
//!
//! ```sh
//! aloft completion bash > ~/.local/share/bash-completion/completions/aloft
//! aloft completion zsh > "${fpath[1]}/_aloft"
//! aloft completion fish > ~/.config/fish/completions/aloft.fish
//! ```

use clap::{Args, CommandFactory};
use clap_complete::Shell;

/// `aloft completion`.
#[derive(Debug, Args)]
pub(crate) struct CompletionArgs {
    /// The shell.
    #[arg(value_name = "SHELL", value_enum)]
    shell: Shell,
}

/// The completion script of `C` (the CLI) for the shell.
pub(crate) fn script<C: CommandFactory>(args: &CompletionArgs) -> Vec<u8> {
    let mut cmd = C::command();
    let name = cmd.get_name().to_owned();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, name, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    #[command(name = "tool")]
    struct Tool {
        #[command(subcommand)]
        cmd: Sub,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Sub {
        Machine,
        Completion(CompletionArgs),
    }

    #[test]
    fn scripts_name_the_subcommands() {
        for shell in ["bash", "zsh", "fish"] {
            let Sub::Completion(args) = Tool::try_parse_from(["tool", "completion", shell]).unwrap().cmd
            else {
                panic!("not completion");
            };
            let script = String::from_utf8(script::<Tool>(&args)).unwrap();
            assert!(script.contains("machine"), "{shell}: {script}");
        }
        assert!(Tool::try_parse_from(["tool", "completion", "tcsh"]).is_err());
    }
}
