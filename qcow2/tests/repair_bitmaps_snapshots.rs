//! `check -r all` on an image with both persistent bitmaps and internal snapshots: every
//! kind of refcount damage it repairs (a leaked cluster, refcounts too high and too low, a
//! refcount of 0 under a bitmap table, a missing refcount block) is repaired without losing
//! a snapshot or a bitmap, judged by qemu: `qemu-img check` finds the result clean, the
//! snapshot list, each snapshot's contents, the bitmaps qemu-img info lists and the dirty
//! ranges qemu-nbd exports for them, and the active layer's contents are all as before.
//!
//! qemu-img 10 does worse here, and the tests record (without asserting) what it does to a
//! copy of the same damaged image: a refcount of 0 under a referenced cluster makes its
//! `check -r all` rebuild the refcount structure, and the rebuilt image has no snapshots any
//! more ("Snapshot list" is gone from qemu-img info, their L1 tables and clusters were
//! reported as leaks and freed), while its bitmaps and active layer survive.

mod common;

use std::path::Path;
use std::process::Command;

use common::nbd::qemu_dirty_ranges;
use common::*;
use vdisk_block::{Format, OpenOptions, RepairMode};
use vdisk_qcow2::Qcow2Format;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The few header fields the damage needs (the image is made by qemu-img with 16-bit
/// refcounts).
struct Layout {
    cs: u64,
    reftable: u64,
    per_block: u64,
}

fn layout(path: &Path) -> Layout {
    let b = std::fs::read(path).expect("read image");
    let cs = 1u64 << be32(&b, 20);
    assert_eq!(be32(&b, 96), 4, "the test assumes 16-bit refcounts");
    Layout {
        cs,
        reftable: be64(&b, 48),
        per_block: cs * 8 / 16,
    }
}

/// Where the refcount of `cluster` is stored.
fn refcount_at(path: &Path, cluster: u64) -> u64 {
    let l = layout(path);
    let b = std::fs::read(path).expect("read image");
    let block = be64(&b, (l.reftable + 8 * (cluster / l.per_block)) as usize);
    assert_ne!(block, 0, "cluster {cluster} has no refcount block");
    block + 2 * (cluster % l.per_block)
}

fn refcount(path: &Path, cluster: u64) -> u64 {
    let at = refcount_at(path, cluster) as usize;
    let b = std::fs::read(path).expect("read image");
    u64::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

fn set_refcount(path: &Path, cluster: u64, value: u16) {
    let at = refcount_at(path, cluster) as usize;
    let mut b = std::fs::read(path).expect("read image");
    b[at..at + 2].copy_from_slice(&value.to_be_bytes());
    std::fs::write(path, b).expect("write image");
}

/// Host clusters of the bitmap tables and of the bitmap data they point to.
fn bitmap_clusters(path: &Path) -> (Vec<u64>, Vec<u64>) {
    let b = std::fs::read(path).expect("read image");
    let cs = 1u64 << be32(&b, 20);
    let mut at = be32(&b, 100) as usize;
    loop {
        let (kind, len) = (be32(&b, at), be32(&b, at + 4) as usize);
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            break;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    let count = be32(&b, at + 8);
    let mut dir = be64(&b, at + 8 + 16) as usize;
    let (mut tables, mut data) = (Vec::new(), Vec::new());
    for _ in 0..count {
        let table = be64(&b, dir);
        let size = be32(&b, dir + 8) as usize;
        let name = usize::from(u16::from_be_bytes([b[dir + 18], b[dir + 19]]));
        let extra = be32(&b, dir + 20) as usize;
        tables.push(table / cs);
        for i in 0..size {
            let e = be64(&b, table as usize + 8 * i) & 0x00ff_ffff_ffff_fe00;
            if e > 1 {
                data.push(e / cs);
            }
        }
        dir += (24 + extra + name).div_ceil(8) * 8;
    }
    (tables, data)
}

/// The host offset qemu-img map gives for guest offset `guest`.
fn host_of(path: &Path, guest: u64) -> u64 {
    let out = qemu_img(&["map", "--output=json", s(path)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("map json");
    for e in v.as_array().expect("map array") {
        let (start, len) = (
            e["start"].as_u64().expect("start"),
            e["length"].as_u64().expect("length"),
        );
        if (start..start + len).contains(&guest) {
            return e["offset"].as_u64().expect("guest offset is allocated") + guest - start;
        }
    }
    panic!("{guest} not mapped");
}

/// `qemu-img check --output=json`: (exit code, corruptions, leaks, check errors).
fn qemu_check(path: &Path) -> (i32, u64, u64, u64) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", s(path)])
        .output()
        .expect("run qemu-img check");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check output: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (
        out.status.code().unwrap_or(-1),
        n("corruptions"),
        n("leaks"),
        n("check-errors"),
    )
}

/// Everything a repair must keep, as qemu sees it.
#[derive(Debug, PartialEq)]
struct State {
    snapshots: String,
    snapshot_contents: Vec<Vec<u8>>,
    bitmaps: serde_json::Value,
    dirty: Vec<Vec<(u64, u64)>>,
    active: Vec<u8>,
}

const SNAPSHOTS: &[&str] = &["snap1", "snap2"];
const BITMAPS: &[&str] = &["b1", "b2"];

fn state(image: &Path, scratch: &Scratch) -> State {
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", s(image)])).expect("info json");
    let snapshot_contents = SNAPSHOTS
        .iter()
        .map(|name| {
            let raw = scratch.path("snapshot.raw");
            // A snapshot that is gone (qemu's own repair loses them) reads as nothing.
            let ok = Command::new("qemu-img")
                .args([
                    "convert",
                    "-l",
                    &format!("snapshot.name={name}"),
                    "-O",
                    "raw",
                ])
                .args([image, &raw])
                .output()
                .expect("run qemu-img convert")
                .status
                .success();
            let bytes = if ok {
                std::fs::read(&raw).expect("read snapshot contents")
            } else {
                Vec::new()
            };
            let _ = std::fs::remove_file(&raw);
            bytes
        })
        .collect();
    State {
        snapshots: qemu_img(&["snapshot", "-l", s(image)]),
        snapshot_contents,
        bitmaps: info["format-specific"]["data"]["bitmaps"].clone(),
        dirty: BITMAPS
            .iter()
            .map(|name| qemu_dirty_ranges(image, name, scratch))
            .collect(),
        active: qemu_contents(image, scratch),
    }
}

/// An image with two snapshots and two bitmaps with content, both sharing clusters with
/// the active layer.
fn make_image(image: &Path, cluster_size: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster_size}"),
        s(image),
        "16M",
    ]);
    qemu_io(image, &["write -P 0x11 0 256k", "write -P 0x22 4M 128k"]);
    qemu_img(&["snapshot", "-c", "snap1", s(image)]);
    qemu_img(&["bitmap", "--add", s(image), "b1"]);
    qemu_img(&["bitmap", "--add", "-g", "4k", s(image), "b2"]);
    qemu_io(image, &["write -P 0x33 64k 64k", "write -P 0x44 8M 200k"]);
    qemu_img(&["snapshot", "-c", "snap2", s(image)]);
    qemu_io(image, &["write -P 0x55 12M 64k", "write -z 4M 4k"]);
}

/// Repairs `image` with vdisk and asserts nothing qemu can see was lost; first runs qemu's
/// repair on a copy and returns what that kept (for the record, not asserted).
fn repair_and_compare(image: &Path, before: &State, scratch: &Scratch) -> State {
    let copy = scratch.path("qemu-repaired.qcow2");
    std::fs::copy(image, &copy).expect("copy");
    let _ = Command::new("qemu-img")
        .args(["check", "-r", "all", s(&copy)])
        .output()
        .expect("run qemu-img check -r all");
    let qemu_after = state(&copy, scratch);

    let rw = OpenOptions {
        writable: true,
        ..options()
    };
    let report = Qcow2Format
        .check(image, &rw, RepairMode::All)
        .unwrap_or_else(|e| panic!("vdisk check -r all: {e}"));
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "vdisk's own report after the repair: {report:?}"
    );
    assert_eq!(
        qemu_check(image),
        (0, 0, 0, 0),
        "qemu-img check after vdisk's repair"
    );
    let after = state(image, scratch);
    assert_eq!(after.snapshots, before.snapshots, "snapshot list");
    for (i, name) in SNAPSHOTS.iter().enumerate() {
        assert_same(
            &after.snapshot_contents[i],
            &before.snapshot_contents[i],
            &format!("snapshot {name}"),
        );
    }
    assert_eq!(after.bitmaps, before.bitmaps, "bitmaps in qemu-img info");
    assert_eq!(after.dirty, before.dirty, "dirty ranges of {BITMAPS:?}");
    assert_same(&after.active, &before.active, "active layer");
    qemu_after
}

