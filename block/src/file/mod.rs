//! Host files and the engines that move their bytes.
//!
//! [`HostFile`] is the one way the block layer touches a host file. Data moves through one of
//! two engines chosen at open time:
//! - **sync**: `pread`/`pwrite` from the calling thread; many threads may call at once;
//! - **io_uring**: requests go through a process-wide pool of rings; [`HostFile::submit`]
//!   pushes a whole batch with a bounded number in flight, which is what deep-queue callers
//!   want.
//!
//! `EngineChoice::Auto` tries io_uring and falls back to sync when the kernel refuses it
//! (seccomp, `io_uring_disabled`, old kernels) or when [`NO_IO_URING_ENV`] is set; the reason
//! is kept for `info`/debug output. `EngineChoice::IoUring` fails to open instead.
//!
//! Cache modes follow qemu-img's names. `none` and `directsync` open with `O_DIRECT`;
//! requests that do not meet its alignment go through aligned bounce buffers (see
//! `direct.rs`) on the same descriptor instead of failing with `EINVAL`. `writethrough` and
//! `directsync` open with `O_DSYNC`; `unsafe` turns flushes into no-ops.
//!
//! Crash tests can record every change made to a file through this type: see [`record`].
//!
//! The only `unsafe` of the block layer is the ring itself (`uring.rs`).
#![deny(unsafe_code)]

mod aligned;
mod cache;
mod direct;
mod rangelock;
pub mod record;
mod sys;
mod uring;

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use aligned::AlignedBuf;
pub use cache::CacheMode;

use crate::error::{Error, ErrorKind, Result};
use rangelock::{RangeGuard, RangeLock};
use sys::{Falloc, Region};

/// Environment variable that, when set to a non-empty value, keeps io_uring off: `Auto`
/// falls back to `pread`/`pwrite` and `IoUring` fails to open. For sandboxes where io_uring
/// misbehaves, and for testing the fallback.
pub const NO_IO_URING_ENV: &str = "VDISK_NO_IO_URING";

/// Which data engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring when the kernel allows it, else sync.
    #[default]
    Auto,
    /// Always `pread`/`pwrite`.
    Sync,
    /// io_uring, failing if the kernel refuses it.
    IoUring,
}

impl EngineChoice {
    /// Parses qemu's `aio=` spelling (`threads`, `io_uring`, `native` is taken as io_uring) or
    /// `auto`/`sync`.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "auto" => Ok(Self::Auto),
            "threads" | "sync" => Ok(Self::Sync),
            "io_uring" | "native" => Ok(Self::IoUring),
            other => Err(Error::invalid(
                "parse aio mode",
                format!("invalid aio mode '{other}': expected threads, io_uring or auto"),
            )),
        }
    }
}

/// The engine a file ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// `pread`/`pwrite`.
    Sync,
    /// io_uring rings.
    IoUring,
}

/// One request of a batch given to [`HostFile::submit`].
#[derive(Debug)]
pub enum IoOp<'a> {
    /// Fill `buf` from `offset`.
    Read {
        /// Destination.
        buf: &'a mut [u8],
        /// Host offset.
        offset: u64,
    },
    /// Write `buf` at `offset`.
    Write {
        /// Source.
        buf: &'a [u8],
        /// Host offset.
        offset: u64,
    },
}

impl IoOp<'_> {
    fn shape(&self) -> (*const u8, usize, u64) {
        match self {
            IoOp::Read { buf, offset } => (buf.as_ptr(), buf.len(), *offset),
            IoOp::Write { buf, offset } => (buf.as_ptr(), buf.len(), *offset),
        }
    }
}

/// An open host file with its cache mode and data engine.
#[derive(Debug)]
pub struct HostFile {
    path: PathBuf,
    file: File,
    cache: CacheMode,
    writable: bool,
    /// `O_DIRECT` alignment of offsets, lengths and buffers; 1 when not direct.
    align: usize,
    uring: Option<&'static uring::RingPool>,
    engine_note: Option<String>,
    /// Serialises overlapping write-like requests of a direct file (see `rangelock.rs`).
    locks: RangeLock,
    /// Where a crash test records this file's changes (see `record.rs`); `None` in use.
    recording: Option<std::sync::Arc<record::Log>>,
}

impl HostFile {
    /// Opens an existing file.
    pub fn open(
        path: &Path,
        writable: bool,
        cache: CacheMode,
        engine: EngineChoice,
    ) -> Result<Self> {
        Self::open_with(path, writable, false, cache, engine, uring_refused_by_env())
    }

