//! The region table (MS-VHDX 2.2.3): where the BAT and the metadata region live.

use crate::bytes::{le32, le64, put_le32, put_le64};
use crate::crc32c::crc32c_skipping;
use crate::guid::Guid;

/// Where the two copies of the region table start.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * 1024, 256 * 1024];
/// Size of a region table (the checksum covers all of it).
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
/// The spec's cap on entries.
pub const MAX_ENTRIES: u32 = 2047;
const SIGNATURE: &[u8; 4] = b"regi";
const MIB: u64 = 1024 * 1024;

/// The BAT region.
pub const BAT_GUID: Guid = Guid::from_fields(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// The metadata region.
pub const METADATA_GUID: Guid = Guid::from_fields(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);

/// One region table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionEntry {
    /// What the region is.
    pub guid: Guid,
    /// Where it starts (multiple of 1 MiB).
    pub offset: u64,
    /// How long it is (multiple of 1 MiB).
    pub length: u32,
    /// An implementation that does not know the region must refuse the file.
    pub required: bool,
}

/// The regions this driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regions {
    /// The BAT region.
    pub bat: RegionEntry,
    /// The metadata region.
    pub metadata: RegionEntry,
}

/// Parses `count` entries that follow a region table header (no checksum check).
pub fn parse_entries(buf: &[u8], count: u32) -> Vec<RegionEntry> {
    (0..count as usize)
        .map(|i| {
            let at = 16 + i * 32;
            RegionEntry {
                guid: Guid::from_slice(crate::bytes::slice(buf, at, 16)),
                offset: le64(buf, at + 16),
                length: le32(buf, at + 24),
                required: le32(buf, at + 28) & 1 != 0,
            }
        })
        .collect()
}

/// Parses and validates a 64 KiB region table; `file_len` bounds every region.
pub fn parse(buf: &[u8], file_len: u64) -> std::result::Result<Regions, String> {
    if buf.len() < REGION_TABLE_SIZE {
        return Err("region table is truncated".into());
    }
    if &buf[..4] != SIGNATURE {
        return Err("bad region table signature".into());
    }
    let stored = le32(buf, 4);
    let computed = crc32c_skipping(&buf[..REGION_TABLE_SIZE], 4);
    if stored != computed {
        return Err(format!(
            "region table checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    let count = le32(buf, 8);
    if count > MAX_ENTRIES {
        return Err(format!(
            "region table has {count} entries (at most {MAX_ENTRIES} allowed)"
        ));
    }
    let (mut bat, mut metadata) = (None, None);
    for entry in parse_entries(buf, count) {
        if entry.offset % MIB != 0 || entry.offset < MIB {
            return Err(format!(
                "region {} starts at {}, which is not a multiple of 1 MiB past the header section",
                entry.guid, entry.offset
            ));
        }
        if entry.length == 0 || !(entry.length as u64).is_multiple_of(MIB) {
            return Err(format!(
                "region {} has length {}, which is not a non-zero multiple of 1 MiB",
                entry.guid, entry.length
            ));
        }
        if entry
            .offset
            .checked_add(entry.length as u64)
            .is_none_or(|end| end > file_len)
        {
            return Err(format!(
                "region {} ({} bytes at {}) ends past the end of the file ({file_len} bytes)",
                entry.guid, entry.length, entry.offset
            ));
        }
        let slot = if entry.guid == BAT_GUID {
            &mut bat
        } else if entry.guid == METADATA_GUID {
            &mut metadata
        } else if entry.required {
            return Err(format!(
                "unknown region {} is marked required; this image needs a newer implementation",
                entry.guid
            ));
        } else {
            continue;
        };
        if slot.replace(entry).is_some() {
            return Err(format!("region {} appears twice", entry.guid));
        }
    }
    let bat = bat.ok_or("the region table has no BAT region")?;
    let metadata = metadata.ok_or("the region table has no metadata region")?;
    Ok(Regions { bat, metadata })
}

/// The 64 KiB on-disk form of a region table holding `entries`.
pub fn encode(entries: &[RegionEntry]) -> Vec<u8> {
    let mut buf = vec![0u8; REGION_TABLE_SIZE];
    buf[..4].copy_from_slice(SIGNATURE);
    put_le32(&mut buf, 8, entries.len() as u32);
    for (i, e) in entries.iter().enumerate() {
        let at = 16 + i * 32;
        buf[at..at + 16].copy_from_slice(&e.guid.0);
        put_le64(&mut buf, at + 16, e.offset);
        put_le32(&mut buf, at + 24, e.length);
        put_le32(&mut buf, at + 28, e.required as u32);
    }
    let crc = crc32c_skipping(&buf, 4);
    put_le32(&mut buf, 4, crc);
    buf
}

/// True when `[a, a+alen)` and `[b, b+blen)` share a byte.
pub fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<RegionEntry> {
        vec![
            RegionEntry {
                guid: BAT_GUID,
                offset: 2 * MIB,
                length: MIB as u32,
                required: true,
            },
            RegionEntry {
                guid: METADATA_GUID,
                offset: 3 * MIB,
                length: MIB as u32,
                required: true,
            },
        ]
    }

    #[test]
    fn round_trips() {
        let r = parse(&encode(&entries()), 8 * MIB).expect("valid");
        assert_eq!(r.bat.offset, 2 * MIB);
        assert_eq!(r.metadata.offset, 3 * MIB);
    }

    #[test]
    fn rejects_hostile_tables() {
        let mut bad_crc = encode(&entries());
        bad_crc[20] ^= 1;
        assert!(parse(&bad_crc, 8 * MIB).is_err());
        let mut too_many = encode(&entries());
        too_many[8..12].copy_from_slice(&5000u32.to_le_bytes());
        let crc = crc32c_skipping(&too_many, 4);
        too_many[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(parse(&too_many, 8 * MIB)
            .expect_err("must be rejected")
            .contains("entries"));
        let mut dup = entries();
        dup[1].guid = BAT_GUID;
        assert!(parse(&encode(&dup), 8 * MIB)
            .expect_err("must be rejected")
            .contains("twice"));
        let mut unknown = entries();
        unknown.push(RegionEntry {
            guid: Guid([7; 16]),
            offset: 4 * MIB,
            length: MIB as u32,
            required: true,
        });
        assert!(parse(&encode(&unknown), 8 * MIB)
            .expect_err("must be rejected")
            .contains("required"));
        unknown[2].required = false;
        assert!(parse(&encode(&unknown), 8 * MIB).is_ok());
        let mut unaligned = entries();
        unaligned[0].offset += 512;
        assert!(parse(&encode(&unaligned), 8 * MIB).is_err());
        let mut zero_len = entries();
        zero_len[0].length = 0;
        assert!(parse(&encode(&zero_len), 8 * MIB).is_err());
        assert!(parse(&encode(&entries()), 3 * MIB)
            .expect_err("must be rejected")
            .contains("past the end"));
        assert!(parse(&encode(&entries()[..1]), 8 * MIB)
            .expect_err("must be rejected")
            .contains("metadata"));
    }

    #[test]
    fn reads_the_libvhdi_fragment_entries() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/fragments/libvhdi/region_table.1");
        let Ok(buf) = std::fs::read(&path) else {
            eprintln!("shared fixtures absent: skipping fragment test");
            return;
        };
        let e = parse_entries(&buf, le32(&buf, 8));
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].guid, BAT_GUID);
        assert_eq!(e[0].offset, 3 * MIB);
        assert_eq!(e[1].guid, METADATA_GUID);
        assert!(e.iter().all(|e| e.required));
    }
}
