//! Persistent bitmaps while the image is open: loading, the `in_use` marking of a writable
//! open, recording guest writes, and the operations `qemu-img bitmap` and the block jobs
//! use. Storing them back is `store.rs`.
//!
//! As in qemu, a writable open loads every consistent bitmap into memory and marks it
//! `in_use` in the directory before any guest write can happen (in place, with the
//! `bitmaps` autoclear bit cleared around the rewrite so a torn directory write is never
//! trusted); a clean close stores them and clears `in_use` again. A bitmap found `in_use`
//! was not saved cleanly: it is kept as it is on disk ("inconsistent"), and removal is the
//! only operation allowed on it. A read-only open loads the bitmaps only when asked.

use vdisk_block::{BlockDev, DirtyBitmapInfo, Error, HostFile, Result};

use super::dirty::{Chunk, DirtyMap};
use super::{read_directory, FLAG_AUTO, FLAG_IN_USE};
use crate::entry::OFFSET_MASK;
use crate::header::{autoclear, Header, MAX_BITMAPS, MAX_BITMAP_DIRECTORY};
use crate::image::Qcow2Image;

/// Header offset of `autoclear_features`.
const HEADER_AUTOCLEAR: u64 = 88;
/// Largest granularity qcow2 can store (bits 9..=31).
const MAX_GRANULARITY: u64 = 1 << 31;
/// qemu's BME_MAX_PHYS_SIZE: bitmap data of at most 512 MiB...
const MAX_PHYS_BYTES: u64 = 0x2000_0000;
/// ...and at most this many table entries (BME_MAX_TABLE_SIZE).
const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
/// Longest bitmap name.
const MAX_NAME: usize = 1023;

/// A bitmap loaded into memory.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub name: String,
    pub enabled: bool,
    pub map: DirtyMap,
}

/// A bitmap kept exactly as stored (found `in_use`).
#[derive(Debug, Clone)]
pub(crate) struct Kept {
    pub name: String,
    pub granularity: u64,
    pub flags: u32,
    /// The directory entry, byte for byte.
    pub raw: Vec<u8>,
}

/// One entry of the directory being kept in memory.
#[derive(Debug, Clone)]
pub(crate) enum Entry {
    Loaded(Loaded),
    Kept(Kept),
}

impl Entry {
    pub fn name(&self) -> &str {
        match self {
            Entry::Loaded(l) => &l.name,
            Entry::Kept(k) => &k.name,
        }
    }

    fn info(&self) -> DirtyBitmapInfo {
        match self {
            Entry::Loaded(l) => DirtyBitmapInfo {
                name: l.name.clone(),
                granularity: l.map.granularity(),
                enabled: l.enabled,
                inconsistent: false,
            },
            Entry::Kept(k) => DirtyBitmapInfo {
                name: k.name.clone(),
                granularity: k.granularity,
                enabled: k.flags & FLAG_AUTO != 0,
                inconsistent: true,
            },
        }
    }

    /// Bytes of its directory entry.
    pub fn dir_len(&self) -> u64 {
        match self {
            Entry::Loaded(l) => dir_entry_len(l.name.len()),
            Entry::Kept(k) => k.raw.len() as u64,
        }
    }
}

/// Length of a directory entry without extra data.
pub(crate) fn dir_entry_len(name_len: usize) -> u64 {
    (24 + name_len as u64).next_multiple_of(8)
}

/// The bitmaps of an open image.
#[derive(Debug, Default)]
pub(crate) struct Bitmaps {
    /// The directory has been read (for a read-only open, at the first question).
    pub loaded: bool,
    pub entries: Vec<Entry>,
    /// How many of `entries` (the first ones) are stored in the image; bitmaps added since
    /// come after them, newest first, which is the order qemu stores them in.
    pub stored_count: usize,
    /// Host clusters of the stored bitmaps (directory, tables, data) that the next store
    /// replaces and then frees, as `(offset, len)`.
    pub stored_clusters: Vec<(u64, u64)>,
    /// Where the stored directory is and how long, and where each entry's flags are.
    pub stored_dir: Option<(u64, u64)>,
    pub stored_flag_at: Vec<Option<usize>>,
    /// The directory on disk marks the loaded bitmaps `in_use`.
    pub marked_in_use: bool,
    /// Something changed since the last store (or the bitmaps were marked in use).
    pub needs_store: bool,
}

