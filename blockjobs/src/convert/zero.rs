//! Finding zero runs in data read from the source, so they become holes in the target.
//!
//! The rules are qemu-img's (`is_allocated_sectors` / `is_allocated_sectors_min` in its
//! convert), so a target gets the same holes, and the same allocated size, as qemu-img makes:
//! - the buffer is looked at in 512-byte sectors;
//! - where data and zeroes meet off an `alignment` edge (a power of two: `-S` rounded down,
//!   or the target's own alignment if larger), a data run is stretched to the next edge and a
//!   zero run is cut back to the previous one, so no hole splits a target block; a zero run
//!   too short to reach back to an edge counts as data;
//! - once data has started, zero runs shorter than `min_sparse` stay inside the data, which
//!   keeps writes large; a zero run that opens or ends the buffer is always a hole.

/// True when every byte of `block` is zero.
///
/// Data blocks usually differ from zero in their first bytes, so those are checked alone
/// first; the rest is OR-folded in pieces the compiler vectorises, stopping at the first
/// non-zero piece.
pub fn is_zero(block: &[u8]) -> bool {
    const HEAD: usize = 16;
    const PIECE: usize = 512;
    let (head, rest) = block.split_at(block.len().min(HEAD));
    if head.iter().any(|&b| b != 0) {
        return false;
    }
    rest.chunks(PIECE)
        .all(|piece| piece.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// One piece of a buffer as [`for_each_run`] classified it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Start inside the buffer.
    pub start: usize,
    /// Length in bytes; never zero.
    pub len: usize,
    /// The bytes must be written; `false` means they are all zero and may become a hole.
    pub data: bool,
}

/// qemu's sector: the unit zero detection looks at.
const SECTOR: usize = 512;

/// The sectors of one buffer and where they sit on the device.
struct Sectors<'a> {
    buf: &'a [u8],
    /// Device sector number of the buffer's first sector.
    first: u64,
    /// Alignment in sectors (a power of two).
    align: u64,
}

impl Sectors<'_> {
    fn count(&self) -> usize {
        self.buf.len().div_ceil(SECTOR)
    }

    /// The bytes of sector `i` (the last one may be short: the end of a source).
    fn zero(&self, i: usize) -> bool {
        let start = i * SECTOR;
        is_zero(&self.buf[start..(start + SECTOR).min(self.buf.len())])
    }

    /// Classifies the run of sectors starting at `s` (of `n` left): returns whether it is
    /// data and how many sectors it covers, after alignment.
    fn run_at(&self, s: usize, n: usize) -> (bool, usize) {
        if n == 0 {
            return (false, 0);
        }
        let mut zero = self.zero(s);
        let mut i = 1;
        while i < n && self.zero(s + i) == zero {
            i += 1;
        }
        if i == n {
            return (!zero, n);
        }
        let tail = ((self.first + (s + i) as u64) & (self.align - 1)) as usize;
        if tail != 0 {
            if zero && i <= tail {
                // The zero run does not reach back to an edge: data follows within this
                // block, which must be written whole anyway.
                zero = false;
            }
            if zero {
                i -= tail;
            } else {
                i = (i + (self.align as usize - tail)).min(n);
            }
        }
        (!zero, i)
    }

    /// Like [`Sectors::run_at`], but a data run swallows zero runs shorter than `min`
    /// sectors that have data after them.
    fn run_min_at(&self, s: usize, n: usize, min: usize) -> (bool, usize) {
        let min = min.min(n);
        let (data, first) = self.run_at(s, n);
        if !data {
            return (false, first);
        }
        let mut used = first;
        let mut checked = first;
        while checked < n {
            let (more_data, len) = self.run_at(s + checked, n - checked);
            checked += len;
            if more_data {
                used = checked;
            } else if len >= min {
                break;
            }
        }
        (true, used)
    }
}

