//! Random bytes for keys, salts, stripes and UUIDs, from the operating system.

use vdisk_block::{Error, Result};

/// Fills `buf` with random bytes from the OS.
pub fn fill(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        Error::new(
            vdisk_block::ErrorKind::Io,
            "random",
            format!("the OS gave no random bytes: {e}"),
        )
    })
}

/// A random (version 4) UUID in its text form, as LUKS headers store it.
pub fn uuid() -> Result<String> {
    let mut b = [0u8; 16];
    fill(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}
