//! The raw format: guest byte N is host byte N.
//!
//! Allocation is the file system's: block status comes from `SEEK_DATA`/`SEEK_HOLE`, discard
//! punches holes, write-zeroes punches a hole or zeroes a range with `fallocate`, falling back
//! to writing zeroes where the file system cannot.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::dev::{
    check_range, BlockDev, BlockStatus, HostLocation, ImageInfo, Preallocation, ReadSegment,
    ZeroMode,
};
use crate::error::{Error, ErrorKind, Result};
use crate::file::HostFile;
use crate::format::{CreateOptions, Format, Measurement, OpenOptions};

/// The raw format driver.
#[derive(Debug, Default, Clone, Copy)]
pub struct RawFormat;

/// qemu writes the first block of a new raw image so that `O_DIRECT` alignment probing works
/// on it; `map` then shows it as data. We do the same so both tools agree on new files.
const FIRST_BLOCK: u64 = 4096;

impl Format for RawFormat {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn probe(&self, _header: &[u8], _path: &Path) -> u32 {
        // Anything is a valid raw image; probing should pick raw only when nothing else fits.
        1
    }

    fn open(&self, path: &Path, options: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
        Ok(Arc::new(RawImage::open(path, options)?))
    }

    fn open_option_names(&self) -> &'static [&'static str] {
        &[OFFSET_OPTION, SIZE_OPTION]
    }

    fn create(&self, path: &Path, mut options: CreateOptions) -> Result<()> {
        let prealloc = options.take_preallocation()?;
        if prealloc == Preallocation::Metadata {
            return Err(Error::invalid(
                "create",
                "Unsupported preallocation mode: metadata (raw images have no metadata; use off, falloc or full)",
            ));
        }
        // Accepted for compatibility; they tune host file systems we do not touch.
        options.take("extent_size_hint");
        options.take("nocow");
        options.reject_leftovers("raw")?;
        let file = HostFile::create(path, crate::CacheMode::Writeback, crate::EngineChoice::Sync)?;
        preallocate(&file, 0, options.size, prealloc)?;
        // qemu-img writes the first block for off and falloc alike (`full` wrote everything
        // already); after fallocate the reserved range is unwritten, so without it `map`
        // would show no data at all, unlike qemu's images.
        if matches!(prealloc, Preallocation::Off | Preallocation::Falloc) && options.size > 0 {
            allocate_first_block(&file, options.size)?;
        }
        file.flush()
    }

    fn measure(
        &self,
        options: CreateOptions,
        source: Option<&dyn BlockDev>,
    ) -> Result<Measurement> {
        // A raw image needs exactly its guest size, whatever the source holds, and qemu
        // counts it in whole sectors.
        let size = source.map_or(options.size, |dev| dev.size());
        let required = size.checked_next_multiple_of(512).unwrap_or(size);
        Ok(Measurement {
            required,
            fully_allocated: required,
            bitmaps: None,
        })
    }

    fn create_options_shown(&self) -> Vec<(&'static str, Option<&'static str>)> {
        // qemu's option table order (the raw format's, then the file protocol's).
        vec![
            ("size", None),
            ("nocow", None),
            ("preallocation", None),
            ("extent_size_hint", None),
        ]
    }

    fn create_options_help(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("size", "Virtual disk size"),
            (
                "preallocation",
                "Preallocation mode (allowed values: off, falloc, full)",
            ),
            (
                "extent_size_hint",
                "Extent size hint for the image file, 0 to disable (accepted, not used)",
            ),
            (
                "nocow",
                "Turn off copy-on-write (valid only on btrfs; accepted, not used)",
            ),
        ]
    }
}

fn allocate_first_block(file: &HostFile, size: u64) -> Result<()> {
    let len = size.min(FIRST_BLOCK) as usize;
    let zeroes = vec![0u8; len];
    file.write_at(&zeroes, 0)
}

