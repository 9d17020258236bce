//! The `vmdk` format driver: probing, opening and creating.

use std::path::Path;
use std::sync::Arc;

use vdisk_block::{BlockDev, CheckReport, CreateOptions, Format, OpenOptions, RepairMode, Result};

use crate::create::CreateSpec;

use crate::header::SparseHeader;

/// The VMDK format driver.
#[derive(Debug, Default, Clone, Copy)]
pub struct VmdkFormat;

/// True when `header` looks like a text descriptor: comments and blank lines, then
/// `version=N` (how qemu recognises one too).
fn looks_like_descriptor(header: &[u8]) -> bool {
    for line in header.split(|&b| b == b'\n') {
        let line = line.trim_ascii();
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        let Some(rest) = line.strip_prefix(b"version") else {
            return false;
        };
        let Some(value) = rest.trim_ascii_start().strip_prefix(b"=") else {
            return false;
        };
        return matches!(value.trim_ascii(), b"1" | b"2" | b"3");
    }
    false
}

/// Reads the first bytes of `path` to tell an appliance from a disk.
fn is_appliance_file(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut head = Vec::with_capacity(4096);
    std::fs::File::open(path)
        .and_then(|f| f.take(4096).read_to_end(&mut head))
        .map_err(|e| vdisk_block::Error::io("open", e).with_path(path))?;
    Ok(crate::ova::is_appliance(&head))
}

impl Format for VmdkFormat {
    fn name(&self) -> &'static str {
        "vmdk"
    }

    fn probe(&self, header: &[u8], _path: &Path) -> u32 {
        let binary = SparseHeader::has_magic(header) || header.starts_with(b"COWD");
        if binary || looks_like_descriptor(header) || crate::ova::is_appliance(header) {
            100
        } else {
            0
        }
    }

    fn open(&self, path: &Path, options: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
        if is_appliance_file(path)? {
            // `disk=N` (from 0) picks one disk of a multi-disk appliance.
            let index = match options.driver_options.get("disk") {
                None => 0,
                Some(v) => v.parse().map_err(|_| {
                    vdisk_block::Error::invalid("open", format!("disk={v}: not a disk number"))
                })?,
            };
            return Ok(Arc::new(crate::ova::open_disk(path, options, index)?));
        }
        Ok(Arc::new(crate::open::open(path, options)?))
    }

    fn create(&self, path: &Path, options: CreateOptions) -> Result<()> {
        let spec = CreateSpec::from_options(path, options)?;
        crate::create::create(path, &spec)
    }

    fn open_option_names(&self) -> &'static [&'static str] {
        &["disk"]
    }

    fn supports_compression(&self) -> bool {
        true
    }

    fn create_options_shown(&self) -> Vec<(&'static str, Option<&'static str>)> {
        // qemu-img's order, and the defaults it prints when they were not given.
        vec![
            ("size", None),
            ("adapter_type", None),
            ("backing_file", None),
            ("backing_fmt", None),
            ("compat6", Some("off")),
            ("hwversion", Some("undefined")),
            ("toolsversion", None),
            ("subformat", None),
            ("zeroed_grain", None),
        ]
    }

    fn check(
        &self,
        path: &Path,
        options: &OpenOptions,
        _repair: RepairMode,
    ) -> Result<CheckReport> {
        // Nothing in a VMDK is repairable in place (qemu repairs nothing either).
        crate::check::check(path, options)
    }

    fn create_options_help(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("adapter_type", "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX"),
            ("backing_file", "File name of a base image"),
            ("backing_fmt", "Must be 'vmdk' if present"),
            ("compat6", "VMDK version 6 image"),
            ("hwversion", "VMDK hardware version"),
            ("size", "Virtual disk size"),
            ("subformat", "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized}"),
            ("toolsversion", "VMware guest tools version"),
            ("zeroed_grain", "Enable efficient zero writes using the zeroed-grain GTE feature"),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_headers_and_descriptors() {
        let p = Path::new("x.vmdk");
        assert_eq!(VmdkFormat.probe(b"KDMV\x01\0\0\0", p), 100);
        assert_eq!(
            VmdkFormat.probe(b"# Disk DescriptorFile\nversion=1\n", p),
            100
        );
        assert_eq!(VmdkFormat.probe(b"\n# c\n  version = 2\r\n", p), 100);
        assert_eq!(VmdkFormat.probe(b"version=7\n", p), 0);
        assert_eq!(VmdkFormat.probe(b"hello\nversion=1\n", p), 0);
        assert_eq!(VmdkFormat.probe(b"QFI\xfb", p), 0);
        assert_eq!(VmdkFormat.probe(b"", p), 0);
    }
}
