//! Comparing the guest-visible contents of two images, with qemu-img's semantics.
//!
//! Both images are walked by block status so ranges that read as zeroes on both sides are
//! never read. Ranges that must be read are read in chunks of [`IO_BUF_SIZE`] and compared
//! sector by sector, which fixes the offset reported for a mismatch exactly where qemu-img
//! reports it. Without strict mode an unallocated range equals zeroes, and when the sizes
//! differ the tail of the larger image must read as zeroes.

use std::sync::Arc;

use vdisk_block::{BlockDev, Error};

use crate::convert::zero::is_zero;
use crate::map::{chain_status, visible_len, MapEntry, SECTOR};

/// How much qemu-img reads at once; chunks start at block-status boundaries and are at most
/// this long, and mismatch offsets are counted in sectors from the start of a chunk.
pub const IO_BUF_SIZE: u64 = 2 << 20;

/// What a comparison found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The contents are the same.
    Identical,
    /// The first differing sector starts here.
    ContentMismatch(u64),
    /// Strict mode: the sizes differ.
    SizeMismatch,
    /// Strict mode: the allocation status differs in the range starting here.
    StatusMismatch(u64),
}

/// The result of [`compare`]: the outcome and whether the walk reached the tail of the
/// larger image (qemu-img warns that the sizes differ before it checks that tail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// What was found.
    pub outcome: Outcome,
    /// The sizes differ and the common part matched, so the tail was checked.
    pub size_warning: bool,
}

/// Why a comparison could not finish, with qemu-img's exit code for it.
#[derive(Debug)]
pub enum CompareError {
    /// Block status failed for the image with this index (0 or 1): exit code 3.
    Status(usize, Error),
    /// Reading failed for the image with this index at this offset: exit code 4.
    Read(usize, u64, Error),
}

impl CompareError {
    /// qemu-img's exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            CompareError::Status(..) => 3,
            CompareError::Read(..) => 4,
        }
    }
}

/// The flags qemu compares in strict mode; two ranges match only when all agree.
#[derive(Debug, PartialEq, Eq)]
struct StatusKey {
    data: bool,
    zero: bool,
    allocated: bool,
    mapped: bool,
    compressed: bool,
    eof: bool,
}

fn key(e: &MapEntry, end: u64) -> StatusKey {
    StatusKey {
        data: e.data,
        zero: e.zero,
        allocated: e.present,
        mapped: e.offset.is_some(),
        compressed: e.compressed,
        eof: e.start + e.length == end,
    }
}

/// Block status over the whole chain, as `bdrv_block_status_above` sees it: an extent is
/// "allocated" when some layer holds it.
fn status(
    dev: &Arc<dyn BlockDev>,
    which: usize,
    offset: u64,
    end: u64,
) -> Result<MapEntry, CompareError> {
    chain_status(dev, offset, end - offset).map_err(|e| CompareError::Status(which, e))
}

/// Reads `buf.len()` bytes at `offset`; bytes past the device's real end (the partial last
/// sector qemu rounds up to) read as zeroes.
fn read(dev: &dyn BlockDev, which: usize, buf: &mut [u8], offset: u64) -> Result<(), CompareError> {
    let size = dev.size();
    let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(inside);
    if !head.is_empty() {
        dev.read_at(head, offset)
            .map_err(|e| CompareError::Read(which, offset, e))?;
    }
    tail.fill(0);
    Ok(())
}

/// Index of the first sector of `buf` holding a non-zero byte, counted from `buf`'s start.
fn first_nonzero_sector(buf: &[u8]) -> Option<u64> {
    if is_zero(buf) {
        return None;
    }
    buf.chunks(SECTOR as usize)
        .position(|s| !is_zero(s))
        .map(|i| i as u64 * SECTOR)
}

/// Offset (from the chunk start) of the first sector where `a` and `b` differ.
fn first_different_sector(a: &[u8], b: &[u8]) -> Option<u64> {
    if a == b {
        return None;
    }
    a.chunks(SECTOR as usize)
        .zip(b.chunks(SECTOR as usize))
        .position(|(x, y)| x != y)
        .map(|i| i as u64 * SECTOR)
}

/// The cluster size of `dev`, if it has clusters.
fn cluster_size(dev: &dyn BlockDev) -> Option<u64> {
    dev.info().ok()?.cluster_size.filter(|&c| c > 0)
}

