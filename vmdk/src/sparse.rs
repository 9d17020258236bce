//! Reading a sparse extent: hosted VMDK4 (monolithicSparse, the `-sNNN` pieces of a split
//! disk, streamOptimized files with compressed grains behind markers and the grain directory
//! possibly at the end behind a footer) and the ESXi deltas, whose tables differ only in
//! how entries are encoded ([`Layout`]).
//!
//! Lookup is two levels: the grain directory (loaded whole at open, bounded by the file's
//! length) points to grain tables (read on demand and cached), whose entries give the sector
//! of each grain: 0 is unallocated, 1 reads as zeroes when the header says so, anything else
//! is data, plain or compressed. Every offset read from the file is checked against the file
//! before it is used.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use flate2::{Decompress, FlushDecompress, Status};
use parking_lot::{Mutex, RwLock};
use vdisk_block::{Error, Result};

use crate::source::Source;

use crate::header::{
    Marker, SparseHeader, FLAG_REDUNDANT_GD, GD_AT_END, MARKER_EOS, MARKER_FOOTER, SECTOR,
};

/// Memory the grain table cache may hold: 16384 hosted tables (32 GiB of 64 KiB grains
/// mapped), 2048 ESXi ones (entries are kept as u64); a full cache is dropped and refilled.
const GT_CACHE_BYTES: usize = 64 << 20;

/// What one grain of the extent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// Not allocated: the parent (or zeroes) decides.
    Unallocated,
    /// Reads as zeroes in this layer.
    Zero,
    /// Plain data at this byte offset of the file.
    Data(u64),
    /// Compressed data at this byte offset of the file (behind a marker when the extent has
    /// markers).
    Compressed(u64),
}

/// How the two table levels of a sparse extent are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Hosted VMDK4: u32 sector offsets at both levels.
    Hosted,
    /// ESXi vmfsSparse (VMDK3 `COWD`): u32 sector offsets, no zero or compressed grains.
    Cowd,
    /// ESXi seSparse: u64 entries; the directory holds grain table numbers, the tables
    /// hold typed grain numbers.
    SeSparse {
        /// Byte offset of grain table number 0.
        tables: u64,
        /// Bytes of the grain table region.
        tables_len: u64,
        /// Byte offset of grain number 0.
        grains: u64,
        /// Bytes of the grain region.
        grains_len: u64,
    },
}

impl Layout {
    fn entry_bytes(self) -> u64 {
        match self {
            Layout::Hosted | Layout::Cowd => 4,
            Layout::SeSparse { .. } => 8,
        }
    }
}

/// Where the grain directory of an extent is and how the extent is laid out; what the
/// header parsers of each flavour produce.
#[derive(Debug, Clone)]
pub struct Geometry {
    /// The header in force (synthesised for ESXi flavours: capacity, grain size, entries per
    /// table, overhead and flags are what the reader uses).
    pub header: SparseHeader,
    /// How entries are encoded.
    pub layout: Layout,
    /// Byte offset of the grain directory.
    pub gd_offset: u64,
    /// Grain directory entries the file holds.
    pub gd_entries: u64,
}

/// An opened sparse extent: hosted, streamOptimized, vmfsSparse or seSparse.
#[derive(Debug)]
pub struct SparseExtent {
    file: Arc<Source>,
    /// The header in force: the footer's copy when the first header defers to it.
    header: SparseHeader,
    layout: Layout,
    /// The file's length: grows as a writer allocates.
    pub(crate) file_len: AtomicU64,
    /// Grain directory entries; written only under the image's write lock.
    pub(crate) gd: RwLock<Vec<u64>>,
    /// Byte offset of the grain directory.
    pub(crate) gd_offset: u64,
    /// The redundant grain directory (hosted extents with the flag), with its offset.
    pub(crate) rgd: Option<(u64, RwLock<Vec<u64>>)>,
    /// Where the next allocation goes (sector aligned); only writers use it.
    pub(crate) end: Mutex<u64>,
    pub(crate) gt_cache: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
    /// The most recently inflated grain, by file offset: readers that ask for less than a
    /// grain at a time would otherwise inflate the same grain again and again.
    last_grain: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

fn corrupt(file: &Source, message: impl Into<String>) -> Error {
    Error::corrupt("read vmdk sparse extent", message).with_path(file.path())
}

fn decode_entries(raw: &[u8], width: u64) -> Vec<u64> {
    if width == 8 {
        raw.chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect()
    } else {
        raw.chunks_exact(4)
            .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect()
    }
}

impl SparseExtent {
    /// Opens the hosted sparse extent in `file`, whose first 512 bytes are `first_header`.
    pub fn open(file: Arc<Source>, first_header: SparseHeader) -> Result<Self> {
        let file_len = file.len()?;
        let header = if first_header.gd_offset == GD_AT_END {
            read_footer(&file, file_len)?
        } else {
            first_header
        };
        header
            .validate(file_len)
            .map_err(|e| e.with_path(file.path()))?;
        let gd_offset = header
            .gd_offset
            .checked_mul(SECTOR)
            .ok_or_else(|| corrupt(&file, "the grain directory offset overflows"))?;
        let geometry = Geometry {
            gd_entries: header.gd_entries(),
            header,
            layout: Layout::Hosted,
            gd_offset,
        };
        Self::with_geometry(file, geometry)
    }

