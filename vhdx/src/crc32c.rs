//! CRC-32C (Castagnoli), the checksum of every VHDX header, region table and log entry.
//!
//! Table-driven, one byte at a time: the checksummed structures are a few KiB and read once
//! per open or log entry, so a dependency or a SIMD path would buy nothing measurable.

/// The reflected Castagnoli polynomial (0x1EDC6F41 bit-reversed).
const POLY: u32 = 0x82F6_3B78;

const fn make_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

static TABLE: [u32; 256] = make_table();

/// CRC-32C of `data` (initial value all ones, final inversion), as MS-VHDX specifies.
pub fn crc32c(data: &[u8]) -> u32 {
    !update(!0, data)
}

/// CRC-32C of `data` with the 4 bytes at `field` counted as zeroes: how VHDX checksums a
/// structure that contains its own checksum.
pub fn crc32c_skipping(data: &[u8], field: usize) -> u32 {
    let field_end = (field + 4).min(data.len());
    let field = field.min(data.len());
    let crc = update(!0, &data[..field]);
    let crc = update(crc, &[0u8; 4][..field_end - field]);
    !update(crc, &data[field_end..])
}

fn update(mut crc: u32, data: &[u8]) -> u32 {
    for &byte in data {
        crc = TABLE[((crc ^ byte as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value_matches_the_castagnoli_reference() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn skipping_a_field_equals_zeroing_it() {
        let mut data: Vec<u8> = (0..100u8).collect();
        let skipped = crc32c_skipping(&data, 4);
        data[4..8].fill(0);
        assert_eq!(skipped, crc32c(&data));
    }
}
