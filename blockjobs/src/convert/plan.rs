//! Walking the allocation map of the (concatenated) sources and cutting it into chunks.
//!
//! The map is read lazily, one `block_status` call per extent (never per chunk), under the
//! planner's lock, so workers see it streamed just ahead of where they copy. Data extents are
//! cut into chunks of the chunk size counted from the extent's start, as qemu-img cuts them
//! (zero detection looks at one chunk at a time, so the cuts decide where large `-S` values
//! find holes); zero extents are handed out whole, up to [`MAX_ZERO_CHUNK`], since they cost
//! no buffer.
//!
//! Each source counts as its size rounded up to whole 512-byte sectors, the bytes past its
//! end reading as zeroes: qemu-img sees a raw file of 1000 bytes as a 1024-byte disk, so
//! concatenating unaligned files (and the target's size) must come out the same.

use std::sync::Arc;

use vdisk_block::{BlockDev, Error, Result};

/// The largest zero range handed out at once; it bounds how coarse progress can get.
pub const MAX_ZERO_CHUNK: u64 = 1 << 30;

/// The largest chunk of data the source stores compressed (a streamOptimized VMDK, a
/// compressed qcow2). qemu-img reads such data one cluster at a time; whole chunks of the
/// default size held by every worker would cost far more memory than qemu-img uses, and
/// inflating is CPU work that gains nothing from longer reads.
pub const COMPRESSED_DATA_CHUNK: u64 = 64 << 10;

/// qemu's sector: every device size is seen rounded up to a multiple of it.
pub const SECTOR: u64 = 512;

/// The size `dev` takes in a copy: its size rounded up to whole sectors.
pub fn padded_size(dev: &dyn BlockDev) -> u64 {
    let size = dev.size();
    size.checked_next_multiple_of(SECTOR).unwrap_or(size)
}

/// What a chunk of the source holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Must be read (it may still turn out to be zero bytes).
    Data,
    /// Known to read as zeroes; never read.
    Zero,
    /// Left to the target's backing file (`convert -B`): the source's top layer does not
    /// hold the range, or it reads as zeroes past the end of the target's backing file.
    Backing,
}

/// One unit of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Position in the target's write order, from 0 without gaps.
    pub seq: u64,
    /// Index of the source it comes from.
    pub source: usize,
    /// Offset inside that source.
    pub src_offset: u64,
    /// Offset inside the target.
    pub dst_offset: u64,
    /// Length in bytes; never zero.
    pub len: u64,
    /// What the source holds there.
    pub kind: ChunkKind,
    /// Data the source stores compressed (qemu-img reads it a cluster at a time).
    pub compressed: bool,
}

/// Hands out the chunks of a copy in target order.
pub struct Planner<'a> {
    sources: &'a [Arc<dyn BlockDev>],
    chunk_size: u64,
    index: usize,
    offset: u64,
    dst_base: u64,
    /// The current extent of the current source: where it ends and what it is.
    extent: Option<(u64, ChunkKind)>,
    /// The current extent is data the source stores compressed.
    extent_compressed: bool,
    seq: u64,
    /// Chunks start and end on multiples of this (but the end of a source), 1 for none.
    unit: u64,
    /// The target has a backing file: what the source's top layer does not hold is left
    /// to it ([`ChunkKind::Backing`]).
    target_backing: bool,
    /// Size of the target's backing file when known: zero ranges at or past it need no
    /// write either.
    target_backing_size: Option<u64>,
}

impl<'a> Planner<'a> {
    /// A planner over `sources`, cutting data into chunks of `chunk_size` bytes (> 0).
    pub fn new(sources: &'a [Arc<dyn BlockDev>], chunk_size: u64) -> Self {
        Planner {
            sources,
            chunk_size: chunk_size.max(1),
            index: 0,
            offset: 0,
            dst_base: 0,
            extent: None,
            extent_compressed: false,
            seq: 0,
            unit: 1,
            target_backing: false,
            target_backing_size: None,
        }
    }

