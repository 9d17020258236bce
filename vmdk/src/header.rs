//! The hosted sparse extent header (VMDK4, magic `KDMV`) and the streamOptimized markers.
//!
//! All fields are little-endian and counted in 512-byte sectors. [`SparseHeader::validate`]
//! checks every field the reader later multiplies or allocates by, so later arithmetic on a
//! parsed header cannot overflow and no table it describes can be larger than the file.

use vdisk_block::{Error, Result};

/// `KDMV` read as a little-endian u32.
pub const SPARSE_MAGIC: u32 = 0x564d_444b;
/// Bytes in a sector, the unit of every header field.
pub const SECTOR: u64 = 512;
/// `gdOffset` of a stream whose grain directory follows the grains (read the footer).
pub const GD_AT_END: u64 = u64::MAX;
/// The largest grain qemu accepts: 1 GiB.
pub const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// The most grain table entries per table accepted (the only value written is 512).
pub const MAX_GTES_PER_GT: u32 = 512;
/// The most grain directory entries accepted (qemu's limit, 128 MiB of directory).
pub const MAX_GD_ENTRIES: u64 = 32 * 1024 * 1024;

/// Flag: the newline test bytes are valid.
pub const FLAG_NEWLINE_TEST: u32 = 1 << 0;
/// Flag: a redundant grain directory is kept at `rgdOffset`.
pub const FLAG_REDUNDANT_GD: u32 = 1 << 1;
/// Flag: grain table entry 1 means "reads as zeroes".
pub const FLAG_ZEROED_GRAIN: u32 = 1 << 2;
/// Flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag: grains and metadata are preceded by markers.
pub const FLAG_MARKERS: u32 = 1 << 17;

/// `compressAlgorithm` value for deflate (zlib streams).
pub const COMPRESS_DEFLATE: u16 = 1;

/// Marker type: end of stream.
pub const MARKER_EOS: u32 = 0;
/// Marker type: a grain table follows.
pub const MARKER_GT: u32 = 1;
/// Marker type: the grain directory follows.
pub const MARKER_GD: u32 = 2;
/// Marker type: the footer (a copy of the header) follows.
pub const MARKER_FOOTER: u32 = 3;

const OP: &str = "open vmdk sparse extent";

/// A parsed and validated VMDK4 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseHeader {
    /// Format version (1, 2 or 3).
    pub version: u32,
    /// Feature flags (`FLAG_*`).
    pub flags: u32,
    /// Sectors the extent covers.
    pub capacity: u64,
    /// Sectors per grain.
    pub grain_sectors: u64,
    /// Sector of the embedded descriptor, 0 if none.
    pub descriptor_offset: u64,
    /// Sectors of the embedded descriptor.
    pub descriptor_size: u64,
    /// Entries per grain table.
    pub gtes_per_gt: u32,
    /// Sector of the redundant grain directory.
    pub rgd_offset: u64,
    /// Sector of the grain directory, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// Sectors before the first grain.
    pub overhead: u64,
    /// The extent was not closed cleanly.
    pub unclean_shutdown: bool,
    /// Compression algorithm of compressed grains.
    pub compress_algorithm: u16,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl SparseHeader {
    /// The size of the header on disk.
    pub const LEN: usize = 512;

    /// True when `bytes` starts with the sparse magic.
    pub fn has_magic(bytes: &[u8]) -> bool {
        bytes.len() >= 4 && u32_at(bytes, 0) == SPARSE_MAGIC
    }

    /// Decodes the fields of `bytes` (at least 512) without validating them.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < Self::LEN {
            return Err(Error::corrupt(
                OP,
                "the file is shorter than a sparse header",
            ));
        }
        if !Self::has_magic(bytes) {
            return Err(Error::corrupt(OP, "no sparse extent magic 'KDMV'"));
        }
        let header = SparseHeader {
            version: u32_at(bytes, 4),
            flags: u32_at(bytes, 8),
            capacity: u64_at(bytes, 12),
            grain_sectors: u64_at(bytes, 20),
            descriptor_offset: u64_at(bytes, 28),
            descriptor_size: u64_at(bytes, 36),
            gtes_per_gt: u32_at(bytes, 44),
            rgd_offset: u64_at(bytes, 48),
            gd_offset: u64_at(bytes, 56),
            overhead: u64_at(bytes, 64),
            unclean_shutdown: bytes[72] != 0,
            compress_algorithm: u16::from_le_bytes([bytes[77], bytes[78]]),
        };
        if header.flags & FLAG_NEWLINE_TEST != 0 && bytes[73..77] != *b"\n \r\n" {
            return Err(Error::corrupt(
                OP,
                "the newline test bytes are damaged: the file was copied in text mode",
            ));
        }
        Ok(header)
    }

    /// Checks the fields against each other and against `file_len`, so that every table and
    /// grain offset derived from them is bounded.
    pub fn validate(&self, file_len: u64) -> Result<()> {
        if !(1..=3).contains(&self.version) {
            return Err(Error::unsupported(
                OP,
                format!("sparse extent version {} is not supported", self.version),
            ));
        }
        // VMware's format requires a power of two and none of its tools writes anything
        // else; qemu 10 reads other sizes, but grain arithmetic elsewhere (and in other
        // readers) assumes it, so such a header is refused rather than half-trusted.
        if self.grain_sectors == 0
            || self.grain_sectors > MAX_GRAIN_SECTORS
            || !self.grain_sectors.is_power_of_two()
        {
            return Err(Error::corrupt(
                OP,
                format!(
                    "Invalid granularity: {} sectors (must be a power of two up to {MAX_GRAIN_SECTORS})",
                    self.grain_sectors
                ),
            ));
        }
        if self.gtes_per_gt == 0 || self.gtes_per_gt > MAX_GTES_PER_GT {
            return Err(Error::corrupt(
                OP,
                format!(
                    "L2 table size too big: {} entries per grain table",
                    self.gtes_per_gt
                ),
            ));
        }
        if self.capacity.checked_mul(SECTOR).is_none() {
            return Err(Error::corrupt(
                OP,
                format!("capacity of {} sectors overflows", self.capacity),
            ));
        }
        let entries = self.gd_entries();
        if entries > MAX_GD_ENTRIES {
            return Err(Error::corrupt(
                OP,
                format!("L1 size too big: {entries} grain directory entries"),
            ));
        }
        if self.flags & FLAG_COMPRESSED != 0 && self.compress_algorithm != COMPRESS_DEFLATE {
            return Err(Error::unsupported(
                OP,
                format!(
                    "compression algorithm {} is not supported (only deflate)",
                    self.compress_algorithm
                ),
            ));
        }
        let overhead_bytes = self.overhead.checked_mul(SECTOR);
        if overhead_bytes.is_none_or(|b| b > file_len) {
            return Err(Error::corrupt(
                OP,
                format!(
                    "File truncated, expecting at least {} sectors of overhead, the file has {file_len} bytes",
                    self.overhead
                ),
            ));
        }
        Ok(())
    }

    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_sectors * SECTOR
    }

    /// Grain directory entries needed to cover the capacity.
    pub fn gd_entries(&self) -> u64 {
        let per_gt = u64::from(self.gtes_per_gt.max(1)) * self.grain_sectors.max(1);
        self.capacity.div_ceil(per_gt)
    }

    /// Grains are compressed.
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    /// Grains and metadata carry markers.
    pub fn markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }

    /// Grain table entry 1 reads as zeroes.
    pub fn zeroed_grain(&self) -> bool {
        self.flags & FLAG_ZEROED_GRAIN != 0
    }

    /// The header as 512 bytes.
    pub fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(&SPARSE_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_sectors.to_le_bytes());
        b[28..36].copy_from_slice(&self.descriptor_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.descriptor_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = u8::from(self.unclean_shutdown);
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }
}