/// Extends `file` from `from` to `to` bytes as `prealloc` asks.
fn preallocate(file: &HostFile, from: u64, to: u64, prealloc: Preallocation) -> Result<()> {
    if to <= from {
        return Ok(());
    }
    match prealloc {
        Preallocation::Off | Preallocation::Metadata => file.set_len(to),
        Preallocation::Falloc => match file.allocate(from, to - from) {
            Err(e) if e.kind() == ErrorKind::Unsupported => Err(Error::unsupported(
                "preallocate",
                "the file system does not support fallocate: use preallocation=full",
            )
            .with_path(file.path())),
            other => other,
        },
        Preallocation::Full => {
            file.set_len(to)?;
            file.write_zero_bytes(from, to - from)
        }
    }
}

/// The open option that makes the image start at this byte of its file.
const OFFSET_OPTION: &str = "offset";
/// The open option that makes the image this many bytes long (fixed: it cannot be resized).
const SIZE_OPTION: &str = "size";

/// An opened raw image: the whole file, or the window of it that the `offset` and `size`
/// open options choose (a partition inside a disk image, a disk inside an archive).
#[derive(Debug)]
pub struct RawImage {
    file: Arc<HostFile>,
    /// Where guest byte 0 lives in the file.
    start: u64,
    size: AtomicU64,
    /// Whether `size` was given, which pins the guest size: qemu refuses to resize then.
    fixed_size: bool,
    read_only: bool,
}

/// Reads the `offset`/`size` open option `key`, spelled as qemu spells sizes.
fn window_option(options: &OpenOptions, key: &str) -> Result<Option<u64>> {
    let Some(text) = options.driver_options.get(key) else {
        return Ok(None);
    };
    crate::size::qemu_strtosz(text)
        .map(Some)
        .map_err(|e| Error::invalid("open", crate::size::size_refusal(key, text, e)))
}

/// The guest window `(start, size)` within a file of `file_len` bytes, checked as qemu's
/// raw driver checks it.
fn window(file_len: u64, offset: Option<u64>, size: Option<u64>) -> Result<(u64, u64)> {
    let start = offset.unwrap_or(0);
    if start > file_len {
        return Err(Error::invalid(
            "open",
            format!(
                "Offset ({start}) cannot be greater than size of the containing file ({file_len})"
            ),
        ));
    }
    let Some(size) = size else {
        return Ok((start, file_len - start));
    };
    if size % 512 != 0 {
        return Err(Error::invalid(
            "open",
            "Specified size is not multiple of 512",
        ));
    }
    if start.checked_add(size).is_none_or(|end| end > file_len) {
        // qemu's wording, its double space included, for scripts that match it.
        return Err(Error::invalid(
            "open",
            format!(
                "The sum of offset ({start}) and size ({size}) has to be smaller or equal to the  actual size of the containing file ({file_len})"
            ),
        ));
    }
    Ok((start, size))
}

impl RawImage {
    /// Opens `path` as a raw image.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Self> {
        let offset = window_option(options, OFFSET_OPTION).map_err(|e| e.with_path(path))?;
        let fixed = window_option(options, SIZE_OPTION).map_err(|e| e.with_path(path))?;
        let file = HostFile::open(path, options.writable, options.cache, options.engine)?;
        let (start, size) = window(file.len()?, offset, fixed).map_err(|e| e.with_path(path))?;
        Ok(RawImage {
            file: Arc::new(file),
            start,
            size: AtomicU64::new(size),
            fixed_size: fixed.is_some(),
            read_only: !options.writable,
        })
    }

    /// The host file behind the image.
    pub fn file(&self) -> &Arc<HostFile> {
        &self.file
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        if self.read_only {
            Err(
                Error::new(ErrorKind::ReadOnly, op, "the image is open read-only")
                    .with_path(self.file.path()),
            )
        } else {
            Ok(())
        }
    }
}

