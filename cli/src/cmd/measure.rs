//! `vdisk measure`.

use clap::Args;

use crate::Ctx;

/// Arguments of `measure`.
#[derive(Debug, Args)]
pub struct MeasureArgs {}

/// Runs `measure`; returns the exit code.
pub fn run(ctx: &Ctx, _args: MeasureArgs) -> i32 {
    ctx.error("measure: not implemented yet");
    1
}
