//! The VHDX [`Format`] driver.

use std::path::Path;
use std::sync::Arc;

use vdisk_block::{BlockDev, CreateOptions, Error, Format, OpenOptions, Result};

use crate::vhdx::header::FILE_SIGNATURE;
use crate::vhdx::image::VhdxImage;

/// The VHDX format driver (qemu's name: `vhdx`).
#[derive(Debug, Default, Clone, Copy)]
pub struct VhdxFormat;

impl Format for VhdxFormat {
    fn name(&self) -> &'static str {
        "vhdx"
    }

    fn probe(&self, header: &[u8], _path: &Path) -> u32 {
        if header.starts_with(FILE_SIGNATURE) {
            100
        } else {
            0
        }
    }

    fn open(&self, path: &Path, options: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
        Ok(Arc::new(VhdxImage::open(path, options)?))
    }

    fn create(&self, path: &Path, _options: CreateOptions) -> Result<()> {
        Err(
            Error::unsupported("create", "creating VHDX images is not implemented yet")
                .with_path(path),
        )
    }

    fn create_options_help(&self) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }
}
