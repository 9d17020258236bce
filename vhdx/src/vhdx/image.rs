//! An opened VHDX image: the open pipeline and the read path.
//!
//! Open order matters (MS-VHDX 2.3.3): file identifier, current header, then the log is
//! replayed (into memory; see [`crate::overlay`]) before the region table, the metadata or
//! the BAT are read, because the log may hold newer copies of any of them.
//!
//! Block states, as this driver reads them:
//! - FULLY_PRESENT: the block's bytes are in this file;
//! - PARTIALLY_PRESENT (differencing only): the sector bitmap says, per logical sector,
//!   whether the bytes are here or in the parent;
//! - ZERO and UNMAPPED: read as zeroes; in a differencing image they hide the parent (the
//!   guest zeroed or discarded the range), elsewhere they are holes;
//! - NOT_PRESENT and UNDEFINED: holes; a differencing image reads the parent there.
//!
//! Block status reports every hole as unallocated (qemu reports all of a VHDX as data), so
//! `map` and sparse copies see them.
//!
//! Writes live in [`crate::vhdx::write`]; a writable open replays a pending log into the file
//! first.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vdisk_block::{
    check_range, BlockDev, BlockStatus, Error, ErrorKind, HostFile, HostLocation, ImageInfo,
    OpenOptions, Preallocation, ReadSegment, Result, ZeroMode,
};

use crate::overlay::Overlaid;
use crate::vhdx::bat::{self, PayloadState};
use crate::vhdx::header::{self, Header, HEADER_OFFSETS, HEADER_SECTION, HEADER_SIZE};
use crate::vhdx::log::{self, ReplaySummary};
use crate::vhdx::metadata::{self, DiskParams};
use crate::vhdx::parent;
use crate::vhdx::region::{self, overlaps, Regions, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE};

const MIB: u64 = 1024 * 1024;

/// An opened VHDX image, shared by many threads.
pub struct VhdxImage {
    pub(crate) path: PathBuf,
    pub(crate) view: Overlaid,
    pub(crate) regions: Regions,
    pub(crate) params: DiskParams,
    creator: Option<String>,
    /// The BAT; readers copy an entry out and drop the lock before any I/O.
    pub(crate) bat: RwLock<Vec<u64>>,
    pub(crate) parent: Option<Arc<dyn BlockDev>>,
    replay: Option<ReplaySummary>,
    /// Header, log and allocation state; held for the whole of a metadata update.
    pub(crate) writer: Mutex<WriterState>,
    /// The first write of this session already changed the write GUIDs.
    pub(crate) session_started: AtomicBool,
    pub(crate) writable: bool,
    /// The guest-visible size (resize changes it; `params` keeps the size at open).
    pub(crate) size: AtomicU64,
    /// File offset of the virtual disk size metadata value.
    pub(crate) size_item: u64,
    bat_problems: Vec<(u64, String)>,
    /// Test hook: fail every file write or flush after this many (simulated power cut).
    #[cfg(test)]
    pub(crate) fault: crate::vhdx::write::FaultBudget,
}

/// What writers share: the current header and its slot, where the next block goes, and the
/// log session.
#[derive(Debug)]
pub(crate) struct WriterState {
    pub(crate) header: Header,
    pub(crate) slot: usize,
    pub(crate) file_end: u64,
    pub(crate) log_seq: u64,
    /// BAT sectors changed in memory since the last commit.
    pub(crate) dirty: std::collections::BTreeSet<u64>,
}

impl std::fmt::Debug for VhdxImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdxImage")
            .field("path", &self.path)
            .field("params", &self.params)
            .field("parent", &self.parent.is_some())
            .field("replay", &self.replay)
            .finish()
    }
}

/// Where one guest range comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// This file at the host offset.
    Data(u64),
    /// Zeroes; `allocated` when this layer decides it (it hides a parent).
    Zero { allocated: bool },
    /// The parent (zeroes when there is none).
    Parent,
}

impl Source {
    /// True when `next`, starting `len` bytes later, continues this run.
    fn continued_by(self, next: Source, len: u64) -> bool {
        match (self, next) {
            (Source::Data(a), Source::Data(b)) => a.checked_add(len) == Some(b),
            (a, b) => a == b,
        }
    }
}