/// Cuts `buf`, which lives at device offset `base` (a multiple of 512), into data and zero
/// runs as qemu-img would, and hands them to `emit` in order with neighbours of the same
/// kind merged.
///
/// `alignment` is a power of two (bytes, at least 512); `min_sparse` is `-S` in bytes (0
/// means no zero detection: the whole buffer is one data run). The first error `emit`
/// returns stops the walk.
pub fn for_each_run<E>(
    buf: &[u8],
    base: u64,
    alignment: usize,
    min_sparse: usize,
    mut emit: impl FnMut(Run) -> Result<(), E>,
) -> Result<(), E> {
    if buf.is_empty() {
        return Ok(());
    }
    if min_sparse == 0 {
        return emit(Run {
            start: 0,
            len: buf.len(),
            data: true,
        });
    }
    let sectors = Sectors {
        buf,
        first: base / SECTOR as u64,
        align: (alignment / SECTOR).max(1).next_power_of_two() as u64,
    };
    let min = (min_sparse / SECTOR).max(1);
    let total = sectors.count();
    let mut pending: Option<Run> = None;
    let mut s = 0;
    while s < total {
        let (data, len) = sectors.run_min_at(s, total - s, min);
        let start = s * SECTOR;
        let end = ((s + len) * SECTOR).min(buf.len());
        s += len;
        match pending.as_mut() {
            Some(run) if run.data == data => run.len = end - run.start,
            _ => {
                if let Some(run) = pending.take() {
                    emit(run)?;
                }
                pending = Some(Run {
                    start,
                    len: end - start,
                    data,
                });
            }
        }
    }
    match pending {
        Some(run) => emit(run),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(buf: &[u8], base: u64, align: usize, min: usize) -> Vec<(usize, usize, bool)> {
        let mut out = Vec::new();
        for_each_run::<()>(buf, base, align, min, |r| {
            out.push((r.start, r.len, r.data));
            Ok(())
        })
        .expect("no error");
        out
    }

    /// Every run is covered once, in order, and every zero run really is zero.
    fn check_cover(buf: &[u8], r: &[(usize, usize, bool)]) {
        let mut at = 0;
        for &(start, len, data) in r {
            assert_eq!(start, at);
            assert!(len > 0);
            if !data {
                assert!(is_zero(&buf[start..start + len]));
            }
            at += len;
        }
        assert_eq!(at, buf.len());
    }

    #[test]
    fn zero_detection_sees_every_byte() {
        let mut b = vec![0u8; 8192];
        assert!(is_zero(&b));
        for i in [0, 15, 16, 511, 4000, 8191] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn aligned_zero_blocks_become_holes() {
        let mut b = vec![0u8; 16 * 4096];
        for blk in [1usize, 3, 7, 8, 12] {
            b[blk * 4096 + 7] = 9;
        }
        let r = runs(&b, 0, 4096, 4096);
        check_cover(&b, &r);
        assert_eq!(
            r,
            vec![
                (0, 4096, false),
                (4096, 4096, true),
                (2 * 4096, 4096, false),
                (3 * 4096, 4096, true),
                (4 * 4096, 3 * 4096, false),
                (7 * 4096, 2 * 4096, true),
                (9 * 4096, 3 * 4096, false),
                (12 * 4096, 4096, true),
                (13 * 4096, 3 * 4096, false),
            ]
        );
        // With -S 8k holes keep to 8 KiB edges: the leading zero block shares an 8 KiB
        // block with data, so it is written, and the lone zero block between data too.
        let r = runs(&b, 0, 8192, 8192);
        check_cover(&b, &r);
        assert_eq!(r[0], (0, 4 * 4096, true), "{r:?}");
    }

    #[test]
    fn partial_blocks_are_written_whole() {
        // Data in the second half of the first 4 KiB block and the first half of the second.
        let mut b = vec![0u8; 3 * 4096];
        b[3000] = 1;
        b[4100] = 1;
        let r = runs(&b, 0, 4096, 4096);
        check_cover(&b, &r);
        assert_eq!(r, vec![(0, 2 * 4096, true), (2 * 4096, 4096, false)]);
        // The same bytes starting 1024 bytes before a 4 KiB edge: edges are absolute, so the
        // zeroes up to that edge are a hole of their own.
        let r = runs(&b, 3072, 4096, 4096);
        check_cover(&b, &r);
        assert_eq!(r[0], (0, 1024, false), "{r:?}");
    }

    #[test]
    fn short_and_unaligned_tails() {
        let mut b = vec![0u8; 4096 + 700];
        b[0] = 1;
        let r = runs(&b, 0, 4096, 4096);
        check_cover(&b, &r);
        assert_eq!(r, vec![(0, 4096, true), (4096, 700, false)]);
        b[4096 + 699] = 1;
        let r = runs(&b, 0, 4096, 4096);
        check_cover(&b, &r);
        assert_eq!(r, vec![(0, 4096 + 700, true)]);
    }

    #[test]
    fn no_detection_with_s0() {
        let b = vec![0u8; 8192];
        assert_eq!(runs(&b, 0, 512, 0), vec![(0, 8192, true)]);
    }

    #[test]
    fn pseudo_random_buffers_are_covered_exactly() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..200 {
            let len = 512 + (round * 977) % 40000;
            let mut b = vec![0u8; len];
            for byte in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Mostly zero, with sparse data, in long stretches.
                if (x >> 40) % 4096 < 3 {
                    *byte = 1;
                }
            }
            for (align, min) in [(512, 512), (4096, 4096), (65536, 65536), (4096, 12288)] {
                let r = runs(&b, ((round % 7) * 512) as u64, align, min);
                check_cover(&b, &r);
            }
        }
    }
}
