//! Host files and the engines that move their bytes.
//!
//! [`HostFile`] is the one way the block layer touches a host file. Data moves through one of
//! two engines chosen at open time:
//! - **sync**: `pread`/`pwrite` from the calling thread; many threads may call at once;
//! - **io_uring**: requests go through a small pool of rings; [`HostFile::submit`] pushes a
//!   whole batch with a bounded number in flight, which is what deep-queue callers want.
//!
//! `EngineChoice::Auto` tries io_uring and falls back to sync when the kernel refuses it
//! (seccomp, `io_uring_disabled`, old kernels); the reason is kept for `info`/debug output.
//!
//! Cache modes follow qemu-img's names. `none` and `directsync` open with `O_DIRECT`: requests
//! that are not aligned to the device's logical block go through a second, buffered descriptor
//! (the kernel writes back and invalidates the page cache around direct I/O, so both views
//! stay coherent) instead of failing with `EINVAL`.

mod aligned;
mod cache;
mod uring;

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use aligned::AlignedBuf;
pub use cache::CacheMode;

use crate::error::{Error, ErrorKind, Result};

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

/// An open host file with its cache mode and data engine.
#[derive(Debug)]
pub struct HostFile {
    path: PathBuf,
    file: File,
    /// Buffered descriptor for requests `O_DIRECT` cannot take; `None` when not direct.
    buffered: Option<File>,
    cache: CacheMode,
    writable: bool,
    align: usize,
    uring: Option<uring::RingPool>,
    engine_note: Option<String>,
}

impl HostFile {
    /// Opens an existing file.
    pub fn open(
        path: &Path,
        writable: bool,
        cache: CacheMode,
        engine: EngineChoice,
    ) -> Result<Self> {
        Self::open_with(path, writable, false, cache, engine)
    }

    /// Creates (or truncates) a file for writing.
    pub fn create(path: &Path, cache: CacheMode, engine: EngineChoice) -> Result<Self> {
        Self::open_with(path, true, true, cache, engine)
    }

    fn open_with(
        path: &Path,
        writable: bool,
        create: bool,
        cache: CacheMode,
        engine: EngineChoice,
    ) -> Result<Self> {
        let op = if create { "create" } else { "open" };
        let mut opts = FsOpenOptions::new();
        opts.read(true).write(writable);
        if create {
            opts.create(true).truncate(true);
        }
        let base_flags = if cache.dsync() { libc::O_DSYNC } else { 0 };
        let buffered_opts = {
            let mut o = opts.clone();
            o.custom_flags(base_flags);
            o
        };
        let mut direct_opts = opts.clone();
        direct_opts.custom_flags(base_flags | if cache.direct() { libc::O_DIRECT } else { 0 });
        let file = direct_opts
            .open(path)
            .map_err(|e| Error::io(op, e).with_path(path))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(op, e).with_path(path))?;
        if meta.is_dir() {
            return Err(Error::invalid(op, "is a directory, not a disk image file").with_path(path));
        }
        let buffered = if cache.direct() {
            let mut reopen = buffered_opts;
            reopen.truncate(false).create(false);
            Some(
                reopen
                    .open(path)
                    .map_err(|e| Error::io(op, e).with_path(path))?,
            )
        } else {
            None
        };
        let align = if cache.direct() {
            probe_direct_alignment(&file)
        } else {
            1
        };
        let (uring, engine_note) = match engine {
            EngineChoice::Sync => (None, None),
            EngineChoice::IoUring => match uring::RingPool::new(&file) {
                Ok(pool) => (Some(pool), None),
                Err(e) => {
                    return Err(Error::io(op, e)
                        .with_path(path)
                        .with_source(io::Error::other(
                            "io_uring was requested but the kernel refused it",
                        )))
                }
            },
            EngineChoice::Auto => match uring::RingPool::new(&file) {
                Ok(pool) => (Some(pool), None),
                Err(e) => (
                    None,
                    Some(format!("io_uring unavailable ({e}); using pread/pwrite")),
                ),
            },
        };
        Ok(HostFile {
            path: path.to_path_buf(),
            file,
            buffered,
            cache,
            writable,
            align,
            uring,
            engine_note,
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

    /// Alignment that requests need to avoid the buffered fallback (1 unless `O_DIRECT`).
    pub fn alignment(&self) -> usize {
        self.align
    }

    fn aligned(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        let a = self.align;
        a <= 1 || ((ptr as usize) % a == 0 && len % a == 0 && offset % a as u64 == 0)
    }

    /// The descriptor to use for one request: the direct one when the request fits its rules.
    fn fd_for(&self, ptr: *const u8, len: usize, offset: u64) -> &File {
        match &self.buffered {
            Some(b) if !self.aligned(ptr, len, offset) => b,
            _ => &self.file,
        }
    }

    fn err(&self, op: &'static str, e: io::Error, offset: u64) -> Error {
        Error::io(op, e).with_path(&self.path).at_offset(offset)
    }

    /// Fills `buf` from `offset`; reading past the end of the file is an error.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut ops = [IoOp::Read { buf, offset }];
        self.submit(&mut ops)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut ops = [IoOp::Write { buf, offset }];
        self.submit(&mut ops)
    }

    /// Runs a batch of requests. With io_uring they are in flight together (bounded by the
    /// ring depth); with sync they run one after another on this thread. All complete before
    /// it returns; the first failure is reported.
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
        if let Some(pool) = &self.uring {
            // Requests O_DIRECT cannot take go through the buffered descriptor synchronously.
            let (direct, fallback): (Vec<_>, Vec<_>) = ops.iter_mut().partition(|op| match op {
                IoOp::Read { buf, offset } => self.aligned(buf.as_ptr(), buf.len(), *offset),
                IoOp::Write { buf, offset } => self.aligned(buf.as_ptr(), buf.len(), *offset),
            });
            for op in fallback {
                self.run_sync(op)?;
            }
            if !direct.is_empty() {
                pool.run(&self.file, direct)
                    .map_err(|(e, off)| self.err("io_uring request", e, off))?;
            }
            return Ok(());
        }
        for op in ops.iter_mut() {
            self.run_sync(op)?;
        }
        Ok(())
    }

