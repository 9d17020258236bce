//! Creating and deleting internal snapshots.
//!
//! A snapshot is a copy of the active L1 table plus one more reference on every L2 table
//! and data cluster it reaches; writes then copy-on-write anything whose refcount is above
//! one. The COPIED flags of the active tables are kept equal to "refcount is one", as the
//! write path relies on them.
//!
//! Ordering: the copied L1 table and the raised refcounts are durable before the snapshot
//! table that names them, and the snapshot table is durable before the header points to it;
//! on delete the header stops naming the snapshot before any refcount is lowered. A crash
//! in between leaks clusters at worst.

use std::time::{SystemTime, UNIX_EPOCH};

use vdisk_block::{BlockDev, Error, Result};

use crate::entry::{COMPRESSED, COPIED, OFFSET_MASK};
use crate::image::{Meta, Qcow2Image};
use crate::snapshot::{self, Snapshot};

/// Header offset of `nb_snapshots` (followed by `snapshots_offset`).
const HEADER_SNAPSHOTS: u64 = 60;

fn table_bytes(words: &[u64]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(words.len() * 8);
    for w in words {
        raw.extend_from_slice(&w.to_be_bytes());
    }
    raw
}

impl Qcow2Image {
    fn snapshot_preconditions(&self, op: &'static str) -> Result<()> {
        if !self.is_writable_image() {
            return Err(self.read_only_error(op));
        }
        if self.header.has_data_file() {
            return Err(Error::unsupported(
                op,
                "images with an external data file cannot have internal snapshots",
            )
            .with_path(self.path()));
        }
        Ok(())
    }

    fn is_writable_image(&self) -> bool {
        !self.is_read_only()
    }