    /// Opens an extent whose header a flavour's parser has already checked: the grain
    /// directory must lie inside the file and hold an entry for every grain table the
    /// capacity needs.
    pub fn with_geometry(file: Arc<Source>, geometry: Geometry) -> Result<Self> {
        let file_len = file.len()?;
        let Geometry {
            header,
            layout,
            gd_offset,
            gd_entries,
        } = geometry;
        let needed = header.gd_entries();
        if needed > gd_entries {
            return Err(corrupt(
                &file,
                format!(
                    "the grain directory has {gd_entries} entries, fewer than the {needed} the capacity needs"
                ),
            ));
        }
        let gd_bytes = needed * layout.entry_bytes();
        match gd_offset.checked_add(gd_bytes) {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(corrupt(
                    &file,
                    format!(
                        "the grain directory ({needed} entries at byte {gd_offset}) lies past the end of the file ({file_len} bytes)"
                    ),
                ))
            }
        }
        let mut raw = vec![0u8; gd_bytes as usize];
        file.read_at(&mut raw, gd_offset)?;
        let gd = decode_entries(&raw, layout.entry_bytes());
        // The redundant directory is only needed to keep it in step when writing.
        let rgd = if file.is_writable()
            && layout == Layout::Hosted
            && header.flags & FLAG_REDUNDANT_GD != 0
            && header.rgd_offset != 0
        {
            let at = header.rgd_offset * SECTOR;
            if at + gd_bytes > file_len {
                return Err(corrupt(
                    &file,
                    "the redundant grain directory lies past the end of the file",
                ));
            }
            let mut raw = vec![0u8; gd_bytes as usize];
            file.read_at(&mut raw, at)?;
            Some((at, RwLock::new(decode_entries(&raw, 4))))
        } else {
            None
        };
        Ok(SparseExtent {
            gd: RwLock::new(gd),
            gd_offset,
            rgd,
            end: Mutex::new(file_len.div_ceil(SECTOR) * SECTOR),
            file,
            header,
            layout,
            file_len: AtomicU64::new(file_len),
            gt_cache: Mutex::new(HashMap::new()),
            last_grain: Mutex::new(None),
        })
    }

    /// The header in force.
    pub fn header(&self) -> &SparseHeader {
        &self.header
    }

