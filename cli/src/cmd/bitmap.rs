//! `vdisk bitmap`: add, remove, clear, enable, disable or merge the persistent dirty bitmaps
//! of an image offline.
//!
//! As `qemu-img bitmap` of qemu 10: several operations in one call, applied in the order
//! given, all on the bitmap named last; the first that fails stops the rest, and what was
//! done before it is stored anyway (the image is closed as usual). Nothing is printed on
//! success; every failure exits with 1. The bitmap work is the driver's
//! ([`vdisk_block::BlockDev::dirty_bitmap_add`] and its siblings); formats without
//! persistent bitmaps refuse as qemu's do.

use std::sync::Arc;

use clap::{ArgAction, ArgMatches, Args, FromArgMatches};
use vdisk_block::dev::InfoValue;
use vdisk_block::{BlockDev, Error, ErrorKind};

use super::{open, OpenSpec};
use crate::context::{parse_size_arg, Failure};
use crate::Ctx;

/// The long `--help` text of `bitmap`.
pub const LONG_ABOUT: &str = "Add, remove, clear, enable, disable or merge persistent dirty \
    bitmaps (qcow2).\n\n\
    Several operations may be given; they apply in order to the bitmap BITMAP of FILENAME. \
    --merge SOURCE ORs bitmap SOURCE (of FILENAME, or of -b SOURCE_FILE) into BITMAP.\n\n\
    Example: vdisk bitmap --add --disable -g 64k disk.qcow2 before-backup";

/// The options of `bitmap` as clap parses them (see [`BitmapArgs`] for their order).
#[derive(Debug, Args)]
pub struct BitmapOpts {
    /// Add BITMAP (empty; recording unless --disable follows)
    #[arg(long = "add", action = ArgAction::Append, num_args = 0, default_missing_value = "true", value_parser = clap::value_parser!(bool))]
    pub add: Vec<bool>,
    /// Remove BITMAP
    #[arg(long = "remove", action = ArgAction::Append, num_args = 0, default_missing_value = "true", value_parser = clap::value_parser!(bool))]
    pub remove: Vec<bool>,
    /// Clear every bit of BITMAP
    #[arg(long = "clear", action = ArgAction::Append, num_args = 0, default_missing_value = "true", value_parser = clap::value_parser!(bool))]
    pub clear: Vec<bool>,
    /// Make BITMAP record writes
    #[arg(long = "enable", action = ArgAction::Append, num_args = 0, default_missing_value = "true", value_parser = clap::value_parser!(bool))]
    pub enable: Vec<bool>,
    /// Make BITMAP stop recording writes
    #[arg(long = "disable", action = ArgAction::Append, num_args = 0, default_missing_value = "true", value_parser = clap::value_parser!(bool))]
    pub disable: Vec<bool>,
    /// OR bitmap SOURCE into BITMAP
    #[arg(long = "merge", value_name = "SOURCE", allow_hyphen_values = true)]
    pub merge: Vec<String>,
    /// The image holding the --merge source bitmap (default: FILENAME)
    #[arg(short = 'b', long = "source-file", value_name = "SOURCE_FILE")]
    pub source_file: Option<String>,
    /// Format of SOURCE_FILE
    #[arg(short = 'F', long = "source-format", value_name = "SOURCE_FMT")]
    pub source_format: Option<String>,
    /// Granularity of an added bitmap in bytes (default: the cluster size within 4k..64k)
    #[arg(
        short = 'g',
        long = "granularity",
        value_name = "GRANULARITY",
        allow_hyphen_values = true
    )]
    pub granularity: Option<String>,
    /// Format of the image (default: probed)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Name the image by options instead of a file name: driver=FMT,file.filename=PATH
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Define a secret: `secret,id=ID,data=TEXT` or `secret,id=ID,file=PATH`
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// FILENAME BITMAP
    #[arg(value_name = "FILENAME BITMAP")]
    pub operands: Vec<String>,
}