/// One read for the helper thread: image index, offset, and the buffer it fills.
struct ReadJob {
    which: usize,
    offset: u64,
    buf: Vec<u8>,
}

/// Reads two ranges at once, one on the calling thread and one on a helper: reading (the
/// page-cache copy) is nearly all of a comparison's time, and the two images, or two
/// halves of one range, are independent.
struct PairReader<'a> {
    devs: [&'a dyn BlockDev; 2],
    jobs: std::sync::mpsc::Sender<ReadJob>,
    done: std::sync::mpsc::Receiver<(ReadJob, Result<(), CompareError>)>,
    /// The helper's buffer between jobs.
    spare: Vec<u8>,
}

impl PairReader<'_> {
    /// Fills `mine` from `devs[mine_which]` at `mine_offset` here and `theirs_len` bytes of
    /// `devs[which]` at `offset` on the helper; returns the helper's bytes.
    fn read_pair(
        &mut self,
        (mine_which, mine_offset, mine): (usize, u64, &mut [u8]),
        (which, offset, theirs_len): (usize, u64, usize),
    ) -> Result<&[u8], CompareError> {
        let mut buf = std::mem::take(&mut self.spare);
        buf.resize(theirs_len, 0);
        let sent = self.jobs.send(ReadJob { which, offset, buf });
        let here = read(self.devs[mine_which], mine_which, mine, mine_offset);
        let (job, there) = match sent {
            Ok(()) => self.done.recv().map_err(|_| helper_gone(which, offset))?,
            // The helper is gone (it cannot be, short of a panic): read here instead.
            Err(std::sync::mpsc::SendError(mut job)) => {
                let r = read(self.devs[which], which, &mut job.buf, offset);
                (job, r)
            }
        };
        self.spare = job.buf;
        here?;
        there?;
        Ok(&self.spare[..theirs_len])
    }
}

fn helper_gone(which: usize, offset: u64) -> CompareError {
    CompareError::Read(
        which,
        offset,
        Error::new(
            vdisk_block::ErrorKind::Io,
            "compare",
            "the reader thread stopped",
        ),
    )
}

/// What [`compare`] tells its caller while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `chunk` more bytes of `total` were compared.
    Progress {
        /// Bytes just compared.
        chunk: u64,
        /// Bytes to compare in all (the larger size).
        total: u64,
    },
    /// The common part matched and the sizes differ: the larger image's tail is next
    /// (qemu-img warns about the size mismatch at this point).
    TailStart,
}

