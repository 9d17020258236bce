//! Images written through our driver: the random-operation model test (several threads,
//! reopen included) must pass, then `qemu-img check` must find no errors and no leaks and
//! qemu must read exactly what we read. Copy-on-write cases (backing file, snapshot-shared
//! clusters, compressed clusters) must leave the other views intact.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use vdisk_block::testing::ModelTest;
use vdisk_block::{BlockDev, OpenOptions, ZeroMode};
use vdisk_qcow2::Qcow2Image;

fn open_rw(path: &Path) -> Qcow2Image {
    let opts = OpenOptions {
        writable: true,
        ..options()
    };
    Qcow2Image::open(path, &opts).unwrap_or_else(|e| panic!("open rw {}: {e}", path.display()))
}

/// `qemu-img check` must report a clean image.
fn qemu_check_clean(image: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json", image.to_str().expect("utf-8")])
        .output()
        .expect("run qemu-img check");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let field = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    assert_eq!(
        (field("corruptions"), field("leaks"), field("check-errors")),
        (0, 0, 0),
        "qemu-img check {}: {v}",
        image.display()
    );
    assert!(out.status.success(), "qemu-img check exit status");
}

fn model_run(name: &str, create_opts: &str, size: u64) {
    let s = Scratch::new(name);
    let img = s.path("img.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !create_opts.is_empty() {
        args.extend(["-o", create_opts]);
    }
    let size_s = size.to_string();
    args.extend([img.to_str().expect("utf-8"), &size_s]);
    qemu_img(&args);
    let report = ModelTest::new(size)
        .threads(2)
        .ops(250)
        .seed(size ^ name.len() as u64)
        .max_io(96 << 10)
        .large_io(1 << 20)
        .reopen(true)
        .run(|| Ok(Arc::new(open_rw(&img)) as Arc<dyn BlockDev>))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(report.writes > 0);
    qemu_check_clean(&img);
    let ours = read_all(&open(&img));
    assert_same(&ours, &qemu_contents(&img, &s), name);
}

#[test]
fn model_default_layout() {
    model_run("w-default", "", 16 << 20);
}

#[test]
fn model_v2() {
    model_run("w-v2", "compat=0.10", 16 << 20);
}

#[test]
fn model_small_clusters_and_widths() {
    // 512-byte clusters: the refcount table must grow (it covers 8 MiB of file at first).
    model_run("w-512", "cluster_size=512,refcount_bits=16", 12 << 20);
    model_run("w-4k-1", "cluster_size=4k,refcount_bits=1", 8 << 20);
    model_run("w-4k-64", "cluster_size=4k,refcount_bits=64", 8 << 20);
    model_run("w-2m", "cluster_size=2M", 24 << 20);
    model_run("w-lazy", "lazy_refcounts=on,refcount_bits=8", 8 << 20);
}

#[test]
fn model_extended_l2() {
    model_run("w-ext", "extended_l2=on", 16 << 20);
    model_run(
        "w-ext16k",
        "extended_l2=on,cluster_size=16k,refcount_bits=4",
        8 << 20,
    );
    model_run("w-ext2m", "extended_l2=on,cluster_size=2M", 16 << 20);
}

#[test]
fn extended_l2_allocates_only_touched_subclusters() {
    let s = Scratch::new("w-sub");
    let base = s.path("base.qcow2");
    let top = s.path("top.qcow2");
    let p = |p: &Path| p.to_str().expect("utf-8").to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &p(&base), "4M"]);
    qemu_io(&base, &["write -P 0x66 0 4m"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &p(&top),
        "4M",
    ]);
    {
        let dev = open_rw(&top);
        // 64 KiB clusters have 2 KiB subclusters: this touches subclusters 1 and 2.
        dev.write_at(&[1u8; 3000], 3000).expect("write");
        dev.write_zeroes(1 << 20, 65536, ZeroMode::MayUnmap)
            .expect("zero a whole cluster");
        dev.flush().expect("flush");
    }
    qemu_check_clean(&top);
    let mut expect = vec![0x66u8; 4 << 20];
    expect[3000..6000].fill(1);
    expect[1 << 20..(1 << 20) + 65536].fill(0);
    assert_same(
        &qemu_contents(&top, &s),
        &expect,
        "subcluster write over backing",
    );
    let dev = open(&top);
    let st = dev.block_status(0, 65536).expect("status");
    assert!(
        !st.allocated && st.len == 2048,
        "subcluster 0 falls through: {st:?}"
    );
    let st = dev.block_status(2048, 65536 - 2048).expect("status");
    assert!(
        st.allocated && st.data && st.len == 4096,
        "subclusters 1-2: {st:?}"
    );
    let st = dev.block_status(6144, 65536 - 6144).expect("status");
    assert!(!st.allocated, "the rest falls through: {st:?}");
    assert_map_matches_chain(&top);
}

