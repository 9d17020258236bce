//! Finding zero runs in data read from the source, so they become holes in the target.
//!
//! The buffer is cut into blocks whose edges sit at absolute multiples of the granularity
//! (so a hole never splits a target block and forces a read-modify-write). A run of zero
//! blocks becomes a hole when it is at least `min_sparse` bytes long, or when it starts the
//! buffer (qemu-img does the same: a leading zero run is never written, whatever its length).
//! Shorter zero runs inside data are written with the data around them, which keeps writes
//! large.

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

/// Cuts `buf`, which lives at absolute offset `base`, into alternating data and zero runs.
///
/// `granularity` is a power of two; `min_sparse` is the shortest zero run (in bytes) that is
/// worth a hole, capped at the buffer length. `emit` sees the runs in order; the first error
/// it returns stops the walk.
pub fn for_each_run<E>(
    buf: &[u8],
    base: u64,
    granularity: usize,
    min_sparse: usize,
    mut emit: impl FnMut(Run) -> Result<(), E>,
) -> Result<(), E> {
    let g = granularity.max(1) as u64;
    let min = min_sparse.clamp(1, buf.len().max(1));
    // The pending data run (start, end) and the zero run currently being measured.
    let mut data: Option<(usize, usize)> = None;
    let mut zero: Option<(usize, usize)> = None;
    let mut pos = 0usize;
    while pos < buf.len() {
        let abs = base + pos as u64;
        let to_edge = (g - abs % g) as usize;
        let end = (pos + to_edge).min(buf.len());
        if is_zero(&buf[pos..end]) {
            zero = Some(match zero {
                Some((s, _)) => (s, end),
                None => (pos, end),
            });
        } else {
            if let Some((zs, ze)) = zero.take() {
                // A short zero run inside data is written with it; a long one (or one that
                // opens the buffer) is a hole.
                let hole = ze - zs >= min || data.is_none();
                if hole {
                    if let Some((ds, de)) = data.take() {
                        emit(Run {
                            start: ds,
                            len: de - ds,
                            data: true,
                        })?;
                    }
                    emit(Run {
                        start: zs,
                        len: ze - zs,
                        data: false,
                    })?;
                } else if let Some(d) = data.as_mut() {
                    d.1 = ze;
                }
            }
            data = Some(match data {
                Some((s, _)) => (s, end),
                None => (pos, end),
            });
        }
        pos = end;
    }
    // A zero run that ends the buffer becomes a hole only when long enough (or when the
    // whole buffer is zero); otherwise it stays with the data before it.
    match (data, zero) {
        (Some((ds, _)), Some((zs, ze))) if ze - zs < min => emit(Run {
            start: ds,
            len: ze - ds,
            data: true,
        })?,
        (d, z) => {
            if let Some((ds, de)) = d {
                emit(Run {
                    start: ds,
                    len: de - ds,
                    data: true,
                })?;
            }
            if let Some((zs, ze)) = z {
                emit(Run {
                    start: zs,
                    len: ze - zs,
                    data: false,
                })?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(buf: &[u8], base: u64, g: usize, min: usize) -> Vec<(usize, usize, bool)> {
        let mut out = Vec::new();
        for_each_run::<()>(buf, base, g, min, |r| {
            out.push((r.start, r.len, r.data));
            Ok(())
        })
        .expect("no error");
        out
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
    fn runs_cover_the_buffer_and_alternate() {
        let mut b = vec![0u8; 16 * 4096];
        // data, 1 zero block, data, 3 zero blocks, data, zero tail
        for blk in [1usize, 3, 7, 8, 12] {
            b[blk * 4096 + 7] = 9;
        }
        let r = runs(&b, 0, 4096, 8192);
        assert_eq!(
            r,
            vec![
                (0, 4096, false),
                (4096, 3 * 4096, true),
                (4 * 4096, 3 * 4096, false),
                (7 * 4096, 2 * 4096, true),
                (9 * 4096, 3 * 4096, false),
                (12 * 4096, 4096, true),
                (13 * 4096, 3 * 4096, false),
            ]
        );
        let total: usize = r.iter().map(|x| x.1).sum();
        assert_eq!(total, b.len());
    }

    #[test]
    fn blocks_follow_absolute_alignment() {
        let mut b = vec![0u8; 3 * 4096];
        b[100] = 1;
        // Buffer starts 1024 bytes before a 4 KiB edge: the first block is 1024 bytes.
        let r = runs(&b, 3072, 4096, 4096);
        assert_eq!(r, vec![(0, 1024, true), (1024, 3 * 4096 - 1024, false)]);
    }

    #[test]
    fn short_trailing_zero_run_stays_with_data() {
        let mut b = vec![0u8; 2 * 4096];
        b[0] = 1;
        assert_eq!(runs(&b, 0, 4096, 8192), vec![(0, 8192, true)]);
        assert_eq!(
            runs(&b, 0, 4096, 4096),
            vec![(0, 4096, true), (4096, 4096, false)]
        );
    }
}