/// Compares `a` and `b`. `strict` also requires equal sizes and equal allocation status.
/// `events` hears about progress and about the start of the tail check.
pub fn compare(
    a: &Arc<dyn BlockDev>,
    b: &Arc<dyn BlockDev>,
    strict: bool,
    events: &mut dyn FnMut(Event),
) -> Result<Comparison, CompareError> {
    let size_a = visible_len(a.as_ref());
    let size_b = visible_len(b.as_ref());
    let common = size_a.min(size_b);
    let total = size_a.max(size_b);
    let size_differs = size_a != size_b;
    let done = |outcome| {
        Ok(Comparison {
            outcome,
            size_warning: false,
        })
    };
    let done_tail = |outcome| {
        Ok(Comparison {
            outcome,
            size_warning: true,
        })
    };
    if strict && size_differs {
        return done(Outcome::SizeMismatch);
    }
    std::thread::scope(|scope| {
        let (jobs, job_rx) = std::sync::mpsc::channel::<ReadJob>();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let devs: [&dyn BlockDev; 2] = [a.as_ref(), b.as_ref()];
        scope.spawn(move || {
            for mut job in job_rx {
                let r = read(devs[job.which], job.which, &mut job.buf, job.offset);
                if done_tx.send((job, r)).is_err() {
                    break;
                }
            }
        });
        let mut reader = PairReader {
            devs,
            jobs,
            done: done_rx,
            spare: Vec::new(),
        };
        let mut buf = Vec::new();
        let mut offset = 0;
        // qemu's block status answers compressed data one cluster at a time, which cuts its
        // reads (and so where a failed one is reported) and its progress.
        let clusters = [cluster_size(a.as_ref()), cluster_size(b.as_ref())];
        let cut =
            |entry: &MapEntry, which: usize, offset: u64| match (entry.compressed, clusters[which])
            {
                (true, Some(c)) => entry.length.min(c - offset % c),
                _ => entry.length,
            };
        while offset < common {
            let sa = status(a, 0, offset, size_a)?;
            let sb = status(b, 1, offset, size_b)?;
            let mut chunk = cut(&sa, 0, offset).min(cut(&sb, 1, offset));
            if strict && key(&sa, size_a) != key(&sb, size_b) {
                return done(Outcome::StatusMismatch(offset));
            }
            if sa.zero && sb.zero {
                // Both read as zeroes: nothing to read.
            } else if sa.present == sb.present {
                if sa.present {
                    chunk = chunk.min(IO_BUF_SIZE);
                    let n = chunk as usize;
                    buf.resize(n, 0);
                    let theirs = reader.read_pair((1, offset, &mut buf[..]), (0, offset, n))?;
                    if let Some(at) = first_different_sector(theirs, &buf) {
                        return done(Outcome::ContentMismatch(offset + at));
                    }
                }
            } else {
                chunk = chunk.min(IO_BUF_SIZE);
                let which = if sa.present { 0 } else { 1 };
                if let Some(at) = nonzero_in(&mut reader, which, &mut buf, offset, chunk)? {
                    return done(Outcome::ContentMismatch(at));
                }
            }
            offset += chunk;
            events(Event::Progress { chunk, total });
        }
        if size_differs {
            events(Event::TailStart);
            let (over, which) = if size_a > size_b { (a, 0) } else { (b, 1) };
            while offset < total {
                let st = status(over, which, offset, total)?;
                let mut chunk = cut(&st, which, offset);
                if st.present && !st.zero {
                    chunk = chunk.min(IO_BUF_SIZE);
                    if let Some(at) = nonzero_in(&mut reader, which, &mut buf, offset, chunk)? {
                        return done_tail(Outcome::ContentMismatch(at));
                    }
                }
                offset += chunk;
                events(Event::Progress { chunk, total });
            }
            return done_tail(Outcome::Identical);
        }
        done(Outcome::Identical)
    })
}

/// Reads `len` bytes of image `which` at `offset` (its two halves at once) and returns the
/// offset of the first non-zero sector.
fn nonzero_in(
    reader: &mut PairReader<'_>,
    which: usize,
    buf: &mut Vec<u8>,
    offset: u64,
    len: u64,
) -> Result<Option<u64>, CompareError> {
    // Split on a sector boundary so each half reports whole sectors.
    let first = (len / 2).next_multiple_of(SECTOR).min(len);
    buf.resize(first as usize, 0);
    let second = reader.read_pair(
        (which, offset, &mut buf[..]),
        (which, offset + first, (len - first) as usize),
    )?;
    if let Some(at) = first_nonzero_sector(buf) {
        return Ok(Some(offset + at));
    }
    Ok(first_nonzero_sector(second).map(|at| offset + first + at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdisk_block::MemImage;

    fn dev(size: u64) -> Arc<dyn BlockDev> {
        Arc::new(MemImage::new(size))
    }

    fn run(a: &Arc<dyn BlockDev>, b: &Arc<dyn BlockDev>, strict: bool) -> Comparison {
        compare(a, b, strict, &mut |_| {}).expect("compare")
    }

    #[test]
    fn identical_and_single_byte_difference() {
        let a = dev(1 << 20);
        let b = dev(1 << 20);
        assert_eq!(run(&a, &b, false).outcome, Outcome::Identical);
        b.write_at(&[9], 100_000).expect("write");
        // The mismatch is reported at the start of the sector holding the byte.
        assert_eq!(
            run(&a, &b, false).outcome,
            Outcome::ContentMismatch(100_000 / 512 * 512)
        );
    }

    #[test]
    fn larger_image_tail_must_be_zero() {
        let a = dev(1 << 20);
        let b = dev(2 << 20);
        let r = run(&a, &b, false);
        assert_eq!(r.outcome, Outcome::Identical);
        assert!(r.size_warning);
        assert_eq!(run(&a, &b, true).outcome, Outcome::SizeMismatch);
        b.write_at(&[1], (1 << 20) + 5000).expect("write");
        assert_eq!(
            run(&b, &a, false).outcome,
            Outcome::ContentMismatch((1 << 20) + 4608)
        );
    }
}
