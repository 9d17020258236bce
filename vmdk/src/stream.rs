//! The streamOptimized writer (not yet written).

use std::path::Path;

use vdisk_block::{Error, Result};

use crate::create::CreateSpec;

/// Creates an empty streamOptimized image.
pub fn create(path: &Path, _spec: &CreateSpec) -> Result<()> {
    Err(Error::unsupported(
        "create",
        "creating streamOptimized images is not implemented yet",
    )
    .with_path(path))
}
