//! `vdisk measure`: how many bytes a new image of a given size, or a converted copy of an
//! existing image, will need.

use clap::Args;
use serde_json::json;
use vdisk_block::CreateOptions;

use super::{open, print, sectors, OpenSpec};
use crate::context::{parse_size_arg, Failure};
use crate::output::{qemu_json, OutputFormat};
use crate::Ctx;

/// The long `--help` text of `measure`.
pub const LONG_ABOUT: &str =
    "Calculate the file size a new image needs: either an empty image of --size \
                  bytes, or a copy of FILENAME converted to the target format.\n\n\
                  Example: vdisk measure --output=json -O raw --size 10G";

/// Arguments of `measure`.
#[derive(Debug, Args)]
pub struct MeasureArgs {
    /// Format of FILENAME (default: probed)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Format of the image to be created (default: raw)
    #[arg(short = 'O', long = "target-format", value_name = "OUTPUT_FMT")]
    pub target_format: Option<String>,
    /// Creation options of the target format, as `create -o` takes them
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Measure a new empty image of this size instead of a FILENAME
    #[arg(
        short = 's',
        long = "size",
        value_name = "SIZE",
        allow_hyphen_values = true
    )]
    pub size: Option<String>,
    /// Measure the image as of this internal snapshot
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT")]
    pub snapshot: Option<String>,
    /// Output format: human or json
    #[arg(long, value_name = "human|json", default_value = "human")]
    pub output: String,
    /// Open the image in shared mode, even while another process uses it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image to be converted
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// Runs `measure`; returns the exit code.
pub fn run(ctx: &Ctx, args: MeasureArgs) -> i32 {
    match measure(ctx, &args) {
        Ok(code) => code,
        Err(f) => {
            ctx.fail(&f);
            1
        }
    }
}

fn measure(ctx: &Ctx, args: &MeasureArgs) -> Result<i32, Failure> {
    let output = match OutputFormat::parse(&args.output) {
        Ok(o) => o,
        Err(msg) => return Ok(ctx.usage("measure", &msg)),
    };
    let size = args
        .size
        .as_deref()
        .map(|t| parse_size_arg("image size", t))
        .transpose()?;
    if args.files.len() > 1 {
        return Err(Failure::same("At most one filename argument is allowed."));
    }
    let file = args.files.first();
    match (size, file) {
        (Some(_), Some(_)) => {
            return Err(Failure::same(
                "--size N cannot be used together with a filename.",
            ))
        }
        (None, None) => {
            return Err(Failure::same(
                "Either --size N or one filename must be specified.",
            ))
        }
        _ => {}
    }
    let target = args.target_format.as_deref().unwrap_or("raw");
    let driver = vdisk_blockjobs::format_by_name(target).map_err(|_| {
        Failure::new(
            format!("Unknown file format '{target}'"),
            format!(
                "measure: unknown target format '{target}' (this build knows: {})",
                known()
            ),
        )
    })?;
    let options = CreateOptions::parse_options(&args.options.join(","))
        .map_err(|e| Failure::same(e.message().to_string()))?;
    let known_options: Vec<&str> = driver
        .create_options_help()
        .iter()
        .map(|(name, _)| *name)
        .collect();
    if let Some(bad) = options
        .keys()
        .find(|k| !known_options.contains(&k.as_str()))
    {
        return Err(Failure::new(
            format!("Invalid parameter '{bad}'\n{}: Invalid options for file format '{target}'", ctx.prog),
            format!("measure: format '{target}' has no option '{bad}' (see 'vdisk create -f {target} -o help')"),
        ));
    }
    if target != "raw" {
        return Err(Failure::same(format!(
            "measure: measuring for target format '{target}' is not supported yet"
        )));
    }
    let virtual_size = match (size, file) {
        (Some(s), _) => s,
        (None, Some(name)) => {
            if args.snapshot.is_some() {
                return Err(Failure::new(
                    "Failed to load snapshot: Block format 'raw' used by device '' does not support temporarily loading internal snapshots",
                    "measure: this image format has no internal snapshots",
                ));
            }
            let spec = OpenSpec {
                format: args.format.as_deref(),
                force_share: args.force_share,
                ..OpenSpec::default()
            };
            let dev = open(name, &spec)?;
            vdisk_blockjobs::map::visible_len(dev.as_ref())
        }
        (None, None) => 0,
    };
    // A raw image needs exactly its guest size, whatever the source holds.
    let required = sectors(virtual_size);
    let text = match output {
        OutputFormat::Json => format!(
            "{}\n",
            qemu_json(&json!({"required": required, "fully-allocated": required}))
        ),
        OutputFormat::Human => {
            format!("required size: {required}\nfully allocated size: {required}\n")
        }
    };
    print(&text);
    Ok(0)
}

fn known() -> String {
    vdisk_blockjobs::formats()
        .iter()
        .map(|f| f.name())
        .collect::<Vec<_>>()
        .join(", ")
}
