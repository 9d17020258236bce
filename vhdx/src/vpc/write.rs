//! The write path of fixed and dynamic VHDs.
//!
//! A fixed image is written in place. A dynamic image allocates a block where the footer
//! is: the block's sector bitmap (all ones, so every sector counts as present and the
//! zero-filled rest reads as zeroes, as qemu writes it), the zeroed block and a new footer
//! are written and flushed before the BAT entry that points at the block (VHD has no log:
//! a crash before the BAT update only leaks the block, and the footer copy at offset 0
//! keeps the image readable even while the end footer is being moved).

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

    /// The host offset of `block`'s data, allocating the block when needed.
    fn block_for_write(&self, d: &Dynamic, block: u64) -> Result<u64> {
        let bitmap = d.header.bitmap_size();
        let entry = Self::entry(d, block);
        if entry != UNALLOCATED {
            return Ok(entry as u64 * 512 + bitmap);
        }
        let _guard = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        let entry = Self::entry(d, block);
        if entry != UNALLOCATED {
            return Ok(entry as u64 * 512 + bitmap);
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
