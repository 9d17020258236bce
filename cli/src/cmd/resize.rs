//! `vdisk resize`: being built; until it lands it refuses every invocation.

use clap::Args;

use crate::Ctx;

/// The long `--help` text of `resize`.
pub const LONG_ABOUT: &str = "Change the virtual size of an image.";

/// Arguments of `resize`.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// Everything after the sub-command name
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// Runs `resize`; returns the exit code.
pub fn run(ctx: &Ctx, _args: ResizeArgs) -> i32 {
    ctx.usage("resize", "this sub-command is not built yet")
}
