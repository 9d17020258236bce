//! The streamOptimized writer, in the layout VMware's own tools write (ovftool, vSphere
//! export), which OVF consumers expect:
//!
//! ```text
//! sector 0      header: version 3, flags newline|compressed|markers, gdOffset = GD_AT_END
//! sector 1..21  embedded descriptor
//! overhead..    grain markers: {lba u64, size u32, deflate data}, each padded to 512 bytes
//!               GT marker {sectors, 0, 1} + grain table, for every table with a grain
//!               GD marker {sectors, 0, 2} + grain directory (0 for tables never written)
//!               footer marker {1, 0, 3} + footer (the header with the real gdOffset)
//!               end-of-stream marker (a zero sector)
//! ```
//!
//! Writers differ in where the tables go, and readers (qemu, VirtualBox, vSphere) find them
//! through the footer's directory either way: the "VMDK stream converter" writes each table
//! right after its grains; VMware's Virtual Disk Manager and open-vmdk put the directory and
//! every table in the header area and write no GT/GD/footer markers. This writer takes
//! grains in any order, so a table is complete only at a flush, and all tables follow the
//! last grain (tests/stream.rs checks the layout and the fixtures of both other kinds).
//!
//! The file is append-only: a grain is compressed once, when all its bytes are known (or at a
//! flush), and appended at the tail; writing a grain already in the file is refused, as qemu
//! refuses it. Grain tables live in memory; every flush writes tables, directory, footer and
//! end-of-stream marker after the last grain, so the file is a complete stream after each
//! flush, and the next grain overwrites that block and a later flush writes it again.
//! Compression of whole grains runs outside the lock, so concurrent writers use the cores.
//! A grain that is all zeroes is not stored: unwritten grains read as zeroes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;

use flate2::{Compress, Compression, FlushCompress, Status};
use parking_lot::Mutex;
use vdisk_block::{BlockStatus, CacheMode, EngineChoice, Error, HostFile, Result};

use crate::create::{CreateSpec, DESCRIPTOR_SECTORS, GRAIN_SECTORS, GTES_PER_GT};
use crate::descriptor::{Access, ExtentLine, ExtentType};
use crate::header::{
    Marker, SparseHeader, COMPRESS_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NEWLINE_TEST,
    GD_AT_END, MARKER_FOOTER, MARKER_GD, MARKER_GT, SECTOR,
};
use crate::sparse::{Layout, SparseExtent};

const OP: &str = "write streamOptimized";

/// Grains kept in memory while only partly written, at most; past this the oldest is
/// written out zero-padded (a later write to the rest of it then fails, as in qemu).
const MAX_PENDING: usize = 256;

/// The header of a new stream of `sectors`.
pub fn stream_header(sectors: u64) -> SparseHeader {
    SparseHeader {
        version: 3,
        flags: FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
        capacity: sectors,
        grain_sectors: GRAIN_SECTORS,
        descriptor_offset: 1,
        descriptor_size: DESCRIPTOR_SECTORS,
        gtes_per_gt: GTES_PER_GT,
        rgd_offset: 0,
        gd_offset: GD_AT_END,
        overhead: GRAIN_SECTORS,
        unclean_shutdown: false,
        compress_algorithm: COMPRESS_DEFLATE,
    }
}

/// Creates an empty streamOptimized image: header, descriptor, and the closing block of an
/// empty stream (directory, footer, end-of-stream marker).
pub fn create(path: &Path, spec: &CreateSpec) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::invalid("create", "the image name is not valid UTF-8"))?;
    let descriptor = spec.descriptor(vec![ExtentLine {
        access: Access::ReadWrite,
        sectors: spec.sectors,
        kind: ExtentType::Sparse,
        file: Some(name.to_string()),
        offset: None,
    }]);
    let header = stream_header(spec.sectors);
    let file = HostFile::create(path, CacheMode::Writeback, EngineChoice::Sync)?;
    file.write_at(&header.encode(), 0)?;
    let text = descriptor.to_text();
    if text.len() as u64 > DESCRIPTOR_SECTORS * SECTOR {
        return Err(Error::invalid(
            "create",
            "the descriptor is too long to embed",
        ));
    }
    file.write_at(text.as_bytes(), SECTOR)?;
    let tables = vec![None; header.gd_entries() as usize];
    let end = write_closing(&file, &header, &tables, header.overhead * SECTOR)?;
    file.set_len(end)?;
    file.flush()
}

