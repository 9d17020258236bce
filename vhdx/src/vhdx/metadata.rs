//! The metadata region (MS-VHDX 2.6): disk geometry, identity and the parent locator.
//!
//! The table sits at the start of the region; each item is read on its own, so a hostile
//! length costs at most the 1 MiB the spec allows per item.

use std::collections::HashSet;

use crate::bytes::{le16, le32, le64, put_le16, put_le32};
use crate::guid::Guid;
use crate::vhdx::locator::ParentLocator;

/// Size of the metadata table at the start of the region.
pub const TABLE_SIZE: usize = 64 * 1024;
/// The spec's cap on entries.
pub const MAX_ENTRIES: u16 = 2047;
/// The spec's cap on one item's length.
pub const MAX_ITEM_LEN: u32 = 1024 * 1024;
const SIGNATURE: &[u8; 8] = b"metadata";
const MIB: u32 = 1024 * 1024;
/// The largest virtual disk the spec allows.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// File Parameters item.
pub const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Virtual Disk Size item.
pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Virtual Disk ID (page 83) item.
pub const PAGE_83: Guid = Guid::from_fields(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Logical Sector Size item.
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Physical Sector Size item.
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// Parent Locator item.
pub const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);

/// One metadata table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataEntry {
    /// Which item.
    pub item: Guid,
    /// Offset of the item's value from the region start.
    pub offset: u32,
    /// Length of the value.
    pub length: u32,
    /// The item belongs to the user, not the format.
    pub is_user: bool,
    /// The item describes the virtual disk (as opposed to the file).
    pub is_virtual_disk: bool,
    /// An implementation that does not know the item must refuse the file.
    pub is_required: bool,
}

impl MetadataEntry {
    /// Parses a 32-byte entry.
    pub fn parse(buf: &[u8]) -> Self {
        let flags = le32(buf, 24);
        MetadataEntry {
            item: Guid::from_slice(crate::bytes::slice(buf, 0, 16)),
            offset: le32(buf, 16),
            length: le32(buf, 20),
            is_user: flags & 1 != 0,
            is_virtual_disk: flags & 2 != 0,
            is_required: flags & 4 != 0,
        }
    }

    fn encode(&self, out: &mut [u8]) {
        out[..16].copy_from_slice(&self.item.0);
        put_le32(out, 16, self.offset);
        put_le32(out, 20, self.length);
        let flags = self.is_user as u32
            | (self.is_virtual_disk as u32) << 1
            | (self.is_required as u32) << 2;
        put_le32(out, 24, flags);
    }
}

/// Parses and validates the 64 KiB table of a metadata region of `region_len` bytes.
pub fn parse_table(buf: &[u8], region_len: u32) -> std::result::Result<Vec<MetadataEntry>, String> {
    if buf.len() < TABLE_SIZE || &buf[..8] != SIGNATURE {
        return Err("bad metadata table signature".into());
    }
    let count = le16(buf, 10);
    if count > MAX_ENTRIES {
        return Err(format!(
            "metadata table has {count} entries (at most {MAX_ENTRIES} allowed)"
        ));
    }
    let mut seen = HashSet::new();
    let mut entries = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let e = MetadataEntry::parse(crate::bytes::slice(buf, 32 + i * 32, 32));
        if !seen.insert((e.item, e.is_user)) {
            return Err(format!("metadata item {} appears twice", e.item));
        }
        if e.length > MAX_ITEM_LEN {
            return Err(format!(
                "metadata item {} is {} bytes long (at most 1 MiB allowed)",
                e.item, e.length
            ));
        }
        if e.length > 0
            && (e.offset < TABLE_SIZE as u32
                || e.offset
                    .checked_add(e.length)
                    .is_none_or(|end| end > region_len))
        {
            return Err(format!(
                "metadata item {} ({} bytes at {}) lies outside the metadata region ({region_len} bytes)",
                e.item, e.length, e.offset
            ));
        }
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            PAGE_83,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ];
        if e.is_required && (e.is_user || !known.contains(&e.item)) {
            return Err(format!(
                "unknown metadata item {} is marked required; this image needs a newer implementation",
                e.item
            ));
        }
        entries.push(e);
    }
    Ok(entries)
}

/// The validated disk parameters the metadata region describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskParams {
    /// Payload block size (power of two, 1..=256 MiB).
    pub block_size: u32,
    /// Fixed image: blocks stay allocated.
    pub leave_block_allocated: bool,
    /// Differencing image.
    pub has_parent: bool,
    /// Guest-visible size.
    pub virtual_size: u64,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// The SCSI page 83 identity of the disk.
    pub page83: Guid,
    /// Where the parent is (differencing images only).
    pub parent_locator: Option<ParentLocator>,
}

