//! Refcounts: the refcount table, refcount blocks, and entries of every width (1 to 64 bits).
//!
//! Entries narrower than a byte are packed starting at the least significant bit; 8, 16, 32
//! and 64-bit entries are big-endian. Cluster `c` is described by entry
//! `c % entries_per_block` of the block that table entry `c / entries_per_block` points to.

use vdisk_block::{Error, HostFile, Result};

use crate::header::Header;

/// Bits 0..=8 of a refcount table entry are reserved.
pub const REFTABLE_RESERVED: u64 = 0x1ff;

/// Reads entry `index` of a refcount block with entries of `1 << order` bits.
pub fn get(block: &[u8], index: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    match order {
        0..=2 => {
            let bit = index * bits;
            let byte = block[(bit / 8) as usize];
            u64::from(byte >> (bit % 8)) & ((1 << bits) - 1)
        }
        _ => {
            let width = (bits / 8) as usize;
            let at = index as usize * width;
            block[at..at + width]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        }
    }
}

/// Writes entry `index` of a refcount block with entries of `1 << order` bits. `value`
/// must fit the width ([`max_refcount`]).
pub fn set(block: &mut [u8], index: u64, order: u32, value: u64) {
    let bits = 1u64 << order;
    match order {
        0..=2 => {
            let bit = index * bits;
            let mask = (((1u64 << bits) - 1) as u8) << (bit % 8);
            let byte = &mut block[(bit / 8) as usize];
            *byte = (*byte & !mask) | (((value << (bit % 8)) as u8) & mask);
        }
        _ => {
            let width = (bits / 8) as usize;
            let at = index as usize * width;
            let bytes = value.to_be_bytes();
            block[at..at + width].copy_from_slice(&bytes[8 - width..]);
        }
    }
}

/// The largest refcount an entry of `1 << order` bits holds.
pub fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u64 << order)) - 1
    }
}

/// Looks refcounts up on disk, one refcount block at a time (the last one is kept).
#[derive(Debug)]
pub struct RefcountReader<'a> {
    file: &'a HostFile,
    cluster_bits: u32,
    order: u32,
    table: Vec<u64>,
    last: Option<(u64, Vec<u8>)>,
}

impl<'a> RefcountReader<'a> {
    /// Reads the refcount table of `header` from `file`. Its size was capped at 8 MiB by
    /// the header check.
    pub fn new(file: &'a HostFile, header: &Header) -> Result<Self> {
        let bytes = u64::from(header.refcount_table_clusters) << header.cluster_bits;
        let file_len = file.len()?;
        if header.refcount_table_offset.saturating_add(bytes) > file_len {
            return Err(Error::corrupt(
                "read refcounts",
                format!(
                    "the refcount table at {:#x} ({bytes} bytes) lies past the end of the file",
                    header.refcount_table_offset
                ),
            )
            .with_path(file.path()));
        }
        let mut raw = vec![0u8; bytes as usize];
        file.read_at(&mut raw, header.refcount_table_offset)?;
        let table = raw
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_be_bytes(a)
            })
            .collect();
        Ok(RefcountReader {
            file,
            cluster_bits: header.cluster_bits,
            order: header.refcount_order,
            table,
            last: None,
        })
    }

    /// The raw refcount table entries.
    pub fn table(&self) -> &[u64] {
        &self.table
    }

    /// Refcount entries per refcount block.
    pub fn entries_per_block(&self) -> u64 {
        (8u64 << self.cluster_bits) >> self.order
    }

    /// The refcount of host cluster `cluster`.
    pub fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let per_block = self.entries_per_block();
        let Some(&entry) = self.table.get((cluster / per_block) as usize) else {
            return Ok(0);
        };
        // Like qemu, reading ignores the reserved bits (check reports them) and fails only
        // on an offset it cannot use.
        let offset = entry & !REFTABLE_RESERVED;
        if offset == 0 {
            return Ok(0);
        }
        let cs = 1u64 << self.cluster_bits;
        if offset & (cs - 1) != 0 {
            return Err(Error::corrupt(
                "read refcounts",
                format!("refcount table entry {entry:#x} is malformed"),
            ));
        }
        let cached = matches!(&self.last, Some((at, _)) if *at == offset);
        if !cached {
            // The part of a block past the end of the file reads as zeroes, as qemu's
            // file reads do, so check counts the clusters it covers as unreferenced
            // instead of failing on each of them.
            let inside = self.file.len()?.saturating_sub(offset).min(cs) as usize;
            let mut block = vec![0u8; cs as usize];
            self.file.read_at(&mut block[..inside], offset)?;
            self.last = Some((offset, block));
        }
        match &self.last {
            Some((_, block)) => Ok(get(block, cluster % per_block, self.order)),
            None => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let entries: u64 = (512 * 8) >> order;
            let max = max_refcount(order);
            for i in 0..entries {
                let v = (i * 2_654_435_761) & max;
                set(&mut block, i, order, v);
            }
            for i in 0..entries {
                let v = (i * 2_654_435_761) & max;
                assert_eq!(get(&block, i, order), v, "order {order} entry {i}");
            }
        }
    }

    #[test]
    fn packing_matches_the_spec() {
        // 1-bit entries start at the least significant bit.
        let mut block = vec![0u8; 2];
        set(&mut block, 0, 0, 1);
        set(&mut block, 9, 0, 1);
        assert_eq!(block, [0b0000_0001, 0b0000_0010]);
        // 4-bit entries: entry 1 is the high nibble.
        let mut block = vec![0u8; 1];
        set(&mut block, 1, 2, 0xa);
        assert_eq!(block, [0xa0]);
        // 16-bit entries are big-endian.
        let mut block = vec![0u8; 4];
        set(&mut block, 1, 4, 0x0102);
        assert_eq!(block, [0, 0, 1, 2]);
    }
}
