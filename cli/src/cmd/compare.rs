//! `vdisk compare`: do two images show the guest the same bytes?
//!
//! Exit codes are qemu-img's: 0 identical, 1 different, 2 an image could not be opened,
//! 3 block status failed, 4 a read failed.

use clap::Args;
use vdisk_blockjobs::compare::{compare, CompareError, Event, Outcome};

use super::rebase::QemuProgress;
use super::{open, print, OpenSpec};
use crate::context::Failure;
use crate::Ctx;

/// The long `--help` text of `compare`.
pub const LONG_ABOUT: &str =
    "Check if two images have the same guest-visible contents, whatever their \
                  formats. An unallocated range equals zeroes, and when the sizes differ the \
                  tail of the larger image must read as zeroes; --strict also requires equal \
                  sizes and equal allocation.\n\n\
                  Exit status: 0 identical, 1 different, 2 cannot open an image, 3 cannot read \
                  allocation status, 4 cannot read data.\n\n\
                  Example: vdisk compare -f raw -F raw a.raw b.raw";

/// Arguments of `compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Format of FILENAME1 (default: probed)
    #[arg(
        short = 'f',
        long = "a-format",
        visible_alias = "left-format",
        value_name = "FMT"
    )]
    pub a_format: Option<String>,
    /// Format of FILENAME2 (default: probed)
    #[arg(
        short = 'F',
        long = "b-format",
        visible_alias = "right-format",
        value_name = "FMT"
    )]
    pub b_format: Option<String>,
    /// Strict mode: sizes and allocation must match too
    #[arg(short = 's', long = "strict")]
    pub strict: bool,
    /// Cache mode for reading the images (writeback, none, writethrough, directsync, unsafe)
    #[arg(short = 'T', long = "cache", value_name = "CACHE_MODE")]
    pub cache: Option<String>,
    /// Name the image by options instead of a file name: driver=FMT,file.filename=PATH and
    /// driver options (e.g. disk=N to pick a disk of an OVA appliance)
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Open the images in shared mode, even while another process uses them
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet: print only errors
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// The two images to compare
    #[arg(value_name = "FILENAME1 FILENAME2")]
    pub files: Vec<String>,
    /// Define a secret: `secret,id=ID,data=TEXT` or `secret,id=ID,file=PATH`
    /// (`format=base64` decodes it); options name it by id (`key-secret=ID`)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
}

/// Runs `compare`; returns the exit code.
pub fn run(ctx: &Ctx, args: CompareArgs) -> i32 {
    let _secrets = match crate::object::define_all(&args.object) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    let [name_a, name_b] = args.files.as_slice() else {
        return ctx.usage("compare", "Expecting two image file names");
    };
    // qemu-img compare prints when the percentage moved by more than two points.
    let progress = QemuProgress::new(args.progress && !args.quiet, 2.0);
    let code = compare_files(ctx, &args, name_a, name_b, &progress);
    progress.end();
    code
}

fn compare_files<'a>(
    ctx: &Ctx,
    args: &'a CompareArgs,
    name_a: &str,
    name_b: &str,
    progress: &QemuProgress,
) -> i32 {
    let say = |text: &str| {
        if !args.quiet {
            print(&format!("{text}\n"));
        }
    };
    let spec = |format: Option<&'a str>| OpenSpec {
        format,
        force_share: args.force_share,
        image_opts: args.image_opts,
        cache: args.cache.as_deref(),
        ..OpenSpec::default()
    };
    let a = match open(name_a, &spec(args.a_format.as_deref())) {
        Ok(d) => d,
        Err(f) => {
            ctx.fail(&f);
            return 2;
        }
    };
    let b = match open(name_b, &spec(args.b_format.as_deref())) {
        Ok(d) => d,
        Err(f) => {
            ctx.fail(&f);
            return 2;
        }
    };
    progress.print(0.0, 100.0);
    let mut events = |event: Event| match event {
        Event::Progress { chunk, total } => {
            progress.print((chunk as f32 / total as f32) * 100.0, 100.0)
        }
        Event::TailStart => say("Warning: Image size mismatch!"),
    };
    let names = [name_a, name_b];
    match compare(&a, &b, args.strict, &mut events) {
        Ok(result) => match result.outcome {
            Outcome::Identical => {
                say("Images are identical.");
                0
            }
            Outcome::ContentMismatch(at) => {
                say(&format!("Content mismatch at offset {at}!"));
                1
            }
            Outcome::SizeMismatch => {
                say("Strict mode: Image size mismatch!");
                1
            }
            Outcome::StatusMismatch(at) => {
                say(&format!("Strict mode: Offset {at} block status mismatch!"));
                1
            }
        },
        Err(e) => {
            let code = e.exit_code();
            let failure = match &e {
                CompareError::Status(which, err) => Failure::new(
                    format!("Sector allocation test failed for {}", names[*which]),
                    format!(
                        "compare: cannot read the allocation status of '{}': {err}",
                        names[*which]
                    ),
                ),
                CompareError::Read(which, offset, err) => Failure::new(
                    format!(
                        "Error while reading offset {offset} of {}: {}",
                        names[*which],
                        crate::context::qemu_read_error(err)
                    ),
                    format!(
                        "compare: cannot read '{}' at offset {offset}: {err}",
                        names[*which]
                    ),
                ),
            };
            ctx.fail(&failure);
            code
        }
    }
}
