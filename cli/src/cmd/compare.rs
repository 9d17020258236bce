//! `vdisk compare`.

use clap::Args;

use crate::Ctx;

/// Arguments of `compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {}

/// Runs `compare`; returns the exit code.
pub fn run(ctx: &Ctx, _args: CompareArgs) -> i32 {
    ctx.error("compare: not implemented yet");
    1
}
