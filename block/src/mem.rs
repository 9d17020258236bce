//! An in-memory image: the reference model for tests and a scratch device.
//!
//! Storage is a sparse map of fixed-size pages so that multi-GiB model disks cost only what
//! was written. Absent pages read as zeroes and report as unallocated holes.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::dev::{check_range, BlockDev, BlockStatus, ImageInfo, Preallocation, ZeroMode};
use crate::error::{Error, ErrorKind, Result};

const PAGE: u64 = 4096;

/// A sparse in-memory block device.
#[derive(Debug)]
pub struct MemImage {
    inner: RwLock<Inner>,
    read_only: bool,
}

#[derive(Debug)]
struct Inner {
    size: u64,
    pages: BTreeMap<u64, Box<[u8]>>,
}

impl MemImage {
    /// An all-zero device of `size` bytes.
    pub fn new(size: u64) -> Self {
        MemImage {
            inner: RwLock::new(Inner {
                size,
                pages: BTreeMap::new(),
            }),
            read_only: false,
        }
    }

    /// A device holding `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let img = Self::new(bytes.len() as u64);
        // Writing into a fresh, writable, correctly sized image cannot fail.
        let _ = img.write_at(bytes, 0);
        img
    }

    /// A shareable handle.
    pub fn shared(size: u64) -> Arc<Self> {
        Arc::new(Self::new(size))
    }

    /// A read-only device holding `bytes`: every change fails with `ReadOnly`.
    pub fn read_only_from_bytes(bytes: &[u8]) -> Self {
        let mut img = Self::from_bytes(bytes);
        img.read_only = true;
        img
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        if self.read_only {
            Err(Error::new(
                ErrorKind::ReadOnly,
                op,
                "the in-memory image is read-only",
            ))
        } else {
            Ok(())
        }
    }

    /// Every byte of the device (for tests of small images).
    pub fn to_vec(&self) -> Vec<u8> {
        let size = self.size() as usize;
        let mut out = vec![0u8; size];
        let _ = self.read_at(&mut out, 0);
        out
    }
}

impl Inner {
    fn copy_out(&self, buf: &mut [u8], offset: u64) {
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let page = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - pos);
            match self.pages.get(&page) {
                Some(data) => buf[pos..pos + n].copy_from_slice(&data[in_page..in_page + n]),
                None => buf[pos..pos + n].fill(0),
            }
            pos += n;
        }
    }

    fn copy_in(&mut self, buf: &[u8], offset: u64) {
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let page = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - pos);
            let data = self
                .pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            data[in_page..in_page + n].copy_from_slice(&buf[pos..pos + n]);
            pos += n;
        }
    }

    /// Zeroes a range, dropping whole pages when `unmap` allows. Only pages that exist are
    /// visited (absent pages already read as zeroes), so huge ranges cost what they hold.
    fn zero(&mut self, offset: u64, len: u64, unmap: bool) {
        if len == 0 {
            return;
        }
        let end = offset + len;
        let present: Vec<u64> = self
            .pages
            .range(offset / PAGE..=(end - 1) / PAGE)
            .map(|(&page, _)| page)
            .collect();
        for page in present {
            let start = page * PAGE;
            let from = offset.max(start);
            let to = end.min(start + PAGE);
            if unmap && from == start && to == start + PAGE {
                self.pages.remove(&page);
            } else if let Some(data) = self.pages.get_mut(&page) {
                data[(from - start) as usize..(to - start) as usize].fill(0);
            }
        }
    }

    /// End of the run of pages starting at `offset` that are all present (or all absent),
    /// capped at `end`; found with range queries so huge holes cost nothing.
    fn run_end(&self, offset: u64, end: u64) -> (bool, u64) {
        let first = offset / PAGE;
        let present = self.pages.contains_key(&first);
        let run_end = if present {
            let mut last = first;
            for (&page, _) in self.pages.range(first + 1..) {
                if page != last + 1 || page * PAGE >= end {
                    break;
                }
                last = page;
            }
            (last + 1) * PAGE
        } else {
            self.pages
                .range(first + 1..)
                .next()
                .map_or(end, |(&page, _)| page * PAGE)
        };
        (present, run_end.min(end))
    }
}

