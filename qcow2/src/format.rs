//! The qcow2 [`Format`]: probe, open, create, check and amend.

use std::path::Path;
use std::sync::Arc;

use vdisk_block::format::Measurement;
use vdisk_block::{BlockDev, CheckReport, CreateOptions, Format, OpenOptions, RepairMode, Result};

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

    fn create(&self, path: &Path, options: CreateOptions) -> Result<()> {
        crate::create::create(path, options)
    }

    fn create_options_help(&self) -> Vec<(&'static str, &'static str)> {
        crate::create::OPTIONS.to_vec()
    }

    fn measure(
        &self,
        options: CreateOptions,
        source: Option<&dyn BlockDev>,
    ) -> Result<Measurement> {
        crate::measure::measure(options, source)
    }

    fn check(&self, path: &Path, options: &OpenOptions, repair: RepairMode) -> Result<CheckReport> {
        crate::check::check(path, options, repair)
    }

    fn amend(&self, path: &Path, options: CreateOptions) -> Result<()> {
        crate::amend::amend(path, options)
    }
}
