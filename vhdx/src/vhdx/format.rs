//! The VHDX [`Format`] driver.

use std::path::Path;
use std::sync::Arc;

use vdisk_block::{
    BlockDev, CheckReport, CreateOptions, Error, Format, OpenOptions, RepairMode, Result,
};

use crate::vhdx::create::{self, CreateParams, ParentSpec};
use crate::vhdx::header::FILE_SIGNATURE;
use crate::vhdx::image::VhdxImage;
use crate::vhdx::parent;

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

    fn create(&self, path: &Path, mut options: CreateOptions) -> Result<()> {
        let mut p = CreateParams {
            size: options.size,
            ..CreateParams::default()
        };
        p.fixed = match options.take("subformat").as_deref() {
            None | Some("dynamic") => false,
            Some("fixed") => true,
            Some(other) => {
                return Err(Error::invalid(
                    "create",
                    format!("Parameter 'subformat' does not accept value '{other}'"),
                ))
            }
        };
        p.block_size = options.take_size("block_size")?.filter(|&b| b != 0);
        if let Some(log) = options.take_size("log_size")? {
            p.log_size = log;
        }
        if let Some(zero) = options.take_bool("block_state_zero")? {
            p.block_state_zero = zero;
        }
        let backing_fmt = options.take("backing_fmt");
        if let Some(name) = options.take("backing_file") {
            if backing_fmt.as_deref().is_some_and(|f| f != "vhdx") {
                return Err(Error::invalid(
                    "create",
                    "a VHDX can only have a VHDX parent (backing_fmt=vhdx)",
                ));
            }
            if p.fixed {
                return Err(Error::invalid(
                    "create",
                    "a differencing VHDX cannot be fixed",
                ));
            }
            let parent_file = create::parent_path(path, &name);
            let linkage = parent::data_write_guid(&parent_file)?;
            if p.size == 0 {
                let parent = VhdxImage::open(
                    &parent_file,
                    &OpenOptions {
                        no_backing: true,
                        ..OpenOptions::read_only()
                    },
                )?;
                p.size = parent.params().virtual_size;
            }
            p.parent = Some(ParentSpec { name, linkage });
        }
        options.reject_leftovers("vhdx")?;
        create::create(path, &p)
    }

    fn check(&self, path: &Path, options: &OpenOptions, repair: RepairMode) -> Result<CheckReport> {
        crate::vhdx::check::check(path, options, repair)
    }

    fn create_options_shown(&self) -> Vec<(&'static str, Option<&'static str>)> {
        // qemu-img's order, and the defaults it prints when they were not given (a block
        // size of 0 lets the driver choose).
        vec![
            ("size", None),
            ("log_size", Some("1048576")),
            ("block_size", Some("0")),
            ("subformat", None),
            ("block_state_zero", None),
            ("backing_file", None),
            ("backing_fmt", None),
        ]
    }

    fn create_options_help(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("size", "Virtual disk size; max of 64TB"),
            ("log_size", "Log size; min 1MB (rounded up to whole MB)"),
            (
                "block_size",
                "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size",
            ),
            (
                "subformat",
                "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'",
            ),
            (
                "block_state_zero",
                "Fixed images only: keep blocks in the ZERO state (default on)",
            ),
            ("backing_file", "Parent image of a differencing VHDX"),
            ("backing_fmt", "Format of the parent (vhdx only)"),
        ]
    }
}
