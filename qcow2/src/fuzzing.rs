//! Entry points for cargo-fuzz targets (which live outside the workspace, in `fuzz/`): each
//! takes arbitrary bytes, stores them as an image file and drives the driver over it. Any
//! panic, hang or unbounded allocation is a bug; errors are expected.
//!
//! ```text
//! fuzz_target!(|data: &[u8]| vdisk_qcow2::fuzzing::fuzz_bytes(data, &scratch));
//! ```
//!
//! The whole input is the image file. Its last [`CONTROL_LEN`] bytes also choose where the
//! one read and the one write land, so the fuzzer can steer them without touching the header
//! (a real image ends in data or padding, so seeds stay valid images).

use std::path::Path;

use vdisk_block::{EngineChoice, FollowPolicy, Format, OpenOptions, RepairMode};

use crate::format::Qcow2Format;

/// How many trailing bytes of an input choose the read and write ranges.
pub const CONTROL_LEN: usize = 16;

/// The longest read one input may ask for.
const READ_LIMIT: u64 = 1 << 20;

/// The longest write one input may ask for.
const WRITE_LIMIT: u64 = 256 << 10;

/// Options that never open another file: a fuzz input may name any backing or data file
/// (`/etc/shadow`, the scratch file itself, a device), and none of them must be touched.
fn options(writable: bool) -> OpenOptions {
    OpenOptions {
        writable,
        policy: FollowPolicy::Nothing,
        no_backing: true,
        opener: None,
        // One io_uring per input would dominate the run time and can hit the kernel's limits.
        engine: EngineChoice::Sync,
        ..OpenOptions::default()
    }
}

/// A range of a disk of `size` bytes chosen by eight control bytes: the low 20 bits give the
/// length (all-zero bytes give 64 KiB, so unchanged seeds do real work), the rest the offset.
fn range(control: &[u8], size: u64, limit: u64) -> (u64, u64) {
    let mut word = [0u8; 8];
    word.copy_from_slice(&control[..8]);
    let word = u64::from_le_bytes(word);
    if size == 0 {
        return (0, 0);
    }
    let offset = (word >> 20) % size;
    let len = (((word & 0xf_ffff) ^ 0xffff) + 1).min(limit);
    (offset, len.min(size - offset))
}

/// Opens the qcow2 image at `path` read-write (refcount rebuild of dirty images included, no
/// backing or data file ever opened), does one read, one write and a flush, then runs
/// `check` over what the write left behind.
pub fn exercise(path: &Path, control: &[u8; CONTROL_LEN]) {
    if let Ok(dev) = Qcow2Format.open(path, &options(true)) {
        let size = dev.size();
        let (offset, len) = range(&control[..8], size, READ_LIMIT);
        let mut buf = vec![0u8; len as usize];
        let _ = dev.read_at(&mut buf, offset);
        let _ = dev.block_status(offset, len);
        let (offset, len) = range(&control[8..], size, WRITE_LIMIT);
        // A pattern that is neither zero nor uniform, so zero detection cannot skip the write.
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ 0x5a).collect();
        let _ = dev.write_at(&data, offset);
        let _ = dev.flush();
        let _ = dev.info();
    }
    // After the image is closed, as qemu-img check would see it.
    let _ = Qcow2Format.check(path, &options(false), RepairMode::None);
}

/// Writes `data` to `scratch` (writes of the fuzzed image land there, never in the input)
/// and exercises it as a qcow2 image.
pub fn fuzz_bytes(data: &[u8], scratch: &Path) {
    if std::fs::write(scratch, data).is_err() {
        return;
    }
    let mut control = [0u8; CONTROL_LEN];
    let tail = &data[data.len().saturating_sub(CONTROL_LEN)..];
    control[..tail.len()].copy_from_slice(tail);
    exercise(scratch, &control);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_stay_inside_the_disk() {
        assert_eq!(range(&[0; 8], 0, READ_LIMIT), (0, 0));
        assert_eq!(range(&[0; 8], 1 << 30, READ_LIMIT), (0, 64 << 10));
        let (offset, len) = range(&[0xff; 8], 1 << 30, WRITE_LIMIT);
        assert!(offset < 1 << 30 && len <= WRITE_LIMIT && offset + len <= 1 << 30);
        let (offset, len) = range(&[0xff; 8], 100, READ_LIMIT);
        assert!(offset + len <= 100);
    }

    #[test]
    fn entry_point_takes_anything() {
        let scratch = std::env::temp_dir().join(format!(
            "vdisk-qcow2-fuzzing-unit-{}.qcow2",
            std::process::id()
        ));
        let mut header = b"QFI\xfb\0\0\0\x03".to_vec();
        header.resize(512, 0);
        for data in [&b""[..], b"QFI\xfb", &header, &[0xff; 600]] {
            fuzz_bytes(data, &scratch);
        }
        let _ = std::fs::remove_file(&scratch);
    }

    #[test]
    fn a_real_image_takes_the_write() {
        let dir = std::env::temp_dir().join(format!("vdisk-qcow2-fuzzing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        let image = dir.join("seed.qcow2");
        let create = vdisk_block::CreateOptions {
            size: 1 << 20,
            options: vdisk_block::CreateOptions::parse_options("cluster_size=4096")
                .expect("options"),
        };
        Qcow2Format.create(&image, create).expect("create");
        let seed = std::fs::read(&image).expect("read seed");
        let scratch = dir.join("scratch.qcow2");
        fuzz_bytes(&seed, &scratch);
        // The zero control bytes of the seed write 64 KiB at offset 0 into the scratch copy.
        let dev = Qcow2Format
            .open(&scratch, &options(false))
            .expect("the scratch copy still opens");
        let mut buf = vec![0u8; 8];
        dev.read_at(&mut buf, 0).expect("read back");
        assert_eq!(buf, [0x5a, 0x5b, 0x58, 0x59, 0x5e, 0x5f, 0x5c, 0x5d]);
        assert_eq!(
            std::fs::read(&image).expect("seed"),
            seed,
            "the seed is untouched"
        );
        drop(dev);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