    /// How the extent's tables are encoded.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The file holding the extent.
    pub fn file(&self) -> &Arc<Source> {
        &self.file
    }

    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.header.grain_bytes()
    }

    /// Bytes the extent covers according to its header.
    pub fn capacity_bytes(&self) -> u64 {
        self.header.capacity * SECTOR
    }

    /// The byte offset of the grain table a directory entry names, `None` if unallocated.
    fn table_offset(&self, gd_index: usize, entry: u64) -> Result<Option<u64>> {
        let table_bytes = u64::from(self.header.gtes_per_gt) * self.layout.entry_bytes();
        let at = match self.layout {
            _ if entry == 0 => return Ok(None),
            Layout::Hosted | Layout::Cowd => entry * SECTOR,
            Layout::SeSparse {
                tables, tables_len, ..
            } => {
                if entry >> 32 != 0x1000_0000 {
                    return Err(corrupt(
                        &self.file,
                        format!(
                            "grain directory entry {gd_index} has an unknown type ({entry:#x})"
                        ),
                    ));
                }
                let number = entry & 0xffff_ffff;
                let rel = number * table_bytes;
                if rel + table_bytes > tables_len {
                    return Err(corrupt(
                        &self.file,
                        format!(
                            "grain directory entry {gd_index} names grain table {number}, outside the table region"
                        ),
                    ));
                }
                tables + rel
            }
        };
        if at + table_bytes > self.file_len() {
            return Err(corrupt(
                &self.file,
                format!(
                    "grain directory entry {gd_index} points at byte {at}, past the end of the file"
                ),
            ));
        }
        Ok(Some(at))
    }

    pub(crate) fn grain_table(&self, gd_index: usize) -> Result<Option<Arc<Vec<u64>>>> {
        let Some(entry) = self.gd.read().get(gd_index).copied() else {
            return Ok(None);
        };
        let Some(at) = self.table_offset(gd_index, entry)? else {
            return Ok(None);
        };
        // The lock is held across the load: a writer updates a cached table after writing
        // the entry to the file, under this lock, so a table read from the file can never
        // land in the cache after (and without) a concurrent writer's change.
        let mut cache = self.gt_cache.lock();
        if let Some(gt) = cache.get(&at) {
            return Ok(Some(Arc::clone(gt)));
        }
        let width = self.layout.entry_bytes();
        let mut raw = vec![0u8; (u64::from(self.header.gtes_per_gt) * width) as usize];
        self.file.read_at(&mut raw, at)?;
        let gt = Arc::new(decode_entries(&raw, width));
        if (cache.len() + 1) * gt.len() * 8 > GT_CACHE_BYTES {
            cache.clear();
        }
        cache.insert(at, Arc::clone(&gt));
        Ok(Some(gt))
    }

    /// What grain number `grain` holds.
    pub fn grain(&self, grain: u64) -> Result<Grain> {
        let per_gt = u64::from(self.header.gtes_per_gt);
        let Ok(gd_index) = usize::try_from(grain / per_gt) else {
            return Ok(Grain::Unallocated);
        };
        let Some(gt) = self.grain_table(gd_index)? else {
            return Ok(Grain::Unallocated);
        };
        let entry = gt[(grain % per_gt) as usize];
        match self.layout {
            Layout::Hosted => self.hosted_grain(grain, entry),
            Layout::Cowd => match entry {
                0 => Ok(Grain::Unallocated),
                sector => self.data_grain(grain, sector * SECTOR),
            },
            Layout::SeSparse {
                grains, grains_len, ..
            } => match entry >> 60 {
                0 => Ok(Grain::Unallocated),
                // Unmapped (SCSI UNMAP) and explicitly zeroed grains both read as zeroes.
                1 | 2 => Ok(Grain::Zero),
                3 => {
                    let number = ((entry & 0x0fff_0000_0000_0000) >> 48)
                        | ((entry & 0x0000_ffff_ffff_ffff) << 12);
                    let rel = number.checked_mul(self.grain_bytes());
                    match rel {
                        Some(rel) if rel + self.grain_bytes() <= grains_len => {
                            self.data_grain(grain, grains + rel)
                        }
                        _ => Err(corrupt(
                            &self.file,
                            format!("grain {grain} names grain number {number}, outside the grain region"),
                        )),
                    }
                }
                kind => Err(corrupt(
                    &self.file,
                    format!("grain table entry of grain {grain} has an unknown type {kind}"),
                )),
            },
        }
    }

    fn data_grain(&self, grain: u64, at: u64) -> Result<Grain> {
        if at >= self.file_len() {
            return Err(corrupt(
                &self.file,
                format!("grain {grain} points at byte {at}, past the end of the file"),
            ));
        }
        Ok(Grain::Data(at))
    }

    fn hosted_grain(&self, grain: u64, entry: u64) -> Result<Grain> {
        match entry {
            0 => Ok(Grain::Unallocated),
            1 if self.header.zeroed_grain() => Ok(Grain::Zero),
            sector => {
                let at = sector * SECTOR;
                if self.header.compressed() {
                    if at >= self.file_len() {
                        return Err(corrupt(
                            &self.file,
                            format!(
                                "grain {grain} points at sector {sector}, past the end of the file"
                            ),
                        ));
                    }
                    Ok(Grain::Compressed(at))
                } else if sector < self.header.overhead {
                    Err(corrupt(
                        &self.file,
                        format!(
                            "grain {grain} points at sector {sector}, inside the metadata (the first {} sectors)",
                            self.header.overhead
                        ),
                    ))
                } else {
                    self.data_grain(grain, at)
                }
            }
        }
    }

    /// Fills `buf` from extent offset `offset` (inside one grain), calling `unallocated`
    /// for a grain this extent does not hold.
    fn read_in_grain(
        &self,
        buf: &mut [u8],
        offset: u64,
        unallocated: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let grain_bytes = self.grain_bytes();
        let grain = offset / grain_bytes;
        let within = offset % grain_bytes;
        match self.grain(grain)? {
            Grain::Unallocated => unallocated(buf, offset),
            Grain::Zero => {
                buf.fill(0);
                Ok(())
            }
            Grain::Data(at) => {
                let host = at + within;
                if host + buf.len() as u64 > self.file_len() {
                    return Err(corrupt(
                        &self.file,
                        format!("grain {grain} at byte {at} runs past the end of the file"),
                    ));
                }
                self.file.read_at(buf, host)
            }
            Grain::Compressed(at) if within == 0 && buf.len() as u64 == grain_bytes => {
                self.inflate_whole(grain, at, buf)
            }
            Grain::Compressed(at) => {
                let data = self.inflated(grain, at)?;
                let start = within as usize;
                let end = start + buf.len();
                if end > data.len() {
                    return Err(corrupt(
                        &self.file,
                        format!(
                            "compressed grain {grain} inflates to {} bytes, fewer than the {end} needed",
                            data.len()
                        ),
                    ));
                }
                buf.copy_from_slice(&data[start..end]);
                Ok(())
            }
        }
    }

    /// Fills `buf` from extent offset `offset`; `unallocated(buf, offset)` supplies the
    /// ranges whose grains this extent does not hold.
    pub fn read(
        &self,
        buf: &mut [u8],
        offset: u64,
        unallocated: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let grain_bytes = self.grain_bytes();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let left = (buf.len() - done) as u64;
            // Plain grains that follow each other in the file are read with one request.
            // Only a plain grain starts such a run: scanning ahead from every compressed
            // grain would look up each grain of the request once per grain before it.
            let status = match self.grain(at / grain_bytes)? {
                Grain::Data(_) => Some(self.status(at, left)?),
                _ => None,
            };
            if let Some((Grain::Data(host), run)) = status {
                if run > grain_bytes - at % grain_bytes {
                    if host + run > self.file_len() {
                        return Err(corrupt(
                            &self.file,
                            format!("the grains at byte {host} run past the end of the file"),
                        ));
                    }
                    self.file
                        .read_at(&mut buf[done..done + run as usize], host)?;
                    done += run as usize;
                    continue;
                }
            }
            let n = left.min(grain_bytes - at % grain_bytes) as usize;
            self.read_in_grain(&mut buf[done..done + n], at, unallocated)?;
            done += n;
        }
        Ok(())
    }

    /// The grain state at extent offset `offset` and how many bytes (at most `len`) share it;
    /// plain data runs only while the host offsets stay contiguous.
    pub fn status(&self, offset: u64, len: u64) -> Result<(Grain, u64)> {
        let grain_bytes = self.grain_bytes();
        let first = offset / grain_bytes;
        let within = offset % grain_bytes;
        let state = self.grain(first)?;
        let first_state = match state {
            Grain::Data(at) => Grain::Data(at + within),
            other => other,
        };
        let mut run = (grain_bytes - within).min(len);
        let mut next = first + 1;
        while run < len {
            let more = self.grain(next)?;
            let same = match (state, more) {
                (Grain::Data(a), Grain::Data(b)) => b == a + (next - first) * grain_bytes,
                (Grain::Compressed(_), Grain::Compressed(_)) => true,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            run = (run + grain_bytes).min(len);
            next += 1;
        }
        Ok((first_state, run))
    }

    /// The grain at file offset `at`, inflated and checked.
    pub(crate) fn inflated(&self, grain: u64, at: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((cached_at, data)) = &*self.last_grain.lock() {
            if *cached_at == at {
                return Ok(Arc::clone(data));
            }
        }
        let data = Arc::new(self.with_compressed(grain, at, |input| {
            inflate_grain(input, self.grain_bytes() as usize).map_err(|why| {
                corrupt(
                    &self.file,
                    format!("compressed grain {grain} at byte {at}: {why}"),
                )
            })
        })?);
        *self.last_grain.lock() = Some((at, Arc::clone(&data)));
        Ok(data)
    }

    /// Inflates the whole grain at `at` straight into `out` (one grain long), skipping the
    /// one-grain cache that partial reads need.
    fn inflate_whole(&self, grain: u64, at: u64, out: &mut [u8]) -> Result<()> {
        let produced = self.with_compressed(grain, at, |input| {
            inflate_into(input, out).map_err(|why| {
                corrupt(
                    &self.file,
                    format!("compressed grain {grain} at byte {at}: {why}"),
                )
            })
        })?;
        if produced != out.len() {
            return Err(corrupt(
                &self.file,
                format!(
                    "compressed grain {grain} inflates to {produced} bytes, fewer than the {} needed",
                    out.len()
                ),
            ));
        }
        Ok(())
    }

    /// Calls `f` with the zlib stream of compressed grain `grain` at `at`, read into this
    /// thread's buffer: a copy inflates grain after grain on every worker, and a fresh
    /// buffer per grain only churns the allocator's per-thread arenas.
    fn with_compressed<R>(
        &self,
        grain: u64,
        at: u64,
        f: impl FnOnce(&[u8]) -> Result<R>,
    ) -> Result<R> {
        thread_local! {
            static INPUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        INPUT.with(|cell| {
            // A nested call (none today) gets a buffer of its own rather than a panic.
            let mut own = Vec::new();
            let mut guard = cell.try_borrow_mut();
            let buf = match guard.as_deref_mut() {
                Ok(buf) => buf,
                Err(_) => &mut own,
            };
            self.compressed_stream(grain, at, buf)?;
            f(buf)
        })
    }

    /// Reads the zlib stream of compressed grain `grain` at `at` into `buf`: behind its
    /// marker when the extent has markers (one read when it is small, as most are), else up
    /// to two grains' worth.
    fn compressed_stream(&self, grain: u64, at: u64, buf: &mut Vec<u8>) -> Result<()> {
        /// Bytes read with the marker: most compressed grains fit.
        const FIRST_READ: u64 = 32 << 10;
        let file_len = self.file_len();
        // A deflate stream of incompressible data is a little larger than its input; qemu
        // reads two grains' worth, which bounds the compressed size the same way.
        let max_compressed = 2 * self.grain_bytes();
        if !self.header.markers() {
            buf.clear();
            buf.resize(max_compressed.min(file_len.saturating_sub(at)) as usize, 0);
            return self.file.read_at(buf, at);
        }
        if at + 12 > file_len {
            return Err(corrupt(
                &self.file,
                format!(
                    "the grain marker of grain {grain} at byte {at} is past the end of the file"
                ),
            ));
        }
        let first = (file_len - at).min(FIRST_READ) as usize;
        buf.clear();
        buf.resize(first, 0);
        self.file.read_at(buf, at)?;
        let lba = u64::from_le_bytes([
            buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7],
        ]);
        let size = u64::from(u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]));
        if size == 0 || size > max_compressed || at + 12 + size > file_len {
            return Err(corrupt(
                &self.file,
                format!(
                    "the grain marker of grain {grain} at byte {at} gives a compressed size of {size} bytes, which the file cannot hold"
                ),
            ));
        }
        if lba != grain * self.header.grain_sectors {
            return Err(corrupt(
                &self.file,
                format!(
                    "the grain marker at byte {at} is for sector {lba}, but the grain table places it at grain {grain}"
                ),
            ));
        }
        let size = size as usize;
        if 12 + size <= first {
            buf.copy_within(12..12 + size, 0);
            buf.truncate(size);
        } else {
            buf.copy_within(12.., 0);
            let have = first - 12;
            buf.resize(size, 0);
            self.file.read_at(&mut buf[have..], at + first as u64)?;
        }
        Ok(())
    }

    /// The length of the extent's file (including what a writer allocated since open).
    pub fn file_len(&self) -> u64 {
        self.file_len.load(Ordering::Acquire)
    }
}

