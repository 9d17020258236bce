//! Safe wrappers over the system calls a host file needs beyond `std`, retried on `EINTR`.
//!
//! They go through `rustix`, so the block layer's only `unsafe` is the io_uring engine.

use std::fs::File;
use std::io;

use rustix::fs::{AtFlags, FallocateFlags, SeekFrom, StatxFlags};
use rustix::io::Errno;

/// Runs `call` again while it fails with `EINTR`.
fn retry<T>(mut call: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(Errno::INTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// What `fallocate` should do with a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Falloc {
    /// Reserve space, growing the file if the range ends past it.
    Allocate,
    /// Deallocate, keeping the file size.
    PunchHole,
    /// Zero in place keeping the blocks allocated; may grow the file.
    ZeroRange,
}

/// `fallocate(2)` on `file`.
pub(super) fn fallocate(file: &File, what: Falloc, offset: u64, len: u64) -> io::Result<()> {
    // The kernel takes signed offsets; reject what it would misread as negative.
    if i64::try_from(offset).is_err()
        || offset
            .checked_add(len)
            .is_none_or(|end| i64::try_from(end).is_err())
    {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    }
    let flags = match what {
        Falloc::Allocate => FallocateFlags::empty(),
        Falloc::PunchHole => FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        Falloc::ZeroRange => FallocateFlags::ZERO_RANGE,
    };
    retry(|| rustix::fs::fallocate(file, flags, offset, len))
}

/// Which kind of region `seek_region` looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Region {
    /// `SEEK_DATA`.
    Data,
    /// `SEEK_HOLE` (the end of the file counts as a hole).
    Hole,
}

/// `lseek(SEEK_DATA/SEEK_HOLE)`: the first offset at or after `offset` of that kind, or `None`
/// when `offset` is at or past the end of the file (`ENXIO`). The file position it moves is
/// never used: all data I/O is positional.
pub(super) fn seek_region(file: &File, region: Region, offset: u64) -> io::Result<Option<u64>> {
    if i64::try_from(offset).is_err() {
        return Ok(None);
    }
    let pos = match region {
        Region::Data => SeekFrom::Data(offset),
        Region::Hole => SeekFrom::Hole(offset),
    };
    match retry(|| rustix::fs::seek(file, pos)) {
        Ok(found) => Ok(Some(found)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The alignment `O_DIRECT` needs on this file as the kernel reports it (`STATX_DIOALIGN`,
/// Linux 6.1+): the larger of the memory and the offset alignment. `None` when the kernel or
/// file system does not say.
pub(super) fn direct_io_alignment(file: &File) -> Option<usize> {
    let st = rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN).ok()?;
    if !StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::DIOALIGN) {
        return None;
    }
    let align = st.stx_dio_mem_align.max(st.stx_dio_offset_align) as usize;
    (align.is_power_of_two() && align > 1).then_some(align)
}

/// The size of a block device: where its end is (`lseek(SEEK_END)`). The file position it
/// moves is never used: all data I/O is positional.
pub(super) fn device_size(file: &File) -> io::Result<u64> {
    retry(|| rustix::fs::seek(file, SeekFrom::End(0)))
}
