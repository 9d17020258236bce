//! `vdisk amend`: change format options of an existing image in place.
//!
//! The command line, the option checks and their order are qemu-img 10's: `-o` lists are
//! checked as they come, `-o help` with `-f` needs no image, the options are parsed against
//! the format's amendable options (an option that only `create` takes is named as such), and
//! only then does the driver change the image (`Format::amend`). qemu's qcow2 driver refuses
//! to change the backing file here (that is `rebase`'s job), and so does this command; a
//! `size` is applied as a resize after the other options, as qemu's qcow2 driver does.

use std::path::PathBuf;

use clap::Args;
use vdisk_block::format::split_option_list;
use vdisk_block::{CacheMode, CreateOptions, OpenOptions, Preallocation};

use super::rebase::QemuProgress;
use super::resize::{qemu_size_option, set_size, warn_if_probed_raw};
use super::{open_with, parse_image_opts, print, OpenSpec};
use crate::context::{host_path, Failure};
use crate::Ctx;

/// The long `--help` text of `amend`.
pub const LONG_ABOUT: &str = "Change format-specific options of an existing image in place.\n\n\
     Options go in -o as key=value pairs separated by commas; '-o help' lists the ones the \
     format can change (qcow2: compat, lazy_refcounts, refcount_bits, data_file, \
     data_file_raw, size; luks: key slots with state, new-secret, old-secret, keyslot, \
     iter-time and the image's key-secret). The backing file is changed with 'rebase', not here.\n\n\
     Example: vdisk amend -o compat=1.1,lazy_refcounts=on disk.qcow2";