/// Inflates one zlib stream that must end within `limit` bytes of output.
pub fn inflate_grain(input: &[u8], limit: usize) -> std::result::Result<Vec<u8>, String> {
    let mut out = vec![0u8; limit];
    let produced = inflate_into(input, &mut out)?;
    out.truncate(produced);
    Ok(out)
}

/// Inflates one zlib stream into `out`, which it must not overflow; returns the bytes made.
pub fn inflate_into(input: &[u8], out: &mut [u8]) -> std::result::Result<usize, String> {
    thread_local! {
        static INFLATER: std::cell::RefCell<Option<Decompress>> = const { std::cell::RefCell::new(None) };
    }
    // One inflate state per thread, reset for each stream, instead of one allocated per grain.
    INFLATER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slot) => {
            let z = slot.get_or_insert_with(|| Decompress::new(true));
            z.reset(true);
            inflate_with(z, input, out)
        }
        Err(_) => inflate_with(&mut Decompress::new(true), input, out),
    })
}

fn inflate_with(
    z: &mut Decompress,
    input: &[u8],
    out: &mut [u8],
) -> std::result::Result<usize, String> {
    let damaged = |e: flate2::DecompressError| format!("the deflate stream is damaged ({e})");
    // `None`, not `Finish`: a stream that does not fit is then reported as such rather than
    // as an error, and the probe below can tell "ends here" from "goes on".
    let mut status = z
        .decompress(input, out, FlushDecompress::None)
        .map_err(damaged)?;
    let produced = z.total_out() as usize;
    if status != Status::StreamEnd && produced == out.len() {
        // The output is full: the stream must end here, with nothing more to give.
        let used = z.total_in() as usize;
        let mut probe = [0u8; 1];
        status = z
            .decompress(&input[used..], &mut probe, FlushDecompress::None)
            .map_err(damaged)?;
        if z.total_out() as usize > produced {
            return Err(format!(
                "it inflates to more than a grain ({} bytes)",
                out.len()
            ));
        }
    }
    if status != Status::StreamEnd {
        return Err("the deflate stream is truncated".to_string());
    }
    Ok(produced)
}

