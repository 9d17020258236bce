//! Decompressing one compressed cluster.
//!
//! The stored stream may be followed by garbage (it is rounded up to whole sectors and may
//! share its last sector with the next cluster), so decompression stops as soon as one
//! cluster has been produced. A stream that produces less, or fails to decode, is an I/O
//! error on that cluster, never a panic.

use std::io::Read;

use flate2::{Decompress, FlushDecompress, Status};
use vdisk_block::{Error, ErrorKind, Result};

use crate::header::CompressionType;

fn broken(guest: u64, why: String) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        "read compressed cluster",
        format!("the compressed cluster at guest offset {guest:#x} does not decompress: {why}"),
    )
    .at_offset(guest)
}

/// Decompresses `input` into `out`, which must be exactly one cluster long.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8], guest: u64) -> Result<()> {
    match kind {
        CompressionType::Deflate => inflate(input, out, guest),
        CompressionType::Zstd => unzstd(input, out, guest),
    }
}

fn inflate(input: &[u8], out: &mut [u8], guest: u64) -> Result<()> {
    // QEMU stores raw deflate, without the zlib header and checksum.
    let mut d = Decompress::new(false);
    match d.decompress(input, out, FlushDecompress::Finish) {
        Ok(Status::StreamEnd) | Ok(Status::Ok) | Ok(Status::BufError) => {}
        Err(e) => return Err(broken(guest, e.to_string())),
    }
    let produced = d.total_out();
    if produced != out.len() as u64 {
        return Err(broken(
            guest,
            format!("it yields {produced} bytes instead of {}", out.len()),
        ));
    }
    Ok(())
}

fn unzstd(input: &[u8], out: &mut [u8], guest: u64) -> Result<()> {
    let mut src = input;
    let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut src)
        .map_err(|e| broken(guest, e.to_string()))?;
    let mut filled = 0;
    while filled < out.len() {
        match dec.read(&mut out[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) => return Err(broken(guest, e.to_string())),
        }
    }
    if filled != out.len() {
        return Err(broken(
            guest,
            format!("it yields {filled} bytes instead of {}", out.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error() {
        let mut out = vec![0u8; 4096];
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let err = decompress(kind, &[0xff; 64], &mut out, 0x1000)
                .expect_err("garbage must not decompress");
            assert_eq!(err.kind(), ErrorKind::Corrupt);
            assert!(decompress(kind, &[], &mut out, 0).is_err());
        }
    }

    #[test]
    fn short_stream_is_an_error() {
        // A stored (uncompressed) deflate block of 3 bytes: too short for a cluster.
        let stream = [0x01, 0x03, 0x00, 0xfc, 0xff, b'a', b'b', b'c'];
        let mut out = vec![0u8; 512];
        assert!(decompress(CompressionType::Deflate, &stream, &mut out, 0).is_err());
        let mut exact = vec![0u8; 3];
        decompress(CompressionType::Deflate, &stream, &mut exact, 0).expect("exact size");
        assert_eq!(&exact, b"abc");
    }
}
