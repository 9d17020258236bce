//! The VHD [`Format`] driver.

use std::path::Path;
use std::sync::Arc;

use vdisk_block::{BlockDev, CreateOptions, Error, Format, OpenOptions, Result};

use crate::vpc::footer::Footer;
use crate::vpc::image::VpcImage;

/// The VHD format driver (qemu's name: `vpc`).
#[derive(Debug, Default, Clone, Copy)]
pub struct VpcFormat;

impl Format for VpcFormat {
    fn name(&self) -> &'static str {
        "vpc"
    }

    /// Only the footer copy at offset 0 counts, as in qemu: a fixed VHD has its only footer
    /// at the end, where a guest of a raw disk could forge one, so fixed VHDs need `-f vpc`.
    fn probe(&self, header: &[u8], _path: &Path) -> u32 {
        if Footer::has_cookie(header) {
            100
        } else {
            0
        }
    }

    fn open(&self, path: &Path, options: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
        Ok(Arc::new(VpcImage::open(path, options)?))
    }

    fn create(&self, path: &Path, _options: CreateOptions) -> Result<()> {
        Err(
            Error::unsupported("create", "creating VHD images is not implemented yet")
                .with_path(path),
        )
    }

    fn create_options_help(&self) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }
}
