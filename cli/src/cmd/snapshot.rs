//! `vdisk snapshot`: being built; until it lands it refuses every invocation.

use clap::Args;

use crate::Ctx;

/// The long `--help` text of `snapshot`.
pub const LONG_ABOUT: &str = "List, create, apply or delete internal snapshots.";

/// Arguments of `snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Everything after the sub-command name
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// Runs `snapshot`; returns the exit code.
pub fn run(ctx: &Ctx, _args: SnapshotArgs) -> i32 {
    ctx.usage("snapshot", "this sub-command is not built yet")
}
