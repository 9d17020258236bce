//! Emptying an image (QEMU's `bdrv_make_empty`), what a commit does to the top of the
//! chain once its data is in the base.
//!
//! Where QEMU can, so does [`make_empty`]: as QEMU's `make_completely_empty`, with the image
//! closed, its file is cut back to the header, a one-cluster refcount table (cluster 1), one
//! refcount block (cluster 2) and a zeroed L1 table (from cluster 3), every guest range then
//! falling through to the backing file. The header keeps every field and extension; QEMU
//! rewrites it the same way when it marks the image clean.
//!
//! QEMU falls back to discarding every cluster for images that cannot be emptied that way
//! (version 2, internal snapshots, persistent bitmaps, LUKS, an external data file, or an
//! L1 table too large for one refcount block): every L2 entry of the active L1 table
//! becomes unallocated and the clusters it held lose a reference (freed ones are punched
//! out of the file). So does [`make_empty`], L2 tables first and refcounts after (an
//! interruption leaks clusters, never loses a referenced one). An L2 table shared with an
//! internal snapshot is unhooked from the active L1 table instead of being copied and
//! cleared as QEMU does (both read as unallocated). Images with an external data file are
//! refused with an error instead of being left half done.

use std::fs::OpenOptions as FsOpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vdisk_block::{CacheMode, EngineChoice, Error, HostFile, Result};

use crate::alloc::Refcounts;
use crate::entry::{Decoder, Kind};
use crate::header::{autoclear, incompat, CryptMethod, Header};

/// The largest first cluster read to parse the header (qcow2's largest cluster).
const MAX_CLUSTER: u64 = 2 << 20;

/// Empties the qcow2 image at `path`, which must not be open anywhere (QEMU's
/// `bdrv_make_empty` of its qcow2 driver): afterwards every guest range reads through to the
/// backing file (or as zeroes without one), and the header keeps every field, extension
/// and the backing file name.
///
/// Images that allow it are cut back to the header, a one-cluster refcount table, one
/// refcount block and a zeroed L1 table, as QEMU's `make_completely_empty`; the others
/// (version 2, internal snapshots, persistent bitmaps, LUKS, an L1 table too large for one
/// refcount block) have every cluster of their active L1 table discarded, as QEMU's
/// fallback. Images with an external data file, or a dirty image whose refcounts need a
/// repair first, are refused with an error and left as they are.
pub fn make_empty(path: &Path) -> Result<()> {
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
        drop(file);
        return discard_everything(path, &header, why);
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

/// QEMU's fallback: every cluster of the active L1 table discarded for good (`why` says
/// why the quick way does not apply).
fn discard_everything(path: &Path, header: &Header, why: &str) -> Result<()> {
    let refuse = |what: &str| {
        Err(Error::unsupported(
            "make empty",
            format!(
                "cannot empty the image: {why}, and {what} (the data is committed; the image still holds its own copy)"
            ),
        )
        .with_path(path))
    };
    if header.has_data_file() {
        return refuse("emptying an image with an external data file is not implemented");
    }
    if header.incompatible_features & incompat::DIRTY != 0 {
        return refuse("its refcounts need a repair first (run vdisk check -r all)");
    }
    let file = HostFile::open(path, true, CacheMode::Writeback, EngineChoice::Sync)?;
    let cs = header.cluster_size();
    let decoder = Decoder {
        cluster_bits: header.cluster_bits,
        extended_l2: header.extended_l2(),
        data_file: false,
    };
    let entry_bytes: usize = if decoder.extended_l2 { 16 } else { 8 };
    let mut refcounts = Refcounts::load(&file, header)?;
    let mut l1 = vec![0u8; header.l1_size as usize * 8];
    file.read_at(&mut l1, header.l1_table_offset)?;
    let mut freed: Vec<u64> = Vec::new();
    let mut l2 = vec![0u8; cs as usize];
    for (index, raw) in l1.chunks_exact(8).enumerate() {
        let entry = u64::from_be_bytes(raw.try_into().unwrap_or([0; 8]));
        let table = decoder.l2_offset(index as u64, entry)?;
        if table == 0 {
            continue;
        }
        let shared = refcounts.get(&file, table >> header.cluster_bits)? != 1;
        file.read_at(&mut l2, table)?;
        let mut changed = false;
        for slot in l2.chunks_exact_mut(entry_bytes) {
            let e = u64::from_be_bytes(slot[..8].try_into().unwrap_or([0; 8]));
            let bitmap = match entry_bytes {
                16 => u64::from_be_bytes(slot[8..16].try_into().unwrap_or([0; 8])),
                _ => 0,
            };
            if e == 0 && bitmap == 0 {
                continue;
            }
            match decoder.classify(e, bitmap, 0, 0)? {
                Kind::Compressed { offset, len } => {
                    let last = (offset + len.max(1) - 1) >> header.cluster_bits;
                    freed.extend((offset >> header.cluster_bits)..=last);
                }
                kind => freed.extend(kind.host().map(|h| h >> header.cluster_bits)),
            }
            slot.fill(0);
            changed = true;
        }
        if shared {
            // A table a snapshot shares is left to the snapshot: QEMU gives the active L1
            // a private copy and clears it, which reads the same as no table at all. The
            // table loses the active L1's reference, its clusters the table's.
            let at = header.l1_table_offset + index as u64 * 8;
            file.write_at(&0u64.to_be_bytes(), at)?;
            freed.push(table >> header.cluster_bits);
        } else if changed {
            file.write_at(&l2, table)?;
        }
    }
    // The tables no longer point at the clusters before any of them is freed.
    file.flush()?;
    for &cluster in &freed {
        refcounts.adjust(&file, cluster, false)?;
    }
    refcounts.write_dirty(&file)?;
    file.flush()?;
    freed.sort_unstable();
    freed.dedup();
    for cluster in freed {
        if refcounts.get(&file, cluster)? == 0 {
            // As QEMU passes the discard of a freed cluster down; a file system without
            // hole punching keeps the bytes, which is harmless.
            let _ = file.punch_hole(cluster * cs, cs);
        }
    }
    file.flush()
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