/// A stream marker: `u64 val; u32 size; u32 type` (type only meaningful when size is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// The LBA of a grain marker, or the sectors of metadata that follow.
    pub val: u64,
    /// Compressed bytes of a grain marker; 0 for metadata markers.
    pub size: u32,
    /// The metadata type (`MARKER_*`) when `size` is 0.
    pub kind: u32,
}

impl Marker {
    /// Decodes a marker from at least 16 bytes.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < 16 {
            return None;
        }
        Some(Marker {
            val: u64_at(bytes, 0),
            size: u32_at(bytes, 8),
            kind: u32_at(bytes, 12),
        })
    }

    /// A metadata marker as one 512-byte sector.
    pub fn metadata_sector(kind: u32, sectors: u64) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(&sectors.to_le_bytes());
        b[12..16].copy_from_slice(&kind.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdisk_block::ErrorKind;

    fn qemu_like() -> SparseHeader {
        SparseHeader {
            version: 1,
            flags: FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GD,
            capacity: 131072,
            grain_sectors: 128,
            descriptor_offset: 1,
            descriptor_size: 20,
            gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: 30,
            overhead: 128,
            unclean_shutdown: false,
            compress_algorithm: 0,
        }
    }

    #[test]
    fn encodes_and_decodes() {
        let h = qemu_like();
        let bytes = h.encode();
        assert_eq!(&bytes[0..4], b"KDMV");
        let back = SparseHeader::decode(&bytes).expect("decode");
        assert_eq!(back, h);
        back.validate(65536).expect("valid");
        assert_eq!(back.gd_entries(), 2);
    }

    #[test]
    fn hostile_fields_are_refused() {
        type Mutation = Box<dyn Fn(&mut SparseHeader)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|h| h.grain_sectors = 0), "granularity"),
            (
                Box::new(|h| h.grain_sectors = MAX_GRAIN_SECTORS * 2),
                "granularity",
            ),
            (Box::new(|h| h.grain_sectors = 96), "power of two"),
            (Box::new(|h| h.gtes_per_gt = 513), "L2 table"),
            (Box::new(|h| h.gtes_per_gt = 0), "L2 table"),
            (Box::new(|h| h.capacity = u64::MAX / 2), "overflows"),
            (
                Box::new(|h| {
                    h.capacity = 1 << 50;
                    h.grain_sectors = 1;
                }),
                "L1 size",
            ),
            (Box::new(|h| h.overhead = 1 << 60), "truncated"),
            (Box::new(|h| h.overhead = 1000), "truncated"),
            (Box::new(|h| h.version = 4), "version"),
            (
                Box::new(|h| {
                    h.flags |= FLAG_COMPRESSED;
                    h.compress_algorithm = 7;
                }),
                "compression",
            ),
        ];
        for (mutate, needle) in cases {
            let mut h = qemu_like();
            mutate(&mut h);
            let err = h.validate(65536).expect_err(needle);
            assert!(err.message().contains(needle), "{needle}: {err}");
        }
        let mut bytes = qemu_like().encode();
        bytes[75] = b'\n';
        let err = SparseHeader::decode(&bytes).expect_err("text mode");
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(SparseHeader::decode(&bytes[..100]).is_err());
        assert!(SparseHeader::decode(&[0u8; 512]).is_err());
    }

    #[test]
    fn markers_decode() {
        let m = Marker::decode(&Marker::metadata_sector(MARKER_FOOTER, 1)).expect("marker");
        assert_eq!(
            m,
            Marker {
                val: 1,
                size: 0,
                kind: MARKER_FOOTER
            }
        );
        assert!(Marker::decode(&[0u8; 8]).is_none());
    }
}
