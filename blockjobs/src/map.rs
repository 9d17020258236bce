//! The allocation map of an image as `qemu-img map` reports it, for any format.
//!
//! The walk asks the top image for the status of each range and descends the backing chain
//! while a layer neither holds the range nor knows it reads as zeroes. Neighbouring extents
//! merge only when every flag, the depth and the file agree and their host offsets continue
//! each other, so our output lines up with qemu-img's line for line.

use std::path::PathBuf;
use std::sync::Arc;

use vdisk_block::{BlockDev, Error, Result};

/// qemu measures every device in 512-byte sectors and rounds a partial last sector up.
pub const SECTOR: u64 = 512;

/// qemu-img asks for at most this much block status in one call; keeping the same step
/// keeps merged extents identical even where a layer answers with shorter runs.
const MAP_STEP: u64 = 1 << 30;

/// The length qemu shows for `dev`: its size rounded up to a whole sector. The bytes past
/// the real end of a raw file read as zeroes.
pub fn visible_len(dev: &dyn BlockDev) -> u64 {
    let size = dev.size();
    size.checked_next_multiple_of(SECTOR).unwrap_or(size)
}

/// One extent of the map, with qemu-img's fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MapEntry {
    /// Guest offset of the extent.
    pub start: u64,
    /// Length in bytes (zero only for the placeholder of an empty range).
    pub length: u64,
    /// The range holds data in the layer that decides it.
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// The data is stored compressed.
    pub compressed: bool,
    /// How many backing layers down the deciding layer sits (0 = the image itself).
    pub depth: u64,
    /// Some layer of the chain holds the range (`false`: nothing does, it reads as zeroes).
    pub present: bool,
    /// Host offset of the data, where the layer has a plain mapping.
    pub offset: Option<u64>,
    /// The host file `offset` refers to.
    pub filename: Option<PathBuf>,
}

