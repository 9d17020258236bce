//! `vdisk resize`: change the virtual size of an image, absolutely or by a relative amount.
//!
//! The checks and their order are qemu-img 10's: the size is parsed before the image is
//! opened, then a size that is not positive, preallocation when not growing, and a shrink
//! without `--shrink` are refused before the driver is asked. The driver does the resize
//! (`BlockDev::resize`) and words its own refusals.

use clap::Args;
use vdisk_block::size::{qemu_strtosz, size_refusal, SizeError};
use vdisk_block::{BlockDev, ErrorKind, Preallocation};

use super::{open, print, OpenSpec};
use crate::context::{without_hint, Failure};
use crate::Ctx;

/// The long `--help` text of `resize`.
pub const LONG_ABOUT: &str = "Change the virtual size of an image to SIZE, or by +SIZE / -SIZE \
     (suffixes k, M, G, T, P, E multiply by 1024).\n\n\
     Shrinking needs --shrink: whatever lies past the new end is lost. With --preallocation \
     the added range is reserved (falloc), written (full) or given metadata (metadata).\n\n\
     Example: vdisk resize disk.qcow2 +10G";

/// Arguments of `resize`.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// Define a QEMU object, e.g. secret,id=sec0,data=PASSPHRASE (or file=PATH)
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// FILENAME is an option list: driver=FMT,file.filename=PATH,...
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Format of the image (default: probed)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// How to reserve the added range: off, metadata, falloc or full
    #[arg(long = "preallocation", value_name = "PREALLOC")]
    pub preallocation: Option<String>,
    /// Quiet: print only errors
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Allow a size smaller than the current one (data past the new end is lost)
    #[arg(long = "shrink")]
    pub shrink: bool,
    /// The image, then the new size: SIZE, +SIZE or -SIZE (options may follow them)
    #[arg(
        value_name = "FILENAME [+|-]SIZE",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub files: Vec<String>,
}

/// qemu-img's warning when an image opened for writing was probed as raw.
pub(crate) const RAW_PROBE_WARNING: &str = "WARNING: Image format was not specified for '{}' and probing guessed raw.
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
         Specify the 'raw' format explicitly to remove the restrictions.";

/// Runs `resize`; returns the exit code.
pub fn run(ctx: &Ctx, mut args: ResizeArgs) -> i32 {
    let (name, size) = match split_tail(&mut args) {
        Ok(v) => v,
        Err(TailError::Usage(message)) => return ctx.usage("resize", &message),
        Err(TailError::Option(what)) => {
            if ctx.dropin {
                eprintln!("{} resize: {what}", ctx.argv0);
                eprintln!("Try '{} resize --help' for more info", ctx.argv0);
                return 1;
            }
            return ctx.usage("resize", &what);
        }
    };
    // Held to the end: dropping it removes the secrets again.
    let _secrets = match crate::object::define_all(&args.object) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    match resize(ctx, &args, &name, &size) {
        Ok(()) => {
            if !args.quiet {
                print("Image resized.\n");
            }
            0
        }
        Err(f) => {
            ctx.fail(&f);
            1
        }
    }
}

/// A command line qemu-img refuses, found among the arguments after the file name.
enum TailError {
    /// A misplaced or missing argument (qemu's `error_exit` wording).
    Usage(String),
    /// An option getopt refuses (its own wording).
    Option(String),
}

