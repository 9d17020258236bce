//! Fixed-offset field access into on-disk structures.
//!
//! Every caller passes a buffer it allocated at the structure's full size, so the offsets are
//! constants inside it; the helpers still never panic on a short slice (they read zeroes),
//! so a mistake shows up as a rejected image instead of a crash.

fn take<const N: usize>(buf: &[u8], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = off.checked_add(N).and_then(|end| buf.get(off..end)) {
        out.copy_from_slice(src);
    }
    out
}

/// Little-endian u16 at `off`.
pub fn le16(buf: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(take(buf, off))
}

/// Little-endian u32 at `off`.
pub fn le32(buf: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(take(buf, off))
}

/// Little-endian u64 at `off`.
pub fn le64(buf: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(take(buf, off))
}

/// Big-endian u16 at `off`.
pub fn be16(buf: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(take(buf, off))
}

/// Big-endian u32 at `off`.
pub fn be32(buf: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(take(buf, off))
}

/// Big-endian u64 at `off`.
pub fn be64(buf: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(take(buf, off))
}

/// The bytes `off..off+len`, or an empty slice when they do not fit.
pub fn slice(buf: &[u8], off: usize, len: usize) -> &[u8] {
    off.checked_add(len)
        .and_then(|end| buf.get(off..end))
        .unwrap_or(&[])
}

/// Decodes UTF-16LE text, stopping at the first NUL.
pub fn utf16le(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// Decodes UTF-16BE text, stopping at the first NUL.
pub fn utf16be(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// Writes a little-endian u16 at `off` (the caller sized `buf`).
pub fn put_le16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

/// Writes a little-endian u32 at `off` (the caller sized `buf`).
pub fn put_le32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes a little-endian u64 at `off` (the caller sized `buf`).
pub fn put_le64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
