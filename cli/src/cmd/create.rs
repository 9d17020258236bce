//! `vdisk create`: make a new, empty image.
//!
//! Like qemu-img, options are checked before anything is printed, the `Formatting ...` line
//! is printed next, and only then does the driver create the file, so a failure inside the
//! driver follows that line.

use std::path::Path;

use clap::Args;
use vdisk_block::format::split_option_list;
use vdisk_block::{CreateOptions, Format};

use super::{option_help, print};
use crate::context::{create_failure, parse_size_arg, Failure};
use crate::Ctx;

/// The long `--help` text of `create`.
pub const LONG_ABOUT: &str =
    "Create a new disk image FILENAME of SIZE bytes (suffixes k, M, G, T, P, E \
                  multiply by 1024). An existing file is overwritten.\n\n\
                  Options of the format go in -o as key=value pairs separated by commas; \
                  '-o help' lists them. Raw images take preallocation=off|falloc|full.\n\n\
                  Example: vdisk create -f raw -o preallocation=falloc disk.raw 10G";

/// Arguments of `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Format of the new image
    #[arg(
        short = 'f',
        long = "format",
        value_name = "FMT",
        default_value = "raw"
    )]
    pub format: String,
    /// Format options, `key=value,...` (`-o help` lists them)
    #[arg(short = 'o', long = "options", value_name = "FMT_OPTS")]
    pub options: Vec<String>,
    /// Stack the new image on top of this backing file (formats that support it)
    #[arg(short = 'b', long = "backing", value_name = "BACKING_FILENAME")]
    pub backing: Option<String>,
    /// Format of the backing file
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    pub backing_format: Option<String>,
    /// Do not open the backing file to check it
    #[arg(short = 'u', long = "backing-unsafe")]
    pub backing_unsafe: bool,
    /// Quiet: do not print the `Formatting` line
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// The image to create, then its size (`64M`, `10G`, ...)
    #[arg(value_name = "FILENAME [SIZE]")]
    pub files: Vec<String>,
    /// Define a secret: `secret,id=ID,data=TEXT` or `secret,id=ID,file=PATH`
    /// (`format=base64` decodes it); options name it by id (`key-secret=ID`)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
}

/// One `-o` option after checking: what to print and what to hand the driver.
struct Opt {
    key: String,
    shown: String,
    value: String,
}

/// Runs `create`; returns the exit code.
pub fn run(ctx: &Ctx, args: CreateArgs) -> i32 {
    let _secrets = match crate::object::define_all(&args.object) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    match create(ctx, &args) {
        Ok(()) => 0,
        Err(f) => {
            if !f.qemu.is_empty() {
                ctx.fail(&f);
            }
            1
        }
    }
}

