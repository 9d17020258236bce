//! `vdisk measure`: how many bytes a new image of a given size, or a converted copy of an
//! existing image, will need.

use clap::Args;
use serde_json::{Map, Value};
use vdisk_block::format::{split_option_list, Measurement};
use vdisk_block::{CreateOptions, ErrorKind};

use super::{open, print, OpenSpec};
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
    /// FILENAME is a `driver=FMT,file.filename=PATH,key=value` list, as qemu's --image-opts
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The image to be converted
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
    /// Define a secret: `secret,id=ID,data=TEXT` or `secret,id=ID,file=PATH`
    /// (`format=base64` decodes it); options name it by id (`key-secret=ID`)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
}

/// Runs `measure`; returns the exit code.
pub fn run(ctx: &Ctx, args: MeasureArgs) -> i32 {
    let _secrets = match crate::object::define_all(&args.object) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    match measure(ctx, &args) {
        Ok(code) => code,
        Err(f) => {
            ctx.fail(&f);
            1
        }
    }
}

/// Checks the `-o` items as qemu's option parser does (known name, value of the right type)
/// and returns them with booleans and numbers in plain spelling; a repeated option keeps
/// its last value.
fn parse_options(
    ctx: &Ctx,
    target: &str,
    known: &[&str],
    items: &[String],
) -> Result<Vec<(String, String)>, Failure> {
    let invalid_options = format!("\n{}: Invalid options for file format '{target}'", ctx.prog);
    let mut out: Vec<(String, String)> = Vec::new();
    for item in items.iter().filter(|i| !i.is_empty()) {
        let (key, value) = super::option_help::key_value(item);
        if !known.contains(&key.as_str()) {
            return Err(Failure::new(
                format!("Invalid parameter '{key}'{invalid_options}"),
                format!("measure: format '{target}' has no option '{key}' (see 'vdisk create -f {target} -o help')"),
            ));
        }
        let kind = super::option_help::kind(target, &key);
        let value = super::option_help::check_value(&key, kind, &value)
            .map_err(|f| {
                Failure::new(
                    format!("{}{invalid_options}", f.qemu),
                    format!("measure: {}", f.vdisk),
                )
            })?
            .value;
        out.retain(|(k, _)| *k != key);
        out.push((key, value));
    }
    Ok(out)
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
    if file.is_none() && (args.image_opts || args.format.is_some() || args.snapshot.is_some()) {
        return Err(Failure::same(
            "--image-opts, -f, and -l require a filename argument.",
        ));
    }
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
    // qemu opens the source before it looks at the target format or options.
    let source = match file {
        None => None,
        Some(name) => {
            let spec = OpenSpec {
                format: args.format.as_deref(),
                force_share: args.force_share,
                image_opts: args.image_opts,
                ..OpenSpec::default()
            };
            let dev = open(name, &spec)?;
            // As qemu-img: a name or id (ids first), or snapshot.id=ID[,snapshot.name=NAME].
            let params: Vec<String> = args.snapshot.iter().cloned().collect();
            if let Some(which) = super::snapshot::parse_source_snapshot(ctx, &params, &[])? {
                super::snapshot::load_source_snapshot(std::slice::from_ref(&dev), &which).map_err(
                    |mut f| {
                        if let Some(rest) = f.vdisk.strip_prefix("convert: ") {
                            f.vdisk = format!("measure: {rest}");
                        }
                        f
                    },
                )?;
            }
            Some(dev)
        }
    };
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
    let known_options: Vec<&str> = driver
        .create_options_help()
        .iter()
        .map(|(name, _)| *name)
        .collect();
    let items = split_option_list(&args.options.join(","));
    let mut options = CreateOptions::default();
    for (key, value) in parse_options(ctx, target, &known_options, &items)? {
        options.options.insert(key, value);
    }
    // --size wins over `-o size`, as qemu sets it after parsing the options.
    let from_options = options
        .take("size")
        .map(|v| v.parse::<u64>().unwrap_or(0))
        .unwrap_or(0);
    options.size = size.unwrap_or(from_options);
    let m = driver
        .measure(options, source.as_deref())
        .map_err(|e| match e.kind() {
            ErrorKind::Unsupported | ErrorKind::InvalidInput => {
                Failure::same(e.message().to_string())
            }
            _ => Failure::new(e.message().to_string(), format!("measure: {e}")),
        })?;
    print(&render(&m, output));
    Ok(0)
}

/// qemu-img's output: JSON in `BlockMeasureInfo` order, or the human lines.
fn render(m: &Measurement, output: OutputFormat) -> String {
    match output {
        OutputFormat::Json => {
            let mut obj = Map::new();
            if let Some(b) = m.bitmaps {
                obj.insert("bitmaps".into(), b.into());
            }
            obj.insert("required".into(), m.required.into());
            obj.insert("fully-allocated".into(), m.fully_allocated.into());
            format!("{}\n", qemu_json(&Value::Object(obj)))
        }
        OutputFormat::Human => {
            let mut text = format!(
                "required size: {}\nfully allocated size: {}\n",
                m.required, m.fully_allocated
            );
            if let Some(b) = m.bitmaps {
                text.push_str(&format!("bitmaps size: {b}\n"));
            }
            text
        }
    }
}

fn known() -> String {
    vdisk_blockjobs::formats()
        .iter()
        .map(|f| f.name())
        .collect::<Vec<_>>()
        .join(", ")
}