fn bad(message: String) -> Error {
    Error::corrupt("load bitmaps", message)
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Reads a bitmap table: `table_size` entries at `offset`, which must lie in the file.
pub(crate) fn read_table(file: &HostFile, offset: u64, entries: u32) -> Result<Vec<u64>> {
    let bytes = u64::from(entries) * 8;
    if offset.saturating_add(bytes) > file.len()? {
        return Err(bad(format!(
            "bitmap table at {offset:#x} lies past the end of the file"
        )));
    }
    let mut raw = vec![0u8; bytes as usize];
    file.read_at(&mut raw, offset)?;
    Ok(raw.chunks_exact(8).map(be64).collect())
}

/// The clusters a stored bitmap occupies: its table and its data clusters.
fn table_clusters(cs: u64, offset: u64, size: u32, table: &[u64]) -> Vec<(u64, u64)> {
    let mut out = vec![(offset, (u64::from(size) * 8).next_multiple_of(cs).max(cs))];
    out.extend(
        table
            .iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
            .map(|o| (o, cs)),
    );
    out
}

/// Loads the directory (and the contents of every consistent bitmap) of `file`.
pub(crate) fn load(file: &HostFile, h: &Header, size: u64) -> Result<Bitmaps> {
    let mut out = Bitmaps {
        loaded: true,
        ..Bitmaps::default()
    };
    let list = read_directory(file, h)?;
    let Some(ext) = h.extensions.bitmaps.filter(|_| !list.is_empty()) else {
        return Ok(out);
    };
    let cs = h.cluster_size();
    let mut dir = vec![0u8; ext.directory_size as usize];
    file.read_at(&mut dir, ext.directory_offset)?;
    out.stored_dir = Some((ext.directory_offset, ext.directory_size));
    out.stored_clusters
        .push((ext.directory_offset, ext.directory_size));
    let mut pos = 0usize;
    for b in list {
        let e = dir
            .get(pos..pos + 24)
            .ok_or_else(|| bad("bitmap directory entry is incomplete".into()))?;
        let extra = u32::from_be_bytes([e[20], e[21], e[22], e[23]]) as usize;
        // The stored name length: `b.name` was decoded lossily and may be longer.
        let name_size = usize::from(u16::from_be_bytes([e[18], e[19]]));
        let len = (24 + extra + name_size).next_multiple_of(8);
        let raw = dir
            .get(pos..(pos + len).min(dir.len()))
            .ok_or_else(|| bad("bitmap directory entry is incomplete".into()))?
            .to_vec();
        let in_use = b.flags & FLAG_IN_USE != 0;
        // An in-use bitmap's table is not trusted, but its clusters are still freed when
        // it is removed: a table that cannot be read leaks them instead.
        let table = if in_use {
            read_table(file, b.table_offset, b.table_size).unwrap_or_default()
        } else {
            read_table(file, b.table_offset, b.table_size)?
        };
        let clusters = table_clusters(cs, b.table_offset, b.table_size, &table);
        let at = pos;
        pos += len;
        if in_use || extra > 0 {
            // Kept entries keep their clusters; removing one frees them (see `remove`).
            out.stored_flag_at.push(None);
            out.entries.push(Entry::Kept(Kept {
                name: b.name,
                granularity: b.granularity,
                flags: b.flags,
                raw,
            }));
            continue;
        }
        let mut map = DirtyMap::new(b.granularity, size, cs);
        for (i, &entry) in table.iter().enumerate() {
            let host = entry & OFFSET_MASK;
            if entry & !OFFSET_MASK & !1 != 0 || (host != 0 && entry & 1 != 0) {
                return Err(bad(format!(
                    "bitmap '{}' table entry {i} ({entry:#x}) has reserved bits set",
                    b.name
                )));
            }
            if host == 0 {
                if entry & 1 != 0 {
                    map.put_chunk(i as u64, Chunk::Full);
                }
                continue;
            }
            if host.saturating_add(cs) > file.len()? {
                return Err(bad(format!(
                    "bitmap '{}' data cluster {host:#x} lies past the end of the file",
                    b.name
                )));
            }
            let mut data = vec![0u8; cs as usize];
            file.read_at(&mut data, host)?;
            if data.iter().any(|&x| x != 0) {
                map.put_chunk(i as u64, Chunk::Bits(data.into_boxed_slice()));
            }
        }
        out.stored_flag_at.push(Some(at + 12));
        out.stored_clusters.extend(clusters);
        out.entries.push(Entry::Loaded(Loaded {
            name: b.name,
            enabled: b.flags & FLAG_AUTO != 0,
            map,
        }));
    }
    out.stored_count = out.entries.len();
    Ok(out)
}

fn inconsistent(name: &str) -> Error {
    Error::invalid(
        "bitmap",
        format!(
            "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
        ),
    )
}

fn not_found(name: &str) -> Error {
    Error::new(
        vdisk_block::ErrorKind::NotFound,
        "bitmap",
        format!("Dirty bitmap '{name}' not found"),
    )
}

/// The node name qemu would print for the image (its nodes are anonymous in qemu-img).
const NODE: &str = "#block0";

impl Qcow2Image {
    /// Loads the bitmaps if that has not happened yet.
    fn bitmaps_ready(&self) -> Result<parking_lot::MutexGuard<'_, Bitmaps>> {
        let mut bm = self.bitmaps.lock();
        if !bm.loaded {
            let h = self.current_header();
            *bm = load(self.file(), &h, self.size()).map_err(|e| e.with_path(self.path()))?;
        }
        Ok(bm)
    }

    /// At a writable open: loads the bitmaps and marks the loaded ones `in_use` on disk.
    pub(crate) fn open_bitmaps_rw(&self) -> Result<()> {
        let mut bm = self.bitmaps_ready()?;
        self.mark_in_use(&mut bm)
    }

    /// Rewrites the stored directory in place with `in_use` set on every loaded bitmap,
    /// as qemu does: autoclear bit off (flushed), directory, autoclear bit on (flushed).
    fn mark_in_use(&self, bm: &mut Bitmaps) -> Result<()> {
        if bm.marked_in_use || !self.writable {
            return Ok(());
        }
        let Some((dir_offset, dir_size)) = bm.stored_dir else {
            bm.marked_in_use = true;
            return Ok(());
        };
        if !bm.stored_flag_at.iter().any(Option::is_some) {
            bm.marked_in_use = true;
            return Ok(());
        }
        let file = self.file();
        let mut dir = vec![0u8; dir_size as usize];
        file.read_at(&mut dir, dir_offset)?;
        for at in bm.stored_flag_at.iter().flatten() {
            let flags = dir
                .get_mut(*at..*at + 4)
                .ok_or_else(|| bad("bitmap directory changed under the image".into()))?;
            flags[3] |= FLAG_IN_USE as u8;
        }
        let autoclear_now = self.meta.lock().autoclear;
        file.write_at(
            &(autoclear_now & !autoclear::BITMAPS).to_be_bytes(),
            HEADER_AUTOCLEAR,
        )?;
        file.flush()?;
        file.write_at(&dir, dir_offset)?;
        file.flush()?;
        file.write_at(&autoclear_now.to_be_bytes(), HEADER_AUTOCLEAR)?;
        file.flush()?;
        bm.marked_in_use = true;
        bm.needs_store = true;
        Ok(())
    }

    /// Records a guest write (or zero or discard) of `[offset, offset + len)` in every
    /// enabled bitmap; the bitmaps are marked in use on disk before the first one.
    pub(crate) fn note_guest_write(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut bm = self.bitmaps.lock();
        if !bm.loaded || bm.entries.is_empty() {
            return Ok(());
        }
        self.mark_in_use(&mut bm)?;
        let bm = &mut *bm;
        for e in &mut bm.entries {
            if let Entry::Loaded(l) = e {
                if l.enabled {
                    l.map.mark(offset, len);
                    bm.needs_store = true;
                }
            }
        }
        Ok(())
    }

    /// Refuses a resize while an inconsistent bitmap exists (its table would no longer
    /// match the size), as qemu does.
    pub(crate) fn resize_bitmaps_check(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let bm = self.bitmaps.lock();
        if let Some(k) = bm.entries.iter().find(|e| matches!(e, Entry::Kept(_))) {
            return Err(inconsistent(k.name()));
        }
        Ok(())
    }

    /// Follows a resize: bitmaps cover the new size (bits past a smaller one are dropped).
    pub(crate) fn resize_bitmaps(&self, size: u64) -> Result<()> {
        let mut guard = self.bitmaps.lock();
        let bm = &mut *guard;
        for e in &mut bm.entries {
            if let Entry::Loaded(l) = e {
                l.map.resize(size);
                bm.needs_store = true;
            }
        }
        Ok(())
    }

    fn bitmap_change<T>(&self, name: &str, f: impl FnOnce(&mut Loaded) -> Result<T>) -> Result<T> {
        let mut bm = self.bitmaps_ready()?;
        let entry = bm
            .entries
            .iter_mut()
            .find(|e| e.name() == name)
            .ok_or_else(|| not_found(name))?;
        let Entry::Loaded(l) = entry else {
            return Err(inconsistent(name));
        };
        if !self.writable {
            return Err(self.read_only_error("change bitmap"));
        }
        let out = f(l)?;
        self.mark_in_use(&mut bm)?;
        bm.needs_store = true;
        Ok(out)
    }

    /// The image's default bitmap granularity: its cluster size within 4 KiB..64 KiB.
    pub fn default_bitmap_granularity(&self) -> u64 {
        self.header.cluster_size().clamp(4096, 65536)
    }

    /// Adds an empty bitmap, refused with qemu's words.
    pub fn add_bitmap(&self, name: &str, granularity: Option<u64>, disabled: bool) -> Result<()> {
        let op = "add bitmap";
        if name.is_empty() {
            return Err(Error::invalid(op, "Bitmap name cannot be empty"));
        }
        let gran = granularity.unwrap_or_else(|| self.default_bitmap_granularity());
        if gran < 512 || !gran.is_power_of_two() {
            return Err(Error::invalid(
                op,
                "Granularity must be power of 2 and at least 512",
            ));
        }
        let persist = |why: &str| {
            Err(Error::unsupported(
                op,
                format!("Can't make bitmap '{name}' persistent in '{NODE}': {why}"),
            ))
        };
        if self.header.version < 3 {
            return persist("Cannot store dirty bitmaps in qcow2 v2 files");
        }
        if gran > MAX_GRANULARITY {
            return persist("Granularity exceeds maximum (2147483648 bytes)");
        }
        let size = self.size();
        let bits = u64::from(gran.trailing_zeros());
        let cs = self.header.cluster_size();
        if u128::from(size) > u128::from(MAX_PHYS_BYTES) << bits
            || u128::from(size) > (u128::from(MAX_TABLE_ENTRIES) * u128::from(cs)) << bits
        {
            return persist(
                "Too much space will be occupied by the bitmap. Use larger granularity",
            );
        }
        if name.len() > MAX_NAME {
            return persist("Name length exceeds maximum (1023 characters)");
        }
        if !self.writable {
            return Err(self.read_only_error(op));
        }
        let mut bm = self.bitmaps_ready()?;
        if bm.entries.len() >= MAX_BITMAPS as usize {
            return persist("Maximum number of persistent bitmaps is already reached");
        }
        let dir: u64 = bm.entries.iter().map(Entry::dir_len).sum();
        if dir + dir_entry_len(name.len()) > MAX_BITMAP_DIRECTORY {
            return persist("Not enough space in the bitmap directory");
        }
        if bm.entries.iter().any(|e| e.name() == name) {
            return Err(Error::invalid(op, format!("Bitmap already exists: {name}")));
        }
        let at = bm.stored_count.min(bm.entries.len());
        bm.entries.insert(
            at,
            Entry::Loaded(Loaded {
                name: name.to_string(),
                enabled: !disabled,
                map: DirtyMap::new(gran, size, cs),
            }),
        );
        bm.needs_store = true;
        Ok(())
    }

    /// Removes a bitmap (an inconsistent one too); its clusters are freed at the next store.
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        if !self.writable {
            return Err(self.read_only_error("remove bitmap"));
        }
        let mut bm = self.bitmaps_ready()?;
        // The directory is about to change: the stored bitmaps must say in_use first.
        self.mark_in_use(&mut bm)?;
        let i = bm
            .entries
            .iter()
            .position(|e| e.name() == name)
            .ok_or_else(|| not_found(name))?;
        if let Entry::Kept(k) = &bm.entries[i] {
            // Its table and data clusters are freed with the old directory.
            if k.raw.len() >= 12 {
                let offset = be64(&k.raw);
                let size = u32::from_be_bytes([k.raw[8], k.raw[9], k.raw[10], k.raw[11]]);
                let cs = self.header.cluster_size();
                if let Ok(table) = read_table(self.file(), offset, size) {
                    let clusters = table_clusters(cs, offset, size, &table);
                    bm.stored_clusters.extend(clusters);
                }
            }
        }
        bm.entries.remove(i);
        if i < bm.stored_count {
            bm.stored_count -= 1;
        }
        bm.stored_flag_at = Vec::new();
        bm.needs_store = true;
        Ok(())
    }

    /// Clears every bit of a bitmap.
    pub fn clear_bitmap(&self, name: &str) -> Result<()> {
        self.bitmap_change(name, |l| {
            l.map.clear();
            Ok(())
        })
    }

    /// Enables (recording) or disables a bitmap.
    pub fn enable_bitmap(&self, name: &str, enabled: bool) -> Result<()> {
        self.bitmap_change(name, |l| {
            l.enabled = enabled;
            Ok(())
        })
    }

    /// Marks guest bytes dirty or clean in a bitmap.
    pub fn set_bitmap_range(&self, name: &str, offset: u64, len: u64, dirty: bool) -> Result<()> {
        self.bitmap_change(name, |l| {
            if dirty {
                l.map.mark(offset, len);
            } else {
                l.map.unmark(offset, len);
            }
            Ok(())
        })
    }

    /// Every bitmap, in directory order.
    pub fn bitmap_list(&self) -> Result<Vec<DirtyBitmapInfo>> {
        Ok(self
            .bitmaps_ready()?
            .entries
            .iter()
            .map(Entry::info)
            .collect())
    }

    /// The dirty ranges of a bitmap.
    pub fn bitmap_ranges(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let bm = self.bitmaps_ready()?;
        match bm.entries.iter().find(|e| e.name() == name) {
            None => Err(not_found(name)),
            Some(Entry::Kept(_)) => Err(inconsistent(name)),
            Some(Entry::Loaded(l)) => Ok(l.map.ranges()),
        }
    }

    /// ORs `ranges` (dirty guest ranges of a bitmap over `src_size` bytes) into bitmap
    /// `dst`.
    pub fn merge_bitmap_ranges(
        &self,
        dst: &str,
        src_size: u64,
        ranges: &[(u64, u64)],
    ) -> Result<()> {
        self.bitmap_change(dst, |l| {
            if src_size != l.map.size() {
                return Err(Error::invalid(
                    "merge bitmap",
                    format!(
                        "Bitmaps are of different sizes (destination size is {}, source size is {src_size}) and can't be merged",
                        l.map.size()
                    ),
                ));
            }
            for &(offset, len) in ranges {
                l.map.mark(offset, len);
            }
            Ok(())
        })
    }

    /// Checks that bitmap `name` exists and may be changed (the target of a merge).
    pub fn check_bitmap_usable(&self, name: &str) -> Result<()> {
        self.bitmap_change(name, |_| Ok(()))
    }
}
