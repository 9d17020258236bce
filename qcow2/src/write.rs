//! The write path: allocation, copy-on-write, zero clusters, discard and write-back.
//!
//! Every write holds the image's I/O lock exclusively, so no reader sees a cluster being
//! freed or reused; metadata changes happen under the metadata lock.
//!
//! How a write to one guest cluster is served, case by case:
//! - **Data cluster with COPIED set** (refcount exactly 1): written in place.
//! - **Zero cluster with a preallocated host cluster and COPIED**: the whole cluster is
//!   written in place (zeroes around the new bytes) and the zero flag dropped.
//! - **Anything else** (unallocated, zero, compressed, or shared with a snapshot): a new
//!   cluster is allocated and filled with the cluster's current contents (from the backing
//!   file, zeroes, the decompressed data or the shared cluster) with the new bytes on top;
//!   the L2 entry then points to it and the old host cluster, if any, loses one reference.
//!   Nothing that another table may still reference is ever written in place.
//!
//! An L2 table that is not COPIED (shared with a snapshot) is copied to a new cluster before
//! its first change, and the L1 entry is switched to the copy.
//!
//! Ordering (crash safety), enforced in [`Qcow2Image::writeback`] and `ensure_l2`:
//! 1. data and refcount increments reach the disk (flush) before any L2 table that refers
//!    to them is written;
//! 2. a new L2 table is on disk before the L1 entry that points to it;
//! 3. a refcount is lowered only after the tables that stopped referencing the cluster are
//!    on disk, so a crash can leak a cluster but never free one still in use.

use vdisk_block::{
    check_range, BlockDev, Error, ErrorKind, HostFile, Preallocation, Result, ZeroMode,
};

