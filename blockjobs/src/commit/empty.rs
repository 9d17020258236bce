//! Emptying the top of a chain after a commit (QEMU's `bdrv_make_empty`).
//!
//! Of the formats of this build only qcow2 has it in QEMU; for the others QEMU's commit leaves
//! the top as it is, and so does this. A qcow2 image is emptied as QEMU's
//! `make_completely_empty` does: with the image closed, its file is cut back to the header,
//! a one-cluster refcount table (cluster 1), one refcount block (cluster 2) and a zeroed L1
//! table (from cluster 3), every guest range then falling through to the backing file. The
//! header keeps every field and extension; QEMU rewrites it the same way when it marks the
//! image clean.
//!
//! QEMU falls back to discarding every cluster for images that cannot be emptied that way
//! (version 2, internal snapshots, persistent bitmaps, LUKS, an external data file, or an
//! L1 table too large for one refcount block); that fallback is not implemented here, and
//! such images are refused with an error instead of being left half done.
//!
//! This lives beside the commit job rather than in the qcow2 crate because the crate has no
//! "make empty" entry point yet; it uses only the crate's header codec.

use std::fs::OpenOptions as FsOpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vdisk_block::{Error, Result};
use vdisk_qcow2::header::{autoclear, incompat, CryptMethod, Header};

/// What emptying did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emptied {
    /// The image now holds nothing of its own.
    Emptied,
    /// The format cannot be emptied (QEMU's `-ENOTSUP`, which its commit ignores).
    NotSupported,
}

/// Empties the image at `path` of format `format`, which must not be open anywhere.
pub fn make_empty(path: &Path, format: &str) -> Result<Emptied> {
    if format != "qcow2" {
        return Ok(Emptied::NotSupported);
    }
    make_qcow2_empty(path).map(|()| Emptied::Emptied)
}

/// The largest first cluster read to parse the header (qcow2's largest cluster).
const MAX_CLUSTER: u64 = 2 << 20;

fn make_qcow2_empty(path: &Path) -> Result<()> {
    let io = |op: &'static str| move |e: std::io::Error| Error::io(op, e).with_path(path);
    let file = FsOpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io("open"))?;
    let len = file.metadata().map_err(io("open"))?.len();
    let mut first = vec![0u8; len.min(MAX_CLUSTER) as usize];
    file.read_exact_at(&mut first, 0).map_err(io("read"))?;
    let mut header = Header::parse(&first).map_err(|e| e.with_path(path))?;
    let cs = header.cluster_size();
    let l1_bytes = u64::from(header.l1_size) * 8;
    let l1_clusters = l1_bytes.div_ceil(cs);
    let refcount_bits = 1u64 << header.refcount_order;
    let per_block = cs * 8 / refcount_bits;
    let bitmaps = header.autoclear_features & autoclear::BITMAPS != 0
        && header.extensions.bitmaps.is_some_and(|b| b.nb_bitmaps > 0);
    let why_not = if header.version < 3 {
        Some("it is a version 2 (compat=0.10) image")
    } else if header.nb_snapshots > 0 {
        Some("it has internal snapshots")
    } else if bitmaps {
        Some("it has persistent bitmaps")
    } else if header.crypt_method == CryptMethod::Luks {
        Some("it is LUKS-encrypted")
    } else if header.has_data_file() {
        Some("it has an external data file")
    } else if 3 + l1_clusters > per_block {
        Some("its L1 table does not fit one refcount block")
    } else {
        None
    };
    if let Some(why) = why_not {
        return Err(Error::unsupported(
            "make empty",
            format!(
                "cannot empty the image: {why}, and emptying such images cluster by cluster is not implemented (the data is committed; the image still holds its own copy)"
            ),
        )
        .with_path(path));
    }
    // As QEMU does, the image is marked dirty before its tables are overwritten, so an
    // interrupted run leaves an image whose refcounts are rebuilt on the next open rather
    // than trusted; the rewritten header at the end clears the mark.
    let features_at = 72;
    file.write_all_at(
        &(header.incompatible_features | incompat::DIRTY).to_be_bytes(),
        features_at,
    )
    .map_err(io("write"))?;
    file.sync_data().map_err(io("flush"))?;
    let end = (3 + l1_clusters) * cs;
    let zeroes = vec![0u8; cs as usize];
    for cluster in 1..3 + l1_clusters {
        file.write_all_at(&zeroes, cluster * cs)
            .map_err(io("write"))?;
    }
    file.write_all_at(&(2 * cs).to_be_bytes(), cs)
        .map_err(io("write"))?;
    file.write_all_at(&refcount_block(cs, refcount_bits, 3 + l1_clusters), 2 * cs)
        .map_err(io("write"))?;
    file.sync_data().map_err(io("flush"))?;
    header.l1_table_offset = 3 * cs;
    header.refcount_table_offset = cs;
    header.refcount_table_clusters = 1;
    header.incompatible_features &= !incompat::DIRTY;
    let mut encoded = header.encode().map_err(|e| e.with_path(path))?;
    encoded.resize(cs as usize, 0);
    file.write_all_at(&encoded, 0).map_err(io("write"))?;
    file.set_len(end).map_err(io("truncate"))?;
    file.sync_all().map_err(io("flush"))?;
    Ok(())
}

/// A refcount block whose first `used` entries are 1, entries `bits` wide (qcow2 packs
/// sub-byte widths from the least significant bit, wider ones big-endian).
fn refcount_block(cs: u64, bits: u64, used: u64) -> Vec<u8> {
    let mut block = vec![0u8; cs as usize];
    for i in 0..used {
        if bits < 8 {
            let per_byte = 8 / bits;
            let byte = (i / per_byte) as usize;
            block[byte] |= 1 << ((i % per_byte) * bits);
        } else {
            let width = (bits / 8) as usize;
            let at = i as usize * width;
            block[at + width - 1] = 1;
        }
    }
    block
}

#[cfg(test)]
mod tests {
    use super::refcount_block;

    #[test]
    fn refcount_entries_of_every_width() {
        assert_eq!(&refcount_block(512, 1, 4)[..1], &[0b1111]);
        assert_eq!(&refcount_block(512, 2, 3)[..1], &[0b01_01_01]);
        assert_eq!(&refcount_block(512, 4, 3)[..2], &[0x11, 0x01]);
        assert_eq!(&refcount_block(512, 16, 2)[..5], &[0, 1, 0, 1, 0]);
        assert_eq!(
            &refcount_block(512, 64, 1)[..9],
            &[0, 0, 0, 0, 0, 0, 0, 1, 0]
        );
    }
}