fn corrupt(path: &Path, why: impl Into<String>) -> Error {
    Error::corrupt("open", why).with_path(path)
}

impl VhdxImage {
    /// Opens `path`. The parent of a differencing image is opened through `options.opener`
    /// within `options.policy`.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Self> {
        Self::open_with(path, options, false)
    }

    /// Opens for `check`: BAT entries that would make [`VhdxImage::open`] fail are listed
    /// in [`VhdxImage::bat_problems`] and read as holes instead.
    pub fn open_for_check(path: &Path, options: &OpenOptions) -> Result<Self> {
        Self::open_with(path, options, true)
    }

    /// BAT entries found bad by [`VhdxImage::open_for_check`]: index and why.
    pub fn bat_problems(&self) -> &[(u64, String)] {
        &self.bat_problems
    }

    fn open_with(path: &Path, options: &OpenOptions, tolerant: bool) -> Result<Self> {
        let file = Arc::new(HostFile::open(
            path,
            options.writable,
            options.cache,
            options.engine,
        )?);
        let mut view = Overlaid::new(Arc::clone(&file))?;
        let file_len = view.len();
        // The signature decides first, as in qemu: a short file without it is "not VHDX"
        // (EINVAL), a short one with it has "no valid header".
        let mut id = vec![0u8; 520];
        let held = id
            .len()
            .min(usize::try_from(file_len).unwrap_or(usize::MAX));
        view.read_at(&mut id[..held], header::FILE_ID_OFFSET)?;
        let creator = header::parse_creator(&id).ok_or_else(|| {
            // qemu's driver fails with a bare EINVAL here, which qemu-img prints as an
            // OS error: keep its wording first and say what is wrong after it.
            Error::new(
                ErrorKind::Io,
                "open",
                "Invalid argument (not a VHDX image: no 'vhdxfile' signature)",
            )
            .with_path(path)
        })?;
        if file_len < HEADER_SECTION {
            return Err(corrupt(
                path,
                format!(
                    "No valid VHDX header found (the file is {file_len} bytes long, too short \
                     for a VHDX header section)"
                ),
            ));
        }
        let mut raw = [vec![0u8; HEADER_SIZE], vec![0u8; HEADER_SIZE]];
        for (buf, off) in raw.iter_mut().zip(HEADER_OFFSETS) {
            view.read_at(buf, off)?;
        }
        let (slot, header) =
            header::choose_current([&raw[0], &raw[1]]).map_err(|w| corrupt(path, w))?;
        log::check_header(&header, file_len).map_err(|w| corrupt(path, w))?;
        let replay = log::replay(&mut view, &header)
            .map_err(|w| corrupt(path, format!("cannot replay the log: {w}")))?;
        let regions = read_regions(&view, path)?;
        check_layout(&header, &regions).map_err(|w| corrupt(path, w))?;
        let (params, size_item) = read_metadata(&view, &regions, path)?;
        let bat = read_bat(&view, &regions, &params, path)?;
        let mut bat = bat;
        let bat_problems = check_bat(&bat, &params, &header, &regions, view.len());
        if let Some((_, why)) = bat_problems.first() {
            if !tolerant {
                return Err(corrupt(path, why.clone()));
            }
            // `check` looks at the rest of the image with the bad entries read as holes.
            for (index, _) in &bat_problems {
                if let Some(e) = bat.get_mut(*index as usize) {
                    *e = 0;
                }
            }
        }
        let parent = match &params.parent_locator {
            Some(locator) => parent::open(path, locator, options)?,
            None => None,
        };
        let file_end = allocation_start(&bat, &params, view.len());
        let virtual_size = params.virtual_size;
        let mut image = VhdxImage {
            path: path.to_path_buf(),
            view,
            regions,
            params,
            creator: Some(creator),
            bat: RwLock::new(bat),
            parent,
            replay,
            writer: Mutex::new(WriterState {
                header,
                slot,
                file_end,
                log_seq: 0,
                dirty: Default::default(),
            }),
            session_started: AtomicBool::new(false),
            writable: options.writable,
            size: AtomicU64::new(virtual_size),
            size_item,
            bat_problems,
            #[cfg(test)]
            fault: Default::default(),
        };
        if options.writable {
            image.finish_replay()?;
        }
        Ok(image)
    }

    /// The validated metadata.
    pub fn params(&self) -> &DiskParams {
        &self.params
    }

    /// The current header.
    pub fn header(&self) -> Header {
        self.writer().header.clone()
    }

    /// The writer state (poisoning only means another thread panicked mid-update; the state
    /// itself stays consistent because every update commits through the log).
    pub(crate) fn writer(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of BAT entry `index` (raw, as stored).
    pub fn bat_entry(&self, index: u64) -> Result<u64> {
        let bat = self.bat.read().unwrap_or_else(|e| e.into_inner());
        usize::try_from(index)
            .ok()
            .and_then(|i| bat.get(i).copied())
            .ok_or_else(|| self.io_error(0, format!("BAT index {index} is out of range")))
    }

    /// The BAT and metadata regions.
    pub fn regions(&self) -> &Regions {
        &self.regions
    }

    /// The creator string of the file identifier.
    pub fn creator(&self) -> Option<&str> {
        self.creator.as_deref()
    }

    /// What the in-memory log replay did at open, if the log held anything.
    pub fn replayed(&self) -> Option<&ReplaySummary> {
        self.replay.as_ref()
    }

    /// The host file.
    pub fn file(&self) -> &Arc<HostFile> {
        self.view.file()
    }

    /// Where the range at `offset` (at most `max` bytes) comes from, and for how long.
    pub(crate) fn map(&self, offset: u64, max: u64) -> Result<(Source, u64)> {
        let bs = self.params.block_size as u64;
        let block = offset / bs;
        let in_block = offset % bs;
        let block_end = ((block + 1) * bs).min(self.size());
        let len = max.min(block_end - offset);
        let ratio = self.params.chunk_ratio();
        let entry = self.bat_entry(bat::payload_index(block, ratio))?;
        let diff = self.params.has_parent;
        let state = PayloadState::from_bits(entry).ok_or_else(|| {
            self.io_error(
                offset,
                format!("BAT entry of block {block} has a reserved state"),
            )
        })?;
        let source = match state {
            PayloadState::FullyPresent => Source::Data(bat::file_offset(entry) + in_block),
            PayloadState::NotPresent | PayloadState::Undefined if diff => Source::Parent,
            PayloadState::NotPresent | PayloadState::Undefined => Source::Zero { allocated: false },
            PayloadState::Zero | PayloadState::Unmapped => Source::Zero { allocated: diff },
            PayloadState::PartiallyPresent if !diff => {
                return Err(self.io_error(
                    offset,
                    format!("block {block} is PARTIALLY_PRESENT in an image without a parent"),
                ))
            }
            PayloadState::PartiallyPresent => {
                return self.map_partial(block, in_block, len, bat::file_offset(entry));
            }
        };
        Ok((source, len))
    }

    /// Maps inside a PARTIALLY_PRESENT block by its sector bitmap.
    fn map_partial(&self, block: u64, in_block: u64, len: u64, host: u64) -> Result<(Source, u64)> {
        let ratio = self.params.chunk_ratio();
        let sector = self.params.logical_sector_size as u64;
        let sb = self.bat_entry(bat::bitmap_index(block, ratio))?;
        if bat::state_bits(sb) != bat::SB_PRESENT {
            return Err(self.io_error(
                block * self.params.block_size as u64,
                format!("block {block} is PARTIALLY_PRESENT but its chunk has no sector bitmap"),
            ));
        }
        let first = ((block % ratio) * self.params.block_size as u64 + in_block) / sector;
        let last = ((block % ratio) * self.params.block_size as u64 + in_block + len - 1) / sector;
        let mut bits = vec![0u8; (last / 8 - first / 8 + 1) as usize];
        self.view
            .read_at(&mut bits, bat::file_offset(sb) + first / 8)?;
        let bit = |s: u64| bits[(s / 8 - first / 8) as usize] >> (s % 8) & 1 == 1;
        let present = bit(first);
        let mut end = first + 1;
        while end <= last && bit(end) == present {
            end += 1;
        }
        let run_end_in_block = end * sector - (block % ratio) * self.params.block_size as u64;
        let run = (run_end_in_block - in_block).min(len);
        let source = if present {
            Source::Data(host + in_block)
        } else {
            Source::Parent
        };
        Ok((source, run))
    }

    pub(crate) fn io_error(&self, offset: u64, why: String) -> Error {
        Error::corrupt("read", why)
            .with_path(&self.path)
            .at_offset(offset)
    }

    fn read_host(&self, buf: &mut [u8], host: u64) -> Result<()> {
        self.view.read_at(buf, host)
    }

    pub(crate) fn read_parent(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(parent) = &self.parent else {
            buf.fill(0);
            return Ok(());
        };
        let inside = parent.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        if inside > 0 {
            parent.read_at(&mut buf[..inside], offset)?;
        }
        buf[inside..].fill(0);
        Ok(())
    }

    pub(crate) fn read_only(&self, op: &'static str) -> Error {
        Error::new(ErrorKind::ReadOnly, op, "the image is open read-only").with_path(&self.path)
    }
}

