//! Host cluster allocation: the in-memory refcount table and blocks of a writable image.
//!
//! Invariants this module keeps (the crash-safety rules of qcow2):
//! - **A new refcount block is durable before the table entry that points to it**, and it
//!   only ever lands in a free cluster: past the end of the used area. When that end lies
//!   in the block's own range the block describes itself (its own entry is set before it
//!   is written); when the range lies wholly below the end, the block sits at the end and
//!   its refcount, in the block covering it, is durable first. Clusters inside a range
//!   without a block are never taken for it: their refcounts cannot be known.
//! - **A grown refcount table is durable, with refcounts for itself and for every block it
//!   needs, before the header points to it**; the old table is freed only afterwards.
//! - Refcount *increments* stay in memory (dirty blocks) until the image writes them back,
//!   which it always does before writing any table that references the cluster.
//! - Clusters with a refcount are never handed out, so a cluster whose decrement is still
//!   pending (see `image.rs`) cannot be reused early.

use std::collections::HashMap;

use vdisk_block::{Error, HostFile, Result};

use crate::header::Header;
use crate::refcount::{self, REFTABLE_RESERVED};

/// How far past the end of the used area allocation searches for a free cluster.
const MAX_SCAN_PAST_END: u64 = 1 << 16;

/// Header offset of `refcount_table_offset`.
const HEADER_REFTABLE_OFFSET: u64 = 48;

#[derive(Debug)]
struct Block {
    offset: u64,
    data: Vec<u8>,
    dirty: bool,
}

/// The refcount structures of a writable image.
#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    table: Vec<u64>,
    table_offset: u64,
    blocks: HashMap<u64, Block>,
    /// Where the search for a free cluster starts (qemu's `free_cluster_index`): lowered
    /// when a cluster is freed, moved past every cluster an allocation looked at.
    free_hint: u64,
    /// Clusters taken by [`Refcounts::reserve_run`] that [`Refcounts::alloc`] hands out
    /// next: `(next, end)`.
    reserved: Option<(u64, u64)>,
    /// One past the highest cluster known to be in use or inside the file.
    end: u64,
    /// Metadata clusters this module freed itself (an old refcount table), for the owner's
    /// overlap bookkeeping.
    pub released: Vec<u64>,
}

fn corrupt(message: String) -> Error {
    Error::corrupt("allocate", message)
}