impl DiskParams {
    /// Payload blocks per sector-bitmap block: 2^23 sectors over the block's sectors.
    pub fn chunk_ratio(&self) -> u64 {
        ((1u64 << 23) * self.logical_sector_size as u64) / self.block_size as u64
    }

    /// Number of payload blocks covering the virtual size.
    pub fn payload_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size as u64)
    }

    /// Number of BAT entries the image must have (MS-VHDX 2.5).
    pub fn bat_entries(&self) -> u64 {
        let payload = self.payload_blocks();
        let ratio = self.chunk_ratio();
        if self.has_parent {
            payload.div_ceil(ratio) * (ratio + 1)
        } else if payload == 0 {
            0
        } else {
            payload + (payload - 1) / ratio
        }
    }
}

/// Builds the disk parameters from the raw values of the items (`None` when absent).
pub fn validate(
    file_parameters: Option<&[u8]>,
    virtual_size: Option<&[u8]>,
    page83: Option<&[u8]>,
    logical: Option<&[u8]>,
    physical: Option<&[u8]>,
    locator: Option<&[u8]>,
) -> std::result::Result<DiskParams, String> {
    let need = |v: Option<&[u8]>, name: &str, len: usize| -> std::result::Result<Vec<u8>, String> {
        match v {
            None => Err(format!("the required metadata item {name} is missing")),
            Some(b) if b.len() < len => Err(format!(
                "metadata item {name} is {} bytes long (expected {len})",
                b.len()
            )),
            Some(b) => Ok(b.to_vec()),
        }
    };
    let fp = need(file_parameters, "File Parameters", 8)?;
    let block_size = le32(&fp, 0);
    let flags = le32(&fp, 4);
    if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
        return Err(format!(
            "block size {block_size} is not a power of two between 1 MiB and 256 MiB"
        ));
    }
    let logical_sector_size = le32(&need(logical, "Logical Sector Size", 4)?, 0);
    let physical_sector_size = le32(&need(physical, "Physical Sector Size", 4)?, 0);
    for (name, v) in [
        ("logical", logical_sector_size),
        ("physical", physical_sector_size),
    ] {
        if v != 512 && v != 4096 {
            return Err(format!("{name} sector size {v} is neither 512 nor 4096"));
        }
    }
    let virtual_size = le64(&need(virtual_size, "Virtual Disk Size", 8)?, 0);
    if !virtual_size.is_multiple_of(logical_sector_size as u64) || virtual_size > MAX_VIRTUAL_SIZE {
        return Err(format!(
            "virtual disk size {virtual_size} is not a multiple of the {logical_sector_size}-byte sector or exceeds 64 TiB"
        ));
    }
    let page83 = Guid::from_slice(&need(page83, "Virtual Disk ID", 16)?);
    let has_parent = flags & 2 != 0;
    let parent_locator = match (has_parent, locator) {
        (true, None) => {
            return Err("the image has a parent but no parent locator".into());
        }
        (true, Some(raw)) => Some(ParentLocator::parse(raw)?),
        (false, _) => None,
    };
    Ok(DiskParams {
        block_size,
        leave_block_allocated: flags & 1 != 0,
        has_parent,
        virtual_size,
        logical_sector_size,
        physical_sector_size,
        page83,
        parent_locator,
    })
}

