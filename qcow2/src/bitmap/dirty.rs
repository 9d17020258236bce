//! The in-memory bits of one dirty bitmap, kept sparse in the units qcow2 stores them in.
//!
//! A chunk is one bitmap data cluster (`cluster_size * 8` bits). Chunks that are all clear
//! are absent and chunks that are all set hold no buffer, so memory follows what is dirty
//! (bounded by the data clusters read from the file plus the chunks guest writes touched),
//! never the virtual size, which a hostile header may make huge.

use std::collections::BTreeMap;

/// One bitmap data cluster's worth of bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Every bit set.
    Full,
    /// Bits, LSB first, `cluster_size` bytes.
    Bits(Box<[u8]>),
}

/// A dirty bitmap over `size` guest bytes with `granularity` bytes a bit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DirtyMap {
    granularity: u64,
    size: u64,
    chunk_bytes: u64,
    chunks: BTreeMap<u64, Chunk>,
}

impl DirtyMap {
    /// An empty bitmap; `chunk_bytes` is the image's cluster size.
    pub fn new(granularity: u64, size: u64, chunk_bytes: u64) -> Self {
        DirtyMap {
            granularity,
            size,
            chunk_bytes,
            chunks: BTreeMap::new(),
        }
    }

    /// Bytes a bit covers.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Guest bytes covered.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn bits_per_chunk(&self) -> u64 {
        self.chunk_bytes * 8
    }

    /// Number of bits.
    pub fn bit_count(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    /// Number of chunks (bitmap table entries).
    pub fn chunk_count(&self) -> u64 {
        self.bit_count().div_ceil(self.bits_per_chunk())
    }

    /// Installs chunk `index` as loaded from the image (tail bits past the end cleared).
    pub fn put_chunk(&mut self, index: u64, chunk: Chunk) {
        self.chunks.insert(index, chunk);
        self.trim_chunk(index);
    }

    /// Sets (`value`) or clears bits `[first, end)`.
    pub fn set_bits(&mut self, first: u64, end: u64, value: bool) {
        let end = end.min(self.bit_count());
        let per = self.bits_per_chunk();
        let mut bit = first;
        while bit < end {
            let index = bit / per;
            let lo = bit % per;
            let hi = (end - index * per).min(per);
            self.set_in_chunk(index, lo, hi, value);
            bit = index * per + hi;
        }
    }

    fn set_in_chunk(&mut self, index: u64, lo: u64, hi: u64, value: bool) {
        let per = self.bits_per_chunk();
        if lo == 0 && hi == per {
            if value {
                self.chunks.insert(index, Chunk::Full);
                self.trim_chunk(index);
            } else {
                self.chunks.remove(&index);
            }
            return;
        }
        let chunk_bytes = self.chunk_bytes as usize;
        let entry = match self.chunks.get_mut(&index) {
            Some(c) => c,
            None if !value => return,
            None => self
                .chunks
                .entry(index)
                .or_insert_with(|| Chunk::Bits(vec![0u8; chunk_bytes].into_boxed_slice())),
        };
        if let Chunk::Full = entry {
            if value {
                return;
            }
            *entry = Chunk::Bits(vec![0xffu8; chunk_bytes].into_boxed_slice());
        }
        if let Chunk::Bits(bytes) = entry {
            set_bit_range(bytes, lo, hi, value);
            if bytes.iter().all(|&b| b == 0) {
                self.chunks.remove(&index);
            }
        }
    }

    /// Clears the bits of chunk `index` past the last bit of the bitmap (the spec wants
    /// unused tail bits zero) and drops chunks wholly past the end.
    fn trim_chunk(&mut self, index: u64) {
        let per = self.bits_per_chunk();
        let bits = self.bit_count();
        if index * per >= bits {
            self.chunks.remove(&index);
            return;
        }
        let valid = bits - index * per;
        if valid >= per {
            return;
        }
        let chunk_bytes = self.chunk_bytes as usize;
        let Some(entry) = self.chunks.get_mut(&index) else {
            return;
        };
        if let Chunk::Full = entry {
            *entry = Chunk::Bits(vec![0xffu8; chunk_bytes].into_boxed_slice());
        }
        if let Chunk::Bits(bytes) = entry {
            for b in valid..per {
                bytes[(b / 8) as usize] &= !(1u8 << (b % 8));
            }
            if bytes.iter().all(|&b| b == 0) {
                self.chunks.remove(&index);
            }
        }
    }

    /// Marks guest bytes `[offset, offset + len)` dirty (every granule they touch).
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let g = self.granularity;
        self.set_bits(offset / g, end.div_ceil(g), true);
    }

    /// Marks guest bytes clean: only granules the range covers whole (or that end at the
    /// end of the disk) are cleared.
    pub fn unmark(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        let g = self.granularity;
        let first = offset.div_ceil(g);
        let last = if end == self.size {
            end.div_ceil(g)
        } else {
            end / g
        };
        if first < last {
            self.set_bits(first, last, false);
        }
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.chunks.clear();
    }

    /// Changes the covered size: bits past a smaller size are dropped, a larger one adds
    /// clear bits.
    pub fn resize(&mut self, size: u64) {
        let old_bits = self.bit_count();
        self.size = size;
        let bits = self.bit_count();
        if bits < old_bits {
            let per = self.bits_per_chunk();
            let keep = bits.div_ceil(per);
            self.chunks.retain(|&i, _| i < keep);
            if keep > 0 {
                self.trim_chunk(keep - 1);
            }
        }
    }

    /// Bit `bit` is set.
    #[cfg(test)]
    fn get(&self, bit: u64) -> bool {
        let per = self.bits_per_chunk();
        match self.chunks.get(&(bit / per)) {
            None => false,
            Some(Chunk::Full) => true,
            Some(Chunk::Bits(b)) => {
                let i = bit % per;
                b[(i / 8) as usize] & (1 << (i % 8)) != 0
            }
        }
    }

    /// Runs of set bits as `[first, end)`, in order.
    pub fn set_runs(&self) -> Vec<(u64, u64)> {
        let per = self.bits_per_chunk();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |a: u64, b: u64| match out.last_mut() {
            Some(last) if last.1 == a => last.1 = b,
            _ => out.push((a, b)),
        };
        for (&index, chunk) in &self.chunks {
            let base = index * per;
            match chunk {
                Chunk::Full => push(base, (base + per).min(self.bit_count())),
                Chunk::Bits(bytes) => {
                    let mut start: Option<u64> = None;
                    for (i, &byte) in bytes.iter().enumerate() {
                        if start.is_none() && byte == 0 {
                            continue;
                        }
                        if start.is_some() && byte == 0xff {
                            continue;
                        }
                        for k in 0..8u64 {
                            let bit = i as u64 * 8 + k;
                            let set = byte & (1 << k) != 0;
                            match (set, start) {
                                (true, None) => start = Some(bit),
                                (false, Some(s)) => {
                                    push(base + s, base + bit);
                                    start = None;
                                }
                                _ => {}
                            }
                        }
                    }
                    if let Some(s) = start {
                        push(base + s, base + per);
                    }
                }
            }
        }
        out
    }

    /// Dirty guest ranges `(offset, len)`, the last one cut at the end of the disk.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let g = self.granularity;
        self.set_runs()
            .into_iter()
            .map(|(a, b)| {
                let start = a * g;
                let end = (b * g).min(self.size);
                (start, end - start)
            })
            .collect()
    }

    /// Chunks that hold set bits, with their on-disk bytes.
    pub fn stored_chunks(&self) -> impl Iterator<Item = (u64, Vec<u8>)> + '_ {
        self.chunks.iter().map(|(&i, c)| {
            let bytes = match c {
                Chunk::Full => {
                    let mut v = vec![0xffu8; self.chunk_bytes as usize];
                    let per = self.bits_per_chunk();
                    let valid = self.bit_count().saturating_sub(i * per).min(per);
                    for b in valid..per {
                        v[(b / 8) as usize] &= !(1u8 << (b % 8));
                    }
                    v
                }
                Chunk::Bits(b) => b.to_vec(),
            };
            (i, bytes)
        })
    }

    /// True when bit `bit` is set (for tests).
    #[cfg(test)]
    pub fn bit(&self, bit: u64) -> bool {
        self.get(bit)
    }
}

