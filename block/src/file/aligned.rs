//! Heap buffers aligned for `O_DIRECT`, without `unsafe`: over-allocate and slice.

/// A zero-initialised buffer whose start is aligned to a power of two.
#[derive(Debug, Clone)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes starting at an address that is a multiple of `align` (rounded up to a
    /// power of two).
    pub fn zeroed(len: usize, align: usize) -> Self {
        let align = align.max(1).next_power_of_two();
        let storage = vec![0u8; len + align];
        let start = storage.as_ptr().align_offset(align).min(align);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The buffer's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_is_aligned() {
        for align in [1, 512, 4096] {
            let b = AlignedBuf::zeroed(8192, align);
            assert_eq!(b.as_slice().as_ptr() as usize % align, 0);
            assert_eq!(b.len(), 8192);
        }
    }
}
