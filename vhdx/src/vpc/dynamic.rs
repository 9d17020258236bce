//! The dynamic disk header of dynamic and differencing VHDs (1024 bytes, big-endian).

use crate::bytes::{be32, be64, utf16be};
use crate::guid::Guid;
use crate::vpc::footer::checksum;

/// Size of the dynamic header.
pub const HEADER_SIZE: usize = 1024;
const COOKIE: &[u8; 8] = b"cxsparse";

/// One parent locator entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatorEntry {
    /// Platform code (`W2ru` relative, `W2ku` absolute, both UTF-16LE; `Wi2r`/`Wi2k`; `MacX`).
    pub code: [u8; 4],
    /// Bytes of locator data.
    pub data_length: u32,
    /// Where the data is in the file.
    pub data_offset: u64,
}

/// A parsed dynamic header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Where the BAT is.
    pub table_offset: u64,
    /// BAT entries.
    pub max_table_entries: u32,
    /// Bytes per block (a power of two, at least 512).
    pub block_size: u32,
    /// The parent's unique ID (differencing).
    pub parent_unique_id: Guid,
    /// The parent's file name (differencing).
    pub parent_name: String,
    /// The parent locators in use.
    pub locators: Vec<LocatorEntry>,
}

impl DynamicHeader {
    /// Parses and checks a dynamic header.
    pub fn parse(buf: &[u8]) -> std::result::Result<Self, String> {
        if buf.len() < HEADER_SIZE || !buf.starts_with(COOKIE) {
            return Err("no dynamic disk header ('cxsparse' cookie)".into());
        }
        if be32(buf, 36) != checksum(&buf[..HEADER_SIZE], 36) {
            return Err("Incorrect dynamic header checksum".into());
        }
        let block_size = be32(buf, 32);
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err(format!(
                "Invalid block size {block_size} (the dynamic header's block size must be a power of two of at least 512 bytes)"
            ));
        }
        let locators = (0..8)
            .map(|i| {
                let at = 576 + i * 24;
                let mut code = [0u8; 4];
                code.copy_from_slice(&buf[at..at + 4]);
                LocatorEntry {
                    code,
                    data_length: be32(buf, at + 8),
                    data_offset: be64(buf, at + 16),
                }
            })
            .filter(|l| l.code != [0; 4])
            .collect();
        Ok(DynamicHeader {
            table_offset: be64(buf, 16),
            max_table_entries: be32(buf, 28),
            block_size,
            parent_unique_id: Guid::from_slice(&buf[40..56]),
            parent_name: utf16be(&buf[64..576]),
            locators,
        })
    }

    /// Bytes of the sector bitmap in front of each block (rounded up to a sector).
    pub fn bitmap_size(&self) -> u64 {
        (self.block_size as u64 / 512)
            .div_ceil(8)
            .next_multiple_of(512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_libvhdi_fragment() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/fragments/libvhdi/dynamic_disk_header.1");
        let Ok(buf) = std::fs::read(&path) else {
            eprintln!("shared fixtures absent: skipping fragment test");
            return;
        };
        let h = DynamicHeader::parse(&buf).expect("real header parses");
        assert!(h.block_size.is_power_of_two());
        assert_eq!(h.bitmap_size(), 512);
        let mut bad = buf.clone();
        bad[30] ^= 1;
        assert!(DynamicHeader::parse(&bad).is_err());
    }
}
