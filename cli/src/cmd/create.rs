//! `vdisk create`.

use clap::Args;

use crate::Ctx;

/// Arguments of `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {}

/// Runs `create`; returns the exit code.
pub fn run(ctx: &Ctx, _args: CreateArgs) -> i32 {
    ctx.error("create: not implemented yet");
    1
}