    /// Creates (or truncates) a file for writing.
    pub fn create(path: &Path, cache: CacheMode, engine: EngineChoice) -> Result<Self> {
        Self::open_with(path, true, true, cache, engine, uring_refused_by_env())
    }

    fn open_with(
        path: &Path,
        writable: bool,
        create: bool,
        cache: CacheMode,
        engine: EngineChoice,
        uring_refused: bool,
    ) -> Result<Self> {
        let op = if create { "create" } else { "open" };
        let mut opts = FsOpenOptions::new();
        opts.read(true).write(writable);
        if create {
            opts.create(true).truncate(true);
        }
        let mut flags = 0;
        if cache.dsync() {
            flags |= libc::O_DSYNC;
        }
        if cache.direct() {
            flags |= libc::O_DIRECT;
        }
        opts.custom_flags(flags);
        let file = opts.open(path).map_err(|e| {
            if cache.direct() && e.raw_os_error() == Some(libc::EINVAL) {
                Error::unsupported(
                    op,
                    format!(
                        "the file system does not support O_DIRECT, which cache mode '{}' needs; use cache mode writeback",
                        cache.as_str()
                    ),
                )
                .with_path(path)
                .with_source(e)
            } else {
                Error::io(op, e).with_path(path)
            }
        })?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(op, e).with_path(path))?;
        if meta.is_dir() {
            return Err(Error::invalid(op, "is a directory, not a disk image file").with_path(path));
        }
        let align = if cache.direct() {
            direct_alignment(&file)
        } else {
            1
        };
        let (uring, engine_note) =
            start_engine(engine, uring_refused).map_err(|e| e.with_path(path))?;
        let recording = if writable {
            record::recording_for(&meta)
        } else {
            None
        };
        Ok(HostFile {
            path: path.to_path_buf(),
            file,
            cache,
            writable,
            align,
            uring,
            engine_note,
            locks: RangeLock::default(),
            recording,
        })
    }

    /// The path the file was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The engine moving this file's data.
    pub fn engine(&self) -> EngineKind {
        if self.uring.is_some() {
            EngineKind::IoUring
        } else {
            EngineKind::Sync
        }
    }

    /// Why io_uring is not in use, when `Auto` fell back.
    pub fn engine_note(&self) -> Option<&str> {
        self.engine_note.as_deref()
    }

    /// The cache mode the file was opened with.
    pub fn cache(&self) -> CacheMode {
        self.cache
    }

    /// True when opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Alignment of offset, length and buffer address that lets a request skip the bounce
    /// buffer (1 unless `O_DIRECT`).
    pub fn alignment(&self) -> usize {
        self.align
    }

    fn aligned(&self, op: &IoOp<'_>) -> bool {
        let (ptr, len, offset) = op.shape();
        let a = self.align;
        a <= 1
            || ((ptr as usize).is_multiple_of(a)
                && len.is_multiple_of(a)
                && offset.is_multiple_of(a as u64))
    }

    fn err(&self, op: &'static str, e: io::Error, offset: u64) -> Error {
        Error::io(op, e).with_path(&self.path).at_offset(offset)
    }

    /// Holds `[offset, end)` widened to whole blocks against other writes, when direct.
    fn lock_blocks(&self, offset: u64, end: u64) -> Option<RangeGuard<'_>> {
        if self.align <= 1 {
            return None;
        }
        let a = self.align as u64;
        let start = offset / a * a;
        let end = end.checked_next_multiple_of(a).unwrap_or(u64::MAX);
        Some(self.locks.lock(&[(start, end)]))
    }

    /// Fills `buf` from `offset`; reading past the end of the file is an error.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut ops = [IoOp::Read { buf, offset }];
        self.submit(&mut ops)
    }

    /// Writes all of `buf` at `offset` (growing the file if it ends past it).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut ops = [IoOp::Write { buf, offset }];
        self.submit(&mut ops)
    }

    /// Runs a batch of requests. With io_uring they are in flight together (bounded by the
    /// ring depth); with sync they run one after another on this thread. Requests of one
    /// batch run in no particular order, so overlapping writes in a batch leave either
    /// request's bytes. Every request has finished (or was never started) when this returns;
    /// the first failure is reported.
    pub fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<()> {
        for op in ops.iter() {
            if let IoOp::Write { offset, .. } = op {
                if !self.writable {
                    return Err(Error::new(
                        ErrorKind::ReadOnly,
                        "write",
                        "the file is open read-only",
                    )
                    .with_path(&self.path)
                    .at_offset(*offset));
                }
            }
        }
        let Some(mut log) = self.recording.as_ref().and_then(|log| log.live()) else {
            return self.submit_unrecorded(ops);
        };
        self.submit_unrecorded(ops)?;
        log.extend(ops.iter().filter_map(|op| match op {
            IoOp::Write { buf, offset } => Some(record::FileOp::Write {
                offset: *offset,
                data: buf.to_vec(),
            }),
            IoOp::Read { .. } => None,
        }));
        Ok(())
    }

    fn submit_unrecorded(&self, ops: &mut [IoOp<'_>]) -> Result<()> {
        if self.align <= 1 {
            let mut all: Vec<&mut IoOp<'_>> = ops.iter_mut().collect();
            return self.run_engine(&mut all);
        }
        let (mut direct, bounced): (Vec<_>, Vec<_>) = ops
            .iter_mut()
            .filter(|op| op.shape().1 > 0)
            .partition(|op| self.aligned(op));
        for op in bounced {
            self.run_bounced(op)?;
        }
        if direct.is_empty() {
            return Ok(());
        }
        let writes: Vec<(u64, u64)> = direct
            .iter()
            .filter_map(|op| match op {
                IoOp::Write { buf, offset } => {
                    Some((*offset, offset.saturating_add(buf.len() as u64)))
                }
                IoOp::Read { .. } => None,
            })
            .collect();
        let _guard = (!writes.is_empty()).then(|| self.locks.lock(&writes));
        self.run_engine(&mut direct)
    }

    /// Runs requests the descriptor takes as they are, on this file's engine.
    fn run_engine(&self, ops: &mut [&mut IoOp<'_>]) -> Result<()> {
        if let Some(pool) = &self.uring {
            match pool.run(&self.file, ops) {
                Ok(()) => return Ok(()),
                Err(uring::RunError::Failed {
                    error,
                    offset,
                    write,
                }) => {
                    let op = if write { "write" } else { "read" };
                    return Err(self.err(op, eof_message(error), offset));
                }
                // Out of rings (many threads at once, memory limits): nothing was submitted,
                // so the batch can still run the plain way.
                Err(uring::RunError::NoRing) => {}
            }
        }
        for op in ops.iter_mut() {
            self.run_sync(op)?;
        }
        Ok(())
    }

    fn run_sync(&self, op: &mut IoOp<'_>) -> Result<()> {
        match op {
            IoOp::Read { buf, offset } => self
                .file
                .read_exact_at(buf, *offset)
                .map_err(|e| self.err("read", eof_message(e), *offset)),
            IoOp::Write { buf, offset } => self
                .file
                .write_all_at(buf, *offset)
                .map_err(|e| self.err("write", e, *offset)),
        }
    }

    fn run_bounced(&self, op: &mut IoOp<'_>) -> Result<()> {
        match op {
            IoOp::Read { buf, offset } => direct::read(&self.file, self.align, buf, *offset)
                .map_err(|e| self.err("read", eof_message(e), *offset)),
            IoOp::Write { buf, offset } => {
                direct::write(&self.file, self.align, &self.locks, buf, *offset)
                    .map_err(|e| self.err("write", e, *offset))
            }
        }
    }

    /// Makes written data durable (`fdatasync`), except in cache mode `unsafe`.
    pub fn flush(&self) -> Result<()> {
        if self.cache == CacheMode::Unsafe || !self.writable {
            return Ok(());
        }
        let mut log = self.recording.as_ref().and_then(|log| log.live());
        self.file
            .sync_data()
            .map_err(|e| Error::io("flush", e).with_path(&self.path))?;
        if let Some(log) = &mut log {
            log.push(record::FileOp::Flush);
        }
        Ok(())
    }

    /// Current length of the file; for a block device, its size (which `stat` reports as 0).
    pub fn len(&self) -> Result<u64> {
        use std::os::unix::fs::FileTypeExt;
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io("stat", e).with_path(&self.path))?;
        if meta.file_type().is_block_device() {
            return sys::device_size(&self.file)
                .map_err(|e| Error::io("stat", e).with_path(&self.path));
        }
        Ok(meta.len())
    }

    /// True when the file is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Bytes the file occupies on the host (`st_blocks * 512`).
    pub fn allocated_bytes(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.blocks() * 512)
            .map_err(|e| Error::io("stat", e).with_path(&self.path))
    }

    /// Sets the file's length (growing leaves a hole).
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.check_writable("truncate", len)?;
        let _guard = self.lock_blocks(len.min(self.len()?), u64::MAX);
        let mut log = self.recording.as_ref().and_then(|log| log.live());
        self.file
            .set_len(len)
            .map_err(|e| Error::io("truncate", e).with_path(&self.path))?;
        if let Some(log) = &mut log {
            log.push(record::FileOp::SetLen(len));
        }
        Ok(())
    }

    fn check_writable(&self, op: &'static str, offset: u64) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(
                Error::new(ErrorKind::ReadOnly, op, "the file is open read-only")
                    .with_path(&self.path)
                    .at_offset(offset),
            )
        }
    }

    fn fallocate(&self, op: &'static str, what: Falloc, offset: u64, len: u64) -> Result<()> {
        self.check_writable(op, offset)?;
        let _guard = self.lock_blocks(offset, offset.saturating_add(len));
        let mut log = self.recording.as_ref().and_then(|log| log.live());
        sys::fallocate(&self.file, what, offset, len).map_err(|e| {
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
            ) {
                Error::unsupported(op, "the file system does not support this fallocate mode")
                    .with_path(&self.path)
                    .at_offset(offset)
                    .with_source(e)
            } else {
                self.err(op, e, offset)
            }
        })?;
        if let Some(log) = &mut log {
            log.push(record::falloc_op(what, offset, len));
        }
        Ok(())
    }

    /// Deallocates a range so it reads as zeroes. Fails with `Unsupported` where the file
    /// system cannot punch holes.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.fallocate("punch hole", Falloc::PunchHole, offset, len)
    }

    /// Zeroes a range keeping it allocated (`FALLOC_FL_ZERO_RANGE`); may grow the file.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        self.fallocate("zero range", Falloc::ZeroRange, offset, len)
    }

    /// Reserves space for a range without writing it (`fallocate` mode 0); may grow the file.
    pub fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.fallocate("allocate", Falloc::Allocate, offset, len)
    }

    /// Writes zeroes over a range by plain writes (the fallback when fallocate cannot).
    pub fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = AlignedBuf::zeroed(CHUNK as usize, self.align.max(1));
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write_at(&zeroes.as_slice()[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// The first offset at or after `offset` that holds data (`SEEK_DATA`), or `None` when
    /// only a hole follows. `Err(Unsupported)` when the file system cannot tell.
    pub fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        self.seek(Region::Data, offset)
    }

    /// The first offset at or after `offset` inside a hole (`SEEK_HOLE`); the end of the file
    /// counts as a hole.
    pub fn next_hole(&self, offset: u64) -> Result<Option<u64>> {
        self.seek(Region::Hole, offset)
    }

    fn seek(&self, region: Region, offset: u64) -> Result<Option<u64>> {
        sys::seek_region(&self.file, region, offset).map_err(|err| match err.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                Error::unsupported("seek data/hole", "the file system cannot report holes")
                    .with_path(&self.path)
            }
            _ => self.err("seek data/hole", err, offset),
        })
    }
}

