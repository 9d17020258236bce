//! `vdisk convert`.

use clap::Args;

use crate::Ctx;

/// Arguments of `convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {}

/// Runs `convert`; returns the exit code.
pub fn run(ctx: &Ctx, _args: ConvertArgs) -> i32 {
    ctx.error("convert: not implemented yet");
    1
}
