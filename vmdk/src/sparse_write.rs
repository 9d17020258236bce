//! Writing a hosted sparse extent (monolithicSparse and the `-sNNN` pieces of a split disk).
//!
//! The caller (the image) holds its write lock around every call, so allocation needs no
//! lock of its own beyond what keeps the type `Sync`. Order of a grain allocation, so a crash
//! never leaves a table entry pointing at garbage:
//! 1. the grain gets space at the end of the file and its whole contents are written there
//!    (the parent's or zeroes around the caller's bytes);
//! 2. only then is its grain table entry written, in the table and its redundant copy.
//!
//! A grain table the directory does not have yet is written (zeroed) before the directory
//! entry that points at it. Grains are never freed: an overwritten zeroed grain keeps its old
//! space, as in qemu and VMware (reclaiming it is a shrink job).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vdisk_block::{Error, Result, ZeroMode};

use crate::header::SECTOR;
use crate::sparse::{Grain, Layout, SparseExtent};

/// The grain table entry of a zeroed grain.
const GTE_ZEROED: u32 = 1;

impl SparseExtent {
    fn check_writable(&self) -> Result<()> {
        if self.layout() != Layout::Hosted || self.header().compressed() {
            return Err(Error::unsupported(
                "write",
                "this sparse extent cannot be written in place (streamOptimized and ESXi delta extents are read-only here)",
            )
            .with_path(self.file().path()));
        }
        Ok(())
    }

    /// Reserves `bytes` (rounded up to sectors) at the end of the file.
    fn allocate(&self, bytes: u64) -> Result<u64> {
        let mut end = self.end.lock();
        let at = *end;
        let new_end = bytes
            .div_ceil(SECTOR)
            .checked_mul(SECTOR)
            .and_then(|b| at.checked_add(b))
            .filter(|&e| e / SECTOR <= u64::from(u32::MAX))
            .ok_or_else(|| {
                Error::new(
                    vdisk_block::ErrorKind::Io,
                    "write",
                    "the sparse extent is full: its grain offsets are 32-bit sector numbers",
                )
                .with_path(self.file().path())
            })?;
        *end = new_end;
        self.file_len.fetch_max(new_end, Ordering::AcqRel);
        Ok(at)
    }

    /// The byte offset of the grain table for directory entry `gd_index`, writing a new one
    /// (and its redundant copy) when the directory has none yet.
    fn ensure_table(&self, gd_index: usize) -> Result<(u64, Option<u64>)> {
        let table_bytes = u64::from(self.header().gtes_per_gt) * 4;
        let entry = self.gd.read().get(gd_index).copied().ok_or_else(|| {
            Error::invalid(
                "write",
                "the grain lies beyond the extent's grain directory",
            )
        })?;
        let primary = if entry == 0 {
            let at = self.allocate(table_bytes)?;
            self.file().write_zero_bytes(at, table_bytes)?;
            self.write_dir_entry(self.gd_offset, gd_index, at)?;
            self.gd.write()[gd_index] = at / SECTOR;
            at
        } else {
            entry * SECTOR
        };
        let redundant = match &self.rgd {
            None => None,
            Some((rgd_offset, rgd)) => {
                let entry = rgd.read().get(gd_index).copied().unwrap_or(0);
                if entry == 0 {
                    let at = self.allocate(table_bytes)?;
                    self.file().write_zero_bytes(at, table_bytes)?;
                    self.write_dir_entry(*rgd_offset, gd_index, at)?;
                    rgd.write()[gd_index] = at / SECTOR;
                    Some(at)
                } else {
                    Some(entry * SECTOR)
                }
            }
        };
        Ok((primary, redundant))
    }

    fn write_dir_entry(&self, dir_offset: u64, index: usize, table_at: u64) -> Result<()> {
        let sector = u32::try_from(table_at / SECTOR).map_err(|_| {
            Error::invalid(
                "write",
                "grain table offset does not fit a 32-bit sector number",
            )
        })?;
        self.file()
            .write_at(&sector.to_le_bytes(), dir_offset + index as u64 * 4)
    }

    /// Points grain `grain` at `value` (a sector number, or [`GTE_ZEROED`]).
    fn set_entry(&self, grain: u64, value: u32) -> Result<()> {
        let per_gt = u64::from(self.header().gtes_per_gt);
        let gd_index = usize::try_from(grain / per_gt)
            .map_err(|_| Error::invalid("write", "grain number out of range"))?;
        let slot = (grain % per_gt) as usize;
        let (primary, redundant) = self.ensure_table(gd_index)?;
        self.file()
            .write_at(&value.to_le_bytes(), primary + slot as u64 * 4)?;
        if let Some(at) = redundant {
            self.file()
                .write_at(&value.to_le_bytes(), at + slot as u64 * 4)?;
        }
        let mut cache = self.gt_cache.lock();
        if let Some(table) = cache.get(&primary) {
            let mut updated = table.as_ref().clone();
            updated[slot] = u64::from(value);
            cache.insert(primary, Arc::new(updated));
        }
        Ok(())
    }

    /// Writes `buf` at extent offset `offset`; `unallocated(buf, offset)` supplies the bytes
    /// of a newly allocated grain that the write does not cover (the parent's, or zeroes).
    pub fn write(
        &self,
        buf: &[u8],
        offset: u64,
        unallocated: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        self.check_writable()?;
        let grain_bytes = self.grain_bytes();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let grain = at / grain_bytes;
            let within = at % grain_bytes;
            let n = (buf.len() - done).min((grain_bytes - within) as usize);
            let piece = &buf[done..done + n];
            match self.grain(grain)? {
                Grain::Data(host) => self.file().write_at(piece, host + within)?,
                state => {
                    let mut full = vec![0u8; grain_bytes as usize];
                    if state == Grain::Unallocated && n as u64 != grain_bytes {
                        unallocated(&mut full, grain * grain_bytes)?;
                    }
                    full[within as usize..within as usize + n].copy_from_slice(piece);
                    let host = self.allocate(grain_bytes)?;
                    self.file().write_at(&full, host)?;
                    let sector = u32::try_from(host / SECTOR).map_err(|_| {
                        Error::invalid("write", "grain offset does not fit a 32-bit sector")
                    })?;
                    self.set_entry(grain, sector)?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Makes `len` bytes at extent offset `offset` read as zeroes. Whole grains become zeroed
    /// grains when the extent has the feature (or stay unallocated when nothing lies beneath
    /// and `mode` allows it); the rest is written as zero bytes.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _mode: ZeroMode,
        has_backing: bool,
        unallocated: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        self.check_writable()?;
        let grain_bytes = self.grain_bytes();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let grain = at / grain_bytes;
            let within = at % grain_bytes;
            let n = (end - at).min(grain_bytes - within);
            let whole = n == grain_bytes;
            let state = self.grain(grain)?;
            let done = match state {
                Grain::Zero => true,
                Grain::Unallocated if !has_backing => true,
                // Either mode may use a zeroed grain: it is this layer's allocation.
                _ if whole && self.header().zeroed_grain() => {
                    self.set_entry(grain, GTE_ZEROED)?;
                    true
                }
                _ => false,
            };
            if !done {
                let zeroes = vec![0u8; n as usize];
                self.write(&zeroes, at, unallocated)?;
            }
            at += n;
        }
        Ok(())
    }
}