/// One operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `--add`.
    Add,
    /// `--remove`.
    Remove,
    /// `--clear`.
    Clear,
    /// `--enable`.
    Enable,
    /// `--disable`.
    Disable,
    /// `--merge SOURCE`.
    Merge(String),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
        }
    }
}

/// Arguments of `bitmap`: the options and the operations in command-line order.
#[derive(Debug)]
pub struct BitmapArgs {
    /// The parsed options.
    pub opts: BitmapOpts,
    /// The operations, in the order given.
    pub ops: Vec<Op>,
}

impl FromArgMatches for BitmapArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let opts = BitmapOpts::from_arg_matches(m)?;
        let mut ops: Vec<(usize, Op)> = Vec::new();
        for (id, op) in [
            ("add", Op::Add),
            ("remove", Op::Remove),
            ("clear", Op::Clear),
            ("enable", Op::Enable),
            ("disable", Op::Disable),
        ] {
            if let Some(at) = m.indices_of(id) {
                ops.extend(at.map(|i| (i, op.clone())));
            }
        }
        if let Some(at) = m.indices_of("merge") {
            ops.extend(
                at.zip(opts.merge.iter())
                    .map(|(i, s)| (i, Op::Merge(s.clone()))),
            );
        }
        ops.sort_by_key(|(i, _)| *i);
        Ok(BitmapArgs {
            opts,
            ops: ops.into_iter().map(|(_, op)| op).collect(),
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for BitmapArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        BitmapOpts::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        BitmapOpts::augment_args_for_update(cmd)
    }
}

/// qemu-img's warning when an image opened for writing was probed as raw.
const RAW_PROBE_WARNING: &str = "WARNING: Image format was not specified for '{}' and probing guessed raw.
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
         Specify the 'raw' format explicitly to remove the restrictions.";

/// The node name qemu-img prints for an anonymous image (its number varies from run to
/// run in qemu; vdisk has one image and calls it 0).
const NODE: &str = "#block0";

/// Runs `bitmap`; returns the exit code.
pub fn run(ctx: &Ctx, args: BitmapArgs) -> i32 {
    // Held to the end: dropping it removes the secrets again.
    let _secrets = match crate::object::define_all(&args.opts.object) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    match bitmap(ctx, &args) {
        Ok(()) => 0,
        Err(f) => {
            ctx.fail(&f);
            1
        }
    }
}

/// The granularity `-g` asks for: `None` for the default (qemu treats 0 as not given),
/// cut to 32 bits as qemu's QMP argument is.
fn granularity(text: &str) -> Result<Option<u64>, Failure> {
    let g = parse_size_arg("granularity", text)?;
    Ok((g != 0).then_some(u64::from(g as u32)))
}

fn bitmap(ctx: &Ctx, args: &BitmapArgs) -> Result<(), Failure> {
    let o = &args.opts;
    if args.ops.is_empty() {
        return Err(Failure::new(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
            "bitmap: give at least one operation: --add, --remove, --clear, --enable, --disable or --merge SOURCE",
        ));
    }
    let gran = match &o.granularity {
        Some(text) => granularity(text)?,
        None => None,
    };
    let adds = args.ops.contains(&Op::Add);
    if gran.is_some() && !adds {
        return Err(Failure::new(
            "granularity only supported with --add",
            "bitmap: -g sets the granularity of a new bitmap and needs --add",
        ));
    }
    if o.source_format.is_some() && o.source_file.is_none() {
        return Err(Failure::new(
            "-F only supported with -b",
            "bitmap: -F names the format of -b SOURCE_FILE and needs -b",
        ));
    }
    let merges = args.ops.iter().any(|op| matches!(op, Op::Merge(_)));
    if o.source_file.is_some() && !merges {
        return Err(Failure::new(
            "Merge bitmap source file only supported with --merge",
            "bitmap: -b SOURCE_FILE is where --merge finds its source and needs --merge",
        ));
    }
    let [name, bitmap] = o.operands.as_slice() else {
        return Err(Failure::new(
            "Expecting filename and bitmap name",
            "bitmap: give the image and the bitmap name: vdisk bitmap OPERATION... FILENAME BITMAP",
        ));
    };
    let spec = OpenSpec {
        format: o.format.as_deref(),
        writable: true,
        image_opts: o.image_opts,
        ..OpenSpec::default()
    };
    let dev = open(name, &spec)?;
    let format = dev.info().map(|i| i.format).unwrap_or_default();
    if ctx.dropin && o.format.is_none() && !o.image_opts && format == "raw" {
        eprintln!("{}", RAW_PROBE_WARNING.replace("{}", name));
    }
    let applied = apply(ctx, args, &dev, name, bitmap, gran, &format);
    // What was done before a failure is kept, as qemu-img's close stores it.
    let stored = dev.store_dirty_bitmaps().map_err(|e| {
        Failure::new(
            format!("Failed to store bitmaps: {}", e.message()),
            format!(
                "bitmap: storing the bitmaps of '{name}' failed: {}",
                e.message()
            ),
        )
    });
    applied.and(stored)
}

