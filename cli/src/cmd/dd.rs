//! `vdisk dd`: copy an image block by block into a new image, as `qemu-img dd` of qemu 10.
//!
//! The operands are dd(1)'s (`if=`, `of=`, `bs=`, `count=`, `skip=`), with qemu-img's
//! rules: the output is created with the input's size, cut to `bs * count` when that is
//! smaller, minus the `skip * bs` bytes skipped (so `count` counts the skipped blocks too);
//! every block is written as data, zeroes included; skipping past the end makes an empty
//! output and a warning, not a failure.

use clap::Args;
use vdisk_block::{CreateOptions, ErrorKind, OpenOptions};
use vdisk_blockjobs::{format_by_name, open_image};

use super::{open, OpenSpec};
use crate::context::{create_failure, open_failure, parse_size_arg, Failure};
use crate::Ctx;

/// The long `--help` text of `dd`.
pub const LONG_ABOUT: &str = "Copy an image into a new image block by block, as dd(1) \
    copies files, optionally converting its format.\n\n\
    Operands: if=INPUT of=OUTPUT (both required), bs=BLOCK_SIZE (default 512, suffixes \
    allowed), count=BLOCKS (copy at most this many blocks from the start of INPUT, skipped \
    ones included), skip=BLOCKS (start this many blocks into INPUT). OUTPUT is created; \
    every byte of it is written.\n\n\
    Example: vdisk dd -O qcow2 bs=1M count=64 if=disk.raw of=head.qcow2";

/// Arguments of `dd`.
#[derive(Debug, Args)]
pub struct DdArgs {
    /// Format of the input (default: probed)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Format of the output
    #[arg(
        short = 'O',
        long = "output-format",
        value_name = "OUTPUT_FMT",
        default_value = "raw"
    )]
    pub output_format: String,
    /// Name the input by options instead of a file name: driver=FMT,file.filename=PATH
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Open the input in shared mode, even while another process uses it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Define a QEMU object, e.g. secret,id=sec0,data=PASSPHRASE (or file=PATH)
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// Operands: if=INPUT of=OUTPUT [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS]
    #[arg(value_name = "OPERAND")]
    pub operands: Vec<String>,
}

/// The operands as given.
#[derive(Debug, Default)]
struct Operands {
    input: Option<String>,
    output: Option<String>,
    block_size: u64,
    count: Option<u64>,
    skip: Option<u64>,
}

/// The largest piece of a block moved at once; larger blocks go in several pieces, in
/// order, so a huge `bs` costs no huge buffer.
const MAX_PIECE: u64 = 1 << 20;

/// Runs `dd`; returns the exit code.
pub fn run(ctx: &Ctx, args: DdArgs) -> i32 {
    // Held to the end: dropping it removes the secrets again.
    let _secrets = match crate::object::define_all(&args.object) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    match dd(ctx, &args) {
        Ok(()) => 0,
        Err(f) => {
            ctx.fail(&f);
            1
        }
    }
}

/// Parses a number as qemu's `cvtnum_full` does, with qemu's messages for `name`.
pub(crate) fn bounded_size(name: &str, text: &str, min: u64, max: u64) -> Result<u64, Failure> {
    let range = || {
        Failure::new(
            format!("Invalid {name} specified. Must be between {min} and {max}."),
            format!("invalid {name} '{text}': it must lie between {min} and {max}"),
        )
    };
    match parse_size_arg(name, text) {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        Ok(_) => Err(range()),
        Err(f) if f.qemu.contains("Must be between") => Err(range()),
        Err(f) => Err(f),
    }
}

fn parse_operands(operands: &[String]) -> Result<Operands, Failure> {
    let mut ops = Operands {
        block_size: 512,
        ..Operands::default()
    };
    for operand in operands {
        let unknown = |what: &str| {
            Failure::new(
                format!("unrecognized operand {what}"),
                format!("dd: unknown operand '{what}' (use if=, of=, bs=, count= or skip=)"),
            )
        };
        let Some((key, value)) = operand.split_once('=') else {
            return Err(unknown(operand));
        };
        match key {
            "bs" => ops.block_size = bounded_size("bs", value, 1, i32::MAX as u64)?,
            "count" => ops.count = Some(bounded_size("count", value, 0, i64::MAX as u64)?),
            "skip" => ops.skip = Some(bounded_size("skip", value, 0, i64::MAX as u64)?),
            "if" => ops.input = Some(value.to_string()),
            "of" => ops.output = Some(value.to_string()),
            _ => return Err(unknown(key)),
        }
    }
    Ok(ops)
}