/// Reads and checks the footer of a stream whose header says the grain directory is at the
/// end: footer marker, footer (a header copy), end-of-stream marker, in the last 1536 bytes.
fn read_footer(file: &Source, file_len: u64) -> Result<SparseHeader> {
    let invalid = |why: &str| {
        Error::corrupt("open vmdk sparse extent", format!("Invalid footer: {why}"))
            .with_path(file.path())
    };
    if file_len < 1536 + 512 {
        return Err(invalid("the file is too short to hold one"));
    }
    let mut tail = vec![0u8; 1536];
    file.read_at(&mut tail, file_len - 1536)?;
    let footer_marker = Marker::decode(&tail[0..16]).ok_or_else(|| invalid("no marker"))?;
    let eos = Marker::decode(&tail[1024..1040]).ok_or_else(|| invalid("no marker"))?;
    if footer_marker.val != 1 || footer_marker.size != 0 || footer_marker.kind != MARKER_FOOTER {
        return Err(invalid(
            "no footer marker 1536 bytes before the end of the file",
        ));
    }
    if eos.val != 0 || eos.size != 0 || eos.kind != MARKER_EOS {
        return Err(invalid("no end-of-stream marker in the last sector"));
    }
    let footer = SparseHeader::decode(&tail[512..1024])
        .map_err(|e| invalid(&format!("the footer header is bad: {}", e.message())))?;
    if footer.gd_offset == GD_AT_END {
        return Err(invalid("the footer defers the grain directory to itself"));
    }
    Ok(footer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zlib(data: &[u8]) -> Vec<u8> {
        use flate2::{Compress, Compression, FlushCompress};
        let mut c = Compress::new(Compression::default(), true);
        let mut out = vec![0u8; data.len() + 1024];
        c.compress(data, &mut out, FlushCompress::Finish)
            .expect("compress");
        out.truncate(c.total_out() as usize);
        out
    }

    #[test]
    fn inflate_checks_bounds() {
        let data = vec![7u8; 4096];
        let z = zlib(&data);
        assert_eq!(inflate_grain(&z, 4096).expect("inflate"), data);
        let err = inflate_grain(&z, 4095).expect_err("too big");
        assert!(err.contains("more than a grain"), "{err}");
        assert!(inflate_grain(&z[..z.len() / 2], 4096)
            .expect_err("cut")
            .contains("truncated"));
        assert!(inflate_grain(b"not zlib at all", 4096).is_err());
    }
}