#[test]
fn repair_keeps_snapshots_and_bitmaps() {
    let sc = Scratch::new("repair-bm-sn");
    let img = sc.path("a.qcow2");
    make_image(&img, "64k");
    let before = state(&img, &sc);
    assert!(
        before.dirty.iter().all(|d| !d.is_empty()),
        "bitmaps have content: {:?}",
        before.dirty
    );
    let cs = layout(&img).cs;

    // A leaked cluster: one past the end of the file with a refcount of 1.
    let len = std::fs::metadata(&img).expect("stat").len();
    let leaked = len.div_ceil(cs);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .and_then(|f| f.set_len((leaked + 1) * cs))
        .expect("grow file");
    set_refcount(&img, leaked, 1);
    // Too high: the active layer's own cluster (guest 12M).
    let own = host_of(&img, 12 << 20) / cs;
    assert_eq!(refcount(&img, own), 1);
    set_refcount(&img, own, 2);
    // Too low: a cluster the active layer shares with both snapshots (guest 0).
    let shared = host_of(&img, 0) / cs;
    assert_eq!(refcount(&img, shared), 3);
    set_refcount(&img, shared, 1);
    // Zero under a bitmap table and under a bitmap data cluster.
    let (tables, data) = bitmap_clusters(&img);
    set_refcount(&img, tables[0], 0);
    if let Some(&d) = data.first() {
        set_refcount(&img, d, 0);
    }
    let damaged = qemu_check(&img);
    assert!(
        damaged.1 >= 3 && damaged.2 >= 2,
        "the damage shows: {damaged:?}"
    );

    let qemu_after = repair_and_compare(&img, &before, &sc);
    // For the record: qemu-img 10's `check -r all` rebuilds the refcount structure here and
    // drops both snapshots; the bitmaps and the active layer survive.
    eprintln!(
        "qemu-img check -r all kept: snapshots {:?}, bitmaps equal {}, active equal {}",
        qemu_after.snapshots,
        qemu_after.bitmaps == before.bitmaps && qemu_after.dirty == before.dirty,
        qemu_after.active == before.active
    );
}

