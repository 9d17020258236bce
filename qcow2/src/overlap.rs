//! The overlap check: guest data must never be written over metadata.
//!
//! A corrupted or hostile image can have an L2 entry that points at its own header, L1
//! table, refcount structures or another L2 table, or refcounts that call a metadata cluster
//! free. Writing guest data there would turn a bad image into a destroyed one, so every
//! data write is checked against the set of metadata clusters first (QEMU's
//! `overlap-check`, at its "all" level for the active structures). A hit marks the image
//! corrupt and fails the write.

use std::collections::HashSet;

use vdisk_block::{HostFile, Result};

use crate::entry::OFFSET_MASK;
use crate::header::Header;
use crate::refcount::REFTABLE_RESERVED;

/// Host clusters that hold metadata, by cluster index.
#[derive(Debug, Default)]
pub struct Overlap {
    clusters: HashSet<u64>,
    /// The subset found at open that is not an L2 table (header, L1 tables, refcount
    /// structures, snapshot table, bitmap directory, encryption header): an L1 entry that
    /// points into one of these must not be treated as an L2 table that writes may change.
    tables: HashSet<u64>,
}

fn read_u64s(file: &HostFile, offset: u64, count: u64) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; (count * 8) as usize];
    file.read_at(&mut raw, offset)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect())
}

impl Overlap {
    /// Collects the metadata clusters of an image: header, active L1 and its L2 tables,
    /// refcount table and blocks, snapshot table and snapshot L1 tables, bitmap directory,
    /// encryption header. Table sizes were bounded by the header checks.
    pub fn build(file: &HostFile, header: &Header, l1: &[u64], reftable: &[u64]) -> Result<Self> {
        let mut o = Overlap::default();
        let cb = header.cluster_bits;
        o.clusters.insert(0);
        o.tables.insert(0);
        o.add_table(cb, header.l1_table_offset, u64::from(header.l1_size) * 8);
        for &e in l1 {
            o.add_range(cb, e & OFFSET_MASK, 1);
        }
        o.add_table(
            cb,
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters) << cb,
        );
        for &e in reftable {
            o.add_table(cb, e & !REFTABLE_RESERVED, 1);
        }
        if let Ok((snapshots, bytes)) = crate::snapshot::read_table(file, header) {
            o.add_table(cb, header.snapshots_offset, bytes);
            for sn in snapshots {
                let size = u64::from(sn.l1_size) * 8;
                o.add_table(cb, sn.l1_table_offset, size);
                if sn.l1_table_offset.saturating_add(size) <= file.len()? {
                    for e in read_u64s(file, sn.l1_table_offset, u64::from(sn.l1_size))? {
                        o.add_range(cb, e & OFFSET_MASK, 1);
                    }
                }
            }
        }
        if let Some(b) = header.extensions.bitmaps {
            o.add_table(cb, b.directory_offset, b.directory_size);
        }
        if let Some(c) = header.extensions.crypto {
            o.add_table(cb, c.offset, c.length);
        }
        Ok(o)
    }

    /// [`Self::add_range`] for metadata that is not an L2 table.
    fn add_table(&mut self, cluster_bits: u32, offset: u64, len: u64) {
        if len == 0 || offset == 0 {
            return;
        }
        self.add_range(cluster_bits, offset, len);
        let first = offset >> cluster_bits;
        let last = offset.saturating_add(len - 1) >> cluster_bits;
        for c in first..=last.min(first + (64 << 20 >> cluster_bits)) {
            self.tables.insert(c);
        }
    }

    /// True when `cluster` held metadata other than an L2 table when the image was opened
    /// (and has not been freed since).
    pub fn holds_table(&self, cluster: u64) -> bool {
        self.tables.contains(&cluster)
    }

    /// Marks `[offset, offset + len)` as metadata. Offset 0 means "no table" in every
    /// structure that could name it (the header cluster is always metadata anyway).
    pub fn add_range(&mut self, cluster_bits: u32, offset: u64, len: u64) {
        if len == 0 || offset == 0 {
            return;
        }
        let first = offset >> cluster_bits;
        let last = offset.saturating_add(len.max(1) - 1) >> cluster_bits;
        // Bounded by the table-size checks; a hostile range cannot make this loop long.
        for c in first..=last.min(first + (64 << 20 >> cluster_bits)) {
            self.clusters.insert(c);
        }
    }

    /// Marks one cluster as metadata.
    pub fn add(&mut self, cluster: u64) {
        self.clusters.insert(cluster);
    }

    /// Forgets a cluster that was freed.
    pub fn remove(&mut self, cluster: u64) {
        if cluster != 0 {
            self.clusters.remove(&cluster);
            self.tables.remove(&cluster);
        }
    }

    /// True when any cluster of `[offset, offset + len)` holds metadata.
    pub fn hits(&self, cluster_bits: u32, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let first = offset >> cluster_bits;
        let last = (offset + len - 1) >> cluster_bits;
        (first..=last).any(|c| self.clusters.contains(&c))
    }
}
