//! `vdisk map`: which guest ranges hold data, which read as zeroes, and where they live.

use std::cell::RefCell;
use std::io::{BufWriter, Write};

use clap::Args;
use vdisk_block::Error;
use vdisk_blockjobs::map::walk_map;

use super::{open, OpenSpec};
use crate::context::{parse_size_arg, Failure};
use crate::output::{map_entry_human, map_entry_json, OutputFormat, MAP_HUMAN_HEADER};
use crate::Ctx;

/// The long `--help` text of `map`.
pub const LONG_ABOUT: &str =
    "Dump the allocation map of an image: for each range of the guest disk, \
                  whether it holds data, reads as zeroes or falls through to a backing file, \
                  and where it is stored on the host.\n\n\
                  The JSON form prints one extent per line; the human form lists only the \
                  ranges that hold data.\n\n\
                  Example: vdisk map --output=json --start-offset 1M --max-length 64M disk.raw";

/// Arguments of `map`.
#[derive(Debug, Args)]
pub struct MapArgs {
    /// Format of the image (default: probed)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Output format: human or json
    #[arg(long, value_name = "human|json", default_value = "human")]
    pub output: String,
    /// Start the map at this guest offset (bytes, suffixes k/M/G/T/P/E allowed)
    #[arg(
        long = "start-offset",
        value_name = "OFFSET",
        allow_hyphen_values = true
    )]
    pub start_offset: Option<String>,
    /// Map at most this many bytes
    #[arg(long = "max-length", value_name = "LENGTH", allow_hyphen_values = true)]
    pub max_length: Option<String>,
    /// Name the image by options instead of a file name: driver=FMT,file.filename=PATH and
    /// driver options (e.g. disk=N to pick a disk of an OVA appliance)
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Open the image in shared mode, even while another process uses it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image file
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
    /// Define a secret: `secret,id=ID,data=TEXT` or `secret,id=ID,file=PATH`
    /// (`format=base64` decodes it); options name it by id (`key-secret=ID`)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
}

/// Runs `map`; returns the exit code.
pub fn run(ctx: &Ctx, args: MapArgs) -> i32 {
    let _secrets = match crate::object::define_all(&args.object) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    let output = match OutputFormat::parse(&args.output) {
        Ok(o) => o,
        Err(msg) => return ctx.usage("map", &msg),
    };
    let parse = |what: &str, v: &Option<String>| -> Result<Option<u64>, Failure> {
        v.as_deref().map(|t| parse_size_arg(what, t)).transpose()
    };
    let (start, max_length) = match (
        parse("start offset", &args.start_offset),
        parse("max length", &args.max_length),
    ) {
        (Ok(s), Ok(m)) => (s.unwrap_or(0), m),
        (Err(f), _) | (_, Err(f)) => {
            ctx.fail(&f);
            return 1;
        }
    };
    let [name] = args.files.as_slice() else {
        return ctx.usage("map", "Expecting one image file name");
    };
    let spec = OpenSpec {
        format: args.format.as_deref(),
        force_share: args.force_share,
        image_opts: args.image_opts,
        ..OpenSpec::default()
    };
    let dev = match open(name, &spec) {
        Ok(d) => d,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    // Held output leaves in the C library's blocks (drop-in mode); a buffer in front would
    // move where they end.
    let capacity = if crate::stdout::is_buffered() {
        0
    } else {
        1 << 16
    };
    let out = RefCell::new(BufWriter::with_capacity(capacity, crate::stdout::Stdout));
    let write = |text: &str| {
        // A closed pipe ends the output; it is not an error worth a panic.
        let _ = out.borrow_mut().write_all(text.as_bytes());
    };
    write(match output {
        OutputFormat::Json => "[",
        OutputFormat::Human => MAP_HUMAN_HEADER,
    });
    let mut shown_failure: Option<Failure> = None;
    let result = walk_map(&dev, start, max_length, |entry, next| {
        match output {
            OutputFormat::Json => write(&map_entry_json(entry, next.is_some())),
            OutputFormat::Human => match map_entry_human(entry, next) {
                Ok(line) => write(&line),
                Err(msg) => {
                    shown_failure = Some(Failure::new(
                        msg.clone(),
                        format!("map '{name}': {msg} (use --output=json to see such extents)"),
                    ));
                    return Err(Error::unsupported("map", msg));
                }
            },
        }
        Ok(())
    });
    let code = match result {
        Ok(()) => {
            if output == OutputFormat::Json {
                write("]\n");
            }
            0
        }
        Err(e) => {
            let _ = out.borrow_mut().flush();
            let failure = shown_failure.unwrap_or_else(|| {
                Failure::new(
                    format!("Could not read file metadata: {}", e.message()),
                    format!("map '{name}': cannot read the allocation status: {e}"),
                )
            });
            ctx.fail(&failure);
            1
        }
    };
    let _ = out.borrow_mut().flush();
    code
}