impl BlockDev for RawImage {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range("read", self.size(), offset, buf.len() as u64)?;
        self.file.read_at(buf, self.start + offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable("write")?;
        check_range("write", self.size(), offset, buf.len() as u64)?;
        self.file.write_at(buf, self.start + offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.check_writable("write zeroes")?;
        check_range("write zeroes", self.size(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let offset = self.start + offset;
        let attempt = match mode {
            ZeroMode::MayUnmap => self.file.punch_hole(offset, len),
            ZeroMode::KeepAllocated => self.file.zero_range(offset, len),
        };
        match attempt {
            Ok(()) => Ok(()),
            // Only "this file system cannot" falls back: a real I/O error (EIO, ENOSPC) must
            // reach the caller rather than be retried as a slow write of zeroes.
            Err(e) if matches!(e.kind(), ErrorKind::Unsupported | ErrorKind::InvalidInput) => {
                self.file.write_zero_bytes(offset, len)
            }
            Err(e) => Err(e),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("discard")?;
        check_range("discard", self.size(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // Discard is advisory; a file system that cannot punch holes keeps the data.
        match self.file.punch_hole(self.start + offset, len) {
            Err(e) if matches!(e.kind(), ErrorKind::Unsupported | ErrorKind::InvalidInput) => {
                Ok(())
            }
            other => other,
        }
    }

    fn flush(&self) -> Result<()> {
        self.file.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let size = self.size();
        check_range("block status", size, offset, len)?;
        if len == 0 {
            return Err(Error::invalid("block status", "empty range").at_offset(offset));
        }
        let end = offset + len;
        let data_extent = |run: u64| BlockStatus {
            offset,
            len: run,
            data: true,
            zero: false,
            allocated: true,
            compressed: false,
            host: Some(HostLocation {
                file: self.file.path().to_path_buf(),
                offset: self.start + offset,
            }),
        };
        // The file system answers in file offsets; the window maps them back.
        let host = self.start + offset;
        let (is_data, run_end) = match self.file.next_data(host) {
            Err(e) if e.kind() == ErrorKind::Unsupported => (true, end),
            Err(e) => return Err(e),
            // Only a hole up to the end of the file.
            Ok(None) => (false, end),
            Ok(Some(data)) if data > host => (false, (data - self.start).min(end)),
            Ok(Some(_)) => {
                let hole = self
                    .file
                    .next_hole(host)?
                    .map_or(end, |hole| hole - self.start);
                (true, hole.clamp(offset + 1, end))
            }
        };
        if is_data {
            Ok(data_extent(run_end - offset))
        } else {
            let mut st = data_extent(run_end - offset);
            st.data = false;
            st.zero = true;
            Ok(st)
        }
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        self.check_writable("resize")?;
        if prealloc == Preallocation::Metadata {
            return Err(Error::invalid(
                "resize",
                "Unsupported preallocation mode: metadata (raw images have no metadata)",
            ));
        }
        if self.fixed_size {
            return Err(Error::unsupported(
                "resize",
                "Cannot resize fixed-size raw disks",
            ));
        }
        let old = self.size();
        let host_end = self
            .start
            .checked_add(new_size)
            .ok_or_else(|| Error::invalid("resize", "the new size is too large"))?;
        if new_size < old {
            if prealloc != Preallocation::Off {
                return Err(Error::invalid(
                    "resize",
                    "Preallocation can only be used when growing an image",
                ));
            }
            self.file.set_len(host_end)?;
        } else {
            preallocate(&self.file, self.start + old, host_end, prealloc)?;
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            format: "raw".into(),
            filename: self.file.path().to_path_buf(),
            virtual_size: self.size(),
            actual_size: Some(self.file.allocated_bytes()?),
            file_length: Some(self.file.len()?),
            ..ImageInfo::default()
        })
    }

    fn has_zero_init(&self) -> bool {
        true
    }

    fn request_alignment(&self) -> u64 {
        self.file.alignment() as u64
    }

    fn resolve_read(&self, offset: u64, len: u64) -> Result<Vec<ReadSegment>> {
        check_range("resolve read", self.size(), offset, len)?;
        Ok(vec![ReadSegment::Host {
            file: Arc::clone(&self.file),
            offset: self.start + offset,
            len,
        }])
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}