/// With a backing file, `qemu-img map` reports per layer; compare only the top layer's
/// allocation (depth 0) with ours.
fn assert_map_matches_chain(image: &Path) {
    let dev = open(image);
    let json = qemu_img(&["map", "--output=json", image.to_str().expect("utf-8")]);
    let extents: serde_json::Value = serde_json::from_str(&json).expect("map json");
    for ext in extents.as_array().expect("array") {
        let start = ext["start"].as_u64().expect("start");
        let length = ext["length"].as_u64().expect("length");
        let top = ext["depth"].as_u64() == Some(0);
        let mut pos = start;
        while pos < start + length {
            let st = dev.block_status(pos, start + length - pos).expect("status");
            assert_eq!(st.allocated, top, "at {pos}: {st:?} vs {ext}");
            pos += st.len;
        }
    }
}

#[test]
fn cow_from_backing_file() {
    let s = Scratch::new("w-backing");
    let base = s.path("base.qcow2");
    let top = s.path("top.qcow2");
    let p = |p: &Path| p.to_str().expect("utf-8").to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &p(&base), "8M"]);
    qemu_io(&base, &["write -P 0x5a 0 8m"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &p(&top),
        "8M",
    ]);
    let before = qemu_contents(&base, &s);
    {
        let dev = open_rw(&top);
        dev.write_at(&[1u8; 1000], 70_000).expect("partial write");
        dev.write_zeroes(1 << 20, 65536, ZeroMode::MayUnmap)
            .expect("zero cluster over backing");
        dev.write_zeroes(2 << 20, 4096, ZeroMode::KeepAllocated)
            .expect("partial zeroes");
        dev.discard(3 << 20, 65536).expect("discard");
        dev.flush().expect("flush");
    }
    qemu_check_clean(&top);
    qemu_check_clean(&base);
    assert_same(&qemu_contents(&base, &s), &before, "base untouched");
    let mut expect = before.clone();
    expect[70_000..71_000].fill(1);
    expect[1 << 20..(1 << 20) + 65536].fill(0);
    expect[2 << 20..(2 << 20) + 4096].fill(0);
    let top_now = qemu_contents(&top, &s);
    // Discard over a backing file may read as zeroes or as the backing data.
    let d = 3 << 20;
    for i in d..d + 65536 {
        assert!(
            top_now[i] == 0 || top_now[i] == expect[i],
            "discarded byte {i}"
        );
        expect[i] = top_now[i];
    }
    assert_same(&top_now, &expect, "top after copy-on-write");
}

#[test]
fn cow_of_snapshot_shared_clusters() {
    let s = Scratch::new("w-snap");
    let img = s.path("img.qcow2");
    let p = img.to_str().expect("utf-8");
    qemu_img(&["create", "-q", "-f", "qcow2", p, "8M"]);
    qemu_io(&img, &["write -P 0x21 0 2m", "write -P 0x22 4m 64k"]);
    qemu_img(&["snapshot", "-c", "s1", p]);
    let snap_before = qemu_contents(&img, &s);
    {
        let dev = open_rw(&img);
        dev.write_at(&[9u8; 512], 512)
            .expect("write into shared cluster");
        dev.write_at(&[8u8; 65536], 4 << 20)
            .expect("overwrite shared cluster");
        dev.discard(1 << 20, 1 << 20)
            .expect("discard shared clusters");
        dev.flush().expect("flush");
    }
    qemu_check_clean(&img);
    // The snapshot still reads as it was.
    let snap = s.path("snap.raw");
    qemu_img(&[
        "convert",
        "-l",
        "snapshot.name=s1",
        "-O",
        "raw",
        p,
        snap.to_str().expect("utf-8"),
    ]);
    assert_same(
        &std::fs::read(&snap).expect("read"),
        &snap_before,
        "snapshot intact",
    );
    let mut expect = snap_before.clone();
    expect[512..1024].fill(9);
    expect[4 << 20..(4 << 20) + 65536].fill(8);
    expect[1 << 20..2 << 20].fill(0);
    assert_same(&qemu_contents(&img, &s), &expect, "active layer");
}

