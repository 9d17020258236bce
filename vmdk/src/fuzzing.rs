//! Entry points for cargo-fuzz targets (which live outside the workspace, in `fuzz/`): each
//! takes arbitrary bytes and must return without panicking, hanging or allocating without
//! bound.
//!
//! ```text
//! fuzz_target!(|data: &[u8]| vdisk_vmdk::fuzzing::descriptor(data));
//! fuzz_target!(|data: &[u8]| vdisk_vmdk::fuzzing::image(data));
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

use vdisk_block::{Format, OpenOptions};

use crate::format::VmdkFormat;

/// Parses `data` as a descriptor and, when it parses, writes it back and parses that again,
/// which must give the same descriptor.
pub fn descriptor(data: &[u8]) {
    if let Ok(d) = crate::descriptor::Descriptor::parse(data) {
        let again = crate::descriptor::Descriptor::parse(&d.to_bytes());
        assert!(
            again.as_ref().is_ok_and(|a| a.extents == d.extents),
            "a written descriptor must parse back to the same extents"
        );
    }
}

/// Opens `data` as a VMDK file (sparse, stream, COWD, seSparse-in-descriptor or text) in a
/// scratch folder of its own, and reads the first 64 MiB of the disk and its block status.
pub fn image(data: &[u8]) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vdisk-vmdk-fuzz-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let path = dir.join("fuzz.vmdk");
    if std::fs::write(&path, data).is_ok() {
        if let Ok(dev) = VmdkFormat.open(&path, &OpenOptions::read_only()) {
            let size = dev.size().min(64 << 20);
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < size {
                let n = (size - at).min(buf.len() as u64) as usize;
                if dev.read_at(&mut buf[..n], at).is_err()
                    || dev.block_status(at, n as u64).is_err()
                {
                    break;
                }
                at += n as u64;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(test)]
mod tests {
    #[test]
    fn entry_points_take_anything() {
        for data in [
            &b""[..],
            b"KDMV",
            b"version=1\ncreateType=\"vmfs\"\nRW 1 ZERO\n",
            &[0xff; 600],
        ] {
            super::descriptor(data);
            super::image(data);
        }
    }
}
