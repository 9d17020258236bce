//! Block allocation table entries (MS-VHDX 2.5).
//!
//! The BAT interleaves `chunk_ratio` payload entries with one sector-bitmap entry; guest
//! block `b` is entry `b + b / chunk_ratio`, and the bitmap of its chunk is entry
//! `(b / chunk_ratio + 1) * (chunk_ratio + 1) - 1`.

/// Bits 0-2 of an entry.
const STATE_MASK: u64 = 0x7;
/// Bits 20-63 of an entry, in MiB.
const OFFSET_SHIFT: u32 = 20;

/// What a payload BAT entry says about its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadState {
    /// 0: never written (differencing: read the parent).
    NotPresent,
    /// 1: contents undefined.
    Undefined,
    /// 2: reads as zeroes.
    Zero,
    /// 3 (5 in the 0.95 draft): unmapped by the guest.
    Unmapped,
    /// 6: every sector is in this file.
    FullyPresent,
    /// 7: the sector bitmap says which sectors are here (differencing only).
    PartiallyPresent,
}

impl PayloadState {
    /// Decodes the state bits, or `None` for a reserved value.
    pub fn from_bits(bits: u64) -> Option<Self> {
        Some(match bits & STATE_MASK {
            0 => Self::NotPresent,
            1 => Self::Undefined,
            2 => Self::Zero,
            3 | 5 => Self::Unmapped,
            6 => Self::FullyPresent,
            7 => Self::PartiallyPresent,
            _ => return None,
        })
    }

    /// The state bits as written.
    pub fn bits(self) -> u64 {
        match self {
            Self::NotPresent => 0,
            Self::Undefined => 1,
            Self::Zero => 2,
            Self::Unmapped => 3,
            Self::FullyPresent => 6,
            Self::PartiallyPresent => 7,
        }
    }

    /// True when the block has a file offset.
    pub fn has_offset(self) -> bool {
        matches!(self, Self::FullyPresent | Self::PartiallyPresent)
    }
}

/// The state bits of a sector-bitmap entry that has a bitmap block.
pub const SB_PRESENT: u64 = 6;

/// The state bits of `entry`.
pub fn state_bits(entry: u64) -> u64 {
    entry & STATE_MASK
}

/// The file offset `entry` points at (bytes).
pub fn file_offset(entry: u64) -> u64 {
    (entry >> OFFSET_SHIFT) << OFFSET_SHIFT
}

/// Builds an entry from a state and a 1 MiB aligned offset.
pub fn make_entry(state_bits: u64, offset: u64) -> u64 {
    (offset >> OFFSET_SHIFT) << OFFSET_SHIFT | (state_bits & STATE_MASK)
}

/// Index of the payload entry of guest block `block`.
pub fn payload_index(block: u64, chunk_ratio: u64) -> u64 {
    block + block / chunk_ratio
}

/// Index of the sector-bitmap entry of the chunk holding guest block `block`.
pub fn bitmap_index(block: u64, chunk_ratio: u64) -> u64 {
    (block / chunk_ratio + 1) * (chunk_ratio + 1) - 1
}

/// True when entry `index` is a sector-bitmap entry.
pub fn is_bitmap_index(index: u64, chunk_ratio: u64) -> bool {
    index % (chunk_ratio + 1) == chunk_ratio
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_interleave_bitmap_entries() {
        assert_eq!(payload_index(0, 4), 0);
        assert_eq!(payload_index(3, 4), 3);
        assert_eq!(payload_index(4, 4), 5);
        assert_eq!(bitmap_index(0, 4), 4);
        assert_eq!(bitmap_index(5, 4), 9);
        assert!(is_bitmap_index(4, 4) && is_bitmap_index(9, 4) && !is_bitmap_index(5, 4));
    }

    #[test]
    fn entries_round_trip() {
        let e = make_entry(6, 8 << 20);
        assert_eq!(state_bits(e), 6);
        assert_eq!(file_offset(e), 8 << 20);
        assert_eq!(PayloadState::from_bits(5), Some(PayloadState::Unmapped));
        assert_eq!(PayloadState::from_bits(4), None);
    }
}
