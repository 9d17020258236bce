//! `vdisk checksum`: being built; until it lands it refuses every invocation.

use clap::Args;

use crate::Ctx;

/// The long `--help` text of `checksum`.
pub const LONG_ABOUT: &str = "Print the digest of an image's guest-visible contents.";

/// Arguments of `checksum`.
#[derive(Debug, Args)]
pub struct ChecksumArgs {
    /// Everything after the sub-command name
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// Runs `checksum`; returns the exit code.
pub fn run(ctx: &Ctx, _args: ChecksumArgs) -> i32 {
    ctx.usage("checksum", "this sub-command is not built yet")
}
