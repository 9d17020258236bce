//! `vdisk info`.

use clap::Args;

use crate::Ctx;

/// Arguments of `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {}

/// Runs `info`; returns the exit code.
pub fn run(ctx: &Ctx, _args: InfoArgs) -> i32 {
    ctx.error("info: not implemented yet");
    1
}