fn uring_refused_by_env() -> bool {
    std::env::var_os(NO_IO_URING_ENV).is_some_and(|v| !v.is_empty())
}

/// Starts the engine `choice` asks for: the ring pool (if any) and, when `Auto` fell back,
/// why. `refused` stands in for a kernel that refuses io_uring.
fn start_engine(
    choice: EngineChoice,
    refused: bool,
) -> Result<(Option<&'static uring::RingPool>, Option<String>)> {
    if choice == EngineChoice::Sync {
        return Ok((None, None));
    }
    let pool = if refused {
        Err(io::Error::other(format!(
            "io_uring is disabled by {NO_IO_URING_ENV}"
        )))
    } else {
        uring::RingPool::shared()
    };
    match (pool, choice) {
        (Ok(pool), _) => Ok((Some(pool), None)),
        (Err(e), EngineChoice::IoUring) => Err(Error::unsupported(
            "open",
            format!("io_uring was requested (aio=io_uring) but is not available: {e}"),
        )
        .with_source(e)),
        (Err(e), _) => Ok((
            None,
            Some(format!("io_uring unavailable ({e}); using pread/pwrite")),
        )),
    }
}

fn eof_message(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "read past the end of the file",
        )
    } else {
        e
    }
}

/// The alignment `O_DIRECT` needs: what the kernel reports, else probed by reading the
/// first block. 4096 is safe everywhere, so it is the answer whenever the probe cannot tell
/// (an empty file reads nothing, and the kernel may skip its alignment check then).
fn direct_alignment(file: &File) -> usize {
    if let Some(align) = sys::direct_io_alignment(file) {
        return align;
    }
    for align in [512usize, 4096] {
        let mut buf = AlignedBuf::zeroed(align, align);
        match file.read_at(buf.as_mut_slice(), 0) {
            Ok(n) if n > 0 => return align,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            _ => break,
        }
    }
    4096
}

#[cfg(test)]
mod tests;
