//! Our `check` agrees with `qemu-img check` on clean images of every layout and on images
//! with planted leaks and corruptions.

mod common;

use common::*;
use std::path::Path;
use vdisk_block::{BlockDev, CheckReport, Format, RepairMode};
use vdisk_qcow2::Qcow2Format;

fn ours(image: &Path) -> CheckReport {
    Qcow2Format
        .check(image, &options(), RepairMode::None)
        .unwrap_or_else(|e| panic!("check {}: {e}", image.display()))
}

/// `qemu-img check --output=json`, which exits non-zero when it finds problems.
fn qemu(image: &Path) -> serde_json::Value {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json", image.to_str().expect("utf-8")])
        .output()
        .expect("run qemu-img check");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn field(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key).and_then(|x| x.as_u64()).unwrap_or(0)
}

fn assert_agrees(image: &Path) -> CheckReport {
    let ours = ours(image);
    let q = qemu(image);
    let what = format!("{}: ours {ours:?}, qemu {q}", image.display());
    assert_eq!(ours.corruptions, field(&q, "corruptions"), "{what}");
    assert_eq!(ours.leaks, field(&q, "leaks"), "{what}");
    assert_eq!(ours.check_errors, field(&q, "check-errors"), "{what}");
    assert_eq!(
        ours.image_end_offset,
        Some(field(&q, "image-end-offset")),
        "{what}"
    );
    assert_eq!(
        ours.total_clusters,
        Some(field(&q, "total-clusters")),
        "{what}"
    );
    assert_eq!(
        ours.allocated_clusters,
        Some(field(&q, "allocated-clusters")),
        "{what}"
    );
    assert_eq!(
        ours.fragmented_clusters,
        Some(field(&q, "fragmented-clusters")),
        "{what}"
    );
    assert_eq!(
        ours.compressed_clusters,
        Some(field(&q, "compressed-clusters")),
        "{what}"
    );
    ours
}

const WORKLOAD: &[&str] = &[
    "write -P 0x11 0 128k",
    "write -P 0x33 1m 1000",
    "write -z 64k 64k",
    "write -P 0x44 2m 600k",
    "discard 2m 64k",
    "write -P 0x55 3m 512",
    "write -P 0x66 9m 1m",
    "write -P 0x67 5m 64k",
];

fn make(s: &Scratch, opts: &str) -> std::path::PathBuf {
    let img = s.path("img.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([img.to_str().expect("utf-8"), "12M"]);
    qemu_img(&args);
    qemu_io(&img, WORKLOAD);
    img
}

#[test]
fn clean_images_of_every_layout() {
    for opts in [
        "compat=0.10",
        "",
        "cluster_size=512,refcount_bits=1",
        "cluster_size=4k,refcount_bits=2",
        "cluster_size=4k,refcount_bits=4",
        "refcount_bits=8",
        "refcount_bits=32",
        "cluster_size=4k,refcount_bits=64",
        "cluster_size=2M",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
        "preallocation=metadata",
        "lazy_refcounts=on",
    ] {
        let s = Scratch::new("clean");
        let img = make(&s, opts);
        let r = assert_agrees(&img);
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{opts}");
    }
}

#[test]
fn snapshots_compression_and_data_files() {
    let s = Scratch::new("snap");
    let img = make(&s, "");
    qemu_img(&["snapshot", "-c", "s1", img.to_str().expect("utf-8")]);
    qemu_io(&img, &["write -P 0x99 0 4k", "write -P 0x98 10m 64k"]);
    qemu_img(&["snapshot", "-c", "s2", img.to_str().expect("utf-8")]);
    assert_agrees(&img);

    let c = s.path("c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        img.to_str().expect("utf-8"),
        c.to_str().expect("utf-8"),
    ]);
    let r = assert_agrees(&c);
    assert!(r.compressed_clusters.unwrap_or(0) > 0);

    let d = s.path("d.qcow2");
    let data = s.path("d.data");
    let opts = format!("data_file={}", data.to_str().expect("utf-8"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opts,
        d.to_str().expect("u"),
        "12M",
    ]);
    qemu_io(&d, WORKLOAD);
    assert_agrees(&d);
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for poking");
    f.write_all_at(bytes, offset).expect("poke");
}

fn be64_at(path: &Path, offset: u64) -> u64 {
    let b = std::fs::read(path).expect("read image");
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[offset as usize..offset as usize + 8]);
    u64::from_be_bytes(a)
}

#[test]
fn planted_leaks_and_corruptions() {
    // 64 KiB clusters, 16-bit refcounts: the first refcount block covers the whole image.
    let s = Scratch::new("planted");
    let img = make(&s, "");
    let reftable = be64_at(&img, 48);
    let refblock = be64_at(&img, reftable);
    let image_len = std::fs::metadata(&img).expect("stat").len();
    let last_cluster = image_len / 65536 - 1;

    // A leak: a cluster appended to the file is marked used but nothing references it.
    // (A refcount for a cluster past the end of the file is not counted, by qemu either.)
    let leak = s.path("leak.qcow2");
    std::fs::copy(&img, &leak).expect("copy");
    poke(&leak, refblock + (last_cluster + 3) * 2, &[0, 1]);
    assert_eq!(assert_agrees(&leak).leaks, 0);
    poke(&leak, image_len + 65535, &[0]);
    poke(&leak, refblock + (last_cluster + 1) * 2, &[0, 1]);
    let r = assert_agrees(&leak);
    assert_eq!((r.leaks, r.corruptions), (1, 0));

    // A corruption: a data cluster's refcount is dropped to zero.
    let bad = s.path("bad.qcow2");
    std::fs::copy(&img, &bad).expect("copy");
    poke(&bad, refblock + last_cluster * 2, &[0, 0]);
    let r = assert_agrees(&bad);
    assert!(r.corruptions >= 1, "{r:?}");

    // A refcount of 2 on a cluster whose L2 entry says COPIED: leak plus COPIED error.
    let two = s.path("two.qcow2");
    std::fs::copy(&img, &two).expect("copy");
    poke(&two, refblock + last_cluster * 2, &[0, 2]);
    assert_agrees(&two);
}

