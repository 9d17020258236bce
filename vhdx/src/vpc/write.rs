//! The write path of fixed and dynamic VHDs.
//!
//! A fixed image is written in place. A dynamic image allocates a block where the footer
//! is: the block's sector bitmap (all ones, so every sector counts as present and the
//! zero-filled rest reads as zeroes, as qemu writes it), the zeroed block and a new footer
//! are written and flushed before the BAT entry that points at the block (VHD has no log:
//! a crash before the BAT update only leaks the block, and the footer copy at offset 0
//! keeps the image readable even while the end footer is being moved).
//!
//! A differencing image copies the parent's bytes into a block before its first write
//! changes it (all of a new block; the missing sectors of a block Windows left partial),
//! then sets its bitmap to all ones, so the bitmap is only ever written whole and once.

use vdisk_block::{check_range, Result};

use crate::vpc::footer::FOOTER_SIZE;
use crate::vpc::image::{Dynamic, VpcImage, UNALLOCATED};

impl VpcImage {
    fn check_writable(&self, op: &'static str) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(self.read_only(op))
        }
    }

    fn entry(d: &Dynamic, block: u64) -> u32 {
        let bat = d.bat.read().unwrap_or_else(|e| e.into_inner());
        usize::try_from(block)
            .ok()
            .and_then(|b| bat.get(b).copied())
            .unwrap_or(UNALLOCATED)
    }

    /// The host offset of `block`'s data, allocating the block when needed. In a
    /// differencing image the block is first made complete: every sector the parent
    /// supplied is copied in and the bitmap set to all ones, so later writes of any size
    /// need no bitmap updates.
    fn block_for_write(&self, d: &Dynamic, block: u64) -> Result<u64> {
        let bitmap = d.header.bitmap_size();
        let entry = Self::entry(d, block);
        if entry != UNALLOCATED && !d.differencing {
            return Ok(entry as u64 * 512 + bitmap);
        }
        let mut complete = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        let entry = Self::entry(d, block);
        if entry != UNALLOCATED {
            let base = entry as u64 * 512;
            if d.differencing && !complete.contains(&block) {
                self.complete_from_parent(d, block, base)?;
                complete.insert(block);
            }
            return Ok(base + bitmap);
        }
        let bs = d.header.block_size as u64;
        let base = self
            .file
            .len()?
            .saturating_sub(FOOTER_SIZE as u64)
            .next_multiple_of(512);
        let sector = u32::try_from(base / 512).map_err(|_| {
            vdisk_block::Error::unsupported("write", "the VHD file would exceed 2 TiB of sectors")
                .with_path(&self.path)
        })?;
        let mut footer = vec![0u8; FOOTER_SIZE];
        self.file.read_at(&mut footer, 0)?;
        self.file.write_at(&vec![0xffu8; bitmap as usize], base)?;
        self.file.set_len(base + bitmap + bs)?;
        if d.differencing {
            self.copy_parent(block, base + bitmap, None)?;
            complete.insert(block);
        }
        self.file.write_at(&footer, base + bitmap + bs)?;
        self.file.flush()?;
        self.file
            .write_at(&sector.to_be_bytes(), d.header.table_offset + block * 4)?;
        self.file.flush()?;
        let mut bat = d.bat.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = bat.get_mut(block as usize) {
            *slot = sector;
        }
        Ok(base + bitmap)
    }

    /// Copies the parent's bytes of `block` to `data` (the block's data area), only for the
    /// sectors whose bit in `bitmap` is clear when a bitmap is given.
    fn copy_parent(&self, block: u64, data: u64, bitmap: Option<&[u8]>) -> Result<()> {
        let Some(dynamic) = &self.dynamic else {
            return Ok(());
        };
        let bs = dynamic.header.block_size as u64;
        let start = block * bs;
        let len = bs.min(self.size.saturating_sub(start));
        let sectors = len.div_ceil(512);
        let needed = |s: u64| bitmap.is_none_or(|b| b[(s / 8) as usize] & (0x80 >> (s % 8)) == 0);
        let mut buf = Vec::new();
        let mut s = 0;
        while s < sectors {
            if !needed(s) {
                s += 1;
                continue;
            }
            // A run of sectors to copy, at most 1 MiB at a time.
            let first = s;
            while s < sectors && needed(s) && s - first < 2048 {
                s += 1;
            }
            let at = first * 512;
            let n = (s * 512).min(len) - at;
            buf.resize(n as usize, 0);
            match &self.parent {
                Some(p) => {
                    let inside = p.size().saturating_sub(start + at).min(n) as usize;
                    p.read_at(&mut buf[..inside], start + at)?;
                    buf[inside..].fill(0);
                }
                None => buf.fill(0),
            }
            self.file.write_at(&buf, data + at)?;
        }
        Ok(())
    }

    /// Fills the sectors of an allocated differencing block that still fall through to the
    /// parent, then marks every sector present (data flushed before the bitmap).
    fn complete_from_parent(&self, d: &Dynamic, block: u64, base: u64) -> Result<()> {
        let bitmap_len = d.header.bitmap_size();
        let mut bitmap = vec![0u8; bitmap_len as usize];
        self.file.read_at(&mut bitmap, base)?;
        if bitmap.iter().all(|&b| b == 0xff) {
            return Ok(());
        }
        self.copy_parent(block, base + bitmap_len, Some(&bitmap))?;
        self.file.flush()?;
        self.file
            .write_at(&vec![0xffu8; bitmap_len as usize], base)?;
        self.file.flush()
    }

    pub(crate) fn write_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable("write")?;
        check_range("write", self.size, offset, buf.len() as u64)?;
        let Some(d) = &self.dynamic else {
            return self.file.write_at(buf, offset);
        };
        let bs = d.header.block_size as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_block = pos % bs;
            let n = ((bs - in_block) as usize).min(buf.len() - done);
            let host = self.block_for_write(d, pos / bs)?;
            self.file.write_at(&buf[done..done + n], host + in_block)?;
            done += n;
        }
        Ok(())
    }

    /// Write-zeroes (`zero`) and discard: unallocated blocks already read as zeroes and
    /// allocated ones are zeroed in place; discard is advisory and keeps the data.
    pub(crate) fn zero_impl(&self, offset: u64, len: u64, zero: bool) -> Result<()> {
        let op = if zero { "write zeroes" } else { "discard" };
        self.check_writable(op)?;
        check_range(op, self.size, offset, len)?;
        if !zero || len == 0 {
            return Ok(());
        }
        let Some(d) = &self.dynamic else {
            return self.file.write_zero_bytes(offset, len);
        };
        let bs = d.header.block_size as u64;
        let mut pos = offset;
        while pos < offset + len {
            let in_block = pos % bs;
            let n = (bs - in_block).min(offset + len - pos);
            if d.differencing {
                // Zeroes must hide the parent: the block is allocated and completed first.
                let host = self.block_for_write(d, pos / bs)?;
                self.file.write_zero_bytes(host + in_block, n)?;
                pos += n;
                continue;
            }
            let entry = Self::entry(d, pos / bs);
            if entry != UNALLOCATED {
                let host = entry as u64 * 512 + d.header.bitmap_size();
                self.file.write_zero_bytes(host + in_block, n)?;
            }
            pos += n;
        }
        Ok(())
    }
}