/// Encodes a metadata region (table plus item values) for `params`; its length is 1 MiB.
pub fn encode_region(params: &DiskParams, locator: Option<&[u8]>) -> Vec<u8> {
    let mut region = vec![0u8; MIB as usize];
    region[..8].copy_from_slice(SIGNATURE);
    let mut fp = [0u8; 8];
    put_le32(&mut fp, 0, params.block_size);
    put_le32(
        &mut fp,
        4,
        params.leave_block_allocated as u32 | (params.has_parent as u32) << 1,
    );
    let mut items: Vec<(Guid, bool, Vec<u8>)> = vec![
        (FILE_PARAMETERS, false, fp.to_vec()),
        (
            VIRTUAL_DISK_SIZE,
            true,
            params.virtual_size.to_le_bytes().to_vec(),
        ),
        (PAGE_83, true, params.page83.0.to_vec()),
        (
            LOGICAL_SECTOR_SIZE,
            true,
            params.logical_sector_size.to_le_bytes().to_vec(),
        ),
        (
            PHYSICAL_SECTOR_SIZE,
            true,
            params.physical_sector_size.to_le_bytes().to_vec(),
        ),
    ];
    if let Some(loc) = locator {
        items.push((PARENT_LOCATOR, false, loc.to_vec()));
    }
    put_le16(&mut region, 10, items.len() as u16);
    let mut at = TABLE_SIZE;
    for (i, (item, vdisk, value)) in items.iter().enumerate() {
        let entry = MetadataEntry {
            item: *item,
            offset: at as u32,
            length: value.len() as u32,
            is_user: false,
            is_virtual_disk: *vdisk,
            is_required: true,
        };
        entry.encode(&mut region[32 + i * 32..64 + i * 32]);
        region[at..at + value.len()].copy_from_slice(value);
        at += value.len().next_multiple_of(8);
    }
    region
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(bs: u32, size: u64, ls: u32) -> [Vec<u8>; 5] {
        let mut fp = bs.to_le_bytes().to_vec();
        fp.extend_from_slice(&0u32.to_le_bytes());
        [
            fp,
            size.to_le_bytes().to_vec(),
            vec![3; 16],
            ls.to_le_bytes().to_vec(),
            512u32.to_le_bytes().to_vec(),
        ]
    }

    fn check(bs: u32, size: u64, ls: u32) -> std::result::Result<DiskParams, String> {
        let i = items(bs, size, ls);
        validate(
            Some(&i[0]),
            Some(&i[1]),
            Some(&i[2]),
            Some(&i[3]),
            Some(&i[4]),
            None,
        )
    }

    #[test]
    fn chunk_ratio_and_bat_entries_follow_the_spec() {
        let p = check(8 * MIB, 64 << 20, 512).expect("valid");
        assert_eq!(p.chunk_ratio(), 512);
        assert_eq!(p.bat_entries(), 8);
        let p = check(32 * MIB, 10 << 20, 512).expect("valid");
        assert_eq!(p.chunk_ratio(), 128);
        let p = check(MIB, 1 << 30, 512).expect("valid");
        // 1024 payload blocks, ratio 4096: no sector bitmap entry in between.
        assert_eq!(p.bat_entries(), 1024);
        let mut d = check(MIB, (4096 + 1) << 20, 512).expect("valid");
        assert_eq!(d.bat_entries(), 4097 + 1);
        d.has_parent = true;
        assert_eq!(d.bat_entries(), 2 * 4097);
    }

    #[test]
    fn rejects_hostile_parameters() {
        assert!(
            check(0, 1 << 20, 512).is_err(),
            "zero block size (CVE-2014-0148)"
        );
        assert!(check(3 * MIB, 1 << 20, 512).is_err());
        assert!(check(512 * MIB, 1 << 20, 512).is_err());
        assert!(check(MIB / 2, 1 << 20, 512).is_err());
        assert!(check(MIB, 1 << 20, 1024).is_err());
        assert!(check(MIB, 1000, 512).is_err());
        assert!(check(MIB, (64 << 40) + 512, 512).is_err());
        let i = items(MIB, 1 << 20, 512);
        assert!(validate(
            Some(&i[0]),
            None,
            Some(&i[2]),
            Some(&i[3]),
            Some(&i[4]),
            None
        )
        .is_err());
        let mut fp = i[0].clone();
        fp[4] = 2;
        let err = validate(
            Some(&fp),
            Some(&i[1]),
            Some(&i[2]),
            Some(&i[3]),
            Some(&i[4]),
            None,
        )
        .expect_err("parent without locator");
        assert!(err.contains("locator"), "{err}");
    }

    #[test]
    fn table_rejects_duplicates_overflows_and_unknown_required_items() {
        let p = check(MIB, 1 << 20, 512).expect("valid");
        let region = encode_region(&p, None);
        assert_eq!(parse_table(&region, MIB).expect("valid").len(), 5);
        let mut dup = region.clone();
        dup.copy_within(32..64, 64);
        assert!(parse_table(&dup, MIB)
            .expect_err("must be rejected")
            .contains("twice"));
        let mut outside = region.clone();
        put_le32(&mut outside, 32 + 16, MIB - 4);
        assert!(parse_table(&outside, MIB)
            .expect_err("must be rejected")
            .contains("outside"));
        let mut unknown = region.clone();
        unknown[32] ^= 0xff;
        assert!(parse_table(&unknown, MIB)
            .expect_err("must be rejected")
            .contains("required"));
        let mut many = region;
        put_le16(&mut many, 10, 3000);
        assert!(parse_table(&many, MIB).is_err());
    }

    #[test]
    fn reads_the_libvhdi_fragment_entry() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/fragments/libvhdi");
        let (Ok(head), Ok(entry)) = (
            std::fs::read(dir.join("metadata_table_header.1")),
            std::fs::read(dir.join("metadata_table_entry.1")),
        ) else {
            eprintln!("shared fixtures absent: skipping fragment test");
            return;
        };
        assert_eq!(&head[..8], SIGNATURE);
        assert_eq!(le16(&head, 10), 5);
        let e = MetadataEntry::parse(&entry);
        assert_eq!(e.item, FILE_PARAMETERS);
        assert!(e.offset >= TABLE_SIZE as u32);
    }
}