    fn run_sync(&self, op: &mut IoOp<'_>) -> Result<()> {
        match op {
            IoOp::Read { buf, offset } => {
                let fd = self.fd_for(buf.as_ptr(), buf.len(), *offset);
                fd.read_exact_at(buf, *offset)
                    .map_err(|e| self.err("read", eof_message(e), *offset))
            }
            IoOp::Write { buf, offset } => {
                let fd = self.fd_for(buf.as_ptr(), buf.len(), *offset);
                fd.write_all_at(buf, *offset)
                    .map_err(|e| self.err("write", e, *offset))
            }
        }
    }

    /// Makes written data durable (`fdatasync`), except in cache mode `unsafe`.
    pub fn flush(&self) -> Result<()> {
        if self.cache == CacheMode::Unsafe || !self.writable {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io("flush", e).with_path(&self.path))
    }

    /// Current length of the file.
    pub fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io("stat", e).with_path(&self.path))
    }

    /// True when the file is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Bytes the file occupies on the host (`st_blocks * 512`).
    pub fn allocated_bytes(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file
            .metadata()
            .map(|m| m.blocks() * 512)
            .map_err(|e| Error::io("stat", e).with_path(&self.path))
    }

    /// Sets the file's length (growing leaves a hole).
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io("truncate", e).with_path(&self.path))
    }

    fn fallocate(
        &self,
        op: &'static str,
        mode: libc::c_int,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        };
        let _ = op;
        loop {
            // SAFETY: fallocate takes a valid descriptor we own and plain integers.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Deallocates a range so it reads as zeroes. Fails with `Unsupported` where the file
    /// system cannot punch holes.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.fallocate(
            "punch hole",
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
        .map_err(|e| self.err("punch hole", e, offset))
    }

    /// Zeroes a range keeping it allocated (`FALLOC_FL_ZERO_RANGE`); may grow the file.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        self.fallocate("zero range", libc::FALLOC_FL_ZERO_RANGE, offset, len)
            .map_err(|e| self.err("zero range", e, offset))
    }

    /// Reserves space for a range without writing it (`fallocate` mode 0); may grow the file.
    pub fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.fallocate("allocate", 0, offset, len)
            .map_err(|e| self.err("allocate", e, offset))
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
        self.seek(libc::SEEK_DATA, offset)
    }

    /// The first offset at or after `offset` inside a hole (`SEEK_HOLE`); the end of the file
    /// counts as a hole.
    pub fn next_hole(&self, offset: u64) -> Result<Option<u64>> {
        self.seek(libc::SEEK_HOLE, offset)
    }

    fn seek(&self, whence: libc::c_int, offset: u64) -> Result<Option<u64>> {
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Ok(None);
        };
        // SAFETY: lseek takes a valid descriptor we own and plain integers. The file position
        // it moves is never used: all data I/O is positional.
        let rc = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if rc >= 0 {
            return Ok(Some(rc as u64));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Err(Error::unsupported(
                "seek data/hole",
                "the file system cannot report holes",
            )
            .with_path(&self.path)),
            _ => Err(self.err("seek data/hole", err, offset)),
        }
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

/// The logical block size `O_DIRECT` needs: 4096 is safe everywhere; try 512 first.
fn probe_direct_alignment(file: &File) -> usize {
    for align in [512usize, 4096] {
        let mut buf = AlignedBuf::zeroed(align, align);
        match file.read_at(buf.as_mut_slice(), 0) {
            Ok(_) => return align,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(_) => return align,
        }
    }
    4096
}
