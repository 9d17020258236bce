//! Decoding L1 and L2 table entries into what a guest range reads as.
//!
//! The classification follows QEMU's `qcow2_get_subcluster_type`: a standard cluster may be
//! unallocated, zero (with or without a preallocated host cluster), data or compressed; with
//! extended L2 entries each of the 32 subclusters has its own allocated / zero bits. Entries
//! with reserved bits set, unaligned offsets or contradictory bitmaps are corruption.

use vdisk_block::{Error, Result};

/// Bits 9..=55 of an L1 or standard L2 entry: the host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the refcount of the cluster is exactly one (writes may go in place).
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry (without extended L2): the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Reserved bits of an L1 entry (0..=8 and 56..=62).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (1..=8 and 56..=61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// What a (sub)cluster reads as, and where its bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Not allocated in this layer: reads fall through to the backing file (or zeroes).
    Unallocated,
    /// Extended L2 only: the cluster has a host cluster but this subcluster is not
    /// allocated, so reads still fall through. `host` is where the subcluster would live.
    UnallocatedAlloc {
        /// Host offset of the cluster.
        host: u64,
    },
    /// Reads as zeroes without consulting the backing file; no host cluster.
    ZeroPlain,
    /// Reads as zeroes; a host cluster is preallocated at `host`.
    ZeroAlloc {
        /// Host offset of the cluster.
        host: u64,
    },
    /// Plain data at `host` (offset of the cluster, in the data file when there is one).
    Normal {
        /// Host offset of the cluster.
        host: u64,
    },
    /// Compressed data: `len` bytes (an upper bound) at byte offset `offset` of the image.
    Compressed {
        /// Host byte offset of the compressed stream (not aligned).
        offset: u64,
        /// Bytes the stream may occupy.
        len: u64,
    },
}

impl Kind {
    /// True when reads of this range go to the backing file.
    pub fn falls_through(self) -> bool {
        matches!(self, Kind::Unallocated | Kind::UnallocatedAlloc { .. })
    }

    /// The host cluster offset, for kinds that have one.
    pub fn host(self) -> Option<u64> {
        match self {
            Kind::UnallocatedAlloc { host } | Kind::ZeroAlloc { host } | Kind::Normal { host } => {
                Some(host)
            }
            _ => None,
        }
    }

    /// True when `self` (ending at host `self_end` within its cluster) and `next` form one
    /// extent for block status: same kind and, where there are host offsets, contiguous.
    pub fn continues_with(self, next: Kind, host_gap: u64) -> bool {
        match (self, next) {
            (Kind::Unallocated, Kind::Unallocated) | (Kind::ZeroPlain, Kind::ZeroPlain) => true,
            (Kind::Normal { host: a }, Kind::Normal { host: b })
            | (Kind::ZeroAlloc { host: a }, Kind::ZeroAlloc { host: b }) => {
                a.checked_add(host_gap) == Some(b)
            }
            _ => false,
        }
    }
}

/// How to read the entries of one image.
#[derive(Debug, Clone, Copy)]
pub struct Decoder {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// 128-bit entries with subcluster bitmaps.
    pub extended_l2: bool,
    /// Guest data lives in an external data file.
    pub data_file: bool,
}

fn corrupt(message: String) -> Error {
    Error::corrupt("read metadata", message)
}

impl Decoder {
    /// The L2 table offset an L1 entry points to (0: unallocated).
    pub fn l2_offset(&self, l1_index: u64, entry: u64) -> Result<u64> {
        if entry & L1_RESERVED != 0 {
            return Err(corrupt(format!(
                "L1 entry {l1_index} ({entry:#018x}) has reserved bits set"
            )));
        }
        let offset = entry & OFFSET_MASK;
        if offset & ((1u64 << self.cluster_bits) - 1) != 0 {
            return Err(corrupt(format!(
                "L2 table offset {offset:#x} unaligned (L1 index {l1_index})"
            )));
        }
        Ok(offset)
    }

