//! The write path of VHDX: data first, then metadata through the log.
//!
//! Invariants, in the order a write keeps them:
//! 1. **Session GUIDs.** Before the first change of a session the header gets a new
//!    FileWriteGuid and DataWriteGuid (MS-VHDX 2.2.2.1), so a child made against the old
//!    contents no longer links to this image.
//! 2. **Data before metadata.** A block is allocated past the end of the file, its bytes
//!    (the guest's, plus zeroes or the parent's for the rest of the block) are written and
//!    flushed before any BAT entry points at it. A crash before the BAT update leaks the
//!    space and loses nothing that was acknowledged.
//! 3. **Metadata through the log.** BAT changes are staged in memory (readers see them at
//!    once) and made durable at the next flush (or resize/repair): the data is flushed, the
//!    changed 4 KiB BAT sectors are written as one log entry, flushed, then written in place
//!    and flushed again, before the next entry may overwrite the log. Only flushed writes
//!    are promised to survive a crash, so staging loses nothing that was promised, and a
//!    whole convert costs one commit instead of three flushes per block. Each entry is alone in its sequence (tail = itself) at
//!    the start of the log, so after a crash the newest entry is the active sequence and a
//!    torn entry fails its checksum and is ignored. The header's LogGuid is set before the
//!    first entry and cleared on flush once everything is applied, so a cleanly flushed
//!    image has nothing to replay and qemu opens it read-only.
//! 4. **Blocks are only ever whole.** A write into a block that is not FULLY_PRESENT
//!    materialises the whole block (zeroes, or the parent's bytes in a differencing image)
//!    and makes it FULLY_PRESENT; PARTIALLY_PRESENT blocks written by Hyper-V are completed
//!    in place from the parent the same way. No sector bitmap is ever written.
//!
//! Zeroing whole blocks switches them to the ZERO state (hiding the parent of a differencing
//! image); a fixed image (LeaveBlockAllocated) keeps its blocks and zeroes them in place.

use std::sync::atomic::Ordering;

#[cfg(test)]
use vdisk_block::ErrorKind;
use vdisk_block::{check_range, Error, Preallocation, Result, ZeroMode};

use crate::guid::Guid;
use crate::vhdx::bat::{self, PayloadState};
use crate::vhdx::create::random_guid;
use crate::vhdx::header::{Header, HEADER_OFFSETS};
use crate::vhdx::image::{Source, VhdxImage, WriterState};
use crate::vhdx::log::{encode_entry, LogWrite};
use crate::vhdx::metadata::MAX_VIRTUAL_SIZE;

const SECTOR: u64 = 4096;
/// Piece size for copying parent data and zeroes.
const COPY_CHUNK: u64 = 1 << 20;

/// Test hook: how many more file writes and flushes may succeed (`-1`: no limit).
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct FaultBudget(
    pub(crate) std::sync::atomic::AtomicI64,
    /// The write the power cut interrupts lands half (whole 512-byte sectors): a torn write.
    pub(crate) std::sync::atomic::AtomicBool,
);

#[cfg(test)]
impl Default for FaultBudget {
    fn default() -> Self {
        FaultBudget(
            std::sync::atomic::AtomicI64::new(-1),
            std::sync::atomic::AtomicBool::new(false),
        )
    }
}

