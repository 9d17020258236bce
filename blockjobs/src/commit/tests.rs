//! The commit job on in-memory chains: what is copied, what is zeroed, and what the top
//! reads afterwards.

use std::sync::Arc;

use vdisk_block::{BlockDev, BlockStatus, ImageInfo, MemImage, Preallocation, Result, ZeroMode};

use super::*;
use crate::convert::NoProgress;

/// Pages of the test layers: allocation is tracked per page.
const PAGE: u64 = 4096;

/// A layer over an optional backing device: pages it never wrote read from below.
struct Layer {
    own: MemImage,
    pages: parking_lot::Mutex<Vec<bool>>,
    backing: Option<Arc<dyn BlockDev>>,
}

impl Layer {
    fn new(size: u64, backing: Option<Arc<dyn BlockDev>>) -> Arc<Layer> {
        Arc::new(Layer {
            own: MemImage::new(size),
            pages: parking_lot::Mutex::new(vec![false; size.div_ceil(PAGE) as usize]),
            backing,
        })
    }

    fn mark(&self, offset: u64, len: u64) {
        let mut pages = self.pages.lock();
        for p in offset / PAGE..(offset + len).div_ceil(PAGE) {
            if let Some(slot) = pages.get_mut(p as usize) {
                *slot = true;
            }
        }
    }

    fn is_allocated(&self, offset: u64) -> bool {
        self.pages.lock().get((offset / PAGE) as usize) == Some(&true)
    }

    /// The end of the run of pages from `offset` that share its allocation, within `end`.
    fn run_end(&self, offset: u64, end: u64) -> u64 {
        let first = self.is_allocated(offset);
        let mut at = (offset / PAGE + 1) * PAGE;
        while at < end && self.is_allocated(at) == first {
            at += PAGE;
        }
        at.min(end)
    }
}

impl BlockDev for Layer {
    fn size(&self) -> u64 {
        self.own.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let end = self.run_end(at, offset + buf.len() as u64);
            let piece = &mut buf[done..(end - offset) as usize];
            match (&self.backing, self.is_allocated(at)) {
                (Some(b), false) if at < b.size() => {
                    let n = piece.len().min((b.size() - at) as usize);
                    b.read_at(&mut piece[..n], at)?;
                    piece[n..].fill(0);
                }
                (_, false) => piece.fill(0),
                (_, true) => self.own.read_at(piece, at)?,
            }
            done = (end - offset) as usize;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.mark(offset, buf.len() as u64);
        self.own.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.mark(offset, len);
        self.own.write_zeroes(offset, len, mode)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, ZeroMode::MayUnmap)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let end = self.run_end(offset, offset + len);
        let mut st = self.own.block_status(offset, end - offset)?;
        if !self.is_allocated(offset) {
            st.data = false;
            st.zero = self.backing.is_none();
            st.allocated = false;
        }
        Ok(st)
    }
    fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        self.pages
            .lock()
            .resize(new_size.div_ceil(PAGE) as usize, false);
        self.own.resize(new_size, prealloc)
    }
    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            cluster_size: Some(65536),
            ..self.own.info()?
        })
    }
    fn backing(&self) -> Option<Arc<dyn BlockDev>> {
        self.backing.clone()
    }
    fn is_read_only(&self) -> bool {
        false
    }
}

fn contents(dev: &dyn BlockDev) -> Vec<u8> {
    let mut v = vec![0u8; dev.size() as usize];
    dev.read_at(&mut v, 0).expect("read");
    v
}

#[test]
fn granularity_follows_the_base_cluster_within_qemu_bounds() {
    assert_eq!(granularity_for(None), 65536);
    assert_eq!(granularity_for(Some(512)), 4096);
    assert_eq!(granularity_for(Some(16384)), 16384);
    assert_eq!(granularity_for(Some(2 << 20)), 65536);
}

#[test]
fn commits_a_three_layer_chain_into_the_base() {
    let size = 4 << 20;
    let base = Layer::new(size, None);
    base.write_at(&vec![1u8; 1 << 20], 0).expect("base");
    let mid = Layer::new(size, Some(base.clone()));
    mid.write_at(&vec![2u8; 4096], 3 << 20).expect("mid");
    let top = Layer::new(size, Some(mid.clone()));
    top.write_at(&[3u8; 4096], 69_632).expect("top");
    top.write_zeroes(0, 65536, ZeroMode::KeepAllocated)
        .expect("zero");
    let top_dyn: Arc<dyn BlockDev> = top.clone();
    let before = contents(top.as_ref());
    let found = find_base(&top_dyn, None).expect("base");
    assert_eq!(found.depth, 1);
    let plan = plan(&top_dyn, 2).expect("plan");
    assert_eq!(plan.runs(), &[(0, 131072), (3 << 20, (3 << 20) + 65536)]);
    let stats = commit(&top_dyn, &plan, &CommitOptions::default(), &NoProgress).expect("commit");
    assert_eq!(stats.dirty, 3 * 65536);
    assert_eq!(stats.zeroed, 65536);
    assert_eq!(contents(base.as_ref()), before);
}

#[test]
fn a_base_shorter_than_the_top_grows() {
    let base = Layer::new(1 << 20, None);
    let top = Layer::new(2 << 20, Some(base.clone()));
    top.write_at(&[9u8; 512], (2 << 20) - 512).expect("write");
    let top_dyn: Arc<dyn BlockDev> = top.clone();
    let plan = plan(&top_dyn, 1).expect("plan");
    commit(&top_dyn, &plan, &CommitOptions::default(), &NoProgress).expect("commit");
    assert_eq!(base.size(), 2 << 20);
    assert_eq!(contents(base.as_ref()), contents(top.as_ref()));
}

#[test]
fn no_backing_file_is_reported() {
    let top: Arc<dyn BlockDev> = Layer::new(1 << 20, None);
    assert_eq!(find_base(&top, None), Err(BaseLookupError::NoBackingFile));
}

#[test]
fn the_rate_limit_spaces_the_copies() {
    let base = Layer::new(4 << 20, None);
    let top = Layer::new(4 << 20, Some(base.clone()));
    top.write_at(&vec![5u8; 3 << 20], 0).expect("write");
    let top_dyn: Arc<dyn BlockDev> = top.clone();
    let plan = plan(&top_dyn, 1).expect("plan");
    let started = std::time::Instant::now();
    let options = CommitOptions {
        rate: Some(8 << 20),
    };
    commit(&top_dyn, &plan, &options, &NoProgress).expect("commit");
    // Three 1 MiB copies at 8 MiB/s: the last may start only after 2 MiB were due.
    assert!(started.elapsed() >= std::time::Duration::from_millis(240));
}
