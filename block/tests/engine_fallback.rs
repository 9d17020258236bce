//! With io_uring refused (`VDISK_NO_IO_URING`), `Auto` falls back to pread/pwrite and still
//! passes the model, and an explicit io_uring request fails clearly. A test binary of its
//! own, because the variable is process-wide.

use std::sync::Arc;

use vdisk_block::file::NO_IO_URING_ENV;
use vdisk_block::testing::{ModelTest, TempDir};
use vdisk_block::{
    BlockDev, CacheMode, CreateOptions, EngineChoice, EngineKind, ErrorKind, Format, OpenOptions,
    RawFormat, RawImage,
};

#[test]
fn refused_io_uring_falls_back_and_passes_the_model() {
    // The only test in this binary, and it sets the variable before any thread opens a file.
    std::env::set_var(NO_IO_URING_ENV, "1");
    let dir = TempDir::new("fallback").expect("tempdir");
    let path = dir.join("disk.raw");
    let size = 8 << 20;
    RawFormat
        .create(
            &path,
            CreateOptions {
                size,
                ..CreateOptions::default()
            },
        )
        .expect("create");

    let explicit = OpenOptions {
        engine: EngineChoice::IoUring,
        ..OpenOptions::read_write()
    };
    let err = RawImage::open(&path, &explicit).expect_err("io_uring was refused");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("io_uring"), "{err}");

    for cache in [CacheMode::Writeback, CacheMode::None] {
        let opts = OpenOptions {
            engine: EngineChoice::Auto,
            cache,
            ..OpenOptions::read_write()
        };
        let image = RawImage::open(&path, &opts).expect("auto falls back");
        assert_eq!(image.file().engine(), EngineKind::Sync);
        assert!(image.file().engine_note().is_some());
        drop(image);
        ModelTest::new(size)
            .threads(3)
            .ops(200)
            .seed(21)
            .initial_zero(cache == CacheMode::Writeback)
            .reopen(true)
            .run(|| {
                let dev: Arc<dyn BlockDev> = Arc::new(RawImage::open(&path, &opts)?);
                Ok(dev)
            })
            .unwrap_or_else(|f| panic!("{cache:?}: {f}"));
    }
}
