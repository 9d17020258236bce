//! Entry points for fuzz targets (cargo-fuzz lives outside the workspace build): each takes
//! arbitrary bytes, stores them as an image file and drives the whole read side of a
//! driver over it. Any panic, hang or unbounded allocation is a bug; errors are expected.

use std::path::Path;

use vdisk_block::{Format, OpenOptions};

use crate::vhdx::format::VhdxFormat;
use crate::vpc::format::VpcFormat;

/// Reads at most this much of a fuzzed image's guest contents.
const READ_LIMIT: u64 = 64 << 20;

/// Opens the file at `path` read-only as `format` (log replay and parent lookup included;
/// no parent is ever opened) and reads, maps and describes all of it.
pub fn exercise(format: &dyn Format, path: &Path) {
    let options = OpenOptions {
        no_backing: true,
        ..OpenOptions::read_only()
    };
    let Ok(img) = format.open(path, &options) else {
        return;
    };
    let size = img.size().min(READ_LIMIT);
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64);
        let _ = img.read_at(&mut buf[..n as usize], off);
        let _ = img.block_status(off, n);
        let _ = img.resolve_read(off, n);
        off += n;
    }
    let _ = img.info();
}

/// Writes `data` to `scratch` and exercises it as VHDX, then as VHD.
pub fn fuzz_bytes(data: &[u8], scratch: &Path) {
    if std::fs::write(scratch, data).is_err() {
        return;
    }
    exercise(&VhdxFormat, scratch);
    exercise(&VpcFormat, scratch);
    let _ = VhdxFormat.check(scratch, &OpenOptions::read_only(), Default::default());
}