#[test]
fn cow_of_compressed_clusters() {
    let s = Scratch::new("w-comp");
    let src = s.path("src.qcow2");
    let img = s.path("c.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        src.to_str().expect("u"),
        "4M",
    ]);
    qemu_io(&src, &["write -P 0x31 0 4m"]);
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        src.to_str().expect("u"),
        img.to_str().expect("u"),
    ]);
    {
        let dev = open_rw(&img);
        dev.write_at(&[7u8; 100], 65_000)
            .expect("write over compressed");
        dev.write_zeroes(2 << 20, 65536, ZeroMode::KeepAllocated)
            .expect("zero compressed");
        dev.flush().expect("flush");
    }
    qemu_check_clean(&img);
    let mut expect = vec![0x31u8; 4 << 20];
    expect[65_000..65_100].fill(7);
    expect[2 << 20..(2 << 20) + 65536].fill(0);
    assert_same(
        &qemu_contents(&img, &s),
        &expect,
        "compressed copy-on-write",
    );
}

#[test]
fn read_only_and_unsupported_writes_are_refused() {
    let s = Scratch::new("w-refuse");
    let img = s.path("ro.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().expect("u"),
        "1M",
    ]);
    let dev = open(&img);
    let err = dev.write_at(&[1], 0).expect_err("read-only");
    assert_eq!(err.kind(), vdisk_block::ErrorKind::ReadOnly);
    // An image marked corrupt may only be opened read-only.
    let dirty = s.path("corrupt.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        dirty.to_str().expect("u"),
        "1M",
    ]);
    let mut bytes = std::fs::read(&dirty).expect("read");
    bytes[79] |= 2;
    std::fs::write(&dirty, &bytes).expect("write");
    let opts = OpenOptions {
        writable: true,
        ..options()
    };
    let err = Qcow2Image::open(&dirty, &opts).expect_err("corrupt image writes");
    assert_eq!(err.kind(), vdisk_block::ErrorKind::Corrupt);
    Qcow2Image::open(&dirty, &options()).expect("read-only open of a corrupt image");
}

#[test]
fn refcount_table_grows_with_self_describing_blocks() {
    let s = Scratch::new("w-grow");
    let img = s.path("g.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512,refcount_bits=64",
        img.to_str().expect("u"),
        "12M",
    ]);
    let before = Qcow2Image::open(&img, &options()).expect("open");
    let (rt_before, rtc_before) = (
        before.header().refcount_table_offset,
        before.header().refcount_table_clusters,
    );
    drop(before);
    let data: Vec<u8> = (0..10u32 << 20).map(|i| (i % 251) as u8).collect();
    {
        let dev = open_rw(&img);
        dev.write_at(&data, 1 << 20).expect("write 10 MiB");
        dev.flush().expect("flush");
    }
    let after = Qcow2Image::open(&img, &options()).expect("open");
    let h = after.header();
    assert!(
        h.refcount_table_offset != rt_before && h.refcount_table_clusters > rtc_before,
        "the refcount table moved and grew: {h:?}"
    );
    qemu_check_clean(&img);
    let contents = qemu_contents(&img, &s);
    assert_same(&contents[1 << 20..11 << 20], &data, "data after growth");
}

#[test]
fn external_data_files() {
    for raw in ["off", "on"] {
        let s = Scratch::new("w-data");
        let img = s.path("img.qcow2");
        let data = s.path("img.data");
        let opts = format!("data_file={},data_file_raw={raw}", data.display());
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            img.to_str().expect("u"),
            "8M",
        ]);
        ModelTest::new(8 << 20)
            .threads(2)
            .ops(200)
            .reopen(true)
            .run(|| Ok(Arc::new(open_rw(&img)) as Arc<dyn BlockDev>))
            .unwrap_or_else(|e| panic!("data_file_raw={raw}: {e}"));
        qemu_check_clean(&img);
        let contents = qemu_contents(&img, &s);
        assert_same(&read_all(&open(&img)), &contents, "data file image");
        if raw == "on" {
            // The data file stays a valid raw image of the guest contents.
            let mut bytes = std::fs::read(&data).expect("read data file");
            bytes.resize(contents.len(), 0);
            assert_same(&bytes, &contents, "raw data file");
        }
    }
}