use crate::entry::{Kind, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::header::{autoclear, incompat, CryptMethod, Header};
use crate::image::{Meta, Qcow2Image};

/// Subcluster bitmap with every subcluster allocated.
const ALL_ALLOCATED: u64 = 0xffff_ffff;
/// Subcluster bitmap with every subcluster reading as zeroes.
const ALL_ZERO: u64 = 0xffff_ffff << 32;

/// A whole-cluster write mapped to its host cluster, not yet visible in the L2 table.
struct Mapped {
    host: u64,
    at: usize,
    len: usize,
    l2: u64,
    idx: usize,
    old: Option<Kind>,
    entry: u64,
}

/// Header offset of `autoclear_features`.
const HEADER_AUTOCLEAR: u64 = 88;

/// Checks that this driver can write the image, and clears the auto-clear bits it does not
/// maintain (as the spec requires of a writer that does not know them).
///
/// Persistent bitmaps are kept up to date (`bitmap/live.rs`), so their bit is kept.
pub(crate) fn prepare_writable(file: &HostFile, header: &mut Header) -> Result<()> {
    let refuse = |why: &str| {
        Err(Error::unsupported(
            "open",
            format!("cannot open the image for writing: {why}"),
        ))
    };
    if header.incompatible_features & incompat::CORRUPT != 0 {
        return Err(Error::corrupt(
            "open",
            "the image is marked corrupt and cannot be opened read/write (repair it first)",
        ));
    }
    if header.incompatible_features & incompat::DIRTY != 0 {
        return refuse(
            "its refcounts need a rebuild (dirty bit set), which is not implemented yet",
        );
    }
    if header.crypt_method == CryptMethod::Aes {
        return refuse("legacy AES-encrypted images are read only here (convert them to LUKS)");
    }
    // Without a bitmaps extension the bit means nothing.
    let mut keep = header.autoclear_features & autoclear::KNOWN;
    if header.extensions.bitmaps.is_none() {
        keep &= !autoclear::BITMAPS;
    }
    if header.version >= 3 && keep != header.autoclear_features {
        file.write_at(&keep.to_be_bytes(), HEADER_AUTOCLEAR)?;
        file.flush()?;
        header.autoclear_features = keep;
    }
    Ok(())
}

/// True when block status says `[start, start + len)` of `backing` reads as zeroes (past
/// its end it does).
fn backing_reads_zero(backing: &dyn BlockDev, start: u64, len: u64) -> Result<bool> {
    let end = (start + len).min(backing.size());
    let mut at = start;
    while at < end {
        let st = backing.block_status(at, end - at)?;
        if !st.zero || st.len == 0 {
            return Ok(false);
        }
        at += st.len;
    }
    Ok(true)
}

/// Makes `[offset, offset + len)` of `file` read as zeroes: a hole where the file system
/// can punch one (what QEMU's discard passthrough does to freed clusters), else zeroed in
/// place, never past the end of the file.
fn zero_host(file: &HostFile, offset: u64, len: u64) -> Result<()> {
    match file.punch_hole(offset, len) {
        Err(e) if e.kind() == ErrorKind::Unsupported => {}
        done => return done,
    }
    zero_in_place(file, offset, len)
}

/// Zeroes `[offset, offset + len)` of `file` keeping it allocated, within the file's length.
fn zero_in_place(file: &HostFile, offset: u64, len: u64) -> Result<()> {
    let end = (offset + len).min(file.len()?);
    if end <= offset {
        return Ok(());
    }
    match file.zero_range(offset, end - offset) {
        Err(e) if e.kind() == ErrorKind::Unsupported => file.write_zero_bytes(offset, end - offset),
        done => done,
    }
}

fn table_bytes(words: &[u64]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(words.len() * 8);
    for w in words {
        raw.extend_from_slice(&w.to_be_bytes());
    }
    raw
}

impl Qcow2Image {
    fn check_writable(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(self.read_only_error(op));
        }
        if self
            .marked_corrupt
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(Error::corrupt(
                op,
                "the image was marked corrupt (a table entry is damaged or a write would have overwritten metadata); repair it with check -r all",
            )
            .with_path(self.path()));
        }
        check_range(op, self.size(), offset, len)
    }

    /// Refuses a data write to `[host, host + len)` of the image file that would land on
    /// metadata, marking the image corrupt (see `overlap.rs`).
    fn guard(&self, meta: &mut Meta, host: u64, len: u64) -> Result<()> {
        if self.header.has_data_file() {
            return Ok(());
        }
        self.guard_image_file(meta, host, len)
    }

    /// [`Self::guard`] for any write to the image file itself (data or a new table).
    fn guard_image_file(&self, meta: &mut Meta, host: u64, len: u64) -> Result<()> {
        if let Some(refs) = meta.refs.as_mut() {
            for c in std::mem::take(&mut refs.released) {
                meta.overlap.remove(c);
            }
        }
        let cb = self.header.cluster_bits;
        let own = meta.refs.as_ref().is_some_and(|r| {
            let last = (host + len.max(1) - 1) >> cb;
            (host >> cb..=last).any(|c| r.is_own_metadata(c))
        });
        if !own && !meta.overlap.hits(cb, host, len) {
            return Ok(());
        }
        Err(self.signal_corruption(
            Error::corrupt(
                "write",
                format!("guest data would overwrite metadata at host offset {host:#x}"),
            )
            .with_path(self.path())
            .at_offset(host),
        ))
    }

    /// A partial write over a range that falls through must copy the backing file's data;
    /// when the image has a backing file that was not opened, refuse rather than copy
    /// zeroes over it.
    fn need_backing_for_cow(&self, pos: u64) -> Result<()> {
        if self.header.backing_file.is_some() && self.backing.is_none() {
            return Err(Error::unsupported(
                "write",
                "a partial-cluster write here needs the backing file's data, but the backing file was not opened",
            )
            .with_path(self.path())
            .at_offset(pos));
        }
        Ok(())
    }

    fn refs_missing(&self) -> Error {
        Error::new(
            ErrorKind::ReadOnly,
            "write",
            "the image has no refcounts loaded",
        )
        .with_path(self.path())
    }

    /// Makes the L2 table covering guest `pos` private to the active L1 (allocating or
    /// copying it as needed); returns its host offset and the entry index of `pos`.
    fn ensure_l2(&self, meta: &mut Meta, pos: u64) -> Result<(u64, usize)> {
        let cb = self.header.cluster_bits;
        let l1_index = (pos >> self.header.l1_entry_shift()) as usize;
        let idx = ((pos >> cb) & (self.header.l2_entries() - 1)) as usize;
        let entry = *meta.l1.get(l1_index).ok_or_else(|| {
            Error::corrupt("write", format!("L1 index {l1_index} is past the L1 table"))
        })?;
        let old = self.l2_offset(l1_index as u64, entry)?;
        if old != 0 && entry & COPIED != 0 {
            // A corrupt L1 entry may point into the L1 table, the refcount structures or
            // another table: changing an entry of such an "L2 table" would rewrite that
            // table, so it is refused like a data write over metadata (qemu's overlap
            // check trips on the L2 write-back).
            let c = old >> cb;
            let own = meta.refs.as_ref().is_some_and(|r| r.is_own_metadata(c));
            if own || meta.overlap.holds_table(c) {
                return Err(self.signal_corruption(
                    Error::corrupt(
                        "write",
                        format!(
                            "the L2 table at {old:#x} (L1 index {l1_index}) overlaps other metadata"
                        ),
                    )
                    .with_path(self.path())
                    .at_offset(old),
                ));
            }
            return Ok((old, idx));
        }
        let words = if old == 0 {
            vec![0u64; (self.header.cluster_size() / 8) as usize]
        } else {
            self.load_l2(meta, old)?;
            meta.l2
                .get(old)
                .map(|t| t.words.clone())
                .ok_or_else(|| Error::corrupt("write", "an L2 table left the cache while in use"))?
        };
        let refs = meta.refs.as_mut().ok_or_else(|| self.refs_missing())?;
        let new = refs.alloc(self.file())? << cb;
        // Refcounts that call a metadata cluster free (a refblock that does not describe
        // itself, an L1 table with refcount 0) would put the new table on top of it.
        self.guard_image_file(meta, new, self.header.cluster_size())?;
        let refs = meta.refs.as_mut().ok_or_else(|| self.refs_missing())?;
        // The refcount and the table are durable before the L1 entry points to the table.
        refs.write_dirty(self.file())?;
        self.file().write_at(&table_bytes(&words), new)?;
        self.file().flush()?;
        let l1_entry = new | COPIED;
        self.file().write_at(
            &l1_entry.to_be_bytes(),
            meta.l1_offset + l1_index as u64 * 8,
        )?;
        meta.l1[l1_index] = l1_entry;
        meta.l2.insert(new, words, false);
        meta.overlap.add(new >> cb);
        if old != 0 {
            meta.pending_free.push((old, self.header.cluster_size()));
        }
        Ok((new, idx))
    }

    fn width(&self) -> usize {
        if self.decoder.extended_l2 {
            2
        } else {
            1
        }
    }

    /// Sets L2 entry `idx` of the table at `l2` (and its subcluster bitmap with extended
    /// L2) and marks the table dirty.
    fn set_entry_bitmap(
        &self,
        meta: &mut Meta,
        l2: u64,
        idx: usize,
        value: u64,
        bitmap: u64,
    ) -> Result<()> {
        let width = self.width();
        self.load_l2(meta, l2)?;
        let table = meta
            .l2
            .get(l2)
            .ok_or_else(|| Error::corrupt("write", "an L2 table left the cache while in use"))?;
        table.words[idx * width] = value;
        if width == 2 {
            table.words[idx * width + 1] = bitmap;
        }
        table.dirty = true;
        Ok(())
    }

    /// Sets a standard L2 entry; with extended L2 every subcluster becomes allocated.
    fn set_entry(&self, meta: &mut Meta, l2: u64, idx: usize, value: u64) -> Result<()> {
        self.set_entry_bitmap(meta, l2, idx, value, ALL_ALLOCATED)
    }

    fn entry_at(&self, meta: &mut Meta, l2: u64, idx: usize) -> Result<u64> {
        Ok(self.entry_bitmap_at(meta, l2, idx)?.0)
    }

    /// L2 entry `idx` and its subcluster bitmap (0 without extended L2).
    fn entry_bitmap_at(&self, meta: &mut Meta, l2: u64, idx: usize) -> Result<(u64, u64)> {
        let width = self.width();
        self.load_l2(meta, l2)?;
        meta.l2
            .get(l2)
            .map(|t| {
                let bitmap = if width == 2 { t.words[idx * 2 + 1] } else { 0 };
                (t.words[idx * width], bitmap)
            })
            .ok_or_else(|| Error::corrupt("write", "an L2 table left the cache while in use"))
    }

    /// Writes `data` into the guest cluster containing `pos` of an image with extended L2
    /// entries: only the touched subclusters become allocated, the others keep reading as
    /// they did (zeroes, or the backing file). A shared or compressed cluster is copied
    /// whole, as without subclusters.
    fn write_subclusters(&self, data: &[u8], pos: u64) -> Result<()> {
        let cs = self.header.cluster_size();
        let sc = cs / u64::from(crate::entry::SUBCLUSTERS);
        let start = pos & !(cs - 1);
        let within = pos - start;
        let valid = (self.size() - start).min(cs);
        let mut meta = self.meta.lock();
        let (l2, idx) = self.ensure_l2(&mut meta, pos)?;
        let (entry, bitmap) = self.entry_bitmap_at(&mut meta, l2, idx)?;
        // A contradictory subcluster bitmap is corruption even when this write would
        // replace the whole entry (qemu refuses it too).
        self.classify(entry, bitmap, 0, start)?;
        let data_file = self.header.has_data_file();
        let compressed = entry & COMPRESSED != 0;
        let host0 = entry & OFFSET_MASK;
        let has_host = !compressed && (host0 != 0 || (data_file && entry & COPIED != 0));
        let private = has_host && entry & COPIED != 0;
        if !private && (has_host || compressed) {
            let mut full = vec![0u8; cs as usize];
            drop(meta);
            self.read_locked(&mut full[..valid as usize], start)?;
            meta = self.meta.lock();
            full[within as usize..within as usize + data.len()].copy_from_slice(data);
            let old = self.classify(entry, 0, 0, start)?;
            let host = if data_file {
                start
            } else {
                let refs = meta.refs.as_mut().ok_or_else(|| self.refs_missing())?;
                refs.alloc(self.file())? << self.header.cluster_bits
            };
            self.guard(&mut meta, host, valid)?;
            self.put_data(self.data_file()?, &full[..valid as usize], start, host)?;
            self.set_entry_bitmap(&mut meta, l2, idx, host | COPIED, ALL_ALLOCATED)?;
            if !data_file {
                Self::release(&mut meta, old, cs);
            }
            return Ok(());
        }
        // Touched subclusters, with the untouched bytes of the edge ones filled from what
        // they read as now.
        let end = within + data.len() as u64;
        let (first, last) = (within / sc, (end - 1) / sc);
        let span = (first * sc, ((last + 1) * sc).min(valid));
        let mut owned;
        let payload: &[u8] = if span == (within, end) {
            data
        } else {
            owned = vec![0u8; (span.1 - span.0) as usize];
            drop(meta);
            self.need_backing_for_cow(pos)?;
            self.read_locked(&mut owned, start + span.0)?;
            meta = self.meta.lock();
            let at = (within - span.0) as usize;
            owned[at..at + data.len()].copy_from_slice(data);
            &owned
        };
        let host = if private {
            host0
        } else if data_file {
            start
        } else {
            let refs = meta.refs.as_mut().ok_or_else(|| self.refs_missing())?;
            refs.alloc(self.file())? << self.header.cluster_bits
        };
        self.guard(&mut meta, host + span.0, payload.len() as u64)?;
        self.put_data(self.data_file()?, payload, start + span.0, host + span.0)?;
        let mask = (((1u64 << (last - first + 1)) - 1) << first) & 0xffff_ffff;
        let new_bitmap = (bitmap | mask) & !(mask << 32);
        self.set_entry_bitmap(&mut meta, l2, idx, host | COPIED, new_bitmap)
    }

    /// Queues the host storage of `kind` to lose one reference at the next write-back.
    fn release(meta: &mut Meta, kind: Kind, cluster_size: u64) {
        match kind {
            Kind::Normal { host } | Kind::ZeroAlloc { host } | Kind::UnallocatedAlloc { host } => {
                meta.pending_free.push((host, cluster_size))
            }
            Kind::Compressed { offset, len } => meta.pending_free.push((offset, len)),
            Kind::Unallocated | Kind::ZeroPlain => {}
        }
    }

    /// Writes `data` into the guest cluster containing `pos` (`data` does not cross it).
    fn write_cluster(&self, data: &[u8], pos: u64) -> Result<()> {
        if self.decoder.extended_l2 {
            return self.write_subclusters(data, pos);
        }
        let cs = self.header.cluster_size();
        let start = pos & !(cs - 1);
        let within = (pos - start) as usize;
        let mut meta = self.meta.lock();
        let (l2, idx) = self.ensure_l2(&mut meta, pos)?;
        let entry = self.entry_at(&mut meta, l2, idx)?;
        let kind = self.classify(entry, 0, 0, start)?;
        let copied = entry & COPIED != 0;
        if let (Kind::Normal { host }, true) = (kind, copied) {
            self.guard(&mut meta, host + within as u64, data.len() as u64)?;
            drop(meta);
            if self.encrypted() {
                return self.write_sectors_in_place(data, pos, host + within as u64);
            }
            return self.data_file()?.write_at(data, host + within as u64);
        }
        // Build the whole new cluster: its current contents with `data` on top.
        let full: Vec<u8> = if data.len() as u64 == cs {
            data.to_vec()
        } else {
            let mut b = vec![0u8; cs as usize];
            let valid = (self.size() - start).min(cs) as usize;
            if !matches!(kind, Kind::ZeroPlain | Kind::ZeroAlloc { .. }) {
                drop(meta);
                if kind.falls_through() {
                    self.need_backing_for_cow(pos)?;
                }
                self.read_locked(&mut b[..valid], start)?;
                meta = self.meta.lock();
            }
            b[within..within + data.len()].copy_from_slice(data);
            b
        };
        if let (Kind::ZeroAlloc { host }, true) = (kind, copied) {
            self.guard(&mut meta, host, cs)?;
            self.put_data(self.data_file()?, &full, start, host)?;
            return self.set_entry(&mut meta, l2, idx, host | COPIED);
        }
        if self.header.has_data_file() {
            // Data clusters of an external data file sit at their guest offset and carry
            // no refcount: nothing to allocate or release.
            let valid = (self.size() - start).min(cs) as usize;
            self.put_data(self.data_file()?, &full[..valid], start, start)?;
            return self.set_entry(&mut meta, l2, idx, start | COPIED);
        }
        let refs = meta.refs.as_mut().ok_or_else(|| self.refs_missing())?;
        let host = refs.alloc(self.file())? << self.header.cluster_bits;
        self.guard(&mut meta, host, cs)?;
        self.put_data(self.file(), &full, start, host)?;
        self.set_entry(&mut meta, l2, idx, host | COPIED)?;
        Self::release(&mut meta, kind, cs);
        Ok(())
    }

    /// L2 entry and subcluster bitmap of guest `pos` without allocating or copying any
    /// table: `(0, 0)` where no L2 table covers it.
    fn peek_entry(&self, meta: &mut Meta, pos: u64) -> Result<(u64, u64)> {
        let cb = self.header.cluster_bits;
        let l1_index = (pos >> self.header.l1_entry_shift()) as usize;
        let idx = ((pos >> cb) & (self.header.l2_entries() - 1)) as usize;
        let l1 = *meta.l1.get(l1_index).ok_or_else(|| {
            Error::corrupt("write", format!("L1 index {l1_index} is past the L1 table"))
        })?;
        let l2 = self.l2_offset(l1_index as u64, l1)?;
        if l2 == 0 {
            return Ok((0, 0));
        }
        self.entry_bitmap_at(meta, l2, idx)
    }

    /// Makes `[offset, offset + len)` of a raw external data file read as zeroes, as QEMU
    /// does before it zeroes the clusters, so the data file stays the guest disk.
    fn zero_raw_data_file(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        if !self.header.data_file_raw() {
            return Ok(());
        }
        let data = self.data_file()?;
        match mode {
            ZeroMode::MayUnmap => zero_host(data, offset, len),
            ZeroMode::KeepAllocated => zero_in_place(data, offset, len),
        }
    }

    /// Drops the reference an L2 entry that stopped mapping `old` held: a refcount lowered
    /// at the next write-back, or, in an external data file (which has no refcounts), the
    /// range discarded there as QEMU's `qcow2_free_any_cluster` does.
    fn free_mapping(&self, meta: &mut Meta, entry: u64, old: Kind) -> Result<()> {
        let cs = self.header.cluster_size();
        if !self.header.has_data_file() {
            Self::release(meta, old, cs);
            return Ok(());
        }
        match old {
            Kind::Normal { host } | Kind::ZeroAlloc { host } | Kind::UnallocatedAlloc { host } => {
                debug_assert_eq!(host, entry & OFFSET_MASK);
                zero_host(self.data_file()?, host, cs)
            }
            _ => Ok(()),
        }
    }

    /// Makes one whole guest cluster read as zeroes, or discards it, with the L2 entries
    /// QEMU's `zero_in_l2_slice` and `discard_in_l2_slice` write:
    /// - zeroes (version 3): the zero flag (or, with extended L2, every subcluster zero)
    ///   on the entry as it is; with `MayUnmap` an allocated cluster is freed first, and a
    ///   compressed one always is;
    /// - discard: an allocated cluster (or any cluster over a backing file) is freed and
    ///   reads as zeroes (zero flag, all-zero subclusters; version 2: unallocated, and
    ///   nothing at all over a backing file);
    /// - zeroes on version 2, which has no zero flag: deallocated where nothing shows
    ///   through, else written as zero bytes.
    ///
    /// Clusters freed in an external data file are discarded there; a raw data file is
    /// zeroed first so that it keeps reading as the guest disk.
    fn clear_cluster(&self, pos: u64, discard: bool, mode: ZeroMode) -> Result<()> {
        let cs = self.header.cluster_size();
        let has_backing = self.header.backing_file.is_some();
        let v3 = self.header.version >= 3;
        let ext = self.decoder.extended_l2;
        let data_file = self.header.has_data_file();
        if !discard {
            self.zero_raw_data_file(pos, (self.size() - pos).min(cs), mode)?;
        }
        let mut meta = self.meta.lock();
        let (entry, bitmap) = self.peek_entry(&mut meta, pos)?;
        // A contradictory entry is corruption even when it is about to be replaced.
        self.classify(entry, bitmap, 0, pos)?;
        let compressed = entry & COMPRESSED != 0;
        let host = entry & OFFSET_MASK;
        let allocated = compressed || host != 0 || (data_file && entry & COPIED != 0);
        let (new_entry, new_bitmap) = if discard {
            match (has_backing || allocated, ext, v3) {
                (false, _, _) => (entry, bitmap),
                // qemu refuses (ENOTSUP): the backing file would show through.
                (true, false, false) if has_backing => (entry, bitmap),
                (true, true, _) => (0, ALL_ZERO),
                (true, false, true) => (ZERO, 0),
                (true, false, false) => (0, 0),
            }
        } else if v3 {
            let unmap = compressed || (mode == ZeroMode::MayUnmap && allocated);
            let kept = if unmap { 0 } else { entry };
            if ext {
                (kept, ALL_ZERO)
            } else {
                (kept | ZERO, 0)
            }
        } else if has_backing {
            drop(meta);
            return self.write_cluster(&vec![0u8; (self.size() - pos).min(cs) as usize], pos);
        } else {
            (0, 0)
        };
        if (new_entry, new_bitmap) == (entry, bitmap) {
            // qemu takes the L2 table for writing before it looks at the entry (its
            // `get_cluster_table`): one that is missing is allocated empty, one shared
            // with a snapshot is copied, even when no entry changes. Doing the same keeps
            // every later allocation at qemu's host offsets. Only a version 2 discard over
            // a backing file is refused before that.
            if !(discard && !v3 && has_backing) {
                self.ensure_l2(&mut meta, pos)?;
            }
            return Ok(());
        }
        let (l2, idx) = self.ensure_l2(&mut meta, pos)?;
        self.set_entry_bitmap(&mut meta, l2, idx, new_entry, new_bitmap)?;
        let still_maps = new_entry & OFFSET_MASK != 0 || (data_file && new_entry & COPIED != 0);
        if allocated && !still_maps {
            let old = self.classify(entry, 0, 0, pos)?;
            self.free_mapping(&mut meta, entry, old)?;
        }
        Ok(())
    }

    /// Write-zeroes of a part of one cluster of an extended-L2 image, as QEMU splits it:
    /// whole subclusters are marked zero in the bitmap (a compressed cluster is written
    /// instead); a piece of a subcluster marks it zero whole only when the rest of it
    /// already reads as zeroes without data, and is otherwise written as zero bytes.
    fn zero_subcluster_piece(&self, pos: u64, len: u64, mode: ZeroMode) -> Result<()> {
        let sc = self.decoder.subcluster_size();
        let size = self.size();
        let end = pos + len;
        let aligned = |x: u64| x.is_multiple_of(sc) || x == size;
        let head_end = if aligned(pos) {
            pos
        } else {
            pos.next_multiple_of(sc).min(end)
        };
        if head_end > pos {
            self.zero_partial_subcluster(pos, head_end - pos, mode)?;
        }
        if head_end == end {
            return Ok(());
        }
        // `head_end` is a subcluster boundary here, so the tail starts at or after it.
        let tail_start = if aligned(end) { end } else { end - end % sc };
        if tail_start > head_end {
            self.zero_subcluster_range(head_end, tail_start, mode)?;
        }
        if end > tail_start {
            self.zero_partial_subcluster(tail_start, end - tail_start, mode)?;
        }
        Ok(())
    }

    /// One piece of a single subcluster (see [`Self::zero_subcluster_piece`]).
    fn zero_partial_subcluster(&self, pos: u64, len: u64, mode: ZeroMode) -> Result<()> {
        let sc = self.decoder.subcluster_size();
        let start = pos - pos % sc;
        let end = (start + sc).min(self.size());
        let (kind, _) = self.lookup(start, end - start)?;
        let no_data = match kind {
            Kind::ZeroPlain | Kind::ZeroAlloc { .. } => true,
            Kind::Unallocated | Kind::UnallocatedAlloc { .. } => {
                match (&self.backing, self.header.backing_file.is_some()) {
                    (_, false) => true,
                    (Some(backing), true) => {
                        backing_reads_zero(backing.as_ref(), start, pos - start)?
                            && backing_reads_zero(backing.as_ref(), pos + len, end - pos - len)?
                    }
                    (None, true) => false,
                }
            }
            _ => false,
        };
        if no_data {
            self.zero_subcluster_range(start, end, mode)
        } else {
            self.write_cluster(&vec![0u8; len as usize], pos)
        }
    }

    /// Marks the whole subclusters of `[from, to)` (inside one cluster; `to` may be the
    /// disk's end) zero, as QEMU's `zero_l2_subclusters`.
    fn zero_subcluster_range(&self, from: u64, to: u64, mode: ZeroMode) -> Result<()> {
        let sc = self.decoder.subcluster_size();
        let cs = self.header.cluster_size();
        let start = from & !(cs - 1);
        let first = (from - start) / sc;
        let count = (to - start).div_ceil(sc) - first;
        self.zero_raw_data_file(from, to - from, mode)?;
        let mut meta = self.meta.lock();
        let (entry, bitmap) = self.peek_entry(&mut meta, from)?;
        self.classify(entry, bitmap, 0, start)?;
        if entry & COMPRESSED != 0 {
            // A compressed cluster cannot be zeroed in part: QEMU writes the zeroes.
            drop(meta);
            return self.write_cluster(&vec![0u8; (to - from) as usize], from);
        }
        let mask = ((1u64 << count) - 1) << first;
        let new = (bitmap | (mask << 32)) & !mask;
        // The table is taken for writing first, as in `clear_cluster`.
        let (l2, idx) = self.ensure_l2(&mut meta, from)?;
        if new == bitmap {
            return Ok(());
        }
        self.set_entry_bitmap(&mut meta, l2, idx, entry, new)
    }

    /// Splits `[offset, offset + len)` into per-cluster pieces: `(pos, len, whole)`, where
    /// `whole` means the piece covers its cluster up to the cluster's end or the disk's end.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
        let cs = self.header.cluster_size();
        let size = self.size();
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let cluster_end = ((pos & !(cs - 1)) + cs).min(end);
            let n = cluster_end - pos;
            let whole = pos & (cs - 1) == 0 && (n == cs || cluster_end == size);
            let piece = (pos, n, whole);
            pos = cluster_end;
            Some(piece)
        })
    }

    fn after_op(&self) -> Result<()> {
        let mut meta = self.meta.lock();
        if meta.l2.needs_writeback() || meta.pending_free.len() > 4096 {
            self.writeback(&mut meta)?;
        }
        Ok(())
    }

    /// Refcount structures found broken while allocating (a malformed refcount table
    /// entry, a refcount block past the end of the file) are corruption of this image
    /// (backing files are read-only, so such errors are never theirs): they mark it
    /// corrupt, as qemu does, instead of failing only the one request.
    fn refcount_damage(&self, e: Error) -> Error {
        if e.op() == "allocate" {
            self.signal_corruption(e)
        } else {
            e
        }
    }

    pub(crate) fn write_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable("write", offset, buf.len() as u64)?;
        let _io = self.io.write();
        self.write_batched(buf, offset)
            .map_err(|e| self.refcount_damage(e))
    }

    fn write_batched(&self, buf: &[u8], offset: u64) -> Result<()> {
        let written = self.write_pieces(buf, offset);
        // Clusters reserved for a run that an error cut short go back.
        let released = match self.meta.lock().refs.as_mut() {
            Some(refs) => refs.release_reserved(self.file()),
            None => Ok(()),
        };
        written.and(released)?;
        self.after_op()
    }

    fn write_pieces(&self, buf: &[u8], offset: u64) -> Result<()> {
        // Whole clusters need no copy-on-write reads: they are mapped in one batch, their
        // data goes out in as few host writes as the mapping allows, and only then do the
        // L2 entries change (data before the reference).
        let batchable = !self.decoder.extended_l2 && !self.header.has_data_file();
        let pieces: Vec<(u64, u64, bool)> = self.pieces(offset, buf.len() as u64).collect();
        let mut batch: Vec<Mapped> = Vec::new();
        // Pieces left in the current run of clusters needing allocation.
        let mut in_run = 0usize;
        for (i, &(pos, n, whole)) in pieces.iter().enumerate() {
            if batchable && in_run == 0 {
                in_run = self.reserve_for_run(&pieces[i..])?;
            }
            in_run = in_run.saturating_sub(1);
            let at = (pos - offset) as usize;
            if batchable && whole {
                batch.push(self.map_whole_cluster(pos, at, n)?);
                continue;
            }
            self.commit_batch(buf, &mut batch)?;
            self.write_cluster(&buf[at..at + n as usize], pos)
                .map_err(|e| e.with_path(self.path()))?;
        }
        self.commit_batch(buf, &mut batch)
    }

    /// True when a write to the guest cluster at `pos` needs a new host cluster (it is not
    /// an allocated cluster of this image's own with COPIED set).
    fn needs_cluster(&self, meta: &mut Meta, pos: u64) -> Result<bool> {
        let cs = self.header.cluster_size();
        let (entry, _) = self.peek_entry(meta, pos)?;
        let kind = self.classify(entry, 0, 0, pos & !(cs - 1))?;
        Ok(!matches!(
            (kind, entry & COPIED != 0),
            (Kind::Normal { .. }, true) | (Kind::ZeroAlloc { .. }, true)
        ))
    }

    /// As qemu allocates for one write: when the first of `pieces` needs a new host
    /// cluster, so do the ones after it up to the first that does not or the end of its
    /// L2 table, and they all get one contiguous run of host clusters, taken after their
    /// L2 table (allocated or copied first, as qemu's `handle_alloc` does). Returns how
    /// many pieces the run covers (0: the first needs no cluster).
    fn reserve_for_run(&self, pieces: &[(u64, u64, bool)]) -> Result<usize> {
        let Some(&(first, _, _)) = pieces.first() else {
            return Ok(0);
        };
        let shift = self.header.l1_entry_shift();
        let mut meta = self.meta.lock();
        let mut count = 0usize;
        for &(pos, _, _) in pieces {
            if pos >> shift != first >> shift || !self.needs_cluster(&mut meta, pos)? {
                break;
            }
            count += 1;
        }
        if count > 1 {
            self.ensure_l2(&mut meta, first)?;
            let refs = meta.refs.as_mut().ok_or_else(|| self.refs_missing())?;
            refs.reserve_run(self.file(), count as u64)?;
        }
        Ok(count)
    }

    /// Finds (or allocates) the host cluster a whole-cluster write of guest `pos` goes to;
    /// nothing visible changes until [`Self::commit_batch`].
    fn map_whole_cluster(&self, pos: u64, at: usize, len: u64) -> Result<Mapped> {
        let mut meta = self.meta.lock();
        let (l2, idx) = self.ensure_l2(&mut meta, pos)?;
        let entry = self.entry_at(&mut meta, l2, idx)?;
        let kind = self.classify(entry, 0, 0, pos)?;
        let (host, old) = match (kind, entry & COPIED != 0) {
            (Kind::Normal { host }, true) => (host, None),
            (Kind::ZeroAlloc { host }, true) => (host, None),
            (old, _) => {
                let refs = meta.refs.as_mut().ok_or_else(|| self.refs_missing())?;
                let host = refs.alloc(self.file())? << self.header.cluster_bits;
                (host, Some(old))
            }
        };
        self.guard(&mut meta, host, len)?;
        Ok(Mapped {
            host,
            at,
            len: len as usize,
            l2,
            idx,
            old,
            entry,
        })
    }

    /// Writes the data of `batch` (merging host-contiguous pieces) and then points the L2
    /// entries at it.
    fn commit_batch(&self, buf: &[u8], batch: &mut Vec<Mapped>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut i = 0;
        while i < batch.len() {
            let mut j = i + 1;
            while j < batch.len()
                && batch[j].host == batch[j - 1].host + batch[j - 1].len as u64
                && batch[j].at == batch[j - 1].at + batch[j - 1].len
            {
                j += 1;
            }
            let end = batch[j - 1].at + batch[j - 1].len;
            // Guest offsets only matter to legacy AES, which is never written.
            self.put_data(self.file(), &buf[batch[i].at..end], 0, batch[i].host)?;
            i = j;
        }
        let cs = self.header.cluster_size();
        let mut meta = self.meta.lock();
        for m in batch.drain(..) {
            let value = m.host | COPIED;
            if value != m.entry {
                self.set_entry(&mut meta, m.l2, m.idx, value)?;
            }
            if let Some(old) = m.old {
                Self::release(&mut meta, old, cs);
            }
        }
        Ok(())
    }

    pub(crate) fn write_zeroes_impl(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.check_writable("write zeroes", offset, len)?;
        let _io = self.io.write();
        self.zero_locked(offset, len, mode)
            .and_then(|()| self.after_op())
            .map_err(|e| self.refcount_damage(e))
    }

    /// Write-zeroes with the I/O lock held.
    ///
    /// A piece of a cluster is written as zero bytes, except (as QEMU's
    /// `qcow2_co_pwrite_zeroes` does) when the whole cluster already reads as zeroes without
    /// holding data: then the cluster is zeroed whole, which allocates nothing where a
    /// zero write would have allocated a cluster full of zeroes.
    fn zero_locked(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        let cs = self.header.cluster_size();
        for (pos, n, whole) in self.pieces(offset, len) {
            if whole {
                self.clear_cluster(pos, false, mode)?;
            } else if self.decoder.extended_l2 && self.header.version >= 3 {
                self.zero_subcluster_piece(pos, n, mode)?;
            } else if self.zero_without_data(pos & !(cs - 1))? {
                self.clear_cluster(pos & !(cs - 1), false, mode)?;
            } else {
                self.write_cluster(&vec![0u8; n as usize], pos)?;
            }
        }
        Ok(())
    }

    /// True when the guest cluster at `start` reads as zeroes and is unallocated or a zero
    /// cluster, so zeroing a piece of it may zero it whole. With a backing file (version 3
    /// only: version 2 cannot show zeroes over one) the backing file must report zeroes
    /// for the whole cluster.
    fn zero_without_data(&self, start: u64) -> Result<bool> {
        if self.decoder.extended_l2 {
            return Ok(false);
        }
        let cs = self.header.cluster_size();
        let valid = (self.size() - start).min(cs);
        let (kind, _) = self.lookup(start, valid)?;
        match kind {
            Kind::ZeroPlain | Kind::ZeroAlloc { .. } => Ok(true),
            Kind::Unallocated if self.header.backing_file.is_none() => Ok(true),
            Kind::Unallocated if self.header.version >= 3 => match &self.backing {
                Some(backing) => backing_reads_zero(backing.as_ref(), start, valid),
                None => Ok(false),
            },
            _ => Ok(false),
        }
    }

    pub(crate) fn discard_impl(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("discard", offset, len)?;
        let _io = self.io.write();
        // Discard is advisory: pieces of clusters keep their data.
        let discarded = self
            .pieces(offset, len)
            .filter(|&(_, _, whole)| whole)
            .try_for_each(|(pos, _, _)| self.clear_cluster(pos, true, ZeroMode::MayUnmap));
        discarded
            .and_then(|()| self.after_op())
            .map_err(|e| self.refcount_damage(e))
    }

    /// Writes one whole guest cluster compressed (what `convert -c` does), with the image's
    /// compression type. `buf` must cover exactly the cluster at `offset` (less at the end
    /// of the disk). Data that does not compress is written plainly instead. Compressed
    /// clusters are packed back to back into shared host clusters; each host cluster's
    /// refcount counts the compressed clusters in it.
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        let packed = self.compress_cluster(buf)?;
        self.write_compressed_cluster(buf, packed.as_deref(), offset)
    }

    /// Compresses one guest cluster (padded with zeroes at the end of the disk) with the
    /// image's compression type: `None` when it does not get smaller than a cluster.
    pub fn compress_cluster(&self, buf: &[u8]) -> Result<Option<Vec<u8>>> {
        let cs = self.header.cluster_size() as usize;
        if buf.len() > cs {
            return Err(Error::invalid(
                "write compressed",
                "a compressed write must cover exactly one whole cluster",
            ));
        }
        Ok(if buf.len() == cs {
            crate::compress::compress(self.header.compression_type, buf, cs)
        } else {
            let mut cluster = buf.to_vec();
            cluster.resize(cs, 0);
            crate::compress::compress(self.header.compression_type, &cluster, cs)
        })
    }

    /// Stores one whole guest cluster at `offset`: `packed` as [`Self::compress_cluster`]
    /// made it from `buf`, or `buf` plainly when it did not compress.
    pub fn write_compressed_cluster(
        &self,
        buf: &[u8],
        packed: Option<&[u8]>,
        offset: u64,
    ) -> Result<()> {
        self.store_compressed(buf, packed, offset)
            .map_err(|e| self.refcount_damage(e))
    }

    fn store_compressed(&self, buf: &[u8], packed: Option<&[u8]>, offset: u64) -> Result<()> {
        if buf.is_empty() {
            return self.end_compressed_stream();
        }
        self.check_writable("write compressed", offset, buf.len() as u64)?;
        let cs = self.header.cluster_size();
        let cb = self.header.cluster_bits;
        if offset & (cs - 1) != 0 || buf.len() as u64 != cs.min(self.size() - offset) {
            return Err(Error::invalid(
                "write compressed",
                "a compressed write must cover exactly one whole cluster",
            )
            .at_offset(offset));
        }
        if self.encrypted() {
            return Err(Error::unsupported(
                "write compressed",
                "Compression and encryption not supported at the same time",
            )
            .at_offset(offset));
        }
        if self.header.has_data_file() {
            // qemu's words (it fails the write with ENOTSUP), then why.
            return Err(Error::unsupported(
                "write compressed",
                "Operation not supported (images with an external data file cannot hold compressed clusters)",
            )
            .at_offset(offset));
        }
        let Some(packed) = packed else {
            return self.write_impl(buf, offset);
        };
        if packed.len() as u64 >= cs {
            return Err(Error::invalid(
                "write compressed",
                "a compressed cluster must be smaller than a cluster",
            ));
        }
        let _io = self.io.write();
        let mut meta = self.meta.lock();
        let (l2, idx) = self.ensure_l2(&mut meta, offset)?;
        let (entry, _) = self.entry_bitmap_at(&mut meta, l2, idx)?;
        let old = if entry & COMPRESSED != 0 {
            self.classify(entry, 0, 0, offset)?
        } else if entry & OFFSET_MASK != 0 {
            Kind::Normal {
                host: entry & OFFSET_MASK,
            }
        } else {
            Kind::Unallocated
        };
        let len = packed.len() as u64;
        let cursor = meta.compress_cursor;
        let refs = meta.refs.as_mut().ok_or_else(|| self.refs_missing())?;
        let max = crate::refcount::max_refcount(self.header.refcount_order);
        let shared = cursor != 0
            && cursor & (cs - 1) != 0
            && (cursor & (cs - 1)) + len <= cs
            && refs.get(self.file(), cursor >> cb)? < max;
        let place = if shared {
            refs.adjust(self.file(), cursor >> cb, true)?;
            cursor
        } else {
            refs.alloc(self.file())? << cb
        };
        meta.compress_cursor = place + len;
        self.guard(&mut meta, place, len)?;
        self.file().write_at(packed, place)?;
        let sectors = ((place & 511) + len).div_ceil(512);
        let value = place | ((sectors - 1) << (70 - cb)) | COMPRESSED;
        self.set_entry_bitmap(&mut meta, l2, idx, value, 0)?;
        Self::release(&mut meta, old, cs);
        drop(meta);
        self.after_op()
    }

    /// Pads the image file to a whole sector after the last compressed cluster, as QEMU
    /// does when qemu-img signals the end of a compressed copy, so sector-based readers
    /// can read the last stream whole.
    fn end_compressed_stream(&self) -> Result<()> {
        if !self.writable {
            return Err(self.read_only_error("write compressed"));
        }
        let _io = self.io.write();
        let len = self.file().len()?;
        let padded = len.next_multiple_of(512);
        if padded != len {
            self.file().set_len(padded)?;
        }
        Ok(())
    }

    /// Allocates a host cluster for every unallocated guest cluster (QEMU's
    /// `preallocation=metadata`), then reserves (`falloc`) or writes (`full`) their space.
    pub(crate) fn preallocate(&self, mode: Preallocation) -> Result<()> {
        if !self.writable {
            return Err(self.read_only_error("preallocate"));
        }
        let _io = self.io.write();
        self.preallocate_range(0, self.size(), mode)
    }

    /// [`Self::preallocate`] for the guest clusters of `[from, to)`, with the I/O lock held.
    ///
    /// As QEMU's `preallocate_co`: with an external data file a cluster maps to the same
    /// offset there and nothing is allocated in the image file; with extended L2 entries the
    /// subcluster bitmaps are left as they are, so the new clusters still read through (as
    /// zeroes, or from a backing file). A new last cluster that `to` ends inside gets the
    /// rest of its (sub)cluster written with zeroes, as QEMU's copy-on-write of the tail
    /// does, and the host file then reaches at least the host offset of `to`.
    fn preallocate_range(&self, from: u64, to: u64, mode: Preallocation) -> Result<()> {
        let cs = self.header.cluster_size();
        let external = self.header.has_data_file();
        // A free cluster inside the file may still hold old data (freed by a tool that
        // did not punch it); past the old end every cluster reads as zeroes.
        let old_end = self.file().len()?;
        let mut meta = self.meta.lock();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        // Host offset of the last cluster of the range and whether it was allocated here.
        let mut last: Option<(u64, bool)> = None;
        let mut pos = from;
        while pos < to {
            let (l2, idx) = self.ensure_l2(&mut meta, pos)?;
            let (entry, bitmap) = self.entry_bitmap_at(&mut meta, l2, idx)?;
            let host_now = entry & OFFSET_MASK;
            let mapped = host_now != 0 || (external && entry & COPIED != 0);
            let cluster_start = pos & !(cs - 1);
            if mapped {
                // A compressed cluster has no plain host offset to extend the file to.
                last = (entry & COMPRESSED == 0).then_some((host_now, false));
            } else {
                let host = if external {
                    cluster_start
                } else {
                    let refs = meta.refs.as_mut().ok_or_else(|| self.refs_missing())?;
                    let host = refs.alloc(self.file())? << self.header.cluster_bits;
                    // Zeroed before any table points to it.
                    if host < old_end {
                        self.guard_image_file(&mut meta, host, cs)?;
                        zero_host(self.file(), host, cs)?;
                    }
                    host
                };
                self.set_entry_bitmap(&mut meta, l2, idx, host | COPIED, bitmap)?;
                if !external {
                    match runs.last_mut() {
                        Some((start, len)) if *start + *len == host => *len += cs,
                        _ => runs.push((host, cs)),
                    }
                }
                last = Some((host, true));
            }
            pos = cluster_start + cs;
            if meta.l2.needs_writeback() {
                self.writeback(&mut meta)?;
            }
        }
        self.writeback(&mut meta)?;
        let Some((last_host, last_new)) = last else {
            return Ok(());
        };
        let target = self.data_file()?.clone();
        let within = to - ((to - 1) & !(cs - 1));
        let end_host = last_host + within;
        if !external && matches!(mode, Preallocation::Falloc | Preallocation::Full) {
            // Whole clusters, reserved or written run by run.
            if let Some(&(start, len)) = runs.iter().max_by_key(|(s, l)| s + l) {
                if target.len()? < start + len {
                    target.set_len(start + len)?;
                }
            }
            for &(start, len) in &runs {
                match mode {
                    Preallocation::Falloc => target.allocate(start, len)?,
                    _ => target.write_zero_bytes(start, len)?,
                }
            }
            return Ok(());
        }
        let grain = if self.decoder.extended_l2 {
            self.decoder.subcluster_size()
        } else {
            cs
        };
        let tail = to.next_multiple_of(grain).min(to + (cs - within)) - to;
        if last_new && tail > 0 {
            target.write_at(&vec![0u8; tail as usize], end_host)?;
        }
        let old_len = target.len()?;
        if old_len < end_host {
            match mode {
                Preallocation::Off | Preallocation::Metadata => target.set_len(end_host)?,
                Preallocation::Falloc => target.allocate(old_len, end_host - old_len)?,
                Preallocation::Full => {
                    target.set_len(end_host)?;
                    target.write_zero_bytes(old_len, end_host - old_len)?;
                }
            }
            if old_len == 0 && mode != Preallocation::Full {
                // QEMU's file driver writes the first block of a file it grows from empty,
                // so that alignment probing works; `map` of the data file shows it.
                let first = if end_host < 4096 { 512 } else { 4096 };
                target.write_at(&vec![0u8; first], 0)?;
            }
        }
        Ok(())
    }

    /// Changes the guest-visible size. Growing extends the L1 table when needed (moved to
    /// new contiguous clusters, switched over in one header write); shrinking deallocates
    /// every cluster past the new end first. v2 images with internal snapshots are refused.
    pub(crate) fn resize_impl(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        if !self.writable {
            return Err(self.read_only_error("resize"));
        }
        let _io = self.io.write();
        let old_size = self.size();
        if new_size == old_size {
            return Ok(());
        }
        // v3 snapshots record their own virtual size, so the active layer may change size
        // under them (its clusters shared with a snapshot are released, not freed, and
        // shared L2 tables are copied before an entry changes); v2 snapshot entries have no
        // size of their own, which is why qemu refuses those.
        if self.header.version < 3 && self.meta.lock().nb_snapshots > 0 {
            return Err(Error::unsupported(
                "resize",
                "Can't resize a v2 image which has snapshots",
            )
            .with_path(self.path()));
        }
        if new_size > i64::MAX as u64 {
            return Err(Error::invalid(
                "resize",
                format!("size {new_size} is too large"),
            ));
        }
        if !new_size.is_multiple_of(512) {
            // qemu's words: the qcow2 driver takes whole sectors only.
            return Err(
                Error::invalid("resize", "The new size must be a multiple of 512")
                    .with_path(self.path()),
            );
        }
        if new_size < old_size && prealloc != Preallocation::Off {
            return Err(Error::invalid(
                "resize",
                "Preallocation can only be used when growing an image",
            ));
        }
        let cs = self.header.cluster_size();
        let cb = self.header.cluster_bits;
        let shift = self.header.l1_entry_shift();
        let needed_l1 = new_size.div_ceil(1u64 << shift);
        let mut meta = self.meta.lock();
        if new_size < old_size {
            // Deallocate every cluster that lies wholly past the new end.
            let first = new_size.div_ceil(cs) * cs;
            let mut pos = first;
            while pos < old_size {
                let (kind, run) = self.lookup_locked(&mut meta, pos, old_size - pos)?;
                let run = run.max(1);
                if !matches!(kind, Kind::Unallocated) {
                    let mut at = pos;
                    while at < pos + run {
                        let (l2, idx) = self.ensure_l2(&mut meta, at)?;
                        let (entry, _) = self.entry_bitmap_at(&mut meta, l2, idx)?;
                        let old = self.classify(entry, 0, 0, at)?;
                        self.set_entry_bitmap(&mut meta, l2, idx, 0, 0)?;
                        self.free_mapping(&mut meta, entry, old)?;
                        at = (at & !(cs - 1)) + cs;
                    }
                }
                pos += run;
            }
            // L2 tables that now cover nothing are unhooked and freed.
            for i in needed_l1 as usize..meta.l1.len() {
                let l2 = self.l2_offset(i as u64, meta.l1[i])?;
                if l2 == 0 {
                    continue;
                }
                meta.l1[i] = 0;
                self.file()
                    .write_at(&0u64.to_be_bytes(), meta.l1_offset + i as u64 * 8)?;
                meta.pending_free.push((l2, cs));
            }
            self.writeback(&mut meta)?;
            self.file().flush()?;
            self.cut_unused_tail(&mut meta)?;
            self.write_size(new_size, meta.l1.len() as u64, meta.l1_offset)?;
            self.size
                .store(new_size, std::sync::atomic::Ordering::Release);
            if let crate::open::DataFile::External(data) = &self.data {
                if self.header.data_file_raw() {
                    data.set_len(new_size)?;
                }
            }
            return Ok(());
        }
        if needed_l1 > meta.l1.len() as u64 {
            if needed_l1 * 8 > crate::header::MAX_L1_BYTES {
                return Err(Error::invalid(
                    "resize",
                    format!("size {new_size} needs an L1 table larger than 32 MiB"),
                ));
            }
            let clusters = (needed_l1 * 8).div_ceil(cs);
            let mut l1 = meta.l1.clone();
            l1.resize((clusters * cs / 8) as usize, 0);
            l1.truncate(needed_l1 as usize);
            let refs = meta.refs.as_mut().ok_or_else(|| self.refs_missing())?;
            let start = refs.alloc_contiguous(self.file(), clusters)? << cb;
            // The new table and its refcounts are durable before the header points to it.
            refs.write_dirty(self.file())?;
            self.file().write_at(&table_bytes(&l1), start)?;
            self.file().flush()?;
            let old_offset = meta.l1_offset;
            let old_bytes = meta.l1.len() as u64 * 8;
            self.write_size(new_size, needed_l1, start)?;
            meta.l1 = l1;
            meta.l1_offset = start;
            meta.overlap.add_range(cb, start, clusters << cb);
            if old_bytes > 0 {
                meta.pending_free.push((old_offset, old_bytes));
            }
        } else {
            self.write_size(new_size, meta.l1.len() as u64, meta.l1_offset)?;
        }
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        drop(meta);
        // The grown range must read as zeroes: clear what a shrink left in the last partial
        // cluster, and hide a longer backing file.
        let tail_dirty = old_size & (cs - 1) != 0 && {
            let (kind, _) = self.lookup(old_size - 1, 1)?;
            match kind {
                Kind::Normal { .. } | Kind::Compressed { .. } => true,
                Kind::Unallocated | Kind::UnallocatedAlloc { .. } => self.backing.is_some(),
                Kind::ZeroPlain | Kind::ZeroAlloc { .. } => false,
            }
        };
        let mut zero_end = if tail_dirty {
            (old_size.div_ceil(cs) * cs).min(new_size)
        } else {
            old_size
        };
        if let Some(backing) = &self.backing {
            zero_end = zero_end.max(backing.size().min(new_size));
        }
        if zero_end > old_size {
            self.zero_locked(old_size, zero_end - old_size, ZeroMode::MayUnmap)?;
        }
        if prealloc != Preallocation::Off {
            let start = old_size.div_ceil(cs) * cs;
            self.preallocate_range(start, new_size, prealloc)?;
        }
        let mut meta = self.meta.lock();
        self.writeback(&mut meta)?;
        self.file().flush()
    }

    /// Cuts the image file after its last cluster in use, as QEMU does after a shrink
    /// (the freed clusters at the end would otherwise keep the file long).
    fn cut_unused_tail(&self, meta: &mut Meta) -> Result<()> {
        let cs = self.header.cluster_size();
        let file = self.file();
        let len = file.len()?;
        let refs = meta.refs.as_mut().ok_or_else(|| self.refs_missing())?;
        let mut end = len.div_ceil(cs);
        while end > 0 && refs.get(file, end - 1)? == 0 {
            end -= 1;
        }
        if end * cs < len {
            file.set_len(end * cs)?;
            refs.truncated(end);
        }
        Ok(())
    }

    /// Records a new guest size.
    pub(crate) fn set_size(&self, size: u64) {
        self.size.store(size, std::sync::atomic::Ordering::Release);
    }

    /// [`Self::write_size`] for other modules.
    pub(crate) fn write_header_size(&self, size: u64, l1_size: u64, l1_offset: u64) -> Result<()> {
        self.write_size(size, l1_size, l1_offset)
    }

    /// Writes the size, L1 size and L1 offset header fields (bytes 24..48) in one write.
    fn write_size(&self, size: u64, l1_size: u64, l1_offset: u64) -> Result<()> {
        let mut raw = [0u8; 24];
        raw[..8].copy_from_slice(&size.to_be_bytes());
        let crypt: u32 = match self.header.crypt_method {
            CryptMethod::None => 0,
            CryptMethod::Aes => 1,
            CryptMethod::Luks => 2,
        };
        raw[8..12].copy_from_slice(&crypt.to_be_bytes());
        raw[12..16].copy_from_slice(&(l1_size as u32).to_be_bytes());
        raw[16..24].copy_from_slice(&l1_offset.to_be_bytes());
        self.file().write_at(&raw, 24)?;
        self.file().flush()
    }

    pub(crate) fn flush_impl(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut meta = self.meta.lock();
        self.writeback(&mut meta)?;
        if let crate::open::DataFile::External(data) = &self.data {
            data.flush()?;
        }
        self.file().flush()
    }

    /// Writes changed metadata back in the order that keeps the image consistent at every
    /// point: data and refcount increments, then L2 tables, then refcount decrements.
    pub(crate) fn writeback(&self, meta: &mut Meta) -> Result<()> {
        let Some(refs) = meta.refs.as_mut() else {
            return Ok(());
        };
        let file = self.file();
        if meta.l2.dirty_count() == 0 && meta.pending_free.is_empty() && !refs.has_dirty() {
            return Ok(());
        }
        if let crate::open::DataFile::External(data) = &self.data {
            data.flush()?;
        }
        refs.write_dirty(file)?;
        file.flush()?;
        let mut wrote = false;
        for (offset, table) in meta.l2.dirty_tables() {
            file.write_at(&table_bytes(&table.words), offset)?;
            table.dirty = false;
            wrote = true;
        }
        if wrote {
            file.flush()?;
        }
        if meta.pending_free.is_empty() {
            return Ok(());
        }
        let cb = self.header.cluster_bits;
        let cs = self.header.cluster_size();
        // Clusters whose last reference went, punched as QEMU's discard passthrough does,
        // so a later allocation that assumes a new cluster reads as zeroes (metadata
        // preallocation) cannot show their old contents.
        let mut freed: Vec<(u64, u64)> = Vec::new();
        for (offset, len) in std::mem::take(&mut meta.pending_free) {
            let first = offset >> cb;
            let last = (offset + len.max(1) - 1) >> cb;
            for cluster in first..=last {
                refs.adjust(file, cluster, false)?;
                if refs.get(file, cluster)? == 0 {
                    match freed.last_mut() {
                        Some((start, n)) if *start + *n == cluster << cb => *n += cs,
                        _ => freed.push((cluster << cb, cs)),
                    }
                    meta.l2.remove(cluster << cb);
                    meta.overlap.remove(cluster);
                    if meta.compress_cursor >> cb == cluster {
                        meta.compress_cursor = 0;
                    }
                }
            }
        }
        *self.last_compressed.lock() = None;
        refs.write_dirty(file)?;
        for (start, len) in freed {
            zero_host(file, start, len)?;
        }
        Ok(())
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        // Best effort: callers that care about errors flush before dropping.
        if self.writable {
            let _ = self.flush_impl();
            let _ = self.store_bitmaps();
        }
    }
}
