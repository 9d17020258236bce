//! One module per sub-command, plus what several of them share: opening an image by the name
//! the user gave and turning failures into qemu-img's words.

pub mod check;
pub mod compare;
pub mod convert;
pub mod create;
pub mod info;
pub mod map;
pub mod measure;

use std::io::Write;
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
}

/// Opens `name` (as the user spelled it) through the format registry.
pub fn open(name: &str, spec: &OpenSpec<'_>) -> Result<Arc<dyn BlockDev>, Failure> {
    let mut options = if spec.writable {
        OpenOptions::read_write()
    } else {
        OpenOptions::read_only()
    };
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
    vdisk_blockjobs::open_image(Path::new(host_path(name)), spec.format, &options)
        .map_err(|e| open_failure(name, &e))
}

/// Writes `text` to stdout; a closed pipe is not worth a panic.
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Rounds `n` up to a whole 512-byte sector, as qemu shows lengths.
pub fn sectors(n: u64) -> u64 {
    n.checked_next_multiple_of(vdisk_blockjobs::map::SECTOR)
        .unwrap_or(n)
}
