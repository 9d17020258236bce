//! Decompressing one compressed cluster.
//!
//! The stored stream may be followed by garbage (it is rounded up to whole sectors and may
//! share its last sector with the next cluster), so decompression stops as soon as one
//! cluster has been produced. A stream that produces less, or fails to decode, is an I/O
//! error on that cluster, never a panic.

use std::io::Read;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
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

/// Compresses one cluster; `None` when the result would not be smaller than `limit` bytes
/// (the cluster is then better stored plainly, as QEMU does).
pub fn compress(kind: CompressionType, input: &[u8], limit: usize) -> Option<Vec<u8>> {
    let out = match kind {
        CompressionType::Deflate => {
            // Raw deflate, no zlib header, as QEMU writes it.
            let mut c = Compress::new(Compression::default(), false);
            let mut out = vec![0u8; limit];
            match c.compress(input, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => {
                    out.truncate(c.total_out() as usize);
                    out
                }
                _ => return None,
            }
        }
        CompressionType::Zstd => {
            ruzstd::encoding::compress_to_vec(input, ruzstd::encoding::CompressionLevel::Fastest)
        }
    };
    (out.len() < limit).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let cluster: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let packed = compress(kind, &cluster, 65536).expect("compressible");
            let mut padded = packed.clone();
            padded.extend_from_slice(&[0xaa; 700]);
            let mut out = vec![0u8; 65536];
            decompress(kind, &padded, &mut out, 0).expect("decompress");
            assert_eq!(out, cluster);
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert!(compress(CompressionType::Deflate, &noise, 4096).is_none());
    }

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