impl Refcounts {
    /// Loads the refcount table of `header` from `file`.
    pub fn load(file: &HostFile, header: &Header) -> Result<Refcounts> {
        let reader = refcount::RefcountReader::new(file, header)?;
        let cs = header.cluster_size();
        Ok(Refcounts {
            cluster_bits: header.cluster_bits,
            order: header.refcount_order,
            table: reader.table().to_vec(),
            table_offset: header.refcount_table_offset,
            blocks: HashMap::new(),
            free_hint: 1,
            reserved: None,
            end: file.len()?.div_ceil(cs),
            released: Vec::new(),
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount entries per block.
    pub fn per_block(&self) -> u64 {
        (8u64 << self.cluster_bits) >> self.order
    }

    /// The refcount table entries.
    pub fn table(&self) -> &[u64] {
        &self.table
    }

    /// Current host offset of the refcount table.
    pub fn table_offset(&self) -> u64 {
        self.table_offset
    }

    /// Current refcount table length in clusters.
    pub fn table_clusters(&self) -> u64 {
        (self.table.len() as u64 * 8).div_ceil(self.cs())
    }

    /// One past the highest cluster in use (the file's end, in clusters).
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Records that the file was cut to `end` clusters, past its last cluster in use, so
    /// new tables go right after that again.
    pub fn truncated(&mut self, end: u64) {
        self.end = end;
    }

    /// Declares every cluster below `end` possibly in use, so that no refcount block or
    /// table is ever created there (a repair that knows references past the end of the
    /// file calls this before it sets any refcount).
    pub fn claim_below(&mut self, end: u64) {
        self.end = self.end.max(end);
    }

    fn load_block(&mut self, file: &HostFile, t: u64) -> Result<bool> {
        if self.blocks.contains_key(&t) {
            return Ok(true);
        }
        let Some(&entry) = self.table.get(t as usize) else {
            return Ok(false);
        };
        let offset = entry & !REFTABLE_RESERVED;
        if offset == 0 {
            return Ok(false);
        }
        if entry & REFTABLE_RESERVED != 0 || offset & (self.cs() - 1) != 0 {
            return Err(corrupt(format!(
                "refcount table entry {t} ({entry:#x}) is malformed"
            )));
        }
        let mut data = vec![0u8; self.cs() as usize];
        if offset.saturating_add(self.cs()) > file.len()? {
            return Err(corrupt(format!(
                "refcount block {t} at {offset:#x} lies past the end of the file"
            )));
        }
        file.read_at(&mut data, offset)?;
        self.blocks.insert(
            t,
            Block {
                offset,
                data,
                dirty: false,
            },
        );
        Ok(true)
    }

    /// The refcount of host cluster `cluster`.
    pub fn get(&mut self, file: &HostFile, cluster: u64) -> Result<u64> {
        let per = self.per_block();
        let t = cluster / per;
        if !self.load_block(file, t)? {
            return Ok(0);
        }
        Ok(self
            .blocks
            .get(&t)
            .map_or(0, |b| refcount::get(&b.data, cluster % per, self.order)))
    }

    /// Sets the refcount of `cluster`, creating its refcount block (never at `cluster`
    /// itself) when needed.
    pub fn set(&mut self, file: &HostFile, cluster: u64, value: u64) -> Result<()> {
        if value > refcount::max_refcount(self.order) {
            return Err(Error::unsupported(
                "allocate",
                format!(
                    "refcount {value} of cluster {cluster} does not fit {}-bit refcounts",
                    1u32 << self.order
                ),
            ));
        }
        let per = self.per_block();
        let t = cluster / per;
        if value > 0 {
            // Claim the cluster first, so a refcount block or table created below is never
            // placed on top of it.
            self.end = self.end.max(cluster + 1);
        }
        if !self.load_block(file, t)? {
            if value == 0 {
                // A missing block already reads as 0; creating one would only use space.
                self.free_hint = self.free_hint.min(cluster.max(1));
                return Ok(());
            }
            self.new_block(file, t, cluster)?;
        }
        let order = self.order;
        let block = self
            .blocks
            .get_mut(&t)
            .ok_or_else(|| corrupt(format!("refcount block {t} vanished")))?;
        refcount::set(&mut block.data, cluster % per, order, value);
        block.dirty = true;
        if value == 0 {
            self.free_hint = self.free_hint.min(cluster.max(1));
        }
        self.end = self.end.max(cluster + 1);
        Ok(())
    }

    /// Adds `delta` (+1 or -1) to the refcount of `cluster`.
    pub fn adjust(&mut self, file: &HostFile, cluster: u64, increase: bool) -> Result<()> {
        let old = self.get(file, cluster)?;
        let new = if increase {
            old.checked_add(1)
        } else {
            old.checked_sub(1)
        }
        .ok_or_else(|| {
            corrupt(format!(
                "refcount of cluster {cluster} would go {} (it is {old})",
                if increase {
                    "above its maximum"
                } else {
                    "below zero"
                }
            ))
        })?;
        self.set(file, cluster, new)
    }

    /// Allocates one free cluster and sets its refcount to 1 (the next cluster of a
    /// reserved run, if there is one).
    pub fn alloc(&mut self, file: &HostFile) -> Result<u64> {
        if let Some((next, end)) = self.reserved {
            self.reserved = (next + 1 < end).then_some((next + 1, end));
            return Ok(next);
        }
        let mut c = self.free_hint.max(1);
        while self.get(file, c)? != 0 {
            c += 1;
            // Past the end of the file every cluster is free unless the refcounts are
            // corrupt; do not scan a hostile table's worth of "used" clusters.
            if c > self.end.saturating_add(MAX_SCAN_PAST_END) {
                return Err(corrupt(format!(
                    "no free cluster within {MAX_SCAN_PAST_END} clusters past the end of the image; its refcounts look corrupt"
                )));
            }
        }
        self.set(file, c, 1)?;
        self.free_hint = c + 1;
        Ok(c)
    }

    /// Takes the first `n` contiguous free clusters from where the search for free clusters
    /// starts, as qemu's allocation for one write does (a hole too small for them is
    /// passed over), sets their refcounts to 1 and reserves them for the next `n` calls of
    /// [`Refcounts::alloc`]. [`Refcounts::release_reserved`] frees what is left unused.
    pub fn reserve_run(&mut self, file: &HostFile, n: u64) -> Result<()> {
        self.release_reserved(file)?;
        if n == 0 {
            return Ok(());
        }
        let mut from = self.free_hint.max(1);
        'search: loop {
            let mut run = 0;
            while run < n {
                let c = from + run;
                if c > self.end.saturating_add(MAX_SCAN_PAST_END) {
                    return Err(corrupt(format!(
                        "no {n} free clusters within {MAX_SCAN_PAST_END} clusters past the end of the image; its refcounts look corrupt"
                    )));
                }
                if self.get(file, c)? != 0 {
                    from = c + 1;
                    continue 'search;
                }
                run += 1;
            }
            let mut taken = 0;
            while taken < n {
                // Setting a refcount may create a refcount block, which can land inside
                // the run (it describes itself): the run then ends there, and the
                // clusters still needed are allocated one by one after it. Searching on
                // for an undisturbed run would never end where every run crosses into a
                // range without a refcount block yet.
                if self.get(file, from + taken)? != 0 {
                    break;
                }
                self.set(file, from + taken, 1)?;
                taken += 1;
            }
            self.free_hint = from + taken;
            self.reserved = (taken > 0).then_some((from, from + taken));
            return Ok(());
        }
    }

    /// Frees the reserved clusters no allocation took.
    pub fn release_reserved(&mut self, file: &HostFile) -> Result<()> {
        if let Some((next, end)) = self.reserved.take() {
            for c in next..end {
                self.set(file, c, 0)?;
            }
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters at the end of the used area (for tables that must
    /// be contiguous) and sets their refcounts to 1.
    pub fn alloc_contiguous(&mut self, file: &HostFile, n: u64) -> Result<u64> {
        let per = self.per_block();
        loop {
            let start = self.end;
            // Create the refcount blocks the range needs first; each lands at the end of
            // the used area, so try again past it.
            let mut moved = false;
            for t in start / per..=(start + n.max(1) - 1) / per {
                if !self.load_block(file, t)? {
                    self.new_block(file, t, u64::MAX)?;
                    moved = true;
                }
            }
            if moved {
                continue;
            }
            for c in start..start + n {
                self.set(file, c, 1)?;
            }
            return Ok(start);
        }
    }

    /// Creates the refcount block for table index `t`.
    ///
    /// When the end of the used area lies in (or before) the block's own range, the block
    /// goes there and describes itself. When the whole range lies below the end, nothing
    /// tells which of its clusters are free: they all read as refcount 0 precisely because
    /// the block is missing, while a corrupt image (or a repair recounting one) may use
    /// every one of them. The block then goes to the end of the used area, outside its own
    /// range, and its refcount lives in the block that covers the end (made durable before
    /// the table points to the new block).
    fn new_block(&mut self, file: &HostFile, t: u64, avoid: u64) -> Result<()> {
        if t as usize >= self.table.len() {
            self.grow_table(file, t + 1)?;
            if self.load_block(file, t)? {
                return Ok(());
            }
        }
        let per = self.per_block();
        let (first, last) = (t * per, (t + 1) * per);
        let mut c = self.end.max(first);
        if c == avoid {
            c += 1;
        }
        let mut data = vec![0u8; self.cs() as usize];
        if c < last {
            refcount::set(&mut data, c - first, self.order, 1);
        } else {
            // `avoid` (the cluster whose refcount is being set) was claimed by the caller,
            // so the end already lies past it.
            c = self.end;
            if c == avoid {
                c += 1;
            }
            // Claim the cluster before its refcount is set, so a block created for it
            // below cannot land on it.
            self.end = self.end.max(c + 1);
            self.set(file, c, 1)?;
            self.write_dirty(file)?;
        }
        let offset = c << self.cluster_bits;
        file.write_at(&data, offset)?;
        file.flush()?;
        file.write_at(&offset.to_be_bytes(), self.table_offset + t * 8)?;
        self.table[t as usize] = offset;
        self.blocks.insert(
            t,
            Block {
                offset,
                data,
                dirty: false,
            },
        );
        self.end = self.end.max(c + 1);
        Ok(())
    }

    /// Moves the refcount table to the end of the file with room for `min_entries`
    /// entries, with new refcount blocks for the new clusters where needed.
    fn grow_table(&mut self, file: &HostFile, min_entries: u64) -> Result<()> {
        let cs = self.cs();
        let per_cluster = cs / 8;
        let per = self.per_block();
        let mut entries = min_entries.max(self.table.len() as u64 * 2);
        let start = self.end;
        let (n, needed) = loop {
            let n = (entries * 8).div_ceil(cs);
            // Blocks needed for the new table and for the new blocks themselves.
            let mut k = 0u64;
            let needed = loop {
                let needed: Vec<u64> = (start / per..=(start + n + k - 1) / per)
                    .filter(|&r| self.table.get(r as usize).is_none_or(|&e| e == 0))
                    .collect();
                if needed.len() as u64 == k {
                    break needed;
                }
                k = needed.len() as u64;
            };
            if needed.last().is_none_or(|&r| r < entries) {
                break (n, needed);
            }
            entries = entries.max(needed.last().map_or(0, |r| r + 1)) + per_cluster;
        };
        if (n * cs) > crate::header::MAX_REFTABLE_BYTES {
            return Err(Error::unsupported(
                "allocate",
                "the refcount table would exceed QEMU's 8 MiB limit",
            ));
        }
        let entries = n * per_cluster;
        let mut table = self.table.clone();
        table.resize(entries as usize, 0);
        let k = needed.len() as u64;
        for (i, &r) in needed.iter().enumerate() {
            let offset = (start + n + i as u64) << self.cluster_bits;
            table[r as usize] = offset;
            self.blocks.insert(
                r,
                Block {
                    offset,
                    data: vec![0u8; cs as usize],
                    dirty: true,
                },
            );
        }
        let old_table = std::mem::replace(&mut self.table, table);
        let old_offset = self.table_offset;
        let old_clusters = (old_table.len() as u64 * 8).div_ceil(cs);
        for c in start..start + n + k {
            let t = c / per;
            if !self.load_block(file, t)? {
                return Err(corrupt(format!("refcount block {t} missing while growing")));
            }
            let order = self.order;
            if let Some(b) = self.blocks.get_mut(&t) {
                refcount::set(&mut b.data, c % per, order, 1);
                b.dirty = true;
            }
        }
        self.end = start + n + k;
        // Everything the new table needs goes to disk before the header points to it.
        self.write_dirty(file)?;
        let mut raw = Vec::with_capacity((entries * 8) as usize);
        for e in &self.table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        let new_offset = start << self.cluster_bits;
        file.write_at(&raw, new_offset)?;
        file.flush()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_offset.to_be_bytes());
        hdr[8..].copy_from_slice(&(n as u32).to_be_bytes());
        file.write_at(&hdr, HEADER_REFTABLE_OFFSET)?;
        file.flush()?;
        self.table_offset = new_offset;
        // The old table is unreferenced now.
        for c in 0..old_clusters {
            let cluster = (old_offset >> self.cluster_bits) + c;
            self.adjust(file, cluster, false)?;
            self.released.push(cluster);
        }
        Ok(())
    }

    /// Writes every changed refcount block.
    pub fn write_dirty(&mut self, file: &HostFile) -> Result<bool> {
        let mut wrote = false;
        for b in self.blocks.values_mut().filter(|b| b.dirty) {
            file.write_at(&b.data, b.offset)?;
            b.dirty = false;
            wrote = true;
        }
        Ok(wrote)
    }

    /// True when `cluster` holds the refcount table or one of the loaded refcount blocks.
    pub fn is_own_metadata(&self, cluster: u64) -> bool {
        let offset = cluster << self.cluster_bits;
        let table_end = self.table_offset + self.table_clusters() * self.cs();
        (self.table_offset..table_end).contains(&offset)
            || self.blocks.values().any(|b| b.offset == offset)
    }

    /// True when some block changed since it was last written.
    pub fn has_dirty(&self) -> bool {
        self.blocks.values().any(|b| b.dirty)
    }
}
