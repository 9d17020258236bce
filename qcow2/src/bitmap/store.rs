//! Storing the bitmaps back (at close, or when a caller asks), in an order a crash cannot
//! turn into corruption:
//! 1. every bitmap's data clusters (all-zero clusters get no cluster: table entry 0) and
//!    table go to newly allocated clusters, then the new directory, which has `in_use`
//!    clear; the refcounts of all of them are written and flushed;
//! 2. the header switches to the new directory (bitmaps extension and the `bitmaps`
//!    autoclear bit) and is flushed;
//! 3. only then do the old directory, tables and data clusters lose their reference.
//!
//! A crash before 2 leaves the old directory, whose bitmaps are still marked `in_use`
//! (inconsistent, as after any crash of qemu) and some leaked clusters; after 2 the new
//! bitmaps are valid and at worst the old clusters leak. Bitmaps found inconsistent at
//! open keep their directory entry and clusters untouched.

use vdisk_block::{Error, HostFile, Result};

use crate::alloc::Refcounts;

use super::live::Entry;
use super::FLAG_AUTO;
use crate::header::{autoclear, ext, BitmapsExt};
use crate::image::{Qcow2Image, HEADER_INCOMPAT};

/// Allocates `n` contiguous clusters, first fit for a single one (as qemu does, so the
/// clusters an earlier store freed are reused and the file does not grow at every store).
fn alloc_run(refs: &mut Refcounts, file: &HostFile, n: u64) -> Result<u64> {
    if n == 1 {
        refs.alloc(file)
    } else {
        refs.alloc_contiguous(file, n)
    }
}

impl Qcow2Image {
    /// Writes the in-memory bitmaps to the image (nothing when nothing changed since the
    /// last store). The image's bitmaps are then no longer marked in use on disk; the next
    /// guest write marks them again.
    pub fn store_bitmaps(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut bm = self.bitmaps.lock();
        if !bm.loaded || !bm.needs_store {
            return Ok(());
        }
        if self
            .marked_corrupt
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(Error::corrupt(
                "store bitmaps",
                "the image was marked corrupt; the bitmaps were not stored",
            )
            .with_path(self.path()));
        }
        let file = self.file();
        let cb = self.header.cluster_bits;
        let cs = self.header.cluster_size();
        let mut meta = self.meta.lock();
        self.writeback(&mut meta)?;
        let refs = meta
            .refs
            .as_mut()
            .ok_or_else(|| Error::corrupt("store bitmaps", "the image has no refcounts loaded"))?;
        let mut new_clusters: Vec<(u64, u64)> = Vec::new();
        let mut dir: Vec<u8> = Vec::new();
        let mut flag_at: Vec<Option<usize>> = Vec::new();
        for e in &bm.entries {
            match e {
                Entry::Loaded(l) => {
                    let n = l.map.chunk_count();
                    let mut table = vec![0u64; n as usize];
                    for (i, bytes) in l.map.stored_chunks() {
                        let host = refs.alloc(file)? << cb;
                        file.write_at(&bytes, host)?;
                        new_clusters.push((host, cs));
                        if let Some(slot) = table.get_mut(i as usize) {
                            *slot = host;
                        }
                    }
                    let table_bytes: Vec<u8> = table.iter().flat_map(|t| t.to_be_bytes()).collect();
                    let clusters = (table_bytes.len() as u64).div_ceil(cs).max(1);
                    let table_offset = alloc_run(refs, file, clusters)? << cb;
                    let mut padded = table_bytes;
                    padded.resize((clusters * cs) as usize, 0);
                    file.write_at(&padded, table_offset)?;
                    new_clusters.push((table_offset, clusters * cs));
                    flag_at.push(Some(dir.len() + 12));
                    dir.extend_from_slice(&table_offset.to_be_bytes());
                    dir.extend_from_slice(&(n as u32).to_be_bytes());
                    let flags = if l.enabled { FLAG_AUTO } else { 0 };
                    dir.extend_from_slice(&flags.to_be_bytes());
                    dir.push(1);
                    dir.push(l.map.granularity().trailing_zeros() as u8);
                    dir.extend_from_slice(&(l.name.len() as u16).to_be_bytes());
                    dir.extend_from_slice(&0u32.to_be_bytes());
                    dir.extend_from_slice(l.name.as_bytes());
                }
                Entry::Kept(k) => {
                    flag_at.push(None);
                    dir.extend_from_slice(&k.raw);
                }
            }
            dir.resize(dir.len().next_multiple_of(8), 0);
        }
        let new_ext = if bm.entries.is_empty() {
            None
        } else {
            let clusters = (dir.len() as u64).div_ceil(cs);
            let offset = alloc_run(refs, file, clusters)? << cb;
            let mut padded = dir.clone();
            padded.resize((clusters * cs) as usize, 0);
            file.write_at(&padded, offset)?;
            new_clusters.push((offset, clusters * cs));
            Some(BitmapsExt {
                nb_bitmaps: bm.entries.len() as u32,
                directory_size: dir.len() as u64,
                directory_offset: offset,
            })
        };
        refs.write_dirty(file)?;
        file.flush()?;
        let table_offset = refs.table_offset();
        let table_clusters = refs.table_clusters() as u32;

        let mut h = self.header_with(&meta);
        h.refcount_table_offset = table_offset;
        h.refcount_table_clusters = table_clusters;
        // The feature bits as they are on disk now (a repair or the corrupt marking may
        // have changed them since the open).
        let mut incompat = [0u8; 8];
        file.read_at(&mut incompat, HEADER_INCOMPAT)?;
        h.incompatible_features = u64::from_be_bytes(incompat);
        h.extensions.bitmaps = new_ext;
        h.extensions
            .unknown
            .retain(|(kind, _)| *kind != ext::BITMAPS);
        h.autoclear_features = if new_ext.is_some() {
            meta.autoclear | autoclear::BITMAPS
        } else {
            meta.autoclear & !autoclear::BITMAPS
        };
        let bytes = h.encode().map_err(|e| e.with_path(self.path()))?;
        file.write_at(&bytes, 0)?;
        file.flush()?;
        meta.autoclear = h.autoclear_features;
        meta.bitmaps_ext = new_ext;

        if let Some(e) = new_ext {
            meta.overlap
                .add_range(cb, e.directory_offset, e.directory_size);
        }
        let old = std::mem::replace(&mut bm.stored_clusters, new_clusters);
        meta.pending_free.extend(old);
        self.writeback(&mut meta)?;
        file.flush()?;
        bm.stored_dir = new_ext.map(|e| (e.directory_offset, e.directory_size));
        bm.stored_flag_at = flag_at;
        bm.stored_count = bm.entries.len();
        bm.marked_in_use = false;
        bm.needs_store = false;
        Ok(())
    }
}