#[test]
fn resize_grow_and_shrink() {
    use vdisk_block::Preallocation;
    let s = Scratch::new("w-resize");
    let img = s.path("r.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        img.to_str().expect("u"),
        "1M",
    ]);
    qemu_io(&img, &["write -P 0x10 0 1m"]);
    {
        // 512-byte clusters: 1 MiB needs 32 L1 entries, 64 MiB needs 2048 (the L1 moves).
        let dev = open_rw(&img);
        dev.resize(64 << 20, Preallocation::Off).expect("grow");
        dev.write_at(&[0x20; 4096], 60 << 20)
            .expect("write past the old end");
        dev.flush().expect("flush");
    }
    qemu_check_clean(&img);
    let mut expect = vec![0u8; 64 << 20];
    expect[..1 << 20].fill(0x10);
    expect[60 << 20..(60 << 20) + 4096].fill(0x20);
    assert_same(&qemu_contents(&img, &s), &expect, "grown");
    {
        let dev = open_rw(&img);
        // Whole sectors only, as qemu takes them.
        dev.resize((3 << 20) + 512, Preallocation::Off)
            .expect("shrink");
        dev.resize(8 << 20, Preallocation::Off).expect("grow again");
        dev.flush().expect("flush");
    }
    qemu_check_clean(&img);
    let mut expect = vec![0u8; 8 << 20];
    expect[..1 << 20].fill(0x10);
    assert_same(&qemu_contents(&img, &s), &expect, "shrunk then grown");

    let b = s.path("b.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        b.to_str().expect("u"),
        "1000000",
    ]);
    qemu_io(&b, &["write -P 0x30 0 1000000"]);
    {
        let dev = open_rw(&b);
        dev.resize(4 << 20, Preallocation::Metadata)
            .expect("grow with metadata");
        dev.resize(6 << 20, Preallocation::Full)
            .expect("grow with full");
        let err = dev
            .resize(1 << 20, Preallocation::Full)
            .expect_err("shrink + prealloc");
        assert_eq!(err.kind(), vdisk_block::ErrorKind::InvalidInput);
        dev.flush().expect("flush");
    }
    qemu_check_clean(&b);
    let mut expect = vec![0u8; 6 << 20];
    expect[..1_000_000].fill(0x30);
    assert_same(&qemu_contents(&b, &s), &expect, "preallocated growth");
    let st = open(&b).block_status(5 << 20, 4096).expect("status");
    assert!(st.allocated && st.data, "preallocated: {st:?}");

    qemu_img(&["snapshot", "-c", "s", b.to_str().expect("u")]);
    // v3 snapshots keep their own size: qemu-img 10 resizes such images, and so do we.
    open_rw(&b)
        .resize(8 << 20, Preallocation::Off)
        .expect("v3 image with snapshots");
    qemu_check_clean(&b);
}

#[test]
fn writes_never_overwrite_metadata() {
    let s = Scratch::new("w-overlap");
    let img = s.path("o.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().expect("u"),
        "4M",
    ]);
    qemu_io(&img, &["write -P 1 0 64k"]);
    // Point guest cluster 0 at the L1 table, keeping COPIED: an in-place write would
    // destroy the L1 table.
    let mut bytes = std::fs::read(&img).expect("read");
    let be64 = |b: &[u8], at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_be_bytes(a)
    };
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let hostile = (1u64 << 63) | l1 as u64;
    bytes[l2..l2 + 8].copy_from_slice(&hostile.to_be_bytes());
    std::fs::write(&img, &bytes).expect("write");
    let before = std::fs::read(&img).expect("read");
    let dev = open_rw(&img);
    let err = dev.write_at(&[0xee; 512], 0).expect_err("overlap");
    assert_eq!(err.kind(), vdisk_block::ErrorKind::Corrupt, "{err}");
    let err = dev
        .write_at(&[0xee; 512], 1 << 20)
        .expect_err("now corrupt");
    assert_eq!(err.kind(), vdisk_block::ErrorKind::Corrupt);
    drop(dev);
    let after = std::fs::read(&img).expect("read");
    assert_eq!(&after[l1..l1 + 4096], &before[l1..l1 + 4096], "L1 intact");
    let json = qemu_img(&["info", "--output=json", img.to_str().expect("u")]);
    assert!(json.contains("\"corrupt\": true"), "{json}");
}

