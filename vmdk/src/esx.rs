//! The headers of ESXi snapshot deltas: vmfsSparse (VMDK3, magic `COWD`) and seSparse
//! (magic `0xcafebabe`, with a volatile header `0xcafecafe`). Each parser checks its fields
//! and describes the extent's tables as a [`Geometry`] for [`crate::sparse::SparseExtent`].

use vdisk_block::{Error, Result};

use crate::source::Source;

use crate::header::{SparseHeader, MAX_GD_ENTRIES, MAX_GRAIN_SECTORS, SECTOR};
use crate::sparse::{Geometry, Layout};

/// seSparse constant header magic.
pub const SESPARSE_MAGIC: u64 = 0xcafe_babe;
/// seSparse volatile header magic.
pub const SESPARSE_VOLATILE_MAGIC: u64 = 0xcafe_cafe;
/// The only seSparse version there is.
pub const SESPARSE_VERSION: u64 = 0x2_0000_0001;
/// Grain table entries per table in both ESXi flavours.
pub const ESX_GTES_PER_GT: u32 = 4096;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// True when `first` (the start of a file) is a seSparse extent.
pub fn is_sesparse(first: &[u8]) -> bool {
    first.len() >= 16 && u64_at(first, 0) == SESPARSE_MAGIC && u64_at(first, 8) == SESPARSE_VERSION
}

/// True when `first` is a vmfsSparse (COWD) extent.
pub fn is_cowd(first: &[u8]) -> bool {
    first.starts_with(b"COWD")
}

fn synthesised(capacity: u64, grain_sectors: u64) -> SparseHeader {
    SparseHeader {
        version: 1,
        flags: 0,
        capacity,
        grain_sectors,
        descriptor_offset: 0,
        descriptor_size: 0,
        gtes_per_gt: ESX_GTES_PER_GT,
        rgd_offset: 0,
        gd_offset: 0,
        overhead: 0,
        unclean_shutdown: false,
        compress_algorithm: 0,
    }
}

/// Parses a vmfsSparse header: `COWD`, then u32 version, flags, disk sectors, granularity,
/// grain directory offset (sectors) and size (entries), ...
pub fn cowd_geometry(file: &Source, first: &[u8]) -> Result<Geometry> {
    let bad = |why: String| Error::corrupt("open vmfsSparse extent", why).with_path(file.path());
    if first.len() < 44 || !is_cowd(first) {
        return Err(bad("no COWD header".into()));
    }
    let capacity = u64::from(u32_at(first, 12));
    let grain = u64::from(u32_at(first, 16));
    let gd_offset = u64::from(u32_at(first, 20));
    let gd_entries = u64::from(u32_at(first, 24));
    if grain == 0 || grain > MAX_GRAIN_SECTORS || !grain.is_power_of_two() {
        return Err(bad(format!(
            "Invalid granularity: {grain} sectors (must be a power of two up to {MAX_GRAIN_SECTORS})"
        )));
    }
    if gd_entries > MAX_GD_ENTRIES {
        return Err(bad(format!("L1 size too big: {gd_entries} entries")));
    }
    Ok(Geometry {
        header: synthesised(capacity, grain),
        layout: Layout::Cowd,
        gd_offset: gd_offset * SECTOR,
        gd_entries,
    })
}

/// Parses and checks a seSparse constant header and its volatile header.
pub fn sesparse_geometry(file: &Source, first: &[u8]) -> Result<Geometry> {
    let bad = |why: String| Error::corrupt("open seSparse extent", why).with_path(file.path());
    if first.len() < 512 || u64_at(first, 0) != SESPARSE_MAGIC {
        return Err(bad("no seSparse header".into()));
    }
    let field = |index: usize| u64_at(first, index * 8);
    if field(1) != SESPARSE_VERSION {
        return Err(Error::unsupported(
            "open seSparse extent",
            format!("seSparse version {:#x} is not supported", field(1)),
        )
        .with_path(file.path()));
    }
    let capacity = field(2);
    if field(3) != 8 {
        return Err(bad(format!("Unsupported grain size {}", field(3))));
    }
    if field(4) != 64 {
        return Err(bad(format!("Unsupported grain table size {}", field(4))));
    }
    if field(5) != 0 {
        return Err(bad(format!("Unsupported flags {:#x}", field(5))));
    }
    if (6..10).any(|i| field(i) != 0) {
        return Err(bad("Unsupported reserved bits".into()));
    }
    if capacity.checked_mul(SECTOR).is_none() {
        return Err(bad(format!("capacity of {capacity} sectors overflows")));
    }
    let file_len = file.len()?;
    // Regions as (offset, size) in bytes, in header order: volatile header, journal header,
    // journal, grain directory, grain tables, free bitmap, backmap, grains.
    let mut regions = [(0u64, 0u64); 8];
    for (i, region) in regions.iter_mut().enumerate() {
        let (off, size) = (field(10 + 2 * i), field(11 + 2 * i));
        let (Some(o), Some(s)) = (off.checked_mul(SECTOR), size.checked_mul(SECTOR)) else {
            return Err(bad(format!("region {i} overflows")));
        };
        if o.checked_add(s).is_none() {
            return Err(bad(format!("region {i} overflows")));
        }
        *region = (o, s);
    }
    let (vh_off, _) = regions[0];
    let (gd_off, gd_size) = regions[3];
    let (tables, tables_len) = regions[4];
    let (grains, grains_len) = regions[7];
    if vh_off + 512 > file_len || gd_off + gd_size > file_len {
        return Err(bad(
            "the header or grain directory lies past the end of the file".into(),
        ));
    }
    let mut volatile = [0u8; 32];
    file.read_at(&mut volatile, vh_off)?;
    if u64_at(&volatile, 0) != SESPARSE_VOLATILE_MAGIC {
        return Err(bad("bad volatile header magic".into()));
    }
    if u64_at(&volatile, 24) != 0 {
        return Err(Error::unsupported(
            "open seSparse extent",
            "Image is dirty, Replaying journal not supported",
        )
        .with_path(file.path()));
    }
    let gd_entries = gd_size / 8;
    if gd_entries > MAX_GD_ENTRIES {
        return Err(bad(format!("L1 size too big: {gd_entries} entries")));
    }
    Ok(Geometry {
        header: synthesised(capacity, 8),
        layout: Layout::SeSparse {
            tables,
            tables_len,
            grains,
            grains_len,
        },
        gd_offset: gd_off,
        gd_entries,
    })
}
