//! The VHD [`Format`] driver.

use std::path::Path;
use std::sync::Arc;

use vdisk_block::{BlockDev, CreateOptions, Error, Format, OpenOptions, Result};

use crate::vpc::create::{self, VpcParams};
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

    fn create(&self, path: &Path, mut options: CreateOptions) -> Result<()> {
        let fixed = match options.take("subformat").as_deref() {
            None | Some("dynamic") => false,
            Some("fixed") => true,
            Some(other) => {
                return Err(Error::invalid(
                    "create",
                    format!("Parameter 'subformat' does not accept value '{other}'"),
                ))
            }
        };
        let force_size = options.take_bool("force_size")?;
        options.reject_leftovers("vpc")?;
        create::create(
            path,
            &VpcParams {
                size: options.size,
                fixed,
                force_size,
            },
        )
    }

    fn create_options_help(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("size", "Virtual disk size"),
            (
                "subformat",
                "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed}",
            ),
            (
                "force_size",
                "Keep the exact size instead of rounding to a CHS geometry (default: on for fixed images of whole MiB, so Azure accepts them; off otherwise)",
            ),
        ]
    }
}