impl MapEntry {
    /// True when `next` may be folded into `self`, exactly as qemu-img decides.
    pub fn mergeable(&self, next: &MapEntry) -> bool {
        if self.length == 0 {
            return false;
        }
        let same_flags = self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.filename == next.filename
            && self.offset.is_some() == next.offset.is_some();
        if !same_flags {
            return false;
        }
        match (self.offset, next.offset) {
            (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
            _ => true,
        }
    }
}

/// Status of the extent of `top` starting at `offset`, at most `len` bytes long, found by
/// descending the backing chain until a layer decides the contents.
pub fn chain_status(top: &Arc<dyn BlockDev>, offset: u64, len: u64) -> Result<MapEntry> {
    let mut layer = Arc::clone(top);
    let mut depth = 0;
    let mut len = len;
    loop {
        let size = layer.size();
        if offset >= size {
            // Only the top layer is ever asked past its end (backing layers are entered only
            // below their size): this is the partial last sector of a raw file, which qemu's
            // file driver reports as present zeroes mapped one to one.
            return Ok(MapEntry {
                start: offset,
                length: len,
                data: false,
                zero: true,
                compressed: false,
                depth,
                present: true,
                offset: Some(offset),
                filename: layer.info().ok().map(|i| i.filename),
            });
        }
        let asked = len.min(size - offset);
        let st = layer.block_status(offset, asked)?;
        // Every walk advances by the extent's length: a driver that answered with nothing,
        // or with more than was asked, would loop forever or overrun, so it is refused.
        if st.len == 0 || st.len > asked || st.offset != offset {
            return Err(Error::corrupt(
                "block status",
                format!(
                    "the driver described {}+{} when asked for {offset}+{asked}",
                    st.offset, st.len
                ),
            )
            .at_offset(offset));
        }
        len = st.len;
        if st.data || st.zero {
            return Ok(MapEntry {
                start: offset,
                length: st.len,
                data: st.data,
                zero: st.zero,
                compressed: st.compressed,
                depth,
                present: st.allocated,
                offset: st.host.as_ref().map(|h| h.offset),
                filename: st.host.map(|h| h.file),
            });
        }
        match layer.backing() {
            Some(next) if offset < next.size() => {
                layer = next;
                depth += 1;
            }
            // No backing layer holds the range: it reads as zeroes from here.
            _ => {
                return Ok(MapEntry {
                    start: offset,
                    length: st.len,
                    data: false,
                    zero: true,
                    compressed: st.compressed,
                    depth,
                    present: false,
                    offset: None,
                    filename: None,
                })
            }
        }
    }
}

/// Walks the map of `dev` from `start` over at most `max_length` bytes (the whole device
/// when `None`), merging extents as qemu-img does, and hands each finished entry to `emit`
/// together with the entry that follows it (which `emit` may adjust, as qemu-img's human
/// printer does to merge more). An empty range yields one placeholder entry of length 0.
pub fn walk_map<F>(
    dev: &Arc<dyn BlockDev>,
    start: u64,
    max_length: Option<u64>,
    mut emit: F,
) -> Result<()>
where
    F: FnMut(&MapEntry, Option<&mut MapEntry>) -> Result<()>,
{
    let mut length = visible_len(dev.as_ref());
    if let Some(max) = max_length {
        length = length.min(start.saturating_add(max));
    }
    let mut curr = MapEntry {
        start,
        ..MapEntry::default()
    };
    while curr.start + curr.length < length {
        let offset = curr.start + curr.length;
        let n = (length - offset).min(MAP_STEP);
        let mut next = chain_status(dev, offset, n)?;
        if curr.mergeable(&next) {
            curr.length += next.length;
            continue;
        }
        if curr.length > 0 {
            emit(&curr, Some(&mut next))?;
        }
        curr = next;
    }
    emit(&curr, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdisk_block::{MemImage, ZeroMode};

    fn collect(dev: &Arc<dyn BlockDev>, start: u64, max: Option<u64>) -> Vec<MapEntry> {
        let mut out = Vec::new();
        walk_map(dev, start, max, |e, _| {
            out.push(e.clone());
            Ok(())
        })
        .expect("walk");
        out
    }

    #[test]
    fn empty_range_yields_placeholder() {
        let dev: Arc<dyn BlockDev> = Arc::new(MemImage::new(0));
        let entries = collect(&dev, 0, None);
        assert_eq!(entries, vec![MapEntry::default()]);
    }

    #[test]
    fn merges_contiguous_extents_and_splits_on_flags() {
        let dev: Arc<dyn BlockDev> = Arc::new(MemImage::new(1 << 20));
        dev.write_at(&[1u8; 8192], 0).expect("write");
        dev.write_zeroes(8192, 4096, ZeroMode::KeepAllocated)
            .expect("zero");
        let entries = collect(&dev, 0, None);
        let total: u64 = entries.iter().map(|e| e.length).sum();
        assert_eq!(total, 1 << 20);
        for pair in entries.windows(2) {
            assert!(!pair[0].mergeable(&pair[1]), "{pair:?} should have merged");
            assert_eq!(pair[0].start + pair[0].length, pair[1].start);
        }
    }

    /// A device whose block status never advances, as a buggy driver might answer.
    struct Stuck(MemImage);

    impl BlockDev for Stuck {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.0.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
            self.0.write_zeroes(offset, len, mode)
        }
        fn discard(&self, offset: u64, len: u64) -> Result<()> {
            self.0.discard(offset, len)
        }
        fn flush(&self) -> Result<()> {
            self.0.flush()
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<vdisk_block::BlockStatus> {
            let mut st = self.0.block_status(offset, len)?;
            st.len = 0;
            Ok(st)
        }
        fn resize(&self, size: u64, p: vdisk_block::Preallocation) -> Result<()> {
            self.0.resize(size, p)
        }
        fn info(&self) -> Result<vdisk_block::ImageInfo> {
            self.0.info()
        }
        fn is_read_only(&self) -> bool {
            self.0.is_read_only()
        }
    }

    #[test]
    fn a_driver_that_does_not_advance_is_an_error_not_a_hang() {
        let dev: Arc<dyn BlockDev> = Arc::new(Stuck(MemImage::new(1 << 20)));
        let err = walk_map(&dev, 0, None, |_, _| Ok(())).expect_err("must fail");
        assert_eq!(err.kind(), vdisk_block::ErrorKind::Corrupt);
    }

    #[test]
    fn max_length_limits_the_walk() {
        let dev: Arc<dyn BlockDev> = Arc::new(MemImage::new(1 << 20));
        let entries = collect(&dev, 1000, Some(5000));
        assert_eq!(entries.first().map(|e| e.start), Some(1000));
        assert_eq!(entries.iter().map(|e| e.length).sum::<u64>(), 5000);
    }
}
