//! The VHD [`Format`] driver.

use std::path::Path;
use std::sync::Arc;

use vdisk_block::{
    BlockDev, CacheMode, CreateOptions, EngineChoice, Error, Format, HostFile, OpenOptions, Result,
};

use crate::vpc::create::{self, VpcParams, VpcParent};
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
        let backing_fmt = options.take("backing_fmt");
        let parent = match options.take("backing_file") {
            None => None,
            Some(name) => {
                if backing_fmt.as_deref().is_some_and(|f| f != "vpc") {
                    return Err(Error::invalid(
                        "create",
                        "a VHD can only have a VHD parent (backing_fmt=vpc)",
                    ));
                }
                if fixed {
                    return Err(Error::invalid(
                        "create",
                        "a differencing VHD cannot be fixed",
                    ));
                }
                let file = crate::vhdx::create::parent_path(path, &name);
                let host = HostFile::open(&file, false, CacheMode::Writeback, EngineChoice::Sync)?;
                let footer = crate::vpc::image::read_footer(&host, &file)?;
                let parent_size = VpcImage::open(
                    &file,
                    &OpenOptions {
                        no_backing: true,
                        ..OpenOptions::read_only()
                    },
                )?
                .size();
                if options.size != 0 && options.size != parent_size {
                    return Err(Error::invalid(
                        "create",
                        format!(
                            "a differencing VHD has its parent's size ({parent_size} bytes), not {}",
                            options.size
                        ),
                    ));
                }
                Some(VpcParent { name, footer })
            }
        };
        options.reject_leftovers("vpc")?;
        create::create(
            path,
            &VpcParams {
                size: options.size,
                fixed,
                force_size,
                parent,
            },
        )
    }

    fn open_option_names(&self) -> &'static [&'static str] {
        &["force_size_calc"]
    }

    fn create_options_help(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("size", "Virtual disk size"),
            (
                "subformat",
                "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed}",
            ),
            ("backing_file", "Parent image of a differencing VHD"),
            ("backing_fmt", "Format of the parent (vpc only)"),
            (
                "force_size",
                "Keep the exact size instead of rounding to a CHS geometry (default: on for fixed images of whole MiB, so Azure accepts them; off otherwise)",
            ),
        ]
    }
}
