//! `vdisk rebase`: being built; until it lands it refuses every invocation.

use clap::Args;

use crate::Ctx;

/// The long `--help` text of `rebase`.
pub const LONG_ABOUT: &str = "Change the backing file of an image.";

/// Arguments of `rebase`.
#[derive(Debug, Args)]
pub struct RebaseArgs {
    /// Everything after the sub-command name
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// Runs `rebase`; returns the exit code.
pub fn run(ctx: &Ctx, _args: RebaseArgs) -> i32 {
    ctx.usage("rebase", "this sub-command is not built yet")
}