/// qemu-img 10 reads options in order with the positional arguments, so options may follow
/// the file name, and an argument right after the file name that looks like `-N` is the
/// size, not an option. clap stops at the first positional argument; the rest is read here.
fn split_tail(args: &mut ResizeArgs) -> Result<(String, String), TailError> {
    let words = std::mem::take(&mut args.files);
    let mut name: Option<String> = None;
    let mut size: Option<String> = None;
    let mut after_dashes = Vec::new();
    let mut i = 0;
    let mut options_done = false;
    let mut after_name = false;
    while i < words.len() {
        let word = &words[i];
        i += 1;
        let next_to_name = std::mem::take(&mut after_name);
        let is_option = !options_done && word.len() > 1 && word.starts_with('-');
        if !is_option {
            if options_done {
                after_dashes.push(word.clone());
            } else if name.is_none() {
                name = Some(word.clone());
                after_name = true;
            } else if size.is_none() {
                size = Some(word.clone());
            } else {
                return Err(TailError::Usage("Extra argument(s) in command line".into()));
            }
            continue;
        }
        if word == "--" {
            options_done = true;
            continue;
        }
        if next_to_name && word.as_bytes()[1].is_ascii_digit() {
            size = Some(word.clone());
            continue;
        }
        let mut value = |flag: &str, inline: Option<&str>| -> Result<String, TailError> {
            if let Some(v) = inline {
                return Ok(v.to_string());
            }
            let v = words.get(i).cloned().ok_or_else(|| {
                TailError::Option(if flag.starts_with("--") {
                    format!("option '{flag}' requires an argument")
                } else {
                    format!("option requires an argument -- '{}'", &flag[1..])
                })
            })?;
            i += 1;
            Ok(v)
        };
        if let Some(long) = word.strip_prefix("--") {
            let (key, inline) = match long.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (long, None),
            };
            match key {
                "format" => args.format = Some(value("--format", inline)?),
                "preallocation" => args.preallocation = Some(value("--preallocation", inline)?),
                "object" => args.object.push(value("--object", inline)?),
                "quiet" if inline.is_none() => args.quiet = true,
                "shrink" if inline.is_none() => args.shrink = true,
                "image-opts" if inline.is_none() => args.image_opts = true,
                "quiet" | "shrink" | "image-opts" => {
                    return Err(TailError::Option(format!(
                        "option '--{key}' doesn't allow an argument"
                    )))
                }
                _ => return Err(TailError::Option(format!("unrecognized option '{word}'"))),
            }
            continue;
        }
        // A cluster of short options: `-q`, `-fqcow2`, `-qf qcow2`.
        let flags = &word[1..];
        for (at, c) in flags.char_indices() {
            match c {
                'q' => args.quiet = true,
                'f' => {
                    let rest = &flags[at + 1..];
                    let inline = (!rest.is_empty()).then_some(rest);
                    args.format = Some(value("-f", inline)?);
                    break;
                }
                other => {
                    return Err(TailError::Option(format!("invalid option -- '{other}'")));
                }
            }
        }
    }
    // What follows `--` fills the file name and the size; anything more is refused.
    let mut rest = after_dashes.into_iter();
    let name = name.or_else(|| rest.next());
    let size = size.or_else(|| rest.next());
    match (name, size, rest.next()) {
        (Some(n), Some(s), None) => Ok((n, s)),
        _ => Err(TailError::Usage(
            "Expecting image file name and size".into(),
        )),
    }
}

fn resize(ctx: &Ctx, args: &ResizeArgs, name: &str, size: &str) -> Result<(), Failure> {
    let prealloc = match args.preallocation.as_deref() {
        None => Preallocation::Off,
        Some(text) => Preallocation::parse(text).map_err(|_| {
            Failure::new(
                format!("Invalid preallocation mode '{text}'"),
                format!("resize: invalid preallocation mode '{text}' (use off, metadata, falloc or full)"),
            )
        })?,
    };
    let (relative, amount) = match size.as_bytes().first() {
        Some(b'+') => (1i64, &size[1..]),
        Some(b'-') => (-1i64, &size[1..]),
        _ => (0, size),
    };
    let n = qemu_size_option("size", amount)?;
    let spec = OpenSpec {
        format: args.format.as_deref(),
        writable: true,
        image_opts: args.image_opts,
        ..OpenSpec::default()
    };
    let dev = open(name, &spec)?;
    warn_if_probed_raw(&*dev, name, args.format.is_none() && !args.image_opts);
    let current = dev.size() as i64;
    // qemu computes in signed 64 bits: a size past 8 EiB wraps negative and is refused.
    let total = if relative == 0 {
        n as i64
    } else {
        current.wrapping_add((n as i64).wrapping_mul(relative))
    };
    if total <= 0 {
        return Err(Failure::new(
            "New image size must be positive",
            format!("resize '{name}': the new size must be above zero"),
        ));
    }
    if total <= current && prealloc != Preallocation::Off {
        return Err(Failure::new(
            "Preallocation can only be used for growing images",
            format!(
                "resize '{name}': --preallocation only applies when the image grows (it is {current} bytes now)"
            ),
        ));
    }
    if total < current && !args.shrink {
        if ctx.dropin {
            ctx.error("Use the --shrink option to perform a shrink operation.");
            return Err(Failure::same(
                "warning: Shrinking an image will delete all data beyond the shrunken image's end. \
                 Before performing such an operation, make sure there is no important data there.",
            ));
        }
        return Err(Failure::same(format!(
            "resize '{name}': {total} bytes is smaller than the current {current}; add --shrink \
             to shrink (everything past the new end is lost)"
        )));
    }
    set_size(&*dev, name, total as u64, prealloc)
}

