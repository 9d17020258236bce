//! `vdisk map`.

use clap::Args;

use crate::Ctx;

/// Arguments of `map`.
#[derive(Debug, Args)]
pub struct MapArgs {}

/// Runs `map`; returns the exit code.
pub fn run(ctx: &Ctx, _args: MapArgs) -> i32 {
    ctx.error("map: not implemented yet");
    1
}