fn apply(
    ctx: &Ctx,
    args: &BitmapArgs,
    dev: &Arc<dyn BlockDev>,
    name: &str,
    bitmap: &str,
    gran: Option<u64>,
    format: &str,
) -> Result<(), Failure> {
    let o = &args.opts;
    for op in &args.ops {
        let done = match op {
            Op::Add => dev.dirty_bitmap_add(bitmap, gran, false),
            Op::Remove => dev.dirty_bitmap_remove(bitmap),
            Op::Clear => dev.dirty_bitmap_clear(bitmap),
            Op::Enable => dev.dirty_bitmap_enable(bitmap, true),
            Op::Disable => dev.dirty_bitmap_enable(bitmap, false),
            Op::Merge(source) => {
                let src = match &o.source_file {
                    Some(file) => {
                        let spec = OpenSpec {
                            format: o.source_format.as_deref(),
                            image_opts: o.image_opts,
                            ..OpenSpec::default()
                        };
                        Some(open(file, &spec)?)
                    }
                    None => None,
                };
                let src_dev: &dyn BlockDev = src.as_deref().unwrap_or(dev.as_ref());
                dev.dirty_bitmap_merge(bitmap, src_dev, source)
            }
        };
        if let Err(e) = done {
            return Err(op_failure(ctx, op, name, bitmap, format, &e));
        }
    }
    Ok(())
}

fn op_failure(ctx: &Ctx, op: &Op, name: &str, bitmap: &str, format: &str, e: &Error) -> Failure {
    let _ = ctx;
    // Formats without persistent bitmaps: qemu cannot add one, and finds none to change.
    let why = if e.kind() == ErrorKind::Unsupported && e.message() == "Operation not supported" {
        match op {
            Op::Add => format!("Can't store persistent bitmaps to {NODE}: Operation not supported"),
            _ => format!("Dirty bitmap '{bitmap}' not found"),
        }
    } else {
        e.message().to_string()
    };
    let hint = if e.kind() == ErrorKind::Unsupported && format != "qcow2" {
        format!(" (persistent bitmaps need a qcow2 image; '{name}' is {format})")
    } else {
        String::new()
    };
    Failure::new(
        format!("Operation {} on bitmap {bitmap} failed: {why}", op.name()),
        format!(
            "bitmap: {} '{bitmap}' on '{name}' failed: {why}{hint}",
            op.name()
        ),
    )
}

/// True when `dev` can hold persistent bitmaps (qcow2 version 3, as qemu's
/// `bdrv_supports_persistent_dirty_bitmap`).
pub fn supports_bitmaps(dev: &dyn BlockDev) -> bool {
    dev.format_specific().ok().flatten().is_some_and(|fs| {
        fs.kind == "qcow2"
            && fs
                .data
                .iter()
                .any(|(k, v)| k == "compat" && *v == InfoValue::Text("1.1".into()))
    })
}

