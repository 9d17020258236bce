//! The header section: file identifier and the two headers (MS-VHDX 2.2).
//!
//! Two headers exist so that one is always intact while the other is rewritten. The current
//! one is the valid header with the higher sequence number; equal sequence numbers are
//! accepted only when both headers are byte-identical (Disk2VHD writes them that way), as
//! qemu does.

use crate::bytes::{le16, le32, le64, put_le16, put_le32, put_le64, utf16le};
use crate::crc32c::crc32c_skipping;
use crate::guid::Guid;

/// Where the file identifier starts.
pub const FILE_ID_OFFSET: u64 = 0;
/// Where the two headers start.
pub const HEADER_OFFSETS: [u64; 2] = [64 * 1024, 128 * 1024];
/// Size of the checksummed header structure.
pub const HEADER_SIZE: usize = 4096;
/// The whole header section (file identifier, headers, region tables, reserved space).
pub const HEADER_SECTION: u64 = 1024 * 1024;

/// The file identifier signature.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
const HEADER_SIGNATURE: &[u8; 4] = b"head";

/// The creator string of the file identifier (informational).
pub fn parse_creator(file_id: &[u8]) -> Option<String> {
    if file_id.get(..8)? != FILE_SIGNATURE {
        return None;
    }
    Some(utf16le(crate::bytes::slice(file_id, 8, 512)))
}

/// One VHDX header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Higher is newer.
    pub sequence: u64,
    /// Changed before the first write of a session.
    pub file_write_guid: Guid,
    /// Changed before the first guest-visible change; children name it as parent linkage.
    pub data_write_guid: Guid,
    /// Non-zero when the log may hold entries to replay.
    pub log_guid: Guid,
    /// Must be 0.
    pub log_version: u16,
    /// Must be 1.
    pub version: u16,
    /// Bytes of the log (multiple of 1 MiB).
    pub log_length: u32,
    /// Where the log starts (multiple of 1 MiB).
    pub log_offset: u64,
}

impl Header {
    /// Parses a 4 KiB header, or says why it is not a valid one.
    pub fn parse(buf: &[u8]) -> std::result::Result<Header, String> {
        if buf.len() < HEADER_SIZE {
            return Err("header is truncated".into());
        }
        if &buf[..4] != HEADER_SIGNATURE {
            return Err("bad header signature".into());
        }
        let stored = le32(buf, 4);
        let computed = crc32c_skipping(&buf[..HEADER_SIZE], 4);
        if stored != computed {
            return Err(format!(
                "header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let header = Header {
            sequence: le64(buf, 8),
            file_write_guid: Guid::from_slice(&buf[16..32]),
            data_write_guid: Guid::from_slice(&buf[32..48]),
            log_guid: Guid::from_slice(&buf[48..64]),
            log_version: le16(buf, 64),
            version: le16(buf, 66),
            log_length: le32(buf, 68),
            log_offset: le64(buf, 72),
        };
        if header.version != 1 {
            return Err(format!("unsupported header version {}", header.version));
        }
        Ok(header)
    }

    /// The 4 KiB on-disk form, checksum included.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER_SIZE];
        buf[..4].copy_from_slice(HEADER_SIGNATURE);
        put_le64(&mut buf, 8, self.sequence);
        buf[16..32].copy_from_slice(&self.file_write_guid.0);
        buf[32..48].copy_from_slice(&self.data_write_guid.0);
        buf[48..64].copy_from_slice(&self.log_guid.0);
        put_le16(&mut buf, 64, self.log_version);
        put_le16(&mut buf, 66, self.version);
        put_le32(&mut buf, 68, self.log_length);
        put_le64(&mut buf, 72, self.log_offset);
        let crc = crc32c_skipping(&buf, 4);
        put_le32(&mut buf, 4, crc);
        buf
    }
}

/// Which header is current, or why none is.
pub fn choose_current(raw: [&[u8]; 2]) -> std::result::Result<(usize, Header), String> {
    let parsed = [Header::parse(raw[0]), Header::parse(raw[1])];
    match (&parsed[0], &parsed[1]) {
        (Ok(a), Ok(b)) => {
            if a.sequence > b.sequence {
                Ok((0, a.clone()))
            } else if b.sequence > a.sequence {
                Ok((1, b.clone()))
            } else if raw[0][..HEADER_SIZE] == raw[1][..HEADER_SIZE] {
                Ok((0, a.clone()))
            } else {
                Err(format!(
                    "both headers have sequence number {} but different contents",
                    a.sequence
                ))
            }
        }
        (Ok(a), Err(_)) => Ok((0, a.clone())),
        (Err(_), Ok(b)) => Ok((1, b.clone())),
        (Err(e1), Err(e2)) => Err(format!("no valid header (header 1: {e1}; header 2: {e2})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64) -> Header {
        Header {
            sequence: seq,
            file_write_guid: Guid([1; 16]),
            data_write_guid: Guid([2; 16]),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: 1 << 20,
        }
    }

    #[test]
    fn the_higher_valid_sequence_wins() {
        let (a, b) = (sample(5).encode(), sample(6).encode());
        assert_eq!(choose_current([&a, &b]).expect("valid").0, 1);
        assert_eq!(choose_current([&b, &a]).expect("valid").0, 0);
    }

    #[test]
    fn a_bad_checksum_disqualifies_a_header() {
        let a = sample(5).encode();
        let mut b = sample(9).encode();
        b[100] ^= 1;
        assert_eq!(choose_current([&a, &b]).expect("valid").1.sequence, 5);
        let mut a2 = a.clone();
        a2[8] ^= 1;
        let err = choose_current([&a2, &b]).expect_err("both bad");
        assert!(err.contains("no valid header"), "{err}");
    }

    #[test]
    fn equal_sequences_need_identical_headers() {
        let a = sample(7).encode();
        assert!(choose_current([&a, &a]).is_ok());
        let mut other = sample(7);
        other.data_write_guid = Guid([9; 16]);
        let b = other.encode();
        assert!(choose_current([&a, &b]).is_err());
    }

    #[test]
    fn version_other_than_one_is_invalid() {
        let mut h = sample(1);
        h.version = 2;
        assert!(Header::parse(&h.encode()).is_err());
    }

    #[test]
    fn parses_the_libvhdi_fragments() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/fragments/libvhdi");
        let Ok(header) = std::fs::read(dir.join("image_header.1")) else {
            eprintln!("shared fixtures absent: skipping fragment test");
            return;
        };
        let h = Header::parse(&header).expect("real header parses");
        assert_eq!(h.version, 1);
        assert_eq!(h.log_offset % (1 << 20), 0);
        let id = std::fs::read(dir.join("file_identifier.1")).expect("fragment");
        assert!(parse_creator(&id).is_some());
    }
}
