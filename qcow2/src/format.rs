//! The qcow2 [`Format`]: probe, open, create, check and amend.

use std::path::Path;
use std::sync::Arc;

use vdisk_block::format::Measurement;
use vdisk_block::{BlockDev, CheckReport, CreateOptions, Format, OpenOptions, RepairMode, Result};

use crate::image::Qcow2Image;

/// The qcow2 format driver.
#[derive(Debug, Default, Clone, Copy)]
pub struct Qcow2Format;

impl Format for Qcow2Format {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn probe(&self, header: &[u8], _path: &Path) -> u32 {
        // Like qemu, the magic and a version of 2 or more claim the file, so an image of an
        // unsupported version fails to open as qcow2 (naming its version) instead of
        // being mistaken for raw data.
        let claimed = header.len() >= 8
            && header.starts_with(b"QFI\xfb")
            && u32::from_be_bytes([header[4], header[5], header[6], header[7]]) >= 2;
        if claimed {
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

    fn open_option_names(&self) -> &'static [&'static str] {
        &[
            "data-file",
            "l2-cache-size",
            "cache-size",
            crate::crypto::KEY_SECRET,
            crate::crypto::FORMAT,
            // The key of an encrypted backing file (qcow2, or luks), passed on to it.
            "backing.encrypt.key-secret",
            "backing.key-secret",
        ]
    }

    fn supports_compression(&self) -> bool {
        true
    }

    fn create_options_shown(&self) -> Vec<(&'static str, Option<&'static str>)> {
        // qemu-img's order, and the defaults it prints when they were not given.
        vec![
            ("encryption", None),
            ("encrypt.format", None),
            ("encrypt.key-secret", None),
            ("encrypt.cipher-alg", None),
            ("encrypt.cipher-mode", None),
            ("encrypt.ivgen-alg", None),
            ("encrypt.ivgen-hash-alg", None),
            ("encrypt.hash-alg", None),
            ("encrypt.iter-time", None),
            ("cluster_size", Some("65536")),
            ("extended_l2", Some("off")),
            ("preallocation", None),
            ("compression_type", Some("zlib")),
            ("size", None),
            ("compat", None),
            ("backing_file", None),
            ("backing_fmt", None),
            ("data_file", None),
            ("data_file_raw", None),
            ("lazy_refcounts", Some("off")),
            ("refcount_bits", Some("16")),
        ]
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

    /// An encrypted image's key comes with the driver options (`encrypt.key-secret`), as
    /// for opening it; `force` is for its LUKS key slots.
    fn amend_with(
        &self,
        path: &Path,
        driver_options: &std::collections::BTreeMap<String, String>,
        force: bool,
        options: CreateOptions,
    ) -> Result<()> {
        crate::amend::amend_with(path, driver_options, force, options)
    }

    fn set_backing(&self, path: &Path, name: Option<&str>, format: Option<&str>) -> Result<()> {
        crate::amend::set_backing(path, name, format)
    }
}
