//! Engine tests against in-memory images: contents, zero handling and failure paths.

use std::sync::Arc;

use vdisk_block::{
    BlockDev, BlockStatus, Error, ImageInfo, MemImage, Preallocation, Result, ZeroMode,
};

use super::{convert, ConvertOptions, NoProgress};

/// A source whose reads fail at one offset, to prove a failure stops every worker.
struct FailingAt {
    inner: Arc<MemImage>,
    bad: u64,
    /// Panic instead of returning the error, as a buggy driver or dependency would.
    panics: bool,
}

impl BlockDev for FailingAt {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if (offset..offset + buf.len() as u64).contains(&self.bad) {
            assert!(!self.panics, "injected panic at {offset:#x}");
            return Err(Error::io("read", std::io::Error::other("injected")).at_offset(offset));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.inner.write_zeroes(offset, len, mode)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.inner.block_status(offset, len)
    }
    fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        self.inner.resize(new_size, prealloc)
    }
    fn info(&self) -> Result<ImageInfo> {
        self.inner.info()
    }
    fn is_read_only(&self) -> bool {
        true
    }
}

/// 9 MiB + 300 bytes: data, a zero block written as data, a hole, data with a short zero gap.
fn sample() -> Arc<MemImage> {
    let size = (9 << 20) + 300;
    let img = MemImage::shared(size);
    let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 253) as u8 | 1).collect();
    img.write_at(&data, 0).expect("write");
    img.write_at(&vec![0u8; 1 << 20], 3 << 20)
        .expect("write zeroes as data");
    let mut gappy = data[..(2 << 20)].to_vec();
    gappy[4096..6144].fill(0);
    img.write_at(&gappy, 6 << 20).expect("write");
    img.write_at(&[9u8; 300], 9 << 20).expect("write tail");
    img
}

fn copy(options: &ConvertOptions, target: &Arc<MemImage>) -> Result<super::ConvertStats> {
    let sources: Vec<Arc<dyn BlockDev>> = vec![sample()];
    convert(&sources, target.as_ref(), options, &NoProgress)
}

#[test]
fn copies_contents_with_every_worker_setting() {
    let expected = {
        let mut v = sample().to_vec();
        v.resize(v.len().next_multiple_of(512), 0);
        v
    };
    for parallel in [1, 3, 8, 16] {
        for out_of_order in [false, true] {
            let target = MemImage::shared(expected.len() as u64);
            target
                .write_at(&vec![0xaa; expected.len()], 0)
                .expect("prefill");
            let options = ConvertOptions {
                parallel,
                out_of_order,
                ..ConvertOptions::default()
            };
            let stats = copy(&options, &target).expect("convert");
            assert_eq!(target.to_vec(), expected, "-m {parallel} -W {out_of_order}");
            assert_eq!(stats.total, expected.len() as u64);
            // The hole and the zero block were never written as data.
            assert!(stats.written < stats.total - (2 << 20));
        }
    }
}

#[test]
fn target_is_zero_writes_no_zeroes_and_s0_writes_all() {
    let len = ((9u64 << 20) + 512) as usize;
    let target = MemImage::shared(len as u64);
    let options = ConvertOptions {
        target_is_zero: true,
        ..ConvertOptions::default()
    };
    let stats = copy(&options, &target).expect("convert");
    assert_eq!(stats.zeroed, 0);
    assert!(stats.skipped >= 3 << 20);

    // As qemu-img -S 0: every byte is written as data, the source's hole too, even onto
    // a target known to read as zeroes.
    for target_is_zero in [false, true] {
        let target = MemImage::shared(len as u64);
        let options = ConvertOptions {
            min_sparse: 0,
            target_is_zero,
            ..ConvertOptions::default()
        };
        let stats = copy(&options, &target).expect("convert");
        assert_eq!(stats.written, len as u64);
        assert!(stats.read < stats.written, "known zeroes are not read");
        assert_eq!((stats.zeroed, stats.skipped), (0, 0));
    }
}

#[test]
fn a_failing_read_stops_the_copy_with_its_error() {
    for out_of_order in [false, true] {
        let source: Arc<dyn BlockDev> = Arc::new(FailingAt {
            inner: sample(),
            bad: (1 << 20) + 5,
            panics: false,
        });
        let target = MemImage::shared((9 << 20) + 512);
        let options = ConvertOptions {
            out_of_order,
            ..ConvertOptions::default()
        };
        let err = convert(&[source], target.as_ref(), &options, &NoProgress)
            .expect_err("the injected failure must surface");
        assert_eq!(err.op(), "read");
        assert!(err.to_string().contains("injected"));
    }
}

#[test]
fn a_panicking_worker_ends_the_copy_instead_of_hanging_it() {
    // The chunk after the panicking one waits for its turn to write: without release on
    // unwind it would wait forever and the scope would never end.
    for out_of_order in [false, true] {
        let source: Arc<dyn BlockDev> = Arc::new(FailingAt {
            inner: sample(),
            bad: 5,
            panics: true,
        });
        let target = MemImage::shared((9 << 20) + 512);
        let options = ConvertOptions {
            out_of_order,
            parallel: 4,
            chunk_size: 64 << 10,
            ..ConvertOptions::default()
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            convert(&[source], target.as_ref(), &options, &NoProgress)
        }));
        assert!(outcome.is_err(), "the worker's panic must reach the caller");
    }
}

#[test]
fn a_small_target_is_refused() {
    let target = MemImage::shared(1 << 20);
    let err = copy(&ConvertOptions::default(), &target).expect_err("too small");
    assert_eq!(err.message(), "output file is smaller than input file");
}
