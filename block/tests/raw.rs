//! Raw-format behaviour that the model cannot see: allocation on the host (holes,
//! `st_blocks`), preallocation, resize, read-only opens and out-of-range requests.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use vdisk_block::testing::TempDir;
use vdisk_block::{
    BlockDev, BlockStatus, CacheMode, CreateOptions, EngineChoice, ErrorKind, Format, OpenOptions,
    Preallocation, RawFormat, RawImage, ZeroMode,
};

const MIB: u64 = 1 << 20;

/// Room for file-system metadata (a split extent tree takes a block) in allocation checks.
const SLACK: u64 = 64 << 10;

fn create(path: &Path, size: u64, prealloc: &str) -> vdisk_block::Result<()> {
    let mut options = CreateOptions {
        size,
        ..CreateOptions::default()
    };
    options
        .options
        .insert("preallocation".into(), prealloc.into());
    RawFormat.create(path, options)
}

fn open_rw(path: &Path, engine: EngineChoice) -> RawImage {
    let opts = OpenOptions {
        engine,
        ..OpenOptions::read_write()
    };
    RawImage::open(path, &opts).expect("open read-write")
}

/// Bytes the file occupies on disk after its data reached the disk (delayed allocation
/// settles on fsync).
fn allocated(path: &Path) -> u64 {
    let f = std::fs::File::open(path).expect("open");
    f.sync_all().expect("fsync");
    f.metadata().expect("stat").blocks() * 512
}

/// Every extent from 0 to the end, as (offset, len, data, zero).
fn extents(dev: &dyn BlockDev) -> Vec<(u64, u64, bool, bool)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < dev.size() {
        let BlockStatus {
            offset,
            len,
            data,
            zero,
            ..
        } = dev.block_status(at, dev.size() - at).expect("block status");
        assert_eq!(offset, at);
        assert!(len > 0);
        // Merge neighbours of the same kind: the file system may report in pieces.
        match out.last_mut() {
            Some((_, l, d, z)) if *d == data && *z == zero => *l += len,
            _ => out.push((offset, len, data, zero)),
        }
        at += len;
    }
    out
}

fn reads_zero(dev: &dyn BlockDev, offset: u64, len: u64) -> bool {
    let mut buf = vec![0xffu8; len as usize];
    dev.read_at(&mut buf, offset).expect("read");
    buf.iter().all(|&b| b == 0)
}

#[test]
fn block_status_follows_seek_data_and_seek_hole() {
    let dir = TempDir::new("raw-status").expect("tempdir");
    let path = dir.join("holes.raw");
    // A file made by hand with holes around two data ranges.
    let file = std::fs::File::create(&path).expect("create");
    file.set_len(8 * MIB).expect("size");
    drop(file);
    for engine in [EngineChoice::Sync, EngineChoice::IoUring] {
        let image = open_rw(&path, engine);
        image.write_at(&[1u8; 64 << 10], MIB).expect("write");
        image
            .write_at(&vec![2u8; MIB as usize], 5 * MIB)
            .expect("write");
        image.flush().expect("flush");
        assert_eq!(
            extents(&image),
            vec![
                (0, MIB, false, true),
                (MIB, 64 << 10, true, false),
                (MIB + (64 << 10), 4 * MIB - (64 << 10), false, true),
                (5 * MIB, MIB, true, false),
                (6 * MIB, 2 * MIB, false, true),
            ],
            "{engine:?}"
        );
        // A query that starts inside an extent and stops short of its end is cut to fit.
        let st = image.block_status(MIB + 100, 1000).expect("status");
        assert_eq!((st.offset, st.len, st.data), (MIB + 100, 1000, true));
        let st = image.block_status(3 * MIB, MIB).expect("status");
        assert_eq!((st.len, st.data, st.zero), (MIB, false, true));
        assert_eq!(
            st.host.map(|h| h.offset),
            Some(3 * MIB),
            "raw maps guest offsets to the same host offsets"
        );
        image.discard(0, 8 * MIB).expect("discard all");
    }
}