impl BlockDev for MemImage {
    fn size(&self) -> u64 {
        self.inner.read().size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let inner = self.inner.read();
        check_range("read", inner.size, offset, buf.len() as u64)?;
        inner.copy_out(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable("write")?;
        let mut inner = self.inner.write();
        check_range("write", inner.size, offset, buf.len() as u64)?;
        inner.copy_in(buf, offset);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.check_writable("write zeroes")?;
        let mut inner = self.inner.write();
        check_range("write zeroes", inner.size, offset, len)?;
        inner.zero(offset, len, mode == ZeroMode::MayUnmap);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, ZeroMode::MayUnmap)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let inner = self.inner.read();
        check_range("block status", inner.size, offset, len)?;
        if len == 0 {
            return Err(Error::invalid("block status", "empty range"));
        }
        let (present, run_end) = inner.run_end(offset, offset + len);
        Ok(BlockStatus {
            offset,
            len: run_end - offset,
            data: present,
            zero: !present,
            allocated: true,
            compressed: false,
            host: None,
        })
    }

    fn resize(&self, new_size: u64, _prealloc: Preallocation) -> Result<()> {
        self.check_writable("resize")?;
        let mut inner = self.inner.write();
        if new_size < inner.size {
            let tail = new_size % PAGE;
            let keep_pages = new_size.div_ceil(PAGE);
            inner.pages.retain(|&p, _| p < keep_pages);
            if tail != 0 {
                if let Some(data) = inner.pages.get_mut(&(new_size / PAGE)) {
                    data[tail as usize..].fill(0);
                }
            }
        }
        inner.size = new_size;
        Ok(())
    }

    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            format: "memory".into(),
            virtual_size: self.size(),
            ..ImageInfo::default()
        })
    }

    fn has_zero_init(&self) -> bool {
        true
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_sparse_images_cost_what_they_hold() {
        let size = 1u64 << 40;
        let img = MemImage::new(size);
        img.write_at(b"tail", size - 4).expect("write");
        img.write_at(&[7u8; 10_000], 1 << 30).expect("write");
        // A few extents describe the whole TiB, without walking it page by page.
        let mut at = 0;
        let mut extents = Vec::new();
        while at < size {
            let st = img.block_status(at, size - at).expect("status");
            extents.push((st.offset, st.len, st.data));
            at += st.len;
        }
        assert_eq!(
            extents,
            vec![
                (0, 1 << 30, false),
                (1 << 30, 3 * PAGE, true),
                (
                    (1 << 30) + 3 * PAGE,
                    size - PAGE - (1 << 30) - 3 * PAGE,
                    false
                ),
                (size - PAGE, PAGE, true),
            ]
        );
        img.write_zeroes(0, size, ZeroMode::KeepAllocated)
            .expect("zero everything");
        let mut buf = [1u8; 4];
        img.read_at(&mut buf, size - 4).expect("read");
        assert_eq!(buf, [0; 4]);
        img.write_zeroes(0, size, ZeroMode::MayUnmap)
            .expect("unmap");
        assert_eq!(img.inner.read().pages.len(), 0);
    }

    #[test]
    fn partial_pages_are_zeroed_in_place() {
        let img = MemImage::from_bytes(&[5u8; 3 * PAGE as usize]);
        img.write_zeroes(100, 2 * PAGE, ZeroMode::MayUnmap)
            .expect("zero");
        let bytes = img.to_vec();
        assert!(bytes[..100].iter().all(|&b| b == 5));
        assert!(bytes[100..100 + 2 * PAGE as usize].iter().all(|&b| b == 0));
        assert!(bytes[100 + 2 * PAGE as usize..].iter().all(|&b| b == 5));
        // The one whole page inside the range was dropped, the partial ones kept.
        assert_eq!(img.inner.read().pages.len(), 2);
    }

    #[test]
    fn read_only_images_refuse_changes() {
        let img = MemImage::read_only_from_bytes(&[1u8; 8192]);
        assert!(img.is_read_only());
        let kinds = [
            img.write_at(b"x", 0).map_err(|e| e.kind()),
            img.write_zeroes(0, 1, ZeroMode::MayUnmap)
                .map_err(|e| e.kind()),
            img.discard(0, 4096).map_err(|e| e.kind()),
            img.resize(0, Preallocation::Off).map_err(|e| e.kind()),
        ];
        for k in kinds {
            assert_eq!(k, Err(ErrorKind::ReadOnly));
        }
        assert_eq!(img.to_vec(), vec![1u8; 8192]);
    }
}
