//! The VHD footer (and its copy at the start of dynamic images): big-endian, 512 bytes,
//! protected by a one's-complement byte-sum checksum.

use crate::bytes::{be16, be32, be64};
use crate::guid::Guid;

/// Size of the footer.
pub const FOOTER_SIZE: usize = 512;
const COOKIE: &[u8; 8] = b"conectix";
/// Disk type of a fixed image.
pub const TYPE_FIXED: u32 = 2;
/// Disk type of a dynamic image.
pub const TYPE_DYNAMIC: u32 = 3;
/// Disk type of a differencing image.
pub const TYPE_DIFFERENCING: u32 = 4;
/// The largest CHS geometry: images that have it use the current size instead.
pub const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;
/// qemu refuses disks larger than this many sectors (2040 GiB).
pub const MAX_SECTORS: u64 = 0xff00_0000;

/// The VHD checksum: the one's complement of the byte sum with the checksum field skipped.
pub fn checksum(buf: &[u8], field: usize) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, b)| s.wrapping_add(*b as u32));
    !sum
}

/// A parsed footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the dynamic header (all ones for fixed images).
    pub data_offset: u64,
    /// Four characters naming the writer (`win `, `vpc `, `qemu`, `qem2`, ...).
    pub creator_app: [u8; 4],
    /// The size the writer meant, in bytes.
    pub current_size: u64,
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
    /// Fixed, dynamic or differencing.
    pub disk_type: u32,
    /// Identity of the image (a child's dynamic header names its parent's).
    pub unique_id: Guid,
    /// Seconds since 2000-01-01 UTC when the image was created (children record it).
    pub timestamp: u32,
}

impl Footer {
    /// True when `buf` starts with the footer cookie.
    pub fn has_cookie(buf: &[u8]) -> bool {
        buf.starts_with(COOKIE)
    }

    /// Parses and checks a footer.
    pub fn parse(buf: &[u8]) -> std::result::Result<Footer, String> {
        if buf.len() < FOOTER_SIZE || !Self::has_cookie(buf) {
            // qemu's words first (drop-in mode shows only those), then what is missing.
            return Err("invalid VPC image (no VHD footer: no 'conectix' cookie)".into());
        }
        if be32(buf, 64) != checksum(&buf[..FOOTER_SIZE], 64) {
            // qemu's words, so drop-in users see the same message; the rest says which
            // structure (the dynamic header has its own checksum and message).
            return Err("Incorrect header checksum (of the VHD footer)".into());
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&buf[28..32]);
        Ok(Footer {
            data_offset: be64(buf, 16),
            creator_app,
            current_size: be64(buf, 48),
            cylinders: be16(buf, 56),
            heads: buf[58],
            sectors_per_track: buf[59],
            disk_type: be32(buf, 60),
            unique_id: Guid::from_slice(&buf[68..84]),
            timestamp: be32(buf, 24),
        })
    }

    /// Sectors of the CHS geometry.
    pub fn chs_sectors(&self) -> u64 {
        self.cylinders as u64 * self.heads as u64 * self.sectors_per_track as u64
    }

    /// The guest-visible size by qemu's rules: Virtual PC (and old qemu) images use the CHS
    /// geometry, Hyper-V, Disk2VHD, XenServer and new qemu use the current size, and a
    /// maximal geometry always means the current size. `force` overrides the creator table
    /// (`Some(true)`: CHS, `Some(false)`: current size).
    pub fn virtual_size(&self, force: Option<bool>) -> std::result::Result<u64, String> {
        let size_writers: [&[u8; 4]; 5] = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"];
        let use_chs = match force {
            Some(chs) => chs,
            None => !size_writers.contains(&&self.creator_app),
        };
        let sectors = if !use_chs || self.chs_sectors() == MAX_GEOMETRY_SECTORS {
            self.current_size / 512
        } else {
            self.chs_sectors()
        };
        if sectors > MAX_SECTORS {
            return Err(format!(
                "disk of {} bytes is larger than the 2040 GiB a VHD can hold",
                sectors * 512
            ));
        }
        Ok(sectors * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_libvhdi_footer_fragment() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/fragments/libvhdi/file_footer.1");
        let Ok(buf) = std::fs::read(&path) else {
            eprintln!("shared fixtures absent: skipping fragment test");
            return;
        };
        let f = Footer::parse(&buf).expect("real footer parses");
        assert!(matches!(
            f.disk_type,
            TYPE_FIXED | TYPE_DYNAMIC | TYPE_DIFFERENCING
        ));
        let mut bad = buf.clone();
        bad[40] ^= 1;
        assert!(Footer::parse(&bad)
            .expect_err("must be rejected")
            .contains("checksum"));
    }

    #[test]
    fn size_rules_follow_the_creator() {
        let mut f = Footer {
            data_offset: u64::MAX,
            creator_app: *b"vpc ",
            current_size: 10 << 20,
            cylinders: 304,
            heads: 4,
            sectors_per_track: 17,
            disk_type: TYPE_FIXED,
            unique_id: Guid::ZERO,
            timestamp: 0,
        };
        assert_eq!(f.virtual_size(None), Ok(304 * 4 * 17 * 512));
        assert_eq!(f.virtual_size(Some(false)), Ok(10 << 20));
        f.creator_app = *b"win ";
        assert_eq!(f.virtual_size(None), Ok(10 << 20));
        assert_eq!(f.virtual_size(Some(true)), Ok(304 * 4 * 17 * 512));
        f.creator_app = *b"qemu";
        (f.cylinders, f.heads, f.sectors_per_track) = (65535, 16, 255);
        assert_eq!(f.virtual_size(None), Ok(10 << 20));
        f.current_size = 4 << 40;
        assert!(f.virtual_size(None).is_err());
    }
}