/// Where the next block goes: past the file's end and every allocated block, 1 MiB aligned.
fn allocation_start(bat: &[u64], params: &DiskParams, file_len: u64) -> u64 {
    let bs = params.block_size as u64;
    let ratio = params.chunk_ratio();
    let used = bat
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(bat::state_bits(**e), 6 | 7))
        .map(|(i, e)| {
            let len = if bat::is_bitmap_index(i as u64, ratio) {
                MIB
            } else {
                bs
            };
            bat::file_offset(*e).saturating_add(len)
        })
        .max()
        .unwrap_or(0);
    used.max(file_len).next_multiple_of(MIB)
}

fn read_regions(view: &Overlaid, path: &Path) -> Result<Regions> {
    let mut first_error = None;
    for off in REGION_TABLE_OFFSETS {
        let mut buf = vec![0u8; REGION_TABLE_SIZE];
        view.read_at(&mut buf, off)?;
        match region::parse(&buf, view.len()) {
            Ok(r) => return Ok(r),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(corrupt(
        path,
        format!("no valid region table: {}", first_error.unwrap_or_default()),
    ))
}

/// The log, the BAT and the metadata region must not overlap each other or the header
/// section.
fn check_layout(header: &Header, r: &Regions) -> std::result::Result<(), String> {
    let mut areas = vec![
        ("header section", 0, HEADER_SECTION),
        ("BAT region", r.bat.offset, r.bat.length as u64),
        (
            "metadata region",
            r.metadata.offset,
            r.metadata.length as u64,
        ),
    ];
    if header.log_length > 0 {
        areas.push(("log", header.log_offset, header.log_length as u64));
    }
    for (i, a) in areas.iter().enumerate() {
        for b in &areas[i + 1..] {
            if overlaps(a.1, a.2, b.1, b.2) {
                return Err(format!("the {} overlaps the {}", a.0, b.0));
            }
        }
    }
    Ok(())
}

/// The disk parameters, and the file offset of the virtual disk size value (resize rewrites
/// it).
fn read_metadata(view: &Overlaid, regions: &Regions, path: &Path) -> Result<(DiskParams, u64)> {
    let region = regions.metadata;
    let mut table = vec![0u8; metadata::TABLE_SIZE];
    view.read_at(&mut table, region.offset)?;
    let entries = metadata::parse_table(&table, region.length).map_err(|w| corrupt(path, w))?;
    let read_item = |guid| -> Result<Option<Vec<u8>>> {
        let Some(e) = entries.iter().find(|e| e.item == guid && !e.is_user) else {
            return Ok(None);
        };
        let mut value = vec![0u8; e.length as usize];
        view.read_at(&mut value, region.offset + e.offset as u64)?;
        Ok(Some(value))
    };
    let fp = read_item(metadata::FILE_PARAMETERS)?;
    let size = read_item(metadata::VIRTUAL_DISK_SIZE)?;
    let page83 = read_item(metadata::PAGE_83)?;
    let logical = read_item(metadata::LOGICAL_SECTOR_SIZE)?;
    let physical = read_item(metadata::PHYSICAL_SECTOR_SIZE)?;
    let locator = read_item(metadata::PARENT_LOCATOR)?;
    let size_at = entries
        .iter()
        .find(|e| e.item == metadata::VIRTUAL_DISK_SIZE && !e.is_user)
        .map(|e| region.offset + e.offset as u64)
        .unwrap_or_default();
    let params = metadata::validate(
        fp.as_deref(),
        size.as_deref(),
        page83.as_deref(),
        logical.as_deref(),
        physical.as_deref(),
        locator.as_deref(),
    )
    .map_err(|w| corrupt(path, w))?;
    Ok((params, size_at))
}

fn read_bat(
    view: &Overlaid,
    regions: &Regions,
    params: &DiskParams,
    path: &Path,
) -> Result<Vec<u64>> {
    let entries = params.bat_entries();
    let bytes = entries
        .checked_mul(8)
        .filter(|&b| b <= regions.bat.length as u64)
        .ok_or_else(|| {
            corrupt(
                path,
                format!(
                    "the BAT region ({} bytes) is too small for {entries} entries",
                    regions.bat.length
                ),
            )
        })?;
    // Bounded by the region length, which the region table check bounded by the file length.
    let mut raw = vec![0u8; bytes as usize];
    view.read_at(&mut raw, regions.bat.offset)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// Every allocated block must lie inside the file, outside the metadata structures and
/// apart from every other block.
fn check_bat(
    bat: &[u64],
    params: &DiskParams,
    header: &Header,
    regions: &Regions,
    file_len: u64,
) -> Vec<(u64, String)> {
    let ratio = params.chunk_ratio();
    let bs = params.block_size as u64;
    let mut problems = Vec::new();
    let mut used: Vec<(u64, u64, u64)> = Vec::new();
    for (index, &entry) in bat.iter().enumerate() {
        let index = index as u64;
        match entry_extent(index, entry, params, ratio, bs) {
            Ok(None) => {}
            Err(why) => problems.push((index, why)),
            Ok(Some((len, what))) => {
                let off = bat::file_offset(entry);
                let mut fault = None;
                if off < HEADER_SECTION {
                    fault = Some(format!(
                        "BAT entry {index} places a {what} inside the header section"
                    ));
                } else if off.checked_add(len).is_none_or(|end| end > file_len) {
                    fault = Some(format!(
                        "BAT entry {index} places a {what} at {off}, past the end of the file ({file_len} bytes): the image was probably truncated"
                    ));
                }
                for (name, start, rlen) in [
                    ("BAT region", regions.bat.offset, regions.bat.length as u64),
                    (
                        "metadata region",
                        regions.metadata.offset,
                        regions.metadata.length as u64,
                    ),
                    ("log", header.log_offset, header.log_length as u64),
                ] {
                    if fault.is_none() && overlaps(off, len, start, rlen) {
                        fault = Some(format!("BAT entry {index} places a {what} over the {name}"));
                    }
                }
                match fault {
                    Some(why) => problems.push((index, why)),
                    None => used.push((off, len, index)),
                }
            }
        }
    }
    used.sort_unstable();
    for pair in used.windows(2) {
        if overlaps(pair[0].0, pair[0].1, pair[1].0, pair[1].1) {
            problems.push((
                pair[1].2,
                format!(
                    "BAT entries {} and {} place blocks over each other",
                    pair[0].2, pair[1].2
                ),
            ));
        }
    }
    problems.sort_by_key(|p| p.0);
    problems.dedup_by_key(|p| p.0);
    problems
}

/// The length and kind of the file range BAT entry `index` occupies (`None`: none).
fn entry_extent(
    index: u64,
    entry: u64,
    params: &DiskParams,
    ratio: u64,
    bs: u64,
) -> std::result::Result<Option<(u64, &'static str)>, String> {
    let state = bat::state_bits(entry);
    if bat::is_bitmap_index(index, ratio) {
        return match state {
            0 => Ok(None),
            bat::SB_PRESENT if params.has_parent => Ok(Some((MIB, "sector bitmap block"))),
            bat::SB_PRESENT => Err(format!(
                "BAT entry {index} has a sector bitmap in an image without a parent"
            )),
            _ => Err(format!("BAT entry {index} has reserved state {state}")),
        };
    }
    let block = index - index / (ratio + 1);
    match PayloadState::from_bits(state) {
        None => Err(format!("BAT entry {index} has reserved state {state}")),
        Some(s) if !s.has_offset() => Ok(None),
        Some(_) => {
            let start = block * bs;
            Ok(Some((
                bs.min(params.virtual_size.saturating_sub(start)),
                "payload block",
            )))
        }
    }
}

impl BlockDev for VhdxImage {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range("read", self.size(), offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (source, len) = self.map(pos, (buf.len() - done) as u64)?;
            let out = &mut buf[done..done + len as usize];
            match source {
                Source::Data(host) => self.read_host(out, host)?,
                Source::Zero { .. } => out.fill(0),
                Source::Parent => self.read_parent(out, pos)?,
            }
            done += len as usize;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_impl(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.zero_impl(offset, len, Some(mode))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_impl(offset, len, None)
    }

    fn flush(&self) -> Result<()> {
        self.flush_impl()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range("block status", self.size(), offset, len)?;
        if len == 0 {
            return Err(Error::invalid("block status", "empty range").at_offset(offset));
        }
        let (source, mut run) = self.map(offset, len)?;
        while run < len {
            let (next, n) = self.map(offset + run, len - run)?;
            if !source.continued_by(next, run) {
                break;
            }
            run += n;
        }
        let mut st = BlockStatus {
            offset,
            len: run,
            data: false,
            zero: false,
            allocated: false,
            compressed: false,
            host: None,
        };
        match source {
            Source::Data(host) => {
                st.data = true;
                st.allocated = true;
                st.host = Some(HostLocation {
                    file: self.path.clone(),
                    offset: host,
                });
            }
            Source::Zero { allocated } => {
                st.zero = true;
                st.allocated = allocated;
            }
            Source::Parent => st.zero = self.parent.is_none(),
        }
        Ok(st)
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        self.resize_impl(new_size, prealloc)
    }

    fn info(&self) -> Result<ImageInfo> {
        let locator = self.params.parent_locator.as_ref();
        Ok(ImageInfo {
            format: "vhdx".into(),
            filename: self.path.clone(),
            virtual_size: self.size(),
            actual_size: Some(self.file().allocated_bytes()?),
            file_length: Some(self.file().len()?),
            cluster_size: Some(self.params.block_size as u64),
            backing_filename: locator.and_then(|l| l.display_path()).map(str::to_string),
            full_backing_filename: locator.map(|l| {
                parent::locate(&self.path, l).unwrap_or_else(|_| {
                    l.candidates(&self.path)
                        .into_iter()
                        .next()
                        .unwrap_or_default()
                })
            }),
            ..ImageInfo::default()
        })
    }

    fn backing(&self) -> Option<Arc<dyn BlockDev>> {
        self.parent.clone()
    }

    fn resolve_read(&self, offset: u64, len: u64) -> Result<Vec<ReadSegment>> {
        check_range("resolve read", self.size(), offset, len)?;
        let mut out: Vec<ReadSegment> = Vec::new();
        let mut done = 0;
        while done < len {
            let (source, n) = self.map(offset + done, len - done)?;
            let seg = match source {
                Source::Data(host) if self.view.untouched(host, n) => ReadSegment::Host {
                    file: Arc::clone(self.file()),
                    offset: host,
                    len: n,
                },
                Source::Zero { .. } => ReadSegment::Zero { len: n },
                Source::Parent if self.parent.is_none() => ReadSegment::Zero { len: n },
                _ => ReadSegment::Indirect { len: n },
            };
            match (out.last_mut(), &seg) {
                (
                    Some(ReadSegment::Host {
                        offset: o, len: l, ..
                    }),
                    ReadSegment::Host {
                        offset: o2,
                        len: l2,
                        ..
                    },
                ) if *o + *l == *o2 => *l += l2,
                (Some(ReadSegment::Zero { len: l }), ReadSegment::Zero { len: l2 }) => *l += l2,
                (Some(ReadSegment::Indirect { len: l }), ReadSegment::Indirect { len: l2 }) => {
                    *l += l2
                }
                _ => out.push(seg),
            }
            done += n;
        }
        Ok(out)
    }

    fn has_zero_init(&self) -> bool {
        !self.params.has_parent
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }
}