/// Sets or clears bits `[lo, hi)` of `bytes` (LSB first), whole bytes at a time in the
/// middle.
fn set_bit_range(bytes: &mut [u8], lo: u64, hi: u64, value: bool) {
    let mut b = lo;
    while b < hi {
        let byte = (b / 8) as usize;
        if b & 7 == 0 && hi - b >= 8 {
            let whole = ((hi - b) / 8) as usize;
            bytes[byte..byte + whole].fill(if value { 0xff } else { 0 });
            b += whole as u64 * 8;
            continue;
        }
        let mask = 1u8 << (b % 8);
        if value {
            bytes[byte] |= mask;
        } else {
            bytes[byte] &= !mask;
        }
        b += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_whole_granules_and_trims_the_tail() {
        let mut m = DirtyMap::new(512, 10_000, 512);
        m.mark(100, 1);
        m.mark(1024, 1025);
        assert_eq!(m.ranges(), vec![(0, 512), (1024, 1536)]);
        m.mark(9_999, 100);
        assert_eq!(m.ranges().last(), Some(&(9_728, 272)));
        m.unmark(1024, 1000);
        assert_eq!(m.ranges()[1], (1536, 1024));
        assert!(!m.bit(2));
    }

    #[test]
    fn bit_ranges_fill_whole_bytes() {
        let mut b = vec![0u8; 4];
        set_bit_range(&mut b, 3, 29, true);
        assert_eq!(b, [0xf8, 0xff, 0xff, 0x1f]);
        set_bit_range(&mut b, 8, 16, false);
        assert_eq!(b, [0xf8, 0, 0xff, 0x1f]);
    }

    #[test]
    fn full_chunks_and_clearing_inside_them() {
        // 512-byte clusters: 4096 bits a chunk, 2 MiB of guest data at 512 B a bit.
        let mut m = DirtyMap::new(512, 8 << 20, 512);
        m.mark(0, 8 << 20);
        assert_eq!(m.chunks.len(), 4);
        assert!(m.chunks.values().all(|c| *c == Chunk::Full));
        m.unmark(512, 512);
        assert_eq!(m.ranges(), vec![(0, 512), (1024, (8 << 20) - 1024)]);
        m.resize(1 << 20);
        assert_eq!(m.ranges(), vec![(0, 512), (1024, (1 << 20) - 1024)]);
        m.clear();
        assert!(m.ranges().is_empty());
    }
}