    /// Plans for a target with a backing file (`convert -B`), as qemu-img does: ranges the
    /// top layer of a source does not hold become [`ChunkKind::Backing`], and so do zero
    /// ranges at or past `backing_size` (the backing file's size, when known).
    pub fn with_target_backing(mut self, backing_size: Option<u64>) -> Self {
        self.target_backing = true;
        self.target_backing_size = backing_size;
        self
    }

    /// A planner whose chunks cover whole units of `unit` bytes (a power of two dividing
    /// `chunk_size`), as compressed writes need whole clusters: a zero extent shorter than
    /// a unit, or the ragged ends of one, are handed out as data, the way qemu-img treats a
    /// cluster that is only partly unallocated when it compresses. Offsets are counted
    /// from the start of each source, so give it one source (see [`super::concat`]).
    pub fn aligned(sources: &'a [Arc<dyn BlockDev>], chunk_size: u64, unit: u64) -> Self {
        let unit = unit.max(1);
        Planner {
            unit,
            ..Self::new(sources, chunk_size.max(unit))
        }
    }

    /// The next chunk, or `None` when every source is done.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>> {
        loop {
            let Some(source) = self.sources.get(self.index) else {
                return Ok(None);
            };
            let size = source.size();
            let padded = padded_size(source.as_ref());
            if self.offset >= padded {
                self.index += 1;
                self.dst_base += padded;
                self.offset = 0;
                self.extent = None;
                continue;
            }
            let (ext_end, kind) = match self.extent {
                Some((end, kind)) if end > self.offset => (end, kind),
                // The sector padding past the end of the source.
                _ if self.offset >= size => (padded, ChunkKind::Zero),
                _ => {
                    let ext = self.query(source, size)?;
                    self.extent = Some(ext);
                    ext
                }
            };
            let dst_offset = self.dst_base + self.offset;
            let mut kind = kind;
            let mut len = ext_end - self.offset;
            if self.unit > 1 {
                let u = self.unit;
                // Offsets stay on unit boundaries: every chunk ends on one or at the end.
                let whole = ext_end / u * u;
                match kind {
                    ChunkKind::Zero | ChunkKind::Backing if whole >= self.offset + u => {
                        len = (whole - self.offset).min(MAX_ZERO_CHUNK / u * u);
                    }
                    _ => {
                        kind = ChunkKind::Data;
                        let end = ext_end.max(self.offset + 1).next_multiple_of(u).min(padded);
                        len = (end - self.offset).min(self.chunk_size);
                    }
                }
            }
            match kind {
                // Aligned chunks of a compressed copy are short already.
                ChunkKind::Data if self.extent_compressed && self.unit == 1 => {
                    len = len.min(self.chunk_size).min(COMPRESSED_DATA_CHUNK)
                }
                ChunkKind::Data => len = len.min(self.chunk_size),
                ChunkKind::Zero | ChunkKind::Backing => len = len.min(MAX_ZERO_CHUNK),
            }
            // Zeroes past the end of the target's backing file read as zeroes there anyway.
            // Whole units only: the unit holding the end is written as zeroes.
            if let (ChunkKind::Zero, Some(end)) = (kind, self.target_backing_size) {
                let end = end.checked_next_multiple_of(self.unit).unwrap_or(end);
                if dst_offset >= end {
                    kind = ChunkKind::Backing;
                } else {
                    len = len.min(end - dst_offset);
                }
            }
            let chunk = Chunk {
                seq: self.seq,
                source: self.index,
                src_offset: self.offset,
                dst_offset,
                len,
                kind,
                compressed: kind == ChunkKind::Data && self.extent_compressed,
            };
            self.seq += 1;
            self.offset += len;
            return Ok(Some(chunk));
        }
    }

    /// Asks the source what the extent at the current offset is.
    fn query(&mut self, source: &Arc<dyn BlockDev>, size: u64) -> Result<(u64, ChunkKind)> {
        let status = source.block_status(self.offset, size - self.offset)?;
        if status.offset != self.offset || status.len == 0 {
            return Err(Error::corrupt(
                "block status",
                format!(
                    "source {} answered extent {}+{} for offset {}",
                    self.index + 1,
                    status.offset,
                    status.len,
                    self.offset
                ),
            )
            .at_offset(self.offset));
        }
        let end = self.offset.saturating_add(status.len).min(size);
        self.extent_compressed = status.compressed;
        let falls_through = !status.zero && !status.data && !status.allocated;
        if falls_through && !self.target_backing && source.backing().is_some() {
            // Unallocated ranges fall through to the backing chain: ask it, as qemu-img
            // does, so that what reads as zeroes there is not read (and counts as zeroes
            // in the progress); what a layer holds is read through the image.
            let entry = crate::map::chain_status(source, self.offset, size - self.offset)?;
            let end = self.offset.saturating_add(entry.length.max(1)).min(end);
            let kind = if entry.zero {
                ChunkKind::Zero
            } else {
                ChunkKind::Data
            };
            return Ok((end, kind));
        }
        let kind = if status.zero {
            ChunkKind::Zero
        } else if !falls_through || !self.target_backing {
            ChunkKind::Data
        } else {
            // The read would fall through to the source's backing file, which the target's
            // backing stands in for; past that file's end (or without one) the range reads
            // as zeroes, as qemu's block status says.
            match source.backing() {
                Some(backing) if self.offset < backing.size() => ChunkKind::Backing,
                _ => ChunkKind::Zero,
            }
        };
        Ok((end, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdisk_block::{MemImage, ZeroMode};

    #[test]
    fn zeroes_past_the_target_backing_file_are_left_to_it() {
        let a = MemImage::shared(8 << 20);
        a.write_at(&[1u8; 65536], 0).expect("write");
        a.write_at(&[2u8; 4096], 6 << 20).expect("write");
        let sources: Vec<Arc<dyn BlockDev>> = vec![a];
        for unit in [None, Some(65536)] {
            let backing_end = (4 << 20) + 512;
            let p = match unit {
                Some(u) => Planner::aligned(&sources, 2 << 20, u),
                None => Planner::new(&sources, 2 << 20),
            };
            let mut p = p.with_target_backing(Some(backing_end));
            let mut next = 0;
            let mut kinds = Vec::new();
            while let Some(c) = p.next_chunk().expect("plan") {
                assert_eq!(c.dst_offset, next);
                next += c.len;
                let end = c.dst_offset + c.len;
                match c.kind {
                    // A zero chunk never reaches past the backing file (its unit, with -c).
                    ChunkKind::Zero => assert!(end <= backing_end.next_multiple_of(65536)),
                    ChunkKind::Backing => assert!(c.dst_offset >= backing_end),
                    ChunkKind::Data => {}
                }
                kinds.push((c.dst_offset, c.kind));
            }
            assert_eq!(next, 8 << 20);
            assert_eq!(kinds.first(), Some(&(0, ChunkKind::Data)));
            assert!(kinds.contains(&(6 << 20, ChunkKind::Data)), "{kinds:?}");
            assert!(kinds.iter().any(|k| k.1 == ChunkKind::Backing), "{kinds:?}");
        }
    }

    #[test]
    fn chunks_cover_concatenated_sources_in_order() {
        let a = MemImage::shared(5 << 20);
        a.write_at(&[1u8; 4096], 0).expect("write");
        a.write_zeroes(4 << 20, 1 << 20, ZeroMode::MayUnmap)
            .expect("zero");
        let b = MemImage::shared(3000);
        b.write_at(&[2u8; 100], 2900).expect("write tail");
        let sources: Vec<Arc<dyn BlockDev>> = vec![a, b];
        let mut p = Planner::new(&sources, 2 << 20);
        let mut next_dst = 0;
        let mut seq = 0;
        let mut count = 0;
        while let Some(c) = p.next_chunk().expect("plan") {
            assert_eq!(c.dst_offset, next_dst);
            assert_eq!(c.seq, seq);
            assert!(c.len > 0);
            if c.kind == ChunkKind::Data {
                assert!(c.len <= 2 << 20);
            }
            next_dst += c.len;
            seq += 1;
            count += 1;
        }
        // The second source counts as 3072 bytes: its tail is padded to a whole sector.
        assert_eq!(next_dst, (5 << 20) + 3072);
        assert!(count >= 2);
    }
}