fn create(ctx: &Ctx, args: &CreateArgs) -> Result<(), Failure> {
    let joined = args.options.join(",");
    let items = split_option_list(&joined);
    let wants_help = items.iter().any(|i| i == "help" || i == "?");
    let name = args.files.first();
    if !wants_help {
        match args.files.len() {
            0 => {
                ctx.usage("create", "Expecting image file name");
                return Err(silent());
            }
            1 | 2 => {}
            _ => {
                ctx.usage("create", &format!("Unexpected argument: {}", args.files[2]));
                return Err(silent());
            }
        }
    }
    let prefix = name.map(|n| format!("{n}: ")).unwrap_or_default();
    let driver = vdisk_blockjobs::format_by_name(&args.format).map_err(|_| {
        Failure::new(
            format!("{prefix}Unknown file format '{}'", args.format),
            format!(
                "create: unknown format '{}' (this build knows: {})",
                args.format,
                vdisk_blockjobs::formats()
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    if wants_help {
        print(&option_help::create_help(ctx, driver, name.is_some()));
        return Ok(());
    }
    let Some(name) = name else {
        return Err(silent());
    };
    let positional_size = args
        .files
        .get(1)
        .map(|t| parse_size_arg("image size", t))
        .transpose()?;
    let mut opts = check_options(name, driver, &items)?;
    let backing = backing_options(name, driver, args, &mut opts)?;
    let option_size = opts
        .iter()
        .rev()
        .find(|o| o.key == "size")
        .map(|o| o.value.parse::<u64>().unwrap_or(0));
    let size = match (positional_size, option_size, backing) {
        (Some(_), Some(_), _) => {
            return Err(Failure::new(
                format!("{name}: The image size must be specified only once"),
                format!(
                    "create '{name}': the size is given both as SIZE and as -o size (give it once)"
                ),
            ))
        }
        (Some(s), None, _) | (None, Some(s), _) => s,
        // Without a size, an overlay takes its backing file's.
        (None, None, Some(Some(backing_size))) => backing_size,
        (None, None, _) => {
            return Err(Failure::new(
                format!("{name}: Image creation needs a size parameter"),
                format!("create '{name}': no size given (add a SIZE such as 10G)"),
            ))
        }
    };
    if !args.quiet {
        print(&formatting_line(name, driver, size, &opts));
        // qemu flushes this line before it creates anything.
        crate::stdout::flush();
    }
    let mut create_options = CreateOptions {
        size,
        ..CreateOptions::default()
    };
    let typed: Vec<(&str, &str)> = opts
        .iter()
        .map(|o| (o.key.as_str(), o.shown.as_str()))
        .collect();
    if let Some(why) = super::option_enums::refusal(driver.name(), &typed) {
        return Err(Failure::new(
            format!("{name}: {why}"),
            format!("create '{name}': {why}"),
        ));
    }
    let extras = option_help::protocol_extras(driver);
    for o in opts.iter().filter(|o| o.key != "size") {
        if o.key == "preallocation"
            && !["off", "metadata", "falloc", "full"].contains(&o.value.as_str())
        {
            return Err(Failure::new(
                format!("{name}: invalid parameter value: {}", o.value),
                format!(
                    "create '{name}': invalid preallocation mode '{}' (use off, falloc or full)",
                    o.value
                ),
            ));
        }
        if o.key == "extent_size_hint" && o.value.parse::<u64>().unwrap_or(0) > u64::from(u32::MAX)
        {
            return Err(Failure::new(
                format!("{name}: Extent size hint is too large"),
                format!("create '{name}': the extent size hint must be below 4 GiB"),
            ));
        }
        if extras.contains(&o.key.as_str()) {
            // The file protocol's option, which has no effect on this format's file.
            if o.value == "metadata" {
                return Err(Failure::new(
                    format!("{name}: Unsupported preallocation mode: metadata"),
                    format!(
                        "create '{name}': preallocation=metadata needs a format with metadata to preallocate (use off, falloc or full)"
                    ),
                ));
            }
            continue;
        }
        create_options
            .options
            .insert(o.key.clone(), o.value.clone());
    }
    let path = Path::new(crate::context::host_path(name));
    vdisk_blockjobs::registry::create_image(path, driver.name(), create_options)
        .map_err(|e| create_failure(name, driver.name(), &e))
}

/// A failure already reported (usage errors print their own lines).
fn silent() -> Failure {
    Failure::same(String::new())
}

/// Folds `-b`/`-F` into the `backing_file`/`backing_fmt` options and, unless `-u` was given,
/// opens the backing file to check it. Returns `None` without a backing file, otherwise the
/// backing file's size when it was opened.
fn backing_options(
    name: &str,
    driver: &dyn Format,
    args: &CreateArgs,
    opts: &mut Vec<Opt>,
) -> Result<Option<Option<u64>>, Failure> {
    for (key, value) in [
        ("backing_file", &args.backing),
        ("backing_fmt", &args.backing_format),
    ] {
        if let Some(value) = value {
            opts.retain(|o| o.key != key);
            opts.push(Opt {
                key: key.to_string(),
                shown: value.replace(',', ",,"),
                value: value.clone(),
            });
        }
    }
    let get = |key: &str| opts.iter().find(|o| o.key == key).map(|o| o.value.clone());
    let Some(backing) = get("backing_file") else {
        return Ok(None);
    };
    let format = driver.name();
    let takes_backing = driver
        .create_options_help()
        .iter()
        .any(|(n, _)| *n == "backing_file");
    if !takes_backing {
        return Err(Failure::new(
            format!("{name}: Backing file not supported for file format '{format}'"),
            format!(
                "create '{name}': {format} images cannot have a backing file (use a format that can, such as qcow2)"
            ),
        ));
    }
    // The backing file is named relative to the new image, not to the working folder.
    let resolved = match Path::new(name).parent() {
        Some(dir) if !Path::new(&backing).is_absolute() && !dir.as_os_str().is_empty() => {
            dir.join(&backing)
        }
        _ => Path::new(&backing).to_path_buf(),
    };
    let Some(backing_fmt) = get("backing_fmt") else {
        let detected = vdisk_blockjobs::probe(&resolved)
            .map(|f| format!("\nDetected format of {}.", f.name()))
            .unwrap_or_default();
        return Err(Failure::new(
            format!("{name}: Backing file specified without backing format{detected}"),
            format!(
                "create '{name}': give the backing file's format with -F (it is never guessed)"
            ),
        ));
    };
    if args.backing_unsafe {
        return Ok(Some(None));
    }
    let mut options = vdisk_block::OpenOptions::read_only();
    options.force_share = true;
    match vdisk_blockjobs::open_image(&resolved, Some(&backing_fmt), &options) {
        Ok(dev) => Ok(Some(Some(dev.size()))),
        Err(e) => Err(Failure::new(
            format!(
                "{name}: Could not open '{}': {}\nCould not open backing image.",
                resolved.display(),
                crate::context::without_hint(e.message())
            ),
            format!(
                "create '{name}': cannot open the backing file '{}': {} (use -u to create the image anyway)",
                resolved.display(),
                e.message()
            ),
        )),
    }
}

/// Checks each `-o` item: known to the driver, and a valid value of its type.
fn check_options(name: &str, driver: &dyn Format, items: &[String]) -> Result<Vec<Opt>, Failure> {
    let mut known: Vec<&str> = driver
        .create_options_help()
        .iter()
        .map(|(n, _)| *n)
        .collect();
    known.extend(option_help::protocol_extras(driver));
    let mut out: Vec<Opt> = Vec::new();
    for item in items.iter().filter(|i| !i.is_empty()) {
        let (key, value) = option_help::key_value(item);
        if !known.contains(&key.as_str()) {
            return Err(Failure::new(
                format!("{name}: Invalid parameter '{key}'"),
                format!(
                    "create '{name}': format '{}' has no option '{key}' (see -o help)",
                    driver.name()
                ),
            ));
        }
        let checked =
            option_help::check_value(&key, option_help::kind(driver.name(), &key), &value)
                .map_err(|f| {
                    Failure::new(
                        format!("{name}: {}", f.qemu),
                        format!("create '{name}': {}", f.vdisk),
                    )
                })?;
        // A repeated option keeps its last value, as in qemu.
        out.retain(|o| o.key != key);
        out.push(Opt {
            key,
            shown: checked.shown,
            value: checked.value,
        });
    }
    Ok(out)
}

fn formatting_line(name: &str, driver: &dyn Format, size: u64, opts: &[Opt]) -> String {
    let mut line = format!("Formatting '{name}', fmt={}", driver.name());
    for (key, default) in driver.create_options_shown() {
        if key == "size" {
            // qemu prints the size as a signed number.
            line.push_str(&format!(" size={}", size as i64));
        } else if let Some(o) = opts.iter().find(|o| o.key == key) {
            line.push_str(&format!(" {}={}", o.key, o.shown));
        } else if let Some(default) = default {
            line.push_str(&format!(" {key}={default}"));
        }
    }
    // The file protocol's options follow the format's, as in qemu.
    for key in option_help::protocol_extras(driver) {
        if let Some(o) = opts.iter().find(|o| o.key == key) {
            line.push_str(&format!(" {}={}", o.key, o.shown));
        }
    }
    line.push('\n');
    line
}
