//! The `vdisk` command-line front end: argument parsing, output and exit codes.
//!
//! No format logic lives here: commands open images through `vdisk_blockjobs` and talk to them
//! through `vdisk_block::BlockDev`. Output and exit codes follow qemu-img 10 so scripts can
//! swap the binary; under the name `qemu-img` (drop-in mode) messages use qemu-img's wording.

pub mod cmd;
pub mod context;
pub mod getopt;
pub mod object;
pub mod output;
pub mod progress;
pub mod stdout;

use clap::{Parser, Subcommand};

pub use context::Ctx;

/// vdisk: create, inspect, convert and compare virtual-disk images (a drop-in for qemu-img).
#[derive(Debug, Parser)]
// qemu-img parses with getopt: a repeated option overrides the earlier one (`-f raw -f qcow2`
// is qcow2, `-q -q` is quiet), so scripts that build command lines by appending keep working.
// Options that qemu accumulates (`-o`, `--object`) are `Append` arguments and still collect.
#[command(
    name = "vdisk",
    version,
    about,
    long_about = None,
    disable_help_subcommand = true,
    args_override_self = true,
    infer_long_args = true
)]
pub struct Cli {
    /// The sub-command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new disk image.
    #[command(long_about = cmd::create::LONG_ABOUT)]
    Create(cmd::create::CreateArgs),
    /// Show facts about an image.
    #[command(long_about = cmd::info::LONG_ABOUT)]
    Info(cmd::info::InfoArgs),
    /// Check an image's metadata for consistency.
    #[command(long_about = cmd::check::LONG_ABOUT)]
    Check(cmd::check::CheckArgs),
    /// Convert (copy) one image into another, possibly of another format.
    Convert(cmd::convert::ConvertArgs),
    /// Compare the guest-visible contents of two images.
    #[command(long_about = cmd::compare::LONG_ABOUT)]
    Compare(cmd::compare::CompareArgs),
    /// Show how an image's guest offsets map to host storage.
    #[command(long_about = cmd::map::LONG_ABOUT)]
    Map(cmd::map::MapArgs),
    /// Calculate the file size needed to create or convert an image.
    #[command(long_about = cmd::measure::LONG_ABOUT)]
    Measure(cmd::measure::MeasureArgs),
    /// List, create, apply or delete internal snapshots of an image.
    #[command(long_about = cmd::snapshot::LONG_ABOUT)]
    Snapshot(cmd::snapshot::SnapshotArgs),
    /// Grow or shrink the virtual size of an image.
    #[command(long_about = cmd::resize::LONG_ABOUT)]
    Resize(cmd::resize::ResizeArgs),
    /// Change format-specific options of an existing image.
    #[command(long_about = cmd::amend::LONG_ABOUT)]
    Amend(cmd::amend::AmendArgs),
    /// Change the backing file of an image, copying what differs (or not, with -u).
    #[command(long_about = cmd::rebase::LONG_ABOUT)]
    Rebase(cmd::rebase::RebaseArgs),
    /// Print the digest of an image's guest-visible contents, independent of format.
    #[command(long_about = cmd::checksum::LONG_ABOUT)]
    Checksum(cmd::checksum::ChecksumArgs),
    /// Commit the changes of an image into its backing file (or a deeper base with -b).
    #[command(long_about = cmd::commit::LONG_ABOUT)]
    Commit(cmd::commit::CommitArgs),
    /// Copy an image block by block into a new image (if=, of=, bs=, count=, skip=).
    #[command(long_about = cmd::dd::LONG_ABOUT)]
    Dd(cmd::dd::DdArgs),
    /// Run a simple read or write benchmark on an image.
    #[command(long_about = cmd::bench::LONG_ABOUT)]
    Bench(cmd::bench::BenchArgs),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps.
    #[command(long_about = cmd::bitmap::LONG_ABOUT)]
    Bitmap(cmd::bitmap::BitmapArgs),
}

/// Runs the command line `args` (including the program name) and returns the exit code.
pub fn run<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    let ctx = Ctx::from_argv0(args.first().map(|a| a.as_os_str()));
    if ctx.dropin {
        stdout::buffer_like_qemu_img();
    }
    // What is held back leaves at the end, whichever way the command ends.
    let _flush_at_exit = FlushAtExit;
    // Under qemu-img's name an abbreviated long option means what it means to qemu-img,
    // whatever long options vdisk adds.
    let args = match (ctx.dropin, args.get(1).and_then(|a| a.to_str())) {
        (true, Some(cmd)) => match getopt::expand_long_options(cmd, &args[2..]) {
            Ok(rest) => args[..2].iter().cloned().chain(rest).collect(),
            Err(getopt::GetoptError(message)) => {
                eprintln!("{} {cmd}: {message}", ctx.argv0);
                eprintln!("Try '{} {cmd} --help' for more info", ctx.argv0);
                return 1;
            }
        },
        _ => args,
    };
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            let cmd = args.get(1).map(|a| a.to_string_lossy().into_owned());
            let last = args.last().map(|a| a.to_string_lossy().into_owned());
            return ctx.clap_error(e, cmd.as_deref(), last.as_deref());
        }
    };
    match cli.command {
        Command::Create(a) => cmd::create::run(&ctx, a),
        Command::Info(a) => cmd::info::run(&ctx, a),
        Command::Check(a) => cmd::check::run(&ctx, a),
        Command::Convert(a) => cmd::convert::run(&ctx, a),
        Command::Compare(a) => cmd::compare::run(&ctx, a),
        Command::Map(a) => cmd::map::run(&ctx, a),
        Command::Measure(a) => cmd::measure::run(&ctx, a),
        Command::Snapshot(a) => cmd::snapshot::run(&ctx, a),
        Command::Resize(a) => cmd::resize::run(&ctx, a),
        Command::Amend(a) => cmd::amend::run(&ctx, a),
        Command::Rebase(a) => cmd::rebase::run(&ctx, a),
        Command::Checksum(a) => cmd::checksum::run(&ctx, a),
        Command::Commit(a) => cmd::commit::run(&ctx, a),
        Command::Dd(a) => cmd::dd::run(&ctx, a),
        Command::Bench(a) => cmd::bench::run(&ctx, a),
        Command::Bitmap(a) => cmd::bitmap::run(&ctx, a),
    }
}

/// Sends held stdout when dropped, as the C library does at exit.
struct FlushAtExit;

impl Drop for FlushAtExit {
    fn drop(&mut self) {
        stdout::flush();
    }
}
