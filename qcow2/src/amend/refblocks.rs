//! A new refcount table and blocks, at any width, for refcounts known in memory.
//!
//! The structures are laid out past every cluster in use (the table first, then one block
//! for every range of clusters up to the end of the structures themselves), so the blocks
//! describe themselves and the table, and nothing the current header reaches is touched.

use vdisk_block::{Error, HostFile, Result};

use crate::header::MAX_REFTABLE_BYTES;
use crate::refcount::{max_refcount, set};

/// Where the new refcount structures go.
#[derive(Debug)]
pub(crate) struct Layout {
    pub cluster_bits: u32,
    pub order: u32,
    /// First cluster of the table.
    pub table_cluster: u64,
    pub table_clusters: u64,
    pub blocks: u64,
}

impl Layout {
    fn per_block(&self) -> u64 {
        (8u64 << self.cluster_bits) >> self.order
    }

    /// Host offset of the table.
    pub fn table_offset(&self) -> u64 {
        self.table_cluster << self.cluster_bits
    }

    /// Host offset of block `i`.
    fn block_offset(&self, i: u64) -> u64 {
        (self.table_cluster + self.table_clusters + i) << self.cluster_bits
    }

    /// One past the last cluster of the structures.
    pub fn end_cluster(&self) -> u64 {
        self.table_cluster + self.table_clusters + self.blocks
    }
}

/// Lays out refcount structures at width `1 << order` from the free cluster `start` on,
/// adds their own refcounts to `refcounts`, and checks that every refcount fits the width.
pub(crate) fn plan(
    refcounts: &mut Vec<u64>,
    start: u64,
    cluster_bits: u32,
    order: u32,
) -> Result<Layout> {
    let cs = 1u64 << cluster_bits;
    let start = start.max(refcounts.len() as u64);
    let mut l = Layout {
        cluster_bits,
        order,
        table_cluster: start,
        table_clusters: 1,
        blocks: 0,
    };
    loop {
        let blocks = l.end_cluster().div_ceil(l.per_block());
        let table_clusters = (blocks * 8).div_ceil(cs).max(l.table_clusters);
        if blocks == l.blocks && table_clusters == l.table_clusters {
            break;
        }
        l.blocks = blocks;
        l.table_clusters = table_clusters;
    }
    if l.table_clusters * cs > MAX_REFTABLE_BYTES {
        return Err(Error::unsupported(
            "amend",
            format!(
                "the new refcount table would need {} bytes (at most {MAX_REFTABLE_BYTES})",
                l.table_clusters * cs
            ),
        ));
    }
    refcounts.resize(l.end_cluster() as usize, 0);
    for c in start..l.end_cluster() {
        refcounts[c as usize] = 1;
    }
    let max = max_refcount(order);
    if let Some((c, &v)) = refcounts.iter().enumerate().find(|(_, &v)| v > max) {
        return Err(Error::invalid(
            "amend",
            format!(
                "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {v}",
                1u32 << order,
                (c as u64) << cluster_bits
            ),
        ));
    }
    Ok(l)
}

/// Writes the blocks and then the table of `l` holding `refcounts` (not yet flushed).
pub(crate) fn write(file: &HostFile, l: &Layout, refcounts: &[u64]) -> Result<()> {
    let cs = 1usize << l.cluster_bits;
    let per = l.per_block();
    let mut table = vec![0u8; l.table_clusters as usize * cs];
    for i in 0..l.blocks {
        let mut block = vec![0u8; cs];
        let first = i * per;
        for j in 0..per {
            match refcounts.get((first + j) as usize) {
                Some(&v) if v != 0 => set(&mut block, j, l.order, v),
                Some(_) => {}
                None => break,
            }
        }
        let at = l.block_offset(i);
        file.write_at(&block, at)?;
        table[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&at.to_be_bytes());
    }
    file.write_at(&table, l.table_offset())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_themselves_and_the_table_at_every_width() {
        for order in 0..=6u32 {
            let per = (8u64 << 9) >> order;
            for start in [1, per - 2, per - 1, per, per + 1, 3 * per - 1, 40 * per] {
                let mut rc = vec![1u64; start as usize];
                let l = plan(&mut rc, start, 9, order).expect("plan");
                assert_eq!(l.table_cluster, start);
                assert!(
                    l.blocks * per >= l.end_cluster(),
                    "order {order} start {start}"
                );
                assert!(l.table_clusters * 512 / 8 >= l.blocks);
                // Not one block more than needed.
                assert!((l.blocks - 1) * per < l.end_cluster());
                assert_eq!(rc.len() as u64, l.end_cluster());
                assert!(rc[start as usize..].iter().all(|&v| v == 1));
            }
        }
    }

    #[test]
    fn a_refcount_too_wide_is_refused_naming_the_first_cluster() {
        let mut rc = vec![1, 1, 2, 3, 1];
        let e = plan(&mut rc, 5, 16, 0).expect_err("2 does not fit one bit");
        assert_eq!(
            e.message(),
            "Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x20000 has a refcount of 2"
        );
    }
}
