//! `vdisk check`.

use clap::Args;

use crate::Ctx;

/// Arguments of `check`.
#[derive(Debug, Args)]
pub struct CheckArgs {}

/// Runs `check`; returns the exit code.
pub fn run(ctx: &Ctx, _args: CheckArgs) -> i32 {
    ctx.error("check: not implemented yet");
    1
}