#[test]
fn write_zeroes_may_unmap_punches_a_hole_and_keep_allocated_does_not() {
    let dir = TempDir::new("raw-zeroes").expect("tempdir");
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let path = dir.join(format!("z-{cache:?}.raw"));
        create(&path, 8 * MIB, "off").expect("create");
        let opts = OpenOptions {
            cache,
            ..OpenOptions::read_write()
        };
        let image = RawImage::open(&path, &opts).expect("open");
        image
            .write_at(&vec![9u8; 8 * MIB as usize], 0)
            .expect("fill");
        image.flush().expect("flush");
        let full = allocated(&path);
        assert!(full >= 8 * MIB, "{cache:?}: {full}");

        image
            .write_zeroes(MIB, 2 * MIB, ZeroMode::KeepAllocated)
            .expect("zero, keep allocated");
        assert!(reads_zero(&image, MIB, 2 * MIB));
        assert_eq!(
            allocated(&path),
            full,
            "{cache:?}: KeepAllocated frees nothing"
        );

        image
            .write_zeroes(4 * MIB, 2 * MIB, ZeroMode::MayUnmap)
            .expect("zero, may unmap");
        assert!(reads_zero(&image, 4 * MIB, 2 * MIB));
        let after = allocated(&path);
        assert!(
            after <= full - 2 * MIB + SLACK,
            "{cache:?}: MayUnmap must punch a hole ({full} -> {after})"
        );
        let st = image.block_status(4 * MIB, 2 * MIB).expect("status");
        assert!(st.zero && !st.data && st.len == 2 * MIB, "{st:?}");

        // Unaligned edges: the bytes around the zeroed range keep their data.
        image
            .write_zeroes(7 * MIB + 3, 1000, ZeroMode::MayUnmap)
            .expect("unaligned zeroes");
        let mut around = vec![0u8; 1006];
        image.read_at(&mut around, 7 * MIB).expect("read");
        assert_eq!(&around[..3], &[9, 9, 9]);
        assert!(around[3..1003].iter().all(|&b| b == 0));
        assert_eq!(&around[1003..], &[9, 9, 9]);

        // Discard frees space too, and raw reads discarded ranges as zeroes.
        let before = allocated(&path);
        image.discard(0, MIB).expect("discard");
        assert!(reads_zero(&image, 0, MIB));
        assert!(
            allocated(&path) <= before - MIB + SLACK,
            "{cache:?}: discard frees space"
        );
        assert_eq!(image.size(), 8 * MIB);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 8 * MIB);
    }
}

#[test]
fn preallocation_modes_allocate_what_they_promise() {
    let dir = TempDir::new("raw-prealloc").expect("tempdir");
    let size = 16 * MIB;
    let off = dir.join("off.raw");
    create(&off, size, "off").expect("create off");
    let falloc = dir.join("falloc.raw");
    create(&falloc, size, "falloc").expect("create falloc");
    let full = dir.join("full.raw");
    create(&full, size, "full").expect("create full");
    for path in [&off, &falloc, &full] {
        assert_eq!(std::fs::metadata(path).expect("stat").len(), size);
    }
    // off: only the first block qemu also writes.
    assert!(allocated(&off) <= 64 << 10, "off: {}", allocated(&off));
    assert!(allocated(&falloc) >= size, "falloc: {}", allocated(&falloc));
    assert!(allocated(&full) >= size, "full: {}", allocated(&full));
    // As `qemu-img map` shows for images qemu-img creates: off and falloc have their first
    // block written and the rest reads as zero (falloc's reserved blocks are unwritten
    // extents); full wrote zeroes, so it is all data.
    for path in [&off, &falloc] {
        let image = RawImage::open(path, &OpenOptions::read_only()).expect("open");
        assert_eq!(
            extents(&image),
            vec![(0, 4096, true, false), (4096, size - 4096, false, true)],
            "{}",
            path.display()
        );
    }
    let image = RawImage::open(&full, &OpenOptions::read_only()).expect("open");
    assert_eq!(extents(&image), vec![(0, size, true, false)]);
    for path in [&off, &falloc, &full] {
        let image = RawImage::open(path, &OpenOptions::read_only()).expect("open");
        assert!(reads_zero(&image, 0, size));
    }
    let err = create(&dir.join("meta.raw"), size, "metadata").expect_err("no metadata");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = create(&dir.join("bad.raw"), size, "sideways").expect_err("bad mode");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[test]
fn resize_grows_and_shrinks() {
    let dir = TempDir::new("raw-resize").expect("tempdir");
    let path = dir.join("r.raw");
    create(&path, 4 * MIB, "off").expect("create");
    let image = open_rw(&path, EngineChoice::Auto);
    image
        .write_at(&[5u8; 4096], 4 * MIB - 4096)
        .expect("write last block");

    let base = allocated(&path);
    image.resize(8 * MIB, Preallocation::Off).expect("grow off");
    assert_eq!(image.size(), 8 * MIB);
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), 8 * MIB);
    assert!(reads_zero(&image, 4 * MIB, 4 * MIB));
    assert!(
        allocated(&path) <= base + SLACK,
        "growing with off allocates nothing"
    );

    image
        .resize(12 * MIB, Preallocation::Falloc)
        .expect("grow falloc");
    assert!(allocated(&path) >= base + 4 * MIB);
    image
        .resize(16 * MIB, Preallocation::Full)
        .expect("grow full");
    assert!(allocated(&path) >= base + 8 * MIB);
    assert!(reads_zero(&image, 8 * MIB, 8 * MIB));
    assert_eq!(image.info().expect("info").virtual_size, 16 * MIB);

    image
        .write_at(&[6u8; 4096], 16 * MIB - 4096)
        .expect("write new end");
    let err = image
        .resize(2 * MIB, Preallocation::Full)
        .expect_err("preallocation only when growing");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert_eq!(
        image
            .resize(2 * MIB, Preallocation::Metadata)
            .expect_err("no metadata")
            .kind(),
        ErrorKind::InvalidInput
    );
    image.resize(2 * MIB, Preallocation::Off).expect("shrink");
    assert_eq!(image.size(), 2 * MIB);
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), 2 * MIB);
    let mut buf = [0u8; 1];
    assert_eq!(
        image.read_at(&mut buf, 2 * MIB).map_err(|e| e.kind()),
        Err(ErrorKind::OutOfRange)
    );
    // Growing again shows zeroes where the old data was cut off, not the old bytes.
    image
        .resize(4 * MIB, Preallocation::Off)
        .expect("grow again");
    assert!(reads_zero(&image, 2 * MIB, 2 * MIB));
}

