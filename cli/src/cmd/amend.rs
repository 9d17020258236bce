//! `vdisk amend`: being built; until it lands it refuses every invocation.

use clap::Args;

use crate::Ctx;

/// The long `--help` text of `amend`.
pub const LONG_ABOUT: &str = "Change format-specific options of an existing image.";

/// Arguments of `amend`.
#[derive(Debug, Args)]
pub struct AmendArgs {
    /// Everything after the sub-command name
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// Runs `amend`; returns the exit code.
pub fn run(ctx: &Ctx, _args: AmendArgs) -> i32 {
    ctx.usage("amend", "this sub-command is not built yet")
}
