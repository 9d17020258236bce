//! The model checker over raw images: every engine and cache mode, with reopen-and-compare.

use std::path::Path;
use std::sync::Arc;

use vdisk_block::testing::{ModelTest, TempDir};
use vdisk_block::{
    BlockDev, CacheMode, CreateOptions, EngineChoice, EngineKind, Format, OpenOptions, RawFormat,
    RawImage,
};

const SIZE: u64 = 16 << 20;

fn create(path: &Path, size: u64) {
    RawFormat
        .create(
            path,
            CreateOptions {
                size,
                ..CreateOptions::default()
            },
        )
        .expect("create raw image");
}

fn options(cache: CacheMode, engine: EngineChoice) -> OpenOptions {
    OpenOptions {
        cache,
        engine,
        ..OpenOptions::read_write()
    }
}

/// Runs the model over a fresh raw image of `size` bytes and checks the engine it got.
fn run_model(cache: CacheMode, engine: EngineChoice, size: u64, ops: usize, seed: u64) {
    let dir = TempDir::new("model-raw").expect("tempdir");
    let path = dir.join("disk.raw");
    create(&path, size);
    let opts = options(cache, engine);
    let probe = RawImage::open(&path, &opts).expect("open");
    let expected = match engine {
        EngineChoice::Sync => EngineKind::Sync,
        _ => EngineKind::IoUring,
    };
    assert_eq!(
        probe.file().engine(),
        expected,
        "{:?}",
        probe.file().engine_note()
    );
    drop(probe);
    let report = ModelTest::new(size)
        .threads(4)
        .ops(ops)
        .seed(seed)
        .large_io(3 << 20)
        .discard_zeroes(true)
        .reopen(true)
        .run(|| {
            let dev: Arc<dyn BlockDev> = Arc::new(RawImage::open(&path, &opts)?);
            Ok(dev)
        })
        .unwrap_or_else(|f| panic!("{cache:?}/{engine:?}: {f}"));
    assert_eq!(report.opens, 2);
    assert!(report.writes > 0 && report.zeroes > 0 && report.discards > 0);
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        size,
        "the image keeps its size"
    );
}

#[test]
fn sync_writeback() {
    run_model(CacheMode::Writeback, EngineChoice::Sync, SIZE, 1000, 1);
}

#[test]
fn sync_none() {
    run_model(CacheMode::None, EngineChoice::Sync, SIZE, 1000, 2);
}

#[test]
fn sync_unsafe() {
    run_model(CacheMode::Unsafe, EngineChoice::Sync, SIZE, 1000, 3);
}

#[test]
fn sync_writethrough() {
    run_model(CacheMode::Writethrough, EngineChoice::Sync, SIZE, 400, 4);
}

#[test]
fn uring_writeback() {
    run_model(CacheMode::Writeback, EngineChoice::IoUring, SIZE, 1000, 5);
}

#[test]
fn uring_none() {
    run_model(CacheMode::None, EngineChoice::IoUring, SIZE, 1000, 6);
}

#[test]
fn uring_unsafe() {
    run_model(CacheMode::Unsafe, EngineChoice::IoUring, SIZE, 1000, 7);
}

#[test]
fn uring_writethrough() {
    run_model(CacheMode::Writethrough, EngineChoice::IoUring, SIZE, 400, 8);
}

#[test]
fn uring_directsync() {
    run_model(CacheMode::DirectSync, EngineChoice::IoUring, SIZE, 400, 9);
}

/// `O_DIRECT` on an image whose size is no multiple of any block: the last block is
/// read-modified-written past the end of the file and the length must be put back.
#[test]
fn direct_with_an_unaligned_image_size() {
    let size = (3 << 20) + 123;
    run_model(CacheMode::None, EngineChoice::IoUring, size, 300, 10);
    run_model(CacheMode::None, EngineChoice::Sync, size, 300, 11);
}

/// Resizes between rounds of operations: grown space reads as zeroes, shrunk-away data does
/// not come back when the image grows again, with and without `O_DIRECT`.
#[test]
fn resize_rounds() {
    for (cache, engine) in [
        (CacheMode::Writeback, EngineChoice::Sync),
        (CacheMode::None, EngineChoice::IoUring),
    ] {
        let dir = TempDir::new("model-resize").expect("tempdir");
        let path = dir.join("disk.raw");
        create(&path, 4 << 20);
        let opts = options(cache, engine);
        ModelTest::new(4 << 20)
            .threads(3)
            .ops(300)
            .seed(31)
            .discard_zeroes(true)
            .resize_steps(&[9 << 20, (2 << 20) + 777, 6 << 20])
            .reopen(true)
            .run(|| {
                let dev: Arc<dyn BlockDev> = Arc::new(RawImage::open(&path, &opts)?);
                Ok(dev)
            })
            .unwrap_or_else(|f| panic!("{cache:?}/{engine:?}: {f}"));
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 6 << 20);
    }
}