fn repair(image: &Path, mode: RepairMode) -> CheckReport {
    Qcow2Format
        .check(image, &options(), mode)
        .unwrap_or_else(|e| panic!("repair {}: {e}", image.display()))
}

#[test]
fn repair_fixes_leaks_and_refcount_corruptions() {
    let s = Scratch::new("repair");
    let img = make(&s, "");
    let contents = qemu_contents(&img, &s);
    let reftable = be64_at(&img, 48);
    let refblock = be64_at(&img, reftable);
    let image_len = std::fs::metadata(&img).expect("stat").len();
    let last_cluster = image_len / 65536 - 1;
    poke(&img, image_len + 2 * 65536 - 1, &[0]);
    poke(&img, refblock + (last_cluster + 1) * 2, &[0, 1]);
    poke(&img, refblock + (last_cluster + 2) * 2, &[0, 1]);
    let r = repair(&img, RepairMode::Leaks);
    assert_eq!((r.leaks, r.leaks_fixed, r.corruptions), (0, 2, 0), "{r:?}");
    assert_agrees(&img);

    poke(&img, refblock + last_cluster * 2, &[0, 0]);
    let found = ours(&img);
    assert!(found.corruptions > 0);
    // A used cluster with refcount 0: qemu rebuilds the refcount structure and counts
    // what it fixed before it checks the COPIED flags (which are right again afterwards).
    let copy = s.path("qemu-repaired.qcow2");
    std::fs::copy(&img, &copy).expect("copy");
    let out = std::process::Command::new("qemu-img")
        .args([
            "check",
            "-r",
            "all",
            "--output=json",
            copy.to_str().expect("utf-8"),
        ])
        .output()
        .expect("run qemu-img check -r all");
    let q: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img json");
    let r = repair(&img, RepairMode::All);
    assert_eq!((r.leaks, r.corruptions), (0, 0), "{r:?}");
    assert_eq!(
        r.corruptions_fixed,
        field(&q, "corruptions-fixed"),
        "{r:?} {q}"
    );
    assert_eq!(r.leaks_fixed, field(&q, "leaks-fixed"), "{r:?} {q}");
    assert_eq!(
        std::fs::read(&img).expect("read"),
        std::fs::read(&copy).expect("read"),
        "the rebuilt image is qemu's, byte for byte"
    );
    let r = assert_agrees(&img);
    assert_eq!((r.leaks, r.corruptions), (0, 0));
    assert_eq!(
        qemu_contents(&img, &s),
        contents,
        "repair keeps the guest data"
    );
}

#[test]
fn dirty_lazy_refcount_image_is_rebuilt_on_read_write_open() {
    let s = Scratch::new("dirty");
    let img = s.path("d.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        img.to_str().expect("u"),
        "4M",
    ]);
    // qemu-io's abort leaves the dirty bit set and the refcounts stale, like a crash.
    let _ = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 256k",
            "-c",
            "write -P 2 1m 64k",
            "-c",
            "abort",
        ])
        .arg(&img)
        .output()
        .expect("qemu-io");
    let r = assert_agrees(&img);
    assert!(r.corruptions > 0, "stale refcounts: {r:?}");
    let dev = vdisk_qcow2::Qcow2Image::open(
        &img,
        &vdisk_block::OpenOptions {
            writable: true,
            ..options()
        },
    )
    .expect("read/write open rebuilds the refcounts");
    assert!(!dev.info().expect("info").dirty);
    drop(dev);
    let r = assert_agrees(&img);
    assert_eq!((r.leaks, r.corruptions), (0, 0));
    let mut expect = vec![0u8; 4 << 20];
    expect[..256 << 10].fill(1);
    expect[1 << 20..(1 << 20) + 65536].fill(2);
    assert_same(&qemu_contents(&img, &s), &expect, "data kept");
}

#[test]
fn repair_fixes_copied_flags() {
    let s = Scratch::new("copied");
    let img = make(&s, "");
    let contents = qemu_contents(&img, &s);
    // Clear COPIED on the first L2 entry (refcount 1): a corruption for qemu-img check.
    let l1 = be64_at(&img, 40);
    let l2 = be64_at(&img, l1) & 0x00ff_ffff_ffff_fe00;
    let entry = be64_at(&img, l2);
    assert!(entry & (1 << 63) != 0);
    poke(&img, l2, &(entry & !(1 << 63)).to_be_bytes());
    let r = assert_agrees(&img);
    assert_eq!(r.corruptions, 1);
    let r = repair(&img, RepairMode::All);
    assert_eq!((r.corruptions, r.corruptions_fixed), (0, 1), "{r:?}");
    let r = assert_agrees(&img);
    assert_eq!((r.leaks, r.corruptions), (0, 0));
    assert_eq!(qemu_contents(&img, &s), contents);
}