#[test]
fn repair_of_a_missing_refcount_block_keeps_snapshots_and_bitmaps() {
    // 512-byte clusters: one refcount block covers 256 clusters (128 KiB of file), so the
    // image has many and one can go missing without taking the whole image with it.
    let sc = Scratch::new("repair-bm-sn-block");
    let img = sc.path("a.qcow2");
    make_image(&img, "512");
    let before = state(&img, &sc);
    let l = layout(&img);
    // The refcount block covering the clusters of guest 8M (written after the first
    // snapshot, shared with the second) is cut out of the refcount table.
    let cluster = host_of(&img, 8 << 20) / l.cs;
    let index = cluster / l.per_block;
    let mut b = std::fs::read(&img).expect("read image");
    let at = (l.reftable + 8 * index) as usize;
    assert_ne!(be64(&b, at), 0);
    b[at..at + 8].fill(0);
    std::fs::write(&img, b).expect("write image");
    let damaged = qemu_check(&img);
    assert!(damaged.1 > 0, "the damage shows: {damaged:?}");

    let qemu_after = repair_and_compare(&img, &before, &sc);
    eprintln!(
        "qemu-img check -r all kept: snapshots {:?}, bitmaps equal {}, active equal {}",
        qemu_after.snapshots,
        qemu_after.bitmaps == before.bitmaps && qemu_after.dirty == before.dirty,
        qemu_after.active == before.active
    );
}
