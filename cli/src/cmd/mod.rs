//! One module per sub-command, plus what several of them share: opening an image by the name
//! the user gave and turning failures into qemu-img's words.

pub mod amend;
pub mod bench;
pub mod bitmap;
pub mod check;
pub mod checksum;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod info;
pub mod map;
pub mod measure;
pub mod option_enums;
pub mod option_help;
pub mod rebase;
pub mod resize;
pub mod snapshot;

use std::path::Path;
use std::sync::Arc;

use vdisk_block::{BlockDev, CacheMode, OpenOptions};

use crate::context::{host_path, open_failure, Failure};

/// How a command wants an image opened.
#[derive(Debug, Clone, Default)]
pub struct OpenSpec<'a> {
    /// The format the user named (`-f`), or `None` to probe.
    pub format: Option<&'a str>,
    /// Open for writing.
    pub writable: bool,
    /// `-U`: do not take locks.
    pub force_share: bool,
    /// `-T`: the cache mode, qemu's spelling.
    pub cache: Option<&'a str>,
    /// Open no backing file (qemu-img's `info` without `--backing-chain` never does).
    pub no_backing: bool,
    /// `--image-opts`: the name is a `driver=...,file.filename=...,key=value` list.
    pub image_opts: bool,
}

/// What an `--image-opts` string names: the driver (probed when absent), the host file,
/// and the driver's own options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageOpts {
    /// `driver=`.
    pub driver: Option<String>,
    /// `file.filename=`.
    pub filename: String,
    /// Everything else, for the driver.
    pub options: std::collections::BTreeMap<String, String>,
}

/// Parses `--image-opts` text as qemu-img does for the keys vdisk knows: `driver`,
/// `file.filename` (with `file.driver=file` accepted), and driver options, which the
/// driver must list in [`vdisk_block::Format::open_option_names`].
pub fn parse_image_opts(text: &str) -> Result<ImageOpts, Failure> {
    if !text.contains('=') {
        return Err(Failure::new(
            format!("Could not open '{text}': Cannot find device='{text}' nor node-name='{text}'"),
            format!(
                "cannot open '{text}': with --image-opts, name the image as driver=FMT,file.filename=PATH"
            ),
        ));
    }
    let mut driver = None;
    let mut filename = None;
    let mut options = std::collections::BTreeMap::new();
    for item in vdisk_block::format::split_option_list(text) {
        let Some((key, value)) = item.split_once('=') else {
            continue;
        };
        match key {
            "driver" => driver = Some(value.to_string()),
            "file.filename" => filename = Some(value.to_string()),
            "file.driver" if value == "file" => {}
            _ => {
                options.insert(key.to_string(), value.to_string());
            }
        }
    }
    let filename = filename.ok_or_else(|| {
        Failure::new(
            format!("Could not open '{text}': A block device must be specified for \"file\""),
            format!("cannot open '{text}': the image options name no file.filename"),
        )
    })?;
    Ok(ImageOpts {
        driver,
        filename,
        options,
    })
}

/// Opens `name` (as the user spelled it) through the format registry.
pub fn open(name: &str, spec: &OpenSpec<'_>) -> Result<Arc<dyn BlockDev>, Failure> {
    let options = if spec.writable {
        OpenOptions::read_write()
    } else {
        OpenOptions::read_only()
    };
    open_with(name, spec, options)
}

/// [`open`] starting from `options` (a command's own engine or cache settings).
pub fn open_with(
    name: &str,
    spec: &OpenSpec<'_>,
    mut options: OpenOptions,
) -> Result<Arc<dyn BlockDev>, Failure> {
    options.force_share = spec.force_share;
    options.no_backing = spec.no_backing;
    if let Some(cache) = spec.cache {
        options.cache = CacheMode::parse(cache).map_err(|e| {
            Failure::new(
                format!("Invalid source cache option: {cache}"),
                format!("invalid cache mode '{cache}': {}", e.message()),
            )
        })?;
    }
    if !spec.image_opts {
        return vdisk_blockjobs::open_image(Path::new(host_path(name)), spec.format, &options)
            .map_err(|e| open_failure(name, &e));
    }
    if spec.format.is_some() {
        return Err(Failure::same(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let opts = parse_image_opts(name)?;
    let path = Path::new(&opts.filename);
    let driver = image_opts_driver(name, &opts)?;
    if let Some(key) = opts
        .options
        .keys()
        .find(|k| !driver.open_option_names().contains(&k.as_str()))
    {
        return Err(Failure::new(
            format!(
                "Could not open '{name}': Block format '{}' does not support the option '{key}'",
                driver.name()
            ),
            format!(
                "cannot open '{name}': format '{}' has no option '{key}' (it takes: {})",
                driver.name(),
                driver.open_option_names().join(", ")
            ),
        ));
    }
    options.driver_options.extend(opts.options);
    vdisk_blockjobs::open_image(path, Some(driver.name()), &options)
        .map_err(|e| crate::context::open_failure_of(name, &opts.filename, &e))
}

/// The driver an `--image-opts` string `name` names, probed from its file when it names
/// none.
pub fn image_opts_driver(
    name: &str,
    opts: &ImageOpts,
) -> Result<&'static dyn vdisk_block::Format, Failure> {
    match opts.driver.as_deref() {
        Some(d) => vdisk_blockjobs::format_by_name(d).map_err(|_| {
            Failure::new(
                format!("Could not open '{name}': Unknown driver '{d}'"),
                format!("cannot open '{name}': unknown format '{d}'"),
            )
        }),
        None => vdisk_blockjobs::probe(Path::new(&opts.filename))
            .map_err(|e| open_failure(&opts.filename, &e)),
    }
}

/// Writes `text` to stdout; a closed pipe is not worth a panic.
pub fn print(text: &str) {
    crate::stdout::write(text.as_bytes());
}

/// Rounds `n` up to a whole 512-byte sector, as qemu shows lengths.
pub fn sectors(n: u64) -> u64 {
    n.checked_next_multiple_of(vdisk_blockjobs::map::SECTOR)
        .unwrap_or(n)
}