fn dd(ctx: &Ctx, args: &DdArgs) -> Result<(), Failure> {
    let ops = parse_operands(&args.operands)?;
    let (Some(input), Some(output)) = (ops.input.as_deref(), ops.output.as_deref()) else {
        return Err(Failure::new(
            "Must specify both input and output files",
            "dd: name both the input (if=) and the output (of=)",
        ));
    };
    let spec = OpenSpec {
        format: args.format.as_deref(),
        force_share: args.force_share,
        image_opts: args.image_opts,
        ..OpenSpec::default()
    };
    let source = open(input, &spec)?;
    let driver = format_by_name(&args.output_format).map_err(|_| {
        Failure::new(
            "Unknown file format",
            format!("dd: unknown output format '{}'", args.output_format),
        )
    })?;
    let bs = ops.block_size;
    let mut size = source.size();
    if let Some(count) = ops.count {
        if let Some(bytes) = count.checked_mul(bs).filter(|&b| b <= i64::MAX as u64) {
            size = size.min(bytes);
        }
    }
    // Skipping past the end (or past what count leaves) makes an empty output, as dd(1).
    let skip_bytes = ops
        .skip
        .map(|s| s.checked_mul(bs).filter(|&b| b <= i64::MAX as u64));
    let past_end =
        matches!(skip_bytes, Some(None)) || matches!(skip_bytes, Some(Some(b)) if b > size);
    let start = match skip_bytes {
        Some(Some(b)) if !past_end => b,
        Some(_) => size,
        None => 0,
    };
    let out_size = size - start;
    vdisk_blockjobs::registry::create_image(
        std::path::Path::new(output),
        driver.name(),
        CreateOptions {
            size: out_size,
            ..CreateOptions::default()
        },
    )
    .map_err(|e| {
        let mut f = create_failure(output, driver.name(), &e);
        let rest = f
            .qemu
            .strip_prefix(&format!("{output}: "))
            .unwrap_or(&f.qemu)
            .to_string();
        f.qemu = format!("{output}: error while creating output image: {rest}");
        f
    })?;
    let target = open_image(
        std::path::Path::new(output),
        Some(driver.name()),
        &OpenOptions::read_write(),
    )
    .map_err(|e| open_failure(output, &e))?;
    if past_end {
        ctx.fail(&Failure::new(
            format!("{input}: cannot skip to specified offset"),
            format!("dd: skip= lies past the end of '{input}'; the output is empty"),
        ));
    }
    let mut buf = vec![0u8; bs.min(MAX_PIECE) as usize];
    let mut in_pos = start;
    let mut out_pos = 0u64;
    while in_pos < size {
        let block = bs.min(size - in_pos);
        let mut done = 0;
        while done < block {
            let n = (block - done).min(MAX_PIECE);
            let piece = &mut buf[..n as usize];
            source.read_at(piece, in_pos + done).map_err(|e| {
                Failure::new(
                    format!(
                        "error while reading from input image file: {}",
                        crate::context::qemu_read_error(&e)
                    ),
                    format!("dd: cannot read '{input}' at byte {}: {e}", in_pos + done),
                )
            })?;
            target.write_at(piece, out_pos + done).map_err(|e| {
                Failure::new(
                    format!("error while writing to output image file: {}", os_words(&e)),
                    format!(
                        "dd: cannot write '{output}' at byte {}: {e}",
                        out_pos + done
                    ),
                )
            })?;
            done += n;
        }
        in_pos += block;
        out_pos += block;
    }
    target.flush().map_err(|e| {
        Failure::new(
            format!("error while writing to output image file: {}", os_words(&e)),
            format!("dd: cannot flush '{output}': {e}"),
        )
    })?;
    Ok(())
}

/// The OS's words for a failed request, as qemu's `strerror`.
fn os_words(err: &vdisk_block::Error) -> String {
    match err.kind() {
        ErrorKind::OutOfRange => "Input/output error".into(),
        _ => crate::context::without_hint(err.message()).to_string(),
    }
}