    /// The snapshots as stored now.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let h = self.current_header();
        Ok(snapshot::read_table(self.file(), &h)
            .map_err(|e| e.with_path(self.path()))?
            .0)
    }

    /// Adds one reference to every L2 table and data cluster under `l1`.
    fn raise_tree(&self, meta: &mut Meta, l1: &[u64]) -> Result<()> {
        let cb = self.header.cluster_bits;
        let tree = self.tree_clusters(meta, l1)?;
        // A range starting a cluster or more past the end of the file (qemu's check calls
        // that corruption) would grow the refcount structures out there before anything
        // failed; refuse before any refcount changes.
        let end = self
            .file()
            .len()?
            .next_multiple_of(self.header.cluster_size());
        if let Some(&(offset, _)) = tree.iter().find(|&&(offset, _)| offset >= end) {
            return Err(Error::corrupt(
                "snapshot",
                format!("the L1 tree references host offset {offset:#x}, past the end of the file"),
            ));
        }
        for (cluster_offset, len) in tree {
            let first = cluster_offset >> cb;
            let last = (cluster_offset + len.max(1) - 1) >> cb;
            let refs = meta
                .refs
                .as_mut()
                .ok_or_else(|| self.read_only_error("snapshot"))?;
            for c in first..=last {
                refs.adjust(self.file(), c, true)?;
            }
        }
        Ok(())
    }

    /// Every host range referenced under `l1`: the L2 tables, then data clusters and
    /// compressed ranges.
    fn tree_clusters(&self, meta: &mut Meta, l1: &[u64]) -> Result<Vec<(u64, u64)>> {
        let cs = self.header.cluster_size();
        let width = if self.decoder.extended_l2 { 2 } else { 1 };
        let mut out = Vec::new();
        for (i, &e) in l1.iter().enumerate() {
            let l2 = self.decoder.l2_offset(i as u64, e)?;
            if l2 == 0 {
                continue;
            }
            out.push((l2, cs));
            self.load_l2(meta, l2)?;
            let words = meta
                .l2
                .get(l2)
                .map(|t| t.words.clone())
                .ok_or_else(|| Error::corrupt("snapshot", "an L2 table left the cache"))?;
            for idx in 0..self.header.l2_entries() as usize {
                let entry = words[idx * width];
                if entry & COMPRESSED != 0 {
                    if let crate::entry::Kind::Compressed { offset, len } =
                        self.decoder.classify(entry, 0, 0, 0)?
                    {
                        out.push((offset, len));
                    }
                } else if entry & OFFSET_MASK != 0 {
                    out.push((entry & OFFSET_MASK, cs));
                }
            }
        }
        Ok(out)
    }

    /// Sets the COPIED flags of the active L1 and L2 tables to "refcount is one", and
    /// writes the active L1 table if it changed.
    fn refresh_copied(&self, meta: &mut Meta) -> Result<()> {
        let cb = self.header.cluster_bits;
        let width = if self.decoder.extended_l2 { 2 } else { 1 };
        let mut l1_changed = false;
        for i in 0..meta.l1.len() {
            let e = meta.l1[i];
            let l2 = self.decoder.l2_offset(i as u64, e)?;
            if l2 == 0 {
                continue;
            }
            let refs = meta
                .refs
                .as_mut()
                .ok_or_else(|| self.read_only_error("snapshot"))?;
            let one = refs.get(self.file(), l2 >> cb)? == 1;
            let want = if one { l2 | COPIED } else { l2 };
            if want != e {
                meta.l1[i] = want;
                l1_changed = true;
            }
            self.load_l2(meta, l2)?;
            let mut words = meta
                .l2
                .get(l2)
                .map(|t| t.words.clone())
                .ok_or_else(|| Error::corrupt("snapshot", "an L2 table left the cache"))?;
            let mut changed = false;
            for idx in 0..self.header.l2_entries() as usize {
                let entry = words[idx * width];
                let host = entry & OFFSET_MASK;
                // Data clusters of an external data file carry no refcount and are always
                // COPIED.
                if entry & COMPRESSED != 0 || host == 0 || self.header.has_data_file() {
                    continue;
                }
                let refs = meta
                    .refs
                    .as_mut()
                    .ok_or_else(|| self.read_only_error("snapshot"))?;
                let one = refs.get(self.file(), host >> cb)? == 1;
                let want = if one { entry | COPIED } else { entry & !COPIED };
                if want != entry {
                    words[idx * width] = want;
                    changed = true;
                }
            }
            if changed {
                let t = meta.l2.insert(l2, words, true);
                t.dirty = true;
            }
        }
        if l1_changed {
            self.writeback(meta)?;
            self.file().flush()?;
            self.file()
                .write_at(&table_bytes(&meta.l1), meta.l1_offset)?;
        }
        Ok(())
    }

    /// Rewrites the COPIED flags of the active tables from the refcounts (repair).
    pub(crate) fn repair_copied(&self) -> Result<()> {
        if !self.is_writable_image() {
            return Err(self.read_only_error("repair"));
        }
        let _io = self.io.write();
        let mut meta = self.meta.lock();
        self.writeback(&mut meta)?;
        self.refresh_copied(&mut meta)?;
        self.writeback(&mut meta)?;
        self.file().flush()
    }

    /// Writes a new snapshot table holding `entries` and points the header at it; the old
    /// table is freed afterwards.
    fn replace_table(&self, meta: &mut Meta, entries: &[Vec<u8>]) -> Result<()> {
        let cs = self.header.cluster_size();
        let cb = self.header.cluster_bits;
        let bytes: Vec<u8> = entries.concat();
        let offset = if bytes.is_empty() {
            0
        } else {
            let n = (bytes.len() as u64).div_ceil(cs);
            let refs = meta
                .refs
                .as_mut()
                .ok_or_else(|| self.read_only_error("snapshot"))?;
            let at = refs.alloc_contiguous(self.file(), n)? << cb;
            refs.write_dirty(self.file())?;
            self.file().write_at(&bytes, at)?;
            meta.overlap.add_range(cb, at, bytes.len() as u64);
            at
        };
        self.file().flush()?;
        let mut raw = [0u8; 12];
        raw[..4].copy_from_slice(&(entries.len() as u32).to_be_bytes());
        raw[4..].copy_from_slice(&offset.to_be_bytes());
        self.file().write_at(&raw, HEADER_SNAPSHOTS)?;
        self.file().flush()?;
        let old = (meta.snapshots_offset, meta.nb_snapshots);
        if old.1 > 0 {
            let h = self.header_with(meta);
            let (_, old_bytes) =
                snapshot::read_table(self.file(), &h).map_err(|e| e.with_path(self.path()))?;
            meta.pending_free.push((old.0, old_bytes.max(1)));
        }
        meta.snapshots_offset = offset;
        meta.nb_snapshots = entries.len() as u32;
        Ok(())
    }

    /// Takes an internal snapshot of the current contents named `name`, which must be new
    /// and have 1 to 1023 bytes (stricter than qemu: see [`Self::snapshot_create_as_qemu`]).
    pub fn snapshot_create(&self, name: &str) -> Result<()> {
        self.snapshot_preconditions("create snapshot")?;
        if name.is_empty() || name.len() > 1023 {
            return Err(Error::invalid(
                "create snapshot",
                "a snapshot name must have 1 to 1023 bytes",
            ));
        }
        let existing = self.snapshots()?;
        if existing.iter().any(|s| s.name == name) {
            return Err(Error::invalid(
                "create snapshot",
                format!("a snapshot named '{name}' already exists"),
            ));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.take_snapshot(
            existing,
            name,
            (now.as_secs() as u32, now.subsec_nanos()),
            u64::MAX,
        )
    }

    /// Takes a snapshot as `qemu-img snapshot -c` does: any name (empty and repeated ones
    /// too), the time in microseconds and an instruction count of 0, so the table lists the
    /// same as one qemu-img wrote.
    pub fn snapshot_create_as_qemu(&self, name: &str) -> Result<()> {
        self.snapshot_preconditions("create snapshot")?;
        if name.len() > usize::from(u16::MAX) {
            return Err(Error::invalid(
                "create snapshot",
                "a snapshot name has at most 65535 bytes",
            ));
        }
        let existing = self.snapshots()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.take_snapshot(
            existing,
            name,
            (now.as_secs() as u32, now.subsec_micros() * 1000),
            0,
        )
    }

    fn take_snapshot(
        &self,
        existing: Vec<Snapshot>,
        name: &str,
        date: (u32, u32),
        icount: u64,
    ) -> Result<()> {
        // QEMU's QCOW_MAX_SNAPSHOTS; qemu fails with EFBIG.
        if existing.len() >= 65536 {
            return Err(Error::invalid(
                "create snapshot",
                "the image has 65536 snapshots, the most qcow2 allows",
            ));
        }
        let _io = self.io.write();
        let mut meta = self.meta.lock();
        if self.header.refcount_order == 0 && meta.l1.iter().any(|e| e & OFFSET_MASK != 0) {
            // An empty image needs no second reference, so qemu snapshots it; otherwise
            // its refcount update overflows (EINVAL).
            return Err(Error::invalid(
                "create snapshot",
                "1-bit refcounts cannot count the second reference a snapshot needs (raise refcount_bits first)",
            ));
        }
        self.writeback(&mut meta)?;
        let cs = self.header.cluster_size();
        let cb = self.header.cluster_bits;
        let l1 = meta.l1.clone();
        let copy: Vec<u64> = l1.iter().map(|e| e & !COPIED).collect();
        let l1_copy = if copy.is_empty() {
            0
        } else {
            let n = (copy.len() as u64 * 8).div_ceil(cs);
            let refs = meta
                .refs
                .as_mut()
                .ok_or_else(|| self.read_only_error("snapshot"))?;
            let at = refs.alloc_contiguous(self.file(), n)? << cb;
            self.file().write_at(&table_bytes(&copy), at)?;
            meta.overlap.add_range(cb, at, copy.len() as u64 * 8);
            at
        };
        self.raise_tree(&mut meta, &l1)?;
        self.refresh_copied(&mut meta)?;
        self.writeback(&mut meta)?;
        self.file().flush()?;
        let id = existing
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let mut entries: Vec<Vec<u8>> = existing.into_iter().map(|s| s.raw).collect();
        entries.push(snapshot::encode_entry(
            l1_copy,
            copy.len() as u32,
            &id.to_string(),
            name,
            date,
            self.size(),
            icount,
        ));
        self.replace_table(&mut meta, &entries)?;
        self.writeback(&mut meta)?;
        self.file().flush()
    }

    /// Reverts the active layer to the snapshot whose id or name is `which` (the snapshot
    /// stays). The snapshot's tree gains the active layer's reference before the L1 table
    /// switches to it; the old active tree loses it afterwards.
    pub fn snapshot_apply(&self, which: &str) -> Result<()> {
        self.snapshot_preconditions("apply snapshot")?;
        // The bitmaps would not record what the revert changes, so an incremental backup
        // taken from them would miss it. QEMU refuses for any bitmap, enabled or not.
        if !self.bitmap_list()?.is_empty() {
            return Err(Error::invalid(
                "apply snapshot",
                "Device has active dirty bitmaps",
            ));
        }
        let existing = self.snapshots()?;
        let snap = self
            .find_snapshot(&existing, which, "apply snapshot")?
            .clone();
        let _io = self.io.write();
        let mut meta = self.meta.lock();
        self.writeback(&mut meta)?;
        let cs = self.header.cluster_size();
        let cb = self.header.cluster_bits;
        let snap_l1 = self.read_l1_table(snap.l1_table_offset, snap.l1_size)?;
        let new_size = snap.disk_size.unwrap_or(self.size());
        if new_size.div_ceil(1u64 << self.header.l1_entry_shift()) > snap_l1.len() as u64 {
            return Err(Error::corrupt(
                "apply snapshot",
                "the snapshot's L1 table is too small for its disk size",
            ));
        }
        self.raise_tree(&mut meta, &snap_l1)?;
        self.writeback(&mut meta)?;
        self.file().flush()?;
        let old_active = meta.l1.clone();
        let mut new_l1: Vec<u64> = snap_l1.iter().map(|e| e & !COPIED).collect();
        if new_l1.len() > meta.l1.len() {
            let n = (new_l1.len() as u64 * 8).div_ceil(cs);
            let refs = meta
                .refs
                .as_mut()
                .ok_or_else(|| self.read_only_error("snapshot"))?;
            let at = refs.alloc_contiguous(self.file(), n)? << cb;
            refs.write_dirty(self.file())?;
            self.file().write_at(&table_bytes(&new_l1), at)?;
            self.file().flush()?;
            self.write_header_size(new_size, new_l1.len() as u64, at)?;
            let old_l1 = (meta.l1_offset, meta.l1.len() as u64 * 8);
            meta.pending_free.push(old_l1);
            meta.overlap.add_range(cb, at, new_l1.len() as u64 * 8);
            meta.l1_offset = at;
        } else {
            new_l1.resize(meta.l1.len(), 0);
            self.file()
                .write_at(&table_bytes(&new_l1), meta.l1_offset)?;
            self.file().flush()?;
            self.write_header_size(new_size, new_l1.len() as u64, meta.l1_offset)?;
        }
        for &e in &new_l1 {
            meta.overlap.add_range(cb, e & OFFSET_MASK, 1);
        }
        meta.l1 = new_l1;
        self.set_size(new_size);
        let tree = self.tree_clusters(&mut meta, &old_active)?;
        meta.pending_free.extend(tree);
        self.writeback(&mut meta)?;
        self.refresh_copied(&mut meta)?;
        self.writeback(&mut meta)?;
        *self.last_compressed.lock() = None;
        self.file().flush()
    }

    fn find_snapshot<'a>(
        &self,
        existing: &'a [Snapshot],
        which: &str,
        op: &'static str,
    ) -> Result<&'a Snapshot> {
        existing
            .iter()
            .find(|s| s.id == which)
            .or_else(|| existing.iter().find(|s| s.name == which))
            .ok_or_else(|| {
                Error::new(
                    vdisk_block::ErrorKind::NotFound,
                    op,
                    format!("Can't find the snapshot '{which}'"),
                )
            })
    }

    fn read_l1_table(&self, offset: u64, entries: u32) -> Result<Vec<u64>> {
        let bytes = u64::from(entries) * 8;
        if bytes > crate::header::MAX_L1_BYTES
            || offset.saturating_add(bytes) > self.file().len()?
        {
            return Err(Error::corrupt(
                "read snapshot",
                format!("the snapshot L1 table at {offset:#x} ({bytes} bytes) is invalid"),
            ));
        }
        let mut raw = vec![0u8; bytes as usize];
        self.file().read_at(&mut raw, offset)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_be_bytes(a)
            })
            .collect())
    }

    /// Deletes the snapshot whose id or name is `which` (ids are tried first, as QEMU does).
    pub fn snapshot_delete(&self, which: &str) -> Result<()> {
        self.snapshot_preconditions("delete snapshot")?;
        let existing = self.snapshots()?;
        let index = existing
            .iter()
            .position(|s| s.id == which)
            .or_else(|| existing.iter().position(|s| s.name == which))
            .ok_or_else(|| {
                Error::new(
                    vdisk_block::ErrorKind::NotFound,
                    "delete snapshot",
                    format!("Can't find the snapshot '{which}'"),
                )
            })?;
        self.delete_at(existing, index)
    }

    /// Deletes the snapshot whose id is `id` and whose name is `name`, as qemu's
    /// `bdrv_snapshot_delete` does.
    pub fn snapshot_delete_exact(&self, id: &str, name: &str) -> Result<()> {
        self.snapshot_preconditions("delete snapshot")?;
        let existing = self.snapshots()?;
        let index = existing
            .iter()
            .position(|s| s.id == id && s.name == name)
            .ok_or_else(|| {
                Error::new(
                    vdisk_block::ErrorKind::NotFound,
                    "delete snapshot",
                    "Failed to find snapshot",
                )
            })?;
        self.delete_at(existing, index)
    }

    /// Shows the snapshot chosen by `id` and `name` (both must match when both are given)
    /// instead of the active layer, as qemu's `qcow2_snapshot_load_tmp` does: read-only
    /// images only, the size stays. The L2 cache stays valid since it is keyed by host
    /// offset and nothing is written.
    pub fn load_snapshot_tmp(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        if !self.is_read_only() {
            return Err(Error::invalid("load snapshot", "Device is not readonly"));
        }
        let existing = self.snapshots()?;
        let snap = existing
            .iter()
            .find(|s| match (id, name) {
                (Some(i), Some(n)) => s.id == i && s.name == n,
                (Some(i), None) => s.id == i,
                (None, Some(n)) => s.name == n,
                (None, None) => false,
            })
            .ok_or_else(|| {
                Error::new(
                    vdisk_block::ErrorKind::NotFound,
                    "load snapshot",
                    "Can't find snapshot",
                )
            })?;
        let l1 = self.read_l1_table(snap.l1_table_offset, snap.l1_size)?;
        let _io = self.io.write();
        let mut meta = self.meta.lock();
        meta.l1 = l1;
        meta.l1_offset = snap.l1_table_offset;
        *self.last_compressed.lock() = None;
        Ok(())
    }

    fn delete_at(&self, existing: Vec<Snapshot>, index: usize) -> Result<()> {
        let _io = self.io.write();
        let mut meta = self.meta.lock();
        self.writeback(&mut meta)?;
        let gone = existing[index].clone();
        let entries: Vec<Vec<u8>> = existing
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, s)| s.raw)
            .collect();
        self.replace_table(&mut meta, &entries)?;
        // The snapshot is gone from the header: now its references may be dropped.
        let snap_l1 = {
            let bytes = u64::from(gone.l1_size) * 8;
            let mut raw = vec![0u8; bytes as usize];
            if bytes > 0 {
                self.file().read_at(&mut raw, gone.l1_table_offset)?;
            }
            raw.chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    u64::from_be_bytes(a)
                })
                .collect::<Vec<u64>>()
        };
        let tree = self.tree_clusters(&mut meta, &snap_l1)?;
        meta.pending_free.extend(tree);
        if gone.l1_size > 0 {
            meta.pending_free
                .push((gone.l1_table_offset, u64::from(gone.l1_size) * 8));
        }
        self.writeback(&mut meta)?;
        self.refresh_copied(&mut meta)?;
        self.writeback(&mut meta)?;
        self.file().flush()
    }
}