/// Writes grain tables, directory, footer and end-of-stream marker from `at`; returns the
/// end of the stream.
fn write_closing(
    file: &HostFile,
    header: &SparseHeader,
    tables: &[Option<Vec<u32>>],
    at: u64,
) -> Result<u64> {
    let table_bytes = u64::from(header.gtes_per_gt) * 4;
    let table_sectors = table_bytes.div_ceil(SECTOR);
    let mut block = Vec::new();
    let mut gd = Vec::with_capacity(tables.len() * 4);
    for table in tables {
        match table {
            Some(entries) => {
                block.extend_from_slice(&Marker::metadata_sector(MARKER_GT, table_sectors));
                let sector = (at + block.len() as u64) / SECTOR;
                let sector = u32::try_from(sector)
                    .map_err(|_| Error::invalid(OP, "the stream outgrew 32-bit sector numbers"))?;
                gd.extend_from_slice(&sector.to_le_bytes());
                for e in entries {
                    block.extend_from_slice(&e.to_le_bytes());
                }
                block.resize(block.len().div_ceil(512) * 512, 0);
            }
            None => gd.extend_from_slice(&0u32.to_le_bytes()),
        }
    }
    let gd_sectors = (gd.len() as u64).div_ceil(SECTOR);
    block.extend_from_slice(&Marker::metadata_sector(MARKER_GD, gd_sectors));
    let gd_offset = (at + block.len() as u64) / SECTOR;
    gd.resize((gd_sectors * SECTOR) as usize, 0);
    block.extend_from_slice(&gd);
    block.extend_from_slice(&Marker::metadata_sector(MARKER_FOOTER, 1));
    let footer = SparseHeader {
        gd_offset,
        ..header.clone()
    };
    block.extend_from_slice(&footer.encode());
    block.extend_from_slice(&[0u8; 512]);
    file.write_at(&block, at)?;
    Ok(at + block.len() as u64)
}

/// Compresses one grain into a zlib stream.
///
/// Each thread keeps its compressor and scratch buffer: building a deflate state costs
/// about 300 KiB of allocations, and doing that per grain on many threads leaves the
/// allocator's per-thread arenas holding far more than the working set.
fn deflate(data: &[u8]) -> Result<Vec<u8>> {
    struct Deflater {
        z: Compress,
        out: Vec<u8>,
    }
    thread_local! {
        static DEFLATER: std::cell::RefCell<Option<Deflater>> = const { std::cell::RefCell::new(None) };
    }
    DEFLATER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = slot.get_or_insert_with(|| Deflater {
            z: Compress::new(Compression::default(), true),
            out: Vec::new(),
        });
        d.z.reset();
        // Incompressible data grows by a few bytes per 16 KiB block plus the zlib wrapper.
        let room = data.len() + data.len() / 64 + 64;
        if d.out.len() < room {
            d.out.resize(room, 0);
        }
        match d
            .z
            .compress(data, &mut d.out[..room], FlushCompress::Finish)
        {
            Ok(Status::StreamEnd) => Ok(d.out[..d.z.total_out() as usize].to_vec()),
            other => Err(Error::new(
                vdisk_block::ErrorKind::Io,
                OP,
                format!("deflate failed: {other:?}"),
            )),
        }
    })
}

/// A grain being filled in memory.
struct Pending {
    data: Vec<u8>,
    /// Which sectors the writes covered completely.
    covered: Vec<bool>,
}

struct State {
    tables: Vec<Option<Vec<u32>>>,
    tail: u64,
    pending: BTreeMap<u64, Pending>,
    /// Something changed since the closing block was last written.
    dirty: bool,
}

/// An opened stream in append mode.
pub struct StreamWriter {
    reader: SparseExtent,
    header: SparseHeader,
    state: Mutex<State>,
}

impl std::fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("file", &self.reader.file().path())
            .finish()
    }
}