impl VhdxImage {
    /// Fails when the simulated power cut has happened (tests only).
    fn io_allowed(&self) -> Result<()> {
        #[cfg(test)]
        {
            let left = self.fault.0.load(Ordering::SeqCst);
            if left == 0 {
                return Err(Error::new(ErrorKind::Io, "write", "simulated power cut"));
            }
            if left > 0 {
                self.fault.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    fn fwrite(&self, buf: &[u8], offset: u64) -> Result<()> {
        #[cfg(test)]
        if self.fault.0.load(Ordering::SeqCst) == 0 && self.fault.1.swap(false, Ordering::SeqCst) {
            let half = (buf.len() / 2) / 512 * 512;
            let _ = self.file().write_at(&buf[..half], offset);
        }
        self.io_allowed()?;
        self.file().write_at(buf, offset)
    }

    fn fzero(&self, offset: u64, len: u64) -> Result<()> {
        self.io_allowed()?;
        self.file().write_zero_bytes(offset, len)
    }

    fn fflush(&self) -> Result<()> {
        self.io_allowed()?;
        self.file().flush()
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(self.read_only(op))
        }
    }

    /// A writable open replays a pending log into the file and clears the LogGuid, so the
    /// file on disk is consistent before anything else writes to it.
    pub(crate) fn finish_replay(&mut self) -> Result<()> {
        if self.view.is_clean() {
            return Ok(());
        }
        self.view.apply_to_file()?;
        let mut w = self.writer();
        self.update_header(&mut w, |h| h.log_guid = Guid::ZERO)
    }

    /// Writes `change` applied to the current header into the non-current slot with the
    /// next sequence number, and flushes: a torn write leaves the old header current.
    fn update_header(&self, w: &mut WriterState, change: impl FnOnce(&mut Header)) -> Result<()> {
        let mut h = w.header.clone();
        change(&mut h);
        h.sequence = h.sequence.wrapping_add(1);
        let slot = 1 - w.slot;
        self.fwrite(&h.encode(), HEADER_OFFSETS[slot])?;
        self.fflush()?;
        w.header = h;
        w.slot = slot;
        Ok(())
    }

    /// Changes the write GUIDs once per session, before the first change.
    fn start_session(&self) -> Result<()> {
        if self.session_started.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut w = self.writer();
        if !self.session_started.load(Ordering::Acquire) {
            let (fw, dw) = (random_guid()?, random_guid()?);
            self.update_header(&mut w, |h| {
                h.file_write_guid = fw;
                h.data_write_guid = dw;
            })?;
            self.session_started.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Applies BAT `changes` (index, new entry) in memory and marks their sectors for the
    /// next commit. Readers see the change at once; it becomes durable at the next flush.
    fn stage(&self, w: &mut WriterState, changes: &[(u64, u64)]) {
        let mut bat = self.bat.write().unwrap_or_else(|e| e.into_inner());
        for &(index, entry) in changes {
            if let Some(slot) = bat.get_mut(index as usize) {
                *slot = entry;
                w.dirty.insert(index * 8 / SECTOR);
            }
        }
    }

    /// Stages BAT `changes` and commits at once (repairs, which must be durable).
    fn commit_bat(&self, w: &mut WriterState, changes: &[(u64, u64)]) -> Result<()> {
        self.stage(w, changes);
        self.commit(w, Vec::new())
    }

    /// Makes every staged BAT sector, plus whole 4 KiB `sectors` of other metadata (file
    /// offset, contents), durable through the log; see the module docs.
    fn commit(&self, w: &mut WriterState, sectors: Vec<(u64, Vec<u8>)>) -> Result<()> {
        if w.dirty.is_empty() && sectors.is_empty() {
            return Ok(());
        }
        // Every block a staged entry points at holds its data before the entry is logged.
        self.fflush()?;
        if w.header.log_guid.is_zero() {
            let guid = random_guid()?;
            self.update_header(w, |h| h.log_guid = guid)?;
            w.log_seq = 0;
        }
        let bat_offset = self.regions.bat.offset;
        let mut writes: Vec<LogWrite> = Vec::with_capacity(w.dirty.len() + sectors.len());
        {
            let bat = self.bat.read().unwrap_or_else(|e| e.into_inner());
            for &sector in &w.dirty {
                let mut buf = vec![0u8; SECTOR as usize];
                let first = (sector * SECTOR / 8) as usize;
                for (i, e) in bat.iter().skip(first).take(SECTOR as usize / 8).enumerate() {
                    buf[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
                }
                writes.push(LogWrite::Data {
                    offset: bat_offset + sector * SECTOR,
                    data: buf,
                });
            }
        }
        writes.extend(
            sectors
                .into_iter()
                .map(|(offset, data)| LogWrite::Data { offset, data }),
        );
        let file_len = self.file().len()?;
        // Each entry must fit in the log; a huge change commits in several entries.
        // n data sectors need n + ceil((64 + 32 n) / 4096) sectors of log.
        let log_sectors = w.header.log_length as u64 / SECTOR;
        let per_entry = log_sectors.saturating_sub(2 + log_sectors / 128).max(1) as usize;
        for group in writes.chunks(per_entry) {
            w.log_seq += 1;
            let entry = encode_entry(w.header.log_guid, w.log_seq, 0, file_len, file_len, group);
            self.fwrite(&entry, w.header.log_offset)?;
            self.fflush()?;
            for write in group {
                if let LogWrite::Data { offset, data } = write {
                    self.fwrite(data, *offset)?;
                }
            }
            self.fflush()?;
        }
        w.dirty.clear();
        Ok(())
    }

    /// Commits what is staged, then clears the LogGuid: everything is applied, so a
    /// flushed image has nothing to replay (and qemu opens it read-only).
    pub(crate) fn flush_impl(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut w = self.writer();
        self.commit(&mut w, Vec::new())?;
        self.fflush()?;
        if !w.header.log_guid.is_zero() {
            self.update_header(&mut w, |h| h.log_guid = Guid::ZERO)?;
        }
        Ok(())
    }

    fn payload_state(&self, block: u64) -> Result<(u64, PayloadState, u64)> {
        let index = bat::payload_index(block, self.params.chunk_ratio());
        let entry = self.bat_entry(index)?;
        let state = PayloadState::from_bits(entry).ok_or_else(|| {
            self.io_error(
                block * self.params.block_size as u64,
                format!("BAT entry of block {block} has a reserved state"),
            )
        })?;
        Ok((index, state, bat::file_offset(entry)))
    }

    /// Makes `block` FULLY_PRESENT with its current contents; returns its host offset.
    /// Called with the writer lock held.
    fn materialise(&self, w: &mut WriterState, block: u64) -> Result<u64> {
        let (index, state, offset) = self.payload_state(block)?;
        if state == PayloadState::FullyPresent {
            return Ok(offset);
        }
        let bs = self.params.block_size as u64;
        let start = block * bs;
        let len = bs.min(self.size_bytes().saturating_sub(start));
        let host = if state == PayloadState::PartiallyPresent {
            offset
        } else {
            let host = w.file_end;
            w.file_end += bs;
            self.io_allowed()?;
            let file = self.file();
            if file.len()? < host + bs {
                file.set_len(host + bs)?;
            }
            host
        };
        // The rest of the block keeps what the guest saw: the parent where the block fell
        // through to it, zeroes elsewhere (a fresh block past the end of file is zeroes).
        let mut pos = 0;
        let mut buf = Vec::new();
        while pos < len {
            let (source, n) = self.map(start + pos, (len - pos).min(COPY_CHUNK))?;
            if source == Source::Parent && self.parent.is_some() {
                buf.resize(n as usize, 0);
                self.read_parent(&mut buf, start + pos)?;
                self.fwrite(&buf, host + pos)?;
            } else if state == PayloadState::PartiallyPresent
                && source != (Source::Data(host + pos))
            {
                self.fzero(host + pos, n)?;
            }
            pos += n;
        }
        self.stage(
            w,
            &[(
                index,
                bat::make_entry(PayloadState::FullyPresent.bits(), host),
            )],
        );
        Ok(host)
    }

    /// Host offset of `block` for writing, allocating it when needed.
    fn block_for_write(&self, block: u64) -> Result<u64> {
        let (_, state, offset) = self.payload_state(block)?;
        if state == PayloadState::FullyPresent {
            return Ok(offset);
        }
        let mut w = self.writer();
        self.materialise(&mut w, block)
    }

    pub(crate) fn write_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable("write")?;
        check_range("write", self.size_bytes(), offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.start_session()?;
        let bs = self.params.block_size as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / bs;
            let in_block = pos % bs;
            let n = ((bs - in_block) as usize).min(buf.len() - done);
            let host = self.block_for_write(block)?;
            self.fwrite(&buf[done..done + n], host + in_block)?;
            done += n;
        }
        Ok(())
    }

    /// Write-zeroes (`Some(mode)`) and discard (`None`).
    pub(crate) fn zero_impl(&self, offset: u64, len: u64, mode: Option<ZeroMode>) -> Result<()> {
        let op = if mode.is_some() {
            "write zeroes"
        } else {
            "discard"
        };
        self.check_writable(op)?;
        check_range(op, self.size_bytes(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.start_session()?;
        let bs = self.params.block_size as u64;
        let diff = self.params.has_parent;
        let keep = self.params.leave_block_allocated && !diff;
        let mut to_zero_state = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let block = pos / bs;
            let start = block * bs;
            let block_end = (start + bs).min(self.size_bytes());
            let n = block_end.min(end) - pos;
            let whole = pos == start && pos + n == block_end;
            let (index, state, host) = self.payload_state(block)?;
            let reads_zero = !state.has_offset()
                && (!diff || matches!(state, PayloadState::Zero | PayloadState::Unmapped));
            if reads_zero {
                // Nothing to do: the range already reads as zeroes.
            } else if whole
                && !keep
                && (mode != Some(ZeroMode::KeepAllocated) || state != PayloadState::FullyPresent)
            {
                // Whole blocks become ZERO, unless the caller wants an allocated block kept.
                to_zero_state.push((index, bat::make_entry(PayloadState::Zero.bits(), 0)));
            } else if mode.is_none() {
                // Discard of part of a block, or of a block that must stay allocated, is
                // advisory: keep the data.
            } else if state == PayloadState::FullyPresent {
                self.fzero(host + (pos - start), n)?;
            } else {
                let host = self.block_for_write(block)?;
                self.fzero(host + (pos - start), n)?;
            }
            pos += n;
        }
        if !to_zero_state.is_empty() {
            // The blocks' old file space is never handed out again, so their old data cannot
            // resurface through a later allocation.
            let mut w = self.writer();
            self.stage(&mut w, &to_zero_state);
        }
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
}

impl Drop for VhdxImage {
    fn drop(&mut self) {
        #[cfg(test)]
        if self.fault.0.load(Ordering::SeqCst) == 0 {
            return;
        }
        if self.writable {
            // Best effort: a failure leaves a LogGuid whose entry replays idempotently.
            let _ = self.flush_impl();
        }
    }
}

impl VhdxImage {
    /// Before growing from `old`: makes the block holding a non-block-aligned `old` read
    /// zeroes past it. A block that falls through to the parent there (NOT_PRESENT,
    /// UNDEFINED or, through its bitmap, PARTIALLY_PRESENT) would otherwise show the
    /// parent's bytes in the grown range; it is materialised (the parent's bytes up to `old`)
    /// and its tail zeroed. A FULLY_PRESENT block's tail may hold stale bytes from another
    /// writer and is zeroed in place.
    fn clear_tail_for_growth(&self, w: &mut WriterState, old: u64) -> Result<()> {
        let bs = self.params.block_size as u64;
        if old.is_multiple_of(bs) {
            return Ok(());
        }
        let block = old / bs;
        let (_, state, host) = self.payload_state(block)?;
        let host = match state {
            PayloadState::FullyPresent => host,
            PayloadState::PartiallyPresent | PayloadState::NotPresent | PayloadState::Undefined
                if self.params.has_parent =>
            {
                self.materialise(w, block)?
            }
            _ => return Ok(()),
        };
        let tail_at = host + old % bs;
        let tail = bs - old % bs;
        // Another writer may have packed a block into the unused tail of a last block
        // (only the part inside the disk is reserved); never zero someone else's data.
        let bat = self.bat.read().unwrap_or_else(|e| e.into_inner());
        let shared = bat.iter().any(|&e| {
            matches!(bat::state_bits(e), 6 | 7)
                && (tail_at..tail_at + tail).contains(&bat::file_offset(e))
        });
        drop(bat);
        if shared {
            return Err(Error::unsupported(
                "resize",
                format!(
                    "the last block ({block}) shares its file space with another block; convert the image instead"
                ),
            )
            .with_path(&self.path));
        }
        self.fzero(tail_at, tail)
    }
}

impl VhdxImage {
    /// Resets BAT entries `indexes` to NOT_PRESENT through the log (repair of bad entries).
    pub(crate) fn reset_entries(&self, indexes: &[u64]) -> Result<()> {
        self.check_writable("repair")?;
        self.start_session()?;
        let changes: Vec<(u64, u64)> = indexes.iter().map(|&i| (i, 0)).collect();
        let mut w = self.writer();
        self.commit_bat(&mut w, &changes)
    }
}

impl VhdxImage {
    /// Grows or shrinks the virtual disk: the size item and the BAT change in one log entry.
    /// Blocks past a new, smaller end are dropped and the tail of the last block is zeroed, so
    /// growing again reads zeroes there; whole blocks added to a differencing image are ZERO
    /// and the old last block is made to read zeroes past the old end, so its parent does
    /// not show through. The BAT region is not moved: a size needing
    /// more entries than it holds is refused.
    pub(crate) fn resize_impl(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        self.check_writable("resize")?;
        if !matches!(prealloc, Preallocation::Off | Preallocation::Metadata) {
            return Err(Error::unsupported(
                "resize",
                "VHDX images support only preallocation=off or metadata when resizing",
            ));
        }
        let sector = self.params.logical_sector_size as u64;
        if !new_size.is_multiple_of(sector) || new_size > MAX_VIRTUAL_SIZE {
            return Err(Error::invalid(
                "resize",
                format!(
                    "the new size {new_size} must be a multiple of the {sector}-byte sector and at most 64 TiB"
                ),
            ));
        }
        let mut target = self.params.clone();
        target.virtual_size = new_size;
        let entries = target.bat_entries();
        if entries * 8 > self.regions.bat.length as u64 {
            return Err(Error::unsupported(
                "resize",
                format!(
                    "a {new_size}-byte disk needs {entries} BAT entries, more than the BAT region holds; convert the image instead"
                ),
            )
            .with_path(&self.path));
        }
        self.start_session()?;
        let mut w = self.writer();
        let old = self.size_bytes();
        if new_size == old {
            return Ok(());
        }
        let bs = self.params.block_size as u64;
        let ratio = self.params.chunk_ratio();
        let mut changes = Vec::new();
        if new_size < old {
            // The block holding the new end keeps its head; its tail must read as zeroes if
            // the disk grows again.
            if !new_size.is_multiple_of(bs) {
                let block = new_size / bs;
                let (_, state, host) = self.payload_state(block)?;
                if state.has_offset() {
                    let tail = bs.min(old - block * bs) - new_size % bs;
                    self.fzero(host + new_size % bs, tail)?;
                }
            }
            let current = self.bat.read().unwrap_or_else(|e| e.into_inner()).len() as u64;
            for block in new_size.div_ceil(bs)..old.div_ceil(bs) {
                changes.push((bat::payload_index(block, ratio), 0));
            }
            changes.retain(|(i, _)| *i < current);
        } else {
            self.clear_tail_for_growth(&mut w, old)?;
        }
        if new_size > old && self.params.has_parent {
            for block in old.div_ceil(bs)..new_size.div_ceil(bs) {
                let entry = bat::make_entry(PayloadState::Zero.bits(), 0);
                changes.push((bat::payload_index(block, ratio), entry));
            }
        }
        let mut size_sector = vec![0u8; SECTOR as usize];
        let sector_at = self.size_item / SECTOR * SECTOR;
        self.file().read_at(&mut size_sector, sector_at)?;
        let at = (self.size_item - sector_at) as usize;
        size_sector[at..at + 8].copy_from_slice(&new_size.to_le_bytes());
        {
            let mut bat = self.bat.write().unwrap_or_else(|e| e.into_inner());
            if bat.len() < entries as usize {
                bat.resize(entries as usize, 0);
            }
        }
        self.stage(&mut w, &changes);
        self.commit(&mut w, vec![(sector_at, size_sector)])?;
        self.bat
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .truncate(entries.max(1) as usize);
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}
