//! Decompressing one compressed cluster.
//!
//! The stored stream may be followed by garbage (it is rounded up to whole sectors and may
//! share its last sector with the next cluster), so decompression stops as soon as one
//! cluster has been produced. A stream that produces less, or fails to decode, is an I/O
//! error on that cluster, never a panic.

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

thread_local! {
    // A decompressor's state (and zstd's window) costs more to set up than a 64 KiB cluster
    // costs to inflate: one per thread, reset per cluster.
    // QEMU stores raw deflate, without the zlib header and checksum.
    static INFLATE: std::cell::RefCell<Decompress> =
        std::cell::RefCell::new(Decompress::new(false));
    static UNZSTD: std::cell::RefCell<Option<zstd::stream::raw::Decoder<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn inflate(input: &[u8], out: &mut [u8], guest: u64) -> Result<()> {
    INFLATE.with(|d| inflate_with(&mut d.borrow_mut(), input, out, guest))
}

fn inflate_with(d: &mut Decompress, input: &[u8], out: &mut [u8], guest: u64) -> Result<()> {
    d.reset(false);
    match d.decompress(input, out, FlushDecompress::Finish) {
        Ok(Status::StreamEnd) | Ok(Status::Ok) | Ok(Status::BufError) => {}
        Err(e) => {
            // zlib-rs reports the state it was left in rather than the cause when a
            // finishing call runs into corrupt data; say what it means.
            let text = e.to_string();
            let text = if text.contains("bad state") {
                "the deflate data is invalid".to_string()
            } else {
                text
            };
            return Err(broken(guest, text));
        }
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
    use zstd::stream::raw::{Decoder, Operation};
    UNZSTD.with(|slot| {
        let mut slot = slot.borrow_mut();
        let mut dec = match slot.take() {
            Some(mut dec) => {
                // A failed cluster may have left a frame half decoded.
                dec.reinit().map_err(|e| broken(guest, e.to_string()))?;
                dec
            }
            None => Decoder::new().map_err(|e| broken(guest, e.to_string()))?,
        };
        let result = unzstd_with(&mut dec, input, out, guest);
        *slot = Some(dec);
        result
    })
}

fn unzstd_with(
    dec: &mut zstd::stream::raw::Decoder<'static>,
    input: &[u8],
    out: &mut [u8],
    guest: u64,
) -> Result<()> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    // Streaming, as qemu does: the stored frame may be followed by garbage (the rest of its
    // last sector), which a one-shot decode would try to parse as a second frame.
    let mut src = InBuffer::around(input);
    let mut dst = OutBuffer::around(out);
    loop {
        let (in_before, out_before) = (src.pos(), dst.pos());
        let hint = dec
            .run(&mut src, &mut dst)
            .map_err(|e| broken(guest, e.to_string()))?;
        let full = dst.pos() == dst.capacity();
        let stuck = src.pos() == in_before && dst.pos() == out_before;
        if full || hint == 0 || stuck {
            break;
        }
    }
    let filled = dst.pos();
    let want = dst.capacity();
    if filled != want {
        return Err(broken(
            guest,
            format!("it yields {filled} bytes instead of {want}"),
        ));
    }
    Ok(())
}

/// The deflate window qemu compresses with (`-12` in its `deflateInit2`): a 4 KiB history.
const QEMU_DEFLATE_WINDOW_BITS: u8 = 12;

/// The zstd level qemu uses (it leaves libzstd's default).
const QEMU_ZSTD_LEVEL: i32 = 3;

thread_local! {
    // Both compressors keep hundreds of KiB of state; one per thread, reset per cluster,
    // instead of allocating and initialising it again for every cluster.
    static DEFLATE: std::cell::RefCell<Compress> = std::cell::RefCell::new(
        Compress::new_with_window_bits(Compression::default(), false, QEMU_DEFLATE_WINDOW_BITS),
    );
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Compresses one cluster; `None` when the result would not be smaller than `limit` bytes
/// (the cluster is then better stored plainly, as QEMU does).
pub fn compress(kind: CompressionType, input: &[u8], limit: usize) -> Option<Vec<u8>> {
    // Room for the worst case (zlib's deflateBound, stored blocks): zlib-rs 0.6 panics instead
    // of returning a buffer error when a stored block does not fit in the output buffer.
    let bound = input.len() + input.len() / 8 + input.len() / 64 + 64;
    let mut out = vec![0u8; bound.max(limit)];
    let len = match kind {
        CompressionType::Deflate => DEFLATE.with(|c| {
            let mut c = c.borrow_mut();
            c.reset();
            match c.compress(input, &mut out, FlushCompress::Finish) {
                // Raw deflate, no zlib header, as QEMU writes it.
                Ok(Status::StreamEnd) => usize::try_from(c.total_out()).ok(),
                _ => None,
            }
        }),
        CompressionType::Zstd => ZSTD.with(|c| {
            let mut c = c.borrow_mut();
            if c.is_none() {
                *c = zstd::bulk::Compressor::new(QEMU_ZSTD_LEVEL).ok();
            }
            // Incompressible data is caught by the length check below.
            c.as_mut()?.compress_to_buffer(input, &mut out[..]).ok()
        }),
    }?;
    (len < limit).then(|| {
        out.truncate(len);
        out
    })
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
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            assert!(compress(kind, &noise, 4096).is_none());
            // The smallest clusters: incompressible data must be refused, not overflow.
            assert!(compress(kind, &noise[..512], 512).is_none());
        }
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
    fn a_failed_cluster_leaves_the_thread_decompressor_usable() {
        let cluster: Vec<u8> = (0..65536u32).map(|i| (i / 77) as u8).collect();
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let packed = compress(kind, &cluster, 65536).expect("compressible");
            let mut out = vec![0u8; 65536];
            // Cut off halfway: the decompressor stops inside a frame.
            assert!(decompress(kind, &packed[..packed.len() / 2], &mut out, 0).is_err());
            out.fill(0);
            decompress(kind, &packed, &mut out, 0).expect("whole stream after a cut one");
            assert_eq!(out, cluster);
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
