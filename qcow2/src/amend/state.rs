//! The metadata of an image as amend sees it (every L1 table, the snapshot table, the
//! bitmaps), and the reference count of every host cluster for a state that may exist
//! only in memory (new L2 and L1 tables not yet written).

use std::collections::HashMap;

use vdisk_block::{Error, HostFile, Result};

use crate::check::MAX_TRACKED_CLUSTERS;
use crate::entry::{COMPRESSED, COPIED, OFFSET_MASK};
use crate::header::{Header, MAX_L1_BYTES};
use crate::refcount::REFTABLE_RESERVED;
use crate::snapshot::{self, Snapshot};

/// Bound on one bitmap table (as `check` uses).
const MAX_BITMAP_TABLE_BYTES: u64 = 64 << 20;

pub(crate) fn corrupt(message: String) -> Error {
    Error::corrupt("amend", message)
}

/// Reads `count` big-endian u64 words at `offset`, checking they lie inside the file.
pub(crate) fn read_u64s(file: &HostFile, offset: u64, count: u64, what: &str) -> Result<Vec<u64>> {
    let bytes = count
        .checked_mul(8)
        .ok_or_else(|| corrupt(format!("{what} at {offset:#x} is too large")))?;
    if offset
        .checked_add(bytes)
        .is_none_or(|end| end > file.len().unwrap_or(0))
    {
        return Err(corrupt(format!(
            "{what} at {offset:#x} ({bytes} bytes) lies past the end of the file"
        )));
    }
    let mut raw = vec![0u8; bytes as usize];
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

/// Big-endian bytes of `words`.
pub(crate) fn encode_u64s(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

/// One L1 table: where it lives and its entries.
#[derive(Debug, Clone)]
pub(crate) struct L1 {
    pub offset: u64,
    pub entries: Vec<u64>,
}

/// A persistent bitmap's table, for counting references.
#[derive(Debug, Clone)]
pub(crate) struct BitmapTable {
    pub offset: u64,
    pub entries: Vec<u64>,
}

/// Everything in an image that references host clusters, besides the refcount structures.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub header: Header,
    pub active: L1,
    pub snapshots: Vec<Snapshot>,
    pub snapshot_l1s: Vec<L1>,
    /// Byte length of the snapshot table at `header.snapshots_offset`.
    pub snapshot_table_bytes: u64,
    /// The bitmap directory (offset, bytes) and tables, when the bitmaps are valid.
    pub bitmap_dir: Option<(u64, u64)>,
    pub bitmap_tables: Vec<BitmapTable>,
}

impl State {
    /// Loads the metadata of the image in `file` described by `header`.
    pub fn load(file: &HostFile, header: &Header) -> Result<State> {
        let l1 = |offset: u64, size: u32, what: &str| -> Result<L1> {
            let bytes = u64::from(size) * 8;
            if bytes > MAX_L1_BYTES {
                return Err(corrupt(format!("{what} has too many entries ({size})")));
            }
            if size > 0 && offset & (header.cluster_size() - 1) != 0 {
                return Err(corrupt(format!(
                    "{what} at {offset:#x} is not cluster aligned"
                )));
            }
            Ok(L1 {
                offset,
                entries: read_u64s(file, offset, u64::from(size), what)?,
            })
        };
        let active = l1(
            header.l1_table_offset,
            header.l1_size,
            "the active L1 table",
        )?;
        let (snapshots, snapshot_table_bytes) = snapshot::read_table(file, header)?;
        let mut snapshot_l1s = Vec::with_capacity(snapshots.len());
        for sn in &snapshots {
            snapshot_l1s.push(l1(
                sn.l1_table_offset,
                sn.l1_size,
                &format!("the L1 table of snapshot '{}'", sn.name),
            )?);
        }
        let bitmaps = crate::bitmap::read_directory(file, header)?;
        let mut bitmap_dir = None;
        let mut bitmap_tables = Vec::new();
        if let (Some(ext), false) = (header.extensions.bitmaps, bitmaps.is_empty()) {
            bitmap_dir = Some((ext.directory_offset, ext.directory_size));
            for b in &bitmaps {
                if u64::from(b.table_size) * 8 > MAX_BITMAP_TABLE_BYTES {
                    return Err(corrupt(format!(
                        "the table of bitmap '{}' is too large",
                        b.name
                    )));
                }
                bitmap_tables.push(BitmapTable {
                    offset: b.table_offset,
                    entries: read_u64s(
                        file,
                        b.table_offset,
                        u64::from(b.table_size),
                        "a bitmap table",
                    )?,
                });
            }
        }
        Ok(State {
            header: header.clone(),
            active,
            snapshots,
            snapshot_l1s,
            snapshot_table_bytes,
            bitmap_dir,
            bitmap_tables,
        })
    }

    /// Every L1 table: the active one first, then the snapshots' in table order.
    pub fn l1s(&self) -> impl Iterator<Item = &L1> {
        std::iter::once(&self.active).chain(self.snapshot_l1s.iter())
    }
}

/// L2 tables by host offset: new contents in `overlay`, the rest read from the file.
pub(crate) struct L2Source<'a> {
    pub file: &'a HostFile,
    pub cluster_size: u64,
    pub overlay: &'a HashMap<u64, Vec<u64>>,
}

