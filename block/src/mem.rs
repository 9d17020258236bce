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

    /// Zeroes a range, dropping whole pages when `unmap` allows.
    fn zero(&mut self, offset: u64, len: u64, unmap: bool) {
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let page = at / PAGE;
            let in_page = at % PAGE;
            let n = (PAGE - in_page).min(end - at);
            if n == PAGE && unmap {
                self.pages.remove(&page);
            } else if let Some(data) = self.pages.get_mut(&page) {
                data[in_page as usize..(in_page + n) as usize].fill(0);
            } else if !unmap {
                self.pages
                    .insert(page, vec![0u8; PAGE as usize].into_boxed_slice());
            }
            at += n;
        }
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
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "write", "read-only"));
        }
        let mut inner = self.inner.write();
        check_range("write", inner.size, offset, buf.len() as u64)?;
        inner.copy_in(buf, offset);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
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
        let end = offset + len;
        let first_page = offset / PAGE;
        let present = inner.pages.contains_key(&first_page);
        let mut page = first_page + 1;
        while page * PAGE < end && inner.pages.contains_key(&page) == present {
            page += 1;
        }
        let run_end = (page * PAGE).min(end);
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
