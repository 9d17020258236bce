//! Persistent dirty bitmaps: the bitmap directory, validated as QEMU does (here), the bits
//! in memory (`dirty.rs`), the bitmaps of an open image and their operations (`live.rs`)
//! and storing them back crash-safely (`store.rs`).

mod dirty;
pub(crate) mod live;
mod store;

use vdisk_block::{Error, HostFile, Result};

use crate::header::{autoclear, Header};

/// Bitmap flag: the bitmap was not saved cleanly and cannot be trusted.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Bitmap flag: the bitmap is enabled (tracks writes).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Bitmap flag: extra data may be ignored by readers that do not know it.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;

/// One persistent bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Unique name.
    pub name: String,
    /// Bytes of guest data one bit covers.
    pub granularity: u64,
    /// Raw flags (see the `FLAG_*` constants).
    pub flags: u32,
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
}

impl Bitmap {
    /// The flags as `qemu-img info` names them.
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.flags & FLAG_IN_USE != 0 {
            out.push("in-use");
        }
        if self.flags & FLAG_AUTO != 0 {
            out.push("auto");
        }
        out
    }
}

fn bad(message: String) -> Error {
    Error::corrupt("read bitmaps", message)
}

/// Reads and validates the bitmap directory (empty when the image has no valid bitmaps
/// extension).
pub fn read_directory(file: &HostFile, h: &Header) -> Result<Vec<Bitmap>> {
    let Some(ext) = h.extensions.bitmaps else {
        return Ok(Vec::new());
    };
    if h.autoclear_features & autoclear::BITMAPS == 0 {
        return Ok(Vec::new());
    }
    // The header check capped the directory at 64 MiB.
    if ext.directory_offset.saturating_add(ext.directory_size) > file.len()? {
        return Err(bad(
            "the bitmap directory lies past the end of the file".into()
        ));
    }
    let mut dir = vec![0u8; ext.directory_size as usize];
    file.read_at(&mut dir, ext.directory_offset)?;
    let cs = h.cluster_size();
    let mut out: Vec<Bitmap> = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        if pos + 24 > dir.len() {
            return Err(bad(format!(
                "bitmap directory entry {} is incomplete",
                out.len()
            )));
        }
        let e = &dir[pos..];
        let be32 = |at: usize| u32::from_be_bytes([e[at], e[at + 1], e[at + 2], e[at + 3]]);
        let table_offset = (u64::from(be32(0)) << 32) | u64::from(be32(4));
        let table_size = be32(8);
        let flags = be32(12);
        let kind = e[16];
        let gran_bits = u32::from(e[17]);
        let name_size = usize::from(u16::from_be_bytes([e[18], e[19]]));
        let extra = be32(20) as usize;
        let len = (24 + extra + name_size + 7) & !7;
        if extra > 0 && flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
            return Err(bad(
                "a bitmap has extra data this driver cannot interpret".into()
            ));
        }
        if pos + 24 + extra + name_size > dir.len() {
            return Err(bad(format!(
                "bitmap directory entry {} is incomplete",
                out.len()
            )));
        }
        if name_size == 0 || name_size > 1023 {
            return Err(bad(format!("bitmap name length {name_size} is invalid")));
        }
        if !(9..=31).contains(&gran_bits) {
            return Err(bad(format!("bitmap granularity 2^{gran_bits} is invalid")));
        }
        if kind != 1 {
            return Err(bad(format!("bitmap type {kind} is unknown")));
        }
        if flags & !(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE) != 0 {
            return Err(bad(format!("bitmap flags {flags:#x} have unknown bits")));
        }
        if table_offset & (cs - 1) != 0 {
            return Err(bad(format!(
                "bitmap table offset {table_offset:#x} unaligned"
            )));
        }
        let granularity = 1u64 << gran_bits;
        let bits = h.size.div_ceil(granularity);
        let expected = bits.div_ceil(cs * 8);
        if u64::from(table_size) != expected {
            return Err(bad(format!(
                "bitmap table size {table_size} does not match the virtual size (expected {expected})"
            )));
        }
        let name_at = 24 + extra;
        let name = String::from_utf8_lossy(&e[name_at..name_at + name_size]).into_owned();
        if out.iter().any(|b| b.name == name) {
            return Err(bad(format!("duplicate bitmap name '{name}'")));
        }
        out.push(Bitmap {
            name,
            granularity,
            flags,
            table_offset,
            table_size,
        });
        pos += len;
    }
    if out.len() as u64 != u64::from(ext.nb_bitmaps) {
        return Err(bad(format!(
            "{} bitmaps found, the header says {}",
            out.len(),
            ext.nb_bitmaps
        )));
    }
    Ok(out)
}
