//! The formats this build knows, and opening an image by name.
//!
//! Probing reads the first bytes of the named file and asks each driver how sure it is. Raw
//! wins only when nothing else claims the file. Probing is never used for a backing file: its
//! format comes from the image or the caller.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use vdisk_block::format::ImageOpener;
use vdisk_block::{BlockDev, Error, ErrorKind, Format, OpenOptions, RawFormat, Result};

/// How many leading bytes drivers get to look at when probing.
pub const PROBE_BYTES: usize = 4096;

/// Every format driver of this build.
pub fn formats() -> Vec<&'static dyn Format> {
    vec![
        &RawFormat,
        &vdisk_qcow2::Qcow2Format,
        &vdisk_vhdx::VhdxFormat,
        &vdisk_vhdx::VpcFormat,
        &vdisk_vmdk::VmdkFormat,
        &vdisk_luks::LuksFormat,
    ]
}

/// The driver named `name` (qemu-img's spelling).
pub fn format_by_name(name: &str) -> Result<&'static dyn Format> {
    formats()
        .into_iter()
        .find(|f| f.name() == name)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "open",
                format!("Unknown driver '{name}'"),
            )
            .with_source(std::io::Error::other(format!(
                "this build of vdisk supports: {}",
                formats()
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        })
}

/// Guesses the format of `path` from its first bytes.
pub fn probe(path: &Path) -> Result<&'static dyn Format> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io("open", e).with_path(path))?;
    if file
        .metadata()
        .map_err(|e| Error::io("open", e).with_path(path))?
        .is_dir()
    {
        return Err(
            Error::invalid("open", "is a directory, not a disk image file").with_path(path),
        );
    }
    let mut header = Vec::with_capacity(PROBE_BYTES);
    file.by_ref()
        .take(PROBE_BYTES as u64)
        .read_to_end(&mut header)
        .map_err(|e| Error::io("probe", e).with_path(path))?;
    let mut best: Option<(&'static dyn Format, u32)> = None;
    for format in formats() {
        let score = format.probe(&header, path);
        if score > 0 && best.is_none_or(|(_, s)| score > s) {
            best = Some((format, score));
        }
    }
    best.map(|(f, _)| f).ok_or_else(|| {
        Error::unsupported("probe", "no driver recognises the image").with_path(path)
    })
}

/// Opens `path` as `format` (or the probed format when `None`). Backing files and parents
/// are opened through this registry too, within `options.policy`.
pub fn open_image(
    path: &Path,
    format: Option<&str>,
    options: &OpenOptions,
) -> Result<Arc<dyn BlockDev>> {
    let driver = match format {
        Some(name) => format_by_name(name)?,
        None => probe(path)?,
    };
    let mut options = options.clone();
    if options.opener.is_none() {
        options.opener = Some(Arc::new(Registry));
    }
    driver.open(path, &options)
}

/// The registry as an [`ImageOpener`] for format drivers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Registry;

impl ImageOpener for Registry {
    fn open_image(
        &self,
        path: &Path,
        format: Option<&str>,
        options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDev>> {
        open_image(path, format, options)
    }
}

/// Creates an image of format `format` at `path`. The size is rounded up to a whole 512-byte
/// sector first, as qemu does for every image it creates, so a file made here has the length
/// qemu-img would give it.
pub fn create_image(
    path: &Path,
    format: &str,
    mut options: vdisk_block::CreateOptions,
) -> Result<()> {
    let driver = format_by_name(format)?;
    options.size = options
        .size
        .checked_next_multiple_of(crate::map::SECTOR)
        .filter(|&s| s <= i64::MAX as u64)
        // No file can be longer than i64::MAX; the OS says EINVAL, and so do we.
        .ok_or_else(|| {
            Error::io("truncate", std::io::Error::from_raw_os_error(22)).with_path(path)
        })?;
    driver.create(path, options)
}