/// `convert --bitmaps`, before the target is made: one source that can hold bitmaps, and
/// no inconsistent one unless `skip_broken` (qemu's `convert_check_bitmaps`).
pub fn convert_check_source(
    sources: &[Arc<dyn BlockDev>],
    skip_broken: bool,
) -> Result<(), Failure> {
    let [src] = sources else {
        return Err(Failure::new(
            "Copying bitmaps only possible with single source",
            "convert: --bitmaps copies the bitmaps of a single source; give one source",
        ));
    };
    if !supports_bitmaps(src.as_ref()) {
        return Err(Failure::new(
            "Source lacks bitmap support",
            "convert: --bitmaps needs a source that can hold persistent bitmaps (qcow2 version 3)",
        ));
    }
    let list = src
        .dirty_bitmaps()
        .map_err(|e| Failure::same(e.message()))?;
    // qemu walks its in-memory list, which holds the loaded bitmaps newest first.
    if let Some(b) = list.iter().rev().find(|b| b.inconsistent && !skip_broken) {
        return Err(Failure::new(
            format!(
                "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
                b.name
            ),
            format!(
                "convert: bitmap '{}' is inconsistent (not saved cleanly); skip it with --skip-broken-bitmaps or delete it with 'vdisk bitmap --remove'",
                b.name
            ),
        ));
    }
    Ok(())
}

/// `convert --bitmaps`, once the target is open: it must be able to hold them.
pub fn convert_check_target(target: &dyn BlockDev, format: &str) -> Result<(), Failure> {
    if supports_bitmaps(target) {
        return Ok(());
    }
    Err(Failure::new(
        format!("Format driver '{format}' does not support bitmaps"),
        format!("convert: --bitmaps needs a target that can hold persistent bitmaps (qcow2 version 3), not {format}"),
    ))
}

/// `convert --bitmaps`, after the copy: every consistent bitmap of `src` is added to
/// `target` (same name, granularity and recording state) and filled from the source; the
/// target's bitmaps are then stored.
pub fn convert_copy(
    ctx: &Ctx,
    src: &dyn BlockDev,
    target: &dyn BlockDev,
    skip_broken: bool,
) -> Result<(), Failure> {
    let list = src
        .dirty_bitmaps()
        .map_err(|e| Failure::same(e.message()))?;
    // In qemu's order (see `convert_check_source`); a fresh target then stores them in
    // the source's order, as qemu's does.
    for b in list.iter().rev() {
        if skip_broken && b.inconsistent {
            if ctx.dropin {
                ctx.error(format!(
                    "warning: Skipping inconsistent bitmap '{}'",
                    b.name
                ));
            } else {
                ctx.error(format!(
                    "warning: skipping inconsistent bitmap '{}' (it was not saved cleanly)",
                    b.name
                ));
            }
            continue;
        }
        target
            .dirty_bitmap_add(&b.name, Some(b.granularity), !b.enabled)
            .map_err(|e| {
                Failure::new(
                    format!("Failed to create bitmap {}: {}", b.name, e.message()),
                    format!(
                        "convert: cannot create bitmap '{}' in the target: {}",
                        b.name,
                        e.message()
                    ),
                )
            })?;
        target
            .dirty_bitmap_merge(&b.name, src, &b.name)
            .map_err(|e| {
                Failure::new(
                    format!("Failed to populate bitmap {}: {}", b.name, e.message()),
                    format!(
                        "convert: cannot fill bitmap '{}' of the target: {}",
                        b.name,
                        e.message()
                    ),
                )
            })?;
    }
    target.store_dirty_bitmaps().map_err(|e| {
        Failure::new(
            format!("Failed to store bitmaps: {}", e.message()),
            format!(
                "convert: storing the target's bitmaps failed: {}",
                e.message()
            ),
        )
    })
}
