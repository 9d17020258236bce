//! Images written by the system qemu-img / qemu-io read back byte for byte through our
//! driver, for every creation option that changes the layout, and our block status agrees
//! with `qemu-img map`.

mod common;

use common::*;
use vdisk_block::BlockDev;

/// qemu-io commands that leave data, zero, discarded and partially written clusters.
const WORKLOAD: &[&str] = &[
    "write -P 0x11 0 128k",
    "write -P 0x22 100k 3k",
    "write -P 0x33 1m 1000",
    "write -z 64k 64k",
    "write -P 0x44 2m 600k",
    "discard 2m 64k",
    "write -z -u 2304k 64k",
    "write -P 0x55 3m 512",
    "write -P 0x66 7m 1m",
];

fn roundtrip(name: &str, create_opts: &str, size: &str) {
    let s = Scratch::new(name);
    let img = s.path("img.qcow2");
    let img_s = img.to_str().expect("utf-8");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !create_opts.is_empty() {
        args.extend(["-o", create_opts]);
    }
    args.extend([img_s, size]);
    qemu_img(&args);
    qemu_io(&img, WORKLOAD);
    let dev = open(&img);
    assert_same(&read_all(&dev), &qemu_contents(&img, &s), name);
    assert_map_matches(&img);
}

#[test]
fn compat_0_10() {
    roundtrip("v2", "compat=0.10", "16M");
}

#[test]
fn compat_1_1_default() {
    roundtrip("v3", "compat=1.1", "16M");
}

#[test]
fn cluster_512_refcount_1() {
    roundtrip("c512", "cluster_size=512,refcount_bits=1", "9M");
}

#[test]
fn cluster_4k_refcount_64() {
    roundtrip("c4k", "cluster_size=4k,refcount_bits=64", "16M");
}

#[test]
fn cluster_2m() {
    roundtrip("c2m", "cluster_size=2M", "20M");
}

#[test]
fn extended_l2() {
    roundtrip("ext64k", "extended_l2=on", "16M");
    roundtrip("ext16k", "extended_l2=on,cluster_size=16k", "16M");
    roundtrip("ext2m", "extended_l2=on,cluster_size=2M", "16M");
}

#[test]
fn lazy_refcounts_and_metadata_preallocation() {
    roundtrip("lazy", "lazy_refcounts=on", "16M");
    roundtrip("prealloc", "preallocation=metadata", "16M");
    roundtrip("falloc", "preallocation=falloc,cluster_size=4k", "8M");
}

#[test]
fn compressed_zlib_and_zstd() {
    for (name, opts) in [("zlib", ""), ("zstd", "compression_type=zstd")] {
        let s = Scratch::new(name);
        let src = s.path("src.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            src.to_str().expect("u"),
            "8M",
        ]);
        qemu_io(
            &src,
            &[
                "write -P 0x61 0 1m",
                "write -P 0x62 1m 4k",
                "write -P 0x63 3m 64k",
                "write -P 0x64 5m 192k",
            ],
        );
        let img = s.path("c.qcow2");
        let mut args = vec!["convert", "-c", "-O", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([src.to_str().expect("u"), img.to_str().expect("u")]);
        qemu_img(&args);
        let dev = open(&img);
        assert_same(&read_all(&dev), &qemu_contents(&img, &s), name);
        assert_map_matches(&img);
        let st = dev.block_status(0, 4096).expect("status");
        assert!(st.compressed && st.data && st.host.is_none(), "{st:?}");
    }
}

#[test]
fn backing_chain_qcow2_and_raw() {
    let s = Scratch::new("chain");
    let raw = s.path("base.raw");
    let mid = s.path("mid.qcow2");
    let top = s.path("top.qcow2");
    let p = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
    qemu_img(&["create", "-q", "-f", "raw", &p(&raw), "6M"]);
    std::fs::write(&raw, vec![0x77u8; 6 << 20]).expect("fill raw base");
    // Relative backing names, a raw bottom, a middle layer shorter than the top.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &p(&mid),
        "6M",
    ]);
    qemu_io(
        &mid,
        &["write -P 0x01 0 1m", "write -z 2m 64k", "discard 4m 1m"],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &p(&top),
        "10M",
    ]);
    qemu_io(
        &top,
        &[
            "write -P 0x02 512k 4k",
            "write -z 1m 64k",
            "write -P 3 8m 64k",
        ],
    );
    let dev = open(&top);
    assert_same(&read_all(&dev), &qemu_contents(&top, &s), "chain");
    // Unallocated ranges fall through: not allocated in the top layer.
    let st = dev.block_status(0, 4096).expect("status");
    assert!(!st.allocated && !st.zero, "{st:?}");
    let info = dev.info().expect("info");
    assert_eq!(info.backing_filename.as_deref(), Some("mid.qcow2"));
    assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
    assert_eq!(info.full_backing_filename, Some(mid.clone()));
    // Without the backing chain, unallocated ranges read as zeroes.
    let mut opts = options();
    opts.no_backing = true;
    let alone = vdisk_qcow2::Qcow2Image::open(&top, &opts).expect("open without backing");
    let mut buf = vec![1u8; 4096];
    alone.read_at(&mut buf, 0).expect("read");
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn external_data_file() {
    for raw_flag in ["off", "on"] {
        let s = Scratch::new("datafile");
        let img = s.path("img.qcow2");
        // qemu-img creates a relative data file name relative to its working directory, so
        // give it the full path; the image then records that name.
        let data = s.path("img.data");
        let opts = format!(
            "data_file={},data_file_raw={raw_flag}",
            data.to_str().expect("utf-8")
        );
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
        qemu_io(
            &img,
            &[
                "write -P 0x41 0 100k",
                "write -P 0x42 3m 64k",
                "write -z 64k 64k",
            ],
        );
        let dev = open(&img);
        assert_same(&read_all(&dev), &qemu_contents(&img, &s), "data file");
        let st = dev.block_status(4096, 4096).expect("status");
        let host = st.host.expect("data has a host location");
        assert_eq!(host.file, data);
        assert_eq!(host.offset, 4096, "host offset equals guest offset");
    }
}