#[test]
fn compressed_writes() {
    for opts in [
        "",
        "compression_type=zstd",
        "cluster_size=4k,refcount_bits=2",
        "extended_l2=on",
    ] {
        let s = Scratch::new("w-compressed");
        let img = s.path("c.qcow2");
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([img.to_str().expect("u"), "3000000"]);
        qemu_img(&args);
        let dev = open_rw(&img);
        let cs = dev.header().cluster_size() as usize;
        let size = dev.size() as usize;
        let mut expect = vec![0u8; size];
        let mut x = 88172645463325252u64;
        let mut at = 0;
        let mut i = 0;
        while at < size {
            let n = cs.min(size - at);
            let chunk = &mut expect[at..at + n];
            match i % 4 {
                // Compressible text-like data, noise (stored plainly), zeroes, a pattern.
                0 => chunk
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = b"qcow2 "[j % 6]),
                1 => chunk.iter_mut().for_each(|b| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = (x >> 32) as u8;
                }),
                2 => {}
                _ => chunk
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = (j / 7) as u8),
            }
            dev.write_compressed(&expect[at..at + n], at as u64)
                .expect("compressed write");
            at += n;
            i += 1;
        }
        // Overwrite some compressed clusters (copy-on-write out of shared host clusters).
        dev.write_at(&[0xcc; 1000], cs as u64 * 3 + 10)
            .expect("write over compressed");
        expect[cs * 3 + 10..cs * 3 + 1010].fill(0xcc);
        dev.write_zeroes(0, cs as u64, ZeroMode::MayUnmap)
            .expect("zero");
        expect[..cs].fill(0);
        dev.flush().expect("flush");
        drop(dev);
        qemu_check_clean(&img);
        assert_same(&qemu_contents(&img, &s), &expect, opts);
        assert_same(&read_all(&open(&img)), &expect, opts);
        let json = qemu_img(&["check", "--output=json", img.to_str().expect("u")]);
        assert!(json.contains("compressed-clusters"), "{opts}: {json}");
    }
}

#[test]
fn many_threads_with_a_tiny_l2_cache() {
    // Two cached tables force evictions and write-backs in the middle of copy-on-write,
    // with four threads at once, over a backing file and with extended L2 entries.
    for opts in ["cluster_size=4k", "extended_l2=on,cluster_size=16k"] {
        let s = Scratch::new("w-threads");
        let base = s.path("base.qcow2");
        let img = s.path("img.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            base.to_str().expect("u"),
            "8M",
        ]);
        qemu_io(&base, &["write -P 0x3c 0 8m"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            img.to_str().expect("u"),
            "8M",
        ]);
        let mut o = OpenOptions {
            writable: true,
            ..options()
        };
        o.driver_options.insert("l2-cache-size".into(), "8k".into());
        ModelTest::new(8 << 20)
            .threads(4)
            .ops(300)
            .initial_zero(false)
            .reopen(true)
            .run(|| Ok(Arc::new(Qcow2Image::open(&img, &o)?) as Arc<dyn BlockDev>))
            .unwrap_or_else(|e| panic!("{opts}: {e}"));
        qemu_check_clean(&img);
        qemu_check_clean(&base);
        assert_same(&read_all(&open(&img)), &qemu_contents(&img, &s), opts);
    }
}

#[test]
fn partial_writes_without_the_backing_file_are_refused() {
    let s = Scratch::new("w-nobacking");
    let base = s.path("base.qcow2");
    let top = s.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        base.to_str().expect("u"),
        "1M",
    ]);
    qemu_io(&base, &["write -P 7 0 1m"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().expect("u"),
        "1M",
    ]);
    let o = OpenOptions {
        writable: true,
        no_backing: true,
        ..options()
    };
    let dev = Qcow2Image::open(&top, &o).expect("open without backing");
    let err = dev
        .write_at(&[1; 100], 10)
        .expect_err("needs the backing data");
    assert_eq!(err.kind(), vdisk_block::ErrorKind::Unsupported);
    dev.write_at(&[2; 65536], 65536)
        .expect("whole clusters need no copy");
    drop(dev);
    let mut expect = vec![7u8; 1 << 20];
    expect[65536..131072].fill(2);
    assert_same(&qemu_contents(&top, &s), &expect, "backing data kept");
    qemu_check_clean(&top);
}