#[test]
fn read_only_opens_refuse_writes() {
    let dir = TempDir::new("raw-ro").expect("tempdir");
    let path = dir.join("ro.raw");
    create(&path, MIB, "off").expect("create");
    for engine in [EngineChoice::Sync, EngineChoice::IoUring] {
        let opts = OpenOptions {
            engine,
            ..OpenOptions::read_only()
        };
        let image = RawImage::open(&path, &opts).expect("open read-only");
        assert!(image.is_read_only());
        let kinds = [
            image.write_at(b"x", 0).map_err(|e| e.kind()),
            image
                .write_zeroes(0, 4096, ZeroMode::MayUnmap)
                .map_err(|e| e.kind()),
            image
                .write_zeroes(0, 4096, ZeroMode::KeepAllocated)
                .map_err(|e| e.kind()),
            image.discard(0, 4096).map_err(|e| e.kind()),
            image
                .resize(2 * MIB, Preallocation::Off)
                .map_err(|e| e.kind()),
        ];
        for k in kinds {
            assert_eq!(k, Err(ErrorKind::ReadOnly), "{engine:?}");
        }
        image
            .flush()
            .expect("flushing a read-only image is a no-op");
        let mut buf = [1u8; 16];
        image.read_at(&mut buf, 0).expect("reads still work");
        assert_eq!(buf, [0u8; 16]);
    }
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), MIB);
}

#[test]
fn out_of_range_requests_are_errors_not_panics() {
    let dir = TempDir::new("raw-range").expect("tempdir");
    let path = dir.join("range.raw");
    create(&path, MIB, "off").expect("create");
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let opts = OpenOptions {
            cache,
            ..OpenOptions::read_write()
        };
        let image = RawImage::open(&path, &opts).expect("open");
        let mut one = [0u8; 1];
        let mut two = [0u8; 2];
        let cases = [
            image.read_at(&mut one, MIB).map_err(|e| e.kind()),
            image.read_at(&mut two, MIB - 1).map_err(|e| e.kind()),
            image.read_at(&mut one, u64::MAX).map_err(|e| e.kind()),
            image.write_at(&[0u8; 2], MIB - 1).map_err(|e| e.kind()),
            image.write_at(&[0u8; 1], u64::MAX).map_err(|e| e.kind()),
            image
                .write_zeroes(MIB - 10, 11, ZeroMode::MayUnmap)
                .map_err(|e| e.kind()),
            image
                .write_zeroes(u64::MAX - 1, 2, ZeroMode::KeepAllocated)
                .map_err(|e| e.kind()),
            image.discard(1, u64::MAX).map_err(|e| e.kind()),
            image.block_status(MIB, 1).map(|_| ()).map_err(|e| e.kind()),
            image
                .block_status(10, u64::MAX)
                .map(|_| ())
                .map_err(|e| e.kind()),
            image
                .resolve_read(MIB - 1, 2)
                .map(|_| ())
                .map_err(|e| e.kind()),
        ];
        for (i, k) in cases.into_iter().enumerate() {
            assert_eq!(k, Err(ErrorKind::OutOfRange), "{cache:?} case {i}");
        }
        // Empty requests at the end are fine; an empty block-status query is malformed.
        image.read_at(&mut [], MIB).expect("empty read at the end");
        image.write_at(&[], MIB).expect("empty write at the end");
        assert_eq!(
            image.block_status(0, 0).map_err(|e| e.kind()).err(),
            Some(ErrorKind::InvalidInput)
        );
        assert_eq!(image.size(), MIB);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), MIB);
    }
}