/// Arguments of `amend`.
#[derive(Debug, Args)]
pub struct AmendArgs {
    /// Define a QEMU object, e.g. secret,id=sec0,data=PASSPHRASE (or file=PATH)
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// FILENAME is an option list: driver=FMT,file.filename=PATH,...
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet: print only errors
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Format of the image (default: probed)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Cache mode for the image (writeback, none, writethrough, directsync, unsafe)
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Allow certain unsafe operations (luks: erase the last active key slot, overwrite an
    /// active one)
    #[arg(long = "force")]
    pub force: bool,
    /// Options to change, key=value,... ('-o help' lists them); may repeat
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// The image
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// How qemu types an option value, which decides how it is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Bool,
    Num,
    Size,
}

/// One amendable option as qemu-img lists it.
struct AmendOption {
    name: &'static str,
    kind: Kind,
    help: &'static str,
}

const fn opt(name: &'static str, kind: Kind, help: &'static str) -> AmendOption {
    AmendOption { name, kind, help }
}

/// qemu's qcow2 `amend_opts`, sorted as `-o help` prints them.
const QCOW2_AMEND: &[AmendOption] = &[
    opt("backing_file", Kind::Str, "File name of a base image"),
    opt("backing_fmt", Kind::Str, "Image format of the base image"),
    opt(
        "compat",
        Kind::Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    opt("data_file", Kind::Str, "File name of an external data file"),
    opt(
        "data_file_raw",
        Kind::Bool,
        "The external data file must stay valid as a raw image",
    ),
    opt(
        "encrypt.iter-time",
        Kind::Num,
        "Time to spend in PBKDF in milliseconds",
    ),
    opt(
        "encrypt.keyslot",
        Kind::Num,
        "Select a single keyslot to modify explicitly",
    ),
    opt(
        "encrypt.new-secret",
        Kind::Str,
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    opt(
        "encrypt.old-secret",
        Kind::Str,
        "Select all keyslots that match this password",
    ),
    opt(
        "encrypt.state",
        Kind::Str,
        "Select new state of affected keyslots (active/inactive)",
    ),
    opt("lazy_refcounts", Kind::Bool, "Postpone refcount updates"),
    opt(
        "refcount_bits",
        Kind::Num,
        "Width of a reference count entry in bits",
    ),
    opt("size", Kind::Size, "Virtual disk size"),
];

/// qemu's luks `amend_opts` (key slots), sorted as `-o help` prints them.
const LUKS_AMEND: &[AmendOption] = &[
    opt(
        "iter-time",
        Kind::Num,
        "Time to spend in PBKDF in milliseconds",
    ),
    opt(
        "keyslot",
        Kind::Num,
        "Select a single keyslot to modify explicitly",
    ),
    opt(
        "new-secret",
        Kind::Str,
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    opt(
        "old-secret",
        Kind::Str,
        "Select all keyslots that match this password",
    ),
    opt(
        "state",
        Kind::Str,
        "Select new state of affected keyslots (active/inactive)",
    ),
];

/// The options `format` can amend, or `None` when its driver cannot amend at all.
fn amend_options(format: &str) -> Option<&'static [AmendOption]> {
    match format {
        "qcow2" => Some(QCOW2_AMEND),
        "luks" => Some(LUKS_AMEND),
        _ => None,
    }
}

/// Runs `amend`; returns the exit code.
pub fn run(ctx: &Ctx, args: AmendArgs) -> i32 {
    // Held to the end: dropping it removes the secrets again.
    let _secrets = match crate::object::define_all(&args.object) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    for list in &args.options {
        if !is_valid_option_list(list) {
            ctx.fail(&Failure::new(
                format!("Invalid option list: {list}"),
                format!("amend: invalid option list '{list}' (use key=value,key=value)"),
            ));
            return 1;
        }
    }
    if args.options.is_empty() {
        return ctx.usage("amend", "Must specify options (-o)");
    }
    let progress = QemuProgress::new(args.progress && !args.quiet, 1.0);
    let code = match amend(&args, &progress) {
        Ok(()) => 0,
        Err(f) => {
            ctx.fail(&f);
            1
        }
    };
    progress.end();
    code
}

/// qemu's `is_valid_option_list`: not empty, not starting with a comma, and not ending in
/// an odd number of commas (a doubled comma is an escaped one).
fn is_valid_option_list(list: &str) -> bool {
    if list.is_empty() || list.starts_with(',') {
        return false;
    }
    let trailing = list.len() - list.trim_end_matches(',').len();
    trailing.is_multiple_of(2)
}

fn has_help(items: &[String]) -> bool {
    items.iter().any(|i| i == "help" || i == "?")
}

fn amend(args: &AmendArgs, progress: &QemuProgress) -> Result<(), Failure> {
    let items = split_option_list(&args.options.join(","));
    if let (Some(format), true) = (args.format.as_deref(), has_help(&items)) {
        return print_help(format);
    }
    let [name] = args.files.as_slice() else {
        return Err(Failure::new(
            "Expecting one image file name",
            "amend: name exactly one image",
        ));
    };
    let mut options = OpenOptions::read_write();
    if let Some(cache) = args.cache.as_deref() {
        options.cache = CacheMode::parse(cache).map_err(|e| {
            Failure::new(
                format!("Invalid cache option: {cache}"),
                format!("amend: invalid cache mode '{cache}': {}", e.message()),
            )
        })?;
    }
    let spec = OpenSpec {
        format: args.format.as_deref(),
        writable: true,
        image_opts: args.image_opts,
        ..OpenSpec::default()
    };
    let dev = open_with(name, &spec, options)?;
    warn_if_probed_raw(&*dev, name, args.format.is_none() && !args.image_opts);
    let info = dev
        .info()
        .map_err(|e| Failure::same(e.message().to_string()))?;
    let format = info.format.clone();
    if has_help(&items) {
        return print_help(&format);
    }
    let Some(known) = amend_options(&format) else {
        return Err(not_amendable(&format));
    };
    let values = parse_items(name, &format, known, &items)?;
    // The driver options go to the driver too: luks needs `key-secret` for its key slots.
    let (path, driver_options) = match args.image_opts {
        true => {
            let opts = parse_image_opts(name)?;
            (PathBuf::from(opts.filename), opts.options)
        }
        false => (PathBuf::from(host_path(name)), Default::default()),
    };
    progress.print(0.0, 0.0);
    let driver = Driver {
        options: &driver_options,
        force: args.force,
    };
    let result = driver_stage(name, &path, &info, dev, &spec, driver, values, progress);
    progress.print(100.0, 0.0);
    result
}

/// What the driver gets besides the `-o` values.
struct Driver<'a> {
    /// The `--image-opts` driver options.
    options: &'a std::collections::BTreeMap<String, String>,
    /// `--force`.
    force: bool,
}

/// What qemu's driver does: its own checks of the values, then the changes.
#[allow(clippy::too_many_arguments)]
fn driver_stage(
    name: &str,
    path: &std::path::Path,
    info: &vdisk_block::dev::ImageInfo,
    dev: std::sync::Arc<dyn vdisk_block::BlockDev>,
    spec: &OpenSpec<'_>,
    driver: Driver<'_>,
    mut values: std::collections::BTreeMap<String, String>,
    progress: &QemuProgress,
) -> Result<(), Failure> {
    let upgrade = matches!(values.get("compat").map(String::as_str), Some("1.1" | "v3"))
        && compat_of(&*dev).as_deref() == Some("0.10");
    // The checks qemu's qcow2 driver makes before it changes anything.
    if let Some(level) = values.get("compat") {
        if !["0.10", "v2", "1.1", "v3"].contains(&level.as_str()) {
            return Err(Failure::new(
                format!("Unknown compatibility level {level}"),
                format!("amend '{name}': unknown compat level '{level}' (use 0.10 or 1.1)"),
            ));
        }
    }
    if !info.encrypted && values.keys().any(|k| k.starts_with("encrypt.")) {
        return Err(Failure::new(
            "Can't amend encryption options - encryption not present",
            format!("amend '{name}': the image is not encrypted, so it has no encryption options"),
        ));
    }
    let backing_file = values.remove("backing_file");
    let backing_fmt = values.remove("backing_fmt");
    if (backing_file.is_some() || backing_fmt.is_some())
        && (backing_file != info.backing_filename || backing_fmt != info.backing_format)
    {
        return Err(Failure::new(
            "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
            format!("amend '{name}': the backing file is changed with 'vdisk rebase', not amend"),
        ));
    }
    let new_size = values
        .remove("size")
        .map(|v| qemu_size_option("size", &v))
        .transpose()?
        .filter(|&s| s != 0);
    // The driver opens the file itself: the image must be closed first.
    drop(dev);
    if upgrade {
        // qemu's qcow2 driver reports its upgrade in two halves.
        for percent in [0.0, 50.0, 100.0] {
            progress.print(percent, 0.0);
        }
    }
    apply(name, path, &info.format, spec, driver, values, new_size)
}

/// The qcow2 compat level of `dev` (`0.10` or `1.1`), if it has one.
fn compat_of(dev: &dyn vdisk_block::BlockDev) -> Option<String> {
    let specific = dev.format_specific().ok().flatten()?;
    specific.data.iter().find_map(|(k, v)| match v {
        vdisk_block::dev::InfoValue::Text(t) if k == "compat" => Some(t.clone()),
        _ => None,
    })
}

fn apply(
    name: &str,
    path: &std::path::Path,
    format: &str,
    spec: &OpenSpec<'_>,
    given: Driver<'_>,
    values: std::collections::BTreeMap<String, String>,
    new_size: Option<u64>,
) -> Result<(), Failure> {
    let driver = vdisk_blockjobs::format_by_name(format)
        .map_err(|e| Failure::same(e.message().to_string()))?;
    if !values.is_empty() {
        driver
            .amend_with(
                path,
                given.options,
                given.force,
                CreateOptions {
                    size: 0,
                    options: values,
                },
            )
            .map_err(|e| amend_failure(name, &e))?;
    }
    if let Some(size) = new_size {
        let spec = OpenSpec {
            format: Some(format),
            image_opts: false,
            ..spec.clone()
        };
        let dev = super::open(&path.to_string_lossy(), &spec)?;
        set_size(&*dev, name, size, Preallocation::Off)?;
    }
    Ok(())
}

/// qemu's words for a refusal of the driver where vdisk's differ.
fn amend_failure(name: &str, err: &vdisk_block::Error) -> Failure {
    // vdisk's qcow2 driver words this as qemu's `create` does; qemu's amend names the
    // amend option instead.
    let qemu = err
        .message()
        .replace("(use version=v3 or greater)", "(use compat=1.1 or greater)");
    Failure::new(
        qemu,
        format!("amend '{name}': {}", err.message().trim_end()),
    )
}

fn not_amendable(format: &str) -> Failure {
    Failure::new(
        format!("Format driver '{format}' does not support option amendment"),
        format!("amend: {format} images have no options that can be changed in place"),
    )
}

/// `-o help`: the amendable options of `format`.
fn print_help(format: &str) -> Result<(), Failure> {
    if vdisk_blockjobs::format_by_name(format).is_err() {
        return Err(Failure::new(
            format!("Unknown file format '{format}'"),
            format!("amend: unknown format '{format}'"),
        ));
    }
    let known = amend_options(format).ok_or_else(|| not_amendable(format))?;
    let text = super::option_help::render(
        &format!("Amend options for '{format}':"),
        known.iter().map(|o| {
            let kind = match o.kind {
                Kind::Str => super::option_help::Kind::Text,
                Kind::Bool => super::option_help::Kind::Bool,
                Kind::Num => super::option_help::Kind::Number,
                Kind::Size => super::option_help::Kind::Size,
            };
            (o.name, kind, o.help)
        }),
        "",
    );
    print(&text);
    Ok(())
}

/// Splits `key=value` (a bare `key` is `key=on`, a bare `noKEY` is `KEY=off`).
fn key_value(item: &str) -> (String, String) {
    match item.split_once('=') {
        Some((k, v)) => (k.to_string(), v.to_string()),
        None => match item.strip_prefix("no") {
            Some(rest) => (rest.to_string(), "off".to_string()),
            None => (item.to_string(), "on".to_string()),
        },
    }
}

/// Checks a value of type `kind` as qemu's option parser does.
fn check_value(key: &str, value: &str, kind: Kind) -> Result<String, Failure> {
    match kind {
        Kind::Str => Ok(value.to_string()),
        Kind::Bool => match value {
            "on" | "yes" | "true" | "y" => Ok("on".into()),
            "off" | "no" | "false" | "n" => Ok("off".into()),
            _ => Err(Failure::new(
                format!("Parameter '{key}' expects 'on' or 'off'"),
                format!("amend: option {key} takes on or off, not '{value}'"),
            )),
        },
        // The text goes on unchanged: qemu's driver reads it again with its own parser.
        Kind::Num => match vdisk_block::size::qemu_strtou64(value) {
            Ok(_) => Ok(value.to_string()),
            Err(vdisk_block::size::NumberError::TooLarge) => Err(Failure::new(
                format!("Value '{value}' is too large for parameter '{key}'"),
                format!("amend: option {key} is too large: '{value}'"),
            )),
            Err(vdisk_block::size::NumberError::NotANumber) => Err(Failure::new(
                format!("Parameter '{key}' expects a number"),
                format!("amend: option {key} takes a number, not '{value}'"),
            )),
        },
        Kind::Size => qemu_size_option(key, value).map(|v| v.to_string()),
    }
}

/// Parses the `-o` items against the amendable options (the last of a repeated key wins).
/// An option that only `create` takes is named as such, as qemu-img does when the whole
/// list would parse as creation options.
fn parse_items(
    name: &str,
    format: &str,
    known: &[AmendOption],
    items: &[String],
) -> Result<std::collections::BTreeMap<String, String>, Failure> {
    let mut out = std::collections::BTreeMap::new();
    for item in items.iter().filter(|i| !i.is_empty()) {
        let (key, value) = key_value(item);
        let Some(o) = known.iter().find(|o| o.name == key) else {
            let hint = if parses_as_create(format, known, items) {
                "\nThis option is only supported for image creation"
            } else {
                ""
            };
            return Err(Failure::new(
                format!("Invalid parameter '{key}'{hint}"),
                format!(
                    "amend '{name}': format '{format}' cannot change option '{key}' in place (see -o help)"
                ),
            ));
        };
        let value = check_value(&key, &value, o.kind)?;
        out.insert(key, value);
    }
    Ok(out)
}

/// qemu's qcow2 options that only `create` takes, with their types.
const QCOW2_CREATE_ONLY: &[(&str, Kind)] = &[
    ("cluster_size", Kind::Size),
    ("compression_type", Kind::Str),
    ("encrypt.cipher-alg", Kind::Str),
    ("encrypt.cipher-mode", Kind::Str),
    ("encrypt.format", Kind::Str),
    ("encrypt.hash-alg", Kind::Str),
    ("encrypt.ivgen-alg", Kind::Str),
    ("encrypt.ivgen-hash-alg", Kind::Str),
    ("encrypt.key-secret", Kind::Str),
    ("encryption", Kind::Bool),
    ("extended_l2", Kind::Bool),
    ("preallocation", Kind::Str),
];

/// qemu's luks options that only `create` takes (the file protocol's are not among them).
const LUKS_CREATE_ONLY: &[(&str, Kind)] = &[
    ("cipher-alg", Kind::Str),
    ("cipher-mode", Kind::Str),
    ("detached-header", Kind::Bool),
    ("hash-alg", Kind::Str),
    ("ivgen-alg", Kind::Str),
    ("ivgen-hash-alg", Kind::Str),
    ("key-secret", Kind::Str),
    ("size", Kind::Size),
];

/// Whether every item is an amend or a create option of `format` with a well-typed value.
fn parses_as_create(format: &str, known: &[AmendOption], items: &[String]) -> bool {
    let create_only = match format {
        "qcow2" => QCOW2_CREATE_ONLY,
        "luks" => LUKS_CREATE_ONLY,
        _ => &[],
    };
    items.iter().filter(|i| !i.is_empty()).all(|item| {
        let (key, value) = key_value(item);
        if let Some(o) = known.iter().find(|o| o.name == key) {
            return check_value(&key, &value, o.kind).is_ok();
        }
        match create_only.iter().find(|(n, _)| *n == key) {
            Some((_, kind)) => check_value(&key, &value, *kind).is_ok(),
            None => false,
        }
    })
}