    /// Bytes per subcluster (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        let cs = 1u64 << self.cluster_bits;
        if self.extended_l2 {
            cs / u64::from(SUBCLUSTERS)
        } else {
            cs
        }
    }

    /// Classifies subcluster `sc` of the cluster described by `entry` (and `bitmap` with
    /// extended L2). `guest` is the guest offset of the cluster, for messages.
    pub fn classify(&self, entry: u64, bitmap: u64, sc: u32, guest: u64) -> Result<Kind> {
        if entry & COMPRESSED != 0 {
            return self.compressed(entry, guest);
        }
        if entry & L2_RESERVED != 0 {
            return Err(corrupt(format!(
                "L2 entry {entry:#018x} for guest offset {guest:#x} has reserved bits set"
            )));
        }
        let host = entry & OFFSET_MASK;
        if host & ((1u64 << self.cluster_bits) - 1) != 0 {
            return Err(corrupt(format!(
                "Cluster allocation offset {host:#x} unaligned (guest offset {guest:#x})"
            )));
        }
        // With an external data file, host offset 0 is a valid cluster when COPIED is set.
        let has_host = host != 0 || (self.data_file && entry & COPIED != 0);
        if !self.extended_l2 {
            return Ok(match (entry & ZERO != 0, has_host) {
                (true, true) => Kind::ZeroAlloc { host },
                (true, false) => Kind::ZeroPlain,
                (false, true) => Kind::Normal { host },
                (false, false) => Kind::Unallocated,
            });
        }
        let alloc = bitmap & 0xffff_ffff;
        let zero = bitmap >> 32;
        if has_host {
            if alloc & zero != 0 {
                return Err(corrupt(format!(
                    "subcluster bitmap {bitmap:#018x} marks subclusters both allocated and zero (guest offset {guest:#x})"
                )));
            }
        } else if alloc != 0 {
            return Err(corrupt(format!(
                "subcluster bitmap {bitmap:#018x} marks subclusters allocated in an unallocated cluster (guest offset {guest:#x})"
            )));
        }
        let bit = 1u64 << sc;
        Ok(match (has_host, zero & bit != 0, alloc & bit != 0) {
            (true, true, _) => Kind::ZeroAlloc { host },
            (true, false, true) => Kind::Normal { host },
            (true, false, false) => Kind::UnallocatedAlloc { host },
            (false, true, _) => Kind::ZeroPlain,
            (false, false, _) => Kind::Unallocated,
        })
    }

    fn compressed(&self, entry: u64, guest: u64) -> Result<Kind> {
        if self.data_file {
            return Err(corrupt(format!(
                "compressed cluster at guest offset {guest:#x} in an image with an external data file"
            )));
        }
        // Bits 0..x hold the byte offset, x..=61 the number of additional 512-byte sectors.
        let x = 70 - self.cluster_bits;
        let offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry & !(COPIED | COMPRESSED)) >> x) + 1;
        if offset >= crate::header::MAX_HOST_OFFSET {
            return Err(corrupt(format!(
                "compressed cluster offset {offset:#x} lies past 2^56 (guest offset {guest:#x})"
            )));
        }
        let len = sectors * 512 - (offset & 511);
        Ok(Kind::Compressed { offset, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD: Decoder = Decoder {
        cluster_bits: 16,
        extended_l2: false,
        data_file: false,
    };
    const EXT: Decoder = Decoder {
        cluster_bits: 16,
        extended_l2: true,
        data_file: false,
    };

    #[test]
    fn standard_entries() {
        assert_eq!(STD.classify(0, 0, 0, 0).ok(), Some(Kind::Unallocated));
        assert_eq!(STD.classify(1, 0, 0, 0).ok(), Some(Kind::ZeroPlain));
        assert_eq!(
            STD.classify(COPIED | 0x50000, 0, 0, 0).ok(),
            Some(Kind::Normal { host: 0x50000 })
        );
        assert_eq!(
            STD.classify(0x50001, 0, 0, 0).ok(),
            Some(Kind::ZeroAlloc { host: 0x50000 })
        );
        // Unaligned for 64 KiB clusters, reserved bits.
        assert!(STD.classify(0x50200, 0, 0, 0).is_err());
        assert!(STD.classify(0x50002, 0, 0, 0).is_err());
        assert!(STD.classify(1 << 57 | 0x50000, 0, 0, 0).is_err());
    }

    #[test]
    fn compressed_entry_from_qemu() {
        // Observed in a qemu-img written image: one sector at 0x50000.
        assert_eq!(
            STD.classify(0x4000_0000_0005_0000, 0, 0, 0).ok(),
            Some(Kind::Compressed {
                offset: 0x50000,
                len: 512
            })
        );
        let with_data_file = Decoder {
            data_file: true,
            ..STD
        };
        assert!(with_data_file
            .classify(0x4000_0000_0005_0000, 0, 0, 0)
            .is_err());
    }

    #[test]
    fn external_data_file_offset_zero() {
        let d = Decoder {
            data_file: true,
            ..STD
        };
        assert_eq!(
            d.classify(COPIED, 0, 0, 0).ok(),
            Some(Kind::Normal { host: 0 })
        );
        assert_eq!(d.classify(0, 0, 0, 0).ok(), Some(Kind::Unallocated));
    }

    #[test]
    fn subclusters() {
        let entry = COPIED | 0x60000;
        let bitmap = 0b01 | (0b10 << 32);
        assert_eq!(
            EXT.classify(entry, bitmap, 0, 0).ok(),
            Some(Kind::Normal { host: 0x60000 })
        );
        assert_eq!(
            EXT.classify(entry, bitmap, 1, 0).ok(),
            Some(Kind::ZeroAlloc { host: 0x60000 })
        );
        assert_eq!(
            EXT.classify(entry, bitmap, 2, 0).ok(),
            Some(Kind::UnallocatedAlloc { host: 0x60000 })
        );
        assert_eq!(EXT.classify(0, 1 << 33, 1, 0).ok(), Some(Kind::ZeroPlain));
        // Allocated and zero at once; allocated without a host cluster.
        assert!(EXT.classify(entry, 1 | 1 << 32, 5, 0).is_err());
        assert!(EXT.classify(0, 1, 5, 0).is_err());
    }

    #[test]
    fn l1_entries() {
        assert_eq!(STD.l2_offset(0, COPIED | 0x70000).ok(), Some(0x70000));
        assert!(STD.l2_offset(0, 0x70001).is_err());
        assert!(STD.l2_offset(0, 0x70200).is_err());
    }
}