/// Resizes `dev` (the image the user named `name`) to `size` bytes and flushes it, with
/// qemu's words for the refusals.
pub(crate) fn set_size(
    dev: &dyn BlockDev,
    name: &str,
    size: u64,
    prealloc: Preallocation,
) -> Result<(), Failure> {
    let format = dev.info().map(|i| i.format).unwrap_or_default();
    // qemu's qcow2 driver takes whole sectors only; vdisk's would store any size, which
    // qemu then rounds when it opens the image, so the sizes would disagree.
    if format == "qcow2" && !size.is_multiple_of(512) {
        return Err(Failure::new(
            "The new size must be a multiple of 512",
            format!("resize '{name}': a qcow2 image's size must be a multiple of 512 bytes"),
        ));
    }
    dev.resize(size, prealloc)
        .and_then(|()| dev.flush())
        .map_err(|e| resize_failure(name, dev, &e))
}

/// Prints qemu-img's warning for a writable image whose format was guessed as raw.
pub(crate) fn warn_if_probed_raw(dev: &dyn BlockDev, name: &str, probed: bool) {
    if probed && dev.info().map(|i| i.format == "raw").unwrap_or(false) {
        eprintln!("{}", RAW_PROBE_WARNING.replace("{}", name));
    }
}

/// How the driver's refusal reads: qemu's words for the cases its drivers word differently.
fn resize_failure(name: &str, dev: &dyn BlockDev, err: &vdisk_block::Error) -> Failure {
    let format = dev.info().map(|i| i.format).unwrap_or_default();
    let vdisk = format!("resize '{name}': {}", err.message());
    // qemu's vpc driver has no resize at all; vdisk's says it is not built yet.
    if err.kind() == ErrorKind::Unsupported && (format == "vpc" || format == "vmdk") {
        return Failure::new("Image format driver does not support resize", vdisk);
    }
    let os = std::error::Error::source(err)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .map(|e| {
            let text = e.to_string();
            match text.find(" (os error") {
                Some(cut) => text[..cut].to_string(),
                None => text,
            }
        });
    let qemu = match (format.as_str(), os) {
        ("raw", Some(why)) => format!("Could not resize file: {why}"),
        _ => without_hint(err.message()).to_string(),
    };
    Failure::new(qemu, vdisk)
}

/// Parses a size option value exactly as qemu's option parser does
/// ([`vdisk_block::size::qemu_strtosz`]) and words a failure as qemu does for option `key`.
pub(crate) fn qemu_size_option(key: &str, text: &str) -> Result<u64, Failure> {
    qemu_strtosz(text).map_err(|e| {
        Failure::new(
            size_refusal(key, text, e),
            match e {
                SizeError::Range => format!("invalid {key} '{text}': it does not fit in 64 bits"),
                SizeError::Invalid => format!(
                    "invalid {key} '{text}': use a number of bytes, optionally followed by k, M, G, T, P or E"
                ),
            },
        )
    })
}
