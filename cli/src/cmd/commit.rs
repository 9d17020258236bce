//! `vdisk commit`: merge the top image of a backing chain into a backing image, as
//! `qemu-img commit` of qemu 10 does offline.
//!
//! The copy is `vdisk_blockjobs::commit`; emptying the top afterwards (unless `-d` or `-b`)
//! is `vdisk_blockjobs::commit::empty`. Messages and exit codes follow qemu-img: 0 and
//! "Image committed." on success, 1 on every failure.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use vdisk_block::{BlockDev, CacheMode, Error, ErrorKind, OpenOptions};
use vdisk_blockjobs::commit::{self, empty, BaseLookupError, CommitOptions, WritableBase};

use super::{open, open_with, parse_image_opts, print, OpenSpec};
use crate::context::{host_path, parse_size_arg, Failure};
use crate::progress::ProgressReporter;
use crate::Ctx;

/// The long `--help` text of `commit`.
pub const LONG_ABOUT: &str = "Commit the changes recorded in an image into its backing file \
    (or, with -b, into a deeper image of its backing chain).\n\n\
    Every range the image, and every image between it and the base, holds is copied into the \
    base; ranges that read as zeroes are zeroed there. Then, unless -d or -b is given, the \
    image is emptied so it reads straight through to its backing file again (qcow2; other \
    formats are left as they are, as qemu-img leaves them).\n\n\
    Example: vdisk commit -p overlay.qcow2";

/// Arguments of `commit`.
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// Format of the image (default: probed)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Name the image by options instead of a file name: driver=FMT,file.filename=PATH
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Cache mode of the images: writeback (default), none, writethrough, directsync, unsafe
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// The image of the backing chain to commit into, instead of the image's backing file
    /// (implies -d)
    #[arg(short = 'b', long = "base", value_name = "BASE")]
    pub base: Option<String>,
    /// Limit the copy to this many bytes per second (suffixes k, M, G, ... allowed)
    #[arg(
        short = 'r',
        long = "rate",
        value_name = "RATE",
        allow_hyphen_values = true
    )]
    pub rate: Option<String>,
    /// Do not empty the image after committing it
    #[arg(short = 'd', long = "drop")]
    pub drop: bool,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet: no progress and no "Image committed." message
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Define a QEMU object, e.g. secret,id=sec0,data=PASSPHRASE (or file=PATH)
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// The image to commit
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// qemu-img's warning when an image opened for writing was probed as raw.
const RAW_PROBE_WARNING: &str = "WARNING: Image format was not specified for '{}' and probing guessed raw.
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
         Specify the 'raw' format explicitly to remove the restrictions.";

/// Runs `commit`; returns the exit code.
pub fn run(ctx: &Ctx, args: CommitArgs) -> i32 {
    // Held to the end: dropping it removes the secrets again.
    let _secrets = match crate::object::define_all(&args.object) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    let rate = match args
        .rate
        .as_deref()
        .map(|t| parse_size_arg("rate limit", t))
    {
        Some(Err(f)) => {
            ctx.fail(&f);
            return 1;
        }
        Some(Ok(r)) => Some(r),
        None => None,
    };
    let [name] = args.files.as_slice() else {
        return ctx.usage("commit", "Expecting one image file name");
    };
    match commit_cmd(ctx, &args, name, rate) {
        Ok(()) => {
            if !args.quiet {
                print("Image committed.\n");
            }
            0
        }
        Err(f) => {
            ctx.fail(&f);
            1
        }
    }
}

