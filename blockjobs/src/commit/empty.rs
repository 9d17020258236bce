//! Emptying the top of a chain after a commit (QEMU's `bdrv_make_empty`).
//!
//! Of the formats of this build only qcow2 has it in QEMU; for the others QEMU's commit leaves
//! the top as it is, and so does this. The qcow2 work is [`vdisk_qcow2::make_empty`].

use std::path::Path;

use vdisk_block::Result;

/// What emptying did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emptied {
    /// The image now holds nothing of its own.
    Emptied,
    /// The format cannot be emptied (QEMU's `-ENOTSUP`, which its commit ignores).
    NotSupported,
}

/// Empties the image at `path` of format `format`, which must not be open anywhere.
pub fn make_empty(path: &Path, format: &str) -> Result<Emptied> {
    if format != "qcow2" {
        return Ok(Emptied::NotSupported);
    }
    vdisk_qcow2::make_empty(path).map(|()| Emptied::Emptied)
}