fn allocated_cluster() -> Error {
    Error::unsupported(
        OP,
        "Could not write to allocated cluster for streamOptimized (the format is append-only)",
    )
}

impl StreamWriter {
    /// Takes over an opened stream whose first header defers to a footer (the layout this
    /// module writes); other streams cannot be appended to.
    pub fn new(reader: SparseExtent, first_header_at_end: bool) -> Result<Self> {
        let header = reader.header().clone();
        if reader.layout() != Layout::Hosted || !header.compressed() || !header.markers() {
            return Err(
                Error::unsupported(OP, "not a stream with markers").with_path(reader.file().path())
            );
        }
        if !first_header_at_end {
            return Err(Error::unsupported(
                OP,
                "only streams with the grain directory at the end (VMware's layout) can be appended to",
            )
            .with_path(reader.file().path()));
        }
        let gd_entries = header.gd_entries() as usize;
        let mut tables = Vec::with_capacity(gd_entries);
        // The closing block starts at the first table's marker, or the directory's.
        let mut tail = header.gd_offset.saturating_sub(1) * SECTOR;
        let mut last_grain = 0u64;
        // Each table must be its own: tables shared between directory entries would alias
        // (and let a small hostile file make us hold gigabytes of copies).
        let mut seen = std::collections::HashSet::new();
        for index in 0..gd_entries {
            let dir = reader.gd.read().get(index).copied().unwrap_or(0);
            if dir != 0 && !seen.insert(dir) {
                return Err(Error::corrupt(
                    OP,
                    format!("grain directory entries share the grain table at sector {dir}"),
                )
                .with_path(reader.file().path()));
            }
            match reader.grain_table(index)? {
                None => tables.push(None),
                Some(table) => {
                    let entries: Vec<u32> = table.iter().map(|&e| e as u32).collect();
                    last_grain = last_grain.max(entries.iter().copied().max().unwrap_or(0).into());
                    tables.push(Some(entries));
                }
            }
        }
        for (index, table) in tables.iter().enumerate() {
            if table.is_some() {
                let dir = reader.gd.read().get(index).copied().unwrap_or(0);
                tail = tail.min(dir.saturating_sub(1) * SECTOR);
            }
        }
        if tail < header.overhead * SECTOR || last_grain * SECTOR >= tail {
            return Err(Error::corrupt(
                OP,
                "the stream's tables do not follow its grains; cannot append to it",
            )
            .with_path(reader.file().path()));
        }
        Ok(StreamWriter {
            reader,
            header,
            state: Mutex::new(State {
                tables,
                tail,
                pending: BTreeMap::new(),
                dirty: false,
            }),
        })
    }

    /// The extent as a reader.
    pub fn reader(&self) -> &SparseExtent {
        &self.reader
    }

    fn grain_bytes(&self) -> u64 {
        self.header.grain_bytes()
    }

    /// Bytes of grain `grain` that lie inside the disk.
    fn grain_len(&self, grain: u64) -> u64 {
        let capacity = self.header.capacity * SECTOR;
        (capacity - grain * self.grain_bytes()).min(self.grain_bytes())
    }

    fn entry(state: &State, header: &SparseHeader, grain: u64) -> u32 {
        let per = u64::from(header.gtes_per_gt);
        state
            .tables
            .get((grain / per) as usize)
            .and_then(|t| t.as_ref())
            .map(|t| t[(grain % per) as usize])
            .unwrap_or(0)
    }

    /// Appends compressed grain `grain` at the tail and records it.
    fn append(&self, state: &mut State, grain: u64, compressed: &[u8]) -> Result<()> {
        let mut record = Vec::with_capacity(compressed.len() + 12 + 511);
        record.extend_from_slice(&(grain * self.header.grain_sectors).to_le_bytes());
        record.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
        record.extend_from_slice(compressed);
        record.resize(record.len().div_ceil(512) * 512, 0);
        let at = state.tail;
        let sector = u32::try_from(at / SECTOR)
            .map_err(|_| Error::invalid(OP, "the stream outgrew 32-bit sector numbers"))?;
        self.reader.file().write_at(&record, at)?;
        state.tail = at + record.len() as u64;
        self.reader.file_len.fetch_max(state.tail, Ordering::AcqRel);
        let per = u64::from(self.header.gtes_per_gt);
        let table =
            state.tables[(grain / per) as usize].get_or_insert_with(|| vec![0u32; per as usize]);
        table[(grain % per) as usize] = sector;
        state.dirty = true;
        Ok(())
    }

