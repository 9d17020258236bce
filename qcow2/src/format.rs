//! The qcow2 [`Format`]: probe, open and (for now) check; create comes with the write path.

use std::path::Path;
use std::sync::Arc;

use vdisk_block::{
    BlockDev, CheckReport, CreateOptions, Error, Format, OpenOptions, RepairMode, Result,
};

use crate::header;
use crate::image::Qcow2Image;

/// The qcow2 format driver.
#[derive(Debug, Default, Clone, Copy)]
pub struct Qcow2Format;

impl Format for Qcow2Format {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn probe(&self, header: &[u8], _path: &Path) -> u32 {
        if header::probe(header) {
            100
        } else {
            0
        }
    }

    fn open(&self, path: &Path, options: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
        Ok(Arc::new(Qcow2Image::open(path, options)?))
    }

    fn create(&self, path: &Path, _options: CreateOptions) -> Result<()> {
        Err(
            Error::unsupported("create", "creating qcow2 images is not implemented yet")
                .with_path(path),
        )
    }

    fn create_options_help(&self) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }

    fn check(&self, path: &Path, options: &OpenOptions, repair: RepairMode) -> Result<CheckReport> {
        crate::check::check(path, options, repair)
    }
}