impl L2Source<'_> {
    /// The words of the L2 table at `offset`.
    pub fn get(&self, offset: u64) -> Result<Vec<u64>> {
        if let Some(t) = self.overlay.get(&offset) {
            return Ok(t.clone());
        }
        read_u64s(self.file, offset, self.cluster_size / 8, "an L2 table")
    }
}

/// The host cluster of an L1 entry's L2 table, or `None`.
pub(crate) fn l2_of(entry: u64, cluster_size: u64) -> Result<Option<u64>> {
    let l2 = entry & OFFSET_MASK;
    if l2 == 0 {
        return Ok(None);
    }
    if l2 & (cluster_size - 1) != 0 {
        return Err(corrupt(format!(
            "L1 entry {entry:#x} names an L2 table that is not cluster aligned; run 'qemu-img check -r all' first"
        )));
    }
    Ok(Some(l2))
}

/// The host byte range of a compressed L2 entry.
pub(crate) fn compressed_range(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 70 - cluster_bits;
    let coffset = entry & ((1u64 << x) - 1);
    let sectors = ((entry & !(COPIED | COMPRESSED)) >> x) + 1;
    (coffset, sectors * 512 - (coffset & 511))
}

/// Reference counts of host clusters, indexed by cluster.
pub(crate) struct Refs {
    cluster_bits: u32,
    pub counts: Vec<u32>,
}

impl Refs {
    pub fn new(cluster_bits: u32) -> Refs {
        Refs {
            cluster_bits,
            counts: Vec::new(),
        }
    }

    /// Adds one reference to every cluster overlapping `[offset, offset + len)`.
    pub fn inc(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(len - 1) >> self.cluster_bits;
        if last >= MAX_TRACKED_CLUSTERS {
            return Err(corrupt(format!(
                "a reference to host offset {offset:#x} lies beyond the {MAX_TRACKED_CLUSTERS} clusters amend tracks"
            )));
        }
        if last as usize >= self.counts.len() {
            self.counts.resize(last as usize + 1, 0);
        }
        for c in first..=last {
            let slot = &mut self.counts[c as usize];
            *slot = slot.saturating_add(1);
        }
        Ok(())
    }

    /// The references of cluster `c`.
    pub fn get(&self, c: u64) -> u64 {
        self.counts.get(c as usize).map_or(0, |&n| u64::from(n))
    }
}

/// Counts the references of an L2 table's entries (data and compressed clusters).
pub(crate) fn count_l2(refs: &mut Refs, h: &Header, table: &[u64]) -> Result<()> {
    if h.has_data_file() {
        // Guest data lives in the data file; its clusters have no refcounts here.
        return Ok(());
    }
    let cs = h.cluster_size();
    let width = if h.extended_l2() { 2 } else { 1 };
    for &entry in table.iter().step_by(width) {
        if entry & COMPRESSED != 0 {
            let (offset, len) = compressed_range(entry, h.cluster_bits);
            refs.inc(offset, len)?;
            continue;
        }
        let host = entry & OFFSET_MASK;
        if host == 0 {
            continue;
        }
        if host & (cs - 1) != 0 {
            return Err(corrupt(format!(
                "L2 entry {entry:#x} is not cluster aligned; run 'qemu-img check -r all' first"
            )));
        }
        refs.inc(host, cs)?;
    }
    Ok(())
}

/// Counts every reference of `state` (with L2 tables from `l2s`), the refcount structures
/// excluded.
pub(crate) fn count(state: &State, l2s: &L2Source<'_>) -> Result<Refs> {
    let h = &state.header;
    let cs = h.cluster_size();
    let mut refs = Refs::new(h.cluster_bits);
    refs.inc(0, cs)?;
    for l1 in state.l1s() {
        refs.inc(l1.offset, l1.entries.len() as u64 * 8)?;
        for &entry in &l1.entries {
            if let Some(l2) = l2_of(entry, cs)? {
                refs.inc(l2, cs)?;
                count_l2(&mut refs, h, &l2s.get(l2)?)?;
            }
        }
    }
    if !state.snapshots.is_empty() {
        refs.inc(h.snapshots_offset, state.snapshot_table_bytes)?;
    }
    if let Some(crypto) = h.extensions.crypto {
        refs.inc(crypto.offset, crypto.length)?;
    }
    if let Some((offset, bytes)) = state.bitmap_dir {
        refs.inc(offset, bytes)?;
        for t in &state.bitmap_tables {
            refs.inc(t.offset, t.entries.len() as u64 * 8)?;
            for &e in &t.entries {
                let data = e & OFFSET_MASK;
                if data != 0 {
                    refs.inc(data, cs)?;
                }
            }
        }
    }
    Ok(refs)
}

/// Counts the old refcount table and blocks of `h` (read from `table`).
pub(crate) fn count_refcount_structures(refs: &mut Refs, h: &Header, table: &[u64]) -> Result<()> {
    let cs = h.cluster_size();
    refs.inc(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    )?;
    for &entry in table {
        let offset = entry & !REFTABLE_RESERVED;
        if offset == 0 {
            continue;
        }
        if entry & REFTABLE_RESERVED != 0 || offset & (cs - 1) != 0 {
            return Err(corrupt(format!(
                "refcount table entry {entry:#x} is malformed; run 'qemu-img check -r all' first"
            )));
        }
        refs.inc(offset, cs)?;
    }
    Ok(())
}