fn commit_cmd(ctx: &Ctx, args: &CommitArgs, name: &str, rate: Option<u64>) -> Result<(), Failure> {
    let cache = match args.cache.as_deref() {
        None => CacheMode::Writeback,
        Some(text) => CacheMode::parse(text).map_err(|e| {
            Failure::new(
                format!("Invalid cache option: {text}"),
                format!("invalid cache mode '{text}': {}", e.message()),
            )
        })?,
    };
    let spec = OpenSpec {
        format: args.format.as_deref(),
        image_opts: args.image_opts,
        ..OpenSpec::default()
    };
    // A first, read-only look finds the base; the chain is then opened again with the base
    // writable inside it, so the job reads and writes one view of the base.
    let first = open(name, &spec)?;
    let format = first.info().map(|i| i.format).unwrap_or_default();
    if ctx.dropin && args.format.is_none() && !args.image_opts && format == "raw" {
        eprintln!("{}", RAW_PROBE_WARNING.replace("{}", name));
    }
    let base_ref = commit::find_base(&first, args.base.as_deref()).map_err(|e| match e {
        BaseLookupError::NoBackingFile => Failure::new(
            "Image does not have a backing file",
            format!("commit '{name}': the image has no backing file, so there is nothing to commit into"),
        ),
        BaseLookupError::NotInChain => {
            let base = args.base.as_deref().unwrap_or_default();
            Failure::new(
                format!("Did not find '{base}' in the backing chain of '{name}'"),
                format!(
                    "commit '{name}': '{base}' is not in the image's backing chain (name a backing file of it, relative to the image naming it; see vdisk info --backing-chain)"
                ),
            )
        }
        BaseLookupError::Info(text) => Failure::new(text.clone(), format!("commit '{name}': {text}")),
    })?;
    drop(first);

    let opener = Arc::new(WritableBase::new(&base_ref));
    let options = OpenOptions {
        cache,
        opener: Some(opener.clone()),
        ..OpenOptions::read_write()
    };
    let top = open_with(
        name,
        &OpenSpec {
            writable: true,
            ..spec.clone()
        },
        options,
    )?;
    let base = opener.base().ok_or_else(|| {
        Failure::same(format!(
            "Could not open the base '{}' for writing through the chain of '{name}'",
            base_ref.path.display()
        ))
    })?;
    let found = commit_layer(&top, base_ref.depth);
    if !found.is_some_and(|layer| same_device(&layer, &base)) {
        return Err(Failure::same(format!(
            "the backing chain of '{name}' does not read through the writable base '{}'",
            base_ref.path.display()
        )));
    }
    drop(base);

    let plan = commit::plan(&top, base_ref.depth).map_err(|e| job_failure(name, &e))?;
    let progress = ProgressReporter::new(args.progress, args.quiet, plan.total());
    let result = commit::commit(&top, &plan, &CommitOptions { rate }, &progress);
    progress.finish(result.is_ok());
    result.map_err(|e| job_failure(name, &e))?;
    let top_format = top.info().map(|i| i.format).unwrap_or(format);
    // Every handle on the chain must be gone before the top's file is rewritten.
    drop(top);
    drop(opener);

    // -b implies -d, as in qemu-img.
    if args.drop || args.base.is_some() {
        return Ok(());
    }
    let path: PathBuf = if args.image_opts {
        parse_image_opts(name)?.filename.into()
    } else {
        host_path(name).into()
    };
    match empty::make_empty(&path, &top_format) {
        Ok(_) => Ok(()),
        Err(e) => Err(Failure::new(
            e.message().to_string(),
            format!(
                "commit '{name}': the base holds the data now, but emptying the image failed: {e}"
            ),
        )),
    }
}

/// The layer `depth` levels below `top`.
fn commit_layer(top: &Arc<dyn BlockDev>, depth: usize) -> Option<Arc<dyn BlockDev>> {
    let mut layer = Arc::clone(top);
    for _ in 0..depth {
        layer = layer.backing()?;
    }
    Some(layer)
}

/// True when both handles are one device.
fn same_device(a: &Arc<dyn BlockDev>, b: &Arc<dyn BlockDev>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

/// qemu-img reports a failed job as "Block job failed" with the OS's words.
fn job_failure(name: &str, err: &Error) -> Failure {
    let why = match err.kind() {
        ErrorKind::OutOfRange => "Input/output error".to_string(),
        _ => crate::context::without_hint(err.message()).to_string(),
    };
    Failure::new(
        format!("Block job failed: {why}"),
        format!("commit '{name}': {err}"),
    )
}