    /// Compresses and appends a grain that was only partly written, unless all of it is
    /// zeroes: a convert that skips zero chunks leaves such grains behind (a chunk of data
    /// ends inside a grain whose rest was never sent), and storing them would cost a grain
    /// each and make them report as data. Left out, the grain reads as zeroes all the same
    /// (a stream has no parent).
    fn append_unless_zero(&self, state: &mut State, grain: u64, data: &[u8]) -> Result<()> {
        if data.iter().all(|&b| b == 0) {
            return Ok(());
        }
        let compressed = deflate(data)?;
        self.append(state, grain, &compressed)
    }

    /// Writes `buf` at extent offset `offset`.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        let grain_bytes = self.grain_bytes();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let grain = at / grain_bytes;
            let within = at % grain_bytes;
            let n = (buf.len() - done).min((grain_bytes - within) as usize);
            let piece = &buf[done..done + n];
            let whole = within == 0 && n as u64 == self.grain_len(grain);
            let pending_or_written = {
                let state = self.state.lock();
                if Self::entry(&state, &self.header, grain) != 0 {
                    return Err(allocated_cluster().at_offset(at));
                }
                state.pending.contains_key(&grain)
            };
            if whole && !pending_or_written && piece.iter().all(|&b| b == 0) {
                // A grain of zeroes reads the same unwritten (a stream has no parent), and
                // leaving it out keeps the stream small.
            } else if whole && !pending_or_written {
                // The expensive part runs without the lock.
                let compressed = deflate(piece)?;
                let mut state = self.state.lock();
                if Self::entry(&state, &self.header, grain) != 0 {
                    return Err(allocated_cluster().at_offset(at));
                }
                state.pending.remove(&grain);
                self.append(&mut state, grain, &compressed)?;
            } else {
                self.write_partial(grain, within, piece)?;
            }
            done += n;
        }
        Ok(())
    }

    /// Compresses a whole grain for [`Self::write_packed`], with no lock held; `None` for
    /// a grain of zeroes, which is not stored.
    pub fn compress_grain(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        if data.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        deflate(data).map(Some)
    }

    /// Writes `buf` at extent offset `offset`, appending `packed` as its compressed form
    /// when [`Self::compress_grain`] made it from exactly one whole grain at a grain
    /// boundary; anything else goes through [`Self::write`].
    pub fn write_packed(&self, buf: &[u8], packed: Option<&[u8]>, offset: u64) -> Result<()> {
        let grain_bytes = self.grain_bytes();
        let grain = offset / grain_bytes;
        let whole = offset.is_multiple_of(grain_bytes) && buf.len() as u64 == grain_bytes;
        let Some(packed) = packed.filter(|_| whole && grain_bytes <= self.grain_len(grain)) else {
            return self.write(buf, offset);
        };
        let mut state = self.state.lock();
        if Self::entry(&state, &self.header, grain) != 0 || state.pending.contains_key(&grain) {
            // Written already, or partly: write() gives the answer it always gives.
            drop(state);
            return self.write(buf, offset);
        }
        self.append(&mut state, grain, packed)
    }

    fn write_partial(&self, grain: u64, within: u64, piece: &[u8]) -> Result<()> {
        let len = self.grain_len(grain);
        let mut state = self.state.lock();
        let sectors = len.div_ceil(SECTOR) as usize;
        let entry = state.pending.entry(grain).or_insert_with(|| Pending {
            data: vec![0u8; len as usize],
            covered: vec![false; sectors],
        });
        let start = within as usize;
        entry.data[start..start + piece.len()].copy_from_slice(piece);
        let end = within + piece.len() as u64;
        let first_full = within.div_ceil(SECTOR);
        let last_full = if end == len {
            len.div_ceil(SECTOR)
        } else {
            end / SECTOR
        };
        for s in first_full..last_full {
            entry.covered[s as usize] = true;
        }
        if entry.covered.iter().all(|&c| c) {
            if let Some(done) = state.pending.remove(&grain) {
                self.append_unless_zero(&mut state, grain, &done.data)?;
            }
        } else if state.pending.len() > MAX_PENDING {
            if let Some((&oldest, _)) = state.pending.iter().next() {
                if let Some(p) = state.pending.remove(&oldest) {
                    self.append_unless_zero(&mut state, oldest, &p.data)?;
                }
            }
        }
        Ok(())
    }

    /// Makes a range read as zeroes: nothing to do where no grain was written; refused where
    /// one was (append-only).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let grain_bytes = self.grain_bytes();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let grain = at / grain_bytes;
            let within = at % grain_bytes;
            let n = (end - at).min(grain_bytes - within);
            let mut state = self.state.lock();
            if Self::entry(&state, &self.header, grain) != 0 {
                return Err(allocated_cluster().at_offset(at));
            }
            if let Some(p) = state.pending.get_mut(&grain) {
                p.data[within as usize..(within + n) as usize].fill(0);
            }
            at += n;
        }
        Ok(())
    }

    /// Writes every pending grain and the closing block, then syncs.
    pub fn flush(&self) -> Result<()> {
        let mut state = self.state.lock();
        while let Some((grain, p)) = state.pending.pop_first() {
            self.append_unless_zero(&mut state, grain, &p.data)?;
        }
        if state.dirty {
            let end = write_closing(
                self.reader.file().host(),
                &self.header,
                &state.tables,
                state.tail,
            )?;
            self.reader.file().set_len(end)?;
            self.reader.file_len.fetch_max(end, Ordering::AcqRel);
            state.dirty = false;
        }
        self.reader.file().flush()
    }

    fn grain_state(&self, grain: u64) -> (Option<Vec<u8>>, u32) {
        let state = self.state.lock();
        let pending = state.pending.get(&grain).map(|p| p.data.clone());
        (pending, Self::entry(&state, &self.header, grain))
    }

    /// Fills `buf` from extent offset `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let grain_bytes = self.grain_bytes();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let grain = at / grain_bytes;
            let within = (at % grain_bytes) as usize;
            let n = (buf.len() - done).min(grain_bytes as usize - within);
            let out = &mut buf[done..done + n];
            match self.grain_state(grain) {
                (Some(data), _) => out.copy_from_slice(&data[within..within + n]),
                (None, 0) => out.fill(0),
                (None, sector) => {
                    let data = self.reader.inflated(grain, u64::from(sector) * SECTOR)?;
                    if within + n > data.len() {
                        return Err(Error::corrupt(OP, "a grain inflates short"));
                    }
                    out.copy_from_slice(&data[within..within + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// The state of the run of like grains at `offset`, at most `len` bytes.
    pub fn status(&self, offset: u64, len: u64, mut st: BlockStatus) -> BlockStatus {
        let grain_bytes = self.grain_bytes();
        // 0: in memory, 1: unwritten, 2: compressed in the file.
        let class = |grain: u64| {
            let state = self.state.lock();
            if state.pending.contains_key(&grain) {
                0
            } else if Self::entry(&state, &self.header, grain) == 0 {
                1
            } else {
                2
            }
        };
        let first = offset / grain_bytes;
        let kind = class(first);
        let mut run = (grain_bytes - offset % grain_bytes).min(len);
        let mut next = first + 1;
        while run < len && class(next) == kind {
            run = (run + grain_bytes).min(len);
            next += 1;
        }
        st.len = run;
        match kind {
            0 => st.data = true,
            1 => {
                st.allocated = false;
                st.zero = true;
            }
            _ => {
                st.data = true;
                st.compressed = true;
            }
        }
        st
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        // A writer that forgot to flush still leaves a complete stream behind; errors here
        // have nowhere to go, and the next open reports a broken footer.
        let dirty = {
            let state = self.state.lock();
            state.dirty || !state.pending.is_empty()
        };
        if dirty {
            let _ = self.flush();
        }
    }
}
